"""The verifier against signatures made by tools nobody here wrote: every case of
``../shared/fixtures/cosign/cases.json`` (cosign, containers/image, sigstore-rs) gets the
verdict upstream's own tests expect, in every trust and mutation variant."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.cosign_oracle import FIXTURES, cases, run_case

CASES = cases()


def test_the_fixtures_are_beside_the_clone() -> None:
    assert CASES, f"no cases.json under {FIXTURES} (CI lays shared/ beside the clone)"
    assert len(CASES) == 74


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_verdict_matches_upstream(case: dict[str, Any]) -> None:
    want = case["expected"] == "accept"
    runs = run_case(case)
    assert runs
    wrong = [(what, reason) for what, accepted, reason in runs if accepted != want]
    assert wrong == [], f"{case['id']}: expected {case['expected']} ({case['why']})"
