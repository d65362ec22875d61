"""This machine as natively compiled code sees it: its CPU and its torch build.

Torch-free (torch's version comes from its package metadata), so that the build side can check a
compile cache and benchmark processes can describe the machine without importing torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path


def _cpuinfo(field: str) -> str | None:
    """The first CPU's value of ``field`` in /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name, for people reading a report or a manifest."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags_digest() -> str:
    """A digest of the CPU's instruction-set flags: two machines with the same digest run the same
    natively compiled code (the compiler uses every instruction the build machine has)."""
    flags = _cpuinfo("flags")
    if flags is None:
        return platform.machine()
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]


def torch_version() -> str:
    """This interpreter's torch build, read from its package metadata (no torch import)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a torch built from source, say
        import torch

        return torch.__version__


def runtime_signature(threads: int) -> dict:
    """What natively compiled model code depends on besides the model: torch build, CPU, threads."""
    return {"torch": torch_version(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags_digest(), "threads": threads}


def worker_threads(workers: int, torch_threads: int = 0) -> int:
    """torch threads of each worker: ``torch_threads`` if set, else the cores divided among the
    workers, never more than the cores in all (oversubscribed cores collapse throughput)."""
    if torch_threads > 0:
        return torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# The instruction-set extensions that decide how fast a backbone runs here (vector width, bf16, int8).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
               "amx_tile", "amx_bf16", "amx_int8")


def cpu_speed_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` this CPU has (what a benchmark figure must be read next to)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [flag for flag in SPEED_FLAGS if flag in flags]
