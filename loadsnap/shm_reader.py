"""``ShmReader``: read every rank's latest snapshot from an instance's segment.

Attaches read-only and lazily: a reader may start before any writer, and re-attaches when the
segment is recreated (a new deployment) or disappears (the last writer shut down).

Theory of operation
-------------------
A reader keeps, per rank, what it last accepted (``loadsnap._readcache``): the record's hot
values, its decoded snapshot once a caller needed it, and the last :class:`SlotRead` built.
Every call starts with one copy of the control table (every rank's sequence word, writer pid
and epoch, contiguous) and compares it with the previous copy. Equal bytes mean that no rank
published, attached or detached since (the copy is only a change detector: a word that moved
differs in at least one byte, and a byte read before a store only means the call came before
it), so a call whose cached statuses cannot have changed yet returns its cached results
without touching a record. Otherwise only the ranks whose sequence word moved are read,
through the seqlock protocol of ``loadsnap._seqlock`` (atomic loads of the word before and
after the copy, the record's own sequence, its check word; the check words of all the records
read at once with one CRC call). Every record is accepted by that one routine whichever method
asks (:meth:`read`, :meth:`read_all`, :meth:`read_changed`, :meth:`hot_table`), so they all
accept the same records, and a record they accepted is not read again until its slot moves.
"""

from __future__ import annotations

import os
import time
from typing import Final

from loadsnap._hottable import (
    LargeTable,
    SmallTable,
    TableSource,
    aged_status,
    hot_table,
    table_age,
)
from loadsnap._location import SegmentLocation
from loadsnap._readcache import GATHER_MIN_RANKS, SMALL_MAX_RANKS, Payloads, RankCache
from loadsnap._segment import MappedSegment, open_readonly
from loadsnap.errors import (
    LayoutError,
    SegmentError,
    SegmentNotReadyError,
    SegmentUnavailableError,
    UsageError,
)
from loadsnap.layout import (
    CTRL_EPOCH_OFFSET,
    CTRL_REFUSED_OFFSET,
    CTRL_SEQ_OFFSET,
    CTRL_WRITER_PID_OFFSET,
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

__all__ = ["SegmentUnavailableError", "ShmReader"]

# A rank older than this gets its writer's liveness probed (one fcntl on the slot's lock
# byte); fresher ones are evidently alive. Keeps the probe off the common path.
DEAD_PROBE_AFTER_S: Final[float] = 0.25
REATTACH_CHECK_INTERVAL_S: Final[float] = 0.5
_FOREVER: Final[int] = 2**62
_TORN_REASON: Final[str] = "no consistent copy after retries"
_DETACHED_REASON: Final[str] = "writer detached"
_GONE_REASON: Final[str] = "writer is gone (its slot lock was released)"


class ShmReader:
    """Reads every rank of one instance. Safe from any process, never blocks a writer.

    One reader object is not thread-safe (it caches what it accepted); use one per thread.

    Parameters
    ----------
    instance:
        Deployment instance name.
    stale_after_s:
        Staleness budget: a rank whose last publish is older is STALE (or DEAD if its writer
        is gone).
    verify:
        Check each record's sequence and check word (default). Off only for control runs.
    verify_each:
        Check the check word of each record with its own CRC call rather than one call for
        every record read together (the default, as strong; see ``loadsnap._seqlock``).
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
        self.verify_each = bool(verify_each)
        self.stats = ReaderStats()
        self._segment: MappedSegment | None = None
        self._state = SegmentState.MISSING
        self._reason = "not attached yet"
        self._next_check = 0.0
        # How the cache reads (tests set them to cover both ways at any size).
        self._gather_min = GATHER_MIN_RANKS
        self._small_max = SMALL_MAX_RANKS
        self._stale_ns = int(stale_after_s * 1e9)
        self._probe_ns = int(DEAD_PROBE_AFTER_S * 1e9)
        self._fresh_ns = min(self._stale_ns, self._probe_ns)

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
        self._setup(segment)
        self._state, self._reason = SegmentState.OK, ""
        return segment

    def _describe(self) -> str:
        return f"{self._state.value}: {self._reason} (segment={self.segment_path})"

    def _setup(self, segment: MappedSegment) -> None:
        header = segment.header
        geometry = SegmentGeometry(header.dp_size, header.payload_capacity)
        self._geometry = geometry
        self._words = segment.buf.cast("Q")
        self._cache = RankCache(
            segment.mm,
            self._words,
            geometry,
            self.stats,
            verify=self.verify,
            verify_each=self.verify_each,
            gather_min=self._gather_min,
            small_max=self._small_max,
        )
        dp = geometry.dp_size
        self._reads: list[SlotRead | None] = [None] * dp
        self._until = [0] * dp  # until then the cached read stands (0: rebuild)
        self._all_until = 0
        self._table: TableSource = (
            SmallTable(dp, self._fresh_ns) if self._cache.small else LargeTable(self._fresh_ns)
        )

    def _detach(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        self._cache.release()
        self._words.release()
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
            int(words[(geometry.control_offset(rank) + CTRL_REFUSED_OFFSET) // 8])
            for rank in range(geometry.dp_size)
        ]

    # --- statuses ---------------------------------------------------------------------------

    def _slot_read(
        self, rank: int, now: int, pid: int, ctl_epoch: int, head: tuple[int, int, int]
    ) -> tuple[SlotRead, int]:
        """Rank ``rank``'s read from what this reader accepted (``head``: the accepted
        record's sequence, epoch and publish time), and until when it stands."""
        cache = self._cache
        seq, epoch, publish_ns = head
        if not seq:
            if rank in cache.torn:
                return SlotRead(rank, SlotStatus.TORN, None, None, 0, 0, pid, _TORN_REASON), 0
            status = SlotStatus.NEVER_PUBLISHED
            return SlotRead(rank, status, None, None, 0, ctl_epoch, pid, "no record yet"), _FOREVER
        reason = cache.invalid.get(rank)
        if reason is not None:
            status = SlotStatus.INVALID
            return SlotRead(rank, status, None, None, seq, epoch, pid, reason), _FOREVER
        age_ns = now - publish_ns
        snapshot = cache.snapshots[rank]
        if pid == 0:
            status, reason, until = SlotStatus.DEAD, _DETACHED_REASON, _FOREVER
        elif age_ns > self._probe_ns and not self._writer_alive(rank, pid):
            status, reason, until = (
                SlotStatus.DEAD,
                _GONE_REASON,
                _FOREVER,
            )  # until a writer attaches
        elif age_ns > self._stale_ns:
            reason = f"age {max(0.0, age_ns / 1e9):.3f}s > budget {self.stale_after_s}s"
            status, until = SlotStatus.STALE, 0
        elif age_ns > self._fresh_ns:
            status, reason, until = SlotStatus.FRESH, "", 0  # probed: probe again next time
        else:
            status, reason, until = SlotStatus.FRESH, "", publish_ns + self._fresh_ns
        read = SlotRead(rank, status, snapshot, None, seq, epoch, pid, reason, publish_ns)
        return read, until

    def _rebuild(self, ranks: list[int], now: int) -> None:
        """Rebuild the cached reads of ``ranks`` (decoded already)."""
        cache, reads, until = self._cache, self._reads, self._until
        pids, epochs = cache.pids(), cache.epochs()
        snapshots, refused, fresh_ns = cache.snapshots, cache.invalid, self._fresh_ns
        fresh, slot_read = SlotStatus.FRESH, self._slot_read
        for rank, head in zip(ranks, cache.hot_heads(ranks), strict=True):
            seq, epoch, publish_ns = head
            pid = pids[rank]
            if seq and pid and now - publish_ns <= fresh_ns and not (refused and rank in refused):
                # the common case, inlined: a young record with its writer attached
                snapshot = snapshots[rank]
                reads[rank] = SlotRead(rank, fresh, snapshot, None, seq, epoch, pid, "", publish_ns)
                until[rank] = publish_ns + fresh_ns
            else:
                reads[rank], until[rank] = slot_read(rank, now, pid, epochs[rank], head)
        cache.touched.difference_update(ranks)
        self._all_until = min(until)

    # --- per-rank reads ---------------------------------------------------------------------

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self._geometry.dp_size:
            raise UsageError(
                f"dp_rank out of range: dp_rank={rank} dp_size={self._geometry.dp_size}"
            )

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
        self._check_rank(rank)
        self.stats.reads += 1
        cache, words = self._cache, self._words
        ctl = self._geometry.control_offset(rank) // 8
        payloads: Payloads = {}
        if words[ctl + CTRL_SEQ_OFFSET // 8] != cache.accepted()[rank] or rank in cache.torn:
            payloads = cache.fetch([rank], keep=True)
        cache.decode((rank,), payloads)
        pid = int(words[ctl + CTRL_WRITER_PID_OFFSET // 8])
        epoch = int(words[ctl + CTRL_EPOCH_OFFSET // 8])
        now = time.monotonic_ns()
        return self._slot_read(rank, now, pid, epoch, cache.hot_head(rank))[0]

    def read_all(self) -> list[SlotRead]:
        """Read every rank; reads and decodes only the slots whose sequence moved since this
        reader last looked, and hands out the cached reads of the others (their ``age_s`` is
        measured when asked, see :class:`~loadsnap.SlotRead`).

        Raises
        ------
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        cache = self._cache
        ctl = cache.control()
        now = time.monotonic_ns()
        self.stats.reads += cache.dp_size
        if ctl == cache.ctl and now < self._all_until and not cache.touched and not cache.torn:
            return self._reads[:]  # type: ignore[return-value]  # nothing moved or aged
        _, payloads = cache.sync(ctl, keep=True)
        rebuild = cache.touched
        if now >= self._all_until:
            rebuild = rebuild.union(r for r, stands in enumerate(self._until) if stands <= now)
        ranks = sorted(rebuild)
        cache.decode(ranks, payloads)
        self._rebuild(sorted(cache.touched.union(ranks)), now)
        return self._reads[:]  # type: ignore[return-value]

    def read_changed(self) -> list[SlotRead]:
        """Read only the ranks whose record changed since this reader last decoded them."""
        self._attach()
        cache = self._cache
        _, payloads = cache.sync(cache.control(), keep=True)
        accepted, decoded, torn = cache.accepted(), cache.decoded, cache.torn
        ranks = [
            r
            for r in range(cache.dp_size)
            if (accepted[r] and accepted[r] != decoded[r]) or r in torn
        ]
        if not ranks:
            return []
        self.stats.reads += len(ranks)
        cache.decode(ranks, payloads)
        self._rebuild(ranks, time.monotonic_ns())
        return [self._reads[rank] for rank in ranks]  # type: ignore[misc]

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
        self._check_rank(rank)
        offset = self._geometry.control_offset(rank) + CTRL_WRITER_PID_OFFSET
        pid = int(self._words[offset // 8])
        return pid != 0 and self._writer_alive(rank, pid)

    def _writer_alive(self, rank: int, pid: int) -> bool:
        segment = self._segment
        assert segment is not None
        return segment.writer_alive(self._geometry.slot_lock_offset(rank), pid)

    # --- hot table --------------------------------------------------------------------------

    def hot_table(self) -> HotTable:
        """Every rank's dispatch-critical numbers as numpy arrays, without msgpack decoding.

        Reads only the records whose sequence moved since this reader last looked, through
        the checks :meth:`read` makes (it accepts exactly the records :meth:`read` accepts),
        and shares its read-only column arrays with the later tables while no rank changes.

        Raises
        ------
        SegmentUnavailableError
            No readable segment.
        """
        self._attach()
        cache = self._cache
        ctl = cache.control()
        if ctl != cache.ctl or cache.torn:
            cache.sync(ctl, keep=False)
        now = time.monotonic_ns()
        parts = self._table.parts(cache)
        age = table_age(parts, now)
        status = parts.status
        if now >= parts.fresh_until_ns:
            status = aged_status(
                parts, age, cache.pids(), self._writer_alive, self.stale_after_s, DEAD_PROBE_AFTER_S
            )
        return hot_table(parts, now, age, status)
