"""The dispatch ledger: requests sent to a rank that its scheduler has not yet counted.

Theory of operation
-------------------
The controller numbers the requests it sends to each rank 1, 2, 3, ... without gaps
(``scheduler.messages`` states the contract). A scheduler reports, in every snapshot, the
highest sequence ``A`` such that every request up to ``A`` is already counted in its published
numbers (``last_accepted_dispatch_seq``). The ledger keeps, per rank, one entry for every
sequence in ``(A, issued]``: those requests are in flight (in a socket buffer, or absorbed out of
order) and a snapshot that says ``A`` cannot include them. The budget of a rank is therefore
``reported + unacknowledged``, and no snapshot can erase a request it does not yet include.

Acknowledgements only move forward: an ``A`` lower than the one already seen (an older
snapshot) changes nothing, and an ``A`` beyond what was issued is clamped and counted as an
anomaly. Requests absorbed out of order stay in the ledger until the acknowledgement passes them
contiguously, so they may be counted twice for a moment (over-counting, never under-counting).

A restarted scheduler (new epoch) lost whatever the old process held: :meth:`reset_rank` drops
the rank's entries and sets a floor at the last issued sequence. Numbering continues (sequences
are never reused), so the new process acknowledges from the floor and a late snapshot of the old
epoch cannot acknowledge new requests.

A new controller taking over running schedulers continues each rank's numbering after the
acknowledgement it reads (:meth:`rebase`), so the scheduler's contiguous acknowledgement goes on
covering the new requests instead of running ahead of a ledger that restarted at 1.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from loadsnap.errors import UsageError

__all__ = ["DispatchLedger", "LedgerStats"]


class LedgerStats:
    """Counters of one ledger (monotonic). Not thread-safe."""

    __slots__ = ("acknowledged", "dispatched", "overshoot_acks", "reset_dropped", "resets")

    def __init__(self) -> None:
        self.dispatched = 0
        self.acknowledged = 0
        self.overshoot_acks = 0  # acknowledgements beyond the issued sequence (clamped)
        self.resets = 0
        self.reset_dropped = 0  # entries dropped by epoch resets

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: int(getattr(self, name)) for name in self.__slots__}


class DispatchLedger:
    """Per-rank unacknowledged dispatches. Single owner; not thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.

    Attributes
    ----------
    unacked_count, unacked_tokens:
        Per-rank numpy arrays (int64) of unacknowledged requests and their estimated tokens.
        Read-only for callers; the ledger updates them in place.
    count_list, tokens_list:
        The same numbers as Python lists (cheaper to read one element at a time).
    """

    def __init__(self, dp_size: int) -> None:
        if dp_size < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={dp_size}")
        self.dp_size = dp_size
        self.unacked_count: npt.NDArray[np.int64] = np.zeros(dp_size, dtype=np.int64)
        self.unacked_tokens: npt.NDArray[np.int64] = np.zeros(dp_size, dtype=np.int64)
        self.stats = LedgerStats()
        # Python mirrors of the arrays, for the scalar decision path of small deployments.
        self.count_list = [0] * dp_size
        self.tokens_list = [0] * dp_size
        self._issued = [0] * dp_size
        self._acked = [0] * dp_size
        self._tokens: list[deque[int]] = [deque() for _ in range(dp_size)]

    def issued(self, rank: int) -> int:
        """The last sequence issued to ``rank`` (0 before the first dispatch)."""
        return self._issued[rank]

    def acked(self, rank: int) -> int:
        """The highest sequence of ``rank`` known to be counted by its scheduler (or the floor)."""
        return self._acked[rank]

    def record(self, rank: int, est_tokens: int) -> int:
        """Add one dispatch to ``rank`` and return its sequence number (1, 2, 3, ...).

        Raises
        ------
        UsageError
            ``rank`` out of range or ``est_tokens`` negative.
        """
        if not 0 <= rank < self.dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self.dp_size}")
        if est_tokens < 0:
            raise UsageError(f"est_tokens must be >= 0: est_tokens={est_tokens}")
        seq = self._issued[rank] + 1
        self._issued[rank] = seq
        self._tokens[rank].append(est_tokens)
        self.count_list[rank] += 1
        self.tokens_list[rank] += est_tokens
        self.unacked_count[rank] += 1
        self.unacked_tokens[rank] += est_tokens
        self.stats.dispatched += 1
        return seq

    def acknowledge(self, rank: int, last_accepted: int) -> int:
        """Drop the entries of ``rank`` up to ``last_accepted``; return how many were dropped.

        An acknowledgement at or below the current one is ignored; one beyond the issued
        sequence is clamped to it and counted in ``stats.overshoot_acks``.
        """
        acked = self._acked[rank]
        if last_accepted <= acked:
            return 0
        issued = self._issued[rank]
        if last_accepted > issued:
            self.stats.overshoot_acks += 1
            last_accepted = issued
            if last_accepted <= acked:
                return 0
        drop = last_accepted - acked
        entries = self._tokens[rank]
        tokens = 0
        for _ in range(drop):
            tokens += entries.popleft()
        self._acked[rank] = last_accepted
        self.count_list[rank] -= drop
        self.tokens_list[rank] -= tokens
        self.unacked_count[rank] -= drop
        self.unacked_tokens[rank] -= tokens
        self.stats.acknowledged += drop
        return drop

    def reset_rank(self, rank: int) -> int:
        """Forget every unacknowledged entry of ``rank`` (its scheduler restarted).

        Sets the acknowledgement floor at the last issued sequence; numbering continues.
        Returns the number of entries dropped.
        """
        entries = self._tokens[rank]
        dropped = len(entries)
        entries.clear()
        self._acked[rank] = self._issued[rank]
        self.count_list[rank] = 0
        self.tokens_list[rank] = 0
        self.unacked_count[rank] = 0
        self.unacked_tokens[rank] = 0
        self.stats.resets += 1
        self.stats.reset_dropped += dropped
        return dropped

    def rebase(self, rank: int, seq: int) -> int:
        """Continue the numbering of ``rank`` after ``seq`` (a new controller taking over a
        running scheduler that already acknowledged ``seq``).

        Drops every unacknowledged entry of ``rank`` (counted in ``stats.reset_dropped``) and
        sets both the last issued sequence and the acknowledgement floor to ``seq``: the next
        :meth:`record` returns ``seq + 1``. Returns the number of entries dropped.

        Raises
        ------
        UsageError
            ``rank`` out of range, or ``seq`` below the last issued sequence (never reused).
        """
        if not 0 <= rank < self.dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self.dp_size}")
        if seq < self._issued[rank]:
            raise UsageError(
                f"rebase below the issued sequence: seq={seq} issued={self._issued[rank]}"
            )
        entries = self._tokens[rank]
        dropped = len(entries)
        entries.clear()
        self._issued[rank] = self._acked[rank] = seq
        self.count_list[rank] = self.tokens_list[rank] = 0
        self.unacked_count[rank] = self.unacked_tokens[rank] = 0
        self.stats.reset_dropped += dropped
        return dropped

    def outstanding(self, rank: int) -> list[tuple[int, int]]:
        """``(seq, est_tokens)`` of every unacknowledged entry of ``rank``, oldest first."""
        first = self._acked[rank] + 1
        return [(first + i, tokens) for i, tokens in enumerate(self._tokens[rank])]
