"""The REST API of the original service: paths, JSON field names, messages, errors and CORS."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import tornado.websocket
from helpers import CREATE, EVIL, FRONTEND, assert_json_error
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from vsproxy import __version__

SESSION_ID_RE = re.compile(r"^stream_\d{13}_[0-9a-f]{32}$")
ISO_UTC_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CREATE_BODY = CREATE


# -- POST /session/create ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_create_session_response(api, http_port):
    status, body, response = await api.call("POST", "/session/create", CREATE_BODY)
    assert status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(body) == {"success", "sessionId", "wsUrl", "httpStreamUrl", "message"}
    assert body["success"] is True
    assert body["message"] == "Streaming session created"
    session_id = body["sessionId"]
    assert SESSION_ID_RE.match(session_id), session_id
    assert body["wsUrl"] == f"ws://127.0.0.1:{http_port}/stream/{session_id}"
    assert body["httpStreamUrl"] == f"http://127.0.0.1:{http_port}/stream/{session_id}/mjpeg"


@pytest.mark.gen_test(timeout=10)
async def test_each_session_gets_its_own_id(api):
    ids = {(await api.create_session())["sessionId"] for _ in range(5)}
    assert len(ids) == 5
    assert all(SESSION_ID_RE.match(i) for i in ids)


@pytest.mark.gen_test(timeout=10)
@pytest.mark.config({"server": {"public_url": "https://video.example.com"}})
async def test_public_url_is_used_for_returned_urls(api):
    """Behind TLS termination the configured public URL gives https/wss links."""
    body = await api.create_session()
    session_id = body["sessionId"]
    assert body["wsUrl"] == f"wss://video.example.com/stream/{session_id}"
    assert body["httpStreamUrl"] == f"https://video.example.com/stream/{session_id}/mjpeg"


@pytest.mark.gen_test(timeout=10)
@pytest.mark.config({"server": {"public_url": "http://proxy.example:8080/"}})
async def test_public_url_with_port_and_trailing_slash(api):
    body = await api.create_session()
    session_id = body["sessionId"]
    assert body["wsUrl"] == f"ws://proxy.example:8080/stream/{session_id}"
    assert body["httpStreamUrl"] == f"http://proxy.example:8080/stream/{session_id}/mjpeg"


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "video.example.com"}


@pytest.mark.gen_test(timeout=10)
async def test_forwarded_headers_ignored_by_default(api, http_port):
    """Any client could send X-Forwarded-*; by default they cannot choose the URLs handed out."""
    status, body, _ = await api.call("POST", "/session/create", CREATE_BODY, headers=FORWARDED)
    assert status == 200
    assert body["wsUrl"] == f"ws://127.0.0.1:{http_port}/stream/{body['sessionId']}"
    assert body["httpStreamUrl"] == f"http://127.0.0.1:{http_port}/stream/{body['sessionId']}/mjpeg"


@pytest.mark.gen_test(timeout=10)
@pytest.mark.config({"server": {"trust_proxy_headers": True, "allowed_hosts": ["video.example.com"]}})
async def test_forwarded_headers_honoured_when_trusted(api):
    status, body, _ = await api.call("POST", "/session/create", CREATE_BODY, headers=FORWARDED)
    assert status == 200
    assert body["wsUrl"] == f"wss://video.example.com/stream/{body['sessionId']}"
    assert body["httpStreamUrl"] == f"https://video.example.com/stream/{body['sessionId']}/mjpeg"


@pytest.mark.gen_test(timeout=10)
async def test_robot_name_of_128_characters_is_accepted(api):
    status, body, _ = await api.call("POST", "/session/create", {"userId": "u", "robotName": "r" * 128})
    assert status == 200, body
    _, info, _ = await api.call("GET", f"/session/{body['sessionId']}")
    assert info["session"]["robotName"] == "r" * 128


@pytest.mark.gen_test(timeout=10)
async def test_unicode_names_round_trip(api):
    created = await api.create_session(user="usér-ü", robot="ロボット")
    _, body, _ = await api.call("GET", f"/session/{created['sessionId']}")
    assert (body["session"]["userId"], body["session"]["robotName"]) == ("usér-ü", "ロボット")


# -- GET /session/{id}, GET /sessions, destroy -------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_get_session(api):
    created = await api.create_session(user="alice", robot="arm-1")
    status, body, _ = await api.call("GET", f"/session/{created['sessionId']}")
    assert status == 200
    assert body["success"] is True
    session = body["session"]
    assert {"id", "userId", "robotName", "createdAt", "lastActivity", "connections",
            "isIsaacSimConnected"} <= session.keys()
    assert session["id"] == created["sessionId"]
    assert (session["userId"], session["robotName"]) == ("alice", "arm-1")
    assert ISO_UTC_RE.match(session["createdAt"]), session["createdAt"]
    assert ISO_UTC_RE.match(session["lastActivity"]), session["lastActivity"]
    assert session["lastActivity"] >= session["createdAt"]
    assert session["connections"] == 0
    assert isinstance(session["isIsaacSimConnected"], bool)


@pytest.mark.gen_test(timeout=10)
async def test_connections_counts_viewers(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    await conn.read_message()
    _, body, _ = await api.call("GET", f"/session/{session_id}")
    assert body["session"]["connections"] == 1
    conn.close()
    for _ in range(50):  # the server notices the close asynchronously
        _, body, _ = await api.call("GET", f"/session/{session_id}")
        if body["session"]["connections"] == 0:
            break
        await asyncio.sleep(0.1)
    assert body["session"]["connections"] == 0


@pytest.mark.gen_test(timeout=15)
async def test_is_isaac_sim_connected_with_simulator(sim, api):
    """With a reachable Isaac Sim the session reports isIsaacSimConnected true (once connected)."""
    session_id = (await api.create_session())["sessionId"]
    for _ in range(100):
        _, body, _ = await api.call("GET", f"/session/{session_id}")
        if body["session"]["isIsaacSimConnected"]:
            break
        await asyncio.sleep(0.05)
    assert body["session"]["isIsaacSimConnected"] is True


@pytest.mark.gen_test(timeout=10)
async def test_list_sessions(api):
    status, body, _ = await api.call("GET", "/sessions")
    assert (status, body["success"], body["count"], body["sessions"]) == (200, True, 0, [])
    ids = {(await api.create_session())["sessionId"] for _ in range(3)}
    status, body, _ = await api.call("GET", "/sessions")
    assert status == 200
    assert body["success"] is True
    assert body["count"] == 3
    assert {s["id"] for s in body["sessions"]} == ids
    assert all({"userId", "robotName", "createdAt", "connections"} <= s.keys() for s in body["sessions"])


@pytest.mark.gen_test(timeout=10)
async def test_destroy_session_with_post(api):
    session_id = (await api.create_session())["sessionId"]
    status, body, _ = await api.call("POST", f"/session/{session_id}/destroy")
    assert (status, body) == (200, {"success": True, "message": "Session destroyed"})
    status, body, _ = await api.call("GET", f"/session/{session_id}")
    assert_json_error(status, body, 404)
    _, listing, _ = await api.call("GET", "/sessions")
    assert listing["count"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_destroy_session_with_delete(api):
    session_id = (await api.create_session())["sessionId"]
    status, body, _ = await api.call("DELETE", f"/session/{session_id}")
    assert (status, body) == (200, {"success": True, "message": "Session destroyed"})
    status, body, _ = await api.call("GET", f"/session/{session_id}")
    assert_json_error(status, body, 404)


@pytest.mark.gen_test(timeout=10)
async def test_destroy_twice_is_404_the_second_time(api):
    session_id = (await api.create_session())["sessionId"]
    assert (await api.call("POST", f"/session/{session_id}/destroy"))[0] == 200
    status, body, _ = await api.call("POST", f"/session/{session_id}/destroy")
    assert_json_error(status, body, 404)


@pytest.mark.gen_test(timeout=10)
async def test_destroy_closes_the_sessions_viewers(api, ws_connect):
    """A viewer of a destroyed session is disconnected and told why."""
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    await conn.read_message()
    await api.call("POST", f"/session/{session_id}/destroy")
    while await conn.read_message() is not None:
        pass
    assert conn.close_code == 1001
    assert "destroyed" in (conn.close_reason or "")


# -- GET /health -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_health(api):
    await api.create_session()
    await api.create_session()
    status, body, _ = await api.call("GET", "/health")
    assert status == 200
    assert {"status", "service", "version", "isaac_sim_ip", "isaac_sim_port", "active_sessions",
            "timestamp"} <= body.keys()
    assert body["status"] == "healthy"
    assert body["service"] == "video-stream-proxy"
    assert body["version"] == __version__
    assert body["isaac_sim_port"] == "8211"
    assert body["isaac_sim_ip"] == ""  # a string, as the original always sent; empty: demo source
    assert body["active_sessions"] == 2
    assert ISO_UTC_RE.match(body["timestamp"]), body["timestamp"]


@pytest.mark.gen_test(timeout=10)
async def test_health_reports_isaac_sim_address(sim, api):
    _, body, _ = await api.call("GET", "/health")
    assert body["isaac_sim_ip"] == "127.0.0.1"
    assert isinstance(body["isaac_sim_port"], str)
    assert body["active_sessions"] == 0


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("raw", [b"{not json", b'{"userId": "u", ', b"\xff\xfe"],
                         ids=["garbage", "truncated", "binary"])
async def test_malformed_json_is_400(api, raw):
    status, body, _ = await api.call("POST", "/session/create", raw=raw,
                                     headers={"Content-Type": "application/json"})
    assert_json_error(status, body, 400)


@pytest.mark.gen_test(timeout=10)
async def test_empty_body_is_400(api):
    status, body, _ = await api.call("POST", "/session/create", raw=b"")
    assert_json_error(status, body, 400)


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("payload", [[1, 2], "user123", 5, None], ids=["list", "string", "number", "null"])
async def test_body_not_an_object_is_400(api, payload):
    status, body, _ = await api.call("POST", "/session/create", raw=json.dumps(payload).encode())
    assert_json_error(status, body, 400)


@pytest.mark.gen_test(timeout=10)
async def test_missing_user_id_is_400(api):
    status, body, _ = await api.call("POST", "/session/create", {"robotName": "demo-robot"})
    assert_json_error(status, body, 400)
    assert "userId" in body["error"]


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("user_id", [123, None, "", "   ", ["u"], {"id": "u"}, True],
                         ids=["number", "null", "empty", "blank", "list", "object", "bool"])
async def test_user_id_must_be_a_non_empty_string(api, user_id):
    status, body, _ = await api.call("POST", "/session/create", {"userId": user_id, "robotName": "r"})
    assert_json_error(status, body, 400)
    assert "userId" in body["error"]
    _, listing, _ = await api.call("GET", "/sessions")
    assert listing["count"] == 0  # nothing was created


@pytest.mark.gen_test(timeout=10)
async def test_robot_name_over_128_characters_is_400(api):
    status, body, _ = await api.call("POST", "/session/create", {"userId": "u", "robotName": "r" * 129})
    assert_json_error(status, body, 400)
    assert "robotName" in body["error"]


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/session/stream_0000000000000_00000000000000000000000000000000"),
    ("POST", "/session/stream_0000000000000_00000000000000000000000000000000/destroy"),
    ("DELETE", "/session/stream_0000000000000_00000000000000000000000000000000"),
    ("GET", "/session/no-such-session"),
])
async def test_unknown_session_is_404(api, method, path):
    status, body, _ = await api.call(method, path)
    assert_json_error(status, body, 404)
    assert "not found" in body["error"].lower()


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("path", ["/nope", "/session", "/session/create/extra", "/health/x"])
async def test_unknown_path_is_json_404(api, path):
    status, body, response = await api.call("GET", path)
    assert_json_error(status, body, 404)
    assert response.headers["Content-Type"].startswith("application/json")


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/health"),
    ("POST", "/health"),
    ("GET", "/session/create"),
    ("DELETE", "/sessions"),
    ("GET", "/session/x/destroy"),
])
async def test_wrong_method_is_json_405(api, method, path):
    status, body, _ = await api.call(method, path, raw=b"{}" if method in ("PUT", "POST") else None)
    assert_json_error(status, body, 405)


SMALL_LIMIT = pytest.mark.config({"limits": {"max_body_bytes": 1024}})


def oversized_body() -> bytes:
    return json.dumps({"userId": "u", "robotName": "r", "padding": "x" * 2000}).encode()


@pytest.mark.gen_test(timeout=10)
@SMALL_LIMIT
async def test_body_over_limit_with_content_length_is_413(api):
    status, body, _ = await api.call("POST", "/session/create", raw=oversized_body())
    assert_json_error(status, body, 413)
    _, listing, _ = await api.call("GET", "/sessions")
    assert listing["count"] == 0


@pytest.mark.gen_test(timeout=10)
@SMALL_LIMIT
async def test_chunked_body_over_limit_is_413(base_url, http_server):
    """A chunked body (no Content-Length) is counted as it arrives and refused past the limit."""
    data = oversized_body()

    async def produce(write):
        for start in range(0, len(data), 256):
            await write(data[start:start + 256])

    request = HTTPRequest(base_url + "/session/create", method="POST", body_producer=produce,
                          headers={"Content-Type": "application/json"}, request_timeout=10)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert request.headers.get("Transfer-Encoding") == "chunked"  # the client really sent it chunked
    assert_json_error(response.code, json.loads(response.body), 413)


@pytest.mark.gen_test(timeout=10)
@SMALL_LIMIT
async def test_chunked_body_under_limit_is_accepted(base_url, http_server):
    data = json.dumps(CREATE_BODY).encode()

    async def produce(write):
        for start in range(0, len(data), 8):
            await write(data[start:start + 8])

    request = HTTPRequest(base_url + "/session/create", method="POST", body_producer=produce,
                          headers={"Content-Type": "application/json"}, request_timeout=10)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 200, response.body
    assert json.loads(response.body)["success"] is True


@pytest.mark.gen_test(timeout=10)
@pytest.mark.config({"limits": {"max_sessions": 2}})
async def test_session_limit_is_503_until_one_is_destroyed(api):
    first = await api.create_session()
    await api.create_session()
    status, body, _ = await api.call("POST", "/session/create", CREATE_BODY)
    assert_json_error(status, body, 503)
    await api.call("POST", f"/session/{first['sessionId']}/destroy")
    status, body, _ = await api.call("POST", "/session/create", CREATE_BODY)
    assert status == 200, body


# -- CORS --------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("method", "path", "payload", "expected_status"), [
    ("GET", "/health", None, 200),
    ("GET", "/sessions", None, 200),
    ("POST", "/session/create", CREATE_BODY, 200),
    ("POST", "/session/create", {"robotName": "r"}, 400),
    ("GET", "/session/unknown", None, 404),
    ("GET", "/no/such/path", None, 404),
    ("PUT", "/health", {}, 405),
])
async def test_allowed_origin_is_echoed(api, method, path, payload, expected_status):
    """The frontend's origin may read successes and errors alike."""
    status, _, response = await api.call(method, path, payload, headers={"Origin": FRONTEND})
    assert status == expected_status
    assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("method", "path", "payload"), [
    ("GET", "/health", None),
    ("POST", "/session/create", CREATE_BODY),
    ("GET", "/session/unknown", None),
])
async def test_unlisted_origin_gets_no_allow_origin(api, method, path, payload):
    _, _, response = await api.call(method, path, payload, headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.gen_test(timeout=10)
@pytest.mark.config({"cors": {"allowed_origins": ["https://app.example.com"]}})
async def test_configured_origins_replace_the_default(api):
    _, _, response = await api.call("GET", "/health", headers={"Origin": "https://app.example.com"})
    assert response.headers.get("Access-Control-Allow-Origin") == "https://app.example.com"
    _, _, response = await api.call("GET", "/health", headers={"Origin": FRONTEND})
    assert "Access-Control-Allow-Origin" not in response.headers


async def preflight(api, path: str, method: str, origin: str = FRONTEND):
    return await api.call("OPTIONS", path, headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type",
    })


def header_list(response, name: str) -> list[str]:
    return [item.strip().lower() for item in response.headers.get(name, "").split(",") if item.strip()]


@pytest.mark.gen_test(timeout=10)
async def test_preflight_for_session_create(api):
    status, _, response = await preflight(api, "/session/create", "POST")
    assert status == 204
    assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND
    assert "post" in header_list(response, "Access-Control-Allow-Methods")
    assert "content-type" in header_list(response, "Access-Control-Allow-Headers")


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("suffix", "method"), [("", "DELETE"), ("", "GET"), ("/destroy", "POST")],
                         ids=["delete-session", "get-session", "destroy-session"])
async def test_preflight_for_session_paths(api, suffix, method):
    """Cross-origin calls on /session/{id} (e.g. DELETE, or POST .../destroy with a JSON
    Content-Type) need a successful preflight, as /session/create gets."""
    session_id = (await api.create_session())["sessionId"]
    status, _, response = await preflight(api, f"/session/{session_id}{suffix}", method)
    assert status == 204
    assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND
    assert method.lower() in header_list(response, "Access-Control-Allow-Methods")
    assert "content-type" in header_list(response, "Access-Control-Allow-Headers")


@pytest.mark.gen_test(timeout=10)
async def test_preflight_from_unlisted_origin_is_not_allowed(api):
    _, _, response = await preflight(api, "/session/create", "POST", origin=EVIL)
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.gen_test(timeout=10)
async def test_websocket_from_allowed_origin_connects(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}", headers={"Origin": FRONTEND})
    first = json.loads(await conn.read_message())
    assert first == {"type": "status", "message": "\u2705 Connected to video stream proxy"}


@pytest.mark.gen_test(timeout=10)
async def test_websocket_from_unlisted_origin_is_refused(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    with pytest.raises(HTTPClientError) as info:
        await ws_connect(f"/stream/{session_id}", headers={"Origin": EVIL})
    assert info.value.code == 403
    _, body, _ = await api.call("GET", f"/session/{session_id}")
    assert body["session"]["connections"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_websocket_to_unknown_session_is_404(http_server, http_port):
    with pytest.raises(HTTPClientError) as info:
        await tornado.websocket.websocket_connect(HTTPRequest(
            f"ws://127.0.0.1:{http_port}/stream/stream_0000000000000_{'0' * 32}", request_timeout=5))
    assert info.value.code == 404
