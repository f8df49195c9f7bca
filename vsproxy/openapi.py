"""The REST API as an OpenAPI 3.1 document, built in code and served at GET /openapi.json.

It is the compatibility contract with the original Node service plus what vsproxy added (auth,
limits, upstreams, metrics): every path, every status a request can produce, and the exact keys of
every JSON body (`additionalProperties: false` where the shape is fixed), so tests can validate
real responses against it and fuzz the server from it. Every JSON error is `Error`.

OpenAPI cannot describe WebSockets or endless streams; `GET /stream/{sessionId}`,
`GET /ingest/{upstream}`, `GET /stream/{sessionId}/mjpeg` and `GET /dashboard/api/events` document
their handshake/refusal statuses, and the WebSockets' messages are in `x-websocket` and the `Ws*`
schemas.

Any method a REST path does not list answers 405 with an `Error` body (`components.responses.
MethodNotAllowed`; OpenAPI has no place to attach it to a method a path lacks); the HTML pages
answer it with a page. Likewise every path but /health and /metrics answers 421 (`Misdirected`)
to a request whose Host is not one of the server's names (server.allowed_hosts).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from . import __version__
from .outputs import TRANSPORTS, WS_FORMATS
from .sources import KINDS

SESSION_ID_PATTERN = r"^stream_[0-9]{13,}_[0-9a-f]{32}$"
VIEWER_TOKEN_PATTERN = r"^[0-9]{1,12}\.(control\.)?[A-Za-z0-9_-]{43}$"
ISO_UTC_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
NAME_MAX_LENGTH = 128  # sessions.MAX_NAME_LENGTH

API_SECURITY: list[dict[str, list]] = [{"apiToken": []}, {}]  # {}: open when auth.api_tokens is empty
VIEWER_SECURITY: list[dict[str, list]] = [{"viewerToken": []}, {"viewerBearer": []}, {}]
METRICS_SECURITY: list[dict[str, list]] = [{"metricsToken": []}, {}]
# auth.operators; without operators but with auth.api_tokens, an API token; open without either.
OPERATOR_SECURITY: list[dict[str, list]] = [{"operatorBasic": []}, {"apiToken": []}, {}]
PUBLISH_SECURITY: list[dict[str, list]] = [{"publishToken": []}, {"publishTokenQuery": []}]  # always required
OPEN: list[dict[str, list]] = []


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


def _json(schema: dict[str, Any], description: str, headers: dict | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    return _json(_schema("Error"), description, headers)


# The answer to a WebSocket handshake of a version Tornado does not speak.
_WS_VERSION_ERROR = _error("Unsupported Sec-WebSocket-Version.",
                           {"Sec-WebSocket-Version": {"required": True, "schema": {"type": "string"}}})


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _object(properties: dict[str, Any], required: list[str] | None = None, *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if closed:
        schema["additionalProperties"] = False
    return schema


_TRUE = {"type": "boolean", "const": True}
_NAME = {"type": "string", "minLength": 1, "maxLength": NAME_MAX_LENGTH, "pattern": r"\S"}
_COUNT = {"type": "integer", "minimum": 0}

SCHEMAS: dict[str, Any] = {
    "Error": _object({
        "success": {"type": "boolean", "const": False},
        "error": {"type": "string", "minLength": 1, "description": "What went wrong, for people."},
    }),
    "CreateSessionRequest": _object({
        "userId": {**_NAME, "description": "Who the session is for (not blank, at most 128 characters)."},
        "robotName": {**_NAME, "description": "Robot shown; may select the upstream through `robots:`."},
        "upstream": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[^/]*$",
                     "description": "Name of a configured upstream (never a URL); default: by robot, else the "
                                    "default upstream. An unknown name is 400."},
        "control": {"type": "boolean", "default": False,
                    "description": "With auth.viewer_tokens.enabled: the viewerToken (and the URLs carrying it) "
                                   "may also send control input to the upstream; without, it grants watching "
                                   "only. Without viewer tokens every viewer may send input."},
    }, ["userId", "robotName"], closed=False),
    "ViewerTokenRequest": _object({
        "control": {"type": "boolean", "default": False,
                    "description": "A token that may also send control input (else watching only)."},
    }, [], closed=False),
    "ViewerTokenResponse": _object({
        "success": _TRUE,
        "viewerToken": {"type": "string", "pattern": VIEWER_TOKEN_PATTERN,
                        "description": "Use it as ?token= on new connections, or send {\"type\": \"token\", "
                                       "\"token\": ...} on an open WebSocket to renew it without reconnecting."},
        "expiresAt": {"type": "string", "pattern": ISO_UTC_PATTERN,
                      "description": "When it expires; viewers using it are closed then."},
    }),
    "CreateSessionResponse": _object({
        "success": _TRUE,
        "sessionId": {"type": "string", "pattern": SESSION_ID_PATTERN},
        "wsUrl": {"type": "string", "pattern": r"^wss?://[^/\s]+(/[^\s?]*)?/stream/[^/?\s]+(\?token=[^&\s]+)?$"},
        "httpStreamUrl": {"type": "string",
                          "pattern": r"^https?://[^/\s]+(/[^\s?]*)?/stream/[^/?\s]+/mjpeg(\?token=[^&\s]+)?$"},
        "message": {"type": "string", "const": "Streaming session created"},
        "viewerToken": {"type": "string", "pattern": VIEWER_TOKEN_PATTERN,
                        "description": "Only with auth.viewer_tokens.enabled: the stream, snapshot and embed "
                                       "endpoints need it as ?token= (wsUrl and httpStreamUrl carry it)."},
        "expiresAt": {"type": "string", "pattern": ISO_UTC_PATTERN,
                      "description": "Only with viewerToken: when it expires (viewers using it are closed "
                                     "then); POST /session/{id}/token before, for a fresh one."},
    }, ["success", "sessionId", "wsUrl", "httpStreamUrl", "message"]),
    "Session": _object({
        "id": {"type": "string", "pattern": SESSION_ID_PATTERN},
        "userId": {"type": "string"},
        "robotName": {"type": "string"},
        "createdAt": {"type": "string", "pattern": ISO_UTC_PATTERN},
        "lastActivity": {"type": "string", "pattern": ISO_UTC_PATTERN,
                         "description": "The current time while the session has viewers."},
        "connections": {**_COUNT, "description": "Live viewers of every transport (in a cluster: on every node)."},
        "isIsaacSimConnected": {"type": "boolean", "description": "Whether the session's upstream is connected (in a "
                                                                 "cluster: on whichever node holds it)."},
        "upstream": {"type": "string"},
    }),
    "SessionResponse": _object({"success": _TRUE, "session": _schema("Session")}),
    "StreamStatusResponse": _object({
        "success": _TRUE,
        "sessionId": {"type": "string", "pattern": SESSION_ID_PATTERN},
        "expiresAt": {"anyOf": [{"type": "string", "pattern": ISO_UTC_PATTERN}, {"type": "null"}],
                      "description": "When the viewer token of the request expires; null without viewer tokens."},
    }),
    "WhepRenewedResponse": _object({
        "success": _TRUE,
        "expiresAt": {"type": "string", "pattern": ISO_UTC_PATTERN,
                      "description": "When the fresh token expires: the peer is closed then (unless renewed again)."},
    }),
    "SessionDestroyedResponse": _object({
        "success": _TRUE,
        "message": {"type": "string", "const": "Session destroyed"},
    }),
    "SessionListResponse": _object({
        "success": _TRUE,
        "count": _COUNT,
        "sessions": {"type": "array", "items": _schema("Session")},
    }),
    "UpstreamStatus": _object({
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": list(KINDS)},
        "state": {"type": "string", "enum": ["idle", "connecting", "connected", "retrying"]},
        "lastError": {"type": ["string", "null"]},
        "fpsIn": {"type": "number", "minimum": 0},
        "bytesPerSecondIn": _COUNT,
        "framesIn": _COUNT,
        "connects": _COUNT,
        "failures": _COUNT,
        "sessions": _COUNT,
        "viewers": _object(dict.fromkeys(TRANSPORTS, _COUNT)),
    }, closed=False),  # informational; a source kind may add keys
    "UpstreamListResponse": _object({
        "success": _TRUE,
        "default": {"type": "string", "description": "Upstream of sessions that name none."},
        "upstreams": {"type": "array", "items": _schema("UpstreamStatus")},
    }),
    "Health": _object({
        "status": {"type": "string", "enum": ["healthy", "degraded"],
                   "description": "degraded (still 200) while an upstream with sessions is down, or "
                                  "a cluster node cannot reach Redis."},
        "service": {"type": "string", "const": "video-stream-proxy"},
        "version": {"type": "string"},
        "isaac_sim_ip": {"type": "string", "description": "Empty without a simulator."},
        "isaac_sim_port": {"type": "string"},
        "active_sessions": _COUNT,
        "timestamp": {"type": "string", "pattern": ISO_UTC_PATTERN},
        "failing_upstreams": {"type": "array", "items": {"type": "string"}},
        "upstreams": {"type": "array", "items": _schema("UpstreamStatus")},
        "cluster": {**_schema("ClusterHealth"), "description": "Only on a cluster node (cluster.redis_url)."},
    }, ["status", "service", "version", "isaac_sim_ip", "isaac_sim_port", "active_sessions", "timestamp",
        "failing_upstreams", "upstreams"]),
    "ClusterHealth": _object({
        "node": {"type": "string", "minLength": 1, "description": "This node's ID (cluster.node_id)."},
        "nodes": {"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                  "description": "The live nodes' IDs, sorted, as of this node's last heartbeat (1 s)."},
        "redis": {"type": "string", "enum": ["connected", "unreachable"],
                  "description": "unreachable: /health says degraded; writes answer 503."},
        "problem": {"type": "string", "description": "Why Redis is unreachable (or not connected yet); its "
                                                     "URL never carries a password here."},
    }, ["node", "nodes", "redis"]),
    "WsStatusMessage": _object({
        "type": {"type": "string", "enum": ["status", "error"]},
        "message": {"type": "string"},
    }),
    "WsTokenMessage": _object({
        "type": {"type": "string", "const": "token"},
        "token": {"type": "string", "description": "A fresh viewer token of this session."},
    }),
    "IngestFrameResponse": _object({
        "success": _TRUE,
        "seq": {**_COUNT, "description": "The frame's sequence number on its upstream."},
        "active": {"type": "boolean", "description": "Whether a session wants this upstream's frames now."},
    }),
    "DashboardState": _object({
        "generatedAt": {"type": "string", "pattern": ISO_UTC_PATTERN},
        "transportLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "totals": {"type": "object"},
        "sessions": {"type": "array", "items": {"type": "object"}},
        "upstreams": {"type": "array", "items": {"type": "object"}},
    }, closed=False),  # the rows' keys are in dashboard/README.md
    "WsFrameMessage": _object({
        "type": {"type": "string", "const": "frame"},
        "data": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/jpeg"},
    }),
}

_WWW_AUTHENTICATE = {"WWW-Authenticate": {"required": True, "description": "The challenge (Bearer or Basic).",
                                          "schema": {"type": "string", "minLength": 1}}}
_RETRY_AFTER = {"Retry-After": {"required": False,
                                "description": "Whole seconds to wait (at least 1); sent when the creation rate "
                                               "per client address was exceeded.",
                                "schema": {"type": "integer", "minimum": 1}}}

RESPONSES: dict[str, Any] = {
    "BadRequest": _error("Malformed request: invalid JSON, a missing or mistyped field, a bad query "
                         "parameter, or a path that is not valid UTF-8."),
    "Unauthorized": _error("A credential is required and was missing or wrong.", _WWW_AUTHENTICATE),
    "Forbidden": _error("The viewer token is invalid, expired or for another session."),
    "NotFound": _error("Unknown session (or path)."),
    "MethodNotAllowed": _error("The path does not support this method."),
    "PayloadTooLarge": _error("The request body is larger than limits.max_body_bytes."),
    "UnsupportedMediaType": _error("A POST whose body is not declared `Content-Type: application/json`."),
    "Misdirected": _error("The request's Host is not one of this server's names (server.allowed_hosts)."),
    "TooManyRequests": _error("Session creation from this address is too fast (limits.session_create_rate; "
                              "with Retry-After), or the user has limits.max_sessions_per_user sessions.",
                              _RETRY_AFTER),
    "ServiceUnavailable": _error("A capacity limit was reached, or there is no frame yet."),
    "ViewerTokensOff": _error("Viewer tokens are off (auth.viewer_tokens.enabled is false): none is needed."),
}

PARAMETERS: dict[str, Any] = {
    "sessionId": {"name": "sessionId", "in": "path", "required": True,
                  "description": "A session ID as returned by POST /session/create.",
                  "schema": {"type": "string", "pattern": SESSION_ID_PATTERN}},
    "token": {"name": "token", "in": "query", "required": False,
              "description": "The session's viewer token (auth.viewer_tokens.enabled).",
              "schema": {"type": "string"}},
    "fps": {"name": "fps", "in": "query", "required": False,
            "description": "Cap this viewer's frame rate; anything but a number from 0.1 to 120 is 400.",
            "schema": {"type": "number", "minimum": 0.1, "maximum": 120}},
    "format": {"name": "format", "in": "query", "required": False,
               "description": "json: {\"type\": \"frame\", \"data\": base64}; binary: one binary message per JPEG.",
               "schema": {"type": "string", "enum": list(WS_FORMATS), "default": "json"}},
}

SECURITY_SCHEMES: dict[str, Any] = {
    "apiToken": {"type": "http", "scheme": "bearer",
                 "description": "One of auth.api_tokens, for session management. Not required when none is "
                                "configured."},
    "viewerToken": {"type": "apiKey", "in": "query", "name": "token",
                    "description": "The session's viewerToken (auth.viewer_tokens.enabled)."},
    "viewerBearer": {"type": "http", "scheme": "bearer",
                     "description": "The session's viewerToken as Authorization: Bearer (non-browser clients)."},
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "auth.metrics_token, when configured."},
    "operatorBasic": {"type": "http", "scheme": "basic",
                      "description": "One of auth.operators, for the dashboard. Without operators, an API token "
                                     "when auth.api_tokens is set; open when neither is."},
    "publishToken": {"type": "http", "scheme": "bearer",
                     "description": "The push upstream's `token` (always required)."},
    "publishTokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                          "description": "The push upstream's `token` as ?token= (used when there is no "
                                         "Authorization header)."},
}


def _responses(*codes: str, ok: dict[str, Any]) -> dict[str, Any]:
    names = {"400": "BadRequest", "401": "Unauthorized", "403": "Forbidden", "404": "NotFound",
             "409": "ViewerTokensOff", "413": "PayloadTooLarge", "415": "UnsupportedMediaType",
             "429": "TooManyRequests", "503": "ServiceUnavailable"}
    out = dict(ok)
    for code in codes:
        out[code] = _ref("responses", names[code])
    return out


def _preflight(summary: str, *, body_limit: bool = True) -> dict[str, Any]:
    """CORS preflight of a REST path: no credential needed; 204 with Access-Control-* headers.
    `body_limit`: a body over limits.max_body_bytes is 413 (else it is discarded unread)."""
    responses = {"204": {"description": "Access-Control-Allow-Origin is present only for an allowed Origin."}}
    if body_limit:
        responses["413"] = _ref("responses", "PayloadTooLarge")
    return {"summary": f"CORS preflight ({summary})", "tags": ["cors"], "security": OPEN, "responses": responses}


def _operation(summary: str, tag: str, security: list, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "security": security, "responses": responses}
    op.update(extra)
    return op


_SESSION_PARAM = [_ref("parameters", "sessionId")]
# How limits.max_viewers_per_session counts in a cluster, said wherever a viewer may be refused.
_VIEWER_LIMIT_CLUSTER = ("in a cluster: the session's viewers on all nodes together; also while the node cannot "
                         "reach Redis to count them, with the session registry's error")
_UPSTREAM_PARAM = [{"name": "upstream", "in": "path", "required": True, "description": "A configured upstream's name.",
                    "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}}]
_LINK_PARAMS = {"sessionId": "$response.body#/sessionId"}


def _paths() -> dict[str, Any]:
    create_ok = {"200": _json(_schema("CreateSessionResponse"), "The session and the URLs to watch it.")}
    create_responses = _responses("400", "401", "413", "415", "429", "503", ok=create_ok)
    create_ok["200"]["links"] = {
        "GetSession": {"operationId": "getSession", "parameters": _LINK_PARAMS},
        "DeleteSession": {"operationId": "deleteSession", "parameters": _LINK_PARAMS},
        "DestroySession": {"operationId": "destroySession", "parameters": _LINK_PARAMS},
    }
    destroyed = {"200": _json(_schema("SessionDestroyedResponse"), "Destroyed; its viewers were closed.")}
    return {
        "/session/create": {
            "post": _operation(
                "Create a streaming session", "sessions", API_SECURITY, create_responses,
                operationId="createSession",
                description="429: rate of creation per client address (with Retry-After) or "
                            "limits.max_sessions_per_user; 503: limits.max_sessions.",
                requestBody={"required": True,
                             "content": {"application/json": {"schema": _schema("CreateSessionRequest")}}},
            ),
            "options": _preflight("POST"),
        },
        "/session/{sessionId}": {
            "parameters": _SESSION_PARAM,
            "get": _operation("Session details", "sessions", API_SECURITY,
                              _responses("400", "401", "404", "413", ok={
                                  "200": _json(_schema("SessionResponse"), "The session.")}),
                              operationId="getSession"),
            "delete": _operation("Destroy a session (REST style)", "sessions", API_SECURITY,
                                 _responses("400", "401", "404", "413", ok=copy.deepcopy(destroyed)),
                                 operationId="deleteSession"),
            "options": _preflight("GET, DELETE"),
        },
        "/session/{sessionId}/destroy": {
            "parameters": _SESSION_PARAM,
            "post": _operation("Destroy a session (the original's path)", "sessions", API_SECURITY,
                               _responses("400", "401", "404", "413", "415", ok=copy.deepcopy(destroyed)),
                               operationId="destroySession",
                               description="Takes no body; a POST without one needs no Content-Type (as "
                                           "the original frontend sends it). 415: a body not declared as "
                                           "application/json."),
            "options": _preflight("POST"),
        },
        "/session/{sessionId}/token": {
            "parameters": _SESSION_PARAM,
            "post": _operation(
                "A fresh viewer token for a session", "sessions", API_SECURITY,
                _responses("400", "401", "404", "409", "413", ok={
                    "200": _json(_schema("ViewerTokenResponse"), "A new token (older ones stay valid until "
                                                                 "they expire).")}),
                operationId="issueViewerToken",
                description="For a frontend to hand viewers a fresh token before theirs expires "
                            "(auth.viewer_tokens.ttl_seconds). 409 when viewer tokens are off.",
                requestBody={"required": False,
                             "content": {"application/json": {"schema": _schema("ViewerTokenRequest")}}},
            ),
            "options": _preflight("POST"),
        },
        "/sessions": {
            "get": _operation("All sessions", "sessions", API_SECURITY,
                              _responses("401", "413", ok={
                                  "200": _json(_schema("SessionListResponse"), "Every session.")}),
                              operationId="listSessions"),
            "options": _preflight("GET"),
        },
        "/upstreams": {
            "get": _operation("Configured upstreams and their state", "operations", API_SECURITY,
                              _responses("401", "413", ok={
                                  "200": _json(_schema("UpstreamListResponse"), "Every upstream.")}),
                              operationId="listUpstreams"),
            "options": _preflight("GET"),
        },
        "/health": {
            "get": _operation("Service health (no credential ever)", "operations", OPEN,
                              _responses("413", ok={"200": _json(_schema("Health"), "Healthy or degraded.")}),
                              operationId="health"),
            "options": _preflight("GET"),
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics", "operations", METRICS_SECURITY,
                _responses("401", "404", "413", ok={"200": {
                    "description": "Prometheus text format, or OpenMetrics when Accept asks for it.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }}),
                operationId="metrics",
                description="404 on the main port when server.metrics_port serves /metrics on its own port.",
            ),
            "options": _preflight("GET"),
        },
        "/openapi.json": {
            "get": _operation("This document", "operations", OPEN,
                              _responses("413", ok={"200": _json({"type": "object", "required": ["openapi", "paths"]},
                                                                 "The OpenAPI document.")}),
                              operationId="openapi"),
            "options": _preflight("GET"),
        },
        "/stream/{sessionId}/snapshot.jpg": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "The latest frame as one JPEG", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "413", "503", ok={"200": {
                    "description": "The newest frame (the offline picture while the upstream is down).",
                    "headers": {
                        "X-Frame-Seq": {"required": True, "schema": {"type": "integer", "minimum": 0}},
                        "X-Timestamp": {"required": True, "schema": {"type": "number"}},
                    },
                    "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                }}),
                operationId="snapshot",
                parameters=[_ref("parameters", "token")],
                description="Where this node holds no current frame (an RTSP stream watched in H.264 only, a "
                            "cluster node with no viewers of the upstream), it asks for one and waits up to 5 s "
                            "(a cluster node relays it from the origin, or runs the upstream). 503 if none "
                            "arrives, as until the upstream delivered its first frame.",
            ),
            "options": _preflight("GET"),
        },
        "/stream/{sessionId}/status": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "Whether a viewer may still watch the session", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "413", ok={
                    "200": _json(_schema("StreamStatusResponse"), "The session exists and the viewer token (where "
                                                                  "tokens are on) is valid.")}),
                operationId="streamStatus",
                parameters=[_ref("parameters", "token")],
                description="What a player asks when its picture stalls, with only what a viewer has: its viewer "
                            "token where tokens are on (?token= or Bearer; never the API token). The token is "
                            "checked first (401 missing, 403 expired or invalid), so only its holder learns "
                            "whether the session exists (404 once it is gone). Does not count as activity.",
            ),
            "options": _preflight("GET"),
        },
        "/stream/{sessionId}/mjpeg": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "MJPEG stream for an <img>", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "413", "503", ok={"200": {
                    "description": "An endless multipart/x-mixed-replace body, one image/jpeg part per frame "
                                   "(boundary `vsproxyframe`). Ends when the session is destroyed.",
                    "content": {"multipart/x-mixed-replace": {"schema": {"type": "string", "format": "binary"}}},
                }}),
                operationId="mjpeg",
                parameters=[_ref("parameters", "token"), _ref("parameters", "fps")],
                description="503: limits.max_viewers_per_session reached (" + _VIEWER_LIMIT_CLUSTER + ").",
            ),
            "options": _preflight("GET"),
        },
        "/stream/{sessionId}/stream.mp4": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "Fragmented MP4 (H.264) stream for a <video>", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "413", "503", ok={"200": {
                    "description": "An endless fragmented MP4: the init segment, then one fragment (moof + "
                                   "mdat) per frame, starting at a keyframe. Ends when the session is destroyed "
                                   "or the stream's parameters change.",
                    "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
                }}),
                operationId="mp4",
                parameters=[_ref("parameters", "token")],
                description="400 with `fps` (frames of a GOP cannot be skipped); 503: "
                            "limits.max_viewers_per_session reached (" + _VIEWER_LIMIT_CLUSTER + ").",
            ),
            "options": _preflight("GET"),
        },
        "/stream/{sessionId}/whep": {
            "parameters": _SESSION_PARAM,
            "post": _operation(
                "WebRTC playback (WHEP): an SDP offer in, the SDP answer out", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "413", "415", "503", ok={
                    "201": {
                        "description": "The peer exists; the body is the SDP answer, with every host "
                                       "candidate (no trickle ICE). H.264 only, as the upstream sends it.",
                        "headers": {
                            "Location": {"required": True, "schema": {"type": "string",
                                                                      "pattern": "^/stream/[^/]+/whep/[^/]+$"},
                                         "description": "The peer's resource: DELETE it to end the peer."},
                            "ETag": {"required": True, "schema": {"type": "string"}},
                            "Link": {"required": False, "schema": {"type": "string"},
                                     "description": "One per webrtc.ice_servers URL: "
                                                    "`<turn:...>; rel=\"ice-server\"; username=...; "
                                                    "credential=...; credential-type=\"password\"`."},
                        },
                        "content": {"application/sdp": {"schema": {"type": "string"}}},
                    },
                    "406": _error("The offer is valid SDP but has no video section, or no H.264 in "
                                  "packetization-mode 1."),
                    "501": _error("WebRTC is disabled (webrtc.enabled: false)."),
                }),
                operationId="whepOffer",
                parameters=[_ref("parameters", "token")],
                requestBody={"required": True,
                             "content": {"application/sdp": {"schema": {"type": "string"}}}},
                description="draft-ietf-wish-whep. The body must be `Content-Type: application/sdp` (415 "
                            "otherwise) and an SDP offer with a video section offering H.264 (400 if it is not "
                            "an SDP offer, ends its candidates with no UDP one, lists more than 32 UDP ones or one "
                            "at a port beyond 0-65535; 406 "
                            "without video or H.264). "
                            "The peer is a viewer of the session like "
                            "any other (connections, limits.max_viewers_per_session: 503 ("
                            + _VIEWER_LIMIT_CLUSTER + "), limits.max_connections: 503 (a peer counts as one "
                            "connection), viewer tokens: 401/403, closed when the session is destroyed or its "
                            "token expires, dropped after streaming.stall_timeout_seconds without RTCP from it "
                            "while frames flow, or without its connection ever completing).",
            ),
            "options": {**_preflight("POST"), "parameters": [_ref("parameters", "token")],
                        "description": "Also announces webrtc.ice_servers as Link headers, for a session that "
                                       "exists, with its viewer token where tokens are on (as the POST's 201 does)."},
        },
        "/stream/{sessionId}/whep/{resourceId}": {
            "parameters": [*_SESSION_PARAM, {"name": "resourceId", "in": "path", "required": True,
                                             "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
                                             "description": "From the Location of the 201."}],
            "delete": _operation(
                "End a WHEP peer", "streams", OPEN,
                _responses("400", "404", "413", ok={"200": {"description": "The peer is closed."}}),
                operationId="whepDelete",
                description="The resource id (128 random bits, known only to whoever created the peer) is "
                            "the credential. 404 for a peer that already ended.",
            ),
            "post": _operation(
                "Renew a WHEP peer's viewer token", "streams", VIEWER_SECURITY,
                _responses("400", "401", "403", "404", "409", "413", "415", ok={
                    "200": _json(_schema("WhepRenewedResponse"), "The peer now lasts until the fresh token "
                                                                 "expires.")}),
                operationId="whepRenew",
                parameters=[_ref("parameters", "token")],
                description="With viewer tokens on, a peer is closed when its token expires. A fresh token of the "
                            "session (POST /session/{sessionId}/token), as ?token= or Bearer, moves that to its "
                            "own expiry, without a new peer: what a {\"type\": \"token\"} message does on a "
                            "WebSocket, checked the same way. The token is checked first (401 missing, 403 "
                            "invalid, expired or another session's; the old expiry stays), then the resource "
                            "(404 for a peer that ended). 409 with viewer tokens off. No body (415 for one "
                            "not declared as JSON).",
            ),
            "patch": _operation(
                "Trickle ICE (not supported)", "streams", OPEN,
                {"405": {**_error("Trickle ICE and ICE restarts are not supported: the SDP answer carries "
                                  "every candidate."),
                         "headers": {"Allow": {"required": True, "schema": {"type": "string"}}}},
                 "400": _ref("responses", "BadRequest"),
                 "413": _ref("responses", "PayloadTooLarge")},
                operationId="whepPatch",
            ),
            "options": _preflight("POST, DELETE"),
        },
        "/stream/{sessionId}": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "WebSocket stream (upgrade)", "streams", VIEWER_SECURITY,
                {
                    "101": {"description": "Upgraded. See x-websocket for the messages."},
                    "400": _error("A bad query parameter, or not a WebSocket handshake."),
                    "401": _ref("responses", "Unauthorized"),
                    "403": _error("Invalid viewer token, or an Origin not in cors.allowed_origins."),
                    "404": _ref("responses", "NotFound"),
                    "426": _WS_VERSION_ERROR,
                },
                operationId="streamWebSocket",
                parameters=[_ref("parameters", "token"), _ref("parameters", "format"), _ref("parameters", "fps")],
                description=(
                    "A WebSocket: after the upgrade the server sends WsStatusMessage {type: status} once, then a "
                    "WsFrameMessage per frame (or one binary JPEG message with ?format=binary), and status/error "
                    "messages when the upstream drops or returns. Text the upstream sends is relayed unchanged. "
                    "What the viewer sends is relayed upstream (isaac and push upstreams; other kinds answer "
                    "once with a status message that they take no input), up to "
                    "streaming.max_viewer_message_bytes per message (larger: close 1009) and the limits.viewer_"
                    "message_* and limits.viewer_input_bytes_* rates (beyond: an error message, then close 1008). "
                    "With viewer tokens on, only a control token may send input (else an error message), the "
                    "connection is closed with 4001 when its token expires (after an error message), and the "
                    "viewer may send {\"type\": \"token\", \"token\": ...} to renew it (answered with a status "
                    "message, or an error message if refused: the old token then stays). Close codes: 1001 "
                    "session destroyed or server shutdown; 1008 input rate exceeded; 1009 message too big; 1013 "
                    "limits.max_viewers_per_session reached (" + _VIEWER_LIMIT_CLUSTER + "); 4001 viewer token expired."
                ),
                **{"x-websocket": {
                    "serverMessages": [_schema("WsStatusMessage"), _schema("WsFrameMessage"),
                                       {"type": "string", "format": "binary",
                                        "description": "a JPEG (?format=binary)"}],
                    "closeCodes": {"1001": "session destroyed or server shutting down",
                                   "1008": "viewer message or input byte rate limit exceeded",
                                   "1009": "message larger than streaming.max_viewer_message_bytes",
                                   "1013": "session has the maximum number of viewers",
                                   "4001": "viewer token expired"},
                    "clientMessages": [_schema("WsTokenMessage"),
                                       {"description": "anything else: input relayed to the upstream"}],
                }},
            ),
        },
        "/stream/{sessionId}/embed": {
            "parameters": _SESSION_PARAM,
            "get": _operation(
                "Embeddable player page (for an iframe)", "pages", VIEWER_SECURITY,
                {
                    "200": _html("The player; CSP frame-ancestors from security.frame_ancestors."),
                    "400": _html("The session ID is not valid UTF-8."),
                    "401": {**_html("Viewer token required."), "headers": _WWW_AUTHENTICATE},
                    "403": _html("Viewer token invalid or expired."),
                    "404": {"description": "Session not found (an HTML page); an empty ID is no embed path at all "
                                           "(the JSON Error of unknown paths).",
                            "content": {"text/html": {"schema": {"type": "string"}},
                                        "application/json": {"schema": _schema("Error")}}},
                },
                operationId="embed",
                parameters=[
                    _ref("parameters", "token"),
                    {"name": "control", "in": "query", "required": False,
                     "description": "1, true or yes: send keyboard and pointer input to the simulator (with "
                                    "viewer tokens on, the token must be a control token).",
                     "schema": {"type": "string"}},
                    {"name": "mode", "in": "query", "required": False, "schema": {"type": "string",
                                                                                  "enum": ["ws", "mjpeg"]}},
                    {"name": "fps", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Passed on to the stream (which checks it)."},
                ],
            ),
        },
        "/": {
            "get": _operation("Landing page", "pages", OPEN, {"200": _html("What this server is; a demo button.")},
                              operationId="index"),
        },
        **_ingest_paths(),
        **_dashboard_paths(),
    }


# A publisher makes its node a push upstream's origin in a cluster; which node has it is in Redis.
_CLUSTER_PUBLISHER_UNKNOWN = "In a cluster: Redis cannot be reached to know whether another node has this " \
    "upstream's publisher; try again shortly."


def _ingest_paths() -> dict[str, Any]:
    """The publisher side of `push` upstreams."""
    not_push = "No push upstream of that name (the same answer for an unknown name and another kind)."
    return {
        "/ingest/{upstream}": {
            "parameters": _UPSTREAM_PARAM,
            "get": _operation(
                "Publisher WebSocket (upgrade)", "ingest", PUBLISH_SECURITY,
                {
                    "101": {"description": "Upgraded. See x-websocket for the messages."},
                    "400": _error("Not a WebSocket handshake."),
                    "401": _ref("responses", "Unauthorized"),
                    "403": _error("An Origin not in cors.allowed_origins."),
                    "404": _error(not_push),
                    "409": _error("Another publisher is connected to this upstream (one at a time; in a "
                                  "cluster, the error names the node that has it)."),
                    "426": _WS_VERSION_ERROR,
                    "503": _error(_CLUSTER_PUBLISHER_UNKNOWN),
                },
                operationId="ingestWebSocket",
                description=(
                    "A WebSocket for the one publisher of a push upstream: each binary message is a JPEG "
                    "frame (up to the upstream's max_frame_bytes; a message that is not a JPEG gets an error "
                    "message and is dropped); a text message is relayed to the viewers. The server sends "
                    "{type: status, active, message} when sessions start or stop wanting frames, error "
                    "messages, and viewers' input: binary as it came, text wrapped as {type: viewer, data}. "
                    "Close codes: 1001 server shutting down or the publisher was replaced; 1009 frame too big."
                ),
                **{"x-websocket": {
                    "clientMessages": [{"type": "string", "format": "binary", "description": "a JPEG frame"},
                                       {"type": "string", "description": "text relayed to the viewers"}],
                    "serverMessages": [_schema("WsStatusMessage"),
                                       _object({"type": {"type": "string", "const": "viewer"},
                                                "data": {"type": "string"}}),
                                       {"type": "string", "format": "binary", "description": "viewer input"}],
                    "closeCodes": {"1001": "server shutting down", "1009": "frame too big"},
                }},
            ),
        },
        "/ingest/{upstream}/frame": {
            "parameters": _UPSTREAM_PARAM,
            "post": _operation(
                "Publish one frame", "ingest", PUBLISH_SECURITY,
                {
                    "200": _json(_schema("IngestFrameResponse"), "Published to the upstream's viewers."),
                    "400": _error("An empty body, or one that is not a JPEG."),
                    "401": _ref("responses", "Unauthorized"),
                    "404": _error(not_push),
                    "409": _error("In a cluster, rarely: the frame went to the node that had this upstream's "
                                  "publisher, which another node has taken over meanwhile (the error names it); "
                                  "or the node is shutting down."),
                    "413": _error("The frame is larger than the upstream's max_frame_bytes."),
                    "503": _error("In a cluster: Redis cannot be reached to know which node has this upstream's "
                                  "publisher, or that node cannot be reached (down, not answering within 2 s, not "
                                  "registered any more) or did not take the frame; try again shortly."),
                },
                operationId="ingestFrame",
                description=(
                    "The body is one JPEG; the answer says its sequence number and whether sessions want "
                    "frames (`active`). An optional X-Capture-Timestamp header (Unix seconds) is the "
                    "frame's capture time, for frame age. In a cluster any node takes the frame (a load "
                    "balancer may send each to another): a node that does not have the upstream's publisher "
                    "checks it (token, size, JPEG) and forwards it, with its capture time, to the node that "
                    "has (the first node a frame reached, while frames keep coming), whose answer is the "
                    "answer."
                ),
                parameters=[{"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                             "description": "The publish token, when there is no Authorization header."}],
                requestBody={"required": True,
                             "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
            ),
            "options": _preflight("POST", body_limit=False),  # frame ingest reads no body before its checks
        },
    }


def _dashboard_paths() -> dict[str, Any]:
    """The dashboard's API (the page itself and its files are under /dashboard/)."""
    return {
        "/dashboard/api/state": {
            "get": _operation("Dashboard state", "dashboard", OPERATOR_SECURITY,
                              _responses("401", "413", ok={
                                  "200": _json(_schema("DashboardState"), "Totals, sessions and upstreams.")}),
                              operationId="dashboardState"),
            "options": _preflight("GET"),
        },
        "/dashboard/api/events": {
            "get": _operation(
                "Dashboard state as Server-Sent Events", "dashboard", OPERATOR_SECURITY,
                _responses("401", "413", ok={"200": {
                    "description": "An endless event stream: `retry: 2000`, then one `data: <DashboardState "
                                   "JSON>` event at once and one a second.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                }}),
                operationId="dashboardEvents"),
            "options": _preflight("GET"),
        },
        "/dashboard/api/thumbnail/{upstream}.jpg": {
            "parameters": _UPSTREAM_PARAM,
            "get": _operation(
                "An upstream's newest frame, 160 px wide", "dashboard", OPERATOR_SECURITY,
                _responses("401", "404", "413", "503", ok={"200": {
                    "description": "A JPEG thumbnail (made at most once a second).",
                    "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                }}),
                operationId="dashboardThumbnail",
                description="404: no such upstream; 503: no frame received from it yet, or its "
                            "picture cannot be made into a thumbnail (not a JPEG Pillow decodes, "
                            "or over 89 megapixels)."),
            "options": _preflight("GET"),
        },
        "/dashboard/api/sessions/{sessionId}": {
            "parameters": _SESSION_PARAM,
            "delete": _operation("Destroy a session (for operators)", "dashboard", OPERATOR_SECURITY,
                                 _responses("400", "401", "404", "413", ok={
                                     "200": _json(_schema("SessionDestroyedResponse"),
                                                  "Destroyed; its viewers were closed.")}),
                                 operationId="dashboardDestroySession",
                                 description="The twin of DELETE /session/{sessionId} with operator "
                                             "credentials (the dashboard's Destroy button)."),
            "options": _preflight("DELETE"),
        },
    }


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vsproxy",
            "version": __version__,
            "description": __doc__.split("\n\n", 1)[1].strip(),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": n} for n in ("sessions", "streams", "operations", "pages", "ingest", "dashboard", "cors")],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "parameters": PARAMETERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The document (a fresh copy), with `servers` set to `server_url` when given."""
    doc = copy.deepcopy(_document())
    if server_url:
        doc["servers"] = [{"url": server_url.rstrip("/")}]
    return doc
