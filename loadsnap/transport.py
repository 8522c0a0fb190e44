"""Transport selection: one ``SnapshotWriter`` protocol, one factory.

``LOADSNAP_TRANSPORT=shm|zmq|auto`` (or the ``transport`` argument) picks shared memory for a
rank on the readers' node and ZMQ for a rank elsewhere. ``auto`` picks ZMQ only when a collector
address is configured (``collector=`` or ``$LOADSNAP_COLLECTOR``) and that address is not on
this host; otherwise shared memory. So one configuration serves every node: ranks on the
collector's node write shared memory, the others send to the collector.

Environment (arguments win):

==============================  ================================================================
``LOADSNAP_TRANSPORT``          ``shm``, ``zmq`` or ``auto`` (default)
``LOADSNAP_COLLECTOR``          collector endpoint, e.g. ``tcp://node0:5557``
``LOADSNAP_CURVE_SERVER_KEY``   path of the collector's public key (``server.key``)
``LOADSNAP_CURVE_CLIENT_KEY``   path of this node's secret key (``client-NNN.key_secret``)
==============================  ================================================================

Setting one CURVE variable without the other is an error, never a silent fallback to plain text.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from typing import Protocol, runtime_checkable

from loadsnap import settings
from loadsnap.curve import CurveClientKeys, load_client_keys
from loadsnap.errors import UsageError
from loadsnap.schema import LoadSnapshot
from loadsnap.shm_writer import ShmWriter
from loadsnap.zmq_writer import ZmqWriter

__all__ = [
    "SnapshotWriter",
    "Transport",
    "endpoint_is_local",
    "make_writer",
    "resolve_collector",
    "resolve_transport",
]


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
    raw = transport if transport is not None else settings.current().transport
    if isinstance(raw, Transport):
        return raw
    try:
        return Transport(raw.strip().lower())
    except ValueError:
        valid = ", ".join(t.value for t in Transport)
        raise UsageError(f"unknown transport: transport={raw!r}; valid: {valid}") from None


def resolve_collector(collector: str | None = None) -> str | None:
    """The collector endpoint from the argument, else ``$LOADSNAP_COLLECTOR``, else None."""
    if collector is None:
        return settings.current().collector
    return collector.strip() or None


def endpoint_is_local(endpoint: str) -> bool:
    """Whether a ZMQ endpoint names this host (loopback, a local interface address, ipc).

    A host name that does not resolve counts as remote: ZMQ keeps retrying it.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "*"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        ip = str(address[0])
        if ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback:
            return True
        # Binding succeeds only for an address assigned to one of this host's interfaces.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((ip, 0))
            except OSError:
                continue
            return True
    return False


def _curve_from_env(server_key: str | None, client_key: str | None) -> CurveClientKeys | None:
    env = settings.current()
    server = server_key or env.curve_server_key
    client = client_key or env.curve_client_key
    if server is None and client is None:
        return None
    if server is None or client is None:
        raise UsageError(
            "CURVE needs both keys: curve_server_key (LOADSNAP_CURVE_SERVER_KEY) "
            f"and curve_client_key (LOADSNAP_CURVE_CLIENT_KEY); got server={server} "
            f"client={client}"
        )
    return load_client_keys(server, client)


def make_writer(
    instance: str,
    dp_size: int,
    dp_rank: int,
    *,
    transport: str | Transport | None = None,
    shm_dir: str | None = None,
    collector: str | None = None,
    curve_server_key: str | None = None,
    curve_client_key: str | None = None,
) -> SnapshotWriter:
    """Build the writer for one rank.

    Parameters
    ----------
    instance, dp_size, dp_rank:
        The deployment instance and this rank.
    transport:
        ``shm``, ``zmq`` or ``auto`` (default: ``$LOADSNAP_TRANSPORT``, else ``auto``).
    shm_dir:
        Segment directory for shared memory (see :class:`~loadsnap.ShmWriter`).
    collector:
        Collector endpoint for ZMQ (default ``$LOADSNAP_COLLECTOR``).
    curve_server_key, curve_client_key:
        Key files that turn CURVE on (defaults ``$LOADSNAP_CURVE_SERVER_KEY`` and
        ``$LOADSNAP_CURVE_CLIENT_KEY``).

    Raises
    ------
    UsageError
        An unknown transport, ``zmq`` without a collector address, or half a CURVE setup.
    TransportError
        A CURVE key file is missing, malformed or readable by others.
    SegmentError, LayoutError
        As for :class:`~loadsnap.ShmWriter`.
    """
    chosen = resolve_transport(transport)
    endpoint = resolve_collector(collector)
    if chosen is Transport.AUTO:
        remote = endpoint is not None and not endpoint_is_local(endpoint)
        chosen = Transport.ZMQ if remote else Transport.SHM
    if chosen is Transport.SHM:
        return ShmWriter(instance, dp_size, dp_rank, shm_dir=shm_dir)
    if endpoint is None:
        raise UsageError(
            "transport=zmq needs a collector address: pass collector= or set LOADSNAP_COLLECTOR"
        )
    curve = _curve_from_env(curve_server_key, curve_client_key)
    return ZmqWriter(endpoint, dp_size, dp_rank, instance=instance, curve=curve)
