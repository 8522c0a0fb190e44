"""``loadsnap.compat.sglang`` against sglang's contract: real segments, sockets and processes.

Every behaviour sglang's own unit tests check for its ``load_snapshot`` module (round trips over
SHM and ZMQ, several ranks, an empty reader, the latest snapshot winning, a writer that never
blocks without a reader, the ipc socket removed, the factories, reader ownership, addresses:
the ownership and address rules are in ``tests/unit/test_compat_sglang_rules.py``), written
here, plus what loadsnap adds: a rank that survives its writer's crash mid-write, frames of
another deployment dropped, and sglang's scheduler and DP controller loops across processes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadsnap import LoadSnapshot, MemorySection, QueueSection
from loadsnap.compat import sglang as compat

_TIMEOUT_S = 20.0


@pytest.fixture
def shm_path(tmp_path: Path) -> str:
    """A segment path as sglang's tests make them (a file name in a private directory)."""
    return str(tmp_path / "tmp_loads")


@pytest.fixture
def ipc_addr() -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="loadsnap_compat_", suffix=".sock")
    os.close(fd)
    os.unlink(path)
    yield f"ipc://{path}"
    if os.path.exists(path):
        os.unlink(path)


def _until(predicate: object, timeout_s: float = _TIMEOUT_S) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _warm_up(writers: list[compat.ZmqLoadSnapshotWriter], reader: object) -> None:
    """Send until every writer's rank has reached the reader (ZMQ connects asynchronously)."""
    assert isinstance(reader, compat.ZmqShmLoadSnapshotReader)

    def arrived() -> bool:
        for writer in writers:
            writer.write(LoadSnapshot(dp_rank=writer.dp_rank, timestamp=-1.0))
        return all(reader.read(writer.dp_rank) is not None for writer in writers)

    _until(arrived)


# --- shared memory ------------------------------------------------------------------------------


def test_shm_round_trip_keeps_every_sglang_field(shm_path: str) -> None:
    writer = compat.ShmLoadSnapshotWriter(shm_path, dp_size=1, dp_rank=0)
    reader = compat.ShmLoadSnapshotReader(shm_path, dp_size=1)
    try:
        assert reader.read(0) == reader.read_all()[0]  # the writer published an empty one
        writer.write(
            LoadSnapshot(
                dp_rank=0,
                num_running_reqs=5,
                timestamp=1.0,
                num_active_tokens=4096,
                total_prefill_uncached_tokens=1000,
                total_prefill_busy_us=250_000,
                decode_moments=[2, 30, 3000, 500, 50_000, 60],
                memory=MemorySection(weight_bytes=1 << 30),
                queues=QueueSection(num_grammar_queue_reqs=2),
            )
        )
        load = reader.read(0)
        assert load is not None
        assert (load.num_running_reqs, load.timestamp, load.num_active_tokens) == (5, 1.0, 4096)
        assert (load.total_prefill_uncached_tokens, load.total_prefill_busy_us) == (
            1000,
            250_000,
        )
        assert load.decode_moments == [2, 30, 3000, 500, 50_000, 60]
        assert load.memory is not None and load.memory.weight_bytes == 1 << 30
        assert load.queues is not None and load.queues.num_grammar_queue_reqs == 2
    finally:
        reader.close()
        writer.close()
    assert not os.listdir(os.path.dirname(shm_path))  # the last writer removed the segment


def test_multi_rank_read_all_in_rank_order(shm_path: str) -> None:
    writers = [compat.ShmLoadSnapshotWriter(shm_path, 4, rank) for rank in (2, 0, 3, 1)]
    try:
        for writer in writers:
            writer.write(LoadSnapshot(dp_rank=writer.dp_rank, num_running_reqs=writer.dp_rank * 10))
        reader = compat.ShmLoadSnapshotReader(shm_path, dp_size=4)
        loads = reader.read_all()
        assert [load.dp_rank for load in loads] == [0, 1, 2, 3]
        assert [load.num_running_reqs for load in loads] == [0, 10, 20, 30]
        reader.close()
    finally:
        for writer in writers:
            writer.close()


def test_empty_reader_and_other_dp_size(shm_path: str, caplog: pytest.LogCaptureFixture) -> None:
    reader = compat.ShmLoadSnapshotReader(shm_path, dp_size=2)
    assert reader.read_all() == [] and reader.read(0) is None and reader.read(5) is None
    writer = compat.ShmLoadSnapshotWriter(shm_path, dp_size=3, dp_rank=1)
    try:
        assert reader.read_all() == [] and reader.read(1) is None  # sglang: header mismatch
        assert reader.read_all() == []
        warnings = [r for r in caplog.records if "expects 2" in r.getMessage()]
        assert len(warnings) == 1  # said once
    finally:
        writer.close()
        reader.close()


def test_writer_refuses_what_readers_would_and_keeps_the_slot(shm_path: str) -> None:
    writer = compat.ShmLoadSnapshotWriter(shm_path, dp_size=2, dp_rank=1)
    reader = compat.ShmLoadSnapshotReader(shm_path, dp_size=2)
    try:
        writer.write(LoadSnapshot(dp_rank=1, num_waiting_reqs=3))
        with pytest.raises(ValueError, match="dp_rank"):
            writer.write(LoadSnapshot(dp_rank=0))
        with pytest.raises(ValueError, match=r"\$\.cache_hit_rate"):
            writer.write(LoadSnapshot(dp_rank=1, cache_hit_rate=1.5))
        load = reader.read(1)
        assert load is not None and load.num_waiting_reqs == 3
        with pytest.raises(ValueError, match="invalid dp_rank=2"):
            compat.ShmLoadSnapshotWriter(shm_path, dp_size=2, dp_rank=2)
    finally:
        reader.close()
        writer.close()


# --- ZMQ ----------------------------------------------------------------------------------------


def test_zmq_ranks_reach_the_segment_and_the_latest_wins(shm_path: str, ipc_addr: str) -> None:
    reader = compat.ZmqShmLoadSnapshotReader(ipc_addr, shm_path, dp_size=3)
    writers = [compat.ZmqLoadSnapshotWriter(ipc_addr, 3, rank) for rank in range(3)]
    try:
        _warm_up(writers, reader)
        for i in range(10):
            for writer in writers:
                writer.write(
                    LoadSnapshot(dp_rank=writer.dp_rank, num_running_reqs=i, timestamp=float(i))
                )

        def latest() -> bool:
            loads = reader.read_all()
            return len(loads) == 3 and all(load.num_running_reqs == 9 for load in loads)

        _until(latest)
        assert [load.timestamp for load in reader.read_all()] == [9.0, 9.0, 9.0]
        # Another process reading plain SHM sees the same (the tokenizer side in sglang).
        other = compat.ShmLoadSnapshotReader(shm_path, dp_size=3)
        assert [load.num_running_reqs for load in other.read_all()] == [9, 9, 9]
        other.close()
    finally:
        for writer in writers:
            writer.close()
        reader.close()


def test_writer_never_blocks_without_a_reader(ipc_addr: str) -> None:
    writer = compat.ZmqLoadSnapshotWriter(ipc_addr, dp_size=1, dp_rank=0)
    started = time.monotonic()
    for _ in range(1000):
        writer.write(LoadSnapshot(dp_rank=0, num_running_reqs=1))
    writer.close()
    assert time.monotonic() - started < _TIMEOUT_S  # would hang forever if a send blocked


def test_reader_close_removes_its_ipc_socket_and_segment(shm_path: str, ipc_addr: str) -> None:
    reader = compat.ZmqShmLoadSnapshotReader(ipc_addr, shm_path, dp_size=1)
    ipc_path = ipc_addr[len("ipc://") :]
    assert os.path.exists(ipc_path)
    assert reader.fileno() >= 0
    reader.poll()
    reader.close()
    assert not os.path.exists(ipc_path)
    assert not os.listdir(os.path.dirname(shm_path))


def test_frames_for_another_endpoint_are_dropped(
    shm_path: str, ipc_addr: str, tmp_path: Path
) -> None:
    # A writer configured for another deployment's endpoint name but connected here.
    reader = compat.ZmqShmLoadSnapshotReader(ipc_addr, shm_path, dp_size=1)
    stray = compat.ZmqLoadSnapshotWriter(f"ipc://{tmp_path}/elsewhere.sock", 1, 0)
    from loadsnap.zmq_writer import ZmqWriter

    wrong = ZmqWriter(ipc_addr, 1, 0, instance="another-deployment")

    def dropped() -> bool:
        wrong.publish(LoadSnapshot(dp_rank=0))
        return reader.collector.stats.wrong_instance > 0

    try:
        _until(dropped)
        assert reader.read(0) is None  # nothing relayed
    finally:
        wrong.close()
        stray.close()
        reader.close()


# --- factories ----------------------------------------------------------------------------------


def _server_args(**overrides: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "enable_dp_attention": False,
        "nnodes": 1,
        "dp_size": 1,
        "load_balance_method": "round_robin",
        "node_rank": 0,
        "tokenizer_worker_num": 1,
    }
    base.update(overrides)
    return SimpleNamespace(**base)


def test_factory_shm_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", raising=False)
    port_args = SimpleNamespace(instance_id=f"compat-shm-{os.getpid()}")
    writer = compat.create_load_snapshot_writer(_server_args(), port_args, 1, 0, 15)
    assert isinstance(writer, compat.ShmLoadSnapshotWriter)
    assert (writer.publish_interval, writer.publish_counter) == (15, 0)
    reader = compat.create_load_snapshot_reader(_server_args(), port_args, "TokenizerManager")
    assert isinstance(reader, compat.ShmLoadSnapshotReader)
    assert [load.dp_rank for load in reader.read_all()] == [0]
    reader.close()
    writer.close()
    directory, instance = compat.instance_for_path(compat.shm_path_for(port_args.instance_id))
    assert not os.path.exists(os.path.join(directory, f"loadsnap-{instance}"))


def test_factory_zmq_mode_via_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", "1")
    port_args = SimpleNamespace(instance_id=f"compat-zmq-{os.getpid()}")
    writer = compat.create_load_snapshot_writer(_server_args(), port_args, 1, 0)
    reader = compat.create_load_snapshot_reader(_server_args(), port_args, "TokenizerManager")
    try:
        assert isinstance(writer, compat.ZmqLoadSnapshotWriter)
        assert isinstance(reader, compat.ZmqShmLoadSnapshotReader)
        _warm_up([writer], reader)
    finally:
        reader.close()
        writer.close()


# --- what loadsnap adds -------------------------------------------------------------------------

_CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from loadsnap import LoadSnapshot
    from loadsnap.compat.sglang import ShmLoadSnapshotWriter
    writer = ShmLoadSnapshotWriter(sys.argv[1], 2, 1)
    writer.write(LoadSnapshot(dp_rank=1, num_running_reqs=42, timestamp=1.0))
    print("written", flush=True)
    i = 0
    while True:  # killed at some point of some write
        i += 1
        writer.write(LoadSnapshot(dp_rank=1, num_running_reqs=42, timestamp=float(i)))
    """
)


def test_a_writer_killed_mid_write_keeps_its_rank(shm_path: str) -> None:
    # sglang's scheme stores length 0 before copying: a writer killed then leaves the rank
    # absent from every read_all until it writes again. Here the last complete record stays.
    keeper = compat.ShmLoadSnapshotWriter(shm_path, 2, 0)  # keeps the segment alive
    reader = compat.ShmLoadSnapshotReader(shm_path, 2)
    try:
        for _ in range(5):
            with subprocess.Popen(
                [sys.executable, "-c", _CRASHING_WRITER, shm_path], stdout=subprocess.PIPE
            ) as proc:
                assert proc.stdout is not None and proc.stdout.readline() == b"written\n"
                time.sleep(0.02)  # mid-stream of writes
                proc.send_signal(signal.SIGKILL)
                proc.wait(_TIMEOUT_S)
            loads = reader.read_all()
            assert [load.dp_rank for load in loads] == [0, 1]
            assert loads[1].num_running_reqs == 42
            status = reader.loadsnap_reader.read(1).status
            assert status.label in ("fresh", "dead")  # dead once past the probe age
    finally:
        reader.close()
        keeper.close()


_SCHEDULER_LOOP = textwrap.dedent(
    """
    import sys, time
    from loadsnap import LoadSnapshot
    from loadsnap.compat.sglang import ShmLoadSnapshotWriter
    path, rank, cycles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writer = ShmLoadSnapshotWriter(path, 2, rank, publish_interval=15)

    def publish_load_snapshot(running, force=False):  # sglang's Scheduler method, verbatim
        if not force:
            writer.publish_counter += 1
            if writer.publish_counter < writer.publish_interval:
                return
        writer.publish_counter = 0
        writer.write(LoadSnapshot(dp_rank=rank, num_running_reqs=running,
                                  num_total_tokens=running * 100, timestamp=time.time()))

    publish_load_snapshot(0, force=True)  # idle
    for cycle in range(cycles):
        if cycle % 50 == 0:
            publish_load_snapshot(cycle, force=True)  # a prefill batch
        else:
            publish_load_snapshot(cycle)  # a decode cycle
        time.sleep(0.001)
    publish_load_snapshot(cycles, force=True)  # idle again
    print("done", flush=True)
    sys.stdin.read()
    writer.close()
    """
)


class _SglangDPBudget:
    """sglang's DP controller's budget, as its data_parallel_controller uses the module."""

    def __init__(self, dp_size: int) -> None:
        self.total_requests = [0] * dp_size
        self.total_tokens = [0] * dp_size
        self.last_timestamp = [0.0] * dp_size
        self.updates = 0

    def update_budget(self, loads: list[LoadSnapshot]) -> None:
        for load in loads:
            if load.timestamp == self.last_timestamp[load.dp_rank]:
                continue
            self.last_timestamp[load.dp_rank] = load.timestamp
            self.total_requests[load.dp_rank] = load.num_running_reqs + load.num_waiting_reqs
            self.total_tokens[load.dp_rank] = load.num_total_tokens
            self.updates += 1

    def dispatch(self) -> int:
        target = self.total_requests.index(min(self.total_requests))
        self.total_requests[target] += 1
        return target


def test_sglang_scheduler_and_controller_loops_across_processes(shm_path: str) -> None:
    cycles = 600
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCHEDULER_LOOP, shm_path, str(rank), str(cycles)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    budget = _SglangDPBudget(2)
    last_refresh = 0.0
    refreshes = 0
    picks = [0, 0]
    done: set[int] = set()
    reader = compat.ShmLoadSnapshotReader(shm_path, 2)  # may start before any writer
    try:
        deadline = time.monotonic() + _TIMEOUT_S * 3
        while len(done) < 2:
            assert time.monotonic() < deadline, "scheduler loops did not finish"
            now = time.perf_counter()  # refresh_load_budget: at most once per 20 ms
            if now - last_refresh >= 0.02:
                last_refresh = now
                budget.update_budget(reader.read_all())
                refreshes += 1
            picks[budget.dispatch()] += 1
            done.update(rank for rank, proc in enumerate(procs) if _printed_done(proc))
            time.sleep(0.001)
        loads = reader.read_all()
        budget.update_budget(loads)
        # Every rank's final, forced publish (``cycles`` running requests) was seen.
        assert [load.num_running_reqs for load in loads] == [cycles, cycles]
        assert budget.total_tokens == [cycles * 100, cycles * 100]
        assert refreshes > 10 and budget.updates >= 4
        assert min(picks) > 0  # both ranks got work
    finally:
        reader.close()
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(_TIMEOUT_S)
            if proc.stdout is not None:
                proc.stdout.close()


def _printed_done(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a scheduler loop has printed "done" (never blocks)."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 0)
    return bool(readable) and proc.stdout.readline() == b"done\n"
