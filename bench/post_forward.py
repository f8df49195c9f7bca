#!/usr/bin/env python3
"""vsproxy cluster benchmark for a POSTing publisher behind a load balancer without stickiness:
N nodes on one Redis, a push upstream, JPEG frames POSTed round robin (frame i to node i mod N) at
a camera's pace. The node that gets the first frame takes the upstream's lease; the others forward
every frame they get to it (cluster/ingest.py).

    python bench/post_forward.py [--frames 600] [--nodes 3] [--fps 30] [--size 640x360]

What it shows (figures; the run fails, exit 1, unless every frame was published):
- the answers per node: every frame must be a 200, wherever it lands (no viewers: the forwarding
  alone);
- the latency of a POST answered by the lease holder itself and of one forwarded, p50 / p95 / p99,
  from the request's first byte to the answer's last, on one keep-alive connection per node (as a
  load balancer keeps to its upstreams);
- Redis commands per frame: INFO stats over the run, minus what the nodes' heartbeats alone cost
  in an idle window as long (the forwarding nodes ask Redis where to forward once a second).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster import start_node, start_redis, wait_cluster  # noqa: E402
from common import (  # noqa: E402
    arm_deadline,
    git_line,
    http_request,
    kill_children,
    machine_line,
    percentile,
)

from vsproxy import render  # noqa: E402

PUBLISH_TOKEN = "bench-publish-token-0123456789"  # loopback only


def redis_commands(port: int) -> int:
    """Redis's total_commands_processed (INFO stats), over a raw socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
        data = b""
        while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
            data += sock.recv(1 << 16)
    line = next(line for line in data.decode().splitlines() if line.startswith("total_commands_processed:"))
    return int(line.split(":")[1])


def redis_get(port: int, key: str) -> str | None:
    """GET over a raw socket (a short string value), None if the key is not there."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode())
        reply = sock.recv(1 << 16).decode()
    return None if reply.startswith("$-1") else reply.split("\r\n")[1]


class Connection:
    """One keep-alive HTTP/1.1 connection to a node, for POSTs of frames."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        """(status, body, seconds from the request's first byte to the answer's last)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: image/jpeg\r\n"
                f"Authorization: Bearer {PUBLISH_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        started = time.perf_counter()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        answer = await self.reader.readexactly(length)
        return int(status_line.split()[1]), answer, time.perf_counter() - started

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(args: argparse.Namespace) -> bool:
    tmp = args.tmp
    redis_proc, redis_port = await start_redis(tmp)
    settings = f"upstreams:\n  pub:\n    kind: push\n    token: {PUBLISH_TOKEN}\n"
    nodes = [start_node(f"node{i + 1}", tmp, redis_port, settings) for i in range(args.nodes)]
    await wait_cluster(nodes)
    status, body = await http_request(nodes[0].port, "POST", "/session/create",
                                      {"userId": "bench", "robotName": "bench", "upstream": "pub"})
    if status != 200:
        raise RuntimeError(f"session create: HTTP {status} {body[:200]!r}")
    width, height = (int(v) for v in args.size.split("x"))
    pattern = render.TestPattern(width, height, "post_forward")
    frames = [pattern.render(i) for i in range(min(args.frames, 60))]
    connections = [Connection(node.port) for node in nodes]
    answers = [dict() for _ in nodes]
    latency: dict[str, list[float]] = {"holder": [], "forwarded": []}
    holder_index = 0  # frame 0 goes to node1, which takes the lease
    interval = 1.0 / args.fps
    before = redis_commands(redis_port)
    started = time.monotonic()
    for i in range(args.frames):
        k = i % len(nodes)
        code, _, seconds = await connections[k].post("/ingest/pub/frame", frames[i % len(frames)])
        answers[k][code] = answers[k].get(code, 0) + 1
        if code == 200:
            latency["holder" if k == holder_index else "forwarded"].append(seconds * 1000)
        await asyncio.sleep(max(0.0, started + (i + 1) * interval - time.monotonic()))
    elapsed = time.monotonic() - started
    during = redis_commands(redis_port) - before
    holder = redis_get(redis_port, "vsproxy:lease:pub")  # before the publisher counts as gone
    before_idle = redis_commands(redis_port)
    await asyncio.sleep(elapsed)
    idle = redis_commands(redis_port) - before_idle
    for connection in connections:
        connection.close()
    print(f"\n{args.frames} frames of {len(frames[0]):,} B ({args.size}) POSTed round robin over {len(nodes)} nodes "
          f"at {args.fps:g} fps, one keep-alive connection per node\n")
    print("| node | holds the lease | answers |")
    print("|---|---|---|")
    for k, node in enumerate(nodes):
        counts = ", ".join(f"{code}: {n}" for code, n in sorted(answers[k].items()))
        print(f"| {node.name} | {'yes' if node.name == holder else 'no'} | {counts} |")
    print("\n| POSTs | latency p50 / p95 / p99 ms |\n|---|--:|")
    for kind, label in (("holder", "answered by the lease holder"), ("forwarded", "forwarded to it")):
        ms = sorted(latency[kind])
        if ms:
            print(f"| {label} ({len(ms)}) | {percentile(ms, .5):.1f} / {percentile(ms, .95):.1f} / "
                  f"{percentile(ms, .99):.1f} |")
    published = sum(a.get(200, 0) for a in answers)
    print(f"\nevery frame published: {'PASS' if published == args.frames else 'FAIL'} ({published} of {args.frames}); "
          f"Redis commands per frame beyond the heartbeats: {(during - idle) / args.frames:.2f} "
          f"({during} during the run, {idle} in an idle window as long)")
    redis_proc.terminate()
    return published == args.frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=600, help="frames to POST (default 600)")
    p.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    p.add_argument("--size", default="640x360", help="frame size WxH (default 640x360)")
    args = p.parse_args(argv)
    if not 2 <= args.nodes <= 8 or not 1 <= args.frames <= 100_000 or not 1 <= args.fps <= 120:
        p.error("--nodes 2..8, --frames 1..100000, --fps 1..120")
    arm_deadline(int(args.frames / args.fps * 2 + 120))
    print(machine_line())
    print(git_line()[0])
    print("command: python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    with tempfile.TemporaryDirectory(prefix="vsbench-") as tmp:
        args.tmp = tmp
        try:
            ok = asyncio.run(run(args))
        finally:
            kill_children()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
