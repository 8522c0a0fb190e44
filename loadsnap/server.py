"""The sidecar HTTP app: ``/v1/loads``, ``/get_load``, ``/metrics`` and ``/healthz`` for one
instance.

For engines without an HTTP server of their own (e.g. gRPC-mode serving): ``loadsnap serve``
runs :func:`create_app` under uvicorn. :class:`ServerThread` runs the same app in a background
thread, for the demo and for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import anyio.to_thread
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from loadsnap.collector_stats import CollectorStatsRead, read_collector_stats
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.exposition import USABLE_STATUSES
from loadsnap.http import LockedSource, loads_router
from loadsnap.metrics import LoadsnapCollector, slot_refused_counts
from loadsnap.reading import (
    DEFAULT_STALE_AFTER_S,
    SegmentState,
    SlotStatus,
    SnapshotSource,
    unavailable_state,
)
from loadsnap.shm_reader import ShmReader

__all__ = ["LOOPBACK_HOSTS", "ServerThread", "create_app"]

LOOPBACK_HOSTS: Final[frozenset[str]] = frozenset({"127.0.0.1", "::1", "localhost"})
SERVER_START_TIMEOUT_S: Final[float] = 10.0

# OpenAPI descriptions of /metrics and /healthz (schemathesis checks live answers against them).
_TEXT: Final[dict[str, Any]] = {"schema": {"type": "string"}}
_METRICS_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {"text/plain; version=0.0.4": _TEXT, "application/openmetrics-text": _TEXT}}
}
_HEALTH_DOC: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["status", "segment"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]},
        "segment": {"type": "string", "enum": [state.value for state in SegmentState]},
        "ranks": {
            "type": "object",
            "properties": {
                status.label: {"type": "integer", "minimum": 0} for status in SlotStatus
            },
            "additionalProperties": False,
        },
        "detail": {"type": "string"},
    },
}
_HEALTHZ_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "At least one rank is fresh or stale",
        "content": {"application/json": {"schema": _HEALTH_DOC}},
    },
    503: {
        "description": "No segment, an incompatible one, or no usable rank",
        "content": {"application/json": {"schema": _HEALTH_DOC}},
    },
}


def create_app(
    instance: str | None = None,
    *,
    source: SnapshotSource | None = None,
    shm_dir: str | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    prefix: str = "loadsnap_",
    const_labels: Mapping[str, str] | None = None,
) -> FastAPI:
    """Build the sidecar app for ``instance`` (or for any ``source``).

    ``app.state.collector`` is the :class:`~loadsnap.metrics.LoadsnapCollector` behind
    ``/metrics``: add other components' counters to it with ``add_provider``. With
    ``instance=``, ``/metrics`` also carries the counters of the instance's ZMQ collector
    (``loadsnap_collector_*``) while one runs, read from its stats file at each scrape, in
    whichever process it runs.

    Parameters
    ----------
    instance:
        Instance to read through a new :class:`~loadsnap.ShmReader` (closed at shutdown).
    source:
        Read this source instead (not closed by the app).
    shm_dir, stale_after_s:
        For the reader.
    prefix, const_labels:
        For the ``/v1/loads`` Prometheus formats.

    Raises
    ------
    UsageError
        Neither or both of ``instance`` and ``source``; invalid reader or label arguments.
    """
    if (instance is None) == (source is None):
        raise UsageError("create_app: pass exactly one of instance= or source=")
    reader: ShmReader | None = None
    if source is None:
        assert instance is not None
        reader = ShmReader(instance, stale_after_s=stale_after_s, shm_dir=shm_dir)
        source = reader
    locked = LockedSource(source)

    def refused() -> list[int]:
        return locked.call(slot_refused_counts)

    def collector_stats() -> CollectorStatsRead | None:
        assert instance is not None
        return read_collector_stats(instance, shm_dir)

    collector = LoadsnapCollector(
        locked,
        refused=refused if reader is not None else None,
        collector_stats=collector_stats if instance is not None else None,
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if reader is not None:
            locked.call(lambda r: r.close())

    app = FastAPI(
        title="loadsnap",
        summary="Every DP rank's latest load, for routers and Prometheus.",
        lifespan=lifespan,
    )
    app.state.collector = collector
    app.state.registry = registry
    app.state.source = locked
    app.include_router(loads_router(locked, prefix=prefix, const_labels=const_labels))

    @app.get(
        "/metrics",
        summary="loadsnap's own health (Prometheus / OpenMetrics)",
        response_description="Prometheus text, or OpenMetrics when Accept asks for it",
        response_class=Response,
        responses=_METRICS_RESPONSES,
    )
    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = await anyio.to_thread.run_sync(encoder, registry)
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    @app.get(
        "/healthz",
        summary="200 while at least one rank is fresh or stale, else 503",
        responses=_HEALTHZ_RESPONSES,
    )
    async def healthz() -> Response:
        try:
            reads = await anyio.to_thread.run_sync(locked.read_all)
        except LoadsnapError as exc:
            state = unavailable_state(exc).value
            return _json({"status": "unavailable", "segment": state, "detail": str(exc)}, 503)
        ranks = {s.label: sum(1 for r in reads if r.status is s) for s in SlotStatus}
        ok = any(read.status in USABLE_STATUSES for read in reads)
        doc: dict[str, object] = {
            "status": "ok" if ok else "unavailable",
            "segment": "ok",
            "ranks": ranks,
        }
        return _json(doc, 200 if ok else 503)

    return app


def _json(doc: object, status: int = 503) -> Response:
    return Response(msgspec.json.encode(doc), status_code=status, media_type="application/json")


class ServerThread:
    """Runs an ASGI app under uvicorn in a daemon thread. Not thread-safe; start/stop once.

    Parameters
    ----------
    app:
        The app.
    host, port:
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.host = host
        self._server = uvicorn.Server(config)
        # uvicorn installs signal handlers only in the main thread, so none are taken here.
        self._thread = threading.Thread(target=self._run, name="loadsnap-http", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self) -> ServerThread:
        """Start serving; returns once the socket listens.

        Raises
        ------
        RuntimeError
            The server did not start within the timeout (e.g. the port is taken).
        """
        self._thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HTTP server did not start on {self.host}: {self._error}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        """The bound port."""
        server = self._server.servers[0]
        port: int = server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the server to exit and wait for its thread. Idempotent."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
