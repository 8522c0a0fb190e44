"""Command line of the reference scheduler: ``python -m scheduler`` and ``loadsnap scheduler``.

One process per DP rank. Example (rank 1 of 4, requests pushed by a DP controller)::

    python -m scheduler --instance demo --dp-size 4 --dp-rank 1 \\
        --request-addr ipc:///tmp/demo/req-1 --result-addr ipc:///tmp/demo/results \\
        --executor sim --prefill-token-ms 1.0 --chunked-prefill-size 512
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import zmq

from loadsnap import flags
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.publisher import (
    DEFAULT_EVERY_N_CYCLES,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_IDLE_INTERVAL_S,
)
from scheduler.engine import EngineConfig
from scheduler.executor_registry import EXECUTORS
from scheduler.executors import CostModel, TorchConfig
from scheduler.lifeline import die_with_parent
from scheduler.process import SchedulerOptions, run_scheduler

__all__ = ["add_arguments", "build_parser", "main", "options_from_args", "register", "run"]

DESCRIPTION = (
    "Reference continuous-batching scheduler for one DP rank: receives tokenized requests over "
    "ZMQ (PULL), runs chunked prefill and decode against a KV token pool with a prefix cache, "
    "returns finished requests' timings (PUSH) and publishes its load with loadsnap. "
    "SIGTERM/SIGINT: final publish, writer closed, exit 0."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every scheduler flag to ``parser`` (shared by both entry points)."""
    ident = parser.add_argument_group("identity and sockets")
    flags.add_instance(ident)
    flags.add_dp_size(ident)
    ident.add_argument("--dp-rank", type=flags.count, required=True, help="this scheduler's rank")
    ident.add_argument(
        "--request-addr", required=True, help="ZMQ endpoint to bind the PULL socket for requests"
    )
    ident.add_argument(
        "--result-addr",
        required=True,
        help="ZMQ endpoint (bound by the controller) to connect the PUSH socket for results",
    )

    eng = parser.add_argument_group("batching (sglang names)")
    defaults = EngineConfig()
    eng.add_argument(
        "--max-running-requests", type=flags.positive_count, default=defaults.max_running_requests
    )
    eng.add_argument(
        "--max-total-num-tokens",
        type=flags.positive_count,
        default=defaults.max_total_num_tokens,
        help="KV-cache token pool size (default %(default)s)",
    )
    eng.add_argument(
        "--chunked-prefill-size",
        type=flags.positive_count,
        default=defaults.chunked_prefill_size,
        help="prompt tokens per prefill step (default %(default)s)",
    )
    eng.add_argument(
        "--prefix-block-size",
        type=flags.positive_count,
        default=defaults.prefix_block_size,
        help="tokens per prefix-cache block (default %(default)s)",
    )
    eng.add_argument(
        "--decode-reserve-ratio",
        type=flags.ratio,
        default=defaults.decode_reserve_ratio,
        help="fraction of running requests' remaining new tokens kept free at admission",
    )
    eng.add_argument(
        "--window-s",
        type=flags.positive_number,
        default=defaults.window_s,
        help="averaging window of gen_throughput and utilization (default %(default)s)",
    )

    exe = parser.add_argument_group("executor")
    cost = CostModel()
    exe.add_argument("--executor", choices=EXECUTORS, default="sim", help="default %(default)s")
    exe.add_argument(
        "--step-overhead-ms",
        type=flags.non_negative_number,
        default=cost.overhead_s * 1e3,
        help="sim: fixed cost of every step (default %(default)s)",
    )
    exe.add_argument(
        "--prefill-token-ms",
        type=flags.non_negative_number,
        default=cost.prefill_token_s * 1e3,
        help="sim: cost per prefill token; 1.0 with 512-token chunks blocks ~0.5 s per chunk",
    )
    exe.add_argument(
        "--decode-token-ms",
        type=flags.non_negative_number,
        default=cost.decode_token_s * 1e3,
        help="sim: cost per decoded token (per running request) (default %(default)s)",
    )
    exe.add_argument(
        "--context-token-ms",
        type=flags.non_negative_number,
        default=cost.context_token_s * 1e3,
        help="sim: cost per attended KV token (default %(default)s)",
    )
    model = TorchConfig()
    exe.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default=model.device)
    exe.add_argument("--torch-d-model", type=flags.positive_count, default=model.d_model)
    exe.add_argument("--torch-layers", type=flags.positive_count, default=model.n_layers)
    exe.add_argument("--torch-heads", type=flags.positive_count, default=model.n_heads)
    exe.add_argument("--torch-vocab", type=flags.positive_count, default=model.vocab_size)

    pub = parser.add_argument_group("load publishing")
    pub.add_argument(
        "--publish-every",
        type=flags.positive_count,
        default=DEFAULT_EVERY_N_CYCLES,
        help="publish every N decode cycles (prefill and idle always) (default %(default)s)",
    )
    pub.add_argument(
        "--idle-publish-interval-s", type=flags.positive_number, default=DEFAULT_IDLE_INTERVAL_S
    )
    pub.add_argument(
        "--heartbeat-interval-s",
        type=flags.positive_number,
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        help="publish an unchanged idle state this often (default %(default)s)",
    )
    flags.add_transport(pub, help="how to publish (default $LOADSNAP_TRANSPORT, else auto)")
    flags.add_shm_dir(pub)
    pub.add_argument("--collector", default=None, help="zmq: collector endpoint")
    pub.add_argument("--curve-server-key", default=None, help="zmq: CURVE server key file")
    pub.add_argument("--curve-client-key", default=None, help="zmq: CURVE client key file")
    pub.add_argument(
        "--transport-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for loadsnap.transport.make_writer (repeatable)",
    )
    parser.add_argument(
        "--idle-poll-ms",
        type=flags.positive_number,
        default=20.0,
        help="longest wait for a message while idle (a message wakes it at once)",
    )
    flags.add_log_level(parser)


def options_from_args(args: argparse.Namespace) -> SchedulerOptions:
    """Turn parsed flags into :class:`SchedulerOptions`.

    Raises
    ------
    UsageError
        A malformed ``--transport-opt`` or an out-of-range value.
    """
    extra: dict[str, str] = {}
    for item in args.transport_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--transport-opt expects KEY=VALUE: got={item!r}")
        extra[key.replace("-", "_")] = value
    for key in ("collector", "curve_server_key", "curve_client_key"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    return SchedulerOptions(
        instance=args.instance,
        dp_size=args.dp_size,
        dp_rank=args.dp_rank,
        request_addr=args.request_addr,
        result_addr=args.result_addr,
        engine=EngineConfig(
            max_running_requests=args.max_running_requests,
            max_total_num_tokens=args.max_total_num_tokens,
            chunked_prefill_size=args.chunked_prefill_size,
            prefix_block_size=args.prefix_block_size,
            decode_reserve_ratio=args.decode_reserve_ratio,
            window_s=args.window_s,
        ),
        executor=args.executor,
        cost=CostModel(
            overhead_s=args.step_overhead_ms / 1e3,
            prefill_token_s=args.prefill_token_ms / 1e3,
            decode_token_s=args.decode_token_ms / 1e3,
            context_token_s=args.context_token_ms / 1e3,
        ),
        torch=TorchConfig(
            vocab_size=args.torch_vocab,
            d_model=args.torch_d_model,
            n_layers=args.torch_layers,
            n_heads=args.torch_heads,
            device=args.torch_device,
        ),
        transport=args.transport,
        shm_dir=args.shm_dir,
        transport_options=extra,
        publish_every=args.publish_every,
        idle_publish_interval_s=args.idle_publish_interval_s,
        heartbeat_interval_s=args.heartbeat_interval_s,
        idle_poll_s=args.idle_poll_ms / 1e3,
    )


def run(args: argparse.Namespace) -> int:
    """Run a scheduler from parsed flags; exit status 2 on bad options or setup failure.

    Setup failures print one line on stderr. Under a spawning parent (``LOADSNAP_PARENT_PID``)
    the scheduler gets SIGTERM when that parent dies (:mod:`scheduler.lifeline`).
    """
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s scheduler[{args.dp_rank}] %(levelname)s %(message)s",
    )
    try:
        die_with_parent()  # first: a spawning parent's death must stop us from here on
        options = options_from_args(args)
        return run_scheduler(options)
    except (LoadsnapError, ImportError, zmq.ZMQError) as exc:
        # One line, no traceback: a fleet quotes the last line of a rank that failed to start.
        print(f"scheduler: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``loadsnap scheduler`` (the ``loadsnap.commands`` entry point)."""
    parser = subparsers.add_parser(
        "scheduler",
        help="run a reference continuous-batching scheduler for one DP rank",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m scheduler``."""
    parser = flags.OneLineParser(prog="python -m scheduler", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m scheduler``; returns the exit status."""
    try:
        parser = build_parser()
    except LoadsnapError as exc:  # a bad LOADSNAP_* variable, read for a default
        print(f"scheduler: {exc}", file=sys.stderr)
        return 2
    return run(parser.parse_args(argv))
