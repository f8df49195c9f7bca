"""WHEP (draft-ietf-wish-whep): WebRTC playback of a session over plain HTTP.

`POST /stream/{sessionId}/whep` with an SDP offer creates a peer (201, the SDP answer, a
`Location` naming the peer's resource, an `ETag`, and the ICE servers as `Link` headers);
`DELETE` on that resource ends it, and a `POST` to it with a fresh viewer token keeps it until that
token's expiry (as a `{"type": "token"}` message does for a WebSocket viewer). Trickle ICE (`PATCH`)
is not supported (405): the answer carries every host candidate. The peer itself lives in
`vsproxy/outputs/webrtc.py`.
"""

from __future__ import annotations

import tornado.web

from ..auth import ViewerTokensOff
from ..errors import ClientError, WebRtcDisabled
from ..outputs.wire import WEBRTC
from ..sessions import iso_utc
from .base import JsonHandler, write_json_error

SDP_CONTENT_TYPE = "application/sdp"
EXPOSED_HEADERS = "Location, ETag, Link"


def ice_server_links(ice_servers: list[dict]) -> list[str]:
    """The `Link` header values announcing ICE servers to a WHEP client (the draft's
    rel="ice-server", credentials as username/credential parameters)."""
    links = []
    for server in ice_servers:
        urls = [server["urls"]] if isinstance(server["urls"], str) else server["urls"]
        for url in urls:
            link = f'<{url}>; rel="ice-server"'
            if server.get("username"):
                link += f'; username="{server["username"]}"; credential="{server.get("credential", "")}"'
                link += '; credential-type="password"'
            links.append(link)
    return links


class WhepHandler(JsonHandler):
    """POST /stream/{sessionId}/whep: an SDP offer in, a WebRTC peer and its SDP answer out."""

    cors_methods = "POST, OPTIONS"

    def check_post_content_type(self) -> None:
        # WHEP offers are application/sdp, never JSON. That still makes a browser ask first (it is
        # not a CORS "simple" content type), so only configured origins may post from a page.
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != SDP_CONTENT_TYPE:
            raise tornado.web.HTTPError(415, reason=f"Content-Type must be {SDP_CONTENT_TYPE}")

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)

    async def options(self, session_id: str) -> None:  # type: ignore[override]
        super().options(session_id)
        # The ICE servers may carry TURN credentials: the preflight names them only to whoever may
        # watch this session (it exists, and the request has its viewer token when tokens are on),
        # as the POST's answer does. Anyone else gets a plain preflight, never an error: the POST
        # that follows says what is wrong.
        if not self.config.webrtc.ice_servers:
            return
        try:
            self.require_viewer(session_id)
            await self.sessions.lookup(session_id)
        except ClientError:
            return
        for link in ice_server_links(self.config.webrtc.ice_servers):
            self.add_header("Link", link)

    async def post(self, session_id: str) -> None:
        if not self.config.webrtc.enabled:
            raise WebRtcDisabled("WebRTC is disabled on this server (webrtc.enabled: false)")
        grant = self.require_viewer(session_id)
        session = await self.sessions.lookup(session_id)
        await self.sessions.reserve_viewer(session)  # 503 if there is no room; in a cluster: in Redis
        try:
            try:
                offer = self.body().decode("utf-8")
            except UnicodeDecodeError:
                raise tornado.web.HTTPError(400, reason="The SDP offer is not UTF-8 text") from None
            hub = session.hub
            config = hub.h264_config
            peer, answer = await self.whep.answer(
                offer, session_id, hub.stats[WEBRTC], config.codec if config else None,
                on_close=lambda p, reason: self.sessions.remove_viewer(session, p),
                request_keyframe=hub.request_keyframe)
        except BaseException:  # no peer: its place is free again
            self.sessions.unreserve_viewer(session)
            raise
        try:
            # The session may have been destroyed, or filled up, while the answer was made.
            self.sessions.add_viewer(session, peer)
        except ClientError:
            peer.close("session gone before the answer")
            raise
        peer.expire_at(grant.expires)  # the peer ends when its viewer token expires
        self.set_status(201)
        self.set_header("Content-Type", SDP_CONTENT_TYPE)
        self.set_header("Location", f"/stream/{session_id}/whep/{peer.id}")
        self.set_header("ETag", peer.etag)
        for link in ice_server_links(self.config.webrtc.ice_servers):
            self.add_header("Link", link)
        self.finish(answer)


class WhepResourceHandler(JsonHandler):
    """DELETE /stream/{sessionId}/whep/{resourceId}: end a WHEP peer; POST with a fresh viewer
    token: the peer lasts until that token expires. The resource id (128 random bits, known only
    to whoever made the peer) is the capability; PATCH (trickle ICE) is 405."""

    cors_methods = "POST, DELETE, OPTIONS"
    post_takes_body = False  # the token comes as ?token= or Bearer, as for every viewer request

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)

    async def delete(self, session_id: str, resource_id: str) -> None:
        # In a cluster the peer may be on another node (no sticky load balancing): it is ended there.
        if not await self.whep.end(session_id, resource_id, "ended by the client (DELETE)"):
            raise tornado.web.HTTPError(404, reason="No such WHEP resource (ended, or never created)")
        self.set_status(200)
        self.finish()

    async def post(self, session_id: str, resource_id: str) -> None:
        # The fresh token is checked as a WebSocket viewer's {"type": "token"} message is (this
        # session's, valid now), and first: without one, nobody learns whether the peer exists.
        grant = self.require_viewer(session_id)
        if grant.expires is None:
            raise ViewerTokensOff("Viewer tokens are off (auth.viewer_tokens.enabled): the peer does not expire")
        if not await self.whep.renew(session_id, resource_id, grant.expires):
            raise tornado.web.HTTPError(404, reason="No such WHEP resource (ended, or never created)")
        self.send_json({"success": True, "expiresAt": iso_utc(grant.expires)})

    def patch(self, session_id: str, resource_id: str) -> None:
        # Trickle ICE and ICE restarts are optional in WHEP: the answer has every candidate.
        write_json_error(self, 405, "Trickle ICE is not supported: the SDP answer carries every candidate",
                         {"Allow": self.cors_methods})


_SESSION = r"(?P<session_id>[^/]+)"
routes = [
    (rf"/stream/{_SESSION}/whep", WhepHandler),
    (rf"/stream/{_SESSION}/whep/(?P<resource_id>[^/]+)", WhepResourceHandler),
]
