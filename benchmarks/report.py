"""Run every benchmark at report size, chart the results and regenerate BENCHMARKS.md.

``python -m benchmarks.report`` (or ``make bench``):

1. discovers every ``benchmarks/bench_*.py`` module;
2. runs each as ``python -m benchmarks.bench_<name> <REPORT_ARGS> --json
   benchmarks/results/bench_<name>.json`` in its own process (``--quick`` instead of
   ``REPORT_ARGS`` with ``--quick``);
3. renders each module's charts (its ``plot`` hook) into ``benchmarks/charts/`` and its
   section (its ``summarize`` hook, or the tables of its JSON under its ``TITLE`` with its
   ``LIMITS`` paragraph) into ``BENCHMARKS.md``, headline ratios first.

``--no-run`` re-renders from the JSON already in ``benchmarks/results/``; ``--only NAME`` limits
the run to some benchmarks (the others' existing JSON is still rendered). The module
convention is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import benchmarks
from benchmarks._common import (
    Headline,
    ReportSection,
    default_section,
    fmt_ratio,
    fmt_us,
    machine_info,
)

ROOT: Final[Path] = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final[Path] = ROOT / "benchmarks" / "results"
CHARTS_DIR: Final[Path] = ROOT / "benchmarks" / "charts"
OUTPUT: Final[Path] = ROOT / "BENCHMARKS.md"
DEFAULT_TIMEOUT_S: Final[float] = 600.0
DEFAULT_ORDER: Final[int] = 100


def discover() -> list[str]:
    """Names of every ``benchmarks.bench_*`` module, in report order."""
    names = [
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith("bench_")
    ]
    return sorted(names, key=lambda name: (_order(name), name))


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")


def _order(name: str) -> int:
    try:
        return int(getattr(_module(name), "REPORT_ORDER", DEFAULT_ORDER))
    except Exception:  # a broken module sorts last; running it reports the error
        return DEFAULT_ORDER + 1


def report_args(name: str, quick: bool) -> list[str]:
    """The flags a benchmark runs with in the report."""
    if quick:
        return ["--quick"]
    return [str(arg) for arg in getattr(_module(name), "REPORT_ARGS", [])]


def run_bench(name: str, quick: bool, results_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark in its own process; returns its JSON, or an error record."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    args = report_args(name, quick)
    command = [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(path)]
    print(f"==> {' '.join(['python', '-m', f'benchmarks.{name}', *args])}", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, timeout=timeout_s, check=False)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = -1
    elapsed = time.perf_counter() - started
    print(f"<== {name}: exit {returncode} in {elapsed:.1f} s", flush=True)
    if returncode != 0:
        return {"name": name, "error": f"exit status {returncode} after {elapsed:.0f} s"}
    return dict(json.loads(path.read_text(encoding="utf-8")))


def load_result(name: str, results_dir: Path) -> dict[str, Any] | None:
    """A benchmark's last JSON, or None."""
    path = results_dir / f"{name}.json"
    if not path.exists():
        return None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def build_section(
    name: str, result: dict[str, Any], charts_dir: Path, base: Path = ROOT
) -> ReportSection:
    """Call the module's hooks (``summarize``, ``plot``); fall back to the JSON's tables under
    the module's ``TITLE`` and ``LIMITS``.

    Chart paths are made relative to ``base`` (the directory of the markdown file).
    """
    module = _module(name)
    summarize = getattr(module, "summarize", None)
    section: ReportSection
    if summarize is not None:
        section = summarize(result)
    else:
        title = getattr(module, "TITLE", None)
        section = default_section(result, title, getattr(module, "LIMITS", ""))
    plot = getattr(module, "plot", None)
    if plot is not None:
        charts_dir.mkdir(parents=True, exist_ok=True)
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            section.notes.append("charts skipped: matplotlib missing (install loadsnap[bench])")
        else:
            for path in plot(result, charts_dir):
                section.charts.append(Path(os.path.relpath(path, base)).as_posix())
    return section


def _value(value: float, unit: str) -> str:
    if unit == "µs":
        return f"{fmt_us(value)} µs"
    if unit == "/s":
        return f"{value:,.0f} /s"
    return f"{value:,.3g} {unit}".strip()


def _headline_table(entries: list[tuple[str, Headline]]) -> list[str]:
    lines = [
        "| question | metric | ours | baseline | ours better by | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for title, h in entries:
        lines.append(
            f"| {title} | {h.metric} | {_value(h.ours, h.unit)} | {h.baseline_name}: "
            f"{_value(h.baseline, h.unit)} | **{fmt_ratio(h.ratio)}** | {h.target} |"
        )
    return lines


def render_markdown(
    sections: list[tuple[str, dict[str, Any], ReportSection | None]],
    machine: dict[str, Any],
    quick: bool,
) -> str:
    """The whole BENCHMARKS.md."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# loadsnap benchmarks",
        "",
        f"Generated by `make bench` (`python -m benchmarks.report`) on {now}. Do not edit by "
        "hand: change the benchmark or `benchmarks/report.py` and regenerate. Each benchmark is "
        "a script (`python -m benchmarks.bench_<question>`) that measures ours and the "
        "baselines side by side in one run; compare ratios, not absolute times, across "
        "machines.",
        "",
    ]
    if quick:
        out += ["> **Smoke-test sizes (`--quick`): the numbers below mean nothing.**", ""]
    headlines = [
        (section.title, h) for _, _, section in sections if section for h in section.headlines
    ]
    out += ["## Headline: ours against each baseline, same run", ""]
    out += _headline_table(headlines) if headlines else ["(no results)"]
    targets = [
        (section.title, note)
        for _, _, section in sections
        if section
        for note in section.notes
        if note.startswith(("PASS", "FAIL"))
    ]
    if targets:
        out += ["", "Stated targets:", ""]
        out += [f"- **{title}**: {note}" for title, note in targets]
    out += ["", "## Machine", ""]
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
    out += [
        f"- CPU: {machine.get('cpu')} ({machine.get('cpus_usable')} usable CPUs), "
        f"{machine.get('os')} {machine.get('machine')}",
        f"- {machine.get('python')}; {packages}",
        f"- 1-minute load average at the start: {machine.get('loadavg_1m')}",
        "",
    ]
    for number, (name, result, section) in enumerate(sections, start=1):
        if section is None:
            out += [f"## {number}. {name}", "", f"**Not available**: {result.get('error')}", ""]
            continue
        out += [f"## {number}. {section.title}", "", f"*{section.question}*", ""]
        out += [f"![{section.title}]({chart})" for chart in section.charts]
        if section.charts:
            out.append("")
        out += ["Command:", "", "```bash", str(result.get("command", "")), "```", ""]
        for table in section.tables:
            out += [f"**{table.title}**", "", table.render_markdown(), ""]
        for note in section.notes:
            out.append(f"- {note}")
        if section.notes:
            out.append("")
        if section.limits:
            out += [f"**What limits us, and the floor.** {section.limits}", ""]
        elapsed = result.get("elapsed_s")
        if elapsed is not None:
            out += [f"<sub>Ran in {float(elapsed):.1f} s.</sub>", ""]
    out += [
        "## Reproduce",
        "",
        "```bash",
        "make bench                      # every benchmark at report size, then this file",
        "python -m benchmarks.report --no-run   # re-render from benchmarks/results/*.json",
        *(str(result.get("command", "")) for _, result, s in sections if s is not None),
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, chart, render; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run at smoke-test size")
    parser.add_argument("--no-run", action="store_true", help="render existing JSON only")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON directory")
    parser.add_argument("--charts", type=Path, default=CHARTS_DIR, help="PNG directory")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="markdown file to write")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="s per bench")
    args = parser.parse_args(argv)
    names = discover()
    only = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only or []}
    unknown = sorted(only.difference(names))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names)}")
    sections: list[tuple[str, dict[str, Any], ReportSection | None]] = []
    failed = 0
    for name in names:
        if not args.no_run and (not only or name in only):
            result: dict[str, Any] | None = run_bench(name, args.quick, args.results, args.timeout)
        else:
            result = load_result(name, args.results)
            if result is None:
                result = {"name": name, "error": "no results yet: run `make bench`"}
        assert result is not None
        if "error" in result:
            failed += 1
            sections.append((name, result, None))
            continue
        sections.append(
            (name, result, build_section(name, result, args.charts, args.output.resolve().parent))
        )
    machine = next(
        (r["machine"] for _, r, s in sections if s is not None and "machine" in r),
        machine_info(),
    )
    args.output.write_text(render_markdown(sections, machine, args.quick), encoding="utf-8")
    print(f"wrote {args.output} ({len(sections) - failed} sections, {failed} unavailable)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
