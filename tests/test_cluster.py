"""A cluster as operators run it: a real redis-server, nodes as real `python -m vsproxy` processes,
the simulated Isaac Sim in this process (so the test sees its connections and frames)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tornado.websocket
import yaml
from clock_off import FaketimeMissing, clock_off
from cluster_fixtures import RedisServer, redis_server  # noqa: F401 - the fixture
from conftest import Api
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_cli import clean_env
from test_docs_match_code import readme_metrics
from test_h264 import decode_annexb, parse_message
from test_openapi import Contract
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from vsproxy.openapi import openapi_document

pytestmark = [pytest.mark.external, pytest.mark.slow]  # redis-server and vsproxy subprocesses

TOKEN = "cluster-test-token-0123456789"


class Node:
    """One `python -m vsproxy` cluster node on 127.0.0.1:`port`."""

    def __init__(self, workdir: Path, name: str, redis_url: str, sim_port: int, extra: dict | None = None,
                 clock: str | None = None) -> None:
        self.name = name
        self.clock = clock  # this node's wall clock off by this (libfaketime's "+120s" / "-120s")
        self.port = free_port()
        self.workdir = workdir
        tree = {
            "cluster": {"redis_url": redis_url, "node_id": name, "token": TOKEN},
            "isaac_sim": {"ip": "127.0.0.1", "ws_port": sim_port},
            "reconnect": {"initial_delay_seconds": 0.1, "max_delay_seconds": 0.5, "connect_timeout_seconds": 2},
            "limits": {"session_create_rate": 10000, "session_create_burst": 100000},
            "streaming": {"linger_seconds": 1},
            "logging": {"level": "info"},
        }
        for key, value in (extra or {}).items():
            tree.setdefault(key, {}).update(value)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(tree))
        self.api = Api(f"http://127.0.0.1:{self.port}")
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / f"{name}.log"
        self.viewers: list[tornado.websocket.WebSocketClientConnection] = []

    def start(self) -> None:
        if self.process is not None:  # started again (a restart): the old process has exited
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "vsproxy", "--config", str(self.config_path), "--port", str(self.port)]
        env = clean_env()
        if self.clock is not None:
            try:
                command, env = clock_off(command, self.clock, env)
            except FaketimeMissing as exc:
                pytest.fail(str(exc))
        self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=subprocess.DEVNULL,
                                        stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None and self.process.poll() is None, f"{self.name} died: {self.log()}"
            try:
                code, body, _ = await self.api.call("GET", "/health")
                if code == 200 and body["cluster"]["redis"] == "connected":
                    return body
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not healthy in {timeout} s: {self.log()}"
            await asyncio.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        if self.process is not None:
            self._log.close()
            self.process = None

    async def upstream(self) -> dict:
        code, body, _ = await self.api.call("GET", "/upstreams")
        assert code == 200, body
        (status,) = [u for u in body["upstreams"] if u["name"] == "isaac"]
        return status

    async def metrics(self) -> dict[str, dict[tuple, float]]:
        """/metrics as {family: {label values: value}} (counters under their family name)."""
        code, _, response = await self.api.call("GET", "/metrics")
        assert code == 200
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(response.body.decode()):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    out.setdefault(family.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    async def viewer(self, session_id: str) -> tornado.websocket.WebSocketClientConnection:
        conn = await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{self.port}/stream/{session_id}?format=binary")
        self.viewers.append(conn)  # closed by the `cluster` fixture
        assert "Connected" in json.loads(await conn.read_message())["message"]
        return conn


@pytest.fixture
def cluster(tmp_path, redis_server, sim):  # noqa: F811 - the fixture imported above
    """A factory of started nodes (all stopped at the end)."""
    nodes: list[Node] = []

    def make(count: int, extra: dict | None = None, clock: str | None = None) -> list[Node]:
        for _ in range(count):
            node = Node(tmp_path, f"node{len(nodes) + 1}", redis_server.url, sim.port, extra, clock)
            node.start()
            nodes.append(node)
        return nodes[-count:]

    yield make
    stop_all(nodes)


def stop_all(nodes: list[Node]) -> None:
    """Stop the nodes and their viewers; fail if a node logged a traceback. Expected failures
    (Redis down, a node killed) are one-line messages; a traceback is an exception nobody handled
    (one broke failover unnoticed for a while)."""
    for node in nodes:
        for viewer in node.viewers:
            viewer.close()
        node.stop()
    for node in nodes:
        log = node.log()
        assert "Traceback (most recent call last)" not in log, f"{node.name} logged a traceback:\n{log[-4000:]}"


async def assert_health_documented(node: Node) -> None:
    """A cluster node's /health (with its `cluster` object) is what the OpenAPI document says."""
    contract = Contract(openapi_document())
    code, body, response = await node.api.call("GET", "/health")
    contract.check("GET", "/health", code, response.headers, response.body)
    assert not contract.problems, contract.problems
    assert set(body["cluster"]) >= {"node", "nodes", "redis"}


async def started(nodes: list[Node]) -> list[Node]:
    for node in nodes:
        await node.wait_healthy()
    return nodes


async def real_frame(conn: tornado.websocket.WebSocketClientConnection, sim, timeout: float) -> bytes:
    """The next binary message that is one of the simulator's own frames (not an offline picture)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, bytes) and message in sim.frames:
            return message


@pytest.mark.gen_test(timeout=60)
async def test_any_node_answers_and_a_destroy_closes_viewers_everywhere(cluster, sim):
    node1, node2, node3 = await started(cluster(3))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u1", "robotName": "r1"})
    assert code == 200, created
    sid = created["sessionId"]
    code, on1, _ = await node1.api.call("GET", f"/session/{sid}")
    for node in (node2, node3):
        code, body, _ = await node.api.call("GET", f"/session/{sid}")
        assert code == 200, body
        for field in ("id", "userId", "robotName", "createdAt", "upstream"):
            assert body["session"][field] == on1["session"][field]
        code, listing, _ = await node.api.call("GET", "/sessions")
        assert sid in [s["id"] for s in listing["sessions"]]
    viewer = await node1.viewer(sid)
    await real_frame(viewer, sim, 10)
    code, body, _ = await node3.api.call("DELETE", f"/session/{sid}")
    assert code == 200, body
    destroyed = time.monotonic()
    while await asyncio.wait_for(viewer.read_message(), 2) is not None:
        pass
    assert time.monotonic() - destroyed < 1.0
    assert viewer.close_reason == "Session destroyed"
    for node in (node1, node2, node3):
        code, _, _ = await node.api.call("GET", f"/session/{sid}")
        assert code == 404


@pytest.mark.gen_test(timeout=90)
async def test_one_upstream_connection_frames_identical_on_every_node_and_failover(cluster, sim):
    nodes = await started(cluster(3))
    code, created, _ = await nodes[0].api.call("POST", "/session/create", {"userId": "u1", "robotName": "r1"})
    sid = created["sessionId"]
    viewers = [await node.viewer(sid) for node in nodes]
    for viewer in viewers:
        for _ in range(5):
            await real_frame(viewer, sim, 15)  # byte-identical to what the simulator sent
    assert len(sim.clients) == 1 and sim.peak_clients == 1, "more than one upstream connection"
    roles = {node.name: (await node.upstream())["source"]["role"] for node in nodes}
    assert sorted(roles.values()) == ["edge", "edge", "origin"], roles
    (origin,) = [n for n in nodes if roles[n.name] == "origin"]
    status = await origin.upstream()
    assert sorted(status["source"]["edges"]) == sorted(n.name for n in nodes if n is not origin)

    # kill -9 of the origin: the other nodes' viewers stay connected and get frames again within 10 s.
    survivors = [(n, v) for n, v in zip(nodes, viewers, strict=True) if n is not origin]
    killed = time.monotonic()
    origin.kill(signal.SIGKILL)
    await asyncio.sleep(0.2)
    sim.frames.clear()  # from now on, only frames sent after the kill count
    for _node, viewer in survivors:
        await real_frame(viewer, sim, 10 - (time.monotonic() - killed))
    failover = time.monotonic() - killed
    print(f"failover: frames again {failover:.2f} s after kill -9 of the origin")
    assert failover < 10
    await asyncio.sleep(0.5)
    assert len(sim.clients) == 1, f"{len(sim.clients)} upstream connections after failover"
    new_roles = sorted([(await n.upstream())["source"]["role"] for n, _ in survivors])
    assert new_roles == ["edge", "origin"]


@pytest.mark.gen_test(timeout=90)
async def test_concurrent_creates_over_three_nodes_respect_max_sessions_exactly(cluster):
    nodes = await started(cluster(3, {"limits": {"max_sessions": 100}}))
    client = AsyncHTTPClient(force_instance=True, max_clients=200)

    async def create(i: int) -> int:
        node = nodes[i % 3]
        request = HTTPRequest(f"http://127.0.0.1:{node.port}/session/create", method="POST",
                              body=json.dumps({"userId": f"user{i}", "robotName": "r"}),
                              headers={"Content-Type": "application/json"}, request_timeout=30)
        response = await client.fetch(request, raise_error=False)
        if response.code == 503:
            assert "Maximum number of sessions" in json.loads(response.body)["error"]
        return response.code

    started_at = time.monotonic()
    codes = await asyncio.gather(*(create(i) for i in range(200)))
    print(f"200 concurrent creates over 3 nodes in {time.monotonic() - started_at:.2f} s")
    client.close()
    assert codes.count(200) == 100, sorted(set(codes))
    assert codes.count(503) == 100, sorted(set(codes))
    for node in nodes:
        code, listing, _ = await node.api.call("GET", "/sessions")
        assert listing["count"] == 100


@pytest.mark.gen_test(timeout=90)
async def test_redis_down_and_back_keeps_streaming_and_sessions(cluster, sim, redis_server):  # noqa: F811
    node1, node2 = await started(cluster(2))
    ids = []
    for node in (node1, node2):
        code, created, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        assert code == 200
        ids.append(created["sessionId"])
    viewers = [await node1.viewer(ids[0]), await node2.viewer(ids[1])]
    for viewer in viewers:
        await real_frame(viewer, sim, 15)
    await assert_health_documented(node1)

    redis_server.stop()
    for node in (node1, node2):
        deadline = time.monotonic() + 5
        while (health := (await node.api.call("GET", "/health"))[1])["status"] != "degraded":
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)
        assert health["cluster"]["redis"] == "unreachable" and "Redis" in health["cluster"]["problem"]
        # /health is public: the kind of failure, not Redis's address (the node's log has that).
        # The port as a number of its own: "bytesPerSecondIn": 151959 holds port 51959 too (a CI run).
        assert not re.search(rf"(?<![0-9]){redis_server.port}(?![0-9])", json.dumps(health)), health
        await assert_health_documented(node)
        code, body, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        assert code == 503 and body["success"] is False and "Redis" in body["error"], (code, body)
        code, body, _ = await node.api.call("DELETE", f"/session/{ids[0]}")
        assert code == 503, body
        for sid in ids:  # reads from the node's own view
            code, body, _ = await node.api.call("GET", f"/session/{sid}")
            assert code == 200, body
    for viewer in viewers:  # streaming goes on
        for _ in range(3):
            await real_frame(viewer, sim, 5)

    redis_server.start()  # empty: no persistence
    for node in (node1, node2):
        await node.wait_healthy(timeout=15)
    deadline = time.monotonic() + 10
    while redis_server.command("HLEN", "vsproxy:sessions") != b":2\r\n":
        assert time.monotonic() < deadline, redis_server.command("HLEN", "vsproxy:sessions")
        await asyncio.sleep(0.1)
    for node in (node1, node2):
        for sid in ids:
            code, body, _ = await node.api.call("GET", f"/session/{sid}")
            assert code == 200, body
    for viewer in viewers:
        await real_frame(viewer, sim, 5)
    code, body, _ = await node2.api.call("DELETE", f"/session/{ids[0]}")
    assert code == 200, body
    assert len(sim.clients) == 1


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_of_the_origin_hands_the_upstream_over(cluster, sim):
    node1, node2 = await started(cluster(2))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]
    first = await node1.viewer(sid)
    await real_frame(first, sim, 15)
    second = await node2.viewer(sid)
    await real_frame(second, sim, 15)
    assert (await node1.upstream())["source"]["role"] == "origin"
    node1.process.send_signal(signal.SIGTERM)
    while await asyncio.wait_for(first.read_message(), 5) is not None:
        pass
    assert first.close_reason == "Server shutting down; reconnect to resume"
    assert node1.process.wait(timeout=10) == 0
    sim.frames.clear()
    handed_over = time.monotonic()
    await real_frame(second, sim, 5)
    print(f"drain: frames on the other node again {time.monotonic() - handed_over:.2f} s after the origin closed")
    assert (await node2.upstream())["source"]["role"] == "origin"
    assert len(sim.clients) == 1
    code, body, _ = await node2.api.call("GET", f"/session/{sid}")
    assert code == 200, body  # the session outlives the node


@pytest.mark.gen_test(timeout=60)
async def test_idle_sessions_are_reaped_once_for_the_whole_cluster(cluster):
    nodes = await started(cluster(3, {"sessions": {"idle_timeout_seconds": 1, "cleanup_interval_seconds": 0.2}}))
    ids = []
    for node in nodes:
        code, created, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        ids.append(created["sessionId"])
    deadline = time.monotonic() + 10
    while (await nodes[0].api.call("GET", "/sessions"))[1]["count"]:
        assert time.monotonic() < deadline, "idle sessions not reaped"
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    reaped = []
    for node in nodes:
        metrics = (await node.api.call("GET", "/metrics"))[2].body.decode()
        reaped += [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('vsproxy_sessions_destroyed_total{reason="idle"}')]
    assert sum(reaped) == 3, reaped  # each session reaped by one node only, not once per node


@pytest.mark.gen_test(timeout=60)
async def test_session_activity_is_kept_on_redis_clock_not_a_nodes(cluster, sim):
    """Nodes' clocks differ (NTP off or drifting on one of them). A session watched on a node
    whose clock is 2 minutes behind is not reaped by the others as idle, and an idle session
    created on a node 2 minutes ahead is reaped on time, not 2 minutes late."""
    settings = {"sessions": {"idle_timeout_seconds": 2, "cleanup_interval_seconds": 0.2}}
    nodes = cluster(1, settings)
    behind, ahead = cluster(1, settings, clock="-120s")[0], cluster(1, settings, clock="+120s")[0]
    await started([*nodes, behind, ahead])
    created = []
    for node in (nodes[0], behind, ahead):
        code, body, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        assert code == 200, body
        created.append(body["sessionId"])
    reference, watched, idle = created
    millis = [int(session_id.split("_")[1]) for session_id in created]  # stream_<creator's epoch ms>_...
    assert millis[1] + 100_000 < millis[0] < millis[2] - 100_000, millis  # the nodes' clocks really are off
    viewer = await behind.viewer(watched)
    await real_frame(viewer, sim, timeout=10)
    started_at = time.monotonic()
    idle_gone = None
    while time.monotonic() - started_at < 8:  # four idle timeouts; every node reaps in some rounds
        await real_frame(viewer, sim, timeout=5)  # fails if the watched session's viewer was closed
        listed = (await nodes[0].api.call("GET", "/sessions"))[1]["sessions"]  # a GET of one would touch it
        if idle_gone is None and idle not in [s["id"] for s in listed]:
            idle_gone = time.monotonic() - started_at
    listed = [s["id"] for s in (await nodes[0].api.call("GET", "/sessions"))[1]["sessions"]]
    assert watched in listed
    assert reference not in listed  # idle, created on the node whose clock is right
    assert idle_gone is not None, "an idle session created on a node 2 minutes ahead was not reaped in 8 s"
    print(f"idle session of the node ahead reaped after {idle_gone:.1f} s (idle timeout 2 s)")


@pytest.mark.gen_test(timeout=150)
async def test_rolling_restart_keeps_sessions_and_one_upstream_connection(cluster, sim, redis_server):  # noqa: F811
    """Every node, one at a time: SIGTERM, then started again on the same port. Every session
    answers on every node after each restart, viewers reconnect and get frames, the lease is held by
    at most one (registered) node at every sample, and the simulator never sees two connections."""
    nodes = await started(cluster(3))
    ids = []
    for node in nodes:
        code, created, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        assert code == 200, created
        ids.append(created["sessionId"])
    viewers = {node.name: await node.viewer(sid) for node, sid in zip(nodes, ids, strict=True)}
    for viewer in viewers.values():
        await real_frame(viewer, sim, 15)

    samples: list[tuple[float, str | None]] = []  # (time, lease holder)
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            raw = redis_server.command("GET", "vsproxy:lease:isaac")
            holder = None if raw.startswith(b"$-1") else raw.split(b"\r\n")[1].decode()
            samples.append((time.monotonic(), holder))
            assert len(sim.clients) <= 1, f"{len(sim.clients)} upstream connections at once"
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    try:
        for index, node in enumerate(nodes):
            node.process.send_signal(signal.SIGTERM)
            old = viewers.pop(node.name)
            while await asyncio.wait_for(old.read_message(), 10) is not None:
                pass
            assert old.close_reason == "Server shutting down; reconnect to resume"
            assert node.process.wait(timeout=10) == 0, node.log()
            node.start()  # the same port: what a rolling restart behind a load balancer looks like
            await node.wait_healthy()
            for other in nodes:
                for sid in ids:
                    code, body, _ = await other.api.call("GET", f"/session/{sid}")
                    assert code == 200, (other.name, sid, body)
            viewers[node.name] = await node.viewer(ids[index])  # the viewer comes back to its node
            for viewer in viewers.values():
                await real_frame(viewer, sim, 15)
            assert not sampler.done(), sampler.exception()
    finally:
        stop_sampling.set()
        await sampler  # raises what the sampler saw

    names = {node.name for node in nodes}
    holders = [holder for _, holder in samples if holder is not None]
    assert set(holders) <= names, set(holders)
    # The longest stretch with no holder: only the hand-overs, each short.
    gap = longest = 0.0
    for (t0, h0), (t1, _h1) in itertools.pairwise(samples):
        gap = gap + (t1 - t0) if h0 is None else 0.0
        longest = max(longest, gap)
    print(f"rolling restart: {len(samples)} lease samples, longest with no holder {longest:.2f} s, "
          f"holders in turn: {[h for i, h in enumerate(holders) if i == 0 or holders[i - 1] != h]}")
    assert len(set(holders)) >= 2, "the upstream was never handed over"
    assert longest < 5, longest
    assert sim.peak_clients == 1, "two upstream connections at once"
    assert len(sim.clients) == 1


@pytest.mark.gen_test(timeout=90)
async def test_cluster_metrics_name_nodes_origin_edges_relay_traffic_and_redis(cluster, sim, redis_server):  # noqa: F811
    nodes = await started(cluster(3))
    code, created, _ = await nodes[0].api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]
    viewers = [await node.viewer(sid) for node in nodes]
    for viewer in viewers:
        for _ in range(3):
            await real_frame(viewer, sim, 15)
    isaac = (("upstream", "isaac"),)
    for node in nodes:  # each node sees the others at its next heartbeat (every second)
        deadline = time.monotonic() + 5
        while (await node.metrics())["vsproxy_cluster_nodes"][()] != 3:
            assert time.monotonic() < deadline, f"{node.name} does not count 3 nodes"
            await asyncio.sleep(0.1)
    scraped = {node.name: await node.metrics() for node in nodes}
    roles = {node.name: (await node.upstream())["source"]["role"] for node in nodes}
    for name, metrics in scraped.items():
        assert metrics["vsproxy_cluster_nodes"][()] == 3
        assert metrics["vsproxy_cluster_redis_up"][()] == 1
        if roles[name] == "origin":
            assert metrics["vsproxy_cluster_origin"][isaac] == 1
            assert metrics["vsproxy_cluster_edges"][isaac] == 2
            assert metrics["vsproxy_cluster_relay_received_bytes"][isaac] == 0
        else:
            assert metrics["vsproxy_cluster_origin"][isaac] == 0
            assert metrics["vsproxy_cluster_edges"][isaac] == 0
            assert metrics["vsproxy_cluster_relay_frames_received"][isaac] >= 3
            assert metrics["vsproxy_cluster_relay_received_bytes"][isaac] >= 3 * min(map(len, sim.frames))
    assert sorted(roles.values()) == ["edge", "edge", "origin"], roles

    # The README's cluster metrics table names exactly the cluster_* families and their labels.
    documented = readme_metrics("| Cluster metric | Labels | What |")
    metrics = scraped[nodes[0].name]
    cluster_families = {name for name in metrics if name.startswith("vsproxy_cluster_")}
    assert {name.removesuffix("_total") for name in documented} == cluster_families
    for name, labels in documented.items():
        assert {key for values in metrics[name.removesuffix("_total")] for key, _ in values} == labels, name

    redis_server.stop()
    deadline = time.monotonic() + 5
    while (await nodes[0].metrics())["vsproxy_cluster_redis_up"][()] != 0:
        assert time.monotonic() < deadline, "vsproxy_cluster_redis_up still 1 with Redis stopped"
        await asyncio.sleep(0.1)


async def wait_for_encoder(node: Node, running: bool, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (await node.upstream())["encoder"] is not running:
        assert time.monotonic() < deadline, f"{node.name}: encoder still {not running}"
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=90)
async def test_edge_h264_viewers_get_the_origins_access_units_from_its_one_encoder(cluster, sim):
    origin, edge = await started(cluster(2))
    code, created, _ = await origin.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]
    await real_frame(await origin.viewer(sid), sim, 15)  # node1 takes the upstream: the origin
    jpeg_on_edge = await edge.viewer(sid)  # keeps the relay up when the H.264 viewer leaves
    await real_frame(jpeg_on_edge, sim, 15)
    assert (await edge.upstream())["source"]["role"] == "edge"
    assert (await origin.upstream())["encoder"] is False  # no H.264 viewer anywhere yet

    h264 = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{edge.port}/stream/{sid}?format=h264")
    edge.viewers.append(h264)
    units: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(units) < 15:
        message = await asyncio.wait_for(h264.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"H.264 viewer closed: {h264.close_code} {h264.close_reason}"
        if isinstance(message, bytes):
            keyframe, _, unit = parse_message(message)
            assert keyframe or units, "the first access unit is no keyframe"
            units.append(unit)
    pictures = decode_annexb(units)
    assert len(pictures) >= 10 and (pictures[0].width, pictures[0].height) == (320, 240)

    # One encoder cluster-wide: the origin's; the edge never started one.
    assert (await origin.upstream())["encoder"] is True
    assert (await edge.upstream())["encoder"] is False
    isaac = (("upstream", "isaac"),)
    assert (await edge.metrics())["vsproxy_encoder_starts"][isaac] == 0
    assert (await origin.metrics())["vsproxy_encoder_running"][isaac] == 1
    assert len(sim.clients) == 1 and sim.peak_clients == 1

    # The edge's H.264 viewer leaves (its JPEG viewer stays, and the relay with it): the origin's
    # encoder stops, since no edge and no local viewer needs H.264 any more.
    h264.close()
    await wait_for_encoder(origin, False)
    await real_frame(jpeg_on_edge, sim, 5)
    assert (await edge.upstream())["source"]["role"] == "edge"
    assert (await edge.metrics())["vsproxy_encoder_starts"][isaac] == 0
