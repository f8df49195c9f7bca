"""The embed player with credentials on, in a real headless Chromium, embedded as the README
shows by a page on http://localhost:3000 (the default allowed frame ancestor): viewer tokens
refreshed by the parent over WebRTC (WHEP), and the end of a session seen with API tokens on."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

import pytest
from browser import chromium, page_server
from helpers import API_AUTH, BEARER, CREATE, VIEWER_AUTH, WAIT, wait_until
from test_browser_pages import wait_page
from test_viewer_input import TOKENS, expiring_token

pytestmark = pytest.mark.browser

PARENT_PORT = 3000
PARENT_PAGE = """<!doctype html><meta charset=utf-8><title>frontend</title>
<iframe id=player width=640 height=360 allow="autoplay; fullscreen"></iframe><script>
window.received = [];
window.addEventListener("message", (ev) => window.received.push({...ev.data, at: performance.now()}));
window.post = (token) => document.getElementById("player").contentWindow.postMessage(
  {type: "vsproxy:token", token}, "*");
document.getElementById("player").src = new URLSearchParams(location.search).get("embed");
</script>"""
PLAYER = "({...window.vsproxyPlayer, state: document.body.dataset.state})"
# The longest time between two pictures the <video> presents, from when this is run on.
WATCH_GAPS = """() => {
    const video = document.getElementById('video');
    window.gaps = {max: 0, last: performance.now()};
    const onFrame = () => {
        const now = performance.now();
        window.gaps.max = Math.max(window.gaps.max, now - window.gaps.last);
        window.gaps.last = now;
        video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
}"""


def expiry_of(token: str) -> float:
    """When a viewer token expires (epoch seconds): its first field."""
    return float(token.split(".")[0])


async def embedded_player(browser, base_url: str, parent: str, session_id: str, token: str):
    """(parent page, the player's frame) for the embed of `session_id` with `token`, once it plays."""
    page = await browser.new_page()
    embed = f"{base_url}/stream/{session_id}/embed?token={token}"
    await page.goto(f"{parent}/?embed={quote(embed, safe='')}")
    await wait_until(lambda: any(f.url.startswith(base_url) for f in page.frames), "the embed frame to load")
    player = next(f for f in page.frames if f.url.startswith(base_url))
    await wait_page(player, "document.body.dataset.state === 'live' && window.vsproxyPlayer.frames > 10")
    return page, player


@pytest.mark.slow  # three token lifetimes, in seconds
@pytest.mark.config({**TOKENS, "h264": {"preset": "ultrafast"}})
@pytest.mark.gen_test(timeout=90)
async def test_a_webrtc_player_takes_fresh_tokens_from_its_parent(io_loop, api, base_url, proxy):
    """The README's refresh flow over WebRTC, the player's default: a token posted before the old
    one expires keeps the same peer playing past that expiry without a gap; at the new expiry
    the parent is told at once and the player leaves "live"; a token posted then resumes it.
    Before, the posted token went nowhere: the peer was closed at the old expiry, the picture
    froze under a "live" overlay, and the parent heard nothing (only the WebSocket told it)."""
    sid = (await api.create_session())["sessionId"]
    first = expiring_token(proxy, sid, 4)
    with page_server(PARENT_PORT, PARENT_PAGE) as parent:
        async with chromium() as browser:
            page, player = await embedded_player(browser, base_url, parent, sid, first)
            assert (await player.evaluate(PLAYER))["transport"] == "webrtc"
            (peer,) = proxy.whep.peers.values()
            await player.evaluate(WATCH_GAPS)

            # Before the first token expires the parent hands over a fresh one: the same peer
            # plays on past the old expiry, with no picture missing.
            second = expiring_token(proxy, sid, 8)
            assert expiry_of(second) > expiry_of(first)
            await page.evaluate("(token) => window.post(token)", second)
            await wait_page(player, "window.vsproxyPlayer.status.startsWith('Viewer token renewed')")
            await asyncio.sleep(max(0.0, expiry_of(first) - time.time()) + 1.5)
            assert proxy.whep.peers == {peer.id: peer} and not peer.closed
            shown = await player.evaluate(PLAYER)
            assert shown["state"] == "live", shown
            gap = await player.evaluate("window.gaps.max")
            print(f"longest time between two pictures around the old token's expiry: {gap:.0f} ms")
            assert gap < 1000, f"the picture stopped for {gap:.0f} ms around the old token's expiry"
            assert not await page.evaluate("window.received.some((m) => m.type === 'vsproxy:token-expired')")

            # No fresh token this time: at its expiry the parent hears of it at once, and neither
            # the overlay nor the stats say "live" any more.
            await wait_until(lambda: peer.closed, "the second token's expiry", timeout=WAIT)
            closed = time.monotonic()
            await wait_page(page, "window.received.some((m) => m.type === 'vsproxy:token-expired')")
            told = time.monotonic() - closed
            print(f"vsproxy:token-expired {told * 1000:.0f} ms after the peer's token expired")
            assert told < 2, f"the parent was told {told:.1f} s after the expiry"
            shown = await player.evaluate(PLAYER)
            assert shown["state"] == "ended" and "expired" in shown["status"], shown
            await wait_page(page, """(() => {
                const expired = window.received.find((m) => m.type === 'vsproxy:token-expired');
                return window.received.some((m) => m.type === 'vsproxy:stats' && m.at > expired.at
                                                   && m.state === 'ended');
            })()""", timeout=3)

            # A token posted after the expiry resumes playback, over WebRTC again.
            frames = shown["frames"]
            await page.evaluate("(token) => window.post(token)", proxy.access.viewer_tokens.issue(sid))
            posted = time.monotonic()
            await wait_page(player, "document.body.dataset.state === 'live' && "
                                    f"window.vsproxyPlayer.frames > {frames + 5}")
            resumed = time.monotonic() - posted
            print(f"playing again {resumed * 1000:.0f} ms after the fresh token was posted")
            assert resumed < 2.5, f"playback resumed {resumed:.1f} s after the fresh token"
            assert (await player.evaluate(PLAYER))["transport"] == "webrtc"
            assert len(proxy.whep.peers) == 1


@pytest.mark.config({**API_AUTH, "h264": {"preset": "ultrafast"}})
@pytest.mark.parametrize("viewer_tokens", [
    pytest.param(False, id="viewer-tokens-off"),
    pytest.param(True, id="viewer-tokens-on", marks=pytest.mark.config(VIEWER_AUTH))])
@pytest.mark.parametrize("query", ["transport=webrtc", "mode=mjpeg"])
@pytest.mark.gen_test(timeout=60)
async def test_the_player_sees_its_session_end_with_api_tokens_on(sim, api, base_url, caplog, query, viewer_tokens):
    """With auth.api_tokens the player cannot read GET /session/{id}: it asks with what it has (its
    viewer token, if any). A picture stalled by an upstream outage costs no log line, and a
    destroyed session shows as ended within seconds. Before, every question was a 401, logged
    every 2 s, and the WebRTC player showed a frozen "live" picture for 18-20 s (MJPEG: for ever)."""
    caplog.set_level(logging.INFO, logger="vsproxy")
    code, created, _ = await api.call("POST", "/session/create", CREATE, headers=BEARER)
    assert code == 200, created
    sid = created["sessionId"]
    token = created.get("viewerToken")
    assert bool(token) == viewer_tokens
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 640, "height": 360})
        await page.goto(f"{base_url}/stream/{sid}/embed?{query}" + (f"&token={token}" if token else ""))
        await wait_page(page, "document.body.dataset.state === 'live' && window.vsproxyPlayer.frames > 10")

        await sim.stop()  # the picture stalls: the player asks whether its session is still there
        await asyncio.sleep(7)
        assert (await page.evaluate(PLAYER))["state"] != "ended"

        code, _, _ = await api.call("DELETE", f"/session/{sid}", headers=BEARER)
        assert code == 200
        destroyed = time.monotonic()
        await wait_page(page, "document.body.dataset.state === 'ended'", timeout=WAIT)
        ended = time.monotonic() - destroyed
        print(f"{query}: ended {ended * 1000:.0f} ms after the DELETE")
        assert ended < (1.5 if "webrtc" in query else 6), f"the player showed the end {ended:.1f} s after the DELETE"
        assert (await page.evaluate(PLAYER))["status"] == "Session ended"
    refused = [r.getMessage() for r in caplog.records
               if r.name == "vsproxy.access" and r.getMessage().startswith(("401", "403"))]
    assert not refused, refused
    asked = [r.getMessage() for r in caplog.records
             if r.name == "vsproxy.access" and r.levelno >= logging.INFO and "/status" in r.getMessage()]
    assert len(asked) <= 1, asked  # only the answer that the session is gone (404) is worth a line


@pytest.mark.config({**TOKENS})
@pytest.mark.gen_test(timeout=60)
async def test_a_websocket_player_refused_on_reconnect_for_an_expired_token_tells_its_parent(io_loop, api, base_url,
                                                                                              proxy):
    """Its socket drops just before the token expires, and its reconnect comes after: the
    handshake is refused (403), which a browser sees only as a close. The player asks its status,
    learns that its token expired, and tells the parent, as when the open socket is closed for
    the expiry; a token posted then plays again. Before, it tried twice more with the dead token
    and then fell back to MJPEG, refused as well, without a word to the parent."""
    sid = (await api.create_session())["sessionId"]
    token = expiring_token(proxy, sid, 3)
    with page_server(PARENT_PORT, PARENT_PAGE) as parent:
        async with chromium() as browser:
            page, player = await embedded_player(browser, base_url, parent, sid, f"{token}&transport=ws")
            (viewer,) = proxy.sessions.get(sid).viewers
            await asyncio.sleep(max(0.0, expiry_of(token) - time.time() - 0.2))
            viewer.close("upstream restarting")  # not the expiry: the player reconnects, 0.5 s later
            await wait_page(page, "window.received.some((m) => m.type === 'vsproxy:token-expired')", timeout=5)
            shown = await player.evaluate(PLAYER)
            assert shown["state"] == "ended" and shown["mode"] == "ws", shown  # no MJPEG fallback

            frames = shown["frames"]
            await page.evaluate("(token) => window.post(token)", proxy.access.viewer_tokens.issue(sid))
            await wait_page(player, "document.body.dataset.state === 'live' && "
                                    f"window.vsproxyPlayer.frames > {frames + 5}")
            assert (await player.evaluate(PLAYER))["mode"] == "ws"
