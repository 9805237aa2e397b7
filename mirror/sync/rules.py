"""Selection: which tags of which repositories a rule keeps warm, and for which platforms.

Selection is pure (no I/O): the caller reads tag lists (only for tag sets that need
discovery) and hands them in. The model is regsync's: inside a tag set ``allow``,
``deny``, ``semver`` and ``newest`` must all hold (AND); the sets of a rule add up (OR).

Tags are read as versions leniently: ``v1.27``, ``1.9`` and ``2`` are 1.27.0, 1.9.0
and 2.0.0; ``1.26.0-rc1`` and ``1.25-alpine`` are prereleases, which an npm range
only matches when it names a prerelease of the same version itself (``>=1.26.0-rc0``).
Anything else (``latest``, ``1.2.3.4``) is not a version: a set with ``semver`` or
``newest`` never selects it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache

import semantic_version
from cronsim import CronSim

from mirror.config import Schedule, SyncRule, TagSet

_VERSION_RE = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z][0-9A-Za-z.-]*))?")
_GLOB_CHARS = frozenset("*?[")


def parse_version(tag: str) -> semantic_version.Version | None:
    """The version a tag names, leniently (``v1.2`` is 1.2.0), or ``None``."""
    match = _VERSION_RE.fullmatch(tag)
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    prerelease = tuple(pre.split(".")) if pre else ()
    if any(not part for part in prerelease):
        return None
    return semantic_version.Version(major=int(major), minor=int(minor or 0),
                                    patch=int(patch or 0), prerelease=prerelease)


@lru_cache(maxsize=256)
def _spec(text: str) -> semantic_version.NpmSpec:
    return semantic_version.NpmSpec(text)


@lru_cache(maxsize=1024)
def _regex(text: str) -> re.Pattern[str]:
    return re.compile(text)


def select_tags(tag_set: TagSet, available: Iterable[str]) -> list[str]:
    """The tags of ``available`` that ``tag_set`` selects, newest version first when versions
    are involved (else in the order given).

    A set of exact ``tags`` ignores ``available``: its tags are watched whether or not they
    exist yet (a missing one is reported when it is checked).
    """
    if not tag_set.discovers:
        return list(tag_set.tags)
    chosen = [t for t in available
              if (not tag_set.allow or any(_regex(p).search(t) for p in tag_set.allow))
              and not any(_regex(p).search(t) for p in tag_set.deny)]
    if not (tag_set.semver or tag_set.newest):
        return chosen
    versions = [(v, t) for t in chosen if (v := parse_version(t)) is not None]
    if tag_set.semver:
        spec = _spec(tag_set.semver)
        versions = [(v, t) for v, t in versions if spec.match(v)]
    versions.sort(key=lambda item: (item[0], item[1]), reverse=True)
    if tag_set.newest:
        versions = versions[:tag_set.newest]
    return [t for _, t in versions]


def rule_tags(rule: SyncRule, available: Iterable[str] | None) -> list[str]:
    """Every tag a rule selects in one repository (sets OR-ed, each tag once)."""
    tags = list(available or ())
    found: dict[str, None] = {}
    for tag_set in rule.tag_sets:
        found.update(dict.fromkeys(select_tags(tag_set, tags)))
    return list(found)


def needs_tag_list(rule: SyncRule) -> bool:
    """Whether a rule reads tag lists upstream (listing tags costs rate limit)."""
    return any(s.discovers for s in rule.tag_sets)


def is_glob(pattern: str) -> bool:
    """Whether a repository pattern is a glob (matched against repositories seen here)."""
    return bool(_GLOB_CHARS & set(pattern))


def normalise_repository(name: str, library_prefix: bool) -> str:
    """``nginx`` is ``library/nginx`` on Docker Hub, as a client's pull would be routed."""
    return f"library/{name}" if library_prefix and "/" not in name else name


def rule_repositories(rule: SyncRule, known: Iterable[str], library_prefix: bool) -> list[str]:
    """The repositories a rule names: exact names as given, globs over ``known`` ones."""
    patterns = [normalise_repository(p, library_prefix) for p in rule.repositories]
    found: dict[str, None] = {}
    known = sorted(set(known))
    for pattern in patterns:
        if is_glob(pattern):
            found.update(dict.fromkeys(r for r in known if fnmatch.fnmatchcase(r, pattern)))
        else:
            found[pattern] = None
    return list(found)


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        return cls(parts[0], parts[1] if len(parts) > 1 else "",
                   parts[2] if len(parts) > 2 else None)

    @classmethod
    def of(cls, descriptor: Mapping[str, object]) -> Platform | None:
        """The platform of an index entry, or ``None`` when it names none."""
        platform = descriptor.get("platform")
        if not isinstance(platform, dict):
            return None
        os_, arch = platform.get("os"), platform.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        variant = platform.get("variant")
        return cls(os_, arch, variant if isinstance(variant, str) else None)

    def matches(self, wanted: Platform) -> bool:
        """Whether this (an image's platform) is what ``wanted`` asks for; no variant asked
        means any variant."""
        return self.os == wanted.os and self.architecture == wanted.architecture and (
            wanted.variant is None or self.variant == wanted.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def rule_platforms(rule_platforms: tuple[str, ...], served: list[str],
                   own: tuple[str, ...]) -> tuple[str, ...]:
    """The platforms to warm: the rule's, else those served for the repository, else ours."""
    return rule_platforms or tuple(served) or own


def next_run(schedule: Schedule, after: float) -> float:
    """When a schedule next fires after ``after`` (seconds since the epoch)."""
    if schedule.cron:
        start = datetime.fromtimestamp(after, UTC)
        return next(iter(CronSim(schedule.cron, start))).timestamp()
    return after + (schedule.interval or 300.0)


def in_windows(windows: tuple[tuple[int, int], ...], now: float) -> bool:
    """Whether ``now`` is inside one of the off-peak windows (minutes of the UTC day); no
    windows means always."""
    if not windows:
        return True
    moment = datetime.fromtimestamp(now, UTC)
    minute = moment.hour * 60 + moment.minute
    return any((start <= minute < end) if start <= end else (minute >= start or minute < end)
               for start, end in windows)


def rule_fingerprint(rule: SyncRule) -> str:
    """A short hash of everything a rule says: two configs with the same fingerprint for a
    rule name select the same images (``mirror sync`` compares its file with the server)."""
    text = json.dumps(asdict(rule), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
