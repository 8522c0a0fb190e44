"""loadsnap: lock-free load telemetry from LLM-serving schedulers to the components that act on it.

Wire layer: :class:`LoadSnapshot` and its sections. Transport layer: :class:`ShmWriter` and
:class:`ShmReader` (same node), ZMQ (multi-node). Policy code reads through
:class:`SnapshotSource` and sees :class:`SlotRead` / :class:`HotTable` only.
"""

from __future__ import annotations

from loadsnap._location import segment_path
from loadsnap._segment import unlink_segment
from loadsnap.errors import (
    LayoutError,
    LoadsnapError,
    LockHeldError,
    PayloadTooLargeError,
    SegmentError,
    SegmentInUseError,
    SegmentNotReadyError,
    SegmentUnavailableError,
    StaleError,
    TransportError,
    UsageError,
    WireDecodeError,
    WireError,
    WireValidationError,
)
from loadsnap.layout import DEFAULT_PAYLOAD_CAPACITY, SegmentGeometry
from loadsnap.publisher import LoadPublisher, PublisherStats, PublishReason
from loadsnap.reading import (
    DEFAULT_STALE_AFTER_S,
    HotTable,
    ReaderStats,
    SegmentState,
    SlotRead,
    SlotStatus,
    SnapshotSource,
)
from loadsnap.schema import (
    SECTIONS,
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    SpeculativeSection,
    parse_include,
    validate_snapshot,
)
from loadsnap.shm_reader import ShmReader
from loadsnap.shm_writer import ShmWriter
from loadsnap.wire import decode_snapshot, encode_snapshot

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PAYLOAD_CAPACITY",
    "DEFAULT_STALE_AFTER_S",
    "SECTIONS",
    "DisaggregationSection",
    "HotTable",
    "LayoutError",
    "LoadPublisher",
    "LoadSnapshot",
    "LoadsnapError",
    "LockHeldError",
    "LoraSection",
    "MemorySection",
    "PayloadTooLargeError",
    "PublishReason",
    "PublisherStats",
    "QueueSection",
    "ReaderStats",
    "SegmentError",
    "SegmentGeometry",
    "SegmentInUseError",
    "SegmentNotReadyError",
    "SegmentState",
    "SegmentUnavailableError",
    "ShmReader",
    "ShmWriter",
    "SlotRead",
    "SlotStatus",
    "SnapshotSource",
    "SpeculativeSection",
    "StaleError",
    "TransportError",
    "UsageError",
    "WireDecodeError",
    "WireError",
    "WireValidationError",
    "__version__",
    "decode_snapshot",
    "encode_snapshot",
    "parse_include",
    "segment_path",
    "unlink_segment",
    "validate_snapshot",
]
