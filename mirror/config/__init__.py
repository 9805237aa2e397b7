"""Configuration: one YAML schema, validated once into frozen, typed settings.

The CLI loads the file (or uses :func:`default_settings`) and passes the result
down; nothing else reads files or the environment for configuration. Every
error names the key path that is wrong, e.g. ``upstreams[1].url: not a URL``.
The full reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mirror.config.sections import _cache, _log, _server, _tls
from mirror.config.settings import (
    CONFIG_VERSION,
    DOCKER_HUB_ALIASES,
    BreakerSettings,
    BudgetSettings,
    CacheSettings,
    CredentialSettings,
    DockerConfigCredential,
    EcrCredential,
    LogSettings,
    PopularSettings,
    S3Settings,
    Schedule,
    Secret,
    ServerSettings,
    Settings,
    StaticCredential,
    StorageSettings,
    SyncRule,
    SyncSettings,
    TagSet,
    TlsSettings,
    UpstreamSettings,
    default_settings,
    docker_hub,
)
from mirror.config.storage import _S3_KEYS as _S3_KEYS  # the tests read the accepted keys
from mirror.config.storage import _storage
from mirror.config.sync import _sync
from mirror.config.upstreams import _upstreams
from mirror.config.values import (
    _mapping,
    _only_keys,
    parse_duration,
    parse_listen,
    parse_rate,
    parse_size,
)
from mirror.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "DOCKER_HUB_ALIASES",
    "BreakerSettings",
    "BudgetSettings",
    "CacheSettings",
    "CredentialSettings",
    "DockerConfigCredential",
    "EcrCredential",
    "LogSettings",
    "PopularSettings",
    "S3Settings",
    "Schedule",
    "Secret",
    "ServerSettings",
    "Settings",
    "StaticCredential",
    "StorageSettings",
    "SyncRule",
    "SyncSettings",
    "TagSet",
    "TlsSettings",
    "UpstreamSettings",
    "default_settings",
    "docker_hub",
    "load",
    "parse",
    "parse_duration",
    "parse_listen",
    "parse_rate",
    "parse_size",
]


def load(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse(document or {}, env=os.environ if env is None else env, base=path.parent)


def parse(document: Any, *, env: Mapping[str, str], base: Path = Path(".")) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    Raises:
        ConfigError: naming the first bad key.
    """
    root = _mapping(document, "")
    _only_keys(root, "", {"version", "listen", "tls", "storage", "cache", "upstreams",
                          "log", "server", "sync"})
    version = root.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError("version", f"unsupported version {version!r} (this mirror reads 1)")
    host, port = parse_listen(root.get("listen", "0.0.0.0:5000"))
    upstreams = _upstreams(root.get("upstreams"), env, base)
    return Settings(
        listen_host=host,
        listen_port=port,
        tls=_tls(root.get("tls"), base),
        storage=_storage(root.get("storage", {}), env, base),
        cache=_cache(root.get("cache", {})),
        upstreams=upstreams,
        log=_log(root.get("log", {})),
        server=_server(root.get("server", {})),
        sync=_sync(root.get("sync"), {n: u.name for u in upstreams for n in u.names()}),
    )
