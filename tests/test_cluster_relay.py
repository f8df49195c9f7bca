"""The origin-to-edge relay sends what each edge wants: JPEG only while the edge wants JPEG (so an
RTSP origin decodes nothing while only H.264 is watched anywhere, passed through byte for byte),
H.264 only while it has H.264 viewers; an edge's keyframe requests reach the origin's encoder;
a snapshot or thumbnail on a node with no viewers answers with a current frame. Real redis-server,
nodes as `python -m vsproxy` subprocesses (tests/test_cluster.py's `Node`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import threading
import time
from collections.abc import Container
from typing import Any

import av
import pytest
import tornado.websocket
from cluster_fixtures import redis_server  # noqa: F401 - the fixture
from helpers import (
    PublisherStub,
    WhepClient,
    assert_json_error,
    free_port,
    poll,
    raw_request,
    small_buffer_ws,
    wait_until,
)
from test_cluster import TOKEN as CLUSTER_TOKEN
from test_cluster import Node, real_frame, started, stop_all
from test_h264 import parse_message
from test_h264_rtsp import read_directly
from test_openapi import Contract
from test_rtsp_capture_time import SENDER_REPORT_WAIT, age_buckets
from test_rtsp_source import STREAM_SIZE, rtsp_server  # noqa: F401 - the fixture
from tornado.httpclient import HTTPClientError, HTTPRequest

from vsproxy import render
from vsproxy.cluster import Cluster, ClusterSource
from vsproxy.codec.h264 import NAL_PPS, NAL_SPS, nal_type, split_nals
from vsproxy.config import config_from_dict
from vsproxy.hub import Demand, FrameHub
from vsproxy.simulate import SimulatedIsaacSim
from vsproxy.sources import create_source

pytestmark = [pytest.mark.external, pytest.mark.slow]  # redis-server, vsproxy subprocesses, RTSP server

ISAAC = (("upstream", "isaac"),)


@pytest.fixture
def make_nodes(tmp_path, redis_server, io_loop):  # noqa: F811 - the fixture imported above
    """A factory of started nodes (`make(count, sim_port, extra)`), all stopped at the end."""
    nodes: list[Node] = []

    def make(count: int, sim_port: int, extra: dict | None = None) -> list[Node]:
        for _ in range(count):
            node = Node(tmp_path, f"node{len(nodes) + 1}", redis_server.url, sim_port, extra)
            node.start()
            nodes.append(node)
        return nodes[-count:]

    yield make
    stop_all(nodes)


def simulator(io_loop, fps: float) -> SimulatedIsaacSim:
    sim = SimulatedIsaacSim(width=320, height=240, fps=fps, keep_frames=600)
    sim.port = free_port()
    sim.listen(sim.port)
    return sim


@pytest.fixture
def slow_sim(io_loop):
    """A simulated Isaac Sim sending one frame every 4 s: whatever a viewer gets sooner after
    joining was not sent for it by the simulator."""
    sim = simulator(io_loop, 0.25)
    yield sim
    io_loop.run_sync(sim.stop)


@pytest.fixture
def sim30(io_loop):
    sim = simulator(io_loop, 30)
    yield sim
    io_loop.run_sync(sim.stop)


async def upstream(node: Node, name: str) -> dict:
    code, body, _ = await node.api.call("GET", "/upstreams")
    assert code == 200, body
    (status,) = [u for u in body["upstreams"] if u["name"] == name]
    return status


async def h264_viewer(node: Node, session_id: str) -> tornado.websocket.WebSocketClientConnection:
    conn = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{node.port}/stream/{session_id}?format=h264")
    node.viewers.append(conn)
    return conn


async def next_unit(conn: tornado.websocket.WebSocketClientConnection, timeout: float) -> tuple[bool, bytes]:
    """The next access unit of a `format=h264` viewer: (keyframe, Annex-B unit)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"H.264 viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, bytes):
            keyframe, _, unit = parse_message(message)
            return keyframe, unit


async def create_session(node: Node, upstream_name: str | None = None) -> str:
    body = {"userId": "u", "robotName": "r", **({"upstream": upstream_name} if upstream_name else {})}
    code, created, _ = await node.api.call("POST", "/session/create", body)
    assert code == 200, created
    return created["sessionId"]


@pytest.mark.gen_test(timeout=90)
async def test_an_h264_only_edge_gets_no_jpeg_and_a_new_jpeg_viewer_the_origins_frame_at_once(make_nodes, slow_sim):
    origin, edge = await started(make_nodes(2, slow_sim.port))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), slow_sim, 15)  # node1 takes the upstream: the origin
    h264 = await h264_viewer(edge, sid)
    keyframe, _ = await next_unit(h264, 15)
    assert keyframe
    await next_unit(h264, 15)  # a frame later (4 s)
    assert (await edge.upstream())["source"]["role"] == "edge"
    # Nothing here wants JPEG: none came over the relay, and the origin counts no relay viewer of JPEG.
    assert (await edge.upstream())["framesIn"] == 0
    assert (await origin.upstream())["viewers"]["ws_binary"] == 1  # its own viewer only

    # A JPEG viewer joins the edge just after the simulator's frame: it gets that frame (the
    # origin's current one) at once, not 4 s later with the simulator's next.
    sent = slow_sim.frames_sent
    await wait_until(lambda: slow_sim.frames_sent > sent, "the simulator's next frame", timeout=10)
    await asyncio.sleep(0.2)  # at the origin by now
    sent = slow_sim.frames_sent
    started_at = time.monotonic()
    jpeg_on_edge = await edge.viewer(sid)
    frame = await real_frame(jpeg_on_edge, slow_sim, 3)
    assert time.monotonic() - started_at < 2
    assert slow_sim.frames_sent == sent and frame == slow_sim.frames[-1]
    status = await origin.upstream()
    assert status["source"]["edgesWant"] == {"jpeg": 1, "h264": 1}  # the edge's relay wants JPEG now
    assert status["viewers"]["ws_binary"] == 1 and status["sessions"] == 1  # ...and counts as no viewer
    metrics = await origin.metrics()
    viewers = metrics["vsproxy_viewers"]
    assert viewers[(("transport", "ws_binary"),)] == 1 and viewers[(("transport", "ws_h264"),)] == 0

    jpeg_on_edge.close()  # the edge wants H.264 only again: the origin stops sending it JPEG
    deadline = time.monotonic() + 5
    while (await origin.upstream())["source"]["edgesWant"]["jpeg"]:
        assert time.monotonic() < deadline, "the edge's relay still wants JPEG"
        await asyncio.sleep(0.1)
    frames_in = (await edge.upstream())["framesIn"]
    await next_unit(h264, 15)
    await next_unit(h264, 15)
    assert (await edge.upstream())["framesIn"] == frames_in
    assert (await edge.upstream())["state"] == "connected"
    assert len(slow_sim.clients) == 1 and slow_sim.peak_clients == 1


@pytest.mark.gen_test(timeout=90)
async def test_edge_keyframe_requests_reach_the_origins_encoder(make_nodes, sim30, io_loop):
    """A WebRTC peer joining the edge, and its PLI, get keyframes from the origin's encoder long
    before its 20 s keyframe interval would (seen by an H.264 WebSocket viewer of the edge)."""
    origin, edge = await started(make_nodes(2, sim30.port, {"h264": {"keyframe_interval_seconds": 20}}))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), sim30, 15)
    h264 = await h264_viewer(edge, sid)
    assert (await next_unit(h264, 15))[0], "a viewer starts at a keyframe"
    keyframes: list[float] = []

    async def watch() -> None:
        while True:
            keyframe, _ = await next_unit(h264, 30)
            if keyframe:
                keyframes.append(time.monotonic())

    watcher = asyncio.ensure_future(watch())
    client = WhepClient(edge.api, f"/stream/{sid}/whep")
    try:
        await asyncio.sleep(1.5)
        assert not keyframes, "a keyframe without a request (interval: 20 s)"
        joined = time.monotonic()
        assert await client.connect() == 201
        await wait_until(lambda: keyframes, "a keyframe for the peer that joined the edge", timeout=5)
        assert keyframes[0] - joined < 4
        frames = await client.frames(10, timeout=10)
        assert frames[0].key_frame and (frames[0].width, frames[0].height) == (320, 240)

        await asyncio.sleep(1.2)  # the origin makes at most one requested keyframe a second
        count = len(keyframes)
        receiver = client.pc.getTransceivers()[0].receiver
        (ssrc,) = {s.source for s in receiver.getSynchronizationSources()}
        await receiver._send_rtcp_pli(ssrc)  # what a browser sends when it cannot decode
        await wait_until(lambda: len(keyframes) > count, "a keyframe for the edge peer's PLI", timeout=5)
    finally:
        watcher.cancel()
        await client.close()
    assert (await edge.upstream())["encoder"] is False and (await origin.upstream())["encoder"] is True


@pytest.mark.parametrize("rtsp_server", [{"shared": True}], indirect=True)
@pytest.mark.gen_test(timeout=150)
async def test_rtsp_passthrough_over_the_relay_byte_for_byte_without_decoding(make_nodes, rtsp_server):  # noqa: F811
    """An edge's H.264 viewer gets the RTSP server's own NAL units (a second client of the same
    shared stream sees the same bytes); while only H.264 viewers watch, anywhere, the origin
    decodes nothing; a JPEG viewer on the edge gets JPEG within seconds, and decoding stops again
    when it leaves."""
    extra = {"upstreams": {"cam": {"kind": "rtsp", "url": rtsp_server.url}},
             "reconnect": {"connect_timeout_seconds": 5, "frame_timeout_seconds": 5}}
    origin, edge = await started(make_nodes(2, free_port(), extra))
    direct: list[bytes] = []
    ready = threading.Event()
    reader = threading.Thread(target=read_directly, args=(rtsp_server.url, 400, direct, ready), daemon=True)
    reader.start()
    await wait_until(ready.is_set, "the direct client to connect", timeout=30)
    sid = await create_session(origin, "cam")
    await next_unit(await h264_viewer(origin, sid), 30)  # node1 takes the upstream: the origin
    on_edge = await h264_viewer(edge, sid)
    units = [unit for _, unit in [await next_unit(on_edge, 30) for _ in range(60)]]
    await wait_until(lambda: len(direct) >= 400 or not reader.is_alive(), "the direct client's NAL units", 60)
    assert (await upstream(edge, "cam"))["source"]["role"] == "edge"

    received = [n for u in units for n in split_nals(u) if nal_type(n) not in (NAL_SPS, NAL_PPS)]
    server_side = {n for n in direct if nal_type(n) not in (NAL_SPS, NAL_PPS)}
    common = [n for n in received if n in server_side]
    assert len(common) >= 30, f"only {len(common)} of {len(received)} NAL units match the server's"
    source = (await upstream(origin, "cam"))["source"]
    assert source["role"] == "origin" and source["decoded"] == 0, source
    assert source["passedThrough"] >= 60
    assert (await upstream(origin, "cam"))["encoder"] is False
    assert (await upstream(edge, "cam"))["encoder"] is False

    jpeg = await edge.viewer(sid)
    started_at = time.monotonic()
    while True:  # the origin decodes from the next keyframe (one a second)
        message = await asyncio.wait_for(jpeg.read_message(), 10)
        assert message is not None
        if isinstance(message, bytes) and message[:2] == b"\xff\xd8" and len(message) > 2000:
            break
    assert time.monotonic() - started_at < 5
    assert (await upstream(origin, "cam"))["source"]["decoded"] > 0
    jpeg.close()
    deadline = time.monotonic() + 5
    while (await upstream(origin, "cam"))["source"]["edgesWant"]["jpeg"]:
        assert time.monotonic() < deadline, "the edge still wants JPEG"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    decoded = (await upstream(origin, "cam"))["source"]["decoded"]
    for _ in range(30):  # a second of video later
        await next_unit(on_edge, 10)
    assert (await upstream(origin, "cam"))["source"]["decoded"] == decoded, "decoding stopped"


@pytest.mark.parametrize("rtsp_server", [{"clock": "-5s"}], indirect=True)
@pytest.mark.gen_test(timeout=150)
async def test_an_edges_jpeg_frames_keep_the_capture_time_of_the_origin(make_nodes, rtsp_server):  # noqa: F811
    """An RTSP server whose clock is 5 s behind ours: its sender reports time each frame 5 s before
    it arrives, and frame age counts from that capture on the origin. The JPEG frames it relays
    keep that time, so frame age on an edge counts from the capture too (5 s), not from their
    arrival at the edge (milliseconds)."""
    extra = {"upstreams": {"cam": {"kind": "rtsp", "url": rtsp_server.url}},
             "reconnect": {"connect_timeout_seconds": 5, "frame_timeout_seconds": 5}}
    origin, edge = await started(make_nodes(2, free_port(), extra))
    sid = await create_session(origin, "cam")
    await next_unit(await h264_viewer(origin, sid), 30)  # node1 takes the upstream: the origin
    deadline = time.monotonic() + SENDER_REPORT_WAIT
    while (source := (await upstream(origin, "cam"))["source"]).get("captureTime") != "rtcp":
        assert time.monotonic() < deadline, f"no sender report in {SENDER_REPORT_WAIT:g} s: {source}"
        await asyncio.sleep(0.5)
    assert 4.5 < source["captureOffsetSeconds"] < 6, source
    # Switching from arrival to the server's times steps back 5 s, which the source spreads over
    # the next 5 s of frames (times strictly increase); after that each one is 5 s old.
    await asyncio.sleep(7)

    jpeg = await edge.viewer(sid)
    frames = 0
    while frames < 30:
        message = await asyncio.wait_for(jpeg.read_message(), 10)
        assert message is not None, f"edge viewer closed: {jpeg.close_code} {jpeg.close_reason}"
        frames += isinstance(message, bytes) and message[:2] == b"\xff\xd8" and len(message) > 2000
    assert (await upstream(edge, "cam"))["source"]["role"] == "edge"
    ages = await age_buckets(edge.api, "ws_binary")
    assert ages["+Inf"] >= 25, ages  # (the first picture may be the edge's own "connecting" one)
    assert ages["2.5"] == 0, ages  # each one 5 s old


@pytest.mark.gen_test(timeout=90)
async def test_snapshot_and_thumbnail_on_a_node_without_viewers(make_nodes, sim30):
    origin, edge = await started(make_nodes(2, sim30.port))
    sid = await create_session(origin)
    viewer = await origin.viewer(sid)
    await real_frame(viewer, sim30, 15)

    # The edge has no viewer (and no frame) of the upstream: it relays one from the origin.
    code, _, response = await edge.api.call("GET", f"/stream/{sid}/snapshot.jpg")
    assert code == 200 and response.headers["Content-Type"] == "image/jpeg"
    assert response.body in sim30.frames
    assert (await edge.upstream())["source"]["role"] == "edge"
    assert len(sim30.clients) == 1 and sim30.peak_clients == 1

    # The relay lingers out (1 s); a dashboard's thumbnail on the edge relays a current picture.
    deadline = time.monotonic() + 10
    while (await edge.upstream())["state"] != "idle":
        assert time.monotonic() < deadline, "the edge still relays"
        await asyncio.sleep(0.1)
    relayed = (await edge.metrics())["vsproxy_cluster_relay_frames_received"][ISAAC]
    code, _, response = await edge.api.call("GET", "/dashboard/api/thumbnail/isaac.jpg")
    assert code == 200 and response.body[:2] == b"\xff\xd8"
    assert (await edge.metrics())["vsproxy_cluster_relay_frames_received"][ISAAC] > relayed

    # No viewer anywhere: a thumbnail starts nothing; a snapshot runs the upstream, as a viewer would.
    viewer.close()
    origin.viewers.remove(viewer)
    await wait_until(lambda: not sim30.clients, "the upstream to close", timeout=15)
    code, _, _ = await edge.api.call("GET", "/dashboard/api/thumbnail/isaac.jpg")
    await asyncio.sleep(0.5)
    assert not sim30.clients and sim30.peak_clients == 1
    code, _, response = await origin.api.call("GET", f"/stream/{sid}/snapshot.jpg")
    assert code == 200 and response.body in sim30.frames


@pytest.mark.gen_test(timeout=60)
async def test_a_snapshot_with_the_upstream_down_is_a_503_json_error(make_nodes):
    dead = free_port()
    (node,) = await started(make_nodes(1, dead))
    sid = await create_session(node)
    started_at = time.monotonic()
    code, body, _ = await node.api.call("GET", f"/stream/{sid}/snapshot.jpg")
    assert_json_error(code, body, 503)
    assert time.monotonic() - started_at < 8


@pytest.mark.gen_test(timeout=60)
async def test_a_lingering_edge_that_wants_nothing_keeps_its_quiet_relay(make_nodes, sim30):
    """The edge's last viewer leaves: the origin sends it nothing while it lingers, and that is
    no lost upstream (no frame timeout); a viewer coming back gets frames over the same relay."""
    extra = {"streaming": {"linger_seconds": 20}, "reconnect": {"frame_timeout_seconds": 1}}
    origin, edge = await started(make_nodes(2, sim30.port, extra))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), sim30, 15)
    viewer = await edge.viewer(sid)
    await real_frame(viewer, sim30, 15)
    viewer.close()
    edge.viewers.remove(viewer)
    await asyncio.sleep(1)
    relayed = (await edge.metrics())["vsproxy_cluster_relay_received_bytes"][ISAAC]
    await asyncio.sleep(3)  # three frame timeouts
    status = await edge.upstream()
    assert status["state"] == "connected" and status["failures"] == 0, status
    assert (await edge.metrics())["vsproxy_cluster_relay_received_bytes"][ISAAC] == relayed
    assert "no frame from origin" not in edge.log()
    await real_frame(await edge.viewer(sid), sim30, 5)
    assert (await edge.upstream())["connects"] == 1


@pytest.mark.gen_test(timeout=90)
async def test_an_edge_mp4_viewer_plays_on_when_the_edge_becomes_the_origin(make_nodes, sim30):
    """The origin dies; the edge takes the upstream and runs its own encoder, with the same
    parameters: its stream.mp4 viewer carries on in the same file, so the decode times go on
    forward (they went back to 0: a player drops every frame as hours late, or stalls)."""
    origin, edge = await started(make_nodes(2, sim30.port))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), sim30, 15)
    head, mp4 = await raw_request(edge.port, f"/stream/{sid}/stream.mp4")
    assert head.status == 200
    data = bytearray(head.body)

    async def read_fragments(count: int) -> None:
        target = data.count(b"moof") + count
        deadline = time.monotonic() + 20
        while data.count(b"moof") < target:
            assert time.monotonic() < deadline, "no fragments"
            data.extend(await asyncio.wait_for(mp4.read_bytes(65536, partial=True), 20))

    await read_fragments(30)
    assert (await edge.upstream())["source"]["role"] == "edge"
    origin.kill()
    await read_fragments(30)  # from the edge's own encoder, after the failover
    mp4.close()
    assert (await edge.upstream())["source"]["role"] == "origin"

    with av.open(io.BytesIO(bytes(data)), format="mp4") as container:
        video = container.streams.video[0]
        packets = [p for p in container.demux(video) if p.size]
        decode_times = [p.dts for p in packets]
        assert decode_times == sorted(decode_times), "decode times must only go forward"
        assert packets[0].is_keyframe
        decoded = [f for p in packets for f in video.codec_context.decode(p)]
    assert len(decoded) >= len(packets) - 2


@pytest.mark.gen_test(timeout=120)
async def test_upstream_text_an_edge_does_not_read_is_not_held_without_bound(make_nodes, slow_sim):
    """Isaac Sim's telemetry (any text from the upstream) goes to every edge's relay connection
    as to every viewer: an edge that stops reading (hung, or on a link slower than the text) gets
    what is beyond about 1 MiB unread dropped, not buffered on the origin without bound; the
    origin's own viewer that reads gets the text. Before, the origin held all 30 MB for it."""
    (origin,) = await started(make_nodes(1, slow_sim.port))
    sid = await create_session(origin)
    reader = await origin.viewer(sid)
    await real_frame(reader, slow_sim, 15)  # the node takes the upstream: the origin
    loop = asyncio.get_running_loop()
    stalled = await small_buffer_ws(origin.port, "/internal/relay/isaac", rcvbuf=4096,
                                    headers={"Authorization": f"Bearer {CLUSTER_TOKEN}", "X-Vsproxy-Node": "hung"})
    try:
        telemetry = json.dumps({"type": "telemetry", "pad": "x" * 60_000})

        async def texts_read(count: int) -> None:
            while count:
                message = await asyncio.wait_for(reader.read_message(), 30)
                assert message is not None, "the reading viewer was closed"
                count -= isinstance(message, str)

        for _ in range(50):  # 30 MB, in batches the viewer that reads takes at once
            for _ in range(10):
                slow_sim.broadcast_text(telemetry)
            await texts_read(10)
        received = 0
        while True:  # what the origin held for the edge that read nothing reaches it now
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(stalled, 1 << 16), 2)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            received += len(chunk)
        assert received < 10 << 20, f"the origin held {received} bytes for an edge that read nothing"
        assert received > 60_000  # it got text until it stopped reading
    finally:
        stalled.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_relay_handshake_without_sec_websocket_key_gets_the_json_400(make_nodes, slow_sim):
    """The relay endpoint answers a handshake Tornado would refuse in plain text ("Missing/Invalid
    WebSocket headers") as every other socket does: JSON, saying what is missing."""
    (origin,) = await started(make_nodes(1, slow_sim.port))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), slow_sim, 15)  # the node takes the upstream: the origin
    headers = {"Authorization": f"Bearer {CLUSTER_TOKEN}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Version": "13"}
    response, stream = await raw_request(origin.port, "/internal/relay/isaac", headers=headers)
    stream.close()
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.body
    body = json.loads(response.body)
    assert_json_error(response.status, body, 400)
    assert "Sec-WebSocket-Key" in body["error"], body
    code, body, response = await origin.api.call("POST", "/internal/relay/isaac", raw=b"x")  # not even GET
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.body
    assert_json_error(code, body, 405)


@pytest.mark.gen_test(timeout=60)
async def test_an_upstream_that_refuses_is_reported_as_such_not_as_redis(make_nodes):
    """The origin's upstream refusing its connection is the upstream's error in /upstreams, and
    Redis, which answers, stays "connected" in /health. Before, the origin's run was inside the
    handler of Redis errors (OSError among them): the node logged and showed "Redis unreachable:
    cannot find the origin of this upstream" and marked Redis down (found by review)."""
    (node,) = await started(make_nodes(1, free_port()))  # nothing listens there
    sid = await create_session(node)
    conn = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{node.port}/stream/{sid}?format=binary")
    node.viewers.append(conn)
    status = await poll(lambda: upstream(node, "isaac"), lambda s: s["lastError"] is not None,
                        "the upstream's first failure")
    assert "Redis" not in status["lastError"] and "refused" in status["lastError"].lower(), status["lastError"]
    health = (await node.api.call("GET", "/health"))[1]
    assert health["cluster"]["redis"] == "connected" and "problem" not in health["cluster"], health


@pytest.mark.gen_test(timeout=60)
async def test_a_request_that_is_no_publisher_handshake_takes_no_lease(make_nodes, redis_server):  # noqa: F811
    """A GET of /ingest/{name} with the publish token that is no WebSocket handshake (a probe, a
    curl), or one from an Origin that may not open WebSockets, is refused and takes nothing: the
    publisher that comes next, to another node, is accepted. Before, the node took the upstream's
    lease first, and for a second the real publisher got a 409 naming a node where no publisher
    was (found by review)."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    a, b = await started(make_nodes(2, free_port(), extra))
    auth = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
    code, body, _ = await a.api.call("GET", "/ingest/pub", headers=auth)
    assert_json_error(code, body, 400)
    with pytest.raises(HTTPClientError) as info:
        await tornado.websocket.websocket_connect(HTTPRequest(
            f"ws://127.0.0.1:{a.port}/ingest/pub", headers={**auth, "Origin": "http://elsewhere.example"}))
    assert info.value.code == 403
    pub = await publisher(b)  # at once: no lease of node1's to wait out
    pub.close()


PUBLISH_TOKEN = "publish-token-0123"


async def publisher(node: Node, name: str = "pub") -> tornado.websocket.WebSocketClientConnection:
    return await tornado.websocket.websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{node.port}/ingest/{name}", headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"}))


async def refused_publisher(node: Node) -> tuple[int, dict, Any]:
    """The status, JSON body and response of a refused publisher handshake."""
    with pytest.raises(HTTPClientError) as info:
        await publisher(node)
    assert info.value.response is not None
    return info.value.code, json.loads(info.value.response.body), info.value.response


async def role_is(node: Node, role: str) -> None:
    """Wait until the node's source of the push upstream has `role` (frames flow a moment before
    a node that was looking for the origin has said it is one)."""
    await poll(lambda: upstream(node, "pub"), lambda status: status["source"]["role"] == role,
               f"{node.name} to be the push upstream's {role}", timeout=5)


async def post_frame(node: Node, frame: bytes, token: str = PUBLISH_TOKEN, headers: dict | None = None,
                     path: str = "/ingest/pub/frame") -> tuple[int, Any, Any]:
    return await node.api.call("POST", path, raw=frame, headers={
        "Content-Type": "image/jpeg", "Authorization": f"Bearer {token}", **(headers or {})})


def forwarded_to(metrics: dict) -> dict[str, float]:
    """The frames other nodes forwarded to a node, by the status it answered them with."""
    out: dict[str, float] = {}
    for labels, value in metrics.get("vsproxy_http_requests", {}).items():
        found = dict(labels)
        if found["handler"] == "ForwardedFrameHandler":
            out[found["code"]] = out.get(found["code"], 0) + value
    return out


async def frames_until(conn: tornado.websocket.WebSocketClientConnection, wanted: set[bytes],
                       timeout: float = 15) -> bytes:
    """Read a viewer until one of `wanted` (a published frame) arrives; return it."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, bytes) and message in wanted:
            return message


@pytest.mark.gen_test(timeout=120)
async def test_a_push_upstreams_origin_is_the_node_its_publisher_reaches(make_nodes, redis_server):  # noqa: F811
    """A push upstream in a cluster: its publisher may reach any node, which becomes the origin;
    the others relay from it, and their viewers' input reaches the publisher. A second WebSocket
    publisher on another node gets a 409 naming the node that has it; a frame POSTed to another
    node goes to that node, as it would on one node. When the publisher leaves and comes back to
    another node, that node is the origin and the viewers everywhere get its frames."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}},
             "reconnect": {"initial_delay_seconds": 0.1, "max_delay_seconds": 0.5}}
    a, b, c = await started(make_nodes(3, free_port(), extra))
    pattern = render.TestPattern(160, 120, "cluster push")
    frames = [pattern.render(i) for i in range(40)]
    sid = await create_session(a, "pub")
    on_a, on_b = await a.viewer(sid), await b.viewer(sid)

    pub = await publisher(c)  # the node with no viewers
    for frame in frames[:20]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.03)
    await frames_until(on_a, set(frames[:20]))
    await frames_until(on_b, set(frames[:20]))
    await role_is(c, "origin")
    await role_is(a, "edge")
    await role_is(b, "edge")
    statuses = []
    while not statuses or not statuses[-1]["active"]:  # someone watches (the edges): it may not pause
        statuses.append(json.loads(await asyncio.wait_for(pub.read_message(), 10)))
    contract = Contract(json.loads((await c.api.call("GET", "/openapi.json"))[2].body))
    code, body, response = await refused_publisher(a)
    assert code == 409 and "node3" in body["error"], body
    contract.check("GET", "/ingest/{upstream}", code, response.headers, response.body)
    posted = pattern.render(100)  # node2 forwards it to node3, which publishes it beside its WebSocket's
    code, body, response = await post_frame(b, posted)
    assert code == 200 and body["success"], body
    contract.check("POST", "/ingest/{upstream}/frame", code, response.headers, response.body)
    await frames_until(on_a, {posted})
    on_b.write_message(json.dumps({"type": "input", "event": "keydown", "key": "w"}))
    while True:  # a viewer's input on an edge reaches the publisher, wrapped as the viewer's
        message = json.loads(await asyncio.wait_for(pub.read_message(), 10))
        if message["type"] == "viewer":
            assert json.loads(message["data"])["key"] == "w"
            break

    pub.close()  # the publisher moves to node1 (a reconnect through a load balancer, say)
    deadline = time.monotonic() + 15
    while True:
        try:
            pub = await publisher(a)
            break
        except HTTPClientError as exc:  # 409 until node3 has given the lease back
            assert exc.code == 409 and time.monotonic() < deadline, exc
            await asyncio.sleep(0.2)
    for frame in frames[20:]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.03)
    await frames_until(on_a, set(frames[20:30]))
    await frames_until(on_b, set(frames[20:30]), timeout=20)
    await role_is(a, "origin")
    await role_is(b, "edge")

    # node1 shuts down (SIGTERM): its publisher is told to go on elsewhere and gives the lease up
    # at once, so it is taken at its first try on node3.
    a.kill(signal.SIGTERM)
    while await asyncio.wait_for(pub.read_message(), 10) is not None:
        pass
    pub.close()
    pub = await publisher(c)  # no 409: node1 gave the lease back before it went
    for frame in frames[30:35]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.03)
    await frames_until(on_b, set(frames[30:35]), timeout=20)
    await role_is(c, "origin")

    # A publisher that POSTs its frames (curl, a camera bridge) to node2 instead, once node3 has
    # given the lease back (before, node2 would forward them to node3): node2 is the origin.
    pub.close()
    await poll(lambda: asyncio.to_thread(redis_server.command, "GET", "vsproxy:lease:pub"),
               lambda answer: answer == b"$-1\r\n", "node3 to give the lease back")
    for frame in frames[35:]:
        assert (await post_frame(b, frame))[0] == 200
        await asyncio.sleep(0.03)
    await frames_until(on_b, set(frames[35:]))
    await role_is(b, "origin")

    # Without Redis, a node cannot know whether another has the publisher: 503, not a guess.
    redis_server.stop()
    code, body, response = await post_frame(c, frames[0])
    assert code == 503, body
    contract.check("POST", "/ingest/{upstream}/frame", code, response.headers, response.body)
    code, body, response = await refused_publisher(c)
    assert code == 503, body
    contract.check("GET", "/ingest/{upstream}", code, response.headers, response.body)
    contract.assert_ok()


async def frames_seen(conn: tornado.websocket.WebSocketClientConnection, index: dict[bytes, int], last: int,
                      timeout: float = 15) -> list[int]:
    """The indices (in `index`) of the published frames a viewer gets, in the order it gets them,
    until frame `last`."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] != last:
        message = await asyncio.wait_for(conn.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, bytes) and message in index:
            seen.append(index[message])
    return seen


@pytest.mark.gen_test(timeout=120)
async def test_a_post_publisher_behind_a_round_robin_balancer_has_every_frame_published(make_nodes):
    """A POSTing publisher behind a load balancer without stickiness reaches each node in turn.
    The first node it reaches takes the upstream's lease; the others forward each frame to that
    node (once each), so every frame is a 200 with the one upstream's next sequence number, and the
    viewers on every node get every frame, once and in order, aged from the capture time the
    publisher gave (header or stamped into the JPEG). A wrong token or a body that is no JPEG is
    refused where it arrives and goes nowhere. Before, every node but the first answered 409: two
    frames in three were lost (19 of 57 published)."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    nodes = await started(make_nodes(3, free_port(), extra))
    a, b, c = nodes
    pattern = render.TestPattern(160, 120, "round robin")
    frames = [pattern.render(i) for i in range(60)]
    index = {frame: i for i, frame in enumerate(frames)}
    sid = await create_session(a, "pub")
    viewers = [await node.viewer(sid) for node in nodes]

    async def post_round_robin(first: int, end: int) -> list[int]:
        seqs = []
        for i in range(first, end):
            captured = time.time() - 5  # frame age counts from here, on every node
            if i % 2:  # as vsproxy.publish stamps it, inside the JPEG
                code, body, _ = await post_frame(nodes[i % 3], render.with_capture_time(frames[i], captured))
            else:
                code, body, _ = await post_frame(nodes[i % 3], frames[i],
                                                 headers={"X-Capture-Timestamp": str(captured)})
            assert code == 200 and body["success"], (nodes[i % 3].name, body)
            seqs.append(body["seq"])
            await asyncio.sleep(0.03)
        return seqs

    seqs = await post_round_robin(0, 3)  # node1 has the first frame: it is the origin
    for viewer in viewers:  # the edges relay from it (and get its current frame at once)
        await frames_until(viewer, set(frames[:3]))
    await role_is(a, "origin")
    await role_is(b, "edge")
    await role_is(c, "edge")
    # The viewers read as the frames come (one that does not read gets the newest only).
    watching = [asyncio.ensure_future(frames_seen(viewer, index, len(frames) - 1)) for viewer in viewers]
    seqs += await post_round_robin(3, len(frames))
    assert seqs == sorted(set(seqs)), seqs  # one hub published them all
    for node, seen in zip(nodes, await asyncio.gather(*watching), strict=True):
        assert [i for i in seen if i >= 3] == list(range(3, len(frames))), (node.name, seen)
    # One forward per frame that did not reach node1 itself (two in three), each published there.
    assert forwarded_to(await a.metrics()) == {"200": 40}
    assert forwarded_to(await b.metrics()) == forwarded_to(await c.metrics()) == {}
    for node in nodes:
        ages = await age_buckets(node.api, "ws_binary")
        assert ages["+Inf"] >= 50 and ages["2.5"] == 0, (node.name, ages)  # each about 5 s old

    # Refused where they arrive, never forwarded: a wrong token, a body that is no JPEG.
    code, body, response = await post_frame(b, frames[0], token="wrong-token-0123456")
    assert_json_error(code, body, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    code, body, _ = await post_frame(c, b"not a jpeg")
    assert_json_error(code, body, 400)
    assert forwarded_to(await a.metrics()) == {"200": 40}


@pytest.mark.gen_test(timeout=120)
async def test_a_post_publisher_goes_on_when_the_node_with_its_lease_dies(make_nodes):
    """The node holding a POSTing publisher's lease is killed (kill -9): the frames POSTed to the
    other nodes are 503s naming it (never a 500) until its lease expires (3 s), then the next node
    a frame reaches takes the upstream, every frame is a 200 again, and the viewers on the live
    nodes get the frames."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    a, b, c = await started(make_nodes(3, free_port(), extra))
    pattern = render.TestPattern(160, 120, "failover")
    frames = [pattern.render(i) for i in range(300)]
    sid = await create_session(b, "pub")
    on_b, on_c = await b.viewer(sid), await c.viewer(sid)
    for i, node in enumerate((a, b, c, a, b, c)):
        code, body, _ = await post_frame(node, frames[i])
        assert code == 200, body
    await frames_until(on_c, set(frames[:6]))
    await role_is(a, "origin")

    a.kill()
    killed = time.monotonic()
    codes: list[int] = []
    i = 6
    while codes[-6:] != [200] * 6:
        assert time.monotonic() - killed < 15, codes
        code, body, _ = await post_frame((b, c)[i % 2], frames[i])
        assert code in (200, 503), (code, body)
        if code == 503:
            assert_json_error(code, body, 503)
            assert "node1" in body["error"], body
        codes.append(code)
        i += 1
        await asyncio.sleep(0.05)
    first_ok = codes.index(200)
    assert first_ok > 0 and set(codes[first_ok:]) == {200}, codes  # 503s while the dead node had the lease
    assert time.monotonic() - killed < 8, codes
    for j in range(i, i + 20):  # the viewers on both live nodes get what follows
        code, body, _ = await post_frame((b, c)[j % 2], frames[j])
        assert code == 200, body
        await asyncio.sleep(0.05)
    await frames_until(on_b, set(frames[i:i + 20]))
    await frames_until(on_c, set(frames[i:i + 20]))
    roles = {(await upstream(node, "pub"))["source"]["role"] for node in (b, c)}
    assert roles == {"origin", "edge"}, roles


@pytest.mark.gen_test(timeout=60)
async def test_a_forwarded_frame_is_never_forwarded_again(make_nodes, redis_server):  # noqa: F811
    """The loop guard. Redis says node "ghost" holds the lease, at this very node's address: the
    node forwards a POSTed frame to "ghost", that is to itself, and the forwarded request (it
    carries cluster.token) finds the lease not its own and answers 409, as a WebSocket publisher
    is answered; it does not forward it again. That 409 is the publisher's answer. Also: "ghost"
    unreachable or no longer registered: a 503 saying so; the internal endpoint takes cluster.token
    only; a forwarded frame finding the lease free takes it, as a direct POST does."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    (node,) = await started(make_nodes(1, free_port(), extra))
    contract = Contract(json.loads((await node.api.call("GET", "/openapi.json"))[2].body))
    frame = render.TestPattern(160, 120, "loop guard").render(0)

    def ghost_at(url: str) -> None:
        record = json.dumps({"url": url, "at": time.time(), "instance": "ghost", "connected": []})
        redis_server.command("SET", "vsproxy:node:ghost", record, "PX", "60000")

    redis_server.command("SET", "vsproxy:lease:pub", "ghost", "PX", "60000")
    ghost_at(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, body, response = await post_frame(node, frame)
    assert code == 503 and "ghost" in body["error"] and "cannot be reached" in body["error"], body
    contract.check("POST", "/ingest/{upstream}/frame", code, response.headers, response.body)

    ghost_at(f"http://127.0.0.1:{node.port}")  # this node itself, under another name
    code, body, response = await post_frame(node, frame)
    assert code == 409 and "ghost" in body["error"], body
    contract.check("POST", "/ingest/{upstream}/frame", code, response.headers, response.body)
    assert forwarded_to(await node.metrics()) == {"409": 1}  # forwarded once, and no further

    redis_server.command("DEL", "vsproxy:node:ghost")  # its registration expired (dead), its lease not yet
    code, body, response = await post_frame(node, frame)
    assert code == 503 and "not registered" in body["error"], body
    contract.check("POST", "/ingest/{upstream}/frame", code, response.headers, response.body)
    contract.assert_ok()

    internal = "/internal/ingest/pub/frame"
    for token in ("", PUBLISH_TOKEN, CLUSTER_TOKEN + "x"):
        code, body, _ = await post_frame(node, frame, token=token, path=internal)
        assert_json_error(code, body, 401)
    code, body, _ = await post_frame(node, frame, token=CLUSTER_TOKEN, path=internal)
    assert code == 409 and "ghost" in body["error"], body  # still ghost's lease: refused, not forwarded
    redis_server.command("DEL", "vsproxy:lease:pub")
    code, body, _ = await post_frame(node, frame, token=CLUSTER_TOKEN, path=internal)
    assert code == 200 and body["success"], body
    assert redis_server.command("GET", "vsproxy:lease:pub") == b"$5\r\nnode1\r\n"
    assert forwarded_to(await node.metrics()) == {"409": 2, "401": 3, "200": 1}


async def publisher_taken(node: Node, timeout: float = 15) -> tornado.websocket.WebSocketClientConnection:
    """A publisher on `node`, retried while another node still has the upstream's lease (409)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await publisher(node)
        except HTTPClientError as exc:
            assert exc.code == 409 and time.monotonic() < deadline, exc
            await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=90)
async def test_a_publisher_moving_between_nodes_makes_no_relay_loop(make_nodes):
    """A node relays from another only while that one is the origin or has the publisher, and
    never from an edge. Before, a node that had the publisher for a moment during its hub's
    reconnect backoff kept its edges' relays after the publisher left; the publisher came to one
    of those edges, which went on relaying and was relayed from: two nodes each an edge of the
    other, every frame going round between them for ever (50,000 frames a second to the viewers,
    and the two hubs kept running with no viewer left)."""
    push = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    # node2 reconnects after 2 to 4 s: the publisher comes and goes while its hub waits.
    (a,) = make_nodes(1, free_port(), {**push, "reconnect": {"initial_delay_seconds": 0.1, "max_delay_seconds": 0.2}})
    (b,) = make_nodes(1, free_port(), {**push, "reconnect": {"initial_delay_seconds": 4, "max_delay_seconds": 4}})
    await started([a, b])
    pattern = render.TestPattern(160, 120, "no loop")
    frames = [pattern.render(i) for i in range(30)]
    sid = await create_session(a, "pub")
    on_a, on_b = await a.viewer(sid), await b.viewer(sid)
    pub = await publisher(a)
    pub.write_message(frames[0], binary=True)
    await frames_until(on_b, {frames[0]})
    await role_is(b, "edge")

    pub.close()  # node2's relay ends: its hub waits 2 to 4 s before it looks again
    pub = await publisher_taken(b)  # meanwhile the publisher is on node2, and node1 relays from it
    for frame in frames[1:10]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.05)
    await frames_until(on_a, set(frames[1:10]))
    pub.close()  # and leaves node2 before its hub ran again
    await asyncio.sleep(4)  # node2's hub looks for the origin again

    pub = await publisher_taken(a)  # the publisher comes back to node1
    for frame in frames[10:20]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.05)
    await frames_until(on_b, set(frames[10:20]))
    await role_is(a, "origin")
    await role_is(b, "edge")
    received = []
    for frame in frames[20:]:
        pub.write_message(frame, binary=True)
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # each frame once, not again and again
        try:
            message = await asyncio.wait_for(on_b.read_message(), max(0.05, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if isinstance(message, bytes) and message in frames:
            received.append(frames.index(message))
    assert len(received) == len(set(received)), received
    pub.close()


@pytest.mark.gen_test(timeout=90)
async def test_viewers_waiting_for_a_publisher_get_it_at_once_however_long_they_waited(make_nodes):
    """While no node has the publisher, a node with viewers keeps looking for it (as a push
    upstream waits on one node) instead of giving up and backing off: the publisher's frames
    reach them within a moment whenever it comes. Before, the search gave up after 15 s and the
    hub waited its reconnect delay (up to reconnect.max_delay_seconds, 10 s by default) before it
    looked again, again and again: viewers got the frames up to that long after the publisher came."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}},
             "reconnect": {"initial_delay_seconds": 10, "max_delay_seconds": 10}}
    a, b = await started(make_nodes(2, free_port(), extra))
    pattern = render.TestPattern(160, 120, "late publisher")
    frames = [pattern.render(i) for i in range(60)]
    sid = await create_session(a, "pub")
    on_b = await b.viewer(sid)
    await asyncio.sleep(17)  # more than the 15 s an edge looks for an origin
    pub = await publisher(a)

    async def publish() -> None:
        for frame in frames:
            pub.write_message(frame, binary=True)
            await asyncio.sleep(0.05)

    publishing = asyncio.ensure_future(publish())
    await frames_until(on_b, set(frames), timeout=3)
    await publishing
    await role_is(b, "edge")
    pub.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_edges_message_arriving_as_the_origin_closes_its_relay_is_ignored(make_nodes):
    """The origin closes its edges' relays when its publisher leaves (and on drain); what an edge
    sent before it saw the close still arrives and is ignored. Before, a 'JPEG wanted' among them
    was an AttributeError traceback on the origin (the closed connection has no stream)."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    (a,) = await started(make_nodes(1, free_port(), extra))
    pub = await publisher(a)
    pub.write_message(render.TestPattern(160, 120, "closing").render(0), binary=True)
    edge = await tornado.websocket.websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{a.port}/internal/relay/pub",
        headers={"Authorization": f"Bearer {CLUSTER_TOKEN}", "X-Vsproxy-Node": "edge"}))
    await role_is(a, "origin")

    async def toggle_jpeg() -> None:  # an edge whose JPEG viewers come and go
        wanted = True
        while True:
            await edge.write_message(bytes((2, 1 if wanted else 0)), binary=True)  # RELAY_JPEG
            wanted = not wanted

    toggling = asyncio.ensure_future(toggle_jpeg())
    await asyncio.sleep(0.3)
    pub.close()  # the publisher leaves: the origin closes the relay amid the edge's messages
    while await asyncio.wait_for(edge.read_message(), 10) is not None:
        pass
    toggling.cancel()
    edge.close()
    await asyncio.sleep(0.5)
    assert "Traceback" not in a.log(), a.log()[-3000:]


@pytest.mark.gen_test(timeout=60)
async def test_a_node_whose_publisher_lease_was_taken_mixes_no_frames(make_nodes, redis_server):  # noqa: F811
    """Redis lost the lease (a restart without data) and a second publisher took the upstream on
    another node before this node renewed it: this node's publisher is not the upstream's any
    more. It is disconnected as this node finds the lease taken, and this node's viewers get the
    other publisher's frames only. Before, the node relayed the new origin's frames and published
    its own publisher's into the same hub until its next heartbeat, and went on publishing what
    that publisher sent until it had answered the close (up to 5 s): two streams mixed."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}
    a, b = await started(make_nodes(2, free_port(), extra))
    mine = [render.TestPattern(160, 120, "first").render(i) for i in range(20)]
    theirs = [render.TestPattern(160, 120, "second").render(i) for i in range(20)]
    sid = await create_session(a, "pub")
    on_a = await a.viewer(sid)
    first = await publisher(a)
    stop = False

    async def publish(conn: tornado.websocket.WebSocketClientConnection, frames: list[bytes]) -> None:
        i = 0
        while not stop:
            try:
                await conn.write_message(frames[i % len(frames)], binary=True)
            except tornado.websocket.WebSocketClosedError:
                return
            i += 1
            await asyncio.sleep(0.02)

    tasks = [asyncio.ensure_future(publish(first, mine))]
    await frames_until(on_a, set(mine))
    await role_is(a, "origin")
    redis_server.command("DEL", "vsproxy:lease:pub")
    second = await publisher(b)
    tasks.append(asyncio.ensure_future(publish(second, theirs)))
    await frames_until(on_a, set(theirs), timeout=10)
    after = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(on_a.read_message(), 5)
        if isinstance(message, bytes) and message in mine:
            after.append(time.monotonic())
    assert not after, f"{len(after)} frames of the first publisher after the second's"
    stop = True
    await asyncio.gather(*tasks)
    first.close()
    second.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_lease_release_decided_before_a_claim_never_lands_after_it(redis_server, monkeypatch):  # noqa: F811
    """This node's push publisher left; the heartbeat gives the lease back just as a new publisher
    arrives here and claims it. Each call goes to Redis on a connection of the pool, and two in
    flight at once may land in either order: here the release is slow on its way. Before, it landed
    after the claim and deleted the lease the node had just claimed: its new publisher had no lease
    (until the next heartbeat), and another node could take the upstream too (two origins). Now the
    node's lease calls reach Redis in the order they were decided: the release, then the claim."""
    config = config_from_dict({"cluster": {"redis_url": redis_server.url, "node_id": "node1", "token": CLUSTER_TOKEN},
                               "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
    upstreams, _ = config.upstream_configs()
    cluster = Cluster(config)
    source = ClusterSource(create_source("pub", upstreams["pub"], config.reconnect), cluster)
    held = b"$5\r\nnode1\r\n"  # GET vsproxy:lease:pub: this node holds it
    try:
        assert await source.publisher_arriving() is None  # a publisher came here (and left: none attached)
        assert redis_server.command("GET", "vsproxy:lease:pub") == held
        claimed = asyncio.Event()
        claim, release = cluster.claim, cluster.release

        async def claim_seen(upstream: str) -> bool:
            try:
                return await claim(upstream)
            finally:
                claimed.set()

        async def late_release(upstream: str) -> None:  # lands after any claim sent meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(claimed.wait(), 1.0)
            await release(upstream)

        monkeypatch.setattr(cluster, "claim", claim_seen)
        monkeypatch.setattr(cluster, "release", late_release)
        heartbeat = asyncio.ensure_future(source.renew())  # the publisher is gone: give the lease back
        await asyncio.sleep(0)  # (the release is on its way)
        assert await source.publisher_arriving() is None  # a new publisher, meanwhile: it takes the lease
        await heartbeat
        assert redis_server.command("GET", "vsproxy:lease:pub") == held
    finally:
        await cluster.redis.aclose()


async def statuses_until(conn: tornado.websocket.WebSocketClientConnection, wanted: Container[bytes],
                         timeout: float = 20) -> list[tuple[str, str]]:
    """The status and error messages, (type, message), a viewer gets until one of `wanted` (a
    published frame) arrives."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, str) and (parsed := json.loads(message)).get("type") in ("status", "error"):
            out.append((parsed["type"], parsed["message"]))
        elif isinstance(message, bytes) and message in wanted:
            return out


@pytest.mark.gen_test(timeout=90)
async def test_an_edge_viewer_is_told_once_per_connect_that_the_upstream_is_connected(make_nodes):
    """The README: send input after the status "✅ Connected to upstream '<name>'". An edge's
    viewer gets it once each time the upstream connects, as on one node, and one status per event
    when it is lost and reconnects. Before, a viewer on an edge whose origin connected the
    upstream after the edge's relay opened (the publisher coming to a node nobody watches on, which
    the relay starts) got it twice: its own node's, and the origin's relayed."""
    extra = {"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}},
             "reconnect": {"initial_delay_seconds": 0.1, "max_delay_seconds": 0.5}}
    a, b, c = await started(make_nodes(3, free_port(), extra))
    pattern = render.TestPattern(160, 120, "statuses")
    frames = [pattern.render(i) for i in range(20)]
    sid = await create_session(a, "pub")
    on_a, on_b = await a.viewer(sid), await b.viewer(sid)
    connected = ("status", "✅ Connected to upstream 'pub'")

    async def publish(conn: tornado.websocket.WebSocketClientConnection, frames: list[bytes]) -> None:
        while True:
            try:
                await conn.write_message(frames[0], binary=True)
            except tornado.websocket.WebSocketClosedError:
                return
            frames = frames[1:] + frames[:1]
            await asyncio.sleep(0.05)

    pub = await publisher(c)  # node3: nobody watches there; the others' relays start its hub
    publishing = asyncio.ensure_future(publish(pub, frames[:10]))
    for viewer in (on_a, on_b):
        statuses = await statuses_until(viewer, set(frames[:10]))
        assert statuses == [("status", "Connecting to upstream 'pub'"), connected], statuses
    await role_is(a, "edge")
    await role_is(b, "edge")

    # The publisher leaves and comes back: lost, reconnecting, connected, one status each (as on
    # the origin itself for a viewer there: "Upstream 'pub' lost: ...", "Reconnecting to upstream
    # 'pub' in 0.1 s (attempt 1)", connected).
    pub.close()
    await publishing
    pub = await publisher_taken(c)
    publishing = asyncio.ensure_future(publish(pub, frames[10:]))
    for viewer in (on_a, on_b):
        statuses = await statuses_until(viewer, set(frames[10:]))
        kinds = [kind for kind, _ in statuses]
        assert statuses.count(connected) == 1 and statuses[-1] == connected, statuses
        assert kinds.count("error") == 1 and "lost" in statuses[0][1] and kinds.count("status") == 2, statuses
    pub.close()
    await publishing


@pytest.mark.gen_test(timeout=90)
async def test_an_edge_shows_its_origins_upstream_lost_as_one_node_does(make_nodes, sim30):
    """The simulator drops while a viewer watches on an edge: as a viewer on the origin (or on one
    node), it is told once that the upstream was lost, gets the offline picture meanwhile, and its
    input the "not delivered" error; once the simulator is back, one "✅ Connected" and its
    frames. Before, the edge's hub stayed "connected": no offline picture (the last frame stayed
    frozen), input went to the origin and was dropped there without a word, and after the frame
    timeout the edge reported the loss a second time."""
    extra = {"reconnect": {"initial_delay_seconds": 0.2, "max_delay_seconds": 0.5},
             "streaming": {"offline_frame_interval_seconds": 0.2}}
    origin, edge = await started(make_nodes(2, sim30.port, extra))
    sid = await create_session(origin)
    await real_frame(await origin.viewer(sid), sim30, 15)  # node1 takes the upstream: the origin
    on_edge = await edge.viewer(sid)
    await real_frame(on_edge, sim30, 15)
    assert (await edge.upstream())["source"]["role"] == "edge"

    await sim30.stop()  # the simulator crashes
    statuses: list[tuple[str, str]] = []
    offline = 0
    deadline = time.monotonic() + 15
    while offline < 3:  # the offline picture, again and again, while it is down
        message = await asyncio.wait_for(on_edge.read_message(), max(0.05, deadline - time.monotonic()))
        assert message is not None, f"edge viewer closed: {on_edge.close_code} {on_edge.close_reason}"
        if isinstance(message, str) and (parsed := json.loads(message)).get("type") in ("status", "error"):
            statuses.append((parsed["type"], parsed["message"]))
        elif isinstance(message, bytes) and message not in sim30.frames:
            offline += 1
    assert statuses[0][0] == "error" and statuses[0][1].startswith("Upstream 'isaac' lost: "), statuses
    assert (await edge.upstream())["state"] != "connected"
    on_edge.write_message(json.dumps({"type": "input", "key": "w"}))
    while True:
        parsed = json.loads(await asyncio.wait_for(next_text(on_edge), 10))
        if parsed["type"] == "error" and "not delivered" in parsed["message"]:
            break
        statuses.append((parsed["type"], parsed["message"]))

    sim30.listen(sim30.port)  # back
    later = await statuses_until(on_edge, sim30.frames)  # until one of its own frames
    statuses += later
    kinds = [kind for kind, _ in statuses]
    assert kinds.count("error") == 1, statuses  # one "lost", as on one node
    assert statuses.count(("status", "✅ Connected to upstream 'isaac'")) == 1, statuses
    assert all(kind == "status" and "Reconnecting" in text for kind, text in statuses[1:-1]), statuses


@pytest.mark.gen_test(timeout=90)
async def test_a_restarted_simulator_is_back_on_every_node_within_a_second_not_after_the_backoff(make_nodes, sim30):
    """The origin probes its upstream while it waits to retry, as one node does: the simulator
    restarted after an outage has the viewers of the origin and of its edge back about a second
    later, not after the rest of a 5-10 s backoff wait. Before, a cluster node never probed
    (its source had no address) and both viewers waited the backoff out."""
    extra = {"reconnect": {"initial_delay_seconds": 10, "max_delay_seconds": 10}}  # each wait: 5-10 s
    origin, edge = await started(make_nodes(2, sim30.port, extra))
    sid = await create_session(origin)
    on_origin = await origin.viewer(sid)
    await real_frame(on_origin, sim30, 15)  # node1 takes the upstream: the origin
    on_edge = await edge.viewer(sid)
    await real_frame(on_edge, sim30, 15)
    assert (await edge.upstream())["source"]["role"] == "edge"

    await sim30.stop()
    for viewer in (on_edge, on_origin):  # both told, once the origin has found it down
        while "Reconnecting" not in (text := await asyncio.wait_for(next_text(viewer), 15)):
            pass
        assert "or as soon as it answers" in text, text
    await asyncio.sleep(1.5)
    restarted = SimulatedIsaacSim(width=320, height=240, fps=30, keep_frames=600)
    restarted.listen(sim30.port)
    back = time.monotonic()
    try:
        for viewer in (on_origin, on_edge):
            await statuses_until(viewer, restarted.frames, timeout=15)
            took = time.monotonic() - back
            assert took < 3, f"{took:.2f} s from the restart to the simulator's frames"
        assert (await edge.upstream())["source"]["role"] == "edge"
        assert (await origin.upstream())["source"]["role"] == "origin"
    finally:
        await restarted.stop()


def lease_holder(redis) -> bytes:  # noqa: ANN001 - the redis_server fixture
    """The isaac upstream's lease as Redis answers a GET, in RESP: the holder's node ID, or $-1 (none)."""
    return redis.command("GET", "vsproxy:lease:isaac")


async def told_reconnecting(viewer: tornado.websocket.WebSocketClientConnection) -> str:
    while "Reconnecting" not in (text := await asyncio.wait_for(next_text(viewer), 15)):
        pass
    return text


@pytest.mark.gen_test(timeout=90)
async def test_the_origin_stays_the_origin_through_its_upstreams_outage(make_nodes, sim30, redis_server):  # noqa: F811
    """While the simulator is down the origin keeps the lease between its attempts: it shows role
    origin throughout, a node whose first viewer comes during the outage relays from it instead
    of taking the lease and trying the simulator too, and once the simulator is back it has one
    client, the origin, and every viewer its frames. Before, the origin gave the lease back after
    each failed attempt and showed role idle while it waited; a node starting meanwhile took the
    lease, and the origin became its edge."""
    extra = {"reconnect": {"initial_delay_seconds": 3, "max_delay_seconds": 3}}  # each wait: 1.5 to 3 s
    origin, edge, third = await started(make_nodes(3, sim30.port, extra))
    sid = await create_session(origin)
    on_origin = await origin.viewer(sid)
    await real_frame(on_origin, sim30, 15)
    on_edge = await edge.viewer(sid)
    await real_frame(on_edge, sim30, 15)

    await sim30.stop()
    await told_reconnecting(on_origin)
    deadline = time.monotonic() + 5  # two waits or more, and the attempts between them
    while time.monotonic() < deadline:
        assert (await origin.upstream())["source"]["role"] == "origin"
        assert lease_holder(redis_server) == b"$5\r\nnode1\r\n"
        await asyncio.sleep(0.1)
    on_third = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{third.port}/stream/{sid}?format=binary")
    third.viewers.append(on_third)
    await told_reconnecting(on_third)  # the origin's status, relayed
    status = (await third.upstream())["source"]
    assert (status["role"], status["origin"]) == ("edge", "node1"), status

    restarted = SimulatedIsaacSim(width=320, height=240, fps=30, keep_frames=600)
    restarted.listen(sim30.port)
    try:
        for viewer in (on_origin, on_edge, on_third):
            await statuses_until(viewer, restarted.frames, timeout=15)
        assert restarted.connections_total == 1 and len(restarted.clients) == 1
        assert [(await node.upstream())["source"]["role"] for node in (origin, edge, third)] == \
            ["origin", "edge", "edge"]
    finally:
        await restarted.stop()


@pytest.mark.gen_test(timeout=60)
async def test_an_origin_whose_viewers_leave_during_the_outage_gives_the_lease_back(make_nodes, sim30,
                                                                                    redis_server):  # noqa: F811
    """The origin keeps the lease while it waits to retry, but not once its hub stops (its last
    viewer left, linger 1 s): the lease goes back at once, not renewed on, nor left to expire."""
    extra = {"reconnect": {"initial_delay_seconds": 3, "max_delay_seconds": 3}}
    (origin,) = await started(make_nodes(1, sim30.port, extra))
    viewer = await origin.viewer(await create_session(origin))
    await real_frame(viewer, sim30, 15)
    await sim30.stop()
    await told_reconnecting(viewer)
    assert lease_holder(redis_server) == b"$5\r\nnode1\r\n"
    viewer.close()
    left = time.monotonic()
    while lease_holder(redis_server) != b"$-1\r\n":
        # Linger (1 s), then given back; left to expire it would last 3 s beyond the last renewal.
        assert time.monotonic() - left < 2.5, "the lease is still held"
        await asyncio.sleep(0.05)
    status = (await origin.upstream())["source"]
    assert (status["role"], status["origin"]) == ("idle", None), status
    await asyncio.sleep(1.5)  # and no heartbeat takes it again
    assert lease_holder(redis_server) == b"$-1\r\n"


async def next_text(conn: tornado.websocket.WebSocketClientConnection) -> str:
    while True:
        message = await conn.read_message()
        assert message is not None, f"viewer closed: {conn.close_code} {conn.close_reason}"
        if isinstance(message, str):
            return message


@pytest.mark.gen_test(timeout=30)
async def test_an_origin_stopped_while_redis_is_slow_keeps_no_lease_alive(redis_server, monkeypatch):  # noqa: F811
    """The origin's hub stops (no viewer left, or drain) while the heartbeat's renewal of the lease
    waits on a slow Redis (1.5 s: within the client's 2 s socket timeout), so the run's cleanup waits
    for the lease lock. The hub's stop() cancels the run again after 0.5 s. Before, that second
    cancellation ended the cleanup inside its wait for the lock: the task renewing the lease and the
    upstream's own run were never cancelled, and went on with no hub: the lease was renewed every
    second for ever (once given back, taken again), so no other node could become the upstream's
    origin. Now both end with the run, whatever it is waiting for."""
    config = config_from_dict({"cluster": {"redis_url": redis_server.url, "node_id": "node1", "token": CLUSTER_TOKEN},
                               "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
    upstreams, _ = config.upstream_configs()
    cluster = Cluster(config)
    source = ClusterSource(create_source("pub", upstreams["pub"], config.reconnect), cluster)
    hub = FrameHub("pub", source, streaming=config.streaming, reconnect=config.reconnect, h264=config.h264_for("pub"))
    link = PublisherStub()
    try:
        assert await source.publisher_arriving() is None  # a WebSocket publisher comes here
        assert source.inner.attach(hub, link)
        hub.attach(Demand("viewer"))  # type: ignore[arg-type]
        await wait_until(lambda: source.role == "origin", "the node to be the origin", timeout=5)
        claim = cluster.claim

        async def slow_claim(upstream: str) -> bool:
            await asyncio.sleep(1.5)
            return await claim(upstream)

        monkeypatch.setattr(cluster, "claim", slow_claim)
        heartbeat = asyncio.ensure_future(source.renew())  # holds the lease lock for 1.5 s
        await asyncio.sleep(0)
        await hub.stop()
        monkeypatch.setattr(cluster, "claim", claim)
        await heartbeat
        left = [task for task in asyncio.all_tasks()
                if task.get_coro().__qualname__ in ("ClusterSource._keep_lease", "PushSource.run")]
        assert left == [], left
        source.inner.detach(link)  # the publisher leaves: the heartbeat gives the lease back
        await source.renew()
        assert redis_server.command("GET", "vsproxy:lease:pub") == b"$-1\r\n"
        await asyncio.sleep(1.5)  # nothing takes it again
        assert redis_server.command("GET", "vsproxy:lease:pub") == b"$-1\r\n"
    finally:
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ in ("ClusterSource._keep_lease", "PushSource.run"):
                task.cancel()
        await hub.stop()
        await cluster.redis.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_post_whose_lookup_finds_the_lease_taken_here_meanwhile_is_published_here(redis_server,  # noqa: F811
                                                                                           monkeypatch):
    """A POSTed frame finds another node holding the lease and looks up that node's URL; meanwhile
    that lease expires and a publisher arriving here takes it. The frame is published here (this
    node has the publisher now), not forwarded to the old holder, which would refuse it (409 naming
    this very node) or be unreachable (503)."""
    config = config_from_dict({"cluster": {"redis_url": redis_server.url, "node_id": "node1", "token": CLUSTER_TOKEN},
                               "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
    upstreams, _ = config.upstream_configs()
    cluster = Cluster(config)
    source = ClusterSource(create_source("pub", upstreams["pub"], config.reconnect), cluster)
    frame = render.TestPattern(160, 120, "moved").render(0)
    record = json.dumps({"url": f"http://127.0.0.1:{free_port()}", "at": time.time(), "instance": "x",
                         "connected": []})
    redis_server.command("SET", "vsproxy:lease:pub", "ghost", "PX", "60000")
    redis_server.command("SET", "vsproxy:node:ghost", record, "PX", "60000")
    looking, found = asyncio.Event(), asyncio.Event()
    node_url = cluster.node_url

    async def slow_node_url(node_id: str) -> str | None:
        looking.set()
        await found.wait()
        return await node_url(node_id)

    monkeypatch.setattr(cluster, "node_url", slow_node_url)
    try:
        posting = asyncio.ensure_future(source.post_elsewhere(frame, None))
        await asyncio.wait_for(looking.wait(), 5)
        redis_server.command("DEL", "vsproxy:lease:pub")  # ghost's lease expired
        assert await source.publisher_arriving() is None  # a publisher here takes it
        found.set()
        assert await posting is None
        assert await source.post_elsewhere(frame, None) is None
    finally:
        await cluster.redis.aclose()
        if cluster._http is not None:
            cluster._http.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_node_looking_for_a_publisher_looks_again_as_soon_as_another_node_gets_it(redis_server,  # noqa: F811
                                                                                          monkeypatch):
    """Viewers on node2 wait for a push upstream's publisher; it connects to node1, which takes the
    lease and says so on the control channel: node2 looks again at once and goes to node1 for the
    frames. Before, node2 found out at its next look (every 0.3 s: viewers there missed the first
    frames of a publisher that had just started). Looks are made rare here, so that only the
    announcement can explain a prompt one."""
    import vsproxy.cluster.relay as relay
    monkeypatch.setattr(relay, "RETRY_SECONDS", 60.0)
    clusters, sources, hubs = [], [], []
    for node in ("node1", "node2"):
        config = config_from_dict({
            "cluster": {"redis_url": redis_server.url, "node_id": node, "token": CLUSTER_TOKEN,
                        "advertise_url": f"http://127.0.0.1:{free_port()}"},
            "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
        upstreams, _ = config.upstream_configs()
        cluster = Cluster(config)
        cluster.start()
        clusters.append(cluster)
        sources.append(ClusterSource(create_source("pub", upstreams["pub"], config.reconnect), cluster))
        hubs.append(FrameHub("pub", sources[-1], streaming=config.streaming, reconnect=config.reconnect,
                             h264=config.h264_for("pub")))
    node1, node2 = sources
    went_to: list[tuple[str, float]] = []

    async def connect(url: str) -> Any:  # node1 serves no HTTP here: where node2 goes is what counts
        went_to.append((url, time.monotonic()))
        raise ConnectionRefusedError("not served in this test")

    monkeypatch.setattr(node2, "_connect", connect)
    try:
        await wait_until(lambda: all(c.reachable for c in clusters), "both nodes registered", timeout=10)
        await wait_until(lambda: len(clusters[1].nodes) == 2, "node2 to know node1", timeout=10)
        hubs[1].attach(Demand("viewer"))  # type: ignore[arg-type]
        await wait_until(lambda: node2.role == "searching", "node2 to look for the publisher", timeout=5)
        await asyncio.sleep(0.5)  # node2's first look is over: it waits for its next one
        arrived = time.monotonic()
        assert await node1.publisher_arriving() is None  # the publisher connects to node1
        await wait_until(lambda: went_to, "node2 to go to node1 for the frames", timeout=5)
        (url, when), = went_to
        assert url == clusters[0].advertise_url and when - arrived < 2.0
    finally:
        for hub in hubs:
            await hub.stop()
        for cluster in clusters:
            await cluster.stop()
