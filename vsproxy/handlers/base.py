"""Shared handler plumbing: JSON errors, CORS, bounded request bodies, the URLs clients get back."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import tornado.web
from tornado.log import app_log

from ..errors import ClientError

if TYPE_CHECKING:
    from ..app import Proxy
    from ..config import Config


def origin_allowed(origin: str | None, allowed: list[str], host: str | None = None) -> bool:
    """Is a browser `Origin` one of the configured origins (or this server itself)?"""
    if not origin:
        return False
    if "*" in allowed or origin in allowed:
        return True
    # The proxy's own pages (embed player, landing page) are always allowed.
    if host:
        scheme_sep = origin.find("://")
        if scheme_sep != -1 and origin[scheme_sep + 3:].lower() == host.lower():
            return True
    return False


class ProxyMixin:
    """The Proxy object reaches handlers through the application settings, never module globals
    (a property, because Tornado calls set_default_headers before initialize)."""

    settings: dict

    @property
    def proxy(self) -> Proxy:
        return self.settings["proxy"]

    @property
    def config(self) -> Config:
        return self.proxy.config

    def _request_summary(self) -> str:
        # Tornado's summary (used in its warnings and error logs) is the full URI, and a query
        # string may carry a token: log method, path and client only.
        request = self.request  # type: ignore[attr-defined]
        return f"{request.method} {request.path} ({request.remote_ip})"

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ClientError):
            return  # a client's mistake, answered with its status; not a server error
        if isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)  # type: ignore[misc]  # one line, our summary
            return
        # Tornado would add repr(request), query string and all; this keeps the traceback only.
        app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))

    def require(self, scope: str | None) -> None:
        """Raise AccessDenied unless the request carries the credential `scope` needs."""
        self.proxy.access.require(scope, self.request.headers.get("Authorization"))  # type: ignore[attr-defined]

    def require_viewer(self, session_id: str) -> None:
        """With viewer tokens on, raise AccessDenied unless the request has this session's token."""
        request = self.request  # type: ignore[attr-defined]
        token = request.query_arguments.get("token", [b""])[-1].decode("utf-8", "replace") or None
        self.proxy.access.require_viewer(session_id, token, request.headers.get("Authorization"))


@tornado.web.stream_request_body
class JsonHandler(ProxyMixin, tornado.web.RequestHandler):
    """Base for the REST API: CORS for configured origins, JSON bodies, JSON errors.

    The body is streamed so an oversized one is refused with 413 before it is read into memory.
    """

    cors_methods = "GET, POST, DELETE, OPTIONS"
    # The credential this handler needs (see auth.Access.require): None, "api", "operator", "metrics".
    auth_scope: str | None = None

    def set_default_headers(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin_allowed(origin, self.config.cors.allowed_origins, self.request.host):
            self.set_header("Access-Control-Allow-Origin", origin)
        self.set_header("Vary", "Origin")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":  # browsers send no credentials on a preflight
            self.require(self.auth_scope)
        self._body = bytearray()
        self._body_too_large = False
        limit = self.config.limits.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_large = int(length) > limit
            except ValueError:
                raise tornado.web.HTTPError(400, reason="Invalid Content-Length") from None
            if too_large:
                raise tornado.web.HTTPError(413)

    def data_received(self, chunk: bytes) -> None:
        # Chunked bodies have no Content-Length: count as they arrive, keep nothing past the limit.
        if self._body_too_large:
            return
        if len(self._body) + len(chunk) > self.config.limits.max_body_bytes:
            self._body_too_large = True
            self._body.clear()
            return
        self._body.extend(chunk)

    def json_body(self) -> dict:
        """The request body as a JSON object; 400/413 with a clear message otherwise."""
        if self._body_too_large:
            raise tornado.web.HTTPError(413)
        if not self._body:
            raise tornado.web.HTTPError(400, reason="Request body must be a JSON object")
        try:
            body = json.loads(self._body)
        except ValueError:
            raise tornado.web.HTTPError(400, reason="Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="Request body must be a JSON object")
        return body

    def options(self, *args: Any, **kwargs: Any) -> None:
        # CORS preflight. Without an allowed Origin the browser finds no Allow-Origin and refuses.
        self.set_header("Access-Control-Allow-Methods", self.cors_methods)
        self.set_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(payload, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = None
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            # Domain errors (unknown session, limits, credentials) map to their status here, once.
            status_code = exc.status
            self.set_status(status_code)
            for name, value in exc.headers.items():
                self.set_header(name, value)
            error = str(exc)
        elif isinstance(exc, tornado.web.HTTPError) and exc.reason:
            error = exc.reason
        if error is None:
            error = {
                404: "Not found",
                405: f"Method {self.request.method} not allowed",
                413: f"Request body larger than {self.config.limits.max_body_bytes} bytes",
            }.get(status_code) or HTTPStatus(status_code).phrase
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"success": False, "error": error}))

    def urls_for(self, session_id: str, viewer_token: str | None = None) -> dict[str, str]:
        """wsUrl / httpStreamUrl as the client should use them (carrying the viewer token, if any)."""
        base = self.proxy.public_base_url(self.request)
        ws_base = "ws" + base[len("http"):]
        query = f"?token={viewer_token}" if viewer_token else ""
        return {
            "wsUrl": f"{ws_base}/stream/{session_id}{query}",
            "httpStreamUrl": f"{base}/stream/{session_id}/mjpeg{query}",
        }


class NotFoundHandler(JsonHandler):
    """Unknown paths answer a JSON 404 like every other API error."""

    def prepare(self) -> None:
        super().prepare()
        if self.request.method != "OPTIONS":
            raise tornado.web.HTTPError(404, reason=f"No such endpoint: {self.request.path}")
