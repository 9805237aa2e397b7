"""Lazy pulling benchmark: a cold eStargz layer's lazy start through the mirror.

::

    python3 -m benchmarks.lazy                       # 256 MiB layer, upstream at 50 MiB/s
    python3 -m benchmarks.lazy --size 1GiB           # the issue's layer (minutes to convert)
    python3 -m benchmarks.lazy --baseline-src DIR    # also a mirror run from another checkout
    python3 -m benchmarks.lazy --smoke               # 16 MiB, a few seconds

A layer of random bytes is pushed to a real Distribution and converted to eStargz by
the real converter (``ctr-remote images convert --estargz --oci`` in a private
containerd). Then, side by side in one run, each target cold, behind one throttled
connection per request (a WAN link), the stargz snapshotter's reads are replayed:

1. the 51-byte footer (``Range: bytes=-51``);
2. the table of contents (one range, found from the footer);
3. the first 10 chunks, in one multi-range request;

and then a full pull of the same layer. Targets: the upstream directly (the
baseline), the mirror, Distribution's pull-through proxy, and with ``--baseline-src``
the mirror of another source tree (e.g. ``main`` before lazy pulling). Figures:
seconds to each step from the first request, the lazy start's ratio to going to the
upstream directly, and upstream bytes (lazy start + full pull) per layer byte, from
the upstream's access log.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.onelayer import (
    add_layer_options,
    layer_bytes_sent,
    throttled_upstream,
    work_folder,
)
from benchmarks.seed import _upload_file, write_layer
from tests.support import estargz
from tests.support.containerd import Containerd
from tests.support.images import make_image
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port
from tests.support.registry import Registry

MiB = 1 << 20
REPO = "bench/lazy"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Layer:
    """The eStargz layer under test and the ranges of a lazy start."""

    digest: str
    size: int
    reads: estargz.LazyReads


@dataclass
class Row:
    """One target's figures."""

    target: str
    footer: float
    toc: float
    chunks: float
    full: float
    upstream_bytes: int
    statuses: str  # of the footer, TOC and chunks requests: 200 means the whole blob


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(work: Path, size: int, registry: Registry) -> Layer:
    """Push a ``size`` layer, convert the image to eStargz, find its lazy-start ranges."""
    with (work / "layer.tar.gz").open("wb") as out:
        blob = write_layer(size, 2323, out)
    image = make_image(REPO, "v1", layers=[blob], fmt="oci")
    _upload_file(registry, REPO, blob, work / "layer.tar.gz")
    registry.push(image)
    daemon = Containerd(work / "containerd")
    daemon.start()
    try:
        started = time.monotonic()
        estargz.convert(daemon.socket, registry.host, f"{REPO}:v1", f"{REPO}:esgz", timeout=1800)
        _log(f"lazy: converted to eStargz in {time.monotonic() - started:.0f}s")
    finally:
        daemon.stop()
    request = urllib.request.Request(f"{registry.url}/v2/{REPO}/manifests/esgz",
                                     headers={"Accept": OCI_MANIFEST})
    with _DIRECT.open(request) as resp:
        layer = max(json.loads(resp.read())["layers"], key=lambda d: d["size"])
    digest, total = layer["digest"], layer["size"]
    url = f"{registry.url}/v2/{REPO}/blobs/{digest}"
    footer = _range(url, total - estargz.FOOTER_SIZE, total)
    start = estargz.toc_offset(footer)
    toc = _range(url, start, total - estargz.FOOTER_SIZE)
    return Layer(digest, total, estargz.lazy_reads(total, footer, toc_member=toc))


def _range(url: str, start: int, end: int) -> bytes:
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    with _DIRECT.open(request) as resp:
        return bytes(resp.read())


async def _fetch(session: aiohttp.ClientSession, url: str,
                 header: str | None) -> tuple[int, bytes]:
    headers = {"Range": header} if header else {}
    async with session.get(url, headers=headers) as resp:
        if resp.status not in (200, 206):
            raise RuntimeError(f"{url} ({header}): {resp.status}")
        return resp.status, await resp.read()


async def lazy_start(base: str, layer: Layer) -> tuple[list[float], str]:
    """Seconds to the footer, the TOC, the 10 chunks, then the whole verified layer; and
    the statuses of the three lazy requests (a 200 brings the whole blob: what a peer
    that ignores ranges answers, the lazy client waiting for all of it)."""
    url = f"{base}/v2/{REPO}/blobs/{layer.digest}"
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                     auto_decompress=False) as session:
        started = time.perf_counter()
        marks, statuses = [], []
        for spans in ([layer.reads.footer], [layer.reads.toc], layer.reads.chunks):
            status, body = await _fetch(session, url, estargz.range_header(spans))
            if status == 206 and len(spans) == 1 and len(body) != spans[0][1] - spans[0][0]:
                raise RuntimeError(f"{base}: {len(body)} bytes for {spans}")
            marks.append(time.perf_counter() - started)
            statuses.append(str(status))
        _, whole = await _fetch(session, url, None)
        if "sha256:" + hashlib.sha256(whole).hexdigest() != layer.digest:
            raise RuntimeError(f"{base}: wrong bytes for the whole layer")
        marks.append(time.perf_counter() - started)
    return marks, "/".join(statuses)


@contextmanager
def _mirror(work: Path, name: str, upstream: str, source: Path | None) -> Iterator[str]:
    config = mirror_config(free_port(), work / f"cache-{name}",
                           [{"name": "registry.test", "url": upstream, "default": True}])
    config["log"] = {"format": "json", "level": "warning"}
    node = MirrorProcess(work / f"node-{name}", config, source=source)
    node.start(timeout=30)
    try:
        yield node.url
    finally:
        node.stop()


@contextmanager
def _distribution(work: Path, upstream: str) -> Iterator[str]:
    proxy = Registry(work / "distribution-proxy", proxy_remote=upstream)
    proxy.start()
    try:
        yield proxy.url
    finally:
        proxy.stop()


@contextmanager
def _direct(url: str) -> Iterator[str]:
    yield url


def run(size: int, rate: float, work: Path, baseline_src: Path | None) -> tuple[Layer, list[Row]]:
    rows = []
    with throttled_upstream(work, rate) as (registry, proxy):
        layer = prepare(work, size, registry)
        targets = [("upstream directly", _direct(proxy.url)),
                   ("mirror", _mirror(work, "mirror", proxy.url, None)),
                   ("Distribution proxy", _distribution(work, proxy.url))]
        if baseline_src is not None:
            targets.append((f"mirror ({baseline_src.name})",
                            _mirror(work, "baseline", proxy.url, baseline_src)))
        for name, target in targets:
            with target as base:
                mark = registry.clear_log_mark()
                marks, statuses = asyncio.run(lazy_start(base, layer))
                fetched = layer_bytes_sent(registry, mark, layer.digest)
            footer, toc, chunks, full = marks
            rows.append(Row(name, footer, toc, chunks, full, fetched, statuses))
            _log(f"lazy: {name}: footer {marks[0]:.3f}s, chunks {marks[2]:.3f}s")
    return layer, rows


def table(layer: Layer, rows: list[Row], rate: float) -> str:
    """The figures, and ratios against the upstream directly."""
    base = rows[0]
    lines = [f"eStargz layer {layer.size / MiB:.0f} MiB ({len(layer.reads.chunks)} chunks "
             f"read), upstream {rate / MiB:.0f} MiB/s per connection, every target cold", "",
             "| target | footer s | TOC s | 10 chunks s | lazy start x upstream | answers | "
             "full pull after s | upstream bytes / layer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = row.chunks / base.chunks if base.chunks else 0.0
        lines.append(f"| {row.target} | {row.footer:.3f} | {row.toc:.3f} | {row.chunks:.3f} "
                     f"| {ratio:.2f}x | {row.statuses} | {row.full:.2f} "
                     f"| {row.upstream_bytes / layer.size:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.lazy")
    add_layer_options(parser, "256MiB", smoke=16 * MiB)
    parser.add_argument("--baseline-src", type=Path,
                        help="also run the mirror of this source tree (e.g. a main checkout)")
    args = parser.parse_args(argv)
    size = 16 * MiB if args.smoke else args.size
    with work_folder(args.workdir, "lazy-bench-") as work:
        layer, rows = run(size, args.rate, work, args.baseline_src)
    print(table(layer, rows, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
