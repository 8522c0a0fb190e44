"""Exposition: the ``/v1/loads`` document model and pure renderers from slot reads to JSON,
Prometheus text and a rich table.

Policy layer: these functions see only :class:`~loadsnap.SlotRead` values, never buffers or
sockets, and do no I/O. The HTTP router, the gRPC servicers, ``/metrics`` and the CLI only call
them. :mod:`._sglang` holds the document's structs, :mod:`._document` the one mapping from
loadsnap's snapshots to them.
"""

from __future__ import annotations

from loadsnap.exposition._document import (
    DOCUMENT_SECTIONS,
    GIB,
    ROUTABLE_STATUSES,
    DocumentSection,
    build_document,
    legacy_loads,
    rank_load,
)
from loadsnap.exposition._json import USABLE_STATUSES, render_json
from loadsnap.exposition._prometheus import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    CORE_METRICS,
    NATIVE_SECTION_FIELDS,
    MetricSpec,
    Naming,
    load_families,
    render_prometheus,
)
from loadsnap.exposition._sglang import (
    I32_MAX,
    Aggregate,
    DisaggregationMetrics,
    LegacyLoad,
    LoadsDocument,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    RankLoad,
    SpeculativeMetrics,
    StatusLabel,
    UnavailableRank,
    field_help,
)
from loadsnap.exposition._table import render_table

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "CORE_METRICS",
    "DOCUMENT_SECTIONS",
    "GIB",
    "I32_MAX",
    "NATIVE_SECTION_FIELDS",
    "ROUTABLE_STATUSES",
    "USABLE_STATUSES",
    "Aggregate",
    "DisaggregationMetrics",
    "DocumentSection",
    "LegacyLoad",
    "LoRAMetrics",
    "LoadsDocument",
    "MemoryMetrics",
    "MetricSpec",
    "Naming",
    "QueueMetrics",
    "RankLoad",
    "SpeculativeMetrics",
    "StatusLabel",
    "UnavailableRank",
    "build_document",
    "field_help",
    "legacy_loads",
    "load_families",
    "rank_load",
    "render_json",
    "render_prometheus",
    "render_table",
]
