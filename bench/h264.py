"""H.264 benchmarks: bytes per viewer against MJPEG (with the picture quality, PSNR), the shared
encoder's CPU, RTSP passthrough to many viewers, and the time to the first decoded frame in
Chromium. Figures, not tests: everything on 127.0.0.1, bounded in time, children cleaned up.

    python bench/h264.py bytes                 # moving camera, smooth scene, demo: bytes/s per viewer, PSNR
    python bench/h264.py x264-sweep            # libx264 options offline: bytes and PSNR at crf 31 and 32
    python bench/h264.py psnr-ffmpeg --crfs 28,30,31,32  # the same encodes, PSNR by ffmpeg's psnr filter
    python bench/h264.py encoder-cpu           # proxy CPU with and without the encoder running (720p30)
    python bench/h264.py rtsp --viewers 100    # RTSP H.264 passthrough: proxy CPU, fps, frames decoded
    python bench/h264.py rtsp --viewers 400 --pattern recorded --from-arrival  # the fan-out alone
    python bench/h264.py first-frame --runs 10 # Chromium embed player: ms to the first decoded frame
    python bench/h264.py video-tag --runs 3    # Chromium <video src=stream.mp4>, with and without the README snippet

The 400-viewer `format=h264` fan-out is `python bench/fanout.py --transport ws_h264 --viewers 400`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the RTSP test server and the Chromium helper

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    PROXY_CORE,
    arm_deadline,
    free_port,
    git_line,
    http_request,
    kill_children,
    machine_line,
    percentile,
    pin_self,
    proc_cpu_seconds,
    raise_nofile,
    server_env,
    spawn,
    stop_child,
    wait_health,
)
from loadgen import WS_H264, Stats, Viewer  # noqa: E402
from upstream import FakeCamera, make_moving_jpegs  # noqa: E402

WS_KEY = "dnNwcm94eWJlbmNobWFyaw=="


# -- the proxy under test --------------------------------------------------------------------------

H264_CONFIG = ""  # `h264:` keys from --h264 (e.g. "crf: 28"), for every proxy started


async def start_proxy(tmp: str, config: str, env: dict | None = None) -> tuple:
    port = free_port()
    path = os.path.join(tmp, f"bench-{port}.yaml")
    with open(path, "w") as f:
        f.write("limits:\n  max_viewers_per_session: 5000\n" + config)
        if H264_CONFIG:
            f.write(f"h264: {{{H264_CONFIG}}}\n")
    log = os.path.join(tmp, f"server-{port}.log")
    cmd = [sys.executable, "-m", "vsproxy", "--config", path, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    proc = spawn(cmd, cwd=tmp, env=server_env(env), log_path=log, core=PROXY_CORE)
    await wait_health(port, proc)
    return proc, port


async def create_session(port: int) -> str:
    status, body = await http_request(port, "POST", "/session/create", {"userId": "bench", "robotName": "bench"})
    assert status == 200, body
    return json.loads(body)["sessionId"]


async def open_stream(port: int, path: str, websocket: bool) -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if websocket:
        head += ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n")
    writer.write((head + "\r\n").encode())
    data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = data.split(b"\r\n", 1)[0]
    if b" 200 " not in status and b" 101 " not in status:
        raise RuntimeError(f"{path}: {status!r}")
    return reader, writer, data


async def count_bytes(reader: asyncio.StreamReader, until: float, sink: bytearray | None = None) -> int:
    total = 0
    while time.monotonic() < until:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 20), max(0.01, until - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        total += len(chunk)
        if sink is not None:
            sink += chunk
    return total


# -- picture quality ---------------------------------------------------------------------------------

def luma_plane(frame) -> np.ndarray:  # noqa: ANN001 (a PyAV VideoFrame)
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:, :frame.width].astype(np.float64)


def psnr_against_sources(units: list[bytes], sources: list[bytes]) -> tuple[float, float, float, int]:
    """(median, minimum) luma PSNR of the decoded pictures, each against the source frame it
    matches best (the camera loops through distinct frames), in the stream's own code values:
    the source JPEG's full-range luma brought to the limited range H.264 carries (16..235), peak
    255, as ffmpeg's psnr filter, x264 and VMAF tools measure H.264 (`psnr-ffmpeg` runs ffmpeg's
    filter itself on the same encodes); then the median with the decoded luma brought to the
    source's full range instead, which scores the same pictures 1.3 dB lower (20 log10(255/219));
    and the number of pictures."""
    import av
    jpeg_decoder = av.CodecContext.create("mjpeg", "r")
    refs = [luma_plane(jpeg_decoder.decode(av.Packet(s))[0]) for s in sources]  # full range, as sent
    small = [r[::8, ::8] for r in refs]
    decoder = av.CodecContext.create("h264", "r")
    coded, full = [], []
    pictures = []
    for unit in units:
        try:
            pictures += decoder.decode(av.Packet(unit))
        except av.error.InvalidDataError:
            continue
    for frame in pictures:
        y = luma_plane(frame)  # limited range (16..235), as vsproxy encodes
        if y.shape != refs[0].shape:
            continue
        y_full = (y - 16) * (255 / 219)
        best = min(range(len(refs)), key=lambda k: float(np.mean((y_full[::8, ::8] - small[k]) ** 2)))
        for scores, mse in ((coded, np.mean((y - (refs[best] * (219 / 255) + 16).round()) ** 2)),
                            (full, np.mean((y_full - refs[best]) ** 2))):
            scores.append(99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    if not coded:
        return float("nan"), float("nan"), float("nan"), 0
    return statistics.median(coded), min(coded), statistics.median(full), len(coded)


# -- scenarios ---------------------------------------------------------------------------------------

async def bytes_per_viewer(args: argparse.Namespace, tmp: str) -> None:
    print("| camera | MJPEG bytes/s | format=h264 bytes/s | h264/MJPEG | stream.mp4 bytes/s | mp4/MJPEG "
          "| H.264 fps | PSNR median / min (dB), as ffmpeg's psnr filter (median in the source's full range) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for camera_kind in args.cameras.split(","):
        camera = None
        sources: list[bytes] = []
        if camera_kind in ("moving", "smooth"):
            sources = make_moving_jpegs(60, noise=camera_kind == "moving")
            camera = FakeCamera(sources, 30)
            camera.listen(0)
            proc, port = await start_proxy(tmp, "", {"ISAAC_SIM_IP": "127.0.0.1",
                                                     "ISAAC_SIM_WS_PORT": str(camera.port)})
        else:
            proc, port = await start_proxy(tmp, "demo: {width: 1280, height: 720, fps: 30}\n")
        try:
            session = await create_session(port)
            streams = {
                "mjpeg": await open_stream(port, f"/stream/{session}/mjpeg", False),
                "h264": await open_stream(port, f"/stream/{session}?format=h264", True),
                "mp4": await open_stream(port, f"/stream/{session}/stream.mp4", False),
            }
            # Every stream is read from its start (the H.264 one is kept, to decode it from its
            # first keyframe); the rates count only what arrives inside the window.
            sinks = {name: bytearray() for name in streams}
            end = time.monotonic() + args.warmup + args.duration + 1
            readers = [asyncio.ensure_future(count_bytes(r, end, sinks[name]))
                       for name, (r, _, _) in streams.items()]
            await asyncio.sleep(args.warmup)
            before = {name: len(sink) for name, sink in sinks.items()}
            window_wall = time.time()
            await asyncio.sleep(args.duration)
            rates = {name: (len(sinks[name]) - before[name]) / args.duration for name in streams}
            h264_bytes = bytes(sinks["h264"])
            for task in readers:
                task.cancel()
            for _, writer, _ in streams.values():
                writer.close()
        finally:
            stop_child(proc)
            if camera is not None:
                await camera.stop()
        quality, fps = "n/a (source frames unknown)", "-"
        if sources:
            from helpers import ws_server_messages  # tests/helpers.py: the test suite's WebSocket reader
            messages = [m for op, m in ws_server_messages(h264_bytes) if op == 2]
            units = [m[9:] for m in messages]
            # Pictures per second in the window (by their presentation times): an encoder that
            # cannot keep up encodes fewer frames, which would flatter the bytes ratio.
            in_window = sum(1 for m in messages
                            if window_wall <= int.from_bytes(m[1:9], "big") / 1e6 < window_wall + args.duration)
            fps = f"{in_window / args.duration:.1f}"
            med, low, med_full, n = psnr_against_sources(units, sources)
            quality = f"{med:.1f} / {low:.1f} ({med_full:.1f}; {n} pictures)"
        print(f"| {camera_kind} | {rates['mjpeg']:,.0f} | {rates['h264']:,.0f} | {rates['h264'] / rates['mjpeg']:.3f} "
              f"| {rates['mp4']:,.0f} | {rates['mp4'] / rates['mjpeg']:.3f} | {fps} | {quality} |", flush=True)


SWEEP_VARIANTS = (
    "",  # vsproxy's encoder as configured (veryfast, zerolatency, no B-frames)
    "tune=psnr,zerolatency",
    "x264-params=psy-rd=0,0",
    "x264-params=aq-mode=2",
    "x264-params=deblock=-2,-2",
    "x264-params=trellis=2",
    "x264-params=no-8x8dct=1",
    "threads=1",  # one slice per picture
    "preset=medium;x264-params=psy-rd=0,0",
)


def moving_loop_pictures() -> tuple[list[bytes], list]:
    """The moving camera's source JPEGs, and each as the YUV picture vsproxy's encoder takes."""
    import av

    from vsproxy.codec.encoder import FULL_RANGE, LIMITED_RANGE

    sources = make_moving_jpegs(60)
    decoder = av.CodecContext.create("mjpeg", "r")
    pictures = [decoder.decode(av.Packet(s))[0].reformat(format="yuv420p", src_color_range=FULL_RANGE,
                                                          dst_color_range=LIMITED_RANGE) for s in sources]
    return sources, pictures


def encode_offline(pictures: list, frames: int, options: dict[str, str]) -> tuple[list[bytes], float]:
    """`frames` pictures of the loop through vsproxy's own encoder set-up (`open_x264`) with
    `options` added, a keyframe a second: the access units and the CPU ms per frame."""
    import av
    from av.video.frame import PictureType

    from vsproxy.codec.encoder import H264Config, open_x264

    encoder = open_x264(av, H264Config(), (1280, 720), options)
    units: list[bytes] = []
    started = time.process_time()
    for i in range(frames):
        picture = pictures[i % len(pictures)]
        picture.pts = i * 33_333
        picture.pict_type = PictureType.I if i % 30 == 0 else PictureType.NONE
        units += [bytes(packet) for packet in encoder.encode(picture)]
    units += [bytes(packet) for packet in encoder.encode(None)]
    return units, 1000 * (time.process_time() - started) / frames


async def x264_sweep(args: argparse.Namespace, tmp: str) -> None:
    """libx264 options against each other on the moving camera, offline (no proxy, no sockets):
    vsproxy's own encoder set-up plus each variant's options, at two crf values; bytes against the
    source JPEGs' and the luma PSNR (as ffmpeg's psnr filter), and the ratio at 32.0 dB
    interpolated between the two (log-linear)."""
    sources, pictures = moving_loop_pictures()
    frames = int(args.duration * 30)
    jpeg_bytes = sum(len(sources[i % len(sources)]) for i in range(frames))
    crfs = [float(c) for c in args.crfs.split(",")]
    variants = args.variants.split("|") if args.variants else SWEEP_VARIANTS
    print(f"{frames} frames of the moving camera (1280x720, 30 fps, a keyframe a second); crf {args.crfs}\n")
    columns = " | ".join(f"crf {c:g}: ratio, PSNR median / min (dB)" for c in crfs)
    print(f"| libx264 options beyond vsproxy's | {columns} | ratio at 32.0 dB | encode ms/frame |")
    print("|---|" + "--:|" * (len(crfs) + 2))
    for variant in variants:
        extra = dict(kv.split("=", 1) for kv in variant.split(";") if kv)
        points, cells, encode_ms = [], [], 0.0
        for crf in crfs:
            units, encode_ms = encode_offline(pictures, frames, {"crf": f"{crf:g}", **extra})
            ratio = sum(map(len, units)) / jpeg_bytes
            med, low, _, _ = psnr_against_sources(units, sources)
            points.append((med, ratio))
            cells.append(f"{ratio:.3f}, {med:.2f} / {low:.2f}")
        (p0, r0), (p1, r1) = points[0], points[-1]
        at32 = "-" if p0 == p1 else f"{np.exp(np.log(r0) + (32.0 - p0) / (p1 - p0) * (np.log(r1) - np.log(r0))):.3f}"
        print(f"| {variant or '(none)'} | " + " | ".join(cells) + f" | {at32} | {encode_ms:.1f} |", flush=True)


async def psnr_ffmpeg(args: argparse.Namespace, tmp: str) -> None:
    """The bytes target's PSNR measured by ffmpeg's own psnr filter, not by this file: the moving
    loop through vsproxy's encoder set-up at each crf, written out as raw H.264 beside the
    source JPEGs as MJPEG, and compared frame by frame (`setpts` pairs the n-th pictures)."""
    import subprocess

    sources, pictures = moving_loop_pictures()
    frames = int(args.duration * 30)
    reference = Path(tmp, "sources.mjpeg")
    reference.write_bytes(b"".join(sources[i % len(sources)] for i in range(frames)))
    jpeg_bytes = reference.stat().st_size
    print(f"{frames} frames of the moving camera (1280x720, 30 fps, a keyframe a second)\n")
    print("| crf | H.264/MJPEG | ffmpeg psnr: y (mean) | y, worst frame | u / v | average (y, u, v) |")
    print("|--:|--:|--:|--:|--:|--:|")
    for crf in args.crfs.split(","):
        units, _ = encode_offline(pictures, frames, {"crf": crf})
        stream, stats = Path(tmp, f"crf{crf}.h264"), Path(tmp, f"crf{crf}.psnr")
        stream.write_bytes(b"".join(units))
        subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "error",
                        "-f", "h264", "-framerate", "30", "-i", str(stream),
                        "-f", "mjpeg", "-framerate", "30", "-i", str(reference),
                        "-lavfi", f"[0:v]setpts=N/30/TB[a];[1:v]setpts=N/30/TB[b];[a][b]psnr=stats_file={stats}",
                        "-f", "null", "-"], check=True, timeout=300)
        rows = [dict(field.split(":", 1) for field in line.split()) for line in stats.read_text().splitlines()]
        if len(rows) != frames:
            raise RuntimeError(f"ffmpeg compared {len(rows)} pictures, not {frames}")

        # As ffmpeg prints it: from the mean squared error over the pictures.
        mean = {key: 10 * np.log10(255.0 ** 2 / np.mean([float(r[key]) for r in rows]))
                for key in ("mse_y", "mse_u", "mse_v", "mse_avg")}
        worst = min(float(r["psnr_y"]) for r in rows)
        print(f"| {crf} | {len(stream.read_bytes()) / jpeg_bytes:.3f} | {mean['mse_y']:.2f} | {worst:.2f} "
              f"| {mean['mse_u']:.1f} / {mean['mse_v']:.1f} | {mean['mse_avg']:.2f} |", flush=True)


async def encoder_cpu(args: argparse.Namespace, tmp: str) -> None:
    camera = FakeCamera(make_moving_jpegs(60), 30)
    camera.listen(0)
    proc, port = await start_proxy(tmp, "", {"ISAAC_SIM_IP": "127.0.0.1", "ISAAC_SIM_WS_PORT": str(camera.port)})
    try:
        session = await create_session(port)
        mjpeg = await open_stream(port, f"/stream/{session}/mjpeg", False)
        drain = asyncio.ensure_future(count_bytes(mjpeg[0], time.monotonic() + 3600))

        async def window() -> float:
            c0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(args.duration)
            return 100 * (proc_cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)

        await asyncio.sleep(args.warmup)
        without = await window()
        h264 = await open_stream(port, f"/stream/{session}?format=h264", True)
        drain2 = asyncio.ensure_future(count_bytes(h264[0], time.monotonic() + 3600))
        await asyncio.sleep(args.warmup)
        _, metrics = await http_request(port, "GET", "/metrics")
        frames0 = _metric(metrics, "vsproxy_encoder_frames_total")
        with_encoder = await window()
        _, metrics = await http_request(port, "GET", "/metrics")
        fps = (_metric(metrics, "vsproxy_encoder_frames_total") - frames0) / args.duration
        print("| upstream | proxy CPU, 1 MJPEG viewer | + 1 H.264 viewer (encoder running) | encoder "
              "| frames encoded/s |")
        print("|---|--:|--:|--:|--:|")
        print(f"| JPEG 1280x720 @30 (moving camera) | {without:.1f}% | {with_encoder:.1f}% | "
              f"{with_encoder - without:.1f}% | {fps:.1f} |")
        drain.cancel()
        drain2.cancel()
    finally:
        stop_child(proc)
        await camera.stop()


def _metric(text: bytes, name: str, upstream: str = "isaac") -> float:
    for line in text.decode().splitlines():
        if line.startswith(f'{name}{{upstream="{upstream}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def record_noise_stream(path: str, seconds: float, kbps: int = 2000) -> None:
    """An MP4 file of H.264 noise at `kbps` (1280x720, 30 fps, a keyframe every second, no
    B-frames: what a camera's hardware encoder sends), for the RTSP server to play without
    encoding on the benchmark machine. Noise keeps every frame at the full bitrate."""
    import av
    rng = np.random.default_rng(1)
    pictures = [av.VideoFrame.from_ndarray(rng.integers(0, 256, (720 * 3 // 2, 1280), dtype=np.uint8),
                                           format="yuv420p") for _ in range(30)]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.bit_rate = kbps * 1000
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "g": "30",
                          "sc_threshold": "0", "bf": "0"}
        for i in range(int(seconds * 30)):
            picture = pictures[i % len(pictures)]
            picture.pts = i  # in the stream's 1/30 s time base
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


async def rtsp_passthrough(args: argparse.Namespace, tmp: str) -> None:
    from rtsp_server import RtspTestServer
    recorded = ""
    if args.pattern == "recorded":
        # Played in real time with no encoder running: in production the simulator's GPU encodes,
        # on another machine; here a live encoder would take a third of a core from the viewers.
        recorded = os.path.join(tmp, "noise.mp4")
        record_noise_stream(recorded, args.warmup + args.duration + 30)
    # --from-arrival: a server whose sender reports vsproxy rejects (a clock far off), so frames
    # are timed by their arrival at the proxy and the latency is the fan-out's alone.
    server = RtspTestServer(free_port(), width=1280, height=720, fps=30, pattern=args.pattern, file=recorded,
                            sender_reports="unsynced" if args.from_arrival else "send")
    server.start()
    proc = None
    viewers: list[Viewer] = []
    try:
        proc, port = await start_proxy(tmp, f"upstreams: {{cam: {{kind: rtsp, url: \"{server.url}\"}}}}\n"
                                            "default_upstream: cam\n")
        session = await create_session(port)
        stats = Stats(None)
        viewers = [Viewer(stats, i, WS_H264) for i in range(args.viewers)]
        for v in viewers:
            await v.connect("127.0.0.1", port, session)
            v.start_reading()
        await asyncio.sleep(args.warmup)
        c0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        stats.measuring = True
        await asyncio.sleep(args.duration)
        stats.measuring = False
        cpu = 100 * (proc_cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        window = time.monotonic() - t0
        fps = sorted(v.frames / window for v in viewers if not v.closed)
        lat = sorted(x for v in viewers for x in v.latencies)
        _, body = await http_request(port, "GET", "/upstreams")
        cam = next(u for u in json.loads(body)["upstreams"] if u["name"] == "cam")
        print("| viewers | fps median / min | p50 / p99 ms | proxy CPU | frames decoded | passed through | "
              "bytes/s per viewer |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        print(f"| {args.viewers} | {percentile(fps, 0.5):.1f} / {fps[0]:.1f} | {percentile(lat, 0.5) / 1e6:.1f} / "
              f"{percentile(lat, 0.99) / 1e6:.1f} | {cpu:.1f}% | {cam.get('source', {}).get('decoded')} | "
              f"{cam.get('source', {}).get('passedThrough')} | {stats.bytes / window / len(viewers):,.0f} |")
    finally:
        for v in viewers:
            v.close()
        if proc is not None:
            stop_child(proc)
        server.stop()


async def rtsp_parser_delay(args: argparse.Namespace, tmp: str) -> None:
    """How long after the server sent it each H.264 packet comes out of FFmpeg's RTSP demuxer, as
    vsproxy opens it (its H.264 parser assembles access units) and with the parser off (one packet
    per NAL unit or fragment): the server's send time is the RTP timestamp mapped by its RTCP
    sender reports (GStreamer's default), read from the packets' producer reference time."""
    import av
    from rtsp_server import RtspTestServer

    from vsproxy.sources.rtsp import PROBE_OPTIONS
    server = RtspTestServer(free_port(), width=1280, height=720, fps=30, pattern=args.pattern)
    server.start()
    try:
        print("| demuxer | packets with a server time | delay after sending: median / p95 ms |")
        print("|---|--:|--:|")
        for label, extra in (("as vsproxy reads it (H.264 parser on)", {}),
                             ("parser off (fflags +noparse)", {"fflags": "+noparse+nofillin"})):
            container = await asyncio.to_thread(av.open, server.url, options={
                "rtsp_transport": "tcp", **PROBE_OPTIONS, **extra}, timeout=10)
            delays: list[float] = []

            def read(container=container, delays=delays) -> None:  # noqa: ANN001
                end = time.monotonic() + args.warmup + args.duration
                for packet in container.demux(container.streams.video[0]):
                    if time.monotonic() > end:
                        break
                    prft = packet.get_sidedata("prft") if packet.size else None
                    if prft is not None and time.monotonic() > end - args.duration:
                        sent_us = int.from_bytes(bytes(prft)[:8], "little", signed=True)
                        delays.append((time.time_ns() / 1000 - sent_us) / 1000)
            try:
                await asyncio.to_thread(read)
            finally:
                container.close()
            delays.sort()
            print(f"| {label} | {len(delays)} | {percentile(delays, 0.5):.1f} / {percentile(delays, 0.95):.1f} |"
                  if delays else f"| {label} | 0 | - |", flush=True)
    finally:
        server.stop()


async def first_frame(args: argparse.Namespace, tmp: str) -> None:
    from browser import chromium
    proc, port = await start_proxy(tmp, "demo: {width: 1280, height: 720, fps: 30}\n")
    try:
        results: dict[str, list[float]] = {"h264": [], "jpeg": []}
        async with chromium() as browser:
            for codec in results:
                for _ in range(args.runs):
                    session = await create_session(port)
                    page = await browser.new_page(viewport={"width": 640, "height": 360})
                    await page.goto(f"http://127.0.0.1:{port}/stream/{session}/embed?codec={codec}")
                    deadline = time.monotonic() + 10
                    value = None
                    while value is None and time.monotonic() < deadline:
                        value = await page.evaluate("window.vsproxyPlayer && window.vsproxyPlayer.firstFrameMs")
                        await asyncio.sleep(0.02)
                    await page.close()
                    await http_request(port, "DELETE", f"/session/{session}")
                    if value is not None:
                        results[codec].append(value)
        print("| embed player | runs | first decoded frame after the WebSocket opened: median / max ms |")
        print("|---|--:|--:|")
        for codec, values in results.items():
            if values:
                print(f"| {codec} | {len(values)} | {statistics.median(values):.0f} / {max(values):.0f} |")
    finally:
        stop_child(proc)


VIDEO_TAG_PAGE = """<!doctype html><meta charset=utf-8><title>video</title>
<video id="video" muted autoplay playsinline></video>
<script>
window.t0 = performance.now();
const video = document.getElementById("video");
SNIPPET
</script>"""


class Mp4LiveEdge:
    """A plain reader of stream.mp4 beside the page's `<video>`: where live is on the stream's
    timeline (the newest fragment's decode time, tfdt, plus the time since it came), and its bytes."""

    def __init__(self) -> None:
        self.decode_time = 0.0
        self.at = 0.0
        self.bytes = 0
        self.started = time.monotonic()

    async def run(self, port: int, session: str) -> None:
        reader, writer, _ = await open_stream(port, f"/stream/{session}/stream.mp4", False)
        data = b""
        try:
            while chunk := await reader.read(65536):
                self.bytes += len(chunk)
                data += chunk
                while len(data) >= 8 and len(data) >= int.from_bytes(data[:4], "big"):
                    size = int.from_bytes(data[:4], "big")
                    box, data = data[:size], data[size:]
                    if box[4:8] == b"moof":  # tfdt version 1: 8 bytes of box head, 4 of version and flags
                        at = box.index(b"tfdt") + 8
                        self.decode_time = int.from_bytes(box[at:at + 8], "big") / 1e6
                        self.at = time.monotonic()
        finally:
            writer.close()

    def live(self) -> float:
        return self.decode_time + (time.monotonic() - self.at)

    def bytes_per_second(self) -> float:
        return self.bytes / (time.monotonic() - self.started)


async def video_tag(args: argparse.Namespace, tmp: str) -> None:
    """A plain `<video src=".../stream.mp4">` in Chromium (a page of another origin), alone and
    with the README's snippet: when the first picture shows and playback begins after the page
    opened, how far behind live it plays 3 s later (the newest frame the proxy has sent, read by a
    plain client beside it, minus `currentTime`), how much it buffers ahead, and the stream's
    bytes a second (Chromium's demuxer sees the stream in 32 KiB blocks)."""
    from browser import README_PROXY, chromium, page_server, readme_snippet
    snippet = readme_snippet("/stream.mp4`")
    pages = {"autoplay": 'video.src = new URLSearchParams(location.search).get("src");',
             "README snippet": snippet.replace(f"{README_PROXY}/stream/${{sessionId}}/stream.mp4", "${src}")
             .replace("video.src =", 'const src = new URLSearchParams(location.search).get("src");\nvideo.src =')}
    assert "${src}" in pages["README snippet"], "the README snippet's URL is not the one expected"
    print("| demo source | page | runs | first picture (s) | playback began (s) | behind live (s) "
          "| buffered ahead (s) | stream kB/s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for width, height in ((1280, 720), (320, 240)):
        proc, port = await start_proxy(tmp, f"demo: {{width: {width}, height: {height}, fps: 30}}\n")
        try:
            async with chromium() as browser:
                for name, script in pages.items():
                    rows: list[tuple[float, ...]] = []
                    with page_server(free_port(), VIDEO_TAG_PAGE.replace("SNIPPET", script)) as page_url:
                        for _ in range(args.runs):
                            rows.append(await _video_tag_run(browser, page_url, port))
                    columns = [statistics.median(column) for column in zip(*rows, strict=True)]
                    print(f"| {width}x{height} | {name} | {len(rows)} | "
                          + " | ".join(f"{value:.2f}" for value in columns[:-1]) + f" | {columns[-1] / 1000:.0f} |",
                          flush=True)
        finally:
            stop_child(proc)


async def _video_tag_run(browser, page_url: str, port: int) -> tuple[float, ...]:  # noqa: ANN001
    session = await create_session(port)
    edge = Mp4LiveEdge()
    reading = asyncio.ensure_future(edge.run(port, session))
    try:
        await asyncio.sleep(1.5)  # the page joins a stream that is running (it gets the GOP cache)
        page = await browser.new_page()
        await page.goto(f"{page_url}/?src=http://127.0.0.1:{port}/stream/{session}/stream.mp4")
        since_open = "(performance.now() - window.t0) / 1000"
        first = began = None
        start_time = None
        deadline = time.monotonic() + 30
        while began is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the video did not play within 30 s")
            t, frames, current = await page.evaluate(
                f"[{since_open}, video.getVideoPlaybackQuality().totalVideoFrames, video.currentTime]")
            if first is None and frames > 0:
                first, start_time = t, current
            elif start_time is not None and current > start_time + 0.1:
                began = t
            await asyncio.sleep(0.02)
        await asyncio.sleep(3)
        current, ahead = await page.evaluate(
            "[video.currentTime, video.buffered.end(video.buffered.length - 1) - video.currentTime]")
        lag = edge.live() - current
        await page.close()
        return first, began, lag, ahead, edge.bytes_per_second()
    finally:
        reading.cancel()
        await http_request(port, "DELETE", f"/session/{session}")


SCENARIOS = {"bytes": bytes_per_viewer, "x264-sweep": x264_sweep, "psnr-ffmpeg": psnr_ffmpeg,
             "encoder-cpu": encoder_cpu, "rtsp": rtsp_passthrough, "rtsp-delay": rtsp_parser_delay,
             "first-frame": first_frame, "video-tag": video_tag}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (default 3)")
    p.add_argument("--cameras", default="moving,smooth,demo", help="bytes: moving, smooth, demo (default all)")
    p.add_argument("--viewers", type=int, default=100, help="rtsp: H.264 viewers (default 100)")
    p.add_argument("--pattern", default="ball", help="rtsp: the test server's videotestsrc pattern (default ball, "
                   "a light stream; snow fills the server's 2 Mbit/s, like an NVENC camera stream), or "
                   "recorded: 2 Mbit/s of noise encoded before the run, which the server only sends")
    p.add_argument("--from-arrival", action="store_true",
                   help="rtsp: latency from each frame's arrival at the proxy (the fan-out alone), not from the "
                        "server's sender-report time")
    p.add_argument("--crfs", default="31,32", help="x264-sweep, psnr-ffmpeg: crf values (default 31,32)")
    p.add_argument("--variants", default="", help='x264-sweep: "|"-separated variants of ";"-separated libx264 '
                   'options, e.g. "x264-params=aq-mode=2|threads=1" (default: a built-in list)')
    p.add_argument("--runs", type=int, default=10,
                   help="first-frame: page loads per codec; video-tag: per size (default 10)")
    p.add_argument("--h264", default="", help='h264 settings for the proxy, e.g. "crf: 28, preset: veryfast"')
    args = p.parse_args()
    global H264_CONFIG
    H264_CONFIG = args.h264
    if not 1 <= args.duration <= 300 or not 0 <= args.warmup <= 60 or not 1 <= args.viewers <= 2000 \
            or not 1 <= args.runs <= 50:
        p.error("out of range: duration 1..300, warmup 0..60, viewers 1..2000, runs 1..50")
    arm_deadline(900)
    raise_nofile()
    pin_self()
    print(machine_line())
    print(git_line()[0])
    print(f"command: python bench/h264.py {' '.join(repr(a) if ' ' in a else a for a in sys.argv[1:])}\n")
    with tempfile.TemporaryDirectory(prefix="vsproxy-bench-") as tmp:
        try:
            asyncio.run(SCENARIOS[args.scenario](args, tmp))
        finally:
            kill_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
