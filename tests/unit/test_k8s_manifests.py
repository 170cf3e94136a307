"""deploy/k8s renders with kustomize (kubectl's), every manifest is valid offline against the
Kubernetes schemas (strict: no unknown fields) or its CRD's schema, and the manifests agree
with each other and with inferline's config: selectors, ports, probes, secrets, metrics,
network reachability.

Renders: each overlay, and prod with the protected-lane, batch and stream components (as an
overlay of the base that lists them, the way their kustomization files say to use them).
"""

from __future__ import annotations

import filecmp
import functools
import importlib.resources
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import referencing
import typer
import yaml
from kubernetes_validate import utils as kubernetes_validate
from prometheus_client import CollectorRegistry

from inferline.cli import cli
from inferline.core.config import InferlineConfig, load_config
from inferline.core.metrics import ServingMetrics
from inferline.stream.spec import StreamEndpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BIN = pathlib.Path(sys.executable).parent
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests support (Indexed Jobs' backoffLimitPerIndex, gRPC probes)
and the newest whose schemas kubernetes-validate ships."""
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


@functools.cache
def _crd_models() -> dict[tuple[str, str], Any]:
    """The CRDs' schemas as cloudcoil's generated pydantic models (imported here: ~5 s)."""
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    }


EXTERNAL = {
    "prod": {("Secret", "inferline-secrets")},
    "prod+jobs": {("Secret", "inferline-secrets"), ("PersistentVolumeClaim", "batch-data")},
    "dev": set(),
}
"""Objects the manifests refer to that are made outside them (docs/deploy.md says how)."""
INFERLINE_UID = 10001
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet"}


def _kustomize(directory: pathlib.Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    jobs = tmp_path_factory.mktemp("overlay")
    relative = pathlib.Path(os.path.relpath(K8S, jobs))
    (jobs / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "inferline",
                "resources": [str(relative / "base")],
                "components": [
                    str(relative / "components" / c)
                    for c in ("protected-lane", "gpu-pool", "batch-job", "stream-worker")
                ],
            }
        )
    )
    return {
        "dev": _kustomize(K8S / "overlays" / "dev"),
        "prod": _kustomize(K8S / "overlays" / "prod"),
        "prod+jobs": _kustomize(jobs),
    }


def _all_docs(renders: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in renders.items():
        for doc in docs:
            yield name, doc


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _get(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} in the render"
    return matches[0]


def _pod_templates(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment and Job."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOAD_KINDS]


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions In/NotIn/Exists) against labels."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _pods_selected(docs: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [template for _, template in _pod_templates(docs) if _matches(selector, template["metadata"]["labels"])]


# --- rendering and schemas -------------------------------------------------------------------


def test_generated_inputs_are_fresh(tmp_path: pathlib.Path) -> None:
    subprocess.run([sys.executable, str(K8S / "generate.py"), str(tmp_path)], check=True, capture_output=True)
    committed = K8S / "base" / "generated"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale deploy/k8s/base/generated, run `make k8s-generate`: {mismatch}"


def test_every_overlay_renders_the_whole_suite(renders: dict[str, list[dict[str, Any]]]) -> None:
    expected = {"router", "features", "postprocess", "degradation", "triton-cpu", "envoy", "redis"}
    for name, docs in renders.items():
        deployments = {d["metadata"]["name"] for d in _by_kind(docs, "Deployment")}
        assert expected <= deployments, name
    assert "triton-gpu" not in {d["metadata"]["name"] for d in _by_kind(renders["dev"], "Deployment")}
    assert {"triton-gpu", "stream-worker", "router-protected"} <= {
        d["metadata"]["name"] for d in _by_kind(renders["prod+jobs"], "Deployment")
    }
    assert _by_kind(renders["prod+jobs"], "Job")[0]["spec"]["completionMode"] == "Indexed"


def test_every_object_has_its_namespace(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert namespaces == {"inferline-dev" if name == "dev" else "inferline"}, name


@functools.cache
def _strict_schemas(version: str) -> tuple[pathlib.Path, referencing.Registry[Any]]:
    """kubernetes-validate's strict schemas of ``version`` (its file layout), definitions loaded once.

    ``kubernetes_validate.validate`` reads and parses the 1 MB definitions file on every
    call; the same schemas and the same Draft 2020-12 validation, parsed once per version.
    """
    folder = pathlib.Path(str(importlib.resources.files("kubernetes_validate"))) / "kubernetes-json-schema"
    schemas = folder / f"v{version}-local-strict"
    assert schemas.is_dir(), f"kubernetes-validate has no schemas for {version}"
    definitions = referencing.Resource.from_contents(json.loads((schemas / "_definitions.json").read_text()))
    return schemas, definitions @ referencing.Registry()


@functools.cache
def _strict_validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schemas, registry = _strict_schemas(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    path = schemas / f"{kind.lower()}-{group_version}.json"
    assert path.exists(), f"no schema for {api_version} {kind} in Kubernetes {version}"  # never skipped
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=referencing.Resource.from_contents(schema) @ registry)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_object_validates_strictly(renders: dict[str, list[dict[str, Any]]], version: str) -> None:
    failures = []
    for name, doc in _all_docs(renders):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        for err in _strict_validator(version, doc["apiVersion"], doc["kind"]).iter_errors(doc):
            path = ".".join(str(p) for p in err.path)
            failures.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {path}: {err.message}")
    assert not failures, "\n".join(failures)


def test_strict_validation_catches_a_misspelt_field() -> None:
    probe = {"grpc": {"port": 50051}, "periodSecond": 2}
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i:1", "readinessProbe": probe}]},
    }
    errors = list(_strict_validator(KUBERNETES_VERSIONS[0], "v1", "Pod").iter_errors(doc))
    assert any("periodSecond" in e.message for e in errors)


def test_every_custom_resource_validates_against_its_crd(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The CRDs' schemas as cloudcoil's generated models; they ignore unknown fields, so an
    object must also survive the round trip unchanged (a misspelt field would be dropped)."""
    seen = set()
    for name, doc in _all_docs(renders):
        model = _crd_models().get((doc["apiVersion"], doc["kind"]))
        if model is None:
            continue
        seen.add(doc["kind"])
        parsed = model.model_validate(doc)
        assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc, (
            f"{name} {doc['kind']}/{doc['metadata']['name']} has fields its CRD does not know"
        )
    assert seen == {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def test_crd_check_catches_a_misspelt_field() -> None:
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "w"}, "maxReplicas": 3, "triggers": []},
    }
    parsed = _crd_models()[("keda.sh/v1alpha1", "ScaledObject")].model_validate(doc)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") != doc


# --- cross-references --------------------------------------------------------------------------


def test_workload_selectors_match_their_pods(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        for workload, template in _pod_templates(docs):
            selector = workload["spec"].get("selector")
            if workload["kind"] == "Job":
                continue  # the Job controller makes its own selector
            assert _matches(selector, template["metadata"]["labels"]), f"{name} {workload['metadata']['name']}"
            assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inferline"


def test_services_select_pods_that_have_their_ports(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        for service in _by_kind(docs, "Service"):
            pods = _pods_selected(docs, {"matchLabels": service["spec"]["selector"]})
            assert len(pods) == 1, f"{name} Service/{service['metadata']['name']} selects {len(pods)} workloads"
            container_ports = {
                key: port["containerPort"]
                for container in pods[0]["spec"]["containers"]
                for port in container.get("ports", [])
                for key in (port.get("name"), port["containerPort"])
            }
            for port in service["spec"]["ports"]:
                assert port.get("targetPort", port["port"]) in container_ports, (
                    f"{name} Service/{service['metadata']['name']} port {port}"
                )


def test_budgets_and_autoscalers_target_existing_workloads(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        for pdb in _by_kind(docs, "PodDisruptionBudget"):
            assert len(_pods_selected(docs, pdb["spec"]["selector"])) == 1, f"{name} PDB/{pdb['metadata']['name']}"
        for hpa in _by_kind(docs, "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            _get(docs, target["kind"], target["name"])
        for scaled in _by_kind(docs, "ScaledObject"):
            _get(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    # Every serving tier has a disruption budget.
    budgets = {p["metadata"]["name"] for p in _by_kind(renders["prod"], "PodDisruptionBudget")}
    assert budgets == {"router", "envoy", "features", "postprocess", "degradation", "triton-cpu", "triton-gpu"}


def test_references_to_config_maps_secrets_and_claims_resolve(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        present = {(d["kind"], d["metadata"]["name"]) for d in docs}
        secrets = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "Secret")}
        for workload, template in _pod_templates(docs):
            where = f"{name} {workload['kind']}/{workload['metadata']['name']}"
            for volume in template["spec"].get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in present, where
                if "persistentVolumeClaim" in volume:
                    ref = ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                    assert ref in present or ref in EXTERNAL[name], f"{where}: {ref}"
            for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref is None:
                        continue
                    if ("Secret", ref["name"]) in EXTERNAL[name] or (
                        ref["name"] == "inferline-secrets" and name != "dev"
                    ):
                        assert ref["name"] == "inferline-secrets", where
                        continue
                    assert ref["name"] in secrets, f"{where}: Secret {ref['name']}"
                    assert ref["key"] in secrets[ref["name"]], f"{where}: key {ref['key']}"


def test_images_are_pinned_and_inferline_runs_as_the_image_user(renders: dict[str, list[dict[str, Any]]]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"USER {INFERLINE_UID}:{INFERLINE_UID}" in dockerfile
    for name, docs in renders.items():
        for workload, template in _pod_templates(docs):
            security = template["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
            for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                image = container["image"]
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
                assert tag and tag != "latest", f"{name} {workload['metadata']['name']}: unpinned image {image}"
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert "resources" in container and "requests" in container["resources"]
                if "inferline" in image.split("/")[-1]:
                    user = container["securityContext"].get("runAsUser", security.get("runAsUser"))
                    assert user == INFERLINE_UID, f"{name} {workload['metadata']['name']}: {container['name']}"


# --- the config inside the manifests -----------------------------------------------------------


def _container(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    containers = _get(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    for i, arg in enumerate(args):
        if arg == flag:
            return str(args[i + 1])
        if arg.startswith(flag + "="):
            return str(arg.split("=", 1)[1])
    raise AssertionError(f"{container['name']}: no {flag}")


def _config_of(docs: list[dict[str, Any]], deployment: str, tmp_path: pathlib.Path) -> InferlineConfig:
    """The config a pod of ``deployment`` loads: its ConfigMap, its literal env and (dev) Secret values."""
    template = _get(docs, "Deployment", deployment)["spec"]["template"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    config_map = _get(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / f"{deployment}.yaml"
    path.write_text(config_map["data"]["inferline.yaml"])
    return load_config(path, environ=_pod_environment(template["spec"]["containers"][0]))


def _pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment: literal values, and Secret references with the dev Secret's values."""
    dev_secrets = dict(
        line.split("=", 1)
        for line in (K8S / "overlays" / "dev" / "secrets.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    environ = {}
    for env in container.get("env", []):
        if "value" in env:
            environ[env["name"]] = env["value"]
        elif "secretKeyRef" in env.get("valueFrom", {}):
            environ[env["name"]] = dev_secrets[env["valueFrom"]["secretKeyRef"]["key"]]
    return environ


def _service_port(docs: list[dict[str, Any]], address: str) -> tuple[dict[str, Any], int]:
    """(the pod template behind ``host:port``'s Service, the container port it reaches)."""
    host, port = address.rsplit(":", 1)
    service = _get(docs, "Service", host)
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    (pod,) = _pods_selected(docs, {"matchLabels": service["spec"]["selector"]})
    target = entry.get("targetPort", entry["port"])
    ports = {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    return pod, ports[target] if isinstance(target, str) else target


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_router_config_addresses_reach_the_right_pods(
    renders: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: pathlib.Path
) -> None:
    docs = renders[overlay]
    config = _config_of(docs, "router", tmp_path)
    router = _container(docs, "router")
    assert int(_arg(router, "--port")) == config.server.port
    for service in ("features", "postprocess", "degradation"):
        address = getattr(config.services, service)
        pod, port = _service_port(docs, address)
        (container,) = pod["spec"]["containers"]
        assert container["args"][:2] == ["serve", service]
        assert int(_arg(container, "--port")) == port
        _config_of(docs, service, tmp_path)  # each service's own pods load the config too
    # Triton: the pool the routers use loads every model the routes name.
    assert config.triton.url is not None
    pod, port = _service_port(docs, config.triton.url)
    assert port == 8001 and pod["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"
    loaded = {a.removeprefix("--load-model=") for a in pod["spec"]["containers"][0]["args"] if "--load-model=" in a}
    for route in config.routes.values():
        for variant in [route.primary, *route.alternates, *([route.light] if route.light else [])]:
            assert variant.model in loaded, f"{overlay}: model {variant.model} not loaded by {config.triton.url}"
    assert config.triton.url == ("triton-gpu:8001" if overlay == "prod" else "triton-cpu:8001")
    for url in (config.rate_limit.redis_url, config.score_cache.redis_url):
        pod, port = _service_port(docs, url.split("//", 1)[1].split("/", 1)[0])
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "redis" and port == 6379


def _envoy_bootstrap(docs: list[dict[str, Any]], tmp_path: pathlib.Path) -> pathlib.Path:
    """What the Envoy pod's init container renders: its own command, run here on the pod's
    config (the ConfigMap) and environment (the dev Secret's values)."""
    template = _get(docs, "Deployment", "envoy")["spec"]["template"]["spec"]
    (init,) = template["initContainers"]
    assert init["image"] == _container(docs, "router")["image"]  # the routers' own version renders it
    config_volume = next(v for v in template["volumes"] if "configMap" in v)
    config_map = _get(docs, "ConfigMap", config_volume["configMap"]["name"])
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    config_path = tmp_path / "inferline.yaml"
    config_path.write_text(config_map["data"]["inferline.yaml"])
    out = tmp_path / "envoy.yaml"
    args = [str(config_path) if a == f"{mounts[config_volume['name']]}/inferline.yaml" else a for a in init["args"]]
    args = [str(out) if a == f"{mounts['envoy-config']}/envoy.yaml" else a for a in args]
    assert str(config_path) in args and str(out) in args, init["args"]
    env = {**os.environ, **_pod_environment(init)}
    result = subprocess.run(
        [sys.executable, "-m", "inferline.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    envoy_mount = next(m for m in _container(docs, "envoy")["volumeMounts"] if m["name"] == "envoy-config")
    assert _arg(_container(docs, "envoy"), "-c") == f"{envoy_mount['mountPath']}/envoy.yaml"
    return out


def test_envoy_bootstrap_rendered_in_the_pod_is_accepted_by_envoy(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    bootstrap = _envoy_bootstrap(renders["prod"], tmp_path)
    result = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(bootstrap)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "INFERLINE_GATEWAY_SECRET": "x" * 32},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_listens_where_its_service_points_and_reaches_the_routers(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    docs = renders["prod"]
    envoy = yaml.safe_load(_envoy_bootstrap(docs, tmp_path).read_text())
    (listener,) = envoy["static_resources"]["listeners"]
    listen_port = listener["address"]["socket_address"]["port_value"]
    public = _get(docs, "Service", "inferline")
    assert public["spec"]["type"] == "LoadBalancer"
    _, port = _service_port(docs, f"inferline:{public['spec']['ports'][0]['port']}")
    assert port == listen_port
    endpoints = [
        lb["endpoint"]["address"]["socket_address"]
        for cluster in envoy["static_resources"]["clusters"]
        for group in cluster.get("load_assignment", {}).get("endpoints", [])
        for lb in group["lb_endpoints"]
    ]
    routers = [e for e in endpoints if e["address"] == "router-pods"]
    assert routers, endpoints
    service = _get(docs, "Service", "router-pods")
    assert service["spec"]["clusterIP"] == "None"  # every router pod, not one virtual IP
    pod, port = _service_port(docs, f"router-pods:{routers[0]['port_value']}")
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "router" and port == 50051


@pytest.mark.parametrize("deployment", ["router", "features", "postprocess", "degradation"])
def test_probes_use_the_grpc_health_service_within_the_drain(
    renders: dict[str, list[dict[str, Any]]], deployment: str, tmp_path: pathlib.Path
) -> None:
    docs = renders["prod"]
    config = _config_of(docs, deployment, tmp_path)
    container = _container(docs, deployment)
    port = int(_arg(container, "--port"))
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": ""}, probe
    # SIGTERM: NOT_SERVING at once, calls served for drain_s, then grace_s to finish.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) < config.server.drain_s
    pod = _get(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= config.server.drain_s + config.server.grace_s + 5


def test_autoscaler_metrics_come_from_adapter_rules_over_real_series(renders: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    used = {
        metric["pods"]["metric"]["name"]
        for docs in renders.values()
        for hpa in _by_kind(docs, "HorizontalPodAutoscaler")
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    assert used and used <= set(rules), f"HPA metrics without an adapter rule: {used - set(rules)}"
    registry = CollectorRegistry()
    ServingMetrics(registry)
    exported = {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()
    }
    for name, rule in rules.items():
        series = rule["seriesQuery"].split("{", 1)[0].strip("'")
        if series.startswith("inferline_"):
            assert series in exported, f"adapter rule {name} reads {series}, which the router does not export"


def _allowed(docs: list[dict[str, Any]], source: dict[str, Any], target: dict[str, Any], port: int) -> bool:
    """Whether the NetworkPolicies let ``source`` pods reach ``target`` pods on ``port``."""
    policies = [
        p for p in _by_kind(docs, "NetworkPolicy") if _matches(p["spec"]["podSelector"], target["metadata"]["labels"])
    ]
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None or any(
                "podSelector" in peer
                and "namespaceSelector" not in peer
                and _matches(peer["podSelector"], source["metadata"]["labels"])
                for peer in peers
            ):
                return True
    return False


def _call_paths(docs: list[dict[str, Any]], tmp_path: pathlib.Path) -> set[tuple[str, str, int]]:
    """(caller, callee, port) of every call the inferline processes make, from their configs."""
    paths: set[tuple[str, str, int]] = {("envoy", "router", 50051)}
    for caller in ("router", "features", "postprocess", "degradation"):
        config = _config_of(docs, caller, tmp_path)
        addresses = []
        if caller == "router":
            addresses += [getattr(config.services, s) for s in ("features", "postprocess", "degradation")]
            addresses += [config.triton.url or ""]
        if caller == "degradation" and any(not r.degradation.light_in_process for r in config.routes.values()):
            addresses.append(config.triton.url or "")  # the light model runs on Triton
        if caller in ("router", "degradation"):
            for url in (config.rate_limit.redis_url, config.score_cache.redis_url):
                addresses.append(url.split("//", 1)[1].split("/", 1)[0])
        for address in addresses:
            pod, port = _service_port(docs, address)
            paths.add((caller, pod["metadata"]["labels"]["app.kubernetes.io/name"], port))
    return paths


def test_network_policies_allow_exactly_the_call_paths(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    docs = renders["prod+jobs"]

    def pods(name: str) -> dict[str, Any]:
        (pod,) = _pods_selected(docs, {"matchLabels": {"app.kubernetes.io/name": name}})
        return pod

    allowed = _call_paths(docs, tmp_path) | {
        ("batch", "triton-cpu", 8001),  # components/batch-job: --triton-url
        ("stream-worker", "redis", 6379),  # components/stream-worker: --source, --sink
        ("stream-worker", "triton-cpu", 8001),  # and --triton-url
        ("features", "redis", 6379),  # Feast's Redis online store in a cluster
    }
    # components/protected-lane: Envoy reaches the lane's routers, which call what the routers call.
    allowed |= {("router-protected", callee, port) for caller, callee, port in allowed if caller == "router"}
    allowed.add(("envoy", "router-protected", 50051))
    assert ("router", "triton-gpu", 8001) in allowed and ("degradation", "triton-cpu", 8001) in allowed
    denied = [
        ("envoy", "features", 50052),
        ("envoy", "triton-gpu", 8001),
        ("envoy", "redis", 6379),
        ("features", "router", 50051),
        ("features", "router-protected", 50051),
        ("batch", "router", 50051),
        ("postprocess", "triton-cpu", 8001),
        ("router", "triton-cpu", 8000),
    ]
    for source, target, port in sorted(allowed):
        assert _allowed(docs, pods(source), pods(target), port), f"{source} cannot reach {target}:{port}"
    for source, target, port in denied:
        assert not _allowed(docs, pods(source), pods(target), port), f"{source} may reach {target}:{port}"
    deny_all = _get(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny_all["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_gpu_pool_requests_gpus_on_gpu_nodes(renders: dict[str, list[dict[str, Any]]]) -> None:
    pod = _get(renders["prod"], "Deployment", "triton-gpu")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    cpu_pool = _get(renders["prod"], "Deployment", "triton-cpu")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pool["containers"][0]["resources"].get("limits", {})


def test_prometheus_rule_carries_the_alert_groups(renders: dict[str, list[dict[str, Any]]]) -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "grafana" / "alerts.yaml").read_text())
    rule = _get(renders["prod"], "PrometheusRule", "inferline")
    assert rule["spec"]["groups"] == alerts["groups"]
    monitor = _get(renders["prod"], "ServiceMonitor", "inferline")
    scraped = [
        s
        for s in _by_kind(renders["prod"], "Service")
        if _matches(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in scraped} >= {
        "router",
        "features",
        "postprocess",
        "degradation",
        "triton-gpu",
    }
    assert all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in scraped)


def test_batch_job_shards_by_completion_index(renders: dict[str, list[dict[str, Any]]]) -> None:
    (job,) = _by_kind(renders["prod+jobs"], "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert _arg(container, "--shard") == f"$(JOB_COMPLETION_INDEX)/{job['spec']['completions']}"
    assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in container["env"])
    assert _arg(container, "--triton-url") == "triton-cpu:8001"


def test_stream_workers_run_as_the_cli_parses_and_keda_scales_them_on_their_groups_lag(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    docs = renders["prod+jobs"]
    container = _container(docs, "stream-worker")
    args = container["args"]
    assert args[:2] == ["stream", "run"]
    stream_run = typer.main.get_command(cli).commands["stream"].commands["run"]  # type: ignore[attr-defined]
    parsed = stream_run.make_context("run", list(args[2:])).params  # a misspelt or missing option raises here
    config = _config_of(docs, "stream-worker", tmp_path)
    assert parsed["route"] in config.routes
    source, sink = StreamEndpoint.parse(parsed["source"]), StreamEndpoint.parse(parsed["sink"])
    assert source.stream != sink.stream
    for endpoint in (source, sink):
        pod, _ = _service_port(docs, f"{endpoint.host}:{endpoint.port}")
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "redis"
    pod, _ = _service_port(docs, parsed["triton_url"])
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == parsed["metrics_port"]

    scaled = _get(docs, "ScaledObject", "stream-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "stream-worker"
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert (metadata["address"], metadata["stream"], metadata["consumerGroup"]) == (
        f"{source.host}:{source.port}",
        source.stream,
        parsed["group"],
    )
    # The group's lag (entries not yet delivered), not its pending entries: each worker holds
    # at most --max-in-flight of those, so their count cannot ask for more workers.
    assert "lagCount" in metadata and "pendingEntriesCount" not in metadata


def test_dev_features_pods_fill_their_feast_store_before_serving(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    """In dev, an init container runs the demo Feast set-up on the very repository the features
    service's config reads, into the volume the service reads it from; prod runs none (its store
    is the operator's)."""
    docs = renders["dev"]
    spec = _get(docs, "Deployment", "features")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    repo = str(_config_of(docs, "features", tmp_path).feature_store.feast_repo)
    assert init["image"] == _container(docs, "features")["image"]
    assert init["command"] == ["python", "-m", "inferline.demo.feast_setup", repo]
    assert importlib.util.find_spec("inferline.demo.feast_setup") is not None
    data_mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    served = {m["name"]: m["mountPath"] for m in _container(docs, "features")["volumeMounts"]}
    assert data_mount["feast-data"] == served["feast-data"] == f"{repo}/data"
    assert "initContainers" not in _get(renders["prod"], "Deployment", "features")["spec"]["template"]["spec"]


def test_the_protected_lanes_pods_are_the_routers_but_for_their_names(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["prod+jobs"]
    router, lane = _get(docs, "Deployment", "router"), _get(docs, "Deployment", "router-protected")
    renamed = json.loads(json.dumps(lane).replace("router-protected", "router"))
    assert renamed["spec"] == router["spec"]  # components/protected-lane copies base/router.yaml
    assert lane["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "router"
    env = {e["name"]: e.get("value") for e in lane["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INFERLINE_TRITON__URL"] == "triton-gpu:8001"  # gpu-pool's patch reaches the lane too
    budget = _get(docs, "PodDisruptionBudget", "router-protected")
    assert _pods_selected(docs, budget["spec"]["selector"]) == [lane["spec"]["template"]]


def test_envoy_sends_the_protected_classes_to_the_lane_with_the_routers_as_failover(
    renders: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    docs = renders["prod+jobs"]
    envoy = yaml.safe_load(_envoy_bootstrap(docs, tmp_path).read_text())
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for name in ("inferline_router_protected", "inferline_router_kserve_protected"):
        groups = clusters[name]["load_assignment"]["endpoints"]
        hosts = [
            (g.get("priority", 0), [lb["endpoint"]["address"]["socket_address"] for lb in g["lb_endpoints"]])
            for g in groups
        ]
        assert hosts == [
            (0, [{"address": "router-protected-pods", "port_value": 50051}]),
            (1, [{"address": "router-pods", "port_value": 50051}]),
        ]
    pod, port = _service_port(docs, "router-protected-pods:50051")
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "router-protected" and port == 50051
    assert _get(docs, "Service", "router-protected-pods")["spec"]["clusterIP"] == "None"
    result = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "INFERLINE_GATEWAY_SECRET": "x" * 32},
    )
    assert result.returncode == 0, result.stdout + result.stderr
