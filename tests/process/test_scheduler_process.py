"""The scheduler process: ZMQ in and out, load published into shared memory, clean shutdown.

One in-process test drives :class:`SchedulerProcess` cycle by cycle; the multi-process test
starts several ``python -m scheduler`` ranks publishing into one segment, feeds them requests
over ZMQ like a DP controller, and reads their load back while they work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from loadsnap import SegmentUnavailableError, ShmReader, SlotStatus, segment_path
from scheduler.cli import build_parser, options_from_args
from scheduler.engine import EngineConfig
from scheduler.executors import CostModel
from scheduler.messages import (
    Control,
    ControlReply,
    Finished,
    Request,
    decode_to_controller,
    encode_message,
)
from scheduler.process import SchedulerOptions, SchedulerProcess
from tests.helpers import ROOT, scheduler_command

DEADLINE_S = 15.0


SocketFactory = Callable[..., zmq.Socket[bytes]]


@pytest.fixture
def zsock() -> Iterator[SocketFactory]:
    """Make linger-0 sockets: ``zsock(zmq.PULL, bind=...)``; all closed at teardown."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made: list[zmq.Socket[bytes]] = []

    def make(kind: int, *, bind: str = "", connect: str = "") -> zmq.Socket[bytes]:
        sock = context.socket(kind)
        made.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
        return sock

    yield make
    for sock in made:
        sock.close(linger=0)
    context.term()


def wait_for(condition: Callable[[], bool], what: str, pump: Callable[[], None]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pump()


def receive(sock: zmq.Socket[bytes], timeout_ms: int = 50) -> list[Finished | ControlReply]:
    out: list[Finished | ControlReply] = []
    if sock.poll(timeout_ms):
        while True:
            try:
                out.append(decode_to_controller(sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out
    return out


def make_request(seq: int, rid: int, length: int = 24, max_new: int = 8) -> bytes:
    prompt = [rid * 1000 + i for i in range(length)]
    return encode_message(
        Request(
            rid=rid,
            dispatch_seq=seq,
            prompt=prompt,
            max_new_tokens=max_new,
            dispatched_mono_ns=time.monotonic_ns(),
        )
    )


def test_in_process_scheduler_serves_requests_and_controls(
    instance: str, tmp_path: Path, zsock: SocketFactory
) -> None:
    results = zsock(zmq.PULL, bind=f"ipc://{tmp_path}/results")
    options = SchedulerOptions(
        instance=instance,
        dp_size=1,
        dp_rank=0,
        request_addr=f"ipc://{tmp_path}/req-0",
        result_addr=f"ipc://{tmp_path}/results",
        engine=EngineConfig(max_total_num_tokens=512),
        cost=CostModel(overhead_s=0.0, prefill_token_s=0.0, decode_token_s=0.0),
        idle_poll_s=0.001,
    )
    process = SchedulerProcess(options)
    try:
        push = zsock(zmq.PUSH, connect=options.request_addr)
        push.send(b"\xc1 not msgpack")
        for seq in (1, 2, 3):
            push.send(make_request(seq, rid=10 + seq))
        push.send(encode_message(Control(command_id=1, command="ping")))
        push.send(encode_message(Control(command_id=2, command="bogus")))
        got: list[Finished | ControlReply] = []

        def pump() -> None:
            process.run_cycle()
            got.extend(receive(results, 0))

        wait_for(lambda: sum(isinstance(m, Finished) for m in got) == 3, "3 finished", pump)
        finished = sorted((m for m in got if isinstance(m, Finished)), key=lambda m: m.rid)
        assert [f.rid for f in finished] == [11, 12, 13]
        assert all(f.output_len == 8 and f.e2e_s >= f.ttft_s >= f.queue_time_s for f in finished)
        replies = {m.command_id: m for m in got if isinstance(m, ControlReply)}
        assert replies[1].ok and replies[1].detail.startswith("pong")
        assert not replies[2].ok and "bogus" in replies[2].detail
        assert process.bad_frames == 1
        push.send(encode_message(Control(command_id=3, command="flush_cache")))
        wait_for(lambda: any(getattr(m, "command_id", 0) == 3 for m in got), "flush", pump)
        assert process.engine.pool.free == 512
        with ShmReader(instance) as reader:
            wait_for(
                lambda: (
                    (s := reader.read(0).snapshot) is not None
                    and s.num_running_reqs == 0
                    and s.last_accepted_dispatch_seq == 3
                ),
                "an idle publish",
                pump,
            )
    finally:
        process.close()
    assert not os.path.exists(segment_path(instance))


def test_cli_options_pass_transport_options_through() -> None:
    args = build_parser().parse_args(
        [
            "--instance=x",
            "--dp-size=2",
            "--dp-rank=1",
            "--request-addr=ipc:///tmp/a",
            "--result-addr=ipc:///tmp/b",
            "--prefill-token-ms=1.0",
            "--publish-every=5",
            "--collector=tcp://10.0.0.1:5555",
            "--transport-opt=some-key=v",
        ]
    )
    options = options_from_args(args)
    assert options.cost.prefill_token_s == pytest.approx(1e-3)
    assert options.publish_every == 5
    assert options.transport_options == {"some_key": "v", "collector": "tcp://10.0.0.1:5555"}


def test_loadsnap_scheduler_subcommand_is_registered() -> None:
    from loadsnap.cli import build_parser as loadsnap_parser

    args = loadsnap_parser().parse_args(
        [
            "scheduler",
            "--instance",
            "x",
            "--dp-size",
            "1",
            "--dp-rank",
            "0",
            "--request-addr",
            "a",
            "--result-addr",
            "b",
        ]
    )
    assert args.func.__module__ == "scheduler.cli"


def start_rank(instance: str, tmp_path: Path, rank: int, dp_size: int) -> subprocess.Popen[bytes]:
    command = scheduler_command(
        instance,
        dp_size,
        rank,
        f"ipc://{tmp_path}/req-{rank}",
        f"ipc://{tmp_path}/results",
        "--transport=shm",
        "--max-total-num-tokens=2048",
        "--step-overhead-ms=0.5",
        "--prefill-token-ms=0.005",
        "--decode-token-ms=0.02",
        "--publish-every=4",
    )
    return subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE)


def test_several_schedulers_publish_into_one_segment(
    instance: str, tmp_path: Path, zsock: SocketFactory
) -> None:
    dp_size, per_rank = 3, 6
    results = zsock(zmq.PULL, bind=f"ipc://{tmp_path}/results")
    procs = [start_rank(instance, tmp_path, rank, dp_size) for rank in range(dp_size)]
    reader = ShmReader(instance)
    try:
        pushes = [
            zsock(zmq.PUSH, connect=f"ipc://{tmp_path}/req-{rank}") for rank in range(dp_size)
        ]
        rid = 0
        for seq in range(1, per_rank + 1):
            for rank, push in enumerate(pushes):
                rid += 1
                push.send(make_request(seq, rid, length=16 + 8 * rank, max_new=10))
        got: list[Finished | ControlReply] = []
        busy_seen = [False] * dp_size

        def pump() -> None:
            got.extend(receive(results))
            for proc in procs:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                reads = reader.read_all()
            except SegmentUnavailableError:
                return
            for read in reads:
                snap = read.snapshot
                if snap is not None and snap.num_running_reqs + snap.num_waiting_reqs > 0:
                    busy_seen[read.rank] = True

        expected = dp_size * per_rank
        wait_for(lambda: len(got) == expected, f"{expected} finished requests", pump)
        done = [m for m in got if isinstance(m, Finished)]
        assert sorted(m.rid for m in done) == list(range(1, expected + 1))
        assert all(m.status == "ok" for m in done)
        by_rank = {r: sorted(m.dispatch_seq for m in done if m.dp_rank == r) for r in range(3)}
        assert by_rank == {r: list(range(1, per_rank + 1)) for r in range(dp_size)}

        def all_idle_and_acked() -> bool:
            reads = reader.read_all()
            return all(
                r.status is SlotStatus.FRESH
                and r.snapshot is not None
                and r.snapshot.last_accepted_dispatch_seq == per_rank
                and r.snapshot.num_running_reqs == r.snapshot.num_used_tokens == 0
                and r.snapshot.cycle > 0
                for r in reads
            )

        wait_for(all_idle_and_acked, "every rank idle with all requests acknowledged", pump)
        assert any(busy_seen)  # the reader saw load while they worked
        table = reader.hot_table()
        assert table.valid.tolist() == [True] * dp_size
        assert table.max_total_num_tokens.tolist() == [2048] * dp_size

        pushes[1].send(encode_message(Control(command_id=7, command="ping")))
        wait_for(lambda: any(isinstance(m, ControlReply) for m in got), "a ping reply", pump)
        (reply,) = [m for m in got if isinstance(m, ControlReply)]
        assert reply.ok and reply.dp_rank == 1

        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=DEADLINE_S) == 0
        assert not os.path.exists(segment_path(instance))
    finally:
        reader.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def read_rank0(reader: ShmReader) -> SlotStatus | None:
    """Rank 0's status, or None while no segment is readable (a writer is still creating it)."""
    try:
        return reader.read(0).status
    except SegmentUnavailableError:
        return None


def test_killed_rank_is_reclaimed_by_the_next_start_and_sigint_exits_cleanly(
    instance: str, tmp_path: Path, zsock: SocketFactory
) -> None:
    results = zsock(zmq.PULL, bind=f"ipc://{tmp_path}/results")
    procs: list[subprocess.Popen[bytes]] = []
    reader = ShmReader(instance)
    try:
        first = start_rank(instance, tmp_path, 0, 1)
        procs.append(first)
        wait_for(lambda: read_rank0(reader) is SlotStatus.FRESH, "a publish", lambda: None)
        epoch = reader.read(0).epoch
        first.kill()  # a crash: no final publish, no unlink, the ipc endpoint file left behind
        first.wait(timeout=DEADLINE_S)
        second = start_rank(instance, tmp_path, 0, 1)
        procs.append(second)

        def restarted() -> bool:
            return read_rank0(reader) is SlotStatus.FRESH and reader.read(0).epoch > epoch

        wait_for(restarted, "the restarted rank", lambda: None)
        push = zsock(zmq.PUSH, connect=f"ipc://{tmp_path}/req-0")
        push.send(make_request(1, rid=1))
        got: list[Finished | ControlReply] = []
        wait_for(lambda: len(got) == 1, "a finished request", lambda: got.extend(receive(results)))
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=DEADLINE_S) == 0
        assert not os.path.exists(segment_path(instance))
    finally:
        reader.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
