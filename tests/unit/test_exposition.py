# ruff: noqa: E501
"""Golden tests for the pure renderers: the full Prometheus text byte for byte, time fixed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from loadsnap import (
    DisaggregationSection,
    LoadSnapshot,
    MemorySection,
    QueueSection,
    SlotRead,
    SlotStatus,
    UsageError,
)
from loadsnap.exposition import CORE_METRICS, render_json, render_prometheus, render_table
from tests.helpers import check_promtool

FIXED_NOW = 1_700_000_000.5


def fixed_reads() -> list[SlotRead]:
    """Four ranks: fresh with sections, stale, dead (writer detached), never published."""
    s0 = LoadSnapshot(
        dp_rank=0,
        num_running_reqs=12,
        num_waiting_reqs=3,
        num_waiting_uncached_tokens=900,
        num_used_tokens=40000,
        num_total_tokens=41000,
        max_total_num_tokens=100000,
        max_running_requests=64,
        token_usage=0.4,
        gen_throughput=1520.5,
        cache_hit_rate=0.25,
        utilization=0.75,
        seq=101,
        cycle=1500,
        publish_mono_ns=5_000_000_000,
        publish_wall_ns=1_700_000_000_250_000_000,
        epoch=1,
        last_accepted_dispatch_seq=77,
        memory=MemorySection(
            weight_bytes=16_000_000_000,
            kv_cache_bytes=40_000_000_000,
            device_total_bytes=80_000_000_000,
        ),
        disaggregation=DisaggregationSection(mode="decode", num_transfer_queue_reqs=2),
    )
    s1 = LoadSnapshot(
        dp_rank=1,
        num_running_reqs=0,
        num_waiting_reqs=0,
        max_total_num_tokens=100000,
        max_running_requests=64,
        seq=55,
        cycle=800,
        publish_wall_ns=1_699_999_997_000_000_000,
        epoch=2,
        last_accepted_dispatch_seq=40,
        queues=QueueSection(num_paused_reqs=1),
    )
    s2 = LoadSnapshot(
        dp_rank=2,
        num_running_reqs=7,
        num_waiting_reqs=1,
        token_usage=0.125,
        seq=9,
        epoch=1,
        publish_wall_ns=1_699_999_990_000_000_000,
    )
    return [
        SlotRead(2, SlotStatus.DEAD, s2, 10.25, 9, 1, 0, "writer detached"),
        SlotRead(0, SlotStatus.FRESH, s0, 0.015, 101, 1, 4242),
        SlotRead(1, SlotStatus.STALE, s1, 3.0, 55, 2, 4243, "age 3.000s > budget 2.0s"),
        SlotRead(3, SlotStatus.NEVER_PUBLISHED, None, None, 0, 0, 0, "no record yet"),
    ]


GOLDEN_NATIVE = """\
# HELP loadsnap_num_requests_running Requests in the rank's running batch.
# TYPE loadsnap_num_requests_running gauge
loadsnap_num_requests_running{instance="demo",model="llama-8b",dp_rank="0"} 12
loadsnap_num_requests_running{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_num_requests_waiting Requests queued on the rank, not yet running.
# TYPE loadsnap_num_requests_waiting gauge
loadsnap_num_requests_waiting{instance="demo",model="llama-8b",dp_rank="0"} 3
loadsnap_num_requests_waiting{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_kv_cache_usage_perc KV-cache (token pool) utilization as a ratio from 0 to 1.
# TYPE loadsnap_kv_cache_usage_perc gauge
loadsnap_kv_cache_usage_perc{instance="demo",model="llama-8b",dp_rank="0"} 0.4
loadsnap_kv_cache_usage_perc{instance="demo",model="llama-8b",dp_rank="1"} 0.0
# HELP loadsnap_num_waiting_uncached_tokens Uncached prompt tokens of waiting requests, still to prefill.
# TYPE loadsnap_num_waiting_uncached_tokens gauge
loadsnap_num_waiting_uncached_tokens{instance="demo",model="llama-8b",dp_rank="0"} 900
loadsnap_num_waiting_uncached_tokens{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_num_used_tokens Tokens held in the KV cache.
# TYPE loadsnap_num_used_tokens gauge
loadsnap_num_used_tokens{instance="demo",model="llama-8b",dp_rank="0"} 40000
loadsnap_num_used_tokens{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_num_total_tokens Tokens in use plus tokens pending prefill.
# TYPE loadsnap_num_total_tokens gauge
loadsnap_num_total_tokens{instance="demo",model="llama-8b",dp_rank="0"} 41000
loadsnap_num_total_tokens{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_max_total_num_tokens KV-cache capacity in tokens.
# TYPE loadsnap_max_total_num_tokens gauge
loadsnap_max_total_num_tokens{instance="demo",model="llama-8b",dp_rank="0"} 100000
loadsnap_max_total_num_tokens{instance="demo",model="llama-8b",dp_rank="1"} 100000
# HELP loadsnap_max_running_requests Most requests the rank runs at once.
# TYPE loadsnap_max_running_requests gauge
loadsnap_max_running_requests{instance="demo",model="llama-8b",dp_rank="0"} 64
loadsnap_max_running_requests{instance="demo",model="llama-8b",dp_rank="1"} 64
# HELP loadsnap_gen_throughput_tokens_per_second Recent generation throughput in tokens per second.
# TYPE loadsnap_gen_throughput_tokens_per_second gauge
loadsnap_gen_throughput_tokens_per_second{instance="demo",model="llama-8b",dp_rank="0"} 1520.5
loadsnap_gen_throughput_tokens_per_second{instance="demo",model="llama-8b",dp_rank="1"} 0.0
# HELP loadsnap_cache_hit_ratio Prefix-cache hit ratio from 0 to 1.
# TYPE loadsnap_cache_hit_ratio gauge
loadsnap_cache_hit_ratio{instance="demo",model="llama-8b",dp_rank="0"} 0.25
loadsnap_cache_hit_ratio{instance="demo",model="llama-8b",dp_rank="1"} 0.0
# HELP loadsnap_utilization_ratio Rank utilization as a ratio from 0 to 1.
# TYPE loadsnap_utilization_ratio gauge
loadsnap_utilization_ratio{instance="demo",model="llama-8b",dp_rank="0"} 0.75
loadsnap_utilization_ratio{instance="demo",model="llama-8b",dp_rank="1"} 0.0
# HELP loadsnap_snapshot_age_seconds Seconds since the rank's latest snapshot was published (reader's monotonic clock).
# TYPE loadsnap_snapshot_age_seconds gauge
loadsnap_snapshot_age_seconds{instance="demo",model="llama-8b",dp_rank="0"} 0.015
loadsnap_snapshot_age_seconds{instance="demo",model="llama-8b",dp_rank="1"} 3.0
loadsnap_snapshot_age_seconds{instance="demo",model="llama-8b",dp_rank="2"} 10.25
# HELP loadsnap_last_publish_timestamp_seconds Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.
# TYPE loadsnap_last_publish_timestamp_seconds gauge
loadsnap_last_publish_timestamp_seconds{instance="demo",model="llama-8b",dp_rank="0"} 1700000000.2499998
loadsnap_last_publish_timestamp_seconds{instance="demo",model="llama-8b",dp_rank="1"} 1699999997.0
loadsnap_last_publish_timestamp_seconds{instance="demo",model="llama-8b",dp_rank="2"} 1699999990.0
# HELP loadsnap_publishes_total Snapshots published into the rank's slot (the record sequence).
# TYPE loadsnap_publishes_total counter
loadsnap_publishes_total{instance="demo",model="llama-8b",dp_rank="0"} 101
loadsnap_publishes_total{instance="demo",model="llama-8b",dp_rank="1"} 55
loadsnap_publishes_total{instance="demo",model="llama-8b",dp_rank="2"} 9
# HELP loadsnap_scheduler_cycles_total Scheduler loop iterations reported by the rank.
# TYPE loadsnap_scheduler_cycles_total counter
loadsnap_scheduler_cycles_total{instance="demo",model="llama-8b",dp_rank="0"} 1500
loadsnap_scheduler_cycles_total{instance="demo",model="llama-8b",dp_rank="1"} 800
loadsnap_scheduler_cycles_total{instance="demo",model="llama-8b",dp_rank="2"} 0
# HELP loadsnap_accepted_dispatches_total Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).
# TYPE loadsnap_accepted_dispatches_total counter
loadsnap_accepted_dispatches_total{instance="demo",model="llama-8b",dp_rank="0"} 77
loadsnap_accepted_dispatches_total{instance="demo",model="llama-8b",dp_rank="1"} 40
loadsnap_accepted_dispatches_total{instance="demo",model="llama-8b",dp_rank="2"} 0
# HELP loadsnap_writer_epoch Times a writer has attached to the rank's slot; a change means a restart.
# TYPE loadsnap_writer_epoch gauge
loadsnap_writer_epoch{instance="demo",model="llama-8b",dp_rank="0"} 1
loadsnap_writer_epoch{instance="demo",model="llama-8b",dp_rank="1"} 2
loadsnap_writer_epoch{instance="demo",model="llama-8b",dp_rank="2"} 1
# HELP loadsnap_rank_status 1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).
# TYPE loadsnap_rank_status gauge
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="fresh"} 1
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="stale"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="dead"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="never_published"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="torn"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="0",status="invalid"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="fresh"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="stale"} 1
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="dead"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="never_published"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="torn"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="1",status="invalid"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="fresh"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="stale"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="dead"} 1
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="never_published"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="torn"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="2",status="invalid"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="fresh"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="stale"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="dead"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="never_published"} 1
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="torn"} 0
loadsnap_rank_status{instance="demo",model="llama-8b",dp_rank="3",status="invalid"} 0
# HELP loadsnap_memory_weight_bytes Device memory held by model weights, in bytes.
# TYPE loadsnap_memory_weight_bytes gauge
loadsnap_memory_weight_bytes{instance="demo",model="llama-8b",dp_rank="0"} 16000000000
# HELP loadsnap_memory_kv_cache_bytes Device memory held by the KV cache, in bytes.
# TYPE loadsnap_memory_kv_cache_bytes gauge
loadsnap_memory_kv_cache_bytes{instance="demo",model="llama-8b",dp_rank="0"} 40000000000
# HELP loadsnap_memory_activation_bytes Device memory held by activations, in bytes.
# TYPE loadsnap_memory_activation_bytes gauge
loadsnap_memory_activation_bytes{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_memory_device_total_bytes Device memory in total, in bytes.
# TYPE loadsnap_memory_device_total_bytes gauge
loadsnap_memory_device_total_bytes{instance="demo",model="llama-8b",dp_rank="0"} 80000000000
# HELP loadsnap_memory_device_used_bytes Device memory in use, in bytes.
# TYPE loadsnap_memory_device_used_bytes gauge
loadsnap_memory_device_used_bytes{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_memory_kv_token_capacity KV-cache capacity in tokens.
# TYPE loadsnap_memory_kv_token_capacity gauge
loadsnap_memory_kv_token_capacity{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_disagg_num_prealloc_queue_reqs Requests in the disaggregation prealloc queue.
# TYPE loadsnap_disagg_num_prealloc_queue_reqs gauge
loadsnap_disagg_num_prealloc_queue_reqs{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_disagg_num_transfer_queue_reqs Requests in the KV transfer queue.
# TYPE loadsnap_disagg_num_transfer_queue_reqs gauge
loadsnap_disagg_num_transfer_queue_reqs{instance="demo",model="llama-8b",dp_rank="0"} 2
# HELP loadsnap_disagg_num_bootstrap_queue_reqs Requests in the bootstrap queue.
# TYPE loadsnap_disagg_num_bootstrap_queue_reqs gauge
loadsnap_disagg_num_bootstrap_queue_reqs{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_disagg_num_inflight_queue_reqs Requests with a KV transfer in flight.
# TYPE loadsnap_disagg_num_inflight_queue_reqs gauge
loadsnap_disagg_num_inflight_queue_reqs{instance="demo",model="llama-8b",dp_rank="0"} 0
# HELP loadsnap_disagg_mode 1 for the rank's disaggregation mode.
# TYPE loadsnap_disagg_mode gauge
loadsnap_disagg_mode{instance="demo",model="llama-8b",dp_rank="0",mode="decode"} 1
# HELP loadsnap_queues_num_grammar_queue_reqs Requests waiting for grammar compilation.
# TYPE loadsnap_queues_num_grammar_queue_reqs gauge
loadsnap_queues_num_grammar_queue_reqs{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_queues_num_paused_reqs Requests paused (e.g. by a weight update).
# TYPE loadsnap_queues_num_paused_reqs gauge
loadsnap_queues_num_paused_reqs{instance="demo",model="llama-8b",dp_rank="1"} 1
# HELP loadsnap_queues_num_retracted_reqs Requests retracted to free KV cache.
# TYPE loadsnap_queues_num_retracted_reqs gauge
loadsnap_queues_num_retracted_reqs{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_queues_num_chunked_prefill_reqs Requests in chunked prefill.
# TYPE loadsnap_queues_num_chunked_prefill_reqs gauge
loadsnap_queues_num_chunked_prefill_reqs{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_queues_num_prefill_reqs Requests in prefill.
# TYPE loadsnap_queues_num_prefill_reqs gauge
loadsnap_queues_num_prefill_reqs{instance="demo",model="llama-8b",dp_rank="1"} 0
# HELP loadsnap_queues_num_decode_reqs Requests in decode.
# TYPE loadsnap_queues_num_decode_reqs gauge
loadsnap_queues_num_decode_reqs{instance="demo",model="llama-8b",dp_rank="1"} 0
"""

GOLDEN_SGLANG_CORE = """\
# HELP sglang_num_running_reqs Requests in the rank's running batch.
# TYPE sglang_num_running_reqs gauge
sglang_num_running_reqs{dp_rank="0"} 12
sglang_num_running_reqs{dp_rank="1"} 0
# HELP sglang_num_waiting_reqs Requests queued on the rank, not yet running.
# TYPE sglang_num_waiting_reqs gauge
sglang_num_waiting_reqs{dp_rank="0"} 3
sglang_num_waiting_reqs{dp_rank="1"} 0
# HELP sglang_token_usage KV-cache (token pool) utilization as a ratio from 0 to 1.
# TYPE sglang_token_usage gauge
sglang_token_usage{dp_rank="0"} 0.4
sglang_token_usage{dp_rank="1"} 0.0
# HELP sglang_num_waiting_uncached_tokens Uncached prompt tokens of waiting requests, still to prefill.
# TYPE sglang_num_waiting_uncached_tokens gauge
sglang_num_waiting_uncached_tokens{dp_rank="0"} 900
sglang_num_waiting_uncached_tokens{dp_rank="1"} 0
# HELP sglang_num_used_tokens Tokens held in the KV cache.
# TYPE sglang_num_used_tokens gauge
sglang_num_used_tokens{dp_rank="0"} 40000
sglang_num_used_tokens{dp_rank="1"} 0
# HELP sglang_num_total_tokens Tokens in use plus tokens pending prefill.
# TYPE sglang_num_total_tokens gauge
sglang_num_total_tokens{dp_rank="0"} 41000
sglang_num_total_tokens{dp_rank="1"} 0
# HELP sglang_max_total_num_tokens KV-cache capacity in tokens.
# TYPE sglang_max_total_num_tokens gauge
sglang_max_total_num_tokens{dp_rank="0"} 100000
sglang_max_total_num_tokens{dp_rank="1"} 100000
# HELP sglang_max_running_requests Most requests the rank runs at once.
# TYPE sglang_max_running_requests gauge
sglang_max_running_requests{dp_rank="0"} 64
sglang_max_running_requests{dp_rank="1"} 64
# HELP sglang_gen_throughput Recent generation throughput in tokens per second.
# TYPE sglang_gen_throughput gauge
sglang_gen_throughput{dp_rank="0"} 1520.5
sglang_gen_throughput{dp_rank="1"} 0.0
# HELP sglang_cache_hit_rate Prefix-cache hit ratio from 0 to 1.
# TYPE sglang_cache_hit_rate gauge
sglang_cache_hit_rate{dp_rank="0"} 0.25
sglang_cache_hit_rate{dp_rank="1"} 0.0
# HELP sglang_utilization Rank utilization as a ratio from 0 to 1.
# TYPE sglang_utilization gauge
sglang_utilization{dp_rank="0"} 0.75
sglang_utilization{dp_rank="1"} 0.0
# HELP sglang_snapshot_age_seconds Seconds since the rank's latest snapshot was published (reader's monotonic clock).
# TYPE sglang_snapshot_age_seconds gauge
sglang_snapshot_age_seconds{dp_rank="0"} 0.015
sglang_snapshot_age_seconds{dp_rank="1"} 3.0
sglang_snapshot_age_seconds{dp_rank="2"} 10.25
# HELP sglang_last_publish_timestamp_seconds Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.
# TYPE sglang_last_publish_timestamp_seconds gauge
sglang_last_publish_timestamp_seconds{dp_rank="0"} 1700000000.2499998
sglang_last_publish_timestamp_seconds{dp_rank="1"} 1699999997.0
sglang_last_publish_timestamp_seconds{dp_rank="2"} 1699999990.0
# HELP sglang_publishes_total Snapshots published into the rank's slot (the record sequence).
# TYPE sglang_publishes_total counter
sglang_publishes_total{dp_rank="0"} 101
sglang_publishes_total{dp_rank="1"} 55
sglang_publishes_total{dp_rank="2"} 9
# HELP sglang_scheduler_cycles_total Scheduler loop iterations reported by the rank.
# TYPE sglang_scheduler_cycles_total counter
sglang_scheduler_cycles_total{dp_rank="0"} 1500
sglang_scheduler_cycles_total{dp_rank="1"} 800
sglang_scheduler_cycles_total{dp_rank="2"} 0
# HELP sglang_accepted_dispatches_total Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).
# TYPE sglang_accepted_dispatches_total counter
sglang_accepted_dispatches_total{dp_rank="0"} 77
sglang_accepted_dispatches_total{dp_rank="1"} 40
sglang_accepted_dispatches_total{dp_rank="2"} 0
# HELP sglang_writer_epoch Times a writer has attached to the rank's slot; a change means a restart.
# TYPE sglang_writer_epoch gauge
sglang_writer_epoch{dp_rank="0"} 1
sglang_writer_epoch{dp_rank="1"} 2
sglang_writer_epoch{dp_rank="2"} 1
# HELP sglang_rank_status 1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).
# TYPE sglang_rank_status gauge
sglang_rank_status{dp_rank="0",status="fresh"} 1
sglang_rank_status{dp_rank="0",status="stale"} 0
sglang_rank_status{dp_rank="0",status="dead"} 0
sglang_rank_status{dp_rank="0",status="never_published"} 0
sglang_rank_status{dp_rank="0",status="torn"} 0
sglang_rank_status{dp_rank="0",status="invalid"} 0
sglang_rank_status{dp_rank="1",status="fresh"} 0
sglang_rank_status{dp_rank="1",status="stale"} 1
sglang_rank_status{dp_rank="1",status="dead"} 0
sglang_rank_status{dp_rank="1",status="never_published"} 0
sglang_rank_status{dp_rank="1",status="torn"} 0
sglang_rank_status{dp_rank="1",status="invalid"} 0
sglang_rank_status{dp_rank="2",status="fresh"} 0
sglang_rank_status{dp_rank="2",status="stale"} 0
sglang_rank_status{dp_rank="2",status="dead"} 1
sglang_rank_status{dp_rank="2",status="never_published"} 0
sglang_rank_status{dp_rank="2",status="torn"} 0
sglang_rank_status{dp_rank="2",status="invalid"} 0
sglang_rank_status{dp_rank="3",status="fresh"} 0
sglang_rank_status{dp_rank="3",status="stale"} 0
sglang_rank_status{dp_rank="3",status="dead"} 0
sglang_rank_status{dp_rank="3",status="never_published"} 1
sglang_rank_status{dp_rank="3",status="torn"} 0
sglang_rank_status{dp_rank="3",status="invalid"} 0
"""


def _series(text: str, openmetrics: bool = False) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    return [
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in parse(text)
        for sample in family.samples
    ]


def test_prometheus_golden_native() -> None:
    text = render_prometheus(
        fixed_reads(), const_labels={"model": "llama-8b", "instance": "demo"}, include="all"
    )
    assert text == GOLDEN_NATIVE


def test_prometheus_golden_sglang_prefix_reproduces_reference_names() -> None:
    text = render_prometheus(fixed_reads(), prefix="sglang_")
    assert text == GOLDEN_SGLANG_CORE
    names = {family.name for family in text_string_to_metric_families(text)}
    reference = {
        "sglang_num_running_reqs",
        "sglang_num_waiting_reqs",
        "sglang_num_waiting_uncached_tokens",
        "sglang_num_used_tokens",
        "sglang_num_total_tokens",
        "sglang_max_total_num_tokens",
        "sglang_token_usage",
        "sglang_gen_throughput",
        "sglang_cache_hit_rate",
        "sglang_utilization",
        "sglang_max_running_requests",
    }
    assert reference <= names


def test_native_names_cover_the_inference_extension_signals() -> None:
    text = render_prometheus(fixed_reads())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "loadsnap_num_requests_waiting",
        "loadsnap_num_requests_running",
        "loadsnap_kv_cache_usage_perc",
    ):
        assert families[name].type == "gauge"
    assert families["loadsnap_publishes"].type == "counter"
    usage = {s.labels["dp_rank"]: s.value for s in families["loadsnap_kv_cache_usage_perc"].samples}
    assert usage == {"0": 0.4, "1": 0.0}  # the dead rank's frozen load is not exported


def test_every_family_has_help_and_type_and_series_are_unique() -> None:
    for prefix in ("loadsnap_", "sglang_"):
        text = render_prometheus(fixed_reads(), prefix=prefix, include="all")
        lines = text.splitlines()
        helps = {line.split()[2] for line in lines if line.startswith("# HELP ")}
        types = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
        assert helps == types
        for line in lines:
            if not line.startswith("#"):
                assert any(line.startswith(name) for name in types), line
        series = _series(text)
        assert len(series) == len(set(series))
        assert all(dict(labels).get("dp_rank") is not None for _, labels in series)


def test_counters_typed_as_counters_with_total() -> None:
    text = render_prometheus(fixed_reads())
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
    counters = {s.native for s in CORE_METRICS if s.kind == "counter"}
    assert counters == {
        "publishes_total",
        "scheduler_cycles_total",
        "accepted_dispatches_total",
    }


def test_openmetrics_output_parses_and_ends_with_eof() -> None:
    text = render_prometheus(fixed_reads(), openmetrics=True, include="all")
    assert text.endswith("# EOF\n")
    assert "# TYPE loadsnap_publishes counter\n" in text
    assert "# UNIT loadsnap_snapshot_age_seconds seconds\n" in text
    series = _series(text, openmetrics=True)
    assert len(series) == len(set(series))
    assert ("loadsnap_publishes_total", (("dp_rank", "0"),)) in series


def test_promtool_accepts_both_prefixes(promtool: str) -> None:
    check_promtool(promtool, GOLDEN_NATIVE)
    check_promtool(promtool, GOLDEN_SGLANG_CORE)


def test_label_values_are_escaped() -> None:
    text = render_prometheus(fixed_reads()[:2], const_labels={"model": 'a"b\\c\nd'})
    assert 'model="a\\"b\\\\c\\nd"' in text
    families = list(text_string_to_metric_families(text))
    assert families[0].samples[0].labels["model"] == 'a"b\\c\nd'


@pytest.mark.parametrize("prefix", ["9bad", "has space", "dash-"])
def test_bad_prefix_is_a_usage_error(prefix: str) -> None:
    with pytest.raises(UsageError, match="prefix"):
        render_prometheus(fixed_reads(), prefix=prefix)


@pytest.mark.parametrize("label", ["dp_rank", "__x", "1a", "status"])
def test_bad_const_label_is_a_usage_error(label: str) -> None:
    with pytest.raises(UsageError, match="label"):
        render_prometheus(fixed_reads(), const_labels={label: "v"})


def test_empty_reads_render_nothing_but_valid_text() -> None:
    assert render_prometheus([]) == "\n"
    assert render_prometheus([], openmetrics=True) == "# EOF\n"


def test_render_is_deterministic_whatever_the_input_order() -> None:
    reads = fixed_reads()
    assert render_prometheus(reads) == render_prometheus(list(reversed(reads)))


def test_json_shape_and_reference_compatible_fields() -> None:
    doc: dict[str, Any] = render_json(fixed_reads(), "core", FIXED_NOW, version="9.9")
    assert set(doc) == {
        "timestamp",
        "version",
        "dp_rank_count",
        "loads",
        "aggregate",
        "unavailable",
    }
    assert doc["timestamp"] == "2023-11-14T22:13:20.500000+00:00"
    assert doc["version"] == "9.9"
    assert [load["dp_rank"] for load in doc["loads"]] == [0, 1, 2]
    first = doc["loads"][0]
    expected = fixed_reads()[1].snapshot
    assert expected is not None
    for key, value in expected.to_dict("core").items():
        assert first[key] == value
    assert first["num_total_reqs"] == 15
    assert first["age_seconds"] == 0.015
    assert first["status"] == "fresh"
    assert doc["loads"][2]["status"] == "dead"
    assert doc["unavailable"] == [
        {"dp_rank": 3, "status": "never_published", "reason": "no record yet"}
    ]
    # Aggregate over fresh and stale ranks only, with the reference's keys and rounding.
    assert doc["aggregate"] == {
        "total_running_reqs": 12,
        "total_waiting_reqs": 3,
        "total_reqs": 15,
        "avg_token_usage": 0.2,
        "avg_throughput": 760.25,
        "avg_utilization": 0.375,
    }
    json.dumps(doc)  # JSON-ready


def test_json_include_selects_sections() -> None:
    doc = render_json(fixed_reads(), "memory", FIXED_NOW)
    first = doc["loads"][0]
    assert set(first) == {"dp_rank", "memory", "age_seconds", "status", "reason"}
    assert first["memory"]["weight_bytes"] == 16_000_000_000
    assert doc["loads"][1]["memory"] is None
    full = render_json(fixed_reads(), "all", FIXED_NOW)["loads"][0]
    assert {"memory", "speculative", "lora", "disaggregation", "queues"} <= set(full)


def test_json_unknown_section_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="valid: core, memory"):
        render_json(fixed_reads(), "core,bogus", FIXED_NOW)


def test_table_renders_every_rank() -> None:
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None)
    console.print(render_table(fixed_reads(), "golden"))
    text = console.export_text()
    for label in ("fresh", "stale", "dead", "never_published"):
        assert label in text
    assert "40.0%" in text
    assert "15 ms" in text
