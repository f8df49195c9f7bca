"""A real RTSP server on loopback for the rtsp source's tests (GStreamer's gst-rtsp-server).

Two halves in one file:

* Run as a script with Debian's Python (the GObject bindings are Debian packages, not PyPI ones):
  `/usr/bin/python3 tests/rtsp_server.py --port 8554` serves a moving `videotestsrc` pattern as
  H.264 (x264enc, zerolatency, a keyframe every second) or MJPEG at rtsp://127.0.0.1:PORT/stream,
  like Isaac Sim's isaacsim.streaming.rtsp extension does from NVENC. It prints "READY <url>" once
  it listens and stops on SIGTERM/SIGINT. `--check` only verifies the dependencies.

* Imported by the tests (any Python): `RtspTestServer` starts that script as a subprocess on a
  port, waits until it accepts connections, and kills/restarts it on the same port.

Debian packages: python3-gi python3-gst-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly (x264enc). `VSPROXY_GST_PYTHON` overrides the
interpreter (default /usr/bin/python3).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

from clock_off import FaketimeMissing, clock_off

APT_PACKAGES = (
    "python3-gi python3-gst-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly"
)
ELEMENTS = {
    "h264": ("videotestsrc", "videoconvert", "x264enc", "rtph264pay"),
    "mjpeg": ("videotestsrc", "videoconvert", "jpegenc", "rtpjpegpay"),
}
SCRIPT = os.path.abspath(__file__)


# -- the client side: used by the tests ----------------------------------------------------------


class RtspServerUnavailable(RuntimeError):
    """The server's dependencies are missing (the message says what to install)."""


def gst_python() -> str:
    return os.environ.get("VSPROXY_GST_PYTHON", "/usr/bin/python3")


def check_dependencies(codec: str = "h264") -> None:
    """Raise RtspServerUnavailable naming the packages to install if the server cannot run."""
    python = gst_python()
    if not os.path.exists(python):
        raise RtspServerUnavailable(
            f"the RTSP test server needs Debian's Python with GStreamer bindings at {python} "
            f"(apt-get install {APT_PACKAGES}; or set VSPROXY_GST_PYTHON)"
        )
    result = subprocess.run([python, SCRIPT, "--check", "--codec", codec], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["unknown error"]
        raise RtspServerUnavailable(
            f"the RTSP test server cannot run with {python}: {detail[0]} "
            f"(apt-get install {APT_PACKAGES})"
        )


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RtspTestServer:
    """The script above as a subprocess: `start()`, `kill()` (like a crash), `stop()`, `restart()`."""

    def __init__(self, port: int, *, codec: str = "h264", width: int = 640, height: int = 360,
                 fps: int = 30, path: str = "/stream", pattern: str = "ball", shared: bool = False,
                 sender_reports: str = "send", file: str = "", clock: str = "") -> None:
        self.port = port
        self.file = file
        self.codec = codec
        self.width, self.height, self.fps = width, height, fps
        self.path = path
        self.pattern = pattern
        self.shared = shared
        self.sender_reports = sender_reports
        self.clock = clock  # its wall clock off by this (libfaketime's "-5s"): sender reports say so
        self.process: subprocess.Popen | None = None
        self._stderr: IO[str] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it accepts connections on its port."""
        assert self.process is None or self.process.poll() is not None, "already running"
        cmd = [gst_python(), SCRIPT, "--port", str(self.port), "--codec", self.codec, "--path", self.path,
               "--width", str(self.width), "--height", str(self.height), "--fps", str(self.fps),
               "--pattern", self.pattern, "--sender-reports", self.sender_reports] + (
                   ["--shared"] if self.shared else []) + (["--file", self.file] if self.file else [])
        # stderr goes to a file, not a pipe nobody reads (a full pipe would freeze the server).
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = None
        if self.clock:
            try:
                cmd, env = clock_off(cmd, self.clock)
            except FaketimeMissing as exc:
                raise RtspServerUnavailable(str(exc)) from None
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._stderr, text=True, env=env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().strip()[-2000:]
                raise RtspServerUnavailable(f"RTSP test server exited with code {self.process.returncode}: {err}")
            if port_accepts(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RtspServerUnavailable(f"RTSP test server did not listen on 127.0.0.1:{self.port} within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL, like a crashed simulator: connections drop without an RTSP TEARDOWN."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def restart(self, timeout: float = 30.0) -> None:
        self.kill()
        self.start(timeout)

    def _end(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is not None:
            process.wait()
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# -- the server side: run with Debian's Python ----------------------------------------------------


def _load_gst():
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    return GLib, Gst, GstRtspServer


def _launch_line(codec: str, width: int, height: int, fps: int, pattern: str = "ball", file: str = "") -> str:
    if file:  # a recorded H.264 stream, played in real time: the server encodes nothing
        return f"( filesrc location={file} ! qtdemux ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    source = (f"videotestsrc is-live=true pattern={pattern} ! video/x-raw,width={width},height={height},"
              f"framerate={fps}/1 ! videoconvert")
    if codec == "h264":
        # A keyframe every second so a (re)connecting client shows a picture quickly.
        encode = (f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=2000 "
                  f"! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1")
    else:
        encode = "video/x-raw,format=I420 ! jpegenc quality=85 ! rtpjpegpay name=pay0 pt=26"
    return f"( {source} ! {encode} )"


def serve(args: argparse.Namespace) -> int:
    GLib, Gst, GstRtspServer = _load_gst()
    for name in ELEMENTS[args.codec]:
        if Gst.ElementFactory.find(name) is None:
            print(f"GStreamer element {name!r} is missing", file=sys.stderr)
            return 3
    if args.check:
        print("ok")
        return 0

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(_launch_line(args.codec, args.width, args.height, args.fps, args.pattern, args.file))
    # Not shared (the default): every client gets its own pipeline, so it starts on a keyframe.
    # Shared: clients join one running encoder mid-GOP, like a camera or a busy simulator.
    factory.set_shared(args.shared)
    if args.sender_reports != "send":
        # What the RTCP sender reports map RTP timestamps to. GStreamer's default ("send"): the
        # wall-clock time a frame is sent. "capture": the time its capture began (a live source
        # sends a frame a frame interval later). "unsynced": the pipeline's running time, like
        # a server whose clock is far off (its reports say the stream started in 1900).
        properties = {"capture": ("rtcp-sync-send-time", False),
                      "unsynced": ("ntp-time-source", "running-time")}[args.sender_reports]

        def configure_rtpbin(media) -> None:
            for element in media.get_element().get_parent().iterate_recurse():
                if element.get_factory() is not None and element.get_factory().get_name() == "rtpbin":
                    element.set_property(*properties)

        factory.connect("media-configure", lambda _factory, media: media.connect("prepared", configure_rtpbin))
    server.get_mount_points().add_factory(args.path, factory)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 4

    def quit_loop(*_):
        loop.quit()
        return GLib.SOURCE_REMOVE

    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, quit_loop)
    print(f"READY rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--path", default="/stream")
    parser.add_argument("--codec", choices=sorted(ELEMENTS), default="h264")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--pattern", default="ball", help="a videotestsrc pattern (ball moves)")
    parser.add_argument("--file", default="", help="serve this MP4 file's H.264 track (in real time) instead "
                                                    "of encoding a test pattern")
    parser.add_argument("--shared", action="store_true", help="one pipeline for all clients")
    parser.add_argument("--sender-reports", default="send", choices=("send", "capture", "unsynced"),
                        help="the wall-clock time RTCP sender reports give a frame: when it is sent (GStreamer's "
                             "default), when its capture began, or a clock far off")
    parser.add_argument("--check", action="store_true", help="only check the dependencies")
    args = parser.parse_args()
    try:
        return serve(args)
    except (ImportError, ValueError) as exc:  # gi missing, or a typelib missing (require_version)
        print(f"GStreamer Python bindings unavailable: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
