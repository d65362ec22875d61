"""The one report writer of the benchmarks: the machine a figure was measured on, and a section of
docs/BENCHMARKS.md replaced in place (every other section left as it is)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from handlers.machine import cpu_model, cpu_speed_flags, torch_version


def machine_description() -> str:
    """Cores, CPU model and the flags that matter for speed, torch build, load average now."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} cores, {cpu_model()} ({platform.machine()}; flags: "
            f"{' '.join(cpu_speed_flags()) or 'none of note'}), no GPU; Python {platform.python_version()}, "
            f"torch {torch_version()}; load average {load:.1f}")


def replace_section(doc: Path, title: str, body: str) -> None:
    """Replace the section headed ``title`` (a ``## `` line) with ``body`` (which starts with that
    heading), or append it; every other section stays as it is."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    section = body.rstrip("\n") + "\n\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
