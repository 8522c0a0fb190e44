"""Multi-process torn-read detector, with a control run that proves it sees tears.

One writer process per rank publishes at full speed; every record checks itself (every count
field, the cycle and the dispatch sequence equal the record's sequence, and the ratios and the
payload's length derive from it). Several reader processes read through ``read_all``,
``read_changed``, ``read`` and ``hot_table``, some forced onto the numpy paths of large
deployments (control table compared in numpy, moved ranks gathered and checked with one CRC
call), and count every accepted read that fails the self-check: there must be none. The
control run reads the same slots while the writers run, but copies a record straight out of
the segment without the sequence word or the CRC: the same self-check must then find tears, or
the detector proves nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest

from loadsnap import (
    HotTable,
    LoadSnapshot,
    LoraSection,
    ShmReader,
    ShmWriter,
    SlotStatus,
    WireError,
    decode_snapshot,
)
from loadsnap._location import SegmentLocation
from loadsnap._segment import open_readonly
from loadsnap._seqlock import records_intact
from loadsnap.layout import (
    HOT_FIELDS,
    HOT_STRUCT,
    RECORD_CRC_SIZE,
    RECORD_HEADER_SIZE,
    SegmentGeometry,
)
from tests.helpers import ROOT

_DP_SIZE = 2
_CAPACITY = 1024
_DURATION_S = 2.5
_CONTROL_DURATION_S = 2.0
# The slow variant runs this long; CI keeps the reduced default, a soak sets it higher.
_SLOW_DURATION_S = float(os.environ.get("LOADSNAP_TORN_READ_SECONDS", "4"))
_TIMEOUT_S = 60.0
# Integer hot fields that every record sets to its own sequence.
_COUNT_FIELDS = tuple(
    name for name, code in HOT_FIELDS if code == "Q" and name not in ("epoch", "publish_mono_ns")
)
# Payload-only fields that every record sets to its own sequence, or to _ratio(seq).
_PAYLOAD_COUNTS = ("num_waiting_uncached_tokens", "max_running_requests", "cycle")
_PAYLOAD_RATIOS = ("token_usage", "cache_hit_rate", "utilization")


_HOT_NAMES = tuple(name for name, _ in HOT_FIELDS)


def _ratio(k: int) -> float:
    return (k % 1000) / 1000


def _snapshot(rank: int, k: int) -> LoadSnapshot:
    """Record ``k`` of ``rank``: every field derives from ``k`` (see :func:`_hot_tear`)."""
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=k,
        num_waiting_reqs=k,
        num_waiting_uncached_tokens=k,
        num_used_tokens=k,
        num_total_tokens=k,
        max_total_num_tokens=k,
        max_running_requests=k,
        token_usage=_ratio(k),
        gen_throughput=float(k),
        cache_hit_rate=_ratio(k),
        utilization=_ratio(k),
        cycle=k,
        last_accepted_dispatch_seq=k,
        lora=LoraSection(loaded_adapters=[f"{k:x}"] * (k % 17)),
    )


def _hot_tear(values: dict[str, Any]) -> bool:
    """True when hot fields of one record do not all derive from its ``seq``."""
    k = int(values["seq"])
    if any(int(values[name]) != k for name in _COUNT_FIELDS):
        return True
    return float(values["gen_throughput"]) != float(k)


def _snapshot_tear(snapshot: LoadSnapshot, seq: int) -> bool:
    """True when a decoded snapshot is not wholly record ``seq``."""
    values = {name: getattr(snapshot, name) for name, _ in HOT_FIELDS}
    if snapshot.seq != seq or _hot_tear(values):
        return True
    if any(getattr(snapshot, name) != seq for name in _PAYLOAD_COUNTS):
        return True
    if any(getattr(snapshot, name) != _ratio(seq) for name in _PAYLOAD_RATIOS):
        return True
    return snapshot.lora != LoraSection(loaded_adapters=[f"{seq:x}"] * (seq % 17))


def _table_tears(table: HotTable) -> int:
    tears = 0
    for rank in np.flatnonzero(table.valid).tolist():
        values = {name: getattr(table, name)[rank] for name, _ in HOT_FIELDS}
        tears += _hot_tear(values)
    return tears


# --- child processes (run as ``python -c "from tests.process.test_torn_reads import ..."``) ---


def writer_main(instance: str, rank: int) -> None:
    """Publish self-checking records at full speed until stdin closes (a thread watches it)."""
    import threading

    stop = threading.Event()
    writer = ShmWriter(instance, _DP_SIZE, rank, payload_capacity=_CAPACITY)

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    k = 0
    while not stop.is_set():
        for _ in range(256):
            k += 1
            assert writer.publish(_snapshot(rank, k)) == k
    writer.close(unlink_if_last=False)
    print(json.dumps({"published": k}), flush=True)


def reader_main(instance: str, duration_s: float, verify_each: bool, numpy: bool = False) -> None:
    """Read through every protocol path for ``duration_s``; report accepted tears.

    ``numpy`` forces the ways of reading large deployments use (the control table compared in
    numpy, moved ranks gathered as rows and checked with one CRC call) at this small size.
    """
    counts = {"reads": 0, "accepted": 0, "tears": 0, "invalid": 0, "torn": 0, "tables": 0}
    seqs: set[int] = set()
    with ShmReader(instance, verify_each=verify_each) as reader:
        if numpy:
            reader._small_max = reader._gather_min = 0
        deadline = time.monotonic() + duration_s
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            if turn % 3 == 2:
                table = reader.hot_table()
                counts["tables"] += 1
                counts["tears"] += _table_tears(table)
                counts["torn"] += int((table.status == SlotStatus.TORN).sum())
                seqs.update(table.seq[table.valid].tolist())
                continue
            if turn % 3 == 0:
                reads = reader.read_all()
            else:
                reads = [*reader.read_changed(), reader.read(turn % _DP_SIZE)]
            for read in reads:
                counts["reads"] += 1
                if read.status is SlotStatus.INVALID:
                    counts["invalid"] += 1  # a tear that decoded badly
                elif read.status is SlotStatus.TORN:
                    counts["torn"] += 1  # retries exhausted: nothing accepted
                elif read.snapshot is not None:
                    counts["accepted"] += 1
                    counts["tears"] += _snapshot_tear(read.snapshot, read.seq)
                    seqs.add(read.seq)
        counts["crc_rejects"] = reader.stats.crc_rejects
        counts["retries"] = reader.stats.retries
    counts["distinct_seqs"] = len(seqs)
    print(json.dumps(counts), flush=True)


def control_main(instance: str, duration_s: float) -> None:
    """Copy records out of both copies of every slot with no sequence word and no CRC check."""
    segment = open_readonly(SegmentLocation(instance))
    geometry = SegmentGeometry(segment.header.dp_size, segment.header.payload_capacity)
    counts = {"reads": 0, "tears": 0, "undecodable": 0, "crc_missed": 0}
    buf = segment.buf
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        for rank in range(geometry.dp_size):
            for copy in (0, 1):
                base = geometry.copy_offset(rank, copy)
                # Header, then its parsed hot record and length, then the payload: as the
                # protocol's reader copies a record, but with no sequence word around it and no CRC.
                header = bytes(buf[base : base + RECORD_HEADER_SIZE])
                hot = dict(zip(_HOT_NAMES, HOT_STRUCT.unpack_from(header, 8), strict=True))
                length = int.from_bytes(header[4:8], "little")
                if length == 0 or length > geometry.payload_capacity:
                    continue
                start = base + RECORD_HEADER_SIZE
                payload = bytes(buf[start : start + length])
                record = (
                    header + payload + bytes(buf[start + length : start + length + RECORD_CRC_SIZE])
                )
                counts["reads"] += 1
                try:
                    torn = _hot_tear(hot) or _snapshot_tear(decode_snapshot(payload), hot["seq"])
                except WireError:
                    torn = True
                    counts["undecodable"] += 1
                counts["tears"] += torn
                crc_ok = records_intact(record)
                counts["crc_missed"] += torn and crc_ok  # a tear the CRC would have let through
    buf.release()
    segment.close()
    print(json.dumps(counts), flush=True)


# --- orchestration ------------------------------------------------------------------------


def _spawn(call: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    code = f"import sys; from tests.process.test_torn_reads import {call.split('(')[0]}; {call}"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, int]:
    """Wait for ``proc`` (closing its stdin, which stops a writer) and parse its JSON line."""
    out, err = proc.communicate(timeout=_TIMEOUT_S)
    assert proc.returncode == 0, err
    parsed: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return parsed


def _running_writers(stack: ExitStack, instance: str) -> list[subprocess.Popen[str]]:
    """One full-speed writer process per rank, stopped (stdin closed) when ``stack`` exits."""
    writers = []
    for rank in range(_DP_SIZE):
        proc = _spawn("writer_main(sys.argv[1], int(sys.argv[2]))", instance, str(rank), stdin=True)
        stack.callback(_stop, proc)
        writers.append(proc)
    for proc in writers:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr
    return writers


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _finish_writers(writers: list[subprocess.Popen[str]]) -> list[int]:
    published = []
    for proc in writers:
        published.append(_result(proc)["published"])
    return published


def _protocol_run(instance: str, duration_s: float, verify_each: tuple[str, ...]) -> None:
    # Each reader's flag: "1" checks each record's CRC alone; a trailing "n" forces numpy.
    with ExitStack() as stack:
        writers = _running_writers(stack, instance)
        readers = [
            _spawn(
                "reader_main(sys.argv[1], float(sys.argv[2]), sys.argv[3][0] == '1', "
                "sys.argv[3].endswith('n'))",
                instance,
                str(duration_s),
                flag,
            )
            for flag in verify_each
        ]
        for proc in readers:
            stack.callback(_stop, proc)
        results = [_result(proc) for proc in readers]
        published = _finish_writers(writers)
    assert all(count > 1000 for count in published), published  # the writers really ran
    for result in results:
        assert result["tears"] == 0, result
        assert result["invalid"] == 0, result
        assert result["accepted"] > 0 and result["tables"] > 0, result
        assert result["distinct_seqs"] > 10, result  # it read while the slots moved


def _control_run(instance: str, duration_s: float) -> None:
    with ExitStack() as stack:
        writers = _running_writers(stack, instance)
        control = _spawn("control_main(sys.argv[1], float(sys.argv[2]))", instance, str(duration_s))
        stack.callback(_stop, control)
        result = _result(control)
        _finish_writers(writers)
    assert result["reads"] > 1000, result
    assert result["tears"] > 0, result  # the detector sees tears when the protocol is bypassed
    assert result["crc_missed"] == 0, result  # and the CRC flags every one of them


def test_protocol_readers_accept_no_tears(instance: str) -> None:
    _protocol_run(instance, _DURATION_S, ("0", "0n", "1n"))


def test_control_run_without_the_protocol_sees_tears(instance: str) -> None:
    _control_run(instance, _CONTROL_DURATION_S)


@pytest.mark.slow
def test_protocol_readers_accept_no_tears_long(instance: str) -> None:
    _protocol_run(instance, _SLOW_DURATION_S, ("0", "0", "1", "0n", "1n"))


def test_self_check_flags_mixed_records() -> None:
    a, b = _snapshot(0, 5), _snapshot(0, 6)
    a.seq, b.seq = 5, 6
    values = {name: getattr(a, name) for name, _ in HOT_FIELDS}
    assert not _hot_tear(values) and not _snapshot_tear(a, 5)
    assert _hot_tear({**values, "num_used_tokens": 6})
    assert _hot_tear({**values, "gen_throughput": math.nextafter(5.0, 6.0)})
    a.utilization = math.nextafter(_ratio(5), 1.0)
    assert _snapshot_tear(a, 5)  # a payload-only field from another record
    a.utilization, a.cycle = _ratio(5), 6
    assert _snapshot_tear(a, 5)
    a.cycle = 5
    assert _snapshot_tear(b, 5)  # a payload of another record under this sequence
    assert _snapshot_tear(LoadSnapshot(**{**a.to_dict(), "lora": LoraSection()}), 5)
