"""DPBudget: ledger invariant, throttle, staleness, fail-open, rotating ties, pinned, baseline."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_controller import BudgetConfig, DPBudget, OverwriteBudget, Policy, StalePolicy
from dp_controller.baselines import RoundRobinBaseline
from dp_controller.harness.workload import generate_trace, preset
from loadsnap.errors import UsageError
from loadsnap.reading import SnapshotSource
from loadsnap.testing import FakeClock, FakeSource


def _make(
    n: int = 4, policy: Policy = Policy.TOTAL_REQUESTS, **config: object
) -> tuple[DPBudget, FakeSource, FakeClock]:
    clock = FakeClock()
    source = FakeSource(n, clock, stale_after_s=1.0)
    cfg = BudgetConfig(policy=policy, stale_after_s=1.0, **config)  # type: ignore[arg-type]
    return DPBudget(source, cfg, clock=clock), source, clock


def _publish_all(source: FakeSource, **fields: int) -> None:
    for rank in range(source.dp_size):
        source.publish(rank, **fields)


def test_fake_source_satisfies_protocol() -> None:
    assert isinstance(FakeSource(2), SnapshotSource)


def test_refresh_at_most_once_per_interval() -> None:
    budget, source, clock = _make(refresh_interval_s=0.02)
    _publish_all(source)
    for _ in range(50):
        budget.dispatch(1)
    assert source.reads == 1
    clock.advance(0.019)
    budget.dispatch(1)
    assert source.reads == 1
    clock.advance(0.001)
    budget.dispatch(1)
    budget.dispatch(1)
    assert source.reads == 2
    assert budget.refresh(force=True) and source.reads == 3


def test_idle_ties_rotate_instead_of_rank_zero() -> None:
    for policy in (
        Policy.TOTAL_REQUESTS,
        Policy.TOTAL_TOKENS,
        Policy.WORK_OVER_THROUGHPUT,
        Policy.REQUESTS_THEN_WORK,
    ):
        budget, source, _ = _make(4, policy)
        _publish_all(source)
        picks = [budget.dispatch(0).rank for _ in range(8)]
        assert picks == [0, 1, 2, 3, 0, 1, 2, 3], policy


def test_burst_inside_one_window_spreads_and_survives_refresh() -> None:
    budget, source, clock = _make(4)
    _publish_all(source)
    picks = Counter(budget.dispatch(10).rank for _ in range(40))
    assert set(picks.values()) == {10}
    # The schedulers publish before seeing any of it: the budget must not forget the burst.
    clock.advance(0.02)
    _publish_all(source)
    budget.refresh()
    assert budget.budget_requests().tolist() == [10, 10, 10, 10]


def test_overwrite_baseline_forgets_in_flight_requests() -> None:
    clock = FakeClock()
    source = FakeSource(4, clock)
    base = OverwriteBudget(source, clock=clock)
    _publish_all(source)
    source.publish(2, num_running_reqs=1)
    picks = [base.dispatch(10).rank for _ in range(12)]
    assert picks[:4] == [0, 1, 3, 0]  # lowest count, lowest rank on ties
    clock.advance(0.02)
    _publish_all(source)  # snapshots taken before the requests arrived
    base.refresh()
    assert sum(base.counts) == 0
    assert [base.dispatch(1).seq for _ in range(1)] == [5]  # numbering still gap-free


def test_snapshot_with_same_or_older_seq_is_ignored() -> None:
    budget, source, _ = _make(2, refresh_interval_s=0.0)
    source.publish(0, num_running_reqs=5)
    old = source.publish(1, num_running_reqs=1)
    source.publish(1, num_running_reqs=2)
    budget.refresh()
    assert budget.reported_reqs.tolist() == [5, 2]
    ignored = budget.stats.ignored_snapshots
    source.put(old)  # an older record of rank 1, and rank 0 unchanged
    budget.refresh()
    assert budget.reported_reqs.tolist() == [5, 2]
    assert budget.stats.ignored_snapshots == ignored + 2


def test_stale_is_saturated_dead_excluded() -> None:
    budget, source, clock = _make(3, refresh_interval_s=0.0)
    source.publish(0, num_running_reqs=50)
    clock.advance(2.0)
    source.publish(1, num_running_reqs=10)
    source.publish(2, num_running_reqs=0)
    source.dead[2] = True
    picks = {budget.dispatch(1).rank for _ in range(20)}
    assert picks == {1}  # rank 0 stale (saturated), rank 2 dead (excluded)


def test_stale_ignore_policy_scores_stale_ranks() -> None:
    budget, source, clock = _make(2, refresh_interval_s=0.0, stale_policy=StalePolicy.IGNORE)
    source.publish(0, num_running_reqs=0)
    clock.advance(2.0)
    source.publish(1, num_running_reqs=10)
    assert [budget.dispatch(1).rank for _ in range(3)] == [0, 0, 0]


def test_all_stale_fails_open_to_round_robin() -> None:
    budget, source, clock = _make(3, refresh_interval_s=0.0)
    source.publish(0, num_running_reqs=100)
    source.publish(1)
    source.publish(2)
    source.dead[1] = True
    clock.advance(5.0)
    picks = [budget.dispatch(1).rank for _ in range(4)]
    assert budget.failing_open
    assert picks == [0, 2, 0, 2]  # round robin over the ranks that are not dead
    assert budget.stats.fail_open_decisions == 4
    source.dead[0] = source.dead[2] = True
    assert [budget.dispatch(1).rank for _ in range(3)] == [0, 1, 2]  # all dead: every rank


def test_never_published_fails_open() -> None:
    budget, _, _ = _make(3)
    assert [budget.dispatch(1).rank for _ in range(4)] == [0, 1, 2, 0]
    assert budget.failing_open


def test_pinned_requests_count_in_the_budget() -> None:
    budget, source, _ = _make(2)
    _publish_all(source)
    seqs = [budget.dispatch(5, rank=0).seq for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert budget.budget_requests().tolist() == [3, 0]
    assert [budget.dispatch(5).rank for _ in range(3)] == [1, 1, 1]
    assert budget.stats.pinned == 3


def test_epoch_change_resets_the_rank() -> None:
    budget, source, _ = _make(2, refresh_interval_s=0.0)
    _publish_all(source)
    for _ in range(4):
        budget.dispatch(1, rank=1)
    source.publish(1, epoch=2, num_running_reqs=0)  # restarted: the old process's work is gone
    budget.refresh()
    assert budget.budget_requests().tolist() == [0, 0]
    assert budget.stats.epoch_resets == 1
    assert budget.dispatch(1, rank=1).seq == 5  # numbering continues
    current = source.snapshots[1]
    assert current is not None
    old = msgspec.structs.replace(current, epoch=1, seq=99)
    source.put(old)
    budget.refresh()
    assert budget.budget_requests().tolist() == [0, 1]


def test_total_tokens_prefers_fewer_tokens_then_fewer_requests() -> None:
    budget, source, _ = _make(3, Policy.TOTAL_TOKENS, refresh_interval_s=0.0)
    source.publish(0, num_total_tokens=100, num_running_reqs=1)
    source.publish(1, num_total_tokens=50, num_running_reqs=5)
    source.publish(2, num_total_tokens=50, num_running_reqs=2)
    assert budget.dispatch(10).rank == 2
    assert budget.dispatch(10).rank == 1  # 50 < 60 tokens


def test_work_over_throughput_uses_rate_and_kv_pressure() -> None:
    budget, source, _ = _make(3, Policy.WORK_OVER_THROUGHPUT, refresh_interval_s=0.0)
    common = {"max_total_num_tokens": 1000}
    source.publish(
        0,
        num_total_tokens=400,
        gen_throughput=100.0,
        num_used_tokens=400,
        num_waiting_reqs=2,
        **common,
    )
    source.publish(1, num_total_tokens=400, gen_throughput=400.0, num_used_tokens=960, **common)
    source.publish(2, num_total_tokens=400, gen_throughput=400.0, num_used_tokens=400, **common)
    budget.refresh()
    scores = budget.scores(10)
    assert scores[2] < scores[0]  # same work, faster rank
    assert scores[2] < scores[1]  # same work and rate, KV nearly full
    assert budget.dispatch(10).rank == 2


def test_requests_then_work_keeps_requests_level_then_takes_the_least_work() -> None:
    budget, source, _ = _make(3, Policy.REQUESTS_THEN_WORK, refresh_interval_s=0.0)
    for rank, (reqs, tokens) in enumerate([(1, 100), (3, 10), (2, 5000)]):
        source.publish(
            rank, num_running_reqs=reqs, num_total_tokens=tokens, max_total_num_tokens=100_000
        )
    budget.refresh()
    # Rank 1 has the least work but two requests more than rank 0: not eligible.
    assert budget.scores(10)[1] == float("inf")
    # 1: ranks 0 and 2 eligible, 0 has less work. 2: the fewest is now 2, so every rank is
    # eligible and rank 1's small work wins. 3, 4: rank 1 (4) is out again, 0 beats 2 on work.
    # 5: only rank 2 is within the slack of the fewest.
    assert [budget.dispatch(10).rank for _ in range(5)] == [0, 1, 0, 0, 2]
    assert budget.budget_requests().tolist() == [4, 4, 3]


def test_requests_then_work_slack_zero_is_fewest_requests_first() -> None:
    budget, source, _ = _make(3, Policy.REQUESTS_THEN_WORK, refresh_interval_s=0.0, request_slack=0)
    source.publish(0, num_running_reqs=2, num_total_tokens=0, max_total_num_tokens=1000)
    source.publish(1, num_running_reqs=1, num_total_tokens=900, max_total_num_tokens=1000)
    source.publish(2, num_running_reqs=1, num_total_tokens=500, max_total_num_tokens=1000)
    assert [budget.dispatch(1).rank for _ in range(3)] == [2, 1, 0]


def test_requests_then_work_leaves_a_rank_that_stops_acknowledging() -> None:
    # A killed scheduler acknowledges nothing: its budget only grows while the others drain.
    budget, source, clock = _make(4, Policy.REQUESTS_THEN_WORK)
    _publish_all(source)
    sent = [0] * 4
    acked = [0] * 4
    for _ in range(40):
        d = budget.dispatch(50)
        sent[d.rank] = d.seq
        clock.advance(0.02)
        for rank in (0, 1, 2):  # rank 3 is gone: it never publishes again
            acked[rank] = sent[rank]
            source.publish(rank, last_accepted_dispatch_seq=acked[rank])  # served at once
    assert sent[3] <= 2


def test_power_of_two_spreads_a_burst_at_large_dp_and_avoids_unusable_ranks() -> None:
    budget, source, clock = _make(256, Policy.POWER_OF_TWO, seed=7)
    _publish_all(source, max_total_num_tokens=10_000)
    source.dead[5] = True
    clock.advance(2.0)  # every rank stale ...
    for rank in range(256):
        if rank not in (5, 9):
            source.publish(rank, max_total_num_tokens=10_000)
    counts = Counter(budget.dispatch(10).rank for _ in range(2560))
    assert 5 not in counts and 9 not in counts  # ... but 9 (stale) and 5 (dead) are excluded
    assert max(counts.values()) - min(counts.values()) <= 6  # one random choice: about 18


def test_power_of_two_is_reproducible_for_a_seed() -> None:
    def picks(seed: int) -> list[int]:
        budget, source, _ = _make(8, Policy.POWER_OF_TWO, seed=seed)
        _publish_all(source)
        return [budget.dispatch(1).rank for _ in range(40)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)


def test_power_of_two_takes_the_better_of_its_pair() -> None:
    budget, source, _ = _make(2, Policy.POWER_OF_TWO, refresh_interval_s=0.0)
    source.publish(0, num_running_reqs=5, max_total_num_tokens=1000)
    source.publish(1, num_running_reqs=0, max_total_num_tokens=1000)
    assert [budget.dispatch(1).rank for _ in range(4)] == [1, 1, 1, 1]  # 0, 1, 2, 3 < 5 - 1
    source.publish(0, num_running_reqs=0, num_total_tokens=0, max_total_num_tokens=1000)
    source.publish(1, num_running_reqs=0, num_total_tokens=800, max_total_num_tokens=1000)
    budget.refresh()
    assert budget.dispatch(1).rank == 0  # same requests (within the slack): less work wins


def test_epochs_are_a_copy_of_the_accepted_epochs() -> None:
    budget, source, _ = _make(2, refresh_interval_s=0.0)
    source.publish(0, epoch=3)
    budget.refresh()
    epochs = budget.epochs
    assert epochs.tolist() == [3, 0]
    epochs[0] = 99
    assert budget.epochs.tolist() == [3, 0]


def test_round_robin_baseline_reads_nothing_and_numbers_each_rank() -> None:
    base = RoundRobinBaseline(3)
    picks = [base.dispatch(1) for _ in range(4)]
    assert [d.rank for d in picks] == [0, 1, 2, 0]
    assert [d.seq for d in picks] == [1, 1, 1, 2]
    assert base.dispatch(1, rank=2).seq == 2  # pinned: numbered, the turn does not move
    assert base.dispatch(1).rank == 1
    assert not base.refresh(force=True)
    with pytest.raises(UsageError, match="dp_rank=3"):
        base.dispatch(1, rank=3)
    with pytest.raises(UsageError, match="dp_size"):
        RoundRobinBaseline(0)


def test_warns_when_publish_period_exceeds_staleness_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget, source, clock = _make(2, refresh_interval_s=0.0)
    _publish_all(source)
    budget.refresh()
    clock.advance(1.5)
    source.publish(0)
    with caplog.at_level(logging.WARNING, logger="dp_controller"):
        budget.refresh()
        budget.refresh(force=True)
    warnings = [r for r in caplog.records if "staleness budget" in r.getMessage()]
    assert len(warnings) == 1 and "dp_rank=0" in warnings[0].getMessage()


def test_config_and_workload_misuse() -> None:
    with pytest.raises(UsageError, match="refresh_interval_s"):
        BudgetConfig(refresh_interval_s=-1)
    with pytest.raises(UsageError, match="request_slack=-1"):
        BudgetConfig(request_slack=-1)
    with pytest.raises(UsageError, match="unknown workload"):
        preset("nope")


def test_workload_is_reproducible() -> None:
    spec = preset("bursty", duration_s=1.3)
    a, b = generate_trace(spec), generate_trace(spec)
    assert a == b and len(a) > 0
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(a))
    assert generate_trace(preset("bursty", duration_s=1.3, seed=1)) != a
    assert any(r.group >= 0 for r in a)


# --- the ledger invariant through the whole budget, against a scheduler model --------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(["dispatch", "pin", "absorb", "finish", "publish", "replay"]),
        st.integers(0, 2),
        st.integers(0, 40),
    ),
    max_size=100,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_budget_is_reported_plus_unacknowledged(ops: list[tuple[str, int, int]]) -> None:
    n = 3
    budget, source, clock = _make(n, refresh_interval_s=0.0)
    sent: list[set[int]] = [set() for _ in range(n)]
    absorbed: list[set[int]] = [set() for _ in range(n)]
    finished: list[set[int]] = [set() for _ in range(n)]
    history: list[list[msgspec.Struct]] = [[] for _ in range(n)]
    accepted: list[tuple[int, int]] = [(0, 0)] * n  # (reported, ack) of the newest record
    for op, rank, arg in ops:
        clock.advance(0.001)
        if op in ("dispatch", "pin"):
            d = budget.dispatch(arg, rank=rank if op == "pin" else None)
            sent[d.rank].add(d.seq)
        elif op == "absorb":  # any order
            pending = sorted(sent[rank] - absorbed[rank])
            if pending:
                absorbed[rank].add(pending[arg % len(pending)])
        elif op == "finish":
            live = sorted(absorbed[rank] - finished[rank])
            if live:
                finished[rank].add(live[arg % len(live)])
        elif op == "publish":
            ack = 0
            while ack + 1 in absorbed[rank]:
                ack += 1
            reported = len(absorbed[rank] - finished[rank])
            snap = source.publish(rank, num_waiting_reqs=reported, last_accepted_dispatch_seq=ack)
            history[rank].append(snap)
            accepted[rank] = (reported, max(ack, accepted[rank][1]))
        elif history[rank]:  # replay an older record: must be ignored
            source.put(history[rank][arg % len(history[rank])])  # type: ignore[arg-type]
        budget.refresh()
        for r in range(n):
            reported, ack = accepted[r]
            unacked = sum(1 for s in sent[r] if s > ack)
            assert budget.budget_requests()[r] == reported + unacked
            outstanding = len(sent[r] - finished[r])
            assert budget.budget_requests()[r] >= outstanding  # a snapshot never erases work
        if op == "replay" and history[rank]:
            source.put(history[rank][-1])  # type: ignore[arg-type]
