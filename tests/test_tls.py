"""TLS: vsproxy serving HTTPS and WSS itself (tls.cert_file/key_file), with a certificate made for
the test by a throwaway CA (trustme) that only the test's clients trust."""

from __future__ import annotations

import base64
import io
import json
import ssl
import subprocess
import sys
import warnings

import pytest
import trustme
import yaml
from helpers import (
    CREATE,
    QUICK,
    VIEWER_SECRET,
    Mjpeg,
    free_port,
    raw_request,
    read_frames,
    recv,
    retry_while,
    ws_open,
)
from PIL import Image
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import StreamClosedError

from vsproxy.app import Proxy
from vsproxy.config import config_from_dict

DEMO = {"demo": {"width": 320, "height": 240, "fps": 30}}


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def cert_files(ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    return str(cert_file), str(key_file)


@pytest.fixture
def client_ssl(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tls_server(io_loop, cert_files, request):
    """A Proxy serving HTTPS/WSS on a free loopback port: (proxy, port)."""
    extra = {}
    for marker in request.node.iter_markers("config"):
        extra.update(marker.args[0])
    cert_file, key_file = cert_files
    config = config_from_dict({**DEMO, "tls": {"cert_file": cert_file, "key_file": key_file}, **extra})
    proxy = Proxy(config)
    port = free_port()
    proxy.listen(port, "127.0.0.1")
    yield proxy, port
    io_loop.run_sync(proxy.shutdown)


async def fetch(url: str, context: ssl.SSLContext, **kwargs):
    request = HTTPRequest(url, ssl_options=context, connect_timeout=QUICK, request_timeout=QUICK, **kwargs)
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def refused(url: str, context: ssl.SSLContext | None = None) -> bool:
    """True if no HTTP answer comes back (TLS handshake or connection failure)."""
    try:
        response = await fetch(url, context) if context else await AsyncHTTPClient().fetch(
            url, raise_error=False, request_timeout=QUICK)
    except (ssl.SSLError, OSError, StreamClosedError):
        return True
    return response.code == 599


async def create_session(port: int, context: ssl.SSLContext, **headers) -> dict:
    response = await fetch(f"https://127.0.0.1:{port}/session/create", context, method="POST",
                           body=json.dumps(CREATE), headers={"Content-Type": "application/json", **headers})
    assert response.code == 200, (response.code, response.body)
    return json.loads(response.body)


@pytest.mark.gen_test(timeout=30)
async def test_rest_over_https_returns_https_and_wss_urls(tls_server, client_ssl):
    _, port = tls_server
    body = await create_session(port, client_ssl)
    session_id = body["sessionId"]
    assert body["wsUrl"] == f"wss://127.0.0.1:{port}/stream/{session_id}"
    assert body["httpStreamUrl"] == f"https://127.0.0.1:{port}/stream/{session_id}/mjpeg"
    response = await fetch(f"https://127.0.0.1:{port}/session/{session_id}", client_ssl)
    assert response.code == 200 and json.loads(response.body)["session"]["id"] == session_id
    response = await fetch(f"https://127.0.0.1:{port}/health", client_ssl)
    assert response.code == 200 and json.loads(response.body)["status"] == "healthy"
    response = await fetch(f"https://127.0.0.1:{port}/openapi.json", client_ssl)
    assert response.code == 200 and json.loads(response.body)["servers"][0]["url"] == f"https://127.0.0.1:{port}"
    response = await fetch(f"https://127.0.0.1:{port}/session/{session_id}", client_ssl, method="DELETE")
    assert response.code == 200


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config({"auth": {"viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET}}})
async def test_viewer_token_urls_over_https(tls_server, client_ssl):
    _, port = tls_server
    body = await create_session(port, client_ssl)
    token = body["viewerToken"]
    assert body["wsUrl"].startswith("wss://") and body["wsUrl"].endswith(f"?token={token}")
    assert body["httpStreamUrl"].startswith("https://") and body["httpStreamUrl"].endswith(f"?token={token}")
    conn = await ws_open(port, body["wsUrl"].split(f":{port}", 1)[1], scheme="wss", ssl_options=client_ssl)
    await read_frames(conn, 1)
    conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_server_really_speaks_tls(tls_server, client_ssl):
    _, port = tls_server
    # A client that does not trust the test CA refuses the certificate: it is the one configured.
    assert await refused(f"https://127.0.0.1:{port}/health", ssl.create_default_context())
    # Plain HTTP on the TLS port gets no HTTP answer.
    assert await refused(f"http://127.0.0.1:{port}/health")
    # TLS 1.2 is the floor.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.TLSv1
    except (ValueError, ssl.SSLError):
        return  # this OpenSSL cannot even offer TLS 1.1
    assert await refused(f"https://127.0.0.1:{port}/health", old)
    # ...and the trusted client still works.
    assert (await fetch(f"https://127.0.0.1:{port}/health", client_ssl)).code == 200


@pytest.mark.gen_test(timeout=40)
async def test_wss_viewer_receives_frames(tls_server, client_ssl):
    proxy, port = tls_server
    session_id = (await create_session(port, client_ssl))["sessionId"]
    conn = await ws_open(port, f"/stream/{session_id}", scheme="wss", ssl_options=client_ssl)
    first = json.loads(await recv(conn))
    assert first["type"] == "status"
    frames, _ = await read_frames(conn, 3)
    assert Image.open(io.BytesIO(frames[0])).size == (320, 240)
    conn.close()
    binary = await ws_open(port, f"/stream/{session_id}?format=binary", scheme="wss", ssl_options=client_ssl)
    frames, _ = await read_frames(binary, 3)
    assert all(isinstance(f, bytes) and f[:2] == b"\xff\xd8" for f in frames)
    # Viewer input is relayed over WSS too (the demo has no upstream to take it: an error says so).
    binary.write_message(json.dumps({"type": "ping"}))
    binary.close()


@pytest.mark.gen_test(timeout=40)
async def test_mjpeg_over_https_delivers_parts(tls_server, client_ssl):
    _, port = tls_server
    session_id = (await create_session(port, client_ssl))["sessionId"]
    viewer = await Mjpeg.open(port, f"/stream/{session_id}/mjpeg", ssl_options=client_ssl)
    assert viewer.status == 200
    assert viewer.headers["Content-Type"].startswith("multipart/x-mixed-replace")
    parts = await viewer.parts(3)
    for part in parts:
        assert part.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(part.body)).size == (320, 240)
    viewer.close()


@pytest.mark.gen_test(timeout=40)
async def test_snapshot_over_https(tls_server, client_ssl):
    _, port = tls_server
    session_id = (await create_session(port, client_ssl))["sessionId"]
    url = f"https://127.0.0.1:{port}/stream/{session_id}/snapshot.jpg"
    response = await retry_while(lambda: fetch(url, client_ssl), lambda r: r.code == 503)  # 503 until a frame
    assert response.code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.body)).size == (320, 240)


@pytest.mark.gen_test(timeout=30)
async def test_metrics_port_speaks_tls_too(io_loop, cert_files, client_ssl):
    cert_file, key_file = cert_files
    port, metrics_port = free_port(), free_port()
    proxy = Proxy(config_from_dict({**DEMO, "tls": {"cert_file": cert_file, "key_file": key_file},
                                    "server": {"metrics_port": metrics_port}}))
    proxy.listen(port, "127.0.0.1")
    try:
        response = await fetch(f"https://127.0.0.1:{metrics_port}/metrics", client_ssl)
        assert response.code == 200 and b"vsproxy_" in response.body
        response, stream = await raw_request(port, "/metrics", headers={"Connection": "close"}, ssl_options=client_ssl)
        stream.close()
        assert response.status == 404
    finally:
        await proxy.shutdown()


# -- configuration errors -------------------------------------------------------------------------


def run_vsproxy(tmp_path, tree: dict, *command: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": free_port()}, **tree}))
    return subprocess.run([sys.executable, "-m", "vsproxy", "--config", str(path), *command], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.slow
def test_missing_cert_file_is_a_config_error_naming_the_key(tmp_path, cert_files):
    _, key_file = cert_files
    result = run_vsproxy(tmp_path, {"tls": {"cert_file": str(tmp_path / "nope.pem"), "key_file": key_file}})
    assert result.returncode == 2, result.stderr
    assert "tls.cert_file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_missing_key_file_is_a_config_error_naming_the_key(tmp_path, cert_files):
    cert_file, _ = cert_files
    result = run_vsproxy(tmp_path, {"tls": {"cert_file": cert_file, "key_file": str(tmp_path / "nope.key")}})
    assert result.returncode == 2, result.stderr
    assert "tls.key_file" in result.stderr


@pytest.mark.slow
def test_cert_without_key_is_a_config_error(tmp_path, cert_files):
    cert_file, _ = cert_files
    result = run_vsproxy(tmp_path, {"tls": {"cert_file": cert_file}})
    assert result.returncode == 2, result.stderr
    assert "tls" in result.stderr and "key_file" in result.stderr


@pytest.mark.slow
def test_unreadable_certificate_exits_2_naming_the_key(tmp_path, cert_files):
    """A file that exists but is not a PEM certificate: refused at start-up, not at the first client."""
    _, key_file = cert_files
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"nonsense" * 20).decode()
                       + "\n-----END CERTIFICATE-----\n")
    result = run_vsproxy(tmp_path, {"tls": {"cert_file": str(garbage), "key_file": key_file}})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "tls.cert_file" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [(), ("check",)], ids=["serve", "check"])
def test_mismatched_key_exits_2(tmp_path, ca, cert_files, command):
    """Serving, and `vsproxy check` (which loads the certificate as serving would)."""
    cert_file, _ = cert_files
    other = ca.issue_cert("127.0.0.1")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    result = run_vsproxy(tmp_path, {"tls": {"cert_file": cert_file, "key_file": str(other_key)}}, *command)
    assert result.returncode == 2, (result.returncode, result.stderr)
    (line,) = result.stderr.strip().splitlines()  # one line, in the form of every configuration error
    assert line.startswith("vsproxy: configuration error: tls.cert_file/tls.key_file: "), line
    assert "key must belong to the certificate" in line, line
