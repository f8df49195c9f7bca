"""WHEP from an RTSP upstream: the RTSP server's H.264 goes to a WebRTC peer (aiortc, in the
test) with no decode and no encode in the proxy. The GStreamer RTSP test server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from helpers import WhepClient
from test_rtsp_source import (  # noqa: F401  (fixtures)
    STREAM_SIZE,
    UPSTREAM,
    proxy_config,
    rtsp_server,
    rtsp_threads,
    rtsp_url,
)

from vsproxy.outputs.wire import WEBRTC

pytestmark = [pytest.mark.external, pytest.mark.slow]


@pytest.mark.gen_test(timeout=120)
async def test_whep_peer_gets_the_rtsp_h264_without_decode_or_encode(rtsp_server, api, proxy):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    client = WhepClient(api, f"/stream/{session_id}/whep")
    try:
        assert await client.connect() == 201
        frames = await client.frames(30, timeout=60)
        assert (frames[-1].width, frames[-1].height) == STREAM_SIZE
        hub = proxy.hubs[UPSTREAM]
        source = hub.source
        # Nothing decoded or encoded for the peer: the access units went through as they came.
        assert source.stats["decoded"] == 0 and source.stats["encoded"] == 0, source.stats
        assert source.stats["passed_through"] >= 30
        assert hub.encoder is None or not hub.encoder.running
        assert hub.stats[WEBRTC].frames_sent >= 30
        peer = next(iter(proxy.whep.peers.values()))
        assert peer.frames_dropped == 0
    finally:
        await client.close()
    await asyncio.sleep(0)
