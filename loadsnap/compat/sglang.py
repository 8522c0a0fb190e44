"""sglang's ``load_snapshot`` module, backed by loadsnap: swap one import, keep sglang's code.

An sglang deployment adopts loadsnap by making ``sglang.srt.managers.load_snapshot`` this
module (see README, "Adopting loadsnap in sglang"). The names, constructor signatures and
return conventions are sglang's; underneath, the transports are loadsnap's:

* :class:`ShmLoadSnapshotWriter` publishes through :class:`~loadsnap.ShmWriter` (a lock-free
  double-buffered seqlock with a CRC per record) instead of a whole-file ``flock``: a reader
  never blocks a writer, and a writer killed mid-write leaves its previous record readable,
  where sglang's scheme loses the rank until it writes again.
* :class:`ShmLoadSnapshotReader` reads through :class:`~loadsnap.ShmReader`: ``read(rank)``
  returns the rank's latest complete snapshot or None, ``read_all()`` the present ranks in
  rank order, as sglang's do. Freshness (fresh, stale, dead) is loadsnap's to add on top:
  ``reader.loadsnap_reader`` gives the full :class:`~loadsnap.SlotRead` view.
* :class:`ZmqLoadSnapshotWriter` / :class:`ZmqShmLoadSnapshotReader` use loadsnap's ZMQ
  writer and :class:`~loadsnap.collector.Collector`, which drains in its own thread (not only
  when someone reads) and checks every frame (size, schema, rank, ordering). Frames carry a
  channel name derived from the endpoint, so a writer of another deployment is dropped.

Paths: sglang names a segment by a file path; loadsnap by a directory and an instance name.
A path ``DIR/NAME`` maps to the instance ``NAME`` (made safe and unique) in ``DIR``, so the
file on disk is ``DIR/loadsnap-NAME``. ``SGLANG_LOAD_SNAPSHOT_USE_ZMQ`` is read through
:mod:`loadsnap.settings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Final

import msgspec

from loadsnap import settings
from loadsnap.collector import Collector
from loadsnap.errors import LoadsnapError, SegmentUnavailableError, UsageError
from loadsnap.layout import DEFAULT_PAYLOAD_CAPACITY
from loadsnap.schema import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    SpeculativeSection,
)
from loadsnap.shm_reader import ShmReader
from loadsnap.shm_writer import ShmWriter
from loadsnap.zmq_writer import ZmqWriter

__all__ = [
    "DisaggregationMetrics",
    "LoRAMetrics",
    "LoadSnapshot",
    "MemoryMetrics",
    "QueueMetrics",
    "ShmLoadSnapshotReader",
    "ShmLoadSnapshotWriter",
    "SpeculativeMetrics",
    "ZmqLoadSnapshotWriter",
    "ZmqShmLoadSnapshotReader",
    "create_load_snapshot_reader",
    "create_load_snapshot_writer",
    "instance_for_path",
    "shm_path_for",
    "should_use_zmq",
    "snapshot_decoder",
    "snapshot_encoder",
    "zmq_reader_owner",
]

logger = logging.getLogger(__name__)

_LOAD_AWARE_METHODS: Final = frozenset({"total_requests", "total_tokens"})
_NAME_KEEP: Final[int] = 40  # characters of a path's name kept in its instance name
# sglang's slots hold 16 KiB; a realistic snapshot with every section is about 1 KiB.
COMPAT_PAYLOAD_CAPACITY: Final[int] = max(DEFAULT_PAYLOAD_CAPACITY, 8192)


# --- sglang's section structs ---------------------------------------------------------------
# sglang builds its sections positionally or by keyword, in its own field order; loadsnap's
# sections carry those fields under the same names (appended, ``loadsnap.schema``). These
# constructors take sglang's signatures and return loadsnap's sections, so sglang's scheduler
# code builds snapshots unchanged and every reader sees sglang's figures.


def MemoryMetrics(
    weight_gb: float, kv_cache_gb: float, graph_gb: float, token_capacity: int
) -> MemorySection:
    """sglang's ``MemoryMetrics``: a :class:`~loadsnap.MemorySection`."""
    return MemorySection(
        weight_gb=weight_gb,
        kv_cache_gb=kv_cache_gb,
        graph_gb=graph_gb,
        token_capacity=token_capacity,
    )


def SpeculativeMetrics(
    accept_length: float,
    accept_rate: float,
    draft_occupancy_rate: float | None = None,
    proposed_draft_length: float | None = None,
) -> SpeculativeSection:
    """sglang's ``SpeculativeMetrics``: a :class:`~loadsnap.SpeculativeSection`."""
    return SpeculativeSection(
        accept_length=accept_length,
        accept_rate=accept_rate,
        draft_occupancy_rate=draft_occupancy_rate,
        proposed_draft_length=proposed_draft_length,
    )


def LoRAMetrics(slots_used: int, slots_total: int, utilization: float) -> LoraSection:
    """sglang's ``LoRAMetrics``: a :class:`~loadsnap.LoraSection`."""
    return LoraSection(slots_used=slots_used, slots_total=slots_total, utilization=utilization)


def DisaggregationMetrics(
    mode: str,
    prefill_bootstrap_queue_reqs: int = 0,
    prefill_inflight_queue_reqs: int = 0,
    decode_prealloc_queue_reqs: int = 0,
    decode_transfer_queue_reqs: int = 0,
    decode_retracted_queue_reqs: int = 0,
    kv_transfer_speed_gb_s: float = 0.0,
    kv_transfer_latency_ms: float = 0.0,
    *,
    prefill_prealloc_queue_reqs: int | None = None,
) -> DisaggregationSection:
    """sglang's ``DisaggregationMetrics`` (either name of its first prefill queue)."""
    return DisaggregationSection(
        mode=mode,
        prefill_bootstrap_queue_reqs=prefill_bootstrap_queue_reqs,
        prefill_prealloc_queue_reqs=(
            prefill_bootstrap_queue_reqs
            if prefill_prealloc_queue_reqs is None
            else prefill_prealloc_queue_reqs
        ),
        prefill_inflight_queue_reqs=prefill_inflight_queue_reqs,
        decode_prealloc_queue_reqs=decode_prealloc_queue_reqs,
        decode_transfer_queue_reqs=decode_transfer_queue_reqs,
        decode_retracted_queue_reqs=decode_retracted_queue_reqs,
        kv_transfer_speed_gb_s=kv_transfer_speed_gb_s,
        kv_transfer_latency_ms=kv_transfer_latency_ms,
    )


def QueueMetrics(
    waiting: int, grammar: int, paused: int, retracted: int, prealloc_ready: int = 0
) -> QueueSection:
    """sglang's ``QueueMetrics``: a :class:`~loadsnap.QueueSection`."""
    return QueueSection(
        waiting=waiting,
        grammar=grammar,
        paused=paused,
        retracted=retracted,
        prealloc_ready=prealloc_ready,
    )


snapshot_encoder: Final = msgspec.msgpack.Encoder()
snapshot_decoder: Final = msgspec.msgpack.Decoder(LoadSnapshot)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _digest(text: str) -> str:
    return hashlib.blake2s(text.encode(), digest_size=4).hexdigest()


def instance_for_path(path: str) -> tuple[str, str]:
    """``(directory, instance)`` of an sglang segment path, as loadsnap names segments.

    The instance keeps (part of) the file name and adds a digest of the whole path, so two
    paths never share an instance and the name is always a valid loadsnap instance.
    """
    directory, name = os.path.split(os.path.abspath(path))
    safe = _safe(name).lstrip("._-") or "segment"
    return directory, f"{safe[:_NAME_KEEP]}-{_digest(path)}"


def shm_path_for(ipc_name: str) -> str:
    """The segment path of a deployment named ``ipc_name`` (sglang's naming)."""
    name = os.path.basename(ipc_name.rstrip("/")) or "default"
    return f"/dev/shm/sglang_loads_{_safe(name)}_{_digest(ipc_name)}.shm"


def _channel_for(endpoint: str) -> str:
    """The name frames on ``endpoint`` carry: writers and reader derive it alike."""
    return f"sglang-zmq-{_digest(endpoint)}"


def should_use_zmq(server_args: Any) -> bool:
    """Whether snapshots go over ZMQ (multi-node DP attention, or the env switch)."""
    multi_node = bool(getattr(server_args, "enable_dp_attention", False)) and (
        getattr(server_args, "nnodes", 1) > 1
    )
    return multi_node or settings.current().sglang_use_zmq


def _tokenizer_owner(server_args: Any) -> str:
    if getattr(server_args, "tokenizer_worker_num", 1) > 1:
        return "MultiTokenizerRouter"
    return "TokenizerManager"


def zmq_reader_owner(server_args: Any, caller: str) -> bool:
    """Whether ``caller`` binds the ZMQ PULL socket (at most one caller does).

    ``caller`` is ``"DataParallelController"``, ``"TokenizerManager"`` or
    ``"MultiTokenizerRouter"``. Nobody owns it without ZMQ or off node 0; with one DP rank,
    or a method that reads no load, the tokenizer side owns it; with a load-aware method
    (``total_requests``, ``total_tokens``), the DP controller does.
    """
    if not should_use_zmq(server_args) or server_args.node_rank != 0:
        return False
    tokenizer = _tokenizer_owner(server_args)
    if server_args.dp_size == 1:
        return caller == tokenizer
    if str(server_args.load_balance_method).lower() in _LOAD_AWARE_METHODS:
        return caller == "DataParallelController"
    return caller == tokenizer


class ShmLoadSnapshotWriter:
    """sglang's SHM writer on loadsnap's :class:`~loadsnap.ShmWriter`. Single writer per rank.

    ``write`` never blocks (no lock taken) and never leaves a half-written record: a writer
    killed at any point leaves the previous complete record readable, where sglang's lost the
    rank. Constructing publishes an empty snapshot for the rank, as sglang's does.

    Raises
    ------
    ValueError
        ``dp_rank`` out of range (:class:`~loadsnap.errors.UsageError` is a ValueError).
    loadsnap.errors.SegmentError
        The segment cannot be created or attached (the message names the path).
    """

    def __init__(self, path: str, dp_size: int, dp_rank: int, publish_interval: int = 1) -> None:
        if not 0 <= dp_rank < dp_size:
            raise UsageError(f"invalid dp_rank={dp_rank} for dp_size={dp_size}")
        self.publish_interval = max(1, publish_interval)
        self.publish_counter = 0
        self.path = path
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        directory, instance = instance_for_path(path)
        self._writer = ShmWriter(
            instance,
            dp_size,
            dp_rank,
            shm_dir=directory,
            payload_capacity=COMPAT_PAYLOAD_CAPACITY,
        )
        self._writer.publish(LoadSnapshot(dp_rank=dp_rank))

    def write(self, snapshot: LoadSnapshot) -> None:
        """Publish ``snapshot`` (never blocks).

        Raises
        ------
        ValueError
            ``snapshot.dp_rank`` is not this writer's, or a value breaks the schema; the slot
            keeps its previous record.
        """
        self._writer.publish(snapshot)

    def close(self) -> None:
        """Detach (the last writer of a segment removes it). Idempotent."""
        self._writer.close()


class ZmqLoadSnapshotWriter:
    """sglang's ZMQ writer on loadsnap's :class:`~loadsnap.zmq_writer.ZmqWriter`.

    ``write`` never blocks: with no reader (or a slow one) the snapshot is dropped, as
    sglang's is. Single writer per rank.
    """

    def __init__(
        self, endpoint: str, dp_size: int, dp_rank: int, publish_interval: int = 1
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise UsageError(f"invalid dp_rank={dp_rank} for dp_size={dp_size}")
        self.publish_interval = max(1, publish_interval)
        self.publish_counter = 0
        self.endpoint = endpoint
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self._writer = ZmqWriter(
            endpoint,
            dp_size,
            dp_rank,
            instance=_channel_for(endpoint),
            max_message_bytes=COMPAT_PAYLOAD_CAPACITY * 2,
        )

    def write(self, snapshot: LoadSnapshot) -> None:
        """Send ``snapshot`` without blocking (dropped when nobody receives).

        Raises
        ------
        ValueError
            ``snapshot.dp_rank`` is not this writer's, or a value breaks the schema.
        """
        self._writer.publish(snapshot)

    def close(self) -> None:
        """Close the socket (unsent snapshots are dropped). Idempotent."""
        self._writer.close()


class ShmLoadSnapshotReader:
    """sglang's SHM reader on loadsnap's :class:`~loadsnap.ShmReader`. One per thread.

    Never blocks a writer. ``read`` and ``read_all`` return snapshots, as sglang's do; a rank
    whose writer died keeps its last complete snapshot (``loadsnap_reader.read(rank)`` says it
    is ``dead``, with its age).
    """

    def __init__(self, path: str, dp_size: int) -> None:
        self.path = path
        self.dp_size = dp_size
        directory, instance = instance_for_path(path)
        self.loadsnap_reader = ShmReader(instance, shm_dir=directory)
        self._warned = False

    def _segment_matches(self) -> bool:
        try:
            found = self.loadsnap_reader.dp_size
        except SegmentUnavailableError:
            return False
        if found != self.dp_size and not self._warned:
            self._warned = True
            logger.warning(
                "load snapshot segment has dp_size=%d, reader expects %d (path=%s)",
                found,
                self.dp_size,
                self.path,
            )
        return found == self.dp_size

    def read(self, dp_rank: int) -> LoadSnapshot | None:
        """``dp_rank``'s latest snapshot; None when out of range, absent or unreadable."""
        if not 0 <= dp_rank < self.dp_size or not self._segment_matches():
            return None
        try:
            return self.loadsnap_reader.read(dp_rank).snapshot
        except LoadsnapError:
            return None

    def read_all(self) -> list[LoadSnapshot]:
        """Every rank's latest snapshot, in rank order, leaving out ranks without one."""
        if not self._segment_matches():
            return []
        try:
            reads = self.loadsnap_reader.read_all()
        except LoadsnapError:
            return []
        return [read.snapshot for read in reads if read.snapshot is not None]

    def close(self) -> None:
        """Release the mapping. Idempotent."""
        self.loadsnap_reader.close()


class ZmqShmLoadSnapshotReader:
    """sglang's ZMQ-to-SHM reader on loadsnap's :class:`~loadsnap.collector.Collector`.

    Binds the PULL socket at ``endpoint`` and relays every rank into the segment at
    ``shm_path`` from its own thread, continuously; ``read``/``read_all`` read that segment.
    Frames are checked (size, schema, rank, ordering) and bad ones dropped and counted
    (``collector.stats``).
    """

    def __init__(self, endpoint: str, shm_path: str, dp_size: int) -> None:
        self._endpoint = endpoint
        self._shm_path = shm_path
        self.dp_size = dp_size
        directory, instance = instance_for_path(shm_path)
        self.collector = Collector(
            instance,
            dp_size,
            endpoint,
            shm_dir=directory,
            payload_capacity=COMPAT_PAYLOAD_CAPACITY,
            max_message_bytes=COMPAT_PAYLOAD_CAPACITY * 2,
            channel=_channel_for(endpoint),
        )
        self._reader = ShmLoadSnapshotReader(shm_path, dp_size)
        self._wakeup_r, self._wakeup_w = os.pipe()

    def fileno(self) -> int:
        """A descriptor for an owner's event loop. Never readable: the collector's thread
        relays continuously, so nothing ever waits on :meth:`poll`."""
        return self._wakeup_r

    def poll(self) -> None:
        """Nothing to do: the collector's thread keeps the segment fresh."""

    def read(self, dp_rank: int) -> LoadSnapshot | None:
        """As :meth:`ShmLoadSnapshotReader.read`."""
        return self._reader.read(dp_rank)

    def read_all(self) -> list[LoadSnapshot]:
        """As :meth:`ShmLoadSnapshotReader.read_all`."""
        return self._reader.read_all()

    def close(self) -> None:
        """Stop the collector, release the segment, remove an ``ipc://`` socket file."""
        self._reader.close()
        self.collector.close()
        for fd in (self._wakeup_r, self._wakeup_w):  # the write end keeps the read end quiet
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self._endpoint[len("ipc://") :])


def _zmq_addr_for(port_args: Any) -> str:
    """The ZMQ endpoint of a deployment: ``port_args.load_collector_ipc_name`` when set
    (multi-node, TCP), else an ``ipc://`` path derived from ``port_args.instance_id``."""
    ipc_name = getattr(port_args, "load_collector_ipc_name", "")
    if ipc_name:
        return str(ipc_name)
    instance_id = str(port_args.instance_id)
    return f"ipc:///tmp/sglang_load_collector_{_safe(instance_id)}_{_digest(instance_id)}.sock"


def create_load_snapshot_writer(
    server_args: Any,
    port_args: Any,
    dp_size: int,
    dp_rank: int,
    publish_interval: int = 1,
) -> ShmLoadSnapshotWriter | ZmqLoadSnapshotWriter:
    """The writer for a scheduler: ZMQ when :func:`should_use_zmq`, else shared memory."""
    if should_use_zmq(server_args):
        return ZmqLoadSnapshotWriter(_zmq_addr_for(port_args), dp_size, dp_rank, publish_interval)
    return ShmLoadSnapshotWriter(
        shm_path_for(port_args.instance_id), dp_size, dp_rank, publish_interval
    )


def create_load_snapshot_reader(
    server_args: Any, port_args: Any, caller: str
) -> ShmLoadSnapshotReader | ZmqShmLoadSnapshotReader:
    """The reader for ``caller``: the ZMQ owner binds and relays, the others read SHM."""
    dp_size = int(server_args.dp_size)
    path = shm_path_for(port_args.instance_id)
    if zmq_reader_owner(server_args, caller):
        return ZmqShmLoadSnapshotReader(_zmq_addr_for(port_args), path, dp_size)
    return ShmLoadSnapshotReader(path, dp_size)
