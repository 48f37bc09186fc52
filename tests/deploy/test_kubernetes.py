"""deploy/kubernetes rendered by `kubectl kustomize` (kubectl's built-in kustomize) and validated
offline: every core document against Kubernetes' own OpenAPI schemas for one pinned version
(kubernetes-validate, strict: an unknown or misspelt field fails), the custom resources by the
checks below (prometheus-operator's CRD schema is not packaged for offline use), and the wiring
between documents that no schema sees: probes on the real endpoints and named ports, a grace
period that covers the gateway's drain, selectors that select, the HPA's metric as the adapter
serves it, the dashboard as its file, and no GATEWAY_* variable the gateway does not know.

`make test` installs kubectl when missing (like redis-server); without it this test fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from frontend.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.34.0"  # the schemas of kubernetes-validate==1.37.0 (requirements-dev.txt)
# Custom resources: their schemas come with their operators, not with Kubernetes.
NOT_SCHEMA_VALIDATED = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # `make test` installs it: a missing binary is a broken setup
        pytest.fail("kubectl is not installed (make kubectl installs the package)")
    out = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATION)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    return doc


def _container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    containers = _one(docs, "Deployment", "gpt2-unit")["spec"]["template"]["spec"]["containers"]
    [container] = [c for c in containers if c["name"] == name]
    return container


def _gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    [ref] = _container(docs, "gateway")["envFrom"]
    return dict(_one(docs, "ConfigMap", ref["configMapRef"]["name"])["data"])


def test_every_core_document_is_valid_for_the_pinned_kubernetes(docs: list[dict[str, Any]]) -> None:
    validated = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NOT_SCHEMA_VALIDATED:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        validated.append(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(validated)
    assert {"ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "Namespace"} <= set(validated)


def test_a_misspelt_field_fails_validation(docs: list[dict[str, Any]]) -> None:
    """The validator is strict, so the test above means something."""
    broken = json.loads(json.dumps(_one(docs, "Deployment", "gpt2-unit")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_unit_is_one_pod_with_triton_and_its_gateway_on_one_gpu(docs: list[dict[str, Any]]) -> None:
    pod = _one(docs, "Deployment", "gpt2-unit")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["triton", "gateway"]
    assert _container(docs, "triton")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in _container(docs, "gateway")["resources"].get("limits", {})
    assert _gateway_env(docs)["GATEWAY_TRITON_URL"] == "127.0.0.1:8001"  # the Pod's own Triton


def _probe_target(container: dict[str, Any], probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return get["path"], ports[get["port"]]


def test_probes_hit_the_real_endpoints_on_declared_ports(docs: list[dict[str, Any]]) -> None:
    gateway, triton = _container(docs, "gateway"), _container(docs, "triton")
    assert _probe_target(gateway, "readinessProbe") == ("/health/ready", 8080)
    assert _probe_target(gateway, "livenessProbe") == ("/health/live", 8080)
    assert _probe_target(triton, "readinessProbe") == ("/v2/health/ready", 8000)
    assert _probe_target(triton, "livenessProbe") == ("/v2/health/live", 8000)
    assert gateway["args"][-2:] == ["--port", "8080"]


def test_the_grace_period_covers_the_gateways_drain(docs: list[dict[str, Any]]) -> None:
    """preStop (proxies stop sending) + GATEWAY_DRAIN_TIMEOUT_S + Triton's own stop < grace."""
    pod = _one(docs, "Deployment", "gpt2-unit")["spec"]["template"]["spec"]
    pre_stop = _container(docs, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = float(_gateway_env(docs)["GATEWAY_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_s + 15
    # Triton's preStop waits for the gateway to stop answering, within the grace period.
    triton_hook = " ".join(_container(docs, "triton")["lifecycle"]["preStop"]["exec"]["command"])
    assert "127.0.0.1:8080/health/live" in triton_hook
    assert "time.monotonic() + 55" in triton_hook and pod["terminationGracePeriodSeconds"] > 55


def test_every_gateway_variable_is_a_setting(docs: list[dict[str, Any]]) -> None:
    fields = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    env = _gateway_env(docs)
    assert set(env) <= fields, set(env) - fields
    Settings(**{k.removeprefix("GATEWAY_").lower(): v for k, v in env.items()})  # values parse (production included)


def test_selectors_select_the_unit(docs: list[dict[str, Any]]) -> None:
    labels = _one(docs, "Deployment", "gpt2-unit")["spec"]["template"]["metadata"]["labels"]
    pdb = _one(docs, "PodDisruptionBudget", "gpt2-unit")["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= labels.items()
    for name in ("gpt2-gateway", "gpt2-triton-metrics"):
        assert _one(docs, "Service", name)["spec"]["selector"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler", "gpt2-unit")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt2-unit"}
    assert hpa["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, one unit keeps serving


def test_the_service_monitor_scrapes_the_gateway_and_triton(docs: list[dict[str, Any]]) -> None:
    monitor = _one(docs, "ServiceMonitor", "gpt2-serving")
    selected = [
        s
        for s in docs
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
    ]
    ports = {p["name"]: p for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "triton-metrics"} <= set(ports)
    assert {p["targetPort"] for p in ports.values()} <= {"http", "triton-metrics"}


def test_the_hpa_asks_for_the_metric_the_adapter_serves(docs: list[dict[str, Any]]) -> None:
    [metric] = _one(docs, "HorizontalPodAutoscaler", "gpt2-unit")["spec"]["metrics"]
    rules = yaml.safe_load((KUSTOMIZATION / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r["seriesQuery"] for r in rules}
    assert metric["type"] == "Pods"
    assert served[metric["pods"]["metric"]["name"]].startswith("vllm:num_requests_waiting{")


def test_the_dashboard_config_map_is_the_dashboard_file(docs: list[dict[str, Any]]) -> None:
    dashboard = _one(docs, "ConfigMap", "gpt2-grafana-dashboard")
    path = ROOT / "docker" / "grafana" / "dashboards" / "gpt2-serving.json"
    assert dashboard["data"] == {"gpt2-serving.json": path.read_text()}
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_redis_keeps_keys_and_quotas_apart_from_the_cache(docs: list[dict[str, Any]]) -> None:
    env = _gateway_env(docs)
    assert env["GATEWAY_KEYS_URL"].startswith("redis://gpt2-redis-state:")
    assert env["GATEWAY_RATELIMIT_URL"].startswith("redis://gpt2-redis-state:")
    assert env["GATEWAY_CACHE_URL"].startswith("redis://gpt2-redis-cache:")
    state = _one(docs, "StatefulSet", "gpt2-redis-state")["spec"]["template"]["spec"]["containers"][0]["args"]
    cache = _one(docs, "Deployment", "gpt2-redis-cache")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "noeviction" in state and "allkeys-lru" not in state
    assert "allkeys-lru" in cache
