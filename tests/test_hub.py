"""Unit tests of the frame hub's building blocks, without HTTP: WebSocket frame headers, the
once-built wire representations of a frame, the rate meter, and a viewer's backpressure on a real
socket pair (at most one frame waiting, the newest wins)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import struct
from fractions import Fraction

import av
import pytest
from helpers import socket_pair, wait_until, write_buffer_bytes, ws_server_messages
from mjpeg_reader import MjpegReader

from vsproxy.codec.h264 import split_nals
from vsproxy.config import ReconnectConfig, StreamingConfig
from vsproxy.hub import Frame, FrameHub, RateMeter, _picture_size
from vsproxy.outputs import MJPEG, MJPEG_BOUNDARY, WS_BINARY, WS_JSON, TransportStats, Viewer, ws_frame
from vsproxy.outputs.viewer import H264Viewer
from vsproxy.outputs.wire import WS_H264
from vsproxy.render import TestPattern, jpeg_size
from vsproxy.sources import Source

JPEG = TestPattern(64, 48, "hub unit test").render(7, 0.0)


def parse_ws_frame(data: bytes) -> tuple[bool, int, bytes, int]:
    """(fin, opcode, payload, header length) of one unmasked WebSocket frame (RFC 6455 §5.2)."""
    first, second = data[0], data[1]
    assert first & 0x70 == 0, "RSV bits must be 0 (no extension negotiated)"
    assert second & 0x80 == 0, "server frames must not be masked"
    length = second & 0x7F
    offset = 2
    if length == 126:
        (length,) = struct.unpack("!H", data[2:4])
        offset = 4
        assert length >= 126, "the 16-bit length must not be used for lengths under 126"
    elif length == 127:
        (length,) = struct.unpack("!Q", data[2:10])
        offset = 10
        assert length >= 65536, "the 64-bit length must not be used for lengths under 65536"
        assert length >> 63 == 0, "the most significant bit of the 64-bit length must be 0"
    payload = data[offset:]
    assert len(payload) == length, f"header says {length} bytes, frame carries {len(payload)}"
    return bool(first & 0x80), first & 0x0F, payload, offset


@pytest.mark.parametrize(
    ("size", "header_length"),
    [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)],
)
@pytest.mark.parametrize("opcode", [0x1, 0x2])
def test_ws_frame_header_encodes_payload_length(size, header_length, opcode):
    payload = bytes(i % 251 for i in range(size))
    fin, parsed_opcode, parsed_payload, offset = parse_ws_frame(ws_frame(opcode, payload))
    assert fin
    assert parsed_opcode == opcode
    assert offset == header_length
    assert parsed_payload == payload


def test_frame_representations_are_built_once_and_decode_to_the_frame():
    frame = Frame(JPEG, seq=42)
    for transport in (WS_JSON, WS_BINARY, MJPEG):
        first = frame.encoded(transport)
        assert frame.encoded(transport) is first, f"{transport} was built twice"

    _, opcode, payload, _ = parse_ws_frame(frame.encoded(WS_JSON))
    assert opcode == 0x1  # text
    message = json.loads(payload.decode("utf-8"))
    assert set(message) == {"type", "data"}
    assert message["type"] == "frame"
    assert base64.b64decode(message["data"], validate=True) == JPEG

    _, opcode, payload, _ = parse_ws_frame(frame.encoded(WS_BINARY))
    assert opcode == 0x2  # binary
    assert payload == JPEG

    # An MJPEG part: headers, the JPEG, then the delimiter that announces the next part.
    reader = MjpegReader(MJPEG_BOUNDARY)
    parts = reader.feed(f"--{MJPEG_BOUNDARY}\r\n".encode() + frame.encoded(MJPEG))
    assert len(parts) == 1
    part = parts[0]
    assert part.body == JPEG
    assert part.headers["content-type"] == "image/jpeg"
    assert int(part.headers["content-length"]) == len(JPEG)
    assert int(part.headers["x-frame-seq"]) == 42
    assert float(part.headers["x-timestamp"]) == pytest.approx(frame.timestamp, abs=1e-5)
    assert reader.state == "headers", "the part must end with a complete delimiter line"


def test_rate_meter_counts_events_per_second():
    meter = RateMeter(window=5.0)
    start = 1000.0
    for i in range(30):  # 30 events, evenly spread over one second
        meter.add(1000, now=start + i / 30)
    fps, bps = meter.rates(now=start + 1.0)
    assert fps == pytest.approx(30, rel=0.05)
    assert bps == pytest.approx(30_000, rel=0.05)
    assert (meter.total_events, meter.total_bytes) == (30, 30_000)

    # Long after the window, the rate is zero again; the totals stay.
    assert meter.rates(now=start + 60) == (0.0, 0.0)
    assert (meter.total_events, meter.total_bytes) == (30, 30_000)


# -- Viewer backpressure on a real socket pair --------------------------------------------------


async def read_exactly(sock: socket.socket, size: int, timeout: float = 10) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()

    async def read() -> None:
        while len(out) < size:
            chunk = await loop.sock_recv(sock, min(1 << 16, size - len(out)))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {size} bytes")
            out.extend(chunk)

    await asyncio.wait_for(read(), timeout)
    return bytes(out)


def big_frame(seq: int, size: int = 1_000_000) -> Frame:
    return Frame(bytes([seq]) * size, seq)


@pytest.mark.gen_test(timeout=20)
async def test_busy_viewer_keeps_only_the_newest_frame():
    stream, client = socket_pair()
    stats = TransportStats()
    viewer = Viewer(stream, WS_BINARY, stats, close=lambda reason: None)
    try:
        frames = [big_frame(seq) for seq in range(1, 6)]
        viewer.offer(frames[0], frames[0].encoded(WS_BINARY))
        assert viewer.busy, "a 1 MB frame cannot fit in the socket buffers: the viewer must be busy"
        for frame in frames[1:]:
            viewer.offer(frame, frame.encoded(WS_BINARY))
        # At most one frame waits: the socket's write buffer holds less than one frame.
        assert write_buffer_bytes(stream) <= len(frames[0].encoded(WS_BINARY))
        assert viewer.frames_dropped == 3 and stats.frames_dropped == 3

        expected = frames[0].encoded(WS_BINARY) + frames[4].encoded(WS_BINARY)
        received = await read_exactly(client, len(expected))
        assert received == expected, "the viewer must get the first frame, then the newest one"
        await wait_until(lambda: not viewer.busy, what="the viewer to drain")
        assert viewer.frames_sent == 2 and stats.frames_sent == 2
        assert stats.bytes_sent == len(expected)

        # Nothing else was queued: the socket stays quiet.
        client.setblocking(True)
        client.settimeout(0.2)
        with pytest.raises(TimeoutError):
            client.recv(1)
    finally:
        stream.close()
        client.close()


@pytest.mark.gen_test(timeout=20)
async def test_viewer_fps_cap_skips_frames_that_come_too_soon():
    stream, client = socket_pair()
    viewer = Viewer(stream, WS_BINARY, TransportStats(), close=lambda reason: None, max_fps=10)
    try:
        sent = []
        for seq, arrived in enumerate([100.0, 100.05, 100.10, 100.12, 100.20, 100.40], start=1):
            frame = Frame(bytes([seq]) * 10, seq)
            frame.arrived = arrived
            viewer.offer(frame, frame.encoded(WS_BINARY))
            sent.append(frame)
        expected = b"".join(sent[i].encoded(WS_BINARY) for i in (0, 2, 4, 5))
        assert await read_exactly(client, len(expected)) == expected
        assert viewer.frames_sent == 4
    finally:
        stream.close()
        client.close()


class IdleSource(Source):
    kind = "test"

    def __init__(self) -> None:
        super().__init__("unit", None, ReconnectConfig())


@pytest.mark.gen_test(timeout=20)
async def test_hub_sends_each_viewer_its_format_and_drops_only_stalled_viewers():
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(stall_timeout_seconds=2.0),
                   reconnect=ReconnectConfig())
    pairs = {transport: socket_pair() for transport in (WS_JSON, WS_BINARY, MJPEG)}
    closed: list[tuple[str, str]] = []
    viewers = {}
    try:
        for transport, (stream, _) in pairs.items():
            viewers[transport] = Viewer(stream, transport, hub.stats[transport],
                                        close=lambda reason, t=transport: closed.append((t, reason)))
            hub.add_viewer(viewers[transport])
        assert hub.viewer_count() == 3

        hub.publish(JPEG)
        frame = hub.latest
        assert frame is not None and frame.seq == 1 and frame.jpeg == JPEG
        assert hub.snapshot() is frame
        for transport, (_, client) in pairs.items():
            expected = frame.encoded(transport)
            assert await read_exactly(client, len(expected)) == expected, transport

        # A big frame the binary viewer's peer never reads: that viewer stalls, the others drain.
        hub.publish(b"\xff\xd8" + bytes(2_000_000) + b"\xff\xd9")
        big = hub.latest
        for transport in (WS_JSON, MJPEG):
            expected = big.encoded(transport)
            assert await read_exactly(pairs[transport][1], len(expected)) == expected, transport
            await wait_until(lambda t=transport: not viewers[t].busy, what=f"{transport} to drain")
        assert viewers[WS_BINARY].busy

        now = viewers[WS_BINARY].last_drain
        assert hub.tick(now + 1.0) == 0 and closed == []
        assert hub.tick(now + 2.5) == 1
        assert [t for t, _ in closed] == [WS_BINARY]
        assert "stalled" in closed[0][1]

        hub.remove_viewer(viewers[WS_BINARY])
        assert hub.viewer_count() == 2
        hub.remove_viewer(viewers[WS_BINARY])  # removing twice is harmless
        assert hub.viewer_count() == 2
    finally:
        for stream, client in pairs.values():
            stream.close()
            client.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_frame_held_for_the_kernel_is_never_sent_after_a_newer_one():
    """Frame 1 waits because the kernel still holds the previous frame; by frame 2 it drained,
    so 2 goes out and 1 is dropped: a viewer must never see the picture jump back in time."""
    stream, client = socket_pair()
    viewer = Viewer(stream, WS_BINARY, TransportStats(), close=lambda reason: None)
    backlog = [True]  # the kernel is busy at the first offer only
    viewer._kernel_backlog = lambda: backlog.pop(0) if backlog else False  # type: ignore[method-assign]
    try:
        frames = [Frame(b"\xff\xd8" + bytes([n]) * 10 + b"\xff\xd9", n) for n in (1, 2)]
        for frame in frames:
            viewer.offer(frame, frame.encoded(WS_BINARY))
        viewer.flush_pending()  # what the hub's tick would do
        expected = frames[1].encoded(WS_BINARY)
        assert await read_exactly(client, len(expected)) == expected
        await asyncio.sleep(0.1)
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)  # nothing after it: frame 1 was dropped, not sent late
        assert viewer.frames_dropped == 1 and viewer.pending is None
    finally:
        stream.close()
        client.close()


@pytest.mark.gen_test(timeout=20)
async def test_an_origin_builds_only_the_relay_form_for_its_edges_and_sends_held_frames_in_it(monkeypatch):
    """A cluster origin whose edge wants JPEG, with no binary WebSocket viewer of its own, builds
    each frame's relay form only. Before, its relays were kept among the ws_binary viewers, so it
    also built the ws_binary bytes of every frame for nobody (a copy of each frame, ~3 MB/s at
    30 fps of 110 KB frames). A frame held for a busy relay socket goes out in the relay form
    too; before, it went out as ws_binary bytes, which the edge cannot read (it dropped them)."""
    from types import SimpleNamespace

    from vsproxy.cluster.relay import _AU_HEAD, RELAY_JPEG, RelayHandler
    from vsproxy.outputs import wire

    built: list[str] = []
    for transport in (WS_BINARY, wire.CLUSTER_JPEG):
        encoder = wire.ENCODERS[transport]
        monkeypatch.setitem(wire.ENCODERS, transport,
                            lambda frame, t=transport, e=encoder: built.append(t) or e(frame))
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(), reconnect=ReconnectConfig())
    stream, client = socket_pair()
    # The origin's side of an edge's relay connection, as its handler keeps it, asked for JPEG.
    handler = SimpleNamespace(viewers={}, hub=hub, ws_connection=SimpleNamespace(stream=stream),
                              _close_viewer=lambda reason: None)
    try:
        RelayHandler._want(handler, RELAY_JPEG, True)  # type: ignore[arg-type]
        (relay,) = handler.viewers.values()
        assert hub.jpeg_wanted
        for seq in range(1, 6):  # 1 MB each: the first keeps the socket busy, the newest waits
            hub.publish(bytes([seq]) * 1_000_000)
        assert built == [wire.CLUSTER_JPEG] * 5, built
        assert relay.busy and relay.pending is hub.latest

        received = await read_exactly(client, 2 * (1_000_000 + _AU_HEAD.size + 10))
        messages = ws_server_messages(received)
        assert [(payload[0], payload[_AU_HEAD.size]) for _, payload in messages] == [
            (wire.CLUSTER_JPEG_TYPE, 1), (wire.CLUSTER_JPEG_TYPE, 5)]  # what an edge reads as frames
        assert hub.viewer_counts()[WS_BINARY] == 0 and hub.stats[WS_BINARY].frames_sent == 2
        RelayHandler._want(handler, RELAY_JPEG, False)  # type: ignore[arg-type]
        assert not handler.viewers and not hub.jpeg_wanted
    finally:
        stream.close()
        client.close()


@pytest.mark.parametrize("size, expected", [
    ((0, 0), None), ((1280, 0), None), ((8, 8), None),
    ((1280, 720), (1280, 720)), ((65535, 65535), (1080, 1080)), ((3840, 1080), (1920, 540)),
])
def test_status_picture_size_comes_from_sane_headers_only(size, expected):
    assert _picture_size(size) == expected


@pytest.mark.gen_test(timeout=20)
async def test_an_absurd_frame_header_cannot_break_the_offline_picture():
    """Any upstream can send a JPEG whose header claims 0x0: the offline picture still renders."""
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(), reconnect=ReconnectConfig())
    zero_size = JPEG.replace(b"\x00\x30\x00\x40", b"\x00\x00\x00\x00", 1)  # SOF height 48, width 64 -> 0x0
    assert zero_size != JPEG and jpeg_size(zero_size) == (0, 0)
    hub.publish(zero_size)
    frame = hub._offline_frame()
    assert jpeg_size(frame.jpeg) == (1280, 720)  # the default size, not a crash


@pytest.mark.gen_test(timeout=20)
async def test_a_frame_of_fill_bytes_costs_the_offline_picture_one_bounded_look(monkeypatch):
    """Any upstream can send 8 MiB of JPEG fill bytes (FF D8, FF x 8M, FF D9): the size of the
    offline picture is read from the latest frame once per frame, not on every offline picture,
    snapshot and new viewer while the upstream is down, and the look stops after
    JPEG_SIZE_MAX_STEPS markers. Before, each look walked all 8 million bytes in Python (1.1 s of
    stalled event loop each, once a second and per snapshot request)."""
    from vsproxy import render

    filled = b"\xff\xd8" + b"\xff" * (8 << 20) + b"\xff\xd9"
    assert jpeg_size(filled) is None
    late_sof = b"\xff\xd8" + b"\xff\xfe\x00\x02" * render.JPEG_SIZE_MAX_STEPS + JPEG[2:]
    assert jpeg_size(JPEG[:2] + b"\xff\xfe\x00\x02" * 3 + JPEG[2:]) == (64, 48)
    assert jpeg_size(late_sof) is None  # beyond the steps it looks at
    looks = []
    real = render.jpeg_size
    monkeypatch.setattr(render, "jpeg_size", lambda data: looks.append(len(data)) or real(data))
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(), reconnect=ReconnectConfig())
    hub.publish(filled)
    for _ in range(5):
        assert hub._offline_frame().offline
    assert looks == [len(filled)], "one look for the frame, however many offline pictures"
    hub.publish(JPEG)
    frame = hub._offline_frame()
    assert jpeg_size(frame.jpeg) == (64, 48) and len(looks) == 2  # a new frame: looked at, drawn at its size


@pytest.mark.gen_test(timeout=20)
async def test_a_session_attaching_as_the_linger_expires_keeps_the_upstream():
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(linger_seconds=60), reconnect=ReconnectConfig())
    first, second = object(), object()
    hub.attach(first)  # type: ignore[arg-type]
    hub.detach(first)  # type: ignore[arg-type]
    hub._linger_handle.cancel()
    hub._linger_expired()  # the linger timer fires and schedules the stop...
    hub.attach(second)  # type: ignore[arg-type]  # ...and a new session arrives before it runs
    await asyncio.sleep(0.2)
    assert hub.running and hub.state != "idle"
    await hub.stop()
    assert hub.state == "idle" and not hub.running


@pytest.mark.gen_test(timeout=10)
async def test_relay_to_an_upstream_that_stops_reading_is_refused_not_queued():
    """Viewer input to a peer that takes nothing: refused once 1 MiB waits, accepted again later."""
    from vsproxy.sources.base import RelayBudget

    pending: list[asyncio.Future] = []

    async def write_message(message, binary=False):  # the peer's socket takes nothing until released
        waiter = asyncio.get_running_loop().create_future()
        pending.append(waiter)
        await waiter

    relay = RelayBudget()
    message = "x" * 65536
    accepted = 0
    while relay.send(write_message, message):
        accepted += 1
        assert accepted < 100, "the relay never refused"
    assert accepted == RelayBudget.LIMIT // len(message) + 1
    # A control message (a cluster edge saying what it wants relayed) still goes: it is a state
    # change the peer must learn, not input that may be refused.
    assert relay.send(write_message, b"\x01\x00", control=True)
    accepted += 1
    await wait_until(lambda: len(pending) == accepted, "the writes to start")
    for waiter in pending:
        waiter.set_result(None)  # the peer reads again
    await wait_until(lambda: relay.outstanding == 0, "the relayed bytes to be taken")
    assert relay.send(write_message, message)
    await wait_until(lambda: len(pending) == accepted + 1, "the last write to start")
    pending[-1].set_result(None)
    await wait_until(lambda: relay.outstanding == 0, "the last write to be taken")


@pytest.mark.gen_test(timeout=20)
async def test_text_reaches_websocket_viewers_and_listeners_not_viewers_without_text():
    """A cluster origin's relay connections are WebSocket viewers that take no text (they get it as
    text listeners): a status message, e.g. the upstream lost during a failover, must still reach
    everyone else instead of failing the hub's supervisor."""
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(), reconnect=ReconnectConfig())
    (relay_stream, relay_client), (ws_stream, ws_client) = socket_pair(), socket_pair()
    texts: list[str] = []
    heard: list[str] = []
    try:
        hub.add_viewer(Viewer(relay_stream, WS_BINARY, hub.stats[WS_BINARY], close=lambda reason: None))
        hub.add_viewer(Viewer(ws_stream, WS_JSON, hub.stats[WS_JSON], close=lambda reason: None,
                              send_text=texts.append))
        hub.text_listeners.append(heard.append)
        hub.notify("error", "Upstream 'unit' lost")
        assert [json.loads(t)["message"] for t in texts] == ["Upstream 'unit' lost"]
        assert heard == texts
    finally:
        for s in (relay_stream, relay_client, ws_stream, ws_client):
            s.close()


class ScriptedH264Source(Source):
    """An upstream that delivers H.264 itself, one list of access units per connection, each
    connection ending (lost) after its list, except the last, which stays up."""

    kind = "test"
    produces_h264 = True

    def __init__(self, connections: list[list[bytes]]) -> None:
        super().__init__("unit", None, ReconnectConfig(initial_delay_seconds=0.01))
        self.connections = connections
        self.connects = 0

    async def run(self, hub) -> None:
        units = self.connections[self.connects]
        self.connects += 1
        hub.set_connected()
        for i, unit in enumerate(units):
            hub.publish_h264(unit, 1_000_000 * self.connects + 33_000 * i)
        if self.connects < len(self.connections):
            raise ConnectionError("the camera hung up")
        await asyncio.Event().wait()


@pytest.mark.gen_test(timeout=20)
async def test_after_an_upstream_reconnect_h264_viewers_continue_at_its_next_keyframe():
    """A camera that resumes mid-GOP after a reconnect (its encoder kept going): the access
    units before its next keyframe refer to pictures the viewers never got on this connection,
    so they are not passed on (garbage on screen); the GOP cache of the old connection goes too."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "keyint": "250"}
    units = []
    for i in range(6):
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.planes[0].update(bytes([i * 40]) * frame.planes[0].buffer_size)
        frame.pts = i
        if i == 5:
            frame.pict_type = av.video.frame.PictureType.I
        units += [bytes(p) for p in encoder.encode(frame)]
    assert len(units) == 6
    # Connection 1: keyframe, P, P, then lost; connection 2: P (mid-GOP), P, then a keyframe.
    source = ScriptedH264Source([units[0:3], units[3:6]])
    hub = FrameHub("unit", source, streaming=StreamingConfig(), reconnect=source.reconnect)
    stream, client = socket_pair()
    viewer = H264Viewer(stream, WS_H264, hub.stats[WS_H264], close=lambda reason: None)
    hub.add_viewer(viewer)
    session = object()
    try:
        hub.attach(session)  # type: ignore[arg-type]
        await wait_until(lambda: source.connects == 2 and hub.connected, "the reconnect")
        await asyncio.sleep(0.1)
        client.setblocking(False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := client.recv(1 << 20):
                data += chunk
        received = [payload[9:] for opcode, payload in ws_server_messages(data) if opcode == 0x2]
        slices = [[n for n in split_nals(u) if n[0] & 0x1F in (1, 5)] for u in units]
        got = [[n for n in split_nals(u) if n[0] & 0x1F in (1, 5)] for u in received]
        assert got == [slices[0], slices[1], slices[2], slices[5]], \
            f"the viewer got access units {[slices.index(g) if g in slices else '?' for g in got]}"
        assert len(hub.gop) == 1 and hub.gop[0].keyframe, "the GOP cache begins at the new keyframe"
    finally:
        hub.detach(session)  # type: ignore[arg-type]
        await hub.stop()
        stream.close()
        client.close()


class BrokenViewer(Viewer):
    """An output with a bug: it raises on every frame it is offered."""

    def offer(self, frame, data) -> None:
        raise RuntimeError("a bug in an output")


class BrokenH264Viewer(H264Viewer):
    def offer(self, au, data) -> None:
        raise RuntimeError("a bug in an output")


@pytest.mark.allow_tracebacks  # the bug is logged with its traceback, as it should be
@pytest.mark.gen_test(timeout=20)
async def test_a_viewer_that_raises_costs_itself_not_the_viewers_after_it():
    """A viewer that raises taking a frame (a bug in one output) is disconnected; the viewers
    after it in the fan-out get the frame all the same. Before, the exception ended the fan-out
    loop there and went up into the source's read loop, which took it for a lost upstream."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    keyframe = bytes(encoder.encode(av.VideoFrame(64, 48, "yuv420p"))[0])
    hub = FrameHub("unit", IdleSource(), streaming=StreamingConfig(), reconnect=ReconnectConfig())
    pairs = [socket_pair() for _ in range(4)]
    closed: list[str] = []
    broken = BrokenViewer(pairs[0][0], WS_BINARY, hub.stats[WS_BINARY], close=closed.append)
    healthy = Viewer(pairs[1][0], WS_BINARY, hub.stats[WS_BINARY], close=closed.append)
    broken_h264 = BrokenH264Viewer(pairs[2][0], WS_H264, hub.stats[WS_H264], close=closed.append)
    healthy_h264 = H264Viewer(pairs[3][0], WS_H264, hub.stats[WS_H264], close=closed.append)
    try:
        for viewer in (broken, healthy, broken_h264, healthy_h264):  # the broken ones first
            hub.add_viewer(viewer)
        hub.publish(JPEG)
        expected = hub.latest.encoded(WS_BINARY)
        assert await read_exactly(pairs[1][1], len(expected)) == expected
        hub.publish_h264(keyframe, 1_000_000)
        (au,) = hub.gop
        expected = au.encoded(WS_H264)
        assert await read_exactly(pairs[3][1], len(expected)) == expected
        assert closed == ["Internal error", "Internal error"]
        assert hub.viewers[WS_BINARY] == [healthy] and hub.viewers[WS_H264] == [healthy_h264]
        assert pairs[0][0].closed() and pairs[2][0].closed()
    finally:
        for stream, client in pairs:
            stream.close()
            client.close()


class FailsOnceThenHangs(Source):
    """An upstream whose first connect fails, and whose next ones hang (a slow simulator)."""

    kind = "test"

    def __init__(self) -> None:
        super().__init__("unit", None, ReconnectConfig(initial_delay_seconds=0.01))
        self.runs = 0

    async def run(self, hub) -> None:  # noqa: ANN001
        self.runs += 1
        if self.runs == 1:
            raise ConnectionRefusedError("simulator down")
        await asyncio.Event().wait()


@pytest.mark.gen_test(timeout=20)
async def test_a_restarted_upstream_tells_a_new_viewer_it_connects_not_an_old_error():
    """An upstream stopped (its sessions gone) while offline and started again later: a new
    viewer's first status says it is connecting, not the error of the earlier run; the operator
    still sees that error as the last one until it connects."""
    source = FailsOnceThenHangs()
    hub = FrameHub("unit", source, streaming=StreamingConfig(linger_seconds=0.01), reconnect=source.reconnect)
    session = object()
    hub.attach(session)  # type: ignore[arg-type]
    await wait_until(lambda: source.runs >= 2, "the failed connect and the retry")
    hub.detach(session)  # type: ignore[arg-type]
    await wait_until(lambda: hub.state == "idle", "the upstream to stop")
    hub.attach(session)  # type: ignore[arg-type]
    stream, client = socket_pair()
    texts: list[str] = []
    try:
        hub.add_viewer(Viewer(stream, WS_JSON, hub.stats[WS_JSON], close=lambda reason: None, send_text=texts.append))
        assert [json.loads(t)["message"] for t in texts] == ["Connecting to upstream 'unit'"]
        assert "simulator down" in hub.status()["lastError"]
    finally:
        await hub.stop()
        stream.close()
        client.close()
