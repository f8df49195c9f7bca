"""Secrets stay secret: no credential reaches the logs (of good, refused and failed requests), and
no configuration error echoes one.
"""

from __future__ import annotations

import base64
import logging

import pytest
from helpers import (
    API_TOKEN,
    BEARER,
    METRICS_TOKEN,
    OPERATOR_PASSWORD,
    OPERATOR_USER,
    PUBLISH_TOKEN,
    VIEWER_SECRET,
    Mjpeg,
    basic,
    create,
    read_frames,
    wait_until,
    ws_handshake,
    ws_open,
)

from vsproxy.cli import main as cli_main
from vsproxy.config import ConfigError, config_from_dict

# -- secrets never reach the logs -----------------------------------------------------------------

ALL_AUTH = {"auth": {
    "api_tokens": [API_TOKEN],
    "viewer_tokens": {"enabled": True, "secret": VIEWER_SECRET},
    "operators": {OPERATOR_USER: OPERATOR_PASSWORD},
    "metrics_token": METRICS_TOKEN,
}, "upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}}


def secrets_in(caplog, secrets: list[str]) -> list[str]:
    """Secrets (or their signature halves) found in any captured record, however it is formatted."""
    texts = []
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(vars(record)))
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    texts.append(caplog.text)
    blob = "\n".join(texts)
    found = []
    for secret in secrets:
        parts = [secret] + ([secret.split(".", 1)[1]] if "." in secret and len(secret.split(".", 1)[1]) > 8 else [])
        found += [p for p in parts if p and p in blob]
    return found


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("vsproxy", "vsproxy.access", "tornado.access", "tornado.application", "tornado.general"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config(ALL_AUTH)
async def test_credentials_never_appear_in_logs(api, http_port, proxy, all_logs):
    body = await create(api, BEARER)
    session_id, viewer_token = body["sessionId"], body["viewerToken"]
    wrong = "wrong-but-secret-looking-0123456789"
    secrets = [API_TOKEN, VIEWER_SECRET, OPERATOR_PASSWORD, METRICS_TOKEN, viewer_token, wrong, PUBLISH_TOKEN,
               base64.b64encode(f"{OPERATOR_USER}:{OPERATOR_PASSWORD}".encode()).decode()]

    await api.call("GET", f"/session/{session_id}", headers=BEARER)
    await api.call("GET", "/sessions", headers={"Authorization": f"Bearer {wrong}"})
    await api.call("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    await api.call("GET", "/metrics", headers={"Authorization": f"Bearer {wrong}"})
    await api.call("GET", "/dashboard/api/state", headers=basic(OPERATOR_USER, OPERATOR_PASSWORD))
    await api.call("GET", "/dashboard/api/state", headers=basic(OPERATOR_USER, wrong))
    await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token={viewer_token}")
    await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token={wrong}")
    await api.call("GET", f"/stream/{session_id}/embed?token={viewer_token}")
    await api.call("GET", f"/stream/{session_id}/embed?token={wrong}")
    await api.call("GET", f"/stream/nope/mjpeg?token={viewer_token}")
    await api.call("POST", f"/ingest/pub/frame?token={wrong}", raw=b"x")
    viewer = await Mjpeg.open(http_port, f"/stream/{session_id}/mjpeg?token={viewer_token}")
    await viewer.parts(1)
    viewer.close()
    conn = await ws_open(http_port, f"/stream/{session_id}?token={viewer_token}")
    await read_frames(conn, 1)
    conn.write_message("hello")
    conn.close()
    response, _ = await ws_handshake(http_port, f"/stream/{session_id}?token={wrong}")
    assert response.status == 403
    await api.call("POST", f"/session/{session_id}/destroy", headers=BEARER)
    await wait_until(lambda: any("client disconnected" in r.getMessage() for r in all_logs.records), "logs")

    assert any(r.name == "vsproxy.access" for r in all_logs.records), "the access log was not captured"
    assert secrets_in(all_logs, secrets) == []


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(ALL_AUTH)
@pytest.mark.parametrize("case", ["path not utf-8", "api path not utf-8", "expiry not ascii digits",
                                  "publish token not utf-8", "embed token not utf-8"])
async def test_credentials_never_appear_in_logs_of_failed_requests(api, http_port, all_logs, case):
    """Requests Tornado refuses before our handlers run, or that fail in them, get their request
    line logged: it must not carry the ?token= query. A ?token= that is not UTF-8 is a wrong
    token, not Tornado's "Invalid unicode in token: b'<the token>'" in the answer and the log."""
    body = await create(api, BEARER)
    session_id, viewer_token = body["sessionId"], body["viewerToken"]
    if case == "publish token not utf-8":
        status, _, response = await api.call("POST", f"/ingest/pub/frame?token={PUBLISH_TOKEN}%FF", raw=b"x")
        assert status == 401 and PUBLISH_TOKEN.encode() not in response.body, response.body
    elif case == "embed token not utf-8":
        status, _, response = await api.call("GET", f"/stream/{session_id}/embed?token={viewer_token}%FF")
        assert status == 403 and viewer_token.encode() not in response.body, response.body
    elif case == "path not utf-8":  # Tornado answers 400 and logs a warning with the request line
        status, _, _ = await api.call("GET", f"/stream/%FF/snapshot.jpg?token={viewer_token}")
        assert status == 400
    elif case == "api path not utf-8":
        status, _, _ = await api.call("GET", f"/session/%FF?token={viewer_token}", headers=BEARER)
        assert status == 400
    else:  # an expiry str.isdigit() accepts and int() does not
        await api.call("GET", f"/stream/{session_id}/snapshot.jpg?token=%C2%B2.{viewer_token.split('.')[1]}")
    assert secrets_in(all_logs, [viewer_token, API_TOKEN, PUBLISH_TOKEN]) == []


SECRET = "Sup3r-Secret-Value-0123456789abcdefghij"
SECRET_CONFIGS = {
    "viewer secret too short": {"auth": {"viewer_tokens": {"enabled": True, "secret": SECRET[:20]}}},
    "viewer secret not a string": {"auth": {"viewer_tokens": {"enabled": True, "secret": int("9" * 40)}}},
    "viewer_tokens given the secret": {"auth": {"viewer_tokens": SECRET}},
    "auth given a secret": {"auth": SECRET},
    "api_tokens a string": {"auth": {"api_tokens": SECRET}},
    "api token too short": {"auth": {"api_tokens": [SECRET[:12]]}},
    "metrics token too short": {"auth": {"metrics_token": SECRET[:12]}},
    "metrics token a list": {"auth": {"metrics_token": [SECRET]}},
    "operator password too short": {"auth": {"operators": {"admin": SECRET[:6]}}},
    "operators a list": {"auth": {"operators": [f"admin:{SECRET}"]}},
    "publish token too short": {"upstreams": {"pub": {"kind": "push", "token": SECRET[:6]}}},
    "publish token a number": {"upstreams": {"pub": {"kind": "push", "token": int("7" * 30)}}},
    "upstream header not a string": {"isaac_sim": {"headers": {"Authorization": ["Bearer", SECRET]}}},
    "isaac_sim header from a block scalar": {"isaac_sim": {"ip": "127.0.0.1",
                                                           "headers": {"Authorization": f"Bearer {SECRET}\n"}}},
    "isaac header with a line break": {"upstreams": {"sim": {"kind": "isaac", "url": "ws://127.0.0.1:8211/",
                                                             "headers": {"Authorization": f"Bearer {SECRET}\r\n"}}}},
    "camera header with a NUL": {"upstreams": {"cam": {"kind": "mjpeg", "url": "http://cam/",
                                                       "headers": {"X-Api-Key": f"{SECRET}\0"}}}},
    "header written as one string": {"isaac_sim": {"headers": {f"Authorization: Bearer {SECRET}": ""}}},
    "unparseable camera URL with a password": {"upstreams": {"cam": {"kind": "mjpeg",
                                                                     "url": f"http://admin:{SECRET}@[::1/stream"}}},
    "unparseable isaac URL with a password": {"upstreams": {"sim": {"kind": "isaac",
                                                                    "url": f"ws://admin:{SECRET}@[::1:8211/"}}},
    "RTSP URL with a password and a bad port": {"upstreams": {"cam": {"kind": "rtsp",
                                                                      "url": f"rtsp://admin:{SECRET}@cam:99999/"}}},
    "TURN credential with a line break": {"webrtc": {"ice_servers": [
        {"urls": "turn:turn.example:3478", "username": "user", "credential": f"{SECRET}\n"}]}},
    "camera URL with a password": {"upstreams": {"cam": {"kind": "mjpeg", "url": f"rtsp://admin:{SECRET}@cam/"}}},
}


@pytest.mark.parametrize("tree", list(SECRET_CONFIGS.values()), ids=list(SECRET_CONFIGS))
def test_config_errors_never_echo_secrets(tree, tmp_path, monkeypatch, capsys, caplog):
    import yaml

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    short = [SECRET, SECRET[:20], SECRET[:12], SECRET[:6], "9" * 40, "7" * 30]
    assert not [s for s in short if s in str(info.value)], str(info.value)

    # The command line: one line naming the key, exit 2, no secret on stderr or in the log.
    monkeypatch.chdir(tmp_path)
    for var in ("VIDEO_PROXY_PORT", "VIDEO_PROXY_HOST", "VIDEO_PROXY_PUBLIC_URL", "ISAAC_SIM_IP"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert cli_main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    output = captured.out + captured.err + caplog.text
    assert "configuration error" in output
    assert not [s for s in short if s in output], output
