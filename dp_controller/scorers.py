"""The dispatch policies as data: one scorer per :class:`~dp_controller.policy.Policy`.

Theory of operation
-------------------
Every policy is a rule that scores each candidate rank (lower is better) from the
:class:`~dp_controller.rankview.RankView` of the last refresh plus what was dispatched since
(the ledger's unacknowledged requests and tokens, and for ``LENGTH_AWARE`` what is outstanding).
Each rule is written once per form, side by side in its scorer:

- ``pick(inputs, order, est, cls, a)``, the scalar form: walks the candidate ranks in ``order``
  one at a time in plain Python (cheaper than numpy for a few ranks) and returns the first with
  the lowest score (strict ``<``);
- ``scores(inputs, est, cls, a)``, the vector form: every rank's score as a numpy array, ``inf``
  for a rank that is not a candidate; :func:`rotating_argmin` picks from it.

Both forms do the same arithmetic in the same order, so they compute the same doubles and pick
the same rank when ``order`` is the rotation of the candidates that :func:`rotating_argmin`
starts at (``tests/unit/test_scorers.py`` checks it for every scorer). The request is ``est`` (its
estimated tokens), ``cls`` (its output-length class) and ``a`` (``LENGTH_AWARE``'s weight of
prompt work for it, ``p / pbar**2``); a rule reads only what it needs.

:data:`SCORERS` is the one table from policy to scorer, as h11 keeps every transition of its
state machine in one table. Two flags tell the budget how to feed a scorer:
``rotation_only`` (every candidate ties, so the rotation alone decides: round robin, over the
ranks that are alive rather than usable) and ``pair`` (the rule is applied to two candidates
drawn at random, an O(1) decision at any size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt

from dp_controller.ledger import DispatchLedger
from dp_controller.outstanding import Outstanding
from dp_controller.policy import BudgetConfig, Policy
from dp_controller.rankview import RankView

__all__ = ["SCALAR_MAX_DP", "SCORERS", "ScoreInputs", "Scorer", "rotating_argmin"]

_F64 = npt.NDArray[np.float64]

# Up to this many ranks a decision loops in Python (faster than numpy's per-call overhead).
SCALAR_MAX_DP: Final[int] = 32
# TOTAL_TOKENS packs (tokens, requests) into one float64 key: requests below 2**20 per rank.
_REQ_SCALE: Final[float] = float(2**20)
_MAX_USAGE: Final[float] = 0.999


class ScoreInputs:
    """What every scorer reads: the view of the last refresh and the live counts.

    Single owner; not thread-safe (the budget replaces ``view`` at each refresh and the ledger
    and outstanding counts change with every decision).
    """

    __slots__ = (
        "class_weight",
        "count_weight",
        "kv_weight",
        "ledger",
        "outstanding",
        "slack",
        "view",
    )

    def __init__(
        self,
        view: RankView,
        ledger: DispatchLedger,
        outstanding: Outstanding,
        config: BudgetConfig,
    ) -> None:
        self.view = view
        self.ledger = ledger
        self.outstanding = outstanding
        self.kv_weight = config.kv_weight
        self.slack = float(config.request_slack)
        self.class_weight = config.class_weight
        self.count_weight = config.count_weight


def rotating_argmin(score: _F64, cursor: int) -> int:
    """The rank with the lowest score; among ties, the first at or after ``cursor`` (wrapping)."""
    best = score.min()
    ties = np.flatnonzero(score == best)
    if ties.shape[0] == 1:
        return int(ties[0])
    i = int(np.searchsorted(ties, cursor))
    return int(ties[i if i < ties.shape[0] else 0])


class Scorer:
    """One policy's rule in its scalar and vector forms. Stateless; safe from any thread."""

    rotation_only: ClassVar[bool] = False
    pair: ClassVar[bool] = False

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        """The first rank of ``order`` (non-empty) with the lowest score."""
        raise NotImplementedError

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        """Every rank's score; ``inf`` where a rank is not a candidate."""
        raise NotImplementedError


class RoundRobin(Scorer):
    """``ROUND_ROBIN``: no score; every rank not dead ties, so the rotation decides."""

    rotation_only = True

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        return order[0]

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        score = np.full(s.view.dp_size, np.inf)
        score[s.view.alive] = 0.0
        return score


class TotalRequests(Scorer):
    """``TOTAL_REQUESTS``: reported running + waiting, plus unacknowledged dispatches."""

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        reqs, counts = s.view.reqs_l, s.ledger.count_list
        best = math.inf
        chosen = order[0]
        for k in order:
            score = reqs[k] + counts[k]
            if score < best:
                best, chosen = score, k
        return chosen

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        v = s.view
        return v.reqs + s.ledger.unacked_count + v.penalty


class TotalTokens(Scorer):
    """``TOTAL_TOKENS``: reported plus unacknowledged tokens; requests break ties."""

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        v, ledger = s.view, s.ledger
        reqs, counts = v.reqs_l, ledger.count_list
        tokens, pending_l = v.tokens_l, ledger.tokens_list
        best = math.inf
        chosen = order[0]
        for k in order:
            score = (tokens[k] + pending_l[k]) * _REQ_SCALE + (reqs[k] + counts[k])
            if score < best:
                best, chosen = score, k
        return chosen

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        v, ledger = s.view, s.ledger
        tokens = v.tokens + ledger.unacked_tokens
        return tokens * _REQ_SCALE + (v.reqs + ledger.unacked_count) + v.penalty


def _work_scores(s: ScoreInputs, est: int) -> _F64:
    # WORK_OVER_THROUGHPUT's vector form (RequestsThenWork and PowerOfTwo use it too).
    v = s.view
    pending = s.ledger.unacked_tokens + float(est)
    work = v.tokens + pending
    with np.errstate(divide="ignore", invalid="ignore"):
        usage = (v.used + pending) / v.cap
    usage = np.where(v.cap > 0, usage, 0.0)
    usage = np.minimum(usage, _MAX_USAGE)
    pressure = 1.0 + s.kv_weight * usage * usage / (1.0 - usage)
    return work / v.rate * pressure + v.penalty


def _least_work(s: ScoreInputs, ranks: Sequence[int], est: int) -> int:
    """The first of ``ranks`` with the lowest ``WORK_OVER_THROUGHPUT`` score: the scalar form
    of :func:`_work_scores`, with its arithmetic in its order."""
    v = s.view
    tokens, used, cap, rate = v.tokens_l, v.used_l, v.cap_l, v.rate_l
    pending_l = s.ledger.tokens_list
    e = float(est)
    w = s.kv_weight
    best = math.inf
    chosen = ranks[0]
    for k in ranks:
        pending = pending_l[k] + e
        m = cap[k]
        u = (used[k] + pending) / m if m > 0 else 0.0
        if u > _MAX_USAGE:
            u = _MAX_USAGE
        score = (tokens[k] + pending) / rate[k] * (1.0 + w * u * u / (1.0 - u))
        if score < best:
            best, chosen = score, k
    return chosen


class WorkOverThroughput(Scorer):
    """``WORK_OVER_THROUGHPUT``: queued tokens over the rank's rate, times a convex KV-pressure
    penalty ``1 + w * u**2 / (1 - u)`` (``u``: KV usage with this request, capped)."""

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        return _least_work(s, order, est)

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        return _work_scores(s, est)


class RequestsThenWork(Scorer):
    """``REQUESTS_THEN_WORK``: the ranks within ``request_slack`` of the fewest budgeted
    requests are eligible; among them the lowest ``WORK_OVER_THROUGHPUT`` score."""

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        # _least_work over the eligible ranks, fused into one loop: BudgetConfig's default policy
        # decides about 7% faster than with a filtered list handed to _least_work.
        v, ledger = s.view, s.ledger
        reqs, counts = v.reqs_l, ledger.count_list
        tokens, used, cap, rate = v.tokens_l, v.used_l, v.cap_l, v.rate_l
        pending_l = ledger.tokens_list
        e = float(est)
        w = s.kv_weight
        limit = min([reqs[k] + counts[k] for k in order]) + s.slack
        best = math.inf
        chosen = order[0]
        for k in order:
            if reqs[k] + counts[k] > limit:
                continue
            pending = pending_l[k] + e
            m = cap[k]
            u = (used[k] + pending) / m if m > 0 else 0.0
            if u > _MAX_USAGE:
                u = _MAX_USAGE
            score = (tokens[k] + pending) / rate[k] * (1.0 + w * u * u / (1.0 - u))
            if score < best:
                best, chosen = score, k
        return chosen

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        v = s.view
        reqs = v.reqs + s.ledger.unacked_count + v.penalty
        eligible = reqs <= reqs.min() + s.slack
        return np.where(eligible, _work_scores(s, est), np.inf)


class PowerOfTwo(RequestsThenWork):
    """``POWER_OF_TWO``: the ``REQUESTS_THEN_WORK`` rule over two usable ranks drawn at random.

    ``pick`` takes the pair as ``order`` (the first wins a tie); ``scores`` are
    ``REQUESTS_THEN_WORK``'s over every rank, the same rule when only the pair is usable."""

    pair = True

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        if len(order) == 1:
            return order[0]
        i, j = order[0], order[1]
        reqs, counts = s.view.reqs_l, s.ledger.count_list
        ri, rj = reqs[i] + counts[i], reqs[j] + counts[j]
        slack = s.slack
        if ri > rj + slack:
            return j
        if rj > ri + slack:
            return i
        return _least_work(s, (i, j), est)


class LengthAware(Scorer):
    """``LENGTH_AWARE``: among the ranks within ``request_slack`` of the fewest outstanding
    requests, the lowest ``a * P[r] + class_weight * n[r, cls] + count_weight * n[r]``
    (outstanding prompt tokens, requests of the request's class, requests;
    :mod:`dp_controller.budget`). Reads only what is outstanding, not the reported load."""

    def pick(self, s: ScoreInputs, order: Sequence[int], est: int, cls: int, a: float) -> int:
        out = s.outstanding
        counts, by_class, prompts = out.count, out.by_class, out.prompt_tokens
        limit = min([counts[k] for k in order]) + s.slack
        b, g = s.class_weight, s.count_weight
        best = math.inf
        chosen = order[0]
        for k in order:
            n = counts[k]
            if n > limit:
                continue
            score = a * prompts[k] + b * by_class[k][cls] + g * n
            if score < best:
                best, chosen = score, k
        return chosen

    def scores(self, s: ScoreInputs, est: int, cls: int, a: float) -> _F64:
        out = s.outstanding
        if out.arrays is not None:
            count_a, prompt_a, class_a = out.arrays
            counts = count_a.astype(np.float64)
            by_class = class_a[:, cls].astype(np.float64)
            prompts = prompt_a.astype(np.float64)
        else:
            counts = np.array(out.count, dtype=np.float64)
            by_class = np.array([row[cls] for row in out.by_class], dtype=np.float64)
            prompts = np.array(out.prompt_tokens, dtype=np.float64)
        usable_counts = counts + s.view.penalty
        eligible = usable_counts <= usable_counts.min() + s.slack
        score = a * prompts + s.class_weight * by_class + s.count_weight * counts
        return np.where(eligible, score, np.inf)


SCORERS: Final[Mapping[Policy, Scorer]] = MappingProxyType(
    {
        Policy.ROUND_ROBIN: RoundRobin(),
        Policy.TOTAL_REQUESTS: TotalRequests(),
        Policy.TOTAL_TOKENS: TotalTokens(),
        Policy.WORK_OVER_THROUGHPUT: WorkOverThroughput(),
        Policy.REQUESTS_THEN_WORK: RequestsThenWork(),
        Policy.POWER_OF_TWO: PowerOfTwo(),
        Policy.LENGTH_AWARE: LengthAware(),
    }
)
assert set(SCORERS) == set(Policy), "every policy has a scorer"
