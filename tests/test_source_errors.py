"""Upstream failures as an operator sees them: `lastError` in GET /upstreams and the dashboard, and
the log, say what happened ("connection refused", "name not resolved", "TLS handshake failed: ..."),
in one line each and never with a traceback, for every source kind.

Everything runs on 127.0.0.1; unresolvable names are under `.invalid` (RFC 2606), which no
resolver answers, so no network is contacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import signal
import socket
import ssl
import struct
from typing import Any

import pytest
import tornado.web
import trustme
from conftest import Api
from helpers import free_port, recv, wait_until, wait_upstream
from PIL import Image
from test_cli import Server, clean_env
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketProtocol13, websocket_connect

from vsproxy.config import ReconnectConfig
from vsproxy.errors import describe_error
from vsproxy.sources import source_class
from vsproxy.sources.isaac import IsaacSource, IsaacUpstream

# A port bound but never listening: connecting to it is refused, and nothing else can take it.
_DEAD = socket.socket()
_DEAD.bind(("127.0.0.1", 0))
DEAD_PORT = _DEAD.getsockname()[1]
UNRESOLVABLE = "camera.vsproxy-test.invalid"

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module", autouse=True)
def _dead_port_held():
    """Hold the dead port while this module's tests run; then let it go (no socket left open)."""
    yield
    _DEAD.close()


def tiny_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


def assert_no_tracebacks(records: list[logging.LogRecord]) -> None:
    bad = [r for r in records if r.exc_info or "Traceback" in r.getMessage() or "never retrieved" in r.getMessage()
           or r.getMessage() == "Uncaught exception"]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


async def fail_a_few_times(api: Any, upstream: str, times: int = 2) -> dict:
    """Create a session on `upstream`; its status once `times` connection attempts failed."""
    code, body, _ = await api.call("POST", "/session/create",
                                   {"userId": "u", "robotName": "r", "upstream": upstream}, headers=JSON)
    assert code == 200, body
    return await wait_upstream(api, f"{times} failed attempts", lambda u: u["failures"] >= times, name=upstream)


async def dashboard_last_error(api: Any, upstream: str) -> str:
    code, state, _ = await api.call("GET", "/dashboard/api/state")
    assert code == 200, state
    (row,) = [u for u in state["upstreams"] if u["name"] == upstream]
    return row["lastError"]


def upstream(kind: str, url: str) -> Any:
    return pytest.mark.config({"upstreams": {"bad": {"kind": kind, "url": url}}})


# == refused connections and names that do not resolve, for every kind ==========================

@pytest.mark.parametrize("expected", [
    pytest.param("connection refused", marks=upstream("isaac", f"ws://127.0.0.1:{DEAD_PORT}/"), id="isaac-refused"),
    pytest.param("connection refused", marks=upstream("mjpeg", f"http://127.0.0.1:{DEAD_PORT}/"), id="mjpeg-refused"),
    pytest.param(f"connection refused (rtsp://127.0.0.1:{DEAD_PORT}/stream)",
                 marks=upstream("rtsp", f"rtsp://127.0.0.1:{DEAD_PORT}/stream"), id="rtsp-refused"),
    pytest.param("name not resolved", marks=upstream("isaac", f"ws://{UNRESOLVABLE}:8211/"), id="isaac-unresolvable"),
    pytest.param("name not resolved", marks=upstream("mjpeg", f"http://{UNRESOLVABLE}/"), id="mjpeg-unresolvable"),
    pytest.param("name not resolved", marks=upstream("rtsp", f"rtsp://{UNRESOLVABLE}/stream"), id="rtsp-unresolvable"),
])
@pytest.mark.gen_test(timeout=60)
async def test_every_kind_says_connection_refused_or_name_not_resolved(proxy, api, caplog, expected):
    caplog.set_level(logging.INFO)
    status = await fail_a_few_times(api, "bad")
    # "name not resolved (Name or service not known)": the resolver's own words follow.
    assert status["lastError"] == expected or status["lastError"].startswith(expected + " ("), status
    assert status["state"] == "retrying" and status["connects"] == 0
    assert await dashboard_last_error(api, "bad") == status["lastError"]
    failures = [r.getMessage() for r in caplog.records if r.name == "vsproxy.hub"
                and r.getMessage().startswith("upstream connect failed: ")]
    assert failures and all(m.startswith(f"upstream connect failed: {expected}") for m in failures), failures
    assert "Stream is closed" not in caplog.text and "Errno" not in caplog.text
    assert_no_tracebacks(caplog.records)


# == TLS, resets, silence and HTTP statuses ======================================================

@pytest.fixture
def servers(io_loop):
    """Misbehaving servers on loopback: `tls` (a certificate nobody trusts), `reset` (accepts, then
    resets the connection), `silent` (accepts and never answers), `http` (404 for everything)."""
    ports: dict[str, int] = {}
    cert = trustme.CA().issue_cert("127.0.0.1")  # a CA of its own, which vsproxy does not trust
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    http_servers = []
    for name, ssl_options in (("tls", context), ("http", None)):
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(tornado.web.Application([]), ssl_options=ssl_options)
        server.add_sockets(sockets)
        http_servers.append(server)
        ports[name] = sockets[0].getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshake; nobody ever reads
    ports["silent"] = silent.getsockname()[1]

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with SO_LINGER 0: an RST, not a FIN

    resetter = io_loop.run_sync(lambda: asyncio.start_server(reset, "127.0.0.1", 0))
    ports["reset"] = resetter.sockets[0].getsockname()[1]
    yield ports
    for server in http_servers:
        server.stop()
    resetter.close()
    silent.close()


def with_servers(kind: str, scheme: str, server: str, expected: str) -> Any:
    """A case whose upstream "bad" is a `kind` upstream at the `server` of the `servers` fixture."""
    return pytest.param(kind, scheme, server, expected, id=f"{kind}-{scheme}-{server}")


@pytest.fixture
def proxy_config(request, proxy_config):
    """conftest's, plus upstream "bad" at one of the `servers` (for tests parametrized with kind,
    scheme and server) and upstream "raw" at the `raw_upstream`, when the test uses them."""
    upstreams = dict(proxy_config.upstreams)
    if "server" in request.fixturenames:
        kind, scheme, server = (request.getfixturevalue(n) for n in ("kind", "scheme", "server"))
        port = request.getfixturevalue("servers")[server]
        upstreams["bad"] = source_class(kind).settings_class(url=f"{scheme}://127.0.0.1:{port}/")
    if "raw_upstream" in request.fixturenames:
        port = request.getfixturevalue("raw_upstream").port
        upstreams["raw"] = IsaacUpstream(url=f"ws://127.0.0.1:{port}/")
    reconnect = dataclasses.replace(proxy_config.reconnect, connect_timeout_seconds=1)
    return dataclasses.replace(proxy_config, upstreams=upstreams, reconnect=reconnect)


@pytest.mark.parametrize("kind, scheme, server, expected", [
    with_servers("isaac", "wss", "tls", "TLS handshake failed: unable to get local issuer certificate"),
    with_servers("mjpeg", "https", "tls", "TLS handshake failed: unable to get local issuer certificate"),
    with_servers("isaac", "ws", "reset", "connection reset by peer"),
    with_servers("mjpeg", "http", "reset", "connection reset by peer"),
    with_servers("isaac", "ws", "silent", "timed out"),
    with_servers("isaac", "wss", "silent", "TLS handshake timed out"),
    with_servers("mjpeg", "https", "silent", "TLS handshake timed out"),
    with_servers("isaac", "ws", "http", "upstream answered HTTP 404 Not Found"),
])
@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_tls_reset_timeout_and_http_failures_are_named(servers, proxy, api, caplog, kind, scheme, server,
                                                             expected):
    caplog.set_level(logging.INFO)
    status = await fail_a_few_times(api, "bad")
    assert status["lastError"] == expected, status
    assert await dashboard_last_error(api, "bad") == expected
    assert f"upstream connect failed: {expected}" in caplog.text
    assert_no_tracebacks(caplog.records)


# == an upstream answering the WebSocket handshake wrongly, or not reading ========================

class RawWebSocketUpstream:
    """An "Isaac Sim" on a raw socket that answers the WebSocket upgrade, then sends a small JPEG
    every 50 ms and never reads: whatever vsproxy relays to it piles up. With `wrong_accept`, its
    Sec-WebSocket-Accept is not the one the client's key calls for."""

    def __init__(self, *, wrong_accept: bool = False) -> None:
        self.wrong_accept = wrong_accept
        self.port = free_port()
        self.handshakes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, so it fills at once
        sock.bind(("127.0.0.1", self.port))
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=4096)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = WebSocketProtocol13.compute_accept_value(b"not the client's key" if self.wrong_accept else key)
            self.handshakes += 1
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n")
            jpeg = tiny_jpeg()
            frame = b"\x82\x7e" + struct.pack(">H", len(jpeg)) + jpeg  # binary, 16-bit length, unmasked
            while True:
                writer.write(frame)
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


@pytest.fixture
def raw_upstream(io_loop, request):
    instance = RawWebSocketUpstream(wrong_accept=getattr(request, "param", False))
    io_loop.run_sync(instance.start)
    yield instance
    io_loop.run_sync(instance.stop)


@pytest.mark.parametrize("raw_upstream", [True], indirect=True)
@pytest.mark.gen_test(timeout=60)
async def test_a_bad_sec_websocket_accept_is_one_line_per_attempt_without_traceback(raw_upstream, proxy, api, caplog):
    caplog.set_level(logging.INFO)
    status = await fail_a_few_times(api, "raw", times=4)
    expected = "WebSocketHandshakeError: bad Sec-WebSocket-Accept header (not the answer to our Sec-WebSocket-Key)"
    assert status["lastError"] == expected, status
    assert raw_upstream.handshakes >= 4
    assert await dashboard_last_error(api, "raw") == expected
    attempts = [r for r in caplog.records if r.getMessage() == f"upstream connect failed: {expected}"]
    assert len(attempts) >= 4
    # One line per attempt: nothing from Tornado (it logged "Uncaught exception" and a traceback).
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tornado")] == []
    assert_no_tracebacks(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_a_header_that_cannot_be_sent_never_puts_its_value_in_last_error():
    """Configuration refuses such headers; a source built without it (or a header Tornado refuses
    for a reason of its own) still fails without quoting the value: Tornado's ValueError quotes the
    whole header line, and lastError is shown on /health, /upstreams, the dashboard and to viewers."""
    secret = "Sup3r-Secret-Bearer-0123456789"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # the TCP connection succeeds: Tornado fails writing the request
    try:
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}/"
        for headers, says in [({"Authorization": f"Bearer {secret}\n"}, "'Authorization' has a line break"),
                              ({"X-Token": f"{secret}\u20ac"}, "'X-Token' has characters")]:
            source = IsaacSource("sim", IsaacUpstream(url=url, headers=headers), ReconnectConfig())
            with pytest.raises(Exception) as info:
                await source.run(None)  # type: ignore[arg-type]
            text = describe_error(info.value)
            assert secret not in text and secret not in repr(info.value), text
            assert text.startswith("cannot send the WebSocket handshake") and says in text, text
    finally:
        listener.close()


async def fill_relay(ws_url: str) -> Any:
    """A viewer that sends 60 KB messages until vsproxy says the upstream is not keeping up."""
    conn = await websocket_connect(ws_url)
    payload = "x" * 60_000
    not_delivered = False

    async def read() -> None:
        nonlocal not_delivered
        while not not_delivered:
            message = await recv(conn)
            if isinstance(message, str) and "not delivered" in message:
                not_delivered = True

    reader = asyncio.ensure_future(read())
    for _ in range(2000):
        if not_delivered:
            break
        await conn.write_message(payload)
        await asyncio.sleep(0.002)
    await wait_until(lambda: not_delivered, "the relay to an upstream that does not read to fill up")
    reader.cancel()
    return conn


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["isaac", "push"])
@pytest.mark.gen_test(timeout=90)
async def test_shutdown_with_unread_relayed_messages_logs_no_traceback(raw_upstream, tmp_path, kind):
    """SIGTERM while viewers' messages wait for an upstream (an Isaac Sim, a push publisher) that
    stopped reading: vsproxy exits 0, and its log has no CancelledError traceback per message."""
    port = free_port()
    token = "a-long-enough-publish-token"
    upstreams = {"raw": {"kind": "isaac", "url": f"ws://127.0.0.1:{raw_upstream.port}/"},
                 "pub": {"kind": "push", "token": token}}
    name = "raw" if kind == "isaac" else "pub"
    config = {"upstreams": upstreams, "default_upstream": name,
              "limits": {"viewer_message_rate": 100_000, "viewer_message_burst": 100_000,
                             "viewer_input_bytes_rate": 1 << 30, "viewer_input_bytes_burst": 1 << 30}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    server = Server(["--config", str(tmp_path / "config.yaml"), "--port", str(port), "--host", "127.0.0.1"],
                    tmp_path, env=clean_env())
    publisher = None
    try:
        await asyncio.get_running_loop().run_in_executor(None, server.wait_healthy, port)
        if kind == "push":  # a publisher that connects and then never reads
            publisher = socket.socket()
            publisher.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            publisher.connect(("127.0.0.1", port))
            publisher.sendall(b"GET /ingest/pub HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
        api = Api(f"http://127.0.0.1:{port}")
        code, body, _ = await api.call("POST", "/session/create", {"userId": "u", "robotName": "r"}, headers=JSON)
        assert code == 200, body
        await wait_upstream(api, "the upstream to connect", lambda u: u["state"] == "connected", name=name)
        conn = await fill_relay(f"ws://127.0.0.1:{port}/stream/{body['sessionId']}")
        exit_code = await asyncio.get_running_loop().run_in_executor(None, server.signal_and_wait, signal.SIGTERM)
        conn.close()
        log = server.stderr()
        assert exit_code == 0, log
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert "stopped" in log
    finally:
        if publisher is not None:
            publisher.close()
        server.stop()

