"""Command line of the DP controller: ``python -m dp_controller`` and ``loadsnap controller``.

Replays a seeded workload through a controller that dispatches to DP schedulers, then prints
per-rank counts, imbalance and latency percentiles. Example (spawns 4 reference schedulers)::

    python -m dp_controller --spawn --dp-size 4 --policy length_aware --workload bursty

Without ``--spawn`` it connects to running schedulers: ``--request-addr`` once per rank (or a
``{rank}`` template) and ``--result-addr`` for this controller's PULL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from dp_controller.baselines import OverwriteBudget
from dp_controller.budget import (
    CONTROLLER_POLICY,
    BudgetConfig,
    DPBudget,
    Policy,
    StalePolicy,
)
from dp_controller.controller import Controller
from dp_controller.dispatching import Dispatcher
from dp_controller.harness.fleet import SchedulerFleet
from dp_controller.harness.replay import TraceRun, imbalance, replay
from dp_controller.harness.workload import PRESETS, generate_trace, preset
from loadsnap import flags
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.shm_reader import ShmReader

__all__ = [
    "POLICIES",
    "add_arguments",
    "add_policy_arguments",
    "add_workload_arguments",
    "budget_config",
    "build_parser",
    "main",
    "make_dispatcher",
    "register",
    "run",
    "summary",
]

POLICIES = (*(p.value for p in Policy), "overwrite")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every controller flag to ``parser`` (shared by both entry points)."""
    flags.add_instance(parser)
    flags.add_dp_size(parser, default=4, spawns=True)
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="start --dp-size reference schedulers as children (they die with this process; "
        "a second --spawn of a running instance exits 2 at once)",
    )
    parser.add_argument(
        "--request-addr",
        action="append",
        default=[],
        help="a rank's scheduler request endpoint (once per rank, or one '{rank}' template)",
    )
    parser.add_argument("--result-addr", default=None, help="endpoint this controller binds")
    parser.add_argument(
        "--scheduler-arg",
        action="append",
        default=[],
        help="extra flag for spawned schedulers (repeatable, e.g. --scheduler-arg=--executor=sim)",
    )
    add_policy_arguments(parser)
    add_workload_arguments(parser, default="bursty")
    parser.add_argument(
        "--drain-timeout-s",
        type=flags.positive_number,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for outstanding requests after the trace (default 30)",
    )
    ctl = parser.add_argument_group("control fan-out")
    ctl.add_argument("--control", default=None, help="send this command (ping, flush_cache...)")
    ctl.add_argument(
        "--control-timeout-s", type=flags.positive_number, default=1.0, metavar="SECONDS"
    )
    ctl.add_argument("--control-concurrency", type=flags.positive_count, default=16)
    flags.add_json(parser)
    flags.add_log_level(parser)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The dispatch policy and its tunables (``controller`` and ``demo``)."""
    defaults = BudgetConfig()
    pol = parser.add_argument_group("dispatch policy")
    pol.add_argument(
        "--policy",
        choices=POLICIES,
        default=CONTROLLER_POLICY.value,
        help="how ranks are chosen (dp_controller.budget.Policy; length_aware: length-aware "
        "routing on prompt length and max_new_tokens; overwrite: the reference design) "
        "(default %(default)s)",
    )
    pol.add_argument(
        "--refresh-interval-ms",
        type=flags.positive_number,
        default=defaults.refresh_interval_s * 1e3,
        help="read the loads at most this often (default %(default)s)",
    )
    pol.add_argument("--stale-policy", choices=[s.value for s in StalePolicy], default="saturated")
    flags.add_stale_after(pol)
    pol.add_argument("--kv-weight", type=flags.non_negative_number, default=defaults.kv_weight)
    pol.add_argument(
        "--request-slack",
        type=flags.count,
        default=defaults.request_slack,
        help="requests_then_work, power_of_two, length_aware: eligible ranks are within this "
        "many requests of the fewest (default %(default)s)",
    )
    pol.add_argument(
        "--class-weight",
        type=flags.non_negative_number,
        default=defaults.class_weight,
        help="length_aware: weight of the rank's outstanding requests of the same output-length "
        "class (default %(default)s)",
    )
    pol.add_argument(
        "--count-weight",
        type=flags.non_negative_number,
        default=defaults.count_weight,
        help="length_aware: weight of the rank's outstanding requests (default %(default)s)",
    )


def add_workload_arguments(
    parser: argparse.ArgumentParser, *, default: str, duration: bool = True
) -> None:
    """The seeded workload (``controller`` and ``demo``); ``duration``: the trace's length
    (``--duration-s``; the demo's own ``--duration-s`` is how long it runs)."""
    wl = parser.add_argument_group("workload")
    wl.add_argument(
        "--workload",
        choices=sorted(PRESETS),
        default=default,
        help=f"trace preset (default {default})",
    )
    wl.add_argument("--seed", type=flags.count, default=0, help="workload seed (default 0)")
    wl.add_argument(
        "--rate-rps", type=flags.positive_number, default=None, help="override the preset's rate"
    )
    if duration:
        flags.add_duration(wl, default=None, help="override the preset's duration")


def budget_config(args: argparse.Namespace) -> BudgetConfig:
    """The :class:`BudgetConfig` of parsed :func:`add_policy_arguments` flags."""
    return BudgetConfig(
        refresh_interval_s=args.refresh_interval_ms / 1e3,
        stale_policy=StalePolicy(args.stale_policy),
        kv_weight=args.kv_weight,
        request_slack=args.request_slack,
        class_weight=args.class_weight,
        count_weight=args.count_weight,
    )


def make_dispatcher(
    policy: str, reader: ShmReader, dp_size: int, config: BudgetConfig | None = None
) -> Dispatcher:
    """A dispatcher by name: a :class:`Policy` value, or ``overwrite`` for the baseline.

    ``config`` supplies every other tunable (its ``policy`` is replaced by ``policy``)."""
    cfg = config or BudgetConfig()
    if policy == "overwrite":
        return OverwriteBudget(reader, cfg.refresh_interval_s, dp_size=dp_size)
    try:
        chosen = Policy(policy)
    except ValueError:
        raise UsageError(f"unknown policy: policy={policy}; valid: {', '.join(POLICIES)}") from None
    return DPBudget(reader, dataclasses.replace(cfg, policy=chosen), dp_size=dp_size)


def summary(run: TraceRun, dp_size: int) -> dict[str, Any]:
    """Counts, imbalance and latency percentiles of a trace run, JSON-ready.

    ``finished`` and the latencies count successful results only; ``failed`` counts the rest
    (requests lost with a dead or restarted rank, or refused by a scheduler).
    """
    per_rank = [0] * dp_size
    done = [fin for fin in run.finished if fin.status == "ok"]
    for fin in done:
        if 0 <= fin.dp_rank < dp_size:
            per_rank[fin.dp_rank] += 1
    mean_imb, max_imb = imbalance(run.samples)
    dispatch_imb, dispatch_max = imbalance(run.dispatch_samples)
    out: dict[str, Any] = {
        "dispatched": run.dispatched,
        "finished": len(done),
        "failed": len(run.finished) - len(done),
        "unfinished": run.unfinished,
        "duration_s": round(run.duration_s, 3),
        "per_rank_finished": per_rank,
        "imbalance_mean": round(mean_imb, 4),
        "imbalance_max": round(max_imb, 4),
        "imbalance_at_dispatch_mean": round(dispatch_imb, 4),
        "imbalance_at_dispatch_max": round(dispatch_max, 4),
    }
    for name in ("queue_time_s", "ttft_s", "e2e_s"):
        values = sorted(getattr(f, name) for f in done)
        for label, pct in (("p50", 0.50), ("p99", 0.99)):
            key = f"{name.removesuffix('_s')}_{label}_s"
            out[key] = values[min(len(values) - 1, int(pct * len(values)))] if values else None
    return out


def _request_addrs(args: argparse.Namespace) -> list[str]:
    addrs: list[str] = args.request_addr
    if len(addrs) == 1 and "{rank}" in addrs[0]:
        return [addrs[0].format(rank=r) for r in range(args.dp_size)]
    if len(addrs) != args.dp_size:
        raise UsageError(
            f"--request-addr: one per rank or one '{{rank}}' template: got={len(addrs)} "
            f"dp_size={args.dp_size}"
        )
    return addrs


def run(args: argparse.Namespace) -> int:
    """Run the controller from parsed flags; exit status 2 on bad options or setup failure."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    fleet: SchedulerFleet | None = None
    try:
        config = budget_config(args)
        overrides = {
            k: v for k, v in (("seed", args.seed), ("duration_s", args.duration_s)) if v is not None
        }
        if args.rate_rps is not None:
            overrides["rate_rps"] = args.rate_rps
        trace = generate_trace(preset(args.workload, **overrides))
        if args.spawn:
            fleet = SchedulerFleet(args.instance, args.dp_size, args.scheduler_arg)
            fleet.wait_ready()
            request_addrs, result_addr = fleet.request_addrs, fleet.result_addr
        else:
            if args.result_addr is None:
                raise UsageError("--result-addr is required without --spawn")
            request_addrs, result_addr = _request_addrs(args), args.result_addr
        with ShmReader(args.instance, stale_after_s=args.stale_after_s) as reader:
            dispatcher = make_dispatcher(args.policy, reader, args.dp_size, config)
            with Controller(dispatcher, request_addrs, result_addr) as controller:
                report = summary(
                    replay(controller, trace, drain_timeout_s=args.drain_timeout_s),
                    args.dp_size,
                )
                report["policy"] = args.policy
                if args.control:
                    result = controller.control(
                        args.control,
                        timeout_s=args.control_timeout_s,
                        max_concurrency=args.control_concurrency,
                    )
                    report["control"] = {
                        str(r.dp_rank): {"outcome": r.outcome.value, "detail": r.detail}
                        for r in result.ranks
                    }
    except (LoadsnapError, ValueError) as exc:
        print(f"dp_controller: {exc}", file=sys.stderr)
        return 2
    finally:
        if fleet is not None:
            fleet.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:<22} {value}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``loadsnap controller`` (the ``loadsnap.commands`` entry point)."""
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


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m dp_controller``."""
    parser = flags.OneLineParser(
        prog="python -m dp_controller",
        description="DP controller: dispatch a seeded workload to DP schedulers and report.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dp_controller``; returns the exit status."""
    try:
        parser = build_parser()
    except LoadsnapError as exc:  # a bad LOADSNAP_* variable, read for a default
        print(f"dp_controller: {exc}", file=sys.stderr)
        return 2
    return run(parser.parse_args(argv))
