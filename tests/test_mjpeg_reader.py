"""The MJPEG reader the tests rely on (tests/mjpeg_reader.py).
"""

from __future__ import annotations

import pytest
from mjpeg_reader import MjpegProtocolError, MjpegReader, boundary_from_content_type

# -- the MJPEG reader the tests rely on ---------------------------------------------------------------


def test_mjpeg_reader_splits_parts_fed_in_any_chunking():
    bodies = [b"\xff\xd8first\r\n--notit\xff\xd9", b"", b"\xff\xd8" + b"x" * 3000 + b"\xff\xd9"]
    stream = b"preamble\r\n--b1\r\n" + b"".join(
        b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n--b1\r\n" % (len(b), b) for b in bodies)
    stream += b"Content-Type: text/plain\r\n\r\nno length here\r\n--b1--\r\nepilogue"
    for chunk_size in (1, 7, len(stream)):
        reader = MjpegReader("b1")
        parts = []
        for i in range(0, len(stream), chunk_size):
            parts += reader.feed(stream[i:i + chunk_size])
        assert [p.body for p in parts] == [*bodies, b"no length here"]
        assert parts[0].headers == {"content-type": "image/jpeg", "content-length": str(len(bodies[0]))}
        assert reader.closed


def test_mjpeg_reader_checks_boundary_after_content_length():
    reader = MjpegReader("b1")
    with pytest.raises(MjpegProtocolError):
        reader.feed(b"--b1\r\nContent-Length: 2\r\n\r\nabc\r\n--b1\r\n")
    assert boundary_from_content_type('multipart/x-mixed-replace; boundary="a b"') == "a b"
    assert boundary_from_content_type("multipart/x-mixed-replace;boundary=frame") == "frame"
    with pytest.raises(MjpegProtocolError):
        boundary_from_content_type("image/jpeg")
