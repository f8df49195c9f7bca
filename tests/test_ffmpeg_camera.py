"""Cameras whose response does not say it is multipart: ffmpeg's own MJPEG server
(`ffmpeg ... -f mpjpeg -listen 1 http://...`) answers `Content-Type: application/octet-stream`
and names its boundary only in the body. vsproxy finds the boundary there.

The first test runs a real ffmpeg on loopback (it fails, not skips, when ffmpeg is missing: the
test set-up installs it); the others check the boundary sniffing without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess

import pytest
import tornado.web
from helpers import free_port, recv, wait_upstream
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mjpeg_source import BOUNDARIES, FRAGMENTS, encode, feed_pieces, jpeg_like

from vsproxy import render
from vsproxy.sources.mjpeg import MjpegUpstream
from vsproxy.sources.multipart import MAX_HEADER_BYTES, MjpegError, MultipartParser

JSON = {"Content-Type": "application/json"}
NOT_MULTIPART = "not a multipart stream: the body does not start with a boundary line"


# == a real ffmpeg as the camera ================================================================

@pytest.fixture
def ffmpeg_camera():
    """ffmpeg serving a 320x240 test pattern at 15 fps as MJPEG on a loopback port (one client)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.fail("ffmpeg is not installed (apt-get install ffmpeg; .ci/run installs it)")
    port = free_port()
    process = subprocess.Popen(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-re",
         "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15",
         "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/feed.mjpg"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield port, process
    process.kill()
    process.wait(timeout=10)
    process.stderr.close()


@pytest.fixture
def proxy_config(request, proxy_config):
    """conftest's, plus mjpeg upstreams at the servers the test uses: "ffmpeg" at the ffmpeg camera,
    "multipart", "page" and "jpeg" at the paths of the generic server."""
    upstreams = dict(proxy_config.upstreams)
    if "ffmpeg_camera" in request.fixturenames:
        port, _ = request.getfixturevalue("ffmpeg_camera")
        upstreams["ffmpeg"] = MjpegUpstream(url=f"http://127.0.0.1:{port}/feed.mjpg")
    if "generic_server" in request.fixturenames:
        port = request.getfixturevalue("generic_server")
        for path in ("multipart", "page", "jpeg"):
            upstreams[path] = MjpegUpstream(url=f"http://127.0.0.1:{port}/{path}")
    return dataclasses.replace(proxy_config, upstreams=upstreams)


@pytest.mark.external
@pytest.mark.gen_test(timeout=60)
async def test_ffmpeg_mjpeg_server_is_a_camera(ffmpeg_camera, api, ws_connect):
    _, process = ffmpeg_camera
    code, body, _ = await api.call("POST", "/session/create",
                                   {"userId": "u", "robotName": "r", "upstream": "ffmpeg"}, headers=JSON)
    assert code == 200, body
    # ffmpeg may take a moment to listen: until then the attempts are refused and retried.
    status = await wait_upstream(api, "ffmpeg to be connected", lambda u: u["state"] == "connected", name="ffmpeg")
    assert status["lastError"] is None and status["kind"] == "mjpeg"
    conn = await ws_connect(f"/stream/{body['sessionId']}?format=binary")
    frames = []
    while len(frames) < 10:
        message = await recv(conn)
        if isinstance(message, bytes) and render.jpeg_size(message) == (320, 240):
            frames.append(message)
    assert len(set(frames)) > 1, "the test pattern moves: frames differ"
    status = await wait_upstream(api, "frames in", lambda u: u["framesIn"] >= 10, name="ffmpeg")
    # One connection, kept: every failure was an attempt refused before ffmpeg listened.
    assert status["state"] == "connected" and status["connects"] == 1, status
    assert process.poll() is None, process.stderr.read().decode(errors="replace") if process.stderr else ""


# == the same without ffmpeg: a server that says nothing useful about its body ===================

class _GenericTypeHandler(tornado.web.RequestHandler):
    """GET /<name>: application/octet-stream with a multipart body (/multipart, as ffmpeg), an
    HTML page (/page) or a single JPEG (/jpeg)."""

    async def get(self, name: str) -> None:
        self.set_header("Content-Type", "application/octet-stream")
        if name == "page":
            self.write(b"<!doctype html><title>camera</title><p>log in first</p>")
            return
        if name == "jpeg":
            self.write(render.status_frame(320, 240, "cam", "one picture"))
            return
        jpeg = render.status_frame(320, 240, "cam", "multipart")
        for _ in range(200):
            self.write(b"--ffmpeg\r\nContent-type: image/jpeg\r\nContent-length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
            await self.flush()
            await asyncio.sleep(0.05)


@pytest.fixture
def generic_server(io_loop):
    port = free_port()
    server = tornado.web.Application([(r"/(\w+)", _GenericTypeHandler)]).listen(port, address="127.0.0.1")
    yield port
    server.stop()


@pytest.mark.parametrize("path, expected", [
    ("multipart", None),
    ("page", f"MjpegError: {NOT_MULTIPART}"),
    ("jpeg", f"MjpegError: {NOT_MULTIPART}"),
])
@pytest.mark.gen_test(timeout=60)
async def test_octet_stream_is_a_camera_only_if_its_body_is_multipart(generic_server, api, ws_connect, path,
                                                                       expected):
    code, body, _ = await api.call("POST", "/session/create",
                                   {"userId": "u", "robotName": "r", "upstream": path}, headers=JSON)
    assert code == 200, body
    if expected is None:
        status = await wait_upstream(api, "connected", lambda u: u["framesIn"] >= 3, name=path)
        assert status["lastError"] is None
        conn = await ws_connect(f"/stream/{body['sessionId']}?format=binary")
        while not isinstance(message := await recv(conn), bytes) or render.jpeg_size(message) != (320, 240):
            pass
    else:
        status = await wait_upstream(api, "failures", lambda u: u["failures"] >= 2, name=path)
        assert status["lastError"] == expected and status["connects"] == 0, status


# == the parser's boundary sniffing ============================================================

JPEGS = [b"\xff\xd8one\xff\xd9", b"\xff\xd8two\xff\xd9", b"\xff\xd8three\xff\xd9"]
FFMPEG_BODY = b"".join(b"--ffmpeg\r\nContent-type: image/jpeg\r\nContent-length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg)
                       for jpeg in JPEGS)


@pytest.mark.parametrize("chunk", [1, 7, len(FFMPEG_BODY)])
def test_sniffing_finds_ffmpegs_boundary_in_the_body(chunk):
    parser = MultipartParser(None, 1024, sniff=True)
    cuts = list(range(chunk, len(FFMPEG_BODY), chunk))
    assert feed_pieces(parser, b"\r\n" + FFMPEG_BODY, cuts) == JPEGS  # Content-Length: no wait for the next line
    assert parser.boundary == "ffmpeg"


@pytest.mark.parametrize("data", [
    b"<!doctype html><title>camera</title>\r\n--ffmpeg\r\n",  # a page, whatever follows
    b"\xff\xd8\xff\xe0\x00\x10JFIF",  # one picture
    b"{\"error\": \"not authorised\"}\n",
    b"-----\r\n--ffmpeg\r\n",  # a rule is not a boundary line
    b"\r\x00",
])
def test_sniffing_refuses_a_body_that_does_not_open_with_a_boundary_line_at_once(data):
    parser = MultipartParser(None, 1024 * 1024, sniff=True)
    with pytest.raises(MjpegError, match=NOT_MULTIPART):
        parser.feed(data)
    assert parser.buffered == 0


def test_without_sniffing_a_preamble_is_still_skipped():
    parser = MultipartParser(None, 1024)
    assert parser.feed(b"a preamble\r\n" + FFMPEG_BODY)[:1] == [b"\xff\xd8one\xff\xd9"]


@pytest.mark.parametrize("data", [b"--" + b"x" * (MAX_HEADER_BYTES + 10), b"\r\n" * (MAX_HEADER_BYTES // 2 + 10)])
def test_sniffing_gives_up_within_the_header_limit(data):
    parser = MultipartParser(None, 8 * 1024 * 1024, sniff=True)
    with pytest.raises(MjpegError, match=NOT_MULTIPART):
        for start in range(0, len(data), 1000):
            parser.feed(data[start:start + 1000])
            assert parser.buffered <= MAX_HEADER_BYTES + 1000


@settings(max_examples=200, deadline=None, database=None)
@given(boundary=BOUNDARIES, content_length=st.booleans(), newline=st.sampled_from([b"\r\n", b"\n"]),
       leading=st.sampled_from([b"", b"\r\n", b"\n\n"]), data=st.data())
def test_property_sniffing_recovers_every_body_of_a_stream_without_preamble(boundary, content_length, newline,
                                                                          leading, data):
    bodies = data.draw(st.lists(jpeg_like(boundary, content_length), min_size=1, max_size=6))
    if not content_length:
        bodies = [b.replace(b"\n--" + boundary, b"\n-+" + boundary) for b in bodies]
    raw = leading + encode(bodies, boundary, content_length=content_length, newline=newline)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30))
    max_part = max(len(b) for b in bodies)
    assert feed_pieces(MultipartParser(None, max_part, sniff=True), raw, cuts) == bodies


@settings(max_examples=200, deadline=None, database=None)
@given(chunks=st.lists(st.one_of(FRAGMENTS, st.binary(max_size=300)), max_size=40), max_part=st.integers(1, 600))
def test_property_sniffing_garbage_only_ever_raises_mjpeg_error_with_bounded_memory(chunks, max_part):
    parser = MultipartParser(None, max_part, sniff=True)
    try:
        for chunk in chunks:
            for body in parser.feed(chunk):
                assert len(body) <= max_part
            assert parser.buffered <= parser.max_buffered
    except MjpegError:
        assert parser.buffered == 0

