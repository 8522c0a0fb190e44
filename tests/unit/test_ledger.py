"""DispatchLedger: sequences, contiguous acknowledgement, resets, and a model-based property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_controller.ledger import DispatchLedger
from loadsnap.errors import UsageError


def test_record_numbers_each_rank_from_one() -> None:
    ledger = DispatchLedger(2)
    assert [ledger.record(0, 10), ledger.record(1, 5), ledger.record(0, 7)] == [1, 1, 2]
    assert ledger.unacked_count.tolist() == [2, 1]
    assert ledger.unacked_tokens.tolist() == [17, 5]
    assert ledger.outstanding(0) == [(1, 10), (2, 7)]


def test_acknowledge_drops_prefix_and_ignores_older() -> None:
    ledger = DispatchLedger(1)
    for tokens in (1, 2, 4, 8):
        ledger.record(0, tokens)
    assert ledger.acknowledge(0, 2) == 2
    assert ledger.unacked_count.tolist() == [2]
    assert ledger.unacked_tokens.tolist() == [12]
    assert ledger.acknowledge(0, 1) == 0  # an older snapshot changes nothing
    assert ledger.acknowledge(0, 2) == 0
    assert ledger.outstanding(0) == [(3, 4), (4, 8)]


def test_overshoot_is_clamped_and_counted() -> None:
    ledger = DispatchLedger(1)
    ledger.record(0, 3)
    assert ledger.acknowledge(0, 9) == 1
    assert ledger.stats.overshoot_acks == 1
    assert ledger.unacked_count.tolist() == [0]
    assert ledger.record(0, 1) == 2  # numbering is not moved by a bogus acknowledgement
    assert ledger.acknowledge(0, 9) == 1
    assert ledger.acked(0) == 2


def test_reset_drops_entries_and_keeps_numbering() -> None:
    ledger = DispatchLedger(2)
    for _ in range(3):
        ledger.record(1, 4)
    ledger.acknowledge(1, 1)
    assert ledger.reset_rank(1) == 2
    assert ledger.unacked_count.tolist() == [0, 0]
    assert ledger.unacked_tokens.tolist() == [0, 0]
    assert ledger.acked(1) == 3
    assert ledger.record(1, 4) == 4
    assert ledger.acknowledge(1, 2) == 0  # a late old-epoch acknowledgement is below the floor
    assert ledger.unacked_count.tolist() == [0, 1]
    assert ledger.stats.as_dict()["reset_dropped"] == 2


def test_rebase_continues_numbering_after_a_running_schedulers_ack() -> None:
    ledger = DispatchLedger(2)
    ledger.record(0, 5)
    assert ledger.rebase(0, 40) == 1  # the unacknowledged entry is dropped
    assert ledger.unacked_count.tolist() == [0, 0]
    assert ledger.tokens_list == [0, 0]
    assert (ledger.issued(0), ledger.acked(0)) == (40, 40)
    assert ledger.record(0, 3) == 41
    assert ledger.acknowledge(0, 39) == 0  # at or below the floor: nothing to drop
    assert ledger.acknowledge(0, 41) == 1
    assert ledger.stats.reset_dropped == 1
    with pytest.raises(UsageError, match="seq=40 issued=41"):
        ledger.rebase(0, 40)  # sequences are never reused
    with pytest.raises(UsageError, match="dp_rank=2"):
        ledger.rebase(2, 1)


def test_misuse_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="dp_size"):
        DispatchLedger(0)
    ledger = DispatchLedger(2)
    with pytest.raises(UsageError, match="dp_rank=2"):
        ledger.record(2, 1)
    with pytest.raises(UsageError, match="est_tokens"):
        ledger.record(0, -1)


# A scheduler model: absorbs requests in any order and acknowledges contiguously.
_ops = st.lists(
    st.tuples(
        st.sampled_from(["dispatch", "absorb", "ack"]),
        st.integers(0, 2),
        st.integers(0, 50),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_unacked_is_exactly_the_sequences_above_the_contiguous_ack(
    ops: list[tuple[str, int, int]],
) -> None:
    ledger = DispatchLedger(3)
    sent: list[dict[int, int]] = [{}, {}, {}]  # seq -> tokens, per rank
    absorbed: list[set[int]] = [set(), set(), set()]
    seen_ack = [0, 0, 0]
    for op, rank, arg in ops:
        if op == "dispatch":
            seq = ledger.record(rank, arg)
            sent[rank][seq] = arg
        elif op == "absorb":
            pending = sorted(set(sent[rank]) - absorbed[rank])
            if pending:
                absorbed[rank].add(pending[arg % len(pending)])
        else:
            contiguous = 0
            while contiguous + 1 in absorbed[rank]:
                contiguous += 1
            # Deliver the current acknowledgement, or (arg odd) an older one.
            ack = contiguous if arg % 2 == 0 else contiguous // 2
            ledger.acknowledge(rank, ack)
            seen_ack[rank] = max(seen_ack[rank], ack)
        for r in range(3):
            above = [s for s in sent[r] if s > seen_ack[r]]
            assert ledger.unacked_count[r] == len(above)
            assert ledger.unacked_tokens[r] == sum(sent[r][s] for s in above)
            # Never under-counting: every request the scheduler has not absorbed is counted.
            assert set(sent[r]) - absorbed[r] <= set(above)
