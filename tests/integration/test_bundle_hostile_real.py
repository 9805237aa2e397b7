"""Crafted bundles against the real ``mirror import`` process: each is refused with one line
while the importing process stays under 100 MiB resident (its peak, ``VmHWM``).

Before the fix (issue 19 item 5): an 8 KB ``.tar.zst`` holding 256 MiB of zeros took
~590 MiB and a minute (decompressed output accumulated with ``+=``); a 6 KB one whose
``bundle.json`` is 64 MiB of ``{},`` took 1.7 GiB (parsed before its signature was
checked); a 200,000-deep ``index.json`` ended in a ``RecursionError`` traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support import hostile

pytestmark = pytest.mark.integration

PEAK_MAX = 100 * 2**20

CASES: dict[str, tuple[Callable[[Path], Path], bool, str]] = {
    # name: (maker, with --verify-key, what the one line says)
    "256 MiB of zeros, signed import": (hostile.zero_bomb, True, "no bundle.json"),
    "256 MiB of zeros, unsigned": (hostile.zero_bomb, False, "no index.json"),
    "64 MiB bundle.json, signed import": (hostile.huge_bundle_json, True,
                                          "bundle.json is 67108854 bytes (at most"),
    "4 MiB bundle.json of objects, unsigned": (
        lambda p: hostile.huge_bundle_json(p, (4 << 20) - 64), False,
        "bundle.json holds more than 250000 JSON values"),
    "4 MiB bundle.json of objects, signed import": (
        lambda p: hostile.huge_bundle_json(p, (4 << 20) - 64), True, "is not signed"),
    "200,000-deep index.json": (hostile.deep_index, False,
                                "index.json nests JSON deeper than 32 levels"),
    "200,000-deep bundle.json": (hostile.deep_bundle_json, False,
                                 "bundle.json nests JSON deeper than 32 levels"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_bundle_is_refused_in_one_line_with_flat_memory(tmp_path: Path,
                                                                   case: str) -> None:
    make, signed, message = CASES[case]
    bundle = make(tmp_path / "crafted.tar.zst")
    assert bundle.stat().st_size < 16 * 1024  # small on the wire, large once expanded
    args = ["import", "-q", "--storage", str(tmp_path / "cache"), str(bundle)]
    if signed:
        key = Ed25519PrivateKey.generate().public_key()
        public = tmp_path / "key.pub"
        public.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
        args += ["--verify-key", str(public)]
    run = hostile.peak_rss(args)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirror: ") and message in lines[0], lines
    assert 0 < run.peak_rss < PEAK_MAX, f"{run.peak_rss / 2**20:.1f} MiB resident"
    assert not [p for p in (tmp_path / "cache").rglob("blobs/**/*") if p.is_file()]
