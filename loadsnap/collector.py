"""``Collector``: receive remote ranks' snapshots over ZMQ and relay them into the local segment.

Theory of operation: one PULL socket binds the collector's endpoint; remote
:class:`~loadsnap.zmq_writer.ZmqWriter` s connect to it. A dedicated thread owns every socket
(PULL, its monitor, nothing else touches them) and drains continuously, not only when someone
reads. Each frame is checked in this order, and a rejected frame is dropped and counted, never
raised: size (``oversized``), decode (``undecodable`` / ``invalid``), rank (``rank_out_of_range``),
freshness (``stale_epoch`` / ``out_of_order``). An accepted snapshot is written into the
instance's shared-memory segment through :meth:`ShmWriter.publish_relayed` (one
:class:`~loadsnap.ShmWriter` per remote rank, opened on the rank's first snapshot) with this
host's receive time, so readers keep one read path and ages stay right when clocks disagree.

Freshness per rank: a higher epoch (a restarted writer) replaces the current one; within an
epoch only a higher ``seq`` is accepted. A lower epoch is ``stale_epoch`` while the current
epoch is still heard from, and takes over once it has been quiet for ``epoch_takeover_s``
(epochs come from wall clocks, and a rank restarted on a host whose clock is behind must not be
locked out forever).

Frames above ``max_message_bytes`` never reach us: libzmq (``MAXMSGSIZE``) disconnects that
peer; the socket monitor counts the disconnect. Frames above the segment's payload capacity but
below that are received and counted as ``oversized``. With CURVE on, a ZAP handler
(``zmq.auth.thread.ThreadAuthenticator``) admits only listed client public keys; denied keys
(``auth_rejected``) and peers speaking another mechanism, e.g. plain text (``handshake_failed``),
are counted from the monitor.

Exactly one collector runs per instance: the constructor takes a non-blocking file lock next
to the segment (``loadsnap-<instance>.collector.lock``) and holds it until :meth:`close`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import filelock
import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from loadsnap._segment import segment_path, validate_instance
from loadsnap.curve import CurveServerKeys
from loadsnap.errors import LoadsnapError, TransportError, UsageError, WireError
from loadsnap.layout import DEFAULT_PAYLOAD_CAPACITY, SegmentGeometry
from loadsnap.schema import LoadSnapshot
from loadsnap.shm_writer import ShmWriter
from loadsnap.wire import SnapshotDecoder

__all__ = [
    "DEFAULT_EPOCH_TAKEOVER_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DROP_REASONS",
    "Collector",
    "CollectorStats",
    "collector_lock_path",
    "is_loopback_endpoint",
]

DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 64 * 1024
DEFAULT_EPOCH_TAKEOVER_S: Final[float] = 2.0
DEFAULT_RCVHWM: Final[int] = 10_000
POLL_INTERVAL_MS: Final[int] = 50
DRAIN_BATCH: Final[int] = 1024
START_TIMEOUT_S: Final[float] = 10.0
OPEN_RETRY_NS: Final[int] = 1_000_000_000  # after a rank's slot could not be opened
_MONITOR_EVENTS: Final[int] = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


_HANDSHAKE_FAILED: Final[int] = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class CollectorStats(msgspec.Struct):
    """Monotonic counters of one collector, for ``/metrics`` (``msgspec.structs.asdict``)."""

    received: int = 0  # frames taken off the socket
    relayed: int = 0  # snapshots written into the segment
    oversized: int = 0  # larger than the segment's payload capacity
    undecodable: int = 0  # not msgpack at all, or a multipart message
    invalid: int = 0  # msgpack, but not a valid LoadSnapshot (wrong shape, negative count, NaN)
    rank_out_of_range: int = 0  # dp_rank >= dp_size
    stale_epoch: int = 0  # older epoch than the rank's live writer
    out_of_order: int = 0  # seq not newer within the current epoch
    relay_errors: int = 0  # the segment refused it (slot owned by a live local writer, ...)
    epoch_takeovers: int = 0  # a lower epoch replaced one that had gone quiet
    connections: int = 0  # TCP connections accepted
    disconnects: int = 0  # peers gone, including those cut off for exceeding MAXMSGSIZE
    handshakes: int = 0  # ZMTP handshakes completed (authenticated when CURVE is on)
    auth_rejected: int = 0  # CURVE client key not on the allow-list
    handshake_failed: int = 0  # wrong mechanism (e.g. a plain peer) or protocol error

    @property
    def dropped(self) -> int:
        """Every frame received but not relayed."""
        return sum(getattr(self, reason) for reason in DROP_REASONS)


DROP_REASONS: Final[tuple[str, ...]] = (
    "oversized",
    "undecodable",
    "invalid",
    "rank_out_of_range",
    "stale_epoch",
    "out_of_order",
    "relay_errors",
)


class _RankState:
    __slots__ = ("epoch", "heard_mono_ns", "seq", "writer")

    def __init__(self, writer: ShmWriter) -> None:
        self.writer = writer
        self.epoch = -1
        self.seq = -1
        self.heard_mono_ns = 0


class _AllowList:
    """ZAP credentials provider: admits listed CURVE public keys (Z85)."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


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
        Deployment instance whose segment receives the snapshots.
    dp_size:
        Number of ranks; frames naming a rank outside ``0..dp_size-1`` are dropped.
    bind:
        Endpoint to bind; ``tcp://127.0.0.1:*`` picks a free port (see :attr:`endpoint`).
    curve:
        Server keys and client allow-list; None leaves the channel open (no auth, no encryption).
    payload_capacity, shm_dir:
        As for :class:`~loadsnap.ShmWriter`.
    max_message_bytes:
        ``MAXMSGSIZE``: a peer sending a larger frame is disconnected by libzmq.
    epoch_takeover_s:
        Quiet time after which a lower epoch may replace a rank's current one.

    Raises
    ------
    UsageError
        Bad arguments.
    TransportError
        Another collector holds the instance's lock, or the endpoint cannot be bound.
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
    ) -> None:
        self.instance = validate_instance(instance)
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
        self._shm_dir = shm_dir
        self._max_message_bytes = max_message_bytes
        self._takeover_ns = int(epoch_takeover_s * 1e9)
        self._decoder = SnapshotDecoder()
        self._ranks: dict[int, _RankState] = {}
        self._latest: dict[int, LoadSnapshot] = {}
        self._retry_open_ns: dict[int, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self.lock_path = collector_lock_path(instance, shm_dir)
        self._lock = filelock.FileLock(self.lock_path, timeout=0, mode=0o600)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise TransportError(
                f"another collector runs for instance={instance} (lock={self.lock_path})"
            ) from None
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"loadsnap-collector-{instance}", daemon=True
        )
        try:
            if curve is not None:
                self._auth = ThreadAuthenticator(self._context)
                self._auth.start()
                self._auth.configure_curve_callback("*", _AllowList(curve.allowed_clients))
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
        try:
            sock = self._open_socket()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._ready.set()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_INTERVAL_MS))
                if sock in events:
                    self._drain(sock)
                if monitor in events:
                    self._drain_monitor(monitor)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.stats.received += 1
            if sock.getsockopt(zmq.RCVMORE):
                self._discard_rest(sock)
                self.stats.undecodable += 1
                continue
            self._handle(frame, time.monotonic_ns())

    def _discard_rest(self, sock: zmq.Socket[bytes]) -> None:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(zmq.NOBLOCK)  # the remaining parts of a message are already here

    def _drain_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        stats = self.stats
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                stats.connections += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                stats.disconnects += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                stats.handshakes += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                stats.auth_rejected += 1
            elif kind & _HANDSHAKE_FAILED:
                stats.handshake_failed += 1

    def _handle(self, frame: bytes, received_mono_ns: int) -> None:
        """Check one frame and relay it; every rejection is counted, none raises."""
        stats = self.stats
        if len(frame) > self.geometry.payload_capacity:
            stats.oversized += 1
            return
        try:
            snapshot = self._decoder.decode(frame)
        except WireError as exc:
            if isinstance(exc.__cause__, msgspec.ValidationError):
                stats.invalid += 1
            else:
                stats.undecodable += 1
            return
        rank = snapshot.dp_rank
        if rank >= self.dp_size:
            stats.rank_out_of_range += 1
            return
        state = self._ranks.get(rank)
        if state is None:
            if received_mono_ns < self._retry_open_ns.get(rank, 0):
                stats.relay_errors += 1
                return
            try:
                state = self._ranks[rank] = _RankState(self._open_rank(rank))
            except LoadsnapError:
                # E.g. a live local writer owns the slot: do not retry (a file lock) per frame.
                self._retry_open_ns[rank] = received_mono_ns + OPEN_RETRY_NS
                stats.relay_errors += 1
                return
        if not self._is_newer(state, snapshot, received_mono_ns):
            return
        remote_seq = snapshot.seq  # publish_relayed restamps seq with the slot's own sequence
        try:
            state.writer.publish_relayed(snapshot, received_mono_ns)
        except LoadsnapError:
            stats.relay_errors += 1
            return
        state.epoch, state.seq, state.heard_mono_ns = snapshot.epoch, remote_seq, received_mono_ns
        self._latest[rank] = snapshot
        stats.relayed += 1

    def _is_newer(self, state: _RankState, snapshot: LoadSnapshot, now_ns: int) -> bool:
        epoch, seq = snapshot.epoch, snapshot.seq
        if epoch == state.epoch:
            if seq > state.seq:
                return True
            self.stats.out_of_order += 1
            return False
        if epoch > state.epoch:
            return True
        if now_ns - state.heard_mono_ns >= self._takeover_ns:
            self.stats.epoch_takeovers += 1
            return True
        self.stats.stale_epoch += 1
        return False

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
        """Stop receiving, close the sockets, detach from the segment, release the lock.

        Idempotent. Returns within about one poll interval.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()
        for state in self._ranks.values():
            with contextlib.suppress(LoadsnapError):
                state.writer.close()
        self._ranks.clear()
        # Remove the lock file while still holding it, so no /dev/shm entry outlives us; a
        # collector starting concurrently at worst fails to bind the same endpoint.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)
        self._lock.release()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Collector(instance={self.instance!r}, endpoint={self.endpoint!r}, "
            f"dp_size={self.dp_size}, curve={self.curve}, pid={os.getpid()})"
        )
