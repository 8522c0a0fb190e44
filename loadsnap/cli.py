"""The ``loadsnap`` command line: the library's own commands plus those registered above it.

The library's commands (``top``, ``inspect``, ``serve``, ``collector``, ``keys``) are the
modules of ``loadsnap.commands``. Packages built on loadsnap add theirs through the
``loadsnap.commands`` entry-point group (``scheduler``, ``controller`` and ``demo`` come from
the reference scheduler and DP controller packages), so this package imports nothing built
above it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import cast

import loadsnap.commands
from loadsnap import __version__
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.flags import OneLineParser, exit_quietly_on_broken_pipe

__all__ = ["ENTRY_POINT_GROUP", "build_parser", "main"]

ENTRY_POINT_GROUP = "loadsnap.commands"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered subcommand."""
    parser = OneLineParser(
        prog="loadsnap",
        description=(
            "Lock-free load telemetry for LLM-serving schedulers: publish each DP rank's load "
            "into shared memory (or over ZMQ), read it for dispatch, serve it over HTTP."
        ),
        epilog="Run `loadsnap COMMAND --help` for each command. Start with `loadsnap demo`.",
    )
    parser.add_argument("--version", action="version", version=f"loadsnap {__version__}")
    # Sub-parsers are OneLineParsers too (argparse makes them of the parent's class).
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
    )
    for _, register in sorted(_registrars().items()):
        register(subparsers)
    return parser


Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> dict[str, Registrar]:
    """Every command's ``register`` function by command name: built-in, then entry points."""
    found: dict[str, Registrar] = {}
    for info in pkgutil.iter_modules(loadsnap.commands.__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"loadsnap.commands.{info.name}").register
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in found:  # a plug-in never replaces a built-in command
            found[entry.name] = entry.load()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loadsnap`` console script; returns the exit status."""
    try:
        parser = build_parser()
    except UsageError as exc:  # e.g. a bad LOADSNAP_* variable read for a default
        print(f"loadsnap: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()
    except LoadsnapError as exc:  # one line, no traceback: the message names what and where
        print(f"loadsnap {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except BrokenPipeError:  # the reader of our output went away (| head): not an error
        exit_quietly_on_broken_pipe()
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
