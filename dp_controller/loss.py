"""``RequestAccount``: every submitted request ends finished or reported failed, never lost.

Theory of operation
-------------------
:class:`~dp_controller.controller.Controller` counts outstanding requests per rank, but not
which ones: when a scheduler dies, the requests it held would vanish without a trace. The
account keeps ``rid -> rank`` for every request between :meth:`RequestAccount.submitted` and
:meth:`RequestAccount.finished`. When the budget reports a rank dead,
:meth:`RequestAccount.fail_ranks` moves that rank's outstanding requests to ``failed`` (with the
reason) so the caller can retry or report them. A ``Finished`` that arrives later for a request
already failed (it was still in a socket buffer and a restarted scheduler served it) is counted
in ``late_finished`` and not counted twice. The invariant, checked by
:meth:`RequestAccount.lost`: ``submitted == finished + failed + pending``.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import numpy as np

from dp_controller.budget import DPBudget, RankHealth
from loadsnap.errors import UsageError
from scheduler.messages import Finished

__all__ = ["LossSummary", "RequestAccount", "dead_ranks"]


class LossSummary(msgspec.Struct, frozen=True):
    """Counts of one account: ``lost`` is what no other count explains (must be zero)."""

    submitted: int
    finished: int
    failed: int
    pending: int
    late_finished: int
    unknown_finished: int
    lost: int


def dead_ranks(budget: DPBudget) -> list[int]:
    """Ranks the budget saw dead at its last refresh."""
    return [int(r) for r in np.flatnonzero(budget.health == RankHealth.DEAD)]


class RequestAccount:
    """Which requests are in flight on which rank. Single owner; not thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    """

    def __init__(self, dp_size: int) -> None:
        if dp_size < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={dp_size}")
        self.dp_size = dp_size
        self._pending: list[dict[int, None]] = [{} for _ in range(dp_size)]
        self.failed: dict[int, str] = {}  # rid -> reason
        self.submitted_count = 0
        self.finished_count = 0
        self.late_finished = 0  # finished after being reported failed
        self.unknown_finished = 0  # a rid this account never saw (e.g. a previous controller's)

    def submitted(self, rid: int, rank: int) -> None:
        """Record a dispatch of ``rid`` to ``rank``.

        Raises
        ------
        UsageError
            ``rank`` out of range.
        """
        if not 0 <= rank < self.dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self.dp_size}")
        self._pending[rank][rid] = None
        self.submitted_count += 1

    def finished(self, message: Finished) -> None:
        """Record a ``Finished`` (any status) from a scheduler."""
        rid = message.rid
        for pending in self._pending:
            if rid in pending:
                del pending[rid]
                self.finished_count += 1
                return
        if rid in self.failed:
            self.late_finished += 1
        else:
            self.unknown_finished += 1

    def fail_ranks(self, ranks: Iterable[int], reason: str = "rank dead") -> list[int]:
        """Report every request outstanding on ``ranks`` as failed; return their rids."""
        out: list[int] = []
        for rank in ranks:
            pending = self._pending[rank]
            for rid in pending:
                self.failed[rid] = f"{reason}: dp_rank={rank}"
                out.append(rid)
            pending.clear()
        return out

    def pending(self, rank: int | None = None) -> int:
        """Requests neither finished nor failed (on ``rank``, or on every rank)."""
        if rank is None:
            return sum(len(p) for p in self._pending)
        return len(self._pending[rank])

    def lost(self) -> int:
        """Requests no count explains: ``submitted - finished - failed - pending`` (always 0)."""
        return self.submitted_count - self.finished_count - len(self.failed) - self.pending()

    def summary(self) -> LossSummary:
        """Every count at once."""
        return LossSummary(
            submitted=self.submitted_count,
            finished=self.finished_count,
            failed=len(self.failed),
            pending=self.pending(),
            late_finished=self.late_finished,
            unknown_finished=self.unknown_finished,
            lost=self.lost(),
        )
