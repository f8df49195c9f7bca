"""The operator dashboard: its static page, the state as JSON, a live push (SSE), thumbnails.

Thin adapters over `Proxy.monitor` (vsproxy/monitor.py); dashboard/README.md has the shapes.
Everything here, the page's files included, needs the operator credentials (`auth.operators`,
HTTP Basic) when any are configured.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import tornado.web

from ..errors import AccessDenied
from .base import HandlerMixin, JsonHandler, write_json_error

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
    (403 for `..` and absolute paths, including percent-encoded ones)."""

    def prepare(self) -> None:
        try:
            self.require("operator")
        except AccessDenied as exc:  # the Basic challenge makes the browser ask for a password
            write_json_error(self, exc.status, str(exc), exc.headers)

    def parse_url_path(self, url_path: str) -> str:
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

    A dashboard whose connection has not taken the previous event skips the next one instead of
    queueing (the newest state is all it needs). EventSource reconnects by itself.
    """

    cors_methods = "GET, OPTIONS"
    auth_scope = "operator"

    async def get(self) -> None:
        monitor = self.monitor
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # a buffering reverse proxy would hold events
        self._ended = asyncio.get_running_loop().create_future()
        self._flushing: asyncio.Future | None = None
        self.send(b"retry: 2000\n" + monitor.event())  # the state at once, not in a second
        monitor.subscribe(self)
        try:
            await self._ended
        finally:
            monitor.unsubscribe(self)
        if not self.request.connection.stream.closed():  # type: ignore[attr-defined]
            self.finish()

    def send(self, event: bytes) -> None:
        if self._ended.done() or (self._flushing is not None and not self._flushing.done()):
            return
        self.write(event)
        self._flushing = self.flush()

    def close(self) -> None:
        """End the stream (server shutdown)."""
        if not self._ended.done():
            self._ended.set_result(None)

    def on_connection_close(self) -> None:
        self.close()


class DashboardThumbnailHandler(JsonHandler):
    """GET /dashboard/api/thumbnail/{upstream}.jpg: the upstream's newest frame, 160 px wide."""

    cors_methods = "GET, OPTIONS"
    auth_scope = "operator"

    def get(self, upstream: str) -> None:
        try:
            jpeg = self.monitor.thumbnail(upstream)
        except KeyError:
            raise tornado.web.HTTPError(404, reason="No such upstream") from None
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

    def delete(self, session_id: str) -> None:
        self.destroy_session(session_id)


_DIR = {"path": str(dashboard_dir())}
routes = [
    (r"/dashboard/api/state", DashboardStateHandler),
    (r"/dashboard/api/events", DashboardEventsHandler),
    (r"/dashboard/api/thumbnail/(?P<upstream>[^/]+)\.jpg", DashboardThumbnailHandler),
    (r"/dashboard/api/sessions/(?P<session_id>[^/]+)", DashboardSessionHandler),
    (r"/dashboard/?()", DashboardFileHandler, _DIR),
    (r"/dashboard/(.+)", DashboardFileHandler, _DIR),
]
