"""This node's link to the cluster's Redis: registry heartbeat, control channel, leases, health.

What lives in Redis (every key under `vsproxy:`), state in keys, never in messages:

- `vsproxy:node:<id>`: this node's advertise URL and process instance, expiring NODE_TTL after its
  last heartbeat.
- `vsproxy:sessions`, `vsproxy:users`, `vsproxy:activity`, `vsproxy:rate:<address>`,
  `vsproxy:viewers:<session>`: sessions and the counts their limits need (see cluster/sessions.py).
- `vsproxy:lease:<upstream>`: the node holding that upstream's connection (the origin), expiring
  LEASE_TTL after its last renewal.
- `vsproxy:reaper`: who reaps idle sessions this round.
- channel `vsproxy:events`: "session created/destroyed" control messages. Pub/sub is
  at-most-once, so every node also re-reads the sessions every RESYNC_SECONDS.

Redis unreachable: the node keeps serving what it has (viewers, relays), refuses writes with 503
(`ClusterUnavailable`), reports `degraded` on /health, retries with backoff, and on Redis coming
back empty (a restart: its run_id changed) writes back the sessions and leases it knows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from tornado.httpclient import AsyncHTTPClient

from ..auth import bearer_token, redact_url, token_matches
from ..errors import ClientError

if TYPE_CHECKING:
    from ..config import Config
    from .sessions import ClusterSessionManager

log = logging.getLogger("vsproxy.cluster")

PREFIX = "vsproxy:"
EVENTS = PREFIX + "events"
HEARTBEAT_SECONDS = 1.0
NODE_TTL_SECONDS = 5.0
LEASE_TTL_SECONDS = 3.0  # a dead origin's lease is gone this long after its last renewal
RESYNC_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 5.0
REDIS_CONNECTIONS = 64  # at most this many Redis calls at once; the others wait for one...
REDIS_POOL_WAIT_SECONDS = 5.0  # ...this long at most (Redis answers in well under a millisecond)
NODE_REQUESTS = 64  # HTTP requests to other nodes at once (forwarded frames); the others wait, within their timeout
# Errors that mean "Redis is not reachable (now)": the client's own, and the socket's.
REDIS_ERRORS = (RedisError, OSError)

T = TypeVar("T")

# Take or keep a lease: ours already (renew), free (take), or someone else's; answers its holder
# now (ARGV[1], this node, unless someone else's).
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return holder end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return ARGV[1] end
return holder
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClusterUnavailable(ClientError):
    """A write needs Redis and Redis cannot be reached: try again shortly. `sent`: the command may
    have reached Redis (a stalled Redis may still run it); False where it certainly did not (no
    connection could be had: refused, timed out connecting, the pool exhausted)."""

    status = 503

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class _Pool(aioredis.BlockingConnectionPool):
    """The client's connection pool. An error while it hands out a connection (none free in
    time, the connect refused or timed out, the connection's handshake failing) comes before the
    command is sent: it is marked so (`never_sent`)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except REDIS_ERRORS as exc:
            exc.vsproxy_never_sent = True  # type: ignore[union-attr]
            raise


def never_sent(exc: BaseException) -> bool:
    """Did this Redis error come before the command was sent (see `_Pool`)?"""
    return getattr(exc, "vsproxy_never_sent", False)


def lease_key(upstream: str) -> str:
    return f"{PREFIX}lease:{upstream}"


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def node_identity(config: Config) -> tuple[str, str]:
    """This node's ID and the URL the other nodes reach it by (cluster.node_id, advertise_url)."""
    cc = config.cluster
    host, port = config.server.host, config.server.port
    # With a wildcard host the configuration has an advertise_url: its host:port names the node.
    bracketed = f"[{host}]" if ":" in host else host  # an IPv6 address
    advertise_url = (cc.advertise_url or f"http://{bracketed}:{port}").rstrip("/")
    return cc.node_id or urlsplit(advertise_url).netloc, advertise_url


class Cluster:
    """This node in the cluster: the Redis client and the loops that keep the node registered."""

    def __init__(self, config: Config) -> None:
        cc = config.cluster
        self.node_id, self.advertise_url = node_identity(config)
        # This process, as opposed to the node ID (which a restarted node keeps): what a node holds in
        # Redis under its instance dies with the process, even if the node is back within NODE_TTL.
        self.instance = secrets.token_hex(8)
        self.token = cc.token
        self.redis_shown = redact_url(cc.redis_url)  # the URL without its password, for logs
        # No retries inside the client: a write fails fast (503) and the loops below retry. A
        # blocking pool: a burst of requests (300 viewers reconnecting at once, lookups of made-up
        # session IDs) waits for a free connection; redis-py's default pool would raise
        # MaxConnectionsError beyond 100 in flight, which looks like Redis being down.
        self.redis = aioredis.Redis.from_pool(_Pool.from_url(
            cc.redis_url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_POOL_WAIT_SECONDS,
            decode_responses=True, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)))
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)
        self.sessions: ClusterSessionManager | None = None  # set by ClusterSessionManager
        # Control messages other than the sessions' own (create, destroy), by their "op".
        self.event_handlers: dict[str, Callable[[dict], None]] = {}
        self.reachable = False
        self.problem: str | None = "not connected to Redis yet"
        self._problem_detail = ""
        self.nodes: dict[str, dict] = {}  # node ID -> what it registered, as of the last heartbeat
        self.relays: dict[str, set[Any]] = {}  # upstream -> relay connections of edges (origin side)
        self.sources: dict[str, Any] = {}  # upstream -> its ClusterSource
        self._run_id: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._draining = False
        self._http: AsyncHTTPClient | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and control-channel loops (they connect, and reconnect, by themselves)."""
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._heartbeat_loop()),
                           asyncio.ensure_future(self._events_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.redis.delete(node_key(self.node_id))
        except REDIS_ERRORS:
            pass
        await self.redis.aclose()
        if self._http is not None:
            self._http.close()

    async def drain(self) -> None:
        """SIGTERM: give up every upstream this node is the origin of (release the leases, so
        another node takes over), and close the edges' relays so they look for the new origin."""
        self._draining = True
        for source in self.sources.values():
            await source.give_up()
        for relays in self.relays.values():
            for relay in tuple(relays):
                relay.close(1001, "origin node shutting down")

    @property
    def draining(self) -> bool:
        return self._draining

    # -- node to node ------------------------------------------------------------------------------

    def node_headers(self) -> dict[str, str]:
        """The credentials of a request to another node: cluster.token, and this node's ID."""
        return {"Authorization": f"Bearer {self.token}", "X-Vsproxy-Node": self.node_id}

    def from_a_node(self, authorization: str | None) -> bool:
        """Does a request's Authorization header carry cluster.token? Compared as every token is
        (digests: neither its content nor its length shows in the timing)."""
        return token_matches(bearer_token(authorization), (self.token,))

    @property
    def http(self) -> AsyncHTTPClient:
        """The HTTP client of requests to other nodes: its own, so that no other use of Tornado's
        shared one (10 requests at once) makes them wait."""
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=NODE_REQUESTS)
        return self._http

    # -- Redis calls ---------------------------------------------------------------------------

    async def write(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis call a client is waiting for: Redis unreachable is a 503 (ClusterUnavailable)."""
        try:
            return await call()
        except REDIS_ERRORS as exc:
            self.failed(exc)
            raise ClusterUnavailable("Session registry unavailable (Redis cannot be reached); try again "
                                     "shortly", sent=not never_sent(exc)) from None

    def failed(self, exc: BaseException) -> None:
        """Redis could not be reached: report once, then /health says degraded until it is back."""
        # /health, which anyone may read, gets the kind of failure; the log also the client's
        # text, which names Redis's address ("Error 111 connecting to 10.0.0.5:6379").
        problem = f"Redis unreachable ({type(exc).__name__})"
        detail = f"{problem[:-1]}: {str(exc)[:120] or 'no detail'})"
        if self.reachable or self._problem_detail != detail:
            log.warning("cluster: %s at %s; serving what this node has, writes answer 503", detail,
                        self.redis_shown)
        self.reachable = False
        self.problem = problem
        self._problem_detail = detail

    # -- leases ----------------------------------------------------------------------------------

    async def claim(self, upstream: str) -> bool:
        """Take or renew the lease on `upstream`: True if this node holds it now."""
        return await self.claim_or_holder(upstream) == self.node_id

    async def claim_or_holder(self, upstream: str) -> str:
        """Take or renew the lease on `upstream` if it is free or ours: the node ID that holds it
        now (this node's, or the other holder's), in one round trip."""
        return await self._claim(keys=[lease_key(upstream)], args=[self.node_id, int(LEASE_TTL_SECONDS * 1000)])

    async def release(self, upstream: str) -> None:
        await self._release(keys=[lease_key(upstream)], args=[self.node_id])

    async def holder(self, upstream: str) -> str | None:
        return await self.redis.get(lease_key(upstream))

    async def node_url(self, node_id: str) -> str | None:
        """The advertise URL of a live node, None if it is not registered (dead or unknown)."""
        raw = await self.redis.get(node_key(node_id))
        return json.loads(raw)["url"] if raw else None

    # -- loops -----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        backoff = 0.2
        next_resync = 0.0
        while True:
            try:
                await self._heartbeat()
                if time.monotonic() >= next_resync and self.sessions is not None:
                    await self.sessions.resync()
                    next_resync = time.monotonic() + RESYNC_SECONDS
                backoff = 0.2
                await asyncio.sleep(HEARTBEAT_SECONDS)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.failed(exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            except Exception:  # a bug must not end the node's registration
                log.exception("cluster heartbeat failed")
                await asyncio.sleep(HEARTBEAT_SECONDS)

    async def check_restart(self) -> None:
        """Has Redis restarted (a new run_id) since we last looked? Then it may have lost its data:
        write back the sessions this node knows (idempotent, every node does it), so none is lost.
        Called before anything reads the sessions back from Redis."""
        run_id = (await self.redis.info("server"))["run_id"]
        if self._run_id is not None and run_id != self._run_id and self.sessions is not None:
            count = await self.sessions.reregister()
            log.info("cluster: Redis restarted; re-registered %d sessions", count)
        self._run_id = run_id

    async def _heartbeat(self) -> None:
        await self.check_restart()
        # "connected": the upstreams this node holds and has connected, for every node's API.
        connected = sorted(name for name, source in self.sources.items() if source.origin_connected)
        await self.redis.set(node_key(self.node_id), json.dumps({"url": self.advertise_url, "at": time.time(),
                                                                "instance": self.instance, "connected": connected}),
                             px=int(NODE_TTL_SECONDS * 1000))
        if not self._draining:
            for source in self.sources.values():
                await source.renew()  # a lease lost with Redis's data comes back at once
        keys = [key async for key in self.redis.scan_iter(match=node_key("*"), count=100)]
        values = await self.redis.mget(keys) if keys else []
        self.nodes = {key.removeprefix(node_key("")): json.loads(value)
                      for key, value in zip(keys, values, strict=True) if value}
        if self.sessions is not None:
            await self.sessions.flush_activity_async()
            await self.sessions.write_viewer_places()
        if not self.reachable:
            log.info("cluster: node %s registered with Redis at %s (%d nodes)", self.node_id, self.redis_shown,
                     len(self.nodes))
        self.reachable = True
        self.problem = None

    async def _events_loop(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS)
                if self.sessions is not None:
                    await self.sessions.resync()  # whatever was said while we were not listening
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        try:
                            self._apply_event(json.loads(message["data"]))
                        except (ValueError, KeyError, TypeError, AttributeError) as exc:
                            log.warning("cluster: ignored a malformed control message (%s)", exc)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.failed(exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            except Exception:
                log.exception("cluster control channel failed")
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except REDIS_ERRORS:
                    pass

    def upstream_connected(self, upstream: str) -> bool:
        """Does any live node hold `upstream` connected (as of the last heartbeat)?"""
        return any(upstream in node.get("connected", ()) for node in self.nodes.values())

    def _apply_event(self, event: dict) -> None:
        handler = self.event_handlers.get(event["op"])
        if handler is not None:
            handler(event)
        elif self.sessions is not None:
            self.sessions.apply_event(event)

    async def publish(self, event: dict) -> None:
        await self.redis.publish(EVENTS, json.dumps(event))

    # -- what /health and /upstreams show ----------------------------------------------------------

    def health(self) -> dict:
        return {
            "node": self.node_id,
            "nodes": sorted(self.nodes),
            "redis": "connected" if self.reachable else "unreachable",
            **({"problem": self.problem} if self.problem else {}),
        }
