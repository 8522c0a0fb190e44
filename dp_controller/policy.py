"""Dispatch policy names and the budget's tunables (:class:`BudgetConfig`).

The policies themselves are described in :mod:`dp_controller.budget`, which implements them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from loadsnap.errors import UsageError

__all__ = [
    "CONTROLLER_POLICY",
    "DEFAULT_REFRESH_INTERVAL_S",
    "BudgetConfig",
    "Policy",
    "StalePolicy",
]

DEFAULT_REFRESH_INTERVAL_S: Final[float] = 0.020


class Policy(enum.Enum):
    """How a rank is chosen."""

    ROUND_ROBIN = "round_robin"
    TOTAL_REQUESTS = "total_requests"  # running + waiting (+ unacknowledged)
    TOTAL_TOKENS = "total_tokens"  # num_total_tokens (+ unacknowledged), requests break ties
    # Queued work over throughput, times a convex KV-pressure penalty 1 + w * u**2 / (1 - u).
    WORK_OVER_THROUGHPUT = "work_over_throughput"
    # Ranks within ``request_slack`` of the fewest requests, then the WORK_OVER_THROUGHPUT score.
    REQUESTS_THEN_WORK = "requests_then_work"
    # REQUESTS_THEN_WORK over two ranks drawn at random (seeded): O(1) per decision.
    POWER_OF_TWO = "power_of_two"
    # Outstanding prompt work, requests of this output-length class and requests (module
    # docstring): needs max_new_tokens at dispatch and completions (DPBudget.complete).
    LENGTH_AWARE = "length_aware"


# What the controller process runs by default. It reports every result to its budget
# (DPBudget.complete), which LENGTH_AWARE needs; BudgetConfig's own default stays
# REQUESTS_THEN_WORK because a bare DPBudget hears of completions only if its caller reports them.
CONTROLLER_POLICY: Final[Policy] = Policy.LENGTH_AWARE


class StalePolicy(enum.Enum):
    """What a stale rank's numbers are worth."""

    SATURATED = "saturated"  # never chosen while a fresh rank exists
    IGNORE = "ignore"  # scored like a fresh rank on its last numbers


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Tunables of :class:`DPBudget`.

    Parameters
    ----------
    policy:
        How ranks are scored.
    refresh_interval_s:
        Minimum time between two reads of the load source (the reference design's 20 ms).
    stale_policy:
        What stale ranks are worth.
    stale_after_s:
        None (default): the source's own staleness budget (``SnapshotSource.stale_after_s``),
        so the two cannot disagree. Only used to warn when a rank publishes less often.
    kv_weight:
        Weight of the KV-pressure penalty (``WORK_OVER_THROUGHPUT``).
    throughput_floor:
        Minimum tokens/s assumed for any rank. A rank without waiting requests is assumed to
        run as fast as the fastest usable rank (its own throughput reflects demand, not
        capacity); a rank with a queue is taken at its reported throughput.
    request_slack:
        ``REQUESTS_THEN_WORK``, ``POWER_OF_TWO`` and ``LENGTH_AWARE``: a rank is eligible when
        its budgeted (``LENGTH_AWARE``: outstanding) requests exceed the fewest by at most this
        many (0: strictly fewest first).
    seed:
        ``POWER_OF_TWO``: seed of the generator that draws the two ranks.
    class_weight, count_weight:
        ``LENGTH_AWARE``: weights of the outstanding requests of the request's output-length
        class and of all outstanding requests, against prompt work counted in typical prompts
        (module docstring). Both 0: prompt work alone.
    """

    policy: Policy = Policy.REQUESTS_THEN_WORK
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S
    stale_policy: StalePolicy = StalePolicy.SATURATED
    stale_after_s: float | None = None
    kv_weight: float = 4.0
    throughput_floor: float = 1.0
    request_slack: int = 1
    seed: int = 0
    class_weight: float = 2.0
    count_weight: float = 2.0

    def __post_init__(self) -> None:
        if not self.refresh_interval_s >= 0:
            raise UsageError(f"refresh_interval_s must be >= 0: {self.refresh_interval_s}")
        if self.stale_after_s is not None and not self.stale_after_s > 0:
            raise UsageError(f"stale_after_s must be > 0: stale_after_s={self.stale_after_s}")
        if not (self.kv_weight >= 0 and math.isfinite(self.kv_weight)):
            raise UsageError(f"kv_weight must be finite and >= 0: kv_weight={self.kv_weight}")
        if not self.throughput_floor > 0:
            raise UsageError(f"throughput_floor must be > 0: {self.throughput_floor}")
        if self.request_slack < 0:
            raise UsageError(f"request_slack must be >= 0: request_slack={self.request_slack}")
        for name in ("class_weight", "count_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be finite and >= 0: {name}={value}")
