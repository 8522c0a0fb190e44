"""CLI subcommands: every module here defines ``register(subparsers)``.

``loadsnap.cli`` discovers them, so adding a command is adding a module.
"""

from __future__ import annotations

import argparse

from loadsnap.reading import DEFAULT_STALE_AFTER_S


def add_reader_options(parser: argparse.ArgumentParser) -> None:
    """``--shm-dir`` and ``--stale-after``: how a reading command finds and judges the segment."""
    parser.add_argument("--shm-dir", default=None, help="segment directory (default /dev/shm)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER_S,
        metavar="SECONDS",
        help=f"age after which a rank is stale (default {DEFAULT_STALE_AFTER_S})",
    )
