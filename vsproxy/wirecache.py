"""What goes to viewers, a JPEG frame or an H.264 access unit, carries its wire bytes for each
transport, built on first use and shared by every viewer of that transport."""

from __future__ import annotations


class WireCached:
    """Mixin: `encoded(transport)` builds this item's bytes for `transport` once."""

    __slots__ = ("_encoded",)
    _encoded: dict[str, bytes]

    def encoded(self, transport: str) -> bytes:
        data = self._encoded.get(transport)
        if data is None:
            from .outputs import wire  # the encoders of every transport (imported once, then cached)

            data = self._encoded[transport] = wire.encode(transport, self)
        return data
