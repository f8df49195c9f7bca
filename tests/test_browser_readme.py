"""The README's browser snippets for H.264, copied from README.md as they stand, run in a real
headless Chromium on the frontend's origin (http://localhost:3000, the default CORS origin): the
WebCodecs one decodes `format=h264`, the WHEP one plays WebRTC into a `<video>` and its resource
ends the peer, the `<video src>` one plays `stream.mp4` close to live. A snippet that stops working
fails here, not in a reader's frontend."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from browser import README_PROXY, artifact, chromium, page_server, readme_snippet
from helpers import wait_until
from test_browser_pages import is_not_blank, wait_page

from vsproxy.outputs.fmp4 import decode_time_us
from vsproxy.outputs.wire import WEBRTC

pytestmark = pytest.mark.browser

FRONTEND_PORT = 3000


def frontend_page(snippet: str, proxy: str) -> str:
    """A page that creates a session as the README's first snippet does, provides the names the
    snippet uses (`ctx`, `video`, `sessionId`, `wsUrl`) and runs it; it counts drawn frames and
    keeps what went wrong in `window.failed`, the statuses of its DELETE requests in
    `window.deleted`, and its closing comment (`// to end it ...:`, then the code) as `window.endIt()`."""
    create = readme_snippet("/session/create")
    create = create[:create.index("const ws =")]  # the session part; the JPEG WebSocket is not wanted
    end = re.search(r"^// to end it.*:\n// (.*)$", snippet, re.M)
    return f"""<!doctype html><meta charset=utf-8><title>frontend</title>
<canvas id="canvas" width="320" height="240"></canvas>
<video id="video" autoplay muted playsinline width="320" height="240"></video>
<script type="module">
window.drawn = 0; window.failed = []; window.deleted = [];
const pageFetch = window.fetch;
window.fetch = async (url, init) => {{
  const response = await pageFetch(url, init);
  if (init && init.method === "DELETE") window.deleted.push(response.status);
  return response;
}};
const origError = console.error;
console.error = (...args) => {{ window.failed.push(args.map(String).join(" ")); origError(...args); }};
const video = document.getElementById("video");
const ctx = document.getElementById("canvas").getContext("2d");
const draw = ctx.drawImage.bind(ctx);
ctx.drawImage = (...args) => {{ window.drawn++; draw(...args); }};
try {{
{create.replace(README_PROXY, proxy)}
window.sessionId = sessionId;
{snippet.replace(README_PROXY, proxy)}
window.resource = typeof resource === "undefined" ? null : String(resource);
window.endIt = async () => {{ {end.group(1) if end else ""} }};
}} catch (err) {{ window.failed.push(String(err)); }}
</script>"""


@asynccontextmanager
async def snippet_page(marker: str, http_port: int, ready: str, screenshot: str) -> AsyncIterator[Any]:
    """The README's snippet with `marker`, running in Chromium on http://localhost:3000 against
    the proxy at `http_port`, once the JS expression `ready` holds, with nothing gone wrong."""
    html = frontend_page(readme_snippet(marker), f"http://127.0.0.1:{http_port}")
    with page_server(FRONTEND_PORT, html) as frontend:
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 700, "height": 300})
            await page.goto(frontend + "/")
            try:
                await wait_page(page, f"({ready}) || window.failed.length > 0", timeout=20)
            finally:
                await page.screenshot(path=artifact(screenshot))
            assert await page.evaluate("window.failed") == []
            yield page


FAST_H264 = {"h264": {"preset": "ultrafast"}}
VIEWER_TOKENS = {"auth": {"viewer_tokens": {"enabled": True, "secret": "s" * 32}}}


@pytest.mark.parametrize("tokens", [
    pytest.param(False, marks=pytest.mark.config(FAST_H264), id="open"),
    # wsUrl then carries ?token=: the snippet must add format=h264 to it, not a second '?'.
    pytest.param(True, marks=pytest.mark.config({**FAST_H264, **VIEWER_TOKENS}), id="viewer-tokens"),
])
@pytest.mark.gen_test(timeout=60)
async def test_the_readme_webcodecs_snippet_decodes_h264(proxy, http_server, http_port, tokens):
    assert (proxy.access.viewer_tokens is not None) == tokens
    async with snippet_page("new VideoDecoder", http_port, "window.drawn >= 30", "readme-webcodecs.png") as page:
        started, before = time.monotonic(), await page.evaluate("window.drawn")
        await wait_page(page, f"window.drawn >= {before + 40}", timeout=10)
        rate = (await page.evaluate("window.drawn") - before) / (time.monotonic() - started)
        assert rate >= 20, f"{rate:.1f} decoded frames a second"
        assert await is_not_blank(page, "canvas")
        assert proxy.hubs["demo"].encoder.running  # the snippet's socket is an H.264 viewer


@pytest.mark.gen_test(timeout=60)
async def test_the_readme_whep_snippet_plays_webrtc_and_its_resource_ends_the_peer(proxy, http_server, http_port):
    playing = "(v => v.readyState >= 2 && v.getVideoPlaybackQuality().totalVideoFrames >= 30)(video)"
    async with snippet_page("new RTCPeerConnection", http_port, playing, "readme-whep.png") as page:
        assert await page.evaluate("[video.videoWidth, video.videoHeight]") == [320, 240]
        assert await is_not_blank(page, "video")
        assert len(proxy.whep.peers) == 1 and len(proxy.hubs["demo"].viewers[WEBRTC]) == 1
        resource = await page.evaluate("window.resource")
        assert resource.startswith(f"http://127.0.0.1:{http_port}/stream/{await page.evaluate('sessionId')}/whep/")
        # The snippet's closing comment, as a reader would run it: the cross-origin DELETE ends the peer.
        await page.evaluate("window.endIt()")
        await wait_page(page, "window.deleted.length > 0")
        assert await page.evaluate("window.deleted") == [200]
        await wait_until(lambda: not proxy.whep.peers and not proxy.hubs["demo"].viewers[WEBRTC], "the peer to end")


def live_edge_seconds(hub: Any) -> float:
    """Where live is on stream.mp4's timeline (the seconds `<video>`'s currentTime counts): the
    newest access unit's decode time, plus how long ago it arrived."""
    newest = hub.gop[len(hub.gop) - 1]
    return decode_time_us(newest) / 1e6 + (time.monotonic() - newest.arrived)


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_the_readme_video_tag_snippet_plays_stream_mp4_close_to_live(proxy, http_server, http_port):
    """`<video src=stream.mp4>` as the README says: playing, and what it shows within 3 s of live
    (a `<video>` that only autoplays waits until Chromium has buffered seconds, then plays 4-8 s
    behind). Generous: the figures are bench/h264.py's (`video-tag`)."""
    playing = "video.readyState >= 2 && video.getVideoPlaybackQuality().totalVideoFrames >= 10"
    async with snippet_page("/stream.mp4`", http_port, playing, "readme-video-tag.png") as page:
        await asyncio.sleep(3)  # a lag that builds up while it plays shows too
        lags = []
        for _ in range(10):
            current = await page.evaluate("video.currentTime")
            lags.append(live_edge_seconds(proxy.hubs["demo"]) - current)
            await asyncio.sleep(0.2)
        state = await page.evaluate(
            "[video.videoWidth, video.videoHeight, video.paused, video.error && video.error.message]")
        print("video tag behind live (s)", [round(lag, 2) for lag in lags], state)
        assert state == [320, 240, False, None]
        assert max(lags) < 3.0, f"behind live by {max(lags):.1f} s"
