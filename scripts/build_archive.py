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
from imagerec.naming import validate_name, validate_version
from imagerec.options import add_batching_arguments, batching_from_args, compile_with_from_args

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
    add_batching_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> Path:
    backbone = get_backbone(args.backbone)
    name = validate_name(args.name or backbone.name)
    validate_version(args.version)
    weights = backbone.resolve_weights(args.weights)
    logger.info("building %s v%s from %s (%s)", name, args.version, weights, args.precision)
    return build_archive(
        name=name,
        version=args.version,
        backbone_name=backbone.name,
        weights_path=weights,
        labels=imagenet_categories(),
        out_dir=args.out,
        precision=args.precision,
        batching=batching_from_args(args),
        compile_with=compile_with_from_args(args),
        overwrite=args.force,
    )


ERRORS = {
    WeightsNotFoundError: EXIT_NO_WEIGHTS,  # before RuntimeError: it is one
    ValueError: EXIT_BAD_ARGUMENTS,
    FileExistsError: EXIT_BAD_ARGUMENTS,
    RuntimeError: EXIT_FAILED,  # compiling or torch-model-archiver failed
}

if __name__ == "__main__":
    run_cli(main, get_args_parser(), ERRORS, logger=logger, output=str)  # stdout: the archive's path
