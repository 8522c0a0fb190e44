"""``ShmReader``: read every rank's latest snapshot from an instance's segment.

Attaches read-only and lazily: a reader may start before any writer, and re-attaches when the
segment is recreated (a new deployment) or disappears (the last writer shut down).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Final

import numpy as np
import numpy.typing as npt

from loadsnap._location import SegmentLocation
from loadsnap._segment import MappedSegment, open_readonly
from loadsnap._seqlock import ReadOutcome, read_record
from loadsnap.errors import (
    LayoutError,
    SegmentError,
    SegmentNotReadyError,
    SegmentUnavailableError,
    UsageError,
    WireError,
)
from loadsnap.layout import (
    COPY_HOT_OFFSET,
    CTRL_EPOCH_OFFSET,
    CTRL_REFUSED_OFFSET,
    CTRL_SEQ_OFFSET,
    CTRL_WRITER_PID_OFFSET,
    HOT_DTYPE,
    HOT_FIELDS,
    HOT_STRUCT,
    RECORD_HEADER_SIZE,
    SLOT_CONTROL_SIZE,
    SegmentGeometry,
)
from loadsnap.reading import (
    DEFAULT_STALE_AFTER_S,
    HotTable,
    ReaderStats,
    SegmentState,
    SlotRead,
    SlotStatus,
)
from loadsnap.schema import LoadSnapshot
from loadsnap.wire import SnapshotDecoder

__all__ = ["SegmentUnavailableError", "ShmReader"]

# A rank older than this gets its writer's liveness probed (one fcntl on the slot's lock
# byte); fresher ones are evidently alive. Keeps the probe off the common path.
DEAD_PROBE_AFTER_S: Final[float] = 0.25
REATTACH_CHECK_INTERVAL_S: Final[float] = 0.5
# Total store order: the vectorised sequence check alone proves a hot record consistent.
_TSO_MACHINES: Final[frozenset[str]] = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_FIELD_INDEX: Final[dict[str, int]] = {name: i for i, (name, _) in enumerate(HOT_FIELDS)}
_SEQ: Final[int] = _FIELD_INDEX["seq"]
_EPOCH: Final[int] = _FIELD_INDEX["epoch"]
_MONO: Final[int] = _FIELD_INDEX["publish_mono_ns"]


class ShmReader:
    """Reads every rank of one instance. Safe from any process, never blocks a writer.

    One reader object is not thread-safe (it caches decoded snapshots); use one per thread.

    Parameters
    ----------
    instance:
        Deployment instance name.
    stale_after_s:
        Staleness budget: a rank whose last publish is older is STALE (or DEAD if its writer
        is gone).
    verify:
        Check record CRCs (default). Off only for the torn-read detector's control run.
    verify_each:
        Make :meth:`hot_table` read every rank through the CRC-checked path (default: only on
        CPUs without total store order, e.g. arm64).
    shm_dir:
        As for :class:`~loadsnap.ShmWriter`.
    """

    def __init__(
        self,
        instance: str,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        verify: bool = True,
        verify_each: bool | None = None,
        shm_dir: str | None = None,
    ) -> None:
        if not stale_after_s > 0:
            raise UsageError(f"stale_after_s must be > 0: stale_after_s={stale_after_s}")
        self._location = SegmentLocation(instance, shm_dir)
        self.instance = self._location.instance
        self.stale_after_s = stale_after_s
        self.verify = verify
        if verify_each is None:
            verify_each = platform.machine().lower() not in _TSO_MACHINES
        self.verify_each = verify_each
        self.stats = ReaderStats()
        self._decoder = SnapshotDecoder()
        self._segment: MappedSegment | None = None
        self._state = SegmentState.MISSING
        self._reason = "not attached yet"
        self._next_check = 0.0
        self._cache: dict[int, tuple[int, LoadSnapshot]] = {}

    # --- attachment -------------------------------------------------------------------------

    def _attach(self) -> MappedSegment:
        now = time.monotonic()
        segment = self._segment
        if segment is not None and now < self._next_check:
            return segment
        self._next_check = now + REATTACH_CHECK_INTERVAL_S
        if segment is not None:
            try:
                st = os.stat(self.segment_path)
                if (st.st_dev, st.st_ino) == segment.identity:
                    return segment
            except FileNotFoundError:
                pass
            self._detach()
            self.stats.reattaches += 1
        try:
            segment = open_readonly(self._location)
        except FileNotFoundError:
            self._state, self._reason = SegmentState.MISSING, "no segment: no writer has started"
            raise SegmentUnavailableError(self._describe(), self._state) from None
        except SegmentNotReadyError:
            self._state, self._reason = SegmentState.NOT_READY, "segment not initialised yet"
            self._next_check = 0.0
            raise SegmentUnavailableError(self._describe(), self._state) from None
        except (LayoutError, SegmentError) as exc:
            self._state, self._reason = SegmentState.INCOMPATIBLE, str(exc)
            raise SegmentUnavailableError(self._describe(), self._state) from exc
        self._segment = segment
        self._setup_views(segment)
        self._state, self._reason = SegmentState.OK, ""
        return segment

    def _describe(self) -> str:
        return f"{self._state.value}: {self._reason} (segment={self.segment_path})"

    def _setup_views(self, segment: MappedSegment) -> None:
        header = segment.header
        geometry = SegmentGeometry(header.dp_size, header.payload_capacity)
        self._geometry = geometry
        self._words = segment.buf.cast("Q")
        self._cache.clear()
        raw = np.frombuffer(segment.mm, dtype=np.uint8)
        stride = (geometry.slot_size,)
        base = geometry.slot_offset(0)

        def column(offset: int, dtype: np.dtype | str) -> npt.NDArray:  # type: ignore[type-arg]
            return np.ndarray(
                (geometry.dp_size,), dtype=dtype, buffer=raw, offset=base + offset, strides=stride
            )

        self._seq_col = column(CTRL_SEQ_OFFSET, "<u8")
        self._pid_col = column(CTRL_WRITER_PID_OFFSET, "<u8")
        copy1 = SLOT_CONTROL_SIZE + geometry.copy_size
        self._hot_cols = (
            column(SLOT_CONTROL_SIZE + COPY_HOT_OFFSET, HOT_DTYPE),
            column(copy1 + COPY_HOT_OFFSET, HOT_DTYPE),
        )

    def _detach(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        self._words.release()
        for name in ("_seq_col", "_pid_col", "_hot_cols"):
            with contextlib.suppress(AttributeError):
                delattr(self, name)
        self._cache.clear()
        segment.close()

    @property
    def segment_path(self) -> str:
        """Path of the segment file this reader reads."""
        return self._location.path

    def segment_state(self) -> tuple[SegmentState, str]:
        """Whether a segment is readable now, and if not, why."""
        try:
            self._attach()
        except SegmentUnavailableError as exc:
            return exc.state, self._reason
        return SegmentState.OK, ""

    @property
    def dp_size(self) -> int:
        """Number of ranks in the segment.

        Raises
        ------
        SegmentUnavailableError
            No readable segment (missing, not ready, incompatible).
        """
        return self._attach().header.dp_size

    @property
    def segment(self) -> MappedSegment:
        """The attached segment (for diagnostics such as ``loadsnap inspect``)."""
        return self._attach()

    def close(self) -> None:
        """Release the mapping. Idempotent."""
        self._detach()

    def __enter__(self) -> ShmReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def refused_counts(self) -> list[int]:
        """Payloads refused for not fitting the slot, per rank (from the slots' control words).

        Raises
        ------
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        geometry, words = self._geometry, self._words
        return [
            int(words[(geometry.slot_offset(rank) + CTRL_REFUSED_OFFSET) // 8])
            for rank in range(geometry.dp_size)
        ]

    # --- per-rank reads ---------------------------------------------------------------------

    def read(self, rank: int) -> SlotRead:
        """Read one rank.

        Raises
        ------
        UsageError
            ``rank`` out of range.
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        if not 0 <= rank < self._geometry.dp_size:
            raise UsageError(
                f"dp_rank out of range: dp_rank={rank} dp_size={self._geometry.dp_size}"
            )
        return self._read_rank(rank, time.monotonic_ns())

    def read_all(self) -> list[SlotRead]:
        """Read every rank; decodes only slots whose sequence moved since the last call.

        Raises
        ------
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        now = time.monotonic_ns()
        return [self._read_rank(rank, now) for rank in range(self._geometry.dp_size)]

    def read_changed(self) -> list[SlotRead]:
        """Read only the ranks whose record changed since this reader last decoded them."""
        self._attach()
        seqs = self._seq_col.copy()
        now = time.monotonic_ns()
        changed = []
        for rank in range(self._geometry.dp_size):
            seq = int(seqs[rank])
            cached = self._cache.get(rank)
            if seq and (cached is None or cached[0] != seq):
                changed.append(self._read_rank(rank, now))
        return changed

    def _read_rank(self, rank: int, now_ns: int) -> SlotRead:
        geometry, words = self._geometry, self._words
        self.stats.reads += 1
        result = read_record(
            self._segment.buf,  # type: ignore[union-attr]
            words,
            geometry.seq_word_index(rank),
            (geometry.copy_offset(rank, 0), geometry.copy_offset(rank, 1)),
            geometry.payload_capacity,
            verify=self.verify,
        )
        self.stats.retries += result.retries
        self.stats.crc_rejects += result.crc_rejects
        ctrl = geometry.slot_offset(rank) // 8
        pid = int(words[ctrl + CTRL_WRITER_PID_OFFSET // 8])
        if result.outcome is ReadOutcome.NEVER_PUBLISHED:
            epoch = int(words[ctrl + CTRL_EPOCH_OFFSET // 8])
            return SlotRead(
                rank, SlotStatus.NEVER_PUBLISHED, None, None, 0, epoch, pid, "no record yet"
            )
        if result.outcome is ReadOutcome.TORN:
            self.stats.torn += 1
            return SlotRead(
                rank, SlotStatus.TORN, None, None, 0, 0, pid, "no consistent copy after retries"
            )
        hot = HOT_STRUCT.unpack_from(result.record, COPY_HOT_OFFSET)
        seq, epoch, publish_mono_ns = hot[_SEQ], hot[_EPOCH], hot[_MONO]
        cached = self._cache.get(rank)
        if cached is not None and cached[0] == seq:
            snapshot = cached[1]
        else:
            try:
                snapshot = self._decoder.decode(result.record[RECORD_HEADER_SIZE:])
            except WireError as exc:
                self.stats.decode_errors += 1
                return SlotRead(rank, SlotStatus.INVALID, None, None, seq, epoch, pid, str(exc))
            if snapshot.dp_rank != rank:
                self.stats.decode_errors += 1
                reason = f"record names dp_rank={snapshot.dp_rank} in slot {rank}"
                return SlotRead(rank, SlotStatus.INVALID, None, None, seq, epoch, pid, reason)
            self.stats.decodes += 1
            self._cache[rank] = (seq, snapshot)
        age_s = max(0.0, (now_ns - publish_mono_ns) / 1e9)
        status, reason = self._classify(age_s, pid, rank)
        return SlotRead(rank, status, snapshot, age_s, seq, epoch, pid, reason)

    def writer_alive(self, rank: int) -> bool:
        """Whether ``rank`` has an attached writer that is alive, in any pid namespace.

        Asks the kernel whether the slot's lock is held (``loadsnap._liveness``).

        Raises
        ------
        UsageError
            ``rank`` out of range.
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        if not 0 <= rank < self._geometry.dp_size:
            raise UsageError(
                f"dp_rank out of range: dp_rank={rank} dp_size={self._geometry.dp_size}"
            )
        pid = int(self._pid_col[rank])
        return pid != 0 and self._writer_alive(rank, pid)

    def _writer_alive(self, rank: int, pid: int) -> bool:
        segment = self._segment
        assert segment is not None
        return segment.writer_alive(self._geometry.slot_lock_offset(rank), pid)

    def _classify(self, age_s: float, pid: int, rank: int) -> tuple[SlotStatus, str]:
        if pid == 0:
            return SlotStatus.DEAD, "writer detached"
        if age_s > DEAD_PROBE_AFTER_S and not self._writer_alive(rank, pid):
            return SlotStatus.DEAD, "writer is gone (its slot lock was released)"
        if age_s > self.stale_after_s:
            return SlotStatus.STALE, f"age {age_s:.3f}s > budget {self.stale_after_s}s"
        return SlotStatus.FRESH, ""

    # --- hot table --------------------------------------------------------------------------

    def hot_table(self) -> HotTable:
        """Every rank's dispatch-critical numbers as numpy arrays, without msgpack decoding.

        On x86-64 (TSO) it copies the hot record of both copies of every slot between two
        vectorised reads of every sequence word, and re-reads one by one (bounded retries) only
        the ranks whose sequence moved. Elsewhere, or with ``verify_each=True``, every rank is
        read through the CRC-checked path, since weaker memory orders make the sequence check
        alone insufficient there.

        Raises
        ------
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        seq_col = self._seq_col
        s1 = seq_col.copy()
        hot = self._hot_cols[0].copy()
        hot1 = self._hot_cols[1].copy()
        s2 = seq_col.copy()
        now = time.monotonic_ns()
        use1 = (s1 & 1).astype(bool)  # record k lives in copy k & 1
        hot[use1] = hot1[use1]
        published = s1 != 0
        if self.verify_each:
            ok = np.zeros_like(published)
        else:
            ok = published & (s1 == s2) & (hot["seq"] == s1)
        for rank in np.flatnonzero(published & ~ok).tolist():
            ok[rank] = self._reread_hot(rank, hot)
        hot[~ok] = np.zeros(1, dtype=HOT_DTYPE)
        return self._table(hot, ok, published, now)

    def _reread_hot(self, rank: int, hot: npt.NDArray) -> bool:  # type: ignore[type-arg]
        geometry = self._geometry
        result = read_record(
            self._segment.buf,  # type: ignore[union-attr]
            self._words,
            geometry.seq_word_index(rank),
            (geometry.copy_offset(rank, 0), geometry.copy_offset(rank, 1)),
            geometry.payload_capacity,
            verify=self.verify,
        )
        self.stats.retries += result.retries
        self.stats.crc_rejects += result.crc_rejects
        if result.outcome is not ReadOutcome.OK:
            if result.outcome is ReadOutcome.TORN:
                self.stats.torn += 1
            return False
        hot[rank] = np.frombuffer(result.record, HOT_DTYPE, 1, COPY_HOT_OFFSET)[0]
        return True

    def _table(
        self,
        hot: npt.NDArray,  # type: ignore[type-arg]
        ok: npt.NDArray[np.bool_],
        published: npt.NDArray[np.bool_],
        now: int,
    ) -> HotTable:
        age = np.where(ok, (now - hot["publish_mono_ns"].astype(np.int64)) / 1e9, np.nan)
        age = np.maximum(age, 0.0, where=ok, out=age)
        status = np.full(ok.shape, SlotStatus.FRESH, dtype=np.uint8)
        status[~published] = SlotStatus.NEVER_PUBLISHED
        status[published & ~ok] = SlotStatus.TORN
        pids = self._pid_col.copy()
        status[ok & (age > self.stale_after_s)] = SlotStatus.STALE
        status[ok & (pids == 0)] = SlotStatus.DEAD
        for rank in np.flatnonzero(ok & (pids != 0) & (age > DEAD_PROBE_AFTER_S)).tolist():
            if not self._writer_alive(rank, int(pids[rank])):
                status[rank] = SlotStatus.DEAD
        columns = {name: np.ascontiguousarray(hot[name]) for name, _ in HOT_FIELDS}
        return HotTable(taken_mono_ns=now, age_s=age, status=status, valid=ok, **columns)
