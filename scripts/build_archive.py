"""Build a backbone archive: a frozen ImageNet classifier answering Top-3 of the 1000 classes.

    python scripts/build_archive.py --backbone efficientnet_lite0 --version 1.0 --out archives

Exit codes: 0 built, 2 bad arguments, 3 weights not found, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Scripts run as files (python scripts/x.py): make the project root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handlers.archive import BatchingConfig, build_archive, validate_name, validate_version  # noqa: E402
from handlers.backbones import WeightsNotFoundError, backbone_names, get_backbone, imagenet_categories  # noqa: E402
from handlers.constants import PRECISIONS  # noqa: E402
from imagerec.export import default_cache_dir as default_export_cache  # noqa: E402
from imagerec.export import exported_graph_dir  # noqa: E402
from imagerec.precision_guard import DEFAULT_TOLERANCE, guard_imagenet, not_judged  # noqa: E402

logger = logging.getLogger("build_archive")

EXIT_BAD_ARGUMENTS = 2
EXIT_NO_WEIGHTS = 3


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """Serving options shared by every command that writes an archive."""
    group = parser.add_argument_group("serving")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="backbone precision policy of the worker: auto (bf16 where the accuracy guard "
                            "allowed it and the serving CPU runs it natively, else fp32) or fp32 (never reduced)")
    group.add_argument("--guard-tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help="accuracy guard: largest accuracy drop (fraction, 0.01 = 1 point) a reduced "
                            "precision may cost against fp32 to be allowed")
    group.add_argument("--export-cache", type=Path, default=default_export_cache(),
                       help="cache of exported ONNX graphs (default $IMAGEREC_ONNX_CACHE or ~/.cache/imagerec/onnx)")
    group.add_argument("--batch-size", type=int, default=BatchingConfig.batch_size, help="TorchServe dynamic batch size")
    group.add_argument("--max-batch-delay", type=int, default=BatchingConfig.max_batch_delay_ms,
                       help="ms TorchServe waits to fill a batch")
    group.add_argument("--workers", type=int, default=1, help="workers per model version")
    group.add_argument("--torch-threads", type=int, default=0,
                       help="torch threads per worker (0: machine cores divided by workers)")


def batching_from_args(args: argparse.Namespace) -> BatchingConfig:
    for flag in ("batch_size", "workers"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batch_delay < 0 or args.torch_threads < 0:
        raise ValueError("--max-batch-delay and --torch-threads cannot be negative")
    return BatchingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        torch_threads=args.torch_threads,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=backbone_names(), default="resnet18", help="registered backbone")
    parser.add_argument("--version", type=str, default="1.0", help="archive version, e.g. 1.0")
    parser.add_argument("--name", type=str, default=None, help="model name (default: the backbone name)")
    parser.add_argument("--out", type=Path, default=Path("archives"), help="directory for the .mar")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict file (default: $<BACKBONE>_WEIGHTS, then the backbone's own source)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive of that version")
    parser.add_argument("--guard-photos", type=Path, default=None,
                        help="labelled ImageNet photos for the accuracy guard (a folder with labels.tsv: file, "
                             "class index, synset), e.g. ../shared/datasets/imagenet-sample500; without it "
                             "reduced precision stays off")
    add_batching_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> Path:
    backbone = get_backbone(args.backbone)
    name = validate_name(args.name or backbone.name)
    validate_version(args.version)
    weights = backbone.resolve_weights(args.weights)
    logger.info("building %s v%s from %s (%s)", name, args.version, weights, args.precision)
    batching = batching_from_args(args)
    if args.guard_photos is not None and not (args.guard_photos / "labels.tsv").is_file():
        raise ValueError(f"--guard-photos {args.guard_photos}: no labels.tsv there")
    guard = {}
    if args.precision != "fp32":
        if args.guard_photos is None:
            guard = {"bf16": not_judged("no labelled photos given (--guard-photos)")}
        else:
            graph_dir = exported_graph_dir(backbone.name, weights, args.export_cache)
            guard = guard_imagenet(graph_dir, backbone.name, backbone.load(weights).classifier, args.guard_photos,
                                   args.guard_tolerance)
    return build_archive(
        name=name,
        version=args.version,
        backbone_name=backbone.name,
        weights_path=weights,
        labels=imagenet_categories(),
        out_dir=args.out,
        precision=args.precision,
        batching=batching,
        precision_guard=guard,
        export_cache=args.export_cache,
        overwrite=args.force,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = main(get_args_parser().parse_args())
    except WeightsNotFoundError as exc:
        logger.error("%s", exc)
        sys.exit(EXIT_NO_WEIGHTS)
    except (ValueError, FileExistsError) as exc:
        logger.error("%s", exc)
        sys.exit(EXIT_BAD_ARGUMENTS)
    except RuntimeError as exc:  # exporting or torch-model-archiver failed
        logger.error("%s", exc)
        sys.exit(1)
    print(path)  # the one line a calling script reads
