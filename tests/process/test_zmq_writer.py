"""``ZmqWriter`` and transport selection: stamping, never blocking, reconnecting."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from loadsnap import LoadSnapshot, LoraSection, PayloadTooLargeError, ShmWriter, UsageError
from loadsnap.frame import decode_frame
from loadsnap.transport import (
    SnapshotWriter,
    Transport,
    endpoint_is_local,
    make_writer,
    resolve_collector,
)
from loadsnap.zmq_writer import ZmqWriter, make_epoch
from tests.helpers import free_port

Context = zmq.Context[zmq.Socket[bytes]]
INSTANCE = "zmq-writer-test"


def decoded(data: bytes) -> LoadSnapshot:
    """The snapshot in one frame, checking the frame names ``INSTANCE``."""
    instance, snapshot = decode_frame(data)
    assert instance == INSTANCE
    return snapshot


def free_endpoint(context: Context) -> str:
    """A loopback endpoint with nothing bound to it (a port the kernel just handed out)."""
    return f"tcp://127.0.0.1:{free_port()}"


def pull(context: Context, endpoint: str) -> zmq.Socket[bytes]:
    """Bind a PULL socket, retrying while a just-closed socket still holds the port."""
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2000)  # every receive is bounded
    deadline = time.monotonic() + 2.0
    while True:
        try:
            sock.bind(endpoint)
            return sock
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                sock.close(linger=0)
                raise
            time.sleep(0.01)


def receive_until(
    sock: zmq.Socket[bytes], writer: ZmqWriter, rank: int, timeout_s: float = 5.0
) -> LoadSnapshot | None:
    """Publish every 5 ms until ``sock`` receives one snapshot (bounded); return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=3))
        if sock.poll(5):
            return decoded(sock.recv())
    return None


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_publish_stamps_identity(context: Context) -> None:
    endpoint = free_endpoint(context)
    sock = pull(context, endpoint)
    with ZmqWriter(endpoint, 4, 2, context=context, instance=INSTANCE) as writer:
        first = receive_until(sock, writer, 2)
        assert first is not None
        before = time.monotonic_ns()
        seq = writer.publish(LoadSnapshot(dp_rank=2, num_running_reqs=9))
        got = decoded(sock.recv())
        assert got.seq == seq > first.seq >= 1
        assert got.epoch == first.epoch == writer.epoch > 0
        assert before <= got.publish_mono_ns <= time.monotonic_ns()
        assert got.publish_wall_ns > 0 and got.num_running_reqs == 9
        assert writer.stats.sent >= 2
        assert isinstance(writer, SnapshotWriter)
    sock.close(linger=0)


def test_epoch_changes_on_restart() -> None:
    wall = 1_700_000_000_000_000_000
    assert make_epoch(pid=100, wall_ns=wall) < make_epoch(pid=100, wall_ns=wall + 1_000_000)
    assert make_epoch(pid=100, wall_ns=wall) != make_epoch(pid=101, wall_ns=wall)
    assert make_epoch(pid=2**22 - 1, wall_ns=wall * 30) < 2**63  # fits a Count for millennia
    a = ZmqWriter("tcp://127.0.0.1:9", 1, 0, instance=INSTANCE)
    time.sleep(0.002)
    b = ZmqWriter("tcp://127.0.0.1:9", 1, 0, instance=INSTANCE)
    try:
        assert b.epoch > a.epoch
    finally:
        a.close()
        b.close()


def test_no_collector_never_blocks(context: Context) -> None:
    endpoint = free_endpoint(context)
    writer = ZmqWriter(endpoint, 1, 0, instance=INSTANCE)
    slowest = 0
    started = time.perf_counter()
    for i in range(5000):
        t0 = time.perf_counter_ns()
        writer.publish(LoadSnapshot(dp_rank=0, num_running_reqs=i))
        slowest = max(slowest, time.perf_counter_ns() - t0)
    elapsed = time.perf_counter() - started
    assert writer.stats.dropped == 5000 and writer.stats.sent == 0
    assert elapsed < 2.0 and slowest < 50_000_000, (elapsed, slowest)
    closing = time.perf_counter()
    writer.close()
    writer.close()  # idempotent
    assert time.perf_counter() - closing < 1.0  # LINGER 0: nothing to wait for


def test_slow_collector_keeps_newest(context: Context) -> None:
    endpoint = free_endpoint(context)
    sock = pull(context, endpoint)
    with ZmqWriter(endpoint, 1, 0, context=context, instance=INSTANCE) as writer:
        assert receive_until(sock, writer, 0) is not None
        while sock.poll(50):  # drain the warm-up
            sock.recv()
        for i in range(1, 2001):  # nobody reads meanwhile: conflation keeps the newest
            writer.publish(LoadSnapshot(dp_rank=0, num_running_reqs=i))
        last = None
        while sock.poll(200):
            last = decoded(sock.recv())
        assert last is not None and last.num_running_reqs == 2000
    sock.close(linger=0)


def test_reconnects_by_itself(context: Context) -> None:
    endpoint = free_endpoint(context)
    sock = pull(context, endpoint)
    with ZmqWriter(endpoint, 2, 1, context=context, instance=INSTANCE) as writer:
        assert receive_until(sock, writer, 1) is not None
        sock.close(linger=0)  # the collector goes away...
        dropped = writer.stats.dropped
        deadline = time.monotonic() + 5.0
        while writer.stats.dropped == dropped and time.monotonic() < deadline:
            writer.publish(LoadSnapshot(dp_rank=1))
            time.sleep(0.005)
        assert writer.stats.dropped > dropped  # ...and publishes are dropped, not queued
        sock = pull(context, endpoint)  # ...and comes back on the same address
        again = receive_until(sock, writer, 1)
        assert again is not None and again.dp_rank == 1
        sock.close(linger=0)


def test_oversized_frame_refused_before_sending(context: Context) -> None:
    endpoint = free_endpoint(context)
    sock = pull(context, endpoint)
    limit = 1024
    with ZmqWriter(
        endpoint, 1, 0, instance=INSTANCE, context=context, max_message_bytes=limit
    ) as writer:
        first = receive_until(sock, writer, 0)
        assert first is not None
        sent, seq = writer.stats.sent, first.seq
        while sock.poll(50):  # drain the warm-up
            seq = decoded(sock.recv()).seq
        big = LoadSnapshot(dp_rank=0, lora=LoraSection(loaded_adapters=["a" * 100] * 20))
        with pytest.raises(PayloadTooLargeError, match=f"max_message_bytes={limit}") as info:
            writer.publish(big)
        assert "size=" in str(info.value) and f"endpoint={endpoint}" in str(info.value)
        assert writer.stats.oversized == 1 and writer.stats.sent == sent
        assert not sock.poll(100)  # nothing went out
        # The refused frame took no sequence number: the next one follows the last sent.
        assert writer.publish(LoadSnapshot(dp_rank=0, num_running_reqs=1)) == seq + 1
        assert sock.poll(2000) and decoded(sock.recv()).seq == seq + 1
    sock.close(linger=0)


def test_instance_is_required_and_checked() -> None:
    with pytest.raises(UsageError, match="invalid instance name"):
        ZmqWriter("tcp://127.0.0.1:9", 1, 0, instance="bad/name")
    writer = ZmqWriter("tcp://127.0.0.1:9", 1, 0, instance="prod-1")
    try:
        assert writer.instance == "prod-1" and "instance='prod-1'" in repr(writer)
    finally:
        writer.close()


def test_publish_rejects_misuse(context: Context) -> None:
    with pytest.raises(UsageError, match="dp_rank out of range"):
        ZmqWriter("tcp://127.0.0.1:9", 2, 2, instance=INSTANCE)
    with pytest.raises(UsageError, match="cannot connect"):
        ZmqWriter("nonsense://x", 2, 0, instance=INSTANCE)
    writer = ZmqWriter("tcp://127.0.0.1:9", 2, 0, context=context, instance=INSTANCE)
    with pytest.raises(UsageError, match="dp_rank mismatch"):
        writer.publish(LoadSnapshot(dp_rank=1))
    with pytest.raises(UsageError, match=r"\$\.token_usage"):
        writer.publish(LoadSnapshot(dp_rank=0, token_usage=float("nan")))
    writer.close()
    with pytest.raises(UsageError, match="closed"):
        writer.publish(LoadSnapshot(dp_rank=0))


def test_endpoint_is_local() -> None:
    assert endpoint_is_local("tcp://127.0.0.1:5557")
    assert endpoint_is_local("tcp://localhost:5557")
    assert endpoint_is_local("tcp://[::1]:5557")
    assert endpoint_is_local("ipc:///tmp/loadsnap.sock")
    assert not endpoint_is_local("tcp://192.0.2.1:5557")  # TEST-NET-1: on no interface here
    assert not endpoint_is_local("tcp://no-such-host.invalid:5557")


def test_make_writer_selection(
    instance: str, monkeypatch: pytest.MonkeyPatch, context: Context
) -> None:
    monkeypatch.delenv("LOADSNAP_TRANSPORT", raising=False)
    monkeypatch.delenv("LOADSNAP_COLLECTOR", raising=False)
    monkeypatch.delenv("LOADSNAP_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("LOADSNAP_CURVE_CLIENT_KEY", raising=False)
    endpoint = free_endpoint(context)
    with pytest.raises(UsageError, match="collector address"):
        make_writer(instance, 2, 0, transport="zmq")
    # auto without a collector, and auto with a collector on this host: shared memory.
    for env in ("", endpoint):
        monkeypatch.setenv("LOADSNAP_COLLECTOR", env)
        writer = make_writer(instance, 2, 0)
        assert isinstance(writer, ShmWriter)
        writer.close()
    assert resolve_collector() == endpoint
    zmq_writer = make_writer(instance, 2, 1, transport=Transport.ZMQ)
    assert isinstance(zmq_writer, ZmqWriter) and zmq_writer.endpoint == endpoint
    assert zmq_writer.instance == instance  # frames name the writer's instance
    zmq_writer.close()
    # auto with a collector on another host: ZMQ.
    monkeypatch.setattr("loadsnap.transport.endpoint_is_local", lambda _endpoint: False)
    remote = make_writer(instance, 2, 1, collector=endpoint)
    assert isinstance(remote, ZmqWriter)
    remote.close()
    monkeypatch.setenv("LOADSNAP_CURVE_SERVER_KEY", "/nonexistent/server.key")
    with pytest.raises(UsageError, match="CURVE needs both keys"):
        make_writer(instance, 2, 1, transport="zmq")
