"""The benchmark's fake camera: one realistic 1280x720 JPEG (~100-115 KB) sent at a fixed rate
as binary WebSocket messages, the way Isaac Sim's stream does.

Each frame carries its sequence number and send time in a JPEG COM segment right after SOI, so
the viewer side can compute latency and gaps from the bytes it receives without changing the
picture:

    FF D8 | FF FE | len (2 bytes BE, = 25) | b"vsbench" | seq (8 bytes BE)
          | time.monotonic_ns() at send (8 bytes BE) | rest of the JPEG

CLOCK_MONOTONIC is system-wide on Linux, so a send time taken here compares with a receive time
taken in any other process on the machine.

Run alone (`python bench/upstream.py --port 8211`) it is a stand-alone 30 fps camera.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import struct
import time

import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

COM_MAGIC = b"vsbench"
COM_PAYLOAD = len(COM_MAGIC) + 16          # magic + seq + send time
COM_OFFSET_SEQ = 2 + 2 + 2 + len(COM_MAGIC)  # SOI, marker, length, magic -> 13
JPEG_PEEK = COM_OFFSET_SEQ + 16             # bytes of a frame needed to read its stamp -> 29
_STAMP = struct.Struct(">QQ")


def make_jpeg(width: int = 1280, height: int = 720, lo: int = 100_000, hi: int = 115_000) -> bytes:
    """A noisy gradient with a few shapes, JPEG-encoded at the quality that lands in [lo, hi] bytes.

    Noise is what keeps a JPEG of a rendered scene from collapsing to a few KB; the quality is
    searched (bisection, bounded) so the size is realistic for a 720p simulator frame.
    """
    from PIL import Image, ImageChops, ImageDraw

    gx = Image.linear_gradient("L").rotate(90).resize((width, height))
    gy = Image.linear_gradient("L").resize((width, height))
    target = (lo + hi) // 2
    best: bytes | None = None
    for sigma in (8, 10, 6, 12, 5, 16):
        noise = Image.effect_noise((width, height), sigma)
        r = ImageChops.add(gx, noise, 1.0, -128)
        g = ImageChops.add(gy, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 1.0, -128)
        b = ImageChops.add(ImageChops.blend(gx, gy, 0.5), noise.transpose(Image.Transpose.FLIP_TOP_BOTTOM), 1.0, -128)
        img = Image.merge("RGB", (r, g, b))
        draw = ImageDraw.Draw(img)
        for i in range(8):  # some flat-coloured "objects", as a rendered scene has
            x, y = 80 + i * 140, 120 + (i % 3) * 160
            draw.rectangle((x, y, x + 100, y + 120), fill=(40 + 25 * i, 200 - 20 * i, 90))
        draw.text((40, 40), "vsproxy benchmark camera 1280x720", fill=(255, 255, 255))
        q_lo, q_hi = 30, 95
        for _ in range(8):
            q = (q_lo + q_hi) // 2
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=q)
            data = buf.getvalue()
            if best is None or abs(len(data) - target) < abs(len(best) - target):
                best = data
            if lo <= len(data) <= hi:
                return data
            if len(data) < lo:
                q_lo = q + 1
            else:
                q_hi = q - 1
            if q_lo > q_hi:
                break
    assert best is not None
    return best


def make_moving_jpegs(count: int = 60, width: int = 1280, height: int = 720, quality: int = 85, *,
                      noise: bool = True) -> list[bytes]:
    """A loop of distinct frames for inter-frame codecs (one JPEG repeated compresses to nothing in
    H.264): shapes moving over a gradient and a band of sensor-like noise that moves from frame
    to frame, about 100 KB each as JPEG at 720p. A worst case for H.264 (the noise), like a camera
    in a dim scene; `noise=False` gives a smooth rendered scene instead."""
    from PIL import Image, ImageChops, ImageDraw

    gx = Image.linear_gradient("L").rotate(90).resize((width, height))
    gy = Image.linear_gradient("L").resize((width, height))
    base = Image.merge("RGB", (gx, gy, ImageChops.blend(gx, gy, 0.5)))
    band_h = height // 6
    frames = []
    for i in range(count):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for k in range(6):  # flat "objects" moving at different speeds
            x = (80 + k * 200 + i * (4 + 3 * k)) % (width + 120) - 120
            y = 100 + (k % 3) * 170 + int(30 * ((i + 7 * k) % 20 - 10) / 10)
            draw.ellipse((x, y, x + 110, y + 110), fill=(60 + 30 * k, 220 - 25 * k, 80 + 20 * k))
        if noise:
            y0 = (i * 9) % (height - band_h)  # the noise band moves down a little every frame
            grain = Image.effect_noise((width, band_h), 24).convert("RGB")
            band = img.crop((0, y0, width, y0 + band_h))
            img.paste(ImageChops.add(band, grain, 1.0, -128), (0, y0))
        draw.text((40, 40), f"vsproxy benchmark moving camera {width}x{height} #{i}", fill=(255, 255, 255))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        frames.append(buf.getvalue())
    return frames


def stamped_template(jpeg: bytes) -> bytearray:
    """The JPEG with a placeholder COM segment right after SOI (patched per frame)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    com = b"\xff\xfe" + struct.pack(">H", COM_PAYLOAD + 2) + COM_MAGIC + bytes(16)
    return bytearray(jpeg[:2] + com + jpeg[2:])


def read_stamp(jpeg_head: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(seq, sent monotonic ns) from a frame's first JPEG_PEEK bytes, or None if unstamped."""
    if len(jpeg_head) < JPEG_PEEK or jpeg_head[2:4] != b"\xff\xfe" or jpeg_head[6:13] != COM_MAGIC:
        return None
    return _STAMP.unpack_from(jpeg_head, COM_OFFSET_SEQ)


class _CameraSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, camera: FakeCamera) -> None:
        self.camera = camera

    def check_origin(self, origin: str) -> bool:
        return True

    def get_compression_options(self) -> None:
        return None

    def open(self, *args) -> None:
        self.camera.clients.add(self)
        self.camera.connections += 1
        self.camera.peak_clients = max(self.camera.peak_clients, len(self.camera.clients))
        self.camera._ensure_running()

    def on_message(self, message) -> None:
        pass  # viewer input relayed by the proxy; the benchmark does not send any

    def on_close(self) -> None:
        self.camera.clients.discard(self)


class FakeCamera:
    """Tornado WebSocket server on a free loopback port; sends the stamped frame at `fps`.

    `seq` is the number of the newest frame sent (readable by a load generator in the same
    process); frames are sent only while a client is connected.
    """

    def __init__(self, jpeg: bytes | list[bytes], fps: float = 30.0) -> None:
        # One JPEG sent over and over (JPEG fan-out), or a loop of distinct ones (H.264).
        self.templates = [stamped_template(j) for j in (jpeg if isinstance(jpeg, list) else [jpeg])]
        self.template = self.templates[0]
        self.frame_bytes = sum(len(t) for t in self.templates) // len(self.templates)
        self.fps = fps
        self.interval_ns = int(1e9 / fps)
        self.seq = 0
        self.sent_total = 0
        self.clients: set[_CameraSocket] = set()
        self.connections = 0
        self.peak_clients = 0  # most clients at once (bench/cluster.py: one upstream connection per cluster)
        self.late_ticks = 0  # ticks that ran more than one interval late (the process was busy)
        self.port = 0
        self._server: HTTPServer | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._next_ns = 0

    def listen(self, port: int = 0, address: str = "127.0.0.1") -> int:
        app = tornado.web.Application([(r"/.*", _CameraSocket, {"camera": self})])
        sockets = bind_sockets(port, address=address)
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    def _ensure_running(self) -> None:
        if self._handle is None:
            self._next_ns = time.monotonic_ns()
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(self._next_ns / 1e9, self._tick)

    def _tick(self) -> None:
        self._handle = None
        if not self.clients:
            return
        now = time.monotonic_ns()
        self.seq += 1
        template = self.templates[self.seq % len(self.templates)]
        _STAMP.pack_into(template, COM_OFFSET_SEQ, self.seq, now)
        data = bytes(template)
        for client in tuple(self.clients):
            try:
                client.write_message(data, binary=True)
            except tornado.websocket.WebSocketClosedError:
                self.clients.discard(client)
        self.sent_total += 1
        self._next_ns += self.interval_ns
        if now - self._next_ns > self.interval_ns:  # fell more than a frame behind: resync
            self.late_ticks += 1
            self._next_ns = now + self.interval_ns
        self._schedule()

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for client in tuple(self.clients):
            client.close()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None


async def _main() -> None:
    parser = argparse.ArgumentParser(description="Fake 30 fps JPEG camera (stand-alone, bounded)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    args = parser.parse_args()
    jpeg = make_jpeg()
    camera = FakeCamera(jpeg, args.fps)
    port = camera.listen(args.port)
    print(f"fake camera: {len(jpeg)} byte JPEG at {args.fps:g} fps on ws://127.0.0.1:{port}/ for {args.seconds:g} s",
          flush=True)
    await asyncio.sleep(args.seconds)
    await camera.stop()


if __name__ == "__main__":
    asyncio.run(_main())
