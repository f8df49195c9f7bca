"""Named upstreams: the session's upstream comes from its "upstream" field, else the robot map,
else the default; clients can only name configured upstreams, never give a URL."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import free_port

from vsproxy.config import ConfigError, config_from_dict

DEAD_PORT = free_port()  # nothing listens here: that upstream keeps retrying

NAMED = {
    "upstreams": {
        "cam-a": {"kind": "demo", "width": 64, "height": 48, "fps": 10},
        "cam-b": {"kind": "demo", "width": 96, "height": 64, "fps": 10},
        "broken": {"kind": "isaac", "url": f"ws://127.0.0.1:{DEAD_PORT}/"},
    },
    "robots": {"arm-1": "cam-b", "rover": "broken"},
    "default_upstream": "cam-a",
}


async def create(api, robot: str, **extra):
    return await api.call("POST", "/session/create", {"userId": "u1", "robotName": robot, **extra})


async def upstream_of(api, session_id: str) -> str:
    _, body, _ = await api.call("GET", f"/session/{session_id}")
    return body["session"]["upstream"]


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(NAMED)
async def test_upstream_field_then_robot_map_then_default(api):
    code, body, _ = await create(api, "arm-1", upstream="cam-a")
    assert code == 200
    assert await upstream_of(api, body["sessionId"]) == "cam-a"  # the explicit field wins

    _, body, _ = await create(api, "arm-1")
    assert await upstream_of(api, body["sessionId"]) == "cam-b"  # the robot map

    _, body, _ = await create(api, "some-other-robot")
    assert await upstream_of(api, body["sessionId"]) == "cam-a"  # the default


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(NAMED)
@pytest.mark.parametrize("upstream", [
    "http://169.254.169.254/latest/meta-data/", "ws://127.0.0.1:1/", "file:///etc/passwd", "../cam-a",
])
async def test_urls_are_refused_and_nothing_is_contacted(api, proxy, upstream):
    code, body, _ = await create(api, "arm-1", upstream=upstream)
    assert code == 400
    assert body["success"] is False
    assert "configured upstream" in body["error"]
    assert len(proxy.sessions) == 0
    assert all(not hub.running for hub in proxy.hubs.values())


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(NAMED)
@pytest.mark.parametrize("upstream", ["nope", "", 42, ["cam-a"], None])  # None: an explicit null
async def test_unknown_or_mistyped_upstream_is_400_listing_nothing(api, proxy, upstream):
    code, body, _ = await create(api, "arm-1", upstream=upstream)
    assert code == 400 and body["success"] is False
    for name in ("cam-a", "cam-b", "broken"):
        assert name not in body["error"]  # the reply does not reveal what is configured
    assert len(proxy.sessions) == 0


@pytest.mark.gen_test(timeout=20)
@pytest.mark.config(NAMED)
async def test_sessions_get_frames_of_their_own_upstream(api, ws_connect):
    """The demo upstreams differ in size, so each viewer's JPEG size tells its upstream."""
    from vsproxy.render import jpeg_size

    sizes = {}
    for robot in ("arm-1", "someone"):
        _, body, _ = await create(api, robot)
        conn = await ws_connect(f"/stream/{body['sessionId']}?format=binary")
        while True:
            message = await conn.read_message()
            assert message is not None
            if isinstance(message, bytes):
                sizes[robot] = jpeg_size(message)
                break
    assert sizes == {"arm-1": (96, 64), "someone": (64, 48)}


@pytest.mark.gen_test(timeout=30)
@pytest.mark.config(NAMED)
async def test_upstreams_listing_and_degraded_health(api):
    code, body, _ = await api.call("GET", "/upstreams")
    assert code == 200 and body["success"] is True and body["default"] == "cam-a"
    listed = {u["name"]: u for u in body["upstreams"]}
    assert {"cam-a", "cam-b", "broken", "demo"} <= listed.keys()
    assert all(u["state"] == "idle" for u in listed.values())
    assert set(listed["cam-a"]) >= {"kind", "state", "lastError", "fpsIn", "bytesPerSecondIn", "sessions", "viewers"}
    assert not any("url" in u for u in listed.values())  # URLs may carry credentials

    _, health, _ = await api.call("GET", "/health")
    assert health["status"] == "healthy" and health["failing_upstreams"] == []

    await create(api, "rover")  # mapped to the upstream that cannot connect

    async def state(name: str) -> dict:
        _, listing, _ = await api.call("GET", "/upstreams")
        return next(u for u in listing["upstreams"] if u["name"] == name)

    deadline = time.monotonic() + 15
    while (seen := await state("broken"))["state"] != "retrying":
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    assert seen["state"] == "retrying" and seen["lastError"], seen
    assert seen["sessions"] == 1

    code, health, _ = await api.call("GET", "/health")
    assert code == 200  # degraded is still 200: the proxy itself is fine
    assert health["status"] == "degraded" and health["failing_upstreams"] == ["broken"]


@pytest.mark.parametrize("tree, key", [
    ({"robots": {"arm": "missing"}}, "robots.arm"),
    ({"default_upstream": "missing"}, "default_upstream"),
    ({"upstreams": {"bad name!": {"kind": "demo"}}}, "upstreams.bad name!"),
    ({"upstreams": {"x": {"kind": "ftp"}}}, "upstreams.x.kind"),
    ({"upstreams": {"x": {"kind": "mjpeg", "url": "ws://a/"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "push", "token": "short"}}}, "upstreams.x.token"),
    ({"upstreams": {"x": {"kind": "isaac", "url": "ws://a/", "headers": {"Authorization": "Bearer t\n"}}}},
     "upstreams.x.headers.Authorization"),
    ({"upstreams": {"x": {"kind": "mjpeg", "url": "http://a/", "headers": {"X-Key": "a\r\nX-Injected: 1"}}}},
     "upstreams.x.headers.X-Key"),
    ({"upstreams": {"x": {"kind": "mjpeg", "url": "http://a/", "headers": {"X Key": "a"}}}}, "upstreams.x.headers"),
    ({"upstreams": {"x": {"kind": "mjpeg", "url": "http://[::1/stream"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "mjpeg", "url": "http://cam:99999/stream"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "isaac", "url": "ws://[::1/stream"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "isaac", "url": "ws:///stream"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "rtsp", "url": "rtsp://[::1/stream"}}}, "upstreams.x.url"),
    ({"upstreams": {"x": {"kind": "rtsp", "url": "rtsp://cam:port/stream"}}}, "upstreams.x.url"),
    ({"isaac_sim": {"ip": "[::1"}}, "isaac_sim.ip"),
])
def test_bad_upstream_config_names_the_key(tree, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert err.value.key == key


def test_upstream_urls_that_parse_are_accepted_and_an_ipv6_isaac_sim_ip_gets_brackets():
    config = config_from_dict({"upstreams": {
        "a": {"kind": "mjpeg", "url": "http://user:pw@[::1]:8080/stream?topic=/x"},
        "b": {"kind": "isaac", "url": "wss://sim.example/stream"},
        "c": {"kind": "rtsp", "url": "rtsps://10.0.0.5:322/live"}}, "isaac_sim": {"ip": "::1"}})
    assert config.isaac_ws_url == "ws://[::1]:8211/"


def test_isaac_sim_ip_defines_the_default_isaac_upstream():
    config = config_from_dict({"isaac_sim": {"ip": "127.0.0.1", "ws_port": 9000, "ws_path": "/stream"}})
    upstreams, default = config.upstream_configs()
    assert default == "isaac"
    assert upstreams["isaac"].url == "ws://127.0.0.1:9000/stream"
    assert "demo" in upstreams
