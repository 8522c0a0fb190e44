"""Error hierarchy.

Blame is split as h11 does: :class:`UsageError` means the caller misused our API (a bug in
the calling code); every other :class:`LoadsnapError` means bad data arrived from a peer, a
file or the environment, and a long-running process should count it and carry on.
Messages name values as ``name=value``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadsnap.reading import SegmentState

__all__ = [
    "LayoutError",
    "LoadsnapError",
    "LockHeldError",
    "PayloadTooLargeError",
    "SegmentError",
    "SegmentInUseError",
    "SegmentNotReadyError",
    "SegmentUnavailableError",
    "StaleError",
    "TransportError",
    "UsageError",
    "WireDecodeError",
    "WireError",
    "WireValidationError",
]


class LoadsnapError(Exception):
    """Root of every error loadsnap raises on purpose."""


class UsageError(LoadsnapError, ValueError):
    """The caller passed an invalid argument (a bug in the calling code, not bad data)."""


class WireError(LoadsnapError):
    """Bytes that do not decode to a valid message (a snapshot, a frame, a control message)."""


class WireDecodeError(WireError):
    """Not the wire format at all: not msgpack, cut short, or not the expected shape."""


class WireValidationError(WireError):
    """Well-formed msgpack whose values break the schema (a negative count, a ratio above 1)."""


class LayoutError(LoadsnapError):
    """A shared-memory segment whose header or size does not match what we expect."""


class StaleError(LoadsnapError):
    """Load data exists but is too old (or its writer is gone) to act on."""


class TransportError(LoadsnapError):
    """Moving bytes failed; the message carries the endpoint or segment name."""


class SegmentError(TransportError):
    """Creating, opening or claiming a shared-memory segment failed."""


class PayloadTooLargeError(UsageError):
    """An encoded snapshot does not fit its slot; the slot is left untouched."""


class SegmentNotReadyError(SegmentError):
    """The segment file exists but its creator has not finished it (or died doing so)."""


class SegmentInUseError(SegmentError):
    """A writer is attached to the segment, so it may not be removed or reshaped."""


class LockHeldError(SegmentError):
    """Another process holds a loadsnap lock file (an instance, a deployment, a collector)."""


class SegmentUnavailableError(SegmentError):
    """No readable segment: ``state`` says why (missing, not ready, incompatible)."""

    def __init__(self, message: str, state: SegmentState) -> None:
        super().__init__(message)
        self.state = state
