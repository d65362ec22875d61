"""Command-line options shared by every command that writes an archive (build_archive, train_head)."""

from __future__ import annotations

import argparse
from pathlib import Path

from handlers.constants import PRECISIONS
from imagerec.archive import BatchingConfig
from imagerec.compile_backbone import COMPILE_MODES
from imagerec.torchserve import serving_python


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """Serving options shared by every command that writes an archive."""
    group = parser.add_argument_group("serving")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="backbone precision inside the worker (bf16: autocast, channels-last)")
    group.add_argument("--compile", choices=COMPILE_MODES, default=None,
                       help="aoti: compile the backbone with AOTInductor in the serving environment (same fp32 "
                            "math, faster; once per backbone and machine, then cached); none: eager. "
                            "Default: aoti for fp32, none otherwise")
    group.add_argument("--batch-size", type=int, default=BatchingConfig.batch_size, help="TorchServe dynamic batch size")
    group.add_argument("--max-batch-delay", type=int, default=BatchingConfig.max_batch_delay_ms,
                       help="ms TorchServe waits to fill a batch")
    group.add_argument("--workers", type=int, default=1, help="workers per model version")
    group.add_argument("--torch-threads", type=int, default=0,
                       help="torch threads per worker (0: machine cores divided by workers)")


def compile_with_from_args(args: argparse.Namespace) -> Path | None:
    """The serving environment's Python when the archive's backbone is to be compiled, else None."""
    mode = args.compile or ("aoti" if args.precision == "fp32" else "none")
    if mode == "none":
        return None
    if args.precision != "fp32":
        raise ValueError(f"--compile aoti supports --precision fp32 only, not {args.precision}")
    return serving_python()


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
