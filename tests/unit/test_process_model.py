"""The process model's pieces without a server: the index opened by several processes at
once, ``workers: auto`` from affinity and cgroup files, the storage lock and pid file."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from mirror import config
from mirror.config import cpus
from mirror.storage.index import Index


def _open_index(path: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    index = Index(Path(path))
    index.open()  # raises (exit code 1) on "database is locked"
    index.close()


def test_many_processes_open_a_fresh_index_at_once(tmp_path: Path) -> None:
    """Workers starting on a fresh storage folder each open the index: none may fail
    (``PRAGMA journal_mode=WAL`` said "database is locked" without waiting)."""
    context = multiprocessing.get_context("fork")
    for round_ in range(15):
        path = tmp_path / f"fresh-{round_}" / "index.db"
        path.parent.mkdir()
        barrier = context.Barrier(6)
        procs = [context.Process(target=_open_index, args=(str(path), barrier))
                 for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * 6, f"round {round_}"
    index = Index(path)
    index.open()
    assert index.total_entries == 0
    index.close()


# --- workers: auto ---------------------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def _affinity(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(count)))


V1 = {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000\n",
      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}


@pytest.mark.parametrize(("affinity", "files", "self_cgroup", "workers"), [
    pytest.param(64, {"kubepods/pod1/cpu.max": "200000 100000\n",
                      "kubepods/cpu.max": "max 100000\n"}, "0::/kubepods/pod1\n", 2,
                 id="the cgroup v2 quota"),
    pytest.param(64, {"cpu.max": "150000 100000\n"}, "0::/\n", 2,
                 id="a fractional quota rounded up"),
    pytest.param(64, {"cpu.max": "10000 100000\n"}, "0::/\n", 1,
                 id="a tenth of a CPU is still one worker"),
    pytest.param(64, {"a/b/cpu.max": "max 100000\n", "a/cpu.max": "300000 100000\n"},
                 "0::/a/b\n", 3, id="a parent cgroup's limit holds"),
    pytest.param(64, V1, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", 4,
                 id="the cgroup v1 quota"),
    pytest.param(3, {"cpu.max": "max 100000\n"}, "0::/\n", 3, id="no quota: the affinity"),
    pytest.param(3, {"cpu.max": "800000 100000\n"}, "0::/\n", 3,
                 id="a quota above the affinity: the affinity"),
    pytest.param(2, {"cpu.max": "garbage\n"}, "0::/\n", 2, id="an odd file is no limit"),
])
def test_auto_is_the_quota_within_the_affinity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, affinity: int,
        files: dict[str, str], self_cgroup: str, workers: int) -> None:
    _affinity(monkeypatch, affinity)
    root, proc = _tree(tmp_path, files, self_cgroup)
    assert cpus.available(root, proc) == workers


def test_the_quota_read_from_cgroup_files(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _affinity(monkeypatch, 2)
    root, proc = _tree(tmp_path, {"kubepods/pod1/cpu.max": "200000 100000\n",
                                  "kubepods/cpu.max": "max 100000\n"},
                       "0::/kubepods/pod1\n")
    assert cpus.cgroup_quota(root, proc) == 2.0
    root, proc = _tree(tmp_path / "max", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cpus.cgroup_quota(root, proc) is None
    # unreadable files are no limit: the affinity
    assert cpus.available(tmp_path / "none", tmp_path / "no-such-file") == 2


def test_config_auto_uses_the_available_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "available", lambda: 2)
    settings = config.parse({"version": 1, "server": {"workers": "auto"}}, env={})
    assert settings.server.workers == 2
    assert config.default_settings().server.workers == 2
