"""Input checks: bad stream parameters, weird session ids and bad create bodies are refused with
400/404 JSON errors, never a 500.
"""

from __future__ import annotations

import json

import pytest
from helpers import (
    API_AUTH,
    BEARER,
    CREATE,
    Mjpeg,
    assert_json_error,
    create,
    ws_handshake,
)

# -- input checks ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("query", ["fps=abc", "fps=1e9", "fps=0", "fps=-1", "fps=nan", "fps=inf", "fps=0x10",
                                   "format=xml", "format=JSON", "format="])
async def test_bad_stream_parameters_are_400(api, http_port, query):
    session_id = (await create(api))["sessionId"]
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?{query}")
    if query == "format=":
        assert response.status in (101, 400)
        return
    assert_json_error(response.status, response.json(), 400)
    if query.startswith("fps"):
        viewer = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg?{query}")
        assert_json_error(viewer.status, viewer.json(), 400)


WEIRD_IDS = {
    "traversal": "..%2f..%2fetc%2fpasswd",
    "dot-dot": "%2e%2e",
    "long": "s" * 8000,
    "unicode": "%E2%98%83stream_%F0%9F%92%A9",
    "nul": "stream_%00",
    "bad-utf8": "%FF%FE",
    "overlong-utf8": "%C0%AF",
    "lone-surrogate": "%ED%A0%80",
    "crlf": "a%0d%0aSet-Cookie:%20x=1",
    "quote": "%22%3Cimg%3E",
    "percent": "%25",
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.config(API_AUTH)
@pytest.mark.parametrize("weird", list(WEIRD_IDS.values()), ids=list(WEIRD_IDS))
async def test_weird_session_ids_are_404_or_400_never_500(api, http_port, weird):
    for method, path in (("GET", "/session/{}"), ("DELETE", "/session/{}"), ("POST", "/session/{}/destroy"),
                         ("GET", "/stream/{}/snapshot.jpg"), ("GET", "/stream/{}/mjpeg")):
        status, body, response = await api.call(method, path.format(weird), headers=BEARER)
        assert_json_error(status, body, (400, 404))
        assert "Set-Cookie" not in response.headers
    status, _, response = await api.call("GET", f"/stream/{weird}/embed")
    assert status in (400, 404) and response.headers["Content-Type"].startswith("text/html")
    response, _ = await ws_handshake(http_port, f"/stream/{weird}")
    assert_json_error(response.status, response.json(), (400, 404))


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"userId": 1, "robotName": "r"}',
                                 b'{"userId": "", "robotName": "r"}', b'{"userId": "  ", "robotName": "r"}',
                                 b'{"userId": "u"}', b'{"userId": "u", "robotName": "' + b"r" * 129 + b'"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": "ws://127.0.0.1:1/"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": "nope"}',
                                 b'{"userId": "u", "robotName": "r", "upstream": 5}',
                                 b"NaN", b"1e999999"])
async def test_bad_create_bodies_are_400(api, raw):
    status, body, _ = await api.call("POST", "/session/create", raw=raw)
    assert_json_error(status, body, 400)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("field", ["userId", "robotName"])
async def test_unencodable_names_are_refused_and_cannot_break_the_listing(api, field):
    """JSON allows "\\ud800" (a lone surrogate); such a name cannot be written back as UTF-8, so one
    request must not turn GET /sessions and GET /session/{id} into 500s for everyone."""
    raw = json.dumps({**CREATE, field: "x\ud800"}).encode()
    assert b"\\ud800" in raw
    status, body, _ = await api.call("POST", "/session/create", raw=raw)
    listed_status, listed, _ = await api.call("GET", "/sessions")
    assert listed_status == 200, listed
    if status == 200:
        assert (await api.call("GET", f"/session/{body['sessionId']}"))[0] == 200
    assert_json_error(status, body, 400)
