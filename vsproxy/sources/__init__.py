"""Upstream sources: one module per kind. A source connects, feeds frames to its hub, and returns
or raises when the connection is lost; the hub's supervisor owns reconnecting with backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from tornado.websocket import WebSocketClosedError

if TYPE_CHECKING:
    from ..config import Config
    from ..hub import FrameHub


class RelayBudget:
    """Viewer messages relayed to an upstream connection that its socket has not taken yet, in
    bytes, capped: a peer that stops reading makes relaying fail ("not delivered") instead of
    growing memory without bound."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self.outstanding = 0

    def send(self, write_message: Callable[..., Awaitable[None]], message: str | bytes) -> bool:
        if self.outstanding > self.LIMIT:
            return False
        size = len(message)
        try:
            future = asyncio.ensure_future(write_message(message, binary=isinstance(message, bytes)))
        except WebSocketClosedError:
            return False
        self.outstanding += size

        def written(done: asyncio.Future) -> None:
            self.outstanding -= size
            if not done.cancelled():
                done.exception()  # retrieved: a closed connection is the reader's business

        future.add_done_callback(written)
        return True


class FrameTimeout(Exception):
    """The upstream is connected but has sent no frame for too long: it counts as lost."""


class Source:
    """The contract every upstream kind implements."""

    kind: ClassVar[str] = "source"

    async def run(self, hub: FrameHub) -> None:
        """Connect, call `hub.set_connected()`, feed `hub.publish(jpeg)` / `hub.relay_text(text)`.

        Return or raise when the stream ends; never retry here (the hub does).
        """
        raise NotImplementedError

    def send(self, message: str | bytes) -> bool:
        """Relay a viewer's message upstream; False where the kind cannot (or is not connected)."""
        return False


def create_source(name: str, settings: Any, config: Config) -> Source:
    """The one place an upstream's settings (one of config.UPSTREAM_KINDS) become a Source."""
    from .. import config as cfg

    if isinstance(settings, cfg.DemoConfig):
        from .demo import DemoSource

        return DemoSource(name, settings)
    if isinstance(settings, cfg.IsaacUpstream):
        from .isaac import IsaacSource

        return IsaacSource(name, settings.url, config.reconnect, settings.headers)
    if isinstance(settings, cfg.MjpegUpstream):
        from .mjpeg import MjpegSource

        return MjpegSource(name, settings, config.reconnect)
    if isinstance(settings, cfg.RtspUpstream):
        from .rtsp import RtspSource  # imports PyAV: only where an rtsp upstream is configured

        return RtspSource(name, settings, config.reconnect)
    if isinstance(settings, cfg.PushUpstream):
        from .push import PushSource

        return PushSource(name, settings)
    raise ValueError(f"upstream {name!r}: kind {type(settings).__name__} is not supported")
