"""The connection level (vsproxy/server.py and the command line around it): timeouts for slow and
idle clients, the open-connection cap, an accept loop that survives running out of file
descriptors, 431/414 for oversized request heads, the loopback default bind, and config files
that cannot be read. The server runs as `Proxy.listen` runs it, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import ssl
import time
import urllib.request

import pytest
import trustme
from helpers import free_port
from test_cli import Server, assert_one_line_config_error, clean_env, run_vsproxy
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from vsproxy.app import Proxy
from vsproxy.config import config_from_dict

SHORT = {"server": {"header_timeout_seconds": 0.5, "idle_timeout_seconds": 1.5, "body_timeout_seconds": 0.5}}


@pytest.fixture
def served(io_loop, proxy_config):
    """The proxy on a free 127.0.0.1 port through Proxy.listen (vsproxy's own server); its port."""
    proxy = Proxy(proxy_config)
    port = free_port()
    proxy.listen(port, address="127.0.0.1")
    yield port
    io_loop.run_sync(proxy.shutdown, timeout=20)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_after(reader: asyncio.StreamReader, within: float) -> float | None:
    """Read (and drop) until the server closes; seconds it took, or None if still open after `within`."""
    start = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), max(0.01, within - (time.monotonic() - start))):
            pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - start


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


async def get(port: int, path: str) -> int:
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False, request_timeout=5)
    return response.code


# -- timeouts ------------------------------------------------------------------------------------


@pytest.mark.config(SHORT)
@pytest.mark.gen_test(timeout=15)
async def test_slow_headers_are_cut_off_at_the_header_timeout(served):
    """A slowloris client (its head a byte at a time, never finished) is disconnected at
    server.header_timeout_seconds, not after Tornado's default hour."""
    reader, writer = await connect(served)
    start = time.monotonic()
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    try:
        for byte in head:
            if reader.at_eof() or time.monotonic() - start > 5:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
    except ConnectionError:
        pass
    elapsed = await closed_after(reader, 5 - (time.monotonic() - start))
    assert elapsed is not None, "the slow client was still connected after 5 s"
    assert 0.4 < time.monotonic() - start < 2.0
    writer.close()


@pytest.mark.slow
@pytest.mark.config({"server": {"header_timeout_seconds": 0.5, "idle_timeout_seconds": 2}})
@pytest.mark.gen_test(timeout=15)
async def test_idle_keepalive_connection_is_closed_after_the_idle_timeout(served):
    """After a response, a keep-alive connection may wait for its next request up to the idle
    timeout (longer than the header timeout here), and is closed then."""
    reader, writer = await connect(served)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    writer.write(request)
    status, _, _ = await read_response(reader)
    assert status == 200
    await asyncio.sleep(1.0)  # past the header timeout, within the idle timeout: still served
    writer.write(request)
    status, _, _ = await read_response(reader)
    assert status == 200
    elapsed = await closed_after(reader, 5)
    assert elapsed is not None, "an idle keep-alive connection was still open after 5 s"
    assert 1.5 < elapsed < 3.5
    writer.close()


@pytest.mark.config(SHORT)
@pytest.mark.gen_test(timeout=15)
async def test_slow_body_is_cut_off_at_the_body_timeout(served):
    reader, writer = await connect(served)
    writer.write(b"POST /session/create HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"userId\":")  # and nothing more
    elapsed = await closed_after(reader, 5)
    assert elapsed is not None, "a request whose body never came was still open after 5 s"
    assert elapsed < 2.0
    writer.close()


@pytest.mark.slow
@pytest.mark.config(SHORT)
@pytest.mark.gen_test(timeout=20)
async def test_websocket_and_mjpeg_viewers_outlive_the_timeouts(served):
    """Viewers' streams are detached from the HTTP layer: frames keep coming long after every
    HTTP timeout (0.5 s / 1.5 s here) has passed."""
    client = AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{served}/session/create", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  body=json.dumps({"userId": "u", "robotName": "r"}))
    session_id = json.loads(response.body)["sessionId"]
    viewer = await websocket_connect(f"ws://127.0.0.1:{served}/stream/{session_id}?format=binary")
    reader, writer = await connect(served)
    writer.write(f"GET /stream/{session_id}/mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    ws_frames, mjpeg_bytes = [], []

    async def read_ws() -> None:
        while await viewer.read_message() is not None:
            ws_frames.append(time.monotonic())

    async def read_mjpeg() -> None:
        while chunk := await reader.read(65536):
            mjpeg_bytes.append((time.monotonic(), len(chunk)))

    tasks = [asyncio.ensure_future(read_ws()), asyncio.ensure_future(read_mjpeg())]
    start = time.monotonic()
    await asyncio.sleep(2.5)
    late = start + 2.0
    assert not any(task.done() for task in tasks), "a viewer's stream ended"
    assert sum(1 for t in ws_frames if t > late) >= 5, "the WebSocket viewer stopped getting frames"
    assert sum(n for t, n in mjpeg_bytes if t > late) > 10_000, "the MJPEG viewer stopped getting frames"
    viewer.close()
    writer.close()
    for task in tasks:
        task.cancel()


# -- oversized request heads ---------------------------------------------------------------------


@pytest.mark.parametrize(("head", "status", "error"), [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers"),
    (b"GET /health?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "Request line"),
    (b"GET /health?" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "Request target"),
], ids=["headers-over-64KiB", "url-over-64KiB", "url-over-8KiB"])
@pytest.mark.gen_test(timeout=15)
async def test_oversized_request_heads_get_431_or_414_with_a_json_body(served, head, status, error):
    reader, writer = await connect(served)
    writer.write(head)
    got, headers, body = await read_response(reader)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    parsed = json.loads(body)
    assert parsed["success"] is False and error in parsed["error"], parsed
    writer.close()
    assert await get(served, "/health") == 200  # and the server is fine


@pytest.mark.config({"server": {"max_header_bytes": 2048, "max_url_bytes": 512}})
@pytest.mark.gen_test(timeout=15)
async def test_head_limits_are_configurable(served):
    reader, writer = await connect(served)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
    assert (await read_response(reader))[0] == 431
    writer.close()
    reader, writer = await connect(served)
    writer.write(b"GET /health?" + b"a" * 600 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await read_response(reader))[0] == 414
    writer.close()
    reader, writer = await connect(served)
    writer.write(b"GET /health?" + b"a" * 400 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.gen_test(timeout=15)
async def test_oversized_head_gets_431_over_tls_too(io_loop, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    both = str(tmp_path / "both.pem")
    proxy = Proxy(config_from_dict({"tls": {"cert_file": both, "key_file": both}}))
    port = free_port()
    proxy.listen(port, address="127.0.0.1")
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert (await read_response(reader))[0] == 431
        writer.close()
    finally:
        await proxy.shutdown()


# -- the connection cap --------------------------------------------------------------------------


@pytest.mark.config({"limits": {"max_connections": 2}})
@pytest.mark.gen_test(timeout=20)
async def test_connections_over_max_connections_are_closed_at_once(served, caplog):
    """Viewers count (their streams are detached from HTTP but still hold a socket); the
    connection over the cap is closed before it sends anything; a slot frees when one closes."""
    client = AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{served}/session/create", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  body=json.dumps({"userId": "u", "robotName": "r"}))
    session_id = json.loads(response.body)["sessionId"]
    viewer = await websocket_connect(f"ws://127.0.0.1:{served}/stream/{session_id}?format=binary")
    assert await viewer.read_message() is not None
    _, idle = await connect(served)
    refused_reader, refused = await connect(served)
    assert await closed_after(refused_reader, 2) is not None, "a connection over the cap stayed open"
    refused.close()
    # Again: the warning is logged once per interval, not per refused connection.
    again_reader, again = await connect(served)
    assert await closed_after(again_reader, 2) is not None
    again.close()
    warnings = [r for r in caplog.records if "max_connections" in r.getMessage()]
    assert len(warnings) == 1, warnings
    viewer.close()

    async def health_answers() -> bool:
        try:
            return await get(served, "/health") == 200
        except ConnectionError:
            return False

    deadline = time.monotonic() + 5
    while not await health_answers():
        assert time.monotonic() < deadline, "no slot freed after the viewer left"
        await asyncio.sleep(0.05)
    idle.close()


# -- out of file descriptors ---------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health(port: int, timeout: float = 1) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as response:
        return response.status


@pytest.mark.slow
def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(tmp_path):
    """With the process at its fd limit, accepting pauses (low CPU, one log line, no traceback)
    and resumes by itself once connections close: /health answers again."""
    port = free_port()
    server = Server(["--port", str(port)], tmp_path)
    clients: list[socket.socket] = []
    try:
        server.wait_healthy(port)
        resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (48, 48))
        for _ in range(80):  # more than the limit: the rest wait in the listen backlog
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        before, start = process_cpu_seconds(server.process.pid), time.monotonic()
        time.sleep(2)
        cpu_share = (process_cpu_seconds(server.process.pid) - before) / (time.monotonic() - start)
        assert cpu_share < 0.2, f"the server used {cpu_share:.0%} of a CPU while out of descriptors"
        for client in clients:
            client.close()
        clients.clear()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert health(port) == 200
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "/health did not answer once the connections closed"
                time.sleep(0.05)
        assert server.signal_and_wait(signal.SIGTERM) == 0
    finally:
        for client in clients:
            client.close()
        server.stop()
    log = server.stderr()
    assert "Traceback" not in log, log[-3000:]
    accept_lines = [line for line in log.splitlines() if "cannot accept connections" in line]
    assert len(accept_lines) == 1, accept_lines
    assert "EMFILE" in accept_lines[0]


@pytest.mark.slow
def test_start_up_raises_the_soft_open_file_limit_to_the_hard_limit(tmp_path):
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE of 2048 or more, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the child inherits it
    try:
        server = Server(["--port", str(port)], tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        server.wait_healthy(port)
        assert resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        server.stop()
    assert server.stderr().count(f"raised the open-file limit from 1024 to {hard}") == 1


# -- the default bind ----------------------------------------------------------------------------


def start_up_lines(args: list[str], port: int, tmp_path, config: str | None = None) -> list[str]:
    """The log lines of a vsproxy process from start to a clean SIGTERM exit."""
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
    server = Server(["--port", str(port), *args], tmp_path)
    try:
        server.wait_healthy(port)
        assert server.signal_and_wait(signal.SIGTERM) == 0
    finally:
        server.stop()
    return server.stderr().splitlines()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the IPv4 sockets listening on `port`, read from /proc/net/tcp (no traffic)."""
    found = set()
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.slow
def test_binds_loopback_by_default_and_says_so(tmp_path):
    port = free_port()
    server = Server(["--port", str(port)], tmp_path)
    try:
        server.wait_healthy(port)
        assert listening_addresses(port) == {"127.0.0.1"}
        assert server.signal_and_wait(signal.SIGTERM) == 0
    finally:
        server.stop()
    lines = server.stderr().splitlines()
    assert any(f"listening on http://127.0.0.1:{port}/ " in line for line in lines), lines
    assert not any("WARNING" in line for line in lines), lines


@pytest.mark.slow
def test_ipv6_address_is_shown_in_brackets(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    server = Server(["--port", str(port), "--host", "::1"], tmp_path)
    try:
        deadline = time.monotonic() + 10
        while f"[::1]:{port}" not in server.stderr():
            if server.process.poll() is not None:
                pytest.skip(f"cannot bind ::1 here: {server.stderr()}")
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.05)
        assert f"listening on http://[::1]:{port}/ " in server.stderr()
    finally:
        server.stop()


def test_warns_when_listening_beyond_loopback_without_api_tokens(tmp_path):
    port = free_port()
    lines = start_up_lines(["--host", "0.0.0.0"], port, tmp_path)
    assert any(f"listening on http://0.0.0.0:{port}/ " in line for line in lines), lines
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "auth.api_tokens" in warnings[0], lines


def test_no_warning_beyond_loopback_with_api_tokens(tmp_path):
    port = free_port()
    lines = start_up_lines(["--host", "0.0.0.0"], port, tmp_path,
                           config='auth: {api_tokens: ["a-token-of-sixteen-chars"]}\n')
    assert not any("WARNING" in line for line in lines), lines


# -- config files that cannot be read ------------------------------------------------------------


def unreadable(path) -> str:
    """A path that exists but cannot be read, even by root: a link to /proc/self/mem (EIO)."""
    path.symlink_to("/proc/self/mem")
    return str(path.name)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: (d / "c.yaml").write_bytes(b"server:\n  port: 9\xff\n") and "c.yaml", ["c.yaml:2", "UTF-8"]),
    (lambda d: (d / "conf.d").mkdir() or "conf.d", ["conf.d", "directory"]),
    (lambda d: unreadable(d / "c.yaml"), ["c.yaml", "cannot be read"]),
], ids=["not-utf8", "directory", "unreadable"])
@pytest.mark.slow
def test_config_file_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, make, expected):
    result = run_vsproxy(["--config", make(tmp_path)], tmp_path)
    assert_one_line_config_error(result, *expected)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: (d / ".env").write_bytes(b"# ok\nISAAC_SIM_IP=\xff\n"), [".env:2", "UTF-8"]),
    (lambda d: unreadable(d / ".env"), [".env", "cannot be read"]),
], ids=["not-utf8", "unreadable"])
@pytest.mark.slow
def test_dotenv_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, make, expected):
    make(tmp_path)
    result = run_vsproxy([], tmp_path, env=clean_env())
    assert_one_line_config_error(result, *expected)


