"""multipart/x-mixed-replace (MJPEG) parsing: pure, incremental, bounded; no Tornado.

    parser = MultipartParser(boundary_from_content_type(content_type), max_part_bytes)
    for body in parser.feed(chunk):   # any chunking; complete part bodies come out in order
        ...

Cameras disagree on the details of RFC 2046 §5.1.1, so the parser accepts: a boundary quoted, with
a leading "--" in the header, or missing from the header (learnt from the first "--xxx" line of the
body, which also wins when the header's boundary never appears; with `sniff=True`, for a response
whose Content-Type is not multipart at all, such as ffmpeg's application/octet-stream, that line
must open the body, so any other body fails within its first line); parts with Content-Length (the
body is exactly that many bytes, so it may even contain the boundary) or without (the body runs to
the next boundary line); LF or CRLF; a preamble; parts without headers. Memory is bounded: a part
over `max_part_bytes` raises `MjpegError`, and the buffer never holds more than `max_buffered`.
"""

from __future__ import annotations

import re

MAX_HEADER_BYTES = 16 * 1024  # a part's header block; also the longest boundary line considered
MAX_BOUNDARY = 256  # RFC 2046 allows 70; some cameras use longer ones
_MAX_PADDING = 256  # whitespace tolerated after a boundary, before its line break
_LF = 0x0A
_WHITESPACE = b" \t\r"

# A boundary learnt from the body: printable ASCII, spaces only inside (RFC 2046 is stricter).
_LEARNABLE = re.compile(rb"[!-~](?:[ !-~]*[!-~])?\Z")
_BOUNDARY_PARAM = re.compile(r';\s*boundary\s*=\s*("[^"]*"|[^;\s]*)', re.IGNORECASE)

# Parser states.
_PREAMBLE, _HEADERS, _BODY, _SKIP, _END, _FAILED = range(6)


class MjpegError(ValueError):
    """The bytes are not a usable multipart stream (no boundary, oversize part, bad header)."""


def boundary_from_content_type(value: str) -> str | None:
    """The `boundary` parameter of a Content-Type (unquoted), or None when absent or empty.

    A leading "--" is kept: `MultipartParser` accepts the body's lines with or without it.
    """
    match = _BOUNDARY_PARAM.search(value or "")
    if match is None:
        return None
    boundary = match.group(1).strip()
    if len(boundary) >= 2 and boundary[0] == boundary[-1] == '"':
        boundary = boundary[1:-1].strip()
    return boundary or None


class MultipartParser:
    """Splits a multipart body into part bodies, fed in chunks of any size.

    Algorithm: one bytearray whose consumed prefix is deleted as each state completes (CPython
    deletes a bytearray's head in O(1) amortized), so index 0 is always where the current state
    began. Outside the preamble the buffer starts with a line feed (the one ending the boundary
    line or the blank line), so every boundary is found by one `bytearray.find(b"\\n--" + boundary,
    start)` in C, and `start` remembers how far the previous feeds already searched: each byte is
    scanned once however the stream is chunked. A part with Content-Length is not searched at all.

    Memory: `feed` appends at most `max_buffered - buffered` bytes at a time and parses in
    between, and every state raises `MjpegError` before it would need more than that.
    """

    def __init__(self, boundary: str | None, max_part_bytes: int, *, sniff: bool = False) -> None:
        if max_part_bytes < 1:
            raise ValueError("max_part_bytes must be positive")
        self.max_part_bytes = max_part_bytes
        self.max_buffered = max_part_bytes + MAX_HEADER_BYTES + 2 * MAX_BOUNDARY + 2 * _MAX_PADDING
        candidates: list[bytes] = []
        if boundary:
            raw = boundary.encode("latin-1", "replace")
            if len(raw) > MAX_BOUNDARY:
                raise MjpegError(f"multipart boundary longer than {MAX_BOUNDARY} characters")
            candidates.append(raw)
            if raw.startswith(b"--") and len(raw) > 2:
                candidates.append(raw[2:])  # the header carried the delimiter's "--" too
        self._candidates = candidates
        # The response did not say it is multipart: only a body that opens with a boundary line
        # (blank lines aside) is one, so a page or a single image fails at once, not after megabytes.
        self.sniff: bool = sniff
        self.boundary: str | None = None  # as actually found in the body
        self.parts = 0  # part bodies returned so far
        self._delimiter = b""  # b"\n--" + boundary once known
        self._buf = bytearray()
        self._state = _PREAMBLE
        self._scan = 0  # where the next search of the current state resumes
        self._preamble_bytes = 0
        self._skipping_line = False  # preamble: inside a line that cannot be a boundary line
        self._content_length: int | None = None
        self._skipped = 0  # _SKIP: bytes discarded while looking for the next boundary
        self._error: MjpegError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held right now (bounded by `max_buffered`)."""
        return len(self._buf)

    @property
    def finished(self) -> bool:
        """True once the closing boundary ("--boundary--") was seen: the stream is over."""
        return self._state == _END

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume `data`; return the part bodies it completed, in order."""
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        try:
            while pos < end and self._state != _END:
                room = self.max_buffered - len(self._buf)
                if room <= 0:  # every state raises before this; kept as a hard guarantee
                    raise MjpegError(f"parser buffer full ({len(self._buf)} bytes)")
                piece = view[pos:pos + room]
                self._buf += piece
                pos += len(piece)
                self._parse(out)
        except MjpegError as exc:
            self._fail(exc)
            raise
        return out

    def _fail(self, exc: MjpegError) -> None:
        self._error = exc
        self._state = _FAILED
        self._buf = bytearray()

    # -- states: each returns True when it made progress and parsing should continue -------------

    def _parse(self, out: list[bytes]) -> None:
        while True:
            state = self._state
            if state == _PREAMBLE:
                progressed = self._preamble()
            elif state == _HEADERS:
                progressed = self._headers()
            elif state == _BODY:
                progressed = self._body(out)
            elif state == _SKIP:
                progressed = self._skip()
            else:  # _END: anything after the closing boundary is an epilogue
                self._buf.clear()
                return
            if not progressed:
                return

    def _preamble(self) -> bool:
        """Discard lines up to the first boundary line; learn the boundary from it if need be."""
        buf = self._buf
        pos = 0
        while True:
            if self._skipping_line:
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    self._discard_preamble(len(buf))
                    return False
                pos = newline + 1
                self._skipping_line = False
            if len(buf) - pos < 2:
                break
            if buf[pos] != 0x2D or buf[pos + 1] != 0x2D:  # not "--": not a boundary line
                if self.sniff and buf[pos] != _LF and buf[pos:pos + 2] != b"\r\n":
                    raise self._not_multipart()
                self._skipping_line = True
                continue
            newline = buf.find(b"\n", pos, pos + MAX_HEADER_BYTES)
            if newline < 0:
                if len(buf) - pos >= MAX_HEADER_BYTES:
                    if self.sniff:
                        raise self._not_multipart()
                    self._skipping_line = True
                    continue
                break
            token = bytes(buf[pos + 2:newline]).rstrip(_WHITESPACE)
            boundary, closing = self._match_boundary(token)
            if boundary is None:
                if self.sniff:
                    raise self._not_multipart()
                pos = newline + 1
                continue
            self._set_boundary(boundary)
            self._discard_preamble(newline)  # keep the line feed: the next state starts with it
            self._state = _END if closing else _HEADERS
            self._scan = 1
            return True
        self._discard_preamble(pos)
        return False

    def _discard_preamble(self, count: int) -> None:
        self._preamble_bytes += count
        del self._buf[:count]
        if self.sniff and self._preamble_bytes > MAX_HEADER_BYTES:
            raise self._not_multipart()
        if self._preamble_bytes > self.max_part_bytes + MAX_HEADER_BYTES:
            raise MjpegError(f"no multipart boundary line in the first {self._preamble_bytes} bytes")

    @staticmethod
    def _not_multipart() -> MjpegError:
        return MjpegError("not a multipart stream: the body does not start with a boundary line")

    def _match_boundary(self, token: bytes) -> tuple[bytes | None, bool]:
        """(boundary, is the closing delimiter) for the text after a line's leading "--"."""
        for candidate in self._candidates:
            if token == candidate:
                return candidate, False
            if token == candidate + b"--":
                return candidate, True
        if len(token) > MAX_BOUNDARY or not _LEARNABLE.match(token) or not token.strip(b"-"):
            return None, False  # "--", "-----", "-- text": a rule or prose in the preamble
        # The header named no boundary, or one the body does not use: the first "--xxx" line is it.
        return token, False

    def _set_boundary(self, boundary: bytes) -> None:
        self.boundary = boundary.decode("latin-1")
        self._delimiter = b"\n--" + boundary

    def _headers(self) -> bool:
        """Read header lines (from index 1) up to the blank line; the body follows it."""
        buf = self._buf
        if self._scan == 1:
            if len(buf) < 3 and buf[1:] == b"\xff":
                return False
            if buf[1:3] == b"\xff\xd8":
                # A JPEG right after the boundary line, without headers or blank line.
                return self._start_body(0)
        while True:
            start = self._scan
            newline = buf.find(b"\n", start, MAX_HEADER_BYTES + 1)
            if newline < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MjpegError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
                return False
            line = bytes(buf[start:newline]).rstrip(b"\r")
            if not line:
                return self._start_body(newline)
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"content-length":
                self._content_length = self._parse_length(value)
            self._scan = newline + 1

    def _start_body(self, newline: int) -> bool:
        del self._buf[:newline]  # buf[0] is now the line feed before the body
        self._state = _BODY
        self._scan = 0
        return True

    def _parse_length(self, value: bytes) -> int:
        text = value.strip()
        if not text.isdigit():
            raise MjpegError(f"invalid part Content-Length {text[:32]!r}")
        length = int(text)
        if length > self.max_part_bytes:
            raise MjpegError(f"part of {length} bytes (Content-Length) is over max_part_bytes ({self.max_part_bytes})")
        return length

    def _body(self, out: list[bytes]) -> bool:
        buf = self._buf
        length = self._content_length
        if length is not None:
            if len(buf) < 1 + length:
                return False
            out.append(bytes(buf[1:1 + length]))
            self.parts += 1
            # Keep one byte as the line feed the next boundary search starts from. Some cameras
            # put no line break after the body: "--boundary" right after it is accepted too.
            del buf[:length]
            buf[0] = _LF
            self._content_length = None
            self._state = _SKIP
            self._scan = 0
            self._skipped = 0
            return True
        found = self._find_boundary_line()
        if found is None:
            # The body is at least everything before where a boundary could still begin.
            if self._scan - 2 > self.max_part_bytes:
                raise MjpegError(f"part without Content-Length is over max_part_bytes ({self.max_part_bytes})")
            return False
        body_end, line_end, closing = found
        if body_end > 1 and buf[body_end - 1] == 0x0D:
            body_end -= 1  # the CR of the CRLF before the boundary
        if body_end - 1 > self.max_part_bytes:
            raise MjpegError(f"part without Content-Length is over max_part_bytes ({self.max_part_bytes})")
        out.append(bytes(buf[1:max(body_end, 1)]))
        self.parts += 1
        self._next_part(line_end, closing)
        return True

    def _skip(self) -> bool:
        """After a Content-Length body: discard anything up to the next boundary line."""
        found = self._find_boundary_line()
        if found is None:
            # Keep only what may still be the start of a boundary line.
            keep_from = max(0, min(self._scan, len(self._buf) - len(self._delimiter)))
            if keep_from > 0:
                self._skipped += keep_from
                del self._buf[:keep_from]
                self._scan -= keep_from
                if self._skipped > self.max_part_bytes:
                    raise MjpegError(f"no boundary within {self._skipped} bytes after a part's Content-Length")
            return False
        _, line_end, closing = found
        self._next_part(line_end, closing)
        return True

    def _next_part(self, line_end: int, closing: bool) -> None:
        del self._buf[:line_end]  # buf[0] is the boundary line's line feed
        self._state = _END if closing else _HEADERS
        self._scan = 1

    def _find_boundary_line(self) -> tuple[int, int, bool] | None:
        """(index of the line feed before "--boundary", index of the line's own line feed, closing)
        for the first complete boundary line at or after `_scan`, else None (and `_scan` advances
        past every position already ruled out)."""
        buf, delimiter = self._buf, self._delimiter
        while True:
            at = buf.find(delimiter, self._scan)
            if at < 0:
                self._scan = max(self._scan, len(buf) - len(delimiter) + 1)
                return None
            after = at + len(delimiter)
            dashes = bytes(buf[after:after + 2])
            if len(dashes) < 2 and b"--".startswith(dashes):
                self._scan = at  # "--boundary" or "--boundary-" so far: wait for more bytes
                return None
            closing = dashes == b"--"
            if closing:
                after += 2
            newline = buf.find(b"\n", after, after + _MAX_PADDING)
            if newline < 0:
                if len(buf) - after < _MAX_PADDING and not buf[after:].strip(_WHITESPACE):
                    self._scan = at  # only padding so far: may still be a boundary line
                    return None
                self._scan = at + 1
                continue
            if buf[after:newline].strip(_WHITESPACE):
                self._scan = at + 1  # "--boundaryXYZ": the boundary is only a prefix of this line
                continue
            return at, newline, closing
