"""The mjpeg upstream kind: the multipart parser (examples and properties), then the source end to
end, from a loopback camera (`mjpeg_camera.MjpegCamera`) through the proxy to WebSocket viewers.

Camera tests configure an upstream whose URL host is the placeholder `camera` (see `cam_config`);
the `proxy_config` fixture below points it at the running camera's port.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import random
import re
import time
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import helpers
import pytest
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mjpeg_camera import DIALECTS, MjpegCamera

from vsproxy.config import ReconnectConfig
from vsproxy.sources.mjpeg import MjpegSource, MjpegUpstream
from vsproxy.sources.multipart import MAX_HEADER_BYTES, MjpegError, MultipartParser, boundary_from_content_type

WAIT = 15.0  # generous bound for anything that should take well under a second
# This module's upstream and its own (longer) waits, on the shared helpers.
upstream_status = partial(helpers.upstream_status, name="cam")
wait_upstream = partial(helpers.wait_upstream, timeout=WAIT, name="cam")
recv = partial(helpers.recv, timeout=WAIT)
CAMERA_HOST = "camera"  # placeholder host in test configs, replaced by the camera's address


# == the parser ====================================================================================


def encode(bodies: list[bytes], boundary: bytes = b"camframe", *, content_length: bool = True,
           newline: bytes = b"\r\n", preamble: bytes = b"", extra_headers: bool = False,
           close: bool = False) -> bytes:
    """A multipart body in the given dialect, ending with a boundary line (the next part's, or
    the closing one): without Content-Length, only the next boundary completes a part."""
    out = [preamble]
    for body in bodies:
        out.append(b"--" + boundary + newline + b"Content-Type: image/jpeg" + newline)
        if content_length:
            out.append(b"Content-Length: %d" % len(body) + newline)
        if extra_headers:
            out.append(b"X-Timestamp: 1700000000.123456" + newline + b"X-Note: a: b" + newline)
        out.append(newline + body + newline)
    if close:
        out.append(b"--" + boundary + b"--" + newline + b"epilogue, ignored" + newline)
    else:
        out.append(b"--" + boundary + newline)
    return b"".join(out)


def feed_pieces(parser: MultipartParser, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed `data` split at `cuts`; the buffer stays bounded after every feed."""
    out: list[bytes] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += parser.feed(data[start:cut])
        start = cut
        assert parser.buffered <= parser.max_buffered
    return out


def feed_in_chunks(parser: MultipartParser, data: bytes, size: int) -> list[bytes]:
    return feed_pieces(parser, data, list(range(size, len(data), size)))


JPEG_A = b"\xff\xd8\xff\xe0 first \r\n-- not a boundary\r\n\xff\xd9"
JPEG_B = b"\xff\xd8" + bytes(range(256)) * 3 + b"\xff\xd9"
JPEG_C = b"\xff\xd8\n--\n--camfram\r\n--camframeX\r\n\xff\xd9"  # boundary-like lines, none a delimiter


@pytest.mark.parametrize("value, expected", [
    ("multipart/x-mixed-replace; boundary=camframe", "camframe"),
    ('multipart/x-mixed-replace; boundary="cam frame=1"', "cam frame=1"),
    ("multipart/x-mixed-replace;boundary=--myboundary", "--myboundary"),
    ("Multipart/X-Mixed-Replace; charset=x; BOUNDARY = abc ; foo=bar", "abc"),
    ("multipart/x-mixed-replace", None),
    ('multipart/x-mixed-replace; boundary=""', None),
    ("multipart/x-mixed-replace; boundary=", None),
    ("", None),
])
def test_boundary_from_content_type(value, expected):
    assert boundary_from_content_type(value) == expected


@pytest.mark.parametrize("header_boundary", ["camframe", "--camframe", None, "not-in-the-body"])
@pytest.mark.parametrize("content_length", [True, False])
@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_parser_dialects_in_any_chunking(header_boundary, content_length, newline, chunk):
    data = encode([JPEG_A, JPEG_B, JPEG_C, JPEG_A], content_length=content_length, newline=newline,
                  preamble=b"preamble" + newline + b"-- prose, not a boundary" + newline, extra_headers=True)
    parser = MultipartParser(header_boundary, 4096)
    assert feed_in_chunks(parser, data, chunk) == [JPEG_A, JPEG_B, JPEG_C, JPEG_A]
    assert parser.boundary == "camframe" and parser.parts == 4


def test_boundary_with_leading_dashes_in_the_body_too():
    # A boundary that itself starts with "--" (the body's lines are "----myboundary").
    data = encode([JPEG_A, JPEG_B], b"--myboundary", content_length=False)
    for header in ("--myboundary", None):
        assert feed_in_chunks(MultipartParser(header, 4096), data, 5) == [JPEG_A, JPEG_B]


def test_content_length_body_may_contain_the_boundary():
    body = b"\xff\xd8\r\n--camframe\r\nContent-Length: 3\r\n\r\nabc\r\n--camframe--\r\n\xff\xd9"
    data = encode([body, JPEG_A], content_length=True)
    assert feed_in_chunks(MultipartParser("camframe", 4096), data, 3) == [body, JPEG_A]


def test_parts_without_headers_and_with_an_empty_header_block():
    data = (b"--camframe\r\n" + JPEG_A + b"\r\n"  # the JPEG right after the boundary line
            b"--camframe\r\n\r\n" + JPEG_B + b"\r\n"  # a blank line: no headers
            b"--camframe\r\n")
    assert feed_in_chunks(MultipartParser("camframe", 4096), data, 1) == [JPEG_A, JPEG_B]


def test_transport_padding_and_missing_line_break_after_a_sized_body():
    data = (b"--camframe  \t\r\nContent-Length: %d\r\n\r\n" % len(JPEG_A) + JPEG_A
            + b"--camframe\r\nContent-Length: %d\r\n\r\n" % len(JPEG_B) + JPEG_B + b"\r\n--camframe\r\n")
    assert feed_in_chunks(MultipartParser("camframe", 4096), data, 2) == [JPEG_A, JPEG_B]


def test_closing_boundary_finishes_the_stream():
    parser = MultipartParser("camframe", 4096)
    data = encode([JPEG_A], content_length=False, close=True) + encode([JPEG_B])
    assert parser.feed(data) == [JPEG_A]
    assert parser.finished and parser.buffered == 0
    assert parser.feed(b"more epilogue") == []


@pytest.mark.parametrize("content_length", [True, False])
@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_a_part_of_exactly_max_part_bytes_is_accepted(content_length, newline):
    body = b"\xff\xd8" + b"x" * 996 + b"\xff\xd9"
    data = encode([body, body], content_length=content_length, newline=newline)
    assert feed_in_chunks(MultipartParser("camframe", 1000), data, 1) == [body, body]


def test_content_length_over_the_limit_raises_at_once():
    parser = MultipartParser("camframe", 1000)
    with pytest.raises(MjpegError, match=r"part of 1001 bytes \(Content-Length\) is over max_part_bytes \(1000\)"):
        parser.feed(b"--camframe\r\nContent-Length: 1001\r\n\r\n\xff\xd8")
    with pytest.raises(MjpegError):  # a failed parser stays failed
        parser.feed(b"anything")
    assert parser.buffered == 0


def test_part_without_length_over_the_limit_raises():
    parser = MultipartParser("camframe", 1000)
    parser.feed(b"--camframe\r\n\r\n\xff\xd8")
    with pytest.raises(MjpegError, match=r"part without Content-Length is over max_part_bytes \(1000\)"):
        for _ in range(100):
            parser.feed(b"y" * 100)
            assert parser.buffered <= 1000 + 64


@pytest.mark.parametrize("data, message", [
    (b"--camframe\r\nContent-Length: 12x\r\n\r\n", "invalid part Content-Length"),
    (b"--camframe\r\nX-Long: " + b"h" * MAX_HEADER_BYTES, "part headers longer than"),
    (b"no boundary here " * 5000, "no multipart boundary line in the first"),
    (b"--" + b"b" * 5000 + b"\r\n" + b"z" * 80000, "no multipart boundary line in the first"),
])
def test_malformed_streams_raise_a_clear_error(data, message):
    parser = MultipartParser(None, 50000)
    with pytest.raises(MjpegError, match=message):
        feed_in_chunks(parser, data, 1000)


def test_an_oversized_header_boundary_is_refused():
    with pytest.raises(MjpegError, match="boundary longer than"):
        MultipartParser("b" * 300, 1000)


def test_parsing_is_linear_in_the_stream_size():
    """A quadratic re-scan would take minutes here; one pass takes milliseconds."""
    body = b"\xff\xd8" + os.urandom(200_000).replace(b"\n", b" ") + b"\xff\xd9"
    for content_length in (True, False):
        data = encode([body] * 60, content_length=content_length)  # 2 s of 200 KB frames at 30 fps
        parser = MultipartParser("camframe", 8 << 20)
        started = time.perf_counter()
        assert len(feed_in_chunks(parser, data, 65536)) == 60
        assert time.perf_counter() - started < 2.0
    one_big_part = b"--camframe\r\n\r\n" + b"\xff\xd8" + b"q" * 2_000_000
    parser = MultipartParser("camframe", 8 << 20)
    started = time.perf_counter()
    feed_in_chunks(parser, one_big_part, 512)  # 4000 feeds of one unfinished part
    assert time.perf_counter() - started < 2.0


# -- properties -----------------------------------------------------------------------------------

FRAGMENTS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\r\n", b"\n", b"--", b"\r\n--", b"-\r\n-", b"\n\n", b"\r\n\r\n", b"Content-Length: 5\r\n"]),
)
BOUNDARIES = st.sampled_from([b"camframe", b"--dashed", b"b" * 70 + b"-long", b"cam frame=1", b"x"])


@st.composite
def jpeg_like(draw, boundary: bytes, content_length: bool) -> bytes:
    fragments = draw(st.lists(FRAGMENTS, max_size=12))
    if content_length and draw(st.booleans()):
        fragments.insert(draw(st.integers(0, len(fragments))), b"\r\n--" + boundary + b"\r\n")
    return b"\xff\xd8" + b"".join(fragments) + b"\xff\xd9"


@st.composite
def streams(draw) -> tuple[str | None, int, bytes, list[bytes]]:
    """(header boundary, max_part_bytes, stream bytes, the bodies it carries)."""
    boundary = draw(BOUNDARIES)
    content_length = draw(st.booleans())
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    bodies = draw(st.lists(jpeg_like(boundary, content_length), min_size=1, max_size=8))
    if not content_length:
        # Without Content-Length a body cannot hold its own delimiter, by definition.
        bodies = [b.replace(b"\n--" + boundary, b"\n-+" + boundary) for b in bodies]
    header = draw(st.sampled_from([boundary, b"--" + boundary, None, b"absent-from-body"]))
    data = encode(bodies, boundary, content_length=content_length, newline=newline,
                  preamble=draw(st.sampled_from([b"", b"preamble\r\n", b"-- prose\n\n", b"\r\n"])),
                  extra_headers=draw(st.booleans()), close=draw(st.booleans()))
    max_part = max(len(b) for b in bodies) + draw(st.integers(0, 3))
    return (None if header is None else header.decode("latin-1")), max_part, data, bodies


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), data=st.data())
def test_property_any_dialect_any_split_recovers_every_body_in_order(stream, data):
    header, max_part, raw, bodies = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40))
    assert feed_pieces(MultipartParser(header, max_part), raw, cuts) == bodies


@settings(max_examples=150, deadline=None, database=None)
@given(max_part=st.integers(1024, 20000), chunk_sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=30),
       boundary=BOUNDARIES, seed=st.integers(0, 2**32 - 1))
def test_property_a_part_that_never_ends_raises_with_bounded_memory(max_part, chunk_sizes, boundary, seed):
    rng = random.Random(seed)
    parser = MultipartParser(boundary.decode(), max_part)
    parser.feed(b"--" + boundary + b"\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8")
    body_fed = 2
    delimiter = 3 + len(boundary)
    with pytest.raises(MjpegError, match="over max_part_bytes"):
        for i in range(10**6):
            size = chunk_sizes[i % len(chunk_sizes)]
            body_fed += size
            parser.feed(rng.randbytes(size).replace(b"\n", b" "))
            assert body_fed <= max_part + delimiter, "no error although the part is past the limit"
            assert parser.buffered <= max_part + delimiter + 8
    assert body_fed > max_part, "raised before the part reached the limit"
    assert parser.buffered == 0


@settings(max_examples=300, deadline=None, database=None)
@given(chunks=st.lists(st.one_of(st.binary(max_size=300), FRAGMENTS,
                                 st.sampled_from([b"--camframe", b"--camframe--", b"\xff\xd8", b"\r\n\r\n"])),
                       max_size=60),
       header=st.sampled_from(["camframe", None, "--camframe"]), max_part=st.integers(1, 600))
def test_property_garbage_only_ever_raises_mjpeg_error_with_bounded_memory(chunks, header, max_part):
    parser = MultipartParser(header, max_part)
    try:
        for chunk in chunks:
            for body in parser.feed(chunk):
                assert len(body) <= max_part
            assert parser.buffered <= parser.max_buffered
    except MjpegError:
        assert parser.buffered == 0


# == the source, end to end ========================================================================


def cam_config(path: str = "/stream", **settings: Any) -> dict:
    """A config tree with upstream "cam" (the default) at `path` on the camera fixture."""
    return {"upstreams": {"cam": {"kind": "mjpeg", "url": f"http://{CAMERA_HOST}{path}", **settings}},
            "default_upstream": "cam"}


@pytest.fixture
def camera_dialect() -> str:
    return "standard"


@pytest.fixture
def camera(io_loop, camera_dialect):
    instance = MjpegCamera(DIALECTS[camera_dialect])
    instance.start()
    yield instance
    io_loop.run_sync(instance.stop)


@pytest.fixture
def proxy_config(request, proxy_config):
    """conftest's, with every mjpeg upstream on host `camera` pointed at the camera fixture."""
    if "camera" not in request.fixturenames:
        return proxy_config
    port = request.getfixturevalue("camera").port
    upstreams = dict(proxy_config.upstreams)
    default = proxy_config.default_upstream
    if not any(isinstance(s, MjpegUpstream) and urlsplit(s.url).hostname == CAMERA_HOST for s in upstreams.values()):
        upstreams["cam"] = MjpegUpstream(url=f"http://{CAMERA_HOST}/stream")
        default = "cam"
    for name, settings_ in upstreams.items():
        url = urlsplit(getattr(settings_, "url", ""))
        if isinstance(settings_, MjpegUpstream) and url.hostname == CAMERA_HOST:
            userinfo, at, _ = url.netloc.rpartition("@")
            url = url._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}")
            upstreams[name] = dataclasses.replace(settings_, url=urlunsplit(url))
    return dataclasses.replace(proxy_config, upstreams=upstreams, default_upstream=default)


async def camera_frames(conn, camera: MjpegCamera, count: int, after: int = 0,
                        texts: list[dict] | None = None) -> list[int]:
    """Sequence numbers of the next `count` camera frames (numbered above `after`) on a binary
    WebSocket, skipping offline pictures; text messages go to `texts`."""
    seqs: list[int] = []
    deadline = time.monotonic() + WAIT
    while len(seqs) < count:
        message = await recv(conn, timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, str):
            if texts is not None:
                texts.append(json.loads(message))
            continue
        seq = camera.index(message)
        if seq is not None and seq > after:
            seqs.append(seq)
    return seqs


def assert_in_order(seqs: list[int]) -> None:
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"frames out of order or repeated: {seqs}"


async def connected_viewer(api, ws_connect) -> tuple[str, Any]:
    """A session on "cam" whose upstream is connected, and a binary WebSocket viewer of it."""
    session_id = (await api.create_session())["sessionId"]
    await wait_upstream(api, "the upstream to connect", lambda u: u["state"] == "connected")
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    first = await recv(conn)
    assert isinstance(first, str) and json.loads(first)["type"] == "status"
    return session_id, conn


def assert_no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()
           or "never retrieved" in r.getMessage() or r.getMessage() == "Uncaught exception"]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@pytest.mark.parametrize("camera_dialect", sorted(DIALECTS))
@pytest.mark.gen_test(timeout=60)
async def test_frames_arrive_byte_identical_and_in_order_in_every_dialect(camera, api, ws_connect, caplog):
    _, conn = await connected_viewer(api, ws_connect)
    seqs = await camera_frames(conn, camera, 8)
    assert_in_order(seqs)
    status = await upstream_status(api)
    assert status["kind"] == "mjpeg" and status["state"] == "connected" and status["lastError"] is None
    assert status["framesIn"] >= 8
    assert_no_tracebacks(caplog)


@pytest.mark.config(cam_config("/stream/mixed"))
@pytest.mark.gen_test(timeout=60)
async def test_non_jpeg_parts_are_skipped_and_logged_once(camera, proxy, api, ws_connect, caplog):
    caplog.set_level(logging.INFO, logger="vsproxy")
    _, conn = await connected_viewer(api, ws_connect)
    assert_in_order(await camera_frames(conn, camera, 8))
    source = proxy.hubs["cam"].source
    assert source.parts_skipped >= 2
    assert [r.getMessage() for r in caplog.records].count("skipping multipart parts that are not JPEG images") == 1


@pytest.mark.config({"streaming": {"offline_frame_interval_seconds": 0.2}})
@pytest.mark.gen_test(timeout=90)
async def test_viewers_survive_a_camera_restart_on_the_same_port(camera, api, ws_connect, caplog):
    session_id, conn = await connected_viewer(api, ws_connect)
    before = await camera_frames(conn, camera, 3)
    assert_in_order(before)

    await camera.stop()
    texts: list[dict] = []
    deadline = time.monotonic() + WAIT
    while not any(t["type"] == "error" for t in texts):  # told, and still connected
        message = await recv(conn, timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, str):
            texts.append(json.loads(message))
    assert all(t["type"] in ("status", "error") and t["message"] for t in texts), texts
    status = await wait_upstream(api, "the upstream to be retrying", lambda u: u["state"] == "retrying")
    assert status["lastError"]
    code, health, _ = await api.call("GET", "/health")
    assert code == 200 and health["status"] == "degraded" and health["failing_upstreams"] == ["cam"]

    camera.start()
    after = await camera_frames(conn, camera, 5, after=max(before))
    assert_in_order(after)
    status = await wait_upstream(api, "the upstream to reconnect", lambda u: u["state"] == "connected")
    assert status["connects"] == 2 and status["sessions"] == 1
    code, health, _ = await api.call("GET", "/health")
    assert health["status"] == "healthy" and health["failing_upstreams"] == []
    assert camera.connections_total == 2
    assert_no_tracebacks(caplog)


def with_camera_path(path: str, *args: Any, **settings: Any) -> Any:
    """A parametrize case whose "cam" upstream is at `path` (and has these settings)."""
    return pytest.param(path, *args, marks=pytest.mark.config(cam_config(path, **settings)), id=path)


@pytest.mark.parametrize("path, expected", [
    with_camera_path("/missing", "UpstreamHTTPError: upstream answered HTTP 404 Not Found"),
    with_camera_path("/page", "UpstreamHTTPError: expected a multipart/x-mixed-replace stream, "
                              "got Content-Type 'text/html'"),
])
@pytest.mark.gen_test(timeout=60)
async def test_a_camera_that_does_not_stream_keeps_retrying_with_a_clear_error(
        camera, api, ws_connect, caplog, path, expected):
    caplog.set_level(logging.DEBUG)
    session_id = (await api.create_session())["sessionId"]
    status = await wait_upstream(api, "repeated failures", lambda u: u["failures"] >= 3)
    assert status["state"] == "retrying" and status["connects"] == 0
    assert status["lastError"] == expected
    assert len(camera.requests) >= 3 and all(uri == path for uri, _ in camera.requests)
    code, health, _ = await api.call("GET", "/health")
    assert health["status"] == "degraded" and health["failing_upstreams"] == ["cam"]
    conn = await ws_connect(f"/stream/{session_id}")
    assert json.loads(await recv(conn))["type"] == "status"  # viewers are still accepted
    assert_no_tracebacks(caplog)


@pytest.mark.config({**cam_config("/stall"), "reconnect": {"frame_timeout_seconds": 1}})
@pytest.mark.gen_test(timeout=60)
async def test_a_stream_without_frames_for_the_frame_timeout_counts_as_lost(camera, api):
    await api.create_session()
    status = await wait_upstream(api, "a frame timeout", lambda u: u["failures"] >= 1 and u["connects"] >= 1)
    assert status["lastError"] == "FrameTimeout: no frame for 1 s"
    assert status["framesIn"] >= 1  # the one frame /stall sends arrived
    await wait_until(lambda: camera.connections_total >= 2, "a reconnect")


@pytest.mark.parametrize("path, expected", [
    with_camera_path("/stream", r"MjpegError: part of \d+ bytes \(Content-Length\) is over max_part_bytes \(1024\)",
                     max_part_bytes=1024),
    with_camera_path("/stream/no-length", r"MjpegError: part without Content-Length is over max_part_bytes \(1024\)",
                     max_part_bytes=1024),
])
@pytest.mark.gen_test(timeout=60)
async def test_a_part_over_max_part_bytes_is_an_error(camera, api, path, expected):
    await api.create_session()
    status = await wait_upstream(api, "a failure", lambda u: u["failures"] >= 1 and u["lastError"])
    assert re.fullmatch(expected, status["lastError"]), status["lastError"]
    assert status["framesIn"] == 0


SECRETS = ("s3cr3t-pass", "t0ps3cr3t", "k3y-s3cr3t")


@pytest.mark.config({"upstreams": {"cam": {
    "kind": "mjpeg", "url": f"http://viewer:{SECRETS[0]}@{CAMERA_HOST}/stream?token={SECRETS[1]}",
    "headers": {"X-Api-Key": SECRETS[2]}}}, "default_upstream": "cam"})
@pytest.mark.gen_test(timeout=60)
async def test_credentials_reach_the_camera_but_never_the_logs_or_the_api(camera, api, ws_connect, caplog):
    caplog.set_level(logging.DEBUG)
    _, conn = await connected_viewer(api, ws_connect)
    await camera_frames(conn, camera, 2)
    uri, headers = camera.requests[0]
    assert uri == f"/stream?token={SECRETS[1]}"
    assert headers["Authorization"] == "Basic " + base64.b64encode(f"viewer:{SECRETS[0]}".encode()).decode()
    assert headers["X-Api-Key"] == SECRETS[2]
    await camera.stop()  # failures get logged too
    await wait_upstream(api, "connect failures", lambda u: u["failures"] >= 2)
    texts = [caplog.text]
    for path in ("/upstreams", "/health", "/metrics"):
        texts.append((await api.call("GET", path))[2].body.decode())
    for secret in SECRETS:
        assert not any(secret in text for text in texts), f"{secret!r} leaked"


@pytest.mark.gen_test(timeout=30)
async def test_settings_that_cannot_work_fail_every_attempt_without_connecting(camera):
    reconnect = ReconnectConfig()
    for url, headers, message in [
        (camera.url("/stream"), {"X-Key": "v\r\nX-Injected: 1"}, "header 'X-Key' has a line break"),
        ("http://127.0.0.1:99999/stream", {}, "Port out of range"),
        ("http://viewer:pw-0123456789@[::1/stream", {}, r"URL 'http://\*\*\*@\[::1/stream' cannot be parsed"),
    ]:
        source = MjpegSource("cam", MjpegUpstream(url=url, headers=headers), reconnect)
        with pytest.raises(ValueError, match=message):
            await source.run(None)  # type: ignore[arg-type]
    assert camera.requests == []
    source = MjpegSource("cam", MjpegUpstream(url="https://user:pw@cam.example:8443/live/feed?token=x"), reconnect)
    assert source.safe_url == "https://***@cam.example:8443/live/feed"


@pytest.mark.gen_test(timeout=30)
async def test_a_session_naming_a_url_is_refused_and_nothing_is_fetched(camera, proxy, api):
    hubs = dict(proxy.hubs)
    code, body, _ = await api.call("POST", "/session/create",
                                   {"userId": "u", "robotName": "r", "upstream": "http://evil.example/"})
    assert code == 400 and body["success"] is False and "URL" in body["error"]
    assert proxy.hubs == hubs and not any(hub.running for hub in proxy.hubs.values())
    code, body, _ = await api.call("GET", "/sessions")
    assert body["count"] == 0
    await asyncio.sleep(0.3)
    assert camera.requests == []


@pytest.mark.config({"streaming": {"linger_seconds": 0.1}})
@pytest.mark.gen_test(timeout=60)
async def test_the_camera_connection_closes_when_the_last_session_leaves(camera, proxy, api, ws_connect, caplog):
    session_id, conn = await connected_viewer(api, ws_connect)
    await camera_frames(conn, camera, 2)
    assert len(camera.active) == 1
    code, _, _ = await api.call("DELETE", f"/session/{session_id}")
    assert code == 200
    await wait_until(lambda: not camera.active, "the proxy to close the camera connection")
    await wait_until(lambda: proxy.hubs["cam"].state == "idle", "the upstream to go idle")
    assert camera.connections_total == 1
    assert_no_tracebacks(caplog)
