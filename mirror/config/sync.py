"""The ``sync`` section: rules of what to keep warm, popularity, and warming's budget.

Regular expressions, semver ranges and cron expressions are compiled here once so
that a bad one is a config error naming its key, not a failure at 3 a.m.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import semantic_version
from cronsim import CronSim, CronSimError

from mirror.config.settings import (
    PopularSettings,
    Schedule,
    SyncRule,
    SyncSettings,
    TagSet,
    own_platform,
)
from mirror.config.values import (
    _bool,
    _mapping,
    _only_keys,
    _opt,
    _positive,
    _registry_name,
    _string,
    field_default,
    parse_duration,
    parse_size,
    read_section,
    section_keys,
)
from mirror.errors import ConfigError

_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_WINDOW_RE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
_REPO_GLOB_RE = re.compile(r"[a-z0-9._/*?\[\]-]+")
def _sync(value: Any, registries: dict[str, str]) -> SyncSettings | None:
    """``sync`` (``None`` when absent); ``registries`` maps every upstream name and alias to
    the upstream's configured name."""
    if value is None:
        return None
    sync = _mapping(value, "sync")
    _only_keys(sync, "sync", section_keys(SyncSettings) | {"interval", "cron"})
    default_schedule = _schedule(sync, "sync", field_default(SyncRule, "schedule"))
    default_protect = _opt(sync, "protect", "sync", parse_duration,
                           field_default(SyncSettings, "protect"))
    rules_value = sync.get("rules") or []
    if not isinstance(rules_value, list):
        raise ConfigError("sync.rules", "expected a list of rules")
    rules = tuple(_rule(item, f"sync.rules[{i}]", registries, default_schedule, default_protect)
                  for i, item in enumerate(rules_value))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError("sync.rules", "rule names must be unique")
    bandwidth = _opt(sync, "bandwidth", "sync", parse_size, SyncSettings.bandwidth)
    return read_section(
        SyncSettings, sync, "sync", extra_keys={"interval", "cron"},
        rules=rules,
        popular=_popular(sync.get("popular"), default_protect),
        platforms=_platforms(sync.get("platforms"), "sync.platforms") or (own_platform(),),
        protect=default_protect,
        bandwidth=bandwidth or None,
        off_peak=_off_peak(sync.get("off_peak")),
    )


def _rule(value: Any, key: str, registries: dict[str, str], schedule: Schedule,
          protect: float) -> SyncRule:
    rule = _mapping(value, key)
    _only_keys(rule, key, section_keys(SyncRule) | {"interval", "cron"})
    named = _registry_name(rule.get("registry"), f"{key}.registry")
    registry = registries.get(named)
    if registry is None:
        raise ConfigError(f"{key}.registry", f"{named!r} is not a configured upstream "
                          f"(one of {', '.join(sorted(set(registries.values())))})")
    repositories = _strings(rule.get("repositories"), f"{key}.repositories")
    for i, repo in enumerate(repositories):
        if _REPO_GLOB_RE.fullmatch(repo) is None:
            raise ConfigError(f"{key}.repositories[{i}]", f"not a repository or glob: {repo!r}")
    tags_value = rule.get("tags")
    if not isinstance(tags_value, list) or not tags_value:
        raise ConfigError(f"{key}.tags", "expected a list of tags and tag sets "
                          "(a tag, or {allow, deny, semver, newest})")
    exact = tuple(t.strip() for t in tags_value if isinstance(t, str))
    sets = [_tag_set(t, f"{key}.tags[{i}]") for i, t in enumerate(tags_value)
            if not isinstance(t, str)]
    tag_sets = ((TagSet(tags=exact),) if exact else ()) + tuple(sets)
    return SyncRule(
        name=_string(rule.get("name", f"rule-{key.rsplit('[', 1)[-1].rstrip(']')}"),
                     f"{key}.name"),
        registry=registry,
        repositories=repositories,
        tag_sets=tag_sets,
        platforms=_platforms(rule.get("platforms"), f"{key}.platforms"),
        referrers=_bool(rule.get("referrers", False), f"{key}.referrers"),
        schedule=_schedule(rule, key, schedule),
        protect=_opt(rule, "protect", key, parse_duration, protect),
    )


def _tag_set(value: Any, key: str) -> TagSet:
    item = _mapping(value, key)
    _only_keys(item, key, section_keys(TagSet))
    if not item:
        raise ConfigError(key, "an empty tag set selects nothing")
    allow = _regexes(item.get("allow"), f"{key}.allow")
    deny = _regexes(item.get("deny"), f"{key}.deny")
    semver = None
    if "semver" in item:
        semver = _string(item["semver"], f"{key}.semver")
        try:
            semantic_version.NpmSpec(semver)
        except ValueError as exc:
            raise ConfigError(f"{key}.semver", f"not an npm-style range: {exc}") from None
    newest = _opt(item, "newest", key, _positive, None)
    return TagSet(allow=allow, deny=deny, semver=semver, newest=newest)


def _popular(value: Any, protect: float) -> PopularSettings:
    if value is None:
        return PopularSettings(protect=protect)
    popular = _mapping(value, "sync.popular")
    _only_keys(popular, "sync.popular", section_keys(PopularSettings) | {"interval", "cron"})
    window = _opt(popular, "window", "sync.popular", parse_duration,
                  field_default(PopularSettings, "window"))
    if window < 60:
        raise ConfigError("sync.popular.window", "must be at least 1m")
    return read_section(
        PopularSettings, popular, "sync.popular", extra_keys={"interval", "cron"},
        window=window,
        schedule=_schedule(popular, "sync.popular", field_default(PopularSettings, "schedule")),
        protect=_opt(popular, "protect", "sync.popular", parse_duration, protect))


def _schedule(item: dict[str, Any], key: str, default: Schedule) -> Schedule:
    if "interval" in item and "cron" in item:
        raise ConfigError(key, "give interval or cron, not both")
    if "cron" in item:
        cron = _string(item["cron"], f"{key}.cron")
        try:
            next(iter(CronSim(cron, datetime.now(UTC))))
        except (CronSimError, StopIteration) as exc:
            raise ConfigError(f"{key}.cron", f"not a cron expression: {exc}") from None
        return Schedule(cron=cron)
    if "interval" in item:
        interval = parse_duration(item["interval"], f"{key}.interval")
        if interval < 1:
            raise ConfigError(f"{key}.interval", "must be at least 1s")
        return Schedule(interval=interval)
    return default


def _platforms(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    platforms = _strings(value, key)
    for i, item in enumerate(platforms):
        if _PLATFORM_RE.fullmatch(item) is None:
            raise ConfigError(f"{key}[{i}]", f"expected os/arch[/variant], got {item!r}")
    return platforms


def _off_peak(value: Any) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    windows = []
    for i, item in enumerate(_strings(value, "sync.off_peak")):
        match = _WINDOW_RE.fullmatch(item)
        hours = (int(match.group(1)), int(match.group(3))) if match else (99, 99)
        if match is None or max(hours) > 24 or max(int(match.group(2)),
                                                   int(match.group(4))) > 59:
            raise ConfigError(f"sync.off_peak[{i}]", f"expected HH:MM-HH:MM (UTC), got {item!r}")
        start = int(match.group(1)) * 60 + int(match.group(2))
        end = int(match.group(3)) * 60 + int(match.group(4))
        windows.append((start, end))
    return tuple(windows)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list of strings")
    return tuple(_string(v, f"{key}[{i}]") for i, v in enumerate(value))


def _regexes(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    patterns = _strings(value, key)
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{key}[{i}]", f"not a regular expression: {exc}") from None
    return patterns


