"""The credentials of an upstream: static, Docker ``config.json``, ECR, JSON key file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mirror.config import presets
from mirror.config.presets import Preset
from mirror.config.secret import Secret
from mirror.config.settings import (
    CredentialSettings,
    DockerConfigCredential,
    EcrCredential,
    StaticCredential,
)
from mirror.config.values import (
    _existing_file,
    _mapping,
    _only_keys,
    _opt,
    _secret,
    _string,
    _url,
    parse_duration,
    parse_timeout,
)
from mirror.errors import ConfigError

_CREDENTIAL_KINDS = ("username", "docker_config", "ecr", "json_key_file")


def _upstream_credentials(item: dict[str, Any], key: str, *, env: Mapping[str, str], base: Path,
                          preset: Preset, host: str) -> tuple[CredentialSettings, ...]:
    """The top-level credential (at most one kind), then the ``credentials`` list."""
    given = [k for k in _CREDENTIAL_KINDS if k in item]
    if len(given) > 1:
        raise ConfigError(key, f"give one of {', '.join(given)}; list several under credentials:")
    found: list[CredentialSettings] = []
    if given or "password_env" in item or "password_file" in item:
        found.append(_credential(item, key, 0, env=env, base=base, preset=preset, host=host))
    raw = item.get("credentials")
    if raw is None:
        return tuple(found)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}.credentials", "expected a non-empty list of credentials")
    for i, entry in enumerate(raw):
        path = f"{key}.credentials[{i}]"
        entry_map = _mapping(entry, path)
        _only_keys(entry_map, path, {"username", "password_env", "password_file", "docker_config",
                                     "server", "helper_timeout", "ecr", "json_key_file", "label"})
        if len([k for k in _CREDENTIAL_KINDS if k in entry_map]) != 1:
            raise ConfigError(path, "expected exactly one of username, docker_config, ecr, "
                              "json_key_file")
        found.append(_credential(entry_map, path, len(found), env=env, base=base, preset=preset,
                                 host=host))
    labels = [c.label for c in found]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{key}.credentials", f"labels must be unique, got {labels}")
    return tuple(found)


def _credential(item: dict[str, Any], key: str, index: int, *, env: Mapping[str, str],
                base: Path, preset: Preset, host: str) -> CredentialSettings:
    def label_of(kind: str) -> str:
        return _opt(item, "label", key, _string, f"{kind}-{index}")

    if "docker_config" in item:
        path = _existing_file(str(Path(_string(item["docker_config"], f"{key}.docker_config"))
                                  .expanduser()), f"{key}.docker_config", base)
        _json_file(path, f"{key}.docker_config")
        server = _opt(item, "server", key, _string, preset.docker_config_server or host)
        timeout = _opt(item, "helper_timeout", key, parse_timeout, 10.0)
        return DockerConfigCredential(label_of("docker_config"), path, server, timeout)
    if "ecr" in item:
        return _ecr(item["ecr"], f"{key}.ecr", label_of("ecr"), host)
    if "json_key_file" in item:
        path = _existing_file(item["json_key_file"], f"{key}.json_key_file", base)
        text = _json_file(path, f"{key}.json_key_file")
        # As `docker login --password-stdin` does: the trailing newline is not part of it.
        return StaticCredential(label_of("json_key"), "_json_key", Secret(text.strip()))
    for extra in ("server", "helper_timeout"):
        if extra in item:
            raise ConfigError(f"{key}.{extra}", "only for a docker_config credential")
    password = _password(item, key, env, base)
    if password is None or "username" not in item:
        raise ConfigError(f"{key}.username", "a password needs a username")
    return StaticCredential(label_of("static"), _string(item["username"], f"{key}.username"),
                            password)


_ECR_KEYS = {"region", "registry_id", "endpoint_url", "profile", "refresh_margin"}


def _ecr(value: Any, key: str, label: str, host: str) -> EcrCredential:
    ecr = _mapping(value, key)
    _only_keys(ecr, key, _ECR_KEYS)
    public = host == presets.ECR_PUBLIC_HOST
    region = _opt(ecr, "region", key, _string,
                  presets.ECR_PUBLIC_REGION if public else presets.ecr_region(host))
    if region is None:
        raise ConfigError(f"{key}.region", f"required: {host!r} is not an ECR registry host")
    endpoint = _opt(ecr, "endpoint_url", key, _url, None)
    margin = _opt(ecr, "refresh_margin", key, parse_duration, 3600.0)
    return EcrCredential(
        label=label, region=region,
        registry_id=_opt(ecr, "registry_id", key, _string, None),
        endpoint_url=str(endpoint) if endpoint is not None else None,
        profile=_opt(ecr, "profile", key, _string, None),
        refresh_margin=margin,
        public=public,
    )


def _with_default_ecr(credentials: tuple[CredentialSettings, ...], preset: Preset,
                      host: str) -> tuple[CredentialSettings, ...]:
    """An ECR registry with no credentials configured gets them from the AWS chain."""
    if credentials or preset.key != "ecr":
        return credentials
    region = presets.ecr_region(host)
    if region is None:  # preset: ecr on a url that is not an ECR host, without ecr:
        return credentials
    return (EcrCredential("ecr-0", region),)


def _password(item: dict[str, Any], key: str, env: Mapping[str, str], base: Path) -> Secret | None:
    password = _secret(item, key, "password", env, base)
    if password is None and "username" in item:
        raise ConfigError(f"{key}.username", "a username needs password_env or password_file")
    return password


def _json_file(path: Path, key: str) -> str:
    text = path.read_text()
    try:
        json.loads(text)
    except ValueError:
        raise ConfigError(key, f"{path} is not JSON") from None
    return text
