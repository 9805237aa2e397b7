"""The status page at ``/``: what the cache holds and does, for an operator.

Server-rendered HTML with inline CSS, no script and no external asset (it
works on an air-gapped network), reloading itself every few seconds. It
shows the cache size against its limit, hit ratio and bytes saved per
registry, the downloads in flight with their progress, the most pulled
images and the health of each upstream (circuit breaker, request budget,
rate limit left). Figures come from the same counters as ``/metrics``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mirror import metrics
from mirror.cache.inventory import human_size
from mirror.node import Node
from mirror.server.state import NODE, log_context

REFRESH_SECONDS = 5
TOP_IMAGES = 10
_BREAKER = {0: "closed", 1: "open", 2: "half-open"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{padding:.25em .8em;text-align:left;
border-bottom:1px solid #ddd}th{background:#eee}td.n{text-align:right;font-variant-numeric:
tabular-nums}.muted{color:#777}.bad{color:#b00;font-weight:600}.ok{color:#070}
progress{width:12em}code{font-size:.95em}
"""


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
    """Every sample of a metric for the node (every worker): ``(name, labels, value)``."""
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


async def status_page(request: web.Request) -> web.Response:
    """``GET /``: the status page."""
    log_context(request)["route"] = "status"
    state = request.app.get(NODE)
    body = render(state) if state is not None else _page("<p>Starting.</p>")
    return web.Response(text=body, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def render(state: Node) -> str:
    """The whole page for the current state."""
    names = [u.name for u in state.settings.upstreams]
    parts = [
        _cache_section(state),
        _registries_section(registry_figures(names)),
        _downloads_section(state),
        _popular_section(state.popularity.top(TOP_IMAGES)),
        _health_section(state, names),
    ]
    return _page("".join(parts))


def _page(content: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=refresh content={REFRESH_SECONDS}>"
            f"<meta name=viewport content='width=device-width'>"
            f"<title>mirror status</title><style>{_CSS}</style></head><body>"
            f"<h1>mirror</h1><p class=muted>as of {stamp}; reloads every "
            f"{REFRESH_SECONDS} s; figures since the mirror started</p>{content}"
            f"</body></html>")


def _cache_section(state: Node) -> str:
    used = state.store.index.total_bytes
    entries = state.store.index.total_entries
    limit = state.settings.storage.max_size
    if limit:
        share = used / limit
        gauge = (f"<progress id=cache-gauge max={limit} value={min(used, limit)}></progress> "
                 f"<span id=cache-used>{human_size(used)}</span> of "
                 f"<span id=cache-limit>{human_size(limit)}</span> ({share:.1%})")
    else:
        gauge = (f"<span id=cache-used>{human_size(used)}</span>, "
                 f"<span id=cache-limit>no limit</span>")
    pinned = total(metrics.CACHE_PINNED_BYTES)
    return (f"<h2>Cache</h2><p>{gauge} in <span id=cache-entries>{entries}</span> entries; "
            f"pinned {human_size(int(pinned))}</p>")


def _registries_section(figures: list[RegistryFigures]) -> str:
    rows = []
    for f in figures:
        ratio = f"{f.hit_ratio:.1%}" if f.hit_ratio is not None else "n/a"
        rows.append(
            f"<tr data-registry='{_e(f.name)}'><td><code>{_e(f.name)}</code></td>"
            f"<td class='n hit-ratio'>{ratio}</td><td class=n>{int(f.requests)}</td>"
            f"<td class='n served'>{human_size(int(f.served))}</td>"
            f"<td class=n>{human_size(int(f.downloaded))}</td>"
            f"<td class='n saved'>{human_size(int(f.saved))}</td>"
            f"<td class=n>{human_size(int(f.cached))}</td></tr>")
    head = ("<tr><th>registry</th><th>hit ratio</th><th>requests</th><th>served</th>"
            "<th>downloaded</th><th>saved</th><th>cached</th></tr>")
    return f"<h2>Registries</h2><table id=registries>{head}{''.join(rows)}</table>"


def _downloads_section(state: Node) -> str:
    fills = sorted(state.fetcher.fills(), key=lambda f: str(f.digest))
    if not fills:
        return "<h2>Downloads in flight</h2><p id=downloads class=muted>none</p>"
    rows = []
    for fill in fills:
        size = fill.size or fill.expected_size
        if size:
            progress = (f"<progress max={size} value={min(fill.written, size)}></progress> "
                        f"{fill.written / size:.0%}")
        else:
            progress = "<progress></progress>"
        rows.append(f"<tr class=download><td><code>{_e(str(fill.digest)[:19])}…</code></td>"
                    f"<td>{_e(fill.registry)} ({_e(fill.source or 'starting')})</td>"
                    f"<td class=n>{human_size(fill.written)}</td>"
                    f"<td class=n>{human_size(size) if size else '?'}</td>"
                    f"<td>{progress}</td><td class=n>{fill.readers}</td></tr>")
    head = ("<tr><th>digest</th><th>from</th><th>received</th><th>size</th><th>progress</th>"
            "<th>readers</th></tr>")
    return f"<h2>Downloads in flight</h2><table id=downloads>{head}{''.join(rows)}</table>"


def _popular_section(top: list[tuple[str, int]]) -> str:
    if not top:
        return "<h2>Most pulled images</h2><p id=popular class=muted>none yet</p>"
    rows = "".join(f"<tr><td><code>{_e(image)}</code></td><td class=n>{count}</td></tr>"
                   for image, count in top)
    return ("<h2>Most pulled images</h2><table id=popular><tr><th>image (by tag)</th>"
            f"<th>pulls</th></tr>{rows}</table>")


def _health_section(state: Node, names: list[str]) -> str:
    rows = []
    for name in names:
        breaker = _BREAKER.get(int(total(metrics.BREAKER_STATE, registry=name)), "?")
        css = "ok" if breaker == "closed" else "bad"
        budget = state.settings.upstreams[names.index(name)].budget
        client = state.clients.get(name)
        if budget is None or client is None or client.guard.budget is None:
            budget_text = "<span class=muted>no budget</span>"
        else:
            level, burst = client.guard.budget.left()
            budget_text = (f"<span class=budget-left>{int(level)}</span> of {int(burst)} left "
                           f"at {budget.rate:g}/s; waits "
                           f"{int(total(metrics.BUDGET_WAITS, registry=name))}, refused "
                           f"{int(total(metrics.BUDGET_REFUSALS, registry=name))}")
        rows.append(f"<tr data-registry='{_e(name)}'><td><code>{_e(name)}</code></td>"
                    f"<td class='{css} breaker'>{breaker}</td><td>{budget_text}</td>"
                    f"<td>{_ratelimit(name)}</td>"
                    f"<td class=n>{int(total(metrics.UPSTREAM_ERRORS, registry=name))}</td></tr>")
    head = ("<tr><th>registry</th><th>breaker</th><th>budget</th><th>rate limit left</th>"
            "<th>errors</th></tr>")
    return f"<h2>Upstream health</h2><table id=health>{head}{''.join(rows)}</table>"


def _ratelimit(name: str) -> str:
    limits = {labels.get("credential", ""): value
              for _n, labels, value in samples(metrics.RATELIMIT_LIMIT)
              if labels.get("registry") == name}
    left = [(labels.get("credential", ""), value)
            for _n, labels, value in samples(metrics.RATELIMIT_REMAINING)
            if labels.get("registry") == name]
    if not left:
        return "<span class=muted>not reported</span>"
    parts = []
    for credential, value in sorted(left):
        limit = limits.get(credential)
        of = f" of {int(limit)}" if limit else ""
        parts.append(f"{_e(credential)}: {int(value)}{of}")
    return "; ".join(parts)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
