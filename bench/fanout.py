#!/usr/bin/env python3
"""vsproxy fan-out benchmark: one fake 30 fps camera -> vsproxy -> N viewers of one transport.

    python bench/fanout.py --transport mjpeg --viewers 400 [--duration 10] [--warmup 3] [--fps 30]
                           [--probes 0] [--direct] [--slow-scenario] [--input-flood N] [--json out.json]

`--transport` and `--viewers` take comma-separated lists (every combination is one run, each with
a freshly started server). See bench/README.md for what is measured and how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BENCH_DIR,
    LOADGEN_CORE,
    PROXY_CORE,
    arm_deadline,
    cores_jiffies,
    cores_usage,
    free_port,
    git_line,
    http_request,
    kill_children,
    machine_line,
    percentile,
    pin_self,
    proc_cpu_seconds,
    proc_rss_mb,
    raise_nofile,
    self_cpu_seconds,
    server_env,
    spawn,
    stop_child,
    tcp_send_queues,
    wait_health,
)
from loadgen import TRANSPORTS, WS_JSON, Flooder, Stats, Viewer  # noqa: E402
from upstream import FakeCamera, make_jpeg, make_moving_jpegs  # noqa: E402

CONNECT_CONCURRENCY = 32
LOADGEN_BOUND_PCT = 90.0  # loadgen CPU at or above this: the numbers may be the loadgen's limit
NOISY_PCT = 15.0  # other processes used more than this much of a core during the window


# -- targets the project must meet (see README) -------------------------------------------------

def judge(r: dict) -> str:
    """PASS/FAIL against the project's targets for this kind of run, or '-' if none apply."""
    if r.get("server") == "direct":
        return "- (ceiling)"
    checks: list[tuple[str, float, str, float]] = []  # (name, value, op, limit)
    if r["scenario"] == "slow":
        checks = [("normal min fps", r["fps_min"], ">=", 29), ("RSS growth MB", r["rss_growth_mb"], "<=", 2),
                  ("trickle min fps", r["trickle_fps_min"], ">=", 0.8)]
        if r["transport"] != "ws_h264":  # (H.264 frames carry no camera stamp: its trickle age tells)
            checks.append(("staleness", r["trickle_staleness_max"], "<=", 1))
    elif r.get("input_flood"):
        checks = [("min fps under input flood", r["fps_min"], ">=", 29)]
    else:
        n, t = r["viewers"], r["transport"]
        if n >= 400:
            checks.append(("min fps", r["fps_min"], ">=", 29))
            # ws_h264: the process CPU includes the shared encoder (bench/h264.py encoder-cpu measures
            # it alone); the fan-out's own target is 25% of a core on top of it.
            cpu_limit = {"mjpeg": 45, "ws_json": 50, "ws_binary": 45}.get(t)
            if cpu_limit is not None:
                checks.append(("CPU%", r["proxy_cpu_pct"], "<=", cpu_limit))
            if t == "ws_h264":
                checks.append(("p99", r["lat_p99_ms"], "<=", 15))
            if t == "mjpeg":
                checks.append(("p99", r["lat_p99_ms"], "<=", 20))
            elif t == "ws_json":
                checks.append(("p99", r["lat_p99_ms"], "<=", 15))
        elif n == 50 and t != "ws_h264":  # H.264 latency includes the encoding (~13 ms at 720p)
            checks.append(("p99", r["lat_p99_ms"], "<=", 5))
    if not checks:
        return "-"
    fails = []
    for name, value, op, limit in checks:
        ok = value == value and (value >= limit if op == ">=" else value <= limit)  # NaN fails
        if not ok:
            fails.append(f"{name} {value:.3g} (want {op} {limit:g})")
    verdict = "PASS" if not fails else "FAIL: " + "; ".join(fails)
    if r.get("loadgen_bound"):
        verdict += " [loadgen-bound]"
    if r.get("others_pct", 0) > NOISY_PCT or abs(r["upstream_fps"] - r["camera_fps"]) > 0.5:
        verdict += " [noisy]"
    return verdict


# -- one run ------------------------------------------------------------------------------------

async def start_server(args, camera: FakeCamera, tmp: str, direct: bool) -> tuple:
    port = free_port()
    log_path = os.path.join(tmp, f"server-{port}.log")
    if direct:
        cmd = [sys.executable, str(BENCH_DIR / "direct.py"), "--port", str(port),
               "--upstream", f"ws://127.0.0.1:{camera.port}/", "--max-seconds", str(args.hard_deadline),
               *shlex.split(args.direct_args)]
        env = server_env()
    else:
        # The benchmark's load is one session with hundreds of viewers: raise the per-session limit
        # (default 50) for this run; everything else stays at its default.
        config_path = os.path.join(tmp, f"bench-{port}.yaml")
        with open(config_path, "w") as f:
            f.write("limits:\n  max_viewers_per_session: 5000\n")
        cmd = [sys.executable, "-m", "vsproxy", "--config", config_path, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
        env = server_env({"ISAAC_SIM_IP": "127.0.0.1", "ISAAC_SIM_WS_PORT": str(camera.port)})
    proc = spawn(cmd, cwd=tmp, env=env, log_path=log_path, core=PROXY_CORE)
    try:
        await wait_health(port, proc)
    except Exception:
        stop_child(proc)
        raise RuntimeError(f"server did not start: {tail(log_path)}") from None
    return proc, port, log_path


def tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


async def connect_all(viewers: list[Viewer], port: int, session_id: str, rcvbuf: dict[str, int]) -> list[str]:
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    errors: list[str] = []

    async def one(v: Viewer) -> None:
        async with sem:
            try:
                await v.connect("127.0.0.1", port, session_id, rcvbuf=rcvbuf.get(v.kind, 0))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                errors.append(f"viewer {v.idx}: {type(exc).__name__}: {exc}")
                return
            if v.kind == "normal":
                v.start_reading()
    await asyncio.gather(*(one(v) for v in viewers))
    return errors


def probe_set(n: int, probes: int) -> set[int]:
    if probes <= 0 or probes >= n:
        return set(range(n))
    return {int(i * n / probes) for i in range(probes)}  # spread over the fan-out order


async def run_one(args, camera: FakeCamera, transport: str, n_viewers: int, *, direct: bool, slow: bool) -> dict:
    tmp = args.tmp
    duration = args.duration if args.duration is not None else (20.0 if slow else 10.0)
    proc, port, log_path = await start_server(args, camera, tmp, direct)
    pid = proc.pid
    viewers: list[Viewer] = []
    trickle_task = rss_task = None
    flood_tasks: list[asyncio.Future] = []
    try:
        rss_idle = proc_rss_mb(pid)
        status, body = await http_request(port, "POST", "/session/create", {"userId": "bench", "robotName": "bench"})
        if status != 200:
            raise RuntimeError(f"session create: HTTP {status} {body[:200]!r}")
        session_id = json.loads(body)["sessionId"]
        # Wait for the server's upstream connection and a few frames through it.
        t0 = time.monotonic()
        seq0 = camera.seq
        while not (camera.clients and camera.seq >= seq0 + 3):
            if time.monotonic() - t0 > 15:
                raise RuntimeError(f"the server did not connect to the fake camera within 15 s: {tail(log_path)}")
            await asyncio.sleep(0.05)

        stats = Stats(camera)
        probes = probe_set(n_viewers, args.probes)
        if slow:
            kinds = ["normal"] * args.slow_normal + ["stalled"] * args.slow_stalled + ["trickle"] * args.slow_trickle
        else:
            kinds = ["normal"] * n_viewers
        viewers = [Viewer(stats, i, transport, kind, probe=(i in probes) or slow, copy=args.copy)
                   for i, kind in enumerate(kinds)]
        t_conn = time.monotonic()
        rcvbuf = {"stalled": args.stalled_rcvbuf, "trickle": args.trickle_rcvbuf}
        errors = await asyncio.wait_for(connect_all(viewers, port, session_id, rcvbuf), 120)
        connect_s = time.monotonic() - t_conn
        if errors:
            print(f"  {len(errors)} viewer(s) failed to connect, e.g. {errors[0]}", file=sys.stderr)
        connected = [v for v in viewers if not v.closed]

        trickle = [v for v in connected if v.kind == "trickle"]
        frame_wire = camera.frame_bytes * (4 / 3 if transport == WS_JSON else 1) + 200
        trickle_rate = args.trickle_bytes or frame_wire  # bytes/s: one frame's worth per second

        async def trickle_loop() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)  # fine-grained, so staleness is not the timer's
                now = time.monotonic()
                for v in trickle:
                    if not v.closed:
                        v.trickle(int(trickle_rate * (now - last)), trickle_rate * 0.25)
                last = now
        if trickle:
            trickle_task = asyncio.ensure_future(trickle_loop())

        flooders = [Flooder(i, "127.0.0.1", port, session_id, args.flood_size, args.flood_reconnect)
                    for i in range(args.input_flood)]
        flood_tasks = [asyncio.ensure_future(f.run()) for f in flooders]

        rss_connected = proc_rss_mb(pid)
        await asyncio.sleep(args.warmup)
        flood0 = [(f.connections, f.messages, f.bytes) for f in flooders]

        # -- measurement window --
        rss_start = proc_rss_mb(pid)
        cpu0, self0, cores0 = proc_cpu_seconds(pid), self_cpu_seconds(), cores_jiffies()
        sent0, late0 = camera.sent_total, camera.late_ticks
        w0 = time.monotonic()
        stats.measuring = True
        rss_samples: list[tuple[float, float]] = [(0.0, rss_start)]

        async def rss_loop() -> None:
            k = 1
            while True:
                await asyncio.sleep(max(0.0, w0 + k - time.monotonic()))
                rss_samples.append((round(time.monotonic() - w0, 2), proc_rss_mb(pid)))
                k += 1
        rss_task = asyncio.ensure_future(rss_loop())
        await asyncio.sleep(duration)
        stats.measuring = False
        w1 = time.monotonic()
        cpu1, self1, cores1 = proc_cpu_seconds(pid), self_cpu_seconds(), cores_jiffies()
        sent1, late1 = camera.sent_total, camera.late_ticks
        rss_end = proc_rss_mb(pid)
        sendq = tcp_send_queues(port)
        rss_task.cancel()
        window = w1 - w0
        flood1 = [(f.connections, f.messages, f.bytes) for f in flooders]
        for task in flood_tasks:
            task.cancel()

        normal = [v for v in viewers if v.kind == "normal"]
        fps = sorted(v.frames / window for v in normal)
        lat = sorted(x for v in normal for x in v.latencies)
        # Latency by position in the fan-out (viewers connect, and are served, roughly in index order).
        by_position = []
        for q in range(4):
            part = sorted(x for v in normal[q * len(normal) // 4:(q + 1) * len(normal) // 4] for x in v.latencies)
            by_position.append({"quarter": q + 1, "p50_ms": percentile(part, 0.5) / 1e6,
                                "p99_ms": percentile(part, 0.99) / 1e6})
        usage = cores_usage(cores0, cores1)
        loadgen_cpu = 100.0 * (self1 - self0) / window
        received = sum(v.frames for v in normal)
        lost = sum(v.lost for v in normal)
        r = {
            "scenario": "slow" if slow else "fanout",
            "server": "direct" if direct else "vsproxy",
            "transport": transport,
            "viewers": len(normal) if slow else n_viewers,
            "connected": sum(1 for v in normal if v.fd >= 0),
            "connect_errors": len(errors),
            "connect_seconds": round(connect_s, 2),
            "disconnected_during_run": sum(1 for v in viewers if v.closed and v.fd >= 0),
            "disconnect_reasons": sorted({v.close_reason for v in viewers if v.closed and v.fd >= 0})[:5],
            "window_seconds": round(window, 3),
            "upstream_fps": (sent1 - sent0) / window,
            "camera_fps": camera.fps,
            "camera_late_ticks": late1 - late0,
            "frame_bytes": camera.frame_bytes,
            "fps_median": statistics.median(fps) if fps else float("nan"),
            "fps_min": fps[0] if fps else float("nan"),
            "fps_max": fps[-1] if fps else float("nan"),
            "mb_per_s": stats.bytes / window / 1e6,
            "latency_samples": len(lat),
            "latency_viewers": sum(1 for v in normal if v.probe),
            "lat_p50_ms": percentile(lat, 0.50) / 1e6,
            "lat_p95_ms": percentile(lat, 0.95) / 1e6,
            "lat_p99_ms": percentile(lat, 0.99) / 1e6,
            "lat_max_ms": (lat[-1] / 1e6) if lat else float("nan"),
            "latency_by_fanout_quarter": by_position,
            "frames_received": received,
            "frames_lost": lost,
            "lost_pct": 100.0 * lost / max(received + lost, 1),
            "proxy_pid": pid,
            "proxy_cpu_pct": 100.0 * (cpu1 - cpu0) / window,
            "proxy_rss_idle_mb": rss_idle,
            "proxy_rss_connected_mb": rss_connected,
            "proxy_rss_start_mb": rss_start,
            "proxy_rss_end_mb": rss_end,
            # The server's kernel send queues at the end of the window (not part of its RSS).
            "kernel_sendq_total_mb": sum(sendq) / 1e6,
            "kernel_sendq_max_mb": max(sendq, default=0) / 1e6,
            "loadgen_cpu_pct": loadgen_cpu,
            "loadgen_bound": loadgen_cpu >= LOADGEN_BOUND_PCT,
            "core_busy_pct": {f"cpu{c}": round(u["busy"], 1) for c, u in usage.items()},
            "core_usage_pct": {f"cpu{c}": {k: round(v, 1) for k, v in u.items()} for c, u in usage.items()},
            # Time charged to processes other than the server and this one (other programs on the
            # machine), in % of one core summed over all cores; softirq and steal are left out.
            "others_pct": max(0.0, sum(u["task"] for u in usage.values()) - 100.0 * (cpu1 - cpu0 + self1 - self0)
                              / window),
            "softirq_pct": sum(u["softirq"] for u in usage.values()),
            "steal_pct": sum(u["steal"] for u in usage.values()),
            "copy_payload": args.copy,
        }
        if flooders:
            r.update({
                "input_flood": len(flooders),
                "flood_message_bytes": args.flood_size,
                "flood_reconnect_delay_s": args.flood_reconnect,
                # Inside the window: connections made, messages and bytes written to the server's sockets.
                "flood_connects_per_s": sum(b[0] - a[0] for a, b in zip(flood0, flood1, strict=True)) / window,
                "flood_messages_per_s": sum(b[1] - a[1] for a, b in zip(flood0, flood1, strict=True)) / window,
                "flood_mb_per_s": sum(b[2] - a[2] for a, b in zip(flood0, flood1, strict=True)) / window / 1e6,
                "flood_refused_handshakes": sum(f.refused for f in flooders),
            })
        if slow:
            tr = [v for v in viewers if v.kind == "trickle"]
            st = [v for v in viewers if v.kind == "stalled"]
            tfps = sorted(v.frames / window for v in tr)
            stale = [s for v in tr for s in v.staleness]
            tlat = sorted(x for v in tr for x in v.latencies)
            r.update({
                "stalled": len(st), "stalled_still_connected": sum(1 for v in st if not v.closed),
                "trickle": len(tr), "trickle_bytes_per_s": int(trickle_rate),
                "trickle_fps_median": statistics.median(tfps) if tfps else float("nan"),
                "trickle_fps_min": tfps[0] if tfps else float("nan"),
                "trickle_staleness_max": max(stale) if stale else float("nan"),
                "trickle_staleness_median": statistics.median(stale) if stale else float("nan"),
                "trickle_lat_max_ms": tlat[-1] / 1e6 if tlat else float("nan"),
                "rss_samples_mb": [(t, round(m, 2)) for t, m in rss_samples],
                "rss_growth_mb": rss_end - rss_start,
                "rss_peak_mb": max(m for _, m in rss_samples + [(0, rss_end)]),
            })
        r["verdict"] = judge(r)
        return r
    finally:
        for task in (trickle_task, rss_task, *flood_tasks):
            if task is not None:
                task.cancel()
        for v in viewers:
            v.close()
        code = stop_child(proc)
        if code not in (0, -15, None):
            print(f"  server exited with code {code}: {tail(log_path, 600)}", file=sys.stderr)


# -- report -------------------------------------------------------------------------------------

nan = float("nan")


def f1(x: float) -> str:
    return "n/a" if x != x else f"{x:.1f}"


def f2(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def fanout_table(rows: list[dict]) -> str:
    head = ("| server | transport | viewers (ok) | fps median / min | MB/s | latency p50 / p95 / p99 / max ms "
            "| lost | proxy CPU % | proxy RSS MB idle / start / end | loadgen CPU % | core0 / core1 busy % (others) "
            "| upstream fps | targets |")
    sep = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    out = [head, sep]
    for r in rows:
        busy = r["core_busy_pct"]
        out.append(
            f"| {r['server']} | {r['transport']} | {r['viewers']} ({r['connected']}) "
            f"| {f1(r['fps_median'])} / {f1(r['fps_min'])} | {f1(r['mb_per_s'])} "
            f"| {f1(r['lat_p50_ms'])} / {f1(r['lat_p95_ms'])} / {f1(r['lat_p99_ms'])} / {f1(r['lat_max_ms'])} "
            f"| {r['frames_lost']} ({f1(r['lost_pct'])}%) | {f1(r['proxy_cpu_pct'])} "
            f"| {f1(r['proxy_rss_idle_mb'])} / {f1(r['proxy_rss_start_mb'])} / {f1(r['proxy_rss_end_mb'])} "
            f"| {f1(r['loadgen_cpu_pct'])}{' (BOUND)' if r['loadgen_bound'] else ''} "
            f"| {f1(busy.get(f'cpu{PROXY_CORE}', nan))} / {f1(busy.get(f'cpu{LOADGEN_CORE}', nan))} "
            f"({f1(r['others_pct'])}) "
            f"| {f1(r['upstream_fps'])} | {r['verdict']} |")
    return "\n".join(out)


def slow_table(rows: list[dict]) -> str:
    head = ("| server | transport | normal / stalled / trickle | normal fps median / min | normal p99 ms "
            "| proxy RSS MB start / end / peak (growth) | trickle fps median / min "
            "| trickle staleness max (median) frames | trickle age max ms | kernel send queue MB total / max "
            "| stalled still connected | proxy CPU % | loadgen CPU % "
            "| upstream fps | targets |")
    sep = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    out = [head, sep]
    for r in rows:
        out.append(
            f"| {r['server']} | {r['transport']} | {r['connected']} / {r['stalled']} / {r['trickle']} "
            f"| {f1(r['fps_median'])} / {f1(r['fps_min'])} | {f1(r['lat_p99_ms'])} "
            f"| {f1(r['proxy_rss_start_mb'])} / {f1(r['proxy_rss_end_mb'])} / {f1(r['rss_peak_mb'])} "
            f"({r['rss_growth_mb']:+.2f}) "
            f"| {f2(r['trickle_fps_median'])} / {f2(r['trickle_fps_min'])} "
            f"| {r['trickle_staleness_max']} ({r['trickle_staleness_median']}) | {f1(r['trickle_lat_max_ms'])} "
            f"| {f1(r['kernel_sendq_total_mb'])} / {f1(r['kernel_sendq_max_mb'])} "
            f"| {r['stalled_still_connected']} | {f1(r['proxy_cpu_pct'])} | {f1(r['loadgen_cpu_pct'])} "
            f"| {f1(r['upstream_fps'])} | {r['verdict']} |")
    for r in rows:
        samples = " ".join(f"{m:.1f}" for _, m in r["rss_samples_mb"])
        out.append(f"\nproxy RSS every second ({r['transport']}, MB): {samples}")
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", default="mjpeg",
                   help="mjpeg, ws_json, ws_binary, or a comma-separated list (default mjpeg)")
    p.add_argument("--viewers", default="50", help="viewer count, or a comma-separated list (default 50)")
    p.add_argument("--duration", type=float, default=None,
                   help="measurement window in seconds (default 10; 20 with --slow-scenario)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after all viewers connected (default 3)")
    p.add_argument("--fps", type=float, default=30.0, help="fake camera frame rate (default 30)")
    p.add_argument("--probes", type=int, default=0,
                   help="viewers that record latency, spread over the fan-out order (default 0 = all)")
    p.add_argument("--direct", action="store_true",
                   help="measure bench/direct.py (a minimal fan-out: the benchmark's ceiling) instead of vsproxy")
    p.add_argument("--direct-args", default="", help="extra arguments for bench/direct.py (its experiment knobs)")
    p.add_argument("--slow-scenario", action="store_true",
                   help="20 normal + 5 stalled + 5 trickle viewers; RSS every second, trickle staleness")
    p.add_argument("--slow-normal", type=int, default=20)
    p.add_argument("--slow-stalled", type=int, default=5)
    p.add_argument("--slow-trickle", type=int, default=5)
    p.add_argument("--trickle-bytes", type=int, default=0,
                   help="trickle viewers' read rate in bytes/s (default: one frame of the transport per second)")
    p.add_argument("--stalled-rcvbuf", type=int, default=4096, help="SO_RCVBUF of stalled viewers (default 4096)")
    p.add_argument("--trickle-rcvbuf", type=int, default=4096,
                   help="SO_RCVBUF of trickle viewers (default 4096, so that staleness shows the server's buffering, "
                        "not the client kernel's; 0 = kernel default)")
    p.add_argument("--input-flood", type=int, default=0, metavar="N",
                   help="N more viewers of the same session flood the server with input while the others are "
                        "measured (default 0)")
    p.add_argument("--flood-size", type=int, default=1 << 20,
                   help="bytes of each flood message (default 1048576, the issue's 1 MB text messages)")
    p.add_argument("--flood-reconnect", type=float, default=1.0,
                   help="seconds a flooder waits before reconnecting after the server closed it (default 1)")
    p.add_argument("--camera", choices=("still", "moving"), default=None,
                   help="still: one JPEG over and over (JPEG fan-out); moving: a loop of 60 distinct frames, "
                        "for H.264 (default: moving for ws_h264, still otherwise)")
    p.add_argument("--copy", action="store_true",
                   help="copy every payload byte to user space (as a real client) instead of recv(MSG_TRUNC)")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers of every run here")
    args = p.parse_args(argv)
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    for t in args.transports:
        if t not in TRANSPORTS:
            p.error(f"unknown transport {t!r} (choose from {', '.join(TRANSPORTS)})")
    try:
        args.viewer_counts = [int(v) for v in args.viewers.split(",") if v.strip()]
    except ValueError:
        p.error("--viewers takes integers")
    if args.slow_scenario:
        args.viewer_counts = [args.slow_normal]
    if any(n < 1 or n > 5000 for n in args.viewer_counts):
        p.error("--viewers must be 1..5000")
    if args.duration is not None and not 1 <= args.duration <= 600:
        p.error("--duration must be 1..600 s")
    if not 0 <= args.warmup <= 120:
        p.error("--warmup must be 0..120 s")
    if not 1 <= args.fps <= 120:
        p.error("--fps must be 1..120")
    if not 0 <= args.input_flood <= 1000 or not 1 <= args.flood_size <= 1 << 26 or args.flood_reconnect < 0:
        p.error("--input-flood must be 0..1000, --flood-size 1..64 MiB, --flood-reconnect >= 0")
    if args.input_flood and args.slow_scenario:
        p.error("--input-flood and --slow-scenario are separate scenarios")
    return args


async def amain(args: argparse.Namespace) -> list[dict]:
    moving = args.camera == "moving" or (args.camera is None and "ws_h264" in args.transports)
    camera = FakeCamera(make_moving_jpegs() if moving else make_jpeg(), args.fps)
    camera.listen(0)
    rows = []
    try:
        for transport in args.transports:
            for n in args.viewer_counts:
                label = "slow scenario" if args.slow_scenario else f"{n} viewers"
                server = "direct" if args.direct else "vsproxy"
                print(f"run: {server} {transport} {label} ...", file=sys.stderr, flush=True)
                budget = args.warmup + (args.duration or 20) + 150
                r = await asyncio.wait_for(
                    run_one(args, camera, transport, n, direct=args.direct, slow=args.slow_scenario), budget)
                rows.append(r)
                await asyncio.sleep(1.0)  # let the sockets of the previous run go
    finally:
        await camera.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = len(args.transports) * len(args.viewer_counts)
    per_run = args.warmup + (args.duration or (20 if args.slow_scenario else 10)) + 150
    args.hard_deadline = int(runs * per_run + 60)
    arm_deadline(args.hard_deadline)
    nofile = raise_nofile(max(4096, 2 * max(args.viewer_counts) + 512))
    pinned = pin_self(LOADGEN_CORE)
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    git_text, git_info = git_line()
    with tempfile.TemporaryDirectory(prefix="vsbench-") as tmp:  # empty cwd: no config.yaml / .env
        args.tmp = tmp
        try:
            rows = asyncio.run(amain(args))
        finally:
            kill_children()
    signal_off()

    print()
    print(f"command: {command}")
    print(machine_line())
    print(git_text)
    print(f"pinning: server under test on core {PROXY_CORE} (taskset -c {PROXY_CORE}); fake camera + load generator "
          f"on core {LOADGEN_CORE} (sched_setaffinity{'' if pinned else ' FAILED: not pinned'}); nofile limit {nofile}")
    frame = rows[0]["frame_bytes"] if rows else 0
    payload = "copied to user space" if args.copy else "discarded in the kernel (MSG_TRUNC)"
    print(f"upstream: 1280x720 JPEG of {frame} bytes (incl. the 27-byte COM stamp) at {args.fps:g} fps; warmup "
          f"{args.warmup:g} s; payload {payload}")
    print()
    fan = [r for r in rows if r["scenario"] == "fanout"]
    slow = [r for r in rows if r["scenario"] == "slow"]
    if fan:
        print(fanout_table(fan))
    if slow:
        print(slow_table(slow))
    notes = []
    for r in rows:
        if r["loadgen_bound"]:
            notes.append(f"{r['transport']} x{r['viewers']}: load generator at {r['loadgen_cpu_pct']:.0f}% of its "
                         "core: fps/latency may be the load generator's limit, not the server's")
        if r["connect_errors"] or r["disconnected_during_run"]:
            notes.append(f"{r['transport']} x{r['viewers']}: {r['connect_errors']} connect errors, "
                         f"{r['disconnected_during_run']} disconnected during the run {r['disconnect_reasons']}")
        if r["others_pct"] > NOISY_PCT:
            notes.append(f"{r['transport']} x{r['viewers']}: other processes used {r['others_pct']:.0f}% of a core "
                         "during the window: fps and the latency tail are not representative")
        if abs(r["upstream_fps"] - args.fps) > 0.5:
            notes.append(f"{r['transport']} x{r['viewers']}: the camera sent {r['upstream_fps']:.1f} fps, "
                         f"not {args.fps:g} ({r['camera_late_ticks']} late ticks): core {LOADGEN_CORE} was too busy")
    for r in rows:
        if r.get("input_flood"):
            print(f"\ninput flood ({r['transport']} x{r['viewers']}): {r['input_flood']} flooders sending "
                  f"{r['flood_message_bytes']}-byte text messages, reconnecting "
                  f"{r['flood_reconnect_delay_s']:g} s after each close: {r['flood_connects_per_s']:.1f} "
                  f"connections/s, {r['flood_messages_per_s']:.1f} messages/s and {r['flood_mb_per_s']:.1f} MB/s "
                  f"written to the server's sockets ({r['flood_refused_handshakes']} handshakes refused)")
    if notes:
        print("\nnotes:\n- " + "\n- ".join(notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": machine_line(), "git": git_info,
                       "args": {k: v for k, v in vars(args).items() if k != "tmp"}, "runs": rows}, f, indent=2)
        print(f"\nraw numbers: {args.json}")
    return 0


def signal_off() -> None:
    import signal
    signal.alarm(0)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        kill_children()
        raise SystemExit(130) from None
