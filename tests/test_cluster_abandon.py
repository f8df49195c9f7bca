"""Creates refused with 503 while Redis is down or stalled: what the node keeps to undo them. A real
redis-server (stopped, or stalled with SIGSTOP), the cluster's session manager in this process (what
it holds is the point)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest
from cluster_fixtures import redis_server  # noqa: F401 - the fixture

from vsproxy.app import Proxy
from vsproxy.cluster import sessions as cluster_sessions
from vsproxy.cluster.node import ClusterUnavailable
from vsproxy.config import config_from_dict

pytestmark = [pytest.mark.external, pytest.mark.slow]  # redis-server

TOKEN = "cluster-test-token-0123456789"


def cluster_proxy(redis_url: str) -> Proxy:
    """A cluster node's objects, no server and no background loops: creates go straight to Redis."""
    return Proxy(config_from_dict({
        "cluster": {"redis_url": redis_url, "node_id": "n1", "token": TOKEN},
        "limits": {"max_sessions": 10000, "max_sessions_per_user": 10000, "session_create_rate": 10000,
                   "session_create_burst": 100000},
    }))


async def refused_creates(proxy: Proxy, count: int) -> list[ClusterUnavailable]:
    async def one() -> ClusterUnavailable:
        with pytest.raises(ClusterUnavailable) as info:
            await proxy.sessions.create_async("u", "r", address="10.0.0.1")
        return info.value

    return await asyncio.gather(*(one() for _ in range(count)))


async def close(proxy: Proxy) -> None:
    await proxy.sessions.close_store()
    await proxy.cluster.redis.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_creates_refused_while_redis_is_down_leave_nothing_to_undo(redis_server):  # noqa: F811
    """Redis stopped: each create fails to connect, so it never reached Redis and there is nothing
    to abandon. Before, each left a task retrying until Redis came back (about 8 KiB each: a node
    grew by 95 MB over 12000 refused creates, and on recovery they all hit Redis at once)."""
    redis_server.stop()
    proxy = cluster_proxy(redis_server.url)
    try:
        tasks = len(asyncio.all_tasks())
        # 500 at once: most find the pool's 100 connections taken (MaxConnectionsError), the others
        # are refused connecting; neither sent anything.
        errors = await refused_creates(proxy, 500)
        assert not any(error.sent for error in errors)
        assert proxy.sessions._to_abandon == {} and proxy.sessions._abandoner is None
        assert len(asyncio.all_tasks()) <= tasks
        redis_server.start()
        session = await proxy.sessions.create_async("u", "r", address="10.0.0.1")
        assert await proxy.cluster.redis.hkeys(cluster_sessions.SESSIONS) == [session.id]
    finally:
        await close(proxy)


@pytest.mark.gen_test(timeout=90)
async def test_creates_refused_while_redis_stalls_are_undone_by_one_task_within_a_cap(
        redis_server, monkeypatch, caplog):  # noqa: F811
    """Redis stalls (SIGSTOP) with creates sent on connections it had accepted: each is refused
    after the 2 s timeout but runs once Redis goes on. One task abandons them all when Redis
    answers again, ABANDON_MAX of them at most (those beyond are warned of once, and idle out)."""
    monkeypatch.setattr(cluster_sessions, "ABANDON_MAX", 20)
    proxy = cluster_proxy(redis_server.url)
    redis = proxy.cluster.redis
    try:
        earlier = await proxy.sessions.create_async("u", "r", address="10.0.0.1")  # the script loaded
        await proxy.sessions.destroy_async(earlier.id)
        await asyncio.gather(*(redis.ping() for _ in range(30)))  # 30 connections in the pool
        tasks = len(asyncio.all_tasks())
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="vsproxy.sessions"):
                errors = await refused_creates(proxy, 30)
            assert all(error.sent for error in errors)  # on the pooled connections: sent, maybe run later
            waiting = set(proxy.sessions._to_abandon)
            assert len(waiting) == 20
            assert len(asyncio.all_tasks()) <= tasks + 1  # one task abandons them all
            assert [r.getMessage() for r in caplog.records if "wait to be abandoned" in r.getMessage()] == [
                "cluster: 20 refused creates wait to be abandoned; more are not (should Redis run them, "
                "their sessions idle out)"]
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while proxy.sessions._to_abandon:
            assert time.monotonic() < deadline, f"{len(proxy.sessions._to_abandon)} still to abandon"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)
        assert proxy.sessions._abandoner is not None and proxy.sessions._abandoner.done()
        # The 30 creates ran when Redis went on; the 20 the node kept are gone again, the 10 beyond
        # the cap remain (for the idle reaper), counted against their user.
        stored = set(await redis.hkeys(cluster_sessions.SESSIONS))
        assert len(stored) == 10 and not stored & waiting, stored
        assert await redis.hget(cluster_sessions.USERS, "u") == "10"
        assert proxy.sessions.destroyed_total["abandoned"] == 20
    finally:
        await close(proxy)
