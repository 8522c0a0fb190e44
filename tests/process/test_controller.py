"""Controller: failing a dead or restarted rank's requests exactly once, and taking over.

No scheduler processes: a :class:`FakeSource` says which ranks are dead or restarted, and each
rank's scheduler is a pair of raw ZMQ sockets driven by the test (``ipc://`` in ``tmp_path``).
Every receive has a timeout; sockets use ``linger=0``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dp_controller import BudgetConfig, DPBudget, OverwriteBudget, Policy
from dp_controller.controller import Controller, FailureReason
from dp_controller.dispatching import Dispatcher
from dp_controller.ledger import DispatchLedger
from loadsnap.errors import UsageError
from loadsnap.testing import FakeClock, FakeSource
from scheduler.messages import Finished, Request, decode_to_scheduler, encode_message

RECV_TIMEOUT_MS = 5000


class FakeRank:
    """One rank's scheduler end: receives requests, sends results. Test-only."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], rank: int, req: str, res: str) -> None:
        self.rank = rank
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(req)
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(res)

    def recv(self, count: int) -> list[Request]:
        out = []
        for _ in range(count):
            assert self.pull.poll(RECV_TIMEOUT_MS), f"no request on dp_rank={self.rank}"
            message = decode_to_scheduler(self.pull.recv())
            assert isinstance(message, Request)
            out.append(message)
        return out

    def finish(self, request: Request, *, seq: int | None = None) -> None:
        seq = request.dispatch_seq if seq is None else seq
        self.push.send(
            encode_message(
                Finished(
                    rid=request.rid,
                    dp_rank=self.rank,
                    dispatch_seq=seq,
                    prompt_len=len(request.prompt),
                    output_len=request.max_new_tokens,
                    cached_tokens=0,
                    queue_time_s=0.0,
                    ttft_s=0.0,
                    e2e_s=0.0,
                )
            )
        )


class Rig:
    """A controller over a FakeSource, and one FakeRank per rank."""

    def __init__(
        self,
        tmp: Path,
        dp_size: int,
        acks: list[int] | None = None,
        policy: Policy = Policy.TOTAL_REQUESTS,
        *,
        overwrite: bool = False,
    ) -> None:
        self.clock = FakeClock()
        self.source = FakeSource(dp_size, self.clock, stale_after_s=1.0)
        for rank in range(dp_size):
            ack = 0 if acks is None else acks[rank]
            self.source.publish(rank, epoch=1, last_accepted_dispatch_seq=ack)
        config = BudgetConfig(policy=policy, refresh_interval_s=0.0)
        self.budget = DPBudget(self.source, config, clock=self.clock)
        dispatcher: Dispatcher = self.budget
        if overwrite:
            dispatcher = OverwriteBudget(self.source, 0.0, clock=self.clock)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        req = [f"ipc://{tmp}/req-{r}" for r in range(dp_size)]
        res = f"ipc://{tmp}/res"
        self.controller = Controller(dispatcher, req, res)
        self.ranks = [FakeRank(self.ctx, r, req[r], res) for r in range(dp_size)]

    def close(self) -> None:
        self.controller.close()
        self.ctx.destroy(linger=0)

    def submit(self, rank: int, count: int) -> list[int]:
        return [self.controller.submit([1, 2, 3], 4, rank=rank)[0] for _ in range(count)]

    def collect(self, until: int, timeout_s: float = 5.0) -> list[Finished]:
        """Poll until ``until`` results came (or the deadline)."""
        out: list[Finished] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < until and time.monotonic() < deadline:
            out.extend(self.controller.poll(0.05))
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, 2)
    try:
        yield r
    finally:
        r.close()


def test_dead_rank_requests_reported_failed_once_and_late_result_dropped(rig: Rig) -> None:
    rids_1 = rig.submit(1, 4)
    rids_0 = rig.submit(0, 2)
    got = rig.ranks[1].recv(4)
    assert [m.rid for m in got] == rids_1
    rig.ranks[1].finish(got[0])  # sent just before the process dies
    rig.source.dead[1] = True
    results = rig.collect(until=4)
    by_rid = {f.rid: f for f in results}
    assert len(results) == len(by_rid) == 4
    assert by_rid[rids_1[0]].status == "ok"  # delivered before the death was acted on
    for rid, request in zip(rids_1[1:], got[1:], strict=True):
        failed = by_rid[rid]
        assert (failed.status, failed.reason) == ("failed", FailureReason.RANK_DEAD.value)
        assert (failed.dp_rank, failed.dispatch_seq, failed.output_len) == (
            1,
            request.dispatch_seq,
            0,
        )
        assert failed.prompt_len == 3 and failed.e2e_s >= 0.0
    assert rig.controller.outstanding == [2, 0]
    assert rig.controller.in_flight(0) == rids_0 and rig.controller.in_flight(1) == []
    assert rig.controller.failed_requests == 3
    # The dead process's result for a request already reported failed is dropped, not reported.
    rig.ranks[1].finish(got[1])
    deadline = time.monotonic() + 5.0
    while rig.controller.late_results == 0 and time.monotonic() < deadline:
        assert rig.controller.poll(0.05) == []
    assert rig.controller.late_results == 1 and rig.controller.unknown_results == 0
    # Nothing more is sent to the dead rank, and the live rank's requests finish normally.
    assert {rig.controller.submit([1], 1)[1].rank for _ in range(4)} == {0}
    for request in rig.ranks[0].recv(6):
        rig.ranks[0].finish(request)
    done = rig.collect(until=6)
    assert sorted(f.rid for f in done) == sorted([*rids_0, *range(6, 10)])
    assert {f.status for f in done} == {"ok"} and rig.controller.outstanding == [0, 0]


def test_restarted_rank_fails_only_the_old_incarnations_requests(rig: Rig) -> None:
    old = rig.submit(0, 3)
    rig.ranks[0].recv(3)
    rig.source.publish(0, epoch=2)  # a new process took the slot: the old one's queue is gone
    results = rig.collect(until=3)
    assert sorted(f.rid for f in results) == old
    assert {(f.status, f.reason) for f in results} == {("failed", "rank_restarted")}
    assert rig.budget.stats.epoch_resets == 1
    new = rig.submit(0, 2)
    (first, second) = rig.ranks[0].recv(2)
    rig.ranks[0].finish(first)
    rig.ranks[0].finish(second)
    done = rig.collect(until=2)
    assert sorted(f.rid for f in done) == new and {f.status for f in done} == {"ok"}
    assert rig.controller.failed_requests == 3 and rig.controller.outstanding == [0, 0]


def test_new_controller_continues_numbering_after_acknowledgements(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 3, acks=[500, 0, 7])
    try:
        assert rig.controller.takeover_seqs == [500, 0, 7]
        seqs = [rig.controller.submit([1], 1, rank=r)[1].seq for r in (0, 1, 2, 0)]
        assert seqs == [501, 1, 8, 502]
        assert [m.dispatch_seq for m in rig.ranks[0].recv(2)] == [501, 502]
        # The scheduler acknowledges the new requests: no clamping, nothing left unacknowledged.
        rig.source.publish(0, epoch=1, last_accepted_dispatch_seq=502)
        rig.source.publish(1, epoch=1, last_accepted_dispatch_seq=1)
        rig.source.publish(2, epoch=1, last_accepted_dispatch_seq=8)
        rig.budget.refresh(force=True)
        ledger = rig.budget.ledger
        assert ledger.stats.overshoot_acks == 0
        assert ledger.unacked_count.tolist() == [0, 0, 0]
        assert [ledger.acked(r) for r in range(3)] == [502, 1, 8]
        # An old snapshot (before the new requests) acknowledges nothing and is not clamped.
        rig.source.publish(0, epoch=1, last_accepted_dispatch_seq=500)
        rig.controller.submit([1], 1, rank=0)
        assert ledger.unacked_count.tolist() == [1, 0, 0] and ledger.stats.overshoot_acks == 0
    finally:
        rig.close()


def test_a_baseline_takes_part_but_reports_no_lost_rank(tmp_path: Path) -> None:
    # The reference design's budget: numbering taken over, results flow, a dead rank's
    # requests are not failed (it has no notion of one: they stay outstanding).
    rig = Rig(tmp_path, 2, acks=[5, 0], overwrite=True)
    try:
        assert rig.controller.takeover_seqs == [5, 0]
        rids = rig.submit(0, 2) + rig.submit(1, 1)
        assert [m.dispatch_seq for m in rig.ranks[0].recv(2)] == [6, 7]
        (request,) = rig.ranks[1].recv(1)
        rig.source.dead[0] = True
        rig.ranks[1].finish(request)
        (done,) = rig.collect(until=1)
        assert (done.rid, done.status) == (rids[2], "ok")
        assert rig.controller.poll(0.05) == []
        assert rig.controller.outstanding == [2, 0] and rig.controller.failed_requests == 0
        assert rig.controller.dispatched == [2, 1]
    finally:
        rig.close()


def test_ledger_rebase_continues_numbering_and_never_reuses_a_sequence() -> None:
    # The ledger half of the takeover (belongs with tests/unit/test_ledger.py).
    ledger = DispatchLedger(2)
    ledger.record(0, 5)
    ledger.record(0, 5)
    assert ledger.rebase(0, 40) == 2  # the unacknowledged entries are dropped
    assert ledger.unacked_count.tolist() == [0, 0] and ledger.unacked_tokens.tolist() == [0, 0]
    assert (ledger.issued(0), ledger.acked(0), ledger.record(0, 3)) == (40, 40, 41)
    assert ledger.acknowledge(0, 39) == 0 and ledger.acknowledge(0, 41) == 1
    assert ledger.stats.overshoot_acks == 0 and ledger.stats.reset_dropped == 2
    with pytest.raises(UsageError, match="issued"):
        ledger.rebase(0, 40)
    with pytest.raises(UsageError, match="dp_rank"):
        ledger.rebase(2, 1)


def test_another_controllers_result_is_never_taken_for_ours(rig: Rig) -> None:
    (rid,) = rig.submit(0, 1)
    (request,) = rig.ranks[0].recv(1)
    rig.ranks[0].finish(request, seq=request.dispatch_seq + 40)  # same rid, other dispatch
    deadline = time.monotonic() + 5.0
    while rig.controller.unknown_results == 0 and time.monotonic() < deadline:
        assert rig.controller.poll(0.05) == []
    assert rig.controller.outstanding == [1, 0] and rig.controller.in_flight(0) == [rid]
    rig.ranks[0].finish(request)
    (done,) = rig.collect(until=1)
    assert (done.rid, done.status) == (rid, "ok")


@pytest.mark.parametrize("policy", [Policy.TOTAL_REQUESTS, Policy.LENGTH_AWARE])
def test_random_deaths_restarts_and_results_every_request_reported_exactly_once(
    tmp_path: Path, policy: Policy
) -> None:
    """A seeded random interleaving of dispatches, results, deaths, restarts and polls.

    With ``LENGTH_AWARE`` the budget's outstanding requests per rank (from the results and
    failures the controller reports to it) equal the controller's own after every step."""
    n = 3
    rig = Rig(tmp_path, n, policy=policy)
    tracked = rig.budget.outstanding if policy is Policy.LENGTH_AWARE else None
    rng = random.Random(8)
    epochs = [1] * n
    dead = [False] * n
    held: list[list[Request]] = [[] for _ in range(n)]  # what each live fake process holds
    reported: Counter[int] = Counter()
    statuses: dict[int, str] = {}
    submitted = 0
    try:

        def take(results: list[Finished]) -> None:
            for f in results:
                reported[f.rid] += 1
                statuses[f.rid] = f.status

        def receive(rank: int) -> None:
            """What arrived at the rank's socket: held by a live process, gone with a dead one."""
            pull = rig.ranks[rank].pull
            while pull.poll(0):
                message = decode_to_scheduler(pull.recv())
                assert isinstance(message, Request)
                if not dead[rank]:
                    held[rank].append(message)

        for _ in range(400):
            event = rng.random()
            rank = rng.randrange(n)
            receive(rank)
            if event < 0.45:
                count = rng.randint(1, 3)
                rig.submit(rank, count)
                submitted += count
            elif event < 0.75 and held[rank]:
                # The process finishes (and reports) a request it holds, in any order.
                rig.ranks[rank].finish(held[rank].pop(rng.randrange(len(held[rank]))))
            elif event < 0.77:
                dead[rank] = rig.source.dead[rank] = True  # SIGKILL: what it held is gone
                held[rank].clear()
            elif event < 0.81:
                epochs[rank] += 1  # a restart (seen dead before or not)
                dead[rank] = False
                rig.source.publish(rank, epoch=epochs[rank])
                held[rank].clear()
            else:
                take(rig.controller.poll(0.0))
            if tracked is not None:
                assert tracked.count == rig.controller.outstanding
        # Live processes finish everything they get; then every request must have its result.
        deadline = time.monotonic() + 10.0
        while sum(rig.controller.outstanding) > 0 and time.monotonic() < deadline:
            for rank in range(n):
                receive(rank)
                for request in held[rank]:
                    rig.ranks[rank].finish(request)
                held[rank].clear()
            take(rig.controller.poll(0.02))
        take(rig.controller.poll(0.0))
        assert sum(rig.controller.outstanding) == 0, rig.controller.outstanding
        assert len(reported) == submitted and set(reported.values()) == {1}
        failed = sum(1 for s in statuses.values() if s == "failed")
        assert failed == rig.controller.failed_requests and failed > 0
        assert submitted - failed > 0
        assert rig.controller.unknown_results == 0
        if tracked is not None:
            assert tracked.count == [0] * n and tracked.forgotten == 0
    finally:
        rig.close()
