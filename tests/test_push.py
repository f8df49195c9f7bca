"""The push upstream end to end: publishers (vsproxy.publish, raw WebSockets, POST) -> vsproxy ->
viewers, over real loopback sockets, no mocks.

`Publisher` runs its own thread and event loop; the test's Tornado loop serves the proxy, so
every wait here polls with asyncio.sleep (never blocks the loop), and closing a Publisher (a
thread join) runs in an executor.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.websocket
from helpers import CONNECTED, next_message, small_buffer_ws, wait_until, write_buffer_bytes
from PIL import Image
from tornado.httpclient import HTTPClientError, HTTPRequest

from vsproxy import render
from vsproxy.logs import TextFormatter
from vsproxy.publish import AsyncPublisher, Publisher, PublishRefused
from vsproxy.sources.push import PushSource

TOKEN = "secret-token-1"
WRONG = "wrong-token-9"
MAX_FRAME = 65536
PUSH_CONFIG = {
    "upstreams": {"replicator": {"kind": "push", "token": TOKEN, "max_frame_bytes": MAX_FRAME}},
    "default_upstream": "replicator",
}
pytestmark = pytest.mark.config(PUSH_CONFIG)
WAIT = 10.0


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    pattern = render.TestPattern(160, 120, "push test")
    out = [pattern.render(i, wall_time=1_700_000_000 + i) for i in range(20)]
    assert len(set(out)) == len(out) and all(len(f) < MAX_FRAME for f in out)
    return out


@pytest.fixture
def hub(proxy):
    return proxy.hubs["replicator"]


@pytest.fixture
def ingest_url(http_server, http_port) -> str:
    return f"ws://127.0.0.1:{http_port}/ingest/replicator"


@pytest.fixture
def publishers(io_loop, http_server):
    """`make(url, token, **options)`: a Publisher that is closed at teardown at the latest (while
    the server still runs, so the close handshake completes)."""
    made: list[Publisher] = []

    def make(url: str, token: str = TOKEN, **options: Any) -> Publisher:
        options.setdefault("initial_backoff", 0.05)
        options.setdefault("max_backoff", 0.3)
        pub = Publisher(url, token, **options)
        made.append(pub)
        return pub

    yield make

    async def close_all() -> None:
        for pub in made:
            try:
                await close_publisher(pub)
            except PublishRefused:  # a test's refused publisher: what it had to say was checked there
                pass

    io_loop.run_sync(close_all, timeout=20)


async def close_publisher(pub: Publisher) -> None:
    await asyncio.get_running_loop().run_in_executor(None, pub.close)


class ViewerLog:
    """A binary WebSocket viewer whose messages are collected in the background."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.frames: list[bytes] = []
        self.texts: list[dict] = []
        self.closed = False
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.conn.read_message()
            if message is None:
                self.closed = True
                return
            if isinstance(message, bytes):
                self.frames.append(message)
            else:
                self.texts.append(json.loads(message))

    def known(self, published: list[bytes]) -> list[bytes]:
        """The frames that are among `published` (not offline pictures), in arrival order."""
        wanted = set(published)
        return [f for f in self.frames if f in wanted]

    def has_text(self, predicate: Callable[[dict], bool]) -> bool:
        return any(predicate(t) for t in self.texts)


async def open_viewer(api, ws_connect) -> ViewerLog:
    session = await api.create_session()
    conn = await ws_connect(f"/stream/{session['sessionId']}?format=binary")
    first = await next_message(conn, WAIT)
    assert json.loads(first) == CONNECTED
    return ViewerLog(conn)


async def raw_publisher(ws_connect, path: str = "/ingest/replicator", token: str | None = TOKEN,
                        via: str = "header") -> tornado.websocket.WebSocketClientConnection:
    headers = {}
    if token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        path += f"?token={token}"
    return await ws_connect(path, headers=headers)


async def ws_refusal(ws_connect, path: str = "/ingest/replicator", **kwargs: Any) -> tuple[int, dict]:
    """The status and JSON body of a refused WebSocket handshake."""
    with pytest.raises(HTTPClientError) as info:
        await raw_publisher(ws_connect, path, **kwargs)
    response = info.value.response
    assert response is not None
    assert response.headers["Content-Type"].startswith("application/json")
    return info.value.code, json.loads(response.body)


async def post_frame(api, body: bytes, *, token: str | None = TOKEN, via: str = "header",
                     path: str = "/ingest/replicator/frame") -> tuple[int, Any]:
    headers = {"Content-Type": "image/jpeg"}
    if token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        path += f"?token={token}"
    code, parsed, _ = await api.call("POST", path, headers=headers, raw=body)
    return code, parsed


def lost_message(text: dict) -> bool:
    return text["type"] == "error" and "lost" in text["message"] and "publisher disconnected" in text["message"]


def readme_block(path: str, after: str, replacements: dict[str, str]) -> str:
    """The first ```python block after `after` in a README of the repository, with `replacements`
    made (each must be there: a test of a snippet notices when the snippet changes)."""
    text = (Path(__file__).resolve().parent.parent / path).read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    code = text[start:text.index("```", start)]
    for old, new in replacements.items():
        assert old in code, (path, old, code)
        code = code.replace(old, new)
    return code


def refused_port() -> int:
    """A loopback port nothing listens on: a proxy that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg_of_size(size: int) -> bytes:
    """A byte string that passes the SOI/EOI check, of exactly `size` bytes."""
    return b"\xff\xd8" + b"\x00" * (size - 4) + b"\xff\xd9"


# -- the publisher library ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_publisher_frames_reach_a_binary_viewer_byte_identical_and_in_order(
        api, ws_connect, ingest_url, publishers, hub, frames):
    viewer = await open_viewer(api, ws_connect)
    pub = publishers(ingest_url, max_pending=len(frames))
    await wait_until(lambda: pub.connected and hub.connected, "the publisher to attach")
    await wait_until(lambda: pub.active is True, "the server to say viewers are waiting")
    # One at a time: every frame reaches the viewer, byte-identical.
    half = len(frames) // 2
    for i, frame in enumerate(frames[:half]):
        pub.publish(frame)
        await wait_until(lambda i=i: len(viewer.known(frames)) == i + 1, f"frame {i} at the viewer")
    assert viewer.known(frames) == frames[:half]
    # A burst: the publisher queues (max_pending) and sends them all, in order; the hub gets every
    # one, and the viewer the newest whenever its socket can take one (the hub's latest-frame-wins).
    seq_before = hub.seq
    for frame in frames[half:]:
        pub.publish(frame)
    await wait_until(lambda: viewer.known(frames)[-1:] == frames[-1:], "the burst's last frame at the viewer")
    received = viewer.known(frames)
    assert received[:half] == frames[:half]
    positions = [frames.index(f) for f in received]
    assert positions == sorted(set(positions)), positions  # in order, none twice
    assert hub.seq - seq_before == len(frames) - half and hub.latest.jpeg == frames[-1]
    assert pub.frames_sent == len(frames) and pub.frames_dropped == 0 and pub.pending == 0
    assert hub.status()["kind"] == "push" and hub.status()["state"] == "connected"
    assert viewer.has_text(lambda t: t == {"type": "status", "message": "\u2705 Connected to upstream 'replicator'"})
    await close_publisher(pub)
    await wait_until(lambda: hub.state == "retrying", "the hub to mark the publisher lost")
    await wait_until(lambda: viewer.has_text(lost_message), "the viewers to be told")
    # Then what they wait for: a publisher, not a reconnect (there is nothing to reconnect to).
    waiting = {"type": "status", "message": "Waiting for a publisher of upstream 'replicator'"}
    await wait_until(lambda: viewer.has_text(lambda t: t == waiting), "the viewers to be told what they wait for")
    assert not viewer.has_text(lambda t: "Reconnecting" in t.get("message", ""))
    assert hub.describe_state().endswith("; waiting for its publisher"), hub.describe_state()


@pytest.mark.gen_test(timeout=40)
async def test_publish_rgb_accepts_arrays_and_pil_images(api, ws_connect, ingest_url, publishers, hub):
    import numpy  # a test dependency (setup.py "test" extra): the array path must be exercised
    viewer = await open_viewer(api, ws_connect)
    pub = publishers(ingest_url, max_pending=4)
    await wait_until(lambda: pub.connected and hub.connected, "the publisher to attach")
    sizes = ((64, 48), (40, 30), (20, 10))

    def sized() -> list[bytes]:
        return [f for f in viewer.frames if render.jpeg_size(f) in sizes]

    rgba = numpy.zeros((48, 64, 4), dtype=numpy.uint8)
    rgba[..., 0] = 255  # red, alpha 0: the alpha channel is dropped
    pub.publish_rgb(rgba, quality=90)
    rgba[...] = 0  # the caller may reuse its buffer at once: the publisher copied the pixels
    await wait_until(lambda: len(sized()) == 1, "the array with alpha at the viewer")
    pub.publish_rgb(numpy.full((30, 40, 3), 128, dtype=numpy.uint8))
    await wait_until(lambda: len(sized()) == 2, "the RGB array at the viewer")
    pub.publish_rgb(Image.new("RGB", (20, 10), (0, 0, 255)))
    await wait_until(lambda: len(sized()) == 3, "the PIL image at the viewer")
    assert pub.frames_sent == 3
    got = sized()
    assert [render.jpeg_size(f) for f in got] == [(64, 48), (40, 30), (20, 10)]
    red = Image.open(io.BytesIO(got[0])).convert("RGB").getpixel((32, 24))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    with pytest.raises(TypeError):
        pub.publish_rgb(numpy.zeros((4, 4, 3), dtype=numpy.float32))
    with pytest.raises(ValueError):
        pub.publish_rgb(numpy.zeros((4, 4, 2), dtype=numpy.uint8))


@pytest.mark.gen_test(timeout=40)
async def test_async_publisher_on_the_callers_loop(api, ws_connect, ingest_url, hub, frames):
    viewer = await open_viewer(api, ws_connect)
    messages: list[str] = []
    async with AsyncPublisher(ingest_url, TOKEN, max_pending=len(frames), initial_backoff=0.05,
                              on_message=messages.append) as pub:
        await wait_until(lambda: pub.connected and hub.connected, "the publisher to attach")
        for i, frame in enumerate(frames[:5]):
            pub.publish(frame)
            await wait_until(lambda i=i: len(viewer.known(frames)) == i + 1, f"frame {i} at the viewer")
        assert viewer.known(frames) == frames[:5]
        # A viewer's message goes to the publisher; a publisher's text goes to the viewers.
        await viewer.conn.write_message('{"type": "command", "action": "reset"}')
        relayed = {"type": "viewer", "data": '{"type": "command", "action": "reset"}'}  # never mistaken
        await wait_until(lambda: relayed in [json.loads(m) for m in messages], "the viewer's message")
        assert any(json.loads(m).get("active") is True for m in messages)
        pub.publish(frames[5])  # the last thing in the block: leaving it sends it
    assert pub.frames_sent == 6 and pub.frames_dropped == 0
    await wait_until(lambda: viewer.known(frames) == frames[:6], "the block's last frame at the viewer")
    await wait_until(lambda: hub.state == "retrying", "the hub to mark the publisher lost")


@pytest.mark.gen_test(timeout=60)
async def test_publisher_keeps_only_the_newest_frame_while_down_and_reconnects(
        api, ws_connect, ingest_url, publishers, hub, proxy, frames):
    viewer = await open_viewer(api, ws_connect)
    # Another publisher holds the upstream: the library is refused (409) and keeps retrying.
    blocker = await raw_publisher(ws_connect)
    pub = publishers(ingest_url, max_pending=1)
    await wait_until(lambda: pub.last_error and "409" in pub.last_error, "the library to be refused with 409")
    assert not pub.connected
    for i, frame in enumerate(frames):
        pub.publish(frame)
        assert pub.pending == 1  # bounded: only the newest frame waits
        assert pub.frames_dropped == i
    assert pub.frames_published == len(frames) and pub.frames_sent == 0
    blocker.close()
    await wait_until(lambda: pub.connected, "the library to connect once the slot is free")
    await wait_until(lambda: viewer.known(frames) == [frames[-1]], "the newest frame at the viewer")
    assert pub.connects == 1 and pub.frames_sent == 1 and pub.frames_dropped == len(frames) - 1
    await asyncio.sleep(0.2)
    assert viewer.known(frames) == [frames[-1]]  # none of the dropped frames arrived late

    # The server closes the publisher's connection: the hub shows the loss, the library reconnects.
    source = hub.source
    assert isinstance(source, PushSource)
    assert source.disconnect("test says goodbye")
    await wait_until(lambda: pub.connects == 2 and pub.connected, "the library to reconnect")
    await wait_until(lambda: hub.connected, "the hub to show the publisher again")
    assert viewer.has_text(lost_message)
    assert sum(t == {"type": "status", "message": "\u2705 Connected to upstream 'replicator'"}
               for t in viewer.texts) >= 2
    pub.publish(frames[0])
    await wait_until(lambda: viewer.known(frames) == [frames[-1], frames[0]], "a frame after the reconnect")
    assert hub.connects == 3  # the blocker, the library, the library again


@pytest.mark.gen_test(timeout=60)
async def test_the_readme_snippets_deliver_their_frames_when_the_with_block_ends(
        api, ws_connect, http_port, hub, frames):
    """The README's and examples/README's snippets, as written: leaving the `with` block connects
    and sends what was published (it used to drop it: frames_sent 0, the snapshot 503)."""
    import numpy
    viewer = await open_viewer(api, ws_connect)
    session = (await api.create_session())["sessionId"]
    loop = asyncio.get_running_loop()
    address = {"127.0.0.1:8889": f"127.0.0.1:{http_port}"}
    rgb_array = numpy.zeros((48, 64, 3), dtype=numpy.uint8)
    snippets = [
        readme_block("README.md", "Publishing from a script:",
                     {**address, '"<the upstream\'s publish token>"': repr(TOKEN)}),
        readme_block("examples/README.md", "## The publisher library", address),  # publish, then publish_rgb
    ]
    for code in snippets:
        names: dict[str, Any] = {"jpeg_bytes": frames[3], "token": TOKEN, "rgb_array": rgb_array}
        started = time.monotonic()
        await loop.run_in_executor(None, exec, code, names)  # blocking: the proxy runs on this loop
        took = time.monotonic() - started
        pub = names["pub"]
        assert pub.frames_sent >= 1 and pub.frames_sent + pub.frames_dropped == pub.frames_published
        assert pub.pending == 0 and not pub.connected and took < 5, took
        code, _, _ = await api.call("GET", f"/stream/{session}/snapshot.jpg")
        assert code == 200  # a frame came (the publisher has left: the offline picture, as after any)
    # The viewer got the README's frame byte for byte, and the newest of the second snippet (the array).
    await wait_until(lambda: viewer.known(frames[3:4]) == frames[3:4], "the README's frame at the viewer")
    await wait_until(lambda: any(render.jpeg_size(f) == (64, 48) for f in viewer.frames), "the array at the viewer")
    assert hub.connects == 2


@pytest.mark.gen_test(timeout=40)
async def test_closing_gives_up_on_an_unreachable_proxy_in_its_timeout_and_says_so(frames, caplog):
    loop = asyncio.get_running_loop()
    pub = Publisher(f"ws://127.0.0.1:{refused_port()}/ingest/replicator", TOKEN,
                    initial_backoff=0.05, max_backoff=0.2)
    pub.publish(frames[0])
    started = time.monotonic()
    await loop.run_in_executor(None, functools.partial(pub.close, timeout=0.8))
    took = time.monotonic() - started
    assert 0.7 < took < 3, took  # tried (and retried: refused is transient) until the timeout, no longer
    assert pub.refused is None and pub.last_error.startswith("cannot connect")
    assert pub.frames_sent == 0 and pub.frames_dropped == 1 and pub.pending == 0
    assert "publisher closed with 1 frame(s)" in caplog.text and "not sent" in caplog.text

    # A `with` block left by an exception closes at once; that exception is the one seen.
    def failing_block() -> None:
        with Publisher(f"ws://127.0.0.1:{refused_port()}/ingest/replicator", TOKEN) as failing:
            failing.publish(frames[0])
            raise KeyError("the script failed")

    started = time.monotonic()
    with pytest.raises(KeyError):
        await loop.run_in_executor(None, failing_block)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("path, token, status", [
    ("/ingest/replicator", WRONG, 401),
    ("/ingest/nope", TOKEN, 404),
    ("/ingest/replicator/frame", TOKEN, 405),  # the POST endpoint given to the WebSocket publisher
])
@pytest.mark.gen_test(timeout=40)
async def test_an_answer_retrying_cannot_change_stops_the_publisher_with_an_error(
        http_port, publishers, hub, frames, caplog, path, token, status):
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    pub = publishers(f"ws://127.0.0.1:{http_port}{path}", token, initial_backoff=0.05, max_backoff=0.1)
    pub.publish(frames[0])
    started = time.monotonic()
    with pytest.raises(PublishRefused) as refused:
        await loop.run_in_executor(None, pub.wait_connected, 10)
    assert time.monotonic() - started < 5  # at once, not at the end of the wait
    error = refused.value
    assert error.status == status and pub.refused is error
    assert f"HTTP {status}" in str(error) and "stopped" in str(error) and token not in str(error)
    assert pub.frames_dropped == 1 and pub.pending == 0 and not pub.connected
    for call in (lambda: pub.publish(frames[1]), lambda: pub.send_text("{}"), lambda: pub.flush(1)):
        with pytest.raises(PublishRefused):
            call()
    await asyncio.sleep(0.5)  # with a 0.05-0.1 s backoff, a retrying publisher would have asked again
    asked = [r for r in caplog.records if r.name == "vsproxy.access" and f" {path} " in r.getMessage()]
    assert len(asked) == 1, [r.getMessage() for r in asked]
    assert [r.levelname for r in caplog.records if r.name == "vsproxy.publish"] == ["ERROR"]
    with pytest.raises(PublishRefused):
        await close_publisher(pub)
    assert hub.seq == 0


@pytest.mark.gen_test(timeout=40)
async def test_publisher_text_reaches_the_viewers_and_their_input_reaches_on_message(
        api, ws_connect, ingest_url, publishers, hub):
    viewer = await open_viewer(api, ws_connect)
    received: list[str] = []
    pub = publishers(ingest_url, on_message=received.append)
    telemetry = [json.dumps({"type": "telemetry", "step": i, "pose": [i, 2.5, -1]}) for i in range(3)]
    for text in telemetry:  # sent as soon as the connection is there, in order
        pub.send_text(text)
    sent = [json.loads(text) for text in telemetry]
    await wait_until(lambda: [t for t in viewer.texts if t.get("type") == "telemetry"] == sent,
                     "the publisher's telemetry at the viewer")
    assert pub.texts_sent == 3 and pub.texts_dropped == 0 and pub.frames_published == 0
    with pytest.raises(TypeError):
        pub.send_text(b"frames go to publish()")  # type: ignore[arg-type]
    # The other way: a viewer's input reaches the script's on_message, wrapped.
    await wait_until(lambda: hub.connected, "the upstream to be connected (input is not queued before)")
    await viewer.conn.write_message('{"type": "command", "action": "reset"}')
    wrapped = {"type": "viewer", "data": '{"type": "command", "action": "reset"}'}
    await wait_until(lambda: wrapped in [json.loads(m) for m in received], "the viewer's input at on_message")


# -- authentication and refusals ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_tokens_are_checked_on_websocket_and_post(api, ws_connect, hub, frames):
    viewer = await open_viewer(api, ws_connect)
    for kwargs in ({"token": None}, {"token": WRONG}, {"token": WRONG, "via": "query"},
                   {"token": TOKEN[:-1]}, {"token": TOKEN + "x", "via": "query"}):
        code, body = await ws_refusal(ws_connect, **kwargs)
        assert (code, body) == (401, {"success": False, "error": "Missing or wrong publish token"}), kwargs
        code, body = await post_frame(api, frames[0], **kwargs)
        assert (code, body) == (401, {"success": False, "error": "Missing or wrong publish token"}), kwargs
    # Another scheme in the Authorization header is a wrong token, even with a right ?token=.
    code, _, response = await api.call("POST", f"/ingest/replicator/frame?token={TOKEN}", raw=frames[0],
                                       headers={"Authorization": f"Basic {TOKEN}"})
    assert code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert hub.seq == 0 and hub.source.publisher is None
    await asyncio.sleep(0.2)
    assert viewer.known(frames) == []

    # The right token, both ways.
    for via in ("header", "query"):
        conn = await raw_publisher(ws_connect, via=via)
        await wait_until(lambda: hub.source.publisher is not None, "the publisher to attach")
        conn.close()
        await wait_until(lambda: hub.source.publisher is None, "the publisher to detach")
        code, body = await post_frame(api, frames[1], via=via)
        assert code == 200 and body["success"] is True and body["seq"] == hub.seq


@pytest.mark.gen_test(timeout=30)
async def test_unknown_or_non_push_upstream_is_404(api, ws_connect):
    for name in ("nope", "demo"):  # "demo" exists but is not a push upstream
        code, body = await ws_refusal(ws_connect, f"/ingest/{name}")
        assert (code, body) == (404, {"success": False, "error": f"No push upstream named {name!r}"})
        code, body = await post_frame(api, b"\xff\xd8\xff\xd9", path=f"/ingest/{name}/frame")
        assert (code, body) == (404, {"success": False, "error": f"No push upstream named {name!r}"})


@pytest.mark.gen_test(timeout=30)
async def test_second_websocket_publisher_is_refused_with_409(ws_connect, hub, api, frames):
    first = await raw_publisher(ws_connect)
    await wait_until(lambda: hub.source.publisher is not None, "the first publisher to attach")
    code, body = await ws_refusal(ws_connect)
    assert code == 409 and body["success"] is False
    assert "already connected" in body["error"] and "one at a time" in body["error"]
    # The first one is unaffected, and POST still works alongside it.
    first.write_message(frames[0], binary=True)
    await wait_until(lambda: hub.latest is not None and hub.latest.jpeg == frames[0], "the first publisher's frame")
    code, body = await post_frame(api, frames[1])
    assert code == 200 and hub.latest.jpeg == frames[1]
    first.close()
    await wait_until(lambda: hub.source.publisher is None, "the slot to be free")
    second = await raw_publisher(ws_connect)
    await wait_until(lambda: hub.source.publisher is not None, "the second publisher to attach")
    second.close()


@pytest.mark.gen_test(timeout=30)
async def test_non_jpeg_frames_are_refused_and_not_published(api, ws_connect, hub, frames):
    viewer = await open_viewer(api, ws_connect)
    conn = await raw_publisher(ws_connect)
    status = json.loads(await next_message(conn, WAIT))
    assert status["type"] == "status" and status["active"] is True
    await wait_until(lambda: hub.connected, "the publisher to attach")
    for junk in (b"not a jpeg at all", b"\xff\xd8 truncated, no EOI", b"\x89PNG\r\n\x1a\n....\xff\xd9"):
        conn.write_message(junk, binary=True)
        reply = json.loads(await next_message(conn, WAIT))
        assert reply["type"] == "error" and "not a JPEG" in reply["message"] and "dropped" in reply["message"]
    assert hub.seq == 0 and hub.latest is None
    conn.write_message(frames[0], binary=True)  # the connection is still good
    await wait_until(lambda: viewer.known(frames) == [frames[0]], "the good frame at the viewer")
    assert hub.seq == 1
    code, body = await post_frame(api, b"GIF89a not a jpeg")
    assert code == 400 and body["success"] is False and "not a JPEG" in body["error"]
    code, body = await post_frame(api, b"")
    assert code == 400 and body["success"] is False
    assert hub.seq == 1
    assert hub.source.frames_rejected == 4


@pytest.mark.gen_test(timeout=30)
async def test_oversize_frames_are_refused(api, ws_connect, hub, http_port):
    big = jpeg_of_size(MAX_FRAME + 1)
    code, body = await post_frame(api, big)
    assert code == 413 and body == {"success": False, "error": f"Frame larger than the limit of {MAX_FRAME} bytes"}

    async def chunked(write):  # no Content-Length: counted as it arrives
        for _ in range(3):
            await write(b"\xff\xd8" + b"\x00" * (MAX_FRAME // 2))

    request = HTTPRequest(f"http://127.0.0.1:{http_port}/ingest/replicator/frame", method="POST",
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/jpeg"},
                          body_producer=chunked, request_timeout=10)
    response = await api.client.fetch(request, raise_error=False)
    assert response.code == 413, response.body
    code, body = await post_frame(api, jpeg_of_size(MAX_FRAME))  # exactly the limit is fine
    assert code == 200 and body["seq"] == 1

    conn = await raw_publisher(ws_connect)
    await wait_until(lambda: hub.source.publisher is not None, "the publisher to attach")
    conn.write_message(big, binary=True)
    while await next_message(conn, WAIT) is not None:
        pass  # the status message, then the close
    assert conn.close_code == 1009
    assert hub.seq == 1
    await wait_until(lambda: hub.source.publisher is None, "the publisher to be detached")


@pytest.mark.gen_test(timeout=30)
async def test_post_frame_reaches_viewers_and_counts_as_a_publisher_for_a_while(api, ws_connect, hub, frames):
    hub.source.post_hold_seconds = 0.5
    viewer = await open_viewer(api, ws_connect)
    await wait_until(lambda: viewer.frames, "the 'connecting' picture")
    assert hub.state == "connecting" and viewer.known(frames) == []
    code, body = await post_frame(api, frames[0])
    assert code == 200 and body == {"success": True, "seq": 1, "active": True}
    assert hub.connected  # at once: no offline picture between the posted frames
    await wait_until(lambda: viewer.known(frames) == [frames[0]], "the posted frame at the viewer")
    code, body = await post_frame(api, frames[1], via="query")
    assert code == 200 and body["seq"] == 2
    await wait_until(lambda: viewer.known(frames) == frames[:2], "the second posted frame")
    # No further POST within the hold time: the upstream counts as lost and viewers are told.
    await wait_until(lambda: hub.state == "retrying", "the hold time to pass")
    await wait_until(lambda: viewer.has_text(lambda t: t["type"] == "error" and "no frame POSTed" in t["message"]),
                     "the viewers to be told")
    code, body = await post_frame(api, frames[2])
    assert code == 200 and hub.connected
    await wait_until(lambda: viewer.known(frames) == frames[:3], "the frame after the loss")


@pytest.mark.gen_test(timeout=30)
async def test_publishing_without_sessions_is_accepted_and_kept_as_latest(api, ws_connect, hub, frames):
    code, body = await post_frame(api, frames[3])
    assert code == 200 and body == {"success": True, "seq": 1, "active": False}
    assert not hub.running and hub.state == "idle"  # a publisher does not start the upstream
    session = await api.create_session()
    await wait_until(lambda: hub.connected, "the recent POST to count as a publisher")
    code, _, response = await api.call("GET", f"/stream/{session['sessionId']}/snapshot.jpg")
    assert code == 200 and response.body == frames[3]


@pytest.mark.config({"streaming": {"max_viewer_message_bytes": 1024}})
@pytest.mark.gen_test(timeout=30)
async def test_publisher_text_is_relayed_to_viewers(api, ws_connect, hub, proxy):
    viewer = await open_viewer(api, ws_connect)
    conn = await raw_publisher(ws_connect)
    await wait_until(lambda: hub.connected, "the publisher to attach")
    conn.write_message('{"type": "telemetry", "pose": [1, 2, 3]}')
    await wait_until(lambda: viewer.has_text(lambda t: t == {"type": "telemetry", "pose": [1, 2, 3]}),
                     "the telemetry at the viewer")
    conn.write_message("x" * (proxy.config.streaming.max_viewer_message_bytes + 1))
    while True:
        reply = json.loads(await next_message(conn, WAIT))
        if reply["type"] == "error":
            break
    assert "too large" in reply["message"]


@pytest.mark.gen_test(timeout=40)
async def test_tokens_never_appear_in_logs(api, ws_connect, ingest_url, publishers, hub, frames, caplog):
    caplog.set_level(logging.DEBUG)
    await open_viewer(api, ws_connect)
    conn = await raw_publisher(ws_connect, via="query")  # the token in the URL
    await wait_until(lambda: hub.connected, "the publisher to attach")
    conn.write_message(b"junk", binary=True)
    await ws_refusal(ws_connect, token=TOKEN, via="query")  # 409, token in the URL
    conn.close()
    await ws_refusal(ws_connect, token=WRONG, via="query")
    await ws_refusal(ws_connect, token=WRONG)
    await post_frame(api, frames[0], via="query")
    await post_frame(api, frames[0], token=WRONG, via="query")
    await post_frame(api, b"junk", via="query")
    await post_frame(api, jpeg_of_size(MAX_FRAME + 1), via="query")
    await post_frame(api, frames[0], path="/ingest/demo/frame", via="query")
    pub = publishers(ingest_url + f"?token={TOKEN}", WRONG)  # a token in the URL given to the library
    await wait_until(lambda: pub.refused is not None and pub.refused.status == 401, "the library's refusal")
    with pytest.raises(PublishRefused):
        await close_publisher(pub)
    good = publishers(ingest_url)
    await wait_until(lambda: good.connected, "the library to connect")
    good.publish(b"junk")
    await wait_until(lambda: good.frames_refused == 1, "the refusal of a junk frame")
    await close_publisher(good)

    formatter = TextFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any("/ingest/replicator" in line and "vsproxy.access" in line for line in lines)
    assert any("vsproxy.publish" in line for line in lines)
    for secret in (TOKEN, WRONG):
        leaks = [line for line in lines if secret in line]
        assert not leaks, leaks
        assert secret not in caplog.text


# -- the runnable example -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_test_pattern_example_publishes_to_a_local_vsproxy(api, ws_connect, hub, http_port):
    viewer = await open_viewer(api, ws_connect)
    root = Path(__file__).resolve().parent.parent
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(root / "examples" / "publish_test_pattern.py"),
        "--url", f"http://127.0.0.1:{http_port}/ingest/replicator",
        "--frames", "10", "--fps", "25", "--size", "160x120",
        env={**os.environ, "VSPROXY_PUBLISH_TOKEN": TOKEN}, cwd=str(root),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 45)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "done: " in text and TOKEN not in text
    assert hub.connects == 1 and hub.seq >= 1  # latest-frame-wins may drop some on a busy machine
    assert render.jpeg_size(hub.latest.jpeg) == (160, 120)
    await wait_until(lambda: hub.latest.jpeg in viewer.frames, "the last pattern frame at the viewer")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_test_pattern_example_exits_with_the_proxys_answer_when_the_token_is_wrong(http_server, http_port, hub):
    root = Path(__file__).resolve().parent.parent
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(root / "examples" / "publish_test_pattern.py"),
        "--url", f"http://127.0.0.1:{http_port}/ingest/replicator", "--token", WRONG, "--frames", "5",
        cwd=str(root), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 45)
    text = output.decode(errors="replace")
    assert process.returncode == 1, text
    assert "error: refused: HTTP 401: Missing or wrong publish token" in text and "done:" not in text
    assert WRONG not in text
    assert time.monotonic() - started < 8  # not the 10 s connect wait: the answer ends it at once
    assert hub.seq == 0


@pytest.mark.slow
def test_python_m_vsproxy_publish_points_to_the_documentation():
    import subprocess
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    helped = subprocess.run([sys.executable, "-m", "vsproxy.publish", "--help"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert helped.returncode == 0 and "README.md" in helped.stdout and "publish_test_pattern.py" in helped.stdout
    bare = subprocess.run([sys.executable, "-m", "vsproxy.publish"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: ") and len(bare.stderr.splitlines()) == 1


@pytest.mark.gen_test(timeout=60)
async def test_a_viewer_cannot_pass_for_the_server(api, ws_connect, ingest_url, hub):
    """A viewer's {"type": "status", "active": false} reaches the publisher wrapped, so the
    publisher keeps publishing (it acts only on the server's own status messages)."""
    viewer = await open_viewer(api, ws_connect)
    messages: list[str] = []
    async with AsyncPublisher(ingest_url, TOKEN, initial_backoff=0.05, on_message=messages.append) as pub:
        await wait_until(lambda: pub.connected and hub.connected and pub.active is True, "the publisher to attach")
        await viewer.conn.write_message('{"type": "status", "active": false}')
        await viewer.conn.write_message('{"type": "error", "message": "forged"}')
        await wait_until(lambda: len([m for m in messages if '"viewer"' in m]) == 2, "the viewer's messages")
        assert pub.active is True and pub.frames_refused == 0


@pytest.mark.gen_test(timeout=60)
async def test_publisher_text_a_viewer_does_not_read_is_not_held_without_bound(api, ws_connect, hub, proxy,
                                                                               http_port):
    """A publisher that sends telemetry as fast as it can, and a viewer that reads none of it (a
    stalled tab, a slow link): what the proxy holds for that viewer stays bounded (its messages
    beyond about 1 MiB unread are dropped, not buffered: no frame flows, so the stall timeout
    never comes), while a viewer that reads gets the publisher's text."""
    reader = await open_viewer(api, ws_connect)
    session_id = (await api.create_session())["sessionId"]
    stalled = await small_buffer_ws(http_port, f"/stream/{session_id}", rcvbuf=4096)
    try:
        await wait_until(lambda: hub.viewers["ws_json"], "the viewer that reads nothing to attach")
        (viewer,) = hub.viewers["ws_json"]  # the reading one is a binary viewer
        conn = await raw_publisher(ws_connect)
        await wait_until(lambda: hub.connected, "the publisher to attach")
        telemetry = json.dumps({"type": "telemetry", "pad": "x" * 60_000})
        largest = 0
        for _ in range(300):  # 18 MB
            await conn.write_message(telemetry)
            largest = max(largest, write_buffer_bytes(viewer.stream))
        conn.write_message('{"type": "telemetry", "last": true}')
        await wait_until(lambda: reader.has_text(lambda t: t.get("last") is True), "the reading viewer's last text")
        largest = max(largest, write_buffer_bytes(viewer.stream))
        assert largest < 2 << 20, f"the proxy held {largest} bytes for a viewer that reads nothing"
        assert sum(t["type"] == "telemetry" for t in reader.texts) > 10
    finally:
        stalled.close()


@pytest.mark.config({"streaming": {"max_unread_text_bytes": 262144}})
@pytest.mark.gen_test(timeout=60)
async def test_text_many_stalled_viewers_do_not_read_is_capped_all_together(api, ws_connect, hub, proxy,
                                                                             http_port):
    """Many stalled viewers (a crowd of dead tabs) and a publisher's telemetry: together they hold
    no more than streaming.max_unread_text_bytes (plus a message each), not 1 MiB each (at
    limits.max_connections 4096 that would be 4 GiB), while a viewer that reads still gets the
    text, the last message included."""
    reader = await open_viewer(api, ws_connect)
    session_id = (await api.create_session())["sessionId"]
    stalled = [await small_buffer_ws(http_port, f"/stream/{session_id}", rcvbuf=4096) for _ in range(8)]
    try:
        await wait_until(lambda: len(hub.viewers["ws_json"]) == 8, "the viewers that read nothing to attach")
        viewers = list(hub.viewers["ws_json"])  # the reading one is a binary viewer
        conn = await raw_publisher(ws_connect)
        await wait_until(lambda: hub.connected, "the publisher to attach")
        telemetry = json.dumps({"type": "telemetry", "pad": "x" * 60_000})

        def held() -> int:
            return sum(write_buffer_bytes(viewer.stream) for viewer in viewers)

        largest = 0
        for _ in range(200):  # 12 MB
            await conn.write_message(telemetry)
            largest = max(largest, held())
        conn.write_message('{"type": "telemetry", "last": true}')
        await wait_until(lambda: reader.has_text(lambda t: t.get("last") is True), "the reading viewer's last text")
        largest = max(largest, held())
        assert largest < 262144 + 8 * 61_000, f"8 viewers that read nothing held {largest} bytes together"
        assert sum(t["type"] == "telemetry" for t in reader.texts) > 10
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.config({"streaming": {"linger_seconds": 0},
                     "reconnect": {"initial_delay_seconds": 5, "max_delay_seconds": 10}})
@pytest.mark.gen_test(timeout=30)
async def test_the_last_session_leaving_while_the_publisher_is_away_makes_the_upstream_inactive(
        api, ws_connect, hub, frames):
    """The publisher leaves (the hub waits a few seconds before looking for the next one) and the
    last session is destroyed meanwhile: the next publisher, and a POST, are told that no session
    wants frames. Before, the hub stopped in its reconnect wait, outside the source's run(), and
    publishers were told "active": true, sending frames for nobody (found by review)."""
    session_id = (await api.create_session())["sessionId"]
    conn = await raw_publisher(ws_connect)
    assert json.loads(await conn.read_message())["active"] is True
    await conn.write_message(frames[0], binary=True)
    await wait_until(lambda: hub.connected, "the publisher's frame")
    conn.close()
    await wait_until(lambda: not hub.connected, "the hub to see the publisher gone")
    code, _, _ = await api.call("DELETE", f"/session/{session_id}")
    assert code == 200
    await wait_until(lambda: not hub.running, "the hub to stop (linger 0)")
    conn = await raw_publisher(ws_connect)
    told = json.loads(await conn.read_message())
    assert told["type"] == "status" and told["active"] is False, told
    conn.close()
    code, body = await post_frame(api, frames[1])
    assert code == 200 and body["active"] is False, body


def jpeg_stating(width: int, height: int) -> bytes:
    """A valid grey baseline JPEG of width x height, flat, in two bits per 8x8 block (each block's
    DC difference and end-of-block as one-bit Huffman codes): a small file stating a huge picture."""
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload

    one_code = bytes([1] + [0] * 15)  # one code of length 1, for symbol 0
    head = (segment(0xDB, bytes(1) + bytes([1] * 64))
            + segment(0xC0, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))
            + segment(0xC4, b"\x00" + one_code + b"\x00" + b"\x10" + one_code + b"\x00")
            + segment(0xDA, bytes([1, 1, 0, 0, 63, 0])))
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    return b"\xff\xd8" + head + bytes(blocks // 4 * 11 // 10 + 1) + b"\xff\xd9"


@pytest.mark.config({"upstreams": {"replicator": {"max_frame_bytes": 1 << 20}}})
@pytest.mark.gen_test(timeout=40)
async def test_a_jpeg_stating_a_huge_picture_is_not_decoded_for_h264_viewers(api, ws_connect, hub, frames):
    """Any upstream can state any picture size in a JPEG's header, and the encoder's JPEG decoder
    allocated what it stated: a publisher's 3 MB JPEG of 16000x16000 grew the process by 780 MB
    and took 3 s of a core, per frame (found by review). A picture over the encoder's limit
    (MAX_DECODE_PIXELS) is skipped like a damaged one; the stream goes on with the next frame."""
    from vsproxy.codec.encoder import MAX_DECODE_PIXELS

    huge = jpeg_stating(9000, 9000)
    assert 9000 * 9000 > MAX_DECODE_PIXELS and len(huge) < 1 << 20 and render.jpeg_size(huge) == (9000, 9000)
    session = await api.create_session()
    conn = await ws_connect(f"/stream/{session['sessionId']}?format=h264")
    configs: list[dict] = []
    units: list[bytes] = []

    async def read() -> None:
        while (message := await conn.read_message()) is not None:
            if isinstance(message, bytes):
                units.append(message)
            elif json.loads(message)["type"] == "config":
                configs.append(json.loads(message))

    reader = asyncio.ensure_future(read())
    try:
        code, _ = await post_frame(api, frames[0])
        assert code == 200
        await wait_until(lambda: units, "the first access unit")
        encoder = hub.encoder
        encoded, refused = encoder.frames_encoded, encoder.errors
        code, body = await post_frame(api, huge)
        assert code == 200, body  # a JPEG for the JPEG viewers; the encoder is what must not choke
        await wait_until(lambda: (encoder.frames_encoded, encoder.errors) != (encoded, refused),
                         "the encoder to take the huge picture")
        assert (encoder.frames_encoded, encoder.errors) == (encoded, refused + 1)
        count = len(units)
        code, _ = await post_frame(api, frames[1])
        assert code == 200
        await wait_until(lambda: len(units) > count, "the next frame's access unit")
        assert [(c["width"], c["height"]) for c in configs] == [(160, 120)]
    finally:
        reader.cancel()


@pytest.mark.gen_test(timeout=20)
async def test_a_viewer_that_starts_the_hub_gets_the_frame_published_just_before():
    """The publisher's first frame comes while no one watches here (the hub is not running); a
    viewer then starts the hub and is added before the hub is connected, as a cluster edge's relay
    is when the publisher reached a node without viewers. Before, it got the offline picture and
    then only the frames after: the first one was missed (29 of 30 on the other node)."""
    from helpers import PublisherStub, socket_pair, ws_server_messages

    from vsproxy.config import ReconnectConfig, StreamingConfig
    from vsproxy.hub import FrameHub
    from vsproxy.outputs import WS_BINARY, Viewer
    from vsproxy.sources.push import PushUpstream

    source = PushSource("pub", PushUpstream(token="publish-token-1"), ReconnectConfig())
    hub = FrameHub("pub", source, streaming=StreamingConfig(), reconnect=ReconnectConfig())
    first = render.TestPattern(64, 48, "first").render(1)
    assert source.attach(hub, PublisherStub())
    source.publish(hub, first)  # nobody watches yet
    stream, client = socket_pair()
    try:
        hub.attach(object())  # type: ignore[arg-type]  # a session: the hub starts, and at once a viewer
        hub.add_viewer(Viewer(stream, WS_BINARY, hub.stats[WS_BINARY], close=lambda reason: None))
        received = b""
        deadline = asyncio.get_running_loop().time() + 3
        while first not in [payload for _, payload in ws_server_messages(received)]:
            assert asyncio.get_running_loop().time() < deadline, "the first frame never came"
            await asyncio.sleep(0.05)
            try:
                received += client.recv(1 << 20)
            except BlockingIOError:
                pass
    finally:
        await hub.stop()
        stream.close()
        client.close()
