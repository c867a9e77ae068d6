"""Logging: one line per record on stderr, ``<UTC time> <LEVEL> <logger> <message>``, for the
single process and for every replica on Ray Serve alike."""

from __future__ import annotations

import json
import logging
import sys
import time


class OneLineFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> <message>``, one line per record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname:<7} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc_info=" + json.dumps(self.formatException(record.exc_info))
        elif record.exc_text:
            line += " exc_info=" + json.dumps(record.exc_text)
        return line.replace("\n", "\\n")


def configure_logging(level: str) -> None:
    """Send every logger (uvicorn's included) through one one-line handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
