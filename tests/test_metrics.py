"""Prometheus: /metrics of a busy proxy linted by promtool, naming and label rules, OpenMetrics, the
deploy/ configs (promtool checks and rule unit tests), and a real Prometheus scraping the proxy.

promtool and prometheus come from Debian's `prometheus` package; a missing binary fails the tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import WhepClient, free_port, raw_request, read_until_closed, spawn, wait_until
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from test_docs_match_code import readme_metrics
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from vsproxy.app import Proxy
from vsproxy.config import config_from_dict
from vsproxy.metrics import ProxyCollector
from vsproxy.outputs import TRANSPORTS
from vsproxy.sessions import CLOSE_REASONS

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
STANDARD_PREFIXES = ("vsproxy_", "process_", "python_")  # ours, and prometheus_client's collectors


def need(binary: str) -> str:
    assert Path(binary).exists(), f"{binary} not found: apt-get install --no-install-recommends prometheus"
    return binary


async def promtool(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run promtool without blocking the event loop the proxy under test runs in."""
    proc = await asyncio.create_subprocess_exec(
        need(PROMTOOL), *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    return proc.returncode or 0, out.decode()


# -- a busy proxy: sessions, and viewers of every transport reading frames --------------------------


class Busy:
    """Five sessions on the simulator with a viewer of each transport, all reading frames."""

    USERS = ("metrics-alice-7f3a", "metrics-bob-91c2", "metrics-carol-0d44", "metrics-dave-5e1b", "metrics-erin-66a0")
    ROBOTS = ("arm-x17", "rover-q2", "drone-k9", "crane-p4", "boat-w8")

    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.tasks: list[asyncio.Task] = []
        self.streams: list[IOStream] = []

    async def start(self, proxy, api, ws_connect, http_port: int) -> Busy:
        for user, robot in zip(self.USERS, self.ROBOTS, strict=True):
            self.sessions.append((await api.create_session(user, robot))["sessionId"])
        ws_json = await ws_connect(f"/stream/{self.sessions[0]}")
        ws_binary = await ws_connect(f"/stream/{self.sessions[1]}?format=binary")
        ws_h264 = await ws_connect(f"/stream/{self.sessions[3]}?format=h264")
        for conn in (ws_json, ws_binary, ws_h264):
            self.tasks.append(spawn(read_until_closed(conn, timeout=None)))
        self.whep = WhepClient(api, f"/stream/{self.sessions[3]}/whep")
        assert await self.whep.connect() == 201
        self.tasks.append(spawn(self.whep.frames(1_000_000, timeout=1e6)))
        for path in (f"/stream/{self.sessions[2]}/mjpeg", f"/stream/{self.sessions[4]}/stream.mp4"):
            stream = await TCPClient().connect("127.0.0.1", http_port)
            self.streams.append(stream)
            await stream.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            self.tasks.append(asyncio.ensure_future(self._drain_stream(stream)))
        # Some HTTP traffic with more than one status code for the request metrics.
        await api.call("GET", "/sessions")
        await api.call("GET", "/session/stream_0000000000000_00000000000000000000000000000000")
        hubs = list(proxy.hubs.values())
        await wait_until(lambda: all(sum(h.stats[t].frames_sent for h in hubs) >= 5 for t in TRANSPORTS),
                         what="frames sent on every transport")
        return self

    @staticmethod
    async def _drain_stream(stream: IOStream) -> None:
        try:
            while True:
                await stream.read_bytes(65536, partial=True)
        except StreamClosedError:
            pass

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        for task in self.tasks:
            task.cancel()
        spawn(self.whep.close())

    @property
    def identities(self) -> set[str]:
        return {*self.sessions, *self.USERS, *self.ROBOTS}


async def scrape(base_url: str, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    response = await AsyncHTTPClient().fetch(base_url + "/metrics", headers=headers, request_timeout=10)
    return response.headers["Content-Type"], response.body.decode()


# -- the exposition --------------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.gen_test(timeout=30)
async def test_busy_scrape_is_promtool_clean_and_follows_naming_rules(sim, proxy, api, ws_connect, http_port,
                                                                      base_url):
    busy = await Busy().start(proxy, api, ws_connect, http_port)
    try:
        content_type, text = await scrape(base_url)
    finally:
        busy.close()
    assert content_type.startswith("text/plain; version=0.0.4")

    rc, out = await promtool("check", "metrics", stdin=text.encode())
    assert rc == 0, f"promtool check metrics failed ({rc}):\n{out}"
    assert out.strip() == "", out

    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    for family in families:
        assert family.name.startswith(STANDARD_PREFIXES), family.name
        if family.type == "counter":
            for sample in family.samples:
                assert sample.name.endswith(("_total", "_created")), sample.name
    for declared in re.findall(r"^# TYPE (\S+) counter$", text, re.MULTILINE):
        assert declared.endswith("_total"), declared

    # Bounded labels only: no session, user or robot ends up in a label (each would be a series).
    label_values = {v for f in families for s in f.samples for v in s.labels.values()}
    assert not label_values & busy.identities, label_values & busy.identities
    assert not any(v.startswith("stream_") for v in label_values)

    # The scrape reflects the busy server.
    assert samples[("vsproxy_sessions", ())] == len(Busy.USERS)
    for transport in TRANSPORTS:
        assert samples[("vsproxy_viewers", (("transport", transport),))] == 1, transport
        assert samples[("vsproxy_frames_sent_total", (("transport", transport),))] >= 5, transport
    assert samples[("vsproxy_upstream_connected", (("upstream", "isaac"),))] == 1
    assert samples[("vsproxy_upstream_frames_received_total", (("upstream", "isaac"),))] > 0


@pytest.mark.gen_test(timeout=30)
async def test_openmetrics_when_accept_asks_for_it(sim, proxy, api, ws_connect, http_port, base_url):
    busy = await Busy().start(proxy, api, ws_connect, http_port)
    try:
        content_type, text = await scrape(base_url, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    finally:
        busy.close()
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}  # raises on malformed OpenMetrics
    assert families["vsproxy_upstream_frames_received"].type == "counter"
    assert families["vsproxy_frame_write_latency_seconds"].type == "histogram"
    # A browser-like Accept without OpenMetrics gets the classic text format.
    content_type, _ = await scrape(base_url, "text/html,*/*;q=0.8")
    assert content_type.startswith("text/plain; version=0.0.4")


@pytest.mark.parametrize("tree", [
    {},
    {"cluster": {"redis_url": "redis://127.0.0.1:1/0", "token": "cluster-test-token-0123456789"}},
], ids=["single", "cluster"])
@pytest.mark.gen_test(timeout=30)
async def test_every_destroy_reason_counted_is_exported_and_documented(tree):
    """vsproxy_sessions_destroyed_total has a sample for each reason the sessions count, and the
    README names them. Before, the collector had a list of its own, without a cluster's abandoned
    (found by review)."""
    proxy = Proxy(config_from_dict(tree))
    try:
        sessions = proxy.sessions
        assert ("abandoned" in sessions.DESTROY_REASONS) == bool(tree)
        for count, reason in enumerate(sessions.DESTROY_REASONS, 1):
            sessions.destroyed_total[reason] = count
        (family,) = [f for f in ProxyCollector(sessions, proxy.hubs, 100).collect()
                     if f.name == "vsproxy_sessions_destroyed"]
        assert {s.labels["reason"]: s.value for s in family.samples} == {
            reason: count for count, reason in enumerate(sessions.DESTROY_REASONS, 1)}
        (row,) = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
                  if line.startswith("| `vsproxy_sessions_destroyed_total` |")]
        assert all(reason in row for reason in sessions.DESTROY_REASONS), row
        assert set(sessions.DESTROY_REASONS) <= CLOSE_REASONS.keys()  # what its viewers are told
    finally:
        if proxy.cluster is not None:
            await proxy.cluster.redis.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_made_up_methods_share_one_label_and_never_reach_the_log_as_sent(http_server, http_port, base_url,
                                                                             caplog):
    # Tornado accepts any token as a method. One new series per invented method would let a client
    # grow the registry (and every scrape) without bound, and its text would land in the log.
    invented = [f"X{i}EVIL" for i in range(20)]
    for method in invented:
        response, stream = await raw_request(http_port, "/health", method=method)
        stream.close()
        assert response.status == 405, (method, response.status)
        assert response.json()["error"] == "Method other not allowed"
    _, text = await scrape(base_url)
    methods = {s.labels["method"] for f in text_string_to_metric_families(text)
               if f.name == "vsproxy_http_requests" for s in f.samples}
    assert "other" in methods
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert not any("EVIL" in record.getMessage() for record in caplog.records)


# -- deploy/: promtool checks, alert rule unit tests, the Grafana dashboard ------------------------


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bvsproxy_[a-z_]+\b", text))


def grafana_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.mark.external
@pytest.mark.gen_test(timeout=30)
async def test_deploy_prometheus_config_and_rules_pass_promtool():
    rc, out = await promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert rc == 0, out
    assert "SUCCESS: 5 rules found" in out, out
    rc, out = await promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert rc == 0, out
    assert "valid prometheus config file syntax" in out and "1 rule files found" in out, out
    config = (DEPLOY / "prometheus.yml").read_text()
    assert "127.0.0.1:8889" in config and "metrics_path: /metrics" in config


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # isaac: connected, then lost at 30 s for good; frames stop with it.
      - series: 'vsproxy_upstream_active{{instance="p:8889",job="vsproxy",upstream="isaac"}}'
        values: '1x60'
      - series: 'vsproxy_upstream_connected{{instance="p:8889",job="vsproxy",upstream="isaac"}}'
        values: '1 1 0x60'
      - series: 'vsproxy_upstream_frames_received_total{{instance="p:8889",job="vsproxy",upstream="isaac"}}'
        values: '0 450 900x60'
      # cam: healthy at 30 fps. demo: idle (no sessions), so neither down nor slow.
      - series: 'vsproxy_upstream_active{{instance="p:8889",job="vsproxy",upstream="cam"}}'
        values: '1x60'
      - series: 'vsproxy_upstream_connected{{instance="p:8889",job="vsproxy",upstream="cam"}}'
        values: '1x60'
      - series: 'vsproxy_upstream_frames_received_total{{instance="p:8889",job="vsproxy",upstream="cam"}}'
        values: '0+450x60'
      - series: 'vsproxy_upstream_active{{instance="p:8889",job="vsproxy",upstream="demo"}}'
        values: '0x60'
      - series: 'vsproxy_upstream_connected{{instance="p:8889",job="vsproxy",upstream="demo"}}'
        values: '0x60'
      - series: 'vsproxy_upstream_frames_received_total{{instance="p:8889",job="vsproxy",upstream="demo"}}'
        values: '0x60'
      # mjpeg viewers miss a third of the frames; ws_binary ones a tenth.
      - series: 'vsproxy_frames_sent_total{{instance="p:8889",job="vsproxy",transport="mjpeg"}}'
        values: '0+300x60'
      - series: 'vsproxy_frames_dropped_total{{instance="p:8889",job="vsproxy",transport="mjpeg"}}'
        values: '0+100x60'
      - series: 'vsproxy_frames_sent_total{{instance="p:8889",job="vsproxy",transport="ws_binary"}}'
        values: '0+300x60'
      - series: 'vsproxy_frames_dropped_total{{instance="p:8889",job="vsproxy",transport="ws_binary"}}'
        values: '0+30x60'
      # p:8889 is at 95 of 100 sessions, q:8889 at 50.
      - series: 'vsproxy_sessions{{instance="p:8889",job="vsproxy"}}'
        values: '95x60'
      - series: 'vsproxy_sessions_max{{instance="p:8889",job="vsproxy"}}'
        values: '100x60'
      - series: 'vsproxy_sessions{{instance="q:8889",job="vsproxy"}}'
        values: '50x60'
      - series: 'vsproxy_sessions_max{{instance="q:8889",job="vsproxy"}}'
        values: '100x60'
      # Cluster nodes: p:8889 loses Redis at 30 s for good; q:8889 for 15 s only (a blip).
      - series: 'vsproxy_cluster_redis_up{{instance="p:8889",job="vsproxy"}}'
        values: '1 1 0x60'
      - series: 'vsproxy_cluster_redis_up{{instance="q:8889",job="vsproxy"}}'
        values: '1 0 1x60'
    alert_rule_test:
      - eval_time: 1m  # isaac down for 30 s: pending, not firing
        alertname: VsproxyUpstreamDown
        exp_alerts: []
      - eval_time: 2m
        alertname: VsproxyUpstreamDown
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "p:8889", job: vsproxy, upstream: isaac}}
            exp_annotations:
              summary: "vsproxy upstream isaac is down"
              description: >-
                Upstream isaac on p:8889 has sessions but has not been connected for over a minute;
                viewers see the "upstream offline" picture.
      - eval_time: 1m
        alertname: VsproxyUpstreamLowFrameRate
        exp_alerts: []
      - eval_time: 5m
        alertname: VsproxyUpstreamLowFrameRate
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "p:8889", job: vsproxy, upstream: isaac}}
            exp_annotations:
              summary: "vsproxy upstream isaac delivers 0.0 fps"
              description: >-
                Upstream isaac on p:8889 has sent fewer than 5 frames a second over the last
                minute while sessions use it.
      - eval_time: 10m
        alertname: VsproxyFrameDropRatioHigh
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "p:8889", job: vsproxy, transport: mjpeg}}
            exp_annotations:
              summary: "vsproxy drops 33.33% of mjpeg frames"
              description: >-
                Viewers on mjpeg at p:8889 miss more than 20% of the frames: their networks are too
                slow for the stream (lower the fps or resolution).
      - eval_time: 4m  # near the limit from the start, but `for: 5m`
        alertname: VsproxySessionsNearLimit
        exp_alerts: []
      - eval_time: 10m
        alertname: VsproxySessionsNearLimit
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "p:8889", job: vsproxy}}
            exp_annotations:
              summary: "vsproxy is at 95% of its session limit"
              description: >-
                p:8889 has over 90% of limits.max_sessions in use; new sessions are refused with 503
                once it is full.
      - eval_time: 45s  # lost for 15 s: pending
        alertname: VsproxyClusterRedisUnreachable
        exp_alerts: []
      - eval_time: 2m
        alertname: VsproxyClusterRedisUnreachable
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "p:8889", job: vsproxy}}
            exp_annotations:
              summary: "vsproxy node p:8889 cannot reach Redis"
              description: >-
                p:8889 has not reached the cluster's Redis for over 30 s; it serves the viewers it
                has, and session creates and destroys answer 503.
"""


@pytest.mark.external
@pytest.mark.gen_test(timeout=30)
async def test_alert_rules_fire_when_they_should_and_only_then(tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.format(rules=json.dumps(str(DEPLOY / "alerts.yml"))))
    rc, out = await promtool("test", "rules", str(tests))
    assert rc == 0, out
    assert "SUCCESS" in out, out


def test_grafana_dashboard_is_valid_with_a_datasource_variable():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert referenced_metrics(target["expr"]), target["expr"]


@pytest.mark.gen_test(timeout=30)
async def test_every_metric_the_deploy_files_use_is_exported(sim, proxy, api, ws_connect, http_port, base_url):
    busy = await Busy().start(proxy, api, ws_connect, http_port)
    try:
        _, text = await scrape(base_url)
    finally:
        busy.close()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used = referenced_metrics((DEPLOY / "alerts.yml").read_text()) | referenced_metrics(" ".join(grafana_exprs()))
    # A cluster node's own metrics: the README's cluster table, which test_cluster.py checks a node exports.
    cluster = {name for name in used if name.startswith("vsproxy_cluster_")}
    assert cluster <= readme_metrics("| Cluster metric | Labels | What |").keys(), cluster
    assert used - cluster - exported == set(), f"not exported: {sorted(used - cluster - exported)}"


# -- a real Prometheus scraping the proxy ----------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path


@pytest.fixture
def prometheus(http_port, tmp_path):
    """Prometheus on a free loopback port, scraping the test server every second and evaluating
    deploy/alerts.yml. Yields its base URL; readiness is awaited by the test (never block the loop)."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
rule_files: [{json.dumps(str(DEPLOY / "alerts.yml"))}]
scrape_configs:
  - job_name: vsproxy
    metrics_path: /metrics
    static_configs: [{{targets: ["127.0.0.1:{http_port}"]}}]
""")
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [need(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log)
    yield Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def prom_get(prom, path: str, **params: str) -> Any:
    url = f"{prom.url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        # raise_error=False covers HTTP statuses only: a refused connection still raises.
        response = await AsyncHTTPClient().fetch(HTTPRequest(url, request_timeout=5), raise_error=False)
    except OSError:
        response = None  # not listening yet
    assert prom.proc.poll() is None, f"prometheus exited:\n{prom.log.read_text()}"
    if response is None or response.code in (599, 503):
        return None  # not listening yet, or listening but still starting (a plain-text 503)
    assert response.code == 200, (path, params, response.code, response.body[:500])
    return json.loads(response.body)["data"]


async def poll(prom, what: str, check: Callable[[], Any], timeout: float = 25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: nothing within {timeout:g} s\n{prom.log.read_text()}"
        await asyncio.sleep(0.25)


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.gen_test(timeout=45)
async def test_real_prometheus_scrapes_rising_frame_counter(sim, proxy, api, ws_connect, http_port, prometheus):
    busy = await Busy().start(proxy, api, ws_connect, http_port)
    try:
        # The first sample takes ~5-6 s: Prometheus 2.42 applies new targets at most every 5 s.
        await poll(prometheus, "target up", lambda: query(prometheus, 'up{job="vsproxy"} == 1'))

        frames = 'vsproxy_upstream_frames_received_total{job="vsproxy",upstream="isaac"}'
        seen: dict[float, float] = {}  # sample timestamp -> value

        async def two_rising_samples() -> bool:
            for result in await query(prometheus, frames) or []:
                timestamp, value = result["value"]
                seen[float(timestamp)] = float(value)
            values = [seen[t] for t in sorted(seen)]
            return len(values) >= 2 and values[-1] > values[0]

        await poll(prometheus, "two rising samples", two_rising_samples)
        increase = await poll(prometheus, "increase > 0", lambda: query(prometheus, f"increase({frames}[10s]) > 0"))
        assert float(increase[0]["value"][1]) > 0

        # deploy/alerts.yml loads and every rule evaluates without error against real data.
        async def rules_evaluated() -> list | None:
            data = await prom_get(prometheus, "/api/v1/rules")
            rules = [r for g in (data or {}).get("groups", []) for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = await poll(prometheus, "rules evaluated", rules_evaluated)
        assert {r["name"] for r in rules} == {"VsproxyUpstreamDown", "VsproxyUpstreamLowFrameRate",
                                              "VsproxyFrameDropRatioHigh", "VsproxySessionsNearLimit",
                                              "VsproxyClusterRedisUnreachable"}
        # Nothing fires on a healthy, busy proxy. (`pending` is allowed: in a series' first minute
        # rate(...[1m]) extrapolates from a few seconds of samples and reads low; `for: 2m` absorbs it.)
        assert not any(r["state"] == "firing" for r in rules), [(r["name"], r["state"]) for r in rules]

        # Every Grafana panel query parses and runs (variables as Grafana would fill them).
        for expr in grafana_exprs():
            concrete = (expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
                        .replace("$upstream", ".*"))
            assert await prom_get(prometheus, "/api/v1/query", query=concrete) is not None, concrete
    finally:
        busy.close()


async def query(prom, promql: str) -> list | None:
    data = await prom_get(prom, "/api/v1/query", query=promql)
    return data["result"] if data else None
