"""A fill's readers, around the moment the verified blob is renamed into place."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from mirror.errors import FillError
from mirror.fetch import Fill
from mirror.oci import Digest


def _fill(tmp_path: Path, data: bytes,
          opened: asyncio.Event | None = None) -> tuple[Fill, Path]:
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    temp = tmp_path / "fill-temp"
    temp.write_bytes(data)
    fill = Fill(digest, temp, len(data),
                on_reader=(lambda _d, _n: opened.set()) if opened is not None else None)
    fill.size = len(data)
    fill.advance(len(data))
    return fill, tmp_path / "published"


async def _read_all(fill: Fill, size: int) -> bytes:
    return b"".join([chunk async for chunk in fill.read(0, size, 2**16)])


async def test_a_reader_joining_between_rename_and_finish_reads_the_published_file(
        tmp_path: Path) -> None:
    data = os.urandom(300_000)
    opened = asyncio.Event()
    fill, published = _fill(tmp_path, data, opened)
    fill.destination = published
    os.replace(fill.temp, published)  # renamed in a thread; finish() has not run yet
    reading = asyncio.create_task(_read_all(fill, len(data)))
    await asyncio.wait_for(opened.wait(), 5)  # the reader opened its file (in a thread)
    fill.finish(published)
    assert await reading == data


async def test_a_reader_finding_neither_file_gets_a_fill_error(tmp_path: Path) -> None:
    data = os.urandom(1000)
    fill, published = _fill(tmp_path, data)
    fill.destination = published
    assert fill.temp is not None
    fill.temp.unlink()  # published and evicted at once: nothing to read
    reading = asyncio.create_task(_read_all(fill, len(data)))
    await asyncio.sleep(0.05)
    assert not reading.done()  # no file yet: another worker's may be on its way
    fill.finish(published)  # the fill is over, and neither file is there
    with pytest.raises(FillError):
        await reading
