"""What viewers may send and for how long they may watch: input bounded by size (close 1009) and
by byte rate (close 1008), viewer tokens that end a stream when they expire and can be renewed
without reconnecting (`POST /session/{id}/token`, a {"type": "token"} message, the embed player's
parent messages), watching separated from control, and upstream kinds that take no input saying
so once, quietly."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

import pytest
import tornado.web
from browser import chromium
from helpers import CREATE, WAIT, Mjpeg, free_port, recv, wait_until
from test_browser_pages import open_live_player
from test_openapi import Contract

from vsproxy.config import config_from_dict
from vsproxy.openapi import openapi_document
from vsproxy.schema import ConfigError

SECRET = "viewer-secret-0123456789-0123456789-abcdef"
TTL = 60
TOKENS = {"auth": {"viewer_tokens": {"enabled": True, "secret": SECRET, "ttl_seconds": TTL}}}


# -- helpers ----------------------------------------------------------------------------------------


def text_of(message: str | bytes | None) -> dict | None:
    """A server text message as a dict (None for frames, relayed non-JSON and the close)."""
    if not isinstance(message, str):
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and parsed.get("type") != "frame" else None


async def messages_until_closed(conn: Any, timeout: float = WAIT) -> list[dict]:
    """The status/error messages a viewer gets until its connection closes."""
    texts: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.01, deadline - time.monotonic()))
        if message is None:
            return texts
        parsed = text_of(message)
        if parsed is not None:
            texts.append(parsed)


async def next_text(conn: Any, timeout: float = WAIT) -> dict:
    """The next status/error message (frames on the way are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        parsed = text_of(await recv(conn, max(0.01, deadline - time.monotonic())))
        if parsed is not None and parsed.get("message") != "\u2705 Connected to video stream proxy":
            return parsed


async def frames(conn: Any, count: int) -> None:
    """Read until `count` frames arrived (the connection stays open and streaming)."""
    seen = 0
    while seen < count:
        message = await recv(conn)
        if isinstance(message, bytes) or (text_of(message) is None and '"frame"' in message):
            seen += 1


async def connected(api: Any, body: dict | None = None) -> dict:
    """A new session whose upstream is connected."""
    code, created, _ = await api.call("POST", "/session/create", body or CREATE)
    assert code == 200, created
    sid = created["sessionId"]

    async def up() -> bool:
        _, details, _ = await api.call("GET", f"/session/{sid}")
        return details["session"]["isIsaacSimConnected"]
    deadline = time.monotonic() + WAIT
    while not await up():
        assert time.monotonic() < deadline, "the upstream did not connect"
        await asyncio.sleep(0.05)
    return created


def inputs(sim: Any) -> list[str | bytes]:
    return list(sim.received)


def expiring_token(proxy: Any, session_id: str, in_seconds: float, *, control: bool = False) -> str:
    """A real token of this session that expires `in_seconds` from now (within a second: expiry
    is whole seconds)."""
    return proxy.access.viewer_tokens.issue(session_id, now=time.time() - TTL + in_seconds, control=control)


@pytest.mark.gen_test(timeout=30)
async def test_every_viewer_is_told_when_it_may_send_input(sim, api, ws_connect):
    """The README's rule, send after "Connected to upstream": a viewer that comes while the
    upstream is connected is told so right after the proxy's hello, in every WebSocket format, and
    its input sent then reaches the simulator. Before, only the viewers already there when the
    upstream connected were told, so a frontend following the README never sent anything."""
    sid = (await connected(api))["sessionId"]
    for fmt in ("json", "binary", "h264"):
        conn = await ws_connect(f"/stream/{sid}?format={fmt}")
        texts = [text_of(await recv(conn)), text_of(await recv(conn))]
        assert texts == [{"type": "status", "message": "\u2705 Connected to video stream proxy"},
                         {"type": "status", "message": "\u2705 Connected to upstream 'isaac'"}], (fmt, texts)
        await conn.write_message(f"hello from {fmt}")
        await wait_until(lambda fmt=fmt: f"hello from {fmt}" in inputs(sim), "the input at the simulator")
        conn.close()


# -- 1. input by size and by byte rate --------------------------------------------------------------


@pytest.mark.config({"streaming": {"max_viewer_message_bytes": 1024}})
@pytest.mark.gen_test(timeout=30)
async def test_a_message_over_the_relay_limit_closes_that_viewer_with_1009(sim, api, ws_connect, proxy):
    sid = (await connected(api))["sessionId"]
    bystander = await ws_connect(f"/stream/{sid}?format=binary")
    conn = await ws_connect(f"/stream/{sid}")
    await frames(conn, 1)
    at_limit = "y" * 1024
    await conn.write_message(at_limit)
    await wait_until(lambda: at_limit in inputs(sim), "the at-limit message at the upstream")

    await conn.write_message("x" * 1025)
    await messages_until_closed(conn)
    assert conn.close_code == 1009
    assert "x" * 1025 not in inputs(sim)
    # Bytes, not characters: 600 accented letters are 1200 bytes of UTF-8.
    conn = await ws_connect(f"/stream/{sid}")
    await frames(conn, 1)
    await conn.write_message("\u00e9" * 600)
    await messages_until_closed(conn)
    assert conn.close_code == 1009
    await wait_until(lambda: len(proxy.sessions.get(sid).viewers) == 1, "the refused viewers to be removed")
    await frames(bystander, 3)  # the others keep streaming


@pytest.mark.gen_test(timeout=30)
async def test_by_default_a_message_over_64_kib_is_refused_by_the_protocol(sim, api, ws_connect, proxy):
    """Tornado used to read messages up to 1 MiB although at most 64 KiB is ever relayed."""
    sid = (await connected(api))["sessionId"]
    conn = await ws_connect(f"/stream/{sid}")
    await frames(conn, 1)
    limit = proxy.config.streaming.max_viewer_message_bytes
    assert limit == 65536
    await conn.write_message(b"z" * (limit + 1), binary=True)
    texts = await messages_until_closed(conn)
    # 1009, unless the server's abort (it stops reading at the header) beat its Close frame.
    assert conn.close_code in (1009, None) and not [t for t in texts if t["type"] == "error"], texts
    await wait_until(lambda: not proxy.sessions.get(sid).viewers, "the viewer to be removed")
    assert inputs(sim) == []


@pytest.mark.config({"streaming": {"max_viewer_message_bytes": 1024},
                     "limits": {"viewer_input_bytes_rate": 100, "viewer_input_bytes_burst": 2500}})
@pytest.mark.gen_test(timeout=30)
async def test_input_beyond_the_byte_rate_gets_an_error_then_close_1008(sim, api, ws_connect, proxy):
    sid = (await connected(api))["sessionId"]
    bystander = await ws_connect(f"/stream/{sid}?format=binary")
    conn = await ws_connect(f"/stream/{sid}")
    await frames(conn, 1)
    sent = [f"{i}" * 1000 for i in range(4)]  # 4000 bytes at once: 2 fit the 2500-byte burst
    for message in sent:
        conn.write_message(message)
    texts = await messages_until_closed(conn)
    assert conn.close_code == 1008
    assert any(t["type"] == "error" and "Too much input" in t["message"] for t in texts), texts
    await wait_until(lambda: sent[1] in inputs(sim), "the messages within the burst at the upstream")
    assert sent[2] not in inputs(sim) and sent[3] not in inputs(sim)
    await frames(bystander, 3)


@pytest.mark.config({"limits": {"viewer_message_rate": 1, "viewer_message_burst": 2}})
@pytest.mark.gen_test(timeout=30)
async def test_a_flooder_that_ignores_the_close_is_hung_up_on_at_once(api, http_port, proxy):
    """Tornado waits 5 s for the client's answer to a Close frame, reading all it sends meanwhile;
    a refused flooder is not given that time."""
    sid = (await api.create_session())["sessionId"]
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(f"GET /stream/{sid}?format=binary HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    message = bytes((0x81, 0x80 | 5)) + b"\0\0\0\0" + b"input"  # masked with the zero key

    async def flood() -> None:
        while True:  # never answers the Close frame, never stops
            writer.write(message)
            await asyncio.sleep(0.01)

    async def until_hung_up() -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    flooding = asyncio.ensure_future(flood())
    started = time.monotonic()
    try:
        await asyncio.wait_for(until_hung_up(), 10)
    finally:
        flooding.cancel()
        writer.close()
    assert time.monotonic() - started < 2.5
    assert not proxy.sessions.get(sid).viewers


def test_the_byte_burst_must_fit_the_largest_message():
    with pytest.raises(ConfigError, match="viewer_input_bytes_burst: must be at least streaming.max_viewer"):
        config_from_dict({"limits": {"viewer_input_bytes_burst": 1000},
                          "streaming": {"max_viewer_message_bytes": 2000}})


# -- 2. token lifetime ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_a_websocket_viewer_is_closed_when_its_token_expires(api, ws_connect, proxy):
    sid = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{sid}?token={expiring_token(proxy, sid, 2.5)}")
    await frames(conn, 2)
    started = time.monotonic()
    texts = await messages_until_closed(conn, timeout=10)
    assert time.monotonic() - started < 4
    assert texts[-1] == {"type": "error", "message": "Viewer token expired"}
    assert (conn.close_code, conn.close_reason) == (4001, "viewer token expired")
    await wait_until(lambda: not proxy.sessions.get(sid).viewers, "the viewer to be removed")


@pytest.mark.slow
@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_an_mjpeg_response_ends_when_its_token_expires(api, http_port, proxy):
    sid = (await api.create_session())["sessionId"]
    viewer = await Mjpeg.open(http_port, f"/stream/{sid}/mjpeg?token={expiring_token(proxy, sid, 2.5)}")
    assert viewer.status == 200
    await viewer.parts(2)
    started = time.monotonic()
    with pytest.raises(Exception) as ended:  # the stream closes: no more parts
        await viewer.parts(10_000, timeout=10)
    assert type(ended.value).__name__ == "StreamClosedError"
    assert time.monotonic() - started < 4
    await wait_until(lambda: not proxy.sessions.get(sid).viewers, "the viewer to be removed")


@pytest.mark.slow
@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_a_fresh_token_keeps_a_viewer_streaming_without_reconnecting(api, ws_connect, proxy):
    sid = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{sid}?token={expiring_token(proxy, sid, 2.5)}")
    await frames(conn, 1)
    code, fresh, _ = await api.call("POST", f"/session/{sid}/token")
    assert code == 200, fresh
    await conn.write_message(json.dumps({"type": "token", "token": fresh["viewerToken"]}))
    reply = await next_text(conn)
    assert reply["type"] == "status" and reply["message"].startswith("Viewer token renewed"), reply
    assert fresh["expiresAt"] in reply["message"]
    await asyncio.sleep(3.6)  # past the first token's expiry
    await frames(conn, 3)
    assert conn.close_code is None
    assert len(proxy.sessions.get(sid).viewers) == 1


@pytest.mark.slow
@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_a_bad_fresh_token_is_refused_and_the_old_expiry_stays(api, ws_connect, proxy):
    sid = (await api.create_session())["sessionId"]
    other = (await api.create_session(user="someone-else"))["viewerToken"]
    conn = await ws_connect(f"/stream/{sid}?token={expiring_token(proxy, sid, 3)}")
    await frames(conn, 1)
    expired = proxy.access.viewer_tokens.issue(sid, now=time.time() - TTL - 5)
    for bad in (other, expired, "12.nonsense", 42):
        await conn.write_message(json.dumps({"type": "token", "token": bad}))
        reply = await next_text(conn)
        assert reply["type"] == "error" and "stays valid until" in reply["message"], reply
    texts = await messages_until_closed(conn, timeout=10)
    assert texts[-1]["message"] == "Viewer token expired"
    assert conn.close_code == 4001


@pytest.mark.config({**TOKENS, "auth": {**TOKENS["auth"], "api_tokens": ["api-token-0123456789abcdef"]}})
@pytest.mark.gen_test(timeout=30)
async def test_the_token_endpoint_issues_fresh_tokens_for_the_api(api, proxy):
    bearer = {"Authorization": "Bearer api-token-0123456789abcdef"}
    _, created, _ = await api.call("POST", "/session/create", CREATE, headers=bearer)
    sid = created["sessionId"]
    code, body, _ = await api.call("POST", f"/session/{sid}/token", headers=bearer)
    assert code == 200 and set(body) == {"success", "viewerToken", "expiresAt"}
    grant = proxy.access.viewer_tokens.verify(body["viewerToken"], sid)
    assert abs(grant.expires - (time.time() + TTL)) < 3 and not grant.control
    assert body["expiresAt"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(grant.expires)))
    code, body, _ = await api.call("POST", f"/session/{sid}/token", {"control": True}, headers=bearer)
    assert code == 200 and proxy.access.viewer_tokens.verify(body["viewerToken"], sid).control
    # The API credential is needed: a viewer cannot mint itself tokens.
    code, body, _ = await api.call("POST", f"/session/{sid}/token")
    assert code == 401 and body["success"] is False


@pytest.mark.gen_test(timeout=30)
async def test_token_endpoint_without_viewer_tokens_is_409(api, base_url):
    sid = (await api.create_session())["sessionId"]
    code, body, response = await api.call("POST", f"/session/{sid}/token")
    assert code == 409 and "off" in body["error"]
    contract = Contract(openapi_document())
    contract.check("POST", "/session/{sessionId}/token", code, response.headers, response.body)
    contract.assert_ok()


# -- 3. watching is not control ---------------------------------------------------------------------


@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_a_watch_token_cannot_send_control_input(sim, api, ws_connect):
    created = await connected(api)
    conn = await ws_connect(f"/stream/{created['sessionId']}?token={created['viewerToken']}")
    await frames(conn, 1)
    await conn.write_message('{"type": "input", "event": "keydown", "key": "w"}')
    reply = await next_text(conn)
    assert reply["type"] == "error" and "may not send control input" in reply["message"], reply
    await frames(conn, 2)  # still watching
    assert inputs(sim) == []


@pytest.mark.config(TOKENS)
@pytest.mark.gen_test(timeout=30)
async def test_a_control_token_sends_input_and_a_forged_claim_is_refused(sim, api, ws_connect):
    created = await connected(api, {**CREATE, "control": True})
    sid, token = created["sessionId"], created["viewerToken"]
    assert set(created) == {"success", "sessionId", "wsUrl", "httpStreamUrl", "message", "viewerToken", "expiresAt"}
    assert created["wsUrl"].endswith(f"?token={token}")
    conn = await ws_connect(f"/stream/{sid}?token={token}")
    await frames(conn, 1)
    await conn.write_message("from a control token")
    await wait_until(lambda: "from a control token" in inputs(sim), "the input at the upstream")

    # A watch token with the claim added is not a control token.
    code, watch, _ = await api.call("POST", f"/session/{sid}/token")
    expiry, signature = watch["viewerToken"].split(".")
    code, _, _ = await api.call("GET", f"/stream/{sid}/snapshot.jpg?token={expiry}.control.{signature}")
    assert code == 403
    # A watch connection upgraded by a fresh control token may send input from then on.
    conn = await ws_connect(f"/stream/{sid}?token={watch['viewerToken']}")
    await frames(conn, 1)
    code, control, _ = await api.call("POST", f"/session/{sid}/token", {"control": True})
    await conn.write_message(json.dumps({"type": "token", "token": control["viewerToken"]}))
    assert "watching and control" in (await next_text(conn))["message"]
    await conn.write_message("after the upgrade")
    await wait_until(lambda: "after the upgrade" in inputs(sim), "the input at the upstream")
    assert not any(control["viewerToken"] in str(m) for m in inputs(sim))  # token messages are never relayed


@pytest.mark.gen_test(timeout=30)
async def test_a_malformed_control_flag_is_400_and_creates_nothing(api, proxy):
    code, body, _ = await api.call("POST", "/session/create", {**CREATE, "control": "yes"})
    assert code == 400 and "'control'" in body["error"]
    assert proxy.sessions.all() == []


# -- 4. upstreams that take no input ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_input_to_an_upstream_that_takes_none_is_answered_once_with_a_status(api, ws_connect):
    sid = (await connected(api))["sessionId"]  # the demo upstream
    conn = await ws_connect(f"/stream/{sid}")
    await frames(conn, 1)
    for i in range(5):
        await conn.write_message(json.dumps({"type": "input", "n": i}))
    reply = await next_text(conn)
    assert reply == {"type": "status", "message": "Upstream 'demo' (demo) does not accept input; "
                                                  "messages are not relayed"}
    # Once per connection: nothing more comes for the other four.
    with pytest.raises(asyncio.TimeoutError):
        await next_text(conn, timeout=1.0)


# -- the embed player in Chromium -------------------------------------------------------------------


async def wait_page(page: Any, predicate: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {predicate}")
        await asyncio.sleep(0.05)


PLAYER = "({...window.vsproxyPlayer, state: document.body.dataset.state, " \
         "statusClass: document.getElementById('status').className})"


@pytest.mark.browser
@pytest.mark.gen_test(timeout=60)
async def test_embed_control_on_an_upstream_without_input_says_so_quietly(api, base_url):
    sid = (await api.create_session())["sessionId"]  # demo
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, sid, "control=1", frames=2)
        await page.click("#view", position={"x": 320, "y": 180})
        await page.keyboard.press("w")
        await asyncio.sleep(0.5)
        player = await page.evaluate(PLAYER)
        assert player["note"] == "This upstream does not accept input"
        assert player["statusClass"] != "error" and "not delivered" not in player["status"]
        assert await page.inner_text("#badge") == "view only"



@pytest.mark.browser
@pytest.mark.parametrize("forced", ["transport=webrtc", "mode=mjpeg"])
@pytest.mark.gen_test(timeout=60)
async def test_embed_control_on_a_player_without_websocket_says_so_quietly(sim, api, base_url, forced):
    """Input travels over the WebSocket: a player forced to WebRTC or MJPEG cannot send it, so it
    says why instead of showing the "control" badge (it did, and clicks and keys went nowhere)."""
    sid = (await api.create_session())["sessionId"]  # the simulator: it takes input
    async with chromium() as browser:
        page = await open_live_player(browser, base_url, sid, f"control=1&{forced}", frames=2)
        player = await page.evaluate(PLAYER)
        assert player["control"] is False, player
        assert player["note"] == f"Control input needs the WebSocket player: open it without ?{forced}"
        assert await page.inner_text("#badge") == "view only"

PARENT_PORT = free_port()
PARENT = f"http://127.0.0.1:{PARENT_PORT}"
PARENT_PAGE = """<!doctype html><meta charset=utf-8><title>parent</title><iframe id=player width=640 height=360>
</iframe><script>
window.received = [];
window.addEventListener("message", (ev) => window.received.push(ev.data));
document.getElementById("player").src = new URLSearchParams(location.search).get("embed");
</script>"""


class ParentHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish(PARENT_PAGE)


@pytest.fixture
def parent_page(io_loop):
    server = tornado.web.Application([(r"/", ParentHandler)]).listen(PARENT_PORT, address="127.0.0.1")
    yield PARENT
    server.stop()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.config({**TOKENS, "security": {"frame_ancestors": ["'self'", PARENT]}})
@pytest.mark.gen_test(timeout=60)
async def test_embed_takes_fresh_tokens_from_its_parent_frame(sim, api, base_url, proxy, parent_page):
    created = await api.create_session()
    sid = created["sessionId"]
    async with chromium() as browser:
        page = await browser.new_page()
        short = expiring_token(proxy, sid, 3)
        embed = f"{base_url}/stream/{sid}/embed?control=1&token={short}"
        await page.goto(f"{parent_page}/?embed={quote(embed, safe='')}")
        frame = page.frame_locator("#player")
        deadline = time.monotonic() + WAIT
        while not [f for f in page.frames if f.url.startswith(base_url)]:
            assert time.monotonic() < deadline, "the embed frame did not load"
            await asyncio.sleep(0.05)
        player = next(f for f in page.frames if f.url.startswith(base_url))
        await wait_page(player, "document.body.dataset.state === 'live'")
        # ?control=1 with a watch token: no control, said quietly.
        assert (await player.evaluate(PLAYER))["note"] == "This viewer token does not allow control"
        assert await frame.locator("#badge").inner_text() == "view only"

        # The token expires: the player ends and asks its parent for a fresh one.
        await wait_page(player, "document.body.dataset.state === 'ended'", timeout=10)
        assert "expired" in (await player.evaluate(PLAYER))["status"]
        await wait_page(page, "window.received.some((m) => m.type === 'vsproxy:token-expired')")
        fresh = proxy.access.viewer_tokens.issue(sid)
        await page.evaluate("(token) => document.getElementById('player').contentWindow.postMessage("
                            "{type: 'vsproxy:token', token}, '*')", fresh)
        await wait_page(player, "document.body.dataset.state === 'live'")

        # While streaming, a fresh token is handed over on the open socket (no reconnect).
        frames_before = (await player.evaluate(PLAYER))["frames"]
        await page.evaluate("(token) => document.getElementById('player').contentWindow.postMessage("
                            "{type: 'vsproxy:token', token}, '*')", proxy.access.viewer_tokens.issue(sid))
        await wait_page(player, "window.vsproxyPlayer.status.startsWith('Viewer token renewed')")
        await wait_page(player, f"window.vsproxyPlayer.frames > {frames_before + 5}")
        assert len(proxy.sessions.get(sid).viewers) == 1
