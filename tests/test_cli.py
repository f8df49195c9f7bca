"""The `vsproxy` command as a user runs it: a real process, real signals, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tornado.websocket
from conftest import Api
from helpers import WhepClient, free_port, read_until_closed
from tornado.httpclient import HTTPRequest

from vsproxy import __version__

pytestmark = pytest.mark.slow  # every test starts `python -m vsproxy` in a subprocess

START_TIMEOUT = 10  # seconds until the server must answer /health
EXIT_TIMEOUT = 5  # seconds after a signal until the process must have exited


def two_free_ports() -> tuple[int, int]:
    first = free_port()
    while (second := free_port()) == first:
        pass
    return first, second


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any VIDEO_PROXY_* / ISAAC_SIM_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDEO_PROXY_", "ISAAC_SIM_", "VSPROXY_"))}
    env.update(extra)
    return env


def run_vsproxy(args: list[str], cwd: Path, env: dict | None = None,
                timeout: float = 20) -> subprocess.CompletedProcess:
    """Run `python -m vsproxy ARGS` to completion (for commands that exit on their own)."""
    return subprocess.run([sys.executable, "-m", "vsproxy", *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


class Server:
    """A `python -m vsproxy` process serving in the background; stderr goes to a file."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None) -> None:
        self.stderr_path = cwd / "vsproxy-stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "vsproxy", *args], cwd=cwd,
                                        env=env or clean_env(), stdout=subprocess.DEVNULL, stderr=self._stderr)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, port: int) -> dict:
        """Poll GET /health on 127.0.0.1:port until it answers; fail if the process dies or 10 s pass."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"vsproxy exited with {self.process.returncode}: {self.stderr()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vsproxy did not answer /health on port {port} within {START_TIMEOUT} s")
                time.sleep(0.1)

    def signal_and_wait(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=EXIT_TIMEOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_TIMEOUT)
        self._stderr.close()


def create_session(port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/session/create", method="POST",
        data=json.dumps({"userId": "cli-test", "robotName": "demo-robot"}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["sessionId"]


def open_mjpeg(port: int, session_id: str) -> socket.socket:
    """Open GET /stream/<id>/mjpeg on a raw socket and return it once the first JPEG has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET /stream/{session_id}/mjpeg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    received = b""
    while b"\xff\xd8" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"server closed the MJPEG stream early: {received[:300]!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"multipart/x-mixed-replace" in received
    return sock


def closed_by_server(sock: socket.socket, within: float = EXIT_TIMEOUT) -> bool:
    """Drain the socket: True once the server closes it (EOF or reset), False if still open after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


# -- commands that exit by themselves ----------------------------------------------------------


def test_version(tmp_path):
    result = run_vsproxy(["--version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"vsproxy {__version__}"


def assert_one_line_config_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in expected:
        assert part in lines[0], lines[0]


def test_bad_config_file_exits_2_with_one_line_naming_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("server:\n  prot: 9000\n")
    result = run_vsproxy(["--config", "bad.yaml", "--host", "127.0.0.1"], tmp_path)
    assert_one_line_config_error(result, "server.prot")


def test_bad_config_yaml_in_working_directory_exits_2(tmp_path):
    """The implicit ./config.yaml is validated just like one given with --config."""
    (tmp_path / "config.yaml").write_text("logging:\n  format: xml\n")
    result = run_vsproxy(["--host", "127.0.0.1"], tmp_path)
    assert_one_line_config_error(result, "logging.format")


def test_missing_config_file_exits_2_with_one_line(tmp_path):
    result = run_vsproxy(["--config", "missing.yaml", "--host", "127.0.0.1"], tmp_path)
    assert_one_line_config_error(result, "missing.yaml")


def test_bad_environment_variable_exits_2_naming_it(tmp_path):
    result = run_vsproxy(["--host", "127.0.0.1"], tmp_path, env=clean_env(VIDEO_PROXY_PORT="abc"))
    assert_one_line_config_error(result, "VIDEO_PROXY_PORT")


def test_out_of_range_port_flag_exits_2(tmp_path):
    result = run_vsproxy(["--host", "127.0.0.1", "--port", "70000"], tmp_path)
    assert_one_line_config_error(result, "server.port")


def test_check_prints_what_would_be_served_without_secrets_and_exits_0(tmp_path):
    """`vsproxy check` loads the configuration as serving would (the file, the environment, the
    flags), opens the session store, and exits 0 with a summary that names every upstream but
    shows no secret: no password, query token, API token or push token. It listens on nothing."""
    port = free_port()
    (tmp_path / "prod.yaml").write_text(json.dumps({
        "server": {"host": "0.0.0.0"},
        "upstreams": {"cam": {"kind": "mjpeg", "url": "http://admin:hunter2-pass@127.0.0.1:1/video?key=qs-secret"},
                      "pub": {"kind": "push", "token": "push-secret-token-1"}},
        "default_upstream": "cam",
        "auth": {"api_tokens": ["api-secret-token-0123456789"]},
        "sessions": {"store": "sqlite:sessions.db"},
    }))
    result = run_vsproxy(["check", "--config", "prod.yaml"], tmp_path,
                         env=clean_env(VIDEO_PROXY_PORT=str(port), ISAAC_SIM_IP="127.0.0.1"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("vsproxy: configuration OK\n"), out
    assert f"listen: http://0.0.0.0:{port}/" in out  # the environment applies, as when serving
    assert "upstream cam: mjpeg http://***@127.0.0.1:1/video (default)" in out
    assert "upstream pub: push" in out and "upstream isaac: isaac ws://127.0.0.1:8211/" in out
    assert "sessions: sqlite:sessions.db (0 stored)" in out and "API tokens: 1;" in out
    for secret in ("hunter2", "qs-secret", "push-secret", "api-secret"):
        assert secret not in out + result.stderr, secret
    assert "warning" not in out  # beyond this machine, but with API tokens
    with socket.create_server(("127.0.0.1", port)):  # nothing took the port
        pass


def test_check_of_a_cluster_node_names_it_and_hides_redis_credentials(tmp_path):
    """A cluster node's summary: its node ID and the URL the other nodes reach it by (as it will
    register them), sessions in Redis, and Redis's address without its password. Nothing is
    contacted: the Redis of this configuration does not exist."""
    port = free_port()
    (tmp_path / "node.yaml").write_text(json.dumps({"cluster": {
        "redis_url": "redis://:redis-secret-pass@127.0.0.1:1/0", "token": "cluster-token-0123456789abcdef"}}))
    result = run_vsproxy(["--port", str(port), "check", "--config", "node.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sessions: in Redis (the cluster's)" in result.stdout, result.stdout
    assert (f"cluster: node 127.0.0.1:{port}, reached by the others at http://127.0.0.1:{port}; "
            "Redis redis://***@127.0.0.1:1/0") in result.stdout, result.stdout
    assert "redis-secret" not in result.stdout + result.stderr and "cluster-token" not in result.stdout


def test_check_takes_every_serving_flag_after_the_command_too(tmp_path):
    """`vsproxy check --port 8890` checks what `vsproxy --port 8890` would serve (it was argparse's
    usage error, exit 2, as if the configuration were bad); a flag before the command still applies."""
    port = free_port()
    after = run_vsproxy(["check", "--host", "0.0.0.0", "--port", str(port), "--log-level", "warning"], tmp_path)
    before = run_vsproxy(["--host", "0.0.0.0", "--port", str(port), "--log-level", "warning", "check"], tmp_path)
    assert after.returncode == 0, after.stderr
    assert f"listen: http://0.0.0.0:{port}/" in after.stdout, after.stdout
    assert after.stdout == before.stdout
    assert_one_line_config_error(run_vsproxy(["check", "--port", "70000"], tmp_path), "server.port")


def test_check_exits_2_with_the_one_line_error_serving_would_print(tmp_path):
    """The same one line and exit 2 as `vsproxy` itself: the configuration, and what start-up
    opens before listening (a session store that cannot be used)."""
    (tmp_path / "bad.yaml").write_text("server:\n  prot: 9000\n")
    assert_one_line_config_error(run_vsproxy(["--config", "bad.yaml", "check"], tmp_path), "server.prot")
    (tmp_path / "store.yaml").write_text("sessions:\n  store: sqlite:missing-dir/s.db\n")
    serve = run_vsproxy(["--config", "store.yaml"], tmp_path)
    check = run_vsproxy(["check", "--config", "store.yaml"], tmp_path)
    assert_one_line_config_error(check, "sessions.store")
    assert check.stderr == serve.stderr and check.stdout == ""


def test_check_leaves_the_session_store_saying_when_the_server_went_away(tmp_path):
    """README: `vsproxy check` before a restart. The session store records when the server was
    last alive, so that after a restart downtime does not count as idleness. Before, the check
    closed the store with a commit that recorded itself as the server alive: a server down for an
    hour came back counting that hour as every session's idle time (a session idle 100 s at the
    stop had IDLE - 3700 s left, or was reaped at once)."""
    import sqlite3

    (tmp_path / "s.yaml").write_text("sessions:\n  store: sqlite:sessions.db\n")
    assert run_vsproxy(["check", "--config", "s.yaml"], tmp_path).returncode == 0  # creates the file
    stopped = time.time() - 3600  # the server went away an hour ago
    conn = sqlite3.connect(tmp_path / "sessions.db")
    conn.execute("INSERT INTO sessions VALUES ('stream_x', 'u', 'r', 'demo', ?, ?)", (stopped - 200, stopped - 100))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_alive', ?)", (stopped,))
    conn.commit()
    conn.close()
    result = run_vsproxy(["check", "--config", "s.yaml"], tmp_path)
    assert result.returncode == 0 and "(1 stored)" in result.stdout, result.stdout + result.stderr
    conn = sqlite3.connect(tmp_path / "sessions.db")
    assert conn.execute("SELECT value FROM meta WHERE key = 'last_alive'").fetchone()[0] == stopped
    assert conn.execute("SELECT last_activity FROM sessions").fetchall() == [(stopped - 100,)]
    conn.close()


def test_check_warns_of_a_wildcard_host_without_api_tokens(tmp_path):
    result = run_vsproxy(["--host", "0.0.0.0", "check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: listening on 0.0.0.0, beyond this machine, with auth.api_tokens empty" in result.stdout


def test_port_in_use_exits_1_without_traceback(tmp_path):
    """A busy port is reported in one log line that says what to do, and the process exits 1; the
    simulator's likewise."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        results = [run_vsproxy(["--host", "127.0.0.1", "--port", str(port)], tmp_path),
                   run_vsproxy(["simulate", "--host", "127.0.0.1", "--port", str(port)], tmp_path)]
    for result in results:
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert f"127.0.0.1:{port}: Address already in use" in line
        assert "choose another port with --port" in line


# -- a serving process -------------------------------------------------------------------------


async def open_websocket(port: int, session_id: str) -> tornado.websocket.WebSocketClientConnection:
    """A binary-format WebSocket viewer, returned once the server's first message has arrived."""
    conn = await tornado.websocket.websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{port}/stream/{session_id}?format=binary", connect_timeout=5, request_timeout=5))
    assert await conn.read_message() is not None
    return conn


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.gen_test(timeout=30)
async def test_graceful_shutdown_closes_viewers_and_exits_0(tmp_path, sig):
    """On SIGTERM/SIGINT the server tells WebSocket viewers it is going away (close code 1001),
    closes MJPEG streams and exits with status 0."""
    port = free_port()
    server = Server(["--host", "127.0.0.1", "--port", str(port)], tmp_path)
    sock = conn = None
    try:
        server.wait_healthy(port)
        session_id = create_session(port)
        sock = open_mjpeg(port, session_id)
        conn = await open_websocket(port, session_id)
        server.process.send_signal(sig)
        await asyncio.wait_for(read_until_closed(conn, timeout=None), EXIT_TIMEOUT)
        assert conn.close_code == 1001
        assert "shutting down" in (conn.close_reason or "")
        assert server.process.wait(timeout=EXIT_TIMEOUT) == 0, server.stderr()
        assert closed_by_server(sock), "the MJPEG connection was still open after the server exited"
        assert "Traceback" not in server.stderr()
    finally:
        if sock is not None:
            sock.close()
        if conn is not None:
            conn.close()
        server.stop()


def test_json_log_format(tmp_path):
    """--log-format json: every stderr line is a JSON object; session events carry the session ID."""
    port = free_port()
    server = Server(["--host", "127.0.0.1", "--port", str(port), "--log-format", "json"], tmp_path)
    try:
        server.wait_healthy(port)
        session_id = create_session(port)
        assert server.signal_and_wait(signal.SIGTERM) == 0
    finally:
        server.stop()
    lines = [line for line in server.stderr().splitlines() if line.strip()]
    assert lines, "no log output"
    entries = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    assert any(e.get("session") == session_id and "created" in e["message"] for e in entries), entries
    assert any(str(port) in e["message"] for e in entries), "no startup line naming the port"



@pytest.mark.gen_test(timeout=40)
async def test_a_webrtc_peer_logs_vsproxys_lines_not_ice_chatter(tmp_path):
    """At the default log level a WebRTC viewer is vsproxy's connect line, not aioice's several
    lines of candidate checks (with the peers' addresses) per peer; --log-level debug keeps them."""
    for level, chatter in (("info", False), ("debug", True)):
        port = free_port()
        server = Server(["--host", "127.0.0.1", "--port", str(port), "--log-level", level], tmp_path)
        client = None
        try:
            server.wait_healthy(port)
            session_id = create_session(port)
            client = WhepClient(Api(f"http://127.0.0.1:{port}"), f"/stream/{session_id}/whep")
            assert await client.connect() == 201
            await client.frames(3)
            assert server.signal_and_wait(signal.SIGTERM) == 0
        finally:
            if client is not None:
                await client.close()
            server.stop()
        log = server.stderr()
        assert "client connected (webrtc)" in log
        assert ("aioice" in log) is chatter, log

def test_port_flag_overrides_environment(tmp_path):
    env_port, flag_port = two_free_ports()
    server = Server(["--host", "127.0.0.1", "--port", str(flag_port)], tmp_path,
                    env=clean_env(VIDEO_PROXY_PORT=str(env_port)))
    try:
        assert server.wait_healthy(flag_port)["status"] == "healthy"
    finally:
        server.stop()


def test_dotenv_in_working_directory_is_read(tmp_path):
    """A .env next to where vsproxy is started sets the port, as with the original service."""
    port = free_port()
    (tmp_path / ".env").write_text(f"# local settings\nVIDEO_PROXY_PORT={port}\nISAAC_SIM_PORT=8299\n")
    server = Server(["--host", "127.0.0.1"], tmp_path)
    try:
        health = server.wait_healthy(port)
        assert health["isaac_sim_port"] == "8299"
    finally:
        server.stop()


def test_environment_overrides_dotenv_in_a_real_process(tmp_path):
    dotenv_port, env_port = two_free_ports()
    (tmp_path / ".env").write_text(f"VIDEO_PROXY_PORT={dotenv_port}\n")
    server = Server(["--host", "127.0.0.1"], tmp_path, env=clean_env(VIDEO_PROXY_PORT=str(env_port)))
    try:
        assert server.wait_healthy(env_port)["status"] == "healthy"
    finally:
        server.stop()


# -- vsproxy simulate --------------------------------------------------------------------------


async def first_binary_message(port: int) -> bytes:
    """Connect to the simulator (retrying while it starts) and return its first binary message."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            conn = await tornado.websocket.websocket_connect(
                HTTPRequest(f"ws://127.0.0.1:{port}/", connect_timeout=2, request_timeout=5))
            break
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        while True:
            message = await conn.read_message()
            assert message is not None, "simulator closed the connection"
            if isinstance(message, bytes):
                return message
    finally:
        conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_simulate_serves_jpeg_frames_over_websocket(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "vsproxy", "simulate", "--port", str(port),
                                "--width", "320", "--height", "240"],
                               cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        frame = await first_binary_message(port)
        assert frame.startswith(b"\xff\xd8")
        assert frame.rstrip(b"\x00").endswith(b"\xff\xd9")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=EXIT_TIMEOUT)


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--fps", "0", "expected 0.1 to 120, got 0"),  # accepted before, and then no frame was ever sent
    ("--fps", "nan", "expected 0.1 to 120, got nan"),
    ("--port", "70000", "expected 0 to 65535, got 70000"),
    ("--width", "5", "expected 16 to 7680, got 5"),
    ("--height", "tall", "expected an integer, got 'tall'"),
])
def test_simulate_refuses_flags_out_of_range_with_a_usage_error(flag, value, expected):
    result = subprocess.run([sys.executable, "-m", "vsproxy", "simulate", flag, value], env=clean_env(),
                            capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert result.returncode == 2, result
    assert f"argument {flag}: {expected}" in result.stderr, result.stderr


@pytest.mark.gen_test(timeout=30)
async def test_simulate_on_port_0_logs_the_port_it_listens_on(tmp_path):
    """It logged "ws://127.0.0.1:0/" before, leaving the port it took unknown."""
    process = subprocess.Popen([sys.executable, "-m", "vsproxy", "simulate", "--port", "0", "--width", "320",
                                "--height", "240"], cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.get_running_loop().run_in_executor(None, process.stderr.readline)
        found = re.search(r"on ws://127\.0\.0\.1:(\d+)/", line)
        assert found and found[1] != "0", line
        assert (await first_binary_message(int(found[1]))).startswith(b"\xff\xd8")
    finally:
        process.kill()
        process.wait(timeout=EXIT_TIMEOUT)
        process.stderr.close()
