"""Serving speed: TorchServe over HTTP against the raw model in-process, in one run.

    .venv/bin/python scripts/bench_serving.py            # full run (about 6-10 minutes on 2 cores)
    .venv/bin/python scripts/bench_serving.py --quick    # smoke run (about 3 minutes)

What it does, in order:
1. Offline, in a child process (so that no torch pages of this process are counted in the servers'
   proportional memory later): the in-process reference (fp32 eager resnet18: batch-1 latency of
   decode + preprocess + forward for real photos, batch-16 forward throughput), preprocessing costs,
   and the archives: resnet18 (self-made weights, as in tests/conftest.py) with its lever variants,
   efficientnet_lite0 and two prototype heads on it (clothing10, signdigits10). Then, with the
   workers' torch (scripts/bench_in_worker.py in .venv-serve): the forward costs behind the ceiling
   and the accuracy guard (ONNX runtimes and bf16 against fp32 eager on every val image of
   ../shared/datasets), for each variant of the served archives.
2. Served: one TorchServe with the resnet18 archives, then one with efficientnet_lite0 and the two
   heads (the memory target: backbone plus two heads, one worker each). Each model is loaded by
   1, 4 and 16 closed-loop clients sending real photos; throughput, p50/p95/p99 latency, CPU use of
   every process, and resident / proportional memory of the frontend and each worker.
3. A markdown report on stdout and in docs/BENCHMARKS.md (section "## Serving speed").

The load generator runs in this process and competes for the same cores: its CPU use is reported.
Exit codes: 0 done (targets met or not: the report says), 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlsplit

# Scripts run as files (python scripts/x.py): make the project root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# This process stays torch-free (torch is imported only in the offline child): proportional set size
# splits shared library pages among every process mapping them, so a torch-importing benchmark
# process would make the servers look smaller than they are.
import psutil  # noqa: E402

from handlers.constants import PRECISIONS  # noqa: E402
from handlers.machine import cpu_model  # noqa: E402
from scripts.bench_in_worker import (  # noqa: E402
    GUARD_MAX_PROB_CHANGE, GUARD_MIN_TOP1, REFERENCE_VARIANT, VARIANTS, median_time,
)
from scripts.ts_runtime import PROJECT_ROOT, TorchServe, auth_header, install_archive, serving_python  # noqa: E402

logger = logging.getLogger("bench_serving")

SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
DOC_PATH = PROJECT_ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Serving speed"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
HEAD_SETS = ("clothing10", "signdigits10")  # the two heads of the memory target; the first is load-tested
HEAD_SHOTS = 20  # training images per class for the benchmark's heads
RESNET18_SEED = 0  # the self-made resnet18 weights: torch.manual_seed(0), then the network's own init
RESNET18_WEIGHTS_FILE = "resnet18-selfmade.pth"
MEMORY_TARGET_MB = 1536
LEVER_DELAYS_MS = (0, 1, 5, 10)  # max batch delays tried against the default archive's
TARGET_THROUGHPUT_RATIO = 2.5
TARGET_LATENCY_RATIO = 0.7
EXIT_BAD_ARGUMENTS = 2
# Longer than the handler's IDLE_TRIM_S (it returns a batch's freed memory to the OS after that
# idle time); not imported from there because importing the handler module would import torch.
MEMORY_SETTLE_S = 4.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=SHARED_DATASETS,
                        help="ImageFolder sets with val/ splits (photos for the load and the guard)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where archives, servers and logs go (default: a fresh temporary directory)")
    parser.add_argument("--concurrency", type=str, default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--model-warmup", type=float, default=4.0,
                        help="unmeasured seconds of 4-client load on each model before its first measurement "
                             "(its worker and the Java frontend reach their steady speed)")
    parser.add_argument("--max-requests", type=int, default=20000,
                        help="upper bound on requests per client count (the loop is also bounded by time)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="precision of the served archives (default: scripts/build_archive.py's)")
    parser.add_argument("--compare-variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve resnet18 as the other precision (fp32, bf16)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="TorchServe batch size of the archives (default: handlers.archive.BatchingConfig's)")
    parser.add_argument("--max-batch-delay", type=int, default=None,
                        help="TorchServe max batch delay in ms (default: handlers.archive.BatchingConfig's)")
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


# ---------------------------------------------------------------------------------------------
# Photos


def val_photos(datasets: Path) -> list[Path]:
    """Every val image of every set, in a fixed order."""
    return sorted(p for p in datasets.glob("*/val/*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over the list (all of them when count is 0 or too big)."""
    if count <= 0 or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Offline phase (child process: torch, in-process timings, guard, archives)


def offline_phase(options: dict) -> dict:
    """Runs in a spawned child. Returns plain data: timings, guard, archive paths, batching."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from handlers.archive import BatchingConfig
    from scripts.build_archive import get_args_parser as build_parser

    workdir = Path(options["workdir"])
    defaults = build_parser().parse_args([])
    precision = options["precision"] or defaults.precision
    defaults.precision = precision
    batching = BatchingConfig(
        batch_size=options["batch_size"] or defaults.batch_size,
        max_batch_delay_ms=defaults.max_batch_delay if options["max_batch_delay"] is None else options["max_batch_delay"],
    )
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    photos = val_photos(Path(options["datasets"]))
    default_variant = precision
    result = {"variant": default_variant, "batching": vars(batching), "threads": threads, "photos": len(photos)}
    weights = make_resnet18_weights(workdir)
    result["reference"] = reference_timings(weights, photos, options["reference_reps"])
    result["costs"] = preprocessing_costs(photos, batching.batch_size)
    heads = fit_heads(Path(options["datasets"]))
    result["archives"] = build_bench_archives(workdir, weights, heads, default_variant, batching, options)
    result["worker"] = in_worker_measurements(workdir, result["archives"], photos, batching.batch_size, threads, options)
    return result


def resnet18_variant_model(variant: str) -> str:
    """The model name of the resnet18 archive served as ``variant`` (model names allow no '+')."""
    return f"resnet18_{variant.replace('+', '_')}"


def in_worker_measurements(workdir: Path, archives: dict, photos: list[Path], batch_size: int, threads: int,
                           options: dict) -> dict:
    """Forward costs and the accuracy guard with the workers' torch (scripts/bench_in_worker.py)."""
    import subprocess

    guard_photos = spread(photos, options["guard_images"])
    spec = {
        "threads": threads, "batch_size": batch_size, "reps": options["reference_reps"],
        "cost_photos": [str(p) for p in spread(photos, 64)],
        # Every variant is measured from the default archive of each backbone.
        "costs": {name: archives[name]["archive"] for name in ("resnet18", "efficientnet_lite0")},
        "guard": {
            "efficientnet_lite0": {"archive": archives["efficientnet_lite0"]["archive"],
                                   "photos": [str(p) for p in guard_photos]},
            **{f"head_{s}": {"archive": archives[f"head_{s}"]["archive"],
                             "photos": [str(p) for p in guard_photos if p.parts[-4] == s]} for s in HEAD_SETS},
            "resnet18": {"archive": archives["resnet18"]["archive"], "relative": True,
                         "photos": [str(p) for p in spread(photos, 64)]},
        },
    }
    spec_path, out_path = workdir / "in_worker_spec.json", workdir / "in_worker_result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [str(serving_python()), str(PROJECT_ROOT / "scripts" / "bench_in_worker.py"),
               "--spec", str(spec_path), "--out", str(out_path)]
    logger.info("forward costs and accuracy guard in the serving environment (%d guard images)", len(guard_photos))
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    return json.loads(out_path.read_text())


def reference_phase(options: dict) -> dict:
    """The reference again, after the served runs (spawned child): load may change during a run."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return reference_timings(Path(options["workdir"]) / RESNET18_WEIGHTS_FILE, val_photos(Path(options["datasets"])),
                             options["reference_reps"])


def make_resnet18_weights(workdir: Path) -> Path:
    import torch

    from handlers.backbones import get_backbone

    torch.manual_seed(RESNET18_SEED)
    network = get_backbone("resnet18").build_network()
    path = workdir / RESNET18_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return path


def reference_timings(weights: Path, photos: list[Path], reps: int) -> dict:
    """The issue's reference: fp32 eager resnet18, all cores, in this process."""
    import torch

    from handlers.backbones import get_backbone
    from handlers.imaging import ImagePreprocessor

    backbone = get_backbone("resnet18")
    network = backbone.load(weights)
    preprocessor = ImagePreprocessor(backbone.preprocessing)
    sample = [p.read_bytes() for p in spread(photos, max(reps, 16))]
    latencies = []
    with torch.inference_mode():
        for data in sample[:2]:  # warm-up: first calls allocate and pick kernels
            network(preprocessor(data).unsqueeze(0))
        for data in sample[:reps]:
            start = time.perf_counter()
            network(preprocessor(data).unsqueeze(0))
            latencies.append(time.perf_counter() - start)
        batch = torch.stack([preprocessor(data) for data in sample[:16]])
        forward16 = median_time(lambda: network(batch), max(3, reps // 4))
    return {
        "batch1_latency_ms": statistics.median(latencies) * 1e3,
        "batch16_throughput": 16 / forward16,
    }


def preprocessing_costs(photos: list[Path], batch_size: int) -> dict:
    """Per-image preprocessing costs behind the ceiling (Pillow and numpy: the same in both environments)."""
    import torch

    from handlers.backbones import get_backbone
    from handlers.imaging import ImagePreprocessor, decode_image

    costs = {}
    sample = [p.read_bytes() for p in spread(photos, 64)]
    preprocessor = ImagePreprocessor(get_backbone("resnet18").preprocessing)
    torch.set_num_threads(1)  # preprocessing runs on one core per image
    costs["preprocess_ms"] = median_time(lambda: [preprocessor(d) for d in sample], 3) / len(sample) * 1e3
    costs["decode_ms"] = median_time(lambda: [decode_image(d, 256) for d in sample], 3) / len(sample) * 1e3
    costs["large_photo"] = large_photo_timings(photos, preprocessor)
    torch.set_num_threads(os.cpu_count() or 1)
    costs["batch_preprocess"] = batch_preprocess_timings(preprocessor, sample, batch_size)
    return costs


def batch_preprocess_timings(preprocessor, sample: list[bytes], batch_size: int) -> dict:
    """The handler's preprocessing lever: a batch's images one by one (the old path) against geometry on
    one thread per core plus one normalisation of the whole batch (the handler now)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    batches = [sample[i:i + batch_size] for i in range(0, len(sample) - batch_size + 1, batch_size)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        threaded = median_time(lambda: [preprocessor.normalise(torch.stack(list(pool.map(preprocessor.geometry, b))))
                                         for b in batches], 3)
    serial = median_time(lambda: [torch.stack([preprocessor(d) for d in b]) for b in batches], 3)
    images = sum(len(b) for b in batches)
    return {"batch_size": batch_size, "serial_ms_per_image": serial / images * 1e3,
            "threaded_ms_per_image": threaded / images * 1e3}


def large_photo_timings(photos: list[Path], preprocessor) -> dict:
    """The JPEG draft lever on a big photo: the largest val JPEG scaled to 12 MP (phone size)."""
    import io

    from PIL import Image

    from handlers.imaging import decode_image, eval_transform

    transform = eval_transform(preprocessor.preprocessing)
    biggest = max((p for p in photos if p.suffix.lower() in (".jpg", ".jpeg")), key=lambda p: p.stat().st_size)
    with Image.open(biggest) as image:
        big = image.convert("RGB").resize((4000, 3000), Image.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    size = preprocessor.preprocessing.resize_size
    draft = median_time(lambda: transform(decode_image(data, min_side=size)), 5, 1)
    full = median_time(lambda: transform(decode_image(data)), 5, 1)
    return {"source": biggest.name, "bytes": len(data), "draft_ms": draft * 1e3, "full_ms": full * 1e3}


def fit_heads(datasets: Path) -> dict:
    """{set name: (prototype head fitted on fp32 efficientnet_lite0 features, class names)}."""
    import torch

    from handlers.backbones import get_backbone
    from handlers.heads import build_head
    from handlers.imaging import ImagePreprocessor
    from handlers.recognizer import Recognizer

    backbone = get_backbone("efficientnet_lite0")
    preprocessor = ImagePreprocessor(backbone.preprocessing)
    model = Recognizer(backbone.load(backbone.resolve_weights()), None, "fp32")
    heads = {}
    for set_name in HEAD_SETS:
        classes = sorted(d.name for d in (datasets / set_name / "train").iterdir() if d.is_dir())
        train = [(p, i) for i, c in enumerate(classes)
                 for p in sorted((datasets / set_name / "train" / c).iterdir())[:HEAD_SHOTS]]
        with torch.inference_mode():
            features = torch.cat([model.features(torch.stack([preprocessor(p.read_bytes()) for p, _ in train[i:i + 32]]))
                                  for i in range(0, len(train), 32)])
        head = build_head("prototype", backbone.feature_dim, len(classes))
        head.fit(features, torch.tensor([i for _, i in train]))
        heads[set_name] = (head.eval(), classes)
    return heads


def build_bench_archives(workdir: Path, weights: Path, heads: dict, default_variant: str, batching,
                         options: dict) -> dict:
    """{model name: {"archive", "backbone", "variant", "batching", "head"}}: what the servers load."""
    import dataclasses

    from handlers.archive import build_archive
    from handlers.backbones import get_backbone, imagenet_categories

    out = workdir / "archives"
    specs = {"resnet18": ("resnet18", default_variant, batching, None)}
    if options["compare_variants"]:
        for other in (v for v in VARIANTS if v != default_variant):
            specs[resnet18_variant_model(other)] = ("resnet18", other, batching, None)
    if options["levers"]:
        # Each lever changes one thing against the default archive.
        specs["resnet18_batch1"] = ("resnet18", default_variant, dataclasses.replace(batching, batch_size=1), None)
        specs["resnet18_batch16"] = ("resnet18", default_variant, dataclasses.replace(batching, batch_size=16), None)
        for delay in (d for d in LEVER_DELAYS_MS if d != batching.max_batch_delay_ms):
            specs[f"resnet18_delay{delay}"] = ("resnet18", default_variant,
                                               dataclasses.replace(batching, max_batch_delay_ms=delay), None)
        specs["resnet18_2x1threads"] = ("resnet18", default_variant, dataclasses.replace(batching, workers=2), None)
        # TorchServe's stock layout: one worker per core, each using every core.
        specs["resnet18_2x2threads"] = ("resnet18", default_variant,
                                        dataclasses.replace(batching, workers=2, torch_threads=2), None)
    specs["efficientnet_lite0"] = ("efficientnet_lite0", default_variant, batching, None)
    for set_name in HEAD_SETS:
        specs[f"head_{set_name}"] = ("efficientnet_lite0", default_variant, batching, set_name)
    archives = {}
    for name, (backbone_name, variant, config, head_set) in specs.items():
        backbone = get_backbone(backbone_name)
        head, labels = heads[head_set] if head_set else (None, imagenet_categories())
        path = build_archive(
            name=name, version="1.0", backbone_name=backbone_name,
            weights_path=weights if backbone_name == "resnet18" else backbone.resolve_weights(),
            labels=labels, out_dir=out, precision=variant.split("+")[0], head=head, batching=config,
            overwrite=True,
        )
        archives[name] = {"archive": str(path), "backbone": backbone_name, "variant": variant,
                          "batching": dataclasses.asdict(config), "head": head_set}
    return archives


# ---------------------------------------------------------------------------------------------
# Served phase (this process: load generator, CPU and memory of the server processes)


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


def load_test(server: TorchServe, model: str, photos: list[bytes], clients: int, args, roles: dict[str, int]) -> dict:
    """``clients`` closed-loop clients (one keep-alive connection each) PUT real photos for warm-up +
    duration seconds; figures cover the measured window only."""
    url = urlsplit(server.inference_url)
    headers = {"Content-Type": "application/octet-stream", **auth_header(server.keys["inference"])}
    path = f"/predictions/{model}"
    start = time.monotonic()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    records: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    budget = [args.max_requests]

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=args.request_timeout)
        position = index * len(photos) // clients
        try:
            while time.monotonic() < stop_at:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                data = photos[position % len(photos)]
                position += 1
                sent = time.monotonic()
                try:
                    connection.request("PUT", path, body=data, headers=headers)
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = 0
                    connection.close()
                    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=args.request_timeout)
                with lock:
                    records.append((sent, time.monotonic() - sent, status))
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    pids = {**roles, "load generator": os.getpid()}
    time.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_before, busy_before, t_before = cpu_seconds(pids), system_busy_seconds(), time.monotonic()
    time.sleep(max(0.0, stop_at - time.monotonic()))
    cpu_after, busy_after, t_after = cpu_seconds(pids), system_busy_seconds(), time.monotonic()
    for thread in threads:
        thread.join(timeout=args.request_timeout + 5)
    window = t_after - t_before
    # Requests answered inside the window (whenever sent): a closed loop's throughput is completions
    # per second; requiring the whole request inside a short window would drop the slow ones.
    measured = [(s, latency, status) for s, latency, status in records if measure_from <= s + latency <= stop_at]
    ok = sorted(latency for _, latency, status in measured if status == 200)
    cpu = {role: (cpu_after[role] - cpu_before[role]) / window for role in cpu_after if role in cpu_before}
    ours = sum(cpu.values())
    return {
        "model": model, "clients": clients, "requests": len(measured), "errors": len(measured) - len(ok),
        "throughput": len(ok) / window if window > 0 else 0.0,
        "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
        "cpu_cores": cpu, "cpu_cores_total": ours,
        "cpu_cores_others": max(0.0, (busy_after - busy_before) / window - ours),
    }


def percentile(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    index = min(len(sorted_seconds) - 1, max(0, round(q / 100 * len(sorted_seconds) + 0.5) - 1))
    return sorted_seconds[index] * 1e3


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
                            model, clients, run["throughput"], _fmt(run["p50_ms"]), run["errors"],
                            run["cpu_cores_total"], run["cpu_cores_others"])
                runs.append(run)
        busy = memory_of(roles)
        time.sleep(MEMORY_SETTLE_S)
        memory = {role: {**m, "busy_pss_mb": busy.get(role, {}).get("pss_mb")} for role, m in memory_of(roles).items()}
    return {"runs": runs, "memory": memory, "roles": roles}


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ceiling(costs: dict, forward: dict, threads: int) -> tuple[float, float]:
    """(images/s, single-request ms) one worker can reach: preprocessing spread over its threads, then
    the forward pass; nothing for HTTP, the frontend or the load generator."""
    per_image_ms = costs["preprocess_ms"] / threads + forward["forward_batch_ms_per_image"]
    return 1e3 / per_image_ms, costs["preprocess_ms"] + forward["forward1_ms"]


# What the levers above led to; kept in words (not figures) so that it stays true on a re-run.
NOTES = """### What was changed, and the rows behind it

- Backbone as a portable ONNX graph in the archive (imagerec/export.py exports it once per weights;
  handlers/runtime.py runs it with ONNX Runtime for fp32, OpenVINO for bf16 on AMX): replaced the
  AOTInductor packages, which were tied to the build machine's CPU and torch. Rows: the
  fp32+onnxruntime / fp32+openvino / bf16+openvino rows of the ceiling table; docs/bench/runtime.md
  has the side-by-side comparison.
- Serving environment with the CPU build of torch (.venv-serve, requirements-serve.txt): torch 2.14.1
  exists here only as a CUDA build, whose libraries cost each worker about 285 MB at import (`import
  torch`: 504 MB resident against 218 MB for 2.13.0+cpu, measured by hand), for nothing on a CPU
  worker. The workers use a torch-only ResNet-18 (handlers/resnet.py; tests compare it with
  torchvision's). This brought backbone + two heads from about 1.55 GB to the Memory table's figure.
- Java frontend with the quick JIT only (config.properties vmargs -XX:TieredStopAtLevel=1): with the
  full JIT, the first 16-client run after a start gave 88.7 img/s with the frontend at 0.22 cores, and
  later runs 98.2 img/s at 0.06 cores; with the quick JIT only, the first run gave 98.0 img/s at
  0.06 cores (resnet18 fp32+aoti, measured by hand). Each model also gets 4 s of unmeasured load
  before its first measured run (--model-warmup).
- Max batch delay 5 ms -> 1 ms (handlers/archive.BatchingConfig, build_archive default): a lone request
  waits the whole delay for company (delay rows, 1 client); 16-client throughput does not move. 0 ms is
  not an option: TorchServe 0.12 then answers a lone request after about 100 ms (delay0 row).
- Handler preprocessing: a batch's images are decoded and resized on one thread per core (Pillow drops
  the GIL) and normalised once per batch instead of per image (the in-process preprocessing line under
  Levers; tests/test_precision.py checks the tensors are identical to the per-image transform).
- Channels-last activations in fp32 (handlers/recognizer.py): same fp32 math, faster oneDNN
  convolutions for the eager backbone (resnet18 batch 8: 13.1 -> 8.2 ms/image in the previous run).
- No torchvision in the worker (handlers/imaging.py does resize + crop + normalise with Pillow and torch;
  tests/test_imaging.py compares it with torchvision): about 150 MB PSS less per worker.
- Idle memory trim: after 2 s without a batch each worker returns freed activation memory to the OS
  (malloc_trim); compare "PSS after load" with "PSS idle" for the worker that served the load.
- Kept: fp32 on ONNX Runtime where the CPU has no AMX (bf16 passes the task-accuracy guard but ran
  slower than fp32 with AVX-512 bf16 alone), batch size 8 (batch16 row), one worker with all cores as torch threads (2x1threads: more
  throughput, slower single requests, twice the memory; 2x2threads is TorchServe's stock layout and
  collapses from oversubscription), JPEG draft decoding (its gain is the 12 MP line).
- Measured by hand, no gain: TorchScript freeze (no faster than channels-last eager), TorchServe's
  async_logging and disable_system_metrics, OMP_WAIT_POLICY passive or active (all within noise).
- int8 (PT2E), tried by hand and dropped: PT2E now lives in torchao, and torchao 0.18 (the newest on
  PyPI) with the workers' torch 2.13 quantized nothing: its X86InductorQuantizer inserted no quantize
  op into efficientnet_lite0 and stopped on resnet18 ("Input partition has more than one output
  node"). bf16 already moves top-3 probabilities by up to 0.13, and int8 rounds harder, so int8 is
  unlikely to pass a 0.02 guard anyway. ONNX Runtime static quantisation: not yet measured.
"""


def build_report(args, offline: dict, served: list[dict], started: str, loads: list[str]) -> str:
    guard, costs, forward = offline["worker"]["guard"], offline["costs"], offline["worker"]["costs"]
    start, end = offline["reference"], offline.get("reference_end", offline["reference"])
    # Ratios against the faster of the two references (taken before and after the served runs): the
    # stricter comparison, and robust to other jobs slowing one of them down.
    reference = {"batch1_latency_ms": min(start["batch1_latency_ms"], end["batch1_latency_ms"]),
                 "batch16_throughput": max(start["batch16_throughput"], end["batch16_throughput"])}
    archives, threads = offline["archives"], offline["threads"]
    runs = {(r["model"], r["clients"]): r for part in served for r in part["runs"]}
    lines = [
        SECTION, "",
        f"Command: `{' '.join(['.venv/bin/python', 'scripts/bench_serving.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), no GPU; "
        f"Python {platform.python_version()}. Started {started}.  ",
        f"Load average (1 min) before / during / after: {' / '.join(loads)} (other engineers' jobs share "
        f"these cores; the 'others' column is CPU used by processes outside this benchmark).  ",
        f"Served archives: **{offline['variant']}** ({VARIANT_WORDS[offline['variant']]}), "
        f"batch size {offline['batching']['batch_size']}, "
        f"max batch delay {offline['batching']['max_batch_delay_ms']} ms, 1 worker with {threads} torch threads. "
        f"Photos: {offline['photos']} real val images of ../shared/datasets, sent as-is (PUT raw bytes).",
        "",
        "### Reference (in-process, fp32 eager resnet18, same run)", "",
        "| measure | before the served runs | after | used for the ratios (the faster) |", "|---|---|---|---|",
        f"| batch-1 latency: decode + preprocess a real photo + forward | {start['batch1_latency_ms']:.1f} ms | "
        f"{end['batch1_latency_ms']:.1f} ms | {reference['batch1_latency_ms']:.1f} ms |",
        f"| batch-16 throughput: forward only, 224x224 | {start['batch16_throughput']:.1f} img/s | "
        f"{end['batch16_throughput']:.1f} img/s | {reference['batch16_throughput']:.1f} img/s |",
        "",
        "### Served (TorchServe over HTTP)", "",
        "| model | variant | batch / delay / workers | clients | img/s | p50 ms | p95 ms | p99 ms | errors "
        "| CPU cores: workers / frontend / load gen / others |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part in served:
        for r in part["runs"]:
            a = archives[r["model"]]
            b = a["batching"]
            cpu = r["cpu_cores"]
            workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
            frontend = cpu.get("frontend", 0.0) + cpu.get("launcher", 0.0)
            lines.append(
                f"| {r['model']} | {a['variant']} | {b['batch_size']} / {b['max_batch_delay_ms']} ms / "
                f"{b['workers']}x{b['torch_threads'] or threads // b['workers']}t | {r['clients']} | "
                f"{r['throughput']:.1f} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
                f"{r['errors']} | {workers:.2f} / {frontend:.2f} / {cpu.get('load generator', 0.0):.2f} / "
                f"{r['cpu_cores_others']:.2f} |"
            )
    top = max(args.levels)
    single, many = runs.get(("resnet18", 1)), runs.get(("resnet18", top))
    lines += ["", "### Ratios (resnet18, this run)", ""]
    latency_ratio = throughput_ratio = None
    if single and single["p50_ms"]:
        latency_ratio = single["p50_ms"] / reference["batch1_latency_ms"]
        lines.append(f"- served 1-client p50 / reference batch-1 latency = {single['p50_ms']:.1f} / "
                     f"{reference['batch1_latency_ms']:.1f} = **{latency_ratio:.2f}** "
                     f"(target <= {TARGET_LATENCY_RATIO}: {'met' if latency_ratio <= TARGET_LATENCY_RATIO else 'missed'})")
    if many:
        throughput_ratio = many["throughput"] / reference["batch16_throughput"]
        lines.append(f"- served {top}-client throughput / reference batch-16 throughput = {many['throughput']:.1f} / "
                     f"{reference['batch16_throughput']:.1f} = **{throughput_ratio:.2f}** "
                     f"(target >= {TARGET_THROUGHPUT_RATIO}: {'met' if throughput_ratio >= TARGET_THROUGHPUT_RATIO else 'missed'})")
    for other in (v for v in VARIANTS if v != offline["variant"]):
        name = resnet18_variant_model(other)
        s, m = runs.get((name, 1)), runs.get((name, top))
        if s and m and s["p50_ms"]:
            lines.append(f"- same ratios if resnet18 were served as {other}: "
                         f"{s['p50_ms'] / reference['batch1_latency_ms']:.2f} "
                         f"and {m['throughput'] / reference['batch16_throughput']:.2f}")

    lines += lever_lines(archives, runs, offline, costs, top)
    lines += ["", f"### Memory (MB; PSS right after the load and after {MEMORY_SETTLE_S:.0f} s idle)", "",
              "| server | process | RSS idle | PSS after load | PSS idle |", "|---|---|---|---|---|"]
    for index, part in enumerate(served):
        busy = sum(m["busy_pss_mb"] or 0.0 for m in part["memory"].values())
        idle = sum(m["pss_mb"] or 0.0 for m in part["memory"].values())
        for role, m in part["memory"].items():
            lines.append(f"| {index + 1} | {role} | {m['rss_mb']:.0f} | {_fmt(m['busy_pss_mb'], 0)} | {_fmt(m['pss_mb'], 0)} |")
        lines.append(f"| {index + 1} | **all (launcher + frontend + workers)** | | **{busy:.0f}** | **{idle:.0f}** |")
    memory = served[-1]["memory"].values()
    busy = sum(m["busy_pss_mb"] or 0.0 for m in memory)
    idle = sum(m["pss_mb"] or 0.0 for m in memory)
    lines.append("")
    lines.append(f"Backbone plus two heads (server {len(served)}), one worker each: PSS {busy:.0f} MB right after "
                 f"the load, {idle:.0f} MB idle (target <= {MEMORY_TARGET_MB} MB: "
                 f"{'met' if max(busy, idle) <= MEMORY_TARGET_MB else 'met when idle' if idle <= MEMORY_TARGET_MB else 'missed'}).")

    lines += guard_lines(guard, offline)
    lines += ["", "### Ceiling (per-image costs measured in-process, this run; forward passes with the workers' "
              f"torch {offline['worker']['torch']})", "",
              f"- preprocessing (decode + resize + crop + normalise), one core: {costs['preprocess_ms']:.2f} ms/image "
              f"(decode alone {costs['decode_ms']:.2f} ms; the val photos are mostly about 400x500).",
              f"- JPEG draft decode on a 12 MP photo ({costs['large_photo']['bytes'] / 1e6:.1f} MB, made from "
              f"{costs['large_photo']['source']}): {costs['large_photo']['draft_ms']:.1f} ms with, "
              f"{costs['large_photo']['full_ms']:.1f} ms without.", "",
              f"| model | variant | forward b1 ms | forward ms/image at b{offline['batching']['batch_size']} "
              f"| worker ceiling img/s | served img/s ({top} clients) | served / ceiling |",
              "|---|---|---|---|---|---|---|"]
    for model, variants in forward.items():
        for variant, value in variants.items():
            name = next((n for n, a in archives.items() if a["backbone"] == model and a["variant"] == variant
                         and not a["head"] and a["batching"] == offline["batching"]), None)
            ceiling_rate, _ = ceiling(costs, value, threads)
            run = runs.get((name, top)) if name else None
            lines.append(f"| {model} | {variant} | {value['forward1_ms']:.1f} | {value['forward_batch_ms_per_image']:.2f} | "
                         f"{ceiling_rate:.0f} | {_fmt(run['throughput'] if run else None)} | "
                         f"{_fmt(run['throughput'] / ceiling_rate if run else None, 2)} |")
    lines += ["", "Worker ceiling = 1000 / (preprocess ms / cores + forward ms per image): one worker prepares a "
              "batch on all cores, then runs it on all cores; HTTP, the Java frontend and the load generator "
              "(this process) take their CPU from the same two cores (see the CPU column above).", "", NOTES]
    return "\n".join(lines)


VARIANT_WORDS = {
    "fp32": "fp32, eager backbone",
    "fp32+onnxruntime": "fp32, the archive's ONNX graph on ONNX Runtime",
    "fp32+openvino": "fp32, the archive's ONNX graph on OpenVINO",
    "bf16+openvino": "bf16, the archive's ONNX graph on OpenVINO",
    "bf16": "bf16 autocast, eager backbone",
}


def guard_lines(guard: dict, offline: dict) -> list[str]:
    """The accuracy guard table: every reduced-precision or compiled variant against fp32 eager."""
    others = [v for v in VARIANTS if v != REFERENCE_VARIANT]
    lines = ["", f"### Accuracy guard (each variant against {REFERENCE_VARIANT} eager, with the workers' torch)", "",
             f"Pass: top-1 agreement >= {GUARD_MIN_TOP1:.0%} and no top-3 probability changed by more than "
             f"{GUARD_MAX_PROB_CHANGE} (val images of all three sets for the ImageNet classifier; heads: prototype, "
             f"{HEAD_SHOTS} shots per class, on that set's val images).", "",
             "| model | variant | images | top-1 agreement | max top-3 change | images over 0.02 | verdict |",
             "|---|---|---|---|---|---|---|"]
    labels = {"efficientnet_lite0": "efficientnet_lite0 (ImageNet classifier)",
              **{f"head_{s}": f"prototype head {s} on efficientnet_lite0" for s in HEAD_SETS}}
    verdicts = {}
    for name, label in labels.items():
        for variant, g in guard[name].items():
            verdicts.setdefault(variant, []).append(g["passed"])
            lines.append(f"| {label} | {variant} | {g['images']} | {g['top1_agreement']:.2%} | "
                         f"{g['max_top3_change']:.4f} | {g['over_limit']} | {'pass' if g['passed'] else 'FAIL'} |")
    lines.append("")
    for variant, r18 in guard["resnet18"].items():
        lines.append(f"resnet18 {variant} (self-made weights, {r18['images']} images): largest logit change / logit "
                     f"spread = {r18['max_relative_logit_change']:.4f} (median {r18['median_relative_logit_change']:.4f}); "
                     f"top-1 agreement {r18['top1_agreement']:.0%} (meaningless with near-uniform logits).  ")
    for variant in others:
        if variant in verdicts:
            passed = all(verdicts[variant])
            lines.append(f"{variant}: {'passes' if passed else 'fails'} the guard"
                         f"{'' if passed else ', so it is not a default'}.  ")
    lines.append(f"Served default this run: {offline['variant']}.")
    return lines


def lever_lines(archives: dict, runs: dict, offline: dict, costs: dict, top: int) -> list[str]:
    """Each resnet18 variant against the default archive, at 1 and ``top`` clients, same server."""
    base1, base_top = runs.get(("resnet18", 1)), runs.get(("resnet18", top))
    if not base1 or not base_top:
        return []
    lines = ["", "### Levers (resnet18; each variant changes one thing against the default archive, same server)", "",
             f"| variant | 1-client p50 ms | vs default | {top}-client img/s | vs default |", "|---|---|---|---|---|"]
    for name in archives:
        one, many = runs.get((name, 1)), runs.get((name, top))
        if archives[name]["backbone"] != "resnet18" or not one or not many:
            continue
        a, b = archives[name], archives[name]["batching"]
        label = (f"{name}: {a['variant']}, batch {b['batch_size']}, delay {b['max_batch_delay_ms']} ms, "
                 f"{b['workers']} worker(s) x {b['torch_threads'] or offline['threads'] // b['workers']} threads")
        lines.append(f"| {label} | {_fmt(one['p50_ms'])} | {_fmt(_ratio(one['p50_ms'], base1['p50_ms']), 2)} | "
                     f"{many['throughput']:.1f} | {_fmt(_ratio(many['throughput'], base_top['throughput']), 2)} |")
    pre = costs["batch_preprocess"]
    lines += ["", f"Preprocessing a batch of {pre['batch_size']} in-process: one image after another "
              f"{pre['serial_ms_per_image']:.2f} ms/image, the handler's way (decode + resize on "
              f"{offline['threads']} threads, one normalisation per batch) {pre['threaded_ms_per_image']:.2f} ms/image."]
    return lines


def _ratio(a, b):
    return a / b if a is not None and b else None


def write_section(doc: Path, section: str) -> None:
    """Replace (or append) this benchmark's section, leaving every other section as it is."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    body = section.rstrip("\n") + "\n\n"
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")


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
        write_section(args.doc, report)
        logger.info("wrote section %r of %s", SECTION, args.doc)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(main(get_args_parser().parse_args()))
    except ValueError as exc:
        logger.error("%s", exc)
        sys.exit(EXIT_BAD_ARGUMENTS)
