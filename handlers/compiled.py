"""Backbones compiled ahead of time with AOTInductor: the same fp32 math, fused into native code.

Measured here (2 cores, fp32, batch 8): resnet18 features 10.4 -> 7.8 ms/image, efficientnet_lite0
10.3 -> 5.9 ms/image, outputs within 2e-5 of eager (docs/BENCHMARKS.md has the served figures and
the accuracy guard). Compiling happens once, when an archive is built, in the serving environment's
interpreter (``python -m handlers.compiled``), because the compiled package only loads into the torch
that made it. A worker then loads it in milliseconds, through the C++ loader alone: importing
torch._inductor would cost each worker seconds and about 100 MB.

The compiled code is specialised for the build machine (``-march=native``, its torch build, the
worker's thread count). ``load_compiled_features`` checks that record against the worker and falls
back to the eager backbone, with a warning, on any difference: slower, never wrong.

Compiled packages are cached by everything that determines them (backbone, weights, batch limit,
threads, torch build, CPU), so few-shot heads on the same backbone reuse one compilation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("aoti", "none")
CACHE_DIR_VAR = "RECOGNIZER_COMPILE_CACHE"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name: compiled code uses every instruction the build machine has."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_signature(threads: int) -> dict:
    """What a compiled package depends on besides the model itself."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "threads": threads,
    }


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_VAR):
        return Path(os.environ[CACHE_DIR_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-recognizer" / "compiled"


class CompiledFeatures(nn.Module):
    """An AOTInductor package of a backbone's feature body: (N, 3, H, W) -> (N, D), any N (split
    into chunks of at most ``max_batch``, the largest batch it was compiled for)."""

    def __init__(self, package: str | Path, max_batch: int):
        super().__init__()
        # One runner, called from the worker's one inference thread.
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
        self.max_batch = max_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        chunks = images.split(self.max_batch)
        outputs = [self.loader.run([chunk.contiguous(memory_format=torch.channels_last)])[0] for chunk in chunks]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def load_compiled_features(package: Path, record: dict) -> CompiledFeatures | None:
    """The compiled body if it was built for this torch, CPU and thread count; else None (eager)."""
    here = runtime_signature(torch.get_num_threads())
    different = {key: (record.get(key), value) for key, value in here.items() if record.get(key) != value}
    if different:
        details = "; ".join(f"{key}: built for {built!r}, here {now!r}" for key, (built, now) in different.items())
        logger.warning("compiled backbone not used, running eager instead (%s)", details)
        return None
    return CompiledFeatures(package, record["max_batch"])


def _cache_key(backbone: str, weights_sha256: str, max_batch: int, signature: dict) -> str:
    text = json.dumps({"backbone": backbone, "weights": weights_sha256, "max_batch": max_batch, **signature},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_features(backbone_name: str, weights: Path, max_batch: int, threads: int, out: Path,
                     cache_dir: Path) -> dict:
    """Compile (or take from the cache) the feature body; write it to ``out``; return its record.

    Runs in the interpreter whose torch will load the package (the serving environment).
    """
    from handlers.backbones import file_sha256, get_backbone

    torch.set_num_threads(threads)
    signature = runtime_signature(threads)
    weights_sha256 = file_sha256(weights)
    record = {"format": "aoti", "max_batch": max_batch, "weights_sha256": weights_sha256, **signature}
    cached = Path(cache_dir) / f"{backbone_name}-{_cache_key(backbone_name, weights_sha256, max_batch, signature)}.pt2"
    if cached.is_file():
        logger.info("compiled %s from the cache: %s", backbone_name, cached)
    else:
        logger.info("compiling %s for batches up to %d on %d threads (once per backbone and machine; "
                    "about 10-30 s)", backbone_name, max_batch, threads)
        import torch._inductor.config as inductor_config

        body = get_backbone(backbone_name).load(weights).body.to(memory_format=torch.channels_last)
        # Export with a batch of 2: a size-1 example would be specialised to 1.
        example = torch.zeros(min(2, max_batch), 3, 224, 224).contiguous(memory_format=torch.channels_last)
        batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp, torch.inference_mode():
            program = torch.export.export(body, (example,), dynamic_shapes=({0: batch},))
            # Freezing folds batch norms into the convolutions and pre-packs the weights for oneDNN.
            with inductor_config.patch(freezing=True):
                staged = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "body.pt2"))
            os.replace(staged, cached)  # atomic: a concurrent build never sees half a package
    shutil.copyfile(cached, out)
    return record


def compile_in_environment(python: str | Path, backbone_name: str, weights: Path, max_batch: int, threads: int,
                           out: Path, cache_dir: Path | None = None, timeout_s: float = 900) -> dict:
    """Run ``compile_features`` in another interpreter (the serving environment); return its record."""
    command = [
        str(python), "-m", "handlers.compiled", "--backbone", backbone_name, "--weights", str(weights),
        "--max-batch", str(max_batch), "--threads", str(threads), "--out", str(out),
        "--cache-dir", str(cache_dir or default_cache_dir()),
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT, env=env)
    except FileNotFoundError:
        raise RuntimeError(f"cannot compile: no interpreter at {python}") from None
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
    parser.add_argument("--out", type=Path, required=True, help="where to write the .pt2 package")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="compiled package cache")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.max_batch < 1 or args.threads < 1:
        raise SystemExit("--max-batch and --threads must be at least 1")
    record = compile_features(args.backbone, args.weights, args.max_batch, args.threads, args.out, args.cache_dir)
    print(json.dumps(record))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    main(get_args_parser().parse_args())
