"""Baseline dispatchers to measure ours against.

:class:`OverwriteBudget` reproduces the reference design (sglang's DP controller with load
snapshots): every refresh, at most once per 20 ms, *overwrites* the per-rank request counts with
the latest snapshot (running + waiting), each decision takes the lowest count with the
lowest-rank tie-break (``list.index(min(...))``) and adds an optimistic +1. Requests sent but
not yet seen by a scheduler vanish at the next refresh, so bursts herd onto one rank
(``NOTES.md`` §1.3). It ignores staleness, like the reference.

:class:`RoundRobinBaseline` is the load-unaware dispatcher a deployment falls back to: rank after
rank, reading nothing, so it never learns that a rank died.

Both still number dispatches per rank, because the schedulers require gap-free sequences. As
dispatchers (:class:`~dp_controller.dispatching.Dispatcher`) they report no rank changes
(``changes()`` is always ``None``: neither has a notion of a dead or restarted rank, so a
controller over them fails nothing, and its requests on a dead rank never get a result), ignore
completions and keep no ledger. ``OverwriteBudget`` continues each rank's numbering after the
scheduler's acknowledgement at takeover (it reads the same source); ``RoundRobinBaseline`` reads
nothing and numbers from 1.
"""

from __future__ import annotations

from dp_controller.budget import DEFAULT_REFRESH_INTERVAL_S
from dp_controller.dispatching import (
    Clock,
    Dispatch,
    RankChanges,
    monotonic_clock,
    read_acknowledged,
)
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.reading import SnapshotSource

__all__ = ["OverwriteBudget", "RoundRobinBaseline"]


class OverwriteBudget:
    """The reference design's overwrite-plus-throttle budget. Single owner; not thread-safe.

    Parameters
    ----------
    source:
        Where every rank's load comes from.
    refresh_interval_s:
        Minimum time between two reads (the reference uses 20 ms).
    dp_size:
        Number of ranks; defaults to ``source.dp_size``.
    clock:
        Monotonic nanoseconds.
    """

    def __init__(
        self,
        source: SnapshotSource,
        refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
        *,
        dp_size: int | None = None,
        clock: Clock = monotonic_clock,
    ) -> None:
        n = source.dp_size if dp_size is None else dp_size
        if n < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={n}")
        self.source = source
        self._n = n
        self._interval_ns = int(refresh_interval_s * 1e9)
        self._clock = clock
        self._last_refresh_ns: int | None = None
        self.counts = [0] * n
        self._seq = [0] * n
        self.decisions = 0

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return self._n

    def refresh(self, force: bool = False) -> bool:
        """Overwrite the counts with the latest snapshot if 20 ms passed (or ``force``)."""
        now = self._clock()
        last = self._last_refresh_ns
        if not force and last is not None and now - last < self._interval_ns:
            return False
        self._last_refresh_ns = now
        try:
            table = self.source.hot_table()
        except LoadsnapError:
            return True
        if table.dp_size == self._n:
            # The reference's weakness, on purpose: in-flight +1s are overwritten here.
            self.counts = (table.num_running_reqs + table.num_waiting_reqs).astype(int).tolist()
        return True

    def complete(self, rank: int, seq: int) -> bool:
        """Ignored (the counts come from snapshots only): always False."""
        return False

    def changes(self, *, refresh: bool = False) -> RankChanges | None:
        """Always ``None``: the reference design watches no rank (and reads only to decide)."""
        return None

    def take_over(self) -> list[int]:
        """Continue each rank's numbering after its scheduler's acknowledgement; return, per
        rank, the sequence continued after (0: unchanged)."""
        seqs = [0] * self._n
        for rank, ack in enumerate(read_acknowledged(self.source, self._n)):
            if ack > self._seq[rank]:
                self._seq[rank] = seqs[rank] = ack
        return seqs

    def unacknowledged(self) -> None:
        """No ledger: always ``None``."""
        return None

    def dispatch(
        self, est_tokens: int, rank: int | None = None, *, max_new_tokens: int | None = None
    ) -> Dispatch:
        """Lowest count wins, lowest rank on ties; +1 to the chosen rank (``max_new_tokens``
        is ignored, like the reference)."""
        self.refresh()
        self.decisions += 1
        counts = self.counts
        chosen = counts.index(min(counts)) if rank is None else rank
        counts[chosen] += 1
        seq = self._seq[chosen] + 1
        self._seq[chosen] = seq
        return Dispatch(chosen, seq)


class RoundRobinBaseline:
    """Plain round robin that reads no load at all. Single owner; not thread-safe.

    Unlike ``DPBudget`` with ``Policy.ROUND_ROBIN`` (which skips dead ranks), it keeps sending
    every ``dp_size``-th request to a rank whatever happened to it.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    """

    def __init__(self, dp_size: int) -> None:
        if dp_size < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={dp_size}")
        self._n = dp_size
        self._next = 0
        self._seq = [0] * dp_size
        self.decisions = 0

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return self._n

    def refresh(self, force: bool = False) -> bool:
        """Nothing to read: always False."""
        return False

    def complete(self, rank: int, seq: int) -> bool:
        """Ignored: always False."""
        return False

    def changes(self, *, refresh: bool = False) -> RankChanges | None:
        """Always ``None``: it reads nothing, so it never learns of a dead or restarted rank."""
        return None

    def take_over(self) -> list[int]:
        """Nothing to read: numbering continues from where it is (all 0)."""
        return [0] * self._n

    def unacknowledged(self) -> None:
        """No ledger: always ``None``."""
        return None

    def dispatch(
        self, est_tokens: int, rank: int | None = None, *, max_new_tokens: int | None = None
    ) -> Dispatch:
        """The next rank in turn (or the pinned ``rank``, which does not move the turn);
        ``max_new_tokens`` is ignored."""
        self.decisions += 1
        if rank is None:
            rank = self._next
            self._next = rank + 1 if rank + 1 < self._n else 0
        elif not 0 <= rank < self._n:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self._n}")
        seq = self._seq[rank] + 1
        self._seq[rank] = seq
        return Dispatch(rank, seq)
