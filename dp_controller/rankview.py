"""What a budget refresh computes from the hot table: the records it accepted, and the rank view.

Theory of operation
-------------------
:class:`RankRecords` keeps, per rank, the last record the budget accepted: its epoch, sequence
and publish time, and the numbers the scheduler reported. :meth:`RankRecords.take` accepts a
rank's row of a hot table only when its sequence moved forward in the same epoch, or when its
epoch is newer (a restarted scheduler, reported so that the budget can reset what it counted for
the old process); an older epoch is ignored and keeps the rank's previous health and numbers.

:class:`RankView` is what the scorers (:mod:`dp_controller.scorers`) read between two
refreshes: each rank's health, which ranks are usable (scored) and which alive (round robin),
the reported numbers as numpy arrays (vector forms) and Python lists (scalar forms, cheaper one
element at a time), the capacity rate each rank is scored at, and for small deployments every
rotation of the usable ranks (the order that makes ties rotate). A view is built once per
refresh and never changed afterwards.
"""

from __future__ import annotations

import enum
import logging
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from dp_controller.policy import BudgetConfig, StalePolicy
from loadsnap.reading import HotTable, SlotStatus

__all__ = ["RankHealth", "RankRecords", "RankView", "Taken"]

log = logging.getLogger("dp_controller")

_F64 = npt.NDArray[np.float64]


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


class Taken(NamedTuple):
    """What :meth:`RankRecords.take` did with one hot table."""

    accepted: npt.NDArray[np.bool_]  # ranks whose row was accepted
    restarted: list[int]  # ranks seen in a newer epoch (their old process is gone)
    ignored: int  # valid rows not accepted: same or older sequence, or an older epoch


class RankRecords:
    """The last record accepted from each rank, and its reported numbers. Single owner; not
    thread-safe.

    Parameters
    ----------
    dp_size:
        Number of ranks.
    stale_after_s:
        The staleness budget; a rank publishing less often is warned about once.

    Attributes
    ----------
    health:
        Each rank's :class:`RankHealth` (uint8) at the last table.
    epoch, seq:
        The accepted epoch and sequence (0: nothing accepted).
    reqs, tokens, used, cap, throughput, waiting:
        Reported running + waiting requests, ``num_total_tokens``, ``num_used_tokens``,
        ``max_total_num_tokens``, ``gen_throughput``, ``num_waiting_reqs`` (float64).
    period_s:
        Each rank's last observed publish period (NaN until two records were seen).
    """

    def __init__(self, dp_size: int, stale_after_s: float) -> None:
        n = dp_size
        self._stale_after_s = stale_after_s
        self.health = np.full(n, RankHealth.STALE, dtype=np.uint8)
        self.epoch = np.zeros(n, dtype=np.uint64)
        self.seq = np.zeros(n, dtype=np.uint64)
        self.publish_ns = np.zeros(n, dtype=np.uint64)
        self.period_s = np.full(n, np.nan)
        self._warned = np.zeros(n, dtype=bool)
        self.reqs = np.zeros(n)
        self.tokens = np.zeros(n)
        self.used = np.zeros(n)
        self.cap = np.zeros(n)
        self.throughput = np.zeros(n)
        self.waiting = np.zeros(n)

    def take(self, table: HotTable) -> Taken:
        """Take the rows of ``table`` (of this size) that are newer than what was accepted."""
        status = np.minimum(table.status, len(_HEALTH_OF_STATUS) - 1)
        health = _HEALTH_OF_STATUS[status]
        valid = table.valid
        epoch, seq = table.epoch, table.seq
        known = self.epoch
        newer_epoch = valid & (epoch > known)
        restarted = np.flatnonzero(newer_epoch & (known != 0)).tolist()
        for rank in restarted:
            self.seq[rank] = 0
            self.publish_ns[rank] = 0
            self.period_s[rank] = np.nan
        accept = valid & ((epoch == known) & (seq > self.seq) | newer_epoch)
        ignored = int(np.count_nonzero(valid & ~accept))
        # A rank whose snapshot is an older epoch keeps its previous health and numbers.
        older = valid & (epoch < known)
        health[older] = self.health[older]
        if accept.any():
            self._accept(table, accept)
        self.health = health
        return Taken(accept, restarted, ignored)

    def _accept(self, table: HotTable, accept: npt.NDArray[np.bool_]) -> None:
        prev_seq = self.seq[accept].astype(np.float64)
        prev_ns = self.publish_ns[accept].astype(np.float64)
        new_seq = table.seq[accept]
        new_ns = table.publish_mono_ns[accept]
        with np.errstate(divide="ignore", invalid="ignore"):
            period = (new_ns.astype(np.float64) - prev_ns) / 1e9 / (new_seq - prev_seq)
        period = np.where(prev_seq > 0, period, np.nan)
        self.period_s[accept] = period
        self.epoch[accept] = table.epoch[accept]
        self.seq[accept] = new_seq
        self.publish_ns[accept] = new_ns
        self.reqs[accept] = table.num_running_reqs[accept] + table.num_waiting_reqs[accept]
        self.tokens[accept] = table.num_total_tokens[accept]
        self.used[accept] = table.num_used_tokens[accept]
        self.cap[accept] = table.max_total_num_tokens[accept]
        self.throughput[accept] = table.gen_throughput[accept]
        self.waiting[accept] = table.num_waiting_reqs[accept]
        slow = (self.period_s > self._stale_after_s) & ~self._warned
        for rank in np.flatnonzero(slow).tolist():
            self._warned[rank] = True
            log.warning(
                "rank publishes less often than the staleness budget: dp_rank=%d "
                "publish_period_s=%.3f stale_after_s=%.3f",
                rank,
                self.period_s[rank],
                self._stale_after_s,
            )


class RankView:
    """The ranks as the scorers see them until the next refresh. Immutable once built; safe to
    read from any thread.

    Parameters
    ----------
    health:
        Each rank's :class:`RankHealth`.
    usable:
        Which ranks are scored (the others score ``inf``).
    reqs, tokens, used, cap, throughput, waiting:
        The reported numbers (:class:`RankRecords`); copied.
    throughput_floor:
        The least tokens/s any rank is scored at (:class:`~dp_controller.policy.BudgetConfig`).
    scalar:
        Also build the Python lists the scalar forms read.
    rotations:
        Also build, per cursor position, the usable ranks in rotated order (small deployments).

    Attributes
    ----------
    dp_size, health, penalty:
        Number of ranks; health; 0.0 for a usable rank, ``inf`` for the others.
    usable, alive:
        The usable ranks; the ranks not dead (every rank when all are dead), both ascending.
    fail_open:
        True when no rank is usable: decisions fall back to round robin over ``alive``.
    reqs, tokens, used, cap, rate:
        Reported requests, total tokens, used tokens, token capacity, and the tokens/s each
        rank is scored at (arrays; ``*_l``: the same as lists, when built with ``scalar``).
    rotations:
        ``rotations[c]``: the usable ranks starting at the first one ``>= c``, wrapping (ties go
        to the first); empty unless built with ``rotations``.
    """

    __slots__ = (
        "alive",
        "cap",
        "cap_l",
        "dp_size",
        "fail_open",
        "health",
        "penalty",
        "rate",
        "rate_l",
        "reqs",
        "reqs_l",
        "rotations",
        "tokens",
        "tokens_l",
        "usable",
        "used",
        "used_l",
    )

    def __init__(
        self,
        health: npt.NDArray[np.uint8],
        usable: npt.NDArray[np.bool_],
        *,
        reqs: _F64,
        tokens: _F64,
        used: _F64,
        cap: _F64,
        throughput: _F64,
        waiting: _F64,
        throughput_floor: float,
        scalar: bool = True,
        rotations: bool = True,
    ) -> None:
        n = self.dp_size = len(health)
        self.health = health.copy()
        alive = health != RankHealth.DEAD
        self.penalty: _F64 = np.where(usable, 0.0, np.inf)
        self.fail_open = not bool(usable.any())
        self.alive: list[int] = np.flatnonzero(alive).tolist() if alive.any() else list(range(n))
        self.usable: list[int] = np.flatnonzero(usable).tolist()
        # Only a rank with a queue runs at capacity, so only its throughput measures capacity;
        # one without a queue (an idle one reports ~0 tokens/s) may be as fast as the best.
        best = float(throughput[usable].max()) if usable.any() else 0.0
        rate = np.where(waiting > 0, throughput, max(best, throughput_floor))
        self.rate: _F64 = np.maximum(rate, throughput_floor)
        self.reqs, self.tokens, self.used, self.cap = (
            reqs.copy(),
            tokens.copy(),
            used.copy(),
            cap.copy(),
        )
        empty: list[float] = []
        self.reqs_l = self.reqs.tolist() if scalar else empty
        self.tokens_l = self.tokens.tolist() if scalar else empty
        self.used_l = self.used.tolist() if scalar else empty
        self.cap_l = self.cap.tolist() if scalar else empty
        self.rate_l = self.rate.tolist() if scalar else empty
        ranks = self.usable
        self.rotations: list[list[int]] = (
            [[r for r in ranks if r >= c] + [r for r in ranks if r < c] for c in range(n)]
            if rotations
            else []
        )

    @classmethod
    def of(
        cls, records: RankRecords, config: BudgetConfig, *, scalar: bool, rotations: bool
    ) -> RankView:
        """The view of ``records`` under ``config``'s staleness policy and throughput floor."""
        health = records.health
        if config.stale_policy is StalePolicy.IGNORE:
            usable = (health != RankHealth.DEAD) & (records.seq > 0)
        else:
            usable = health == RankHealth.FRESH
        return cls(
            health,
            usable,
            reqs=records.reqs,
            tokens=records.tokens,
            used=records.used,
            cap=records.cap,
            throughput=records.throughput,
            waiting=records.waiting,
            throughput_floor=config.throughput_floor,
            scalar=scalar,
            rotations=rotations,
        )
