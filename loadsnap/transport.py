"""Transport selection: one ``SnapshotWriter`` protocol, one factory.

``LOADSNAP_TRANSPORT=shm|zmq|auto`` (or the ``transport`` argument) picks shared memory for a
rank on the readers' node and ZMQ for a rank elsewhere.
"""

from __future__ import annotations

import enum
import os
from typing import Protocol, runtime_checkable

from loadsnap.errors import UsageError
from loadsnap.schema import LoadSnapshot
from loadsnap.shm_writer import ShmWriter

__all__ = ["SnapshotWriter", "Transport", "make_writer", "resolve_transport"]


class Transport(enum.Enum):
    """How a rank's snapshots reach the readers."""

    SHM = "shm"
    ZMQ = "zmq"
    AUTO = "auto"


@runtime_checkable
class SnapshotWriter(Protocol):
    """What a publisher needs from a transport. Single writer per rank; never blocks."""

    def publish(self, snapshot: LoadSnapshot) -> int:
        """Stamp and publish ``snapshot``; return its sequence number."""
        ...

    def close(self) -> None:
        """Release the transport's resources. Idempotent."""
        ...


def resolve_transport(transport: str | Transport | None = None) -> Transport:
    """The transport named by the argument, else ``$LOADSNAP_TRANSPORT``, else ``auto``.

    Raises
    ------
    UsageError
        An unknown name; the message lists the valid ones.
    """
    raw = transport if transport is not None else os.environ.get("LOADSNAP_TRANSPORT", "auto")
    if isinstance(raw, Transport):
        return raw
    try:
        return Transport(raw.strip().lower())
    except ValueError:
        valid = ", ".join(t.value for t in Transport)
        raise UsageError(f"unknown transport: transport={raw!r}; valid: {valid}") from None


def make_writer(
    instance: str,
    dp_size: int,
    dp_rank: int,
    *,
    transport: str | Transport | None = None,
    shm_dir: str | None = None,
) -> SnapshotWriter:
    """Build the writer for one rank.

    ``auto`` resolves to shared memory (ZMQ options are added by the ZMQ transport).
    """
    chosen = resolve_transport(transport)
    if chosen in (Transport.SHM, Transport.AUTO):
        return ShmWriter(instance, dp_size, dp_rank, shm_dir=shm_dir)
    raise UsageError("transport=zmq needs the ZMQ transport options (collector address)")
