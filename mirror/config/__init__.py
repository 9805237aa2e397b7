"""Configuration: one YAML schema, validated once into frozen, typed settings.

The CLI loads the file (or uses :func:`default_settings`) and passes the result
down; nothing else reads files or the environment for configuration. Every
error names the key path that is wrong, e.g. ``upstreams[1].url: not a URL``.
The full reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mirror.config.audit import AuditSettings, _audit
from mirror.config.auth import _access, _admin, _auth
from mirror.config.cluster import _cluster
from mirror.config.environment import Lenient, without_placeholders
from mirror.config.imports import _import
from mirror.config.policy import (
    PolicyIdentity,
    PolicyKey,
    PolicyRule,
    PolicySettings,
    _policy,
)
from mirror.config.secret import Secret
from mirror.config.sections import _cache, _log, _server, _tls
from mirror.config.settings import (
    CONFIG_VERSION,
    DOCKER_HUB_ALIASES,
    AccessRule,
    AdminSettings,
    AuthSettings,
    BreakerSettings,
    BudgetSettings,
    CacheSettings,
    ClusterSettings,
    CredentialSettings,
    DockerConfigCredential,
    EcrCredential,
    ImportSettings,
    LoginLimits,
    LogSettings,
    PopularSettings,
    S3Settings,
    Schedule,
    ServerSettings,
    Settings,
    StaticCredential,
    StorageSettings,
    SyncRule,
    SyncSettings,
    TagSet,
    TlsSettings,
    TokenSettings,
    UpstreamSettings,
    default_settings,
    docker_hub,
)
from mirror.config.storage import _S3_KEYS as _S3_KEYS  # the tests read the accepted keys
from mirror.config.storage import AUTO_SHARE, _storage, auto_max_size, resolve_max_size
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
    "AUTO_SHARE",
    "CONFIG_VERSION",
    "DOCKER_HUB_ALIASES",
    "AccessRule",
    "AdminSettings",
    "AuditSettings",
    "AuthSettings",
    "BreakerSettings",
    "BudgetSettings",
    "CacheSettings",
    "ClusterSettings",
    "CredentialSettings",
    "DockerConfigCredential",
    "EcrCredential",
    "ImportSettings",
    "LogSettings",
    "LoginLimits",
    "PolicyIdentity",
    "PolicyKey",
    "PolicyRule",
    "PolicySettings",
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
    "TokenSettings",
    "UpstreamSettings",
    "auto_max_size",
    "check",
    "default_settings",
    "docker_hub",
    "load",
    "parse",
    "parse_duration",
    "parse_listen",
    "parse_rate",
    "parse_size",
    "resolve_max_size",
]


def load(path: Path, env: Mapping[str, str] | None = None, *,
         require_env: bool = True) -> Settings:
    """Read and validate a YAML config file.

    Args:
        path: the file.
        env: the environment (default: the process's).
        require_env: every ``*_env`` variable must be set; else an unset one makes the
            upstream credential or S3 key it names absent (commands that never fetch
            with credentials: ``cache``, ``export``, ``import``, ``config check --no-env``).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid.
    """
    document = _read(path)
    environ = os.environ if env is None else env
    if require_env:
        return parse(document, env=environ, base=path.parent)
    lenient = Lenient(environ)
    return without_placeholders(parse(document, env=lenient, base=path.parent), lenient)


def check(path: Path, env: Mapping[str, str] | None = None, *,
          require_env: bool = True) -> tuple[Settings | None, list[ConfigError]]:
    """Validate a config file and report every error found, not only the first (one per
    bad key, at least one per section and per upstream).

    Returns:
        The settings (``None`` when there are errors) and the errors.
    """
    try:
        document = _read(path)
    except ConfigError as exc:
        return None, [exc]
    environ = os.environ if env is None else env
    lenient = None if require_env else Lenient(environ)
    errors: list[ConfigError] = []
    settings = parse(document, env=lenient or environ, base=path.parent, errors=errors)
    if errors:
        return None, errors
    return (without_placeholders(settings, lenient) if lenient else settings), []


def _read(path: Path) -> Any:
    """The YAML document of ``path``.

    Raises:
        ConfigError: the file cannot be read or is not YAML.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not UTF-8 text (byte {exc.start} is "
                          f"0x{exc.object[exc.start]:02x})") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {_one_line(exc)}") from None
    return document or {}


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML says keys
    are unique; PyYAML silently keeps the last, so half of a config would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: later keys may override merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _one_line(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where."""
    return " ".join(str(exc).split())


_ROOT_KEYS = {"version", "listen", "tls", "storage", "cache", "upstreams", "log", "server",
              "cluster", "auth", "access", "admin", "sync", "import", "policy",
              "audit"}


def parse(document: Any, *, env: Mapping[str, str], base: Path = Path("."),
          errors: list[ConfigError] | None = None) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    Args:
        errors: collect every error here (each section parsed on its own, a bad one
            replaced by its default) instead of raising the first.

    Raises:
        ConfigError: naming the first bad key (when ``errors`` is not given).
    """
    if errors is not None and isinstance(document, dict):
        errors += [ConfigError(str(k), f"unknown key (expected one of "
                               f"{', '.join(sorted(_ROOT_KEYS))})")
                   for k in document if k not in _ROOT_KEYS]
        document = {k: v for k, v in document.items() if k in _ROOT_KEYS}
    root = _mapping(document, "")
    _only_keys(root, "", _ROOT_KEYS)
    part = _Sections(errors)
    part(lambda: _version(root.get("version", CONFIG_VERSION)), None)
    host, port = part(lambda: parse_listen(root.get("listen", "0.0.0.0:5000")),
                      ("0.0.0.0", 5000))
    upstreams = part.upstreams(root.get("upstreams"), env, base)
    cluster = part(lambda: _cluster(root.get("cluster"), env, base), None)
    if cluster is not None and cluster.self_url is None:
        cluster = part(partial(_with_self_url, cluster, host, port), None)
    auth = part(lambda: _access(root.get("access"), _auth(root.get("auth"), env, base),
                                tuple(u.name for u in upstreams)), None)
    settings = Settings(
        listen_host=host,
        listen_port=port,
        tls=part(lambda: _tls(root.get("tls"), base), None),
        storage=part(lambda: _storage(root.get("storage", {}), env, base), StorageSettings()),
        cache=part(lambda: _cache(root.get("cache", {})), CacheSettings()),
        upstreams=upstreams,
        log=part(lambda: _log(root.get("log", {})), LogSettings()),
        server=part(lambda: _server(root.get("server", {}), base), ServerSettings()),
        cluster=cluster,
        auth=auth,
        admin=part(lambda: _admin(root["admin"], env, base, port), None)
        if "admin" in root else None,
        sync=part(lambda: _sync(root.get("sync"),
                                {n: u.name for u in upstreams for n in u.names()}), None),
        imports=part(lambda: _import(root.get("import"), base), ImportSettings()),
        policy=part(lambda: _policy(root.get("policy"), tuple(u.name for u in upstreams),
                                    base), None),
        audit=part(lambda: _audit(root["audit"], base), None) if "audit" in root else None,
    )
    return settings


def _with_self_url(cluster: ClusterSettings, host: str, port: int) -> ClusterSettings:
    return dataclasses.replace(cluster, self_url=_self_url(cluster, host, port))


def _version(version: Any) -> None:
    if version != CONFIG_VERSION:
        raise ConfigError("version", f"unsupported version {version!r} (this mirror reads 1)")


T = TypeVar("T")


class _Sections:
    """Runs each section's parser: raising the first error, or collecting them all."""

    def __init__(self, errors: list[ConfigError] | None) -> None:
        self._errors = errors

    def __call__(self, parse: Callable[[], T], fallback: T) -> T:
        if self._errors is None:
            return parse()
        try:
            return parse()
        except ConfigError as exc:
            self._errors.append(exc)
            return fallback

    def upstreams(self, value: Any, env: Mapping[str, str],
                  base: Path) -> tuple[UpstreamSettings, ...]:
        """Every upstream on its own (each one's errors), then the list as a whole."""
        if self._errors is None or not isinstance(value, list):
            return self(lambda: _upstreams(value, env, base), (docker_hub(),))
        good: list[Any] = []
        empty: tuple[UpstreamSettings, ...] = ()
        for i, item in enumerate(value):
            found = self(partial(_upstreams, [item], env, base), empty)
            if not found and self._errors and self._errors[-1].key.startswith("upstreams[0]"):
                last = self._errors.pop()
                self._errors.append(ConfigError(last.key.replace("upstreams[0]",
                                                                 f"upstreams[{i}]", 1),
                                                last.message))
            if found:
                good.append(item)
        if len(good) != len(value):
            return self(partial(_upstreams, good, env, base), empty) if good else empty
        return self(partial(_upstreams, value, env, base), empty)


def _self_url(cluster: ClusterSettings, host: str, port: int) -> str:
    """How peers reach this node, when the config does not say: its listen address."""
    if host in ("0.0.0.0", "::", "") and (cluster.peers or cluster.peers_dns):
        raise ConfigError("cluster.self_url", "required when listening on every address: "
                          "the URL peers reach this node at (e.g. from the pod's IP)")
    return f"http://{host}:{port}"
