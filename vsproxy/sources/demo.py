"""The built-in demo source: a moving test pattern, so vsproxy shows video with no simulator."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..render import TestPattern
from . import Source

if TYPE_CHECKING:
    from ..config import DemoConfig
    from ..hub import FrameHub


class DemoSource(Source):
    kind = "demo"

    def __init__(self, name: str, config: DemoConfig) -> None:
        self.name = name
        self.config = config

    async def run(self, hub: FrameHub) -> None:
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
