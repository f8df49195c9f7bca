"""The Isaac Sim WebSocket upstream (the original service's path).

Binary messages are JPEG frames; a text message {"type": "frame", "data": <base64>} is a frame
too; any other text message is relayed to the viewers unchanged. Viewer messages go upstream.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ..schema import setting
from .base import FrameTimeout, HubLink, RelayBudget, Source

if TYPE_CHECKING:
    from ..config import ReconnectConfig


@dataclass(frozen=True)
class IsaacUpstream:
    """An Isaac Sim WebSocket stream (binary JPEG messages, or {"type": "frame", "data": base64})."""

    url: str = setting("", doc="`ws://` or `wss://` URL of the stream")
    headers: dict = setting(factory=dict, doc="extra handshake headers (never logged)")


class IsaacSource(Source):
    kind = "isaac"
    settings_class = IsaacUpstream
    url_schemes = ("ws://", "wss://")
    accepts_input = True

    def __init__(self, name: str, settings: IsaacUpstream, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.url = settings.url
        self.headers = dict(settings.headers)
        self._conn: WebSocketClientConnection | None = None
        self._relay = RelayBudget()

    async def run(self, hub: HubLink) -> None:
        rc = self.reconnect
        request = HTTPRequest(
            self.url,
            headers=self.headers,
            connect_timeout=rc.connect_timeout_seconds,
            request_timeout=rc.connect_timeout_seconds,
        )
        ping = rc.ping_interval_seconds or None
        conn = await websocket_connect(
            request,
            ping_interval=ping,
            ping_timeout=ping,  # Tornado caps the timeout at the interval
            max_message_size=rc.max_message_bytes,
        )
        self._conn = conn
        try:
            hub.set_connected()
            await self._read_loop(conn, hub, rc.frame_timeout_seconds)
        finally:
            if self._conn is conn:  # a newer run may already have connected (stop/start overlap)
                self._conn = None
            conn.close()

    async def _read_loop(self, conn: WebSocketClientConnection, hub: HubLink, frame_timeout: float) -> None:
        last_frame = time.monotonic()
        while True:
            remaining = frame_timeout - (time.monotonic() - last_frame)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as a message completes, and then the hub could never stop this source.
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    message = await conn.read_message()
            except TimeoutError:
                raise FrameTimeout(f"no frame for {frame_timeout:g} s") from None
            if message is None:
                reason = conn.close_reason or (f"code {conn.close_code}" if conn.close_code else "")
                raise ConnectionError("upstream closed the connection" + (f" ({reason})" if reason else ""))
            if isinstance(message, bytes):
                hub.publish(message)
                last_frame = time.monotonic()
                continue
            jpeg = _frame_from_text(message)
            if jpeg is not None:
                hub.publish(jpeg)
                last_frame = time.monotonic()
            else:
                hub.relay_text(message)

    def send(self, message: str | bytes) -> bool:
        conn = self._conn
        return conn is not None and self._relay.send(conn.write_message, message)


def _frame_from_text(message: str) -> bytes | None:
    """The JPEG inside a {"type": "frame", "data": <base64>} message, else None."""
    if '"frame"' not in message[:200]:
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("type") != "frame" or not isinstance(parsed.get("data"), str):
        return None
    try:
        return binascii.a2b_base64(parsed["data"])
    except (binascii.Error, ValueError):
        return None


SOURCE = IsaacSource
