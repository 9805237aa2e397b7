"""Start-up time of the local cache with 100,000 entries (issue 4: target under 3 s).

Builds a cache folder with N small blobs (content-addressed, as the mirror
stores them), then times :meth:`FilesystemStore.startup` — the step a
starting mirror runs before it is ready: remove temp files, open the SQLite
index, scan every file with ``os.scandir`` and reconcile — in three cases:

- ``adopt``:   no index at all (every file adopted, as after losing index.db)
- ``steady``:  the index matches the disk (the normal restart)
- ``crash``:   after a kill -9: 1% of files have no entry, 1% of entries no
               file, and 100 partial temp files
- ``serve``:   ``mirror serve`` on that folder, from exec to ``/readyz`` = 200
               (interpreter start and imports included)

Each case runs in a fresh process. Building 100,000 files takes a minute or
two; ``--dir DIR`` keeps them for the next run. Usage::

    .venv/bin/python benchmarks/startup_index.py [--entries 100000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def build(root: Path, entries: int) -> list[Path]:
    """Write ``entries`` small blobs under ``root`` (no index)."""
    paths = []
    for i in range(entries):
        data = i.to_bytes(8, "big") * (1 + i % 64)
        hex_ = hashlib.sha256(data).hexdigest()
        folder = root / "blobs" / "sha256" / hex_[:2]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / hex_
        if not path.exists():
            path.write_bytes(data)
        paths.append(path)
    return paths


def timed_start(root: Path) -> None:
    """Run one start-up in a fresh interpreter and print its figures."""
    code = ("import sys, time; from pathlib import Path; "
            "from mirror.storage.filesystem import FilesystemStore; "
            "t = time.monotonic(); s = FilesystemStore(Path(sys.argv[1])).startup(); "
            "print(f'{time.monotonic() - t:.3f} s  entries={s.entries} adopted={s.adopted} '"
            "f'dropped={s.dropped} temp_removed={s.temp_removed}')")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)


def timed_serve(root: Path) -> None:
    """Start ``mirror serve`` on ``root`` and time it until it is ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--storage", str(root),
                                "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
            if process.poll() is not None or time.monotonic() - began > 120:
                raise RuntimeError("mirror serve did not become ready")
        print(f"{time.monotonic() - began:.3f} s  from exec to /readyz = 200")
    finally:
        process.terminate()
        process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, help="where to build the cache (default: a temp dir)")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="mirror-startup-"))
    root = base / "cache"
    try:
        began = time.monotonic()
        paths = build(root, args.entries)
        print(f"built {args.entries} blobs in {time.monotonic() - began:.1f} s under {root}",
              flush=True)
        (root / "index.db").unlink(missing_ok=True)
        print("adopt  (no index.db):      ", end="", flush=True)
        timed_start(root)
        print("steady (index matches):    ", end="", flush=True)
        timed_start(root)
        step = 100
        for path in paths[::step]:  # entries without a file
            path.unlink()
        orphans = []
        for i in range(args.entries // step):  # files without an entry
            data = b"orphan-%d" % i
            hex_ = hashlib.sha256(data).hexdigest()
            (root / "blobs" / "sha256" / hex_[:2]).mkdir(parents=True, exist_ok=True)
            orphans.append(root / "blobs" / "sha256" / hex_[:2] / hex_)
            orphans[-1].write_bytes(data)
        (root / "tmp").mkdir(exist_ok=True)
        for i in range(100):
            (root / "tmp" / f"fill-{i}").write_bytes(os.urandom(1024))
        print("crash  (1% drift, 100 tmp):", end=" ", flush=True)
        timed_start(root)
        print("serve  (mirror serve):     ", end="", flush=True)
        timed_serve(root)
        print("serve  (empty cache):      ", end="", flush=True)
        timed_serve(base / "empty")
        for orphan in orphans:  # a reused --dir starts the next run as this one did
            orphan.unlink()
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
