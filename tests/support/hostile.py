"""Crafted bundles that try to exhaust the importing host, and the peak resident memory of
a ``mirror import`` subprocess that reads one.

Each maker writes a small file (a few KB) that expands to something large: the import must
refuse it with one line while its resident memory stays flat. ``peak_rss`` runs the real
CLI as a child of this process and reads that child's own peak from ``wait4``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def _entry(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _zstd_tar(path: Path, pieces: list[tuple[str, bytes | int]]) -> Path:
    """A .tar.zst of ``pieces``: bytes, or a number of zero bytes streamed in."""
    with path.open("wb") as file:
        writer = zstandard.ZstdCompressor(level=19).stream_writer(file, closefd=False)
        for name, data in pieces:
            if isinstance(data, bytes):
                writer.write(_entry(name, data))
                continue
            writer.write(_header(name, data))
            zeros = bytes(1 << 20)
            left = data
            while left:
                writer.write(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))
            writer.write(bytes(-data % tarfile.BLOCKSIZE))
        writer.write(bytes(2 * tarfile.BLOCKSIZE))
        writer.flush(zstandard.FLUSH_FRAME)
    return path


def zero_bomb(path: Path, size: int = 256 << 20) -> Path:
    """oci-layout, then one entry of ``size`` zero bytes, before any bundle.json."""
    return _zstd_tar(path, [("oci-layout", LAYOUT), ("padding", size)])


def huge_bundle_json(path: Path, size: int = 64 << 20) -> Path:
    """A bundle.json of ``size`` bytes of tiny JSON objects (each a Python dict once parsed)."""
    body = b'{"bundleVersion":1,"pad":[' + b"{}," * ((size - 40) // 3) + b"{}]}"
    return _zstd_tar(path, [("oci-layout", LAYOUT), ("bundle.json", body)])


def deep_index(path: Path, depth: int = 200_000) -> Path:
    """An index.json nested ``depth`` arrays deep (a foreign layout: no bundle.json)."""
    return _zstd_tar(path, [("oci-layout", LAYOUT),
                            ("index.json", b"[" * depth + b"]" * depth)])


def deep_bundle_json(path: Path, depth: int = 200_000) -> Path:
    """A bundle.json nested ``depth`` objects deep."""
    body = b'{"a":' * depth + b"0" + b"}" * depth
    return _zstd_tar(path, [("oci-layout", LAYOUT), ("bundle.json", body)])


def plain_layout(path: Path, blob: bytes) -> Path:
    """A harmless foreign layout with one (unreferenced) blob: the baseline import."""
    digest = hashlib.sha256(blob).hexdigest()
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    return _zstd_tar(path, [("oci-layout", LAYOUT), ("index.json", index),
                            (f"blobs/sha256/{digest}", blob)])


@dataclass
class Run:
    """One ``mirror import`` child: exit status, stderr, peak resident bytes."""

    returncode: int
    stderr: str
    peak_rss: int


def peak_rss(args: list[str], cwd: Path | None = None) -> Run:
    """Run ``python -m mirror ARGS`` and return its status, stderr and peak resident memory.

    The peak is ``VmHWM`` of the child's ``/proc/<pid>/status``, read every few
    milliseconds until it exits (it only grows). ``ru_maxrss`` would not do: Linux counts
    the parent's resident size at fork in the child's.
    """
    peak = 0
    with (tempfile.TemporaryFile() as err,
          subprocess.Popen([sys.executable, "-m", "mirror", *args], stdout=subprocess.DEVNULL,
                           stderr=err, cwd=cwd) as proc):
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            peak = max(peak, _hwm(status))
            time.sleep(0.002)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Run(proc.returncode, text, peak)


def _hwm(status: Path) -> int:
    """``VmHWM`` in bytes, 0 once the process is gone."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


__all__ = ["Run", "deep_bundle_json", "deep_index", "huge_bundle_json", "peak_rss",
           "plain_layout", "zero_bomb"]
