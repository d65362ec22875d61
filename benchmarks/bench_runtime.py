"""The backbone runtime, measured in one run: in-process peers, the served default, worker memory,
and the served ImageNet model's accuracy through HTTP.

    .venv/bin/python -m benchmarks.bench_runtime --out docs/bench/runtime.md

1. Archives (this environment, the build side): resnet18 with self-made weights (as
   tests/conftest.py; genuine ones cannot be downloaded here) and efficientnet_lite0 with the
   accuracy guard run on ``--imagenet`` (labelled ImageNet photos): both as built by default.
2. In-process peers, in the workers' environment (.venv-serve, this script's ``--peers`` mode):
   torch eager fp32 (channels-last) and bf16 (autocast), ONNX Runtime fp32, OpenVINO fp32 and bf16,
   all from the same archive files, per image at batch 1, 8 and 16, rounds interleaved so that load
   from other processes falls on every peer alike. Threads: the worker's (cores / workers).
3. Served: one TorchServe as deployed (the worker picks engine and precision) and one with
   ``IMAGEREC_BACKBONE_RUNTIME=openvino``, each with both archives: 1 and 16
   closed-loop clients per model (scripts/bench_serving.py's load generator), and each worker's
   proportional memory (PSS) idle after start and after the load (once its idle trim ran).
4. ImageNet Top-1 / Top-3 of the served efficientnet_lite0 on ``--imagenet`` through HTTP (answers
   carry the Top-3), and Top-5 in-process with the same graph and precision.

Exit codes: 0 done, 2 bad arguments, 1 failure. Prints the path of the report last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.load import add_load_test_arguments
from imagerec.paths import DATASETS_DIR, DOCS_DIR, PROJECT_ROOT

logger = logging.getLogger("bench_runtime")

PEERS = ("eager fp32", "eager bf16", "onnxruntime fp32", "openvino fp32", "openvino bf16")
# The served default's work without the serving path: photo bytes decoded and prepared on the
# handler's threads (its own code), then the forward pass. Served / this = what HTTP, TorchServe's
# frontend, batching and the worker protocol cost; the forward-only peers above leave decoding out.
END_TO_END = "onnxruntime fp32 from photo bytes"
BATCHES = (1, 8, 16)
# "default": the worker chooses (ONNX Runtime for fp32, OpenVINO for bf16 on AMX); it also answers
# the ImageNet photos. "openvino": every model on OpenVINO, its peer.
# Served variants: the default, and the environment switches of handlers/runtime.py.
SERVED_ENGINES = {"default": {}, "openvino": {"IMAGEREC_BACKBONE_RUNTIME": "openvino"}}
MEMORY_SETTLE_S = 4.0  # the handler trims freed memory after 2 s idle


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", type=Path, default=DATASETS_DIR / "imagenet-sample500",
                        help="labelled ImageNet photos (labels.tsv: file, class index, synset)")
    parser.add_argument("--workdir", type=Path, default=None, help="archives, servers, logs (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=DOCS_DIR / "bench" / "runtime.md",
                        help="markdown report")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the in-process peers")
    add_load_test_arguments(parser, max_requests=5000)
    parser.add_argument("--peers", type=Path, default=None, help=argparse.SUPPRESS)  # internal: spec for the child
    return parser


# ---------------------------------------------------------------------------------------------
# In-process peers (runs in .venv-serve: the workers' torch, OpenVINO and ONNX Runtime)


def load_peer(model_dir: Path, peer: str):
    """``peer``: "ENGINE PRECISION"."""
    from handlers.recognizer import load_recognizer

    engine, precision = peer.split()
    loaded = load_recognizer(model_dir, precision=precision, engine=engine)
    if loaded.recognizer.runtime != engine:
        raise RuntimeError(f"{peer}: the graph did not load")
    return loaded.recognizer


def peer_timings(spec: dict) -> dict:
    import numpy as np
    import torch

    from handlers.imaging import ImagePreprocessor
    from handlers.layout import read_archive_info
    from handlers.backbones import get_backbone

    torch.set_num_threads(spec["threads"])
    photos = [Path(p) for p in spec["photos"]]
    photo_bytes = [p.read_bytes() for p in photos[:max(BATCHES)]]
    decode_pool = ThreadPoolExecutor(max_workers=spec["threads"])  # as the handler's (recognition_handler.py)
    result = {}
    for name, model_dir in spec["models"].items():
        model_dir = Path(model_dir)
        preprocessor = ImagePreprocessor(get_backbone(read_archive_info(model_dir)["backbone"]).preprocessing)
        images = np.stack([preprocessor(data) for data in photo_bytes])
        peers = {peer: load_peer(model_dir, peer) for peer in PEERS}
        forward = peers["onnxruntime fp32"]
        peers[END_TO_END] = lambda batch, forward=forward, preprocessor=preprocessor: forward(
            np.stack(list(decode_pool.map(preprocessor, photo_bytes[:len(batch)]))))
        times = {peer: {batch: [] for batch in BATCHES} for peer in peers}
        for peer, recognizer in peers.items():  # warm-up: first calls allocate and pick kernels
            for batch in BATCHES:
                recognizer(images[:batch])
        for _ in range(spec["rounds"]):
            for peer, recognizer in peers.items():
                for batch in BATCHES:
                    # Let the previous peer's thread pool stop spinning (OpenMP, TBB) first: in
                    # a worker only one of them runs.
                    time.sleep(0.1)
                    reps = 4 if batch == 1 else 1
                    start = time.perf_counter()
                    for _ in range(reps):
                        recognizer(images[:batch])
                    times[peer][batch].append((time.perf_counter() - start) / reps / batch * 1e3)
        reference = peers["eager fp32"](images)
        differences = {peer: float(np.abs(recognizer(images) - reference).max()) for peer, recognizer in peers.items()}
        result[name] = {peer: {"ms_per_image": {str(b): statistics.median(times[peer][b]) for b in BATCHES},
                               "max_logit_difference": differences[peer]} for peer in peers}
        for peer in peers:
            logger.info("%s %s: %s ms/image (b1, b8, b16)", name, peer,
                        ", ".join(f"{result[name][peer]['ms_per_image'][str(b)]:.1f}" for b in BATCHES))
    return result


def imagenet_top5(model_dir: Path, photos: list[tuple[str, int]], threads: int) -> dict:
    """Top-1 and Top-5 in-process with what the worker chooses (graph, engine, precision)."""
    import numpy as np
    import torch

    from handlers.imaging import ImagePreprocessor
    from handlers.recognizer import load_recognizer

    torch.set_num_threads(threads)
    loaded = load_recognizer(model_dir)
    preprocessor = ImagePreprocessor(loaded.backbone.preprocessing)
    top1 = top5 = 0
    for start in range(0, len(photos), 16):
        chunk = photos[start:start + 16]
        logits = loaded.recognizer(np.stack([preprocessor(Path(p).read_bytes()) for p, _ in chunk]))
        labels = np.array([label for _, label in chunk])
        best = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(axis=1).sum())
    return {"images": len(photos), "top1": top1 / len(photos), "top5": top5 / len(photos),
            "precision": loaded.recognizer.precision, "runtime": loaded.recognizer.runtime}


def peers_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    out = {"peers": peer_timings(spec),
           "in_process_imagenet": imagenet_top5(Path(spec["models"]["efficientnet_lite0"]),
                                                [tuple(x) for x in spec["imagenet"]], spec["threads"])}
    Path(spec["out"]).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------
# Build side (this environment)


def labelled_photos(folder: Path) -> list[tuple[str, int]]:
    with open(folder / "labels.tsv", newline="") as f:
        return [(str(folder / row["file"]), int(row["index"])) for row in csv.DictReader(f, delimiter="\t")]


def build_archives(workdir: Path, imagenet: Path) -> dict:
    import torch

    from handlers.layout import extract_archive
    from imagerec.archive import BatchingConfig, build_archive
    from handlers.backbones import get_backbone, imagenet_categories
    from imagerec.export import exported_graph_dir
    from imagerec.precision_guard import guard_imagenet

    torch.manual_seed(0)  # self-made resnet18 weights, as tests/conftest.py makes them
    import torchvision

    weights = workdir / "resnet18-selfmade.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    efficientnet = get_backbone("efficientnet_lite0")
    efficientnet_weights = efficientnet.resolve_weights()
    started = time.perf_counter()
    guard = guard_imagenet(exported_graph_dir(efficientnet.name, efficientnet_weights), efficientnet.name,
                           efficientnet.load(efficientnet_weights).classifier, imagenet)
    guard_seconds = time.perf_counter() - started
    archives = {
        "resnet18": build_archive(name="resnet18", version="1.0", backbone_name="resnet18", weights_path=weights,
                                  labels=imagenet_categories(), out_dir=workdir / "archives", overwrite=True),
        "efficientnet_lite0": build_archive(name="efficientnet_lite0", version="1.0", backbone_name=efficientnet.name,
                                            weights_path=efficientnet_weights, labels=imagenet_categories(),
                                            out_dir=workdir / "archives", precision_guard=guard, overwrite=True),
    }
    unpacked = {name: str(extract_archive(path, workdir / "unpacked" / name)) for name, path in archives.items()}
    return {"archives": {k: str(v) for k, v in archives.items()}, "unpacked": unpacked, "guard": guard,
            "guard_seconds": guard_seconds, "threads": BatchingConfig().threads,
            "sizes_mb": {k: v.stat().st_size / 1e6 for k, v in archives.items()}}


# ---------------------------------------------------------------------------------------------
# Served side (TorchServe; this process only sends requests and reads /proc)


def served(workdir: Path, built: dict, engine: str, photos: list[bytes], imagenet: list[tuple[str, int]] | None,
           args) -> dict:
    from benchmarks.bench_serving import load_test
    from benchmarks.processes import memory_of, server_processes
    from imagerec.torchserve import TorchServe, install_archive

    store = workdir / f"store-{engine.replace(' ', '-')}"
    store.mkdir(parents=True, exist_ok=True)
    models = list(built["archives"])
    for path in built["archives"].values():
        install_archive(path, store)
    load_models = ",".join(f"{m}={Path(p).name}" for m, p in built["archives"].items())
    server = TorchServe(model_store=store, workdir=workdir / f"server-{engine.replace(' ', '-')}", models=load_models,
                        env=SERVED_ENGINES[engine])
    result = {"engine": engine, "runs": []}
    with server:
        roles = server_processes(server, models)
        time.sleep(MEMORY_SETTLE_S)
        result["memory_idle"] = memory_of(roles)
        log = (server.log_dir / "model_log.log").read_text()
        result["loaded_lines"] = [line.split("] ", 1)[-1] for line in log.splitlines() if "loaded " in line and "backbone" in line]
        for model in models:
            load_test(server, model, photos, 4, argparse.Namespace(**{**vars(args), "warmup": 0.0, "duration": 3.0}), roles)
            for clients in (1, 16):
                run = load_test(server, model, photos, clients, args, roles)
                logger.info("%s %s x%d: %.1f img/s, p50 %.1f ms", engine, model, clients, run["throughput"],
                            run["p50_ms"] or -1)
                result["runs"].append(run)
        if imagenet is not None:
            result["imagenet_http"] = http_accuracy(server, imagenet, args.request_timeout)
        time.sleep(MEMORY_SETTLE_S)
        result["memory_after"] = memory_of(roles)
    return result


def http_accuracy(server, photos: list[tuple[str, int]], timeout: float, model: str = "efficientnet_lite0") -> dict:
    """ImageNet Top-1 / Top-3 of the served ``model`` on (path, class index) photos, 4 clients."""
    import requests

    session = requests.Session()

    def ask(item):
        path, label = item
        response = server.predict(model, Path(path).read_bytes(), timeout=timeout, session=session)
        indices = [row["index"] for row in response.json()] if response.status_code == 200 else []
        return indices, label

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, photos))
    return {"images": len(photos), "errors": sum(1 for indices, _ in answers if not indices),
            "top1": sum(1 for indices, label in answers if indices[:1] == [label]) / len(photos),
            "top3": sum(1 for indices, label in answers if label in indices[:3]) / len(photos)}


# ---------------------------------------------------------------------------------------------
# Report


def cpu_description() -> tuple[str, str]:
    from handlers.machine import _cpuinfo, cpu_model

    return cpu_model(), _cpuinfo("flags") or ""


def judge_serving_path(built: dict, peers: dict, servers: list[dict]) -> list[str]:
    """The issue's serving-path targets per model (served default against the in-process peers), and
    the same ratios against the end-to-end peer, which does the served path's work minus serving."""
    lines = []
    default = next(s for s in servers if s["engine"] == "default")
    for name in built["archives"]:
        rows = peers["peers"][name]
        forward_only = {peer: row["ms_per_image"] for peer, row in rows.items()
                        if peer != END_TO_END and "fp32" in peer.split()}
        best16_peer = min(forward_only, key=lambda peer: forward_only[peer]["16"])
        best1_peer = min(forward_only, key=lambda peer: forward_only[peer]["1"])
        end_to_end = rows[END_TO_END]["ms_per_image"]
        one = next(r for r in default["runs"] if r["model"] == name and r["clients"] == 1)
        many = next(r for r in default["runs"] if r["model"] == name and r["clients"] == 16)
        best16 = 1000 / forward_only[best16_peer]["16"]
        ratio = many["throughput"] / best16
        limit = forward_only[best1_peer]["1"] + 3.0
        lines += [
            f"- {name}, 16 clients: served {many['throughput']:.1f} img/s against {best16:.0f} img/s for the best "
            f"fp32 peer at batch 16 ({best16_peer}, forward only): **{ratio:.2f}x** (target 0.9x: "
            f"{'met' if ratio >= 0.9 else 'missed'}). Against the same work in process from photo bytes "
            f"({END_TO_END}, batch 8 as served: {1000 / end_to_end['8']:.0f} img/s): "
            f"{many['throughput'] * end_to_end['8'] / 1000:.2f}x.",
            f"- {name}, 1 client: served p50 {one['p50_ms']:.1f} ms against the best batch-1 forward + 3 ms = "
            f"{limit:.1f} ms ({best1_peer} {forward_only[best1_peer]['1']:.1f} ms): "
            f"{'met' if one['p50_ms'] <= limit else 'missed'}. From photo bytes in process: {end_to_end['1']:.1f} ms, "
            f"so the serving path adds {one['p50_ms'] - end_to_end['1']:.1f} ms.",
        ]
    return lines


def report(args, built: dict, peers: dict, servers: list[dict], started: str, command: str) -> str:
    model, flags = cpu_description()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")]
    present = [f for f in wanted if f in flags.split()]
    absent = [f for f in wanted if f not in flags.split()]
    lines = [
        "# Backbone runtime: in-process peers, served default, worker memory, ImageNet accuracy",
        "",
        f"Measured {started} UTC with `{command}`, on {model} ({os.cpu_count()} cores, {platform.machine()}); "
        f"flags present: {', '.join(present)}; absent: {', '.join(absent) or 'none'}. Threads per worker: "
        f"{built['threads']}. Load average (1 min) at the start {args.load_at_start:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f} (this benchmark's own load included): other processes' load "
        "moves absolute figures; peers measured side by side in one run (interleaved rounds) share it.",
        "",
        "## In-process peers (workers' environment: torch 2.13 CPU, ONNX Runtime, OpenVINO)",
        "",
        "Median ms per image over interleaved rounds; `max diff` is the largest logit difference from eager fp32 "
        "on the same 16 real photos.",
        "",
        "| model | peer | batch 1 | batch 8 | batch 16 | img/s at 16 | max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in peers["peers"].items():
        for peer, row in rows.items():
            ms = row["ms_per_image"]
            lines.append(f"| {name} | {peer} | {ms['1']:.1f} | {ms['8']:.1f} | {ms['16']:.1f} | {1000 / ms['16']:.0f} | "
                         f"{row['max_logit_difference']:.1e} |")
    lines += ["", "## Served (TorchServe, one worker per model, batch size 8)", "",
              "| runtime | model | loaded as | 1 client p50 ms | 16 clients img/s | 16 clients p50 ms |", "|---|---|---|---|---|---|"]
    for server in servers:
        for name in built["archives"]:
            one = next(r for r in server["runs"] if r["model"] == name and r["clients"] == 1)
            many = next(r for r in server["runs"] if r["model"] == name and r["clients"] == 16)
            loaded = next((re.search(r"backbone \S+ \(([^)]*)\)", line).group(1) for line in server["loaded_lines"]
                           if f"loaded {name} " in line), "?")
            lines.append(f"| {server['engine']} | {name} | {loaded} | {one['p50_ms']:.1f} | {many['throughput']:.1f} | "
                         f"{many['p50_ms']:.1f} |")
    lines += ["", "## Targets of issue 13, judged on this run", ""] + judge_serving_path(built, peers, servers)
    lines += ["", "## Worker memory (PSS, MB: shared pages split among the processes mapping them)", "",
              "| runtime | process | idle after start | after the load |", "|---|---|---|---|"]
    for server in servers:
        for role, idle in server["memory_idle"].items():
            if role.startswith("worker"):
                after = server["memory_after"].get(role, {}).get("pss_mb")
                lines.append(f"| {server['engine']} | {role} | {idle['pss_mb']:.0f} | {after:.0f} |")
    http = next(s["imagenet_http"] for s in servers if "imagenet_http" in s)
    local = peers["in_process_imagenet"]
    guard = built["guard"].get("bf16", {})
    lines += ["", "## ImageNet accuracy of the served efficientnet_lite0 (imagenet-sample500)", "",
              f"- Through HTTP (default server): Top-1 {http['top1']:.3f}, Top-3 {http['top3']:.3f} "
              f"on {http['images']} photos ({http['errors']} errors; answers carry the Top-3).",
              f"- In-process, same archive as the worker loads it ({local['runtime']}, {local['precision']}): "
              f"Top-1 {local['top1']:.3f}, Top-5 {local['top5']:.3f}.",
              f"- Accuracy guard at build time ({built['guard_seconds']:.0f} s): {guard.get('reason', guard)}; "
              f"allowed: {guard.get('allowed')}.",
              "", "Archive sizes: " + ", ".join(f"{k} {v:.1f} MB" for k, v in built["sizes_mb"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> Path:
    from imagerec.torchserve import serving_python

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    args.load_at_start = os.getloadavg()[0]
    command = " ".join([".venv/bin/python", "benchmarks/bench_runtime.py", *sys.argv[1:]])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IMAGEREC_ONNX_CACHE", str(workdir / "onnx-cache"))  # cold: exports counted once
    built = build_archives(workdir, args.imagenet)
    imagenet = labelled_photos(args.imagenet)
    photo_paths = sorted(p for p in (PROJECT_ROOT.parent / "shared" / "datasets").glob("*/val/*/*")
                         if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[::7][:64]
    spec = {"models": built["unpacked"], "threads": built["threads"], "rounds": args.rounds,
            "photos": [str(p) for p in photo_paths], "imagenet": imagenet, "out": str(workdir / "peers.json")}
    (workdir / "peers_spec.json").write_text(json.dumps(spec))
    subprocess.run([str(serving_python()), str(Path(__file__).resolve()), "--peers", str(workdir / "peers_spec.json")],
                   check=True, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=1800)
    peers = json.loads((workdir / "peers.json").read_text())
    photos = [p.read_bytes() for p in photo_paths]
    servers = [served(workdir, built, engine, photos, imagenet if engine == "default" else None, args)
               for engine in SERVED_ENGINES]
    (workdir / "result.json").write_text(json.dumps({"built": built, "peers": peers, "servers": servers}, indent=1,
                                                    default=str))
    text = report(args, built, peers, servers, started, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arguments = get_args_parser().parse_args()
    if arguments.peers is not None:
        peers_main(arguments.peers)
        sys.exit(0)
    try:
        path = main(arguments)
    except ValueError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    print(path)
