"""WHEP benchmark: proxy CPU per WebRTC peer on a 720p30 H.264 stream (~3 Mbit/s).

vsproxy runs on core 0 with a demo upstream (1280x720, 30 fps) whose shared encoder targets
3000 kbit/s. Peers are aiortc clients in `--procs` worker processes (core 1); a worker counts the
frames its receivers assemble but does not decode them (aiortc's H.264 decoder is replaced by a
counter in the worker only: decoding 30 streams of 720p would need cores the proxy's figure does
not depend on). Proxy CPU is measured with 1 peer (the encoder and the demo source's JPEGs: the
baseline) and with N peers; per peer = (cpu_N - cpu_1) / (N - 1). Frame age p95 is the proxy's own
(`vsproxy_frame_write_latency_seconds{transport="webrtc"}`: capture to the RTP sender taking it).

    PYTHONPATH=$PWD python bench/whep.py --peers 10 30 --seconds 10 --chromium 10

`--chromium N`: also the time from the embed player starting WHEP to its first presented frame
in headless Chromium (fresh session each time, so the encoder starts with a keyframe for it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    LOADGEN_CORE,
    REPO_DIR,
    free_port,
    machine_line,
    proc_cpu_seconds,
    server_env,
    spawn,
    stop_child,
    wait_health,
)

CONFIG = """
demo: {width: 1280, height: 720, fps: 30, quality: 80}
h264: {bitrate_kbps: 3000, preset: veryfast}
limits: {max_viewers_per_session: 1000, max_sessions: 1000, max_sessions_per_user: 1000}
logging: {level: warning}
"""


# -- the worker: n aiortc peers, frames counted, not decoded -----------------------------------


async def worker(base: str, session_id: str, count: int, seconds: float) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.codecs import h264

    frames = [0]

    def count_frame(self, encoded_frame):  # noqa: ARG001
        frames[0] += 1
        return []

    h264.H264Decoder.decode = count_frame  # this process only: count assembled frames, decode none
    pcs = []
    for _ in range(count):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        request = urllib.request.Request(f"{base}/stream/{session_id}/whep", data=pc.localDescription.sdp.encode(),
                                         headers={"Content-Type": "application/sdp"}, method="POST")
        answer = await asyncio.to_thread(lambda r=request: urllib.request.urlopen(r, timeout=10).read().decode())
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        pcs.append(pc)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.sleep(2)  # settle
    start = frames[0]
    await asyncio.sleep(seconds)
    print(json.dumps({"frames": frames[0] - start, "peers": count, "seconds": seconds}), flush=True)
    await asyncio.gather(*(pc.close() for pc in pcs))


# -- the driver ---------------------------------------------------------------------------------


def start_proxy() -> tuple[subprocess.Popen, int]:
    """vsproxy with CONFIG on a free port of 127.0.0.1 (core 0), in a temp dir; (process, port)."""
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="vsproxy-whep-bench-")
    config_path = os.path.join(tmp, "config.yaml")
    with open(config_path, "w") as f:
        f.write(CONFIG)
    proxy = spawn([sys.executable, "-m", "vsproxy", "--config", config_path, "--host", "127.0.0.1", "--port",
                   str(port)], cwd=tmp, env=server_env(), log_path=os.path.join(tmp, "proxy.log"))
    return proxy, port


def create_session(base: str, user: str) -> str:
    request = urllib.request.Request(f"{base}/session/create", method="POST",
                                     data=json.dumps({"userId": user, "robotName": "r"}).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=5).read())["sessionId"]


def metric_lines(port: int) -> list[str]:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode().splitlines()


def frame_age_p95(lines: list[str]) -> float:
    buckets = []
    for line in lines:
        if line.startswith("vsproxy_frame_write_latency_seconds_bucket") and 'transport="webrtc"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    for bound, cumulative in buckets:
        if total and cumulative >= 0.95 * total:
            return bound
    return float("nan")


async def run(peers: int, procs: int, seconds: float) -> dict:
    proxy, port = start_proxy()
    try:
        await wait_health(port, proxy)
        base = f"http://127.0.0.1:{port}"
        session_id = create_session(base, "bench")
        per_proc = [peers // procs + (1 if i < peers % procs else 0) for i in range(procs)]
        workers = []
        for n in (p for p in per_proc if p):
            workers.append(await asyncio.create_subprocess_exec(
                "taskset", "-c", str(LOADGEN_CORE), sys.executable, __file__, "--worker", base, session_id, str(n),
                str(seconds), stdout=asyncio.subprocess.PIPE, env=server_env(), cwd=str(REPO_DIR)))
        for w in workers:
            assert json.loads(await w.stdout.readline())["ready"]
        await asyncio.sleep(2)
        cpu0, t0 = proc_cpu_seconds(proxy.pid), time.monotonic()
        lines0 = metric_lines(port)
        results = [json.loads(await w.stdout.readline()) for w in workers]
        cpu1, t1 = proc_cpu_seconds(proxy.pid), time.monotonic()
        lines1 = metric_lines(port)
        for w in workers:
            await w.wait()
        dropped = next((float(x.rsplit(" ", 1)[1]) for x in lines1
                        if x.startswith("vsproxy_frames_dropped_total") and 'transport="webrtc"' in x), 0.0)
        del lines0
        frames = sum(r["frames"] for r in results)
        return {"peers": peers, "proxy_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
                "fps_per_peer": frames / peers / seconds, "frame_age_p95_s": frame_age_p95(lines1),
                "dropped_total": dropped}
    finally:
        stop_child(proxy)


async def chromium_first_frames(connects: int) -> list[int]:
    """Milliseconds from the embed player starting WHEP (OPTIONS, offer, POST) to its first
    presented frame, for `connects` fresh page loads of ?transport=webrtc (fresh sessions, so the
    encoder starts for each: the keyframe-on-join path)."""
    import shutil

    from playwright.async_api import async_playwright

    proxy, port = start_proxy()
    times = []
    try:
        await wait_health(port, proxy)
        base = f"http://127.0.0.1:{port}"
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            for i in range(connects):
                session_id = create_session(base, f"u{i}")
                page = await browser.new_page()
                await page.goto(f"{base}/stream/{session_id}/embed?transport=webrtc")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    first = await page.evaluate("window.vsproxyPlayer.firstFrameMs")
                    if first is not None:
                        times.append(first)
                        break
                    await asyncio.sleep(0.02)
                await page.close()
                await asyncio.sleep(1)  # the encoder stops with its last viewer; the next connect starts it
            await browser.close()
    finally:
        stop_child(proxy)
    return times


WATCH_PAGE = """<!doctype html><meta charset=utf-8><title>robot control</title>
<iframe id="player" src="EMBED" width="640" height="360" allow="autoplay"></iframe>"""

# Injected into the player's frame: per presented frame, how long after its last packet arrived
# it was to be displayed (requestVideoFrameCallback's receiveTime and expectedDisplayTime).
WATCH_FRAMES = """() => {
  const video = document.getElementById("video");
  window.benchDelays = [];
  const onFrame = (now, meta) => {
    if (meta.receiveTime) window.benchDelays.push(meta.expectedDisplayTime - meta.receiveTime);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}"""

WATCH_STATS = """async () => {
  const taken = window.benchDelays.splice(0);
  const stats = await window.vsproxyPeer().getStats();
  let inbound = null;
  stats.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") inbound = s; });
  return {delays: taken, jitterBufferDelay: inbound.jitterBufferDelay,
          emitted: inbound.jitterBufferEmittedCount, dropped: inbound.framesDropped || 0,
          decoded: inbound.framesDecoded, mode: window.vsproxyPlayer.mode};
}"""


async def chromium_watch(seconds: float, window: float = 10.0) -> None:
    """One embed player watching WebRTC in an iframe of a robot-control page (http://localhost:3000)
    for `seconds`: per window, the frames it presented, how long each waited between its last
    packet's arrival and its display (median / p95), the jitter buffer's mean delay, frames
    dropped, and the proxy's frame age p95 (capture to RTP sender). A player that drifts behind
    live shows as figures that grow from window to window."""
    sys.path.insert(0, str(REPO_DIR / "tests"))
    from browser import chromium, page_server
    logging.getLogger("tornado.access").setLevel(logging.ERROR)  # the page server's favicon 404

    proxy, port = start_proxy()
    try:
        await wait_health(port, proxy)
        base = f"http://127.0.0.1:{port}"
        session_id = create_session(base, "watch")
        page_html = WATCH_PAGE.replace("EMBED", f"{base}/stream/{session_id}/embed?transport=webrtc")
        with page_server(3000, page_html) as page_url:
            async with chromium() as browser:
                page = await browser.new_page()
                await page.goto(page_url)
                deadline = time.monotonic() + 15
                player = None
                while player is None or not await player.evaluate("window.vsproxyPlayer.frames > 0"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the embed player showed no WebRTC frame within 15 s")
                    await asyncio.sleep(0.1)
                    player = next((f for f in page.frames if "/embed" in f.url), None)
                await player.evaluate(WATCH_FRAMES)
                print("| seconds | frames shown | receive to display, median / p95 ms | jitter buffer mean ms "
                      "| dropped | proxy frame age p95 ms |\n|--:|--:|--:|--:|--:|--:|")
                last = await player.evaluate(WATCH_STATS)
                started = time.monotonic()
                while time.monotonic() - started < seconds:
                    await asyncio.sleep(window)
                    now = await player.evaluate(WATCH_STATS)
                    delays = sorted(now["delays"])
                    emitted = now["emitted"] - last["emitted"]
                    jitter = 1000 * (now["jitterBufferDelay"] - last["jitterBufferDelay"]) / emitted if emitted else 0
                    age = frame_age_p95(metric_lines(port)) * 1000
                    p50, p95 = (delays[int(q * (len(delays) - 1))] if delays else float("nan") for q in (0.5, 0.95))
                    print(f"| {time.monotonic() - started:.0f} | {len(delays)} | {p50:.1f} / {p95:.1f} | {jitter:.1f} "
                          f"| {now['dropped'] - last['dropped']} | <= {age:.0f} |", flush=True)
                    assert now["mode"] == "webrtc", now["mode"]
                    last = now
    finally:
        stop_child(proxy)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--procs", type=int, default=3, help="aiortc worker processes")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--chromium", type=int, default=10, help="connects for Chromium's first frame (0: none)")
    parser.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                        help="only: one embed player in an iframe of a page on http://localhost:3000 watches "
                             "this long; its delays per 10 s window (drift)")
    args = parser.parse_args()
    if args.watch:
        print(machine_line())
        await chromium_watch(args.watch)
        return
    print(machine_line())
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) at start")
    base = await run(1, 1, args.seconds)
    print(f"baseline, 1 peer: proxy CPU {base['proxy_cpu_pct']:.1f}% of a core, {base['fps_per_peer']:.1f} fps")
    for n in args.peers:
        r = await run(n, min(args.procs, n), args.seconds)
        per_peer = (r["proxy_cpu_pct"] - base["proxy_cpu_pct"]) / (n - 1)
        print(f"{n} peers: proxy CPU {r['proxy_cpu_pct']:.1f}% ({per_peer:.2f}% per added peer), "
              f"{r['fps_per_peer']:.1f} frames/s per peer, frame age p95 <= {r['frame_age_p95_s'] * 1000:.0f} ms, "
              f"{r['dropped_total']:.0f} frames dropped")
    if args.chromium:
        times = sorted(await chromium_first_frames(args.chromium))
        if times:
            print(f"Chromium, first WebRTC frame after the player starts WHEP: median {times[len(times) // 2]} ms, "
                  f"min {times[0]}, max {times[-1]} ({len(times)} connects)")
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        asyncio.run(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
    else:
        asyncio.run(main())
