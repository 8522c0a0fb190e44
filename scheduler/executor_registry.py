"""Choosing an executor by name: ``sim`` always, ``torch`` when torch is installed.

The only module that imports ``scheduler._torch_executor`` (lazily), so that module and
``scheduler.executors`` never import each other.
"""

from __future__ import annotations

from typing import Final

from loadsnap.errors import UsageError
from scheduler.executors import CostModel, Executor, SimExecutor, TorchConfig

__all__ = ["EXECUTORS", "make_executor", "require_torch"]

EXECUTORS: Final[tuple[str, ...]] = ("sim", "torch")


def require_torch() -> object:
    """Import torch, or raise an ImportError that names the extra to install."""
    try:
        import torch
    except ImportError:
        raise ImportError("the torch executor needs torch: pip install loadsnap[torch]") from None
    return torch


def make_executor(
    name: str,
    *,
    kv_capacity: int,
    cost: CostModel | None = None,
    torch_config: TorchConfig | None = None,
) -> Executor:
    """Build the executor called ``name`` (``sim`` or ``torch``).

    Raises
    ------
    UsageError
        Unknown name.
    ImportError
        ``torch`` without torch installed; the message names ``loadsnap[torch]``.
    """
    if name == "sim":
        return SimExecutor(cost, kv_capacity=kv_capacity)
    if name == "torch":
        require_torch()
        from scheduler._torch_executor import TorchExecutor

        return TorchExecutor(torch_config or TorchConfig(), kv_capacity=kv_capacity)
    raise UsageError(f"unknown executor: executor={name!r}; valid: {', '.join(EXECUTORS)}")
