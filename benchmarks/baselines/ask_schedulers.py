"""The pre-snapshot ``/v1/loads``: ask every scheduler over ZMQ and wait for all the replies.

Before shared-memory snapshots, an HTTP load query was answered by the process that talks to
the schedulers (sglang's tokenizer manager / DP controller): it sends each scheduler a control
message and waits until every scheduler has replied. A scheduler reads its control socket only
between steps, so the reply waits for the step in flight to end: with a 1 s chunked prefill the
query waits up to 1 s, whatever the HTTP stack costs.

This baseline reproduces that design against the reference schedulers (``python -m scheduler``)
unchanged: :class:`AskSchedulers` sends the scheduler's own ``Control(command="ping")`` (the
reference scheduler's cheapest query; its reply carries the cycle and the acknowledged dispatch
sequence) through one PUSH per rank to the scheduler's request socket, and collects the
``ControlReply`` messages on the PULL socket the schedulers push their results to.
:func:`create_ask_app` serves it as ``GET /v1/loads`` in the same FastAPI/uvicorn stack as
loadsnap's endpoint, so an HTTP benchmark times the same HTTP path for both and only the data
path differs: a shared-memory read against a round trip through every scheduler's loop.

What is timed by a client is therefore: HTTP request, handler, one ping per rank, the wait for
the slowest rank to finish its current step and drain its socket, the replies, the JSON
response. Nothing is simulated on the baseline's side; the step time is the scheduler's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Final

import anyio.to_thread
import msgspec
import zmq
from fastapi import FastAPI
from fastapi.responses import Response

from scheduler.messages import Control, ControlReply, decode_to_controller, encode_message

__all__ = ["AskSchedulers", "create_ask_app"]

POLL_MS: Final[int] = 50
DEFAULT_TIMEOUT_S: Final[float] = 10.0


class _Pending:
    __slots__ = ("done", "replies")

    def __init__(self, dp_size: int) -> None:
        self.replies: list[ControlReply | None] = [None] * dp_size
        self.done = threading.Event()


class AskSchedulers:
    """Asks every scheduler for its state and waits for all replies. Safe from any thread.

    Owns one PUSH socket per rank (connected to the scheduler's request endpoint, guarded by a
    lock) and binds the PULL socket the schedulers send their results to; a receiver thread
    routes each ``ControlReply`` to the query that asked (by ``command_id``) and drops
    everything else (finished requests).

    Parameters
    ----------
    request_addrs:
        Each rank's request endpoint (the scheduler binds it).
    result_addr:
        The endpoint to bind for the schedulers' replies.
    """

    def __init__(self, request_addrs: Sequence[str], result_addr: str) -> None:
        self.dp_size = len(request_addrs)
        self._ctx = zmq.Context()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            self._pull.bind(result_addr)
            self._push: list[zmq.Socket[bytes]] = []
            for addr in request_addrs:
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(addr)
                self._push.append(sock)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._receive, name="ask-receiver", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        pull = self._pull
        while not self._stop.is_set():
            if not pull.poll(POLL_MS):
                continue
            try:
                message = decode_to_controller(pull.recv(zmq.NOBLOCK))
            except (zmq.Again, msgspec.DecodeError, UnicodeDecodeError):
                continue
            if not isinstance(message, ControlReply):
                continue
            with self._pending_lock:
                pending = self._pending.get(message.command_id)
            if pending is None or not 0 <= message.dp_rank < self.dp_size:
                continue
            pending.replies[message.dp_rank] = message
            if all(reply is not None for reply in pending.replies):
                pending.done.set()

    def ask(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[ControlReply | None]:
        """Ping every rank and wait for every reply (``None`` for a rank that did not answer).

        Blocks until the slowest scheduler has finished its current step and answered, or
        ``timeout_s``.
        """
        command_id = next(self._ids)
        pending = _Pending(self.dp_size)
        with self._pending_lock:
            self._pending[command_id] = pending
        frame = encode_message(Control(command_id=command_id, command="ping"))
        try:
            with self._send_lock:
                for sock in self._push:
                    sock.send(frame, zmq.NOBLOCK)
            pending.done.wait(timeout_s)
        finally:
            with self._pending_lock:
                del self._pending[command_id]
        return list(pending.replies)

    def close(self) -> None:
        """Stop the receiver and close every socket. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._ctx.destroy(linger=0)


def create_ask_app(asker: AskSchedulers, timeout_s: float = DEFAULT_TIMEOUT_S) -> FastAPI:
    """A FastAPI app whose ``GET /v1/loads`` asks every scheduler (see the module docstring).

    The wait runs in a worker thread, as loadsnap's read does, so the event loop stays free.
    """
    app = FastAPI(title="ask-schedulers baseline")

    @app.get("/v1/loads")
    async def loads() -> Response:
        replies = await anyio.to_thread.run_sync(asker.ask, timeout_s)
        doc = {
            "ranks": [
                {"dp_rank": rank, "ok": False, "detail": "timeout"}
                if reply is None
                else {"dp_rank": rank, "ok": reply.ok, "detail": reply.detail}
                for rank, reply in enumerate(replies)
            ]
        }
        complete = all(reply is not None for reply in replies)
        return Response(
            msgspec.json.encode(doc),
            status_code=200 if complete else 504,
            media_type="application/json",
        )

    return app
