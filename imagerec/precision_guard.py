"""The accuracy guard: may a reduced precision serve this archive? Judged by task accuracy.

Runs where labelled photos exist, at build time: ``scripts/build_archive.py --guard-photos DIR``
(ImageNet Top-1 on a labelled ImageNet sample such as ``../shared/datasets/imagenet-sample500``)
and ``training/train_head.py`` (the head's validation accuracy). A precision passes when its
accuracy is within ``tolerance`` (default 1 point) of fp32 on the same photos. The verdicts go into
the manifest (model_info.json ``precision_guard``); the worker uses a precision only if it passed
there and the serving CPU makes it pay (handlers/runtime.py ``choose_precision``), and logs why not
otherwise.

A precision can only be judged on a machine that runs it natively: elsewhere the runtime would
silently compute fp32, and the verdict would say nothing. It is then recorded as not judged (off).
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from handlers.backbones import get_backbone
from handlers.imaging import decode_image, eval_transform
from handlers.machine import cpu_model
from handlers.layout import FEATURES_GRAPH_FILE
from handlers.runtime import REDUCED_PRECISIONS, PortableFeatures, cpu_precisions

logger = logging.getLogger(__name__)

GUARD_ENGINE = "openvino"  # the engine that runs the worker's reduced precisions
DEFAULT_TOLERANCE = 0.01  # one point of accuracy
LABELS_FILE = "labels.tsv"  # file<TAB>class index<TAB>synset, one labelled photo a line


def verdict(precision: str, metric: str, fp32: float, reduced: float, images: int,
            tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The manifest entry for one precision: allowed when ``reduced >= fp32 - tolerance``."""
    allowed = reduced >= fp32 - tolerance
    reason = (f"{metric} {reduced:.4f} against fp32 {fp32:.4f} on {images} labelled photos: "
              f"{'within' if allowed else 'more than'} {tolerance:.3f} of fp32")
    return {"allowed": bool(allowed), "metric": metric, "fp32": round(fp32, 6), precision: round(reduced, 6),
            "images": images, "tolerance": tolerance, "judged_on": cpu_model(), "reason": reason}


def not_judged(reason: str) -> dict:
    return {"allowed": False, "reason": f"not judged: {reason}", "judged_on": cpu_model()}


def native_reduced_precisions() -> list[str]:
    """Reduced precisions this build machine can judge (it runs them natively)."""
    native = cpu_precisions()
    return [precision for precision in REDUCED_PRECISIONS if precision in native]


Features = Callable[[np.ndarray], np.ndarray]  # images (N, 3, H, W) -> features (N, D), float32


def graph_features(graph_dir: Path, precision: str, threads: int | None = None) -> Features:
    """(N, 3, H, W) -> (N, D) features of the exported graph in ``precision`` (the worker's engine)."""
    return PortableFeatures(Path(graph_dir) / FEATURES_GRAPH_FILE, GUARD_ENGINE, precision,
                            threads or os.cpu_count() or 1)


def read_labelled_photos(photos_dir: Path) -> list[tuple[Path, int]]:
    """(photo, ImageNet class index) pairs from ``photos_dir/labels.tsv``."""
    photos_dir = Path(photos_dir)
    with open(photos_dir / LABELS_FILE, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{photos_dir / LABELS_FILE} lists no photos")
    return [(photos_dir / row["file"], int(row["index"])) for row in rows]


def eval_images(paths: list[Path], backbone_name: str, threads: int = 2) -> np.ndarray:
    """(N, 3, crop, crop) eval-transformed images (the served preprocessing)."""
    preprocessing = get_backbone(backbone_name).preprocessing
    transform = eval_transform(preprocessing)

    def load(path: Path) -> np.ndarray:
        return transform(decode_image(Path(path).read_bytes(), min_side=preprocessing.resize_size))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return np.stack(list(pool.map(load, paths)))


def batched(features: Features, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    return np.concatenate([features(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def guard_imagenet(graph_dir: Path, backbone_name: str, classifier, photos_dir: Path,
                   tolerance: float = DEFAULT_TOLERANCE, candidates: dict[str, Features] | None = None) -> dict:
    """Verdicts for the ImageNet model: Top-1 of each reduced precision against fp32 on labelled photos.
    ``classifier``: the backbone's ImageNet classifier (a torch module, (N, D) -> (N, 1000)).
    ``candidates``: precision -> feature function, to judge other settings than this machine's
    native ones (tests pass a deliberately bad one).
    """
    import torch  # the ImageNet classifier is a torch module; judging a head never imports torch

    photos = read_labelled_photos(photos_dir)
    images = eval_images([path for path, _ in photos], backbone_name)
    labels = np.array([label for _, label in photos])

    def classify(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return classifier(torch.from_numpy(features)).numpy()

    fp32 = top1(classify(batched(graph_features(graph_dir, "fp32"), images)), labels)
    logger.info("accuracy guard: fp32 ImageNet Top-1 %.4f on %d photos", fp32, len(photos))
    return _judge_candidates(graph_dir, candidates, "imagenet_top1", fp32, len(photos),
                             lambda features: top1(classify(batched(features, images)), labels), tolerance)


def guard_head(graph_dir: Path, head, val_images: np.ndarray, val_labels: np.ndarray,
               fp32_accuracy: float, tolerance: float = DEFAULT_TOLERANCE,
               candidates: dict[str, Features] | None = None) -> dict:
    """Verdicts for a few-shot head (handlers/heads.py): its validation accuracy in each reduced
    precision against fp32."""
    return _judge_candidates(graph_dir, candidates, "val_accuracy", fp32_accuracy, len(val_labels),
                             lambda features: top1(head(batched(features, val_images)), val_labels), tolerance)


def _judge_candidates(graph_dir, candidates, metric, fp32, images, accuracy_of, tolerance) -> dict:
    verdicts = {}
    if candidates is None:
        candidates = {precision: graph_features(graph_dir, precision) for precision in native_reduced_precisions()}
        for precision in REDUCED_PRECISIONS:
            if precision not in candidates:
                verdicts[precision] = not_judged(f"this build machine has no native {precision}")
    for precision, features in candidates.items():
        verdicts[precision] = verdict(precision, metric, fp32, accuracy_of(features), images, tolerance)
        logger.info("accuracy guard: %s %s", precision, verdicts[precision]["reason"])
    return verdicts
