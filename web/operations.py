"""What the page asks of TorchServe's management API, through ``scripts/manage.py``'s own functions.

Nothing here re-implements a lifecycle step: deploy, rollback, retire, scale and overview are
manage.py's, so the page and the command line keep the same order and the same guarantees. These
functions are blocking (``requests``); the page server runs them in worker threads.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from handlers.layout import ArchiveContents
from imagerec.management import (
    DEFAULT_MIN_ACCURACY,
    EXIT_REFUSED,
    Client,
    ManageError,
    deploy,
    inspect_archive,
    overview,
    rollback,
    retire,
    run_check,
    scale,
)

__all__ = ["Client", "ManageError", "deploy", "rollback", "retire", "scale", "list_modes", "make_default",
           "next_version"]

_info_cache: dict[tuple[str, float], dict] = {}
_info_lock = threading.Lock()


def archive_summary(path: Path) -> dict:
    """Manifest facts the page shows for one archive (cached per file and modification time)."""
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return {}
    with _info_lock:
        if key in _info_cache:
            return _info_cache[key]
    contents = ArchiveContents(path)
    try:
        info = contents.info()
    except ValueError:
        return {}
    classes = info.get("classes")
    if not classes:  # the ImageNet model keeps its 1000 names in the labels file only
        try:
            classes = contents.labels()
        except (ValueError, KeyError):
            classes = []
    validation = info.get("validation") or {}
    summary = {
        "kind": info.get("kind"),
        "backbone": info.get("backbone"),
        "classes": classes,
        "num_classes": info.get("num_classes", len(classes)),
        "accuracy": validation.get("accuracy"),
        "validation_images": validation.get("images"),
        # Archives built before the manifest recorded it: the file's own date.
        "trained_at": info.get("trained_at") or datetime.fromtimestamp(key[1], timezone.utc).isoformat(timespec="seconds"),
    }
    with _info_lock:
        _info_cache[key] = summary
    return summary


def list_modes(client: Client) -> list[dict]:
    """Every registered model (manage.overview) with its versions' manifest facts."""
    rows = overview(client)
    for row in rows:
        for version in row["versions"]:
            path = client.model_store / (version.get("archive") or "")
            version.update(archive_summary(path) if path.parent == client.model_store else {})
        default = next((v for v in row["versions"] if v["default"]), row["versions"][-1] if row["versions"] else {})
        row["kind"] = default.get("kind")
        row["classes"] = default.get("classes", [])
        for version in row["versions"]:
            version.pop("classes", None)  # once per mode is enough (1000 names for ImageNet)
        row["num_classes"] = default.get("num_classes")
    return rows


def make_default(client: Client, name: str, version: str) -> dict:
    """Make a registered version the default, checked: the archive's own check images must pass on
    that version first (manage.run_check, as a deploy does), then manage.rollback(to=version)."""
    entries = {e["modelVersion"]: e for e in client.versions(name)}
    if version not in entries:
        raise ManageError(f"{name} v{version} is not registered", EXIT_REFUSED)
    facts = client.archive_of(entries[version])
    check = None
    if facts is not None and facts.check_images():
        check = run_check(client, facts, facts.check_images(), DEFAULT_MIN_ACCURACY)
    result = rollback(client, name, version)
    return {**result, "check": check}


def next_version(client: Client, name: str, reserved: list[str]) -> str:
    """The next whole-number version of ``name``: above every registered version, every archive of it
    in the model store and every version ``reserved`` by jobs not yet deployed."""
    seen = [client.base_version(e) for e in client.versions(name)]
    seen += [p.name[len(name) + 2: -len(".mar")] for p in client.model_store.glob(f"{name}_v*.mar")]
    seen += reserved
    numbers = [int(m.group(1)) for v in seen if (m := re.match(r"(\d+)", v))]
    return str(max(numbers, default=0) + 1)


def deploy_archive(client: Client, archive: Path) -> dict:
    """The checked deploy of manage.py (register beside the serving version, check, switch)."""
    inspect_archive(archive)  # refuse a damaged file before anything reaches TorchServe
    started = time.monotonic()
    result = deploy(client, archive)
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def scale_version(client: Client, name: str, version: str | None, workers: int) -> dict:
    return scale(client, name, version, workers)


def retire_version(client: Client, name: str, version: str) -> dict:
    return retire(client, name, version)
