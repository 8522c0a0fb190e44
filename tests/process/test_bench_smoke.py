"""Smoke test: every ``benchmarks.bench_*`` module runs at its ``--quick`` size and reports.

Modules are discovered, so a new benchmark is covered as soon as it exists. Each one must
follow the convention in benchmarks/README.md: ``main(argv) -> int`` taking ``--quick`` and
``--json PATH``, a JSON document the report can render.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks._common import ReportSection

BENCHES = report.discover()


def test_benchmarks_are_discovered() -> None:
    assert "bench_publish" in BENCHES
    assert "bench_read_scaling" in BENCHES


@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_quick_and_renders(name: str, tmp_path: Path) -> None:
    module = report._module(name)
    assert module.__doc__, f"{name} needs a docstring saying what it measures"
    for arg in getattr(module, "REPORT_ARGS", []):
        assert isinstance(arg, str), f"{name}.REPORT_ARGS must be a list of str"
    out = tmp_path / f"{name}.json"
    assert module.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in ("name", "question", "command", "machine", "tables", "headlines", "data"):
        assert key in result, f"{name} JSON lacks {key!r}"
    assert result["tables"], f"{name} printed no table"
    section = report.build_section(name, result, tmp_path / "charts", tmp_path)
    assert isinstance(section, ReportSection)
    for chart in section.charts:
        assert (tmp_path / chart).is_file()
    markdown = report.render_markdown([(name, result, section)], result["machine"], quick=True)
    assert section.title in markdown


def test_report_renders_missing_results(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    argv = ["--no-run", "--results", str(tmp_path / "none"), "--charts", str(tmp_path / "c")]
    assert report.main([*argv, "--output", str(output)]) == 1
    text = output.read_text(encoding="utf-8")
    assert "Not available" in text
