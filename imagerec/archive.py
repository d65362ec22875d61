"""Writing model archives (.mar), with the file names of ``handlers.layout``.

An archive is self-contained: the backbone's feature body as a portable ONNX graph whose raw weights
file is also the eager fallback's (imagerec/export.py), the ImageNet classifier or a few-shot head,
class names, ``model_info.json`` (our manifest, with the accuracy guard's precision verdicts),
TorchServe's ``model-config.yaml``, the runtime-only ``handlers`` package and the handler.
``handlers.recognizer.load_recognizer`` reads the same files back.
"""

from __future__ import annotations

import json
import os
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

import handlers
from handlers.backbones import get_backbone
from handlers.constants import PRECISIONS
from handlers.layout import (
    CHECK_IMAGES_DIR,
    CLASSIFIER_FILE,
    FEATURES_DATA_FILE,
    HANDLER_PACKAGE,
    HEAD_FILE,
    LABELS_FILE,
    MODEL_CONFIG_FILE,
    MODEL_INFO_FILE,
    check_image_member,
    file_sha256,
)
from handlers.machine import worker_threads
from imagerec.export import export_features
from imagerec.files import atomic_copy
from imagerec.naming import archive_file_name, validate_name, validate_version

logger = logging.getLogger(__name__)

HANDLERS_DIR = Path(handlers.__file__).resolve().parent
HANDLER_FILE = HANDLERS_DIR / "recognition_handler.py"

@dataclass
class BatchingConfig:
    """TorchServe's dynamic batching and worker settings, written to model-config.yaml."""

    batch_size: int = 8
    # 1 ms, not 5: a lone request waits the whole delay for company that never comes (resnet18, one
    # client: p50 24 ms at 5 ms, 17.5 ms at 1 ms, same 16-client throughput; benchmarks/bench_serving.py).
    # 0 is worse still: TorchServe 0.12 then answers a lone request after about 100 ms.
    max_batch_delay_ms: int = 1
    workers: int = 1
    torch_threads: int = 0  # 0: the machine's cores divided among the workers
    response_timeout_s: int = 120

    @property
    def threads(self) -> int:
        """torch threads of each worker (``handlers.machine.worker_threads``, which the worker applies)."""
        return worker_threads(self.workers, self.torch_threads)

    def to_yaml(self) -> dict:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "handler": {"torch_threads": self.torch_threads},
        }


def build_archive(
    *,
    name: str,
    version: str,
    backbone_name: str,
    weights_path: str | Path,
    labels: list[str],
    out_dir: str | Path,
    precision: str = "auto",
    head=None,
    info: dict | None = None,
    check_images: list[tuple[Path, str]] | None = None,
    batching: BatchingConfig | None = None,
    precision_guard: dict | None = None,
    export_cache: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/<name>_v<version>.mar`` and return its path.

    head: a fitted ``FeatureHead`` or None for the backbone's ImageNet classifier.
    info: extra manifest entries (training arguments, data fingerprint, metrics...).
    check_images: (image path, expected label) pairs packed for deployment checks.
    precision: the worker's precision policy (handlers/runtime.py ``choose_precision``).
    precision_guard: the accuracy guard's verdicts ({"bf16": {"allowed": ..., "reason": ...}},
        imagerec/precision_guard.py); without one, reduced precision stays off.
    export_cache: where exported ONNX graphs are cached (default imagerec/export.py's).
    """
    validate_name(name)
    validate_version(version)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    backbone = get_backbone(backbone_name)
    target = Path(out_dir) / archive_file_name(name, version)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --version or remove it")
    batching = batching or BatchingConfig()
    manifest = base_manifest(name, version, backbone.name, weights_path, precision, precision_guard, labels, head, info)
    with tempfile.TemporaryDirectory(prefix="mar-stage-") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"  # everything here lands at the archive root
        extra.mkdir()
        manifest["features"] = export_features(backbone.name, Path(weights_path), extra, export_cache)
        shutil.move(extra / FEATURES_DATA_FILE, stage / FEATURES_DATA_FILE)  # the serializedFile
        write_model_files(extra, labels, head, backbone, weights_path)
        if check_images:
            manifest["check_images"] = write_check_images(extra, check_images)
        (extra / MODEL_INFO_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        shutil.copytree(HANDLERS_DIR, extra / HANDLER_PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(batching.to_yaml(), sort_keys=False))
        _run_model_archiver(name, version, stage)
        atomic_copy(stage / f"{name}.mar", target)
    logger.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def base_manifest(name: str, version: str, backbone_name: str, weights_path: str | Path, precision: str,
                  precision_guard: dict | None, labels: list[str], head, info: dict | None) -> dict:
    """model_info.json before the build adds what it produced (the exported graph, check images)."""
    return {
        "name": name,
        "version": version,
        "kind": "head" if head is not None else "imagenet",
        "backbone": backbone_name,
        "weights_sha256": file_sha256(weights_path),
        "precision": precision,
        "precision_guard": precision_guard or {},
        "num_classes": len(labels),
        # A head's classes are part of its identity; the 1000 ImageNet names stay in LABELS_FILE only.
        "classes": list(labels) if head is not None else None,
        "head": {"type": head.kind, "num_classes": head.num_classes} if head is not None else None,
        **(info or {}),
    }


def write_model_files(folder: Path, labels: list[str], head, backbone, weights_path: str | Path) -> None:
    """The class names, and the head's state (named arrays, no pickle) or (ImageNet archives) the
    backbone's classifier: the body's weights are already in the graph's raw file."""
    (folder / LABELS_FILE).write_text(json.dumps({str(i): label for i, label in enumerate(labels)}, indent=1))
    if head is not None:
        np.savez(folder / HEAD_FILE, **head.state())
    else:
        import torch  # only ImageNet archives save a torch classifier; a head build never imports torch

        torch.save(backbone.load(weights_path).classifier.state_dict(), folder / CLASSIFIER_FILE)


def write_check_images(folder: Path, check_images: list[tuple[Path, str]]) -> list[dict]:
    """Copy the check images into ``folder``; return their manifest entries (file, expected label)."""
    (folder / CHECK_IMAGES_DIR).mkdir()
    entries = []
    for index, (path, label) in enumerate(check_images):
        member = check_image_member(index, Path(path).suffix)
        shutil.copyfile(path, folder / member)
        entries.append({"file": member, "label": label})
    return entries


def _run_model_archiver(name: str, version: str, stage: Path) -> None:
    """torch-model-archiver writes ``stage/<name>.mar``; the caller moves it to its final name.

    It collects the files in ``$TMPDIR/<name>``, deleting whatever was there first and after: run it
    with a temp dir of its own inside the private stage, so it never touches the user's ``/tmp/<name>``
    nor a concurrent build of the same name.
    """
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", name,
        "--version", version,
        "--serialized-file", str(stage / FEATURES_DATA_FILE),
        "--handler", str(HANDLER_FILE),
        "--extra-files", str(stage / "extra"),
        "--config-file", str(stage / MODEL_CONFIG_FILE),
        "--export-path", str(stage),
        # Stored, not deflated: the float weights that are nearly all of an archive shrink by 7% under
        # deflate, which costs 0.06 s per MB (0.8 s of a warm train_head's 2 s budget for a 13 MB head).
        "--archive-format", "zip-store",
    ]
    private_tmp = stage / "archiver-tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp), "TEMP": str(private_tmp), "TMP": str(private_tmp)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({result.returncode}): {result.stderr.strip()}")
