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
