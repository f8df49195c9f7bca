"""One viewer socket and its backpressure, shared by every frame output.

A frame is written only when nothing of the previous one is left, neither in Tornado's buffer
nor unsent in the kernel; otherwise it waits in a single slot, replaced by newer frames
(latest-frame-wins). A slow viewer costs at most two frame references, never a queue, and never
slows the others.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import fcntl
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from tornado.iostream import IOStream, StreamClosedError

from ..codec.h264 import GOP_MAX_BYTES, GOP_MAX_FRAMES
from . import fmp4
from .wire import MP4, ws_frame

if TYPE_CHECKING:
    from ..codec.h264 import AccessUnit, StreamConfig
    from ..hub import Frame


class LatencyBuckets:
    """A histogram cheap enough for every write: one bisect and two additions.

    prometheus-client's Histogram.observe takes a lock and costs several times more; the metrics
    collector exports these counts as a histogram at scrape time instead.
    """

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds

    @classmethod
    def quantile(cls, counts: list[int], q: float) -> float | None:
        """The upper bound of the bucket holding quantile `q` of `counts` (None if empty; the
        last bound for the +Inf bucket)."""
        total = sum(counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for bound, count in zip((*cls.BOUNDS, cls.BOUNDS[-1]), counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return cls.BOUNDS[-1]


class TransportStats:
    """Counters of one transport, summed over all viewers that ever used it."""

    __slots__ = ("frames_sent", "bytes_sent", "frames_dropped", "latency", "age")

    def __init__(self) -> None:
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_dropped = 0
        self.latency = LatencyBuckets()  # frame arrival -> written to the viewer's socket
        self.age = LatencyBuckets()  # frame capture (or arrival) -> written to the viewer's socket


# Bytes in a socket's send queue not yet sent (Linux). Lets a viewer wait for the kernel too:
# Linux grows a socket's send buffer to megabytes, so without this a slow viewer's frames queue
# in the kernel, first in first out, and arrive seconds late.
SIOCOUTQNSD = 0x894B


def unsent_bytes(fd: int, buffer: array.array | None = None) -> int | None:
    """Bytes in socket `fd`'s send queue not yet sent, or None where the kernel cannot say (not
    Linux, not TCP). `buffer` (array('i', [0])) saves an allocation on hot paths."""
    out = buffer if buffer is not None else array.array("i", [0])
    try:
        fcntl.ioctl(fd, SIOCOUTQNSD, out, True)
    except OSError:
        return None
    return out[0]


class Viewer:
    """One connected viewer socket: gets the newest frame whenever its socket can take one.

    A frame is written only when nothing of the previous one is left, neither in Tornado's buffer
    nor unsent in the kernel; otherwise it waits in a single slot, replaced by newer frames
    (latest-frame-wins). `close` is how the owning handler disconnects the viewer (WebSocket close
    or end of the MJPEG response); `send_text` delivers status/error/relayed text (None for MJPEG).
    """

    relay: ClassVar[bool] = False  # a cluster edge's relay connection, not a person watching

    def __init__(
        self,
        stream: IOStream,
        transport: str,
        stats: TransportStats,
        *,
        close: Callable[[str], None],
        send_text: Callable[[str], None] | None = None,
        max_fps: float | None = None,
    ) -> None:
        self.stream = stream
        self.transport = transport
        self.stats = stats
        self.close = close
        self.send_text = send_text
        self.min_interval = 0.95 / max_fps if max_fps else 0.0
        self.connected_at = time.monotonic()
        self.last_drain = self.connected_at  # last time the socket took a whole frame
        self.last_sent_arrival = -1e9
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_dropped = 0
        self._busy = False  # Tornado's buffer holds bytes; a drain callback is due
        self._pending: Frame | None = None
        self._inflight_arrived: float | None = None  # arrival time of a frame still being written
        self._inflight_age_offset: float | None = 0.0
        self.age = LatencyBuckets()  # this viewer's frame ages (the dashboard's p50/p95)
        self._sock = stream.socket
        self._fd = self._sock.fileno()
        self._outq = array.array("i", [0])

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def pending(self) -> Frame | None:
        return self._pending

    def offer(self, frame: Frame, data: bytes) -> None:
        """Hand the viewer a frame (`data` is that frame in this viewer's wire format)."""
        if frame.arrived - self.last_sent_arrival < self.min_interval:
            return  # this viewer asked for fewer frames per second
        if self._busy or self.stream.writing() or self._kernel_backlog():
            self._hold(frame)
            return
        if self._pending is not None:  # an older frame waited for the kernel: this one replaces it
            self._pending = None
            self.frames_dropped += 1
            self.stats.frames_dropped += 1
        self.last_sent_arrival = frame.arrived
        self._write(data, frame.arrived, 1, frame.age_offset)

    def _hold(self, frame: Frame) -> None:
        if self._pending is not None:
            self.frames_dropped += 1
            self.stats.frames_dropped += 1
        self._pending = frame
        if not self._busy and self.stream.writing():
            # Tornado itself is writing (a status message, a ping): retry when that drains.
            self._wait_for_drain(self.stream.write(b""))

    def flush_pending(self) -> None:
        """Send the waiting frame if the socket has room now (on drain, and on the hub's tick)."""
        frame = self._pending
        if frame is None or self._busy or self.stream.closed() or self.stream.writing() or self._kernel_backlog():
            return
        self._pending = None
        self.last_sent_arrival = frame.arrived
        self._write(frame.encoded(self.transport), frame.arrived, 1, frame.age_offset)

    def _kernel_backlog(self) -> bool:
        # unsent_bytes() inlined: this runs for every viewer on every frame.
        fd = self._fd
        if fd < 0:
            return False
        try:
            fcntl.ioctl(fd, SIOCOUTQNSD, self._outq, True)
        except OSError:
            self._fd = -1  # not Linux, or not a TCP socket: rely on Tornado's buffer alone
            return False
        return self._outq[0] > 0

    def _written(self, seconds: float, age_offset: float | None) -> None:
        stats = self.stats
        stats.latency.observe(seconds)
        if age_offset is not None:  # None: not a camera frame (the offline picture)
            # One bisect for both age histograms (the transport's and this viewer's).
            age = seconds + age_offset
            i = bisect.bisect_left(LatencyBuckets.BOUNDS, age)
            total, mine = stats.age, self.age
            total.counts[i] += 1
            total.total += age
            mine.counts[i] += 1
            mine.total += age

    def _write(self, data: bytes, arrived: float, frames: int = 1, age_offset: float | None = 0.0) -> None:
        """Write `frames` frames (`data`, the last of them arrived at `arrived`) to the socket."""
        stats = self.stats
        n = len(data)
        self.frames_sent += frames
        self.bytes_sent += n
        stats.frames_sent += frames
        stats.bytes_sent += n
        # One plain non-blocking send of the shared bytes: the common case costs no Future and no
        # copy. Only what the kernel did not take goes through IOStream, as a view (no copy).
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            sent = 0
        except OSError:
            self.stream.close()
            return
        if sent == n:
            # _written() inlined: the common case, for every viewer on every frame.
            now = self.last_drain = time.monotonic()
            seconds = now - arrived
            stats.latency.observe(seconds)
            if age_offset is not None:
                age = seconds + age_offset
                i = bisect.bisect_left(LatencyBuckets.BOUNDS, age)
                total, mine = stats.age, self.age
                total.counts[i] += 1
                total.total += age
                mine.counts[i] += 1
                mine.total += age
            return
        try:
            future = self.stream.write(memoryview(data)[sent:])
        except StreamClosedError:
            return
        self._inflight_arrived = arrived
        self._inflight_age_offset = age_offset
        self._wait_for_drain(future)

    def _wait_for_drain(self, future: asyncio.Future) -> None:
        self._busy = True
        future.add_done_callback(self._drained)

    def _drained(self, future: asyncio.Future) -> None:
        self._busy = False
        if future.cancelled() or future.exception() is not None:
            return  # the stream closed; the handler's close callback tidies up
        if self._inflight_arrived is not None:
            now = self.last_drain = time.monotonic()
            self._written(now - self._inflight_arrived, self._inflight_age_offset)
            self._inflight_arrived = None
        self.flush_pending()

    def hang_up(self) -> None:
        """Close the connection itself, after `close` (a stalled client would never answer a
        WebSocket close handshake)."""
        self.stream.close()

    def stalled_for(self, now: float) -> float:
        """Seconds this viewer has had a frame waiting that its socket would not take."""
        return now - self.last_drain if (self._busy or self._pending is not None) else 0.0


class H264Viewer(Viewer):
    """A viewer of an H.264 transport. The frames of a GOP depend on each other, so it cannot
    keep only the newest one: while its socket is busy it queues the access units since the last
    keyframe and sends them when the socket drains, at most FLUSH_SECONDS of the stream per write
    while the socket does not take them at once; when a new keyframe arrives while it still has
    a queue, it skips ahead to that keyframe (the skipped frames count as dropped). So it never
    holds more than one GOP, a throttled viewer is never more than one keyframe interval plus one
    frame behind live, and one on a link slower than the stream has at most FLUSH_SECONDS of it
    on its way at any time (not a whole GOP: seconds of a low-bandwidth link). It starts at a
    keyframe: the hub hands it the current GOP first (fast start), or it waits for the next one.
    """

    MAX_QUEUE_FRAMES = GOP_MAX_FRAMES  # a GOP longer than this (an upstream that never sends keyframes)...
    MAX_QUEUE_BYTES = GOP_MAX_BYTES  # ...or larger than this: drop it and wait for the next keyframe
    FLUSH_US = 250_000  # a write of queued access units covers at most this much of the stream

    def __init__(self, stream: IOStream, transport: str, stats: TransportStats, *,
                 close: Callable[[str], None], send_text: Callable[[str], None] | None = None) -> None:
        super().__init__(stream, transport, stats, close=close, send_text=send_text)
        self._queue: list[tuple[AccessUnit, bytes]] = []  # access units (with their bytes) to write
        self._queued_bytes = 0
        self.waiting_for_keyframe = True
        # The stream parameters this viewer's decoder has once what is written and queued is
        # delivered, and once what is written is (what a dropped queue falls back to).
        self._config: StreamConfig | None = None
        self._written_config: StreamConfig | None = None

    def _stream_start(self, au: AccessUnit) -> bytes:
        """What goes before the first access unit: the MP4 init segment, or the config message."""
        if self.transport == MP4:
            return fmp4.init_segment(au.config)
        return b"" if au.config_changed else ws_frame(0x1, au.config.message().encode())

    @property
    def pending(self) -> AccessUnit | None:  # type: ignore[override]
        return self._queue[-1][0] if self._queue else None

    def stalled_for(self, now: float) -> float:
        return now - self.last_drain if (self._busy or self._queue) else 0.0

    def _drop(self, count: int) -> None:
        self.frames_dropped += count
        self.stats.frames_dropped += count

    def offer(self, au: AccessUnit, data: bytes) -> None:  # type: ignore[override]
        """Hand the viewer the next access unit (`data`: it in this viewer's wire format)."""
        if self.waiting_for_keyframe:
            if not au.keyframe:
                self._drop(1)
                return
            self.waiting_for_keyframe = False
        if au.keyframe and self._queue:  # behind by a whole GOP: skip ahead to this keyframe
            self._drop_queue()
        if au.config is not self._config and au.config != self._config:
            # An MP4 file cannot change its track mid-stream, nor its parameter sets (they live
            # in the init segment's avcC, not in the samples), even where size and codec stay.
            if self._config is not None and self.transport == MP4:
                self.close("the stream's parameters changed; reconnect")
                return
            data = self._stream_start(au) + data  # also where a dropped queue held the change
            self._config = au.config
        if not self._queue and not (self._busy or self.stream.writing() or self._kernel_backlog()):
            self._written_config = au.config
            self._write(data, au.arrived, age_offset=au.age_offset)
            return
        self._queue.append((au, data))
        self._queued_bytes += len(data)
        if len(self._queue) > self.MAX_QUEUE_FRAMES or self._queued_bytes > self.MAX_QUEUE_BYTES:
            self._drop_queue()
            self.waiting_for_keyframe = True
            return
        if self._busy:
            return  # the drain callback sends the queue
        if self.stream.writing():
            # Tornado itself is writing (a status message, a ping): send the queue when that drains.
            self._wait_for_drain(self.stream.write(b""))
        else:
            # Held back by bytes the kernel had not sent yet, for which no drain callback comes:
            # send the queue as soon as they have gone (checked again with every frame).
            self.flush_pending()

    def _drop_queue(self) -> None:
        """Drop what is queued (counted as dropped): the decoder is left with what was written."""
        self._drop(len(self._queue))
        self._queue.clear()
        self._queued_bytes = 0
        self._config = self._written_config

    def flush_pending(self) -> None:
        """Write what is queued, FLUSH_US of the stream at a time, for as long as the socket takes
        each write at once (a viewer catching up); the rest after the next drain or frame."""
        while self._queue and not (self._busy or self.stream.closed() or self.stream.writing()
                                   or self._kernel_backlog()):
            queue = self._queue
            end = queue[0][0].pts_us + self.FLUSH_US
            n = 1
            while n < len(queue) and queue[n][0].pts_us < end:
                n += 1
            batch, self._queue = queue[:n], queue[n:]
            data = b"".join(unit for _, unit in batch) if n > 1 else batch[0][1]
            self._queued_bytes -= len(data)
            last = batch[-1][0]
            self._written_config = last.config
            self._write(data, last.arrived, n, age_offset=last.age_offset)
