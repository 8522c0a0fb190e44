"""``loadsnap collector``: relay remote ranks' ZMQ snapshots into this node's segment."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from types import FrameType

from loadsnap.collector import Collector, is_loopback_endpoint
from loadsnap.curve import load_server_keys
from loadsnap.errors import LoadsnapError

DEFAULT_BIND = "tcp://127.0.0.1:5557"

OPEN_CHANNEL_WARNING = (
    "WARNING: loadsnap collector binds {bind} WITHOUT CURVE keys: anyone who can reach this "
    "address can send any rank's load, in clear text. This is a deliberate choice only on a "
    "trusted, isolated network. To turn authentication on: `loadsnap keys generate DIR "
    "--clients N`, then `loadsnap collector --curve-dir DIR ...`."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``collector`` subcommand."""
    parser = subparsers.add_parser(
        "collector",
        help="receive snapshots from other nodes over ZMQ into the local segment",
        description=(
            "Bind a ZMQ PULL socket, receive remote ranks' snapshots and write them into this "
            "node's shared-memory segment, so local readers see every rank. One collector per "
            "instance (a lock decides). Runs until SIGINT/SIGTERM."
        ),
    )
    parser.add_argument("--instance", required=True, help="deployment instance name")
    parser.add_argument("--dp-size", type=int, required=True, help="number of DP ranks")
    parser.add_argument(
        "--bind",
        default=os.environ.get("LOADSNAP_COLLECTOR_BIND", DEFAULT_BIND),
        help=f"endpoint to bind (default $LOADSNAP_COLLECTOR_BIND or {DEFAULT_BIND})",
    )
    parser.add_argument(
        "--curve-dir",
        default=os.environ.get("LOADSNAP_CURVE_DIR") or None,
        help="key directory from `loadsnap keys generate` (default $LOADSNAP_CURVE_DIR); "
        "turns CURVE on: only clients listed in DIR/clients/*.key get through, each for the "
        "ranks its file binds it to",
    )
    parser.add_argument("--shm-dir", default=None, help="segment directory (default /dev/shm)")
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        help="print counters as JSON every S seconds (0: never)",
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after S seconds (0: run until signal)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the collector until a signal (or ``--duration``); exit status 1 if it cannot start."""
    try:
        curve = load_server_keys(args.curve_dir) if args.curve_dir else None
        if curve is None and not is_loopback_endpoint(args.bind):
            print(OPEN_CHANNEL_WARNING.format(bind=args.bind), file=sys.stderr, flush=True)
        collector = Collector(
            args.instance, args.dp_size, args.bind, curve=curve, shm_dir=args.shm_dir
        )
    except LoadsnapError as exc:
        print(f"loadsnap collector: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if curve is not None:
        unbound = sum(1 for client in curve.clients if client.ranks.ranks is None)
        mode = f"curve ({len(curve.clients)} client keys, {unbound} may publish any rank)"
    else:
        mode = "open (no keys)"
    print(
        f"loadsnap collector: instance={args.instance} dp_size={args.dp_size} "
        f"endpoint={collector.endpoint} auth={mode}",
        flush=True,
    )
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop.is_set():
            wait = args.stats_interval if args.stats_interval > 0 else 1.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            stop.wait(wait)
            if args.stats_interval > 0 or stop.is_set() or deadline is not None:
                print(json.dumps(collector.stats_dict()), flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        collector.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
