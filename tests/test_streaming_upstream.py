"""Streaming and the upstream connection: one connection shared by every session (closed after the
linger), messages both ways between viewers and the simulated Isaac Sim, and viewers surviving an
upstream restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
import tornado.web
from helpers import (
    SIM_SIZE,
    as_frame,
    assert_sent_in_order,
    connected_session,
    free_port,
    read_frames,
    read_until,
    session_json,
    text_type,
    wait_session,
    wait_until,
    with_isaac_upstream,
)

from vsproxy import render
from vsproxy.simulate import SimulatedIsaacSim, _SimSocket

WAIT = 10.0  # generous bound for anything that should take well under a second


async def upstream_state(api, name: str = "isaac") -> str:
    code, body, _ = await api.call("GET", "/health")
    assert code == 200, body
    return next(u["state"] for u in body["upstreams"] if u["name"] == name)


# -- 3. one upstream connection for all sessions -----------------------------------------------------


@pytest.mark.config({"streaming": {"linger_seconds": 0.3}})
@pytest.mark.gen_test(timeout=30)
async def test_sessions_share_one_upstream_connection_closed_after_linger(sim, api, ws_connect):
    first = await connected_session(api)
    second = (await api.create_session("user456", "other-robot"))["sessionId"]
    conns = [await ws_connect(f"/stream/{sid}?format=binary") for sid in (first, second)]
    for conn in conns:
        frames, _ = await read_frames(conn, 5)
        assert_sent_in_order(frames, sim)
    assert sim.peak_clients == 1
    assert sim.connections_total == 1

    code, _, _ = await api.call("DELETE", f"/session/{first}")
    assert code == 200
    code, _, _ = await api.call("POST", f"/session/{second}/destroy")
    assert code == 200
    await wait_until(lambda: not sim.clients, what="the upstream connection to close after the linger")
    assert sim.connections_total == 1


@pytest.mark.slow
@pytest.mark.config({"streaming": {"linger_seconds": 2.0}})
@pytest.mark.gen_test(timeout=30)
async def test_session_created_during_linger_reuses_the_upstream_connection(sim, api, ws_connect):
    first = await connected_session(api)
    conn = await ws_connect(f"/stream/{first}?format=binary")
    await read_frames(conn, 3)

    code, _, _ = await api.call("DELETE", f"/session/{first}")
    assert code == 200
    destroyed_at = time.monotonic()
    second = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{second}?format=binary")

    # Keep watching past the end of the first session's linger: frames keep coming, all real ones.
    frames: list[bytes] = []
    while time.monotonic() < destroyed_at + 3.0:
        batch, _ = await read_frames(conn, 1)
        frames += batch
    assert_sent_in_order(frames, sim)
    assert sim.connections_total == 1, "the upstream was reconnected"
    assert len(sim.clients) == 1
    assert (await session_json(api, second))["isIsaacSimConnected"] is True


@pytest.mark.config({"streaming": {"linger_seconds": 0}})
@pytest.mark.gen_test(timeout=60)
async def test_upstream_closes_when_the_last_session_ends_while_frames_pour_in(sim, api, ws_connect):
    """Stopping the upstream must work however busy its reader is (here: a burst of queued frames)."""
    for cycle in range(1, 4):
        session_id = await connected_session(api)
        conn = await ws_connect(f"/stream/{session_id}?format=binary")
        await read_frames(conn, 2)
        jpeg = sim.frames[-1]
        for client in list(sim.clients):
            for _ in range(2000):
                client.write_message(jpeg, binary=True)
        code, _, _ = await api.call("DELETE", f"/session/{session_id}")
        assert code == 200
        await wait_until(lambda: not sim.clients, what=f"the upstream connection to close (cycle {cycle})")
        deadline = time.monotonic() + WAIT
        while (state := await upstream_state(api)) != "idle":
            assert time.monotonic() < deadline, f"upstream state stayed {state!r} (cycle {cycle})"
            await asyncio.sleep(0.05)
    assert sim.connections_total == 3


class SlowHandshakeSim(SimulatedIsaacSim):
    """A simulated Isaac Sim that answers the WebSocket handshake `delay` seconds after the request
    (`requests` counts those), and never pings its clients."""

    def __init__(self, delay: float) -> None:
        super().__init__(width=SIM_SIZE[0], height=SIM_SIZE[1], fps=30)
        self.delay = delay
        self.requests = 0

    def make_app(self) -> tornado.web.Application:
        sim = self

        class SlowSocket(_SimSocket):
            async def get(self, *args, **kwargs) -> None:
                sim.requests += 1
                await asyncio.sleep(sim.delay)
                await super().get(*args, **kwargs)

        return tornado.web.Application([(r"/.*", SlowSocket, {"sim": self})])


@pytest.fixture
def slow_sim(io_loop):
    simulator = SlowHandshakeSim(delay=0.5)
    simulator.port = free_port()
    simulator.listen(simulator.port)
    yield simulator
    io_loop.run_sync(simulator.stop)


@pytest.fixture
def proxy_config(request, proxy_config):
    """conftest's, plus upstream "slow" at the `slow_sim` when the test uses it."""
    return with_isaac_upstream(request, proxy_config, "slow_sim", "slow")


@pytest.mark.config({"streaming": {"linger_seconds": 0}, "reconnect": {"ping_interval_seconds": 0}})
@pytest.mark.gen_test(timeout=30)
async def test_a_connection_the_upstream_answers_after_the_hub_stopped_is_closed(slow_sim, api):
    """The last session ends while the upstream is still answering the handshake: the hub stops
    (its connect is cancelled), and the connection the upstream completes afterwards is closed,
    not left open (before: held until a ping timed out, for ever with pings off; Isaac Sim
    serves one client)."""
    for cycle in range(1, 4):
        code, body, _ = await api.call("POST", "/session/create",
                                       {"userId": "user123", "robotName": "demo-robot", "upstream": "slow"})
        assert code == 200, body
        await wait_until(lambda n=cycle: slow_sim.requests == n, what=f"handshake request {cycle}")
        code, _, _ = await api.call("DELETE", f"/session/{body['sessionId']}")
        assert code == 200
        await wait_until(lambda n=cycle: slow_sim.connections_total == n, what=f"handshake {cycle} answered")
        await wait_until(lambda: not slow_sim.clients, timeout=WAIT,
                         what=f"the upstream connection of cycle {cycle} to be closed")
        assert await upstream_state(api, "slow") == "idle"


# -- 4. messages both ways -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_viewer_messages_reach_the_upstream_unchanged(sim, api, ws_connect):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    await read_frames(json_viewer, 1)
    await read_frames(binary_viewer, 1)

    text = '{"type":"control","command":"move","speed":0.5,"note":"caf\u00e9 \u2705"}'
    blob = bytes(range(256)) * 3
    await json_viewer.write_message(text)
    await json_viewer.write_message(blob, binary=True)
    await binary_viewer.write_message("from the binary viewer")
    await wait_until(lambda: len(sim.received) >= 3, what="3 messages at the upstream")
    received = list(sim.received)
    assert text in received and isinstance(received[received.index(text)], str)
    assert blob in received and isinstance(received[received.index(blob)], bytes)
    assert "from the binary viewer" in received
    assert len(received) == 3


@pytest.mark.gen_test(timeout=30)
async def test_upstream_text_reaches_websocket_viewers_unchanged(sim, api, ws_connect):
    session_id = await connected_session(api)
    viewers = [await ws_connect(f"/stream/{session_id}{query}") for query in ("", "?format=binary")]
    for conn in viewers:
        await read_frames(conn, 1)

    telemetry = '{"type":"telemetry","x":1}'
    sim.broadcast_text(telemetry)
    for conn in viewers:
        seen = await read_until(conn, lambda m: isinstance(m, str) and m == telemetry)
        assert seen[-1] == telemetry


@pytest.mark.gen_test(timeout=30)
async def test_upstream_frame_sent_as_json_text_is_treated_as_a_frame(sim, api, ws_connect):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    for conn in (json_viewer, binary_viewer):
        await read_frames(conn, 1)

    jpeg = render.status_frame(*SIM_SIZE, "test", "a frame sent as JSON text")
    assert jpeg not in sim.frames
    sim.broadcast_text(json.dumps({"type": "frame", "data": base64.b64encode(jpeg).decode()}))

    seen = await read_until(binary_viewer, lambda m: m == jpeg)
    assert not [m for m in seen if text_type(m) == "frame"], "the frame was relayed as text"
    await read_until(json_viewer, lambda m: as_frame(m)[0] == jpeg)
    code, _, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 200 and response.body in [*sim.frames, jpeg]


# -- 5. upstream loss and recovery ---------------------------------------------------------------


@pytest.mark.config({"streaming": {"offline_frame_interval_seconds": 0.2}})
@pytest.mark.gen_test(timeout=60)
async def test_viewers_survive_upstream_restart_on_the_same_port(sim, api, ws_connect, mjpeg_open):
    session_id = await connected_session(api)
    json_viewer = await ws_connect(f"/stream/{session_id}")
    binary_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    mjpeg = await mjpeg_open(f"/stream/{session_id}/mjpeg")
    for conn in (json_viewer, binary_viewer):
        frames, _ = await read_frames(conn, 3)
        assert_sent_in_order(frames, sim)
    assert (await mjpeg.next_part()).body in sim.frames

    port = sim.port
    await sim.stop()

    # JSON viewers are told, and stay connected.
    seen = await read_until(json_viewer, lambda m: text_type(m) == "error")
    error = json.loads(seen[-1])
    assert error["message"]
    await read_until(json_viewer, lambda m: text_type(m) == "status")
    session = await wait_session(api, session_id, "isIsaacSimConnected to go false",
                                 lambda s: not s["isIsaacSimConnected"])
    assert session["connections"] == 3

    # Image viewers get "offline" pictures, at least two of them (one every 0.2 s).
    offline: list[bytes] = []
    while len(offline) < 2:
        frames, _ = await read_frames(binary_viewer, 1)
        offline += [f for f in frames if f not in sim.frames]
    offline_parts: list[bytes] = []
    while len(offline_parts) < 2:
        body = (await mjpeg.next_part()).body
        if body not in sim.frames:
            offline_parts.append(body)
    for jpeg in offline + offline_parts:
        assert render.is_jpeg(jpeg)
        assert render.jpeg_size(jpeg) == SIM_SIZE, "the offline picture keeps the stream's size"
    code, _, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 200 and render.is_jpeg(response.body) and response.body not in sim.frames

    # The simulator comes back on the same port: frames resume on the same connections.
    restarted = SimulatedIsaacSim(width=SIM_SIZE[0], height=SIM_SIZE[1], fps=30, keep_frames=600)
    restarted.listen(port)
    try:
        await read_until(json_viewer, lambda m: as_frame(m)[0] in restarted.frames)
        await read_until(binary_viewer, lambda m: isinstance(m, bytes) and m in restarted.frames)
        deadline = time.monotonic() + WAIT
        while (await mjpeg.next_part(max(0.01, deadline - time.monotonic()))).body not in restarted.frames:
            pass
        frames, _ = await read_frames(binary_viewer, 5)
        assert_sent_in_order(frames, restarted)
        session = await wait_session(api, session_id, "isIsaacSimConnected to go true again",
                                     lambda s: s["isIsaacSimConnected"])
        assert session["connections"] == 3
        assert restarted.connections_total == 1
    finally:
        await restarted.stop()
