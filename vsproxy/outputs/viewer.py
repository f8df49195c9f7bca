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
from typing import TYPE_CHECKING

from tornado.iostream import IOStream, StreamClosedError

if TYPE_CHECKING:
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


class TransportStats:
    """Counters of one transport, summed over all viewers that ever used it."""

    __slots__ = ("frames_sent", "bytes_sent", "frames_dropped", "latency")

    def __init__(self) -> None:
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_dropped = 0
        self.latency = LatencyBuckets()  # frame arrival -> written to the viewer's socket


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
        self._send(frame, data)

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
        self._send(frame, frame.encoded(self.transport))

    def _kernel_backlog(self) -> bool:
        if self._fd < 0:
            return False
        unsent = unsent_bytes(self._fd, self._outq)
        if unsent is None:
            self._fd = -1  # not Linux, or not a TCP socket: rely on Tornado's buffer alone
            return False
        return unsent > 0

    def _send(self, frame: Frame, data: bytes) -> None:
        self.last_sent_arrival = frame.arrived
        self.frames_sent += 1
        self.bytes_sent += len(data)
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(data)
        # One plain non-blocking send of the shared bytes: the common case costs no Future and no
        # copy. Only what the kernel did not take goes through IOStream, as a view (no copy).
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            sent = 0
        except OSError:
            self.stream.close()
            return
        if sent == len(data):
            now = self.last_drain = time.monotonic()
            self.stats.latency.observe(now - frame.arrived)
            return
        try:
            future = self.stream.write(memoryview(data)[sent:])
        except StreamClosedError:
            return
        self._inflight_arrived = frame.arrived
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
            self.stats.latency.observe(now - self._inflight_arrived)
            self._inflight_arrived = None
        self.flush_pending()

    def stalled_for(self, now: float) -> float:
        """Seconds this viewer has had a frame waiting that its socket would not take."""
        return now - self.last_drain if (self._busy or self._pending is not None) else 0.0
