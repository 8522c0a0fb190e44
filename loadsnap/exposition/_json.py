"""The JSON body of ``GET /v1/loads``: a pure function of the reads and the time."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Any, Final

from loadsnap.reading import SlotRead, SlotStatus
from loadsnap.schema import parse_include, snapshot_to_dict

__all__ = ["USABLE_STATUSES", "render_json"]

# Ranks whose snapshot a client may act on (a dead rank's last snapshot is still shown).
USABLE_STATUSES: Final[frozenset[SlotStatus]] = frozenset({SlotStatus.FRESH, SlotStatus.STALE})


def _iso_utc(now_s: float) -> str:
    return datetime.datetime.fromtimestamp(now_s, tz=datetime.UTC).isoformat()


def _aggregate(loads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # Same keys and rounding as the reference endpoint; only ranks that carry core fields count.
    core = [load for load in loads if "num_running_reqs" in load]
    n = len(core)
    if n == 0:
        return {
            "total_running_reqs": 0,
            "total_waiting_reqs": 0,
            "total_reqs": 0,
            "avg_token_usage": 0.0,
            "avg_throughput": 0.0,
            "avg_utilization": 0.0,
        }
    running = sum(load["num_running_reqs"] for load in core)
    waiting = sum(load["num_waiting_reqs"] for load in core)
    return {
        "total_running_reqs": running,
        "total_waiting_reqs": waiting,
        "total_reqs": running + waiting,
        "avg_token_usage": round(sum(load["token_usage"] for load in core) / n, 4),
        "avg_throughput": round(sum(load["gen_throughput"] for load in core) / n, 2),
        "avg_utilization": round(sum(load["utilization"] for load in core) / n, 4),
    }


def render_json(
    reads: Iterable[SlotRead],
    include: str | Iterable[str] = "core",
    now: float = 0.0,
    *,
    version: str = "",
) -> dict[str, Any]:
    """Render reads as the ``/v1/loads`` JSON document.

    The shape extends the reference endpoint's, so clients that parse it keep working::

        {"timestamp": ISO-8601 UTC, "version": str, "dp_rank_count": int,
         "loads": [snapshot.to_dict(include) + num_total_reqs + age_seconds + status + reason],
         "aggregate": {...}, "unavailable": [{"dp_rank", "status", "reason"}]}

    ``loads`` lists every rank that has a decoded snapshot (fresh, stale or dead, so a client
    can judge freshness itself), ordered by rank; ranks with nothing readable (never published,
    torn, invalid) appear in ``unavailable`` instead. ``aggregate`` covers fresh and stale ranks.

    Parameters
    ----------
    reads:
        Slot reads from any :class:`~loadsnap.SnapshotSource`.
    include:
        Section selector, as for :meth:`~loadsnap.LoadSnapshot.to_dict`.
    now:
        Wall-clock time in seconds since the epoch, rendered as ``timestamp``.
    version:
        Producer version string.

    Raises
    ------
    UsageError
        An unknown section in ``include``; the message lists the valid ones.
    """
    sections = parse_include(include)
    loads: list[dict[str, Any]] = []
    usable: list[dict[str, Any]] = []
    unavailable: list[dict[str, Any]] = []
    for read in sorted(reads, key=lambda r: r.rank):
        if read.snapshot is None:
            unavailable.append(
                {"dp_rank": read.rank, "status": read.status.label, "reason": read.reason}
            )
            continue
        load = snapshot_to_dict(read.snapshot, sections)
        if "core" in sections:
            load["num_total_reqs"] = read.snapshot.num_running_reqs + read.snapshot.num_waiting_reqs
        load["age_seconds"] = read.age_s
        load["status"] = read.status.label
        load["reason"] = read.reason
        loads.append(load)
        if read.status in USABLE_STATUSES:
            usable.append(load)
    return {
        "timestamp": _iso_utc(now),
        "version": version,
        "dp_rank_count": len(loads),
        "loads": loads,
        "aggregate": _aggregate(usable),
        "unavailable": unavailable,
    }
