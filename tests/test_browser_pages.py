"""The pages a user opens, in a real headless Chromium: the embed player, its control input, the
landing page, and the original setup's frontend on another origin (http://localhost:3000)
calling the REST API, opening the WebSocket, and showing the MJPEG <img> and the embed <iframe>
with the DEFAULT configuration."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from browser import artifact, chromium, page_server
from helpers import wait_until

pytestmark = pytest.mark.browser  # every test drives headless Chromium

FRONTEND_PORT = 3000  # the origin the default config allows: http://localhost:3000

# A stand-in for the Next.js frontend of the original README, using its integration snippets.
FRONTEND_PAGE = """<!doctype html><meta charset=utf-8><title>frontend</title>
<img id="mjpeg" width="320" height="240"> <span id="ws-frames">0</span> <span id="error"></span>
<iframe id="embed" width="640" height="360" allow="autoplay; fullscreen"></iframe>
<script>
(async () => {
  try {
    const proxy = new URLSearchParams(location.search).get("proxy");
    const response = await fetch(proxy + "/session/create", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({userId: "user123", robotName: "demo-robot"})});
    const {sessionId, wsUrl, httpStreamUrl} = await response.json();
    window.sessionId = sessionId;
    const ws = new WebSocket(wsUrl);
    let frames = 0;
    ws.onmessage = (event) => {
      const data = JSON.parse(event.data);
      if (data.type === "frame") document.getElementById("ws-frames").textContent = ++frames;
    };
    ws.onerror = () => { document.getElementById("error").textContent = "websocket error"; };
    document.getElementById("mjpeg").src = httpStreamUrl;
    document.getElementById("embed").src = `${proxy}/stream/${sessionId}/embed`;
  } catch (e) { document.getElementById("error").textContent = String(e); }
})();
</script>"""


@pytest.fixture
def frontend(io_loop):
    """The frontend page served on 127.0.0.1:3000 (browsed as http://localhost:3000)."""
    with page_server(FRONTEND_PORT, FRONTEND_PAGE) as url:
        yield url


async def player_state(page) -> dict:
    return await page.evaluate("({...window.vsproxyPlayer, state: document.body.dataset.state})")


async def open_live_player(browser, base_url: str, session_id: str, query: str = "", frames: int = 0):
    """A new 640x360 page with the embed player of `session_id` (`query`: its options), once it
    is live and has shown more than `frames` frames."""
    page = await browser.new_page(viewport={"width": 640, "height": 360})
    await page.goto(f"{base_url}/stream/{session_id}/embed" + (f"?{query}" if query else ""))
    await wait_page(page, f"document.body.dataset.state === 'live' && window.vsproxyPlayer.frames > {frames}")
    return page


async def is_not_blank(page, element_id: str = "view") -> bool:
    """Some pixel of what the element (a canvas or a video) shows differs from the first one (a
    test pattern, not a flat fill or nothing)."""
    return await page.evaluate("""(id) => {
        const source = document.getElementById(id);
        const w = source.videoWidth ?? source.width, h = source.videoHeight ?? source.height;
        if (!w || !h) return false;
        const c = document.createElement('canvas');
        c.width = w; c.height = h;
        const g = c.getContext('2d');
        g.drawImage(source, 0, 0);
        const d = g.getImageData(0, 0, w, h).data;
        for (let i = 4; i < d.length; i += 4 * 97) if (d[i] !== d[0] || d[i+1] !== d[1] || d[i+2] !== d[2]) return true;
        return false;
    }""", element_id)


async def wait_page(page, predicate: str, timeout: float = 15) -> None:
    """Poll a JS expression through DevTools (Playwright's wait_for_function evaluates strings in
    the page, which the pages' Content-Security-Policy rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not await page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {predicate}")
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=60)
async def test_embed_player_displays_frames(api, base_url):
    created = await api.create_session()
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 640, "height": 360})
        # The WebSocket player (auto would start with WebRTC: see test_browser_webrtc.py).
        await page.goto(f"{base_url}/stream/{created['sessionId']}/embed?transport=ws")
        await wait_page(page, "document.body.dataset.state === 'live'")
        first = await player_state(page)
        await wait_page(page, f"window.vsproxyPlayer.frames > {first['frames'] + 10}")
        await wait_page(page, "Number(document.getElementById('fps').textContent) > 5")
        assert await is_not_blank(page)
        size = await page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
        assert size == [320, 240]  # the demo source's size in the test config
        await page.screenshot(path=artifact("embed.png"))
    _, body, _ = await api.call("GET", f"/session/{created['sessionId']}")
    assert body["session"]["connections"] == 0  # the closed page is no longer counted


@pytest.mark.gen_test(timeout=60)
async def test_embed_player_with_control_sends_input_to_the_simulator(sim, api, base_url):
    created = await api.create_session()
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 640, "height": 480})
        await page.goto(f"{base_url}/stream/{created['sessionId']}/embed?control=1")
        await wait_page(page, "document.body.dataset.state === 'live' && window.vsproxyPlayer.frames > 2")
        await page.click("#view", position={"x": 320, "y": 240})
        await page.keyboard.press("w")

        def inputs() -> list[dict]:
            found = []
            for message in list(sim.received):
                try:
                    parsed = json.loads(message)
                except (TypeError, ValueError):
                    continue
                if isinstance(parsed, dict) and parsed.get("type") == "input":
                    found.append(parsed)
            return found

        await wait_until(lambda: any(m.get("event") == "keydown" and m.get("key") == "w" for m in inputs()),
                         "the key press at the simulator")
        await wait_until(lambda: any(m.get("event") == "pointerdown" for m in inputs()), "the click at the simulator")
        click = next(m for m in inputs() if m.get("event") == "pointerdown")
        assert 0.4 < click["x"] < 0.6 and 0.4 < click["y"] < 0.6  # normalised to the picture
        # The fields the README lists for simulator developers, no more, no fewer.
        key = next(m for m in inputs() if m.get("event") == "keydown")
        assert set(key) == {"type", "event", "key", "code", "repeat", "shift", "ctrl", "alt", "meta"}, key
        assert set(click) == {"type", "event", "x", "y", "button", "buttons", "pointerType",
                              "shift", "ctrl", "alt", "meta"}, click


@pytest.mark.gen_test(timeout=60)
async def test_embed_player_mjpeg_mode_shows_the_stream_frame_rate(api, base_url):
    """The overlay's fps in MJPEG mode is the stream's (30 here), not a sampling timer's 10."""
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], "mode=mjpeg", frames=5)
        await wait_page(page, "Number(document.getElementById('fps').textContent) >= 20", timeout=10)


@pytest.mark.gen_test(timeout=60)
async def test_embed_player_shows_the_session_ended(api, base_url):
    created = await api.create_session()
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{base_url}/stream/{created['sessionId']}/embed")
        await wait_page(page, "document.body.dataset.state === 'live'")
        await api.call("POST", f"/session/{created['sessionId']}/destroy")
        await wait_page(page, "document.body.dataset.state === 'ended'")


@pytest.mark.gen_test(timeout=60)
async def test_landing_page_starts_a_demo_session(proxy, http_server, base_url):
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1000, "height": 800})
        errors: list[str] = []
        page.on("console", lambda msg: msg.type in ("error", "warning") and errors.append(msg.text))
        await page.goto(base_url + "/")
        await page.click("#start")
        await wait_until(lambda: len(proxy.sessions) == 1, "the session to be created")
        player = page.frame_locator("#player")
        await player.locator("body[data-state='live']").wait_for(state="attached", timeout=15_000)
        await page.screenshot(path=artifact("landing.png"))
        # Neither errors nor warnings (the player's iframe once drew "Allow attribute will take
        # precedence over 'allowfullscreen'"); a Content Security Policy violation would be an error.
        assert not errors, errors


@pytest.mark.gen_test(timeout=90)
async def test_frontend_on_another_origin_works_with_the_default_config(proxy, http_server, http_port, frontend):
    """The original setup: frontend at http://localhost:3000, proxy elsewhere, default CORS."""
    proxy_url = f"http://127.0.0.1:{http_port}"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1000, "height": 700})
        console: list[str] = []
        page.on("console", lambda msg: console.append(msg.text))
        await page.goto(f"{frontend}/?proxy={proxy_url}")
        # REST (cross-origin fetch with a JSON body: a CORS preflight) and the WebSocket.
        try:
            await wait_page(page, "Number(document.getElementById('ws-frames').textContent) >= 5", timeout=20)
        except Exception:
            error = await page.evaluate("document.getElementById('error').textContent")
            raise AssertionError(f"no WebSocket frames in the frontend: {error!r}; console: {console}") from None
        assert len(proxy.sessions) == 1
        # The MJPEG <img> shows frames.
        await wait_page(page, "document.getElementById('mjpeg').naturalWidth === 320", timeout=20)
        # The embed <iframe> plays.
        embed = page.frame_locator("#embed")
        await embed.locator("body[data-state='live']").wait_for(state="attached", timeout=20_000)
        frame = next(f for f in page.frames if "/embed" in f.url)
        started = time.monotonic()
        while await frame.evaluate("window.vsproxyPlayer.frames") < 10:
            assert time.monotonic() - started < 20, "the embedded player stopped getting frames"
            await asyncio.sleep(0.1)
        await page.screenshot(path=artifact("frontend-cross-origin.png"))
        assert not [c for c in console if "blocked by CORS" in c or "Refused to frame" in c], console


@pytest.mark.parametrize(("query", "codec", "note"), [
    ("codec=h264&fps=5&transport=ws", "jpeg", "?fps caps JPEG frames: playing JPEG"),
    ("transport=webrtc&codec=jpeg", "h264", "WebRTC carries H.264: ?codec=jpeg does not apply"),
    ("codec=vp9&transport=ws", "h264", "?codec=vp9 is not an option here"),
])
@pytest.mark.gen_test(timeout=60)
async def test_embed_player_says_which_of_its_options_gave_way(api, base_url, query, codec, note):
    """Options that cannot all hold, or are unknown, do not pass silently: the player plays what
    it can and its overlay says which option gave way."""
    created = await api.create_session()
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, created["sessionId"], query, frames=2)
        player = await player_state(page)
        assert player["codec"] == codec and player["note"] == note, player
        assert await page.inner_text("#note") == note
