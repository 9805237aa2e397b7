"""Crafted bundles against ``mirror import``: peak resident memory and time of the real CLI
process, side by side with a harmless baseline import in the same run.

Each crafted bundle is a few KB that expands to something large (256 MiB of zeros in
one entry, a 64 MiB bundle.json of tiny objects, a 200,000-deep index.json or
bundle.json). The baseline imports a harmless layout of one 1 MiB blob. The ratio
column is peak resident against the baseline's: 1.0 means a crafted bundle costs the
host no more memory than a harmless one.

Run: ``python -m benchmarks.hostile_bundles`` (about half a minute).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support import hostile

CASES: list[tuple[str, Callable[[Path], Path], bool]] = [
    ("baseline: 1 MiB blob, harmless", lambda p: hostile.plain_layout(p, os.urandom(1 << 20)),
     False),
    ("256 MiB of zeros, --verify-key", hostile.zero_bomb, True),
    ("256 MiB of zeros, unsigned", hostile.zero_bomb, False),
    ("64 MiB bundle.json, --verify-key", hostile.huge_bundle_json, True),
    ("4 MiB bundle.json of {}, unsigned",
     lambda p: hostile.huge_bundle_json(p, (4 << 20) - 64), False),
    ("200,000-deep index.json", hostile.deep_index, False),
    ("200,000-deep bundle.json", hostile.deep_bundle_json, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        work = Path(folder)
        public = work / "key.pub"
        public.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        rows = []
        for i, (name, make, signed) in enumerate(CASES):
            bundle = make(work / f"case-{i}.tar.zst")
            args = ["import", "-q", "--storage", str(work / f"cache-{i}"), str(bundle)]
            args += ["--verify-key", str(public)] if signed else []
            started = time.monotonic()
            run = hostile.peak_rss(args)
            rows.append((name, bundle.stat().st_size, run.peak_rss, time.monotonic() - started,
                         run.returncode, (run.stderr.strip().splitlines() or [""])[-1]))
    base = rows[0][2]
    print("| case | bundle | peak resident | x baseline | time | exit | says |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, size, peak, seconds, code, line in rows:
        print(f"| {name} | {size / 1024:.1f} KB | {peak / 2**20:.1f} MiB | {peak / base:.2f} | "
              f"{seconds:.1f} s | {code} | {line[:70]} |")


if __name__ == "__main__":
    main()
