"""Bundles: ``mirror export`` / ``mirror import`` against ``skopeo copy`` to and from
``oci-archive:``, side by side in one run, for two bundle sizes (memory flat in size).

A real Distribution holds four OCI images whose layers (random bytes, stored gzip) add up
to each size. Per size and repeat:

- export, cold:  ``mirror export`` of the four images from an empty cache (every byte
  through the pull service from the registry) into one tar, against ``skopeo copy
  docker://... oci-archive:`` of each image from the same registry (four archives)
- export, warm:  ``mirror export`` again, from the cache it filled (skopeo has no cache:
  its figure is the cold one again, run again)
- export .zst:   ``mirror export -o FILE.tar.zst`` from the cache (skopeo writes no zstd)
- import:        ``mirror import`` of the tar into an empty cache, against ``skopeo copy
  oci-archive:... dir:`` of each archive (both read a local tar from the disk, not the
  page cache, check every digest and write every blob to local disk); and ``mirror
  import`` of the .zst

Before each step, dirty pages are written out (not timed): our side fsyncs what it
writes (a bundle, a cache entry), skopeo does not, and its writeback would otherwise be
paid by the step after it.

Throughput is bundle bytes over wall time ("MiB/s"), and over the time until what was
written is on disk ("MiB/s on disk": ours fsync before they return; skopeo does not, so
its outputs are fsync'ed after it returns, timed); peak memory is the highest summed RSS
of the process tree (sampled from /proc every 20 ms). Usage, from the repository root::

    .venv/bin/python -m benchmarks.bundle [--sizes 256MiB,1GiB] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from benchmarks.__main__ import parse_size
from benchmarks.measure import RssSampler, median
from benchmarks.seed import _upload_file, write_layer
from tests.support.images import Image, make_image
from tests.support.mirrorproc import mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 4
LAYERS = 2
MiB = 1 << 20


def _seed(registry: Registry, size: int, tag: str, workdir: Path) -> list[Image]:
    """Push IMAGES images whose layers add up to ``size`` bytes; layers streamed from disk."""
    images = []
    layer_size = size // (IMAGES * LAYERS)
    for i in range(IMAGES):
        repo = f"bundle/app-{i}"
        layers = []
        for j in range(LAYERS):
            path = workdir / f"{tag}-{i}-{j}.tar.gz"
            with path.open("wb") as out:
                layer = write_layer(layer_size, size // MiB * 100 + 10 * i + j, out)
            _upload_file(registry, repo, layer, path)
            path.unlink()
            layers.append(layer)
        image = make_image(repo, tag, layers=layers, fmt="oci")
        registry.push(image)  # layers are there: only the config and the manifest go up
        images.append(image)
    return images


Timing = tuple[float, float, float]  # wall seconds, peak RSS MiB, seconds until on disk
Key = tuple[str, str, str]  # step, case, tool


def _timed(cmd: Sequence[str | Path], env: dict[str, str] | None = None,
           durable: Sequence[Path] = ()) -> Timing:
    """Run ``cmd``; returns wall seconds, peak RSS (MiB) of its process tree, and the
    seconds until what it wrote is on disk (``durable``: its outputs, fsync'ed after it;
    ours fsync their own).

    Dirty pages of the step before are written out first (not timed): skopeo does not
    fsync what it writes, and its writeback would otherwise be paid by the next step.
    """
    os.sync()
    began = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    with RssSampler(proc.pid) as rss:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{err.decode()[-2000:]}")
    ended = time.monotonic()
    for path in durable:
        for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            fd = os.open(file, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return ended - began, rss.peak_mib, time.monotonic() - began


def _cold(paths: Sequence[Path]) -> None:
    """Drop files from the page cache: each import reads its bundle from the disk, as one
    carried in would be (the export left ours out of the cache already, skopeo's not)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed_all(cmds: Sequence[tuple[Sequence[str | Path], Path]], env: dict[str, str]) -> Timing:
    """Several commands one after the other, each with its output: total wall seconds,
    highest peak RSS, total seconds until on disk."""
    runs = [_timed(cmd, env, [out]) for cmd, out in cmds]
    return sum(r[0] for r in runs), max(r[1] for r in runs), sum(r[2] for r in runs)


def _skopeo_env(home: Path) -> dict[str, str]:
    closed = "http://127.0.0.1:1"
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost"}


def _mirror(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "mirror", *args, "-q"]


def run_size(registry: Registry, size: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    """Every figure of one bundle size (one record per repeat and measurement)."""
    tag = f"s{size // MiB}"
    images = _seed(registry, size, tag, work)
    refs = [f"{i.repo}:{tag}" for i in images]
    config = work / "mirror.yaml"
    records: list[dict[str, Any]] = []
    env = _skopeo_env(work)
    for n in range(repeat):
        cache = work / f"cache-{tag}-{n}"
        config.write_text(yaml.safe_dump(mirror_config(free_port(), cache, [
            {"name": "registry.test", "url": registry.url, "default": True}])))
        bundle, zst = work / "b.tar", work / "b.tar.zst"
        archives = [work / f"skopeo-{k}.tar" for k in range(IMAGES)]
        dirs = [work / f"dir-{k}" for k in range(IMAGES)]
        skopeo_export = [
            (["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
              f"docker://{registry.host}/{ref}", f"oci-archive:{archive}:{ref}"], archive)
            for ref, archive in zip(refs, archives, strict=True)]
        skopeo_import = [
            (["skopeo", "--insecure-policy", "copy", f"oci-archive:{archive}", f"dir:{out}"],
             out) for archive, out in zip(archives, dirs, strict=True)]
        exports: list[tuple[Key, Callable[[], Timing]]] = [
            (("export", "cold", "mirror"),
             partial(_timed, _mirror("export", "--config", config, *refs, "-o", bundle))),
            (("export", "cold", "skopeo"), partial(_timed_all, skopeo_export, env))]
        imports: list[tuple[Key, Callable[[], Timing]]] = [
            (("import", "tar", "mirror"),
             partial(_timed, _mirror("import", "--config", config, bundle))),
            (("import", "tar", "skopeo"), partial(_timed_all, skopeo_import, env))]
        if n % 2:  # every other repeat, skopeo goes first: no side gains from the order
            exports.reverse()
            imports.reverse()
        figures = {key: step() for key, step in exports}
        figures[("export", "warm", "mirror")] = _timed(_mirror("export", "--config", config,
                                                               *refs, "-o", bundle))
        figures[("export", ".zst warm", "mirror")] = _timed(_mirror(
            "export", "--config", config, *refs, "-o", zst))
        figures[("export", "warm", "skopeo")] = figures[("export", "cold", "skopeo")]
        shutil.rmtree(cache)
        _cold([bundle, zst, *archives])
        figures.update({key: step() for key, step in imports})
        shutil.rmtree(cache)
        figures[("import", ".zst", "mirror")] = _timed(_mirror("import", "--config", config,
                                                               zst))
        bundle_bytes = bundle.stat().st_size
        for (step, case, tool), (seconds, rss, durable) in figures.items():
            records.append({"size": size, "repeat": n, "step": step, "case": case,
                            "tool": tool, "seconds": seconds, "rss_mib": rss,
                            "mib_s": bundle_bytes / MiB / seconds,
                            "durable_mib_s": bundle_bytes / MiB / durable,
                            "bundle_bytes": bundle_bytes,
                            "zst_bytes": zst.stat().st_size})
        for path in (bundle, zst, *archives, *dirs, cache):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return records


def _value(records: list[dict[str, Any]], key: tuple[int, str, str, str],
           metric: str) -> float | None:
    """The median of ``metric`` over the records of (size, step, case, tool)."""
    values = [r[metric] for r in records
              if (r["size"], r["step"], r["case"], r["tool"]) == key]
    return median(values) if values else None


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table: medians of each figure, and mirror/skopeo."""
    lines = ["| bundle | step | case | metric | mirror | skopeo | mirror/skopeo |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    metrics = (("mib_s", "MiB/s ↑"), ("durable_mib_s", "MiB/s on disk ↑"),
               ("rss_mib", "peak RSS MiB ↓"))
    cases = [("export", "cold"), ("export", "warm"), ("export", ".zst warm"),
             ("import", "tar"), ("import", ".zst")]
    for size in sorted({r["size"] for r in records}):
        for step, case in cases:
            for metric, label in metrics:
                ours = _value(records, (size, step, case, "mirror"), metric)
                theirs = _value(records, (size, step, case, "skopeo"), metric)
                ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
                lines.append(f"| {size // MiB} MiB | {step} | {case} | {label} | "
                             f"{_fmt(ours)} | {_fmt(theirs)} | {ratio} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Seed, measure every size, print and write the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bundle")
    parser.add_argument("--sizes", default="256MiB,1GiB",
                        help="bundle sizes, comma-separated (default 256MiB,1GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (medians)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json and table.md "
                        "(default benchmarks/results/bundle-<UTC time>)")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "benchmarks" / "results" / f"bundle-{stamp}"
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        registry.start()
        try:
            for size in sizes:
                records += run_size(registry, size, args.repeat, Path(tmp))
        finally:
            registry.stop()
    text = table(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    print(text)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
