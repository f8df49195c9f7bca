"""The rtsp upstream end to end: a real RTSP server (GStreamer's gst-rtsp-server, see
rtsp_server.py) on loopback serving H.264 or MJPEG, through RtspSource (PyAV decoding, JPEG
re-encoding in a worker thread) to WebSocket viewers.

These tests fail, not skip, when PyAV or the RTSP server's Debian packages are missing.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import threading
import time
from functools import partial
from typing import Any

import helpers
import pytest
from conftest import TEST_DEFAULTS, merge
from helpers import free_port, wait_until
from PIL import Image
from rtsp_server import RtspServerUnavailable, RtspTestServer, check_dependencies

from vsproxy import render
from vsproxy.config import config_from_dict

UPSTREAM = "sim-rtsp"
STREAM_SIZE = (640, 360)  # the test server's pictures
WAIT = 30.0  # RTSP setup, probing and the first keyframe take about a second; CI machines are slow
# This module's upstream and its own (longer) waits, on the shared helpers.
upstream_status = partial(helpers.upstream_status, name=UPSTREAM)
wait_upstream = partial(helpers.wait_upstream, timeout=WAIT, name=UPSTREAM)
recv = partial(helpers.recv, timeout=WAIT)
read_jpegs = partial(helpers.read_frames, timeout=WAIT)  # binary viewers: JPEGs, and the texts on the way
RECONNECT_WAIT = 60.0


def _import_rtsp_source():
    try:
        from vsproxy.sources import rtsp
    except ImportError as exc:
        problem = f"the rtsp source needs PyAV: pip install 'av>=18' ({exc})"
    else:
        return rtsp
    pytest.fail(problem, pytrace=False)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def rtsp_server(request):
    """A running RTSP test server on a free loopback port (indirect parameter: its options)."""
    _import_rtsp_source()
    options = getattr(request, "param", {})
    problem = None
    try:
        check_dependencies(options.get("codec", "h264"))
    except RtspServerUnavailable as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)
    server = RtspTestServer(free_port(), width=STREAM_SIZE[0], height=STREAM_SIZE[1], **options)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rtsp_url(request) -> str:
    """The upstream's URL: the running test server's, else a loopback port nothing listens on."""
    if "rtsp_server" in request.fixturenames:
        return request.getfixturevalue("rtsp_server").url
    userinfo = getattr(request, "param", "")  # indirect parameter: "user:password@"
    return f"rtsp://{userinfo}127.0.0.1:{free_port()}/stream"


@pytest.fixture
def proxy_config(request, rtsp_url, rtsp_threads):
    """conftest's test config with an rtsp upstream (the default) at `rtsp_url`; markers merge in.

    (It requests `rtsp_threads` so that fixture's check runs after the proxy has shut down.)
    """
    tree = merge(TEST_DEFAULTS, {
        "upstreams": {UPSTREAM: {"kind": "rtsp", "url": rtsp_url}},
        "default_upstream": UPSTREAM,
        "reconnect": {"connect_timeout_seconds": 5, "frame_timeout_seconds": 5},
    })
    for marker in reversed(list(request.node.iter_markers("config"))):
        tree = merge(tree, marker.args[0])
    return config_from_dict(tree)


@pytest.fixture
def rtsp_threads():
    """The live RTSP worker threads, as a function; once the proxy is shut down, none may be left."""
    _import_rtsp_source()
    def live() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("vsproxy-rtsp-")]

    yield live
    deadline = time.monotonic() + 15
    while live() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live(), f"RTSP worker threads left running: {live()}"


# -- helpers --------------------------------------------------------------------------------------


async def binary_viewer(api, ws_connect) -> tuple[str, Any]:
    """A new session on the rtsp upstream, once connected, and its binary WS viewer (past the hello)."""
    session_id = (await api.create_session())["sessionId"]
    await wait_upstream(api, "the rtsp upstream to connect", lambda s: s["state"] == "connected")
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    hello = await recv(conn)
    assert isinstance(hello, str) and json.loads(hello)["type"] == "status", hello
    return session_id, conn


def assert_valid_jpeg(data: bytes, max_size: tuple[int, int]) -> tuple[int, int]:
    assert render.is_jpeg(data), f"not a complete JPEG (SOI..EOI): {data[:4]!r}...{data[-4:]!r}"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        image.load()  # decodes the whole picture: raises on a truncated or corrupt JPEG
        size = image.size
    assert size == render.jpeg_size(data)
    assert size[0] <= max_size[0] and size[1] <= max_size[1], f"{size} does not fit in {max_size}"
    return size


# -- pure functions -------------------------------------------------------------------------------


def test_fit_within_keeps_the_aspect_and_never_scales_up():
    fit_within = _import_rtsp_source().fit_within
    assert fit_within(1280, 720, 1920, 1080) == (1280, 720)
    assert fit_within(1920, 1080, 1280, 1280) == (1280, 720)
    assert fit_within(1920, 1080, 1920, 540) == (960, 540)
    assert fit_within(640, 360, 320, 240) == (320, 180)
    assert fit_within(1000, 10, 16, 16) == (16, 1)


@pytest.mark.parametrize(("url", "expected"), [
    ("rtsp://127.0.0.1:8554/stream", "rtsp://127.0.0.1:8554/stream"),
    ("rtsp://admin:hunter22@cam.local:554/live?x=1", "rtsp://***@cam.local:554/live"),  # a query may hold a token
    ("rtsps://user@cam.local/stream", "rtsps://***@cam.local/stream"),
    ("rtsp://us%40er:p%3Ass@10.0.0.2/s", "rtsp://***@10.0.0.2/s"),
])
def test_redact_url_hides_credentials(url, expected):
    assert _import_rtsp_source().redact_url(url) == expected


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.config({"upstreams": {UPSTREAM: {"max_width": 320, "max_height": 240, "quality": 70}}})
@pytest.mark.gen_test(timeout=120)
async def test_h264_frames_reach_a_binary_viewer_as_jpegs_within_the_size_limit(
        rtsp_server, api, ws_connect, rtsp_threads):
    _, conn = await binary_viewer(api, ws_connect)
    frames, _ = await read_jpegs(conn, 20)
    for jpeg in frames:
        # 640x360 scaled to fit 320x240, keeping the aspect ratio.
        assert assert_valid_jpeg(jpeg, (320, 240)) == (320, 180)
    assert len(set(frames)) >= 10, "the test pattern moves, so the frames differ"
    assert [t.name for t in rtsp_threads()] == [f"vsproxy-rtsp-{UPSTREAM}"]


@pytest.mark.external
@pytest.mark.gen_test(timeout=120)
async def test_upstreams_reports_connected_and_the_incoming_frame_rate(rtsp_server, api, ws_connect):
    _, conn = await binary_viewer(api, ws_connect)
    frames, _ = await read_jpegs(conn, 5)
    assert assert_valid_jpeg(frames[-1], (1920, 1080)) == STREAM_SIZE  # default limits: no scaling
    status = await wait_upstream(api, "fpsIn > 5", lambda s: s["fpsIn"] > 5)
    assert status["kind"] == "rtsp"
    assert status["state"] == "connected"
    assert status["connects"] == 1 and status["lastError"] is None
    assert status["fpsIn"] <= 40, status  # the server sends 30 fps; nothing is duplicated
    assert status["bytesPerSecondIn"] > 0 and status["framesIn"] >= 5


@pytest.mark.external
@pytest.mark.parametrize("rtsp_server", [{"codec": "mjpeg"}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_mjpeg_over_rtsp_is_decoded_and_reencoded(rtsp_server, api, ws_connect):
    _, conn = await binary_viewer(api, ws_connect)
    frames, _ = await read_jpegs(conn, 10, distinct=True)
    for jpeg in frames:
        assert assert_valid_jpeg(jpeg, (1920, 1080)) == STREAM_SIZE


@pytest.mark.external
@pytest.mark.config({"upstreams": {UPSTREAM: {"transport": "udp"}}})
@pytest.mark.gen_test(timeout=120)
async def test_udp_transport_streams_too(rtsp_server, api, ws_connect):
    _, conn = await binary_viewer(api, ws_connect)
    frames, _ = await read_jpegs(conn, 10, distinct=True)
    for jpeg in frames:
        assert assert_valid_jpeg(jpeg, (1920, 1080)) == STREAM_SIZE


# -- losing the server ----------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.config({"streaming": {"offline_frame_interval_seconds": 0.5}})
@pytest.mark.gen_test(timeout=240)
async def test_server_killed_then_restarted_on_the_same_port_resumes_on_the_same_viewer(
        rtsp_server, api, ws_connect, rtsp_threads):
    _, conn = await binary_viewer(api, ws_connect)
    before, _ = await read_jpegs(conn, 5)

    rtsp_server.kill()  # like a crash: no TEARDOWN, the TCP connection just ends
    status = await wait_upstream(api, "the upstream to be retrying", lambda s: s["state"] == "retrying")
    assert status["lastError"], status

    # The viewer stays connected and is told: an error, then "reconnecting", and (as a binary
    # viewer) the offline picture; frames still on their way came before the error message.
    seen = [await recv(conn)]
    while not (isinstance(seen[-1], str) and json.loads(seen[-1])["type"] == "error"):
        seen.append(await recv(conn))
    assert UPSTREAM in json.loads(seen[-1])["message"]
    texts: list[dict] = []
    offline: list[bytes] = []
    while not (any(t["type"] == "status" and "Reconnecting" in t["message"] for t in texts) and len(offline) >= 2):
        message = await recv(conn)
        if isinstance(message, str):
            texts.append(json.loads(message))
        else:
            offline.append(message)
    assert len(set(offline)) == 1, "only the (repeated) offline picture while the server is down"
    assert render.is_jpeg(offline[0])
    assert render.jpeg_size(offline[0]) == STREAM_SIZE, "the offline picture keeps the stream's size"
    assert len(rtsp_threads()) <= 1, "at most the thread of the current connection attempt"

    await asyncio.get_running_loop().run_in_executor(None, rtsp_server.start)
    status = await wait_upstream(api, "the upstream to reconnect", lambda s: s["connects"] == 2,
                                 timeout=RECONNECT_WAIT)
    assert status["state"] == "connected"
    # Frames resume on the same WebSocket: moving pictures, not the (repeated) offline one.
    after, _ = await read_jpegs(conn, 10, distinct=True)
    for jpeg in after:
        assert assert_valid_jpeg(jpeg, (1920, 1080)) == STREAM_SIZE
    assert len(rtsp_threads()) == 1


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.config({"reconnect": {"frame_timeout_seconds": 2, "connect_timeout_seconds": 2}})
@pytest.mark.gen_test(timeout=240)
async def test_a_stalled_server_times_out_and_the_stream_recovers_when_it_resumes(
        rtsp_server, api, ws_connect, rtsp_threads):
    _, conn = await binary_viewer(api, ws_connect)
    await read_jpegs(conn, 5)

    os.kill(rtsp_server.process.pid, signal.SIGSTOP)  # connection open, but nothing arrives
    try:
        status = await wait_upstream(api, "the frame timeout", lambda s: s["state"] == "retrying")
        assert "time" in status["lastError"].lower(), status
        started = time.monotonic()
        # Connection attempts to the frozen server time out too; their threads do not pile up.
        while time.monotonic() - started < 6:
            assert len(rtsp_threads()) <= 2, rtsp_threads()  # the current attempt and one finishing
            await asyncio.sleep(0.2)
        assert (await upstream_status(api))["state"] == "retrying"
    finally:
        os.kill(rtsp_server.process.pid, signal.SIGCONT)
    await wait_upstream(api, "the upstream to reconnect", lambda s: s["state"] == "connected",
                        timeout=RECONNECT_WAIT)
    frames, _ = await read_jpegs(conn, 10, distinct=True)
    assert all(render.jpeg_size(f) == STREAM_SIZE for f in frames)


PASSWORD = "s3cretPW"


@pytest.mark.parametrize("rtsp_url", [f"admin:{PASSWORD}@"], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_connecting_to_a_dead_server_retries_and_never_shows_the_password(
        rtsp_url, api, ws_connect, rtsp_threads, caplog):
    caplog.set_level(logging.DEBUG)
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}")  # JSON viewer: status messages, no pictures
    status = await wait_upstream(api, "two failed attempts", lambda s: s["failures"] >= 2)
    assert status["state"] == "retrying" and status["connects"] == 0
    assert "refused" in status["lastError"].lower(), status
    assert "***@127.0.0.1" in status["lastError"], status
    seen = []
    while not any("Reconnecting" in m for m in seen):
        seen.append(await recv(conn))
    everything = json.dumps(status) + "".join(seen) + caplog.text
    assert PASSWORD not in everything and "admin:" not in everything
    assert len(rtsp_threads()) <= 1


# -- the worker thread runs only while the upstream has sessions ----------------------------------


@pytest.mark.external
@pytest.mark.config({"streaming": {"linger_seconds": 0.2}})
@pytest.mark.gen_test(timeout=120)
async def test_decoding_thread_stops_when_the_last_session_is_gone(rtsp_server, api, ws_connect, rtsp_threads):
    for round_ in range(2):  # and starts again for the next session
        session_id, conn = await binary_viewer(api, ws_connect)
        await read_jpegs(conn, 5)
        assert len(rtsp_threads()) == 1
        code, _, _ = await api.call("DELETE", f"/session/{session_id}")
        assert code == 200
        await wait_upstream(api, "the upstream to go idle", lambda s: s["state"] == "idle")
        await wait_until(lambda: not rtsp_threads(), what="the RTSP worker thread to exit")
        status = await upstream_status(api)
        assert status["connects"] == round_ + 1 and status["sessions"] == 0


# -- the worker thread and the event loop ---------------------------------------------------------


class RecordingHub:
    """The HubLink calls a source makes, recorded (JPEG always wanted, as with JPEG viewers)."""

    jpeg_wanted = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.access_units: list[bytes] = []
        self.connected = 0

    def set_connected(self) -> None:
        self.connected += 1

    def publish(self, jpeg: bytes, captured: float | None = None) -> None:
        assert self.connected, "set_connected() comes before the first frame"
        self.frames.append(jpeg)

    def publish_h264(self, data: bytes, pts_us: int) -> None:
        assert self.connected, "set_connected() comes before the first access unit"
        self.access_units.append(data)

    def source_format_changed(self) -> None:
        pass


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_a_blocked_event_loop_costs_dropped_frames_never_a_queue(rtsp_server, rtsp_threads):
    from vsproxy.config import ReconnectConfig
    from vsproxy.sources.rtsp import RtspSource, RtspUpstream

    source = RtspSource("direct", RtspUpstream(url=rtsp_server.url), ReconnectConfig())
    hub = RecordingHub()
    task = asyncio.ensure_future(source.run(hub))
    try:
        await wait_until(lambda: len(hub.frames) >= 10, what="10 frames")
        assert hub.connected == 1
        skipped = source.stats["skipped_busy"]
        before = len(hub.frames)
        time.sleep(1.5)  # the loop is stuck; the thread keeps decoding ~45 frames meanwhile
        await asyncio.sleep(0.01)
        assert len(hub.frames) - before <= 2, "at most the one frame waiting for the loop, and one new one"
        assert source.stats["skipped_busy"] - skipped >= 20, source.stats
        await wait_until(lambda: len(hub.frames) >= before + 10, what="frames to flow again")
        assert len(rtsp_threads()) == 1
    finally:
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # On a live stream the thread notices the stop within a packet, and run() waits for it.
    assert time.monotonic() - started < 1.0
    assert not rtsp_threads(), "run() returned but its thread is still running"
    assert source.stats == {}


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.config({"streaming": {"linger_seconds": 0.2},
                     "reconnect": {"frame_timeout_seconds": 3, "connect_timeout_seconds": 3}})
@pytest.mark.gen_test(timeout=120)
async def test_last_session_gone_while_the_server_is_stalled_stops_without_hanging(
        rtsp_server, api, ws_connect, rtsp_threads):
    session_id, conn = await binary_viewer(api, ws_connect)
    await read_jpegs(conn, 5)
    os.kill(rtsp_server.process.pid, signal.SIGSTOP)  # the worker thread now blocks in a read
    try:
        started = time.monotonic()
        code, _, _ = await api.call("DELETE", f"/session/{session_id}")
        assert code == 200
        # The hub does not wait for the blocked read: idle after the linger and at most ~1 s.
        await wait_upstream(api, "the upstream to go idle", lambda s: s["state"] == "idle")
        assert time.monotonic() - started < 5, "stopping waited for the stalled read"
        # The thread ends by itself once its read times out (frame_timeout_seconds).
        await wait_until(lambda: not rtsp_threads(), timeout=15, what="the RTSP worker thread to exit")
    finally:
        os.kill(rtsp_server.process.pid, signal.SIGCONT)
