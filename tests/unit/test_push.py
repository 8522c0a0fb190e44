"""The push schedule (loadsnap._push): first record at once, changes coalesced under the rate
bound, heartbeats while idle, monotonic samples. Pure: the tests pass the time."""

from __future__ import annotations

import pytest

from loadsnap import UsageError
from loadsnap._push import PushSchedule

MIN_S = 0.01
HEARTBEAT_S = 0.5


def _schedule() -> PushSchedule[str]:
    return PushSchedule(MIN_S, HEARTBEAT_S)


def test_every_rank_first_record_is_due_at_once_with_increasing_samples() -> None:
    schedule = _schedule()
    sent = schedule.due([(0, "a", "r0"), (1, "b", "r1")], now_s=100.0)
    assert sent == [("r0", 1), ("r1", 2)]
    assert schedule.due([(0, "a", "r0"), (1, "b", "r1")], now_s=100.001) == []


def test_changes_are_coalesced_under_the_rate_bound() -> None:
    schedule = _schedule()
    schedule.due([(0, "v1", "v1")], now_s=0.0)
    # Three changes inside the bound: none goes out; the latest goes out when it allows.
    for step, value in enumerate(("v2", "v3", "v4"), start=1):
        assert schedule.due([(0, value, value)], now_s=step * MIN_S / 4) == []
    assert schedule.due([(0, "v4", "v4")], now_s=MIN_S) == [("v4", 2)]


def test_unchanged_rank_gets_a_heartbeat_and_nothing_in_between() -> None:
    schedule = _schedule()
    schedule.due([(0, "same", "x")], now_s=0.0)
    for tick in range(1, 50):
        assert schedule.due([(0, "same", "x")], now_s=tick * HEARTBEAT_S / 50) == []
    assert schedule.due([(0, "same", "x")], now_s=HEARTBEAT_S) == [("x", 2)]


def test_next_due_says_how_long_to_sleep() -> None:
    schedule = _schedule()
    assert schedule.next_due_s([(0, "a")], now_s=0.0) == 0.0  # never sent
    schedule.due([(0, "a", "a")], now_s=0.0)
    assert schedule.next_due_s([(0, "a")], now_s=0.1) == pytest.approx(HEARTBEAT_S - 0.1)
    assert schedule.next_due_s([(0, "b")], now_s=0.004) == pytest.approx(MIN_S - 0.004)
    assert schedule.next_due_s([(0, "b")], now_s=1.0) == 0.0


def test_forget_makes_every_rank_due_again_and_samples_keep_counting() -> None:
    schedule = _schedule()
    schedule.due([(0, "a", "a"), (1, "b", "b")], now_s=0.0)
    schedule.forget()
    assert schedule.due([(0, "a", "a"), (1, "b", "b")], now_s=0.001) == [("a", 3), ("b", 4)]


@pytest.mark.parametrize(("min_s", "heartbeat_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bad_intervals_are_refused(min_s: float, heartbeat_s: float) -> None:
    with pytest.raises(UsageError, match="min_interval_s"):
        PushSchedule(min_s, heartbeat_s)
