"""Model sets: the archives and versions one server (one pod) serves, and bringing a server to one.

A model set is a small JSON file (in Kubernetes: a ConfigMap; a new head version is a new revision
of it, rolled out by the Deployment, and a rollback is the previous revision)::

    {"revision": "heads-2",
     "models": [
       {"name": "efficientnet_lite0", "version": "1.0", "archive": "efficientnet_lite0_v1.0.mar",
        "checks": [{"file": "checks/coffee.png", "label": "espresso"}]},
       {"name": "bees_vs_ants", "version": "2", "archive": "bees_vs_ants_v2.mar",
        "sha256": "9f2c..."}]}

``archive`` is a file name in the server's model store; ``sha256`` (optional) pins its content, so
an archive replaced on a shared volume is refused rather than served; ``checks`` (optional; default:
the archive's own packed check images) are image files relative to the set file with their expected
top-1 label. ``prepare`` registers every version that is not loaded yet, sends it its check images
and only then makes it the default, using the same lifecycle operations as ``scripts/manage.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from handlers.layout import file_sha256
from imagerec.naming import validate_name, validate_version
# The management client and lifecycle operations; they move to imagerec/ with the restructure (issue 10).
from imagerec.management import DEFAULT_MIN_ACCURACY, Client, ManageError, deploy, inspect_archive, run_check

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSetEntry:
    name: str
    version: str
    archive: str  # file name in the model store
    sha256: str | None = None
    checks: tuple[tuple[Path, str | None], ...] = ()  # (image file, expected top-1 label)
    workers: int | None = None  # None: the archive's own setting


@dataclass(frozen=True)
class ModelSet:
    revision: str
    models: tuple[ModelSetEntry, ...] = field(default_factory=tuple)
    min_accuracy: float = DEFAULT_MIN_ACCURACY


def read_model_set(path: str | Path) -> ModelSet:
    """Parse and validate a model-set file. Raises ValueError naming what is wrong."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model set {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        raise ValueError(f"model set {path} needs a non-empty \"models\" list")
    entries, names = [], set()
    for item in raw["models"]:
        try:
            name, version, archive = validate_name(item["name"]), validate_version(str(item["version"])), item["archive"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"model set {path}: every model needs name, version and archive ({exc})") from None
        if Path(archive).name != archive or not archive.endswith(".mar"):
            raise ValueError(f"model set {path}: archive {archive!r} must be a .mar file name in the model store")
        if name in names:
            raise ValueError(f"model set {path}: {name} appears twice (a set serves one version per model)")
        names.add(name)
        checks = tuple((path.parent / check["file"], check.get("label")) for check in item.get("checks") or [])
        entries.append(ModelSetEntry(name=name, version=version, archive=archive, sha256=item.get("sha256"),
                                     checks=checks, workers=item.get("workers")))
    return ModelSet(revision=str(raw.get("revision", "")), models=tuple(entries),
                    min_accuracy=float(raw.get("min_accuracy", DEFAULT_MIN_ACCURACY)))


def prepare(client: Client, model_set: ModelSet, timeout: float = 300.0) -> list[dict]:
    """Bring the server to the set: each version registered, READY, checked, and the default.

    Raises ManageError (the server must then not be marked ready). Versions of the set that are
    already loaded (e.g. the backbone serve.py started with) are checked too: nothing is served
    unchecked.
    """
    outcomes = []
    for entry in model_set.models:
        archive = client.model_store / entry.archive
        facts = inspect_archive(archive)
        if (facts.name, facts.version) != (entry.name, entry.version):
            raise ManageError(f"{entry.archive} is {facts.name} v{facts.version}, but the model set says "
                              f"{entry.name} v{entry.version}")
        if entry.sha256 and file_sha256(archive) != entry.sha256:
            raise ManageError(f"{entry.archive} does not have the sha256 the model set pins: refusing to serve it")
        checks = [(str(file), Path(file).read_bytes(), label) for file, label in entry.checks] or facts.check_images()
        if not checks:
            raise ManageError(f"{entry.name} v{entry.version}: no check images (the archive has none and the "
                              "model set names none): a set never serves an unchecked version")
        if any(e["modelVersion"] == entry.version for e in client.versions(entry.name)):
            workers = client.describe(entry.name, entry.version)["minWorkers"]
            client.wait_ready(entry.name, entry.version, workers, timeout)
            result = {"name": entry.name, "version": entry.version,
                      "check": run_check(client, facts, checks, model_set.min_accuracy)}
            client.set_default(entry.name, entry.version)
        else:
            result = deploy(client, archive, checks=checks, min_accuracy=model_set.min_accuracy,
                            workers=entry.workers, timeout=timeout)
        logger.info("model set %s: %s v%s ready and checked %s", model_set.revision, entry.name, entry.version,
                    result.get("check"))
        outcomes.append(result)
    return outcomes
