"""Sections of the status page below the overview (see :mod:`mirror.server.status`)."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from mirror import metrics
from mirror.cache.inventory import human_size
from mirror.node import Node
from mirror.server.charts import Series, bar_chart, line_chart
from mirror.server.figures import samples, total
from mirror.server.history import MINUTES, Incident, Minute

_BREAKER = {0: "closed", 1: "open", 2: "half-open"}
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 1.5em;color:#222;background:#f6f7f9}
header{display:flex;align-items:baseline;gap:1em}h1{font-size:1.5em;margin:0}
h1 span{font-size:.6em;color:#667;font-weight:normal}
h2{font-size:1.05em;margin:1.3em 0 .4em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0001}
td,th{padding:.25em .8em;text-align:left;border-bottom:1px solid #e3e3e3}
th{background:#eef0f3;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.bad{color:#b00;font-weight:600}.ok{color:#070}.warn{color:#a60}
progress{width:100%;height:.7em;display:block;margin:.15em 0 .2em}code{font-size:.95em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:.6em;
margin:.8em 0}.card{background:#fff;padding:.5em .8em;box-shadow:0 1px 2px #0001;
border-radius:4px}.card b{display:block;font-size:.78em;color:#667;text-transform:uppercase;
letter-spacing:.04em}.card small{display:block;color:#777}
.charts{display:flex;flex-wrap:wrap;gap:.8em}.chart{margin:0;background:#fff;
padding:.4em .6em;box-shadow:0 1px 2px #0001;border-radius:4px}
figcaption{font-size:.85em;font-weight:600;margin-bottom:.2em}
.key{font-weight:normal;color:#555;margin-left:.6em}
.key i{display:inline-block;width:.7em;height:.7em;margin-right:.25em;border-radius:2px}
nav a{margin-right:1.2em}.key b{color:#222}
tr.download progress{display:inline-block;width:8em;margin:0 .4em 0 0;vertical-align:middle}
"""
_SERVED, _DOWNLOADED, _HITS, _ERRORS = "#2a7ab8", "#e08a1e", "#2e9d5b", "#c83c3c"


def charts(minutes: Sequence[Minute]) -> str:
    """Hit ratio, bytes served vs downloaded, upstream errors: a point per minute."""
    if not minutes:
        note = "<p id=charts class=muted>the first minute of figures comes shortly</p>"
        return f"<h2>Last hour</h2>{note}"
    ratio = line_chart("chart-hit-ratio", "Hit ratio",
                       [Series("hits", [_pct(m.hit_ratio) for m in minutes], _HITS)],
                       slots=MINUTES, label=lambda v: f"{v:.0f}%", y_max=100.0)
    traffic = line_chart("chart-bytes", "Bytes a minute",
                         [Series("served", [m.served for m in minutes], _SERVED),
                          Series("downloaded", [m.downloaded for m in minutes], _DOWNLOADED)],
                         slots=MINUTES, label=lambda v: human_size(int(v)))
    errors = bar_chart("chart-errors", "Upstream errors a minute",
                       Series("errors", [m.upstream_errors for m in minutes], _ERRORS),
                       slots=MINUTES, label=lambda v: f"{v:.0f}")
    return f"<h2>Last hour</h2><div class=charts id=charts>{ratio}{traffic}{errors}</div>"


def _pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100.0 * ratio


def health(state: Node, names: list[str]) -> str:
    """Upstream health per registry: breaker, budget, rate limit left, errors."""
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
        errors = int(total(metrics.UPSTREAM_ERRORS, registry=name))
        rows.append(f"<tr data-registry='{_e(name)}'><td><code>{_e(name)}</code></td>"
                    f"<td class='{css} breaker'>{breaker}</td><td>{budget_text}</td>"
                    f"<td>{_ratelimit(name)}</td>"
                    f"<td class='n{' bad' if errors else ''}'>{errors}</td></tr>")
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
    found = []
    for credential, value in sorted(left):
        limit = limits.get(credential)
        of = f" of {int(limit)}" if limit else ""
        found.append(f"{_e(credential)}: {int(value)}{of}")
    return "; ".join(found)


def sync(state: Node) -> str:
    """The sync rules: schedule, last run, next run, references and failures."""
    if state.settings.sync is None:
        return "<h2>Sync</h2><p id=sync class=muted>off (no sync section)</p>"
    status = state.sync.status(top=0)
    records = status.get("records") or []
    rows = []
    for rule in status.get("rules") or []:
        name = str(rule.get("name"))
        mine = [r for r in records if name in (r.get("rules") or [])]
        failed = [r for r in mine if r.get("result") in ("failed", "deferred")]
        last = max((float(r.get("last_run") or 0) for r in mine), default=0.0)
        why = f" <span class=muted>{_e(str(failed[0].get('reason', ''))[:80])}</span>" \
            if failed else ""
        rows.append(f"<tr data-rule='{_e(name)}'><td><code>{_e(name)}</code></td>"
                    f"<td>{_schedule(rule.get('schedule') or {})}</td>"
                    f"<td>{_ago(last) if last else '<span class=muted>not yet</span>'}</td>"
                    f"<td>{_when(rule.get('next_run'))}</td><td class=n>{len(mine)}</td>"
                    f"<td class='n failures{' bad' if failed else ''}'>{len(failed)}</td>"
                    f"<td>{why}</td></tr>")
    head = ("<tr><th>rule</th><th>schedule</th><th>last run</th><th>next run</th>"
            "<th>images</th><th>failed</th><th></th></tr>")
    last_run = status.get("last_run") or {}
    summary = ""
    if last_run:
        counts = ", ".join(f"{n} {k}" for k, n in sorted((last_run.get("counts") or {}).items()))
        summary = (f"<p>last pass {_ago(float(last_run.get('started') or 0))}: "
                   f"{_e(counts) or 'nothing selected'}, "
                   f"{human_size(int(last_run.get('fetched_bytes') or 0))} fetched</p>")
    return f"<h2>Sync</h2>{summary}<table id=sync>{head}{''.join(rows)}</table>"


def _schedule(schedule: dict[str, Any]) -> str:
    if schedule.get("cron"):
        return f"cron <code>{_e(str(schedule['cron']))}</code>"
    return f"every {duration(float(schedule.get('interval') or 0))}"


def cluster(state: Node) -> str:
    """Peers of the region and their health, parents, and the S3 tier."""
    rows = []
    if state.peer_set is not None:
        healthy = set(state.peer_set.healthy())
        for url in state.peer_set.members:
            ok = url in healthy
            rows.append(f"<tr><td>peer</td><td><code>{_e(url)}</code></td>"
                        f"<td class={'ok' if ok else 'bad'}>{'healthy' if ok else 'down'}</td>"
                        "</tr>")
    if state.settings.cluster is not None:
        for url in state.settings.cluster.parents:
            rows.append(f"<tr><td>parent</td><td><code>{_e(url)}</code></td>"
                        "<td class=muted>asked on a miss</td></tr>")
    if state.s3 is not None:
        usable = state.s3.usable()
        failures = int(total(metrics.S3_FAILURES))
        rows.append(f"<tr id=s3><td>S3</td><td><code>{_e(state.s3.store.bucket)}</code></td>"
                    f"<td class={'ok' if usable else 'bad'}>"
                    f"{'ok' if usable else 'backing off after a failure'}; "
                    f"{failures} failed operation(s)</td></tr>")
    if not rows:
        return ("<h2>Peers and S3</h2><p id=cluster class=muted>a single node: no peers, "
                "no S3 tier</p>")
    return ("<h2>Peers and S3</h2><table id=cluster><tr><th>kind</th><th>where</th>"
            f"<th>health</th></tr>{''.join(rows)}</table>")


def incidents(items: Sequence[Incident]) -> str:
    """The last answers that were errors or refusals."""
    if not items:
        return ("<h2>Last errors and refusals</h2><p id=incidents class=muted>none since "
                "start</p>")
    rows = "".join(
        f"<tr><td>{_ago(i.at)}</td><td class='n {'bad' if i.status >= 500 else 'warn'}'>"
        f"{i.status}</td><td>{_e(i.method)} <code>{_e(i.path)}</code></td>"
        f"<td>{_e(i.error)}</td><td>{_e(i.client)}</td></tr>" for i in items)
    return ("<h2>Last errors and refusals</h2><table id=incidents><tr><th>when</th>"
            "<th>status</th><th>request</th><th>why</th><th>client</th></tr>"
            f"{rows}</table>")


def downloads(state: Node) -> str:
    """Upstream downloads under way, with their progress and readers."""
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
                    f"<td>{progress}</td>"
                    f"<td class=n>{fill.readers}</td></tr>")
    head = ("<tr><th>digest</th><th>from</th><th>received</th><th>size</th><th>progress</th>"
            "<th>readers</th></tr>")
    return f"<h2>Downloads in flight</h2><table id=downloads>{head}{''.join(rows)}</table>"


def popular(top: list[tuple[str, int]]) -> str:
    """The most pulled images."""
    if not top:
        return "<h2>Most pulled images</h2><p id=popular class=muted>none yet</p>"
    rows = "".join(f"<tr><td><code>{_e(image)}</code></td><td class=n>{count}</td></tr>"
                   for image, count in top)
    return ("<h2>Most pulled images</h2><table id=popular><tr><th>image (by tag)</th>"
            f"<th>pulls</th></tr>{rows}</table>")


def links(state: Node) -> str:
    """Where the figures and the admin API are."""
    admin = state.settings.admin
    where = ""
    if admin is not None and admin.listen is not None:
        host, port = admin.listen
        where = f" (on <code>{_e(host)}:{port}</code>)"
    token = " with the admin token" if admin is not None and admin.token is not None else ""
    return (f"<h2>More</h2><nav id=links><a href='/metrics'>/metrics</a>"
            "<a href='/admin/sync'>/admin/sync</a><a href='/admin/popular'>/admin/popular</a>"
            f"<a href='/readyz'>/readyz</a></nav><p class=muted>admin API{where}{token}: "
            "<code>GET /admin/sync</code>, <code>GET /admin/popular</code>, "
            "<code>POST /admin/sync</code>, <code>POST /admin/warm</code></p>")


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``40 s`` and friends."""
    seconds = max(seconds, 0.0)
    for size, unit, smaller, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min")):
        if seconds >= size:
            rest = int(seconds % size // smaller)
            return f"{int(seconds // size)} {unit}" + (f" {rest} {small_unit}" if rest else "")
    if seconds >= 60:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds)} s"


def _ago(when: float) -> str:
    return f"{duration(time.time() - when)} ago"


def _when(when: Any) -> str:
    if not when:
        return "<span class=muted>-</span>"
    delta = float(when) - time.time()
    return f"in {duration(delta)}" if delta > 0 else "due"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
