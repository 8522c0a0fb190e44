"""``loadsnap inspect``: segment header, slot states, ages and writers, for diagnosis."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from loadsnap import flags
from loadsnap._location import segment_path
from loadsnap.errors import SegmentUnavailableError
from loadsnap.metrics import slot_refused_counts
from loadsnap.reading import DEFAULT_STALE_AFTER_S
from loadsnap.shm_reader import ShmReader


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a segment's header and every slot's state, age and writer",
        description=(
            "Diagnose an instance: the segment header (layout version, dp_size, slot size, "
            "creator), then one line per DP rank: status (fresh, stale, dead, never_published, "
            "torn, invalid) and why, snapshot age, record sequence, writer epoch, writer pid "
            "(in its own pid namespace) and whether it is alive (its slot lock is held), "
            "refused payloads, running/waiting requests. Exit status 1 "
            "when no segment is readable (the reason is printed, or returned in --json)."
        ),
        epilog="Example: loadsnap inspect --instance demo --json",
    )
    flags.add_instance(parser)
    flags.add_reader_options(parser)
    flags.add_json(parser)
    parser.set_defaults(func=run)


def _iso(wall_ns: int) -> str:
    return datetime.datetime.fromtimestamp(wall_ns / 1e9, tz=datetime.UTC).isoformat()


def collect(
    instance: str, shm_dir: str | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict.

    Raises
    ------
    SegmentUnavailableError
        No readable segment (``.state`` says why).
    """
    with ShmReader(instance, shm_dir=shm_dir, stale_after_s=stale_after_s) as reader:
        header = reader.segment.header
        reads = reader.read_all()
        refused = slot_refused_counts(reader)
        slots = []
        for read in reads:
            snap = read.snapshot
            alive = reader.writer_alive(read.rank)
            slots.append(
                {
                    "dp_rank": read.rank,
                    "status": read.status.label,
                    "reason": read.reason,
                    "age_seconds": read.age_s,
                    "seq": read.seq,
                    "epoch": read.epoch,
                    "writer_pid": read.writer_pid,
                    "writer_alive": alive,
                    "refused_payloads": refused[read.rank],
                    "num_running_reqs": None if snap is None else snap.num_running_reqs,
                    "num_waiting_reqs": None if snap is None else snap.num_waiting_reqs,
                    "token_usage": None if snap is None else snap.token_usage,
                    "last_accepted_dispatch_seq": (
                        None if snap is None else snap.last_accepted_dispatch_seq
                    ),
                }
            )
        return {
            "instance": instance,
            "state": "ok",
            "segment": reader.segment_path,
            "layout_version": f"{header.layout_major}.{header.layout_minor}",
            "dp_size": header.dp_size,
            "slot_size": header.slot_size,
            "payload_capacity": header.payload_capacity,
            "segment_size": header.header_size + header.dp_size * header.slot_size,
            "segment_id": f"{header.segment_id:016x}",
            "creator_pid": header.creator_pid,
            "creator_uid": header.creator_uid,
            "created_wall_ns": header.created_wall_ns,
            "created": _iso(header.created_wall_ns),
            "stale_after_seconds": stale_after_s,
            "slots": slots,
        }


def _print_text(info: dict[str, Any]) -> None:
    print(
        f"segment {info['segment']}  layout {info['layout_version']}  "
        f"dp_size {info['dp_size']}  slot {info['slot_size']} B "
        f"(payload {info['payload_capacity']} B)  id {info['segment_id']}"
    )
    print(
        f"created {info['created']} by pid {info['creator_pid']} uid {info['creator_uid']}  "
        f"stale after {info['stale_after_seconds']} s"
    )
    print(
        f"{'rank':>4}  {'status':<15} {'age_s':>8} {'seq':>10} {'epoch':>5} {'pid':>8} "
        f"{'alive':>5} {'refused':>7} {'run':>5} {'wait':>5}  reason"
    )
    for slot in info["slots"]:
        age = "-" if slot["age_seconds"] is None else f"{slot['age_seconds']:.3f}"
        run_ = "-" if slot["num_running_reqs"] is None else slot["num_running_reqs"]
        wait = "-" if slot["num_waiting_reqs"] is None else slot["num_waiting_reqs"]
        alive = "yes" if slot["writer_alive"] else "no"
        print(
            f"{slot['dp_rank']:>4}  {slot['status']:<15} {age:>8} {slot['seq']:>10} "
            f"{slot['epoch']:>5} {slot['writer_pid']:>8} {alive:>5} "
            f"{slot['refused_payloads']:>7} {run_:>5} {wait:>5}  {slot['reason']}"
        )


def run(args: argparse.Namespace) -> int:
    """Print the inspection; exit status 1 when no segment is readable."""
    try:
        info = collect(args.instance, args.shm_dir, args.stale_after_s)
    except SegmentUnavailableError as exc:
        if args.json:
            doc = {
                "instance": args.instance,
                "state": exc.state.value,
                "segment": segment_path(args.instance, args.shm_dir),
                "detail": str(exc),
            }
            print(json.dumps(doc, indent=2))
        else:
            print(f"loadsnap inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    return 0
