"""The shared-memory segment's byte layout: the one module that owns every offset.

All integers are little-endian. Every ``*_OFFSET`` is derived from the previous offset plus the
previous size; ``tests/unit/test_layout.py`` checks this diagram against the structs.

Segment::

    +------------------------------+  0
    | SegmentHeader (128 B)        |
    +------------------------------+  HEADER_SIZE
    | control table: one           |
    | SlotControl (64 B) per rank  |
    +------------------------------+  records_offset = HEADER_SIZE + dp_size * SLOT_CONTROL_SIZE
    | rank 0: record copy 0, 1     |
    +------------------------------+  records_offset + 2 * copy_size
    | rank 1: record copy 0, 1     |
    | ...                          |
    +------------------------------+  HEADER_SIZE + dp_size * slot_size

``slot_size`` is one rank's share: its SlotControl plus its two record copies
(``SLOT_CONTROL_SIZE + 2 * copy_size``, a multiple of 64). The control words of every rank are
contiguous, so a reader takes all of them with one copy and learns which ranks moved by
comparing it with the previous one; only those ranks' records are then read.

SegmentHeader (written once by the creator; ``ready`` is stored last)::

     0 +--------+--------+--------+--------+--------+--------+--------+--------+
       | magic  "LOADSNAP"                                    u64           |
     8 +-----------------+-----------------+-----------------------------------+
       | layout_major u16| layout_minor u16| header_size u32                   |
    16 +-----------------------------------+-----------------------------------+
       | dp_size u32                       | slot_size u32                     |
    24 +-----------------------------------+-----------------------------------+
       | payload_capacity u32              | creator_pid u32                   |
    32 +-----------------------------------+-----------------------------------+
       | creator_uid u32                   | reserved u32                      |
    40 +-----------------------------------------------------------------------+
       | created_wall_ns u64                                                   |
    48 +-----------------------------------------------------------------------+
       | segment_id u64 (random; tells a recreated segment from the old one)   |
    56 +-----------------------------------------------------------------------+
       | ready u64 (READY_VALUE once initialised; written last)                |
    64 +-----------------------------------------------------------------------+
       | reserved to 128 (byte 64: the writers lock byte, see below)           |
   128 +-----------------------------------------------------------------------+

SlotControl (one per rank, at ``HEADER_SIZE + rank * SLOT_CONTROL_SIZE``; 64-byte aligned, so
no two writers share a cache line)::

     0 seq u64            the sequence word: the latest complete record, which lives in
                          copy (seq & 1); 0 = never published. Stored with one aligned
                          8-byte store, never with struct.pack_into.
     8 writer_pid u64     0 = no writer attached; else its pid in its own pid namespace
                          (diagnostics only: liveness comes from the slot lock byte)
    16 writer_pidns u64   inode of the writer's pid namespace, or 0 (diagnostics only)
    24 epoch u64          bumped each time a writer attaches to the slot
    32 refused u64        payloads refused for not fitting the slot
    40 reserved to 64

Record copy (at ``records_offset + (2 * rank + copy) * copy_size``; ``copy_size`` =
round_up(RECORD_HEADER_SIZE + payload_capacity + RECORD_CRC_SIZE, 64))::

     0 +-----------------------------------+-----------------------------------+
       | reserved u32 (0)                  | payload_len u32                   |
     8 +-----------------------------------+-----------------------------------+
       | hot record: the 10 dispatch-critical fields (HOT_FIELDS), 8 B each,   |
       | u64 or f64: 80 B                                                      |
    88 +-----------------------------------------------------------------------+
       | payload: msgpack LoadSnapshot, payload_len B                          |
       +-----------------------------------------------------------------------+
       | record_crc u32, at 88 + payload_len: the record's check word          |
       +-----------------------------------------------------------------------+
       | zero to the end of the copy                                           |
       +-----------------------------------------------------------------------+

``record_crc`` is the *linear* CRC-32 (the zlib polynomial with neither the initial nor the
final inversion) of the bytes before it, little-endian. Appending it makes the linear CRC of
the whole record, check word included, zero; zero bytes after a record keep it zero, and so
does any concatenation of such records. A reader therefore checks one record, or every
record it just copied at once, with a single CRC call over the copied bytes (a torn copy is
caught on any CPU). Writers keep the bytes after a record zero (they clear what a longer
earlier record left) so that fixed-width copies check in one call; a non-zero tail only makes
that batch check fail and the reader check each record alone.

Liveness locks (OFD byte-range locks on the segment file, see ``loadsnap._liveness``; the
locked bytes carry data as usual, only the lock matters)::

    WRITERS_LOCK_OFFSET (64)            every attached writer holds a shared lock: "is any
                                        writer attached?" is one F_OFD_GETLK
    control_offset(rank) + SLOT_LOCK_DELTA each rank's attached writer holds an exclusive
                                        lock: a second writer is refused, readers probe for death

The hot record repeats the fields a dispatcher needs (identity and freshness, requests, tokens,
KV capacity, throughput, the dispatch acknowledgement) so a reader can take every rank at once
as numpy arrays without msgpack decoding; the other fields are in the payload only, which keeps
the writer's packing short (each packed field costs the publish path about 20 ns). Its ``seq``
is the record's sequence, which readers check against the sequence word; the check word
covers it with the rest of the record.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from loadsnap.schema import LoadSnapshot

__all__ = [
    "CONTROL_DTYPE",
    "COPY_HOT_OFFSET",
    "COPY_PAYLOAD_LEN_OFFSET",
    "COPY_PAYLOAD_OFFSET",
    "COPY_RESERVED_OFFSET",
    "CRC_CHECK_VALUE",
    "CRC_SEED",
    "CRC_STRUCT",
    "CTRL_EPOCH_OFFSET",
    "CTRL_REFUSED_OFFSET",
    "CTRL_SEQ_OFFSET",
    "CTRL_WRITER_PIDNS_OFFSET",
    "CTRL_WRITER_PID_OFFSET",
    "DEFAULT_PAYLOAD_CAPACITY",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "HEAD_STRUCT",
    "HOT_DTYPE",
    "HOT_FIELDS",
    "HOT_FIELD_COUNT",
    "HOT_RECORD_SIZE",
    "HOT_SEQ_INDEX",
    "HOT_STRUCT",
    "LAYOUT_MAJOR",
    "LAYOUT_MINOR",
    "MAGIC",
    "MAX_DP_SIZE",
    "READY_VALUE",
    "RECORD_CRC_SIZE",
    "RECORD_HEADER_SIZE",
    "SLOT_ALIGN",
    "SLOT_CONTROL_SIZE",
    "SLOT_LOCK_DELTA",
    "WRITERS_LOCK_OFFSET",
    "SegmentGeometry",
    "hot_values",
]

MAGIC: Final[int] = int.from_bytes(b"LOADSNAP", "little")
READY_VALUE: Final[int] = int.from_bytes(b"READY!!!", "little")
LAYOUT_MAJOR: Final[int] = 5
LAYOUT_MINOR: Final[int] = 0
SLOT_ALIGN: Final[int] = 64
DEFAULT_PAYLOAD_CAPACITY: Final[int] = 2048
MAX_PAYLOAD_CAPACITY: Final[int] = 1 << 20
MAX_DP_SIZE: Final[int] = 65536

# --- segment header -----------------------------------------------------------------------
HEADER_STRUCT: Final = struct.Struct("<QHHIIIIIIIQQQ")
MAGIC_OFFSET: Final[int] = 0
LAYOUT_MAJOR_OFFSET: Final[int] = MAGIC_OFFSET + 8
LAYOUT_MINOR_OFFSET: Final[int] = LAYOUT_MAJOR_OFFSET + 2
HEADER_SIZE_OFFSET: Final[int] = LAYOUT_MINOR_OFFSET + 2
DP_SIZE_OFFSET: Final[int] = HEADER_SIZE_OFFSET + 4
SLOT_SIZE_OFFSET: Final[int] = DP_SIZE_OFFSET + 4
PAYLOAD_CAPACITY_OFFSET: Final[int] = SLOT_SIZE_OFFSET + 4
CREATOR_PID_OFFSET: Final[int] = PAYLOAD_CAPACITY_OFFSET + 4
CREATOR_UID_OFFSET: Final[int] = CREATOR_PID_OFFSET + 4
HEADER_RESERVED_OFFSET: Final[int] = CREATOR_UID_OFFSET + 4
CREATED_WALL_NS_OFFSET: Final[int] = HEADER_RESERVED_OFFSET + 4
SEGMENT_ID_OFFSET: Final[int] = CREATED_WALL_NS_OFFSET + 8
READY_OFFSET: Final[int] = SEGMENT_ID_OFFSET + 8
HEADER_FIELDS_END: Final[int] = READY_OFFSET + 8
HEADER_SIZE: Final[int] = 128

# --- slot control -------------------------------------------------------------------------
CTRL_SEQ_OFFSET: Final[int] = 0
CTRL_WRITER_PID_OFFSET: Final[int] = CTRL_SEQ_OFFSET + 8
CTRL_WRITER_PIDNS_OFFSET: Final[int] = CTRL_WRITER_PID_OFFSET + 8
CTRL_EPOCH_OFFSET: Final[int] = CTRL_WRITER_PIDNS_OFFSET + 8
CTRL_REFUSED_OFFSET: Final[int] = CTRL_EPOCH_OFFSET + 8
CTRL_FIELDS_END: Final[int] = CTRL_REFUSED_OFFSET + 8
SLOT_CONTROL_SIZE: Final[int] = 64

# --- liveness lock bytes (locked, never read for data) ------------------------------------
WRITERS_LOCK_OFFSET: Final[int] = HEADER_FIELDS_END
SLOT_LOCK_DELTA: Final[int] = CTRL_WRITER_PID_OFFSET

# --- record copy --------------------------------------------------------------------------
COPY_RESERVED_OFFSET: Final[int] = 0
COPY_PAYLOAD_LEN_OFFSET: Final[int] = COPY_RESERVED_OFFSET + 4
COPY_HOT_OFFSET: Final[int] = COPY_PAYLOAD_LEN_OFFSET + 4
# (field name, struct code), in record order: the writer's stamps first, then the scheduler's
# numbers. Every name is a LoadSnapshot field of that type (tests/unit/test_layout.py checks).
HOT_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("seq", "Q"),
    ("epoch", "Q"),
    ("publish_mono_ns", "Q"),
    ("num_running_reqs", "Q"),
    ("num_waiting_reqs", "Q"),
    ("num_used_tokens", "Q"),
    ("num_total_tokens", "Q"),
    ("max_total_num_tokens", "Q"),
    ("last_accepted_dispatch_seq", "Q"),
    ("gen_throughput", "d"),
)
HOT_FIELD_COUNT: Final[int] = len(HOT_FIELDS)
HOT_STRUCT: Final = struct.Struct("<" + "".join(code for _, code in HOT_FIELDS))
HOT_DTYPE: Final = np.dtype([(name, "<u8" if code == "Q" else "<f8") for name, code in HOT_FIELDS])
HOT_RECORD_SIZE: Final[int] = HOT_STRUCT.size
HOT_SEQ_INDEX: Final[int] = 0
COPY_PAYLOAD_OFFSET: Final[int] = COPY_HOT_OFFSET + HOT_RECORD_SIZE
RECORD_HEADER_SIZE: Final[int] = COPY_PAYLOAD_OFFSET
# Packs (reserved, payload_len, *hot) at offset 0 in one call.
HEAD_STRUCT: Final = struct.Struct("<II" + HOT_STRUCT.format[1:])
# The check word after the payload (see the docstring: a linear CRC-32, little-endian).
CRC_STRUCT: Final = struct.Struct("<I")
RECORD_CRC_SIZE: Final[int] = CRC_STRUCT.size
# zlib's crc32(data, value) starts its register at ~value and returns ~register: with this
# value the register starts at 0, and a result equal to it means a final register of 0.
CRC_SEED: Final[int] = 0xFFFFFFFF
CRC_CHECK_VALUE: Final[int] = CRC_SEED

# The control table as numpy sees it (one row per rank, SLOT_CONTROL_SIZE bytes apart).
CONTROL_DTYPE: Final = np.dtype(
    {
        "names": ["seq", "writer_pid", "writer_pidns", "epoch", "refused"],
        "formats": ["<u8"] * 5,
        "offsets": [
            CTRL_SEQ_OFFSET,
            CTRL_WRITER_PID_OFFSET,
            CTRL_WRITER_PIDNS_OFFSET,
            CTRL_EPOCH_OFFSET,
            CTRL_REFUSED_OFFSET,
        ],
        "itemsize": SLOT_CONTROL_SIZE,
    }
)


def hot_values(snapshot: LoadSnapshot) -> tuple[int | float, ...]:
    """``snapshot``'s hot record values, in ``HOT_FIELDS`` order."""
    return tuple(getattr(snapshot, name) for name, _ in HOT_FIELDS)


def round_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return (value + alignment - 1) // alignment * alignment


class SegmentGeometry:
    """Sizes and offsets of one segment, derived from ``dp_size`` and ``payload_capacity``.

    Immutable; safe to share.
    """

    __slots__ = (
        "copy_size",
        "dp_size",
        "payload_capacity",
        "records_offset",
        "slot_size",
        "total_size",
    )

    def __init__(self, dp_size: int, payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY) -> None:
        from loadsnap.errors import UsageError

        if not 1 <= dp_size <= MAX_DP_SIZE:
            raise UsageError(f"dp_size out of range: dp_size={dp_size} valid=1..{MAX_DP_SIZE}")
        if not 64 <= payload_capacity <= MAX_PAYLOAD_CAPACITY:
            raise UsageError(
                f"payload_capacity out of range: payload_capacity={payload_capacity} "
                f"valid=64..{MAX_PAYLOAD_CAPACITY}"
            )
        self.dp_size = dp_size
        self.payload_capacity = payload_capacity
        self.copy_size = round_up(
            RECORD_HEADER_SIZE + payload_capacity + RECORD_CRC_SIZE, SLOT_ALIGN
        )
        self.slot_size = SLOT_CONTROL_SIZE + 2 * self.copy_size
        self.records_offset = HEADER_SIZE + dp_size * SLOT_CONTROL_SIZE
        self.total_size = HEADER_SIZE + dp_size * self.slot_size

    def control_offset(self, rank: int) -> int:
        """Byte offset of ``rank``'s SlotControl in the control table."""
        return HEADER_SIZE + rank * SLOT_CONTROL_SIZE

    def copy_offset(self, rank: int, copy: int) -> int:
        """Byte offset of record copy ``copy`` (0 or 1) of ``rank``."""
        return self.records_offset + (2 * rank + copy) * self.copy_size

    def slot_lock_offset(self, rank: int) -> int:
        """Byte offset of ``rank``'s liveness lock byte (its writer holds it exclusively)."""
        return HEADER_SIZE + rank * SLOT_CONTROL_SIZE + SLOT_LOCK_DELTA

    def seq_word_index(self, rank: int) -> int:
        """Index of ``rank``'s sequence word in a ``memoryview.cast("Q")`` of the segment."""
        return (HEADER_SIZE + rank * SLOT_CONTROL_SIZE + CTRL_SEQ_OFFSET) // 8

    def __repr__(self) -> str:
        return (
            f"SegmentGeometry(dp_size={self.dp_size}, payload_capacity={self.payload_capacity}, "
            f"slot_size={self.slot_size}, total_size={self.total_size})"
        )
