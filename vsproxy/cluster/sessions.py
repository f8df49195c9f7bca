"""Sessions in Redis: any node creates, answers, lists and destroys any session.

Redis holds the truth (`vsproxy:sessions`: ID -> record JSON); creates and destroys are Lua
scripts, so `limits.max_sessions`, the per-user limit and the per-address creation rate hold
cluster-wide and exactly, however many nodes create at once. Every node keeps a mirror of all
sessions (kept current by the control channel and re-read every few seconds) for reads, which
therefore work while Redis is down. A session is attached to this node's hub only while it has
viewers here: that is what makes a node want the upstream (as origin or edge).

Viewers count against `limits.max_viewers_per_session` cluster-wide: `vsproxy:viewers:<session>`
holds, per node process (`<instance>:<node ID>`), the places it holds (its viewers, and the places
taken for viewers being set up). A place is taken by a Lua script that counts only live nodes'
places (a node whose registration expired, or was re-made by a new process, is dead: its places
are dropped there and then) and adds one if the total is under the limit; a viewer that leaves gives
its place back at once. Every heartbeat the node writes what it holds again, which repairs whatever a
lost connection, a Redis restart or an expired registration left wrong. Per connect and disconnect
only: frames never wait for Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..errors import RateLimited
from ..sessions import (
    CLOSE_REASONS,
    Session,
    SessionLimitReached,
    SessionManager,
    SessionNotFound,
    UserSessionLimitReached,
    ViewerLimitReached,
    _check_name,
    new_session_id,
)
from ..store import SessionRecord
from .node import EVENTS, PREFIX, REDIS_ERRORS, Cluster, ClusterUnavailable, node_key

if TYPE_CHECKING:
    from ..outputs import Viewer

log = logging.getLogger("vsproxy.sessions")

SESSIONS = PREFIX + "sessions"
ABANDONED_TTL_SECONDS = 300  # a create marked abandoned stays refused this long (a stall ends before)
# Creates waiting to be abandoned (see `_abandon_later`), at most. Beyond, a refused create is not
# abandoned: should a stalled Redis run it later, its session idles out (sessions.idle_timeout_seconds).
ABANDON_MAX = 10000
RETRY_FIRST_SECONDS = 0.5  # abandoning, Redis unreachable: try again after this, doubling...
RETRY_MAX_SECONDS = 10.0  # ...up to this
USERS = PREFIX + "users"  # user ID -> how many sessions
# Session ID -> last activity, as nodes last flushed it: epoch seconds on Redis's clock (TIME), never a
# node's, so that a node whose clock is off neither gets watched sessions reaped nor keeps idle ones.
# A node sends how long ago (its own clock's difference); the script places that on Redis's clock.
ACTIVITY = PREFIX + "activity"
REAPER = PREFIX + "reaper"

# KEYS: sessions, users, rate bucket of the address, the session's abandoned mark, activity. ARGV: id,
# user, record, max sessions, per-user limit (-1: none), rate, burst, channel, event. The rate token
# is spent first, as the single node's handler spends it before creating. A create its client was
# told failed (see `_abandon`) does nothing.
_CREATE = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {'abandoned'} end
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
redis.call('HSET', KEYS[5], ARGV[1], tostring(now))
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'ok'}
"""

# KEYS: sessions, users, activity, the session's viewer places. ARGV: id, channel, event, idle cutoff
# (epoch seconds on Redis's clock; empty: destroy whatever its activity; else only if the session's
# last activity is older).
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
redis.call('DEL', KEYS[4])
if redis.call('HINCRBY', KEYS[2], data['user_id'], -1) <= 0 then redis.call('HDEL', KEYS[2], data['user_id']) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: sessions, users, activity. ARGV: id, record, user, seconds since its last activity. Idempotent.
_RESTORE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  local t = redis.call('TIME')
  redis.call('HSETNX', KEYS[3], ARGV[1], tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[4])))
  return 1
end
return 0
"""

# KEYS: activity. ARGV: session ID and seconds-since-last-activity pairs (see ACTIVITY).
_ACTIVITY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], tostring(now - tonumber(ARGV[i + 1])))
end
"""


# A viewer's place. KEYS: sessions, the session's viewer places. ARGV: session ID, this node's field
# (`<instance>:<node ID>`), the limit (-1: none), the node registration key prefix. Another node's
# places count only while its registration exists with the same instance; else they are dropped.
# -1: no such session; 0: full; 1: the place is taken.
_ADMIT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local total = 0
local places = redis.call('HGETALL', KEYS[2])
for i = 1, #places, 2 do
  local field = places[i]
  local live = field == ARGV[2]
  if not live then
    local sep = string.find(field, ':', 1, true)
    local registration = sep and redis.call('GET', ARGV[4] .. string.sub(field, sep + 1))
    live = registration and cjson.decode(registration)['instance'] == string.sub(field, 1, sep - 1)
  end
  if live then total = total + tonumber(places[i + 1]) else redis.call('HDEL', KEYS[2], field) end
end
local limit = tonumber(ARGV[3])
if limit >= 0 and total >= limit then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""

# Sessions' viewers on every node: KEYS: their viewer places. ARGV: the node registration key
# prefix. Read only: counts the live node processes' places (as _ADMIT does), one total per key.
_COUNT = """
local totals = {}
for k = 1, #KEYS do
  local total = 0
  local places = redis.call('HGETALL', KEYS[k])
  for i = 1, #places, 2 do
    local field = places[i]
    local sep = string.find(field, ':', 1, true)
    local registration = sep and redis.call('GET', ARGV[1] .. string.sub(field, sep + 1))
    if registration and cjson.decode(registration)['instance'] == string.sub(field, 1, sep - 1) then
      total = total + tonumber(places[i + 1])
    end
  end
  totals[k] = total
end
return totals
"""

# KEYS: the session's viewer places. ARGV: this node's field.
_LEAVE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
"""

# What this node holds, written again. KEYS: sessions. ARGV: this node's field, the viewer places key
# prefix, then session ID and count pairs (a destroyed session gets no places back).
_PLACES = """
for i = 3, #ARGV, 2 do
  local key = ARGV[2] .. ARGV[i]
  if tonumber(ARGV[i + 1]) > 0 and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', key, ARGV[1], ARGV[i + 1])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
"""


def abandoned_key(session_id: str) -> str:
    return f"{PREFIX}abandoned:{session_id}"


def viewers_key(session_id: str) -> str:
    return f"{PREFIX}viewers:{session_id}"


class NoRateLimit:
    """The handler's per-address create limiter in a cluster: the limit is enforced in Redis,
    by the create script, cluster-wide."""

    def check(self, key: str, now: float | None = None) -> float:
        return 0.0


class ClusterSessionManager(SessionManager):
    """SessionManager whose sessions live in Redis (see the module docstring)."""

    # No "shutdown": a node shutting down leaves its sessions in Redis. "abandoned": a create
    # answered 503 that a stalled Redis ran later (`_abandon_later`).
    DESTROY_REASONS = ("api", "idle", "abandoned")

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
        self._write_activity = redis.register_script(_ACTIVITY)
        self._admit = redis.register_script(_ADMIT)
        self._leave = redis.register_script(_LEAVE)
        self._count = redis.register_script(_COUNT)
        self._write_places = redis.register_script(_PLACES)
        self._reaping: asyncio.Future | None = None
        # Creates their clients were told failed, to abandon (`_abandon_later`), oldest first, and the
        # one task abandoning them.
        self._to_abandon: dict[str, None] = {}
        self._abandoner: asyncio.Task | None = None
        self._abandon_full = False  # the cap was reached since the set was last empty (warned once)
        # Viewer places (see the module docstring). `_places`: session ID -> what this node holds in
        # Redis, as of the calls sent. An entry is dropped only by the heartbeat that wrote it at 0:
        # a call that timed out may still run in Redis later (a stalled Redis runs it when it goes
        # on), so not even a later give-back that brings the count to 0 says what Redis holds.
        # `_reserved`: places taken for viewers not added yet.
        self._place_field = f"{cluster.instance}:{cluster.node_id}"
        self._places: dict[str, int] = {}
        self._reserved: Counter[str] = Counter()
        self._place_tasks: set[asyncio.Task] = set()
        # Taking and giving back places (increments) run concurrently; writing them all again waits
        # for those in flight and holds new ones back, so what it writes is exact.
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._open = asyncio.Event()
        self._open.set()
        self._places_closed = False

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
        try:
            result = await self.cluster.write(lambda: self._create(
                keys=[SESSIONS, USERS, f"{PREFIX}rate:{address}", abandoned_key(record.id), ACTIVITY],
                args=[record.id, user_id, self._record_json(record), self.max_sessions, per_user,
                      self.create_rate, self.create_burst, EVENTS, event]))
        except ClusterUnavailable as exc:
            if exc.sent:  # else it never reached Redis: nothing to undo
                self._abandon_later(record.id)
            raise
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

    def _abandon_later(self, session_id: str) -> None:
        """The client of this create was told it failed (Redis did not answer in time), but a
        stalled Redis runs the create once it goes on: abandon it once Redis answers. One task
        works through them all, one at a time, whatever their number (ABANDON_MAX at most)."""
        if len(self._to_abandon) >= ABANDON_MAX:
            if not self._abandon_full:
                log.warning("cluster: %d refused creates wait to be abandoned; more are not (should Redis "
                            "run them, their sessions idle out)", ABANDON_MAX)
                self._abandon_full = True
            return
        self._to_abandon[session_id] = None
        if self._abandoner is None or self._abandoner.done():
            self._abandoner = asyncio.ensure_future(self._abandon_all())

    async def _abandon_all(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while self._to_abandon:
            session_id = next(iter(self._to_abandon))
            try:
                await self._abandon(session_id)
            except ClusterUnavailable:  # still unreachable (already reported)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except Exception:  # noqa: BLE001 - a bug: not this one again, the others still
                log.warning("cluster: abandoning a refused create failed", exc_info=True,
                            extra={"session": session_id})
            del self._to_abandon[session_id]
            delay = RETRY_FIRST_SECONDS
        self._abandon_full = False

    async def _abandon(self, session_id: str) -> None:
        """Mark the session abandoned (a create still to come does nothing) and destroy it if it
        was made. ClusterUnavailable if Redis cannot be reached."""
        await self.cluster.write(lambda: self.cluster.redis.set(abandoned_key(session_id), 1,
                                                                ex=ABANDONED_TTL_SECONDS))
        try:
            await self.destroy_async(session_id, "abandoned")
        except SessionNotFound:  # the create did nothing
            pass

    async def lookup(self, session_id: str) -> Session:
        """This node's copy of the session, else Redis's (created on another node a moment ago, its
        control message not here yet, or while this node was cut off): SessionNotFound if Redis has
        none either, ClusterUnavailable (503) if Redis cannot be asked (it may well exist)."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        raw = await self.cluster.write(lambda: self.cluster.redis.hget(SESSIONS, session_id))
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
            keys=[SESSIONS, USERS, ACTIVITY, viewers_key(session_id)],
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

    async def describe(self, sessions: list[Session], now: float | None = None) -> list[dict]:
        """As the API shows them: `connections` counts the viewers on every node (their places in
        Redis; this node's alone while Redis cannot be reached), and `isIsaacSimConnected` is true
        where any node has the upstream connected (its origin says so in its registration)."""
        described = await super().describe(sessions, now)
        if not sessions:
            return described
        try:
            totals = await self._count(keys=[viewers_key(s.id) for s in sessions], args=[node_key("")])
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
            totals = [0] * len(sessions)
        for session, view, total in zip(sessions, described, totals, strict=True):
            # At least this node's own (a place is written back only at the next heartbeat).
            view["connections"] = max(int(total), view["connections"])
            view["isIsaacSimConnected"] = view["isIsaacSimConnected"] or self.cluster.upstream_connected(
                session.hub.name)
        return described

    async def reserve_viewer(self, session: Session) -> None:
        """Take a place in Redis, cluster-wide: ViewerLimitReached if the session's viewers on all
        live nodes fill it, ClusterUnavailable (503) if Redis cannot be reached."""
        self.check_viewer_room(session)  # full with this node's viewers alone: no need to ask
        sid = session.id
        limit = -1 if self.max_viewers_per_session is None else self.max_viewers_per_session
        await self._enter()
        try:
            taken = await self.cluster.write(lambda: self._admit(
                keys=[SESSIONS, viewers_key(sid)], args=[sid, self._place_field, limit, node_key("")]))
            if taken == 1:
                self._places[sid] = self._places.get(sid, 0) + 1
                self._reserved[sid] += 1
        except ClusterUnavailable:
            self._places.setdefault(sid, 0)  # the script may run yet: the next heartbeat says what we hold
            raise
        finally:
            self._exit()
        if taken == 0:
            raise self.viewer_limit_reached()
        if taken == -1:  # destroyed meanwhile (its control message closes this node's viewers)
            raise SessionNotFound(sid)

    def unreserve_viewer(self, session: Session) -> None:
        if self._take_reservation(session.id):
            self._give_back(session.id)

    def add_viewer(self, session: Session, viewer: Viewer) -> None:
        if not self._take_reservation(session.id):
            raise RuntimeError("in a cluster, a viewer's place is taken with reserve_viewer first (in Redis)")
        try:
            if self._sessions.get(session.id) is not session:
                raise SessionNotFound(session.id)
            self.check_viewer_room(session)
        except (ViewerLimitReached, SessionNotFound):
            self._give_back(session.id)
            raise
        if not session.viewers:
            session.hub.attach(session)
        super().add_viewer(session, viewer)  # checked just above: it cannot refuse

    def remove_viewer(self, session: Session, viewer: Viewer) -> None:
        had = viewer in session.viewers
        super().remove_viewer(session, viewer)
        if had:
            self._give_back(session.id)
            if not session.viewers:
                session.hub.detach(session)

    def _take_reservation(self, session_id: str) -> bool:
        if self._reserved[session_id] <= 0:
            return False
        self._reserved[session_id] -= 1
        if not self._reserved[session_id]:
            del self._reserved[session_id]
        return True

    def _give_back(self, session_id: str) -> None:
        """A place is free again: tell Redis now (in the background; the viewer is gone already)."""
        task = asyncio.ensure_future(self._leave_place(session_id))
        self._place_tasks.add(task)
        task.add_done_callback(self._place_tasks.discard)

    async def _leave_place(self, session_id: str) -> None:
        await self._enter()
        try:
            if self._places_closed:  # shut down: the node's registration, and with it its places, is gone
                return
            self._places[session_id] = self._places.get(session_id, 0) - 1
            await self._leave(keys=[viewers_key(session_id)], args=[self._place_field])
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
        finally:
            self._exit()

    async def _enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._quiet.clear()

    def _exit(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._quiet.set()

    async def write_viewer_places(self) -> None:
        """Heartbeat: write the places this node holds again (see the module docstring)."""
        if not self._places or self._places_closed:
            return
        self._open.clear()
        try:
            while self._in_flight:
                await self._quiet.wait()
            held = dict(self._places)
            args: list[Any] = [self._place_field, viewers_key("")]
            for session_id, count in held.items():
                args += [session_id, max(0, count)]
            await self._write_places(keys=[SESSIONS], args=args)
            for session_id, count in held.items():
                if count <= 0 and self._places.get(session_id) == count:
                    del self._places[session_id]
        finally:
            self._open.set()

    async def close_store(self) -> None:
        """Shutdown, after close_all: let the places of the viewers just closed go back to Redis."""
        if self._abandoner is not None:  # Redis still unreachable: the idle reaper gets those
            self._abandoner.cancel()
        if self._place_tasks:
            await asyncio.gather(*tuple(self._place_tasks), return_exceptions=True)
        self._places_closed = True
        await super().close_store()

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
                                               now - session.last_activity(now)])
        return count

    def flush_activity(self) -> int:
        return 0  # the cluster's heartbeat writes activity (flush_activity_async)

    async def flush_activity_async(self) -> int:
        """Tell Redis the last activity of sessions that changed here (viewers here, API touches),
        as how long ago: Redis places it on its own clock (see ACTIVITY)."""
        now = self.clock()
        changed = {}
        for session in self._sessions.values():
            when = session.last_activity(now)
            if self._stored_activity.get(session.id) != when:
                changed[session.id] = when
        if changed:
            ages = [item for session_id, when in changed.items() for item in (session_id, repr(now - when))]
            await self._write_activity(keys=[ACTIVITY], args=ages)
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
            seconds, microseconds = await redis.time()  # the activity's clock (see ACTIVITY)
            cutoff = seconds + microseconds / 1e6 - self.idle_timeout
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
