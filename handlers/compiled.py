"""Backbones compiled ahead of time with AOTInductor (imagerec/compile_backbone.py builds them): the
same fp32 math, fused into native code.

Measured here (2 cores, fp32): resnet18 features 12.5 -> 7.9 ms for one image and 10.4 -> 7.8
ms/image at batch 8; efficientnet_lite0 8.0 -> 3.6 ms and 10.3 -> 5.9 ms/image; outputs within 2e-5
of eager (docs/BENCHMARKS.md has the served figures and the accuracy guard). A worker loads the
packages in milliseconds, through torch's C++ loader alone: loading through torch._inductor instead
took 5.5 s and about 80 MB more per worker (resnet18, measured here).

``load_compiled_features`` checks the archive's record of the torch build, CPU and thread count the
packages were compiled for against the worker, and falls back to the eager backbone, with a
warning, on any difference: slower, never wrong.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from handlers.layout import BATCHED, SINGLE
from handlers.machine import runtime_signature

logger = logging.getLogger(__name__)


def _runner(package: Path):
    """One runner, called from the worker's one inference thread.

    The C++ loader unpacks the package into ``$TMPDIR/aotinductor_XXXXXX`` (about 16 MB) and removes it
    only when the runner is destroyed, which a killed or replaced worker never does (31 MB left behind
    per worker death). Once loaded, the runner needs none of those files (its shared library stays
    mapped), so they are unpacked into a private folder that is removed at once.
    """
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="aoti-unpack-") as private:
        os.environ["TMPDIR"] = private  # read by the loader (std::filesystem::temp_directory_path)
        try:
            return torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
        finally:
            if previous is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous


class CompiledFeatures(nn.Module):
    """A backbone's feature body as AOTInductor packages: (N, 3, H, W) -> (N, D), any N. One image
    runs the single-image package; larger batches run the batched one, in chunks of at most
    ``max_batch`` (the largest batch it was compiled for)."""

    def __init__(self, packages: dict[str, Path], max_batch: int):
        super().__init__()
        self.single = _runner(packages[SINGLE])
        self.batched = _runner(packages[BATCHED]) if BATCHED in packages else None
        self.max_batch = max_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.batched is None or len(images) == 1:
            outputs = [self.single.run([image[None]])[0] for image in images]
        else:
            outputs = [self.batched.run([chunk])[0] for chunk in images.split(self.max_batch)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def load_compiled_features(model_dir: Path, record: dict) -> CompiledFeatures | None:
    """The compiled body if it was built for this torch, CPU and thread count; else None (eager)."""
    here = runtime_signature(torch.get_num_threads())
    different = {key: (record.get(key), value) for key, value in here.items() if record.get(key) != value}
    if different:
        details = "; ".join(f"{key}: built for {built!r}, here {now!r}" for key, (built, now) in different.items())
        logger.warning("compiled backbone not used, running eager instead (%s)", details)
        return None
    packages = {kind: Path(model_dir) / name for kind, name in record["files"].items()}
    try:
        return CompiledFeatures(packages, record["max_batch"])
    except (RuntimeError, KeyError, OSError) as error:  # a missing or damaged package: still serve, eager
        logger.warning("compiled backbone not used, running eager instead (cannot load it: %s)", error)
        return None
