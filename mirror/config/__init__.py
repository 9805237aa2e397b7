"""Configuration: one YAML schema, validated once into frozen, typed settings.

The CLI loads the file (or uses :func:`default_settings`) and passes the result
down; nothing else reads files or the environment for configuration. Every
error names the key path that is wrong, e.g. ``upstreams[1].url: not a URL``.
The full reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mirror.config.auth import (
    AccessRule,
    AdminSettings,
    AuthSettings,
    TokenSettings,
    _access,
    _admin,
    _auth,
)
from mirror.config.cluster import _cluster
from mirror.config.policy import (
    PolicyIdentity,
    PolicyKey,
    PolicyRule,
    PolicySettings,
    _policy,
)
from mirror.config.sections import _cache, _log, _server, _tls
from mirror.config.settings import (
    CONFIG_VERSION,
    DOCKER_HUB_ALIASES,
    BreakerSettings,
    BudgetSettings,
    CacheSettings,
    ClusterSettings,
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
    "AuthSettings",
    "BreakerSettings",
    "BudgetSettings",
    "CacheSettings",
    "ClusterSettings",
    "CredentialSettings",
    "DockerConfigCredential",
    "EcrCredential",
    "LogSettings",
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


def load(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid.
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
    return parse(document or {}, env=os.environ if env is None else env, base=path.parent)


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


def parse(document: Any, *, env: Mapping[str, str], base: Path = Path(".")) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    Raises:
        ConfigError: naming the first bad key.
    """
    root = _mapping(document, "")
    _only_keys(root, "", {"version", "listen", "tls", "storage", "cache", "upstreams",
                          "log", "server", "cluster", "auth", "access", "admin", "sync",
                          "policy"})
    version = root.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError("version", f"unsupported version {version!r} (this mirror reads 1)")
    host, port = parse_listen(root.get("listen", "0.0.0.0:5000"))
    upstreams = _upstreams(root.get("upstreams"), env, base)
    cluster = _cluster(root.get("cluster"), env, base)
    if cluster is not None and cluster.self_url is None:
        cluster = dataclasses.replace(cluster, self_url=_self_url(cluster, host, port))
    auth = _access(root.get("access"), _auth(root.get("auth"), env, base),
                   tuple(u.name for u in upstreams))
    return Settings(
        listen_host=host,
        listen_port=port,
        tls=_tls(root.get("tls"), base),
        storage=_storage(root.get("storage", {}), env, base),
        cache=_cache(root.get("cache", {})),
        upstreams=upstreams,
        log=_log(root.get("log", {})),
        server=_server(root.get("server", {}), base),
        cluster=cluster,
        auth=auth,
        admin=_admin(root["admin"], env, base, port) if "admin" in root else None,
        sync=_sync(root.get("sync"), {n: u.name for u in upstreams for n in u.names()}),
        policy=_policy(root.get("policy"), tuple(u.name for u in upstreams), base),
    )


def _self_url(cluster: ClusterSettings, host: str, port: int) -> str:
    """How peers reach this node, when the config does not say: its listen address."""
    if host in ("0.0.0.0", "::", "") and (cluster.peers or cluster.peers_dns):
        raise ConfigError("cluster.self_url", "required when listening on every address: "
                          "the URL peers reach this node at (e.g. from the pod's IP)")
    return f"http://{host}:{port}"
