"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

# Generous: tests wait on conditions, and only a failing test ever waits this long.
WAIT = 20.0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(condition: Callable[[], Any], what: str = "condition", timeout: float = WAIT) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def upstream_status(api: Any, *, name: str) -> dict:
    """The upstream `name` as GET /upstreams lists it."""
    code, body, _ = await api.call("GET", "/upstreams")
    assert code == 200, body
    (status,) = [u for u in body["upstreams"] if u["name"] == name]
    return status


async def wait_upstream(api: Any, what: str, check: Callable[[dict], bool], timeout: float = WAIT, *,
                        name: str) -> dict:
    """Poll GET /upstreams until `check(status of name)`; fail naming `what` and the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = await upstream_status(api, name=name)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; upstream: {status}")
        await asyncio.sleep(0.05)


async def recv(conn: Any, timeout: float = WAIT) -> str | bytes:
    """The next WebSocket message; fails if the connection closed or nothing came in time."""
    message = await asyncio.wait_for(conn.read_message(), timeout)
    assert message is not None, "the viewer's WebSocket closed"
    return message
