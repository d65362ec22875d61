"""A small kustomize renderer for the features deploy/ uses, for machines without `kubectl kustomize`.

Supports: resources (files and directories with a kustomization), namespace, labels with
includeSelectors, configMapGenerator and secretGenerator (files; behavior create/replace; names
get a content-hash suffix as kustomize's do, and references in Deployments follow them), images,
patches (a strategic-merge file whose lists of named items merge by name, or an inline JSON6902
patch with a target). tests/test_deploy_manifests.py checks it against `kubectl kustomize` where
kubectl exists, so it cannot silently drift from the real thing.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path

import yaml

# Where includeSelectors labels go, per kind (the subset of kustomize's field specs deploy/ needs).
SELECTOR_PATHS = {
    "Deployment": [("spec", "selector", "matchLabels"), ("spec", "template", "metadata", "labels")],
    "Service": [("spec", "selector")],
    "PodDisruptionBudget": [("spec", "selector", "matchLabels")],
    "NetworkPolicy": [("spec", "podSelector", "matchLabels")],
}


def _hash_suffix(obj: dict) -> str:
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def _generate(kind: str, spec: dict, root: Path) -> dict:
    data = {}
    for item in spec.get("files", []):
        key, _, source = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        text = (root / source).read_text()
        data[key] = base64.b64encode(text.encode()).decode() if kind == "Secret" else text
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}, "data": data}
    if kind == "Secret":
        obj["type"] = "Opaque"
    return obj


def _merge(base, patch):
    """Strategic merge, simplified: dicts merge, lists of dicts with "name" merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            match = next((i for i, b in enumerate(out) if b.get("name") == item["name"]), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = _merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def _json6902(obj: dict, operations: list[dict]) -> dict:
    for op in operations:
        parts = [p for p in op["path"].split("/") if p]
        target = obj
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] in ("replace", "add"):
            target[parts[-1]] = op["value"]
        elif op["op"] == "remove":
            del target[parts[-1]]
        else:
            raise ValueError(f"unsupported JSON6902 op {op['op']}")
    return obj


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print (generated names hashed)."""
    objects, generated = _render(Path(directory))
    renames = {}
    for obj in objects:
        if id(obj) in generated:
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{old}-{_hash_suffix(obj)}"
            renames[(obj["kind"], old)] = obj["metadata"]["name"]
    for obj in objects:
        if obj["kind"] == "Deployment":
            for volume in obj["spec"]["template"]["spec"].get("volumes", []):
                if "configMap" in volume:
                    volume["configMap"]["name"] = renames.get(("ConfigMap", volume["configMap"]["name"]),
                                                              volume["configMap"]["name"])
                if "secret" in volume:
                    volume["secret"]["secretName"] = renames.get(("Secret", volume["secret"]["secretName"]),
                                                                 volume["secret"]["secretName"])
    return objects


def _render(root: Path) -> tuple[list[dict], set[int]]:
    config = yaml.safe_load((root / "kustomization.yaml").read_text())
    objects: list[dict] = []
    generated: set[int] = set()
    for resource in config.get("resources", []):
        path = root / resource
        if path.is_dir():
            sub_objects, sub_generated = _render(path)
            objects += sub_objects
            generated |= sub_generated
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for spec in config.get(key, []):
            new = _generate(kind, spec, root)
            if spec.get("behavior") == "replace":
                old = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == spec["name"])
                if old["metadata"].get("labels"):  # the replacement keeps what the base gave it
                    new["metadata"]["labels"] = dict(old["metadata"]["labels"])
                objects[objects.index(old)] = new
                generated.discard(id(old))
            objects.append(new) if spec.get("behavior") != "replace" else None
            generated.add(id(new))
    for entry in config.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeSelectors"):
                for path in SELECTOR_PATHS.get(obj["kind"], []):
                    node = obj
                    for part in path:
                        node = node.setdefault(part, {})
                    node.update(entry["pairs"])
                template = obj.get("spec", {}).get("template", {}).get("spec", {})
                for constraint in template.get("topologySpreadConstraints", []):
                    constraint.setdefault("labelSelector", {}).setdefault("matchLabels", {}).update(entry["pairs"])
    for obj in objects:
        if config.get("namespace"):
            obj["metadata"]["namespace"] = config["namespace"]
        for image in config.get("images", []):
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == image["name"] or container["image"].startswith(
                        image.get("newName", "\0") + ":"):
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in config.get("patches", []):
        if "path" in patch:
            body = yaml.safe_load((root / patch["path"]).read_text())
            target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        else:
            body, target = yaml.safe_load(patch["patch"]), patch["target"]
        matches = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if len(matches) != 1:
            raise ValueError(f"patch target {target} matches {len(matches)} objects")
        index = objects.index(matches[0])
        patched = _merge(matches[0], body) if isinstance(body, dict) else _json6902(matches[0], body)
        if index in [objects.index(o) for o in objects if id(o) in generated]:
            generated.add(id(patched))
        objects[index] = patched
    return objects, generated
