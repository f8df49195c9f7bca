"""Soak: does the proxy give back what viewers and sessions take? Minutes of churn, every output.

Workers create a session, open viewers of every kind on it one after another (MJPEG, WebSocket
JSON, binary and H.264, fragmented MP4, WHEP peers, snapshots, dashboard event streams and
thumbnails), read each for a moment, and leave in one of three ways: a clean close, a reset
(SO_LINGER 0, as a browser tab that is killed), or a stall (reading nothing for a while first);
WHEP peers leave with a DELETE, by closing, or by vanishing (their ICE consent lapses). Then the
session is destroyed, sometimes with a viewer still on it.

Rounds of churn, each followed by a quiet spell (no viewer, no session, the upstream's linger
past): a leak shows as quiet figures that climb from round to round; a proxy that gives
everything back has the same open files and threads after every round, and memory that stops
growing after the first (what stays is code and caches loaded once). Also counted: errors and
tracebacks in the server's log.

    PYTHONPATH=$PWD python bench/soak.py --seconds 600 --rounds 4 --workers 8

Everything on 127.0.0.1; children cleaned up; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    arm_deadline,
    git_line,
    http_request,
    kill_children,
    machine_line,
    proc_rss_mb,
    stop_child,
)
from h264 import create_session, open_stream, start_proxy  # noqa: E402

CONFIG = """
demo: {width: 640, height: 360, fps: 30}
limits: {max_sessions: 1000, max_sessions_per_user: 1000, session_create_rate: 1000, session_create_burst: 1000}
streaming: {linger_seconds: 2}
"""
QUIET_SECONDS = 45  # an abandoned WHEP peer's ICE consent lapses within 30 s, then the upstream lingers
KINDS = ("mjpeg", "ws_json", "ws_binary", "ws_h264", "mp4", "whep", "snapshot", "events", "thumbnail")
PATHS = {"mjpeg": ("/stream/{id}/mjpeg", False), "ws_json": ("/stream/{id}", True),
         "ws_binary": ("/stream/{id}?format=binary", True), "ws_h264": ("/stream/{id}?format=h264", True),
         "mp4": ("/stream/{id}/stream.mp4", False), "events": ("/dashboard/api/events", False)}


def proc_counts(pid: int) -> dict[str, float]:
    """The server's resident memory (MB), open files and threads."""
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return {"rss_mb": proc_rss_mb(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


class Churn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.opened = dict.fromkeys(KINDS, 0)
        self.failures: list[str] = []

    async def worker(self, n: int, until: float) -> None:
        rng = random.Random(n)
        while time.monotonic() < until:
            session = await create_session(self.port)
            for kind in rng.sample(KINDS, rng.randint(1, 4)):
                try:
                    await self.view(session, kind, rng)
                    self.opened[kind] += 1
                except (OSError, RuntimeError, asyncio.TimeoutError, ValueError) as exc:
                    self.failures.append(f"{kind}: {exc!r}")
            try:
                if rng.random() < 0.2:  # destroyed with a viewer still on it
                    reader, writer, _ = await open_stream(self.port, PATHS["ws_binary"][0].format(id=session), True)
                    await reader.read(65536)
                    await http_request(self.port, "DELETE", f"/session/{session}")
                    await asyncio.wait_for(reader.read(), 10)  # the proxy closes it (5 s for a close reply)
                    writer.close()
                else:
                    await http_request(self.port, "DELETE", f"/session/{session}")
            except (OSError, RuntimeError, asyncio.TimeoutError, ValueError) as exc:
                self.failures.append(f"destroy: {exc!r}")

    async def view(self, session: str, kind: str, rng: random.Random) -> None:
        if kind == "whep":
            return await self.whep(session, rng)
        if kind in ("snapshot", "thumbnail"):
            path = f"/stream/{session}/snapshot.jpg" if kind == "snapshot" else "/dashboard/api/thumbnail/demo.jpg"
            status, _ = await http_request(self.port, "GET", path, timeout=10)
            if status != 200:
                raise RuntimeError(f"{path}: {status}")
            return None
        path, websocket = PATHS[kind]
        reader, writer, _ = await open_stream(self.port, path.format(id=session), websocket)
        until = time.monotonic() + rng.uniform(0.1, 1.5)
        while time.monotonic() < until:
            try:
                if not await asyncio.wait_for(reader.read(1 << 16), until - time.monotonic()):
                    raise RuntimeError(f"{kind}: closed by the proxy")
            except asyncio.TimeoutError:
                break
        how = rng.choice(("close", "reset", "stall"))
        if how == "stall":
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        return None

    async def whep(self, session: str, rng: random.Random) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        request = urllib.request.Request(f"{self.base}/stream/{session}/whep", data=pc.localDescription.sdp.encode(),
                                         headers={"Content-Type": "application/sdp"}, method="POST")
        response = await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
        answer, location = response.read().decode(), response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        how = rng.choice(("delete", "close", "vanish"))
        if how == "delete":
            await http_request(self.port, "DELETE", location)
        if how != "vanish":
            await pc.close()
        else:  # no DTLS close, no DELETE: the proxy notices by ICE consent
            for transceiver in pc.getTransceivers():
                transport = transceiver.receiver.transport.transport
                await transport._connection.close()  # stop answering the proxy's consent checks
            asyncio.get_running_loop().call_later(60, lambda: asyncio.ensure_future(pc.close()))


async def quiet(port: int, pid: int) -> dict[str, float]:
    """Wait until no session and no viewer is left and the upstream has stopped, then sample."""
    deadline = time.monotonic() + QUIET_SECONDS + 30
    await asyncio.sleep(QUIET_SECONDS)
    while time.monotonic() < deadline:
        _, body = await http_request(port, "GET", "/upstreams")
        upstreams = json.loads(body)["upstreams"]
        _, body = await http_request(port, "GET", "/sessions")
        if json.loads(body)["count"] == 0 and all(u["state"] == "idle" and not any(u["viewers"].values())
                                                  for u in upstreams):
            break
        await asyncio.sleep(1)
    await asyncio.sleep(2)
    return proc_counts(pid)


async def run(args: argparse.Namespace) -> int:
    from aiortc.codecs import h264 as aiortc_h264
    aiortc_h264.H264Decoder.decode = lambda self, encoded_frame: []  # this process only: decode nothing
    print(machine_line())
    print(git_line()[0])
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = await start_proxy(tmp, CONFIG)
        log_path = os.path.join(tmp, f"server-{port}.log")
        try:
            churn = Churn(port)
            rows = [("started", proc_counts(proc.pid), 0)]
            for round_no in range(1, args.rounds + 1):
                until = time.monotonic() + args.seconds / args.rounds
                await asyncio.gather(*(churn.worker(n + 100 * round_no, until) for n in range(args.workers)))
                rows.append((f"after churn round {round_no}", proc_counts(proc.pid), sum(churn.opened.values())))
                rows.append((f"quiet after round {round_no}", await quiet(port, proc.pid), sum(churn.opened.values())))
        finally:
            stop_child(proc)
        with open(log_path) as f:
            log_text = f.read()
    print(f"\nviewers opened: {sum(churn.opened.values())} ({', '.join(f'{k} {v}' for k, v in churn.opened.items())}); "
          f"failures: {len(churn.failures)}")
    for failure in churn.failures[:10]:
        print("  ", failure)
    print("\n| when | viewers so far | RSS MB | open files | threads |\n|---|--:|--:|--:|--:|")
    for label, counts, opened in rows:
        print(f"| {label} | {opened} | {counts['rss_mb']:.1f} | {counts['fds']} | {counts['threads']} |")
    quiet_rows = rows[2::2]
    first, last = quiet_rows[0][1], quiet_rows[-1][1]
    # Memory that grows with use climbs to the end; the allocator's high-water mark levels off.
    half = quiet_rows[len(quiet_rows) // 2 - 1:]
    (_, middle, opened_middle), opened_last = half[0], half[-1][2]
    series = ", ".join(f"{counts['rss_mb']:.1f}" for _, counts, _ in quiet_rows)
    print(f"\nRSS in the quiet spells: {series} MB; over the "
          f"second half of the rounds {last['rss_mb'] - middle['rss_mb']:+.1f} MB "
          f"({(last['rss_mb'] - middle['rss_mb']) * 1024 * 1024 / ((opened_last - opened_middle) or 1):+.0f} "
          f"bytes per viewer); open files {last['fds'] - first['fds']:+d} and threads "
          f"{last['threads'] - first['threads']:+d} from the first quiet spell to the last (failing if any differs)")
    problems = [line for line in log_text.splitlines() if "Traceback" in line or " ERROR " in line
                or "was destroyed" in line]
    print(f"server log: {len(problems)} error/traceback lines")
    for line in problems[:10]:
        print("  ", line[:200])
    leaked = any((counts["fds"], counts["threads"]) != (first["fds"], first["threads"]) for _, counts, _ in quiet_rows)
    return 1 if leaked or churn.failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="churn time, all rounds (default 600)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of churn, each then quiet (default 4; at least 2)")
    p.add_argument("--workers", type=int, default=8, help="sessions churned at once (default 8)")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds: at least 2 (the first quiet spell is the reference)")
    arm_deadline(args.seconds + args.rounds * (QUIET_SECONDS + 40) + 60)
    try:
        return asyncio.run(run(args))
    finally:
        kill_children()


if __name__ == "__main__":
    sys.exit(main())
