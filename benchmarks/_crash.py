"""Crash injection for the benchmarks: what readers get after a writer is SIGKILLed mid-write.

Ours (and, at random moments, sglang's scheduler writing through ``loadsnap.compat.sglang``)
against the flock baseline, in forked writer processes (real kills, so the kernel drops
the dead writer's locks as it would in production):

- **at each step**: the writer publishes record A, starts record B, and kills itself right
  after one named step of the write (ours: half the copy, the copy, the sequence store; the
  baseline: lock taken, length zeroed, payload copied, slot zero-filled, length stored);
- **at a random moment**: the writer publishes A and B alternately in a tight loop and is
  killed from outside after a random 1-5 ms.

Afterwards a fresh reader reads every rank; for the killed rank it gets record A, record B,
or nothing ("missing": ours has no such outcome; the baseline's reader skips a slot whose
length is 0, until its writer writes again). Records are told apart by their
``num_running_reqs``, which both designs carry.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Final, NoReturn

import msgspec

from benchmarks._common import make_snapshot, unique_instance
from benchmarks.baselines.flock_segment import FlockSegment, FlockStep, reference_snapshot
from loadsnap import ShmReader, ShmWriter, unlink_segment
from loadsnap._seqlock import build_record, write_steps
from loadsnap.compat.sglang import ShmLoadSnapshotReader, ShmLoadSnapshotWriter
from loadsnap.layout import RECORD_HEADER_SIZE, hot_values

__all__ = ["FLOCK_STEPS", "OURS_STEPS", "OUTCOMES", "kill_at_random", "kill_at_steps"]

OURS_STEPS: Final[tuple[str, ...]] = ("mid_copy", "copy", "publish")
FLOCK_STEPS: Final[tuple[str, ...]] = tuple(step.value for step in FlockStep)
OUTCOMES: Final[tuple[str, ...]] = ("record_a", "record_b", "missing")
_DP_SIZE: Final[int] = 2
_A, _B = make_snapshot(0, cycle=1), make_snapshot(0, cycle=2)
_WAIT_S: Final[float] = 10.0

Counts = dict[str, int]


def _die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)  # not reached


def _run_child(body: Callable[[], None]) -> int:
    """Fork; the child runs ``body`` (which kills itself), never returning to our code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            body()
        finally:
            os._exit(1)
    return pid


def _reap(pid: int) -> None:
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _ours_outcome(instance: str) -> str:
    with ShmReader(instance) as reader:
        snapshot = reader.read_all()[0].snapshot
    if snapshot is None:
        return "missing"
    return "record_a" if snapshot.num_running_reqs == _A.num_running_reqs else "record_b"


def _flock_outcome(path: str) -> str:
    with FlockSegment(path) as segment:
        present = [s for s in segment.read_all() if getattr(s, "dp_rank", -1) == 0]
    if not present:
        return "missing"
    running = getattr(present[0], "num_running_reqs", -1)
    return "record_a" if running == _A.num_running_reqs else "record_b"


def _ours_until(instance: str, step: str) -> None:
    writer = ShmWriter(instance, _DP_SIZE, 0)
    writer.publish(_A)
    snapshot = msgspec.structs.replace(_B)
    k = writer._seq + 1
    snapshot.seq, snapshot.epoch, snapshot.publish_mono_ns = k, writer.epoch, time.monotonic_ns()
    staging = bytearray(RECORD_HEADER_SIZE)
    msgspec.msgpack.Encoder().encode_into(snapshot, staging, RECORD_HEADER_SIZE)
    length = build_record(staging, hot_values(snapshot), len(staging) - RECORD_HEADER_SIZE)
    record = bytes(staging[:length])
    # The writer's own views and offsets: exactly what publish() writes through.
    buf, words, copies = writer._buf, writer._words, writer._copies
    if step == "mid_copy":
        target = copies[k & 1]
        buf[target : target + length // 2] = record[: length // 2]
        _die()
    for done in write_steps(buf, words, writer._seq_index, copies, record, k):
        if done.value == step:
            _die()


def _flock_until(path: str, step: str) -> None:
    segment = FlockSegment(path)
    segment.write(reference_snapshot(_A))
    for done in segment.write_steps(reference_snapshot(_B)):
        if done.value == step:
            _die()


def kill_at_steps(trials: int) -> dict[str, dict[str, Counts]]:
    """Per design and step, how often the killed rank then read as A, B or missing."""
    instance = unique_instance("bench-crash")
    path = f"/dev/shm/{unique_instance('bench-crash-flock')}"
    keeper = ShmWriter(instance, _DP_SIZE, 1)  # keeps our segment live between the kills
    flock = FlockSegment(path, _DP_SIZE, create=True)
    out: dict[str, dict[str, Counts]] = {"ours": {}, "flock": {}}
    try:
        for design, steps in (("ours", OURS_STEPS), ("flock", FLOCK_STEPS)):
            for step in steps:
                counts = dict.fromkeys(OUTCOMES, 0)
                for _ in range(trials):
                    if design == "ours":
                        pid = _run_child(functools.partial(_ours_until, instance, step))
                        _reap(pid)
                        counts[_ours_outcome(instance)] += 1
                    else:
                        pid = _run_child(functools.partial(_flock_until, path, step))
                        _reap(pid)
                        counts[_flock_outcome(path)] += 1
                out[design][step] = counts
    finally:
        flock.close(unlink=True)
        keeper.close()
        unlink_segment(instance)
    return out


def _ours_loop(instance: str, ready: int) -> None:
    writer = ShmWriter(instance, _DP_SIZE, 0)
    a, b = msgspec.structs.replace(_A), msgspec.structs.replace(_B)
    writer.publish(a)
    os.write(ready, b"r")
    while True:
        writer.publish(a)
        writer.publish(b)


def _compat_loop(path: str, ready: int) -> None:
    # sglang's scheduler through loadsnap.compat.sglang (its one-import swap).
    writer = ShmLoadSnapshotWriter(path, _DP_SIZE, 0)
    a, b = msgspec.structs.replace(_A), msgspec.structs.replace(_B)
    writer.write(a)
    os.write(ready, b"r")
    while True:
        writer.write(a)
        writer.write(b)


def _compat_outcome(path: str) -> str:
    reader = ShmLoadSnapshotReader(path, _DP_SIZE)
    try:
        loads = [load for load in reader.read_all() if load.dp_rank == 0]
    finally:
        reader.close()
    if not loads:
        return "missing"
    return "record_a" if loads[0].num_running_reqs == _A.num_running_reqs else "record_b"


def _flock_loop(path: str, ready: int) -> None:
    segment = FlockSegment(path)
    a, b = reference_snapshot(_A), reference_snapshot(_B)
    segment.write(a)
    os.write(ready, b"r")
    while True:
        segment.write(a)
        segment.write(b)


def kill_at_random(trials: int, seed: int = 16) -> dict[str, Counts]:
    """Per design, how often the rank read as A, B or missing after a kill 1-5 ms into a
    tight publish loop: ours, sglang's module swapped for ``loadsnap.compat.sglang``, and the
    flock baseline (sglang's own scheme)."""
    rng = random.Random(seed)
    instance = unique_instance("bench-crash-rnd")
    path = f"/dev/shm/{unique_instance('bench-crash-rnd-flock')}"
    compat_path = f"/dev/shm/{unique_instance('bench-crash-rnd-compat')}"
    keeper = ShmWriter(instance, _DP_SIZE, 1)
    compat_keeper = ShmLoadSnapshotWriter(compat_path, _DP_SIZE, 1)  # keeps its segment alive
    flock = FlockSegment(path, _DP_SIZE, create=True)
    loops: dict[str, Callable[[int], None]] = {
        "ours": functools.partial(_ours_loop, instance),
        "compat": functools.partial(_compat_loop, compat_path),
        "flock": functools.partial(_flock_loop, path),
    }
    outcomes: dict[str, Callable[[], str]] = {
        "ours": functools.partial(_ours_outcome, instance),
        "compat": functools.partial(_compat_outcome, compat_path),
        "flock": functools.partial(_flock_outcome, path),
    }
    out = {design: dict.fromkeys(OUTCOMES, 0) for design in loops}
    try:
        for _ in range(trials):
            for design, loop in loops.items():
                read_end, write_end = os.pipe()
                pid = _run_child(functools.partial(loop, write_end))
                os.close(write_end)
                os.read(read_end, 1)  # published A once, now in its loop
                os.close(read_end)
                time.sleep(rng.uniform(0.001, 0.005))
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
                out[design][outcomes[design]()] += 1
    finally:
        flock.close(unlink=True)
        keeper.close()
        compat_keeper.close()
        unlink_segment(instance)
    return out
