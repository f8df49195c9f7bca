"""Fragmented MP4 (ISO BMFF) for `<video src>`, ffmpeg and VLC: an init segment per stream
configuration, then one fragment (moof + mdat) per access unit, so a fragment never holds more
than one frame (latency) and every fragment is the same bytes for every viewer (built once).

Timing: one track, timescale 1 MHz, decode time = the access unit's presentation time since the
start of its stream (no B-frames, so decode and presentation order are the same).
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import TYPE_CHECKING

from ..codec.h264 import NAL_AUD, NAL_PPS, NAL_SPS, nal_type, split_nals

if TYPE_CHECKING:
    from ..codec.h264 import AccessUnit, StreamConfig

TIMESCALE = 1_000_000
TRACK_ID = 1
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_KEY_FLAGS = 0x02000000  # sample_depends_on = 2: an independent (sync) sample
_DELTA_FLAGS = 0x01010000  # depends on others, not a sync sample


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@lru_cache(maxsize=8)
def init_segment(config: StreamConfig) -> bytes:
    """ftyp + moov for one H.264 stream configuration."""
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso6", b"avc1", b"mp41")
    mvhd = _full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x100),
                     bytes(10), _MATRIX, bytes(24), struct.pack(">I", TRACK_ID + 1))
    tkhd = _full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, TRACK_ID, 0, 0), bytes(8),
                     struct.pack(">HHHH", 0, 0, 0, 0), _MATRIX,
                     struct.pack(">II", config.width << 16, config.height << 16))
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIII", 0, 0, TIMESCALE, 0), struct.pack(">HH", 0x55C4, 0))
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"vide", bytes(12), b"vsproxy video\x00")
    sps, pps = config.sps, config.pps
    avcc = _box(b"avcC", bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]), struct.pack(">H", len(sps)), sps,
                bytes([1]), struct.pack(">H", len(pps)), pps)
    avc1 = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", config.width, config.height),
                struct.pack(">II", 0x480000, 0x480000), bytes(4), struct.pack(">H", 1), bytes(32),
                struct.pack(">Hh", 0x18, -1), avcc)
    stbl = _box(b"stbl",
                _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
                _full_box(b"stts", 0, 0, struct.pack(">I", 0)),
                _full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
                _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
                _full_box(b"stco", 0, 0, struct.pack(">I", 0)))
    minf = _box(b"minf", _full_box(b"vmhd", 0, 1, bytes(8)),
                _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))), stbl)
    trak = _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))
    mvex = _box(b"mvex", _full_box(b"trex", 0, 0, struct.pack(">IIIII", TRACK_ID, 1, 0, 0, 0)))
    return ftyp + _box(b"moov", mvhd, trak, mvex)


def decode_time_us(au: AccessUnit) -> int:
    """The access unit's decode (and presentation) time on the track: microseconds since the start
    of its stream, what a player's clock shows for it (`<video>`'s currentTime, in seconds)."""
    return max(0, au.pts_us - au.start_us)


def fragment(au: AccessUnit) -> bytes:
    """moof + mdat holding one access unit (length-prefixed NAL units; the parameter sets are in
    the init segment's avcC)."""
    sample = b"".join(struct.pack(">I", len(n)) + n for n in split_nals(au.data)
                      if nal_type(n) not in (NAL_SPS, NAL_PPS, NAL_AUD))
    decode_time = decode_time_us(au)
    flags = _KEY_FLAGS if au.keyframe else _DELTA_FLAGS
    # trun: data offset, and the sample's duration, size and flags.
    trun_size = 12 + 4 + 4 + 12
    traf_size = 8 + 16 + 20 + trun_size
    moof_size = 8 + 16 + traf_size
    trun = _full_box(b"trun", 0, 0x000701, struct.pack(">Ii", 1, moof_size + 8),
                     struct.pack(">III", au.duration_us, len(sample), flags))
    traf = _box(b"traf", _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", TRACK_ID)),
                _full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time)), trun)
    moof = _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", au.seq & 0xFFFFFFFF)), traf)
    assert len(moof) == moof_size
    return moof + _box(b"mdat", sample)
