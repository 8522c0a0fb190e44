"""The ``/v1/loads`` document, modelled once: msgspec structs in sglang's names and units, and
the one mapping from loadsnap's snapshots to them.

Theory of operation. Routers parse ``/v1/loads`` as sglang serves it (SMG reads the envelope
``timestamp``, ``dp_rank_count``, ``loads[]`` and, per rank, the core keys as 32-bit integers
and doubles plus the ``memory`` and ``queues`` sections; its gRPC twin ``GetLoads`` carries the
same fields). So the document is defined here as structs in sglang's names, types and units,
and every exposition is derived from them: the JSON body is :class:`LoadsDocument` encoded by
msgspec, the OpenAPI schema of ``/v1/loads`` is ``msgspec.json.schema`` of it, the Prometheus
``sglang_`` names are its field names, the gRPC ``GetLoadsResponse`` and pushed ``EngineLoad``
records copy its fields (:mod:`loadsnap.grpc_loads`) and the legacy ``/get_load`` array is
computed from its ranks. Nothing else maps snapshot fields to sglang's.

**The mapping** (:func:`rank_load`): sglang's core keys are :class:`~loadsnap.LoadSnapshot`'s
fields of the same names; ``num_total_reqs`` is running plus waiting. A section figure comes
from the sglang-named field a writer appended to the section when it set it (not None), else
from loadsnap's own fields: ``memory.weight_gb`` = ``weight_bytes / 2**30``, ``kv_cache_gb`` =
``kv_cache_bytes / 2**30``, ``token_capacity`` = ``kv_token_capacity``; ``lora.slots_used`` =
the number of loaded adapters, ``slots_total`` = ``max_loaded_adapters``, ``utilization`` =
their ratio; ``disaggregation.prefill_prealloc_queue_reqs`` = ``num_bootstrap_queue_reqs`` (the
queue sglang reports under that name), ``prefill_inflight_queue_reqs`` =
``num_inflight_queue_reqs``, ``decode_prealloc_queue_reqs`` = ``num_prealloc_queue_reqs``,
``decode_transfer_queue_reqs`` = ``num_transfer_queue_reqs``; ``queues.waiting`` =
``num_waiting_reqs``, ``grammar``/``paused``/``retracted`` = ``num_grammar_queue_reqs``,
``num_paused_reqs``, ``num_retracted_reqs``. Figures loadsnap has no field for are 0.
Integers are clamped to 2**31 - 1, the 32-bit integers routers parse into (a larger value would
make SMG give up on ``/v1/loads`` for the worker's life).

**Which ranks a router sees** (:data:`ROUTABLE_STATUSES`): ``loads`` lists only the ranks whose
load is current (``fresh``: published within the staleness budget by a live writer). A rank
that is stale (no publish within the budget: hung, stopped, or a remote rank whose scheduler
died), dead (its writer is gone), never published, torn or invalid is listed in
``unavailable`` with its status, reason and age instead. A router that reads only the numbers
(SMG) therefore stops choosing a rank at its first poll after the rank's age passes the
budget, or after its death is seen; a status-aware client still sees every rank, in one list or
the other. A dead rank's frozen numbers are never presented as a load (a rank presented as
saturated would do worse: SMG flags a whole worker overloaded when one rank crosses its
thresholds). ``aggregate`` and ``dp_rank_count`` cover ``loads``, as in sglang.

Sections are included as sglang includes them: ``include`` selects sections (default ``all``),
the core keys are always present, and a section the writer did not fill is absent.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from loadsnap.exposition._sglang import (
    I32_MAX,
    Aggregate,
    DisaggregationMetrics,
    LegacyLoad,
    LoadsDocument,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    RankLoad,
    SpeculativeMetrics,
    UnavailableRank,
)
from loadsnap.reading import SlotRead, SlotStatus
from loadsnap.schema import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    SpeculativeSection,
    parse_include,
)

__all__ = [
    "DOCUMENT_SECTIONS",
    "GIB",
    "ROUTABLE_STATUSES",
    "DocumentSection",
    "build_document",
    "legacy_loads",
    "rank_load",
]

GIB: Final[float] = float(2**30)  # sglang's "GB": its memory figures divide bytes by 2**30

# The only ranks whose numbers a router may act on (see the module docstring).
ROUTABLE_STATUSES: Final[frozenset[SlotStatus]] = frozenset({SlotStatus.FRESH})

# --- the mapping --------------------------------------------------------------------------------


def _i32(value: int) -> int:
    return value if value <= I32_MAX else I32_MAX


def _count(reported: int | None, derived: int) -> int:
    return _i32(derived if reported is None else reported)


def _real(reported: float | None, derived: float) -> float:
    return derived if reported is None else reported


def memory_metrics(section: MemorySection, snapshot: LoadSnapshot) -> MemoryMetrics:
    """sglang's ``memory`` for ``section``."""
    return MemoryMetrics(
        weight_gb=_real(section.weight_gb, section.weight_bytes / GIB),
        kv_cache_gb=_real(section.kv_cache_gb, section.kv_cache_bytes / GIB),
        graph_gb=_real(section.graph_gb, 0.0),
        token_capacity=_count(section.token_capacity, section.kv_token_capacity),
    )


def speculative_metrics(section: SpeculativeSection, snapshot: LoadSnapshot) -> SpeculativeMetrics:
    """sglang's ``speculative`` for ``section``."""
    return SpeculativeMetrics(accept_length=section.accept_length, accept_rate=section.accept_rate)


def lora_metrics(section: LoraSection, snapshot: LoadSnapshot) -> LoRAMetrics:
    """sglang's ``lora`` for ``section``."""
    used = _count(section.slots_used, len(section.loaded_adapters))
    total = _count(section.slots_total, section.max_loaded_adapters)
    derived = min(1.0, used / total) if total else 0.0
    return LoRAMetrics(
        slots_used=used, slots_total=total, utilization=_real(section.utilization, derived)
    )


def disaggregation_metrics(
    section: DisaggregationSection, snapshot: LoadSnapshot
) -> DisaggregationMetrics:
    """sglang's ``disaggregation`` for ``section``."""
    return DisaggregationMetrics(
        mode=section.mode,
        prefill_prealloc_queue_reqs=_count(
            section.prefill_prealloc_queue_reqs, section.num_bootstrap_queue_reqs
        ),
        prefill_inflight_queue_reqs=_count(
            section.prefill_inflight_queue_reqs, section.num_inflight_queue_reqs
        ),
        decode_prealloc_queue_reqs=_count(
            section.decode_prealloc_queue_reqs, section.num_prealloc_queue_reqs
        ),
        decode_transfer_queue_reqs=_count(
            section.decode_transfer_queue_reqs, section.num_transfer_queue_reqs
        ),
        decode_retracted_queue_reqs=_count(section.decode_retracted_queue_reqs, 0),
        kv_transfer_speed_gb_s=_real(section.kv_transfer_speed_gb_s, 0.0),
        kv_transfer_latency_ms=_real(section.kv_transfer_latency_ms, 0.0),
    )


def queue_metrics(section: QueueSection, snapshot: LoadSnapshot) -> QueueMetrics:
    """sglang's ``queues`` for ``section`` (``waiting`` is the core waiting count)."""
    return QueueMetrics(
        waiting=_i32(snapshot.num_waiting_reqs),
        grammar=_i32(section.num_grammar_queue_reqs),
        paused=_i32(section.num_paused_reqs),
        retracted=_i32(section.num_retracted_reqs),
    )


@dataclass(frozen=True)
class DocumentSection:
    """One optional section: its ``include`` selector, its key (also the snapshot attribute),
    its sglang struct, its Prometheus name stem and how to compute it."""

    selector: str
    key: str
    metrics: type[msgspec.Struct]
    convert: Callable[[Any, LoadSnapshot], msgspec.Struct]

    @property
    def stem(self) -> str:
        """Prometheus name stem: sglang's ``<prefix><selector>_<field>``."""
        return self.selector


# In sglang's order. The selector doubles as sglang's Prometheus stem (spec_, disagg_).
DOCUMENT_SECTIONS: Final[tuple[DocumentSection, ...]] = (
    DocumentSection("memory", "memory", MemoryMetrics, memory_metrics),
    DocumentSection("spec", "speculative", SpeculativeMetrics, speculative_metrics),
    DocumentSection("lora", "lora", LoRAMetrics, lora_metrics),
    DocumentSection("disagg", "disaggregation", DisaggregationMetrics, disaggregation_metrics),
    DocumentSection("queues", "queues", QueueMetrics, queue_metrics),
)


def rank_load(read: SlotRead, sections: frozenset[str]) -> RankLoad:
    """The document's entry for ``read`` (which must carry a snapshot), with ``sections``.

    Raises
    ------
    ValueError
        ``read`` has no snapshot.
    """
    s = read.snapshot
    if s is None:
        raise ValueError(f"rank_load: dp_rank={read.rank} has no snapshot")
    parts: dict[str, Any] = {}
    for section in DOCUMENT_SECTIONS:
        value = getattr(s, section.key)
        if section.selector in sections and value is not None:
            parts[section.key] = section.convert(value, s)
    return RankLoad(
        dp_rank=_i32(s.dp_rank),
        num_running_reqs=_i32(s.num_running_reqs),
        num_waiting_reqs=_i32(s.num_waiting_reqs),
        num_waiting_uncached_tokens=_i32(s.num_waiting_uncached_tokens),
        num_used_tokens=_i32(s.num_used_tokens),
        num_total_tokens=_i32(s.num_total_tokens),
        max_total_num_tokens=_i32(s.max_total_num_tokens),
        max_running_requests=_i32(s.max_running_requests),
        token_usage=s.token_usage,
        gen_throughput=s.gen_throughput,
        cache_hit_rate=s.cache_hit_rate,
        utilization=s.utilization,
        num_total_reqs=_i32(s.num_running_reqs + s.num_waiting_reqs),
        seq=read.seq,
        epoch=read.epoch,
        cycle=s.cycle,
        last_accepted_dispatch_seq=s.last_accepted_dispatch_seq,
        publish_wall_ns=s.publish_wall_ns,
        age_seconds=0.0 if read.age_s is None else max(0.0, read.age_s),
        status=read.status.label,  # type: ignore[arg-type]
        reason=read.reason,
        **parts,
    )


def _aggregate(loads: list[RankLoad]) -> Aggregate:
    # sglang's keys and rounding.
    n = len(loads)
    running = sum(load.num_running_reqs for load in loads)
    waiting = sum(load.num_waiting_reqs for load in loads)
    if n == 0:
        return Aggregate(
            total_running_reqs=0,
            total_waiting_reqs=0,
            total_reqs=0,
            avg_token_usage=0.0,
            avg_throughput=0.0,
            avg_utilization=0.0,
        )
    return Aggregate(
        total_running_reqs=_i32(running),
        total_waiting_reqs=_i32(waiting),
        total_reqs=_i32(running + waiting),
        avg_token_usage=min(1.0, round(sum(load.token_usage for load in loads) / n, 4)),
        avg_throughput=round(sum(load.gen_throughput for load in loads) / n, 2),
        avg_utilization=min(1.0, round(sum(load.utilization for load in loads) / n, 4)),
    )


def _iso_utc(now_s: float) -> str:
    return datetime.datetime.fromtimestamp(now_s, tz=datetime.UTC).isoformat()


def build_document(
    reads: Iterable[SlotRead],
    include: str | Iterable[str] = "all",
    now: float = 0.0,
    *,
    version: str = "",
) -> LoadsDocument:
    """Build the ``/v1/loads`` document from slot reads: a pure function of its arguments.

    Parameters
    ----------
    reads:
        Slot reads from any :class:`~loadsnap.SnapshotSource`, in any order.
    include:
        Section selectors (``core, memory, spec, lora, disagg, queues, all``; sglang's default
        ``all``). The core keys are always present, as in sglang.
    now:
        Wall-clock time in seconds since the epoch, rendered as ``timestamp``.
    version:
        Producer version string.

    Raises
    ------
    UsageError
        An unknown section in ``include``; the message lists the valid ones.
    """
    sections = parse_include(include)
    loads: list[RankLoad] = []
    unavailable: list[UnavailableRank] = []
    for read in sorted(reads, key=lambda r: r.rank):
        if read.status in ROUTABLE_STATUSES and read.snapshot is not None:
            loads.append(rank_load(read, sections))
        else:
            unavailable.append(
                UnavailableRank(
                    dp_rank=_i32(read.rank),
                    status=read.status.label,  # type: ignore[arg-type]
                    reason=read.reason,
                    age_seconds=None if read.age_s is None else max(0.0, read.age_s),
                )
            )
    return LoadsDocument(
        timestamp=_iso_utc(now),
        version=version,
        dp_rank_count=len(loads),
        loads=loads,
        aggregate=_aggregate(loads),
        unavailable=unavailable,
    )


def legacy_loads(document: LoadsDocument) -> list[LegacyLoad]:
    """``GET /get_load`` for ``document``: sglang's ``GetLoadReqOutput`` per routable rank
    (requests running plus waiting, waiting requests, tokens in use plus pending prefill)."""
    return [
        LegacyLoad(
            dp_rank=load.dp_rank,
            num_reqs=load.num_total_reqs,
            num_waiting_reqs=load.num_waiting_reqs,
            num_tokens=load.num_total_tokens,
        )
        for load in document.loads
    ]
