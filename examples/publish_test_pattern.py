"""Publish a moving test pattern to a vsproxy `push` upstream: try push streaming without Isaac Sim.

1. Configure a push upstream in vsproxy's config.yaml and start vsproxy::

       upstreams:
         replicator:
           kind: push
           token: example-publish-token-0123
       default_upstream: replicator

2. Run this script (the token from the environment keeps it out of `ps` and shell history)::

       VSPROXY_PUBLISH_TOKEN=example-publish-token-0123 .venv/bin/python examples/publish_test_pattern.py

3. Open http://127.0.0.1:8889/ and create a session (or use the REST API): the pattern plays.

Options: --url (default ws://127.0.0.1:8889/ingest/replicator), --token, --fps, --size WxH,
--quality, --frames N (stop after N frames; default: until Ctrl-C).

Exits 1 with the proxy's answer when it refuses the publisher for good (a wrong token, no push
upstream of that name, a URL that is not the WebSocket endpoint); a proxy that is down or busy
(another publisher connected) is retried.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

try:
    from vsproxy.publish import Publisher, PublishRefused
    from vsproxy.render import TestPattern
except ImportError:  # running from a checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vsproxy.publish import Publisher, PublishRefused
    from vsproxy.render import TestPattern


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if not (16 <= width <= 7680 and 16 <= height <= 4320):
        raise argparse.ArgumentTypeError("size out of range")
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8889/ingest/replicator",
                        help="the push upstream's ingest URL (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("VSPROXY_PUBLISH_TOKEN", ""),
                        help="publish token (default: $VSPROXY_PUBLISH_TOKEN)")
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--size", type=parse_size, default=(640, 360), help="WIDTHxHEIGHT (default 640x360)")
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: run until Ctrl-C)")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("no token: pass --token or set VSPROXY_PUBLISH_TOKEN")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    width, height = args.size
    pattern = TestPattern(width, height, "vsproxy push test pattern", args.quality)
    interval = 1.0 / args.fps
    try:
        with Publisher(args.url, args.token) as pub:
            if not pub.wait_connected(10):
                print(f"not connected yet ({pub.last_error}); publishing anyway, frames are dropped until it is",
                      file=sys.stderr)
            number = 0
            deadline = time.monotonic()
            last_report = deadline
            try:
                while not args.frames or number < args.frames:
                    pub.publish(pattern.render(number))  # never blocks: the newest frame waits if the link is slow
                    number += 1
                    now = time.monotonic()
                    if now - last_report >= 5:
                        last_report = now
                        print(f"frames: {pub.frames_sent} sent, {pub.frames_dropped} dropped; "
                              f"connected={pub.connected} active={pub.active}", file=sys.stderr)
                    deadline += interval
                    time.sleep(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                pass
        # Leaving the block sent the last frame (waiting at most 5 s for it).
    except PublishRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {pub.frames_sent} frames sent, {pub.frames_dropped} dropped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
