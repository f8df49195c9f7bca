"""Viewers and sessions give back what they took: after viewers of every output have come and gone
in every way a browser leaves (a clean close, a reset, a stall first, their session destroyed under
them, a WHEP peer deleted or closed), the proxy holds no more viewers, asyncio tasks, open files
or threads than before. A proxy that runs for weeks must not creep. (The memory figures over
minutes of such churn are bench/soak.py's.)"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
import threading

import pytest
from helpers import WS_UPGRADE, WhepClient, raw_request, wait_until

from vsproxy.outputs.wire import TRANSPORTS

CONFIG = {"demo": {"width": 160, "height": 120, "fps": 30, "quality": 60}, "h264": {"preset": "ultrafast"},
          "streaming": {"linger_seconds": 0.1},
          "limits": {"session_create_rate": 1000, "session_create_burst": 1000, "max_sessions_per_user": 100}}
STREAMS = {"mjpeg": "/stream/{id}/mjpeg", "ws_json": "/stream/{id}", "ws_binary": "/stream/{id}?format=binary",
           "ws_h264": "/stream/{id}?format=h264", "mp4": "/stream/{id}/stream.mp4"}
LEAVING = ("close", "reset", "stall", "destroyed")


def held() -> dict[str, int]:
    """What this process holds: open files (the proxy's sockets and the test's), threads, tasks
    (after a garbage collection: a socket nothing refers to any more is closed by it)."""
    gc.collect()
    return {"files": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "tasks": len(asyncio.all_tasks())}


async def watch_and_leave(api, port: int, session_id: str, path: str, how: str) -> None:
    headers = {} if path.endswith(("/mjpeg", ".mp4")) else WS_UPGRADE
    response, stream = await raw_request(port, path.format(id=session_id), headers=headers)
    assert response.status in (101, 200), (path, response.status)
    assert await asyncio.wait_for(stream.read_bytes(4096, partial=True), 10)  # it streams
    if how == "stall":
        await asyncio.sleep(0.5)  # the proxy's writes back up meanwhile
    elif how == "reset":
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "destroyed":
        assert (await api.call("DELETE", f"/session/{session_id}"))[0] == 200
        while True:  # the proxy ends the stream
            try:
                await asyncio.wait_for(stream.read_bytes(65536, partial=True), 10)
            except Exception:  # noqa: BLE001 - StreamClosedError: closed, as it should be
                break
    stream.close()


async def whep_and_leave(api, session_id: str, how: str) -> None:
    client = WhepClient(api, f"/stream/{session_id}/whep")
    assert await client.connect() == 201
    await client.frames(2)
    if how == "delete":
        assert (await api.call("DELETE", client.location))[0] == 200
    await client.close()  # "close": the proxy learns it from the DTLS close


async def churn(api, port: int) -> None:
    """Every output, every way of leaving, a new session each, several at once."""
    async def one(path: str, how: str) -> None:
        session_id = (await api.create_session())["sessionId"]
        await watch_and_leave(api, port, session_id, path, how)
        if how != "destroyed":
            await api.call("DELETE", f"/session/{session_id}")

    async def peer(how: str) -> None:
        session_id = (await api.create_session())["sessionId"]
        await whep_and_leave(api, session_id, how)
        await api.call("DELETE", f"/session/{session_id}")

    await asyncio.gather(*(one(path, how) for path in STREAMS.values() for how in LEAVING),
                         peer("delete"), peer("close"))


async def quiet(proxy) -> None:
    hub = proxy.hubs["demo"]
    await wait_until(lambda: not any(hub.viewers[t] for t in TRANSPORTS) and not proxy.whep.peers
                     and hub.state == "idle" and not (hub.encoder and hub.encoder.running)
                     and not proxy.sessions.all(), "every viewer, peer and session to be gone and the upstream idle",
                     timeout=30)
    await asyncio.sleep(0.5)  # closes in flight


@pytest.mark.config(CONFIG)
@pytest.mark.gen_test(timeout=120)
async def test_viewers_and_sessions_that_come_and_go_leave_nothing_behind(api, proxy, http_port):
    await churn(api, http_port)  # once first: what is made once (codec contexts, thread pools) is made
    await quiet(proxy)
    before = held()
    for _ in range(3):
        await churn(api, http_port)
    await quiet(proxy)
    after = held()
    # Fewer is fine (what earlier tests of the suite left behind may end meanwhile); 66 more
    # viewers, each in a session of its own, may not leave one thing more.
    assert all(after[what] <= before[what] for what in before), (before, after)
