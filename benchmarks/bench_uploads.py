"""Upload storms: many concurrent photos of the documented maximum size (20 MB) against one model.

    .venv/bin/python -m benchmarks.bench_uploads                     # 3 rounds of 16 x 19 MB JPEG
    .venv/bin/python -m benchmarks.bench_uploads --format png        # 18 MB PNGs (no draft decoding)
    .venv/bin/python -m benchmarks.bench_uploads --set job_queue_size=256 --vmargs "-Xmx512m"  # compare settings

One TorchServe from the shipped config.properties (``--set``/``--vmargs`` replace properties, to
compare settings side by side) serving efficientnet_lite0 with one worker. Each round sends
``--clients`` simultaneous uploads of one large photo (made at run time from ../shared/samples,
never stored) while a small-photo client sends a small photo every ``--small-interval`` seconds.
Prints, per round: every answer's status (with Retry-After when present), the big uploads' and the
small client's latencies, the Java frontend's RSS/PSS peak and its RSS/PSS after the round, and
worker restarts (new worker pids). The load generator runs on the same cores.
Exit codes: 0 done (the report says whether the goal held), 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import collections
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from benchmarks.photos import DOCUMENTED_MAX_BYTES, large_jpeg, large_png
from handlers.machine import cpu_model
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import TorchServe, auth_header, install_archive, read_properties

logger = logging.getLogger("bench_uploads")

SAMPLES = PROJECT_ROOT.parent / "shared" / "samples"
MODEL = "efficientnet_lite0"
BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "build_archive.py"
EXIT_BAD_ARGUMENTS = 2
MIB = 1024 * 1024


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="storms, one after the other")
    parser.add_argument("--clients", type=int, default=16, help="simultaneous large uploads per round")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg",
                        help="jpeg: 5000x4000, about 19 MB; png: 4000x3000, about 18 MB")
    parser.add_argument("--max-bytes", type=int, default=DOCUMENTED_MAX_BYTES, help="upper bound of the photo's size")
    parser.add_argument("--small-interval", type=float, default=1.0, help="seconds between the small client's requests")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per HTTP request")
    parser.add_argument("--pause", type=float, default=5.0, help="idle seconds after each round before 'after' memory")
    parser.add_argument("--archive", type=Path, default=None,
                        help=f"an existing {MODEL} .mar (default: build one with scripts/build_archive.py)")
    parser.add_argument("--workdir", type=Path, default=None, help="archives, server and logs (default: a temp dir)")
    parser.add_argument("--overhead-requests", type=int, default=40,
                        help="after the rounds: small photos sent one at a time through the front and straight "
                             "to TorchServe, alternately, to measure the front's cost (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="replace a config.properties property for this run (repeatable)")
    parser.add_argument("--vmargs", type=str, default=None, help="replace config.properties vmargs for this run")
    parser.add_argument("--front", action=argparse.BooleanOptionalAction, default=True,
                        help="the admission front before TorchServe, as scripts/serve.py runs it (--no-front: "
                             "TorchServe alone, for comparison)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.clients < 1 or args.clients > 64:
        raise ValueError("--rounds must be >= 1 and --clients between 1 and 64")
    if args.small_interval <= 0 or args.request_timeout <= 0 or args.pause < 0:
        raise ValueError("--small-interval and --request-timeout must be positive, --pause >= 0")
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    if args.archive is not None and not args.archive.is_file():
        raise ValueError(f"no archive at {args.archive}")
    if not SAMPLES.is_dir():
        raise ValueError(f"sample photos missing: expected {SAMPLES}")


def build_model_archive(out_dir: Path) -> Path:
    """The default archive (compiled backbone), built by the shipped script in its own process:
    this process stays torch-free so that it does not distort the servers' proportional memory."""
    command = [sys.executable, str(BUILD_SCRIPT), "--backbone", MODEL, "--version", "1.0", "--out", str(out_dir)]
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    return out_dir / f"{MODEL}_v1.0.mar"


class MemorySampler:
    """Samples the Java frontend's RSS and PSS and the set of worker pids every ``interval`` s."""

    def __init__(self, server: TorchServe, interval: float = 0.25):
        self.server, self.interval = server, interval
        self.java = self._frontend()
        self.front = psutil.Process(server.front_process.pid) if server.front_process else None
        self.peak_rss = self.peak_pss = self.front_peak_rss = 0
        self.worker_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _frontend(self) -> psutil.Process:
        for child in psutil.Process(self.server.process.pid).children(recursive=True):
            if child.name() == "java":
                return child
        raise RuntimeError("no Java frontend among TorchServe's processes")

    def current(self) -> tuple[int, int]:
        info = self.java.memory_full_info()
        return info.rss, info.pss

    def _workers(self) -> set[int]:
        return {c.pid for c in self.java.children() if "model_service_worker" in " ".join(c.cmdline())}

    def _run(self):
        while not self._stop.is_set():
            try:
                rss, pss = self.current()
                self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
                if self.front is not None:
                    self.front_peak_rss = max(self.front_peak_rss, self.front.memory_info().rss)
                self.worker_pids |= self._workers()
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak_rss = self.peak_pss = 0
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def send(server: TorchServe, data: bytes, timeout: float) -> dict:
    start = time.monotonic()
    try:
        response = server.predict(MODEL, data, content_type="application/octet-stream", timeout=timeout)
        status, retry_after, text = response.status_code, response.headers.get("Retry-After"), response.text
    except requests.RequestException as exc:
        status, retry_after, text = type(exc).__name__, None, str(exc)
    return {"status": status, "retry_after": retry_after, "seconds": time.monotonic() - start,
            "message": text[:160].replace("\n", " ")}


def storm_round(server: TorchServe, big: bytes, small: bytes, args) -> dict:
    """``clients`` simultaneous big uploads plus a small client until they are all answered."""
    big_answers: list[dict] = []
    small_answers: list[dict] = []
    done = threading.Event()

    def big_client():
        big_answers.append(send(server, big, args.request_timeout))

    def small_client():
        deadline = time.monotonic() + args.request_timeout + 60  # bounded even if a storm hangs
        while not done.is_set() and time.monotonic() < deadline:
            small_answers.append(send(server, small, args.request_timeout))
            done.wait(args.small_interval)
        small_answers.append(send(server, small, args.request_timeout))  # one right after the storm

    before_pids = set(server.worker_pids(MODEL))
    threads = [threading.Thread(target=big_client) for _ in range(args.clients)]
    watcher = threading.Thread(target=small_client)
    with MemorySampler(server) as sampler:
        start = time.monotonic()
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        storm_seconds = time.monotonic() - start
        done.set()
        watcher.join()
        time.sleep(args.pause)
    after_rss, after_pss = sampler.current()
    after_pids = set(server.worker_pids(MODEL))
    return {
        "big": big_answers, "small": small_answers, "storm_seconds": storm_seconds,
        "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "after_rss": after_rss, "after_pss": after_pss,
        "restarts": len((sampler.worker_pids | after_pids) - before_pids), "front_peak_rss": sampler.front_peak_rss,
    }


def front_overhead(server: TorchServe, small: bytes, count: int, timeout: float) -> dict[str, float]:
    """Median latency of a small photo sent alone through the front and straight to TorchServe."""
    headers = {"Content-Type": "application/octet-stream", **auth_header(server.keys["inference"])}
    seconds = {"front": [], "direct": []}
    path = f"/predictions/{MODEL}"
    with requests.Session() as session:
        for _ in range(count):
            for name, base in (("front", server.inference_url), ("direct", server.upstream_url)):
                start = time.monotonic()
                response = session.put(base + path, data=small, headers=headers, timeout=timeout)
                if response.status_code == 200:
                    seconds[name].append(time.monotonic() - start)
    return {name: statistics.median(values) for name, values in seconds.items() if values}


def status_counts(answers: list[dict]) -> str:
    counts = collections.Counter(
        f"{a['status']}" + (f" (Retry-After {a['retry_after']})" if a["retry_after"] else "") for a in answers
    )
    return ", ".join(f"{count} x {status}" for status, count in sorted(counts.items()))


def latency_summary(answers: list[dict]) -> str:
    seconds = sorted(a["seconds"] for a in answers)
    if not seconds:
        return "-"
    return f"min {seconds[0]:.2f} s, median {statistics.median(seconds):.2f} s, max {seconds[-1]:.2f} s"


def megabytes(value: int) -> str:
    return f"{value / MIB:.0f} MB" if value else "-"


def report(args, properties: dict, photo: bytes, rounds: list[dict], baseline: tuple[int, int]) -> str:
    lines = [
        f"machine: {cpu_model()}, {psutil.cpu_count()} cores (shared with other work)",
        f"command: python -m benchmarks.bench_uploads {shlex.join(sys.argv[1:])}",
        f"photo: {args.format}, {len(photo) / 1e6:.1f} MB; {args.clients} clients x {args.rounds} rounds; "
        f"small client every {args.small_interval:g} s",
        f"admission front: {'on' if args.front else 'off'}; vmargs: {properties.get('vmargs')}",
        "settings: " + ", ".join(f"{key}={properties.get(key)}" for key in
                                 ("job_queue_size", "number_of_netty_threads", "netty_client_threads",
                                  "max_request_size")),
        f"frontend before: RSS {baseline[0] / MIB:.0f} MB, PSS {baseline[1] / MIB:.0f} MB",
        "",
        "| round | big uploads: answers | big latency | small client: answers | small latency | "
        "frontend RSS peak / after | PSS peak / after | admission front RSS peak | worker restarts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, result in enumerate(rounds, 1):
        lines.append(
            f"| {number} | {status_counts(result['big'])} | {latency_summary(result['big'])} | "
            f"{status_counts(result['small'])} | {latency_summary(result['small'])} | "
            f"{result['peak_rss'] / MIB:.0f} / {result['after_rss'] / MIB:.0f} MB | "
            f"{result['peak_pss'] / MIB:.0f} / {result['after_pss'] / MIB:.0f} MB | "
            f"{megabytes(result['front_peak_rss'])} | {result['restarts']} |"
        )
    messages = collections.Counter(
        (a["status"], a["message"][:100]) for r in rounds for a in r["big"] + r["small"] if a["status"] != 200
    )
    if messages:
        lines += ["", "non-200 answers:"]
        lines += [f"- {count} x {status}: {message}" for (status, message), count in messages.most_common()]
    ok = all(a["status"] == 200 or (a["status"] == 503 and a["retry_after"])
             for r in rounds for a in r["big"] + r["small"]) and not any(r["restarts"] for r in rounds)
    lines += ["", f"goal (every answer 200 or 503 with Retry-After, no worker restart): {'met' if ok else 'NOT met'}"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-uploads-"))
    workdir.mkdir(parents=True, exist_ok=True)
    archive = args.archive or build_model_archive(workdir / "built")
    make = large_jpeg if args.format == "jpeg" else large_png
    photo = make(SAMPLES / "grace_hopper.jpg", max_bytes=args.max_bytes)
    small = (SAMPLES / "grace_hopper.jpg").read_bytes()
    overrides = dict(item.split("=", 1) for item in args.overrides)
    if args.vmargs is not None:
        overrides["vmargs"] = args.vmargs
    store = workdir / "model-store"
    install_archive(archive, store)
    server = TorchServe(model_store=store, workdir=workdir / "server", models=f"{MODEL}={archive.name}",
                        overrides=overrides, front=args.front)
    with server:
        baseline = MemorySampler(server).current()
        rounds = []
        for number in range(args.rounds):
            logger.info("round %d of %d: %d x %.1f MB", number + 1, args.rounds, args.clients, len(photo) / 1e6)
            rounds.append(storm_round(server, photo, small, args))
            logger.info("round %d: big %s; small %s", number + 1, status_counts(rounds[-1]["big"]),
                        status_counts(rounds[-1]["small"]))
        text = report(args, read_properties(server.config_path), photo, rounds, baseline)
        if args.front and args.overhead_requests:
            medians = front_overhead(server, small, args.overhead_requests, args.request_timeout)
            text += (f"\nsmall photo alone, median of {args.overhead_requests}: through the front "
                     f"{medians.get('front', float('nan')) * 1000:.1f} ms, straight to TorchServe "
                     f"{medians.get('direct', float('nan')) * 1000:.1f} ms")
    print(text)
    logger.info("server logs: %s", server.log_dir)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    arguments = get_args_parser().parse_args()
    try:
        check_args(arguments)
    except ValueError as error:
        logger.error("%s", error)
        sys.exit(EXIT_BAD_ARGUMENTS)
    sys.exit(main(arguments))
