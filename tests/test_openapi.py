"""The OpenAPI document (GET /openapi.json) is the REST contract: it is a valid OpenAPI document,
it lists every route the server has, every real response (success and each error a request can
produce) matches it, and a schemathesis fuzz run against the live server finds no 5xx, no hang and
no response outside it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
import tornado.web
import tornado.websocket
from helpers import (
    API_TOKEN,
    METRICS_TOKEN,
    QUICK,
    VIEWER_SECRET,
    Mjpeg,
    free_port,
    raw_request,
    retry_while,
    wait_until,
    ws_handshake,
)
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tornado.httpclient import AsyncHTTPClient

from vsproxy import __version__
from vsproxy.app import Proxy
from vsproxy.config import config_from_dict
from vsproxy.handlers import api as api_handlers
from vsproxy.handlers import dashboard, ingest, ops, pages, stream, whep
from vsproxy.handlers.base import JsonHandler
from vsproxy.openapi import openapi_document

BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
DOC_URN = "urn:vsproxy-openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch")


# -- the contract checker -------------------------------------------------------------------------


def pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Contract:
    """Validates real responses against the document and records what was covered."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOC_URN, resource)
        self.covered: set[tuple[str, str, str]] = set()
        self.problems: list[str] = []

    def _resolve(self, node: dict, where: str) -> tuple[dict, str]:
        while "$ref" in node:
            where = node["$ref"]
            node = self.doc
            for part in where[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, where

    def response_spec(self, template: str, method: str, status: int) -> tuple[dict, str] | None:
        path_item = self.doc["paths"].get(template)
        assert path_item is not None, f"{template} is not in the document"
        op = path_item.get(method.lower())
        if op is None:
            if status != 405:
                return None
            return self._resolve(self.doc["components"]["responses"]["MethodNotAllowed"],
                                 pointer("components", "responses", "MethodNotAllowed"))
        spec = op["responses"].get(str(status))
        if spec is None:
            return None
        return self._resolve(spec, pointer("paths", template, method.lower(), "responses", str(status)))

    def check(self, method: str, template: str, status: int, headers: Any, body: bytes) -> Any:
        """Check one response; returns the parsed JSON body (or None)."""
        label = f"{method} {template} -> {status}"
        self.covered.add((template, method.upper(), str(status)))
        found = self.response_spec(template, method, status)
        if found is None:
            self.problems.append(f"{label}: status not documented")
            return None
        spec, where = found
        media = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        parsed = None
        content = spec.get("content")
        if content:
            if media not in content:
                self.problems.append(f"{label}: Content-Type {media!r} not documented ({sorted(content)})")
            elif media == "application/json":
                try:
                    parsed = json.loads(body)
                except ValueError:
                    self.problems.append(f"{label}: not JSON: {body[:100]!r}")
                else:
                    schema_ref = f"{DOC_URN}{where}/content/application~1json/schema"
                    validator = Draft202012Validator({"$ref": schema_ref}, registry=self.registry)
                    for error in validator.iter_errors(parsed):
                        self.problems.append(f"{label}: {error.message} at {list(error.absolute_path)}")
        elif status == 204 and body:
            self.problems.append(f"{label}: a body on 204")
        for name, header in (spec.get("headers") or {}).items():
            value = headers.get(name)
            if value is None:
                if header.get("required"):
                    self.problems.append(f"{label}: required header {name} missing")
                continue
            if header.get("schema", {}).get("type") == "integer":
                if not re.fullmatch(r"[0-9]+", value) or int(value) < header["schema"].get("minimum", 0):
                    self.problems.append(f"{label}: header {name}={value!r} not per the document")
        return parsed

    def documented(self) -> set[tuple[str, str, str]]:
        out = set()
        for template, item in self.doc["paths"].items():
            for method in METHODS:
                if method in item:
                    out |= {(template, method.upper(), code) for code in item[method]["responses"]}
        return out

    def assert_ok(self) -> None:
        assert self.problems == [], "\n".join(self.problems)


@pytest.fixture
def contract(http_server, base_url, io_loop):
    response = io_loop.run_sync(lambda: AsyncHTTPClient().fetch(base_url + "/openapi.json"))
    return Contract(json.loads(response.body))


class Caller:
    """HTTP requests whose responses are all checked against the contract."""

    def __init__(self, contract: Contract, base_url: str, port: int) -> None:
        self.contract, self.base_url, self.port = contract, base_url, port
        self.client = AsyncHTTPClient()
        self.last_status = 0
        self.last_headers: Any = {}

    async def __call__(self, method: str, template: str, path: str | None = None, *, body: Any = None,
                       raw: bytes | None = None, headers: dict | None = None, expect: int | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        headers = dict(headers or {})
        if method == "POST" and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"  # else Tornado's client says form-urlencoded
        response = await self.client.fetch(self.base_url + (path or template), method=method, body=data,
                                           headers=headers, raise_error=False, allow_nonstandard_methods=True,
                                           request_timeout=QUICK)
        assert response.code != 599, response.error
        self.last_status, self.last_headers = response.code, response.headers
        if expect is not None:
            assert response.code == expect, (method, path or template, response.code, response.body[:300])
        parsed = self.contract.check(method, template, response.code, response.headers, response.body)
        return parsed if parsed is not None else response

    async def raw(self, method: str, template: str, path: str, headers: dict | None = None,
                  expect: int | None = None, websocket: bool = False) -> Any:
        """Byte-exact requests: WebSocket handshakes and endless MJPEG bodies."""
        if websocket:
            response, stream = await ws_handshake(self.port, path, headers=headers)
        else:
            response, stream = await raw_request(self.port, path, method=method,
                                                 headers={**(headers or {}), "Connection": "close"})
        stream.close()
        if expect is not None:
            assert response.status == expect, (path, response.status, response.body[:300])
        body = b"" if response.status in (101, 200) and "Content-Length" not in response.headers else response.body
        return self.contract.check(method, template, response.status, response.headers, body)


@pytest.fixture
def call(contract, base_url, http_port):
    return Caller(contract, base_url, http_port)


# -- the document itself --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_openapi_json_is_a_valid_openapi_document(api, base_url):
    status, doc, response = await api.call("GET", "/openapi.json")
    assert status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    validate_spec(doc)  # raises with the first problem
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__
    assert doc["servers"] == [{"url": base_url}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiToken"] == {**schemes["apiToken"], "type": "http", "scheme": "bearer"}
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["success", "error"] and error["additionalProperties"] is False
    # Served and built are the same document.
    assert {k: v for k, v in doc.items() if k != "servers"} == json.loads(json.dumps(openapi_document()))


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config({"server": {"public_url": "https://video.example.com/"}})
async def test_openapi_servers_follow_public_url(api):
    _, doc, _ = await api.call("GET", "/openapi.json")
    assert doc["servers"] == [{"url": "https://video.example.com"}]


def test_every_error_response_uses_the_error_schema():
    doc = openapi_document()
    for template, item in doc["paths"].items():
        for method in METHODS:
            responses = item.get(method, {}).get("responses", {})
            for code, response in responses.items():
                if code in ("400", "401", "403", "404", "405", "413", "429", "503") and template not in (
                        "/stream/{sessionId}/embed",):
                    if "$ref" in response:
                        name = response["$ref"].rsplit("/", 1)[1]
                        response = doc["components"]["responses"][name]
                    if "101" in responses and set(response["content"]) == {"text/html"}:
                        continue  # a WebSocket handshake Tornado refuses itself, in plain text
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (template, method, code)
    for name in ("BadRequest", "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed", "PayloadTooLarge",
                 "TooManyRequests", "ServiceUnavailable"):
        assert name in doc["components"]["responses"]
    assert doc["components"]["responses"]["Unauthorized"]["headers"]["WWW-Authenticate"]["required"] is True


def _route_template(pattern: str) -> str:
    template = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + re.sub(r"_(\w)", lambda c: c.group(1).upper(),
                                                                   m.group(1)) + "}", pattern)
    return template.replace("\\.", ".").rstrip("$")


def _handler_methods(handler: type) -> set[str]:
    base = tornado.websocket.WebSocketHandler if issubclass(handler, tornado.websocket.WebSocketHandler) else None
    methods = set()
    for method in METHODS:
        impl = getattr(handler, method)
        if impl is getattr(tornado.web.RequestHandler, method):
            continue
        if base is not None and method == "get":
            methods.add("get")  # the upgrade
            continue
        methods.add(method)
    return methods


def test_every_route_is_documented_with_its_methods():
    """A new endpoint or method without documentation fails here. Only the dashboard's page and
    its static files (everything under /dashboard/ but its API) are outside the document."""
    doc = openapi_document()
    served = {}
    for module in (api_handlers, ops, stream, whep, pages, ingest, dashboard):
        for route in module.routes:
            if route[1] is dashboard.DashboardFileHandler:
                continue
            served[_route_template(route[0])] = route[1]
    assert set(served) == set(doc["paths"]), set(served) ^ set(doc["paths"])
    for template, handler in served.items():
        documented = {m for m in METHODS if m in doc["paths"][template]}
        assert documented == _handler_methods(handler), (template, documented, _handler_methods(handler))
        if issubclass(handler, JsonHandler):
            assert "options" in documented, template


# -- every endpoint against the document ----------------------------------------------------------

CONTRACT_CONFIG = {
    "auth": {"api_tokens": [API_TOKEN], "metrics_token": METRICS_TOKEN,
             "viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}},
    "limits": {"max_sessions": 4, "max_sessions_per_user": 2, "max_viewers_per_session": 1,
               "max_body_bytes": 1024, "session_create_rate": 0.01, "session_create_burst": 14},
    # Nothing listens on port 1: this upstream never delivers a frame.
    "upstreams": {"dead": {"kind": "isaac", "url": "ws://127.0.0.1:1/"}},
    "reconnect": {"initial_delay_seconds": 5, "max_delay_seconds": 10},
}
BIG = b"x" * 2048
BAD = "%FF"  # not UTF-8: 400
UNKNOWN = "stream_1700000000000_" + "0" * 32
CREATE = {"userId": "alice", "robotName": "demo-robot"}

# (path, method, status) the contract test below cannot produce, and where each is covered instead.
COVERED_ELSEWHERE = {
    ("/metrics", "GET", "404"): "test_metrics_404_on_the_main_port_conforms (server.metrics_port)",
    ("/stream/{sessionId}/embed", "GET", "401"): "test_viewer_token_refusals_conform",
    ("/stream/{sessionId}", "GET", "401"): "test_viewer_token_refusals_conform",
    ("/session/{sessionId}/token", "POST", "409"):
        "test_viewer_input.py::test_token_endpoint_without_viewer_tokens_is_409 (viewer tokens off)",
    **{("/stream/{sessionId}/whep", "POST", status): "test_whep.py::test_whep_responses_conform_to_the_document"
       for status in ("201", "400", "401", "403", "404", "406", "413", "415", "501", "503")},
    **{("/stream/{sessionId}/whep/{resourceId}", method, status):
       "test_whep.py::test_whep_responses_conform_to_the_document"
       for method, status in (("DELETE", "200"), ("DELETE", "400"), ("DELETE", "404"), ("DELETE", "413"),
                              ("PATCH", "405"), ("PATCH", "400"), ("PATCH", "413"),
                              ("POST", "200"), ("POST", "400"), ("POST", "401"), ("POST", "403"), ("POST", "404"),
                              ("POST", "413"), ("POST", "415"))},
    ("/stream/{sessionId}/whep/{resourceId}", "POST", "409"):
        "test_whep.py::test_renewing_a_peer_without_viewer_tokens_is_409",
}


async def first_frame(call, template: str, path: str) -> Any:
    response = await retry_while(lambda: AsyncHTTPClient().fetch(call.base_url + path, raise_error=False),
                                 lambda r: r.code == 503)  # 503 until the first frame
    call.contract.check("GET", template, response.code, response.headers, response.body)
    return response


@pytest.mark.gen_test(timeout=90)
@pytest.mark.config(CONTRACT_CONFIG)
async def test_every_rest_response_conforms_to_the_document(call, contract, proxy):
    # Open endpoints, and the preflight of every REST path (no credential; 413 still applies).
    await call("GET", "/openapi.json", expect=200)
    await call("GET", "/openapi.json", raw=BIG, expect=413)
    await call("GET", "/health", expect=200)
    await call("GET", "/health", raw=BIG, expect=413)
    await call("GET", "/", expect=200)
    for template, item in contract.doc["paths"].items():
        if "options" in item:
            path = template.replace("{sessionId}", UNKNOWN)
            await call("OPTIONS", template, path, headers={"Origin": "http://localhost:3000"}, expect=204)
            if "413" in item["options"]["responses"]:
                await call("OPTIONS", template, path, raw=BIG, expect=413)

    await call("GET", "/metrics", expect=401)
    await call("GET", "/metrics", headers=METRICS, expect=200)
    await call("GET", "/metrics", headers={**METRICS, "Accept": "application/openmetrics-text; version=1.0.0"},
               expect=200)
    await call("GET", "/metrics", headers=METRICS, raw=BIG, expect=413)

    # Creation: every refusal, then the limits in turn.
    create = "/session/create"
    await call("POST", create, body=CREATE, expect=401)
    await call("POST", create, body=CREATE, headers={"Authorization": "Bearer wrong-token-0123456789"}, expect=401)
    await call("POST", create, raw=BIG, headers=BEARER, expect=413)
    await call("POST", create, raw=b"{not json", headers=BEARER, expect=400)
    await call("POST", create, raw=json.dumps(CREATE).encode(), headers={**BEARER, "Content-Type": "text/plain"},
               expect=415)
    await call("POST", create, body={"userId": "alice"}, headers=BEARER, expect=400)
    await call("POST", create, body={**CREATE, "upstream": "ws://evil.example/"}, headers=BEARER, expect=400)
    a1 = await call("POST", create, body=CREATE, headers=BEARER, expect=200)
    a2 = await call("POST", create, body=CREATE, headers=BEARER, expect=200)
    await call("POST", create, body=CREATE, headers=BEARER, expect=429)  # per user
    b1 = await call("POST", create, body={**CREATE, "userId": "bob"}, headers=BEARER, expect=200)
    dead = await call("POST", create, body={**CREATE, "userId": "carol", "upstream": "dead"}, headers=BEARER,
                      expect=200)
    await call("POST", create, body={**CREATE, "userId": "dave"}, headers=BEARER, expect=503)  # max_sessions
    for _ in range(20):  # spend the rest of the burst: 503 while there are tokens, then 429 + Retry-After
        await call("POST", create, body={**CREATE, "userId": "dave"}, headers=BEARER)
        if call.last_status == 429:
            break
    assert call.last_status == 429 and int(call.last_headers["Retry-After"]) >= 1

    # Session management.
    sid, token = a1["sessionId"], a1["viewerToken"]
    session = "/session/{sessionId}"
    await call("GET", session, f"/session/{sid}", headers=BEARER, expect=200)
    await call("GET", session, f"/session/{sid}", expect=401)
    await call("GET", session, f"/session/{UNKNOWN}", headers=BEARER, expect=404)
    await call("GET", session, f"/session/{BAD}", headers=BEARER, expect=400)
    await call("GET", session, f"/session/{sid}", raw=BIG, headers=BEARER, expect=413)
    renew = "/session/{sessionId}/token"
    await call("POST", renew, f"/session/{sid}/token", headers=BEARER, expect=200)
    await call("POST", renew, f"/session/{sid}/token", body={"control": True}, headers=BEARER, expect=200)
    await call("POST", renew, f"/session/{sid}/token", body={"control": "yes"}, headers=BEARER, expect=400)
    await call("POST", renew, f"/session/{sid}/token", expect=401)
    await call("POST", renew, f"/session/{UNKNOWN}/token", headers=BEARER, expect=404)
    await call("POST", renew, f"/session/{sid}/token", raw=BIG, headers=BEARER, expect=413)
    for path in ("/sessions", "/upstreams"):
        await call("GET", path, headers=BEARER, expect=200)
        await call("GET", path, expect=401)
        await call("GET", path, raw=BIG, headers=BEARER, expect=413)

    # Streams of a1 (viewer token) and of the upstream that never delivers. A 404 goes only to the
    # holder of the (ended) session's token: without it, a 401 or 403 whether the session exists or not.
    ended = proxy.access.viewer_tokens.issue(UNKNOWN)
    snap = "/stream/{sessionId}/snapshot.jpg"
    await first_frame(call, snap, f"/stream/{sid}/snapshot.jpg?token={token}")
    await call("GET", snap, f"/stream/{sid}/snapshot.jpg", expect=401)
    await call("GET", snap, f"/stream/{sid}/snapshot.jpg?token={b1['viewerToken']}", expect=403)
    await call("GET", snap, f"/stream/{UNKNOWN}/snapshot.jpg?token={ended}", expect=404)
    await call("GET", snap, f"/stream/{BAD}/snapshot.jpg", expect=400)
    await call("GET", snap, f"/stream/{sid}/snapshot.jpg?token={token}", raw=BIG, expect=413)
    await call("GET", snap, f"/stream/{dead['sessionId']}/snapshot.jpg?token={dead['viewerToken']}", expect=503)

    status = "/stream/{sessionId}/status"
    await call("GET", status, f"/stream/{sid}/status?token={token}", expect=200)
    await call("GET", status, f"/stream/{sid}/status", headers=BEARER, expect=403)  # the API token is no viewer's
    await call("GET", status, f"/stream/{sid}/status", expect=401)
    await call("GET", status, f"/stream/{sid}/status?token={b1['viewerToken']}", expect=403)
    await call("GET", status, f"/stream/{UNKNOWN}/status?token={ended}", expect=404)
    await call("GET", status, f"/stream/{BAD}/status", expect=400)
    await call("GET", status, f"/stream/{sid}/status?token={token}", raw=BIG, expect=413)

    mjpeg = "/stream/{sessionId}/mjpeg"
    await call.raw("GET", mjpeg, f"/stream/{sid}/mjpeg?token={token}&fps=abc", expect=400)
    await call.raw("GET", mjpeg, f"/stream/{sid}/mjpeg", expect=401)
    await call.raw("GET", mjpeg, f"/stream/{sid}/mjpeg?token={b1['viewerToken']}", expect=403)
    await call.raw("GET", mjpeg, f"/stream/{UNKNOWN}/mjpeg?token={ended}", expect=404)
    await call.raw("GET", mjpeg, f"/stream/{BAD}/mjpeg", expect=400)
    await call("GET", mjpeg, f"/stream/{sid}/mjpeg?token={token}", raw=BIG, expect=413)
    viewer = await Mjpeg.open(call.port, f"/stream/{sid}/mjpeg?token={token}")
    contract.check("GET", mjpeg, viewer.status, viewer.headers, b"")
    assert viewer.status == 200
    await viewer.parts(1)
    await call.raw("GET", mjpeg, f"/stream/{sid}/mjpeg?token={token}", expect=503)  # max viewers
    await call.raw("GET", "/stream/{sessionId}", f"/stream/{sid}?token={token}", websocket=True,
                   expect=101)  # accepted, then closed with 1013 (see test_security)
    viewer.close()
    await wait_until(lambda: not proxy.sessions.get(sid).viewers, "the MJPEG viewer to leave")

    mp4 = "/stream/{sessionId}/stream.mp4"
    await call.raw("GET", mp4, f"/stream/{sid}/stream.mp4?token={token}&fps=5", expect=400)
    await call.raw("GET", mp4, f"/stream/{sid}/stream.mp4", expect=401)
    await call.raw("GET", mp4, f"/stream/{sid}/stream.mp4?token={b1['viewerToken']}", expect=403)
    await call.raw("GET", mp4, f"/stream/{UNKNOWN}/stream.mp4?token={ended}", expect=404)
    await call.raw("GET", mp4, f"/stream/{BAD}/stream.mp4", expect=400)
    await call("GET", mp4, f"/stream/{sid}/stream.mp4?token={token}", raw=BIG, expect=413)
    head, stream = await raw_request(call.port, f"/stream/{sid}/stream.mp4?token={token}")
    contract.check("GET", mp4, head.status, head.headers, b"")
    assert head.status == 200 and head.headers["Content-Type"] == "video/mp4"
    await call.raw("GET", mp4, f"/stream/{sid}/stream.mp4?token={token}", expect=503)  # max viewers
    stream.close()

    ws = "/stream/{sessionId}"
    b1_id, b1_token = b1["sessionId"], b1["viewerToken"]
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}", websocket=True, expect=101)
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}&format=xml", websocket=True, expect=400)
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}&fps=1e9", websocket=True, expect=400)
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}", expect=400)  # not a WebSocket handshake
    await call.raw("GET", ws, f"/stream/{b1_id}?token={token}", websocket=True, expect=403)
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}", websocket=True,
                   headers={"Origin": "http://evil.example"}, expect=403)
    await call.raw("GET", ws, f"/stream/{UNKNOWN}?token={ended}", websocket=True, expect=404)
    await call.raw("GET", ws, f"/stream/{b1_id}?token={b1_token}", websocket=True,
                   headers={"Sec-WebSocket-Version": "99"}, expect=426)
    await call.raw("GET", ws, f"/stream/{BAD}", websocket=True, expect=400)

    embed = "/stream/{sessionId}/embed"
    await call("GET", embed, f"/stream/{b1_id}/embed?token={b1_token}", expect=200)
    await call("GET", embed, f"/stream/{b1_id}/embed?token={token}", expect=403)
    await call("GET", embed, f"/stream/{UNKNOWN}/embed?token={ended}", expect=404)
    await call("GET", embed, "/stream//embed", expect=404)
    await call("GET", embed, f"/stream/{BAD}/embed", expect=400)

    # Destroying, both ways.
    await call("DELETE", session, f"/session/{sid}", expect=401)
    await call("DELETE", session, f"/session/{sid}", raw=BIG, headers=BEARER, expect=413)
    await call("DELETE", session, f"/session/{BAD}", headers=BEARER, expect=400)
    await call("DELETE", session, f"/session/{sid}", headers=BEARER, expect=200)
    await call("DELETE", session, f"/session/{sid}", headers=BEARER, expect=404)
    destroy = "/session/{sessionId}/destroy"
    a2_id = a2["sessionId"]
    await call("POST", destroy, f"/session/{a2_id}/destroy", expect=401)
    await call("POST", destroy, f"/session/{a2_id}/destroy", raw=BIG, headers=BEARER, expect=413)
    await call("POST", destroy, f"/session/{BAD}/destroy", headers=BEARER, expect=400)
    await call("POST", destroy, f"/session/{a2_id}/destroy", raw=b"x=1",
               headers={**BEARER, "Content-Type": "application/x-www-form-urlencoded"}, expect=415)
    await call("POST", destroy, f"/session/{a2_id}/destroy", headers=BEARER, expect=200)
    await call("POST", destroy, f"/session/{a2_id}/destroy", headers=BEARER, expect=404)

    # Methods a REST path does not have: 405 with the Error body.
    for method, template in (("GET", create), ("PUT", "/sessions"), ("POST", "/health"), ("PATCH", session),
                             ("DELETE", "/sessions"), ("POST", snap), ("PUT", "/upstreams"), ("POST", "/metrics"),
                             ("DELETE", "/openapi.json"), ("GET", destroy), ("POST", mjpeg)):
        path = template.replace("{sessionId}", b1_id)
        headers = METRICS if template == "/metrics" else BEARER  # credentials are checked first
        await call(method, template, path, headers=headers, expect=405)

    contract.assert_ok()
    # The publisher ingest and dashboard API: test_docs_match_code.py::test_ingest_and_dashboard_responses_conform.
    elsewhere = {k for k in contract.documented() if k[0].startswith(("/ingest/", "/dashboard/api/"))}
    missing = contract.documented() - contract.covered - set(COVERED_ELSEWHERE) - elsewhere
    assert not missing, f"documented but never produced: {sorted(missing)}"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"auth": {"viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}})
async def test_viewer_token_refusals_conform(call, contract, api):
    """401s on the viewer endpoints: the document requires the WWW-Authenticate challenge."""
    _, body, _ = await api.call("POST", "/session/create", CREATE)
    sid = body["sessionId"]
    await call("GET", "/stream/{sessionId}/snapshot.jpg", f"/stream/{sid}/snapshot.jpg", expect=401)
    await call.raw("GET", "/stream/{sessionId}/mjpeg", f"/stream/{sid}/mjpeg", expect=401)
    await call("GET", "/stream/{sessionId}/embed", f"/stream/{sid}/embed", expect=401)
    await call.raw("GET", "/stream/{sessionId}", f"/stream/{sid}", websocket=True, expect=401)
    contract.assert_ok()


@pytest.mark.gen_test(timeout=30)
async def test_metrics_404_on_the_main_port_conforms():
    main_port, metrics_port = free_port(), free_port()
    proxy = Proxy(config_from_dict({"demo": {"width": 320, "height": 240}, "server": {"metrics_port": metrics_port}}))
    proxy.listen(main_port, address="127.0.0.1")
    try:
        client = AsyncHTTPClient()
        contract = Contract(openapi_document())
        response = await client.fetch(f"http://127.0.0.1:{main_port}/metrics", raise_error=False)
        assert response.code == 404
        contract.check("GET", "/metrics", response.code, response.headers, response.body)
        response = await client.fetch(f"http://127.0.0.1:{metrics_port}/metrics", raise_error=False)
        contract.check("GET", "/metrics", response.code, response.headers, response.body)
        contract.assert_ok()
        # The document is still served on the main port.
        response = await client.fetch(f"http://127.0.0.1:{main_port}/openapi.json", raise_error=False)
        assert response.code == 200, "GET /openapi.json is missing when server.metrics_port is set"
    finally:
        await proxy.shutdown()


# -- fuzzing with schemathesis --------------------------------------------------------------------

FUZZ_CONFIG = {
    "auth": {"api_tokens": [API_TOKEN], "metrics_token": METRICS_TOKEN},
    # Generous limits, so generated bodies reach validation instead of a limit.
    "limits": {"max_sessions": 100_000, "max_sessions_per_user": 100_000, "session_create_rate": 10_000,
               "session_create_burst": 100_000},
}
FUZZ_EXAMPLES = 50  # per operation and generation mode


def run_fuzz(doc: dict, base_url: str) -> tuple[list[str], int, float]:
    """Every operation, positive and negative cases; returns (failures, requests, seconds)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # SDP offers (WHEP) are text: send the generated strings as they are.
    schemathesis.serializer.alias("application/sdp", "text/plain")
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance]
    failures: list[str] = []
    sent = 0
    started = time.monotonic()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        ok_content = operation.definition.raw["responses"].get("200", {}).get("content", {})
        if "text/event-stream" in ok_content:
            continue  # an endless stream never completes a response (test_docs_match_code checks it)
        security = operation.definition.raw.get("security", [])
        if any("apiToken" in alt for alt in security):
            auth = BEARER
        elif any("metricsToken" in alt for alt in security):
            auth = METRICS
        else:
            auth = {}
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            # A preflight answers 204 whatever the path says (it only shows what is allowed).
            rejects = mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "OPTIONS"
            mode_checks = checks + ([negative_data_rejection] if rejects else [])

            def make_test(strategy, mode_checks: list, auth: dict):
                @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def fuzz(case):
                    nonlocal sent
                    headers = {**(case.headers or {}), **auth}
                    response = case.call(base_url=base_url, session=session, headers=auth, timeout=5)
                    sent += 1
                    case.validate_response(response, checks=mode_checks, headers=headers)

                return fuzz

            try:
                make_test(operation.as_strategy(generation_mode=mode), mode_checks, auth)()
            except Unsatisfiable:
                assert mode is schemathesis.GenerationMode.NEGATIVE  # no parameter or body to get wrong
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect all, then report
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}")
    return failures, sent, time.monotonic() - started


@pytest.mark.slow  # about 4,300 requests: 50-75 s on 2 cores (no time budget: speed is the benchmarks' job)
@pytest.mark.gen_test(timeout=300)
@pytest.mark.config(FUZZ_CONFIG)
async def test_fuzz_every_operation_against_the_document(api, base_url, proxy):
    _, doc, _ = await api.call("GET", "/openapi.json")
    loop = asyncio.get_running_loop()
    # The fuzzer's HTTP client blocks; it runs in a thread while this IOLoop serves it.
    failures, sent, seconds = await loop.run_in_executor(None, run_fuzz, doc, base_url)
    assert not failures, "\n\n".join(failures)
    print(f"fuzz: {sent} requests in {seconds:.1f} s")
    assert sent >= 200, sent
    # The server is still well after it.
    status, body, _ = await api.call("GET", "/health")
    assert status == 200 and body["status"] == "healthy"
