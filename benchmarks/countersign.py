"""Serving cosign's ``.sig`` tag with the mirror's countersignature vs upstream's alone.

Two real mirror processes side by side (one worker each) in front of one real Distribution
holding images signed per cosign's SIGNATURE_SPEC; both enforce a keyed rule the images
pass; one also has ``policy.countersign_key`` (P-256):

- ``first``: the first ``GET .../manifests/sha256-<hex>.sig`` of each of ``--images``
  images (milliseconds, median): upstream's ``.sig`` alone, vs the image judged, the
  mirror's signature made, stored and served;
- ``kept``: ``wrk`` on the ``.sig`` tag of one image, already answered (requests/s,
  median of ``--repeat`` runs, the two mirrors in turn, which goes first alternating:
  on the shared 2-core machine the first of a round is up to 15% faster).

Usage::

    .venv/bin/python -m benchmarks.countersign [--images 20] [--duration 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from benchmarks.lean import run_wrk
from tests.support import cosign_sign as cs
from tests.support.cosign_push import push_legacy
from tests.support.images import make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
VARIANTS = ("upstream's", "countersigned")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _config(folder: Path, registry: Registry, countersign: bool) -> dict[str, Any]:
    config = mirror_config(free_port(), folder / "cache",
                           [{"name": "registry.test", "url": registry.url, "default": True}])
    config["server"] = {"workers": 1}
    config["log"] = {"format": "json", "level": "warning"}
    config["policy"] = {"keys": [{"name": "release", "file": str(folder.parent / "k.pub")}],
                        "rules": [{"repositories": ["acme/*"], "require": ["release"]}]}
    if countersign:
        config["policy"]["countersign_key"] = str(folder.parent / "mirror.key")
    return config


def _get_ms(url: str) -> float:
    began = time.perf_counter()
    with _DIRECT.open(urllib.request.Request(url, headers=ACCEPT), timeout=30) as resp:
        resp.read()
    return (time.perf_counter() - began) * 1e3


def measure(images: int, duration: int, repeat: int) -> dict[str, dict[str, float]]:
    """``first`` (ms) and ``kept`` (req/s) per variant."""
    with tempfile.TemporaryDirectory(prefix="bench-countersign-") as tmp:
        root = Path(tmp)
        key, mirror_key = cs.new_key(), cs.new_key()
        (root / "k.pub").write_bytes(cs.public_pem(key))
        (root / "mirror.key").write_bytes(mirror_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        registry = Registry(root / "registry")
        registry.start()
        mirrors = {v: MirrorProcess(root / f"m{i}", _config(root / f"m{i}", registry, i == 1))
                   for i, v in enumerate(VARIANTS)}
        try:
            digests = []
            for n in range(images):
                image = make_image(f"acme/app{n}", "v1", layers=[make_layer(512, seed=n)],
                                   fmt="oci")
                registry.push(image)
                push_legacy(registry, f"acme/app{n}", image.manifest.digest, key)
                digests.append((f"acme/app{n}", image.manifest.digest))
            for mirror in mirrors.values():
                mirror.start(timeout=30)
            return _figures(mirrors, digests, duration, repeat)
        finally:
            for mirror in mirrors.values():
                mirror.stop()
            registry.stop()


def _sig_url(mirror: MirrorProcess, repo: str, digest: str) -> str:
    return f"{mirror.url}/v2/{repo}/manifests/{digest.replace(':', '-')}.sig"


def _figures(mirrors: dict[str, MirrorProcess], digests: list[tuple[str, str]],
             duration: int, repeat: int) -> dict[str, dict[str, float]]:
    """The first answers of each image, then ``wrk`` on each mirror in turn per round, in
    alternating order (so that a busy machine slows both alike)."""
    firsts: dict[str, list[float]] = {v: [] for v in mirrors}
    for repo, digest in digests:
        for variant, mirror in mirrors.items():
            firsts[variant].append(_get_ms(_sig_url(mirror, repo, digest)))
    runs: dict[str, list[float]] = {v: [] for v in mirrors}
    for round_ in range(repeat):
        order = list(mirrors.items())  # the order alternates: the first of a round gains
        for variant, mirror in (order if round_ % 2 == 0 else order[::-1]):
            url = _sig_url(mirror, *digests[0])
            result = run_wrk(url, method="GET", headers=ACCEPT, connections=16,
                             duration=duration)
            if result.errors:
                raise RuntimeError(f"{url}: {result.errors} errors")
            runs[variant].append(result.rps)
    return {v: {"first": statistics.median(firsts[v]), "kept": statistics.median(runs[v])}
            for v in mirrors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per figure (median)")
    args = parser.parse_args()
    started = time.monotonic()
    figures = measure(args.images, args.duration, args.repeat)
    base, signed = figures["upstream's"], figures["countersigned"]
    print("| .sig answer | upstream's | countersigned | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| first (ms, median of {args.images} images) | {base['first']:.1f} | "
          f"{signed['first']:.1f} | {signed['first'] / base['first']:.2f}x |")
    print(f"| kept (req/s, lean path) | {base['kept']:,.0f} | {signed['kept']:,.0f} | "
          f"{signed['kept'] / base['kept']:.2f}x |")
    print(f"({args.repeat} wrk runs of {args.duration}s, 16 connections, one worker each; "
          f"{time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
