"""What one reader accepted, per rank, and how it catches up with the segment.

Transport layer, used by :class:`~loadsnap.ShmReader` only. A :class:`RankCache` holds, per
rank, the hot record of the record it last accepted (one ``bytearray``, viewed by numpy as a
structured array), the ranks left torn, the records it refused, and the decoded snapshots. It
reads the segment through ``loadsnap._seqlock`` only: :meth:`RankCache.sync` compares a fresh
copy of the control table with the last one and reads the records of the ranks whose sequence
word moved, one by one below ``gather_min`` ranks (:func:`~loadsnap._seqlock.read_records`),
else with numpy gathers (:func:`~loadsnap._seqlock.gather_records`). Small deployments (up to
``small_max`` ranks) parse and compare the control table in plain Python, where numpy's cost
per call would exceed the whole work; larger ones in numpy.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from loadsnap._seqlock import ReadOutcome, gather_records, read_records
from loadsnap.layout import (
    CONTROL_DTYPE,
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_OFFSET,
    CTRL_EPOCH_OFFSET,
    CTRL_SEQ_OFFSET,
    CTRL_WRITER_PID_OFFSET,
    HOT_DTYPE,
    HOT_FIELD_COUNT,
    HOT_FIELDS,
    HOT_RECORD_SIZE,
    RECORD_CRC_SIZE,
    SLOT_CONTROL_SIZE,
    SegmentGeometry,
)
from loadsnap.reading import ReaderStats
from loadsnap.schema import LoadSnapshot
from loadsnap.wire import DECODE_ERRORS, wire_error

__all__ = ["GATHER_MIN_RANKS", "SMALL_MAX_RANKS", "Payloads", "RankCache"]

# Payloads of records just read, by rank (slices of an mmap are bytes; of a bytearray, not).
Payloads = dict[int, bytes | bytearray]

# Below this many ranks to read, the protocol runs rank by rank in Python; from it on, with
# numpy gathers (a few µs of fixed cost, then well under 100 ns a rank).
GATHER_MIN_RANKS: Final[int] = 24
# Up to this many ranks, the control table is parsed and compared in plain Python.
SMALL_MAX_RANKS: Final[int] = 32
_HOT_END: Final[int] = COPY_HOT_OFFSET + HOT_RECORD_SIZE
_ZERO_HOT: Final[bytes] = bytes(HOT_RECORD_SIZE)
_DECODE_ERRORS: Final = (msgspec.ValidationError, *DECODE_ERRORS)
# (seq, epoch, publish_mono_ns): the first three hot fields (of one, or of every, hot record).
_HOT_HEAD: Final = struct.Struct("<QQQ")
_HOT_HEADS: Final = struct.Struct(f"<QQQ{HOT_RECORD_SIZE - 24}x")
assert [name for name, _ in HOT_FIELDS[:3]] == ["seq", "epoch", "publish_mono_ns"]


def _control_struct(dp_size: int) -> struct.Struct:
    """Unpacks (seq, writer_pid, epoch) of every rank from a copy of the control table."""
    pid_gap = CTRL_WRITER_PID_OFFSET - CTRL_SEQ_OFFSET - 8
    epoch_gap = CTRL_EPOCH_OFFSET - CTRL_WRITER_PID_OFFSET - 8
    tail = SLOT_CONTROL_SIZE - CTRL_EPOCH_OFFSET - 8
    one = f"Q{pid_gap}xQ{epoch_gap}xQ{tail}x".replace("0x", "")
    return struct.Struct("<" + one * dp_size)


class RankCache:
    """Per-rank state of one reader over one mapping. Not thread-safe.

    Attributes
    ----------
    hot:
        The accepted hot records, one ``HOT_DTYPE`` row per rank (zeros: none accepted).
    torn, invalid:
        Ranks whose record could not be read consistently; ranks whose accepted record was
        refused at decoding (rank -> reason).
    snapshots, decoded:
        Per rank, the decoded snapshot and the sequence it was decoded (or refused) at.
    generation:
        Bumped whenever anything above changes.
    touched, table_touched:
        Ranks whose accepted record, refusal or control words changed since the reader last
        rebuilt their reads, and their hot-table entries (each consumer empties its own set).
    """

    def __init__(
        self,
        mm: mmap.mmap,
        words: memoryview,
        geometry: SegmentGeometry,
        stats: ReaderStats,
        *,
        verify: bool = True,
        verify_each: bool = False,
        gather_min: int = GATHER_MIN_RANKS,
        small_max: int = SMALL_MAX_RANKS,
    ) -> None:
        dp = geometry.dp_size
        self.dp_size = dp
        self.small = dp <= small_max
        self._mm, self._words, self._geometry, self._stats = mm, words, geometry, stats
        self._verify, self._batch_check, self._gather_min = verify, not verify_each, gather_min
        self._capacity = geometry.payload_capacity
        self._ctl_lo, self._ctl_hi = geometry.control_offset(0), geometry.control_offset(dp)
        self._seq_index = [geometry.seq_word_index(rank) for rank in range(dp)]
        self._copies = [(geometry.copy_offset(r, 0), geometry.copy_offset(r, 1)) for r in range(dp)]
        control = np.ndarray((dp,), CONTROL_DTYPE, buffer=mm, offset=self._ctl_lo)
        self._seq_words = control["seq"]  # strided: numpy loads each aligned word whole
        self._copy_words = np.ndarray(
            (dp, 2, geometry.copy_size // 8), np.uint64, buffer=mm, offset=geometry.records_offset
        )
        self._unpack_control = _control_struct(dp).unpack if self.small else None
        self.ctl = b""
        self._ctl_rows = np.zeros(dp, CONTROL_DTYPE)
        self._pids: list[int] | None = [0] * dp
        self._epochs: list[int] | None = [0] * dp
        self._hot_buf = bytearray(dp * HOT_RECORD_SIZE)
        self.hot = np.frombuffer(self._hot_buf, HOT_DTYPE)
        self._hot_words = np.frombuffer(self._hot_buf, np.uint64).reshape(dp, HOT_FIELD_COUNT)
        self._accepted: list[int] | None = [0] * dp
        self.torn: set[int] = set()
        self.invalid: dict[int, str] = {}
        self.snapshots: list[LoadSnapshot | None] = [None] * dp
        self.decoded = [0] * dp
        self.generation = 0
        self.touched: set[int] = set()
        self.table_touched: set[int] = set(range(dp))
        self._decode = msgspec.msgpack.Decoder(LoadSnapshot).decode

    def release(self) -> None:
        """Drop every view of the mapping (before it is closed)."""
        del self._seq_words, self._copy_words, self._mm

    # --- reading the control table ----------------------------------------------------------

    def control(self) -> bytes:
        """A fresh copy of the control table (a change detector, not an atomic read)."""
        return self._mm[self._ctl_lo : self._ctl_hi]

    def pids(self) -> list[int]:
        """Each rank's writer pid in the last control table synced."""
        if self._pids is None:
            self._pids = self._ctl_rows["writer_pid"].tolist()
        return self._pids

    def epochs(self) -> list[int]:
        """Each rank's slot epoch in the last control table synced."""
        if self._epochs is None:
            self._epochs = self._ctl_rows["epoch"].tolist()
        return self._epochs

    def control_seqs(self) -> list[int]:
        """Each rank's sequence word in the last control table synced."""
        if self._unpack_control is not None:
            if not self.ctl:
                return [0] * self.dp_size
            return list(self._unpack_control(self.ctl)[0::3])
        seqs: list[int] = self._ctl_rows["seq"].tolist()
        return seqs

    def accepted(self) -> list[int]:
        """Each rank's accepted record sequence (0: none)."""
        seqs = self._accepted
        if seqs is None:
            seqs = self._accepted = self._hot_words[:, 0].tolist()
        return seqs

    def hot_head(self, rank: int) -> tuple[int, int, int]:
        """(seq, epoch, publish_mono_ns) of ``rank``'s accepted record (zeros: none)."""
        seq, epoch, publish_ns = _HOT_HEAD.unpack_from(self._hot_buf, rank * HOT_RECORD_SIZE)
        return seq, epoch, publish_ns

    def hot_heads(self, ranks: list[int]) -> list[tuple[int, int, int]]:
        """:meth:`hot_head` of each of ``ranks``."""
        buf = self._hot_buf
        if len(ranks) * 2 < self.dp_size:
            unpack = _HOT_HEAD.unpack_from
            return [unpack(buf, rank * HOT_RECORD_SIZE) for rank in ranks]
        every: list[tuple[int, int, int]] = list(_HOT_HEADS.iter_unpack(buf))
        return every if len(ranks) == self.dp_size else [every[rank] for rank in ranks]

    def hot_record(self, rank: int) -> bytes | bytearray:
        """A copy of ``rank``'s accepted hot record (zeros: none)."""
        at = rank * HOT_RECORD_SIZE
        return self._hot_buf[at : at + HOT_RECORD_SIZE]

    def hot_words(self) -> npt.NDArray[np.uint64]:
        """A copy of every accepted hot record, as ``(dp_size, HOT_FIELD_COUNT)`` words."""
        return self._hot_words.copy()

    def control_rows(self) -> npt.NDArray[np.void]:
        """The last control table synced, as ``CONTROL_DTYPE`` rows (large deployments)."""
        return self._ctl_rows

    # --- catching up ------------------------------------------------------------------------

    def sync(self, ctl: bytes, keep: bool) -> tuple[list[int], Payloads]:
        """Catch up with the segment given a fresh copy of its control table: read the records
        of the ranks whose sequence moved (and of those left torn).

        Returns the ranks whose record or control words changed, and with ``keep`` the
        payloads of the records just accepted (rank -> bytes).
        """
        if ctl == self.ctl and not self.torn:
            return [], {}
        if self.small:
            return self._sync_small(ctl, keep)
        old, new = self._ctl_rows, np.frombuffer(ctl, CONTROL_DTYPE)
        self.ctl, self._ctl_rows, self._pids, self._epochs = ctl, new, None, None
        moved = new["seq"] != self.hot["seq"]
        if self.torn:
            moved[list(self.torn)] = True
        payloads = self.fetch(np.flatnonzero(moved), keep)
        touched = moved | (new["writer_pid"] != old["writer_pid"]) | (new["epoch"] != old["epoch"])
        changed: list[int] = np.flatnonzero(touched).tolist()
        if changed:
            self.generation += 1
            self.touched.update(changed)
            self.table_touched.update(changed)
        return changed, payloads

    def _sync_small(self, ctl: bytes, keep: bool) -> tuple[list[int], Payloads]:
        assert self._unpack_control is not None
        values = self._unpack_control(ctl)
        seqs, pids, epochs = values[0::3], list(values[1::3]), list(values[2::3])
        accepted, torn = self.accepted(), self.torn
        old_pids, old_epochs = self.pids(), self.epochs()
        self.ctl, self._pids, self._epochs = ctl, pids, epochs
        pairs = enumerate(zip(seqs, accepted, strict=True))
        moved = [r for r, (seq, known) in pairs if seq != known]
        if torn:
            moved = sorted(torn.union(moved))
        payloads = self.fetch(moved, keep)
        if pids != old_pids or epochs != old_epochs:
            moved_set = set(moved)
            changed = [
                r
                for r in range(self.dp_size)
                if r in moved_set or pids[r] != old_pids[r] or epochs[r] != old_epochs[r]
            ]
        else:
            changed = moved
        if changed:
            self.generation += 1
            self.touched.update(changed)
            self.table_touched.update(changed)
        return changed, payloads

    def fetch(self, ranks: Sequence[int] | npt.NDArray[np.intp], keep: bool) -> Payloads:
        """Read the records of ``ranks`` through the protocol and make them the accepted ones;
        with ``keep``, return their payloads (rank -> bytes)."""
        payloads: Payloads = {}
        if len(ranks) == 0:
            return payloads
        self.generation += 1
        listed: list[int] = ranks.tolist() if isinstance(ranks, np.ndarray) else list(ranks)
        self.touched.update(listed)
        self.table_touched.update(listed)
        if self.invalid:
            for rank in listed:
                self.invalid.pop(rank, None)
        if len(listed) < self._gather_min:
            self._fetch_each(listed, keep, payloads)
        else:
            self._fetch_gathered(np.asarray(ranks, dtype=np.intp), keep, payloads)
        return payloads

    def _fetch_each(self, ranks: list[int], keep: bool, payloads: Payloads) -> None:
        stats, torn, hot, accepted = self._stats, self.torn, self._hot_buf, self._accepted
        result = read_records(
            self._mm,
            self._words,
            [self._seq_index[rank] for rank in ranks],
            [self._copies[rank] for rank in ranks],
            self._capacity,
            verify=self._verify,
            batch_check=self._batch_check,
        )
        stats.retries += result.retries
        stats.crc_rejects += result.crc_rejects
        for rank, outcome, seq, record in zip(
            ranks, result.outcomes, result.seqs, result.records, strict=True
        ):
            at = rank * HOT_RECORD_SIZE
            if outcome is ReadOutcome.OK:
                hot[at : at + HOT_RECORD_SIZE] = record[COPY_HOT_OFFSET:_HOT_END]
                torn.discard(rank)
                if keep:
                    payloads[rank] = record[COPY_PAYLOAD_OFFSET:-RECORD_CRC_SIZE]
            else:
                hot[at : at + HOT_RECORD_SIZE] = _ZERO_HOT
                seq = 0
                if outcome is ReadOutcome.TORN:
                    stats.torn += 1
                    torn.add(rank)
                else:
                    torn.discard(rank)
            if accepted is not None:
                accepted[rank] = seq

    def _fetch_gathered(self, ranks: npt.NDArray[np.intp], keep: bool, payloads: Payloads) -> None:
        stats, torn, hot_words = self._stats, self.torn, self._hot_words
        gathered = gather_records(
            self._copy_words,
            self._seq_words,
            ranks,
            self._capacity,
            verify=self._verify,
            batch_check=self._batch_check,
        )
        stats.retries += gathered.retries
        stats.crc_rejects += gathered.crc_rejects
        self._accepted = None
        if torn:
            torn.difference_update(ranks.tolist())
        for batch in gathered.batches:
            hot_words[batch.ranks] = batch.rows[:, 1 : 1 + HOT_FIELD_COUNT]
            if keep:  # small copies: one more large one would cost page faults
                with batch.rows.data.cast("B") as data:
                    width = batch.rows.shape[1] * 8
                    start = COPY_PAYLOAD_OFFSET
                    ranks_lengths = zip(batch.ranks.tolist(), batch.lengths.tolist(), strict=True)
                    for rank, length in ranks_lengths:
                        payloads[rank] = bytes(data[start : start + length])
                        start += width
        for lost in (gathered.never, gathered.torn):
            hot_words[lost] = 0
        if gathered.torn.size:
            stats.torn += int(gathered.torn.size)
            torn.update(gathered.torn.tolist())

    # --- decoding ---------------------------------------------------------------------------

    def decode(self, ranks: Iterable[int], payloads: Payloads) -> None:
        """Decode the accepted records of ``ranks`` not decoded yet, re-reading those whose
        payload is not in ``payloads`` (a record accepted by a hot table, say)."""
        seqs, decoded = self.accepted(), self.decoded
        need = [r for r in ranks if seqs[r] != decoded[r] and seqs[r]]
        if not need:
            return
        missing = [r for r in need if r not in payloads]
        if missing:
            payloads.update(self.fetch(missing, keep=True))
            seqs = self.accepted()
            need = [r for r in need if seqs[r] != decoded[r] and seqs[r]]
        listed = [r for r in need if r in payloads]
        if not listed:
            return
        kept, decode = self.snapshots, self._decode
        decodes = 0
        for rank in listed:
            try:
                snapshot = decode(payloads[rank])
            except _DECODE_ERRORS as exc:
                self.refuse(rank, seqs[rank], str(wire_error(exc, "snapshot")))
                continue
            if snapshot.dp_rank != rank:
                reason = f"record names dp_rank={snapshot.dp_rank} in slot {rank}"
                self.refuse(rank, seqs[rank], reason)
                continue
            decodes += 1
            kept[rank] = snapshot
            decoded[rank] = seqs[rank]
        self._stats.decodes += decodes

    def refuse(self, rank: int, seq: int, reason: str) -> None:
        """Refuse ``rank``'s accepted record ``seq`` (it does not decode) for ``reason``."""
        self._stats.decode_errors += 1
        self.invalid[rank] = reason
        self.snapshots[rank] = None
        self.decoded[rank] = seq
        self.generation += 1
        self.touched.add(rank)
        self.table_touched.add(rank)
