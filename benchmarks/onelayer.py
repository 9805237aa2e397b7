"""What the one-layer benchmarks (lazy, fleet) share: their options, work folder, the
throttled upstream and the count of the layer's bytes it sent."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.__main__ import parse_size
from tests.support.registry import Registry
from tests.support.throttle import ThrottledProxy

MiB = 1 << 20


def add_layer_options(parser: argparse.ArgumentParser, size: str, smoke: int) -> None:
    """``--size`` (default ``size``), ``--rate``, ``--smoke`` (a ``smoke``-byte layer) and
    ``--workdir`` of a benchmark that pulls one large layer through a throttled upstream."""
    parser.add_argument("--size", type=parse_size, default=parse_size(size),
                        help=f"random content of the layer (default {size})")
    parser.add_argument("--rate", type=parse_size, default=parse_size("50MiB"),
                        help="upstream bytes per second per connection")
    parser.add_argument("--smoke", action="store_true", help=f"{smoke // MiB} MiB layer")
    parser.add_argument("--workdir", type=Path)


@contextmanager
def work_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given`` (created if need be, kept), or a temporary folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = given or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


@contextmanager
def throttled_upstream(work: Path, rate: float) -> Iterator[tuple[Registry, ThrottledProxy]]:
    """Distribution in ``work/registry`` behind a proxy that sends ``rate`` bytes/s per
    connection; both stopped at the end."""
    registry = Registry(work / "registry")
    registry.start()
    proxy = ThrottledProxy("127.0.0.1", registry.port, rate)
    proxy.start()
    try:
        yield registry, proxy
    finally:
        proxy.stop()
        registry.stop()


def layer_bytes_sent(registry: Registry, mark: int, digest: str) -> int:
    """The bytes of blob ``digest`` the registry sent since ``mark`` (clear_log_mark)."""
    return sum(e.bytes for e in registry.requests_since(mark)
               if e.method == "GET" and digest in e.path)
