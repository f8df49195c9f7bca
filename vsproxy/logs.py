"""Logging: one line per event, as text or as one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

# Context fields handlers and the hub attach with `extra=`; shown when present.
CONTEXT_FIELDS = ("session", "upstream", "transport")


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = "".join(f" {name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        line = f"{_utc(record)} {record.levelname:<7} {record.name}: {record.getMessage()}{context}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _utc(record), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log duplicates ours (vsproxy.access).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # aioice narrates every WebRTC peer's ICE checks at info (several lines, with addresses); the
    # peer's connect and close are vsproxy's own lines. Its detail stays for --log-level debug.
    logging.getLogger("aioice").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
