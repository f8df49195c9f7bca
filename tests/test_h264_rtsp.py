"""H.264 from RTSP upstreams: passed through to H.264 viewers untouched (no decode, no encode),
decoded to JPEG only while something needs JPEG, and MJPEG-over-RTSP encoded like any JPEG
upstream. A real RTSP server (GStreamer's, see rtsp_server.py) on loopback; these tests fail,
not skip, when its Debian packages are missing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import av
import pytest
from helpers import recv, wait_until
from test_rtsp_source import (  # noqa: F401  (fixtures)
    STREAM_SIZE,
    UPSTREAM,
    proxy_config,
    rtsp_server,
    rtsp_threads,
    rtsp_url,
)

from vsproxy.codec.h264 import NAL_PPS, NAL_SPS, nal_type, split_nals

pytestmark = pytest.mark.external


async def h264_units(conn, count: int) -> list[bytes]:
    """The next `count` access units of a `format=h264` viewer (Annex-B)."""
    units = []
    while len(units) < count:
        message = await recv(conn, timeout=30)
        if isinstance(message, bytes):
            units.append(message[9:])  # after the flags byte and the timestamp
    return units


def read_directly(url: str, count: int, out: list[bytes], ready: threading.Event) -> None:
    """A second RTSP client of the same shared stream, reading NAL units as the server sends them."""
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(10, 10)) as container:
        ready.set()
        for packet in container.demux(container.streams.video[0]):
            if packet.size:
                out.extend(split_nals(bytes(packet)))
            if len(out) >= count:
                return


@pytest.mark.parametrize("rtsp_server", [{"shared": True}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_rtsp_h264_reaches_h264_viewers_byte_for_byte_without_decoding(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811  (fixtures of test_rtsp_source)
    """The viewer's NAL units are the RTSP server's own (a second client of the same shared
    stream sees the same bytes), and the proxy decodes and encodes nothing for it."""
    direct: list[bytes] = []
    ready = threading.Event()
    reader = threading.Thread(target=read_directly, args=(rtsp_server.url, 400, direct, ready), daemon=True)
    reader.start()
    await wait_until(ready.is_set, "the direct client to connect", timeout=30)
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    config = json.loads(await recv(conn, timeout=30))
    while config.get("type") != "config":
        config = json.loads(await recv(conn, timeout=30))
    assert (config["width"], config["height"]) == STREAM_SIZE
    units = await h264_units(conn, 60)
    await wait_until(lambda: len(direct) >= 400 or not reader.is_alive(), "the direct client's NAL units", 60)

    received = [n for u in units for n in split_nals(u) if nal_type(n) not in (NAL_SPS, NAL_PPS)]
    server_side = {n for n in direct if nal_type(n) not in (NAL_SPS, NAL_PPS)}
    common = [n for n in received if n in server_side]
    assert len(common) >= 30, f"only {len(common)} of {len(received)} NAL units match the server's"
    hub = proxy.hubs[UPSTREAM]
    source = hub.source
    assert source.stats["decoded"] == 0 and source.stats["encoded"] == 0, source.stats
    assert source.stats["passed_through"] >= 60
    assert hub.encoder is None or not hub.encoder.running
    frames = []
    decoder = av.CodecContext.create("h264", "r")
    for unit in units:
        frames += decoder.decode(av.Packet(unit))
    assert len(frames) >= 55 and (frames[-1].width, frames[-1].height) == STREAM_SIZE


@pytest.mark.gen_test(timeout=120)
async def test_rtsp_decodes_only_while_jpeg_viewers_are_attached(rtsp_server, api, ws_connect, proxy):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    h264 = await ws_connect(f"/stream/{session_id}?format=h264")
    await h264_units(h264, 30)
    source = proxy.hubs[UPSTREAM].source
    assert source.stats["decoded"] == 0

    jpeg = await ws_connect(f"/stream/{session_id}?format=binary")
    jpegs = 0
    while jpegs < 10:
        message = await recv(jpeg, timeout=30)
        if isinstance(message, bytes) and message[:2] == b"\xff\xd8":
            jpegs += 1
    assert source.stats["decoded"] >= 10
    jpeg.close()
    await wait_until(lambda: not proxy.hubs[UPSTREAM].viewers["ws_binary"], "the JPEG viewer to leave")
    await asyncio.sleep(0.5)
    decoded = source.stats["decoded"]
    await h264_units(h264, 30)  # a second of video later
    assert source.stats["decoded"] == decoded, "decoding stopped with the last JPEG viewer"


@pytest.mark.parametrize("rtsp_server", [{"codec": "mjpeg"}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_mjpeg_over_rtsp_goes_through_the_shared_encoder(rtsp_server, api, ws_connect, proxy):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    units = await h264_units(conn, 30)
    hub = proxy.hubs[UPSTREAM]
    assert hub.encoder is not None and hub.encoder.running
    assert not hub.source.produces_h264
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for u in units for f in decoder.decode(av.Packet(u))]
    assert len(frames) >= 25 and (frames[0].width, frames[0].height) == STREAM_SIZE


@pytest.mark.parametrize("rtsp_server", [{"fps": 2}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_a_low_latency_camera_s_first_pictures_are_not_held_back(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811  (fixtures of test_rtsp_source)
    """A camera whose SPS rules out B-frames (the test server's x264 is Constrained Baseline, as
    low-latency encoders are) is passed through from its first access unit: nothing waits for
    the next ones to show the pictures come in order, which at 2 fps would be a second."""
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    ages = []
    while len(ages) < 3:
        message = await recv(conn, timeout=30)
        if isinstance(message, bytes):
            ages.append(time.time() - int.from_bytes(message[1:9], "big") / 1e6)
    # Once the server's RTCP reports came, a frame's time is its capture, which a live 2 fps
    # source ends 0.5 s before it sends it; the hold would add 1 s to the first one.
    assert max(ages) < 0.8, f"the first access units reached the viewer {ages} s after their capture"
    assert not proxy.hubs[UPSTREAM].source.b_frames
