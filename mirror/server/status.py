"""The status page at ``/``: what an operator asks first, then what the cache does.

Server-rendered HTML with inline CSS and inline SVG charts, no script and no
external asset (it works on an air-gapped network), reloading itself every few
seconds:

- the node: version, uptime, listen address, TLS, workers, disk used and free
  against the cache's cap, links to ``/metrics`` and the admin API;
- charts of the last hour: hit ratio, bytes served vs downloaded, upstream
  errors (:mod:`mirror.server.history` keeps a sample a minute);
- per registry: hit ratio, bytes served, downloaded, saved; upstream health
  (breaker, budget, rate limit left, errors);
- sync rules with their last run and failures; peers and the S3 tier;
- the last errors and refusals; downloads in flight; the most pulled images.

Every counter figure comes through :func:`mirror.server.figures.samples`, the
page's one figure source: swap it for a node-wide reader and the whole page
(charts included) shows the node.
"""

from __future__ import annotations

import asyncio
import html
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from mirror import metrics
from mirror.cache.inventory import human_size
from mirror.node import Node
from mirror.server import status_parts as parts
from mirror.server.figures import RegistryFigures, node_totals, registry_figures, total
from mirror.server.history import (
    HISTORY,
    INCIDENT_LOG,
    SHARED,
    History,
    Incidents,
    NodeView,
    SharedIncidents,
)
from mirror.server.state import NODE, log_context
from mirror.version import VERSION

REFRESH_SECONDS = 5
TOP_IMAGES = 10


@dataclass(frozen=True)
class Disk:
    """The filesystem that holds the storage folder."""

    total: int
    used: int
    free: int


async def history_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the per-minute samples and the last problems, for the page."""
    history = History(node_totals)
    incidents = Incidents()
    app[HISTORY] = history
    app[INCIDENT_LOG] = incidents
    tasks = [asyncio.ensure_future(history.run())]
    node = app.get(NODE)
    if node is not None:
        shared = SharedIncidents(node.settings.storage.path / "status", node.worker.index,
                                 history.started)
        app[SHARED] = shared
        tasks.append(asyncio.ensure_future(shared.run(incidents)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def status_page(request: web.Request) -> web.Response:
    """``GET /``: the status page."""
    log_context(request)["route"] = "status"
    state = request.app.get(NODE)
    if state is None:
        body = _page("<p>Starting.</p>")
    else:
        disk = await asyncio.to_thread(disk_of, state)
        shared, incidents = request.app.get(SHARED), request.app.get(INCIDENT_LOG)
        own = incidents.latest() if incidents is not None else []
        view = await asyncio.to_thread(shared.read, own) if shared is not None else None
        body = render(state, disk=disk, history=request.app.get(HISTORY),
                      incidents=incidents, node=view)
    return web.Response(text=body, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def disk_of(state: Node) -> Disk | None:
    """Size, used and free bytes of the storage folder's filesystem (blocks: a thread)."""
    try:
        usage = shutil.disk_usage(state.settings.storage.path)
    except OSError:
        return None
    return Disk(usage.total, usage.used, usage.free)


def render(state: Node, *, disk: Disk | None = None, history: History | None = None,
           incidents: Incidents | None = None, node: NodeView | None = None) -> str:
    """The whole page for the current state (``node``: what every worker wrote, which
    wins over this process's own start time and problems)."""
    names = [u.name for u in state.settings.upstreams]
    figures = registry_figures(names)
    started = node.started if node is not None else \
        history.started if history is not None else None
    problems = node.incidents if node is not None else \
        incidents.latest() if incidents is not None else []
    sections = [
        _overview(state, disk, started, figures),
        parts.charts(history.minutes() if history is not None else []),
        _registries_section(figures),
        parts.health(state, names),
        parts.sync(state),
        parts.cluster(state),
        parts.incidents(problems),
        parts.downloads(state),
        parts.popular(state.popularity.top(TOP_IMAGES)),
        parts.links(state),
    ]
    return _page("".join(sections))


def _page(content: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=refresh content={REFRESH_SECONDS}>"
            f"<meta name=viewport content='width=device-width'>"
            f"<title>mirror status</title><style>{parts.CSS}</style></head><body>"
            f"<header><h1>mirror <span id=version>{_e(VERSION)}</span></h1>"
            f"<p class=muted>as of {stamp}; reloads every {REFRESH_SECONDS} s; "
            f"counters since start</p></header>{content}</body></html>")


def _overview(state: Node, disk: Disk | None, started: float | None,
              figures: list[RegistryFigures]) -> str:
    settings = state.settings
    listen = f"{settings.listen_host}:{settings.listen_port}"
    tls = "on" if settings.tls is not None else "off"
    uptime = parts.duration(time.time() - started) if started is not None else "?"
    workers = state.worker.count
    cards = [
        ("uptime", "Up", uptime),
        ("listen", "Listening on", f"<code>{_e(listen)}</code>"
                                    f"<small>TLS <span id=tls>{tls}</span></small>"),
        ("workers", "Workers", str(workers)),
        ("cache", "Cache", _cache_text(state)),
        ("disk", "Disk", _disk_text(disk)),
        ("traffic", "Served", _traffic_text(figures)),
    ]
    items = "".join(f"<div class=card id={cid}><b>{label}</b><span>{value}</span></div>"
                    for cid, label, value in cards)
    return f"<section class=cards id=overview>{items}</section>"


def _cache_text(state: Node) -> str:
    used = state.store.index.total_bytes
    entries = state.store.index.total_entries
    limit = state.settings.storage.max_size
    pinned = human_size(int(total(metrics.CACHE_PINNED_BYTES)))
    if limit:
        gauge = (f"<progress id=cache-gauge max={limit} value={min(used, limit)}></progress>"
                 f"<span id=cache-used>{human_size(used)}</span> of cap "
                 f"<span id=cache-limit>{human_size(limit)}</span> ({used / limit:.0%})")
    else:
        gauge = (f"<span id=cache-used>{human_size(used)}</span>, "
                 f"<span id=cache-limit>no cap</span>")
    return (f"{gauge}<small><span id=cache-entries>{entries}</span> entries, "
            f"{pinned} pinned</small>")


def _traffic_text(figures: list[RegistryFigures]) -> str:
    served = sum(f.served for f in figures)
    downloaded = sum(f.downloaded for f in figures)
    hits = sum(f.hits for f in figures)
    requests = sum(f.requests for f in figures)
    ratio = f"{hits / requests:.0%} hits" if requests else "no pulls yet"
    return (f"<span id=served-total>{human_size(int(served))}</span>, "
            f"<span id=saved-total>{human_size(int(max(served - downloaded, 0)))}</span> "
            f"saved<small>{human_size(int(downloaded))} downloaded; {ratio}</small>")


def _disk_text(disk: Disk | None) -> str:
    if disk is None:
        return "<span class=muted>unknown</span>"
    share = disk.used / disk.total if disk.total else 0.0
    css = " class=bad" if share > 0.9 else ""
    return (f"<progress max={disk.total} value={disk.used}></progress>"
            f"<span id=disk-used{css}>{human_size(disk.used)}</span> used, "
            f"<span id=disk-free>{human_size(disk.free)}</span> free"
            f"<small>of {human_size(disk.total)}</small>")


def _registries_section(figures: list[RegistryFigures]) -> str:
    rows = []
    for f in figures:
        ratio = f"{f.hit_ratio:.1%}" if f.hit_ratio is not None else "n/a"
        rows.append(
            f"<tr data-registry='{_e(f.name)}'><td><code>{_e(f.name)}</code></td>"
            f"<td class='n hit-ratio'>{ratio}</td><td class=n>{int(f.requests)}</td>"
            f"<td class='n served'>{human_size(int(f.served))}</td>"
            f"<td class='n downloaded'>{human_size(int(f.downloaded))}</td>"
            f"<td class='n saved'>{human_size(int(f.saved))}</td>"
            f"<td class=n>{human_size(int(f.cached))}</td></tr>")
    head = ("<tr><th>registry</th><th>hit ratio</th><th>requests</th><th>served</th>"
            "<th>downloaded</th><th>saved</th><th>cached</th></tr>")
    return f"<h2>Registries</h2><table id=registries>{head}{''.join(rows)}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
