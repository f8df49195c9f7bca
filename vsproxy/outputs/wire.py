"""Wire formats: what each transport sends, byte for byte.

Every encoder turns one frame into the complete bytes a viewer of its transport receives
(WebSocket frame header included), so `Frame.encoded` builds them once per frame and the same
bytes go to every viewer of that transport.
"""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import fmp4

if TYPE_CHECKING:
    from ..codec.h264 import AccessUnit
    from ..hub import Frame

# Viewer transports; also the `transport` label of the metrics and the dashboard's names.
WS_JSON = "ws_json"
WS_BINARY = "ws_binary"
MJPEG = "mjpeg"
WS_H264 = "ws_h264"
MP4 = "mp4"
WEBRTC = "webrtc"  # WHEP peers (vsproxy/outputs/webrtc.py): the access units, packetized per peer by aiortc
JPEG_TRANSPORTS = (WS_JSON, WS_BINARY, MJPEG)  # each JPEG frame
H264_TRANSPORTS = (WS_H264, MP4, WEBRTC)  # each H.264 access unit
TRANSPORTS = JPEG_TRANSPORTS + H264_TRANSPORTS
# Short display names (the dashboard's viewer columns).
TRANSPORT_LABELS = {WS_JSON: "ws", WS_BINARY: "ws bin", MJPEG: "mjpeg", WS_H264: "h264", MP4: "mp4",
                    WEBRTC: "webrtc"}
# Transports that carry text messages (status, errors, relayed upstream text) besides frames.
WS_TRANSPORTS = (WS_JSON, WS_BINARY, WS_H264)
# `?format=` of WS /stream/{sessionId} -> transport.
WS_FORMATS = {"json": WS_JSON, "binary": WS_BINARY, "h264": WS_H264}

MJPEG_BOUNDARY = "vsproxyframe"


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A complete, unmasked server-to-client WebSocket frame (RFC 6455 §5.2).

    Server frames carry no mask, so one frame's bytes are identical for every viewer of the same
    format and are built once per video frame (permessage-deflate stays off for that reason).
    """
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def _encode_ws_json(frame: Frame) -> bytes:
    # The original service's message, {"type":"frame","data":"<base64 JPEG>"}, encoded once per frame.
    b64 = binascii.b2a_base64(frame.jpeg, newline=False)
    return ws_frame(0x1, b'{"type":"frame","data":"' + b64 + b'"}')


def _encode_ws_binary(frame: Frame) -> bytes:
    return ws_frame(0x2, frame.jpeg)


def _encode_mjpeg(frame: Frame) -> bytes:
    # Each part ends with the next boundary: Chrome shows a part only once the next boundary
    # arrives, so sending it right away avoids showing every frame one frame late.
    head = (
        f"Content-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
        f"X-Frame-Seq: {frame.seq}\r\nX-Timestamp: {frame.timestamp:.6f}\r\n\r\n"
    ).encode("ascii")
    return b"".join((head, frame.jpeg, b"\r\n--" + MJPEG_BOUNDARY.encode("ascii") + b"\r\n"))


def ws_h264_message(au: AccessUnit) -> bytes:
    """One access unit as a binary WebSocket frame of the `format=h264` contract (and of the
    cluster relay): 1 byte of flags (bit 0: keyframe), 8 bytes of presentation time (microseconds
    since the Unix epoch, big-endian), then the access unit in Annex-B form."""
    return ws_frame(0x2, struct.pack("!BQ", 1 if au.keyframe else 0, max(0, au.pts_us)) + au.data)


def _encode_ws_h264(au: AccessUnit) -> bytes:
    # New stream parameters are announced by a config text message right before the first
    # access unit that has them.
    message = ws_h264_message(au)
    if au.config_changed:
        return ws_frame(0x1, au.config.message().encode()) + message
    return message


# Not a viewer transport: a JPEG frame as a cluster origin relays it to its edges (cluster/relay.py),
# a binary WebSocket message: CLUSTER_JPEG_TYPE, 8 bytes of capture time (microseconds since the
# Unix epoch, big-endian), then the JPEG, so that frame age on an edge counts from the capture too.
# The hub keeps the edges' relays in a viewer list of their own under this name, so each form is
# built only while it has viewers (an origin whose edges want JPEG and which has no binary
# WebSocket viewer of its own builds no `ws_binary` bytes). Their traffic is counted as `ws_binary`
# in the metrics (a binary WebSocket, as before), and they are no viewers in the counts.
CLUSTER_JPEG = "cluster_jpeg"
CLUSTER_JPEG_TYPE = 2  # the first byte; the H.264 form's is its keyframe flag, 0 or 1


def _encode_cluster_jpeg(frame: Frame) -> bytes:
    return ws_frame(0x2, struct.pack("!BQ", CLUSTER_JPEG_TYPE, max(0, int(frame.captured * 1_000_000))) + frame.jpeg)


def _encode_webrtc(au: AccessUnit) -> bytes:
    # The access unit itself: aiortc splits it into RTP packets (STAP-A/FU-A) for each peer's
    # own SRTP session, so nothing of the wire form can be shared between peers.
    return au.data


ENCODERS: dict[str, Callable[[Any], bytes]] = {
    WS_JSON: _encode_ws_json,
    WS_BINARY: _encode_ws_binary,
    MJPEG: _encode_mjpeg,
    WS_H264: _encode_ws_h264,
    MP4: fmp4.fragment,
    WEBRTC: _encode_webrtc,
    CLUSTER_JPEG: _encode_cluster_jpeg,
}


def encode(transport: str, item: Frame | AccessUnit) -> bytes:
    """A JPEG frame or H.264 access unit as a viewer of `transport` receives it (use the item's
    `encoded`, which builds it once for every viewer)."""
    return ENCODERS[transport](item)


def mp4_response_head(extra_headers: list[str]) -> bytes:
    """The HTTP response head of a fragmented MP4 stream, as written on the socket."""
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: video/mp4",
        "Cache-Control: no-cache, no-store, must-revalidate, max-age=0",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *extra_headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def mjpeg_response_head(extra_headers: list[str]) -> bytes:
    """The HTTP response head of an MJPEG stream and its first boundary, as written on the socket."""
    head = [
        "HTTP/1.1 200 OK",
        f"Content-Type: multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
        "Cache-Control: no-cache, no-store, must-revalidate, max-age=0",
        "Pragma: no-cache",
        "Expires: 0",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *extra_headers,
    ]
    return ("\r\n".join(head) + f"\r\n\r\n--{MJPEG_BOUNDARY}\r\n").encode("latin-1")


def status_message(kind: str, message: str) -> str:
    """A {"type": "status"|"error", "message": ...} text message for WebSocket viewers."""
    return json.dumps({"type": kind, "message": message}, ensure_ascii=False)


CONNECTED_MESSAGE = status_message("status", "\u2705 Connected to video stream proxy")
