"""Every stream URL works on every node, also the moment after the session was created on another
node, before that node's control message has arrived: the handlers look an unknown session up in
Redis. Real redis-server, nodes as real `python -m vsproxy` processes (the fixtures of
test_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from cluster_fixtures import redis_server  # noqa: F401 - the fixture
from helpers import VIEWER_SECRET, WhepClient, assert_json_error, poll, wait_until
from test_cluster import Node, cluster, started  # noqa: F401 - the fixture

from vsproxy.auth import ViewerTokens
from vsproxy.cluster.node import NODE_TTL_SECONDS
from vsproxy.cluster.sessions import SESSIONS

pytestmark = [pytest.mark.external, pytest.mark.slow]  # redis-server and vsproxy subprocesses


@pytest.mark.gen_test(timeout=60)
async def test_a_session_only_in_redis_is_served_by_every_stream_url(cluster, redis_server):  # noqa: F811
    (node,) = await started(cluster(1))
    # What a create on another node writes, without the control message that would tell this node:
    # the node has never heard of the session, only Redis has.
    session_id = f"stream_{int(time.time() * 1000)}_{secrets.token_hex(16)}"
    record = {"id": session_id, "user_id": "u", "robot_name": "r", "upstream": "isaac",
              "created_at": time.time(), "last_activity": time.time()}
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.hset(SESSIONS, session_id, json.dumps(record))
    finally:
        await client.aclose()
    code, _, page = await node.api.call("GET", f"/stream/{session_id}/embed")
    assert code == 200 and b"<canvas" in page.body, (code, page.body[:200])
    code, body, _ = await node.api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code in (200, 503), (code, body)  # 503: no frame on this node yet; never 404
    code, body, _ = await node.api.call("POST", f"/stream/{session_id}/whep", raw=b"not an SDP offer",
                                        headers={"Content-Type": "application/sdp"})
    assert code == 400, (code, body)  # the offer is refused, not the session
    code, _, _ = await node.api.call("GET", "/stream/stream_0_00000000000000000000000000000000/embed")
    assert code == 404


@contextlib.asynccontextmanager
async def playing_peer(node: Node) -> AsyncIterator[tuple[str, WhepClient]]:
    """(session id, WHEP client) of a new session on `node` with a peer there, playing."""
    code, created, _ = await node.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    assert code == 200, created
    sid = created["sessionId"]
    client = WhepClient(node.api, f"/stream/{sid}/whep")
    try:
        assert await client.connect() == 201
        await client.frames(3, timeout=15)
        yield sid, client
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_whep_resource_is_deleted_through_any_node(cluster, sim):  # noqa: F811
    """Behind a load balancer without stickiness a WHEP client's DELETE lands on any node: the node
    holding the peer ends it."""
    node1, node2 = await started(cluster(2))
    async with playing_peer(node1) as (sid, client):
        code, body, _ = await node2.api.call("DELETE", f"/stream/{sid}/whep/not-a-resource")
        assert_json_error(code, body, 404)
        other = (await node2.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"}))[1]["sessionId"]
        code, body, _ = await node2.api.call("DELETE", client.location.replace(sid, other))  # not its session
        assert_json_error(code, body, 404)
        assert (await node1.api.call("GET", f"/session/{sid}"))[1]["session"]["connections"] == 1

        code, _, _ = await node2.api.call("DELETE", client.location)
        assert code == 200
        await wait_until(lambda: client.pc.connectionState == "closed" or client.track.readyState == "ended",
                         "the peer on node1 to end", timeout=10)
        _, body, _ = await poll(lambda: node1.api.call("GET", f"/session/{sid}"),
                                lambda r: r[1]["session"]["connections"] == 0, "node1's peer to leave")
        code, body, _ = await node2.api.call("DELETE", client.location)  # already ended
        assert_json_error(code, body, 404)


@pytest.mark.gen_test(timeout=60)
async def test_a_whep_peers_token_is_renewed_through_any_node(cluster, sim):  # noqa: F811
    """The POST renewing a peer's viewer token lands on any node too: the node holding the peer
    keeps it past the old token's expiry."""
    ttl = 60
    node1, node2 = await started(cluster(2, {"auth": {"viewer_tokens": {
        "enabled": True, "secret": VIEWER_SECRET, "ttl_seconds": ttl}}}))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]
    issuer = ViewerTokens(VIEWER_SECRET, ttl)
    token = issuer.issue(sid, now=time.time() - ttl + 6)  # expires in 5-6 s
    client = WhepClient(node1.api, f"/stream/{sid}/whep?token={token}")
    try:
        assert await client.connect() == 201
        await client.frames(3, timeout=15)
        resource = client.location
        fresh = issuer.issue(sid)
        code, body, _ = await node2.api.call("POST", f"/stream/{sid}/whep/not-a-resource?token={fresh}")
        assert_json_error(code, body, 404)
        code, body, _ = await node2.api.call("POST", resource, headers={"Authorization": f"Bearer {fresh}"})
        assert code == 200 and body["expiresAt"], body
        await asyncio.sleep(max(0.0, float(token.split(".")[0]) - time.time()) + 1.5)
        await client.frames(10, timeout=5)  # still playing, on the same connection
        assert (await node1.api.call("GET", f"/session/{sid}"))[1]["session"]["connections"] == 1
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_connections_count_the_viewers_of_every_node(cluster, sim):  # noqa: F811
    """`connections` and `isIsaacSimConnected` of GET /session and GET /sessions are the same
    whichever node answers, also one without viewers (which does not run the upstream)."""
    node1, node2, node3 = await started(cluster(3))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]
    for node, count in ((node1, 3), (node2, 2)):
        for _ in range(count):
            await node.viewer(sid)

    async def views() -> list[tuple[int, bool]]:
        seen = []
        for node in (node1, node2, node3):
            listing = (await node.api.call("GET", "/sessions"))[1]["sessions"]
            for view in ((await node.api.call("GET", f"/session/{sid}"))[1]["session"],
                         next(s for s in listing if s["id"] == sid)):
                seen.append((view["connections"], view["isIsaacSimConnected"]))
        return seen

    await poll(views, lambda seen: seen == [(5, True)] * 6, "every node to count 5 viewers, upstream connected")


@pytest.mark.gen_test(timeout=60)
async def test_a_whep_resource_of_a_node_that_died_is_a_404_on_the_others(cluster, sim):  # noqa: F811
    """Its peer died with its node (kill -9, which deletes nothing): a DELETE on another node says
    it is not there (404), instead of 200 for a resource nobody ends."""
    node1, node2 = await started(cluster(2))
    async with playing_peer(node1) as (sid, client):
        node1.kill(signal.SIGKILL)
        await asyncio.sleep(NODE_TTL_SECONDS + 1)  # its registration expires
        code, body, _ = await node2.api.call("DELETE", client.location)
        assert_json_error(code, body, 404)


@pytest.mark.gen_test(timeout=60)
async def test_the_late_delete_of_a_peer_that_ended_is_a_200_once_on_any_node(cluster, sim):  # noqa: F811
    """A page that unloads closes its peer connection and sends the DELETE at once; behind a load
    balancer the DELETE lands on any node, after the holding node saw the connection end: it is
    a 200 there as on the holding node (not a 404 warning in the operator's log), and a second
    DELETE is a 404."""
    node1, node2 = await started(cluster(2))
    async with playing_peer(node1) as (sid, client):
        await client.pc.close()  # the page went away; its DELETE comes late
        await poll(lambda: node1.api.call("GET", f"/session/{sid}"),
                   lambda r: r[1]["session"]["connections"] == 0, "node1 to see the peer's connection end",
                   timeout=45)
        code, _, _ = await node2.api.call("DELETE", client.location)
        assert code == 200
        for node in (node2, node1):
            code, body, _ = await node.api.call("DELETE", client.location)
            assert_json_error(code, body, 404)


@pytest.mark.gen_test(timeout=90)
async def test_a_burst_of_lookups_waits_for_redis_instead_of_calling_it_down(cluster, sim):  # noqa: F811
    """300 requests at once for sessions the node does not hold (viewers of a drained node coming
    back, or anyone asking for made-up IDs), each a Redis lookup: answered 404 for the made-up
    ones, the real session's viewer admitted, and Redis still "connected" in /health. Before,
    redis-py's pool raised MaxConnectionsError beyond 100 calls in flight, which the node took for
    Redis being down: 503s, viewers closed with 1013, /health degraded (found by review)."""
    node1, node2 = await started(cluster(2))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    sid = created["sessionId"]

    async def snapshot(session_id: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", node2.port)
        try:
            writer.write(f"GET /stream/{session_id}/snapshot.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Connection: close\r\n\r\n".encode())
            return int((await reader.readline()).split()[1])
        finally:
            writer.close()

    made_up = [f"stream_{int(time.time() * 1000)}_{secrets.token_hex(16)}" for _ in range(300)]
    codes = await asyncio.gather(*(snapshot(s) for s in made_up))
    assert set(codes) == {404}, sorted(set(codes))
    health = (await node2.api.call("GET", "/health"))[1]
    assert health["cluster"]["redis"] == "connected", health
    assert "problem" not in health["cluster"], health
    viewer = await node2.viewer(sid)  # admitted: its place counted in Redis
    assert viewer.close_code is None


@pytest.mark.gen_test(timeout=90)
async def test_a_session_unknown_here_while_redis_is_down_is_a_503_not_a_404(cluster, redis_server):  # noqa: F811
    """Redis stopped: a node without its own copy of a session (started meanwhile; or the session
    was created elsewhere a moment before) cannot tell whether it exists. It says so (503, try again)
    where the node holding it answers 200. Before, it answered 404 "Session not found", and the embed
    player gave up for good on a session that exists."""
    (node1,) = await started(cluster(1))
    code, created, _ = await node1.api.call("POST", "/session/create", {"userId": "u", "robotName": "r"})
    assert code == 200, created
    sid = created["sessionId"]
    redis_server.stop()
    (node2,) = cluster(1)  # its view of the sessions is empty

    async def health() -> tuple:
        try:
            return await node2.api.call("GET", "/health")
        except OSError:  # not listening yet
            return (None, None, None)

    await poll(health, lambda r: r[0] == 200 and r[1]["status"] == "degraded", "node2 to serve, Redis unreachable",
               timeout=15)
    code, body, _ = await node1.api.call("GET", f"/session/{sid}")
    assert code == 200, body
    for path in (f"/session/{sid}", f"/stream/{sid}/mjpeg", f"/stream/{sid}/snapshot.jpg"):
        code, body, _ = await node2.api.call("GET", path)
        assert_json_error(code, body, 503)
        assert "Redis cannot be reached" in body["error"], (path, body)
    code, _, page = await node2.api.call("GET", f"/stream/{sid}/embed")
    assert code == 503 and b"Redis cannot be reached" in page.body, (code, page.body[:300])

    redis_server.start()  # empty: node1 writes its session back, node2 then finds it there
    await node2.wait_healthy()
    await poll(lambda: node2.api.call("GET", f"/session/{sid}"), lambda r: r[0] == 200, "node2 to find the session")
    code, body, _ = await node2.api.call("GET", "/session/stream_0_00000000000000000000000000000000")
    assert_json_error(code, body, 404)  # Redis answers again: an unknown session is a 404


@pytest.mark.gen_test(timeout=30)
async def test_a_peer_that_ends_while_its_record_is_written_is_remembered_as_ended(redis_server):  # noqa: F811
    """A WHEP peer that ends the moment it is made (its connection fails at once): the "ended"
    record must not be overwritten by the "live" one still on its way to Redis on another
    connection of the pool. Before, the live one could land last and stay for 24 hours: every
    DELETE of the resource on any node was a 200, where the first is a 200 and the next a 404."""
    from types import SimpleNamespace

    from vsproxy.cluster.node import Cluster
    from vsproxy.cluster.whep import WhepDirectory
    from vsproxy.config import config_from_dict

    config = config_from_dict({"cluster": {"redis_url": redis_server.url, "token": "t" * 32}})
    node = Cluster(config)
    directory = WhepDirectory(node, peers=SimpleNamespace())
    real_set = node.redis.set

    async def slow_set(key, value, **kwargs):
        if '"ended"' not in value:  # the live record: held up on its way (a busy connection)
            await asyncio.sleep(0.3)
        return await real_set(key, value, **kwargs)

    node.redis.set = slow_set
    peer = SimpleNamespace(id=secrets.token_hex(8), session_id="stream_1", deleted=False)
    try:
        adding = asyncio.ensure_future(directory.added(peer))
        await asyncio.sleep(0.05)  # the live record's SET under way
        directory.removed(peer)  # the peer ended meanwhile
        await adding
        await wait_until(lambda: not directory._tasks, "the ended record to be written")
        assert await directory.end("stream_1", peer.id) is True  # its client's first DELETE
        assert await directory.end("stream_1", peer.id) is False  # a second one: 404
    finally:
        await node.redis.aclose()
