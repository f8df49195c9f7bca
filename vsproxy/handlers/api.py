"""REST API of the original service: sessions (same paths and JSON field names)."""

from __future__ import annotations

import time

from ..errors import RateLimited
from ..sessions import InvalidSessionRequest, iso_utc
from .base import JsonHandler


class SessionCreateHandler(JsonHandler):
    cors_methods = "POST, OPTIONS"
    auth_scope = "api"

    async def post(self) -> None:
        address = self.client_address()
        wait = self.session_create_limiter.check(address)
        if wait:
            raise RateLimited("Too many sessions created from this address; retry later", wait)
        body = self.json_body()
        control = control_flag(body)
        if "upstream" in body and body["upstream"] is None:  # absent means the default; null is a mistake
            raise InvalidSessionRequest("'upstream' must be the name of a configured upstream")
        session = await self.sessions.create_async(body.get("userId"), body.get("robotName"), body.get("upstream"),
                                                   address=address)
        token = self.access.issue_viewer_token(session.id, control=control)
        reply = {
            "success": True,
            "sessionId": session.id,
            **self.urls_for(session.id, token),
            "message": "Streaming session created",
        }
        if token:
            reply["viewerToken"] = token  # the stream and embed URLs need it as ?token=
            reply["expiresAt"] = iso_utc(self.access.viewer_token_expiry(token, session.id))  # renew before
        self.send_json(reply)


def control_flag(body: dict) -> bool:
    """The optional `"control": true|false` of a request body: ask for a token that may also
    send control input (meaningful with viewer tokens on; without them every viewer may)."""
    control = body.get("control", False)
    if not isinstance(control, bool):
        raise InvalidSessionRequest("'control' must be true or false")
    return control


class SessionTokenHandler(JsonHandler):
    """POST /session/{id}/token [{"control": true}]: a fresh viewer token for an existing session,
    for a frontend to hand to a viewer before its token expires (no reconnect needed)."""

    cors_methods = "POST, OPTIONS"
    auth_scope = "api"
    post_takes_body = False  # the body is optional; one that is there must be JSON

    async def post(self, session_id: str) -> None:
        control = control_flag(self.json_body() if self.body() else {})
        session = await self.sessions.lookup(session_id)
        token, expires = self.access.renew_viewer_token(session.id, control=control)
        self.send_json({"success": True, "viewerToken": token, "expiresAt": iso_utc(expires)})


class SessionHandler(JsonHandler):
    auth_scope = "api"

    async def get(self, session_id: str) -> None:
        session = await self.sessions.lookup(session_id)
        session.touch()
        (described,) = await self.sessions.describe([session])
        self.send_json({"success": True, "session": described})

    async def delete(self, session_id: str) -> None:
        await self.destroy_session(session_id)


class SessionDestroyHandler(JsonHandler):
    cors_methods = "POST, OPTIONS"
    auth_scope = "api"
    # The original frontend's destroy is a POST without a body, and such calls (fetch with only
    # `method: "POST"`, jQuery's $.post, navigator.sendBeacon) send no Content-Type or a form one:
    # they keep working. That is safe: the session ID in the path is the capability (128 random
    # bits), which a page elsewhere cannot learn. A body, if any, must still be JSON.
    post_takes_body = False

    async def post(self, session_id: str) -> None:
        await self.destroy_session(session_id)


class SessionsHandler(JsonHandler):
    cors_methods = "GET, OPTIONS"
    auth_scope = "api"

    async def get(self) -> None:
        sessions = await self.sessions.describe(self.sessions.all(), time.time())
        self.send_json({"success": True, "count": len(sessions), "sessions": sessions})


class UpstreamsHandler(JsonHandler):
    cors_methods = "GET, OPTIONS"
    auth_scope = "api"

    def get(self) -> None:
        upstreams = [hub.status() for hub in self.hubs.values()]
        self.send_json({"success": True, "default": self.sessions.default_upstream, "upstreams": upstreams})


_SESSION = r"(?P<session_id>[^/]+)"
routes = [
    (r"/session/create", SessionCreateHandler),
    (rf"/session/{_SESSION}/destroy", SessionDestroyHandler),
    (rf"/session/{_SESSION}/token", SessionTokenHandler),
    (rf"/session/{_SESSION}", SessionHandler),
    (r"/sessions", SessionsHandler),
    (r"/upstreams", UpstreamsHandler),
]
