"""The operator dashboard's model: the state snapshot, per-second rate histories, thumbnails.

Plain class, no HTTP (handlers/dashboard.py serves it). A sampler reads the counters the hubs and
viewers already keep, once a second, so the streaming path pays nothing for the dashboard; the
push timer and thumbnails cost something only while a dashboard is open.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from PIL import Image
from tornado.ioloop import PeriodicCallback

from . import __version__
from .errors import ClientError
from .outputs.viewer import LatencyBuckets
from .outputs.wire import TRANSPORT_LABELS, TRANSPORTS
from .sessions import iso_utc

if TYPE_CHECKING:
    from .auth import Access
    from .config import Config
    from .hub import FrameHub
    from .outputs import Viewer
    from .sessions import Session, SessionManager

log = logging.getLogger("vsproxy.monitor")

HISTORY_LENGTH = 60  # samples kept for sparklines: one minute at one sample a second
SAMPLE_INTERVAL_SECONDS = 1.0
PUSH_INTERVAL_SECONDS = 1.0
THUMBNAIL_WIDTH = 160
THUMBNAIL_MAX_AGE_SECONDS = 1.0  # at most one thumbnail a second per upstream


class DashboardLimitReached(ClientError):
    """limits.max_dashboard_clients event streams are open already."""

    status = 503


class Listener(Protocol):
    """A connected dashboard (the SSE handler): gets each pushed event, and a close at shutdown."""

    def send(self, event: bytes) -> None: ...

    def close(self) -> None: ...


class _HubTrack:
    """One upstream's counters at the previous sample, and what the last interval measured."""

    def __init__(self, hub: FrameHub) -> None:
        self.frames_in = hub.rate_in.total_events
        self.bytes_in = hub.rate_in.total_bytes
        self.bytes_in_rate = 0.0
        self.sent = {t: hub.stats[t].frames_sent for t in TRANSPORTS}
        self.sent_bytes = {t: hub.stats[t].bytes_sent for t in TRANSPORTS}
        self.fps_out = 0.0
        self.bytes_out = 0.0
        self.fps_in: deque[float] = deque(maxlen=HISTORY_LENGTH)


class _SessionTrack:
    """One session's viewers' counters at the previous sample, and its rates and history."""

    def __init__(self) -> None:
        self.seen: dict[Viewer, tuple[int, int, int]] = {}  # viewer -> (frames, dropped, bytes) sent
        self.frames_dropped = 0  # summed over every viewer the session ever had
        self.fps_out = 0.0
        self.bytes_out = 0.0
        self.fps_out_history: deque[float] = deque(maxlen=HISTORY_LENGTH)
        self.ages_seen: dict[Viewer, list[int]] = {}  # viewer -> its age buckets at the last sample
        self.age_p50: float | None = None  # frame age over the last sample interval, seconds
        self.age_p95: float | None = None


class _Thumbnail:
    __slots__ = ("made", "key", "jpeg")

    def __init__(self, made: float, key: tuple[int, bool], jpeg: bytes) -> None:
        self.made = made
        self.key = key  # (frame seq, offline picture?) of the frame it was made from
        self.jpeg = jpeg


class ThumbnailError(Exception):
    """The upstream's picture cannot be made into a thumbnail (not decodable, or too large)."""


def make_thumbnail(jpeg: bytes, width: int = THUMBNAIL_WIDTH, quality: int = 70) -> bytes:
    """A JPEG `width` pixels wide (aspect kept), decoded at reduced size where JPEG allows it.
    Costs milliseconds for a camera frame and up to a few hundred for the largest picture it
    takes, so callers run it in a worker thread. ThumbnailError for a picture Pillow cannot
    decode or one of more pixels than Pillow decodes without a warning (a few bytes can claim
    60000x60000)."""
    try:
        return _make_thumbnail(jpeg, width, quality)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ThumbnailError(str(exc)) from None


def _make_thumbnail(jpeg: bytes, width: int, quality: int) -> bytes:
    with Image.open(io.BytesIO(jpeg)) as image:
        w, h = image.size
        if w * h > (Image.MAX_IMAGE_PIXELS or w * h):
            raise ValueError(f"a picture of {w}x{h} is too large for a thumbnail")
        size = (width, max(1, round(h * width / w)))
        # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), still at least
        # `size`: a 1280x720 frame decodes as 160x90 instead of 0.9 megapixels.
        image.draft("RGB", size)
        small = image.convert("RGB")
    small.thumbnail(size)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=quality)
    return out.getvalue()


class Monitor:
    """Builds the dashboard state, keeps rate histories, makes thumbnails, pushes to listeners."""

    def __init__(self, config: Config, hubs: dict[str, FrameHub], sessions: SessionManager, access: Access, *,
                 started_at: float, clock: Callable[[], float] = time.monotonic, cluster: Any = None) -> None:
        self.config = config
        self.cluster = cluster  # vsproxy.cluster.Cluster in a cluster (its nodes and Redis state), else None
        self.hubs = hubs
        self.sessions = sessions
        self.access = access
        self.started_at = started_at
        self.clock = clock
        self.listeners: set[Listener] = set()
        self._hubs = {name: _HubTrack(hub) for name, hub in hubs.items()}
        self._sessions: dict[str, _SessionTrack] = {}
        self._thumbnails: dict[str, _Thumbnail] = {}
        # upstream -> (frame key, its thumbnail being made in a worker thread): one decode a frame
        self._making: dict[str, tuple[tuple[int, bool], asyncio.Future[bytes]]] = {}
        # upstream -> (key of the newest frame that could not be made into one, why): not tried again
        self._failed: dict[str, tuple[tuple[int, bool], str]] = {}
        self._last_sample = clock()
        self._sampler: PeriodicCallback | None = None
        self._pusher: PeriodicCallback | None = None

    # -- timers ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling (cheap: a few integer sums per session a second, dashboard open or not,
        so a dashboard opened later still shows the last minute)."""
        if self._sampler is None:
            self._sampler = PeriodicCallback(self.sample, SAMPLE_INTERVAL_SECONDS * 1000)
            self._sampler.start()

    def stop(self) -> None:
        """Stop the timers and end every dashboard's event stream (server shutdown)."""
        for timer in (self._sampler, self._pusher):
            if timer is not None:
                timer.stop()
        self._sampler = self._pusher = None
        for listener in tuple(self.listeners):
            listener.close()
        self.listeners.clear()

    @property
    def pushing(self) -> bool:
        return self._pusher is not None

    def subscribe(self, listener: Listener) -> None:
        """A dashboard connected: push to it every second (the push timer runs only while some
        dashboard is connected). DashboardLimitReached at limits.max_dashboard_clients."""
        limit = self.config.limits.max_dashboard_clients
        if listener not in self.listeners and len(self.listeners) >= limit:
            raise DashboardLimitReached(f"Too many open dashboards ({limit}, limits.max_dashboard_clients); "
                                        "retry later")
        self.listeners.add(listener)
        if self._pusher is None:
            self._pusher = PeriodicCallback(self.push, PUSH_INTERVAL_SECONDS * 1000)
            self._pusher.start()

    def unsubscribe(self, listener: Listener) -> None:
        self.listeners.discard(listener)
        if not self.listeners and self._pusher is not None:
            self._pusher.stop()
            self._pusher = None
            self._thumbnails.clear()  # nobody looks at them until the next dashboard opens

    def push(self) -> None:
        """Send the state, encoded once, to every connected dashboard."""
        if not self.listeners:
            return
        event = self.event()
        for listener in tuple(self.listeners):
            listener.send(event)

    def event(self) -> bytes:
        """The state as one Server-Sent Event (JSON has no raw newlines, so one `data:` line)."""
        return b"data: " + self.state_json().encode("utf-8") + b"\n\n"

    # -- sampling ----------------------------------------------------------------------------

    def sample(self) -> None:
        """Turn the counters' growth since the previous sample into rates and history entries."""
        now = self.clock()
        elapsed = max(now - self._last_sample, 1e-3)
        self._last_sample = now
        for name, hub in self.hubs.items():
            track = self._hubs.get(name)
            if track is None:
                track = self._hubs[name] = _HubTrack(hub)
            self._sample_hub(hub, track, elapsed)
        alive: dict[str, _SessionTrack] = {}
        for session in self.sessions.all():
            track = self._sessions.get(session.id) or _SessionTrack()
            self._sample_session(session, track, elapsed)
            alive[session.id] = track
        self._sessions = alive

    def _sample_hub(self, hub: FrameHub, track: _HubTrack, elapsed: float) -> None:
        frames_in = hub.rate_in.total_events
        track.fps_in.append(round((frames_in - track.frames_in) / elapsed, 1))
        track.frames_in = frames_in
        track.bytes_in_rate = (hub.rate_in.total_bytes - track.bytes_in) / elapsed
        track.bytes_in = hub.rate_in.total_bytes
        frames_out = bytes_out = 0
        for transport in TRANSPORTS:
            stats = hub.stats[transport]
            frames = stats.frames_sent - track.sent[transport]
            nbytes = stats.bytes_sent - track.sent_bytes[transport]
            track.sent[transport], track.sent_bytes[transport] = stats.frames_sent, stats.bytes_sent
            frames_out += frames
            bytes_out += nbytes
        track.fps_out = frames_out / elapsed
        track.bytes_out = bytes_out / elapsed

    def _sample_session(self, session: Session, track: _SessionTrack, elapsed: float) -> None:
        # Exact: what was written to each viewer's socket since the last sample.
        seen: dict[Viewer, tuple[int, int, int]] = {}
        frames = 0
        nbytes = 0
        for viewer in tuple(session.viewers):
            sent_before, dropped_before, bytes_before = track.seen.get(viewer, (0, 0, 0))
            track.frames_dropped += viewer.frames_dropped - dropped_before
            seen[viewer] = (viewer.frames_sent, viewer.frames_dropped, viewer.bytes_sent)
            frames += viewer.frames_sent - sent_before
            nbytes += viewer.bytes_sent - bytes_before
        track.seen = seen
        # Frame age percentiles of what this session's viewers were sent since the last sample.
        ages_seen: dict[Viewer, list[int]] = {}
        recent = [0] * (len(LatencyBuckets.BOUNDS) + 1)
        for viewer in seen:
            counts = list(viewer.age.counts)
            before = track.ages_seen.get(viewer, [0] * len(counts))
            recent = [r + c - b for r, c, b in zip(recent, counts, before, strict=True)]
            ages_seen[viewer] = counts
        track.ages_seen = ages_seen
        if sum(recent):
            track.age_p50 = LatencyBuckets.quantile(recent, 0.5)
            track.age_p95 = LatencyBuckets.quantile(recent, 0.95)
        elif not seen:  # no viewers: nothing is sent, so there is no age to show (viewers keep
            track.age_p50 = track.age_p95 = None  # the last one while the upstream pauses)
        track.fps_out = frames / elapsed
        track.bytes_out = nbytes / elapsed
        track.fps_out_history.append(round(track.fps_out, 1))

    # -- the state ---------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything the dashboard shows (see dashboard/README.md for the shape)."""
        now = time.time()
        hubs = list(self.hubs.values())
        upstreams = [self._upstream_json(hub) for hub in hubs]
        sessions = [self._session_json(s, now) for s in self.sessions.all()]
        counts = [h.viewer_counts() for h in hubs]
        viewers = {t: sum(c[t] for c in counts) for t in TRANSPORTS}
        totals = {
            "sessions": len(sessions),
            "maxSessions": self.config.limits.max_sessions,
            "viewers": sum(viewers.values()),
            "viewersByTransport": viewers,
            "upstreams": len(hubs),
            "upstreamsUp": sum(1 for h in hubs if h.connected),
            "upstreamsDown": sum(1 for h in hubs if h.down),
            "fpsIn": round(sum(u["fpsIn"] for u in upstreams), 1),
            "bytesPerSecondIn": round(sum(u["bytesPerSecondIn"] for u in upstreams)),
            "fpsOut": round(sum(t.fps_out for t in self._hubs.values()), 1),
            "bytesPerSecondOut": round(sum(t.bytes_out for t in self._hubs.values())),
            "uptimeSeconds": round(now - self.started_at, 1),
            "version": __version__,
        }
        state = {"generatedAt": iso_utc(now), "transportLabels": TRANSPORT_LABELS, "totals": totals,
                 "sessions": sessions, "upstreams": upstreams}
        if self.cluster is not None:
            state["cluster"] = self.cluster.health()  # this node, the live nodes, Redis
        return state

    def state_json(self) -> str:
        return json.dumps(self.state(), ensure_ascii=False, separators=(",", ":"))

    def _rates_in(self, hub: FrameHub) -> tuple[float, float]:
        """Frames and bytes per second over the last sampled second. (RateMeter's window keeps
        showing the old rate for seconds after an upstream stops; this drops to 0 at once.)"""
        track = self._hubs.get(hub.name)
        if track is None or not track.fps_in:
            return hub.rate_in.rates()  # not sampled yet
        return track.fps_in[-1], track.bytes_in_rate

    def _upstream_json(self, hub: FrameHub) -> dict:
        fps, bps = self._rates_in(hub)
        track = self._hubs.get(hub.name)
        return {
            "name": hub.name,
            "kind": hub.source.kind,
            "state": hub.state,
            "down": hub.down,
            "lastError": hub.last_error,
            "connects": hub.connects,
            "failures": hub.failures,
            "fpsIn": round(fps, 1),
            "bytesPerSecondIn": round(bps),
            "framesIn": hub.rate_in.total_events,
            "sessions": hub.session_count,
            "viewers": hub.viewer_counts(),
            "encoder": hub.encoder is not None and hub.encoder.running,  # its shared H.264 encoder
            "bFrames": hub.source.b_frames,  # why an H.264 upstream has one: it sends B-frames
            "fpsHistory": list(track.fps_in) if track else [],
            "thumbnailUrl": thumbnail_url(hub),
            **self._cluster_role(hub),
        }

    def _cluster_role(self, hub: FrameHub) -> dict:
        """In a cluster: which node holds the upstream (its origin) and which relay it from there
        (its edges), and this node's part: {"cluster": {"role", "origin", "edges"}}."""
        if self.cluster is None:
            return {}
        source = hub.source.status()
        return {"cluster": {"role": source.get("role", "idle"), "origin": source.get("origin"),
                            "edges": source.get("edges", [])}}

    def _session_json(self, session: Session, now: float) -> dict:
        hub = session.hub
        track = self._sessions.get(session.id)
        hub_track = self._hubs.get(hub.name)
        by_transport = dict.fromkeys(TRANSPORTS, 0)
        dropped = track.frames_dropped if track else 0
        for viewer in tuple(session.viewers):
            by_transport[viewer.transport] = by_transport.get(viewer.transport, 0) + 1
            if track is not None:  # drops since the last sample, so the count never lags
                dropped += viewer.frames_dropped - track.seen.get(viewer, (0, 0, 0))[1]
        fps_in, _ = self._rates_in(hub)
        # With viewer tokens on, the page's embed link and stream URLs need one. Only handed to
        # authenticated operators: an open dashboard must not give out the capability to watch.
        token = self.access.issue_viewer_token(session.id) if self.config.auth.operators else None
        return {
            "id": session.id,
            "userId": session.user_id,
            "robotName": session.robot_name,
            "upstream": hub.name,
            "upstreamState": hub.state,
            "upstreamDown": hub.down,
            "viewers": by_transport,
            "viewersTotal": sum(by_transport.values()),
            "fpsIn": round(fps_in, 1),
            "fpsOut": round(track.fps_out, 1) if track else 0.0,
            "bytesPerSecondOut": round(track.bytes_out) if track else 0,
            "framesDropped": dropped,
            # Capture (or arrival) to write, over the last second of sending; bucket upper bounds.
            "frameAgeMs": {"p50": _ms(track.age_p50), "p95": _ms(track.age_p95)} if track else
            {"p50": None, "p95": None},
            "createdAt": iso_utc(session.created_at),
            "ageSeconds": round(now - session.created_at, 1),
            "lastActivity": iso_utc(session.last_activity(now)),
            "thumbnailUrl": thumbnail_url(hub),
            "viewerToken": token,
            # The same number of samples in both, the newest last; `in` is the hub's, shared by
            # every session on it, cut to this session's lifetime.
            "fpsHistory": {
                "in": list(hub_track.fps_in)[-len(track.fps_out_history):] if track and hub_track else [],
                "out": list(track.fps_out_history) if track else [],
            },
        }

    # -- thumbnails --------------------------------------------------------------------------

    async def thumbnail(self, upstream: str) -> bytes | None:
        """A small JPEG of the upstream's newest frame (or its offline picture); None if it has
        sent none yet. Made at most once a second per upstream, in a worker thread, shared by its
        sessions and by requests that come while it is being made. An upstream that runs on
        another cluster node (its origin) and not here is relayed from there for it; one that
        runs nowhere is not started for a dashboard.

        Raises KeyError for an unknown upstream, ThumbnailError when its picture cannot be made
        into one and there is no earlier thumbnail to show.
        """
        hub = self.hubs[upstream]
        now = self.clock()
        cached = self._thumbnails.get(upstream)
        if cached is not None and now - cached.made < THUMBNAIL_MAX_AGE_SECONDS:
            return cached.jpeg
        frame = await hub.fresh_snapshot(run=not hub.running and await hub.source.held_elsewhere())
        now = self.clock()
        if frame is None:
            return None
        key = (frame.seq, frame.offline)
        if cached is not None and cached.key == key:
            cached.made = now  # the picture has not changed: nothing to decode
            return cached.jpeg
        failed = self._failed.get(upstream)
        if failed is not None and failed[0] == key:  # this frame cannot be decoded: once is enough
            if cached is not None:
                return cached.jpeg
            raise ThumbnailError(failed[1])
        making = self._making.get(upstream)
        made_here = making is None or making[0] != key
        if made_here:
            future = asyncio.get_running_loop().run_in_executor(None, make_thumbnail, frame.jpeg)
            making = self._making[upstream] = (key, future)
            future.add_done_callback(lambda _: self._making.pop(upstream, None)
                                     if self._making.get(upstream) is making else None)
        try:
            jpeg = await asyncio.shield(making[1])
        except ThumbnailError as exc:  # a frame Pillow cannot decode; viewers still get it
            if made_here:  # one warning a frame, however many asked
                log.warning("cannot make a thumbnail: %s", exc, extra={"upstream": upstream})
                self._failed[upstream] = (key, str(exc))
            if cached is not None:
                return cached.jpeg
            raise
        self._thumbnails[upstream] = _Thumbnail(self.clock(), key, jpeg)
        return jpeg


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def thumbnail_url(hub: FrameHub) -> str | None:
    """Where the upstream's thumbnail is; None before its first frame (the page then shows a
    placeholder instead of asking for a 503 every second)."""
    if hub.latest is None:
        return None
    return f"/dashboard/api/thumbnail/{quote(hub.name, safe='')}.jpg"
