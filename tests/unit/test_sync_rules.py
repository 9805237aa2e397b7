"""Selection and popularity, with no network: sync rules, their config, decaying counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.cache.manifests import Manifest
from mirror.clock import ManualClock
from mirror.config import TagSet
from mirror.errors import ConfigError
from mirror.oci import OCI_INDEX, Digest
from mirror.sync.popularity import Popularity
from mirror.sync.rules import (
    in_windows,
    next_run,
    parse_version,
    rule_repositories,
    select_tags,
)

PUSHED = ["1.9", "1.25.3", "1.26.0-rc1", "2.0", "latest", "v1.27"]


def _sync(document: dict[str, Any]) -> config.SyncSettings:
    settings = config.parse({"sync": document}, env={})
    assert settings.sync is not None
    return settings.sync


def test_lenient_versions() -> None:
    assert str(parse_version("v1.27")) == "1.27.0"
    assert str(parse_version("1.9")) == "1.9.0"
    assert str(parse_version("2")) == "2.0.0"
    assert str(parse_version("1.26.0-rc1")) == "1.26.0-rc1"
    assert parse_version("latest") is None
    assert parse_version("1.2.3.4") is None


def test_semver_range_picks_exactly_the_right_tags() -> None:
    # npm semantics: a prerelease matches only a range naming a prerelease of its version.
    assert select_tags(TagSet(semver=">=1.25 <2"), PUSHED) == ["v1.27", "1.25.3"]
    assert select_tags(TagSet(semver=">=1.26.0-rc0 <1.27"), PUSHED) == ["1.26.0-rc1"]
    assert select_tags(TagSet(semver="^1.25 || >=2"), PUSHED) == ["2.0", "v1.27", "1.25.3"]


def test_newest_allow_and_deny_combine() -> None:
    assert select_tags(TagSet(newest=2), PUSHED) == ["2.0", "v1.27"]
    assert select_tags(TagSet(allow=(r"^1\.",), deny=("rc",)), PUSHED) == ["1.9", "1.25.3"]
    assert select_tags(TagSet(allow=(r"^v?1\.",), newest=1), PUSHED) == ["v1.27"]
    assert select_tags(TagSet(tags=("latest", "nope")), []) == ["latest", "nope"]


def test_rule_config_and_globs() -> None:
    sync = _sync({"rules": [{"name": "web", "registry": "registry-1.docker.io",
                             "repositories": ["nginx", "myorg/*"],
                             "tags": ["latest", {"semver": ">=1.25 <2", "newest": 3}],
                             "platforms": ["linux/arm64/v8"], "cron": "0 6 * * 1-5",
                             "referrers": True, "protect": "2h"}],
                  "bandwidth": "10MiB", "off_peak": ["22:00-06:00"]})
    rule = sync.rules[0]
    assert rule.registry == "docker.io" and rule.protect == 7200 and rule.referrers
    assert [s.discovers for s in rule.tag_sets] == [False, True]
    assert sync.bandwidth == 10 * 2**20 and sync.off_peak == ((1320, 360),)
    known = ["myorg/a", "myorg/b", "other/c"]
    assert rule_repositories(rule, known, library_prefix=True) == [
        "library/nginx", "myorg/a", "myorg/b"]


@pytest.mark.parametrize(("document", "key"), [
    ({"rules": [{"registry": "quay.io", "repositories": ["a"], "tags": ["x"]}]},
     "sync.rules[0].registry"),
    ({"rules": [{"registry": "docker.io", "repositories": ["a"],
                 "tags": [{"semver": ">=1.x.y <"}]}]}, "sync.rules[0].tags[0].semver"),
    ({"rules": [{"registry": "docker.io", "repositories": ["a"],
                 "tags": [{"allow": ["("]}]}]}, "sync.rules[0].tags[0].allow[0]"),
    ({"rules": [{"registry": "docker.io", "repositories": ["a"], "tags": ["x"],
                 "cron": "61 * * * *"}]}, "sync.rules[0].cron"),
    ({"rules": [{"registry": "docker.io", "repositories": ["a"], "tags": ["x"],
                 "cron": "0 * * * *", "interval": "5m"}]}, "sync.rules[0]"),
    ({"platforms": ["amd64"]}, "sync.platforms[0]"),
    ({"off_peak": ["25:00-01:00"]}, "sync.off_peak[0]"),
    ({"popular": {"top": -1}}, "sync.popular.top"),
    ({"popular": {"per_client": 0}}, "sync.popular.per_client"),
])
def test_bad_sync_config_names_its_key(document: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _sync(document)
    assert caught.value.key == key


def test_schedules_and_windows() -> None:
    monday_5am = 1_764_565_200.0  # 2025-12-01 05:00 UTC, a Monday
    assert next_run(config.Schedule(interval=60), monday_5am) == monday_5am + 60
    assert next_run(config.Schedule(cron="0 6 * * 1-5"), monday_5am) == monday_5am + 3600
    assert in_windows(((1320, 360),), monday_5am)  # 22:00-06:00 wraps midnight
    assert not in_windows(((1320, 360),), monday_5am + 2 * 3600)
    assert in_windows((), monday_5am)


def _index(*arches: str) -> Manifest:
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"digest": f"sha256:{str(i) * 64}", "size": 1, "mediaType": OCI_INDEX,
         "platform": {"os": "linux", "architecture": arch}} for i, arch in enumerate(arches)]}
    data = json.dumps(document).encode()
    return Manifest(Digest.of(data), data, OCI_INDEX)


def test_popularity_counts_decay_and_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "sync" / "popularity.json"
    popularity = Popularity(path, window=3600, max_entries=2, clock=clock)
    index = _index("amd64", "arm64")
    for client in range(5):
        popularity.tag_pulled("docker.io", "library/a", "1", index, f"10.0.0.{client}")
    popularity.manifest_pulled("sha256:" + "1" * 64)  # arm64 child
    popularity.manifest_pulled("sha256:" + "9" * 64)  # not a known child: not counted
    for client in range(3):
        popularity.tag_pulled("docker.io", "library/b", "1", index, f"10.0.0.{client}")
    popularity.tag_pulled("docker.io", "library/c", "1", index)
    assert [p.repository for p in popularity.top_tags(3)] == ["library/a", "library/b", "library/c"]
    assert popularity.platforms("docker.io", "library/a") == ["linux/arm64"]
    clock.advance(3600)  # one window: every score is e^-1 of what it was
    assert round(popularity.top_tags(1)[0].score, 3) == round(5 / 2.718281828, 3)

    popularity.prune()  # bounded to 2 tags: c, the weakest, goes
    popularity.save(popularity.snapshot())
    again = Popularity(path, window=3600, max_entries=2, clock=clock)
    again.load()
    assert [p.repository for p in again.top_tags(5)] == ["library/a", "library/b"]
    assert again.platforms("docker.io", "library/a") == ["linux/arm64"]
    assert not list(path.parent.glob(".*.tmp"))


def test_counting_a_pull_of_an_odd_index_never_fails() -> None:
    popularity = Popularity(None)
    for n, data in enumerate((b"not json", b'{"manifests": "nope"}',
                              b'{"manifests": [1, {"digest": 2}]}')):
        popularity.tag_pulled("r", "a", "t", Manifest(Digest.of(data), data, OCI_INDEX),
                              f"client-{n}")
    assert round(popularity.top_tags(1)[0].score) == 3  # (the real clock moved a little)
