"""Two-copy ("latch") seqlock over one slot: the protocol core. No I/O, no clocks.

Theory of operation
-------------------
Each slot holds a latch word ``s`` and two record copies. Publishing record ``k`` is four
named steps (:class:`WriteStep`)::

    SEQ_ODD   s = 2k - 1     readers now take copy 1, which still holds record k - 1
    COPY0     copy 0 <- record k
    SEQ_EVEN  s = 2k         readers now take copy 0, which holds record k
    COPY1     copy 1 <- record k

A reader loads ``s``, copies out copy ``s & 1``, loads ``s`` again and accepts only if it did
not move, the copy's record sequence equals ``s >> 1`` and its CRC matches. At every instant
one copy is complete and advertised, so a writer that dies at any step leaves the latest
complete record readable (a one-copy seqlock would be left odd forever).
``s >> 1 == 0`` means never published.

The latch word is written with one aligned 8-byte store through ``memoryview.cast("Q")``:
``struct.pack_into`` zero-fills before it copies, so a reader could see a transient 0 (or a
byte-mixed value) that looks like a stable even sequence. On x86-64 (TSO) stores become
visible in program order; on arm64 they may not, which is why each copy carries a CRC over
(sequence, length, payload): a torn copy is rejected on any CPU, at worst costing a retry.

:func:`write_steps` and :func:`read_steps` are step-by-step mirrors of :func:`write_record`
and :func:`read_record` for the deterministic interleaving tests; a test checks that the
mirrors and the straight-line functions leave identical bytes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable, Generator, Sequence
from typing import Final, NamedTuple

from loadsnap.layout import (
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_LEN_OFFSET,
    CRC_STRUCT,
    HOT_SEQ_INDEX,
    LEN_AND_HOT_STRUCT,
    RECORD_HEADER_SIZE,
)

__all__ = [
    "DEFAULT_READ_ATTEMPTS",
    "ReadOutcome",
    "ReadResult",
    "WriteStep",
    "build_record",
    "read_record",
    "read_steps",
    "record_is_intact",
    "repair_slot",
    "write_record",
    "write_steps",
]

DEFAULT_READ_ATTEMPTS: Final[int] = 64
_SEQ_OFFSET: Final[int] = COPY_HOT_OFFSET + 8 * HOT_SEQ_INDEX
_U32: Final = CRC_STRUCT.unpack_from
_U64: Final = struct.Struct("<Q").unpack_from
_LEN_AND_HOT_PACK: Final = LEN_AND_HOT_STRUCT.pack_into
_CRC_PACK: Final = CRC_STRUCT.pack_into

Buffer = bytes | bytearray | memoryview
SeqStore = Callable[[memoryview, int, int], Generator[None, None, None]]


class WriteStep(enum.Enum):
    """The named steps of one publish, in order."""

    SEQ_ODD = "seq_odd"
    COPY0 = "copy0"
    SEQ_EVEN = "seq_even"
    COPY1 = "copy1"


class ReadOutcome(enum.Enum):
    """What reading a slot produced."""

    OK = "ok"
    NEVER_PUBLISHED = "never_published"
    TORN = "torn"  # no consistent copy within the attempt budget


class ReadResult(NamedTuple):
    """Outcome of :func:`read_record`; ``record`` is the whole copy (header + payload) when OK."""

    outcome: ReadOutcome
    latch: int
    record: bytes
    retries: int
    crc_rejects: int


def build_record(staging: bytearray, hot_values: Sequence[int | float], payload_len: int) -> int:
    """Fill the record header in ``staging`` (payload already at RECORD_HEADER_SIZE).

    ``hot_values`` follow ``layout.HOT_FIELDS``. Returns the record's total length.
    """
    _LEN_AND_HOT_PACK(staging, COPY_PAYLOAD_LEN_OFFSET, payload_len, *hot_values)
    view = memoryview(staging)
    _CRC_PACK(staging, 0, zlib.crc32(view[COPY_PAYLOAD_LEN_OFFSET:]))
    view.release()
    return RECORD_HEADER_SIZE + payload_len


def write_record(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copy0: int,
    copy1: int,
    record: Buffer,
    latch: int,
) -> int:
    """Publish ``record`` over a slot whose latch word is ``latch`` (even). Returns the new latch.

    Single writer per slot; never blocks.
    """
    n = len(record)
    words[seq_index] = latch + 1  # one 8-byte store: readers switch to copy 1
    buf[copy0 : copy0 + n] = record
    words[seq_index] = latch + 2  # one 8-byte store: copy 0 is complete and advertised
    buf[copy1 : copy1 + n] = record
    return latch + 2


def write_steps(
    buf: memoryview,
    words: memoryview,
    seq_index: int,
    copy0: int,
    copy1: int,
    record: bytes,
    latch: int,
    store_seq: SeqStore | None = None,
) -> Generator[WriteStep, None, int]:
    """Step-by-step mirror of :func:`write_record`; yields each step after doing it.

    ``store_seq`` replaces the single-store latch write (tests use it to model a broken,
    multi-step store such as ``struct.pack_into``); its own yields are interleaving points.
    """
    n = len(record)
    for value, seq_step, target, copy_step in (
        (latch + 1, WriteStep.SEQ_ODD, copy0, WriteStep.COPY0),
        (latch + 2, WriteStep.SEQ_EVEN, copy1, WriteStep.COPY1),
    ):
        if store_seq is None:
            words[seq_index] = value
        else:
            for _ in store_seq(words, seq_index, value):
                yield seq_step
        yield seq_step
        buf[target : target + n] = record
        yield copy_step
    return latch + 2


def record_is_intact(record: bytes, latch: int) -> bool:
    """True when the copy's CRC matches and its sequence is the one ``latch`` advertises."""
    if zlib.crc32(memoryview(record)[COPY_PAYLOAD_LEN_OFFSET:]) != _U32(record, 0)[0]:
        return False
    return bool(_U64(record, _SEQ_OFFSET)[0] == latch >> 1)


def _copy_out(buf: memoryview, base: int, capacity: int) -> bytes:
    """Copy one record copy: header first, then exactly its payload."""
    header = bytes(buf[base : base + RECORD_HEADER_SIZE])
    length = _U32(header, COPY_PAYLOAD_LEN_OFFSET)[0]
    if length > capacity:
        return header  # a torn length; the latch or CRC check rejects this copy
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
    (only the control run of the torn-read detector uses it).
    """
    retries = crc_rejects = 0
    for _ in range(attempts):
        s1 = words[seq_index]
        if s1 >> 1 == 0:
            return ReadResult(ReadOutcome.NEVER_PUBLISHED, s1, b"", retries, crc_rejects)
        record = _copy_out(buf, copies[s1 & 1], capacity)  # odd: copy 0 is being written
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
    if s1 >> 1 == 0:
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


def repair_slot(
    buf: memoryview, words: memoryview, seq_index: int, copy0: int, copy1: int, copy_size: int
) -> int:
    """Make both copies hold the advertised complete record and the latch even.

    Called by a writer attaching to a slot whose previous writer may have died mid-publish,
    before its first publish. Returns the (even) latch to continue from.
    """
    latch = int(words[seq_index])
    if latch & 1:
        # Died between SEQ_ODD and SEQ_EVEN: copy 1 holds record latch >> 1, copy 0 is partial.
        buf[copy0 : copy0 + copy_size] = buf[copy1 : copy1 + copy_size]
        words[seq_index] = latch - 1  # copy 0 now holds that same record: advertise it
        return latch - 1
    if latch:
        # Possibly died during COPY1: copy 0 is the complete one.
        buf[copy1 : copy1 + copy_size] = buf[copy0 : copy0 + copy_size]
    return latch
