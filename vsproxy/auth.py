"""Credentials and rate limits: plain functions and classes, no HTTP (handlers map them to 401/429).

Secrets are compared in constant time and never logged or put in exception messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AccessDenied, ClientError

if TYPE_CHECKING:
    from .config import AuthConfig


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def token_matches(candidate: str | None, accepted: Iterable[str]) -> bool:
    """Is `candidate` one of `accepted`? Constant time: digests are compared, so neither the
    content nor the length of a token shows in the timing."""
    if not candidate:
        return False
    given = _digest(candidate)
    found = False
    for token in accepted:
        found |= hmac.compare_digest(given, _digest(token))  # no early exit
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` header, else None."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def operator_allowed(credentials: tuple[str, str] | None, operators: dict[str, str]) -> bool:
    """HTTP Basic credentials against the configured operators, in constant time."""
    if credentials is None:
        return False
    user, password = credentials
    given_user, given_password = _digest(user), _digest(password)
    ok = False
    for name, secret in operators.items():  # digests: lengths do not show in the timing either
        ok |= hmac.compare_digest(given_user, _digest(name)) & hmac.compare_digest(given_password, _digest(secret))
    return ok


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str, *, keep_query: bool = False) -> str:
    """The URL as logs and error messages may show it: user:password@ becomes ***@, the query
    (which may carry a token) is dropped unless `keep_query`, the fragment always.

    By its text, not by a URL parser: a password with an unescaped '/', '?' or '#' ends the
    authority there for a parser, which then takes the rest of the password for path, query or
    fragment (and an unclosed IPv6 '[' does not parse at all). So everything from after the
    scheme's '://' (from the start without one) to the last '@' is hidden. Where that hides a '?'
    or '#', what follows the '@' may be the end of a query or fragment (an '@' in it) rather
    than the host: it is hidden too (but for a '?' with `keep_query`)."""
    scheme = _SCHEME.match(url)
    shown, rest = (scheme.group(), url[scheme.end():]) if scheme else ("", url)
    if "@" in rest:
        hidden, _, rest = rest.rpartition("@")
        if "#" in hidden or ("?" in hidden and not keep_query):
            return shown + "***"
        shown += "***@"
    rest = rest.partition("#")[0]
    return shown + (rest if keep_query else rest.partition("?")[0])


class InvalidToken(Exception):
    """A viewer token that is missing, malformed, forged, for another session, or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.expired = reason == "expired"


class ViewerTokensOff(ClientError):
    """A viewer token was asked for while auth.viewer_tokens is off (none is needed): 409."""

    status = 409


@dataclass(frozen=True)
class ViewerGrant:
    """What a viewer's credential allows: watching until `expires` (epoch seconds; None: no token
    needed, so no end), and sending control input to the upstream if `control`."""

    expires: float | None
    control: bool


OPEN_GRANT = ViewerGrant(expires=None, control=True)  # viewer tokens off: the session ID is enough
CONTROL_CLAIM = "control"


class ViewerTokens:
    """Signed, expiring capabilities to watch one session: `<expiry>.<HMAC-SHA256, base64url>`, or
    `<expiry>.control.<HMAC>` to also send control input.

    The signature covers the session ID, the expiry and the control claim, so a token opens only
    its own session, only until it expires, grants control only if issued for it, and cannot be
    made without the server's secret. Watch tokens keep the original two-part format.
    """

    def __init__(self, secret: str, ttl_seconds: float) -> None:
        self._key = hashlib.sha256(secret.encode("utf-8")).digest()
        self.ttl = ttl_seconds

    def _signature(self, session_id: str, expiry: int, control: bool) -> str:
        payload = f"{session_id}.{expiry}" + (f".{CONTROL_CLAIM}" if control else "")
        mac = hmac.new(self._key, payload.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def issue(self, session_id: str, now: float | None = None, *, control: bool = False) -> str:
        expiry = int((time.time() if now is None else now) + self.ttl)
        claim = f"{CONTROL_CLAIM}." if control else ""
        return f"{expiry}.{claim}{self._signature(session_id, expiry, control)}"

    def verify(self, token: str | None, session_id: str, now: float | None = None) -> ViewerGrant:
        """What `token` grants for `session_id` right now; raise InvalidToken unless it is valid."""
        if not token:
            raise InvalidToken("missing")
        parts = token.split(".")
        control = len(parts) == 3 and parts[1] == CONTROL_CLAIM
        if not (len(parts) == 2 or control):
            raise InvalidToken("malformed")
        expiry_text, signature = parts[0], parts[-1]
        if not (expiry_text.isascii() and expiry_text.isdigit()) or len(expiry_text) > 12:
            raise InvalidToken("malformed")
        expected = self._signature(session_id, int(expiry_text), control)
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected.encode()):
            raise InvalidToken("invalid")
        if int(expiry_text) < (time.time() if now is None else now):
            raise InvalidToken("expired")
        return ViewerGrant(expires=float(int(expiry_text)), control=control)


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take()` spends one (or `cost`) if there are enough."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = time.monotonic() if now is None else now

    def take(self, now: float | None = None, cost: float = 1) -> bool:
        """Spend `cost` tokens (a message, or its bytes) if there are that many."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available again."""
        return max(0.0, (1 - self.tokens) / self.rate) if self.rate > 0 else float("inf")


class RateLimiter:
    """One token bucket per key (a client address), in a bounded table: the least recently
    seen keys are forgotten first, so a flood of addresses cannot grow memory without bound."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, key: str, now: float | None = None) -> float:
        """0 if allowed (a token is spent), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return 0.0 if bucket.take(now) else bucket.retry_after()


class Access:
    """Who may do what, from the `auth:` config. Every check raises AccessDenied or returns."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        vt = config.viewer_tokens
        self.viewer_tokens = ViewerTokens(vt.secret, vt.ttl_seconds) if vt.enabled else None

    def require(self, scope: str | None, authorization: str | None) -> None:
        """scope: None (open), "api" (session management), "operator" (dashboard), "metrics"."""
        cfg = self.config
        if scope == "api" and cfg.api_tokens:
            self._bearer(authorization, cfg.api_tokens, "API token")
        elif scope == "metrics" and cfg.metrics_token:
            self._bearer(authorization, [cfg.metrics_token], "metrics token")
        elif scope == "operator" and cfg.operators:
            if not operator_allowed(basic_credentials(authorization), cfg.operators):
                raise AccessDenied("Operator credentials required",
                                   challenge='Basic realm="vsproxy operators", charset="UTF-8"')
        elif scope == "operator" and cfg.api_tokens:
            # No operators configured, but the API is protected: the dashboard (which lists and
            # destroys sessions) must not be the open back door to it.
            self._bearer(authorization, cfg.api_tokens, "API token (or configure auth.operators)")

    @staticmethod
    def _bearer(authorization: str | None, accepted: list[str], what: str) -> None:
        token = bearer_token(authorization)
        if token is None and authorization:  # e.g. the bare token, without its scheme
            raise AccessDenied(f"{what[0].upper()}{what[1:]} expected as Authorization: Bearer <token>; the "
                               "Authorization header sent has another form", challenge='Bearer realm="vsproxy"')
        if token is None:
            raise AccessDenied(f"Missing {what} (Authorization: Bearer <token>)", challenge='Bearer realm="vsproxy"')
        if not token_matches(token, accepted):
            raise AccessDenied(f"Invalid {what}", status=401, challenge='Bearer realm="vsproxy", error="invalid_token"')

    def issue_viewer_token(self, session_id: str, *, control: bool = False) -> str | None:
        """A fresh token for `session_id` (one that also grants control input if `control`), or
        None with viewer tokens off."""
        return self.viewer_tokens.issue(session_id, control=control) if self.viewer_tokens else None

    def renew_viewer_token(self, session_id: str, *, control: bool = False) -> tuple[str, float]:
        """(a fresh token, its expiry in epoch seconds) for an existing session; ViewerTokensOff
        with viewer tokens off."""
        if self.viewer_tokens is None:
            raise ViewerTokensOff("Viewer tokens are off (auth.viewer_tokens.enabled): no token is needed")
        token = self.viewer_tokens.issue(session_id, control=control)
        return token, self.viewer_token_expiry(token, session_id)

    def viewer_token_expiry(self, token: str, session_id: str) -> float:
        """When a token this node just issued expires (epoch seconds)."""
        assert self.viewer_tokens is not None
        return self.viewer_tokens.verify(token, session_id).expires or 0.0

    def require_viewer(self, session_id: str, token: str | None, authorization: str | None) -> ViewerGrant:
        """With viewer tokens on, a stream needs its session's token (?token= or Bearer); returns
        what the credential grants (everything, with tokens off)."""
        if self.viewer_tokens is None:
            return OPEN_GRANT
        try:
            return self.viewer_tokens.verify(token or bearer_token(authorization), session_id)
        except InvalidToken as exc:
            if str(exc) == "missing":
                raise AccessDenied("Viewer token required", challenge='Bearer realm="vsproxy viewer"') from None
            if exc.expired:
                raise AccessDenied("Viewer token expired", status=403) from None
            if token and "?" in token:  # `wsUrl + "?format=binary"`: wsUrl already has ?token=
                raise AccessDenied("Viewer token invalid: it has a '?' in it; join the URL's parameters with '&' "
                                   "(?token=...&format=binary)", status=403) from None
            raise AccessDenied("Viewer token invalid", status=403) from None
