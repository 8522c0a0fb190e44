"""``DPBudget``: per-rank load budget over numpy arrays, with a dispatch ledger.

Theory of operation
-------------------
The budget of a rank is what its scheduler last reported (read from the hot table, no msgpack
decode) plus every dispatch it has not yet acknowledged (:class:`~dp_controller.ledger.
DispatchLedger`). A refresh happens at most once per ``refresh_interval_s`` and only when a
decision needs it; between refreshes each decision adds to the ledger, so a burst inside one
refresh window still spreads over the ranks. A refresh accepts a rank's numbers only when its
record sequence moved forward in the same epoch; a new epoch (a restarted scheduler) resets that
rank's ledger; an older epoch is ignored.

Staleness: fresh ranks are scored; stale (and never-published, torn or invalid) ranks are
treated as saturated, or scored like fresh ones with ``StalePolicy.IGNORE``; dead ranks are
excluded. When no rank can be scored the budget fails open to round robin over the ranks that
are not dead (over every rank if all are dead), counting each such decision, rather than stop.

Ties between equal scores rotate: the search starts after the last chosen rank, so an idle
cluster is served round robin instead of hammering rank 0.

Policies. ``REQUESTS_THEN_WORK`` (ours) first keeps the requests in flight per rank level: only
ranks whose budgeted requests are within ``request_slack`` of the fewest are eligible; among
them the lowest ``WORK_OVER_THROUGHPUT`` score wins, so a large prompt goes to the rank that will
clear its queue first without letting one rank collect many small requests (a token-only score
can: the ranks that did not take a 512-token prompt take the next dozen 32-token ones). With a
slow prefill a rank's queued prompt tokens decide when its batch starts decoding, so the work
term is what keeps the ranks' batches finishing together. ``POWER_OF_TWO`` draws two usable ranks
(seeded) and applies the same rule to that pair only: O(1) per decision at any dp_size.

``LENGTH_AWARE`` (length-aware routing) uses what the controller knows of each request: its
prompt length and its output bound ``max_new_tokens``. A continuous batch sheds its requests in
steps, every request of one output length leaving in the same decode step, and a rank starts
decoding only once its queued prompts are prefilled; two ranks stay level over a burst and its
drain only if they hold the same number of requests of each output length and the same prompt
work. The budget therefore keeps, per rank, what is *outstanding* (dispatched, result not yet
reported; :class:`Outstanding`): the requests ``n[r]``, their prompt tokens ``P[r]``, and the
requests per output-length class ``n[r, c]`` (:func:`length_class`: powers of two of
``max_new_tokens``). Completions are what the controller reports (:meth:`DPBudget.complete`, for
every result, failed ones included), not the snapshots, so a rank is seen to shed its requests
the moment their results arrive, not up to a publish period later. Among the ranks within
``request_slack`` of the fewest outstanding requests, a request of ``p`` prompt tokens and class
``c`` goes to the rank with the lowest

    ``p * P[r] / pbar**2  +  class_weight * n[r, c]  +  count_weight * n[r]``

(``pbar``: a moving average of prompt lengths; ties rotate). This is the greedy step that least
increases ``sum_r (P[r] / pbar)**2 + class_weight * sum_r,c n[r, c]**2 + count_weight *
sum_r n[r]**2``, the spread of prompt work (counted in typical prompts), of each class and of
the request counts: a long prompt goes where the least prompt work is outstanding, a short one
where its class is scarcest. Reported load is not scored (the hot table still gives each rank's
health and acknowledgements), so requests this controller did not send are not seen; without
completion reports the counts never fall and the policy degrades to balancing cumulative
dispatches. In the reference scheduler's sim a request generates exactly ``max_new_tokens``
tokens; in real serving it is an upper bound (a request may stop early at an end-of-sequence
token), so the class is that of the bound, not of the length, and a bound shared by every
request (a server-wide default) leaves prompt work and request counts to decide.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from bisect import bisect_left
from typing import Final

import numpy as np
import numpy.typing as npt

from dp_controller.dispatching import (
    Clock,
    Dispatch,
    RankChanges,
    monotonic_clock,
    read_acknowledged,
)
from dp_controller.ledger import DispatchLedger
from dp_controller.outstanding import Outstanding, length_class
from dp_controller.policy import (
    CONTROLLER_POLICY,
    DEFAULT_REFRESH_INTERVAL_S,
    BudgetConfig,
    Policy,
    StalePolicy,
)
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.reading import HotTable, SlotStatus, SnapshotSource

__all__ = [  # the policy names are re-exported: callers import them from here
    "CONTROLLER_POLICY",
    "DEFAULT_REFRESH_INTERVAL_S",
    "BudgetConfig",
    "BudgetStats",
    "DPBudget",
    "Outstanding",
    "Policy",
    "StalePolicy",
    "length_class",
]

log = logging.getLogger("dp_controller")

# TOTAL_TOKENS packs (tokens, requests) into one float64 key: requests below 2**20 per rank.
_REQ_SCALE: Final[float] = float(2**20)
_MAX_USAGE: Final[float] = 0.999
# LENGTH_AWARE: weight of a new prompt length in the moving average of prompt lengths.
_PROMPT_EWMA: Final[float] = 1.0 / 32.0

# Up to this many ranks a decision loops in Python (faster than numpy's per-call overhead).
SCALAR_MAX_DP: Final[int] = 32


class RankHealth(enum.IntEnum):
    """A rank's standing at the last refresh."""

    FRESH = 0
    STALE = 1  # stale, never published, torn or invalid: numbers not trustworthy
    DEAD = 2


_HEALTH_OF_STATUS: Final[npt.NDArray[np.uint8]] = np.array(
    [
        RankHealth.FRESH,  # FRESH
        RankHealth.STALE,  # STALE
        RankHealth.DEAD,  # DEAD
        RankHealth.STALE,  # NEVER_PUBLISHED
        RankHealth.STALE,  # TORN
        RankHealth.STALE,  # INVALID
    ],
    dtype=np.uint8,
)
assert len(_HEALTH_OF_STATUS) == len(SlotStatus)


class BudgetStats:
    """Counters of one budget (monotonic). Not thread-safe."""

    __slots__ = (
        "decisions",
        "epoch_resets",
        "fail_open_decisions",
        "ignored_snapshots",
        "pinned",
        "refreshes",
        "source_errors",
    )

    def __init__(self) -> None:
        self.decisions = 0
        self.pinned = 0
        self.fail_open_decisions = 0
        self.refreshes = 0
        self.ignored_snapshots = 0  # same or older sequence, or an older epoch
        self.epoch_resets = 0
        self.source_errors = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: int(getattr(self, name)) for name in self.__slots__}


class DPBudget:
    """Chooses a rank per request from reported load plus unacknowledged dispatches.

    Single owner; not thread-safe. Never blocks: the source is read at most once per refresh
    interval, and a source error keeps the previous numbers (counted in ``stats``).

    Parameters
    ----------
    source:
        Where every rank's load comes from (``ShmReader`` or a test double).
    config:
        Tunables; see :class:`BudgetConfig`.
    dp_size:
        Number of ranks; defaults to ``source.dp_size``.
    clock:
        Monotonic nanoseconds; tests pass a fake clock.
    """

    def __init__(
        self,
        source: SnapshotSource,
        config: BudgetConfig | None = None,
        *,
        dp_size: int | None = None,
        clock: Clock = monotonic_clock,
    ) -> None:
        self.config = config or BudgetConfig()
        self.source = source
        n = source.dp_size if dp_size is None else dp_size
        if n < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={n}")
        self._n = n
        self.ledger = DispatchLedger(n)
        # LENGTH_AWARE only: what is outstanding per rank (other policies leave it empty).
        self.outstanding = Outstanding(n, arrays=n > SCALAR_MAX_DP)
        self._track = self.config.policy is Policy.LENGTH_AWARE
        self._pbar = 0.0  # moving average of prompt lengths (0 until the first decision)
        self.stats = BudgetStats()
        self._clock = clock
        self._interval_ns = int(self.config.refresh_interval_s * 1e9)
        self._last_refresh_ns: int | None = None
        self._cursor = 0
        self._policy = self.config.policy
        self._slack = float(self.config.request_slack)
        self._rng = random.Random(self.config.seed)
        self._usable: list[int] = []
        # Last accepted record per rank.
        self._epoch = np.zeros(n, dtype=np.uint64)
        self._seq = np.zeros(n, dtype=np.uint64)
        self._publish_ns = np.zeros(n, dtype=np.uint64)
        self._period_s = np.full(n, np.nan)
        self._warned = np.zeros(n, dtype=bool)
        # Reported numbers (float64: scores are computed in floating point).
        self.reported_reqs = np.zeros(n)
        self.reported_tokens = np.zeros(n)
        self._used_tokens = np.zeros(n)
        self._max_tokens = np.zeros(n)
        self._throughput = np.zeros(n)
        self._waiting = np.zeros(n)
        self._rate = np.ones(n)
        self.health = np.full(n, RankHealth.STALE, dtype=np.uint8)
        self._penalty = np.zeros(n)
        self._fail_open = True
        self._rr_ranks: list[int] = list(range(n))
        # What changes() reports: whether a table was taken since, and the ranks restarted.
        self._changed = False
        self._restarted: set[int] = set()
        self._update_masks()

    # --- state --------------------------------------------------------------------------------

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return self._n

    @property
    def failing_open(self) -> bool:
        """True when no rank can be scored and decisions fall back to round robin."""
        return self._fail_open

    @property
    def epochs(self) -> npt.NDArray[np.uint64]:
        """Each rank's last accepted epoch (0 until a record was accepted); a copy."""
        return self._epoch.copy()

    def changes(self, *, refresh: bool = False) -> RankChanges | None:
        """The ranks dead at the latest refresh and those restarted since the previous call;
        ``None`` when no hot table was taken since then (a source error takes none; one of the
        wrong size reports the previous standing again). With
        ``refresh``, first :meth:`refresh` (throttled)."""
        if refresh:
            self.refresh()
        if not self._changed:
            return None
        self._changed = False
        restarted, self._restarted = self._restarted, set()
        dead = np.flatnonzero(self.health == RankHealth.DEAD).tolist()
        return RankChanges(frozenset(dead), frozenset(restarted))

    def take_over(self) -> list[int]:
        """Continue each rank's numbering after the acknowledgement its scheduler reports
        (:meth:`~dp_controller.ledger.DispatchLedger.rebase` where it is ahead of the ledger),
        then refresh; :meth:`changes` starts from this refresh. Returns, per rank, the sequence
        continued after (0: unchanged). Acknowledgements at or below the new floor are ignored
        later: no clamping is counted."""
        ledger = self.ledger
        seqs = [0] * self._n
        for rank, ack in enumerate(read_acknowledged(self.source, self._n)):
            if ack > ledger.issued(rank):
                ledger.rebase(rank, ack)
                seqs[rank] = ack
        self.refresh(force=True)
        self._changed = False
        self._restarted.clear()
        return seqs

    def unacknowledged(self) -> list[int]:
        """Per rank, dispatches not yet acknowledged by its scheduler (a copy)."""
        return list(self.ledger.count_list)

    def budget_requests(self) -> npt.NDArray[np.float64]:
        """Per-rank requests: reported running + waiting plus unacknowledged dispatches."""
        return self.reported_reqs + self.ledger.unacked_count

    def budget_tokens(self) -> npt.NDArray[np.float64]:
        """Per-rank tokens: reported ``num_total_tokens`` plus unacknowledged estimates."""
        return self.reported_tokens + self.ledger.unacked_tokens

    # --- refresh ------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Read the source if the refresh interval has passed (or ``force``).

        Returns True when the source was read. A source error (no segment yet, ...) keeps the
        previous numbers and is counted in ``stats.source_errors``.
        """
        now = self._clock()
        last = self._last_refresh_ns
        if not force and last is not None and now - last < self._interval_ns:
            return False
        self._last_refresh_ns = now
        try:
            table = self.source.hot_table()
        except LoadsnapError as exc:
            self.stats.source_errors += 1
            log.debug("load source unavailable: %s", exc)
            return True
        self.apply_table(table)
        return True

    def apply_table(self, table: HotTable) -> None:
        """Take a hot table's numbers (what :meth:`refresh` does after reading)."""
        self.stats.refreshes += 1
        self._changed = True
        n = self._n
        if table.dp_size != n:
            self.stats.source_errors += 1
            log.warning("hot table size mismatch: expected=%d found=%d", n, table.dp_size)
            return
        status = np.minimum(table.status, len(_HEALTH_OF_STATUS) - 1)
        health = _HEALTH_OF_STATUS[status]
        valid = table.valid
        epoch, seq = table.epoch, table.seq
        known = self._epoch
        newer_epoch = valid & (epoch > known)
        restarted = newer_epoch & (known != 0)
        for rank in np.flatnonzero(restarted).tolist():
            self._restarted.add(rank)
            self.ledger.reset_rank(rank)
            self.outstanding.reset_rank(rank)
            self.stats.epoch_resets += 1
            self._seq[rank] = 0
            self._publish_ns[rank] = 0
            self._period_s[rank] = np.nan
        accept = valid & ((epoch == known) & (seq > self._seq) | newer_epoch)
        self.stats.ignored_snapshots += int(np.count_nonzero(valid & ~accept))
        # A rank whose snapshot is an older epoch keeps its previous health and numbers.
        older = valid & (epoch < known)
        health[older] = self.health[older]
        if accept.any():
            self._accept(table, accept)
        self.health = health
        self._update_masks()

    def _accept(self, table: HotTable, accept: npt.NDArray[np.bool_]) -> None:
        prev_seq = self._seq[accept].astype(np.float64)
        prev_ns = self._publish_ns[accept].astype(np.float64)
        new_seq = table.seq[accept]
        new_ns = table.publish_mono_ns[accept]
        with np.errstate(divide="ignore", invalid="ignore"):
            period = (new_ns.astype(np.float64) - prev_ns) / 1e9 / (new_seq - prev_seq)
        period = np.where(prev_seq > 0, period, np.nan)
        self._period_s[accept] = period
        self._epoch[accept] = table.epoch[accept]
        self._seq[accept] = new_seq
        self._publish_ns[accept] = new_ns
        self.reported_reqs[accept] = table.num_running_reqs[accept] + table.num_waiting_reqs[accept]
        self.reported_tokens[accept] = table.num_total_tokens[accept]
        self._used_tokens[accept] = table.num_used_tokens[accept]
        self._max_tokens[accept] = table.max_total_num_tokens[accept]
        self._throughput[accept] = table.gen_throughput[accept]
        self._waiting[accept] = table.num_waiting_reqs[accept]
        acks = table.last_accepted_dispatch_seq
        ledger = self.ledger
        for rank in np.flatnonzero(accept).tolist():
            ledger.acknowledge(rank, int(acks[rank]))
        slow = (self._period_s > self.config.stale_after_s) & ~self._warned
        for rank in np.flatnonzero(slow).tolist():
            self._warned[rank] = True
            log.warning(
                "rank publishes less often than the staleness budget: dp_rank=%d "
                "publish_period_s=%.3f stale_after_s=%.3f",
                rank,
                self._period_s[rank],
                self.config.stale_after_s,
            )

    def publish_period_s(self) -> npt.NDArray[np.float64]:
        """Each rank's last observed publish period (NaN until two records were seen)."""
        return self._period_s.copy()

    def _update_masks(self) -> None:
        health = self.health
        alive = health != RankHealth.DEAD
        if self.config.stale_policy is StalePolicy.IGNORE:
            usable = alive & (self._seq > 0)
        else:
            usable = health == RankHealth.FRESH
        self._penalty = np.where(usable, 0.0, np.inf)
        self._fail_open = not bool(usable.any())
        self._rr_ranks = np.flatnonzero(alive).tolist() if alive.any() else list(range(self._n))
        # Only a rank with a queue runs at capacity, so only its throughput measures capacity;
        # one without a queue (an idle one reports ~0 tokens/s) may be as fast as the best.
        floor = self.config.throughput_floor
        best = float(self._throughput[usable].max()) if usable.any() else 0.0
        rate = np.where(self._waiting > 0, self._throughput, max(best, floor))
        self._rate = np.maximum(rate, floor)
        self._usable = np.flatnonzero(usable).tolist()
        if self._n <= SCALAR_MAX_DP or self._policy is Policy.POWER_OF_TWO:
            self._prepare_scalar(self._usable)

    def _prepare_scalar(self, usable: list[int]) -> None:
        # Per cursor position, the usable ranks in rotated order (ties go to the first).
        n = self._n
        if n <= SCALAR_MAX_DP:
            self._rotations = [
                [r for r in usable if r >= c] + [r for r in usable if r < c] for c in range(n)
            ]
        self._s_reqs: list[float] = self.reported_reqs.tolist()
        self._s_tokens: list[float] = self.reported_tokens.tolist()
        self._s_used: list[float] = self._used_tokens.tolist()
        self._s_max: list[float] = self._max_tokens.tolist()
        self._s_rate: list[float] = self._rate.tolist()

    # --- decisions ----------------------------------------------------------------------------

    def dispatch(
        self, est_tokens: int, rank: int | None = None, *, max_new_tokens: int | None = None
    ) -> Dispatch:
        """Choose a rank for a request of ``est_tokens`` tokens and record it in the ledger.

        Parameters
        ----------
        est_tokens:
            Estimated tokens the request adds (prompt + expected output).
        rank:
            A rank chosen by the caller (pinned): no choice is made, but the dispatch is still
            recorded, so it counts in the budget.
        max_new_tokens:
            The request's output bound, when known (the controller always passes it). Only
            ``LENGTH_AWARE`` uses it: its :func:`length_class`, and ``est_tokens -
            max_new_tokens`` as the prompt length. Without it the request is of class 0 and
            ``est_tokens`` counts as its prompt.

        Returns
        -------
        Dispatch
            The rank and the per-rank sequence number the request must carry.

        Raises
        ------
        UsageError
            ``rank`` out of range or ``est_tokens`` negative.
        """
        self.refresh()
        self.stats.decisions += 1
        track = self._track  # LENGTH_AWARE: every dispatch is outstanding until completed
        cls = prompt = 0
        if track:
            cls, prompt = self._length_of(est_tokens, max_new_tokens)
        if rank is not None:
            self.stats.pinned += 1
            chosen = rank
        elif self._fail_open:
            self.stats.fail_open_decisions += 1
            chosen = self._next_round_robin()
        elif track:
            chosen = self._choose_length_aware(cls, prompt)
        elif self._policy is Policy.ROUND_ROBIN:
            chosen = self._next_round_robin()
        elif self._policy is Policy.POWER_OF_TWO:
            chosen = self._choose_two(est_tokens)
        elif self._n <= SCALAR_MAX_DP:
            chosen = self._choose_scalar(est_tokens)
        else:
            chosen = self._argmin(self.scores(est_tokens))
        seq = self.ledger.record(chosen, est_tokens)  # raises on a bad rank or est_tokens
        if track:
            self.outstanding.record(chosen, seq, cls, prompt)
        return Dispatch(chosen, seq)

    @staticmethod
    def _length_of(est_tokens: int, max_new_tokens: int | None) -> tuple[int, int]:
        # (output-length class, prompt tokens) of a request, as LENGTH_AWARE reads it.
        if est_tokens < 0:
            raise UsageError(f"est_tokens must be >= 0: est_tokens={est_tokens}")
        if max_new_tokens is None:
            return 0, est_tokens
        prompt = est_tokens - max_new_tokens if est_tokens > max_new_tokens else 0
        return length_class(max_new_tokens), prompt

    def _choose_length_aware(self, cls: int, prompt: int) -> int:
        pbar = self._pbar
        self._pbar = pbar + (prompt - pbar) * _PROMPT_EWMA if pbar > 0 else float(prompt)
        if self._n <= SCALAR_MAX_DP:
            return self._choose_length(cls, prompt)
        return self._argmin(self._length_scores(cls, prompt))

    def complete(self, rank: int, seq: int) -> bool:
        """Report that request ``seq`` of ``rank`` ended: its result arrived, or it was reported
        failed. The controller calls this for every result. ``LENGTH_AWARE`` stops counting it
        as outstanding; other policies ignore it. Returns False when it was not outstanding
        (reported twice, dropped when its rank restarted, or another policy)."""
        return self.outstanding.complete(rank, seq)

    def _prompt_weight(self, prompt: int) -> float:
        # p / pbar**2: the weight of a rank's outstanding prompt tokens for this request.
        pbar = self._pbar if self._pbar >= 1.0 else 1.0
        return prompt / (pbar * pbar)

    def _choose_length(self, cls: int, prompt: int) -> int:
        # The same arithmetic as :meth:`_length_scores`, in the same order (so the same
        # doubles), one rank at a time; strict "<" over the rotated order rotates ties.
        out = self.outstanding
        counts, by_class, prompts = out.count, out.by_class, out.prompt_tokens
        order = self._rotations[self._cursor]
        limit = min([counts[k] for k in order]) + self._slack
        a = self._prompt_weight(prompt)
        b, g = self.config.class_weight, self.config.count_weight
        best = math.inf
        chosen = order[0]
        for k in order:
            n = counts[k]
            if n > limit:
                continue
            score = a * prompts[k] + b * by_class[k][cls] + g * n
            if score < best:
                best, chosen = score, k
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen

    def _length_scores(self, cls: int, prompt: int) -> npt.NDArray[np.float64]:
        out = self.outstanding
        if out.arrays is not None:
            count_a, prompt_a, class_a = out.arrays
            counts = count_a.astype(np.float64)
            by_class = class_a[:, cls].astype(np.float64)
            prompts = prompt_a.astype(np.float64)
        else:
            counts = np.array(out.count, dtype=np.float64)
            by_class = np.array([row[cls] for row in out.by_class], dtype=np.float64)
            prompts = np.array(out.prompt_tokens, dtype=np.float64)
        usable_counts = counts + self._penalty
        eligible = usable_counts <= usable_counts.min() + self._slack
        a = self._prompt_weight(prompt)
        b, g = self.config.class_weight, self.config.count_weight
        score = a * prompts + b * by_class + g * counts
        return np.where(eligible, score, np.inf)

    def _choose_scalar(self, est_tokens: int) -> int:
        # The same arithmetic as :meth:`scores`, in the same order (so the same doubles), one
        # rank at a time: cheaper than numpy for a few ranks. Strict "<" over the rotated
        # order is the rotating tie-break.
        ledger = self.ledger
        policy = self._policy
        order = self._rotations[self._cursor]
        best = math.inf
        chosen = order[0]
        if policy is Policy.WORK_OVER_THROUGHPUT or policy is Policy.REQUESTS_THEN_WORK:
            reqs, counts = self._s_reqs, ledger.count_list
            tokens, used, cap, rate = self._s_tokens, self._s_used, self._s_max, self._s_rate
            pending_l = ledger.tokens_list
            est = float(est_tokens)
            w = self.config.kv_weight
            limit = math.inf
            if policy is Policy.REQUESTS_THEN_WORK:
                limit = min([reqs[k] + counts[k] for k in order]) + self._slack
            for k in order:
                if reqs[k] + counts[k] > limit:
                    continue
                pending = pending_l[k] + est
                m = cap[k]
                u = (used[k] + pending) / m if m > 0 else 0.0
                if u > _MAX_USAGE:
                    u = _MAX_USAGE
                score = (tokens[k] + pending) / rate[k] * (1.0 + w * u * u / (1.0 - u))
                if score < best:
                    best, chosen = score, k
        elif policy is Policy.TOTAL_REQUESTS:
            reqs, counts = self._s_reqs, ledger.count_list
            for k in order:
                score = reqs[k] + counts[k]
                if score < best:
                    best, chosen = score, k
        else:
            reqs, counts = self._s_reqs, ledger.count_list
            tokens, pending_l = self._s_tokens, ledger.tokens_list
            for k in order:
                score = (tokens[k] + pending_l[k]) * _REQ_SCALE + (reqs[k] + counts[k])
                if score < best:
                    best, chosen = score, k
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen

    def _choose_two(self, est_tokens: int) -> int:
        # REQUESTS_THEN_WORK restricted to two distinct usable ranks drawn uniformly.
        usable = self._usable
        m = len(usable)
        if m == 1:
            return usable[0]
        draw = self._rng.randrange
        i = draw(m)
        j = draw(m - 1)
        a, b = usable[i], usable[j + 1 if j >= i else j]
        reqs, counts = self._s_reqs, self.ledger.count_list
        ra, rb = reqs[a] + counts[a], reqs[b] + counts[b]
        if ra > rb + self._slack:
            return b
        if rb > ra + self._slack:
            return a
        return b if self._work_score(b, est_tokens) < self._work_score(a, est_tokens) else a

    def _work_score(self, k: int, est_tokens: int) -> float:
        # One rank's WORK_OVER_THROUGHPUT score, with the scalar path's arithmetic.
        pending = self.ledger.tokens_list[k] + float(est_tokens)
        m = self._s_max[k]
        u = (self._s_used[k] + pending) / m if m > 0 else 0.0
        if u > _MAX_USAGE:
            u = _MAX_USAGE
        w = self.config.kv_weight
        return (self._s_tokens[k] + pending) / self._s_rate[k] * (1.0 + w * u * u / (1.0 - u))

    def scores(
        self, est_tokens: int = 0, *, max_new_tokens: int | None = None
    ) -> npt.NDArray[np.float64]:
        """Per-rank scores under the policy (lower is better; ``inf`` = not eligible).

        ``POWER_OF_TWO`` returns the ``REQUESTS_THEN_WORK`` scores over every rank; a decision
        compares two drawn ranks by the same rule. ``LENGTH_AWARE`` scores a request of
        ``max_new_tokens`` (as :meth:`dispatch` reads it) with the current prompt-length
        average (a decision first moves the average by its own prompt).
        """
        ledger = self.ledger
        policy = self._policy
        if policy is Policy.LENGTH_AWARE:
            return self._length_scores(*self._length_of(est_tokens, max_new_tokens))
        if policy is Policy.REQUESTS_THEN_WORK or policy is Policy.POWER_OF_TWO:
            reqs = self.reported_reqs + ledger.unacked_count + self._penalty
            eligible = reqs <= reqs.min() + self._slack
            return np.where(eligible, self._work_scores(est_tokens), np.inf)
        if policy is Policy.TOTAL_REQUESTS:
            return self.reported_reqs + ledger.unacked_count + self._penalty
        if policy is Policy.TOTAL_TOKENS:
            tokens = self.reported_tokens + ledger.unacked_tokens
            return tokens * _REQ_SCALE + (self.reported_reqs + ledger.unacked_count) + self._penalty
        if policy is Policy.WORK_OVER_THROUGHPUT:
            return self._work_scores(est_tokens)
        return self._penalty + ledger.unacked_count * 0.0

    def _work_scores(self, est_tokens: int) -> npt.NDArray[np.float64]:
        pending = self.ledger.unacked_tokens + float(est_tokens)
        work = self.reported_tokens + pending
        with np.errstate(divide="ignore", invalid="ignore"):
            usage = (self._used_tokens + pending) / self._max_tokens
        usage = np.where(self._max_tokens > 0, usage, 0.0)
        usage = np.minimum(usage, _MAX_USAGE)
        pressure = 1.0 + self.config.kv_weight * usage * usage / (1.0 - usage)
        return work / self._rate * pressure + self._penalty

    def _argmin(self, score: npt.NDArray[np.float64]) -> int:
        best = score.min()
        ties = np.flatnonzero(score == best)
        if ties.shape[0] == 1:
            chosen = int(ties[0])
        else:
            i = int(np.searchsorted(ties, self._cursor))
            chosen = int(ties[i if i < ties.shape[0] else 0])
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen

    def _next_round_robin(self) -> int:
        ranks = self._rr_ranks
        i = bisect_left(ranks, self._cursor)
        chosen = ranks[i] if i < len(ranks) else ranks[0]
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen
