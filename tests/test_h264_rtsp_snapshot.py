"""A snapshot of an RTSP stream watched only in H.264 (so nothing decodes it to JPEG) is a
current picture: the request has the stream decoded and waits for the next keyframe's picture,
instead of a 503 or a picture as old as the last JPEG viewer. A real RTSP server (GStreamer's)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from test_h264_rtsp import h264_units
from test_rtsp_source import (  # noqa: F401  (fixtures)
    STREAM_SIZE,
    UPSTREAM,
    proxy_config,
    rtsp_server,
    rtsp_threads,
    rtsp_url,
)

pytestmark = pytest.mark.external


@pytest.mark.gen_test(timeout=120)
async def test_a_snapshot_of_an_h264_only_rtsp_stream_is_a_freshly_decoded_picture(
        rtsp_server, api, ws_connect, proxy):  # noqa: F811  (fixtures of test_rtsp_source)
    session_id = (await api.create_session())["sessionId"]
    h264 = await ws_connect(f"/stream/{session_id}?format=h264")
    await h264_units(h264, 30)
    source = proxy.hubs[UPSTREAM].source
    assert source.stats["decoded"] == 0
    code, _, response = await api.call("GET", f"/stream/{session_id}/snapshot.jpg")
    assert code == 200, response.body[:200]
    assert Image.open(io.BytesIO(response.body)).size == STREAM_SIZE
    assert source.stats["decoded"] >= 1
