"""Run the authenticating gateway in front of one TorchServe (one pod): see imagerec/gateway.py.

    python scripts/gateway.py --model-set deploy/base/model-set.json --token-file /run/secrets/imagerec/token \
        --key-file runtime/key_file.json --model-store archives --port 8090

At start it brings TorchServe to the model set (registers, checks, makes default), then answers
/ready. Clients send ``Authorization: Bearer <client token>`` to /predictions/NAME[/VERSION].
SIGTERM drains: unready at once, requests served for --shutdown-delay s, in-flight ones finished.
Exit codes: 0 stopped by a signal, 2 bad arguments (unreadable model set, no token).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.gateway import TOKEN_ENV_VAR, ClientTokens, Gateway, serve
from imagerec.management import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    DEFAULT_MODEL_STORE,
    Client,
)
from imagerec.model_set import prepare, read_model_set
from imagerec.paths import SHIPPED_CONFIG
from imagerec.torchserve import read_properties

logger = logging.getLogger("gateway")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on (0.0.0.0 in a pod: the gateway is its only exposed port)")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on")
    parser.add_argument("--model-set", type=Path, required=True, help="model-set JSON file (imagerec/model_set.py)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help=f"file of client tokens, one per line (a mounted Secret); else ${TOKEN_ENV_VAR}")
    parser.add_argument("--inference", type=str, default=DEFAULT_INFERENCE_URL, help="TorchServe inference URL")
    parser.add_argument("--management", type=str, default=DEFAULT_MANAGEMENT_URL, help="TorchServe management URL")
    parser.add_argument("--metrics", type=str, default=read_properties(SHIPPED_CONFIG)["metrics_address"],
                        help="TorchServe metrics URL")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE, help="TorchServe's model store")
    parser.add_argument("--prepare-timeout", type=float, default=300.0,
                        help="seconds for one model's workers to load during preparation")
    parser.add_argument("--shutdown-delay", type=float, default=5.0,
                        help="after SIGTERM: seconds to keep serving while unready (load balancers notice)")
    parser.add_argument("--shutdown-timeout", type=float, default=150.0,
                        help="after the port closes: seconds at most to finish in-flight requests")
    return parser


def main(args: argparse.Namespace) -> int:
    model_set = read_model_set(args.model_set)
    tokens = ClientTokens(args.token_file, os.environ.get(TOKEN_ENV_VAR))
    client = Client(args.management, args.key_file, args.model_store, args.inference)
    gateway = Gateway(
        inference_url=args.inference, management_url=args.management, metrics_url=args.metrics,
        key_file=args.key_file, tokens=tokens, model_set=model_set,
        prepare=lambda: prepare(client, model_set, timeout=args.prepare_timeout),
        shutdown_delay=args.shutdown_delay,
    )
    asyncio.run(serve(gateway, args.host, args.port, args.shutdown_timeout))
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger)
