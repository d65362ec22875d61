"""Command-line options shared by every command that writes an archive (build_archive, train_head)."""

from __future__ import annotations

import argparse
from pathlib import Path

from handlers.constants import PRECISIONS
from imagerec.archive import BatchingConfig
from imagerec.export import default_cache_dir as default_export_cache
from imagerec.precision_guard import DEFAULT_TOLERANCE


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
