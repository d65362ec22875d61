"""Build a backbone archive: a frozen ImageNet classifier answering Top-3 of the 1000 classes.

    python scripts/build_archive.py --backbone efficientnet_lite0 --version 1.0 --out archives

Exit codes: 0 built, 2 bad arguments, 3 weights not found, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from handlers.backbones import WeightsNotFoundError, backbone_names, get_backbone, imagenet_categories
from imagerec.archive import build_archive
from imagerec.cli import EXIT_BAD_ARGUMENTS, EXIT_FAILED, EXIT_NO_WEIGHTS, run_cli
from imagerec.export import exported_graph_dir
from imagerec.naming import validate_name, validate_version
from imagerec.options import add_batching_arguments, batching_from_args
from imagerec.precision_guard import guard_imagenet, not_judged

logger = logging.getLogger("build_archive")




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


ERRORS = {
    WeightsNotFoundError: EXIT_NO_WEIGHTS,  # before RuntimeError: it is one
    ValueError: EXIT_BAD_ARGUMENTS,
    FileExistsError: EXIT_BAD_ARGUMENTS,
    RuntimeError: EXIT_FAILED,  # exporting or torch-model-archiver failed
}

if __name__ == "__main__":
    run_cli(main, get_args_parser(), ERRORS, logger=logger, output=str)  # stdout: the archive's path
