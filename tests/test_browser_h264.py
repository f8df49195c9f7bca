"""The embed player decodes H.264 with WebCodecs in a real headless Chromium (http://127.0.0.1
is a secure context), falls back to or is forced to JPEG, and tells its parent page how it does."""

from __future__ import annotations

import asyncio
import time

import pytest
from browser import artifact, chromium, page_server
from test_browser_pages import is_not_blank, open_live_player, player_state, wait_page

pytestmark = pytest.mark.browser

PARENT_PORT = 3000  # an embedding page on the frontend's origin, http://localhost:3000

PARENT_PAGE = """<!doctype html><meta charset=utf-8><title>parent</title>
<iframe id="embed" width="640" height="360"></iframe>
<script>
window.stats = [];
window.addEventListener("message", (ev) => {
  if (ev.data && ev.data.type === "vsproxy:stats") window.stats.push(ev.data);
});
document.getElementById("embed").src = new URLSearchParams(location.search).get("embed");
</script>"""


@pytest.fixture
def parent(io_loop):
    with page_server(PARENT_PORT, PARENT_PAGE) as url:
        yield url


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_embed_player_decodes_h264_with_webcodecs(api, base_url, proxy):
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], "transport=ws")  # not WebRTC
        first = await player_state(page)
        assert first["codec"] == "h264", first
        assert await page.text_content("#codec") == "H.264"
        started = time.monotonic()
        await asyncio.sleep(3)
        later = await player_state(page)
        rate = (later["frames"] - first["frames"]) / (time.monotonic() - started)
        assert rate >= 20, f"{rate:.1f} decoded frames per second"
        assert await is_not_blank(page)
        size = await page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
        assert size == [320, 240]
        assert later["firstFrameMs"] is not None and later["firstFrameMs"] < 3000, later
        await page.screenshot(path=artifact("embed-h264.png"))
        assert proxy.hubs["demo"].encoder is not None and proxy.hubs["demo"].encoder.running


@pytest.mark.gen_test(timeout=60)
async def test_embed_player_codec_jpeg_forces_jpeg(api, base_url, proxy):
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], "codec=jpeg", frames=10)
        assert (await player_state(page))["codec"] == "jpeg"
        assert await page.text_content("#codec") == "JPEG"
        assert await is_not_blank(page)
    assert proxy.hubs["demo"].encoder is None, "a JPEG player never starts the encoder"


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_parent_page_receives_stats_messages(api, base_url, parent):
    created = await api.create_session()
    embed = f"{base_url}/stream/{created['sessionId']}/embed"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 800, "height": 500})
        await page.goto(f"{parent}/?embed={embed}")
        await wait_page(page, "window.stats.length >= 3 && window.stats[window.stats.length - 1].framesDecoded > 10",
                        timeout=20)
        stats = await page.evaluate("window.stats")
        last = stats[-1]
        assert set(last) == {"type", "codec", "transport", "fps", "framesDecoded", "state"}
        assert last["codec"] == "h264" and last["state"] == "live" and last["fps"] > 0
        assert last["transport"] == "webrtc"  # the auto order starts with WebRTC
        assert created["sessionId"] not in repr(stats)  # no session IDs, tokens or URLs


VIDEO_PAGE = """<!doctype html><meta charset=utf-8><title>video</title>
<video id="video" muted autoplay playsinline width="320" height="240"></video>
<script>
document.getElementById("video").src = new URLSearchParams(location.search).get("src");
</script>"""


@pytest.fixture
def video_page(io_loop):
    with page_server(PARENT_PORT, VIDEO_PAGE) as url:
        yield url


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_stream_mp4_plays_in_a_video_tag_of_another_origin(api, base_url, video_page):
    """`<video src=".../stream.mp4">` on the frontend's origin: Chromium plays the live stream
    (frames presented, time advancing at about real time), no player code involved."""
    created = await api.create_session()
    src = f"{base_url}/stream/{created['sessionId']}/stream.mp4"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 400, "height": 300})
        await page.goto(f"{video_page}/?src={src}")
        playing = "(v => v.readyState >= 2 && v.currentTime > 0.5)(document.getElementById('video'))"
        await wait_page(page, playing, timeout=20)
        state = ("(v => ({t: v.currentTime, frames: v.getVideoPlaybackQuality().totalVideoFrames, "
                 "w: v.videoWidth, h: v.videoHeight, error: v.error && v.error.message, "
                 "ahead: v.buffered.length ? v.buffered.end(v.buffered.length - 1) - v.currentTime : null}))"
                 "(document.getElementById('video'))")
        first = await page.evaluate(state)
        started = time.monotonic()
        await asyncio.sleep(3)
        later = await page.evaluate(state)
        elapsed = time.monotonic() - started
        print("video tag", first, later)
        assert later["error"] is None, later
        assert (later["w"], later["h"]) == (320, 240)
        assert 0.7 * elapsed < later["t"] - first["t"] < 1.3 * elapsed, (first, later)
        assert (later["frames"] - first["frames"]) / elapsed >= 20, (first, later)
        await page.screenshot(path=artifact("video-tag-mp4.png"))
