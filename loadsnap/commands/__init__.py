"""CLI subcommands: every module here defines ``register(subparsers)``.

``loadsnap.cli`` discovers them, so adding a command is adding a module.
"""

from __future__ import annotations

import argparse

from loadsnap._segment import check_shm_dir
from loadsnap.errors import UsageError
from loadsnap.reading import DEFAULT_STALE_AFTER_S


def shm_dir_argument(value: str) -> str:
    """argparse ``type`` for ``--shm-dir``: an existing directory, never created."""
    try:
        check_shm_dir(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_reader_options(parser: argparse.ArgumentParser) -> None:
    """``--shm-dir`` and ``--stale-after``: how a reading command finds and judges the segment."""
    parser.add_argument(
        "--shm-dir",
        type=shm_dir_argument,
        default=None,
        help="directory holding the segment (default $LOADSNAP_SHM_DIR, else /dev/shm); must exist",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER_S,
        metavar="SECONDS",
        help=f"age after which a rank is stale (default {DEFAULT_STALE_AFTER_S})",
    )
