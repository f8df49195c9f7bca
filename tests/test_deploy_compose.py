"""deploy/docker-compose.yml (a cluster: Redis, three nodes, nginx in front) is checked here.

Its structure is asserted with PyYAML in every run: services, ports, each node's environment (and
that vsproxy's own loader accepts the config a node would get), nginx's WebSocket and
no-buffering settings, no secret in the committed files. When a Docker Compose client is
installed (the v2 plugin or Debian's docker-compose 1.29), `docker compose config -q` validates
the file as well; it is never required, so that part runs only where one exists.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

import yaml

from vsproxy.config import load_config, read_dotenv

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
NODES = ("node1", "node2", "node3")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from `env` (an unset required one fails)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        assert op != ":?", f"{name} is required: {arg}"
        return arg
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def compose_client() -> list[str] | None:
    """The Docker Compose command, if one is installed (plugin or standalone)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_has_redis_three_nodes_and_a_load_balancer():
    services = compose()["services"]
    assert {"redis", *NODES, "lb"} <= set(services)
    assert [p for p in services["lb"]["ports"] if str(p).endswith(":80")], "the load balancer publishes no port"
    for name in ("redis", *NODES):
        assert "ports" not in services[name], f"{name} should be reachable on the compose network only"
    build = services["node1"]["build"]
    assert (COMPOSE.parent / build["context"] / "setup.py").is_file()
    # A Dockerfile file, not `dockerfile_inline`: Debian's docker-compose 1.29 refuses the latter.
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).read_text(encoding="utf-8")
    assert "\nFROM python:3.11-slim\n" in dockerfile and "pip install --no-cache-dir /src" in dockerfile
    for name in NODES:
        node = services[name]
        assert node["build"] == build and node["depends_on"]["redis"]["condition"] == "service_healthy"
        env = node["environment"]
        assert env["VSPROXY_NODE_ID"] == name
        assert env["VSPROXY_ADVERTISE_URL"] == f"http://{name}:8889"  # the port the config listens on
        assert env["VSPROXY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["VSPROXY_CLUSTER_TOKEN"].startswith("${VSPROXY_CLUSTER_TOKEN:?"), "the token must come from .env"
        (mount,) = node["volumes"]
        assert (COMPOSE.parent / mount.split(":")[0]).is_file()


def test_each_node_gets_a_config_vsproxy_accepts_as_a_cluster_node(tmp_path):
    example = read_dotenv(ENV_EXAMPLE)
    # Its token as it stands is refused (test_docs.py); the one an operator puts in its place:
    example["VSPROXY_CLUSTER_TOKEN"] = secrets.token_urlsafe(32)
    services = compose()["services"]
    for name in NODES:
        env = {key: interpolate(str(value), example) for key, value in services[name]["environment"].items()}
        config = load_config(COMPOSE.parent / "cluster" / "vsproxy.yaml", environ=env,
                             dotenv_path=tmp_path / "none.env")
        assert config.cluster.node_id == name and config.cluster.token == example["VSPROXY_CLUSTER_TOKEN"]
        assert config.cluster.advertise_url == f"http://{name}:{config.server.port}"
        assert config.server.host == "0.0.0.0" and config.server.trust_proxy_headers
        assert config.isaac_sim.ip == example["ISAAC_SIM_IP"]


def test_nginx_upgrades_websockets_and_does_not_buffer_streams():
    conf = (DEPLOY / "cluster" / "nginx.conf").read_text(encoding="utf-8")
    for name in NODES:
        assert f"server {name}:8889" in conf
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $connection_upgrade;", "proxy_buffering off;",
                      "proxy_read_timeout 1h;", "location /internal/ { return 404; }"):
        assert directive in conf, directive
    mount = compose()["services"]["lb"]["volumes"][0]
    assert mount.startswith("./cluster/nginx.conf:")
    # A push upstream's largest frame gets through nginx to vsproxy (before, 1m: a 2 MB frame was
    # nginx's HTML 413, not vsproxy's own limit).
    from vsproxy.sources.push import PushUpstream
    (limit,) = re.findall(r"client_max_body_size (\d+)m;", conf)
    assert int(limit) << 20 >= PushUpstream.__dataclass_fields__["max_frame_bytes"].default


def test_no_secret_committed_in_deploy():
    assert not (DEPLOY / ".env").exists() or subprocess.run(
        ["git", "check-ignore", "-q", str(DEPLOY / ".env")], cwd=DEPLOY).returncode == 0, "deploy/.env must be ignored"
    text = COMPOSE.read_text(encoding="utf-8") + (DEPLOY / "cluster" / "vsproxy.yaml").read_text(encoding="utf-8")
    assert "token:" not in text and "api_tokens:" not in text.replace("auth.api_tokens", "")


def test_compose_file_is_valid():
    """Always: the file's top level and every service hold only Compose keys, each service has an
    image, and every ${...} is one Compose understands. Where a Compose client exists, also
    `docker compose config -q` with the example env file."""
    tree = compose()
    assert set(tree) <= {"services", "volumes", "networks", "configs", "secrets", "name"} | {
        key for key in tree if key.startswith("x-")}, set(tree)
    known = {"build", "image", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
             "healthcheck", "stop_grace_period", "restart", "profiles"}
    for name, service in tree["services"].items():
        assert set(service) <= known, (name, set(service) - known)
        assert service.get("image"), f"{name} has no image"
    for volume in tree["services"]["redis"]["volumes"]:
        assert volume.split(":")[0] in tree["volumes"]
    text = COMPOSE.read_text(encoding="utf-8")
    for expression in re.findall(r"\$\{[^}]*\}", text):
        assert re.fullmatch(r"\$\{\w+(:-|:\?)?[^}]*\}", expression), expression
    client = compose_client()
    if client is not None:
        result = subprocess.run([*client, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
