"""HTML pages served by the proxy itself: the embeddable player and the landing page."""

from __future__ import annotations

import json
from importlib import resources

import tornado.web

from ..sessions import SessionNotFound
from .base import ProxyMixin


def _page(name: str) -> str:
    return resources.files("vsproxy.web").joinpath(name).read_text(encoding="utf-8")


class EmbedHandler(ProxyMixin, tornado.web.RequestHandler):
    """GET /stream/{sessionId}/embed[?control=1][&fps=N][&mode=ws|mjpeg]: a player for iframes."""

    def get(self, session_id: str) -> None:
        try:
            session = self.proxy.sessions.get(session_id)
        except SessionNotFound:
            self.set_status(404)
            self.finish("<!doctype html><meta charset=utf-8><title>Session not found</title>"
                        "<body style='font:16px sans-serif;background:#111;color:#eee'>"
                        "<p>Session not found. It may have expired; create a new one.</p>")
            return
        session.touch()
        settings = {
            "sessionId": session.id,
            "wsPath": f"/stream/{session.id}",
            "mjpegPath": f"/stream/{session.id}/mjpeg",
            "control": self.get_query_argument("control", "0") in ("1", "true", "yes"),
            "fps": self.get_query_argument("fps", None),
            "mode": self.get_query_argument("mode", "ws"),
        }
        # json.dumps escapes nothing HTML-dangerous by default; "</" must not end the script.
        blob = json.dumps(settings).replace("</", "<\\/")
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(_page("embed.html").replace("/*{{SETTINGS}}*/null", blob))


class IndexHandler(ProxyMixin, tornado.web.RequestHandler):
    """GET /: what this server is, and a one-click demo session in the embedded player."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(_page("index.html"))


routes = [
    (r"/stream/(?P<session_id>[^/]+)/embed", EmbedHandler),
    (r"/", IndexHandler),
]
