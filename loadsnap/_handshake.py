"""ZMTP handshake failures as libzmq's socket monitor reports them, and rate-limited warnings.

Shared by the writer and the collector. What libzmq 4.3 reports (measured over tcp://127.0.0.1,
see ``tests/process/test_handshake.py``):

===============================  ===============================  ===============================
situation                        collector (PULL, CURVE server)   writer (PUSH)
===============================  ===============================  ===============================
writer has no keys               FAILED_PROTOCOL,                 FAILED_PROTOCOL, mechanism
                                 mechanism mismatch               mismatch, or FAILED_NO_DETAIL,
                                                                  errno EPIPE (a race: who
                                                                  closes first)
writer key not on the list       FAILED_AUTH, ZAP status 400      FAILED_AUTH, status 400
writer has a wrong server key    FAILED_PROTOCOL, cryptographic   FAILED_NO_DETAIL, errno EPIPE
frame above MAXMSGSIZE           DISCONNECTED only                DISCONNECTED only
===============================  ===============================  ===============================

Every failure is followed by ``DISCONNECTED`` for the same connection; the writer then
reconnects (``RECONNECT_IVL`` .. ``RECONNECT_IVL_MAX``) and fails again, so failures come in
bursts. An oversized frame cannot be told from a peer that went away: both are a plain
disconnect.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = [
    "FAILED_EVENTS",
    "HandshakeFailure",
    "HandshakeWatch",
    "WarnLimiter",
    "describe_failure",
    "host_of",
    "peer_of",
]

FAILED_EVENTS: Final[int] = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_PROTOCOL_ERRORS: Final[dict[int, str]] = {
    getattr(zmq, name): name.removeprefix("PROTOCOL_ERROR_").lower()
    for name in dir(zmq)
    if name.startswith("PROTOCOL_ERROR_")
}


class HandshakeFailure:
    """One failed handshake: ``kind`` (a counter's name) and a sentence for the log."""

    __slots__ = ("detail", "kind")

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail

    def __repr__(self) -> str:
        return f"HandshakeFailure({self.kind!r}, {self.detail!r})"


def describe_failure(event: int, value: int, *, server: bool, curve: bool) -> HandshakeFailure:
    """Name a ``HANDSHAKE_FAILED_*`` monitor event for the side that saw it.

    ``server`` is the collector's side, ``curve`` whether this side uses CURVE. ``kind`` is
    ``auth_rejected`` (a key not on the allow-list) or ``handshake_failed`` (anything else).
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if server:
            return HandshakeFailure(
                "auth_rejected", f"client key not on the allow-list (ZAP status {value})"
            )
        return HandshakeFailure(
            "auth_rejected",
            f"the collector rejected this writer's key (ZAP status {value}): the key is not on "
            "its allow-list (clients/*.key)",
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        name = _PROTOCOL_ERRORS.get(value, f"protocol error {value:#x}")
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if server:
                why = "the peer has no CURVE keys" if curve else "the peer uses CURVE, we do not"
            else:
                why = (
                    "the collector does not use CURVE"
                    if curve
                    else "the collector requires CURVE and this writer has no keys"
                )
            return HandshakeFailure("handshake_failed", f"mechanism mismatch: {why}")
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return HandshakeFailure(
                "handshake_failed",
                "cryptographic error: the peer was given another server public key",
            )
        return HandshakeFailure("handshake_failed", name)
    code = errno.errorcode.get(value, str(value))
    if curve and not server:
        return HandshakeFailure(
            "handshake_failed",
            f"the collector closed the connection during the CURVE handshake (errno={code}); "
            "usually a wrong server public key (LOADSNAP_CURVE_SERVER_KEY)",
        )
    if not server:
        return HandshakeFailure(
            "handshake_failed",
            f"the collector closed the connection during the handshake (errno={code}); if it "
            "uses CURVE, this writer needs keys (LOADSNAP_CURVE_SERVER_KEY and "
            "LOADSNAP_CURVE_CLIENT_KEY)",
        )
    return HandshakeFailure(
        "handshake_failed", f"connection closed during the handshake (errno={code})"
    )


class WarnLimiter:
    """At most one warning per key per ``interval_s``; counts what it held back. Thread-safe.

    Parameters
    ----------
    interval_s:
        Quiet time per key after a warning.
    clock:
        Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def allow(self, key: object) -> int | None:
        """None to stay quiet; else how many warnings for ``key`` were held back since the last."""
        now = self._clock()
        with self._lock:
            if now < self._next.get(key, float("-inf")):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._next) > 4096:  # many peers: forget those long quiet
                self._next = {k: t for k, t in self._next.items() if t > now}
                self._held = {k: n for k, n in self._held.items() if k in self._next}
            self._next[key] = now + self.interval_s
            return self._held.pop(key, 0)


WATCH_POLL_MS: Final[int] = 1000  # only a backstop: disabling the monitor wakes the thread
STILL_FAILING_EVERY_S: Final[float] = 60.0
_WATCH_EVENTS: Final[int] = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED | FAILED_EVENTS | zmq.EVENT_MONITOR_STOPPED
)


class HandshakeWatch:
    """Logs a connecting socket's failed handshakes, once per burst. Owns one daemon thread.

    Concurrency: the thread owns the monitor socket; :meth:`stop` must be called from the
    thread that owns the watched socket, before that socket is closed. Nothing here runs on
    the publish path: the thread sleeps in ``poll`` until libzmq reports an event.

    A burst is the run of failures between two successful handshakes (libzmq reconnects and
    fails again every ``RECONNECT_IVL`` .. ``RECONNECT_IVL_MAX``): its first failure is logged
    as a warning, then a reminder at most every ``STILL_FAILING_EVERY_S``, and the success that
    ends it at info level.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        logger: logging.Logger,
        *,
        curve: bool,
        on_failure: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        self._log = logger
        self._curve = curve
        self._on_failure = on_failure
        self._clock = clock
        self._burst = 0
        self._reminded = 0.0
        self._stopping = False
        self._monitor = sock.get_monitor_socket(_WATCH_EVENTS)
        self._thread = threading.Thread(target=self._run, name="loadsnap-zmq-watch", daemon=True)
        self._thread.start()  # hands the monitor socket to the thread (a full memory barrier)

    def _run(self) -> None:
        monitor = self._monitor
        try:
            while not self._stopping:
                if not monitor.poll(WATCH_POLL_MS):
                    continue
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
                kind = event["event"]
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                self.on_event(kind, event["value"], event["endpoint"].decode("utf-8", "replace"))
        except zmq.ZMQError:  # the context was terminated under us
            return
        finally:
            monitor.close(linger=0)

    def on_event(self, kind: int, value: int, endpoint: str) -> None:
        """Count and log one monitor event (the thread's step; tests call it directly)."""
        what = "CURVE handshake" if self._curve else "handshake"
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self._burst:
                self._log.info("%s with %s succeeded after %d failed", what, endpoint, self._burst)
            self._burst = 0
            return
        if not kind & FAILED_EVENTS:
            return
        self._on_failure()
        self._burst += 1
        failure = describe_failure(kind, value, server=False, curve=self._curve)
        now = self._clock()
        if self._burst == 1:
            self._reminded = now
            self._log.warning("%s with %s failed: %s", what, endpoint, failure.detail)
        elif now - self._reminded >= STILL_FAILING_EVERY_S:
            self._reminded = now
            self._log.warning(
                "%s with %s still failing (%d attempts): %s",
                what,
                endpoint,
                self._burst,
                failure.detail,
            )

    def stop(self) -> None:
        """Stop the thread and close the monitor socket; returns once they are gone."""
        self._stopping = True
        # libzmq sends EVENT_MONITOR_STOPPED, which wakes the thread at once.
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._thread.join()


def peer_of(fd: int) -> str | None:
    """``host:port`` of the TCP peer on libzmq's ``fd``; None once the connection is gone."""
    try:
        dup = os.dup(fd)  # our own descriptor: closing it leaves libzmq's connection alone
    except OSError:  # closed already (EBADF)
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # the number now names something that is not a socket
        os.close(dup)
        return None
    try:
        with sock:
            address = sock.getpeername()
    except OSError:  # not connected any more
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        host = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])
        return f"{host}:{address[1]}"
    return str(address) or None


def host_of(peer: str) -> str:
    """The host part of ``host:port``."""
    return peer.rsplit(":", 1)[0] if ":" in peer else peer
