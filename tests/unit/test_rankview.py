"""RankRecords and RankView: what a refresh accepts, and what the scorers see until the next."""

from __future__ import annotations

import numpy as np

from dp_controller import BudgetConfig, StalePolicy
from dp_controller.rankview import RankHealth, RankRecords, RankView
from loadsnap.testing import FakeClock, FakeSource

F, S, D = RankHealth.FRESH, RankHealth.STALE, RankHealth.DEAD


def _view(health: list[RankHealth], usable: list[bool], **numbers: list[float]) -> RankView:
    n = len(health)
    cols = {
        name: np.array(numbers.get(name, [0.0] * n), dtype=float)
        for name in ("reqs", "tokens", "used", "cap", "throughput", "waiting")
    }
    return RankView(
        np.array(health, dtype=np.uint8),
        np.array(usable),
        throughput_floor=10.0,
        **cols,  # type: ignore[arg-type]
    )


def test_usable_alive_rotations_and_fail_open() -> None:
    view = _view([F, S, D, F], [True, False, False, True])
    assert (view.usable, view.alive, view.fail_open) == ([0, 3], [0, 1, 3], False)
    assert view.penalty.tolist() == [0.0, np.inf, np.inf, 0.0]
    assert view.rotations == [[0, 3], [3, 0], [3, 0], [3, 0]]
    dead = _view([D, D], [False, False])
    assert dead.fail_open and dead.alive == [0, 1]  # all dead: round robin over every rank


def test_rate_is_reported_throughput_only_for_a_rank_with_a_queue() -> None:
    view = _view(
        [F, F, F, S],
        [True, True, True, False],
        throughput=[100.0, 400.0, 5.0, 900.0],
        waiting=[2.0, 0.0, 1.0, 0.0],
    )
    # Queued ranks at their own throughput (floored); idle ones as fast as the best usable.
    assert view.rate.tolist() == [100.0, 400.0, 10.0, 400.0]
    assert view.rate_l == view.rate.tolist()


def test_the_view_is_a_copy_of_the_records() -> None:
    clock = FakeClock()
    source = FakeSource(2, clock, stale_after_s=1.0)
    source.publish(0, num_running_reqs=3)
    records = RankRecords(2, stale_after_s=1.0)
    records.take(source.hot_table())
    view = RankView.of(records, BudgetConfig(), scalar=True, rotations=True)
    assert view.reqs.tolist() == [3.0, 0.0] and view.usable == [0]
    source.publish(0, num_running_reqs=7)
    records.take(source.hot_table())
    assert view.reqs.tolist() == [3.0, 0.0] and view.reqs_l == [3.0, 0.0]
    clock.advance(2.0)  # rank 0 turns stale; IGNORE still scores a rank with a record
    records.take(source.hot_table())
    ignoring = RankView.of(
        records, BudgetConfig(stale_policy=StalePolicy.IGNORE), scalar=False, rotations=False
    )
    assert ignoring.usable == [0] and ignoring.reqs_l == [] and ignoring.rotations == []


def test_records_accept_forward_report_restarts_and_keep_an_older_epoch() -> None:
    source = FakeSource(2)
    records = RankRecords(2, stale_after_s=10.0)
    source.publish(0, epoch=2, num_running_reqs=1)
    taken = records.take(source.hot_table())
    assert taken.accepted.tolist() == [True, False] and taken.restarted == []
    assert records.take(source.hot_table()).ignored == 1  # same sequence again
    source.publish(0, epoch=3, num_running_reqs=4)
    taken = records.take(source.hot_table())
    assert taken.restarted == [0] and records.reqs[0] == 4.0 and records.epoch[0] == 3
    old = source.publish(0, epoch=2, num_running_reqs=9)
    source.dead[0] = True
    source.put(old)
    taken = records.take(source.hot_table())
    assert taken.ignored == 1 and records.reqs[0] == 4.0
    assert records.health[0] == RankHealth.FRESH  # an older epoch's standing is not taken
