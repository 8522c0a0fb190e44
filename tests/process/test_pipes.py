"""The controller's sockets: ordered backlogs that never block, reset, bind errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from dp_controller._pipes import RankPipes, ResultPipe
from loadsnap.errors import TransportError

RECV_TIMEOUT_MS = 5000


def test_a_rank_without_a_peer_backlogs_in_order_and_flushes_once_it_binds(
    tmp_path: Path,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    addrs = [f"ipc://{tmp_path}/req-{r}" for r in range(2)]
    pipes = RankPipes(ctx, addrs, send_hwm=1)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        # Connected before anyone binds: the pipe takes a few, then the backlog, never a block.
        count = 0
        while pipes.send(0, b"m%d" % count):
            count += 1
            assert count < 1000, "the send high-water mark never applied"
        for i in range(count + 1, count + 3):
            assert not pipes.send(0, b"m%d" % i)
        count += 3
        assert pipes.backlog_sizes() == [3, 0]
        pipes.send(0, b"x")
        pipes.withdraw_last(0)  # a message reported not sent is not delivered later
        pull.bind(addrs[0])
        deadline = time.monotonic() + 5.0
        while pipes.backlog_sizes()[0] and time.monotonic() < deadline:
            pipes.flush_all()
            time.sleep(0.001)
        got = []
        for _ in range(count):
            assert pull.poll(RECV_TIMEOUT_MS)
            got.append(pull.recv())
        assert got == [b"m%d" % i for i in range(count)]  # in send order, nothing withdrawn
        while pipes.send(1, b"y"):
            pass
        assert pipes.backlog_sizes() == [0, 1]
        pipes.reset(1)  # the backlog and the old socket's queue are dropped
        assert pipes.backlog_sizes() == [0, 0]
    finally:
        pull.close(linger=0)
        pipes.close()
        pipes.close()
        ctx.term()


def test_result_pipe_waits_with_a_timeout_and_refuses_a_taken_address(tmp_path: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    addr = f"ipc://{tmp_path}/res"
    results = ResultPipe(ctx, addr)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(TransportError, match="addr="):
            ResultPipe(ctx, "tcp://256.0.0.1:1")
        assert not results.wait(0.0) and results.recv_nowait() is None
        push.connect(addr)
        push.send(b"done")
        assert results.wait(RECV_TIMEOUT_MS / 1000) and results.recv_nowait() == b"done"
        results.close()
        assert results.closed and not results.wait(0.0) and results.recv_nowait() is None
    finally:
        push.close(linger=0)
        results.close()
        ctx.term()
