"""Run the admission front before a TorchServe inference API (imagerec/front.py says why).

    python scripts/front.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8090

``scripts/serve.py`` (through ``TorchServe(front=True)``) starts it; run it by hand only to put it
before a TorchServe started otherwise. Exit codes: 0 stopped by a signal, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging

from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.front import MIB, FrontLimits, serve

logger = logging.getLogger("front")


def get_args_parser() -> argparse.ArgumentParser:
    defaults = FrontLimits()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=str, default="127.0.0.1:8080", help="HOST:PORT the front listens on")
    parser.add_argument("--upstream", type=str, required=True, help="TorchServe's inference URL")
    parser.add_argument("--inflight-mib", type=int, default=defaults.inflight_bytes // MIB,
                        help="request bytes in flight, in all (MiB); more is refused with 503 + Retry-After")
    parser.add_argument("--max-body", type=int, default=defaults.max_body_bytes,
                        help="largest request body in bytes (config.properties max_request_size)")
    parser.add_argument("--retry-after", type=int, default=defaults.retry_after_s,
                        help="seconds in the Retry-After header of a 503")
    return parser


def main(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or args.inflight_mib < 1 or args.max_body < 1 or args.retry_after < 0:
        raise ValueError("bad arguments: --listen HOST:PORT, positive --inflight-mib and --max-body")
    limits = FrontLimits(inflight_bytes=args.inflight_mib * MIB, max_body_bytes=args.max_body,
                         retry_after_s=args.retry_after)
    serve(host, int(port), args.upstream, limits)
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger)
