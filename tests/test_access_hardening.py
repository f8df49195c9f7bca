"""Request-level access and bad input (issue 11): the Host check against DNS rebinding, JSON
POSTs only as `application/json`, malformed bodies and paths answered 4xx without a traceback,
and dashboard event streams that cannot hold memory or connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
from helpers import CREATE, PUBLISH_TOKEN, WS_UPGRADE, assert_json_error, raw_request, wait_until, ws_handshake
from tornado.httputil import HTTPHeaders

from vsproxy.config import ConfigError, ServerConfig, config_from_dict
from vsproxy.handlers.base import (
    allowed_hosts,
    host_allowed,
    host_name,
    post_content_type_error,
    websocket_handshake_error,
)
from vsproxy.outputs.viewer import unsent_bytes

REBOUND = "rebind.attacker.example"  # a domain whose DNS now points at this server
JSON_TYPE = {"Content-Type": "application/json"}


def log_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that are a server error: ERROR level or a traceback."""
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


async def request(port: int, method: str, path: str, headers: dict | None = None,
                  body: bytes = b"") -> tuple[int, HTTPHeaders, bytes]:
    """One raw HTTP/1.1 request, headers exactly as given (Host 127.0.0.1:port unless given);
    returns (status, headers, body) once the server closes (Connection: close)."""
    headers = dict(headers or {})
    if not any(name.lower() == "host" for name in headers):
        headers["Host"] = f"127.0.0.1:{port}"
    if body or method == "POST":
        headers["Content-Length"] = str(len(body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_text, _, payload = data.partition(b"\r\n\r\n")
    first, _, rest = head_text.decode("latin-1").partition("\r\n")
    return int(first.split(" ", 2)[1]), HTTPHeaders.parse(rest), payload


async def post(port: int, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    """POST `body` with `headers`; (status, JSON reply)."""
    status, _, payload = await request(port, "POST", path, headers, body)
    return status, json.loads(payload)


# -- the Host check, without HTTP -----------------------------------------------------------------


def test_host_names_compare_without_port_case_brackets_or_trailing_dot():
    assert host_name("LocalHost:8889") == "localhost"
    assert host_name("[::1]:8889") == host_name("[::1]") == host_name("::1") == "::1"
    assert host_name("Video.Example.COM.") == "video.example.com"
    assert host_name("127.0.0.1:80") == "127.0.0.1"


def test_default_allowed_hosts_are_loopback_the_bound_address_and_the_public_url():
    default = allowed_hosts(ServerConfig(host="0.0.0.0"))
    assert default == {"localhost", "127.0.0.1", "::1"}
    for host in ("localhost:8889", "127.0.0.1:8889", "[::1]:8889", "LOCALHOST"):
        assert host_allowed(host, default), host
    for host in (f"{REBOUND}:8889", "localhost.attacker.example", "127.0.0.1.nip.io", "192.168.1.20:8889"):
        assert not host_allowed(host, default), host

    bound = allowed_hosts(ServerConfig(host="192.168.1.20", public_url="https://Video.Example.com:8443/base"))
    assert host_allowed("192.168.1.20:8889", bound)
    assert host_allowed("video.example.com", bound)
    assert not host_allowed(REBOUND, bound)
    assert host_allowed("[::1]", allowed_hosts(ServerConfig(host="::")))  # a wildcard adds nothing else
    assert allowed_hosts(ServerConfig(host="::")) == default

    extra = allowed_hosts(ServerConfig(allowed_hosts=["Cams.Example.org", "[fd00::5]"]))
    assert host_allowed("cams.example.org:443", extra) and host_allowed("[FD00::5]:8889", extra)
    assert host_allowed("localhost", extra)  # loopback names stay: a rebinding page never sends them
    assert host_allowed(REBOUND, allowed_hosts(ServerConfig(allowed_hosts=["*"])))


@pytest.mark.parametrize("entry", ["http://video.example.com", "video.example.com:8889", "a b", "x/y", ""])
def test_allowed_hosts_entries_are_names_without_scheme_or_port(entry):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"server": {"allowed_hosts": [entry]}})
    assert "server.allowed_hosts" in str(info.value)


def test_allowed_hosts_accepts_names_addresses_and_star():
    config = config_from_dict({"server": {"allowed_hosts": ["video.example.com", "10.0.0.5", "::1", "[fd00::5]", "*"]}})
    assert len(config.server.allowed_hosts) == 5


def test_post_content_type_rule():
    assert post_content_type_error("application/json", True, True) is None
    assert post_content_type_error("Application/JSON; charset=UTF-8", True, True) is None
    for simple in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                   "multipart/form-data; boundary=x", None):
        assert post_content_type_error(simple, True, True), simple
        assert post_content_type_error(simple, False, True), simple  # create needs its JSON body
        assert post_content_type_error(simple, True, False), simple  # a body must be JSON
        assert post_content_type_error(simple, False, False) is None  # a bodyless destroy


# -- DNS rebinding over HTTP ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"upstreams": {"pub": {"kind": "push", "token": "publish-token-0123"}}})
async def test_a_rebound_host_can_do_nothing_but_probes(api, http_port, proxy, caplog):
    """A page on a domain rebound to this server is same-origin with it: the Host check is all that
    stands between it and the API. Every endpoint refuses with 421, before doing anything."""
    sid = (await api.create_session())["sessionId"]
    host = f"{REBOUND}:{http_port}"
    page = {"Host": host, "Origin": f"http://{host}"}

    cases = [
        ("POST", "/session/create", {**JSON_TYPE}, json.dumps(CREATE).encode()),
        ("GET", "/sessions", {}, b""),
        ("GET", f"/session/{sid}", {}, b""),
        ("POST", f"/session/{sid}/destroy", {}, b""),
        ("DELETE", f"/session/{sid}", {}, b""),
        ("GET", "/upstreams", {}, b""),
        ("GET", f"/stream/{sid}/mjpeg", {}, b""),
        ("GET", f"/stream/{sid}/snapshot.jpg", {}, b""),
        ("GET", "/openapi.json", {}, b""),
        ("GET", "/dashboard", {}, b""),
        ("GET", "/dashboard/dashboard.js", {}, b""),
        ("GET", "/dashboard/api/state", {}, b""),
        ("GET", "/dashboard/api/events", {}, b""),
        ("DELETE", f"/dashboard/api/sessions/{sid}", {}, b""),
        ("POST", "/ingest/pub/frame", {"Authorization": "Bearer publish-token-0123", "Content-Type": "image/jpeg"},
         b"\xff\xd8\xff\xd9"),
        ("OPTIONS", "/session/create", {"Access-Control-Request-Method": "POST"}, b""),
        ("GET", "/no/such/path", {}, b""),
    ]
    for method, path, extra, body in cases:
        status, headers, payload = await request(http_port, method, path, {**page, **extra}, body)
        assert status == 421, (method, path, status, payload[:200])
        assert headers["Content-Type"].startswith("application/json"), (path, headers["Content-Type"])
        assert_json_error(status, json.loads(payload), 421)
        assert "server.allowed_hosts" in json.loads(payload)["error"]
        # Same-origin trust is for this server's own names only: no CORS grant to the rebound page.
        assert "Access-Control-Allow-Origin" not in headers, (path, headers)

    # The pages answer with a page; the WebSockets refuse before the upgrade.
    for path in ("/", f"/stream/{sid}/embed"):
        status, headers, payload = await request(http_port, "GET", path, page)
        assert status == 421 and headers["Content-Type"].startswith("text/html"), (path, status)
        assert b"server.allowed_hosts" in payload
    for path in (f"/stream/{sid}", "/ingest/pub?token=publish-token-0123"):
        response, _ = await ws_handshake(http_port, path, headers=page)
        assert response.status == 421, (path, response.status)
        assert_json_error(response.status, response.json(), 421)

    # Nothing happened: still the one session, nobody watching, no frame published.
    assert [s.id for s in proxy.sessions.all()] == [sid]
    assert proxy.hubs["pub"].latest is None

    # Probes and scrapers use whatever address they have (a pod IP): /health and /metrics answer.
    for path in ("/health", "/metrics"):
        status, _, _ = await request(http_port, "GET", path, {"Host": f"10.1.2.3:{http_port}"})
        assert status == 200, path
    assert log_problems(caplog) == []


@pytest.mark.gen_test(timeout=20)
async def test_every_loopback_name_is_allowed_by_default(api, http_port):
    for host in (f"127.0.0.1:{http_port}", f"localhost:{http_port}", f"[::1]:{http_port}", "LocalHost", "localhost."):
        status, _, payload = await request(http_port, "GET", "/sessions", {"Host": host})
        assert status == 200, (host, payload)
        # The landing page's own requests: Origin equal to an allowed Host is same-origin.
        status, _, payload = await request(http_port, "POST", "/session/create",
                                           {"Host": host, "Origin": f"http://{host}", **JSON_TYPE},
                                           json.dumps(CREATE).encode())
        assert status == 200, (host, payload)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"server": {"allowed_hosts": ["video.example.com"]}})
async def test_configured_host_names_are_allowed(api, http_port):
    assert (await request(http_port, "GET", "/sessions", {"Host": "Video.Example.com:443"}))[0] == 200
    assert (await request(http_port, "GET", "/sessions", {"Host": "localhost"}))[0] == 200
    assert (await request(http_port, "GET", "/sessions", {"Host": REBOUND}))[0] == 421


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"server": {"allowed_hosts": ["*"]}})
async def test_star_allows_any_host(api, http_port):
    assert (await request(http_port, "GET", "/sessions", {"Host": REBOUND}))[0] == 200


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"server": {"trust_proxy_headers": True, "allowed_hosts": ["video.example.com"]}})
async def test_behind_a_trusted_proxy_the_forwarded_host_is_checked(api, http_port):
    # The reverse proxy talks to vsproxy as 127.0.0.1 but forwards what the browser asked for.
    forwarded = {"Host": f"127.0.0.1:{http_port}"}
    assert (await request(http_port, "GET", "/sessions", {**forwarded, "X-Forwarded-Host": REBOUND}))[0] == 421
    via_proxy = {**forwarded, "X-Forwarded-Host": "video.example.com"}
    assert (await request(http_port, "GET", "/sessions", via_proxy))[0] == 200
    assert (await request(http_port, "GET", "/sessions", forwarded))[0] == 200


# -- cross-site simple requests -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_create_needs_a_json_content_type(api, http_port, proxy):
    """A form or a `text/plain` fetch from another site needs no preflight: it must not create."""
    body = json.dumps(CREATE).encode()
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x"):
        status, reply = await post(http_port, "/session/create", body,
                                   {"Content-Type": content_type, "Origin": "https://evil.example"})
        assert_json_error(status, reply, 415)
        assert "application/json" in reply["error"]
    status, reply = await post(http_port, "/session/create", body, {})  # no Content-Type at all
    assert_json_error(status, reply, 415)
    assert len(proxy.sessions) == 0

    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        status, reply = await post(http_port, "/session/create", body, {"Content-Type": content_type})
        assert status == 200 and reply["success"], (content_type, reply)


@pytest.mark.gen_test(timeout=20)
async def test_destroy_as_the_original_frontend_calls_it_still_works(api, http_port, proxy):
    """The original's destroy is a bodyless POST: fetch(url, {method: "POST"}) sends no
    Content-Type; jQuery's $.post sends a form type. Both keep working; a body must be JSON."""
    first = (await api.create_session())["sessionId"]
    status, reply = await post(http_port, f"/session/{first}/destroy", b"", {})
    assert status == 200 and reply["success"], reply
    second = (await api.create_session())["sessionId"]
    status, reply = await post(http_port, f"/session/{second}/destroy", b"",
                               {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"})
    assert status == 200 and reply["success"], reply

    third = (await api.create_session())["sessionId"]
    status, reply = await post(http_port, f"/session/{third}/destroy", b"x=1",
                               {"Content-Type": "application/x-www-form-urlencoded"})
    assert_json_error(status, reply, 415)
    assert [s.id for s in proxy.sessions.all()] == [third]
    status, reply = await post(http_port, f"/session/{third}/destroy", b"{}", JSON_TYPE)
    assert status == 200, reply


# -- malformed bodies and paths -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("body", [b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000,
                                  b"[" * 100_000],
                         ids=["array-1000", "object-1000", "unclosed-100k"])
@pytest.mark.config({"limits": {"max_body_bytes": 200_000}})
async def test_deeply_nested_json_is_400(api, body, caplog):
    status, reply, _ = await api.call("POST", "/session/create", raw=body)
    assert_json_error(status, reply, 400)
    assert log_problems(caplog) == []


NASTY_PATHS = [
    "/dashboard/%00", "/dashboard/a%00.js", "/dashboard/%00/index.html", "/dashboard/index.html%00.js",
    "/dashboard/%2e%2e%00", "/dashboard/" + "a" * 5000 + ".js", "/dashboard/%ff", "/dashboard/%c0%af",
    "/dashboard/%ed%a0%80.js", "/dashboard/%", "/dashboard/%zz", "/dashboard/%25", "/dashboard/%0d%0a.js",
    "/dashboard/api/thumbnail/%00.jpg", "/dashboard/api/thumbnail/%ff.jpg", "/dashboard/api/sessions/%00",
    "/stream/%00", "/stream/%00/mjpeg", "/stream/%00/snapshot.jpg", "/stream/%00/embed", "/stream/%ff/embed",
    "/stream/%c3%28", "/stream/%c3%28/mjpeg", "/session/%00", "/session/%ff", "/session/%00/destroy",
    "/ingest/%00", "/ingest/%ff", "/ingest/%00/frame", "/%00", "/%ff", "/%e2%80%ae", "/%c0%80",
    "/openapi.json%00", "/health%00", "/" + "%ff" * 1000,
]


@pytest.mark.gen_test(timeout=60)
async def test_nasty_paths_are_4xx_without_a_traceback(api, http_port, caplog):
    for path in NASTY_PATHS:
        for method in ("GET", "POST", "DELETE"):
            status, headers, payload = await request(http_port, method, path, JSON_TYPE if method == "POST" else {})
            assert 400 <= status < 500, (method, path, status, payload[:200])
            assert b"Traceback" not in payload
            if headers["Content-Type"].startswith("application/json"):
                assert_json_error(status, json.loads(payload), status)
    assert log_problems(caplog) == []
    assert (await api.call("GET", "/health"))[0] == 200


# -- the dashboard's event stream -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"auth": {"operators": {"admin": "a-long-password"}}})
async def test_refused_event_stream_logs_no_traceback(api, http_port, caplog):
    for _ in range(3):
        status, headers, payload = await request(http_port, "GET", "/dashboard/api/events")
        assert_json_error(status, json.loads(payload), 401)
    await asyncio.sleep(0.2)  # the connection-close callbacks run after the answer
    assert log_problems(caplog) == []


def events_request(port: int) -> bytes:
    return f"GET /dashboard/api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def open_event_stream(port: int, *, rcvbuf: int | None = None) -> tuple[socket.socket, bytes]:
    """A raw event-stream client; `rcvbuf` shrinks its receive window (a client that reads nothing
    then holds little in its own kernel). Returns the socket and the response head."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, events_request(port))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)  # the head only, nothing more
        assert chunk, head
        head += chunk
    return sock, head


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"limits": {"max_dashboard_clients": 3}})
async def test_event_streams_are_capped(api, http_port, proxy, caplog):
    clients = [await open_event_stream(http_port) for _ in range(3)]
    assert all(head.startswith(b"HTTP/1.1 200") for _, head in clients)
    refused, head = await open_event_stream(http_port)
    assert head.startswith(b"HTTP/1.1 503"), head
    length = int(HTTPHeaders.parse(head.decode("latin-1").partition("\r\n")[2])["Content-Length"])
    payload = b""
    while len(payload) < length:
        payload += await asyncio.wait_for(asyncio.get_running_loop().sock_recv(refused, length), 10)
    refused.close()
    assert_json_error(503, json.loads(payload), 503)
    assert "max_dashboard_clients" in json.loads(payload)["error"]
    assert len(proxy.monitor.listeners) == 3
    # A planned-for limit is a warning in the access log, not an error.
    refusals = [r for r in caplog.records if r.name == "vsproxy.access" and r.getMessage().startswith("503 ")]
    assert refusals and all(r.levelno == logging.WARNING for r in refusals)
    # The state stays available, and a slot frees when a dashboard closes.
    assert (await api.call("GET", "/dashboard/api/state"))[0] == 200
    clients[0][0].close()
    await wait_until(lambda: len(proxy.monitor.listeners) == 2, "the closed dashboard to leave")
    sock, head = await open_event_stream(http_port)
    assert head.startswith(b"HTTP/1.1 200")
    for s in [sock] + [c for c, _ in clients[1:]]:
        s.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=40)
@pytest.mark.config({"streaming": {"stall_timeout_seconds": 2.5}, "limits": {"max_dashboard_clients": 40}})
async def test_event_streams_that_never_read_hold_one_event_then_are_dropped(api, http_port, proxy):
    for i in range(12):  # some sessions, so an event is several kilobytes
        await api.create_session(f"user{i}", f"robot-{i}")
    event_size = len(proxy.monitor.event())
    assert event_size > 4000, event_size

    loop = asyncio.get_running_loop()
    started = time.monotonic()
    stalled = [(await open_event_stream(http_port, rcvbuf=2048))[0] for _ in range(30)]
    reader, _ = await open_event_stream(http_port)  # a dashboard that reads every event
    await wait_until(lambda: len(proxy.monitor.listeners) == 31, "31 dashboards")
    received = bytearray()

    async def keep_reading() -> None:
        while True:
            chunk = await loop.sock_recv(reader, 65536)
            if not chunk:
                return
            received.extend(chunk)

    reading = asyncio.ensure_future(keep_reading())
    # While they stall, each holds at most the one event it could not take, in Tornado's buffer
    # and the kernel's send queue together (not one per second, piling up).
    await asyncio.sleep(1.8)
    for handler in proxy.monitor.listeners:
        stream = handler.request.connection.stream
        pending = len(stream._write_buffer) + (unsent_bytes(stream.socket.fileno()) or 0)
        assert pending <= event_size + 512, (pending, event_size)

    # Then, having taken nothing for stall_timeout_seconds, they are disconnected; the reader is not.
    await wait_until(lambda: len(proxy.monitor.listeners) == 1, "the stalled dashboards to be dropped", timeout=15)
    assert time.monotonic() - started >= 2.5
    for sock in stalled:
        sock.setblocking(True)
        sock.settimeout(5)
        while True:  # what was in flight, then the end: the server closed the connection
            try:
                if not sock.recv(65536):
                    break
            except ConnectionResetError:
                break
        sock.close()
    before = received.count(b"data: ")
    assert before >= 3, bytes(received[:300])
    await wait_until(lambda: received.count(b"data: ") > before, "the reading dashboard's next event")
    reading.cancel()
    reader.close()


@pytest.mark.gen_test(timeout=30)
async def test_requests_that_are_no_websocket_handshake_get_a_json_error_that_says_why(api, http_port):
    """A viewer URL opened without a WebSocket upgrade (curl, a proxy that drops the Upgrade
    header, a foreign page, an old client) is told why in the JSON error every other refusal has,
    not in Tornado's plain text."""
    session_id = (await api.create_session())["sessionId"]
    path = f"/stream/{session_id}"
    cases = [
        ({"Upgrade": "h2c"}, 400, "Upgrade: websocket"),
        ({"Connection": "keep-alive"}, 400, "Connection: Upgrade"),
        ({"Origin": "http://evil.example"}, 403, "cors.allowed_origins"),
        ({"Sec-WebSocket-Version": "99"}, 426, "13"),
        # Drafts 7 and 8 (hybi), which Tornado no longer speaks: before, they got its empty 426.
        ({"Sec-WebSocket-Version": "8"}, 426, "13"),
        ({"Sec-WebSocket-Version": "7"}, 426, "13"),
    ]
    for headers, status, says in cases:
        response, _ = await ws_handshake(http_port, path, headers=headers)
        assert response.headers.get("Content-Type", "").startswith("application/json"), (headers, response.body)
        body = json.loads(response.body)
        assert_json_error(response.status, body, status)
        assert says in body["error"], (headers, body)
    response, _ = await ws_handshake(http_port, path, headers={"Sec-WebSocket-Version": "99"})
    assert response.headers["Sec-WebSocket-Version"] == "13"


@pytest.mark.config({"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
@pytest.mark.gen_test(timeout=30)
async def test_a_handshake_without_sec_websocket_key_gets_the_json_400_on_every_socket(api, http_port):
    """Tornado answers a handshake without Sec-WebSocket-Key "400 Missing/Invalid WebSocket
    headers" in plain text; every vsproxy socket answers it in its JSON error, saying why."""
    session_id = (await api.call("POST", "/session/create", CREATE, headers=JSON_TYPE))[1]["sessionId"]
    without_key = {k: v for k, v in WS_UPGRADE.items() if k != "Sec-WebSocket-Key"}
    for path in (f"/stream/{session_id}", f"/ingest/pub?token={PUBLISH_TOKEN}"):
        for response, stream in [await raw_request(http_port, path, headers=without_key),
                                 await ws_handshake(http_port, path, headers={"Sec-WebSocket-Key": ""})]:
            stream.close()
            assert response.headers.get("Content-Type", "").startswith("application/json"), (path, response.body)
            body = json.loads(response.body)
            assert_json_error(response.status, body, 400)
            assert "Sec-WebSocket-Key" in body["error"], (path, body)
        response, stream = await ws_handshake(http_port, path)  # the same handshake with its key: accepted
        stream.close()
        assert response.status == 101, (path, response.body)


def test_the_handshake_check_is_tornados_in_its_order():
    """The one check of every socket endpoint (viewers, publishers, the cluster relay)."""
    def check(**headers: str) -> tuple | None:
        return websocket_handshake_error(HTTPHeaders({**WS_UPGRADE, "Host": "h", **headers}), lambda origin: False)

    assert check() is None
    assert check(Origin="http://evil.example")[0] == 403
    assert check(**{"Sec-WebSocket-Version": ""})[0] == 426
    no_key = "Not a WebSocket handshake (it needs a Sec-WebSocket-Key header)"
    assert check(**{"Sec-WebSocket-Key": ""}) == (400, no_key, None)
    assert check(Host="") == (400, "Not a WebSocket handshake (it needs a Host header)", None)
