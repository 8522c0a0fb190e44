"""dp_controller: budget-based DP dispatch that never forgets in-flight requests.

Policy code only: it reads load through :class:`~loadsnap.SnapshotSource` (the hot table) and
never touches buffers; the controller process (:mod:`dp_controller.controller`) owns the sockets.
"""

from __future__ import annotations

from dp_controller.baselines import OverwriteBudget, RoundRobinBaseline
from dp_controller.budget import (
    CONTROLLER_POLICY,
    DEFAULT_REFRESH_INTERVAL_S,
    BudgetConfig,
    BudgetStats,
    DPBudget,
    Policy,
    StalePolicy,
)
from dp_controller.dispatching import Dispatch, Dispatcher, RankChanges
from dp_controller.ledger import DispatchLedger, LedgerStats

__all__ = [
    "CONTROLLER_POLICY",
    "DEFAULT_REFRESH_INTERVAL_S",
    "BudgetConfig",
    "BudgetStats",
    "DPBudget",
    "Dispatch",
    "DispatchLedger",
    "Dispatcher",
    "LedgerStats",
    "OverwriteBudget",
    "Policy",
    "RankChanges",
    "RoundRobinBaseline",
    "StalePolicy",
]
