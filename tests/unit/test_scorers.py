"""Scorers: every policy's scalar and vector forms pick the same rank; the table is complete.

``test_scalar_equals_vector`` builds random rank views (health, reported numbers, ledger and
outstanding counts, ties on purpose) and checks, for every scorer in ``SCORERS``, that the
scalar form over the rotated candidates picks the rank the vector form's rotating argmin picks.
``test_scalar_and_vector_budgets_decide_alike`` runs two budgets through the same seeded history,
one deciding with the scalar forms and one with the vector forms, and compares every decision.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp_controller.budget
from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.ledger import DispatchLedger
from dp_controller.outstanding import Outstanding, length_class
from dp_controller.rankview import RankHealth, RankView
from dp_controller.scorers import SCORERS, ScoreInputs, Scorer, rotating_argmin
from loadsnap.testing import FakeClock, FakeSource

_CLASSES = [0, length_class(32), length_class(128)]


def test_every_policy_has_exactly_one_scorer() -> None:
    assert set(SCORERS) == set(Policy)
    assert all(isinstance(s, Scorer) for s in SCORERS.values())
    assert [p for p, s in SCORERS.items() if s.rotation_only] == [Policy.ROUND_ROBIN]
    assert [p for p, s in SCORERS.items() if s.pair] == [Policy.POWER_OF_TWO]


def test_rotating_argmin_takes_the_first_tie_at_or_after_the_cursor() -> None:
    score = np.array([1.0, 0.0, 5.0, 0.0, np.inf])
    assert [rotating_argmin(score, c) for c in range(5)] == [1, 1, 3, 3, 1]
    assert rotating_argmin(np.array([3.0, 2.0]), 0) == 1


@st.composite
def _inputs(draw: st.DrawFn, policy: Policy) -> tuple[ScoreInputs, list[int], int, int, float]:
    """A random view and counts, the candidates in rotated order, and a request."""
    scorer = SCORERS[policy]
    n = draw(st.integers(1, 8))
    health = np.array(
        draw(st.lists(st.sampled_from(list(RankHealth)), min_size=n, max_size=n)), dtype=np.uint8
    )
    usable = health == RankHealth.FRESH
    if scorer.pair:  # the pair rule sees the two drawn ranks as the only usable ones
        pair = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2, unique=True))
        usable = np.isin(np.arange(n), pair)
    if not scorer.rotation_only and not usable.any():
        usable[draw(st.integers(0, n - 1))] = True  # no usable rank is the budget's fail-open

    def column(*values: int) -> np.typing.NDArray[np.float64]:
        # A few values each: equal scores (ties the rotation must break alike) are common.
        return np.array(draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)), float)

    cap = column(0, 512, 4096)
    view = RankView(
        health,
        usable,
        reqs=column(0, 1, 2, 4),
        tokens=column(0, 100, 3000),
        used=np.minimum(column(0, 100, 1000, 4096), cap),
        cap=cap,
        throughput=column(0, 100, 300),
        waiting=column(0, 1),
        throughput_floor=draw(st.sampled_from([1.0, 50.0])),
    )
    ledger = DispatchLedger(n)
    out = Outstanding(n, arrays=draw(st.booleans()))
    for rank, est, cls, prompt, done in draw(
        st.lists(
            st.tuples(
                st.integers(0, n - 1),
                st.sampled_from([0, 10, 600]),
                st.sampled_from(_CLASSES),
                st.sampled_from([0, 32, 128, 512]),
                st.booleans(),
            ),
            max_size=24,
        )
    ):
        seq = ledger.record(rank, est)
        out.record(rank, seq, cls, prompt)
        if done:
            out.complete(rank, seq)
    for rank in range(n):
        ledger.acknowledge(rank, draw(st.integers(0, ledger.issued(rank))))
    config = BudgetConfig(
        policy=policy,
        kv_weight=draw(st.sampled_from([0.0, 4.0])),
        request_slack=draw(st.integers(0, 2)),
        class_weight=draw(st.sampled_from([0.0, 2.0])),
        count_weight=draw(st.sampled_from([0.0, 2.0, 3.0])),
    )
    cursor = draw(st.integers(0, n - 1))
    candidates = view.alive if scorer.rotation_only else view.usable
    order = [r for r in candidates if r >= cursor] + [r for r in candidates if r < cursor]
    est = draw(st.sampled_from([0, 10, 500]))
    cls = draw(st.sampled_from(_CLASSES))
    a = draw(st.integers(0, 512)) / draw(st.sampled_from([1.0, 100.0, 250.0])) ** 2
    return ScoreInputs(view, ledger, out, config), order, est, cls, a


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.value)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_scalar_equals_vector(policy: Policy, data: st.DataObject) -> None:
    scorer = SCORERS[policy]
    inputs, order, est, cls, a = data.draw(_inputs(policy))
    scores = scorer.scores(inputs, est, cls, a)
    assert scores.shape == (inputs.view.dp_size,)
    outside = [r for r in range(inputs.view.dp_size) if r not in order]
    assert np.all(scores[outside] == np.inf)  # a rank that is not a candidate is never chosen
    chosen = scorer.pick(inputs, order, est, cls, a)
    assert chosen in order
    assert chosen == rotating_argmin(scores, order[0])


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.value)
@pytest.mark.parametrize("seed", range(3))
def test_scalar_and_vector_budgets_decide_alike(
    policy: Policy, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same history (publishes, pinned and chosen dispatches, completions, a dead rank)
    through a budget on the scalar forms and one forced onto the vector forms."""
    n = 4
    clock = FakeClock()
    source = FakeSource(n, clock, stale_after_s=1.0)
    config = BudgetConfig(policy=policy, refresh_interval_s=0.0, stale_after_s=1.0)
    scalar = DPBudget(source, config, clock=clock)
    monkeypatch.setattr(dp_controller.budget, "SCALAR_MAX_DP", 0)
    vector = DPBudget(source, config, clock=clock)
    assert vector.outstanding.arrays is not None
    rng = random.Random(seed)
    for step in range(300):
        event = rng.random()
        rank = rng.randrange(n)
        if event < 0.1:
            source.publish(
                rank,
                num_running_reqs=rng.randrange(4),
                num_waiting_reqs=rng.randrange(3),
                num_total_tokens=rng.randrange(3000),
                num_used_tokens=rng.randrange(4096),
                max_total_num_tokens=4096,
                gen_throughput=float(rng.randrange(1, 5) * 100),
                last_accepted_dispatch_seq=max(0, scalar.ledger.issued(rank) - rng.randrange(3)),
            )
        elif event < 0.12:
            source.dead[rank] = True
        elif event < 0.25:
            for budget in (scalar, vector):
                seqs = budget.outstanding.seqs(rank)
                if seqs:
                    budget.complete(rank, seqs[0])
        else:
            prompt = rng.choice([32, 128, 512])
            out = rng.choice([None, 32, 64, 128])
            pin = rank if event < 0.3 else None
            est = prompt + (out or 0)
            picks = [b.dispatch(est, pin, max_new_tokens=out) for b in (scalar, vector)]
            assert picks[0] == picks[1], (step, picks)
    assert scalar.stats.as_dict() == vector.stats.as_dict()
