"""Safe to expose: credentials (API, viewer, operator and metrics tokens), limits, CORS, CSP, input
checks, secrets kept out of logs, and malformed WebSocket traffic. Real servers on 127.0.0.1, real
clients (Tornado's HTTP and WebSocket clients, and raw sockets where a client would hide bytes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import pytest
import tornado.escape
import tornado.websocket
from mjpeg_reader import MjpegReader, boundary_from_content_type
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from vsproxy.app import Proxy
from vsproxy.auth import ViewerTokens
from vsproxy.cli import main as cli_main
from vsproxy.config import ConfigError, config_from_dict

WAIT = 10.0  # bound for anything that should take well under a second
API_TOKEN = "api-token-0123456789abcdefXYZ"
OTHER_TOKEN = "api-token-9876543210fedcbaQRS"  # well-formed, not configured
METRICS_TOKEN = "metrics-token-0123456789abcdef"
VIEWER_SECRET = "viewer-secret-0123456789abcdef0123456789abcdef"
OPERATOR_USER, OPERATOR_PASSWORD = "operator", "operator-password-4711"
PUBLISH_TOKEN = "publish-token-123"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
FRONTEND = "http://localhost:3000"
EVIL = "http://evil.example"
CREATE = {"userId": "user123", "robotName": "demo-robot"}

API_AUTH = {"auth": {"api_tokens": [API_TOKEN]}}
VIEWER_AUTH = {"auth": {"viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}}


# -- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_json_error(status: int, body: Any, expected: int | tuple[int, ...]) -> None:
    """Every API error: the status, and exactly {"success": false, "error": "<non-empty message>"}."""
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"success", "error"}, body
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"].strip(), body


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def flip(token: str, index: int = -10) -> str:
    """The token with one signature character changed (a forgery attempt)."""
    chars = list(token)
    chars[index] = "A" if chars[index] != "A" else "B"
    return "".join(chars)


@dataclass
class RawResponse:
    status: int
    headers: httputil.HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response_head(stream: IOStream) -> tuple[int, httputil.HTTPHeaders]:
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n", max_bytes=65536), WAIT)
    first, _, rest = head.decode("latin-1").partition("\r\n")
    return httputil.parse_response_start_line(first).code, httputil.HTTPHeaders.parse(rest)


async def raw_request(port: int, path: str, method: str = "GET", headers: dict | None = None,
                      ssl_options: Any = None) -> tuple[RawResponse, IOStream]:
    """Send one request byte for byte; return the response (body per Content-Length) and the stream."""
    stream = await asyncio.wait_for(
        TCPClient().connect("127.0.0.1", port, ssl_options=ssl_options), WAIT)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    await stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    status, head = await read_response_head(stream)
    body = b""
    if "Content-Length" in head:
        body = await asyncio.wait_for(stream.read_bytes(int(head["Content-Length"])), WAIT)
    return RawResponse(status, head, body), stream


WS_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


async def ws_handshake(port: int, path: str, headers: dict | None = None,
                       ssl_options: Any = None) -> tuple[RawResponse, IOStream]:
    """A raw WebSocket handshake: the response head (and JSON body of a refusal), and the stream."""
    response, stream = await raw_request(port, path, headers={**WS_UPGRADE, **(headers or {})},
                                         ssl_options=ssl_options)
    if response.status != 101:
        stream.close()
    return response, stream


async def ws_open(port: int, path: str, headers: dict | None = None, scheme: str = "ws",
                  ssl_options: Any = None, **kwargs: Any) -> tornado.websocket.WebSocketClientConnection:
    request = HTTPRequest(f"{scheme}://127.0.0.1:{port}{path}", headers=headers, connect_timeout=WAIT,
                          request_timeout=WAIT, ssl_options=ssl_options)
    return await tornado.websocket.websocket_connect(request, **kwargs)


async def ws_refused(port: int, path: str, headers: dict | None = None) -> int:
    """The HTTP status with which the server refuses this WebSocket handshake."""
    with pytest.raises(HTTPClientError) as info:
        conn = await ws_open(port, path, headers=headers)
        conn.close()
    return info.value.code


async def recv(conn: tornado.websocket.WebSocketClientConnection, timeout: float = WAIT) -> str | bytes | None:
    return await asyncio.wait_for(conn.read_message(), timeout)


async def read_frames(conn: tornado.websocket.WebSocketClientConnection, count: int,
                      timeout: float = WAIT) -> list[bytes]:
    """`count` JPEG frames (JSON or binary messages), skipping status messages."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        message = await recv(conn, max(0.1, deadline - time.monotonic()))
        assert message is not None, f"closed after {len(frames)} frames (code {conn.close_code})"
        if isinstance(message, bytes):
            frames.append(message)
        elif json.loads(message).get("type") == "frame":
            frames.append(base64.b64decode(json.loads(message)["data"]))
    for frame in frames:
        assert frame.startswith(b"\xff\xd8") and frame.endswith(b"\xff\xd9")
    return frames


async def read_until_closed(conn: tornado.websocket.WebSocketClientConnection,
                            timeout: float = WAIT) -> list[str | bytes]:
    messages: list[str | bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        message = await recv(conn, max(0.1, deadline - time.monotonic()))
        if message is None:
            return messages
        messages.append(message)


class Mjpeg:
    """A raw-socket MJPEG viewer (the response head, then parts)."""

    def __init__(self, status: int, headers: httputil.HTTPHeaders, stream: IOStream, body: bytes) -> None:
        self.status, self.headers, self.stream, self.body = status, headers, stream, body
        self.reader = MjpegReader(boundary_from_content_type(headers["Content-Type"])) if status == 200 else None
        self._parts: list = []

    @classmethod
    async def open(cls, port: int, path: str, headers: dict | None = None, ssl_options: Any = None) -> Mjpeg:
        response, stream = await raw_request(port, path, headers=headers, ssl_options=ssl_options)
        if response.status != 200:
            stream.close()
        return cls(response.status, response.headers, stream, response.body)

    def json(self) -> Any:
        return json.loads(self.body)

    async def parts(self, count: int, timeout: float = WAIT) -> list:
        assert self.reader is not None
        deadline = time.monotonic() + timeout
        while len(self._parts) < count:
            chunk = await asyncio.wait_for(self.stream.read_bytes(65536, partial=True),
                                           max(0.1, deadline - time.monotonic()))
            self._parts += self.reader.feed(chunk)
        return self._parts[:count]

    def close(self) -> None:
        self.stream.close()


async def create(api, headers: dict | None = None, user: str = "user123", **extra: Any) -> dict:
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": user, **extra},
                                     headers=headers)
    assert status == 200, body
    return body


async def wait_for(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- API tokens -----------------------------------------------------------------------------------

MANAGEMENT = [
    ("POST", "/session/create", CREATE),
    ("GET", "/session/{id}", None),
    ("DELETE", "/session/{id}", None),
    ("POST", "/session/{id}/destroy", None),
    ("GET", "/sessions", None),
    ("GET", "/upstreams", None),
]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(API_AUTH)
@pytest.mark.parametrize("method,template,body", MANAGEMENT, ids=[f"{m} {p}" for m, p, _ in MANAGEMENT])
async def test_management_endpoints_need_the_api_token(api, method, template, body):
    session_id = (await create(api, BEARER))["sessionId"]
    path = template.format(id=session_id)
    refusals = {
        "missing": {},
        "wrong": {"Authorization": f"Bearer {OTHER_TOKEN}"},
        "prefix": {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
        "longer": {"Authorization": f"Bearer {API_TOKEN}x"},
        "other scheme": {"Authorization": f"Token {API_TOKEN}"},
        "basic": basic("x", API_TOKEN),
        "empty bearer": {"Authorization": "Bearer "},
    }
    for name, headers in refusals.items():
        status, reply, response = await api.call(method, path, body, headers=headers)
        assert_json_error(status, reply, 401)
        challenge = response.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Bearer "), (name, challenge)
        if name in ("wrong", "prefix", "longer"):
            assert 'error="invalid_token"' in challenge, (name, challenge)
    assert (await api.call("GET", f"/session/{session_id}", headers=BEARER))[0] == 200  # nothing was done

    status, reply, _ = await api.call(method, path, body, headers=BEARER)
    assert status == 200, reply
    assert reply["success"] is True
    # The scheme is case-insensitive (RFC 7235).
    if method == "GET":
        assert (await api.call(method, path, headers={"Authorization": f"bearer {API_TOKEN}"}))[0] == 200


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"api_tokens": [API_TOKEN, OTHER_TOKEN]}})
async def test_every_configured_api_token_works(api):
    for token in (API_TOKEN, OTHER_TOKEN):
        status, body, _ = await api.call("GET", "/sessions", headers={"Authorization": f"Bearer {token}"})
        assert status == 200, body


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(API_AUTH)
async def test_health_and_openapi_stay_open_with_api_tokens(api):
    status, body, _ = await api.call("GET", "/health")
    assert status == 200 and body["status"] == "healthy"
    status, body, _ = await api.call("GET", "/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(API_AUTH)
@pytest.mark.parametrize("path", ["/session/create", "/session/stream_1_x", "/session/stream_1_x/destroy",
                                  "/sessions", "/upstreams"])
async def test_cors_preflight_needs_no_token(api, path):
    headers = {"Origin": FRONTEND, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    status, _, response = await api.call("OPTIONS", path, headers=headers)
    assert status == 204
    assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(API_AUTH)
async def test_refusals_still_carry_cors_headers_for_allowed_origins(api):
    """A browser frontend must be able to read the 401 to tell the user why."""
    status, body, response = await api.call("GET", "/sessions", headers={"Origin": FRONTEND})
    assert_json_error(status, body, 401)
    assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert "Access-Control-Allow-Credentials" not in response.headers


# -- viewer tokens --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({**VIEWER_AUTH})
async def test_create_returns_a_viewer_token_carried_by_the_stream_urls(api, http_port, proxy):
    body = await create(api)
    session_id, token = body["sessionId"], body["viewerToken"]
    assert set(body) == {"success", "sessionId", "wsUrl", "httpStreamUrl", "message", "viewerToken"}
    assert re.fullmatch(r"\d{1,12}\.[A-Za-z0-9_-]{43}", token), token
    assert body["wsUrl"] == f"ws://127.0.0.1:{http_port}/stream/{session_id}?token={token}"
    assert body["httpStreamUrl"] == f"http://127.0.0.1:{http_port}/stream/{session_id}/mjpeg?token={token}"
    expiry = int(token.split(".")[0])
    assert abs(expiry - (time.time() + 3600)) < 60  # the default ttl_seconds
    proxy.access.viewer_tokens.verify(token, session_id)  # valid for this session, now


@pytest.mark.gen_test(timeout=20)
async def test_without_viewer_tokens_there_is_no_token_anywhere(api):
    body = await create(api)
    assert "viewerToken" not in body
    assert "token=" not in body["wsUrl"] and "token=" not in body["httpStreamUrl"]


def bad_viewer_tokens(proxy: Proxy, session_id: str, other_session_id: str, good: str) -> dict[str, str]:
    issuer = proxy.access.viewer_tokens
    expiry, signature = good.split(".")
    return {
        "expired": issuer.issue(session_id, now=time.time() - issuer.ttl - 5),
        "forged signature": flip(good),
        "extended expiry": f"{int(expiry) + 3600}.{signature}",
        "other session": issuer.issue(other_session_id),
        "other secret": ViewerTokens("another-secret-0123456789abcdef0123456789", 3600).issue(session_id),
        "malformed": "not-a-token",
        "no signature": f"{expiry}.",
        "empty expiry": f".{signature}",
        "huge expiry": f"{'9' * 40}.{signature}",
    }




VIEWER_ENDPOINTS = ["snapshot", "mjpeg", "embed", "websocket"]


async def viewer_request(http_port: int, session_id: str, endpoint: str, query: str = "",
                         headers: dict | None = None) -> RawResponse:
    """One request to a viewer endpoint (a WebSocket handshake for "websocket")."""
    if endpoint == "websocket":
        response, _ = await ws_handshake(http_port, f"/stream/{session_id}{query}", headers=headers)
        return response
    suffix = {"snapshot": "/snapshot.jpg", "mjpeg": "/mjpeg", "embed": "/embed"}[endpoint]
    response, stream = await raw_request(http_port, f"/stream/{session_id}{suffix}{query}",
                                         headers={**(headers or {}), "Connection": "close"})
    stream.close()
    return response


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(VIEWER_AUTH)
@pytest.mark.parametrize("endpoint", VIEWER_ENDPOINTS)
async def test_viewer_endpoints_refuse_a_missing_token_with_401_and_a_challenge(api, http_port, proxy, endpoint):
    session_id = (await create(api))["sessionId"]
    for query in ("", "?token=", "?fps=10"):
        response = await viewer_request(http_port, session_id, endpoint, query)
        assert response.status == 401, (query, response.status, response.body[:200])
        if endpoint != "embed":
            assert_json_error(response.status, response.json(), 401)
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer "), dict(response.headers)
    assert not proxy.sessions.get(session_id).viewers


@pytest.mark.gen_test(timeout=60)
@pytest.mark.config(VIEWER_AUTH)
@pytest.mark.parametrize("endpoint", VIEWER_ENDPOINTS)
async def test_viewer_endpoints_refuse_bad_tokens_with_403(api, proxy, http_port, endpoint):
    body = await create(api)
    session_id, good = body["sessionId"], body["viewerToken"]
    other_id = (await create(api, user="someone-else"))["sessionId"]
    for name, token in bad_viewer_tokens(proxy, session_id, other_id, good).items():
        # In the query (browsers) and as a Bearer header (other clients): 403, never the stream.
        for query, headers in ((f"?token={token}", None), ("", {"Authorization": f"Bearer {token}"})):
            response = await viewer_request(http_port, session_id, endpoint, query, headers)
            assert response.status == 403, (name, query, response.status, response.body[:200])
            if endpoint != "embed":
                assert_json_error(response.status, response.json(), 403)
    # A valid token in the query wins over a bad Bearer header, as documented for browsers.
    response = await viewer_request(http_port, session_id, endpoint, f"?token={good}",
                                    {"Authorization": f"Bearer {flip(good)}"})
    assert response.status in (101, 200)
    assert not [v for v in proxy.sessions.get(other_id).viewers]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(VIEWER_AUTH)
@pytest.mark.parametrize("token", ["\u00b2.abc", "\u00b9\u00b2\u00b3.AAAA", "\u0663.x", "\uff11\uff12.x",
                                   "1" * 13 + ".x", "-1.x", "+1.x", " 1.x", "1_000.x"],
                         ids=["superscript", "superscripts", "arabic-indic", "fullwidth", "13 digits", "negative",
                              "plus", "space", "underscore"])
async def test_odd_viewer_tokens_are_refused_not_crashing(api, http_port, token):
    """Tokens whose expiry is not plain ASCII digits are refused with 403, never a 500."""
    session_id = (await create(api))["sessionId"]
    quoted = tornado.escape.url_escape(token, plus=False)
    for suffix in ("/snapshot.jpg", "/mjpeg", "/embed"):
        response, stream = await raw_request(http_port, f"/stream/{session_id}{suffix}?token={quoted}",
                                             headers={"Connection": "close"})
        stream.close()
        assert response.status == 403, (suffix, response.status, response.body[:300])
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?token={quoted}")
    assert response.status == 403, (response.status, response.body[:300])


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config(VIEWER_AUTH)
async def test_the_right_viewer_token_opens_every_viewer_endpoint(api, http_port, base_url):
    body = await create(api)
    session_id, token = body["sessionId"], body["viewerToken"]
    client = AsyncHTTPClient()

    # WebSocket, with the URL exactly as the API returned it.
    conn = await ws_open(http_port, body["wsUrl"].split(f":{http_port}", 1)[1])
    assert json.loads(await recv(conn))["type"] == "status"
    await read_frames(conn, 2)
    conn.close()
    # Or with the token as a Bearer header (non-browser clients).
    conn = await ws_open(http_port, f"/stream/{session_id}?format=binary", headers={"Authorization": f"Bearer {token}"})
    await read_frames(conn, 2)
    conn.close()

    # MJPEG, exactly as returned.
    viewer = await Mjpeg.open(http_port, body["httpStreamUrl"].split(f":{http_port}", 1)[1])
    assert viewer.status == 200
    parts = await viewer.parts(2)
    assert all(p.body.startswith(b"\xff\xd8") for p in parts)
    viewer.close()

    # Snapshot (the first frame may take a moment).
    deadline = time.monotonic() + WAIT
    while True:
        response = await client.fetch(f"{base_url}/stream/{session_id}/snapshot.jpg?token={token}", raise_error=False)
        if response.code != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.code == 200
    assert response.headers["Content-Type"] == "image/jpeg" and response.body.startswith(b"\xff\xd8")
    response = await client.fetch(f"{base_url}/stream/{session_id}/snapshot.jpg",
                                  headers={"Authorization": f"Bearer {token}"}, raise_error=False)
    assert response.code == 200

    # The embed page passes the token on to the player.
    response = await client.fetch(f"{base_url}/stream/{session_id}/embed?token={token}", raise_error=False)
    assert response.code == 200
    assert embed_settings(response.body.decode())["token"] == token


def embed_settings(html: str) -> dict:
    match = re.search(r"const SETTINGS = (\{.*?\});\n", html)
    assert match, "no SETTINGS in the embed page"
    return json.loads(match.group(1))


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"api_tokens": [API_TOKEN], "viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}})
async def test_api_token_is_not_a_viewer_token(api, http_port):
    """The two credentials are separate: the API token does not open a stream."""
    session_id = (await create(api, BEARER))["sessionId"]
    response, stream = await raw_request(http_port, f"/stream/{session_id}/snapshot.jpg",
                                         headers={**BEARER, "Connection": "close"})
    stream.close()
    assert response.status == 403


# -- operators (HTTP Basic) -----------------------------------------------------------------------

OPERATORS = {"auth": {"operators": {OPERATOR_USER: OPERATOR_PASSWORD}}}


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(OPERATORS)
@pytest.mark.parametrize("path", ["/dashboard/api/state", "/dashboard/"])
async def test_dashboard_needs_operator_credentials(api, path):
    status, _, response = await api.call("GET", path)
    assert status == 401, f"{path} is open although auth.operators is set"
    assert response.headers.get("WWW-Authenticate", "").startswith("Basic "), dict(response.headers)
    for headers in (basic(OPERATOR_USER, "wrong-password"), basic("nobody", OPERATOR_PASSWORD),
                    basic(OPERATOR_USER, OPERATOR_PASSWORD + "x"), {"Authorization": f"Bearer {OPERATOR_PASSWORD}"},
                    {"Authorization": "Basic !!!not-base64"}):
        status, _, response = await api.call("GET", path, headers=headers)
        assert status == 401, headers
    status, _, response = await api.call("GET", path, headers=basic(OPERATOR_USER, OPERATOR_PASSWORD))
    assert status == 200


# -- metrics --------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"metrics_token": METRICS_TOKEN, "api_tokens": [API_TOKEN]}})
async def test_metrics_token(api):
    for headers in ({}, {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"}, BEARER):
        status, body, response = await api.call("GET", "/metrics", headers=headers)
        assert_json_error(status, body, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    status, _, response = await api.call("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert b"vsproxy_" in response.body


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("metrics_token", ["", METRICS_TOKEN])
async def test_metrics_port_serves_metrics_apart_from_the_main_port(metrics_token):
    main_port, metrics_port = free_port(), free_port()
    config = config_from_dict({"demo": {"width": 320, "height": 240},
                               "server": {"metrics_port": metrics_port},
                               "auth": {"metrics_token": metrics_token}})
    proxy = Proxy(config)
    proxy.listen(main_port, address="127.0.0.1")
    client = AsyncHTTPClient()
    try:
        response = await client.fetch(f"http://127.0.0.1:{main_port}/metrics", raise_error=False)
        assert_json_error(response.code, json.loads(response.body), 404)
        response = await client.fetch(f"http://127.0.0.1:{main_port}/health", raise_error=False)
        assert response.code == 200
        auth = {"Authorization": f"Bearer {metrics_token}"} if metrics_token else {}
        response = await client.fetch(f"http://127.0.0.1:{metrics_port}/metrics", headers=auth, raise_error=False)
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("text/plain") and b"vsproxy_" in response.body
        if metrics_token:
            response = await client.fetch(f"http://127.0.0.1:{metrics_port}/metrics", raise_error=False)
            assert response.code == 401
        # Only /metrics there: not the API.
        response = await client.fetch(f"http://127.0.0.1:{metrics_port}/sessions", raise_error=False)
        assert response.code == 404
    finally:
        await proxy.shutdown()


# -- secrets never reach the logs -----------------------------------------------------------------

ALL_AUTH = {"auth": {
    "api_tokens": [API_TOKEN],
    "viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET},
    "operators": {OPERATOR_USER: OPERATOR_PASSWORD},
    "metrics_token": METRICS_TOKEN,
}, "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}


def secrets_in(caplog, secrets: list[str]) -> list[str]:
    """Secrets (or their signature halves) found in any captured record, however it is formatted."""
    texts = []
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(vars(record)))
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    texts.append(caplog.text)
    blob = "\n".join(texts)
    found = []
    for secret in secrets:
        parts = [secret] + ([secret.split(".", 1)[1]] if "." in secret and len(secret.split(".", 1)[1]) > 8 else [])
        found += [p for p in parts if p and p in blob]
    return found


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("vsproxy", "vsproxy.access", "tornado.access", "tornado.application", "tornado.general"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config(ALL_AUTH)
async def test_credentials_never_appear_in_logs(api, http_port, proxy, all_logs):
    body = await create(api, BEARER)
    session_id, viewer_token = body["sessionId"], body["viewerToken"]
    wrong = "wrong-but-secret-looking-0123456789"
    secrets = [API_TOKEN, VIEWER_SECRET, OPERATOR_PASSWORD, METRICS_TOKEN, viewer_token, wrong, PUBLISH_TOKEN,
               base64.b64encode(f"{OPERATOR_USER}:{OPERATOR_PASSWORD}".encode()).decode()]

    await api.call("GET", f"/session/{session_id}", headers=BEARER)
    await api.call("GET", "/sessions", headers={"Authorization": f"Bearer {wrong}"})
    await api.call("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    await api.call("GET", "/metrics", headers={"Authorization": f"Bearer {wrong}"})
    await api.call("GET", "/dashboard/api/state", headers=basic(OPERATOR_USER, OPERATOR_PASSWORD))
    await api.call("GET", "/dashboard/api/state", headers=basic(OPERATOR_USER, wrong))
    await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token={viewer_token}")
    await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token={wrong}")
    await api.call("GET", f"/stream/{session_id}/embed?token={viewer_token}")
    await api.call("GET", f"/stream/{session_id}/embed?token={wrong}")
    await api.call("GET", f"/stream/nope/mjpeg?token={viewer_token}")
    await api.call("POST", f"/ingest/pub/frame?token={wrong}", raw=b"x")
    viewer = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg?token={viewer_token}")
    await viewer.parts(1)
    viewer.close()
    conn = await ws_open(http_port, f"/stream/{session_id}?token={viewer_token}")
    await read_frames(conn, 1)
    conn.write_message("hello")
    conn.close()
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?token={wrong}")
    assert response.status == 403
    await api.call("POST", f"/session/{session_id}/destroy", headers=BEARER)
    await wait_for(lambda: any("client disconnected" in r.getMessage() for r in all_logs.records), "logs")

    assert any(r.name == "vsproxy.access" for r in all_logs.records), "the access log was not captured"
    assert secrets_in(all_logs, secrets) == []


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(ALL_AUTH)
@pytest.mark.parametrize("case", ["path not utf-8", "api path not utf-8", "expiry not ascii digits"])
async def test_credentials_never_appear_in_logs_of_failed_requests(api, http_port, all_logs, case):
    """Requests Tornado refuses before our handlers run, or that fail in them, get their request
    line logged: it must not carry the ?token= query."""
    body = await create(api, BEARER)
    session_id, viewer_token = body["sessionId"], body["viewerToken"]
    if case == "path not utf-8":  # Tornado answers 400 and logs a warning with the request line
        status, _, _ = await api.call("GET", f"/stream/%FF/snapshot.jpg?token={viewer_token}")
        assert status == 400
    elif case == "api path not utf-8":
        status, _, _ = await api.call("GET", f"/session/%FF?token={viewer_token}", headers=BEARER)
        assert status == 400
    else:  # an expiry str.isdigit() accepts and int() does not
        await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token=%C2%B2.{viewer_token.split('.')[1]}")
    assert secrets_in(all_logs, [viewer_token, API_TOKEN]) == []


SECRET = "Sup3r-Secret-Value-0123456789abcdefghij"
SECRET_CONFIGS = {
    "viewer secret too short": {"auth": {"viewer_tokens": {"enabled": True, "secret": SECRET[:20]}}},
    "viewer secret not a string": {"auth": {"viewer_tokens": {"enabled": True, "secret": int("9" * 40)}}},
    "viewer_tokens given the secret": {"auth": {"viewer_tokens": SECRET}},
    "auth given a secret": {"auth": SECRET},
    "api_tokens a string": {"auth": {"api_tokens": SECRET}},
    "api token too short": {"auth": {"api_tokens": [SECRET[:12]]}},
    "metrics token too short": {"auth": {"metrics_token": SECRET[:12]}},
    "metrics token a list": {"auth": {"metrics_token": [SECRET]}},
    "operator password too short": {"auth": {"operators": {"admin": SECRET[:6]}}},
    "operators a list": {"auth": {"operators": [f"admin:{SECRET}"]}},
    "publish token too short": {"upstreams": {"pub": {"kind": "push", "token": SECRET[:6]}}},
    "publish token a number": {"upstreams": {"pub": {"kind": "push", "token": int("7" * 30)}}},
    "upstream header not a string": {"isaac_sim": {"headers": {"Authorization": ["Bearer", SECRET]}}},
    "camera URL with a password": {"upstreams": {"cam": {"kind": "mjpeg", "url": f"rtsp://admin:{SECRET}@cam/"}}},
}


@pytest.mark.parametrize("tree", list(SECRET_CONFIGS.values()), ids=list(SECRET_CONFIGS))
def test_config_errors_never_echo_secrets(tree, tmp_path, monkeypatch, capsys, caplog):
    import yaml

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    short = [SECRET, SECRET[:20], SECRET[:12], SECRET[:6], "9" * 40, "7" * 30]
    assert not [s for s in short if s in str(info.value)], str(info.value)

    # The command line: one line naming the key, exit 2, no secret on stderr or in the log.
    monkeypatch.chdir(tmp_path)
    for var in ("VIDEO_PROXY_PORT", "VIDEO_PROXY_HOST", "VIDEO_PROXY_PUBLIC_URL", "ISAAC_SIM_IP"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert cli_main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    output = captured.out + captured.err + caplog.text
    assert "configuration error" in output
    assert not [s for s in short if s in output], output


# -- limits ---------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_sessions": 2}})
async def test_max_sessions_503_then_ok_after_destroy(api):
    first = await create(api, user="a")
    await create(api, user="b")
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": "c"})
    assert_json_error(status, body, 503)
    assert "2" in body["error"]
    status, body, _ = await api.call("POST", f"/session/{first['sessionId']}/destroy")
    assert status == 200
    await create(api, user="c")


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_sessions_per_user": 2}})
async def test_max_sessions_per_user_429_then_ok_after_destroy(api):
    first = await create(api, user="alice")
    await create(api, user="alice")
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": "alice"})
    assert_json_error(status, body, 429)
    await create(api, user="bob")  # another user is not limited
    assert (await api.call("DELETE", f"/session/{first['sessionId']}"))[0] == 200
    await create(api, user="alice")


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config({"limits": {"max_viewers_per_session": 1}})
async def test_max_viewers_per_session_mjpeg_503_ws_1013_then_ok(api, http_port, proxy):
    session_id = (await create(api))["sessionId"]
    first = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert first.status == 200
    await first.parts(1)

    second = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert_json_error(second.status, second.json(), 503)
    conn = await ws_open(http_port, f"/stream/{session_id}")
    assert await read_until_closed(conn) == []  # no "connected" message, no frame
    assert conn.close_code == 1013
    assert len(proxy.sessions.get(session_id).viewers) == 1
    await first.parts(3)  # the viewer that got in is unaffected

    first.close()
    await wait_for(lambda: not proxy.sessions.get(session_id).viewers, "the MJPEG viewer to leave")
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 2)
    again = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert_json_error(again.status, again.json(), 503)  # the WebSocket viewer holds the place now
    conn.close()
    await wait_for(lambda: not proxy.sessions.get(session_id).viewers, "the WebSocket viewer to leave")
    again = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg")
    assert again.status == 200
    again.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_body_bytes": 1024}})
async def test_max_body_413_for_declared_and_chunked_bodies_then_ok(api, base_url):
    big = json.dumps({**CREATE, "padding": "x" * 2000}).encode()
    status, body, _ = await api.call("POST", "/session/create", raw=big)
    assert_json_error(status, body, 413)
    assert "1024" in body["error"]

    async def produce(write):
        for _ in range(10):
            await write(b" " * 500)
        await write(json.dumps(CREATE).encode())

    request = HTTPRequest(base_url + "/session/create", method="POST", body_producer=produce, request_timeout=WAIT)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert_json_error(response.code, json.loads(response.body), 413)
    # Even a GET with a body is bounded.
    status, body, _ = await api.call("GET", "/sessions", raw=b"x" * 2000)
    assert_json_error(status, body, 413)
    # Just under the limit is fine.
    fits = json.dumps({**CREATE, "padding": "x" * 900}).encode()
    assert len(fits) <= 1024
    status, body, _ = await api.call("POST", "/session/create", raw=fits)
    assert status == 200, body


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"viewer_message_rate": 1, "viewer_message_burst": 2}})
async def test_viewer_message_flood_gets_an_error_then_close_1008(sim, api, http_port, proxy):
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    for i in range(5):
        conn.write_message(json.dumps({"type": "key", "n": i}))
    messages = await read_until_closed(conn)
    errors = [json.loads(m) for m in messages if isinstance(m, str) and json.loads(m).get("type") == "error"]
    assert any("too many" in e["message"].lower() for e in errors), errors
    assert conn.close_code == 1008
    await wait_for(lambda: len(sim.received) >= 2, "the messages within the burst to be relayed")
    assert len(sim.received) == 2
    await wait_for(lambda: not proxy.sessions.get(session_id).viewers, "the viewer to be removed")
    # Another connection of the same session has its own budget.
    conn = await ws_open(http_port, f"/stream/{session_id}")
    conn.write_message("one")
    await read_frames(conn, 2)
    assert conn.close_code is None
    conn.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"session_create_rate": 0.5, "session_create_burst": 2}})
async def test_session_create_rate_429_with_retry_after_then_allowed(api):
    await create(api, user="a")
    await create(api, user="b")
    status, body, response = await api.call("POST", "/session/create", {**CREATE, "userId": "c"})
    assert_json_error(status, body, 429)
    retry_after = response.headers["Retry-After"]
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    assert int(retry_after) <= 2  # 1 / rate
    # Refused requests do not spend anything more; after the wait one is allowed again.
    await asyncio.sleep(int(retry_after) + 0.05)
    await create(api, user="c")
    status, body, response = await api.call("POST", "/session/create", {**CREATE, "userId": "d"})
    assert_json_error(status, body, 429)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"server": {"trust_proxy_headers": True},
                     "limits": {"session_create_rate": 0.01, "session_create_burst": 2}})
async def test_forwarded_for_spoofing_does_not_escape_the_create_rate_limit(api):
    """Behind a trusted reverse proxy that appends the peer to X-Forwarded-For (nginx's
    $proxy_add_x_forwarded_for, and most others), the entries left of the last one are whatever the
    client sent. The per-address limit must key on the address the trusted proxy saw: the last one."""
    real_client = "203.0.113.7"
    statuses = []
    for i in range(5):
        headers = {"X-Forwarded-For": f"198.51.100.{i}, {real_client}"}  # a fresh spoofed address each time
        status, _, _ = await api.call("POST", "/session/create", {**CREATE, "userId": f"u{i}"}, headers=headers)
        statuses.append(status)
    assert statuses == [200, 200, 429, 429, 429], statuses
    # Another real client has its own budget.
    status, _, _ = await api.call("POST", "/session/create", CREATE,
                                  headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.8"})
    assert status == 200


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({**API_AUTH, "limits": {"session_create_rate": 0.01, "session_create_burst": 1}})
async def test_unauthenticated_creates_do_not_spend_the_rate_budget(api):
    for _ in range(5):
        status, _, _ = await api.call("POST", "/session/create", CREATE)
        assert status == 401
    await create(api, BEARER)


# -- CORS -----------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_cors_allowed_and_refused_origins(api, http_port):
    for path, method in (("/health", "GET"), ("/sessions", "GET"), ("/session/nope", "GET"),
                         ("/session/create", "OPTIONS")):
        _, _, response = await api.call(method, path, headers={"Origin": FRONTEND})
        assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND, path
        assert "Origin" in response.headers.get("Vary", "")
        assert "Access-Control-Allow-Credentials" not in response.headers
        _, _, response = await api.call(method, path, headers={"Origin": EVIL})
        assert "Access-Control-Allow-Origin" not in response.headers, path
        assert "Access-Control-Allow-Credentials" not in response.headers
    # Look-alikes of the allowed origin are not it.
    for origin in ("http://localhost:3000.evil.example", "http://localhost:30000", "https://localhost:3000",
                   "null", "http://LOCALHOST:3000 "):
        _, _, response = await api.call("GET", "/health", headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in response.headers, origin


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"cors": {"allowed_origins": ["*"]}})
async def test_cors_star_allows_every_origin_without_credentials(api, http_port):
    for origin in (EVIL, "https://anything.example:8443"):
        _, _, response = await api.call("GET", "/health", headers={"Origin": origin})
        assert response.headers.get("Access-Control-Allow-Origin") in (origin, "*")
        assert "Access-Control-Allow-Credentials" not in response.headers
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}", headers={"Origin": EVIL})
    await read_frames(conn, 1)
    conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_websocket_origin_allowed_and_refused(api, http_port):
    session_id = (await create(api))["sessionId"]
    path = f"/stream/{session_id}"
    for origin in (FRONTEND, f"http://127.0.0.1:{http_port}"):  # the frontend, and the proxy's own pages
        conn = await ws_open(http_port, path, headers={"Origin": origin})
        await read_frames(conn, 1)
        conn.close()
    for origin in (EVIL, "http://localhost:3001", "null"):
        assert await ws_refused(http_port, path, headers={"Origin": origin}) == 403, origin
    # MJPEG answers CORS like the API.
    viewer = await Mjpeg.open(http_port, f"{path}/mjpeg", headers={"Origin": FRONTEND})
    assert viewer.headers.get("Access-Control-Allow-Origin") == FRONTEND
    assert "Access-Control-Allow-Credentials" not in viewer.headers
    viewer.close()
    viewer = await Mjpeg.open(http_port, f"{path}/mjpeg", headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in viewer.headers
    viewer.close()


# -- pages: CSP and friends -----------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition(" ")
        if name:
            out[name] = value.strip()
    return out


def assert_scripts_carry_nonce(html: str, csp: dict[str, str]) -> str:
    nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{16,})'", csp["script-src"]).group(1)
    assert csp["style-src"] == f"'nonce-{nonce}'"
    scripts = re.findall(r"<script\b([^>]*)>", html, flags=re.I)
    assert scripts, "no inline script"
    assert all(f'nonce="{nonce}"' in attrs for attrs in scripts), scripts
    styles = re.findall(r"<style\b([^>]*)>", html, flags=re.I)
    assert all(f'nonce="{nonce}"' in attrs for attrs in styles), styles
    markup = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", html, flags=re.I | re.S)
    handlers = re.findall(r"<[^>]*\son[a-z]+\s*=[^>]*>", markup, flags=re.I)
    assert not handlers, f"inline event handlers are not covered by the nonce: {handlers}"
    assert "javascript:" not in markup.lower()
    return nonce


def assert_html_headers(response) -> dict[str, str]:
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] in ("no-referrer", "same-origin", "strict-origin")
    csp = csp_directives(response.headers["Content-Security-Policy"])
    assert csp["default-src"] == "'none'"
    assert csp["base-uri"] == "'none'"
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    return csp


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"security": {"frame_ancestors": ["'self'", "https://app.example.com", "http://localhost:3000"]}})
async def test_embed_page_csp_frame_ancestors_is_the_configured_list(api, base_url):
    session_id = (await create(api))["sessionId"]
    client = AsyncHTTPClient()
    nonces = set()
    for _ in range(2):
        response = await client.fetch(f"{base_url}/stream/{session_id}/embed")
        csp = assert_html_headers(response)
        assert csp["frame-ancestors"].split() == ["'self'", "https://app.example.com", "http://localhost:3000"]
        nonces.add(assert_scripts_carry_nonce(response.body.decode(), csp))
    assert len(nonces) == 2, "the nonce must be new for every response"
    # The embed's error page too (it is what an iframe shows).
    response = await client.fetch(f"{base_url}/stream/nope/embed", raise_error=False)
    assert response.code == 404
    csp = assert_html_headers(response)
    assert csp["frame-ancestors"].split() == ["'self'", "https://app.example.com", "http://localhost:3000"]


@pytest.mark.gen_test(timeout=20)
async def test_index_page_csp(http_server, base_url):
    response = await AsyncHTTPClient().fetch(base_url + "/")
    csp = assert_html_headers(response)
    assert csp["frame-ancestors"] in ("'self'", "'none'")
    assert_scripts_carry_nonce(response.body.decode(), csp)


@pytest.mark.gen_test(timeout=20)
async def test_embed_query_parameters_cannot_break_out_of_the_script(api, base_url):
    session_id = (await create(api))["sessionId"]
    evil = "</script><script>alert(1)</script><!--"
    query = "&".join(f"{k}={tornado.escape.url_escape(evil)}" for k in ("token", "fps", "mode"))
    response = await AsyncHTTPClient().fetch(f"{base_url}/stream/{session_id}/embed?{query}")
    html = response.body.decode()
    assert "alert(1)</script>" not in html
    assert html.count("<script") == html.count("</script>")
    settings = embed_settings(html)
    assert settings["token"] == settings["fps"] == settings["mode"] == evil  # as data, intact


# -- input checks ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("query", ["fps=abc", "fps=1e9", "fps=0", "fps=-1", "fps=nan", "fps=inf", "fps=0x10",
                                   "format=xml", "format=JSON", "format="])
async def test_bad_stream_parameters_are_400(api, http_port, query):
    session_id = (await create(api))["sessionId"]
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?{query}")
    if query == "format=":
        assert response.status in (101, 400)
        return
    assert_json_error(response.status, response.json(), 400)
    if query.startswith("fps"):
        viewer = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg?{query}")
        assert_json_error(viewer.status, viewer.json(), 400)


WEIRD_IDS = {
    "traversal": "..%2f..%2fetc%2fpasswd",
    "dot-dot": "%2e%2e",
    "long": "s" * 8000,
    "unicode": "%E2%98%83stream_%F0%9F%92%A9",
    "nul": "stream_%00",
    "bad-utf8": "%FF%FE",
    "overlong-utf8": "%C0%AF",
    "lone-surrogate": "%ED%A0%80",
    "crlf": "a%0d%0aSet-Cookie:%20x=1",
    "quote": "%22%3Cimg%3E",
    "percent": "%25",
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.config(API_AUTH)
@pytest.mark.parametrize("weird", list(WEIRD_IDS.values()), ids=list(WEIRD_IDS))
async def test_weird_session_ids_are_404_or_400_never_500(api, http_port, weird):
    for method, path in (("GET", "/session/{}"), ("DELETE", "/session/{}"), ("POST", "/session/{}/destroy"),
                         ("GET", "/stream/{}/snapshot.jpg"), ("GET", "/stream/{}/mjpeg")):
        status, body, response = await api.call(method, path.format(weird), headers=BEARER)
        assert_json_error(status, body, (400, 404))
        assert "Set-Cookie" not in response.headers
    status, _, response = await api.call("GET", f"/stream/{weird}/embed")
    assert status in (400, 404) and response.headers["Content-Type"].startswith("text/html")
    response, _ = await ws_handshake(http_port, f"/stream/{weird}")
    assert_json_error(response.status, response.json(), (400, 404))


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"userId": 1, "robotName": "r"}',
                                 b'{"userId": "", "robotName": "r"}', b'{"userId": "  ", "robotName": "r"}',
                                 b'{"userId": "u"}', b'{"userId": "u", "robotName": "' + b"r" * 129 + b'"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": "ws://127.0.0.1:1/"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": "nope"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": 5}',
                                 b"NaN", b"1e999999"])
async def test_bad_create_bodies_are_400(api, raw):
    status, body, _ = await api.call("POST", "/session/create", raw=raw)
    assert_json_error(status, body, 400)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("field", ["userId", "robotName"])
async def test_unencodable_names_are_refused_and_cannot_break_the_listing(api, field):
    """JSON allows "\\ud800" (a lone surrogate); such a name cannot be written back as UTF-8, so one
    request must not turn GET /sessions and GET /session/{id} into 500s for everyone."""
    raw = json.dumps({**CREATE, field: "x\ud800"}).encode()
    assert b"\\ud800" in raw
    status, body, _ = await api.call("POST", "/session/create", raw=raw)
    listed_status, listed, _ = await api.call("GET", "/sessions")
    assert listed_status == 200, listed
    if status == 200:
        assert (await api.call("GET", f"/session/{body['sessionId']}"))[0] == 200
    assert_json_error(status, body, 400)


# -- malformed WebSocket traffic ------------------------------------------------------------------


def ws_frame(payload: bytes, opcode: int = 0x2, fin: bool = True, rsv: int = 0, masked: bool = True,
             length: int | None = None) -> bytes:
    """A client WebSocket frame, optionally lying about its length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


JUNK = {
    "http text": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "reserved bits": ws_frame(b"hello", rsv=0x70),
    "unknown opcode": ws_frame(b"hello", opcode=0x3),
    "text not utf-8": ws_frame(b"\xff\xfe\xfd", opcode=0x1),
    "orphan continuation": ws_frame(b"tail", opcode=0x0),
    "long control frame": ws_frame(b"p" * 200, opcode=0x9),
    "fragmented control frame": ws_frame(b"p", opcode=0x9, fin=False),
    "huge length claim": ws_frame(b"", length=1 << 62),
    "random bytes": bytes(range(256)) * 4,
}


async def streaming_viewer(api, http_port) -> tuple[str, tornado.websocket.WebSocketClientConnection]:
    session_id = (await create(api, user="bystander"))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}?format=binary")
    await read_frames(conn, 1)
    return session_id, conn


async def assert_closed_by_server(stream: IOStream, timeout: float = 15) -> None:
    """The server closes the connection (after at most a close frame); it does not wait for more."""
    try:
        await asyncio.wait_for(stream.read_until_close(), timeout)
    except StreamClosedError:
        pass


@pytest.mark.gen_test(timeout=40)
@pytest.mark.parametrize("junk", list(JUNK.values()), ids=list(JUNK))
async def test_junk_after_a_valid_handshake_closes_only_that_connection(api, http_port, proxy, junk):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    response, stream = await ws_handshake(http_port, f"/stream/{session_id}")
    assert response.status == 101
    await stream.write(junk)
    await assert_closed_by_server(stream)
    await wait_for(lambda: not proxy.sessions.get(session_id).viewers, "the bad viewer to be removed")
    await read_frames(bystander, 3)
    assert (await api.call("GET", "/health"))[0] == 200


@pytest.mark.gen_test(timeout=40)
async def test_binary_garbage_messages_do_not_hurt(api, http_port, proxy):
    """Binary messages are relayed upstream as they are (the demo has nowhere to send them): the
    sender gets status or error messages at most, and keeps streaming, as does everyone else.
    (Larger than streaming.max_viewer_message_bytes closes it: test_viewer_input.py.)"""
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    for size in (1, 100, 65536):
        conn.write_message(os.urandom(size), binary=True)
    await read_frames(conn, 3)
    assert conn.close_code is None
    await read_frames(bystander, 3)
    conn.close()


@pytest.mark.gen_test(timeout=40)
async def test_a_frame_over_the_websocket_message_limit_closes_that_connection(api, http_port, proxy):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    limit = proxy.make_app().settings["websocket_max_message_size"]
    conn.write_message(b"\0" * (limit + 1), binary=True)
    await read_until_closed(conn, timeout=15)
    assert conn.close_code in (1009, None)  # 1009 if the close frame beat the abort
    await wait_for(lambda: not proxy.sessions.get(session_id).viewers, "the viewer to be removed")
    await read_frames(bystander, 3)


@pytest.mark.gen_test(timeout=40)
async def test_a_message_flood_closes_that_connection_with_1008(api, http_port, proxy):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    burst = proxy.config.limits.viewer_message_burst
    for i in range(burst * 5):
        conn.write_message(f"message {i}")
    messages = await read_until_closed(conn, timeout=15)
    assert conn.close_code == 1008
    assert any(isinstance(m, str) and "Too many" in m for m in messages)
    await read_frames(bystander, 3)


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config({"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
@pytest.mark.parametrize("junk", [JUNK["http text"], JUNK["reserved bits"], JUNK["huge length claim"],
                                  JUNK["text not utf-8"]], ids=["http text", "reserved bits", "huge length",
                                                                 "text not utf-8"])
async def test_junk_on_the_ingest_socket_closes_only_that_publisher(api, http_port, proxy, junk):
    _, bystander = await streaming_viewer(api, http_port)
    watcher = (await create(api, user="watcher", upstream="pub"))["sessionId"]
    publisher = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
    response, stream = await ws_handshake(http_port, "/ingest/pub", headers=publisher)
    assert response.status == 101
    await stream.write(junk)
    await assert_closed_by_server(stream)
    await read_frames(bystander, 3)
    # The publisher's place is free again.
    deadline = time.monotonic() + WAIT
    while True:
        response, stream = await ws_handshake(http_port, "/ingest/pub", headers=publisher)
        if response.status != 409 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.status == 101
    stream.close()
    assert proxy.sessions.get(watcher)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"api_tokens": ["frontend-backend-token-1234"]}})
async def test_dashboard_is_no_back_door_when_only_api_tokens_are_set(api):
    """Without operators but with API tokens, the dashboard (which lists and destroys sessions)
    needs the API token: it must not expose what /sessions protects."""
    for method, path in (("GET", "/dashboard/api/state"), ("DELETE", "/dashboard/api/sessions/stream_1_x")):
        code, body, response = await api.call(method, path)
        assert code == 401, (path, code, body)
        assert "Bearer" in response.headers.get("WWW-Authenticate", "")
    code, _, _ = await api.call("GET", "/dashboard/api/state",
                                headers={"Authorization": "Bearer frontend-backend-token-1234"})
    assert code == 200
