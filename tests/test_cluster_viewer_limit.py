"""limits.max_viewers_per_session in a cluster: one count for the whole cluster, kept in Redis.

Real redis-server, nodes as real `python -m vsproxy` processes (the fixtures of test_cluster.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import tornado.websocket
from cluster_fixtures import redis_server  # noqa: F401 - the fixture
from helpers import Mjpeg, assert_json_error, next_message
from test_cluster import Node, cluster, real_frame, started  # noqa: F401 - the fixture

from vsproxy.cluster.node import NODE_TTL_SECONDS

pytestmark = [pytest.mark.external, pytest.mark.slow]  # redis-server and vsproxy subprocesses

FULL = "Maximum number of viewers per session ({}) reached"
REDIS_DOWN = "Session registry unavailable (Redis cannot be reached); try again shortly"


async def create_session(node: Node) -> str:
    code, created, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    assert code == 200, created
    return created["sessionId"]


async def attempt(node: Node, session_id: str) -> tuple[tornado.websocket.WebSocketClientConnection | None, str]:
    """One WebSocket viewer: (the connection, "") if admitted, else (None, the close reason), refused
    as a single node refuses (the upgrade, then close 1013 with the reason)."""
    conn = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{node.port}/stream/{session_id}?format=binary")
    node.viewers.append(conn)  # closed by the `cluster` fixture
    first = await next_message(conn, 10)
    if first is None:
        assert conn.close_code == 1013, (conn.close_code, conn.close_reason)
        return None, conn.close_reason or ""
    assert "Connected" in json.loads(first)["message"], first
    return conn, ""


async def admit(node: Node, session_id: str) -> tornado.websocket.WebSocketClientConnection:
    conn, reason = await attempt(node, session_id)
    assert conn is not None, f"refused on {node.name}: {reason}"
    return conn


async def refused(node: Node, session_id: str) -> str:
    conn, reason = await attempt(node, session_id)
    assert conn is None, f"admitted on {node.name}"
    return reason


async def assert_mjpeg_refused(node: Node, session_id: str, error: str) -> None:
    """The HTTP outputs' refusal: 503 with the JSON error body, before any stream starts."""
    mjpeg = await Mjpeg.open(node.port, f"/stream/{session_id}/mjpeg")
    assert_json_error(mjpeg.status, mjpeg.json(), 503)
    assert mjpeg.json()["error"] == error


@pytest.mark.gen_test(timeout=90)
async def test_concurrent_viewers_over_three_nodes_respect_the_limit_exactly(cluster, sim):  # noqa: F811
    nodes = await started(cluster(3, {"limits": {"max_viewers_per_session": 5}}))
    sid = await create_session(nodes[0])

    results = await asyncio.gather(*(attempt(nodes[i % 3], sid) for i in range(12)))  # round robin
    admitted = [(nodes[i % 3], conn) for i, (conn, _) in enumerate(results) if conn is not None]
    reasons = [reason for conn, reason in results if conn is None]
    print(f"12 concurrent viewers over 3 nodes, limit 5: admitted on {sorted(n.name for n, _ in admitted)}")
    assert len(admitted) == 5
    assert reasons == [FULL.format(5)] * 7
    for _node, conn in admitted:
        await real_frame(conn, sim, 15)
    for node in nodes:  # every node counts the others' viewers
        await assert_mjpeg_refused(node, sid, FULL.format(5))

    # One leaves: its place is free at once, for a viewer on another node.
    leaving_node, leaving = admitted[0]
    other = next(n for n in nodes if n is not leaving_node)
    leaving.close()
    left = time.monotonic()
    while (result := await attempt(other, sid))[0] is None:
        assert result[1] == FULL.format(5)
        assert time.monotonic() - left < 1.0, "the place of a viewer that left was not freed within 1 s"
        await asyncio.sleep(0.05)
    print(f"a viewer's place was free again on another node {time.monotonic() - left:.2f} s after it left")
    await real_frame(result[0], sim, 15)
    for node in nodes:
        assert await refused(node, sid) == FULL.format(5)


@pytest.mark.gen_test(timeout=90)
async def test_a_killed_nodes_places_are_freed_within_the_node_expiry(cluster, sim):  # noqa: F811
    node1, node2, node3 = await started(cluster(3, {"limits": {"max_viewers_per_session": 4}}))
    sid = await create_session(node1)
    for node in (node2, node2, node3, node3):
        await admit(node, sid)
    assert await refused(node1, sid) == FULL.format(4)

    # kill -9 of both nodes holding the places; node2 comes back at once under the same node ID (a
    # new process: the old one's places must not come back with it).
    node2.kill(signal.SIGKILL)
    node3.kill(signal.SIGKILL)
    killed = time.monotonic()
    node2.start()
    assert await refused(node1, sid) == FULL.format(4)  # until the cluster notices they are gone
    joined: list[float] = []
    while len(joined) < 4:
        conn, reason = await attempt(node1, sid)
        if conn is not None:
            joined.append(time.monotonic() - killed)
            continue
        assert reason == FULL.format(4)
        assert time.monotonic() - killed < NODE_TTL_SECONDS + 1.5, f"places still held; joined after {joined}"
        await asyncio.sleep(0.2)
    print(f"kill -9 of two nodes holding 4 places (one restarted at once): places free again after "
          f"{', '.join(f'{t:.2f}' for t in joined)} s (node expiry {NODE_TTL_SECONDS:g} s)")
    await node2.wait_healthy()
    for node in (node1, node2):  # full again, with node1's four viewers, on the restarted node too
        assert await refused(node, sid) == FULL.format(4)


@pytest.mark.gen_test(timeout=120)
async def test_redis_down_refuses_new_viewers_and_places_come_back(cluster, sim, redis_server):  # noqa: F811
    node1, node2 = await started(cluster(2, {"limits": {"max_viewers_per_session": 2}}))
    sid = await create_session(node1)
    first = await admit(node1, sid)
    second = await admit(node2, sid)
    for conn in (first, second):
        await real_frame(conn, sim, 15)

    redis_server.stop()
    deadline = time.monotonic() + 5
    while (await node1.api.call("GET", "/health"))[1]["status"] != "degraded":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    # A new viewer: the documented Redis-down answer (the places cannot be counted), on every output.
    assert await refused(node1, sid) == REDIS_DOWN
    await assert_mjpeg_refused(node1, sid, REDIS_DOWN)
    for conn in (first, second):  # the viewers there were keep streaming
        for _ in range(3):
            await real_frame(conn, sim, 5)
    first.close()  # leaves while Redis is down: its place is given back once Redis is back

    redis_server.start()  # empty: no persistence
    for node in (node1, node2):
        await node.wait_healthy()
    # Each node writes back the places it holds (second's on node2, none on node1) within a heartbeat.
    deadline = time.monotonic() + 10
    while redis_server.command("HLEN", f"vsproxy:viewers:{sid}") != b":1\r\n":
        assert time.monotonic() < deadline, redis_server.command("HGETALL", f"vsproxy:viewers:{sid}")
        await asyncio.sleep(0.1)
    await real_frame(second, sim, 15)
    third = await admit(node1, sid)  # first's place
    assert await refused(node1, sid) == FULL.format(2)  # second's place still counts
    assert await refused(node2, sid) == FULL.format(2)

    # Destroying the session drops its places with it.
    code, body, _ = await node2.api.call("DELETE", f"/session/{sid}")
    assert code == 200, body
    for conn in (second, third):
        while await asyncio.wait_for(conn.read_message(), 5) is not None:
            pass
    await asyncio.sleep(0.5)  # the viewers' places given back after the destroy do not bring the key back
    assert redis_server.command("EXISTS", f"vsproxy:viewers:{sid}") == b":0\r\n"


@pytest.mark.gen_test(timeout=120)
async def test_a_place_taken_while_redis_hung_is_given_back(cluster, sim, redis_server):  # noqa: F811
    """Redis stops answering (SIGSTOP: a stall, a long fork) while a viewer connects: it is refused
    after the 2 s timeout, but its place request waits in Redis and runs once Redis goes on. The
    node's next heartbeat takes that place back, even where a viewer leaving meanwhile brought the
    node's own count to 0 (the place was held by nobody, for good)."""
    node1, node2 = await started(cluster(2, {"limits": {"max_viewers_per_session": 2}}))
    sid = await create_session(node1)
    first = await admit(node1, sid)
    await real_frame(first, sim, 15)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert await refused(node1, sid) == REDIS_DOWN  # its place request is queued in Redis
        first.close()  # its place given back: queued too
        await asyncio.sleep(0.5)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await asyncio.sleep(3)  # a few heartbeats
    assert redis_server.command("EXISTS", f"vsproxy:viewers:{sid}") == b":0\r\n", \
        redis_server.command("HGETALL", f"vsproxy:viewers:{sid}")
    for node in (node1, node2):  # nobody watches: both places are free
        await real_frame(await admit(node, sid), sim, 15)


@pytest.mark.gen_test(timeout=120)
async def test_a_session_refused_while_redis_hung_does_not_appear_afterwards(cluster, redis_server):  # noqa: F811
    """Redis stops answering while a session is created: the client gets the 503 after the 2 s
    timeout, but the create waits in Redis and would run once Redis goes on, leaving a session
    nobody knows of, counted against its user's limit until it idles out. The node abandons it:
    once Redis answers again the session is not there, on any node."""
    node1, node2 = await started(cluster(2, {}))
    earlier = await create_session(node1)  # (Redis has the create script from then on)
    code, _, _ = await node1.api.call("DELETE", f"/session/{earlier}")
    assert code == 200
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        code, body, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
        assert_json_error(code, body, 503)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await asyncio.sleep(3)
    assert redis_server.command("HLEN", "vsproxy:sessions") == b":0\r\n"
    assert redis_server.command("HLEN", "vsproxy:users") == b":0\r\n"
    for node in (node1, node2):
        code, listed, _ = await node.api.call("GET", "/sessions")
        assert code == 200 and listed["sessions"] == [], listed
    # Counted where it was abandoned, as the README says (/metrics once left this reason out).
    destroyed = (await node1.metrics())["vsproxy_sessions_destroyed"]
    assert destroyed == {(("reason", "abandoned"),): 1, (("reason", "api"),): 1, (("reason", "idle"),): 0}, destroyed
