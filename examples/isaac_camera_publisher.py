"""Publish an Isaac Sim camera to vsproxy: the Replicator `rgb` annotator of a render product,
JPEG-encoded and pushed to a vsproxy `push` upstream with `vsproxy.publish.Publisher`.

REQUIRES ISAAC SIM (4.x or 5.x); it cannot run in a plain Python. Run it with Isaac Sim's Python,
after installing vsproxy's publisher dependencies into it (tornado and Pillow; numpy is there)::

    cd ~/isaacsim                                  # your Isaac Sim install
    ./python.sh -m pip install tornado pillow      # or: ./python.sh -m pip install /path/to/vsproxy
    export VSPROXY_PUBLISH_TOKEN=example-publish-token-0123
    PYTHONPATH=/path/to/vsproxy ./python.sh /path/to/vsproxy/examples/isaac_camera_publisher.py \\
        --url ws://VSPROXY_HOST:8889/ingest/replicator --camera /World/Robot/head_camera --usd scene.usd

vsproxy side (config.yaml)::

    upstreams:
      replicator: {kind: push, token: example-publish-token-0123}

Without --camera the script creates a camera looking at a small demo scene. The simulation keeps
its own pace: `publish_rgb` only copies the pixels (the JPEG encoding and the network happen on
the publisher's thread), and frames the network cannot take are dropped, newest kept. While no
vsproxy session uses the upstream the server says so (`pub.active is False`) and the script skips
reading the annotator.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Isaac Sim must be started before any omni.* import; a plain Python has neither.
try:
    try:
        from isaacsim import SimulationApp  # Isaac Sim 4.x and later
    except ImportError:
        from omni.isaac.kit import SimulationApp  # Isaac Sim 2023.1 and earlier
except ImportError:
    sys.exit(
        "isaac_camera_publisher.py needs Isaac Sim: run it with Isaac Sim's python.sh "
        "(see the top of this file, or examples/README.md). To try push streaming without Isaac Sim, "
        "run examples/publish_test_pattern.py instead."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Publish an Isaac Sim camera to a vsproxy push upstream")
    parser.add_argument("--url", default="ws://127.0.0.1:8889/ingest/replicator",
                        help="the push upstream's ingest URL (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("VSPROXY_PUBLISH_TOKEN", ""),
                        help="publish token (default: $VSPROXY_PUBLISH_TOKEN)")
    parser.add_argument("--camera", default="", help="prim path of an existing camera (default: create one)")
    parser.add_argument("--usd", default="", help="USD stage to open first (default: a small demo scene)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality 1-100")
    parser.add_argument("--fps", type=float, default=30.0, help="most frames per second to publish")
    parser.add_argument("--headless", action="store_true")
    parser.add_argument("--orchestrator-step", action="store_true",
                        help="render with rep.orchestrator.step() instead of simulation_app.update() "
                             "(for setups where Replicator captures only on step)")
    # Kit takes its own arguments too: keep the ones we do not know for it.
    args, _ = parser.parse_known_args()
    if not args.token:
        parser.error("no token: pass --token or set VSPROXY_PUBLISH_TOKEN")
    return args


def main() -> None:
    args = parse_args()
    simulation_app = SimulationApp({"headless": args.headless, "width": args.width, "height": args.height})

    # Only now can omni.* be imported.
    import omni.replicator.core as rep
    import omni.usd

    try:
        from vsproxy.publish import Publisher, PublishRefused
    except ImportError:  # a checkout next to this file, without `pip install`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from vsproxy.publish import Publisher, PublishRefused

    if args.usd:
        omni.usd.get_context().open_stage(args.usd)
        for _ in range(10):  # let the stage load
            simulation_app.update()
    else:
        rep.create.light(light_type="Dome", intensity=1000)
        rep.create.plane(scale=10)
        rep.create.cube(position=(0, 0, 0.5), scale=0.5)
        rep.create.sphere(position=(1.0, 0.5, 0.4), scale=0.4)

    camera = args.camera or rep.create.camera(position=(3.0, 3.0, 2.0), look_at=(0, 0, 0.3))
    render_product = rep.create.render_product(camera, (args.width, args.height))
    annotator = rep.AnnotatorRegistry.get_annotator("rgb")  # HxWx4 uint8 (RGBA)
    annotator.attach([render_product])

    interval = 1.0 / args.fps if args.fps > 0 else 0.0
    next_publish = 0.0
    refused = None
    try:
        with Publisher(args.url, args.token) as pub:
            print(f"publishing {args.width}x{args.height} to {pub.url}", flush=True)
            while simulation_app.is_running():
                if args.orchestrator_step:
                    rep.orchestrator.step(pause_timeline=False)
                else:
                    simulation_app.update()  # steps physics (if playing) and renders the render product
                now = time.monotonic()
                if pub.active is False or now < next_publish:
                    continue  # nobody is watching, or faster than --fps
                next_publish = now + interval
                rgba = annotator.get_data()
                if rgba is None or getattr(rgba, "size", 0) == 0:
                    continue  # the first frames of a render product are empty
                pub.publish_rgb(rgba, quality=args.quality)  # copies the pixels; never blocks
        # Leaving the block sent the last frame (waiting at most 5 s for it).
        print(f"published {pub.frames_sent} frames ({pub.frames_dropped} dropped)", flush=True)
    except PublishRefused as exc:  # a wrong token or URL: retrying would not help
        refused = exc
        print(f"error: {exc}", file=sys.stderr, flush=True)

    try:
        annotator.detach()
        render_product.destroy()
    except Exception as exc:  # older Replicator versions lack one or the other; the app closes anyway
        print(f"cleanup: {exc}", file=sys.stderr)
    simulation_app.close()
    if refused is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
