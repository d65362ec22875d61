"""Train a few-shot head on frozen backbone features and ship it as a versioned model archive.

    python training/train_head.py DATA_DIR --name clothes --version 1.0 --backbone efficientnet_lite0

DATA_DIR is an ImageFolder: ``train/<class>/*`` and ``val/<class>/*`` inside it, or class folders
directly (then a seeded, stratified split holds out part of each class for validation). Writes
``OUT/<name>_v<version>.mar`` (backbone + head + class names + manifest), and next to it
``<name>_v<version>.report.json`` and ``<name>_v<version>.confusion.png``. Backbone features are
cached on disk (``--cache-dir``), so re-running with other head settings takes seconds.

Exit codes: 0 done, 2 bad arguments or data, 3 backbone weights not found, 1 anything else;
registration failures (--register) exit with the code scripts/manage.py gives them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

# Scripts run as files (python training/train_head.py): make the project root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from handlers.archive import build_archive  # noqa: E402
from handlers.backbones import WeightsNotFoundError, backbone_names, get_backbone  # noqa: E402
from handlers.heads import HEADS, FeatureHead, build_head  # noqa: E402
from handlers.naming import archive_file_name, validate_name, validate_version  # noqa: E402
from imagerec.precision_guard import native_reduced_precisions, not_judged, verdict  # noqa: E402
from scripts.build_archive import add_batching_arguments, batching_from_args  # noqa: E402
from training.data import DataError, Dataset, load_dataset  # noqa: E402
from training.evaluation import draw_confusion, evaluate, format_table, write_report  # noqa: E402
from training.features import Augmentation, FeatureExtractor, default_cache_dir  # noqa: E402

logger = logging.getLogger("train_head")

EXIT_BAD_INPUT = 2
EXIT_NO_WEIGHTS = 3
DEFAULT_HEAD = "linear"
DEFAULT_VIEWS = 2

try:  # the ops tooling owns where keys and the model store live
    from scripts.manage import DEFAULT_KEY_FILE, DEFAULT_MODEL_STORE
except ImportError:  # scripts/manage.py absent: --register then fails loudly when used
    DEFAULT_KEY_FILE = DEFAULT_MODEL_STORE = None


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
    parser.add_argument("--head", choices=sorted(HEADS), default=DEFAULT_HEAD,
                        help=f"head type (default {DEFAULT_HEAD}; see docs/BENCHMARKS.md for the comparison)")
    parser.add_argument("--out", type=Path, default=Path("archives"), help="directory for the .mar and its report")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive of that version")

    data = parser.add_argument_group("data")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="part of each class held out for validation when DATA_DIR has no val/ folder")
    data.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentations and the head fit")
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
    features.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    features.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    head = parser.add_argument_group("head")
    head.add_argument("--weight-decay", type=float, default=None,
                      help="linear head: fixed weight decay (default: chosen on held-out training images)")

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
    batching_from_args(args)
    target = args.out / archive_file_name(name, args.version)
    if target.exists() and not args.force:
        raise FileExistsError(f"{target} exists; choose another --version or pass --force")
    if args.register and (args.key_file is None or args.model_store is None):
        raise ValueError("--register needs --key-file and --model-store")
    return name


def default_name(data_dir: Path) -> str:
    """The data folder's name made into a valid model name ("My photos" -> "My_photos")."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in data_dir.resolve().name).strip("_-")
    return cleaned if cleaned[:1].isalpha() else f"model_{cleaned}".rstrip("_")


def training_rows(plain: torch.Tensor, augmented: torch.Tensor | None, labels: torch.Tensor):
    """(rows, labels, groups): each image's plain view followed by its augmented views, all as
    training rows; ``groups`` is the image index of each row (held-out splits keep views together)."""
    rows, row_labels, groups = [plain], [labels], [torch.arange(len(labels))]
    if augmented is not None and augmented.shape[1]:
        views = augmented.shape[1]
        rows.append(augmented.reshape(-1, augmented.shape[-1]))
        row_labels.append(labels.repeat_interleave(views))
        groups.append(torch.arange(len(labels)).repeat_interleave(views))
    return torch.cat(rows), torch.cat(row_labels), torch.cat(groups)


def extract_features(extractor: FeatureExtractor, dataset: Dataset, views: int, seed: int) -> dict:
    """Training rows (plain view + augmented views, with their image ids) and validation features."""
    train_paths = [s.path for s in dataset.train]
    train_hashes = [s.sha256 for s in dataset.train]
    labels = torch.tensor([s.label for s in dataset.train])
    plain = extractor.extract(train_paths, train_hashes, description="train features")
    augmented = extractor.extract(train_paths, train_hashes, views=views, seed=seed,
                                  description=f"train x{views} augmented views") if views else None
    rows, row_labels, groups = training_rows(plain, augmented, labels)
    val = extractor.extract([s.path for s in dataset.val], [s.sha256 for s in dataset.val],
                            description="val features") if dataset.val else torch.empty(0, extractor.backbone.feature_dim)
    return {
        "train": rows, "train_labels": row_labels, "groups": groups,
        "val": val, "val_labels": torch.tensor([s.label for s in dataset.val], dtype=torch.long),
    }


def fit_head(kind: str, feature_dim: int, num_classes: int, features: dict, args) -> tuple[FeatureHead, dict]:
    head = build_head(kind, feature_dim, num_classes)
    options = {"groups": features["groups"], "seed": args.seed}
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    with single_thread():
        summary = head.fit(features["train"], features["train_labels"], **options)
    return head.eval(), summary


@contextlib.contextmanager
def single_thread():
    """Head fits multiply matrices of a few hundred rows: one thread is several times faster than
    two there (thread hand-offs cost more than they save, worse on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def precision_guard(args: argparse.Namespace, extractor: FeatureExtractor, dataset: Dataset, head: FeatureHead,
                    metrics: dict | None) -> dict:
    """The accuracy guard's verdicts (imagerec/precision_guard.py): the head's validation accuracy on
    reduced-precision features against fp32, on this machine's native reduced precisions."""
    if args.precision == "fp32":
        return {}
    if metrics is None:
        return {"bf16": not_judged("no validation images")}
    verdicts = {"bf16": not_judged("this build machine has no native bf16")}
    labels = torch.tensor([s.label for s in dataset.val])
    for precision in native_reduced_precisions():
        reduced = FeatureExtractor(extractor.backbone.name, extractor.weights_path, cache_dir=extractor.cache_dir,
                                   batch_size=extractor.batch_size, progress=extractor.progress,
                                   use_cache=extractor.use_cache, precision=precision, export_cache=args.export_cache)
        features = reduced.extract([s.path for s in dataset.val], [s.sha256 for s in dataset.val],
                                   description=f"val features ({precision}, accuracy guard)")
        with torch.no_grad():
            accuracy = (head(features).argmax(dim=1) == labels).float().mean().item()
        verdicts[precision] = verdict(precision, "val_accuracy", metrics["accuracy"], accuracy, len(labels),
                                      args.guard_tolerance)
        logger.info("accuracy guard: %s %s", precision, verdicts[precision]["reason"])
    return verdicts


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
    for private in ("register", "key_file", "model_store", "cache_dir"):  # where, not how, it was trained
        record.pop(private, None)
    return record


def main(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    name = check_args(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    backbone = get_backbone(args.backbone)
    weights = backbone.resolve_weights(args.weights)
    dataset = load_dataset(args.data_dir, val_fraction=args.val_fraction, seed=args.seed)
    timings = {"check_data": time.perf_counter() - started}

    tick = time.perf_counter()
    augmentation = Augmentation(min_scale=args.aug_min_scale, jitter=args.aug_jitter, rotation=args.aug_rotation)
    extractor = FeatureExtractor(backbone.name, weights, cache_dir=args.cache_dir, batch_size=args.extract_batch_size,
                                 augmentation=augmentation, progress=not args.no_progress, use_cache=not args.no_cache,
                                 export_cache=args.export_cache)
    views = args.views if HEADS[args.head].uses_views else 0
    features = extract_features(extractor, dataset, views, args.seed)
    timings["features"] = time.perf_counter() - tick

    tick = time.perf_counter()
    head, fit_summary = fit_head(args.head, backbone.feature_dim, len(dataset.classes), features, args)
    timings["fit"] = time.perf_counter() - tick
    logger.info("fitted %s head on %d rows (%d images): %s", args.head, len(features["train_labels"]),
                len(dataset.train), json.dumps(fit_summary))

    metrics = None
    if len(features["val_labels"]):
        with torch.no_grad():
            probabilities = head(features["val"]).softmax(dim=1)
        metrics = evaluate(probabilities, features["val_labels"], dataset.classes)
        logger.info("validation on %d held-out images:\n%s", metrics["images"], format_table(metrics))
    else:
        logger.warning("no validation images (every class has a single image): the archive has no accuracy figure")

    tick = time.perf_counter()
    guard = precision_guard(args, extractor, dataset, head, metrics)
    timings["guard"] = time.perf_counter() - tick

    tick = time.perf_counter()
    info = {
        "training": training_record(args, name),
        "data": {
            "fingerprint": dataset.fingerprint(),
            "layout": dataset.layout,
            "train_images": dataset.counts("train"),
            "val_images": dataset.counts("val"),
            "unreadable": [{"file": str(p), "reason": r} for p, r in dataset.unreadable],
        },
        "fit": fit_summary,
        "validation": None if metrics is None else {k: metrics[k] for k in ("images", "accuracy", "balanced_accuracy", "nll", "per_class")},
    }
    archive = build_archive(
        name=name, version=args.version, backbone_name=backbone.name, weights_path=weights,
        labels=dataset.classes, out_dir=args.out, precision=args.precision, head=head, info=info,
        check_images=pick_check_images(dataset, args.check_images), batching=batching_from_args(args),
        precision_guard=guard, export_cache=args.export_cache, overwrite=args.force,
    )
    timings["archive"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    stem = archive.name[: -len(".mar")]
    report = {**info, "archive": str(archive), "metrics": metrics,
              "features": vars(extractor.stats), "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    write_report(args.out / f"{stem}.report.json", report)
    if metrics is not None:
        draw_confusion(metrics["confusion"], dataset.classes, args.out / f"{stem}.confusion.png",
                       title=f"{name} v{args.version} ({args.head}): accuracy {metrics['accuracy']:.3f} on {metrics['images']} val images")
    logger.info("done in %.1fs (%s); features: %d from cache, %d extracted",
                timings["total"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total"),
                extractor.stats.cached, extractor.stats.extracted)

    if args.register:
        from scripts.manage import register_archive  # the ops tooling owns registration

        register_archive(archive, management_url=args.register, key_file=args.key_file,
                         model_store=args.model_store, workers=args.workers, timeout=args.register_timeout)
        logger.info("registered %s v%s at %s", name, args.version, args.register)
    return archive


def run(argv: list[str] | None = None) -> int:
    """Parse, run and map failures to exit codes (used by ``__main__`` and by the tests)."""
    args = get_args_parser().parse_args(argv)
    try:
        path = main(args)
    except WeightsNotFoundError as exc:
        logger.error("%s", exc)
        return EXIT_NO_WEIGHTS
    except (DataError, ValueError, FileExistsError) as exc:
        logger.error("%s", exc)
        return EXIT_BAD_INPUT
    except Exception as exc:
        exit_code = getattr(exc, "exit_code", None)  # scripts.manage.ManageError
        if exit_code is not None:
            logger.error("registration failed: %s", exc)
            return exit_code
        if isinstance(exc, RuntimeError):  # exporting or torch-model-archiver failed: the message says why
            logger.error("%s", exc)
            return 1
        raise
    print(path)  # the one line a calling script reads
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run())
