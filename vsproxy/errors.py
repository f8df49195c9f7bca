"""Errors a client causes. Lower layers raise them; handlers answer with `status` (and `headers`)
and the message as JSON, so no layer below the handlers knows about HTTP."""

from __future__ import annotations

import asyncio


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


class BadOffer(ClientError):
    """A WHEP offer that is not an SDP offer vsproxy can answer: 400, or 406 when it is valid SDP
    but asks for nothing vsproxy can send (no video, no H.264 in packetization mode 1)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class WebRtcDisabled(ClientError):
    """WHEP is switched off (webrtc.enabled: false)."""

    status = 501


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for `lastError`, logs and the dashboard (no traceback)."""
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{name}: {text}" if text else name
