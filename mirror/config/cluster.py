"""The ``cluster`` section: a node of a regional fleet (peers, parents, the peer secret)."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mirror.config.settings import ClusterSettings, PeersDns
from mirror.config.values import (
    _list,
    _mapping,
    _only_keys,
    _opt,
    _positive,
    _secret,
    _string,
    _url,
    parse_duration,
    section_keys,
)
from mirror.errors import ConfigError

_KEYS = section_keys(ClusterSettings)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SECRET_MIN = 16


def _cluster(value: Any, env: Mapping[str, str], base: Path) -> ClusterSettings | None:
    if value is None:
        return None
    key = "cluster"
    item = _mapping(value, key)
    _only_keys(item, key, _KEYS)
    secret = _secret(item, key, "secret", env, base)
    if secret is None:
        raise ConfigError(f"{key}.secret_env", "required: the shared secret peers sign their "
                          "requests with (secret_env or secret_file)")
    if len(secret.reveal()) < SECRET_MIN:
        raise ConfigError(f"{key}.secret_env", f"the peer secret must be at least {SECRET_MIN} "
                          "characters")
    node_id = _opt(item, "node_id", key, _string, socket.gethostname())
    if _ID_RE.fullmatch(node_id) is None:
        raise ConfigError(f"{key}.node_id", f"expected 1-63 of A-Z a-z 0-9 . _ -, got {node_id!r}")
    peers = tuple(_base_url(u, f"{key}.peers[{i}]")
                  for i, u in enumerate(_list(item.get("peers", []), f"{key}.peers")))
    parents = tuple(_base_url(u, f"{key}.parents[{i}]")
                    for i, u in enumerate(_list(item.get("parents", []), f"{key}.parents")))
    audiences = tuple(_base_url(u, f"{key}.audiences[{i}]")
                      for i, u in enumerate(_list(item.get("audiences", []),
                                                  f"{key}.audiences")))
    dns = _dns(item["peers_dns"], f"{key}.peers_dns") if "peers_dns" in item else None
    d = ClusterSettings
    return ClusterSettings(
        node_id=node_id,
        region=_opt(item, "region", key, _string, "default"),
        secret=secret,
        self_url=_base_url(_expand(item["self_url"], env, f"{key}.self_url"), f"{key}.self_url")
        if "self_url" in item else None,
        peers=peers,
        peers_dns=dns,
        parents=parents,
        audiences=audiences,
        header_timeout=_bounded(item, "header_timeout", key, d.header_timeout, 0.005, 30),
        read_timeout=_bounded(item, "read_timeout", key, d.read_timeout, 1, 3600),
        health_interval=_bounded(item, "health_interval", key, d.health_interval, 0.1, 600),
        health_failures=_opt(item, "health_failures", key, _positive, d.health_failures),
        quarantine=_bounded(item, "quarantine", key, d.quarantine, 0, 86400),
        token_ttl=_bounded(item, "token_ttl", key, d.token_ttl, 5, 3600),
    )


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: Mapping[str, str], key: str) -> str:
    """``${NAME}`` replaced by the environment variable (the pod's IP in Kubernetes)."""
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return env[name]
    return _VAR_RE.sub(variable, _string(value, key))


def _base_url(value: Any, key: str) -> str:
    url = _url(value, key)
    if url.path not in ("", "/") or url.query_string:
        raise ConfigError(key, f"expected a base URL (scheme, host, port), got {str(url)!r}")
    return str(url.origin())


def _dns(value: Any, key: str) -> PeersDns:
    item = _mapping(value, key)
    _only_keys(item, key, section_keys(PeersDns))
    if "name" not in item or "port" not in item:
        raise ConfigError(key, "give name (the headless Service) and port")
    port = item["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{key}.port", f"expected a port number, got {port!r}")
    scheme = _opt(item, "scheme", key, _string, "http")
    if scheme not in ("http", "https"):
        raise ConfigError(f"{key}.scheme", f"expected http or https, got {scheme!r}")
    nameserver = _opt(item, "nameserver", key, _string, None)
    return PeersDns(name=_string(item["name"], f"{key}.name"), port=port, scheme=scheme,
                    nameserver=nameserver,
                    interval=_bounded(item, "interval", key, PeersDns.interval, 0.5, 3600))


def _bounded(item: dict[str, Any], name: str, key: str, default: float,
             *bounds: float) -> float:
    low, high = bounds
    value = _opt(item, name, key, parse_duration, default)
    if not low <= value <= high:
        raise ConfigError(f"{key}.{name}", f"must be between {low}s and {high}s")
    return value
