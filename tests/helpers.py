"""Small helpers shared by the test modules: one place for each (ports, waiting and polling,
WebSocket readers, raw HTTP requests, MJPEG viewers, a WHEP client), and the credentials the security tests
configure."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import tornado.websocket
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from mjpeg_reader import MjpegProtocolError, MjpegReader, Part, boundary_from_content_type
from tornado import httputil
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

T = TypeVar("T")

# Generous: tests wait on conditions, and only a failing test ever waits this long.
WAIT = 20.0
# The bound for one network step that should take well under a second (fails before a test's own timeout).
QUICK = 10.0

# -- credentials and origins the security tests configure ------------------------------------------

API_TOKEN = "api-token-0123456789abcdefXYZ"
OTHER_TOKEN = "api-token-9876543210fedcbaQRS"  # well-formed, not configured
METRICS_TOKEN = "metrics-token-0123456789abcdef"
VIEWER_SECRET = "viewer-secret-0123456789abcdef0123456789abcdef"
OPERATOR_USER, OPERATOR_PASSWORD = "operator", "operator-password-4711"
PUBLISH_TOKEN = "publish-token-123"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
FRONTEND = "http://localhost:3000"  # the default allowed origin
EVIL = "http://evil.example"
CREATE = {"userId": "user123", "robotName": "demo-robot"}
CONNECTED = {"type": "status", "message": "\u2705 Connected to video stream proxy"}

API_AUTH = {"auth": {"api_tokens": [API_TOKEN]}}
VIEWER_AUTH = {"auth": {"viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}}


def basic(user: str, password: str) -> dict[str, str]:
    """An HTTP Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def flip(token: str, index: int = -10) -> str:
    """The token with one signature character changed (a forgery attempt)."""
    chars = list(token)
    chars[index] = "A" if chars[index] != "A" else "B"
    return "".join(chars)


# -- ports, waiting and polling --------------------------------------------------------------------


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(condition: Callable[[], Any], what: str = "condition", timeout: float = WAIT) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def poll(get: Callable[[], Awaitable[T]], check: Callable[[T], Any], what: str, timeout: float = WAIT,
               *, last: str = "last seen") -> T:
    """Await `get()` until `check(value)`; return that value, or fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; {last}: {value}")
        await asyncio.sleep(0.05)


async def retry_while(get: Callable[[], Awaitable[T]], again: Callable[[T], Any], timeout: float = QUICK) -> T:
    """Await `get()` again while `again(value)` holds (at most `timeout` s); return the last value,
    for the caller to assert on (e.g. a snapshot is 503 until the first frame)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if not again(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def upstream_status(api: Any, *, name: str) -> dict:
    """The upstream `name` as GET /upstreams lists it."""
    code, body, _ = await api.call("GET", "/upstreams")
    assert code == 200, body
    (status,) = [u for u in body["upstreams"] if u["name"] == name]
    return status


async def wait_upstream(api: Any, what: str, check: Callable[[dict], bool], timeout: float = WAIT, *,
                        name: str) -> dict:
    """Poll GET /upstreams until `check(status of name)`; fail naming `what` and the last status."""
    return await poll(lambda: upstream_status(api, name=name), check, what, timeout, last="upstream")


async def session_json(api: Any, session_id: str) -> dict:
    """The session as GET /session/{id} returns it."""
    code, body, _ = await api.call("GET", f"/session/{session_id}")
    assert code == 200, body
    return body["session"]


async def wait_session(api: Any, session_id: str, what: str, check: Callable[[dict], bool],
                       timeout: float = QUICK) -> dict:
    """Poll GET /session/{id} until `check(session)`; fail naming `what` and the last session."""
    return await poll(lambda: session_json(api, session_id), check, what, timeout, last="session is")


async def connected_session(api: Any) -> str:
    """A new session whose upstream is connected (so viewers get no "connecting" frames)."""
    session_id = (await api.create_session())["sessionId"]
    await wait_session(api, session_id, "the upstream to connect", lambda s: s["isIsaacSimConnected"])
    return session_id


async def create(api: Any, headers: dict | None = None, user: str = "user123", **extra: Any) -> dict:
    """POST /session/create as `user` (with `headers`, and `extra` body fields); must succeed."""
    status, body, _ = await api.call("POST", "/session/create", {**CREATE, "userId": user, **extra},
                                     headers=headers)
    assert status == 200, body
    return body


def assert_json_error(status: int, body: Any, expected: int | tuple[int, ...]) -> None:
    """Every API error: the status, and exactly {"success": false, "error": "<non-empty message>"}."""
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"success", "error"}, body
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"].strip(), body


def embed_settings(html: str) -> dict:
    """The player settings an embed page passes to its script."""
    match = re.search(r"const SETTINGS = (\{.*?\});\n", html)
    assert match, "no SETTINGS in the embed page"
    return json.loads(match.group(1))


def spawn(coro: Awaitable[Any]) -> asyncio.Task:
    return asyncio.ensure_future(coro)


# -- WebSocket messages and frames -----------------------------------------------------------------


async def next_message(conn: Any, timeout: float | None = WAIT) -> str | bytes | None:
    """The next WebSocket message, or None once the connection is closed (`timeout` None: no bound)."""
    if timeout is None:
        return await conn.read_message()
    return await asyncio.wait_for(conn.read_message(), timeout)


async def recv(conn: Any, timeout: float = WAIT) -> str | bytes:
    """The next WebSocket message; fails if the connection closed or nothing came in time."""
    message = await next_message(conn, timeout)
    assert message is not None, "the viewer's WebSocket closed"
    return message


async def read_until_closed(conn: Any, timeout: float | None = QUICK) -> list[str | bytes]:
    """Every message until the connection closes (within `timeout` s in all; None: read as long as it lasts)."""
    messages: list[str | bytes] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        message = await next_message(conn, None if deadline is None else max(0.1, deadline - time.monotonic()))
        if message is None:
            return messages
        messages.append(message)


def text_type(message: str | bytes) -> str | None:
    """The "type" of a JSON text message (None for a binary one)."""
    if isinstance(message, bytes):
        return None
    return json.loads(message).get("type")


def as_frame(message: str | bytes) -> tuple[bytes | None, dict | None]:
    """(JPEG, None) for a frame in either WebSocket format, else (None, the parsed JSON text)."""
    if isinstance(message, bytes):
        return message, None
    parsed = json.loads(message)
    if parsed.get("type") == "frame":
        return base64.b64decode(parsed["data"], validate=True), None
    return None, parsed


async def read_frames(conn: Any, count: int, timeout: float = QUICK, *,
                      distinct: bool = False) -> tuple[list[bytes], list[dict]]:
    """The next `count` JPEG frames (JSON or binary messages; `distinct`: different ones), and the
    text messages seen on the way."""
    frames: list[bytes] = []
    texts: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        try:
            message = await next_message(conn, max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(f"{len(frames)} of {count} frames within {timeout:g} s; texts: {texts}") from None
        assert message is not None, (
            f"connection closed after {len(frames)} frames (code {conn.close_code}; texts: {texts})")
        jpeg, text = as_frame(message)
        if jpeg is None:
            texts.append(text)
        elif not distinct or jpeg not in frames:
            frames.append(jpeg)
    for frame in frames:
        assert frame.startswith(b"\xff\xd8") and frame.endswith(b"\xff\xd9"), "not a complete JPEG"
    return frames, texts


async def read_until(conn: Any, predicate: Callable[[str | bytes], bool], timeout: float = QUICK) -> list[str | bytes]:
    """Messages up to and including the first one matching `predicate`."""
    seen: list[str | bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = await next_message(conn, max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            texts = [m[:200] for m in seen if isinstance(m, str) and text_type(m) != "frame"][-5:]
            raise AssertionError(f"no matching message within {timeout:g} s among {len(seen)}; "
                                 f"last non-frame texts: {texts}") from None
        assert message is not None, "the connection closed"
        seen.append(message)
        if predicate(message):
            return seen


async def record_frames(conn: Any, arrivals: list[tuple[float, bytes]]) -> None:
    """Read a WebSocket until it closes, keeping (arrival time, JPEG) of every frame."""
    while True:
        message = await conn.read_message()
        if message is None:
            return
        jpeg, _ = as_frame(message)
        if jpeg is not None:
            arrivals.append((time.monotonic(), jpeg))


def count_between(arrivals: list[tuple[float, Any]], start: float, end: float) -> int:
    return sum(1 for t, _ in arrivals if start <= t < end)


def write_buffer_bytes(stream: IOStream) -> int:
    """Bytes an IOStream holds that the kernel has not taken (a private attribute, on purpose)."""
    buffer = stream._write_buffer
    return 0 if buffer is None else len(buffer)


# -- raw HTTP and WebSocket handshakes -------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: httputil.HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response_head(stream: IOStream, timeout: float = QUICK) -> tuple[int, httputil.HTTPHeaders]:
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n", max_bytes=65536), timeout)
    first, _, rest = head.decode("latin-1").partition("\r\n")
    return httputil.parse_response_start_line(first).code, httputil.HTTPHeaders.parse(rest)


async def raw_request(port: int, path: str, method: str = "GET", headers: dict | None = None,
                      ssl_options: Any = None) -> tuple[RawResponse, IOStream]:
    """Send one request byte for byte (Host 127.0.0.1:port unless `headers` has one); return the
    response (body per Content-Length) and the stream."""
    stream = await asyncio.wait_for(
        TCPClient().connect("127.0.0.1", port, ssl_options=ssl_options), QUICK)
    headers = headers or {}
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(name.lower() == "host" for name in headers):
        lines.append(f"Host: 127.0.0.1:{port}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    await stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    status, head = await read_response_head(stream)
    body = b""
    if "Content-Length" in head:
        body = await asyncio.wait_for(stream.read_bytes(int(head["Content-Length"])), QUICK)
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


async def small_buffer_ws(port: int, path: str, rcvbuf: int = 4096, headers: dict[str, str] | None = None
                          ) -> socket.socket:
    """A WebSocket handshake (with `headers` besides its own) on a plain non-blocking socket whose
    receive buffer is `rcvbuf` bytes (set before connecting, so the window stays small): the
    caller reads the frames itself, as slowly as it likes (with `loop.sock_recv`), or never.
    Nothing past the handshake is read."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), QUICK)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()) + "\r\n")
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # byte by byte: read nothing past the handshake
            byte = await asyncio.wait_for(loop.sock_recv(sock, 1), QUICK)
            assert byte, f"closed during the handshake: {head!r}"
            head += byte
        first, _, rest = head.decode("latin-1").partition("\r\n")
        assert httputil.parse_response_start_line(first).code == 101, head
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert httputil.HTTPHeaders.parse(rest).get("Sec-WebSocket-Accept") == accept.decode(), head
    except BaseException:
        sock.close()
        raise
    return sock


# Connections ws_open made; conftest's autouse `close_websockets` closes them after each test (an
# unclosed client connection is a ResourceWarning, an error here, in whichever test collects it).
OPEN_WEBSOCKETS: list[tornado.websocket.WebSocketClientConnection] = []


async def ws_open(port: int, path: str, headers: dict | None = None, scheme: str = "ws",
                  ssl_options: Any = None, **kwargs: Any) -> tornado.websocket.WebSocketClientConnection:
    """A WebSocket client on 127.0.0.1:port (closed after the test)."""
    request = HTTPRequest(f"{scheme}://127.0.0.1:{port}{path}", headers=headers, connect_timeout=QUICK,
                          request_timeout=QUICK, ssl_options=ssl_options)
    conn = await tornado.websocket.websocket_connect(request, **kwargs)
    OPEN_WEBSOCKETS.append(conn)
    return conn


async def ws_refused(port: int, path: str, headers: dict | None = None) -> int:
    """The HTTP status with which the server refuses this WebSocket handshake."""
    with pytest.raises(HTTPClientError) as info:
        conn = await ws_open(port, path, headers=headers)
        conn.close()
    return info.value.code


# -- MJPEG viewers ---------------------------------------------------------------------------------


class Mjpeg:
    """A raw-socket MJPEG viewer that reads when asked (the response head, then parts); any status."""

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

    async def parts(self, count: int, timeout: float = QUICK) -> list:
        assert self.reader is not None
        deadline = time.monotonic() + timeout
        while len(self._parts) < count:
            chunk = await asyncio.wait_for(self.stream.read_bytes(65536, partial=True),
                                           max(0.1, deadline - time.monotonic()))
            self._parts += self.reader.feed(chunk)
        return self._parts[:count]

    def close(self) -> None:
        self.stream.close()


class MjpegClient:
    """A raw-socket MJPEG viewer that reads all the time: the response head (must be 200), then
    parts as they arrive, each with its arrival time (`arrivals`). See the `mjpeg_open` fixture."""

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
    async def open(cls, port: int, path: str, timeout: float = QUICK) -> MjpegClient:
        stream = await asyncio.wait_for(TCPClient().connect("127.0.0.1", port), timeout)
        await stream.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n".encode())
        code, headers = await read_response_head(stream, timeout)
        assert code == 200, f"MJPEG answered {code}"
        return cls(stream, code, headers)

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

    async def next_part(self, timeout: float = QUICK) -> Part:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)
            raise AssertionError(f"the MJPEG stream ended after {self.reader.parts_read} parts")
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.stream.close()
        await asyncio.wait_for(asyncio.shield(self._task), QUICK)


# -- the simulated Isaac Sim -------------------------------------------------------------------------

SIM_SIZE = (320, 240)  # the `sim` fixture's frames, and the demo source's size in tests


def assert_sent_in_order(received: list[bytes], sim: Any) -> None:
    """Every frame is byte-identical to one the simulator sent, and they came in sending order."""
    index = {jpeg: i for i, jpeg in enumerate(sim.frames)}
    positions = [index.get(jpeg) for jpeg in received]
    assert None not in positions, (
        f"frame(s) {[i for i, p in enumerate(positions) if p is None]} of {len(received)} "
        "are not byte-identical to any frame the simulator sent")
    assert positions == sorted(set(positions)), f"frames out of order or repeated: {positions}"


# -- raw sockets and server byte streams ------------------------------------------------------------


def socket_pair() -> tuple[IOStream, socket.socket]:
    """A (server IOStream, client socket) pair with small buffers so writes back up quickly."""
    server, client = socket.socketpair()
    for sock in (server, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
    return IOStream(server), client


def ws_server_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every complete frame in a server's WebSocket byte stream (unmasked)."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        if i + length > len(data):
            break
        out.append((opcode, data[i:i + length]))
        i += length
    return out


# -- WebRTC (WHEP) --------------------------------------------------------------------------------


class WhepClient:
    """A WHEP client: an aiortc peer (no ICE servers: loopback host candidates only) that
    receives one video track; `api` is conftest's Api."""

    def __init__(self, api: Any, path: str) -> None:
        self.api = api
        self.path = path
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = None
        self.location: str | None = None
        self.response = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: Any) -> None:
        self.track = track

    async def offer(self) -> str:
        self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, headers: dict | None = None, edit: Callable[[str], str] | None = None) -> int:
        """POST the offer (changed by `edit` first, if given); on 201, take the answer."""
        sdp = await self.offer()
        sdp = edit(sdp) if edit else sdp
        code, _, response = await self.api.call("POST", self.path, raw=sdp.encode(),
                                                headers={"Content-Type": "application/sdp", **(headers or {})})
        self.response = response
        if code == 201:
            self.location = response.headers["Location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.body.decode(), type="answer"))
        return code

    async def frames(self, count: int, timeout: float = WAIT) -> list:
        await wait_until(lambda: self.track is not None, "the video track")
        frames = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            frames.append(await asyncio.wait_for(self.track.recv(), max(0.1, deadline - time.monotonic())))
        return frames

    async def close(self) -> None:
        await self.pc.close()


class PublisherStub:
    """A WebSocket publisher as PushSource sees it (the ingest handler's PublisherLink): takes
    every message, ignores a disconnect."""

    def send_to_publisher(self, message: str | bytes) -> bool:
        return True

    def disconnect(self, code: int, reason: str) -> None:
        pass


def with_isaac_upstream(request: Any, proxy_config: Any, fixture: str, name: str) -> Any:
    """conftest's `proxy_config`, plus isaac upstream `name` at the port of the test's `fixture`
    (an object with `.port`) when the test uses that fixture."""
    import dataclasses

    from vsproxy.sources.isaac import IsaacUpstream

    if fixture not in request.fixturenames:
        return proxy_config
    port = request.getfixturevalue(fixture).port
    upstreams = {**proxy_config.upstreams, name: IsaacUpstream(url=f"ws://127.0.0.1:{port}/")}
    return dataclasses.replace(proxy_config, upstreams=upstreams)
