"""Shared helpers: processes, /proc readings, tiny HTTP client, machine and git description."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = 0   # the server under test runs here (taskset -c 0)
LOADGEN_CORE = 1  # the fake camera and the load generator run here (sched_setaffinity)

_children: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_self(core: int = LOADGEN_CORE) -> bool:
    try:
        os.sched_setaffinity(0, {core})
        return True
    except OSError:
        return False


def _die_with_parent() -> None:
    # The child gets SIGTERM if this benchmark dies, so no server is ever left running.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(args: list[str], *, cwd: str, env: dict, log_path: str, core: int | None = PROXY_CORE) -> subprocess.Popen:
    """Start a child (under `taskset -c core`), output to a log file; tracked for cleanup."""
    cmd = (["taskset", "-c", str(core)] if core is not None else []) + args
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    log.close()
    _children.append(proc)
    return proc


def stop_child(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def kill_children() -> None:
    for proc in list(_children):
        if proc.poll() is None:
            proc.kill()


def arm_deadline(seconds: float) -> None:
    """Last resort: kill our children and exit if the whole run takes longer than `seconds`."""
    def on_alarm(signum, frame):  # noqa: ARG001
        kill_children()
        print(f"\nbench: hard deadline of {seconds:.0f} s reached, stopped", file=sys.stderr, flush=True)
        os._exit(3)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(seconds) + 1)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VIDEO_PROXY_", "ISAAC_SIM_", "VSPROXY_"))}
    env["PYTHONPATH"] = str(REPO_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# -- /proc ------------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tcp_send_queues(local_port: int) -> list[int]:
    """Bytes in the kernel send queue (sent-unacknowledged + unsent) of every established TCP
    socket on 127.0.0.1:local_port, i.e. the server's side of each viewer (from /proc/net/tcp).
    Kernel memory: it is not in the server's RSS."""
    out = []
    want = f"0100007F:{local_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "01":
                    out.append(int(parts[4].split(":")[0], 16))
    except OSError:
        pass
    return out


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cores_jiffies() -> dict[int, list[int]]:
    """{core: [user, nice, system, idle, iowait, irq, softirq, steal]} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s", line)
            if m:
                out[int(m.group(1))] = [int(v) for v in line.split()[1:9]]
    return out


def cores_usage(before: dict, after: dict) -> dict[int, dict[str, float]]:
    """Per core, % of that core over the interval: busy (all but idle and iowait), task (user,
    nice, system: time charged to processes), softirq (irq + softirq) and steal."""
    res = {}
    for core, a in after.items():
        b = before.get(core, [0] * 8)
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = max(sum(d), 1)
        res[core] = {"busy": 100.0 * (total - d[3] - d[4]) / total, "task": 100.0 * (d[0] + d[1] + d[2]) / total,
                     "softirq": 100.0 * (d[5] + d[6]) / total, "steal": 100.0 * d[7] / total}
    return res


# -- HTTP (setup only; viewers use raw sockets) -------------------------------------------------

async def http_request(port: int, method: str, path: str, body: dict | None = None,
                       timeout: float = 5.0) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = json.dumps(body).encode() if body is not None else b""
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
            writer.write(head.encode() + data)
            raw = await reader.read(1 << 20)
            while True:  # Connection: close, so read to EOF (bounded by the timeout)
                more = await reader.read(1 << 20)
                if not more:
                    break
                raw += more
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        status = int(status_line.split()[1])
        _, _, payload = rest.partition(b"\r\n\r\n")
        return status, payload
    return await asyncio.wait_for(go(), timeout)


async def wait_health(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> float:
    """Seconds until GET /health answers 200 (raises if the process dies or time runs out)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health answered")
        try:
            status, _ = await http_request(port, "GET", "/health", timeout=1.0)
            if status == 200:
                return time.monotonic() - t0
        except (OSError, asyncio.TimeoutError, ValueError, IndexError):
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError(f"/health did not answer 200 within {timeout:g} s")


# -- description --------------------------------------------------------------------------------

def machine_line() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import tornado
        tv = tornado.version
    except ImportError:
        tv = "?"
    return (f"machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; "
            f"Python {platform.python_version()}, Tornado {tv}")


def git_line() -> tuple[str, dict]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain")
    dirty = bool(status)
    code_changes = sorted({line[3:] for line in status.splitlines() if line[3:].startswith("vsproxy/")})
    text = f"commit: {commit}{'+dirty' if dirty else ''}"
    if code_changes:
        shown = ", ".join(code_changes[:8]) + (" ..." if len(code_changes) > 8 else "")
        text += f" (uncommitted changes under vsproxy/: {shown})"
    elif dirty:
        text += " (no uncommitted changes under vsproxy/)"
    return text, {"commit": commit, "dirty": dirty, "vsproxy_changes": code_changes}


def percentile(sorted_vals: list, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]
