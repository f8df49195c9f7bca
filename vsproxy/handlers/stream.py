"""Viewer outputs: WebSocket (JSON/base64 or binary), MJPEG and snapshot.

Handlers only parse, check and attach a `hub.Viewer`; the hub decides what each viewer gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, StreamClosedError

from ..auth import TokenBucket, ViewerGrant
from ..errors import AccessDenied, ClientError
from ..outputs import CONNECTED_MESSAGE, MJPEG, WS_FORMATS, Viewer, mjpeg_response_head, status_message
from ..outputs.viewer import H264Viewer
from ..outputs.wire import H264_TRANSPORTS, MP4, mp4_response_head
from ..sessions import Session, iso_utc
from ..sources.base import RelayBudget
from .base import JsonHandler, WebSocketMixin

log = logging.getLogger("vsproxy.stream")

# The WebSocket close code when a viewer's token expires (application range 4000-4999: a client
# can tell it from every protocol code and fetch a fresh token).
TOKEN_EXPIRED_CLOSE_CODE = 4001
# Frames of a GOP depend on each other: an H.264 viewer cannot skip single frames.
H264_FPS_ERROR = "'fps' cannot be used with H.264 (frames of a GOP cannot be skipped)"


def parse_fps(raw: str | None) -> float | None:
    """`?fps=N` caps one viewer's frame rate: a number from 0.1 to 120."""
    if raw is None or raw == "":
        return None
    try:
        fps = float(raw)
    except ValueError:
        fps = float("nan")
    if not 0.1 <= fps <= 120:  # also false for NaN
        raise tornado.web.HTTPError(400, reason="'fps' must be a number from 0.1 to 120")
    return fps


class StreamSocketHandler(WebSocketMixin, tornado.websocket.WebSocketHandler):
    """WS /stream/{sessionId}[?format=binary][&fps=N]: frames out, viewer input relayed upstream.

    Viewer input is bounded three ways: each message by size (Tornado refuses a larger one with
    close 1009 before reading it), and the messages and their bytes by a rate per viewer (an
    error message, then close 1008). With viewer tokens on, the connection lasts only as long as
    its token (renewable with a {"type": "token"} message), and only a control token may send
    input upstream.
    """

    session: Session
    grant: ViewerGrant
    viewer: Viewer | None = None
    _expiry_timer: asyncio.TimerHandle | None = None
    _told_no_input = False

    @property
    def max_message_size(self) -> int:
        # What is never relayed is never read: a frame header announcing more closes with 1009.
        return self.config.streaming.max_viewer_message_bytes

    async def get(self, session_id: str, *args: Any, **kwargs: Any) -> None:
        try:
            self.grant = self.require_viewer(session_id)
            self.session = await self.sessions.lookup(session_id)
        except ClientError as exc:
            return self.refuse_client_error(exc)
        fmt = self.get_query_argument("format", "json")
        if fmt not in WS_FORMATS:
            return self.refuse(400, "'format' must be " + " or ".join(f"'{f}'" for f in WS_FORMATS))
        try:
            self.max_fps = parse_fps(self.get_query_argument("fps", None))
        except tornado.web.HTTPError as exc:
            return self.refuse(400, exc.reason or "bad fps")
        self.transport = WS_FORMATS[fmt]
        if self.max_fps and self.transport in H264_TRANSPORTS:
            return self.refuse(400, H264_FPS_ERROR)
        await super().get(session_id, *args, **kwargs)

    async def open(self, session_id: str) -> None:
        try:
            await self.sessions.reserve_viewer(self.session)  # in a cluster: its place, in Redis
        except ClientError as exc:
            self.close(1013, str(exc)[:120])  # "try again later"
            return
        connection = self.ws_connection
        if connection is None or connection.is_closing():  # the client left meanwhile (or hung up at once)
            self.sessions.unreserve_viewer(self.session)
            return
        self._text = RelayBudget(self.unread_text)  # text written to this viewer that it has not read yet
        limits = self.config.limits
        self.message_bucket = TokenBucket(limits.viewer_message_rate, limits.viewer_message_burst)
        self.byte_bucket = TokenBucket(limits.viewer_input_bytes_rate, limits.viewer_input_bytes_burst)
        self.set_nodelay(True)  # a frame's last segment should not wait for an ACK (Nagle)
        self._send_text(CONNECTED_MESSAGE)
        if connection.is_closing():  # the hello found the connection gone
            self.sessions.unreserve_viewer(self.session)
            return
        stream = connection.stream
        stats = self.session.hub.stats[self.transport]
        if self.transport in H264_TRANSPORTS:
            self.viewer = H264Viewer(stream, self.transport, stats, close=self._close_viewer,
                                     send_text=self._send_text)
        else:
            self.viewer = Viewer(stream, self.transport, stats, close=self._close_viewer,
                                 send_text=self._send_text, max_fps=self.max_fps)
        try:
            self.sessions.add_viewer(self.session, self.viewer)
        except ClientError as exc:  # a cluster's session destroyed while its place was taken
            self.viewer = None
            self.close(1001, str(exc)[:120])
            return
        self._schedule_expiry()

    def on_message(self, message: str | bytes) -> None:
        if self.viewer is None:
            return
        self.session.touch()
        # Bytes, not characters: Tornado decoded the text from UTF-8 (isascii is O(1) in CPython).
        size = len(message) if isinstance(message, bytes) or message.isascii() else len(message.encode())
        if not self.message_bucket.take():
            return self._refuse_input("Too many messages; closing", "message rate limit exceeded")
        if not self.byte_bucket.take(cost=size):
            rate = self.config.limits.viewer_input_bytes_rate
            return self._refuse_input(f"Too much input (more than {rate} bytes/s); closing",
                                      "input byte rate limit exceeded")
        if self.grant.expires is not None and self._renew_token(message):
            return
        hub = self.session.hub
        if not hub.accepts_input:
            if not self._told_no_input:  # once per connection: it will not change
                self._told_no_input = True
                self._send_text(status_message(
                    "status", f"Upstream '{hub.name}' ({hub.source.kind}) does not accept input; "
                              "messages are not relayed"))
            return
        if not self.grant.control:
            self._send_text(status_message(
                "error", "This viewer may not send control input (its viewer token grants watching only); "
                         "not relayed"))
            return
        if not hub.send_upstream(message):
            self._send_text(status_message(
                "error", "Message not delivered: the upstream is not connected or not keeping up"))

    def _refuse_input(self, message: str, close_reason: str) -> None:
        self._send_text(status_message("error", message))
        self._detach_viewer()
        stream = self.ws_connection.stream if self.ws_connection is not None else None
        self.close(1008, close_reason)
        if stream is None or stream.closed():
            return
        # A flooding client need never answer our Close frame, and Tornado would read, unmask and
        # decode whatever it sends for 5 s more: hang up as soon as the Close frame is written.
        try:
            flushed = stream.write(b"")
        except StreamClosedError:
            return

        def hang_up(done: asyncio.Future) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: a stream closed meanwhile is what we want anyway
            stream.close()
        flushed.add_done_callback(hang_up)

    # -- viewer tokens: the connection lasts as long as its token -------------------------------

    def _renew_token(self, message: str | bytes) -> bool:
        """A {"type": "token", "token": "..."} message replaces this viewer's token if it is valid
        for this session (else the old one stays). True if `message` was one (never relayed)."""
        if not isinstance(message, str) or len(message) > 4096 or '"token"' not in message:
            return False
        try:
            parsed = json.loads(message)
        except ValueError:
            return False
        if not isinstance(parsed, dict) or parsed.get("type") != "token":
            return False
        token = parsed.get("token")
        try:
            if not isinstance(token, str):
                raise AccessDenied("Viewer token required")
            grant = self.access.require_viewer(self.session.id, token, None)
        except AccessDenied as exc:
            until = iso_utc(self.grant.expires or 0)
            self._send_text(status_message("error", f"{exc}; the current token stays valid until {until}"))
            return True
        self.grant = grant
        self._schedule_expiry()
        scope = "watching and control" if grant.control else "watching"
        self._send_text(status_message(
            "status", f"Viewer token renewed ({scope}); valid until {iso_utc(grant.expires or 0)}"))
        return True

    def _schedule_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self.grant.expires is not None:
            delay = max(0.0, self.grant.expires - time.time())
            self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry_timer = None
        if self.viewer is None:
            return
        log.info("viewer token expired, closing the viewer", extra={"session": self.session.id})
        self._send_text(status_message("error", "Viewer token expired"))
        self._detach_viewer()
        self.close(TOKEN_EXPIRED_CLOSE_CODE, "viewer token expired")

    # -- the rest -------------------------------------------------------------------------------

    def on_close(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._detach_viewer()

    def _send_text(self, text: str) -> None:
        # Within a budget of text the viewer has not read yet: the upstream's text (telemetry,
        # as fast as a publisher sends it) beyond it is dropped for this viewer, not buffered
        # without bound (with no frame flowing, no stall timeout would ever end it).
        self._text.send(self.write_message, text)

    def _close_viewer(self, reason: str) -> None:
        # Off the hub first: no frame may follow our Close frame (RFC 6455 5.5.1), even while
        # Tornado waits for the client's reply. 1001 "going away" for shutdown/destroy.
        self._detach_viewer()
        self.close(1001, reason[:120])

    def _detach_viewer(self) -> None:
        # Once off the hub, nothing more is relayed either (Tornado still delivers messages that
        # arrive before the client answers our Close frame).
        viewer, self.viewer = self.viewer, None
        if viewer is not None:
            self.sessions.remove_viewer(self.session, viewer)


class DetachedStreamHandler(JsonHandler):
    """An endless HTTP response of one transport (MJPEG, fragmented MP4).

    After the checks the connection is detached from Tornado's HTTP layer so every part is the
    same pre-built bytes for every viewer (no per-viewer chunk framing).
    """

    transport = MJPEG

    def response_head(self, extra_headers: list[str]) -> bytes:
        raise NotImplementedError

    def make_viewer(self, stream: IOStream, session: Session) -> Viewer:
        raise NotImplementedError

    async def get(self, session_id: str) -> None:
        grant = self.require_viewer(session_id)
        session = await self.sessions.lookup(session_id)
        await self.sessions.reserve_viewer(session)  # 503 if there is no room; in a cluster: in Redis
        cors = [f"Access-Control-Allow-Origin: {self.request.headers['Origin']}", "Vary: Origin"] \
            if self.origin_allowed() else []
        # As WebSocketHandler._detach_stream does: take the raw stream and mark the request
        # finished, so Tornado writes nothing more for it.
        self._finished = True
        stream: IOStream = self.request.connection.detach()  # type: ignore[attr-defined]
        if stream.closed():  # the client hung up before its response began
            self.sessions.unreserve_viewer(session)
            return
        closed = asyncio.get_running_loop().create_future()
        stream.set_close_callback(lambda: closed.done() or closed.set_result(None))
        viewer = self.make_viewer(stream, session)
        try:
            await stream.write(self.response_head(cors))
        except StreamClosedError:
            self.sessions.unreserve_viewer(session)
            return
        try:
            # The session may have been destroyed, or filled up, while the headers went out.
            self.sessions.add_viewer(session, viewer)
        except ClientError:
            stream.close()
            return
        stream.set_nodelay(True)  # a frame's last segment should not wait for an ACK (Nagle)
        asyncio.ensure_future(_discard_input(stream))  # notices a client that goes away at once
        expiry = None
        if grant.expires is not None:  # the response ends when the viewer token expires
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, grant.expires - time.time()), _end_stream, session, viewer, stream)
        try:
            await closed
        finally:
            if expiry is not None:
                expiry.cancel()
            self.sessions.remove_viewer(session, viewer)
            self.application.log_request(self)  # access log and request metrics, as for any request


def _end_stream(session: Session, viewer: Viewer, stream: IOStream) -> None:
    log.info("viewer token expired, closing the viewer", extra={"session": session.id})
    session.hub.remove_viewer(viewer)  # no part may start after this one
    stream.close()


class MjpegHandler(DetachedStreamHandler):
    """GET /stream/{sessionId}/mjpeg[?fps=N]: multipart/x-mixed-replace for a plain <img>."""

    transport = MJPEG

    def prepare(self) -> None:
        super().prepare()
        self.max_fps = parse_fps(self.get_query_argument("fps", None))

    def response_head(self, extra_headers: list[str]) -> bytes:
        return mjpeg_response_head(extra_headers)

    def make_viewer(self, stream: IOStream, session: Session) -> Viewer:
        return Viewer(stream, MJPEG, session.hub.stats[MJPEG], close=lambda reason: stream.close(),
                      max_fps=self.max_fps)


class Mp4Handler(DetachedStreamHandler):
    """GET /stream/{sessionId}/stream.mp4: fragmented MP4 (H.264) for `<video src>`, ffmpeg, VLC;
    it starts at a keyframe, with one fragment per frame."""

    transport = MP4

    def prepare(self) -> None:
        super().prepare()
        if self.get_query_argument("fps", None):
            raise tornado.web.HTTPError(400, reason=H264_FPS_ERROR)

    def response_head(self, extra_headers: list[str]) -> bytes:
        return mp4_response_head(extra_headers)

    def make_viewer(self, stream: IOStream, session: Session) -> Viewer:
        return H264Viewer(stream, MP4, session.hub.stats[MP4], close=lambda reason: stream.close())


async def _discard_input(stream: IOStream) -> None:
    try:
        while True:
            await stream.read_bytes(4096, partial=True)
    except StreamClosedError:
        pass


class SnapshotHandler(JsonHandler):
    """GET /stream/{sessionId}/snapshot.jpg: the latest frame as one JPEG."""

    async def get(self, session_id: str) -> None:
        self.require_viewer(session_id)
        session = await self.sessions.lookup(session_id)
        session.touch()
        # A snapshot wants the upstream as a viewer would: run here for it if nothing else does
        # (a cluster node with no viewers of it relays it from the origin, or becomes the origin).
        frame = await session.hub.fresh_snapshot(run=True)
        if frame is None:
            raise tornado.web.HTTPError(503, reason="No frame received from the upstream yet")
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("X-Frame-Seq", str(frame.seq))
        self.set_header("X-Timestamp", f"{frame.timestamp:.6f}")
        self.finish(frame.jpeg)


class StreamStatusHandler(JsonHandler):
    """GET /stream/{sessionId}/status: whether a viewer may still watch the session, with only what
    a viewer has (its viewer token, where tokens are on; never the API token): 200 while it may, 404
    once the session is gone, 401/403 for a missing or expired token (checked first, as on every
    stream endpoint: without a valid token nobody learns whether the session exists). What a
    player asks when its picture stalls."""

    cors_methods = "GET, OPTIONS"

    async def get(self, session_id: str) -> None:
        grant = self.require_viewer(session_id)
        session = await self.sessions.lookup(session_id)  # no touch: asking is not watching
        self.send_json({"success": True, "sessionId": session.id,
                        "expiresAt": None if grant.expires is None else iso_utc(grant.expires)})


_SESSION = r"(?P<session_id>[^/]+)"
routes = [
    (rf"/stream/{_SESSION}/status", StreamStatusHandler),
    (rf"/stream/{_SESSION}/mjpeg", MjpegHandler),
    (rf"/stream/{_SESSION}/stream\.mp4", Mp4Handler),
    (rf"/stream/{_SESSION}/snapshot\.jpg", SnapshotHandler),
    (rf"/stream/{_SESSION}", StreamSocketHandler),
]
