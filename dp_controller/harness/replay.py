"""Trace replay: drive a :class:`~dp_controller.controller.Controller` with a workload in real
time and sample how evenly the ranks are loaded.

Harness code for the CLI and the benchmarks; a deployment submits its own requests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dp_controller.controller import Controller
from dp_controller.harness.workload import TraceRequest
from scheduler.messages import Finished

__all__ = ["TraceRun", "imbalance", "replay"]


@dataclass(slots=True)
class TraceRun:
    """What :func:`replay` observed."""

    dispatched: int
    finished: list[Finished]  # every result, failed ones included (``status``)
    unfinished: int
    duration_s: float
    # (seconds since start, outstanding requests per rank), sampled while anything is outstanding
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    # the same, taken right after each batch of dispatches (what the policy decided)
    dispatch_samples: list[tuple[float, list[int]]] = field(default_factory=list)
    failed: int = 0  # results whose status is not ok


def imbalance(
    samples: Sequence[tuple[float, Sequence[int]]], min_mean: float = 2.0
) -> tuple[float, float]:
    """Mean and maximum over samples of ``max / mean`` outstanding per rank (1.0 = perfect).

    Only samples whose mean outstanding per rank is at least ``min_mean`` count: with fewer
    requests than ranks even a perfect spread has ``max / mean > 1``.
    """
    ratios = []
    for _, counts in samples:
        total = sum(counts)
        if total > 0 and total >= min_mean * len(counts):
            ratios.append(max(counts) * len(counts) / total)
    if not ratios:
        return 1.0, 1.0
    return sum(ratios) / len(ratios), max(ratios)


def replay(
    controller: Controller,
    trace: Sequence[TraceRequest],
    *,
    drain_timeout_s: float = 30.0,
    sample_interval_s: float = 0.005,
) -> TraceRun:
    """Replay ``trace`` through ``controller`` in real time, then wait for its requests.

    Samples outstanding requests per rank every ``sample_interval_s`` (for :func:`imbalance`).
    Stops waiting ``drain_timeout_s`` after the last arrival.
    """
    start = time.monotonic()
    finished: list[Finished] = []
    samples: list[tuple[float, list[int]]] = []
    dispatch_samples: list[tuple[float, list[int]]] = []
    outstanding = controller.outstanding
    base = list(outstanding)
    i, n = 0, len(trace)
    last_arrival = trace[-1].arrival_s if trace else 0.0
    next_sample = 0.0
    while True:
        now = time.monotonic() - start
        submitted = i
        while i < n and trace[i].arrival_s <= now:
            req = trace[i]
            controller.submit(req.prompt, req.max_new_tokens)
            i += 1
        if i > submitted:
            counts = [o - b for o, b in zip(outstanding, base, strict=True)]
            dispatch_samples.append((now, counts))
        if now >= next_sample:
            counts = [o - b for o, b in zip(outstanding, base, strict=True)]
            if any(counts):
                samples.append((now, counts))
            next_sample = now + sample_interval_s
        pending = sum(outstanding) - sum(base)
        if i >= n and (pending <= 0 or now > last_arrival + drain_timeout_s):
            break
        wait = sample_interval_s
        if i < n:
            wait = min(wait, max(0.0, trace[i].arrival_s - now))
        finished.extend(controller.poll(wait))
    return TraceRun(
        dispatched=n,
        finished=finished,
        unfinished=sum(outstanding) - sum(base),
        duration_s=time.monotonic() - start,
        samples=samples,
        dispatch_samples=dispatch_samples,
        failed=sum(1 for f in finished if f.status != "ok"),
    )
