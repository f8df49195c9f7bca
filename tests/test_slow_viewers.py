"""A slow viewer does not hold back the others: a WebSocket client that stops reading gets frames
dropped while the rest stream on at full rate, what the proxy buffers for it stays bounded, and it is
disconnected after the stall timeout.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import termios
import time

import pytest
from helpers import (
    connected_session,
    count_between,
    record_frames,
    small_buffer_ws,
    spawn,
    wait_session,
    wait_until,
    write_buffer_bytes,
)

from vsproxy import render
from vsproxy.outputs import WS_BINARY

pytestmark = pytest.mark.slow  # each watches frame rates over seconds-long windows

WAIT = 10.0  # generous bound for anything that should take well under a second


@pytest.fixture
def stalled_ws(http_server, http_port):
    """`sock = await stalled_ws(path)`: a WebSocket client that never reads after the handshake.

    Its socket has a 4 KiB receive buffer so the proxy's sends to it back up within a frame or two.
    """
    sockets: list[socket.socket] = []

    async def open_(path: str) -> socket.socket:
        sock = await small_buffer_ws(http_port, path, rcvbuf=4096)
        sockets.append(sock)
        return sock

    yield open_
    for sock in sockets:
        sock.close()


def hub_viewer_for(proxy, sock: socket.socket):
    """The hub's Viewer whose peer is this client socket (None once the hub dropped it)."""
    port = sock.getsockname()[1]
    for hub in proxy.hubs.values():
        for viewers in hub.viewers.values():
            for viewer in viewers:
                try:
                    if viewer.stream.socket is not None and viewer.stream.socket.getpeername()[1] == port:
                        return viewer
                except OSError:
                    continue
    return None


def backed_up(viewer) -> bool:
    """The viewer has bytes its socket would not take (busy) or a frame waiting for it (pending)."""
    return viewer.busy or viewer.pending is not None


def kernel_queue_bytes(sock: socket.socket) -> int:
    """Bytes in a TCP socket's send queue, not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    out = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
    return out[0]


# -- 6. a slow viewer does not hold back the others -----------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_stalled_viewer_does_not_slow_others_and_stays_bounded(big_sim, proxy, api, ws_connect,
                                                                     stalled_ws, tasks):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}?format=binary"
    arrivals: list[list[tuple[float, bytes]]] = [[], [], []]
    for record in arrivals:
        conn = await ws_connect(path)
        tasks.append(spawn(record_frames(conn, record)))
    await wait_until(lambda: all(len(a) >= 5 for a in arrivals), what="the normal viewers to get frames")

    window = 3.0
    start, sent_before = time.monotonic(), big_sim.frames_sent
    await asyncio.sleep(window)
    baseline = [count_between(a, start, start + window) for a in arrivals]
    baseline_sim = big_sim.frames_sent - sent_before

    sock = await stalled_ws(path)
    await wait_until(lambda: hub_viewer_for(proxy, sock) is not None, what="the proxy to list the stalled viewer")
    stalled = hub_viewer_for(proxy, sock)
    await wait_until(lambda: backed_up(stalled), what="the stalled viewer to back up")
    frame_bytes = len(proxy.hubs["isaac"].latest.encoded(WS_BINARY))
    dropped_before = stalled.frames_dropped

    start, sent_before = time.monotonic(), big_sim.frames_sent
    largest_buffer = largest_kernel_queue = 0
    while time.monotonic() < start + window:
        largest_buffer = max(largest_buffer, write_buffer_bytes(stalled.stream))
        largest_kernel_queue = max(largest_kernel_queue, kernel_queue_bytes(stalled.stream.socket))
        frame_bytes = max(frame_bytes, len(proxy.hubs["isaac"].latest.encoded(WS_BINARY)))
        await asyncio.sleep(0.02)
    during = [count_between(a, start, start + window) for a in arrivals]
    during_sim = big_sim.frames_sent - sent_before

    detail = f"baseline {baseline} of {baseline_sim} sent, with a stalled viewer {during} of {during_sim} sent"
    baseline_rate = sum(baseline) / len(baseline)
    assert baseline_rate > 0, detail
    for count in during:
        assert count >= 0.9 * baseline_rate, detail
    assert backed_up(stalled), "the stalled viewer drained without reading?"
    assert hub_viewer_for(proxy, sock) is stalled, "the stalled viewer was dropped before its stall timeout"
    # What the proxy holds for it stays under two frames, in Tornado's buffer and in the kernel's.
    assert largest_buffer < 2 * frame_bytes, f"write buffer reached {largest_buffer} bytes (frame: {frame_bytes})"
    assert largest_kernel_queue < 2 * frame_bytes, (
        f"socket send queue reached {largest_kernel_queue} bytes (frame: {frame_bytes})")
    assert stalled.frames_dropped > dropped_before
    print(detail, f"; stalled viewer: largest write buffer {largest_buffer} B, send queue {largest_kernel_queue} B, "
          f"frame {frame_bytes} B, "
          f"dropped {stalled.frames_dropped - dropped_before}")


@pytest.mark.config({"streaming": {"stall_timeout_seconds": 1.5}})
@pytest.mark.gen_test(timeout=60)
async def test_stalled_viewer_is_disconnected_after_the_stall_timeout(big_sim, proxy, api, ws_connect,
                                                                      stalled_ws, tasks):
    session_id = await connected_session(api)
    path = f"/stream/{session_id}?format=binary"
    normal: list[tuple[float, bytes]] = []
    tasks.append(spawn(record_frames(await ws_connect(path), normal)))  # a viewer that keeps reading
    sock = await stalled_ws(path)
    await wait_until(lambda: hub_viewer_for(proxy, sock) is not None, what="the proxy to list the stalled viewer")
    stalled = hub_viewer_for(proxy, sock)
    await wait_session(api, session_id, "2 connections", lambda s: s["connections"] == 2)
    await wait_until(lambda: backed_up(stalled), what="the stalled viewer to back up")
    stalled_at = time.monotonic()

    hub = proxy.hubs["isaac"]
    await wait_until(lambda: stalled not in hub.viewers[WS_BINARY], timeout=15,
                     what="the hub to drop the stalled viewer")
    took = time.monotonic() - stalled_at
    await wait_session(api, session_id, "connections to drop to 1", lambda s: s["connections"] == 1)

    # The proxy closed the socket: reading it now reaches the end (or a reset).
    loop = asyncio.get_running_loop()

    async def read_to_end() -> None:
        try:
            while await loop.sock_recv(sock, 1 << 16):
                pass
        except ConnectionResetError:
            pass

    await asyncio.wait_for(read_to_end(), WAIT)
    received = len(normal)
    await wait_until(lambda: len(normal) >= received + 5, what="the other viewer to stream on")
    assert all(render.is_jpeg(jpeg) for _, jpeg in normal)
    print(f"stalled viewer dropped {took:.1f} s after it backed up")
