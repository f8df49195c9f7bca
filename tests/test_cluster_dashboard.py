"""The operator dashboard of a cluster node: the nodes, Redis, and per upstream which node holds it
(its origin) and which relay it (its edges). Real redis-server, nodes as real `python -m vsproxy`
processes (the fixtures of test_cluster.py), Chromium."""

from __future__ import annotations

import pytest
from browser import chromium
from cluster_fixtures import redis_server  # noqa: F401 - the fixture
from helpers import poll
from test_cluster import cluster, real_frame, started  # noqa: F401 - the fixture

pytestmark = [pytest.mark.external, pytest.mark.slow, pytest.mark.browser]


@pytest.mark.gen_test(timeout=90)
async def test_dashboard_shows_nodes_redis_origin_and_edges(cluster, sim):  # noqa: F811
    node1, node2 = await started(cluster(2))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    assert code == 200, created
    sid = created["sessionId"]
    await real_frame(await node1.viewer(sid), sim, 10)  # node1 holds the upstream: the origin
    await real_frame(await node2.viewer(sid), sim, 10)  # node2 relays it: an edge

    async def role_of(node) -> dict:
        _, state, _ = await node.api.call("GET", "/dashboard/api/state")
        return next(u for u in state["upstreams"] if u["name"] == "isaac")["cluster"]

    async def roles() -> tuple[dict, dict]:
        return await role_of(node1), await role_of(node2)

    await poll(roles, lambda r: r == ({"role": "origin", "origin": "node1", "edges": ["node2"]},
                                      {"role": "edge", "origin": "node1", "edges": []}),
               "node1 to be the origin with node2 its edge", timeout=10)
    async def cluster_of(node) -> dict:
        return (await node.api.call("GET", "/dashboard/api/state"))[1]["cluster"]

    for node in (node1, node2):  # each node reads the registry once a second
        await poll(lambda node=node: cluster_of(node),
                   lambda c, node=node: c == {"node": node.name, "nodes": ["node1", "node2"], "redis": "connected"},
                   f"{node.name} to list both nodes")

    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1600, "height": 900})
        for node, role in ((node1, "origin: this node · edges node2"), (node2, "edge of node1")):
            await page.goto(f"http://127.0.0.1:{node.port}/dashboard")
            await page.locator("#cluster-total").wait_for(state="visible", timeout=5000)
            assert await page.text_content("#cluster-node") == node.name
            assert await page.text_content("#cluster-nodes") == "of 2: node1 · node2"
            assert await page.text_content("#cluster-redis") == "Redis connected"
            cell = page.locator('tr.upstream[data-upstream="isaac"] td.cluster')
            await cell.wait_for(timeout=5000)
            assert await cell.text_content() == role
            assert await cell.is_visible()
        await page.close()
