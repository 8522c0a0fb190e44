"""ZAP (ZeroMQ RFC 27) decisions for the collector: admit listed CURVE keys, name them.

No I/O: :func:`decide` maps one request's frames to the reply frames. The collector's own
thread owns the REP socket bound at :data:`ZAP_ENDPOINT` in the collector's context (bound
before the PULL socket, so no handshake is ever decided without it), next to its PULL and
monitor sockets.

A request is ``version, request_id, domain, address, identity, mechanism, credentials...``; the
reply is ``version, request_id, status_code, status_text, user_id, metadata``. An admitted
client's ``User-Id`` is its public key in Z85: libzmq attaches it to every frame from that
connection (``zmq.Frame.get("User-Id")``), which is how the collector knows which key, and so
which ranks, a frame came from. The request's ``address`` is the peer's IP address, which
names the peer in the warning about a rejected key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import zmq
from zmq.utils import z85

from loadsnap.curve import ClientKey
from loadsnap.errors import TransportError

__all__ = ["ZAP_ENDPOINT", "ZAP_VERSION", "ZapDecision", "bind_zap_handler", "decide"]

ZAP_ENDPOINT: Final[str] = "inproc://zeromq.zap.01"
ZAP_VERSION: Final[bytes] = b"1.0"
_CURVE_KEY_BYTES: Final[int] = 32


@dataclass(frozen=True)
class ZapDecision:
    """The reply to send and what it decided (for counting and logging)."""

    reply: list[bytes]
    client: ClientKey | None  # None: rejected
    address: str  # the peer's IP address, as libzmq gave it
    key: str  # the offered public key in Z85, "" if none
    reason: str


def _reply(request_id: bytes, status: bytes, text: str, user_id: str = "") -> list[bytes]:
    return [ZAP_VERSION, request_id, status, text.encode(), user_id.encode(), b""]


def decide(frames: Sequence[bytes], clients: Mapping[str, ClientKey]) -> ZapDecision:
    """Admit a CURVE client whose public key (Z85) is in ``clients``; reject anything else."""
    if len(frames) < 6 or frames[0] != ZAP_VERSION:
        request_id = frames[1] if len(frames) > 1 else b""
        reason = "malformed ZAP request"
        return ZapDecision(_reply(request_id, b"500", reason), None, "", "", reason)
    request_id, address = frames[1], frames[3].decode("utf-8", "replace")
    mechanism, credentials = frames[5], frames[6:]
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != _CURVE_KEY_BYTES:
        reason = f"mechanism not allowed: {mechanism.decode('ascii', 'replace')}"
        return ZapDecision(_reply(request_id, b"400", reason), None, address, "", reason)
    key = z85.encode(credentials[0]).decode("ascii")
    client = clients.get(key)
    if client is None:
        reason = "key not on the allow-list"
        return ZapDecision(_reply(request_id, b"400", reason), None, address, key, reason)
    return ZapDecision(_reply(request_id, b"200", "OK", key), client, address, key, "OK")


def bind_zap_handler(context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    """Bind the context's ZAP handler socket (REP on ``ZAP_ENDPOINT``).

    Bind it before any CURVE server socket: libzmq admits every CURVE client when no ZAP
    handler is bound in the context, so no handshake may happen before this exists.

    Raises
    ------
    TransportError
        It cannot be bound (another handler in this context).
    """
    zap = context.socket(zmq.REP)
    try:
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as exc:
        zap.close(linger=0)
        raise TransportError(f"cannot bind ZAP handler: {exc} (endpoint={ZAP_ENDPOINT})") from exc
    return zap
