"""The lean path: a hot answer given again from memory is the same answer, with the same
access line, metrics and recency; requests it must not answer go the full way."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import structlog

from mirror.clock import ManualClock
from mirror.server.fastpath import CONTENT_TTL, AccessLine, Hot, HotAnswers
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
    hot = HotAnswers(access)
    assert len(hot) == 0
    entry = Hot(body=b"", headers={}, expires=0.0, log_fields=b'"route":"blob","status":200',
                log_dict={}, requests=None, seconds=None, counters=(), served=(),
                served_count=0, touch=None, image=None, pulled_digest=None)

    async def write() -> None:
        access.write({"request_id": "r1", "client": "127.0.0.1", "user_agent": "ua",
                      "duration_ms": 0.01}, entry)

    asyncio.run(write())
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "r1" and line["route"] == "blob" and line["status"] == 200
    assert line["timestamp"].endswith("Z") and len(line["timestamp"]) == 27
    assert stream.getvalue().endswith(b"}\n") and stream.getvalue().count(b"\n") == 1
