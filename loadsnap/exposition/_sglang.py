"""The ``/v1/loads`` document's shape: msgspec structs in sglang's names, types and units.

The structs define the JSON body (encoded by msgspec), the OpenAPI schema (``msgspec.json``
schema of :class:`LoadsDocument`), the Prometheus ``sglang_`` names (the field names) and
their HELP texts (the field descriptions). What fills them is :mod:`._document`.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

__all__ = [
    "I32_MAX",
    "Aggregate",
    "DisaggregationMetrics",
    "LegacyLoad",
    "LoRAMetrics",
    "LoadsDocument",
    "MemoryMetrics",
    "QueueMetrics",
    "RankLoad",
    "SpeculativeMetrics",
    "StatusLabel",
    "UnavailableRank",
    "field_help",
]

I32_MAX: Final[int] = 2**31 - 1

I32 = Annotated[int, msgspec.Meta(ge=0, le=I32_MAX)]
U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Real = Annotated[float, msgspec.Meta(ge=0.0)]
StatusLabel = Literal["fresh", "stale", "dead", "never_published", "torn", "invalid"]


# --- sglang's sections, field for field -------------------------------------------------------


class MemoryMetrics(msgspec.Struct, kw_only=True):
    """sglang's ``memory`` section (GB = 2**30 bytes)."""

    weight_gb: Annotated[Real, Meta(description="Model weight memory in GB.")]
    kv_cache_gb: Annotated[Real, Meta(description="KV cache memory in GB.")]
    graph_gb: Annotated[Real, Meta(description="CUDA graph memory in GB.")]
    token_capacity: Annotated[I32, Meta(description="Max tokens in KV cache.")]


class SpeculativeMetrics(msgspec.Struct, kw_only=True):
    """sglang's ``speculative`` section."""

    accept_length: Annotated[Real, Meta(description="Avg accepted tokens per step.")]
    accept_rate: Annotated[Ratio, Meta(description="Speculative acceptance rate.")]


class LoRAMetrics(msgspec.Struct, kw_only=True):
    """sglang's ``lora`` section."""

    slots_used: Annotated[I32, Meta(description="LoRA adapter slots in use.")]
    slots_total: Annotated[I32, Meta(description="Total LoRA adapter slots.")]
    utilization: Annotated[Ratio, Meta(description="LoRA pool utilization ratio.")]


class DisaggregationMetrics(msgspec.Struct, kw_only=True):
    """sglang's ``disaggregation`` section."""

    mode: Annotated[str, Meta(description='Disaggregation mode: "prefill", "decode" or "null".')]
    prefill_prealloc_queue_reqs: Annotated[
        I32, Meta(description="Prefill prealloc queue requests.")
    ]
    prefill_inflight_queue_reqs: Annotated[
        I32, Meta(description="Prefill inflight queue requests.")
    ]
    decode_prealloc_queue_reqs: Annotated[I32, Meta(description="Decode prealloc queue requests.")]
    decode_transfer_queue_reqs: Annotated[I32, Meta(description="Decode transfer queue requests.")]
    decode_retracted_queue_reqs: Annotated[
        I32, Meta(description="Decode retracted queue requests.")
    ]
    kv_transfer_speed_gb_s: Annotated[Real, Meta(description="KV transfer speed in GB/s.")]
    kv_transfer_latency_ms: Annotated[Real, Meta(description="KV transfer latency in ms.")]


class QueueMetrics(msgspec.Struct, kw_only=True):
    """sglang's ``queues`` section."""

    waiting: Annotated[I32, Meta(description="Main waiting queue size.")]
    grammar: Annotated[I32, Meta(description="Grammar compilation queue size.")]
    paused: Annotated[I32, Meta(description="Requests paused by weight sync.")]
    retracted: Annotated[I32, Meta(description="Retracted requests count.")]


# --- the document -------------------------------------------------------------------------------


class RankLoad(msgspec.Struct, kw_only=True):
    """One routable rank: sglang's keys first, then loadsnap's additions."""

    dp_rank: Annotated[I32, Meta(description="Data-parallel rank.")]
    num_running_reqs: Annotated[I32, Meta(description="Number of running requests.")]
    num_waiting_reqs: Annotated[I32, Meta(description="Number of waiting requests.")]
    num_waiting_uncached_tokens: Annotated[
        I32, Meta(description="Number of uncached input tokens waiting for prefill compute.")
    ]
    num_used_tokens: Annotated[I32, Meta(description="Number of tokens in use.")]
    num_total_tokens: Annotated[I32, Meta(description="Used tokens plus pending prefill tokens.")]
    max_total_num_tokens: Annotated[I32, Meta(description="Maximum token capacity.")]
    max_running_requests: Annotated[I32, Meta(description="Maximum running requests capacity.")]
    token_usage: Annotated[Ratio, Meta(description="Token pool usage ratio.")]
    gen_throughput: Annotated[Real, Meta(description="Generation throughput tokens/sec.")]
    cache_hit_rate: Annotated[Ratio, Meta(description="Prefix cache hit rate.")]
    utilization: Annotated[Ratio, Meta(description="Overall utilization ratio.")]
    num_total_reqs: Annotated[I32, Meta(description="Running plus waiting requests.")]
    memory: MemoryMetrics | UnsetType = UNSET
    speculative: SpeculativeMetrics | UnsetType = UNSET
    lora: LoRAMetrics | UnsetType = UNSET
    disaggregation: DisaggregationMetrics | UnsetType = UNSET
    queues: QueueMetrics | UnsetType = UNSET
    # loadsnap's additions (sglang clients ignore them).
    seq: Annotated[U64, Meta(description="Record sequence of the rank's slot (publishes so far).")]
    epoch: Annotated[U64, Meta(description="Writer epoch; a change means the scheduler restarted.")]
    cycle: Annotated[U64, Meta(description="Scheduler loop iterations reported by the rank.")]
    last_accepted_dispatch_seq: Annotated[
        U64, Meta(description="Highest dispatch sequence the rank has absorbed.")
    ]
    publish_wall_ns: Annotated[
        U64, Meta(description="Wall-clock time of the publish, ns since the Unix epoch.")
    ]
    age_seconds: Annotated[
        Real, Meta(description="Seconds since the publish, on the reader's monotonic clock.")
    ]
    status: Annotated[
        StatusLabel, Meta(description="Freshness of the rank: fresh for every rank in loads.")
    ]
    reason: Annotated[str, Meta(description="Why the rank has that status; empty when fresh.")]


class UnavailableRank(msgspec.Struct, kw_only=True):
    """A rank whose load is not current: listed for status-aware clients, never routed to."""

    dp_rank: Annotated[I32, Meta(description="Data-parallel rank.")]
    status: Annotated[
        StatusLabel,
        Meta(description="Why the rank is not in loads: stale, dead, never_published..."),
    ]
    reason: Annotated[str, Meta(description="The reader's explanation, e.g. writer is gone.")]
    age_seconds: Annotated[
        Real | None, Meta(description="Seconds since its last publish; null if none readable.")
    ]


class Aggregate(msgspec.Struct, kw_only=True):
    """sglang's ``aggregate``, over the ranks in ``loads``."""

    total_running_reqs: I32
    total_waiting_reqs: I32
    total_reqs: I32
    avg_token_usage: Ratio
    avg_throughput: Real
    avg_utilization: Ratio


class LoadsDocument(msgspec.Struct, kw_only=True):
    """The ``GET /v1/loads`` JSON body."""

    timestamp: Annotated[str, Meta(description="ISO 8601 UTC time of the answer.")]
    version: Annotated[str, Meta(description="Producer version.")]
    dp_rank_count: Annotated[I32, Meta(description="Number of ranks in loads.")]
    loads: list[RankLoad]
    aggregate: Aggregate
    unavailable: list[UnavailableRank]


class LegacyLoad(msgspec.Struct, kw_only=True):
    """One element of ``GET /get_load``, the array sglang-router 0.3.x polls."""

    dp_rank: I32
    num_reqs: I32
    num_waiting_reqs: I32
    num_tokens: I32


def _descriptions(struct: type[msgspec.Struct]) -> dict[str, str]:
    schema = msgspec.json.schema(struct)
    properties = schema["$defs"][struct.__name__]["properties"]
    return {name: spec.get("description", "") for name, spec in properties.items()}


_DESCRIBED: Final[tuple[type[msgspec.Struct], ...]] = (
    RankLoad,
    MemoryMetrics,
    SpeculativeMetrics,
    LoRAMetrics,
    DisaggregationMetrics,
    QueueMetrics,
)
_HELP: Final[dict[type[msgspec.Struct], dict[str, str]]] = {
    struct: _descriptions(struct) for struct in _DESCRIBED
}


def field_help(struct: type[msgspec.Struct], name: str) -> str:
    """The description of field ``name`` of a document struct (its Prometheus HELP text)."""
    return _HELP[struct][name]
