"""Head archives for the lifecycle tests and benchmarks (test_manage, test_lifecycle, bench_lifecycle).

Built directly from the library (no training CLI): EfficientNet-Lite0 features of a few
hymenoptera train photos, a prototype head, ``build_archive`` with packed check images. Version 1
and version 2 are fitted on different photos, so they are genuinely different models of the same
classes. Features and archives are computed once per test session (module-level cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from handlers.backbones import get_backbone
from handlers.heads import build_head
from handlers.imaging import ImagePreprocessor
from imagerec.archive import build_archive

NAME = "bees_vs_ants"
CLASSES = ["ants", "bees"]
SHOTS = 8  # per class and version
CHECKS_PER_CLASS = 3

_cache: dict[str, object] = {}


def _photos(datasets_dir: Path, split: str, cls: str) -> list[Path]:
    return sorted((datasets_dir / "hymenoptera" / split / cls).iterdir())


def _features(datasets_dir: Path, paths: list[Path]) -> np.ndarray:
    import torch  # the eager backbone computes the features here

    backbone = get_backbone("efficientnet_lite0")
    if "network" not in _cache:
        _cache["network"] = backbone.load(backbone.resolve_weights()).eval()
    preprocess = ImagePreprocessor(backbone.preprocessing)
    with torch.inference_mode():
        images = torch.from_numpy(np.stack([preprocess(p.read_bytes()) for p in paths]))
        return _cache["network"].features(images).numpy()


def head_archives(datasets_dir: Path, out_dir: Path) -> dict[str, Path]:
    """{"1": path, "2": path}: bees_vs_ants v1 (train photos 0..7 per class) and v2 (photos 8..15)."""
    if "archives" in _cache:
        return _cache["archives"]
    backbone = get_backbone("efficientnet_lite0")
    checks = [(path, cls) for cls in CLASSES for path in _photos(datasets_dir, "val", cls)[:CHECKS_PER_CLASS]]
    archives = {}
    for index, version in enumerate(("1", "2")):
        paths, labels = [], []
        for label, cls in enumerate(CLASSES):
            chosen = _photos(datasets_dir, "train", cls)[index * SHOTS:(index + 1) * SHOTS]
            paths += chosen
            labels += [label] * len(chosen)
        head = build_head("prototype", backbone.feature_dim, len(CLASSES))
        head.fit(_features(datasets_dir, paths), np.array(labels))
        archives[version] = build_archive(
            name=NAME, version=version, backbone_name=backbone.name, weights_path=backbone.resolve_weights(),
            labels=CLASSES, out_dir=out_dir, head=head, check_images=checks,
            info={"training": {"shots": SHOTS, "photos": [p.name for p in paths]}},
        )
    _cache["archives"] = archives
    return archives


def val_photos(datasets_dir: Path, per_class: int = 12, max_bytes: int = 200_000) -> list[bytes]:
    """Real photos for load clients (bytes in memory): the typical web-sized ones, not the 2592 px
    outliers, so the 2-core machine spends the run on serving rather than on decoding."""
    photos = [p for cls in CLASSES for p in _photos(datasets_dir, "val", cls)[:3 * per_class]]
    return [p.read_bytes() for p in photos if p.stat().st_size <= max_bytes][:2 * per_class]
