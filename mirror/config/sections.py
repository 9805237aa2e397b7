"""The small sections: ``tls``, ``cache``, ``log`` and ``server``.

Their keys, defaults and grammars are the fields of their dataclasses
(:mod:`mirror.config.settings`); what is left here is what a grammar cannot say alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror.config import cpus
from mirror.config.settings import CacheSettings, LogSettings, ServerSettings, TlsSettings
from mirror.config.values import (
    _existing_file,
    _mapping,
    _only_keys,
    _string,
    read_section,
    section_keys,
)
from mirror.errors import ConfigError


def _tls(value: Any, base: Path) -> TlsSettings | None:
    if value is None:
        return None
    tls = _mapping(value, "tls")
    _only_keys(tls, "tls", section_keys(TlsSettings))
    cert = _existing_file(tls.get("cert"), "tls.cert", base)
    key = _existing_file(tls.get("key"), "tls.key", base)
    return TlsSettings(cert=cert, key=key)


def _cache(value: Any) -> CacheSettings:
    return read_section(CacheSettings, _mapping(value, "cache"), "cache")


def _log(value: Any) -> LogSettings:
    return read_section(LogSettings, _mapping(value, "log"), "log")


def _server(value: Any, base: Path = Path(".")) -> ServerSettings:
    server = _mapping(value, "server")
    _only_keys(server, "server", section_keys(ServerSettings))  # before the keys read here
    pid_file = server.get("pid_file")
    if pid_file is not None:
        pid_file = base / Path(_string(pid_file, "server.pid_file")).expanduser()
    settings = read_section(ServerSettings, server, "server",
                            workers=_workers(server.get("workers", "auto")), pid_file=pid_file)
    if not 4096 <= settings.chunk_size <= 16 * 2**20:
        raise ConfigError("server.chunk_size", "must be between 4KiB and 16MiB")
    if not 0 <= settings.shutdown_grace <= 3600:
        raise ConfigError("server.shutdown_grace", "must be between 0s and 1h")
    return settings


def _workers(value: Any) -> int:
    """``server.workers``: a count from 1 to 256, or ``auto`` (the CPUs this process may
    use: its affinity and its cgroup's quota, :mod:`mirror.config.cpus`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(cpus.available(), 256)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError("server.workers", f"expected a number from 1 to 256 or auto, "
                          f"got {value!r}")
    return value
