"""The collector's view of its peers: who connected, who failed, which key may send what.

Transport layer, used only from the collector's thread (not thread-safe). It answers ZAP
requests (:mod:`loadsnap._zap`), reads the PULL socket's monitor events (connections,
disconnects, handshake failures) into the collector's counters, tells which ranks a frame's
CURVE key may publish, and logs every rejection as a rate-limited warning naming the peer
(at most one per peer and kind per ``warn_interval_s``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from loadsnap._handshake import FAILED_EVENTS, WarnLimiter, describe_failure, host_of, peer_of
from loadsnap._zap import decide
from loadsnap.collector_stats import CollectorStats
from loadsnap.curve import ClientKey, CurveServerKeys

__all__ = ["MONITOR_EVENTS", "PeerWatch"]

log = logging.getLogger("loadsnap.collector")

MONITOR_EVENTS: Final[int] = (
    zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | FAILED_EVENTS
)
_UNKNOWN_PEER: Final[str] = "an unknown peer (gone before its address could be read)"


class PeerWatch:
    """Peers of one collector. Used from the collector's thread only; not thread-safe.

    Parameters
    ----------
    instance:
        The instance the collector serves (named in warnings).
    stats:
        The collector's counters, updated in place.
    curve:
        Server keys and the client key list; None for an open channel.
    warn_interval_s:
        The least time between two warnings of the same peer and kind.
    """

    def __init__(
        self,
        instance: str,
        stats: CollectorStats,
        curve: CurveServerKeys | None,
        warn_interval_s: float,
    ) -> None:
        self.instance = instance
        self.stats = stats
        self.curve = curve is not None
        # Z85 public key (the frames' User-Id) -> its allow-list entry.
        self.clients: dict[str, ClientKey] | None = (
            None if curve is None else {c.public.decode("ascii"): c for c in curve.clients}
        )
        self._warnings = WarnLimiter(warn_interval_s)
        self._peers: dict[int, str] = {}  # libzmq's fd -> "host:port", from EVENT_ACCEPTED
        self._failure: tuple[str, str] | None = None  # (kind, detail) until its DISCONNECTED

    def answer_zap(self, zap: zmq.Socket[bytes]) -> None:
        """Answer every pending ZAP request (admit listed client keys, log the others)."""
        clients = self.clients
        assert clients is not None
        while True:
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            decision = decide(request, clients)
            zap.send_multipart(decision.reply)  # REP: one reply per request, in order
            if decision.client is None:
                self.warn(
                    ("auth_rejected", decision.address),
                    "CURVE handshake from %s failed: %s (key=%s)",
                    decision.address or "?",
                    decision.reason,
                    decision.key or "-",
                )

    def drain_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        """Count every pending monitor event; log failed handshakes once their peer is known."""
        stats = self.stats
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                stats.connections += 1
                peer = peer_of(value)
                if peer is not None:
                    self._peers[value] = peer
            elif kind == zmq.EVENT_DISCONNECTED:
                stats.disconnects += 1
                self._report_failure(self._peers.pop(value, None))
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                stats.handshakes += 1
            elif kind & FAILED_EVENTS:
                failure = describe_failure(kind, value, server=True, curve=self.curve)
                setattr(stats, failure.kind, getattr(stats, failure.kind) + 1)
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # the ZAP handler named those
                    # libzmq emits the connection's DISCONNECTED right after this event.
                    self._failure = (failure.kind, failure.detail)

    def _report_failure(self, peer: str | None) -> None:
        if self._failure is None:
            return
        kind, detail = self._failure
        self._failure = None
        name = peer or _UNKNOWN_PEER
        # One warning per host (ports change at each reconnect) and kind of failure.
        self.warn(
            (kind, host_of(peer) if peer else None, detail),
            "handshake from %s failed: %s",
            name,
            detail,
        )

    def warn(self, key: tuple[object, ...], message: str, *args: object) -> None:
        """Log ``message`` unless one of the same ``key`` was logged within the interval."""
        held = self._warnings.allow(key)
        if held is None:
            return
        if held:
            message += " (%d more like this held back)"
            args = (*args, held)
        log.warning(message, *args)

    def client_of(self, meta: zmq.Frame | None) -> ClientKey | None:
        """The key-list entry of the CURVE key a frame came with (None: open channel, unknown)."""
        if meta is None or self.clients is None:
            return None
        try:
            user_id = meta.get("User-Id")
        except zmq.ZMQError:  # no User-Id: not admitted by our ZAP handler
            return None
        return self.clients.get(str(user_id))

    def may_publish(self, rank: int, meta: zmq.Frame | None) -> bool:
        """Whether the frame's key may publish ``rank`` (always, on an open channel)."""
        if self.clients is None:
            return True
        client = self.client_of(meta)
        return client is not None and rank in client.ranks

    def warn_dropped(self, reason: str, value: object, meta: zmq.Frame | None) -> None:
        """Log a frame dropped for its instance (``value``) or a rank its key may not publish."""
        peer = "?"
        if meta is not None:
            with contextlib.suppress(zmq.ZMQError):
                peer = str(meta.get("Peer-Address"))
        if reason == "wrong_instance":
            found = "no instance" if value is None else f"instance={value!r}"
            self.warn(
                (reason, peer, value),
                "dropped frames from %s: %s, this collector serves instance=%r",
                peer,
                found,
                self.instance,
            )
            return
        client = self.client_of(meta)
        self.warn(
            (reason, peer, value),
            "dropped frames from %s: dp_rank=%s not allowed for CURVE key %s (ranks=%s)",
            peer,
            value,
            client.name if client is not None else "?",
            client.ranks if client is not None else "-",
        )
