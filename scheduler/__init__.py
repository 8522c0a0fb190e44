"""scheduler: the load publisher an engine embeds, and a reference continuous-batching scheduler.

:class:`LoadPublisher` is the embeddable part (any ``SnapshotWriter``). The reference scheduler
is :class:`BatchEngine` (state, no I/O) + an executor (``sim`` or ``torch``) +
:class:`SchedulerProcess` (ZMQ sockets, main loop); run it with ``python -m scheduler``.
"""

from __future__ import annotations

from scheduler.engine import BatchEngine, EngineConfig, StepItem, StepKind, StepPlan, StepResult
from scheduler.executors import CostModel, Executor, SimExecutor, TorchConfig, make_executor
from scheduler.publisher import LoadPublisher, PublisherStats, PublishReason

__all__ = [
    "BatchEngine",
    "CostModel",
    "EngineConfig",
    "Executor",
    "LoadPublisher",
    "PublishReason",
    "PublisherStats",
    "SimExecutor",
    "StepItem",
    "StepKind",
    "StepPlan",
    "StepResult",
    "TorchConfig",
    "make_executor",
]
