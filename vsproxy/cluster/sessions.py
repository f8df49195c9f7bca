"""Sessions in Redis: any node creates, answers, lists and destroys any session.

Redis holds the truth (`vsproxy:sessions`: ID -> record JSON); creates and destroys are Lua
scripts, so `limits.max_sessions`, the per-user limit and the per-address creation rate hold
cluster-wide and exactly, however many nodes create at once. Every node keeps a mirror of all
sessions (kept current by the control channel and re-read every few seconds) for reads, which
therefore work while Redis is down. A session is attached to this node's hub only while it has
viewers here: that is what makes a node want the upstream (as origin or edge).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import RateLimited
from ..sessions import (
    CLOSE_REASONS,
    Session,
    SessionLimitReached,
    SessionManager,
    SessionNotFound,
    UserSessionLimitReached,
    _check_name,
    new_session_id,
)
from ..store import SessionRecord
from .node import EVENTS, PREFIX, REDIS_ERRORS, Cluster, ClusterUnavailable

if TYPE_CHECKING:
    from ..outputs import Viewer

log = logging.getLogger("vsproxy.sessions")

SESSIONS = PREFIX + "sessions"
USERS = PREFIX + "users"  # user ID -> how many sessions
ACTIVITY = PREFIX + "activity"  # session ID -> last activity (epoch seconds), as nodes last flushed it
REAPER = PREFIX + "reaper"

# KEYS: sessions, users, rate bucket of the address. ARGV: id, user, record, max sessions,
# per-user limit (-1: none), rate, burst, channel, event. The rate token is spent first, as the
# single node's handler spends it before creating.
_CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[6]), tonumber(ARGV[7])
local bucket = redis.call('HMGET', KEYS[3], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or burst
local ts = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < 1 then return {'rate', tostring((1 - tokens) / rate)} end
redis.call('HSET', KEYS[3], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[3], math.ceil(burst / rate * 1000) + 1000)
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return {'max'} end
local per = tonumber(ARGV[5])
if per >= 0 and (tonumber(redis.call('HGET', KEYS[2], ARGV[2])) or 0) >= per then return {'user'} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'ok'}
"""

# KEYS: sessions, users, activity. ARGV: id, channel, event, idle cutoff (epoch seconds; empty:
# destroy whatever its activity; else only if the session's last activity is older).
_DESTROY = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
local data = cjson.decode(record)
if ARGV[4] ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1])) or data['last_activity']
  if last > tonumber(ARGV[4]) then return 0 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HINCRBY', KEYS[2], data['user_id'], -1) <= 0 then redis.call('HDEL', KEYS[2], data['user_id']) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: sessions, users, activity. ARGV: id, record, user, activity. Idempotent.
_RESTORE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[4])
  return 1
end
return 0
"""


class NoRateLimit:
    """The handler's per-address create limiter in a cluster: the limit is enforced in Redis,
    by the create script, cluster-wide."""

    def check(self, key: str, now: float | None = None) -> float:
        return 0.0


class ClusterSessionManager(SessionManager):
    """SessionManager whose sessions live in Redis (see the module docstring)."""

    def __init__(self, *args: Any, cluster: Cluster, create_rate: float, create_burst: float,
                 cleanup_interval: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.cleanup_interval = cleanup_interval
        cluster.sessions = self
        self.create_rate = create_rate
        self.create_burst = create_burst
        redis = cluster.redis
        self._create = redis.register_script(_CREATE)
        self._destroy = redis.register_script(_DESTROY)
        self._restore = redis.register_script(_RESTORE)
        self._reaping: asyncio.Future | None = None

    # -- records ----------------------------------------------------------------------------------

    @staticmethod
    def _record_json(record: SessionRecord) -> str:
        return json.dumps(dataclasses.asdict(record))

    def _mirror(self, record: SessionRecord) -> Session | None:
        """The local Session of a record, made if new (None if its upstream is not configured here)."""
        session = self._sessions.get(record.id)
        if session is not None:
            return session
        hub = self.hubs.get(record.upstream)
        if hub is None:
            return None
        session = Session(record.id, record.user_id, record.robot_name, hub, record.created_at)
        session.touch(record.last_activity)
        self._sessions[record.id] = session
        self._stored_activity[record.id] = record.last_activity
        return session

    def _forget(self, session_id: str, reason: str) -> Session | None:
        """Drop a session from this node: close its viewers here, detach it from the hub."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        for viewer in tuple(session.viewers):
            viewer.close(CLOSE_REASONS[reason])
        session.hub.detach(session)
        self._stored_activity.pop(session_id, None)
        return session

    # -- the API --------------------------------------------------------------------------------

    def create(self, user_id: object, robot_name: object, upstream: object = None) -> Session:
        raise RuntimeError("in a cluster, sessions are created with create_async (atomically in Redis)")

    async def create_async(self, user_id: object, robot_name: object, upstream: object = None, *,
                           address: str = "") -> Session:
        user_id = _check_name("userId", user_id)
        robot_name = _check_name("robotName", robot_name)
        hub = self.choose_upstream(robot_name, upstream)
        now = self.clock()
        record = SessionRecord(new_session_id(now), user_id, robot_name, hub.name, now, now)
        event = json.dumps({"op": "create", "record": dataclasses.asdict(record), "node": self.cluster.node_id})
        per_user = -1 if self.max_sessions_per_user is None else self.max_sessions_per_user
        result = await self.cluster.write(lambda: self._create(
            keys=[SESSIONS, USERS, f"{PREFIX}rate:{address}"],
            args=[record.id, user_id, self._record_json(record), self.max_sessions, per_user,
                  self.create_rate, self.create_burst, EVENTS, event]))
        if result[0] == "rate":
            raise RateLimited("Too many sessions created from this address; retry later", float(result[1]))
        if result[0] == "max":
            raise SessionLimitReached(f"Maximum number of sessions ({self.max_sessions}) reached")
        if result[0] == "user":
            raise UserSessionLimitReached(f"Maximum number of sessions per user ({per_user}) reached")
        session = self._mirror(record)
        assert session is not None  # its upstream was chosen from this node's hubs
        self.created_total += 1
        log.info("session created for user %r, robot %r", user_id, robot_name,
                 extra={"session": session.id, "upstream": hub.name})
        return session

    async def lookup(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        try:  # created on another node a moment ago, its control message not here yet
            raw = await self.cluster.redis.hget(SESSIONS, session_id)
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
            raw = None
        if raw is None:
            raise SessionNotFound(session_id)
        session = self._mirror(SessionRecord(**json.loads(raw)))
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def destroy(self, session_id: str, reason: str = "api") -> Session:
        """Local only (shutdown): close this node's viewers; the session stays in Redis."""
        session = self._forget(session_id, reason)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    async def destroy_async(self, session_id: str, reason: str = "api", *, idle_cutoff: float | None = None) -> Session:
        """Destroy a session cluster-wide; every node closes its viewers (control message)."""
        event = json.dumps({"op": "destroy", "id": session_id, "reason": reason, "node": self.cluster.node_id})
        done = await self.cluster.write(lambda: self._destroy(
            keys=[SESSIONS, USERS, ACTIVITY],
            args=[session_id, EVENTS, event, "" if idle_cutoff is None else repr(idle_cutoff)]))
        if not done:
            if idle_cutoff is None:
                self._forget(session_id, reason)  # gone from Redis: gone here too
                raise SessionNotFound(session_id)
            return None  # type: ignore[return-value]  # active again since: the reaper leaves it
        session = self._forget(session_id, reason)
        self.destroyed_total[reason] += 1
        if reason == "idle":
            log.info("session reaped: idle for over %g s", self.idle_timeout, extra={"session": session_id})
        else:
            log.info("session destroyed (%s)", reason, extra={"session": session_id})
        return session  # type: ignore[return-value]

    def close_all(self) -> None:
        """Shutdown: close this node's viewers ("reconnect to resume": another node serves them);
        the sessions stay in Redis."""
        for session_id in list(self._sessions):
            self._forget(session_id, "restart")

    # -- viewers: a session wants the upstream here while it has viewers here ------------------------

    def add_viewer(self, session: Session, viewer: Viewer) -> None:
        if self._sessions.get(session.id) is not session:
            raise SessionNotFound(session.id)
        self.check_viewer_room(session)
        if not session.viewers:
            session.hub.attach(session)
        super().add_viewer(session, viewer)

    def remove_viewer(self, session: Session, viewer: Viewer) -> None:
        had = viewer in session.viewers
        super().remove_viewer(session, viewer)
        if had and not session.viewers:
            session.hub.detach(session)

    # -- keeping the mirror current ----------------------------------------------------------------

    def apply_event(self, event: dict) -> None:
        """A control message from any node (this one included)."""
        if event["op"] == "create":
            self._mirror(SessionRecord(**event["record"]))
        elif event["op"] == "destroy":
            reason = event.get("reason", "api")
            if self._forget(event["id"], reason if reason in CLOSE_REASONS else "api") is not None:
                log.info("session destroyed on node %s (%s)", event.get("node", "?"), reason,
                         extra={"session": event["id"]})

    async def resync(self) -> None:
        """Re-read every session: the mirror gains what it missed and loses what was destroyed."""
        await self.cluster.check_restart()  # an empty Redis after a restart destroyed nothing
        stored = await self.cluster.redis.hgetall(SESSIONS)
        for raw in stored.values():
            self._mirror(SessionRecord(**json.loads(raw)))
        for session_id in [sid for sid in self._sessions if sid not in stored]:
            self._forget(session_id, "api")

    async def reregister(self) -> int:
        """Write this node's sessions back into a Redis that lost them (restart without data)."""
        now = self.clock()
        count = 0
        for session in tuple(self._sessions.values()):
            count += await self._restore(keys=[SESSIONS, USERS, ACTIVITY],
                                         args=[session.id, self._record_json(session.record()), session.user_id,
                                               session.last_activity(now)])
        return count

    def flush_activity(self) -> int:
        return 0  # the cluster's heartbeat writes activity (flush_activity_async)

    async def flush_activity_async(self) -> int:
        """Tell Redis the last activity of sessions that changed here (viewers here, API touches)."""
        now = self.clock()
        changed = {}
        for session in self._sessions.values():
            when = session.last_activity(now)
            if self._stored_activity.get(session.id) != when:
                changed[session.id] = when
        if changed:
            await self.cluster.redis.hset(ACTIVITY, mapping=changed)
            self._stored_activity.update(changed)
        return len(changed)

    def reap_idle(self) -> list[Session]:
        """Once per cleanup interval: the node that takes this round's reaper lock reaps for the cluster."""
        if self._reaping is None or self._reaping.done():
            self._reaping = asyncio.ensure_future(self._reap())
        return []

    async def _reap(self) -> int:
        redis = self.cluster.redis
        try:
            lock_ms = max(50, int(self.cleanup_interval * 900))
            if not await redis.set(REAPER, self.cluster.node_id, nx=True, px=lock_ms):
                return 0  # another node reaps this round
            await self.flush_activity_async()
            stored = await redis.hgetall(SESSIONS)
            activity = await redis.hgetall(ACTIVITY)
            now = time.time()
            cutoff = now - self.idle_timeout
            reaped = 0
            for session_id, raw in stored.items():
                last = float(activity.get(session_id) or json.loads(raw)["last_activity"])
                if last <= cutoff:
                    if await self.destroy_async(session_id, "idle", idle_cutoff=cutoff) is not None:
                        reaped += 1
            stale = [sid for sid in activity if sid not in stored]
            if stale:
                await redis.hdel(ACTIVITY, *stale)
            return reaped
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
            return 0
        except ClusterUnavailable:  # Redis went away mid-round (already reported): the next round
            return 0
        except Exception:  # noqa: BLE001 - the ClusterUnavailable of a destroy, or a bug: next round
            log.warning("cluster: idle reaping failed this round", exc_info=True)
            return 0
