"""Where sessions are kept between restarts: the `SessionStore` protocol and its implementations.

`SessionManager` (vsproxy/sessions.py) keeps the live sessions in memory and tells its store what
changed; the store only persists. `memory` persists nothing (today's behaviour), `sqlite:PATH`
keeps the sessions in a SQLite file so a restarted node answers for them again. A cluster store
(sessions in Redis) is meant to be one more implementation, chosen in `open_store`.

Hot-path calls (`add`, `remove`, `update_activity`) never wait for the disk: they queue the change
for the store's single writer thread, which owns the SQLite connection and commits whatever has
queued up in one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .schema import ConfigError

log = logging.getLogger("vsproxy.store")

STORE_KEY = "sessions.store"  # the config key every start-up error names
APPLICATION_ID = 0x76737078  # "vspx" in the SQLite header: a file we made, not somebody else's database
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SessionRecord:
    """What a store keeps of a session: enough to answer for it again after a restart."""

    id: str
    user_id: str
    robot_name: str
    upstream: str
    created_at: float  # epoch seconds
    last_activity: float  # epoch seconds


@dataclass(frozen=True)
class LoadedSessions:
    """A store's contents at start-up: the sessions and when the previous process was last known
    alive (its last write; None for a new store), so downtime need not count as idleness."""

    records: list[SessionRecord]
    last_alive: float | None


class SessionStore(Protocol):
    """Persistence behind SessionManager. The manager calls these from the event loop; none may
    block it for long (queue the work, or do it in a thread)."""

    persistent: bool  # do sessions outlive this process (then shutdown keeps them)?

    def load(self) -> LoadedSessions:
        """Every stored session; called once, before serving (may block)."""

    def add(self, record: SessionRecord) -> None:
        """A session was created."""

    def remove(self, session_id: str) -> None:
        """A session was destroyed (API, idle reaping): it must not come back."""

    def update_activity(self, activity: Mapping[str, float]) -> None:
        """Sessions' last activity (session ID -> epoch seconds), written in one batch."""

    async def close(self) -> None:
        """Write what is pending and release the store (shutdown)."""


class MemoryStore:
    """Sessions live only in the SessionManager's memory: a restart forgets them."""

    persistent = False

    def load(self) -> LoadedSessions:
        return LoadedSessions([], None)

    def add(self, record: SessionRecord) -> None:
        pass

    def remove(self, session_id: str) -> None:
        pass

    def update_activity(self, activity: Mapping[str, float]) -> None:
        pass

    async def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    robot_name TEXT NOT NULL,
    upstream TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_activity REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""

_STOP = object()


def _still_to_write(ops: list[tuple]) -> list[tuple]:
    """The creates and destroys of a failed write that the next one must make: not a session
    created and destroyed within them (its create was never committed: a session is added once,
    when it is created), so that sessions coming and going while the file cannot be written
    leave nothing behind, and what waits stays within the sessions that exist or were destroyed."""
    created = {args[0] for op, args in ops if op == "add"}
    gone = {args for op, args in ops if op == "remove" and args in created}
    return [(op, args) for op, args in ops
            if op != "activity" and (args[0] if op == "add" else args) not in gone]


class SqliteStore:
    """Sessions in a SQLite file (WAL mode), written by one worker thread that owns the connection.

    Changes queue up and the worker commits each batch it finds in one transaction, so a burst of
    creates costs one commit, and the event loop only ever does a `queue.put`. With WAL and
    `synchronous=NORMAL`, a commit survives the process being killed (kill -9); only a power loss
    may undo the last commits.
    """

    persistent = True

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout  # how long a write waits for another process's lock
        self._retry: list[tuple] = []  # creates and destroys of a failed write, retried with the next
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.commits = 0  # transactions written, for tests and metrics
        self.failed = False

    # -- start-up (synchronous, before serving) ---------------------------------------------

    def load(self) -> LoadedSessions:
        """Open (or create) the file, check it is ours and writable, and read every session.

        Raises ConfigError naming `sessions.store` when the file cannot serve as the store."""
        self._check_path()
        opened: concurrent.futures.Future[LoadedSessions] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="vsproxy-session-store",
                                        daemon=True)
        self._thread.start()
        return opened.result()

    def _check_path(self) -> None:
        path = self.path
        if path.is_dir():
            raise ConfigError(STORE_KEY, f"{str(path)!r} is a directory, not a file")
        if path.exists() and not path.is_file():
            raise ConfigError(STORE_KEY, f"{str(path)!r} is not a regular file")
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(STORE_KEY, f"directory {str(parent)!r} does not exist")
        # SQLite's WAL needs the -wal and -shm files next to the database. Root passes any
        # permission check, so these are only the early, readable form of what SQLite reports.
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(STORE_KEY, f"directory {str(parent)!r} is not writable")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(STORE_KEY, f"{str(path)!r} is not readable and writable")

    def _open(self) -> tuple[sqlite3.Connection, LoadedSessions]:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None,  # transactions written out below
                                   timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise ConfigError(STORE_KEY, f"cannot open {str(self.path)!r} ({exc})") from None
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if app_id != APPLICATION_ID and tables:
                raise ConfigError(STORE_KEY, f"{str(self.path)!r} is a SQLite database of something else, "
                                             "not a vsproxy session store")
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise ConfigError(STORE_KEY, f"{str(self.path)!r} is corrupt (SQLite quick_check failed)")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise ConfigError(STORE_KEY, f"cannot use write-ahead logging on {str(self.path)!r}")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(STORE_KEY, f"{str(self.path)!r} was written by a newer vsproxy "
                                             f"(schema {version}, this one knows {SCHEMA_VERSION})")
            conn.execute("BEGIN IMMEDIATE")  # a write now: an unwritable file fails here, not later
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = conn.execute("SELECT value FROM meta WHERE key = 'last_alive'").fetchone()
            records = [SessionRecord(*r) for r in conn.execute(
                "SELECT id, user_id, robot_name, upstream, created_at, last_activity FROM sessions "
                "ORDER BY created_at")]
            conn.execute("COMMIT")
        except ConfigError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(STORE_KEY, f"cannot use {str(self.path)!r} ({exc})") from None
        return conn, LoadedSessions(records, row[0] if row else None)

    # -- the worker thread --------------------------------------------------------------------

    def _run(self, opened: concurrent.futures.Future) -> None:
        try:
            conn, loaded = self._open()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of load()
            opened.set_exception(exc)
            return
        opened.set_result(loaded)
        try:
            while True:
                batch = [self._queue.get()]
                while True:  # everything queued meanwhile goes into the same transaction
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                waiters = [op for op in batch if isinstance(op, concurrent.futures.Future)]
                ops = [op for op in batch if isinstance(op, tuple)]
                # Nothing queued, nothing written: a flush or close alone does not record this
                # process as the server alive (`vsproxy check` opens and closes the store; a
                # server records it with every activity flush, queued even when empty).
                if ops or self._retry:
                    self._write(conn, ops)
                for waiter in waiters:
                    waiter.set_result(None)
                if any(op is _STOP for op in batch):
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, ops: list[tuple]) -> None:
        ops, self._retry = self._retry + ops, []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, args in ops:
                if op == "add":
                    conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)", args)
                elif op == "remove":
                    conn.execute("DELETE FROM sessions WHERE id = ?", (args,))
                else:  # activity
                    conn.executemany("UPDATE sessions SET last_activity = ? WHERE id = ?", args)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_alive', ?)", (time.time(),))
            conn.execute("COMMIT")
            self.commits += 1
            if self.failed:
                self.failed = False
                log.info("session store %s is writable again", self.path)
        except sqlite3.Error as exc:
            # Serving goes on from memory; the sessions written so far stay in the file.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Creates and destroys are tried again with the next write (the flush timer makes one
            # every few seconds); activity updates are not: the next flush has newer ones.
            self._retry = _still_to_write(ops)
            if not self.failed:
                log.error("cannot write the session store %s: %s (sessions changed now may not survive a "
                          "restart)", self.path, exc)
            self.failed = True

    # -- the event loop's side ----------------------------------------------------------------

    def add(self, record: SessionRecord) -> None:
        self._queue.put(("add", (record.id, record.user_id, record.robot_name, record.upstream,
                                 record.created_at, record.last_activity)))

    def remove(self, session_id: str) -> None:
        self._queue.put(("remove", session_id))

    def update_activity(self, activity: Mapping[str, float]) -> None:
        # Queued even when empty: the commit also records that this process is alive (`last_alive`).
        self._queue.put(("activity", [(when, session_id) for session_id, when in activity.items()]))

    def flush(self) -> concurrent.futures.Future:
        """A future done once everything queued before it is committed (or failed)."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._thread is None or not self._thread.is_alive():
            done.set_result(None)
        else:
            self._queue.put(done)
        return done

    async def close(self) -> None:
        if self._thread is None:
            return
        done = self.flush()
        self._queue.put(_STOP)
        await asyncio.wrap_future(done)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None


def open_store(spec: str) -> SessionStore:
    """The store `sessions.store` names: `memory`, or `sqlite:PATH`; the one place that chooses."""
    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:"):
        return SqliteStore(spec.removeprefix("sqlite:"))
    raise ConfigError(STORE_KEY, f"expected memory or sqlite:PATH, got {spec!r}")
