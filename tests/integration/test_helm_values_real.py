"""Each value of the Helm chart that makes it safe on real nodes, rendered by the real helm.

Workers from the pod's CPU, ``max_size`` from the volume (and a clear failure when it is
larger), edge mode on the node's loopback with ``system-node-critical`` and every taint
tolerated, an existing ``hosts.toml`` kept and given back on uninstall, the post-delete
hook, a GitOps-safe peer secret, NetworkPolicy, topology spread, the Grafana dashboard
and the PrometheusRule, NOTES.txt. Manifests are validated with kubernetes-validate; the
rendered config passes ``mirror config check``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mirror import config as mirror_config
from tests.integration.test_helm_real import (
    CHART,
    KUBERNETES,
    PEER_SECRET,
    REPO,
    _one,
    _render,
    _run_cleanup,
    _workload,
    helm_bin,
)
from tests.support.helm import helm

pytestmark = pytest.mark.integration
__all__ = ["helm_bin"]  # the fixture, shared with test_helm_real

MiB, GiB = 2**20, 2**30


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    text = _one(docs, "ConfigMap", "mirror")["data"]["mirror.yaml"]
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _fails(helm_bin: Path, mode: str, *values: str) -> str:
    """``helm template`` that must fail: its message."""
    if mode == "regional" and not any("peerSecret" in v for v in values):
        values = (*PEER_SECRET, *values)
    proc = helm(helm_bin, "template", "rel", str(CHART), "--set", f"mode={mode}", *values,
                check=False)
    assert proc.returncode != 0, proc.stdout[:400]
    return proc.stderr


# --- workers from the pod's CPU -----------------------------------------------------------
@pytest.mark.parametrize(("resources", "workers"), [
    ({"requests": {"cpu": "250m"}}, 1),
    ({"requests": {"cpu": "1500m"}}, 2),
    ({"requests": {"cpu": "500m"}, "limits": {"cpu": "3"}}, 3),
    ({"requests": {"cpu": 2}}, 2),
    ({"requests": {"memory": "256Mi"}}, 1),
])
@pytest.mark.parametrize("mode", ["single", "regional", "edge"])
def test_workers_follow_the_pods_cpu(helm_bin: Path, mode: str, resources: dict[str, Any],
                                     workers: int) -> None:
    docs = _render(helm_bin, mode, "--set-json", f"resources={json.dumps(resources)}")
    assert _config(docs)["server"]["workers"] == workers


def test_workers_set_in_the_config_win(helm_bin: Path) -> None:
    docs = _render(helm_bin, "single", "--set", "config.server.workers=4",
                   "--set", "config.server.event_loop=asyncio")
    assert _config(docs)["server"] == {"workers": 4, "event_loop": "asyncio"}


# --- max_size from the volume -------------------------------------------------------------
@pytest.mark.parametrize(("mode", "values", "volume"), [
    ("single", [], 50 * GiB),
    ("single", ["--set", "persistence.size=200Gi"], 200 * GiB),
    ("regional", ["--set", "persistence.size=100G"], 100 * 10**9),
    ("edge", [], 20 * GiB),
    ("edge", ["--set", "edge.cacheVolume.budget=300Gi"], 300 * GiB),
    ("edge", ["--set", "edge.cacheVolume.type=emptyDir",
              "--set", "edge.cacheVolume.sizeLimit=10Gi"], 10 * GiB),
])
def test_max_size_is_90_percent_of_the_volume(helm_bin: Path, mode: str, values: list[str],
                                              volume: int, tmp_path: Path) -> None:
    docs = _render(helm_bin, mode, *values)
    text = _one(docs, "ConfigMap", "mirror")["data"]["mirror.yaml"]
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    parsed = mirror_config.load(path, env={"POD_IP": "127.0.0.2",
                                           "MIRROR_PEER_SECRET": "x" * 20})
    assert parsed.storage.max_size is not None
    assert 0.9 * volume - MiB < parsed.storage.max_size <= 0.9 * volume


def test_a_max_size_within_the_volume_is_kept(helm_bin: Path, tmp_path: Path) -> None:
    docs = _render(helm_bin, "single", "--set", "config.storage.max_size=40GiB")
    assert _config(docs)["storage"]["max_size"] == "40GiB"
    values = tmp_path / "values.yaml"  # a number in a values file is a float to helm
    values.write_text("config:\n  storage:\n    max_size: 40000000000\n")
    docs = _render(helm_bin, "single", "-f", str(values))
    assert int(_config(docs)["storage"]["max_size"]) == 40_000_000_000
    docs = _render(helm_bin, "single", "--set", "config.storage.max_size=auto")
    assert _config(docs)["storage"]["max_size"] == "auto"


@pytest.mark.parametrize(("mode", "values", "names"), [
    ("single", ["--set", "config.storage.max_size=60GiB"], "persistence.size (50Gi)"),
    ("regional", ["--set", "config.storage.max_size=51Gi"], "persistence.size (50Gi)"),
    ("edge", ["--set", "config.storage.max_size=25GiB"], "edge.cacheVolume.budget (20Gi)"),
    ("edge", ["--set", "config.storage.max_size=11GB", "--set", "edge.cacheVolume.type=emptyDir",
              "--set", "edge.cacheVolume.sizeLimit=10Gi"], "edge.cacheVolume.sizeLimit (10Gi)"),
])
def test_a_max_size_larger_than_the_volume_fails_clearly(helm_bin: Path, mode: str,
                                                         values: list[str], names: str) -> None:
    message = _fails(helm_bin, mode, *values)
    assert "is larger than the cache volume" in message and names in message


# --- edge mode on real nodes --------------------------------------------------------------
def test_edge_listens_on_the_nodes_loopback_and_is_node_critical(helm_bin: Path) -> None:
    docs = _render(helm_bin, "edge")
    assert _config(docs)["listen"] == "127.0.0.1:5000"
    pod = _workload(docs, "edge")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (mirror,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mirror[probe]["httpGet"]["host"] == "127.0.0.1"
    hosts = tomllib.loads(_one(docs, "ConfigMap", "-hosts")["data"]["_default.toml"])
    assert list(hosts["host"]) == ["http://127.0.0.1:5000"]


def test_edge_can_listen_on_every_address_and_take_its_own_priority(helm_bin: Path) -> None:
    docs = _render(helm_bin, "edge", "--set", "edge.listenHost=0.0.0.0",
                   "--set", "priorityClassName=mirror-high",
                   "--set-json", 'tolerations=[{"key": "gpu", "operator": "Exists"}]')
    assert _config(docs)["listen"] == "0.0.0.0:5000"
    pod = _workload(docs, "edge")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "mirror-high"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_single_and_regional_pods_take_no_edge_defaults(helm_bin: Path) -> None:
    for mode in ("single", "regional"):
        pod = _workload(_render(helm_bin, mode), mode)["spec"]["template"]["spec"]
        assert "priorityClassName" not in pod and "tolerations" not in pod
        assert "hostNetwork" not in pod
        _meets_restricted(pod)


def _meets_restricted(pod: dict[str, Any]) -> None:
    """The Pod Security ``restricted`` level's checks that a pod spec can fail."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
    assert not any("hostPath" in v for v in pod["volumes"])


def _install(docs: list[dict[str, Any]], certs_dir: Path, tmp_path: Path) -> None:
    """What the edge init container does on a node, with the chart's own script."""
    source = tmp_path / "hosts-configmap"
    source.mkdir(exist_ok=True)
    for name, text in _one(docs, "ConfigMap", "-hosts")["data"].items():
        (source / name).write_text(text)
    subprocess.run(["sh", str(source / "install-hosts.sh")], check=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "HOSTS_SRC": str(source),
                        "CERTS_DIR": str(certs_dir), "NODE_IP": "127.0.0.1"})


THEIRS = """# written by the node's bootstrap
server = "https://registry-1.docker.io"

[host."https://mirror.corp.example:443"]
  capabilities = ["pull", "resolve"]
  skip_verify = false
"""


def test_an_existing_hosts_toml_is_kept_and_given_back_on_uninstall(
        helm_bin: Path, tmp_path: Path) -> None:
    docs = _render(helm_bin, "edge", "--set-json", 'edge.registries=[{"host": "docker.io", '
                   '"server": "https://registry-1.docker.io"}, {"host": "ghcr.io", '
                   '"server": "https://ghcr.io"}]')
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(THEIRS)
    for _restart in range(2):  # a pod restart replaces the chart's lines, never adds more
        _install(docs, certs, tmp_path)
    merged = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert merged["server"] == "https://registry-1.docker.io"
    assert list(merged["host"]) == ["http://127.0.0.1:5000", "https://mirror.corp.example:443"]
    fresh = tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())
    assert fresh["server"] == "https://ghcr.io" and list(fresh["host"]) == [
        "http://127.0.0.1:5000"]

    _run_cleanup(docs, certs)
    assert (certs / "docker.io" / "hosts.toml").read_text() == THEIRS
    assert not (certs / "ghcr.io").exists()  # the chart made it: gone, folder and all


def test_the_nodes_own_server_wins_over_the_charts(helm_bin: Path, tmp_path: Path) -> None:
    docs = _render(helm_bin, "edge", "--set-json", 'edge.registries=[{"host": "docker.io", '
                   '"server": "https://other.example"}]')
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(THEIRS)
    _install(docs, certs, tmp_path)
    merged = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert merged["server"] == "https://registry-1.docker.io"


def test_the_post_delete_hook_cleans_every_node_then_waits_for_it(helm_bin: Path) -> None:
    docs = _render(helm_bin, "edge")
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert sorted(d["kind"] for d in hooks) == ["DaemonSet", "Job", "Role", "RoleBinding",
                                                "ServiceAccount"]
    for doc in hooks:
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-delete"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    weight = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert weight["ServiceAccount"] < weight["DaemonSet"] < weight["Job"]
    cleanup = _one(hooks, "DaemonSet")["spec"]["template"]["spec"]
    assert cleanup["tolerations"] == [{"operator": "Exists"}]  # every node, as the mirror
    role = _one(hooks, "Role")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": [_one(hooks, "DaemonSet")["metadata"]["name"]],
                              "verbs": ["get"]}]
    assert not [d for d in _render(helm_bin, "edge", "--set", "edge.cleanupOnUninstall=false")
                if "helm.sh/hook" in d["metadata"].get("annotations", {})]


class _FakeApi(BaseHTTPRequestHandler):
    """The API server's answer about the cleanup DaemonSet: ready after two asks."""

    asks = 0

    def do_GET(self) -> None:
        type(self).asks += 1
        ready = 3 if type(self).asks > 2 else 1
        assert self.headers["Authorization"] == "Bearer the-token"
        body = json.dumps({"metadata": {"generation": 1}, "status": {
            "observedGeneration": 1, "desiredNumberScheduled": 3, "numberReady": ready,
            "updatedNumberScheduled": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_hooks_job_waits_until_every_node_is_clean(helm_bin: Path, fake_api: str,
                                                       tmp_path: Path) -> None:
    job = _one(_render(helm_bin, "edge"), "Job")
    (wait,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in wait["env"]}
    token = tmp_path / "token"
    token.write_text("the-token\n")
    proc = subprocess.run([sys.executable, "-c", wait["args"][0]], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**env, "API_URL": fake_api, "TOKEN_FILE": str(token)})
    assert proc.returncode == 0, proc.stderr
    assert "1 of 3 node(s) done" in proc.stdout and "3 of 3 node(s) done" in proc.stdout


# --- regional: peer secret, spread, NetworkPolicy ----------------------------------------
def test_regional_needs_a_peer_secret_and_never_invents_one(helm_bin: Path) -> None:
    message = _fails(helm_bin, "regional", "--set", "regional.peerSecret.secretName=")
    assert "regional.peerSecret.secretName" in message and "regional.peerSecret.value" in message
    assert "16 characters" in _fails(helm_bin, "regional",
                                     "--set", "regional.peerSecret.value=short")
    first, second = (_render(helm_bin, "regional") for _ in range(2))
    assert first == second  # GitOps: every render the same
    secret = _one(first, "Secret")
    assert base64.b64decode(secret["data"]["secret"]).decode() == "a-peer-secret-of-the-region"


def test_regional_pods_spread_over_zones_and_nodes(helm_bin: Path) -> None:
    docs = _render(helm_bin, "regional")
    pod = _workload(docs, "regional")["spec"]["template"]["spec"]
    selector = _workload(docs, "regional")["spec"]["selector"]
    keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"] == selector
    none = _render(helm_bin, "regional", "--set-json", "regional.topologySpreadConstraints=[]")
    assert "topologySpreadConstraints" not in _workload(none, "regional")["spec"]["template"][
        "spec"]
    assert "topologySpreadConstraints" not in _workload(
        _render(helm_bin, "single"), "single")["spec"]["template"]["spec"]


@pytest.mark.parametrize("mode", ["single", "regional"])
def test_network_policy_lets_in_only_who_is_listed(helm_bin: Path, mode: str) -> None:
    assert not [d for d in _render(helm_bin, mode) if d["kind"] == "NetworkPolicy"]
    docs = _render(helm_bin, mode, "--set", "networkPolicy.enabled=true",
                   "--set-json", 'networkPolicy.from=[{"ipBlock": {"cidr": "10.0.0.0/8"}}]',
                   "--set-json", 'networkPolicy.metricsFrom=[{"namespaceSelector": '
                   '{"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]')
    policy = _one(docs, "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBERNETES, strict=True)
    (rule,) = policy["spec"]["ingress"]
    peers = rule["from"]
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in peers
    assert any("namespaceSelector" in p for p in peers)
    selector = _workload(docs, mode)["spec"]["selector"]
    assert policy["spec"]["podSelector"] == selector
    assert ({"podSelector": selector} in peers) == (mode == "regional")
    assert rule["ports"] == [{"port": "registry", "protocol": "TCP"}]


# --- Services the nodes' containerd can reach ---------------------------------------------
def test_service_address_can_be_fixed_for_the_nodes(helm_bin: Path) -> None:
    docs = _render(helm_bin, "single", "--set", "service.clusterIP=10.96.100.100")
    service = _one(docs, "Service")
    assert service["spec"]["clusterIP"] == "10.96.100.100"
    docs = _render(helm_bin, "regional", "--set", "service.type=NodePort",
                   "--set", "service.nodePort=30500")
    service = next(d for d in docs if d["kind"] == "Service"
                   and d["spec"].get("clusterIP") != "None")
    kubernetes_validate.validate(service, KUBERNETES, strict=True)
    assert service["spec"]["ports"][0]["nodePort"] == 30500


def _notes(helm_bin: Path, mode: str, *values: str) -> str:
    if mode == "regional":
        values = (*PEER_SECRET, *values)
    out = helm(helm_bin, "install", "rel", str(CHART), "--dry-run=client", "--namespace",
               "registry", "--set", f"mode={mode}", *values).stdout
    return out.split("NOTES:", 1)[1]


def test_notes_say_how_the_nodes_reach_the_mirror_with_a_worked_hosts_toml(
        helm_bin: Path) -> None:
    notes = _notes(helm_bin, "single", "--set", "service.clusterIP=10.96.100.100")
    assert '[host."http://10.96.100.100:5000"]' in notes and "restricted" in notes
    assert "cannot resolve Service names" in notes and "46080MiB" in notes
    notes = _notes(helm_bin, "regional", "--set", "service.type=NodePort",
                   "--set", "service.nodePort=30500")
    assert '[host."http://127.0.0.1:30500"]' in notes
    notes = _notes(helm_bin, "edge")
    assert "privileged" in notes and "listening on 127.0.0.1" in notes
    assert "WARNING" not in notes
    assert "WARNING" in _notes(helm_bin, "edge", "--set", "edge.listenHost=0.0.0.0")


# --- Grafana and Prometheus ---------------------------------------------------------------
def test_dashboard_and_rules_ship_behind_values(helm_bin: Path) -> None:
    assert not [d for d in _render(helm_bin, "single")
                if d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-dashboard")]
    docs = _render(helm_bin, "single", "--set", "grafana.dashboard=true",
                   "--set", "prometheusRule.enabled=true",
                   "--set", "prometheusRule.labels.release=kube-prometheus-stack")
    dashboard = _one(docs, "ConfigMap", "-dashboard")
    kubernetes_validate.validate(dashboard, KUBERNETES, strict=True)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["mirror.json"])
    assert shipped == json.loads((REPO / "deploy" / "grafana" / "mirror.json").read_text())
    rule = _one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts  # $labels templates untouched by helm
    assert "{{ $labels.instance }}" in json.dumps(rule["spec"])


def test_image_defaults_are_documented_as_the_place_of_the_pushed_image(
        helm_bin: Path) -> None:
    values = (CHART / "values.yaml").read_text()
    assert "push it to a registry" in values and "the tag you pushed" in values
    docs = _render(helm_bin, "single", "--set", "image.repository=registry.example.com/m",
                   "--set", "image.tag=1.2.3")
    (mirror,) = _workload(docs, "single")["spec"]["template"]["spec"]["containers"]
    assert mirror["image"] == "registry.example.com/m:1.2.3"


def test_edge_hosts_toml_can_carry_a_header_for_the_mirrors_auth(helm_bin: Path) -> None:
    docs = _render(helm_bin, "edge", "--set", "edge.listenHost=0.0.0.0",
                   "--set", "edge.headers.Authorization=Basic bm9kZTpzM2NyZXQ=")
    hosts = tomllib.loads(_one(docs, "ConfigMap", "-hosts")["data"]["_default.toml"])
    assert hosts["host"]["http://127.0.0.1:5000"]["header"] == {
        "Authorization": "Basic bm9kZTpzM2NyZXQ="}


def test_a_service_monitor_cannot_scrape_mirrors_on_the_nodes_loopback(helm_bin: Path) -> None:
    message = _fails(helm_bin, "edge", "--set", "serviceMonitor.enabled=true")
    assert "edge.listenHost" in message and "loopback" in message
    docs = _render(helm_bin, "edge", "--set", "serviceMonitor.enabled=true",
                   "--set", "edge.listenHost=0.0.0.0")
    assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"
