"""`fanout.py --direct`: the smallest fan-out the benchmark can be pointed at (its ceiling).

Speaks just enough of vsproxy's API for the load generator: POST /session/create, GET /health,
GET /stream/{id}/mjpeg, WS /stream/{id}[?format=binary]. One upstream WebSocket to the fake
camera (Tornado client, as vsproxy uses), and for the viewers raw non-blocking sockets: every
wire representation is built once per frame; each viewer gets one plain `send()` of the shared
bytes, and only a viewer whose socket did not take everything gets a writer callback; it then
receives the newest frame when it drains (latest-frame-wins). No metrics, no per-viewer Python
objects beyond that.

What the load generator measures against this server is the best this benchmark can resolve on
this machine: fps below, or latency above, what it shows here are not the proxy's fault.

Two experiment knobs, off by default (the ceiling runs use neither): `--sndbuf N` sets SO_SNDBUF
on viewer sockets (which turns off the kernel's send-buffer autotuning, up to 4 MB here), and
`--outq-limit B` starts a new frame for a viewer only while the kernel holds at most B not yet
sent bytes for it (ioctl SIOCOUTQNSD, which leaves out bytes in flight, so a fast viewer on a
long network path is not held back; checked again at every new frame), so a slow viewer's next frame
is the newest one instead of one that waited in a kernel queue. `fanout.py --direct
--direct-args "--outq-limit 0"` shows what that does to the slow scenario's staleness.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import fcntl
import hashlib
import json
import signal
import socket
import struct

from tornado.websocket import websocket_connect

BOUNDARY = b"vsproxyframe"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SIOCOUTQNSD = 0x894B  # bytes in the send queue not yet sent (in-flight, unacknowledged bytes excluded)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


class Client:
    __slots__ = ("sock", "fd", "transport", "rest", "next", "outq_wait")

    def __init__(self, sock: socket.socket, transport: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.rest: memoryview | None = None  # unsent tail of the frame in flight
        self.next: bytes | None = None       # newest frame waiting for the socket to drain
        self.outq_wait = False               # waiting for the kernel queue to empty (--outq-limit)


class DirectServer:
    def __init__(self, upstream: str, sndbuf: int = 0, outq_limit: int = -1) -> None:
        self.upstream = upstream
        self.sndbuf = sndbuf
        self.outq_limit = outq_limit
        self.clients: dict[str, list[Client]] = {"mjpeg": [], "ws_json": [], "ws_binary": []}
        self.seq = 0
        self.loop = asyncio.get_running_loop()

    # -- viewers ------------------------------------------------------------------------------

    async def handle(self, sock: socket.socket) -> None:
        loop = self.loop
        data = b""
        try:
            for _ in range(32):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
                if not chunk:
                    sock.close()
                    return
                data += chunk
                if b"\r\n\r\n" in data:
                    break
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            path, _, query = target.partition("?")
            if method == "POST" and path == "/session/create":
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    body += await loop.sock_recv(sock, 4096)
                await self._respond(sock, 200, {"success": True, "sessionId": "direct"})
            elif method == "GET" and path == "/health":
                await self._respond(sock, 200, {"status": "healthy"})
            elif method == "GET" and path.startswith("/stream/") and path.endswith("/mjpeg"):
                await loop.sock_sendall(sock, b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary="
                                        + BOUNDARY + b"\r\nConnection: close\r\n\r\n--" + BOUNDARY + b"\r\n")
                self._add(sock, "mjpeg")
            elif method == "GET" and path.startswith("/stream/") and "sec-websocket-key" in headers:
                accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WS_GUID).digest())
                await loop.sock_sendall(sock, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                                        + ws_frame(1, b'{"type":"status","message":"direct"}'))
                self._add(sock, "ws_binary" if "format=binary" in query else "ws_json")
            else:
                await self._respond(sock, 404, {"success": False})
        except (OSError, ValueError, asyncio.TimeoutError):
            sock.close()

    async def _respond(self, sock: socket.socket, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        await self.loop.sock_sendall(sock, f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        sock.close()

    def _add(self, sock: socket.socket, transport: str) -> None:
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        client = Client(sock, transport)
        self.clients[transport].append(client)
        self.loop.add_reader(client.fd, self._discard_input, client)

    def _drop(self, client: Client) -> None:
        try:
            self.clients[client.transport].remove(client)
        except ValueError:
            return
        self.loop.remove_reader(client.fd)
        self.loop.remove_writer(client.fd)
        client.sock.close()

    def _discard_input(self, client: Client) -> None:
        try:
            if not client.sock.recv(4096):
                self._drop(client)
        except BlockingIOError:
            pass
        except OSError:
            self._drop(client)

    # -- frames -------------------------------------------------------------------------------

    def publish(self, jpeg: bytes) -> None:
        self.seq += 1
        for transport, clients in self.clients.items():
            if not clients:
                continue
            if transport == "mjpeg":
                head = f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\nX-Frame-Seq: {self.seq}\r\n\r\n"
                data = b"".join((head.encode(), jpeg, b"\r\n--" + BOUNDARY + b"\r\n"))
            elif transport == "ws_binary":
                data = ws_frame(2, jpeg)
            else:
                data = ws_frame(1, b'{"type":"frame","data":"' + binascii.b2a_base64(jpeg, newline=False) + b'"}')
            limit = self.outq_limit
            for client in tuple(clients):
                if client.rest is not None:
                    client.next = data  # busy: keep only the newest
                elif limit >= 0 and self._outq(client) > limit:
                    client.next, client.outq_wait = data, True  # checked again at the next frame
                else:
                    client.next, client.outq_wait = None, False
                    self._send(client, data)

    def _outq(self, client: Client) -> int:
        try:
            return struct.unpack("i", fcntl.ioctl(client.fd, SIOCOUTQNSD, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def _send(self, client: Client, data: bytes) -> None:
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client)
            return
        if sent < len(data):
            client.rest = memoryview(data)[sent:]
            self.loop.add_writer(client.fd, self._writable, client)

    def _writable(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.rest)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        rest = client.rest[sent:]
        if len(rest):
            client.rest = rest
            return
        client.rest = None
        self.loop.remove_writer(client.fd)
        if self.outq_limit >= 0:
            return  # the next frame goes out at the next publish, once the kernel queue is short
        data, client.next = client.next, None
        if data is not None:
            self._send(client, data)

    async def run_upstream(self) -> None:
        while True:
            try:
                conn = await websocket_connect(self.upstream, max_message_size=64 << 20)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            while True:
                msg = await conn.read_message()
                if msg is None:
                    break
                if isinstance(msg, bytes):
                    self.publish(msg)
            await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description="Minimal fan-out (the benchmark's ceiling)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="ws://127.0.0.1:PORT/")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long regardless")
    parser.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF for viewer sockets (experiment; 0 = kernel)")
    parser.add_argument("--outq-limit", type=int, default=-1,
                        help="new frame only while SIOCOUTQNSD <= this many bytes (experiment; -1 = off)")
    args = parser.parse_args()
    server = DirectServer(args.upstream, args.sndbuf, args.outq_limit)
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(1024)
    lsock.setblocking(False)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(lsock)
            sock.setblocking(False)
            asyncio.ensure_future(server.handle(sock))

    tasks = [asyncio.ensure_future(accept_loop()), asyncio.ensure_future(server.run_upstream())]
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        pass
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
