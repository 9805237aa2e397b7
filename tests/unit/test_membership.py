"""Isolation by registry: the membership rules, the facts on disk, and the app on top
(two upstreams, one with content the other does not hold)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.cache.membership import Membership, ensure_member
from mirror.errors import BlobUnknown, ManifestUnknown
from mirror.oci import Digest
from mirror.pull import Repo
from mirror.server.app import create_app
from mirror.server.state import NODE
from mirror.sources.upstream import UpstreamSource
from tests.support.fake import FakeRegistry
from tests.unit.conftest import mirror_settings

D1 = "sha256:" + hashlib.sha256(b"one").hexdigest()
D2 = "sha256:" + hashlib.sha256(b"two").hexdigest()


@dataclass
class _Answer:
    status: int


@dataclass
class _Upstream:
    """A registry client that answers every HEAD with ``status`` and notes it."""

    name: str
    status: int = 404
    asked: list[tuple[str, str, str]] = field(default_factory=list)

    @asynccontextmanager
    async def request(self, method: str, repository: str, suffix: str, *,
                      headers: dict[str, str] | None = None,
                      params: dict[str, str] | None = None,
                      background: bool = False) -> AsyncIterator[_Answer]:
        self.asked.append((method, repository, suffix))
        yield _Answer(self.status)


def _source(client: _Upstream) -> UpstreamSource:
    """The upstream source over the fake client: its typed API maps the statuses."""
    return UpstreamSource(client)  # type: ignore[arg-type]


@pytest.fixture
def facts(tmp_path: Path) -> Membership:
    membership = Membership(tmp_path / "membership.db")
    membership.open()
    return membership


async def test_facts_are_per_registry_and_repository_and_survive_reopening(
        facts: Membership, tmp_path: Path) -> None:
    await facts.record("quay.io", "team/app", [D1])
    assert await facts.known("quay.io", "team/app", D1)
    assert not await facts.known("quay.io", "team/other", D1)
    assert await facts.known_in("quay.io", D1)
    assert not await facts.known_in("docker.io", D1)
    facts.close()
    again = Membership(tmp_path / "membership.db")  # a restart, or another worker
    again.open()
    assert await again.known("quay.io", "team/app", D1)
    assert await again.known_in("quay.io", D1)
    assert not await again.known_in("docker.io", D1)


async def test_content_of_one_registry_is_refused_under_another_unless_upstream_confirms(
        facts: Membership) -> None:
    await facts.record("quay.io", "team/app", [D1])
    docker = _Upstream("docker.io", status=404)
    with pytest.raises(BlobUnknown):
        await ensure_member(facts, _source(docker), "library/small", Digest.parse(D1),
                            kind="blob", private=False)
    with pytest.raises(ManifestUnknown):
        await ensure_member(facts, _source(docker), "library/small", Digest.parse(D1),
                            kind="manifest", private=False)
    assert docker.asked == [("HEAD", "library/small", f"blobs/{D1}"),
                            ("HEAD", "library/small", f"manifests/{D1}")]
    assert not await facts.known_in("docker.io", D1)  # a refusal teaches nothing
    for _ in range(5):  # ... but is remembered (negative_ttl): asking again costs nothing
        with pytest.raises(BlobUnknown):
            await ensure_member(facts, _source(docker), "library/small",
                                Digest.parse(D1), kind="blob", private=False)
    assert len(docker.asked) == 2
    docker.status = 200  # docker.io really holds it too: confirmed once, then known
    await ensure_member(facts, _source(docker), "library/big", Digest.parse(D1),
                        kind="blob", private=False)
    await ensure_member(facts, _source(docker), "library/big", Digest.parse(D1),
                        kind="blob", private=False)
    assert len(docker.asked) == 3
    assert await facts.known("docker.io", "library/big", D1)


async def test_a_registry_with_credentials_wants_the_repository_not_just_the_registry(
        facts: Membership) -> None:
    await facts.record("quay.io", "team/app", [D1])
    quay = _Upstream("quay.io", status=404)
    await ensure_member(facts, _source(quay), "team/app", Digest.parse(D1),
                        kind="blob", private=True)
    assert quay.asked == []  # known there
    with pytest.raises(BlobUnknown):  # another private repository of the same registry
        await ensure_member(facts, _source(quay), "team/secret", Digest.parse(D1),
                            kind="blob", private=True)
    assert quay.asked == [("HEAD", "team/secret", f"blobs/{D1}")]


async def test_a_public_registry_serves_what_any_of_its_repositories_holds(
        facts: Membership) -> None:
    await facts.record("docker.io", "library/a", [D2])
    docker = _Upstream("docker.io", status=404)
    await ensure_member(facts, _source(docker), "library/b", Digest.parse(D2),
                        kind="blob", private=False)
    assert docker.asked == []


async def test_a_manifest_served_from_a_repository_vouches_for_what_it_references(
        facts: Membership) -> None:
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": D1, "size": 3},
                           "layers": [{"digest": D2, "size": 3}]}).encode()
    digest = Digest.of(manifest)
    await facts.record_manifest("quay.io", "team/app", digest, manifest)
    for d in (D1, D2, str(digest)):
        assert await facts.known("quay.io", "team/app", d)
        assert not await facts.known_in("docker.io", d)


# --- the app: two upstreams, ``fake.test`` (the content) and ``other.test`` (none of it) ---

async def _two_registries(tmp_path: Path, upstream: TestServer, aiohttp_server: Any,
                          aiohttp_client: Any, **overrides: Any
                          ) -> tuple[TestClient[Any, Any], FakeRegistry]:
    other = FakeRegistry()
    other_server: TestServer = await aiohttp_server(other.app())
    first = str(upstream.make_url("")).rstrip("/")
    second = str(other_server.make_url("")).rstrip("/")
    password = tmp_path / "fake.pw"
    password.write_text("a-password-for-fake")
    # fake.test with credentials: the mirror may hold private content, so isolation is on
    # (and the lean path too: no client auth)
    settings = mirror_settings(tmp_path / "cache", first, upstreams=[
        {"name": "fake.test", "url": first, "default": True, "username": "bot",
         "password_file": str(password)},
        {"name": "other.test", "url": second}], **overrides)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client, other


async def test_cached_content_is_not_served_under_a_registry_that_does_not_hold_it(
        tmp_path: Path, fake: FakeRegistry, upstream: TestServer, aiohttp_server: Any,
        aiohttp_client: Any) -> None:
    mirror, other = await _two_registries(tmp_path, upstream, aiohttp_server, aiohttp_client)
    digest, body = fake.add_image("app", "v1", [b"private-layer"])
    config = json.loads(body)["config"]["digest"]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    assert (await mirror.get("/v2/app/manifests/v1", headers=accept)).status == 200
    for _ in range(3):  # served under fake.test, and kept by the lean path
        assert (await mirror.get(f"/v2/app/blobs/{config}")).status == 200
        assert (await mirror.get(f"/v2/app/manifests/{digest}", headers=accept)).status == 200
    for method in ("GET", "HEAD"):
        for path in (f"/v2/app/blobs/{config}?ns=other.test",
                     f"/v2/other.test/app/blobs/{config}",
                     f"/v2/other.test/app/manifests/{digest}"):
            resp = await mirror.request(method, path, headers=accept)
            assert resp.status == 404, (method, path)
    asked = [s.method for s in other.requests]
    assert asked and set(asked) == {"HEAD"}  # asked, never fetched from
    # warming and export pull through the same service: refused the same way
    pull = mirror.server.app[NODE].pull
    with pytest.raises(BlobUnknown):
        await pull.fetch_blob(Repo("other.test", "app"), Digest.parse(config))
    with pytest.raises(ManifestUnknown):
        await pull.manifest(Repo("other.test", "app"), digest, background=True)
    # content other.test really holds too (in a repository not refused just now): one
    # HEAD confirms it, the one copy is served
    other.blobs[config] = fake.blobs[config]
    before = len(other.requests)
    for _ in range(3):
        resp = await mirror.get(f"/v2/other.test/lib/app/blobs/{config}")
        assert resp.status == 200 and await resp.read() == fake.blobs[config]
    assert [s.method for s in other.requests[before:]] == ["HEAD"]
