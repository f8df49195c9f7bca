"""Configuration: built-in defaults < config.yaml < .env < environment < CLI flags.

The schema lives in the dataclasses below (type, default, bounds); `config.yaml` at the top of
the repository documents every key and a test pins it to these defaults. Every error names the
key it is about and what was expected, so `vsproxy` can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import sources
from .auth import redact_url
from .codec.encoder import H264Config
from .schema import ConfigError, check_headers, check_not_placeholder, header_problem, number_text, setting
from .sources.demo import DemoConfig
from .sources.isaac import IsaacUpstream

# server.host values that mean "every interface".
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class ServerConfig:
    """Where and how vsproxy listens."""

    host: str = setting("127.0.0.1", doc="address to listen on (flag --host, env VIDEO_PROXY_HOST); "
                                         "`0.0.0.0` or `::` for every interface (then set auth.api_tokens)")
    port: int = setting(8889, min=1, max=65535, doc="port to listen on (flag --port, env VIDEO_PROXY_PORT)")
    public_url: str = setting("", doc="base URL of wsUrl/httpStreamUrl, e.g. `https://video.example.com`; "
                                      "empty: from the request's scheme and Host")
    trust_proxy_headers: bool = setting(False, doc="honour X-Forwarded-Proto/-Host/-For (only behind a "
                                                   "reverse proxy you control)")
    allowed_hosts: list = setting(factory=list, doc="more host names (no port) clients may reach vsproxy by, "
                                  "besides `localhost`, `127.0.0.1`, `::1`, `host` unless a wildcard and "
                                  "public_url's host; any other `Host` gets 421 (DNS rebinding), except on "
                                  "/health and /metrics; `\"*\"`: any")
    shutdown_timeout_seconds: float = setting(3.0, min=0, max=60, doc="how long a graceful shutdown waits "
                                                                      "for open connections to close")
    metrics_port: int = setting(0, min=0, max=65535, doc="serve /metrics on this port instead; 0: on the "
                                                         "main port")
    header_timeout_seconds: float = setting(20.0, min=0.1, max=60, doc="a new connection's first request line "
                                            "and headers must arrive within this long; slower clients are "
                                            "disconnected")
    idle_timeout_seconds: float = setting(60.0, min=0.1, max=3600, doc="a keep-alive connection whose next "
                                          "request has not fully arrived this long after the previous "
                                          "response is closed")
    body_timeout_seconds: float = setting(60.0, min=0.1, max=3600, doc="a request body must arrive within "
                                          "this long; the connection is closed otherwise")
    max_header_bytes: int = setting(65536, min=1024, max=1024 * 1024, doc="largest request line plus headers; "
                                    "431 beyond (414 when the request line alone is too long)")
    max_url_bytes: int = setting(8192, min=256, max=1024 * 1024, doc="longest request target (path and "
                                 "query); 414 beyond")


@dataclass(frozen=True)
class IsaacSimConfig:
    """The implicit `isaac` upstream of the original service."""

    ip: str = setting("", doc="Isaac Sim host (env ISAAC_SIM_IP); empty: sessions stream the built-in "
                              "demo source")
    port: int = setting(8211, min=1, max=65535, doc="Isaac Sim HTTP port, reported by /health (env "
                                                    "ISAAC_SIM_PORT)")
    ws_port: int = setting(8211, min=1, max=65535, doc="port of the upstream `ws://{ip}:{ws_port}{ws_path}` "
                                                       "(env ISAAC_SIM_WS_PORT)")
    ws_path: str = setting("/", doc="path of that WebSocket (env ISAAC_SIM_WS_PATH)")
    secure: bool = setting(False, doc="connect with `wss://` instead of `ws://`")
    headers: dict = setting(factory=dict, doc="extra handshake headers, e.g. Authorization (never logged); a "
                                            "line break or NUL in one is refused (a YAML block scalar keeps its last "
                                            "line break unless chomped with `-`)")


@dataclass(frozen=True)
class SessionsConfig:
    """Session lifetime."""

    idle_timeout_seconds: float = setting(300.0, min=1, max=86400 * 7, doc="sessions without viewers idle "
                                                                           "this long are destroyed")
    cleanup_interval_seconds: float = setting(30.0, min=0.05, max=3600, doc="how often to look for them")
    store: str = setting("memory", values="`memory`, `sqlite:PATH`", doc="where sessions are kept: `memory` "
                         "(a restart forgets them) or a SQLite file that keeps them across restarts (see "
                         "Sessions that survive a restart)")
    activity_flush_seconds: float = setting(5.0, min=0.05, max=300, doc="with a `sqlite:` store, sessions' "
                                            "last activity is written at most this often (and at shutdown)")


@dataclass(frozen=True)
class StreamingConfig:
    """Fan-out to viewers."""

    linger_seconds: float = setting(30.0, min=0, max=3600, doc="an upstream stays connected this long "
                                                               "after its last session")
    stall_timeout_seconds: float = setting(30.0, min=0.1, max=3600, doc="a viewer (or dashboard event "
                                           "stream) that takes nothing this long is disconnected")
    offline_frame_interval_seconds: float = setting(1.0, min=0.1, max=60, doc="how often MJPEG and binary "
                                                    "WebSocket viewers get the offline picture while the "
                                                    "upstream is down")
    max_viewer_message_bytes: int = setting(65536, min=16, max=16 * 1024 * 1024, doc="largest viewer "
                                            "message relayed upstream; a larger one closes the viewer's "
                                            "WebSocket with 1009")
    max_unread_text_bytes: int = setting(64 * 1024 * 1024, min=65536, max=1 << 40, doc="text (statuses, "
                                         "upstream telemetry) written to viewers and not yet taken by "
                                         "their sockets, all viewers together; beyond it a viewer with "
                                         "more than 64 KiB unread misses text until it reads (each "
                                         "viewer also has 1 MiB of its own)")


@dataclass(frozen=True)
class ReconnectConfig:
    """Upstream connections: exponential backoff with jitter, timeouts."""

    initial_delay_seconds: float = setting(0.5, min=0.01, max=60, doc="first retry delay, doubled per "
                                                                      "failure")
    max_delay_seconds: float = setting(10.0, min=0.01, max=3600, doc="largest retry delay")
    probe_interval_seconds: float = setting(
        1.0, min=0, max=60, values="0 (off), or 0.1 to 60",
        doc="while an isaac, mjpeg or rtsp upstream is down, its host:port is tried this often (a bare TCP "
            "connect) and a retry delay ends when it accepts (0: off; see Upstreams)")
    connect_timeout_seconds: float = setting(5.0, min=0.1, max=120, doc="connecting an upstream gives up "
                                                                        "after this long")
    ping_interval_seconds: float = setting(10.0, min=0, max=3600, doc="WebSocket pings to the upstream "
                                                                      "(0: none)")
    frame_timeout_seconds: float = setting(10.0, min=0.1, max=3600, doc="an upstream that sends no frame "
                                                                        "this long counts as lost")
    max_message_bytes: int = setting(16 * 1024 * 1024, min=1024, max=256 * 1024 * 1024, doc="largest "
                                     "upstream WebSocket message accepted")


@dataclass(frozen=True)
class LimitsConfig:
    """Limits on what clients may make the proxy do."""

    max_connections: int = setting(4096, min=1, max=1_000_000, doc="open client connections, viewers "
                                   "included (a WebRTC peer counts as one; a WHEP offer beyond: 503); more are "
                                   "closed at once (keep it below the open-file limit)")
    max_sessions: int = setting(100, min=1, max=1_000_000, doc="sessions in all; 503 beyond")
    max_sessions_per_user: int = setting(20, min=1, max=1_000_000, doc="sessions per userId; 429 beyond")
    max_viewers_per_session: int = setting(50, min=1, max=100_000, doc="viewers per session (in a cluster: "
                                           "on all nodes together); 503 or WebSocket close 1013 beyond")
    max_body_bytes: int = setting(65536, min=64, max=64 * 1024 * 1024, doc="largest JSON request body; "
                                                                           "413 beyond")
    session_create_rate: float = setting(2.0, min=0.01, max=10_000, doc="POST /session/create per client "
                                                                        "address per second; 429 with "
                                                                        "Retry-After beyond")
    session_create_burst: int = setting(20, min=1, max=100_000, doc="burst of those")
    viewer_message_rate: float = setting(100.0, min=0.1, max=100_000, doc="viewer messages per viewer per "
                                                                          "second; an error, then close "
                                                                          "1008 beyond")
    viewer_message_burst: int = setting(200, min=1, max=1_000_000, doc="burst of those")
    max_dashboard_clients: int = setting(32, min=1, max=10_000, doc="open dashboard event streams "
                                         "(`/dashboard/api/events`); 503 beyond")
    viewer_input_bytes_rate: int = setting(65536, min=16, max=1 << 30, doc="bytes of viewer messages per "
                                           "viewer per second; an error, then close 1008 beyond")
    viewer_input_bytes_burst: int = setting(262144, min=16, max=1 << 30, doc="burst of those; at least "
                                            "streaming.max_viewer_message_bytes")


@dataclass(frozen=True)
class CorsConfig:
    """Browser origins."""

    allowed_origins: list = setting(factory=lambda: ["http://localhost:3000"], doc="origins allowed to "
                                    "call the REST API and open WebSockets; `\"*\"` for any (development "
                                    "only)")


@dataclass(frozen=True)
class ViewerTokensConfig:
    """Signed, expiring viewer tokens."""

    enabled: bool = setting(False, doc="POST /session/create returns a `viewerToken`; stream and embed "
                                       "URLs need it")
    secret: str = setting("", doc="HMAC key, 32+ random characters when enabled")
    ttl_seconds: float = setting(3600.0, min=10, max=30 * 86400, doc="how long a viewer token is valid; "
                                                                  "its viewers are closed when it expires")


@dataclass(frozen=True)
class AuthConfig:
    """Credentials (see Security)."""

    api_tokens: list = setting(factory=list, doc="Bearer tokens (16+ characters) for /session/*, "
                                                 "/sessions, /upstreams; empty: open")
    viewer_tokens: ViewerTokensConfig = field(default_factory=ViewerTokensConfig)
    operators: dict = setting(factory=dict, doc="user -> password (8+ characters), HTTP Basic for "
                                                "/dashboard; empty: open")
    metrics_token: str = setting("", doc="Bearer token (16+ characters) for /metrics; empty: open")


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS and WSS served by vsproxy itself."""

    cert_file: str = setting("", doc="PEM certificate (chain); with key_file, serve HTTPS and WSS")
    key_file: str = setting("", doc="PEM private key")


@dataclass(frozen=True)
class SecurityConfig:
    """Browser security headers."""

    frame_ancestors: list = setting(factory=lambda: ["'self'", "http://localhost:3000"], doc="who may "
                                    "frame the embed page (CSP frame-ancestors): your frontend's origin")


@dataclass(frozen=True)
class LoggingConfig:
    """Logs."""

    level: str = setting("info", choices=("debug", "info", "warning", "error"), doc="flag --log-level")
    format: str = setting("text", choices=("text", "json"), doc="`json`: one JSON object per line (flag "
                                                               "--log-format)")


@dataclass(frozen=True)
class WebRtcConfig:
    """WebRTC playback over WHEP (POST /stream/{id}/whep)."""

    enabled: bool = setting(True, doc="serve WHEP; `false`: the endpoint answers 501")
    ice_servers: list = setting(factory=list, item_keys=("urls", "username", "credential"),
                                values="list of `{urls, username, credential}`",
                                doc="STUN/TURN servers (`stun:`, `turn:`, `turns:` URLs of a host name or "
                                    "IPv4 address: aiortc takes no IPv6 one) the server uses and announces "
                                    "to WHEP clients (`Link` headers, so no line break or `\"` in a "
                                    "credential); behind NAT a TURN server, e.g. coturn (see WebRTC)")


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes sharing sessions and upstreams through Redis (see Running a cluster)."""

    redis_url: str = setting("", doc="`redis://[:password@]host:port/db` (or `rediss://`) of the Redis the nodes "
                             "share (env VSPROXY_REDIS_URL); empty: a single node, sessions in this process")
    node_id: str = setting("", doc="this node's name in the cluster, unique (env VSPROXY_NODE_ID); empty: the "
                           "`host:port` of `cluster.advertise_url`")
    advertise_url: str = setting("", doc="base URL the other nodes reach this one at (env VSPROXY_ADVERTISE_URL), e.g. "
                                 "`http://10.0.0.5:8889`; empty: `http://<server.host>:<server.port>`; required "
                                 "where `server.host` is a wildcard (`0.0.0.0`, `::`)")
    token: str = setting("", doc="shared secret the nodes authenticate to each other with (16+ characters; "
                         "required with redis_url; never logged; env VSPROXY_CLUSTER_TOKEN)")


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    h264: H264Config = field(default_factory=H264Config)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    upstreams: dict = setting(factory=dict, values="name -> `{kind: ..., ...}`",
                              doc="named upstreams (the keys of each kind are listed below)")
    robots: dict = setting(factory=dict, doc="robotName -> upstream name")
    default_upstream: str = setting("", doc="upstream of sessions that name none; empty: `isaac` if "
                                            "isaac_sim.ip is set, else `demo`")
    # Filled from `upstreams.<name>.h264` (no key of its own): upstream name -> its encoder settings.
    h264_upstreams: dict = field(default_factory=dict, metadata={"internal": True})

    def h264_for(self, upstream: str) -> H264Config:
        """The H.264 encoder settings of an upstream: `h264`, changed by its own `h264` keys."""
        return self.h264_upstreams.get(upstream, self.h264)

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
        host = f"[{sim.ip}]" if ":" in sim.ip and not sim.ip.startswith("[") else sim.ip  # an IPv6 address
        return f"{scheme}://{host}:{sim.ws_port}{path}"


# Environment variables of the original Node service (and a few more), mapped onto config keys.
ENV_KEYS: dict[str, str] = {
    "VIDEO_PROXY_PORT": "server.port",
    "VIDEO_PROXY_HOST": "server.host",
    "VIDEO_PROXY_PUBLIC_URL": "server.public_url",
    "ISAAC_SIM_IP": "isaac_sim.ip",
    "ISAAC_SIM_PORT": "isaac_sim.port",
    "ISAAC_SIM_WS_PORT": "isaac_sim.ws_port",
    "ISAAC_SIM_WS_PATH": "isaac_sim.ws_path",
    "VSPROXY_REDIS_URL": "cluster.redis_url",
    # Per node in a container deployment (deploy/docker-compose.yml); the token from an env file.
    "VSPROXY_NODE_ID": "cluster.node_id",
    "VSPROXY_ADVERTISE_URL": "cluster.advertise_url",
    "VSPROXY_CLUSTER_TOKEN": "cluster.token",
}


def read_text(path: Path) -> str:
    """A config or .env file's text; a ConfigError naming the path (and line) when it is not a
    readable UTF-8 file, so the command line reports it in one line like any other config error."""
    if not path.is_file():  # a directory, or a FIFO that would block start-up
        raise ConfigError(str(path), "is a directory, not a file" if path.is_dir() else "is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


# A quoted .env value, optionally followed by a comment: `"value"  # comment`, `"value"#comment`.
_DOTENV_QUOTED = re.compile(r"""(['"])(.*?)\1(?:\s*#.*)?""")
_DOTENV_COMMENT = re.compile(r"\s#")  # after an unquoted value: whitespace, then `#` (`a#b` is a value)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a .env file: KEY=VALUE lines, optional `export `, quotes, # comments."""
    values: dict[str, str] = {}
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{path}:{number}", "expected KEY=VALUE")
        value = value.strip()
        quoted = _DOTENV_QUOTED.fullmatch(value)
        if quoted:
            value = quoted.group(2)
        else:
            value = _DOTENV_COMMENT.split(value, 1)[0].rstrip()
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last,
    so a setting written twice silently lost its first value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_at: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, then keys that override them
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = first_at.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is set twice, first on line {line + 1}", key_node.start_mark)
        return super().construct_mapping(node, deep)


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
    if ftype is list and meta.get("item_keys"):
        keys = meta["item_keys"]
        text = f"a list of mappings with the key {keys[0]} (and optionally {', '.join(keys[1:])})"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        text += f" from {number_text(lo)} to {number_text(hi)}"
    return text


# Values of these keys are never echoed in errors: they may hold credentials.
_SECRET_KEYS = re.compile(r"secret|token|password|operators|headers|viewer_tokens|^auth$|ice_servers|credential")



def _is_item(item: Any, keys: tuple[str, ...]) -> bool:
    """Is `item` one mapping of a list-of-mappings key: only `keys`, the first of them present,
    each value a string or a list of strings?"""
    def text(v: Any) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
    return (isinstance(item, dict) and keys[0] in item and set(item) <= set(keys)
            and all(text(v) for v in item.values()))


def _check_value(key: str, value: Any, ftype: type, meta: Mapping) -> Any:
    given = value  # as written (a number's bounds are checked on its float)
    # Shown unless it may be a secret: a value under a key that names one, except a number or
    # true/false for a key that holds one (auth.viewer_tokens.ttl_seconds, not .secret).
    hidden = bool(_SECRET_KEYS.search(key)) and not (
        ftype in (bool, int, float) and isinstance(given, (bool, int, float))
        and not _SECRET_KEYS.search(key.rsplit(".", 1)[-1]))

    def bad() -> ConfigError:
        shown = f"a value of type {type(given).__name__}" if hidden else repr(given)
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
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            raise bad() from None
        # NaN and infinity are refused whatever the bounds: NaN compares false with both of them
        # (a NaN timer interval, expiry or timeout breaks whatever uses it).
        if not math.isfinite(number):
            raise bad()
        value = number
    elif ftype is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad()
    elif ftype is list and meta.get("item_keys"):
        if value is None:
            value = []
        if not isinstance(value, list) or not all(_is_item(v, meta["item_keys"]) for v in value):
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
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, "unknown key; expected one of " + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        ftype = hints[name]
        if cls is Config and name == "upstreams":
            kwargs[name], kwargs["h264_upstreams"] = _build_upstreams(data.get(name), key, kwargs["h264"])
        elif dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, data.get(name), key)
        elif name in data:
            kwargs[name] = _check_value(key, data[name], ftype, f.metadata)
    return cls(**kwargs)


def _build_upstreams(data: Any, prefix: str, h264: H264Config) -> tuple[dict[str, Any], dict[str, H264Config]]:
    """The upstreams' settings by name, and the H.264 settings of those that override `h264`."""
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of name -> {{kind: ...}}, got a {type(data).__name__}")
    upstreams, encoders = {}, {}
    for name, entry in data.items():
        key = f"{prefix}.{name}"
        if not isinstance(name, str) or not UPSTREAM_NAME_RE.match(name):
            raise ConfigError(key, "upstream names are 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict) or entry.get("kind") not in sources.KINDS:
            raise ConfigError(f"{key}.kind", "expected one of " + ", ".join(sources.KINDS))
        source = sources.source_class(entry["kind"])
        if "h264" in entry:  # this upstream's H.264 encoder: the top-level h264 keys it changes
            given = entry["h264"] if isinstance(entry["h264"], dict) else {}
            built = _build(H264Config, entry["h264"], f"{key}.h264")
            encoders[name] = dataclasses.replace(h264, **{k: getattr(built, k) for k in given})
        settings = _build(source.settings_class, {k: v for k, v in entry.items() if k not in ("kind", "h264")}, key)
        if source.url_schemes:  # parsed now, not when the source first connects (or is built, at start-up)
            check_url(f"{key}.url", settings.url, source.url_schemes)
        source.check_settings(settings, key)
        upstreams[name] = settings
    return upstreams, encoders


def _cross_checks(config: Config) -> None:
    rc = config.reconnect
    if rc.max_delay_seconds < rc.initial_delay_seconds:
        raise ConfigError("reconnect.max_delay_seconds", "must be at least reconnect.initial_delay_seconds")
    if 0 < rc.probe_interval_seconds < 0.1:  # a probe every few ms would hammer a host that is down
        raise ConfigError("reconnect.probe_interval_seconds", f"expected 0 (off) or 0.1 to 60, got "
                                                              f"{rc.probe_interval_seconds:g}")
    if config.limits.viewer_input_bytes_burst < config.streaming.max_viewer_message_bytes:
        # Otherwise a message the size limit allows could never pass the byte rate limit.
        raise ConfigError("limits.viewer_input_bytes_burst", "must be at least streaming.max_viewer_message_bytes")
    check_headers("isaac_sim.headers", config.isaac_sim.headers)
    if config.isaac_ws_url is not None:
        check_url("isaac_sim.ip", config.isaac_ws_url, ("ws://", "wss://"))
    if config.server.public_url:
        check_url("server.public_url", config.server.public_url, ("http://", "https://"))
    _check_ice_servers(config.webrtc.ice_servers)
    auth = config.auth
    for i, token in enumerate(auth.api_tokens):
        check_not_placeholder(f"auth.api_tokens[{i}]", token)
        if len(token) < 16:
            raise ConfigError(f"auth.api_tokens[{i}]", "expected a token of at least 16 characters")
    check_not_placeholder("auth.viewer_tokens.secret", auth.viewer_tokens.secret)
    if auth.viewer_tokens.enabled and len(auth.viewer_tokens.secret) < 32:
        raise ConfigError("auth.viewer_tokens.secret", "expected a secret of at least 32 characters when enabled")
    check_not_placeholder("auth.metrics_token", auth.metrics_token)
    if auth.metrics_token and len(auth.metrics_token) < 16:
        raise ConfigError("auth.metrics_token", "expected a token of at least 16 characters")
    for user, password in auth.operators.items():
        check_not_placeholder(f"auth.operators.{user}", password)
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
    store = config.sessions.store
    if store != "memory" and not (store.startswith("sqlite:") and store.removeprefix("sqlite:").strip()):
        raise ConfigError("sessions.store", f"expected memory or sqlite:PATH, got {store!r}")
    _check_cluster(config)
    names, default = config.upstream_configs()
    if default not in names:
        raise ConfigError("default_upstream", f"{default!r} is not a configured upstream")
    for robot, upstream in config.robots.items():
        if upstream not in names:
            raise ConfigError(f"robots.{robot}", f"{upstream!r} is not a configured upstream")
    for host in config.server.allowed_hosts:
        if not valid_allowed_host(host):
            raise ConfigError("server.allowed_hosts",
                              f'expected host names or addresses without scheme or port, or "*", got {host!r}')
    for origin in config.cors.allowed_origins:
        problem = origin_problem(origin)
        if problem:
            raise ConfigError("cors.allowed_origins", f'expected origins like http://host:port or "*", got {origin!r}'
                                                      f" ({problem})")


# What may stand inside a quoted parameter of the WHEP `Link` header announcing an ICE server
# (printable ASCII and Latin-1, no quote or backslash): anything else makes Tornado refuse the header
# on every WHEP request, quoting it (TURN credential and all) in a logged traceback.
_LINK_PARAMETER = re.compile(r'[\x20-\x21\x23-\x5b\x5d-\x7e\xa0-\xff]*')


def _check_ice_servers(ice_servers: list[dict]) -> None:
    """Every ICE server's URLs parse as aiortc will parse them for each WebRTC peer (before, one
    it could not parse made every WHEP offer fail), and its URLs and credentials fit in the `Link`
    header announcing them."""
    if not ice_servers:
        return  # aiortc (and PyAV with it, 35 MB) is imported only where ICE servers are set
    from aiortc.rtcicetransport import parse_stun_turn_uri

    for i, server in enumerate(ice_servers):
        key = f"webrtc.ice_servers[{i}]"
        urls = [server["urls"]] if isinstance(server["urls"], str) else server["urls"]
        for url in urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ConfigError(f"{key}.urls",
                                  f"expected stun:, stuns:, turn: or turns: URLs, got {redact_url(url)!r}")
            try:
                parse_stun_turn_uri(url)
                valid = re.fullmatch(r"[\x21-\x7e]+", url) is not None and not any(c in url for c in '<>"\\')
            except ValueError:
                valid = False
            if not valid:
                raise ConfigError(f"{key}.urls", f"expected scheme:host[:port][?transport=udp|tcp] (a host name or "
                                                 f"IPv4 address), got {redact_url(url, keep_query=True)!r}")
        for name in ("username", "credential"):
            value = server.get(name, "")
            if not isinstance(value, str) or not _LINK_PARAMETER.fullmatch(value):
                raise ConfigError(f"{key}.{name}", "expected a string without line breaks, control characters, '\"' "
                                                   "or '\\' (it is announced in a quoted Link header parameter)")
        if any(url.startswith("turn") for url in urls) and not (server.get("username") and server.get("credential")):
            raise ConfigError(key, "a TURN server needs username and credential")


def _check_cluster(config: Config) -> None:
    cluster = config.cluster
    if not cluster.redis_url:
        return
    if not cluster.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("cluster.redis_url", f"expected a redis://, rediss:// or unix:// URL, got "
                                               f"{redact_url(cluster.redis_url)!r}")
    if not cluster.redis_url.startswith("unix://"):  # the Redis client parses it when vsproxy starts
        check_url("cluster.redis_url", cluster.redis_url, ("redis://", "rediss://"), host_required=False)
    if not cluster.token:
        raise ConfigError("cluster.token", "required when cluster.redis_url is set (the nodes authenticate to "
                                           "each other with it)")
    check_not_placeholder("cluster.token", cluster.token)
    if len(cluster.token) < 16:
        raise ConfigError("cluster.token", "expected a token of at least 16 characters")
    if header_problem("Authorization", f"Bearer {cluster.token}") is not None:
        # Sent by edges in an Authorization header, which Tornado refuses to send (every relay
        # connection failed as "origin ... unreachable (ValueError)").
        raise ConfigError("cluster.token", "expected a token without line breaks, NUL or characters beyond Latin-1 "
                                           "(a YAML block scalar keeps its last line break unless chomped with `-`)")
    if cluster.advertise_url:
        check_url("cluster.advertise_url", cluster.advertise_url, ("http://", "https://"))
    elif config.server.host in WILDCARD_HOSTS:
        # Its default, http://127.0.0.1:<port>, reaches no other node; and every such node would
        # default to the same node ID, 127.0.0.1:<port>, all of them holding each lease at once.
        raise ConfigError("cluster.advertise_url", f"required when server.host is {config.server.host or 'empty'} "
                                                   "(every interface): the URL the other nodes reach this one at")
    if config.sessions.store != "memory":
        raise ConfigError("sessions.store", "must be memory in a cluster (cluster.redis_url): sessions live in Redis")


def check_url(key: str, url: str, schemes: tuple[str, ...], *, host_required: bool = True) -> None:
    """Raise ConfigError naming `key` unless `url` has one of `schemes` ("http://", ...), parses,
    and names a host (unless not `host_required`) with a valid port, if any: what every use of it
    parses again (the Host check on every request, each connection attempt), where a ValueError
    would fail each of them. The message shows the URL without credentials or query."""
    expected = "a " + " or ".join(schemes) + " URL"
    shown = redact_url(url)
    if not url.startswith(schemes):
        raise ConfigError(key, f"expected {expected}, got {shown!r}")
    try:
        parts = urlsplit(url)
    except ValueError:  # its text may quote the netloc, password included
        raise ConfigError(key, f"expected {expected}, got {shown!r}, which cannot be parsed (an IPv6 "
                               "address needs its closing ']')") from None
    if host_required and not parts.hostname:
        raise ConfigError(key, f"expected {expected} with a host, got {shown!r}")
    if parts.hostname and not _valid_url_host(parts.hostname):
        raise ConfigError(key, f"expected {expected} whose host is a DNS name or an IP address, got {shown!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(key, f"expected {expected} whose port is a number from 1 to 65535, got {shown!r}")


def _valid_url_host(host: str) -> bool:
    """A host a URL may name: an IP address, or a DNS name (international ones too, as their
    ASCII form) of labels of at most 63 characters, 253 in all."""
    if ":" in host:
        return valid_allowed_host(host)
    try:
        ascii_host = host.encode("idna").decode("ascii")  # refuses empty and overlong labels
    except UnicodeError:
        return False
    return len(ascii_host.rstrip(".")) <= 253 and valid_allowed_host(ascii_host) and ascii_host != "*"


def origin_problem(origin: str) -> str | None:
    """Why `origin` (a cors.allowed_origins entry) could never equal the Origin a browser sends
    (scheme://host[:port], lower case, no default port, nothing after it), or None if it can."""
    if origin == "*":
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https"):
        return "no http:// or https://"
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return "no host, or a user name"
    if parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
        return "a path, even a trailing '/', never matches: browsers send scheme://host[:port] only"
    if port == {"http": 80, "https": 443}[parts.scheme]:
        return f"browsers leave the default port {port} out"
    if origin != origin.lower():
        return "browsers send it in lower case"
    return None


def valid_allowed_host(host: str) -> bool:
    """Is `host` a valid server.allowed_hosts entry: "*", a DNS name or an IP address (IPv6 with or
    without brackets), never with a scheme, port or path?"""
    if host == "*":
        return True
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        return True
    return re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", host) is not None


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
        if not file.exists():
            raise ConfigError("--config", f"config file {str(file)!r} does not exist")
        text = read_text(file)
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
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


# -- the configuration reference (README), generated from the schema ---------------------------

def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`" if value else "none"
    return f"`{value}`"


def _values_text(ftype: type, meta: Mapping) -> str:
    if meta.get("values"):
        return meta["values"]
    if meta.get("choices"):
        return ", ".join(f"`{c}`" for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{number_text(lo)} to {number_text(hi)}"
    return {int: "integer", float: "number", str: "string", bool: "boolean", list: "list of strings",
            dict: "mapping of strings"}.get(ftype, ftype.__name__)


def _reference_rows(cls: Any, prefix: str, note: str = "") -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(ftype):
            rows += _reference_rows(ftype, f"{prefix}{f.name}.")
            continue
        doc = f.metadata.get("doc")
        if not doc:
            raise ValueError(f"{prefix}{f.name} has no doc (declare it with schema.setting)")
        rows.append(f"| `{prefix}{f.name}` | {_default_text(getattr(defaults, f.name))} | "
                    f"{_values_text(ftype, f.metadata)} | {note}{doc} |")
    return rows


def reference_markdown() -> str:
    """The README's configuration table: every key of the schema, each source kind's included."""
    rows = ["| Key | Default | Values | Meaning |", "|---|---|---|---|"]
    rows += _reference_rows(Config, "")
    for kind in sources.KINDS:
        rows += _reference_rows(sources.source_class(kind).settings_class, "upstreams.<name>.", f"(`{kind}`) ")
    rows.append("| `upstreams.<name>.h264` | none | any `h264` keys | (JPEG kinds) this upstream's own values "
                "of the `h264` keys above |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m vsproxy.config > the README's table
    print(reference_markdown(), end="")
