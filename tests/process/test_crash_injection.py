"""Crash injection: a writer process dies at each named step of a publish (and mid-copy).

A real subprocess publishes records 1 and 2 on a real segment, then drives
:func:`write_steps` for record 3 up to the chosen point (or copies half of it) and dies there
(SIGKILL or ``os._exit``). Readers must then get record 2 or record 3 whole, never a partial
one, with a DEAD status; a restarted writer re-attaches with the next epoch and goes on from the
advertised record.
Rank 1's writer lives in the test process throughout, so the segment stays live and is reused
rather than reclaimed. Readers check it both ways of reading (plain Python, and the numpy paths
large deployments use), each path first.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from loadsnap import (
    HotTable,
    LoadSnapshot,
    LoraSection,
    ShmReader,
    ShmWriter,
    SlotRead,
    SlotStatus,
)
from loadsnap._seqlock import WriteStep, build_record, write_steps
from loadsnap.layout import RECORD_HEADER_SIZE, hot_values
from tests.helpers import ROOT

_TIMEOUT_S = 30.0
_OLD_NS = 10 * 10**9  # records claim to be 10 s old, so readers probe the writer's liveness now
_EXIT_CODE = 3

# Where the child stops: half-way through the copy, or after a named step.
_STOPS: dict[str, WriteStep | None] = {
    "mid_copy": None,
    "copy": WriteStep.COPY,
    "publish": WriteStep.PUBLISH,
}
# Record a reader must see after the crash, by stop (before the crashed publish: record 2).
_EXPECTED = {"mid_copy": 2, "copy": 2, "publish": 3}


def _snapshot(k: int) -> LoadSnapshot:
    """Record ``k`` checks itself: its counts derive from ``k`` and its length grows with it."""
    return LoadSnapshot(
        dp_rank=0,
        num_running_reqs=10 * k,
        num_waiting_reqs=10 * k + 1,
        cycle=k,
        lora=LoraSection(loaded_adapters=[f"adapter-{k}"] * (3 * k)),
    )


def child_main(instance: str, prior: int, stop: str, how: str) -> None:
    """Publish records 1..``prior``, then die at ``stop`` while publishing the next one."""
    writer = ShmWriter(instance, 2, 0)
    old = time.monotonic_ns() - _OLD_NS
    for k in range(1, prior + 1):
        snapshot = _snapshot(k)
        snapshot.epoch = writer.epoch
        assert writer.publish_relayed(snapshot, old) == k
    k = prior + 1
    snapshot = _snapshot(k)
    snapshot.seq, snapshot.epoch, snapshot.publish_mono_ns = k, writer.epoch, old
    staging = bytearray(RECORD_HEADER_SIZE)
    msgspec.msgpack.Encoder().encode_into(snapshot, staging, RECORD_HEADER_SIZE)
    length = build_record(staging, hot_values(snapshot), len(staging) - RECORD_HEADER_SIZE)
    record = bytes(staging[:length])
    # The writer's own views and offsets: exactly what publish() would write through.
    buf, words, copies = writer._buf, writer._words, writer._copies
    last_step = _STOPS[stop]
    if last_step is None:
        target = copies[k & 1]
        buf[target : target + length // 2] = record[: length // 2]
    else:
        for step in write_steps(buf, words, writer._seq_index, copies, record, k):
            if step is last_step:
                break
    sys.stdout.flush()
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(_EXIT_CODE)


def _crash(instance: str, prior: int, stop: str, how: str) -> None:
    code = (
        "import sys; from tests.process.test_crash_injection import child_main; "
        "child_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, instance, str(prior), stop, how],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )
    expected = -signal.SIGKILL if how == "sigkill" else _EXIT_CODE
    assert done.returncode == expected, done.stderr


def _check_whole(read: SlotRead, seq: int, status: SlotStatus) -> None:
    """``read`` is record ``seq`` exactly, or never-published when ``seq`` is 0."""
    if seq == 0:
        assert read.status is SlotStatus.NEVER_PUBLISHED and read.snapshot is None
        return
    assert read.status is status, read.reason
    assert read.seq == seq and read.snapshot is not None
    expected = _snapshot(seq)
    got = read.snapshot
    assert (got.num_running_reqs, got.num_waiting_reqs, got.cycle, got.lora) == (
        expected.num_running_reqs,
        expected.num_waiting_reqs,
        expected.cycle,
        expected.lora,
    )


def _check_table(table: HotTable, seq: int, status: SlotStatus) -> None:
    assert bool(table.valid[0]) == (seq > 0)
    assert int(table.seq[0]) == seq
    assert int(table.num_running_reqs[0]) == 10 * seq
    assert int(table.num_waiting_reqs[0]) == (10 * seq + 1 if seq else 0)
    expected_status = status if seq else SlotStatus.NEVER_PUBLISHED
    assert int(table.status[0]) == expected_status


def _check_readers(instance: str, seq: int, status: SlotStatus) -> None:
    # Each way of reading (``numpy``: the one large deployments use), each path first.
    for verify_each, numpy in itertools.product((False, True), repeat=2):
        for table_first in (False, True):
            with ShmReader(instance, verify_each=verify_each) as reader:
                if numpy:
                    reader._small_max = reader._gather_min = 0
                if table_first:
                    _check_table(reader.hot_table(), seq, status)
                _check_whole(reader.read(0), seq, status)
                _check_whole(reader.read_all()[0], seq, status)
                _check_table(reader.hot_table(), seq, status)
                assert reader.stats.torn == 0 and reader.stats.decode_errors == 0


def _crash_and_restart(instance: str, prior: int, stop: str, how: str) -> None:
    with ShmWriter(instance, 2, 1) as keeper:  # keeps the segment live across the crash
        _crash(instance, prior, stop, how)
        expected = _EXPECTED[stop] - 2 + prior
        _check_readers(instance, expected, SlotStatus.DEAD)

        restarted = ShmWriter(instance, 2, 0)
        try:
            assert not restarted.created
            assert restarted.epoch == 2
            assert restarted._seq == expected  # goes on from the advertised record
            _check_readers(instance, expected, SlotStatus.STALE)  # alive again, but old

            assert restarted.publish(_snapshot(expected + 1)) == expected + 1
            with ShmReader(instance) as reader:
                read = reader.read(0)
                assert read.status in (SlotStatus.FRESH, SlotStatus.STALE)
                assert read.epoch == 2 and read.writer_pid == os.getpid()
                _check_whole(read, expected + 1, read.status)
                assert reader.read(1).status is SlotStatus.NEVER_PUBLISHED
        finally:
            restarted.close()
        assert keeper.epoch == 1


@pytest.mark.parametrize("how", ["sigkill", "exit"])
@pytest.mark.parametrize("stop", list(_STOPS))
def test_crash_after_records_leaves_a_whole_record(instance: str, stop: str, how: str) -> None:
    _crash_and_restart(instance, 2, stop, how)


@pytest.mark.parametrize("stop", list(_STOPS))
def test_crash_during_first_publish(instance: str, stop: str) -> None:
    _crash_and_restart(instance, 0, stop, "sigkill")


def test_expected_records_follow_the_sequence_word() -> None:
    # Until PUBLISH the word still advertises the previous record; from it on, the new one.
    assert [step for step in _STOPS.values() if step] == list(WriteStep)
    for stop, step in _STOPS.items():
        assert _EXPECTED[stop] == (3 if step is WriteStep.PUBLISH else 2)
