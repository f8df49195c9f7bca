"""The frame hub: one per upstream; keeps the latest frame and fans it out to every viewer.

Hot path (per frame): build each wire representation once (`Frame.encoded`, the encoders live in
`vsproxy/outputs/wire.py`), then hand the same bytes to every viewer of that representation
(`Viewer.offer`, `vsproxy/outputs/viewer.py`). Sources see the hub only through the narrow
`HubLink` contract of `vsproxy/sources/base.py`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado.ioloop import PeriodicCallback

from . import render
from .codec.encoder import H264Config, H264Encoder
from .codec.h264 import AccessUnit, Gop, H264Parser, StreamConfig, capture_time, frame_age_offset
from .errors import describe_error
from .outputs.viewer import TransportStats, Viewer
from .outputs.wire import (
    CLUSTER_JPEG,
    H264_TRANSPORTS,
    JPEG_TRANSPORTS,
    MJPEG,
    TRANSPORTS,
    WEBRTC,
    WS_BINARY,
    WS_TRANSPORTS,
    status_message,
)
from .wirecache import WireCached

if TYPE_CHECKING:
    from .config import ReconnectConfig, StreamingConfig
    from .sessions import Session
    from .sources import Source

log = logging.getLogger("vsproxy.hub")

# Once started, a JPEG upstream's H.264 encoder runs at least this long, viewers or not.
ENCODER_MIN_RUN_SECONDS = 2.0


class Frame(WireCached):
    """One JPEG frame and its wire representations, each built at most once."""

    __slots__ = ("jpeg", "seq", "arrived", "timestamp", "captured", "age_offset", "offline")

    def __init__(self, jpeg: bytes, seq: int, *, offline: bool = False, captured: float | None = None) -> None:
        self.jpeg = jpeg
        self.seq = seq
        self.arrived = time.monotonic()  # for latency and fps caps
        self.timestamp = time.time()  # wall clock, sent as X-Timestamp
        # When the picture was taken (the publisher's word, where it gives a plausible one), and
        # how much older than its arrival that is: frame age = write latency + age_offset.
        self.captured = capture_time(captured, self.timestamp)
        # The offline picture is no camera frame: it has no age (None: not counted).
        self.age_offset = None if offline else frame_age_offset(self.timestamp, self.captured)
        self.offline = offline  # a generated "upstream offline" picture, not upstream content
        self._encoded: dict[str, bytes] = {}


class RateMeter:
    """Events and bytes per second over a sliding window."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self.total_events = 0
        self.total_bytes = 0

    def add(self, nbytes: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, nbytes))
        self.total_events += 1
        self.total_bytes += nbytes
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        events = self._events
        while events and events[0][0] < horizon:
            events.popleft()

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(events/s, bytes/s) over the window."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        if not self._events:
            return 0.0, 0.0
        # n events span n-1 intervals, measured up to now: a steady stream reads true, and one
        # that stopped decays towards 0 instead of repeating its old rate for a whole window.
        count = len(self._events)
        span = max(now - self._events[0][0], 1e-3) if count > 1 else self.window
        intervals = max(count - 1, 1)
        nbytes = sum(n for _, n in self._events) * intervals / count
        return intervals / span, nbytes / span


PROBE_TIMEOUT_SECONDS = 1.0  # a probe of an upstream's port gives up after this long


class RetryWait:
    """The supervisor's wait between two connection attempts: the backoff delay, ended early when
    the upstream's port (`address`, None: never probed) accepts a TCP connection again.

    A probe every `interval` seconds of the wait, the first at a random 0.5 to 1 interval in (so
    that proxies that lost a simulator together do not come back in step). An early retry comes
    no sooner than `interval` x 2^n into its wait, n being the early retries in a row since a
    probe last went unanswered: a port that accepts while its stream still fails (Isaac Sim's Kit
    may open its port before the stream is ready) is retried about 1, 2, 4, 8... s into
    successive waits, and then at the plain backoff's pace, never every second. A name is looked
    up once at a time: a lookup that outlasts its probe (a DNS outage) is waited for by the next
    probes instead of being started again, so probes never tie up more than one thread of the
    default executor per upstream.
    """

    def __init__(self, address: tuple[str, int] | None, interval: float) -> None:
        self.address = address
        self.interval = interval
        self._earliest = 1  # in probes: an answer ends the wait from this probe on
        self._lookup: asyncio.Future | None = None

    def reset(self) -> None:
        """The upstream connected: its next outage starts afresh."""
        self._earliest = 1

    def probes(self, seconds: float) -> bool:
        """Can a wait of `seconds` end early? (Its first probe comes within one interval, and an
        unanswered probe makes a later answer a reason to retry at once.)"""
        return self.address is not None and 0 < self.interval < seconds

    async def wait(self, seconds: float) -> bool:
        """Wait `seconds`, or until the upstream's port accepts a connection (True)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        phase = random.uniform(0.5, 1.0)

        def at(tick: int) -> float:  # seconds into the wait of probe `tick` (1, 2, ...)
            return (tick - 1 + phase) * self.interval

        tick = 1
        while self.address is not None and 0 < at(tick) < seconds:
            await asyncio.sleep(start + at(tick) - loop.time())
            remaining = end - loop.time()
            if remaining <= 0:
                break
            answered = await self._answers(min(PROBE_TIMEOUT_SECONDS, remaining))
            if answered:
                if tick >= self._earliest:
                    self._earliest = min(self._earliest * 2, 1 << 16)
                    return True
            elif loop.time() < end:  # refused, or no answer in PROBE_TIMEOUT_SECONDS (not cut short)
                self._earliest = 1  # down (again): its coming back is news
            # Probes never overlap, and an answer too early for a retry is not asked again
            # before it could be one.
            tick = max(tick + 1, self._earliest, int((loop.time() - start) / self.interval - phase) + 2)
        await asyncio.sleep(max(0.0, end - loop.time()))
        return False

    async def _answers(self, timeout: float) -> bool:
        """Does the upstream's host:port accept a TCP connection within `timeout` seconds? The
        connection is closed at once, no byte sent. Any failure (refused, unreachable, a name
        that does not resolve or cannot be encoded) is a no."""
        host, port = self.address  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self._lookup is None:
                    self._lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
                    # Its failure is seen by the probe waiting for it, if any is still waiting.
                    self._lookup.add_done_callback(lambda lookup: lookup.cancelled() or lookup.exception())
                try:
                    infos = await asyncio.shield(self._lookup)
                finally:
                    if self._lookup.done():
                        self._lookup = None
                # A numeric address: asyncio connects without another lookup.
                transport, _ = await loop.create_connection(asyncio.Protocol, infos[0][4][0], infos[0][4][1])
        except (OSError, TimeoutError):
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. UnicodeError for a name that cannot be encoded
            log.debug("upstream probe failed: %s", describe_error(exc))
            return False
        transport.close()
        return True


class FrameHub:
    """One upstream's frames and state, shared by every session on that upstream.

    The upstream connection runs (under `_supervise`, which reconnects with backoff) while at
    least one session is attached, and stops `linger` seconds after the last one leaves.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        *,
        streaming: StreamingConfig,
        reconnect: ReconnectConfig,
        h264: H264Config | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.streaming = streaming
        self.reconnect = reconnect
        self.sessions: set[Session] = set()
        # By transport, and a cluster origin's relays to its edges that want JPEG (CLUSTER_JPEG,
        # their own form): each form of a frame is built only while it has viewers.
        self.viewers: dict[str, list[Viewer]] = {t: [] for t in (*TRANSPORTS, CLUSTER_JPEG)}
        self._jpeg_viewers = {t: self.viewers[t] for t in (*JPEG_TRANSPORTS, CLUSTER_JPEG)}
        self.stats: dict[str, TransportStats] = {t: TransportStats() for t in TRANSPORTS}
        # H.264: access units from the source (passthrough) or from the one shared encoder of a
        # JPEG upstream, which runs only while H.264 viewers are attached.
        self.h264_settings = h264 or H264Config()
        self.encoder: H264Encoder | None = None
        self._encoder_started = 0.0  # when (monotonic) the encoder last started
        self._encoder_stop_handle: asyncio.TimerHandle | None = None  # its stop, deferred (see below)
        self._h264 = H264Parser()
        self.gop: Gop[AccessUnit] = Gop()  # the access units since the last keyframe (fast start)
        self._jpeg_wanted_until = 0.0  # a snapshot or thumbnail asked for JPEG until then
        self._jpeg_demand = False  # `jpeg_wanted` as the source was last told it
        self._frame_waiters: list[asyncio.Future] = []  # snapshots waiting for the next frame
        # Also given every text message the WebSocket viewers get: a cluster origin's relay
        # connections, which carry the upstream's text to their edges whatever frames they want.
        self.text_listeners: list[Callable[[str], None]] = []
        # Told when the connected upstream is lost, with the reason: a cluster origin's relay
        # connections, whose edges' hubs then show it as lost to their viewers (`set_lost`).
        self.loss_listeners: list[Callable[[str], None]] = []
        self.latest: Frame | None = None
        self.seq = 0
        self.rate_in = RateMeter()
        self.state = "idle"  # idle | connecting | connected | retrying
        self.last_error: str | None = None
        self.connects = 0
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._linger_handle: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Future | None = None
        self._offline_timer: PeriodicCallback | None = None
        self._offline_frames: dict[tuple[str, tuple[int, int]], bytes] = {}
        self._frame_size = (1280, 720)
        self._sized_seq = -1  # the frame `_frame_size` was last read from

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    @property
    def down(self) -> bool:
        """Wanted, but its connection failed or was lost and is being retried."""
        return self._task is not None and self.state == "retrying"

    @property
    def running(self) -> bool:
        return self._task is not None

    def viewer_count(self) -> int:
        return sum(len(v) for v in self.viewers.values())

    # -- sessions: start on the first, stop `linger` seconds after the last ------------------

    def attach(self, session: Session) -> None:
        self.sessions.add(session)
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if self._task is None:
            self._start()

    def detach(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._task is not None and self._linger_handle is None:
            linger = self.streaming.linger_seconds
            loop = asyncio.get_running_loop()
            self._linger_handle = loop.call_later(linger, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_handle = None
        self._stopping = asyncio.ensure_future(self._stop_if_unused())

    async def _stop_if_unused(self) -> None:
        # A session may have attached between the timer firing and this task running.
        if not self.sessions:
            await self.stop()

    def _start(self) -> None:
        self.state = "connecting"
        self._task = asyncio.ensure_future(self._supervise())
        self._offline_timer = PeriodicCallback(
            self._send_offline_frame, self.streaming.offline_frame_interval_seconds * 1000
        )
        self._offline_timer.start()

    async def stop(self) -> None:
        """Close the upstream connection (sessions may attach again later and restart it)."""
        self._stop_encoder()
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if self._offline_timer is not None:
            self._offline_timer.stop()
            self._offline_timer = None
        task, self._task = self._task, None
        if task is not None:
            # Cancel until it ends: a source may be mid-await on something that ignores one
            # cancellation (a completed read racing it), and stop() must never hang.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
            if not task.cancelled() and task.exception() is not None:
                log.warning("upstream task ended with %s", describe_error(task.exception()),
                            extra={"upstream": self.name})
        if self._task is None:  # unless a session attached while we waited, and restarted it
            if task is not None:
                log.info("upstream closed (no sessions left)", extra={"upstream": self.name})
                self.source.stopped()
            self.state = "idle"

    async def _supervise(self) -> None:
        rc = self.reconnect
        delay = rc.initial_delay_seconds
        attempt = 0
        retry = RetryWait(self.source.address, rc.probe_interval_seconds)
        while True:
            attempt += 1
            if self.state != "connected":
                self.state = "connecting" if attempt == 1 else "retrying"
            try:
                await self.source.run(self)
                reason = "upstream closed the connection"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the source is a lost upstream; we retry
                reason = describe_error(exc)
            if self.state == "connected":
                delay = rc.initial_delay_seconds
                attempt = 1
                retry.reset()
            # Full jitter keeps many proxies from hammering a restarted simulator in lockstep.
            wait = delay * random.uniform(0.5, 1.0)
            retry.address = self.source.address  # a cluster node probes only as the origin
            sooner = ", or as soon as it answers" if retry.probes(wait) else ""
            try:
                self._lost(reason)
                self.notify("status", self.source.underlying.retry_status(wait, attempt, sooner))
            except Exception:  # reporting a loss must never end the reconnect loop
                log.exception("could not report the lost upstream", extra={"upstream": self.name})
            try:
                if await retry.wait(wait):
                    log.debug("upstream answers a probe: retrying now", extra={"upstream": self.name})
            except Exception:  # a probe must never end the reconnect loop: wait as without one
                log.exception("upstream probe failed", extra={"upstream": self.name})
                await asyncio.sleep(wait)
            delay = min(delay * 2, rc.max_delay_seconds)

    def set_connected(self) -> None:
        """Called by the source once its connection is up."""
        self.state = "connected"
        self.connects += 1
        self.last_error = None
        log.info("upstream connected", extra={"upstream": self.name})
        self.relay_text(connected_status(self.name))

    def set_lost(self, reason: str) -> None:
        """Called by a source whose upstream was lost while its run goes on (a cluster edge: the
        origin's upstream dropped, and the origin reconnects it): viewers are told, and get the
        offline picture, until `set_connected`."""
        if self.state == "connected":
            self._lost(reason)

    def _lost(self, reason: str) -> None:
        was_connected = self.state == "connected"
        self.state = "retrying"
        self.failures += 1
        self.last_error = reason
        if self.source.produces_h264:  # passed through: the next connection's stream starts anew
            self._h264.restart()
            self.gop.clear()
        if was_connected:
            log.warning("upstream lost: %s", reason, extra={"upstream": self.name})
            # To the viewers here; a cluster origin's edges get the loss itself, and their hubs
            # tell their viewers in these words (`set_lost`), once.
            self._text_to_viewers(status_message("error", f"Upstream '{self.name}' lost: {reason}"))
            for listener in tuple(self.loss_listeners):
                listener(reason)
        else:
            log.info("upstream connect failed: %s", reason, extra={"upstream": self.name})
        self._send_offline_frame()

    # -- frames ------------------------------------------------------------------------------

    def publish(self, jpeg: bytes, captured: float | None = None) -> int:
        """A frame from the upstream (taken at `captured`, wall clock, where the upstream says):
        keep it as the latest and offer it to every viewer."""
        self.seq += 1
        frame = Frame(jpeg, self.seq, captured=captured)
        self.latest = frame
        self.rate_in.add(len(jpeg), frame.arrived)
        self._fan_out(frame, self._jpeg_viewers)
        if self.encoder is not None:
            self.encoder.submit(jpeg, int(frame.captured * 1_000_000))
        if self._frame_waiters:
            for waiter in self._frame_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._frame_waiters.clear()
        return self.seq

    # -- H.264 -------------------------------------------------------------------------------

    def publish_h264(self, data: bytes, pts_us: int) -> None:
        """An H.264 access unit (Annex-B) from the source or the encoder: keep it in the GOP
        cache and offer it to every H.264 viewer."""
        au = self._h264.accept(data, pts_us)
        if au is None:
            return  # nothing decodable yet: no parameter sets or keyframe so far
        self.gop.add(au, len(au.data), au.keyframe)
        for transport in H264_TRANSPORTS:
            viewers = self.viewers[transport]
            if viewers:
                encoded = au.encoded(transport)
                for viewer in tuple(viewers):
                    try:
                        viewer.offer(au, encoded)
                    except Exception:
                        self._viewer_failed(viewer)

    @property
    def h264_config(self) -> StreamConfig | None:
        """The current H.264 stream parameters, once an access unit has been seen."""
        return self._h264.config

    def h264_viewer_count(self) -> int:
        return sum(len(self.viewers[t]) for t in H264_TRANSPORTS)

    JPEG_WANTED_SECONDS = 10.0

    @property
    def jpeg_wanted(self) -> bool:
        """Does anything need JPEG frames now: JPEG viewers, the encoder, a recent snapshot or
        thumbnail? An H.264 source decodes to JPEG only while this is true."""
        return (any(self._jpeg_viewers.values()) or (self.encoder is not None and self.encoder.running)
                or time.monotonic() < self._jpeg_wanted_until)

    def want_jpeg(self) -> None:
        """A snapshot or thumbnail was asked for: keep JPEG frames coming for a while."""
        self._jpeg_wanted_until = time.monotonic() + self.JPEG_WANTED_SECONDS
        self._jpeg_demand_changed()

    def _jpeg_demand_changed(self) -> None:
        """Tell the source when `jpeg_wanted` turned (a cluster edge asks its origin for JPEG
        frames only while it is true). Called where it can turn, and from `tick` (for the end of
        a snapshot's while)."""
        wanted = self.jpeg_wanted
        if wanted != self._jpeg_demand:
            self._jpeg_demand = wanted
            self.source.jpeg_wanted(wanted)

    def _latest_current(self) -> bool:
        """Is `latest` the upstream's picture now? Not where JPEG frames come only on demand (an
        H.264 source decodes, a cluster edge is sent JPEG, only while `jpeg_wanted`) and nothing
        wanted them: it is then as old as the last time something did."""
        return self.latest is not None and (self.jpeg_wanted or not self.source.produces_h264)

    def source_format_changed(self) -> None:
        """The source found out whether it delivers H.264 itself (an RTSP stream once opened):
        run the encoder only where it does not and H.264 viewers are attached."""
        if self.source.produces_h264:
            self._stop_encoder()
        elif self.h264_viewer_count():
            # Not from `latest`: it may be stale, or behind what the H.264 viewers were shown.
            self._start_encoder(seed=False)

    def _start_encoder(self, seed: bool = True) -> None:
        if self.source.produces_h264:
            return  # passed through as the upstream sends it
        self._cancel_encoder_stop()
        if self.encoder is None:
            self.encoder = H264Encoder(self.name, self.h264_settings, self.publish_h264)
        if not self.encoder.running:
            self._h264.restart()  # a new encoder: its own parameter sets, from its first keyframe
            self.gop.clear()
            self.encoder.start()
            self._encoder_started = time.monotonic()
            if seed and self.latest is not None and not self.latest.offline:
                # At its capture time (the source's next pictures follow it), at most 1 s back.
                self.encoder.submit(self.latest.jpeg, int(max(self.latest.captured, time.time() - 1.0) * 1_000_000))
            self._jpeg_demand_changed()

    def request_keyframe(self) -> None:
        """A viewer needs a keyframe (a WebRTC peer joined, or lost a picture: PLI/FIR). The
        encoder of a JPEG upstream makes one (at most one a second, however many ask); otherwise
        the source is asked: a cluster edge forwards it to its origin (as rate-limited), an
        upstream passed through sends its next one when its own keyframe interval says so."""
        if self.encoder is not None and self.encoder.running:
            self.encoder.request_keyframe()
        else:
            self.source.request_keyframe()

    def _stop_encoder_when_due(self) -> None:
        """The last H.264 viewer left: stop the encoder, but not before it has run
        ENCODER_MIN_RUN_SECONDS. Each start costs a thread and a new libx264 context, and a
        viewer that connects and leaves over and over would otherwise cost one every time."""
        if self._encoder_stop_handle is not None or self.encoder is None or not self.encoder.running:
            return
        due = self._encoder_started + ENCODER_MIN_RUN_SECONDS - time.monotonic()
        if due <= 0:
            self._stop_encoder()
        else:
            self._encoder_stop_handle = asyncio.get_running_loop().call_later(due, self._stop_encoder)

    def _cancel_encoder_stop(self) -> None:
        if self._encoder_stop_handle is not None:
            self._encoder_stop_handle.cancel()
            self._encoder_stop_handle = None

    def _stop_encoder(self) -> None:
        self._cancel_encoder_stop()
        if self.encoder is not None and self.encoder.running:
            self.encoder.stop()
            self.gop.clear()
            self._jpeg_demand_changed()

    def _fan_out(self, frame: Frame, viewers_by_transport: dict[str, list[Viewer]]) -> None:
        for transport, viewers in viewers_by_transport.items():
            if viewers:
                data = frame.encoded(transport)
                for viewer in tuple(viewers):  # a failed send may remove the viewer
                    try:
                        viewer.offer(frame, data)
                    except Exception:
                        self._viewer_failed(viewer)

    def _viewer_failed(self, viewer: Viewer) -> None:
        """A viewer raised an unexpected error taking a frame (a bug in an output): that viewer
        is disconnected and the error logged; the viewers after it in the fan-out still get the
        frame, and the upstream connection (whose read loop publishes) is not torn down."""
        log.exception("a %s viewer failed taking a frame; it is disconnected", viewer.transport,
                      extra={"upstream": self.name})
        self.remove_viewer(viewer)
        try:
            viewer.close("Internal error")
            viewer.hang_up()
        except Exception:
            log.exception("closing the failed viewer failed too", extra={"upstream": self.name})

    def _offline_frame(self) -> Frame:
        # Plain ASCII: Pillow's built-in font has no em dash or ellipsis.
        text = self.source.underlying.offline_text if self.connects else "connecting to upstream..."
        if self.latest is not None and self._sized_seq != self.latest.seq:  # once a frame
            self._sized_seq = self.latest.seq
            self._frame_size = _picture_size(render.jpeg_size(self.latest.jpeg)) or self._frame_size
        key = (text, self._frame_size)
        jpeg = self._offline_frames.get(key)
        if jpeg is None:
            if len(self._offline_frames) > 8:
                self._offline_frames.clear()
            jpeg = self._offline_frames[key] = render.status_frame(*self._frame_size, self.name, text)
        return Frame(jpeg, self.seq, offline=True)

    def _send_offline_frame(self) -> None:
        # The JSON WebSocket format gets status messages instead (see `notify`).
        if self.connected or not (self.viewers[MJPEG] or self.viewers[WS_BINARY]):
            return
        frame = self._offline_frame()
        self._fan_out(frame, {MJPEG: self.viewers[MJPEG], WS_BINARY: self.viewers[WS_BINARY]})

    def snapshot(self) -> Frame | None:
        """The newest real frame, or the offline picture if the upstream went down since."""
        self.want_jpeg()
        if self.latest is None:
            return None
        if self.running and not self.connected:
            return self._offline_frame()
        return self.latest

    SNAPSHOT_WAIT_SECONDS = 5.0

    async def fresh_snapshot(self, *, run: bool) -> Frame | None:
        """`snapshot`, for a snapshot or thumbnail request, waiting up to SNAPSHOT_WAIT_SECONDS
        for a new frame where this hub holds no current one: JPEG frames come only on demand and
        nothing wanted them (only H.264 viewers of an RTSP stream, or of a cluster edge), or the
        upstream does not run here. With `run`, the upstream is run here for the request, as for
        a viewer (a cluster node with no viewers of it opens its relay from the origin, or
        becomes the origin), and left to linger as after a viewer."""
        if self.running:
            if not self.connected or self._latest_current():
                return self.snapshot()
        elif not run:
            return self.snapshot()
        waiter = asyncio.get_running_loop().create_future()
        self._frame_waiters.append(waiter)
        demand = None
        if not self.running:
            demand = Demand(f"snapshot:{id(waiter)}")
            self.attach(demand)  # type: ignore[arg-type]
        self.want_jpeg()
        try:
            await asyncio.wait({waiter}, timeout=self.SNAPSHOT_WAIT_SECONDS)
        finally:
            if waiter in self._frame_waiters:
                self._frame_waiters.remove(waiter)
            if demand is not None:
                self.detach(demand)  # type: ignore[arg-type]
        return self.snapshot()

    # -- viewers -----------------------------------------------------------------------------

    def add_viewer(self, viewer: Viewer) -> None:
        current = self._latest_current()  # before this viewer wants JPEG
        self.viewers[viewer.transport].append(viewer)
        if self.connected and viewer.send_text:
            viewer.send_text(connected_status(self.name))
        if viewer.transport in H264_TRANSPORTS:
            self._add_h264_viewer(viewer)
            return
        self._jpeg_demand_changed()
        if not self.connected and self.running:
            viewer.send_text and viewer.send_text(status_message("status", self.describe_state()))
            if viewer.transport in (MJPEG, WS_BINARY):  # as `_send_offline_frame` (an edge draws its own)
                frame = self._offline_frame()
                viewer.offer(frame, frame.encoded(viewer.transport))
        elif self.latest is not None and current:
            # Show the newest frame at once instead of a blank player until the next one (not
            # one as old as the last time anything here wanted JPEG).
            viewer.offer(self.latest, self.latest.encoded(viewer.transport))

    def _add_h264_viewer(self, viewer: Viewer) -> None:
        if not self.connected and self.running and viewer.send_text:
            viewer.send_text(status_message("status", self.describe_state()))
        first = self.h264_viewer_count() == 1
        if first:
            self.source.h264_wanted(True)
        encoder_was_running = self.encoder is not None and self.encoder.running
        self._start_encoder()
        # H.264 already flowing here, from this hub's encoder or from the source (a new encoder
        # starts with a keyframe, and a cluster origin starts a new edge's stream with its GOP).
        flowing = encoder_was_running or (self.source.produces_h264 and not first)
        if viewer.transport == WEBRTC:
            # A WebRTC receiver plays frames out at their RTP timestamps: a GOP of old frames
            # sent at once would only add its length to the peer's delay. It starts at the next
            # keyframe instead: asked for now (from this hub's encoder, or a cluster edge's
            # origin), the upstream's next one on passthrough.
            if flowing:
                self.request_keyframe()
            return
        # Fast start: the GOP so far at once, so the first picture does not wait for a keyframe;
        # without one (keyframes too far apart to keep), a keyframe is asked for.
        for au in self.gop:
            viewer.offer(au, au.encoded(viewer.transport))  # type: ignore[arg-type]
        if flowing and not self.gop:
            self.request_keyframe()

    def remove_viewer(self, viewer: Viewer) -> None:
        try:
            self.viewers[viewer.transport].remove(viewer)
        except ValueError:
            return
        if viewer.transport in H264_TRANSPORTS:
            if not self.h264_viewer_count():
                self._stop_encoder_when_due()
                self.source.h264_wanted(False)
        else:
            self._jpeg_demand_changed()

    def notify(self, kind: str, message: str) -> None:
        """Send a {"type": kind, "message": ...} text message to every WebSocket viewer."""
        self.relay_text(status_message(kind, message))

    def relay_text(self, text: str) -> None:
        """Send a text message (status, or relayed from the upstream) to every WebSocket viewer
        that takes text (a cluster edge's relay connections get it as a text listener)."""
        self._text_to_viewers(text)
        for listener in tuple(self.text_listeners):
            listener(text)

    def _text_to_viewers(self, text: str) -> None:
        for transport in WS_TRANSPORTS:
            for viewer in tuple(self.viewers[transport]):
                if viewer.send_text is not None:
                    viewer.send_text(text)

    @property
    def accepts_input(self) -> bool:
        """Can viewers' messages reach this upstream at all (isaac, push), or never (demo, mjpeg, rtsp)?"""
        return self.source.accepts_input

    def send_upstream(self, message: str | bytes) -> bool:
        """Relay a viewer's message to the upstream; False if it is not connected (or not keeping up,
        or takes no input)."""
        return self.accepts_input and self.connected and self.source.send(message)

    def tick(self, now: float) -> int:
        """Once a second: send frames still waiting for sockets that drained since, and
        disconnect viewers whose socket has taken nothing for the stall timeout."""
        self._jpeg_demand_changed()  # a snapshot's while may have ended
        limit = self.streaming.stall_timeout_seconds
        dropped = 0
        for viewers in self.viewers.values():
            for viewer in tuple(viewers):
                if viewer.stalled_for(now) > limit:
                    log.warning("viewer stalled for %.0f s, disconnecting", limit,
                                extra={"upstream": self.name, "transport": viewer.transport})
                    viewer.close("viewer stalled: no frame could be delivered")
                    # Then the socket itself: a stalled client would never answer a WebSocket
                    # close handshake, and Tornado would wait 5 s more for it.
                    viewer.hang_up()
                    dropped += 1
                elif viewer.pending is not None:
                    viewer.flush_pending()
        return dropped

    @property
    def session_count(self) -> int:
        """Sessions attached: not the demands of snapshot requests or cluster edges."""
        return sum(1 for s in self.sessions if not isinstance(s, Demand))

    def viewer_counts(self) -> dict[str, int]:
        """Viewers by transport, as people count them: a cluster edge's relay connection, a viewer
        here for its viewers (counted on their node), is not one."""
        return {t: sum(1 for v in self.viewers[t] if not v.relay) for t in TRANSPORTS}

    def describe_state(self) -> str:
        if self.connected:
            return f"Upstream '{self.name}' connected"
        if self.state == "retrying" and self.last_error:  # not an error of an earlier run (stopped since)
            doing = self.source.underlying.offline_text.rsplit(" - ", 1)[-1]  # reconnecting, or waiting for ...
            return f"Upstream '{self.name}' offline ({self.last_error}); {doing}"
        return f"Connecting to upstream '{self.name}'"

    def status(self) -> dict:
        fps, bps = self.rate_in.rates()
        return {
            "name": self.name,
            "kind": self.source.kind,
            "state": self.state,
            "lastError": self.last_error,
            "fpsIn": round(fps, 2),
            "bytesPerSecondIn": round(bps),
            "framesIn": self.rate_in.total_events,
            "connects": self.connects,
            "failures": self.failures,
            "sessions": self.session_count,
            "viewers": self.viewer_counts(),
            "encoder": self.encoder is not None and self.encoder.running,
            **({"source": source} if (source := self.source.status()) else {}),
        }


def connected_status(upstream: str) -> str:
    """The status message a viewer may send input after, "✅ Connected to upstream '<name>'": to
    every WebSocket viewer when the upstream connects, and to each one that comes while it is
    connected. (A cluster edge reads its origin's, among the upstream's text, as the upstream
    connecting: cluster/relay.py.)"""
    return status_message("status", f"✅ Connected to upstream '{upstream}'")


class Demand:
    """What keeps the hub running for something that is no session (a snapshot request, a
    cluster edge's relay): attached and detached like one."""

    def __init__(self, demand_id: str) -> None:
        self.id = demand_id


def _picture_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The size to draw a status picture at, from an upstream frame's header (any upstream can
    send any header: nothing absurd, at most 1920x1080, aspect kept)."""
    if size is None or size[0] < 16 or size[1] < 16:
        return None
    scale = min(1.0, 1920 / size[0], 1080 / size[1])
    return max(16, int(size[0] * scale)), max(16, int(size[1] * scale))
