"""Streaming end to end: frames from a simulated Isaac Sim (or the demo source) through the proxy to
WebSocket (JSON and binary), MJPEG and snapshot viewers, over real loopback sockets.

"Byte-identical" means every JPEG a viewer gets is one the simulator sent (`sim.frames`), and the
frames arrive in the order they were sent.
"""

from __future__ import annotations

import array
import asyncio
import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import termios
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import tornado.websocket
from helpers import free_port, wait_until
from mjpeg_reader import MjpegProtocolError, MjpegReader, Part, boundary_from_content_type
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from vsproxy import render
from vsproxy.outputs import WS_BINARY
from vsproxy.simulate import SimulatedIsaacSim

CONNECTED = {"type": "status", "message": "\u2705 Connected to video stream proxy"}
SIM_SIZE = (320, 240)  # the `sim` fixture's frames, and the demo source's size in tests
WAIT = 10.0  # generous bound for anything that should take well under a second


# -- helpers --------------------------------------------------------------------------------------






async def recv(conn: tornado.websocket.WebSocketClientConnection, timeout: float = WAIT) -> str | bytes | None:
    return await asyncio.wait_for(conn.read_message(), timeout)


def as_frame(message: str | bytes) -> tuple[bytes | None, dict | None]:
    """(JPEG, None) for a frame in either WebSocket format, else (None, the parsed JSON text)."""
    if isinstance(message, bytes):
        return message, None
    parsed = json.loads(message)
    if parsed.get("type") == "frame":
        return base64.b64decode(parsed["data"], validate=True), None
    return None, parsed


async def read_frames(conn, count: int, timeout: float = WAIT) -> tuple[list[bytes], list[dict]]:
    """The next `count` frames, and the text messages seen on the way."""
    frames: list[bytes] = []
    texts: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        message = await recv(conn, max(0.01, deadline - time.monotonic()))
        assert message is not None, f"connection closed after {len(frames)} frames (texts: {texts})"
        jpeg, text = as_frame(message)
        if jpeg is not None:
            frames.append(jpeg)
        else:
            texts.append(text)
    return frames, texts


async def read_until(conn, predicate: Callable[[str | bytes], bool], timeout: float = WAIT) -> list[str | bytes]:
    """Messages up to and including the first one matching `predicate`."""
    seen: list[str | bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = await recv(conn, max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            texts = [m[:200] for m in seen if isinstance(m, str) and text_type(m) != "frame"][-5:]
            raise AssertionError(f"no matching message within {timeout:g} s among {len(seen)}; "
                                 f"last non-frame texts: {texts}") from None
        assert message is not None, "the connection closed"
        seen.append(message)
        if predicate(message):
            return seen


def assert_sent_in_order(received: list[bytes], sim: SimulatedIsaacSim) -> None:
    """Every frame is byte-identical to one the simulator sent, and they came in sending order."""
    index = {jpeg: i for i, jpeg in enumerate(sim.frames)}
    positions = [index.get(jpeg) for jpeg in received]
    assert None not in positions, (
        f"frame(s) {[i for i, p in enumerate(positions) if p is None]} of {len(received)} "
        "are not byte-identical to any frame the simulator sent")
    assert positions == sorted(set(positions)), f"frames out of order or repeated: {positions}"


def text_type(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        return None
    return json.loads(message).get("type")


async def session_json(api, session_id: str) -> dict:
    code, body, _ = await api.call("GET", f"/session/{session_id}")
    assert code == 200, body
    return body["session"]


async def wait_session(api, session_id: str, what: str, check: Callable[[dict], bool],
                       timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        session = await session_json(api, session_id)
        if check(session):
            return session
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; session is {session}")
        await asyncio.sleep(0.05)


async def upstream_state(api, name: str = "isaac") -> str:
    code, body, _ = await api.call("GET", "/health")
    assert code == 200, body
    return next(u["state"] for u in body["upstreams"] if u["name"] == name)


async def connected_session(api) -> str:
    """A new session whose upstream is connected (so viewers get no "connecting" frames)."""
    session_id = (await api.create_session())["sessionId"]
    await wait_session(api, session_id, "the upstream to connect", lambda s: s["isIsaacSimConnected"])
    return session_id


def spawn(coro) -> asyncio.Task:
    return asyncio.ensure_future(coro)


async def record_frames(conn, arrivals: list[tuple[float, bytes]]) -> None:
    """Read a WebSocket forever, keeping (arrival time, JPEG) of every frame."""
    while True:
        message = await conn.read_message()
        if message is None:
            return
        jpeg, _ = as_frame(message)
        if jpeg is not None:
            arrivals.append((time.monotonic(), jpeg))


def count_between(arrivals: list[tuple[float, Any]], start: float, end: float) -> int:
    return sum(1 for t, _ in arrivals if start <= t < end)


class MjpegClient:
    """A raw-socket MJPEG viewer: the response head, then parts as they arrive."""

    def __init__(self, stream: IOStream, code: int, headers: httputil.HTTPHeaders) -> None:
        self.stream = stream
        self.code = code
        self.headers = headers
        self.reader = MjpegReader(boundary_from_content_type(headers["Content-Type"]))
        self.arrivals: list[tuple[float, Part]] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self.ended = asyncio.get_running_loop().create_future()
        self._task = spawn(self._pump())

    @classmethod
    async def open(cls, port: int, path: str, timeout: float = WAIT) -> MjpegClient:
        stream = await asyncio.wait_for(TCPClient().connect("127.0.0.1", port), timeout)
        await stream.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n".encode())
        head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n", max_bytes=65536), timeout)
        first, _, rest = head.decode("latin-1").partition("\r\n")
        start = httputil.parse_response_start_line(first)
        assert start.code == 200, f"MJPEG answered {first!r}"
        return cls(stream, start.code, httputil.HTTPHeaders.parse(rest))

    async def _pump(self) -> None:
        try:
            while True:
                data = await self.stream.read_bytes(65536, partial=True)
                for part in self.reader.feed(data):
                    self.arrivals.append((time.monotonic(), part))
                    self._queue.put_nowait(part)
        except StreamClosedError:
            pass
        except MjpegProtocolError as exc:
            self._queue.put_nowait(exc)
        finally:
            self._queue.put_nowait(None)
            if not self.ended.done():
                self.ended.set_result(None)

    async def next_part(self, timeout: float = WAIT) -> Part:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)
            raise AssertionError(f"the MJPEG stream ended after {self.reader.parts_read} parts")
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.stream.close()
        await asyncio.wait_for(asyncio.shield(self._task), WAIT)


@pytest.fixture
def mjpeg_open(io_loop, http_server, http_port):
    """`client = await mjpeg_open("/stream/<id>/mjpeg")`; closed at teardown."""
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


@pytest.fixture
def stalled_ws(http_server, http_port):
    """`sock = await stalled_ws(path)`: a WebSocket client that never reads after the handshake.

    Its socket has a 4 KiB receive buffer so the proxy's sends to it back up within a frame or two.
    """
    sockets: list[socket.socket] = []

    async def open_(path: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", http_port)), WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # byte by byte: read nothing past the handshake
            byte = await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT)
            assert byte, f"closed during the handshake: {head!r}"
            head += byte
        first, _, rest = head.decode("latin-1").partition("\r\n")
        assert httputil.parse_response_start_line(first).code == 101, head
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert httputil.HTTPHeaders.parse(rest).get("Sec-WebSocket-Accept") == accept.decode(), head
        return sock

    yield open_
    for sock in sockets:
        sock.close()


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
def proxy_config(request, proxy_config):
    """As conftest's, but pointed at `big_sim` or `dead_upstream` when a test asks for one."""
    for name in ("big_sim", "dead_upstream"):
        if name in request.fixturenames:
            port = request.getfixturevalue(name).port
            isaac = dataclasses.replace(proxy_config.isaac_sim, ip="127.0.0.1", ws_port=port)
            return dataclasses.replace(proxy_config, isaac_sim=isaac)
    return proxy_config


def hub_viewer_for(proxy, sock: socket.socket):
    """The hub's Viewer whose peer is this client socket (None once the hub dropped it)."""
    port = sock.getsockname()[1]
    for hub in proxy.hubs.values():
        for viewers in hub.viewers.values():
            for viewer in viewers:
                try:
                    if viewer.stream.socket is not None and viewer.stream.socket.getpeername()[1] == port:
                        return viewer
                except OSError:
                    continue
    return None


def backed_up(viewer) -> bool:
    """The viewer has bytes its socket would not take (busy) or a frame waiting for it (pending)."""
    return viewer.busy or viewer.pending is not None


def kernel_queue_bytes(sock: socket.socket) -> int:
    """Bytes in a TCP socket's send queue, not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    out = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
    return out[0]


def write_buffer_bytes(stream: IOStream) -> int:
    """Bytes the proxy's IOStream holds that the kernel has not taken (a private attribute, on purpose)."""
    buffer = stream._write_buffer
    return 0 if buffer is None else len(buffer)


# -- 1. frames arrive byte-identical and in order ---------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_ws_json_viewer_gets_status_then_identical_frames_in_order(sim, api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}")
    assert json.loads(await recv(conn)) == CONNECTED

    frames, texts = await read_frames(conn, 15)
    assert all(t["type"] == "status" and isinstance(t["message"], str) for t in texts), texts
    assert_sent_in_order(frames, sim)


@pytest.mark.gen_test(timeout=30)
async def test_ws_binary_viewer_gets_identical_jpeg_bytes_in_order(sim, api, ws_connect):
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    first = await recv(conn)
    assert isinstance(first, str), "status messages stay JSON text in the binary format"
    assert json.loads(first) == CONNECTED

    frames: list[bytes] = []
    while len(frames) < 15:
        message = await recv(conn)
        assert message is not None
        if isinstance(message, bytes):
            frames.append(message)
        else:
            assert json.loads(message)["type"] in ("status", "error"), message
    assert_sent_in_order(frames, sim)


@pytest.mark.gen_test(timeout=30)
async def test_mjpeg_viewer_gets_identical_parts_with_headers(sim, api, mjpeg_open):
    session_id = await connected_session(api)
    client = await mjpeg_open(f"/stream/{session_id}/mjpeg")

    content_type = client.headers["Content-Type"]
    assert content_type.split(";")[0].strip() == "multipart/x-mixed-replace"
    assert boundary_from_content_type(content_type)
    assert "no-cache" in client.headers["Cache-Control"]

    parts = [await client.next_part() for _ in range(15)]
    for part in parts:
        assert part.headers["content-type"] == "image/jpeg"
        assert int(part.headers["content-length"]) == len(part.body)
        assert abs(float(part.headers["x-timestamp"]) - time.time()) < 60
    seqs = [int(p.headers["x-frame-seq"]) for p in parts]
    assert seqs == sorted(set(seqs)), f"X-Frame-Seq must increase: {seqs}"
    stamps = [float(p.headers["x-timestamp"]) for p in parts]
    assert stamps == sorted(stamps), f"X-Timestamp must not go back: {stamps}"
    assert_sent_in_order([p.body for p in parts], sim)


@pytest.mark.gen_test(timeout=30)
async def test_snapshot_is_a_frame_the_upstream_sent(sim, api):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}/snapshot.jpg"
    deadline = time.monotonic() + WAIT
    while True:  # 503 until the first frame arrives
        code, _, response = await api.call("GET", path)
        if code == 200 or time.monotonic() > deadline:
            break
        assert code == 503
        await asyncio.sleep(0.05)
    assert code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.body in sim.frames
    assert int(response.headers["X-Frame-Seq"]) >= 1

    # Snapshots follow the stream: a later one is a later frame.
    deadline = time.monotonic() + WAIT
    while True:
        _, _, later = await api.call("GET", path)
        if later.body != response.body or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert_sent_in_order([response.body, later.body], sim)


# -- 2. snapshot before any frame ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_snapshot_before_any_frame_is_503_json(dead_upstream, api):
    session_id = (await api.create_session())["sessionId"]
    code, body, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert body["success"] is False and body["error"]
    assert (await session_json(api, session_id))["isIsaacSimConnected"] is False


# -- 3. one upstream connection for all sessions -----------------------------------------------------


@pytest.mark.config({"streaming": {"linger_seconds": 0.3}})
@pytest.mark.gen_test(timeout=30)
async def test_sessions_share_one_upstream_connection_closed_after_linger(sim, api, ws_connect):
    first = await connected_session(api)
    second = (await api.create_session("user456", "other-robot"))["sessionId"]
    conns = [await ws_connect(f"/stream/{sid}?format=binary") for sid in (first, second)]
    for conn in conns:
        frames, _ = await read_frames(conn, 5)
        assert_sent_in_order(frames, sim)
    assert sim.peak_clients == 1
    assert sim.connections_total == 1

    code, _, _ = await api.call("DELETE", f"/session/{first}")
    assert code == 200
    code, _, _ = await api.call("POST", f"/session/{second}/destroy")
    assert code == 200
    await wait_until(lambda: not sim.clients, what="the upstream connection to close after the linger")
    assert sim.connections_total == 1


@pytest.mark.config({"streaming": {"linger_seconds": 2.0}})
@pytest.mark.gen_test(timeout=30)
async def test_session_created_during_linger_reuses_the_upstream_connection(sim, api, ws_connect):
    first = await connected_session(api)
    conn = await ws_connect(f"/stream/{first}?format=binary")
    await read_frames(conn, 3)

    code, _, _ = await api.call("DELETE", f"/session/{first}")
    assert code == 200
    destroyed_at = time.monotonic()
    second = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{second}?format=binary")

    # Keep watching past the end of the first session's linger: frames keep coming, all real ones.
    frames: list[bytes] = []
    while time.monotonic() < destroyed_at + 3.0:
        batch, _ = await read_frames(conn, 1)
        frames += batch
    assert_sent_in_order(frames, sim)
    assert sim.connections_total == 1, "the upstream was reconnected"
    assert len(sim.clients) == 1
    assert (await session_json(api, second))["isIsaacSimConnected"] is True


@pytest.mark.config({"streaming": {"linger_seconds": 0}})
@pytest.mark.gen_test(timeout=60)
async def test_upstream_closes_when_the_last_session_ends_while_frames_pour_in(sim, api, ws_connect):
    """Stopping the upstream must work however busy its reader is (here: a burst of queued frames)."""
    for cycle in range(1, 4):
        session_id = await connected_session(api)
        conn = await ws_connect(f"/stream/{session_id}?format=binary")
        await read_frames(conn, 2)
        jpeg = sim.frames[-1]
        for client in list(sim.clients):
            for _ in range(2000):
                client.write_message(jpeg, binary=True)
        code, _, _ = await api.call("DELETE", f"/session/{session_id}")
        assert code == 200
        await wait_until(lambda: not sim.clients, what=f"the upstream connection to close (cycle {cycle})")
        deadline = time.monotonic() + WAIT
        while (state := await upstream_state(api)) != "idle":
            assert time.monotonic() < deadline, f"upstream state stayed {state!r} (cycle {cycle})"
            await asyncio.sleep(0.05)
    assert sim.connections_total == 3


# -- 4. messages both ways -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_viewer_messages_reach_the_upstream_unchanged(sim, api, ws_connect):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    await read_frames(json_viewer, 1)
    await read_frames(binary_viewer, 1)

    text = '{"type":"control","command":"move","speed":0.5,"note":"caf\u00e9 \u2705"}'
    blob = bytes(range(256)) * 3
    await json_viewer.write_message(text)
    await json_viewer.write_message(blob, binary=True)
    await binary_viewer.write_message("from the binary viewer")
    await wait_until(lambda: len(sim.received) >= 3, what="3 messages at the upstream")
    received = list(sim.received)
    assert text in received and isinstance(received[received.index(text)], str)
    assert blob in received and isinstance(received[received.index(blob)], bytes)
    assert "from the binary viewer" in received
    assert len(received) == 3


@pytest.mark.gen_test(timeout=30)
async def test_upstream_text_reaches_websocket_viewers_unchanged(sim, api, ws_connect):
    session_id = await connected_session(api)
    viewers = [await ws_connect(f"/stream/{session_id}{query}") for query in ("", "?format=binary")]
    for conn in viewers:
        await read_frames(conn, 1)

    telemetry = '{"type":"telemetry","x":1}'
    sim.broadcast_text(telemetry)
    for conn in viewers:
        seen = await read_until(conn, lambda m: isinstance(m, str) and m == telemetry)
        assert seen[-1] == telemetry


@pytest.mark.gen_test(timeout=30)
async def test_upstream_frame_sent_as_json_text_is_treated_as_a_frame(sim, api, ws_connect):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    for conn in (json_viewer, binary_viewer):
        await read_frames(conn, 1)

    jpeg = render.status_frame(*SIM_SIZE, "test", "a frame sent as JSON text")
    assert jpeg not in sim.frames
    sim.broadcast_text(json.dumps({"type": "frame", "data": base64.b64encode(jpeg).decode()}))

    seen = await read_until(binary_viewer, lambda m: m == jpeg)
    assert not [m for m in seen if text_type(m) == "frame"], "the frame was relayed as text"
    await read_until(json_viewer, lambda m: as_frame(m)[0] == jpeg)
    code, _, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 200 and response.body in [*sim.frames, jpeg]


# -- 5. upstream loss and recovery ---------------------------------------------------------------


@pytest.mark.config({"streaming": {"offline_frame_interval_seconds": 0.2}})
@pytest.mark.gen_test(timeout=60)
async def test_viewers_survive_upstream_restart_on_the_same_port(sim, api, ws_connect, mjpeg_open):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg")
    for conn in (json_viewer, binary_viewer):
        frames, _ = await read_frames(conn, 3)
        assert_sent_in_order(frames, sim)
    assert (await mjpeg.next_part()).body in sim.frames

    port = sim.port
    await sim.stop()

    # JSON viewers are told, and stay connected.
    seen = await read_until(json_viewer, lambda m: text_type(m) == "error")
    error = json.loads(seen[-1])
    assert error["message"]
    await read_until(json_viewer, lambda m: text_type(m) == "status")
    session = await wait_session(api, session_id, "isIsaacSimConnected to go false",
                                 lambda s: not s["isIsaacSimConnected"])
    assert session["connections"] == 3

    # Image viewers get "offline" pictures, at least two of them (one every 0.2 s).
    offline: list[bytes] = []
    while len(offline) < 2:
        frames, _ = await read_frames(binary_viewer, 1)
        offline += [f for f in frames if f not in sim.frames]
    offline_parts: list[bytes] = []
    while len(offline_parts) < 2:
        body = (await mjpeg.next_part()).body
        if body not in sim.frames:
            offline_parts.append(body)
    for jpeg in offline + offline_parts:
        assert render.is_jpeg(jpeg)
        assert render.jpeg_size(jpeg) == SIM_SIZE, "the offline picture keeps the stream's size"
    code, _, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 200 and render.is_jpeg(response.body) and response.body not in sim.frames

    # The simulator comes back on the same port: frames resume on the same connections.
    restarted = SimulatedIsaacSim(width=SIM_SIZE[0], height=SIM_SIZE[1], fps=30, keep_frames=600)
    restarted.listen(port)
    try:
        await read_until(json_viewer, lambda m: as_frame(m)[0] in restarted.frames)
        await read_until(binary_viewer, lambda m: isinstance(m, bytes) and m in restarted.frames)
        deadline = time.monotonic() + WAIT
        while (await mjpeg.next_part(max(0.01, deadline - time.monotonic()))).body not in restarted.frames:
            pass
        frames, _ = await read_frames(binary_viewer, 5)
        assert_sent_in_order(frames, restarted)
        session = await wait_session(api, session_id, "isIsaacSimConnected to go true again",
                                     lambda s: s["isIsaacSimConnected"])
        assert session["connections"] == 3
        assert restarted.connections_total == 1
    finally:
        await restarted.stop()


# -- 6. a slow viewer does not hold back the others -----------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_stalled_viewer_does_not_slow_others_and_stays_bounded(big_sim, proxy, api, ws_connect,
                                                                     stalled_ws, tasks):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}?format=binary"
    arrivals: list[list[tuple[float, bytes]]] = [[], [], []]
    for record in arrivals:
        conn = await ws_connect(path)
        tasks.append(spawn(record_frames(conn, record)))
    await wait_until(lambda: all(len(a) >= 5 for a in arrivals), what="the normal viewers to get frames")

    window = 3.0
    start, sent_before = time.monotonic(), big_sim.frames_sent
    await asyncio.sleep(window)
    baseline = [count_between(a, start, start + window) for a in arrivals]
    baseline_sim = big_sim.frames_sent - sent_before

    sock = await stalled_ws(path)
    await wait_until(lambda: hub_viewer_for(proxy, sock) is not None, what="the proxy to list the stalled viewer")
    stalled = hub_viewer_for(proxy, sock)
    await wait_until(lambda: backed_up(stalled), what="the stalled viewer to back up")
    frame_bytes = len(proxy.hubs["isaac"].latest.encoded(WS_BINARY))
    dropped_before = stalled.frames_dropped

    start, sent_before = time.monotonic(), big_sim.frames_sent
    largest_buffer = largest_kernel_queue = 0
    while time.monotonic() < start + window:
        largest_buffer = max(largest_buffer, write_buffer_bytes(stalled.stream))
        largest_kernel_queue = max(largest_kernel_queue, kernel_queue_bytes(stalled.stream.socket))
        frame_bytes = max(frame_bytes, len(proxy.hubs["isaac"].latest.encoded(WS_BINARY)))
        await asyncio.sleep(0.02)
    during = [count_between(a, start, start + window) for a in arrivals]
    during_sim = big_sim.frames_sent - sent_before

    detail = f"baseline {baseline} of {baseline_sim} sent, with a stalled viewer {during} of {during_sim} sent"
    baseline_rate = sum(baseline) / len(baseline)
    assert baseline_rate > 0, detail
    for count in during:
        assert count >= 0.9 * baseline_rate, detail
    assert backed_up(stalled), "the stalled viewer drained without reading?"
    assert hub_viewer_for(proxy, sock) is stalled, "the stalled viewer was dropped before its stall timeout"
    # What the proxy holds for it stays under two frames, in Tornado's buffer and in the kernel's.
    assert largest_buffer < 2 * frame_bytes, f"write buffer reached {largest_buffer} bytes (frame: {frame_bytes})"
    assert largest_kernel_queue < 2 * frame_bytes, (
        f"socket send queue reached {largest_kernel_queue} bytes (frame: {frame_bytes})")
    assert stalled.frames_dropped > dropped_before
    print(detail, f"; stalled viewer: largest write buffer {largest_buffer} B, send queue {largest_kernel_queue} B, "
          f"frame {frame_bytes} B, "
          f"dropped {stalled.frames_dropped - dropped_before}")


@pytest.mark.config({"streaming": {"stall_timeout_seconds": 1.5}})
@pytest.mark.gen_test(timeout=60)
async def test_stalled_viewer_is_disconnected_after_the_stall_timeout(big_sim, proxy, api, ws_connect,
                                                                      stalled_ws, tasks):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}?format=binary"
    normal: list[tuple[float, bytes]] = []
    tasks.append(spawn(record_frames(await ws_connect(path), normal)))  # a viewer that keeps reading
    sock = await stalled_ws(path)
    await wait_until(lambda: hub_viewer_for(proxy, sock) is not None, what="the proxy to list the stalled viewer")
    stalled = hub_viewer_for(proxy, sock)
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)
    await wait_until(lambda: backed_up(stalled), what="the stalled viewer to back up")
    stalled_at = time.monotonic()

    hub = proxy.hubs["isaac"]
    await wait_until(lambda: stalled not in hub.viewers[WS_BINARY], timeout=15,
                     what="the hub to drop the stalled viewer")
    took = time.monotonic() - stalled_at
    await wait_session(api, session_id, "connections to drop to 1", lambda s: s["connections"] == 1)

    # The proxy closed the socket: reading it now reaches the end (or a reset).
    loop = asyncio.get_running_loop()

    async def read_to_end() -> None:
        try:
            while await loop.sock_recv(sock, 1 << 16):
                pass
        except ConnectionResetError:
            pass

    await asyncio.wait_for(read_to_end(), WAIT)
    received = len(normal)
    await wait_until(lambda: len(normal) >= received + 5, what="the other viewer to stream on")
    assert all(render.is_jpeg(jpeg) for _, jpeg in normal)
    print(f"stalled viewer dropped {took:.1f} s after it backed up")


# -- 7. per-viewer fps cap, refused handshakes ---------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_fps_parameter_caps_one_viewer(sim, api, ws_connect, mjpeg_open, tasks):
    session_id = await connected_session(api)
    uncapped: list[tuple[float, bytes]] = []
    capped: list[tuple[float, bytes]] = []
    tasks.append(spawn(record_frames(await ws_connect(f"/stream/{session_id}?format=binary"), uncapped)))
    tasks.append(spawn(record_frames(await ws_connect(f"/stream/{session_id}?format=binary&fps=5"), capped)))
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg?fps=5")
    await wait_until(lambda: uncapped and capped and mjpeg.arrivals, what="all three viewers to get a frame")

    window = 3.0
    start = time.monotonic()
    await asyncio.sleep(window)
    counts = {name: count_between(arrivals, start, start + window)
              for name, arrivals in (("uncapped", uncapped), ("capped", capped), ("mjpeg capped", mjpeg.arrivals))}
    assert counts["uncapped"] >= 24, f"the simulator should deliver well over 5 fps: {counts}"
    assert 0 < counts["capped"] <= 5 * window + 3, counts
    assert 0 < counts["mjpeg capped"] <= 5 * window + 3, counts
    assert_sent_in_order([jpeg for _, jpeg in capped], sim)


@pytest.mark.parametrize("query", ["fps=abc", "fps=0", "fps=121", "fps=nan", "format=xml", "format=binary&fps=-1"])
@pytest.mark.gen_test(timeout=30)
async def test_invalid_stream_parameters_refuse_the_handshake_with_400(sim, api, ws_connect, query):
    session_id = (await api.create_session())["sessionId"]
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(f"/stream/{session_id}?{query}")
    assert refused.value.code == 400
    if "fps" in query and "format" not in query:
        code, body, _ = await api.call("GET", f"/stream/{session_id}/mjpeg?{query}")
        assert code == 400 and body["success"] is False and "fps" in body["error"]
    assert (await session_json(api, session_id))["connections"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_unknown_session_is_404_on_every_stream_endpoint(sim, api, ws_connect):
    unknown = "stream_1700000000000_" + "0" * 32
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(f"/stream/{unknown}")
    assert refused.value.code == 404
    for path in (f"/stream/{unknown}/mjpeg", f"/stream/{unknown}/snapshot.jpg"):
        code, body, response = await api.call("GET", path)
        assert code == 404, path
        assert response.headers["Content-Type"].startswith("application/json"), path
        assert body == {"success": False, "error": "Session not found"}, path
    assert sim.connections_total == 0, "no session, no upstream connection"


# -- 8. connection counting and session teardown --------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_connections_count_viewers_across_transports(sim, api, ws_connect, mjpeg_open):
    session_id = await connected_session(api)
    assert (await session_json(api, session_id))["connections"] == 0
    conn = await ws_connect(f"/stream/{session_id}")
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg")
    await mjpeg.next_part()
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)

    conn.close()
    await wait_session(api, session_id, "1 connection", lambda s: s["connections"] == 1)
    await mjpeg.aclose()
    await wait_session(api, session_id, "0 connections", lambda s: s["connections"] == 0)
    hub = next(iter(h for h in (await api.call("GET", "/health"))[1]["upstreams"] if h["name"] == "isaac"))
    assert hub["viewers"] == {"ws_json": 0, "ws_binary": 0, "mjpeg": 0}


@pytest.mark.gen_test(timeout=30)
async def test_destroying_a_session_closes_its_viewers(sim, api, ws_connect, http_port):
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    await read_frames(conn, 1)

    # A plain HTTP client on the MJPEG stream: the response must end when the session does.
    chunks: list[bytes] = []
    head: list[str] = []
    request = HTTPRequest(f"http://127.0.0.1:{http_port}/stream/{session_id}/mjpeg", request_timeout=60,
                          streaming_callback=chunks.append, header_callback=head.append)
    fetch = spawn(AsyncHTTPClient().fetch(request, raise_error=False))
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)
    await asyncio.sleep(0.3)  # let a few parts through

    code, body, _ = await api.call("DELETE", f"/session/{session_id}")
    assert code == 200 and body["success"] is True

    while (message := await recv(conn)) is not None:
        assert isinstance(message, bytes) or text_type(message) in ("status", "error")
    assert conn.close_code == 1001
    assert "Session" in (conn.close_reason or "")

    response = await asyncio.wait_for(fetch, WAIT)
    assert response.code == 200
    content_type = next(line.split(":", 1)[1].strip() for line in head if line.lower().startswith("content-type:"))
    parts = MjpegReader(boundary_from_content_type(content_type)).feed(b"".join(chunks))
    assert parts, "no MJPEG part before the session ended"
    assert_sent_in_order([p.body for p in parts], sim)

    code, _, _ = await api.call("GET", f"/session/{session_id}")
    assert code == 404


# -- 9. the demo source -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_demo_source_streams_changing_jpegs_of_the_configured_size(api, ws_connect, proxy):
    assert proxy.config.isaac_ws_url is None, "this test needs the demo source"
    session_id = await connected_session(api)
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    frames, _ = await read_frames(conn, 6)
    for jpeg in frames:
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
        assert render.jpeg_size(jpeg) == SIM_SIZE
    for before, after in zip(frames, frames[1:], strict=False):
        assert before != after, "successive demo frames must differ"
    session = await session_json(api, session_id)
    assert session["upstream"] == "demo"


# -- the MJPEG reader the tests rely on ---------------------------------------------------------------


def test_mjpeg_reader_splits_parts_fed_in_any_chunking():
    bodies = [b"\xff\xd8first\r\n--notit\xff\xd9", b"", b"\xff\xd8" + b"x" * 3000 + b"\xff\xd9"]
    stream = b"preamble\r\n--b1\r\n" + b"".join(
        b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n--b1\r\n" % (len(b), b) for b in bodies)
    stream += b"Content-Type: text/plain\r\n\r\nno length here\r\n--b1--\r\nepilogue"
    for chunk_size in (1, 7, len(stream)):
        reader = MjpegReader("b1")
        parts = []
        for i in range(0, len(stream), chunk_size):
            parts += reader.feed(stream[i:i + chunk_size])
        assert [p.body for p in parts] == [*bodies, b"no length here"]
        assert parts[0].headers == {"content-type": "image/jpeg", "content-length": str(len(bodies[0]))}
        assert reader.closed


def test_mjpeg_reader_checks_boundary_after_content_length():
    reader = MjpegReader("b1")
    with pytest.raises(MjpegProtocolError):
        reader.feed(b"--b1\r\nContent-Length: 2\r\n\r\nabc\r\n--b1\r\n")
    assert boundary_from_content_type('multipart/x-mixed-replace; boundary="a b"') == "a b"
    assert boundary_from_content_type("multipart/x-mixed-replace;boundary=frame") == "frame"
    with pytest.raises(MjpegProtocolError):
        boundary_from_content_type("image/jpeg")
