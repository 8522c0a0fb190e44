"""``RequestAccount``: an independent audit that every request ends finished or failed, once.

Theory of operation
-------------------
:class:`~dp_controller.controller.Controller` itself reports the requests of a dead or
restarted rank as failed (``Finished(status="failed", reason=...)`` from ``poll``). The account
checks that claim from the outside: it keeps ``rid -> rank`` for every request between
:meth:`RequestAccount.submitted` and the one result it must get (:meth:`RequestAccount.finished`,
which files a non-``ok`` status under ``failed`` with its reason). A second result for the same
request is counted in ``duplicates`` (it must stay zero), a result for a rid it never saw in
``unknown_finished``. The invariant, checked by :meth:`RequestAccount.lost`:
``submitted == finished + failed + pending``.

:meth:`RequestAccount.fail_ranks` (with :func:`dead_ranks`) remains for callers that drive a
dispatcher without a controller: it moves a rank's pending requests to ``failed`` by hand, and a
result that arrives later for one of them is counted in ``late_finished``, not twice.
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
    duplicates: int = 0


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
        self.late_finished = 0  # finished after fail_ranks reported it failed
        self.duplicates = 0  # a second result for a request that already had one
        self.unknown_finished = 0  # a rid this account never saw (e.g. a previous controller's)
        self._done: set[int] = set()  # rids with an ok result
        self._manual: set[int] = set()  # rids failed by fail_ranks (a late result is expected)

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
        """Record a result from ``Controller.poll``: ``ok`` is finished, any other status failed."""
        rid = message.rid
        for pending in self._pending:
            if rid in pending:
                del pending[rid]
                if message.status == "ok":
                    self.finished_count += 1
                    self._done.add(rid)
                else:
                    reason = message.reason or message.status
                    self.failed[rid] = f"{reason}: dp_rank={message.dp_rank}"
                return
        if rid in self._manual:
            self._manual.discard(rid)
            self.late_finished += 1
        elif rid in self._done or rid in self.failed:
            self.duplicates += 1
        else:
            self.unknown_finished += 1

    def fail_ranks(self, ranks: Iterable[int], reason: str = "rank dead") -> list[int]:
        """Report every request outstanding on ``ranks`` as failed; return their rids."""
        out: list[int] = []
        for rank in ranks:
            pending = self._pending[rank]
            for rid in pending:
                self.failed[rid] = f"{reason}: dp_rank={rank}"
                self._manual.add(rid)
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
            duplicates=self.duplicates,
        )
