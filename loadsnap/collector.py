"""``Collector``: receive remote ranks' snapshots over ZMQ and relay them into the local segment.

Theory of operation: one PULL socket binds the collector's endpoint; remote
:class:`~loadsnap.zmq_writer.ZmqWriter` s connect to it. A dedicated thread owns every socket
(PULL, its monitor and, with CURVE, the ZAP handler; nothing else touches them) and drains
continuously, not only when someone reads. Each frame (a :mod:`loadsnap.frame` envelope: the
instance and the snapshot) is checked in this order, and a rejected frame is dropped and counted,
never raised: size (``oversized``), envelope (``undecodable`` / ``invalid``), instance
(``wrong_instance``: none, or another deployment's), snapshot (``undecodable`` / ``invalid``),
rank (``rank_out_of_range``, then ``rank_not_allowed``: the sender's CURVE key is not bound to
that rank), freshness (``stale_epoch`` / ``out_of_order``). An accepted snapshot is written into
the instance's shared-memory segment through :meth:`ShmWriter.publish_relayed` (one
:class:`~loadsnap.ShmWriter` per remote rank, opened on the rank's first snapshot) with this
host's receive time, so readers keep one read path and ages stay right when clocks disagree.

Freshness per rank follows :mod:`loadsnap._relay_order` (epochs, then sequences, with a
takeover after ``epoch_takeover_s`` of quiet).

Frames above ``max_message_bytes`` never reach us: libzmq (``MAXMSGSIZE``) disconnects that
peer, and reports it as a plain disconnect (``disconnects``), which cannot be told from a peer
that went away; writers refuse such frames before sending (``PayloadTooLargeError``). Frames
whose snapshot is above the segment's payload capacity but below that are received and counted
as ``oversized``.

With CURVE on, the thread answers ZAP (:mod:`loadsnap._zap`): listed client keys get in, with
their key as ``User-Id`` on every frame, which the rank check looks up in the key list. Denied
keys (``auth_rejected``) and peers speaking another mechanism, e.g. plain text, or holding the
wrong server key (``handshake_failed``) are counted from the monitor and logged as warnings on
``loadsnap.collector`` naming the peer, at most one per peer and kind per ``warn_interval_s``.
Frames dropped for their instance or for a rank their key may not publish are logged the same
way.

The counters are copied into a stats file after each poll (:mod:`loadsnap.collector_stats`),
so ``/metrics`` of another process (``loadsnap serve``) shows them.

Exactly one collector runs per instance: the constructor takes a non-blocking file lock next
to the segment (``loadsnap-<instance>.collector.lock``) and holds it until :meth:`close`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import zmq

from loadsnap._location import segment_path
from loadsnap._lockfile import LockFile
from loadsnap._peers import MONITOR_EVENTS, PeerWatch
from loadsnap._relay_order import Order, RankOrder
from loadsnap._zap import bind_zap_handler
from loadsnap.collector_stats import (
    DROP_REASONS,
    CollectorStats,
    CollectorStatsFile,
    collector_stats_path,
)
from loadsnap.curve import CurveServerKeys
from loadsnap.errors import (
    LoadsnapError,
    LockHeldError,
    TransportError,
    UsageError,
    WireError,
    WireValidationError,
)
from loadsnap.frame import DEFAULT_MAX_MESSAGE_BYTES, FrameDecoder, frame_overhead_bytes
from loadsnap.layout import DEFAULT_PAYLOAD_CAPACITY, SegmentGeometry
from loadsnap.schema import LoadSnapshot
from loadsnap.settings import validate_instance
from loadsnap.shm_writer import ShmWriter

__all__ = [
    "DEFAULT_EPOCH_TAKEOVER_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_WARN_INTERVAL_S",
    "DROP_REASONS",
    "Collector",
    "CollectorStats",
    "collector_lock_path",
    "is_loopback_endpoint",
]

log = logging.getLogger("loadsnap.collector")

DEFAULT_WARN_INTERVAL_S: Final[float] = 10.0
DEFAULT_EPOCH_TAKEOVER_S: Final[float] = 2.0
DEFAULT_RCVHWM: Final[int] = 10_000
POLL_INTERVAL_MS: Final[int] = 50
DRAIN_BATCH: Final[int] = 1024
START_TIMEOUT_S: Final[float] = 10.0
OPEN_RETRY_NS: Final[int] = 1_000_000_000  # after a rank's slot could not be opened


def collector_lock_path(instance: str, shm_dir: str | None = None) -> str:
    """The file whose lock makes a collector the only one of ``instance``."""
    path = Path(segment_path(instance, shm_dir))
    directory = path.parent if path.parent.is_dir() else Path(tempfile.gettempdir())
    return str(directory / f"{path.name}.collector.lock")


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether a bind endpoint is reachable from this host only (loopback TCP, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


class Collector:
    """Relays remote ranks into the local segment. Safe from any thread; never blocks a writer.

    The receiving thread starts in the constructor and runs until :meth:`close`. ``stats`` and
    :meth:`latest` may be read from any thread.

    Parameters
    ----------
    instance:
        Deployment instance whose segment receives the snapshots; frames naming another
        instance (or none) are dropped.
    dp_size:
        Number of ranks; frames naming a rank outside ``0..dp_size-1`` are dropped.
    bind:
        Endpoint to bind; ``tcp://127.0.0.1:*`` picks a free port (see :attr:`endpoint`).
    curve:
        Server keys and the client key list with each key's ranks; None leaves the channel open
        (no auth, no encryption, and any peer may publish any rank).
    payload_capacity, shm_dir:
        As for :class:`~loadsnap.ShmWriter`.
    max_message_bytes:
        ``MAXMSGSIZE``: a peer sending a larger frame is disconnected by libzmq.
    epoch_takeover_s:
        Quiet time after which a lower epoch may replace a rank's current one.
    warn_interval_s:
        At most one warning per peer and kind of failure (or drop) per this many seconds.
    channel:
        The instance name frames must carry, when it is not ``instance`` (the sglang compat
        module names the channel after its endpoint and the segment after its path).

    Raises
    ------
    UsageError
        Bad arguments.
    TransportError
        Another collector holds the instance's lock, the endpoint cannot be bound, or the stats
        file cannot be created.
    """

    def __init__(
        self,
        instance: str,
        dp_size: int,
        bind: str = "tcp://127.0.0.1:5557",
        *,
        curve: CurveServerKeys | None = None,
        payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY,
        shm_dir: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        epoch_takeover_s: float = DEFAULT_EPOCH_TAKEOVER_S,
        warn_interval_s: float = DEFAULT_WARN_INTERVAL_S,
        channel: str | None = None,
    ) -> None:
        self.instance = validate_instance(instance)
        self.channel = self.instance if channel is None else validate_instance(channel)
        self.geometry = SegmentGeometry(dp_size, payload_capacity)
        if max_message_bytes < payload_capacity:
            raise UsageError(
                f"max_message_bytes below payload capacity: max_message_bytes={max_message_bytes} "
                f"payload_capacity={payload_capacity}"
            )
        self.dp_size = dp_size
        self.bind = bind
        self.endpoint = bind
        self.curve = curve is not None
        self.stats = CollectorStats()
        self._curve_keys = curve
        self._peers = PeerWatch(self.channel, self.stats, curve, warn_interval_s)
        self._shm_dir = shm_dir
        self._max_message_bytes = max_message_bytes
        self._frame_capacity = payload_capacity + frame_overhead_bytes(self.channel)
        self._takeover_ns = int(epoch_takeover_s * 1e9)
        self._decoder = FrameDecoder()
        self._ranks: dict[int, tuple[ShmWriter, RankOrder]] = {}
        self._latest: dict[int, LoadSnapshot] = {}
        self._retry_open_ns: dict[int, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self.lock_path = collector_lock_path(instance, shm_dir)
        self._lock = LockFile(self.lock_path, "collector lock")
        try:
            self._lock.acquire(0)
        except LockHeldError:
            raise TransportError(
                f"another collector runs for instance={instance} (lock={self.lock_path})"
            ) from None
        self.stats_path = collector_stats_path(instance, shm_dir)
        self._stats_file: CollectorStatsFile | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._thread = threading.Thread(
            target=self._run, name=f"loadsnap-collector-{instance}", daemon=True
        )
        try:
            self._stats_file = CollectorStatsFile(self.stats_path, os.getpid(), time.time_ns())
            self._thread.start()
            if not self._ready.wait(START_TIMEOUT_S):
                raise TransportError(f"collector did not start (endpoint={bind})")
            if self._start_error is not None:
                raise self._start_error
        except BaseException:
            self.close()
            raise

    # --- receiving thread ---------------------------------------------------------------------

    def _open_socket(self) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.PULL)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
            sock.setsockopt(zmq.RCVHWM, DEFAULT_RCVHWM)
            keys = self._curve_keys
            if keys is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            sock.bind(self.bind)
            self.endpoint = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot bind: {exc} (endpoint={self.bind})") from exc
        return sock

    def _run(self) -> None:
        zap: zmq.Socket[bytes] | None = None
        try:
            if self._peers.clients is not None:
                zap = bind_zap_handler(self._context)
            sock = self._open_socket()
        except BaseException as exc:
            if zap is not None:
                zap.close(linger=0)
            self._start_error = exc
            self._ready.set()
            return
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        stats_file = self._stats_file
        self._ready.set()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_INTERVAL_MS))
                # The monitor first: an accepted connection's address can only be read while
                # its descriptor is open.
                if monitor in events:
                    self._peers.drain_monitor(monitor)
                if zap is not None and zap in events:
                    self._peers.answer_zap(zap)
                if sock in events:
                    self._drain(sock)
                if stats_file is not None:
                    stats_file.store(self.stats)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            if zap is not None:
                zap.close(linger=0)  # after the PULL socket: no handshake left to decide

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.stats.received += 1
            if frame.more:
                self._discard_rest(sock)
                self.stats.undecodable += 1
                continue
            self._handle(frame.bytes, time.monotonic_ns(), frame)

    def _discard_rest(self, sock: zmq.Socket[bytes]) -> None:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(zmq.NOBLOCK)  # the remaining parts of a message are already here

    def _handle(self, frame: bytes, received_mono_ns: int, meta: zmq.Frame | None = None) -> None:
        """Check one frame and relay it; every rejection is counted, none raises.

        ``meta`` is the received :class:`zmq.Frame` (its ``User-Id`` and ``Peer-Address``
        properties); without it, CURVE on, no rank is allowed.
        """
        stats = self.stats
        if len(frame) > self._frame_capacity:
            stats.oversized += 1
            return
        try:
            head = self._decoder.decode_head(frame)
        except WireError as exc:
            self._count_wire_error(exc)
            return
        if head.instance != self.channel:
            stats.wrong_instance += 1
            self._peers.warn_dropped("wrong_instance", head.instance, meta)
            return
        try:
            snapshot = self._decoder.decode_snapshot(head)
        except WireError as exc:
            self._count_wire_error(exc)
            return
        rank = snapshot.dp_rank
        if rank >= self.dp_size:
            stats.rank_out_of_range += 1
            return
        if not self._peers.may_publish(rank, meta):
            stats.rank_not_allowed += 1
            self._peers.warn_dropped("rank_not_allowed", rank, meta)
            return
        known = self._ranks.get(rank)
        if known is None:
            if received_mono_ns < self._retry_open_ns.get(rank, 0):
                stats.relay_errors += 1
                return
            try:
                known = self._ranks[rank] = (self._open_rank(rank), RankOrder(self._takeover_ns))
            except LoadsnapError:
                # E.g. a live local writer owns the slot: do not retry (a file lock) per frame.
                self._retry_open_ns[rank] = received_mono_ns + OPEN_RETRY_NS
                stats.relay_errors += 1
                return
        writer, order = known
        remote_epoch, remote_seq = snapshot.epoch, snapshot.seq
        verdict = order.judge(remote_epoch, remote_seq, received_mono_ns)
        if not verdict.relay:
            setattr(stats, verdict.value, getattr(stats, verdict.value) + 1)
            return
        if verdict is Order.TAKEOVER:
            stats.epoch_takeovers += 1
        try:
            writer.publish_relayed(snapshot, received_mono_ns)  # restamps seq with the slot's
        except LoadsnapError:
            stats.relay_errors += 1
            return
        order.relayed(remote_epoch, remote_seq, received_mono_ns)
        self._latest[rank] = snapshot
        stats.relayed += 1

    def _count_wire_error(self, exc: WireError) -> None:
        if isinstance(exc, WireValidationError):
            self.stats.invalid += 1
        else:
            self.stats.undecodable += 1

    def _open_rank(self, rank: int) -> ShmWriter:
        return ShmWriter(
            self.instance,
            self.dp_size,
            rank,
            payload_capacity=self.geometry.payload_capacity,
            shm_dir=self._shm_dir,
        )

    # --- public API -------------------------------------------------------------------------

    def latest(self) -> dict[int, LoadSnapshot]:
        """The latest relayed snapshot of every remote rank seen so far (a copy)."""
        return dict(self._latest)

    def dropped_by_reason(self) -> dict[tuple[str], float]:
        """Drop counters keyed by ``(reason,)``, the shape ``LoadsnapCollector.add_provider``
        reads for ``collector_frames_dropped_total{reason=...}``."""
        stats = self.stats
        return {(reason,): float(getattr(stats, reason)) for reason in DROP_REASONS}

    def stats_dict(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict (``dropped`` included)."""
        out = msgspec.structs.asdict(self.stats)
        out["dropped"] = self.stats.dropped
        return out

    @property
    def running(self) -> bool:
        """Whether the receiving thread is alive."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop receiving, close the sockets, detach from the segment, remove the stats file,
        release the lock.

        Idempotent. Returns within about one poll interval.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._context.term()
        if self._stats_file is not None:
            self._stats_file.close()
        for writer, _ in self._ranks.values():
            with contextlib.suppress(LoadsnapError):
                writer.close()
        self._ranks.clear()
        # Removed while held (LockFile re-checks the inode), so no /dev/shm entry outlives us.
        self._lock.release(remove=True)

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Collector(instance={self.instance!r}, endpoint={self.endpoint!r}, "
            f"dp_size={self.dp_size}, curve={self.curve}, pid={os.getpid()})"
        )
