"""In-flight accounting: which requests each rank holds, and exactly one result for each.

Theory of operation
-------------------
:class:`InFlight` keeps, per rank, ``rid -> (dispatch_seq, prompt length, dispatch time)`` for
every request sent and not yet reported. A scheduler's result is taken only if it matches an
entry on ``(dp_rank, rid, dispatch_seq)`` (:meth:`InFlight.take`); anything else is counted, not
reported: ``late_results`` for a request already reported failed (its result was in transit
when its rank was declared lost), ``unknown_results`` for one that was never ours (another
controller's, or a forged one). When a rank is lost, :meth:`InFlight.fail` turns every entry it
held into a ``Finished(status="failed", reason=...)`` and remembers the newest
``remember_failures`` of them, so that their late results are recognised. An entry leaves by
exactly one of the two paths, so each request is reported exactly once.

Pure bookkeeping: no sockets, no clock (the caller passes the time), no dispatcher.
"""

from __future__ import annotations

import enum
from typing import Final

from loadsnap.errors import UsageError
from scheduler.messages import Finished

__all__ = ["MAX_REMEMBERED_FAILURES", "FailureReason", "InFlight"]

_NS: Final[int] = 1_000_000_000
# Requests reported failed that are remembered to tell a late result from an unknown one.
MAX_REMEMBERED_FAILURES: Final[int] = 65_536


class FailureReason(enum.Enum):
    """Why the controller reported a request failed (``Finished.reason``)."""

    RANK_DEAD = "rank_dead"  # the scheduler process is gone (its writer is dead)
    RANK_RESTARTED = "rank_restarted"  # a new epoch: the old process's requests are gone


# A request in flight: (dispatch_seq, prompt length, dispatch time in ns).
_Entry = tuple[int, int, int]


class InFlight:
    """Requests dispatched and not yet reported, per rank. Single owner; not thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    remember_failures:
        How many failed requests are remembered to tell their late results from unknown ones.

    Attributes
    ----------
    outstanding:
        Per rank, requests added and not yet taken or failed. Read-only for callers.
    dispatched:
        Per rank, requests ever added (a counter). Read-only for callers.
    failed_requests, late_results, unknown_results:
        Requests reported failed; results dropped as late; results that matched nothing.
    """

    __slots__ = (
        "_entries",
        "_failed",
        "_remember",
        "dispatched",
        "failed_requests",
        "late_results",
        "outstanding",
        "unknown_results",
    )

    def __init__(self, dp_size: int, remember_failures: int = MAX_REMEMBERED_FAILURES) -> None:
        if dp_size < 1 or remember_failures < 0:
            raise UsageError(
                f"need dp_size >= 1 and remember_failures >= 0: dp_size={dp_size} "
                f"remember_failures={remember_failures}"
            )
        self._entries: list[dict[int, _Entry]] = [{} for _ in range(dp_size)]
        self._failed: dict[int, tuple[int, int]] = {}  # rid -> (rank, seq), the latest failures
        self._remember = remember_failures
        self.outstanding = [0] * dp_size
        self.dispatched = [0] * dp_size
        self.failed_requests = 0
        self.late_results = 0
        self.unknown_results = 0

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return len(self._entries)

    def add(self, rank: int, rid: int, seq: int, prompt_len: int, now_ns: int) -> None:
        """Count request ``rid`` (dispatch ``seq``) as sent to ``rank`` at ``now_ns``."""
        self._entries[rank][rid] = (seq, prompt_len, now_ns)
        self.outstanding[rank] += 1
        self.dispatched[rank] += 1

    def take(self, result: Finished) -> bool:
        """True when ``result`` is the one result of a request in flight (it leaves here);
        False, counted in ``late_results`` or ``unknown_results``, for any other."""
        rank, rid = result.dp_rank, result.rid
        entries = self._entries
        entry = entries[rank].get(rid) if 0 <= rank < len(entries) else None
        if entry is None or entry[0] != result.dispatch_seq:
            if self._failed.get(rid) == (rank, result.dispatch_seq):
                self.late_results += 1
            else:
                self.unknown_results += 1
            return False
        del entries[rank][rid]
        self.outstanding[rank] -= 1
        return True

    def holds(self, rank: int) -> bool:
        """True when ``rank`` has a request in flight."""
        return bool(self._entries[rank])

    def rids(self, rank: int) -> list[int]:
        """The rids in flight on ``rank``, oldest first."""
        return list(self._entries[rank])

    def fail(self, rank: int, reason: FailureReason, now_ns: int) -> list[Finished]:
        """Report every request in flight on ``rank`` failed for ``reason``, oldest first: one
        ``Finished(status="failed")`` each, ``e2e_s`` measured up to ``now_ns``."""
        pending = self._entries[rank]
        if not pending:
            return []
        failed = self._failed
        out = []
        for rid, (seq, prompt_len, t0) in pending.items():
            out.append(
                Finished(
                    rid=rid,
                    dp_rank=rank,
                    dispatch_seq=seq,
                    prompt_len=prompt_len,
                    output_len=0,
                    cached_tokens=0,
                    queue_time_s=0.0,
                    ttft_s=0.0,
                    e2e_s=max(0, now_ns - t0) / _NS,
                    status="failed",
                    reason=reason.value,
                )
            )
            failed[rid] = (rank, seq)
        while len(failed) > self._remember:
            del failed[next(iter(failed))]
        pending.clear()
        self.outstanding[rank] -= len(out)
        self.failed_requests += len(out)
        return out
