"""When a pushed load stream sends each rank's record: coalesced on change, rate-bounded,
heartbeat while idle. No I/O and no clock of its own (h11's model): the stream passes the time.

A record is due for a rank when

* it was never sent on this stream (the stream's first record), or
* its content (everything but its age and sample number) differs from the last one sent, and
  at least ``min_interval_s`` passed since then (changes in between are coalesced: the latest
  one goes out when the interval allows, the intermediate ones never), or
* ``heartbeat_s`` passed since the last one sent (an idle rank still reports, so a subscriber
  that falls back to polling when records stop can tell a quiet rank from a dead stream).

Every record sent gets the next ``sample`` number of the stream (monotonic, from 1).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from loadsnap.errors import UsageError

__all__ = ["PushSchedule", "Sent"]

T = TypeVar("T")
_NEVER: Final[float] = float("-inf")


@dataclass
class Sent:
    """What a stream last sent for one rank."""

    key: Hashable
    at_s: float


class PushSchedule(Generic[T]):
    """Decides which ranks' records a stream sends now. Single owner; not thread-safe.

    Parameters
    ----------
    min_interval_s:
        Shortest time between two records of one rank (the rate bound), > 0.
    heartbeat_s:
        Longest time without a record of a rank while nothing changes, >= ``min_interval_s``.

    Raises
    ------
    UsageError
        Intervals out of range.
    """

    def __init__(self, min_interval_s: float, heartbeat_s: float) -> None:
        if not 0.0 < min_interval_s <= heartbeat_s:
            raise UsageError(
                "push intervals: expected 0 < min_interval_s <= heartbeat_s, found "
                f"min_interval_s={min_interval_s} heartbeat_s={heartbeat_s}"
            )
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self.sample = 0
        self._sent: dict[int, Sent] = {}

    def due(self, records: Iterable[tuple[int, Hashable, T]], now_s: float) -> list[tuple[T, int]]:
        """The records to send now, each with its sample number, recording them as sent.

        Parameters
        ----------
        records:
            ``(rank, content key, record)`` for every rank the stream reports now.
        now_s:
            The stream's monotonic time in seconds.
        """
        out: list[tuple[T, int]] = []
        for rank, key, record in records:
            last = self._sent.get(rank)
            since = now_s - last.at_s if last is not None else None
            if (
                since is None
                or since >= self.heartbeat_s
                or (
                    key != last.key and since >= self.min_interval_s  # type: ignore[union-attr]
                )
            ):
                self.sample += 1
                self._sent[rank] = Sent(key, now_s)
                out.append((record, self.sample))
        return out

    def next_due_s(self, keys: Iterable[tuple[int, Hashable]], now_s: float) -> float:
        """Seconds until a rank among ``keys`` could next be due (0 when one is due now).

        A changed record waits for its rate bound, an unchanged one for its heartbeat.
        """
        wait = self.heartbeat_s
        for rank, key in keys:
            last = self._sent.get(rank)
            if last is None:
                return 0.0
            bound = self.min_interval_s if key != last.key else self.heartbeat_s
            wait = min(wait, max(0.0, last.at_s + bound - now_s))
        return wait

    def forget(self) -> None:
        """Forget what was sent: every rank's next record is due at once (after a gap)."""
        self._sent.clear()
