"""WebRTC out (WHEP): each peer gets the upstream's H.264 access units, packetized for its own
SRTP session by aiortc, on the same asyncio loop as Tornado. No decode and no encode per peer.

How a peer gets its frames: `WhepPeer` is a hub viewer of transport `webrtc`. The hub offers it
every access unit (`offer`, on the loop, cheap: a deque append); its `PassthroughTrack.recv()`
hands them to aiortc's RTP sender as `av.Packet`s, which aiortc's H.264 "encoder" only packs
(`H264Encoder.pack`: STAP-A/FU-A, packetization mode 1) instead of encoding.

Backpressure: a peer whose sender does not keep up (its queue grows) skips ahead to the next
keyframe, and never holds more than one GOP; a peer whose receiver went away (no RTCP for the
stall timeout, or ICE/DTLS failed) is dropped by the hub's tick like any stalled viewer.

aiortc exposes no event for a peer's keyframe requests (PLI/FIR) or for RTCP arriving: its
`RTCRtpSender` handles both internally. We wrap two methods of our own sender *instance*
(`_send_keyframe`, which aiortc calls on PLI/FIR, and `_handle_rtcp_packet`, which it calls for
every RTCP packet about the sender) and call the originals: no subclassing of aiortc's classes
(it builds the sender itself) and nothing patched class-wide. aiortc 1.16 (see setup.py's pin).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from ..codec.h264 import GOP_MAX_BYTES, GOP_MAX_FRAMES
from ..errors import BadOffer, ConnectionLimitReached
from .viewer import LatencyBuckets
from .wire import WEBRTC

if TYPE_CHECKING:
    from ..codec.h264 import AccessUnit
    from ..server import ConnectionCount
    from .viewer import TransportStats

log = logging.getLogger("vsproxy.webrtc")

MICROSECONDS = Fraction(1, 1_000_000)
# H.264 profiles vsproxy may send, as aiortc's codec table names them (profile-level-id). aiortc
# itself lists only (constrained) baseline; the encoder of JPEG upstreams (libx264) and most RTSP
# cameras send High or Main, so those are added once (see `_register_profiles`).
HIGH, MAIN, CONSTRAINED_BASELINE, BASELINE = "64001f", "4d001f", "42e01f", "42001f"
_profiles_registered = False


def _register_profiles() -> None:
    """Add H.264 High and Main (packetization mode 1) to aiortc's video codec table, so an answer
    can name the profile the stream really has. aiortc negotiates against this table (a module
    global of aiortc); vsproxy is its only user in the process and only ever sends with it."""
    global _profiles_registered  # noqa: PLW0603  # once per process, like aiortc's own init_codecs
    if _profiles_registered:
        return
    from aiortc.codecs import CODECS
    from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters

    have = {c.parameters.get("profile-level-id") for c in CODECS["video"] if c.mimeType == "video/H264"}
    payload_type = max(c.payloadType for c in CODECS["video"]) + 1
    for profile in (HIGH, MAIN):
        if profile in have:
            continue
        CODECS["video"] += [
            RTCRtpCodecParameters(
                mimeType="video/H264", clockRate=90000, payloadType=payload_type,
                rtcpFeedback=[RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli"),
                              RTCRtcpFeedback(type="goog-remb")],
                parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                            "profile-level-id": profile}),
            RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=payload_type + 1,
                                  parameters={"apt": payload_type}),
        ]
        payload_type += 2
    _profiles_registered = True


def _profile_of(profile_level_id: str) -> Any:
    from aiortc.sdp import parse_h264_profile_level_id

    try:
        return parse_h264_profile_level_id(profile_level_id)[0]
    except ValueError:
        return None


def codec_preferences(stream_codec: str | None) -> list:
    """aiortc's H.264 codec capabilities (packetization mode 1), the stream's own profile first
    (from its RFC 6381 codec string, "avc1.64001F"), then High, Main, constrained baseline and
    baseline; and RTX. The answer takes the first of these the offer has."""
    from aiortc import RTCRtpSender

    caps = RTCRtpSender.getCapabilities("video").codecs
    h264 = [c for c in caps if c.mimeType == "video/H264" and c.parameters.get("packetization-mode") == "1"]
    order = [HIGH, MAIN, CONSTRAINED_BASELINE, BASELINE]
    wanted = _profile_of(stream_codec[5:11]) if stream_codec and stream_codec.startswith("avc1.") else None

    def rank(cap: Any) -> tuple[int, int]:
        pli = str(cap.parameters.get("profile-level-id", "")).lower()
        same = 0 if wanted is not None and _profile_of(pli) == wanted else 1
        return same, order.index(pli) if pli in order else len(order)

    return sorted(h264, key=rank) + [c for c in caps if c.mimeType == "video/rtx"]


def without_mdns_candidates(sdp: str) -> str:
    """The offer without its mDNS host candidates (`<uuid>.local`, how browsers hide local
    addresses). aioice would resolve each over multicast, holding the answer up for about a
    second, and from another network it never resolves; the browser's connectivity checks reach
    us anyway and become peer-reflexive candidates. Where one was left out, so is
    `a=end-of-candidates` (Firefox sends it): aioice would otherwise give up at once when no
    candidate is left, before the browser's checks could arrive.

    A candidate's fields are read as aiortc reads them (split at any whitespace, the address the
    fifth): an mDNS name followed by a tab instead of a space is one aioice resolves too, and the
    offer's candidate limit (MAX_OFFER_CANDIDATES) counts only addresses."""
    lines = sdp.splitlines(keepends=True)
    kept = [line for line in lines if not _mdns_candidate(line)]
    if len(kept) < len(lines):
        kept = [line for line in kept if not line.startswith("a=end-of-candidates")]
    return "".join(kept)


def _mdns_candidate(line: str) -> bool:
    """Is this SDP line a candidate at an mDNS name (`<name>.local`)?"""
    if not line.startswith("a=candidate:"):
        return False
    fields = line[len("a=candidate:"):].split()
    return len(fields) > 4 and fields[4].lower().endswith(".local")


def reachable(candidate: Any) -> bool:
    """Whether vsproxy's ICE agent (aioice) can check `candidate` (an aiortc RTCIceCandidate):
    UDP, at an IP address, of a type it pairs (host, server-reflexive or relayed)."""
    try:
        ipaddress.ip_address(candidate.ip)
    except ValueError:
        return False
    return candidate.protocol.lower() == "udp" and candidate.type in ("host", "srflx", "relay")


# A browser offers a handful of candidates (one per interface and protocol, a relay or two). The
# ICE agent sends connectivity checks to every one it can reach, so an offer with thousands would
# have this server send STUN packets to whatever addresses a client lists.
MAX_OFFER_CANDIDATES = 32
# A viewer offers a video section, perhaps audio and a data channel. aiortc builds a transceiver
# for every section, on the event loop: a 64 KB offer of 500 tiny sections would take a second
# of it and 70 MB for one peer.
MAX_OFFER_MEDIA_SECTIONS = 4


def check_offer(sdp: str) -> None:
    """BadOffer unless `sdp` is an SDP offer with a video section that offers H.264 in
    packetization mode 1 (what aiortc sends: STAP-A and FU-A), and, where it ends its
    candidates (a=end-of-candidates), with one vsproxy can reach: otherwise ICE would fail the
    moment it started, after a 201. Give it the offer without its mDNS candidates."""
    from aiortc import sdp as aiortc_sdp

    if not sdp.lstrip().startswith("v=0"):
        raise BadOffer("The body must be an SDP offer (application/sdp, starting with v=0)")
    try:
        description = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception:  # aiortc's parser raises whatever a malformed line makes it raise
        raise BadOffer("The SDP offer could not be parsed") from None
    if len(description.media) > MAX_OFFER_MEDIA_SECTIONS:
        raise BadOffer(f"The SDP offer has {len(description.media)} media sections; vsproxy takes at most "
                       f"{MAX_OFFER_MEDIA_SECTIONS} (one video, audio and data it leaves inactive)")
    videos = [m for m in description.media if m.kind == "video"]
    if not videos:
        raise BadOffer("The SDP offer has no video section (m=video)", status=406)
    if not any(c.mimeType.lower() == "video/h264" and str(c.parameters.get("packetization-mode", "0")) == "1"
               for m in videos for c in m.rtp.codecs):
        raise BadOffer("The SDP offer has no H.264 with packetization-mode=1 for its video; vsproxy sends "
                       "H.264 only", status=406)
    if not any(m.ice and m.ice.usernameFragment and m.dtls and m.dtls.fingerprints for m in videos):
        raise BadOffer("The SDP offer's video section lacks ICE credentials or a DTLS fingerprint")
    media = description.media  # bundled: the first section's transport carries all; be lenient
    # A port beyond what a socket takes fails the ICE agent's first check on our own socket (asyncio
    # logs a fatal error and its traceback, twice, and closes the socket), long after the 201.
    if any(reachable(c) and not 0 <= c.port <= 65535 for m in media for c in m.ice_candidates):
        raise BadOffer("The SDP offer has an ICE candidate whose port is not 0-65535")
    if sum(reachable(c) for m in media for c in m.ice_candidates) > MAX_OFFER_CANDIDATES:
        raise BadOffer(f"The SDP offer has more than {MAX_OFFER_CANDIDATES} ICE candidates vsproxy would check")
    if all(m.ice_candidates_complete for m in media) and not any(reachable(c) for m in media for c in m.ice_candidates):
        raise BadOffer("The SDP offer ends its ICE candidates (a=end-of-candidates) with none vsproxy can "
                       "reach: it takes UDP candidates at an IP address (host, srflx or relay), not TCP")


def make_track(peer: WhepPeer) -> Any:
    """The peer's video track: a MediaStreamTrack whose `recv()` returns the peer's next queued
    access unit as an `av.Packet`, which aiortc's sender packetizes without encoding (the class
    is made here so aiortc is imported only once WebRTC is used)."""
    import av
    from aiortc import MediaStreamTrack

    class PassthroughTrack(MediaStreamTrack):
        kind = "video"

        async def recv(self) -> av.Packet:
            au = await peer.next_access_unit()
            packet = av.Packet(au.data)
            # RTP time (90 kHz) from the presentation time; aiortc adds a random origin.
            packet.pts = au.pts_us - peer.pts_origin
            packet.time_base = MICROSECONDS
            return packet

    return PassthroughTrack()


class WhepPeer:
    """One WHEP viewer: an RTCPeerConnection whose one video track is fed from the hub.

    Quacks like `outputs.viewer.Viewer` for the hub, the sessions, the dashboard and the metrics
    (transport, counters, offer, pending, flush_pending, stalled_for, close, hang_up). Its queue
    holds at most one GOP: a keyframe that finds `BEHIND_FRAMES` or more frames still queued
    replaces them (skip ahead, counted as dropped), and a queue over the caps is dropped whole
    until the next keyframe.
    """

    relay = False  # always a person watching (see Viewer.relay)

    transport = WEBRTC
    send_text = None  # status messages have no channel here
    BEHIND_FRAMES = 3  # a keyframe finding this many frames queued: the sender is behind
    # Receivers report on a stream only while it flows (Chromium: until 8 s after its last packet).
    # After a pause this long (the upstream down) their silence is no sign of absence: the ICE
    # consent checks (every ~5 s, RFC 7675) end a peer whose client went away meanwhile.
    PAUSE_SECONDS = 5.0
    MAX_QUEUE_FRAMES = GOP_MAX_FRAMES
    MAX_QUEUE_BYTES = GOP_MAX_BYTES

    def __init__(self, resource_id: str, session_id: str, pc: Any, stats: TransportStats, *,
                 on_close: Callable[[WhepPeer, str], None], request_keyframe: Callable[[], None]) -> None:
        self.id = resource_id
        self.session_id = session_id
        self.etag = f'"{secrets.token_hex(8)}"'
        self.pc = pc
        self.stats = stats
        self._on_close = on_close
        self._request_keyframe = request_keyframe
        self.connected_at = time.monotonic()  # when the offer was answered
        self.ice_connected = False  # ICE and DTLS have completed (connectionState "connected")
        self.last_taken = self.connected_at  # the sender last took an access unit
        self.last_rtcp = self.connected_at  # the peer last sent RTCP about our stream (or the start)
        self.frames_sent = 0
        self.bytes_sent = 0  # H.264 payload handed to the RTP sender (RTP/SRTP/UDP headers not counted)
        self.frames_dropped = 0
        self.age = LatencyBuckets()  # this peer's frame ages (the dashboard's p50/p95), as for any viewer
        self.keyframe_requests = 0
        self.pts_origin = 0
        self.waiting_for_keyframe = True
        self.closed = False
        self.deleted = False  # ended by its client's DELETE
        self._queue: deque[AccessUnit] = deque()
        self._queued_bytes = 0
        self._waiter: asyncio.Future | None = None
        self.expiry: asyncio.TimerHandle | None = None  # when its viewer token expires, if it does

    # -- the hub's side ---------------------------------------------------------------------------

    def offer(self, au: AccessUnit, data: bytes) -> None:
        """The next access unit of the stream (`data` is the same, its webrtc wire form)."""
        if self.closed:
            return
        if self.waiting_for_keyframe:
            if not au.keyframe:
                if self.frames_sent:  # before its first picture, a frame was never this peer's
                    self._drop(1)
                return
            self.waiting_for_keyframe = False
            if not self.frames_sent:
                self.pts_origin = au.pts_us
        queue = self._queue
        if au.keyframe and len(queue) >= self.BEHIND_FRAMES:
            self._drop(len(queue))  # behind: skip ahead to this keyframe
            queue.clear()
            self._queued_bytes = 0
        queue.append(au)
        self._queued_bytes += len(au.data)
        if len(queue) > self.MAX_QUEUE_FRAMES or self._queued_bytes > self.MAX_QUEUE_BYTES:
            self._drop(len(queue))
            queue.clear()
            self._queued_bytes = 0
            self.waiting_for_keyframe = True
            self._request_keyframe()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop(self, count: int) -> None:
        self.frames_dropped += count
        self.stats.frames_dropped += count

    @property
    def pending(self) -> AccessUnit | None:
        return self._queue[-1] if self._queue else None

    def flush_pending(self) -> None:
        """Nothing to flush: the peer's RTP sender pulls from the queue itself."""

    def stalled_for(self, now: float) -> float:
        """Seconds the peer has not taken what is queued for it, or (a receiver gone without a
        DELETE) has sent no RTCP about our stream while it flows; receivers send RTCP at least
        every few seconds while they get packets. A peer that never connected (a client that
        posted an offer and went away, or whose ICE checks never arrive) has stalled since its
        answer, whether frames flow or not: it holds a viewer's place."""
        if not self.ice_connected:
            return now - self.connected_at
        queue_stall = now - self.last_taken if self._queue else 0.0
        flowing = self.frames_sent > 0 and now - self.last_taken <= self.PAUSE_SECONDS
        return max(queue_stall, now - self.last_rtcp if flowing else 0.0)

    def close(self, reason: str) -> None:
        """End the peer: off its session and hub, and its RTCPeerConnection closed."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        log.info("WebRTC peer closed: %s", reason)
        self._on_close(self, reason)

    def hang_up(self) -> None:
        """`close` already ended the connection."""

    def expire_at(self, expires: float | None) -> None:
        """End the peer when its viewer token expires, at `expires` (epoch seconds; None: never).
        A later call replaces the time of an earlier one: a renewed token's expiry."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if expires is not None and not self.closed:
            self.expiry = asyncio.get_running_loop().call_later(max(0.0, expires - time.time()),
                                                                self._token_expired)

    def _token_expired(self) -> None:
        self.expiry = None
        log.info("viewer token expired, closing the viewer", extra={"session": self.session_id})
        self.close("viewer token expired")

    # -- aiortc's side ------------------------------------------------------------------------------

    async def next_access_unit(self) -> AccessUnit:
        """The next queued access unit (waits for one); called by the track's recv()."""
        while not self._queue:
            if self.closed:
                from aiortc.mediastreams import MediaStreamError

                raise MediaStreamError
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                if self.closed:
                    from aiortc.mediastreams import MediaStreamError

                    raise MediaStreamError from None
                raise
            finally:
                self._waiter = None
        au = self._queue.popleft()
        self._queued_bytes -= len(au.data)
        now = time.monotonic()
        if now - self.last_taken > self.PAUSE_SECONDS:  # the stream resumes, and the receiver's reports with it
            self.last_rtcp = max(self.last_rtcp, now)
        self.last_taken = now
        self.frames_sent += 1
        self.bytes_sent += len(au.data)
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(au.data)
        self.stats.latency.observe(now - au.arrived)  # frame age when handed to the RTP sender
        if au.age_offset is not None:  # from its capture (or arrival) time, as for every viewer
            age = now - au.arrived + au.age_offset
            self.stats.age.observe(age)
            self.age.observe(age)
        return au

    def hook_sender(self, sender: Any) -> None:
        """Learn of the peer's keyframe requests (PLI/FIR) and of its RTCP (it is alive); see the
        module docstring for why these two instance methods are wrapped."""
        send_keyframe = sender._send_keyframe
        handle_rtcp = sender._handle_rtcp_packet

        def on_keyframe_request() -> None:
            self.keyframe_requests += 1
            self._request_keyframe()
            send_keyframe()

        async def on_rtcp(packet: Any) -> None:
            self.last_rtcp = time.monotonic()
            await handle_rtcp(packet)

        sender._send_keyframe = on_keyframe_request
        sender._handle_rtcp_packet = on_rtcp


class WhepPeers:
    """Every WHEP peer of the proxy by resource id: answers offers, finds peers for DELETE, and
    waits for their connections to close on shutdown."""

    MAX_ENDED = 4096  # ended peers remembered for a late DELETE (about 100 bytes each)

    def __init__(self, ice_servers: list[dict], connections: ConnectionCount) -> None:
        self.ice_servers = ice_servers
        # Each peer takes a place among limits.max_connections, as a TCP viewer does: it holds
        # UDP sockets (one per local address) however few HTTP connections made it.
        self.connections = connections
        self.peers: dict[str, WhepPeer] = {}
        # Peers ended lately, not by a DELETE (resource id -> session id): the first DELETE that
        # arrives after its connection closed (a page unloading sends it and closes at once) is a
        # 200, not a 404 warning. Bounded: the oldest are forgotten.
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._closing: set[asyncio.Task] = set()
        # In a cluster, which node holds each peer (vsproxy.cluster.whep.WhepDirectory), so that
        # a DELETE of its resource on any node ends it; None: this node's peers are all there is.
        self.directory: Any = None

    def rtc_configuration(self) -> Any:
        from aiortc import RTCConfiguration, RTCIceServer

        # Always explicit: without iceServers aiortc would ask Google's public STUN server.
        return RTCConfiguration(iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in self.ice_servers])

    async def answer(self, offer_sdp: str, session_id: str, stats: TransportStats, stream_codec: str | None, *,
                     on_close: Callable[[WhepPeer, str], None],
                     request_keyframe: Callable[[], None]) -> tuple[WhepPeer, str]:
        """A new peer for an SDP offer, and the SDP answer (every host candidate in it: no
        trickle ICE). BadOffer if the offer is not one vsproxy can answer."""
        offer_sdp = without_mdns_candidates(offer_sdp)
        check_offer(offer_sdp)
        if self.connections.open >= self.connections.limit:
            raise ConnectionLimitReached(f"limits.max_connections ({self.connections.limit}) are open; "
                                         "try again later")
        _register_profiles()
        from aiortc import RTCPeerConnection, RTCSessionDescription

        def closed(peer: WhepPeer, reason: str) -> None:
            self._closed(peer)
            on_close(peer, reason)

        pc = RTCPeerConnection(self.rtc_configuration())
        peer = WhepPeer(secrets.token_urlsafe(16), session_id, pc, stats, on_close=closed,
                        request_keyframe=request_keyframe)
        # Its place is taken before the first await: offers answered at once must not all pass
        # the check above on the same count.
        self.connections.open += 1
        try:
            transceiver = pc.addTransceiver(make_track(peer), direction="sendonly")
            transceiver.setCodecPreferences(codec_preferences(stream_codec))
            peer.hook_sender(transceiver.sender)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
                # Answering fails too on offers aiortc took (no direction attribute, a repeated mid).
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
            except OSError:  # this server's own sockets (gathering candidates): not the offer's fault
                raise
            except Exception as exc:  # aiortc refuses an offer it cannot use with assorted errors
                raise BadOffer(f"The SDP offer cannot be answered ({type(exc).__name__}: {exc})"[:300],
                               status=406 if "codec" in str(exc).lower() or "send parameters" in str(exc)
                               else 400) from None
        except BaseException:
            self.connections.open -= 1
            await pc.close()
            raise

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                peer.ice_connected = True
            elif pc.connectionState in ("failed", "closed"):
                peer.close(f"connection {pc.connectionState}")

        self.peers[peer.id] = peer
        if self.directory is not None:
            await self.directory.added(peer)
        return peer, pc.localDescription.sdp

    def get(self, resource_id: str) -> WhepPeer | None:
        return self.peers.get(resource_id)

    async def end(self, session_id: str, resource_id: str, reason: str) -> bool:
        """End the peer of `session_id` with that resource id, here or (in a cluster) on the node
        holding it: False if there is none."""
        peer = self.peers.get(resource_id)
        if peer is not None and peer.session_id == session_id:
            self.delete(peer, reason)
            return True
        if self._ended.get(resource_id) == session_id:
            del self._ended[resource_id]  # its first DELETE, after its connection ended it
            if self.directory is None:
                return True
            # In a cluster its record in Redis decides: a DELETE on another node may have had it.
        if self.directory is not None:
            return await self.directory.end(session_id, resource_id)
        return False

    async def renew(self, session_id: str, resource_id: str, expires: float) -> bool:
        """The peer of `session_id` with that resource id now ends at `expires` (its client's
        renewed viewer token), here or (in a cluster) on the node holding it: False if there is
        none (it ended, or never was)."""
        peer = self.peers.get(resource_id)
        if peer is not None and peer.session_id == session_id:
            peer.expire_at(expires)
            return True
        if self.directory is not None and resource_id not in self._ended:
            return await self.directory.renew(session_id, resource_id, expires)
        return False

    def delete(self, peer: WhepPeer, reason: str) -> None:
        """End `peer` for its client's DELETE: unlike a peer that ended otherwise, it is not
        remembered for a later DELETE (a second one finds nothing: 404)."""
        peer.deleted = True
        peer.close(reason)

    def _closed(self, peer: WhepPeer) -> None:
        if self.peers.pop(peer.id, None) is not None:
            if not peer.deleted:  # its client may still send the DELETE: remembered for it
                self._ended[peer.id] = peer.session_id
                if len(self._ended) > self.MAX_ENDED:
                    self._ended.popitem(last=False)
            self.connections.open -= 1
            if self.directory is not None:
                self.directory.removed(peer)
        if peer.expiry is not None:
            peer.expiry.cancel()
        task = asyncio.ensure_future(peer.pc.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout`) for the peer connections being closed (shutdown)."""
        if self._closing:
            await asyncio.wait(tuple(self._closing), timeout=timeout)
