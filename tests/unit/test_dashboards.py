"""The Grafana dashboard and the Prometheus alert rules name only metrics that exist.

Also the PromQL lines of the README. ``promtool check rules`` validates the
rules when Debian's ``prometheus`` package is installed (scripts/setup.sh --test).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.metrics import MetricWrapperBase

from mirror import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "mirror.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
_NAME = re.compile(r"\bmirror_[a-z0-9_]+")


def known_names() -> set[str]:
    """Every sample name the mirror exposes."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
            else:
                names.add(family.name)
    return names


def expressions(node: Any) -> list[str]:
    """Every ``expr`` string anywhere in a JSON or YAML document."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return []


def test_dashboard_loads_and_names_only_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    used = {name for e in exprs for name in _NAME.findall(e)}
    assert used - known_names() == set()
    for needed in ("mirror_registry_cache_results_total", "mirror_registry_served_bytes_total",
                   "mirror_registry_cache_bytes", "mirror_upstream_breaker_state"):
        assert needed in used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_alert_rules_name_only_existing_metrics() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"MirrorCacheEvictingHard", "MirrorUpstreamBreakerOpen",
            "MirrorUpstreamRateLimitLow", "MirrorFillsFailing"} <= alerts
    used = {name for e in expressions(rules) for name in _NAME.findall(e)}
    assert used and used - known_names() == set()


def test_readme_promql_names_only_existing_metrics() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Per-registry figures", 1)[1].split("\n## ", 1)[0]
    used = set(_NAME.findall(section))
    assert {"mirror_registry_cache_results_total", "mirror_registry_served_bytes_total"} <= used
    assert used - known_names() == set()


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/setup.sh --test installs prometheus)")
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_dashboard_query_follows_the_job_and_instance_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= set(variables)
    assert "$job" in variables["instance"]["definition"]
    for expr in expressions(dashboard["panels"]):
        for selector in re.findall(r"\bmirror_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, expr


def test_dashboard_has_panels_for_sync_peers_s3_stale_answers_and_disk() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for e in expressions(dashboard) for name in _NAME.findall(e)}
    assert {"mirror_sync_images_total", "mirror_sync_tag_checks_total", "mirror_peer_members",
            "mirror_s3_lookups_total", "mirror_s3_failures_total", "mirror_stale_served_total",
            "mirror_storage_disk_bytes"} <= used
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("sync", "peers", "s3", "stale", "disk"):
        assert word in titles


def test_alerts_cover_down_5xx_sync_peers_and_a_full_disk_without_a_cap() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    assert {"MirrorDown", "MirrorClientErrors", "MirrorSyncFailing", "MirrorPeersUnhealthy",
            "MirrorDiskNearlyFull"} <= set(rules)
    assert "up{" in rules["MirrorDown"]["expr"]
    assert 'status=~"5.."' in rules["MirrorClientErrors"]["expr"]
    disk = rules["MirrorDiskNearlyFull"]["expr"]
    assert "mirror_cache_max_bytes) == 0" in disk and "mirror_storage_disk_bytes" in disk


def test_the_chart_ships_the_same_dashboard_and_alerts() -> None:
    files = ROOT / "helm" / "mirror" / "files"
    assert (files / "grafana-dashboard.json").read_text() == DASHBOARD.read_text()
    assert (files / "prometheus-alerts.yaml").read_text() == ALERTS.read_text()


async def test_every_metric_the_dashboard_and_rules_use_is_on_metrics_of_a_running_mirror(
        mirror: TestClient[Any, Any]) -> None:
    """Declared is not enough: each name must be one the mirror's ``/metrics`` writes out."""
    exported = await (await mirror.get("/metrics")).text()
    names = set(re.findall(r"^(mirror_[a-z0-9_]+)", exported, re.MULTILINE))
    # A metric with labels has no sample until a label is used: its HELP line names it.
    for helped in re.findall(r"^# HELP (mirror_[a-z0-9_]+)", exported, re.MULTILINE):
        names |= {helped, f"{helped}_total", *(f"{helped}_{s}" for s in ("bucket", "sum",
                                                                          "count"))}
    used = {name for doc in (json.loads(DASHBOARD.read_text()),
                             yaml.safe_load(ALERTS.read_text()))
            for e in expressions(doc) for name in _NAME.findall(e)}
    assert used - names == set()
