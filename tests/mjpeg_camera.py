"""A loopback MJPEG camera for the tests: a Tornado HTTP server streaming multipart/x-mixed-replace
in the dialects real cameras speak.

    camera = MjpegCamera()            # picks a free port; camera.url("/stream/no-length")
    camera.start()                    # listen on 127.0.0.1:camera.port
    await camera.stop()               # stop listening and drop every client, as a crash would
    camera.start()                    # back on the same port

Paths: `/stream` (the constructor's dialect), `/stream/<name>` (a dialect of `DIALECTS`),
`/stall` (headers and one frame, then silence), `/missing` (404), `/page` (200 text/html).
Every frame is a distinct JPEG (a counter in a JPEG comment segment), and `sent` maps each frame
sent to its sequence number, so tests can check frames arrive byte-identical and in order.
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
from dataclasses import dataclass

import tornado.web
from helpers import free_port
from PIL import Image
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError


@dataclass(frozen=True)
class Dialect:
    """How one camera frames its stream."""

    boundary: str = "camframe"  # what the body's boundary lines use, after their "--"
    # The Content-Type's boundary parameter exactly as sent (quotes included); "" = `boundary`
    # unquoted; None = no boundary parameter at all.
    header_boundary: str | None = ""
    content_length: bool = True  # a Content-Length header in every part
    newline: bytes = b"\r\n"
    preamble: bytes = b""  # text before the first boundary line
    extra_headers: bool = False  # X-Timestamp and friends in every part
    part_headers: bool = True  # False: the JPEG right after the boundary line (no headers)
    chunked: bool = False  # HTTP/1.1 Transfer-Encoding: chunked, instead of until-close
    small_chunks: bool = False  # write the stream in random pieces of 1..1500 bytes
    non_jpeg_every: int = 0  # every Nth part is text/plain instead of a frame
    # Put "<newline>--<boundary><newline>" inside each JPEG (needs Content-Length to be parseable).
    boundary_in_body: bool = False
    # The response's media type; None: no Content-Type header at all. Not multipart: no boundary
    # parameter is sent, and the body must say it (as ffmpeg's own server, application/octet-stream).
    media_type: str | None = "multipart/x-mixed-replace"

    def content_type(self) -> str | None:
        if self.media_type is None or not self.media_type.startswith("multipart/"):
            return self.media_type
        if self.header_boundary is None:
            return self.media_type
        return f"{self.media_type}; boundary={self.header_boundary or self.boundary}"


DIALECTS: dict[str, Dialect] = {
    "standard": Dialect(boundary_in_body=True),
    "no-length": Dialect(content_length=False),
    "lf": Dialect(newline=b"\n", boundary_in_body=True),
    "lf-no-length": Dialect(newline=b"\n", content_length=False),
    "quoted": Dialect(boundary="cam frame=1", header_boundary='"cam frame=1"', content_length=False),
    "dashed-header": Dialect(header_boundary="--camframe", extra_headers=True),  # as some IP cameras
    "long-boundary": Dialect(boundary="b" * 60 + "-long-boundary-" + "0123456789" * 5, content_length=False),
    "no-boundary": Dialect(header_boundary=None, content_length=False),
    "wrong-boundary": Dialect(header_boundary="notused", boundary_in_body=False),
    "preamble": Dialect(preamble=b"This is a multipart stream.\r\n-- not a boundary\r\n", extra_headers=True,
                        content_length=False),
    "no-part-headers": Dialect(part_headers=False, content_length=False),
    "small-chunks": Dialect(small_chunks=True, extra_headers=True, content_length=False),
    "small-chunks-length": Dialect(small_chunks=True, boundary_in_body=True),
    "chunked": Dialect(chunked=True, boundary_in_body=True),
    "mixed": Dialect(non_jpeg_every=3, extra_headers=True),
    # ffmpeg's own server (-f mpjpeg -listen 1): a generic type, chunked, boundary only in the body.
    "ffmpeg": Dialect(boundary="ffmpeg", media_type="application/octet-stream", chunked=True),
    "text-plain": Dialect(media_type="text/plain", content_length=False, newline=b"\n"),
    "no-content-type": Dialect(media_type=None, small_chunks=True),
}


def _base_jpegs() -> list[bytes]:
    """A few distinct small JPEGs (noise, so they are tens of KB: parts span several reads)."""
    rng = random.Random(1234)
    images = []
    for size in ((160, 120), (96, 72), (200, 150)):
        noise = bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3))
        out = io.BytesIO()
        Image.frombytes("RGB", size, noise).save(out, "JPEG", quality=85)
        images.append(out.getvalue())
    return images


_BASES: list[bytes] = []


def make_frame(seq: int, extra_comment: bytes = b"") -> bytes:
    """A valid, distinct JPEG: a base picture with a comment segment (FFFE) naming `seq`."""
    if not _BASES:
        _BASES.extend(_base_jpegs())
    base = _BASES[seq % len(_BASES)]
    comment = b"vsproxy test camera frame %d" % seq + extra_comment
    return b"\xff\xd8\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:]


class _CameraHandler(tornado.web.RequestHandler):
    def initialize(self, camera: MjpegCamera) -> None:
        self.camera = camera

    async def get(self, kind: str, name: str | None = None) -> None:
        self.camera.requests.append((self.request.uri, dict(self.request.headers)))
        if kind == "missing":
            raise tornado.web.HTTPError(404)
        if kind == "page":
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish("<html><body>camera login</body></html>")
            return
        dialect = self.camera.dialect if name is None else DIALECTS.get(name)
        if dialect is None:
            raise tornado.web.HTTPError(404)
        await self.camera._serve(self, dialect, stall=kind == "stall")


class MjpegCamera:
    """The server; see the module docstring."""

    def __init__(self, dialect: Dialect = DIALECTS["standard"], *, fps: float = 30.0, seed: int = 0) -> None:
        self.dialect = dialect
        self.fps = fps
        self.port = free_port()
        self.rng = random.Random(seed)
        self.sent: dict[bytes, int] = {}  # every frame sent (the last 5000) -> sequence number
        self.seq = 0
        self.requests: list[tuple[str, dict]] = []
        self.connections_total = 0
        self.active: set[IOStream] = set()
        self._server: HTTPServer | None = None

    def url(self, path: str = "/stream") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        app = tornado.web.Application([
            (r"/(stream)(?:/([^/]+))?", _CameraHandler, {"camera": self}),
            (r"/(stall|missing|page)", _CameraHandler, {"camera": self}),
        ])
        self._server = app.listen(self.port, address="127.0.0.1")

    async def stop(self) -> None:
        """Stop listening and drop every client (as a camera that crashed would)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        for stream in tuple(self.active):
            stream.close()
        self.active.clear()
        await asyncio.sleep(0)

    def index(self, jpeg: bytes) -> int | None:
        return self.sent.get(jpeg)

    # -- one client ------------------------------------------------------------------------------

    def _next_frame(self, dialect: Dialect) -> bytes:
        self.seq += 1
        extra = b""
        if dialect.boundary_in_body:
            extra = dialect.newline + b"--" + dialect.boundary.encode() + dialect.newline
        jpeg = make_frame(self.seq, extra)
        self.sent[jpeg] = self.seq
        if len(self.sent) > 5000:
            del self.sent[next(iter(self.sent))]
        return jpeg

    def _part(self, dialect: Dialect, body: bytes, content_type: str = "image/jpeg") -> bytes:
        nl = dialect.newline
        head = b"--" + dialect.boundary.encode() + nl
        if dialect.part_headers:
            head += b"Content-Type: " + content_type.encode() + nl
            if dialect.content_length:
                head += b"Content-Length: %d" % len(body) + nl
            if dialect.extra_headers:
                head += b"X-Timestamp: %.6f" % (self.seq / 30) + nl + b"X-Camera: test: yes" + nl
            head += nl
        return head + body + nl

    async def _serve(self, handler: _CameraHandler, dialect: Dialect, *, stall: bool) -> None:
        content_type = dialect.content_type()
        head = ["HTTP/1.1 200 OK", "Cache-Control: no-cache"]
        if content_type is not None:
            head.append(f"Content-Type: {content_type}")
        if dialect.chunked:
            head.append("Transfer-Encoding: chunked")
        else:
            head.append("Connection: close")
        # Take the raw stream (as vsproxy's own MJPEG handler does) so the bytes are exactly ours.
        handler._finished = True
        stream: IOStream = handler.request.connection.detach()  # type: ignore[attr-defined]
        self.connections_total += 1
        self.active.add(stream)
        try:
            await stream.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await self._write(stream, dialect, dialect.preamble)
            parts = 0
            while not stream.closed():
                parts += 1
                if dialect.non_jpeg_every and parts % dialect.non_jpeg_every == 0:
                    part = self._part(dialect, b"not a picture", "text/plain")
                else:
                    part = self._part(dialect, self._next_frame(dialect))
                await self._write(stream, dialect, part)
                while stall and not stream.closed():  # hold the connection open, send nothing more
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1 / self.fps)
        except StreamClosedError:
            pass
        finally:
            self.active.discard(stream)
            stream.close()

    async def _write(self, stream: IOStream, dialect: Dialect, data: bytes) -> None:
        if not data:
            return
        pieces = [data]
        if dialect.small_chunks:
            pieces, pos = [], 0
            while pos < len(data):
                size = self.rng.randint(1, 1500)
                pieces.append(data[pos:pos + size])
                pos += size
        for piece in pieces:
            if dialect.chunked:
                piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
            await stream.write(piece)
