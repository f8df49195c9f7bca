"""Malformed WebSocket traffic: junk after a valid handshake, garbage and oversized messages, message
floods and junk on the ingest socket close only the offending connection; everyone else streams on.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
import tornado.escape
import tornado.websocket
from helpers import (
    PUBLISH_TOKEN,
    create,
    read_frames,
    read_until_closed,
    retry_while,
    wait_until,
    ws_handshake,
    ws_open,
)
from tornado.iostream import IOStream, StreamClosedError

# -- malformed WebSocket traffic ------------------------------------------------------------------


def ws_frame(payload: bytes, opcode: int = 0x2, fin: bool = True, rsv: int = 0, masked: bool = True,
             length: int | None = None) -> bytes:
    """A client WebSocket frame, optionally lying about its length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


JUNK = {
    "http text": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "reserved bits": ws_frame(b"hello", rsv=0x70),
    "unknown opcode": ws_frame(b"hello", opcode=0x3),
    "text not utf-8": ws_frame(b"\xff\xfe\xfd", opcode=0x1),
    "orphan continuation": ws_frame(b"tail", opcode=0x0),
    "long control frame": ws_frame(b"p" * 200, opcode=0x9),
    "fragmented control frame": ws_frame(b"p", opcode=0x9, fin=False),
    "huge length claim": ws_frame(b"", length=1 << 62),
    "random bytes": bytes(range(256)) * 4,
}


async def streaming_viewer(api, http_port) -> tuple[str, tornado.websocket.WebSocketClientConnection]:
    session_id = (await create(api, user="bystander"))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}?format=binary")
    await read_frames(conn, 1)
    return session_id, conn


async def assert_closed_by_server(stream: IOStream, timeout: float = 15) -> None:
    """The server closes the connection (after at most a close frame); it does not wait for more."""
    try:
        await asyncio.wait_for(stream.read_until_close(), timeout)
    except StreamClosedError:
        pass


@pytest.mark.gen_test(timeout=40)
@pytest.mark.parametrize("junk", list(JUNK.values()), ids=list(JUNK))
async def test_junk_after_a_valid_handshake_closes_only_that_connection(api, http_port, proxy, junk):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    response, stream = await ws_handshake(http_port, f"/stream/{session_id}")
    assert response.status == 101
    await stream.write(junk)
    await assert_closed_by_server(stream)
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the bad viewer to be removed")
    await read_frames(bystander, 3)
    assert (await api.call("GET", "/health"))[0] == 200


@pytest.mark.gen_test(timeout=40)
async def test_binary_garbage_messages_do_not_hurt(api, http_port, proxy):
    """Binary messages are relayed upstream as they are (the demo has nowhere to send them): the
    sender gets status or error messages at most, and keeps streaming, as does everyone else.
    (Larger than streaming.max_viewer_message_bytes closes it: test_viewer_input.py.)"""
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    for size in (1, 100, 65536):
        conn.write_message(os.urandom(size), binary=True)
    await read_frames(conn, 3)
    assert conn.close_code is None
    await read_frames(bystander, 3)
    conn.close()


@pytest.mark.gen_test(timeout=40)
async def test_a_frame_over_the_websocket_message_limit_closes_that_connection(api, http_port, proxy):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    limit = proxy.config.streaming.max_viewer_message_bytes  # the viewer socket's message limit
    conn.write_message(b"\0" * (limit + 1), binary=True)
    await read_until_closed(conn, timeout=15)
    assert conn.close_code in (1009, None)  # 1009 if the close frame beat the abort
    await wait_until(lambda: not proxy.sessions.get(session_id).viewers, "the viewer to be removed")
    await read_frames(bystander, 3)


@pytest.mark.gen_test(timeout=40)
async def test_a_message_flood_closes_that_connection_with_1008(api, http_port, proxy):
    _, bystander = await streaming_viewer(api, http_port)
    session_id = (await create(api))["sessionId"]
    conn = await ws_open(http_port, f"/stream/{session_id}")
    await read_frames(conn, 1)
    burst = proxy.config.limits.viewer_message_burst
    for i in range(burst * 5):
        conn.write_message(f"message {i}")
    messages = await read_until_closed(conn, timeout=15)
    assert conn.close_code == 1008
    assert any(isinstance(m, str) and "Too many" in m for m in messages)
    await read_frames(bystander, 3)


@pytest.mark.gen_test(timeout=40)
@pytest.mark.config({"upstreams": {"pub": {"kind": "push", "token": PUBLISH_TOKEN}}})
@pytest.mark.parametrize("junk", [JUNK["http text"], JUNK["reserved bits"], JUNK["huge length claim"],
                                  JUNK["text not utf-8"]], ids=["http text", "reserved bits", "huge length",
                                                                 "text not utf-8"])
async def test_junk_on_the_ingest_socket_closes_only_that_publisher(api, http_port, proxy, junk):
    _, bystander = await streaming_viewer(api, http_port)
    watcher = (await create(api, user="watcher", upstream="pub"))["sessionId"]
    publisher = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
    response, stream = await ws_handshake(http_port, "/ingest/pub", headers=publisher)
    assert response.status == 101
    await stream.write(junk)
    await assert_closed_by_server(stream)
    await read_frames(bystander, 3)
    # The publisher's place is free again.
    response, stream = await retry_while(lambda: ws_handshake(http_port, "/ingest/pub", headers=publisher),
                                         lambda r: r[0].status == 409)
    assert response.status == 101
    stream.close()
    assert proxy.sessions.get(watcher)
