"""Reading a built archive's manifests without unpacking it and without torch; the file hash they record.

``scripts/manage.py`` runs beside TorchServe and must stay light, so this module imports only the
standard library and ``handlers.constants``. ``handlers.archive`` re-exports ``read_archive_info``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

from handlers.constants import MODEL_INFO_FILE

MAR_MANIFEST_FILE = "MAR-INF/MANIFEST.json"  # written by torch-model-archiver; TorchServe reads it


def _read_json_member(archive: str | Path, member: str) -> dict:
    try:
        with zipfile.ZipFile(archive) as zf:
            return json.loads(zf.read(member))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{archive} is not a model archive of this project: {exc}") from None


def read_archive_info(archive: str | Path) -> dict:
    """model_info.json of a built archive, without unpacking it. Raises ValueError if it is not one."""
    return _read_json_member(archive, MODEL_INFO_FILE)


def read_mar_manifest(archive: str | Path) -> dict:
    """TorchServe's MAR-INF/MANIFEST.json: the name and version TorchServe registers the archive under."""
    return _read_json_member(archive, MAR_MANIFEST_FILE)


def read_member(archive: str | Path, member: str) -> bytes:
    """One file of an archive (e.g. a packed check image)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise ValueError(f"{archive}: cannot read {member}: {exc}") from None


def verify_archive(archive: str | Path) -> None:
    """Raise ValueError unless every member's CRC is intact (a truncated or corrupted copy fails)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{archive} is not a readable archive (truncated or corrupt?): {exc}") from None
    if bad is not None:
        raise ValueError(f"{archive} is corrupt: member {bad} fails its checksum")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (weights_sha256 in the manifests, feature cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
