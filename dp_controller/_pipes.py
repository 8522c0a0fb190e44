"""The controller's sockets: one ordered request pipe per rank, one result pipe for all.

Nothing here decodes a message or knows a request: :class:`RankPipes` moves bytes to each
scheduler, :class:`ResultPipe` brings bytes back. Neither blocks without a bound: sends use
``NOBLOCK`` (a full pipe queues the message in a per-rank backlog, flushed in order, so what a
rank receives keeps the order it was sent in), a receive waits on ``poll`` with a timeout, and
every socket has ``linger=0``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import zmq

from loadsnap.errors import TransportError

__all__ = ["RankPipes", "ResultPipe"]

_Context = zmq.Context[zmq.Socket[bytes]]


class RankPipes:
    """One PUSH per rank, connected to its scheduler, with an ordered backlog each.

    Single owner; not thread-safe; never blocks.

    Parameters
    ----------
    context:
        The ZMQ context the sockets belong to.
    addrs:
        One address per rank, where that rank's scheduler binds its request PULL.
    send_hwm:
        Per-rank send high-water mark; beyond it messages wait in the backlog.
    """

    def __init__(self, context: _Context, addrs: Sequence[str], send_hwm: int) -> None:
        self._ctx = context
        self.addrs = list(addrs)
        self._send_hwm = send_hwm
        self._pushes: list[zmq.Socket[bytes]] = []
        self._backlog: list[deque[bytes]] = [deque() for _ in self.addrs]
        try:
            for addr in self.addrs:
                self._pushes.append(self._connect(addr))
        except BaseException:
            self.close()
            raise

    def _connect(self, addr: str) -> zmq.Socket[bytes]:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, self._send_hwm)
        push.connect(addr)
        return push

    def send(self, rank: int, data: bytes) -> bool:
        """Send ``data`` to ``rank`` after its backlog; False when it had to join the backlog."""
        backlog = self._backlog[rank]
        if backlog:
            self.flush(rank)
            if backlog:
                backlog.append(data)
                return False
        try:
            self._pushes[rank].send(data, zmq.NOBLOCK)
        except zmq.Again:
            backlog.append(data)
            return False
        return True

    def withdraw_last(self, rank: int) -> None:
        """Drop the message :meth:`send` just put in ``rank``'s backlog (it returned False)."""
        self._backlog[rank].pop()

    def flush(self, rank: int) -> None:
        """Send what ``rank``'s backlog holds, in order, until its pipe is full again."""
        backlog, push = self._backlog[rank], self._pushes[rank]
        while backlog:
            try:
                push.send(backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            backlog.popleft()

    def flush_all(self) -> None:
        """:meth:`flush` every rank with a backlog."""
        for rank, backlog in enumerate(self._backlog):
            if backlog:
                self.flush(rank)

    def reset(self, rank: int) -> None:
        """Drop ``rank``'s backlog and whatever still waits in its pipe: a new socket, connected
        to the same address, replaces the old one (closed with linger 0)."""
        self._backlog[rank].clear()
        self._pushes[rank].close(linger=0)
        self._pushes[rank] = self._connect(self.addrs[rank])

    def backlog_sizes(self) -> list[int]:
        """Messages per rank waiting for room in their pipe."""
        return [len(b) for b in self._backlog]

    def close(self) -> None:
        """Close every socket (linger 0); idempotent."""
        for sock in self._pushes:
            sock.close(linger=0)
        self._pushes = []


class ResultPipe:
    """The PULL every scheduler pushes its results and control replies to.

    Single owner; not thread-safe; a receive waits at most its timeout.

    Parameters
    ----------
    context:
        The ZMQ context the socket belongs to.
    addr:
        Where to bind.

    Raises
    ------
    TransportError
        ``addr`` cannot be bound (``addr=`` in the message).
    """

    def __init__(self, context: _Context, addr: str) -> None:
        self.addr = addr
        self._pull: zmq.Socket[bytes] | None = context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        try:
            self._pull.bind(addr)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"cannot bind result socket: {exc} (addr={addr})") from exc
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._pull is None

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message; True when one is ready (False when closed)."""
        pull = self._pull
        if pull is None:
            return False
        return bool(pull.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN))

    def recv_nowait(self) -> bytes | None:
        """One message that is ready, or ``None`` (none ready, or closed)."""
        pull = self._pull
        if pull is None:
            return None
        try:
            return pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def close(self) -> None:
        """Close the socket (linger 0); idempotent."""
        if self._pull is not None:
            self._pull.close(linger=0)
            self._pull = None
