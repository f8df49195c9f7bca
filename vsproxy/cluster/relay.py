"""One upstream connection per source, cluster-wide: origin and edges.

Every hub's source is wrapped in a `ClusterSource`. When the hub starts (the first viewer of that
upstream on this node), the source tries to take the upstream's lease in Redis:

- taken: this node is the origin. It runs the real source and renews the lease every second while
  it runs; the lease is released when the hub stops (no viewer here, no edge left) or on drain.
- held by another node: this node is an edge. It opens ONE WebSocket to the origin,
  /internal/relay/{upstream} (authenticated with cluster.token), whatever its number of viewers,
  and publishes what arrives into its own hub, which fans out as usual. Origin to edge: binary
  messages are H.264 access units in the `format=h264` binary form (first byte 0 or 1: the keyframe
  flag; then the presentation time and the Annex-B unit) or the origin's JPEG frames, byte for
  byte, in the same form (first byte 2, wire.CLUSTER_JPEG_TYPE; then the capture time); text
  messages are the upstream's text (telemetry, and the origin's status messages). The origin's
  "✅ Connected to upstream" status (`hub.connected_status`), sent as the relay opens if its upstream
  is connected, else when it connects, makes the edge's hub connected (or its first frame, if that
  comes first): the edge's viewers get that status once, from their own node, as on one node.
  When the origin's upstream is lost, the origin sends RELAY_LOST with the reason (not its "lost"
  text): the edge's hub shows the upstream lost (`set_lost`: its viewers are told once, get the
  offline picture, and their input the error it gets on one node) until the next "✅ Connected"
  or frame. Edge to origin:
  text messages are viewer input for the origin's upstream; binary messages start with a type
  byte: RELAY_INPUT (the rest is a viewer's binary input), RELAY_JPEG or RELAY_H264 (one more
  byte, 1 or 0: this edge wants JPEG frames / H.264 access units now, or no longer),
  RELAY_KEYFRAME (an edge viewer needs a keyframe).

Demand: the origin sends an edge only what it asked for, nothing until it asks. An edge wants
JPEG while its hub's `jpeg_wanted` is true (JPEG viewers, a snapshot or thumbnail in the last
10 s) and H.264 while it has H.264 viewers; the origin counts it as one JPEG viewer and one H.264
viewer of its hub accordingly. So an RTSP origin decodes nothing while only H.264 is wanted
anywhere, and a new JPEG demand gets the origin's current frame at once. While an edge wants
nothing (its viewers gone, lingering) nothing flows and no frame timeout applies (WebSocket pings
keep watch of the connection).

H.264: one encoder per upstream, cluster-wide, on the origin. An edge's relay source says it
produces H.264 (so the edge's hub runs no encoder); its keyframe requests (a WebRTC peer joined or
sent PLI) go to the origin, at most one a second, whose encoder makes one (its own limit too). An
RTSP upstream's own H.264 stays passthrough: the origin relays the units it receives.

Every node runs the same version: the relay is node to node only, and a mixed-version cluster
(during an upgrade) is not supported by it.

Failover: when the relay drops (origin died or drained), the edge's hub shows the offline picture
and the edge keeps trying: take the lease (free once the dead origin's expires, LEASE_TTL), or
find the new origin. A node that takes a lease says so on the control channel (ORIGIN_OP), so a
node looking for that upstream's origin looks again at once rather than at its next look
(RETRY_SECONDS): viewers waiting for a push publisher get its first frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import tornado.web
import tornado.websocket
from tornado.httpclient import HTTPRequest

from ..codec.encoder import KEYFRAME_REQUEST_MIN_INTERVAL
from ..codec.h264 import AccessUnit
from ..errors import PublishedElsewhere
from ..handlers.base import websocket_handshake_error, write_json_error
from ..hub import Demand, Frame, connected_status
from ..outputs import Viewer
from ..outputs.viewer import H264Viewer
from ..outputs.wire import CLUSTER_JPEG, CLUSTER_JPEG_TYPE, WS_BINARY, WS_H264, ws_h264_message
from ..sources.base import FrameTimeout, HubLink, RelayBudget, Source
from ..sources.isaac import _websocket_connect
from .ingest import PublisherUnreachable, forward_frame
from .node import HEARTBEAT_SECONDS, LEASE_TTL_SECONDS, REDIS_ERRORS, Cluster

if TYPE_CHECKING:
    from ..hub import FrameHub

log = logging.getLogger("vsproxy.cluster")

FIND_ORIGIN_SECONDS = 15.0  # how long an edge keeps looking for an origin before the hub backs off
RETRY_SECONDS = 0.3
RELAY_INPUT = 0  # edge to origin, binary: a type byte, then a viewer's binary input
RELAY_H264 = 1  # edge to origin, binary: a type byte, then 1 (H.264 wanted) or 0 (no longer)
RELAY_JPEG = 2  # edge to origin, binary: a type byte, then 1 (JPEG wanted) or 0 (no longer)
RELAY_KEYFRAME = 3  # edge to origin, binary: the type byte alone (a keyframe, please)
ORIGIN_OP = "origin"  # control message: node `node` has just taken upstream `upstream`'s lease
# Origin to edge, binary: a type byte beyond the frames' (0, 1: H.264; 2: JPEG), then the reason in
# UTF-8: the origin's upstream was lost (it reconnects it; its "✅ Connected" says when it is back).
RELAY_LOST = 3
_LOST = bytes((RELAY_LOST,))
# Why a node's push publisher is disconnected when another node has the upstream's lease.
PUBLISHED_ELSEWHERE = "another node has this upstream's publisher now"
SHUTTING_DOWN = "this node is shutting down; publish to another node"
# How long a node forwards POSTed frames to the holder it found before it asks Redis again (a
# failed forward forgets it at once).
POST_TARGET_SECONDS = HEARTBEAT_SECONDS
_AU_HEAD = struct.Struct("!BQ")  # origin to edge: the type (H.264 keyframe flag, or JPEG) and time


class ClusterSource(Source):
    """The source of a hub in a cluster: the real source on the origin, a relay from it on edges."""

    def __init__(self, inner: Source, cluster: Cluster) -> None:
        super().__init__(inner.name, inner.settings, inner.reconnect)
        self.inner = inner
        self.cluster = cluster
        self.kind = inner.kind  # type: ignore[misc]  # the upstream's kind, as /upstreams shows it
        self.accepts_input = inner.accepts_input  # type: ignore[misc]
        self.role = "idle"  # idle | origin | edge | searching
        self.origin: str | None = None  # the origin's node ID (this node's when origin)
        self._conn: tornado.websocket.WebSocketClientConnection | None = None
        self._relay = RelayBudget()
        self._hub: Any = None  # the FrameHub, once it ran this source
        self._asked = {RELAY_JPEG: False, RELAY_H264: False}  # what the origin was asked for
        self._origin_lost = False  # the origin said its upstream was lost (no frame is due)
        self._frame_timeout: asyncio.Timeout | None = None  # of the current relay, while it runs
        self._keyframe_asked = -1e9  # when the origin was last asked for a keyframe (monotonic)
        self.relay_bytes = 0  # received from the origin, as an edge (metrics read these)
        self.relay_frames = 0
        # A push upstream's publisher is here and this node holds the lease for it, whether or not
        # the hub runs (`publisher_arriving`; renewed by `renew`, given back when it leaves).
        self._publisher_lease = False
        # Held around each decision about this upstream's lease and the Redis calls that carry it
        # out, so that they reach Redis in the order they were decided: each call is awaited on a
        # connection of the pool, and two calls in flight at once on two connections may land in
        # either order (a release decided before a claim, landing after it, would delete the lease
        # just claimed: another node could take it, and the upstream have two origins).
        self._lease_lock = asyncio.Lock()
        # Where frames POSTed here go while another node has the publisher: (node ID, URL, until
        # when, monotonic), see `_post_target`; and the last failure to deliver one, logged once.
        self._post_to: tuple[str, str, float] | None = None
        self._post_problem: str | None = None
        # Another node announced it took this upstream's lease: a search here looks again at once.
        self._origin_news = asyncio.Event()
        # The origin's upstream failed and the hub waits to retry it: this node keeps the lease (the
        # heartbeat's `renew` keeps it) and stays the origin between runs, see `_run_origin`.
        self._waiting_as_origin = False
        self._release: asyncio.Task | None = None  # giving the lease back after such a wait (`stopped`)
        cluster.sources[inner.name] = self
        cluster.event_handlers.setdefault(ORIGIN_OP, functools.partial(_origin_announced, cluster))

    @property
    def underlying(self) -> Source:
        return self.inner

    @property  # type: ignore[override]
    def address(self) -> tuple[str, int] | None:
        """Where the hub probes the upstream while it waits to retry: only as its origin (this node
        connects to it, and lost it). An edge's run ends when its origin's relay does, and its retry
        looks for an origin; edges never connect to the upstream, so they never probe it either (a
        simulator would see a connection a second from every node)."""
        return self.inner.address if self._waiting_as_origin else None

    def publisher_present(self) -> bool:
        return self.inner.publisher_present()

    @property
    def serves_edges(self) -> bool:
        """Edges may relay from this node: it is the origin, or it has a push upstream's
        publisher (a relay's demand starts its hub, which then runs as the origin). Never while
        it relays from another node itself: edges of an edge make chains, and loops where a frame
        goes round for ever."""
        return self.role == "origin" or (self._publisher_lease and self.role != "edge")

    def _close_relays(self, reason: str) -> None:
        """This node is no longer the one to relay from: its edges look for the origin again."""
        for relay in tuple(self.cluster.relays.get(self.name, ())):
            relay.close(1001, reason)

    async def publisher_arriving(self) -> str | None:
        """A push publisher comes to this node: it takes the upstream's lease (this node becomes
        the origin the others relay from) unless another node has the upstream's publisher."""
        if not self.inner.origin_where_published:
            return None
        async with self._lease_lock:
            if self._publisher_lease:
                return None
            if self.cluster.draining:
                return SHUTTING_DOWN
            holder = await self.cluster.write(lambda: self.cluster.claim_or_holder(self.name))
            if holder == self.cluster.node_id:
                self._took_publisher_lease()
        if holder == self.cluster.node_id:
            await self._announce_origin()
            return None
        return (f"The publisher of upstream '{self.name}' is connected to node {holder}: publish there (one "
                "publisher at a time)")

    def _took_publisher_lease(self) -> None:
        """Under the lock; the caller announces it (`_announce_origin`) once the lock is free."""
        self._publisher_lease = True
        self._post_to = None
        if self._conn is not None:  # an edge of the node the publisher left: the origin now
            self._conn.close(1001, "the publisher came to this node")

    async def _announce_origin(self) -> None:
        """This node has just taken the upstream's lease: tell the others, so that a node looking
        for the origin (its viewers waiting, e.g. for a publisher that has just connected here)
        comes at once rather than at its next look, RETRY_SECONDS later. Not under the lease lock:
        a publish is no lease decision, and a slow one must not hold up the heartbeat's."""
        try:
            await self.cluster.publish({"op": ORIGIN_OP, "upstream": self.name, "node": self.cluster.node_id})
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)  # they find it at their next look

    def origin_announced(self) -> None:
        self._origin_news.set()

    async def post_elsewhere(self, frame: bytes, captured: float | None) -> tuple[int, dict] | None:
        """A frame POSTed to this node: None to publish it here (this node has the upstream's
        publisher, or takes its lease: free), else the answer of the node that has it, which the
        frame was forwarded to (cluster/ingest.py). PublisherUnreachable (503) when that node
        cannot be reached; the node is looked up again for the next frame."""
        target = await self._post_target()
        if target is None:
            return None
        holder, url = target
        try:
            status, answer = await forward_frame(self.cluster, holder, url, self.name, frame, captured)
        except PublisherUnreachable as exc:
            self._post_to = None
            if str(exc) != self._post_problem:  # once, not for every frame a publisher sends meanwhile
                self._post_problem = str(exc)
                log.warning("cluster: a frame POSTed here was not delivered: %s", exc, extra={"upstream": self.name})
            raise
        if status in (409, 503):  # the lease moved, or that node cannot reach Redis: look again
            self._post_to = None
        elif status == 200:
            self._post_problem = None
        return status, answer

    async def _post_target(self) -> tuple[str, str] | None:
        """Where frames POSTed to this node are published: None here (taking the lease if it is
        free), else (node ID, advertise URL) of the live node that holds it, remembered for
        POST_TARGET_SECONDS so that a run of frames asks Redis once a second, not per frame."""
        if not self.inner.origin_where_published or self._publisher_lease:
            return None
        remembered = self._post_to
        if remembered is not None and time.monotonic() < remembered[2]:
            return remembered[0], remembered[1]
        self._post_to = None
        async with self._lease_lock:
            if self._publisher_lease:  # taken meanwhile (by a frame or a publisher here)
                return None
            if self.cluster.draining:  # takes no lease on its way out; a holder may still take the frame
                holder = await self.cluster.write(lambda: self.cluster.holder(self.name))
                if holder is None or holder == self.cluster.node_id:
                    raise PublishedElsewhere(SHUTTING_DOWN)
            else:
                holder = await self.cluster.write(lambda: self.cluster.claim_or_holder(self.name))
                if holder == self.cluster.node_id:
                    self._took_publisher_lease()
        if holder == self.cluster.node_id:  # taken just now
            await self._announce_origin()
            return None
        url = await self.cluster.write(lambda: self.cluster.node_url(holder))
        if self._publisher_lease:  # taken meanwhile (a publisher here): the lease moved, to this node
            return None
        if url is None:
            # A lease outlives its node by LEASE_TTL at most (a node's registration lives longer):
            # the lease is free within that, and the next frame takes it.
            raise PublisherUnreachable(f"Node {holder}, which has the publisher of upstream '{self.name}', is not "
                                       f"registered (dead?); its lease expires within {LEASE_TTL_SECONDS:g} s: try "
                                       "again shortly")
        self._post_to = (holder, url, time.monotonic() + POST_TARGET_SECONDS)
        return holder, url

    async def renew(self) -> None:
        """Heartbeat: renew the lease this node holds (as the origin, or for a push publisher
        here); a publisher gone from this node gives it back."""
        async with self._lease_lock:
            if self._publisher_lease and not self.inner.publisher_present():
                self._publisher_lease = False
                if self.role != "origin":  # an origin gives it back when its run ends (the publisher left)
                    self._close_relays("the publisher left this node")
                    await self.cluster.release(self.name)
                return
            if self.role == "origin" or self._publisher_lease:
                claimed = await self.cluster.claim(self.name)
                if not claimed and self._publisher_lease and self.role != "origin":
                    # Another node took it (this one was cut off from Redis): its publisher is the one.
                    self._close_relays(PUBLISHED_ELSEWHERE)
                    self._drop_publisher(PUBLISHED_ELSEWHERE)
                elif not claimed and self._waiting_as_origin:
                    # Taken over while this node waited to retry (it was cut off from Redis): the
                    # next run looks for the new origin; the edges here look for it now.
                    self._waiting_as_origin = False
                    self.role, self.origin = "idle", None
                    self._close_relays("another node is the origin of this upstream now")

    def _drop_publisher(self, reason: str) -> None:
        """This node no longer holds the lease for its push publisher: disconnect it (it may
        reconnect, to whichever node)."""
        self._publisher_lease = False
        self.inner.disconnect(reason)

    async def _give_back_lease(self) -> bool:
        """Release the lease now, so another node need not wait for it to expire; False if Redis
        could not be reached (it expires by itself). The caller holds `_lease_lock`."""
        try:
            await self.cluster.release(self.name)
        except REDIS_ERRORS:
            return False
        return True

    @property
    def produces_h264(self) -> bool:  # type: ignore[override]
        # Only the origin may encode (one encoder cluster-wide): an edge relays the origin's
        # units, and a node still looking for the origin starts its encoder once it becomes it
        # (`_run_origin` tells the hub).
        return self.inner.produces_h264 if self.role == "origin" else True

    async def run(self, hub: HubLink) -> None:
        self._hub = hub
        resuming, self._waiting_as_origin = self._waiting_as_origin, False
        try:
            await self._run(hub, resuming)
        finally:
            if not self._waiting_as_origin:
                self.role, self.origin = "idle", None

    async def _run(self, hub: HubLink, resuming: bool = False) -> None:
        """`resuming`: this node kept the lease as the origin while the hub waited to retry its
        upstream (it is the origin still, unless another node took the lease meanwhile)."""
        deadline = time.monotonic() + FIND_ORIGIN_SECONDS
        last_problem = "no origin found"
        while True:
            if self.cluster.draining:
                raise ConnectionError("node shutting down")
            if not resuming:
                self.role = "searching"
            holder = url = None
            self._origin_news.clear()  # before looking: news that comes while Redis answers counts
            async with self._lease_lock:
                # A push upstream's origin is where its publisher is: without one here, only look.
                published_elsewhere = self.inner.origin_where_published and not self.inner.publisher_present()
                try:
                    claimed = not published_elsewhere and await self.cluster.claim(self.name)
                    if not claimed:
                        holder = await self.cluster.holder(self.name)
                        if holder == self.cluster.node_id:  # its publisher just left here: not an origin
                            holder = None
                        url = await self.cluster.node_url(holder) if holder else None
                except REDIS_ERRORS as exc:
                    self.cluster.failed(exc)
                    raise ConnectionError("Redis unreachable: cannot find the origin of this upstream") from None
                if claimed and self.inner.origin_where_published:
                    self._publisher_lease = True
                elif self._publisher_lease and not published_elsewhere:
                    # Another node took the lease (this one was cut off from Redis): its publisher is
                    # the one; this node's would mix its frames into the relayed ones (as `renew`).
                    self._drop_publisher(PUBLISHED_ELSEWHERE)
            if claimed:
                # Its failures are the upstream's (connection refused, closed), not Redis's.
                await self._run_origin(hub, resuming)
                return
            resuming, self.role = False, "searching"
            if holder and url:
                try:
                    conn = await self._connect(url)
                except Exception as exc:  # noqa: BLE001 - any failure to reach the origin: look again
                    last_problem = f"origin {holder} unreachable ({type(exc).__name__})"
                else:
                    await self._run_edge(hub, conn, holder)
                    return
            elif holder:
                last_problem = f"origin {holder} not registered (dead?); waiting for its lease to expire"
            elif published_elsewhere:
                # Nothing to reconnect to: wait for a publisher to come to any node, as a push
                # upstream waits on one node (no backoff that would keep viewers from it later).
                last_problem = "no publisher is connected to any node"
                deadline = time.monotonic() + FIND_ORIGIN_SECONDS
            if time.monotonic() > deadline:
                raise ConnectionError(last_problem)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._origin_news.wait(), RETRY_SECONDS)

    # -- origin ------------------------------------------------------------------------------------

    async def _run_origin(self, hub: HubLink, resuming: bool = False) -> None:
        if not resuming:
            log.info("cluster: this node is the origin of upstream %s", self.name, extra={"upstream": self.name})
        self.role, self.origin = "origin", self.cluster.node_id
        hub.source_format_changed()
        inner = asyncio.ensure_future(self.inner.run(hub))
        keeper = asyncio.ensure_future(self._keep_lease())
        upstream_ended = False
        try:
            if not resuming:  # the others know (a node looking for the origin since has found it)
                await self._announce_origin()  # here: cancelled meanwhile, the lease is still given back
            done, _ = await asyncio.wait({inner, keeper}, return_when=asyncio.FIRST_COMPLETED)
            if inner in done:
                upstream_ended = True
                inner.result()  # its return or its error, as a plain source's
                return
            raise ConnectionError(keeper.result())
        finally:
            # The lease first: the hub's stop() cancels again after 0.5 s, and another node should
            # not wait for the lease to expire. A push upstream's stays while its publisher is here.
            # The lock may be held by a Redis call that is slow to answer, and the hub cancels this
            # task again meanwhile: the tasks are cancelled whatever becomes of the release (else
            # the keeper would renew the lease for ever, with no hub).
            # An upstream that failed or closed (the hub retries it) keeps its lease and origin
            # meanwhile: its edges stay with this node, a node whose first viewer comes during the
            # outage relays from it rather than connecting to the upstream too, and this node
            # probes the upstream (`address`) and reconnects it as soon as it is back. The
            # heartbeat renews the lease until the next run, and `stopped` gives it back if the
            # hub stops instead. Not a push upstream's (its lease goes with its publisher).
            try:
                async with self._lease_lock:
                    keeper.cancel()  # no renewal after this (it waits for the lock, or sleeps)
                    if upstream_ended and not self.inner.origin_where_published and not self.cluster.draining:
                        self._waiting_as_origin = True
                    elif not self.inner.publisher_present():
                        self._publisher_lease = False
                        if await self._give_back_lease():
                            log.info("cluster: released the lease of upstream %s", self.name,
                                     extra={"upstream": self.name})
            finally:
                keeper.cancel()
                inner.cancel()
                if self.inner.origin_where_published:  # its publisher left: edges look for the next one
                    self._close_relays("the publisher left this node")
                for task in (keeper, inner):
                    while not task.done():
                        task.cancel()
                        await asyncio.wait([task], timeout=0.5)

    async def _keep_lease(self) -> str:
        """Renew the lease every second; return (why) when another node holds it. Redis
        unreachable: keep the upstream (viewers keep streaming) and keep trying."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if self.cluster.draining:
                return "node shutting down"
            try:
                async with self._lease_lock:
                    if not await self.cluster.claim(self.name):
                        holder = await self.cluster.holder(self.name)
                        return f"lease taken over by node {holder}"
            except REDIS_ERRORS as exc:
                self.cluster.failed(exc)

    async def give_up(self) -> None:
        """Drain: stop being the origin now (the hub's run ends, the lease is released)."""
        if self.role == "origin" and self._hub is not None:
            await self._hub.stop()
        if self._release is not None:  # the hub stopped while it waited to retry, as the origin
            await asyncio.wait([self._release])
        async with self._lease_lock:
            if self._publisher_lease:  # a push upstream's publisher: it goes on at another node, at once
                self._drop_publisher("node shutting down; publish to another node")
                await self._give_back_lease()

    # -- edge ----------------------------------------------------------------------------------------

    async def _connect(self, base_url: str) -> tornado.websocket.WebSocketClientConnection:
        rc = self.reconnect
        url = "ws" + base_url[len("http"):] + f"/internal/relay/{self.name}"
        request = HTTPRequest(url, headers=self.cluster.node_headers(),
                              connect_timeout=min(rc.connect_timeout_seconds, 2.0),
                              request_timeout=min(rc.connect_timeout_seconds, 2.0))
        return await _websocket_connect(request, ping_interval=2, ping_timeout=2,
                                        max_message_size=rc.max_message_bytes)

    async def _run_edge(self, hub: HubLink, conn: tornado.websocket.WebSocketClientConnection, origin: str) -> None:
        self.role, self.origin = "edge", origin
        self._conn = conn
        log.info("cluster: relaying upstream %s from origin %s", self.name, origin, extra={"upstream": self.name})
        # Edges that came while this node was the origin or had the publisher: not from an edge.
        self._close_relays(f"this node relays from origin {origin} now")
        hub.source_format_changed()  # the origin encodes: no encoder here (one ran if this node was the origin)
        self._asked = {RELAY_JPEG: False, RELAY_H264: False}  # a new connection: nothing asked yet
        self._origin_lost = False
        connected_text = connected_status(self.name)
        frame_timeout = self.reconnect.frame_timeout_seconds
        try:
            # The frame timeout runs only while something is asked for (re-armed by each message
            # and each change of demand, see `_ask`).
            async with asyncio.timeout(None) as self._frame_timeout:
                self._ask(RELAY_JPEG, hub.jpeg_wanted)
                self._ask(RELAY_H264, bool(hub.h264_viewer_count()))
                while True:
                    message = await conn.read_message()
                    if message is None:
                        raise ConnectionError(f"relay from origin {origin} closed"
                                              + (f" ({conn.close_reason})" if conn.close_reason else ""))
                    if isinstance(message, bytes) and message[:1] == _LOST:
                        # The origin's upstream was lost: no frame is due until it is back.
                        self._origin_lost = True
                        self._arm_frame_timeout()
                        hub.set_lost(message[1:].decode(errors="replace"))
                        continue
                    if isinstance(message, bytes) or message == connected_text:
                        self._origin_lost = False  # it is back (the status, or a frame first)
                    self._arm_frame_timeout()
                    if isinstance(message, bytes):
                        if not hub.connected:
                            hub.set_connected()
                        self.relay_bytes += len(message)
                        self.relay_frames += 1
                        if len(message) > _AU_HEAD.size:
                            kind, time_us = _AU_HEAD.unpack_from(message)
                            if kind == CLUSTER_JPEG_TYPE:
                                hub.publish(message[_AU_HEAD.size:], time_us / 1_000_000)
                            elif kind in (0, 1):
                                hub.publish_h264(message[_AU_HEAD.size:], time_us)
                    elif message == connected_text:
                        # The origin's word that its upstream is connected: this node's hub is
                        # now, and tells its viewers once (or did at a frame that came first: a
                        # push publisher's, before the origin's run has seen it).
                        if not hub.connected:
                            hub.set_connected()
                    else:  # the upstream's text, and the origin's other statuses (reconnecting)
                        hub.relay_text(message)
        except TimeoutError:  # the frame timeout expired between two reads
            raise FrameTimeout(f"no frame from origin {origin} for {frame_timeout:g} s") from None
        finally:
            self._frame_timeout = None
            if self._conn is conn:
                self._conn = None
            self._relay.abandon(conn.protocol.stream if conn.protocol is not None else None)
            conn.close()

    def send(self, message: str | bytes) -> bool:
        if self.role == "origin":
            return self.inner.send(message)
        conn = self._conn
        if isinstance(message, bytes):
            message = bytes((RELAY_INPUT,)) + message
        return conn is not None and self._relay.send(conn.write_message, message)

    def h264_wanted(self, wanted: bool) -> None:
        self._ask(RELAY_H264, wanted)

    def jpeg_wanted(self, wanted: bool) -> None:
        self._ask(RELAY_JPEG, wanted)

    def _ask(self, what: int, wanted: bool) -> None:
        """As an edge, tell the origin this node wants JPEG frames / H.264 access units now (or
        no longer), if that changed."""
        conn = self._conn
        if self.role != "edge" or conn is None or self._asked[what] == wanted:
            return
        if self._relay.send(conn.write_message, bytes((what, 1 if wanted else 0)), control=True):
            self._asked[what] = wanted
            self._arm_frame_timeout()

    def _arm_frame_timeout(self) -> None:
        """Frames are due within the frame timeout from now while anything is asked for; none
        are while nothing is (then the relay may stay quiet for as long as it lingers), nor while
        the origin's upstream is lost (the origin reconnects it, and says when it is back)."""
        timeout = self._frame_timeout
        if timeout is None or timeout.expired():
            return
        if any(self._asked.values()) and not self._origin_lost:
            timeout.reschedule(asyncio.get_running_loop().time() + self.reconnect.frame_timeout_seconds)
        else:
            timeout.reschedule(None)

    def request_keyframe(self) -> None:
        if self.role == "origin":
            self.inner.request_keyframe()
            return
        conn = self._conn
        now = time.monotonic()
        # At most one a second, however many edge viewers ask (the origin's encoder has the same
        # limit; this one spares the relay).
        if (self.role == "edge" and conn is not None and self._asked[RELAY_H264]
                and now - self._keyframe_asked >= KEYFRAME_REQUEST_MIN_INTERVAL):
            if self._relay.send(conn.write_message, bytes((RELAY_KEYFRAME,)), control=True):
                self._keyframe_asked = now

    async def held_elsewhere(self) -> bool:
        if self.cluster.draining:
            return False
        try:
            holder = await self.cluster.holder(self.name)
        except REDIS_ERRORS as exc:
            self.cluster.failed(exc)
            return False
        return holder is not None and holder != self.cluster.node_id

    def stopped(self) -> None:
        if self._waiting_as_origin:  # the hub stopped while it waited to retry: the lease goes back
            self._waiting_as_origin = False
            self.role, self.origin = "idle", None
            self._release = asyncio.ensure_future(self._release_after_wait())
        self.inner.stopped()

    async def _release_after_wait(self) -> None:
        async with self._lease_lock:
            # Unless the hub started again meanwhile (its run takes the lease: role searching, origin).
            if self.role == "idle" and not self._publisher_lease and await self._give_back_lease():
                log.info("cluster: released the lease of upstream %s", self.name, extra={"upstream": self.name})

    def close(self) -> None:
        self.inner.close()

    @property
    def origin_connected(self) -> bool:
        """This node holds the upstream and has it connected."""
        return self.role == "origin" and self._hub is not None and self._hub.connected

    def status(self) -> dict:
        relays = self.cluster.relays.get(self.name, ())
        edges = sorted(getattr(relay, "edge", "?") for relay in relays)
        # What the edges' relays take now (each is one viewer of that kind here, not counted as one).
        wants = {"jpeg": sum(RELAY_JPEG in relay.viewers for relay in relays),
                 "h264": sum(RELAY_H264 in relay.viewers for relay in relays)}
        return {"role": self.role, "origin": self.origin, "edges": edges,
                **({"edgesWant": wants} if relays else {}),
                **({"relayBytesIn": self.relay_bytes} if self.relay_bytes else {}),
                **self.inner.status()}


def _origin_announced(cluster: Cluster, event: dict) -> None:
    """ORIGIN_OP from the control channel: wake this node's search for that upstream's origin."""
    source = cluster.sources.get(event["upstream"])
    if source is not None and event["node"] != cluster.node_id:
        source.origin_announced()


class RelayViewer(Viewer):
    """An edge's relay connection as a JPEG viewer of the origin's hub, while the edge wants JPEG:
    real frames only (each edge draws its own offline picture)."""

    relay = True

    def offer(self, frame: Frame, data: bytes) -> None:
        if not frame.offline:  # `data`: the relay's form, with the capture time (built once for every edge)
            super().offer(frame, data)


class RelayH264Viewer(H264Viewer):
    """An edge's relay connection as an H.264 viewer of the origin's hub, while the edge has H.264
    viewers: each access unit as a binary message; no config text (the edge reads the parameter
    sets from the keyframes, as its hub does from any source)."""

    relay = True

    def _stream_start(self, au: AccessUnit) -> bytes:
        return b""

    def offer(self, au: AccessUnit, data: bytes) -> None:  # type: ignore[override]
        if au.config_changed:  # the hub's bytes of it begin with the config text message
            data = ws_h264_message(au)
        super().offer(au, data)


class RelayHandler(tornado.websocket.WebSocketHandler):
    """WS /internal/relay/{upstream} on the origin: one per edge and upstream. Authenticated with
    cluster.token (constant-time compare); refused unless this node is the upstream's origin."""

    hub: FrameHub
    demand: Demand | None = None  # keeps the origin's hub running while the edge is connected
    # The edge's JPEG and H.264 viewers, one relay viewer each here while it wants them (by kind).
    viewers: dict[int, RelayViewer | RelayH264Viewer]
    edge = "?"

    def _cluster(self) -> Cluster:
        return self.application.settings["vsproxy_cluster"]

    def check_origin(self, origin: str) -> bool:
        return True  # node to node, authenticated by the token; browsers have no business here

    def get_compression_options(self) -> None:
        return None

    async def get(self, upstream: str, *args: Any, **kwargs: Any) -> None:
        cluster = self._cluster()
        if not cluster.from_a_node(self.request.headers.get("Authorization")):
            self._refuse(401, "cluster token required")
            return
        hub = self.application.settings["vsproxy_hubs"].get(upstream)
        source = cluster.sources.get(upstream)
        if hub is None or source is None:
            self._refuse(404, "unknown upstream")
            return
        if not source.serves_edges or cluster.draining:
            self._refuse(409, "this node is not the origin of that upstream")
            return
        error = websocket_handshake_error(self.request.headers, self.check_origin)
        if error is not None:
            self._refuse(*error)
            return
        self.hub = hub
        self.edge = self.request.headers.get("X-Vsproxy-Node", "?")[:128]
        await super().get(upstream, *args, **kwargs)

    def _refuse(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        write_json_error(self, status, error, headers)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # What Tornado refuses itself (a method other than GET: 405) as the one JSON error body.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = exc.reason if isinstance(exc, tornado.web.HTTPError) and exc.reason else self._reason
        write_json_error(self, status_code, reason)

    def open(self, upstream: str) -> None:
        self.set_nodelay(True)
        self.viewers = {}
        self._text = RelayBudget()  # upstream text written to the edge that it has not read yet
        self.demand = Demand(f"relay:{self.edge}")
        self.hub.attach(self.demand)  # type: ignore[arg-type]
        self.hub.text_listeners.append(self._send_text)
        self.hub.loss_listeners.append(self._upstream_lost)
        if self.hub.connected:  # as to a viewer that comes while it is (the edge reads it, see `_run_edge`)
            self._send_text(connected_status(self.hub.name))
        self._cluster().relays.setdefault(upstream, set()).add(self)
        log.info("cluster: edge %s relays upstream %s", self.edge, upstream, extra={"upstream": upstream})

    def _close_viewer(self, reason: str) -> None:
        self.close(1001, reason[:120])

    def _send_text(self, text: str) -> None:
        # As to a viewer: within a budget of unread text, beyond it dropped for this edge (an
        # edge that stops reading must not make the origin hold the upstream's telemetry).
        self._text.send(self.write_message, text)

    def _upstream_lost(self, reason: str) -> None:
        # A control message: never dropped for text the edge has not read.
        self._text.send(self.write_message, _LOST + reason.encode()[:1000], control=True)

    def on_message(self, message: str | bytes) -> None:
        if self.demand is None or self.ws_connection is None:  # closed here: what was in flight is ignored
            return
        if isinstance(message, str):
            self.hub.send_upstream(message)  # an edge viewer's input, checked by the edge already
        elif message[:1] == bytes((RELAY_INPUT,)):
            self.hub.send_upstream(message[1:])
        elif message[:1] in (bytes((RELAY_JPEG,)), bytes((RELAY_H264,))):
            self._want(message[0], message[1:2] == b"\x01")
        elif message[:1] == bytes((RELAY_KEYFRAME,)) and RELAY_H264 in self.viewers:
            self.hub.request_keyframe()

    def _want(self, kind: int, wanted: bool) -> None:
        """The edge's viewers of one kind came or left: while they are there it counts here as one
        viewer of that kind (which has an H.264 upstream decoded for JPEG, and runs this hub's
        encoder for H.264 where the upstream does not send H.264 itself); a new one gets the
        current frame (JPEG) or GOP (H.264) at once."""
        viewer = self.viewers.get(kind)
        if wanted and viewer is None:
            stream = self.ws_connection.stream  # type: ignore[union-attr]
            if kind == RELAY_JPEG:  # in the hub's list of relays (their own form), counted as ws_binary
                self.viewers[kind] = RelayViewer(stream, CLUSTER_JPEG, self.hub.stats[WS_BINARY],
                                                 close=self._close_viewer)
            else:
                self.viewers[kind] = RelayH264Viewer(stream, WS_H264, self.hub.stats[WS_H264],
                                                     close=self._close_viewer)
            self.hub.add_viewer(self.viewers[kind])
        elif not wanted and viewer is not None:
            self.hub.remove_viewer(viewer)
            del self.viewers[kind]

    def on_close(self) -> None:
        if self.demand is None:
            return
        for kind in list(self.viewers):
            self._want(kind, False)
        self.hub.text_listeners.remove(self._send_text)
        self.hub.loss_listeners.remove(self._upstream_lost)
        self.hub.detach(self.demand)  # type: ignore[arg-type]
        self.demand = None
        upstream = self.hub.name
        self._cluster().relays.get(upstream, set()).discard(self)
        log.info("cluster: edge %s stopped relaying upstream %s", self.edge, upstream, extra={"upstream": upstream})


routes = [(r"/internal/relay/(?P<upstream>[A-Za-z0-9][A-Za-z0-9._-]{0,63})", RelayHandler)]
