"""Publish path: what ``ShmWriter.publish`` costs, and the writer's tail under a reader storm.

Two measurements, one run, every design side by side:

1. **Publish cost**, uncontended: per-call time of ``ShmWriter.publish`` against the bare floor
   (msgspec ``encode_into`` a reused bytearray plus one copy of those bytes into shared memory)
   and against the flock baseline's write (``benchmarks.baselines.flock_segment``: the
   reference's lock wrapper, zero-fill and its own snapshot shape, with the same facts), plus
   the parts our publish adds to the floor, each timed alone: stamping (sequence, epoch, two
   clocks), the pre-publish check (``loadsnap.wire.check_publishable``), packing the
   fixed-width hot record, and the check word (CRC32). All run in interleaved rounds so machine
   noise hits them alike.
2. **Reader storm**: the writer publishes ranks 0..7 in turn, back to back, for
   ``--storm-seconds`` while
   ``--readers`` processes read every rank in a tight loop (ours: ``ShmReader.read_all``; the
   baseline: shared flock plus a decode of every slot). Reported: the writer's per-publish
   p50/p99/p99.9/max, its publish rate, and the readers' rate.
3. **Writer killed mid-write** (``benchmarks._crash``): a forked writer is SIGKILLed after each
   named step of a write, and at random moments of a publish loop; a fresh reader then reads
   every rank: the killed rank's previous record, its new one, or nothing.

By default the writer is pinned to one CPU and the readers to the others (a scheduler owns its
core in production); ``--no-pin`` lets the OS place them. Every sample includes one
``perf_counter_ns`` pair (its cost is printed). Run: ``python -m benchmarks.bench_publish``.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from zlib_ng.zlib_ng import crc32

from benchmarks._common import (
    BenchResult,
    Headline,
    ReportSection,
    Table,
    bench_main,
    default_section,
    fmt_ratio,
    fmt_us,
    latency_stats,
    make_snapshot,
    pin_to_cpus,
    ratio,
    save_figure,
    subplots,
    timer_overhead_ns,
    unique_instance,
)
from benchmarks._crash import FLOCK_STEPS, OURS_STEPS, OUTCOMES, kill_at_random, kill_at_steps
from benchmarks.baselines.flock_segment import FlockSegment, reference_snapshot
from loadsnap import ShmReader, ShmWriter, unlink_segment
from loadsnap.layout import CRC_SEED, CRC_STRUCT, HEAD_STRUCT, RECORD_HEADER_SIZE
from loadsnap.wire import check_publishable

REPORT_ORDER: Final[int] = 1
NAME: Final[str] = "bench_publish"
QUESTION: Final[str] = (
    "What does one publish cost against the floor, and how long does the writer wait while "
    "readers hammer the segment, ours against the reference's flock scheme?"
)
# Report size: fits a 2-core machine in about 20 s.
REPORT_ARGS: Final[list[str]] = [
    "--cost-samples",
    "300000",
    "--storm-seconds",
    "4",
    "--readers",
    "3",
    "--crash-trials",
    "100",
]
DP_SIZE: Final[int] = 8
READER_START_TIMEOUT_S: Final[float] = 60.0
PUBLISH_FLOOR_TARGET: Final[float] = 1.5
STORM_P999_TARGET: Final[float] = 100.0
STORM_TAIL_KEY: Final[str] = "p99.9"
# What our publish adds to the floor, each timed alone (labels for the cost table).
PARTS: Final[dict[str, str]] = {
    "part_stamps": "part: stamp seq, epoch, 2 clocks",
    "part_check": "part: pre-publish check (every section)",
    "part_hot": "part: pack the hot record",
    "part_crc": "part: check word (CRC32 of the record)",
}


# --- publish cost -----------------------------------------------------------------------------


def _time_calls(call: Callable[[], object], count: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    append = out.append
    for _ in range(count):
        t0 = clock()
        call()
        append(clock() - t0)


def measure_cost(samples: int, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Per-call cost of ours, the floor and the flock write, interleaved over ``rounds``."""
    instance = unique_instance("bench-pub")
    flock_path = f"/dev/shm/{unique_instance('bench-pub-flock')}"
    snapshot = make_snapshot(0)
    reference = reference_snapshot(snapshot)  # what the reference's scheduler would publish
    writer = ShmWriter(instance, DP_SIZE, 0)
    flock = FlockSegment(flock_path, DP_SIZE, create=True)
    floor_target = mmap.mmap(-1, 4096)
    try:
        staging = bytearray(2048)
        encode_into = msgspec.msgpack.Encoder().encode_into
        target = memoryview(floor_target)

        def floor() -> None:
            encode_into(snapshot, staging, 0)
            target[64 : 64 + len(staging)] = staging

        def ours() -> None:
            writer.publish(snapshot)

        def flock_write() -> None:
            flock.write(reference)

        record = bytearray(RECORD_HEADER_SIZE) + msgspec.msgpack.encode(snapshot)
        pack_head = HEAD_STRUCT.pack_into
        check_pack = CRC_STRUCT.pack
        payload_len = len(record) - RECORD_HEADER_SIZE

        def part_stamps() -> None:
            snapshot.seq = snapshot.seq + 1
            snapshot.epoch = 1
            snapshot.publish_mono_ns = time.monotonic_ns()
            snapshot.publish_wall_ns = time.time_ns()

        def part_hot() -> None:  # as ShmWriter._write packs it: from attributes
            pack_head(
                record,
                0,
                0,
                payload_len,
                snapshot.seq,
                snapshot.epoch,
                snapshot.publish_mono_ns,
                snapshot.num_running_reqs,
                snapshot.num_waiting_reqs,
                snapshot.num_used_tokens,
                snapshot.num_total_tokens,
                snapshot.max_total_num_tokens,
                snapshot.last_accepted_dispatch_seq,
                snapshot.gen_throughput,
            )

        def part_check() -> None:
            check_publishable(snapshot, record, RECORD_HEADER_SIZE)

        def part_crc() -> None:
            check_pack(crc32(record, CRC_SEED) ^ CRC_SEED)

        designs: dict[str, Callable[[], object]] = {
            "floor": floor,
            "ours": ours,
            "flock": flock_write,
            "part_stamps": part_stamps,
            "part_check": part_check,
            "part_hot": part_hot,
            "part_crc": part_crc,
        }
        samples_ns: dict[str, list[int]] = {name: [] for name in designs}
        per_round = max(1, samples // rounds)
        for call in designs.values():  # warm-up: caches, branch predictors, page faults
            _time_calls(call, min(per_round, 2000), [])
        for _ in range(rounds):
            for name, call in designs.items():
                _time_calls(call, per_round, samples_ns[name])
        target.release()
        return {name: latency_stats(values) for name, values in samples_ns.items()}
    finally:
        floor_target.close()
        flock.close(unlink=True)
        writer.close()
        unlink_segment(instance)


# --- reader storm -----------------------------------------------------------------------------


def storm_reader(
    design: str,
    target: str,
    cpus: list[int],
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """Reader process body: read every rank in a tight loop until ``stop`` is set."""
    pin_to_cpus(cpus)
    reads = 0
    started = time.perf_counter()
    if design == "ours":
        with ShmReader(target) as reader:
            reader.read_all()
            ready.release()
            while not stop.is_set():
                reader.read_all()
                reads += 1
    else:
        segment = FlockSegment(target)
        try:
            segment.read_all()
            ready.release()
            while not stop.is_set():
                segment.read_all()
                reads += 1
        finally:
            segment.close()
    results.put((reads, time.perf_counter() - started))


def _run_storm(
    design: str,
    publish: Callable[[], object],
    target: str,
    readers: int,
    seconds: float,
    pin: bool,
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    stop = ctx.Event()
    results = ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = pin and len(cpus) >= 2
    writer_cpus, reader_cpus = (cpus[:1], cpus[1:]) if pin else (cpus, cpus)
    procs = [
        ctx.Process(
            target=storm_reader,
            args=(design, target, reader_cpus, ready, stop, results),
            daemon=True,
        )
        for _ in range(readers)
    ]
    # If the writer is stuck inside flock when time is up, stopping the readers frees it.
    deadline_guard = threading.Timer(seconds + 5.0, stop.set)
    samples: list[int] = []
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            if not ready.acquire(timeout=READER_START_TIMEOUT_S):
                raise RuntimeError(f"storm readers did not start (design={design})")
        if pin:
            pin_to_cpus(writer_cpus)
        deadline_guard.start()
        clock = time.perf_counter_ns
        append = samples.append
        end = clock() + int(seconds * 1e9)
        started = clock()
        now = started
        while now < end:
            publish()
            t1 = clock()
            append(t1 - now)
            now = t1
        elapsed_s = (now - started) / 1e9
        stop.set()
        read_counts: list[tuple[int, float]] = []
        for _ in procs:
            with contextlib.suppress(queue.Empty):
                read_counts.append(results.get(timeout=30.0))
    finally:
        stop.set()
        deadline_guard.cancel()
        if pin:
            pin_to_cpus(cpus)
        for proc in procs:
            proc.join(timeout=10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
        results.join_thread()
    stats = latency_stats(samples)
    stats["publish_rate_per_s"] = len(samples) / elapsed_s if elapsed_s > 0 else float("nan")
    stats["reader_reads_per_s"] = sum(n / max(t, 1e-9) for n, t in read_counts)
    stats["readers"] = float(readers)
    stats["seconds"] = elapsed_s
    return stats


def measure_storm(readers: int, seconds: float, pin: bool) -> dict[str, dict[str, float]]:
    """Writer latency under ``readers`` tight-loop reader processes, ours then flock."""
    instance = unique_instance("bench-storm")
    flock_path = f"/dev/shm/{unique_instance('bench-storm-flock')}"
    writers = [ShmWriter(instance, DP_SIZE, rank) for rank in range(DP_SIZE)]
    flock = FlockSegment(flock_path, DP_SIZE, create=True)
    try:
        snapshots = [make_snapshot(rank) for rank in range(DP_SIZE)]
        references = [reference_snapshot(snapshot) for snapshot in snapshots]
        for rank, writer in enumerate(writers):
            writer.publish(snapshots[rank])
            flock.write(references[rank])
        turn = [0]

        # One process publishes every rank in turn (standing in for DP_SIZE schedulers), so
        # every rank stays fresh and readers see the steady state of a busy deployment.
        def ours() -> None:
            rank = turn[0] = (turn[0] + 1) % DP_SIZE
            writers[rank].publish(snapshots[rank])

        def flock_write() -> None:
            rank = turn[0] = (turn[0] + 1) % DP_SIZE
            flock.write(references[rank])

        return {
            "ours": _run_storm("ours", ours, instance, readers, seconds, pin),
            "flock": _run_storm("flock", flock_write, flock_path, readers, seconds, pin),
        }
    finally:
        flock.close(unlink=True)
        for writer in writers:
            writer.close()
        unlink_segment(instance)


# --- result -----------------------------------------------------------------------------------


def measure_crash(trials: int) -> dict[str, Any]:
    """Writers SIGKILLed at each step (``trials`` each) and at random moments (10x as many)."""
    return {"steps": kill_at_steps(max(1, trials // 10)), "random": kill_at_random(trials)}


def build_result(
    cost: dict[str, dict[str, float]],
    storm: dict[str, dict[str, float]],
    config: dict[str, Any],
    crash: dict[str, Any] | None = None,
) -> BenchResult:
    """Tables, headlines and targets from the raw measurements."""
    data = {"cost": cost, "storm": storm, "config": config, "crash": crash}
    result = BenchResult(NAME, QUESTION, data=data)
    floor, ours, flock = cost["floor"], cost["ours"], cost["flock"]
    cost_rows = [
        [label, fmt_us(s["p50"]), fmt_us(s["p99"]), fmt_us(s["p99.9"]), fmt_us(s["max"]), x]
        for label, s, x in (
            ("floor (encode_into + 1 copy)", floor, "1.00x"),
            ("ours: ShmWriter.publish", ours, fmt_ratio(ratio(ours["p50"], floor["p50"]))),
            ("flock baseline write", flock, fmt_ratio(ratio(flock["p50"], floor["p50"]))),
            *(
                (label, cost[key], fmt_ratio(ratio(cost[key]["p50"], floor["p50"])))
                for key, label in PARTS.items()
                if key in cost
            ),
        )
    ]
    result.tables.append(
        Table(
            f"Publish cost, uncontended, µs per call "
            f"({int(floor['n'])} samples each; timer pair {config['timer_ns']:.0f} ns)",
            ["design", "p50", "p99", "p99.9", "max", "p50 / floor"],
            cost_rows,
        )
    )
    s_ours, s_flock = storm["ours"], storm["flock"]
    storm_rows = []
    for key in ("p50", "p99", "p99.9", "max"):
        storm_rows.append(
            [
                f"writer {key} (µs)",
                fmt_us(s_ours[key]),
                fmt_us(s_flock[key]),
                fmt_ratio(ratio(s_flock[key], s_ours[key])),
            ]
        )
    storm_rows.append(
        [
            "publishes / s",
            f"{s_ours['publish_rate_per_s']:,.0f}",
            f"{s_flock['publish_rate_per_s']:,.0f}",
            fmt_ratio(ratio(s_ours["publish_rate_per_s"], s_flock["publish_rate_per_s"])),
        ]
    )
    storm_rows.append(
        [
            "reader read_all / s (all readers)",
            f"{s_ours['reader_reads_per_s']:,.0f}",
            f"{s_flock['reader_reads_per_s']:,.0f}",
            fmt_ratio(ratio(s_ours["reader_reads_per_s"], s_flock["reader_reads_per_s"])),
        ]
    )
    pinning = "writer pinned to its own CPU" if config["pinned"] else "no pinning"
    result.tables.append(
        Table(
            f"Writer under a reader storm: {config['readers']} reader processes, dp_size "
            f"{DP_SIZE}, {config['storm_seconds']:g} s each, {pinning}",
            ["metric", "ours", "flock baseline", "ours better by"],
            storm_rows,
        )
    )
    result.headlines += [
        Headline(
            "writer p99.9 under reader storm",
            s_ours["p99.9"],
            s_flock["p99.9"],
            "flock segment",
            "µs",
            target=f">= {STORM_P999_TARGET:g}x",
        ),
        Headline(
            "writer max under reader storm",
            s_ours["max"],
            s_flock["max"],
            "flock segment",
            "µs",
        ),
        Headline(
            "publish rate under reader storm",
            s_ours["publish_rate_per_s"],
            s_flock["publish_rate_per_s"],
            "flock segment",
            "/s",
            better="higher",
        ),
        Headline("publish cost, median, uncontended", ours["p50"], flock["p50"], "flock", "µs"),
    ]
    floor_ratio = ratio(ours["p50"], floor["p50"])
    result.add_target(
        f"publish median within {PUBLISH_FLOOR_TARGET:g}x of the floor",
        floor_ratio <= PUBLISH_FLOOR_TARGET,
        f"ours {fmt_us(ours['p50'])} µs / floor {fmt_us(floor['p50'])} µs = "
        f"{fmt_ratio(floor_ratio)}",
    )
    if crash is not None:
        _crash_results(result, crash)
    storm_ratio = ratio(s_flock[STORM_TAIL_KEY], s_ours[STORM_TAIL_KEY])
    result.add_target(
        f"writer p99.9 under the storm >= {STORM_P999_TARGET:g}x lower than flock",
        storm_ratio >= STORM_P999_TARGET,
        f"flock {fmt_us(s_flock['p99.9'])} µs / ours {fmt_us(s_ours['p99.9'])} µs = "
        f"{fmt_ratio(storm_ratio)}",
    )
    return result


_DESIGN_LABELS: Final = {
    "ours": "ours",
    "compat": "sglang's scheduler through loadsnap.compat.sglang",
    "flock": "flock baseline (sglang's scheme)",
}


def _crash_results(result: BenchResult, crash: dict[str, Any]) -> None:
    """The crash-injection tables, headline and target."""
    steps = crash["steps"]
    rows = []
    for design, names in (("ours", OURS_STEPS), ("flock", FLOCK_STEPS)):
        for step in names:
            counts = steps[design][step]
            label = "ours" if design == "ours" else "flock baseline"
            rows.append([f"{label}: killed after {step}", *(str(counts[o]) for o in OUTCOMES)])
    trials = sum(steps["ours"][OURS_STEPS[0]].values())
    result.tables.append(
        Table(
            f"Writer SIGKILLed after each step of a write ({trials} kills each): what a fresh "
            "read_all returns for its rank",
            ["kill", "previous record", "new record", "rank missing"],
            rows,
        )
    )
    random_counts = crash["random"]
    kills = sum(random_counts["ours"].values())
    result.tables.append(
        Table(
            f"Writer SIGKILLed at a random moment (1-5 ms) of a publish loop ({kills} kills each)",
            ["design", "previous or new record", "rank missing"],
            [
                [
                    _DESIGN_LABELS[design],
                    str(counts["record_a"] + counts["record_b"]),
                    str(counts["missing"]),
                ]
                for design, counts in random_counts.items()
            ],
        )
    )
    ours_lost = sum(c["missing"] for c in steps["ours"].values()) + random_counts["ours"]["missing"]
    flock_lost = (
        sum(c["missing"] for c in steps["flock"].values()) + random_counts["flock"]["missing"]
    )
    all_kills = kills + trials * len(OURS_STEPS)
    result.headlines.append(
        Headline(
            "ranks missing after a writer SIGKILLed mid-write (random moments)",
            float(random_counts["ours"]["missing"]),
            float(random_counts["flock"]["missing"]),
            "flock segment",
            f"of {kills}",
        )
    )
    result.add_target(
        "ours: a writer killed at any step never makes its rank disappear",
        ours_lost == 0,
        f"ours: {ours_lost} of {all_kills} kills; flock baseline: {flock_lost} of "
        f"{kills + trials * len(FLOCK_STEPS)}",
    )
    compat_lost = random_counts["compat"]["missing"]
    result.add_target(
        "sglang swapped to loadsnap.compat.sglang: a scheduler killed mid-write keeps its rank",
        compat_lost == 0,
        f"compat: {compat_lost} of {kills} kills missing; sglang's own scheme (flock baseline): "
        f"{random_counts['flock']['missing']} of {kills}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--cost-samples", type=int, default=200_000, help="samples per design")
    parser.add_argument("--storm-seconds", type=float, default=3.0, help="seconds per design")
    parser.add_argument("--readers", type=int, default=3, help="reader processes in the storm")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the writer to its own CPU"
    )
    parser.add_argument("--crash-trials", type=int, default=50, help="writer kills per design")


QUICK: Final = dict(cost_samples=3000, storm_seconds=0.2, readers=2, crash_trials=10)


def run(args: argparse.Namespace) -> BenchResult:
    """The uncontended cost of every design, the writer's tail under the reader storm, then
    writers killed mid-write."""
    config: dict[str, Any] = {
        "cost_samples": args.cost_samples,
        "storm_seconds": args.storm_seconds,
        "readers": args.readers,
        "dp_size": DP_SIZE,
        "timer_ns": timer_overhead_ns(),
        "payload_bytes": len(msgspec.msgpack.encode(make_snapshot(0))),
    }
    cost = measure_cost(args.cost_samples)
    storm = measure_storm(args.readers, args.storm_seconds, pin=not args.no_pin)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    config["pinned"] = not args.no_pin and cpus >= 2
    crash = measure_crash(args.crash_trials)
    return build_result(cost, storm, config, crash)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    return bench_main(__doc__, argv, run, add_arguments, QUICK)


# --- report hooks -----------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> ReportSection:
    """BENCHMARKS.md section: tables from the JSON plus what limits the publish path."""
    cost = result["data"]["cost"]
    parts = {key: cost[key]["p50"] for key in PARTS if key in cost}
    breakdown = (
        f" (measured alone in this run: stamping {fmt_us(parts['part_stamps'])} µs, the "
        f"pre-publish check {fmt_us(parts['part_check'])} µs, the hot record "
        f"{fmt_us(parts['part_hot'])} µs, the check word {fmt_us(parts['part_crc'])} µs)"
        if len(parts) == len(PARTS)
        else ""
    )
    limits = (
        "The floor is msgspec encoding the snapshot into a reused buffer plus one copy into "
        f"shared memory ({fmt_us(cost['floor']['p50'])} µs here for a "
        f"{result['data']['config']['payload_bytes']} B payload). Our publish makes the same "
        "single copy (double buffering: into the copy readers are not using, then one 8-byte "
        "store) and adds stamping the sequence, epoch and two clocks, the pre-publish check "
        "(a snapshot readers would refuse is refused here, so it never replaces the rank's "
        "record; with a section present that is the readers' own validating decode), packing "
        "the 10-field fixed-width hot record, and the check word (a CRC32 of the record)"
        f"{breakdown}. The check alone costs about twice the floor with every section filled, "
        "so 1.5x the floor is out of reach for a check done by msgspec's decoder; the rest is "
        "interpreter work, not waiting (CPython's struct converts each hot field separately, "
        "about 20 ns a field), and would take a compiled helper for check, pack, CRC and copy. "
        "The flock baseline's write is the reference's own: lock wrapper, 16 KiB zero-fill, "
        "its smaller snapshot, and no check. Under the reader storm our writer never takes a "
        "lock, so its tail is set by the OS scheduler (preemption, interrupts), while the "
        "flock baseline's writer waits for every reader holding the shared lock, which with "
        "several readers is nearly always one. Killed mid-write, the baseline loses the rank "
        "from every read until it writes again whenever the kill lands between its two length "
        "stores (the zero-fill of 16 KiB is most of that window); ours keeps the previous "
        "record readable at every step, since the copy readers are sent to is never written."
    )
    return default_section(result, "Publish path", limits)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Two bar charts: publish cost against the floor; writer tail under the storm (log)."""
    cost, storm = result["data"]["cost"], result["data"]["storm"]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    names = ["floor", "ours", "flock"]
    labels = ["floor\nencode+copy", "ours\nShmWriter.publish", "flock baseline\nwrite"]
    colors = ["#999999", "#1f77b4", "#d62728"]
    x = range(len(names))
    ax1.bar(x, [cost[n]["p50"] for n in names], color=colors, label="median")
    ax1.scatter(x, [cost[n]["p99"] for n in names], color="black", marker="_", s=400, label="p99")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("µs per publish")
    ax1.set_title("Publish cost, uncontended")
    ax1.legend()
    keys = ["p50", "p99", "p99.9", "max"]
    width = 0.38
    positions = list(range(len(keys)))
    ax2.bar(
        [p - width / 2 for p in positions],
        [storm["ours"][k] for k in keys],
        width,
        color=colors[1],
        label="ours",
    )
    ax2.bar(
        [p + width / 2 for p in positions],
        [storm["flock"][k] for k in keys],
        width,
        color=colors[2],
        label="flock baseline",
    )
    ax2.set_yscale("log")
    ax2.set_xticks(positions, keys)
    ax2.set_ylabel("writer latency per publish, µs (log)")
    readers = int(storm["ours"]["readers"])
    ax2.set_title(f"Writer latency with {readers} readers in a tight loop")
    ax2.legend()
    return save_figure(fig, out_dir, "publish.png")


if __name__ == "__main__":
    raise SystemExit(main())
