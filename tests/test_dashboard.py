"""The operator dashboard: the state JSON, the event stream, thumbnails and static files over HTTP,
and the page itself in headless Chromium with a simulated Isaac Sim as the upstream.

Screenshots go to test-artifacts/ (dashboard.png, dashboard-phone.png, dashboard-down.png).
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from browser import artifact, chromium
from helpers import basic, read_until_closed, spawn, wait_until
from PIL import Image
from tornado.iostream import IOStream
from tornado.tcpclient import TCPClient

from vsproxy import __version__
from vsproxy.outputs import TRANSPORTS

SIM_FPS = 30  # the `sim` fixture's rate
FPS_RANGE = (15, 40)  # "near the upstream rate" on a loaded CI machine


async def watch(ws_connect, path: str) -> asyncio.Task:
    """A WebSocket viewer that reads every message, as a player does (a viewer that reads
    nothing stalls once the socket buffers fill, and rightly gets no more frames)."""
    conn = await ws_connect(path)

    return spawn(read_until_closed(conn, timeout=None))


async def raw_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET `path` exactly as written (no client-side `..` normalisation), over HTTP/1.0."""
    stream = await TCPClient().connect("127.0.0.1", port)
    try:
        await stream.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode("latin-1"))
        data = await asyncio.wait_for(stream.read_until_close(), 10)
    finally:
        stream.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


async def open_events(port: int) -> tuple[IOStream, dict[str, str]]:
    """The event stream over HTTP/1.0, so the body is the raw events (no chunked framing)."""
    stream = await TCPClient().connect("127.0.0.1", port)
    await stream.write(b"GET /dashboard/api/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    head = (await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), 10)).decode("latin-1")
    status_line, *lines = head.strip().split("\r\n")
    assert status_line.split()[1] == "200", head
    return stream, {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}


async def next_state(stream: IOStream) -> dict:
    event = (await asyncio.wait_for(stream.read_until(b"\n\n"), 5)).decode("utf-8")
    data = [line[len("data: "):] for line in event.split("\n") if line.startswith("data: ")]
    assert len(data) == 1, event
    return json.loads(data[0])


# -- HTTP ------------------------------------------------------------------------------------------


SESSION_KEYS = {
    "id", "userId", "robotName", "upstream", "upstreamState", "upstreamDown", "viewers", "viewersTotal",
    "fpsIn", "fpsOut", "bytesPerSecondOut", "framesDropped", "frameAgeMs", "createdAt", "ageSeconds",
    "lastActivity", "thumbnailUrl", "viewerToken", "fpsHistory",
}
UPSTREAM_KEYS = {
    "name", "kind", "state", "down", "lastError", "connects", "failures", "fpsIn", "bytesPerSecondIn",
    "framesIn", "sessions", "viewers", "encoder", "bFrames", "fpsHistory", "thumbnailUrl",
}
TOTAL_KEYS = {
    "sessions", "maxSessions", "viewers", "viewersByTransport", "upstreams", "upstreamsUp", "upstreamsDown",
    "fpsIn", "bytesPerSecondIn", "fpsOut", "bytesPerSecondOut", "uptimeSeconds", "version",
}


@pytest.mark.gen_test(timeout=30)
async def test_state_has_totals_sessions_and_upstreams(sim, proxy, api, ws_connect):
    alice = (await api.create_session("alice", "arm-1"))["sessionId"]
    bob = (await api.create_session("bob", "rover-2"))["sessionId"]
    viewer = await watch(ws_connect, f"/stream/{alice}?format=binary")

    async def state() -> dict:
        code, body, response = await api.call("GET", "/dashboard/api/state")
        assert code == 200 and response.headers["Content-Type"].startswith("application/json")
        return body

    # Rates are sampled once a second: wait until a whole second of the viewer is in one.
    deadline = time.monotonic() + 10
    while True:
        body = await state()
        sessions = {s["id"]: s for s in body["sessions"]}
        if FPS_RANGE[0] <= sessions[alice]["fpsOut"] <= FPS_RANGE[1]:
            break
        assert time.monotonic() < deadline, sessions[alice]
        await asyncio.sleep(0.2)
    viewer.cancel()

    assert set(body) == {"generatedAt", "transportLabels", "totals", "sessions", "upstreams"}
    totals = body["totals"]
    assert set(totals) == TOTAL_KEYS
    assert totals["sessions"] == 2 and totals["viewers"] == 1 and totals["version"] == __version__
    assert totals["viewersByTransport"] == {**dict.fromkeys(TRANSPORTS, 0), "ws_binary": 1}
    assert totals["upstreamsUp"] == 1 and totals["upstreamsDown"] == 0
    assert FPS_RANGE[0] <= totals["fpsIn"] <= FPS_RANGE[1]
    assert totals["fpsOut"] > 0 and totals["bytesPerSecondOut"] > 0 and totals["bytesPerSecondIn"] > 0
    assert totals["uptimeSeconds"] >= 0

    a, b = sessions[alice], sessions[bob]
    assert set(a) == SESSION_KEYS and set(b) == SESSION_KEYS
    assert (a["userId"], a["robotName"], a["upstream"], a["upstreamState"]) == ("alice", "arm-1", "isaac", "connected")
    assert a["upstreamDown"] is False
    assert a["viewers"] == {**dict.fromkeys(TRANSPORTS, 0), "ws_binary": 1} and a["viewersTotal"] == 1
    assert b["viewers"] == dict.fromkeys(TRANSPORTS, 0) and b["fpsOut"] == 0 and b["bytesPerSecondOut"] == 0
    assert FPS_RANGE[0] <= a["fpsIn"] <= FPS_RANGE[1]
    # One viewer of 320x240 JPEGs: a few kB a frame.
    assert 1000 * a["fpsOut"] < a["bytesPerSecondOut"] < 200_000 * a["fpsOut"]
    assert a["framesDropped"] >= 0 and a["ageSeconds"] >= 0
    assert a["thumbnailUrl"] == b["thumbnailUrl"] == "/dashboard/api/thumbnail/isaac.jpg"
    assert a["viewerToken"] is None  # viewer tokens off
    assert a["lastActivity"].endswith("Z") and a["createdAt"].endswith("Z")
    history = a["fpsHistory"]
    assert set(history) == {"in", "out"} and 1 <= len(history["out"]) == len(history["in"]) <= 60
    assert history["out"][-1] == a["fpsOut"]

    upstreams = {u["name"]: u for u in body["upstreams"]}
    isaac = upstreams["isaac"]
    assert set(isaac) == UPSTREAM_KEYS
    assert (isaac["kind"], isaac["state"], isaac["down"], isaac["sessions"]) == ("isaac", "connected", False, 2)
    assert isaac["connects"] == 1 and isaac["failures"] == 0 and isaac["lastError"] is None
    assert isaac["fpsHistory"] and max(isaac["fpsHistory"]) > 0
    assert upstreams["demo"]["state"] == "idle" and upstreams["demo"]["sessions"] == 0
    assert upstreams["demo"]["thumbnailUrl"] is None  # no frame yet: the page shows a placeholder


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
async def test_event_stream_pushes_the_state_every_second_only_while_connected(sim, proxy, api, http_port):
    session = (await api.create_session())["sessionId"]
    monitor = proxy.monitor
    assert not monitor.pushing  # no dashboard open: no push timer

    stream, headers = await open_events(http_port)
    try:
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-store"
        started = time.monotonic()
        first = await next_state(stream)  # at once, not after a second
        assert time.monotonic() - started < 1.0
        assert monitor.pushing and len(monitor.listeners) == 1
        second = await next_state(stream)
        third = await next_state(stream)
        gap = time.monotonic() - started
        assert 1.0 <= gap <= 5.0, gap  # one a second, not a flood
        assert first["generatedAt"] < second["generatedAt"] < third["generatedAt"]
        for state in (first, second, third):
            assert [s["id"] for s in state["sessions"]] == [session]
            assert set(state["totals"]) == TOTAL_KEYS
    finally:
        stream.close()
    await wait_until(lambda: not monitor.listeners and not monitor.pushing, "the push timer to stop", timeout=5)


@pytest.mark.gen_test(timeout=30)
async def test_thumbnail_is_small_shared_and_made_at_most_once_a_second(sim, proxy, api):
    # Before any frame: 503 JSON; unknown upstream: 404 JSON.
    code, body, _ = await api.call("GET", "/dashboard/api/thumbnail/demo.jpg")
    assert code == 503 and body["success"] is False and "frame" in body["error"]
    code, body, _ = await api.call("GET", "/dashboard/api/thumbnail/nope.jpg")
    assert code == 404 and body == {"success": False, "error": "No such upstream"}

    await api.create_session()
    hub = proxy.hubs["isaac"]
    await wait_until(lambda: hub.latest is not None, what="a frame from the simulator")
    started = time.monotonic()
    code, _, response = await api.call("GET", "/dashboard/api/thumbnail/isaac.jpg")
    assert code == 200 and response.headers["Content-Type"] == "image/jpeg"
    first = response.body
    with Image.open(io.BytesIO(first)) as image:
        assert image.format == "JPEG" and image.size == (160, 120)  # 320x240 scaled to 160 wide

    # Within a second every request gets the same picture, although the simulator sends 30 new
    # frames a second (each with a different clock and counter).
    seq = hub.latest.seq
    while time.monotonic() - started < 0.6:
        assert (await api.call("GET", "/dashboard/api/thumbnail/isaac.jpg"))[2].body == first
        await asyncio.sleep(0.05)
    assert hub.latest.seq > seq, "the simulator kept sending while the thumbnail stayed"
    await asyncio.sleep(1.1)
    later = (await api.call("GET", "/dashboard/api/thumbnail/isaac.jpg"))[2].body
    assert later != first


@pytest.mark.gen_test(timeout=30)
async def test_static_files_are_served_and_nothing_outside_the_folder(api, http_port):
    for path in ("/dashboard", "/dashboard/", "/dashboard/index.html"):
        status, headers, body = await raw_get(http_port, path)
        assert status == 200, path
        assert headers["content-type"].startswith("text/html")
        assert b'src="/dashboard/dashboard.js"' in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    for path, kind in (("/dashboard/dashboard.js", "javascript"), ("/dashboard/dashboard.css", "text/css")):
        status, headers, body = await raw_get(http_port, path)
        assert status == 200 and kind in headers["content-type"] and body, path

    secrets = (b"setup(", b"class Proxy", b"root:", b"import ", b"[project", b"__version__")
    for path in (
        "/dashboard/..%2f..%2fsetup.py",
        "/dashboard/../vsproxy/app.py",
        "/dashboard/../setup.py",
        "/dashboard/%2e%2e/%2e%2e/setup.py",
        "/dashboard/%2e%2e%2fvsproxy%2fapp.py",
        "/dashboard/..%5c..%5csetup.py",
        "/dashboard//etc/passwd",
        "/dashboard/%2fetc%2fpasswd",
        "/dashboard/vendor/../../vsproxy/__init__.py",
        "/dashboard/README.md",  # in the folder, but not part of the page
    ):
        status, _, body = await raw_get(http_port, path)
        assert status in (403, 404), (path, status)
        assert not any(s in body for s in secrets), (path, body[:200])


# -- the page in Chromium --------------------------------------------------------------------------


def row(session_id: str) -> str:
    return f'tr.session[data-session-id="{session_id}"]'


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_dashboard_page_live_in_chromium(sim, proxy, api, ws_connect, base_url):
    alice = (await api.create_session("alice", "arm-1"))["sessionId"]
    bob = (await api.create_session("bob", "rover-2"))["sessionId"]
    carol = (await api.create_session("carol", "arm-3"))["sessionId"]
    viewers = [await watch(ws_connect, path) for path in
               (f"/stream/{alice}?format=binary", f"/stream/{alice}", f"/stream/{carol}?format=binary")]

    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1600, "height": 900})
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        page = await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
        dialogs: list[str] = []

        async def accept(dialog) -> None:
            dialogs.append(dialog.message)
            await dialog.accept()

        page.on("dialog", accept)

        await page.goto(base_url + "/dashboard")
        # Every session shows within 2 s.
        for session in (alice, bob, carol):
            await page.locator(row(session)).wait_for(timeout=2000)
        a = page.locator(row(alice))
        assert await a.locator("td.user").text_content() == "alice"
        assert await a.locator("td.robot").text_content() == "arm-1"
        assert await a.locator("td.upstream").text_content() == "isaacconnected"
        assert await a.get_attribute("data-state") == "connected"
        assert "down" not in (await a.get_attribute("class")).split()
        assert await page.text_content("#total-sessions") == "3"
        assert await page.text_content("#total-viewers") == "3"
        assert await page.text_content("#total-version") == __version__

        # fps in and out near the simulator's 30 (alice has two viewers: twice that out).
        await page.wait_for_function(
            """([sel, lo, hi]) => {
                const r = document.querySelector(sel);
                const fin = parseFloat(r.querySelector('.fps-in').textContent);
                const fout = parseFloat(r.querySelector('.fps-out').textContent);
                return fin >= lo && fin <= hi && fout >= 2 * lo && fout <= 2 * hi;
            }""", arg=[row(alice), *FPS_RANGE], timeout=10_000)
        fps_in = float(await a.locator(".fps-in").text_content())
        assert FPS_RANGE[0] <= fps_in <= FPS_RANGE[1]
        assert float(await page.locator(row(bob)).locator(".fps-out").text_content()) == 0
        assert "ws bin 1" in await a.locator("td.viewers").text_content()

        # Thumbnails are loaded pictures; sparklines have points.
        await page.wait_for_function(
            """() => [...document.querySelectorAll('tr.session img.thumb')]
                .every(img => img.complete && img.naturalWidth > 0)""", timeout=5000)
        assert await a.locator("img.thumb").evaluate("img => img.naturalWidth") == 160
        await page.wait_for_function(
            f"""() => document.querySelector('{row(alice)} svg.spark polyline.out')
                .getAttribute('points').split(' ').length >= 2""", timeout=5000)

        # The filter matches user or robot.
        await page.fill("#filter", "ROVER")
        assert await page.locator(row(bob)).is_visible() and not await a.is_visible()
        await page.fill("#filter", "arm")
        assert await a.is_visible() and await page.locator(row(carol)).is_visible()
        assert not await page.locator(row(bob)).is_visible()
        await page.fill("#filter", "")

        # Sorting by a column header, and again to reverse.
        users = 'tr.session:not([hidden]) td.user'
        await page.click('th[data-sort="userId"]')
        assert await page.locator(users).all_text_contents() == ["alice", "bob", "carol"]
        await page.click('th[data-sort="userId"]')
        assert await page.locator(users).all_text_contents() == ["carol", "bob", "alice"]
        assert await page.get_attribute('th[data-sort="userId"]', "aria-sort") == "descending"

        # The copy button copies the full ID; the embed link opens the player in a new tab.
        await a.locator("button.copy-id").click()
        assert await page.evaluate("navigator.clipboard.readText()") == alice
        embed = a.locator("a.embed")
        assert await embed.get_attribute("href") == f"{base_url}/stream/{alice}/embed"
        assert await embed.get_attribute("target") == "_blank"

        await page.screenshot(path=artifact("dashboard.png"), full_page=True)
        phone = await browser.new_page(viewport={"width": 390, "height": 844})
        await phone.goto(base_url + "/dashboard")
        await phone.locator(row(alice)).wait_for(timeout=2000)
        await phone.wait_for_function(
            "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=5000)
        # Cards, not a table wider than the phone.
        assert await phone.evaluate("document.documentElement.scrollWidth") <= 390
        await phone.screenshot(path=artifact("dashboard-phone.png"), full_page=True)
        await phone.close()
        # A 1280 px laptop, and a window narrower than the table: every action button is whole and
        # in view, the table scrolling under the Actions column where it must (before, "Open embed"
        # and "Copy URLs" were cut off at the right edge: found by a new-user walkthrough).
        for width in (1280, 1000):
            laptop = await browser.new_page(viewport={"width": width, "height": 800})
            await laptop.goto(base_url + "/dashboard")
            await laptop.locator(row(alice)).wait_for(timeout=2000)
            cut = await laptop.evaluate("""() => {
                const view = document.querySelector('#sessions').closest('.scroll').getBoundingClientRect();
                return [...document.querySelectorAll('tr.session td.actions-cell .actions > *')]
                    .map(b => [b.textContent, b.getBoundingClientRect(), b.scrollWidth - b.clientWidth])
                    .filter(([, r, hidden]) => r.left < view.left || r.right > view.right || hidden > 0)
                    .map(([text]) => text);
            }""")
            assert cut == [], (width, cut)
            await laptop.screenshot(path=artifact(f"dashboard-{width}.png"), full_page=True)
            await laptop.close()

        # Destroy asks first, then the session is gone from the page and the API.
        await page.locator(row(bob)).locator("button.destroy").click()
        await page.locator(row(bob)).wait_for(state="detached", timeout=3000)
        assert dialogs and bob in dialogs[0]
        code, _, _ = await api.call("GET", f"/session/{bob}")
        assert code == 404
        await page.wait_for_function("() => document.getElementById('total-sessions').textContent === '2'",
                                     timeout=3000)

        # The simulator dies: its sessions' rows turn red within 3 s.
        await sim.stop()
        await page.wait_for_function(
            f"""() => ['{alice}', '{carol}'].every(id => document
                .querySelector(`tr.session[data-session-id="${{id}}"]`).classList.contains('down'))""",
            timeout=3000)
        assert await a.get_attribute("data-state") == "retrying"
        # fps in is the last second's, so it falls to 0 at once instead of fading over a window.
        await page.wait_for_function(
            f"() => parseFloat(document.querySelector('{row(alice)} .fps-in').textContent) === 0",
            timeout=3000)
        background = await a.locator("td.user").evaluate("td => getComputedStyle(td).backgroundColor")
        assert background == "rgb(253, 236, 234)"  # --bad-bg
        assert await page.text_content("#total-upstreams-down") == "1"
        upstream = page.locator('tr.upstream[data-upstream="isaac"]')
        await page.wait_for_function(
            """() => document.querySelector('tr.upstream[data-upstream="isaac"] .last-error')
                .textContent !== '–'""", timeout=3000)
        assert "down" in (await upstream.get_attribute("class")).split()
        assert int(await upstream.locator(".failures").text_content()) >= 1
        await page.screenshot(path=artifact("dashboard-down.png"), full_page=True)

        assert not problems, problems
    for viewer in viewers:
        viewer.cancel()


# -- with credentials configured -------------------------------------------------------------------

OPERATOR = ("ops", "operator-pw-1")
API_TOKEN = "api-token-0123456789abcdef"
AUTH = {"auth": {"operators": dict([OPERATOR]), "api_tokens": [API_TOKEN],
                 "viewer_tokens": {"enabled": True, "secret": "s" * 40}}}
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.mark.browser
@pytest.mark.config(AUTH)
@pytest.mark.gen_test(timeout=60)
async def test_dashboard_needs_the_operator_login_and_destroys_without_an_api_token(sim, api, base_url):
    code, body, _ = await api.call("POST", "/session/create", {"userId": "alice", "robotName": "arm-1"},
                                   headers=BEARER)
    assert code == 200, body
    session = body["sessionId"]

    paths = ("/dashboard", "/dashboard/dashboard.js", "/dashboard/api/state", "/dashboard/api/events",
             "/dashboard/api/thumbnail/isaac.jpg")
    for headers in ({}, basic(OPERATOR[0], "wrong-password"), BEARER):
        for path in paths:
            code, body, response = await api.call("GET", path, headers=headers)
            assert code == 401, (path, headers, code)
            assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
            assert body["success"] is False and session.encode() not in response.body
        code, _, _ = await api.call("DELETE", f"/dashboard/api/sessions/{session}", headers=headers)
        assert code == 401
    code, state, _ = await api.call("GET", "/dashboard/api/state", headers=basic(*OPERATOR))
    assert code == 200 and state["sessions"][0]["id"] == session
    assert state["sessions"][0]["viewerToken"]  # for the page's stream URLs

    async with chromium() as browser:
        context = await browser.new_context(http_credentials={"username": OPERATOR[0], "password": OPERATOR[1]})
        page = await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
        page.on("dialog", lambda dialog: dialog.accept())
        await page.goto(base_url + "/dashboard")
        await page.locator(row(session)).wait_for(timeout=2000)
        await page.wait_for_function(
            "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=5000)
        # The embed link carries the viewer token, and the player page accepts it.
        href = await page.locator(row(session)).locator("a.embed").get_attribute("href")
        assert "?token=" in href
        embed = await context.request.get(href)
        assert embed.status == 200, await embed.text()
        # DELETE /session/{id} needs the API token the browser does not have: the page destroys
        # through the operator endpoint, with no refused request first (before, a 401 in the
        # console and the operator's log: found by a new-user walkthrough).
        await page.locator(row(session)).locator("button.destroy").click()
        await page.locator(row(session)).wait_for(state="detached", timeout=3000)
        assert not problems, problems
    code, _, _ = await api.call("GET", f"/session/{session}", headers=BEARER)
    assert code == 404


PUBLISH_TOKEN = "publish-token-0123"


def with_claimed_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its SOF header rewritten to claim another picture size (a few bytes that say
    60000x60000)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9:]


@pytest.mark.gen_test(timeout=60)
@pytest.mark.config({"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
async def test_a_publishers_huge_or_bogus_picture_costs_the_thumbnail_not_the_event_loop(api, proxy, monkeypatch):
    """A publisher (or a camera) that sends a picture of 64 megapixels costs the dashboard's
    thumbnail a few hundred milliseconds of a worker thread, once, while the proxy goes on
    answering; one whose header claims 60000x60000 gets a 503 naming the thumbnail, not a 500.
    Before, the decode ran on the event loop (every viewer and request waited for it) and the
    claimed size raised Pillow's DecompressionBombError out of the handler."""
    from vsproxy import monitor as monitor_module

    decodes = []
    make = monitor_module.make_thumbnail
    monkeypatch.setattr(monitor_module, "make_thumbnail", lambda jpeg: decodes.append(len(jpeg)) or make(jpeg))
    headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {PUBLISH_TOKEN}"}
    small = io.BytesIO()
    Image.new("L", (64, 48), 128).save(small, "JPEG")
    bogus = with_claimed_size(small.getvalue(), 60000, 60000)
    code, _, _ = await api.call("POST", "/ingest/pub/frame", raw=bogus, headers=headers)
    assert code in (200, 204)
    for _ in range(3):  # the dashboard asks again every second: the frame is decoded once, not per ask
        code, body, _ = await api.call("GET", "/dashboard/api/thumbnail/pub.jpg")
        assert code == 503 and body["success"] is False and "thumbnail" in body["error"], body
        await asyncio.sleep(monitor_module.THUMBNAIL_MAX_AGE_SECONDS)
    assert decodes == [len(bogus)], decodes

    huge = io.BytesIO()
    picture = Image.new("L", (8000, 8000), 40)
    picture.paste(220, (2000, 2000, 6000, 6000))
    picture.save(huge, "JPEG", quality=90)
    code, _, _ = await api.call("POST", "/ingest/pub/frame", raw=huge.getvalue(), headers=headers)
    assert code in (200, 204)
    decodes.clear()
    thumbnails = [asyncio.ensure_future(api.call("GET", "/dashboard/api/thumbnail/pub.jpg")) for _ in range(4)]
    answered_meanwhile = 0
    while not all(t.done() for t in thumbnails):
        code, _, _ = await api.call("GET", "/health")
        if not all(t.done() for t in thumbnails):
            answered_meanwhile += 1
    assert answered_meanwhile >= 3, f"the proxy answered {answered_meanwhile} requests while the thumbnail was made"
    results = [t.result() for t in thumbnails]
    assert all(code == 200 for code, _, _ in results)
    assert len({response.body for _, _, response in results}) == 1
    assert decodes == [len(huge.getvalue())], "four requests for one frame: one decode"
    with Image.open(io.BytesIO(results[0][2].body)) as image:
        assert image.size == (160, 160)
