#!/usr/bin/env python3
"""vsproxy start-up benchmark: time until GET /health answers 200, and idle RSS after 2 s.

    python bench/startup.py [--runs 3] [--json out.json]

Starts `python -m vsproxy --host 127.0.0.1 --port <free> --log-level warning` in an empty temporary
directory (no config.yaml / .env; no upstream configured, so the built-in demo source is the
default upstream and nothing connects anywhere), polls /health every 10 ms, reads VmRSS 2 s after
/health first answered, then stops it. Targets: /health within 1 s, idle RSS <= 60 MB.
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
    PROXY_CORE,
    arm_deadline,
    free_port,
    git_line,
    kill_children,
    machine_line,
    proc_rss_mb,
    server_env,
    spawn,
    stop_child,
    wait_health,
)


async def one_run(tmp: str, idle_seconds: float) -> dict:
    port = free_port()
    log_path = os.path.join(tmp, f"startup-{port}.log")
    t0 = time.monotonic()
    proc = spawn([sys.executable, "-m", "vsproxy", "--host", "127.0.0.1", "--port", str(port),
                  "--log-level", "warning"], cwd=tmp, env=server_env(), log_path=log_path, core=PROXY_CORE)
    try:
        await wait_health(port, proc, timeout=15.0)
        ready = time.monotonic() - t0
        await asyncio.sleep(idle_seconds)
        rss = proc_rss_mb(proc.pid)
    finally:
        stop_child(proc)
    return {"health_seconds": ready, "idle_rss_mb": rss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions (default 3, max 20)")
    p.add_argument("--idle", type=float, default=2.0, help="seconds after /health before reading RSS (default 2)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if not 1 <= args.runs <= 20:
        p.error("--runs must be 1..20")
    arm_deadline(args.runs * (args.idle + 30) + 30)
    runs = []
    with tempfile.TemporaryDirectory(prefix="vsbench-startup-") as tmp:
        try:
            for _ in range(args.runs):
                runs.append(asyncio.run(one_run(tmp, args.idle)))
        finally:
            kill_children()
    import signal
    signal.alarm(0)
    health = [r["health_seconds"] for r in runs]
    rss = [r["idle_rss_mb"] for r in runs]
    git_text, git_info = git_line()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    print(f"command: {command}")
    print(machine_line())
    print(git_text)
    print(f"vsproxy under taskset -c {PROXY_CORE}, cwd an empty temp dir, no upstream configured\n")
    print("| runs | /health 200 after s (median / max) | idle RSS MB after 2 s (median / max) | targets |")
    print("|--:|--:|--:|---|")
    fails = []
    if max(health) > 1.0:
        fails.append(f"/health {max(health):.2f} s (want <= 1)")
    if max(rss) > 60:
        fails.append(f"idle RSS {max(rss):.1f} MB (want <= 60)")
    print(f"| {len(runs)} | {statistics.median(health):.3f} / {max(health):.3f} "
          f"| {statistics.median(rss):.1f} / {max(rss):.1f} | {'PASS' if not fails else 'FAIL: ' + '; '.join(fails)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": machine_line(), "git": git_info, "runs": runs}, f, indent=2)
        print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
