"""What every dispatch policy offers the controller: the ``Dispatcher`` protocol and its results.

The controller (:mod:`dp_controller.controller`) talks to its dispatcher through this protocol
only: it asks for a rank (:meth:`Dispatcher.dispatch`), reports every result
(:meth:`Dispatcher.complete`), asks which ranks were lost (:meth:`Dispatcher.changes`) to fail
what they held, and at start continues each rank's numbering (:meth:`Dispatcher.take_over`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from loadsnap.errors import LoadsnapError
from loadsnap.reading import SnapshotSource

__all__ = [
    "Clock",
    "Dispatch",
    "Dispatcher",
    "RankChanges",
    "monotonic_clock",
    "read_acknowledged",
]

log = logging.getLogger("dp_controller")

Clock = Callable[[], int]
"""A monotonic clock in nanoseconds (tests pass a fake one)."""


def monotonic_clock() -> int:
    """The default clock: ``time.monotonic_ns``."""
    return time.monotonic_ns()


class Dispatch(NamedTuple):
    """One decision: the rank and the per-rank dispatch sequence the request must carry."""

    rank: int
    seq: int


class RankChanges(NamedTuple):
    """What a dispatcher saw of its ranks since it last reported (:meth:`Dispatcher.changes`).

    ``dead``: every rank seen dead at the latest refresh. A dead rank is reported again at each
    refresh while it stays dead, so a request sent to it later (pinned) is failed too.
    ``restarted``: the ranks with a new epoch (a new scheduler process) since the last report;
    what the old process held is gone.
    """

    dead: frozenset[int]
    restarted: frozenset[int]


def read_acknowledged(source: SnapshotSource, dp_size: int) -> list[int]:
    """Per rank, the ``last_accepted_dispatch_seq`` its scheduler reports (0 for a rank with no
    valid record, and for every rank when the source cannot be read or has another size): what
    :meth:`Dispatcher.take_over` continues the numbering after."""
    try:
        table = source.hot_table()
    except LoadsnapError as exc:
        log.debug("no load source at start, numbering from 1: %s", exc)
        return [0] * dp_size
    if table.dp_size != dp_size:
        return [0] * dp_size
    acks = np.where(table.valid, table.last_accepted_dispatch_seq, 0)
    return [int(a) for a in acks.tolist()]


@runtime_checkable
class Dispatcher(Protocol):
    """Picks a rank for each request and numbers it. Single owner; not thread-safe."""

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        ...

    def dispatch(
        self, est_tokens: int, rank: int | None = None, *, max_new_tokens: int | None = None
    ) -> Dispatch:
        """Choose a rank (or take the caller's ``rank``: pinned) and record the dispatch.

        ``max_new_tokens`` is the request's output bound when the caller knows it (the
        controller always passes it); a policy that does not use it ignores it."""
        ...

    def complete(self, rank: int, seq: int) -> bool:
        """Report that dispatch ``seq`` of ``rank`` ended (its result arrived, or the controller
        reported it failed); the controller calls this once per result. Returns False when
        the dispatcher was not counting it (a policy that ignores completions, a repeat)."""
        ...

    def refresh(self, force: bool = False) -> bool:
        """Re-read the load source if the throttle allows (or ``force``); True if it read."""
        ...

    def changes(self, *, refresh: bool = False) -> RankChanges | None:
        """The ranks lost since the previous call; ``None`` when nothing was read since then.

        With ``refresh``, a dispatcher that watches its ranks first re-reads its source if its
        refresh interval has passed (the controller asks so while it waits for results, so a
        death is noticed without traffic). A dispatcher that does not watch ranks always
        returns ``None`` and reads nothing."""
        ...

    def take_over(self) -> list[int]:
        """Continue each rank's numbering after what its scheduler already acknowledged.

        A controller calls this once, before its first dispatch, in case it replaces one that
        crashed against running schedulers. Returns, per rank, the sequence the numbering now
        continues after (0: from 1). What the dispatcher reads here is where :meth:`changes`
        starts from."""
        ...

    def unacknowledged(self) -> list[int] | None:
        """Per rank, dispatches its scheduler has not acknowledged yet (the ledger's depth);
        ``None`` for a dispatcher that keeps no ledger. Safe to call from another thread (a
        metrics scrape): the numbers may be mid-update."""
        ...
