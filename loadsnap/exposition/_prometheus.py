"""Prometheus text (0.0.4) and OpenMetrics (1.0.0) of slot reads, through prometheus_client.

Theory of operation: :func:`load_families` turns reads into prometheus_client metric families
(a pure function), and :func:`render_prometheus` has prometheus_client's own encoders write
them, the same engine behind ``/metrics``. The figures come from the ``/v1/loads`` document
(:mod:`._document`), so the Prometheus view shows the same ranks and the same numbers as the
JSON:

* **load figures**, only for the ranks in the document's ``loads`` (fresh ranks: a stale or
  dead rank's last load must not look current to a scraper). :data:`CORE_METRICS` lists each
  once with its two names: ``native`` (any prefix, default ``loadsnap_``: base units, ratios
  named ``_ratio``/``_perc``, and the Gateway API Inference Extension's names for its three
  signals) and ``reference`` (the ``sglang_`` prefix: sglang's names, which are the document's
  keys). Sections follow sglang: ``<prefix><selector>_<field>`` for each numeric field of the
  document's section (``sglang_memory_weight_gb``, ``sglang_spec_accept_rate``,
  ``sglang_disagg_kv_transfer_latency_ms``...); the native scheme converts the GB and ms
  figures to base units (:data:`NATIVE_SECTION_FIELDS`). ``<prefix>disagg_mode{mode}`` is 1.
* **freshness figures** for every rank with a readable record: age, last publish time, publish
  and cycle counters, writer epoch; and ``<prefix>rank_status{status}`` for every rank.

Families are in table order, samples by rank; prometheus_client sorts the labels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from loadsnap.errors import UsageError
from loadsnap.exposition._document import DOCUMENT_SECTIONS, GIB, build_document
from loadsnap.exposition._sglang import LoadsDocument, RankLoad, field_help
from loadsnap.reading import SlotRead, SlotStatus
from loadsnap.schema import parse_include

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "CORE_METRICS",
    "NATIVE_SECTION_FIELDS",
    "MetricSpec",
    "Naming",
    "NativeField",
    "load_families",
    "render_prometheus",
]

CONTENT_TYPE_TEXT: Final[str] = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS: Final[str] = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Naming = Literal["native", "reference"]
MetricKind = Literal["gauge", "counter"]
Number = int | float

_METRIC_NAME_RE: Final = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS: Final[frozenset[str]] = frozenset({"dp_rank", "status", "mode"})


@dataclass(frozen=True)
class MetricSpec:
    """One per-rank metric: names in both schemes, type, HELP and unit.

    A load figure (``value`` None) is the document field ``reference`` of each rank in
    ``loads``; a freshness figure reads ``value(read)`` for every rank with a record.
    """

    native: str
    reference: str
    kind: MetricKind
    help: str
    value: Callable[[SlotRead], Number | None] | None = None
    unit: str = ""

    @property
    def load(self) -> bool:
        """Whether this is a load figure (exported for the document's ``loads`` only)."""
        return self.value is None


def _load(native: str, key: str, help_text: str = "") -> MetricSpec:
    return MetricSpec(native, key, "gauge", help_text or field_help(RankLoad, key))


def _snap(get: Callable[[SlotRead], Number | None]) -> Callable[[SlotRead], Number | None]:
    def value(read: SlotRead) -> Number | None:
        return None if read.snapshot is None else get(read)

    return value


CORE_METRICS: Final[tuple[MetricSpec, ...]] = (
    _load("num_requests_running", "num_running_reqs", "Requests in the rank's running batch."),
    _load("num_requests_waiting", "num_waiting_reqs", "Requests queued on the rank, not running."),
    _load(
        "kv_cache_usage_perc",
        "token_usage",
        "KV-cache (token pool) utilization as a ratio from 0 to 1.",
    ),
    _load("num_waiting_uncached_tokens", "num_waiting_uncached_tokens"),
    _load("num_used_tokens", "num_used_tokens"),
    _load("num_total_tokens", "num_total_tokens"),
    _load("max_total_num_tokens", "max_total_num_tokens"),
    _load("max_running_requests", "max_running_requests"),
    _load(
        "gen_throughput_tokens_per_second",
        "gen_throughput",
        "Recent generation throughput in tokens per second.",
    ),
    _load("cache_hit_ratio", "cache_hit_rate", "Prefix-cache hit ratio from 0 to 1."),
    _load("utilization_ratio", "utilization", "Rank utilization as a ratio from 0 to 1."),
    MetricSpec(
        "snapshot_age_seconds",
        "snapshot_age_seconds",
        "gauge",
        "Seconds since the rank's latest snapshot was published (reader's monotonic clock).",
        lambda read: read.age_s,
        unit="seconds",
    ),
    MetricSpec(
        "last_publish_timestamp_seconds",
        "last_publish_timestamp_seconds",
        "gauge",
        "Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.",
        _snap(lambda read: read.snapshot.publish_wall_ns / 1e9 if read.snapshot else None),
        unit="seconds",
    ),
    MetricSpec(
        "publishes_total",
        "publishes_total",
        "counter",
        "Snapshots published into the rank's slot (the record sequence).",
        _snap(lambda read: read.seq),
    ),
    MetricSpec(
        "scheduler_cycles_total",
        "scheduler_cycles_total",
        "counter",
        "Scheduler loop iterations reported by the rank.",
        _snap(lambda read: read.snapshot.cycle if read.snapshot else None),
    ),
    MetricSpec(
        "accepted_dispatches_total",
        "accepted_dispatches_total",
        "counter",
        "Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).",
        _snap(lambda read: read.snapshot.last_accepted_dispatch_seq if read.snapshot else None),
    ),
    MetricSpec(
        "writer_epoch",
        "writer_epoch",
        "gauge",
        "Times a writer has attached to the rank's slot; a change means a restart.",
        _snap(lambda read: read.epoch),
    ),
)


@dataclass(frozen=True)
class NativeField:
    """A section field's native name when sglang's is not in base units."""

    name: str
    factor: float
    unit: str
    help: str


# (selector, field) -> its native form. Every other numeric field keeps its sglang name.
NATIVE_SECTION_FIELDS: Final[dict[tuple[str, str], NativeField]] = {
    ("memory", "weight_gb"): NativeField("weight_bytes", GIB, "bytes", "Model weight memory."),
    ("memory", "kv_cache_gb"): NativeField("kv_cache_bytes", GIB, "bytes", "KV cache memory."),
    ("memory", "graph_gb"): NativeField("graph_bytes", GIB, "bytes", "CUDA graph memory."),
    ("spec", "accept_rate"): NativeField(
        "accept_ratio", 1.0, "", "Speculative acceptance ratio from 0 to 1."
    ),
    ("lora", "utilization"): NativeField(
        "utilization_ratio", 1.0, "", "LoRA pool utilization ratio from 0 to 1."
    ),
    ("disagg", "kv_transfer_speed_gb_s"): NativeField(
        "kv_transfer_bytes_per_second", GIB, "", "KV transfer speed in bytes per second."
    ),
    ("disagg", "kv_transfer_latency_ms"): NativeField(
        "kv_transfer_latency_seconds", 1e-3, "seconds", "KV transfer latency."
    ),
}


def _check_names(prefix: str, const_labels: Mapping[str, str]) -> dict[str, str]:
    if prefix and not _METRIC_NAME_RE.match(prefix):
        raise UsageError(f"invalid metric prefix: prefix={prefix!r}; use [a-zA-Z_:][a-zA-Z0-9_:]*")
    for name in const_labels:
        if not _LABEL_NAME_RE.match(name) or name.startswith("__") or name in _RESERVED_LABELS:
            raise UsageError(
                f"invalid constant label name: name={name!r}; use [a-zA-Z_][a-zA-Z0-9_]*, "
                f"not starting with __ and not one of {', '.join(sorted(_RESERVED_LABELS))}"
            )
    return {name: str(value) for name, value in const_labels.items()}


class _Families:
    """Builds families with the constant labels; drops empty ones."""

    def __init__(self, const: dict[str, str]) -> None:
        self.const = const
        self.out: list[Metric] = []

    def add(
        self,
        name: str,
        kind: MetricKind,
        help_text: str,
        unit: str,
        samples: Sequence[tuple[dict[str, str], Number]],
    ) -> None:
        if not samples:
            return
        labels = sorted({*self.const, *(key for extra, _ in samples for key in extra)})
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
        else:
            family = GaugeMetricFamily(name, help_text, labels=labels, unit=unit)
        for extra, value in samples:
            values = {**self.const, **extra}
            family.add_metric([values[label] for label in labels], value)
        self.out.append(family)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector interface."""
        return iter(self.out)


def load_families(
    reads: Iterable[SlotRead],
    prefix: str = "loadsnap_",
    const_labels: Mapping[str, str] | None = None,
    *,
    include: str | Iterable[str] = "core",
    naming: Naming | None = None,
) -> list[Metric]:
    """Per-rank load and freshness figures as prometheus_client families (a pure function).

    Raises
    ------
    UsageError
        An invalid prefix or constant label name, or an unknown section in ``include``.
    """
    const = _check_names(prefix, const_labels or {})
    sections = parse_include(include)
    scheme: Naming = naming or ("reference" if prefix == "sglang_" else "native")
    ordered = sorted(reads, key=lambda r: r.rank)
    document: LoadsDocument = build_document(ordered, sections)
    out = _Families(const)
    for spec in CORE_METRICS:
        samples: list[tuple[dict[str, str], Number]] = []
        if spec.value is None:
            for load in document.loads:
                samples.append(({"dp_rank": str(load.dp_rank)}, getattr(load, spec.reference)))
        else:
            for read in ordered:
                value = spec.value(read)
                if value is not None:
                    samples.append(({"dp_rank": str(read.rank)}, value))
        name, help_text = spec.native, spec.help
        if scheme == "reference":
            name = spec.reference
            help_text = field_help(RankLoad, name) if spec.load else spec.help
        out.add(prefix + name, spec.kind, help_text, spec.unit, samples)
    out.add(
        prefix + "rank_status",
        "gauge",
        "1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).",
        "",
        [
            ({"dp_rank": str(read.rank), "status": status.label}, int(read.status is status))
            for read in ordered
            for status in SlotStatus
        ],
    )
    for section in DOCUMENT_SECTIONS:
        present = [
            (load.dp_rank, part)
            for load in document.loads
            if not isinstance(part := getattr(load, section.key), msgspec.UnsetType)
        ]
        for field in section.metrics.__struct_fields__:
            if field == "mode":
                continue
            name, factor, unit = f"{section.stem}_{field}", 1.0, ""
            help_text = field_help(section.metrics, field)
            native = NATIVE_SECTION_FIELDS.get((section.selector, field))
            if scheme == "native" and native is not None:
                name, factor, unit = f"{section.stem}_{native.name}", native.factor, native.unit
                help_text = native.help
            samples = [
                (
                    {"dp_rank": str(rank)},
                    getattr(part, field) * factor if factor != 1.0 else getattr(part, field),
                )
                for rank, part in present
            ]
            out.add(prefix + name, "gauge", help_text, unit, samples)
        if section.selector == "disagg":
            out.add(
                prefix + "disagg_mode",
                "gauge",
                "1 for the rank's disaggregation mode.",
                "",
                [({"dp_rank": str(rank), "mode": part.mode}, 1) for rank, part in present],
            )
    return out.out


def render_prometheus(
    reads: Iterable[SlotRead],
    prefix: str = "loadsnap_",
    const_labels: Mapping[str, str] | None = None,
    openmetrics: bool = False,
    *,
    include: str | Iterable[str] = "core",
    naming: Naming | None = None,
) -> str:
    """Render reads as Prometheus text exposition (or OpenMetrics), deterministically.

    Every family has HELP and TYPE; every sample has a ``dp_rank`` label. A rank's status is
    exported as ``<prefix>rank_status{status=...}`` with one series per possible status (1 for
    the current one), so alerts can match on it.

    Parameters
    ----------
    reads:
        Slot reads from any :class:`~loadsnap.SnapshotSource`.
    prefix:
        Prepended to every metric name. ``sglang_`` selects sglang's names.
    const_labels:
        Labels added to every sample, e.g. ``{"instance": "a", "model": "m"}``.
    openmetrics:
        Render OpenMetrics 1.0.0 (counter families without ``_total``, ``UNIT``, ``# EOF``).
    include:
        Sections whose numeric fields are also exported (``<prefix><selector>_<field>``) for
        the ranks that carry them; ``core`` alone adds nothing.
    naming:
        ``native`` or ``reference``; default ``reference`` for the ``sglang_`` prefix.

    Raises
    ------
    UsageError
        An invalid prefix or constant label name, or an unknown section in ``include``.
    """
    families = _Families({})
    families.out = load_families(reads, prefix, const_labels, include=include, naming=naming)
    encode = generate_openmetrics if openmetrics else generate_latest
    return encode(families).decode()
