"""The pull service keeps a verdict that let an answer through until the first signature
look-up it used would be made again: a kept answer then costs no call into the gate (the
policy-on serving figure), and a changed signature is seen exactly when it was before.
"""

from __future__ import annotations

from typing import Any

import pytest

from mirror.cache.manifests import Manifest, Resolved
from mirror.clock import ManualClock
from mirror.errors import PolicyDenied
from mirror.oci import Digest
from mirror.policy.model import Verdict
from mirror.policy.parse import sig_tag
from mirror.pull import SIG_TAG_MEMO, PullService, Repo

REPO = Repo("fake.test", "acme/app")
DATA = b'{"schemaVersion":2}'
RESOLVED = Resolved(Manifest(Digest.of(DATA), DATA, "application/vnd.oci.image.manifest.v1+json"),
                    "hit")
ALLOWED = Verdict(True, 1, "signed by release", signer="release")
DENIED = Verdict(False, 1, "no signature by release")


class CountingGate:
    """Reads what the real gate reads (the .sig tag, the referrers) and answers a verdict."""

    def __init__(self, verdict: Verdict | None) -> None:
        self.verdict = verdict
        self.calls = 0

    async def judge(self, reader: Any, registry: str, repository: str, digest: str, *,
                    manifest: bytes, media_type: str, tag: str | None = None) -> Verdict | None:
        self.calls += 1
        await reader.manifest(sig_tag(digest))
        await reader.referrers(digest)
        return self.verdict


def _pull(gate: CountingGate, clock: ManualClock, *, referrers_kept: bool = True) -> PullService:
    pull = PullService({}, manifests=None, blobs=None, clock=clock,  # type: ignore[arg-type]
                       tag_list_ttl=60.0)
    pull.gate = gate  # type: ignore[assignment]
    if referrers_kept:
        pull._referrers.put((REPO, str(RESOLVED.manifest.digest)), None)
    return pull


async def test_a_passed_verdict_is_kept_until_the_sig_tag_is_read_again() -> None:
    clock, gate = ManualClock(), CountingGate(ALLOWED)
    pull = _pull(gate, clock)
    for _ in range(5):
        assert await pull.judge(REPO, RESOLVED, "v1") is ALLOWED
    assert gate.calls == 1
    clock.advance(SIG_TAG_MEMO + 0.1)  # the .sig tag's memo ended: the gate reads it again
    assert await pull.judge(REPO, RESOLVED, "v1") is ALLOWED
    assert gate.calls == 2


async def test_a_refusal_is_never_kept() -> None:
    clock, gate = ManualClock(), CountingGate(DENIED)
    pull = _pull(gate, clock)
    for _ in range(3):
        with pytest.raises(PolicyDenied):
            await pull.judge(REPO, RESOLVED, "v1")
    assert gate.calls == 3


async def test_a_failed_referrers_look_up_keeps_nothing() -> None:
    clock, gate = ManualClock(), CountingGate(ALLOWED)
    pull = _pull(gate, clock, referrers_kept=False)  # no registry: the look-up fails
    await pull.judge(REPO, RESOLVED, "v1")
    await pull.judge(REPO, RESOLVED, "v1")
    assert gate.calls == 2


async def test_a_new_gate_after_a_reload_judges_again() -> None:
    clock, gate = ManualClock(), CountingGate(ALLOWED)
    pull = _pull(gate, clock)
    await pull.judge(REPO, RESOLVED, "v1")
    stricter = CountingGate(DENIED)
    pull.gate = stricter  # type: ignore[assignment]
    with pytest.raises(PolicyDenied):
        await pull.judge(REPO, RESOLVED, "v1")
    assert (gate.calls, stricter.calls) == (1, 1)


async def test_a_kept_pass_ends_when_its_vulnerability_report_gets_too_old() -> None:
    clock = ManualClock()
    expiring = Verdict(True, 1, "vulnerability report by scanner: worst finding HIGH",
                       expires=clock.time() + 1.0)
    gate = CountingGate(expiring)
    pull = _pull(gate, clock)
    assert await pull.judge(REPO, RESOLVED, "v1") is expiring
    assert await pull.judge(REPO, RESOLVED, "v1") is expiring
    assert gate.calls == 1
    clock.advance(1.1)  # past max_age, though the .sig tag's memo has not ended
    await pull.judge(REPO, RESOLVED, "v1")
    assert gate.calls == 2
