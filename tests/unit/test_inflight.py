"""InFlight: exactly one result per request, without sockets, processes or a clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_controller.inflight import FailureReason, InFlight
from loadsnap.errors import UsageError
from scheduler.messages import Finished


def _result(rank: int, rid: int, seq: int) -> Finished:
    return Finished(
        rid=rid,
        dp_rank=rank,
        dispatch_seq=seq,
        prompt_len=3,
        output_len=4,
        cached_tokens=0,
        queue_time_s=0.0,
        ttft_s=0.0,
        e2e_s=0.0,
    )


def test_a_result_is_taken_once_and_only_on_rank_rid_and_seq() -> None:
    flight = InFlight(2)
    flight.add(0, rid=7, seq=1, prompt_len=3, now_ns=0)
    flight.add(0, rid=8, seq=2, prompt_len=5, now_ns=0)
    assert flight.outstanding == [2, 0] and flight.dispatched == [2, 0]
    assert flight.rids(0) == [7, 8] and flight.holds(0) and not flight.holds(1)
    assert not flight.take(_result(0, 7, 41))  # same rid, another dispatch: not ours
    assert not flight.take(_result(1, 7, 1))  # another rank
    assert not flight.take(_result(5, 7, 1))  # no such rank: counted, never raised
    assert flight.unknown_results == 3 and flight.outstanding == [2, 0]
    assert flight.take(_result(0, 7, 1))
    assert not flight.take(_result(0, 7, 1))  # a duplicate
    assert flight.unknown_results == 4 and flight.late_results == 0
    assert flight.outstanding == [1, 0] and flight.dispatched == [2, 0]
    assert flight.rids(0) == [8]


def test_fail_reports_every_request_of_the_rank_then_its_late_results_are_counted() -> None:
    flight = InFlight(2)
    flight.add(1, rid=1, seq=1, prompt_len=3, now_ns=1_000_000_000)
    flight.add(1, rid=2, seq=2, prompt_len=9, now_ns=2_000_000_000)
    flight.add(0, rid=3, seq=1, prompt_len=3, now_ns=0)
    failed = flight.fail(1, FailureReason.RANK_DEAD, now_ns=3_000_000_000)
    assert [(f.rid, f.dp_rank, f.dispatch_seq, f.prompt_len) for f in failed] == [
        (1, 1, 1, 3),
        (2, 1, 2, 9),
    ]
    assert {(f.status, f.reason, f.output_len) for f in failed} == {("failed", "rank_dead", 0)}
    assert [f.e2e_s for f in failed] == [2.0, 1.0]
    assert flight.fail(1, FailureReason.RANK_DEAD, now_ns=0) == []  # nothing held any more
    assert flight.outstanding == [1, 0] and flight.failed_requests == 2
    assert not flight.take(_result(1, 2, 2))  # its result was in transit: late, not reported
    assert not flight.take(_result(1, 2, 3))  # not the failed dispatch: unknown
    assert (flight.late_results, flight.unknown_results) == (1, 1)
    restarted = flight.fail(0, FailureReason.RANK_RESTARTED, now_ns=0)
    assert [(f.rid, f.reason, f.e2e_s) for f in restarted] == [(3, "rank_restarted", 0.0)]


def test_only_the_newest_failures_are_remembered() -> None:
    flight = InFlight(1, remember_failures=2)
    for rid in range(3):
        flight.add(0, rid=rid, seq=rid + 1, prompt_len=1, now_ns=0)
    flight.fail(0, FailureReason.RANK_DEAD, now_ns=0)
    assert not flight.take(_result(0, 0, 1))  # forgotten: reads as unknown
    assert not flight.take(_result(0, 2, 3))
    assert (flight.late_results, flight.unknown_results) == (1, 1)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(UsageError, match="dp_size=0"):
        InFlight(0)
    with pytest.raises(UsageError, match="remember_failures=-1"):
        InFlight(1, remember_failures=-1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 4))
def test_random_interleavings_give_every_request_exactly_one_result(seed: int, n: int) -> None:
    """Adds, results in any order (duplicates and forgeries included), and lost ranks."""
    rng = random.Random(seed)
    flight = InFlight(n)
    sent: dict[int, tuple[int, int]] = {}  # rid -> (rank, seq)
    seqs = [0] * n
    reported: Counter[int] = Counter()
    for rid in range(200):
        rank = rng.randrange(n)
        seqs[rank] += 1
        flight.add(rank, rid, seqs[rank], 1, 0)
        sent[rid] = (rank, seqs[rank])
        for _ in range(rng.randrange(3)):
            old = rng.randrange(rid + 1)
            r, s = sent[old]
            forged = rng.random() < 0.2
            if flight.take(_result(r, old, s + 1000 if forged else s)):
                reported[old] += 1
        if rng.random() < 0.05:
            lost = rng.randrange(n)
            reason = rng.choice(list(FailureReason))
            reported.update(f.rid for f in flight.fail(lost, reason, 0))
        assert sum(flight.outstanding) == len(sent) - sum(reported.values())
    for rank in range(n):
        reported.update(f.rid for f in flight.fail(rank, FailureReason.RANK_DEAD, 0))
    assert set(reported) == set(sent) and set(reported.values()) == {1}
    assert flight.outstanding == [0] * n and sum(flight.dispatched) == len(sent)
