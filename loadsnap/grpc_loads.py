"""``GetLoads`` and a pushed, load-only ``SubscribeKvEvents`` for SMG's ``SglangScheduler``
gRPC service, read from any :class:`~loadsnap.SnapshotSource`; mountable into an engine's
``grpc.aio`` server in one call::

    server = grpc.aio.server()
    add_load_servicers(server, ShmReader("prod"), engine=MyEngineServicer())  # or: register
    # the engine's servicer first, then call add_load_servicers(server, reader) without engine=

Theory of operation.

* **Only these two RPCs are ours.** They are registered as method handlers of the service
  ``sglang.grpc.scheduler.SglangScheduler``; grpc routes a method to the handler registered
  last, so they take over ``GetLoads`` and ``SubscribeKvEvents`` from an engine servicer
  registered before them (``engine=`` does that in the right order) and leave every other RPC
  (Generate, HealthCheck, GetModelInfo...) to the engine. The stubs come from the
  ``smg-grpc-proto`` package (``pip install 'loadsnap[grpc]'``).
* **GetLoads** is ``/v1/loads`` over gRPC: the same document (:mod:`loadsnap.exposition`), so
  the same routable ranks and figures, mapped field for field onto ``GetLoadsResponse`` (an
  empty ``include`` means sglang's default, all). No routable rank: ``UNAVAILABLE``.
* **SubscribeKvEvents** streams one ``KvEventBatch{dp_rank, load: EngineLoad}`` per record,
  ``load_only`` (no KV events; ``sequence_number`` 0). One :class:`LoadWatch` per servicer polls
  the source every ``poll_interval_s`` in a worker thread (``asyncio.to_thread``: the event loop
  never blocks on a read) while streams are open, and wakes them when a rank published; each
  stream sends with a :class:`~loadsnap._push.PushSchedule`: a rank's record when it changed
  (coalesced, at most one per ``min_interval_s``), and a heartbeat every ``heartbeat_s`` while
  it does not. ``age_ms`` is the age of the record's publish when sent; ``sample`` counts the
  stream's records.
* **Push only a whole, current view.** While any rank is not routable (stale, dead, never
  published), the stream sends nothing: SMG 1.13 keeps the last record pushed for a rank for as
  long as the stream lives, but falls back to polling ``GetLoads`` within one load-monitor
  interval when records stop, and GetLoads lists the routable ranks only. Pushing resumes, every
  rank at once, when every rank is routable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from loadsnap._optional import GRPC_HINT
from loadsnap._push import PushSchedule
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.exposition import (
    ROUTABLE_STATUSES,
    LoadsDocument,
    RankLoad,
    build_document,
    rank_load,
)
from loadsnap.http import LockedSource
from loadsnap.reading import SlotRead, SnapshotSource
from loadsnap.schema import parse_include

try:
    import grpc
    from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as scheduler_grpc
except ImportError:
    raise ImportError(GRPC_HINT) from None

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MIN_INTERVAL_S",
    "DEFAULT_POLL_INTERVAL_S",
    "SERVICE",
    "LoadServicer",
    "LoadWatch",
    "add_load_servicers",
    "engine_load",
    "get_loads_response",
]

SERVICE: Final[str] = "sglang.grpc.scheduler.SglangScheduler"
DEFAULT_POLL_INTERVAL_S: Final[float] = 0.005
DEFAULT_MIN_INTERVAL_S: Final[float] = 0.010
# Below SMG's shortest load-monitor interval (1 s): an idle worker's records never go stale.
DEFAULT_HEARTBEAT_S: Final[float] = 0.5
_U32_MAX: Final[int] = 2**32 - 1
_ALL_SECTIONS: Final[frozenset[str]] = parse_include("all")

_SECTION_MESSAGES: Final[dict[str, tuple[Any, Any]]] = {
    # document key -> (GetLoads message, EngineLoad message)
    "memory": (sglang_scheduler_pb2.MemoryMetrics, common_pb2.EngineMemory),
    "speculative": (sglang_scheduler_pb2.SpeculativeMetrics, common_pb2.EngineSpeculative),
    "lora": (sglang_scheduler_pb2.LoRAMetrics, common_pb2.EngineLora),
    "disaggregation": (sglang_scheduler_pb2.DisaggregationMetrics, common_pb2.EngineDisaggregation),
    "queues": (sglang_scheduler_pb2.QueueMetrics, common_pb2.EngineQueues),
}


# --- the mapping onto SMG's messages (pure) -----------------------------------------------------


def _sections(load: RankLoad, which: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, messages in _SECTION_MESSAGES.items():
        part = getattr(load, key)
        if not isinstance(part, msgspec.UnsetType):
            out[key] = messages[which](**msgspec.structs.asdict(part))
    return out


def scheduler_load(load: RankLoad) -> sglang_scheduler_pb2.SchedulerLoad:
    """One rank of the document as ``GetLoadsResponse.loads[]``: the same fields, same names."""
    return sglang_scheduler_pb2.SchedulerLoad(
        dp_rank=load.dp_rank,
        num_running_reqs=load.num_running_reqs,
        num_waiting_reqs=load.num_waiting_reqs,
        num_total_reqs=load.num_total_reqs,
        num_used_tokens=load.num_used_tokens,
        max_total_num_tokens=load.max_total_num_tokens,
        token_usage=load.token_usage,
        gen_throughput=load.gen_throughput,
        cache_hit_rate=load.cache_hit_rate,
        utilization=load.utilization,
        max_running_requests=load.max_running_requests,
        num_waiting_uncached_tokens=load.num_waiting_uncached_tokens,
        **_sections(load, 0),
    )


def get_loads_response(document: LoadsDocument) -> sglang_scheduler_pb2.GetLoadsResponse:
    """The document as ``GetLoadsResponse`` (``unavailable`` has no place in it)."""
    aggregate = msgspec.structs.asdict(document.aggregate)
    return sglang_scheduler_pb2.GetLoadsResponse(
        timestamp=document.timestamp,
        version=document.version,
        dp_rank_count=document.dp_rank_count,
        loads=[scheduler_load(load) for load in document.loads],
        aggregate=sglang_scheduler_pb2.AggregateMetrics(**aggregate),
    )


def engine_load(load: RankLoad, *, age_ms: int, sample: int) -> common_pb2.EngineLoad:
    """One rank as a pushed ``EngineLoad`` record (``load_only``), every field it can carry.

    ``num_total_tokens`` and ``utilization`` have no field in ``EngineLoad``.
    """
    return common_pb2.EngineLoad(
        running_requests=load.num_running_reqs,
        waiting_requests=load.num_waiting_reqs,
        waiting_uncached_tokens=load.num_waiting_uncached_tokens,
        token_usage=load.token_usage,
        gen_throughput=load.gen_throughput,
        max_running_requests=load.max_running_requests,
        age_ms=min(max(0, age_ms), _U32_MAX),
        sample=sample,
        load_only=True,
        cache_hit_rate=load.cache_hit_rate,
        num_used_tokens=load.num_used_tokens,
        max_total_num_tokens=load.max_total_num_tokens,
        **_sections(load, 1),
    )


# --- watching the source for the streams ----------------------------------------------------------


@dataclass(frozen=True)
class LoadView:
    """What the watch read last: the routable ranks, and whether every rank is routable."""

    read_mono_s: float
    loads: tuple[RankLoad, ...]
    complete: bool


class LoadWatch:
    """Polls a source while streams are open, and wakes them when a rank published. Lives on
    one event loop; not thread-safe (the reads run in worker threads, one at a time).

    Parameters
    ----------
    source:
        Read through :class:`~loadsnap.http.LockedSource` (wrapped unless it is one).
    poll_interval_s:
        Time between two reads of the source.
    """

    def __init__(self, source: SnapshotSource, poll_interval_s: float) -> None:
        if not poll_interval_s > 0:
            raise UsageError(f"poll_interval_s must be > 0: poll_interval_s={poll_interval_s}")
        self._source = source if isinstance(source, LockedSource) else LockedSource(source)
        self.poll_interval_s = poll_interval_s
        self.view: LoadView | None = None
        self.reads = 0
        self.read_errors = 0
        self._signature: tuple[tuple[int, int, int, int], ...] = ()
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None

    def subscribe(self) -> None:
        """A stream opens: start polling if it is the first."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loadsnap-watch")

    def unsubscribe(self) -> None:
        """A stream closes: stop polling after the last."""
        self._subscribers -= 1
        if self._subscribers == 0 and self._task is not None:
            self._task.cancel()
            self._task = None
            self.view = None
            self._signature = ()

    async def wait(self, timeout_s: float) -> None:
        """Return when the view changes, or after ``timeout_s``."""
        changed = self._changed
        if timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            try:
                reads = await asyncio.to_thread(self._source.read_all)
            except LoadsnapError:  # no segment (yet): nothing to push
                self.read_errors += 1
                reads = []
            self.reads += 1
            self._update(reads, time.monotonic())
            await asyncio.sleep(self.poll_interval_s)

    def _update(self, reads: list[SlotRead], now_s: float) -> None:
        signature = tuple((r.rank, int(r.status), r.seq, r.epoch) for r in reads)
        if signature == self._signature and self.view is not None:
            return
        self._signature = signature
        routable = [r for r in reads if r.status in ROUTABLE_STATUSES and r.snapshot is not None]
        self.view = LoadView(
            read_mono_s=now_s,
            loads=tuple(rank_load(read, _ALL_SECTIONS) for read in routable),
            complete=bool(reads) and len(routable) == len(reads),
        )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


# --- the servicer ---------------------------------------------------------------------------------


@dataclass
class ServicerStats:
    """Counters of one servicer (monotonic)."""

    get_loads: int = 0
    streams_opened: int = 0
    streams_open: int = 0
    records_sent: int = 0
    quiet_periods: int = field(default=0)  # times a stream stopped pushing: a rank not routable


class LoadServicer:
    """``GetLoads`` and ``SubscribeKvEvents`` over a source. Lives on one event loop.

    Parameters
    ----------
    source:
        Any :class:`~loadsnap.SnapshotSource` (wrapped in a ``LockedSource`` unless it is one).
    version:
        Reported as ``version`` (default: loadsnap's version).
    poll_interval_s, min_interval_s, heartbeat_s:
        How often the stream reads the source; the shortest time between two records of a
        rank; the longest while nothing changes.

    Raises
    ------
    UsageError
        Intervals out of range.
    """

    def __init__(
        self,
        source: SnapshotSource,
        *,
        version: str | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        if version is None:
            from loadsnap import __version__

            version = __version__
        PushSchedule[RankLoad](min_interval_s, heartbeat_s)  # checks the intervals now
        self.version = version
        self.source = source if isinstance(source, LockedSource) else LockedSource(source)
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self.poll_interval_s = poll_interval_s
        if not poll_interval_s > 0:
            raise UsageError(f"poll_interval_s must be > 0: poll_interval_s={poll_interval_s}")
        self.stats = ServicerStats()
        self._watch: LoadWatch | None = None

    async def GetLoads(
        self,
        request: sglang_scheduler_pb2.GetLoadsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> sglang_scheduler_pb2.GetLoadsResponse:
        """The routable ranks' loads; ``UNAVAILABLE`` when there is none, ``INVALID_ARGUMENT``
        for an unknown section or a rank out of range."""
        self.stats.get_loads += 1
        try:
            include = parse_include(list(request.include) or "all")
            reads = await asyncio.to_thread(self.source.read_all)
        except UsageError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LoadsnapError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if request.HasField("dp_rank"):
            rank = request.dp_rank
            if not 0 <= rank < len(reads):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"dp_rank out of range: dp_rank={rank}; valid: 0..{len(reads) - 1}",
                )
            reads = [reads[rank]]
        document = build_document(reads, include, time.time(), version=self.version)
        if not document.loads:
            counts = ", ".join(f"{u.dp_rank}={u.status}" for u in document.unavailable)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"no rank has a current load: {counts}"
            )
        return get_loads_response(document)

    async def SubscribeKvEvents(
        self,
        request: common_pb2.SubscribeKvEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """Each rank's ``EngineLoad`` when it changes, and as a heartbeat; nothing while a rank
        is not routable (see the module docstring)."""
        if self._watch is None:
            self._watch = LoadWatch(self.source, self.poll_interval_s)
        watch = self._watch
        schedule: PushSchedule[RankLoad] = PushSchedule(self.min_interval_s, self.heartbeat_s)
        self.stats.streams_opened += 1
        self.stats.streams_open += 1
        watch.subscribe()
        quiet = True
        try:
            while True:
                view = watch.view
                now = time.monotonic()
                if view is None or not view.complete:
                    if not quiet:
                        quiet = True
                        self.stats.quiet_periods += 1
                    await watch.wait(self.heartbeat_s)
                    continue
                if quiet:  # (re)starting: every rank's record goes out at once
                    quiet = False
                    schedule.forget()
                keyed = [(load.dp_rank, _content_key(load), load) for load in view.loads]
                for load, sample in schedule.due(keyed, now):
                    age_s = load.age_seconds + (now - view.read_mono_s)
                    record = engine_load(load, age_ms=round(age_s * 1000), sample=sample)
                    self.stats.records_sent += 1
                    yield common_pb2.KvEventBatch(
                        sequence_number=0, timestamp=time.time(), dp_rank=load.dp_rank, load=record
                    )
                keys = [(rank, key) for rank, key, _ in keyed]
                await watch.wait(schedule.next_due_s(keys, time.monotonic()))
        finally:
            self.stats.streams_open -= 1
            watch.unsubscribe()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The two methods as grpc handlers, for ``add_registered_method_handlers``."""
        return {
            "GetLoads": grpc.unary_unary_rpc_method_handler(
                self.GetLoads,
                request_deserializer=sglang_scheduler_pb2.GetLoadsRequest.FromString,
                response_serializer=sglang_scheduler_pb2.GetLoadsResponse.SerializeToString,
            ),
            "SubscribeKvEvents": grpc.unary_stream_rpc_method_handler(
                self.SubscribeKvEvents,
                request_deserializer=common_pb2.SubscribeKvEventsRequest.FromString,
                response_serializer=common_pb2.KvEventBatch.SerializeToString,
            ),
        }


def _content_key(load: RankLoad) -> Hashable:
    # Everything a record carries but its age and sample number.
    return engine_load(load, age_ms=0, sample=0).SerializeToString(deterministic=True)


def add_load_servicers(
    server: grpc.aio.Server,
    source: SnapshotSource,
    *,
    engine: scheduler_grpc.SglangSchedulerServicer | None = None,
    version: str | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
) -> LoadServicer:
    """Serve ``GetLoads`` and ``SubscribeKvEvents`` from ``source`` on ``server``.

    Call it before ``server.start()``, after the engine registered its own ``SglangScheduler``
    servicer (the last registration of a method wins), or pass that servicer as ``engine``.

    Parameters
    ----------
    server:
        The engine's ``grpc.aio`` server.
    source:
        Where the loads come from, e.g. an :class:`~loadsnap.ShmReader`.
    engine:
        The engine's servicer for every other RPC, registered here first.
    version, poll_interval_s, min_interval_s, heartbeat_s:
        See :class:`LoadServicer`.

    Returns
    -------
    LoadServicer
        The servicer, for its ``stats``.

    Raises
    ------
    UsageError
        Intervals out of range.
    """
    servicer = LoadServicer(
        source,
        version=version,
        poll_interval_s=poll_interval_s,
        min_interval_s=min_interval_s,
        heartbeat_s=heartbeat_s,
    )
    if engine is not None:
        scheduler_grpc.add_SglangSchedulerServicer_to_server(engine, server)  # type: ignore[no-untyped-call]
    server.add_registered_method_handlers(SERVICE, servicer.method_handlers())
    return servicer
