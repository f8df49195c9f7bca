"""The push upstream: frames are published *to* vsproxy (WS /ingest/{name}, POST /ingest/{name}/frame).

A publisher (an Isaac Sim script using `vsproxy.publish`, a camera bridge, curl) authenticates
with the upstream's token and sends JPEG frames; the ingest handlers (vsproxy/handlers/ingest.py)
check them and hand them to `PushSource.publish`, which publishes them on the upstream's hub.

How this fits the Source contract (the hub's supervisor calls `run(hub)` while the upstream has
sessions and retries with backoff when it returns):

* "connected" means a publisher is present: a WebSocket publisher is attached, or a frame was
  POSTed less than `post_hold_seconds` ago (so a POST-only publisher does not flicker between
  its frames and the "offline" picture).
* `run()` waits for a publisher, calls `hub.set_connected()`, then waits until the publisher is
  gone and raises `PublisherGone`; the hub shows "retrying", tells WebSocket viewers and sends
  the offline picture, as for any lost upstream. `run()` never times out while nobody publishes
  (there is nothing to reconnect to), so the hub simply stays "connecting"/"retrying".
* Frames are published on the hub directly, whatever `run()` is doing: none is lost in the gap
  between a publisher attaching and `run()` noticing, nor during the supervisor's backoff sleep.
* A publisher that attaches while the hub is running but not connected (during that backoff
  sleep, say) marks the hub connected at once, so the viewers' status is right and no offline
  picture is interleaved with its first frames. The supervisor keeps a "connected" state it finds
  at the top of its loop; when `run()` is entered again it does not call `set_connected()` twice,
  and if the publisher already left again it raises at once so the hub marks the loss.
* Publishing while the hub is not running (no sessions) is accepted: the frame becomes the
  hub's latest frame (one frame reference, no fan-out since there are no viewers), so the first
  viewer of a new session sees a picture at once; a viewer that comes as the hub starts (before
  it is connected: a cluster edge's relay) gets it when run() connects the hub, if it is at most
  HELD_FRAME_SECONDS old. The publisher is told whether anyone wants
  frames with `{"type": "status", "active": true|false, ...}` text messages, so it can pause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import render
from ..auth import token_matches
from ..schema import ConfigError, check_not_placeholder, setting
from .base import HubLink, Source

if TYPE_CHECKING:
    from ..config import ReconnectConfig

log = logging.getLogger("vsproxy.push")

# A frame published while the hub was not running is shown to the viewers that start it if it is
# at most this old (a cluster edge's relay starts the hub of the node the publisher reached, and
# attaches before the hub is connected: the frame that came first would be missed).
HELD_FRAME_SECONDS = 1.0


class PublisherGone(Exception):
    """The publisher detached (or stopped POSTing); the hub treats it as a lost upstream."""


class FrameRejected(ValueError):
    """A published frame was refused; `status` is the HTTP status a POST answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PublisherLink(Protocol):
    """The attached WebSocket publisher as the source sees it (the ingest socket handler)."""

    def send_to_publisher(self, message: str | bytes) -> bool: ...

    def disconnect(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class PushUpstream:
    """Frames published to vsproxy (WS /ingest/{name} or POST /ingest/{name}/frame) with a token."""

    token: str = setting("", doc="publish token (8+ characters) publishers present as Bearer or ?token=")
    max_frame_bytes: int = setting(8 * 1024 * 1024, min=1024, max=256 * 1024 * 1024, doc="largest frame "
                                   "accepted; 413 or close 1009 beyond")


class PushSource(Source):
    kind = "push"
    settings_class = PushUpstream
    accepts_input = True
    origin_where_published = True  # in a cluster: the node its publisher reaches

    # A POSTed frame keeps the upstream "connected" this long (a POST-only publisher has no
    # connection whose end would say it stopped).
    post_hold_seconds: float = 10.0
    # Nothing to reconnect to: a publisher comes back by itself (and is taken at once, backoff or not).
    offline_text = "upstream offline - waiting for its publisher"

    def retry_status(self, wait: float, attempt: int, sooner: str) -> str:
        return f"Waiting for a publisher of upstream '{self.name}'"

    @classmethod
    def check_settings(cls, settings: PushUpstream, key: str) -> None:
        check_not_placeholder(f"{key}.token", settings.token)
        if len(settings.token) < 8:
            raise ConfigError(f"{key}.token", "expected a publish token of at least 8 characters")

    def __init__(self, name: str, settings: PushUpstream, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.max_frame_bytes = settings.max_frame_bytes
        self.publisher: PublisherLink | None = None
        self.publishers_total = 0  # WebSocket publishers ever attached
        self.frames_rejected = 0
        self._post_until = 0.0  # monotonic time until which the last POST counts as a publisher
        self._last_posted = False  # was the most recent publisher a POST (not a WebSocket)?
        self._changed: asyncio.Event | None = None  # set when a publisher attaches or leaves
        self._active = False  # run() is active: the hub has sessions and wants frames
        # The last frame published while the hub was not running: (JPEG, capture time, monotonic).
        self._held: tuple[bytes, float | None, float] | None = None

    # -- authentication and validation ------------------------------------------------------

    @property
    def active(self) -> bool:
        """Does the hub want frames (it has sessions, so run() is running)?"""
        return self._active

    def token_ok(self, presented: str | None) -> bool:
        """Constant-time comparison of a presented token with the upstream's publish token."""
        return token_matches(presented, [self.settings.token])

    def check_frame(self, data: bytes) -> None:
        """Raise FrameRejected (413 too large, 400 not a JPEG) for a frame that must not be shown
        (counted in `frames_rejected`)."""
        if len(data) > self.max_frame_bytes:
            self.frames_rejected += 1
            raise FrameRejected(413, f"Frame of {len(data)} bytes is larger than the limit of "
                                     f"{self.max_frame_bytes} bytes")
        if not render.is_jpeg(data):
            self.frames_rejected += 1
            raise FrameRejected(400, "Frame is not a JPEG (expected data starting with FFD8 and ending with FFD9)")

    # -- publishing -------------------------------------------------------------------------

    def publish(self, hub: HubLink, data: bytes, *, posted: bool = False, captured: float | None = None) -> int:
        """Check and publish one frame; returns its sequence number. Raises FrameRejected.

        Its capture time is `captured` (e.g. a POST's X-Capture-Timestamp), else the one the
        publisher stamped into the JPEG (`vsproxy.publish` does), else its arrival."""
        self.check_frame(data)
        if posted:
            self._post_until = time.monotonic() + self.post_hold_seconds
            self._last_posted = self.publisher is None
            self._publisher_came(hub)
        # The publisher's capture stamp is taken out again: viewers get its JPEG byte for byte.
        jpeg, stamped = render.split_capture_time(bytes(data))
        when = captured if captured is not None else stamped
        self._held = None if hub.running else (jpeg, when, time.monotonic())
        return hub.publish(jpeg, when)

    def attach(self, hub: HubLink, link: PublisherLink) -> bool:
        """A WebSocket publisher connected; False if another one is already attached."""
        if self.publisher is not None:
            return False
        self.publisher = link
        self._last_posted = False
        self.publishers_total += 1
        self._publisher_came(hub)
        link.send_to_publisher(self._active_message())
        return True

    def detach(self, link: PublisherLink) -> None:
        if self.publisher is link:
            self.publisher = None
            self._signal()

    def disconnect(self, reason: str = "closed by the server") -> bool:
        """Close the attached WebSocket publisher's connection (it may reconnect); False if none."""
        link = self.publisher
        if link is None:
            return False
        self.detach(link)  # free the slot now, not when the close handshake completes
        link.disconnect(1001, reason)
        return True

    def stopped(self) -> None:
        self._set_active(False)  # no sessions left: the publisher is told so

    def close(self) -> None:
        # A publisher stays connected while no session wants frames, so run() does not own it.
        self.disconnect("server shutting down")

    def send(self, message: str | bytes) -> bool:
        """A viewer's message goes to the attached WebSocket publisher, if any.

        Text arrives wrapped as {"type": "viewer", "data": <text>}: the publisher acts on the
        server's own "status" and "error" messages, and a viewer must never pass for the server.
        """
        link = self.publisher
        if link is None:
            return False
        if isinstance(message, str):
            message = json.dumps({"type": "viewer", "data": message}, ensure_ascii=False)
        return link.send_to_publisher(message)

    def publisher_present(self) -> bool:
        return self.publisher is not None or time.monotonic() < self._post_until

    def _publisher_came(self, hub: HubLink) -> None:
        # Connected at once while the hub wants frames, even if run() is in the supervisor's
        # backoff sleep (see the module docstring); run() itself covers the other cases.
        if hub.running and not hub.connected:
            hub.set_connected()
        self._signal()

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- the Source contract -----------------------------------------------------------------

    async def run(self, hub: HubLink) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = self._changed
        self._set_active(True)
        while not self.publisher_present():
            if hub.connected:  # marked connected during the backoff sleep, and gone again
                raise PublisherGone(self._gone_reason())
            changed.clear()
            await changed.wait()
        if not hub.connected:
            hub.set_connected()
        held, self._held = self._held, None
        if held is not None and time.monotonic() - held[2] <= HELD_FRAME_SECONDS:
            hub.publish(held[0], held[1])  # to the viewers that came as the hub started
        while True:
            changed.clear()
            if self.publisher is not None:
                await changed.wait()
                continue
            remaining = self._post_until - time.monotonic()
            if remaining <= 0:
                raise PublisherGone(self._gone_reason())
            try:
                async with asyncio.timeout(remaining):  # not wait_for: see isaac.py
                    await changed.wait()
            except TimeoutError:
                pass

    def _gone_reason(self) -> str:
        if self._last_posted:
            return f"publisher gone (no WebSocket publisher, no frame POSTed for {self.post_hold_seconds:g} s)"
        return "publisher disconnected"

    def _set_active(self, active: bool) -> None:
        if active != self._active:
            self._active = active
            if self.publisher is not None:
                self.publisher.send_to_publisher(self._active_message())

    def _active_message(self) -> str:
        text = "viewers are waiting for frames" if self._active else "no session is using this upstream"
        return json.dumps({"type": "status", "active": self._active, "message": text})


SOURCE = PushSource
