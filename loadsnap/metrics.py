"""loadsnap's own health as a prometheus_client collector, with a hook for other components.

:class:`LoadsnapCollector` pulls everything at scrape time (nothing is updated on any hot path):
reader counters (reads, retries, CRC rejections of torn copies, torn reads, decode errors,
re-attaches), the segment's state, how many ranks are in each status, and per rank the publish
count and refused payloads. Other components add their counters with
:meth:`LoadsnapCollector.add_provider`, e.g. the DP controller's dispatches per rank and ledger
depth, or the ZMQ collector's drops::

    collector = LoadsnapCollector(source)
    collector.add_provider(
        "controller_dispatches_total", "Requests dispatched, per rank.", "counter",
        ("dp_rank",), lambda: {(str(r),): n for r, n in enumerate(controller.dispatched)},
    )
    registry.register(collector)   # or prometheus_client.REGISTRY

A provider that raises is skipped for that scrape and counted in
``loadsnap_metric_provider_errors_total``; a scrape never fails because of one.

The ZMQ collector's counters come through ``collector_stats`` (``loadsnap serve`` reads the
collector's stats file, see :mod:`loadsnap.collector_stats`) and render as
``loadsnap_collector_*`` families (:func:`collector_families`), present only while a collector
runs for the instance.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from loadsnap.collector_stats import DROP_REASONS, CollectorStatsRead
from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.reading import (
    ReaderStats,
    SegmentState,
    SlotRead,
    SlotStatus,
    SnapshotSource,
    unavailable_state,
)
from loadsnap.shm_reader import ShmReader

__all__ = ["LoadsnapCollector", "MetricProvider", "collector_families", "slot_refused_counts"]

ProviderKind = Literal["counter", "gauge"]
ProviderValues = Mapping[tuple[str, ...], float]

_NAME_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_READER_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    ("reads", "reader_reads_total", "Slot reads."),
    ("retries", "reader_retries_total", "Seqlock retries: the writer moved during a read."),
    (
        "crc_rejects",
        "reader_crc_rejects_total",
        "Record copies rejected by their CRC (torn records never reach a client).",
    ),
    ("torn", "reader_torn_reads_total", "Reads that found no consistent copy after retries."),
    ("decode_errors", "reader_decode_errors_total", "Consistent records that failed to decode."),
    ("reattaches", "reader_reattaches_total", "Re-attachments to a recreated segment."),
)


_COLLECTOR_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    ("received", "collector_frames_received_total", "Frames the ZMQ collector took in."),
    (
        "relayed",
        "collector_frames_relayed_total",
        "Snapshots the ZMQ collector wrote into the segment.",
    ),
    (
        "epoch_takeovers",
        "collector_epoch_takeovers_total",
        "Ranks whose lower epoch replaced one that had gone quiet (a restart on a host whose "
        "clock is behind).",
    ),
    ("connections", "collector_connections_total", "TCP connections the collector accepted."),
    (
        "disconnects",
        "collector_disconnects_total",
        "Peer connections closed, whatever the cause: writers that went away, failed "
        "handshakes, and writers libzmq cut off for a frame above max_message_bytes "
        "(MAXMSGSIZE), which libzmq reports as a plain disconnect.",
    ),
    (
        "handshakes",
        "collector_handshakes_total",
        "ZMTP handshakes completed (CURVE-authenticated when keys are on).",
    ),
)
_DROPPED_HELP: Final[str] = (
    "Frames the ZMQ collector received and dropped, by reason: oversized (snapshot above the "
    "slot's payload capacity), undecodable, invalid, wrong_instance (no instance, or another "
    "deployment's), rank_out_of_range, rank_not_allowed (CURVE key not bound to the rank), "
    "stale_epoch, out_of_order, relay_errors. Frames above max_message_bytes never arrive: "
    "see collector_disconnects_total."
)
_HANDSHAKE_FAILURES: Final[tuple[tuple[str, str], ...]] = (
    ("auth_rejected", "auth_rejected"),
    ("handshake_failed", "protocol"),
)


def collector_families(read: CollectorStatsRead, prefix: str = "loadsnap_") -> Iterator[Metric]:
    """The ZMQ collector's counters as Prometheus families (a pure function of ``read``)."""
    stats = read.stats
    for attribute, name, help_text in _COLLECTOR_COUNTERS:
        family = CounterMetricFamily(prefix + name[: -len("_total")], help_text)
        family.add_metric([], getattr(stats, attribute))
        yield family
    dropped = CounterMetricFamily(
        prefix + "collector_frames_dropped", _DROPPED_HELP, labels=["reason"]
    )
    for reason in DROP_REASONS:
        dropped.add_metric([reason], getattr(stats, reason))
    yield dropped
    failures = CounterMetricFamily(
        prefix + "collector_handshake_failures",
        "Handshakes the ZMQ collector refused, by kind: auth_rejected (CURVE key not on the "
        "allow-list), protocol (mechanism mismatch such as a writer without keys, a wrong "
        "server key, another ZMTP error).",
        labels=["kind"],
    )
    for attribute, kind in _HANDSHAKE_FAILURES:
        failures.add_metric([kind], getattr(stats, attribute))
    yield failures
    started = GaugeMetricFamily(
        prefix + "collector_start_time_seconds",
        "When the running ZMQ collector started (Unix time): its counters start from 0 then.",
    )
    started.add_metric([], read.started_wall_ns / 1e9)
    yield started


@dataclass(frozen=True)
class MetricProvider:
    """A metric family computed at scrape time by ``read`` (label values tuple -> value)."""

    name: str
    documentation: str
    kind: ProviderKind
    labelnames: tuple[str, ...]
    read: Callable[[], ProviderValues]


def slot_refused_counts(reader: ShmReader) -> list[int]:
    """Payloads refused for not fitting the slot, per rank, from the slots' control words.

    Not thread-safe (like the reader itself).

    Raises
    ------
    SegmentUnavailableError
        No readable segment.
    """
    return reader.refused_counts()


class LoadsnapCollector:
    """Collects loadsnap's health at scrape time. Safe from any thread if ``source`` is.

    Parameters
    ----------
    source:
        Where rank statuses and publish counts come from (wrap an :class:`ShmReader` in
        :class:`loadsnap.http.LockedSource` when it is shared between threads). ``None``: only
        providers are collected.
    stats:
        Returns the reader's counters (default: ``source.stats`` when it has them).
    refused:
        Returns refused payloads per rank, e.g. ``lambda: slot_refused_counts(reader)``.
    collector_stats:
        Returns the ZMQ collector's counters, or None while no collector runs, e.g.
        ``lambda: read_collector_stats(instance)``. A call that raises is counted in
        ``metric_provider_errors_total{provider="collector_stats"}``.
    prefix:
        Prepended to every metric name.
    """

    def __init__(
        self,
        source: SnapshotSource | None = None,
        *,
        stats: Callable[[], ReaderStats] | None = None,
        refused: Callable[[], Sequence[int]] | None = None,
        collector_stats: Callable[[], CollectorStatsRead | None] | None = None,
        prefix: str = "loadsnap_",
    ) -> None:
        if prefix and not _NAME_RE.match(prefix):
            raise UsageError(f"invalid metric prefix: prefix={prefix!r}")
        self.prefix = prefix
        self._source = source
        if stats is None and source is not None:
            own = getattr(source, "stats", None)
            if isinstance(own, ReaderStats):
                stats = lambda: own  # noqa: E731
        self._stats = stats
        self._refused = refused
        self._collector_stats = collector_stats
        self._providers: dict[str, MetricProvider] = {}
        self._lock = threading.Lock()
        self._provider_errors: dict[str, int] = {}

    def add_provider(
        self,
        name: str,
        documentation: str,
        kind: ProviderKind,
        labelnames: Sequence[str],
        read: Callable[[], ProviderValues],
    ) -> None:
        """Export another component's numbers as ``<prefix><name>``, read at each scrape.

        Parameters
        ----------
        name:
            Metric name after the prefix; counters must end in ``_total``.
        documentation:
            HELP text.
        kind:
            ``counter`` or ``gauge``.
        labelnames:
            Label names; ``read`` returns ``{label values tuple: value}``.
        read:
            Called at every scrape, from the scraping thread.

        Raises
        ------
        UsageError
            A bad or duplicate name, a counter without ``_total``, or an unknown kind.
        """
        if not _NAME_RE.match(name) or any(not _NAME_RE.match(label) for label in labelnames):
            raise UsageError(f"invalid metric or label name: name={name!r} labels={labelnames}")
        if kind not in ("counter", "gauge"):
            raise UsageError(f"unknown metric kind: kind={kind!r}; valid: counter, gauge")
        if kind == "counter" and not name.endswith("_total"):
            raise UsageError(f"counter names end in _total: name={name!r}")
        with self._lock:
            if name in self._providers:
                raise UsageError(f"metric provider already registered: name={name!r}")
            self._providers[name] = MetricProvider(
                name, documentation, kind, tuple(labelnames), read
            )

    def describe(self) -> list[Metric]:
        """Nothing: registration must not read the source (prometheus_client then skips the
        duplicate-name check for this collector)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every family; called by prometheus_client at each scrape."""
        p = self.prefix
        if self._stats is not None:
            stats = self._stats()
            for attribute, name, help_text in _READER_COUNTERS:
                family = CounterMetricFamily(p + name, help_text)
                family.add_metric([], getattr(stats, attribute))
                yield family
        if self._source is not None:
            yield from self._collect_source()
        if self._collector_stats is not None:
            yield from self._collect_collector_stats(self._collector_stats)
        yield from self._collect_providers()

    def _collect_collector_stats(
        self, read: Callable[[], CollectorStatsRead | None]
    ) -> Iterator[Metric]:
        try:
            stats = read()
        except Exception:  # a foreign or damaged stats file must not fail the scrape
            self._count_provider_error("collector_stats")
            return
        if stats is not None:
            yield from collector_families(stats, self.prefix)

    def _count_provider_error(self, name: str) -> None:
        with self._lock:
            self._provider_errors[name] = self._provider_errors.get(name, 0) + 1

    def _collect_source(self) -> Iterator[Metric]:
        p = self.prefix
        assert self._source is not None
        reads: list[SlotRead] = []
        state = SegmentState.OK
        try:
            reads = self._source.read_all()
        except LoadsnapError as exc:
            state = unavailable_state(exc)
        states = GaugeMetricFamily(
            p + "segment_state",
            "1 for the segment's current state (ok, missing, not_ready, incompatible).",
            labels=["state"],
        )
        for candidate in SegmentState:
            states.add_metric([candidate.value], int(candidate is state))
        yield states
        ranks = GaugeMetricFamily(
            p + "ranks", "Ranks in each status (stale and dead ranks included).", labels=["status"]
        )
        for status in SlotStatus:
            ranks.add_metric([status.label], sum(1 for read in reads if read.status is status))
        yield ranks
        publishes = CounterMetricFamily(
            p + "slot_publishes",
            "Snapshots published into each rank's slot (its record sequence).",
            labels=["dp_rank"],
        )
        for read in reads:
            publishes.add_metric([str(read.rank)], read.seq)
        yield publishes
        if self._refused is not None and reads:
            refused = CounterMetricFamily(
                p + "slot_refused_payloads",
                "Snapshots refused by a writer for not fitting the slot, per rank.",
                labels=["dp_rank"],
            )
            try:
                for rank, count in enumerate(self._refused()):
                    refused.add_metric([str(rank)], count)
            except LoadsnapError:
                pass
            yield refused

    def _collect_providers(self) -> Iterator[Metric]:
        with self._lock:
            providers = list(self._providers.values())
        for provider in providers:
            try:
                values = dict(provider.read())
            except Exception:  # a provider's bug must not fail the scrape
                self._count_provider_error(provider.name)
                continue
            family: Metric
            if provider.kind == "counter":
                family = CounterMetricFamily(
                    self.prefix + provider.name[: -len("_total")],
                    provider.documentation,
                    labels=list(provider.labelnames),
                )
            else:
                family = GaugeMetricFamily(
                    self.prefix + provider.name,
                    provider.documentation,
                    labels=list(provider.labelnames),
                )
            for labelvalues, value in sorted(values.items()):
                if len(labelvalues) == len(provider.labelnames):
                    family.add_metric(list(labelvalues), value)
            yield family
        errors = CounterMetricFamily(
            self.prefix + "metric_provider_errors",
            "Scrapes at which a metric provider raised, per provider.",
            labels=["provider"],
        )
        with self._lock:
            for name, count in sorted(self._provider_errors.items()):
                errors.add_metric([name], count)
        yield errors
