"""``loadsnap controller``: run the DP controller (same flags as ``python -m dp_controller``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``controller`` subcommand."""
    from dp_controller.cli import add_arguments, run

    parser = subparsers.add_parser(
        "controller",
        help="dispatch a seeded workload to DP schedulers with the load budget and report",
        description=(
            "DP controller: picks a rank per request from reported load plus unacknowledged "
            "dispatches, and fans control commands out to every scheduler."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
