"""Serving speed: TorchServe over HTTP against the raw model in-process, in one run.

    .venv/bin/python -m benchmarks.bench_serving            # full run (about 6-10 minutes on 2 cores)
    .venv/bin/python -m benchmarks.bench_serving --quick    # smoke run (about 3 minutes)

What it does, in order:
1. Offline, in a child process (benchmarks/serving_offline.py; so that no torch pages of this process are counted in the servers'
   proportional memory later): the in-process reference (fp32 eager resnet18: batch-1 latency of
   decode + preprocess + forward for real photos, batch-16 forward throughput), preprocessing costs,
   and the archives: resnet18 (self-made weights, as in tests/conftest.py) with its lever variants,
   efficientnet_lite0 and two prototype heads on it (clothing10, signdigits10). Then, with the
   workers' torch (benchmarks/bench_in_worker.py in .venv-serve): the forward costs behind the ceiling
   and the accuracy guard (ONNX runtimes and bf16 against fp32 eager on every val image of
   ../shared/datasets), for each variant of the served archives.
2. Served: one TorchServe with the resnet18 archives, then one with efficientnet_lite0 and the two
   heads (the memory target: backbone plus two heads, one worker each). Each model is loaded by
   1, 4 and 16 closed-loop clients sending real photos; throughput, p50/p95/p99 latency, CPU use of
   every process, and resident / proportional memory of the frontend and each worker.
3. A markdown report on stdout and in docs/BENCHMARKS.md (section "## Serving speed";
   benchmarks/serving_report.py writes it).

The load generator runs in this process and competes for the same cores: its CPU use is reported.
Exit codes: 0 done (targets met or not: the report says), 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# This process stays torch-free (torch is imported only in the offline child): proportional set size
# splits shared library pages among every process mapping them, so a torch-importing benchmark
# process would make the servers look smaller than they are.
from benchmarks.bench_in_worker import VARIANTS
from benchmarks.load import LoadClients, add_load_test_arguments, percentile
from benchmarks.processes import cpu_seconds, memory_of, server_processes, system_busy_seconds
from benchmarks.report import replace_section
from benchmarks.serving_offline import HEAD_SETS, offline_phase, reference_phase, resnet18_variant_model, val_photos
from benchmarks.serving_report import MEMORY_SETTLE_S, SECTION, build_report, fmt
from handlers.constants import PRECISIONS
from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.paths import DATASETS_DIR, DOCS_DIR
from imagerec.torchserve import TorchServe, install_archive

logger = logging.getLogger("bench_serving")

DOC_PATH = DOCS_DIR / "BENCHMARKS.md"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DATASETS_DIR,
                        help="ImageFolder sets with val/ splits (photos for the load and the guard)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where archives, servers and logs go (default: a fresh temporary directory)")
    parser.add_argument("--concurrency", type=str, default="1,4,16", help="comma-separated client counts")
    add_load_test_arguments(parser, max_requests=20000)
    parser.add_argument("--model-warmup", type=float, default=4.0,
                        help="unmeasured seconds of 4-client load on each model before its first measurement "
                             "(its worker and the Java frontend reach their steady speed)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="precision of the served archives (default: scripts/build_archive.py's)")
    parser.add_argument("--compare-variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve resnet18 as the other precision (fp32, bf16)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="TorchServe batch size of the archives (default: imagerec.archive.BatchingConfig's)")
    parser.add_argument("--max-batch-delay", type=int, default=None,
                        help="TorchServe max batch delay in ms (default: imagerec.archive.BatchingConfig's)")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve resnet18 variants (batch size, delay, workers x threads) at 1 and 16 clients")
    parser.add_argument("--guard-images", type=int, default=0,
                        help="val images for the accuracy guard (0: all of them)")
    parser.add_argument("--reference-reps", type=int, default=20, help="repetitions of each in-process timing")
    parser.add_argument("--quick", action="store_true", default=False,
                        help="smoke run: 3 s per level, 1 and 16 clients, 150 guard images, no levers")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="markdown file whose section gets the report")
    parser.add_argument("--no-doc", action="store_true", default=False, help="print the report only")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.quick:
        args.duration, args.warmup, args.model_warmup, args.concurrency = 3.0, 1.0, 2.0, "1,16"
        args.guard_images, args.reference_reps, args.levers = 150, 5, False
    try:
        args.levels = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not args.levels or args.levels[0] < 1 or args.levels[-1] > 64:
        raise ValueError("--concurrency values must be between 1 and 64")
    if args.duration <= 0 or args.warmup < 0 or args.model_warmup < 0 or args.max_requests < 1 or args.reference_reps < 1:
        raise ValueError("--duration, --max-requests and --reference-reps must be positive, "
                         "--warmup and --model-warmup >= 0")
    if args.guard_images < 0:
        raise ValueError("--guard-images cannot be negative")
    for flag in ("batch_size", "max_batch_delay"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "batch_size" else 0):
            raise ValueError(f"--{flag.replace('_', '-')} is out of range: {value}")
    if not args.datasets.is_dir():
        raise ValueError(f"no photo sets at {args.datasets}")


def load_test(server: TorchServe, model: str, photos: list[bytes], clients: int, args, roles: dict[str, int]) -> dict:
    """``clients`` closed-loop clients (benchmarks/load.py) PUT real photos for warm-up + duration
    seconds; figures cover the measured window only."""
    start = time.monotonic()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    pids = {**roles, "load generator": os.getpid()}
    with LoadClients.for_model(server, model, photos, clients=clients, max_seconds=args.warmup + args.duration,
                               max_requests=args.max_requests, timeout=args.request_timeout) as load:
        time.sleep(max(0.0, measure_from - time.monotonic()))
        cpu_before, busy_before, t_before = cpu_seconds(pids), system_busy_seconds(), time.monotonic()
        time.sleep(max(0.0, stop_at - time.monotonic()))
        cpu_after, busy_after, t_after = cpu_seconds(pids), system_busy_seconds(), time.monotonic()
    window = t_after - t_before
    # Requests answered inside the window (whenever sent): a closed loop's throughput is completions
    # per second; requiring the whole request inside a short window would drop the slow ones.
    measured = [r for r in load.records if measure_from <= r.sent + r.latency <= stop_at]
    ok = [r.latency * 1e3 for r in measured if r.status == 200]
    cpu = {role: (cpu_after[role] - cpu_before[role]) / window for role in cpu_after if role in cpu_before}
    ours = sum(cpu.values())
    return {
        "model": model, "clients": clients, "requests": len(measured), "errors": len(measured) - len(ok),
        "throughput": len(ok) / window if window > 0 else 0.0,
        "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
        "cpu_cores": cpu, "cpu_cores_total": ours,
        "cpu_cores_others": max(0.0, (busy_after - busy_before) / window - ours),
    }


def serve_and_measure(workdir: Path, name: str, archives: dict, models: list[str], tested: dict[str, list[int]],
                      photos: list[bytes], args) -> dict:
    """Start one TorchServe with ``models``, load-test ``tested`` {model: client counts}, measure memory."""
    store = workdir / f"store-{name}"
    store.mkdir(parents=True, exist_ok=True)
    for model in models:
        install_archive(archives[model]["archive"], store)
    load_models = ",".join(f"{m}={Path(archives[m]['archive']).name}" for m in models)
    server = TorchServe(model_store=store, workdir=workdir / f"server-{name}", models=load_models)
    logger.info("starting TorchServe %s with %s", name, ", ".join(models))
    with server:
        roles = server_processes(server, models)
        runs = []
        for model, levels in tested.items():
            if args.model_warmup > 0:
                warmup = argparse.Namespace(**{**vars(args), "warmup": 0.0, "duration": args.model_warmup})
                load_test(server, model, photos, 4, warmup, roles)
            for clients in levels:
                run = load_test(server, model, photos, clients, args, roles)
                logger.info("%s x%d: %.1f img/s, p50 %s ms, errors %d, cpu %.2f cores (others %.2f)",
                            model, clients, run["throughput"], fmt(run["p50_ms"]), run["errors"],
                            run["cpu_cores_total"], run["cpu_cores_others"])
                runs.append(run)
        busy = memory_of(roles)
        time.sleep(MEMORY_SETTLE_S)
        memory = {role: {**m, "busy_pss_mb": busy.get(role, {}).get("pss_mb")} for role, m in memory_of(roles).items()}
    return {"runs": runs, "memory": memory, "roles": roles}


def main(args: argparse.Namespace) -> str:
    check_args(args)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    loads = [f"{os.getloadavg()[0]:.2f}"]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        options["workdir"] = str(workdir)
        # The child exits before any server starts: its torch pages are not shared with the servers.
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            offline = pool.submit(offline_phase, options).result()
        photos = [p.read_bytes() for p in val_photos(args.datasets)]
        archives = offline["archives"]
        resnets = [n for n in archives if archives[n]["backbone"] == "resnet18"]
        short = [1, max(args.levels)] if len(args.levels) > 1 else args.levels
        # The default archive and the precision lever get every client count; the other levers 1 and the most.
        full = {"resnet18", *(resnet18_variant_model(v) for v in VARIANTS)}
        tested = {n: args.levels if n in full else short for n in resnets}
        served = [serve_and_measure(workdir, "resnet18", archives, resnets, tested, photos, args)]
        loads.append(f"{os.getloadavg()[0]:.2f}")
        memory_models = ["efficientnet_lite0", *(f"head_{s}" for s in HEAD_SETS)]
        served.append(serve_and_measure(workdir, "backbone-and-heads", archives, memory_models,
                                        {"efficientnet_lite0": args.levels, f"head_{HEAD_SETS[0]}": args.levels},
                                        photos, args))
        loads.append(f"{os.getloadavg()[0]:.2f}")
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            offline["reference_end"] = pool.submit(reference_phase, options).result()
        report = build_report(args, offline, served, started, loads)
        (workdir / "bench_serving.json").write_text(json.dumps({"offline": offline, "served": served}, indent=1))
    if not args.no_doc:
        replace_section(args.doc, SECTION, report)
        logger.info("wrote section %r of %s", SECTION, args.doc)
    return report


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=str)
