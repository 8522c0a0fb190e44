"""``loadsnap scheduler``: run one reference scheduler (same flags as ``python -m scheduler``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``scheduler`` subcommand."""
    from scheduler.cli import DESCRIPTION, add_arguments, run

    parser = subparsers.add_parser(
        "scheduler",
        help="run a reference continuous-batching scheduler for one DP rank",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
