"""Freshness: how old is the load the controller acts on, and what does publishing cost a step?

Two measurements, one run:

1. **Age at dispatch.** A publisher process stands in for ``--dp-size`` schedulers running
   decode steps of ``--step-ms``: after every step each rank calls its own
   ``loadsnap.LoadPublisher.on_cycle`` with ``every_n_cycles=N`` (ranks staggered),
   so a rank publishes every N steps through a real ``ShmWriter`` (every rank reports the same
   load, so which rank is chosen does not depend on when it last published). In this process a
   ``DPBudget`` (our dispatcher) reads the segment through a ``ShmReader`` with a refresh
   throttle of T ms and dispatches at Poisson arrivals (``--rate`` per second). At each
   decision the age of the load it acted on is ``now - publish_mono_ns`` of the chosen rank in
   the last hot table the budget read: ``HotTable.age_s`` at read time plus the time the
   throttle kept that table. Reported: median and p99 per (N, T), next to the expectation
   ``(N x step + T) / 2`` for the median. The reference design's cadence (N = 15, T = 20 ms)
   is the baseline row.
2. **Publishing share of a step.** A ``BatchEngine`` with ``--batch`` running decode requests
   and a ``LoadPublisher`` over a real ``ShmWriter``: ``on_cycle()`` (snapshot built from the
   engine, encoded, published once every N cycles) is timed over many cycles; its mean per
   cycle is divided by a step, i.e. the sim cost model's decode step for that batch (what a
   GPU would spend) plus the engine's own measured Python work for the step. The same with the
   reference design's flock-guarded segment (``benchmarks.baselines.FlockSegment``) as the
   writer. N = 1, 15, 50.

Run: ``python -m benchmarks.bench_freshness`` (``--quick`` for the smoke size).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks._common import (
    BenchResult,
    Headline,
    Table,
    bench_main,
    fmt_ratio,
    fmt_us,
    latency_stats,
    make_snapshot,
    ratio,
    save_figure,
    subplots,
    unique_instance,
)
from benchmarks.baselines.flock_segment import FlockSegment
from dp_controller.budget import BudgetConfig, DPBudget, Policy
from loadsnap._segment import unlink_segment
from loadsnap.publisher import LoadPublisher
from loadsnap.reading import HotTable
from loadsnap.schema import LoadSnapshot
from loadsnap.shm_reader import ShmReader
from loadsnap.shm_writer import ShmWriter
from loadsnap.transport import SnapshotWriter
from scheduler.engine import BatchEngine, EngineConfig
from scheduler.executors import CostModel, SimExecutor
from scheduler.messages import Request

NAME: Final[str] = "bench_freshness"
QUESTION: Final[str] = (
    "How old is the load the controller acts on at each dispatch, against publish interval "
    "and refresh throttle, and what share of a scheduler step does publishing cost?"
)
CADENCES: Final[tuple[int, ...]] = (1, 15, 50)
RR_KEY: Final[str] = Policy.ROUND_ROBIN.value
OURS_KEY: Final[str] = Policy.WORK_OVER_THROUGHPUT.value
REFERENCE_N: Final[int] = 15
REFERENCE_THROTTLE_MS: Final[float] = 20.0
POOL_TOKENS: Final[int] = 1 << 20  # large enough that the timed decode steps never retract
AGE_POLICIES: Final[tuple[Policy, ...]] = (Policy.ROUND_ROBIN, Policy.WORK_OVER_THROUGHPUT)
PUBLISHER_START_TIMEOUT_S: Final[float] = 30.0
REPORT_ORDER: Final[int] = 5
REPORT_ARGS: Final[list[str]] = ["--seconds", "1.5"]


# --- 1. age at dispatch ------------------------------------------------------------------------


def publisher_process(
    instance: str, dp_size: int, every_n: int, step_s: float, ready: Any, stop: Any
) -> None:
    """Child body: ``dp_size`` ranks stepping every ``step_s``, each publishing every N steps."""
    writers = [ShmWriter(instance, dp_size, rank) for rank in range(dp_size)]
    try:
        # Every rank reports the same load, so the dispatcher's choice (rotating tie-break)
        # does not depend on which rank published last: the age measures cadence and throttle.
        def provider_for(rank: int) -> Callable[[], LoadSnapshot]:
            return lambda: make_snapshot(rank, 0)

        publishers = [
            LoadPublisher(writer, provider_for(rank), every_n_cycles=every_n)
            for rank, writer in enumerate(writers)
        ]
        for rank, publisher in enumerate(publishers):
            publisher.publish_now()
            for _ in range(rank * every_n // dp_size):  # stagger the ranks' cadences
                publisher.on_cycle()
        ready.set()
        next_step = time.monotonic()
        while not stop.is_set():
            next_step += step_s
            delay = next_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for publisher in publishers:
                publisher.on_cycle()
    finally:
        for writer in writers:
            writer.close()


class RecordingSource:
    """A ``ShmReader`` that remembers the last hot table it returned. Single owner."""

    def __init__(self, reader: ShmReader) -> None:
        self.reader = reader
        self.last: HotTable | None = None

    @property
    def dp_size(self) -> int:
        """The reader's ``dp_size``."""
        return self.reader.dp_size

    @property
    def stale_after_s(self) -> float:
        """The reader's staleness budget."""
        return self.reader.stale_after_s

    def read_all(self) -> Any:
        """The reader's ``read_all``."""
        return self.reader.read_all()

    def hot_table(self) -> HotTable:
        """The reader's ``hot_table``, remembered."""
        self.last = self.reader.hot_table()
        return self.last


def measure_ages(
    reader: ShmReader, throttle_s: float, rate: float, seconds: float, seed: int
) -> dict[str, dict[str, float]]:
    """Dispatch at Poisson arrivals for ``seconds``; age (ms) of the chosen rank's load.

    Each arrival is dispatched by two budgets over the same reader: round robin (the choice
    ignores load, so the age is cadence and throttle alone) and ours (the default policy,
    which may prefer ranks that reported recently).
    """
    sources = {policy: RecordingSource(reader) for policy in AGE_POLICIES}
    budgets = {
        policy: DPBudget(
            sources[policy], BudgetConfig(policy=policy, refresh_interval_s=throttle_s)
        )
        for policy in AGE_POLICIES
    }
    rng = random.Random(seed)
    ages_ns: dict[Policy, list[int]] = {policy: [] for policy in AGE_POLICIES}
    clock = time.monotonic_ns
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < end:
        next_at += rng.expovariate(rate)
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for policy, budget in budgets.items():
            chosen = budget.dispatch(200).rank
            now = clock()
            table = sources[policy].last
            if table is not None and bool(table.valid[chosen]):
                ages_ns[policy].append(now - int(table.publish_mono_ns[chosen]))
    out = {}
    for policy, samples in ages_ns.items():
        stats = latency_stats(samples, scale=1e-6)
        stats["refreshes"] = float(budgets[policy].stats.refreshes)
        out[policy.value] = stats
    return out


def measure_cadence(
    every_n: int, throttles_ms: Sequence[float], args: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """One publisher process at cadence N; every throttle measured against it in turn."""
    instance = unique_instance("bench-fresh")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=publisher_process,
        args=(instance, args.dp_size, every_n, args.step_ms / 1e3, ready, stop),
        daemon=True,
    )
    out: dict[str, dict[str, dict[str, float]]] = {}
    try:
        proc.start()
        if not ready.wait(PUBLISHER_START_TIMEOUT_S):
            raise RuntimeError(f"publisher did not start (every_n={every_n})")
        with ShmReader(instance) as reader:
            for i, throttle_ms in enumerate(throttles_ms):
                out[f"{throttle_ms:g}"] = measure_ages(
                    reader, throttle_ms / 1e3, args.rate, args.seconds, seed=every_n * 100 + i
                )
    finally:
        stop.set()
        proc.join(timeout=10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
        unlink_segment(instance)
    return out


# --- 2. publishing share of a step -------------------------------------------------------------


class FlockWriter:
    """The flock baseline as a ``SnapshotWriter`` for one rank. Single writer; not thread-safe."""

    def __init__(self, segment: FlockSegment) -> None:
        self.segment = segment
        self.published = 0

    def publish(self, snapshot: LoadSnapshot) -> int:
        """Write ``snapshot`` under the exclusive lock."""
        self.segment.write(snapshot)
        self.published += 1
        return self.published

    def close(self) -> None:
        """Nothing to release (the segment is closed by its owner)."""


def _decode_engine(batch: int) -> tuple[BatchEngine, SimExecutor, float]:
    """An engine with ``batch`` requests decoding, and the modelled time of its decode step."""
    config = EngineConfig(max_running_requests=max(64, batch), max_total_num_tokens=POOL_TOKENS)
    engine = BatchEngine(config, 0, time.monotonic_ns())
    executor = SimExecutor(CostModel(), kv_capacity=POOL_TOKENS, sleep=lambda _s: None)
    for i in range(batch):
        request = Request(
            rid=i,
            dispatch_seq=i + 1,
            prompt=[(i * 131 + j) % 30_000 + 1 for j in range(64)],
            max_new_tokens=POOL_TOKENS // (2 * batch),
            dispatched_mono_ns=time.monotonic_ns(),
        )
        engine.add_request(request, time.monotonic_ns())
    step_s = 0.0
    for _ in range(100):  # prefill everything, then the first decode step
        plan = engine.schedule(time.monotonic_ns())
        if plan is None:
            break
        engine.complete(plan, executor.execute(plan), time.monotonic_ns())
        if plan.prefill_tokens == 0:
            step_s = executor.cost.step_s(plan)
            break
    return engine, executor, step_s


def _time_engine_cycles(engine: BatchEngine, executor: SimExecutor, cycles: int) -> float:
    """Mean Python cost (ns) of schedule + execute (no sleep) + complete per decode step."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(cycles):
        plan = engine.schedule(time.monotonic_ns())
        if plan is None:
            break
        engine.complete(plan, executor.execute(plan), time.monotonic_ns())
    return (clock() - t0) / cycles


def _time_on_cycle(publisher: LoadPublisher, cycles: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean ``on_cycle`` cost (ns) over ``cycles`` calls."""
    clock = time.perf_counter_ns
    means = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(cycles):
            publisher.on_cycle()
        means.append((clock() - t0) / cycles)
    return float(statistics.median(means))


def measure_share(batch: int, cycles: int, rounds: int) -> dict[str, Any]:
    """Publishing cost per cycle for every N, ours and flock, against one decode step."""
    engine, executor, model_step_s = _decode_engine(batch)
    engine_ns = _time_engine_cycles(engine, executor, max(200, cycles // 10))
    instance = unique_instance("bench-share")
    flock_path = f"/dev/shm/{unique_instance('bench-share-flock')}"
    shm = ShmWriter(instance, 1, 0)
    flock = FlockSegment(flock_path, 1, create=True)
    memory = executor.memory_section()

    def provider() -> LoadSnapshot:
        return engine.snapshot(time.monotonic_ns(), memory)

    writers: dict[str, SnapshotWriter] = {"ours": shm, "flock": FlockWriter(flock)}
    per_cycle: dict[str, dict[str, float]] = {name: {} for name in writers}
    try:
        for every_n in CADENCES:
            n_cycles = max(every_n, cycles // every_n * every_n)
            for name, writer in writers.items():
                publisher = LoadPublisher(writer, provider, every_n_cycles=every_n)
                _time_on_cycle(publisher, n_cycles, 1)  # warm-up
                per_cycle[name][str(every_n)] = _time_on_cycle(publisher, n_cycles, rounds)
    finally:
        flock.close(unlink=True)
        shm.close()
        unlink_segment(instance)
    step_ns = model_step_s * 1e9 + engine_ns
    return {
        "batch": batch,
        "model_step_ns": model_step_s * 1e9,
        "engine_ns": engine_ns,
        "step_ns": step_ns,
        "per_cycle_ns": per_cycle,
    }


def _share(cost_ns: float, step_ns: float) -> float:
    return cost_ns / (step_ns + cost_ns)


# --- result ------------------------------------------------------------------------------------


def build_result(
    ages: dict[str, dict[str, dict[str, dict[str, float]]]],
    share: dict[str, Any],
    config: dict[str, Any],
) -> BenchResult:
    """Tables, headlines and targets from the raw measurements."""
    result = BenchResult(NAME, QUESTION, data={"ages": ages, "share": share, "config": config})
    step_ms = config["step_ms"]
    rows = []
    for n, by_throttle in ages.items():
        for throttle, by_policy in by_throttle.items():
            label = f"N={n}, throttle {throttle} ms"
            if int(n) == REFERENCE_N and float(throttle) == REFERENCE_THROTTLE_MS:
                label += " (reference)"
            expected = (int(n) * step_ms + float(throttle)) / 2
            rr, ours = by_policy[RR_KEY], by_policy[OURS_KEY]
            rows.append(
                [
                    label,
                    f"{int(n) * step_ms:g}",
                    f"{int(rr['n'])}",
                    f"{expected:.1f}",
                    f"{rr['p50']:.2f}",
                    f"{rr['p99']:.2f}",
                    f"{ours['p50']:.2f}",
                    f"{ours['p99']:.2f}",
                    f"{ours['max']:.2f}",
                ]
            )
    result.tables.append(
        Table(
            f"Age of the chosen rank's load at each dispatch (ms): dp {config['dp_size']}, "
            f"{step_ms:g} ms steps, Poisson {config['rate']:g} dispatches/s",
            [
                "cadence",
                "publish every (ms)",
                "decisions",
                "~expected p50",
                "round robin p50",
                "round robin p99",
                "ours p50",
                "ours p99",
                "ours max",
            ],
            rows,
        )
    )
    step_ns = share["step_ns"]
    per = share["per_cycle_ns"]
    share_rows = []
    for cadence in CADENCES:
        ours, flock = per["ours"][str(cadence)], per["flock"][str(cadence)]
        share_rows.append(
            [
                f"N={cadence}",
                fmt_us(ours / 1e3),
                f"{100 * _share(ours, step_ns):.3f}%",
                fmt_us(flock / 1e3),
                f"{100 * _share(flock, step_ns):.3f}%",
                fmt_ratio(ratio(flock, ours)),
            ]
        )
    result.tables.append(
        Table(
            f"Publishing cost per scheduler cycle (µs) and its share of a step: "
            f"{share['batch']}-request decode step = {share['model_step_ns'] / 1e6:.2f} ms "
            f"modelled + {share['engine_ns'] / 1e3:.0f} µs engine work",
            [
                "publish every",
                "ours µs/cycle",
                "ours share",
                "flock µs/cycle",
                "flock share",
                "flock / ours",
            ],
            share_rows,
        )
    )
    ref = ages.get(str(REFERENCE_N), {}).get(f"{REFERENCE_THROTTLE_MS:g}", {}).get(OURS_KEY)
    best = ages.get("1", {}).get("0", {}).get(OURS_KEY)
    if ref is not None and best is not None:
        result.headlines.append(
            Headline(
                "load age at dispatch, median (N=1, no throttle vs N=15, 20 ms)",
                best["p50"],
                ref["p50"],
                "reference cadence",
                "ms",
            )
        )
        result.headlines.append(
            Headline(
                "load age at dispatch, p99 (N=1, no throttle vs N=15, 20 ms)",
                best["p99"],
                ref["p99"],
                "reference cadence",
                "ms",
            )
        )
    ours1, flock1 = per["ours"]["1"], per["flock"]["1"]
    result.headlines.append(
        Headline(
            "publishing share of a decode step, N=1",
            100 * _share(ours1, step_ns),
            100 * _share(flock1, step_ns),
            "flock segment",
            "%",
        )
    )
    share1 = _share(ours1, step_ns)
    result.add_target(
        "publishing every cycle (N=1) costs under 1% of a decode step",
        share1 < 0.01,
        f"{fmt_us(ours1 / 1e3)} µs per cycle / {step_ns / 1e6:.2f} ms step = {100 * share1:.3f}%",
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--dp-size", type=int, default=4, help="simulated ranks")
    parser.add_argument("--step-ms", type=float, default=3.0, help="decode step of a rank")
    parser.add_argument(
        "--throttles-ms",
        type=float,
        nargs="+",
        default=[0.0, REFERENCE_THROTTLE_MS, 100.0],
        help="controller refresh throttles to measure",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="dispatches per second")
    parser.add_argument("--seconds", type=float, default=1.5, help="per (N, throttle)")
    parser.add_argument("--batch", type=int, default=32, help="decode batch for the share")
    parser.add_argument("--cycles", type=int, default=30_000, help="cycles timed per N")
    parser.add_argument("--rounds", type=int, default=5)


QUICK: Final = dict(seconds=0.25, cycles=1500, rounds=1)


def run(args: argparse.Namespace) -> BenchResult:
    """The ages at every publish interval and throttle, then the publishing share of a step."""
    config: dict[str, Any] = {
        "dp_size": args.dp_size,
        "step_ms": args.step_ms,
        "throttles_ms": args.throttles_ms,
        "rate": args.rate,
        "seconds": args.seconds,
    }
    ages = {str(n): measure_cadence(n, args.throttles_ms, args) for n in CADENCES}
    share = measure_share(args.batch, args.cycles, args.rounds)
    return build_result(ages, share, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    return bench_main(__doc__, argv, run, add_arguments, QUICK)


# --- report hooks ------------------------------------------------------------------------------


TITLE: Final[str] = "Freshness"
LIMITS: Final[str] = (
    "The age the controller acts on is set by configuration, not by the transport: a rank "
    "publishes every N steps and the controller re-reads at most every T ms, so the median "
    "age is about (N x step + T) / 2 and the tail about N x step + T; the shared-memory "
    "read itself adds microseconds. The physical floor is one step (a scheduler cannot "
    "report a step before it ends), reached with N = 1 and no throttle, which publishing "
    "can afford: its cost per cycle (building the snapshot from the engine, msgspec "
    "encode, one copy into the slot) is a few microseconds against a step of milliseconds. "
    "Dispatch-critical freshness also comes from the ledger: dispatches a rank has not yet "
    "acknowledged are counted on top of whatever age its load has."
)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Median and p99 age against publish interval, one line per throttle; share bars."""
    ages, share = result["data"]["ages"], result["data"]["share"]
    step_ms = result["data"]["config"]["step_ms"]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    cadences = list(ages)
    throttles = list(ages[cadences[0]])
    xs = [int(n) * step_ms for n in cadences]
    for throttle in throttles:
        p50 = [ages[n][throttle][OURS_KEY]["p50"] for n in cadences]
        p99 = [ages[n][throttle][OURS_KEY]["p99"] for n in cadences]
        line = ax1.plot(xs, p50, marker="o", label=f"p50, throttle {throttle} ms")[0]
        ax1.plot(xs, p99, marker="^", linestyle="--", color=line.get_color(), label="p99")
    ax1.set_xlabel("publish interval, ms (N x step)")
    ax1.set_ylabel("age of the load at dispatch, ms")
    ax1.set_title("Load age the controller acts on")
    ax1.legend(fontsize=7)
    per = share["per_cycle_ns"]
    width = 0.38
    positions = list(range(len(CADENCES)))
    for offset, name, color in ((-width / 2, "ours", "#1f77b4"), (width / 2, "flock", "#d62728")):
        ax2.bar(
            [p + offset for p in positions],
            [100 * _share(per[name][str(n)], share["step_ns"]) for n in CADENCES],
            width,
            color=color,
            label=name if name == "ours" else "flock baseline",
        )
    ax2.set_xticks(positions, [f"N={n}" for n in CADENCES])
    ax2.set_ylabel("publishing share of a decode step, %")
    ax2.set_title(f"Publishing cost, {share['model_step_ns'] / 1e6:.1f} ms decode step")
    ax2.legend()
    return save_figure(fig, out_dir, "freshness.png")


if __name__ == "__main__":
    raise SystemExit(main())
