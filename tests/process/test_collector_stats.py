"""The collector's stats file: its diagram, its evolution rule, writing and reading it, and
``/metrics`` of ``loadsnap serve`` (another process) showing a ``loadsnap collector``'s drops."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from loadsnap import LayoutError, LoadSnapshot, LoraSection, TransportError
from loadsnap import collector_stats as cs
from loadsnap.collector import Collector, collector_lock_path
from loadsnap.collector_stats import (
    CollectorStats,
    CollectorStatsFile,
    collector_stats_path,
    read_collector_stats,
)
from loadsnap.frame import encode_frame
from tests.helpers import free_port, loadsnap_command, report, stop_process, wait_until

WAIT_S = 15.0
_SIZES = {"u32": 4, "u64": 8}
_ROW_RE = re.compile(r"^\s*(\d+) \+[-+]+\+\s*$")
_CELL_RE = re.compile(r'^(\w+)\s+(?:"[^"]*"\s+)?(u32|u64)\b')
_OFFSETS = {
    "magic": cs.MAGIC_OFFSET,
    "layout_version": cs.LAYOUT_VERSION_OFFSET,
    "counter_count": cs.COUNTER_COUNT_OFFSET,
    "collector_pid": cs.COLLECTOR_PID_OFFSET,
    "started_wall_ns": cs.STARTED_WALL_NS_OFFSET,
}
# The file's counter order. Append only: a new counter goes last, none moves or goes away.
PINNED_ORDER = (
    "received",
    "relayed",
    "oversized",
    "undecodable",
    "invalid",
    "wrong_instance",
    "rank_out_of_range",
    "rank_not_allowed",
    "stale_epoch",
    "out_of_order",
    "relay_errors",
    "epoch_takeovers",
    "connections",
    "disconnects",
    "handshakes",
    "auth_rejected",
    "handshake_failed",
)


def _diagram() -> tuple[list[tuple[str, str, int]], list[int]]:
    doc = cs.__doc__
    assert doc is not None
    fields: list[tuple[str, str, int]] = []
    rows: list[int] = []
    cursor = -1
    for line in doc.splitlines():
        match = _ROW_RE.match(line)
        if match:
            row = int(match.group(1))
            if cursor >= 0:
                assert cursor == row, f"cells end at {cursor}, next row says {row}"
            rows.append(row)
            cursor = row
            continue
        if "|" not in line or (cursor < 0 and not rows):
            continue
        for cell in line.split("|")[1:-1]:
            cell_match = _CELL_RE.match(cell.strip())
            if cell_match is None:
                cursor = -1  # untyped filler: runs to the next row
                continue
            name, kind = cell_match.groups()
            fields.append((name, kind, cursor))
            cursor += _SIZES[kind]
    return fields, rows


def test_diagram_matches_offsets_and_struct() -> None:
    fields, rows = _diagram()
    assert [name for name, _, _ in fields] == list(_OFFSETS)
    previous_offset, previous_size = 0, 0
    for name, kind, offset in fields:
        assert offset == _OFFSETS[name] == previous_offset + previous_size, name
        previous_offset, previous_size = offset, _SIZES[kind]
    assert previous_offset + previous_size == cs.HEADER_FIELDS_END == cs.HEADER_STRUCT.size
    assert rows[-1] == cs.COUNTERS_OFFSET
    codes = {"I": "u32", "Q": "u64"}
    assert [codes[c] for c in cs.HEADER_STRUCT.format[1:]] == [kind for _, kind, _ in fields]
    assert cs.MAGIC_OFFSET % 8 == 0 and cs.COUNTERS_OFFSET % 8 == 0  # aligned 8-byte stores


def test_counter_order_is_append_only() -> None:
    assert CollectorStats.__struct_fields__[: len(PINNED_ORDER)] == PINNED_ORDER
    assert set(cs.DROP_REASONS) <= set(PINNED_ORDER)
    assert set(cs.HANDSHAKE_FAILURES) <= set(PINNED_ORDER)


@pytest.fixture
def stats_dir(tmp_path: Path) -> str:
    directory = tmp_path / "shm"
    directory.mkdir(mode=0o700)
    return str(directory)


def test_write_read_close(stats_dir: str) -> None:
    path = collector_stats_path("inst", stats_dir)
    assert path == os.path.join(stats_dir, "loadsnap-inst.collector.stats")
    assert read_collector_stats("inst", stats_dir) is None  # no collector
    written = CollectorStatsFile(path, 4242, 1_700_000_000_000_000_000)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        stats = CollectorStats(received=10, relayed=7, wrong_instance=2, handshake_failed=1)
        written.store(stats)
        read = read_collector_stats("inst", stats_dir)
        assert read is not None
        assert read.stats == stats and read.stats.dropped == 2
        assert read.pid == 4242 and read.started_wall_ns == 1_700_000_000_000_000_000
        stats.received += 5
        written.store(stats)
        again = read_collector_stats("inst", stats_dir)
        assert again is not None and again.stats.received == 15
    finally:
        written.close()
        written.close()  # idempotent
    assert not os.path.exists(path)
    assert read_collector_stats("inst", stats_dir) is None


def test_dead_collectors_file_is_replaced(stats_dir: str) -> None:
    path = collector_stats_path("inst", stats_dir)
    Path(path).write_bytes(b"left by a SIGKILLed collector".ljust(200, b"\0"))
    os.chmod(path, 0o600)
    fresh = CollectorStatsFile(path, 1, 2)
    try:
        read = read_collector_stats("inst", stats_dir)
        assert read is not None and read.stats == CollectorStats() and read.pid == 1
    finally:
        fresh.close()


def _header(magic: int, version: int, count: int) -> bytes:
    head = cs.HEADER_STRUCT.pack(magic, version, count, 1, 2)
    return head.ljust(cs.COUNTERS_OFFSET, b"\0")


@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        (b"\0" * 8, None),  # created, not sized yet
        (_header(0, 1, 17) + b"\0" * 8 * 17, None),  # not ready: the magic comes last
        (_header(0x1234, 1, 17) + b"\0" * 8 * 17, "bad magic"),
        (_header(cs.STATS_MAGIC, 2, 17) + b"\0" * 8 * 17, "layout_version"),
        (_header(cs.STATS_MAGIC, 1, 40) + b"\0" * 8 * 17, "short stats file"),
        (_header(cs.STATS_MAGIC, 1, 2) + b"\0" * 8 * 2 + b"\0" * 3, "multiple of 8"),
    ],
)
def test_reader_says_why(stats_dir: str, data: bytes, outcome: str | None) -> None:
    path = collector_stats_path("inst", stats_dir)
    Path(path).write_bytes(data)
    os.chmod(path, 0o600)
    if outcome is None:
        assert read_collector_stats("inst", stats_dir) is None
    else:
        with pytest.raises(LayoutError, match=outcome):
            read_collector_stats("inst", stats_dir)


def test_older_file_with_fewer_counters(stats_dir: str) -> None:
    path = collector_stats_path("inst", stats_dir)
    Path(path).write_bytes(_header(cs.STATS_MAGIC, 1, 2) + struct.pack("<QQ", 9, 4))
    os.chmod(path, 0o600)
    read = read_collector_stats("inst", stats_dir)
    assert read is not None
    assert read.stats == CollectorStats(received=9, relayed=4)  # the rest reads as 0


def test_reader_refuses_files_not_ours(stats_dir: str, tmp_path: Path) -> None:
    path = collector_stats_path("inst", stats_dir)
    target = tmp_path / "elsewhere"
    target.write_bytes(_header(cs.STATS_MAGIC, 1, 0))
    os.symlink(target, path)
    with pytest.raises(TransportError, match="cannot open collector stats"):
        read_collector_stats("inst", stats_dir)
    os.unlink(path)
    Path(path).write_bytes(_header(cs.STATS_MAGIC, 1, 0))
    os.chmod(path, 0o644)
    with pytest.raises(TransportError, match="not ours"):
        read_collector_stats("inst", stats_dir)


def test_collector_keeps_its_file_current_and_removes_it(instance: str, stats_dir: str) -> None:
    collector = Collector(instance, 2, "tcp://127.0.0.1:*", shm_dir=stats_dir)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        push.connect(collector.endpoint)
        push.send(encode_frame("another-deployment", LoadSnapshot(dp_rank=0, seq=1, epoch=1)))
        push.send(encode_frame(instance, LoadSnapshot(dp_rank=1, seq=1, epoch=1)))

        def counted() -> bool:
            read = read_collector_stats(instance, stats_dir)
            return read is not None and read.stats.relayed == 1 and read.stats.wrong_instance == 1

        assert wait_until(counted, WAIT_S), collector.stats_dict()
        read = read_collector_stats(instance, stats_dir)
        assert read is not None and read.pid == os.getpid()
        push.close(linger=0)
    finally:
        context.term()
        collector.close()
    assert not os.path.exists(collector_stats_path(instance, stats_dir))
    assert read_collector_stats(instance, stats_dir) is None


# --- /metrics of `loadsnap serve`, a separate process from `loadsnap collector` --------------


def _cli(*args: str, shm_dir: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LOADSNAP_SHM_DIR": shm_dir}
    return subprocess.Popen(
        loadsnap_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def processes(instance: str, stats_dir: str) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        stop_process(proc, signal.SIGINT, 15.0)
    path = collector_lock_path(instance, stats_dir)
    if os.path.exists(path):
        os.unlink(path)


def _samples(url: str, name: str, label: str) -> dict[str, float]:
    text = httpx.get(url, timeout=5.0).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {sample.labels[label]: sample.value for sample in family.samples}
    return {}


def _value(url: str, name: str) -> float | None:
    text = httpx.get(url, timeout=5.0).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return float(family.samples[0].value)
    return None


def test_serve_metrics_show_a_separate_collectors_drops(
    instance: str, stats_dir: str, processes: list[subprocess.Popen[str]]
) -> None:
    collector_port, http_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{collector_port}"
    processes.append(
        _cli(
            "collector",
            *("--instance", instance, "--dp-size", "2", "--bind", endpoint),
            *("--stats-interval-s", "0", "--duration-s", "60"),
            shm_dir=stats_dir,
        )
    )
    processes.append(
        _cli("serve", "--instance", instance, "--port", str(http_port), shm_dir=stats_dir)
    )
    metrics = f"http://127.0.0.1:{http_port}/metrics"

    def up() -> bool:
        try:
            return _value(metrics, "loadsnap_collector_frames_received") is not None
        except httpx.HTTPError:
            return False

    assert wait_until(up, 20.0), [p.poll() for p in processes]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        push.connect(endpoint)
        push.send(encode_frame(instance, LoadSnapshot(dp_rank=0, seq=1, epoch=1)))
        push.send(encode_frame("other", LoadSnapshot(dp_rank=0, seq=2, epoch=1)))
        push.send(msgspec.msgpack.encode(LoadSnapshot(dp_rank=0)))  # no envelope: no instance
        # Above the slot's payload capacity (2048 B), below MAXMSGSIZE (64 KiB): oversized.
        lora = LoraSection(loaded_adapters=["a" * 100] * 30)
        push.send(encode_frame(instance, LoadSnapshot(dp_rank=1, seq=1, epoch=1, lora=lora)))
        huge = context.socket(zmq.PUSH)
        huge.setsockopt(zmq.LINGER, 0)
        huge.setsockopt(zmq.SNDTIMEO, 2000)
        huge.connect(endpoint)
        huge.send(b"\0" * 100_000)  # above MAXMSGSIZE: libzmq cuts this peer off

        def counted() -> bool:
            dropped = _samples(metrics, "loadsnap_collector_frames_dropped", "reason")
            disconnects = _value(metrics, "loadsnap_collector_disconnects") or 0
            return (
                dropped.get("wrong_instance") == 2.0
                and dropped.get("oversized") == 1.0
                and disconnects >= 1
            )

        assert wait_until(counted, 10.0), httpx.get(metrics).text
        push.close(linger=0)
        huge.close(linger=0)
    finally:
        context.term()
    text = httpx.get(metrics, timeout=5.0).text
    assert "# HELP loadsnap_collector_disconnects_total " in text
    help_line = next(line for line in text.splitlines() if "HELP loadsnap_collector_disc" in line)
    assert "MAXMSGSIZE" in help_line
    assert "# TYPE loadsnap_collector_frames_dropped_total counter" in text
    dropped = _samples(metrics, "loadsnap_collector_frames_dropped", "reason")
    relayed = _value(metrics, "loadsnap_collector_frames_relayed")
    assert relayed == 1.0
    report(
        "serve_metrics_collector",
        {
            "relayed": relayed,
            "dropped_wrong_instance": dropped["wrong_instance"],
            "dropped_oversized": dropped["oversized"],
            "disconnects": _value(metrics, "loadsnap_collector_disconnects"),
        },
    )
    collector_out = "".join(stop_process(processes[0], signal.SIGINT, 15.0))
    assert wait_until(lambda: _value(metrics, "loadsnap_collector_frames_received") is None, WAIT_S)
    assert "loadsnap collector" in collector_out
