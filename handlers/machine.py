"""This machine: where derived files are cached (backbone features, exported graphs), and its CPU.

Torch-free, so that benchmark processes that must not import torch can use it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def user_cache_dir(kind: str, env_var: str) -> Path:
    """``$<env_var>`` if set, else ``$XDG_CACHE_HOME/imagerec/<kind>`` (``~/.cache/imagerec/<kind>``)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagerec" / kind


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
