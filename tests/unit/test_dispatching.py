"""The Dispatcher protocol: what the budget and the baselines offer the controller."""

from __future__ import annotations

import pytest

from dp_controller import BudgetConfig, DPBudget, OverwriteBudget, Policy
from dp_controller.baselines import RoundRobinBaseline
from dp_controller.dispatching import Dispatcher, RankChanges, read_acknowledged
from loadsnap.errors import TransportError
from loadsnap.testing import FakeClock, FakeSource


def _budget(n: int = 3, **config: object) -> tuple[DPBudget, FakeSource, FakeClock]:
    clock = FakeClock()
    source = FakeSource(n, clock, stale_after_s=1.0)
    cfg = BudgetConfig(policy=Policy.TOTAL_REQUESTS, stale_after_s=1.0, **config)  # type: ignore[arg-type]
    return DPBudget(source, cfg, clock=clock), source, clock


@pytest.mark.parametrize("kind", ["budget", "overwrite", "round_robin"])
def test_every_dispatcher_satisfies_the_protocol(kind: str) -> None:
    source = FakeSource(2)
    dispatcher: Dispatcher
    if kind == "budget":
        dispatcher = DPBudget(source)
    elif kind == "overwrite":
        dispatcher = OverwriteBudget(source)
    else:
        dispatcher = RoundRobinBaseline(2)
    assert isinstance(dispatcher, Dispatcher)
    assert dispatcher.take_over() == [0, 0]
    d = dispatcher.dispatch(10, max_new_tokens=4)
    assert d.seq == 1 and 0 <= d.rank < 2
    assert dispatcher.complete(d.rank, d.seq) is False  # nothing outstanding is tracked here
    depth = dispatcher.unacknowledged()
    assert depth is None if kind != "budget" else depth == [1 if r == d.rank else 0 for r in (0, 1)]


def test_budget_reports_dead_ranks_at_each_refresh_and_a_restart_once() -> None:
    budget, source, _ = _budget(3, refresh_interval_s=0.0)
    for rank in range(3):
        source.publish(rank, epoch=1)
    assert budget.take_over() == [0, 0, 0]
    assert budget.changes() is None  # take_over is where changes start
    source.dead[1] = True
    source.publish(2, epoch=2)  # a new process on rank 2
    budget.refresh()
    assert budget.changes() == RankChanges(dead=frozenset({1}), restarted=frozenset({2}))
    assert budget.changes() is None  # nothing read since
    budget.dispatch(1)  # its refresh reads again: rank 1 is still dead, rank 2 not new again
    assert budget.changes() == RankChanges(frozenset({1}), frozenset())


def test_budget_changes_accumulate_restarts_and_refresh_only_when_due() -> None:
    budget, source, clock = _budget(2, refresh_interval_s=0.02)
    source.publish(0, epoch=1)
    source.publish(1, epoch=1)
    budget.take_over()
    reads = source.reads
    assert budget.changes(refresh=True) is None and source.reads == reads  # not due yet
    source.publish(0, epoch=2)
    budget.refresh(force=True)
    source.publish(1, epoch=3)
    budget.refresh(force=True)  # two refreshes, one report: both restarts in it
    assert budget.changes() == RankChanges(frozenset(), frozenset({0, 1}))
    clock.advance(0.02)
    assert budget.changes(refresh=True) == RankChanges(frozenset(), frozenset())
    assert source.reads == reads + 3


def test_a_source_error_reports_nothing() -> None:
    class Broken(FakeSource):
        def hot_table(self):  # type: ignore[no-untyped-def]
            raise TransportError("no segment (segment=/x)")

    budget = DPBudget(Broken(2), BudgetConfig(refresh_interval_s=0.0))
    assert budget.take_over() == [0, 0] and budget.stats.source_errors == 1
    assert budget.changes(refresh=True) is None and budget.stats.source_errors == 2
    assert read_acknowledged(Broken(2), 2) == [0, 0]


def test_take_over_continues_numbering_after_the_acknowledgements() -> None:
    source = FakeSource(3)
    source.publish(0, last_accepted_dispatch_seq=40)
    source.publish(2, last_accepted_dispatch_seq=7)
    assert read_acknowledged(source, 3) == [40, 0, 7]
    assert read_acknowledged(source, 4) == [0, 0, 0, 0]  # another deployment's segment
    budget = DPBudget(source, BudgetConfig(policy=Policy.ROUND_ROBIN))
    assert budget.take_over() == [40, 0, 7]
    assert [budget.dispatch(1, rank=r).seq for r in (0, 1, 2)] == [41, 1, 8]
    overwrite = OverwriteBudget(source)
    assert overwrite.take_over() == [40, 0, 7]
    assert [overwrite.dispatch(1, rank=r).seq for r in (0, 1, 2)] == [41, 1, 8]
    assert overwrite.take_over() == [0, 0, 0]  # already past them: numbering is never reused
    rr = RoundRobinBaseline(3)
    assert rr.take_over() == [0, 0, 0]  # reads nothing: numbers from 1
    assert rr.dispatch(1, rank=0).seq == 1


def test_baselines_report_no_changes_even_for_dead_or_restarted_ranks() -> None:
    clock = FakeClock()
    source = FakeSource(2, clock, stale_after_s=1.0)
    source.publish(0, epoch=1)
    source.publish(1, epoch=1)
    overwrite = OverwriteBudget(source, 0.0, clock=clock)
    overwrite.take_over()
    source.dead[0] = True
    source.publish(1, epoch=2)
    overwrite.dispatch(1)
    reads = source.reads
    assert overwrite.changes(refresh=True) is None and overwrite.changes() is None
    assert source.reads == reads  # it reads only to decide, like the reference
    assert RoundRobinBaseline(2).changes(refresh=True) is None
