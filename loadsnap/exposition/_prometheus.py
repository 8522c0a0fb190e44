"""Prometheus text (0.0.4) and OpenMetrics (1.0.0) rendering of slot reads: pure functions.

Theory of operation: one table, :data:`CORE_METRICS`, lists every per-rank metric once with its
type, HELP text, unit and how to get its value from a :class:`~loadsnap.SlotRead`. Two naming
schemes share the table:

* ``native`` (any prefix, default ``loadsnap_``): base units in the names, ratios 0..1 named
  ``_ratio``/``_perc``, counters ending in ``_total``, and the Gateway API Inference Extension's
  recommended names for its three required signals (``num_requests_waiting``,
  ``num_requests_running``, ``kv_cache_usage_perc``).
* ``reference`` (chosen automatically for the ``sglang_`` prefix): the reference ``/v1/loads``
  endpoint's names (``sglang_num_running_reqs``, ``sglang_token_usage``, ...) for the fields it
  exports, so existing dashboards and scrapers keep working; loadsnap's freshness metrics are
  added under the same prefix.

Load gauges are emitted for fresh and stale ranks only: a dead rank's last load would otherwise
look current to a scraper. Its age, publish counter and status stay visible. Output is
deterministic: families in table order, samples by rank, labels in a fixed order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from loadsnap.errors import UsageError
from loadsnap.exposition._json import USABLE_STATUSES
from loadsnap.reading import SlotRead, SlotStatus
from loadsnap.schema import LoadSnapshot, parse_include

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "CORE_METRICS",
    "MetricSpec",
    "Naming",
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
    """One per-rank metric: names in both schemes, type, HELP, unit and value getter."""

    native: str
    reference: str
    kind: MetricKind
    help: str
    value: Callable[[SlotRead], Number | None]
    unit: str = ""
    load: bool = True  # a load figure: emitted only for fresh and stale ranks


def _snap(getter: Callable[[LoadSnapshot], Number]) -> Callable[[SlotRead], Number | None]:
    def value(read: SlotRead) -> Number | None:
        return None if read.snapshot is None else getter(read.snapshot)

    return value


CORE_METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        "num_requests_running",
        "num_running_reqs",
        "gauge",
        "Requests in the rank's running batch.",
        _snap(lambda s: s.num_running_reqs),
    ),
    MetricSpec(
        "num_requests_waiting",
        "num_waiting_reqs",
        "gauge",
        "Requests queued on the rank, not yet running.",
        _snap(lambda s: s.num_waiting_reqs),
    ),
    MetricSpec(
        "kv_cache_usage_perc",
        "token_usage",
        "gauge",
        "KV-cache (token pool) utilization as a ratio from 0 to 1.",
        _snap(lambda s: s.token_usage),
    ),
    MetricSpec(
        "num_waiting_uncached_tokens",
        "num_waiting_uncached_tokens",
        "gauge",
        "Uncached prompt tokens of waiting requests, still to prefill.",
        _snap(lambda s: s.num_waiting_uncached_tokens),
    ),
    MetricSpec(
        "num_used_tokens",
        "num_used_tokens",
        "gauge",
        "Tokens held in the KV cache.",
        _snap(lambda s: s.num_used_tokens),
    ),
    MetricSpec(
        "num_total_tokens",
        "num_total_tokens",
        "gauge",
        "Tokens in use plus tokens pending prefill.",
        _snap(lambda s: s.num_total_tokens),
    ),
    MetricSpec(
        "max_total_num_tokens",
        "max_total_num_tokens",
        "gauge",
        "KV-cache capacity in tokens.",
        _snap(lambda s: s.max_total_num_tokens),
    ),
    MetricSpec(
        "max_running_requests",
        "max_running_requests",
        "gauge",
        "Most requests the rank runs at once.",
        _snap(lambda s: s.max_running_requests),
    ),
    MetricSpec(
        "gen_throughput_tokens_per_second",
        "gen_throughput",
        "gauge",
        "Recent generation throughput in tokens per second.",
        _snap(lambda s: s.gen_throughput),
    ),
    MetricSpec(
        "cache_hit_ratio",
        "cache_hit_rate",
        "gauge",
        "Prefix-cache hit ratio from 0 to 1.",
        _snap(lambda s: s.cache_hit_rate),
    ),
    MetricSpec(
        "utilization_ratio",
        "utilization",
        "gauge",
        "Rank utilization as a ratio from 0 to 1.",
        _snap(lambda s: s.utilization),
    ),
    MetricSpec(
        "snapshot_age_seconds",
        "snapshot_age_seconds",
        "gauge",
        "Seconds since the rank's latest snapshot was published (reader's monotonic clock).",
        lambda read: read.age_s,
        unit="seconds",
        load=False,
    ),
    MetricSpec(
        "last_publish_timestamp_seconds",
        "last_publish_timestamp_seconds",
        "gauge",
        "Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.",
        _snap(lambda s: s.publish_wall_ns / 1e9),
        unit="seconds",
        load=False,
    ),
    MetricSpec(
        "publishes_total",
        "publishes_total",
        "counter",
        "Snapshots published into the rank's slot (the record sequence).",
        lambda read: read.seq if read.snapshot is not None else None,
        load=False,
    ),
    MetricSpec(
        "scheduler_cycles_total",
        "scheduler_cycles_total",
        "counter",
        "Scheduler loop iterations reported by the rank.",
        _snap(lambda s: s.cycle),
        load=False,
    ),
    MetricSpec(
        "accepted_dispatches_total",
        "accepted_dispatches_total",
        "counter",
        "Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).",
        _snap(lambda s: s.last_accepted_dispatch_seq),
        load=False,
    ),
    MetricSpec(
        "writer_epoch",
        "writer_epoch",
        "gauge",
        "Times a writer has attached to the rank's slot; a change means a restart.",
        lambda read: read.epoch if read.snapshot is not None else None,
        load=False,
    ),
)

# Section selector -> (attribute, [(field, kind, help, unit)]). Names: <prefix><selector>_<field>.
_SECTION_METRICS: Final[dict[str, tuple[str, tuple[tuple[str, str, str], ...]]]] = {
    "memory": (
        "memory",
        (
            ("weight_bytes", "Device memory held by model weights, in bytes.", "bytes"),
            ("kv_cache_bytes", "Device memory held by the KV cache, in bytes.", "bytes"),
            ("activation_bytes", "Device memory held by activations, in bytes.", "bytes"),
            ("device_total_bytes", "Device memory in total, in bytes.", "bytes"),
            ("device_used_bytes", "Device memory in use, in bytes.", "bytes"),
            ("kv_token_capacity", "KV-cache capacity in tokens.", ""),
        ),
    ),
    "spec": (
        "speculative",
        (
            ("num_draft_tokens", "Draft tokens proposed per step.", ""),
            ("accept_length", "Mean accepted draft length per step.", ""),
            ("accept_rate", "Draft acceptance ratio from 0 to 1.", ""),
        ),
    ),
    "lora": (
        "lora",
        (
            ("max_loaded_adapters", "Most LoRA adapters the rank holds at once.", ""),
            ("loaded_adapters", "LoRA adapters currently loaded.", ""),
        ),
    ),
    "disagg": (
        "disaggregation",
        (
            ("num_prealloc_queue_reqs", "Requests in the disaggregation prealloc queue.", ""),
            ("num_transfer_queue_reqs", "Requests in the KV transfer queue.", ""),
            ("num_bootstrap_queue_reqs", "Requests in the bootstrap queue.", ""),
            ("num_inflight_queue_reqs", "Requests with a KV transfer in flight.", ""),
        ),
    ),
    "queues": (
        "queues",
        (
            ("num_grammar_queue_reqs", "Requests waiting for grammar compilation.", ""),
            ("num_paused_reqs", "Requests paused (e.g. by a weight update).", ""),
            ("num_retracted_reqs", "Requests retracted to free KV cache.", ""),
            ("num_chunked_prefill_reqs", "Requests in chunked prefill.", ""),
            ("num_prefill_reqs", "Requests in prefill.", ""),
            ("num_decode_reqs", "Requests in decode.", ""),
        ),
    ),
}


def _format_value(value: Number) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    """Accumulates families; knows the text vs OpenMetrics differences."""

    def __init__(self, openmetrics: bool, const_labels: Sequence[tuple[str, str]]) -> None:
        self.lines: list[str] = []
        self.openmetrics = openmetrics
        self.const = "".join(f'{name}="{_escape(value)}",' for name, value in const_labels)

    def family(
        self,
        name: str,
        kind: MetricKind,
        help_text: str,
        unit: str,
        samples: Sequence[tuple[str, Number]],
    ) -> None:
        # ``samples``: (rendered extra labels without braces, value). Empty families are omitted.
        if not samples:
            return
        family = name
        if self.openmetrics and kind == "counter" and name.endswith("_total"):
            family = name[: -len("_total")]
        self.lines.append(f"# HELP {family} {help_text}")
        self.lines.append(f"# TYPE {family} {kind}")
        if self.openmetrics and unit and family.endswith("_" + unit):
            self.lines.append(f"# UNIT {family} {unit}")
        for labels, value in samples:
            inner = (self.const + labels).rstrip(",")
            self.lines.append(f"{name}{{{inner}}} {_format_value(value)}")

    def text(self) -> str:
        if self.openmetrics:
            self.lines.append("# EOF")
        return "\n".join(self.lines) + "\n"


def _check_names(prefix: str, const_labels: Mapping[str, str]) -> list[tuple[str, str]]:
    if prefix and not _METRIC_NAME_RE.match(prefix):
        raise UsageError(f"invalid metric prefix: prefix={prefix!r}; use [a-zA-Z_:][a-zA-Z0-9_:]*")
    checked = []
    for name in sorted(const_labels):
        if not _LABEL_NAME_RE.match(name) or name.startswith("__") or name in _RESERVED_LABELS:
            raise UsageError(
                f"invalid constant label name: name={name!r}; use [a-zA-Z_][a-zA-Z0-9_]*, "
                f"not starting with __ and not one of {', '.join(sorted(_RESERVED_LABELS))}"
            )
        checked.append((name, str(const_labels[name])))
    return checked


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

    Every family has HELP and TYPE; every sample has a ``dp_rank`` label after the constant
    labels. A rank's status is exported as ``<prefix>rank_status{status=...}`` with one series
    per possible status (1 for the current one), so alerts can match on it.

    Parameters
    ----------
    reads:
        Slot reads from any :class:`~loadsnap.SnapshotSource`.
    prefix:
        Prepended to every metric name. ``sglang_`` selects the reference naming scheme.
    const_labels:
        Labels added to every sample, e.g. ``{"instance": "a", "model": "m"}``.
    openmetrics:
        Render OpenMetrics 1.0.0 (counter families without ``_total``, ``UNIT``, ``# EOF``).
    include:
        Sections whose numeric fields are also exported (``<prefix><section>_<field>``) for
        the ranks that carry them; ``core`` alone adds nothing.
    naming:
        ``native`` or ``reference``; default ``reference`` for the ``sglang_`` prefix.

    Raises
    ------
    UsageError
        An invalid prefix or constant label name, or an unknown section in ``include``.
    """
    labels = _check_names(prefix, const_labels or {})
    sections = parse_include(include)
    scheme: Naming = naming or ("reference" if prefix == "sglang_" else "native")
    ordered = sorted(reads, key=lambda r: r.rank)
    out = _Writer(openmetrics, labels)
    for spec in CORE_METRICS:
        samples: list[tuple[str, Number]] = []
        for read in ordered:
            if spec.load and read.status not in USABLE_STATUSES:
                continue
            value = spec.value(read)
            if value is not None:
                samples.append((f'dp_rank="{read.rank}"', value))
        name = spec.native if scheme == "native" else spec.reference
        out.family(prefix + name, spec.kind, spec.help, spec.unit, samples)
    status_samples: list[tuple[str, Number]] = [
        (f'dp_rank="{read.rank}",status="{status.label}"', int(read.status is status))
        for read in ordered
        for status in SlotStatus
    ]
    out.family(
        prefix + "rank_status",
        "gauge",
        "1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).",
        "",
        status_samples,
    )
    usable = [r for r in ordered if r.status in USABLE_STATUSES and r.snapshot is not None]
    for selector, (attribute, fields) in _SECTION_METRICS.items():
        if selector not in sections:
            continue
        present = [(r.rank, getattr(r.snapshot, attribute)) for r in usable]
        present = [(rank, section) for rank, section in present if section is not None]
        for field, help_text, unit in fields:
            samples = []
            for rank, section in present:
                value = getattr(section, field)
                number = len(value) if isinstance(value, list) else value
                samples.append((f'dp_rank="{rank}"', number))
            out.family(f"{prefix}{selector}_{field}", "gauge", help_text, unit, samples)
        if selector == "disagg":
            modes: list[tuple[str, Number]] = [
                (f'dp_rank="{rank}",mode="{_escape(section.mode)}"', 1) for rank, section in present
            ]
            out.family(
                f"{prefix}disagg_mode", "gauge", "1 for the rank's disaggregation mode.", "", modes
            )
    return out.text()
