"""What the page adds on the way to TorchServe: recognising through its API against straight to TorchServe.

    .venv/bin/python -m benchmarks.bench_web                      # about 3 minutes on 2 cores
    .venv/bin/python -m benchmarks.bench_web --duration 5 --rounds 1   # smoke run

Starts one TorchServe (efficientnet_lite0, the offline ImageNet backbone, as shipped: its ONNX
graph on ONNX Runtime, one worker) and the page server (web/server.py) beside it, then for 1 and 8 closed-loop clients
(one keep-alive connection each, real photos) measures three paths, interleaved in rounds so that
other load on a shared machine falls on all of them alike:

- direct: PUT /predictions/MODEL to TorchServe (with the inference key);
- page (raw): PUT /api/recognise?mode=MODEL to the page server (as curl -T does);
- page (form): POST multipart/form-data with the photo in field ``photo`` (as the page's JavaScript does).

Reports throughput, p50 and p99 latency; the page's overhead is its p50 minus direct's, and its
throughput as a share of direct's. Targets: p50 overhead <= 3 ms, throughput >= 90% of direct.
Writes the figures as markdown to stdout and to --out.
Exit codes: 0 done (targets met or not: the report says), 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import requests

from benchmarks.load import LoadClients, percentile
from benchmarks.report import machine_description
from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.paths import DATASETS_DIR, DOCS_DIR, PROJECT_ROOT
from imagerec.torchserve import TorchServe, auth_header, free_port

logger = logging.getLogger("bench_web")

MODEL = "efficientnet_lite0"
TARGET_P50_OVERHEAD_MS = 3.0
TARGET_THROUGHPUT_SHARE = 0.90
PATHS = ("direct", "page (raw)", "page (form)")
INTERESTING_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per path, client count and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each measures every path once, in turn")
    parser.add_argument("--max-requests", type=int, default=20000, help="request cap per measurement (a bound)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    parser.add_argument("--photos", type=Path, default=DATASETS_DIR / "imagenet-sample500",
                        help="folder of photos sent in turn (searched recursively; the first 32)")
    parser.add_argument("--out", type=Path, default=DOCS_DIR / "bench" / "web.md",
                        help="markdown report written here")
    return parser


def load_photos(folder: Path, count: int = 32) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
    if not files:
        raise ValueError(f"no photos in {folder}")
    return [p.read_bytes() for p in files]


def multipart(photo: bytes) -> tuple[bytes, dict[str, str]]:
    """The photo as the page's JavaScript sends it: a form with the file in field ``photo``."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"photo.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def measure(base_url: str, path: str, method: str, headers: dict, photos: list[bytes], encode, clients: int,
            args) -> dict:
    """``clients`` closed-loop clients (benchmarks/load.py) for warmup + duration seconds; figures
    cover the measured window."""
    start = time.monotonic()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    with LoadClients(base_url, path, photos, clients=clients, max_seconds=args.warmup + args.duration,
                     max_requests=args.max_requests, timeout=args.request_timeout, method=method,
                     headers=headers, encode=encode) as load:
        time.sleep(max(0.0, stop_at - time.monotonic()))
    measured = [r for r in load.records if measure_from <= r.sent + r.latency <= stop_at]
    return {"latencies": [r.latency * 1e3 for r in measured if r.status == 200], "handled": len(load.records),
            "errors": sum(1 for r in measured if r.status != 200), "window": args.duration}


def build_archive(out: Path) -> Path:
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "build_archive.py"), "--backbone", MODEL,
               "--version", "1.0", "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out / f"{MODEL}_v1.0.mar"


def start_page(server: TorchServe, runtime: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "web.server", "--port", str(port), "--inference", server.inference_url,
               "--management", server.management_url, "--key-file", str(server.key_file),
               "--model-store", str(server.model_store), "--runtime-dir", str(runtime)]
    log = open(runtime.parent / "page.log", "ab")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the page server exited with {process.returncode}")
        try:
            if requests.get(url + "/api/status", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the page server did not answer within 60 s")


def summarise(latencies: list[float], errors: int, seconds: float) -> dict:
    return {"requests": len(latencies), "errors": errors, "throughput": len(latencies) / seconds if seconds else 0.0,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def _ms(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(args, results: dict, started: str) -> str:
    command = ".venv/bin/python -m benchmarks.bench_web " + " ".join(sys.argv[1:])
    lines = [
        "# The page's overhead on recognising (benchmarks/bench_web.py)", "",
        f"Run {started} UTC: `{command.strip()}`", "",
        f"Machine: {machine_description()}. "
        "Other processes' load (the load average above) falls on every path alike: the paths were measured "
        "interleaved, round by round, so the ratios between them are what count.", "",
        f"Setup: one TorchServe serving `{MODEL}` (ONNX graph on ONNX Runtime, 1 worker, batch size 8, the shipped archive "
        "settings), the page server beside it (aiohttp, one pooled keep-alive session to TorchServe). "
        f"Closed-loop clients on keep-alive connections, {args.rounds} round(s) x {args.duration:.0f} s per path "
        f"and client count after {args.warmup:.0f} s warm-up; 32 real photos "
        f"(`{args.photos.name}`) sent in turn.", "",
        "| clients | path | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | p50 overhead (ms) | throughput vs direct | page server CPU per request (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for clients, by_path in results.items():
        direct = by_path["direct"]
        rounds = [x for x in direct["round_p50_ms"] if x is not None]
        # How much direct's own p50 moved between rounds: an overhead smaller than that is not seen.
        direct["noise_ms"] = max(rounds) - min(rounds) if len(rounds) > 1 else None
        for path, row in by_path.items():
            overhead = share = ""
            if path != "direct" and row["p50_ms"] is not None and direct["p50_ms"] is not None:
                overhead_value = row["p50_ms"] - direct["p50_ms"]
                share_value = row["throughput"] / direct["throughput"] if direct["throughput"] else 0.0
                overhead, share = f"{overhead_value:+.1f}", f"{share_value:.0%}"
                verdicts.append((clients, path, overhead_value, share_value))
            lines.append(f"| {clients} | {path} | {row['requests']} | {row['errors']} | {row['throughput']:.1f} | "
                         f"{_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {overhead} | {share} | "
                         f"{_ms(row['page_cpu_ms'], 2) if path != 'direct' else ''} |")
    lines += ["", f"Targets: p50 overhead <= {TARGET_P50_OVERHEAD_MS:.0f} ms, throughput >= "
                  f"{TARGET_THROUGHPUT_SHARE:.0%} of direct."]
    for clients, path, overhead, share in verdicts:
        noise = results[clients]["direct"].get("noise_ms")
        if noise is not None and noise > TARGET_P50_OVERHEAD_MS:
            verdict = (f"not measurable in this run: direct's own p50 moved by {noise:.0f} ms between rounds, "
                       f"far more than the {TARGET_P50_OVERHEAD_MS:.0f} ms to be judged")
        else:
            met = overhead <= TARGET_P50_OVERHEAD_MS and share >= TARGET_THROUGHPUT_SHARE
            verdict = "met" if met else "NOT met"
        lines.append(f"- {clients} client(s), {path}: {verdict} "
                     f"(overhead {overhead:+.1f} ms, {share:.0%} of direct throughput)")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.rounds < 1 or min(args.clients) < 1:
        raise ValueError("--duration, --rounds and --clients must be positive")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    photos = load_photos(args.photos)
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        root = Path(tmp)
        archive = build_archive(root / "store")
        server = TorchServe(model_store=root / "store", workdir=root / "work", models=f"{MODEL}={archive.name}")
        server.start()
        page = None
        try:
            page, page_url = start_page(server, root / "page")
            key = auth_header(server.keys["inference"])
            targets = {  # base URL, path, method, extra headers, encoding of each photo
                "direct": (server.inference_url, f"/predictions/{MODEL}", "PUT", key, None),
                "page (raw)": (page_url, f"/api/recognise?mode={MODEL}", "PUT", {}, None),
                "page (form)": (page_url, f"/api/recognise?mode={MODEL}", "POST", {}, multipart),
            }
            collected = {c: {p: {"latencies": [], "errors": 0, "seconds": 0.0, "page_cpu_s": 0.0, "handled": 0}
                             for p in PATHS} for c in args.clients}
            page_process = psutil.Process(page.pid)
            for round_index in range(args.rounds):
                for clients in args.clients:
                    order = PATHS if round_index % 2 == 0 else tuple(reversed(PATHS))
                    for path in order:
                        base, url_path, method, headers, encode = targets[path]
                        cpu_before = sum(page_process.cpu_times()[:2])
                        outcome = measure(base, url_path, method, headers, photos, encode, clients, args)
                        page_cpu = sum(page_process.cpu_times()[:2]) - cpu_before
                        into = collected[clients][path]
                        into["latencies"] += outcome["latencies"]
                        into["errors"] += outcome["errors"]
                        into["seconds"] += outcome["window"]
                        into["page_cpu_s"] += page_cpu
                        into.setdefault("round_p50_ms", []).append(percentile(outcome["latencies"], 50))
                        into["handled"] += outcome["handled"]
                        logger.info("round %d, %d client(s), %s: %d ok, %d errors", round_index + 1, clients, path,
                                    len(outcome["latencies"]), outcome["errors"])
            results = {c: {p: {**summarise(v["latencies"], v["errors"], v["seconds"]),
                               # The page process's own CPU (user + system) per request it handled,
                               # warm-up included: what the page costs, whatever else loads the machine.
                               "page_cpu_ms": 1e3 * v["page_cpu_s"] / v["handled"] if v["handled"] else None,
                               "round_p50_ms": v.get("round_p50_ms", [])}
                           for p, v in by.items()} for c, by in collected.items()}
        finally:
            if page is not None:
                page.terminate()
                page.wait(15)
            server.stop()
    text = report(args, results, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=str)
