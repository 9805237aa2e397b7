"""Cached images with the signature policy on vs off, as served (issue 22's >= 0.95x).

Two real mirror processes side by side in front of one real Distribution holding an image
signed per cosign's SIGNATURE_SPEC: one with no ``policy:``, one with a keyed ``enforce``
rule that the image passes (and an ``audit:`` trail, in a third run). Each is warmed (the
manifest by tag and by digest once, so the verdict is kept), then ``wrk`` asks each in
turn, ``--repeat`` times, for the manifest by digest and by tag:

- ``lean path``: the default; kept answers are replayed ahead of routing;
- ``full path``: an admin listener is configured, which turns the lean path off, so every
  answer goes through the pull service and the gate (the path with client auth).

Each row prints requests/s (median of the runs) for off, on and on+audit, and the ratios
to off. Usage::

    .venv/bin/python -m benchmarks.policy_serving [--duration 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lean import run_wrk
from tests.support import cosign_sign as cs
from tests.support.cosign_push import push_legacy
from tests.support.images import make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
VARIANTS = ("off", "on", "on+audit")


def _config(folder: Path, registry: Registry, variant: str, full: bool) -> dict[str, Any]:
    config = mirror_config(free_port(), folder / "cache",
                           [{"name": "registry.test", "url": registry.url, "default": True}])
    config["log"] = {"format": "json", "level": "warning"}  # no access line on either
    if full:
        config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    if variant != "off":
        config["policy"] = {"keys": [{"name": "release", "file": str(folder.parent / "k.pub")}],
                            "rules": [{"repositories": ["acme/*"], "require": ["release"]}]}
    if variant == "on+audit":
        config["audit"] = {"file": str(folder / "audit.jsonl")}
    return config


def measure(duration: int, repeat: int, connections: int,
            paths: tuple[bool, ...] = (False, True)) -> list[tuple[str, dict[str, float]]]:
    """Requests/s per (path, reference) row and variant."""
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        root = Path(tmp)
        key = cs.new_key()
        (root / "k.pub").write_bytes(cs.public_pem(key))
        registry = Registry(root / "registry")
        registry.start()
        try:
            image = make_image("acme/app", "v1", layers=[make_layer(4096, seed=1)], fmt="oci")
            registry.push(image)
            push_legacy(registry, "acme/app", image.manifest.digest, key)
            for full in paths:
                rows += _path_rows(root, registry, image.manifest.digest, full=full,
                                   duration=duration, repeat=repeat, connections=connections)
        finally:
            registry.stop()
    return rows


def _path_rows(root: Path, registry: Registry, digest: str, *, full: bool, duration: int,
               repeat: int, connections: int) -> list[tuple[str, dict[str, float]]]:
    path = "full path" if full else "lean path"
    mirrors = {v: MirrorProcess(root / f"{path[:4]}-{v}".replace("+", "-"),
                                _config(root / f"{path[:4]}-{v}".replace("+", "-"), registry,
                                        v, full)) for v in VARIANTS}
    try:
        for mirror in mirrors.values():
            mirror.start(timeout=30)
        refs = {"by digest": digest, "by tag": "v1"}
        figures: dict[str, dict[str, list[float]]] = {r: {v: [] for v in VARIANTS}
                                                      for r in refs}
        for _ in range(repeat):
            for ref_name, ref in refs.items():
                for variant, mirror in mirrors.items():
                    url = f"{mirror.url}/v2/acme/app/manifests/{ref}"
                    run_wrk(url, method="GET", headers=ACCEPT, connections=connections,
                            duration=1)  # warm: the verdict is kept, the answer too
                    result = run_wrk(url, method="GET", headers=ACCEPT,
                                     connections=connections, duration=duration)
                    if result.errors:
                        raise RuntimeError(f"{path} {variant} {ref_name}: {result.errors} "
                                           "errors")
                    figures[ref_name][variant].append(result.rps)
        return [(f"{path}, manifest {r}", {v: statistics.median(figures[r][v])
                                           for v in VARIANTS}) for r in refs]
    finally:
        for mirror in mirrors.values():
            mirror.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--path", choices=("lean", "full", "both"), default="both")
    args = parser.parse_args()
    started = time.monotonic()
    paths = {"lean": (False,), "full": (True,), "both": (False, True)}[args.path]
    rows = measure(args.duration, args.repeat, args.connections, paths)
    print(f"{'case':<32} {'off req/s':>10} {'on req/s':>10} {'on+audit':>10} "
          f"{'on/off':>7} {'audit/off':>9}")
    for name, rps in rows:
        print(f"{name:<32} {rps['off']:>10.0f} {rps['on']:>10.0f} {rps['on+audit']:>10.0f} "
              f"{rps['on'] / rps['off']:>7.2f} {rps['on+audit'] / rps['off']:>9.2f}")
    print(f"({args.repeat} runs of {args.duration}s per figure, {args.connections} "
          f"connections, one worker each; {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
