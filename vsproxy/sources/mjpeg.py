"""The MJPEG camera upstream: an HTTP(S) multipart/x-mixed-replace stream (ROS web_video_server,
IP cameras), split into JPEG parts by `vsproxy.mjpeg.MultipartParser`.

A small HTTP/1.1 client on a raw IOStream rather than AsyncHTTPClient: the response is endless,
so it needs no request timeout and no body size limit, and `run()` owns the socket, so
cancelling it (the hub does when the last session leaves) closes the connection at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.tcpclient import TCPClient

from .. import __version__
from ..auth import redact_url
from ..schema import check_headers, header_problem, setting
from .base import FrameTimeout, HubLink, Source, url_address
from .multipart import MultipartParser, boundary_from_content_type

if TYPE_CHECKING:
    from ..config import ReconnectConfig

log = logging.getLogger("vsproxy.sources.mjpeg")

READ_CHUNK_BYTES = 64 * 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
JPEG_SOI = b"\xff\xd8"
# Content-Types that say nothing about the body: accepted when the body itself is multipart.
GENERIC_MEDIA_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "text/plain"})


class UpstreamHTTPError(Exception):
    """The camera answered, but not with a multipart stream (status, Content-Type, framing)."""


@dataclass(frozen=True)
class MjpegUpstream:
    """An HTTP(S) multipart/x-mixed-replace camera (ROS web_video_server, IP cameras)."""

    url: str = setting("", doc="`http://` or `https://` URL of the multipart stream")
    headers: dict = setting(factory=dict, doc="extra request headers (never logged; no line breaks: as "
                                                   "`isaac_sim.headers`)")
    max_part_bytes: int = setting(8 * 1024 * 1024, min=1024, max=256 * 1024 * 1024, doc="largest JPEG part "
                                  "accepted")


class MjpegSource(Source):
    kind = "mjpeg"
    settings_class = MjpegUpstream
    url_schemes = ("http://", "https://")

    @classmethod
    def check_settings(cls, settings: MjpegUpstream, key: str) -> None:
        check_headers(f"{key}.headers", settings.headers)

    def __init__(self, name: str, settings: MjpegUpstream, reconnect: ReconnectConfig) -> None:
        super().__init__(name, settings, reconnect)
        self.parts_skipped = 0  # parts that were not JPEG (all runs)
        self._request = b""
        self._config_error: str | None = None  # makes every attempt fail, with this lastError
        # Userinfo and query strings carry secrets: never logged.
        self.safe_url = redact_url(settings.url)
        self._secure = settings.url.startswith("https://")
        self.address = url_address(settings.url)
        try:
            url = urlsplit(settings.url)
        except ValueError:  # configuration refuses such a URL; its text may quote the password
            self._config_error = f"the URL {self.safe_url!r} cannot be parsed"
            return
        try:
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            self._request = _request_head(target, url.hostname or "", url.port, url.username, url.password,
                                          settings.headers)
        except ValueError as exc:
            self._config_error = str(exc)

    async def run(self, hub: HubLink) -> None:
        if self._config_error is not None:
            raise ValueError(self._config_error)
        rc = self.reconnect
        stream = await self._connect(rc.connect_timeout_seconds)
        watchdog = _Watchdog(stream, rc.frame_timeout_seconds)
        try:
            await stream.write(self._request)
            try:
                async with asyncio.timeout(rc.connect_timeout_seconds):  # not wait_for: see isaac.py
                    code, reason, headers = await _read_response_head(stream)
            except TimeoutError:
                raise UpstreamHTTPError(f"no response within {rc.connect_timeout_seconds:g} s") from None
            parser = self._check_response(code, reason, headers)
            # A response that did not say it is multipart is a stream once its first line is a
            # boundary line; until then it is not connected (a login page never counts as up).
            connected = not parser.sniff
            if connected:
                hub.set_connected()
            watchdog.start()
            async with aclosing(_read_body(stream, headers)) as body:
                async for chunk in body:
                    parts = parser.feed(chunk)
                    if not connected and parser.boundary is not None:
                        connected = True
                        hub.set_connected()
                    for part in parts:
                        if part[:2] == JPEG_SOI:
                            hub.publish(part)
                            watchdog.frame_arrived()
                        else:
                            self._skip_part()
                    if parser.finished:
                        raise ConnectionError("upstream ended the multipart stream")
            raise ConnectionError("upstream closed the connection")
        except (StreamClosedError, UnsatisfiableReadError) as exc:
            if watchdog.fired:
                raise FrameTimeout(f"no frame for {rc.frame_timeout_seconds:g} s") from None
            if isinstance(exc, UnsatisfiableReadError):
                raise UpstreamHTTPError("malformed HTTP response (line too long)") from None
            if exc.real_error is not None:
                raise  # describe_error says what happened ("connection reset by peer")
            raise ConnectionError("upstream closed the connection") from None
        finally:
            watchdog.stop()
            stream.close()

    async def _connect(self, timeout: float) -> IOStream:
        ssl_options = ssl.create_default_context() if self._secure else None
        host, port = self.address or ("", 0)
        return await TCPClient().connect(host, port, ssl_options=ssl_options, timeout=timeout)

    def _skip_part(self) -> None:
        self.parts_skipped += 1
        if self.parts_skipped == 1:  # once per upstream, however often it reconnects
            log.warning("skipping multipart parts that are not JPEG images", extra={"upstream": self.name})

    def _check_response(self, code: int, reason: str, headers: httputil.HTTPHeaders) -> MultipartParser:
        if code != 200:
            raise UpstreamHTTPError(f"upstream answered HTTP {code} {reason}".rstrip())
        content_type = headers.get("Content-Type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        multipart = media_type.startswith("multipart/")
        if not multipart and media_type not in GENERIC_MEDIA_TYPES:
            raise UpstreamHTTPError(
                f"expected a multipart/x-mixed-replace stream, got Content-Type {media_type[:64] or '(none)'!r}")
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UpstreamHTTPError(f"unsupported Content-Encoding {encoding[:32]!r}")
        # A generic or missing type (ffmpeg's own server sends application/octet-stream): the body
        # is a multipart stream if it opens with a boundary line, which the parser checks.
        parser = MultipartParser(boundary_from_content_type(content_type), self.settings.max_part_bytes,
                                 sniff=not multipart)
        log.debug("streaming %s from %s", media_type or "(no Content-Type)", self.safe_url,
                  extra={"upstream": self.name})
        return parser


class _Watchdog:
    """Closes the stream when no frame arrived for `timeout` seconds (checked lazily: one timer
    per timeout period, not one per frame)."""

    def __init__(self, stream: IOStream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout
        self.fired = False
        self._last_frame = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._last_frame = time.monotonic()
        self._schedule(self.timeout)

    def frame_arrived(self) -> None:
        self._last_frame = time.monotonic()

    def _schedule(self, delay: float) -> None:
        self._handle = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        remaining = self._last_frame + self.timeout - time.monotonic()
        if remaining > 0:
            self._schedule(remaining)
            return
        self.fired = True
        self.stream.close()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _host_header(host: str, port: int | None) -> str:
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _request_head(target: str, host: str, port: int | None, username: str | None, password: str | None,
                  extra: dict) -> bytes:
    """The GET request's bytes; ValueError for settings that can never work."""
    headers = {
        "Host": _host_header(host, port),
        "User-Agent": f"vsproxy/{__version__}",
        "Accept": "multipart/x-mixed-replace, */*;q=0.8",
        "Connection": "close",
    }
    if username is not None:
        userinfo = f"{unquote(username)}:{unquote(password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(userinfo).decode("ascii")
    lowered = {k.lower(): k for k in headers}
    for name, value in extra.items():
        problem = header_problem(name, value)  # never quotes the value: headers are where tokens live
        if problem is not None:
            raise ValueError(problem)
        headers.pop(lowered.get(name.lower(), name), None)
        headers[name] = value
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("the URL and headers must be ASCII/latin-1") from None


async def _read_response_head(stream: IOStream) -> tuple[int, str, httputil.HTTPHeaders]:
    """Status code, reason and headers of the response, skipping any 1xx interim responses."""
    for _ in range(5):
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=MAX_RESPONSE_HEAD_BYTES)
        text = head.decode("latin-1")
        first, _, rest = text.lstrip("\r\n").partition("\n")
        start = httputil.parse_response_start_line(first.rstrip("\r"))
        if not 100 <= start.code < 200:
            return start.code, start.reason, httputil.HTTPHeaders.parse(rest)
    raise UpstreamHTTPError("too many interim (1xx) responses")


async def _read_body(stream: IOStream, headers: httputil.HTTPHeaders) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, Content-Length, or until the connection closes."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        while True:
            line = await stream.read_until(b"\n", max_bytes=1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise UpstreamHTTPError("malformed chunked encoding") from None
            if size == 0:
                return
            while size > 0:
                data = await stream.read_bytes(min(size, READ_CHUNK_BYTES), partial=True)
                size -= len(data)
                yield data
            await stream.read_until(b"\n", max_bytes=2)
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit():
        remaining = int(length)
        while remaining > 0:
            data = await stream.read_bytes(min(remaining, READ_CHUNK_BYTES), partial=True)
            remaining -= len(data)
            yield data
        return
    while True:
        yield await stream.read_bytes(READ_CHUNK_BYTES, partial=True)


SOURCE = MjpegSource
