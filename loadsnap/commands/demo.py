"""``loadsnap demo``: placeholder until the demo issue lands (publishes, reads, cleans up)."""

from __future__ import annotations

import argparse
import os

from loadsnap.schema import LoadSnapshot
from loadsnap.shm_reader import ShmReader
from loadsnap.shm_writer import ShmWriter


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser("demo", help="run a small deployment and show its load")
    parser.add_argument("--instance", default=f"demo-{os.getpid()}", help="instance name")
    parser.add_argument("--dp-size", type=int, default=4, help="number of DP ranks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Publish one snapshot per rank, read them back, print them, clean up."""
    writers = [ShmWriter(args.instance, args.dp_size, rank) for rank in range(args.dp_size)]
    try:
        for rank, writer in enumerate(writers):
            writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=rank, num_waiting_reqs=1))
        with ShmReader(args.instance) as reader:
            for read in reader.read_all():
                running = read.snapshot.num_running_reqs if read.snapshot else "-"
                print(f"rank {read.rank}: {read.status.label} running={running}")
    finally:
        for writer in writers:
            writer.close()
    return 0
