"""A ``grpc.aio`` server carrying the load servicers: started inside a running event loop
(``loadsnap serve --grpc-port``) or in a background thread with its own loop (the demo's fake
engine, tests and benchmarks).

Servers are created with ``grpc.so_reuseport`` off, so a port another process listens on is
refused (``PortInUseError``) instead of shared silently.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from loadsnap._optional import GRPC_HINT
from loadsnap.errors import TransportError

try:
    import grpc
except ImportError:
    raise ImportError(GRPC_HINT) from None

__all__ = ["GrpcServerThread", "PortInUseError", "start_grpc_server"]

START_TIMEOUT_S: Final[float] = 10.0
STOP_GRACE_S: Final[float] = 1.0
_OPTIONS: Final[list[tuple[str, Any]]] = [("grpc.so_reuseport", 0)]


class PortInUseError(TransportError):
    """The gRPC server cannot listen on its address (in use, not local, not allowed)."""


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_bindable(host: str, port: int) -> None:
    # What grpc would do (SO_REUSEADDR, no SO_REUSEPORT): refused now if grpc would be.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot listen on address={_target(host, port)}: {exc.strerror or exc}"
            ) from exc


async def start_grpc_server(
    setup: Callable[[grpc.aio.Server], object], host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Create a server in the running loop, let ``setup`` register its servicers, bind and
    start it.

    Returns
    -------
    tuple
        The started server and the bound port (``port`` 0: any free one).

    Raises
    ------
    PortInUseError
        The address cannot be bound; the message says ``address=host:port``.
    """
    if port:
        _check_bindable(host, port)  # one clear line, before grpc's own logged bind error
    server = grpc.aio.server(options=_OPTIONS)
    setup(server)
    try:
        bound = server.add_insecure_port(_target(host, port))
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind to address ...")
        await server.stop(None)
        raise PortInUseError(
            f"cannot listen on address={_target(host, port)}: the port is in use or the "
            "address is not local"
        ) from exc
    if bound == 0:  # older grpc versions return 0 instead of raising
        await server.stop(None)
        raise PortInUseError(f"cannot listen on address={_target(host, port)}")
    await server.start()
    return server, bound


class GrpcServerThread:
    """Runs a gRPC server on its own event loop in a daemon thread. Start and stop once, from
    one thread.

    Parameters
    ----------
    setup:
        Called in the server's loop with the new server, before it binds: register servicers.
    host, port:
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    """

    def __init__(
        self, setup: Callable[[grpc.aio.Server], object], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
        self._setup = setup
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loadsnap-grpc", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server, self.port = self._loop.run_until_complete(
                start_grpc_server(self._setup, self.host, self.port)
            )
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._server.stop(STOP_GRACE_S))
            self._loop.run_until_complete(_cancel_pending())
            self._loop.close()

    def start(self) -> GrpcServerThread:
        """Start serving; returns once the server listens.

        Raises
        ------
        PortInUseError
            The address cannot be bound.
        TransportError
            The server did not start in time.
        """
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TransportError(f"gRPC server did not start: address={self.target}")
        if self._error is not None:
            self._thread.join(START_TIMEOUT_S)
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the server's loop and return its result (for tests)."""
        return asyncio.run_coroutine_threadsafe(_call(fn), self._loop).result(START_TIMEOUT_S)

    @property
    def target(self) -> str:
        """``host:port``, as a gRPC client dials it."""
        return _target(self.host, self.port)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (a short grace for open streams) and its loop. Idempotent."""
        if self._thread.is_alive() and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def __enter__(self) -> GrpcServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


async def _cancel_pending() -> None:
    # Whatever the stopped server left (a stream's watch): cancelled and awaited, not leaked.
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
