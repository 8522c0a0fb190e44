"""Exposition: pure renderers from slot reads to JSON, Prometheus text and a rich table.

Policy layer: these functions see only :class:`~loadsnap.SlotRead` values, never buffers or
sockets, and do no I/O. The HTTP router, ``/metrics`` and the CLI only call them.
"""

from __future__ import annotations

from loadsnap.exposition._json import USABLE_STATUSES, render_json
from loadsnap.exposition._prometheus import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    CORE_METRICS,
    MetricSpec,
    Naming,
    render_prometheus,
)
from loadsnap.exposition._table import render_table

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "CORE_METRICS",
    "USABLE_STATUSES",
    "MetricSpec",
    "Naming",
    "render_json",
    "render_prometheus",
    "render_table",
]
