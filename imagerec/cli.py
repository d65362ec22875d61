"""What every command-line entry point shares: logging set-up, and exceptions mapped to exit codes.

Each CLI states its own table (``{exception type: exit code}``, most specific first) and calls
``run_cli``; the error's message is logged, never a traceback, and the process exits with the code.
An exception that carries an ``exit_code`` attribute (``imagerec.management.ManageError``) exits with
that code. Codes every CLI shares: 0 done, 1 failed otherwise, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENTS = 2
# The commands that build archives (build_archive.py, train_head.py, serve.py): no backbone weights.
# (The lifecycle tools use 3 and up for their own outcomes: imagerec.management.)
EXIT_NO_WEIGHTS = 3

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def exit_code_for(error: BaseException, errors: Mapping[type[BaseException], int]) -> int | None:
    """The code ``error`` maps to: its own ``exit_code``, else the first matching type, else None."""
    own = getattr(error, "exit_code", None)
    if isinstance(own, int):
        return own
    for kind, code in errors.items():
        if isinstance(error, kind):
            return code
    return None


def run_command(main: Callable[[argparse.Namespace], object], args: argparse.Namespace,
                errors: Mapping[type[BaseException], int], *, logger: logging.Logger,
                output: Callable[[object], str | None] | None = None) -> int:
    """Run ``main(args)`` and return the exit code: 0 with ``output(result)`` printed as the one
    machine-readable stdout line (or, without ``output``, the int ``main`` returned), or the mapped
    code with the error logged. Exceptions not in the table propagate (a bug: the traceback is what
    a developer needs)."""
    try:
        result = main(args)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - mapped below, or re-raised
        code = exit_code_for(error, errors)
        if code is None:
            raise
        logger.error("%s", error)
        return code
    if output is None:
        return result if isinstance(result, int) else EXIT_OK
    line = output(result)
    if line is not None:
        print(line)
    return EXIT_OK


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            errors: Mapping[type[BaseException], int], *, logger: logging.Logger,
            output: Callable[[object], str | None] | None = None) -> None:
    """The ``__main__`` of an entry point: set up logging, parse ``sys.argv``, run, exit with the code."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(run_command(main, parser.parse_args(), errors, logger=logger, output=output))
