"""Train a few-shot head on frozen backbone features and ship it as a versioned model archive.

    python training/train_head.py DATA_DIR --name clothes --version 1.0 --backbone efficientnet_lite0

DATA_DIR is an ImageFolder: ``train/<class>/*`` and ``val/<class>/*`` inside it, or class folders
directly (then a seeded, stratified split holds out part of each class for validation). Writes
``OUT/<name>_v<version>.mar`` (backbone + head + class names + manifest), and next to it
``<name>_v<version>.report.json`` and ``<name>_v<version>.confusion.png``. Backbone features are
cached on disk (``--cache-dir``), so re-running with other head settings takes seconds.

``--head auto`` (default) picks the head and its settings by cross-validation on the training photos
(training/auto_head.py). Every head carries a rejection rule (handlers/rejection.py) that answers
"unknown" for photos unlike the training photos, keeping ``--keep`` of known photos (1: off);
``--unknown DIR`` measures it on photos of other kinds.

A warm run (features and the exported graph cached) never imports torch: its import alone costs 1.7 s
of the 2 s such a run may take. The heads, the metrics and the cache are numpy; torch comes in only
where features must be computed or the graph exported.

Exit codes: 0 done, 2 bad arguments or data, 3 backbone weights not found, 1 anything else;
registration failures (--register) exit with the code scripts/manage.py gives them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from handlers.arrays import softmax
from handlers.backbones import WeightsNotFoundError, backbone_names, get_backbone
from handlers.constants import UNKNOWN_LABEL
from handlers.heads import HEADS, FeatureHead, build_head
from handlers.rejection import DEFAULT_KEEP, validate_keep
from imagerec.archive import build_archive
from imagerec.cli import EXIT_BAD_ARGUMENTS, EXIT_FAILED, EXIT_NO_WEIGHTS, LOG_FORMAT, run_command
from imagerec.management import DEFAULT_KEY_FILE, DEFAULT_MODEL_STORE, register_archive
from imagerec.naming import archive_file_name, validate_name, validate_version
from imagerec.options import add_batching_arguments, batching_from_args
from imagerec.precision_guard import native_reduced_precisions, not_judged, verdict
from training.auto_head import Candidate, choose_head
from training.blas import single_thread
from training.data import DataError, Dataset, load_dataset, readable_images
from training.evaluation import (auroc, draw_confusion, evaluate, format_table, fpr_at_keep,
                                 openset_confusion, share, write_report)
from training.features import Augmentation, FeatureExtractor, default_cache_dir
from training.progress import ProgressWriter

logger = logging.getLogger("train_head")

AUTO_HEAD = "auto"
DEFAULT_HEAD = AUTO_HEAD
HEAD_CHOICES = (AUTO_HEAD, *sorted(HEADS))
DEFAULT_VIEWS = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="ImageFolder: train/ and val/ inside, or class folders directly")
    parser.add_argument("--name", type=str, default=None,
                        help="model name, used in /predictions/NAME (default: the data folder's name)")
    parser.add_argument("--version", type=str, default="1.0", help="archive version, e.g. 1.0")
    parser.add_argument("--backbone", choices=backbone_names(), default="resnet18",
                        help="frozen backbone (default resnet18, the product default; its genuine weights "
                             "must be provided with --weights or $RESNET18_WEIGHTS when offline. "
                             "efficientnet_lite0 ships real ImageNet weights and works offline)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="backbone state_dict file (default: $<BACKBONE>_WEIGHTS, then the backbone's own source)")
    parser.add_argument("--head", choices=HEAD_CHOICES, default=DEFAULT_HEAD,
                        help=f"head type (default {DEFAULT_HEAD}: chosen with its settings by cross-validation on "
                             "the training photos; see docs/BENCHMARKS.md for the comparison)")
    parser.add_argument("--out", type=Path, default=Path("archives"), help="directory for the .mar and its report")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive of that version")

    data = parser.add_argument_group("data")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="part of each class held out for validation when DATA_DIR has no val/ folder")
    data.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentations and the head fit")
    data.add_argument("--follow-links", action="store_true",
                      help="use files that symbolic links bring from outside DATA_DIR (skipped by default: a "
                           "link can bring in any file you can read)")
    data.add_argument("--check-images", type=int, default=2,
                      help="validation images per class packed into the archive for deployment checks")

    features = parser.add_argument_group("features")
    features.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                          help="augmented views per training image (random resized crop, flip, optional colour "
                               "jitter and small rotation) added to the plain one for heads that use them "
                               "(linear; prototype uses the plain view); 0 disables augmentation")
    features.add_argument("--aug-min-scale", type=float, default=Augmentation.min_scale,
                          help="smallest crop of a random resized crop, as a fraction of the image area")
    features.add_argument("--aug-jitter", type=float, default=Augmentation.jitter,
                          help="brightness/contrast/saturation jitter of augmented views (0: none)")
    features.add_argument("--aug-rotation", type=float, default=Augmentation.rotation,
                          help="largest rotation of augmented views, degrees either way (0: none)")
    features.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                          help="feature cache (default $IMAGEREC_FEATURE_CACHE or ~/.cache/imagerec/features)")
    features.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    features.add_argument("--extract-batch-size", type=int, default=32, help="images per backbone forward pass")
    features.add_argument("--threads", type=int, default=0, help="backbone threads for computing features (0: all cores)")
    features.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    features.add_argument("--progress-file", type=Path, default=None,
                          help="append machine-readable progress here, one JSON line per step "
                               "(training/progress.py; the web page follows it)")

    head = parser.add_argument_group("head")
    head.add_argument("--weight-decay", type=float, default=None,
                      help="linear head: fixed weight decay (default: chosen on held-out training images)")

    openset = parser.add_argument_group("unknown photos")
    openset.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                         help="share of photos of the trained classes the rejection rule keeps; photos less "
                              "like the training photos are answered \"unknown\" (default %(default)s, "
                              "calibrated on the training photos; 1: never answer unknown)")
    openset.add_argument("--unknown", type=Path, default=None, metavar="DIR",
                         help="photos of none of the classes (any folder layout): report how well the rule "
                              "rejects them (AUROC, FPR@95, share rejected)")

    register = parser.add_argument_group("registration")
    register.add_argument("--register", type=str, default=None, metavar="URL",
                          help="management URL of a running TorchServe to register the new archive into, "
                               "e.g. http://127.0.0.1:8081")
    register.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                          help=f"TorchServe key_file.json for --register (default {DEFAULT_KEY_FILE})")
    register.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE,
                          help=f"the server's model store, where --register copies the archive (default {DEFAULT_MODEL_STORE})")
    register.add_argument("--register-timeout", type=float, default=120.0,
                          help="seconds to wait for the registered version's workers")
    add_batching_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> str:
    """Cheap checks before any work; returns the model name."""
    name = args.name or default_name(args.data_dir)
    validate_name(name)
    validate_version(args.version)
    if args.views < 0 or args.check_images < 0:
        raise ValueError("--views and --check-images cannot be negative")
    if not 0.0 < args.aug_min_scale <= 1.0 or args.aug_jitter < 0 or args.aug_rotation < 0:
        raise ValueError("--aug-min-scale must be in (0, 1]; --aug-jitter and --aug-rotation cannot be negative")
    if args.extract_batch_size < 1:
        raise ValueError("--extract-batch-size must be at least 1")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise ValueError("--weight-decay cannot be negative")
    if args.weight_decay is not None and args.head != "linear":
        raise ValueError("--weight-decay applies to --head linear only")
    validate_keep(args.keep)
    if args.unknown is not None and not args.unknown.is_dir():
        raise ValueError(f"--unknown {args.unknown} is not a folder of photos")
    batching_from_args(args)
    target = args.out / archive_file_name(name, args.version)
    if target.exists() and not args.force:
        raise FileExistsError(f"{target} exists; choose another --version or pass --force")
    return name


def default_name(data_dir: Path) -> str:
    """The data folder's name made into a valid model name ("My photos" -> "My_photos")."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in data_dir.resolve().name).strip("_-")
    return cleaned if cleaned[:1].isalpha() else f"model_{cleaned}".rstrip("_")


def training_rows(plain: np.ndarray, augmented: np.ndarray | None, labels: np.ndarray):
    """(rows, labels, groups): each image's plain view followed by its augmented views, all as
    training rows; ``groups`` is the image index of each row (held-out splits keep views together)."""
    rows, row_labels, groups = [plain], [labels], [np.arange(len(labels))]
    if augmented is not None and augmented.shape[1]:
        views = augmented.shape[1]
        rows.append(augmented.reshape(-1, augmented.shape[-1]))
        row_labels.append(np.repeat(labels, views))
        groups.append(np.repeat(np.arange(len(labels)), views))
    return np.concatenate(rows), np.concatenate(row_labels), np.concatenate(groups)


def extract_features(extractor: FeatureExtractor, dataset: Dataset, views: int, seed: int) -> dict:
    """Training rows (plain view + augmented views, with their image ids) and validation features."""
    train_paths = [s.path for s in dataset.train]
    train_hashes = [s.sha256 for s in dataset.train]
    labels = np.array([s.label for s in dataset.train], np.int64)
    plain = extractor.extract(train_paths, train_hashes, description="train features")
    augmented = extractor.extract(train_paths, train_hashes, views=views, seed=seed,
                                  description=f"train x{views} augmented views") if views else None
    rows, row_labels, groups = training_rows(plain, augmented, labels)
    val = extractor.extract([s.path for s in dataset.val], [s.sha256 for s in dataset.val],
                            description="val features") if dataset.val else np.empty((0, extractor.backbone.feature_dim), np.float32)
    return {
        "train": rows, "train_labels": row_labels, "groups": groups,
        "plain": plain, "augmented": augmented, "photo_labels": labels,
        "val": val, "val_labels": np.array([s.label for s in dataset.val], np.int64),
    }


def fit_head(kind: str, feature_dim: int, num_classes: int, features: dict, args) -> tuple[FeatureHead, dict]:
    """Fit the head (``kind`` "auto": the candidate cross-validation chooses) and its rejection rule.
    The summary's "auto" entry holds the choice and every candidate's score."""
    summary: dict = {}
    with single_thread():  # small matrices: one BLAS thread is faster (training/blas.py)
        if kind == AUTO_HEAD:
            choice, summary["auto"] = choose_head(features["plain"], features["augmented"], features["photo_labels"],
                                                  num_classes, seed=args.seed)
        else:
            choice = Candidate(kind, views=HEADS[kind].uses_views, weight_decay=args.weight_decay)
        head = build_head(choice.kind, feature_dim, num_classes)
        plain_only = not choice.views and features["augmented"] is not None
        rows, row_labels, groups = (training_rows(features["plain"], None, features["photo_labels"]) if plain_only
                                    else (features["train"], features["train_labels"], features["groups"]))
        summary.update(head.fit(rows, row_labels, groups=groups, seed=args.seed, **choice.fit_options()))
        # The rule is fitted on each training photo's plain view: augmented views measured no better
        # (docs/bench/openset.md) and would triple the archive's share of it.
        summary["rejection"] = head.fit_rejection(features["plain"], np.arange(len(features["plain"])), args.keep,
                                                  labels=features["photo_labels"])
    return head, summary


def precision_guard(args: argparse.Namespace, extractor: FeatureExtractor, dataset: Dataset, head: FeatureHead,
                    metrics: dict | None) -> dict:
    """The accuracy guard's verdicts (imagerec/precision_guard.py): the head's validation accuracy on
    reduced-precision features against fp32, on this machine's native reduced precisions."""
    if args.precision == "fp32":
        return {}
    if metrics is None:
        return {"bf16": not_judged("no validation images")}
    verdicts = {"bf16": not_judged("this build machine has no native bf16")}
    labels = np.array([s.label for s in dataset.val], np.int64)
    for precision in native_reduced_precisions():
        reduced = FeatureExtractor(extractor.backbone.name, extractor.weights_path, cache_dir=extractor.cache_dir,
                                   batch_size=extractor.batch_size, progress=extractor.progress,
                                   use_cache=extractor.use_cache, precision=precision, export_cache=args.export_cache,
                                   threads=extractor.threads)
        features = reduced.extract([s.path for s in dataset.val], [s.sha256 for s in dataset.val],
                                   description=f"val features ({precision}, accuracy guard)")
        accuracy = share(head(features).argmax(axis=1) == labels)
        verdicts[precision] = verdict(precision, "val_accuracy", metrics["accuracy"], accuracy, len(labels),
                                      args.guard_tolerance)
        logger.info("accuracy guard: %s %s", precision, verdicts[precision]["reason"])
    return verdicts


def unknown_features(extractor: FeatureExtractor, folder: Path) -> np.ndarray:
    """(M, D) plain-view features of every readable photo under ``folder``."""
    found, unreadable = readable_images(folder)
    for path, reason in unreadable:
        logger.warning("skipping unreadable file %s: %s", path, reason)
    return extractor.extract([p for p, _ in found], [h for _, h in found], description="unknown features")


def openset_metrics(head: FeatureHead, features: dict, unknown: np.ndarray | None,
                    probabilities: np.ndarray | None) -> dict:
    """The rule on the validation split (share kept at the archive's threshold, accuracy on the kept
    photos) and, given photos of other kinds, AUROC, FPR@95 and the share rejected."""
    threshold = float(head.rejection.threshold)
    result: dict = {"threshold": threshold if math.isfinite(threshold) else None, "keep": float(head.rejection.keep)}
    if probabilities is None:
        return result
    scores = head.known_score(features["val"])
    kept = scores >= threshold
    predicted = probabilities.argmax(1)
    labels = features["val_labels"]
    result["known_kept"] = share(kept)
    result["accuracy_on_kept"] = share(predicted[kept] == labels[kept]) if kept.any() else None
    unknown_predicted = unknown_rejected = None
    if unknown is not None and len(unknown):
        unknown_scores = head.known_score(unknown)
        unknown_predicted = head(unknown).argmax(1)
        unknown_rejected = unknown_scores < threshold
        result.update(unknown_photos=len(unknown), unknown_rejected=share(unknown_rejected),
                      auroc=auroc(scores, unknown_scores), fpr_at_95=fpr_at_keep(scores, unknown_scores, 0.95))
    result["confusion"] = openset_confusion(predicted, ~kept, labels, head.num_classes,
                                            unknown_predicted, unknown_rejected)
    return result


def log_openset(openset: dict, rule: dict) -> None:
    threshold = "none (rejects nothing)" if rule["threshold"] is None else f"{rule['threshold']:.4f}"
    text = f"rejection rule ({rule['score']}, keep {rule['keep']:g}): threshold {threshold}"
    if "known_kept" in openset:
        text += f"; keeps {openset['known_kept']:.3f} of the validation photos"
        if openset.get("accuracy_on_kept") is not None:
            text += f" (accuracy on those {openset['accuracy_on_kept']:.3f})"
    if "auroc" in openset:
        text += (f"; {openset['unknown_photos']} unknown photos: {openset['unknown_rejected']:.3f} rejected, "
                 f"AUROC {openset['auroc']:.3f}, FPR@95 {openset['fpr_at_95']:.3f}")
    logger.info("%s", text)


def pick_check_images(dataset: Dataset, per_class: int) -> list[tuple[Path, str]]:
    """Up to ``per_class`` validation images per class (training images for a class without any)."""
    chosen = []
    for label, name in enumerate(dataset.classes):
        pool = [s for s in dataset.val if s.label == label] or [s for s in dataset.train if s.label == label]
        chosen += [(s.path, name) for s in pool[:per_class]]
    return chosen


def training_record(args: argparse.Namespace, name: str) -> dict:
    record = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    record["name"] = name
    for private in ("register", "key_file", "model_store", "cache_dir", "progress_file"):  # where, not how
        record.pop(private, None)
    return record


def wrong_predictions(probabilities: np.ndarray, dataset: Dataset) -> list[dict]:
    """The validation photos the head got wrong, most confident mistakes first."""
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    wrong = [
        {"file": str(sample.path), "true": dataset.classes[sample.label],
         "predicted": dataset.classes[int(guess)], "probability": round(float(p), 4)}
        for sample, guess, p in zip(dataset.val, predicted, confidence) if int(guess) != sample.label
    ]
    return sorted(wrong, key=lambda item: -item["probability"])


def main(args: argparse.Namespace) -> Path:
    """Check, extract features, fit, evaluate, write the archive and its report, register: the
    stages below, timed one by one (the report's ``timings_s``)."""
    timer = StageTimer()
    name = check_args(args)
    progress = ProgressWriter(args.progress_file)
    progress.stage("data")
    backbone = get_backbone(args.backbone)
    weights = backbone.resolve_weights(args.weights)
    with timer("check_data"):
        dataset = load_dataset(args.data_dir, val_fraction=args.val_fraction, seed=args.seed,
                               follow_links=args.follow_links)
    with timer("features"):
        extractor = make_extractor(args, backbone.name, weights)
        # auto may choose a head that uses augmented views: extract them for it (cached after the first run).
        views = args.views if args.head == AUTO_HEAD or HEADS[args.head].uses_views else 0
        extractor.on_progress = progress.advance
        progress.start_features(len(dataset.train) * (1 + views) + len(dataset.val))
        features = extract_features(extractor, dataset, views, args.seed)
    progress.stage("fit")
    with timer("fit"):
        head, fit_summary = fit_head(args.head, backbone.feature_dim, len(dataset.classes), features, args)
    logger.info("fitted %s head on %d images: %s", head.kind, len(dataset.train),
                json.dumps({k: v for k, v in fit_summary.items() if k != "auto"}))
    progress.stage("evaluate")
    unknown = unknown_features(extractor, args.unknown) if args.unknown else None
    metrics, openset = evaluate_head(head, features, dataset.classes, unknown, fit_summary["rejection"])
    with timer("guard"):
        guard = precision_guard(args, extractor, dataset, head, metrics)
    info = archive_record(args, name, dataset, head, fit_summary, metrics)
    progress.stage("archive")
    with timer("archive"):
        archive = build_archive(
            name=name, version=args.version, backbone_name=backbone.name, weights_path=weights,
            labels=dataset.classes, out_dir=args.out, precision=args.precision, head=head, info=info,
            check_images=pick_check_images(dataset, args.check_images), batching=batching_from_args(args),
            precision_guard=guard, export_cache=args.export_cache, overwrite=args.force,
        )
    wrong = wrong_predictions(softmax(head(features["val"])), dataset) if metrics is not None else []
    write_outputs(args, archive, {**info, "wrong_validation": wrong}, metrics, openset, dataset.classes, head.kind,
                  unknown is not None, extractor, timer)
    progress.stage("done", archive=str(archive), accuracy=None if metrics is None else metrics["accuracy"])
    if args.register:
        register_archive(archive, management_url=args.register, key_file=args.key_file,
                         model_store=args.model_store, workers=args.workers, timeout=args.register_timeout)
        logger.info("registered %s v%s at %s", name, args.version, args.register)
    return archive


class StageTimer:
    """``with timer("stage"):`` records the stage's seconds; ``total`` runs from the timer's creation."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - tick

    def report(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(time.perf_counter() - self.started, 3)}


def make_extractor(args: argparse.Namespace, backbone_name: str, weights: Path) -> FeatureExtractor:
    augmentation = Augmentation(min_scale=args.aug_min_scale, jitter=args.aug_jitter, rotation=args.aug_rotation)
    return FeatureExtractor(backbone_name, weights, cache_dir=args.cache_dir, batch_size=args.extract_batch_size,
                            augmentation=augmentation, progress=not args.no_progress, use_cache=not args.no_cache,
                            export_cache=args.export_cache, threads=args.threads)


def evaluate_head(head: FeatureHead, features: dict, classes: list[str], unknown: np.ndarray | None,
                  rule: dict) -> tuple[dict | None, dict]:
    """(closed-set metrics on the validation photos or None, open-set figures), both logged."""
    metrics = probabilities = None
    if len(features["val_labels"]):
        probabilities = softmax(head(features["val"]))
        metrics = evaluate(probabilities, features["val_labels"], classes)
        logger.info("validation on %d held-out images:\n%s", metrics["images"], format_table(metrics))
    else:
        logger.warning("no validation images (every class has a single image): the archive has no accuracy figure")
    openset = openset_metrics(head, features, unknown, probabilities)
    if metrics is not None:
        metrics["openset"] = openset
    log_openset(openset, rule)
    return metrics, openset


def archive_record(args: argparse.Namespace, name: str, dataset: Dataset, head: FeatureHead, fit_summary: dict,
                   metrics: dict | None) -> dict:
    """The manifest entries of a head archive: how it was trained, on what, and how well it did."""
    return {
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training": training_record(args, name),
        "data": {
            "fingerprint": dataset.fingerprint(),
            "layout": dataset.layout,
            "train_images": dataset.counts("train"),
            "val_images": dataset.counts("val"),
            "unreadable": [{"file": str(p), "reason": r} for p, r in dataset.unreadable],
        },
        "fit": {k: v for k, v in fit_summary.items() if k not in ("auto", "rejection")},
        "head_choice": {"requested": args.head, "chosen": head.kind, "power": float(head.power),
                        **({"auto": fit_summary["auto"]} if "auto" in fit_summary else {})},
        "rejection": {**fit_summary["rejection"], "unknown_label": UNKNOWN_LABEL},
        "validation": None if metrics is None else {k: metrics[k] for k in ("images", "accuracy", "balanced_accuracy", "nll", "per_class")},
    }


def write_outputs(args: argparse.Namespace, archive: Path, info: dict, metrics: dict | None, openset: dict,
                  classes: list[str], head_kind: str, with_unknown: bool, extractor: FeatureExtractor,
                  timer: StageTimer) -> None:
    """``<name>_v<version>.report.json`` and ``.confusion.png`` beside the archive, and the closing log line."""
    stem = archive.name[: -len(".mar")]
    timings = timer.report()
    report = {**info, "archive": str(archive), "metrics": metrics, "features": vars(extractor.stats),
              "timings_s": timings}
    write_report(args.out / f"{stem}.report.json", report)
    if metrics is not None:
        rows = classes + ([UNKNOWN_LABEL] if with_unknown else [])
        draw_confusion(openset["confusion"], rows, args.out / f"{stem}.confusion.png",
                       columns=classes + [UNKNOWN_LABEL],
                       title=f"{info['training']['name']} v{args.version} ({head_kind}): accuracy "
                             f"{metrics['accuracy']:.3f} on {metrics['images']} val images, "
                             f"{openset['known_kept']:.0%} kept at keep {args.keep:g}")
    logger.info("done in %.1fs (%s); features: %d from cache, %d extracted",
                timings["total"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total"),
                extractor.stats.cached, extractor.stats.extracted)


# Registration failures (imagerec.management.ManageError) carry their own exit code.
ERRORS = {
    WeightsNotFoundError: EXIT_NO_WEIGHTS,  # before RuntimeError: it is one
    DataError: EXIT_BAD_ARGUMENTS,
    ValueError: EXIT_BAD_ARGUMENTS,
    FileExistsError: EXIT_BAD_ARGUMENTS,
    RuntimeError: EXIT_FAILED,  # exporting or torch-model-archiver failed: the message says why
}


def run(argv: list[str] | None = None) -> int:
    """Parse, run and map failures to exit codes (used by ``__main__`` and by the tests)."""
    return run_command(main, get_args_parser().parse_args(argv), ERRORS, logger=logger, output=str)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(run())
