"""Sessions: a user's view on an upstream's frame hub, with its viewers and idle reaping.

Plain classes, no HTTP: handlers translate the exceptions below into status codes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .errors import ClientError
from .store import LoadedSessions, MemoryStore, SessionRecord, SessionStore

if TYPE_CHECKING:
    from .hub import FrameHub
    from .outputs import Viewer

log = logging.getLogger("vsproxy.sessions")

MAX_NAME_LENGTH = 128


class SessionError(ClientError):
    """Base of the session errors a client can cause; `status` is the HTTP status to answer."""

    status = 400


class InvalidSessionRequest(SessionError):
    status = 400


class SessionNotFound(SessionError):
    status = 404

    def __init__(self, session_id: str) -> None:
        super().__init__("Session not found")
        self.session_id = session_id


class SessionLimitReached(SessionError):
    status = 503


class UserSessionLimitReached(SessionError):
    status = 429


class ViewerLimitReached(SessionError):
    status = 503


def new_session_id(now: float | None = None) -> str:
    """`stream_<epoch-ms>_<random>` as in the original service, with 128 random bits: the ID is
    the capability to watch the stream, so it must not be guessable."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"stream_{millis}_{secrets.token_hex(16)}"


def iso_utc(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as JavaScript's Date.toISOString() writes it."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidSessionRequest(f"'{field}' must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidSessionRequest(f"'{field}' must be at most {MAX_NAME_LENGTH} characters")
    try:
        value.encode("utf-8")  # a lone surrogate would break every later JSON listing
    except UnicodeEncodeError:
        raise InvalidSessionRequest(f"'{field}' must be valid Unicode text") from None
    return value


# What viewers are told (WebSocket close reason) when their session ends, by destroy reason.
CLOSE_REASONS = {
    "api": "Session destroyed",
    "idle": "Session expired (idle)",
    "shutdown": "Session closed: server shutting down",
    # Shutdown with a persistent store: the session stays, so no "session" in the reason (the embed
    # player ends on a 1001 whose reason names the session; this one it reconnects after).
    "restart": "Server shutting down; reconnect to resume",
    # A cluster's create answered 503 that a stalled Redis ran later: nobody was given its ID.
    "abandoned": "Session destroyed",
}


class Session:
    """One streaming session: who asked, which upstream, and its live viewers."""

    def __init__(self, session_id: str, user_id: str, robot_name: str, hub: FrameHub, now: float) -> None:
        self.id = session_id
        self.user_id = user_id
        self.robot_name = robot_name
        self.hub = hub
        self.created_at = now
        self._last_activity = now
        self.viewers: set[Viewer] = set()

    def touch(self, now: float | None = None) -> None:
        self._last_activity = time.time() if now is None else now

    def last_activity(self, now: float) -> float:
        # A session with viewers is active right now: frames flow. Deriving it saves a clock
        # read per frame per viewer on the hot path.
        return now if self.viewers else self._last_activity

    def record(self) -> SessionRecord:
        """What a SessionStore keeps of this session."""
        return SessionRecord(self.id, self.user_id, self.robot_name, self.hub.name, self.created_at,
                             self._last_activity)

    def to_json(self, now: float | None = None) -> dict:
        """The session as this node sees it (SessionManager.describe: as the API shows it)."""
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "userId": self.user_id,
            "robotName": self.robot_name,
            "createdAt": iso_utc(self.created_at),
            "lastActivity": iso_utc(self.last_activity(now)),
            "connections": len(self.viewers),
            "isIsaacSimConnected": self.hub.connected,
            "upstream": self.hub.name,
        }


class SessionManager:
    """Creates, finds, lists and destroys sessions; reaps idle ones."""

    # Why sessions are destroyed, as `destroyed_total` counts them (and /metrics exports them).
    DESTROY_REASONS: tuple[str, ...] = ("api", "idle", "shutdown")

    def __init__(
        self,
        hubs: Mapping[str, FrameHub],
        default_upstream: str,
        *,
        robots: Mapping[str, str] | None = None,
        max_sessions: int,
        max_sessions_per_user: int | None = None,
        max_viewers_per_session: int | None = None,
        idle_timeout: float,
        clock: Callable[[], float] = time.time,
        store: SessionStore | None = None,
    ) -> None:
        self.hubs = hubs
        self.default_upstream = default_upstream
        self.robots = dict(robots or {})
        self.max_sessions = max_sessions
        self.max_sessions_per_user = max_sessions_per_user
        self.max_viewers_per_session = max_viewers_per_session
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self.store: SessionStore = store if store is not None else MemoryStore()
        self._stored_activity: dict[str, float] = {}  # session ID -> last activity the store has
        # Read by the metrics collector at scrape time.
        self.created_total = 0
        self.destroyed_total: Counter[str] = Counter()  # by reason: those of DESTROY_REASONS

    def __len__(self) -> int:
        return len(self._sessions)

    def choose_upstream(self, robot_name: str, upstream: object = None) -> FrameHub:
        """The named upstream, else the robot's mapped one, else the default.

        Clients only ever name a configured upstream: never a URL (no server-side request forgery),
        and an unknown name is refused without listing what exists.
        """
        if upstream is None:
            return self.hubs[self.robots.get(robot_name, self.default_upstream)]
        if not isinstance(upstream, str) or not upstream:
            raise InvalidSessionRequest("'upstream' must be the name of a configured upstream")
        if "://" in upstream or "/" in upstream:
            raise InvalidSessionRequest("'upstream' must be the name of a configured upstream, not a URL")
        hub = self.hubs.get(upstream)
        if hub is None:
            raise InvalidSessionRequest(f"Unknown upstream {upstream[:64]!r}")
        return hub

    def create(self, user_id: object, robot_name: object, upstream: object = None) -> Session:
        user_id = _check_name("userId", user_id)
        robot_name = _check_name("robotName", robot_name)
        hub = self.choose_upstream(robot_name, upstream)
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(f"Maximum number of sessions ({self.max_sessions}) reached")
        per_user = self.max_sessions_per_user
        if per_user is not None and sum(s.user_id == user_id for s in self._sessions.values()) >= per_user:
            raise UserSessionLimitReached(f"Maximum number of sessions per user ({per_user}) reached")
        now = self.clock()
        session = Session(new_session_id(now), user_id, robot_name, hub, now)
        self._sessions[session.id] = session
        self.created_total += 1
        hub.attach(session)
        self.store.add(session.record())
        self._stored_activity[session.id] = now
        log.info("session created for user %r, robot %r", user_id, robot_name,
                 extra={"session": session.id, "upstream": hub.name})
        return session

    async def create_async(self, user_id: object, robot_name: object, upstream: object = None, *,
                           address: str = "") -> Session:
        """`create` for handlers, which await it: in a cluster the limits are checked in Redis
        (cluster/sessions.py); here it is `create` itself (the handler checked `address`'s rate)."""
        return self.create(user_id, robot_name, upstream)

    async def lookup(self, session_id: str) -> Session:
        """`get` for handlers, which await it: in a cluster a session just created on another node
        is looked up in Redis if this node has not heard of it yet."""
        return self.get(session_id)

    async def destroy_async(self, session_id: str, reason: str = "api") -> Session:
        """`destroy` for handlers, which await it (in a cluster: in Redis, and on every node)."""
        return self.destroy(session_id, reason)

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    async def describe(self, sessions: list[Session], now: float | None = None) -> list[dict]:
        """The sessions as the API shows them (in a cluster: their viewers on every node, and
        whether any node has their upstream connected)."""
        return [session.to_json(now) for session in sessions]

    def destroy(self, session_id: str, reason: str = "api") -> Session:
        """Destroy a session and close its viewers; `reason` is one of CLOSE_REASONS' keys."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(session_id)
        for viewer in tuple(session.viewers):
            viewer.close(CLOSE_REASONS[reason])
        session.hub.detach(session)
        self._stored_activity.pop(session_id, None)
        if reason == "restart":
            log.info("session closed (shutdown), kept in the session store", extra={"session": session.id})
            return session
        self.destroyed_total[reason] += 1
        self.store.remove(session_id)
        if reason == "idle":
            log.info("session reaped: idle for over %g s", self.idle_timeout, extra={"session": session.id})
        else:
            log.info("session destroyed (%s)", reason, extra={"session": session.id})
        return session

    def reap_idle(self) -> list[Session]:
        """Destroy sessions with no viewers whose last activity is older than the idle timeout."""
        now = self.clock()
        idle = [s for s in self._sessions.values()
                if not s.viewers and now - s.last_activity(now) > self.idle_timeout]
        for session in idle:
            self.destroy(session.id, reason="idle")
        return idle

    def close_all(self) -> None:
        """Server shutdown: close every session's viewers and detach it from its hub. Sessions are
        destroyed, unless the store is persistent: then they stay in it for the next start."""
        if self.store.persistent:
            self.flush_activity()  # sessions with viewers were active until now
        reason = "restart" if self.store.persistent else "shutdown"
        for session_id in list(self._sessions):
            self.destroy(session_id, reason=reason)

    # -- persistence ---------------------------------------------------------------------------

    def restore(self, loaded: LoadedSessions) -> list[Session]:
        """Take back the sessions a persistent store kept from the previous run (at start-up).

        lastActivity moves forward by the time the server was down, so a session has as much idle
        time left as it had when the server went away. A session whose upstream is no longer
        configured is dropped (and removed from the store): quietly mapping it onto another upstream
        would show its user a different camera."""
        now = self.clock()
        downtime = max(0.0, now - loaded.last_alive) if loaded.last_alive is not None else 0.0
        restored = []
        for record in loaded.records:
            hub = self.hubs.get(record.upstream)
            if hub is None:
                log.warning("session dropped at start-up: its upstream %r is no longer configured",
                            record.upstream, extra={"session": record.id})
                self.store.remove(record.id)
                continue
            session = Session(record.id, record.user_id, record.robot_name, hub, record.created_at)
            session.touch(min(now, record.last_activity + downtime))
            self._sessions[session.id] = session
            self._stored_activity[session.id] = record.last_activity
            hub.attach(session)
            restored.append(session)
        if loaded.records:
            log.info("restored %d of %d sessions from the session store", len(restored), len(loaded.records))
        return restored

    def flush_activity(self) -> int:
        """Hand the store the last activity of the sessions whose activity changed since the last
        flush, in one batch (touches are plain attribute writes; this runs every few seconds)."""
        if not self.store.persistent:
            return 0
        now = self.clock()
        changed = {}
        for session in self._sessions.values():
            when = session.last_activity(now)
            if self._stored_activity.get(session.id) != when:
                changed[session.id] = self._stored_activity[session.id] = when
        self.store.update_activity(changed)
        return len(changed)

    async def close_store(self) -> None:
        """Write what the store has pending and release it (after close_all)."""
        await self.store.close()

    def check_viewer_room(self, session: Session) -> None:
        """Raise ViewerLimitReached if the session has as many viewers as it may."""
        limit = self.max_viewers_per_session
        if limit is not None and len(session.viewers) >= limit:
            raise self.viewer_limit_reached()

    def viewer_limit_reached(self) -> ViewerLimitReached:
        """The error a viewer beyond limits.max_viewers_per_session gets (503, or WebSocket close 1013)."""
        return ViewerLimitReached(f"Maximum number of viewers per session ({self.max_viewers_per_session}) reached")

    async def reserve_viewer(self, session: Session) -> None:
        """Take a place for one more viewer before it is made: ViewerLimitReached if there is none.

        Here that is `check_viewer_room` (add_viewer checks again). A cluster takes the place in Redis,
        cluster-wide (cluster/sessions.py); `add_viewer` then fills it, or `unreserve_viewer` gives it
        back if the client went away first."""
        self.check_viewer_room(session)

    def unreserve_viewer(self, session: Session) -> None:
        """Give back a place `reserve_viewer` took that no viewer filled (nothing to give back here)."""

    def add_viewer(self, session: Session, viewer: Viewer) -> None:
        """Attach a viewer; SessionNotFound if the session was destroyed meanwhile."""
        if self._sessions.get(session.id) is not session:
            raise SessionNotFound(session.id)
        self.check_viewer_room(session)
        session.viewers.add(viewer)
        session.hub.add_viewer(viewer)
        log.info("client connected (%s)", viewer.transport, extra={"session": session.id})

    def remove_viewer(self, session: Session, viewer: Viewer) -> None:
        if viewer not in session.viewers:
            return
        session.viewers.discard(viewer)
        session.hub.remove_viewer(viewer)
        session.touch(self.clock())
        log.info("client disconnected (%s)", viewer.transport, extra={"session": session.id})
