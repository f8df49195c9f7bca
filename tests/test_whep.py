"""WHEP: WebRTC playback of a session (POST /stream/{id}/whep, DELETE its resource), with a real
aiortc peer on loopback as the client. No STUN/TURN server is ever contacted (no ICE servers:
host candidates only)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from helpers import VIEWER_AUTH, WhepClient, assert_json_error, poll, session_json, wait_until
from test_openapi import call, contract  # noqa: F401  (fixtures)

from vsproxy.outputs.wire import WEBRTC
from vsproxy.sessions import iso_utc

SMALL_DEMO = {"demo": {"width": 320, "height": 240, "fps": 30, "quality": 70}}


@pytest.fixture
def whep_clients(io_loop):
    clients: list[WhepClient] = []
    yield clients
    io_loop.run_sync(lambda: asyncio.gather(*(c.close() for c in clients)))


async def new_client(api, whep_clients, session_id: str, query: str = "") -> WhepClient:
    client = WhepClient(api, f"/stream/{session_id}/whep{query}")
    whep_clients.append(client)
    return client


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_whep_peer_receives_h264_from_the_shared_encoder(api, proxy, whep_clients):
    """201 with the SDP answer, Location and ETag; the peer decodes frames of the demo session; it
    is a viewer of the session (connections) and of the hub (transport webrtc)."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 201
    response = client.response
    assert response.headers["Content-Type"] == "application/sdp"
    assert response.headers["Location"].startswith(f"/stream/{session_id}/whep/")
    assert response.headers["ETag"]
    answer = response.body.decode()
    assert "a=candidate:" in answer and "H264/90000" in answer and "a=sendonly" in answer
    assert "VP8" not in answer  # H.264 only, as offered
    frames = await client.frames(20)
    assert (frames[-1].width, frames[-1].height) == (320, 240)
    assert len({bytes(f.planes[0])[:4096] for f in frames}) > 1  # moving pictures, not one frame repeated
    hub = proxy.hubs["demo"]
    assert len(hub.viewers[WEBRTC]) == 1 and hub.encoder.running
    assert (await session_json(api, session_id))["connections"] == 1
    assert hub.stats[WEBRTC].frames_sent >= 20 and hub.stats[WEBRTC].bytes_sent > 0


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_delete_ends_the_peer_and_destroy_ends_the_others(api, proxy, whep_clients):
    session_id = (await api.create_session())["sessionId"]
    first = await new_client(api, whep_clients, session_id)
    second = await new_client(api, whep_clients, session_id)
    assert await first.connect() == 201 and await second.connect() == 201
    await first.frames(3)
    await second.frames(3)
    assert (await session_json(api, session_id))["connections"] == 2

    code, _, _ = await api.call("DELETE", first.location)
    assert code == 200
    assert (await session_json(api, session_id))["connections"] == 1
    await wait_until(lambda: first.pc.connectionState == "closed" or first.track.readyState == "ended",
                     "the deleted peer's connection to end")
    code, body, _ = await api.call("DELETE", first.location)  # already gone
    assert_json_error(code, body, 404)

    code, _, _ = await api.call("DELETE", f"/session/{session_id}")
    assert code == 200
    hub = proxy.hubs["demo"]
    await wait_until(lambda: not hub.viewers[WEBRTC] and not proxy.whep.peers, "the peers to end")
    await wait_until(lambda: not hub.encoder.running, "the encoder to stop with its last viewer")


@pytest.mark.gen_test(timeout=30)
async def test_refusals_unknown_session_bad_offer_no_h264_content_type_trickle(api, whep_clients):
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, "stream_123_nope")
    sdp = await client.offer()
    sdp_headers = {"Content-Type": "application/sdp"}
    code, body, _ = await api.call("POST", "/stream/stream_123_nope/whep", raw=sdp.encode(), headers=sdp_headers)
    assert_json_error(code, body, 404)
    path = f"/stream/{session_id}/whep"
    code, body, _ = await api.call("POST", path, raw=b"hello", headers=sdp_headers)
    assert_json_error(code, body, 400)
    code, body, _ = await api.call("POST", path, raw=b"v=0\r\nm=video x\r\n\xff", headers=sdp_headers)
    assert_json_error(code, body, 400)
    audio_only = sdp.replace("m=video", "m=audio").replace("H264/90000", "opus/48000/2")
    code, body, _ = await api.call("POST", path, raw=audio_only.encode(), headers=sdp_headers)
    assert_json_error(code, body, 406)
    vp8 = re.search(r"a=rtpmap:(\d+) VP8/90000", sdp).group(1)
    kept = [line for line in sdp.split("\r\n")
            if not re.match(r"a=(rtpmap|fmtp|rtcp-fb):(\d+)", line) or re.match(rf"a=[a-z-]+:{vp8} ", line)]
    vp8_only = "\r\n".join(re.sub(r"^(m=video \d+ \S+) .*$", rf"\1 {vp8}", line) for line in kept)
    code, body, _ = await api.call("POST", path, raw=vp8_only.encode(), headers=sdp_headers)
    assert_json_error(code, body, 406)
    assert "H.264" in body["error"]
    code, body, _ = await api.call("POST", path, raw=sdp.encode(), headers={"Content-Type": "text/plain"})
    assert_json_error(code, body, 415)
    code, body, response = await api.call("PATCH", f"{path}/whatever", raw=b"a=candidate:x",
                                          headers={"Content-Type": "application/trickle-ice-sdpfrag"})
    assert_json_error(code, body, 405)
    assert "DELETE" in response.headers["Allow"]
    assert (await session_json(api, session_id))["connections"] == 0


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_an_offer_with_only_mdns_candidates_and_end_of_candidates_connects(api, proxy, whep_clients):
    """Firefox hides its addresses behind mDNS names and ends its candidates (a=end-of-candidates):
    the server leaves the .local candidates out and waits for the browser's checks instead of
    failing ICE at once with no candidate left."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)

    def mask(sdp: str) -> str:
        assert "a=end-of-candidates" in sdp
        masked = re.sub(r"^(a=candidate:\S+ \d+ udp \d+) \S+ ", r"\1 4ec2a5c8-6f0b-4d7b-b1c8-3a6e7d2f9a10.local ",
                        sdp, flags=re.M)
        assert masked.count(".local ") == sdp.count("a=candidate:") > 0
        return masked

    assert await client.connect(edit=mask) == 201
    assert len(await client.frames(5)) == 5


@pytest.mark.gen_test(timeout=30)
async def test_offers_aiortc_parses_but_cannot_answer_are_a_400_not_a_500(api, whep_clients):
    """A video section without a direction attribute, or the same section (mid) twice: aiortc
    takes the offer, then fails making the answer; the client gets the JSON 400."""
    session_id = (await api.create_session())["sessionId"]
    sdp = await (await new_client(api, whep_clients, session_id)).offer()
    section = sdp[sdp.index("m=video"):]
    for offer in (sdp.replace("a=recvonly\r\n", ""), sdp + section):
        code, body, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=offer.encode(),
                                       headers={"Content-Type": "application/sdp"})
        assert_json_error(code, body, 400)
        assert "cannot be answered" in body["error"]
    assert (await session_json(api, session_id))["connections"] == 0


@pytest.mark.config({**SMALL_DEMO, "limits": {"max_connections": 4}})
@pytest.mark.gen_test(timeout=30)
async def test_peers_count_against_max_connections(api, proxy, whep_clients):
    """A peer holds UDP sockets but no TCP connection: without counting it, one client could open
    max_sessions x max_viewers_per_session peers past limits.max_connections (and the open-file
    limit it is sized to). Each takes a place; beyond, 503; a DELETE gives its place back."""
    session_id = (await api.create_session())["sessionId"]
    offer = (await (await new_client(api, whep_clients, session_id)).offer()).encode()
    codes, locations = [], []
    for _ in range(6):
        code, body, response = await api.call("POST", f"/stream/{session_id}/whep", raw=offer,
                                              headers={"Content-Type": "application/sdp"})
        codes.append(code)
        if code == 201:
            locations.append(response.headers["Location"])
        else:
            assert_json_error(code, body, 503)
            assert "max_connections" in body["error"]
    assert 1 <= len(locations) <= 4 and codes == [201] * len(locations) + [503] * (6 - len(locations)), codes
    assert len(proxy.whep.peers) == len(locations)
    code, _, _ = await api.call("DELETE", locations[0])
    assert code == 200
    code, _, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=offer,
                                headers={"Content-Type": "application/sdp"})
    assert code == 201


@pytest.mark.config({**SMALL_DEMO, "limits": {"max_connections": 3}})
@pytest.mark.gen_test(timeout=30)
async def test_offers_at_once_do_not_open_more_than_max_connections(api, proxy, whep_clients):
    """Five offers at once: each peer takes its place before the next offer is checked, so the
    peers never exceed limits.max_connections (the offers beyond get 503). Before, every offer
    passed the check on the same count while aiortc answered the others: 5 peers with
    max_connections 3 (found by review)."""
    session_id = (await api.create_session())["sessionId"]
    offer = (await (await new_client(api, whep_clients, session_id)).offer()).encode()
    peak, done = 0, False

    async def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, proxy.connections.open)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    results = await asyncio.gather(*(api.call("POST", f"/stream/{session_id}/whep", raw=offer,
                                              headers={"Content-Type": "application/sdp"}) for _ in range(5)))
    done = True
    await watcher
    codes = sorted(code for code, _, _ in results)
    assert peak <= 3, f"{peak} connections and peers open at once (max_connections 3); answers {codes}"
    assert 201 in codes and set(codes) <= {201, 503}, codes
    assert len(proxy.whep.peers) == codes.count(201)


@pytest.mark.config({**SMALL_DEMO, **VIEWER_AUTH})
@pytest.mark.gen_test(timeout=30)
async def test_viewer_tokens_are_enforced(api, whep_clients):
    created = await api.create_session()
    session_id, token = created["sessionId"], created["viewerToken"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 401
    other = (await api.create_session(user="someone-else"))["viewerToken"]
    client = await new_client(api, whep_clients, session_id, f"?token={other}")
    assert await client.connect() == 403
    client = await new_client(api, whep_clients, session_id, f"?token={token}")
    assert await client.connect() == 201
    await client.frames(3)


@pytest.mark.config({**SMALL_DEMO, "webrtc": {"ice_servers": [
    {"urls": "stun:stun.invalid:3478"},
    {"urls": ["turn:turn.invalid:3478?transport=udp"], "username": "user", "credential": "pass"}]}})
@pytest.mark.gen_test(timeout=30)
async def test_ice_servers_are_announced_in_link_headers(api, proxy):
    """The ICE servers are announced as the draft says (no ICE server is contacted: the offer is
    refused before a peer connection exists)."""
    session_id = (await api.create_session())["sessionId"]
    code, _, response = await api.call("POST", f"/stream/{session_id}/whep", raw=b"x",
                                       headers={"Content-Type": "application/sdp"})
    assert code == 400
    code, _, response = await api.call("OPTIONS", f"/stream/{session_id}/whep",
                                       headers={"Origin": "http://localhost:3000"})
    assert code == 204
    links = response.headers.get_list("Link")
    assert links == ['<stun:stun.invalid:3478>; rel="ice-server"',
                     '<turn:turn.invalid:3478?transport=udp>; rel="ice-server"; username="user"; '
                     'credential="pass"; credential-type="password"']
    assert "Location" in response.headers["Access-Control-Expose-Headers"]


@pytest.mark.config({**SMALL_DEMO, **VIEWER_AUTH, "webrtc": {"ice_servers": [
    {"urls": ["turn:turn.invalid:3478"], "username": "user", "credential": "turn-secret"}]}})
@pytest.mark.gen_test(timeout=30)
async def test_the_preflight_names_turn_credentials_only_to_a_viewer_of_the_session(api):
    """A preflight needs no credentials, so TURN credentials in it would be free for anyone who
    asks: they go only with the session's viewer token, as the POST's answer does."""
    created = await api.create_session()
    session_id, token = created["sessionId"], created["viewerToken"]
    other = (await api.create_session(user="someone-else"))["viewerToken"]
    origin = {"Origin": "http://localhost:3000"}
    for path in ("/stream/no-such-session/whep", f"/stream/no-such-session/whep?token={token}",
                 f"/stream/{session_id}/whep", f"/stream/{session_id}/whep?token={other}"):
        code, _, response = await api.call("OPTIONS", path, headers=origin)
        assert code == 204, path  # the preflight itself passes: the POST says what is wrong
        assert response.headers.get_list("Link") == [], path
        assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    code, _, response = await api.call("OPTIONS", f"/stream/{session_id}/whep?token={token}", headers=origin)
    assert code == 204
    assert response.headers.get_list("Link") == [
        '<turn:turn.invalid:3478>; rel="ice-server"; username="user"; credential="turn-secret"; '
        'credential-type="password"']


@pytest.mark.slow  # the stall timeout, then the hub's once-a-second tick
@pytest.mark.config({**SMALL_DEMO, "streaming": {"stall_timeout_seconds": 1.5}})
@pytest.mark.gen_test(timeout=30)
async def test_a_peer_gone_without_delete_is_dropped_after_the_stall_timeout(api, proxy, whep_clients):
    """The client's transport ends without a DELETE (no more RTCP from it): the proxy drops the
    peer after the stall timeout."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 201
    await client.frames(5)
    # Silence the client without telling the server: its ICE transport just stops.
    for transceiver in client.pc.getTransceivers():
        await transceiver.receiver.transport.transport.stop()
    gone = time.monotonic()
    await wait_until(lambda: not proxy.whep.peers, "the silent peer to be dropped", timeout=10)
    assert time.monotonic() - gone < 6
    assert (await session_json(api, session_id))["connections"] == 0


SILENT_PUSH = {"upstreams": {"silent": {"kind": "push", "token": "publisher-token"}}, "default_upstream": "silent",
               "streaming": {"stall_timeout_seconds": 1.5}}


@pytest.mark.slow  # the stall timeout, then the hub's once-a-second tick
@pytest.mark.config(SILENT_PUSH)
@pytest.mark.gen_test(timeout=30)
async def test_a_peer_that_never_connects_is_dropped_even_with_no_frames_flowing(api, proxy, whep_clients):
    """A client that posts an offer and goes away (no ICE checks ever arrive, no DELETE) holds a
    viewer's place only until the stall timeout, on an upstream with nothing to send as well;
    a peer that did connect stays while its upstream is silent."""
    session_id = (await api.create_session())["sessionId"]
    connected = await new_client(api, whep_clients, session_id)
    assert await connected.connect() == 201
    await wait_until(lambda: connected.pc.connectionState == "connected", "the first peer to connect")
    gone = await new_client(api, whep_clients, session_id)
    offer = "".join(line for line in (await gone.offer()).splitlines(keepends=True)
                    if not line.startswith(("a=candidate:", "a=end-of-candidates")))
    code, _, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=offer.encode(),
                                headers={"Content-Type": "application/sdp"})
    assert code == 201  # ... and the client never takes its answer
    assert (await session_json(api, session_id))["connections"] == 2
    posted = time.monotonic()
    await wait_until(lambda: len(proxy.whep.peers) == 1, "the peer that never connected to be dropped", timeout=10)
    assert time.monotonic() - posted < 4
    await asyncio.sleep(2)  # past the stall timeout again: the connected peer, with no frames, stays
    assert len(proxy.whep.peers) == 1 and connected.pc.connectionState == "connected"
    assert (await session_json(api, session_id))["connections"] == 1
    assert proxy.hubs["silent"].stats[WEBRTC].frames_sent == 0


@pytest.mark.slow  # the dashboard samples once a second
@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_a_peer_shows_on_the_dashboard_and_in_the_frame_age_metric(api, proxy, whep_clients):
    """A WebRTC peer is a viewer like any other for the operator: the dashboard's frames out and
    frame age of its session, and vsproxy_frame_age_seconds{transport="webrtc"}."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 201
    await client.frames(10)

    async def session_state() -> dict:
        _, state, _ = await api.call("GET", "/dashboard/api/state")
        return next(s for s in state["sessions"] if s["id"] == session_id)

    view = await poll(session_state, lambda s: s["fpsOut"] > 0 and s["frameAgeMs"]["p50"] is not None,
                      "the dashboard to sample the peer's frames")
    assert view["viewers"]["webrtc"] == 1 and view["bytesPerSecondOut"] > 0
    _, _, response = await api.call("GET", "/metrics")
    count = next(line for line in response.body.decode().splitlines()
                 if line.startswith('vsproxy_frame_age_seconds_count{transport="webrtc"}'))
    assert float(count.rsplit(" ", 1)[1]) >= 10


# -- the OpenAPI contract of the WHEP endpoints ---------------------------------------------------

WHEP = "/stream/{sessionId}/whep"
RESOURCE = "/stream/{sessionId}/whep/{resourceId}"
SDP = {"Content-Type": "application/sdp"}


@pytest.mark.config({**SMALL_DEMO, **VIEWER_AUTH, "limits": {"max_viewers_per_session": 1}})
@pytest.mark.gen_test(timeout=30)
async def test_whep_responses_conform_to_the_document(call, contract, api, proxy, whep_clients):  # noqa: F811
    """Every status the WHEP endpoints document, produced and checked against the document."""
    a = await api.create_session()
    b = await api.create_session(user="bob")
    sid, token = a["sessionId"], a["viewerToken"]
    client = await new_client(api, whep_clients, sid, f"?token={token}")
    offer = (await client.offer()).encode()
    path = f"/stream/{sid}/whep?token={token}"
    await call("POST", WHEP, f"/stream/{sid}/whep", raw=offer, headers=SDP, expect=401)
    await call("POST", WHEP, f"/stream/{sid}/whep?token={b['viewerToken']}", raw=offer, headers=SDP, expect=403)
    ended = f"stream_1700000000000_{'0' * 32}"  # with its token: only its holder learns that it is gone
    await call("POST", WHEP, f"/stream/{ended}/whep?token={proxy.access.viewer_tokens.issue(ended)}", raw=offer,
               headers=SDP, expect=404)
    await call("POST", WHEP, "/stream/%FF/whep", raw=offer, headers=SDP, expect=400)
    await call("POST", WHEP, path, raw=offer, headers={"Content-Type": "application/json"}, expect=415)
    big = b"v=0\r\n" + b"a=x\r\n" * (proxy.config.limits.max_body_bytes // 5)
    await call("POST", WHEP, path, raw=big, headers=SDP, expect=413)
    await call("POST", WHEP, path, raw=b"not sdp", headers=SDP, expect=400)
    await call("POST", WHEP, path, raw=offer.replace(b"m=video", b"m=audio"), headers=SDP, expect=406)
    await call("POST", WHEP, path, raw=offer, headers=SDP, expect=201)
    resource = call.last_headers["Location"]
    # The answer was for a peer this test did not keep: a second one is over the viewer limit.
    await call("POST", WHEP, path, raw=offer, headers=SDP, expect=503)
    await call("PATCH", RESOURCE, resource, raw=b"a=end-of-candidates",
               headers={"Content-Type": "application/trickle-ice-sdpfrag"}, expect=405)
    await call("PATCH", RESOURCE, "/stream/%FF/whep/x", raw=b"", expect=400)
    await call("PATCH", RESOURCE, resource, raw=big, expect=413)
    # A fresh viewer token for the peer: checked first, then the resource.
    await call("POST", RESOURCE, resource, expect=401)
    await call("POST", RESOURCE, f"{resource}?token={b['viewerToken']}", expect=403)
    await call("POST", RESOURCE, f"{resource}?token={token}", raw=b"x=1",
               headers={"Content-Type": "application/x-www-form-urlencoded"}, expect=415)
    await call("POST", RESOURCE, f"{resource}?token={token}", raw=big, expect=413)
    await call("POST", RESOURCE, "/stream/%FF/whep/x", expect=400)
    await call("POST", RESOURCE, f"{resource}?token={token}", expect=200)
    await call("POST", RESOURCE, f"/stream/{sid}/whep/nope?token={token}", expect=404)
    await call("DELETE", RESOURCE, resource, raw=big, expect=413)
    await call("DELETE", RESOURCE, "/stream/%FF/whep/x", expect=400)
    await call("DELETE", RESOURCE, resource, expect=200)
    await call("DELETE", RESOURCE, resource, expect=404)
    await call("DELETE", RESOURCE, f"/stream/{sid}/whep/nope", expect=404)
    await call("POST", RESOURCE, f"{resource}?token={token}", expect=404)  # ended: nothing to renew
    contract.assert_ok()


@pytest.mark.config({**SMALL_DEMO, **VIEWER_AUTH})
@pytest.mark.gen_test(timeout=30)
async def test_a_fresh_token_keeps_a_peer_past_its_old_expiry(api, proxy, whep_clients):
    """A peer ends when its viewer token expires, unless its client POSTs a fresh token of the
    session to its resource first (as a WebSocket viewer sends one in a message): the same peer
    then plays on until the new expiry. A refused token leaves the old expiry, and a peer that
    is not renewed ends at it."""
    created = await api.create_session()
    sid = created["sessionId"]
    other = (await api.create_session(user="someone-else"))["viewerToken"]
    issuer = proxy.access.viewer_tokens
    short = issuer.issue(sid, now=time.time() - issuer.ttl + 2)  # expires in 1-2 s
    renewed = await new_client(api, whep_clients, sid, f"?token={short}")
    left = await new_client(api, whep_clients, sid, f"?token={short}")
    assert await renewed.connect() == 201 and await left.connect() == 201
    await renewed.frames(3)
    peer = proxy.whep.get(renewed.location.rsplit("/", 1)[1])
    code, body, _ = await api.call("POST", f"{renewed.location}?token={other}")  # another session's token
    assert_json_error(code, body, 403)
    expired = issuer.issue(sid, now=time.time() - issuer.ttl - 5)
    code, body, _ = await api.call("POST", renewed.location, headers={"Authorization": f"Bearer {expired}"})
    assert_json_error(code, body, 403)
    assert "expired" in body["error"]
    fresh = issuer.issue(sid)
    code, body, _ = await api.call("POST", renewed.location, headers={"Authorization": f"Bearer {fresh}"})
    assert code == 200, body
    assert body == {"success": True, "expiresAt": iso_utc(float(fresh.split(".")[0]))}
    await asyncio.sleep(max(0.0, float(short.split(".")[0]) - time.time()) + 0.5)
    await wait_until(lambda: left.location.rsplit("/", 1)[1] not in proxy.whep.peers, "the other peer to expire")
    assert proxy.whep.peers == {peer.id: peer} and not peer.closed
    await renewed.frames(10)  # still playing, on the same connection


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_renewing_a_peer_without_viewer_tokens_is_409(call, contract, api, proxy, whep_clients):  # noqa: F811
    """Without viewer tokens a peer never expires: there is nothing to renew, said as for POST
    /session/{id}/token."""
    sid = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, sid)
    assert await client.connect() == 201
    await call("POST", RESOURCE, client.location, expect=409)
    assert len(proxy.whep.peers) == 1
    contract.assert_ok()


@pytest.mark.config({"webrtc": {"enabled": False}})
@pytest.mark.gen_test(timeout=30)
async def test_disabled_webrtc_is_501(call, contract, api, whep_clients):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    await call("POST", WHEP, f"/stream/{session_id}/whep", raw=(await client.offer()).encode(), headers=SDP,
               expect=501)
    contract.assert_ok()


# -- backpressure of one peer ---------------------------------------------------------------------


class Unit:
    """An access unit as a peer sees it."""

    def __init__(self, keyframe: bool, size: int = 1000) -> None:
        self.keyframe = keyframe
        self.data = b"\0" * size
        self.pts_us = int(time.time() * 1e6)
        self.arrived = time.monotonic()
        self.age_offset = 0.0  # captured when it arrived


def test_a_peer_behind_skips_to_the_next_keyframe_and_holds_at_most_one_gop():
    from vsproxy.outputs.viewer import TransportStats
    from vsproxy.outputs.webrtc import WhepPeer

    requests = []
    stats = TransportStats()
    peer = WhepPeer("r", "s", None, stats, on_close=lambda p, r: None,
                    request_keyframe=lambda: requests.append(1))
    peer.offer(Unit(False), b"")  # before its first keyframe: not its frame, not dropped
    assert peer.pending is None and peer.frames_dropped == 0
    peer.offer(Unit(True), b"")
    for _ in range(5):
        peer.offer(Unit(False), b"")
    assert len(peer._queue) == 6
    keyframe = Unit(True)
    peer.offer(keyframe, b"")  # the sender took none of them: skip ahead to this keyframe
    assert list(peer._queue) == [keyframe] and peer.frames_dropped == 6 == stats.frames_dropped
    # A GOP over the byte cap is dropped whole; the peer waits for (and asks for) the next keyframe.
    for _ in range(20):
        peer.offer(Unit(False, size=1 << 20), b"")
    assert peer.pending is None and peer.waiting_for_keyframe and requests == [1]
    peer.offer(Unit(False), b"")
    assert peer.pending is None
    # A sender keeping up (takes each unit as it comes) loses nothing at keyframes.
    loop = asyncio.new_event_loop()
    try:
        dropped = peer.frames_dropped
        for i in range(10):
            peer.offer(Unit(i % 5 == 0), b"")
            loop.run_until_complete(peer.next_access_unit())
        assert peer.frames_dropped == dropped and peer.frames_sent == 10
    finally:
        loop.close()


@pytest.mark.slow
@pytest.mark.config({**SMALL_DEMO, "h264": {"keyframe_interval_seconds": 20}})
@pytest.mark.gen_test(timeout=40)
async def test_a_peers_pli_gets_it_a_keyframe_from_the_shared_encoder(api, proxy, whep_clients):
    """A receiver that lost its picture sends PLI: the shared encoder makes a keyframe for it
    (at most one a second), long before its 20 s keyframe interval would."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 201
    joined = await client.frames(30)  # the join keyframe is more than a second old by now
    assert sum(f.key_frame for f in joined) <= 1, "a keyframe only at the start (interval: 20 s)"
    await asyncio.sleep(1.1)
    (peer,) = proxy.whep.peers.values()
    receiver = client.pc.getTransceivers()[0].receiver
    sender_ssrc = next(t.sender._ssrc for t in peer.pc.getTransceivers())
    await receiver._send_rtcp_pli(sender_ssrc)  # what a browser does when it cannot decode
    await wait_until(lambda: peer.keyframe_requests >= 1, "the PLI at the proxy")
    started = time.monotonic()
    while not (frame := await asyncio.wait_for(client.track.recv(), 5)).key_frame:
        assert time.monotonic() - started < 3, "no keyframe within 3 s of the PLI (interval: 20 s)"
    assert frame.key_frame


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_an_offer_without_candidates_connects(api, proxy, whep_clients):
    """The embed player sends its offer before gathering (no STUN/TURN: its candidates would be
    mDNS names, left out anyway): the client's checks reach the server's candidates, which learns
    the client's address from them."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)

    def bare(sdp: str) -> str:
        assert "a=candidate:" in sdp
        return "".join(line for line in sdp.splitlines(keepends=True)
                       if not line.startswith(("a=candidate:", "a=end-of-candidates")))

    assert await client.connect(edit=bare) == 201
    assert len(await client.frames(5)) == 5


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_an_offer_whose_candidates_cannot_be_reached_is_refused_not_answered(api, proxy, whep_clients):
    """An offer that ends its candidates (a=end-of-candidates) with none vsproxy can reach (TCP
    candidates, none at all) would get a 201 and a peer that fails at once: the client learned
    it only from ICE. It is a JSON 400 that says why, and takes no place."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    sdp = await client.offer()
    assert "a=end-of-candidates" in sdp
    tcp_only = re.sub(r"^(a=candidate:\S+ \d+) udp (.*typ host)", r"\1 tcp \2 tcptype passive", sdp, flags=re.M)
    assert tcp_only.count(" tcp ") == sdp.count("a=candidate:") > 0
    no_candidates = "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith("a=candidate:"))
    for offer in (tcp_only, no_candidates):
        code, body, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=offer.encode(),
                                       headers={"Content-Type": "application/sdp"})
        assert_json_error(code, body, 400)
        assert "candidate" in body["error"] and "UDP" in body["error"]
    assert not proxy.whep.peers and proxy.connections.open == 0
    assert (await session_json(api, session_id))["connections"] == 0
    # An offer with its UDP candidates is answered and plays.
    playing = await new_client(api, whep_clients, session_id)
    assert await playing.connect() == 201
    assert len(await playing.frames(3)) == 3


def flooded_offer(sdp: str, flood: str) -> tuple[str, str]:
    """(`sdp` with too many of `flood`, the part of the error that says so)."""
    from vsproxy.outputs.webrtc import MAX_OFFER_CANDIDATES, MAX_OFFER_MEDIA_SECTIONS

    if flood == "candidates":
        extra = "".join(f"a=candidate:x{i} 1 udp 2130706431 127.0.1.{i} {40000 + i} typ host\r\n"
                        for i in range(MAX_OFFER_CANDIDATES + 1))
        flooded = re.sub(r"^(a=candidate:.*\r\n)", lambda m: m.group(1) + extra, sdp, count=1, flags=re.M)
        assert flooded.count("a=candidate:") > MAX_OFFER_CANDIDATES + 1
        return flooded, f"more than {MAX_OFFER_CANDIDATES} ICE candidates"
    start = sdp.index("m=video")
    end = sdp.find("\r\nm=", start)
    section = sdp[start:] if end == -1 else sdp[start:end + 2]
    copies = "".join(re.sub(r"^a=mid:.*$", f"a=mid:extra{i}", section, flags=re.M)
                     for i in range(MAX_OFFER_MEDIA_SECTIONS))
    flooded = sdp + copies if end == -1 else sdp[:end + 2] + copies + sdp[end + 2:]
    assert flooded.count("\r\nm=") > MAX_OFFER_MEDIA_SECTIONS
    return flooded, f"at most {MAX_OFFER_MEDIA_SECTIONS}"


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("flood", ["candidates", "media sections"])
async def test_an_offer_with_too_many_candidates_or_media_sections_is_refused(api, proxy, whep_clients, flood):
    """vsproxy's ICE agent checks every candidate it can reach: an offer listing many would have
    it send STUN packets wherever a client says. aiortc builds a transceiver per media section on
    the event loop: an offer (under the body limit) of hundreds of sections froze every viewer for
    a second and held 70 MB per peer (found by review). Over MAX_OFFER_CANDIDATES or
    MAX_OFFER_MEDIA_SECTIONS is a JSON 400, before aiortc sees it."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    flooded, error = flooded_offer(await client.offer(), flood)
    code, body, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=flooded.encode(),
                                   headers={"Content-Type": "application/sdp"})
    assert_json_error(code, body, 400)
    assert error in body["error"]
    assert not proxy.whep.peers and proxy.connections.open == 0
    playing = await new_client(api, whep_clients, session_id)
    assert await playing.connect() == 201  # a client's own few candidates and sections are fine


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
async def test_a_delete_just_after_the_connection_closed_is_a_200(api, proxy, whep_clients):
    """A page that unloads closes its connection and sends its DELETE at once, in either order:
    a DELETE finding its peer already ended is a 200 (DELETE is idempotent), not a 404 warning
    in the operator's log. Another session's path for it stays a 404."""
    session_id = (await api.create_session())["sessionId"]
    other_id = (await api.create_session(user="someone-else"))["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    assert await client.connect() == 201
    await client.frames(3)
    await client.close()
    await wait_until(lambda: not proxy.whep.peers, "the peer to end with its connection")
    resource = client.location.rsplit("/", 1)[1]
    code, _, _ = await api.call("DELETE", f"/stream/{other_id}/whep/{resource}")
    assert code == 404
    code, _, _ = await api.call("DELETE", client.location)
    assert code == 200
    code, _, _ = await api.call("DELETE", client.location)  # a second DELETE: nothing left
    assert code == 404
    code, _, _ = await api.call("DELETE", f"/stream/{session_id}/whep/never-made")
    assert code == 404


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("separator", ["\t", "\xa0", " \t "])
async def test_mdns_candidates_are_left_out_however_their_fields_are_separated(api, whep_clients, separator):
    """aiortc splits a candidate's fields at any whitespace, and aioice resolves every `.local`
    name it is handed over multicast, for a second each: an offer whose mDNS names were followed
    by a tab instead of a space kept them all (the check looked for ".local "), and the candidate
    limit counts only addresses, so one 64 KB offer had the server send 650 mDNS queries and its
    answer wait for them (found by review). Whatever separates the fields, what aiortc reads of
    the offer vsproxy hands it holds no mDNS candidate, and none is counted as one left out of an
    offer that had none."""
    from aiortc.sdp import SessionDescription

    from vsproxy.outputs.webrtc import MAX_OFFER_CANDIDATES, without_mdns_candidates

    sdp = await (await new_client(api, whep_clients, "stream_123_any")).offer()
    names = "".join(f"a=candidate:m{i} 1 udp 2130706431 {i:08x}-6f0b-4d7b-b1c8-3a6e7d2f9a10.local{separator}"
                    f"{40000 + i} typ host\r\n" for i in range(MAX_OFFER_CANDIDATES * 4))
    flooded = re.sub(r"^(a=candidate:.*\r\n)", lambda m: m.group(1) + names, sdp, count=1, flags=re.M)
    parsed = SessionDescription.parse(flooded)
    assert sum(c.ip.endswith(".local") for m in parsed.media for c in m.ice_candidates) == MAX_OFFER_CANDIDATES * 4
    kept = SessionDescription.parse(without_mdns_candidates(flooded))
    assert not [c.ip for m in kept.media for c in m.ice_candidates if c.ip.endswith(".local")]
    assert [c.ip for m in kept.media for c in m.ice_candidates] == [c.ip for m in SessionDescription.parse(sdp).media
                                                                       for c in m.ice_candidates]
    assert without_mdns_candidates(sdp) == sdp  # nothing to leave out: a=end-of-candidates stays


@pytest.mark.config(SMALL_DEMO)
@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("port", ["99999", "-1"])
async def test_an_offer_with_a_candidate_port_no_socket_takes_is_a_400(api, proxy, whep_clients, port):
    """aiortc reads a candidate's port as any integer, and aioice sent its first connectivity
    check there: the socket refused the port (OverflowError), asyncio logged a fatal error with its
    traceback and closed the peer's socket, and the STUN retry logged another (found by review),
    after the offer had its 201. It is a JSON 400, before any peer is made."""
    session_id = (await api.create_session())["sessionId"]
    client = await new_client(api, whep_clients, session_id)
    sdp = await client.offer()
    bad = re.sub(r"^(a=candidate:\S+ \d+ udp \d+ \S+) \d+ ", rf"\1 {port} ", sdp, count=1, flags=re.M)
    assert bad != sdp
    code, body, _ = await api.call("POST", f"/stream/{session_id}/whep", raw=bad.encode(),
                                   headers={"Content-Type": "application/sdp"})
    assert_json_error(code, body, 400)
    assert "port" in body["error"]
    assert not proxy.whep.peers and proxy.connections.open == 0
    assert await client.connect() == 201  # its own offer, as it made it
    assert len(await client.frames(3)) == 3
