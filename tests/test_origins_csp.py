"""Origins and pages: CORS for allowed, refused and look-alike origins (API, WebSocket and MJPEG),
and the pages' Content-Security-Policy (nonces, frame-ancestors) and other headers.
"""

from __future__ import annotations

import re

import pytest
import tornado.escape
import tornado.websocket
from helpers import (
    EVIL,
    FRONTEND,
    Mjpeg,
    create,
    embed_settings,
    read_frames,
    ws_open,
    ws_refused,
)
from tornado.httpclient import AsyncHTTPClient

# -- CORS -----------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_cors_allowed_and_refused_origins(api, http_port):
    for path, method in (("/health", "GET"), ("/sessions", "GET"), ("/session/nope", "GET"),
                         ("/session/create", "OPTIONS")):
        _, _, response = await api.call(method, path, headers={"Origin": FRONTEND})
        assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND, path
        assert "Origin" in response.headers.get("Vary", "")
        assert "Access-Control-Allow-Credentials" not in response.headers
        _, _, response = await api.call(method, path, headers={"Origin": EVIL})
        assert "Access-Control-Allow-Origin" not in response.headers, path
        assert "Access-Control-Allow-Credentials" not in response.headers
    # Look-alikes of the allowed origin are not it.
    for origin in ("http://localhost:3000.evil.example", "http://localhost:30000", "https://localhost:3000",
                   "null", "http://LOCALHOST:3000 "):
        _, _, response = await api.call("GET", "/health", headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in response.headers, origin


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"cors": {"allowed_origins": ["*"]}})
async def test_cors_star_allows_every_origin_without_credentials(api, http_port):
    for origin in (EVIL, "https://anything.example:8443"):
        _, _, response = await api.call("GET", "/health", headers={"Origin": origin})
        assert response.headers.get("Access-Control-Allow-Origin") in (origin, "*")
        assert "Access-Control-Allow-Credentials" not in response.headers
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}", headers={"Origin": EVIL})
    await read_frames(conn, 1)
    conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_websocket_origin_allowed_and_refused(api, http_port):
    session_id = (await create(api))["sessionId"]
    path = f"/stream/{session_id}"
    for origin in (FRONTEND, f"http://127.0.0.1:{http_port}"):  # the frontend, and the proxy's own pages
        conn = await ws_open(http_port, path, headers={"Origin": origin})
        await read_frames(conn, 1)
        conn.close()
    for origin in (EVIL, "http://localhost:3001", "null"):
        assert await ws_refused(http_port, path, headers={"Origin": origin}) == 403, origin
    # MJPEG answers CORS like the API.
    viewer = await Mjpeg.open(http_port, f"{path}/mjpeg", headers={"Origin": FRONTEND})
    assert viewer.headers.get("Access-Control-Allow-Origin") == FRONTEND
    assert "Access-Control-Allow-Credentials" not in viewer.headers
    viewer.close()
    viewer = await Mjpeg.open(http_port, f"{path}/mjpeg", headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in viewer.headers
    viewer.close()


# -- pages: CSP and friends -----------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition(" ")
        if name:
            out[name] = value.strip()
    return out


def assert_scripts_carry_nonce(html: str, csp: dict[str, str]) -> str:
    nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{16,})'", csp["script-src"]).group(1)
    assert csp["style-src"] == f"'nonce-{nonce}'"
    scripts = re.findall(r"<script\b([^>]*)>", html, flags=re.I)
    assert scripts, "no inline script"
    assert all(f'nonce="{nonce}"' in attrs for attrs in scripts), scripts
    styles = re.findall(r"<style\b([^>]*)>", html, flags=re.I)
    assert all(f'nonce="{nonce}"' in attrs for attrs in styles), styles
    markup = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", html, flags=re.I | re.S)
    handlers = re.findall(r"<[^>]*\son[a-z]+\s*=[^>]*>", markup, flags=re.I)
    assert not handlers, f"inline event handlers are not covered by the nonce: {handlers}"
    assert "javascript:" not in markup.lower()
    return nonce


def assert_html_headers(response) -> dict[str, str]:
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] in ("no-referrer", "same-origin", "strict-origin")
    csp = csp_directives(response.headers["Content-Security-Policy"])
    assert csp["default-src"] == "'none'"
    assert csp["base-uri"] == "'none'"
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    return csp


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"security": {"frame_ancestors": ["'self'", "https://app.example.com", "http://localhost:3000"]}})
async def test_embed_page_csp_frame_ancestors_is_the_configured_list(api, base_url):
    session_id = (await create(api))["sessionId"]
    client = AsyncHTTPClient()
    nonces = set()
    for _ in range(2):
        response = await client.fetch(f"{base_url}/stream/{session_id}/embed")
        csp = assert_html_headers(response)
        assert csp["frame-ancestors"].split() == ["'self'", "https://app.example.com", "http://localhost:3000"]
        nonces.add(assert_scripts_carry_nonce(response.body.decode(), csp))
    assert len(nonces) == 2, "the nonce must be new for every response"
    # The embed's error page too (it is what an iframe shows).
    response = await client.fetch(f"{base_url}/stream/nope/embed", raise_error=False)
    assert response.code == 404
    csp = assert_html_headers(response)
    assert csp["frame-ancestors"].split() == ["'self'", "https://app.example.com", "http://localhost:3000"]


@pytest.mark.gen_test(timeout=20)
async def test_index_page_csp(http_server, base_url):
    response = await AsyncHTTPClient().fetch(base_url + "/")
    csp = assert_html_headers(response)
    assert csp["frame-ancestors"] in ("'self'", "'none'")
    assert_scripts_carry_nonce(response.body.decode(), csp)


@pytest.mark.gen_test(timeout=20)
async def test_embed_query_parameters_cannot_break_out_of_the_script(api, base_url):
    session_id = (await create(api))["sessionId"]
    evil = "</script><script>alert(1)</script><!--"
    query = "&".join(f"{k}={tornado.escape.url_escape(evil)}" for k in ("token", "fps", "mode"))
    response = await AsyncHTTPClient().fetch(f"{base_url}/stream/{session_id}/embed?{query}")
    html = response.body.decode()
    assert "alert(1)</script>" not in html
    assert html.count("<script") == html.count("</script>")
    settings = embed_settings(html)
    assert settings["token"] == settings["fps"] == evil  # as data, intact
    assert settings["mode"] == "ws" and settings["ignored"] == [f"mode={evil}"]  # not an option: named, intact
