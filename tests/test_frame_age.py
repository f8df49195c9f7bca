"""Frame age: from a frame's capture (the push publisher's timestamp) to its write to a viewer,
in `vsproxy_frame_age_seconds` and on the dashboard, while viewers still get the publisher's
JPEG byte for byte."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from helpers import next_message, recv, spawn, wait_until
from prometheus_client.parser import text_string_to_metric_families

from vsproxy import render
from vsproxy.publish import Publisher

TOKEN = "secret-token-1"
pytestmark = pytest.mark.config({
    "upstreams": {"replicator": {"kind": "push", "token": TOKEN}},
    "default_upstream": "replicator",
})


def test_capture_stamp_round_trip_leaves_the_jpeg_as_it_was():
    jpeg = render.TestPattern(64, 48, "age").render(1, 0.0)
    stamped = render.with_capture_time(jpeg, 1_764_558_000.25)
    assert stamped != jpeg and render.is_jpeg(stamped)
    assert render.jpeg_size(stamped) == (64, 48)  # still a valid JPEG for any consumer
    assert render.split_capture_time(stamped) == (jpeg, 1_764_558_000.25)
    assert render.split_capture_time(jpeg) == (jpeg, None)


async def age_buckets(api) -> dict[str, float]:
    code, _, response = await api.call("GET", "/metrics")
    assert code == 200
    for family in text_string_to_metric_families(response.body.decode()):
        if family.name == "vsproxy_frame_age_seconds":
            return {s.labels["le"]: s.value for s in family.samples
                    if s.name.endswith("_bucket") and s.labels["transport"] == "ws_binary"}
    raise AssertionError("no vsproxy_frame_age_seconds in /metrics")


@pytest.mark.gen_test(timeout=30)
async def test_frame_age_counts_from_the_publishers_capture_time(api, ws_connect, http_port, proxy, io_loop):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    jpeg = render.TestPattern(160, 120, "age").render(3, 0.0)
    received = []
    with Publisher(f"ws://127.0.0.1:{http_port}/ingest/replicator", TOKEN) as publisher:
        await wait_until(lambda: publisher.connected, "the publisher to connect")
        for _ in range(5):
            publisher.publish(jpeg, captured=time.time() - 0.4)  # taken 0.4 s ago
            message = await recv(conn)
            while not isinstance(message, bytes) or message == b"":
                message = await recv(conn)
            received.append(message)
    assert jpeg in received, "viewers get the publisher's JPEG byte for byte, stamp removed"
    buckets = await age_buckets(api)
    assert buckets["+Inf"] >= 1
    assert buckets["0.25"] == 0, buckets  # none younger than its 0.4 s
    # Not counted from a wrong clock (hours or years): all within seconds. Not a timing bound: a
    # CI run once saw one frame written 0.6 s late (a pause of the shared test process).
    assert buckets["2.5"] == buckets["+Inf"], buckets
    proxy.monitor.sample()
    state = proxy.monitor.state()
    (session,) = [s for s in state["sessions"] if s["id"] == session_id]
    assert session["frameAgeMs"]["p50"] is not None and session["frameAgeMs"]["p50"] >= 400
    conn.close()  # the session's last viewer leaves: the dashboard shows no age, not the last one
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the viewer to leave")
    proxy.monitor.sample()
    (session,) = [s for s in proxy.monitor.state()["sessions"] if s["id"] == session_id]
    assert session["frameAgeMs"] == {"p50": None, "p95": None}


@pytest.mark.gen_test(timeout=30)
async def test_posted_frames_take_their_capture_time_from_a_header(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=binary")
    jpeg = render.TestPattern(160, 120, "age").render(4, 0.0)
    headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"}
    code, body, _ = await api.call("POST", "/ingest/replicator/frame", raw=jpeg,
                                   headers={**headers, "X-Capture-Timestamp": "soon"})
    assert code == 400 and "X-Capture-Timestamp" in body["error"]
    code, _, _ = await api.call("POST", "/ingest/replicator/frame", raw=jpeg,
                                headers={**headers, "X-Capture-Timestamp": f"{time.time() - 2:.3f}"})
    assert code == 200
    for _ in range(20):  # after the "connecting" pictures sent before the first frame
        if await recv(conn) == jpeg:
            break
    else:
        raise AssertionError("the posted frame never reached the viewer")
    buckets = await age_buckets(api)
    assert buckets["1.0"] == 0 and buckets["+Inf"] >= 1, buckets  # about 2 s old


@pytest.mark.gen_test(timeout=60)
async def test_capture_times_that_are_no_numbers_or_far_off_our_clock_count_as_arrival_times(api, ws_connect):
    """A publisher's capture time is its word, not a trusted one: a stamp of "nan" or "inf", one
    days ahead or behind our clock, or beyond the year 2262. Each such frame is still published
    (200, not a 500), and H.264 viewers' presentation times stay on the clock: a frame stamped
    a day ahead would otherwise have left every later one a microsecond after it."""
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"}
    pattern = render.TestPattern(160, 120, "age")
    now = time.time()
    odd = [("stamp", now + 86_400), ("stamp", float("nan")), ("stamp", float("inf")), ("stamp", now - 86_400),
           ("header", "1e13"), ("header", f"{now + 86_400:.3f}"), ("header", "-5")]
    units: list[int] = []  # presentation times of the access units received

    async def read() -> None:
        while (message := await next_message(conn, timeout=None)) is not None:
            if isinstance(message, bytes):
                units.append(struct.unpack("!BQ", message[:9])[1])

    reader = spawn(read())
    for i in range(40):
        how, value = odd[i % len(odd)] if i % 2 else ("none", None)
        jpeg = pattern.render(i, time.time())
        extra = {}
        if how == "stamp":
            jpeg = render.with_capture_time(jpeg, value)
        elif how == "header":
            extra = {"X-Capture-Timestamp": value}
        code, body, _ = await api.call("POST", "/ingest/replicator/frame", raw=jpeg, headers={**headers, **extra})
        assert code == 200, (how, value, body)
        await asyncio.sleep(0.05)
    await wait_until(lambda: len(units) >= 10, "access units")
    reader.cancel()
    latest = time.time()
    assert all(now - 5 <= pts / 1e6 <= latest + 1 for pts in units), [pts / 1e6 - now for pts in units]
    assert len(units) >= 10 and units == sorted(units)
    steps = [b - a for a, b in zip(units, units[1:], strict=False)]
    assert max(steps) < 2_000_000 and sum(steps) > 1_000_000, steps  # on the clock: 50+ ms apart, not 1 µs
