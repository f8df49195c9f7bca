"""Sessions without HTTP (SessionManager with a fake clock and real frame hubs), plus idle reaping
as an API client sees it."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest
from tornado.iostream import IOStream

from vsproxy.config import ReconnectConfig, StreamingConfig
from vsproxy.hub import FrameHub
from vsproxy.outputs import WS_JSON, Viewer
from vsproxy.sessions import (
    InvalidSessionRequest,
    SessionLimitReached,
    SessionManager,
    SessionNotFound,
    iso_utc,
    new_session_id,
)
from vsproxy.sources.demo import DemoConfig, DemoSource

SESSION_ID_RE = re.compile(r"^stream_\d{13}_[0-9a-f]{32}$")
IDLE_TIMEOUT = 300.0
START = 1_760_000_000.0  # 2025-10-09, a fixed wall-clock time for the fake clock


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def hub(io_loop):
    """A real frame hub on a tiny, slow demo source; stopped at teardown."""
    frame_hub = FrameHub("demo", DemoSource("demo", DemoConfig(width=16, height=16, fps=2), ReconnectConfig()),
                         streaming=StreamingConfig(linger_seconds=0), reconnect=ReconnectConfig())
    yield frame_hub
    io_loop.run_sync(frame_hub.stop)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def manager(hub, clock):
    return SessionManager({"demo": hub}, "demo", max_sessions=3, idle_timeout=IDLE_TIMEOUT, clock=clock)


class ViewerFactory:
    """Real hub viewers on loopback socket pairs; records the reasons they were closed with."""

    def __init__(self, hub: FrameHub) -> None:
        self.hub = hub
        self.closed: list[str] = []
        self._sockets: list[socket.socket] = []
        self._streams: list[IOStream] = []

    def make(self) -> Viewer:
        ours, theirs = socket.socketpair()
        self._sockets += [ours, theirs]
        stream = IOStream(ours)
        self._streams.append(stream)
        return Viewer(stream, WS_JSON, self.hub.stats[WS_JSON], close=self.closed.append,
                      send_text=lambda text: None)

    def close_all(self) -> None:
        for stream in self._streams:
            stream.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def viewers(hub):
    factory = ViewerFactory(hub)
    yield factory
    factory.close_all()


# -- session IDs -------------------------------------------------------------------------------


def test_session_ids_are_unique_and_well_formed():
    ids = [new_session_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    bad = [i for i in ids if not SESSION_ID_RE.match(i)]
    assert not bad, bad[:5]


def test_session_id_has_128_random_bits():
    """IDs made in the same millisecond still differ, and every one of the 128 bits varies."""
    ids = [new_session_id(START + 0.123) for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    prefixes = {i.rsplit("_", 1)[0] for i in ids}
    assert prefixes == {"stream_1760000000123"}
    randoms = [int(i.rsplit("_", 1)[1], 16) for i in ids]
    ones = zeros = 0
    for value in randoms:
        ones |= value
        zeros |= ~value & (2**128 - 1)
    assert ones == zeros == 2**128 - 1  # no bit is stuck at 0 or 1 across 10 000 IDs


# -- create / get / destroy --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_create_and_get(manager, hub, clock):
    session = manager.create("alice", "arm-1")
    assert SESSION_ID_RE.match(session.id)
    assert manager.get(session.id) is session
    assert manager.all() == [session]
    assert len(manager) == 1
    assert session in hub.sessions
    assert hub.running  # the first session starts the upstream
    info = session.to_json(clock())
    assert info["id"] == session.id
    assert (info["userId"], info["robotName"]) == ("alice", "arm-1")
    assert info["createdAt"] == info["lastActivity"] == iso_utc(START)
    assert info["connections"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_destroy_removes_session_and_detaches_from_hub(manager, hub):
    session = manager.create("alice", "arm-1")
    assert manager.destroy(session.id) is session
    assert len(manager) == 0
    assert session not in hub.sessions
    with pytest.raises(SessionNotFound):
        manager.get(session.id)


@pytest.mark.gen_test(timeout=10)
async def test_unknown_session_raises_not_found(manager):
    with pytest.raises(SessionNotFound) as info:
        manager.get("stream_0000000000000_" + "0" * 32)
    assert info.value.status == 404
    with pytest.raises(SessionNotFound):
        manager.destroy("no-such-session")
    session = manager.create("alice", "arm-1")
    manager.destroy(session.id)
    with pytest.raises(SessionNotFound):
        manager.destroy(session.id)


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("user_id", "robot_name", "field"), [
    (None, "robot", "userId"),
    (123, "robot", "userId"),
    ("", "robot", "userId"),
    ("   ", "robot", "userId"),
    (["alice"], "robot", "userId"),
    ("u" * 129, "robot", "userId"),
    ("alice", None, "robotName"),
    ("alice", 7, "robotName"),
    ("alice", "\t\n", "robotName"),
    ("alice", "r" * 129, "robotName"),
])
async def test_invalid_request_raises_and_creates_nothing(manager, user_id, robot_name, field):
    with pytest.raises(InvalidSessionRequest) as info:
        manager.create(user_id, robot_name)
    assert info.value.status == 400
    assert field in str(info.value)
    assert len(manager) == 0


@pytest.mark.gen_test(timeout=10)
async def test_names_of_128_characters_are_accepted(manager):
    session = manager.create("u" * 128, "r" * 128)
    assert (session.user_id, session.robot_name) == ("u" * 128, "r" * 128)


@pytest.mark.gen_test(timeout=10)
async def test_session_limit(manager):
    sessions = [manager.create(f"user{n}", "robot") for n in range(3)]
    with pytest.raises(SessionLimitReached) as info:
        manager.create("one-too-many", "robot")
    assert info.value.status == 503
    assert len(manager) == 3
    manager.destroy(sessions[0].id)
    manager.create("now-there-is-room", "robot")
    assert len(manager) == 3


@pytest.mark.gen_test(timeout=10)
async def test_destroy_closes_viewers(manager, viewers):
    session = manager.create("alice", "arm-1")
    manager.add_viewer(session, viewers.make())
    manager.add_viewer(session, viewers.make())
    assert session.to_json()["connections"] == 2
    manager.destroy(session.id)
    assert len(viewers.closed) == 2
    assert all("destroyed" in reason for reason in viewers.closed)


@pytest.mark.gen_test(timeout=10)
async def test_close_all_destroys_every_session_and_tells_viewers(manager, hub, viewers):
    first, second = manager.create("a", "r"), manager.create("b", "r")
    manager.add_viewer(first, viewers.make())
    manager.close_all()
    assert len(manager) == 0
    assert not hub.sessions
    assert viewers.closed == ["Session closed: server shutting down"]
    for session in (first, second):
        with pytest.raises(SessionNotFound):
            manager.get(session.id)


# -- idle reaping ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_reap_idle_destroys_only_sessions_idle_past_the_timeout(manager, clock):
    idle = manager.create("idle", "robot")
    active = manager.create("active", "robot")
    clock.advance(200)
    active.touch(clock())  # e.g. a GET /session/{id}
    clock.advance(150)  # idle: 350 s without activity; active: 150 s
    assert manager.reap_idle() == [idle]
    assert manager.all() == [active]
    with pytest.raises(SessionNotFound):
        manager.get(idle.id)
    clock.advance(IDLE_TIMEOUT)
    assert manager.reap_idle() == [active]
    assert len(manager) == 0


@pytest.mark.gen_test(timeout=10)
async def test_reap_idle_keeps_young_sessions(manager, clock):
    session = manager.create("alice", "robot")
    clock.advance(IDLE_TIMEOUT - 1)
    assert manager.reap_idle() == []
    assert manager.get(session.id) is session


@pytest.mark.gen_test(timeout=10)
async def test_session_with_viewer_is_never_reaped(manager, clock, viewers):
    """A watched session stays however long it is watched; its idle countdown starts when the
    last viewer leaves."""
    session = manager.create("alice", "robot")
    viewer = viewers.make()
    manager.add_viewer(session, viewer)
    clock.advance(10 * IDLE_TIMEOUT)
    assert manager.reap_idle() == []
    assert session.to_json(clock())["lastActivity"] == iso_utc(clock())
    manager.remove_viewer(session, viewer)
    clock.advance(IDLE_TIMEOUT - 1)
    assert manager.reap_idle() == []
    clock.advance(2)
    assert manager.reap_idle() == [session]
    assert not viewers.closed  # the viewer had already gone; nobody left to tell


# -- idle reaping through the API --------------------------------------------------------------

FAST_REAPING = pytest.mark.config({"sessions": {"idle_timeout_seconds": 1, "cleanup_interval_seconds": 0.2}})


@pytest.mark.slow
@pytest.mark.gen_test(timeout=15)
@FAST_REAPING
async def test_idle_session_is_reaped(api):
    session_id = (await api.create_session())["sessionId"]
    await asyncio.sleep(2)
    status, body, _ = await api.call("GET", f"/session/{session_id}")
    assert status == 404, body
    _, health, _ = await api.call("GET", "/health")
    assert health["active_sessions"] == 0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=15)
@FAST_REAPING
async def test_watched_session_is_not_reaped(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    await conn.read_message()
    await asyncio.sleep(2)
    status, body, _ = await api.call("GET", f"/session/{session_id}")
    assert status == 200, body
    assert body["session"]["connections"] == 1


@pytest.mark.slow
@pytest.mark.gen_test(timeout=15)
@FAST_REAPING
async def test_polled_session_is_not_reaped(api):
    """API access counts as activity: a session the frontend keeps asking about stays."""
    session_id = (await api.create_session())["sessionId"]
    for _ in range(5):
        await asyncio.sleep(0.4)
        status, body, _ = await api.call("GET", f"/session/{session_id}")
        assert status == 200, body
