"""Shared handler plumbing: typed access to the app's collaborators, JSON errors, the Host check,
CORS, the WebSocket policy, bounded JSON request bodies and the URLs clients get back.

Handlers reach what they use through the narrow, typed properties of `HandlerMixin` (read from
the Tornado application settings, the jupyter_server way), never through module globals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tornado.httputil
import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.log import app_log

from ..config import WILDCARD_HOSTS
from ..errors import ClientError
from ..metrics import method_name

if TYPE_CHECKING:
    from ..auth import Access, RateLimiter, ViewerGrant
    from ..config import Config, ServerConfig
    from ..hub import FrameHub
    from ..metrics import Metrics
    from ..monitor import Monitor
    from ..outputs.webrtc import WhepPeers
    from ..sessions import SessionManager
    from ..sources.base import UnreadTotal

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"


# Always allowed: a rebinding attack's page carries its own domain name as Host, never these.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """The name in a Host header (or a server.allowed_hosts entry), as compared: lower case,
    port dropped, IPv6 brackets removed, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port; more colons is a bare IPv6 address
        host = host.partition(":")[0]
    return host.rstrip(".")


def allowed_hosts(server: ServerConfig) -> frozenset[str] | None:
    """The host names requests may carry (None: any): the loopback names, the bound address
    unless it is a wildcard, public_url's host and server.allowed_hosts."""
    if "*" in server.allowed_hosts:
        return None
    names = [*LOOPBACK_HOSTS, *server.allowed_hosts]
    if host_name(server.host) not in WILDCARD_HOSTS:  # every interface: no host name to allow from it
        names.append(server.host)
    if server.public_url:
        names.append(urlsplit(server.public_url).hostname or "")
    return frozenset(host_name(name) for name in names if name)


def host_allowed(host: str, allowed: frozenset[str] | None) -> bool:
    """Does a request's Host header name this server? (The DNS rebinding check: a page on a domain
    rebound to this address sends that domain as Host.)"""
    return allowed is None or host_name(host) in allowed


def request_host(config: Config, request: HTTPServerRequest) -> str:
    """The Host the client used: X-Forwarded-Host behind a trusted proxy, else the Host header."""
    if config.server.trust_proxy_headers:
        forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.host


def origin_allowed(origin: str | None, allowed: list[str], host: str | None = None) -> bool:
    """Is a browser `Origin` one of the configured origins, or this server itself (its Origin is
    `host`; pass a host only once it passed the allowed-hosts check)?"""
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


def public_base_url(config: Config, request: HTTPServerRequest) -> str:
    """http(s)://host[:port] as clients reach this server, for the URLs the API returns."""
    cfg = config.server
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    scheme = request.protocol
    if cfg.trust_proxy_headers:
        forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
        if forwarded_proto in ("http", "https"):
            scheme = forwarded_proto
    return f"{scheme}://{request_host(config, request)}"


def is_json_content_type(content_type: str | None) -> bool:
    """`application/json`, with or without parameters (charset=...), in any case."""
    return content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


def post_content_type_error(content_type: str | None, has_body: bool, takes_body: bool) -> str | None:
    """Why a POST to the JSON API gets 415, or None if it may proceed.

    A POST must say `Content-Type: application/json`: that makes a browser ask first (a CORS
    preflight, which only configured origins pass), so a page elsewhere cannot post with a form,
    `text/plain` or a "simple" fetch. An endpoint that reads no body (destroy) also takes a POST
    without a body whatever it declares: see SessionDestroyHandler.
    """
    if is_json_content_type(content_type) or (not takes_body and not has_body):
        return None
    return "Content-Type must be application/json"


def client_address(config: Config, request: HTTPServerRequest) -> str:
    """The client's IP, for per-address limits (X-Forwarded-For only behind a trusted proxy)."""
    if config.server.trust_proxy_headers:
        # The last entry is the one our own proxy added; earlier ones are the client's word.
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded:
            return forwarded
    return request.remote_ip or "unknown"


def write_json_error(handler: tornado.web.RequestHandler, status: int, error: str,
                     headers: dict[str, str] | None = None) -> None:
    """The one JSON error body: {"success": false, "error": "..."} with `status` (and `headers`)."""
    handler.set_status(status)
    for name, value in (headers or {}).items():
        handler.set_header(name, value)
    handler.set_header("Content-Type", JSON_CONTENT_TYPE)
    handler.finish(json.dumps({"success": False, "error": error}))


def query_token(request: tornado.httputil.HTTPServerRequest) -> str | None:
    """The request's `?token=` (the last one), None without one. Bytes that are not UTF-8 are
    replaced, never refused: Tornado's "Invalid unicode in token: b'...'" error would echo the
    token's first bytes in the response and the log."""
    return request.query_arguments.get("token", [b""])[-1].decode("utf-8", "replace") or None


def client_message(exc: tornado.web.HTTPError) -> str | None:
    """The message of a 4xx Tornado raised itself (e.g. "Invalid unicode in url: b'\\xff'" for a
    path that is not UTF-8), which it keeps for its log only."""
    if not 400 <= exc.status_code < 500 or not exc.log_message:
        return None
    return exc.log_message % exc.args if exc.args else exc.log_message


WEBSOCKET_VERSIONS = ("13",)  # what Tornado speaks (WebSocketHandler.get_websocket_protocol)


def websocket_handshake_error(headers: HTTPHeaders, check_origin: Callable[[str], bool]
                              ) -> tuple[int, str, dict[str, str] | None] | None:
    """(status, error, headers) where a request is no WebSocket handshake Tornado takes: its own
    checks, in its order, for every socket endpoint to answer as JSON (Tornado answers them in
    plain text); None for a handshake it will complete."""
    if headers.get("Upgrade", "").lower() != "websocket":
        return 400, "Not a WebSocket handshake (it needs 'Upgrade: websocket')", None
    if "upgrade" not in (part.strip().lower() for part in headers.get("Connection", "").split(",")):
        return 400, "Not a WebSocket handshake (it needs 'Connection: Upgrade')", None
    origin = headers.get("Origin")
    if origin is not None and not check_origin(origin):
        return 403, "This Origin may not open WebSockets here (see cors.allowed_origins)", None
    if headers.get("Sec-WebSocket-Version") not in WEBSOCKET_VERSIONS:
        return 426, "Unsupported Sec-WebSocket-Version (this server speaks 13)", {"Sec-WebSocket-Version": "13"}
    for name in ("Sec-WebSocket-Key", "Host"):
        if not headers.get(name):
            return 400, f"Not a WebSocket handshake (it needs a {name} header)", None
    return None


class HandlerMixin:
    """Typed accessors for the app's collaborators (properties, because Tornado calls
    set_default_headers before initialize), the Host check, credential checks, JSON errors and
    log hygiene."""

    settings: dict
    request: HTTPServerRequest
    # Probes and scrapers (load balancers, Kubernetes, Prometheus) reach /health and /metrics by
    # whatever address they have, often a pod IP; those two answer any Host (they control nothing).
    open_to_any_host = False

    @property
    def config(self) -> Config:
        return self.settings["vsproxy_config"]

    @property
    def sessions(self) -> SessionManager:
        return self.settings["vsproxy_sessions"]

    @property
    def hubs(self) -> dict[str, FrameHub]:
        return self.settings["vsproxy_hubs"]

    @property
    def access(self) -> Access:
        return self.settings["vsproxy_access"]

    @property
    def monitor(self) -> Monitor:
        return self.settings["vsproxy_monitor"]

    @property
    def whep(self) -> WhepPeers:
        return self.settings["vsproxy_whep"]

    @property
    def metrics(self) -> Metrics:
        return self.settings["vsproxy_metrics"]

    @property
    def session_create_limiter(self) -> RateLimiter:
        return self.settings["vsproxy_session_create_limiter"]

    @property
    def unread_text(self) -> UnreadTotal:
        return self.settings["vsproxy_unread_text"]

    def public_base_url(self) -> str:
        return public_base_url(self.config, self.request)

    def client_address(self) -> str:
        return client_address(self.config, self.request)

    def prepare(self) -> None:
        self.check_host()

    def check_host(self) -> None:
        """421 unless the request names this server as its Host (server.allowed_hosts): the first
        check of every endpoint, so a page on a DNS-rebound domain can do nothing here."""
        if self.open_to_any_host:
            return
        host = request_host(self.config, self.request)
        if not host_allowed(host, allowed_hosts(self.config.server)):
            raise tornado.web.HTTPError(
                421, reason=f"Host {host_name(host)[:100]!r} is not one of this server's names (server.allowed_hosts)")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error as the one JSON body; domain errors (unknown session, limits, credentials)
        map to their status here, once."""
        error = None
        headers: dict[str, str] = {}
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            status_code = exc.status
            headers = exc.headers
            error = str(exc)
        elif isinstance(exc, tornado.web.HTTPError):
            error = exc.reason or client_message(exc)
        write_json_error(self, status_code, error or self.error_message(status_code), headers)  # type: ignore[arg-type]

    def error_message(self, status_code: int) -> str:
        """The message of an error raised without one."""
        if status_code == 405:
            return f"Method {method_name(self.request.method)} not allowed"
        return "Not found" if status_code == 404 else HTTPStatus(status_code).phrase

    def _request_summary(self) -> str:
        # Tornado's summary (used in its warnings and error logs) is the full URI, and a query
        # string may carry a token: log method, path and client only.
        request = self.request
        return f"{method_name(request.method)} {request.path} ({request.remote_ip})"

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
        self.access.require(scope, self.request.headers.get("Authorization"))

    def require_viewer(self, session_id: str) -> ViewerGrant:
        """With viewer tokens on, raise AccessDenied unless the request has this session's token;
        returns what it grants (how long to watch, whether to control). Call it before looking the
        session up: a request without the token learns nothing of whether the session exists
        (the token is checked against the ID alone)."""
        request = self.request
        return self.access.require_viewer(session_id, query_token(request), request.headers.get("Authorization"))

    def origin_allowed(self, origin: str | None = None) -> bool:
        """Is this request's Origin allowed (configured, or this server's own pages)?"""
        if origin is None:
            origin = self.request.headers.get("Origin")
        host = request_host(self.config, self.request)
        own = host if host_allowed(host, allowed_hosts(self.config.server)) else None
        return origin_allowed(origin, self.config.cors.allowed_origins, own)


class WebSocketMixin(HandlerMixin):
    """The WebSocket policy of every socket endpoint: origins checked like CORS, compression off
    (frames are pre-built once for every viewer, and JPEG does not compress), and refusals
    answered before the upgrade with a JSON body so a client sees why."""

    def check_origin(self, origin: str) -> bool:
        return self.origin_allowed(origin)

    def get_compression_options(self) -> None:
        return None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Tornado's own handshake checks first, refused as JSON like every other refusal (Tornado
        answers them in plain text); then the upgrade."""
        error = self.handshake_error()
        if error is not None:
            return self.refuse(*error)
        await super().get(*args, **kwargs)  # type: ignore[misc]

    def handshake_error(self) -> tuple[int, str, dict[str, str] | None] | None:
        """(status, error, headers) where the request is no WebSocket handshake vsproxy takes."""
        return websocket_handshake_error(self.request.headers, self.check_origin)

    def refuse(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        """Answer the upgrade request with an HTTP error instead of switching protocols."""
        write_json_error(self, status, error, headers)  # type: ignore[arg-type]

    def refuse_client_error(self, exc: ClientError) -> None:
        self.refuse(exc.status, str(exc), exc.headers)


@tornado.web.stream_request_body
class JsonHandler(HandlerMixin, tornado.web.RequestHandler):
    """Base for the REST API: CORS for configured origins, JSON bodies, JSON errors.

    The body is streamed so an oversized one is refused with 413 before it is read into memory;
    `body_limit` says how large it may be (a subclass may allow more, as frame ingest does).
    """

    cors_methods = "GET, POST, DELETE, OPTIONS"
    # The credential this handler needs (see auth.Access.require): None, "api", "operator", "metrics".
    auth_scope: str | None = None
    # Does a POST to this handler carry a JSON body? (See post_content_type_error.)
    post_takes_body = True
    _body: bytearray
    _body_too_large = False

    def set_default_headers(self) -> None:
        if self.origin_allowed():
            self.set_header("Access-Control-Allow-Origin", self.request.headers["Origin"])
        self.set_header("Vary", "Origin")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def prepare(self) -> None:
        super().prepare()  # the Host check
        if self.request.method != "OPTIONS":  # browsers send no credentials on a preflight
            self.require(self.auth_scope)
        if self.request.method == "POST" and type(self).post is not tornado.web.RequestHandler.post:
            self.check_post_content_type()
        self.start_body()

    def check_post_content_type(self) -> None:
        """415 unless a POST declares its body as JSON (see post_content_type_error)."""
        headers = self.request.headers
        has_body = "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() not in ("", "0")
        error = post_content_type_error(headers.get("Content-Type"), has_body, self.post_takes_body)
        if error:
            raise tornado.web.HTTPError(415, reason=error)

    # -- bounded request bodies ---------------------------------------------------------------

    def body_limit(self) -> int:
        """The largest request body accepted, in bytes."""
        return self.config.limits.max_body_bytes

    def body_too_large_message(self) -> str:
        return f"Request body larger than {self.body_limit()} bytes"

    def start_body(self) -> None:
        """Refuse a declared Content-Length over the limit (413) before reading; accept the body."""
        self._body = bytearray()
        self._body_too_large = False
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_large = int(length) > self.body_limit()
            except ValueError:
                raise tornado.web.HTTPError(400, reason="Invalid Content-Length") from None
            if too_large:
                raise tornado.web.HTTPError(413, reason=self.body_too_large_message())

    def data_received(self, chunk: bytes) -> None:
        # Chunked bodies have no Content-Length: count as they arrive, keep nothing past the limit.
        if self._body_too_large:
            return
        if len(self._body) + len(chunk) > self.body_limit():
            self._body_too_large = True
            self._body.clear()
            return
        self._body.extend(chunk)

    def body(self) -> bytes:
        """The whole request body; 413 if it was larger than the limit."""
        if self._body_too_large:
            raise tornado.web.HTTPError(413, reason=self.body_too_large_message())
        return bytes(self._body)

    def json_body(self) -> dict:
        """The request body as a JSON object; 400/413 with a clear message otherwise."""
        body = self.body()
        if not body:
            raise tornado.web.HTTPError(400, reason="Request body must be a JSON object")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            raise tornado.web.HTTPError(400, reason="Request body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise tornado.web.HTTPError(400, reason="Request body must be a JSON object")
        return parsed

    # -- answers ------------------------------------------------------------------------------

    def options(self, *args: Any, **kwargs: Any) -> None:
        # CORS preflight. Without an allowed Origin the browser finds no Allow-Origin and refuses.
        self.set_header("Access-Control-Allow-Methods", self.cors_methods)
        self.set_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON_CONTENT_TYPE)
        self.finish(json.dumps(payload, ensure_ascii=False))

    async def destroy_session(self, session_id: str) -> None:
        """The one destroy path of every endpoint that ends a session."""
        await self.sessions.destroy_async(session_id)
        self.send_json({"success": True, "message": "Session destroyed"})

    def error_message(self, status_code: int) -> str:
        if status_code == 413:
            return self.body_too_large_message()
        return super().error_message(status_code)

    def urls_for(self, session_id: str, viewer_token: str | None = None) -> dict[str, str]:
        """wsUrl / httpStreamUrl as the client should use them (carrying the viewer token, if any)."""
        base = self.public_base_url()
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
