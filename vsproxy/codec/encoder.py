"""One H.264 encoder per JPEG upstream, shared by every H.264 viewer of it.

PyAV (FFmpeg's MJPEG decoder and libx264) runs in a worker thread, never on the event loop. The
loop hands it JPEGs through a single slot (`submit` replaces a JPEG the thread has not taken
yet), so a machine too slow for the stream encodes fewer frames instead of queueing or falling
behind the live stream. Each access unit goes back to the loop with `call_soon_threadsafe`.

Encoding: no B-frames, `tune=zerolatency`, a keyframe at least every `keyframe_interval_seconds`
(time-based, since upstream frame rates vary) and whenever a viewer asks for one (at most one a
second), constant quality (`crf`) unless `bitrate_kbps` is set. Pictures larger than
`max_width` x `max_height` are scaled down, keeping their aspect.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..schema import setting

log = logging.getLogger("vsproxy.encoder")

THREAD_PREFIX = "vsproxy-h264"
KEYFRAME_REQUEST_MIN_INTERVAL = 1.0  # seconds between keyframes forced on request
FULL_RANGE, LIMITED_RANGE = 2, 1  # FFmpeg's AVCOL_RANGE_JPEG and AVCOL_RANGE_MPEG
# Presentation times that go back continue from the last one by the time between the frames, in
# these bounds (microseconds).
MIN_STEP_US, MAX_STEP_US = 1_000, 1_000_000
# After an unexpected error the thread opens new codecs and goes on, after a pause that doubles
# with each failure in a row (no frame encoded between them), up to the maximum.
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
# The largest JPEG picture decoded (FFmpeg's max_pixels): 64 megapixels, beyond 8K UHD and most
# still cameras. Any upstream can state any size in a JPEG's header, and FFmpeg would allocate the
# picture it states: a push publisher's 3 MB JPEG of 16000x16000 grew the process by 780 MB and
# took 3 s of a core per frame. Larger ones are skipped, as damaged ones are.
MAX_DECODE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class H264Config:
    """The shared encoder of JPEG upstreams (top-level `h264:`, per upstream `upstreams.<name>.h264`)."""

    crf: int = setting(31, min=0, max=51, doc="constant quality when bitrate_kbps is 0 (lower: better, "
                                              "more bytes)")
    bitrate_kbps: int = setting(0, min=0, max=200_000, doc="target bitrate instead of constant quality; 0: "
                                                           "use crf")
    keyframe_interval_seconds: float = setting(1.0, min=0.1, max=60, doc="a keyframe at least this often "
                                                                         "(viewers join and recover at keyframes)")
    max_width: int = setting(1920, min=16, max=7680, doc="larger pictures are scaled down to fit")
    max_height: int = setting(1080, min=16, max=4320, doc="larger pictures are scaled down to fit")
    preset: str = setting("veryfast", choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium"),
                          doc="libx264 speed/size trade-off")


def encoded_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """The picture size to encode: scaled down to fit, aspect kept, both even (4:2:0)."""
    scale = min(1.0, max_width / width, max_height / height)
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    return w - w % 2, h - h % 2


def open_x264(av: Any, settings: H264Config, size: tuple[int, int], extra: dict[str, str] | None = None) -> Any:
    """An open libx264 encoder context (PyAV) for live streaming with `settings`: no B-frames,
    `zerolatency` (no lookahead: a frame's access unit comes out of the call that takes it),
    timestamps in microseconds, keyframes only where the caller asks (PictureType.I). `extra`:
    more libx264 options (the benchmark's sweeps)."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, 1_000_000)
    encoder.framerate = Fraction(30)  # a hint for the level; timestamps carry the real timing
    encoder.gop_size = 100_000  # keyframes are forced by time, not counted
    encoder.max_b_frames = 0
    options = {"preset": settings.preset, "tune": "zerolatency", "sc_threshold": "0"}
    if settings.bitrate_kbps:
        encoder.bit_rate = settings.bitrate_kbps * 1000
        options["maxrate"] = f"{settings.bitrate_kbps}k"
        options["bufsize"] = f"{settings.bitrate_kbps}k"  # one second of VBV: steady, low latency
    else:
        options["crf"] = str(settings.crf)
    encoder.options = {**options, **(extra or {})}
    encoder.open()
    return encoder


class H264Encoder:
    """Encodes the newest JPEG of one upstream to H.264 in a worker thread.

    `on_access_unit(data, pts_us)` is called on the event loop for every access unit (Annex-B,
    SPS/PPS in front of keyframes). `start`/`stop` follow the upstream's H.264 viewers.
    """

    def __init__(self, name: str, settings: H264Config,
                 on_access_unit: Callable[[bytes, int], None]) -> None:
        self.name = name
        self.settings = settings
        self.on_access_unit = on_access_unit
        self.frames_encoded = 0
        self.frames_skipped = 0  # JPEGs replaced in the slot before the thread took them
        self.encode_seconds = 0.0
        self.starts = 0
        self.errors = 0  # JPEGs the decoder could not take (damaged): skipped
        self.restarts = 0  # unexpected errors in the thread, each followed by new codecs
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slot: tuple[bytes, int] | None = None
        self._keyframe_requested = False
        self._thread: threading.Thread | None = None
        self._generation = 0  # each start is a new generation; older threads see it and end
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._generation += 1
            self._slot = None
        self.starts += 1
        self._thread = threading.Thread(target=self._run, args=(self._generation,),
                                        name=f"{THREAD_PREFIX}-{self.name}", daemon=True)
        self._thread.start()
        log.info("H.264 encoder started", extra={"upstream": self.name})

    def stop(self) -> None:
        """Ask the thread to end after the frame it is encoding; never blocks the loop."""
        if self._thread is None:
            return
        with self._lock:
            self._generation += 1
            self._slot = None
            self._wake.notify_all()
        self._thread = None
        log.info("H.264 encoder stopped", extra={"upstream": self.name})

    def submit(self, jpeg: bytes, pts_us: int) -> None:
        """Hand the thread the newest JPEG (cheap: the loop only fills a slot)."""
        with self._lock:
            if self._slot is not None:
                self.frames_skipped += 1
            self._slot = (jpeg, pts_us)
            self._wake.notify()

    def request_keyframe(self) -> None:
        """The next encoded frame is a keyframe (at most one a second from requests)."""
        with self._lock:
            self._keyframe_requested = True

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self, generation: int) -> None:
        """The thread: encodes until stopped. An unexpected error (a codec or library failure on
        some input) does not end it silently while viewers wait for frames that never come: it
        is logged and counted, and new codecs take over after a pause (a keyframe first)."""
        in_a_row = 0
        while True:
            encoded = self.frames_encoded
            try:
                self._encode(generation)
                return  # stopped
            except Exception:
                self.restarts += 1
                in_a_row = 1 if self.frames_encoded > encoded else in_a_row + 1
                delay = min(RESTART_DELAY_MAX_SECONDS, RESTART_DELAY_SECONDS * 2 ** (in_a_row - 1))
                log.exception("H.264 encoder failed; new codecs in %.1f s", delay, extra={"upstream": self.name})
            with self._lock:
                self._wake.wait_for(lambda: self._generation != generation, timeout=delay)
                if self._generation != generation:
                    return
                self._slot = None  # the newest frame after the pause, not one from before it

    def _encode(self, generation: int) -> None:
        import av  # PyAV: loaded with the first encoder
        from av.video.frame import PictureType

        settings = self.settings
        decoder = av.CodecContext.create("mjpeg", "r")
        decoder.options = {"max_pixels": str(MAX_DECODE_PIXELS)}
        encoder: Any = None
        size: tuple[int, int] | None = None
        last_keyframe = -1e9
        last_requested_keyframe = -1e9
        last_pts = -1
        last_taken = time.monotonic()
        shift = 0  # added to the stated times since they last went back
        while True:
            with self._lock:
                while self._slot is None and self._generation == generation:
                    self._wake.wait()
                if self._generation != generation:
                    return
                jpeg, pts_us = self._slot  # type: ignore[misc]
                self._slot = None
                requested = self._keyframe_requested
                self._keyframe_requested = False
            started = time.perf_counter()
            now = time.monotonic()
            taken, last_taken = now - last_taken, now  # since the frame before (pts that go back)
            try:
                pictures = decoder.decode(av.Packet(jpeg))
            except av.error.FFmpegError:
                self.errors += 1
                continue  # a damaged JPEG, or one over MAX_DECODE_PIXELS: the next one will do
            for picture in pictures:
                wanted = encoded_size(picture.width, picture.height, settings.max_width, settings.max_height)
                if encoder is None or wanted != size:
                    encoder, size = self._open(av, wanted), wanted
                    last_keyframe = -1e9
                # JPEGs are full range; H.264 decoders assume limited range unless told otherwise.
                frame = picture.reformat(width=size[0], height=size[1], format="yuv420p",
                                         src_color_range=FULL_RANGE, dst_color_range=LIMITED_RANGE)
                pts = pts_us + shift
                if pts <= last_pts:
                    # The stated times went back (a publisher's clock stepped back, or is behind
                    # ours, which the first picture's time may come from). libx264 needs them
                    # increasing, and players pace by them: go on from the last one by the time
                    # that passed here, and shift the ones after it alike (not 1 us apart: a
                    # WebRTC or MP4 player would show them all at once, then freeze).
                    step = min(max(int(taken * 1_000_000), MIN_STEP_US), MAX_STEP_US)
                    shift += last_pts + step - pts
                    pts = last_pts + step
                last_pts = frame.pts = pts
                keyframe = now - last_keyframe >= settings.keyframe_interval_seconds or (
                    requested and now - last_requested_keyframe >= KEYFRAME_REQUEST_MIN_INTERVAL)
                if keyframe:
                    last_keyframe = now
                    if requested:
                        last_requested_keyframe = now
                # A decoded JPEG says it is an I picture: left as it is, libx264 would make every
                # frame a keyframe.
                frame.pict_type = PictureType.I if keyframe else PictureType.NONE
                for packet in encoder.encode(frame):
                    self._deliver(generation, bytes(packet), packet.pts)
            self.encode_seconds += time.perf_counter() - started

    def _open(self, av: Any, size: tuple[int, int]) -> Any:
        settings = self.settings
        encoder = open_x264(av, settings, size)
        log.info("H.264 encoding %dx%d (%s, %s)", size[0], size[1], settings.preset,
                 f"{settings.bitrate_kbps} kbit/s" if settings.bitrate_kbps else f"crf {settings.crf}",
                 extra={"upstream": self.name})
        return encoder

    def _deliver(self, generation: int, data: bytes, pts_us: int) -> None:
        self.frames_encoded += 1
        loop = self._loop
        if loop is None or self._generation != generation:
            return
        try:
            loop.call_soon_threadsafe(self._on_loop, generation, data, pts_us)
        except RuntimeError:  # the loop closed (shutdown)
            pass

    def _on_loop(self, generation: int, data: bytes, pts_us: int) -> None:
        if self._generation == generation:  # nothing from a stopped encoder reaches viewers
            self.on_access_unit(data, pts_us)
