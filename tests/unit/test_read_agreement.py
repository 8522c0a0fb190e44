"""Every read path accepts exactly the records ``ShmReader.read`` accepts.

A segment with three ranks is published, then bytes of rank 0's slot are scribbled over, one
field at a time: each control word, each field of the advertised record (its header, every
hot field, the payload, the check word), the zeros after it and the other copy. For every
scribble, fresh readers in each way of reading (rank by rank in plain Python, and with numpy
gathers and a numpy control table) must agree with ``read``: the same status, a snapshot
exactly where the hot table says ``valid``, and the hot numbers of that snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from loadsnap import (
    LoadSnapshot,
    LoraSection,
    ShmReader,
    ShmWriter,
    SlotRead,
    SlotStatus,
)
from loadsnap._seqlock import linear_crc
from loadsnap.layout import (
    COPY_HOT_OFFSET,
    COPY_PAYLOAD_LEN_OFFSET,
    COPY_PAYLOAD_OFFSET,
    COPY_RESERVED_OFFSET,
    CRC_STRUCT,
    CTRL_EPOCH_OFFSET,
    CTRL_REFUSED_OFFSET,
    CTRL_SEQ_OFFSET,
    CTRL_WRITER_PID_OFFSET,
    CTRL_WRITER_PIDNS_OFFSET,
    HOT_FIELDS,
    RECORD_HEADER_SIZE,
    SegmentGeometry,
)

_DP_SIZE = 3
_CAPACITY = 512
_GEOMETRY = SegmentGeometry(_DP_SIZE, _CAPACITY)
# (small_max, gather_min): plain Python throughout; numpy control table and gathers.
_MODES = {"python": (1 << 30, 1 << 30), "numpy": (0, 0)}


def _snapshot(rank: int, k: int) -> LoadSnapshot:
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=10 * k + rank,
        num_waiting_reqs=k,
        num_used_tokens=100 * k,
        num_total_tokens=1000,
        max_total_num_tokens=4096,
        gen_throughput=1.5 * k,
        last_accepted_dispatch_seq=k,
        lora=LoraSection(loaded_adapters=[f"adapter-{k}"]),
    )


@dataclass
class _Segment:
    instance: str
    path: str
    pristine: bytes
    record_len: int  # of rank 0's advertised record, check word included


@pytest.fixture
def segment(instance: str) -> Iterator[_Segment]:
    writers = [ShmWriter(instance, _DP_SIZE, rank, payload_capacity=_CAPACITY) for rank in range(3)]
    try:
        for k in (1, 2, 3):  # rank 0 advertises record 3, in copy 1; copy 0 holds record 2
            for rank, writer in enumerate(writers):
                writer.publish(_snapshot(rank, k))
        path = writers[0].segment_name
        with open(path, "rb") as f:
            pristine = f.read()
        base = _GEOMETRY.copy_offset(0, 1)
        length = int.from_bytes(pristine[base + 4 : base + 8], "little")
        yield _Segment(instance, path, pristine, RECORD_HEADER_SIZE + length + CRC_STRUCT.size)
    finally:
        for writer in writers:
            writer.close()


def _fields(record_len: int) -> dict[str, tuple[int, int]]:
    """Rank 0's byte ranges, by field: (offset in the segment, length)."""
    ctl = _GEOMETRY.control_offset(0)
    base = _GEOMETRY.copy_offset(0, 1)
    fields = {
        "ctl.seq": (ctl + CTRL_SEQ_OFFSET, 8),
        "ctl.writer_pid": (ctl + CTRL_WRITER_PID_OFFSET, 8),
        "ctl.writer_pidns": (ctl + CTRL_WRITER_PIDNS_OFFSET, 8),
        "ctl.epoch": (ctl + CTRL_EPOCH_OFFSET, 8),
        "ctl.refused": (ctl + CTRL_REFUSED_OFFSET, 8),
        "record.reserved": (base + COPY_RESERVED_OFFSET, 4),
        "record.payload_len": (base + COPY_PAYLOAD_LEN_OFFSET, 4),
        "record.payload_first": (base + COPY_PAYLOAD_OFFSET, 1),
        "record.payload_middle": (base + (COPY_PAYLOAD_OFFSET + record_len) // 2, 2),
        "record.payload_last": (base + record_len - CRC_STRUCT.size - 1, 1),
        "record.check_word": (base + record_len - CRC_STRUCT.size, 4),
        "record.zeros_after": (base + record_len + 5, 3),
        "other_copy.hot_seq": (_GEOMETRY.copy_offset(0, 0) + COPY_HOT_OFFSET, 8),
        "other_copy.payload": (_GEOMETRY.copy_offset(0, 0) + COPY_PAYLOAD_OFFSET + 3, 2),
    }
    for index, (name, _) in enumerate(HOT_FIELDS):
        fields[f"record.hot.{name}"] = (base + COPY_HOT_OFFSET + 8 * index, 8)
    return fields


_FIELDS = sorted(_fields(RECORD_HEADER_SIZE + 100))
# Scribbles: flip the low bit of the field's first byte; overwrite it with 0xff bytes.
_HOW = ("flip", "ones")


def _scribble(seg: _Segment, field: str, how: str) -> None:
    offset, length = _fields(seg.record_len)[field]
    old = seg.pristine[offset : offset + length]
    new = bytes([old[0] ^ 1]) + old[1:] if how == "flip" else b"\xff" * length
    fd = os.open(seg.path, os.O_RDWR)
    try:
        os.pwrite(fd, seg.pristine, 0)
        os.pwrite(fd, new, offset)
    finally:
        os.close(fd)


def _reader(seg: _Segment, mode: str) -> ShmReader:
    reader = ShmReader(seg.instance)
    reader._small_max, reader._gather_min = _MODES[mode]
    return reader


def _agree(read: SlotRead, reader: ShmReader, where: str) -> None:
    table = reader.hot_table()
    assert int(table.status[0]) == read.status, (where, read.reason)
    assert bool(table.valid[0]) == (read.snapshot is not None), where
    if read.snapshot is None:
        assert int(table.seq[0]) == 0 and np.isnan(table.age_s[0]), where
        return
    for name, _ in HOT_FIELDS:
        assert getattr(table, name)[0] == getattr(read.snapshot, name), (where, name)
    assert int(table.seq[0]) == read.seq and int(table.epoch[0]) == read.epoch, where


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("how", _HOW)
@pytest.mark.parametrize("field", _FIELDS)
def test_every_path_accepts_what_read_accepts(
    segment: _Segment, field: str, how: str, mode: str
) -> None:
    _scribble(segment, field, how)
    with ShmReader(segment.instance) as plain:
        truth = plain.read(0)
    # Each path first, on a fresh reader: what it accepted is then what read() reports.
    with _reader(segment, mode) as reader:
        table_first = reader.hot_table()
        _agree(reader.read(0), reader, f"{field}/{how}: hot_table first")
        assert int(table_first.status[0]) == truth.status
    with _reader(segment, mode) as reader:
        first = reader.read_all()[0]
        assert (first.status, first.seq) == (truth.status, truth.seq), field
        _agree(first, reader, f"{field}/{how}: read_all first")
    with _reader(segment, mode) as reader:
        changed = {read.rank: read for read in reader.read_changed()}
        if 0 in changed:
            assert (changed[0].status, changed[0].seq) == (truth.status, truth.seq), field
        _agree(reader.read(0), reader, f"{field}/{how}: read_changed first")
    for rank in (1, 2):  # the other ranks are untouched
        with _reader(segment, mode) as reader:
            assert reader.read_all()[rank].status is SlotStatus.FRESH


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_record_scribbles_are_refused_by_every_path(segment: _Segment, mode: str) -> None:
    # Inside the advertised record, every scribble fails its check word: every path refuses
    # the rank (TORN after its retries), none hands out the scribbled numbers.
    for field in _FIELDS:
        if not field.startswith("record.") or field == "record.zeros_after":
            continue
        _scribble(segment, field, "flip")
        with _reader(segment, mode) as reader:
            table = reader.hot_table()
            assert not table.valid[0] and table.status[0] == SlotStatus.TORN, field
            assert reader.read(0).status is SlotStatus.TORN, field
            assert reader.read_all()[0].snapshot is None, field


def test_forged_check_word_with_undecodable_payload(segment: _Segment) -> None:
    # A record whose check word matches but whose payload is not a snapshot can only come
    # from a writer that is not loadsnap's (ours refuse such snapshots before publishing).
    # Decoding refuses it (INVALID); from then on the hot table refuses it too.
    base = _GEOMETRY.copy_offset(0, 1)
    record = bytearray(segment.pristine[base : base + segment.record_len])
    record[COPY_PAYLOAD_OFFSET] = 0xC1  # a byte msgpack never uses
    record[-CRC_STRUCT.size :] = CRC_STRUCT.pack(linear_crc(bytes(record[: -CRC_STRUCT.size])))
    fd = os.open(segment.path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(record), base)
    finally:
        os.close(fd)
    for mode in _MODES:
        with _reader(segment, mode) as reader:
            read = reader.read(0)
            assert read.status is SlotStatus.INVALID and read.snapshot is None
            _agree(read, reader, mode)
            assert reader.read_all()[0].status is SlotStatus.INVALID
            assert reader.stats.decode_errors == 1
