"""Executors: what runs one step of the reference scheduler, and how long it takes.

``sim`` (default, core dependencies only) models a step's time as
``overhead + prefill_tokens * prefill_cost + decode_tokens * decode_cost +
context_tokens * context_cost`` and sleeps for it, so a long chunked prefill blocks the loop
like a real forward pass would. ``torch`` (``pip install loadsnap[torch]``) really runs a small
randomly initialised transformer; see ``scheduler._torch_executor``. Choosing one by name is
``scheduler.executor_registry.make_executor`` (which alone imports the torch module, lazily).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from loadsnap.errors import UsageError
from loadsnap.schema import MemorySection
from scheduler.engine import StepPlan, StepResult

__all__ = ["CostModel", "Executor", "SimExecutor", "TorchConfig"]


class Executor(Protocol):
    """Runs steps planned by :class:`~scheduler.engine.BatchEngine`. Single-threaded."""

    @property
    def needs_slots(self) -> bool:
        """Whether plans must carry every KV slot each request attends to."""
        ...

    def execute(self, plan: StepPlan) -> StepResult:
        """Run ``plan``; return its duration and (optionally) the next tokens."""
        ...

    def memory_section(self) -> MemorySection | None:
        """Memory figures for the snapshot, or ``None``."""
        ...


@dataclass(frozen=True, slots=True)
class CostModel:
    """Step-time model of the ``sim`` executor (all in seconds).

    The defaults look like a mid-sized model on one GPU: a decode step of a 32-request batch at
    about 3 ms plus context, a 512-token prefill chunk at about 11 ms. For a loop-blocking
    prefill of 200 ms to 1 s, raise ``prefill_token_s`` (e.g. ``1e-3`` with 512-token chunks).
    """

    overhead_s: float = 1e-3
    prefill_token_s: float = 2e-5
    decode_token_s: float = 5e-5
    context_token_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("overhead_s", "prefill_token_s", "decode_token_s", "context_token_s"):
            value = getattr(self, name)
            if not 0.0 <= value < 60.0:
                raise UsageError(f"cost out of range: {name}={value}")

    def step_s(self, plan: StepPlan) -> float:
        """Modelled duration of ``plan``."""
        return (
            self.overhead_s
            + plan.prefill_tokens * self.prefill_token_s
            + plan.decode_tokens * self.decode_token_s
            + plan.context_tokens * self.context_token_s
        )


class SimExecutor:
    """Cost-model executor: sleeps for the modelled step time. Single-threaded.

    Parameters
    ----------
    cost:
        The step-time model.
    kv_capacity:
        Pool size in tokens, reported in the memory section.
    kv_bytes_per_token:
        Modelled KV bytes per token (default: a Llama-3-8B-like 32 layers x 8 KV heads x 128
        x 2 (K, V) x 2 bytes = 128 KiB).
    weight_bytes:
        Modelled weight bytes (default 16 GB).
    sleep:
        How to wait (a fake in tests).
    """

    needs_slots = False

    def __init__(
        self,
        cost: CostModel | None = None,
        *,
        kv_capacity: int = 0,
        kv_bytes_per_token: int = 131072,
        weight_bytes: int = 16_000_000_000,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cost = cost if cost is not None else CostModel()
        self._sleep = sleep
        self._memory = MemorySection(
            weight_bytes=weight_bytes,
            kv_cache_bytes=kv_capacity * kv_bytes_per_token,
            kv_token_capacity=kv_capacity,
        )
        self.steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        """Sleep for the modelled time of ``plan``."""
        duration = self.cost.step_s(plan)
        if duration > 0:
            self._sleep(duration)
        self.steps += 1
        return StepResult(duration)

    def memory_section(self) -> MemorySection | None:
        """Modelled figures (``kv_token_capacity`` is the real pool size)."""
        return self._memory


@dataclass(frozen=True, slots=True)
class TorchConfig:
    """Shape of the ``torch`` executor's model."""

    vocab_size: int = 1024
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
