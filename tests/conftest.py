"""Shared fixtures: the proxy on a real loopback port (pytest-tornado), a simulated Isaac Sim
upstream, and small clients for the REST API and WebSockets.

Per-test configuration: `@pytest.mark.config({"streaming": {"linger_seconds": 0.2}})` merges into
the test config (the YAML's shape). Requesting the `sim`, `big_sim` or `dead_upstream` fixture points
the proxy's Isaac Sim upstream at it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tornado.websocket
from helpers import OPEN_WEBSOCKETS, MjpegClient, free_port
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

import vsproxy
from vsproxy.app import Proxy
from vsproxy.config import Config, config_from_dict
from vsproxy.simulate import SimulatedIsaacSim

# Fast retries so reconnect tests finish in seconds; everything else stays at its default.
TEST_DEFAULTS: dict[str, Any] = {
    "reconnect": {"initial_delay_seconds": 0.1, "max_delay_seconds": 0.5, "connect_timeout_seconds": 2},
    "demo": {"width": 320, "height": 240, "fps": 30},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def sim(io_loop):
    """A simulated Isaac Sim WebSocket server on loopback (320x240 at 30 fps, keeps its frames)."""
    simulator = SimulatedIsaacSim(width=320, height=240, fps=30, keep_frames=600)
    simulator.port = free_port()
    simulator.listen(simulator.port)
    yield simulator
    io_loop.run_sync(simulator.stop)


@pytest.fixture
def big_sim(io_loop):
    """A simulated Isaac Sim with 1280x720 frames (~37 KB), so a stalled viewer's buffers fill fast."""
    simulator = SimulatedIsaacSim(width=1280, height=720, fps=30)
    simulator.port = free_port()
    simulator.listen(simulator.port)
    yield simulator
    io_loop.run_sync(simulator.stop)


@pytest.fixture
def dead_upstream():
    """A port that refuses connections (bound, never listening): an Isaac Sim that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield SimpleNamespace(port=sock.getsockname()[1])


@pytest.fixture
def proxy_config(request) -> Config:
    tree = merge({}, TEST_DEFAULTS)
    for name in ("sim", "big_sim", "dead_upstream"):
        if name in request.fixturenames:
            upstream = request.getfixturevalue(name)
            tree = merge(tree, {"isaac_sim": {"ip": "127.0.0.1", "ws_port": upstream.port}})
    for marker in reversed(list(request.node.iter_markers("config"))):
        tree = merge(tree, marker.args[0])
    return config_from_dict(tree)


@pytest.fixture
def proxy(io_loop, proxy_config):
    instance = Proxy(proxy_config)
    instance.start_background_tasks()
    yield instance
    io_loop.run_sync(instance.shutdown, timeout=20)  # a hub that will not stop fails, not hangs


@pytest.fixture
def app(proxy):
    return proxy.make_app()


@pytest.fixture
def base_url(http_port):
    # 127.0.0.1, not pytest-tornado's "localhost": the server socket is bound there.
    return f"http://127.0.0.1:{http_port}"


class Api:
    """The REST API as named calls; every call returns (status, JSON body or None, response)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.client = AsyncHTTPClient()

    async def call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                   raw: bytes | None = None) -> tuple[int, Any, HTTPResponse]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        headers = dict(headers or {})
        if method == "POST" and not any(name.lower() == "content-type" for name in headers):
            # The JSON API's POSTs need it (415 otherwise); Tornado's client would say form-urlencoded.
            headers["Content-Type"] = "application/json"
        request = HTTPRequest(self.base_url + path, method=method, body=data, headers=headers,
                              request_timeout=10, allow_nonstandard_methods=True)
        response = await self.client.fetch(request, raise_error=False)
        try:
            parsed = json.loads(response.body) if response.body else None
        except ValueError:
            parsed = None
        return response.code, parsed, response

    async def create_session(self, user: str = "user123", robot: str = "demo-robot") -> dict:
        code, body, _ = await self.call("POST", "/session/create", {"userId": user, "robotName": robot})
        assert code == 200, body
        return body


@pytest.fixture
def api(http_server, base_url):
    return Api(base_url)


@pytest.fixture
def ws_connect(http_server, http_port):
    """`conn = await ws_connect("/stream/<id>?format=binary")`; closed at teardown."""
    conns = []

    async def connect(path: str, **kwargs: Any) -> tornado.websocket.WebSocketClientConnection:
        request = HTTPRequest(f"ws://127.0.0.1:{http_port}{path}", connect_timeout=5, request_timeout=5,
                              headers=kwargs.pop("headers", None))
        conn = await tornado.websocket.websocket_connect(request, **kwargs)
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        conn.close()


@pytest.fixture
def mjpeg_open(io_loop, http_server, http_port):
    """`client = await mjpeg_open("/stream/<id>/mjpeg")`: a reading MjpegClient; closed at teardown."""
    clients: list[MjpegClient] = []

    async def open_(path: str) -> MjpegClient:
        client = await MjpegClient.open(http_port, path)
        clients.append(client)
        return client

    yield open_

    async def close_all() -> None:
        for client in clients:
            await client.aclose()

    io_loop.run_sync(close_all)


@pytest.fixture
def tasks(io_loop):
    """Background tasks of a test, cancelled at teardown."""
    started: list[asyncio.Task] = []
    yield started

    async def cancel_all() -> None:
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)

    io_loop.run_sync(cancel_all)


@pytest.fixture(autouse=True)
def close_websockets():
    """Close the WebSocket clients helpers.ws_open made during the test."""
    yield
    while OPEN_WEBSOCKETS:
        OPEN_WEBSOCKETS.pop().close()


_PACKAGE = str(Path(vsproxy.__file__).resolve().parent)


class _Tracebacks(logging.Handler):
    """Collects log records that carry a traceback through vsproxy's own code: an exception nobody
    handled in a callback, a timer or a task of the app (Tornado and asyncio log those and carry
    on). Tracebacks only through test code or libraries (a test's fake server) do not count."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and any(frame.filename.startswith(_PACKAGE)
                                   for frame in traceback.extract_tb(record.exc_info[2])):
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_unhandled_exceptions(request):
    """A test fails if the in-process app logged an unhandled exception while it ran: Tornado and
    asyncio only log them, so a broken timer (the dashboard's sampling, say) would go unnoticed.
    A test that provokes one on purpose marks itself `allow_tracebacks`."""
    handler = _Tracebacks()
    loggers = [logging.getLogger(name) for name in ("tornado.application", "asyncio", "vsproxy")]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)
    if handler.records and request.node.get_closest_marker("allow_tracebacks") is None:
        first = handler.records[0]
        text = logging.Formatter().formatException(first.exc_info) if first.exc_info else ""
        pytest.fail(f"{len(handler.records)} unhandled exception(s) logged; the first, by {first.name}: "
                    f"{first.getMessage()}\n{text}", pytrace=False)
