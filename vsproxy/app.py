"""Wiring: the Proxy object owns config, hubs and sessions, and builds the Tornado application."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import tornado.httpserver
import tornado.web
from tornado.httputil import HTTPServerRequest
from tornado.ioloop import PeriodicCallback

from .config import Config
from .handlers import api, ops, pages, stream
from .handlers.base import NotFoundHandler
from .hub import FrameHub
from .metrics import Metrics
from .sessions import SessionManager
from .sources import create_source

log = logging.getLogger("vsproxy.app")
access_log = logging.getLogger("vsproxy.access")


class Proxy:
    """The application object: everything with state hangs off it (no module-level state)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        # Without an Isaac Sim address the default upstream is the built-in demo source; the
        # public IP in the original README is an example, never a default.
        upstreams, default = config.upstream_configs()
        self.hubs: dict[str, FrameHub] = {
            name: FrameHub(name, create_source(name, settings, config),
                           streaming=config.streaming, reconnect=config.reconnect)
            for name, settings in upstreams.items()
        }
        self.sessions = SessionManager(
            self.hubs,
            default,
            robots=config.robots,
            max_sessions=config.limits.max_sessions,
            idle_timeout=config.sessions.idle_timeout_seconds,
        )
        self.metrics = Metrics(self)
        self._timers: list[PeriodicCallback] = []
        self._server: tornado.httpserver.HTTPServer | None = None

    # -- the Tornado application ---------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        handlers: list[Any] = []
        for module in (api, ops, stream, pages):  # each handler module ends with its `routes` list
            handlers += module.routes
        return tornado.web.Application(
            handlers,
            proxy=self,
            default_handler_class=NotFoundHandler,
            log_function=self._log_request,
            # Tornado's own message cap only guards against abuse; our configured, friendlier
            # limit (an error message, connection kept) is checked in the handler below it.
            websocket_max_message_size=max(4 * self.config.streaming.max_viewer_message_bytes, 1 << 20),
            websocket_ping_interval=20,
            websocket_ping_timeout=60,
        )

    def _log_request(self, handler: tornado.web.RequestHandler) -> None:
        self.metrics.observe_request(handler)
        status = handler.get_status()
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if handler.request.path in ("/health", "/metrics") and status == 200:
            level = logging.DEBUG  # probes and scrapes every few seconds would drown the log
        access_log.log(level, "%d %s %s %.1fms", status, handler.request.method,
                       handler.request.path, 1000 * handler.request.request_time())

    def public_base_url(self, request: HTTPServerRequest) -> str:
        """http(s)://host[:port] as clients reach this server, for the URLs the API returns."""
        cfg = self.config.server
        if cfg.public_url:
            return cfg.public_url.rstrip("/")
        scheme, host = request.protocol, request.host
        if cfg.trust_proxy_headers:
            forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
            forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if forwarded_proto in ("http", "https"):
                scheme = forwarded_proto
            if forwarded_host:
                host = forwarded_host
        return f"{scheme}://{host}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start_background_tasks(self) -> None:
        cleanup_ms = self.config.sessions.cleanup_interval_seconds * 1000
        self._timers = [
            PeriodicCallback(self.sessions.reap_idle, cleanup_ms),
            PeriodicCallback(self._tick_hubs, 1000),
        ]
        for timer in self._timers:
            timer.start()

    def _tick_hubs(self) -> None:
        now = time.monotonic()
        for hub in self.hubs.values():
            hub.tick(now)

    def listen(self, port: int, address: str = "") -> tornado.httpserver.HTTPServer:
        self._server = self.make_app().listen(port, address=address, xheaders=False)
        self.start_background_tasks()
        return self._server

    async def shutdown(self) -> None:
        """Stop accepting, tell viewers, close sessions and upstreams."""
        if self._server is not None:
            self._server.stop()
        for timer in self._timers:
            timer.stop()
        self.sessions.close_all()
        await asyncio.gather(*(hub.stop() for hub in self.hubs.values()))
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.close_all_connections(),
                                       self.config.server.shutdown_timeout_seconds)
            except asyncio.TimeoutError:
                log.warning("some connections did not close within the shutdown timeout")
