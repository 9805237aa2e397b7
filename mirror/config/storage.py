"""The ``storage`` section: the local cache and its byte budget, and the S3 tier."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from mirror.config.settings import S3Settings, StorageSettings
from mirror.config.values import (
    _mapping,
    _only_keys,
    _opt,
    _secret,
    _string,
    parse_size,
    read_section,
    section_keys,
)
from mirror.errors import ConfigError


def _storage(value: Any, env: Mapping[str, str], base: Path) -> StorageSettings:
    storage = _mapping(value, "storage")
    _only_keys(storage, "storage", section_keys(StorageSettings))  # before those read here
    path = Path(_string(storage.get("path", "./mirror-data"), "storage.path"))
    s3 = _s3(storage["s3"], env, base) if storage.get("s3") is not None else None
    max_size, auto = _max_size(storage.get("max_size", "auto"))
    settings = read_section(StorageSettings, storage, "storage",
                            path=path if path.is_absolute() else base / path, s3=s3,
                            max_size=max_size, max_size_auto=auto)
    low, high = settings.low_watermark, settings.high_watermark
    if low >= high:
        raise ConfigError("storage.low_watermark",
                          f"must be below storage.high_watermark ({low} >= {high})")
    if settings.relay_window < 64 * 2**10:
        raise ConfigError("storage.relay_window", "must be at least 64KiB")
    return settings


def _max_size(value: Any) -> tuple[int | None, bool]:
    """``(bytes, auto)`` from ``auto`` (the default), ``none`` (no cap, on purpose) or a size."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None, True
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None, False
    size = parse_size(value, "storage.max_size")
    if size == 0:
        raise ConfigError("storage.max_size", "must be more than 0 (none: no limit; auto: "
                          f"{AUTO_SHARE:.0%} of the filesystem)")
    return size, False


#: ``max_size: auto`` caps the cache at this share of the filesystem that holds it.
AUTO_SHARE = 0.8


class DiskFigures(Protocol):
    """What :func:`os.statvfs` returns that :func:`resolve_max_size` reads."""

    @property
    def f_frsize(self) -> int: ...
    @property
    def f_blocks(self) -> int: ...
    @property
    def f_bavail(self) -> int: ...


def auto_max_size(disk: DiskFigures, held: int) -> int:
    """The cap ``max_size: auto`` chooses: :data:`AUTO_SHARE` of the filesystem's size,
    never more than its free space (for this user) plus what the cache already holds.

    Args:
        disk: the filesystem's figures (``os.statvfs(storage.path)``).
        held: bytes the cache holds already (they count as room it may keep).
    """
    size = disk.f_blocks * disk.f_frsize
    free = disk.f_bavail * disk.f_frsize
    return max(1, min(int(size * AUTO_SHARE), free + held))


def resolve_max_size(storage: StorageSettings, held: int,
                     statvfs: Callable[[Path], DiskFigures] = os.statvfs) -> StorageSettings:
    """The settings with ``max_size: auto`` turned into bytes (others are returned as they are).

    Args:
        storage: the parsed ``storage`` section.
        held: bytes the cache holds already.
        statvfs: reads the filesystem's figures (tests pass a fake).

    Raises:
        ConfigError: the filesystem's figures cannot be read.
    """
    if not storage.max_size_auto or storage.max_size is not None:
        return storage
    try:
        disk = statvfs(storage.path)
    except OSError as exc:
        raise ConfigError("storage.max_size", f"auto: cannot read the size of the filesystem "
                          f"that holds {storage.path}: {exc.strerror}") from None
    return replace(storage, max_size=auto_max_size(disk, held))


_S3_KEYS = section_keys(S3Settings)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


def _s3(value: Any, env: Mapping[str, str], base: Path) -> S3Settings:
    key = "storage.s3"
    item = _mapping(value, key)
    for plain in ("access_key_id", "secret_access_key"):
        if plain in item:
            raise ConfigError(f"{key}.{plain}", f"never put credentials in the file: use "
                              f"{plain}_env or {plain}_file")
    _only_keys(item, key, _S3_KEYS)
    if "bucket" not in item:
        raise ConfigError(f"{key}.bucket", "required: the bucket that holds the shared tier")
    bucket = _string(item["bucket"], f"{key}.bucket")
    if _BUCKET_RE.fullmatch(bucket) is None:
        raise ConfigError(f"{key}.bucket", f"not an S3 bucket name (3-63 of a-z, 0-9, '.', "
                          f"'-'): {bucket!r}")
    prefix = _opt(item, "prefix", key, _string, "").strip("/")
    if _PREFIX_RE.fullmatch(prefix) is None or ".." in prefix.split("/"):
        raise ConfigError(f"{key}.prefix", f"not a plain key prefix: {prefix!r}")
    key_id = _secret(item, key, "access_key_id", env, base)
    secret = _secret(item, key, "secret_access_key", env, base)
    if (key_id is None) != (secret is None):
        raise ConfigError(key, "give both access_key_id_* and secret_access_key_*, or neither "
                          "(the standard AWS chain)")
    settings = read_section(S3Settings, item, key, bucket=bucket, prefix=prefix,
                            access_key_id=key_id, secret_access_key=secret)
    if not 5 * 2**20 <= settings.part_size <= 5 * 2**30:
        raise ConfigError(f"{key}.part_size", "must be between 5MiB and 5GiB (S3's limits)")
    if not 1 <= settings.redirect_ttl <= 7 * 86400:
        raise ConfigError(f"{key}.redirect_ttl", "must be between 1s and 7d (S3's limit)")
    return settings
