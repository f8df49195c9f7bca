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
