"""An incremental reader for multipart/x-mixed-replace (MJPEG) bodies, for the tests.

    reader = MjpegReader(boundary_from_content_type(response_content_type))
    for part in reader.feed(chunk):   # as many bytes as arrived; parts come out once complete
        part.headers["content-type"], part.body

It follows RFC 2046 §5.1.1: the first boundary line may follow a preamble; every later boundary is
a delimiter, CRLF "--" boundary; "--" after a boundary closes the body. A part's body is exactly
Content-Length bytes when the part has that header (the next delimiter must follow it, or the reader
raises `MjpegProtocolError`), otherwise everything up to the next delimiter. A part is returned as
soon as its body is complete, without waiting for the next boundary.
"""

from __future__ import annotations

from dataclasses import dataclass


class MjpegProtocolError(ValueError):
    """The bytes are not a well-formed multipart body."""


@dataclass
class Part:
    headers: dict[str, str]  # names lower-cased
    body: bytes


def boundary_from_content_type(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type (quoted or not)."""
    media_type, _, params = content_type.partition(";")
    if not media_type.strip().lower().startswith("multipart/"):
        raise MjpegProtocolError(f"not a multipart content type: {content_type!r}")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not value:
                break
            return value
    raise MjpegProtocolError(f"no boundary in {content_type!r}")


class MjpegReader:
    def __init__(self, boundary: str) -> None:
        self.dash_boundary = b"--" + boundary.encode("latin-1")
        self.delimiter = b"\r\n" + self.dash_boundary
        self.buffer = bytearray()
        self.state = "preamble"  # preamble | after_boundary | headers | body | after_body | done
        self.headers: dict[str, str] = {}
        self.parts_read = 0

    @property
    def closed(self) -> bool:
        """True once the closing delimiter ("--boundary--") was read."""
        return self.state == "done"

    def feed(self, data: bytes) -> list[Part]:
        self.buffer += data
        parts: list[Part] = []
        while True:
            part_or_progress = self._step()
            if part_or_progress is None:
                return parts
            if isinstance(part_or_progress, Part):
                parts.append(part_or_progress)

    def _step(self) -> Part | bool | None:
        """One parsing step: a Part, True (progress, no part), or None (need more bytes)."""
        buf = self.buffer
        if self.state == "preamble":
            # The first boundary line: at the very start, or after a preamble line break.
            if buf.startswith(self.dash_boundary):
                del buf[: len(self.dash_boundary)]
                self.state = "after_boundary"
                return True
            index = buf.find(self.delimiter)
            if index == -1:
                return None
            del buf[: index + len(self.delimiter)]
            self.state = "after_boundary"
            return True
        if self.state == "after_boundary":
            if len(buf) < 2:
                return None
            if buf.startswith(b"--"):
                self.state = "done"
                return None
            # Transport padding (spaces, tabs) may precede the line break.
            end = buf.find(b"\r\n")
            if end == -1:
                if buf.strip(b" \t\r"):
                    raise MjpegProtocolError(f"junk after boundary: {bytes(buf[:40])!r}")
                return None
            if buf[:end].strip(b" \t"):
                raise MjpegProtocolError(f"junk after boundary: {bytes(buf[:end])!r}")
            del buf[: end + 2]
            self.state = "headers"
            return True
        if self.state == "headers":
            if buf.startswith(b"\r\n"):  # a part with no headers
                head, consumed = b"", 2
            else:
                end = buf.find(b"\r\n\r\n")
                if end == -1:
                    return None
                head, consumed = bytes(buf[:end]), end + 4
            headers: dict[str, str] = {}
            for line in head.decode("latin-1").split("\r\n") if head else []:
                name, sep, value = line.partition(":")
                if not sep or not name.strip():
                    raise MjpegProtocolError(f"bad part header line {line!r}")
                headers[name.strip().lower()] = value.strip()
            del buf[:consumed]
            self.headers = headers
            self.state = "body"
            return True
        if self.state == "body":
            length = self.headers.get("content-length")
            if length is not None:
                try:
                    size = int(length)
                except ValueError:
                    raise MjpegProtocolError(f"bad Content-Length {length!r}") from None
                if size < 0:
                    raise MjpegProtocolError(f"bad Content-Length {length!r}")
                if len(buf) < size:
                    return None
                body = bytes(buf[:size])
                del buf[:size]
                self.state = "after_body"
            else:
                index = buf.find(self.delimiter)
                if index == -1:
                    return None
                body = bytes(buf[:index])
                del buf[: index + len(self.delimiter)]
                self.state = "after_boundary"
            self.parts_read += 1
            return Part(self.headers, body)
        if self.state == "after_body":
            if len(buf) < len(self.delimiter):
                if not self.delimiter.startswith(bytes(buf)):
                    raise MjpegProtocolError(f"expected a boundary after the part, got {bytes(buf)!r}")
                return None
            if not buf.startswith(self.delimiter):
                raise MjpegProtocolError(
                    f"expected a boundary after the Content-Length bytes, got {bytes(buf[:40])!r}")
            del buf[: len(self.delimiter)]
            self.state = "after_boundary"
            return True
        return None  # done: ignore the epilogue
