"""The pull service with no HTTP server of the mirror: a whole image pulled by a caller that
is not a handler, through a chain of sources [in-memory store, fake upstream]."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from mirror.cache.blobs import CachedBlob
from mirror.node import Node
from mirror.oci import Digest, parse_manifest
from mirror.pull import BlobFlight, Repo
from mirror.sources import StoreSource
from mirror.storage.memory import MemoryStore
from tests.support.fake import FakeRegistry
from tests.unit.conftest import mirror_settings

REPO = Repo("fake.test", "app")
NodeFactory = Callable[..., Any]


def _rejected(kind: str) -> float:
    return REGISTRY.get_sample_value("mirror_source_fills_total",
                                     {"source": kind, "result": "rejected"}) or 0.0


@pytest.fixture
async def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def node(tmp_path: Path, upstream: TestServer,
               memory: MemoryStore) -> AsyncIterator[Node]:
    url = str(upstream.make_url("")).rstrip("/")
    settings = mirror_settings(tmp_path / "cache", url)
    node = Node(settings, extra_sources=[StoreSource(memory, "memory")])
    await node.start()
    yield node
    await node.stop()


async def _blob_bytes(node: Node, digest: Digest) -> bytes:
    blob = await node.pull.fetch_blob(REPO, digest)
    assert isinstance(blob, CachedBlob)
    if blob.data is not None:
        return blob.data
    return node.store.blob_path(digest).read_bytes()


async def _pull_image(node: Node, tag: str) -> dict[str, bytes]:
    """Index -> the amd64 manifest -> config -> layers, every digest checked."""
    pulled: dict[str, bytes] = {}
    index = (await node.pull.manifest(REPO, tag)).manifest
    pulled[str(index.digest)] = index.data
    child = next(m for m in parse_manifest(index.data)["manifests"]
                 if m["platform"]["architecture"] == "amd64")
    image = (await node.pull.manifest(REPO, Digest.parse(child["digest"]))).manifest
    assert image.digest.matches(image.data)
    pulled[str(image.digest)] = image.data
    document = json.loads(image.data)
    for descriptor in [document["config"], *document["layers"]]:
        digest = Digest.parse(descriptor["digest"])
        data = await _blob_bytes(node, digest)
        assert digest.matches(data) and len(data) == descriptor["size"]
        pulled[str(digest)] = data
    return pulled


def _multi_arch(fake: FakeRegistry, layers: list[bytes]) -> tuple[str, bytes]:
    amd, amd_body = fake.add_image("app", None, layers, arch="amd64")
    arm, arm_body = fake.add_image("app", None, [b"arm-only"], arch="arm64")
    fake.add_index("app", "v1", [(amd, amd_body, "amd64"), (arm, arm_body, "arm64")])
    return amd, amd_body


async def test_a_whole_image_through_the_service_with_no_http_server(
        node: Node, fake: FakeRegistry) -> None:
    _multi_arch(fake, [b"layer-one" * 1000, b"layer-two"])
    pulled = await _pull_image(node, "v1")
    assert len(pulled) == 5  # index, manifest, config, two layers
    blob_gets = fake.count("GET", "/blobs/")
    again = await _pull_image(node, "v1")
    assert again == pulled
    assert fake.count("GET", "/blobs/") == blob_gets  # all from the cache now


async def test_a_source_that_has_the_blob_spares_the_upstream(
        node: Node, fake: FakeRegistry, memory: MemoryStore) -> None:
    layer = b"already-in-the-region" * 500
    _multi_arch(fake, [layer])
    memory.blobs[Digest.of(layer)] = layer
    await _pull_image(node, "v1")
    assert fake.count("GET", f"/blobs/{Digest.of(layer)}") == 0
    assert fake.count("GET", "/blobs/") == 1  # the config only


async def test_a_source_with_wrong_bytes_is_skipped_and_the_pull_succeeds(
        node: Node, fake: FakeRegistry, memory: MemoryStore) -> None:
    layer = b"the-true-layer" * 700
    _multi_arch(fake, [layer])
    digest = Digest.of(layer)
    memory.blobs[digest] = b"x" * len(layer)  # same size, wrong bytes
    rejected = _rejected("memory")
    pulled = await _pull_image(node, "v1")
    assert pulled[str(digest)] == layer
    assert _rejected("memory") - rejected == 1
    assert fake.count("GET", f"/blobs/{digest}") == 1
    # Skipped for that digest from now on: a second node-wide miss goes straight upstream.
    await node.evictor.evict_bytes(10**9, "test")
    node.blobs.clear_memory()
    answer = await node.pull.blob(REPO, digest)
    assert isinstance(answer, BlobFlight)
    await answer.fill.wait_done()
    assert _rejected("memory") - rejected == 1
    assert answer.fill.source == "upstream"


async def test_a_manifest_with_wrong_bytes_in_a_source_is_skipped(
        node: Node, fake: FakeRegistry, memory: MemoryStore) -> None:
    amd, amd_body = _multi_arch(fake, [b"layer"])
    memory.manifests[Digest.parse(amd)] = (b'{"wrong": true}', "application/json")
    rejected = _rejected("memory")
    found = await node.pull.manifest(REPO, Digest.parse(amd))
    assert found.manifest.data == amd_body
    assert _rejected("memory") - rejected == 1
