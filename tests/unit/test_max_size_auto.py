"""``storage.max_size: auto`` (the default): a share of the filesystem, resolved at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror import config
from mirror.errors import ConfigError
from mirror.server.state import NODE

GiB = 2**30


class FakeDisk:
    """What ``os.statvfs`` says of a filesystem of ``size`` bytes with ``free`` available."""

    def __init__(self, size: int, free: int) -> None:
        self.f_frsize = 4096
        self.f_blocks = size // 4096
        self.f_bavail = free // 4096


def _storage(tmp_path: Path, **storage: Any) -> config.StorageSettings:
    return config.parse({"storage": {"path": str(tmp_path), **storage}}, env={}).storage


def _resolve(storage: config.StorageSettings, disk: FakeDisk, held: int = 0) -> int | None:
    return config.resolve_max_size(storage, held, statvfs=lambda _p: disk).max_size


def test_a_config_without_max_size_caps_at_80_percent_of_the_filesystem(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    assert storage.max_size_auto and storage.max_size is None
    assert _resolve(storage, FakeDisk(size=100 * GiB, free=90 * GiB)) == 80 * GiB
    assert _resolve(_storage(tmp_path, max_size="auto"), FakeDisk(100 * GiB, 90 * GiB)) \
        == 80 * GiB


def test_auto_never_takes_more_than_free_space_plus_what_the_cache_holds(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    # a disk shared with other data: 30 GiB free, and the cache holds 10 GiB already
    assert _resolve(storage, FakeDisk(size=100 * GiB, free=30 * GiB), held=10 * GiB) == 40 * GiB
    # the cache filled most of the disk itself: its own bytes count as room
    assert _resolve(storage, FakeDisk(size=100 * GiB, free=5 * GiB), held=85 * GiB) == 80 * GiB


def test_a_number_is_kept_and_none_means_no_cap_on_purpose(tmp_path: Path) -> None:
    disk = FakeDisk(size=100 * GiB, free=1 * GiB)
    assert _resolve(_storage(tmp_path, max_size="50GiB"), disk) == 50 * GiB
    for none in ("none", "None", None):
        storage = _storage(tmp_path, max_size=none)
        assert not storage.max_size_auto and _resolve(storage, disk) is None


def test_the_no_config_default_is_auto_too() -> None:
    assert config.default_settings().storage.max_size_auto


@pytest.mark.parametrize("bad", ["lots", 0, "0GiB", "automatic", True])
def test_bad_max_size_names_its_key_and_the_choices(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError) as error:
        _storage(tmp_path, max_size=bad)
    assert error.value.key == "storage.max_size"


def test_an_unreadable_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    def failing(_path: Path) -> os.statvfs_result:
        raise OSError(2, "No such file or directory")

    with pytest.raises(ConfigError) as error:
        config.resolve_max_size(_storage(tmp_path), 0, statvfs=failing)
    assert error.value.key == "storage.max_size" and "auto" in str(error.value)


async def test_the_node_resolves_auto_at_start_and_shows_it(
        make_mirror: Any, tmp_path: Path) -> None:
    client: TestClient[Any, Any] = await make_mirror(storage={"path": str(tmp_path / "c")})
    node = client.app[NODE]
    disk = os.statvfs(tmp_path)
    expected = min(int(disk.f_blocks * disk.f_frsize * 0.8), disk.f_bavail * disk.f_frsize)
    assert node.settings.storage.max_size_auto
    # the disk is shared: its free space moves while the test runs
    assert abs(node.settings.storage.max_size - expected) < 64 * 2**20
    page = await (await client.get("/")).text()
    assert "no limit" not in page
