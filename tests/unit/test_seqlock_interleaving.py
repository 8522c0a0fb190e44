"""Deterministic, exhaustive interleavings of one writer and one reader over the seqlock.

The writer is :func:`write_steps` chained over a few records, the reader one attempt of
:func:`read_steps`; both run on a ``bytearray`` (no shared memory, no processes). Every
schedule of their steps is replayed from scratch, and each read the reader accepts must be a
complete record: byte for byte one of the records written, and the one the sequence word advertised.

Then the sequence word is written the broken way. ``struct.pack_into`` is not one store:
CPython zero-fills the target, then writes the value a byte at a time. A plain zero-fill
followed by the value cannot make this protocol accept a tear (a 0 word reads as "never
published"), but it makes a published slot look never published. Zero-filled *a byte at a time*
(a non-atomic store may become visible at byte granularity on any CPU), the word passes through
an older sequence, and with verification off the exhaustive search finds an accepted tear; with
the CRC on, no schedule accepts one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loadsnap._seqlock import (
    ReadOutcome,
    ReadResult,
    SeqStore,
    build_record,
    read_record,
    read_steps,
    write_record,
    write_steps,
)
from loadsnap.layout import (
    HOT_FIELDS,
    HOT_SEQ_INDEX,
    RECORD_HEADER_SIZE,
    SegmentGeometry,
    hot_values,
)
from loadsnap.schema import LoadSnapshot
from loadsnap.shm_writer import ShmWriter

_CAPACITY = 64
_GEOMETRY = SegmentGeometry(1, _CAPACITY)
_SEQ_INDEX = _GEOMETRY.seq_word_index(0)
_COPY0 = _GEOMETRY.copy_offset(0, 0)
_COPY1 = _GEOMETRY.copy_offset(0, 1)
_COPIES = (_COPY0, _COPY1)


@functools.cache
def _record(k: int) -> bytes:
    """Record ``k``: every hot field says ``k``, and ``k`` sets the payload's length and bytes."""
    payload_len = 8 + (k * 13) % (_CAPACITY - 8)
    staging = bytearray(RECORD_HEADER_SIZE + payload_len)
    staging[RECORD_HEADER_SIZE:] = bytes([k & 0xFF]) * payload_len
    hot: list[int | float] = [float(k) if code == "d" else k for _, code in HOT_FIELDS]
    assert hot[HOT_SEQ_INDEX] == k
    length = build_record(staging, hot, payload_len)
    return bytes(staging[:length])


@dataclass
class _Slot:
    buf: memoryview
    words: memoryview


def _slot(start: int) -> _Slot:
    """A fresh slot that has published records ``start - 1`` and ``start`` (word ``start``)."""
    buf = memoryview(bytearray(_GEOMETRY.total_size))
    words = buf.cast("Q")
    for k in (start - 1, start):
        if k > 0:
            write_record(buf, words, _SEQ_INDEX, _COPIES, _record(k), k)
    return _Slot(buf, words)


# --- store models -------------------------------------------------------------------------


def _zero_then_value(words: memoryview, index: int, value: int) -> Generator[None, None, None]:
    """``struct.pack_into`` coarsely: one zero-fill, then the value."""
    words[index] = 0
    yield
    words[index] = value


def _bytewise(words: memoryview, index: int, value: int) -> Generator[None, None, None]:
    """``struct.pack_into`` a byte at a time: zero each byte, then write each (low first).

    Yields only where the word changed and is not yet final (other yields add no behaviour).
    """
    current = int(words[index])
    targets = []
    for i in range(8):
        current &= ~(0xFF << (8 * i))
        targets.append(current)
    for i in range(8):
        current |= value & (0xFF << (8 * i))
        targets.append(current)
    previous = int(words[index])
    for target in targets:
        if target != previous:
            words[index] = target
            previous = target
            if target != value:
                yield
    assert int(words[index]) == value


# --- the explorer -------------------------------------------------------------------------


@dataclass
class _Leaf:
    schedule: tuple[bool, ...]  # True = writer step
    result: ReadResult
    published_at_first_load: int  # records complete when the reader's first load ran


def _explore(start: int, writes: int, store_seq: SeqStore | None, verify: bool) -> Iterator[_Leaf]:
    """Every schedule of the writer's and the reader's steps, each replayed from scratch."""
    stack: list[tuple[bool, ...]] = [()]
    while stack:
        schedule = stack.pop()
        state = _replay(start, writes, store_seq, verify, schedule)
        if state.reader_result is not None and state.writer_done:
            yield _Leaf(schedule, state.reader_result, state.published_at_first_load)
            continue
        if not state.writer_done:
            stack.append((*schedule, True))
        if state.reader_result is None:
            stack.append((*schedule, False))


@dataclass
class _State:
    writer_done: bool = False
    reader_result: ReadResult | None = None
    published: int = 0
    published_at_first_load: int = -1


def _replay(
    start: int,
    writes: int,
    store_seq: SeqStore | None,
    verify: bool,
    schedule: tuple[bool, ...],
) -> _State:
    slot = _slot(start)
    state = _State(published=start)

    def writer() -> Generator[Any, None, None]:
        for k in range(start + 1, start + 1 + writes):
            yield from write_steps(
                slot.buf, slot.words, _SEQ_INDEX, _COPIES, _record(k), k, store_seq
            )
            state.published = k

    reader = read_steps(slot.buf, slot.words, _SEQ_INDEX, _COPIES, _CAPACITY, verify)
    writer_gen = writer()
    reader_started = False
    for writer_step in schedule:
        if writer_step:
            try:
                next(writer_gen)
            except StopIteration:
                state.writer_done = True
        else:
            if not reader_started:
                state.published_at_first_load = state.published
                reader_started = True
            try:
                next(reader)
            except StopIteration as stop:
                state.reader_result = stop.value
    return state


def _is_complete(result: ReadResult) -> bool:
    return result.record == _record(result.seq)


def _tears(leaves: list[_Leaf]) -> list[_Leaf]:
    return [
        leaf
        for leaf in leaves
        if leaf.result.outcome is ReadOutcome.OK and not _is_complete(leaf.result)
    ]


def _check_all_complete(leaves: list[_Leaf], start: int) -> None:
    outcomes = {leaf.result.outcome for leaf in leaves}
    assert ReadOutcome.OK in outcomes and ReadOutcome.TORN in outcomes  # not vacuous
    for leaf in leaves:
        result = leaf.result
        if result.outcome is ReadOutcome.OK:
            assert result.record == _record(result.seq), leaf.schedule
            # Linearisable: never older than what was complete when the read began.
            assert result.seq >= leaf.published_at_first_load, leaf.schedule
        elif result.outcome is ReadOutcome.NEVER_PUBLISHED:
            assert start == 0 and leaf.published_at_first_load == 0, leaf.schedule


# --- the protocol as written --------------------------------------------------------------


def _atomic_cases() -> list[tuple[int, int, bool]]:
    return [(start, 3, verify) for start in (0, 1, 255, 256) for verify in (True, False)]


@pytest.mark.parametrize(("start", "writes", "verify"), _atomic_cases())
def test_every_interleaving_accepts_only_complete_records(
    start: int, writes: int, verify: bool
) -> None:
    leaves = list(_explore(start, writes, None, verify))
    if start:
        # A reader attempt is 4 steps; the writer 2 per write plus its return.
        assert len(leaves) == math.comb(2 * writes + 1 + 4, 4)
    _check_all_complete(leaves, start)


def test_interleavings_cover_each_record_being_accepted() -> None:
    leaves = list(_explore(0, 3, None, True))
    accepted = {leaf.result.seq for leaf in leaves if leaf.result.outcome is ReadOutcome.OK}
    assert accepted == {1, 2, 3}  # records from both copies (odd and even sequences)


# --- the sequence word written the broken way------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_zero_fill_store_makes_a_published_slot_read_never_published(verify: bool) -> None:
    leaves = list(_explore(1, 2, _zero_then_value, verify))
    assert not _tears(leaves)  # a 0 word is never taken for a record ...
    lost = [
        leaf
        for leaf in leaves
        if leaf.result.outcome is ReadOutcome.NEVER_PUBLISHED and leaf.published_at_first_load
    ]
    assert lost  # ... but a published rank is reported as never published


def test_bytewise_store_without_crc_accepts_a_tear() -> None:
    # Word 0x200 -> 0x201 -> 0x202: storing 0x202 zeroes 0x201's low byte, exposing 0x200
    # again after copy 0 was rewritten with record 0x202, under a reader that began on 0x200.
    leaves = list(_explore(0x200, 2, _bytewise, verify=False))
    tears = _tears(leaves)
    assert tears
    complete = {_record(k) for k in (0x1FF, 0x200, 0x201, 0x202)}
    # Some accepted bytes are no record at all: a header and a payload of different records.
    mixed = [leaf for leaf in tears if leaf.result.record not in complete]
    assert mixed
    assert {leaf.result.seq for leaf in mixed} == {0x200}


def test_bytewise_store_with_crc_accepts_no_tear() -> None:
    leaves = list(_explore(0x200, 2, _bytewise, verify=True))
    assert not _tears(leaves)
    assert any(leaf.result.crc_rejects for leaf in leaves)  # the CRC is what caught it
    for leaf in leaves:
        if leaf.result.outcome is ReadOutcome.OK:
            assert _is_complete(leaf.result)


def test_bytewise_model_is_a_store_of_the_value() -> None:
    buf = memoryview(bytearray(16))
    words = buf.cast("Q")
    words[1] = 0x0201
    for _ in _bytewise(words, 1, 0x0202):
        pass
    assert words[1] == 0x0202
    words[1] = 0x0201
    seen = []
    for _ in _bytewise(words, 1, 0x0202):
        seen.append(int(words[1]))
    assert seen == [0x0200, 0x0000, 0x0002]


# --- the step mirrors match the straight-line functions -----------------------------------


def _drain(gen: Generator[Any, None, Any]) -> Any:
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("store_seq", [None, _zero_then_value, _bytewise])
def test_write_steps_leaves_the_same_bytes_as_write_record(store_seq: SeqStore | None) -> None:
    straight, stepped = _slot(0), _slot(0)
    for k in (*range(1, 6), 254, 255, 256, 257, 1000):  # jumps, as after a crash mid-step
        record = _record(k)
        write_record(straight.buf, straight.words, _SEQ_INDEX, _COPIES, record, k)
        _drain(write_steps(stepped.buf, stepped.words, _SEQ_INDEX, _COPIES, record, k, store_seq))
        assert int(straight.words[_SEQ_INDEX]) == k
        assert bytes(straight.buf) == bytes(stepped.buf)


def test_write_steps_yields_the_named_steps_in_order() -> None:
    slot = _slot(0)
    steps = list(write_steps(slot.buf, slot.words, _SEQ_INDEX, _COPIES, _record(1), 1))
    assert [step.value for step in steps] == ["copy", "publish"]


@pytest.mark.parametrize("verify", [True, False])
def test_read_steps_returns_what_read_record_returns(verify: bool) -> None:
    slot = _slot(0)
    for seq in (0, 1, 2, 3):
        if seq in (1, 2):
            write_record(slot.buf, slot.words, _SEQ_INDEX, _COPIES, _record(seq), seq)
        slot.words[_SEQ_INDEX] = seq  # 3: advertises copy 1, which holds record 1
        before = bytes(slot.buf)
        stepped = _drain(read_steps(slot.buf, slot.words, _SEQ_INDEX, _COPIES, _CAPACITY, verify))
        straight = read_record(slot.buf, slot.words, _SEQ_INDEX, _COPIES, _CAPACITY, 4, verify)
        if seq == 3 and verify:  # rejected: one attempt against read_record's four
            assert stepped.outcome is straight.outcome is ReadOutcome.TORN
        else:
            assert stepped == straight
        assert bytes(slot.buf) == before  # reading writes nothing


def test_writer_publish_leaves_the_bytes_of_build_record_and_write_record(
    tmp_path: Path,
) -> None:
    # ShmWriter.publish inlines build_record and write_record: the bytes must not drift.
    geometry = SegmentGeometry(2, 512)
    with ShmWriter("inline-check", 2, 1, payload_capacity=512, shm_dir=str(tmp_path)) as writer:
        model = memoryview(bytearray(geometry.total_size))
        words = model.cast("Q")
        index = geometry.seq_word_index(1)
        copies = (geometry.copy_offset(1, 0), geometry.copy_offset(1, 1))
        encode = msgspec.msgpack.Encoder().encode
        for cycle in range(4):
            snapshot = LoadSnapshot(dp_rank=1, num_running_reqs=cycle, token_usage=0.25)
            seq = writer.publish(snapshot)
            payload = encode(snapshot)
            staging = bytearray(RECORD_HEADER_SIZE) + payload
            length = build_record(staging, hot_values(snapshot), len(payload))
            write_record(model, words, index, copies, staging[:length], seq)
            segment = (tmp_path / "loadsnap-inline-check").read_bytes()
            for start, end in ((index * 8, index * 8 + 8), *((c, c + length) for c in copies)):
                assert segment[start:end] == bytes(model[start:end]), (cycle, start)
