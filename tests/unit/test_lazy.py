"""Lazy pulling in process (issue 23, issue 20 item 3): multi-range answers, a range on a
miss answered from a ranged upstream request, and a late reader of a relay that gets the
rest from a fresh range instead of a cut."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from mirror.errors import RangeInvalid
from mirror.server.responses import RANGES_MAX, parse_ranges
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory

Client = TestClient[Any, Any]
MiB = 1 << 20


async def _parts(response: aiohttp.ClientResponse) -> list[tuple[str, bytes]]:
    """``(Content-Range, body)`` of each part of a multipart/byteranges answer."""
    assert response.status == 206
    assert response.content_type == "multipart/byteranges"
    reader = aiohttp.MultipartReader.from_response(response)
    parts = []
    while True:
        part = await reader.next()
        if part is None:
            return parts
        assert isinstance(part, aiohttp.BodyPartReader)
        parts.append((part.headers["Content-Range"], bytes(await part.read())))


def _expected(data: bytes, spans: list[tuple[int, int]]) -> list[tuple[str, bytes]]:
    return [(f"bytes {a}-{b}/{len(data)}", data[a:b + 1]) for a, b in spans]


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-9,100-109", [(0, 10), (100, 110)]),
    ("bytes=500-509,0-9", [(500, 510), (0, 10)]),  # in the order asked
    ("bytes=0-9,5-19", [(0, 20)]),  # overlapping: coalesced
    ("bytes=-10,0-0", [(990, 1000), (0, 1)]),
    ("bytes=0-9,5000-6000", [(0, 10)]),  # the unsatisfiable one is left out
    ("bytes=0-9,x", None),  # a syntax not read: the whole blob (RFC 9110)
])
def test_ranges_are_parsed_in_order_and_coalesced(
        header: str, expected: list[tuple[int, int]] | None) -> None:
    assert parse_ranges(header, 1000) == expected


def test_too_many_ranges_are_coalesced_or_refused() -> None:
    close = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(RANGES_MAX + 10))
    assert parse_ranges(f"bytes={close}", 100_000) == [(0, (RANGES_MAX + 9) * 10 + 2)]
    apart = ",".join(f"{i * 1000}-{i * 1000 + 1}" for i in range(RANGES_MAX + 1))
    with pytest.raises(RangeInvalid):
        parse_ranges(f"bytes={apart}", 1_000_000)
    with pytest.raises(RangeInvalid):
        parse_ranges("bytes=2000-3000,5000-", 1000)


@pytest.mark.parametrize("size", [100_000, 2 * MiB], ids=["memory", "disk"])
async def test_multi_range_on_a_cached_blob_is_a_multipart_answer(
        mirror: Client, fake: FakeRegistry, size: int) -> None:
    data = os.urandom(size)
    digest = fake.add_blob(data)
    assert await (await mirror.get(f"/v2/app/blobs/{digest}")).read() == data
    response = await mirror.get(f"/v2/app/blobs/{digest}",
                                headers={"Range": "bytes=50000-50099,0-9,-51"})
    assert await _parts(response) == _expected(
        data, [(50000, 50099), (0, 9), (size - 51, size - 1)])
    head = await mirror.head(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=0-9,20-29"})
    assert head.status == 200  # HEAD is unaffected: the whole blob's headers
    assert head.headers["Content-Length"] == str(size)
    refused = await mirror.get(f"/v2/app/blobs/{digest}",
                               headers={"Range": f"bytes={size}-,{size + 5}-"})
    assert refused.status == 416
    assert refused.headers["Content-Range"] == f"bytes */{size}"


async def test_multi_range_on_a_blob_being_downloaded(mirror: Client,
                                                      fake: FakeRegistry) -> None:
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=128 << 10, delay=0.02)
    response = await mirror.get(f"/v2/app/blobs/{digest}",
                                headers={"Range": "bytes=1000-1999,10-19"})
    assert await _parts(response) == _expected(data, [(1000, 1999), (10, 19)])


async def test_a_range_far_ahead_of_the_download_is_answered_from_a_ranged_request(
        mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(24 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=256 << 10, delay=0.02)
    footer = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-51"})
    assert footer.status == 206
    assert await footer.read() == data[-51:]
    chunks = await mirror.get(f"/v2/app/blobs/{digest}",
                              headers={"Range": "bytes=20000000-20000099,16000000-16000009"})
    assert await _parts(chunks) == _expected(
        data, [(20000000, 20000099), (16000000, 16000009)])
    ranged = [r.headers["Range"] for r in fake.requests
              if "/blobs/" in r.path and "Range" in r.headers]
    assert f"bytes={len(data) - 51}-{len(data) - 1}" in ranged
    # The one full download goes on, is verified and kept: the next pull is a hit.
    whole = await mirror.get(f"/v2/app/blobs/{digest}")
    assert await whole.read() == data
    full_gets = [r for r in fake.requests if r.method == "GET" and "/blobs/" in r.path
                 and "Range" not in r.headers]
    assert len(full_gets) == 1
    again = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-51"})
    assert await again.read() == data[-51:]
    assert fake.count("GET", "/blobs/") == len(full_gets) + len(ranged)


async def test_a_long_range_waits_for_the_download_rather_than_asking_twice(
        mirror: Client, fake: FakeRegistry) -> None:
    """A resume far ahead but longer than the distance (most of the blob) is read from the
    one download: asking upstream for it would cost more bytes than waiting."""
    data = os.urandom(24 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=1 << 20, delay=0.01)
    response = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=12000000-"})
    assert response.status == 206
    assert await response.read() == data[12000000:]
    assert fake.count("GET", "/blobs/") == 1


async def test_a_range_answer_of_the_wrong_size_is_not_relayed(mirror: Client,
                                                               fake: FakeRegistry) -> None:
    data = os.urandom(12 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=512 << 10, delay=0.01, times=1)
    # Every later blob request (the ranged one) claims another total size.
    fake.fault(kind="status", path="/blobs/", status=206, body=b"x" * 51,
               headers={"Content-Range": f"bytes {len(data) - 51}-{len(data) - 1}/999"})
    footer = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-51"})
    assert await footer.read() == data[-51:]  # from the download, once it got there


async def test_a_late_reader_of_a_relayed_blob_gets_the_rest_from_a_range(
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    """Issue 20 item 3: larger than max_size, relayed from a window the second reader
    has fallen behind: it is served in full from a ranged request, not cut."""
    mirror = await make_mirror(storage={"max_size": "256KiB", "relay_window": "64KiB"})
    data = os.urandom(2 * MiB)
    digest = fake.add_blob(data)
    fake.fault(kind="drip", path="/blobs/", chunk=64 << 10, delay=0.005)
    first = await mirror.get(f"/v2/app/blobs/{digest}")
    head = await first.content.readexactly(MiB)  # the window has moved past byte 0
    late = await mirror.get(f"/v2/app/blobs/{digest}")
    rest, late_body = await asyncio.gather(first.read(), late.read())
    assert head + rest == data
    assert late.status == 200
    assert late_body == data
