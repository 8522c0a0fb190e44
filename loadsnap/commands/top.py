"""``loadsnap top``: a live per-rank table of any running instance."""

from __future__ import annotations

import argparse
import sys
import time

from loadsnap import flags
from loadsnap.errors import SegmentUnavailableError
from loadsnap.shm_reader import ShmReader


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``top`` subcommand."""
    parser = subparsers.add_parser(
        "top",
        help="live per-rank table of a running instance (load, KV usage, throughput, age)",
        description=(
            "Attach read-only to an instance's segment and redraw a per-rank table: running "
            "and waiting requests with a load bar, KV-cache usage, generation throughput, "
            "snapshot age and status (fresh, stale, dead...). Never slows the schedulers."
        ),
        epilog="Example: loadsnap top --instance demo   (Ctrl-C to quit)",
    )
    flags.add_instance(parser)
    flags.add_reader_options(parser)
    parser.add_argument(
        "--interval-s",
        type=flags.positive_number,
        default=0.25,
        metavar="SECONDS",
        help="redraw period (default 0.25)",
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Draw the table until Ctrl-C (or once); exit status 1 when no segment is readable."""
    from rich.console import Console
    from rich.live import Live

    from loadsnap.exposition import render_table

    console = Console()
    title = f"loadsnap top: {args.instance}"
    with ShmReader(args.instance, shm_dir=args.shm_dir, stale_after_s=args.stale_after_s) as reader:
        if args.once:
            try:
                console.print(render_table(reader.read_all(), title))
            except SegmentUnavailableError as exc:
                print(f"loadsnap top: {exc}", file=sys.stderr)
                return 1
            return 0
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    try:
                        live.update(render_table(reader.read_all(), title), refresh=True)
                    except SegmentUnavailableError as exc:
                        live.update(f"{title}: waiting for the segment ({exc})", refresh=True)
                    time.sleep(args.interval_s)
        except KeyboardInterrupt:
            return 0
