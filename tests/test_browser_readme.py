"""The README's browser snippets for H.264, copied from README.md as they stand, run in a real
headless Chromium on the frontend's origin (http://localhost:3000, the default CORS origin): the
WebCodecs one decodes `format=h264`, the WHEP one plays WebRTC into a `<video>` and its resource
ends the peer. A snippet that stops working fails here, not in a reader's frontend."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from browser import artifact, chromium, page_server
from helpers import wait_until
from test_browser_pages import is_not_blank, wait_page

from vsproxy.outputs.wire import WEBRTC

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
FRONTEND_PORT = 3000
README_PROXY = "http://localhost:8889"  # the proxy's address in the README's snippets


def readme_snippet(marker: str) -> str:
    """The README's one fenced code block that contains `marker`."""
    blocks = re.findall(r"```(?:js|typescript|tsx)\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"README.md has {len(found)} code blocks with {marker!r}"
    return found[0]


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


@pytest.mark.config({"h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=60)
async def test_the_readme_webcodecs_snippet_decodes_h264(proxy, http_server, http_port):
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
