"""This machine: its CPU (model, instruction-set flags) and its torch build.

Torch-free (torch's version comes from its package metadata), so that benchmark processes can
describe the machine without importing torch.
"""

from __future__ import annotations

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


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo names them (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def torch_version() -> str:
    """This interpreter's torch build, read from its package metadata (no torch import)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a torch built from source, say
        import torch

        return torch.__version__


def worker_threads(workers: int, torch_threads: int = 0) -> int:
    """Threads of each worker (torch's and the backbone runtime's): ``torch_threads`` if set, else
    the cores divided among the workers, never more than the cores in all (oversubscribed cores
    collapse throughput)."""
    if torch_threads > 0:
        return torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# The instruction-set extensions that decide how fast a backbone runs here (vector width, bf16, int8).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
               "amx_tile", "amx_bf16", "amx_int8")


def cpu_speed_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` this CPU has (what a benchmark figure must be read next to)."""
    return [flag for flag in SPEED_FLAGS if flag in cpu_flags()]
