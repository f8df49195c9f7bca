"""H.264 elementary streams as vsproxy carries them: Annex-B access units, one per video frame.

No decoding here: only what a proxy must read to pass H.264 through untouched: where the NAL
units are, which access units are keyframes, the parameter sets (SPS/PPS) a keyframe needs in
front of it, what the SPS says (RFC 6381 codec string, picture size, whether pictures may come
out of presentation order) and which slices are B slices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..wirecache import WireCached

START_CODE = b"\x00\x00\x00\x01"
NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

# Profiles whose constraint_set5_flag, when set, rules out B slices (H.264 7.4.2.1.1).
_NO_B_SLICE_FLAG_PROFILES = frozenset({77, 88, 100, 118})
SLICE_TYPE_B = 1  # slice_type modulo 5 (7.4.3)

# Profiles whose SPS carries chroma format, bit depths and scaling matrices (H.264 7.3.2.1.1).
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def split_nals(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B byte string, without their start codes."""
    nals = []
    n = len(data)
    i = data.find(b"\x00\x00\x01")
    while i != -1:
        start = i + 3
        j = data.find(b"\x00\x00\x01", start)
        end = n if j == -1 else j
        # A 4-byte start code's leading zero belongs to the start code, not the previous NAL;
        # trailing zeros before a start code are never part of a NAL unit.
        nal = data[start:end].rstrip(b"\x00") if j != -1 else data[start:end]
        if nal:
            nals.append(nal)
        i = j
    return nals


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def join_nals(nals: list[bytes]) -> bytes:
    """NAL units as one Annex-B byte string (4-byte start codes)."""
    return b"".join(START_CODE + nal for nal in nals)


class _Bits:
    """An MSB-first bit reader over an RBSP (emulation-prevention bytes removed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]  # IndexError on a truncated SPS: the caller's ValueError
            value = (value << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _rbsp(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


@dataclass(frozen=True)
class StreamConfig:
    """What a decoder must be told before the first access unit (and again when it changes)."""

    codec: str  # RFC 6381, e.g. "avc1.64001F"
    width: int
    height: int
    sps: bytes
    pps: bytes

    def message(self) -> str:
        """The `{"type": "config", ...}` text message of the WebSocket H.264 format."""
        return json.dumps({"type": "config", "codec": self.codec, "width": self.width, "height": self.height})


# The largest picture any H.264 level allows (level 6.2, Table A-1: MaxFS 139264 macroblocks, and
# no side longer than sqrt(8 * MaxFS)). Beyond them an SPS is not H.264 a decoder would take, and
# its size would not fit the MP4 boxes either.
MAX_FRAME_MBS = 139_264
MAX_SIDE_MBS = 1_055
# Parameter sets are stored with 16-bit lengths in MP4 (avcC); longer ones are no real encoder's.
MAX_PARAMETER_SET_BYTES = 0xFFFF


# What is kept of one GOP anywhere (the hub's fast-start cache, RTSP's replay for its decoder, a
# viewer's queue): an upstream whose keyframes are further apart, or whose GOP is larger, gets
# its GOP dropped and waits for the next keyframe instead of holding memory without bound.
GOP_MAX_FRAMES = 600
GOP_MAX_BYTES = 16 << 20

_Item = TypeVar("_Item")


class Gop(Generic[_Item]):
    """The items (access units, or RTSP packets) since the last keyframe, within GOP_MAX_FRAMES
    and GOP_MAX_BYTES: beyond either, or before the first keyframe, it holds nothing."""

    __slots__ = ("items", "size")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.size = 0  # bytes

    def add(self, item: _Item, size: int, keyframe: bool) -> None:
        if keyframe:
            self.items, self.size = [item], size
        elif self.items:
            self.items.append(item)
            self.size += size
            if len(self.items) > GOP_MAX_FRAMES or self.size > GOP_MAX_BYTES:
                self.clear()

    def clear(self) -> None:
        self.items, self.size = [], 0

    def take(self) -> list[_Item]:
        """What it holds, emptying it."""
        items = self.items
        self.clear()
        return items

    def __iter__(self) -> Iterator[_Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Item:
        return self.items[index]


def parse_sps(sps: bytes) -> tuple[str, int, int]:
    """(RFC 6381 codec string, width, height) of an SPS NAL unit; ValueError if it is not one."""
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        raise ValueError("not an SPS NAL unit")
    codec = f"avc1.{sps[1]:02X}{sps[2]:02X}{sps[3]:02X}"
    try:
        return (codec, *_sps_size(_rbsp(sps[1:])))
    except IndexError:
        raise ValueError("truncated SPS") from None


def _sps_size(rbsp: bytes) -> tuple[int, int]:
    return _read_sps(_Bits(rbsp))


def _read_sps(bits: _Bits) -> tuple[int, int]:
    """Picture size; leaves `bits` at vui_parameters_present_flag."""
    profile_idc = bits.u(8)
    bits.u(16)  # constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc == 3:
            bits.u(1)  # separate_colour_plane_flag
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if bits.u(1):
                    size, last, nxt = (16 if i < 6 else 64), 8, 8
                    for _ in range(size):
                        if nxt:
                            nxt = (last + bits.se() + 256) % 256
                        last = nxt or last
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        cycle = bits.ue()  # num_ref_frames_in_pic_order_cnt_cycle: 0 to 255 (7.4.2.1.1)
        if cycle > 255:
            raise ValueError("bad SPS: pic_order_cnt cycle beyond 255")
        for _ in range(cycle):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    height_mbs = (2 - frame_mbs_only) * height_map_units
    if max(width_mbs, height_mbs) > MAX_SIDE_MBS or width_mbs * height_mbs > MAX_FRAME_MBS:
        raise ValueError("SPS gives a picture larger than any H.264 level allows")
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = height_mbs * 16
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        sub_w, sub_h = {0: (1, 1), 1: (2, 2), 2: (2, 1)}.get(chroma_format_idc, (1, 1))
        width -= (left + right) * sub_w
        height -= (top + bottom) * sub_h * (2 - frame_mbs_only)
    if width <= 0 or height <= 0:
        raise ValueError("SPS gives no picture size")
    return width, height


def sps_reorders(sps: bytes) -> bool | None:
    """Whether the SPS allows pictures out of presentation order (B-frames): False when its
    profile or constraint flags rule out B slices or its VUI says no frame is reordered, True
    when the VUI says frames may be, None when it does not say (or cannot be read)."""
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        return None
    profile_idc, flags = sps[1], sps[2]
    if profile_idc == 66 or (profile_idc in _NO_B_SLICE_FLAG_PROFILES and flags & 0x04):
        return False
    bits = _Bits(_rbsp(sps[1:]))
    try:
        _read_sps(bits)
        if not bits.u(1):  # vui_parameters_present_flag
            return None
        reorder = _vui_max_num_reorder_frames(bits)
    except (IndexError, ValueError):
        return None
    return None if reorder is None else reorder > 0


def _vui_max_num_reorder_frames(bits: _Bits) -> int | None:
    """max_num_reorder_frames of the VUI (E.1.1), None without bitstream restrictions."""
    if bits.u(1) and bits.u(8) == 255:  # aspect_ratio_info_present_flag, aspect_ratio_idc
        bits.u(32)  # sar_width, sar_height
    if bits.u(1):  # overscan_info_present_flag
        bits.u(1)
    if bits.u(1):  # video_signal_type_present_flag
        bits.u(4)  # video_format, video_full_range_flag
        if bits.u(1):  # colour_description_present_flag
            bits.u(24)
    if bits.u(1):  # chroma_loc_info_present_flag
        bits.ue()
        bits.ue()
    if bits.u(1):  # timing_info_present_flag
        bits.u(65)  # num_units_in_tick, time_scale, fixed_frame_rate_flag
    hrd = 0
    for _ in range(2):  # nal_hrd_parameters_present_flag, vcl_hrd_parameters_present_flag
        if bits.u(1):
            hrd += 1
            count = bits.ue() + 1  # cpb_cnt_minus1: 0 to 31 (E.2.2)
            if count > 32:
                raise ValueError("bad VUI: cpb_cnt beyond 32")
            bits.u(8)  # bit_rate_scale, cpb_size_scale
            for _ in range(count):
                bits.ue()  # bit_rate_value_minus1
                bits.ue()  # cpb_size_value_minus1
                bits.u(1)  # cbr_flag
            bits.u(20)  # four delay and length fields
    if hrd:
        bits.u(1)  # low_delay_hrd_flag
    bits.u(1)  # pic_struct_present_flag
    if not bits.u(1):  # bitstream_restriction_flag
        return None
    bits.u(1)  # motion_vectors_over_pic_boundaries_flag
    for _ in range(4):  # max_bytes_per_pic_denom, max_bits_per_mb_denom, log2_max_mv_length_*
        bits.ue()
    return bits.ue()


def stream_reorders(data: bytes) -> bool | None:
    """`sps_reorders` of the first SPS in an Annex-B byte string; None without one."""
    for nal in split_nals(data):
        if nal_type(nal) == NAL_SPS:
            return sps_reorders(nal)
    return None


def has_b_slice(data: bytes) -> bool:
    """Whether an Annex-B access unit has a B slice (slice_type read from each slice header)."""
    for nal in split_nals(data):
        if nal_type(nal) in (NAL_SLICE, NAL_IDR):
            bits = _Bits(_rbsp(nal[1:12]))
            try:
                bits.ue()  # first_mb_in_slice
                if bits.ue() % 5 == SLICE_TYPE_B:
                    return True
            except (IndexError, ValueError):
                continue
    return False


MAX_FRAME_AGE_OFFSET = 60.0  # a capture time further back is a clock problem, not an age
CLOCK_AHEAD_LIMIT_SECONDS = 10.0  # one further ahead of our clock is one too


def capture_time(stated: float | None, arrived_wall: float) -> float:
    """A frame's capture time (wall clock): the one its upstream states, where our clock could
    agree with it (at most CLOCK_AHEAD_LIMIT_SECONDS ahead of the frame's arrival, at most
    MAX_FRAME_AGE_OFFSET behind), else its arrival. An upstream's word is not trusted: a NaN, an
    infinity or a time days off would break the frame's H.264 presentation time, and with it
    every later one (they must increase)."""
    if stated is not None and arrived_wall - MAX_FRAME_AGE_OFFSET <= stated <= arrived_wall + CLOCK_AHEAD_LIMIT_SECONDS:
        return stated
    return arrived_wall


def frame_age_offset(arrived_wall: float, captured_wall: float) -> float:
    """Seconds between a frame's capture and its arrival here (clamped: clocks of other hosts may
    disagree with ours)."""
    return min(max(0.0, arrived_wall - captured_wall), MAX_FRAME_AGE_OFFSET)


class AccessUnit(WireCached):
    """One coded video frame in Annex-B form, and its wire representations, each built once.

    Every keyframe carries the stream's SPS and PPS in front of its IDR slice, so a decoder can
    start at any keyframe. `config_changed` marks the first access unit of new stream parameters.
    """

    __slots__ = ("data", "keyframe", "pts_us", "config", "config_changed", "seq", "start_us", "duration_us",
                 "arrived", "age_offset")

    def __init__(self, data: bytes, keyframe: bool, pts_us: int, config: StreamConfig, seq: int = 0, *,
                 config_changed: bool = False, start_us: int | None = None, duration_us: int = 33_333) -> None:
        self.data = data
        self.keyframe = keyframe
        self.pts_us = pts_us  # presentation time, microseconds since the Unix epoch
        self.config = config
        self.config_changed = config_changed
        self.seq = seq
        self.start_us = pts_us if start_us is None else start_us  # when this stream configuration began
        self.duration_us = duration_us  # expected display time: the interval since the previous one
        self.arrived = time.monotonic()
        # Its presentation time is the capture time: how much older than now (encoding included).
        self.age_offset = frame_age_offset(time.time(), pts_us / 1_000_000)
        self._encoded: dict[str, bytes] = {}


class H264Parser:
    """Turns a sequence of Annex-B access units (from an encoder or an RTSP server) into
    `AccessUnit`s: remembers the latest SPS/PPS, puts them in front of keyframes that lack them,
    and says when the stream's parameters change. Access units before the first SPS/PPS and
    keyframe cannot be decoded by anyone and are dropped (`accept` returns None)."""

    def __init__(self) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None
        self.config: StreamConfig | None = None
        self._refused_sps: bytes | None = None  # the last SPS that could not be read
        self.seq = 0
        self._started = False
        self._start_us = 0
        self._last_pts = 0

    def restart(self) -> None:
        """The stream starts anew: its upstream reconnected, or a new encoder takes over (a
        cluster edge that became the origin). Forget the parameter sets and drop access units
        until its next keyframe (they may refer to pictures of the old stream), but keep the
        configuration and the time base: viewers who watch on see one stream whose decode times go
        on forward, and where the new parameters are the same no change is announced (where they
        differ, `accept` says so as ever)."""
        self.sps = self.pps = None
        self._started = False

    def accept(self, data: bytes, pts_us: int) -> AccessUnit | None:
        nals = split_nals(data)
        types = [nal_type(n) for n in nals]
        for nal, kind in zip(nals, types, strict=True):
            if kind == NAL_SPS:
                self.sps = nal
            elif kind == NAL_PPS:
                self.pps = nal
        keyframe = NAL_IDR in types
        if self.sps is None or self.pps is None or not (keyframe or self._started):
            return None
        changed = False
        if self.config is None or self.config.sps != self.sps or self.config.pps != self.pps:
            if max(len(self.sps), len(self.pps)) > MAX_PARAMETER_SET_BYTES or self.sps == self._refused_sps:
                return None
            try:
                codec, width, height = parse_sps(self.sps)
            except ValueError:
                self._refused_sps = self.sps  # not read again with every access unit
                return None
            changed = self.config is None or (codec, width, height) != (
                self.config.codec, self.config.width, self.config.height)
            self.config = StreamConfig(codec, width, height, self.sps, self.pps)
        if keyframe:
            self._started = True
            missing = [n for n, k in ((self.sps, NAL_SPS), (self.pps, NAL_PPS)) if k not in types]
            if missing:
                # Parameter sets go after an access unit delimiter, before everything else.
                if types[0] == NAL_AUD:
                    after_aud = data.find(b"\x00\x00\x01", data.find(b"\x00\x00\x01") + 3)
                    data = join_nals([nals[0], *missing]) + (data[after_aud:] if after_aud != -1 else b"")
                else:
                    data = join_nals(missing) + data
        if changed:
            self._start_us = self._last_pts = pts_us
        duration = pts_us - self._last_pts if 0 < pts_us - self._last_pts < 10_000_000 else 33_333
        self._last_pts = pts_us
        self.seq += 1
        return AccessUnit(data, keyframe, pts_us, self.config, self.seq, config_changed=changed,
                          start_us=self._start_us, duration_us=duration)
