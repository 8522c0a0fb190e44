"""Fast end-to-end check of the core API: publish on several ranks, read back every way."""

from __future__ import annotations

import pytest

from loadsnap import LoadSnapshot, MemorySection, ShmReader, ShmWriter, SlotStatus


def test_publish_and_read_all_ranks(instance: str) -> None:
    writers = [ShmWriter(instance, 3, rank) for rank in (0, 2)]
    try:
        writers[0].publish(
            LoadSnapshot(dp_rank=0, num_running_reqs=5, memory=MemorySection(weight_bytes=7))
        )
        writers[1].publish(LoadSnapshot(dp_rank=2, num_waiting_reqs=4, token_usage=0.25))
        with ShmReader(instance) as reader:
            reads = reader.read_all()
            assert [r.status for r in reads] == [
                SlotStatus.FRESH,
                SlotStatus.NEVER_PUBLISHED,
                SlotStatus.FRESH,
            ]
            assert reads[0].snapshot is not None and reads[0].snapshot.num_running_reqs == 5
            assert reads[0].snapshot.memory == MemorySection(weight_bytes=7)
            assert reads[2].snapshot is not None and reads[2].snapshot.token_usage == 0.25
            table = reader.hot_table()
            assert table.num_running_reqs.tolist() == [5, 0, 0]
            assert table.num_waiting_reqs.tolist() == [0, 0, 4]
            assert table.valid.tolist() == [True, False, True]
            assert table.seq.tolist() == [1, 0, 1]
    finally:
        for writer in writers:
            writer.close()


def test_last_writer_close_unlinks(instance: str) -> None:
    writer = ShmWriter(instance, 1, 0)
    path = writer.segment_name
    writer.publish(LoadSnapshot(dp_rank=0))
    writer.close()
    import os

    assert not os.path.exists(path)


def test_publish_rejects_bad_ratio(instance: str) -> None:
    with ShmWriter(instance, 1, 0) as writer, pytest.raises(ValueError, match="token_usage"):
        writer.publish(LoadSnapshot(dp_rank=0, token_usage=float("nan")))
