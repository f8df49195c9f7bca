"""Outputs: how frames leave vsproxy, one place for every wire format and viewer.

- `wire.py`: the transports (the `transport` label of the metrics), each transport's encoder
  (one frame -> the exact bytes every viewer of that transport receives, built once per frame)
  and the response heads and text messages that go with them.
- `viewer.py`: one connected viewer socket with its backpressure (latest-frame-wins, kernel-aware)
  and its statistics.

Adding an output format is one encoder registered in `wire.ENCODERS` (and its name in
`wire.TRANSPORTS`) plus one handler in `vsproxy/handlers/stream.py` that attaches a `Viewer`.
"""

from .viewer import LatencyBuckets, TransportStats, Viewer
from .wire import (
    CONNECTED_MESSAGE,
    MJPEG,
    MJPEG_BOUNDARY,
    TRANSPORTS,
    WS_BINARY,
    WS_FORMATS,
    WS_JSON,
    WS_TRANSPORTS,
    encode,
    mjpeg_response_head,
    status_message,
    ws_frame,
)

__all__ = [
    "CONNECTED_MESSAGE", "MJPEG", "MJPEG_BOUNDARY", "TRANSPORTS", "WS_BINARY", "WS_FORMATS", "WS_JSON",
    "WS_TRANSPORTS", "LatencyBuckets", "TransportStats", "Viewer", "encode", "mjpeg_response_head",
    "status_message", "ws_frame",
]
