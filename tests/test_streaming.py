"""Streaming end to end: frames from a simulated Isaac Sim (or the demo source) through the proxy to
WebSocket (JSON and binary), MJPEG and snapshot viewers, over real loopback sockets: formats and
snapshots, per-viewer parameters, connection counting and teardown, the demo source.

"Byte-identical" means every JPEG a viewer gets is one the simulator sent (`sim.frames`), and the
frames arrive in the order they were sent. The upstream's side (one shared connection, messages both
ways, loss and recovery) is in test_streaming_upstream.py, slow viewers in test_slow_viewers.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from helpers import (
    CONNECTED,
    SIM_SIZE,
    assert_sent_in_order,
    connected_session,
    count_between,
    next_message,
    read_frames,
    record_frames,
    recv,
    retry_while,
    session_json,
    spawn,
    text_type,
    wait_session,
    wait_until,
)
from mjpeg_reader import MjpegReader, boundary_from_content_type
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from vsproxy import render
from vsproxy.outputs import TRANSPORTS

WAIT = 10.0  # generous bound for anything that should take well under a second


# -- 1. frames arrive byte-identical and in order ---------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_ws_json_viewer_gets_status_then_identical_frames_in_order(sim, api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}")
    assert json.loads(await recv(conn)) == CONNECTED

    frames, texts = await read_frames(conn, 15)
    assert all(t["type"] == "status" and isinstance(t["message"], str) for t in texts), texts
    assert_sent_in_order(frames, sim)


@pytest.mark.gen_test(timeout=30)
async def test_ws_binary_viewer_gets_identical_jpeg_bytes_in_order(sim, api, ws_connect):
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    first = await recv(conn)
    assert isinstance(first, str), "status messages stay JSON text in the binary format"
    assert json.loads(first) == CONNECTED

    frames: list[bytes] = []
    while len(frames) < 15:
        message = await recv(conn)
        assert message is not None
        if isinstance(message, bytes):
            frames.append(message)
        else:
            assert json.loads(message)["type"] in ("status", "error"), message
    assert_sent_in_order(frames, sim)


@pytest.mark.gen_test(timeout=30)
async def test_mjpeg_viewer_gets_identical_parts_with_headers(sim, api, mjpeg_open):
    session_id = await connected_session(api)
    client = await mjpeg_open(f"/stream/{session_id}/mjpeg")

    content_type = client.headers["Content-Type"]
    assert content_type.split(";")[0].strip() == "multipart/x-mixed-replace"
    assert boundary_from_content_type(content_type)
    assert "no-cache" in client.headers["Cache-Control"]

    parts = [await client.next_part() for _ in range(15)]
    for part in parts:
        assert part.headers["content-type"] == "image/jpeg"
        assert int(part.headers["content-length"]) == len(part.body)
        assert abs(float(part.headers["x-timestamp"]) - time.time()) < 60
    seqs = [int(p.headers["x-frame-seq"]) for p in parts]
    assert seqs == sorted(set(seqs)), f"X-Frame-Seq must increase: {seqs}"
    stamps = [float(p.headers["x-timestamp"]) for p in parts]
    assert stamps == sorted(stamps), f"X-Timestamp must not go back: {stamps}"
    assert_sent_in_order([p.body for p in parts], sim)


@pytest.mark.gen_test(timeout=30)
async def test_snapshot_is_a_frame_the_upstream_sent(sim, api):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}/snapshot.jpg"
    deadline = time.monotonic() + WAIT
    while True:  # 503 until the first frame arrives
        code, _, response = await api.call("GET", path)
        if code == 200 or time.monotonic() > deadline:
            break
        assert code == 503
        await asyncio.sleep(0.05)
    assert code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.body in sim.frames
    assert int(response.headers["X-Frame-Seq"]) >= 1

    # Snapshots follow the stream: a later one is a later frame.
    _, _, later = await retry_while(lambda: api.call("GET", path), lambda r: r[2].body == response.body)
    assert_sent_in_order([response.body, later.body], sim)


# -- 2. snapshot before any frame ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_snapshot_before_any_frame_is_503_json(dead_upstream, api):
    session_id = (await api.create_session())["sessionId"]
    code, body, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert body["success"] is False and body["error"]
    assert (await session_json(api, session_id))["isIsaacSimConnected"] is False


# -- 7. per-viewer fps cap, refused handshakes ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
async def test_fps_parameter_caps_one_viewer(sim, api, ws_connect, mjpeg_open, tasks):
    session_id = await connected_session(api)
    uncapped: list[tuple[float, bytes]] = []
    capped: list[tuple[float, bytes]] = []
    tasks.append(spawn(record_frames(await ws_connect(f"/stream/{session_id}?format=binary"), uncapped)))
    tasks.append(spawn(record_frames(await ws_connect(f"/stream/{session_id}?format=binary&fps=5"), capped)))
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg?fps=5")
    await wait_until(lambda: uncapped and capped and mjpeg.arrivals, what="all three viewers to get a frame")

    window = 3.0
    start = time.monotonic()
    await asyncio.sleep(window)
    counts = {name: count_between(arrivals, start, start + window)
              for name, arrivals in (("uncapped", uncapped), ("capped", capped), ("mjpeg capped", mjpeg.arrivals))}
    assert counts["uncapped"] >= 24, f"the simulator should deliver well over 5 fps: {counts}"
    assert 0 < counts["capped"] <= 5 * window + 3, counts
    assert 0 < counts["mjpeg capped"] <= 5 * window + 3, counts
    assert_sent_in_order([jpeg for _, jpeg in capped], sim)


@pytest.mark.parametrize("query", ["fps=abc", "fps=0", "fps=121", "fps=nan", "format=xml", "format=binary&fps=-1"])
@pytest.mark.gen_test(timeout=30)
async def test_invalid_stream_parameters_refuse_the_handshake_with_400(sim, api, ws_connect, query):
    session_id = (await api.create_session())["sessionId"]
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(f"/stream/{session_id}?{query}")
    assert refused.value.code == 400
    if "fps" in query and "format" not in query:
        code, body, _ = await api.call("GET", f"/stream/{session_id}/mjpeg?{query}")
        assert code == 400 and body["success"] is False and "fps" in body["error"]
    assert (await session_json(api, session_id))["connections"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_unknown_session_is_404_on_every_stream_endpoint(sim, api, ws_connect):
    unknown = "stream_1700000000000_" + "0" * 32
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(f"/stream/{unknown}")
    assert refused.value.code == 404
    for path in (f"/stream/{unknown}/mjpeg", f"/stream/{unknown}/snapshot.jpg"):
        code, body, response = await api.call("GET", path)
        assert code == 404, path
        assert response.headers["Content-Type"].startswith("application/json"), path
        assert body == {"success": False, "error": "Session not found"}, path
    assert sim.connections_total == 0, "no session, no upstream connection"


# -- 8. connection counting and session teardown --------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_connections_count_viewers_across_transports(sim, api, ws_connect, mjpeg_open):
    session_id = await connected_session(api)
    assert (await session_json(api, session_id))["connections"] == 0
    conn = await ws_connect(f"/stream/{session_id}")
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg")
    await mjpeg.next_part()
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)

    conn.close()
    await wait_session(api, session_id, "1 connection", lambda s: s["connections"] == 1)
    await mjpeg.aclose()
    await wait_session(api, session_id, "0 connections", lambda s: s["connections"] == 0)
    hub = next(iter(h for h in (await api.call("GET", "/health"))[1]["upstreams"] if h["name"] == "isaac"))
    assert hub["viewers"] == dict.fromkeys(TRANSPORTS, 0)


@pytest.mark.gen_test(timeout=30)
async def test_destroying_a_session_closes_its_viewers(sim, api, ws_connect, http_port):
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    await read_frames(conn, 1)

    # A plain HTTP client on the MJPEG stream: the response must end when the session does.
    chunks: list[bytes] = []
    head: list[str] = []
    request = HTTPRequest(f"http://127.0.0.1:{http_port}/stream/{session_id}/mjpeg", request_timeout=60,
                          streaming_callback=chunks.append, header_callback=head.append)
    fetch = spawn(AsyncHTTPClient().fetch(request, raise_error=False))
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)
    await asyncio.sleep(0.3)  # let a few parts through

    code, body, _ = await api.call("DELETE", f"/session/{session_id}")
    assert code == 200 and body["success"] is True

    while (message := await next_message(conn)) is not None:
        assert isinstance(message, bytes) or text_type(message) in ("status", "error")
    assert conn.close_code == 1001
    assert "Session" in (conn.close_reason or "")

    response = await asyncio.wait_for(fetch, WAIT)
    assert response.code == 200
    content_type = next(line.split(":", 1)[1].strip() for line in head if line.lower().startswith("content-type:"))
    parts = MjpegReader(boundary_from_content_type(content_type)).feed(b"".join(chunks))
    assert parts, "no MJPEG part before the session ended"
    assert_sent_in_order([p.body for p in parts], sim)

    code, _, _ = await api.call("GET", f"/session/{session_id}")
    assert code == 404


# -- 9. the demo source -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_demo_source_streams_changing_jpegs_of_the_configured_size(api, ws_connect, proxy):
    assert proxy.config.isaac_ws_url is None, "this test needs the demo source"
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    frames, _ = await read_frames(conn, 6)
    for jpeg in frames:
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
        assert render.jpeg_size(jpeg) == SIM_SIZE
    for before, after in zip(frames, frames[1:], strict=False):
        assert before != after, "successive demo frames must differ"
    session = await session_json(api, session_id)
    assert session["upstream"] == "demo"
