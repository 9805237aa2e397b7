"""Medians, ratios from side-by-side runs, the table, the JSON and the chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import median
from benchmarks.scenarios import Record, as_json
from benchmarks.targets import (
    ALL_TARGETS,
    BARE,
    BASELINE,
    DISTRIBUTION,
    MIRROR,
    MIRROR2,
    NGINX,
    SENDFILE,
    SENDFILE2,
)

# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "wall_s": ("wall s", False),
    "mib_s": ("MiB/s", True),
    "upstream_ratio": ("upstream/unique bytes", False),
    "upstream_requests": ("upstream requests", False),
    "upstream_blob_requests": ("upstream blob requests", False),
    "ttfb_p50_s": ("TTFB p50 s", False),
    "ttfb_p99_s": ("TTFB p99 s", False),
    "rps": ("req/s", True),
    "peak_rss_mib": ("peak RSS MiB", False),
    "process_rss_mib": ("largest process RSS MiB", False),
    "failed_transfers": ("failed transfers", False),
}
SHOWN: dict[str, tuple[str, ...]] = {
    "cold": ("wall_s", "mib_s", "upstream_ratio"),
    "warm": ("wall_s", "upstream_requests", "upstream_blob_requests"),
    "herd": ("wall_s", "ttfb_p50_s", "ttfb_p99_s", "upstream_ratio", "failed_transfers"),
    "hot": ("mib_s", "rps"),
    "tags": ("rps", "upstream_requests"),
    "memory": ("peak_rss_mib", "process_rss_mib"),
}
#: The ratios shown, ours/peer: one process against each peer, the lean path against the
#: bare aiohttp handler, two workers against one and against nginx with two workers.
PAIRS = ((MIRROR, DISTRIBUTION), (MIRROR, NGINX), (MIRROR, SENDFILE), (MIRROR, BARE),
         (MIRROR2, MIRROR), (MIRROR2, SENDFILE2), (MIRROR, BASELINE), (BASELINE, BARE))


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of a scenario case on every target."""

    scenario: str
    case: str
    metric: str
    client: str
    values: dict[str, float]
    ratios: dict[str, float]


def _value(records: Sequence[Record], target: str, repeat: int, metric: str) -> float | None:
    for r in records:
        if r.target == target and r.repeat == repeat and metric in r.metrics:
            return r.metrics[metric]
    return None


def _ratio(records: Sequence[Record], pair: tuple[str, str], metric: str) -> float:
    """Median over repeats of ours/peer, each taken from the same repeat."""
    ratios = []
    for repeat in sorted({r.repeat for r in records}):
        ours, theirs = (_value(records, t, repeat, metric) for t in pair)
        if ours is not None and theirs:
            ratios.append(ours / theirs)
    return median(ratios)


def rows(records: Sequence[Record]) -> list[Row]:
    """Every shown metric of every (scenario, case), in the order they ran."""
    cases = list(dict.fromkeys((r.scenario, r.case) for r in records))
    order = list(SHOWN)
    cases.sort(key=lambda c: order.index(c[0]))
    out = []
    for scenario, case in cases:
        group = [r for r in records if (r.scenario, r.case) == (scenario, case)]
        for metric in SHOWN[scenario]:
            values = {t: median(r.metrics[metric] for r in group if r.target == t)
                      for t in ALL_TARGETS if any(r.target == t for r in group)}
            ratios = {f"{a}/{b}": _ratio(group, (a, b), metric) for a, b in PAIRS}
            out.append(Row(scenario, case, metric, group[0].client, values, ratios))
    return out


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def table(table_rows: Sequence[Row]) -> str:
    """A Markdown table: median per target and median ratios ours/peer."""
    shown = [t for t in ALL_TARGETS if any(t in row.values for row in table_rows)]
    pairs = [f"{a}/{b}" for a, b in PAIRS
             if any(not math.isnan(row.ratios.get(f"{a}/{b}", math.nan)) for row in table_rows)]
    head = ["scenario", "case", "metric", "client", *shown, *pairs]
    lines = [head, ["---"] * len(head)]
    for row in table_rows:
        label, higher = METRICS[row.metric]
        lines.append([row.scenario, row.case, f"{label} {'↑' if higher else '↓'}", row.client,
                      *(_fmt(row.values.get(t)) for t in shown),
                      *(_ratio_text(row.ratios.get(p)) for p in pairs)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     + " |" for line in lines)


def write_json(path: Path, records: Sequence[Record], table_rows: Sequence[Row],
               meta: dict[str, Any]) -> None:
    """Raw records, medians and ratios, and the run's settings."""
    doc = {"meta": meta, "records": as_json(list(records)),
           "medians": [row.__dict__ for row in table_rows]}
    path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True))


def chart(path: Path, table_rows: Sequence[Row]) -> str | None:
    """Draw one bar panel per row into a PNG; return a note if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 (optional: the run works without it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    cols = 4
    count = len(table_rows)
    rows_n = max(1, (count + cols - 1) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    colors = dict(zip(ALL_TARGETS, ("#1f77b4", "#d62728", "#2ca02c", "#98df8a", "#7f7f7f",
                                    "#17becf", "#bcbd22", "#ff7f0e", "#9467bd"), strict=True))
    for ax, row in zip(axes.flat, table_rows, strict=False):
        names = [t for t in ALL_TARGETS if t in row.values]
        values = [0.0 if math.isnan(row.values[t]) else row.values[t] for t in names]
        ax.bar(names, values, color=[colors[t] for t in names])
        label, higher = METRICS[row.metric]
        ax.set_title(f"{row.scenario} {row.case}\n{label} ({'higher' if higher else 'lower'}"
                     " is better)", fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
