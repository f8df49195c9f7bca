"""Command line: `vsproxy` serves; `vsproxy check` checks the configuration; `vsproxy simulate` runs a
simulated Isaac Sim upstream."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import signal
import ssl
import sys
from collections.abc import Callable

from . import __version__
from .config import ConfigError, load_config
from .logs import configure_logging
from .schema import number_text
from .sources.demo import DemoConfig

log = logging.getLogger("vsproxy")

LOG_LEVELS = ("debug", "info", "warning", "error")
DEMO_FIELDS = {f.name: f for f in dataclasses.fields(DemoConfig)}


def _in_range(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) from `low` to `high`, else the usage error."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (low <= value <= high) or value != value:  # NaN is in no range
            raise argparse.ArgumentTypeError(f"expected {number_text(low)} to {number_text(high)}, got {text}")
        return value
    return parse


def _serving_flags(parser: argparse.ArgumentParser, default: object = None) -> None:
    """The flags that configure serving: on `vsproxy` itself, and again (default SUPPRESS, so one
    before the command is not reset) on `vsproxy check`, which loads the configuration as serving does."""
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="YAML config file (default: ./config.yaml if present, else built-in defaults)")
    parser.add_argument("--host", default=default, help="address to listen on (server.host, default "
                                                        "127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=default, help="port to listen on (server.port, default 8889)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, help="logging.level (default info)")
    parser.add_argument("--log-format", choices=("text", "json"), default=default,
                        help="logging.format (default text)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsproxy",
        description="Video stream proxy for robot simulators: one upstream connection, many browser viewers.",
        epilog="Precedence: command-line flags > environment > .env > config file > built-in defaults.",
    )
    parser.add_argument("--version", action="version", version=f"vsproxy {__version__}")
    _serving_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="{check,simulate}")
    check = commands.add_parser(
        "check", help="check the configuration and exit (0: good, 2: a configuration error)",
        description="Load the configuration as `vsproxy` would (flags, environment, .env, config file), "
                    "open the session store and load the TLS certificate, then print what it would serve "
                    "and exit without listening: 0 if it would start, 2 with the one-line configuration "
                    "error if not. No secret is printed, and nothing is contacted (upstreams, Redis).",
        epilog="Example: vsproxy check --config /etc/vsproxy/config.yaml --port 8890")
    _serving_flags(check, argparse.SUPPRESS)
    sim = commands.add_parser(
        "simulate", help="run a simulated Isaac Sim WebSocket server",
        description="A stand-in for Isaac Sim's WebSocket stream, for work without a GPU host: serves a "
                    "WebSocket on every path, sends a moving test pattern as binary JPEG messages to each "
                    "client and logs what clients send. Point vsproxy at it with isaac_sim.ip/ws_port or an "
                    "isaac upstream (url ws://HOST:PORT/).",
        epilog="Example: vsproxy simulate --port 8211 & ISAAC_SIM_IP=127.0.0.1 vsproxy")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sim.add_argument("--port", type=_in_range(int, 0, 65535), default=8211,
                     help="port to listen on, 0 for a free one, which the log names (default 8211)")
    # The picture's bounds are the demo source's (the same test pattern).
    for name, kind, unit in (("width", int, "frame width in pixels"), ("height", int, "frame height in pixels"),
                             ("fps", float, "frames per second sent to each client")):
        meta = DEMO_FIELDS[name].metadata
        sim.add_argument(f"--{name}", type=_in_range(kind, meta["min"], meta["max"]), default=DEMO_FIELDS[name].default,
                         help=f"{unit}, {number_text(meta['min'])} to {number_text(meta['max'])} "
                              f"(default {number_text(DEMO_FIELDS[name].default)})")
    sim.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log level (default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        configure_logging(args.log_level, "text")
        return asyncio.run(_simulate(args))
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "logging.level": args.log_level,
        "logging.format": args.log_format,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"vsproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return _check(config)
    configure_logging(config.logging.level, config.logging.format)
    return asyncio.run(_serve(config))


def _tls_problem(config) -> str | None:  # noqa: ANN001 - Config
    """The configuration error of a TLS certificate and key that cannot be loaded, else None."""
    from .app import ssl_context

    try:
        ssl_context(config)
    except ssl.SSLError as exc:
        return ("tls.cert_file/tls.key_file: cannot load them as a PEM certificate and its private key "
                f"({exc.reason or exc}; the key must belong to the certificate)")
    except OSError as exc:  # vanished or unreadable since the configuration was checked
        return f"tls.cert_file/tls.key_file: cannot read them ({exc.strerror or exc})"
    return None


def _exposure_warning(hosts: list[str], config) -> str | None:  # noqa: ANN001 - Config
    """The warning for listening beyond this machine without API tokens, None if it does not apply."""
    from .server import is_loopback

    exposed = [host for host in hosts if not is_loopback(host)]
    if not exposed or config.auth.api_tokens:
        return None
    return (f"listening on {', '.join(exposed)}, beyond this machine, with auth.api_tokens empty: anyone who "
            "can reach it can create sessions and send input to the simulator (set auth.api_tokens, or "
            "--host 127.0.0.1)")


def _check(config) -> int:  # noqa: ANN001 - Config, imported lazily with the app
    """`vsproxy check`: what start-up checks before it listens, without listening or contacting
    anything; a summary on stdout (no secrets: URLs without credentials or query)."""
    from .auth import redact_url
    from .server import url_for
    from .sources import kind_of
    from .store import open_store

    try:
        store = open_store(config.sessions.store)
        stored = store.load()
        asyncio.run(store.close())
    except ConfigError as exc:
        print(f"vsproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    problem = _tls_problem(config)
    if problem is not None:
        print(f"vsproxy: configuration error: {problem}", file=sys.stderr)
        return 2
    server, auth = config.server, config.auth
    scheme = "https" if config.tls.cert_file else "http"
    upstreams, default = config.upstream_configs()
    lines = [f"listen: {url_for(scheme, server.host, server.port)}"
             + (f", /metrics on port {server.metrics_port}" if server.metrics_port else "")]
    for name, settings in upstreams.items():
        url = getattr(settings, "url", "")
        lines.append(f"upstream {name}: {kind_of(settings)}" + (f" {redact_url(url)}" if url else "")
                     + (" (default)" if name == default else ""))
    if config.cluster.redis_url:
        from .cluster.node import node_identity

        node_id, advertise_url = node_identity(config)
        lines.append("sessions: in Redis (the cluster's)")
        lines.append(f"cluster: node {node_id}, reached by the others at {advertise_url}; "
                     f"Redis {redact_url(config.cluster.redis_url)}")
    else:
        lines.append(f"sessions: {config.sessions.store} ({len(stored.records)} stored)")
        lines.append("cluster: off (one node)")
    lines.append(f"API tokens: {len(auth.api_tokens) or 'none'}; viewer tokens: "
                 + ("on" if auth.viewer_tokens.enabled else "off"))
    print("vsproxy: configuration OK")
    for line in lines:
        print(f"  {line}")
    warning = _exposure_warning([server.host], config)
    if warning is not None:
        print(f"  warning: {warning}")
    return 0


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one log line for a port that cannot be bound; a busy one says what to do."""
    line = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        line += " (another process, perhaps another vsproxy, has it: choose another port with --port)"
    return line


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve(config) -> int:  # noqa: ANN001 - Config, imported lazily with the app
    from .app import Proxy
    from .server import raise_open_file_limit, url_for

    raise_open_file_limit(config.limits.max_connections)
    problem = _tls_problem(config)  # as every configuration error: one line naming the keys, exit 2
    if problem is not None:
        print(f"vsproxy: configuration error: {problem}", file=sys.stderr)
        return 2
    try:
        proxy = Proxy(config)  # opens the session store: an unusable one is a configuration error
    except ConfigError as exc:
        print(f"vsproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    host, port = config.server.host, config.server.port
    try:
        server = proxy.listen(port, address=host)
    except OSError as exc:
        log.error("%s", _cannot_listen(host, port, exc))
        return 1
    addresses = server.addresses()
    default = config.upstream_configs()[1]
    upstream = f"{default} (built-in demo source)" if default == "demo" else default
    scheme = "https" if config.tls.cert_file else "http"
    urls = ", ".join(url_for(scheme, bound_host, bound_port) for bound_host, bound_port in addresses)
    log.info("vsproxy %s listening on %s (upstream: %s)", __version__, urls, upstream)
    warning = _exposure_warning([bound_host for bound_host, _ in addresses], config)
    if warning is not None:
        log.warning("%s", warning)
    await _wait_for_signal()
    log.info("shutting down")
    await proxy.shutdown()
    log.info("stopped")
    return 0


async def _simulate(args: argparse.Namespace) -> int:
    from .simulate import SimulatedIsaacSim

    sim = SimulatedIsaacSim(width=args.width, height=args.height, fps=args.fps)
    try:
        sim.listen(args.port, address=args.host)
    except OSError as exc:
        log.error("%s", _cannot_listen(args.host, args.port, exc))
        return 1
    await _wait_for_signal()
    await sim.stop()
    return 0
