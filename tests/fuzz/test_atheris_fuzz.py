"""Coverage-guided fuzzing (atheris, libFuzzer) of the two decoders that face other processes.

* ``slot``: libFuzzer's bytes are written over a published segment (header, slot control words,
  record copies: anywhere), then a fresh :class:`~loadsnap.ShmReader` reads every rank through
  every read path. Only :class:`~loadsnap.SlotStatus` values, ``SegmentUnavailableError`` or
  ``LayoutError`` may come out.
* ``frame``: libFuzzer's bytes are one ZMQ frame handed to the :class:`~loadsnap.collector.
  Collector`'s per-frame handler (the function its receive loop calls), starting from a corpus of
  valid frames (:mod:`loadsnap.frame` envelopes for the collector's instance) and near misses
  (another instance, a bare snapshot, hostile maps). Nothing may raise, and each frame adds
  exactly one to ``relayed`` or to one drop reason.

``atheris.Fuzz`` ends the process when done, so each target runs in a subprocess (this file run
as a script) for a fixed number of runs with a fixed seed; a Python exception there is a crash:
libFuzzer saves the input and the subprocess exits non-zero. The tests skip where atheris is not
installed (it ships wheels for Linux x86-64 only; elsewhere it needs clang and libFuzzer).
``LOADSNAP_ATHERIS_RUNS`` and ``LOADSNAP_ATHERIS_SEED`` override the run count and seed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

RUNS = int(os.environ.get("LOADSNAP_ATHERIS_RUNS", "5000"))
SEED = int(os.environ.get("LOADSNAP_ATHERIS_SEED", "1"))
DP_SIZE = 2
CAPACITY = 512
SUMMARY_EVERY = 100
FRAME_INSTANCE = "atheris-frame"

needs_atheris = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris not installed (wheels for Linux x86-64 only; elsewhere it needs clang)",
)


# --- the harness (runs in the subprocess) ---------------------------------------------------


class _Tally:
    """Outcome counts, rewritten to a JSON file as the run goes (libFuzzer exits without atexit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counts: dict[str, int] = {"inputs": 0}

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def input_done(self) -> None:
        self.counts["inputs"] += 1
        if self.counts["inputs"] % SUMMARY_EVERY == 0 or self.counts["inputs"] >= RUNS:
            Path(self.path).write_text(json.dumps(self.counts, sort_keys=True))


def _slot_target(atheris: Any, shm_dir: str, tally: _Tally) -> Any:
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
        UsageError,
    )

    instance = "atheris-slot"
    writers = [
        ShmWriter(instance, DP_SIZE, rank, payload_capacity=CAPACITY, shm_dir=shm_dir)
        for rank in range(DP_SIZE)
    ]
    for seq in (1, 2):  # both record copies of each slot hold a complete record
        writers[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=seq, token_usage=0.5))
        writers[1].publish(
            LoadSnapshot(dp_rank=1, num_waiting_reqs=seq, lora=LoraSection(loaded_adapters=["a"]))
        )
    path = writers[0].segment_name
    pristine = Path(path).read_bytes()
    usable = (SlotStatus.FRESH, SlotStatus.STALE, SlotStatus.DEAD)

    def check(read: SlotRead, rank: int) -> None:
        assert isinstance(read.status, SlotStatus) and read.rank == rank, read
        if read.snapshot is None:
            assert read.status not in usable, read
        else:
            assert read.status in usable and read.snapshot.dp_rank == rank, read
        tally.add(read.status.label)

    def check_table(table: HotTable, dp_size: int) -> None:
        assert table.dp_size == dp_size
        assert {int(s) for s in table.status} <= {int(s) for s in SlotStatus}

    def target(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, pristine, 0)
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                offset = fdp.ConsumeIntInRange(0, len(pristine) - 1)
                os.pwrite(fd, fdp.ConsumeBytes(min(64, len(pristine) - offset)), offset)
        finally:
            os.close(fd)
        with ShmReader(instance, shm_dir=shm_dir, verify_each=True) as reader:
            try:
                reads = reader.read_all()
            except (SegmentUnavailableError, LayoutError):
                tally.add("segment_refused")
            else:
                # The header's dp_size rules (only a file too short for it is refused), so a
                # header rewritten to dp_size=1 hides rank 1: read(1) is then a UsageError.
                dp_size = len(reads)
                assert 1 <= dp_size <= DP_SIZE and reader.dp_size == dp_size
                if dp_size != DP_SIZE:
                    tally.add("dp_size_rewritten")
                for rank, read in enumerate(reads):
                    check(read, rank)
                for rank in range(DP_SIZE):
                    if rank < dp_size:
                        check(reader.read(rank), rank)
                    else:
                        try:
                            reader.read(rank)
                        except UsageError:
                            continue
                        raise AssertionError(f"read({rank}) beyond dp_size={dp_size}")
                for read in reader.read_changed():
                    check(read, read.rank)
                check_table(reader.hot_table(), dp_size)
        tally.input_done()

    return target


def _frame_target(shm_dir: str, tally: _Tally) -> Any:
    from loadsnap.collector import DROP_REASONS, Collector

    collector = Collector(
        FRAME_INSTANCE, DP_SIZE, "tcp://127.0.0.1:*", payload_capacity=CAPACITY, shm_dir=shm_dir
    )
    stats = collector.stats
    counted = ("relayed", *DROP_REASONS)

    def target(data: bytes) -> None:
        before = [getattr(stats, name) for name in counted]
        # The receive loop's per-frame step: size check, envelope, instance, snapshot decode,
        # rank/epoch/seq rules, relay.
        collector._handle(data, time.monotonic_ns())
        moved = [
            name for name, old in zip(counted, before, strict=True) if getattr(stats, name) != old
        ]
        assert len(moved) == 1 and getattr(stats, moved[0]) == before[counted.index(moved[0])] + 1
        tally.add(moved[0])
        tally.input_done()

    return target


def _main(argv: list[str]) -> None:
    atheris = importlib.import_module("atheris")
    name, shm_dir, summary, *libfuzzer_args = argv[1:]
    tally = _Tally(summary)
    with atheris.instrument_imports(include=["loadsnap"]):
        if name == "slot":
            target = _slot_target(atheris, shm_dir, tally)
        else:
            target = _frame_target(shm_dir, tally)
    atheris.Setup([argv[0], *libfuzzer_args], target)
    atheris.Fuzz()  # exits the process


# --- the tests --------------------------------------------------------------------------------


def _seed_corpus(directory: Path) -> None:
    # Valid frames (and near misses) for libFuzzer to mutate: msgpack is hard to hit at random.
    import msgspec

    from loadsnap import LoadSnapshot, MemorySection, QueueSection
    from loadsnap.frame import encode_frame

    frames = [
        LoadSnapshot(dp_rank=0, num_running_reqs=3, seq=1, epoch=1),
        LoadSnapshot(dp_rank=1, num_waiting_reqs=2, seq=5, epoch=2, token_usage=0.5),
        LoadSnapshot(dp_rank=1, seq=4, epoch=2, memory=MemorySection(weight_bytes=1 << 30)),
        LoadSnapshot(dp_rank=0, seq=9, epoch=1, queues=QueueSection(num_paused_reqs=1)),
        LoadSnapshot(dp_rank=7, seq=1, epoch=1),
    ]
    directory.mkdir()
    for i, snapshot in enumerate(frames):
        (directory / f"seed-{i}").write_bytes(encode_frame(FRAME_INSTANCE, snapshot))
    (directory / "seed-other-instance").write_bytes(encode_frame("other", frames[0]))
    (directory / "seed-bare").write_bytes(msgspec.msgpack.encode(frames[1]))
    hostile = {"instance": FRAME_INSTANCE, "snapshot": {"dp_rank": -1, "seq": "x"}}
    (directory / "seed-map").write_bytes(msgspec.msgpack.encode(hostile))
    (directory / "seed-envelope").write_bytes(msgspec.msgpack.encode({"instance": 7}))
    (directory / "seed-oversized").write_bytes(b"\x80" * (CAPACITY + 100))


def _fuzz(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir(mode=0o700)
    summary = tmp_path / "summary.json"
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    args = [
        sys.executable,
        __file__,
        name,
        str(shm_dir),
        str(summary),
        f"-runs={RUNS}",
        f"-seed={SEED}",
        f"-artifact_prefix={crashes}/",
        "-timeout=10",
        "-rss_limit_mb=1024",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    assert done is not None and int(done.group(1)) >= RUNS, proc.stderr[-2000:]
    counts: dict[str, Any] = json.loads(summary.read_text())
    assert counts["inputs"] >= RUNS
    return {"runs": int(done.group(1)), "seconds": round(elapsed, 1), "seed": SEED, **counts}


@needs_atheris
def test_atheris_slot_bytes_only_documented_outcomes(tmp_path: Path) -> None:
    from tests.helpers import report

    figures = _fuzz("slot", tmp_path)
    assert figures.get("segment_refused", 0) > 0 and figures.get("fresh", 0) > 0, figures
    report("atheris_slot", figures)


@needs_atheris
def test_atheris_zmq_frames_rejected_and_counted(tmp_path: Path) -> None:
    from tests.helpers import report

    corpus = tmp_path / "corpus"
    _seed_corpus(corpus)
    figures = _fuzz("frame", tmp_path, "-max_len=1024", str(corpus))
    expected = ("relayed", "undecodable", "invalid", "oversized", "wrong_instance")
    assert all(figures.get(name, 0) > 0 for name in expected), figures
    report("atheris_frame", figures)


if __name__ == "__main__":
    _main(sys.argv)
