"""Capture times of an RTSP upstream's frames from the server's RTCP sender reports: once one has
come, the `format=h264` presentation times follow the stream's RTP clock (mapped to the server's
wall clock), and frame age counts from the server's capture; a server whose clock is far off ours
is timed by arrival instead. A real RTSP server (GStreamer's, see rtsp_server.py) on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import struct
import time
from itertools import pairwise

import pytest
from helpers import recv
from prometheus_client.parser import text_string_to_metric_families
from test_rtsp_source import (  # noqa: F401  (fixtures)
    proxy_config,
    read_jpegs,
    rtsp_server,
    rtsp_threads,
    rtsp_url,
    upstream_status,
    wait_upstream,
)

pytestmark = [pytest.mark.external, pytest.mark.slow]

FRAME_US = 1_000_000 / 30  # the test server's frame interval
# GStreamer sends its first sender report a few seconds after PLAY (RTCP's randomized interval).
SENDER_REPORT_WAIT = 30.0


async def age_buckets(api, transport: str) -> dict[str, float]:
    """vsproxy_frame_age_seconds of `transport`: cumulative counts by upper bound ("+Inf" = all)."""
    code, _, response = await api.call("GET", "/metrics")
    assert code == 200
    for family in text_string_to_metric_families(response.body.decode()):
        if family.name == "vsproxy_frame_age_seconds":
            return {s.labels["le"]: s.value for s in family.samples
                    if s.name.endswith("_bucket") and s.labels["transport"] == transport}
    raise AssertionError("no vsproxy_frame_age_seconds in /metrics")


async def h264_stamps(conn, count: int) -> list[tuple[int, int]]:
    """(presentation time, our wall clock when it came), microseconds, of the next `count` access
    units of a `format=h264` viewer."""
    stamps = []
    while len(stamps) < count:
        message = await recv(conn, timeout=30)
        if isinstance(message, bytes):
            stamps.append((struct.unpack_from("!Q", message, 1)[0], time.time_ns() // 1000))
    return stamps


def capture_time(status: dict) -> str | None:
    return status.get("source", {}).get("captureTime")


@pytest.mark.parametrize("rtsp_server", [{"sender_reports": "capture"}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_h264_presentation_times_follow_the_servers_rtcp_clock(rtsp_server, api, ws_connect):  # noqa: F811
    session_id = (await api.create_session())["sessionId"]
    status = await wait_upstream(api, "frames timed by the server's RTCP sender reports",
                                 lambda s: capture_time(s) == "rtcp", timeout=SENDER_REPORT_WAIT)
    # The server runs here: its clock is ours. Its sender reports give capture times, and a live
    # source sends a frame at least a frame interval (33 ms) after its capture began.
    assert 0.03 < status["source"]["captureOffsetSeconds"] < 0.3, status
    await asyncio.sleep(1.5)  # a keyframe since: the GOP cache holds only frames the server timed

    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    stamps = await h264_stamps(conn, 90)
    deltas = [b - a for (a, _), (b, _) in pairwise(stamps)]
    deviations = [abs(d - FRAME_US) for d in deltas]
    # The RTP clock: 3000 ticks of 90 kHz apart, exact to the microsecond's rounding (arrival
    # times would jitter by tens to thousands of microseconds with the reader thread's wakeups).
    assert max(deviations) <= 1000, deltas
    assert statistics.median(deviations) <= 10, deltas
    live = stamps[-30:]  # after the GOP cache's burst
    assert all(0 < received - pts < 300_000 for pts, received in live), live

    ages = await age_buckets(api, "ws_h264")
    assert ages["+Inf"] >= 90, ages
    assert ages["0.02"] == 0, ages  # every one counted from the capture, 33+ ms before its arrival

    # Pictures decoded to JPEG for JPEG viewers keep the capture time of their packet.
    binary = await ws_connect(f"/stream/{session_id}?format=binary")
    await read_jpegs(binary, 10)
    ages = await age_buckets(api, "ws_binary")
    assert ages["+Inf"] >= 10, ages
    assert ages["0.02"] == 0, ages


@pytest.mark.gen_test(timeout=120)
async def test_presentation_times_keep_increasing_when_the_sender_reports_start(
        rtsp_server, api, ws_connect):  # noqa: F811
    """Frames before the first sender report are timed by arrival, which is later than the
    server's capture: at the switch the times must not step back (decoders, MP4 and WebRTC need
    them increasing), nor make two frames one."""
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    stamps = await h264_stamps(conn, 15)
    assert capture_time(await upstream_status(api)) == "arrival"  # no sender report so soon
    while capture_time(await upstream_status(api)) != "rtcp":
        stamps += await h264_stamps(conn, 15)  # half a second
        assert len(stamps) < 30 * SENDER_REPORT_WAIT, "no RTCP sender report"
    stamps += await h264_stamps(conn, 30)
    deltas = [b - a for (a, _), (b, _) in pairwise(stamps)]
    assert min(deltas) >= 1000, deltas


@pytest.mark.parametrize("rtsp_server", [{"sender_reports": "unsynced"}], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_a_server_clock_far_off_ours_leaves_frames_timed_by_arrival(
        rtsp_server, api, ws_connect, caplog):  # noqa: F811
    """The server's sender reports give its pipeline's running time as the wall clock (the
    stream started in 1900): frames keep their arrival time, and the log says so once."""
    caplog.set_level(logging.INFO, logger="vsproxy.rtsp")
    session_id = (await api.create_session())["sessionId"]
    status = await wait_upstream(api, "the server's clock refused", lambda s: capture_time(s) == "unsynced",
                                 timeout=SENDER_REPORT_WAIT)
    assert status["source"]["captureOffsetSeconds"] > 100 * 365 * 86400, status

    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    live = (await h264_stamps(conn, 60))[-20:]
    assert all(0 <= received - pts < 300_000 for pts, received in live), live
    ages = await age_buckets(api, "ws_h264")
    assert ages["+Inf"] >= 60 and ages["1.0"] == ages["+Inf"], ages  # no century-old frames

    # Every frame since the first sender report was refused; the log said so once.
    warnings = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert len(warnings) == 1 and "behind ours" in warnings[0], warnings
