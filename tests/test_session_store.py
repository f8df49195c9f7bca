"""Sessions that survive a restart (`sessions.store: sqlite:PATH`): the store on its own, the
SessionManager with it, and real `vsproxy` processes restarted (SIGTERM and kill -9) on one file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tornado.websocket
from helpers import MjpegClient, free_port, read_frames, read_until_closed, recv
from test_cli import EXIT_TIMEOUT, Server, assert_one_line_config_error, clean_env, run_vsproxy
from test_sessions import START, FakeClock
from tornado.httpclient import HTTPRequest

from vsproxy.config import ConfigError, ReconnectConfig, StreamingConfig
from vsproxy.hub import FrameHub
from vsproxy.sessions import SessionManager, SessionNotFound
from vsproxy.sources.demo import DemoConfig, DemoSource
from vsproxy.store import LoadedSessions, MemoryStore, SessionRecord, SqliteStore, open_store

IDLE = 300.0


def record(n: int, upstream: str = "demo") -> SessionRecord:
    return SessionRecord(f"stream_{n}", f"user{n}", f"robot{n}", upstream, 1000.0 + n, 2000.0 + n)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
def hub(io_loop):
    frame_hub = FrameHub("demo", DemoSource("demo", DemoConfig(width=16, height=16, fps=2), ReconnectConfig()),
                         streaming=StreamingConfig(linger_seconds=0), reconnect=ReconnectConfig())
    yield frame_hub
    io_loop.run_sync(frame_hub.stop)


def manager_on(store, hub: FrameHub, clock: FakeClock) -> SessionManager:
    return SessionManager({"demo": hub}, "demo", max_sessions=3, idle_timeout=IDLE, clock=clock, store=store)


async def reopen(db: Path) -> tuple[SqliteStore, LoadedSessions]:
    store = SqliteStore(db)
    return store, store.load()


# -- the store on its own ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_sqlite_store_round_trip(db):
    store = SqliteStore(db)
    assert store.load() == LoadedSessions([], None)
    for n in range(3):
        store.add(record(n))
    store.remove("stream_1")
    store.update_activity({"stream_2": 5000.0})
    before_close = time.time()
    await store.close()
    store, loaded = await reopen(db)
    assert loaded.records == [record(0), SessionRecord("stream_2", "user2", "robot2", "demo", 1002.0, 5000.0)]
    assert loaded.last_alive >= before_close - 1
    await store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.gen_test(timeout=20)
async def test_writes_never_block_the_event_loop(db):
    """While another process holds the file locked, the writer thread waits (SQLite's busy
    timeout); the event loop keeps its timers on schedule and loses nothing."""
    store = SqliteStore(db)
    store.load()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    lateness = []

    async def ticker() -> None:
        for _ in range(50):
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            lateness.append(time.monotonic() - due)

    tick = asyncio.ensure_future(ticker())
    started = time.monotonic()
    for n in range(200):
        store.add(record(n))
        await asyncio.sleep(0)
    assert time.monotonic() - started < 0.5  # queued, not written
    await tick
    assert max(lateness) < 0.1, f"a 10 ms timer ran {max(lateness) * 1000:.0f} ms late"
    blocker.execute("ROLLBACK")
    blocker.close()
    await store.close()
    store, loaded = await reopen(db)
    assert len(loaded.records) == 200
    await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_burst_of_changes_is_one_commit(db):
    store = SqliteStore(db)
    store.load()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # hold the writer while the burst queues up
    await asyncio.sleep(0.05)
    store.update_activity({})  # the writer takes this and waits for the lock
    await asyncio.sleep(0.05)
    commits = store.commits
    for n in range(100):
        store.add(record(n))
    blocker.execute("ROLLBACK")
    blocker.close()
    await asyncio.wrap_future(store.flush())
    assert store.commits - commits <= 2  # the waiting write, then the whole burst in one
    await store.close()


@pytest.mark.parametrize("content, problem", [
    (b"this is not a database, just text" * 100, "file is not a database"),
    (None, "a SQLite database of something else"),
])
def test_unusable_files_are_config_errors_naming_the_key(db, content, problem):
    if content is None:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE customers (name TEXT)")
        conn.commit()
        conn.close()
    else:
        db.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        SqliteStore(db).load()
    assert info.value.key == "sessions.store"
    assert problem in info.value.problem


def test_directories_and_missing_directories_are_config_errors(tmp_path):
    for path, problem in ((tmp_path, "is a directory"), (tmp_path / "missing" / "s.db", "does not exist")):
        with pytest.raises(ConfigError) as info:
            SqliteStore(path).load()
        assert (info.value.key, problem in info.value.problem) == ("sessions.store", True)


def test_open_store_chooses_by_config():
    assert isinstance(open_store("memory"), MemoryStore)
    assert isinstance(open_store("sqlite:/tmp/x.db"), SqliteStore)
    with pytest.raises(ConfigError):
        open_store("redis://localhost")


# -- SessionManager with a store ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_sessions_come_back_unless_destroyed_or_reaped(db, hub):
    clock = FakeClock()
    store = SqliteStore(db)
    manager = manager_on(store, hub, clock)
    manager.restore(store.load())
    kept = manager.create("alice", "arm")
    destroyed = manager.create("bob", "arm")
    reaped = manager.create("carol", "arm")
    manager.destroy(destroyed.id)
    clock.advance(IDLE - 10)
    kept.touch(clock())
    clock.advance(20)
    assert manager.reap_idle() == [reaped]
    manager.flush_activity()
    manager.close_all()  # shutdown keeps what a persistent store holds
    await manager.close_store()
    assert not hub.sessions

    store = SqliteStore(db)
    again = manager_on(store, hub, clock)
    (restored,) = again.restore(store.load())
    assert restored.to_json(clock()) == {**kept.to_json(clock()), "isIsaacSimConnected": hub.connected}
    assert restored.hub is hub and restored in hub.sessions
    for gone in (destroyed, reaped):
        with pytest.raises(SessionNotFound):
            again.get(gone.id)
    assert len(again) == 1  # counts against limits
    await again.close_store()


@pytest.mark.gen_test(timeout=10)
async def test_touches_are_coalesced_into_one_write(db, hub):
    clock = FakeClock()
    store = SqliteStore(db)
    manager = manager_on(store, hub, clock)
    manager.restore(store.load())
    session = manager.create("alice", "arm")
    await asyncio.wrap_future(store.flush())
    commits = store.commits
    for _ in range(1000):  # e.g. viewer messages
        clock.advance(0.001)
        session.touch(clock())
    await asyncio.sleep(0.05)
    assert store.commits == commits  # touching writes nothing
    assert manager.flush_activity() == 1
    assert manager.flush_activity() == 0  # nothing changed since
    await asyncio.wrap_future(store.flush())
    assert store.commits - commits in (1, 2)  # a batch each, or both in one
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT last_activity FROM sessions").fetchone()[0] == pytest.approx(clock())
    conn.close()
    await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_downtime_does_not_count_as_idle_time(db, hub):
    """A session idle for 100 s when the server went away still has IDLE - 100 s left after a
    restart, however long the server was down."""
    clock = FakeClock(START)
    store = SqliteStore(db)
    store.load()
    store.add(SessionRecord("stream_x", "u", "r", "demo", START - 200, START - 100))
    await store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'last_alive'", (START,))
    conn.commit()
    conn.close()
    clock.advance(3600)  # down for an hour
    store = SqliteStore(db)
    manager = manager_on(store, hub, clock)
    (session,) = manager.restore(store.load())
    assert session.last_activity(clock()) == clock() - 100
    assert manager.reap_idle() == []
    clock.advance(IDLE - 99)
    assert manager.reap_idle() == [session]
    await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_session_whose_upstream_is_gone_is_dropped(db, hub, caplog):
    store = SqliteStore(db)
    store.load()
    store.add(record(1, upstream="removed-camera"))
    store.add(record(2))
    await store.close()
    store = SqliteStore(db)
    manager = manager_on(store, hub, FakeClock())
    assert [s.id for s in manager.restore(store.load())] == ["stream_2"]
    assert "no longer configured" in caplog.text
    await store.close()
    store, loaded = await reopen(db)
    assert [r.id for r in loaded.records] == ["stream_2"]  # dropped for good
    await store.close()


# -- real processes restarted on the same file ------------------------------------------------

SECRET = "0123456789abcdef0123456789abcdef-secret"


def write_config(directory: Path, store: str, **sessions: object) -> str:
    config = {
        "sessions": {"store": store, **sessions},
        "demo": {"width": 320, "height": 240, "fps": 15},
        "auth": {"viewer_tokens": {"enabled": True, "secret": SECRET}},
    }
    (directory / "vsproxy.yaml").write_text(json.dumps(config))  # JSON is YAML
    return "vsproxy.yaml"


def http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def start(directory: Path, port: int, config: str) -> Server:
    server = Server(["--config", config, "--host", "127.0.0.1", "--port", str(port)], directory)
    server.wait_healthy(port)
    return server


async def viewer(port: int, path: str) -> tornado.websocket.WebSocketClientConnection:
    return await tornado.websocket.websocket_connect(HTTPRequest(f"ws://127.0.0.1:{port}{path}",
                                                                 connect_timeout=5, request_timeout=5))


def session_fields(port: int, session_id: str) -> dict:
    code, body = http(port, "GET", f"/session/{session_id}")
    assert code == 200, body
    return {k: v for k, v in body["session"].items() if k not in ("lastActivity", "isIsaacSimConnected")}


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_sessions_and_their_stream_urls_survive_a_sigterm_restart(tmp_path):
    port = free_port()
    config = write_config(tmp_path, "sqlite:sessions.db")
    server = start(tmp_path, port, config)
    try:
        created = [http(port, "POST", "/session/create", {"userId": f"u{n}", "robotName": "arm"})[1]
                   for n in range(3)]
        kept, other, destroyed = created
        assert http(port, "POST", f"/session/{destroyed['sessionId']}/destroy")[0] == 200
        before = {c["sessionId"]: session_fields(port, c["sessionId"]) for c in (kept, other)}
        token = kept["viewerToken"]
        conn = await viewer(port, f"/stream/{kept['sessionId']}?format=binary&token={token}")
        await read_frames(conn, 2)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(read_until_closed(conn, timeout=None), EXIT_TIMEOUT)
        # Not "session ...": the embed player reconnects after this close, and ends after a destroy.
        assert (conn.close_code, conn.close_reason) == (1001, "Server shutting down; reconnect to resume")
        conn.close()
        assert server.process.wait(timeout=EXIT_TIMEOUT) == 0, server.stderr()
        server.stop()

        server = start(tmp_path, port, config)
        for session_id, fields in before.items():
            assert session_fields(port, session_id) == {**fields, "connections": 0}
        code, listing = http(port, "GET", "/sessions")
        assert sorted(s["id"] for s in listing["sessions"]) == sorted(before)
        assert http(port, "GET", f"/session/{destroyed['sessionId']}")[0] == 404
        # The viewer token issued before the restart still opens every stream URL.
        conn = await viewer(port, f"/stream/{kept['sessionId']}?format=binary&token={token}")
        await read_frames(conn, 2)
        h264 = await viewer(port, f"/stream/{kept['sessionId']}?format=h264&token={token}")
        assert isinstance(await recv(h264, timeout=15), (bytes, str))
        mjpeg = await MjpegClient.open(port, f"/stream/{kept['sessionId']}/mjpeg?token={token}")
        assert (await mjpeg.next_part()).body.startswith(b"\xff\xd8")
        assert session_fields(port, kept["sessionId"])["connections"] == 3
        await mjpeg.aclose()
        for connection in (conn, h264):
            connection.close()
        assert "Traceback" not in server.stderr()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_sessions_survive_kill_9_and_reaped_ones_do_not_come_back(tmp_path):
    """Durability window: creates and destroys are committed at once (within milliseconds);
    lastActivity at most sessions.activity_flush_seconds late."""
    port = free_port()
    config = write_config(tmp_path, "sqlite:sessions.db", activity_flush_seconds=0.2,
                          idle_timeout_seconds=1, cleanup_interval_seconds=0.1)
    server = start(tmp_path, port, config)
    try:
        doomed = http(port, "POST", "/session/create", {"userId": "idle", "robotName": "arm"})[1]["sessionId"]
        await asyncio.sleep(1.5)  # reaped meanwhile (GET /sessions does not count as activity)
        assert doomed not in [s["id"] for s in http(port, "GET", "/sessions")[1]["sessions"]]
        created = http(port, "POST", "/session/create", {"userId": "u", "robotName": "arm"})[1]
        conn = await viewer(port, f"/stream/{created['sessionId']}?format=binary&token={created['viewerToken']}")
        await read_frames(conn, 1)  # a viewer keeps it active, so it is not reaped
        fields = session_fields(port, created["sessionId"])
        await asyncio.sleep(0.3)  # one flush interval
        server.process.kill()
        server.process.wait(timeout=EXIT_TIMEOUT)
        conn.close()
        server.stop()

        server = start(tmp_path, port, config)
        assert session_fields(port, created["sessionId"]) == {**fields, "connections": 0}
        assert http(port, "GET", f"/session/{doomed}")[0] == 404
        conn = await viewer(port, f"/stream/{created['sessionId']}?format=binary&token={created['viewerToken']}")
        await read_frames(conn, 2)
        conn.close()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt", "directory", "missing directory", "unwritable"])
def test_unusable_store_is_one_line_and_exit_2(kind):
    # A directory of its own, reachable by `nobody`: as root, permissions are only checked in a
    # process that has dropped them.
    directory = Path(tempfile.mkdtemp(prefix="vsproxy-store-"))
    os.chmod(directory, 0o777)
    path = {"corrupt": "bad.db", "directory": ".", "missing directory": "missing/s.db",
            "unwritable": "readonly.db"}[kind]
    if kind == "corrupt":
        (directory / path).write_bytes(b"\x00garbage" * 512)
    if kind == "unwritable":
        SqliteStore(directory / path).load()
        os.chmod(directory / path, 0o444)
    config = write_config(directory, f"sqlite:{directory / path}")
    os.chmod(directory / config, 0o644)
    args = ["--config", config, "--host", "127.0.0.1", "--port", str(free_port())]
    if kind == "unwritable" and os.geteuid() == 0:
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 sys.executable, "-m", "vsproxy", *args], cwd=directory, env=clean_env(),
                                capture_output=True, text=True, timeout=20)
    else:
        result = run_vsproxy(args, directory)
    assert_one_line_config_error(result, "sessions.store")
    assert SECRET not in result.stderr


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.gen_test(timeout=90)
async def test_embed_player_resumes_by_itself_after_a_restart(tmp_path):
    from browser import chromium
    from test_browser_pages import player_state, wait_page

    port = free_port()
    config = write_config(tmp_path, "sqlite:sessions.db")
    server = start(tmp_path, port, config)
    try:
        created = http(port, "POST", "/session/create", {"userId": "u", "robotName": "arm"})[1]
        async with chromium() as browser:
            page = await browser.new_page()
            # The WebSocket transport: its close on shutdown is immediate (WebRTC notices a server
            # gone only when its connection checks fail, which takes seconds).
            await page.goto(f"http://127.0.0.1:{port}/stream/{created['sessionId']}/embed?transport=ws&token="
                            f"{created['viewerToken']}")
            await wait_page(page, "document.body.dataset.state === 'live'")
            assert server.signal_and_wait(signal.SIGTERM) == 0
            server.stop()
            await wait_page(page, "document.body.dataset.state === 'reconnecting'")
            server = start(tmp_path, port, config)
            frames = (await player_state(page))["frames"]
            await wait_page(page, f"window.vsproxyPlayer.frames > {frames + 10}", timeout=30)
            assert (await player_state(page))["state"] == "live"
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=10)
async def test_a_failed_write_is_logged_once_and_retried(db, caplog):
    caplog.set_level(logging.INFO, "vsproxy.store")
    store = SqliteStore(db, busy_timeout=0.05)
    store.load()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the file longer than the busy timeout
    store.add(record(1))
    await asyncio.wrap_future(store.flush())
    store.update_activity({})
    await asyncio.wrap_future(store.flush())
    assert store.failed
    assert caplog.text.count("cannot write the session store") == 1
    blocker.execute("ROLLBACK")
    blocker.close()
    store.update_activity({})  # e.g. the next flush
    await asyncio.wrap_future(store.flush())
    assert not store.failed and "writable again" in caplog.text
    await store.close()
    store, loaded = await reopen(db)
    assert loaded.records == [record(1)]  # the create was not lost
    await store.close()


@pytest.mark.gen_test(timeout=20)
async def test_sessions_that_come_and_go_while_the_file_cannot_be_written_leave_nothing_to_retry(db):
    """While writes fail, a session created and destroyed meanwhile needs no write at all: what
    waits for the next write stays within the sessions that exist or were destroyed (before, each
    such session kept its create and its destroy, about 400 bytes, for as long as the file was
    unwritable)."""
    store = SqliteStore(db, busy_timeout=0.01)
    store.load()
    store.add(record(1))  # committed: its destroy during the outage must wait
    await asyncio.wrap_future(store.flush())
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    store.remove(record(1).id)
    for n in range(100, 2100):  # created and destroyed while the file is locked
        store.add(record(n))
        store.remove(record(n).id)
        if n % 500 == 0:
            store.update_activity({})  # the flush timer's writes, failing
            await asyncio.wrap_future(store.flush())
    store.add(record(2))  # still there when the file is writable again
    store.update_activity({})
    await asyncio.wrap_future(store.flush())
    assert store.failed
    assert store._retry == [("remove", record(1).id), ("add", dataclasses.astuple(record(2)))]
    blocker.execute("ROLLBACK")
    blocker.close()
    store.update_activity({})
    await asyncio.wrap_future(store.flush())
    assert not store.failed and store._retry == []
    await store.close()
    store, loaded = await reopen(db)
    assert loaded.records == [record(2)]
    await store.close()
