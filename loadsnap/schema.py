"""The ``LoadSnapshot`` wire schema.

Schema evolution rule: **append fields with defaults only.** Never rename, reorder, retype or
remove a field; a new field always has a default so that an old writer's bytes still decode
with a new reader (msgspec fills the default) and a new writer's bytes decode with an old
reader (msgspec ignores unknown map keys). Structs are encoded as msgpack maps, not arrays,
for exactly that reason.

The structs are declared ``gc=False``: they hold only numbers, strings and lists of strings,
so they never form reference cycles and the garbage collector need not track them. A reader
decoding a thousand snapshots at once then triggers no collections (with tracking, those cost
about as much again as the decoding itself).

Value constraints (counts >= 0, ratios in 0..1, no NaN) are part of the type: msgspec enforces
them on every typed decode, so every reader and collector rejects bad values. Writers refuse
them before publishing (:func:`loadsnap.wire.check_publishable`), so a bad value never blanks
a rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Final

import msgspec

from loadsnap.errors import UsageError

__all__ = [
    "CORE_FIELDS",
    "SECTIONS",
    "SECTION_FIELDS",
    "DisaggregationSection",
    "LoadSnapshot",
    "LoraSection",
    "MemorySection",
    "QueueSection",
    "SpeculativeSection",
    "parse_include",
    "validate_snapshot",
]

Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# Rates are finite and non-negative; the upper bound also rejects +inf.
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
ShortText = Annotated[str, msgspec.Meta(max_length=128)]
# sglang's figures in sglang's own units (GB = 2**30 bytes, ms), appended to the sections under
# sglang's names: None means the writer did not report it, and /v1/loads derives the figure
# from loadsnap's own fields instead (loadsnap.exposition.document holds that mapping).
Reported = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)] | None
ReportedCount = Count | None


class MemorySection(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Device memory figures, in bytes."""

    weight_bytes: Count = 0
    kv_cache_bytes: Count = 0
    activation_bytes: Count = 0
    device_total_bytes: Count = 0
    device_used_bytes: Count = 0
    kv_token_capacity: Count = 0
    # Appended, sglang's names and units (None: derived from the byte figures above).
    weight_gb: Reported = None
    kv_cache_gb: Reported = None
    graph_gb: Reported = None
    token_capacity: ReportedCount = None


class SpeculativeSection(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Speculative decoding acceptance."""

    num_draft_tokens: Count = 0
    accept_length: Rate = 0.0
    accept_rate: Ratio = 0.0
    # Appended, sglang's later fields.
    draft_occupancy_rate: Ratio | None = None
    proposed_draft_length: Reported = None


class LoraSection(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """LoRA adapters resident on the rank."""

    max_loaded_adapters: Count = 0
    loaded_adapters: Annotated[list[ShortText], msgspec.Meta(max_length=256)] = []
    # Appended, sglang's names (None: derived from the adapter list and its maximum).
    slots_used: ReportedCount = None
    slots_total: ReportedCount = None
    utilization: Ratio | None = None


class DisaggregationSection(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Prefill/decode disaggregation queues."""

    mode: ShortText = "null"
    num_prealloc_queue_reqs: Count = 0
    num_transfer_queue_reqs: Count = 0
    num_bootstrap_queue_reqs: Count = 0
    num_inflight_queue_reqs: Count = 0
    # Appended, sglang's names and units (None: derived from the queue counts above, 0 for
    # the figures loadsnap has no field for).
    prefill_prealloc_queue_reqs: ReportedCount = None
    prefill_inflight_queue_reqs: ReportedCount = None
    decode_prealloc_queue_reqs: ReportedCount = None
    decode_transfer_queue_reqs: ReportedCount = None
    decode_retracted_queue_reqs: ReportedCount = None
    kv_transfer_speed_gb_s: Reported = None
    kv_transfer_latency_ms: Reported = None
    # sglang's later name for prefill_prealloc_queue_reqs.
    prefill_bootstrap_queue_reqs: ReportedCount = None


class QueueSection(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Breakdown of requests that are neither running nor plainly waiting."""

    num_grammar_queue_reqs: Count = 0
    num_paused_reqs: Count = 0
    num_retracted_reqs: Count = 0
    num_chunked_prefill_reqs: Count = 0
    num_prefill_reqs: Count = 0
    num_decode_reqs: Count = 0
    # Appended, sglang's names (None: derived from the counts above where they exist).
    waiting: ReportedCount = None
    grammar: ReportedCount = None
    paused: ReportedCount = None
    retracted: ReportedCount = None
    prealloc_ready: ReportedCount = None


class LoadSnapshot(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One DP rank's load at one instant. A plain mutable struct: ``publish`` stamps ``seq``,
    ``epoch`` and the publish times into the object it is given.

    Core fields match the reference ``/v1/loads`` names. Identity and freshness fields
    (``seq``, ``epoch``, ``publish_mono_ns``, ``publish_wall_ns``) are stamped by the writer at
    publish; ``cycle`` and ``last_accepted_dispatch_seq`` come from the scheduler.
    """

    dp_rank: Count
    num_running_reqs: Count = 0
    num_waiting_reqs: Count = 0
    num_waiting_uncached_tokens: Count = 0
    num_used_tokens: Count = 0
    num_total_tokens: Count = 0
    max_total_num_tokens: Count = 0
    max_running_requests: Count = 0
    token_usage: Ratio = 0.0
    gen_throughput: Rate = 0.0
    cache_hit_rate: Ratio = 0.0
    utilization: Ratio = 0.0
    # Identity and freshness.
    seq: Count = 0
    cycle: Count = 0
    publish_mono_ns: Count = 0
    publish_wall_ns: Count = 0
    epoch: Count = 0
    last_accepted_dispatch_seq: Count = 0
    # Optional sections.
    memory: MemorySection | None = None
    speculative: SpeculativeSection | None = None
    lora: LoraSection | None = None
    disaggregation: DisaggregationSection | None = None
    queues: QueueSection | None = None
    # sglang's later core fields (appended; see loadsnap.compat.sglang).
    timestamp: float = 0.0  # the scheduler's own wall-clock stamp, in seconds
    num_active_tokens: Count = 0  # num_total_tokens minus tokens awaiting a KV transfer
    total_prefill_uncached_tokens: Count = 0  # cumulative
    total_prefill_busy_us: Count = 0  # cumulative
    decode_moments: Annotated[list[float], msgspec.Meta(max_length=64)] | None = None

    # sglang's selector names, for code written against its LoadSnapshot.
    VALID_SECTIONS: ClassVar[frozenset[str]] = frozenset(
        {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
    )

    def to_dict(self, include: str | Iterable[str] | None = "core") -> dict[str, Any]:
        """Return a JSON-ready dict of the selected sections.

        Parameters
        ----------
        include:
            Section selectors, as an iterable or a comma-separated string: any of
            ``core, memory, spec, lora, disagg, queues, all``; None means ``all`` (sglang's
            convention). ``core`` (the default) is the flat load fields plus identity; a
            section the writer did not fill is left out, as sglang's ``to_dict`` does.

        Raises
        ------
        UsageError
            An unknown selector; the message lists the valid ones.
        """
        return snapshot_to_dict(self, parse_include("all" if include is None else include))


CORE_FIELDS: Final[tuple[str, ...]] = tuple(
    name
    for name in LoadSnapshot.__struct_fields__
    if name not in ("memory", "speculative", "lora", "disaggregation", "queues")
)
# Selector -> attribute name of the section (``core`` is the flat fields).
SECTION_FIELDS: Final[dict[str, str]] = {
    "memory": "memory",
    "spec": "speculative",
    "lora": "lora",
    "disagg": "disaggregation",
    "queues": "queues",
}
SECTIONS: Final[tuple[str, ...]] = ("core", *SECTION_FIELDS, "all")


def parse_include(include: str | Iterable[str]) -> frozenset[str]:
    """Normalise an include selector to a set of section names (``all`` expanded).

    Raises
    ------
    UsageError
        An unknown or empty selector; the message lists the valid ones.
    """
    items = include.split(",") if isinstance(include, str) else list(include)
    names = {item.strip().lower() for item in items if item.strip()}
    unknown = sorted(names.difference(SECTIONS))
    if unknown or not names:
        found = ",".join(unknown) if unknown else "<empty>"
        raise UsageError(f"include: unknown section {found}; valid: {', '.join(SECTIONS)}")
    if "all" in names:
        return frozenset(SECTIONS[:-1])
    return frozenset(names)


def snapshot_to_dict(snapshot: LoadSnapshot, sections: frozenset[str]) -> dict[str, Any]:
    """Render ``snapshot`` for the already parsed ``sections`` (see :func:`parse_include`)."""
    out: dict[str, Any] = {}
    if "core" in sections:
        for name in CORE_FIELDS:
            out[name] = getattr(snapshot, name)
    else:
        out["dp_rank"] = snapshot.dp_rank
    for selector, attribute in SECTION_FIELDS.items():
        if selector in sections:
            value = getattr(snapshot, attribute)
            if value is not None:
                out[attribute] = msgspec.to_builtins(value)
    return out


def validate_snapshot(snapshot: LoadSnapshot, dp_size: int | None = None) -> None:
    """Check every constraint of the schema, plus ``dp_rank < dp_size`` when given.

    Raises
    ------
    UsageError
        The first violated constraint, with its path, e.g. ``Expected `float` <= 1.0 - at
        `$.token_usage```.
    """
    try:
        msgspec.convert(msgspec.to_builtins(snapshot), LoadSnapshot)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid snapshot: {exc}") from exc
    if dp_size is not None and snapshot.dp_rank >= dp_size:
        raise UsageError(f"dp_rank out of range: dp_rank={snapshot.dp_rank} dp_size={dp_size}")
