"""Limits: sessions in all and per user, viewers per session, request bodies, viewer message rates,
and the session-create rate (which spoofed X-Forwarded-For and unauthenticated requests cannot
escape or spend).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from helpers import (
    API_AUTH,
    BEARER,
    CREATE,
    Mjpeg,
    assert_json_error,
    create,
    read_frames,
    read_until_closed,
    wait_until,
    ws_open,
)
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

WAIT = 10.0  # bound for anything that should take well under a second


# -- limits ---------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_sessions": 2}})
async def test_max_sessions_503_then_ok_after_destroy(api):
    first = await create(api, user="a")
    await create(api, user="b")
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": "c"})
    assert_json_error(status, body, 503)
    assert "2" in body["error"]
    status, body, _ = await api.call("POST", f"/session/{first['sessionId']}/destroy")
    assert status == 200
    await create(api, user="c")


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_sessions_per_user": 2}})
async def test_max_sessions_per_user_429_then_ok_after_destroy(api):
    first = await create(api, user="alice")
    await create(api, user="alice")
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": "alice"})
    assert_json_error(status, body, 429)
    await create(api, user="bob")  # another user is not limited
    assert (await api.call("DELETE", f"/session/{first['sessionId']}"))[0] == 200
    await create(api, user="alice")


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config({"limits": {"max_viewers_per_session": 1}})
async def test_max_viewers_per_session_mjpeg_503_ws_1013_then_ok(api, http_port, proxy):
    session_id = (await create(api))["sessionId"]
    first = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert first.status == 200
    await first.parts(1)

    second = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert_json_error(second.status, second.json(), 503)
    conn = await ws_open(http_port, f"/stream/{session_id}")
    assert await read_until_closed(conn) == []  # no "connected" message, no frame
    assert conn.close_code == 1013
    assert len(proxy.sessions.get(session_id).viewers) == 1
    await first.parts(3)  # the viewer that got in is unaffected

    first.close()
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the MJPEG viewer to leave")
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 2)
    again = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert_json_error(again.status, again.json(), 503)  # the WebSocket viewer holds the place now
    conn.close()
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the WebSocket viewer to leave")
    again = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert again.status == 200
    again.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_body_bytes": 1024}})
async def test_max_body_413_for_declared_and_chunked_bodies_then_ok(api, base_url):
    big = json.dumps({**CREATE, "padding": "x" * 2000}).encode()
    status, body, _ = await api.call("POST", "/session/create", raw=big)
    assert_json_error(status, body, 413)
    assert "1024" in body["error"]

    async def produce(write):
        for _ in range(10):
            await write(b" " * 500)
        await write(json.dumps(CREATE).encode())

    request = HTTPRequest(base_url + "/session/create", method="POST", body_producer=produce, request_timeout=WAIT,
                          headers={"Content-Type": "application/json"})
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert_json_error(response.code, json.loads(response.body), 413)
    # Even a GET with a body is bounded.
    status, body, _ = await api.call("GET", "/sessions", raw=b"x" * 2000)
    assert_json_error(status, body, 413)
    # Just under the limit is fine.
    fits = json.dumps({**CREATE, "padding": "x" * 900}).encode()
    assert len(fits) <= 1024
    status, body, _ = await api.call("POST", "/session/create", raw=fits)
    assert status == 200, body


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"viewer_message_rate": 1, "viewer_message_burst": 2}})
async def test_viewer_message_flood_gets_an_error_then_close_1008(sim, api, http_port, proxy):
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    for i in range(5):
        conn.write_message(json.dumps({"type": "key", "n": i}))
    messages = await read_until_closed(conn)
    errors = [json.loads(m) for m in messages if isinstance(m, str) and json.loads(m).get("type") == "error"]
    assert any("too many" in e["message"].lower() for e in errors), errors
    assert conn.close_code == 1008
    await wait_until(lambda: len(sim.received) >= 2, "the messages within the burst to be relayed")
    assert len(sim.received) == 2
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the viewer to be removed")
    # Another connection of the same session has its own budget.
    conn = await ws_open(http_port, f"/stream/{session_id}")
    conn.write_message("one")
    await read_frames(conn, 2)
    assert conn.close_code is None
    conn.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"session_create_rate": 0.5, "session_create_burst": 2}})
async def test_session_create_rate_429_with_retry_after_then_allowed(api):
    await create(api, user="a")
    await create(api, user="b")
    status, body, response = await api.call("POST", "/session/create", {**CREATE, "userId": "c"})
    assert_json_error(status, body, 429)
    retry_after = response.headers["Retry-After"]
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    assert int(retry_after) <= 2  # 1 / rate
    # Refused requests do not spend anything more; after the wait one is allowed again.
    await asyncio.sleep(int(retry_after) + 0.05)
    await create(api, user="c")
    status, body, response = await api.call("POST", "/session/create", {**CREATE, "userId": "d"})
    assert_json_error(status, body, 429)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"server": {"trust_proxy_headers": True},
                     "limits": {"session_create_rate": 0.01, "session_create_burst": 2}})
async def test_forwarded_for_spoofing_does_not_escape_the_create_rate_limit(api):
    """Behind a trusted reverse proxy that appends the peer to X-Forwarded-For (nginx's
    $proxy_add_x_forwarded_for, and most others), the entries left of the last one are whatever the
    client sent. The per-address limit must key on the address the trusted proxy saw: the last one."""
    real_client = "203.0.113.7"
    statuses = []
    for i in range(5):
        headers = {"X-Forwarded-For": f"198.51.100.{i}, {real_client}"}  # a fresh spoofed address each time
        status, _, _ = await api.call("POST", "/session/create", {**CREATE, "userId": f"u{i}"}, headers=headers)
        statuses.append(status)
    assert statuses == [200, 200, 429, 429, 429], statuses
    # Another real client has its own budget.
    status, _, _ = await api.call("POST", "/session/create", CREATE,
                                  headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.8"})
    assert status == 200


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({**API_AUTH, "limits": {"session_create_rate": 0.01, "session_create_burst": 1}})
async def test_unauthenticated_creates_do_not_spend_the_rate_budget(api):
    for _ in range(5):
        status, _, _ = await api.call("POST", "/session/create", CREATE)
        assert status == 401
    await create(api, BEARER)
