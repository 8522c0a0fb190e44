"""``Collector``: writer processes over tcp://127.0.0.1 into the local segment; bad input counted.

Writers run as separate processes (``tests.helpers.WRITER_SCRIPT``), killed in ``finally``; the
collector runs in the test process. Every wait is bounded and polls a condition.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from typing import Any

import msgspec
import pytest
import zmq

from loadsnap import LoadSnapshot, ShmReader, ShmWriter, SlotStatus
from loadsnap.collector import Collector, collector_lock_path
from loadsnap.errors import TransportError
from loadsnap.frame import encode_frame
from tests.helpers import (
    loadsnap_command,
    read_segment,
    report,
    running_reqs,
    spawn_writer,
    stop_writers,
    wait_until,
)

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
WAIT_S = 10.0


def raw_push(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    """A plain PUSH socket for hand-made frames."""
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    sock.connect(endpoint)
    return sock


def frame(instance: str, **fields: Any) -> bytes:
    """A frame for ``instance`` whose snapshot is a msgpack map not checked against the schema
    (so it can break it)."""
    return msgspec.msgpack.encode({"instance": instance, "snapshot": fields})


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_latest_per_rank_after_bursts(instance: str) -> None:
    burst = 2000
    remote = (1, 2, 3)
    local = ShmWriter(instance, 4, 0)  # a same-node rank shares the segment with relayed ones
    collector = Collector(instance, 4, LOOPBACK_ANY_PORT)
    procs = [spawn_writer(instance, collector.endpoint, 4, rank, "burst", burst) for rank in remote]
    try:
        local.publish(LoadSnapshot(dp_rank=0, num_running_reqs=7))
        reader = ShmReader(instance)
        expected = {rank: burst for rank in remote}
        assert wait_until(lambda: running_reqs(reader, remote) == expected, WAIT_S), (
            running_reqs(reader, remote),
            collector.stats_dict(),
        )
        reads = reader.read_all()
        assert [r.status for r in reads] == [SlotStatus.FRESH] * 4
        assert reads[0].snapshot is not None and reads[0].snapshot.num_running_reqs == 7
        latest = collector.latest()
        assert sorted(latest) == list(remote)
        assert all(latest[rank].num_running_reqs == burst for rank in remote)
        stats = collector.stats
        assert stats.out_of_order == 0 and stats.stale_epoch == 0 and stats.undecodable == 0
        assert stats.relayed <= stats.received
        assert stats.handshakes >= len(remote)
        reader.close()
    finally:
        stop_writers(procs)
        collector.close()
        local.close()


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_collector_restart_while_writers_run(instance: str) -> None:
    remote = (0, 1, 2)
    first = Collector(instance, 3, LOOPBACK_ANY_PORT)
    endpoint = first.endpoint  # rebind the same port after the restart
    procs = [spawn_writer(instance, endpoint, 3, rank, "stream", 5) for rank in remote]
    second: Collector | None = None
    try:
        reader = ShmReader(instance, stale_after_s=0.5)

        def all_fresh() -> bool:
            reads = read_segment(reader)
            return len(reads) == 3 and all(r.status is SlotStatus.FRESH for r in reads)

        assert wait_until(all_fresh, WAIT_S), first.stats_dict()
        before = running_reqs(reader, remote)
        first.close()  # the collector was the segment's only writer: the segment goes away
        assert wait_until(lambda: not read_segment(reader), 2.0)
        second = Collector(instance, 3, endpoint)
        assert wait_until(all_fresh, WAIT_S), second.stats_dict()
        after = running_reqs(reader, remote)
        assert all(after[rank] > before[rank] for rank in remote), (before, after)
        assert second.stats.relayed > 0 and second.stats.handshakes >= len(remote)
        reader.close()
    finally:
        results = stop_writers(procs)
        first.close()
        if second is not None:
            second.close()
    assert all(r.get("slowest_ns", 10**12) < 100_000_000 for r in results), results


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_bad_frames_dropped_and_counted_while_good_peer_flows(instance: str) -> None:
    capacity = 1024
    collector = Collector(
        instance, 2, LOOPBACK_ANY_PORT, payload_capacity=capacity, max_message_bytes=4096
    )
    good = spawn_writer(instance, collector.endpoint, 2, 0, "stream", 5)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        reader = ShmReader(instance)
        assert wait_until(lambda: 0 in running_reqs(reader, (0,)), WAIT_S), collector.stats_dict()
        bad = raw_push(context, collector.endpoint)
        bad.send(b"\xc1 not msgpack")
        bad.send(b"\xff" * 10)  # msgpack (a small int), but not a snapshot: invalid
        bad.send_multipart([frame(instance, dp_rank=1), b"tail"])
        bad.send(frame(instance, dp_rank=1, token_usage=2.0))
        bad.send(frame(instance, dp_rank=1, num_running_reqs=-3))
        bad.send(frame(instance, dp_rank=7, seq=1, epoch=1))
        bad.send(b"\x80" * (capacity + 100))  # above the payload capacity, below MAXMSGSIZE
        huge = raw_push(context, collector.endpoint)
        huge.send(b"\x00" * 100_000)  # above MAXMSGSIZE: libzmq cuts this peer off

        def all_counted() -> bool:
            s = collector.stats
            return (
                s.undecodable >= 2
                and s.invalid >= 3
                and s.rank_out_of_range >= 1
                and s.oversized >= 1
                and s.disconnects >= 1
            )

        assert wait_until(all_counted, WAIT_S), collector.stats_dict()
        mark = running_reqs(reader, (0,))[0]
        assert wait_until(lambda: running_reqs(reader, (0,))[0] > mark + 5, WAIT_S), (
            "good peer stalled"
        )
        assert collector.running
        assert 1 not in collector.latest()  # nothing bad reached rank 1
        assert read_segment(reader)[1].status is SlotStatus.NEVER_PUBLISHED
        assert collector.stats_dict()["dropped"] == collector.stats.dropped >= 7
        reasons = collector.dropped_by_reason()
        assert reasons[("undecodable",)] >= 2 and reasons[("oversized",)] >= 1
        reader.close()
    finally:
        stop_writers([good])
        context.destroy(linger=0)
        collector.close()


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_wrong_instance_dropped_counted_and_logged(
    instance: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loadsnap.collector")
    collector = Collector(instance, 2, LOOPBACK_ANY_PORT, warn_interval_s=3600.0)
    # A writer process configured for another deployment, sharing the collector's address.
    stranger = spawn_writer("other-deployment", collector.endpoint, 2, 0, "stream", 5)
    good = spawn_writer(instance, collector.endpoint, 2, 1, "stream", 5)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = raw_push(context, collector.endpoint)
        # A writer from before the envelope: a bare snapshot, no instance at all.
        push.send(msgspec.msgpack.encode(LoadSnapshot(dp_rank=0, num_running_reqs=99)))
        reader = ShmReader(instance)

        def settled() -> bool:
            return collector.stats.wrong_instance >= 20 and 1 in running_reqs(reader, (1,))

        assert wait_until(settled, WAIT_S), collector.stats_dict()
        assert 0 not in collector.latest()  # nothing of the stranger's reached the segment
        assert read_segment(reader)[0].status is SlotStatus.NEVER_PUBLISHED
        assert collector.dropped_by_reason()[("wrong_instance",)] >= 20
        reader.close()
    finally:
        results = stop_writers([stranger, good])
        context.destroy(linger=0)
        collector.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "loadsnap.collector"]
    # One warning per peer and instance found, however many frames (rate-limited).
    serves = f"this collector serves instance={instance!r}"
    assert sorted(warnings) == [
        f"dropped frames from 127.0.0.1: instance='other-deployment', {serves}",
        f"dropped frames from 127.0.0.1: no instance, {serves}",
    ], warnings
    report(
        "zmq_wrong_instance",
        {
            "stranger_sent": results[0].get("sent"),
            "wrong_instance_dropped": collector.stats.wrong_instance,
            "relayed_from_stranger": 0,
            "warnings": len(warnings),
        },
    )


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_seq_and_epoch_rules(instance: str) -> None:
    collector = Collector(instance, 2, LOOPBACK_ANY_PORT, epoch_takeover_s=0.3)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = raw_push(context, collector.endpoint)
        reader = ShmReader(instance)

        def sent(**fields: Any) -> None:
            push.send(encode_frame(instance, LoadSnapshot(dp_rank=1, **fields)))

        sent(epoch=100, seq=5, num_running_reqs=1)
        sent(epoch=100, seq=3, num_running_reqs=2)  # older within the epoch
        sent(epoch=100, seq=5, num_running_reqs=3)  # duplicate
        sent(epoch=50, seq=9, num_running_reqs=4)  # older epoch while 100 is live
        sent(epoch=100, seq=6, num_running_reqs=5)
        assert wait_until(lambda: collector.stats.received == 5, WAIT_S), collector.stats_dict()
        assert collector.stats.out_of_order == 2 and collector.stats.stale_epoch == 1
        assert running_reqs(reader, (1,)) == {1: 5}
        sent(epoch=200, seq=1, num_running_reqs=6)  # a restarted writer: new epoch, seq from 1
        assert wait_until(lambda: running_reqs(reader, (1,)) == {1: 6}, WAIT_S)
        time.sleep(0.35)  # let epoch 200 go quiet past epoch_takeover_s
        sent(epoch=150, seq=1, num_running_reqs=7)  # rank moved to a host whose clock is behind
        assert wait_until(lambda: running_reqs(reader, (1,)) == {1: 7}, WAIT_S)
        assert collector.stats.epoch_takeovers == 1
        read = reader.read(1)
        assert read.snapshot is not None and read.snapshot.epoch == 150
        reader.close()
    finally:
        context.destroy(linger=0)
        collector.close()


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_receive_time_replaces_remote_clock(instance: str) -> None:
    collector = Collector(instance, 1, LOOPBACK_ANY_PORT)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = raw_push(context, collector.endpoint)
        # A remote monotonic clock far behind ours would look hours old if copied through.
        push.send(
            encode_frame(instance, LoadSnapshot(dp_rank=0, epoch=1, seq=1, publish_mono_ns=1))
        )
        reader = ShmReader(instance, stale_after_s=2.0)
        assert wait_until(
            lambda: bool(read_segment(reader)) and reader.read(0).snapshot is not None, WAIT_S
        )
        read = reader.read(0)
        assert read.status is SlotStatus.FRESH
        assert read.age_s is not None and read.age_s < 2.0
        reader.close()
    finally:
        context.destroy(linger=0)
        collector.close()


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_one_collector_per_instance(instance: str) -> None:
    first = Collector(instance, 2, LOOPBACK_ANY_PORT)
    try:
        with pytest.raises(TransportError, match="another collector"):
            Collector(instance, 2, LOOPBACK_ANY_PORT)
    finally:
        first.close()
    with Collector(instance, 2, LOOPBACK_ANY_PORT) as again:
        assert again.running
    assert not again.running


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_bind_failure_releases_lock(instance: str) -> None:
    with pytest.raises(TransportError, match="cannot bind"):
        Collector(instance, 1, "tcp://127.0.0.1:notaport")
    with Collector(instance, 1, LOOPBACK_ANY_PORT) as collector:
        assert collector.endpoint.startswith("tcp://127.0.0.1:")


def test_collector_cli_runs_for_duration(instance: str) -> None:
    proc = subprocess.Popen(
        loadsnap_command(
            *("collector", "--instance", instance, "--dp-size", "2", "--bind", LOOPBACK_ANY_PORT),
            *("--duration-s", "0.5", "--stats-interval-s", "0"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        path = collector_lock_path(instance)
        if os.path.exists(path):
            os.unlink(path)
    assert proc.returncode == 0, err
    assert "auth=open (no keys)" in out
    assert "WARNING" not in err  # loopback: no warning
    assert json.loads(out.splitlines()[-1])["received"] == 0


@pytest.mark.usefixtures("collector_lock_cleanup")
def test_segment_mismatch_is_counted_not_fatal(instance: str) -> None:
    local = ShmWriter(instance, 3, 0)  # a live segment of dp_size 3; the collector says 2
    collector = Collector(instance, 2, LOOPBACK_ANY_PORT)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        push = raw_push(context, collector.endpoint)
        for seq in range(1, 51):
            push.send(encode_frame(instance, LoadSnapshot(dp_rank=1, epoch=1, seq=seq)))
        assert wait_until(lambda: collector.stats.received == 50, WAIT_S), collector.stats_dict()
        assert collector.stats.relay_errors == 50 and collector.stats.relayed == 0
        assert collector.running
    finally:
        context.destroy(linger=0)
        collector.close()
        local.close()
