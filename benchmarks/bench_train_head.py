"""Wall time of training/train_head.py as a user runs it, cold and warm, and the head archive's size.

    .venv/bin/python -m benchmarks.bench_train_head

Data: 5 classes of ``--set`` with 20 training photos each and 60 validation photos each (300 in
all: the set's val photos, topped up with training photos not used for training), linked into a
temporary ImageFolder. Cold: empty feature cache and empty exported-graph cache (the first head on
a new machine: the backbone is exported to ONNX once); warm: both filled (other head settings, same
photos, ``--head linear``) and ``warm_auto`` (the default ``--head auto`` again, cached). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handlers.layout import ArchiveContents
from imagerec.cli import EXIT_FAILED, run_cli
from imagerec.files import link_or_copy
from imagerec.paths import DATASETS_DIR, PROJECT_ROOT

logger = logging.getLogger("bench_train_head")
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 20, 60


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, default=DATASETS_DIR / "clothing10",
                        help="ImageFolder with train/ and val/")
    parser.add_argument("--backbone", type=str, default="efficientnet_lite0", help="registered backbone")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per train_head run")
    return parser


TRAIN_HEAD = PROJECT_ROOT / "training" / "train_head.py"


def link_class_folders(source: Path, data: Path, classes: int, per_class: int) -> None:
    """``data/<class>/*``: the first ``per_class`` photos of the first ``classes`` class folders of
    ``source``, linked (benchmarks/bench_fewshot.py and bench_openset.py time train_head on these)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        (data / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:per_class]:
            link_or_copy(photo, data / folder.name / photo.name)


def run_train_head(data: Path, out: Path, name: str, version: str, *options: str, env: dict | None = None,
                   timeout: float = 900.0) -> tuple[float, dict, list[str]]:
    """``training/train_head.py DATA`` as a user runs it: (wall seconds, its report, the command)."""
    command = [sys.executable, str(TRAIN_HEAD), str(data), "--name", name, "--version", version,
               "--out", str(out), "--no-progress", *options]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT, env=env)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"train_head failed: {completed.stderr[-2000:]}")
    return seconds, json.loads((out / f"{name}_v{version}.report.json").read_text()), command


def make_data(source: Path, data: Path) -> None:
    for folder in sorted(p for p in (source / "train").iterdir() if p.is_dir())[:CLASSES]:
        train = sorted(folder.iterdir())
        val = sorted((source / "val" / folder.name).iterdir()) + train[TRAIN_PER_CLASS:]
        for split, photos in (("train", train[:TRAIN_PER_CLASS]), ("val", val[:VAL_PER_CLASS])):
            (data / split / folder.name).mkdir(parents=True)
            for photo in photos:
                link_or_copy(photo, data / split / folder.name / photo.name)


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-head-") as tmp:
        tmp = Path(tmp)
        make_data(args.set, tmp / "photos")
        result = {"val_images": sum(1 for _ in (tmp / "photos" / "val").glob("*/*"))}
        # warm: other head settings on the cached features; warm_auto: the default head (auto) again.
        for run, extra in (("cold", []), ("warm", ["--head", "linear", "--weight-decay", "0.01"]), ("warm_auto", [])):
            seconds, report, command = run_train_head(
                tmp / "photos", tmp / "out", "bench", run, "--backbone", args.backbone, "--cache-dir",
                str(tmp / "features"), "--export-cache", str(tmp / "onnx"), *extra, timeout=args.timeout)
            info = ArchiveContents(tmp / "out" / f"bench_v{run}.mar").info()
            result[run] = {"wall_s": round(seconds, 1), "phases_s": report["timings_s"],
                           "val_accuracy": report["metrics"]["accuracy"],
                           "archive_mb": round((tmp / "out" / f"bench_v{run}.mar").stat().st_size / 1e6, 1),
                           "guard": {k: v.get("reason") for k, v in info.get("precision_guard", {}).items()},
                           "command": " ".join([".venv/bin/python", "training/train_head.py", "PHOTOS",
                                                *command[3:]]).replace(str(tmp), "TMP")}
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {RuntimeError: EXIT_FAILED}, logger=logger, output=json.dumps)
