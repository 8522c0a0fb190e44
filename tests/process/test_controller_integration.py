"""The controller against real reference schedulers (subprocesses, ipc:// only)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.controller import Controller, ControlOutcome
from dp_controller.harness.fleet import SchedulerFleet
from loadsnap.shm_reader import ShmReader

# Slow prefill: requests stay queued, so a scheduler's snapshots lag the dispatches.
_SLOW = ("--prefill-token-ms=0.2", "--decode-token-ms=0.2", "--max-running-requests=8")


@pytest.fixture
def fleet(instance: str) -> Iterator[SchedulerFleet]:
    with SchedulerFleet(instance, 4, _SLOW) as f:
        f.wait_ready(timeout_s=15.0)
        yield f


def test_burst_longer_than_refresh_window_spreads(fleet: SchedulerFleet) -> None:
    with ShmReader(fleet.instance) as reader:
        budget = DPBudget(
            reader, BudgetConfig(policy=Policy.TOTAL_REQUESTS, refresh_interval_s=0.02), dp_size=4
        )
        with Controller(budget, fleet.request_addrs, fleet.result_addr) as controller:
            picks: Counter[int] = Counter()
            # 80 requests in 8 waves 10 ms apart: several refreshes happen inside the burst.
            for _ in range(8):
                for _ in range(10):
                    _, decision = controller.submit([7] * 256, 8)
                    picks[decision.rank] += 1
                controller.poll(0.01)
            assert budget.stats.refreshes >= 2
            assert budget.stats.fail_open_decisions == 0
            assert sorted(picks) == [0, 1, 2, 3]
            assert max(picks.values()) - min(picks.values()) <= 4, picks
            finished = []
            for _ in range(400):  # bounded: at most ~40 s of 0.1 s polls
                finished.extend(controller.poll(0.1))
                if len(finished) == 80:
                    break
            assert len(finished) == 80
            assert Counter(f.dp_rank for f in finished) == picks
            # Everything acknowledged: the ledger is empty once the schedulers caught up.
            for _ in range(100):
                budget.refresh(force=True)
                if int(budget.ledger.unacked_count.sum()) == 0:
                    break
                controller.poll(0.05)
            assert int(budget.ledger.unacked_count.sum()) == 0


def test_control_fanout_survives_a_hung_scheduler(fleet: SchedulerFleet) -> None:
    with ShmReader(fleet.instance) as reader:
        budget = DPBudget(reader, dp_size=4)
        with Controller(budget, fleet.request_addrs, fleet.result_addr) as controller:
            result = controller.control("ping", timeout_s=5.0)
            assert result.ok, result
            fleet.pause_process(2)
            try:
                result = controller.control("ping", timeout_s=0.5, max_concurrency=2)
            finally:
                fleet.resume_process(2)
            outcomes = {r.dp_rank: r.outcome for r in result.ranks}
            assert outcomes == {
                0: ControlOutcome.OK,
                1: ControlOutcome.OK,
                2: ControlOutcome.TIMEOUT,
                3: ControlOutcome.OK,
            }
            assert result.failed_ranks() == [2]
            unknown = controller.control("no_such_command", timeout_s=5.0)
            assert {r.outcome for r in unknown.ranks} == {ControlOutcome.FAILED}


def test_new_controller_continues_numbering_and_ignores_old_results(fleet: SchedulerFleet) -> None:
    """Close a controller with requests running; a new one picks up with nothing clamped."""
    config = BudgetConfig(policy=Policy.TOTAL_REQUESTS, refresh_interval_s=0.02)
    with ShmReader(fleet.instance) as reader:
        first = DPBudget(reader, config, dp_size=4)
        with Controller(first, fleet.request_addrs, fleet.result_addr) as old:
            for _ in range(20):
                old.submit([7] * 256, 8)
            for _ in range(200):  # bounded: until every request reached its scheduler
                first.refresh(force=True)
                if int(first.ledger.unacked_count.sum()) == 0:
                    break
                old.poll(0.02)
            assert int(first.ledger.unacked_count.sum()) == 0
            issued = [first.ledger.issued(r) for r in range(4)]
        # Closed with requests still queued or running; their results may reach the next one.
        budget = DPBudget(reader, config, dp_size=4)
        with Controller(budget, fleet.request_addrs, fleet.result_addr) as new:
            assert new.takeover_seqs == issued
            sent = {}
            for _ in range(20):
                rid, decision = new.submit([7] * 256, 8)
                assert decision.seq > issued[decision.rank]
                sent[rid] = decision
            finished = []
            for _ in range(400):  # bounded: at most ~40 s of 0.1 s polls
                finished.extend(new.poll(0.1))
                if len(finished) == 20:
                    break
            # Rids restart at 0 like the old controller's, yet only our own results come back.
            assert sorted(f.rid for f in finished) == sorted(sent) == list(range(20))
            assert all(
                (f.status, f.dp_rank, f.dispatch_seq) == ("ok", *sent[f.rid]) for f in finished
            )
            assert new.unknown_results <= 20 and new.failed_requests == 0
            for _ in range(100):
                budget.refresh(force=True)
                if int(budget.ledger.unacked_count.sum()) == 0:
                    break
                new.poll(0.05)
            assert int(budget.ledger.unacked_count.sum()) == 0
            assert budget.ledger.stats.overshoot_acks == 0
