"""structlog set-up: JSON lines rendered by orjson (or, for a person at a terminal, structlog's
console renderer), the request id bound in contextvars.

Operational logs (warnings, errors) go to stderr; the usage log (one line per request, written by
``proxy.usage`` with the same orjson rendering) goes to its own sink, stdout by default, so
``thriftgate serve > usage.jsonl`` keeps the two apart.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson
import structlog


def _render(_: Any, __: str, event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, default=repr)


LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    stream: IO[bytes] | None = None, level: int | str = logging.INFO, fmt: str = "json"
) -> None:
    """Configure structlog for the process; call once, at start-up. ``fmt``: ``json`` (one
    orjson line per event) or ``console`` (aligned, coloured on a terminal, on stderr)."""
    if isinstance(level, str):
        level = LEVELS[level]
    if fmt == "console":
        text = sys.stderr
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False, key="ts"),
                structlog.dev.ConsoleRenderer(colors=_tty(text), timestamp_key="ts"),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(text),
            cache_logger_on_first_use=True,
        )
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(stream or sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )


def _tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
