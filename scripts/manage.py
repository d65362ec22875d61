"""Model lifecycle from the command line: register, deploy, roll back, scale, retire.

    python scripts/manage.py list
    python scripts/manage.py describe bees_vs_ants
    python scripts/manage.py register archives/bees_vs_ants_v1.mar --workers 1
    python scripts/manage.py deploy /elsewhere/bees_vs_ants_v2.mar     # check, then switch the default
    python scripts/manage.py rollback bees_vs_ants                      # previous version is default again
    python scripts/manage.py scale bees_vs_ants --workers 2             # default version, wait until ready
    python scripts/manage.py retire bees_vs_ants 1                      # unregister a non-default version

The operations and their guarantees are in imagerec/management.py (docs/OPERATIONS.md walks through
them). Exit codes: 0 ok, 1 failed (e.g. timeout), 2 bad arguments or archive, 3 refused (by
TorchServe or by a lifecycle rule such as retiring the default), 4 TorchServe not reachable,
5 deploy check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.management import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    DEFAULT_MIN_ACCURACY,
    DEFAULT_MODEL_STORE,
    DRAIN_GRACE_S,
    Client,
    register_version,
    deploy,
    inspect_archive,
    overview,
    retire,
    rollback,
    scale,
)
from imagerec.naming import validate_name, validate_version

logger = logging.getLogger("manage")


def _check_image(value: str) -> tuple[str, bytes, str | None]:
    path, _, label = value.partition("=")
    try:
        return path, Path(path).read_bytes(), label or None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read check image {path}: {exc.strerror}") from None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--management", type=str, default=DEFAULT_MANAGEMENT_URL, help="management API URL")
    parser.add_argument("--inference", type=str, default=DEFAULT_INFERENCE_URL,
                        help="inference API URL (deploy checks, drain sentinels)")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE, help="TorchServe's model store")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for workers to load or a version to drain")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_GRACE_S,
                        help="after a version's queue is empty, wait this long before unregistering it "
                             "(covers a batch still running; its responseTimeout is the strict bound)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("list", help="models, versions, defaults and workers")
    describe = commands.add_parser("describe", help="one model's versions and workers")
    describe.add_argument("name", type=str, help="model name")

    register = commands.add_parser("register", help="load a version and wait until its workers are ready")
    register.add_argument("archive", type=Path, help=".mar file (copied into the model store if outside it)")
    register.add_argument("--workers", type=_positive, default=None, help="workers (default: the archive's)")
    register.add_argument("--batch-size", type=_positive, default=None, help="batch size (default: the archive's)")
    register.add_argument("--max-batch-delay", type=int, default=None,
                          help="ms to fill a batch (default: the archive's)")

    deploy_cmd = commands.add_parser("deploy", help="register, check, then make the new version the default")
    deploy_cmd.add_argument("archive", type=Path, help=".mar file (copied into the model store if outside it)")
    deploy_cmd.add_argument("--check-image", type=_check_image, action="append", default=[], metavar="FILE[=LABEL]",
                            help="image to send to the new version before switching (default: the archive's own)")
    deploy_cmd.add_argument("--min-accuracy", type=float, default=DEFAULT_MIN_ACCURACY,
                            help="share of labelled check images whose top-1 must match")
    deploy_cmd.add_argument("--no-check", action="store_true", help="switch without a check (not recommended)")
    deploy_cmd.add_argument("--keep", type=_positive, default=2,
                            help="versions kept loaded after the switch (default and previous first)")
    deploy_cmd.add_argument("--workers", type=_positive, default=None,
                            help="workers of the new version (default: as many as the serving version)")

    rollback_cmd = commands.add_parser("rollback", help="make the previous version the default again")
    rollback_cmd.add_argument("name", type=str, help="model name")
    rollback_cmd.add_argument("--to", type=str, default=None, help="a registered version (default: the next older)")

    scale_cmd = commands.add_parser("scale", help="change a version's workers and wait until they are ready")
    scale_cmd.add_argument("name", type=str, help="model name")
    scale_cmd.add_argument("version", type=str, nargs="?", default=None, help="version (default: the default)")
    scale_cmd.add_argument("--workers", type=_positive, required=True, help="number of workers")
    scale_cmd.add_argument("--in-place", action="store_true",
                           help="scale down with TorchServe directly (stops busy workers: loses requests)")

    retire_cmd = commands.add_parser("retire", help="unregister a version that is not the default")
    retire_cmd.add_argument("name", type=str, help="model name")
    retire_cmd.add_argument("version", type=str, help="version to unregister")
    return parser


def main(args: argparse.Namespace) -> object:
    # Names and versions end up in URLs and file names: refuse bad ones before any request.
    if getattr(args, "name", None) is not None:
        validate_name(args.name)
    for attr in ("version", "to"):
        if getattr(args, attr, None) is not None:
            validate_version(getattr(args, attr))
    if not 0.0 <= getattr(args, "min_accuracy", 0.0) <= 1.0:
        raise ValueError("--min-accuracy must be between 0 and 1")
    if args.drain_seconds < 0:
        raise ValueError("--drain-seconds cannot be negative")
    client = Client(args.management, args.key_file, args.model_store, args.inference, args.drain_seconds)
    if args.command == "list":
        return overview(client)
    if args.command == "describe":
        return overview(client, [args.name])[0]
    if args.command == "register":
        facts = inspect_archive(args.archive)
        register_version(client, facts, workers=args.workers, batch_size=args.batch_size,
                         max_batch_delay=args.max_batch_delay, timeout=args.timeout)
        return {"name": facts.name, "version": facts.version, "default": client.default_version(facts.name)}
    if args.command == "deploy":
        return deploy(client, args.archive, checks=args.check_image, skip_check=args.no_check,
                      min_accuracy=args.min_accuracy, keep=args.keep, workers=args.workers, timeout=args.timeout)
    if args.command == "rollback":
        return rollback(client, args.name, args.to)
    if args.command == "scale":
        return scale(client, args.name, args.version, args.workers, in_place=args.in_place, timeout=args.timeout)
    if args.command == "retire":
        return retire(client, args.name, args.version, timeout=args.timeout)
    raise ValueError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    # ManageError carries its own code; a bad name, version or option is a ValueError.
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=json.dumps)
