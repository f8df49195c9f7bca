"""An RTSP upstream whose H.264 has B-frames (pictures sent out of presentation order, as some IP
cameras' encoders do). WebRTC and a live MP4 cannot carry them as sent, so vsproxy notices the
first one, stops passing the stream through and re-encodes it without B-frames; the first
viewer of such a stream, an MP4 one included, gets a stream it can play from its start.

GStreamer's RTSP server (rtsp_server.py) plays an MP4 file with B-frames that the test writes
with PyAV; like the other RTSP tests these fail, not skip, when its Debian packages are missing.
"""

from __future__ import annotations

import io
import json
import time

import av
import numpy as np
import pytest
from helpers import free_port, raw_request, recv
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


def write_b_frame_stream(path: str, seconds: float = 60.0) -> None:
    """H.264 Main profile with two B-frames between references (a moving bar: distinct frames)."""
    width, height = STREAM_SIZE
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "profile": "main", "bf": "2", "b-adapt": "0", "g": "30",
                          "sc_threshold": "0"}
        picture = np.zeros((height, width, 3), np.uint8)
        picture[:, :, 2] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
        for i in range(int(seconds * 30)):
            frame_rgb = picture.copy()
            x = (i * 6) % (width - 30)
            frame_rgb[height // 3: height // 3 + 40, x:x + 30] = 255
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture
def rtsp_server(tmp_path):
    """The RTSP test server playing a B-frame stream (used by rtsp_url, hence proxy_config)."""
    _import_rtsp_source()
    try:
        check_dependencies("h264")
    except RtspServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    path = str(tmp_path / "b-frames.mp4")
    write_b_frame_stream(path)
    with av.open(path) as check:
        assert check.streams.video[0].codec_context.has_b_frames, "the file must have B-frames"
    server = RtspTestServer(free_port(), file=path)
    server.start()
    yield server
    server.stop()


@pytest.mark.gen_test(timeout=120)
async def test_a_b_frame_stream_is_re_encoded_and_its_first_mp4_viewer_plays_it(
        rtsp_server, api, ws_connect, proxy, http_port):  # noqa: F811  (fixtures of test_rtsp_source)
    session_id = (await api.create_session())["sessionId"]
    # The MP4 viewer comes first: it starts the upstream, so it sees the stream from its start.
    head, mp4 = await raw_request(http_port, f"/stream/{session_id}/stream.mp4")
    assert head.status == 200
    data = bytearray(head.body)
    viewer = await ws_connect(f"/stream/{session_id}?format=h264")
    deadline = time.monotonic() + 30
    while data.count(b"moof") < 75 and time.monotonic() < deadline:
        chunk = await mp4.read_bytes(65536, partial=True)  # raises if vsproxy closed the response
        data += chunk
    mp4.close()

    with av.open(io.BytesIO(bytes(data)), format="mp4") as container:
        video = container.streams.video[0]
        packets = [p for p in container.demux(video) if p.size]
        assert len(packets) >= 60
        decode_times = [p.dts for p in packets]
        assert decode_times == sorted(decode_times), "decode times must only go forward"
        assert [p.pts for p in packets] == decode_times, "no picture out of order: no B-frames"
        container.seek(0)
        frames = list(container.decode(video))
    assert len(frames) >= 60 and frames[0].key_frame
    shown = [f.time for f in frames]  # in display order
    steps = np.diff(shown)
    # The first few pictures may come closer together (FFmpeg reads the start of the stream in
    # a burst), then 30 fps.
    assert shown == sorted(shown) and np.median(steps) > 0.02 and (steps[8:] > 0.02).all(), \
        f"pictures are shown at even, increasing times (30 fps): {np.round(steps[:12], 3)}"
    assert (frames[0].width, frames[0].height) == STREAM_SIZE
    assert len({f.to_ndarray()[STREAM_SIZE[1] // 3 + 20].tobytes() for f in frames}) > 20, "a moving picture"

    config = json.loads(await recv(viewer, timeout=30))
    while config.get("type") != "config":
        config = json.loads(await recv(viewer, timeout=30))
    assert config["codec"].startswith("avc1.") and (config["width"], config["height"]) == STREAM_SIZE
    times = []
    while len(times) < 30:
        message = await recv(viewer, timeout=30)
        if isinstance(message, bytes):
            times.append(int.from_bytes(message[1:9], "big"))
    assert times == sorted(times) and len(set(times)) == len(times), "presentation order, one picture each"

    hub = proxy.hubs[UPSTREAM]
    assert hub.encoder is not None and hub.encoder.running and not hub.source.produces_h264
    status, body, _ = await api.call("GET", "/upstreams")
    assert status == 200
    upstream = next(u for u in body["upstreams"] if u["name"] == UPSTREAM)
    assert upstream["source"]["bFrames"] is True and upstream["source"]["decoded"] > 30
    assert upstream["source"]["passedThrough"] <= 3, "nothing passed through after the first B-frame"
