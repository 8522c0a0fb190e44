"""``loadsnap inspect``: segment header, slot states, ages and writers, for diagnosis."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loadsnap.shm_reader import SegmentUnavailableError, ShmReader


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a segment's header and every slot's state, age and writer",
        description="Diagnose an instance: segment header, then one line per DP rank.",
    )
    parser.add_argument("--instance", default="demo", help="deployment instance name")
    parser.add_argument("--shm-dir", default=None, help="segment directory (default /dev/shm)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def collect(instance: str, shm_dir: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict.

    Raises
    ------
    SegmentUnavailableError
        No readable segment.
    """
    with ShmReader(instance, shm_dir=shm_dir) as reader:
        header = reader.segment.header
        slots = [
            {
                "dp_rank": read.rank,
                "status": read.status.label,
                "age_seconds": read.age_s,
                "seq": read.seq,
                "epoch": read.epoch,
                "writer_pid": read.writer_pid,
                "reason": read.reason,
            }
            for read in reader.read_all()
        ]
        return {
            "segment": reader.segment_path,
            "layout_version": f"{header.layout_major}.{header.layout_minor}",
            "dp_size": header.dp_size,
            "slot_size": header.slot_size,
            "payload_capacity": header.payload_capacity,
            "creator_pid": header.creator_pid,
            "creator_uid": header.creator_uid,
            "created_wall_ns": header.created_wall_ns,
            "slots": slots,
        }


def run(args: argparse.Namespace) -> int:
    """Print the inspection; exit status 1 when no segment is readable."""
    try:
        info = collect(args.instance, args.shm_dir)
    except SegmentUnavailableError as exc:
        print(f"loadsnap inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"segment {info['segment']}  layout {info['layout_version']}  dp_size {info['dp_size']}  "
        f"slot {info['slot_size']} B  creator pid {info['creator_pid']}"
    )
    print(
        f"{'rank':>4}  {'status':<16} {'age_s':>8}  {'seq':>10}  {'epoch':>5}  {'pid':>7}  reason"
    )
    for slot in info["slots"]:
        age = "-" if slot["age_seconds"] is None else f"{slot['age_seconds']:.3f}"
        print(
            f"{slot['dp_rank']:>4}  {slot['status']:<16} {age:>8}  {slot['seq']:>10}  "
            f"{slot['epoch']:>5}  {slot['writer_pid']:>7}  {slot['reason']}"
        )
    return 0
