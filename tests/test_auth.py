"""Credentials: API tokens on the management API, viewer tokens on the stream endpoints, operator
credentials (HTTP Basic) on the dashboard, and the metrics token and port.
Real servers on 127.0.0.1 and real clients here and in the other security test modules
(test_secrets_logging, test_limits, test_origins_csp, test_input_validation, test_malformed_websocket).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import tornado.escape
import tornado.websocket
from helpers import (
    API_AUTH,
    API_TOKEN,
    BEARER,
    CREATE,
    FRONTEND,
    METRICS_TOKEN,
    OPERATOR_PASSWORD,
    OPERATOR_USER,
    OTHER_TOKEN,
    VIEWER_AUTH,
    VIEWER_SECRET,
    Mjpeg,
    RawResponse,
    assert_json_error,
    basic,
    create,
    embed_settings,
    flip,
    free_port,
    raw_request,
    read_frames,
    recv,
    retry_while,
    ws_handshake,
    ws_open,
)
from tornado.httpclient import AsyncHTTPClient

from vsproxy.app import Proxy
from vsproxy.auth import ViewerTokens, redact_url
from vsproxy.config import config_from_dict
from vsproxy.sessions import iso_utc

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
async def test_an_api_token_sent_without_its_bearer_scheme_is_told_so(api):
    """`Authorization: <token>` was answered "Missing API token", though a header was sent."""
    token = API_AUTH["auth"]["api_tokens"][0]
    status, body, _ = await api.call("GET", "/sessions", headers={"Authorization": token})
    assert_json_error(status, body, 401)
    assert body["error"].startswith("API token expected as Authorization: Bearer <token>"), body
    assert token not in body["error"]
    status, body, _ = await api.call("GET", "/sessions", headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body


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
    assert set(body) == {"success", "sessionId", "wsUrl", "httpStreamUrl", "message", "viewerToken", "expiresAt"}
    assert re.fullmatch(r"\d{1,12}\.[A-Za-z0-9_-]{43}", token), token
    assert body["wsUrl"] == f"ws://127.0.0.1:{http_port}/stream/{session_id}?token={token}"
    assert body["httpStreamUrl"] == f"http://127.0.0.1:{http_port}/stream/{session_id}/mjpeg?token={token}"
    expiry = int(token.split(".")[0])
    assert abs(expiry - (time.time() + 3600)) < 60  # the default ttl_seconds
    # When to renew it, as POST /session/{id}/token tells (the README's refresh snippet uses it).
    assert body["expiresAt"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(expiry)), body["expiresAt"]
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


VIEWER_ENDPOINTS = ["snapshot", "mjpeg", "embed", "status", "websocket"]


async def viewer_request(http_port: int, session_id: str, endpoint: str, query: str = "",
                         headers: dict | None = None) -> RawResponse:
    """One request to a viewer endpoint (a WebSocket handshake for "websocket")."""
    if endpoint == "websocket":
        response, _ = await ws_handshake(http_port, f"/stream/{session_id}{query}", headers=headers)
        return response
    suffix = {"snapshot": "/snapshot.jpg", "mjpeg": "/mjpeg", "embed": "/embed", "status": "/status"}[endpoint]
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
@pytest.mark.parametrize("endpoint", [*VIEWER_ENDPOINTS, "mp4", "whep", "whep-resource"])
async def test_without_its_token_nobody_learns_whether_a_session_exists(api, proxy, http_port, endpoint):
    """The token is checked before the session is looked up: a request without it, or with another
    session's, gets the same 401 / 403 for a session that exists and one that does not; only its
    own token's holder learns that it has ended (404)."""
    body = await create(api)
    live, token = body["sessionId"], body["viewerToken"]
    ended = (await create(api))["sessionId"]
    ended_token = proxy.access.viewer_tokens.issue(ended)
    assert (await api.call("DELETE", f"/session/{ended}"))[0] == 200
    made_up = "stream_1700000000000_" + "0" * 32

    async def status(session_id: str, query: str = "") -> int:
        if endpoint in VIEWER_ENDPOINTS:
            return (await viewer_request(http_port, session_id, endpoint, query)).status
        method, suffix = {"mp4": ("GET", "/stream.mp4"), "whep": ("POST", "/whep"),
                          "whep-resource": ("POST", "/whep/some-resource")}[endpoint]
        response, stream = await raw_request(http_port, f"/stream/{session_id}{suffix}{query}", method,
                                             headers={"Connection": "close", "Content-Type": "application/sdp"})
        stream.close()
        return response.status

    for session_id in (live, ended, made_up):
        assert await status(session_id) == 401, session_id
        assert await status(session_id, f"?token={token if session_id != live else ended_token}") == 403, session_id
    assert await status(ended, f"?token={ended_token}") == 404


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(VIEWER_AUTH)
async def test_a_second_query_string_after_the_token_is_refused_with_a_hint(api, http_port):
    """`wsUrl + "?format=binary"` where wsUrl already carries ?token=: the token the server reads
    is "<token>?format=binary". It is refused (403), with a message that says what went wrong
    rather than calling a valid token invalid; the same URL joined with '&' works."""
    body = await create(api)
    session_id, token = body["sessionId"], body["viewerToken"]
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?token={token}?format=binary")
    assert response.status == 403, (response.status, response.body[:300])
    assert "join the URL's parameters with '&'" in response.json()["error"], response.json()
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?token={token}&format=binary")
    assert response.status == 101, (response.status, response.body[:300])


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
    response = await retry_while(lambda: client.fetch(f"{base_url}/stream/{session_id}/snapshot.jpg?token={token}",
                                                      raise_error=False), lambda r: r.code == 503)
    assert response.code == 200
    assert response.headers["Content-Type"] == "image/jpeg" and response.body.startswith(b"\xff\xd8")
    response = await client.fetch(f"{base_url}/stream/{session_id}/snapshot.jpg",
                                  headers={"Authorization": f"Bearer {token}"}, raise_error=False)
    assert response.code == 200

    # The embed page passes the token on to the player.
    response = await client.fetch(f"{base_url}/stream/{session_id}/embed?token={token}", raise_error=False)
    assert response.code == 200
    assert embed_settings(response.body.decode())["token"] == token


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"api_tokens": [API_TOKEN], "viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}})
async def test_api_token_is_not_a_viewer_token(api, http_port):
    """The two credentials are separate: the API token does not open a stream."""
    session_id = (await create(api, BEARER))["sessionId"]
    response, stream = await raw_request(http_port, f"/stream/{session_id}/snapshot.jpg",
                                         headers={**BEARER, "Connection": "close"})
    stream.close()
    assert response.status == 403


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("viewer_tokens", [
    pytest.param(False, id="viewer-tokens-off"),
    pytest.param(True, id="viewer-tokens-on", marks=pytest.mark.config(VIEWER_AUTH))])
@pytest.mark.config(API_AUTH)
async def test_a_viewer_learns_that_its_session_ended_without_the_api_token(api, proxy, caplog, viewer_tokens):
    """GET /stream/{id}/status answers a viewer with what it has (its viewer token, if tokens are on):
    200 while it may watch, 404 once the session is gone, with auth.api_tokens on too (GET
    /session/{id} is a 401 for it: the embed player, asking that, never learned of the end). A
    200 is no access-log line (a stalled player asks every 2 s) and no activity of the session."""
    caplog.set_level("DEBUG", logger="vsproxy.access")
    body = await create(api, BEARER)
    sid = body["sessionId"]
    query = f"?token={body['viewerToken']}" if viewer_tokens else ""
    session = proxy.sessions.get(sid)
    active = session.last_activity(time.time())
    code, answer, _ = await api.call("GET", f"/stream/{sid}/status{query}")
    assert code == 200, answer
    expires = iso_utc(float(body["viewerToken"].split(".")[0])) if viewer_tokens else None
    assert answer == {"success": True, "sessionId": sid, "expiresAt": expires}
    assert session.last_activity(time.time()) == active
    assert (await api.call("DELETE", f"/session/{sid}", headers=BEARER))[0] == 200
    code, answer, _ = await api.call("GET", f"/stream/{sid}/status{query}")
    assert_json_error(code, answer, 404)
    lines = [(r.levelname, r.getMessage().split(" ")[:3]) for r in caplog.records if r.name == "vsproxy.access"
             and "/status" in r.getMessage()]
    assert lines == [("DEBUG", ["200", "GET", f"/stream/{sid}/status"]),
                     ("WARNING", ["404", "GET", f"/stream/{sid}/status"])], lines


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


# -- URLs in logs and error messages ---------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    # A password with an unescaped '/', '?', '#' or '@': before, a URL parser ended the authority
    # at the first of them and the password went out whole as path, or cut as query.
    ("redis://:s3cr/et-password@127.0.0.1:16379/0", "redis://***@127.0.0.1:16379/0"),
    ("rtsp://admin:pa/ss@cam.local:554/live?x=1", "rtsp://***@cam.local:554/live"),
    ("redis://:p@ss@word@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    # A hidden '?' or '#': what follows the last '@' may be the end of a query or fragment.
    ("redis://:s3cr?et@h", "redis://***"),
    ("redis://:s3cr#et@h:6379/0", "redis://***"),
    ("http://cam/video?user=me@secret.example", "http://***"),
    # As ever: no password, no userinfo, escaped characters, query and fragment dropped.
    ("rtsps://user@cam.local/stream", "rtsps://***@cam.local/stream"),
    ("rtsp://us%40er:p%3Ass@10.0.0.2/s", "rtsp://***@10.0.0.2/s"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("http://cam.local/mjpeg?token=t0ken#frag", "http://cam.local/mjpeg"),
    ("stun:stun.example.org:3478", "stun:stun.example.org:3478"),
    # Unparseable (an unclosed IPv6 '['), or without a scheme.
    ("http://user:hunter2@[::1/stream?t=x", "http://***@[::1/stream"),
    ("http://[::1/stream", "http://[::1/stream"),
    ("user:hunter2@cam.local:554/s", "***@cam.local:554/s"),
    ("", ""),
])
def test_redact_url_hides_userinfo_and_query(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(("url", "expected"), [
    ("turn:turn.example.org:3478?transport=tcp", "turn:turn.example.org:3478?transport=tcp"),
    ("https://u:p@h/x?a=1#f", "https://***@h/x?a=1"),
    ("redis://:s3cr?et@h/0?q=1", "redis://***@h/0?q=1"),  # the query is shown anyway
    ("redis://:s3cr#et@h/0?q=1", "redis://***"),
])
def test_redact_url_keeping_the_query(url, expected):
    assert redact_url(url, keep_query=True) == expected

