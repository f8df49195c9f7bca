"""The built-in demo source: a moving test pattern, so vsproxy shows video with no simulator."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..render import TestPattern
from ..schema import setting
from .base import HubLink, Source

if TYPE_CHECKING:
    from ..config import ReconnectConfig


@dataclass(frozen=True)
class DemoConfig:
    """The built-in moving test pattern (`demo:`, and `kind: demo` upstreams)."""

    width: int = setting(1280, min=16, max=7680, doc="picture width")
    height: int = setting(720, min=16, max=4320, doc="picture height")
    fps: float = setting(30.0, min=0.1, max=120, doc="frames per second")
    quality: int = setting(80, min=1, max=100, doc="JPEG quality")


class DemoSource(Source):
    kind = "demo"
    settings_class = DemoConfig

    def __init__(self, name: str, settings: DemoConfig, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.config = settings

    async def run(self, hub: HubLink) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        pattern = await loop.run_in_executor(
            None, TestPattern, cfg.width, cfg.height, f"vsproxy demo source \u00b7 {self.name}", cfg.quality
        )
        hub.set_connected()
        interval = 1.0 / cfg.fps
        deadline = time.monotonic()
        number = 0
        while True:
            # Encode off the event loop thread: the loop stays free for fan-out.
            jpeg = await loop.run_in_executor(None, pattern.render, number, time.time())
            hub.publish(jpeg)
            number += 1
            deadline += interval
            delay = deadline - time.monotonic()
            if delay < -interval:  # fell behind (busy machine): skip ahead instead of bursting
                deadline = time.monotonic()
                delay = 0
            await asyncio.sleep(max(0.0, delay))


SOURCE = DemoSource
