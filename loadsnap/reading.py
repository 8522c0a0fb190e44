"""What readers return, and the ``SnapshotSource`` protocol that policies read through.

Policy code (the dispatcher, the HTTP endpoint) sees only these types, never buffers or sockets.
"""

from __future__ import annotations

import enum
import time
from typing import Final, Protocol, runtime_checkable

import msgspec
import numpy as np
import numpy.typing as npt

from loadsnap.errors import LoadsnapError, SegmentUnavailableError
from loadsnap.schema import LoadSnapshot

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "HotTable",
    "ReaderStats",
    "SegmentState",
    "SlotRead",
    "SlotStatus",
    "SnapshotSource",
    "unavailable_state",
]

DEFAULT_STALE_AFTER_S: Final[float] = 2.0


class SlotStatus(enum.IntEnum):
    """Freshness of one rank's slot. Integer values are stable (used in numpy tables)."""

    FRESH = 0  # published within the staleness budget
    STALE = 1  # older than the budget; its writer still runs (busy or hung)
    DEAD = 2  # its writer exited or was killed
    NEVER_PUBLISHED = 3  # no complete record yet
    TORN = 4  # no consistent copy within the retry budget (a writer died mid-write is NOT this)
    INVALID = 5  # a consistent copy whose payload does not decode or names another rank

    @property
    def label(self) -> str:
        """Lower-case name used in JSON and metrics."""
        return self.name.lower()


class SegmentState(enum.Enum):
    """Why a reader has or has not got a segment to read."""

    OK = "ok"
    MISSING = "missing"  # no segment (no writer has started, or the last one shut down)
    NOT_READY = "not_ready"  # created but not initialised yet
    INCOMPATIBLE = "incompatible"  # wrong magic, layout version, owner or permissions


class SlotRead(msgspec.Struct, frozen=True, gc=False):
    """One rank's latest snapshot with its freshness. Immutable; safe to share between threads.

    ``snapshot`` is None unless readable. ``status`` is decided when the reader reads the slot;
    ``age_s`` is the record's age *when you ask*: readers built on a monotonic publish time
    (``publish_mono_ns``, the shared-memory reader) compute it at each access, so a reader can
    hand out the same object for a slot that did not change; a source without one (test
    doubles) gives a fixed ``fixed_age_s``. None when there is no readable record.

    Readers share the ``snapshot`` object between the reads of an unchanged record: treat it
    as read-only.
    """

    rank: int
    status: SlotStatus
    snapshot: LoadSnapshot | None
    fixed_age_s: float | None
    seq: int
    epoch: int
    writer_pid: int
    reason: str = ""
    publish_mono_ns: int = 0

    @property
    def age_s(self) -> float | None:
        """Seconds since the record was published (reader's monotonic clock), or None."""
        if self.publish_mono_ns:
            return max(0.0, (time.monotonic_ns() - self.publish_mono_ns) / 1e9)
        return self.fixed_age_s


class ReaderStats(msgspec.Struct):
    """Counters of one reader (monotonic, for /metrics)."""

    reads: int = 0
    decodes: int = 0
    retries: int = 0
    crc_rejects: int = 0
    torn: int = 0
    decode_errors: int = 0
    reattaches: int = 0


class HotTable(msgspec.Struct, frozen=True):
    """Every rank's dispatch-critical numbers as numpy arrays (index = rank), no msgpack decode.

    ``valid`` is False for ranks without an accepted record (never published, torn, invalid);
    their numbers are zero. ``age_s`` is NaN where ``valid`` is False, and measured at
    ``taken_mono_ns``. The shared-memory reader's arrays are read-only views of one structured
    array, shared with the later tables of the same reader while the ranks do not change.
    """

    taken_mono_ns: int
    seq: npt.NDArray[np.uint64]
    epoch: npt.NDArray[np.uint64]
    publish_mono_ns: npt.NDArray[np.uint64]
    num_running_reqs: npt.NDArray[np.uint64]
    num_waiting_reqs: npt.NDArray[np.uint64]
    num_used_tokens: npt.NDArray[np.uint64]
    num_total_tokens: npt.NDArray[np.uint64]
    max_total_num_tokens: npt.NDArray[np.uint64]
    last_accepted_dispatch_seq: npt.NDArray[np.uint64]
    gen_throughput: npt.NDArray[np.float64]
    age_s: npt.NDArray[np.float64]
    status: npt.NDArray[np.uint8]
    valid: npt.NDArray[np.bool_]

    @property
    def dp_size(self) -> int:
        """Number of ranks in the table."""
        return int(self.seq.shape[0])


@runtime_checkable
class SnapshotSource(Protocol):
    """Anything that yields every rank's latest load: the shm reader, or a test double."""

    @property
    def dp_size(self) -> int:
        """Number of ranks; raises SegmentError subclasses when no segment is readable."""
        ...

    @property
    def stale_after_s(self) -> float:
        """The staleness budget behind ``SlotStatus.STALE``: one value for every consumer."""
        ...

    def read_all(self) -> list[SlotRead]:
        """Every rank's latest snapshot with status and age."""
        ...

    def hot_table(self) -> HotTable:
        """Every rank's dispatch-critical numbers, without msgpack decoding."""
        ...


def unavailable_state(exc: LoadsnapError) -> SegmentState:
    """Why reading failed, as a :class:`SegmentState`: the one mapping behind every 503.

    A :class:`~loadsnap.errors.SegmentUnavailableError` says it itself; any other loadsnap
    error while reading means the segment cannot be used (``INCOMPATIBLE``).
    """
    if isinstance(exc, SegmentUnavailableError):
        return exc.state
    return SegmentState.INCOMPATIBLE
