"""Wiring: the Proxy object owns config, hubs and sessions, and builds the Tornado application."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import tornado.web
from tornado.ioloop import PeriodicCallback

from .auth import Access, RateLimiter
from .config import Config
from .handlers import api, dashboard, ingest, ops, pages, stream, whep
from .handlers.base import NotFoundHandler
from .hub import FrameHub
from .metrics import Metrics, ProxyCollector, method_name
from .monitor import Monitor
from .outputs.webrtc import WhepPeers
from .server import ConnectionCount, ProxyServer
from .sessions import SessionManager
from .sources import create_source
from .sources.base import UnreadTotal
from .store import open_store

log = logging.getLogger("vsproxy.app")
access_log = logging.getLogger("vsproxy.access")


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """A server TLS context from tls.cert_file/key_file, or None for plain HTTP (ssl.SSLError if
    they cannot be loaded)."""
    tls = config.tls
    if not tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class Proxy:
    """The application object: everything with state hangs off it (no module-level state)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        # Without an Isaac Sim address the default upstream is the built-in demo source; the
        # public IP in the original README is an example, never a default.
        # First: a session store that cannot be used is a configuration error (ConfigError naming
        # sessions.store), raised before anything has started.
        store = open_store(config.sessions.store)
        stored_sessions = store.load()
        upstreams, default = config.upstream_configs()
        # A cluster (cluster.redis_url): sessions in Redis, each upstream's source wrapped so that
        # one node in the cluster (the origin) holds the upstream (vsproxy/cluster/).
        self.cluster: Any = None
        if config.cluster.redis_url:
            from . import cluster
            self.cluster = cluster.Cluster(config)
        self.hubs: dict[str, FrameHub] = {
            name: FrameHub(name, self._source(name, settings),
                           streaming=config.streaming, reconnect=config.reconnect, h264=config.h264_for(name))
            for name, settings in upstreams.items()
        }
        limits = config.limits
        session_settings: dict[str, Any] = dict(
            robots=config.robots,
            max_sessions=config.limits.max_sessions,
            max_sessions_per_user=config.limits.max_sessions_per_user,
            max_viewers_per_session=config.limits.max_viewers_per_session,
            idle_timeout=config.sessions.idle_timeout_seconds,
            store=store,
        )
        self.session_create_limiter: Any
        if self.cluster is not None:
            self.sessions = cluster.ClusterSessionManager(
                self.hubs, default, cluster=self.cluster, create_rate=limits.session_create_rate,
                create_burst=limits.session_create_burst,
                cleanup_interval=config.sessions.cleanup_interval_seconds, **session_settings)
            self.session_create_limiter = cluster.NoRateLimit()  # enforced in Redis, cluster-wide
        else:
            self.sessions = SessionManager(self.hubs, default, **session_settings)
            self.session_create_limiter = RateLimiter(limits.session_create_rate, limits.session_create_burst)
        self.sessions.restore(stored_sessions)
        self.access = Access(config.auth)
        self.metrics = Metrics(ProxyCollector(self.sessions, self.hubs, config.limits.max_sessions,
                                                    cluster=self.cluster))
        self.monitor = Monitor(config, self.hubs, self.sessions, self.access,  # the operator dashboard's state
                               started_at=self.started_at, cluster=self.cluster)
        # Open client connections against limits.max_connections: every port's, and WebRTC peers.
        self.connections = ConnectionCount(config.limits.max_connections)
        # Text written to WebSocket viewers that their sockets have not taken yet, all together (a cluster
        # edge's relay has only its own 1 MiB: one per node).
        self.unread_text = UnreadTotal(config.streaming.max_unread_text_bytes)
        self.whep = WhepPeers(config.webrtc.ice_servers, self.connections)  # WebRTC peers (WHEP), by resource id
        if self.cluster is not None:  # a DELETE of a WHEP resource works on every node
            self.whep.directory = cluster.WhepDirectory(self.cluster, self.whep)
        self._timers: list[PeriodicCallback] = []
        self._server: ProxyServer | None = None
        self._servers: list[ProxyServer] = []

    def _source(self, name: str, settings: Any) -> Any:
        source = create_source(name, settings, self.config.reconnect)
        if self.cluster is not None:
            from .cluster import ClusterSource
            source = ClusterSource(source, self.cluster)
        return source

    # -- the Tornado application ---------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        handlers: list[Any] = []
        # Each handler module ends with its `routes` list.
        for module in (api, ops, stream, whep, ingest, pages, dashboard):
            if module is ops and self.config.server.metrics_port:
                handlers += ops.health_routes + ops.openapi_routes  # /metrics gets its own port
                continue
            handlers += module.routes
        if self.cluster is not None:
            from .cluster import ingest as forwarded_ingest
            from .cluster import relay
            handlers = relay.routes + forwarded_ingest.routes + handlers
        return tornado.web.Application(
            handlers,
            **self.handler_settings(),
            default_handler_class=NotFoundHandler,
            log_function=self._log_request,
            websocket_ping_interval=20,
            websocket_ping_timeout=20,  # Tornado caps it at the interval
        )

    def handler_settings(self) -> dict[str, Any]:
        """What handlers may reach, each through a typed accessor of handlers.base.HandlerMixin."""
        return {
            "vsproxy_config": self.config,
            "vsproxy_sessions": self.sessions,
            "vsproxy_hubs": self.hubs,
            "vsproxy_access": self.access,
            "vsproxy_monitor": self.monitor,
            "vsproxy_metrics": self.metrics,
            "vsproxy_whep": self.whep,
            "vsproxy_session_create_limiter": self.session_create_limiter,
            "vsproxy_cluster": self.cluster,
            "vsproxy_unread_text": self.unread_text,
        }

    def _log_request(self, handler: tornado.web.RequestHandler) -> None:
        self.metrics.observe_request(handler)
        status = handler.get_status()
        # 503 is a state the operator planned for (a limit reached, Redis down, no frame yet), not a
        # fault: a warning. Other 5xx are faults.
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 or status == 503 else logging.ERROR
        path = handler.request.path
        if status == 200 and (path in ("/health", "/metrics") or path.startswith("/dashboard/api/")
                              or (path.startswith("/stream/") and path.endswith("/status"))):
            level = logging.DEBUG  # probes, scrapes, dashboard refreshes and stalled players would drown the log
        access_log.log(level, "%d %s %s %.1fms", status, method_name(handler.request.method),
                       handler.request.path, 1000 * handler.request.request_time())

    # -- lifecycle -----------------------------------------------------------------------------

    def start_background_tasks(self) -> None:
        cleanup_ms = self.config.sessions.cleanup_interval_seconds * 1000
        self._timers = [
            PeriodicCallback(self.sessions.reap_idle, cleanup_ms),
            PeriodicCallback(self._tick_hubs, 1000),
        ]
        if self.sessions.store.persistent:
            flush_ms = self.config.sessions.activity_flush_seconds * 1000
            self._timers.append(PeriodicCallback(self.sessions.flush_activity, flush_ms))
        for timer in self._timers:
            timer.start()
        self.monitor.start()
        if self.cluster is not None:
            self.cluster.start()

    def _tick_hubs(self) -> None:
        now = time.monotonic()
        for hub in self.hubs.values():
            hub.tick(now)

    def listen(self, port: int, address: str = "127.0.0.1") -> ProxyServer:
        """Serve on `port` (HTTPS/WSS when TLS is configured); /metrics also on server.metrics_port.

        Both ports share one `limits.max_connections` count (see vsproxy/server.py)."""
        context = ssl_context(self.config)
        connections = self.connections
        self._server = ProxyServer(self.make_app(), server_config=self.config.server, connections=connections,
                                   ssl_options=context)
        self._servers = [self._server]
        self._server.listen(port, address=address)
        if self.config.server.metrics_port:
            metrics_app = tornado.web.Application(ops.metrics_routes, **self.handler_settings(),
                                                  log_function=self._log_request)
            metrics_server = ProxyServer(metrics_app, server_config=self.config.server, connections=connections,
                                         ssl_options=context)
            self._servers.append(metrics_server)
            metrics_server.listen(self.config.server.metrics_port, address=address)
        self.start_background_tasks()
        return self._server

    async def shutdown(self) -> None:
        """Stop accepting, tell viewers, close sessions and upstreams."""
        for server in self._servers:
            server.stop()
        for timer in self._timers:
            timer.stop()
        self.monitor.stop()
        if self.cluster is not None:
            await self.cluster.drain()  # leases first: another node takes the upstreams over
        self.sessions.close_all()
        await self.whep.wait_closed()  # WebRTC peers' connections (their close was started above)
        await self.sessions.close_store()
        await asyncio.gather(*(hub.stop() for hub in self.hubs.values()))
        for hub in self.hubs.values():
            hub.source.close()  # what outlives run(): a push upstream's publisher
        if self._servers:
            try:
                await asyncio.wait_for(asyncio.gather(*(s.close_all_connections() for s in self._servers)),
                                       self.config.server.shutdown_timeout_seconds)
            except TimeoutError:
                log.warning("some connections did not close within the shutdown timeout")
        if self.cluster is not None:
            await self.cluster.stop()
