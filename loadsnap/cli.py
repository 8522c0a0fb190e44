"""The ``loadsnap`` command line: discovers subcommands in ``loadsnap.commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import loadsnap.commands
from loadsnap.errors import LoadsnapError, UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered subcommand."""
    parser = argparse.ArgumentParser(
        prog="loadsnap",
        description=(
            "Lock-free load telemetry for LLM-serving schedulers: publish each DP rank's load "
            "into shared memory (or over ZMQ), read it for dispatch, serve it over HTTP."
        ),
        epilog="Run `loadsnap COMMAND --help` for each command. Start with `loadsnap demo`.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(loadsnap.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"loadsnap.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loadsnap`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except LoadsnapError as exc:  # one line, no traceback: the message names what and where
        print(f"loadsnap {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
