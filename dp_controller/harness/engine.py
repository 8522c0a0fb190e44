"""A fake sglang worker for routers: what SMG and sglang-router check before they poll loads,
over loadsnap's real endpoints. For tests, benchmarks and ``loadsnap demo``; not production code.

A router registers a worker only if it answers its health check and identifies itself:

* **HTTP** (:func:`engine_app`): ``GET /health`` (200 while a rank's writer lives, else 503),
  ``/v1/models`` (``owned_by: sglang``), ``/server_info`` (``dp_size``, model, version),
  ``/model_info``, ``/version``; plus what an integrator mounts: the loads router
  (``/v1/loads``, ``/get_load``) and loadsnap's ``/metrics`` and ``/healthz``
  (:func:`loadsnap.server.create_app`).
* **gRPC** (:func:`add_engine_servicers`): ``SglangScheduler`` with ``HealthCheck``,
  ``GetModelInfo``, ``GetServerInfo`` answered here (``Generate`` and the rest stay
  unimplemented: this engine serves no tokens), and loadsnap's ``GetLoads`` and
  ``SubscribeKvEvents`` added by :func:`loadsnap.grpc_loads.add_load_servicers`, as an
  engine would add them to its own server.

Every figure comes from the loads source (an :class:`~loadsnap.ShmReader` of the instance);
the identity is fixed (:data:`MODEL`, :data:`ENGINE_VERSION`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio.to_thread
import msgspec
from fastapi import FastAPI
from fastapi.responses import Response

from loadsnap.errors import LoadsnapError
from loadsnap.exposition import USABLE_STATUSES
from loadsnap.http import LockedSource
from loadsnap.reading import DEFAULT_STALE_AFTER_S, SnapshotSource
from loadsnap.server import create_app

if TYPE_CHECKING:
    import grpc

    from loadsnap.grpc_loads import LoadServicer

__all__ = ["ENGINE_VERSION", "MODEL", "add_engine_servicers", "engine_app"]

MODEL: Final[str] = "loadsnap-fake-model"
ENGINE_VERSION: Final[str] = "0.5.9-loadsnap-fake"
CONTEXT_LENGTH: Final[int] = 4096


def _alive(source: LockedSource) -> bool:
    try:
        return any(read.status in USABLE_STATUSES for read in source.read_all())
    except LoadsnapError:
        return False


def _json(doc: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(doc), status_code=status, media_type="application/json")


def server_info(dp_size: int, model: str = MODEL) -> dict[str, Any]:
    """What ``/server_info`` (and gRPC ``GetServerInfo.server_args``) says about the engine."""
    return {
        "model_path": model,
        "served_model_name": model,
        "tokenizer_path": model,
        "dp_size": dp_size,
        "tp_size": 1,
        "load_balance_method": "round_robin",
        "disaggregation_mode": "null",
        "version": ENGINE_VERSION,
    }


def engine_app(
    dp_size: int,
    instance: str | None = None,
    *,
    source: SnapshotSource | None = None,
    model: str = MODEL,
    const_labels: Mapping[str, str] | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> FastAPI:
    """The fake engine's HTTP app for ``instance`` or over ``source`` (see the module
    docstring): :func:`~loadsnap.server.create_app` with the worker identity routes added.
    """
    app = create_app(
        instance, source=source, const_labels=const_labels, stale_after_s=stale_after_s
    )
    locked: LockedSource = app.state.source
    info = server_info(dp_size, model)

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        ok = await anyio.to_thread.run_sync(_alive, locked)
        return Response(status_code=200 if ok else 503)

    @app.get("/v1/models", include_in_schema=False)
    async def models() -> Response:
        card = {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "sglang",
            "root": model,
            "max_model_len": CONTEXT_LENGTH,
        }
        return _json({"object": "list", "data": [card]})

    @app.get("/server_info", include_in_schema=False)
    @app.get("/get_server_info", include_in_schema=False)
    async def get_server_info() -> Response:
        return _json(info)

    @app.get("/model_info", include_in_schema=False)
    @app.get("/get_model_info", include_in_schema=False)
    async def model_info() -> Response:
        return _json({"model_path": model, "tokenizer_path": model, "is_generation": True})

    @app.get("/version", include_in_schema=False)
    async def version() -> Response:
        return _json({"version": ENGINE_VERSION})

    return app


def add_engine_servicers(
    server: grpc.aio.Server,
    source: SnapshotSource,
    dp_size: int,
    *,
    model: str = MODEL,
    poll_interval_s: float | None = None,
    min_interval_s: float | None = None,
    heartbeat_s: float | None = None,
) -> LoadServicer:
    """Register the fake engine's ``SglangScheduler`` servicer and loadsnap's load servicers
    on ``server`` (the push settings default to :mod:`loadsnap.grpc_loads`'s).

    Raises
    ------
    ImportError
        grpcio or smg-grpc-proto is missing (the message says how to install them).
    """
    from google.protobuf import struct_pb2, timestamp_pb2
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    from loadsnap.grpc_loads import add_load_servicers

    locked = source if isinstance(source, LockedSource) else LockedSource(source)
    started = time.time()

    class FakeEngineServicer(pb_grpc.SglangSchedulerServicer):
        """The engine's own RPCs: identity and health; no generation."""

        async def HealthCheck(self, request: Any, context: Any) -> pb.HealthCheckResponse:
            ok = await anyio.to_thread.run_sync(_alive, locked)
            return pb.HealthCheckResponse(healthy=ok, message="ok" if ok else "no live rank")

        async def GetModelInfo(self, request: Any, context: Any) -> pb.GetModelInfoResponse:
            return pb.GetModelInfoResponse(
                model_path=model,
                tokenizer_path=model,
                served_model_name=model,
                is_generation=True,
                max_context_length=CONTEXT_LENGTH,
                max_req_input_len=CONTEXT_LENGTH,
                vocab_size=32000,
            )

        async def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
            args = struct_pb2.Struct()
            args.update(server_info(dp_size, model))
            start = timestamp_pb2.Timestamp()
            start.FromNanoseconds(int(started * 1e9))
            return pb.GetServerInfoResponse(
                server_args=args,
                sglang_version=ENGINE_VERSION,
                server_type="grpc",
                start_time=start,
                uptime_seconds=time.time() - started,
            )

    from loadsnap import grpc_loads

    return add_load_servicers(
        server,
        locked,
        engine=FakeEngineServicer(),
        poll_interval_s=poll_interval_s or grpc_loads.DEFAULT_POLL_INTERVAL_S,
        min_interval_s=min_interval_s or grpc_loads.DEFAULT_MIN_INTERVAL_S,
        heartbeat_s=heartbeat_s or grpc_loads.DEFAULT_HEARTBEAT_S,
    )
