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
from benchmarks.baselines.flock_segment import (
    FlockSegment,
    ReferenceSnapshot,
    reference_snapshot,
)
from loadsnap import LoadSnapshot, ShmReader, ShmWriter, unlink_segment

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
    ("flock", "flock baseline: lock + decode all"),
)
# Stated targets (issue 16): (design, dp sizes, at least this many times faster than flock).
TARGETS: Final[tuple[tuple[str, tuple[int, ...], float], ...]] = (
    ("full", (8, 64, 256, 1024), 1.5),
    ("all_none", (8, 64, 256, 1024), 10.0),
    ("hot_table", (8,), 3.0),
    ("hot_table", (1024,), 20.0),
)


def measure_dp(dp_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Every design's per-call cost at one ``dp_size``, interleaved call by call."""
    instance = unique_instance("bench-read")
    flock_path = f"/dev/shm/{unique_instance('bench-read-flock')}"
    writers: list[ShmWriter] = []
    flock = FlockSegment(flock_path, dp_size, create=True)
    reader = ShmReader(instance)
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

        designs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "full": (publish_all, reader.read_all),
            "all_10pct": (publish_some, reader.read_all),
            "all_none": (publish_none, reader.read_all),
            "changed_10pct": (publish_some, reader.read_changed),
            "hot_table": (publish_all, reader.hot_table),
            "hot_none": (publish_none_table, reader.hot_table),
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
        return {name: latency_stats(values) for name, values in samples.items()}
    finally:
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
                f"{fmt_us(by_dp[dp][key]['p50'])} µs = {fmt_ratio(got)}",
            )
    return result


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
    """BENCHMARKS.md section with the limits paragraph."""
    payloads = result["data"].get("payload_bytes", {"ours": 0, "flock": 0})
    limits = (
        "What a call costs depends on how many ranks published since the reader last looked. "
        "None: one copy of the control table (64 B a rank, contiguous) compared with the "
        "previous one, then the cached reads, whose ages are measured when asked; that copy "
        "and compare and handing out the list are the floor, a few µs even at dp 1024, where "
        "the baseline has no cheaper way than locking and decoding every slot. Some: each "
        "moved rank's record is read through the seqlock (two atomic loads of its sequence "
        "word, its own sequence, its check word; all check words of a call in one CRC call), "
        "decoded and given a new SlotRead, and the others are reused; with 10% moved that wins "
        "from dp 64 up, while at dp 8 the one moved rank's path (about 14 µs of fixed Python "
        "and numpy work) costs what the baseline's whole read does. All: every rank pays that "
        "path, about twice the baseline's per rank, which is the floor of this design in "
        f"CPython: msgspec's typed decode of our {payloads['ours']} B snapshot (about 1.1 µs, "
        f"more with cold caches) against the reference's {payloads['flock']} B one (about "
        "0.8 µs; ours carries more: adapter names, memory in bytes, identity and freshness "
        "stamps), plus about 1 µs a rank of seqlock checks, status and SlotRead that the "
        "baseline does not do (it never checks a record and reports no status or age). The hot "
        "table skips the decoding but must still read every moved record whole and test its "
        "check word, so that it accepts exactly what read() accepts: with every rank moved "
        "that is a gather of about 1 KB a rank out of memory the writers just wrote (about "
        "1 MB at dp 1024, most of its cost there), and at dp 8 the fixed cost of checking the "
        "records one by one and building 14 numpy arrays outweighs the baseline's 8 decodes. "
        "An array-encoded LoadSnapshot would shrink our payload about 4x (less to copy and "
        "check) and its decode about 10%, but LoadSnapshot's JSON schema and exposition "
        "(issue 15) read it as a map, so it is left for a coordinated change."
    )
    return default_section(result, TITLE, limits)


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
