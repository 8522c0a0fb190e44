"""The shared workload generator: Poisson arrivals, bursts, length mixes, shared prefixes.

Used by the demo, the controller CLI and the benchmarks, so they all replay the same traces. A
trace is a pure function of its :class:`WorkloadSpec` (seeded numpy ``Generator``): the same spec
gives the same requests, token for token, on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec
import numpy as np

from loadsnap.errors import UsageError

__all__ = ["PRESETS", "TraceRequest", "WorkloadSpec", "generate_trace", "preset"]

_VOCAB: Final[int] = 32_000


class TraceRequest(msgspec.Struct, frozen=True):
    """One request of a trace: when it arrives (seconds from start) and what it asks."""

    arrival_s: float
    prompt: list[int]
    max_new_tokens: int
    group: int  # shared-prefix group, -1 for none

    @property
    def est_tokens(self) -> int:
        """Tokens this request will hold at its end (prompt + output)."""
        return len(self.prompt) + self.max_new_tokens


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A reproducible workload.

    Parameters
    ----------
    seed:
        Seed of the numpy generator.
    duration_s:
        Length of the trace; Poisson arrivals and bursts stop here.
    rate_rps:
        Mean rate of the Poisson background (0 for bursts only).
    burst_every_s, burst_size, burst_spread_s:
        Every ``burst_every_s`` (first at ``burst_every_s``), ``burst_size`` requests arrive
        within ``burst_spread_s`` (0 = the same instant). ``burst_size`` 0 disables bursts.
    prompt_lens, output_lens:
        ``(length, weight)`` mixes; each request draws one of each.
    prefix_groups, prefix_len, prefix_share:
        ``prefix_groups`` shared prefixes of ``prefix_len`` tokens; a request starts with one
        (chosen uniformly) with probability ``prefix_share``.
    """

    seed: int = 0
    duration_s: float = 2.0
    rate_rps: float = 50.0
    burst_every_s: float = 0.5
    burst_size: int = 0
    burst_spread_s: float = 0.0
    prompt_lens: tuple[tuple[int, float], ...] = ((64, 0.6), (256, 0.3), (1024, 0.1))
    output_lens: tuple[tuple[int, float], ...] = ((16, 0.5), (64, 0.4), (256, 0.1))
    prefix_groups: int = 4
    prefix_len: int = 32
    prefix_share: float = 0.5

    def __post_init__(self) -> None:
        if not (self.duration_s > 0 and self.rate_rps >= 0 and self.burst_every_s > 0):
            raise UsageError(
                f"need duration_s > 0, rate_rps >= 0, burst_every_s > 0: duration_s="
                f"{self.duration_s} rate_rps={self.rate_rps} burst_every_s={self.burst_every_s}"
            )
        if self.burst_size < 0 or self.burst_spread_s < 0:
            raise UsageError(f"burst_size and burst_spread_s must be >= 0: {self}")
        if not 0.0 <= self.prefix_share <= 1.0:
            raise UsageError(f"prefix_share must be in 0..1: prefix_share={self.prefix_share}")
        for name, mix in (("prompt_lens", self.prompt_lens), ("output_lens", self.output_lens)):
            if not mix or any(n < 1 or w <= 0 for n, w in mix):
                raise UsageError(f"{name} needs (length >= 1, weight > 0) pairs: {name}={mix}")


PRESETS: Final[dict[str, WorkloadSpec]] = {
    "poisson": WorkloadSpec(rate_rps=40.0, duration_s=3.0),
    # Bursts much larger than a 20 ms refresh window can absorb, on a light background.
    "bursty": WorkloadSpec(
        rate_rps=10.0,
        duration_s=3.0,
        burst_every_s=0.75,
        burst_size=96,
        burst_spread_s=0.1,
        prompt_lens=((32, 0.5), (128, 0.4), (512, 0.1)),
        output_lens=((32, 0.5), (64, 0.4), (128, 0.1)),
    ),
    "tiny": WorkloadSpec(
        rate_rps=10.0,
        duration_s=0.6,
        burst_every_s=0.3,
        burst_size=16,
        prompt_lens=((16, 1.0),),
        output_lens=((4, 1.0),),
    ),
}


def preset(name: str, **overrides: object) -> WorkloadSpec:
    """A named workload (``poisson``, ``bursty``, ``tiny``), optionally with fields overridden.

    Raises
    ------
    UsageError
        Unknown name or field.
    """
    try:
        base = PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown workload: name={name}; valid: {', '.join(PRESETS)}") from None
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    unknown = set(overrides).difference(fields)
    if unknown:
        raise UsageError(f"unknown workload fields: {', '.join(sorted(unknown))}")
    fields.update(overrides)
    return WorkloadSpec(**fields)


def _draw(rng: np.random.Generator, mix: tuple[tuple[int, float], ...], size: int) -> list[int]:
    lengths = np.array([n for n, _ in mix])
    weights = np.array([w for _, w in mix], dtype=np.float64)
    return [int(x) for x in rng.choice(lengths, size=size, p=weights / weights.sum())]


def generate_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    """Every request of ``spec``, sorted by arrival time (stable for equal times)."""
    rng = np.random.default_rng(spec.seed)
    arrivals: list[float] = []
    if spec.rate_rps > 0:
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / spec.rate_rps))
            if t >= spec.duration_s:
                break
            arrivals.append(t)
    if spec.burst_size > 0:
        k = 1
        while k * spec.burst_every_s < spec.duration_s:
            start = k * spec.burst_every_s
            offsets = rng.uniform(0.0, spec.burst_spread_s, spec.burst_size)
            arrivals.extend(float(start + o) for o in offsets)
            k += 1
    arrivals.sort()
    n = len(arrivals)
    prompt_lens = _draw(rng, spec.prompt_lens, n)
    output_lens = _draw(rng, spec.output_lens, n)
    prefixes = [
        [int(x) for x in rng.integers(1, _VOCAB, spec.prefix_len)]
        for _ in range(spec.prefix_groups)
    ]
    use_prefix = rng.random(n) < spec.prefix_share if prefixes else np.zeros(n, dtype=bool)
    groups = rng.integers(0, max(1, spec.prefix_groups), n)
    trace = []
    for i, arrival in enumerate(arrivals):
        length = prompt_lens[i]
        group = int(groups[i]) if use_prefix[i] else -1
        head = prefixes[group][:length] if group >= 0 else []
        tail = [int(x) for x in rng.integers(1, _VOCAB, length - len(head))]
        trace.append(TraceRequest(arrival, head + tail, output_lens[i], group))
    return trace
