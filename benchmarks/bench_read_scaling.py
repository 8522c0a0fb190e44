"""Read scaling: what it costs to read every rank at dp_size 8, 64, 256 and 1024.

Per dp_size, one run, every design side by side (µs per call, median and p99 over
``--repeats`` calls, the designs interleaved call by call):

- **read_all, all changed** (ours): ``ShmReader.read_all`` right after every rank published,
  so every slot is read, checked and decoded, and every ``SlotRead`` rebuilt;
- **read_all, 10% changed** (ours): a tenth of the ranks published since the last call;
- **read_all, nothing changed** (ours): no rank published since the last call (a controller
  polling faster than the schedulers publish);
- **read_changed, 10% changed** (ours): only the changed ranks are read at all;
- **hot table, all changed / nothing changed** (ours): ``ShmReader.hot_table``, every rank's
  dispatch-critical numbers as numpy arrays, no msgpack decoding; every changed record is
  still read whole and its check word tested (as ``read`` does);
- **floors** (what any design of ours must at least do, so what bounds each ratio): *decode*
  msgspec-decodes every rank's payload (bytes copied out beforehand, no protocol, no status),
  each snapshot replacing the one kept from the call before, as ``read_all`` must; *gather +
  CRC* loads every sequence word, copies every advertised record and runs one CRC over them,
  with no sequence checks and no table (rank by rank in plain Python up to 32 ranks, one numpy
  gather above, the longest record known ahead): the memory work the hot table cannot skip
  while it tests every check word; *table* builds a ``HotTable`` (its 13 arrays, as views of
  one buffer where it can) from hot records already copied out, with no checks, statuses or
  liveness: what handing out numpy arrays costs;
- **flock baseline**: the reference's ``read_all`` (``benchmarks.baselines.flock_segment``):
  shared ``flock`` through its context-manager wrapper, then a decode of every slot, of the
  reference's own snapshot shape carrying the same facts. It has no cheaper way for unchanged
  ranks, so every design is compared with this one call.

Every snapshot is ``benchmarks._common.make_snapshot`` (every section filled). Untimed set-up
before each call republishes the ranks, so every rank stays fresh (no liveness probes) and the
reader's cache is in the intended state; the flock segment is rewritten at the same time, so
both designs read memory the writers just wrote. What a caller pays is measured: ``read_all``
returns decoded snapshots, the hot table its arrays. Writers for every rank live in this
process. Run: ``python -m benchmarks.bench_read_scaling``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

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
    ratio,
    save_figure,
    subplots,
    unique_instance,
)
from benchmarks._read_floors import Floors
from benchmarks.baselines.flock_segment import (
    FlockSegment,
    ReferenceSnapshot,
    reference_snapshot,
)
from loadsnap import LoadSnapshot, ShmReader, ShmWriter, unlink_segment
from loadsnap.layout import CRC_CHECK_VALUE

REPORT_ORDER: Final[int] = 2
NAME: Final[str] = "bench_read_scaling"
QUESTION: Final[str] = (
    "How does reading every rank scale with dp_size: full decode, changed-only decode and the "
    "numpy hot table, against the reference's lock-and-decode-everything read?"
)
REPORT_ARGS: Final[list[str]] = ["--dp", "8,64,256,1024", "--repeats", "40"]
CHANGED_FRACTION: Final[float] = 0.10
DESIGNS: Final[tuple[tuple[str, str], ...]] = (
    ("full", "ours: read_all, all changed (full decode)"),
    ("all_10pct", "ours: read_all, 10% changed"),
    ("all_none", "ours: read_all, nothing changed"),
    ("changed_10pct", "ours: read_changed, 10% changed"),
    ("hot_table", "ours: hot_table, all changed"),
    ("hot_none", "ours: hot_table, nothing changed"),
    ("floor_decode", "floor: decode every payload (msgspec alone)"),
    ("floor_gather", "floor: gather every record + one CRC"),
    ("floor_table", "floor: build the HotTable's arrays"),
    ("flock", "flock baseline: lock + decode all"),
)
# Stated targets (issue 16): (design, dp sizes, at least this many times faster than flock).
TARGETS: Final[tuple[tuple[str, tuple[int, ...], float], ...]] = (
    ("full", (8, 64, 256, 1024), 1.5),
    ("all_none", (8, 64, 256, 1024), 10.0),
    ("hot_table", (8,), 3.0),
    ("hot_table", (1024,), 20.0),
)


# The floors under each target's design: work it cannot skip (see the module docstring).
FLOORS: Final[dict[str, tuple[str, ...]]] = {
    "full": ("floor_decode", "floor_gather"),
    "hot_table": ("floor_gather", "floor_table"),
}


def measure_dp(dp_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Every design's per-call cost at one ``dp_size``, interleaved call by call."""
    instance = unique_instance("bench-read")
    flock_path = f"/dev/shm/{unique_instance('bench-read-flock')}"
    writers: list[ShmWriter] = []
    flock = FlockSegment(flock_path, dp_size, create=True)
    reader = ShmReader(instance)
    floors: Floors | None = None
    try:
        snapshots: list[LoadSnapshot] = []
        references: list[ReferenceSnapshot] = []
        for rank in range(dp_size):
            writers.append(ShmWriter(instance, dp_size, rank))
            snapshots.append(make_snapshot(rank, cycle=rank))
            references.append(reference_snapshot(snapshots[rank]))
            flock.write(references[rank])
        step = max(1, round(1 / CHANGED_FRACTION))
        offset = [0]

        def publish(ranks: range) -> None:
            for rank in ranks:
                writers[rank].publish(snapshots[rank])
                flock.write(references[rank])

        def publish_all() -> None:
            publish(range(dp_size))

        def publish_some() -> None:
            # Every rank fresh and consumed, then a rotating tenth of them publish again.
            publish_all()
            reader.read_all()
            offset[0] = (offset[0] + 1) % step
            publish(range(offset[0] % dp_size, dp_size, step))

        def publish_none() -> None:
            publish_all()
            reader.read_all()

        def publish_none_table() -> None:
            publish_all()
            reader.hot_table()

        floors = Floors(reader.segment_path, dp_size, writers[0].geometry.payload_capacity)

        def publish_floors() -> None:
            publish_all()
            assert floors is not None
            floors.prepare()

        designs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "full": (publish_all, reader.read_all),
            "all_10pct": (publish_some, reader.read_all),
            "all_none": (publish_none, reader.read_all),
            "changed_10pct": (publish_some, reader.read_changed),
            "hot_table": (publish_all, reader.hot_table),
            "hot_none": (publish_none_table, reader.hot_table),
            "floor_decode": (publish_floors, floors.decode),
            "floor_gather": (publish_floors, floors.gather),
            "floor_table": (publish_floors, floors.table),
            "flock": (publish_all, flock.read_all),
        }
        publish_all()
        reader.read_all()  # attach and warm up
        reader.hot_table()
        flock.read_all()
        clock = time.perf_counter_ns
        samples: dict[str, list[int]] = {name: [] for name in designs}
        for _ in range(repeats):
            for name, (setup, call) in designs.items():
                setup()
                t0 = clock()
                call()
                samples[name].append(clock() - t0)
        check = reader.read_all()
        if any(read.snapshot is None for read in check) or len(flock.read_all()) != dp_size:
            raise RuntimeError(f"read_scaling: some rank unreadable at dp_size={dp_size}")
        publish_floors()  # the floors did the work they name: every rank, whole records
        floors.decode()
        ranks = [snapshot.dp_rank if snapshot else -1 for snapshot in floors.decoded()]
        if (
            ranks != list(range(dp_size))
            or floors.gather() != CRC_CHECK_VALUE
            or floors.table().dp_size != dp_size
        ):
            raise RuntimeError(f"read_scaling: a floor missed a rank at dp_size={dp_size}")
        return {name: latency_stats(values) for name, values in samples.items()}
    finally:
        if floors is not None:
            floors.close()
        reader.close()
        flock.close(unlink=True)
        for writer in writers:
            writer.close()
        unlink_segment(instance)


def payload_sizes() -> dict[str, int]:
    """Bytes of msgpack each design stores per rank for the benchmark's snapshot."""
    snapshot = make_snapshot(0)
    return {
        "ours": len(msgspec.msgpack.encode(snapshot)),
        "flock": len(msgspec.msgpack.encode(reference_snapshot(snapshot))),
    }


def build_result(
    by_dp: dict[int, dict[str, dict[str, float]]], config: dict[str, Any]
) -> BenchResult:
    """Tables, headlines and targets from the raw measurements."""
    payloads = payload_sizes()
    data = {
        "config": config,
        "payload_bytes": payloads,
        "by_dp": {str(dp): v for dp, v in by_dp.items()},
    }
    result = BenchResult(NAME, QUESTION, data=data)
    sizes = sorted(by_dp)
    rows = []
    for key, label in DESIGNS:
        rows.append([label, *(fmt_us(by_dp[dp][key]["p50"]) for dp in sizes)])
    result.tables.append(
        Table(
            f"Read every rank: median µs per call ({config['repeats']} calls each; payload per "
            f"rank: ours {payloads['ours']} B, flock baseline {payloads['flock']} B)",
            ["design", *(f"dp {dp}" for dp in sizes)],
            rows,
        )
    )
    per_rank = [
        [label, *(f"{by_dp[dp][key]['p50'] * 1000 / dp:,.0f}" for dp in sizes)]
        for key, label in DESIGNS
    ]
    result.tables.append(
        Table("Median ns per rank", ["design", *(f"dp {dp}" for dp in sizes)], per_rank)
    )
    ratio_rows = []
    for key, label in DESIGNS[:-1]:
        ratio_rows.append(
            [
                label,
                *(
                    fmt_ratio(ratio(by_dp[dp]["flock"]["p50"], by_dp[dp][key]["p50"]))
                    for dp in sizes
                ),
            ]
        )
    result.tables.append(
        Table(
            "Flock baseline median / ours median (> 1: ours faster)",
            ["design", *(f"dp {dp}" for dp in sizes)],
            ratio_rows,
        )
    )
    for dp in dict.fromkeys((sizes[0], sizes[-1])):
        for key, metric in (
            ("hot_table", "hot table, all changed"),
            ("all_none", "read_all, nothing changed"),
            ("all_10pct", "read_all, 10% changed"),
            ("full", "read_all, all changed"),
        ):
            result.headlines.append(
                Headline(
                    f"read every rank at dp {dp}: {metric}",
                    by_dp[dp][key]["p50"],
                    by_dp[dp]["flock"]["p50"],
                    "flock lock+decode",
                    "µs",
                    target=_target_text(key, dp),
                )
            )
    for key, target_sizes, times in TARGETS:
        label = dict(DESIGNS)[key]
        for dp in target_sizes:
            if dp not in by_dp:
                continue
            got = ratio(by_dp[dp]["flock"]["p50"], by_dp[dp][key]["p50"])
            result.add_target(
                f"{label.removeprefix('ours: ')} at dp {dp} >= {times:g}x faster than flock",
                got >= times,
                f"flock {fmt_us(by_dp[dp]['flock']['p50'])} µs / ours "
                f"{fmt_us(by_dp[dp][key]['p50'])} µs = {fmt_ratio(got)}"
                + _floor_text(key, by_dp[dp]),
            )
    return result


def floor_bound(key: str, at_dp: dict[str, dict[str, float]]) -> float | None:
    """The most ``key`` could gain on the baseline if it did nothing but its floors (the flock
    median over the sum of the floors' medians, each measured alone); None without floors."""
    floors = FLOORS.get(key, ())
    if not floors or any(floor not in at_dp for floor in floors):
        return None
    return ratio(at_dp["flock"]["p50"], sum(at_dp[floor]["p50"] for floor in floors))


def _floor_text(key: str, at_dp: dict[str, dict[str, float]]) -> str:
    bound = floor_bound(key, at_dp)
    if bound is None:
        return ""
    parts = " + ".join(dict(DESIGNS)[floor].removeprefix("floor: ") for floor in FLOORS[key])
    return f"; its floors ({parts}) alone allow at most {fmt_ratio(bound)}"


def _target_text(key: str, dp: int) -> str:
    for target_key, target_sizes, times in TARGETS:
        if target_key == key and dp in target_sizes:
            return f">= {times:g}x"
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--dp", default="8,64,256,1024", help="comma-separated dp sizes")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per design")


QUICK: Final = dict(dp="4,16", repeats=5)


def run(args: argparse.Namespace) -> BenchResult:
    """Every design at every dp size."""
    sizes = [int(x) for x in args.dp.split(",") if x.strip()]
    config: dict[str, Any] = {"dp_sizes": sizes, "repeats": args.repeats}
    by_dp = {dp: measure_dp(dp, args.repeats) for dp in sizes}
    return build_result(by_dp, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    return bench_main(__doc__, argv, run, add_arguments, QUICK)


# --- report hooks -----------------------------------------------------------------------------


TITLE: Final[str] = "Read scaling"


def summarize(result: dict[str, Any]) -> ReportSection:
    """BENCHMARKS.md section with the limits paragraph (its figures from the run)."""
    payloads = result["data"].get("payload_bytes", {"ours": 0, "flock": 0})
    by_dp: dict[str, dict[str, dict[str, float]]] = result["data"]["by_dp"]
    sizes = sorted(by_dp, key=int)
    limits = (
        "What a call costs depends on how many ranks published since the reader last looked. "
        "None: one copy of the control table (64 B a rank, contiguous) compared with the "
        "previous one, then the cached reads, whose ages are measured when asked; that copy "
        "and compare and handing out the list are the floor, a few µs even at dp 1024, where "
        "the baseline has no cheaper way than locking and decoding every slot. Some: each "
        "moved rank's record is read through the seqlock (two atomic loads of its sequence "
        "word, its own sequence, its check word; all check words of a call in one CRC call), "
        "decoded and given a new SlotRead, and the others are reused. All: every rank pays "
        "that path. " + _floors_paragraph(by_dp, sizes, payloads)
    )
    return default_section(result, TITLE, limits)


def _floors_paragraph(
    by_dp: dict[str, dict[str, dict[str, float]]], sizes: list[str], payloads: dict[str, int]
) -> str:
    """Where the floors put each target, from the run's own figures."""
    if "floor_decode" not in by_dp[sizes[0]]:
        return ""  # a result from before the floors were measured

    def span(key: str) -> str:
        low, high = (
            ratio(by_dp[dp]["flock"]["p50"], by_dp[dp][key]["p50"]) for dp in (sizes[0], sizes[-1])
        )
        return f"{fmt_ratio(low)} (dp {sizes[0]}) to {fmt_ratio(high)} (dp {sizes[-1]})"

    beyond: list[str] = []
    within: list[str] = []
    for key, target_sizes, times in TARGETS:
        for dp in target_sizes:
            bound = floor_bound(key, by_dp[str(dp)]) if str(dp) in by_dp else None
            if bound is None:
                continue
            name = (
                f"{dict(DESIGNS)[key].removeprefix('ours: ').split(',')[0]} {times:g}x at dp {dp}"
            )
            (beyond if bound < times else within).append(f"{name} (at most {fmt_ratio(bound)})")
    text = (
        "The floors, measured alone in the same run, bound every all-changed figure: decoding "
        f"our {payloads['ours']} B payloads alone runs at {span('floor_decode')} the "
        f"baseline's speed (it decodes a {payloads['flock']} B snapshot carrying fewer facts; "
        "ours adds adapter names, memory in bytes, identity and freshness stamps), reading and "
        f"checking every record alone at {span('floor_gather')} (memory bound at large dp: "
        "about 1 KB a rank out of memory the writers just wrote), and building the hot "
        f"table's 13 numpy arrays alone at {span('floor_table')} (microseconds of interpreter "
        "work per array, whatever dp). Each floor is timed alone after a publish, as cold as "
        "the designs; done back to back, the second part of a pair would run a little warmer, "
        "so a bound from two floors is approximate. "
    )
    if beyond:
        text += (
            "Out of reach of the floors, so of any reorganisation of the Python around the "
            f"decode and the copy: {'; '.join(beyond)}. Meeting those would take a smaller "
            "schema (the decode), smaller records (the copy) or compiled code (the per-rank "
            "work and the arrays). "
        )
    if within:
        text += (
            f"Not excluded by the floors but not met: {'; '.join(within)}; ours spends "
            "microseconds a rank beyond them on the seqlock checks, statuses, SlotRead objects "
            "and freeing the snapshots they replace. "
        )
    return text + (
        "The hot table must test every moved record's check word, decoded or not, so that "
        "it accepts exactly what read() accepts."
    )


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Cost of reading every rank against dp_size, log-log, one line per design."""
    by_dp = result["data"]["by_dp"]
    sizes = sorted(int(dp) for dp in by_dp)
    styles = {
        "full": ("#1f77b4", "o-"),
        "all_10pct": ("#17becf", "s-"),
        "all_none": ("#17becf", "s:"),
        "changed_10pct": ("#2ca02c", "^-"),
        "hot_table": ("#9467bd", "D-"),
        "hot_none": ("#9467bd", "D:"),
        "floor_decode": ("#7f7f7f", "."),
        "floor_gather": ("#7f7f7f", "+"),
        "floor_table": ("#7f7f7f", "1"),
        "flock": ("#d62728", "x--"),
    }
    fig, ax = subplots(figsize=(7.5, 4.5))
    for key, label in DESIGNS:
        if key not in by_dp[str(sizes[0])]:
            continue  # a result from before this design existed
        color, style = styles[key]
        ax.plot(
            sizes, [by_dp[str(dp)][key]["p50"] for dp in sizes], style, color=color, label=label
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(dp) for dp in sizes])
    ax.set_xlabel("dp_size (ranks)")
    ax.set_ylabel("median µs to read every rank (log)")
    ax.set_title("Cost of reading every rank")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "read_scaling.png")


if __name__ == "__main__":
    raise SystemExit(main())
