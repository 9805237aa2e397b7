"""The ``upstreams`` section: registries, presets, request budgets and circuit breakers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yarl import URL

from mirror.config import presets
from mirror.config.credentials import _upstream_credentials, _with_default_ecr
from mirror.config.presets import Preset
from mirror.config.settings import (
    BreakerSettings,
    BudgetSettings,
    StaticCredential,
    UpstreamSettings,
    docker_hub,
)
from mirror.config.values import (
    _bool,
    _mapping,
    _only_keys,
    _opt,
    _positive,
    _registry_name,
    _string,
    _url,
    field_default,
    parse_duration,
    parse_rate,
    read_section,
    section_keys,
)
from mirror.errors import ConfigError


def _upstreams(value: Any, env: Mapping[str, str], base: Path) -> tuple[UpstreamSettings, ...]:
    if value is None:
        return (docker_hub(),)
    if not isinstance(value, list) or not value:
        raise ConfigError("upstreams", "expected a non-empty list of registries")
    upstreams = tuple(_upstream(item, f"upstreams[{i}]", env, base) for i, item in enumerate(value))
    _check_unique_names(upstreams)
    defaults = [u.name for u in upstreams if u.default]
    if len(defaults) > 1:
        raise ConfigError("upstreams", f"only one registry may be default, got {defaults}")
    return upstreams


#: The credential kinds besides username/password (mirror.config.credentials).
_UPSTREAM_KEYS = section_keys(UpstreamSettings) | {"docker_config", "ecr", "json_key_file"}


def _upstream(value: Any, key: str, env: Mapping[str, str], base: Path) -> UpstreamSettings:
    item = _mapping(value, key)
    _only_keys(item, key, _UPSTREAM_KEYS)
    name = _registry_name(item.get("name"), f"{key}.name")
    url = _url(item["url"], f"{key}.url") if "url" in item else None
    preset = _preset(item, key, name, url)
    if url is None:
        url = _preset_url(preset, name, key)
    aliases_raw = item.get("aliases", [a for a in preset.aliases if a != name])
    if not isinstance(aliases_raw, list):
        raise ConfigError(f"{key}.aliases", "expected a list of names")
    aliases = tuple(_registry_name(a, f"{key}.aliases[{i}]") for i, a in enumerate(aliases_raw))
    redirect_hosts = _names(item.get("redirect_hosts", []), f"{key}.redirect_hosts")
    blob_probe = _opt(item, "blob_probe", key, _string, preset.blob_probe).lower()
    if blob_probe not in ("head", "get"):
        raise ConfigError(f"{key}.blob_probe", f"expected head or get, got {blob_probe!r}")
    host = _credential_host(name, url)
    credentials = _upstream_credentials(item, key, env=env, base=base, preset=preset, host=host)
    # The top-level username/password stay visible as such for older callers.
    legacy = credentials[0] if credentials and "username" in item else None
    if not isinstance(legacy, StaticCredential):
        legacy = None
    return read_section(
        UpstreamSettings, item, key, extra_keys={"docker_config", "ecr", "json_key_file"},
        name=name,
        url=url,
        aliases=aliases,
        default=_opt(item, "default", key, _bool, False),
        library_prefix=_opt(item, "library_prefix", key, _bool, preset.library_prefix),
        username=legacy.username if legacy else None,
        password=legacy.password if legacy else None,
        preset=preset.key,
        credentials=_with_default_ecr(credentials, preset, host),
        blob_probe=blob_probe,
        redirect_hosts=redirect_hosts,
        **_guard(item, key),
    )


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of host names (host or host:port)")
    return tuple(_registry_name(v, f"{key}[{i}]") for i, v in enumerate(value))


def _guard(item: dict[str, Any], key: str) -> dict[str, Any]:
    """The budget, breaker and Retry-After bound of one upstream, as keyword arguments."""
    cap = _opt(item, "max_client_retry_after", key, parse_duration,
               UpstreamSettings.max_client_retry_after)
    if cap < 1:
        raise ConfigError(f"{key}.max_client_retry_after", "must be at least 1s")
    return {
        "budget": _budget(item["budget"], f"{key}.budget") if "budget" in item else None,
        "breaker": _breaker(item.get("breaker"), f"{key}.breaker"),
        "max_client_retry_after": cap,
    }


def _budget(value: Any, key: str) -> BudgetSettings:
    budget = _mapping(value, key)
    _only_keys(budget, key, section_keys(BudgetSettings))
    if "rate" not in budget:
        raise ConfigError(f"{key}.rate", "required: requests per second, e.g. 20/s or 600/m")
    rate = parse_rate(budget["rate"], f"{key}.rate")
    burst = _opt(budget, "burst", key, _positive, max(1, math.ceil(rate)))
    overdraft = budget.get("client_overdraft", field_default(BudgetSettings, "client_overdraft"))
    if isinstance(overdraft, bool) or not isinstance(overdraft, int | float) \
            or not 0 <= overdraft <= 10:
        raise ConfigError(f"{key}.client_overdraft",
                          f"expected a number from 0 to 10, got {overdraft!r}")
    return BudgetSettings(rate=rate, burst=burst, client_overdraft=float(overdraft))


def _breaker(value: Any, key: str) -> BreakerSettings:
    breaker = read_section(BreakerSettings, _mapping(value, key), key)
    for name, seconds in (("window", breaker.window), ("cool_down", breaker.cool_down)):
        if seconds <= 0:
            raise ConfigError(f"{key}.{name}", "must be longer than 0s")
    return breaker


def _credential_host(name: str, url: URL) -> str:
    """The host credentials are kept under (config.json key, ECR host): the name when it
    is one (``url`` may point elsewhere, e.g. at a proxy), else the ``url``'s host."""

    if presets.looks_like_host(name):
        return name
    port = "" if url.is_default_port() else f":{url.port}"
    return f"{url.host}{port}"


def _preset(item: dict[str, Any], key: str, name: str, url: URL | None) -> Preset:
    explicit = _opt(item, "preset", key, _string, None)
    try:
        return presets.find(name, url.host if url else None, explicit and explicit.lower())
    except KeyError:
        known = ", ".join(p.key for p in presets.PRESETS)
        raise ConfigError(f"{key}.preset",
                          f"unknown preset {explicit!r} (known: {known})") from None


def _preset_url(preset: Preset, name: str, key: str) -> URL:
    if preset.url is not None:
        return URL(preset.url)
    if presets.looks_like_host(name):
        return URL(f"https://{name}")
    raise ConfigError(f"{key}.url", f"required: {name!r} is not a host name and the "
                      f"{preset.title} preset has no well-known address")


def _check_unique_names(upstreams: tuple[UpstreamSettings, ...]) -> None:
    """Every name and alias means one upstream: two entries named alike would mix one's
    settings with the other's URL."""
    seen: dict[str, int] = {}
    for i, upstream in enumerate(upstreams):
        for name in dict.fromkeys((upstream.name.lower(), *(a.lower() for a in upstream.aliases))):
            if name in seen:
                raise ConfigError(f"upstreams[{i}]", f"name {name!r} is already used by "
                                  f"upstreams[{seen[name]}] ({upstreams[seen[name]].name!r})")
            seen[name] = i
