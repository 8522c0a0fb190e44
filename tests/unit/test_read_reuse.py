"""What a reader reuses between calls, and what it must not.

An unchanged slot costs a comparison: ``read_all`` hands out the same ``SlotRead`` objects and
decodes nothing, the hot table shares its read-only columns; but every status that time or a
writer changes (STALE, DEAD when a writer detaches or dies) still shows at the next call, and
``age_s`` is always the age now. Both ways of reading (plain Python for small deployments,
numpy for large ones) give the same results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from loadsnap import LoadSnapshot, LoraSection, ShmReader, ShmWriter, SlotStatus
from loadsnap.layout import HOT_FIELDS, RECORD_HEADER_SIZE

_MODES = {"python": (1 << 30, 1 << 30), "numpy": (0, 0), "mixed": (0, 1 << 30)}


def _snapshot(rank: int, k: int = 1) -> LoadSnapshot:
    return LoadSnapshot(dp_rank=rank, num_running_reqs=k, num_waiting_reqs=rank, cycle=k)


def _reader(instance: str, mode: str, **kwargs: float) -> ShmReader:
    reader = ShmReader(instance, **kwargs)  # type: ignore[arg-type]
    reader._small_max, reader._gather_min = _MODES[mode]
    return reader


@pytest.fixture
def writers(instance: str) -> Iterator[list[ShmWriter]]:
    attached = [ShmWriter(instance, 4, rank) for rank in range(4)]
    try:
        yield attached
    finally:
        for writer in attached:
            writer.close()


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_unchanged_slots_are_not_read_again(
    instance: str, writers: list[ShmWriter], mode: str
) -> None:
    for rank, writer in enumerate(writers[:3]):
        writer.publish(_snapshot(rank))
    with _reader(instance, mode) as reader:
        first = reader.read_all()
        assert [read.status for read in first] == [SlotStatus.FRESH] * 3 + [
            SlotStatus.NEVER_PUBLISHED
        ]
        decodes, age = reader.stats.decodes, first[0].age_s
        assert decodes == 3 and age is not None
        second = reader.read_all()
        assert all(a is b for a, b in zip(first, second, strict=True))
        assert second is not first  # a new list: the caller may keep or change it
        assert reader.stats.decodes == decodes
        later = second[0].age_s
        assert later is not None and later >= age  # measured when asked
        writers[1].publish(_snapshot(1, 2))
        third = reader.read_all()
        assert third[1] is not second[1] and third[1].seq == 2
        assert third[1].snapshot is not None and third[1].snapshot.cycle == 2
        assert [third[r] is second[r] for r in (0, 2, 3)] == [True] * 3
        assert reader.stats.decodes == decodes + 1


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_time_and_writers_still_change_statuses(
    instance: str, writers: list[ShmWriter], mode: str
) -> None:
    for rank, writer in enumerate(writers):
        writer.publish(_snapshot(rank))
    with _reader(instance, mode, stale_after_s=0.05) as reader:
        assert {read.status for read in reader.read_all()} == {SlotStatus.FRESH}
        table = reader.hot_table()
        assert (table.status == SlotStatus.FRESH).all()
        writers[2].close()  # detaches: the control table changes
        reads = reader.read_all()
        assert reads[2].status is SlotStatus.DEAD and reads[2].reason == "writer detached"
        assert reader.hot_table().status[2] == SlotStatus.DEAD
        deadline = time.monotonic() + 10.0
        while reader.read_all()[0].status is SlotStatus.FRESH:  # nothing in the segment moves
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reads = reader.read_all()
        assert reads[0].status is SlotStatus.STALE and "budget 0.05s" in reads[0].reason
        table = reader.hot_table()
        assert table.status.tolist() == [SlotStatus.STALE, SlotStatus.STALE, SlotStatus.DEAD, 1]
        writers[0].publish(_snapshot(0, 2))
        assert reader.read_all()[0].status is SlotStatus.FRESH
        assert reader.hot_table().status[0] == SlotStatus.FRESH


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_hot_tables_share_read_only_columns_while_nothing_changes(
    instance: str, writers: list[ShmWriter], mode: str
) -> None:
    for rank, writer in enumerate(writers):
        writer.publish(_snapshot(rank))
    with _reader(instance, mode) as reader:
        first, second = reader.hot_table(), reader.hot_table()
        for name, _ in HOT_FIELDS:
            column = getattr(second, name)
            assert column is getattr(first, name) and not column.flags.writeable, name
            with pytest.raises(ValueError, match="read-only"):
                column[0] = 1
        assert second.valid is first.valid and not second.valid.flags.writeable
        assert second.taken_mono_ns >= first.taken_mono_ns
        assert (second.age_s >= first.age_s).all()
        writers[3].publish(_snapshot(3, 7))
        third = reader.hot_table()
        assert third.seq is not second.seq
        assert third.num_running_reqs.tolist() == [1, 1, 1, 7]
        assert second.num_running_reqs.tolist() == [1, 1, 1, 1]  # the old table did not move


def test_both_ways_of_reading_agree(instance: str, writers: list[ShmWriter]) -> None:
    for rank, writer in enumerate(writers[:3]):
        for k in range(1, rank + 2):
            writer.publish(_snapshot(rank, k))
    readers = {mode: _reader(instance, mode) for mode in _MODES}
    try:
        for step in range(3):
            if step:
                writers[step].publish(_snapshot(step, 10 + step))
            results = {
                mode: (
                    [(r.status, r.seq, r.epoch, r.snapshot) for r in reader.read_all()],
                    reader.hot_table(),
                    [(r.rank, r.seq) for r in reader.read_changed()],
                )
                for mode, reader in readers.items()
            }
            reads, table, _ = results["python"]
            for mode, (other_reads, other_table, _) in results.items():
                assert other_reads == reads, mode
                for name in (*(n for n, _ in HOT_FIELDS), "status", "valid"):
                    assert np.array_equal(getattr(other_table, name), getattr(table, name)), name
    finally:
        for reader in readers.values():
            reader.close()


def test_non_zero_bytes_after_a_record_only_slow_the_batch_check(
    instance: str, writers: list[ShmWriter]
) -> None:
    # The writer keeps the bytes after each record zero so that many records check with one
    # CRC call; garbage there (a scribble) makes that call fail, and each record is then
    # checked alone: still accepted.
    for rank, writer in enumerate(writers[:3]):
        writer.publish(_snapshot(rank))
    long = _snapshot(3)
    long.lora = LoraSection(loaded_adapters=["x" * 100])  # the widest row of a gather
    writers[3].publish(long)
    geometry = writers[0].geometry
    base = geometry.copy_offset(1, 1)
    length = int.from_bytes(writers[0]._buf[base + 4 : base + 8], "little")
    writers[0]._buf[base + RECORD_HEADER_SIZE + length + 8] = 0x5A  # just past rank 1's record
    for mode in _MODES:
        with _reader(instance, mode) as reader:
            assert [read.status for read in reader.read_all()] == [SlotStatus.FRESH] * 4
            assert reader.hot_table().valid.all()
            assert reader.stats.crc_rejects == 0
