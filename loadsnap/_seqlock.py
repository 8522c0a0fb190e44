"""Double-buffered seqlock over one slot: the protocol core. No I/O, no clocks.

Theory of operation
-------------------
Each slot holds a sequence word ``s`` and two record copies. Record ``k`` lives in copy
``k & 1``, so publishing it is two named steps (:class:`WriteStep`)::

    COPY      copy (k & 1) <- record k   readers still take copy (k - 1) & 1: record k - 1
    PUBLISH   s = k                      readers now take copy k & 1: record k

A writer only ever writes the copy that ``s`` does not advertise. A reader loads ``s``, copies
out copy ``s & 1``, loads ``s`` again and accepts only if it did not move, the copy's record
sequence equals ``s`` and its check word matches. The writer touches copy ``s & 1`` again only after
``s`` has moved past it, and ``s`` only grows, so an unchanged ``s`` means the copy was not
written while it was read. At every instant the advertised copy is complete, so a writer that
dies at any step leaves the latest complete record readable, and a restarted writer simply
goes on from ``s``. One copy per publish: the same cost as a plain seqlock. ``s == 0`` means
never published.

The sequence word is written with one aligned 8-byte store through ``memoryview.cast("Q")``:
``struct.pack_into`` zero-fills before it copies, so a reader could see a transient 0 (or a
byte-mixed value) that looks like another published sequence. On x86-64 (TSO) stores become
visible in program order; on arm64 they may not, which is why each record ends with a check
word (a linear CRC-32 of everything before it, see ``loadsnap.layout``): a torn copy is
rejected on any CPU, at worst costing a retry. The linear CRC of a whole record is zero, and
so is that of any concatenation of records (each followed by zeros or not), so a reader checks
many copied records with one call (:func:`records_intact`) and falls back to one record at a
time only when that fails.

:func:`write_steps` and :func:`read_steps` are step-by-step mirrors of :func:`write_record`
and :func:`read_record` for the deterministic interleaving tests; a test checks that the
mirrors and the straight-line functions leave identical bytes.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Callable, Generator, Sequence
from typing import Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from zlib_ng.zlib_ng import crc32

from loadsnap.layout import (
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_LEN_OFFSET,
    CRC_CHECK_VALUE,
    CRC_SEED,
    CRC_STRUCT,
    HEAD_STRUCT,
    HOT_SEQ_INDEX,
    RECORD_CRC_SIZE,
    RECORD_HEADER_SIZE,
)

__all__ = [
    "DEFAULT_READ_ATTEMPTS",
    "BatchRead",
    "GatheredRecords",
    "ReadOutcome",
    "ReadResult",
    "WriteStep",
    "build_record",
    "crc32",
    "gather_records",
    "linear_crc",
    "read_record",
    "read_records",
    "read_steps",
    "record_crc",
    "record_is_intact",
    "records_intact",
    "write_record",
    "write_steps",
]

DEFAULT_READ_ATTEMPTS: Final[int] = 64
_SEQ_OFFSET: Final[int] = COPY_HOT_OFFSET + 8 * HOT_SEQ_INDEX
_SEQ_WORD: Final[int] = _SEQ_OFFSET // 8  # the hot seq, as a u64 index into a record
_LEN_SHIFT: Final[int] = 8 * COPY_PAYLOAD_LEN_OFFSET - 64 * (COPY_PAYLOAD_LEN_OFFSET // 8)
RECORD_OVERHEAD: Final[int] = RECORD_HEADER_SIZE + RECORD_CRC_SIZE
_U32: Final = CRC_STRUCT.unpack_from
_U64: Final = struct.Struct("<Q").unpack_from
_HEAD_PACK: Final = HEAD_STRUCT.pack_into
_CRC_PACK: Final = CRC_STRUCT.pack

Buffer = bytes | bytearray | memoryview


class Words(Protocol):
    """The sequence words as the batch reader loads them (a ``memoryview.cast("Q")``)."""

    def __getitem__(self, index: int, /) -> int: ...


# What the batch readers copy records out of (slices of an mmap are bytes).
Source = Buffer | mmap.mmap
SeqStore = Callable[[memoryview, int, int], Generator[None, None, None]]


class WriteStep(enum.Enum):
    """The named steps of one publish, in order."""

    COPY = "copy"
    PUBLISH = "publish"


class ReadOutcome(enum.Enum):
    """What reading a slot produced."""

    OK = "ok"
    NEVER_PUBLISHED = "never_published"
    TORN = "torn"  # no consistent copy within the attempt budget


class ReadResult(NamedTuple):
    """Outcome of :func:`read_record`; ``record`` is the whole record (header, payload and check
    word) when OK. ``seq`` is the sequence word the outcome was decided on.
    """

    outcome: ReadOutcome
    seq: int
    record: bytes
    retries: int
    crc_rejects: int


def linear_crc(data: Buffer) -> int:
    """The linear CRC-32 of ``data``: zlib's polynomial, no initial or final inversion."""
    return crc32(data, CRC_SEED) ^ CRC_SEED


def build_record(staging: bytearray, hot_values: Sequence[int | float], payload_len: int) -> int:
    """Fill the record header in ``staging`` (payload already at RECORD_HEADER_SIZE) and put the
    check word after the payload.

    ``hot_values`` follow ``layout.HOT_FIELDS`` (see ``layout.hot_values``). Returns the
    record's total length. ``ShmWriter.publish`` inlines this (a test checks they agree).
    """
    _HEAD_PACK(staging, 0, 0, payload_len, *hot_values)
    end = RECORD_HEADER_SIZE + payload_len
    covered = staging if len(staging) == end else bytes(staging[:end])
    staging[end : end + RECORD_CRC_SIZE] = _CRC_PACK(linear_crc(covered))
    return end + RECORD_CRC_SIZE


def record_crc(record: Buffer) -> int:
    """The check word a record should carry: the linear CRC-32 of all of it but the word."""
    return linear_crc(memoryview(record)[:-RECORD_CRC_SIZE])


def records_intact(data: Buffer | npt.NDArray[np.uint64]) -> bool:
    """True when ``data`` is one or more whole records back to back, each followed by any
    number of zero bytes, and every check word matches (one CRC call for all of them)."""
    return bool(crc32(data, CRC_SEED) == CRC_CHECK_VALUE)


def write_record(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copies: tuple[int, int],
    record: Buffer,
    seq: int,
) -> None:
    """Publish ``record`` (whose hot ``seq`` is ``seq``, one more than the slot's sequence word).

    Single writer per slot; never blocks.
    """
    base = copies[seq & 1]  # the copy readers are not being sent to
    buf[base : base + len(record)] = record
    words[seq_index] = seq  # one 8-byte store: the copy is complete and advertised


def write_steps(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copies: tuple[int, int],
    record: bytes,
    seq: int,
    store_seq: SeqStore | None = None,
) -> Generator[WriteStep, None, None]:
    """Step-by-step mirror of :func:`write_record`; yields each step after doing it.

    ``store_seq`` replaces the single-store sequence write (tests use it to model a broken,
    multi-step store such as ``struct.pack_into``); its own yields are interleaving points.
    """
    base = copies[seq & 1]
    buf[base : base + len(record)] = record
    yield WriteStep.COPY
    if store_seq is None:
        words[seq_index] = seq
    else:
        for _ in store_seq(words, seq_index, seq):
            yield WriteStep.PUBLISH
    yield WriteStep.PUBLISH


def record_is_intact(record: bytes, seq: int) -> bool:
    """True when the record's check word matches and its sequence is ``seq``."""
    if crc32(record, CRC_SEED) != CRC_CHECK_VALUE:
        return False
    return bool(_U64(record, _SEQ_OFFSET)[0] == seq)


def _copy_out(buf: memoryview, base: int, capacity: int) -> bytes:
    """Copy one record: header first, then exactly its payload and check word."""
    header = bytes(buf[base : base + RECORD_HEADER_SIZE])
    length = _U32(header, COPY_PAYLOAD_LEN_OFFSET)[0]
    if length > capacity:
        return header  # a torn length; the sequence or check-word test rejects this copy
    start = base + RECORD_HEADER_SIZE
    return header + bytes(buf[start : start + length + RECORD_CRC_SIZE])


def read_record(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copies: tuple[int, int],
    capacity: int,
    attempts: int = DEFAULT_READ_ATTEMPTS,
    verify: bool = True,
) -> ReadResult:
    """Copy out the latest complete record of one slot. Safe from any process; never blocks.

    Retries at most ``attempts`` times while the writer moves; ``verify=False`` skips the
    check-word and sequence tests (only the control run of the torn-read detector uses it).
    """
    retries = crc_rejects = 0
    for _ in range(attempts):
        s1 = words[seq_index]
        if s1 == 0:
            return ReadResult(ReadOutcome.NEVER_PUBLISHED, s1, b"", retries, crc_rejects)
        record = _copy_out(buf, copies[s1 & 1], capacity)
        if words[seq_index] != s1:
            retries += 1
            continue
        if verify and not record_is_intact(record, s1):
            crc_rejects += 1
            continue
        return ReadResult(ReadOutcome.OK, s1, record, retries, crc_rejects)
    return ReadResult(ReadOutcome.TORN, 0, b"", retries, crc_rejects)


class BatchRead(NamedTuple):
    """Outcome of :func:`read_records`: one entry per slot asked, in order.

    ``records[i]`` is the whole record (header, payload, check word) where ``outcomes[i]`` is
    OK, and ``seqs[i]`` its sequence; ``retries`` and ``crc_rejects`` are totals.
    """

    outcomes: list[ReadOutcome]
    seqs: list[int]
    records: list[bytes | bytearray]
    retries: int
    crc_rejects: int


def read_records(
    buf: Source,
    words: Words,
    seq_indexes: Sequence[int],
    copies: Sequence[tuple[int, int]],
    capacity: int,
    attempts: int = DEFAULT_READ_ATTEMPTS,
    verify: bool = True,
    batch_check: bool = True,
) -> BatchRead:
    """:func:`read_record` for several slots at once. Safe from any process; never blocks.

    Per slot the steps and checks are :func:`read_record`'s (load the sequence word, copy the
    copy it advertises, load the word again, check the record's sequence and check word); the
    check words of every copied record are tested with one call (:func:`records_intact`),
    then one by one only if that fails. Slots that moved or failed are retried together, at
    most ``attempts`` times. ``buf`` is an ``mmap``, ``bytes`` or ``bytearray`` (or a view of
    the whole of one), whose slices are copies. ``batch_check=False`` checks each record alone;
    ``verify=False``
    skips the sequence and check-word tests (control runs only).
    """
    count = len(seq_indexes)
    outcomes = [ReadOutcome.TORN] * count
    seqs = [0] * count
    records: list[bytes | bytearray] = [b""] * count
    retries = crc_rejects = 0
    # Slices must be copies: an mmap, bytes or bytearray slices to one (a memoryview to a view).
    source = buf.obj if isinstance(buf, memoryview) else buf
    if not isinstance(source, (mmap.mmap, bytes, bytearray)) or len(source) != len(buf):
        raise TypeError("read_records reads an mmap, bytes or bytearray, or a whole view of one")
    pending: Sequence[int] = range(count)
    for _ in range(attempts):
        taken: list[tuple[int, int, bytes | bytearray]] = []
        for i in pending:
            s1 = words[seq_indexes[i]]
            if s1 == 0:
                outcomes[i] = ReadOutcome.NEVER_PUBLISHED
                continue
            base = copies[i][s1 & 1]
            length = _U32(source, base + COPY_PAYLOAD_LEN_OFFSET)[0]
            # A length beyond the capacity is torn: an empty record, rejected below.
            record = source[base : base + RECORD_OVERHEAD + length] if length <= capacity else b""
            taken.append((i, s1, record))
        whole = not verify or (
            batch_check and len(taken) > 1 and records_intact(b"".join([r for _, _, r in taken]))
        )
        pending = []
        for i, s1, record in taken:
            if words[seq_indexes[i]] != s1:
                retries += 1
                pending.append(i)
            elif not verify or (
                record
                and (whole or crc32(record, CRC_SEED) == CRC_CHECK_VALUE)
                and _U64(record, _SEQ_OFFSET)[0] == s1
            ):
                outcomes[i], seqs[i], records[i] = ReadOutcome.OK, s1, record
            else:
                crc_rejects += 1
                pending.append(i)
        if not pending:
            break
    return BatchRead(outcomes, seqs, records, retries, crc_rejects)


class GatheredRecords(NamedTuple):
    """Records that :func:`gather_records` accepted, copied as rows of 8-byte words.

    ``rows[i]`` holds the record of rank ``ranks[i]`` (sequence ``seqs[i]``, payload length
    ``lengths[i]``) from its first byte, then zeros to the row's end.
    """

    ranks: npt.NDArray[np.intp]
    seqs: npt.NDArray[np.uint64]
    lengths: npt.NDArray[np.uint64]
    rows: npt.NDArray[np.uint64]


class GatherRead(NamedTuple):
    """Outcome of :func:`gather_records`: accepted records in batches (one per attempt that
    accepted any), and the ranks never published or left torn."""

    batches: list[GatheredRecords]
    never: npt.NDArray[np.intp]
    torn: npt.NDArray[np.intp]
    retries: int
    crc_rejects: int


def gather_records(
    copies: npt.NDArray[np.uint64],
    seq_words: npt.NDArray[np.uint64],
    ranks: npt.NDArray[np.intp],
    capacity: int,
    attempts: int = DEFAULT_READ_ATTEMPTS,
    verify: bool = True,
    batch_check: bool = True,
) -> GatherRead:
    """Read the records of many ranks with a few numpy operations. Never blocks.

    ``copies`` views every record copy as words, shape ``(dp_size, 2, copy_size // 8)``;
    ``seq_words`` views every sequence word (numpy loads each aligned 8-byte element whole).
    The protocol is :func:`read_record`'s, done for all ``ranks`` at once: load their
    sequence words, copy each advertised copy as a row as wide as the longest record, load the
    words again, then check every row's sequence, and every check word with one CRC call over
    all the rows (rows hold zeros after their record, see ``loadsnap.layout``; if that call
    fails, each record is checked alone). Ranks that moved or failed are retried together.
    ``batch_check`` and ``verify`` are as for :func:`read_records`.
    """
    batches: list[GatheredRecords] = []
    never: list[npt.NDArray[np.intp]] = []
    retries = crc_rejects = 0
    pending = ranks
    for _ in range(attempts):
        if pending.size == 0:
            break
        s1 = seq_words[pending]
        published = s1 != 0
        if not published.all():
            never.append(pending[~published])
            pending, s1 = pending[published], s1[published]
            if pending.size == 0:
                break
        copy = (s1 & 1).astype(np.intp)
        lengths = copies[pending, copy, COPY_PAYLOAD_LEN_OFFSET // 8] >> _LEN_SHIFT
        lengths &= 0xFFFFFFFF
        fits = lengths <= capacity
        longest = int(lengths[fits].max(initial=0))
        rows = copies[pending, copy, : (RECORD_OVERHEAD + longest + 7) // 8]
        s2 = seq_words[pending]
        still = s2 == s1
        good = still & fits
        if verify:
            good &= rows[:, _SEQ_WORD] == s1
        retries += int(np.count_nonzero(~still))
        every = bool(good.all())
        candidates = rows if every else rows[good]
        if verify and candidates.size and not (batch_check and records_intact(candidates)):
            view = candidates.data.cast("B")
            width = candidates.shape[1] * 8
            for row, i in enumerate(np.flatnonzero(good).tolist()):
                start = row * width
                end = start + RECORD_OVERHEAD + int(lengths[i])
                if crc32(view[start:end], CRC_SEED) != CRC_CHECK_VALUE:
                    good[i] = False
            view.release()
            every = False
        crc_rejects += int(np.count_nonzero(still & ~good))
        if every:  # no second copy of the rows (a large one costs page faults)
            batches.append(GatheredRecords(pending, s1, lengths, rows))
            pending = pending[:0]
            break
        if good.any():
            batches.append(GatheredRecords(pending[good], s1[good], lengths[good], rows[good]))
        pending = pending[~good]
    never_read = np.concatenate(never) if never else np.zeros(0, dtype=np.intp)
    return GatherRead(batches, never_read, pending, retries, crc_rejects)


def read_steps(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copies: tuple[int, int],
    capacity: int,
    verify: bool = True,
    load_seq: Callable[[memoryview, int], int] | None = None,
) -> Generator[str, None, ReadResult]:
    """One attempt of :func:`read_record`, yielding between its loads (for interleaving tests).

    Returns TORN where :func:`read_record` would retry.
    """
    load = load_seq or (lambda w, i: int(w[i]))
    s1 = load(words, seq_index)
    yield "load_seq1"
    if s1 == 0:
        return ReadResult(ReadOutcome.NEVER_PUBLISHED, s1, b"", 0, 0)
    base = copies[s1 & 1]
    header = bytes(buf[base : base + RECORD_HEADER_SIZE])
    yield "copy_header"
    length = _U32(header, COPY_PAYLOAD_LEN_OFFSET)[0]
    record = header
    if length <= capacity:
        start = base + RECORD_HEADER_SIZE
        record += bytes(buf[start : start + length + RECORD_CRC_SIZE])
    yield "copy_payload"
    if load(words, seq_index) != s1:
        return ReadResult(ReadOutcome.TORN, s1, b"", 1, 0)
    if verify and not record_is_intact(record, s1):
        return ReadResult(ReadOutcome.TORN, s1, b"", 0, 1)
    return ReadResult(ReadOutcome.OK, s1, record, 0, 0)
