"""The layout of a model archive: the one module that knows which file holds what.

An archive (``.mar``, a zip) holds, flat at its root, the backbone's feature body as a portable ONNX
graph with its weights, the ImageNet classifier or a head, the class names, our manifest
(``model_info.json``), TorchServe's ``model-config.yaml`` and ``MAR-INF/MANIFEST.json``, optional
check images, and the ``handlers`` package. ``imagerec.archive`` writes it; ``ArchiveContents`` reads it back, from the
``.mar`` itself (management tools, without unpacking) or from the folder TorchServe unpacked it into
(the worker). Standard library only: the worker and the management tools both import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

# The backbone's feature body as a portable ONNX graph (imagerec/export.py writes it, handlers/runtime.py
# runs it). Its weights sit in one raw float32 file, ONNX external data named by the body's state_dict
# keys; the index says where each lies, so the eager fallback reads the same file (one copy per archive).
FEATURES_GRAPH_FILE = "features.onnx"
FEATURES_DATA_FILE = "features.onnx.data"  # the archive's serializedFile
FEATURES_INDEX_FILE = "features.index.json"
CLASSIFIER_FILE = "classifier.pt"  # plain state_dict of the backbone's ImageNet classifier (ImageNet archives)
# A few-shot head's state (handlers/heads.py ``state()``): named arrays in numpy's .npz, read with
# allow_pickle=False. Plain arrays only: loading one can run no code, whatever the file holds, and
# reading it needs no torch.
HEAD_FILE = "head.npz"
# What archives made before heads moved to numpy carry instead: the head's torch state_dict (read
# with torch.load(weights_only=True), its tensors becoming the same named arrays).
LEGACY_HEAD_FILE = "head.pt"
LABELS_FILE = "index_to_name.json"  # {"0": "tench", ...}, TorchServe's own convention
MODEL_INFO_FILE = "model_info.json"  # our manifest: backbone, precision, head, training record
MODEL_CONFIG_FILE = "model-config.yaml"  # TorchServe's per-model config (batching, workers)
MAR_MANIFEST_FILE = "MAR-INF/MANIFEST.json"  # written by torch-model-archiver; TorchServe reads it
CHECK_IMAGES_DIR = "check_images"  # a few labelled images a deployment sends before switching
HANDLER_PACKAGE = "handlers"  # this package, shipped inside every archive


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file: the manifest records its weights' (the worker checks them at load),
    and the feature cache keys photos by it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_image_member(index: int, suffix: str) -> str:
    """Archive path of the ``index``-th check image (``check_images/000.jpg``)."""
    return f"{CHECK_IMAGES_DIR}/{index:03d}{suffix.lower()}"


class ArchiveContents:
    """Read an archive's files from the ``.mar`` (a zip) or from an unpacked folder.

    Errors are ``ValueError`` naming the archive and the member: a missing member, a corrupt zip or
    JSON that does not parse all mean "not a model archive of this project".
    """

    def __init__(self, location: str | Path):
        self.location = Path(location)

    def read_bytes(self, member: str) -> bytes:
        try:
            if self.location.is_dir():
                return (self.location / member).read_bytes()
            with zipfile.ZipFile(self.location) as zf:
                return zf.read(member)
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise ValueError(f"{self.location}: cannot read {member}: {exc}") from None

    def read_json(self, member: str):
        try:
            return json.loads(self.read_bytes(member))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.location} is not a model archive of this project: {member}: {exc}") from None

    def info(self) -> dict:
        """model_info.json: backbone, precision, head, classes, training record, metrics."""
        return self.read_json(MODEL_INFO_FILE)

    def mar_manifest(self) -> dict:
        """TorchServe's MAR-INF/MANIFEST.json: the name and version TorchServe registers it under."""
        return self.read_json(MAR_MANIFEST_FILE)

    def labels(self) -> list[str]:
        """Class names in index order."""
        mapping = self.read_json(LABELS_FILE)
        return [mapping[str(i)] for i in range(len(mapping))]

    def verify(self) -> None:
        """Raise ValueError unless the zip is readable and every member's CRC is intact."""
        try:
            with zipfile.ZipFile(self.location) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ValueError(f"{self.location} is not a readable archive (truncated or corrupt?): {exc}") from None
        if bad is not None:
            raise ValueError(f"{self.location} is corrupt: member {bad} fails its checksum")

    def extract_to(self, folder: str | Path) -> Path:
        """Unpack the ``.mar`` into ``folder`` (as TorchServe does) and return the folder."""
        try:
            with zipfile.ZipFile(self.location) as zf:
                zf.extractall(folder)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ValueError(f"{self.location} is not a readable archive: {exc}") from None
        return Path(folder)


def read_archive_info(archive: str | Path) -> dict:
    """model_info.json of a ``.mar`` or an unpacked archive. Raises ValueError if it is not one."""
    return ArchiveContents(archive).info()


def extract_archive(archive: str | Path, into: str | Path) -> Path:
    """Unpack a ``.mar`` so ``handlers.recognizer.load_recognizer`` can read it in-process."""
    return ArchiveContents(archive).extract_to(into)
