"""Compiling a backbone ahead of time with AOTInductor, for handlers/compiled.py to run.

Compiling happens once per backbone and machine, when an archive is built, in the serving
environment's interpreter (``python -m imagerec.compile_backbone``): a compiled package only loads
into the torch build that made it. Two packages per backbone: one for a single image, with every
shape fixed, and one for batches of 2 to ``max_batch`` (a batch dimension left dynamic makes single
images about 40% slower).

The compiled code is specialised for the build machine: its torch build, its CPU (the compiler uses
``-march=native``) and the worker's thread count. ``runtime_signature`` names all of it; the archive
records it and the worker checks it (handlers/compiled.py). Packages are cached by that signature
plus the backbone, its weights and the batch limit, so few-shot heads on one backbone reuse one
compilation. This module imports torch only to compile: a cache hit costs no torch import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from handlers.layout import BATCHED, COMPILED_FEATURES_FILES, SINGLE
from handlers.machine import runtime_signature
from imagerec.files import atomic_write, file_sha256
from imagerec.paths import PROJECT_ROOT, user_cache_dir

logger = logging.getLogger(__name__)

COMPILE_MODES = ("aoti", "none")
CACHE_DIR_VAR = "IMAGEREC_COMPILE_CACHE"


def default_cache_dir() -> Path:
    return user_cache_dir("compiled", CACHE_DIR_VAR)


def _cache_file(cache_dir: Path, backbone: str, kind: str, shape: dict, signature: dict) -> Path:
    text = json.dumps({"backbone": backbone, "kind": kind, **shape, **signature}, sort_keys=True)
    return Path(cache_dir) / f"{backbone}-{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt2"


def _compile_package(backbone_name: str, weights: Path, example_batch: int, max_batch: int | None,
                     target: Path) -> None:
    """Export the feature body (batch dimension dynamic up to ``max_batch``, or fixed when None) and
    compile it into ``target``."""
    import torch
    import torch._inductor.config as inductor_config

    from handlers.backbones import get_backbone

    backbone = get_backbone(backbone_name)
    body = backbone.load(weights).body.to(memory_format=torch.channels_last)
    size = backbone.preprocessing.crop_size
    example = torch.zeros(example_batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    dynamic = None if max_batch is None else ({0: torch.export.Dim("batch", min=2, max=max_batch)},)
    with torch.inference_mode():
        program = torch.export.export(body, (example,), dynamic_shapes=dynamic)

        def package(partial: Path) -> None:
            # Freezing folds batch norms into the convolutions and pre-packs the weights for oneDNN.
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))

        atomic_write(target, package, suffix=".pt2")  # a concurrent build never sees half a package


def compile_features(backbone_name: str, weights: Path, max_batch: int, threads: int, out_dir: Path,
                     cache_dir: Path) -> dict:
    """Compile (or take from the cache) the feature packages into ``out_dir``; return their record.

    Runs in the interpreter whose torch will load the packages (the serving environment).
    """
    signature = runtime_signature(threads)
    weights_sha256 = file_sha256(weights)
    plans = {SINGLE: (1, None)}  # kind: (example batch, dynamic up to)
    if max_batch > 1:
        plans[BATCHED] = (2, max_batch)
    record = {"format": "aoti", "max_batch": max_batch, **signature, "files": {}}
    for kind, (example_batch, dynamic_max) in plans.items():
        cached = _cache_file(cache_dir, backbone_name, kind, {"weights": weights_sha256, "max_batch": dynamic_max},
                             signature)
        if cached.is_file():
            logger.info("compiled %s (%s) from the cache: %s", backbone_name, kind, cached)
        else:
            logger.info("compiling %s (%s%s) on %d threads: once per backbone and machine, about 10-30 s",
                        backbone_name, kind, f", batches 2-{dynamic_max}" if dynamic_max else ", one image", threads)
            import torch

            torch.set_num_threads(threads)
            _compile_package(backbone_name, weights, example_batch, dynamic_max, cached)
        shutil.copyfile(cached, Path(out_dir) / COMPILED_FEATURES_FILES[kind])
        record["files"][kind] = COMPILED_FEATURES_FILES[kind]
    return record


def compile_in_environment(python: str | Path, backbone_name: str, weights: Path, max_batch: int, threads: int,
                           out_dir: Path, cache_dir: Path | None = None, timeout_s: float = 900) -> dict:
    """Run ``compile_features`` in another interpreter (the serving environment); return its record."""
    command = [
        str(python), "-m", "imagerec.compile_backbone", "--backbone", backbone_name, "--weights", str(weights),
        "--max-batch", str(max_batch), "--threads", str(threads), "--out-dir", str(out_dir),
        "--cache-dir", str(cache_dir or default_cache_dir()),
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT, env=env)
    except FileNotFoundError:
        raise RuntimeError(f"cannot compile: no interpreter at {python}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiling {backbone_name} took longer than {timeout_s:.0f} s; "
                           "build with --compile none to skip it") from None
    for line in result.stderr.splitlines():
        if line.startswith("INFO "):
            logger.info("%s", line[5:])
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"compiling {backbone_name} failed (exit {result.returncode}); AOTInductor needs a C++ compiler "
            f"(g++). Build without it with --compile none.\n{tail}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compile a backbone's feature body with AOTInductor.")
    parser.add_argument("--backbone", type=str, required=True, help="registered backbone name")
    parser.add_argument("--weights", type=Path, required=True, help="state_dict file of the backbone")
    parser.add_argument("--max-batch", type=int, required=True, help="largest batch the package accepts")
    parser.add_argument("--threads", type=int, required=True, help="torch threads of the worker that will run it")
    parser.add_argument("--out-dir", type=Path, required=True, help="where to write the .pt2 packages")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="compiled package cache")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.max_batch < 1 or args.threads < 1:
        raise SystemExit("--max-batch and --threads must be at least 1")
    record = compile_features(args.backbone, args.weights, args.max_batch, args.threads, args.out_dir, args.cache_dir)
    print(json.dumps(record))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    main(get_args_parser().parse_args())
