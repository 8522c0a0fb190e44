"""The read-scaling floors: the least any reader of ours must do to read every rank.

Used by ``bench_read_scaling`` (its module docstring says what each floor times and why it
is a floor). Each call does one part of the work alone, over a read-only mapping of the
segment, with no checks, statuses or liveness; untimed set-up (:meth:`Floors.prepare`) copies
out what a part takes as given.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
from zlib_ng.zlib_ng import crc32

from loadsnap import HotTable, LoadSnapshot
from loadsnap._readcache import SMALL_MAX_RANKS
from loadsnap.layout import (
    CONTROL_DTYPE,
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_LEN_OFFSET,
    COPY_PAYLOAD_OFFSET,
    CRC_SEED,
    HOT_DTYPE,
    HOT_FIELDS,
    HOT_RECORD_SIZE,
    RECORD_CRC_SIZE,
    RECORD_HEADER_SIZE,
    SegmentGeometry,
)

__all__ = ["Floors"]

_LENGTH: Final = struct.Struct("<I")


class Floors:
    """The floors' calls (:meth:`decode`, :meth:`gather`, :meth:`table`) over a read-only
    mapping of one instance's segment. Set-up (:meth:`prepare`, after every publish) is
    untimed. Not thread-safe; close it before the writers unlink the segment."""

    def __init__(self, path: str, dp_size: int, payload_capacity: int) -> None:
        self._geometry = geometry = SegmentGeometry(dp_size, payload_capacity)
        with open(path, "rb") as file:
            self._mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._seq_words = np.ndarray(
            (dp_size,), CONTROL_DTYPE, buffer=self._mm, offset=geometry.control_offset(0)
        )["seq"]
        self._first_copy = 2 * np.arange(dp_size, dtype=np.uint64)
        self._rows: npt.NDArray[np.void] | None = None
        self._words = memoryview(self._mm).cast("Q")
        self._seq_index = [geometry.seq_word_index(rank) for rank in range(dp_size)]
        self._copies = [
            (geometry.copy_offset(r, 0), geometry.copy_offset(r, 1)) for r in range(dp_size)
        ]
        self._hot = bytes(dp_size * HOT_RECORD_SIZE)
        self._payloads: list[bytes] = []
        self._kept: list[LoadSnapshot | None] = [None] * dp_size
        self._decode = msgspec.msgpack.Decoder(LoadSnapshot).decode

    def prepare(self) -> None:
        """Copy out every rank's payload, and size the gather to the longest record."""
        geometry, mm = self._geometry, self._mm
        payloads, hot = [], []
        for rank, seq in enumerate(self._seq_words.tolist()):
            at = geometry.copy_offset(rank, seq & 1)
            (length,) = _LENGTH.unpack_from(mm, at + COPY_PAYLOAD_LEN_OFFSET)
            payloads.append(mm[at + COPY_PAYLOAD_OFFSET : at + COPY_PAYLOAD_OFFSET + length])
            hot.append(mm[at + COPY_HOT_OFFSET : at + COPY_HOT_OFFSET + HOT_RECORD_SIZE])
        self._payloads, self._hot = payloads, b"".join(hot)
        width = RECORD_HEADER_SIZE + max(map(len, payloads)) + RECORD_CRC_SIZE
        self._rows = np.ndarray(
            (2 * geometry.dp_size,),
            np.dtype(f"V{width}"),
            buffer=mm,
            offset=geometry.records_offset,
            strides=(geometry.copy_size,),
        )

    def decoded(self) -> list[LoadSnapshot | None]:
        """The snapshots the last :meth:`decode` kept, by rank."""
        return self._kept[:]

    def decode(self) -> None:
        """Decode every payload, each replacing the snapshot kept for its rank."""
        kept, decode = self._kept, self._decode
        for rank, payload in enumerate(self._payloads):
            kept[rank] = decode(payload)

    def gather(self) -> int:
        """Copy every advertised record and CRC them all at once (``CRC_CHECK_VALUE`` when
        every record is whole)."""
        if len(self._seq_index) > SMALL_MAX_RANKS:
            assert self._rows is not None
            return crc32(self._rows[self._first_copy | (self._seq_words & 1)], CRC_SEED)
        mm, words, records = self._mm, self._words, []
        for index, copies in zip(self._seq_index, self._copies, strict=True):
            at = copies[words[index] & 1]
            (length,) = _LENGTH.unpack_from(mm, at + COPY_PAYLOAD_LEN_OFFSET)
            records.append(mm[at : at + RECORD_HEADER_SIZE + length + RECORD_CRC_SIZE])
        return crc32(b"".join(records), CRC_SEED)

    def table(self) -> HotTable:
        """A HotTable over the hot records copied out (every rank valid and fresh)."""
        rows = np.frombuffer(self._hot, HOT_DTYPE)
        columns = {name: rows[name] for name, _ in HOT_FIELDS}
        count = len(rows)
        valid, status = np.ones(count, np.bool_), np.zeros(count, np.uint8)
        age_s = np.multiply(rows["publish_mono_ns"], 0.0)
        return HotTable(0, age_s=age_s, status=status, valid=valid, **columns)

    def close(self) -> None:
        """Drop the views, then the mapping."""
        self._words.release()
        del self._seq_words, self._rows
        self._mm.close()
