"""Scale-down under load: TorchServe's in-place scale-down versus manage.py's re-registration.

    python benchmarks/bench_lifecycle.py --archive archives/efficientnet_lite0_v1.0.mar --rounds 3

Starts its own TorchServe (free loopback ports, temporary model store), registers the archive with
one worker, and runs CLIENTS threads sending real photos to /predictions/NAME for the whole run.
Each round scales the default version 1 -> 2 workers and back to 1, once with ``--in-place``
(TorchServe's PUT min_worker/max_worker) and once with manage.py's lossless path (a new
registration with 1 worker takes the traffic, the old one is retired once drained). Prints, per
round and method, the requests in flight at some point of the scale-down and how many failed.
Exit codes: 0 done, 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.load import LoadClients, summarise
from imagerec import management as manage
from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.paths import DATASETS_DIR, DEFAULT_MODEL_STORE
from imagerec.torchserve import TorchServe

logger = logging.getLogger("bench_lifecycle")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_MODEL_STORE / "efficientnet_lite0_v1.0.mar",
                        help="model archive to serve (built by scripts/build_archive.py)")
    parser.add_argument("--photos", type=Path,
                        default=DATASETS_DIR / "hymenoptera" / "val",
                        help="folder tree of photos the clients send")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--rounds", type=int, default=3, help="scale-down rounds per method")
    parser.add_argument("--drain-seconds", type=float, default=manage.DRAIN_GRACE_S,
                        help="manage.py drain time before retiring the old registration")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.clients < 1 or args.rounds < 1:
        raise ValueError("--clients and --rounds must be at least 1")
    facts = manage.inspect_archive(args.archive)
    photos = [p.read_bytes() for p in sorted(args.photos.rglob("*.jp*g")) if p.stat().st_size <= 200_000][:48]
    if not photos:
        raise ValueError(f"no photos under {args.photos}")
    results, windows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        server = TorchServe(model_store=Path(tmp) / "store", workdir=Path(tmp) / "work")
        with server:
            client = manage.Client(server.management_url, server.key_file, server.model_store, server.inference_url,
                                   drain_seconds=args.drain_seconds)
            manage.register_archive(args.archive, management_url=server.management_url, key_file=server.key_file,
                                    model_store=server.model_store, workers=1)
            with LoadClients.for_model(server, facts.name, photos, clients=args.clients, max_seconds=3600) as load:
                time.sleep(3)
                for round_index in range(args.rounds):
                    for method in ("in-place", "re-register"):
                        manage.scale(client, facts.name, None, 2)
                        time.sleep(2)
                        start = time.monotonic()
                        outcome = manage.scale(client, facts.name, None, 1, in_place=(method == "in-place"))
                        end = time.monotonic()
                        logger.info("round %d %s: %.1fs, serving %s", round_index + 1, method, end - start,
                                    outcome["version"])
                        windows.append((round_index + 1, method, start, end, outcome["version"]))
                time.sleep(2)
            # Only now is every request answered (or failed) and recorded.
            total = summarise(load.records)
            for round_number, method, start, end, serving in windows:
                # Every request in flight at some point of the scale-down.
                during = summarise([r for r in load.records if r.sent <= end and r.sent + r.latency >= start])
                results.append({"round": round_number, "method": method, "seconds": round(end - start, 1),
                                "serving": serving, **during})
                logger.info("%s", results[-1])
    summary = {method: {"rounds": args.rounds,
                        "failed_requests": sum(r["failures"] for r in results if r["method"] == method),
                        "rounds_with_failures": sum(1 for r in results if r["method"] == method and r["failures"]),
                        "requests_during_scale_down": sum(r["requests"] for r in results if r["method"] == method)}
               for method in ("in-place", "re-register")}
    return {"clients": args.clients, "total": total, "by_method": summary, "rounds": results}


if __name__ == "__main__":
    # ManageError carries its own exit code.
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=json.dumps)
