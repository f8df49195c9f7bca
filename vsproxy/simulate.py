"""`vsproxy simulate`: a stand-in for Isaac Sim's WebSocket stream, for work without a GPU host.

It serves a WebSocket on every path, sends JPEG frames as binary messages to each client and logs
what clients send (the input a real simulator would act on). Tests and the benchmark use it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .render import TestPattern

log = logging.getLogger("vsproxy.simulate")


class _SimSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, sim: SimulatedIsaacSim) -> None:
        self.sim = sim

    def check_origin(self, origin: str) -> bool:
        return True  # a local development tool, like the simulator it stands in for

    def open(self, *args: Any) -> None:
        self.sim._client_opened(self)

    def on_message(self, message: str | bytes) -> None:
        self.sim._received(message)

    def on_close(self) -> None:
        self.sim._client_closed(self)


class SimulatedIsaacSim:
    """A WebSocket server that streams a test pattern to its clients.

    `frames` (if `keep_frames` > 0) keeps the last frames sent, and `received` the messages
    clients sent, so tests can check that bytes arrive unchanged in both directions.
    """

    def __init__(self, *, width: int = 1280, height: int = 720, fps: float = 30.0,
                 label: str = "simulated Isaac Sim", keep_frames: int = 0) -> None:
        self.width, self.height, self.fps, self.label = width, height, fps, label
        self.clients: set[_SimSocket] = set()
        self.connections_total = 0
        self.peak_clients = 0
        self.received: deque[str | bytes] = deque(maxlen=1000)
        self.frames: deque[bytes] = deque(maxlen=keep_frames or 1)
        self.frames_sent = 0
        self.port = 0  # where it listens, once it does
        self._server: HTTPServer | None = None
        self._task: asyncio.Task | None = None
        self._pattern: TestPattern | None = None

    def make_app(self) -> tornado.web.Application:
        return tornado.web.Application([(r"/.*", _SimSocket, {"sim": self})], websocket_ping_interval=10)

    def listen(self, port: int, address: str = "127.0.0.1") -> HTTPServer:
        """Serve on `port` (0: a free one); `self.port` is the port it listens on."""
        sockets = bind_sockets(port, address=address)
        self._server = HTTPServer(self.make_app())
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        log.info("simulated Isaac Sim streaming %dx%d at %g fps on ws://%s:%d/",
                 self.width, self.height, self.fps, address or "0.0.0.0", self.port)
        return self._server

    async def stop(self) -> None:
        """Stop listening and drop every client (as a simulator that crashed would)."""
        if self._server is not None:
            self._server.stop()
        for client in list(self.clients):
            client.close(1001, "simulator stopped")
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._server is not None:
            await self._server.close_all_connections()
            self._server = None

    def broadcast_text(self, text: str) -> None:
        for client in list(self.clients):
            client.write_message(text)

    def _client_opened(self, client: _SimSocket) -> None:
        self.clients.add(client)
        self.connections_total += 1
        self.peak_clients = max(self.peak_clients, len(self.clients))
        if len(self.clients) > 1:
            log.warning("%d clients connected: the real Isaac Sim serves only one", len(self.clients))
        log.info("client connected from %s", client.request.remote_ip)
        if self._task is None:
            self._task = asyncio.ensure_future(self._stream())

    def _client_closed(self, client: _SimSocket) -> None:
        self.clients.discard(client)
        log.info("client disconnected")

    def _received(self, message: str | bytes) -> None:
        self.received.append(message)
        shown = message if isinstance(message, str) else f"<{len(message)} bytes>"
        log.info("received from client: %s", shown[:200])

    async def _stream(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pattern is None:
            self._pattern = await loop.run_in_executor(
                None, TestPattern, self.width, self.height, self.label)
        interval = 1.0 / self.fps
        deadline = time.monotonic()
        number = 0
        while self.clients:
            jpeg = await loop.run_in_executor(None, self._pattern.render, number, time.time())
            self.frames.append(jpeg)
            for client in list(self.clients):
                try:
                    client.write_message(jpeg, binary=True)
                except tornado.websocket.WebSocketClosedError:
                    self.clients.discard(client)
            self.frames_sent += 1
            number += 1
            deadline = max(deadline + interval, time.monotonic() - interval)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        self._task = None
