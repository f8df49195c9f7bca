"""The benchmark's viewers: raw non-blocking sockets in one asyncio loop, cheap per byte.

Each viewer runs a minimal incremental parser that only finds frame boundaries:
- MJPEG: find the end of a part's headers, read Content-Length, skip that many bytes;
- WebSocket: parse the 2-10 byte frame header, skip the payload (answers pings with a pong).
Of every frame only the first bytes are looked at (the COM stamp of the fake camera, see
upstream.py; for WS JSON the first 40 base64 characters of "data"). The rest of the payload is
discarded with recv(MSG_TRUNC), which on Linux TCP drops the bytes in the kernel without copying
them to user space (`copy=True` reads them into a buffer instead, as a real client would).

A frame counts when its last byte has been read; latency = that moment minus the camera's send
time (both CLOCK_MONOTONIC, system-wide).
"""

from __future__ import annotations

import asyncio
import binascii
import os
import socket
import time

from upstream import JPEG_PEEK, read_stamp

MJPEG, WS_JSON, WS_BINARY, WS_H264 = "mjpeg", "ws_json", "ws_binary", "ws_h264"
TRANSPORTS = (MJPEG, WS_JSON, WS_BINARY, WS_H264)
_H264_PEEK = 9  # flags byte + presentation time (microseconds since the epoch) of format=h264
# CLOCK_REALTIME minus CLOCK_MONOTONIC: turns the proxy's wall-clock presentation times into the
# monotonic clock the latencies use (the same machine: the proxy stamps at its frame's arrival, or
# at an RTSP server's capture time from its RTCP sender reports).
_WALL_TO_MONO_NS = time.time_ns() - time.monotonic_ns()

BUFSIZE = 1 << 20
_BUF = bytearray(BUFSIZE)   # one shared buffer: every parse finishes inside the read callback
_MV = memoryview(_BUF)
HEAD_READ = 4096            # read size while a frame header / stamp is expected
_HDR_STEP = 256             # header bytes appended per parse attempt
_JSON_PREFIX = b'{"type":"frame","data":"'
_JSON_PEEK = len(_JSON_PREFIX) + 40  # 40 base64 chars = 30 bytes >= JPEG_PEEK

_HDR, _PEEK, _SKIP = 0, 1, 2


class Stats:
    """Counters shared by all viewers of one run; only updated while `measuring`."""

    def __init__(self, camera) -> None:
        self.camera = camera
        self.measuring = False
        self.bytes = 0


class Viewer:
    """One viewer connection. kind: "normal", "stalled" (never reads), "trickle" (rate-limited)."""

    __slots__ = ("stats", "idx", "transport", "kind", "probe", "sock", "fd", "state", "skip", "hbuf",
                 "peek", "peek_need", "opcode", "is_frame", "stamp", "last_seq", "frames", "lost",
                 "frames_total", "status_msgs", "closed", "close_reason", "trunc", "budget",
                 "staleness", "latencies", "pings")

    def __init__(self, stats: Stats, idx: int, transport: str, kind: str = "normal", *,
                 probe: bool = True, copy: bool = False) -> None:
        self.stats = stats
        self.idx = idx
        self.transport = transport
        self.kind = kind
        self.probe = probe          # records latency samples
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = _HDR
        self.skip = 0               # payload bytes of the current frame still to come
        self.hbuf = bytearray()
        self.peek = bytearray()
        self.peek_need = 0
        self.opcode = 0
        self.is_frame = False
        self.stamp: tuple[int, int] | None = None
        self.last_seq = 0
        self.frames = 0             # stamped frames completed inside the measurement window
        self.lost = 0               # sequence gaps inside the window
        self.frames_total = 0
        self.status_msgs = 0
        self.closed = False
        self.close_reason = ""
        self.trunc = 0 if copy else socket.MSG_TRUNC
        self.budget = 0.0
        self.staleness: list[int] = []       # trickle: camera seq - frame seq at a frame's first bytes
        self.latencies: list[int] = []  # ns, frames completed inside the window (if `probe`)
        self.pings = 0

    # -- connection -------------------------------------------------------------------------

    async def connect(self, host: str, port: int, session_id: str, *, rcvbuf: int = 0, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock = sock
        try:
            await asyncio.wait_for(self._handshake(loop, sock, host, port, session_id), timeout)
        except BaseException:
            sock.close()
            self.closed = True
            raise
        self.fd = sock.fileno()

    async def _handshake(self, loop, sock, host, port, session_id) -> None:
        await loop.sock_connect(sock, (host, port))
        if self.transport == MJPEG:
            req = f"GET /stream/{session_id}/mjpeg HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            want = b" 200 "
        else:
            query = {WS_BINARY: "?format=binary", WS_H264: "?format=h264"}.get(self.transport, "")
            req = (f"GET /stream/{session_id}{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dnNwcm94eWJlbmNobWFyaw==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            want = b" 101 "
        await loop.sock_sendall(sock, req.encode("ascii"))
        data = b""
        for _ in range(64):  # bounded: a response head is far smaller than 64 reads
            chunk = await loop.sock_recv(sock, 1024 if self.kind == "stalled" else 4096)
            if not chunk:
                raise ConnectionError(f"closed during handshake: {data[:200]!r}")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
        else:
            raise ConnectionError("no response head")
        status = data[: data.find(b"\r\n")]
        if want not in status + b" ":
            raise ConnectionError(f"unexpected response: {status!r}")
        rest = data[end + 4:]
        if rest:
            n = len(rest)
            _BUF[:n] = rest
            self.feed(n, time.monotonic_ns())

    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self.on_readable)

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.sock is not None:
            if self.fd >= 0:
                try:
                    asyncio.get_running_loop().remove_reader(self.fd)
                except RuntimeError:
                    pass
            self.sock.close()

    # -- reading ----------------------------------------------------------------------------

    def on_readable(self) -> None:
        self.read_once(BUFSIZE)

    def read_once(self, limit: int) -> int:
        """One recv of at most `limit` bytes; returns bytes read, -1 if nothing was ready."""
        sock = self.sock
        try:
            if self.state == _SKIP and self.skip > 0:
                n = sock.recv_into(_BUF, min(self.skip, limit), self.trunc)
                if n:
                    self.skip -= n
                    if self.skip == 0:
                        self._frame_done(time.monotonic_ns())
            else:
                n = sock.recv_into(_BUF, min(HEAD_READ, limit))
                if n:
                    self.feed(n, time.monotonic_ns())
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as exc:
            self.close(f"read error: {exc}")
            return 0
        if n == 0:
            self.close("closed by the server")
            return 0
        if self.stats.measuring:
            self.stats.bytes += n
        return n

    def trickle(self, nbytes: int, cap: float) -> None:
        """Read up to `nbytes` (plus unused credit up to `cap`) now: trickle viewers are driven by a
        timer instead of readiness."""
        self.budget += nbytes
        for _ in range(64):  # bounded
            if self.closed or self.budget < 1:
                break
            n = self.read_once(int(self.budget))
            if n <= 0:
                break
            self.budget -= n
        self.budget = min(self.budget, cap)  # bounded credit while nothing arrives

    def feed(self, n: int, now_ns: int) -> None:
        """Parse `_BUF[:n]` (bytes just received)."""
        mv = _MV
        pos = 0
        while pos < n:
            state = self.state
            if state == _SKIP:
                take = min(self.skip, n - pos)
                self.skip -= take
                pos += take
                if self.skip == 0:
                    self._frame_done(now_ns)
            elif state == _PEEK:
                need = self.peek_need - len(self.peek)
                chunk = mv[pos:min(n, pos + need)]
                self.peek += chunk
                pos += len(chunk)
                self.skip -= len(chunk)
                if len(self.peek) >= self.peek_need or self.skip == 0:
                    self._peeked()
                    self.state = _SKIP
                    if self.skip == 0:
                        self._frame_done(now_ns)
            else:
                before = len(self.hbuf)
                chunk = mv[pos:min(n, pos + _HDR_STEP)]
                self.hbuf += chunk
                used = self._parse_header()
                if used < 0:
                    pos += len(chunk)
                    if len(self.hbuf) > 65536:
                        self.close("no frame header in 64 KB")
                        return
                    continue
                pos += used - before
                self.hbuf.clear()
                self.peek.clear()
                self.stamp = None
                self.state = _PEEK if self.peek_need and self.skip else _SKIP
                if self.skip == 0:
                    self._frame_done(now_ns)

    def _parse_header(self) -> int:
        """Parse a frame header at the start of hbuf; returns its length or -1 if incomplete."""
        h = self.hbuf
        if self.transport == MJPEG:
            end = h.find(b"\r\n\r\n")
            if end < 0:
                return -1
            i = h.find(b"Content-Length:", 0, end)
            if i < 0:
                self.close("MJPEG part without Content-Length")
                return end + 4
            j = h.find(b"\r\n", i, end + 2)
            self.skip = int(h[i + 15:j])
            self.is_frame = True
            self.peek_need = JPEG_PEEK
            return end + 4
        if len(h) < 2:
            return -1
        b1 = h[1] & 0x7F
        if b1 == 126:
            if len(h) < 4:
                return -1
            length, used = int.from_bytes(h[2:4], "big"), 4
        elif b1 == 127:
            if len(h) < 10:
                return -1
            length, used = int.from_bytes(h[2:10], "big"), 10
        else:
            length, used = b1, 2
        if h[1] & 0x80:  # a masked server frame would be a protocol error; skip the key
            used += 4
            if len(h) < used:
                return -1
        self.opcode = h[0] & 0x0F
        self.skip = length
        if self.opcode == 0x2:
            self.is_frame, self.peek_need = True, _H264_PEEK if self.transport == WS_H264 else JPEG_PEEK
        elif self.opcode == 0x1:  # a frame if it starts with the frame prefix, else a status message
            self.is_frame, self.peek_need = False, _JSON_PEEK
        elif self.opcode in (0x9, 0x8):  # ping: answer it; close: note the reason
            self.is_frame, self.peek_need = False, length
        else:
            self.is_frame, self.peek_need = False, 0
        return used

    def _peeked(self) -> None:
        peek = self.peek
        if self.transport == WS_JSON:
            if self.opcode != 0x1:
                return
            if not peek.startswith(_JSON_PREFIX):
                return  # a status/error message
            self.is_frame = True
            try:
                head = binascii.a2b_base64(peek[len(_JSON_PREFIX):_JSON_PEEK])
            except binascii.Error:
                return
            self.stamp = read_stamp(head)
        elif self.transport == WS_H264:
            # No camera stamp in H.264: the latency runs from the presentation time (the frame's
            # arrival at the proxy, or an RTSP server's capture time from its RTCP sender reports)
            # to here, encoding included. Lost frames are not counted.
            if self.is_frame and len(peek) >= _H264_PEEK:
                pts_us = int.from_bytes(peek[1:9], "big")
                self.stamp = (self.last_seq + 1, pts_us * 1000 - _WALL_TO_MONO_NS)
        elif self.is_frame:
            self.stamp = read_stamp(peek)
        else:
            return
        # Staleness in camera frames needs the camera's stamp (H.264 has none: its age tells).
        if self.stamp is not None and self.kind == "trickle" and self.stats.measuring and self.transport != WS_H264:
            self.staleness.append(self.stats.camera.seq - self.stamp[0])

    def _frame_done(self, now_ns: int) -> None:
        self.state = _HDR
        if not self.is_frame:
            if self.transport != MJPEG:
                self._control_done()
            return
        self.frames_total += 1
        stamp = self.stamp
        if stamp is None:
            return  # e.g. the proxy's "upstream offline" picture
        seq, sent_ns = stamp
        stats = self.stats
        if stats.measuring:
            self.frames += 1
            if self.last_seq and seq > self.last_seq + 1:
                self.lost += seq - self.last_seq - 1
            if self.probe:
                self.latencies.append(now_ns - sent_ns)
        if seq > self.last_seq:
            self.last_seq = seq

    def _control_done(self) -> None:
        op = self.opcode
        if op == 0x1:
            self.status_msgs += 1
        elif op == 0x9:  # pong with the same payload, masked as a client must
            self.pings += 1
            payload = bytes(self.peek)
            key = os.urandom(4)
            masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            try:
                self.sock.send(bytes((0x8A, 0x80 | len(payload))) + key + masked)
            except OSError:
                pass
        elif op == 0x8:
            self.close(f"server sent close: {bytes(self.peek[2:]).decode('utf-8', 'replace')}")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a reset connection is the expected end of a flood


class Flooder:
    """A viewer that floods the server with input (`--input-flood`): text messages of `size`
    bytes, each written as soon as the socket takes the previous one. What the server sends is
    discarded in the kernel (MSG_TRUNC) and never parsed. When the server closes the connection
    (a message over its size limit: 1009; over its rates: 1008), the flooder reconnects after
    `reconnect_delay` seconds, for as long as it runs.

    Frames are masked with the all-zero key, so the masked payload is the payload itself and one
    prebuilt frame serves every send (the server cannot tell; it unmasks all the same).
    """

    def __init__(self, idx: int, host: str, port: int, session_id: str, size: int, reconnect_delay: float) -> None:
        self.idx = idx
        self.host, self.port, self.session_id = host, port, session_id
        self.reconnect_delay = reconnect_delay
        if size < 126:
            head = bytes((0x81, 0x80 | size))
        elif size < 65536:
            head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")
        self.frame = head + b"\0\0\0\0" + b"x" * size
        self.size = size
        self.connections = 0      # completed handshakes
        self.refused = 0          # handshakes refused or failed
        self.messages = 0         # messages written completely to the socket
        self.bytes = 0            # bytes written to the socket
        self.closed_by_server = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await self._handshake(loop, sock)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                self.refused += 1
                sock.close()
                await asyncio.sleep(max(self.reconnect_delay, 0.05))
                continue
            self.connections += 1
            gone = loop.create_future()
            loop.add_reader(sock.fileno(), self._drain, sock, gone)
            try:
                while True:
                    send = asyncio.ensure_future(loop.sock_sendall(sock, self.frame))
                    send.add_done_callback(_retrieve)
                    await asyncio.wait([send, gone], return_when=asyncio.FIRST_COMPLETED)
                    if not send.done():  # the server closed the connection while we were writing
                        send.cancel()
                        break
                    send.result()  # OSError if the connection is gone
                    self.messages += 1
                    self.bytes += len(self.frame)
            except (OSError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not gone.done():
                    raise
            finally:
                self.closed_by_server += 1
                loop.remove_reader(sock.fileno())
                sock.close()
            await asyncio.sleep(self.reconnect_delay)

    @staticmethod
    def _drain(sock: socket.socket, gone: asyncio.Future) -> None:
        try:
            while sock.recv_into(_BUF, BUFSIZE, socket.MSG_TRUNC):
                pass
            outcome = "eof"
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            outcome = "error"
        if not gone.done():
            gone.set_result(outcome)

    async def _handshake(self, loop, sock) -> None:
        await asyncio.wait_for(loop.sock_connect(sock, (self.host, self.port)), 5)
        req = (f"GET /stream/{self.session_id}?format=binary HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dnNwcm94eWJlbmNobWFyaw==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await loop.sock_sendall(sock, req.encode("ascii"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            if not chunk or len(data) > 65536:
                raise ConnectionError("closed during handshake")
            data += chunk
        if b" 101 " not in data[:data.find(b"\r\n")] + b" ":
            raise ConnectionError(f"refused: {data[:60]!r}")
