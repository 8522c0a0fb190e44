"""The live per-rank table of ``loadsnap top`` and ``loadsnap demo``: a pure function of reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from loadsnap.reading import SlotRead, SlotStatus

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["render_table"]

BAR_WIDTH: Final[int] = 12
_STATUS_STYLE: Final[dict[SlotStatus, str]] = {
    SlotStatus.FRESH: "green",
    SlotStatus.STALE: "yellow",
    SlotStatus.DEAD: "red",
    SlotStatus.NEVER_PUBLISHED: "dim",
    SlotStatus.TORN: "magenta",
    SlotStatus.INVALID: "magenta",
}


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "█" * filled + "·" * (width - filled)


def render_table(reads: Iterable[SlotRead], title: str = "loadsnap") -> Table:
    """Build a rich table: one row per rank with load bar, KV usage, throughput, age, status.

    The load bar is (running + waiting) relative to the busiest rank, so imbalance shows at a
    glance; idle ranks show empty bars.

    Raises
    ------
    ImportError
        rich is not installed.
    """
    from rich.table import Table

    ordered = sorted(reads, key=lambda r: r.rank)
    loads = [
        r.snapshot.num_running_reqs + r.snapshot.num_waiting_reqs if r.snapshot else 0
        for r in ordered
    ]
    scale = max([1, *loads])
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("run", justify="right", no_wrap=True)
    table.add_column("wait", justify="right", no_wrap=True)
    table.add_column("load", no_wrap=True)
    table.add_column("KV usage", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for read, load in zip(ordered, loads, strict=True):
        style = _STATUS_STYLE[read.status]
        status = f"[{style}]{read.status.label}[/{style}]"
        snap = read.snapshot
        if snap is None:
            table.add_row(str(read.rank), "-", "-", "", "", "-", "-", status)
            continue
        age = "-" if read.age_s is None else f"{read.age_s * 1000:.0f} ms"
        table.add_row(
            str(read.rank),
            str(snap.num_running_reqs),
            str(snap.num_waiting_reqs),
            f"[cyan]{_bar(load / scale)}[/cyan] {load}",
            f"[blue]{_bar(snap.token_usage, 8)}[/blue] {snap.token_usage * 100:5.1f}%",
            f"{snap.gen_throughput:,.0f}",
            age,
            status,
        )
    return table
