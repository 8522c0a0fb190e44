"""Shared benchmark helpers: the skeleton, statistics, tables, JSON output, machine info, charts.

Every ``benchmarks/bench_<question>.py`` is its measurement: ``main`` hands :func:`bench_main`
the module's flags, its ``--quick`` sizes and a function from the parsed flags to a
:class:`BenchResult`; :func:`bench_main` parses (``--json PATH`` and ``--quick`` for every
bench, from :func:`make_parser`), times the run, prints the tables and writes the JSON
(:func:`finish`). The report (``python -m benchmarks.report``) reads the JSON back and draws
each chart between :func:`subplots` and :func:`save_figure`; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from loadsnap import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    SpeculativeSection,
)

__all__ = [
    "BenchResult",
    "FlagError",
    "Headline",
    "ReportSection",
    "Table",
    "bench_main",
    "default_section",
    "finish",
    "latency_stats",
    "machine_info",
    "make_parser",
    "make_snapshot",
    "pin_to_cpus",
    "ratio",
    "save_figure",
    "subplots",
    "unique_instance",
]

# Packages whose versions every result records.
VERSIONED_PACKAGES: Final[tuple[str, ...]] = (
    "loadsnap",
    "msgspec",
    "numpy",
    "pyzmq",
    "posix_ipc",
    "matplotlib",
)
PERCENTILES: Final[tuple[tuple[str, float], ...]] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)


# --- workload ---------------------------------------------------------------------------------


def make_snapshot(rank: int, cycle: int = 0) -> LoadSnapshot:
    """A realistic snapshot of a busy decode rank with every section filled (~900 B msgpack).

    ``cycle`` varies the counts a little so consecutive snapshots differ like real ones.
    """
    jitter = cycle % 17
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=212 + jitter,
        num_waiting_reqs=37 + jitter % 5,
        num_waiting_uncached_tokens=48_213 + 31 * jitter,
        num_used_tokens=1_374_912 + 977 * jitter,
        num_total_tokens=1_712_000,
        max_total_num_tokens=1_712_000,
        max_running_requests=256,
        token_usage=0.803 + jitter / 10_000,
        gen_throughput=8_341.5 + jitter,
        cache_hit_rate=0.4127,
        utilization=0.9375,
        cycle=cycle,
        last_accepted_dispatch_seq=1_000_000 + cycle,
        memory=MemorySection(
            weight_bytes=16_060_522_496,
            kv_cache_bytes=54_760_833_024,
            activation_bytes=5_368_709_120,
            device_total_bytes=85_899_345_920,
            device_used_bytes=79_456_894_976,
            kv_token_capacity=1_712_000,
        ),
        speculative=SpeculativeSection(num_draft_tokens=4, accept_length=2.87, accept_rate=0.7175),
        lora=LoraSection(
            max_loaded_adapters=8,
            loaded_adapters=[
                "customer-support-llama3-8b-r16",
                "sql-generator-v2-r32",
            ],
        ),
        disaggregation=DisaggregationSection(
            mode="decode",
            num_prealloc_queue_reqs=3,
            num_transfer_queue_reqs=5,
            num_bootstrap_queue_reqs=1,
            num_inflight_queue_reqs=9,
        ),
        queues=QueueSection(
            num_grammar_queue_reqs=2,
            num_paused_reqs=0,
            num_retracted_reqs=1,
            num_chunked_prefill_reqs=4,
            num_prefill_reqs=6,
            num_decode_reqs=206,
        ),
    )


def unique_instance(prefix: str) -> str:
    """An instance (segment) name no other run uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pin_to_cpus(cpus: Sequence[int]) -> bool:
    """Pin the calling process to ``cpus`` where the OS allows it; returns whether it did."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError:
        return False
    return True


# --- statistics -------------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100.0 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


def latency_stats(samples_ns: Sequence[int], scale: float = 1e-3) -> dict[str, float]:
    """Median, tail percentiles, max and mean of ``samples_ns``, converted with ``scale``.

    The default scale gives microseconds. Keys: ``n, mean, p50, p90, p99, p99.9, max``.
    """
    ordered = sorted(samples_ns)
    out: dict[str, float] = {"n": float(len(ordered))}
    out["mean"] = statistics.fmean(ordered) * scale if ordered else float("nan")
    for name, pct in PERCENTILES:
        out[name] = _percentile(ordered, pct) * scale
    out["max"] = float(ordered[-1]) * scale if ordered else float("nan")
    return out


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when undefined."""
    if denominator <= 0 or numerator != numerator or denominator != denominator:
        return float("nan")
    return numerator / denominator


def timer_overhead_ns(rounds: int = 20_000) -> float:
    """Median cost of one back-to-back ``perf_counter_ns`` pair (what every sample includes)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(rounds):
        t0 = clock()
        samples.append(clock() - t0)
    return float(statistics.median(samples))


# --- results ----------------------------------------------------------------------------------


@dataclass
class Table:
    """A fixed-width table: printed by the bench, rendered as markdown by the report."""

    title: str
    headers: list[str]
    rows: list[list[str]]

    def render_text(self) -> str:
        """Fixed-width text, columns right-aligned except the first."""
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        rule = "  ".join("-" * w for w in widths)
        body = [line(row) for row in self.rows]
        return "\n".join([self.title, line(self.headers), rule, *body])

    def render_markdown(self) -> str:
        """A GitHub-flavoured markdown table (no title)."""
        align = ["---"] + ["---:"] * (len(self.headers) - 1)
        lines = ["| " + " | ".join(self.headers) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"title": self.title, "headers": self.headers, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Table:
        """Inverse of :meth:`to_json`."""
        return cls(str(data["title"]), list(data["headers"]), [list(r) for r in data["rows"]])


@dataclass
class Headline:
    """One line of BENCHMARKS.md's headline table: ours against a baseline, same run.

    ``better`` says which direction wins: ``"lower"`` (latency, cost) or ``"higher"`` (rate).
    ``ratio`` is always "how many times better ours is" (> 1 means ours wins).
    """

    metric: str
    ours: float
    baseline: float
    baseline_name: str
    unit: str
    better: str = "lower"
    target: str = ""

    @property
    def ratio(self) -> float:
        """How many times better ours is than the baseline."""
        if self.better == "lower":
            return ratio(self.baseline, self.ours)
        return ratio(self.ours, self.baseline)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (ratio included for readers of the raw JSON)."""
        return {
            "metric": self.metric,
            "ours": self.ours,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "unit": self.unit,
            "better": self.better,
            "target": self.target,
            "ratio": self.ratio,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Headline:
        """Inverse of :meth:`to_json`."""
        return cls(
            metric=str(data["metric"]),
            ours=float(data["ours"]),
            baseline=float(data["baseline"]),
            baseline_name=str(data["baseline_name"]),
            unit=str(data["unit"]),
            better=str(data.get("better", "lower")),
            target=str(data.get("target", "")),
        )


@dataclass
class BenchResult:
    """Everything one benchmark run produced; serialised as the ``--json`` document."""

    name: str
    question: str
    tables: list[Table] = field(default_factory=list)
    headlines: list[Headline] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add_target(self, description: str, passed: bool, detail: str) -> None:
        """Record a stated target and whether this run met it."""
        self.targets.append({"target": description, "passed": passed, "detail": detail})

    def print_tables(self) -> None:
        """Print every table, then targets, fixed width."""
        for table in self.tables:
            print(table.render_text())
            print()
        for target in self.targets:
            verdict = "PASS" if target["passed"] else "FAIL"
            print(f"[{verdict}] {target['target']}: {target['detail']}")

    def to_json(self, argv: Sequence[str], elapsed_s: float) -> dict[str, Any]:
        """The JSON document (schema in benchmarks/README.md)."""
        return {
            "name": self.name,
            "question": self.question,
            "command": command_line(self.name, argv),
            "elapsed_s": round(elapsed_s, 3),
            "machine": machine_info(),
            "tables": [t.to_json() for t in self.tables],
            "headlines": [h.to_json() for h in self.headlines],
            "targets": self.targets,
            "data": self.data,
        }


def command_line(name: str, argv: Sequence[str]) -> str:
    """The exact command that reproduces a run (``--json`` left out)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--json":
            skip = True
            continue
        if arg.startswith("--json="):
            continue
        args.append(arg)
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


def machine_info() -> dict[str, Any]:
    """CPU, core count, OS, Python and package versions."""
    versions: dict[str, str] = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cpus_usable": affinity,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# --- CLI --------------------------------------------------------------------------------------


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares: ``--json PATH`` and ``--quick``."""
    description = (doc or "").strip().splitlines()[0] if doc else None
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="tiny size for the smoke test (numbers meaningless)"
    )
    return parser


def finish(
    result: BenchResult, argv: Sequence[str], started: float, json_path: str | None
) -> dict[str, Any]:
    """Print the tables, write ``--json`` if asked, and return the JSON document."""
    document = result.to_json(argv, time.perf_counter() - started)
    result.print_tables()
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    sys.stdout.flush()
    return document


class FlagError(ValueError):
    """Flag values a benchmark cannot run with: :func:`bench_main` reports it as argparse would."""


def bench_main(
    doc: str | None,
    argv: Sequence[str] | None,
    measure: Callable[[argparse.Namespace], BenchResult],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    quick: Mapping[str, Any] | None = None,
) -> int:
    """The whole of a benchmark's ``main``: parse, measure, print the tables, write ``--json``.

    Parameters
    ----------
    doc:
        The module docstring; its first line is the ``--help`` description.
    argv:
        The arguments (``sys.argv[1:]`` when None).
    measure:
        Runs the benchmark with the parsed flags and returns what it measured. It may raise
        :class:`FlagError` before measuring anything: the usage error exits 2.
    add_arguments:
        Adds the benchmark's own flags to the parser (``--json`` and ``--quick`` are there).
    quick:
        Flag values (by ``dest``) that replace the parsed ones under ``--quick``.

    Returns
    -------
    int
        The exit status, 0.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(doc)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(args_list)
    if args.quick:
        for dest, value in (quick or {}).items():
            setattr(args, dest, value)
    started = time.perf_counter()
    try:
        result = measure(args)
    except FlagError as exc:
        parser.error(str(exc))
    finish(result, args_list, started, args.json)
    return 0


# --- report sections (bench modules return these from their ``summarize`` hook) ----------------


@dataclass
class ReportSection:
    """What a bench contributes to BENCHMARKS.md (see benchmarks/README.md).

    ``charts`` are filled by the report from the module's ``plot`` hook; ``tables`` default to
    the JSON's tables; ``limits`` is the paragraph on what limits us and where the floor is.
    """

    title: str
    question: str
    limits: str
    tables: list[Table] = field(default_factory=list)
    headlines: list[Headline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)


def default_section(
    result: dict[str, Any], title: str | None = None, limits: str = ""
) -> ReportSection:
    """A section from the JSON: its tables, headlines and targets, under ``title`` (the bench's
    name when None) with the ``limits`` paragraph. What the report renders for a bench without a
    ``summarize`` hook, from its ``TITLE`` and ``LIMITS``."""
    notes = [
        f"{'PASS' if t['passed'] else 'FAIL'}: {t['target']} ({t['detail']})"
        for t in result.get("targets", [])
    ]
    return ReportSection(
        title=str(result.get("name", "benchmark")) if title is None else title,
        question=str(result.get("question", "")),
        limits=limits,
        tables=[Table.from_json(t) for t in result.get("tables", [])],
        headlines=[Headline.from_json(h) for h in result.get("headlines", [])],
        notes=notes,
    )


def fmt_us(value: float) -> str:
    """Microseconds with sensible precision."""
    if value != value:
        return "n/a"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    """A ratio as ``12.3x``."""
    if value != value:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}x"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


# --- charts (matplotlib is imported here, when a chart is drawn: the report chose Agg) ---------


def subplots(*args: Any, **kwargs: Any) -> Any:
    """``matplotlib.pyplot.subplots(*args, **kwargs)``: a figure and its axes."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, out_dir: Path, name: str) -> list[Path]:
    """Lay ``fig`` out, write it as ``out_dir / name`` (PNG, 110 dpi) and close it.

    Returns the paths written, as a ``plot`` hook returns them.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
