"""Small charts for the status page, drawn as inline SVG (no script, no external asset).

Each chart covers a fixed window of ``slots`` minutes with "now" at the right
edge, so a young process fills it from the right. Values are escaped numbers and
fixed labels only; nothing a client sent is drawn.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH = 380
HEIGHT = 96
_PAD_LEFT = 46
_PAD_RIGHT = 6
_PAD_TOP = 8
_PAD_BOTTOM = 18


@dataclass(frozen=True)
class Series:
    """One line (or the bars) of a chart."""

    name: str
    values: Sequence[float | None]  # oldest first; None is a gap
    color: str


def line_chart(chart_id: str, title: str, series: Sequence[Series], *, slots: int,
               label: Callable[[float], str], y_max: float | None = None) -> str:
    """A line chart of one or more series over the last ``slots`` minutes.

    Args:
        chart_id: the ``id`` of the ``<svg>`` element.
        title: what the chart shows (its accessible name).
        series: the lines, drawn in order.
        slots: the minutes the x axis spans.
        label: formats a value for the y axis.
        y_max: the top of the y axis (default: the largest value, at least 1).
    """
    top = y_max if y_max is not None else _largest(series)
    body = []
    for line in series:
        for run in _runs(line.values, slots, top):
            if len(run) == 1:
                x, y = run[0]
                body.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2' fill='{line.color}'/>")
            else:
                points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                body.append(f"<polyline points='{points}' fill='none' stroke='{line.color}' "
                            "stroke-width='1.8' stroke-linejoin='round'/>")
    return _frame(chart_id, title, "".join(body), series, top=top, label=label, slots=slots)


def bar_chart(chart_id: str, title: str, bars: Series, *, slots: int,
              label: Callable[[float], str]) -> str:
    """A bar per minute over the last ``slots`` minutes (``None`` draws nothing)."""
    top = _largest([bars])
    width = (WIDTH - _PAD_LEFT - _PAD_RIGHT) / slots
    body = []
    for x, y in _positions(bars.values, slots, top):
        height = HEIGHT - _PAD_BOTTOM - y
        if height > 0:
            body.append(f"<rect x='{x - width / 2 + 0.5:.1f}' y='{y:.1f}' "
                        f"width='{max(width - 1, 1):.1f}' height='{height:.1f}' "
                        f"fill='{bars.color}'/>")
    return _frame(chart_id, title, "".join(body), [bars], top=top, label=label, slots=slots)


def _largest(series: Sequence[Series]) -> float:
    found = [v for s in series for v in s.values if v is not None]
    return max([*found, 1.0])


def _positions(values: Sequence[float | None], slots: int,
               top: float) -> list[tuple[float, float]]:
    """``(x, y)`` of each value that is not ``None``; the last value sits at "now"."""
    span_x = WIDTH - _PAD_LEFT - _PAD_RIGHT
    span_y = HEIGHT - _PAD_TOP - _PAD_BOTTOM
    recent = list(values)[-slots:]
    offset = slots - len(recent)
    found = []
    for i, value in enumerate(recent):
        if value is None:
            continue
        x = _PAD_LEFT + span_x * (offset + i + 1) / slots
        y = HEIGHT - _PAD_BOTTOM - span_y * min(max(value / top, 0.0), 1.0)
        found.append((x, y))
    return found


def _runs(values: Sequence[float | None], slots: int,
          top: float) -> list[list[tuple[float, float]]]:
    """The points of a line, split where a value is missing."""
    runs: list[list[tuple[float, float]]] = [[]]
    recent = list(values)[-slots:]
    points = iter(_positions(recent, slots, top))
    for value in recent:
        if value is None:
            runs.append([])
        else:
            runs[-1].append(next(points))
    return [run for run in runs if run]


def _frame(chart_id: str, title: str, body: str, series: Sequence[Series], *, top: float,
           label: Callable[[float], str], slots: int) -> str:
    bottom = HEIGHT - _PAD_BOTTOM
    right = WIDTH - _PAD_RIGHT
    mid = (_PAD_TOP + bottom) / 2
    grid = (f"<line x1='{_PAD_LEFT}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='#bbb'/>"
            f"<line x1='{_PAD_LEFT}' y1='{_PAD_TOP}' x2='{right}' y2='{_PAD_TOP}' "
            "stroke='#eee'/>"
            f"<line x1='{_PAD_LEFT}' y1='{mid}' x2='{right}' y2='{mid}' stroke='#eee'/>")
    axis = (f"<text x='{_PAD_LEFT - 4}' y='{_PAD_TOP + 4}' text-anchor='end'>"
            f"{_e(label(top))}</text>"
            f"<text x='{_PAD_LEFT - 4}' y='{bottom + 3}' text-anchor='end'>{_e(label(0))}</text>"
            f"<text x='{_PAD_LEFT}' y='{HEIGHT - 4}'>-{slots} min</text>"
            f"<text x='{right}' y='{HEIGHT - 4}' text-anchor='end'>now</text>")
    legend = "".join(f"<span class=key><i style='background:{s.color}'></i>{_e(s.name)}"
                     f"{_latest(s, label)}</span>" for s in series)
    return (f"<figure class=chart><figcaption>{_e(title)} {legend}</figcaption>"
            f"<svg id='{_e(chart_id)}' role='img' aria-label='{_e(title)}' "
            f"viewBox='0 0 {WIDTH} {HEIGHT}' width='{WIDTH}' height='{HEIGHT}' "
            "font-size='10' fill='#666'>"
            f"<title>{_e(title)}</title>{grid}{body}{axis}</svg></figure>")


def _latest(series: Series, label: Callable[[float], str]) -> str:
    """The value of the minute under way, e.g. `` 92%``, if there is one."""
    value = series.values[-1] if series.values else None
    return f" <b>{_e(label(value))}</b>" if value is not None else ""


def _e(text: str) -> str:
    return html.escape(text, quote=True)
