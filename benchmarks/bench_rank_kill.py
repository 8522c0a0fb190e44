"""Rank kill: how fast does traffic leave a scheduler killed mid-run, and what of its requests?

``--dp-size`` reference schedulers (``python -m scheduler``, the sim executor with the same slow
prefill as ``bench_dispatch``) serve a seeded Poisson trace
(``dp_controller.harness.workload`` preset
``poisson`` at ``--rate-rps``) that the controller replays in real time. ``--kill-at-s`` into
the trace, rank ``--kill-rank`` gets SIGKILL and is reaped (as a supervisor would); nothing is
restarted. The same trace, the same kill, for each design in turn on fresh schedulers:

- ``round_robin`` (``RoundRobinBaseline``: reads no load) and the reference design's
  ``overwrite`` budget (``OverwriteBudget``), neither of which has a notion of a dead rank;
- ours (``length_aware``, the controller's default, on ``DPBudget``): the budget reads the
  rank DEAD once its writer's pid is gone and its last record is older than the reader's
  dead-probe age, excludes it, and the controller reports what the rank held as failed
  (``status="failed"``, ``reason="rank_dead"``).

Reported per design, from the controller's side:

- ``sent after``: requests dispatched to the killed rank after the kill; ``last send``: seconds
  from the kill to the last of them (``-``: none); ``share``: their share of every dispatch
  after the kill (``1/dp`` is what a design that never notices sends);
- ``dead seen``: seconds from the kill until the budget marked the rank dead
  (``dp_controller.harness.loss.dead_ranks``; ``-``: the design never does);
- ``held``: requests in flight on the rank at the kill; ``ok``/``failed``/``no result``: how
  every request ended, audited independently by ``dp_controller.harness.loss.RequestAccount``.
  ``no result`` counts the requests dispatched to the killed rank that still had no result
  ``--drain-s`` after the last arrival (what a client of that design waits on until its own
  timeout); ``unfinished`` counts those still being served by live ranks at that point (an
  overloaded survivor, not a loss); ``lost`` is the account's invariant ``submitted - ok -
  failed - pending`` and must be 0, ``dup`` counts second results for one request.

Run: ``python -m benchmarks.bench_rank_kill`` (``--quick`` for the smoke size).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks._common import (
    BenchResult,
    FlagError,
    Headline,
    Table,
    bench_main,
    save_figure,
    subplots,
    unique_instance,
)
from benchmarks.bench_dispatch import SCHEDULER_ARGS
from dp_controller.baselines import RoundRobinBaseline
from dp_controller.budget import CONTROLLER_POLICY, BudgetConfig, DPBudget
from dp_controller.cli import make_dispatcher
from dp_controller.controller import Controller
from dp_controller.dispatching import Dispatcher
from dp_controller.harness.fleet import SchedulerFleet
from dp_controller.harness.loss import RequestAccount, dead_ranks
from dp_controller.harness.workload import TraceRequest, generate_trace, preset
from loadsnap.shm_reader import ShmReader

REPORT_ORDER: Final[int] = 4
REPORT_ARGS: Final[list[str]] = []

OURS: Final[str] = CONTROLLER_POLICY.value
DESIGNS: Final[tuple[str, ...]] = ("round_robin", "overwrite", OURS)
BASELINE_NAMES: Final[dict[str, str]] = {
    "round_robin": "round robin",
    "overwrite": "overwrite + 20 ms throttle",
}
TIMELINE_BIN_S: Final[float] = 0.05
POLL_S: Final[float] = 0.005


@dataclass(slots=True)
class KillRun:
    """What one design did around the kill (times in seconds since the trace started)."""

    design: str
    dp_size: int
    kill_rank: int
    killed_at_s: float = -1.0
    dead_seen_s: float | None = None  # when the budget first reported the rank dead
    held_at_kill: int = 0
    dispatches: list[tuple[float, int]] = field(default_factory=list)  # (time, rank)
    failed_at: list[float] = field(default_factory=list)  # controller-reported failures
    ttft_ok: list[float] = field(default_factory=list)
    duration_s: float = 0.0


def replay_with_kill(
    controller: Controller,
    fleet: SchedulerFleet,
    account: RequestAccount,
    trace: Sequence[TraceRequest],
    run: KillRun,
    kill_at_s: float,
    drain_s: float,
) -> None:
    """Replay ``trace`` in real time, SIGKILL ``run.kill_rank`` at ``kill_at_s``, then drain.

    Every dispatch goes into ``run.dispatches`` and ``account``; every result from
    ``controller.poll`` into ``account``. Stops when every request has a result, or
    ``drain_s`` after the last arrival.
    """
    budget = controller.dispatcher if isinstance(controller.dispatcher, DPBudget) else None
    rank = run.kill_rank
    start = time.monotonic()
    i, n = 0, len(trace)
    last_arrival = trace[-1].arrival_s if trace else 0.0
    while True:
        now = time.monotonic() - start
        if run.killed_at_s < 0 and now >= kill_at_s:
            run.held_at_kill = len(controller.in_flight(rank))
            proc = fleet.procs[rank]
            proc.kill()
            proc.wait(5.0)  # reaped: its pid is gone, as under a supervisor
            run.killed_at_s = time.monotonic() - start
        while i < n and trace[i].arrival_s <= now:
            req = trace[i]
            rid, decision = controller.submit(req.prompt, req.max_new_tokens)
            account.submitted(rid, decision.rank)
            run.dispatches.append((time.monotonic() - start, decision.rank))
            i += 1
        if i >= n and (account.pending() == 0 or now > last_arrival + drain_s):
            break
        wait = POLL_S
        if i < n:
            wait = min(wait, max(0.0, trace[i].arrival_s - now))
        if run.killed_at_s < 0:
            wait = min(wait, max(0.0, kill_at_s - now))
        for result in controller.poll(wait):
            account.finished(result)
            if result.status == "ok":
                run.ttft_ok.append(result.ttft_s)
            elif result.dp_rank == rank:
                run.failed_at.append(time.monotonic() - start)
        if (
            budget is not None
            and run.dead_seen_s is None
            and run.killed_at_s >= 0
            and rank in dead_ranks(budget)
        ):
            run.dead_seen_s = time.monotonic() - start
    run.duration_s = time.monotonic() - start


def run_design(
    design: str,
    dp_size: int,
    kill_rank: int,
    trace: Sequence[TraceRequest],
    kill_at_s: float,
    drain_s: float,
) -> dict[str, Any]:
    """Fresh schedulers, one replay with the kill; the design's figures, JSON-ready."""
    instance = unique_instance("brk")
    run = KillRun(design, dp_size, kill_rank)
    account = RequestAccount(dp_size)
    with SchedulerFleet(instance, dp_size, SCHEDULER_ARGS) as fleet:
        fleet.wait_ready(timeout_s=20.0)
        with ShmReader(instance) as reader:
            dispatcher: Dispatcher
            if design == "round_robin":
                dispatcher = RoundRobinBaseline(dp_size)
            else:
                dispatcher = make_dispatcher(design, reader, dp_size, BudgetConfig())
            with Controller(dispatcher, fleet.request_addrs, fleet.result_addr) as controller:
                replay_with_kill(controller, fleet, account, trace, run, kill_at_s, drain_s)
    return figures(run, account)


def figures(run: KillRun, account: RequestAccount) -> dict[str, Any]:
    """The reported numbers of one run (see the module docstring)."""
    kill = run.killed_at_s
    after = [(t, r) for t, r in run.dispatches if t >= kill]
    to_dead = [t for t, r in after if r == run.kill_rank]
    loss = account.summary()
    ttft = sorted(run.ttft_ok)
    bins = int(run.duration_s / TIMELINE_BIN_S) + 1
    timeline = [[0] * run.dp_size for _ in range(bins)]
    for t, r in run.dispatches:
        timeline[min(bins - 1, int(t / TIMELINE_BIN_S))][r] += 1
    return {
        "design": run.design,
        "dp_size": run.dp_size,
        "kill_rank": run.kill_rank,
        "killed_at_s": round(kill, 4),
        "dispatched": len(run.dispatches),
        "dispatched_after_kill": len(after),
        "sent_to_dead_after_kill": len(to_dead),
        "share_to_dead_after_kill": len(to_dead) / len(after) if after else 0.0,
        "last_send_after_kill_s": round(to_dead[-1] - kill, 4) if to_dead else None,
        "dead_seen_after_kill_s": (
            None if run.dead_seen_s is None else round(run.dead_seen_s - kill, 4)
        ),
        "first_failed_after_kill_s": (round(run.failed_at[0] - kill, 4) if run.failed_at else None),
        "held_at_kill": run.held_at_kill,
        "ok": loss.finished,
        "failed": loss.failed,
        "no_result": account.pending(run.kill_rank),
        "unfinished_live": loss.pending - account.pending(run.kill_rank),
        "lost": loss.lost,
        "duplicates": loss.duplicates,
        "unknown_results": loss.unknown_finished,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "duration_s": round(run.duration_s, 3),
        "timeline_bin_s": TIMELINE_BIN_S,
        "timeline": timeline,
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--dp-size", type=int, default=4, help="schedulers")
    parser.add_argument("--kill-rank", type=int, default=1, help="the rank that gets SIGKILL")
    parser.add_argument("--rate-rps", type=float, default=60.0, help="Poisson arrival rate")
    parser.add_argument("--duration-s", type=float, default=3.0, help="trace length")
    parser.add_argument("--kill-at-s", type=float, default=1.0, help="seconds into the trace")
    parser.add_argument("--drain-s", type=float, default=2.0, help="wait after the last arrival")
    parser.add_argument("--seed", type=int, default=0)


QUICK: Final = dict(
    dp_size=2, kill_rank=1, rate_rps=25.0, duration_s=0.6, kill_at_s=0.2, drain_s=0.3
)


def run(args: argparse.Namespace) -> BenchResult:
    """Every design on the same trace with the same kill."""
    if not 0 <= args.kill_rank < args.dp_size or args.dp_size < 2:
        raise FlagError(f"need dp_size >= 2 and 0 <= kill_rank < dp_size: {args.kill_rank}")
    if not 0 < args.kill_at_s < args.duration_s:
        raise FlagError("--kill-at-s must fall inside the trace")
    result = BenchResult(
        "bench_rank_kill",
        "When a scheduler is killed mid-run, how fast does traffic leave it, and does any "
        "request go without a result?",
    )
    spec = preset("poisson", rate_rps=args.rate_rps, duration_s=args.duration_s, seed=args.seed)
    trace = generate_trace(spec)
    runs = {
        design: run_design(
            design, args.dp_size, args.kill_rank, trace, args.kill_at_s, args.drain_s
        )
        for design in DESIGNS
    }
    rows = [
        [
            design,
            str(r["sent_to_dead_after_kill"]),
            _s(r["last_send_after_kill_s"]),
            f"{r['share_to_dead_after_kill']:.1%}",
            _s(r["dead_seen_after_kill_s"]),
            str(r["held_at_kill"]),
            str(r["ok"]),
            str(r["failed"]),
            str(r["no_result"]),
            str(r["unfinished_live"]),
            str(r["lost"]),
            str(r["duplicates"]),
            "-" if r["ttft_p99_s"] is None else f"{r['ttft_p99_s'] * 1e3:.0f}",
        ]
        for design, r in runs.items()
    ]
    result.tables.append(
        Table(
            f"SIGKILL rank {args.kill_rank} of {args.dp_size} at {args.kill_at_s:g} s into a "
            f"{args.duration_s:g} s Poisson trace ({len(trace)} requests, {args.rate_rps:g}/s); "
            "times in s after the kill",
            [
                "design",
                "sent after",
                "last send",
                "share",
                "dead seen",
                "held",
                "ok",
                "failed",
                "no result",
                "unfinished",
                "lost",
                "dup",
                "ttft p99 ms",
            ],
            rows,
        )
    )
    ours = runs[OURS]
    for design in ("round_robin", "overwrite"):
        result.headlines.append(
            Headline(
                "requests sent to a killed rank after the kill",
                float(ours["sent_to_dead_after_kill"]),
                float(runs[design]["sent_to_dead_after_kill"]),
                BASELINE_NAMES[design],
                "",
                target="traffic leaves the killed rank",
            )
        )
    result.add_target(
        "ours: every request ends finished or reported failed (no result = 0, lost = 0, dup = 0)",
        ours["no_result"] == 0 and ours["lost"] == 0 and ours["duplicates"] == 0,
        f"no_result={ours['no_result']} lost={ours['lost']} duplicates={ours['duplicates']}",
    )
    stopped = ours["dead_seen_after_kill_s"] is not None and (
        ours["last_send_after_kill_s"] is None
        or ours["last_send_after_kill_s"] <= ours["dead_seen_after_kill_s"]
    )
    result.add_target(
        "ours: no dispatch to the killed rank once the budget has seen it dead",
        stopped,
        f"dead seen after {_s(ours['dead_seen_after_kill_s'])} s, last send after "
        f"{_s(ours['last_send_after_kill_s'])} s",
    )
    result.add_target(
        "every design: the account's invariant holds (lost = 0)",
        all(r["lost"] == 0 for r in runs.values()),
        " ".join(f"{d}={r['lost']}" for d, r in runs.items()),
    )
    result.data = {
        "runs": runs,
        "ours": OURS,
        "config": {
            "dp_size": args.dp_size,
            "kill_rank": args.kill_rank,
            "rate_rps": args.rate_rps,
            "duration_s": args.duration_s,
            "kill_at_s": args.kill_at_s,
            "drain_s": args.drain_s,
            "seed": args.seed,
            "requests": len(trace),
            "scheduler_args": list(SCHEDULER_ARGS),
        },
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    return bench_main(__doc__, argv, run, add_arguments, QUICK)


TITLE: Final[str] = "Dispatch with a rank killed mid-run"
LIMITS: Final[str] = (
    "Ours stops choosing the killed rank before it is declared dead: its requests are never "
    "acknowledged, so they stay in the dispatch ledger and the rank's budget only grows while "
    "the live ranks' budgets drain; the few sent in that window are what 'sent after' counts. "
    "The rank is declared dead at the first refresh after its last record is older than the "
    "reader's dead-probe age (0.25 s) and its pid is gone, so 'dead seen' is 0.25 s minus the "
    "time from its last publish to the kill, plus up to one 20 ms refresh. That probe age is "
    "the floor (the reader checks a writer's pid only once its record is that old, to keep the"
    " /proc read off the common path). At that point the controller reports everything the "
    "rank held as failed, so no request is left without a result. Round robin and the "
    "overwrite baseline have no dead state: round robin keeps sending 1/dp of the traffic, the"
    " overwrite budget keeps the killed rank's last reported count (plus one per dispatch "
    "until the next overwrite) and keeps choosing it whenever the live ranks report more, and "
    "the requests sent there, and those it held, never get a result."
)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Cumulative dispatches per rank over time around the kill, one panel per design."""
    runs: dict[str, dict[str, Any]] = result["data"]["runs"]
    fig, axes = subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True)
    axes_list = list(axes) if len(runs) > 1 else [axes]
    for ax, (design, run) in zip(axes_list, runs.items(), strict=True):
        bin_s = float(run["timeline_bin_s"])
        timeline: list[list[int]] = run["timeline"]
        busy = [k for k, row in enumerate(timeline) if any(row)]
        end = (busy[-1] + 1) if busy else len(timeline)
        xs = [(k + 1) * bin_s for k in range(end)]
        for rank in range(int(run["dp_size"])):
            total, ys = 0, []
            for row in timeline[:end]:
                total += row[rank]
                ys.append(total)
            killed = rank == run["kill_rank"]
            ax.step(
                xs,
                ys,
                where="post",
                linewidth=2.2 if killed else 1.0,
                color="#d62728" if killed else None,
                label=f"rank {rank}" + (" (killed)" if killed else ""),
            )
        ax.axvline(run["killed_at_s"], color="black", linestyle="--", linewidth=0.8)
        dead = run.get("dead_seen_after_kill_s")
        if dead is not None:
            ax.axvline(run["killed_at_s"] + dead, color="#2ca02c", linestyle=":", linewidth=1.2)
        ax.set_title(f"{design}: {run['sent_to_dead_after_kill']} sent to it after the kill")
        ax.set_xlabel("s into the trace (dashed: kill; dotted: seen dead)")
        ax.grid(True, alpha=0.3)
    axes_list[0].set_ylabel("dispatches so far, per rank")
    axes_list[0].legend(fontsize=7)
    return save_figure(fig, out_dir, "rank_kill.png")


if __name__ == "__main__":
    sys.exit(main())
