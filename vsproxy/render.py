"""Pictures vsproxy makes itself: the demo test pattern and the "upstream offline" frame (Pillow)."""

from __future__ import annotations

import io
import struct
import time
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

_BARS = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0),
         (192, 0, 192), (192, 0, 0), (0, 0, 192)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def encode_jpeg(image: Image.Image, quality: int = 80) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, subsampling=2)
    return out.getvalue()


class TestPattern:
    """A moving test pattern with a clock, frame counter and a label, rendered cheaply.

    Everything static (colour bars, the gradient, the label, the sweeping bar) is drawn once; each
    frame is a copy of that background, one paste of the moving sprite and two lines of text, then
    a JPEG encode (Pillow releases the GIL while encoding, so callers can use a worker thread).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, width: int, height: int, label: str, quality: int = 80) -> None:
        self.width, self.height, self.quality = width, height, quality
        self._background = self._draw_background(label)
        side = max(8, height // 6)
        self._sprite = Image.new("RGB", (side, side), (255, 255, 255))
        ImageDraw.Draw(self._sprite).rectangle([side // 4, side // 4, side * 3 // 4, side * 3 // 4], fill=(220, 30, 30))
        self._text_font = _font(max(10, height // 14))
        self._small_font = _font(max(8, height // 24))

    def _draw_background(self, label: str) -> Image.Image:
        w, h = self.width, self.height
        image = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(image)
        bar_w = w / len(_BARS)
        for i, colour in enumerate(_BARS):
            draw.rectangle([int(i * bar_w), 0, int((i + 1) * bar_w), int(h * 0.67)], fill=colour)
        band_top = int(h * 0.67)
        for x in range(0, w, max(1, w // 64)):  # grey ramp
            level = int(255 * x / max(1, w - 1))
            draw.rectangle([x, band_top, x + w // 64, h], fill=(level, level, level))
        draw.rectangle([0, int(h * 0.78), w, h], fill=(16, 16, 24))
        draw.text((w // 40, int(h * 0.80)), label, font=_font(max(8, h // 24)), fill=(255, 255, 255))
        return image

    def render(self, frame_number: int, wall_time: float | None = None) -> bytes:
        """The JPEG for frame `frame_number` (the sprite moves with it) stamped with `wall_time`."""
        wall_time = time.time() if wall_time is None else wall_time
        image = self._background.copy()
        side = self._sprite.width
        span = max(1, self.width - side)
        x = (frame_number * max(1, self.width // 90)) % (2 * span)
        x = x if x < span else 2 * span - x  # bounce between the edges
        y = int(self.height * 0.67) - side - self.height // 40
        image.paste(self._sprite, (x, max(0, y)))
        draw = ImageDraw.Draw(image)
        clock = time.strftime("%H:%M:%S", time.gmtime(wall_time)) + f".{int(wall_time * 1000) % 1000:03d} UTC"
        # Top right: players put their status overlay top left.
        draw.text((self.width - self.width // 40, self.height // 30), clock, font=self._text_font,
                  fill=(0, 0, 0), anchor="ra")
        draw.text((self.width // 40, int(self.height * 0.89)), f"frame {frame_number}",
                  font=self._small_font, fill=(255, 255, 0))
        return encode_jpeg(image, self.quality)


def status_frame(width: int, height: int, upstream: str, message: str) -> bytes:
    """A dark frame that says what is wrong, shown to image viewers while the upstream is down."""
    image = Image.new("RGB", (width, height), (40, 40, 48))
    draw = ImageDraw.Draw(image)
    big, small = _font(max(10, height // 14)), _font(max(8, height // 28))
    draw.text((width // 2, height // 2), message, font=big, fill=(255, 200, 80), anchor="mm")
    draw.text((width // 2, height // 2 + height // 8), f"upstream: {upstream}", font=small,
              fill=(200, 200, 200), anchor="mm")
    return encode_jpeg(image, 70)


# Where a JPEG's SOF marker may be looked for: after at most this many segments and fill bytes
# (a real JPEG has a handful of APP, DQT and DHT segments before it). Any upstream can send any
# bytes: a frame of 8 MiB of fill bytes must not cost a scan of 8 million steps.
JPEG_SIZE_MAX_STEPS = 64


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, or None if there is none in a valid position
    within JPEG_SIZE_MAX_STEPS segments."""
    i = 2
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    for _ in range(JPEG_SIZE_MAX_STEPS):
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def is_jpeg(data: bytes) -> bool:
    """A JPEG starts with SOI (FFD8) and ends with EOI (FFD9)."""
    return len(data) >= 4 and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


# A publisher's capture time travels inside the JPEG, in a COM segment right after SOI, so the
# frame stays a valid JPEG for every consumer: FF D8 | FF FE | length | b"vsproxy-capture=" |
# seconds since the Unix epoch as ASCII (e.g. "1764558000.123456").
CAPTURE_MAGIC = b"vsproxy-capture="


def with_capture_time(jpeg: bytes, captured: float) -> bytes:
    """`jpeg` with its capture time stamped in (see CAPTURE_MAGIC); not a JPEG: unchanged."""
    if jpeg[:2] != b"\xff\xd8":
        return jpeg
    payload = CAPTURE_MAGIC + f"{captured:.6f}".encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def split_capture_time(jpeg: bytes) -> tuple[bytes, float | None]:
    """(the JPEG as the publisher made it, its capture time) for a frame stamped by
    `with_capture_time`; an unstamped frame comes back unchanged, with None."""
    stamp = _capture_stamp(jpeg)
    if stamp is None:
        return jpeg, None
    end, captured = stamp
    return jpeg[:2] + jpeg[end:], captured


def stamped_capture_time(jpeg: bytes) -> float | None:
    """The capture time `with_capture_time` stamped into `jpeg`, None if it has none (nothing copied)."""
    stamp = _capture_stamp(jpeg)
    return None if stamp is None else stamp[1]


def _capture_stamp(jpeg: bytes) -> tuple[int, float] | None:
    """(where the stamp's COM segment ends, the capture time) of a stamped frame, else None."""
    if jpeg[2:4] != b"\xff\xfe" or jpeg[6:6 + len(CAPTURE_MAGIC)] != CAPTURE_MAGIC:
        return None
    end = 4 + int.from_bytes(jpeg[4:6], "big")
    try:
        return end, float(jpeg[6 + len(CAPTURE_MAGIC):end])
    except ValueError:
        return None
