"""Finding the user's photos: ImageFolder layouts, checks before any work, the train/val split.

Two layouts are accepted::

    DATA_DIR/train/<class>/*  and  DATA_DIR/val/<class>/*     (split given by the user)
    DATA_DIR/<class>/*                                         (we hold out part of each class)

``load_dataset`` fails with a ``DataError`` naming the problem before any feature is computed: a
missing folder, fewer than two classes, class names that clash, a class with no readable image.
Unreadable files (not an image, truncated, unsupported format) are listed and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from handlers.imaging import ImageError, decode_image

logger = logging.getLogger(__name__)

TRAIN_DIR = "train"
VAL_DIR = "val"
# Decoding at this size (JPEG draft, 1/8 scale) proves a file is a whole, readable image cheaply.
PROBE_SIDE = 32


class DataError(ValueError):
    """The data folder cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    sha256: str  # of the file's bytes: keys the feature cache and the data fingerprint


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/val" or "class folders (held out N% of each class)"
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over every used image's split, class and content: same data, same fingerprint."""
        digest = hashlib.sha256()
        for split, samples in (("train", self.train), ("val", self.val)):
            for sample in sorted(samples, key=lambda s: (s.label, s.sha256)):
                digest.update(f"{split}\0{self.classes[sample.label]}\0{sample.sha256}\n".encode())
        return digest.hexdigest()

    def counts(self, split: str) -> dict[str, int]:
        samples = self.train if split == "train" else self.val
        return {name: sum(s.label == i for s in samples) for i, name in enumerate(self.classes)}


def normalised_class_name(name: str) -> str:
    """What makes two folder names the same class to a user: case, Unicode form, separators."""
    folded = unicodedata.normalize("NFKC", name).casefold().strip()
    return re.sub(r"[\s_\-.]+", " ", folded).strip()


def class_folders(directory: Path) -> list[Path]:
    """Sub-folders that are classes (hidden ones such as .ipynb_checkpoints are not)."""
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def check_class_names(names: list[str], where: Path) -> None:
    if len(names) < 2:
        raise DataError(
            f"{where} has {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
            "a classifier needs at least 2: put each class's photos in its own sub-folder"
        )
    seen: dict[str, str] = {}
    for name in names:
        key = normalised_class_name(name)
        if not key:
            raise DataError(f"class folder name {name!r} in {where} has no visible characters")
        if key in seen:
            raise DataError(
                f"class folders {seen[key]!r} and {name!r} in {where} clash (same name ignoring case, "
                "spaces, '_', '-' and '.'): merge or rename them"
            )
        seen[key] = name


def _files(folder: Path, root: Path, follow_links: bool = False) -> list[Path]:
    """The files of a class folder, hidden ones excepted. A symbolic link that leads outside the data
    folder ``root`` is skipped with a warning unless ``follow_links``: a downloaded data folder could
    otherwise bring any readable file (/etc/passwd, private photos) into the logs and the archive."""
    inside = root.resolve()
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if not follow_links and not path.resolve().is_relative_to(inside):
            logger.warning("skipping %s: a link outside the data folder %s (--follow-links to use it)", path, root)
            continue
        files.append(path)
    return files


def _probe(path: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a readable image, (None, reason) otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    try:
        decode_image(data, min_side=PROBE_SIDE)
    except ImageError as exc:
        return None, str(exc)
    return hashlib.sha256(data).hexdigest(), None


def _probe_all(paths: list[Path], unreadable: list) -> list[tuple[Path, str]]:
    """Readable (path, sha256) pairs of ``paths``, in order; unreadable files go to ``unreadable``.
    Decoding and hashing release the GIL: the files are probed on one thread per core."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        probes = list(pool.map(_probe, paths))
    readable = []
    for path, (digest, reason) in zip(paths, probes):
        if digest is None:
            unreadable.append((path, reason))
        else:
            readable.append((path, digest))
    return readable


def _scan(folders: dict[str, Path], classes: list[str], unreadable: list, root: Path,
          follow_links: bool = False) -> dict[str, list[tuple[Path, str]]]:
    """Readable (path, sha256) pairs per class; unreadable files go to ``unreadable``."""
    return {name: _probe_all(_files(folders[name], root, follow_links), unreadable) for name in classes}


def readable_images(folder: str | Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Every readable image under ``folder`` (any depth; labels ignored) as (path, sha256), and the
    unreadable files as (path, reason). Raises DataError if the folder is missing or has no image."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of photos")
    unreadable: list[tuple[Path, str]] = []
    readable = _probe_all(_files(folder, folder), unreadable)
    if not readable:
        raise DataError(f"{folder} contains no readable image")
    return readable, unreadable


def _require_images(found: dict[str, list], where: Path) -> None:
    empty = [name for name, items in found.items() if not items]
    if empty:
        raise DataError(f"class folder(s) {', '.join(map(repr, empty))} in {where} contain no readable image")


def stratified_split(
    items: dict[str, list[tuple[Path, str]]], val_fraction: float, seed: int
) -> tuple[dict[str, list], dict[str, list]]:
    """Seeded, per class: about ``val_fraction`` of each class (at least one image when a class has
    two or more) is held out; a class with a single image keeps it for training."""
    train, val = {}, {}
    for name, class_items in items.items():
        # Seed per class from the class name, so adding a class does not reshuffle the others.
        rng = random.Random(f"{seed}:{name}")
        shuffled = sorted(class_items, key=lambda item: item[1])
        rng.shuffle(shuffled)
        n_val = 0 if len(shuffled) < 2 else min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
        val[name], train[name] = shuffled[:n_val], shuffled[n_val:]
    return train, val


def load_dataset(data_dir: str | Path, val_fraction: float = 0.2, seed: int = 0, follow_links: bool = False) -> Dataset:
    """Check and list a data folder (see the module docstring); raises DataError.

    follow_links: also use files that symbolic links bring from outside the data folder (skipped by default).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder of class folders")

    unreadable: list[tuple[Path, str]] = []
    train_root, val_root = root / TRAIN_DIR, root / VAL_DIR
    if train_root.is_dir():
        classes = [p.name for p in class_folders(train_root)]
        check_class_names(classes, train_root)
        val_classes = [p.name for p in class_folders(val_root)] if val_root.is_dir() else []
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f"{val_root} has class folder(s) {', '.join(extra)} that {train_root} does not have")
        train_found = _scan({c: train_root / c for c in classes}, classes, unreadable, root, follow_links)
        _require_images(train_found, train_root)
        if val_classes:
            val_found = _scan({c: val_root / c for c in val_classes}, val_classes, unreadable, root, follow_links)
            val_found = {c: val_found.get(c, []) for c in classes}
            layout = "train/val"
        else:
            train_found, val_found = stratified_split(train_found, val_fraction, seed)
            layout = f"train/ only (held out {val_fraction:.0%} of each class for validation, seed {seed})"
    else:
        loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:  # a photo outside any class folder has no label: say so rather than drop it quietly
            logger.warning("ignoring %d file(s) directly in %s (not in a class folder): %s",
                           len(loose), root, ", ".join(sorted(loose)[:10]) + (" ..." if len(loose) > 10 else ""))
        classes = [p.name for p in class_folders(root)]
        check_class_names(classes, root)
        found = _scan({c: root / c for c in classes}, classes, unreadable, root, follow_links)
        _require_images(found, root)
        train_found, val_found = stratified_split(found, val_fraction, seed)
        layout = f"class folders (held out {val_fraction:.0%} of each class for validation, seed {seed})"

    def samples(found):
        return [Sample(path, label, digest) for label, c in enumerate(classes) for path, digest in found.get(c, [])]

    dataset = Dataset(root, classes, samples(train_found), samples(val_found), layout, unreadable)
    for path, reason in unreadable:
        logger.warning("skipping unreadable file %s: %s", path, reason)
    if unreadable:
        logger.warning("skipped %d unreadable file(s) (listed above)", len(unreadable))
    logger.info("data %s: %d classes, %d train / %d val images; layout: %s",
                root, len(classes), len(dataset.train), len(dataset.val), layout)
    without_val = [name for name, count in dataset.counts("val").items() if count == 0]
    if without_val:
        logger.warning("class(es) %s have no validation photo (a class needs at least 2 photos to hold one out, "
                       "or photos in val/): their accuracy is not measured", ", ".join(map(repr, without_val)))
    if "held out" in layout:
        logger.info("no val/ folder: a seeded, stratified split held out part of each class for validation "
                    "(--val-fraction, --seed); per class val counts: %s", dataset.counts("val"))
    return dataset
