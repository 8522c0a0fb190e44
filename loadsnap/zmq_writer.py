"""``ZmqWriter``: publish one rank's snapshots to a remote collector over ZMQ PUSH.

Theory of operation: the writer connects a PUSH socket to the collector's PULL and sends each
snapshot as one frame (:mod:`loadsnap.frame`: the instance and the snapshot, msgpack) with
``NOBLOCK``, so ``publish`` never waits:

* ``IMMEDIATE`` keeps messages off connections that are not up yet: while the collector is
  away ``send`` fails at once with ``EAGAIN``; the snapshot is dropped and counted
  (``stats.dropped``), and the next one tries again.
* ``CONFLATE`` (default) makes the outgoing queue hold only the newest snapshot: when the
  collector is slow, an unsent older snapshot is replaced by the newer one (latest wins; such
  replacements are not counted). With ``conflate=False`` a small ``SNDHWM`` bounds the queue
  instead and the *newest* snapshot is the one dropped when it is full.
* libzmq reconnects in the background (``RECONNECT_IVL`` .. ``RECONNECT_IVL_MAX``);
  ``LINGER`` 0 makes close and context teardown immediate.
* A frame above ``max_message_bytes`` (the collector's ``MAXMSGSIZE``, which would cut the
  connection) is refused before sending: ``PayloadTooLargeError``, counted in
  ``stats.oversized``.
* A handshake the collector refuses (wrong or missing CURVE keys) would otherwise fail
  silently: ``send`` just keeps dropping. A small thread watches the socket's monitor and logs
  each failure burst on ``loadsnap.zmq_writer`` (:class:`~loadsnap._handshake.HandshakeWatch`),
  counting failures in ``stats.handshake_failures``; it sleeps in ``poll`` and never touches
  the publish path.

Identity: ``epoch`` is derived from the wall clock (ms) and the pid at construction, so a
restarted writer has a new, larger epoch; ``seq`` counts publishes from 1 within an epoch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Final

import msgspec
import zmq

from loadsnap._handshake import HandshakeWatch
from loadsnap.curve import CurveClientKeys
from loadsnap.errors import PayloadTooLargeError, TransportError, UsageError
from loadsnap.frame import DEFAULT_MAX_MESSAGE_BYTES, FrameEncoder
from loadsnap.schema import LoadSnapshot, validate_snapshot
from loadsnap.settings import validate_instance
from loadsnap.wire import check_publishable

__all__ = [
    "DEFAULT_SNDHWM",
    "RECONNECT_IVL_MAX_MS",
    "RECONNECT_IVL_MS",
    "ZmqWriter",
    "ZmqWriterStats",
    "make_epoch",
]

DEFAULT_SNDHWM: Final[int] = 4
RECONNECT_IVL_MS: Final[int] = 100
RECONNECT_IVL_MAX_MS: Final[int] = 2_000
_EPOCH_PID_BITS: Final[int] = 16

log = logging.getLogger("loadsnap.zmq_writer")


def make_epoch(pid: int | None = None, wall_ns: int | None = None) -> int:
    """A writer epoch: wall-clock milliseconds shifted left 16 bits, plus the pid's low 16 bits.

    Increases across restarts on one host (fits 63 bits for millennia). Across hosts clocks may
    disagree; the collector lets a lower epoch take over once the current one has gone quiet.
    """
    ms = (time.time_ns() if wall_ns is None else wall_ns) // 1_000_000
    low = (os.getpid() if pid is None else pid) & ((1 << _EPOCH_PID_BITS) - 1)
    return (ms << _EPOCH_PID_BITS) | low


class ZmqWriterStats(msgspec.Struct):
    """Counters of one :class:`ZmqWriter` (monotonic)."""

    sent: int = 0
    dropped: int = 0  # collector away or its queue full: send would have blocked
    oversized: int = 0  # refused: the frame is above max_message_bytes
    handshake_failures: int = 0  # handshakes the collector refused or that broke off


class ZmqWriter:
    """Publishes one DP rank's snapshots to a collector. Single writer; never blocks.

    Not thread-safe: one writer per rank, used from one thread. Its handshake watch runs in a
    thread of its own that never touches the socket (it reads the socket's monitor).

    Parameters
    ----------
    endpoint:
        The collector's address, e.g. ``tcp://node0:5557``.
    dp_size, dp_rank:
        Number of ranks and this writer's rank.
    instance:
        The deployment instance, carried in every frame: a collector of another instance drops
        them (``wrong_instance``).
    curve:
        Client keys to authenticate and encrypt with CURVE; None sends in the clear. When the
        key's certificate binds ranks that exclude ``dp_rank``, a warning is logged (the
        collector's key list decides).
    max_message_bytes:
        Largest frame to send: set it to the collector's (default both 64 KiB).
    conflate:
        Keep only the newest unsent snapshot (default). Off: queue up to ``sndhwm``.
    sndhwm:
        Send high-water mark when ``conflate`` is off.
    validate:
        Check every schema constraint at publish; the collector validates everything anyway.
    context:
        A ZMQ context to share; by default the writer owns one (and terminates it on close).

    Raises
    ------
    UsageError
        Bad arguments (rank out of range, invalid instance name, malformed endpoint).
    """

    def __init__(
        self,
        endpoint: str,
        dp_size: int,
        dp_rank: int,
        *,
        instance: str,
        curve: CurveClientKeys | None = None,
        conflate: bool = True,
        sndhwm: int = DEFAULT_SNDHWM,
        validate: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={dp_rank} dp_size={dp_size}")
        if sndhwm < 1:
            raise UsageError(f"sndhwm must be >= 1: sndhwm={sndhwm}")
        if max_message_bytes < 1:
            raise UsageError(
                f"max_message_bytes must be >= 1: max_message_bytes={max_message_bytes}"
            )
        self.instance = validate_instance(instance)
        self.endpoint = endpoint
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.epoch = make_epoch()
        self.stats = ZmqWriterStats()
        self.curve = curve is not None
        self.max_message_bytes = max_message_bytes
        self._validate = validate
        self._seq = 0
        self._closed = False
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._encode = FrameEncoder(self.instance).encode
        if curve is not None and curve.ranks is not None and dp_rank not in curve.ranks:
            log.warning(
                "this CURVE key's certificate binds ranks=%s, not dp_rank=%d: a collector with the "
                "same key list drops every frame (rank_not_allowed)",
                curve.ranks,
                dp_rank,
            )
        self._socket = self._open_socket(curve, conflate, sndhwm)
        try:
            self._watch = HandshakeWatch(
                self._socket, log, curve=self.curve, on_failure=self._count_handshake_failure
            )
        except BaseException:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise

    def _count_handshake_failure(self) -> None:
        self.stats.handshake_failures += 1  # only the watch thread writes this counter

    def _open_socket(
        self, curve: CurveClientKeys | None, conflate: bool, sndhwm: int
    ) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.LINGER, 0)  # close never waits for unsent snapshots
            sock.setsockopt(zmq.SNDHWM, sndhwm)
            if conflate:  # one-message queue, newest wins; single-frame messages only
                sock.setsockopt(zmq.CONFLATE, 1)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: drop otherwise
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            if curve is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            if self._own_context:
                self._context.term()
            raise UsageError(f"cannot connect: {exc} (endpoint={self.endpoint})") from exc
        return sock

    def publish(self, snapshot: LoadSnapshot) -> int:
        """Stamp ``seq``, ``epoch`` and publish times into ``snapshot`` and send it.

        Returns the sequence number, also when the snapshot was dropped because the collector
        is away (see ``stats.dropped``).

        Raises
        ------
        PayloadTooLargeError
            The frame is above ``max_message_bytes``; nothing is sent (``stats.oversized``).
        UsageError
            Wrong ``dp_rank``, a value that breaks the schema (the message names the field), or
            the writer is closed.
        TransportError
            A socket error other than "would block" (the socket was closed under us).
        """
        if self._closed:
            raise UsageError(f"writer is closed (endpoint={self.endpoint} dp_rank={self.dp_rank})")
        if snapshot.dp_rank != self.dp_rank:
            raise UsageError(f"dp_rank mismatch: writer={self.dp_rank} snapshot={snapshot.dp_rank}")
        check_publishable(snapshot)  # what the collector would refuse, refused here
        if self._validate:
            validate_snapshot(snapshot, self.dp_size)
        snapshot.seq = seq = self._seq + 1
        snapshot.epoch = self.epoch
        snapshot.publish_mono_ns = time.monotonic_ns()
        snapshot.publish_wall_ns = time.time_ns()
        frame = self._encode(snapshot)
        if len(frame) > self.max_message_bytes:
            self.stats.oversized += 1
            raise PayloadTooLargeError(
                f"frame too large: size={len(frame)} max_message_bytes={self.max_message_bytes} "
                f"(endpoint={self.endpoint} dp_rank={self.dp_rank})"
            )
        self._seq = seq
        try:
            self._socket.send(frame, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.stats.dropped += 1
            return seq
        except zmq.ZMQError as exc:
            raise TransportError(f"send failed: {exc} (endpoint={self.endpoint})") from exc
        self.stats.sent += 1
        return seq

    def close(self) -> None:
        """Stop the handshake watch, close the socket (and the owned context) without waiting.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._watch.stop()
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> ZmqWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ZmqWriter(endpoint={self.endpoint!r}, instance={self.instance!r}, "
            f"dp_rank={self.dp_rank}, epoch={self.epoch}, curve={self.curve})"
        )
