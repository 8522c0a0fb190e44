"""Fuzzed segment bytes reach readers only as documented statuses or errors.

Random bytes are written over a published segment's header, slot control words (the sequence
word among them) and record copies (as a buggy or hostile process sharing /dev/shm could); every
read path must then answer with :class:`SlotStatus` values, :class:`SegmentUnavailableError` or
:class:`LayoutError`, never another exception, and never crash the reading process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadsnap import (
    HotTable,
    LayoutError,
    LoadSnapshot,
    LoraSection,
    SegmentUnavailableError,
    ShmReader,
    ShmWriter,
    SlotRead,
    SlotStatus,
)
from loadsnap.layout import (
    CTRL_SEQ_OFFSET,
    CTRL_WRITER_PID_OFFSET,
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    SLOT_CONTROL_SIZE,
    SegmentGeometry,
)
from tests.helpers import unique_instance

_DP_SIZE = 2
_CAPACITY = 512
_GEOMETRY = SegmentGeometry(_DP_SIZE, _CAPACITY)


@dataclass
class _Published:
    instance: str
    path: str
    pristine: bytes = field(repr=False)


@pytest.fixture(scope="module")
def published() -> Iterator[_Published]:
    """A segment with both ranks published twice; its writers stay attached (alive)."""
    from loadsnap import unlink_segment

    instance = unique_instance("fuzz")
    writers = [ShmWriter(instance, _DP_SIZE, rank, payload_capacity=_CAPACITY) for rank in (0, 1)]
    try:
        for k in (1, 2):
            writers[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=k, token_usage=0.5))
            writers[1].publish(
                LoadSnapshot(dp_rank=1, num_waiting_reqs=k, lora=LoraSection(loaded_adapters=["a"]))
            )
        path = writers[0].segment_name
        with open(path, "rb") as segment:
            pristine = segment.read()
        yield _Published(instance, path, pristine)
    finally:
        for writer in writers:
            writer.close()
        unlink_segment(instance)


# Regions a patch may land in: (start, end) byte ranges of the segment.
_REGIONS: dict[str, tuple[int, int]] = {
    "header": (0, HEADER_SIZE),
    "seq_word": (_GEOMETRY.seq_word_index(0) * 8, _GEOMETRY.seq_word_index(0) * 8 + 8),
    "writer": (
        _GEOMETRY.control_offset(0) + CTRL_WRITER_PID_OFFSET,
        _GEOMETRY.control_offset(0) + SLOT_CONTROL_SIZE,
    ),
    "record_header0": (
        _GEOMETRY.copy_offset(0, 0),
        _GEOMETRY.copy_offset(0, 0) + RECORD_HEADER_SIZE,
    ),
    "copy0": (_GEOMETRY.copy_offset(0, 0), _GEOMETRY.copy_offset(0, 1)),
    "copy1": (_GEOMETRY.copy_offset(0, 1), _GEOMETRY.copy_offset(1, 0)),
    "slot1": (_GEOMETRY.control_offset(1), _GEOMETRY.control_offset(2)),
    "copies1": (_GEOMETRY.copy_offset(1, 0), _GEOMETRY.total_size),
}


@st.composite
def _patches(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    patches = []
    for _ in range(draw(st.integers(1, 4))):
        start, end = _REGIONS[draw(st.sampled_from(sorted(_REGIONS)))]
        offset = draw(st.integers(start, end - 1))
        data = draw(st.binary(min_size=1, max_size=min(64, end - offset)))
        patches.append((offset, data))
    return patches


def _apply(path: str, pristine: bytes, patches: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, pristine, 0)
        for offset, data in patches:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _check_read(read: SlotRead, rank: int) -> None:
    assert isinstance(read.status, SlotStatus)
    assert read.rank == rank
    if read.snapshot is None:
        assert read.status in (SlotStatus.NEVER_PUBLISHED, SlotStatus.TORN, SlotStatus.INVALID)
    else:
        assert isinstance(read.snapshot, LoadSnapshot) and read.snapshot.dp_rank == rank
        assert read.status in (SlotStatus.FRESH, SlotStatus.STALE, SlotStatus.DEAD)


def _check_table(table: HotTable) -> None:
    assert table.dp_size == _DP_SIZE
    assert {int(status) for status in table.status} <= {int(status) for status in SlotStatus}


def _exercise(instance: str, verify_each: bool) -> None:
    """Every read path of a fresh reader; only documented errors may escape."""
    with ShmReader(instance, verify_each=verify_each) as reader:
        try:
            state, _ = reader.segment_state()
            reads = reader.read_all()
        except (SegmentUnavailableError, LayoutError):
            return
        assert state.value == "ok"
        for rank, read in enumerate(reads):
            _check_read(read, rank)
        for rank in range(_DP_SIZE):
            _check_read(reader.read(rank), rank)
        for read in reader.read_changed():
            _check_read(read, read.rank)
        _check_table(reader.hot_table())


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(patches=_patches(), verify_each=st.booleans())
def test_fuzzed_segment_bytes_give_only_documented_results(
    published: _Published, patches: list[tuple[int, bytes]], verify_each: bool
) -> None:
    _apply(published.path, published.pristine, patches)
    try:
        _exercise(published.instance, verify_each)
    finally:
        _apply(published.path, published.pristine, [])


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        # A writer pid that does not fit pid_t, on a record old enough to be probed.
        (_GEOMETRY.control_offset(0) + CTRL_WRITER_PID_OFFSET, (2**63 + 5).to_bytes(8, "little")),
        (_GEOMETRY.control_offset(0) + CTRL_WRITER_PID_OFFSET, (2**32 + 1).to_bytes(8, "little")),
        # A sequence word far beyond the record sequences.
        (_GEOMETRY.control_offset(0) + CTRL_SEQ_OFFSET, (2**64 - 1).to_bytes(8, "little")),
        # A payload length larger than the capacity.
        (_GEOMETRY.copy_offset(0, 0) + 4, (2**32 - 1).to_bytes(4, "little")),
    ],
    ids=["pid-2**63", "pid-2**32", "seq-word-max", "length-max"],
)
def test_known_hostile_words(published: _Published, offset: int, data: bytes) -> None:
    _apply(published.path, published.pristine, [(offset, data)])
    try:
        for verify_each in (False, True):
            _exercise(published.instance, verify_each)
    finally:
        _apply(published.path, published.pristine, [])


def test_pristine_segment_reads_fresh(published: _Published) -> None:
    with ShmReader(published.instance) as reader:
        assert [read.status for read in reader.read_all()] == [SlotStatus.FRESH] * 2
