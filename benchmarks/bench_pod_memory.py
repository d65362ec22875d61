"""Measure what one pod's processes hold in memory (PSS), for the Deployment's requests and limits.

    .venv/bin/python -m benchmarks.bench_pod_memory --model-store STORE --model-set SET.json \
        --photo ../shared/samples/coffee.png --requests 40

Starts TorchServe (empty) and the gateway (scripts/gateway.py) on free loopback ports, lets the
gateway prepare the model set, sends ``--requests`` photos to every model of the set through the
gateway, and prints one JSON line: PSS in MiB of the Java frontend, of each model's worker(s) and of
the gateway. PSS (proportional set size) splits shared pages among the processes sharing them, so
the figures add up to what the pod costs. Numbers: docs/bench/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from benchmarks.processes import pss_mb
from imagerec.cli import EXIT_FAILED, run_cli
from imagerec.model_set import read_model_set
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import TorchServe, free_port

MIB = 1024 * 1024
logger = logging.getLogger("bench_pod_memory")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, required=True, help="directory with the set's archives")
    parser.add_argument("--model-set", type=Path, required=True, help="model-set JSON (imagerec/model_set.py)")
    parser.add_argument("--photo", type=Path, default=Path("../shared/samples/coffee.png"), help="photo to send")
    parser.add_argument("--requests", type=int, default=40, help="requests per model before measuring")
    return parser


def pss_mib(pid: int) -> float:
    return round(pss_mb(pid), 1)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def main(args: argparse.Namespace) -> dict:
    model_set = read_model_set(args.model_set)
    photo = args.photo.read_bytes()
    with tempfile.TemporaryDirectory(prefix="pod-memory-") as tmp:
        work = Path(tmp)
        token = secrets.token_urlsafe(24)
        (work / "token").write_text(token + "\n")
        server = TorchServe(model_store=args.model_store, workdir=work / "ts")
        server.start()
        port = free_port()
        log = open(work / "gateway.log", "ab")
        gateway = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "scripts" / "gateway.py"), "--port", str(port),
             "--model-set", str(args.model_set), "--token-file", str(work / "token"),
             "--inference", server.inference_url, "--management", server.management_url,
             "--metrics", server.metrics_url, "--key-file", str(server.key_file),
             "--model-store", str(args.model_store)],
            stdout=log, stderr=subprocess.STDOUT)
        gateway_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while not _ready(gateway_url):
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError(f"gateway not ready; see {work / 'gateway.log'}")
                time.sleep(1)
            session = requests.Session()
            for entry in model_set.models:
                for _ in range(args.requests):
                    response = session.put(f"{gateway_url}/predictions/{entry.name}", data=photo, timeout=60,
                                           headers={"Authorization": f"Bearer {token}",
                                                    "Content-Type": "application/octet-stream"})
                    response.raise_for_status()
            time.sleep(3)  # the handler's idle trim hands a batch's peak back after 2 s
            frontend = next(p for p in psutil.Process(server.process.pid).children(recursive=True)
                            if p.name() == "java")
            result = {
                "frontend_java_mib": pss_mib(frontend.pid),
                "workers_mib": {entry.name: [pss_mib(pid) for pid in server.worker_pids(entry.name)]
                                for entry in model_set.models},
                "gateway_mib": pss_mib(gateway.pid),
                "requests_per_model": args.requests,
            }
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(60)
            log.close()
            server.stop()
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {RuntimeError: EXIT_FAILED, TimeoutError: EXIT_FAILED}, logger=logger,
            output=json.dumps)
