"""The audit trail: chained lines, resumed after a restart, rotated by size, one file per
worker; ``verify`` finds where a chain breaks; the ``audit`` config's errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mirror.audit import GENESIS, AuditTrail, verify, worker_path
from mirror.config import AuditSettings
from mirror.config.audit import _audit
from mirror.errors import ConfigError


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_chained_and_the_chain_goes_on_after_a_restart(tmp_path: Path) -> None:
    settings = AuditSettings(tmp_path / "audit.jsonl")
    trail = AuditTrail(settings, node="n1")
    trail.record("manifest", {"repository": "acme/app", "digest": "sha256:1", "none": None})
    trail.record("admin", {"action": "warm"})
    trail.close()
    trail = AuditTrail(settings, node="n1")  # a restart
    trail.record("manifest", {"repository": "acme/app"})
    trail.close()
    lines = _lines(settings.file)  # type: ignore[arg-type]
    assert lines[0]["prev"] == GENESIS and "none" not in lines[0]
    assert [e["kind"] for e in lines] == ["manifest", "admin", "manifest"]
    assert all(e["node"] == "n1" and e["worker"] == 0 and e["time"] for e in lines)
    found = verify(settings.file)  # type: ignore[arg-type]
    assert found.ok and "3 lines, 1 chain, intact" in found.message


@pytest.mark.parametrize("change", ["edit", "remove", "insert"])
def test_verify_says_where_the_chain_breaks(tmp_path: Path, change: str) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditSettings(path), node="n")
    for n in range(5):
        trail.record("manifest", {"n": n})
    trail.close()
    lines = path.read_text().splitlines()
    if change == "edit":
        lines[2] = lines[2].replace('"n":2', '"n":7')
    elif change == "remove":
        del lines[2]
    else:
        lines.insert(2, lines[1])
    path.write_text("\n".join(lines) + "\n")
    found = verify(path)
    assert not found.ok
    assert "chain breaks at line" in found.message and "\n" not in found.message
    expected = 4 if change == "edit" else 3
    assert f"line {expected}:" in found.message


def test_garbage_and_a_missing_file_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("not json\n")
    assert verify(path) == verify(path)
    assert "line 1: not a JSON line" in verify(path).message
    assert "cannot be read" in verify(tmp_path / "none.jsonl").message


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditSettings(path, max_size=4096), node="n")
    for n in range(60):
        trail.record("manifest", {"n": n, "pad": "x" * 100})
    trail.close()
    rotated = path.with_name("audit.jsonl.1")
    assert rotated.exists() and path.stat().st_size <= 4096
    assert verify(path).ok and verify(rotated).ok
    last_of_rotated = rotated.read_text().splitlines()[-1]
    assert _lines(path)[0]["prev"] == hashlib.sha256(last_of_rotated.encode()).hexdigest()


def test_workers_write_files_of_their_own_and_stdout_chains_per_worker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_path(tmp_path / "a.jsonl", 0, 1) == tmp_path / "a.jsonl"
    assert worker_path(tmp_path / "a.jsonl", 1, 2) == tmp_path / "a.w1.jsonl"
    trails = [AuditTrail(AuditSettings(None), node="n", worker=i, workers=2) for i in (0, 1)]
    for n in range(3):
        for trail in trails:
            trail.record("manifest", {"n": n})
    out = tmp_path / "stdout.jsonl"
    out.write_text(capsys.readouterr().out)
    found = verify(out)
    assert found.ok and "6 lines, 2 chains" in found.message


def test_audit_config(tmp_path: Path) -> None:
    assert _audit({"file": "audit.jsonl"}, tmp_path) == AuditSettings(tmp_path / "audit.jsonl")
    assert _audit({"file": "-", "max_size": "1MiB"}, tmp_path) == AuditSettings(None, 2**20)
    with pytest.raises(ConfigError, match=r"audit\.file"):
        _audit({}, tmp_path)
    with pytest.raises(ConfigError, match=r"audit\.file.*not a folder"):
        _audit({"file": "nowhere/audit.jsonl"}, tmp_path)
    with pytest.raises(ConfigError, match=r"audit\.max_size"):
        _audit({"file": "-", "max_size": "1KiB"}, tmp_path)
    with pytest.raises(ConfigError, match=r"audit"):
        _audit({"file": "-", "rotate": True}, tmp_path)
