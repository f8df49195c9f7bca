"""H.264 delivery: the shared encoder of JPEG upstreams, the WebSocket `format=h264` contract,
fragmented MP4, fast start from the GOP cache and skip-to-keyframe backpressure.

Real codecs: PyAV's libx264 encodes in the proxy, PyAV's H.264 decoder (FFmpeg) decodes what a
viewer receives, and the decoded pictures are compared with the source JPEGs (PSNR).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import struct
import subprocess
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import (
    WAIT,
    WS_UPGRADE,
    next_message,
    raw_request,
    recv,
    small_buffer_ws,
    socket_pair,
    wait_until,
    ws_server_messages,
)
from PIL import Image

from vsproxy.codec.encoder import H264Config, H264Encoder, encoded_size
from vsproxy.codec.h264 import (
    GOP_MAX_BYTES,
    GOP_MAX_FRAMES,
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    AccessUnit,
    Gop,
    H264Parser,
    has_b_slice,
    nal_type,
    parse_sps,
    split_nals,
    stream_reorders,
)
from vsproxy.outputs import TransportStats
from vsproxy.outputs.fmp4 import init_segment
from vsproxy.outputs.viewer import H264Viewer
from vsproxy.outputs.wire import WS_H264
from vsproxy.render import TestPattern

FAST = {"h264": {"preset": "ultrafast", "keyframe_interval_seconds": 1.0}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def luma(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))


def decode_annexb(units: list[bytes]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    frames = []
    for unit in units:
        frames += decoder.decode(av.Packet(unit))
    return frames


def parse_message(message: bytes) -> tuple[bool, int, bytes]:
    flags, pts = struct.unpack("!BQ", message[:9])
    return bool(flags & 1), pts, message[9:]


# -- the stream parser ----------------------------------------------------------------------------


def test_parse_sps_gives_codec_string_and_cropped_size():
    for width, height in ((1280, 720), (320, 240), (642, 362)):
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
        encoder.time_base = Fraction(1, 30)
        encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
        packets = encoder.encode(av.VideoFrame(width, height, "yuv420p"))
        (sps,) = [n for n in split_nals(bytes(packets[0])) if nal_type(n) == NAL_SPS]
        codec, w, h = parse_sps(sps)
        assert (w, h) == (width, height)
        assert codec.startswith("avc1.") and len(codec) == 11 and codec[5:7] == f"{sps[1]:02X}"
    with pytest.raises(ValueError):
        parse_sps(b"\x67\x64")


def baseline_sps(width_mbs: int, height_mbs: int, poc_cycle: int | None = None) -> bytes:
    """An SPS NAL unit (Baseline, level 4) for a picture of width_mbs x height_mbs macroblocks;
    with `poc_cycle`, of pic_order_cnt_type 1 with a cycle of that many reference frames."""
    bits = "01000010" + "00000000" + "00101000"  # profile_idc 66, constraint flags, level_idc 40

    def ue(value: int) -> str:
        code = bin(value + 1)[2:]
        return "0" * (len(code) - 1) + code

    bits += ue(0) + ue(0)  # sps id, log2_max_frame_num-4
    if poc_cycle is None:
        bits += ue(2)
    else:  # type 1: delta_pic_order_always_zero 0, two offsets se(0), the cycle, each offset se(0)
        bits += ue(1) + "0" + ue(0) + ue(0) + ue(poc_cycle) + ue(0) * min(poc_cycle, 300)
    bits += ue(1) + "0"  # max_num_ref_frames, gaps
    bits += ue(width_mbs - 1) + ue(height_mbs - 1) + "1" + "1" + "0" + "0"  # frame_mbs_only, direct_8x8
    bits += "1"  # rbsp stop bit
    bits += "0" * (-len(bits) % 8)
    rbsp = int(bits, 2).to_bytes(len(bits) // 8, "big")
    escaped, zeros = bytearray(), 0
    for byte in rbsp:  # emulation prevention
        if zeros >= 2 and byte <= 3:
            escaped.append(3)
            zeros = 0
        escaped.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return b"\x67" + bytes(escaped)


def test_an_sps_beyond_what_h264_allows_is_no_stream_configuration():
    """An RTSP server or a cluster peer that sends a parameter set no H.264 level allows (a
    picture of 70000 pixels a side, or a 70 KB PPS) gets its access units dropped, as before the
    first SPS; before, the MP4 init segment for it raised inside the hub's fan-out."""
    assert parse_sps(baseline_sps(80, 45))[1:] == (1280, 720)
    assert parse_sps(baseline_sps(1055, 132))[1:] == (16880, 2112)  # 139260 macroblocks: level 6.2
    for width_mbs, height_mbs in ((1056, 1), (1, 1056), (1055, 133), (4375, 4375)):
        with pytest.raises(ValueError, match="larger than any H.264 level"):
            parse_sps(baseline_sps(width_mbs, height_mbs))
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    first = bytes(encoder.encode(av.VideoFrame(64, 48, "yuv420p"))[0])
    nals = split_nals(first)
    slices = [n for n in nals if nal_type(n) not in (NAL_SPS, NAL_PPS)]
    (pps,) = [n for n in nals if nal_type(n) == NAL_PPS]

    def unit(sps: bytes, pps: bytes) -> bytes:
        return b"".join(b"\x00\x00\x00\x01" + n for n in (sps, pps, *slices))

    parser = H264Parser()
    assert parser.accept(unit(baseline_sps(4375, 4375), pps), 1) is None
    assert parser.accept(unit(baseline_sps(4, 3), pps + b"\xaa" * 70_000), 2) is None
    au = parser.accept(first, 3)  # the stream's own parameter sets: it starts
    assert au is not None and au.keyframe and (au.config.width, au.config.height) == (64, 48)
    assert init_segment(au.config)[4:8] == b"ftyp"


def test_an_sps_that_loops_beyond_its_limits_is_refused_at_once_and_once(monkeypatch):
    """An RTSP server (or a cluster peer) can send an SPS whose pic_order_cnt cycle claims 2^31
    entries in 64 KB of bits: refused at the standard's limit (255), not read bit by bit (0.4 s of
    event loop), and the parser does not read the same refused SPS again with every access unit
    (found by review)."""
    from vsproxy.codec import h264

    assert parse_sps(baseline_sps(80, 45, poc_cycle=255))[1:] == (1280, 720)
    crafted = baseline_sps(80, 45, poc_cycle=2 ** 31)[:-1] + b"\xff" * 65_000
    with pytest.raises(ValueError, match="cycle beyond 255"):
        parse_sps(crafted)
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    nals = split_nals(bytes(encoder.encode(av.VideoFrame(64, 48, "yuv420p"))[0]))
    (pps,) = [n for n in nals if nal_type(n) == NAL_PPS]
    idr = [n for n in nals if nal_type(n) == NAL_IDR]
    reads = []
    real = h264.parse_sps
    parser = H264Parser()
    monkeypatch.setattr(h264, "parse_sps", lambda sps: reads.append(1) or real(sps))
    for i in range(5):
        assert parser.accept(b"".join(b"\x00\x00\x00\x01" + n for n in (crafted, pps, *idr)), i) is None
    assert len(reads) == 1, "the refused SPS was read again with each access unit"


def test_a_gop_is_kept_from_a_keyframe_within_its_frame_and_byte_limits():
    """What the hub keeps for fast start and the RTSP source for its decoder: nothing before a
    keyframe, everything since the last one, and nothing once a GOP outgrows either limit (an
    upstream that hardly sends keyframes, or a 50 Mbit/s camera with 20 s between them) until the
    next keyframe, so memory stays bounded whatever the upstream sends."""
    gop: Gop[str] = Gop()
    gop.add("p", 10, keyframe=False)
    assert len(gop) == 0  # nothing decodable before a keyframe
    gop.add("k", 10, keyframe=True)
    for _ in range(GOP_MAX_FRAMES - 1):
        gop.add("p", 10, keyframe=False)
    assert len(gop) == GOP_MAX_FRAMES and gop[0] == "k"
    gop.add("p", 10, keyframe=False)
    assert len(gop) == 0 and gop.size == 0, "a GOP of more than GOP_MAX_FRAMES is not kept"
    gop.add("p", 10, keyframe=False)
    assert len(gop) == 0, "nor anything after it until the next keyframe"
    gop.add("k", GOP_MAX_BYTES - 100, keyframe=True)
    gop.add("p", 100, keyframe=False)
    assert len(gop) == 2 and gop.size == GOP_MAX_BYTES
    gop.add("p", 1, keyframe=False)
    assert len(gop) == 0, "a GOP of more than GOP_MAX_BYTES is not kept"
    gop.add("k", 5, keyframe=True)
    assert gop.take() == ["k"] and len(gop) == 0


def moving_bar_packets(options: dict[str, str], count: int = 12) -> list[av.Packet]:
    """libx264's packets (decode order) for a bar moving over black, 64x48, with `options`."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = options
    packets = []
    for i in range(count):
        picture = np.zeros((48, 64, 3), np.uint8)
        picture[16:32, (i * 4) % 48:(i * 4) % 48 + 8] = 255
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts = i
        packets += encoder.encode(frame)
    return packets + encoder.encode()


def test_the_sps_says_whether_pictures_may_come_out_of_order_and_b_slices_are_found():
    """What decides whether an RTSP stream can be passed through at once: its SPS rules B-frames
    out (Constrained Baseline; a VUI with max_num_reorder_frames 0, as low-latency encoders
    write), and the B slices of a stream that has them are found in their slice headers."""
    baseline = moving_bar_packets({"preset": "ultrafast", "tune": "zerolatency"})
    low_latency_high = moving_bar_packets({"preset": "veryfast", "tune": "zerolatency"})
    with_b = moving_bar_packets({"preset": "veryfast", "profile": "main", "bf": "2", "b-adapt": "0"})
    assert bytes(baseline[0])[5] == 0x42 and bytes(low_latency_high[0])[5] == 0x64  # profile_idc
    assert stream_reorders(bytes(baseline[0])) is False
    assert stream_reorders(bytes(low_latency_high[0])) is False
    assert stream_reorders(bytes(with_b[0])) is True
    assert stream_reorders(bytes(with_b[1])) is None  # no SPS in it
    assert not any(has_b_slice(bytes(p)) for p in baseline + low_latency_high)
    stepped_back = [i for i in range(1, len(with_b)) if with_b[i].pts < with_b[i - 1].pts]
    assert stepped_back and [i for i, p in enumerate(with_b) if has_b_slice(bytes(p))] == stepped_back


def test_parser_puts_parameter_sets_in_front_of_keyframes_that_lack_them():
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0"}
    first = bytes(encoder.encode(av.VideoFrame(64, 48, "yuv420p"))[0])
    nals = split_nals(first)
    idr_only = b"".join(b"\x00\x00\x00\x01" + n for n in nals if nal_type(n) == NAL_IDR)
    parser = H264Parser()
    assert parser.accept(idr_only, 1) is None  # nothing decodable before parameter sets
    au = parser.accept(first, 2)
    assert au is not None and au.keyframe and au.config_changed
    again = parser.accept(idr_only, 3)
    assert again is not None and again.keyframe and not again.config_changed
    kinds = [nal_type(n) for n in split_nals(again.data)]
    assert kinds[:2] == [NAL_SPS, NAL_PPS] and NAL_IDR in kinds
    assert len(decode_annexb([again.data])) == 1  # a decoder can start at it


# -- the encoder --------------------------------------------------------------------------------


def test_encoded_size_fits_keeps_aspect_and_is_even():
    assert encoded_size(1280, 720, 1920, 1080) == (1280, 720)
    assert encoded_size(3840, 2160, 1920, 1080) == (1920, 1080)
    assert encoded_size(1001, 501, 500, 500) == (500, 250)
    assert encoded_size(17, 9, 1920, 1080) == (16, 8)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_encoder_output_decodes_at_psnr_32_db_with_time_based_keyframes():
    """A moving 720p picture through the shared encoder's default settings: every access unit
    decodes, every picture is within PSNR 32 dB of its source JPEG, keyframes come every second."""
    pattern = TestPattern(1280, 720, "h264 quality", 80)
    sources = [pattern.render(i, 1_700_000_000 + i / 30) for i in range(45)]
    received: list[tuple[bytes, int]] = []
    encoder = H264Encoder("quality", H264Config(keyframe_interval_seconds=1.0), lambda d, p: received.append((d, p)))
    encoder.start()
    try:
        for i, jpeg in enumerate(sources):
            encoder.submit(jpeg, 1_000_000 + i * 33_333)
            await wait_until(lambda i=i: len(received) > i, "the frame to be encoded")
            await asyncio.sleep(1 / 30)  # a real frame rate, for the time-based keyframes
    finally:
        encoder.stop()
    assert encoder.frames_encoded == len(sources) and encoder.frames_skipped == 0
    parser = H264Parser()
    units = [parser.accept(data, pts) for data, pts in received]
    assert all(u is not None for u in units)
    keyframes = [i for i, u in enumerate(units) if u.keyframe]
    assert keyframes[0] == 0 and 1 <= len(keyframes) - 1 <= 2, keyframes  # ~1.5 s of video
    frames = decode_annexb([u.data for u in units])
    assert len(frames) == len(sources)
    scores = [psnr(np.asarray(f.to_image().convert("L")), luma(s)) for f, s in zip(frames, sources, strict=True)]
    assert min(scores) >= 32, scores
    distinct = {hash(f.to_ndarray().tobytes()) for f in frames}
    assert len(distinct) > len(frames) // 2  # a moving picture, not one frame repeated


def noisy_benchmark_camera() -> list[bytes]:
    """bench/upstream.py's moving camera (60 distinct 720p frames with a band of fresh sensor
    noise in each, ~100 KB as JPEG): H.264's worst case, on which the bytes target is set."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_upstream", Path(__file__).parents[1] / "bench" / "upstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_moving_jpegs(60)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_the_default_encoder_meets_the_bytes_target_on_the_noisy_camera(tmp_path):
    """The default settings on the worst case, 2 s of it through the shared encoder: at most 0.2 x
    the MJPEG bytes, and every picture at PSNR >= 32 dB against its source JPEG, as ffmpeg's psnr
    filter measures H.264 (luma in the stream's code values; the tool the issue's figure came
    from, run here on the very bytes a viewer gets). crf 28 (the old default) takes 0.29 x;
    crf 32 drops pictures below 32 dB."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.fail("ffmpeg is not installed (apt-get install ffmpeg; .ci/run installs it)")
    sources = noisy_benchmark_camera()
    frames = [sources[i % len(sources)] for i in range(60)]
    received: list[bytes] = []
    encoder = H264Encoder("noisy", H264Config(), lambda data, pts: received.append(data))
    encoder.start()
    try:
        for i, jpeg in enumerate(frames):
            encoder.submit(jpeg, 1_000_000 + i * 33_333)
            await wait_until(lambda i=i: len(received) > i, "the frame to be encoded", timeout=10)
            await asyncio.sleep(1 / 30)  # a real frame rate: a keyframe a second, as live
    finally:
        encoder.stop()
    assert len(received) == len(frames)
    ratio = sum(map(len, received)) / sum(map(len, frames))
    assert ratio <= 0.2, f"{ratio:.3f} x MJPEG"
    (tmp_path / "viewer.h264").write_bytes(b"".join(received))
    (tmp_path / "sources.mjpeg").write_bytes(b"".join(frames))
    subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
                    "-f", "h264", "-framerate", "30", "-i", str(tmp_path / "viewer.h264"),
                    "-f", "mjpeg", "-framerate", "30", "-i", str(tmp_path / "sources.mjpeg"),
                    "-lavfi", "[0:v]setpts=N/30/TB[a];[1:v]setpts=N/30/TB[b];[a][b]psnr=stats_file=psnr.log",
                    "-f", "null", "-"], cwd=tmp_path, check=True, timeout=60)
    scores = [float(line.split("psnr_y:")[1].split()[0]) for line in (tmp_path / "psnr.log").read_text().splitlines()]
    assert len(scores) == len(frames)
    assert min(scores) >= 32, f"worst picture {min(scores):.2f} dB (ratio {ratio:.3f})"


@pytest.mark.gen_test(timeout=30)
async def test_encoder_never_queues_a_slow_machine_gets_fewer_frames():
    pattern = TestPattern(640, 360, "h264 burst", 80)
    received = []
    encoder = H264Encoder("burst", H264Config(), lambda d, p: received.append(p))
    encoder.start()
    try:
        for i in range(200):  # far faster than it can encode
            encoder.submit(pattern.render(i % 3, 0.0), 1_000 + i)
        await wait_until(lambda: encoder.frames_encoded + encoder.frames_skipped >= 200 or
                         (received and received[-1] == 1_000 + 199), "the last frame to be encoded")
    finally:
        encoder.stop()
    assert received[-1] == 1_000 + 199  # the newest frame always makes it
    assert encoder.frames_skipped > 100  # the rest were replaced in the slot, never queued
    assert received == sorted(received)
    await wait_until(lambda: not [t for t in threading.enumerate() if t.name == "vsproxy-h264-burst"],
                     "the encoder thread to end")


# -- the WebSocket format ------------------------------------------------------------------------


@pytest.mark.config(FAST)
@pytest.mark.gen_test(timeout=30)
async def test_ws_h264_contract_config_then_keyframe_first_with_parameter_sets(api, ws_connect):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    assert json.loads(await recv(conn))["type"] == "status"
    config = None
    units = []
    while len(units) < 40:
        message = await recv(conn)
        if isinstance(message, str):
            parsed = json.loads(message)
            if parsed["type"] == "config":
                assert not units, "the config message comes before the first access unit"
                config = parsed
            continue
        units.append(parse_message(message))
    assert config is not None and config["codec"].startswith("avc1.")
    assert (config["width"], config["height"]) == (320, 240)  # the test config's demo size
    assert units[0][0], "the first access unit is a keyframe"
    for keyframe, _, data in units:
        kinds = [nal_type(n) for n in split_nals(data)]
        assert (NAL_IDR in kinds) == keyframe
        if keyframe:
            assert kinds.index(NAL_SPS) < kinds.index(NAL_IDR) and NAL_PPS in kinds
    pts = [p for _, p, _ in units]
    assert pts == sorted(pts) and abs(pts[-1] / 1e6 - time.time()) < 5  # microseconds since the epoch
    frames = decode_annexb([d for _, _, d in units])
    assert len(frames) == len(units) and (frames[0].width, frames[0].height) == (320, 240)


@pytest.mark.gen_test(timeout=30)
async def test_h264_refuses_fps_and_unknown_formats(api, http_port):
    session_id = (await api.create_session())["sessionId"]
    for path in (f"/stream/{session_id}?format=h264&fps=10", f"/stream/{session_id}/stream.mp4?fps=10"):
        head, stream = await raw_request(http_port, path, headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} if "mp4" not in path else None)
        stream.close()
        assert head.status == 400 and "GOP" in head.json()["error"], head.body


@pytest.mark.config({"h264": {"preset": "ultrafast", "keyframe_interval_seconds": 4.0}})
@pytest.mark.gen_test(timeout=30)
async def test_a_late_viewer_starts_at_once_from_the_gop_cache(api, ws_connect, proxy):
    session_id = (await api.create_session())["sessionId"]
    first = await ws_connect(f"/stream/{session_id}?format=h264")
    keyframe_pts = None
    seen = 0
    while seen < 20:  # well into the 4 s GOP
        message = await recv(first)
        if isinstance(message, bytes):
            keyframe, pts, _ = parse_message(message)
            seen += 1
            if keyframe:
                keyframe_pts = pts
    assert keyframe_pts is not None
    hub = proxy.hubs["demo"]
    assert hub.gop and hub.gop[0].keyframe and len(hub.gop) >= 20
    started = time.monotonic()
    late = await ws_connect(f"/stream/{session_id}?format=h264")
    messages = []
    while sum(isinstance(m, bytes) for m in messages) < 20:
        messages.append(await recv(late))
    waited = time.monotonic() - started
    units = [parse_message(m) for m in messages if isinstance(m, bytes)]
    assert units[0][0] and units[0][1] == keyframe_pts, "it starts with the cached keyframe"
    assert any(json.loads(m)["type"] == "config" for m in messages if isinstance(m, str))
    assert waited < 3.0, "20 frames arrived long before the next keyframe (4 s GOP)"
    assert len(decode_annexb([d for _, _, d in units])) == len(units)


# -- the encoder follows the H.264 viewers ----------------------------------------------------------


def encoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vsproxy-h264")]


@pytest.mark.config(FAST)
@pytest.mark.gen_test(timeout=30)
async def test_encoder_runs_only_while_h264_viewers_are_attached(api, ws_connect, proxy, http_port):
    session_id = (await api.create_session())["sessionId"]
    hub = proxy.hubs["demo"]
    jpeg_viewer = await ws_connect(f"/stream/{session_id}?format=binary")
    for _ in range(5):
        await recv(jpeg_viewer)
    assert hub.encoder is None and not encoder_threads(), "JPEG viewers never start the encoder"

    h264_viewer = await ws_connect(f"/stream/{session_id}?format=h264")
    head, mp4 = await raw_request(http_port, f"/stream/{session_id}/stream.mp4")
    assert head.status == 200
    await wait_until(lambda: hub.encoder is not None and hub.encoder.frames_encoded > 5, "frames to be encoded")
    assert encoder_threads() == ["vsproxy-h264-demo"]  # one per upstream, not one per viewer
    h264_viewer.close()
    await asyncio.sleep(0.3)
    assert hub.encoder.running, "the MP4 viewer still needs it"
    mp4.close()
    await wait_until(lambda: not hub.encoder.running, "the encoder to stop with the last H.264 viewer")
    await wait_until(lambda: not encoder_threads(), "the encoder thread to end")
    assert await next_message(jpeg_viewer) is not None, "the JPEG viewer is unaffected"


@pytest.mark.config(FAST)
@pytest.mark.gen_test(timeout=30)
async def test_a_viewer_coming_and_going_does_not_restart_the_encoder_each_time(api, ws_connect, proxy):
    """Each encoder start is a thread and a new libx264 context: a client opening and closing
    H.264 sockets in a loop would cost one per socket. The encoder runs at least
    ENCODER_MIN_RUN_SECONDS once started, so such a loop costs one start, and then it stops."""
    from vsproxy.hub import ENCODER_MIN_RUN_SECONDS

    session_id = (await api.create_session())["sessionId"]
    hub = proxy.hubs["demo"]
    started = time.monotonic()
    for _ in range(10):
        viewer = await ws_connect(f"/stream/{session_id}?format=h264")
        await recv(viewer)  # connected, and served
        viewer.close()
        await wait_until(lambda: not hub.h264_viewer_count(), "the viewer to leave")
    assert hub.encoder.starts == 1 and hub.encoder.running
    await wait_until(lambda: not hub.encoder.running, "the encoder to stop once its minimum run is over")
    assert time.monotonic() - started >= ENCODER_MIN_RUN_SECONDS
    await wait_until(lambda: not encoder_threads(), "the encoder thread to end")


# -- fragmented MP4 ----------------------------------------------------------------------------------


@pytest.mark.config(FAST)
@pytest.mark.gen_test(timeout=30)
async def test_stream_mp4_plays_in_ffmpeg_starting_at_a_keyframe(api, http_port):
    session_id = (await api.create_session())["sessionId"]
    head, stream = await raw_request(http_port, f"/stream/{session_id}/stream.mp4")
    assert head.status == 200 and head.headers["Content-Type"] == "video/mp4"
    data = bytearray(head.body)
    deadline = time.monotonic() + 15
    while data.count(b"moof") < 45 and time.monotonic() < deadline:
        data += await stream.read_bytes(65536, partial=True)
    stream.close()
    assert data[4:8] == b"ftyp"
    with av.open(io.BytesIO(bytes(data)), format="mp4") as container:
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (320, 240)
        frames = list(container.decode(video))
    assert len(frames) >= 30
    assert frames[0].key_frame
    times = [f.time for f in frames]
    assert times == sorted(times) and times[-1] - times[0] > 0.5  # real timing, ~30 fps


@pytest.mark.gen_test(timeout=60)
async def test_clients_that_hang_up_right_after_asking_for_a_stream_cost_no_error_and_no_place(api, http_port,
                                                                                               proxy):
    """A player that asks for stream.mp4 (or the MJPEG stream) and is gone before its response
    begins (a page closed, a `<video>` whose src changed at once) is forgotten quietly: no
    traceback in the log, its place given back, and the session's viewers connect as before."""
    session_id = (await api.create_session())["sessionId"]
    loop = asyncio.get_running_loop()
    for path in (f"/stream/{session_id}/stream.mp4", f"/stream/{session_id}/mjpeg"):
        for _ in range(40):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", http_port))
            await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, at once
            await asyncio.sleep(0.001)
    await wait_until(lambda: not proxy.hubs["demo"].viewer_count(), "the aborted viewers to be gone")
    head, stream = await raw_request(http_port, f"/stream/{session_id}/stream.mp4")
    data = head.body
    while b"moof" not in data:
        data += await stream.read_bytes(65536, partial=True)
    stream.close()
    assert head.status == 200 and data[4:8] == b"ftyp"


@pytest.mark.gen_test(timeout=60)
async def test_websocket_viewers_that_hang_up_right_after_the_handshake_cost_no_error(api, http_port, proxy,
                                                                                      ws_connect):
    """A WebSocket viewer that resets its connection as soon as it has asked for the upgrade (a
    tab closed, a reconnect loop) is let go quietly: no traceback in the log from greeting a
    connection that is gone, or from making a viewer of it."""
    session_id = (await api.create_session())["sessionId"]
    loop = asyncio.get_running_loop()

    async def hang_up(fmt: str, after: float) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", http_port))
        head = "".join(f"{k}: {v}\r\n" for k, v in WS_UPGRADE.items())
        await loop.sock_sendall(sock, f"GET /stream/{session_id}?format={fmt} HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{http_port}\r\n{head}\r\n".encode())
        await asyncio.sleep(after)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset

    for _ in range(40):
        await asyncio.gather(*(hang_up(fmt, after) for fmt in ("h264", "binary") for after in (0, 0.001, 0.005)))
    await wait_until(lambda: not proxy.hubs["demo"].viewer_count(), "the viewers that hung up to be gone")
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    while not isinstance(message := await recv(conn), bytes):
        pass
    assert parse_message(message)[0], "a new viewer starts at a keyframe as ever"


# -- backpressure: a throttled H.264 viewer skips to keyframes ---------------------------------------


def fake_gop_units(count: int, gop: int, size: int = 20_000) -> list[AccessUnit]:
    """Access units with a keyframe every `gop` (payload bytes only: the viewer does not decode)."""
    from vsproxy.codec.h264 import StreamConfig

    config = StreamConfig("avc1.42E01E", 64, 48, b"\x67\x42\xe0\x1e", b"\x68\xce")
    return [AccessUnit(b"\x00\x00\x00\x01" + bytes([0x65 if i % gop == 0 else 0x41]) + bytes(size),
                       i % gop == 0, i * 33_333, config, i + 1) for i in range(count)]


async def read_everything_held(viewer: H264Viewer, client: socket.socket, timeout: float = 10) -> bytes:
    """Read (non-blocking `client`) all that `viewer` wrote and holds, as the hub's tick would
    flush it; the bytes received."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (viewer.pending is not None or viewer.busy or viewer._kernel_backlog()):
        try:
            received += client.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.01)
            viewer.flush_pending()
    await asyncio.sleep(0.05)
    with contextlib.suppress(BlockingIOError):
        received += client.recv(1 << 20)
    return bytes(received)


@pytest.mark.gen_test(timeout=30)
async def test_a_throttled_h264_viewer_skips_to_keyframes_and_holds_at_most_one_gop():
    server, client = socket_pair()
    stats = TransportStats()
    viewer = H264Viewer(server, WS_H264, stats, close=lambda reason: None)
    units = fake_gop_units(120, gop=10)
    max_queue = 0
    for au in units:  # the client reads nothing meanwhile
        viewer.offer(au, au.encoded(WS_H264))
        max_queue = max(max_queue, len(viewer._queue))
        await asyncio.sleep(0)
    assert max_queue <= 10, "never more than one GOP held"
    assert viewer.frames_dropped > 50 and stats.frames_dropped == viewer.frames_dropped
    # What it holds now begins at the newest keyframe: it is at most one GOP behind live.
    assert viewer.pending is not None
    assert viewer._queue[0][0].keyframe and viewer._queue[0][0].seq > units[-1].seq - 10
    # Reading again: everything still held arrives; wherever frames were skipped, the next one
    # received is a keyframe (a decoder never sees a frame whose reference it lacks).
    received = await read_everything_held(viewer, client)
    got = [(parse_message(m)[0], parse_message(m)[1] // 33_333)
           for op, m in ws_server_messages(received) if op == 2]
    assert got and got[-1][1] == units[-1].seq - 1, "it caught up with live"
    for (_, previous), (keyframe, index) in zip(got, got[1:], strict=False):
        assert index > previous
        if index != previous + 1:
            assert keyframe, f"skipped from {previous} to {index}, which is not a keyframe"
    server.close()
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_fast_h264_viewer_gets_every_frame_in_order():
    server, client = socket_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    viewer = H264Viewer(server, WS_H264, TransportStats(), close=lambda reason: None)
    units = fake_gop_units(30, gop=10, size=200)
    received = bytearray()
    for au in units:
        viewer.offer(au, au.encoded(WS_H264))
        await asyncio.sleep(0.005)
        try:
            received += client.recv(1 << 20)
        except BlockingIOError:
            pass
    await wait_until(lambda: not viewer._queue and not viewer.busy, "everything to be written")
    try:
        received += client.recv(1 << 20)
    except BlockingIOError:
        pass
    assert viewer.frames_dropped == 0 and viewer.frames_sent == 30
    assert bytes(received).count(b"\x82") >= 30  # one binary WebSocket frame per access unit
    server.close()
    client.close()


@pytest.mark.slow
@pytest.mark.config({"h264": {"preset": "ultrafast", "crf": 4}})  # large access units: keyframes of ~20 KB
@pytest.mark.gen_test(timeout=40)
async def test_an_h264_viewer_whose_link_fills_for_a_moment_gets_every_frame_when_it_has_room(api, http_port,
                                                                                              proxy):
    """A viewer on a link with room to spare (it reads about four times the stream's bitrate)
    whose small receive window fills for a moment with each keyframe: the frames that come while
    the kernel still holds unsent bytes go out as soon as those have gone, not a second later at
    the hub's tick (which froze it about once a second, and skipped frames to the next keyframe)."""
    session_id = (await api.create_session())["sessionId"]
    loop = asyncio.get_running_loop()
    sock = await small_buffer_ws(http_port, f"/stream/{session_id}?format=h264", rcvbuf=4096)
    received = bytearray()
    lags: list[float] = []  # arrival here minus presentation (capture) time, per access unit
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            data = await asyncio.wait_for(loop.sock_recv(sock, 8192), WAIT)
            assert data, "the proxy closed the connection"
            received += data
            units = [m for op, m in ws_server_messages(bytes(received)) if op == 2]
            lags += [time.time() - parse_message(m)[1] / 1e6 for m in units[len(lags):]]
            await asyncio.sleep(0.02)  # about 400 KB/s: four times what this stream needs
    finally:
        sock.close()
    stats = proxy.hubs["demo"].stats[WS_H264]
    assert len(lags) >= 100, f"{len(lags)} access units in 5 s of a 30 fps stream"
    assert stats.frames_dropped == 0, f"{stats.frames_dropped} frames skipped for a viewer with room to spare"
    lags.sort()
    assert lags[len(lags) // 2] < 0.25, f"median lag {lags[len(lags) // 2]:.3f} s"


@pytest.mark.slow
@pytest.mark.config({"h264": {"preset": "ultrafast", "crf": 4, "keyframe_interval_seconds": 2}})  # ~100 KB/s
@pytest.mark.gen_test(timeout=40)
async def test_an_h264_viewer_on_a_link_slower_than_the_stream_gets_pictures_seconds_old_not_a_gop(
        api, http_port, proxy):
    """A viewer whose link carries a quarter of the stream's bitrate cannot see every frame; it
    gets the freshest it can: the proxy never commits more than a quarter of a second of the
    stream to its socket at once, so what it reads is at most about a keyframe interval (2 s here)
    plus that old: 2.3 s measured (a whole GOP written at once: 4.4-5.6 s)."""
    session_id = (await api.create_session())["sessionId"]
    loop = asyncio.get_running_loop()
    sock = await small_buffer_ws(http_port, f"/stream/{session_id}?format=h264", rcvbuf=4096)
    received = bytearray()
    ages: list[float] = []  # arrival here minus presentation (capture) time, per access unit
    started = time.monotonic()
    try:
        while time.monotonic() < started + 14:
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), WAIT)
            assert data, "the proxy closed the connection"
            received += data
            units = [m for op, m in ws_server_messages(bytes(received)) if op == 2]
            ages += [time.time() - parse_message(m)[1] / 1e6 for m in units[len(ages):]]
            await asyncio.sleep(0.08)  # about 25 KB/s
    finally:
        sock.close()
    gop = proxy.hubs["demo"].gop  # the access units since the last keyframe, 30 a second
    stream_rate = sum(len(au.data) for au in gop) / len(gop) * 30
    assert len(received) / 14 < stream_rate / 2, f"the link ({len(received) / 14:.0f} B/s) is not slower " \
                                                 f"than the stream ({stream_rate:.0f} B/s)"
    late = [a for a in ages[len(ages) // 3:]]  # once the first GOP (fast start) is read
    assert late and max(late) < 3.5, f"access units up to {max(late):.1f} s old"


# -- end to end: what a viewer decodes against what the camera sent -----------------------------------


def best_psnr(picture: np.ndarray, references: list[np.ndarray]) -> float:
    """PSNR of a decoded picture against the source frame it matches best (the camera's frames
    are distinct, so the best match is the one it was encoded from)."""
    return max(psnr(picture, ref) for ref in references)


@pytest.mark.slow
@pytest.mark.config(FAST)
@pytest.mark.gen_test(timeout=60)
async def test_viewers_decode_the_moving_camera_at_psnr_32_db_over_websocket_and_mp4(sim, api, ws_connect,
                                                                                     http_port):
    session_id = (await api.create_session())["sessionId"]
    conn = await ws_connect(f"/stream/{session_id}?format=h264")
    head, mp4 = await raw_request(http_port, f"/stream/{session_id}/stream.mp4")
    mp4_data = bytearray(head.body)
    units = []
    while len(units) < 45:
        message = await recv(conn)
        if isinstance(message, bytes):
            units.append(parse_message(message)[2])
    while mp4_data.count(b"moof") < 30:
        mp4_data += await mp4.read_bytes(65536, partial=True)
    mp4.close()
    references = [luma(jpeg) for jpeg in list(sim.frames)]
    ws_pictures = decode_annexb(units)
    with av.open(io.BytesIO(bytes(mp4_data)), format="mp4") as container:
        mp4_pictures = list(container.decode(container.streams.video[0]))
    for name, pictures in (("format=h264", ws_pictures), ("stream.mp4", mp4_pictures)):
        assert len(pictures) >= 30, name
        lumas = [np.asarray(p.to_image().convert("L"), dtype=np.float64) for p in pictures]
        assert len({hash(y.tobytes()) for y in lumas}) > len(lumas) // 2, f"{name}: a moving picture"
        scores = [best_psnr(y, references) for y in lumas[:30]]
        assert min(scores) >= 32, (name, scores)


@pytest.mark.gen_test(timeout=30)
async def test_an_mp4_viewer_is_closed_when_the_parameter_sets_change_at_the_same_size():
    """stream.mp4 carries SPS and PPS only in its init segment: new ones (an upstream that
    reconnected with other encoder settings, same codec string and size) would be decoded with the
    old ones, so the response ends and the player reconnects; a WebSocket viewer carries on (its
    keyframes bring their parameter sets)."""
    from vsproxy.codec.h264 import StreamConfig
    from vsproxy.outputs.wire import MP4

    old = StreamConfig("avc1.42E01E", 64, 48, b"\x67\x42\xe0\x1e", b"\x68\xce")
    new = StreamConfig("avc1.42E01E", 64, 48, b"\x67\x42\xe0\x1e", b"\x68\xce\x3c\x80")  # another PPS
    units = [AccessUnit(b"\x00\x00\x00\x01\x65" + bytes(100), True, 0, old, 1),
             AccessUnit(b"\x00\x00\x00\x01\x41" + bytes(100), False, 33_333, old, 2),
             AccessUnit(b"\x00\x00\x00\x01\x65" + bytes(100), True, 66_666, new, 3)]
    closed: dict[str, list[str]] = {MP4: [], WS_H264: []}
    for transport in (MP4, WS_H264):
        server, client = socket_pair()
        viewer = H264Viewer(server, transport, TransportStats(), close=closed[transport].append)
        for au in units:
            viewer.offer(au, au.encoded(transport))
            await asyncio.sleep(0)
        assert viewer.frames_sent == (2 if transport == MP4 else 3)
        server.close()
        client.close()
    assert closed[MP4] == ["the stream's parameters changed; reconnect"]
    assert closed[WS_H264] == []


@pytest.mark.gen_test(timeout=30)
async def test_a_viewer_that_skipped_the_change_of_stream_parameters_is_told_them_at_its_next_keyframe():
    """A slow WebSocket viewer whose queue held the access unit that changed the stream's size
    (with its config message) and was dropped when the next keyframe came: that keyframe brings
    the config message, or the viewer's decoder would be left with the old size and codec."""
    from vsproxy.codec.h264 import StreamConfig

    old = StreamConfig("avc1.42E01E", 64, 48, b"\x67\x42\xe0\x1e", b"\x68\xce")
    new = StreamConfig("avc1.42E01F", 128, 96, b"\x67\x42\xe0\x1f", b"\x68\xce")
    units = [AccessUnit(b"\x00\x00\x00\x01\x65" + bytes(8 << 20), True, 0, old, 1),  # fills the socket
             AccessUnit(b"\x00\x00\x00\x01\x41" + bytes(100), False, 33_333, old, 2),
             AccessUnit(b"\x00\x00\x00\x01\x65" + bytes(100), True, 66_666, new, 3, config_changed=True),
             AccessUnit(b"\x00\x00\x00\x01\x41" + bytes(100), False, 99_999, new, 4),
             AccessUnit(b"\x00\x00\x00\x01\x65" + bytes(100), True, 133_332, new, 5)]
    server, client = socket_pair()
    viewer = H264Viewer(server, WS_H264, TransportStats(), close=lambda reason: None)
    try:
        for au in units:
            viewer.offer(au, au.encoded(WS_H264))
            await asyncio.sleep(0)
        assert viewer.frames_dropped == 3, "units 2-4 were queued, then skipped for keyframe 5"
        messages = ws_server_messages(await read_everything_held(viewer, client))
        configs = [json.loads(m) for op, m in messages if op == 1]
        pts = [parse_message(m)[1] for op, m in messages if op == 2]
        assert pts == [0, 133_332]
        assert [(c["width"], c["height"]) for c in configs] == [(64, 48), (128, 96)]
        assert [op for op, _ in messages] == [1, 2, 1, 2], "the new config comes before the keyframe"
    finally:
        server.close()
        client.close()


@pytest.mark.allow_tracebacks  # the failure is logged with its traceback, as it should be
@pytest.mark.gen_test(timeout=60)
async def test_an_encoder_that_fails_unexpectedly_starts_anew_instead_of_freezing_its_viewers(monkeypatch):
    """A codec error nobody foresaw (here libx264 failing to open once) used to end the worker
    thread while the encoder still said it ran: its viewers waited for frames for ever. Now the
    failure is counted, new codecs take over, and access units come again, a keyframe first."""
    from vsproxy.codec import encoder as encoder_module

    opened = []
    real_open = encoder_module.open_x264

    def failing_once(*args, **kwargs):
        opened.append(1)
        if len(opened) == 1:
            raise RuntimeError("libx264 failed")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "open_x264", failing_once)
    pattern = TestPattern(320, 240, "restart", 80)
    received: list[tuple[bytes, int]] = []
    encoder = H264Encoder("restart", H264Config(preset="ultrafast"), lambda d, p: received.append((d, p)))
    encoder.start()
    try:
        i = 0
        deadline = time.monotonic() + 20
        while not received:
            assert time.monotonic() < deadline, f"no access unit after the failure ({encoder.restarts} restarts)"
            encoder.submit(pattern.render(i, 1_700_000_000 + i / 30), 1_000_000 + i * 33_333)
            i += 1
            await asyncio.sleep(1 / 30)
        assert encoder.running and encoder.restarts == 1 and len(opened) == 2
        parser = H264Parser()
        first = parser.accept(*received[0])
        assert first is not None and first.keyframe
    finally:
        encoder.stop()


@pytest.mark.gen_test(timeout=60)
async def test_stated_times_that_go_back_continue_at_the_frame_rate_not_1_us_apart():
    """A publisher whose clock is 8 s behind ours (or steps back): its stated capture times fall
    behind the encoder's first picture (seeded at our clock). The access units go on from there
    spaced as the frames came, instead of 1 us after each other until its clock caught up (WebRTC
    viewers in Chromium froze for 10 s on it; MP4 samples lasted 1 us; found by review)."""
    pattern = TestPattern(160, 120, "clock", 80)
    received: list[tuple[bytes, int]] = []
    encoder = H264Encoder("clock", H264Config(preset="ultrafast"), lambda d, p: received.append((d, p)))
    now_us = int(time.time() * 1_000_000)
    encoder.start()
    try:
        for i in range(20):
            stated = now_us if i == 0 else now_us - 8_000_000 + i * 33_333  # 8 s behind after the first
            encoder.submit(pattern.render(i, 1_700_000_000 + i / 30), stated)
            await wait_until(lambda i=i: len(received) > i, "the frame to be encoded")
            await asyncio.sleep(1 / 30)
    finally:
        encoder.stop()
    steps = [b - a for (_, a), (_, b) in zip(received, received[1:], strict=False)]
    assert all(step >= 10_000 for step in steps), steps  # about a frame apart (33 ms), never 1 us
    assert all(20_000 <= step <= 200_000 for step in steps[1:]), steps  # the publisher's own spacing
