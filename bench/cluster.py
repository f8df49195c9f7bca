#!/usr/bin/env python3
"""vsproxy cluster benchmark: one fake 30 fps camera -> three vsproxy nodes on one Redis -> N viewers
spread over the nodes round robin (a load balancer without stickiness), then the same N viewers on a
single node, in the same invocation, with the same camera and load generator.

    python bench/cluster.py [--viewers 100] [--duration 10] [--warmup 3] [--transport mjpeg|ws_binary]
                            [--nodes 3] [--fps 30] [--probes 0] [--no-single] [--json out.json]

What it shows (see bench/README.md, "The cluster benchmark"):
- origin-to-edge relay traffic, from the edges' `vsproxy_cluster_relay_received_bytes_total` on
  /metrics, against (edges with viewers) x (the stream bitrate read by a viewer): one relay per edge,
  never one per viewer;
- each node's role (from /health) and CPU (% of one core, /proc/<pid>/stat over the window);
- fps and latency of the viewers on edges and on the origin, against the single node;
- the connections the simulated camera saw during the cluster run (must be 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fanout  # noqa: E402
from common import (  # noqa: E402
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
    raise_nofile,
    self_cpu_seconds,
    server_env,
    spawn,
    stop_child,
    wait_health,
)
from fanout import connect_all, f1, f2, probe_set, tail  # noqa: E402
from loadgen import MJPEG, WS_BINARY, Stats, Viewer  # noqa: E402
from upstream import FakeCamera, make_jpeg  # noqa: E402

TOKEN = "bench-cluster-token-0123456789"  # loopback only; the nodes authenticate their relays with it
UPSTREAM = "isaac"  # the name of the upstream configured by the `isaac_sim` section
RELAY_TOLERANCE = 0.05  # measured relay traffic within 5% of (edges with viewers) x bitrate: PASS
_RELAY_BYTES = re.compile(r'^vsproxy_cluster_relay_received_bytes_total\{upstream="' + UPSTREAM
                          + r'"\} ([0-9.e+]+)$', re.M)


@dataclass
class Node:
    """One `python -m vsproxy` cluster node on core PROXY_CORE, and what was measured on it."""

    name: str
    port: int
    proc: object = None
    log_path: str = ""
    stats: Stats | None = None
    viewers: list[Viewer] = field(default_factory=list)
    role: str = "?"  # at the start of the window; "origin->edge" if it changed by the end


# -- processes ----------------------------------------------------------------------------------

async def start_redis(tmp: str) -> tuple[object, int]:
    """Debian's redis-server on a free loopback port, no persistence (the arguments of
    tests/cluster_fixtures.py), started with spawn() so the hard deadline stops it too."""
    port = free_port()
    log_path = os.path.join(tmp, f"redis-{port}.log")
    proc = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", tmp], cwd=tmp, env=server_env(), log_path=log_path, core=PROXY_CORE)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on port {port} within 10 s")
        await asyncio.sleep(0.05)


def camera_settings(camera_port: int) -> str:
    """The single node's settings of fanout.py (the camera as Isaac Sim, the per-session viewer
    limit raised, everything else default), as YAML."""
    return f"isaac_sim:\n  ip: 127.0.0.1\n  ws_port: {camera_port}\nlimits:\n  max_viewers_per_session: 5000\n"


def start_node(name: str, tmp: str, redis_port: int, settings: str) -> Node:
    """A cluster node: the cluster section (that Redis, node_id `name`, TOKEN) plus `settings` (YAML)."""
    node = Node(name, free_port())
    config_path = os.path.join(tmp, f"{name}.yaml")
    with open(config_path, "w") as f:
        f.write(f"cluster:\n  redis_url: redis://127.0.0.1:{redis_port}/0\n  node_id: {name}\n  token: {TOKEN}\n"
                + settings)
    node.log_path = os.path.join(tmp, f"{name}.log")
    node.proc = spawn([sys.executable, "-m", "vsproxy", "--config", config_path, "--host", "127.0.0.1",
                       "--port", str(node.port), "--log-level", "warning"],
                      cwd=tmp, env=server_env(), log_path=node.log_path, core=PROXY_CORE)
    return node


async def get_json(port: int, path: str) -> dict:
    status, body = await http_request(port, "GET", path)
    if status != 200:
        raise RuntimeError(f"GET {path} on port {port}: HTTP {status} {body[:200]!r}")
    return json.loads(body)


async def wait_cluster(nodes: list[Node], timeout: float = 20.0) -> None:
    """Every node answers /health, reaches Redis and counts all nodes (heartbeats every second)."""
    for node in nodes:
        try:
            await wait_health(node.port, node.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{node.name}: {exc}: {tail(node.log_path)}") from None
    deadline = time.monotonic() + timeout
    while True:
        healths = [await get_json(node.port, "/health") for node in nodes]
        if all(h["cluster"]["redis"] == "connected" and len(h["cluster"]["nodes"]) == len(nodes) for h in healths):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not form within {timeout:g} s: "
                               f"{[h.get('cluster') for h in healths]}")
        await asyncio.sleep(0.2)


async def node_role(node: Node) -> str:
    """The node's role for the camera's upstream (origin, edge, searching, idle), from /health."""
    health = await get_json(node.port, "/health")
    for upstream in health["upstreams"]:
        if upstream["name"] == UPSTREAM:
            return upstream.get("source", {}).get("role", "?")
    return "?"


async def relay_bytes(node: Node) -> tuple[float, float]:
    """The node's origin-to-edge bytes received so far (its /metrics counter), and when it was read
    (the middle of the scrape: the nodes are scraped one after the other, so each gets its own interval)."""
    t0 = time.monotonic()
    status, body = await http_request(node.port, "GET", "/metrics")
    t1 = time.monotonic()
    if status != 200:
        raise RuntimeError(f"GET /metrics on {node.name}: HTTP {status}")
    m = _RELAY_BYTES.search(body.decode())
    return (float(m.group(1)) if m else 0.0), (t0 + t1) / 2


# -- the cluster run ----------------------------------------------------------------------------

def latency_summary(viewers: list[Viewer], window: float) -> dict:
    fps = sorted(v.frames / window for v in viewers)
    lat = sorted(x for v in viewers for x in v.latencies)
    return {
        "viewers": len(viewers),
        "connected": sum(1 for v in viewers if v.fd >= 0),
        "fps_median": statistics.median(fps) if fps else float("nan"),
        "fps_min": fps[0] if fps else float("nan"),
        "lat_p50_ms": percentile(lat, 0.50) / 1e6,
        "lat_p99_ms": percentile(lat, 0.99) / 1e6,
        "lat_max_ms": lat[-1] / 1e6 if lat else float("nan"),
        "latency_samples": len(lat),
        "frames_lost": sum(v.lost for v in viewers),
    }


async def run_cluster(args: argparse.Namespace, camera: FakeCamera) -> dict:
    tmp = args.tmp
    await wait_camera_idle(camera)
    conn0 = camera.connections
    camera.peak_clients = len(camera.clients)
    redis_proc, redis_port = await start_redis(tmp)
    nodes = [start_node(f"node{i + 1}", tmp, redis_port, camera_settings(camera.port)) for i in range(args.nodes)]
    try:
        await wait_cluster(nodes)
        status, body = await http_request(nodes[0].port, "POST", "/session/create",
                                          {"userId": "bench", "robotName": "bench"})
        if status != 200:
            raise RuntimeError(f"session create: HTTP {status} {body[:200]!r}")
        session_id = json.loads(body)["sessionId"]

        # Viewer i goes to node i % nodes: round robin, as a load balancer without stickiness.
        probes = probe_set(args.viewers, args.probes)
        for node in nodes:
            node.stats = Stats(camera)
        viewers = []
        for i in range(args.viewers):
            node = nodes[i % len(nodes)]
            v = Viewer(node.stats, i, args.transport, probe=i in probes, copy=args.copy)
            node.viewers.append(v)
            viewers.append(v)
        t_conn = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(
            *(connect_all(node.viewers, node.port, session_id, {}) for node in nodes)), 120)
        connect_s = time.monotonic() - t_conn
        errors = [e for errs in results for e in errs]
        if errors:
            print(f"  {len(errors)} viewer(s) failed to connect, e.g. {errors[0]}", file=sys.stderr)

        # One origin, the other nodes with viewers its edges, and frames flowing on every node.
        deadline = time.monotonic() + 30
        while True:
            roles = [await node_role(node) for node in nodes]
            flowing = all(any(v.last_seq > 0 for v in node.viewers) for node in nodes if node.viewers)
            settled = all(r in ("origin", "edge") for r, node in zip(roles, nodes, strict=True) if node.viewers)
            if roles.count("origin") == 1 and settled and flowing:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no settled origin/edges within 30 s: roles {roles}, frames flowing {flowing}; "
                                   f"{tail(nodes[0].log_path, 600)}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.warmup)

        # -- measurement window --
        roles = [await node_role(node) for node in nodes]
        relay0 = [await relay_bytes(node) for node in nodes]
        cpu0 = [proc_cpu_seconds(node.proc.pid) for node in nodes]
        redis_cpu0, self0, cores0 = proc_cpu_seconds(redis_proc.pid), self_cpu_seconds(), cores_jiffies()
        sent0 = camera.sent_total
        w0 = time.monotonic()
        for node in nodes:
            node.stats.measuring = True
        await asyncio.sleep(args.duration)
        for node in nodes:
            node.stats.measuring = False
        w1 = time.monotonic()
        cpu1 = [proc_cpu_seconds(node.proc.pid) for node in nodes]
        redis_cpu1, self1, cores1 = proc_cpu_seconds(redis_proc.pid), self_cpu_seconds(), cores_jiffies()
        sent1 = camera.sent_total
        relay1 = [await relay_bytes(node) for node in nodes]
        window = w1 - w0
        for node, role in zip(nodes, roles, strict=True):  # a role that changed in the window shows as "a->b"
            end = await node_role(node)
            node.role = role if end == role else f"{role}->{end}"

        per_node = []
        for k, node in enumerate(nodes):
            connected = [v for v in node.viewers if v.fd >= 0]
            row = {"node": node.name, "role": node.role, "pid": node.proc.pid,
                   "cpu_pct": 100.0 * (cpu1[k] - cpu0[k]) / window,
                   "relay_in_bytes_per_s": (relay1[k][0] - relay0[k][0]) / (relay1[k][1] - relay0[k][1]),
                   "viewer_bytes_per_s": node.stats.bytes / window / max(len(connected), 1),
                   **latency_summary(node.viewers, window)}
            per_node.append(row)
        edge_rows = [r for r in per_node if r["role"] == "edge"]
        edges_with_viewers = sum(1 for r in edge_rows if r["connected"])
        connected = [v for v in viewers if v.fd >= 0]
        # The stream's bitrate as a viewer reads it: every byte read (frame headers included) over
        # the window, per viewer, averaged over all viewers.
        bitrate = sum(node.stats.bytes for node in nodes) / window / max(len(connected), 1)
        relay = sum(r["relay_in_bytes_per_s"] for r in per_node)
        expected = edges_with_viewers * bitrate
        edge_viewers = [v for node, r in zip(nodes, per_node, strict=True) if r["role"] == "edge"
                        for v in node.viewers]
        origin_viewers = [v for node, r in zip(nodes, per_node, strict=True) if r["role"] == "origin"
                          for v in node.viewers]
        usage = cores_usage(cores0, cores1)
        ours = sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True)) + (redis_cpu1 - redis_cpu0) + (self1 - self0)
        return {
            "nodes": per_node,
            "transport": args.transport,
            "viewers": args.viewers,
            "connected": len(connected),
            "connect_errors": len(errors),
            "connect_seconds": round(connect_s, 2),
            "disconnected_during_run": sum(1 for v in viewers if v.closed and v.fd >= 0),
            "window_seconds": round(window, 3),
            "upstream_fps": (sent1 - sent0) / window,
            "frame_bytes": camera.frame_bytes,
            "edges_with_viewers": edges_with_viewers,
            "stream_bytes_per_s": bitrate,
            "relay_bytes_per_s": relay,
            "expected_relay_bytes_per_s": expected,
            "relay_ratio": relay / expected if expected else float("nan"),
            "per_viewer_relay_bytes_per_s": len(edge_viewers) * bitrate,
            "all_viewers_bytes_per_s": len(connected) * bitrate,
            "edge": latency_summary(edge_viewers, window),
            "origin": latency_summary(origin_viewers, window),
            "cluster_cpu_pct": sum(r["cpu_pct"] for r in per_node),
            "redis_cpu_pct": 100.0 * (redis_cpu1 - redis_cpu0) / window,
            "loadgen_cpu_pct": 100.0 * (self1 - self0) / window,
            "core_busy_pct": {f"cpu{c}": round(u["busy"], 1) for c, u in usage.items()},
            "others_pct": max(0.0, sum(u["task"] for u in usage.values()) - 100.0 * ours / window),
            "simulator_connections": camera.connections - conn0,
            "simulator_peak_clients": camera.peak_clients,
        }
    finally:
        for node in nodes:
            for v in node.viewers:
                v.close()
        for node in nodes:
            code = stop_child(node.proc, timeout=10)
            if code not in (0, -15, None):
                print(f"  {node.name} exited with code {code}: {tail(node.log_path, 600)}", file=sys.stderr)
        stop_child(redis_proc)


async def wait_camera_idle(camera: FakeCamera, timeout: float = 10.0) -> None:
    """Until the previous run's server has hung up on the camera (its close is asynchronous)."""
    deadline = time.monotonic() + timeout
    while camera.clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def run_single(args: argparse.Namespace, camera: FakeCamera) -> dict:
    """The same viewers on one node: fanout.py's run, with the same options."""
    await wait_camera_idle(camera)
    fargs = fanout.parse_args(["--transport", args.transport, "--viewers", str(args.viewers),
                               "--duration", str(args.duration), "--warmup", str(args.warmup),
                               "--fps", str(args.fps), "--probes", str(args.probes),
                               *(["--copy"] if args.copy else [])])
    fargs.tmp = args.tmp
    fargs.hard_deadline = args.hard_deadline
    return await fanout.run_one(fargs, camera, args.transport, args.viewers, direct=False, slow=False)


# -- report -------------------------------------------------------------------------------------

def mbs(x: float) -> str:
    return f2(x / 1e6)


def verdicts(c: dict) -> list[str]:
    fails = []
    ratio = c["relay_ratio"]
    if not (ratio == ratio and abs(ratio - 1) <= RELAY_TOLERANCE):
        fails.append(f"relay traffic {f2(ratio)} x (edges with viewers x bitrate), want 1 +- {RELAY_TOLERANCE:g}")
    if c["simulator_connections"] != 1 or c["simulator_peak_clients"] != 1:
        fails.append(f"the simulator saw {c['simulator_connections']} connections "
                     f"(at most {c['simulator_peak_clients']} at once), want 1")
    if c["connected"] != c["viewers"] or c["disconnected_during_run"]:
        fails.append(f"{c['connected']} of {c['viewers']} viewers connected, "
                     f"{c['disconnected_during_run']} disconnected during the window")
    return fails


def viewer_table(c: dict, single: dict | None) -> str:
    head = ("| run | node | role | viewers (ok) | fps median / min | latency p50 / p99 / max ms | lost "
            "| CPU % of one core | relay in MB/s | MB/s per viewer |")
    out = [head, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in c["nodes"]:
        out.append(f"| cluster | {r['node']} | {r['role']} | {r['viewers']} ({r['connected']}) "
                   f"| {f1(r['fps_median'])} / {f1(r['fps_min'])} "
                   f"| {f1(r['lat_p50_ms'])} / {f1(r['lat_p99_ms'])} / {f1(r['lat_max_ms'])} | {r['frames_lost']} "
                   f"| {f1(r['cpu_pct'])} | {mbs(r['relay_in_bytes_per_s'])} | {mbs(r['viewer_bytes_per_s'])} |")
    for label, s in (("edge viewers", c["edge"]), ("origin viewers", c["origin"])):
        out.append(f"| cluster | {label} | | {s['viewers']} ({s['connected']}) "
                   f"| {f1(s['fps_median'])} / {f1(s['fps_min'])} "
                   f"| {f1(s['lat_p50_ms'])} / {f1(s['lat_p99_ms'])} / {f1(s['lat_max_ms'])} | {s['frames_lost']} "
                   f"| | | |")
    out.append(f"| cluster | all {len(c['nodes'])} nodes + Redis | | {c['viewers']} ({c['connected']}) | | | "
               f"| {f1(c['cluster_cpu_pct'])} + {f1(c['redis_cpu_pct'])} | {mbs(c['relay_bytes_per_s'])} | |")
    if single is not None:
        s = single
        out.append(f"| single node | vsproxy | - | {s['viewers']} ({s['connected']}) "
                   f"| {f1(s['fps_median'])} / {f1(s['fps_min'])} "
                   f"| {f1(s['lat_p50_ms'])} / {f1(s['lat_p99_ms'])} / {f1(s['lat_max_ms'])} | {s['frames_lost']} "
                   f"| {f1(s['proxy_cpu_pct'])} | - | {mbs(s['mb_per_s'] * 1e6 / max(s['connected'], 1))} |")
    return "\n".join(out)


def relay_table(c: dict) -> str:
    fails = verdicts(c)
    head = ("| edges with viewers | stream bitrate at a viewer MB/s | expected relay = edges x bitrate MB/s "
            "| measured relay (metrics) MB/s | measured / expected "
            "| edge viewers x bitrate MB/s (one relay per viewer) "
            "| simulator connections | result |")
    row = (f"| {c['edges_with_viewers']} | {mbs(c['stream_bytes_per_s'])} | {mbs(c['expected_relay_bytes_per_s'])} "
           f"| {mbs(c['relay_bytes_per_s'])} | {f2(c['relay_ratio'])} | {mbs(c['per_viewer_relay_bytes_per_s'])} "
           f"| {c['simulator_connections']} | {'PASS' if not fails else 'FAIL: ' + '; '.join(fails)} |")
    return "\n".join([head, "|--:|--:|--:|--:|--:|--:|--:|---|", row])


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", default=MJPEG, choices=(MJPEG, WS_BINARY),
                   help="the viewers' transport (default mjpeg)")
    p.add_argument("--viewers", type=int, default=100, help="viewers, spread over the nodes round robin (default 100)")
    p.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window in seconds (default 10)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds after all viewers are connected and the roles settled (default 3)")
    p.add_argument("--fps", type=float, default=30.0, help="fake camera frame rate (default 30)")
    p.add_argument("--probes", type=int, default=0,
                   help="viewers that record latency, spread over the order (default 0 = all)")
    p.add_argument("--copy", action="store_true",
                   help="copy every payload byte to user space (as a real client) instead of recv(MSG_TRUNC)")
    p.add_argument("--no-single", action="store_true", help="skip the single-node run")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    args = p.parse_args(argv)
    if not 1 <= args.viewers <= 5000:
        p.error("--viewers must be 1..5000")
    if not 2 <= args.nodes <= 16:
        p.error("--nodes must be 2..16")
    if not 1 <= args.duration <= 600:
        p.error("--duration must be 1..600 s")
    if not 0 <= args.warmup <= 120:
        p.error("--warmup must be 0..120 s")
    if not 1 <= args.fps <= 120:
        p.error("--fps must be 1..120")
    return args


async def amain(args: argparse.Namespace) -> tuple[dict, dict | None]:
    camera = FakeCamera(make_jpeg(), args.fps)
    camera.listen(0)
    try:
        print(f"run: cluster of {args.nodes} nodes, {args.transport}, {args.viewers} viewers ...",
              file=sys.stderr, flush=True)
        budget = args.warmup + args.duration + 180
        cluster = await asyncio.wait_for(run_cluster(args, camera), budget)
        single = None
        if not args.no_single:
            print(f"run: single node, {args.transport}, {args.viewers} viewers ...", file=sys.stderr, flush=True)
            single = await asyncio.wait_for(run_single(args, camera), budget)
    finally:
        await camera.stop()
    return cluster, single


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.hard_deadline = int(2 * (args.warmup + args.duration + 180) + 60)
    arm_deadline(args.hard_deadline)
    nofile = raise_nofile(max(4096, 2 * args.viewers + 512))
    pinned = pin_self(LOADGEN_CORE)
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    git_text, git_info = git_line()
    with tempfile.TemporaryDirectory(prefix="vsbench-") as tmp:  # empty cwd: no config.yaml / .env
        args.tmp = tmp
        try:
            cluster, single = asyncio.run(amain(args))
        finally:
            kill_children()
    fanout.signal_off()

    print()
    print(f"command: {command}")
    print(machine_line())
    print(git_text)
    print(f"pinning: the {args.nodes} nodes and Redis share core {PROXY_CORE} (taskset -c {PROXY_CORE}), the core the "
          f"single node gets alone; fake camera + load generator on core {LOADGEN_CORE} "
          f"(sched_setaffinity{'' if pinned else ' FAILED: not pinned'}); nofile limit {nofile}")
    print(f"upstream: 1280x720 JPEG of {cluster['frame_bytes']} bytes (incl. the 27-byte COM stamp) at {args.fps:g} "
          f"fps; viewers: {args.transport}, round robin over the nodes; warmup {args.warmup:g} s, window "
          f"{cluster['window_seconds']:g} s")
    print()
    print(viewer_table(cluster, single))
    print()
    print(relay_table(cluster))
    print()
    print(f"relay traffic: measured {mbs(cluster['relay_bytes_per_s'])} MB/s = {f2(cluster['relay_ratio'])} x "
          f"({cluster['edges_with_viewers']} edges with viewers x {mbs(cluster['stream_bytes_per_s'])} MB/s); "
          f"one relay per edge viewer would be {mbs(cluster['per_viewer_relay_bytes_per_s'])} MB/s, and all "
          f"{cluster['connected']} viewers x bitrate {mbs(cluster['all_viewers_bytes_per_s'])} MB/s")
    print(f"simulator: {cluster['simulator_connections']} connection(s) during the cluster run, at most "
          f"{cluster['simulator_peak_clients']} at once")
    notes = []
    for label, r in (("cluster", cluster), ("single node", single)):
        if r is None:
            continue
        if abs(r["upstream_fps"] - args.fps) > 0.5:
            notes.append(f"{label}: the camera sent {r['upstream_fps']:.1f} fps, not {args.fps:g}: core "
                         f"{LOADGEN_CORE} was too busy")
        if r["loadgen_cpu_pct"] >= fanout.LOADGEN_BOUND_PCT:
            notes.append(f"{label}: load generator at {r['loadgen_cpu_pct']:.0f}% of its core: fps/latency may be "
                         "its limit, not the server's")
        if r["others_pct"] > fanout.NOISY_PCT:
            notes.append(f"{label}: other processes used {r['others_pct']:.0f}% of a core during the window "
                         "(a shared machine): fps and the latency tail are not representative")
    print(f"load: cluster window: loadgen {f1(cluster['loadgen_cpu_pct'])}% of its core, others "
          f"{f1(cluster['others_pct'])}%"
          + (f"; single-node window: loadgen {f1(single['loadgen_cpu_pct'])}%, others {f1(single['others_pct'])}%"
             if single else ""))
    if notes:
        print("\nnotes:\n- " + "\n- ".join(notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": machine_line(), "git": git_info,
                       "args": {k: v for k, v in vars(args).items() if k != "tmp"},
                       "cluster": cluster, "single": single}, f, indent=2)
        print(f"\nraw numbers: {args.json}")
    return 0 if not verdicts(cluster) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        kill_children()
        raise SystemExit(130) from None
