"""The Isaac Sim WebSocket upstream (the original service's path).

Binary messages are JPEG frames; a text message {"type": "frame", "data": <base64>} is a frame
too; any other text message is relayed to the viewers unchanged. Viewer messages go upstream.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tornado import httpclient, httputil
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketProtocol13

from ..errors import DescribedError
from ..schema import check_headers, header_problem, setting
from .base import FrameTimeout, HubLink, RelayBudget, Source, url_address

if TYPE_CHECKING:
    from ..config import ReconnectConfig


@dataclass(frozen=True)
class IsaacUpstream:
    """An Isaac Sim WebSocket stream (binary JPEG messages, or {"type": "frame", "data": base64})."""

    url: str = setting("", doc="`ws://` or `wss://` URL of the stream")
    headers: dict = setting(factory=dict, doc="extra handshake headers (never logged; no line breaks: "
                                                   "as `isaac_sim.headers`)")


class IsaacSource(Source):
    kind = "isaac"
    settings_class = IsaacUpstream
    url_schemes = ("ws://", "wss://")
    accepts_input = True

    @classmethod
    def check_settings(cls, settings: IsaacUpstream, key: str) -> None:
        check_headers(f"{key}.headers", settings.headers)

    def __init__(self, name: str, settings: IsaacUpstream, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.url = settings.url
        self.address = url_address(settings.url)
        self.headers = dict(settings.headers)
        self._conn: WebSocketClientConnection | None = None
        self._relay = RelayBudget()

    async def run(self, hub: HubLink) -> None:
        rc = self.reconnect
        request = HTTPRequest(
            self.url,
            headers=self.headers,
            connect_timeout=rc.connect_timeout_seconds,
            request_timeout=rc.connect_timeout_seconds,
        )
        ping = rc.ping_interval_seconds or None
        try:
            conn = await _websocket_connect(
                request,
                ping_interval=ping,
                ping_timeout=ping,  # Tornado caps the timeout at the interval
                max_message_size=rc.max_message_bytes,
            )
        except (ValueError, UnicodeError) as exc:
            if isinstance(exc, OSError):  # ssl.SSLCertVerificationError is a ValueError too
                raise
            raise self._request_error(exc) from None
        self._conn = conn
        try:
            hub.set_connected()
            await self._read_loop(conn, hub, rc.frame_timeout_seconds)
        finally:
            if self._conn is conn:  # a newer run may already have connected (stop/start overlap)
                self._conn = None
            self._relay.abandon(conn.protocol.stream if conn.protocol is not None else None)
            conn.close()

    def _request_error(self, exc: Exception) -> DescribedError:
        """What made the handshake request impossible to send, in words that never quote a header
        value: Tornado's own error quotes the offending header line, token and all, and it
        would become lastError (shown on /health, /upstreams, the dashboard and to viewers)."""
        for name, value in self.headers.items():
            problem = header_problem(name, value)
            if problem is not None:
                return DescribedError(f"cannot send the WebSocket handshake: {problem}")
        return DescribedError(f"cannot send the WebSocket handshake ({type(exc).__name__}; its message is not "
                              "shown, as it may quote a header)")

    async def _read_loop(self, conn: WebSocketClientConnection, hub: HubLink, frame_timeout: float) -> None:
        last_frame = time.monotonic()
        while True:
            remaining = frame_timeout - (time.monotonic() - last_frame)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as a message completes, and then the hub could never stop this source.
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    message = await conn.read_message()
            except TimeoutError:
                raise FrameTimeout(f"no frame for {frame_timeout:g} s") from None
            if message is None:
                reason = conn.close_reason or (f"code {conn.close_code}" if conn.close_code else "")
                raise ConnectionError("upstream closed the connection" + (f" ({reason})" if reason else ""))
            if isinstance(message, bytes):
                hub.publish(message)
                last_frame = time.monotonic()
                continue
            jpeg = _frame_from_text(message)
            if jpeg is not None:
                hub.publish(jpeg)
                last_frame = time.monotonic()
            else:
                hub.relay_text(message)

    def send(self, message: str | bytes) -> bool:
        conn = self._conn
        return conn is not None and self._relay.send(conn.write_message, message)


class WebSocketHandshakeError(Exception):
    """The upstream answered the WebSocket upgrade (101) with headers that do not complete it."""


class _CheckedConnection(WebSocketClientConnection):
    """Tornado's WebSocket client, except that a wrong handshake answer fails the connection
    attempt with a `WebSocketHandshakeError` saying what was wrong. Tornado checks those headers
    with `assert` inside its HTTP delegate, so a bad Sec-WebSocket-Accept logs an "Uncaught
    exception" traceback on every attempt and the caller sees only "Stream is closed"."""

    async def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        if isinstance(start_line, httputil.ResponseStartLine) and start_line.code == 101:
            problem = _handshake_problem(self.key, headers)
            if problem is not None:
                if not self.connect_future.done():
                    self.connect_future.set_exception(WebSocketHandshakeError(problem))
                # Take the socket from the HTTP layer and close it: Tornado then neither reads a
                # body from it nor reports anything more (raising here would log a line of its own).
                self.connection.detach().close()
                return
        await super().headers_received(start_line, headers)
        if self.connect_future.cancelled():
            # Nobody waits for this connection any more (the hub stopped while the upstream was
            # answering): nothing would read or close it, and it would hold the upstream's one
            # client place until a ping timed out (forever with pings off).
            self.close()


def _handshake_problem(key: bytes, headers: httputil.HTTPHeaders) -> str | None:
    """What makes a 101 answer an incomplete handshake (Tornado's own checks), or None."""
    if headers.get("Upgrade", "").lower() != "websocket":
        return "no 'Upgrade: websocket' header in the upstream's 101 answer"
    if headers.get("Connection", "").lower() != "upgrade":
        return "no 'Connection: Upgrade' header in the upstream's 101 answer"
    if headers.get("Sec-WebSocket-Accept") != WebSocketProtocol13.compute_accept_value(key):
        return "bad Sec-WebSocket-Accept header (not the answer to our Sec-WebSocket-Key)"
    if headers.get("Sec-WebSocket-Extensions"):  # we offer none (no compression)
        return "the upstream chose a WebSocket extension that was not offered"
    return None


def _websocket_connect(request: HTTPRequest, **kwargs: Any) -> asyncio.Future[WebSocketClientConnection]:
    """`tornado.websocket.websocket_connect`, with `_CheckedConnection` (same steps as Tornado's)."""
    request.headers = httputil.HTTPHeaders(request.headers)
    request = cast(HTTPRequest, httpclient._RequestProxy(request, HTTPRequest._DEFAULTS))
    return _CheckedConnection(request, **kwargs).connect_future


def _frame_from_text(message: str) -> bytes | None:
    """The JPEG inside a {"type": "frame", "data": <base64>} message, else None."""
    if '"frame"' not in message[:200]:
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("type") != "frame" or not isinstance(parsed.get("data"), str):
        return None
    try:
        return binascii.a2b_base64(parsed["data"])
    except (binascii.Error, ValueError):
        return None


SOURCE = IsaacSource
