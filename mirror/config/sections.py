"""The small sections: ``tls``, ``cache``, ``log`` and ``server``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror.config import cpus
from mirror.config.settings import CacheSettings, LogSettings, ServerSettings, TlsSettings
from mirror.config.values import (
    _existing_file,
    _mapping,
    _only_keys,
    _opt,
    _string,
    parse_duration,
    parse_size,
)
from mirror.errors import ConfigError


def _tls(value: Any, base: Path) -> TlsSettings | None:
    if value is None:
        return None
    tls = _mapping(value, "tls")
    _only_keys(tls, "tls", {"cert", "key"})
    cert = _existing_file(tls.get("cert"), "tls.cert", base)
    key = _existing_file(tls.get("key"), "tls.key", base)
    return TlsSettings(cert=cert, key=key)


def _cache(value: Any) -> CacheSettings:
    cache = _mapping(value, "cache")
    keys = {"tag_ttl", "stale_if_error", "negative_ttl", "memory_max_size", "memory_item_max_size"}
    _only_keys(cache, "cache", keys)
    defaults = CacheSettings()
    return CacheSettings(
        tag_ttl=_opt(cache, "tag_ttl", "cache", parse_duration, defaults.tag_ttl),
        stale_if_error=_opt(cache, "stale_if_error", "cache", parse_duration,
                            defaults.stale_if_error),
        negative_ttl=_opt(cache, "negative_ttl", "cache", parse_duration, defaults.negative_ttl),
        memory_max_bytes=_opt(cache, "memory_max_size", "cache", parse_size,
                              defaults.memory_max_bytes),
        memory_item_max_bytes=_opt(cache, "memory_item_max_size", "cache", parse_size,
                                   defaults.memory_item_max_bytes),
    )


def _log(value: Any) -> LogSettings:
    log = _mapping(value, "log")
    _only_keys(log, "log", {"level", "format"})
    level = _string(log.get("level", "info"), "log.level").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    fmt = _string(log.get("format", "auto"), "log.format").lower()
    if fmt not in ("auto", "json", "console"):
        raise ConfigError("log.format", f"expected auto, json or console, got {fmt!r}")
    return LogSettings(level=level, format=fmt)


def _server(value: Any, base: Path = Path(".")) -> ServerSettings:
    server = _mapping(value, "server")
    _only_keys(server, "server",
               {"event_loop", "chunk_size", "shutdown_grace", "workers", "pid_file"})
    loop = _string(server.get("event_loop", "uvloop"), "server.event_loop").lower()
    if loop not in ("asyncio", "uvloop"):
        raise ConfigError("server.event_loop", f"expected asyncio or uvloop, got {loop!r}")
    chunk = _opt(server, "chunk_size", "server", parse_size, ServerSettings.chunk_size)
    if not 4096 <= chunk <= 16 * 2**20:
        raise ConfigError("server.chunk_size", "must be between 4KiB and 16MiB")
    grace = _opt(server, "shutdown_grace", "server", parse_duration, ServerSettings.shutdown_grace)
    if not 0 <= grace <= 3600:
        raise ConfigError("server.shutdown_grace", "must be between 0s and 1h")
    pid_file = server.get("pid_file")
    if pid_file is not None:
        pid_file = base / Path(_string(pid_file, "server.pid_file")).expanduser()
    return ServerSettings(event_loop=loop, chunk_size=chunk, shutdown_grace=grace,
                          workers=_workers(server.get("workers", "auto")), pid_file=pid_file)


def _workers(value: Any) -> int:
    """``server.workers``: a count from 1 to 256, or ``auto`` (the CPUs this process may
    use: its affinity and its cgroup's quota, :mod:`mirror.config.cpus`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(cpus.available(), 256)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError("server.workers", f"expected a number from 1 to 256 or auto, "
                          f"got {value!r}")
    return value
