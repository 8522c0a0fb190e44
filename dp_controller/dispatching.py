"""What every dispatch policy offers the controller: the ``Dispatcher`` protocol and its result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Clock", "Dispatch", "Dispatcher", "monotonic_clock"]

Clock = Callable[[], int]
"""A monotonic clock in nanoseconds (tests pass a fake one)."""


def monotonic_clock() -> int:
    """The default clock: ``time.monotonic_ns``."""
    return time.monotonic_ns()


class Dispatch(NamedTuple):
    """One decision: the rank and the per-rank dispatch sequence the request must carry."""

    rank: int
    seq: int


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

    def refresh(self, force: bool = False) -> bool:
        """Re-read the load source if the throttle allows (or ``force``); True if it read."""
        ...
