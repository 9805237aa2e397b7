"""structlog setup: key-value events, JSON when not on a terminal.

Request context (request id and friends) travels through contextvars, so any
log line written while a request is handled carries it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from mirror.config import LogSettings


@dataclass
class AccessMode:
    """How access lines are written, as :func:`setup` left it: at all (``log.level`` info
    or debug), and as JSON lines (else through structlog's console renderer)."""

    enabled: bool = True
    json: bool = False


ACCESS = AccessMode()


def _orjson(event: object, **kw: Any) -> bytes:
    return orjson.dumps(event, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS)


def setup(settings: LogSettings) -> None:
    """Configure structlog and the standard logging it may meet (aiohttp's)."""
    level = getattr(logging, settings.level.upper())
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    ACCESS.enabled, ACCESS.json = level <= logging.INFO, as_json
    renderer: structlog.typing.Processor = (
        # orjson: the access line is rendered once per request, on the loop
        structlog.processors.JSONRenderer(serializer=_orjson) if as_json
        else structlog.dev.ConsoleRenderer()
    )
    # JSON lines go out whole, one write each: worker processes share stderr, and a line
    # written in two pieces (print's text, then its newline) could be split by another's.
    factory: Any = (structlog.BytesLoggerFactory(sys.stderr.buffer) if as_json
                    else structlog.PrintLoggerFactory(sys.stderr))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
