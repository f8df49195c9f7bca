"""Publish frames to a vsproxy `push` upstream from any Python program (an Isaac Sim script, say).

A synchronous script (Isaac Sim standalone scripts are) uses `Publisher`, which keeps its own
thread with an event loop and a WebSocket to `ws://<vsproxy>/ingest/<upstream>`::

    from vsproxy.publish import Publisher

    with Publisher("ws://127.0.0.1:8889/ingest/replicator", token="secret-token-1") as pub:
        while simulation_app.is_running():
            world.step(render=True)
            pub.publish_rgb(annotator.get_data())   # HxWx3/4 uint8 array or PIL image
            # or: pub.publish(jpeg_bytes)

`publish` and `publish_rgb` never block on the network and never queue without bound: at most
`max_pending` frames wait (default 1, the newest); an older one is dropped, and counted in
`frames_dropped`, when the connection is slow or down. The connection is retried with
exponential backoff (with jitter) for as long as the publisher is open. `publish_rgb` only copies
the pixels in the caller's thread; the JPEG encoding happens in the publisher's thread, and only
for frames that are actually sent.

Leaving the `with` block, or `close()`, sends what is still pending first: it waits at most
`timeout` seconds (default 5; connecting first if need be), then at most 1 s more for the close
handshake, so it never hangs on an unreachable proxy. What is still unsent then is dropped,
counted in `frames_dropped` / `texts_dropped` and logged. A `with` block left by an exception
closes at once.

Two ways: `send_text(text)` sends a text message (telemetry) that the upstream's WebSocket viewers
get unchanged; `on_message(text)`, an option, is called with every text message the server sends:
`{"type": "status", "active": bool}`, `{"type": "error", "message": ...}`, and each viewer's
message as `{"type": "viewer", "data": "<the viewer's text>"}`.

Inside an asyncio program use `AsyncPublisher` (same options, same counters)::

    async with AsyncPublisher("ws://127.0.0.1:8889/ingest/replicator", token=TOKEN) as pub:
        pub.publish(jpeg_bytes)

The token goes in an `Authorization: Bearer` header, never in the URL, and is never logged.
The server tells the publisher whether anyone is watching (`active`: True while the upstream
has sessions); a script may skip rendering or encoding while it is False. Counters:
`frames_published` (handed to publish), `frames_sent`, `frames_dropped`, `texts_sent`,
`texts_dropped`, `connects`; `connected`, `active`, `last_error` describe the current state.

Refused connections, timeouts and answers that may change (503, 409 while another publisher holds
the upstream) are retried. An answer that retrying will not change (400, 401 missing or wrong
token, 403, 404 no push upstream of that name, 405 not the WebSocket endpoint) stops the
publisher: `refused` holds a `PublishRefused`, which publish, publish_rgb, send_text, flush,
wait_connected and close raise from then on.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .auth import redact_url
from .render import with_capture_time

__all__ = ["AsyncPublisher", "Publisher", "PublishRefused", "encode_rgb"]

log = logging.getLogger("vsproxy.publish")

# Answers to the WebSocket handshake that retrying will not change (see PublishRefused); any other
# failure (refused, timed out, 409 another publisher, 503, a lost connection) is retried.
PERMANENT_REFUSALS = frozenset({400, 401, 403, 404, 405})
CLOSE_HANDSHAKE_SECONDS = 1.0  # how long close() waits for the server's answer to its close frame
USAGE = ("from vsproxy.publish import Publisher  (a library, not a program: see README.md, \"Publishing from "
         "a script\"; a runnable publisher: examples/publish_test_pattern.py --help)")


class PublishRefused(Exception):
    """The proxy refused the publisher with an answer that retrying will not change.

    HTTP 401 (missing or wrong token), 404 (no push upstream of that name), 405 (not the WebSocket
    endpoint, e.g. a .../frame URL), 400 or 403. The publisher has stopped; `status` is the HTTP
    status. publish, publish_rgb, send_text, flush, wait_connected and close raise it from then on.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def ingest_ws_url(url: str) -> str:
    """http(s):// becomes ws(s)://; ws(s):// stays. The URL names the upstream: .../ingest/<name>."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        shown = redact_url(url)
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {shown!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def to_rgb_image(image: Any) -> Any:
    """A PIL RGB (or L) image that owns its pixels, from a PIL image or an HxW[x3|x4] uint8 array.

    Arrays are anything with the numpy array interface (numpy is not required by this module);
    an alpha channel is dropped. The result is a copy, so the caller may reuse its buffer.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.copy() if image.mode in ("RGB", "L") else image.convert("RGB")
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"expected a PIL image or an HxWx3/HxWx4 uint8 array, got {type(image).__name__}")
    if str(dtype) != "uint8":
        raise TypeError(f"expected a uint8 array, got dtype {dtype}")
    shape = tuple(shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4))):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {shape}")
    if len(shape) == 3 and shape[2] == 4:
        return Image.fromarray(image).convert("RGB")
    converted = Image.fromarray(image)
    return converted.copy() if converted.readonly else converted  # fromarray may share the buffer


def encode_rgb(image: Any, quality: int = 80) -> bytes:
    """JPEG bytes of a PIL image or an HxWx3/4 uint8 array (Pillow)."""
    return _encode(to_rgb_image(image), quality)


def _encode(image: Any, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class _EncodeJob:
    """A frame handed to publish_rgb: pixels copied, encoded only if it is ever sent."""

    __slots__ = ("image", "quality", "captured")

    def __init__(self, image: Any, quality: int, captured: float) -> None:
        self.image = image
        self.quality = quality
        self.captured = captured

    def encode(self) -> bytes:
        return with_capture_time(_encode(self.image, self.quality), self.captured)


class AsyncPublisher:
    """A WebSocket publisher on the running asyncio loop; see the module docstring.

    `publish` / `publish_rgb` / `send_text` may be called from any thread. `on_message(text)` is
    called (on the loop) with every text message the server sends: status, errors, and viewers'
    messages as {"type": "viewer", "data": "<the viewer's text>"}.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        max_pending: int = 1,
        initial_backoff: float = 0.5,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        ping_interval: float = 10.0,
        on_message: Callable[[str], None] | None = None,
        max_pending_texts: int = 64,
    ) -> None:
        if max_pending < 1 or max_pending_texts < 1:
            raise ValueError("max_pending and max_pending_texts must be at least 1")
        if not token:
            raise ValueError("a publish token is required")
        self.url = ingest_ws_url(url)
        self._token = token
        self.max_pending = max_pending
        self.max_pending_texts = max_pending_texts
        self.initial_backoff = initial_backoff
        self.max_backoff = max(max_backoff, initial_backoff)
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.on_message = on_message
        # State; the counters are only ever increased.
        self.frames_published = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_refused = 0  # frames the server answered with an error message
        self.texts_sent = 0
        self.texts_dropped = 0
        self.connects = 0
        self.connected = False
        self.active: bool | None = None  # does the server want frames? None until it says
        self.last_error: str | None = None
        self.refused: PublishRefused | None = None  # set when a permanent refusal stopped the publisher
        self.changed = threading.Condition()  # notified when connected, refused or closed (Publisher waits)
        self._pending: deque[bytes | _EncodeJob] = deque()
        self._texts: deque[str] = deque()  # text messages (telemetry) waiting, sent before frames
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._conn: WebSocketClientConnection | None = None
        self._conn_closed: asyncio.Future | None = None  # resolved when the current connection closes
        self._closing = False
        self._sending = False
        self._last_logged_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (call on the loop that should run it); `async with` does this."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, then close the connection and stop reconnecting.

        Waits at most `timeout` seconds for the pending frames and texts to be sent (connecting
        first if need be; 0: no wait), then at most CLOSE_HANDSHAKE_SECONDS (1 s) for the close
        handshake. What is still pending then is dropped, counted and logged. Raises
        PublishRefused if the proxy refused the publisher (see `refused`).
        """
        if timeout > 0 and self._task is not None and not self._closing:
            try:
                await self.flush(timeout)
            except PublishRefused:
                pass
        await self._shutdown()
        self._raise_if_refused()

    async def _shutdown(self) -> None:
        """Close at once: pending frames and texts are dropped (counted, logged)."""
        self._closing = True
        self._notify()
        conn, closed = self._conn, self._conn_closed
        if conn is not None:
            conn.close(1000, "publisher closed")
            if closed is not None:  # a moment for the close handshake, so the server sees a clean close
                try:
                    await asyncio.wait_for(asyncio.shield(closed), CLOSE_HANDSHAKE_SECONDS)
                except asyncio.TimeoutError:
                    pass
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        frames, texts = self._drop_pending()
        if frames or texts:
            log.warning("publisher closed with %d frame(s) and %d text message(s) not sent (%s)",
                        frames, texts, self.last_error or "still connecting")

    def _drop_pending(self) -> tuple[int, int]:
        """Drop every pending frame and text, counted as dropped; how many of each."""
        with self._lock:
            frames, texts = len(self._pending), len(self._texts)
            self._pending.clear()
            self._texts.clear()
            self.frames_dropped += frames
            self.texts_dropped += texts
        return frames, texts

    async def __aenter__(self) -> AsyncPublisher:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:  # the block failed: close at once, and its exception is the one the caller sees
            await self._shutdown()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every pending frame and text is sent (True) or `timeout` passes (False),
        connecting first if need be. Raises PublishRefused if the proxy refused the publisher."""
        deadline = time.monotonic() + timeout
        while (done := self.flushed(deadline)) is None:
            await asyncio.sleep(0.005)
        return done

    def flushed(self, deadline: float) -> bool | None:
        """flush's test: True when all is sent, False when it is time to give up (`deadline`, a
        time.monotonic() value, passed, or the publisher is closed), None: keep waiting."""
        self._raise_if_refused()
        if self.idle:
            return True
        if self._closing or time.monotonic() >= deadline:
            return False
        return None

    def _raise_if_refused(self) -> None:
        if self.refused is not None:
            raise self.refused

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    @property
    def pending(self) -> int:
        """Frames waiting to be sent (at most max_pending)."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing being sent."""
        with self._lock:
            return not self._pending and not self._texts and not self._sending

    # -- publishing (any thread) ------------------------------------------------------------

    def publish(self, jpeg: bytes | bytearray | memoryview, captured: float | None = None) -> None:
        """Queue one JPEG frame for sending (copied); never blocks. Older waiting frames beyond
        `max_pending` are dropped. `captured` (Unix seconds; default: now) travels with the frame,
        so the proxy measures frame age from the capture (`vsproxy_frame_age_seconds`)."""
        self._put(with_capture_time(bytes(jpeg), time.time() if captured is None else captured))

    def publish_rgb(self, image: Any, quality: int = 80, captured: float | None = None) -> None:
        """Queue a PIL image or an HxWx3/HxWx4 uint8 array, JPEG-encoded (`quality`) when sent;
        `captured` as for `publish`."""
        if not 1 <= quality <= 100:
            raise ValueError("quality must be from 1 to 100")
        self._put(_EncodeJob(to_rgb_image(image), quality, time.time() if captured is None else captured))

    def send_text(self, text: str) -> None:
        """Queue a text message (telemetry, e.g. JSON) for the upstream's WebSocket viewers, who get
        it unchanged; never blocks. Texts are sent in order, before waiting frames; at most
        `max_pending_texts` wait while the connection is slow or down (older ones are dropped and
        counted in `texts_dropped`). The server does not relay a text larger than its
        `streaming.max_viewer_message_bytes` (64 KiB by default): it answers an error message."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}; frames go to publish()")
        self._put(text)

    def _put(self, item: str | bytes | _EncodeJob) -> None:
        with self._lock:
            self._raise_if_refused()
            if self._closing:
                return
            if isinstance(item, str):
                while len(self._texts) >= self.max_pending_texts:
                    self._texts.popleft()
                    self.texts_dropped += 1
                self._texts.append(item)
            else:
                while len(self._pending) >= self.max_pending:
                    self._pending.popleft()
                    self.frames_dropped += 1
                self._pending.append(item)
                self.frames_published += 1
            schedule = not self._wake_scheduled
            self._wake_scheduled = True
        if schedule:
            self._schedule_wake()

    def _schedule_wake(self) -> None:
        loop = self._loop
        if loop is None:
            return  # not started yet: the sender looks at the queue when it starts
        if threading.get_ident() == self._loop_thread:
            self._on_wake()
        else:
            try:
                loop.call_soon_threadsafe(self._on_wake)
            except RuntimeError:  # the loop is closed: the publisher is gone
                pass

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        if self._wake is not None:
            self._wake.set()

    def _take(self) -> str | bytes | _EncodeJob | None:
        """The next thing to send (a text first), marked as being sent (see idle); None: nothing."""
        with self._lock:
            queue = self._texts or self._pending
            if not queue:
                return None
            self._sending = True
            return queue.popleft()

    def _put_back(self, data: str | bytes) -> None:
        # A text that could not be sent goes first again, room permitting; a frame stays the one
        # to send, unless a newer one is waiting.
        with self._lock:
            if isinstance(data, str):
                if len(self._texts) < self.max_pending_texts:
                    self._texts.appendleft(data)
                else:
                    self.texts_dropped += 1
            elif not self._pending:
                self._pending.append(data)
            else:
                self.frames_dropped += 1

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.initial_backoff
        assert self._wake is not None
        while not self._closing:
            closed = self._conn_closed = asyncio.get_running_loop().create_future()
            try:
                conn = await websocket_connect(
                    HTTPRequest(self.url, headers={"Authorization": f"Bearer {self._token}"},
                                connect_timeout=self.connect_timeout, request_timeout=self.connect_timeout),
                    on_message_callback=functools.partial(self._on_server_message, closed=closed),
                    ping_interval=self.ping_interval or None,
                    ping_timeout=self.ping_interval or None,  # Tornado caps it at the interval
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, unreachable, timed out: retry
                reason = _describe_connect_error(exc)
                if isinstance(exc, HTTPClientError) and exc.code in PERMANENT_REFUSALS:
                    self._stop_refused(exc.code, reason)
                    return
            else:
                reason = await self._connected(conn)
                delay = self.initial_backoff
            if self._closing:
                break
            self.last_error = reason
            wait = delay * random.uniform(0.5, 1.0)
            level = logging.DEBUG if reason == self._last_logged_error else logging.WARNING
            self._last_logged_error = reason
            shown = redact_url(self.url)
            log.log(level, "publisher: %s (%s); retrying in %.2f s", reason, shown, wait)
            await self._sleep(wait)
            delay = min(delay * 2, self.max_backoff)

    def _stop_refused(self, status: int, reason: str) -> None:
        """A permanent refusal: stop, drop what is pending, and say so (publish etc. raise it)."""
        message = f"{reason} ({redact_url(self.url)}); the publisher stopped: retrying would not change the answer"
        if status == 405:
            message += ". Publish over WebSocket to ws://HOST:PORT/ingest/UPSTREAM (.../frame takes POSTed frames)"
        self.last_error = reason
        with self._lock:
            self.refused = PublishRefused(status, message)
        self._drop_pending()
        self._notify()
        log.error("publisher: %s", self.refused)

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.1))

    async def _connected(self, conn: WebSocketClientConnection) -> str:
        """Send frames until the connection closes; the reason it closed."""
        self._conn = conn
        self.connects += 1
        self.connected = True
        self.last_error = None
        self._last_logged_error = None
        self._notify()
        log.info("publisher connected to %s", redact_url(self.url))
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                wake.clear()
                if self._conn is None or self._closing:
                    break
                item = self._take()
                if item is None:
                    await wake.wait()
                    continue
                try:
                    data = item if isinstance(item, (str, bytes)) else await loop.run_in_executor(None, item.encode)
                    try:
                        await conn.write_message(data, binary=isinstance(data, bytes))
                    except (WebSocketClosedError, StreamClosedError):
                        self._put_back(data)
                        break
                    if isinstance(data, str):
                        self.texts_sent += 1
                    else:
                        self.frames_sent += 1
                finally:
                    self._sending = False
        finally:
            self.connected = False
            self._conn = None
            conn.close()
        if conn.close_code is not None:
            why = f" ({conn.close_reason})" if conn.close_reason else ""
            return f"connection closed by the server: code {conn.close_code}{why}"
        return "connection lost"

    def _on_server_message(self, message: str | bytes | None, closed: asyncio.Future) -> None:
        if message is None:  # this connection closed
            if not closed.done():
                closed.set_result(None)
            if self._conn_closed is closed:
                self._conn = None
            if self._wake is not None:
                self._wake.set()
            return
        if isinstance(message, bytes):
            return  # nothing binary is expected from the server
        try:
            parsed = json.loads(message)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            if parsed.get("type") == "status" and isinstance(parsed.get("active"), bool):
                self.active = parsed["active"]
            elif parsed.get("type") == "error":
                self.frames_refused += 1
                error = str(parsed.get("message"))
                self.last_error = error
                if error != self._last_logged_error:
                    self._last_logged_error = error
                    log.warning("publisher: the server says: %s", error)
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                log.exception("publisher: on_message callback failed")


def _describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, HTTPClientError):
        error = None
        body = exc.response.body if exc.response is not None else b""
        try:
            error = json.loads(body).get("error") if body else None
        except (ValueError, AttributeError):
            pass
        return f"refused: HTTP {exc.code}" + (f": {error}" if error else "")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "connect timed out"
    text = str(exc).strip()
    return f"cannot connect: {type(exc).__name__}" + (f": {text}" if text else "")


class Publisher:
    """`AsyncPublisher` on its own thread and event loop, for synchronous programs.

    Example (an Isaac Sim standalone script; see examples/isaac_camera_publisher.py)::

        pub = Publisher("ws://127.0.0.1:8889/ingest/replicator", "secret-token-1",
                        on_message=print)  # status messages and viewers' input, on the publisher's thread
        pub.wait_connected(5)          # optional; publish() works (and drops) while disconnected
        for step in range(1000):
            world.step(render=True)
            if pub.active is not False:    # skip the work while no viewer session exists
                pub.publish_rgb(annotator.get_data(), quality=80)
                pub.send_text(json.dumps({"type": "telemetry", "step": step}))  # to the viewers
        pub.close()                    # sends what is pending first (at most 5 s, then 1 s to close)

    or `with Publisher(...) as pub: ...`. Every method may be called from any thread.
    `on_message` runs on the publisher's thread: keep it short (an exception in it is logged).
    """

    def __init__(self, url: str, token: str, *, max_pending: int = 1, **options: Any) -> None:
        self._core = AsyncPublisher(url, token, max_pending=max_pending, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(started,), name="vsproxy-publisher", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the publisher thread did not start")

    def _main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._amain(started))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _amain(self, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        self._core.start()
        started.set()
        await self._stop.wait()
        await self._core._shutdown()  # the caller's thread has flushed (close) or chose not to

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, jpeg: bytes | bytearray | memoryview, captured: float | None = None) -> None:
        """Queue one JPEG frame; never blocks (see AsyncPublisher.publish)."""
        self._core.publish(jpeg, captured)

    def publish_rgb(self, image: Any, quality: int = 80, captured: float | None = None) -> None:
        """Queue a PIL image or an HxWx3/4 uint8 array; encoded to JPEG on the publisher thread."""
        self._core.publish_rgb(image, quality, captured)

    def send_text(self, text: str) -> None:
        """Queue a text message (telemetry) for the upstream's WebSocket viewers; never blocks
        (see AsyncPublisher.send_text)."""
        self._core.send_text(text)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or `timeout` seconds pass (False). Raises PublishRefused
        as soon as the proxy refuses the publisher for good (a wrong token, say)."""
        core = self._core
        with core.changed:
            core.changed.wait_for(lambda: core.connected or core.refused is not None or core._closing, timeout)
        core._raise_if_refused()
        return core.connected

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every pending frame and text is sent (True) or `timeout` passes (False),
        connecting first if need be. Raises PublishRefused if the proxy refused the publisher."""
        deadline = time.monotonic() + timeout
        while (done := self._core.flushed(deadline)) is None:
            time.sleep(0.005)
        return done

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, then close the connection and stop the publisher's thread.

        Waits at most `timeout` seconds for the pending frames and texts to be sent (connecting
        first if need be; 0: no wait), then at most 1 s for the close handshake; what is still
        pending then is dropped, counted and logged. Raises PublishRefused if the proxy refused
        the publisher (see `refused`).
        """
        if timeout > 0:
            try:
                self.flush(timeout)
            except PublishRefused:
                pass
        self._stop_thread()
        self._core._raise_if_refused()

    def _stop_thread(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        self._thread.join(CLOSE_HANDSHAKE_SECONDS + 4)  # a bound only: closing takes at most about 1 s

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the block failed: close at once, and its exception is the one the caller sees
            self._stop_thread()

    # -- state (see AsyncPublisher) -----------------------------------------------------------

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def connected(self) -> bool:
        return self._core.connected

    @property
    def active(self) -> bool | None:
        return self._core.active

    @property
    def last_error(self) -> str | None:
        return self._core.last_error

    @property
    def refused(self) -> PublishRefused | None:
        return self._core.refused

    @property
    def connects(self) -> int:
        return self._core.connects

    @property
    def frames_published(self) -> int:
        return self._core.frames_published

    @property
    def frames_sent(self) -> int:
        return self._core.frames_sent

    @property
    def frames_dropped(self) -> int:
        return self._core.frames_dropped

    @property
    def frames_refused(self) -> int:
        return self._core.frames_refused

    @property
    def texts_sent(self) -> int:
        return self._core.texts_sent

    @property
    def texts_dropped(self) -> int:
        return self._core.texts_dropped

    @property
    def pending(self) -> int:
        return self._core.pending

    @property
    def max_pending(self) -> int:
        return self._core.max_pending


def main(argv: list[str]) -> int:
    """`python -m vsproxy.publish`: there is no program here, only a library; say where to look."""
    asked = argv in (["-h"], ["--help"])
    print(f"usage: {USAGE}", file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
