"""The batch readers of the seqlock core, with writers moving between their loads.

``read_records`` loads every slot's sequence word, copies every advertised copy, checks all
check words with one CRC call and loads every word again; ``gather_records`` does the same
with numpy. Here two slots live in a ``bytearray``; their writers take steps (copy, publish)
right after chosen loads of a sequence word, in every schedule of up to two such points. Each
record a reader accepts must be byte for byte one of the records written, under the sequence
it was published with. (Tears inside a copy are the CRC's to catch: the multi-process
torn-read detector in ``tests/process/test_torn_reads.py`` covers them on every read path.)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from loadsnap._seqlock import (
    ReadOutcome,
    build_record,
    gather_records,
    read_records,
    write_record,
    write_steps,
)
from loadsnap.layout import HOT_FIELDS, RECORD_HEADER_SIZE, SegmentGeometry

_DP = 2
_CAPACITY = 64
_GEOMETRY = SegmentGeometry(_DP, _CAPACITY)
_INDEX = [_GEOMETRY.seq_word_index(rank) for rank in range(_DP)]
_COPIES = [(_GEOMETRY.copy_offset(r, 0), _GEOMETRY.copy_offset(r, 1)) for r in range(_DP)]


@functools.cache
def _record(rank: int, k: int) -> bytes:
    """Record ``k`` of ``rank``: its hot fields say ``k``, its payload bytes say both."""
    payload_len = 8 + (k * 13 + rank * 5) % (_CAPACITY - 8)
    staging = bytearray(RECORD_HEADER_SIZE + payload_len)
    staging[RECORD_HEADER_SIZE:] = bytes([(k * 2 + rank) & 0xFF]) * payload_len
    hot: list[int | float] = [float(k) if code == "d" else k for _, code in HOT_FIELDS]
    length = build_record(staging, hot, payload_len)
    return bytes(staging[:length])


class _Writers:
    """Both slots' writers, publishing records 3, 4, ... one step at a time."""

    def __init__(self, buf: memoryview, words: memoryview) -> None:
        self._steps = [self._publishing(buf, words, rank) for rank in range(_DP)]

    @staticmethod
    def _publishing(buf: memoryview, words: memoryview, rank: int) -> Iterator[None]:
        for k in itertools.count(3):
            for _ in write_steps(buf, words, _INDEX[rank], _COPIES[rank], _record(rank, k), k):
                yield

    def step(self, rank: int, count: int) -> None:
        for _ in range(count):
            next(self._steps[rank])


class _Words:
    """The sequence words, moving the writers right after chosen loads."""

    def __init__(self, words: memoryview, writers: _Writers, plan: dict[int, tuple[int, int]]):
        self._words, self._writers, self._plan, self.loads = words, writers, plan, 0

    def __getitem__(self, index: int) -> int:
        value = int(self._words[index])
        rank, count = self._plan.get(self.loads, (0, 0))
        self.loads += 1
        self._writers.step(rank, count)
        return value


def _segment() -> tuple[bytearray, memoryview, memoryview]:
    data = bytearray(_GEOMETRY.total_size)
    buf = memoryview(data)
    words = buf.cast("Q")
    for rank in range(_DP):
        for k in (1, 2):
            write_record(buf, words, _INDEX[rank], _COPIES[rank], _record(rank, k), k)
    return data, buf, words


def _plans() -> Iterator[dict[int, tuple[int, int]]]:
    """Every schedule of at most two (load, rank, steps) points over the first loads."""
    points = [
        (load, rank, count) for load in range(8) for rank in range(_DP) for count in (1, 2, 4)
    ]
    yield {}
    for point in points:
        yield {point[0]: point[1:]}
    for a, b in itertools.combinations(points, 2):
        if a[0] != b[0]:
            yield {a[0]: a[1:], b[0]: b[1:]}


def _check(rank: int, seq: int, record: bytes) -> None:
    assert seq >= 2 and record == _record(rank, seq), (rank, seq)


@pytest.mark.parametrize("batch_check", [True, False])
def test_read_records_accepts_only_whole_records(batch_check: bool) -> None:
    moved = 0
    for plan in _plans():
        data, buf, words = _segment()
        proxy = _Words(words, _Writers(buf, words), plan)
        result = read_records(
            data, proxy, _INDEX, _COPIES, _CAPACITY, attempts=8, batch_check=batch_check
        )
        for rank, (outcome, seq, record) in enumerate(
            zip(result.outcomes, result.seqs, result.records, strict=True)
        ):
            assert outcome is ReadOutcome.OK, plan  # the writers stop: a retry succeeds
            _check(rank, seq, bytes(record))
        moved += result.retries + result.crc_rejects
    assert moved > 100  # the schedules did move slots under the reader


class _SeqWords:
    """The sequence words for ``gather_records``, moving each writer before the load call
    numbered in ``gaps`` (0: its first load, 1: its second, ...)."""

    def __init__(
        self, raw: np.ndarray, writers: _Writers, gaps: tuple[int, ...], counts: tuple[int, ...]
    ) -> None:
        self._raw, self._writers, self._gaps, self._counts = raw, writers, gaps, counts
        self.calls = 0

    def __getitem__(self, ranks: np.ndarray) -> np.ndarray:
        for rank in range(_DP):
            if self._gaps[rank] == self.calls:
                self._writers.step(rank, self._counts[rank])
        self.calls += 1
        return self._raw[[_INDEX[r] for r in ranks.tolist()]].copy()


def test_gather_records_accepts_only_whole_records() -> None:
    # numpy loads the words itself, so the writers move between the calls that load them
    # (before the first load, between the two loads of an attempt, in the next attempt).
    moved = 0
    for gaps in itertools.product(range(4), repeat=_DP):
        for counts in itertools.product((1, 2, 4), repeat=_DP):
            data, buf, words = _segment()
            raw = np.frombuffer(data, np.uint64)
            copies = raw[_GEOMETRY.records_offset // 8 :].reshape(_DP, 2, -1)
            seq_words = _SeqWords(raw, _Writers(buf, words), gaps, counts)
            result = gather_records(copies, seq_words, np.arange(_DP), _CAPACITY, attempts=8)  # type: ignore[arg-type]
            assert result.torn.size == 0 and result.never.size == 0
            moved += result.retries + result.crc_rejects
            got = 0
            for batch in result.batches:
                for row, rank in enumerate(batch.ranks.tolist()):
                    seq, length = int(batch.seqs[row]), int(batch.lengths[row])
                    record = batch.rows[row].tobytes()[: RECORD_HEADER_SIZE + length + 4]
                    _check(rank, seq, record)
                    got += 1
            assert got == _DP
    assert moved > 10
