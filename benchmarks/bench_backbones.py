"""The offline backbones side by side, served: what a larger body costs per photo and buys in accuracy.

    .venv/bin/python -m benchmarks.bench_backbones --out /tmp/backbones.md

For each backbone in ``--backbones`` (default: the registered ones whose genuine ImageNet weights
install offline): its ImageNet archive as ``scripts/build_archive.py`` builds it (fp32, default
batching, ONNX Runtime in the worker), all served by one TorchServe, one worker per model. Each model
is loaded alone in turn by 1 and 16 closed-loop clients sending the same real photos (p50 latency,
throughput), then asked every photo of ``--imagenet`` through HTTP (Top-1 / Top-3). Idle worker
memory (PSS) after the start. What the backbones give few-shot heads: ``bench_openset --backbone``.
Not part of the test suite. Exit codes: 0 done, 2 bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_runtime import MEMORY_SETTLE_S, http_accuracy, labelled_photos
from benchmarks.bench_serving import load_test
from benchmarks.load import add_load_test_arguments
from benchmarks.processes import memory_of, server_processes
from benchmarks.report import machine_description
from handlers.backbones import backbone_names, get_backbone, imagenet_categories
from imagerec.archive import build_archive
from imagerec.cli import EXIT_BAD_ARGUMENTS, EXIT_FAILED, run_cli
from imagerec.paths import DATASETS_DIR
from imagerec.torchserve import TorchServe, install_archive

logger = logging.getLogger("bench_backbones")

OFFLINE_BACKBONES = "efficientnet_lite0,efficientnet_lite2,efficientnet_lite0_lite2"
CLIENTS = (1, 16)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", type=str, default=OFFLINE_BACKBONES, help="comma-separated registered backbones")
    parser.add_argument("--imagenet", type=Path, default=DATASETS_DIR / "imagenet-sample500",
                        help="labelled ImageNet photos (labels.tsv: file, class index, synset)")
    parser.add_argument("--photos", type=int, default=64, help="real photos the load clients send (from the shared sets)")
    add_load_test_arguments(parser, max_requests=5000)
    parser.add_argument("--workdir", type=Path, default=None, help="archives, server, logs (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write the figures to")
    return parser


def load_photos(count: int) -> list[bytes]:
    """Every 7th val photo of the shared sets, as bench_runtime sends (several sets, sizes and formats)."""
    paths = sorted(p for p in DATASETS_DIR.glob("*/val/*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return [p.read_bytes() for p in paths[::7][:count]]


def build_archives(names: list[str], out_dir: Path) -> dict[str, Path]:
    archives = {}
    for name in names:
        backbone = get_backbone(name)
        archives[name] = build_archive(name=name, version="1.0", backbone_name=name,
                                       weights_path=backbone.resolve_weights(allow_download=False),
                                       labels=imagenet_categories(), out_dir=out_dir, overwrite=True)
    return archives


def measure(archives: dict[str, Path], workdir: Path, photos: list[bytes], imagenet: list[tuple[str, int]],
            args: argparse.Namespace) -> dict[str, dict]:
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    for path in archives.values():
        install_archive(path, store)
    models = ",".join(f"{name}={path.name}" for name, path in archives.items())
    results = {name: {"archive_mb": path.stat().st_size / 1e6} for name, path in archives.items()}
    with TorchServe(model_store=store, workdir=workdir / "server", models=models) as server:
        roles = server_processes(server, list(archives))
        time.sleep(MEMORY_SETTLE_S)
        idle = memory_of(roles)
        for name in archives:
            results[name]["idle_pss_mb"] = idle.get(f"worker {name}", {}).get("pss_mb")
            load_test(server, name, photos, 4, argparse.Namespace(**{**vars(args), "warmup": 0.0, "duration": 3.0}),
                      roles)  # the worker's first batches (allocations, thread pools) stay out of the figures
            for clients in CLIENTS:
                run = load_test(server, name, photos, clients, args, roles)
                results[name][clients] = run
                logger.info("%s x%d: %.1f img/s, p50 %.1f ms", name, clients, run["throughput"], run["p50_ms"] or -1)
            results[name]["imagenet"] = http_accuracy(server, imagenet, args.request_timeout, model=name)
            logger.info("%s ImageNet through HTTP: %s", name, results[name]["imagenet"])
    return results


def report(results: dict[str, dict], args: argparse.Namespace, started: str, seconds: float) -> str:
    command = " ".join([".venv/bin/python -m benchmarks.bench_backbones", *sys.argv[1:]])
    lines = ["# Offline backbones, served side by side", "",
             f"Command: `{command}` ({started} UTC, {seconds / 60:.1f} min). Machine: {machine_description()} "
             "(the load average at the end, this benchmark's own load included).", "",
             f"One TorchServe, one worker per model (ONNX Runtime fp32, the served default), each model loaded alone "
             f"in turn; {args.photos} real photos of the shared sets; ImageNet on {args.imagenet.name} through HTTP.", "",
             "| backbone | input px | 1 client p50 ms | 16 clients img/s | 16 clients p50 ms | ImageNet Top-1 | Top-3 | idle worker PSS MB | archive MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        crop = get_backbone(name).preprocessing.crop_size
        one, many, imagenet = result[1], result[16], result["imagenet"]
        pss = result.get("idle_pss_mb")
        lines.append(f"| {name} | {crop} | {one['p50_ms']:.1f} | {many['throughput']:.1f} | {many['p50_ms']:.1f} | "
                     f"{imagenet['top1']:.3f} | {imagenet['top3']:.3f} | {'-' if pss is None else f'{pss:.0f}'} | "
                     f"{result['archive_mb']:.1f} |")
    lines += ["", f"Where the {os.cpu_count()} cores went at 16 clients (CPU seconds per second over the measured window; "
              "'others': the rest of the machine's busy time):", "",
              "| backbone | worker | Java frontend | load generator (this process) | others | total |",
              "|---|---|---|---|---|---|"]
    for name, result in results.items():
        run = result[16]
        cpu = run["cpu_cores"]
        lines.append(f"| {name} | {cpu.get(f'worker {name}', 0.0):.2f} | {cpu.get('frontend', 0.0):.2f} | "
                     f"{cpu.get('load generator', 0.0):.2f} | {run['cpu_cores_others']:.2f} | "
                     f"{run['cpu_cores_total'] + run['cpu_cores_others']:.2f} |")
    errors = {name: sum(result[c]["errors"] for c in CLIENTS) + result["imagenet"]["errors"] for name, result in results.items()}
    lines += ["", "Failed requests: " + ", ".join(f"{name} {count}" for name, count in errors.items()) + "."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    names = [n for n in args.backbones.split(",") if n]
    unknown = sorted(set(names) - set(backbone_names()))
    if not names or unknown or args.photos < 1 or args.duration <= 0:
        raise ValueError(f"--backbones must name registered backbones ({', '.join(backbone_names())}); "
                         f"unknown: {unknown}; --photos and --duration must be positive")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    tick = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-backbones-"))
    archives = build_archives(names, workdir / "archives")
    results = measure(archives, workdir, load_photos(args.photos), labelled_photos(args.imagenet), args)
    text = report(results, args, started, time.perf_counter() - tick)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS, RuntimeError: EXIT_FAILED}, logger=logger,
            output=str)
