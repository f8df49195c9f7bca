"""Configuration: built-in defaults < config.yaml < .env < environment < CLI flags.

The schema lives in the dataclasses below (type, default, bounds); `config.yaml` at the top of
the repository documents every key and a test pins it to these defaults. Every error names the
key it is about and what was expected, so `vsproxy` can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .auth import redact_url


class ConfigError(Exception):
    """A configuration value is missing, unknown, mistyped or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _bounds(minimum: float | None = None, maximum: float | None = None, choices: tuple = ()) -> dict:
    return {"min": minimum, "max": maximum, "choices": choices}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = field(default=8889, metadata=_bounds(1, 65535))
    # Base URL the API uses for wsUrl/httpStreamUrl, e.g. "https://video.example.com".
    # Empty: built from the request's scheme and Host header.
    public_url: str = ""
    # Honour X-Forwarded-Proto / X-Forwarded-Host (only behind a reverse proxy you control).
    trust_proxy_headers: bool = False
    # Seconds a graceful shutdown waits for viewers to be told before the process exits.
    shutdown_timeout_seconds: float = field(default=3.0, metadata=_bounds(0, 60))
    # Serve /metrics on this port instead of the main one (0: on the main port).
    metrics_port: int = field(default=0, metadata=_bounds(0, 65535))


@dataclass(frozen=True)
class IsaacSimConfig:
    # Address of the Isaac Sim host. Empty: no Isaac Sim; sessions stream the built-in demo source.
    ip: str = ""
    port: int = field(default=8211, metadata=_bounds(1, 65535))
    ws_port: int = field(default=8211, metadata=_bounds(1, 65535))
    ws_path: str = "/"
    secure: bool = False  # wss:// instead of ws://
    headers: dict = field(default_factory=dict)  # extra handshake headers (str -> str)


@dataclass(frozen=True)
class DemoConfig:
    width: int = field(default=1280, metadata=_bounds(16, 7680))
    height: int = field(default=720, metadata=_bounds(16, 4320))
    fps: float = field(default=30.0, metadata=_bounds(0.1, 120))
    quality: int = field(default=80, metadata=_bounds(1, 100))


@dataclass(frozen=True)
class SessionsConfig:
    idle_timeout_seconds: float = field(default=300.0, metadata=_bounds(1, 86400 * 7))
    cleanup_interval_seconds: float = field(default=30.0, metadata=_bounds(0.05, 3600))


@dataclass(frozen=True)
class StreamingConfig:
    # Upstream connection stays open this long after its last session is destroyed.
    linger_seconds: float = field(default=30.0, metadata=_bounds(0, 3600))
    # A viewer that has not drained a single frame for this long is disconnected.
    stall_timeout_seconds: float = field(default=30.0, metadata=_bounds(0.1, 3600))
    # While the upstream is down, MJPEG and binary WebSocket viewers get an "offline" frame this often.
    offline_frame_interval_seconds: float = field(default=1.0, metadata=_bounds(0.1, 60))
    # Largest viewer -> upstream message relayed; bigger ones get an error message.
    max_viewer_message_bytes: int = field(default=65536, metadata=_bounds(16, 16 * 1024 * 1024))


@dataclass(frozen=True)
class ReconnectConfig:
    initial_delay_seconds: float = field(default=0.5, metadata=_bounds(0.01, 60))
    max_delay_seconds: float = field(default=10.0, metadata=_bounds(0.01, 3600))
    connect_timeout_seconds: float = field(default=5.0, metadata=_bounds(0.1, 120))
    ping_interval_seconds: float = field(default=10.0, metadata=_bounds(0, 3600))
    # An upstream that delivers no frame for this long counts as lost and is reconnected.
    frame_timeout_seconds: float = field(default=10.0, metadata=_bounds(0.1, 3600))
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata=_bounds(1024, 256 * 1024 * 1024))


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = field(default=100, metadata=_bounds(1, 1_000_000))
    max_sessions_per_user: int = field(default=20, metadata=_bounds(1, 1_000_000))
    max_viewers_per_session: int = field(default=50, metadata=_bounds(1, 100_000))
    max_body_bytes: int = field(default=65536, metadata=_bounds(64, 64 * 1024 * 1024))
    # POST /session/create per client address: a token bucket (per second, and burst).
    session_create_rate: float = field(default=2.0, metadata=_bounds(0.01, 10_000))
    session_create_burst: int = field(default=20, metadata=_bounds(1, 100_000))
    # Viewer -> upstream messages per viewer: a token bucket; beyond it an error, then close 1008.
    viewer_message_rate: float = field(default=100.0, metadata=_bounds(0.1, 100_000))
    viewer_message_burst: int = field(default=200, metadata=_bounds(1, 1_000_000))


@dataclass(frozen=True)
class CorsConfig:
    # Origins allowed to call the REST API and open WebSockets; "*" allows any (development only).
    allowed_origins: list = field(default_factory=lambda: ["http://localhost:3000"])


@dataclass(frozen=True)
class ViewerTokensConfig:
    enabled: bool = False
    secret: str = ""  # HMAC key, at least 32 characters when enabled
    ttl_seconds: float = field(default=3600.0, metadata=_bounds(10, 30 * 86400))


@dataclass(frozen=True)
class AuthConfig:
    # Bearer tokens for session management (/session/*, /sessions, /upstreams). Empty: open.
    api_tokens: list = field(default_factory=list)
    viewer_tokens: ViewerTokensConfig = field(default_factory=ViewerTokensConfig)
    # username -> password for HTTP Basic on /dashboard and its API. Empty: open.
    operators: dict = field(default_factory=dict)
    # Bearer token for /metrics. Empty: open (or use server.metrics_port to keep it off the main port).
    metrics_token: str = ""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""  # PEM certificate (chain); with key_file, serve HTTPS and WSS
    key_file: str = ""


@dataclass(frozen=True)
class SecurityConfig:
    # Who may frame the embed page (CSP frame-ancestors): the frontend that shows it.
    frame_ancestors: list = field(default_factory=lambda: ["'self'", "http://localhost:3000"])


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="info", metadata=_bounds(choices=("debug", "info", "warning", "error")))
    format: str = field(default="text", metadata=_bounds(choices=("text", "json")))


# -- named upstreams: `upstreams: {name: {kind: ..., ...}}`; `demo` settings are DemoConfig's ------

@dataclass(frozen=True)
class IsaacUpstream:
    """An Isaac Sim WebSocket stream (binary JPEG messages, or {"type": "frame", "data": base64})."""

    url: str = ""  # ws:// or wss://
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MjpegUpstream:
    """An HTTP(S) multipart/x-mixed-replace camera (ROS web_video_server, IP cameras)."""

    url: str = ""  # http:// or https://
    headers: dict = field(default_factory=dict)
    max_part_bytes: int = field(default=8 * 1024 * 1024, metadata=_bounds(1024, 256 * 1024 * 1024))


@dataclass(frozen=True)
class RtspUpstream:
    """An RTSP H.264/MJPEG stream (Isaac Sim's isaacsim.streaming.rtsp), re-encoded to JPEG."""

    url: str = ""  # rtsp:// or rtsps://
    transport: str = field(default="tcp", metadata=_bounds(choices=("tcp", "udp")))
    quality: int = field(default=80, metadata=_bounds(1, 100))
    max_width: int = field(default=1920, metadata=_bounds(16, 7680))
    max_height: int = field(default=1080, metadata=_bounds(16, 4320))


@dataclass(frozen=True)
class PushUpstream:
    """Frames published to vsproxy (WS /ingest/{name} or POST /ingest/{name}/frame) with a token."""

    token: str = ""
    max_frame_bytes: int = field(default=8 * 1024 * 1024, metadata=_bounds(1024, 256 * 1024 * 1024))


UPSTREAM_KINDS: dict[str, type] = {
    "demo": DemoConfig,
    "isaac": IsaacUpstream,
    "mjpeg": MjpegUpstream,
    "rtsp": RtspUpstream,
    "push": PushUpstream,
}
_URL_SCHEMES = {IsaacUpstream: ("ws://", "wss://"), MjpegUpstream: ("http://", "https://"),
                RtspUpstream: ("rtsp://", "rtsps://")}
UPSTREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    isaac_sim: IsaacSimConfig = field(default_factory=IsaacSimConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Named upstreams (name -> one of UPSTREAM_KINDS' settings), which robot uses which, and the
    # upstream of sessions that name neither. Empty: "isaac" if isaac_sim.ip is set, else "demo".
    upstreams: dict = field(default_factory=dict)
    robots: dict = field(default_factory=dict)
    default_upstream: str = ""

    def upstream_configs(self) -> tuple[dict[str, Any], str]:
        """Every upstream by name (the implicit "demo" and "isaac" ones included) and the default."""
        configs: dict[str, Any] = {"demo": self.demo}
        isaac_url = self.isaac_ws_url
        if isaac_url is not None:
            configs["isaac"] = IsaacUpstream(url=isaac_url, headers=self.isaac_sim.headers)
        configs.update(self.upstreams)  # a configured name wins over an implicit one
        default = self.default_upstream or ("isaac" if isaac_url is not None else "demo")
        return configs, default

    @property
    def isaac_ws_url(self) -> str | None:
        """The Isaac Sim WebSocket URL, or None when no Isaac Sim address is configured."""
        sim = self.isaac_sim
        if not sim.ip:
            return None
        scheme = "wss" if sim.secure else "ws"
        path = sim.ws_path if sim.ws_path.startswith("/") else "/" + sim.ws_path
        return f"{scheme}://{sim.ip}:{sim.ws_port}{path}"


# Environment variables of the original Node service (and a few more), mapped onto config keys.
ENV_KEYS: dict[str, str] = {
    "VIDEO_PROXY_PORT": "server.port",
    "VIDEO_PROXY_HOST": "server.host",
    "VIDEO_PROXY_PUBLIC_URL": "server.public_url",
    "ISAAC_SIM_IP": "isaac_sim.ip",
    "ISAAC_SIM_PORT": "isaac_sim.port",
    "ISAAC_SIM_WS_PORT": "isaac_sim.ws_port",
    "ISAAC_SIM_WS_PATH": "isaac_sim.ws_path",
}


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a .env file: KEY=VALUE lines, optional `export `, quotes, # comments."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{path}:{number}", "expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[name.strip()] = value
    return values


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _coerce_text(value: str, expected: type) -> Any:
    """Values from the environment and CLI arrive as text; YAML rules turn them into numbers/bools."""
    if expected is str:
        return value
    try:
        return yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return value


def _field_type(dotted: str) -> type:
    cls: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        cls = hints[part]
    return cls


def _expected(ftype: type, meta: Mapping) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list of strings", dict: "a mapping of strings"}
    text = names.get(ftype, ftype.__name__)
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        text += f" from {lo:g} to {hi:g}"
    return text


# Values of these keys are never echoed in errors: they may hold credentials.
_SECRET_KEYS = re.compile(r"secret|token|password|operators|headers|viewer_tokens|^auth$")



def _check_value(key: str, value: Any, ftype: type, meta: Mapping) -> Any:
    def bad() -> ConfigError:
        shown = f"a value of type {type(value).__name__}" if _SECRET_KEYS.search(key) else repr(value)
        return ConfigError(key, f"expected {_expected(ftype, meta)}, got {shown}")

    if ftype is bool:
        if not isinstance(value, bool):
            raise bad()
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
    elif ftype is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad()
    elif ftype is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
    elif ftype is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad()
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad()
    if meta.get("choices") and value not in meta["choices"]:
        raise bad()
    return value


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        shown = f"a value of type {type(data).__name__}" if _SECRET_KEYS.search(prefix) else repr(data)
        raise ConfigError(prefix or "config", f"expected a mapping, got {shown}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, "unknown key; expected one of " + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        ftype = hints[name]
        if cls is Config and name == "upstreams":
            kwargs[name] = _build_upstreams(data.get(name), key)
        elif dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, data.get(name), key)
        elif name in data:
            kwargs[name] = _check_value(key, data[name], ftype, f.metadata)
    return cls(**kwargs)


def _build_upstreams(data: Any, prefix: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of name -> {{kind: ...}}, got a {type(data).__name__}")
    upstreams = {}
    for name, entry in data.items():
        key = f"{prefix}.{name}"
        if not isinstance(name, str) or not UPSTREAM_NAME_RE.match(name):
            raise ConfigError(key, "upstream names are 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict) or entry.get("kind") not in UPSTREAM_KINDS:
            raise ConfigError(f"{key}.kind", "expected one of " + ", ".join(UPSTREAM_KINDS))
        cls = UPSTREAM_KINDS[entry["kind"]]
        settings = _build(cls, {k: v for k, v in entry.items() if k != "kind"}, key)
        schemes = _URL_SCHEMES.get(cls)
        if schemes and not settings.url.startswith(schemes):
            got = redact_url(settings.url)
            raise ConfigError(f"{key}.url", f"expected a {' or '.join(schemes)} URL, got {got!r}")
        if cls is PushUpstream and len(settings.token) < 8:
            raise ConfigError(f"{key}.token", "expected a publish token of at least 8 characters")
        upstreams[name] = settings
    return upstreams


def _cross_checks(config: Config) -> None:
    rc = config.reconnect
    if rc.max_delay_seconds < rc.initial_delay_seconds:
        raise ConfigError("reconnect.max_delay_seconds", "must be at least reconnect.initial_delay_seconds")
    url = config.server.public_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError("server.public_url", f"expected an http:// or https:// URL, got {url!r}")
    auth = config.auth
    for i, token in enumerate(auth.api_tokens):
        if len(token) < 16:
            raise ConfigError(f"auth.api_tokens[{i}]", "expected a token of at least 16 characters")
    if auth.viewer_tokens.enabled and len(auth.viewer_tokens.secret) < 32:
        raise ConfigError("auth.viewer_tokens.secret", "expected a secret of at least 32 characters when enabled")
    if auth.metrics_token and len(auth.metrics_token) < 16:
        raise ConfigError("auth.metrics_token", "expected a token of at least 16 characters")
    for user, password in auth.operators.items():
        if not user or ":" in user or len(password) < 8:
            raise ConfigError(f"auth.operators.{user}",
                              "expected a user name without ':' and a password of 8+ characters")
    tls = config.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("tls", "set both cert_file and key_file, or neither")
    for key in ("cert_file", "key_file"):
        path = getattr(tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"tls.{key}", f"file {path!r} does not exist")
    for source in config.security.frame_ancestors:
        if not re.fullmatch(r"'self'|'none'|\*|https?://[^\s;,]+", source):
            raise ConfigError("security.frame_ancestors", f"expected 'self', 'none' or http(s) origins, got {source!r}")
    names, default = config.upstream_configs()
    if default not in names:
        raise ConfigError("default_upstream", f"{default!r} is not a configured upstream")
    for robot, upstream in config.robots.items():
        if upstream not in names:
            raise ConfigError(f"robots.{robot}", f"{upstream!r} is not a configured upstream")
    for origin in config.cors.allowed_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError("cors.allowed_origins", f'expected origins like http://host:port or "*", got {origin!r}')


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the configuration.

    `path`: a YAML file; None means `./config.yaml` if it exists, else the built-in defaults.
    `environ`: the environment (default `os.environ`); `dotenv_path`: a .env file read if present.
    `overrides`: dotted keys from CLI flags, e.g. {"server.port": 9000}; they win over everything.
    """
    tree: dict = {}
    if path is None:
        if Path("config.yaml").is_file():
            path = "config.yaml"
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError("--config", f"config file {str(file)!r} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark else str(file)
            raise ConfigError(where, f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(file), "expected a YAML mapping at the top level")
        tree = loaded or {}

    origins: dict[str, str] = {}  # dotted key -> the variable that set it, for error messages
    env_layers: list[tuple[str, Mapping[str, str]]] = []
    if dotenv_path is not None and Path(dotenv_path).is_file():
        env_layers.append((str(dotenv_path), read_dotenv(Path(dotenv_path))))
    env_layers.append(("environment", os.environ if environ is None else environ))
    for source, values in env_layers:
        for var, dotted in ENV_KEYS.items():
            # Empty counts as unset, as `process.env.X || default` did in the original service.
            if values.get(var, "").strip():
                _set_dotted(tree, dotted, _coerce_text(values[var], _field_type(dotted)))
                origins[dotted] = f"{var} ({source})"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
            origins.pop(dotted, None)
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        if exc.key in origins:
            raise ConfigError(f"{exc.key} (from {origins[exc.key]})", exc.problem) from None
        raise


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Validate a parsed config tree (the YAML's shape) into a Config."""
    config = _build(Config, dict(tree), "")
    _cross_checks(config)
    return config
