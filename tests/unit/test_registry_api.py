"""The upstream source's typed registry API: values for what upstream says, errors of
mirror.errors for its failures, and the background budget as the source's own view."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from mirror.errors import Denied, ManifestInvalid, NameUnknown, UpstreamUnavailable
from mirror.oci import OCI_INDEX, Digest
from mirror.sources import SourceChain
from mirror.sources.upstream import TagHead, UpstreamSource

DIGEST = Digest.of(b"layer")


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        piece, self._data = self._data[:n], self._data[n:]
        return piece


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content: _Body = field(init=False)

    def __post_init__(self) -> None:
        self.content = _Body(self.body)

    @property
    def content_length(self) -> int:
        return len(self.body)


@dataclass
class _Client:
    """A registry client that gives every request the next scripted answer, or raises it."""

    answers: list[_Answer | Exception]
    name: str = "docker.io"
    asked: list[tuple[str, str, dict[str, str] | None, bool]] = field(default_factory=list)

    @asynccontextmanager
    async def request(self, method: str, repository: str, suffix: str, *,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None, retry: bool = True,
                      background: bool = False) -> AsyncIterator[_Answer]:
        self.asked.append((method, suffix, dict(params) if params else None, background))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        yield answer


def _source(*answers: _Answer | Exception) -> tuple[UpstreamSource, _Client]:
    client = _Client(list(answers))
    return UpstreamSource(client), client  # type: ignore[arg-type]


async def test_head_tag_gives_the_digest_or_none_for_a_missing_tag() -> None:
    source, client = _source(_Answer(200, headers={"Docker-Content-Digest": str(DIGEST)}),
                             _Answer(200), _Answer(404))
    assert await source.head_tag("library/a", "1") == TagHead(str(DIGEST))
    assert await source.head_tag("library/a", "1") == TagHead(None)
    assert await source.head_tag("library/a", "gone") is None
    assert [a[0] for a in client.asked] == ["HEAD"] * 3


@pytest.mark.parametrize("status", [500, 301, 206])
async def test_head_tag_calls_anything_else_upstreams_failure(status: int) -> None:
    source, _ = _source(_Answer(status))
    with pytest.raises(UpstreamUnavailable, match=str(status)):
        await source.head_tag("library/a", "1")


@pytest.mark.parametrize(("status", "held"), [(200, True), (206, True), (404, False),
                                              (401, False), (403, False)])
async def test_has_blob_and_has_manifest_say_whether_upstream_holds_it(
        status: int, held: bool) -> None:
    source, client = _source(_Answer(status), _Answer(status))
    assert await source.has_blob("team/app", DIGEST) is held
    assert await source.has_manifest("team/app", DIGEST) is held
    assert [a[1] for a in client.asked] == [f"blobs/{DIGEST}", f"manifests/{DIGEST}"]


async def test_has_blob_is_no_when_upstream_refuses_and_an_error_when_it_fails() -> None:
    source, _ = _source(Denied("no"), NameUnknown("no"), _Answer(502))
    assert not await source.has_blob("team/app", DIGEST)
    assert not await source.has_manifest("team/app", DIGEST)
    with pytest.raises(UpstreamUnavailable, match="502"):
        await source.has_blob("team/app", DIGEST)


async def test_tag_page_reads_the_next_link_and_refuses_what_is_not_a_tag_list() -> None:
    page = json.dumps({"name": "library/a", "tags": ["1", "2"]}).encode()
    link = '</v2/library/a/tags/list?n=2&last=2>; rel="next"'
    source, client = _source(_Answer(200, page, {"Link": link}), _Answer(404),
                             _Answer(200, b"<html>login</html>"))
    found = await source.tag_page("library/a", 2)
    assert (found.name, found.tags, found.next_n, found.next_last) == ("library/a",
                                                                       ["1", "2"], 2, "2")
    assert client.asked[0][2] == {"n": "2"}
    with pytest.raises(NameUnknown):
        await source.tag_page("library/nope")
    with pytest.raises(UpstreamUnavailable):
        await source.tag_page("library/a")


async def test_referrers_none_without_the_api_and_the_index_with_it() -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    source, client = _source(_Answer(404), _Answer(200, index,
                                                   {"OCI-Filters-Applied": "artifactType"}),
                             _Answer(500), _Answer(200, b"{}" * 3_000_000))
    assert await source.referrers("library/a", DIGEST) is None
    found = await source.referrers("library/a", DIGEST, "application/x")
    assert found is not None and found.filtered and found.body == index
    assert client.asked[1][2] == {"artifactType": "application/x"}
    with pytest.raises(UpstreamUnavailable, match="500"):
        await source.referrers("library/a", DIGEST)
    with pytest.raises(ManifestInvalid):  # over the size limit: never read whole
        await source.referrers("library/a", DIGEST)


async def test_the_background_view_sends_every_request_on_the_background_budget() -> None:
    source, client = _source(_Answer(404), _Answer(404), _Answer(404))
    chain = SourceChain([], source)
    background = chain.in_background()
    assert background.in_background() is background
    assert background.upstream.client is source.client
    await chain.upstream.head_tag("library/a", "1")
    await background.upstream.head_tag("library/a", "1")
    assert await background.upstream.manifest("library/a", "1") is None
    assert [a[3] for a in client.asked] == [False, True, True]
