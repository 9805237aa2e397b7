"""A tag upstream does not have is remembered missing for ``cache.negative_ttl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror.cache.tags import TagStore
from tests.support.fake import FakeRegistry


async def test_a_missing_tag_is_asked_upstream_once_per_negative_ttl(
        make_mirror: Any, fake: FakeRegistry) -> None:
    mirror = await make_mirror(cache={"negative_ttl": "1h"})
    for _ in range(20):
        resp = await mirror.get("/v2/app/manifests/nope")
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake.count("GET", "/manifests/nope") == 1


async def test_a_missing_tag_is_remembered_for_every_worker(tmp_path: Path) -> None:
    one, two = TagStore(tmp_path / "tags"), TagStore(tmp_path / "tags")
    await one.open()
    await two.open()
    await one.put_missing("fake.test/app:nope", 60)
    assert await two.missing("fake.test/app:nope")
    assert not await two.missing("fake.test/app:other")
    await one.put_missing("fake.test/app:gone", 0)  # negative_ttl 0: nothing remembered
    assert not await two.missing("fake.test/app:gone")
    await one.close()
    await two.close()
