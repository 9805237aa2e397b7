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


def _orjson_text(event: object, **kw: Any) -> str:
    return orjson.dumps(event, default=kw.get("default"),
                        option=orjson.OPT_NON_STR_KEYS).decode()


def setup(settings: LogSettings) -> None:
    """Configure structlog and the standard logging it may meet (aiohttp's)."""
    level = getattr(logging, settings.level.upper())
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    ACCESS.enabled, ACCESS.json = level <= logging.INFO, as_json
    renderer: structlog.typing.Processor = (
        # orjson: the access line is rendered once per request, on the loop
        structlog.processors.JSONRenderer(serializer=_orjson_text) if as_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
