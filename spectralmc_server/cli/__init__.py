"""The ``spectralmc`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 an unexpected failure, 3 ``train --store`` whose last due commit the quality gate
refused (nothing unqualified is committed without ``--allow-unqualified``),
130 interrupted (training writes its checkpoint first).

One module per subcommand (train, serve, price, calibrate, store), each with its
``add_parser`` and ``run``; common.py holds what they share.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from spectralmc_server import __version__
from spectralmc_server.cli import calibrate, price, serve, store, train
from spectralmc_server.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    UsageError,
)
from spectralmc_server.store.objects import CorruptObjectError

__all__ = ["build_parser", "main"]

# in the order `spectralmc --help` lists them
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": train.run,
    "serve": serve.run,
    "price": price.run,
    "calibrate": calibrate.run,
    "store": store.run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spectralmc", description="SpectralMC pricing service and tools.")
    parser.add_argument("--version", action="version", version=f"spectralmc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_parser in (train.add_parser, serve.add_parser, price.add_parser, calibrate.add_parser, store.add_parser):
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.cmdline = "spectralmc " + " ".join(shlex.quote(a) for a in argv)
        args.argv = argv
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptObjectError as exc:
        print(f"corrupt: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an environment failure: one line, unless debugging
        if os.environ.get("SPECTRALMC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set SPECTRALMC_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILURE
