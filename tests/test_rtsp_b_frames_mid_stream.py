"""RTSP H.264 whose B-frames start mid-stream, or that reconnects after they were found (see
test_rtsp_b_frames.py for the stream that has them from the start). Decoded pictures of such a
stream keep presentation times at least 1 ms apart and increasing (so they stay distinct frames
on a 90 kHz RTP clock for WebRTC peers too) across the switch from passthrough and across
reconnects, and the switch shows no freeze: the decoder starts from the last keyframe that was
passed through, not the next one.
"""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from av.video.frame import PictureType
from helpers import free_port
from rtsp_server import RtspServerUnavailable, RtspTestServer, check_dependencies
from test_rtsp_source import (  # noqa: F401  (fixtures)
    STREAM_SIZE,
    UPSTREAM,
    _import_rtsp_source,
    proxy_config,
    rtsp_threads,
    rtsp_url,
)

pytestmark = pytest.mark.external

MIN_STEP_US = 1000  # vsproxy.sources.rtsp.MIN_STEP_US


def write_stream(path: str, plain_seconds: float, seconds: float = 40.0) -> None:
    """H.264 Main, two B-frames between references, but only P-frames (forced) for the first
    `plain_seconds`: B-frames appear mid-stream. A keyframe every second; a moving bar."""
    width, height = STREAM_SIZE
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "profile": "main", "bf": "2", "b-adapt": "0", "g": "30",
                          "sc_threshold": "0"}
        picture = np.zeros((height, width, 3), np.uint8)
        picture[:, :, 2] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
        for i in range(int(seconds * 30)):
            rgb = picture.copy()
            x = (i * 6) % (width - 30)
            rgb[height // 3: height // 3 + 40, x:x + 30] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            if i < plain_seconds * 30:
                frame.pict_type = PictureType.I if i % 30 == 0 else PictureType.P
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture
def rtsp_server(tmp_path, request):
    """The RTSP test server playing a stream whose B-frames start after `param` seconds."""
    _import_rtsp_source()
    try:
        check_dependencies("h264")
    except RtspServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    path = str(tmp_path / "b-frames.mp4")
    write_stream(path, request.param)
    server = RtspTestServer(free_port(), file=path)
    server.start()
    yield server
    server.stop()


async def _collect(viewer, times: list[int], stop: asyncio.Event) -> None:
    """The presentation times of a `format=h264` viewer's access units."""
    while not stop.is_set():
        try:
            message = await asyncio.wait_for(viewer.read_message(), 0.5)
        except asyncio.TimeoutError:
            continue
        if message is None:
            return
        if isinstance(message, bytes):
            times.append(int.from_bytes(message[1:9], "big"))


def _bad_steps(times: list[int]) -> list[tuple[int, int]]:
    return [(i, b - a) for i, (a, b) in enumerate(zip(times, times[1:], strict=False), 1) if b - a < MIN_STEP_US]


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [0.0], indirect=True)
async def test_decoded_b_frame_pictures_stay_a_millisecond_apart_across_a_reconnect(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    viewer = await ws_connect(f"/stream/{session_id}?format=h264")
    times: list[int] = []
    stop = asyncio.Event()
    reader = asyncio.ensure_future(_collect(viewer, times, stop))
    hub = proxy.hubs[UPSTREAM]
    deadline = time.monotonic() + 30
    while len(times) < 60 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert hub.source.b_frames
    connects = hub.connects
    await asyncio.get_running_loop().run_in_executor(None, rtsp_server.restart)  # straight to re-encoding
    while (hub.connects == connects or len(times) < 150) and time.monotonic() < deadline + 30:
        await asyncio.sleep(0.1)
    stop.set()
    await reader
    assert hub.connects > connects and hub.source.status()["passedThrough"] == 0
    assert not _bad_steps(times), f"presentation times less than 1 ms apart (index, step in us): {_bad_steps(times)}"


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [3.0], indirect=True)
async def test_the_mid_stream_switch_keeps_presentation_times_increasing(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    viewer = await ws_connect(f"/stream/{session_id}?format=h264")
    await ws_connect(f"/stream/{session_id}?format=binary")  # JPEG wanted: the decoder is running at the switch
    times: list[int] = []
    stop = asyncio.Event()
    reader = asyncio.ensure_future(_collect(viewer, times, stop))
    hub = proxy.hubs[UPSTREAM]
    deadline = time.monotonic() + 30
    while not hub.source.b_frames and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert hub.source.b_frames, "B-frames start 3 s into the stream"
    await asyncio.sleep(2)
    stop.set()
    await reader
    assert hub.encoder is not None and hub.encoder.running
    assert not _bad_steps(times), f"presentation times less than 1 ms apart or back (index, step in us): " \
                                  f"{_bad_steps(times)}"


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [3.0], indirect=True)
async def test_the_mid_stream_switch_does_not_wait_for_the_next_keyframe(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    """Only H.264 viewers (no decoder running at the switch): the re-encoded stream follows the
    passed-through one within a fraction of the 1 s GOP."""
    session_id = (await api.create_session())["sessionId"]
    viewer = await ws_connect(f"/stream/{session_id}?format=h264")
    arrivals: list[float] = []
    stop = asyncio.Event()

    async def collect() -> None:
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(viewer.read_message(), 0.5)
            except asyncio.TimeoutError:
                continue
            if message is None:
                return
            if isinstance(message, bytes):
                arrivals.append(time.monotonic())

    reader = asyncio.ensure_future(collect())
    hub = proxy.hubs[UPSTREAM]
    deadline = time.monotonic() + 30
    while not hub.source.b_frames and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert hub.source.b_frames, "B-frames start 3 s into the stream"
    switched = time.monotonic()
    await asyncio.sleep(2)
    stop.set()
    await reader
    around = [t for t in arrivals if switched - 1 < t < switched + 1.5]
    gap = max(b - a for a, b in zip(around, around[1:], strict=False))
    assert gap < 0.5, f"{gap:.2f} s without a frame at the switch"
    assert hub.encoder is not None and hub.encoder.running
