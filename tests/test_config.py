"""Configuration: defaults, the precedence of its layers, .env parsing and one-line errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from vsproxy import sources
from vsproxy.codec.encoder import H264Config
from vsproxy.config import Config, ConfigError, config_from_dict, load_config, read_dotenv

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, yaml_text: str | None = None, *, env: dict | None = None,
         dotenv: str | None = None, overrides: dict | None = None) -> Config:
    """load_config with every layer explicit, isolated from the real environment and cwd."""
    config_path = write(tmp_path / "config.yaml", yaml_text) if yaml_text is not None else None
    dotenv_path = write(tmp_path / ".env", dotenv) if dotenv is not None else tmp_path / "no.env"
    return load_config(config_path, environ=env or {}, dotenv_path=dotenv_path, overrides=overrides)


# -- defaults ----------------------------------------------------------------------------------


def test_builtin_defaults():
    """Without any configuration the proxy listens on 127.0.0.1:8889 and streams the demo source."""
    config = Config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8889)
    assert config.sessions.idle_timeout_seconds == 300
    assert config.cors.allowed_origins == ["http://localhost:3000"]
    assert config.isaac_sim.ip == ""
    assert config.isaac_ws_url is None


def test_load_config_without_any_source_gives_defaults(tmp_path, monkeypatch):
    """No config.yaml in the working directory, no .env, empty environment: the defaults."""
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}) == Config()


def test_config_yaml_in_working_directory_is_read(tmp_path, monkeypatch):
    """`./config.yaml` is picked up when no --config path is given."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "config.yaml", "server: {port: 9100}\n")
    assert load_config(environ={}).server.port == 9100


def test_shipped_config_yaml_equals_builtin_defaults():
    """The repository's config.yaml documents the defaults, so loading it changes nothing."""
    assert load_config(SHIPPED_CONFIG, environ={}, dotenv_path=None) == Config()


def test_shipped_config_yaml_lists_every_key():
    """Every setting of the schema appears in the shipped config.yaml (it is the documentation)."""
    tree = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue  # filled from other keys, not a key of its own
        assert section.name in tree, f"config.yaml lacks {section.name!r}"
        value = getattr(defaults, section.name)
        if dataclasses.is_dataclass(value):
            for setting in dataclasses.fields(value):
                assert setting.name in tree[section.name], f"config.yaml lacks {section.name}.{setting.name}"


# -- precedence: CLI overrides > environment > .env > config.yaml > defaults --------------------


def test_yaml_overrides_defaults(tmp_path):
    config = load(tmp_path, """
        server: {port: 9001}
        sessions: {idle_timeout_seconds: 60}
    """)
    assert config.server.port == 9001
    assert config.sessions.idle_timeout_seconds == 60
    assert config.server.host == "127.0.0.1"  # untouched keys keep their defaults


def test_dotenv_overrides_yaml(tmp_path):
    config = load(tmp_path, "server: {port: 9001}\n", dotenv="VIDEO_PROXY_PORT=9002\n")
    assert config.server.port == 9002


def test_environment_overrides_dotenv(tmp_path):
    config = load(tmp_path, "server: {port: 9001}\n", dotenv="VIDEO_PROXY_PORT=9002\n",
                  env={"VIDEO_PROXY_PORT": "9003"})
    assert config.server.port == 9003


def test_cli_overrides_everything(tmp_path):
    config = load(tmp_path, "server: {port: 9001}\n", dotenv="VIDEO_PROXY_PORT=9002\n",
                  env={"VIDEO_PROXY_PORT": "9003"}, overrides={"server.port": 9004})
    assert config.server.port == 9004


def test_cli_override_of_none_means_flag_not_given(tmp_path):
    """An absent flag (None) leaves the lower layers' value in place."""
    config = load(tmp_path, "server: {port: 9001}\n", overrides={"server.port": None, "server.host": None})
    assert config.server.port == 9001
    assert config.server.host == "127.0.0.1"


def test_dotenv_layer_keeps_yaml_values_it_does_not_set(tmp_path):
    """Layers merge key by key: .env setting the port does not reset the YAML's Isaac Sim address."""
    config = load(tmp_path, "isaac_sim: {ip: 10.1.2.3}\n", dotenv="VIDEO_PROXY_PORT=9002\n")
    assert config.isaac_sim.ip == "10.1.2.3"
    assert config.server.port == 9002


def test_original_environment_variables_build_isaac_ws_url(tmp_path):
    """The original service's variables configure the Isaac Sim upstream URL."""
    config = load(tmp_path, env={
        "VIDEO_PROXY_PORT": "8890",
        "ISAAC_SIM_IP": "10.0.0.5",
        "ISAAC_SIM_PORT": "8212",
        "ISAAC_SIM_WS_PORT": "49100",
        "ISAAC_SIM_WS_PATH": "/streaming/client",
    })
    assert config.server.port == 8890
    assert config.isaac_sim.ip == "10.0.0.5"
    assert config.isaac_sim.port == 8212
    assert config.isaac_sim.ws_port == 49100
    assert config.isaac_ws_url == "ws://10.0.0.5:49100/streaming/client"


def test_isaac_ws_url_adds_leading_slash_and_honours_secure(tmp_path):
    config = load(tmp_path, "isaac_sim: {ip: sim.example, ws_port: 443, ws_path: stream, secure: true}\n")
    assert config.isaac_ws_url == "wss://sim.example:443/stream"


def test_isaac_ws_url_defaults_to_port_8211_and_root_path(tmp_path):
    assert load(tmp_path, env={"ISAAC_SIM_IP": "10.0.0.5"}).isaac_ws_url == "ws://10.0.0.5:8211/"


def test_unrelated_environment_variables_are_ignored(tmp_path):
    config = load(tmp_path, env={"PORT": "1234", "VIDEO_PROXY_SOMETHING": "x", "HOME": "/root"})
    assert config == Config()


# -- .env parsing ------------------------------------------------------------------------------


def test_dotenv_parsing_comments_quotes_and_export(tmp_path):
    path = write(tmp_path / ".env", """\
        # the original service's .env
        VIDEO_PROXY_PORT=8889

        export ISAAC_SIM_IP=18.0.0.1
        ISAAC_SIM_PORT="8211"
        ISAAC_SIM_WS_PORT='8212'
        ISAAC_SIM_WS_PATH=/ws   # trailing comment
        QUOTED_HASH="/a #b"
          SPACED = value with spaces
        EMPTY=
    """)
    assert read_dotenv(path) == {
        "VIDEO_PROXY_PORT": "8889",
        "ISAAC_SIM_IP": "18.0.0.1",
        "ISAAC_SIM_PORT": "8211",
        "ISAAC_SIM_WS_PORT": "8212",
        "ISAAC_SIM_WS_PATH": "/ws",
        "QUOTED_HASH": "/a #b",
        "SPACED": "value with spaces",
        "EMPTY": "",
    }


def test_dotenv_values_reach_the_config(tmp_path):
    config = load(tmp_path, dotenv="""\
        # comment
        export ISAAC_SIM_IP="10.9.8.7"
        ISAAC_SIM_WS_PORT='49100'
        ISAAC_SIM_WS_PATH=/live  # comment
    """)
    assert config.isaac_ws_url == "ws://10.9.8.7:49100/live"


def test_dotenv_quoted_value_with_a_trailing_comment(tmp_path):
    """`KEY="value"  # comment` is the value without its quotes, as in a shell: the port was
    refused ("expected an integer ..., got '9003'") and the address kept its quotes."""
    config = load(tmp_path, dotenv="""\
        VIDEO_PROXY_PORT="9003"  # the proxy's port
        ISAAC_SIM_IP='10.9.8.7' # the simulator
    """)
    assert config.server.port == 9003
    assert config.isaac_ws_url == "ws://10.9.8.7:8211/"
    path = write(tmp_path / "hash.env", 'QUOTED_HASH="/a #b"   # a quoted # stays\n')
    assert read_dotenv(path) == {"QUOTED_HASH": "/a #b"}
    # A comment right after the closing quote, or after a tab; a # inside a word is the value's.
    path = write(tmp_path / "more.env", 'TIGHT="8896"# c\nTABBED=8896\t# c\nWORD=a#b\n')
    assert read_dotenv(path) == {"TIGHT": "8896", "TABBED": "8896", "WORD": "a#b"}


def test_dotenv_line_without_equals_is_an_error_naming_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, dotenv="VIDEO_PROXY_PORT=8889\nthis is not an assignment\n")
    assert ".env:2" in str(info.value)


# -- errors: one message naming the key --------------------------------------------------------

BAD_YAML = [
    pytest.param("sever:\n  port: 1\n", ["sever", "unknown key"], id="unknown-top-level-key"),
    # YAML itself keeps the last of two; the first was lost without a word.
    pytest.param("server:\n  port: 8890\n  port: 8891\n", ["config.yaml:3", "'port' is set twice, first on line 2"],
                 id="key-set-twice"),
    pytest.param("server: {port: 8890}\nlimits: {}\nserver: {host: 0.0.0.0}\n", ["config.yaml:3", "'server'"],
                 id="section-set-twice"),
    pytest.param("server:\n  prot: 1\n", ["server.prot", "unknown key"], id="unknown-nested-key"),
    pytest.param("server:\n  port: '8889'\n", ["server.port", "integer"], id="string-for-port"),
    pytest.param("server:\n  port: 88.5\n", ["server.port", "integer"], id="float-for-port"),
    pytest.param("limits:\n  max_sessions: true\n", ["limits.max_sessions", "integer"], id="bool-for-int"),
    pytest.param("server:\n  trust_proxy_headers: 'yes please'\n", ["server.trust_proxy_headers", "true or false"],
                 id="string-for-bool"),
    pytest.param("server:\n  port: 0\n", ["server.port", "1", "65535"], id="port-0"),
    pytest.param("server:\n  port: 70000\n", ["server.port", "65535"], id="port-70000"),
    pytest.param("sessions:\n  idle_timeout_seconds: -1\n", ["sessions.idle_timeout_seconds"], id="negative-timeout"),
    pytest.param("logging:\n  format: xml\n", ["logging.format", "text", "json"], id="bad-choice"),
    pytest.param("cors:\n  allowed_origins: http://localhost:3000\n", ["cors.allowed_origins", "list"],
                 id="string-for-list"),
    pytest.param("cors:\n  allowed_origins: [localhost:3000]\n", ["cors.allowed_origins"], id="origin-without-scheme"),
    # Each of these could never equal a browser's Origin header: accepted, it matched nothing.
    pytest.param("cors:\n  allowed_origins: ['http://localhost:3000/']\n", ["cors.allowed_origins", "trailing '/'"],
                 id="origin-with-trailing-slash"),
    pytest.param("cors:\n  allowed_origins: ['https://app.example.com/path']\n", ["cors.allowed_origins", "a path"],
                 id="origin-with-path"),
    pytest.param("cors:\n  allowed_origins: ['https://app.example.com:443']\n", ["cors.allowed_origins", "443"],
                 id="origin-with-default-port"),
    pytest.param("cors:\n  allowed_origins: ['http://App.example.com']\n", ["cors.allowed_origins", "lower case"],
                 id="origin-in-upper-case"),
    pytest.param("cors:\n  allowed_origins: ['http://localhost:99999']\n", ["cors.allowed_origins", "not a URL"],
                 id="origin-port-out-of-range"),
    pytest.param("server:\n  public_url: video.example.com\n", ["server.public_url"], id="public-url-without-scheme"),
    pytest.param("server:\n  public_url: http://[video.example.com\n", ["server.public_url", "cannot be parsed"],
                 id="public-url-unclosed-bracket"),
    pytest.param("server:\n  public_url: https://video.example.com:99999\n", ["server.public_url", "port"],
                 id="public-url-port-out-of-range"),
    pytest.param("server:\n  public_url: https://video.example.com:https/\n", ["server.public_url", "port"],
                 id="public-url-port-not-a-number"),
    pytest.param("server:\n  public_url: https:///video\n", ["server.public_url", "host"],
                 id="public-url-without-host"),
    pytest.param("sessions:\n  cleanup_interval_seconds: .nan\n",
                 ["sessions.cleanup_interval_seconds", "expected a number from 0.05 to 3600, got nan"], id="nan"),
    pytest.param("auth:\n  viewer_tokens: {ttl_seconds: .inf}\n",
                 ["auth.viewer_tokens.ttl_seconds", "expected a number from 10 to 2592000"], id="inf"),
    pytest.param("streaming:\n  stall_timeout_seconds: -.inf\n", ["streaming.stall_timeout_seconds"], id="minus-inf"),
    pytest.param("sessions:\n  idle_timeout_seconds: 1" + "0" * 400 + "\n", ["sessions.idle_timeout_seconds"],
                 id="integer-beyond-any-float"),
    pytest.param("reconnect:\n  initial_delay_seconds: 5\n  max_delay_seconds: 1\n",
                 ["reconnect.max_delay_seconds"], id="max-delay-below-initial"),
    pytest.param("isaac_sim:\n  headers: {Authorization: 5}\n", ["isaac_sim.headers"], id="non-string-header"),
    pytest.param("server: 8889\n", ["server", "mapping"], id="section-not-a-mapping"),
    pytest.param("server:\n  port: [1\n", ["config.yaml", "YAML"], id="invalid-yaml"),
    pytest.param("- server\n- port\n", ["config.yaml", "mapping"], id="top-level-list"),
    pytest.param("just a string\n", ["config.yaml", "mapping"], id="top-level-scalar"),
]


@pytest.mark.parametrize(("yaml_text", "expected"), BAD_YAML)
def test_bad_config_file_is_a_config_error_naming_the_key(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message


def test_a_number_out_of_range_is_shown_as_written_but_a_secret_never(tmp_path):
    """auth.viewer_tokens.ttl_seconds: 5 said "got a value of type float" (its key is under
    viewer_tokens, whose secret is hidden, and the check had turned 5 into 5.0); the number is no
    secret. The secret itself stays hidden whatever its type."""
    secret = "0123456789abcdef0123456789abcdef"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"auth:\n  viewer_tokens: {{enabled: true, secret: '{secret}', ttl_seconds: 5}}\n")
    assert str(info.value).endswith("auth.viewer_tokens.ttl_seconds: expected a number from 10 to 2592000, got 5")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "auth:\n  viewer_tokens: {enabled: true, secret: 123456789012345678901234567890123}\n")
    assert "123456789" not in str(info.value) and "auth.viewer_tokens.secret" in str(info.value)


def test_a_header_from_a_yaml_block_scalar_is_refused_without_showing_it(tmp_path):
    """`|` keeps the final line break, which Tornado refuses on every connection attempt (and its
    error quoted the header, token and all, into lastError)."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, """\
            isaac_sim:
              ip: 127.0.0.1
              headers:
                Authorization: |
                  Bearer block-scalar-token-0123
            """)
    assert info.value.key == "isaac_sim.headers.Authorization"
    assert "line break" in info.value.problem and "|-" in info.value.problem
    assert "block-scalar-token" not in str(info.value)
    config = load(tmp_path, "isaac_sim:\n  headers:\n    Authorization: |-\n      Bearer token\n")
    assert config.isaac_sim.headers == {"Authorization": "Bearer token"}


def test_public_url_is_parsed_as_each_request_will_parse_it(tmp_path):
    """Every request's Host check takes public_url's host name: a URL urlsplit refuses made every
    request fail (Tornado's "Uncaught exception" and no answer); a good one is accepted."""
    for url in ("https://video.example.com", "http://[::1]:8889/video", "http://10.0.0.5:8889"):
        assert load(tmp_path, f"server:\n  public_url: '{url}'\n").server.public_url == url
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "server:\n  public_url: 'https://admin:hunter2-secret@[video.example.com/'\n")
    assert info.value.key == "server.public_url"
    assert "hunter2-secret" not in str(info.value) and "***@[video.example.com" in str(info.value)


def _numeric_keys(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted key, type) of every int and float setting of a settings dataclass, nested ones too."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _numeric_keys(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float):
            keys.append((f"{prefix}{f.name}", hints[f.name]))
    return keys


# What each upstream kind needs besides the key under test.
_REQUIRED = {"isaac": {"url": "ws://127.0.0.1/"}, "mjpeg": {"url": "http://127.0.0.1/"},
             "rtsp": {"url": "rtsp://127.0.0.1/"}, "push": {"token": "publish-token-1"}}


def _every_numeric_setting() -> list:
    cases = [(key, ftype, key) for key, ftype in _numeric_keys(Config, "")]
    for kind in sources.KINDS:
        for key, ftype in _numeric_keys(sources.source_class(kind).settings_class, f"upstreams.x[{kind}]."):
            cases.append((key, ftype, key.replace(f"[{kind}]", "")))
    cases += [(f"upstreams.x[demo].h264.{key}", ftype, f"upstreams.x.h264.{key}")
              for key, ftype in _numeric_keys(H264Config, "")]
    return [pytest.param(path, ftype, key, id=path) for path, ftype, key in cases]


def _tree(path: str, value: object) -> dict:
    """The config tree setting `path` (a dotted key; `upstreams.x[kind].` for an upstream's) to `value`."""
    head, _, leaf = path.rpartition(".")
    tree: dict = {}
    node = tree
    for part in head.split(".") if head else []:
        name, _, kind = part.partition("[")
        node[name] = {"kind": kind[:-1], **_REQUIRED.get(kind[:-1], {})} if kind else {}
        node = node[name]
    node[leaf] = value
    return tree


@pytest.mark.parametrize(("path", "ftype", "key"), _every_numeric_setting())
def test_no_numeric_setting_takes_nan_or_infinity(path, ftype, key):
    """NaN passes any `value < min or value > max` check (it compares false both ways): a NaN
    cleanup interval stopped start-up with a traceback, a NaN token lifetime made every POST
    /session/create a 500, NaN idle and stall timeouts never fired. Every int and float setting,
    of every section, upstream kind and per-upstream h264, refuses it, and infinity."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError) as info:
            config_from_dict(_tree(path, value))
        assert info.value.key == key
        assert info.value.problem.startswith("expected an integer" if ftype is int else "expected a number"), \
            info.value.problem


@pytest.mark.parametrize(("server", "key"), [
    ({"urls": "stun:[2001:db8::1]:3478"}, "webrtc.ice_servers[0].urls"),  # aiortc takes no IPv6 address
    ({"urls": "stun:stun.example:port"}, "webrtc.ice_servers[0].urls"),
    ({"urls": "stun:stun.example?transport=udp"}, "webrtc.ice_servers[0].urls"),
    ({"urls": "stun:stun.example>; rel=x"}, "webrtc.ice_servers[0].urls"),
    ({"urls": "turn:turn.example", "username": "user", "credential": "pass\n"}, "webrtc.ice_servers[0].credential"),
    ({"urls": "turn:turn.example", "username": 'us"er', "credential": "pass"}, "webrtc.ice_servers[0].username"),
    ({"urls": "turn:turn.example", "username": ["a", "b"], "credential": "pass"}, "webrtc.ice_servers[0].username"),
])
def test_ice_servers_are_parsed_as_every_webrtc_peer_and_whep_answer_uses_them(server, key):
    """aiortc parses each URL for every peer (one it cannot parse failed every WHEP offer), and the
    URLs and credentials go into a `Link` header of every WHEP answer and preflight (a line break
    made each a 500 whose logged traceback quoted the TURN credential)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"webrtc": {"ice_servers": [server]}})
    assert info.value.key == key
    assert "pass" not in info.value.problem


def test_usual_ice_servers_are_accepted():
    servers = [{"urls": ["stun:stun.example:3478", "stun:192.0.2.1"]},
               {"urls": ["turn:turn.example:3478?transport=tcp", "turns:turn.example"], "username": "user",
                "credential": "p@ss:w0rd/+="}]
    assert config_from_dict({"webrtc": {"ice_servers": servers}}).webrtc.ice_servers == servers


def test_empty_config_file_gives_defaults(tmp_path):
    assert load(tmp_path, "# nothing configured\n") == Config()


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", environ={}, dotenv_path=None)
    message = str(info.value)
    assert "--config" in message
    assert "missing.yaml" in message
    assert "does not exist" in message


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("VIDEO_PROXY_PORT", "abc", "server.port"),
    ("VIDEO_PROXY_PORT", "0", "server.port"),
    ("ISAAC_SIM_PORT", "eighty", "isaac_sim.port"),
    ("ISAAC_SIM_WS_PORT", "99999", "isaac_sim.ws_port"),
    ("VIDEO_PROXY_PUBLIC_URL", "video.example.com", "server.public_url"),
    ("VIDEO_PROXY_PUBLIC_URL", "http://[video.example.com", "server.public_url"),
])
def test_bad_environment_variable_names_the_variable(tmp_path, variable, value, key):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={variable: value})
    message = str(info.value)
    assert variable in message
    assert key in message
    assert "environment" in message


def test_bad_dotenv_value_names_the_variable_and_the_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, dotenv="VIDEO_PROXY_PORT=abc\n")
    message = str(info.value)
    assert "VIDEO_PROXY_PORT" in message
    assert ".env" in message


def test_bad_cli_override_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, overrides={"server.port": 70000})
    assert "server.port" in str(info.value)


def test_cli_override_replaces_a_bad_environment_value(tmp_path):
    """A flag wins even where the environment's value would have been invalid."""
    config = load(tmp_path, env={"VIDEO_PROXY_PORT": "abc"}, overrides={"server.port": 9005})
    assert config.server.port == 9005


def test_empty_environment_variable_counts_as_unset(tmp_path):
    """`VIDEO_PROXY_PORT=` (a template with an empty ${PORT}) falls back, as `X || default` did."""
    config = load_config(None, environ={"VIDEO_PROXY_PORT": "", "ISAAC_SIM_IP": "  "},
                         dotenv_path=tmp_path / "none.env")
    assert config.server.port == 8889
    assert config.isaac_ws_url is None


def test_a_proxy_without_webrtc_or_h264_viewers_does_not_load_pyav_or_aiortc():
    """PyAV and aiortc (35 MB of the 39 MB a fresh proxy takes on its own) load with the first
    H.264 viewer, WHEP offer or RTSP upstream, not at start-up: a JPEG-only deployment does not
    pay for them. Before, the start-up check of webrtc.ice_servers imported aiortc even with none
    set (idle RSS 74 MB instead of 39 MB in bench/fanout.py)."""
    script = ("import sys; from vsproxy.config import config_from_dict; from vsproxy.app import Proxy; "
              "Proxy(config_from_dict({})); print(sorted(m for m in ('av', 'aiortc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize(("env", "yaml_text", "key"), [
    ({"ISAAC_SIM_IP": '"10.0.0.1"'}, None, "ISAAC_SIM_IP"),
    ({"ISAAC_SIM_IP": "my sim host"}, None, "ISAAC_SIM_IP"),
    ({}, "upstreams:\n  cam:\n    kind: mjpeg\n    url: 'http://cam era/video'\n", "upstreams.cam.url"),
    ({}, "upstreams:\n  cam:\n    kind: rtsp\n    url: 'rtsp://user:pw-secret-9@sim<1>/stream'\n", "upstreams.cam.url"),
])
def test_an_upstream_host_that_is_no_host_name_is_a_configuration_error(tmp_path, env, yaml_text, key):
    """A host with quotes or spaces (a copy-paste slip) used to pass start-up and `vsproxy check`,
    and the upstream then failed every connect attempt; now it is the one-line error at start."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text, env=env)
    assert key in info.value.key and "DNS name or an IP address" in info.value.problem
    assert "pw-secret-9" not in str(info.value)
    for host in ("10.0.0.1", "sim-host.internal", "[::1]", "localhost"):  # and real ones pass
        assert load(tmp_path, None, env={"ISAAC_SIM_IP": host}).isaac_ws_url == f"ws://{host}:8211/"


def test_an_upstream_host_may_be_international_but_not_overlong(tmp_path):
    """An international name is a host (its ASCII form is what is looked up); a label over 63
    characters is none (a probe's lookup of one raised UnicodeError, which ended the upstream's
    reconnect loop)."""
    assert load(tmp_path, None, env={"ISAAC_SIM_IP": "bücher.example"}).isaac_ws_url
    with pytest.raises(ConfigError) as info:
        load(tmp_path, None, env={"ISAAC_SIM_IP": "a" * 64 + ".example"})
    assert "ISAAC_SIM_IP" in info.value.key and "DNS name or an IP address" in info.value.problem


@pytest.mark.parametrize("interval", [0.001, 0.09])
def test_a_probe_interval_under_a_tenth_of_a_second_is_refused(tmp_path, interval):
    """0 turns probing off; a few ms would make thousands of connects a second to a host that is down."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"reconnect:\n  probe_interval_seconds: {interval}\n")
    assert info.value.key == "reconnect.probe_interval_seconds" and "0 (off) or 0.1 to 60" in info.value.problem
    for fine in (0, 0.1, 1):
        config = load(tmp_path, f"reconnect:\n  probe_interval_seconds: {fine}\n")
        assert config.reconnect.probe_interval_seconds == fine
