"""Issue 10 with the mirror as a real process: the items that are about the process itself
(its connection pool, its start-up, its access log, its disk).

The upstream is the in-process fake where a fault is needed that a real registry cannot
show (a body dripping one byte at a time).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fake import FakeRegistry
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port

pytestmark = pytest.mark.integration


def _fake_upstream(url: str, **options: Any) -> dict[str, Any]:
    return {"name": "fake.test", "url": url, "default": True, "retries": 0, **options}


async def _started(workdir: Path, config: dict[str, Any]) -> MirrorProcess:
    process = MirrorProcess(workdir, config)
    await asyncio.to_thread(process.start)  # the fake upstream keeps serving meanwhile
    return process


async def test_item03_clients_that_leave_free_the_upstream_pool(aiohttp_server: Any,
                                                                tmp_path: Path) -> None:
    fake = FakeRegistry()
    fake.add_image("app", "v1", [b"x"])
    for i in range(4):
        fake.add_image("slow", f"t{i}", [f"slow-{i}".encode()])
    fake.fault(kind="drip", path="/slow/manifests/", chunk=1, delay=0.5)  # minutes per answer
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("")).rstrip("/")
    config = mirror_config(free_port(), tmp_path / "cache",
                           [_fake_upstream(url, max_connections=4)])
    mirror = await _started(tmp_path / "mirror", config)
    try:
        async with aiohttp.ClientSession() as leaving:
            pending = [asyncio.ensure_future(leaving.get(f"{mirror.url}/v2/slow/manifests/t{i}"))
                       for i in range(4)]
            async with asyncio.timeout(20):
                await fake.wait_for(lambda: fake.count("GET", "/slow/manifests/") == 4)
            for request in pending:  # the pool is full of drips; the clients give up
                request.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        async with asyncio.timeout(20):
            await fake.wait_for(lambda: fake.cut_short == 4)  # the mirror hung up upstream
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"{mirror.url}/v2/app/manifests/v1") as response:
            assert response.status == 200
    finally:
        mirror.stop()
    lines = [json.loads(line) for line in mirror.log_text().splitlines() if line.startswith("{")]
    gone = [e for e in lines if e.get("event") == "request" and e.get("status") == 499]
    assert len(gone) == 4 and all(e["error"] == "client went away" for e in gone)
