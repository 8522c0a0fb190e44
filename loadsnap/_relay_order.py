"""Which relayed snapshots are newer: the collector's per-rank ordering rules, without I/O.

A rank's writer stamps ``epoch`` (from its wall clock, so a restarted writer has a larger
one) and ``seq`` (1, 2, ... within an epoch). Within the current epoch only a higher ``seq``
is newer; a higher epoch (a restart) replaces the current one; a lower epoch is stale while
the current one is still heard from, and takes over once it has been quiet for
``takeover_ns`` (clocks of different hosts disagree, and a rank restarted on a host whose
clock is behind must not be locked out forever).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["Order", "RankOrder"]


class Order(enum.Enum):
    """What to do with a snapshot, given the rank's history."""

    NEWER = "newer"  # relay it
    TAKEOVER = "epoch_takeover"  # relay it: a lower epoch replaces one gone quiet
    OUT_OF_ORDER = "out_of_order"  # drop: not newer within the current epoch
    STALE_EPOCH = "stale_epoch"  # drop: an older epoch while the current one is heard from

    @property
    def relay(self) -> bool:
        """Whether the snapshot is relayed."""
        return self in _RELAYED


_RELAYED: Final = frozenset({Order.NEWER, Order.TAKEOVER})


class RankOrder:
    """One rank's relay history. Not thread-safe (the collector's thread owns it)."""

    __slots__ = ("epoch", "heard_mono_ns", "seq", "takeover_ns")

    def __init__(self, takeover_ns: int) -> None:
        self.takeover_ns = takeover_ns
        self.epoch = -1
        self.seq = -1
        self.heard_mono_ns = 0

    def judge(self, epoch: int, seq: int, now_ns: int) -> Order:
        """Where a snapshot ``(epoch, seq)`` received at ``now_ns`` stands."""
        if epoch == self.epoch:
            return Order.NEWER if seq > self.seq else Order.OUT_OF_ORDER
        if epoch > self.epoch:
            return Order.NEWER
        if now_ns - self.heard_mono_ns >= self.takeover_ns:
            return Order.TAKEOVER
        return Order.STALE_EPOCH

    def relayed(self, epoch: int, seq: int, now_ns: int) -> None:
        """Record that ``(epoch, seq)`` was relayed at ``now_ns``."""
        self.epoch, self.seq, self.heard_mono_ns = epoch, seq, now_ns
