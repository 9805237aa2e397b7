"""The status page's figures: read from the counters of :mod:`mirror.metrics`.

:func:`samples` is the one place the page reads a metric. It reads this
process's counters; with worker processes, a node-wide reader (every worker's
counters merged) replaces it here, and every figure and chart on the page
follows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mirror import metrics
from mirror.server.history import Totals


@dataclass(frozen=True)
class RegistryFigures:
    """What the page shows of one registry."""

    name: str
    hits: float
    requests: float
    served: float
    downloaded: float
    cached: float

    @property
    def hit_ratio(self) -> float | None:
        """Share of blob and manifest requests answered from the cache, if any came."""
        return self.hits / self.requests if self.requests else None

    @property
    def saved(self) -> float:
        """Bytes served that were not downloaded upstream."""
        return max(self.served - self.downloaded, 0.0)


def samples(metric: Any) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a metric for the node: ``(name, labels, value)``, summed over every
    worker process (the page's one figure source)."""
    return metrics.node_samples(metric)


def total(metric: Any, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(value for _name, have, value in samples(metric)
               if all(have.get(k) == v for k, v in labels.items()))


def registry_figures(names: Iterable[str]) -> list[RegistryFigures]:
    """Hit ratio, served, downloaded and cached bytes of each configured registry."""
    figures = []
    for name in names:
        figures.append(RegistryFigures(
            name=name,
            hits=total(metrics.REGISTRY_CACHE_RESULTS, registry=name, result="hit"),
            requests=total(metrics.REGISTRY_CACHE_RESULTS, registry=name),
            served=total(metrics.REGISTRY_SERVED_BYTES, registry=name),
            downloaded=total(metrics.UPSTREAM_BYTES, registry=name),
            cached=total(metrics.REGISTRY_CACHE_BYTES, registry=name),
        ))
    return figures


def node_totals(at: float) -> Totals:
    """The counters the charts follow, summed over every registry."""
    return Totals(at=at, hits=total(metrics.REGISTRY_CACHE_RESULTS, result="hit"),
                  requests=total(metrics.REGISTRY_CACHE_RESULTS),
                  served=total(metrics.REGISTRY_SERVED_BYTES),
                  downloaded=total(metrics.UPSTREAM_BYTES),
                  upstream_errors=total(metrics.UPSTREAM_ERRORS))


