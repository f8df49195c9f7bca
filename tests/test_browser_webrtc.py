"""The embed player over WebRTC (WHEP) in a real headless Chromium: ?transport=webrtc plays into
the <video> element, getStats() counts the decoded frames, and the auto order starts with WebRTC."""

from __future__ import annotations

import asyncio
import time

import pytest
from browser import artifact, chromium
from helpers import wait_until
from test_browser_pages import is_not_blank, open_live_player, player_state, wait_page

from vsproxy.outputs.wire import WEBRTC
from vsproxy.simulate import SimulatedIsaacSim

pytestmark = pytest.mark.browser

FRAMES_DECODED = """async () => {
    const pc = window.vsproxyPeer();
    if (!pc) return 0;
    let decoded = 0;
    (await pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded || 0;
    });
    return decoded;
}"""


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_embed_player_plays_webrtc_into_a_video_element(api, base_url, proxy):
    created = await api.create_session()
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 640, "height": 360})
        await page.goto(f"{base_url}/stream/{created['sessionId']}/embed?transport=webrtc")
        await wait_page(page, "window.vsproxyPlayer.answerMs !== null", timeout=15)
        answered = time.monotonic()
        decoded = 0
        while decoded < 25:
            decoded = await page.evaluate(FRAMES_DECODED)
            assert time.monotonic() - answered < 3, f"only {decoded} frames decoded 3 s after the answer"
            await asyncio.sleep(0.05)
        state = await player_state(page)
        assert state["transport"] == "webrtc" and state["codec"] == "h264" and state["state"] == "live", state
        assert await page.text_content("#transport") == "WebRTC"
        assert await is_not_blank(page, "video")
        size = await page.evaluate("[document.getElementById('video').videoWidth, "
                                   "document.getElementById('video').videoHeight]")
        assert size == [320, 240]
        await page.screenshot(path=artifact("embed-webrtc.png"))
        hub = proxy.hubs["demo"]
        assert len(hub.viewers[WEBRTC]) == 1 and hub.encoder.running
        _, body, _ = await api.call("GET", f"/session/{created['sessionId']}")
        assert body["session"]["connections"] == 1
        await page.close()  # pagehide: the player DELETEs its WHEP resource
        deadline = time.monotonic() + 5
        while proxy.whep.peers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not proxy.whep.peers, "the closed page's peer was not ended"


@pytest.mark.slow  # an upstream outage longer than Chromium reports on a silent stream (8 s)
@pytest.mark.config({"h264": {"preset": "ultrafast"}, "streaming": {"stall_timeout_seconds": 3}})
@pytest.mark.gen_test(timeout=90)
async def test_a_peer_keeps_its_connection_through_an_upstream_outage(sim, api, base_url, proxy):
    """While the upstream is down nothing is sent, and Chromium stops its RTCP reports about the
    stream 8 s after the last packet: that silence is no stall. The peer stays, and plays again
    when the simulator is back."""
    created = await api.create_session()
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 640, "height": 360})
        await page.goto(f"{base_url}/stream/{created['sessionId']}/embed?transport=webrtc")
        await wait_page(page, "window.vsproxyPlayer.answerMs !== null", timeout=15)
        while await page.evaluate(FRAMES_DECODED) < 10:
            await asyncio.sleep(0.05)
        (peer,) = proxy.whep.peers.values()
        port = sim.port
        await sim.stop()
        await asyncio.sleep(8 + 3 + 2)  # Chromium's reports end, then a stall timeout and a tick
        assert list(proxy.whep.peers.values()) == [peer] and not peer.closed
        decoded = await page.evaluate(FRAMES_DECODED)
        restarted = SimulatedIsaacSim(width=320, height=240, fps=30)
        restarted.listen(port)
        try:
            await wait_page(page, f"({FRAMES_DECODED})().then((n) => n > {decoded + 30})", timeout=10)
            assert proxy.whep.peers == {peer.id: peer}
        finally:
            await restarted.stop()


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_auto_starts_with_webrtc_and_the_session_end_shows(api, base_url, proxy):
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], frames=10)
        state = await player_state(page)
        assert state["transport"] == "webrtc", repr(state)
        assert state["firstFrameMs"] < 3000, repr(state)  # about 0.2 s here; 4 s would fall back
        await api.call("DELETE", f"/session/{created['sessionId']}")
        await wait_page(page, "document.body.dataset.state === 'ended'")


@pytest.mark.config({"webrtc": {"enabled": False}, "h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_auto_without_webrtc_uses_the_websocket(api, base_url):
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], frames=10)
        state = await player_state(page)
        assert state["transport"] == "ws" and state["codec"] == "h264", state


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=90)
async def test_a_player_that_goes_away_deletes_its_peer_before_closing_it(api, base_url, proxy, caplog):
    """Leaving the page ends the peer with its DELETE, not with a 404 for a DELETE that came after
    the closed connection had already ended it (a warning in the operator's log for each viewer
    who left)."""
    created = await api.create_session()
    caplog.set_level("INFO", logger="vsproxy")
    async with chromium() as browser:
        page = await browser.new_page()
        for _ in range(4):
            await page.goto(f"{base_url}/stream/{created['sessionId']}/embed?transport=webrtc")
            await wait_page(page, "document.body.dataset.state === 'live' && window.vsproxyPlayer.frames > 3")
            await page.goto("about:blank")
            await wait_until(lambda: not proxy.whep.peers, "the peer to end")
    # Each peer got its DELETE, answered 200. Most often the DELETE ends it; where the unloading
    # page's connection closes first (a race in the browser), the DELETE still finds it ended.
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WebRTC peer closed")]
    assert len(ended) == 4, ended
    assert "WebRTC peer closed: ended by the client (DELETE)" in ended, ended
    deletes = [r.getMessage() for r in caplog.records if " DELETE /stream/" in r.getMessage()]
    assert len(deletes) == 4 and all(m.startswith("200 DELETE") for m in deletes), deletes
