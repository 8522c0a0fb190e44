"""``DPBudget``: per-rank load budget over numpy arrays, with a dispatch ledger.

Theory of operation
-------------------
``DPBudget`` composes: the records it accepted from the hot table and the
:class:`~dp_controller.rankview.RankView` each refresh builds from them
(:mod:`dp_controller.rankview`), the :class:`~dp_controller.ledger.DispatchLedger` of
unacknowledged dispatches (and, for ``LENGTH_AWARE``, what is outstanding), and the policy's
scorer from the table :data:`~dp_controller.scorers.SCORERS` (:mod:`dp_controller.scorers`). It
owns the refresh throttle, the rotating cursor and the fail-open fallback, and picks how a
decision is computed once, at construction: round robin, a drawn pair, the scalar form over the
rotated ranks (up to ``SCALAR_MAX_DP`` ranks) or the vector form.

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

import logging
import random
from bisect import bisect_left
from collections.abc import Callable
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
from dp_controller.rankview import RankHealth, RankRecords, RankView
from dp_controller.scorers import SCALAR_MAX_DP, SCORERS, ScoreInputs, rotating_argmin
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.reading import HotTable, SnapshotSource

__all__ = [  # the policy names are re-exported: callers import them from here
    "CONTROLLER_POLICY",
    "DEFAULT_REFRESH_INTERVAL_S",
    "SCALAR_MAX_DP",
    "BudgetConfig",
    "BudgetStats",
    "DPBudget",
    "Outstanding",
    "Policy",
    "RankHealth",
    "StalePolicy",
    "length_class",
]

log = logging.getLogger("dp_controller")

# LENGTH_AWARE: weight of a new prompt length in the moving average of prompt lengths.
_PROMPT_EWMA: Final[float] = 1.0 / 32.0


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

    Single owner; not thread-safe (except :meth:`unacknowledged`). Never blocks: the source is
    read at most once per refresh interval, and a source error keeps the previous numbers
    (counted in ``stats``).

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
        self._rng = random.Random(self.config.seed)
        stale_after_s = self.config.stale_after_s
        self._records = RankRecords(n, stale_after_s or source.stale_after_s)
        self._scorer = scorer = SCORERS[self.config.policy]
        self._scalar = n <= SCALAR_MAX_DP  # the scalar form over rotations, else the vector form
        self._view = self._build_view()
        self._inputs = ScoreInputs(self._view, self.ledger, self.outstanding, self.config)
        self._pick = scorer.pick
        decide: Callable[[int, int, int], int]
        if scorer.rotation_only:
            decide = self._decide_rotation
        elif scorer.pair:
            decide = self._decide_pair
        elif self._scalar:
            decide = self._decide_scalar
        else:
            decide = self._decide_vector
        self._decide = decide
        # What changes() reports: whether a table was taken since, and the ranks restarted.
        self._changed = False
        self._restarted: set[int] = set()

    # --- state --------------------------------------------------------------------------------

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return self._n

    @property
    def failing_open(self) -> bool:
        """True when no rank can be scored and decisions fall back to round robin."""
        return self._view.fail_open

    @property
    def health(self) -> npt.NDArray[np.uint8]:
        """Each rank's :class:`RankHealth` at the last refresh (read-only)."""
        return self._view.health

    @property
    def view(self) -> RankView:
        """The ranks as the last refresh left them (what the scorers read)."""
        return self._view

    @property
    def epochs(self) -> npt.NDArray[np.uint64]:
        """Each rank's last accepted epoch (0 until a record was accepted); a copy."""
        return self._records.epoch.copy()

    @property
    def reported_reqs(self) -> npt.NDArray[np.float64]:
        """Each rank's last accepted running + waiting requests (read-only)."""
        return self._records.reqs

    @property
    def reported_tokens(self) -> npt.NDArray[np.float64]:
        """Each rank's last accepted ``num_total_tokens`` (read-only)."""
        return self._records.tokens

    def budget_requests(self) -> npt.NDArray[np.float64]:
        """Per-rank requests: reported running + waiting plus unacknowledged dispatches."""
        return self._records.reqs + self.ledger.unacked_count

    def budget_tokens(self) -> npt.NDArray[np.float64]:
        """Per-rank tokens: reported ``num_total_tokens`` plus unacknowledged estimates."""
        return self._records.tokens + self.ledger.unacked_tokens

    def publish_period_s(self) -> npt.NDArray[np.float64]:
        """Each rank's last observed publish period (NaN until two records were seen)."""
        return self._records.period_s.copy()

    # --- the controller's side (Dispatcher) -----------------------------------------------------

    def complete(self, rank: int, seq: int) -> bool:
        """Report that request ``seq`` of ``rank`` ended: its result arrived, or it was reported
        failed. The controller calls this for every result. ``LENGTH_AWARE`` stops counting it
        as outstanding; other policies ignore it. Returns False when it was not outstanding
        (reported twice, dropped when its rank restarted, or another policy)."""
        return self.outstanding.complete(rank, seq)

    def changes(self, *, refresh: bool = False) -> RankChanges | None:
        """The ranks dead at the latest refresh and those restarted since the previous call;
        ``None`` when no hot table was taken since then (a source error takes none; one of the
        wrong size reports the previous standing again). With ``refresh``, first
        :meth:`refresh` (throttled)."""
        if refresh:
            self.refresh()
        if not self._changed:
            return None
        self._changed = False
        restarted, self._restarted = self._restarted, set()
        dead = np.flatnonzero(self._view.health == RankHealth.DEAD).tolist()
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
        """Per rank, dispatches not yet acknowledged by its scheduler (a copy; safe from another
        thread, which may see it mid-update)."""
        return list(self.ledger.count_list)

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
        """Take a hot table's numbers (what :meth:`refresh` does after reading).

        A rank in a newer epoch (a restarted scheduler) has its ledger and outstanding entries
        reset before the table's acknowledgements are applied."""
        stats = self.stats
        stats.refreshes += 1
        self._changed = True
        n = self._n
        if table.dp_size != n:
            stats.source_errors += 1
            log.warning("hot table size mismatch: expected=%d found=%d", n, table.dp_size)
            return
        taken = self._records.take(table)
        for rank in taken.restarted:
            self.ledger.reset_rank(rank)
            self.outstanding.reset_rank(rank)
            stats.epoch_resets += 1
            self._restarted.add(rank)
        stats.ignored_snapshots += taken.ignored
        acks = table.last_accepted_dispatch_seq
        acknowledge = self.ledger.acknowledge
        for rank in np.flatnonzero(taken.accepted).tolist():
            acknowledge(rank, int(acks[rank]))
        self._view = self._inputs.view = self._build_view()

    def _build_view(self) -> RankView:
        return RankView.of(
            self._records,
            self.config,
            scalar=self._scalar or self._scorer.pair,
            rotations=self._scalar,
        )

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
        elif self._view.fail_open:
            self.stats.fail_open_decisions += 1
            chosen = self._next_alive()
        else:
            chosen = self._decide(est_tokens, cls, prompt)
        seq = self.ledger.record(chosen, est_tokens)  # raises on a bad rank or est_tokens
        if track:
            self.outstanding.record(chosen, seq, cls, prompt)
        return Dispatch(chosen, seq)

    def scores(
        self, est_tokens: int = 0, *, max_new_tokens: int | None = None
    ) -> npt.NDArray[np.float64]:
        """Per-rank scores under the policy (lower is better; ``inf`` = not eligible).

        ``ROUND_ROBIN`` scores every rank not dead 0. ``POWER_OF_TWO`` returns the
        ``REQUESTS_THEN_WORK`` scores over every rank; a decision compares two drawn ranks by
        the same rule. ``LENGTH_AWARE`` scores a request of ``max_new_tokens`` (as
        :meth:`dispatch` reads it) with the current prompt-length average (a decision first
        moves the average by its own prompt).
        """
        cls, a = 0, 0.0
        if self._track:
            cls, prompt = self._length_of(est_tokens, max_new_tokens)
            a = self._prompt_weight(prompt)
        return self._scorer.scores(self._inputs, est_tokens, cls, a)

    @staticmethod
    def _length_of(est_tokens: int, max_new_tokens: int | None) -> tuple[int, int]:
        # (output-length class, prompt tokens) of a request, as LENGTH_AWARE reads it.
        if est_tokens < 0:
            raise UsageError(f"est_tokens must be >= 0: est_tokens={est_tokens}")
        if max_new_tokens is None:
            return 0, est_tokens
        prompt = est_tokens - max_new_tokens if est_tokens > max_new_tokens else 0
        return length_class(max_new_tokens), prompt

    def _prompt_weight(self, prompt: int) -> float:
        # p / pbar**2: the weight of a rank's outstanding prompt tokens for this request.
        pbar = self._pbar if self._pbar >= 1.0 else 1.0
        return prompt / (pbar * pbar)

    def _weigh(self, prompt: int) -> float:
        # LENGTH_AWARE, for a decision: move the prompt average by this prompt, then weigh it.
        pbar = self._pbar
        pbar = pbar + (prompt - pbar) * _PROMPT_EWMA if pbar > 0 else float(prompt)
        self._pbar = pbar
        if pbar < 1.0:  # as _prompt_weight reads it, without the call
            pbar = 1.0
        return prompt / (pbar * pbar)

    def _decide_scalar(self, est_tokens: int, cls: int, prompt: int) -> int:
        a = self._weigh(prompt) if self._track else 0.0
        chosen = self._pick(self._inputs, self._view.rotations[self._cursor], est_tokens, cls, a)
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen

    def _decide_vector(self, est_tokens: int, cls: int, prompt: int) -> int:
        a = self._weigh(prompt) if self._track else 0.0
        score = self._scorer.scores(self._inputs, est_tokens, cls, a)
        chosen = rotating_argmin(score, self._cursor)
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen

    def _decide_pair(self, est_tokens: int, cls: int, prompt: int) -> int:
        # Two distinct usable ranks drawn uniformly; the cursor does not move.
        usable = self._view.usable
        m = len(usable)
        if m == 1:
            return usable[0]
        draw = self._rng.randrange
        i = draw(m)
        j = draw(m - 1)
        pair = (usable[i], usable[j + 1 if j >= i else j])
        return self._pick(self._inputs, pair, est_tokens, cls, 0.0)

    def _decide_rotation(self, est_tokens: int, cls: int, prompt: int) -> int:
        return self._next_alive()

    def _next_alive(self) -> int:
        # Round robin over the ranks not dead: the first at or after the cursor, wrapping.
        ranks = self._view.alive
        i = bisect_left(ranks, self._cursor)
        chosen = ranks[i] if i < len(ranks) else ranks[0]
        self._cursor = chosen + 1 if chosen + 1 < self._n else 0
        return chosen
