"""The lean path: a hot answer given again from memory is the same answer, with the same
access line, metrics and recency; requests it must not answer go the full way."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import structlog

from mirror.clock import ManualClock
from mirror.server.accounting import AccessLine, Served
from mirror.server.fastpath import CONTENT_TTL
from mirror.server.state import ACCOUNTING, NODE
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory

_PER_REQUEST = {"x-request-id", "date", "server"}
_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _answer(status: int, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
    kept = {k.lower(): v for k, v in headers.items() if k.lower() not in _PER_REQUEST}
    return status, kept, body


async def _twice(mirror: Any, method: str, path: str,
                 headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Ask the same thing three times after a first fetch (full path from the cache, then
    kept); all three answers must be equal."""
    await (await mirror.request(method, path, headers=headers or {})).read()
    answers, ids = [], []
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            resp = await mirror.request(method, path, headers=headers or {})
            answers.append(_answer(resp.status, resp.headers, await resp.read()))
            ids.append(resp.headers["X-Request-Id"])
    assert answers[0][0] == 200
    assert answers[0] == answers[1] == answers[2], path
    lines = [e for e in logs if e.get("event") == "request" and e["request_id"] in ids]
    assert [e["request_id"] for e in lines] == ids  # one line per request, lean or not
    return lines


async def test_hot_answers_are_the_same_answers(make_mirror: MirrorFactory,
                                                fake: FakeRegistry) -> None:
    mirror = await make_mirror()
    digest, body = fake.add_image("app", "v1", [b"layer-bytes"])
    config = json.loads(body)["config"]["digest"]
    for method in ("GET", "HEAD"):
        for path in (f"/v2/app/manifests/{digest}", "/v2/app/manifests/v1",
                     f"/v2/app/blobs/{config}"):
            lines = await _twice(mirror, method, path, _ACCEPT)
            full, lean = lines[0], lines[2]
            assert set(full) <= set(lean) | {"request_id"}, (full, lean)
            assert lean["cache"] == "hit" and lean["status"] == 200
            assert lean["method"] == method and lean["path"] == path
    assert fake.count(contains="/manifests/v1") == 1  # the tag was asked once, inside its TTL


async def test_what_the_lean_path_leaves_to_the_full_one(make_mirror: MirrorFactory,
                                                         fake: FakeRegistry) -> None:
    mirror = await make_mirror()
    digest, body = fake.add_image("app", "v1", [b"layer-bytes"])
    path = f"/v2/app/manifests/{digest}"
    for _ in range(2):
        assert (await mirror.get(path, headers=_ACCEPT)).status == 200
    ranged = await mirror.get(path, headers={**_ACCEPT, "If-None-Match": f'"{digest}"'})
    assert ranged.status == 304
    other_accept = await mirror.get(path, headers={"Accept": "text/plain"})
    assert other_accept.status in (200, 404)  # negotiated by the full path, not the kept answer
    supplied = await mirror.get(path, headers={**_ACCEPT, "X-Request-Id": "mine-1"})
    assert supplied.headers["X-Request-Id"] == "mine-1"
    assert await supplied.read() == body


async def test_a_tag_is_answered_here_only_inside_its_ttl(clock: ManualClock,
                                                          make_mirror: MirrorFactory,
                                                          fake: FakeRegistry) -> None:
    mirror = await make_mirror(clock=clock, cache={"tag_ttl": "30s"})
    fake.add_image("app", "v1", [b"x"])
    for _ in range(3):
        await mirror.get("/v2/app/manifests/v1", headers=_ACCEPT)
    assert fake.count(contains="/manifests/v1") == 1
    clock.advance(CONTENT_TTL + 1)  # the kept answer is over; the tag's TTL is not
    await mirror.get("/v2/app/manifests/v1", headers=_ACCEPT)
    assert fake.count(contains="/manifests/v1") == 1
    clock.advance(30)  # the tag's TTL is over: revalidated upstream
    await mirror.get("/v2/app/manifests/v1", headers=_ACCEPT)
    assert fake.count(contains="/manifests/v1") == 2


def test_access_line_is_one_json_line_with_every_field() -> None:
    stream = io.BytesIO()
    access = AccessLine(True, True, stream=stream)

    async def write() -> None:
        access.write({"request_id": "r1", "client": "127.0.0.1", "user_agent": "ua",
                      "duration_ms": 0.01}, b'"route":"blob","status":200')

    asyncio.run(write())
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "r1" and line["route"] == "blob" and line["status"] == 200
    assert line["timestamp"].endswith("Z") and len(line["timestamp"]) == 27
    assert stream.getvalue().endswith(b"}\n") and stream.getvalue().count(b"\n") == 1


_TYPED = ("route", "method", "path", "status", "registry", "repository", "reference", "digest",
          "media_type", "source", "user")


async def test_both_paths_account_one_served_record_each(make_mirror: MirrorFactory,
                                                         fake: FakeRegistry) -> None:
    """Every answer, full or lean, reaches the accounting's sinks once as a typed record
    with the same fields (the lean one a cache hit from memory)."""
    mirror = await make_mirror()
    digest, body = fake.add_image("app", "v1", [b"layer-bytes"])
    config = json.loads(body)["config"]["digest"]
    seen: list[Served] = []
    mirror.server.app[ACCOUNTING].sinks.append(seen.append)
    for path in ("/v2/app/manifests/v1", f"/v2/app/manifests/{digest}",
                 f"/v2/app/blobs/{config}"):
        for _ in range(4):
            resp = await mirror.get(path, headers=_ACCEPT)
            assert resp.status == 200
            await resp.read()
        records = [s for s in seen if s.path == path]
        assert len(records) == 4, path  # one record per answer
        full, lean = records[1], records[3]  # the full path from the cache, then kept
        assert {k: getattr(full, k) for k in _TYPED} == {k: getattr(lean, k) for k in _TYPED}
        assert lean.cache == "hit" and lean.delivery == "memory"
        assert lean.bytes == full.bytes > 0 and lean.request_id != full.request_id
    manifests = [s for s in seen if s.route == "manifest"]
    assert all(s.manifest is not None and str(s.manifest.digest) == s.digest for s in manifests)


async def test_a_tag_answered_here_learns_platforms_like_the_full_path(
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    """An index pulled by tag from a kept answer is counted through the same entry point
    as the full path's, which learns the index's platforms (the lean path once had one
    that learnt none)."""
    mirror = await make_mirror()
    amd, amd_body = fake.add_image("multi", None, [b"amd-layer"])
    arm, arm_body = fake.add_image("multi", None, [b"arm-layer"], arch="arm64")
    fake.add_index("multi", "latest", [(amd, amd_body, "amd64"), (arm, arm_body, "arm64")])
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    path = "/v2/multi/manifests/latest"
    for _ in range(2):  # the full path, which keeps its answer
        assert (await mirror.get(path, headers=accept)).status == 200
    popularity = mirror.server.app[NODE].popularity
    popularity._children.clear()  # forget what the full path taught
    seen: list[Served] = []
    mirror.server.app[ACCOUNTING].sinks.append(seen.append)
    assert (await mirror.get(path, headers=accept)).status == 200
    assert [(s.cache, s.delivery) for s in seen] == [("hit", "memory")]
    assert amd in popularity._children and arm in popularity._children
