"""Public test doubles: an in-memory :class:`~loadsnap.SnapshotSource` and a settable clock.

For tests and benchmarks of code that reads loads (a dispatcher, an exporter) without shared
memory or processes, as ``trio.testing`` offers trio's fakes.

Each :meth:`FakeSource.publish` stamps a rank's record like a writer would (sequence +1, the
fake clock's time); :meth:`FakeSource.hot_table` builds the numpy table the budget reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from loadsnap.layout import HOT_FIELDS
from loadsnap.reading import DEFAULT_STALE_AFTER_S, HotTable, SlotRead, SlotStatus
from loadsnap.schema import LoadSnapshot

__all__ = ["Clock", "FakeClock", "FakeSource"]

Clock = Callable[[], int]
"""A monotonic clock in nanoseconds (``time.monotonic_ns`` or a :class:`FakeClock`)."""


class FakeClock:
    """A settable monotonic clock in nanoseconds. Not thread-safe."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now_ns += int(seconds * 1e9)


class FakeSource:
    """Holds one :class:`LoadSnapshot` per rank. Not thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    clock:
        Clock used to stamp publishes and compute ages.
    stale_after_s:
        Age beyond which a rank reads STALE.
    """

    def __init__(
        self,
        dp_size: int,
        clock: Clock = time.monotonic_ns,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        self._n = dp_size
        self._clock = clock
        self.stale_after_s = stale_after_s
        self.snapshots: list[LoadSnapshot | None] = [None] * dp_size
        self.dead = [False] * dp_size
        self.reads = 0

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return self._n

    def publish(self, rank: int, epoch: int = 1, **fields: int | float) -> LoadSnapshot:
        """Publish a snapshot of ``rank`` with ``fields``; seq +1 within an epoch, else 1."""
        prev = self.snapshots[rank]
        seq = prev.seq + 1 if prev is not None and prev.epoch == epoch else 1
        snap = LoadSnapshot(
            dp_rank=rank,
            seq=seq,
            epoch=epoch,
            publish_mono_ns=self._clock(),
            **fields,  # type: ignore[arg-type]
        )
        self.snapshots[rank] = snap
        self.dead[rank] = False
        return snap

    def put(self, snapshot: LoadSnapshot) -> None:
        """Install a snapshot as is (to replay old or out-of-order records)."""
        self.snapshots[snapshot.dp_rank] = snapshot

    def _status(self, snap: LoadSnapshot | None, rank: int, now: int) -> tuple[SlotStatus, float]:
        if snap is None:
            return SlotStatus.NEVER_PUBLISHED, math.nan
        age = max(0.0, (now - snap.publish_mono_ns) / 1e9)
        if self.dead[rank]:
            return SlotStatus.DEAD, age
        if age > self.stale_after_s:
            return SlotStatus.STALE, age
        return SlotStatus.FRESH, age

    def read_all(self) -> list[SlotRead]:
        """Every rank's snapshot with status and age."""
        now = self._clock()
        out = []
        for rank, snap in enumerate(self.snapshots):
            status, age = self._status(snap, rank, now)
            seq = 0 if snap is None else snap.seq
            epoch = 0 if snap is None else snap.epoch
            out.append(SlotRead(rank, status, snap, None if snap is None else age, seq, epoch, 1))
        return out

    def hot_table(self) -> HotTable:
        """Every rank's numbers as arrays (zeros where never published)."""
        self.reads += 1
        now = self._clock()
        n = self._n
        cols: dict[str, np.typing.NDArray[np.generic]] = {
            name: np.zeros(n, dtype=np.uint64 if code == "Q" else np.float64)
            for name, code in HOT_FIELDS
        }
        age = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.uint8)
        valid = np.zeros(n, dtype=bool)
        for rank, snap in enumerate(self.snapshots):
            st, a = self._status(snap, rank, now)
            status[rank] = st
            if snap is None:
                continue
            valid[rank] = True
            age[rank] = a
            for name, column in cols.items():
                column[rank] = getattr(snap, name)
        return HotTable(taken_mono_ns=now, age_s=age, status=status, valid=valid, **cols)  # type: ignore[arg-type]
