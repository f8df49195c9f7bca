"""The RTSP upstream: an H.264 (or MJPEG) RTSP stream, such as Isaac Sim's isaacsim.streaming.rtsp
extension serves from NVENC at rtsp://host:8554/stream, re-encoded to JPEG for the viewers.

PyAV (FFmpeg) reads, depacketizes and decodes the stream in a worker thread, one per connection,
so the event loop never blocks: the thread scales each picture to fit max_width x max_height
(swscale, which also converts YUV to RGB), encodes it with Pillow at `quality` and hands the JPEG
to the loop with `call_soon_threadsafe`. It hands over at most one frame at a time: while the loop
has not yet taken the previous one, new frames are decoded (H.264 needs every one) but not
encoded, so a busy loop costs dropped frames, never a queue or latency. For the same reason the
thread spends at most half its time encoding; on a machine too slow for the stream's size and
rate it encodes fewer frames instead of falling behind the live stream.

Frames carry their capture time where the server tells it: once an RTCP sender report has come,
FFmpeg's RTP demuxer maps each packet's RTP timestamp to the server's wall clock (the producer
reference time side data, AV_PKT_DATA_PRFT), which `CaptureClock` takes as the frame's capture
time (H.264 presentation time, frame age); before the first report, or from a server whose clock
is far off ours, it is the arrival time.

The thread runs only while `run()` runs, i.e. while the upstream has sessions: when run() is
cancelled it tells the thread to stop, which it does after the packet it is reading (a few ms on
a live stream; at most the read timeout on a stalled one), and it closes the RTSP session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import av
import av.error
from av.video.reformatter import VideoReformatter
from PIL import Image

from ..auth import redact_url
from ..codec.h264 import CLOCK_AHEAD_LIMIT_SECONDS, MAX_FRAME_AGE_OFFSET, Gop, has_b_slice, stream_reorders
from ..errors import DescribedError, describe_error
from ..schema import setting
from .base import FrameTimeout, HubLink, Source, url_address

if TYPE_CHECKING:
    from ..config import ReconnectConfig

log = logging.getLogger("vsproxy.rtsp")

THREAD_PREFIX = "vsproxy-rtsp"  # worker threads are named "vsproxy-rtsp-<upstream>"
ENCODE_SHARE = 0.5  # encoding may use this share of the worker thread's time...
ENCODE_BURST_SECONDS = 0.25  # ...averaged over bursts of up to this much encoding time
STOP_WAIT_SECONDS = 1.0  # how long run() waits, when cancelled, for the thread to finish
# Access units of a new H.264 stream held back until they show no B-frames (two frames' delay,
# once per connection): a B-frame comes third at the latest in a usual GOP (I P B ...).
HOLD_ACCESS_UNITS = 3
# A packet whose pts is this much or less behind the previous one's is a B-frame; a larger step
# back is the stream's timestamps starting over (a server restarting its clock), not reordering.
REORDER_WINDOW_SECONDS = 1.0
# Almost no probing: the SDP describes the stream, and the decoder reads the H.264 parameter
# sets in-band anyway. FFmpeg's default probing reads ~1 s of the stream before returning, which
# then comes out as a burst of stale frames after every (re)connect.
PROBE_OPTIONS = {"probesize": "32", "analyzeduration": "100000"}
# A capture time (from the server's clock, via its RTCP sender reports) further ahead of our clock
# than CLOCK_AHEAD_LIMIT_SECONDS, or further behind than this, means the server's clock is not
# synced: the arrival time instead (the limits `capture_time` applies to every upstream's word).
CLOCK_BEHIND_LIMIT_SECONDS = MAX_FRAME_AGE_OFFSET
MIN_STEP_US = 1000  # consecutive frames' capture times differ by at least this


class RtspError(DescribedError):
    """Opening or reading the stream failed (the message says how, and never contains URL
    credentials)."""


def _secrets(url: str) -> list[str]:
    """The strings of `url` that must never appear in a log line or error message."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [url] + ([parts.query, unquote(parts.query)] if len(parts.query) >= 3 else [])
    if "@" not in parts.netloc:
        return sorted({s for s in found if s}, key=len, reverse=True)
    userinfo = parts.netloc.rpartition("@")[0]
    found += [userinfo, unquote(userinfo)]
    user, _, password = userinfo.partition(":")
    found += [p for p in (password, unquote(password)) if len(p) >= 3]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _resolution_error(url: str) -> socket.gaierror | None:
    """The resolver's error for the host of `url`, or None if it resolves (or is an address)."""
    try:
        host = urlsplit(url).hostname
        if host:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc
    except (ValueError, UnicodeError, OSError):
        pass
    return None


def fit_within(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """The size of a width x height picture scaled down (never up) to fit, keeping its aspect."""
    scale = min(1.0, max_width / width, max_height / height)
    if scale >= 1.0:
        return width, height
    return max(1, min(max_width, round(width * scale))), max(1, min(max_height, round(height * scale)))


@dataclass(frozen=True)
class RtspUpstream:
    """An RTSP H.264/MJPEG stream (Isaac Sim's isaacsim.streaming.rtsp), re-encoded to JPEG."""

    url: str = setting("", doc="`rtsp://` or `rtsps://` URL of the stream")
    transport: str = setting("tcp", choices=("tcp", "udp"), doc="RTP over the RTSP connection, or UDP")
    quality: int = setting(80, min=1, max=100, doc="JPEG quality of the re-encoded frames")
    max_width: int = setting(1920, min=16, max=7680, doc="larger pictures are scaled down to fit")
    max_height: int = setting(1080, min=16, max=4320, doc="larger pictures are scaled down to fit")


def producer_time_us(packet: Any) -> int | None:
    """The server's wall-clock time of `packet` (microseconds since the Unix epoch) that FFmpeg's
    RTP demuxer derives from the latest RTCP sender report (its NTP/RTP timestamp pair) and the
    packet's RTP timestamp; None before the first sender report."""
    side_data = packet.get_sidedata("prft")  # AVProducerReferenceTime: int64 wallclock, int flags
    return struct.unpack_from("=q", side_data)[0] if side_data else None


class CaptureClock:
    """The capture times of one RTSP connection's frames, in microseconds since the Unix epoch,
    strictly increasing (a decoder, the MP4 muxer and WebCodecs need that): the server's, from its
    RTCP sender reports, where it sends them and its clock agrees with ours; else the arrival time.

    `state` says which ("arrival" before the first report, "rtcp", "unsynced" when the server's
    clock is off), `offset` how much earlier than its arrival the latest mapped frame was taken by
    the server's clock (seconds: network and server latency plus the clocks' difference).
    """

    def __init__(self, on_unsynced: Callable[[float], None] | None = None) -> None:
        self.state = "arrival"
        self.offset: float | None = None
        self._on_unsynced = on_unsynced  # called (with the offset) when a mapping is refused
        self._mapped_before = False
        self._last_us = 0

    def capture_us(self, packet: Any, arrived_us: int) -> int:
        """The capture time of `packet`, which arrived at `arrived_us` (our wall clock)."""
        mapped = producer_time_us(packet)
        chosen = arrived_us
        # FFmpeg's parser hands the first access unit assembled after the first sender report
        # the side data of the packet that completed it, i.e. the next frame's time (one frame
        # too late); from the second one on, each carries its own. So a mapping counts only when
        # the packet before had one too.
        if mapped is not None and self._mapped_before:
            self.offset = (arrived_us - mapped) / 1_000_000
            if -CLOCK_AHEAD_LIMIT_SECONDS <= self.offset <= CLOCK_BEHIND_LIMIT_SECONDS:
                chosen, self.state = mapped, "rtcp"
            else:
                if self.state != "unsynced" and self._on_unsynced is not None:
                    self._on_unsynced(self.offset)
                self.state = "unsynced"
        self._mapped_before = mapped is not None
        # Switching from arrival to capture times steps back by the server's latency: the
        # frames of that step get a small increase instead of an earlier time (a millisecond, so
        # they stay distinct frames on a 90 kHz RTP clock too, e.g. for WebRTC peers).
        chosen = max(chosen, self._last_us + MIN_STEP_US)
        self._last_us = chosen
        return chosen


class RtspSource(Source):
    kind = "rtsp"
    settings_class = RtspUpstream
    url_schemes = ("rtsp://", "rtsps://")
    # H.264 streams are passed through; set per connection once the stream's codec is known
    # (MJPEG over RTSP then goes through the hub's encoder like any JPEG upstream).
    produces_h264 = True

    def __init__(self, name: str, settings: RtspUpstream, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.safe_url = redact_url(settings.url)
        self.address = url_address(settings.url)  # the RTSP connection's, whatever the RTP transport
        self._reader: _Reader | None = None
        self._clock_warned = False  # "the server's clock is off" is logged once per upstream
        # The H.264 stream has B-frames (pictures sent out of order), which WebRTC and live MP4
        # cannot take as sent: from then on (reconnects included) it is decoded and goes through
        # the hub's encoder like a JPEG upstream, instead of being passed through.
        self.b_frames = False

    def __repr__(self) -> str:
        return f"RtspSource({self.name!r}, {self.safe_url!r})"

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the current connection (decoded, encoded, skipped frames)."""
        reader = self._reader
        return dict(reader.counters) if reader is not None else {}

    def status(self) -> dict:
        # Frames decoded (and re-encoded to JPEG) vs passed through untouched to H.264 viewers.
        stats = self.stats
        reader = self._reader
        clock = reader.clock if reader is not None else None
        # Where frames' capture times come from, and how much earlier than their arrival the
        # server's clock says they were taken (null before its first RTCP sender report).
        return {"decoded": stats.get("decoded", 0), "passedThrough": stats.get("passed_through", 0),
                "bFrames": self.b_frames,
                "captureTime": clock.state if clock is not None else "arrival",
                "captureOffsetSeconds": round(clock.offset, 4) if clock is not None and clock.offset is not None
                else None}

    def clock_unsynced(self, offset: float) -> None:
        """The server's RTCP sender reports put a frame `offset` seconds before its arrival (far
        off: its clock is not synced): say so once; frames keep their arrival time."""
        if self._clock_warned:
            return
        self._clock_warned = True
        log.warning("the RTSP server's clock is %.1f s %s ours (its RTCP sender reports): frames are "
                    "timed by their arrival instead", abs(offset), "behind" if offset > 0 else "ahead of",
                    extra={"upstream": self.name})

    def found_b_frames(self) -> None:
        """Called from the reader thread on the first access unit out of presentation order."""
        if not self.b_frames:
            self.b_frames = True
            log.warning("the RTSP stream has B-frames, which WebRTC and live MP4 cannot carry: its H.264 "
                        "viewers get it re-encoded without them (decoding and encoding cost CPU; an encoder "
                        "set to no B-frames, like a low-latency NVENC preset, avoids it)",
                        extra={"upstream": self.name})

    async def run(self, hub: HubLink) -> None:
        loop = asyncio.get_running_loop()
        reader = self._reader = _Reader(self, hub, loop)
        reader.start()
        try:
            await reader.wait()
        finally:
            reader.stop()
            if not reader.finished.done():
                # Usually the thread finishes within one frame; a stalled read can take up to the
                # read timeout, and then the thread finishes on its own (it publishes nothing more).
                await asyncio.wait({reader.finished}, timeout=STOP_WAIT_SECONDS)
            if reader.finished.done():
                if not reader.finished.cancelled():
                    reader.finished.exception()  # retrieved: never "exception was never retrieved"
                reader.join(0.1)  # it has signalled its very last step; this returns at once
            if self._reader is reader:
                self._reader = None


class _Reader:
    """One RTSP connection: a worker thread that reads, decodes and encodes; a loop-side handoff."""

    def __init__(self, source: RtspSource, hub: HubLink, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.settings = source.settings
        self.reconnect = source.reconnect
        self.hub = hub
        self.loop = loop
        self.finished: asyncio.Future = loop.create_future()
        self.counters = {"decoded": 0, "encoded": 0, "skipped_busy": 0, "skipped_slow": 0, "bad_packets": 0,
                         "passed_through": 0}
        self._stop = threading.Event()
        self._handoff_pending = False  # a JPEG is on its way to the loop and not yet published
        self._connected = False
        self._started = time.monotonic()
        self._last_frame: float | None = None  # monotonic time of the last decoded picture
        self.clock = CaptureClock(source.clock_unsynced)
        self._thread = threading.Thread(target=self._main, name=f"{THREAD_PREFIX}-{source.name}", daemon=True)

    # -- loop side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    async def wait(self) -> None:
        """Until the thread ends (returns or raises its error), or, as a backstop, stops delivering."""
        rc = self.reconnect
        while True:
            done, _ = await asyncio.wait({self.finished}, timeout=0.5)
            if done:
                return self.finished.result()
            now = time.monotonic()
            if self._last_frame is None:
                # Open (connect + describe/setup/play), probe, then the first keyframe; the thread
                # enforces each of these itself, this only guards against a wedged FFmpeg call.
                limit = 2 * rc.connect_timeout_seconds + rc.frame_timeout_seconds + 5.0
                if now - self._started > limit:
                    raise RtspError(f"no picture within {limit:g} s of connecting")
            elif now - self._last_frame > rc.frame_timeout_seconds + 5.0:
                raise FrameTimeout(f"no frame for {rc.frame_timeout_seconds:g} s")

    def _deliver(self, jpeg: bytes, captured: float) -> None:
        self._handoff_pending = False
        if self._stop.is_set():
            return  # run() has ended: nothing more reaches the hub
        if not self._connected:
            self._connected = True
            self.hub.set_connected()
        self.hub.publish(jpeg, captured)

    def _deliver_h264(self, data: bytes, pts_us: int) -> None:
        if self._stop.is_set():
            return
        if not self._connected:
            self._connected = True
            self.hub.set_connected()
        self.hub.publish_h264(data, pts_us)

    def _set_format(self, h264: bool) -> None:
        if self.source.produces_h264 != h264:
            self.source.produces_h264 = h264
            self.hub.source_format_changed()

    def _finish(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None or self._stop.is_set():  # after a stop, nobody waits for the error
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)

    def _call_loop(self, callback: Any, *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()
            return False
        return True

    # -- worker thread -----------------------------------------------------------------------

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            self._read_stream()
        except BaseException as exc:  # handed to run(), which raises it to the hub's supervisor
            error = self._safe_error(exc)
        if self._stop.is_set():
            log.debug("rtsp reader stopped %s", self.counters, extra={"upstream": self.source.name})
        self._call_loop(self._finish, error)

    def _safe_error(self, exc: BaseException) -> BaseException:
        """`exc` as an error whose text holds no credentials (FFmpeg's messages quote the URL)."""
        if isinstance(exc, (FrameTimeout, RtspError)):
            return exc
        if isinstance(exc, av.error.ExitError):  # PyAV's timeout interrupted a blocking call
            return RtspError("timed out waiting for the RTSP server")
        text = describe_error(exc)
        for secret in _secrets(self.settings.url):
            text = text.replace(secret, self.source.safe_url if secret == self.settings.url else "***")
        return RtspError(text)

    def _read_stream(self) -> None:
        settings, rc = self.settings, self.reconnect
        if self._stop.is_set():
            return
        options = {
            "rtsp_transport": settings.transport,
            # FFmpeg's own socket I/O timeout (microseconds), a backstop to PyAV's timeouts below.
            "timeout": str(int(max(rc.connect_timeout_seconds, rc.frame_timeout_seconds) * 1_000_000)),
            **PROBE_OPTIONS,
        }
        log.info("opening %s over %s", self.source.safe_url, settings.transport.upper(),
                 extra={"upstream": self.source.name})
        # (open, read) timeouts: a dead or silent server cannot hold the thread for longer.
        try:
            container = av.open(settings.url, options=options,
                                timeout=(rc.connect_timeout_seconds, rc.frame_timeout_seconds))
        except av.error.OSError as exc:
            # FFmpeg reports a name that does not resolve as a bare "Input/output error": ask the
            # resolver (this thread may block) so lastError can say what happened.
            raise _resolution_error(settings.url) or exc from None
        try:
            if not container.streams.video:
                raise RtspError("the RTSP stream has no video track")
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "SLICE"  # frame threading would delay every frame
            h264 = stream.codec_context.name == "h264"
            passthrough = h264 and not self.source.b_frames
            log.info("rtsp stream open: %s %sx%s%s", stream.codec_context.name, stream.codec_context.width,
                     stream.codec_context.height, " (passed through to H.264 viewers)" if passthrough
                     else " (re-encoded for H.264 viewers: it has B-frames)" if h264 else "",
                     extra={"upstream": self.source.name})
            self._call_loop(self._set_format, passthrough)
            # Parameter sets from the SDP (Annex-B extradata) go in front of the first access unit.
            extradata = bytes(stream.codec_context.extradata or b"") if passthrough else b""
            if not extradata.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")):
                extradata = b""
            with contextlib.closing(container.demux(stream)) as packets:
                self._decode_loop(packets, passthrough=passthrough, extradata=extradata)
        finally:
            container.close()

    def _decode_loop(self, packets: Any, *, passthrough: bool = False, extradata: bytes = b"") -> None:
        """Read packets until stopped. H.264 access units go to the hub as they are (passthrough);
        pictures are decoded and re-encoded to JPEG only while the hub wants JPEG frames, from a
        keyframe on (a decoder cannot start anywhere else)."""
        settings, frame_timeout = self.settings, self.reconnect.frame_timeout_seconds
        reformatter = VideoReformatter()
        counters = self.counters
        opened = last_picture = budget_time = time.monotonic()
        # Encoding may use half of this thread's time, with bursts of up to ENCODE_BURST_SECONDS:
        # a stream that arrives unevenly loses no frames, one too big for the CPU loses some.
        budget = ENCODE_BURST_SECONDS
        decoding = not passthrough
        # Passthrough holds back the first access units of a stream until one that is not a
        # keyframe came in presentation order: B-frames show there (pts going back), before any
        # viewer was sent a picture it could not use; unless the stream's SPS (profile, VUI)
        # rules out reordering, as a low-latency encoder's does.
        held: list[tuple[bytes, int]] | None = [] if passthrough else None
        reorders: bool | None = None  # what the SPS says; None until one came, or if it does not say
        last_pts: int | None = None
        # Passthrough also keeps the packets since the last keyframe (with their capture times):
        # should B-frames turn up, the decoder starts from them instead of waiting a whole GOP.
        gop: Gop[tuple[Any, int]] = Gop()
        captured_us = time.time_ns() // 1000
        # Capture times of the packets being decoded, by pts: a decoder may return a picture
        # from an earlier packet (reordering, frame delay), and the picture keeps its pts.
        capture_by_pts: dict[int | None, int] = {}
        # With B-frames, packets come in decode order and their capture times (arrival, or
        # the RTCP clock made strictly increasing) do not follow the pictures' order: a picture
        # gets its presentation time (pts) plus the smallest recent offset of a packet's time
        # over its pts, which follows the stream's clock and keeps pictures in order and apart.
        offsets: collections.deque[int] = collections.deque(maxlen=64)
        last_us = 0  # the capture time of the last decoded picture: times only go forward
        passed_us = 0  # the capture time of the last access unit passed through
        for packet in packets:
            if self._stop.is_set():
                return
            now = time.monotonic()
            if packet.size:
                captured_us = self.clock.capture_us(packet, time.time_ns() // 1000)
            replay: list[tuple[Any, int]] = []
            data = bytes(packet) if passthrough and packet.size else b""
            if data and extradata:
                data, extradata = extradata + data, b""
            if held is not None and reorders is None and data:
                reorders = stream_reorders(data)
            # A B slice whose pts goes back marks B-frames (a step back anywhere else is a clock
            # glitch, and passthrough carries on).
            if data and reorders is not False and packet.pts is not None and last_pts is not None \
                    and 0 < (last_pts - packet.pts) * packet.time_base < REORDER_WINDOW_SECONDS \
                    and has_b_slice(data):
                passthrough, data = False, b""  # B-frames: decoded from here on, not passed through
                if held is None:  # access units went out: the pictures continue after them
                    last_us = passed_us
                held = None
                if not decoding:  # the decoder starts at the last keyframe, not the next one
                    replay = gop.items
                    decoding = bool(replay)
                gop = Gop()
                self.source.found_b_frames()
                if not self._call_loop(self._set_format, False):
                    return
            if data:
                if packet.pts is not None:
                    last_pts = packet.pts
                gop.add((packet, captured_us), len(data), packet.is_keyframe)
                last_picture = self._last_frame = now
                counters["passed_through"] += 1
                if held is None:
                    delivered = self._call_loop(self._deliver_h264, data, captured_us)
                else:
                    held.append((data, captured_us))
                    delivered = True
                    if len(held) >= HOLD_ACCESS_UNITS or reorders is False:  # no B-frames
                        for unit in held:
                            delivered = delivered and self._call_loop(self._deliver_h264, *unit)
                        held = None
                passed_us = captured_us
                if not delivered:
                    return
                if not self.hub.jpeg_wanted:
                    decoding = False
                    continue
                if not decoding:
                    if not packet.is_keyframe:
                        continue
                    decoding = True
            elif not decoding:  # passthrough ended (B-frames): the decoder starts at a keyframe
                if not packet.is_keyframe:
                    continue
                decoding = True
            frames = []
            for item, item_captured_us in (*replay, (packet, captured_us)):
                if len(capture_by_pts) >= 32:  # entries of packets that gave no picture
                    capture_by_pts.clear()
                capture_by_pts[item.pts] = item_captured_us
                if item.pts is not None and self.source.b_frames:
                    offsets.append(item_captured_us - int(item.pts * item.time_base * 1_000_000))
                try:
                    frames = item.decode()
                except av.error.InvalidDataError:  # a damaged packet (UDP loss): the next keyframe heals
                    counters["bad_packets"] += 1
                    frames = []
                if item is not packet:  # catching up with the live stream: decoded, not shown
                    counters["decoded"] += len(frames)
                    for frame in frames:
                        capture_by_pts.pop(frame.pts, None)
            for frame in frames:
                counters["decoded"] += 1
                picture_us = capture_by_pts.pop(frame.pts, captured_us)
                if offsets and frame.pts is not None:
                    picture_us = int(frame.pts * frame.time_base * 1_000_000) + min(offsets)
                last_us = max(picture_us, last_us + MIN_STEP_US)
                captured = last_us / 1_000_000
                last_picture = self._last_frame = now
                budget = min(ENCODE_BURST_SECONDS, budget + ENCODE_SHARE * (now - budget_time))
                budget_time = now
                if self._handoff_pending:
                    counters["skipped_busy"] += 1  # the loop has not taken the last one yet
                    continue
                if budget <= 0:
                    counters["skipped_slow"] += 1  # decoding must keep up with the live stream
                    continue
                jpeg = self._encode(frame, reformatter, settings)
                budget -= time.monotonic() - now
                counters["encoded"] += 1
                self._handoff_pending = True
                if not self._call_loop(self._deliver, jpeg, captured):
                    return
            if now - last_picture > frame_timeout:
                what = "frame" if self._last_frame is not None else "picture since the stream opened"
                raise FrameTimeout(f"no {what} for {frame_timeout:g} s")
            if self._stop.is_set():
                return
        if not self._stop.is_set():
            raise RtspError(f"the RTSP stream ended after {time.monotonic() - opened:.1f} s")

    @staticmethod
    def _encode(frame: Any, reformatter: VideoReformatter, settings: RtspUpstream) -> bytes:
        width, height = fit_within(frame.width, frame.height, settings.max_width, settings.max_height)
        scaled = (width, height) != (frame.width, frame.height)
        # One swscale pass scales and converts to RGB; Pillow then reads the plane in place.
        rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                   interpolation="AREA" if scaled else None)
        plane = rgb.planes[0]
        image = Image.frombuffer("RGB", (rgb.width, rgb.height), plane, "raw", "RGB", plane.line_size, 1)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=settings.quality, subsampling=2)
        return out.getvalue()


SOURCE = RtspSource
