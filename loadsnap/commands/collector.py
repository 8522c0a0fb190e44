"""``loadsnap collector``: relay remote ranks' ZMQ snapshots into this node's segment."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from types import FrameType

from loadsnap import flags, settings
from loadsnap.collector import Collector, is_loopback_endpoint
from loadsnap.curve import load_server_keys
from loadsnap.errors import LoadsnapError

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
    flags.add_instance(parser)
    flags.add_dp_size(parser)
    env = settings.current()
    parser.add_argument(
        "--bind",
        default=env.collector_bind,
        help="endpoint to bind (default $LOADSNAP_COLLECTOR_BIND, else "
        f"{settings.DEFAULT_COLLECTOR_BIND})",
    )
    parser.add_argument(
        "--curve-dir",
        default=env.curve_dir,
        help="key directory from `loadsnap keys generate` (default $LOADSNAP_CURVE_DIR); "
        "turns CURVE on: only clients listed in DIR/clients/*.key get through, each for the "
        "ranks its file binds it to",
    )
    flags.add_shm_dir(parser)
    parser.add_argument(
        "--stats-interval-s",
        type=flags.non_negative_number,
        default=10.0,
        metavar="SECONDS",
        help="print counters as JSON this often (0: never; default 10)",
    )
    flags.add_duration(parser, default=None, help="stop after this long (default: at a signal)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the collector until a signal (or ``--duration-s``); exit status 1 if it cannot start."""
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
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
    try:
        while not stop.is_set():
            wait = args.stats_interval_s if args.stats_interval_s > 0 else 1.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            stop.wait(wait)
            if args.stats_interval_s > 0 or stop.is_set() or deadline is not None:
                print(json.dumps(collector.stats_dict()), flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        collector.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
