"""Publisher inputs of `push` upstreams: WS /ingest/{upstream} and POST /ingest/{upstream}/frame.

Both authenticate with the upstream's publish token, `Authorization: Bearer <token>` or
`?token=<token>` (browsers cannot set headers on a WebSocket), compared in constant time; a
token never reaches a log line (the access log has the path only, and so do the request
summaries below, which Tornado puts in its exception logs). Checks, in order: 404 no push
upstream of that name, 401 missing or wrong token, 409 (WebSocket) another publisher attached,
413 frame larger than the upstream's `max_frame_bytes`, 400 not a JPEG. In a cluster, a publisher
makes its node the upstream's origin: a WebSocket publisher gets 409 when another node has the
upstream's publisher (one at a time, cluster-wide), 503 when Redis cannot be reached to know. A
POSTed frame that passed every check here goes to the node that has the publisher, whose answer
the publisher gets (cluster/ingest.py): so a POSTing publisher may reach any node, frame by frame.

WebSocket publishers send binary JPEG messages; a frame that is not a JPEG is dropped with a
`{"type": "error", "message": ...}` text message (the connection stays open), an oversized one
closes the connection with 1009 before it is read. Text messages are telemetry, relayed to the
upstream's WebSocket viewers unchanged. The server sends the publisher
`{"type": "status", "active": bool, ...}` when viewers start or stop wanting frames, and relays
viewers' messages to it (text wrapped as {"type": "viewer", "data": ...}: see PushSource.send).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import tornado.web
import tornado.websocket

from ..auth import bearer_token
from ..errors import ClientError, PublishedElsewhere
from ..outputs import status_message
from ..sources.base import RelayBudget
from ..sources.push import FrameRejected, PushSource
from .base import JsonHandler, WebSocketMixin, query_token

if TYPE_CHECKING:
    from ..hub import FrameHub

log = logging.getLogger("vsproxy.ingest")

BEARER_CHALLENGE = 'Bearer realm="vsproxy ingest"'


def find_push_upstream(hubs: dict[str, FrameHub], name: str) -> tuple[FrameHub, PushSource] | None:
    hub = hubs.get(name)
    if hub is None or not isinstance(hub.source.underlying, PushSource):
        return None
    return hub, hub.source.underlying


async def check_publisher_here(hub: FrameHub) -> None:
    """In a cluster, a publisher makes its node the upstream's origin: PublishedElsewhere (409)
    when another node has the upstream's publisher, ClusterUnavailable (503) when Redis cannot say."""
    problem = await hub.source.publisher_arriving()
    if problem is not None:
        raise PublishedElsewhere(problem)


def not_found_message(name: str) -> str:
    # The same answer for "no such upstream" and "not a push upstream".
    return f"No push upstream named {name[:64]!r}"


def presented_token(handler: tornado.web.RequestHandler) -> str | None:
    """The token of `Authorization: Bearer <token>`, else of `?token=`; None if neither is there.

    An Authorization header that is not a Bearer one counts as a wrong token (never falls back).
    """
    header = handler.request.headers.get("Authorization")
    if header is not None:
        return bearer_token(header) or ""
    return query_token(handler.request)


class IngestSocketHandler(WebSocketMixin, tornado.websocket.WebSocketHandler):
    """WS /ingest/{upstream}: the one WebSocket publisher of a push upstream."""

    hub: FrameHub
    source: PushSource
    attached = False
    _warned_bad_frame = False

    @property
    def max_message_size(self) -> int:
        # Tornado closes with 1009 as soon as a frame header announces more, before reading it;
        # a binary message between max_frame_bytes and this is closed with 1009 in on_message.
        return max(self.source.max_frame_bytes, self.config.streaming.max_viewer_message_bytes)

    async def get(self, upstream: str, *args: Any, **kwargs: Any) -> None:
        found = find_push_upstream(self.hubs, upstream)
        if found is None:
            return self.refuse(404, not_found_message(upstream))
        hub, source = found
        if not source.token_ok(presented_token(self)):
            log.warning("publisher refused from %s: missing or wrong token", self.request.remote_ip,
                        extra={"upstream": hub.name})
            return self.refuse(401, "Missing or wrong publish token", {"WWW-Authenticate": BEARER_CHALLENGE})
        error = self.handshake_error()  # before the lease: a request that will not be a publisher takes none
        if error is not None:
            return self.refuse(*error)
        try:
            await check_publisher_here(hub)
        except ClientError as exc:
            log.warning("publisher refused from %s: %s", self.request.remote_ip, exc, extra={"upstream": hub.name})
            return self.refuse_client_error(exc)
        if source.publisher is not None:
            log.warning("publisher refused from %s: another publisher is connected", self.request.remote_ip,
                        extra={"upstream": hub.name})
            return self.refuse(409, f"Another publisher is already connected to upstream '{hub.name}' "
                                     "(one at a time)")
        self.hub, self.source = hub, source
        await super().get(upstream, *args, **kwargs)

    def open(self, upstream: str, *args: Any, **kwargs: Any) -> None:
        self._relay = RelayBudget()  # viewers' messages this publisher has not read yet
        # No await between the 409 check in get() and here, so two publishers cannot both pass;
        # this is only a safety net.
        if not self.source.attach(self.hub, self):
            self.close(1008, "another publisher is already connected")
            return
        self.attached = True
        log.info("publisher connected from %s", self.request.remote_ip, extra={"upstream": self.hub.name})

    def on_message(self, message: str | bytes) -> None:
        if not self.attached or self.source.publisher is not self:  # disconnected by the server
            return
        if isinstance(message, bytes):
            try:
                self.source.publish(self.hub, message)
            except FrameRejected as exc:
                if exc.status == 413:
                    self.close(1009, "frame too big")
                    return
                if not self._warned_bad_frame:  # once per connection: a broken publisher repeats itself
                    self._warned_bad_frame = True
                    log.warning("publisher frame refused: %s", exc, extra={"upstream": self.hub.name})
                self.send_to_publisher(status_message("error", f"{exc}; frame dropped"))
            return
        limit = self.config.streaming.max_viewer_message_bytes
        if len(message) > limit:
            self.send_to_publisher(status_message(
                "error", f"Text message too large ({len(message)} characters, limit {limit}); not relayed"))
            return
        self.hub.relay_text(message)  # telemetry for the viewers

    def on_close(self) -> None:
        if self.attached:
            self.attached = False
            was_attached = self.source.publisher is self
            self.source.detach(self)
            if was_attached:
                code = f" (code {self.close_code})" if self.close_code else ""
                log.info("publisher disconnected%s", code, extra={"upstream": self.hub.name})

    # -- PublisherLink, used by PushSource ---------------------------------------------------

    def send_to_publisher(self, message: str | bytes) -> bool:
        return self._relay.send(self.write_message, message)

    def disconnect(self, code: int, reason: str) -> None:
        log.info("publisher disconnected by the server: %s", reason, extra={"upstream": self.hub.name})
        self._relay.abandon(self.ws_connection.stream if self.ws_connection is not None else None)
        self.close(code, reason[:120])


class IngestFrameHandler(JsonHandler):
    """POST /ingest/{upstream}/frame: publish one JPEG (the request body); answers {"success", "seq"}.

    The body limit is the upstream's `max_frame_bytes`, not `limits.max_body_bytes` (which is
    sized for JSON): too large a Content-Length is refused before the body is read, a chunked
    body is counted as it arrives and nothing past the limit is kept.
    """

    cors_methods = "POST, OPTIONS"
    unauthorized_reason = "Missing or wrong publish token"
    hub: FrameHub
    source: PushSource

    def prepare(self) -> None:
        self._body = bytearray()
        self._body_too_large = True  # discard whatever arrives until every check has passed
        self.check_host()
        if self.request.method == "OPTIONS":
            return
        upstream = self.path_kwargs.get("upstream", "")
        found = find_push_upstream(self.hubs, upstream)
        if found is None:
            raise tornado.web.HTTPError(404, reason=not_found_message(upstream))
        self.hub, self.source = found
        if not self.authorized():
            log.warning("frame refused from %s: %s", self.request.remote_ip, self.unauthorized_reason.lower(),
                        extra={"upstream": self.hub.name})
            raise tornado.web.HTTPError(401, reason=self.unauthorized_reason)
        self.start_body()

    def authorized(self) -> bool:
        """The request carries the upstream's publish token."""
        return self.source.token_ok(presented_token(self))

    async def elsewhere(self, frame: bytes, captured: float | None) -> tuple[int, dict] | None:
        """In a cluster, a frame for the node that has the upstream's publisher goes there: that
        node's answer (status, JSON body); None: publish it here (cluster/ingest.py)."""
        return await self.hub.source.post_elsewhere(frame, captured)

    def body_limit(self) -> int:
        return self.source.max_frame_bytes

    def body_too_large_message(self) -> str:
        return f"Frame larger than the limit of {self.body_limit()} bytes"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 401:  # send_error cleared the headers set before raising
            self.set_header("WWW-Authenticate", BEARER_CHALLENGE)
        super().write_error(status_code, **kwargs)

    async def post(self, upstream: str) -> None:
        frame = self.body()
        if not frame:
            raise tornado.web.HTTPError(400, reason="Request body must be one JPEG frame (Content-Type: image/jpeg)")
        captured = self.request.headers.get("X-Capture-Timestamp")
        try:
            stamp = float(captured) if captured is not None else None
        except ValueError:
            raise tornado.web.HTTPError(400, reason="X-Capture-Timestamp must be Unix seconds, e.g. "
                                                    "1764558000.123") from None
        if stamp is not None and not math.isfinite(stamp):
            raise tornado.web.HTTPError(400, reason="X-Capture-Timestamp must be a finite number")
        try:
            self.source.check_frame(frame)  # before it may go to another node: a bad frame never does
            answer = await self.elsewhere(frame, stamp)
            if answer is not None:
                self.send_json(answer[1], answer[0])
                return
            seq = self.source.publish(self.hub, frame, posted=True, captured=stamp)
        except FrameRejected as exc:
            raise tornado.web.HTTPError(exc.status, reason=str(exc)) from None
        finally:
            self._body = bytearray()
        self.send_json({"success": True, "seq": seq, "active": self.source.active})


_UPSTREAM = r"(?P<upstream>[^/]+)"
routes = [
    (rf"/ingest/{_UPSTREAM}/frame", IngestFrameHandler),
    (rf"/ingest/{_UPSTREAM}", IngestSocketHandler),
]
