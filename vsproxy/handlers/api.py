"""REST API of the original service: sessions (same paths and JSON field names)."""

from __future__ import annotations

import time

from .base import JsonHandler


class SessionCreateHandler(JsonHandler):
    cors_methods = "POST, OPTIONS"

    def post(self) -> None:
        body = self.json_body()
        session = self.proxy.sessions.create(body.get("userId"), body.get("robotName"), body.get("upstream"))
        self.send_json({
            "success": True,
            "sessionId": session.id,
            **self.urls_for(session.id),
            "message": "Streaming session created",
        })


class SessionHandler(JsonHandler):
    def get(self, session_id: str) -> None:
        session = self.proxy.sessions.get(session_id)
        session.touch()
        self.send_json({"success": True, "session": session.to_json()})

    def delete(self, session_id: str) -> None:
        self.proxy.sessions.destroy(session_id)
        self.send_json({"success": True, "message": "Session destroyed"})


class SessionDestroyHandler(JsonHandler):
    cors_methods = "POST, OPTIONS"

    def post(self, session_id: str) -> None:
        self.proxy.sessions.destroy(session_id)
        self.send_json({"success": True, "message": "Session destroyed"})


class SessionsHandler(JsonHandler):
    cors_methods = "GET, OPTIONS"

    def get(self) -> None:
        now = time.time()
        sessions = [s.to_json(now) for s in self.proxy.sessions.all()]
        self.send_json({"success": True, "count": len(sessions), "sessions": sessions})


class UpstreamsHandler(JsonHandler):
    cors_methods = "GET, OPTIONS"

    def get(self) -> None:
        upstreams = [hub.status() for hub in self.proxy.hubs.values()]
        self.send_json({"success": True, "default": self.proxy.sessions.default_upstream, "upstreams": upstreams})


_SESSION = r"(?P<session_id>[^/]+)"
routes = [
    (r"/session/create", SessionCreateHandler),
    (rf"/session/{_SESSION}/destroy", SessionDestroyHandler),
    (rf"/session/{_SESSION}", SessionHandler),
    (r"/sessions", SessionsHandler),
    (r"/upstreams", UpstreamsHandler),
]
