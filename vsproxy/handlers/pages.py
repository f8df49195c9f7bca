"""HTML pages served by the proxy itself: the embeddable player and the landing page."""

from __future__ import annotations

import html
import json
import secrets
from functools import lru_cache
from importlib import resources
from typing import Any

import tornado.web

from ..errors import ClientError
from .base import HandlerMixin, client_message, query_token


@lru_cache(maxsize=8)
def _page(name: str) -> str:
    return resources.files("vsproxy.web").joinpath(name).read_text(encoding="utf-8")


class PageHandler(HandlerMixin, tornado.web.RequestHandler):
    """An HTML page with inline script and style, allowed by a per-response nonce (CSP)."""

    frame_ancestors = "'none'"

    def render_page(self, text: str, status: int = 200) -> None:
        nonce = secrets.token_urlsafe(16)
        host = self.request.host
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Content-Security-Policy", "; ".join([
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "img-src 'self' blob: data:",
            f"connect-src 'self' ws://{host} wss://{host}",
            "frame-src 'self'",  # the landing page shows the embed player in an iframe
            "base-uri 'none'",
            "form-action 'none'",
            f"frame-ancestors {self.frame_ancestors}",
        ]))
        text = text.replace("<script>", f'<script nonce="{nonce}">').replace("<style>", f'<style nonce="{nonce}">')
        self.finish(text)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # A page's errors (a Host not allowed, a path that is not UTF-8, a wrong method) are pages too.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = exc.reason or client_message(exc) if isinstance(exc, tornado.web.HTTPError) else None
        self.error_page(status_code, reason or self.error_message(status_code))

    def error_page(self, status: int, message: str) -> None:
        self.render_page(
            "<!doctype html><meta charset=utf-8><title>vsproxy</title>"
            "<style>body{font:16px sans-serif;background:#111;color:#eee}</style>"
            f"<p>{html.escape(message)}</p>", status)


class EmbedHandler(PageHandler):
    """GET /stream/{sessionId}/embed[?control=1][&fps=N][&mode=ws|mjpeg][&transport=webrtc|ws]: a player
    for iframes.

    ?control=1 forwards keyboard and pointer input if the upstream takes input and (with viewer
    tokens on) the token is a control token. A parent frame may post {"type": "vsproxy:token",
    "token": ...} to hand the player a fresh token.
    """

    @property
    def frame_ancestors(self) -> str:  # type: ignore[override]
        # Meant to be framed by the frontend: who may frame it comes from the configuration.
        return " ".join(self.config.security.frame_ancestors)

    async def get(self, session_id: str) -> None:
        try:
            grant = self.require_viewer(session_id)
            session = await self.sessions.lookup(session_id)
        except ClientError as exc:
            text = "Session not found. It may have expired; create a new one." if exc.status == 404 else str(exc)
            for name, value in exc.headers.items():
                self.set_header(name, value)  # e.g. WWW-Authenticate with a 401
            self.error_page(exc.status, text)
            return
        session.touch()
        ignored: list[str] = []  # options the player cannot take: it says so instead of guessing

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = self.get_query_argument(name, default)
            if value in allowed:
                return value
            ignored.append(f"{name}={value}"[:60])
            return default

        webrtc = self.config.webrtc.enabled
        settings = {
            "sessionId": session.id,
            "wsPath": f"/stream/{session.id}",
            "mjpegPath": f"/stream/{session.id}/mjpeg",
            "control": self.get_query_argument("control", "0") in ("1", "true", "yes"),
            "fps": self.get_query_argument("fps", None),
            "mode": choice("mode", "ws", ("ws", "mjpeg")),
            # H.264 (WebCodecs) where the browser can, else JPEG; "jpeg" or "h264" forces one.
            "codec": choice("codec", "auto", ("auto", "h264", "jpeg")),
            # WebRTC (WHEP) first where possible, then the WebSocket; "webrtc" or "ws" forces one.
            # (With webrtc.enabled false, the WebSocket: ?transport=webrtc is not an option then.)
            "transport": choice("transport", "auto", ("auto", "webrtc", "ws")) if webrtc
            else choice("transport", "ws", ("auto", "ws")) and "ws",
            "ignored": ignored,
            "whepPath": f"/stream/{session.id}/whep",
            "statusPath": f"/stream/{session.id}/status",  # asked when the picture stalls
            "token": query_token(self.request),
            # What ?control=1 can do here: the player says so quietly instead of sending in vain.
            "mayControl": grant.control,
            "acceptsInput": session.hub.accepts_input,
        }
        # json.dumps escapes nothing HTML-dangerous: no "<" may reach the script ("</script>", "<!--").
        blob = json.dumps(settings).replace("<", "\\u003c")
        self.render_page(_page("embed.html").replace("/*{{SETTINGS}}*/null", blob))


class IndexHandler(PageHandler):
    """GET /: what this server is, and a one-click demo session in the embedded player."""

    frame_ancestors = "'self'"

    def get(self) -> None:
        self.render_page(_page("index.html"))


routes = [
    (r"/stream/(?P<session_id>[^/]+)/embed", EmbedHandler),
    (r"/", IndexHandler),
]
