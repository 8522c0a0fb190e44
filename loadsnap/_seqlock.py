"""Double-buffered seqlock over one slot: the protocol core. No I/O, no clocks.

Theory of operation
-------------------
Each slot holds a sequence word ``s`` and two record copies. Record ``k`` lives in copy
``k & 1``, so publishing it is two named steps (:class:`WriteStep`)::

    COPY      copy (k & 1) <- record k   readers still take copy (k - 1) & 1: record k - 1
    PUBLISH   s = k                      readers now take copy k & 1: record k

A writer only ever writes the copy that ``s`` does not advertise. A reader loads ``s``, copies
out copy ``s & 1``, loads ``s`` again and accepts only if it did not move, the copy's record
sequence equals ``s`` and its CRC matches. The writer touches copy ``s & 1`` again only after
``s`` has moved past it, and ``s`` only grows, so an unchanged ``s`` means the copy was not
written while it was read. At every instant the advertised copy is complete, so a writer that
dies at any step leaves the latest complete record readable, and a restarted writer simply
goes on from ``s``. One copy per publish: the same cost as a plain seqlock. ``s == 0`` means
never published.

The sequence word is written with one aligned 8-byte store through ``memoryview.cast("Q")``:
``struct.pack_into`` zero-fills before it copies, so a reader could see a transient 0 (or a
byte-mixed value) that looks like another published sequence. On x86-64 (TSO) stores become
visible in program order; on arm64 they may not, which is why each copy carries a CRC over
(sequence, length, payload): a torn copy is rejected on any CPU, at worst costing a retry.

:func:`write_steps` and :func:`read_steps` are step-by-step mirrors of :func:`write_record`
and :func:`read_record` for the deterministic interleaving tests; a test checks that the
mirrors and the straight-line functions leave identical bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Generator, Sequence
from typing import Final, NamedTuple

from zlib_ng.zlib_ng import crc32

from loadsnap.layout import (
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_LEN_OFFSET,
    CRC_STRUCT,
    HEAD_STRUCT,
    HOT_SEQ_INDEX,
    RECORD_HEADER_SIZE,
)

__all__ = [
    "DEFAULT_READ_ATTEMPTS",
    "ReadOutcome",
    "ReadResult",
    "WriteStep",
    "build_record",
    "crc32",
    "read_record",
    "read_steps",
    "record_crc",
    "record_is_intact",
    "write_record",
    "write_steps",
]

DEFAULT_READ_ATTEMPTS: Final[int] = 64
_SEQ_OFFSET: Final[int] = COPY_HOT_OFFSET + 8 * HOT_SEQ_INDEX
_U32: Final = CRC_STRUCT.unpack_from
_U64: Final = struct.Struct("<Q").unpack_from
_HEAD_PACK: Final = HEAD_STRUCT.pack_into
_CRC_PACK: Final = CRC_STRUCT.pack_into
# CRC32 of the record's crc field read as zero: readers continue from it over bytes 4..end.
_ZERO_FIELD_CRC: Final[int] = crc32(bytes(CRC_STRUCT.size))

Buffer = bytes | bytearray | memoryview
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
    """Outcome of :func:`read_record`; ``record`` is the whole copy (header + payload) when OK.

    ``seq`` is the sequence word the outcome was decided on.
    """

    outcome: ReadOutcome
    seq: int
    record: bytes
    retries: int
    crc_rejects: int


def build_record(staging: bytearray, hot_values: Sequence[int | float], payload_len: int) -> int:
    """Fill the record header in ``staging`` (payload already at RECORD_HEADER_SIZE).

    ``hot_values`` follow ``layout.HOT_FIELDS`` (see ``layout.hot_values``). Returns the
    record's total length. ``ShmWriter.publish`` inlines this (a test checks they agree).
    """
    _HEAD_PACK(staging, 0, 0, payload_len, *hot_values)  # crc field zero while summed
    _CRC_PACK(staging, 0, crc32(staging))
    return RECORD_HEADER_SIZE + payload_len


def record_crc(record: Buffer) -> int:
    """The CRC a record should carry: over the whole record with its crc field read as 0."""
    return crc32(memoryview(record)[COPY_PAYLOAD_LEN_OFFSET:], _ZERO_FIELD_CRC)


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
    """True when the copy's CRC matches and its sequence is ``seq``."""
    if record_crc(record) != _U32(record, 0)[0]:
        return False
    return bool(_U64(record, _SEQ_OFFSET)[0] == seq)


def _copy_out(buf: memoryview, base: int, capacity: int) -> bytes:
    """Copy one record copy: header first, then exactly its payload."""
    header = bytes(buf[base : base + RECORD_HEADER_SIZE])
    length = _U32(header, COPY_PAYLOAD_LEN_OFFSET)[0]
    if length > capacity:
        return header  # a torn length; the sequence or CRC check rejects this copy
    return header + bytes(buf[base + RECORD_HEADER_SIZE : base + RECORD_HEADER_SIZE + length])


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

    Retries at most ``attempts`` times while the writer moves; ``verify=False`` skips the CRC
    and sequence checks (only the control run of the torn-read detector uses it).
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
        record += bytes(buf[base + RECORD_HEADER_SIZE : base + RECORD_HEADER_SIZE + length])
    yield "copy_payload"
    if load(words, seq_index) != s1:
        return ReadResult(ReadOutcome.TORN, s1, b"", 1, 0)
    if verify and not record_is_intact(record, s1):
        return ReadResult(ReadOutcome.TORN, s1, b"", 0, 1)
    return ReadResult(ReadOutcome.OK, s1, record, 0, 0)
