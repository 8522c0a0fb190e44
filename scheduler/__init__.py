"""scheduler: a reference continuous-batching scheduler that publishes its load with loadsnap.

:class:`BatchEngine` (state, no I/O) + an executor (``sim`` or ``torch``) +
:class:`SchedulerProcess` (ZMQ sockets, main loop); run it with ``python -m scheduler``. What an
engine embeds to publish its load is :class:`loadsnap.LoadPublisher`, not this package.
"""

from __future__ import annotations

from scheduler.engine import BatchEngine, EngineConfig, StepItem, StepKind, StepPlan, StepResult
from scheduler.executor_registry import make_executor
from scheduler.executors import CostModel, Executor, SimExecutor, TorchConfig

__all__ = [
    "BatchEngine",
    "CostModel",
    "EngineConfig",
    "Executor",
    "SimExecutor",
    "StepItem",
    "StepKind",
    "StepPlan",
    "StepResult",
    "TorchConfig",
    "make_executor",
]
