"""Every stream URL works on every node, also the moment after the session was created on another
node, before that node's control message has arrived: the handlers look an unknown session up in
Redis. Real redis-server, nodes as real `python -m vsproxy` processes (the fixtures of
test_cluster.py)."""

from __future__ import annotations

import json
import secrets
import time

import pytest
import redis.asyncio
from cluster_fixtures import redis_server  # noqa: F401 - the fixture
from test_cluster import cluster, started  # noqa: F401 - the fixture

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
