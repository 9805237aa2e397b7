"""The one coalescing protocol: every implementation (this process; the node's worker
processes, through claims) passes the same conformance tests, through the fetcher and
the manifest cache built with it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mirror.cache.manifests import ManifestCache
from mirror.cache.tags import TagStore
from mirror.config import CacheSettings
from mirror.errors import FillError
from mirror.fetch import Coalescer, Fetcher, Fill, LocalCoalescer
from mirror.fetch.claim import ClaimCoalescer, Claims
from mirror.oci import OCI_MANIFEST, Digest
from mirror.sources import SourceChain, UpstreamSource
from mirror.storage.base import BodyResponse
from mirror.storage.filesystem import FilesystemStore

CHUNK = 64 * 1024
Make = Callable[[Path], Coalescer]
KINDS: dict[str, Make] = {
    "local": lambda _root: LocalCoalescer(),
    "claims": lambda root: ClaimCoalescer(Claims(root / "tmp" / "claims")),
}


@pytest.fixture(params=sorted(KINDS))
def make(request: pytest.FixtureRequest) -> Make:
    """Each implementation of the protocol in turn."""
    return KINDS[request.param]


class _Body:
    """A blob from ``offset``, one chunk per read, held until ``gate`` opens."""

    def __init__(self, data: bytes, offset: int, gate: asyncio.Event) -> None:
        self.status = 200 if offset == 0 else 206
        self.content_length = len(data) - offset
        self.headers: dict[str, str] = {}
        self._rest = data[offset:]
        self._gate = gate
        self.content = self

    async def read(self, n: int = -1) -> bytes:
        await self._gate.wait()
        piece, self._rest = self._rest[:CHUNK], self._rest[CHUNK:]
        return piece

    def read_nowait(self, n: int = -1) -> bytes:
        return b""


class _Blobs:
    """An opener of one blob that counts the downloads it starts."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gate = asyncio.Event()
        self.offsets: list[int] = []

    @asynccontextmanager
    async def __call__(self, offset: int) -> AsyncIterator[BodyResponse]:
        self.offsets.append(offset)
        yield _Body(self.data, offset, self.gate)  # type: ignore[misc]


def _fetcher(root: Path, index: int, coalescer: Coalescer) -> Fetcher:
    store = FilesystemStore(root, temp_folder=f"w{index}")
    store.open()
    return Fetcher(store, CHUNK, coalescer=coalescer)


async def _read(fill: Fill, size: int) -> bytes:
    """What a client reads, after the headers, as the handlers do."""
    assert await fill.wait_size() == size
    return b"".join([piece async for piece in fill.read(0, size, CHUNK)])


async def test_one_name_is_held_by_one_holder_at_a_time(tmp_path: Path, make: Make) -> None:
    coalescer = make(tmp_path)
    inside: list[str] = []
    most = 0
    release, both_in = asyncio.Event(), asyncio.Event()

    async def hold(name: str) -> None:
        nonlocal most
        async with coalescer.exclusive(name):
            inside.append(name)
            most = max(most, inside.count("tag-a"))
            if sorted(inside) == ["tag-a", "tag-b"]:
                both_in.set()
            await release.wait()
            inside.remove(name)

    tasks = [asyncio.create_task(hold(n)) for n in ("tag-a", "tag-a", "tag-b")]
    await both_in.wait()  # another name is not held up
    release.set()
    await asyncio.gather(*tasks)
    assert most == 1 and inside == []
    async with coalescer.exclusive("tag-a"):  # free again
        pass


async def test_one_download_per_digest_for_every_request_of_a_fetcher(
        tmp_path: Path, make: Make) -> None:
    data = os.urandom(8 * CHUNK)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    blobs = _Blobs(data)
    fetcher = _fetcher(tmp_path, 0, make(tmp_path))
    started = [await fetcher.start(digest, blobs, "r") for _ in range(5)]
    assert [joined for _, joined in started] == [False, True, True, True, True]
    assert len({id(fill) for fill, _ in started}) == 1
    blobs.gate.set()
    assert await _read(started[0][0], len(data)) == data
    await started[0][0].wait_done()
    assert blobs.offsets == [0]
    assert fetcher.store.blob_path(digest).read_bytes() == data
    again = await fetcher.coalescer.claim(digest)  # the claim was given back
    assert again is not None
    await asyncio.to_thread(again.release)
    seen = await fetcher.coalescer.look(digest, fetcher.store.blob_path(digest))
    assert seen.published == len(data)
    await fetcher.close()


async def test_a_failed_fill_gives_its_claim_back(tmp_path: Path, make: Make) -> None:
    data = os.urandom(4 * CHUNK)
    digest = Digest.of(b"not these bytes")
    blobs = _Blobs(data)
    blobs.gate.set()
    fetcher = _fetcher(tmp_path, 0, make(tmp_path))
    fill, _ = await fetcher.start(digest, blobs, "r")
    with pytest.raises(FillError, match="do not hash"):
        await fill.wait_done()
    claim = await fetcher.coalescer.claim(digest)
    assert claim is not None
    await asyncio.to_thread(claim.release)
    assert not fetcher.store.blob_path(digest).exists()
    await fetcher.close()


class _Registry:
    """Upstream with one tag: counts the manifest GETs, held until ``gate`` opens."""

    name = "docker.io"

    def __init__(self) -> None:
        self.manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                    "config": {}, "layers": []}).encode()
        self.gets = 0
        self.asked, self.gate = asyncio.Event(), asyncio.Event()

    @asynccontextmanager
    async def request(self, method: str, repository: str, suffix: str, *,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None, retry: bool = True,
                      background: bool = False) -> AsyncIterator[_Body]:
        self.gets += method == "GET"
        self.asked.set()
        await self.gate.wait()
        answer = _Body(self.manifest, 0, self.gate)
        answer.headers = {"Content-Type": OCI_MANIFEST,
                          "Docker-Content-Digest": str(Digest.of(self.manifest))}
        yield answer


async def _manifests(root: Path, coalescer: Coalescer) -> ManifestCache:
    store = FilesystemStore(root, temp_folder="w")
    store.open()
    tags = TagStore(store.tags)
    await tags.open()
    return ManifestCache(store, tags, CacheSettings(), coalescer=coalescer)


async def test_one_upstream_get_for_every_request_of_a_tag(tmp_path: Path, make: Make) -> None:
    registry = _Registry()
    chain = SourceChain([], UpstreamSource(registry))  # type: ignore[arg-type]
    cache = await _manifests(tmp_path, make(tmp_path))
    asking = [asyncio.create_task(cache.by_tag(chain, "library/a", "1", None))
              for _ in range(4)]
    await registry.asked.wait()
    registry.gate.set()
    answers = await asyncio.gather(*asking)
    assert registry.gets == 1
    assert {a.manifest.data for a in answers} == {registry.manifest}
    assert sorted(a.cache for a in answers)[-1] == "miss"  # the others joined it or hit
    await cache.close()


async def test_across_processes_one_worker_asks_and_the_other_finds_its_answer(
        tmp_path: Path) -> None:
    """What only the shared implementation promises: two caches (two workers) on one
    storage folder ask upstream once."""
    registry = _Registry()
    chain = SourceChain([], UpstreamSource(registry))  # type: ignore[arg-type]
    first = await _manifests(tmp_path, KINDS["claims"](tmp_path))
    second = await _manifests(tmp_path, KINDS["claims"](tmp_path))
    asking = [asyncio.create_task(c.by_tag(chain, "library/a", "1", None))
              for c in (first, second)]
    await registry.asked.wait()
    registry.gate.set()
    answers = await asyncio.gather(*asking)
    assert registry.gets == 1
    assert sorted(a.cache for a in answers) == ["hit", "miss"]
    await asyncio.gather(first.close(), second.close())
