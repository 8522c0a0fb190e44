"""Dispatch: decision cost, and balance and latency on a bursty trace against real schedulers.

Two measurements, one run, every policy side by side:

1. **Decisions per second** at dp 8 and dp 256: ``dispatch()`` in a loop over an in-memory
   source (``dp_controller.fakes.FakeSource``) with the real monotonic clock and the 20 ms
   refresh throttle, so refreshes happen as in production. Policies: round robin, the
   reference design's overwrite budget (``OverwriteBudget``), ``total_requests`` and ours
   (``work_over_throughput``). Best of ``--rounds`` rounds.
2. **Bursty trace** (``dp_controller.workload`` preset ``bursty``, seed fixed): ``--dp-size``
   reference schedulers (``python -m scheduler``, sim executor with a slow prefill so requests
   queue and snapshots lag) are started once per policy; the controller replays the trace in
   real time. Reported: load imbalance (max/mean outstanding requests per rank, sampled every
   5 ms while mean >= 2 per rank, and right after each dispatch), p50/p99 queue time and TTFT.

Run: ``python -m benchmarks.bench_dispatch`` (``--quick`` for the smoke size).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

from benchmarks._common import BenchResult, Headline, Table, finish, make_parser
from dp_controller.budget import BudgetConfig
from dp_controller.cli import make_dispatcher, summary
from dp_controller.controller import Controller
from dp_controller.dispatching import Dispatcher
from dp_controller.fakes import FakeSource
from dp_controller.fleet import SchedulerFleet
from dp_controller.workload import generate_trace, preset
from loadsnap.shm_reader import ShmReader

POLICIES: Final[tuple[str, ...]] = (
    "round_robin",
    "overwrite",
    "total_requests",
    "work_over_throughput",
)
OURS: Final[str] = "work_over_throughput"
SCHEDULER_ARGS: Final[tuple[str, ...]] = (
    "--prefill-token-ms=0.1",
    "--decode-token-ms=0.2",
)


def _loaded_source(dp_size: int) -> FakeSource:
    source = FakeSource(dp_size)
    for rank in range(dp_size):
        source.publish(
            rank,
            num_running_reqs=8 + rank % 5,
            num_waiting_reqs=rank % 3,
            num_total_tokens=4000 + 37 * rank,
            num_used_tokens=3000 + 11 * rank,
            max_total_num_tokens=16384,
            gen_throughput=900.0 + rank,
        )
    return source


def _dispatcher(policy: str, source: FakeSource, dp_size: int) -> Dispatcher:
    return make_dispatcher(policy, source, dp_size)  # type: ignore[arg-type]


def measure_decisions(dp_size: int, policy: str, decisions: int, rounds: int) -> float:
    """Best decisions/s over ``rounds`` rounds of ``decisions`` dispatches."""
    best = 0.0
    for _ in range(rounds):
        source = _loaded_source(dp_size)
        dispatcher = _dispatcher(policy, source, dp_size)
        dispatch = dispatcher.dispatch
        t0 = time.perf_counter()
        for i in range(decisions):
            dispatch(100 + (i & 63))
        elapsed = time.perf_counter() - t0
        best = max(best, decisions / elapsed)
    return best


def run_trace(policy: str, dp_size: int, quick: bool) -> dict[str, Any]:
    """Start schedulers, replay the seeded bursty trace with ``policy``, summarise."""
    spec = preset("bursty", duration_s=1.6 if quick else 3.0)
    trace = generate_trace(spec)
    instance = f"bd-{uuid.uuid4().hex[:8]}"
    with SchedulerFleet(instance, dp_size, SCHEDULER_ARGS) as fleet:
        fleet.wait_ready(timeout_s=20.0)
        with ShmReader(instance) as reader:
            dispatcher = make_dispatcher(policy, reader, dp_size, BudgetConfig())
            with Controller(dispatcher, fleet.request_addrs, fleet.result_addr) as controller:
                run = controller.run_trace(trace, drain_timeout_s=20.0)
    out = summary(run, dp_size)
    out["policy"] = policy
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(__doc__)
    parser.add_argument("--decisions", type=int, default=200_000, help="per round at dp 8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp-size", type=int, default=4, help="schedulers for the trace")
    args = parser.parse_args(args_list)
    if args.quick:
        args.decisions, args.rounds = 2000, 1
    started = time.perf_counter()
    result = BenchResult(
        "bench_dispatch",
        "How fast are dispatch decisions, and do bursts stay balanced with low tail TTFT?",
    )
    rates: dict[str, dict[str, float]] = {}
    rows = []
    for policy in POLICIES:
        rates[policy] = {}
        for dp in (8, 256):
            n = args.decisions if dp == 8 else max(1000, args.decisions // 4)
            rates[policy][str(dp)] = measure_decisions(dp, policy, n, args.rounds)
        rows.append([policy, f"{rates[policy]['8']:,.0f}", f"{rates[policy]['256']:,.0f}"])
    result.tables.append(
        Table("Decisions per second (best round)", ["policy", "dp 8", "dp 256"], rows)
    )
    traces = {policy: run_trace(policy, args.dp_size, args.quick) for policy in POLICIES}
    trace_rows = [
        [
            policy,
            f"{t['finished']}/{t['dispatched']}",
            f"{t['imbalance_mean']:.3f}",
            f"{t['imbalance_at_dispatch_mean']:.3f}",
            f"{t['imbalance_at_dispatch_max']:.2f}",
            _ms(t["queue_time_p50_s"]),
            _ms(t["queue_time_p99_s"]),
            _ms(t["ttft_p50_s"]),
            _ms(t["ttft_p99_s"]),
        ]
        for policy, t in traces.items()
    ]
    result.tables.append(
        Table(
            f"Bursty trace, dp {args.dp_size} reference schedulers (times in ms)",
            [
                "policy",
                "done",
                "imb(5ms)",
                "imb@disp",
                "imb@disp max",
                "queue p50",
                "queue p99",
                "ttft p50",
                "ttft p99",
            ],
            trace_rows,
        )
    )
    ours, base = traces[OURS], traces["overwrite"]
    result.headlines.append(
        Headline(
            "p99 TTFT, bursty trace",
            float(ours["ttft_p99_s"] or 0.0),
            float(base["ttft_p99_s"] or 0.0),
            "overwrite + 20 ms throttle",
            "s",
            target="beats the overwrite baseline",
        )
    )
    result.headlines.append(
        Headline(
            "dispatch decisions/s at dp 8",
            rates[OURS]["8"],
            rates["overwrite"]["8"],
            "overwrite + 20 ms throttle",
            "1/s",
            better="higher",
            target=">= 100k/s",
        )
    )
    result.add_target(
        ">= 100k decisions/s at dp 8 (ours)",
        rates[OURS]["8"] >= 100_000,
        f"{rates[OURS]['8']:,.0f}/s",
    )
    result.add_target(
        "ours beats overwrite on p99 TTFT",
        (ours["ttft_p99_s"] or 0.0) < (base["ttft_p99_s"] or 0.0),
        f"ours={_ms(ours['ttft_p99_s'])} ms overwrite={_ms(base['ttft_p99_s'])} ms",
    )
    result.add_target(
        "imbalance < 1.2 (ours, 5 ms samples) where overwrite's is not",
        ours["imbalance_mean"] < 1.2 <= base["imbalance_mean"],
        f"ours={ours['imbalance_mean']:.3f} overwrite={base['imbalance_mean']:.3f}",
    )
    result.data = {
        "decisions_per_s": rates,
        "traces": traces,
        "scheduler_args": list(SCHEDULER_ARGS),
        "dp_size": args.dp_size,
    }
    finish(result, args_list, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
