"""deploy/: the kustomize base and the example overlay render and validate against Kubernetes schemas.

Rendered with `kubectl kustomize` where kubectl exists, and always with tests/kustomize_lite.py
(checked against kubectl when both exist); validated offline with kubernetes-validate (strict: an
unknown or misspelt field fails).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from imagerec.torchserve import read_properties
from tests.kustomize_lite import render

from imagerec.paths import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
K8S_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")
GENERATED_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of deploy/ with the overlay's client-token file (never committed) in place."""
    copy_root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, copy_root)
    (copy_root / "overlays" / "example" / "client-token").write_text("a-test-token-0123456789abcdef\n")
    return copy_root


def kubectl_render(directory) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered(directory) -> list[dict]:
    return kubectl_render(directory) if KUBECTL else render(directory)


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


@pytest.mark.parametrize("target", ["base", "overlays/example"])
def test_renders_and_validates(tree, target):
    objects = rendered(tree / target)
    kinds = by_kind(objects)
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                "ConfigMap", "PersistentVolumeClaim"} | ({"Secret"} if target != "base" else set())
    assert set(kinds) == expected
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validation_catches_a_misspelt_field(tree):
    deployment = by_kind(rendered(tree / "base"))["Deployment"][0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = broken["spec"]["template"]["spec"][
        "containers"][1].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_shape(tree):
    kinds = by_kind(rendered(tree / "overlays/example"))
    deployment = kinds["Deployment"][0]
    spec = deployment["spec"]
    assert spec["replicas"] == 3  # the overlay's patch applied
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"torchserve", "gateway"}
    assert containers["torchserve"]["resources"]["requests"]["memory"] == "960Mi"  # overlay's resources
    assert containers["torchserve"]["image"] == "registry.example.invalid/imagerec-serve:0.1"
    # Only the gateway exposes a port; readiness on its /ready, liveness on both.
    assert "ports" not in containers["torchserve"]
    assert containers["gateway"]["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert containers["gateway"]["livenessProbe"]["httpGet"]["path"] == "/live"
    assert "livenessProbe" in containers["torchserve"]
    # Draining: the grace period covers preStop + the drain timeout.
    prestop = int(containers["torchserve"]["lifecycle"]["preStop"]["exec"]["command"][1])
    args = containers["torchserve"]["args"]
    drain = float(args[args.index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] >= prestop + drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Generated ConfigMaps and the Secret are referenced by their hashed names (a new set = a new revision).
    names = {(o["kind"], o["metadata"]["name"]) for o in kinds["ConfigMap"] + kinds["Secret"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert ("ConfigMap", volumes["model-set"]["configMap"]["name"]) in names
    assert ("Secret", volumes["client-token"]["secret"]["secretName"]) in names
    assert GENERATED_SUFFIX.search(volumes["model-set"]["configMap"]["name"])
    # Every selector selects the Deployment's pods.
    pod_labels = spec["template"]["metadata"]["labels"]
    for selector in (kinds["Service"][0]["spec"]["selector"],
                     kinds["PodDisruptionBudget"][0]["spec"]["selector"]["matchLabels"],
                     kinds["NetworkPolicy"][0]["spec"]["podSelector"]["matchLabels"],
                     spec["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    # The NetworkPolicy admits the gateway's port only, and no egress.
    policy = kinds["NetworkPolicy"][0]["spec"]
    assert policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    assert policy["egress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert kinds["HorizontalPodAutoscaler"][0]["spec"]["minReplicas"] == 3


def test_model_set_revision_changes_the_pod_template(tree):
    """A new head version in model-set.json gives the ConfigMap a new name: a new Deployment revision."""
    before = by_kind(rendered(tree / "overlays/example"))["Deployment"][0]["spec"]["template"]
    set_file = tree / "overlays" / "example" / "model-set.json"
    original = set_file.read_text()
    try:
        set_file.write_text(original.replace('"bees_vs_ants_v2.mar"', '"bees_vs_ants_v3.mar"').replace(
            '"version": "2"', '"version": "3"'))
        after = by_kind(rendered(tree / "overlays/example"))["Deployment"][0]["spec"]["template"]
    finally:
        set_file.write_text(original)
    assert before != after
    volume = lambda template: {v["name"]: v for v in template["spec"]["volumes"]}["model-set"]["configMap"]["name"]
    assert volume(before) != volume(after)


def test_model_sets_are_valid():
    from imagerec.model_set import read_model_set

    for path in DEPLOY.rglob("model-set.json"):
        model_set = read_model_set(path)
        assert model_set.revision and model_set.models


def test_torchserve_config_matches_the_project():
    """The pod's config.properties is the project's (kustomize cannot read files outside deploy/)."""
    assert read_properties(DEPLOY / "base" / "config.properties") == read_properties(PROJECT_ROOT / "config.properties")


def normalised(objects: list[dict]) -> dict:
    """Objects keyed by (kind, name) with generated name suffixes removed (kustomize's hash differs)."""
    text = yaml.safe_dump(objects, sort_keys=True)
    text = re.sub(r"(imagerec-(?:model-set|torchserve-config|client-token))-[a-z0-9]{10}", r"\1", text)
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load(text)}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize_lite alone renders the manifests")
@pytest.mark.parametrize("target", ["base", "overlays/example"])
def test_lite_renderer_agrees_with_kubectl(tree, target):
    assert normalised(render(tree / target)) == normalised(kubectl_render(tree / target))


def test_dashboard_queries_exported_metrics():
    """Every metric the Grafana dashboard queries is declared in metrics.yaml (so it is exported)."""
    import json

    config = yaml.safe_load((PROJECT_ROOT / "metrics.yaml").read_text())
    declared = {m["name"] for section in ("ts_metrics", "model_metrics")
                for metrics in config[section].values() for m in metrics}
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"rate\((\w+)\[", target["expr"])}
    assert queried and queried <= declared, queried - declared
