"""The vocabulary of the configuration schema, shared by `config.py` and each source module's
settings class (so a source kind declares its own keys without importing the whole config).

Every key is declared once, with `setting()`: its default, its bounds and a one-line `doc`. The
loader checks values against the bounds, and the README's configuration reference is generated
from the docs (`python -m vsproxy.config`; a test keeps the README equal to it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(Exception):
    """A configuration value is missing, unknown, mistyped or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def setting(default: Any = dataclasses.MISSING, *, doc: str, min: float | None = None,  # noqa: A002
            max: float | None = None, choices: tuple = (),  # noqa: A002
            factory: Callable[[], Any] | None = None, values: str | None = None,
            item_keys: tuple[str, ...] = ()) -> Any:
    """A dataclass field for one configuration key: `port: int = setting(8889, min=1, max=65535,
    doc="...")`; mutable defaults (lists, mappings) come from `factory`; `values` describes the
    accepted values in the reference where the type says too little. A `list` key with `item_keys`
    is a list of mappings instead of strings: each may have those keys (the first is required),
    each value a string or a list of strings."""
    metadata = {"min": min, "max": max, "choices": choices, "doc": doc, "values": values, "item_keys": item_keys}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def number_text(value: float) -> str:
    """A bound as people write it: 65535, 16777216, 0.05 (never 1.67772e+07)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_not_placeholder(key: str, secret: str) -> None:
    """A secret copied from an example as it stands ("<32+ random characters>", deploy/.env.example's
    "change-me-...") is refused: it is long enough, and known to everyone who read the example."""
    if (secret.startswith("<") and secret.endswith(">")) or secret.lower().startswith(("change-me", "changeme")):
        raise ConfigError(key, "replace the example's placeholder with a random value (e.g. "
                               "python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")


# An HTTP field name (RFC 9110 `token`).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_problem(name: str, value: str) -> str | None:
    """Why `name: value` cannot be sent as an HTTP request header, or None. Never quotes the
    value (headers are where tokens live), nor a name that may hold one (`Name: value` written as
    one string)."""
    if not _HEADER_NAME.fullmatch(name):
        shown = "a header name with ':' in it" if ":" in name else f"header name {name[:64]!r}"
        return f"{shown} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
    if any(c in value for c in "\r\n\0"):
        return (f"the value of header {name!r} has a line break or NUL in it (a YAML block scalar, `|` or `>`, "
                "ends with a line break: use a quoted string or `|-`)")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"the value of header {name!r} has characters HTTP headers cannot carry (beyond Latin-1)"
    return None


def check_headers(key: str, headers: Mapping[str, str]) -> None:
    """Raise ConfigError naming `key` (and the header, if its name is valid) for a header that
    cannot be sent: see header_problem."""
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            raise ConfigError(f"{key}.{name}" if _HEADER_NAME.fullmatch(name) else key, problem)
