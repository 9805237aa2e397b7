"""The one accounting of answers: a kept answer's record, accounted many times, counts
every answer once in each metric, writes one JSON access line each with every field,
and reaches every sink."""

from __future__ import annotations

import asyncio
import io
import json

from prometheus_client import REGISTRY

from mirror.server.accounting import AccessLine, Accounting, Served


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_kept_record_is_accounted_like_a_new_one_each_time() -> None:
    stream = io.BytesIO()
    accounting = Accounting(AccessLine(True, True, stream=stream))
    sunk: list[Served] = []
    accounting.sinks.append(sunk.append)
    kept = Served(route="blob", method="GET", path="/v2/acct/blobs/sha256:1", status=200,
                  registry="acct.test", repository="acct", reference="sha256:1",
                  digest="sha256:1", cache="hit", delivery="memory", bytes=696,
                  fields={"ns": "acct.test"})
    kept.prepared = accounting.prepare(kept, kept=True)
    labels = {"route": "blob", "method": "GET", "status": "200"}
    before = (_sample("mirror_http_requests_total", **labels),
              _sample("mirror_served_bytes_total", source="memory"),
              _sample("mirror_registry_cache_results_total", registry="acct.test",
                      kind="blob", result="hit"))

    async def answer() -> None:
        for n in range(3):
            accounting.account(kept.again(f"r{n}", "10.0.0.1", "ua", 0.001))
        await asyncio.sleep(0)  # counters and lines go out once per loop turn

    asyncio.run(answer())
    after = (_sample("mirror_http_requests_total", **labels),
             _sample("mirror_served_bytes_total", source="memory"),
             _sample("mirror_registry_cache_results_total", registry="acct.test",
                     kind="blob", result="hit"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [3, 3 * 696, 3]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]
    assert all(line["route"] == "blob" and line["cache"] == "hit" and line["ns"] == "acct.test"
               and line["registry"] == "acct.test" and line["status"] == 200
               and line["client"] == "10.0.0.1" and line["level"] == "info"
               and line["event"] == "request" for line in lines)
    assert [s.request_id for s in sunk] == ["r0", "r1", "r2"]


def test_streamed_bytes_are_counted_as_they_go_and_not_again() -> None:
    accounting = Accounting(AccessLine(False))
    served = Served(route="blob", status=200, registry="acct2.test", delivery="fill")
    before = _sample("mirror_registry_served_bytes_total", registry="acct2.test", source="fill")
    accounting.sent(served, 100)
    accounting.sent(served, 50)
    middle = _sample("mirror_registry_served_bytes_total", registry="acct2.test", source="fill")
    accounting.account(served)
    accounting.flush()
    after = _sample("mirror_registry_served_bytes_total", registry="acct2.test", source="fill")
    assert (middle - before, after - middle, served.bytes) == (150, 0, 150)


def test_typed_fields_written_as_log_fields_find_their_place() -> None:
    served = Served(fields={"route": "peer", "registry": "r.test", "hop": "peer", "user": "u"})
    served.absorb()
    assert (served.route, served.registry) == ("peer", "r.test")
    assert served.fields == {"hop": "peer", "user": "u"}
