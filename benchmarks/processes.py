"""The server's processes as a benchmark sees them: which is which, their CPU time and their memory.

Torch-free: proportional set size splits shared library pages among every process mapping them, so a
torch-importing benchmark process would make the servers look smaller than they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil

from imagerec.torchserve import TorchServe


def pss_mb(pid: int) -> float | None:
    """Proportional set size from /proc/PID/smaps_rollup (shared pages split among their mappers)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def server_processes(server: TorchServe, models: list[str]) -> dict[str, int]:
    """{role: pid}: the launcher, the Java frontend and each model's workers."""
    roles = {"launcher": server.process.pid}
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "java" in child.name():
                roles["frontend"] = child.pid
        except psutil.Error:
            continue
    for model in models:
        for i, pid in enumerate(server.worker_pids(model)):
            roles[f"worker {model}" + (f" #{i + 1}" if i else "")] = pid
    return roles


def memory_of(roles: dict[str, int]) -> dict[str, dict]:
    memory = {}
    for role, pid in roles.items():
        try:
            rss = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            continue
        memory[role] = {"rss_mb": rss, "pss_mb": pss_mb(pid)}
    return memory


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    seconds = {}
    for role, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
            seconds[role] = times.user + times.system
        except psutil.Error:
            pass
    return seconds


def system_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)
