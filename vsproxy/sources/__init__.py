"""Upstream sources: one module per kind, listed once in `KINDS`.

A source connects, feeds frames to its hub (through `base.HubLink`), and returns or raises when
the connection is lost; the hub's supervisor owns reconnecting with backoff. Configuration
(`upstreams.<name>.kind`), `create_source` and the OpenAPI document all read `KINDS`: adding a
kind is one module (a `Source` subclass named in its `SOURCE`, with its `settings_class`) plus
one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import FrameTimeout, HubLink, RelayBudget, Source

if TYPE_CHECKING:
    from ..config import ReconnectConfig

# kind -> the module that implements it. A module is imported only when its kind is used, so
# PyAV (rtsp) loads only where an rtsp upstream is configured.
KINDS: dict[str, str] = {
    "demo": "vsproxy.sources.demo",
    "isaac": "vsproxy.sources.isaac",
    "mjpeg": "vsproxy.sources.mjpeg",
    "rtsp": "vsproxy.sources.rtsp",
    "push": "vsproxy.sources.push",
}

__all__ = ["KINDS", "FrameTimeout", "HubLink", "RelayBudget", "Source", "create_source", "kind_of", "source_class"]


def source_class(kind: str) -> type[Source]:
    """The Source class of `kind` (one of KINDS)."""
    return importlib.import_module(KINDS[kind]).SOURCE


def kind_of(settings: Any) -> str:
    """The kind whose settings class `settings` is an instance of."""
    for kind in KINDS:
        if isinstance(settings, source_class(kind).settings_class):
            return kind
    raise ValueError(f"{type(settings).__name__} is not the settings of any upstream kind")


def create_source(name: str, settings: Any, reconnect: ReconnectConfig) -> Source:
    """The one place an upstream's settings become a Source."""
    return source_class(kind_of(settings))(name, settings, reconnect)
