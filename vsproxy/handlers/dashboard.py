"""The operator dashboard: its static page, the state as JSON, a live push (SSE), thumbnails.

Thin adapters over `Proxy.monitor` (vsproxy/monitor.py); dashboard/README.md has the shapes.
Everything here, the page's files included, needs the operator credentials (`auth.operators`,
HTTP Basic) when any are configured.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

import tornado.web

from ..monitor import ThumbnailError
from ..outputs.viewer import unsent_bytes
from .base import HandlerMixin, JsonHandler

log = logging.getLogger("vsproxy.dashboard")

# What the page is made of; anything else in the folder (README.md) is not served.
SERVED_SUFFIXES = frozenset({".html", ".js", ".css", ".svg", ".png", ".ico", ".txt"})


def dashboard_dir() -> Path:
    """The folder holding index.html: the source checkout's `dashboard/` (editable installs and
    running from the checkout), else the copy `pip install .` put in the `vsproxy_dashboard`
    package (setup.py maps the folder to it)."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "setup.py").is_file() and (repo / "dashboard" / "index.html").is_file():
        return repo / "dashboard"
    spec = importlib.util.find_spec("vsproxy_dashboard")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return repo / "dashboard"  # not installed: every file answers 404


class DashboardFileHandler(HandlerMixin, tornado.web.StaticFileHandler):
    """GET /dashboard and /dashboard/<file>: StaticFileHandler keeps every path inside its root
    (403 for `..` and absolute paths, including percent-encoded ones). Errors are JSON, a 401 with
    the Basic challenge that makes the browser ask for a password."""

    def prepare(self) -> None:
        super().prepare()  # the Host check
        self.require("operator")

    def parse_url_path(self, url_path: str) -> str:
        if "\x00" in url_path:  # no file has one, and the OS calls below would raise ValueError
            raise tornado.web.HTTPError(404)
        return url_path or "index.html"

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        checked = super().validate_absolute_path(root, absolute_path)  # the root check
        if checked is not None and Path(checked).suffix not in SERVED_SUFFIXES:
            raise tornado.web.HTTPError(404)
        return checked

    def set_extra_headers(self, path: str) -> None:
        # Revalidate every time (a 304 is cheap) so an upgraded server never runs an old script.
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        if path.endswith(".html"):
            # The page loads only its own files and talks only to this server; no framing, so the
            # Destroy buttons cannot be clickjacked.
            self.set_header("Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")


class DashboardStateHandler(JsonHandler):
    """GET /dashboard/api/state: the whole dashboard state, once."""

    cors_methods = "GET, OPTIONS"
    auth_scope = "operator"

    def get(self) -> None:
        self.send_json(self.monitor.state())


class DashboardEventsHandler(JsonHandler):
    """GET /dashboard/api/events: Server-Sent Events, one `data: <state JSON>` a second.

    An event is written only when the previous one has left Tornado's buffer and the kernel's
    send queue, so each dashboard holds at most one event in this process and the kernel, whatever
    its socket does; a dashboard that is not ready skips events (the newest state is all it needs),
    and one that has taken nothing for `streaming.stall_timeout_seconds` is disconnected.
    At most `limits.max_dashboard_clients` streams are open (503 beyond). EventSource reconnects
    by itself.
    """

    cors_methods = "GET, OPTIONS"
    auth_scope = "operator"
    _ended: asyncio.Future | None = None  # None until get() runs: a refused request never gets one
    _gone = False
    _flushing: asyncio.Future | None = None

    async def get(self) -> None:
        if self._gone:
            return  # the client left before the handler ran
        monitor = self.monitor
        monitor.subscribe(self)  # 503 (DashboardLimitReached) at the cap, before any byte is sent
        self._ended = asyncio.get_running_loop().create_future()
        self._kept_up_at = time.monotonic()  # last time the client had taken everything sent
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # a buffering reverse proxy would hold events
        self.send(b"retry: 2000\n" + monitor.event())  # the state at once, not in a second
        try:
            await self._ended
        finally:
            monitor.unsubscribe(self)
        if not self.request.connection.stream.closed():  # type: ignore[attr-defined]
            self.finish()

    def send(self, event: bytes) -> None:
        if self._ended is None or self._ended.done():
            return
        now = time.monotonic()
        if self._backlogged():
            stalled = now - self._kept_up_at
            if stalled > self.config.streaming.stall_timeout_seconds:
                log.info("dashboard event stream of %s closed: it took nothing for %.0f s",
                         self.request.remote_ip, stalled)
                self.request.connection.stream.close()  # type: ignore[attr-defined]  # -> on_connection_close
            return
        self._kept_up_at = now
        self.write(event)
        self._flushing = self.flush()

    def _backlogged(self) -> bool:
        """Is part of the previous event still waiting, in Tornado's buffer or the kernel's?"""
        if self._flushing is not None and not self._flushing.done():
            return True
        sock = self.request.connection.stream.socket  # type: ignore[attr-defined]
        return sock is not None and (unsent_bytes(sock.fileno()) or 0) > 0

    def close(self) -> None:
        """End the stream (server shutdown)."""
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def on_connection_close(self) -> None:
        # May come before get() ran, e.g. for a request refused in prepare().
        self._gone = True
        self.close()


class DashboardThumbnailHandler(JsonHandler):
    """GET /dashboard/api/thumbnail/{upstream}.jpg: the upstream's newest frame, 160 px wide."""

    cors_methods = "GET, OPTIONS"
    auth_scope = "operator"

    async def get(self, upstream: str) -> None:
        try:
            jpeg = await self.monitor.thumbnail(upstream)
        except KeyError:
            raise tornado.web.HTTPError(404, reason="No such upstream") from None
        except ThumbnailError:
            raise tornado.web.HTTPError(503, reason="The upstream's picture cannot be made into a thumbnail") from None
        if jpeg is None:
            raise tornado.web.HTTPError(503, reason="No frame received from the upstream yet")
        self.set_header("Content-Type", "image/jpeg")
        self.finish(jpeg)


class DashboardSessionHandler(JsonHandler):
    """DELETE /dashboard/api/sessions/{id}: Destroy for operators. The page calls the API's
    DELETE /session/{id} first; where that needs an API token (auth.api_tokens), which an
    operator's browser does not have, it falls back to this operator-authorised twin."""

    cors_methods = "DELETE, OPTIONS"
    auth_scope = "operator"

    async def delete(self, session_id: str) -> None:
        await self.destroy_session(session_id)


_DIR = {"path": str(dashboard_dir())}
routes = [
    (r"/dashboard/api/state", DashboardStateHandler),
    (r"/dashboard/api/events", DashboardEventsHandler),
    (r"/dashboard/api/thumbnail/(?P<upstream>[^/]+)\.jpg", DashboardThumbnailHandler),
    (r"/dashboard/api/sessions/(?P<session_id>[^/]+)", DashboardSessionHandler),
    (r"/dashboard/?()", DashboardFileHandler, _DIR),
    (r"/dashboard/(.+)", DashboardFileHandler, _DIR),
]
