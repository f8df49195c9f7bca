"""The contract between a source and its hub, and what every source kind shares.

A source connects to one upstream, feeds frames to its hub through `HubLink` (the only part of
the hub a source may use), and returns or raises when the connection is lost; the hub's
supervisor owns reconnecting with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from urllib.parse import urlsplit

from tornado.websocket import WebSocketClosedError

if TYPE_CHECKING:
    from tornado.iostream import IOStream

    from ..config import ReconnectConfig


class HubLink(Protocol):
    """What a source may call on its hub."""

    name: str

    @property
    def running(self) -> bool:
        """Sessions want this upstream: the supervisor is running the source."""

    @property
    def connected(self) -> bool:
        """The source reported its connection up (and it has not been lost since)."""

    def set_connected(self) -> None:
        """Report the connection up (once per connection)."""

    def set_lost(self, reason: str) -> None:
        """Report the upstream lost while `run` goes on (a cluster edge whose origin lost it);
        `set_connected` again when it is back."""

    def publish(self, jpeg: bytes, captured: float | None = None) -> int:
        """Publish one JPEG frame (taken at `captured`, Unix seconds, if known) to every viewer;
        returns its sequence number."""

    def publish_h264(self, data: bytes, pts_us: int) -> None:
        """Publish one H.264 access unit (Annex-B; `pts_us`: microseconds since the Unix epoch)."""

    @property
    def jpeg_wanted(self) -> bool:
        """Does anything need JPEG frames now? (An H.264 source decodes only while it does.)"""

    def source_format_changed(self) -> None:
        """Tell the hub that `produces_h264` of the source changed (a stream's codec is known)."""

    def relay_text(self, text: str) -> None:
        """Send a text message (telemetry from the upstream) to every WebSocket viewer."""

    def viewer_count(self) -> int:
        """How many viewers are attached right now (is anyone watching?)."""

    def h264_viewer_count(self) -> int:
        """How many viewers of an H.264 transport are attached right now."""


class UnreadTotal:
    """What many connections' sockets have not taken yet, all together (the app has one, for the
    text written to viewers): `RelayBudget`s that share it stop adding once it would exceed
    `limit`, except on a connection that keeps up (nothing unread, or under FLOOR with the
    message), so thousands of stalled viewers cannot hold their 1 MiB each, while viewers that
    read keep getting text."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.outstanding = 0


class RelayBudget:
    """Messages relayed over one WebSocket connection that its socket has not taken yet, in
    bytes, capped: a peer that stops reading makes relaying fail (viewer input to an upstream:
    "not delivered"; upstream text to a viewer: dropped) instead of growing memory without bound.
    With a `shared` total, the cap is also on all its connections together (beyond it only one
    that keeps up may add more: nothing unread, or under FLOOR with the message)."""

    LIMIT = 1 << 20
    FLOOR = 64 << 10

    def __init__(self, shared: UnreadTotal | None = None) -> None:
        self.outstanding = 0
        self.shared = shared

    def send(self, write_message: Callable[..., Awaitable[None]], message: str | bytes, *,
             control: bool = False) -> bool:
        """Write `message` unless LIMIT bytes wait (or the shared total is spent); a `control`
        message (a few bytes, sent only when a state changes, such as what a cluster edge wants
        relayed) is written regardless: it must not be lost to viewers' input."""
        # Bytes as written (UTF-8), not characters: isascii is O(1) in CPython.
        size = len(message) if isinstance(message, bytes) or message.isascii() else len(message.encode())
        shared = self.shared
        if not control and (self.outstanding > self.LIMIT or (
                shared is not None and shared.outstanding + size > shared.limit
                and self.outstanding and self.outstanding + size > self.FLOOR)):
            return False
        try:
            future = asyncio.ensure_future(write_message(message, binary=isinstance(message, bytes)))
        except WebSocketClosedError:
            return False
        self.outstanding += size
        if shared is not None:
            shared.outstanding += size

        def written(done: asyncio.Future) -> None:
            self.outstanding -= size
            if shared is not None:
                shared.outstanding -= size
            if not done.cancelled():
                done.exception()  # retrieved: a closed connection is the reader's business

        future.add_done_callback(written)
        return True

    def abandon(self, stream: IOStream | None) -> None:
        """The connection is closing: if the peer left messages unread, close its socket now.

        Otherwise the close handshake would wait behind the unread bytes (Tornado gives up after
        5 s), and at exit asyncio would cancel the pending writes, each logging a CancelledError
        traceback (Tornado's write futures retrieve their exception in a callback). Closed, they
        fail with StreamClosedError, which `send` retrieves.
        """
        if self.outstanding and stream is not None:
            stream.close()


# The TCP port a URL scheme connects to when its URL names none.
DEFAULT_PORTS = {"ws": 80, "wss": 443, "http": 80, "https": 443, "rtsp": 554, "rtsps": 322}


def url_address(url: str) -> tuple[str, int] | None:
    """The host and TCP port `url` connects to (its scheme's default port where it names none), or
    None if it has no host or cannot be parsed (configuration refuses such URLs)."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname and port else None


class FrameTimeout(Exception):
    """The upstream is connected but has sent no frame for too long: it counts as lost."""


class Source:
    """The contract every upstream kind implements.

    Every kind is built the same way, `SourceClass(name, settings, reconnect)`: `settings` is an
    instance of the kind's `settings` dataclass (its keys under `upstreams.<name>`).
    """

    kind: ClassVar[str] = "source"
    settings_class: ClassVar[type]  # the dataclass of this kind's configuration keys
    url_schemes: ClassVar[tuple[str, ...]] = ()  # the `url` key must start with one of these
    accepts_input: ClassVar[bool] = False  # can viewers' messages be relayed to this upstream?
    produces_h264: ClassVar[bool] = False  # publishes H.264 itself (else the hub encodes its JPEGs)
    # In a cluster, the node holding an upstream's lease connects to it and the others relay from
    # that node. An upstream that comes to a node (a push publisher reaches one node, whichever)
    # has its origin where it is published: the lease goes with the publisher (cluster/relay.py).
    origin_where_published: ClassVar[bool] = False
    # Its H.264 has B-frames, so the hub re-encodes it instead of passing it through (rtsp).
    b_frames: bool = False
    # The host and TCP port the upstream is reached at, for kinds that connect to one (isaac,
    # mjpeg, rtsp: `url_address` of their URL). While the upstream is down, the hub probes it
    # there and retries as soon as it accepts a connection, not after the rest of its backoff.
    address: tuple[str, int] | None = None

    def __init__(self, name: str, settings: Any, reconnect: ReconnectConfig) -> None:
        self.name = name
        self.settings = settings
        self.reconnect = reconnect

    @property
    def underlying(self) -> Source:
        """The upstream's own source (in a cluster, the one the cluster's source wraps)."""
        return self

    def publisher_present(self) -> bool:
        """A publisher sends to this node now (kinds with origin_where_published)."""
        return False

    async def publisher_arriving(self) -> str | None:
        """A publisher wants to send this upstream's frames to this node: None if it may, else
        why not (in a cluster: its publisher is on another node). ClusterUnavailable (503) when
        that cannot be known."""
        return None

    async def post_elsewhere(self, frame: bytes, captured: float | None) -> tuple[int, dict] | None:
        """A frame POSTed to this node (checked): None to publish it here, else the answer (status,
        JSON body) of the cluster node that has the upstream's publisher, where it was forwarded.
        (Always None outside a cluster.)"""
        return None

    @classmethod
    def check_settings(cls, settings: Any, key: str) -> None:
        """Raise schema.ConfigError (naming `key`.<field>) for settings that cannot work."""

    def h264_wanted(self, wanted: bool) -> None:
        """The hub's first H.264 viewer came (True), or its last one left (False). A source that
        gets H.264 from elsewhere (a cluster edge, from its origin) asks for it only while wanted."""

    def jpeg_wanted(self, wanted: bool) -> None:
        """The hub's `jpeg_wanted` turned (JPEG viewers, the encoder, a snapshot or thumbnail). A
        source that gets JPEG frames from elsewhere (a cluster edge, from its origin) asks for
        them only while wanted; others read `hub.jpeg_wanted` where they care."""

    def request_keyframe(self) -> None:
        """A viewer needs a keyframe and no encoder of this hub makes H.264. A source that gets
        H.264 from elsewhere (a cluster edge) asks there; an upstream's own stream cannot."""

    async def held_elsewhere(self) -> bool:
        """Does another cluster node run this upstream (its origin), so that this node could relay
        it from there? (Never, outside a cluster.)"""
        return False

    async def run(self, hub: HubLink) -> None:
        """Connect, call `hub.set_connected()`, feed `hub.publish(jpeg)` / `hub.relay_text(text)`.

        Return or raise when the stream ends; never retry here (the hub does).
        """
        raise NotImplementedError

    def status(self) -> dict:
        """Counters of this kind worth showing in /upstreams (empty: none)."""
        return {}

    # The offline picture's words while the upstream, connected before, is down.
    offline_text: ClassVar[str] = "upstream offline - reconnecting"

    def retry_status(self, wait: float, attempt: int, sooner: str) -> str:
        """What viewers are told while the hub waits `wait` seconds to run this source again
        (`sooner`: how the wait may end early, or empty)."""
        return f"Reconnecting to upstream '{self.name}' in {wait:.1f} s{sooner} (attempt {attempt})"

    def send(self, message: str | bytes) -> bool:
        """Relay a viewer's message upstream; False where the kind cannot (or is not connected)."""
        return False

    def stopped(self) -> None:
        """The hub stopped (no sessions left): run() is over until it starts again. The hub may
        stop between two runs (in its reconnect backoff), so a source whose state outlives
        run() resets it here, not in run()."""

    def close(self) -> None:
        """The server is shutting down: close any connection the source holds outside `run()`."""
