"""LENGTH_AWARE: output-length classes, the outstanding tracker and the length-aware decision."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.budget import SCALAR_MAX_DP
from dp_controller.cli import POLICIES, make_dispatcher
from dp_controller.cli import main as controller_main
from dp_controller.outstanding import N_LENGTH_CLASSES, Outstanding, length_class
from loadsnap.errors import UsageError
from loadsnap.testing import FakeClock, FakeSource


def _make(
    n: int = 4,
    *,
    publish: bool = True,
    policy: Policy = Policy.LENGTH_AWARE,
    **config: object,
) -> tuple[DPBudget, FakeSource, FakeClock]:
    clock = FakeClock()
    source = FakeSource(n, clock, stale_after_s=1.0)
    if publish:
        for rank in range(n):
            source.publish(rank)
    cfg = BudgetConfig(
        policy=policy,
        stale_after_s=1.0,
        refresh_interval_s=0.0,
        **config,  # type: ignore[arg-type]
    )
    return DPBudget(source, cfg, clock=clock), source, clock


def _send(budget: DPBudget, prompt: int, out: int, rank: int | None = None) -> tuple[int, int]:
    d = budget.dispatch(prompt + out, rank, max_new_tokens=out)
    return d.rank, d.seq


# --- classes and the tracker --------------------------------------------------------------------


def test_length_class_is_a_power_of_two_bucket_of_max_new_tokens() -> None:
    assert [length_class(m) for m in (None, 0, 1, 2, 3, 4, 5, 8, 9)] == [0, 0, 1, 2, 3, 3, 4, 4, 5]
    assert length_class(32) == length_class(17) == 6 and length_class(33) == 7
    assert length_class(64) == 7 and length_class(65) == length_class(128) == 8
    assert length_class(2**80) == N_LENGTH_CLASSES - 1


_tracker_ops = st.lists(
    st.tuples(
        st.sampled_from(["record", "complete", "complete_bogus", "reset"]),
        st.integers(0, 2),  # rank
        st.integers(0, 9),  # class
        st.integers(0, 700),  # prompt tokens / which entry
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(_tracker_ops, st.booleans())
def test_outstanding_counts_are_dispatched_minus_completed_whatever_the_interleaving(
    ops: list[tuple[str, int, int, int]], arrays: bool
) -> None:
    n = 3
    tracker = Outstanding(n, arrays=arrays)
    model: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]  # seq -> (class, prompt)
    issued = [0] * n
    for op, rank, cls, arg in ops:
        if op == "record":
            issued[rank] += 1
            tracker.record(rank, issued[rank], cls, arg)
            model[rank][issued[rank]] = (cls, arg)
        elif op == "complete" and model[rank]:
            seq = sorted(model[rank])[arg % len(model[rank])]  # any order
            assert tracker.complete(rank, seq)
            del model[rank][seq]
            assert not tracker.complete(rank, seq)  # a second report changes nothing
        elif op == "complete_bogus":
            assert not tracker.complete(rank, issued[rank] + 1 + arg)
            assert not tracker.complete(n + rank, 1)
        elif op == "reset":
            dropped = set(model[rank])
            assert tracker.reset_rank(rank) == len(dropped)
            model[rank].clear()
            for seq in dropped:  # the controller reports them failed afterwards: no-ops
                assert not tracker.complete(rank, seq)
        for r in range(n):
            entries = model[r].values()
            assert tracker.count[r] == len(model[r])
            assert tracker.prompt_tokens[r] == sum(p for _, p in entries)
            expected = [sum(1 for c, _ in entries if c == k) for k in range(N_LENGTH_CLASSES)]
            assert tracker.by_class[r] == expected
            assert min(tracker.by_class[r]) >= 0
            assert tracker.seqs(r) == sorted(model[r])
        if tracker.arrays is not None:
            count, prompts, by_class = tracker.arrays
            assert count.tolist() == tracker.count
            assert prompts.tolist() == tracker.prompt_tokens
            assert by_class.tolist() == tracker.by_class
    assert tracker.forgotten == 0


def test_outstanding_forgets_the_oldest_beyond_its_cap() -> None:
    tracker = Outstanding(1, max_per_rank=3)
    for seq in range(1, 6):
        tracker.record(0, seq, 1, 10)
    assert tracker.seqs(0) == [3, 4, 5] and tracker.forgotten == 2
    assert (tracker.count[0], tracker.prompt_tokens[0], tracker.by_class[0][1]) == (3, 30, 3)
    assert not tracker.complete(0, 1) and tracker.complete(0, 4)
    tracker.record(0, 5, 2, 7)  # the same seq again replaces its entry
    assert (tracker.count[0], tracker.prompt_tokens[0]) == (2, 17)
    with pytest.raises(UsageError):
        Outstanding(0)


# --- the budget ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["dispatch", "pin", "unknown", "complete", "restart", "dead"]),
            st.integers(0, 2),
            st.integers(0, 600),
            st.sampled_from([1, 16, 32, 64, 128, 1000]),
        ),
        max_size=80,
    )
)
def test_budget_outstanding_equals_dispatched_minus_completed(
    ops: list[tuple[str, int, int, int]],
) -> None:
    n = 3
    budget, source, clock = _make(n)
    model: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]
    epochs = [1] * n
    for op, rank, prompt, out in ops:
        clock.advance(0.001)
        if op in ("dispatch", "pin"):
            r, seq = _send(budget, prompt, out, rank if op == "pin" else None)
            model[r][seq] = (length_class(out), prompt)
        elif op == "unknown":  # an old caller: no max_new_tokens
            d = budget.dispatch(prompt)
            model[d.rank][d.seq] = (0, prompt)
        elif op == "complete" and model[rank]:
            seq = sorted(model[rank])[prompt % len(model[rank])]
            assert budget.complete(rank, seq)
            del model[rank][seq]
        elif op == "restart":  # a new process: the budget drops what the old one held
            epochs[rank] += 1
            source.publish(rank, epoch=epochs[rank])
            budget.refresh()
            model[rank].clear()
        elif op == "dead":  # excluded, but what it holds stays until reported failed
            source.dead[rank] = not source.dead[rank]
        budget.refresh()
        out_ = budget.outstanding
        for r in range(n):
            assert out_.count[r] == len(model[r])
            assert out_.prompt_tokens[r] == sum(p for _, p in model[r].values())
            for cls in {c for c, _ in model[r].values()} | {0, 6}:
                assert out_.by_class[r][cls] == sum(1 for c, _ in model[r].values() if c == cls)


def test_a_long_prompt_goes_where_the_least_prompt_work_is_outstanding() -> None:
    budget, _, _ = _make(3, request_slack=5)
    _send(budget, 100, 32, rank=0)
    _send(budget, 900, 32, rank=1)
    _send(budget, 400, 32, rank=2)
    assert _send(budget, 512, 64)[0] == 0


def test_a_short_request_goes_where_its_class_is_scarcest() -> None:
    budget, _, _ = _make(2, request_slack=5)
    # Same prompt work and request counts: rank 0 holds two 128-token outputs, rank 1 two 32s.
    for out, rank in ((128, 0), (128, 0), (32, 1), (32, 1)):
        _send(budget, 64, out, rank=rank)
    assert _send(budget, 64, 32)[0] == 0
    assert _send(budget, 64, 128)[0] == 1


def test_request_slack_bounds_the_spread_of_outstanding_requests() -> None:
    budget, _, _ = _make(2, request_slack=0)
    _send(budget, 1, 32, rank=0)
    # Rank 1 holds far more prompt work, but rank 0 already has one request more.
    _send(budget, 5000, 32, rank=1)
    _send(budget, 1, 32, rank=0)
    assert _send(budget, 10, 32)[0] == 1


def test_a_completion_frees_the_rank_at_once_without_a_snapshot() -> None:
    budget, source, _ = _make(2, request_slack=0)
    sent = [_send(budget, 50, 32) for _ in range(4)]
    assert [r for r, _ in sent] == [0, 1, 0, 1]  # next in turn: rank 0
    reads = source.reads
    assert budget.complete(*sent[1]) and not budget.complete(*sent[1])
    assert _send(budget, 50, 32)[0] == 1  # rank 1 holds one request fewer now
    assert budget.outstanding.count == [2, 2]
    assert budget.ledger.unacked_count.tolist() == [2, 3]  # the ledger only moves on acks
    assert source.reads == reads + 1  # only the dispatch's own refresh


def test_idle_ties_rotate_and_old_callers_work() -> None:
    budget, _, _ = _make(4)
    assert [budget.dispatch(10).rank for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert budget.outstanding.by_class[0][0] == 2  # class 0: bound unknown
    assert budget.outstanding.prompt_tokens[0] == 20  # est_tokens counted as prompt


def test_unusable_ranks_are_skipped_and_fail_open_is_still_counted() -> None:
    budget, source, clock = _make(3)
    source.dead[1] = True
    budget.refresh()
    assert {_send(budget, 10, 32)[0] for _ in range(6)} == {0, 2}
    clock.advance(2.0)  # every rank stale: round robin over the live ranks
    picks = [_send(budget, 10, 32)[0] for _ in range(4)]
    assert budget.failing_open and set(picks) == {0, 2}
    assert budget.stats.fail_open_decisions == 4
    assert sum(budget.outstanding.count) == 10


def test_never_published_fails_open_and_pinned_rank_is_checked() -> None:
    budget, _, _ = _make(2, publish=False)
    assert [_send(budget, 10, 32)[0] for _ in range(3)] == [0, 1, 0]
    with pytest.raises(UsageError, match="dp_rank"):
        _send(budget, 10, 32, rank=5)
    with pytest.raises(UsageError, match="est_tokens"):
        budget.dispatch(-1)
    assert budget.outstanding.count == [2, 1]


def test_restart_drops_the_rank_and_late_completions_match_nothing() -> None:
    budget, source, _ = _make(2)
    held = [_send(budget, 10, 64, rank=0) for _ in range(3)]
    source.publish(0, epoch=2)
    budget.refresh()
    assert budget.outstanding.count[0] == 0 and budget.stats.epoch_resets == 1
    assert not any(budget.complete(*d) for d in held)
    assert _send(budget, 10, 64, rank=0)[1] == 4  # numbering continues


def test_other_policies_track_nothing() -> None:
    budget, _, _ = _make(2, policy=Policy.REQUESTS_THEN_WORK)
    d = budget.dispatch(40, max_new_tokens=8)
    assert budget.outstanding.count == [0, 0] and not budget.complete(d.rank, d.seq)


def test_weights_are_validated() -> None:
    for name in ("class_weight", "count_weight"):
        for bad in (-1.0, math.inf, math.nan):
            with pytest.raises(UsageError, match=name):
                BudgetConfig(**{name: bad})  # type: ignore[arg-type]


def test_scores_pack_the_rule_and_mark_ineligible_ranks() -> None:
    budget, source, _ = _make(3, request_slack=0)
    _send(budget, 100, 32, rank=0)
    source.dead[2] = True
    budget.refresh()
    scores = budget.scores(100 + 32, max_new_tokens=32)
    assert scores.tolist() == [np.inf, 0.0, np.inf]  # one request too many; idle; dead
    budget, _, _ = _make(2, request_slack=1, class_weight=2.0, count_weight=3.0)
    first = _send(budget, 100, 32)  # a decision: the prompt average starts at 100
    assert first[0] == 0 and budget._pbar == 100.0
    scores = budget.scores(50 + 32, max_new_tokens=32)
    assert scores[0] == 50 / 100.0**2 * 100 + 2.0 * 1 + 3.0 * 1 and scores[1] == 0.0
    assert budget.scores(50)[0] == 50 / 100.0**2 * 100 + 3.0 * 1  # class 0: none of it held


def test_large_deployments_take_the_vector_path() -> None:
    n = SCALAR_MAX_DP + 8
    budget, _, _ = _make(n, request_slack=0)
    assert budget.outstanding.arrays is not None
    picks = [_send(budget, 64, 32)[0] for _ in range(n)]
    assert sorted(picks) == list(range(n))  # a burst spreads one per rank
    big = _send(budget, 4000, 128, rank=5)
    assert big[0] == 5
    assert budget.complete(*big)
    count, prompts, by_class = budget.outstanding.arrays
    assert count.tolist() == [1] * n and prompts.tolist() == [64] * n
    assert by_class[:, length_class(32)].tolist() == [1] * n


@pytest.mark.parametrize("seed", range(6))
def test_a_burst_keeps_classes_and_prompt_work_level(seed: int) -> None:
    # A seeded burst of the bench's mix of prompt and output lengths, 24 per rank: requests
    # within request_slack + 1, each class within one, prompt work within about one long prompt
    # (REQUESTS_THEN_WORK leaves 600-1,800 prompt tokens between ranks on these seeds).
    rng = random.Random(seed)
    n = 4
    budget, _, _ = _make(n)
    for _ in range(96):
        p = rng.choices([32, 128, 512], [0.5, 0.4, 0.1])[0]
        m = rng.choices([32, 64, 128], [0.5, 0.4, 0.1])[0]
        _send(budget, p, m)
    out = budget.outstanding
    assert max(out.count) - min(out.count) <= 2
    for cls in (length_class(32), length_class(64), length_class(128)):
        per_rank = [out.by_class[r][cls] for r in range(n)]
        assert max(per_rank) - min(per_rank) <= 1, (cls, per_rank)
    assert max(out.prompt_tokens) - min(out.prompt_tokens) <= 640, out.prompt_tokens


def test_cli_offers_the_policy_and_passes_its_tunables() -> None:
    assert Policy.LENGTH_AWARE.value in POLICIES
    config = BudgetConfig(request_slack=3, class_weight=0.5, count_weight=1.5)
    dispatcher = make_dispatcher("length_aware", FakeSource(2), 2, config)  # type: ignore[arg-type]
    assert isinstance(dispatcher, DPBudget)
    assert dispatcher.config.policy is Policy.LENGTH_AWARE
    assert (dispatcher.config.request_slack, dispatcher.config.class_weight) == (3, 0.5)
    assert dispatcher.config.count_weight == 1.5


def test_cli_replays_a_workload_with_length_aware(
    instance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--instance", instance, "--spawn", "--dp-size", "2", "--policy", "length_aware"]
    argv += ["--workload", "tiny", "--json", "--class-weight", "1", "--drain-timeout-s", "20"]
    assert controller_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"] == "length_aware"
    assert report["finished"] == report["dispatched"] > 0
    assert report["failed"] == report["unfinished"] == 0
