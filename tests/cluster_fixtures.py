"""A real Redis for the cluster tests: Debian's `redis-server` on a free loopback port.

`redis_server` starts one per test (no persistence: `--save '' --appendonly no`), fails the test
when the binary is missing (never skips), and stops it at teardown. `RedisServer.stop()` and
`start()` again on the same port are the "Redis down" and "Redis back" of the outage tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, its log in `workdir`."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server") or REDIS_SERVER
        if not Path(self.binary).is_file():
            pytest.fail("redis-server is not installed (Debian package redis-server; tests/install-and-run.sh "
                        "installs it)")
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on port {self.port} within 10 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), its raw answer: for checks without a client library."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            return sock.recv(1 << 20)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
