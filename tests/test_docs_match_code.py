"""Documentation that must say what the code does: the README's metrics table against a real
scrape, `vsproxy simulate --help`, the dashboard's column names against what they count, and the
OpenAPI document's publisher-ingest and dashboard paths against real responses."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_openapi import Caller, Contract
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from vsproxy import render

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}


# == the README's metrics table ===================================================================

def readme_metrics(header: str = "| Metric | Labels | What |") -> dict[str, set[str]]:
    """{metric name: its label names} from the README's metrics table (the cluster-only metrics
    are a table of their own, "| Cluster metric | ...", checked in tests/test_cluster.py)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index(header):]
    table = table[:table.index("\n\n")]
    out = {}
    for line in table.splitlines()[2:]:
        names, labels, _ = line.strip("|").split("|", 2)
        label_names = set(re.findall(r"`(\w+)`", labels))
        for name in re.findall(r"`(vsproxy_\w+)`", names):
            out[name] = label_names
    return out


@pytest.mark.gen_test(timeout=30)
async def test_readme_metrics_table_lists_each_metrics_labels(api):
    # Something of everything first: a request (the HTTP metrics), a session created and destroyed.
    code, body, _ = await api.call("POST", "/session/create", {"userId": "u", "robotName": "r"}, headers=JSON)
    assert code == 200, body
    await api.call("DELETE", f"/session/{body['sessionId']}")
    code, _, response = await api.call("GET", "/metrics")
    assert code == 200
    scraped: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        labels = scraped.setdefault(family.name, set())
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}  # a histogram's buckets are not a label of its own
    documented = readme_metrics()
    assert "vsproxy_http_request_duration_seconds" in documented
    for name, labels in documented.items():
        family = name.removesuffix("_total")
        assert family in scraped, f"README lists {name}, which /metrics does not have"
        assert scraped[family] == labels, f"{name}: README says labels {sorted(labels)}, /metrics has " \
                                          f"{sorted(scraped[family])}"
    bases = {n.removesuffix("_total") for n in documented}
    # prometheus_client's "<metric>_created" timestamps come out as families of their own: documented too.
    undocumented = {n for n in scraped if n.startswith("vsproxy_") and n not in bases}
    assert not undocumented, f"metrics missing from the README's table: {sorted(undocumented)}"


# == vsproxy simulate --help ======================================================================

@pytest.mark.slow
def test_simulate_help_describes_the_command_and_every_option():
    result = subprocess.run([sys.executable, "-m", "vsproxy", "simulate", "--help"], capture_output=True,
                            text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n", 1)[0]
    assert "Isaac Sim" in description and "WebSocket" in description, text
    options = re.findall(r"^  (?:-h, )?(--[\w-]+)(.*(?:\n {20,}.*)*)", text, re.MULTILINE)
    assert {o for o, _ in options} == {"--help", "--host", "--port", "--width", "--height", "--fps", "--log-level"}
    for option, help_text in options:
        words = re.sub(r"^ [A-Z_{},a-z]+", "", help_text).strip()  # after the metavar
        assert len(words) > 8, f"{option} has no help: {help_text!r}"
    for default in ("1280", "720", "30", "8211", "127.0.0.1", "info"):
        assert f"(default {default})" in text


# == the dashboard's upstream columns ============================================================

def test_the_readme_lists_every_environment_variable_in_its_precedence():
    """Every variable vsproxy reads (config.ENV_KEYS) is in the README's precedence list (before,
    the three cluster ones were missing: found by a new-user walkthrough)."""
    from vsproxy.config import ENV_KEYS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"\n2\. environment variables: (.*?)\n3\. ", text, re.S)
    assert listed, "README.md lacks the precedence list"
    assert set(re.findall(r"`([A-Z_]+)`", listed.group(1))) == set(ENV_KEYS)


def test_dashboard_failures_column_is_named_for_what_it_counts():
    """The column shows `failures` (failed attempts and lost connections, not reconnects)."""
    html = (ROOT / "dashboard" / "index.html").read_text(encoding="utf-8")
    script = (ROOT / "dashboard" / "dashboard.js").read_text(encoding="utf-8")
    head = html[html.index('<table id="upstreams"'):]
    headers = re.findall(r"<th[^>]*>([^<]+)</th>", head[:head.index("</thead>")])
    upstream_rows = script[script.index("for (const u of state.upstreams)"):]
    cells = re.findall(r'(\w+): cell\("([\w -]+)", "([^"]+)"\)', upstream_rows)
    assert [label for _, _, label in cells] == headers, (cells, headers)
    by_field = {field: (css, label) for field, css, label in cells}
    assert by_field["failures"] == ("failures num", "Failures")
    assert by_field["connects"] == ("connects num", "Connects")
    assert "c.failures.textContent = String(u.failures);" in script
    assert "Reconnects" not in html + script


# == the OpenAPI document's publisher ingest and dashboard API, against real responses ============

OPERATOR = ("operator", "operator-password-4711")
PUBLISH = "publish-token-0123456789"
CONTRACT_CONFIG = {
    "auth": {"operators": {OPERATOR[0]: OPERATOR[1]}},
    "limits": {"max_body_bytes": 1024},
    "upstreams": {"pub": {"kind": "push", "token": PUBLISH, "max_frame_bytes": 4096},
                  # Nothing listens on port 1: this upstream never delivers a frame.
                  "dead": {"kind": "isaac", "url": "ws://127.0.0.1:1/"}},
    "default_upstream": "demo",
    "reconnect": {"initial_delay_seconds": 5, "max_delay_seconds": 10},
}
BIG = b"x" * 2048
BAD = "%FF"
UNKNOWN = "stream_1700000000000_" + "0" * 32


@pytest.fixture
def contract(http_server, base_url, io_loop) -> Contract:
    """test_openapi's checker of real responses against the served document."""
    response = io_loop.run_sync(lambda: AsyncHTTPClient().fetch(base_url + "/openapi.json"))
    return Contract(json.loads(response.body))


@pytest.fixture
def call(contract, base_url, http_port) -> Caller:
    return Caller(contract, base_url, http_port)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.config(CONTRACT_CONFIG)
async def test_ingest_and_dashboard_responses_conform(call, contract, api, proxy):
    basic = {"Authorization": "Basic " + base64.b64encode(":".join(OPERATOR).encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"operator:wrong").decode()}
    bearer = {"Authorization": f"Bearer {PUBLISH}"}
    jpeg = render.status_frame(64, 48, "pub", "frame")
    for template, item in contract.doc["paths"].items():
        if template.startswith(("/ingest/", "/dashboard/api/")) and "options" in item:
            path = template.replace("{sessionId}", UNKNOWN).replace("{upstream}", "pub")
            await call("OPTIONS", template, path, headers={"Origin": "http://localhost:3000"}, expect=204)
            if "413" in item["options"]["responses"]:
                await call("OPTIONS", template, path, raw=BIG, expect=413)

    # POST /ingest/{upstream}/frame
    frame = "/ingest/{upstream}/frame"
    await call("POST", frame, "/ingest/pub/frame", raw=jpeg, headers=bearer, expect=200)
    await call("POST", frame, f"/ingest/pub/frame?token={PUBLISH}", raw=jpeg, expect=200)
    await call("POST", frame, "/ingest/pub/frame", raw=jpeg, expect=401)
    await call("POST", frame, "/ingest/dead/frame", raw=jpeg, headers=bearer, expect=404)
    await call("POST", frame, "/ingest/pub/frame", raw=b"not a jpeg", headers=bearer, expect=400)
    await call("POST", frame, "/ingest/pub/frame", raw=b"", headers=bearer, expect=400)
    await call("POST", frame, "/ingest/pub/frame", raw=jpeg + b"\0" * 8192, headers=bearer, expect=413)

    # WS /ingest/{upstream}: refusals before the upgrade, then the upgrade, then a second publisher.
    ws = "/ingest/{upstream}"
    await call.raw("GET", ws, "/ingest/pub", websocket=True, expect=401)
    await call.raw("GET", ws, "/ingest/nope", websocket=True, headers=bearer, expect=404)
    await call.raw("GET", ws, "/ingest/pub", headers=bearer, expect=400)  # not a WebSocket handshake
    await call.raw("GET", ws, "/ingest/pub", websocket=True, headers={**bearer, "Origin": "http://evil.example"},
                   expect=403)
    await call.raw("GET", ws, "/ingest/pub", websocket=True, headers={**bearer, "Sec-WebSocket-Version": "99"},
                   expect=426)
    await call.raw("GET", ws, "/ingest/pub", websocket=True, headers=bearer, expect=101)
    publisher = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{call.port}/ingest/pub", headers=bearer))
    try:
        await wait_until(lambda: proxy.hubs["pub"].source.publisher is not None, "the publisher to attach")
        await call.raw("GET", ws, "/ingest/pub", websocket=True, headers=bearer, expect=409)
    finally:
        publisher.close()

    # The dashboard API, with operator credentials and without.
    for template in ("/dashboard/api/state", "/dashboard/api/events"):
        await call("GET", template, expect=401)
        await call("GET", template, headers=wrong, expect=401)
        await call("GET", template, raw=BIG, headers=basic, expect=413)
    await call("GET", "/dashboard/api/state", headers=basic, expect=200)
    await call.raw("GET", "/dashboard/api/events", "/dashboard/api/events", headers=basic, expect=200)

    thumb = "/dashboard/api/thumbnail/{upstream}.jpg"
    code, body, _ = await api.call("POST", "/session/create", {"userId": "u", "robotName": "r"}, headers=JSON)
    assert code == 200, body
    await wait_until(lambda: proxy.hubs["demo"].latest is not None, "a demo frame")
    await call("GET", thumb, "/dashboard/api/thumbnail/demo.jpg", headers=basic, expect=200)
    await call("GET", thumb, "/dashboard/api/thumbnail/demo.jpg", expect=401)
    await call("GET", thumb, "/dashboard/api/thumbnail/nope.jpg", headers=basic, expect=404)
    await call("GET", thumb, "/dashboard/api/thumbnail/dead.jpg", headers=basic, expect=503)
    await call("GET", thumb, "/dashboard/api/thumbnail/demo.jpg", raw=BIG, headers=basic, expect=413)

    destroy = "/dashboard/api/sessions/{sessionId}"
    sid = body["sessionId"]
    await call("DELETE", destroy, f"/dashboard/api/sessions/{sid}", expect=401)
    await call("DELETE", destroy, f"/dashboard/api/sessions/{sid}", raw=BIG, headers=basic, expect=413)
    await call("DELETE", destroy, f"/dashboard/api/sessions/{BAD}", headers=basic, expect=400)
    await call("DELETE", destroy, f"/dashboard/api/sessions/{sid}", headers=basic, expect=200)
    await call("DELETE", destroy, f"/dashboard/api/sessions/{sid}", headers=basic, expect=404)

    contract.assert_ok()
    documented = {k for k in contract.documented() if k[0].startswith(("/ingest/", "/dashboard/api/"))}
    assert len({k[0] for k in documented}) == 6
    missing = documented - contract.covered - set(INGEST_IN_A_CLUSTER)
    assert not missing, f"documented but never produced: {sorted(missing)}"


# What a publisher is answered only in a cluster, and where that is produced and checked.
INGEST_IN_A_CLUSTER = {
    **{(path, method, status): "test_cluster_relay.py::test_a_push_upstreams_origin_is_the_node_its_publisher_reaches"
       for path, method in (("/ingest/{upstream}", "GET"), ("/ingest/{upstream}/frame", "POST"))
       for status in ("409", "503")},
    # A POSTed frame is forwarded to the node that has the publisher: a 409 only when the lease moved meanwhile.
    ("/ingest/{upstream}/frame", "POST", "409"):
        "test_cluster_relay.py::test_a_forwarded_frame_is_never_forwarded_again",
}


def test_the_landing_page_lists_every_endpoint():
    """The page at / names every path of the API (the OpenAPI document's), but for the dashboard's
    own API and a WHEP resource (its Location): before, it lacked H.264, fMP4, WHEP, /upstreams,
    the token and the ingest endpoints (found by a new-user walkthrough)."""
    from vsproxy.openapi import openapi_document

    page = (ROOT / "vsproxy" / "web" / "index.html").read_text(encoding="utf-8")
    listed = " ".join(re.findall(r"<code>(?:[A-Z]+ )?(/[^<]*)</code>", page))
    missing = [path for path in openapi_document("http://127.0.0.1:8889")["paths"]
               if path != "/" and not path.startswith("/dashboard/api/") and "{resourceId}" not in path
               and path.replace("{sessionId}", "{id}") not in listed.split()]
    assert not missing, missing
