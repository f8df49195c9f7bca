"""An RTSP upstream whose H.264 has B-frames (pictures sent out of presentation order, as some IP
cameras' encoders do). WebRTC and a live MP4 cannot carry them as sent, so vsproxy notices the
first one, stops passing the stream through and re-encodes it without B-frames; the first
viewer of such a stream, an MP4 one included, gets a stream it can play from its start. Where
B-frames start mid-stream, or the upstream reconnects after they were found, the decoded
pictures keep presentation times increasing and at least 1 ms apart (distinct frames on a 90 kHz
RTP clock for WebRTC peers too), and the switch shows no gap: decoding starts from the last
keyframe that was passed through, not the next one.

GStreamer's RTSP server (rtsp_server.py) plays an MP4 file with B-frames that the test writes
with PyAV; like the other RTSP tests these fail, not skip, when its Debian packages are missing.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import av
import numpy as np
import pytest
from av.video.frame import PictureType
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


MIN_STEP_US = 1000  # vsproxy.sources.rtsp.MIN_STEP_US


def write_b_frame_stream(path: str, plain_seconds: float = 0.0, seconds: float = 60.0, *,
                         swapped: int | None = None) -> None:
    """H.264 Main profile with two B-frames between references, a keyframe every second (a
    moving bar: distinct frames); only I- and P-frames (forced) for the first `plain_seconds`.
    `swapped`: the presentation times of that frame and the next one are swapped (a clock
    glitch), every 30 frames from it."""
    width, height = STREAM_SIZE
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "profile": "main", "bf": "2", "b-adapt": "0", "g": "30",
                          "sc_threshold": "0"}
        picture = np.zeros((height, width, 3), np.uint8)
        picture[:, :, 2] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
        packets = []
        for i in range(int(seconds * 30)):
            frame_rgb = picture.copy()
            x = (i * 6) % (width - 30)
            frame_rgb[height // 3: height // 3 + 40, x:x + 30] = 255
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            frame.pts = i
            if i < plain_seconds * 30:
                frame.pict_type = PictureType.I if i % 30 == 0 else PictureType.P
            packets.extend(stream.encode(frame))
        packets.extend(stream.encode())
        for i, packet in enumerate(packets[:-1]):
            if swapped is not None and i % 30 == swapped:
                packet.pts, packets[i + 1].pts = packets[i + 1].pts, packet.pts
        for packet in packets:
            container.mux(packet)


@pytest.fixture
def rtsp_server(tmp_path, request):
    """The RTSP test server playing a B-frame stream (used by rtsp_url, hence proxy_config);
    indirect parameter: (seconds before the B-frames start, `swapped` of write_b_frame_stream),
    default (0, None)."""
    _import_rtsp_source()
    try:
        check_dependencies("h264")
    except RtspServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    plain_seconds, swapped = getattr(request, "param", (0.0, None))
    path = str(tmp_path / "b-frames.mp4")
    write_b_frame_stream(path, plain_seconds, swapped=swapped)
    with av.open(path) as check:
        assert check.streams.video[0].codec_context.has_b_frames, "the SPS must allow B-frames"
    server = RtspTestServer(free_port(), file=path)
    server.start()
    yield server
    server.stop()


class Collector:
    """A `format=h264` viewer of a new session, recording its access units' presentation times
    (or, with `arrival`, their arrival times) in `times` until `stop`."""

    def __init__(self, viewer, *, arrival: bool = False) -> None:
        self.viewer, self.arrival = viewer, arrival
        self.times: list = []
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._collect())

    @classmethod
    async def start(cls, api, ws_connect, *, arrival: bool = False, with_jpeg_viewer: bool = False) -> Collector:
        session_id = (await api.create_session())["sessionId"]
        viewer = await ws_connect(f"/stream/{session_id}?format=h264")
        if with_jpeg_viewer:  # JPEG wanted: the decoder runs
            await ws_connect(f"/stream/{session_id}?format=binary")
        return cls(viewer, arrival=arrival)

    async def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                message = await asyncio.wait_for(self.viewer.read_message(), 0.5)
            except asyncio.TimeoutError:
                continue
            if message is None:
                return
            if isinstance(message, bytes):
                self.times.append(time.monotonic() if self.arrival else int.from_bytes(message[1:9], "big"))

    async def until(self, done, timeout: float = 30) -> None:
        """Wait until `done()` (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> list:
        self._stop.set()
        await self._task
        return self.times


def bad_steps(times: list[int]) -> list[tuple[int, int]]:
    """(index, step in us) of presentation times less than MIN_STEP_US after the one before."""
    return [(i, b - a) for i, (a, b) in enumerate(zip(times, times[1:], strict=False), 1) if b - a < MIN_STEP_US]


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
    status, state, _ = await api.call("GET", "/dashboard/api/state")
    assert status == 200
    row = next(u for u in state["upstreams"] if u["name"] == UPSTREAM)
    assert row["encoder"] is True and row["bFrames"] is True, "the dashboard says why the encoder runs"


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [(0.0, None)], indirect=True)
async def test_decoded_b_frame_pictures_stay_a_millisecond_apart_across_a_reconnect(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    collector = await Collector.start(api, ws_connect)
    hub = proxy.hubs[UPSTREAM]
    await collector.until(lambda: len(collector.times) >= 60)
    assert hub.source.b_frames
    connects = hub.connects
    await asyncio.get_running_loop().run_in_executor(None, rtsp_server.restart)  # straight to re-encoding
    await collector.until(lambda: hub.connects > connects and len(collector.times) >= 150, timeout=60)
    times = await collector.stop()
    assert hub.connects > connects and hub.source.status()["passedThrough"] == 0
    assert not bad_steps(times), f"presentation times less than 1 ms apart (index, step in us): {bad_steps(times)}"


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [(3.0, None)], indirect=True)
async def test_the_mid_stream_switch_keeps_presentation_times_increasing(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    collector = await Collector.start(api, ws_connect, with_jpeg_viewer=True)  # the decoder runs at the switch
    hub = proxy.hubs[UPSTREAM]
    await collector.until(lambda: hub.source.b_frames)
    assert hub.source.b_frames, "B-frames start 3 s into the stream"
    await asyncio.sleep(2)
    times = await collector.stop()
    assert hub.encoder is not None and hub.encoder.running
    assert not bad_steps(times), f"presentation times less than 1 ms apart or back (index, step in us): " \
                                  f"{bad_steps(times)}"


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [(3.0, None)], indirect=True)
async def test_the_mid_stream_switch_does_not_wait_for_the_next_keyframe(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    """Only H.264 viewers (no decoder running at the switch): the re-encoded stream follows the
    passed-through one within a fraction of the 1 s GOP."""
    collector = await Collector.start(api, ws_connect, arrival=True)
    hub = proxy.hubs[UPSTREAM]
    await collector.until(lambda: hub.source.b_frames)
    assert hub.source.b_frames, "B-frames start 3 s into the stream"
    switched = time.monotonic()
    await asyncio.sleep(2)
    arrivals = await collector.stop()
    around = [t for t in arrivals if switched - 1 < t < switched + 1.5]
    gap = max(b - a for a, b in zip(around, around[1:], strict=False))
    assert gap < 0.5, f"{gap:.2f} s without a frame at the switch"
    assert hub.encoder is not None and hub.encoder.running


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("rtsp_server", [(60.0, 10)], indirect=True)
async def test_a_clock_glitch_without_b_frames_is_still_passed_through(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811
    """Presentation times that step back on P-frames (a camera's clock wobbling) are not
    B-frames: the stream stays passed through, untouched and not decoded."""
    collector = await Collector.start(api, ws_connect)
    hub = proxy.hubs[UPSTREAM]
    await collector.until(lambda: len(collector.times) >= 75)
    times = await collector.stop()
    assert len(times) >= 75 and times == sorted(times)
    assert not hub.source.b_frames and hub.source.produces_h264
    assert hub.source.stats["decoded"] == 0 and (hub.encoder is None or not hub.encoder.running)
