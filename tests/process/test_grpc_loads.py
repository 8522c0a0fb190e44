"""The gRPC servicers on a real grpc.aio server on 127.0.0.1 (loadsnap.grpc_server), with a
blocking grpc client: mounting next to an engine's own servicer, GetLoads and its errors, the
load-only stream (first records, coalesced changes, heartbeats, silence while a rank is not
routable), reads that never block the event loop, and ``loadsnap serve --grpc-port``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from loadsnap import SlotRead
from loadsnap.http import LockedSource
from loadsnap.testing import FakeSource

grpc = pytest.importorskip("grpc", reason="grpcio is in the grpc extra")
pytest.importorskip("smg_grpc_proto", reason="smg-grpc-proto is in the grpc extra")

from smg_grpc_proto.generated import common_pb2  # noqa: E402
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb  # noqa: E402
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc  # noqa: E402

from loadsnap.grpc_loads import LoadServicer, add_load_servicers  # noqa: E402
from loadsnap.grpc_server import GrpcServerThread, PortInUseError  # noqa: E402

RPC_TIMEOUT_S = 10.0
HEARTBEAT_S = 0.3


class EngineServicer(pb_grpc.SglangSchedulerServicer):
    """An engine's own servicer: it answers HealthCheck and (wrongly, for the test) GetLoads."""

    async def HealthCheck(self, request: Any, context: Any) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(healthy=True, message="the engine's")

    async def GetLoads(self, request: Any, context: Any) -> pb.GetLoadsResponse:
        return pb.GetLoadsResponse(version="the engine's")


def _source(dp: int = 2) -> LockedSource:
    source = FakeSource(dp, stale_after_s=60.0)
    for rank in range(dp):
        source.publish(rank, num_running_reqs=3 + rank, num_used_tokens=100, token_usage=0.25)
    return LockedSource(source)


def _publish(source: LockedSource, rank: int, **fields: float) -> None:
    source.call(lambda fake: fake.publish(rank, **fields))


class Served:
    """A server thread with our servicers mounted by ``mount``, and a client channel."""

    def __init__(self, mount: Callable[[Any], None]) -> None:
        self.thread = GrpcServerThread(mount)

    def __enter__(self) -> Served:
        self.thread.start()
        self.channel = grpc.insecure_channel(self.thread.target)
        self.stub = pb_grpc.SglangSchedulerStub(self.channel)  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.channel.close()
        self.thread.stop()


@pytest.fixture
def served() -> Iterator[tuple[Served, LockedSource, list[LoadServicer]]]:
    source = _source()
    servicers: list[LoadServicer] = []

    def mount(server: Any) -> None:
        servicers.append(
            add_load_servicers(server, source, engine=EngineServicer(), heartbeat_s=HEARTBEAT_S)
        )

    with Served(mount) as s:
        yield s, source, servicers


def test_one_call_mounts_ours_and_leaves_the_rest_to_the_engine(
    served: tuple[Served, LockedSource, list[LoadServicer]],
) -> None:
    s, _, _ = served
    assert s.stub.HealthCheck(pb.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).message == (
        "the engine's"
    )
    response = s.stub.GetLoads(pb.GetLoadsRequest(), timeout=RPC_TIMEOUT_S)
    assert response.version != "the engine's"
    assert [load.num_running_reqs for load in response.loads] == [3, 4]
    with pytest.raises(grpc.RpcError) as exc:  # still the engine's: not implemented here
        s.stub.Abort(pb.AbortRequest(request_id="x"), timeout=RPC_TIMEOUT_S)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mounting_after_the_engines_own_registration_takes_over_getloads() -> None:
    source = _source()

    def mount(server: Any) -> None:
        pb_grpc.add_SglangSchedulerServicer_to_server(EngineServicer(), server)  # type: ignore[no-untyped-call]
        add_load_servicers(server, source)

    with Served(mount) as s:
        response = s.stub.GetLoads(pb.GetLoadsRequest(), timeout=RPC_TIMEOUT_S)
        assert response.version != "the engine's" and len(response.loads) == 2


def test_getloads_filters_and_refuses_with_the_right_codes(
    served: tuple[Served, LockedSource, list[LoadServicer]],
) -> None:
    s, source, _ = served
    one = s.stub.GetLoads(pb.GetLoadsRequest(dp_rank=1, include=["queues"]), timeout=RPC_TIMEOUT_S)
    assert [load.dp_rank for load in one.loads] == [1]
    for request, code, needle in (
        (pb.GetLoadsRequest(include=["bogus"]), grpc.StatusCode.INVALID_ARGUMENT, "bogus"),
        (pb.GetLoadsRequest(dp_rank=5), grpc.StatusCode.INVALID_ARGUMENT, "dp_rank out of range"),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            s.stub.GetLoads(request, timeout=RPC_TIMEOUT_S)
        assert exc.value.code() == code and needle in str(exc.value.details())
    source.call(lambda fake: fake.dead.__setitem__(1, True))
    with pytest.raises(grpc.RpcError) as exc:
        s.stub.GetLoads(pb.GetLoadsRequest(dp_rank=1), timeout=RPC_TIMEOUT_S)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "1=dead" in str(exc.value.details())
    assert [load.dp_rank for load in s.stub.GetLoads(pb.GetLoadsRequest()).loads] == [0]


def _records(stream: Any, n: int) -> list[common_pb2.KvEventBatch]:
    return [next(stream) for _ in range(n)]


def test_stream_first_records_changes_and_heartbeats(
    served: tuple[Served, LockedSource, list[LoadServicer]],
) -> None:
    s, source, servicers = served
    request = common_pb2.SubscribeKvEventsRequest(load_records_before_first_batch=True)
    stream = s.stub.SubscribeKvEvents(request, timeout=RPC_TIMEOUT_S)
    try:
        first = _records(stream, 2)
        assert sorted(b.dp_rank for b in first) == [0, 1]
        assert all(b.load.load_only and b.sequence_number == 0 and not b.events for b in first)
        assert [b.load.sample for b in first] == [1, 2]
        assert {b.dp_rank: b.load.running_requests for b in first} == {0: 3, 1: 4}
        # A change of rank 1 is pushed (and only rank 1's record).
        _publish(source, 1, num_running_reqs=9, num_used_tokens=100, token_usage=0.25)
        changed = next(stream)
        assert (changed.dp_rank, changed.load.running_requests, changed.load.sample) == (1, 9, 3)
        # Nothing changes now: heartbeats of both ranks, samples still increasing.
        beats = _records(stream, 2)
        assert sorted(b.dp_rank for b in beats) == [0, 1]
        assert [b.load.sample for b in beats] == [4, 5]
        assert all(b.load.age_ms >= 0 for b in beats)
    finally:
        stream.cancel()
    assert servicers[0].stats.records_sent >= 5


def test_stream_goes_quiet_while_a_rank_is_not_routable_then_resumes(
    served: tuple[Served, LockedSource, list[LoadServicer]],
) -> None:
    s, source, servicers = served
    stream = s.stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=30.0)
    try:
        _records(stream, 2)
        source.call(lambda fake: fake.dead.__setitem__(1, True))
        # Records already in flight may still arrive; then the stream is silent for several
        # heartbeats, which the servicer counts as a quiet period.
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while servicers[0].stats.quiet_periods == 0:
            assert time.monotonic() < deadline, "the stream never went quiet"
            time.sleep(0.01)
        sent = servicers[0].stats.records_sent
        time.sleep(3 * HEARTBEAT_S)
        assert servicers[0].stats.records_sent == sent
        _publish(source, 1, num_running_reqs=7)  # the rank is back (a new writer): resume
        resumed = _records(stream, 2)
        assert sorted(b.dp_rank for b in resumed) == [0, 1]
        assert {b.dp_rank: b.load.running_requests for b in resumed}[1] == 7
    finally:
        stream.cancel()


class BlockingSource:
    """A source whose read waits until the test lets it go (a slow segment read)."""

    def __init__(self, inner: FakeSource) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()
        self.stale_after_s = inner.stale_after_s
        self.dp_size = inner.dp_size

    def read_all(self) -> list[SlotRead]:
        self.entered.set()
        assert self.release.wait(RPC_TIMEOUT_S)
        return self.inner.read_all()

    def hot_table(self) -> Any:
        return self.inner.hot_table()


def test_a_slow_read_never_blocks_the_event_loop() -> None:
    fake = FakeSource(1)
    fake.publish(0, num_running_reqs=1)
    blocking = BlockingSource(fake)

    def mount(server: Any) -> None:
        add_load_servicers(server, blocking, engine=EngineServicer())

    with Served(mount) as s:
        pending = s.stub.GetLoads.future(pb.GetLoadsRequest(), timeout=RPC_TIMEOUT_S)
        assert blocking.entered.wait(RPC_TIMEOUT_S)
        # The read is stuck in its thread; the loop still answers the engine's RPC.
        health = s.stub.HealthCheck(pb.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        assert health.healthy and not pending.done()
        blocking.release.set()
        assert [load.num_running_reqs for load in pending.result().loads] == [1]


def test_busy_port_is_one_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"address=127.0.0.1:{port}"):
            GrpcServerThread(lambda server: None, "127.0.0.1", port).start()
    # Another gRPC server's port too (grpc would share it through SO_REUSEPORT by default).
    first = GrpcServerThread(lambda server: add_load_servicers(server, _source())).start()
    try:
        with pytest.raises(PortInUseError, match=f"address=127.0.0.1:{first.port}"):
            GrpcServerThread(lambda server: None, "127.0.0.1", first.port).start()
    finally:
        first.stop()


def test_serve_grpc_port_busy_and_grpc_missing_are_one_line(instance: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        serve = ["serve", "--instance", instance, "--port", "0", "--grpc-port", str(port)]
        done = subprocess.run(
            [sys.executable, "-m", "loadsnap", *serve],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"loadsnap serve: --grpc-port: cannot listen on address=127.0.0.1:{port}: "
        "Address already in use"
    ]
    assert done.stdout == ""  # no URL printed
    # Without grpcio: refused at parse time, one line naming the extra, exit 2.
    hide = "import sys; sys.modules['grpc'] = None; from loadsnap.cli import main; "
    code = (
        hide + f"raise SystemExit(main(['serve', '--instance', '{instance}', '--grpc-port', '0']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'loadsnap[grpc]'" in lines[0], done.stderr
    assert "grpcio is not installed" in lines[0]
