"""``ShmWriter`` / ``ShmReader`` end to end in one process: every read path and classification."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest

from loadsnap import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    PayloadTooLargeError,
    QueueSection,
    ShmReader,
    ShmWriter,
    SlotStatus,
    SpeculativeSection,
    UsageError,
)
from loadsnap.layout import CTRL_REFUSED_OFFSET, HOT_FIELDS

_TIMEOUT_S = 20.0
_STAMPED = ("seq", "epoch", "publish_mono_ns", "publish_wall_ns")


@pytest.fixture
def dp_size() -> int:
    """``writers`` opens ranks 0..3 of a 4-rank instance."""
    return 4


def _snapshot(rank: int, k: int = 1) -> LoadSnapshot:
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=10 * rank + k,
        num_waiting_reqs=rank + 100 * k,
        num_waiting_uncached_tokens=rank * 7,
        num_used_tokens=1000 + rank,
        num_total_tokens=2000 + rank,
        max_total_num_tokens=4096,
        max_running_requests=64,
        token_usage=rank / 8,
        gen_throughput=123.5 + rank,
        cache_hit_rate=0.5,
        utilization=(rank + 1) / 8,
        cycle=k * 15,
        last_accepted_dispatch_seq=rank * 1000 + k,
        memory=MemorySection(kv_cache_bytes=rank << 30) if rank % 2 else None,
        queues=QueueSection(num_paused_reqs=rank) if rank == 3 else None,
    )


def _same_but_stamps(got: LoadSnapshot | None, sent: LoadSnapshot) -> None:
    assert got is not None
    assert msgspec.structs.replace(got, **{f: 0 for f in _STAMPED}) == msgspec.structs.replace(
        sent, **{f: 0 for f in _STAMPED}
    )


def test_multi_rank_read_all(instance: str, writers: list[ShmWriter]) -> None:
    sent = {rank: _snapshot(rank) for rank in (0, 1, 3)}
    for rank, snapshot in sent.items():
        assert writers[rank].publish(snapshot) == 1
    with ShmReader(instance) as reader:
        assert reader.dp_size == 4
        reads = reader.read_all()
    assert [read.rank for read in reads] == [0, 1, 2, 3]
    assert [read.status for read in reads] == [
        SlotStatus.FRESH,
        SlotStatus.FRESH,
        SlotStatus.NEVER_PUBLISHED,
        SlotStatus.FRESH,
    ]
    for rank, snapshot in sent.items():
        read = reads[rank]
        _same_but_stamps(read.snapshot, snapshot)
        assert read.snapshot is not None
        assert (read.seq, read.epoch) == (1, 1) == (read.snapshot.seq, read.snapshot.epoch)
        assert read.writer_pid == os.getpid()
        assert read.age_s is not None and read.age_s >= 0
    assert reads[2].snapshot is None and reads[2].age_s is None


def test_round_trip_of_every_section_through_a_slot(instance: str) -> None:
    snapshot = msgspec.structs.replace(
        _snapshot(0),
        memory=MemorySection(weight_bytes=1, kv_token_capacity=2),
        speculative=SpeculativeSection(num_draft_tokens=3, accept_length=2.5, accept_rate=0.75),
        lora=LoraSection(max_loaded_adapters=4, loaded_adapters=["a", "b"]),
        queues=QueueSection(num_grammar_queue_reqs=5),
    )
    with ShmWriter(instance, 1, 0) as writer, ShmReader(instance) as reader:
        writer.publish(snapshot)
        read = reader.read(0)
        _same_but_stamps(read.snapshot, snapshot)
        assert read.snapshot == snapshot  # publish stamped the caller's object too


def test_successive_publishes_advance_seq(instance: str) -> None:
    with ShmWriter(instance, 1, 0) as writer, ShmReader(instance) as reader:
        for k in range(1, 6):
            assert writer.publish(_snapshot(0, k)) == k
            read = reader.read(0)
            assert read.seq == k
            _same_but_stamps(read.snapshot, _snapshot(0, k))
        assert writer.published == 5


def test_read_changed_decodes_only_moved_slots(instance: str, writers: list[ShmWriter]) -> None:
    for rank in range(4):
        writers[rank].publish(_snapshot(rank))
    with ShmReader(instance) as reader:
        assert [read.rank for read in reader.read_changed()] == [0, 1, 2, 3]
        assert reader.stats.decodes == 4
        assert reader.read_changed() == []
        writers[1].publish(_snapshot(1, 2))
        writers[3].publish(_snapshot(3, 2))
        changed = reader.read_changed()
        assert [(read.rank, read.seq) for read in changed] == [(1, 2), (3, 2)]
        _same_but_stamps(changed[0].snapshot, _snapshot(1, 2))
        assert reader.stats.decodes == 6
        reads = reader.read_all()  # unchanged slots come from the cache
        assert reader.stats.decodes == 6
        assert [read.seq for read in reads] == [1, 2, 1, 2]
        writers[0].publish(_snapshot(0, 3))
        reader.read_all()  # read_all decodes the moved slot and caches it ...
        assert reader.stats.decodes == 7
        assert reader.read_changed() == []  # ... so read_changed has nothing left


def test_read_changed_skips_never_published(instance: str, writers: list[ShmWriter]) -> None:
    writers[2].publish(_snapshot(2))
    with ShmReader(instance) as reader:
        assert [read.rank for read in reader.read_changed()] == [2]


def test_hot_table_matches_read_all(instance: str, writers: list[ShmWriter]) -> None:
    for rank in (0, 1, 3):
        writers[rank].publish(_snapshot(rank))
    writers[3].publish(_snapshot(3, 2))
    with ShmReader(instance) as reader:
        table = reader.hot_table()
        reads = reader.read_all()
    assert table.dp_size == 4
    assert table.valid.tolist() == [True, True, False, True]
    assert table.status.tolist() == [int(read.status) for read in reads]
    for read in reads:
        rank = read.rank
        if read.snapshot is None:
            assert math.isnan(table.age_s[rank]) and table.seq[rank] == 0
            continue
        for name, _ in HOT_FIELDS:
            if name == "dp_rank":
                continue
            assert getattr(table, name)[rank] == getattr(read.snapshot, name), (rank, name)
        assert table.age_s[rank] >= 0
    assert table.num_running_reqs.dtype == np.uint64 and table.gen_throughput.dtype == np.float64


def test_hot_table_verify_each_path_agrees(instance: str, writers: list[ShmWriter]) -> None:
    for rank in range(4):
        writers[rank].publish(_snapshot(rank))
    with ShmReader(instance) as fast, ShmReader(instance, verify_each=True) as checked:
        a, b = fast.hot_table(), checked.hot_table()
    for name, _ in HOT_FIELDS:
        if name != "dp_rank":
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert b.valid.all()


def test_payload_larger_than_slot_refused(instance: str) -> None:
    with ShmWriter(instance, 2, 1, payload_capacity=512) as writer, ShmReader(instance) as reader:
        small = LoadSnapshot(dp_rank=1, num_running_reqs=3)
        seq = writer.publish(small)
        before = reader.read(1)
        big = LoadSnapshot(dp_rank=1, lora=LoraSection(loaded_adapters=["x" * 100] * 6))
        with pytest.raises(PayloadTooLargeError, match=r"payload too large: size=\d+ capacity=512"):
            writer.publish(big)
        assert writer.refused == 1
        after = reader.read(1)
        assert after.seq == before.seq == seq
        assert after.snapshot == before.snapshot == small
        refused_at = writer.geometry.control_offset(1) + CTRL_REFUSED_OFFSET
        word = reader.segment.buf[refused_at : refused_at + 8]
        assert int.from_bytes(word, "little") == 1  # readers and /metrics see the count
        word.release()
        assert writer.publish(LoadSnapshot(dp_rank=1)) == seq + 1  # no gap in the sequence
        assert reader.read(1).seq == seq + 1


def test_too_large_is_a_usage_error_and_counts_accumulate(instance: str) -> None:
    with ShmWriter(instance, 1, 0, payload_capacity=64) as writer:
        big = LoadSnapshot(dp_rank=0, lora=LoraSection(loaded_adapters=["y" * 80]))
        for expected in (1, 2):
            with pytest.raises(UsageError):
                writer.publish(big)
            assert writer.refused == expected
        with ShmReader(instance) as reader:
            assert reader.read(0).status is SlotStatus.NEVER_PUBLISHED


_PUBLISH_AND_DIE = textwrap.dedent(
    """
    import os, sys
    from loadsnap import LoadSnapshot, ShmWriter
    writer = ShmWriter(sys.argv[1], 4, 3)
    writer.publish(LoadSnapshot(dp_rank=3, num_running_reqs=1))
    os._exit(0)
    """
)


def test_stale_dead_never_classification(instance: str, writers: list[ShmWriter]) -> None:
    # Rank 3's writer is replaced by a process that dies after publishing.
    writers[3].close()
    subprocess.run(
        [sys.executable, "-c", _PUBLISH_AND_DIE, instance], check=True, timeout=_TIMEOUT_S
    )
    writers[1].publish(_snapshot(1))
    writers[2].publish(_snapshot(2))
    writers[2].close(unlink_if_last=False)  # detached cleanly: DEAD at once
    with ShmReader(instance, stale_after_s=0.05) as reader:
        # Rank 0 publishes with a receive time in the future, so it stays fresh however slow
        # this machine is; rank 1's record ages past the 50 ms budget while its writer lives.
        writers[0].publish_relayed(_snapshot(0), time.monotonic_ns() + 3600 * 10**9)
        deadline = time.monotonic() + _TIMEOUT_S
        while True:
            reads = reader.read_all()
            if reads[1].status is SlotStatus.STALE and reads[3].status is SlotStatus.DEAD:
                break
            assert reads[1].status in (SlotStatus.FRESH, SlotStatus.STALE)
            assert reads[3].status in (SlotStatus.FRESH, SlotStatus.STALE, SlotStatus.DEAD)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert reads[0].status is SlotStatus.FRESH and reads[0].age_s == 0.0
        assert "budget 0.05s" in reads[1].reason
        assert reads[2].status is SlotStatus.DEAD and reads[2].reason == "writer detached"
        assert reads[3].reason == "writer is gone (its slot lock was released)"
        assert reads[3].snapshot is not None and reads[3].snapshot.num_running_reqs == 1
        table = reader.hot_table()
        assert table.status.tolist() == [
            SlotStatus.FRESH,
            SlotStatus.STALE,
            SlotStatus.DEAD,
            SlotStatus.DEAD,
        ]
        assert table.valid.all()
    with ShmReader(instance) as reader:  # a generous budget: rank 1 is fresh again
        assert reader.read(1).status in (SlotStatus.FRESH, SlotStatus.STALE)


def test_never_published_rank(instance: str) -> None:
    with ShmWriter(instance, 2, 0), ShmReader(instance) as reader:
        read = reader.read(1)
        assert read.status is SlotStatus.NEVER_PUBLISHED
        assert (read.snapshot, read.age_s, read.seq, read.writer_pid) == (None, None, 0, 0)
        table = reader.hot_table()
        assert table.status.tolist() == [SlotStatus.NEVER_PUBLISHED] * 2
        assert not table.valid.any()


def test_publish_relayed_keeps_epoch(instance: str) -> None:
    with ShmWriter(instance, 2, 1) as writer, ShmReader(instance) as reader:
        writer.publish(_snapshot(1))
        remote = msgspec.structs.replace(
            _snapshot(1, 2), epoch=42, seq=9000, publish_wall_ns=123, publish_mono_ns=5
        )
        received = time.monotonic_ns()
        assert writer.publish_relayed(remote, received) == 2
        read = reader.read(1)
        assert read.snapshot is not None
        assert (read.epoch, read.snapshot.epoch, writer.epoch) == (42, 42, 1)
        assert (read.seq, read.snapshot.seq) == (2, 2)  # the slot's sequence, not the remote's
        assert read.snapshot.publish_mono_ns == received
        assert read.snapshot.publish_wall_ns == 123  # the remote's wall clock is kept
        table = reader.hot_table()
        assert (int(table.epoch[1]), int(table.seq[1])) == (42, 2)


def test_publish_stamps_epoch_and_times(instance: str) -> None:
    with ShmWriter(instance, 1, 0) as writer:
        snapshot = LoadSnapshot(dp_rank=0, epoch=77, seq=77)
        before_wall = time.time_ns()
        writer.publish(snapshot)
        assert (snapshot.seq, snapshot.epoch) == (1, writer.epoch)
        assert snapshot.publish_wall_ns >= before_wall and snapshot.publish_mono_ns > 0


def test_publish_refuses_bad_snapshots_and_keeps_slot(instance: str) -> None:
    with ShmWriter(instance, 2, 0) as writer, ShmReader(instance) as reader:
        writer.publish(_snapshot(0))
        for bad, message in (
            (LoadSnapshot(dp_rank=1), "dp_rank mismatch"),
            (LoadSnapshot(dp_rank=0, utilization=1.5), r"\$\.utilization"),
            (LoadSnapshot(dp_rank=0, gen_throughput=math.inf), r"\$\.gen_throughput"),
            (LoadSnapshot(dp_rank=0, num_running_reqs=-1), r"\$\.num_running_reqs"),
            (LoadSnapshot(dp_rank=0, cache_hit_rate=1.5), r"\$\.cache_hit_rate"),
        ):
            with pytest.raises(UsageError, match=message):
                writer.publish(bad)
        read = reader.read(0)
        assert read.seq == 1
        _same_but_stamps(read.snapshot, _snapshot(0))


@pytest.mark.parametrize("validate", [False, True])
def test_every_schema_violation_is_refused_at_publish(instance: str, validate: bool) -> None:
    # Each constrained field of the snapshot and of every section, one at a time: the writer
    # names it and keeps the previous record, so no reader ever sees the rank INVALID.
    with ShmWriter(instance, 1, 0, validate=validate) as writer, ShmReader(instance) as reader:
        writer.publish(_snapshot(0))
        for path, bad in _one_bad_field_each():
            with pytest.raises(UsageError, match=re.escape(f"`$.{path}") + r"[`\[]"):
                writer.publish(bad)
            read = reader.read(0)
            assert read.status is SlotStatus.FRESH and read.seq == 1, path
        assert reader.stats.decode_errors == 0


def _one_bad_field_each() -> Iterator[tuple[str, LoadSnapshot]]:
    """(field path, a snapshot breaking only that field's constraint) for every field."""
    stamped = {"seq", "epoch", "publish_mono_ns", "publish_wall_ns", "dp_rank"}
    sections = {
        "memory": MemorySection,
        "speculative": SpeculativeSection,
        "lora": LoraSection,
        "disaggregation": DisaggregationSection,
        "queues": QueueSection,
    }
    for field in msgspec.inspect.type_info(LoadSnapshot).fields:  # type: ignore[attr-defined]
        if field.name in stamped:
            continue
        if field.name in sections:
            section = sections[field.name]
            for inner in msgspec.inspect.type_info(section).fields:  # type: ignore[attr-defined]
                for bad in _bad_values(inner.type):
                    inner_kwargs: dict[str, Any] = {inner.name: bad}
                    outer_kwargs: dict[str, Any] = {field.name: section(**inner_kwargs)}
                    yield f"{field.name}.{inner.name}", LoadSnapshot(dp_rank=0, **outer_kwargs)
            continue
        for bad in _bad_values(field.type):
            kwargs: dict[str, Any] = {field.name: bad}
            yield field.name, LoadSnapshot(dp_rank=0, **kwargs)


def _bad_values(kind: msgspec.inspect.Type) -> list[object]:
    if isinstance(kind, msgspec.inspect.UnionType):  # an optional figure: X | None
        return [bad for member in kind.types for bad in _bad_values(member)]
    if isinstance(kind, msgspec.inspect.NoneType):
        return []
    if isinstance(kind, msgspec.inspect.IntType):
        return [-1, 2**63, 1.5, True]  # a bool is an int to Python, not to the decoder
    if isinstance(kind, msgspec.inspect.FloatType):
        if kind.ge is None and kind.le is None:
            return ["x", True]  # unconstrained: only the type can be wrong
        bad: list[object] = [math.nan, -0.5, True]
        if kind.le is not None:
            bad.append(kind.le * 2 if kind.le else 1.0)
        return bad
    if isinstance(kind, msgspec.inspect.StrType):
        return ["x" * ((kind.max_length or 128) + 1), 3]
    if isinstance(kind, msgspec.inspect.ListType):
        too_long = (kind.max_length or 256) + 1
        if isinstance(kind.item_type, msgspec.inspect.FloatType):
            return [[0.5] * too_long, ["x"]]
        return [["x"] * too_long, ["y" * 129]]
    raise AssertionError(f"no bad values for {kind}")


def test_closed_writer_refuses_publish(instance: str) -> None:
    writer = ShmWriter(instance, 1, 0)
    writer.close()
    with pytest.raises(UsageError, match="writer is closed"):
        writer.publish(LoadSnapshot(dp_rank=0))


def test_argument_errors(instance: str) -> None:
    with pytest.raises(UsageError, match="dp_rank out of range"):
        ShmWriter(instance, 2, 2)
    with pytest.raises(UsageError, match="invalid instance name"):
        ShmWriter("../etc", 1, 0)
    with pytest.raises(UsageError, match="stale_after_s"):
        ShmReader(instance, stale_after_s=0)
    with (
        ShmWriter(instance, 2, 0),
        ShmReader(instance) as reader,
        pytest.raises(UsageError, match="dp_rank out of range: dp_rank=2 dp_size=2"),
    ):
        reader.read(2)


def test_second_writer_for_a_rank_in_the_same_process_is_refused(instance: str) -> None:
    from loadsnap import SegmentError

    with ShmWriter(instance, 2, 1) as first:
        with pytest.raises(SegmentError, match="dp_rank=1 already has a live writer"):
            ShmWriter(instance, 2, 1)
        first.publish(LoadSnapshot(dp_rank=1))
    with ShmWriter(instance, 2, 1) as again:  # a closed writer's rank can be claimed again
        assert again.publish(LoadSnapshot(dp_rank=1)) >= 1


def test_segment_being_created_reads_as_not_ready(instance: str) -> None:
    from loadsnap import SegmentState, segment_path

    # A creator between O_CREAT and writing the header leaves an all-zero file.
    fd = os.open(segment_path(instance), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    with ShmReader(instance) as reader:
        assert reader.segment_state()[0] is SegmentState.NOT_READY


def test_writer_inherited_through_fork_refuses_to_publish(instance: str) -> None:
    with ShmWriter(instance, 1, 0) as writer, ShmReader(instance) as reader:
        writer.publish(_snapshot(0))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: publishing through the parent's writer must fail
            try:
                writer.publish(_snapshot(0))
                os.write(write, b"published")
            except UsageError as exc:
                os.write(write, b"refused" if "inherited through fork" in str(exc) else b"other")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            assert answer.read() == b"refused"
        assert os.waitpid(pid, 0)[1] == 0
        assert reader.writer_alive(0)  # the child closing its copy kept the parent's claim
        assert writer.publish(_snapshot(0)) == 2
        assert reader.read(0).seq == 2
