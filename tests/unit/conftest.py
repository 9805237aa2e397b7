"""Fixtures for in-process tests: a fake upstream and the mirror app in one loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror import config
from mirror.clock import SYSTEM, Clock, ManualClock
from mirror.server.app import create_app
from tests.support.dialects import start_mirror, start_rig
from tests.support.fake import FakeRegistry

MirrorFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def clock() -> ManualClock:
    """Time that moves only when a test says so (pass it to ``make_mirror``)."""
    return ManualClock()


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def upstream(fake: FakeRegistry, aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(fake.app())
    return server


def mirror_settings(storage: Path, upstream_url: str, **overrides: Any) -> config.Settings:
    """Settings for a mirror in front of one test upstream named ``fake.test``."""
    upstream: dict[str, Any] = {
        "name": "fake.test", "url": upstream_url, "default": True, "aliases": ["fake"],
        "retries": 1, "connect_timeout": "2s", "read_timeout": "2s", "max_retry_wait": "1s",
    }
    upstream.update(overrides.pop("upstream", {}))
    document: dict[str, Any] = {
        "version": 1, "listen": "127.0.0.1:5000",
        "storage": {"path": str(storage), **overrides.pop("storage_options", {})},
        "upstreams": [upstream], "cache": {"tag_ttl": "5m", **overrides.pop("cache", {})},
        # a test that ends with a download under way need not wait for it
        "server": {"shutdown_grace": "0s", **overrides.pop("server", {})},
        **overrides,
    }
    return config.parse(document, env={})


@pytest.fixture
def make_mirror(tmp_path: Path, upstream: TestServer, aiohttp_client: Any) -> MirrorFactory:
    """Start a mirror app in front of ``upstream``; keyword args override settings."""

    async def start(clock: Clock = SYSTEM, **overrides: Any) -> TestClient[Any, Any]:
        url = str(upstream.make_url("")).rstrip("/")
        if "storage" in overrides:  # storage={...} adds to (or replaces) the default path
            overrides["storage_options"] = overrides.pop("storage")
        settings = mirror_settings(tmp_path / "cache", url, **overrides)
        client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, clock=clock))
        return client

    return start


@pytest.fixture
async def mirror(make_mirror: MirrorFactory) -> TestClient[Any, Any]:
    return await make_mirror()


def cache_files(root: Path) -> list[Path]:
    """Every file under the cache's content and temp folders."""
    return sorted(p for sub in ("blobs", "manifests", "tmp")
                  for p in (root / sub).rglob("*") if p.is_file())


@pytest.fixture
def rig(aiohttp_server: Any) -> Any:
    """Start a fake registry of one auth dialect (``tests.support.dialects``)."""
    return partial(start_rig, aiohttp_server)


@pytest.fixture
def mirror_for(tmp_path: Path, aiohttp_client: Any) -> Any:
    """Start a mirror app in front of a dialect rig."""
    return partial(start_mirror, aiohttp_client, tmp_path)
