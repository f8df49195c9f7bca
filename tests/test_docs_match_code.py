"""Documentation that must say what the code does: the README's metrics table against a real
scrape, `vsproxy simulate --help`, the dashboard's column names against what they count, and the
OpenAPI document's publisher-ingest and dashboard paths against real responses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}


# == the README's metrics table ===================================================================

def readme_metrics() -> dict[str, set[str]]:
    """{metric name: its label names} from the README's metrics table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| Metric | Labels | What |"):]
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
    # prometheus_client's "<counter>_created" timestamps come out as families of their own.
    undocumented = {n for n in scraped if n.startswith("vsproxy_") and n.removesuffix("_created") not in bases}
    assert not undocumented, f"metrics missing from the README's table: {sorted(undocumented)}"


# == vsproxy simulate --help ======================================================================

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
