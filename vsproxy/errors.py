"""Errors a client causes. Lower layers raise them; handlers answer with `status` (and `headers`)
and the message as JSON, so no layer below the handlers knows about HTTP."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

from tornado.httpclient import HTTPClientError
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError


class ClientError(Exception):
    status = 400

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class AccessDenied(ClientError):
    """401 without a credential (with a WWW-Authenticate challenge), 403 with a wrong one."""

    def __init__(self, message: str, *, status: int = 401, challenge: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": challenge} if challenge else None)
        self.status = status


class RateLimited(ClientError):
    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})


class DescribedError(Exception):
    """An upstream failure whose message already says what happened in an operator's words:
    `describe_error` shows it as it is, without the type name."""


# What an OSError's errno means to an operator, for the errors where the exception's own text
# ("[Errno 111] Connection refused", or Tornado's "Stream is closed") says it badly or not at all.
_ERRNO_PHRASES = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by peer",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
}


class BadOffer(ClientError):
    """A WHEP offer that is not an SDP offer vsproxy can answer: 400, or 406 when it is valid SDP
    but asks for nothing vsproxy can send (no video, no H.264 in packetization mode 1)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLimitReached(ClientError):
    """limits.max_connections are open (a WebRTC peer counts as one: it holds sockets, not a TCP
    connection): 503."""

    status = 503


class PublishedElsewhere(ClientError):
    """In a cluster, a push upstream's publisher is connected to another node (one at a time)."""

    status = 409


class WebRtcDisabled(ClientError):
    """WHEP is switched off (webrtc.enabled: false)."""

    status = 501


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for `lastError`, logs and the dashboard (no traceback).

    Network failures get a plain phrase ("connection refused", "name not resolved (...)",
    "timed out", "TLS handshake failed: <reason>", "upstream answered HTTP 404 Not Found"),
    whichever library raised them: Tornado hides the OSError of a failed connection inside
    `StreamClosedError.real_error` and its HTTP client's 599 errors, PyAV raises its own subclasses
    of the built-in ones. An OSError that names a file or URL (FFmpeg's do) keeps it in
    parentheses; callers redact URLs that may hold credentials. Anything else is "Type: message".
    """
    if isinstance(exc, StreamClosedError):
        return describe_error(exc.real_error) if exc.real_error is not None else "connection closed"
    if isinstance(exc, HTTPClientError):
        if exc.code != 599:
            return f"upstream answered HTTP {exc.code} {exc.message or ''}".rstrip()
        # 599 is Tornado's "no HTTP response": the cause is the error it was raised from, if any.
        cause = exc.__cause__ or exc.__context__
        if cause is not None and not isinstance(cause, HTTPClientError):
            return describe_error(cause)
        if isinstance(exc, HTTPTimeoutError):
            return _timeout_phrase(exc.message or "")
        if isinstance(exc, HTTPStreamClosedError):
            return "connection closed"
    text = str(exc).strip()
    if isinstance(exc, DescribedError) and text:
        return text
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {exc.verify_message or exc.reason or text}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").replace("_", " ").lower()
        return f"TLS handshake failed: {reason or text}"
    if isinstance(exc, socket.gaierror):
        return f"name not resolved ({exc.strerror})" if exc.strerror else "name not resolved"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        phrase = _timeout_phrase(text)
    elif isinstance(exc, OSError) and exc.errno in _ERRNO_PHRASES:
        phrase = _ERRNO_PHRASES[exc.errno]
    else:
        name = type(exc).__name__
        return f"{name}: {text}" if text else name
    filename = getattr(exc, "filename", None)
    return f"{phrase} ({filename})" if filename else phrase


def _timeout_phrase(text: str) -> str:
    return "TLS handshake timed out" if "TLS handshake" in text else "timed out"
