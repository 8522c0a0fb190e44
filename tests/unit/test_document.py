# ruff: noqa: E501
"""The /v1/loads document model: sglang's names and units, the one mapping from snapshots, the
routable-rank rule, the legacy /get_load shape, and the goldens (full JSON and full Prometheus
text with ``prefix="sglang_"``, time fixed)."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadsnap import (
    LoadSnapshot,
    MemorySection,
    SlotRead,
    SlotStatus,
)
from loadsnap.exposition import (
    DOCUMENT_SECTIONS,
    I32_MAX,
    ROUTABLE_STATUSES,
    DisaggregationMetrics,
    LoadsDocument,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    RankLoad,
    SpeculativeMetrics,
    StatusLabel,
    build_document,
    legacy_loads,
    render_json,
    render_prometheus,
)
from loadsnap.http import UnavailableReason
from loadsnap.reading import SegmentState
from tests.helpers import FIXED_NOW, golden_reads

# sglang's /v1/loads keys (its LoadSnapshot core keys, num_total_reqs, and its section structs'
# fields), as the sglang release with dp_rank_count and aggregate serves them.
SGLANG_CORE_KEYS = (
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "max_running_requests",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
    "num_total_reqs",
)
SGLANG_SECTIONS = {
    "memory": ("weight_gb", "kv_cache_gb", "graph_gb", "token_capacity"),
    "speculative": ("accept_length", "accept_rate"),
    "lora": ("slots_used", "slots_total", "utilization"),
    "disaggregation": (
        "mode",
        "prefill_prealloc_queue_reqs",
        "prefill_inflight_queue_reqs",
        "decode_prealloc_queue_reqs",
        "decode_transfer_queue_reqs",
        "decode_retracted_queue_reqs",
        "kv_transfer_speed_gb_s",
        "kv_transfer_latency_ms",
    ),
    "queues": ("waiting", "grammar", "paused", "retracted"),
}
# sglang's Prometheus names for /v1/loads?format=prometheus: sglang_<key>, and
# sglang_<memory|spec|lora|disagg|queues>_<field> for each numeric section field.
SGLANG_PROMETHEUS_NAMES = {f"sglang_{key}" for key in SGLANG_CORE_KEYS[1:-1]} | {
    f"sglang_{stem}_{field}"
    for stem, key in (
        ("memory", "memory"),
        ("spec", "speculative"),
        ("lora", "lora"),
        ("disagg", "disaggregation"),
        ("queues", "queues"),
    )
    for field in SGLANG_SECTIONS[key]
    if field != "mode"
}


GOLDEN_JSON = """\
{
  "timestamp": "2023-11-14T22:13:20.500000+00:00",
  "version": "0.1.0",
  "dp_rank_count": 2,
  "loads": [
    {
      "dp_rank": 0,
      "num_running_reqs": 12,
      "num_waiting_reqs": 3,
      "num_waiting_uncached_tokens": 900,
      "num_used_tokens": 40000,
      "num_total_tokens": 41000,
      "max_total_num_tokens": 100000,
      "max_running_requests": 64,
      "token_usage": 0.4,
      "gen_throughput": 1520.5,
      "cache_hit_rate": 0.25,
      "utilization": 0.75,
      "num_total_reqs": 15,
      "memory": {
        "weight_gb": 16.0,
        "kv_cache_gb": 40.0,
        "graph_gb": 0.0,
        "token_capacity": 100000
      },
      "speculative": {
        "accept_length": 2.5,
        "accept_rate": 0.625
      },
      "lora": {
        "slots_used": 2,
        "slots_total": 8,
        "utilization": 0.25
      },
      "disaggregation": {
        "mode": "prefill",
        "prefill_prealloc_queue_reqs": 2,
        "prefill_inflight_queue_reqs": 1,
        "decode_prealloc_queue_reqs": 0,
        "decode_transfer_queue_reqs": 0,
        "decode_retracted_queue_reqs": 0,
        "kv_transfer_speed_gb_s": 0.0,
        "kv_transfer_latency_ms": 0.0
      },
      "queues": {
        "waiting": 3,
        "grammar": 1,
        "paused": 2,
        "retracted": 3
      },
      "seq": 101,
      "epoch": 1,
      "cycle": 1500,
      "last_accepted_dispatch_seq": 77,
      "publish_wall_ns": 1700000000250000000,
      "age_seconds": 0.015,
      "status": "fresh",
      "reason": ""
    },
    {
      "dp_rank": 1,
      "num_running_reqs": 13,
      "num_waiting_reqs": 3,
      "num_waiting_uncached_tokens": 900,
      "num_used_tokens": 40000,
      "num_total_tokens": 41000,
      "max_total_num_tokens": 100000,
      "max_running_requests": 64,
      "token_usage": 0.4,
      "gen_throughput": 1520.5,
      "cache_hit_rate": 0.25,
      "utilization": 0.75,
      "num_total_reqs": 16,
      "memory": {
        "weight_gb": 15.5,
        "kv_cache_gb": 39.25,
        "graph_gb": 0.75,
        "token_capacity": 9
      },
      "lora": {
        "slots_used": 3,
        "slots_total": 4,
        "utilization": 0.75
      },
      "disaggregation": {
        "mode": "decode",
        "prefill_prealloc_queue_reqs": 0,
        "prefill_inflight_queue_reqs": 0,
        "decode_prealloc_queue_reqs": 4,
        "decode_transfer_queue_reqs": 5,
        "decode_retracted_queue_reqs": 6,
        "kv_transfer_speed_gb_s": 12.5,
        "kv_transfer_latency_ms": 3.25
      },
      "seq": 7,
      "epoch": 3,
      "cycle": 1500,
      "last_accepted_dispatch_seq": 77,
      "publish_wall_ns": 1700000000250000000,
      "age_seconds": 0.5,
      "status": "fresh",
      "reason": ""
    }
  ],
  "aggregate": {
    "total_running_reqs": 25,
    "total_waiting_reqs": 6,
    "total_reqs": 31,
    "avg_token_usage": 0.4,
    "avg_throughput": 1520.5,
    "avg_utilization": 0.75
  },
  "unavailable": [
    {
      "dp_rank": 2,
      "status": "stale",
      "reason": "age 3.000s > budget 2.0s",
      "age_seconds": 3.0
    },
    {
      "dp_rank": 3,
      "status": "dead",
      "reason": "writer is gone",
      "age_seconds": 10.25
    },
    {
      "dp_rank": 4,
      "status": "never_published",
      "reason": "no record yet",
      "age_seconds": null
    }
  ]
}"""


def test_golden_json_is_sglangs_document() -> None:
    document = build_document(golden_reads(), "all", FIXED_NOW, version="0.1.0")
    text = msgspec.json.format(msgspec.json.encode(document), indent=2).decode()
    assert text == GOLDEN_JSON


def test_every_sglang_key_under_its_name_and_loadsnaps_additions_after() -> None:
    doc = render_json(golden_reads(), "all", FIXED_NOW)
    assert set(doc) == {"timestamp", "version", "dp_rank_count", "loads", "aggregate"} | {
        "unavailable"
    }
    first = doc["loads"][0]
    keys = list(first)
    assert keys[: len(SGLANG_CORE_KEYS)] == list(SGLANG_CORE_KEYS)
    for section, fields in SGLANG_SECTIONS.items():
        assert tuple(first[section]) == fields, section
    additions = set(keys) - set(SGLANG_CORE_KEYS) - set(SGLANG_SECTIONS)
    assert additions == {
        "seq",
        "epoch",
        "cycle",
        "last_accepted_dispatch_seq",
        "publish_wall_ns",
        "age_seconds",
        "status",
        "reason",
    }


def test_document_structs_are_sglangs_sections() -> None:
    structs = {
        "memory": MemoryMetrics,
        "speculative": SpeculativeMetrics,
        "lora": LoRAMetrics,
        "disaggregation": DisaggregationMetrics,
        "queues": QueueMetrics,
    }
    for key, fields in SGLANG_SECTIONS.items():
        assert structs[key].__struct_fields__ == fields
    assert [section.key for section in DOCUMENT_SECTIONS] == list(SGLANG_SECTIONS)
    assert RankLoad.__struct_fields__[: len(SGLANG_CORE_KEYS)] == SGLANG_CORE_KEYS


GOLDEN_SGLANG_PROMETHEUS = """\
# HELP sglang_num_running_reqs Number of running requests.
# TYPE sglang_num_running_reqs gauge
sglang_num_running_reqs{dp_rank="0"} 12.0
sglang_num_running_reqs{dp_rank="1"} 13.0
# HELP sglang_num_waiting_reqs Number of waiting requests.
# TYPE sglang_num_waiting_reqs gauge
sglang_num_waiting_reqs{dp_rank="0"} 3.0
sglang_num_waiting_reqs{dp_rank="1"} 3.0
# HELP sglang_token_usage Token pool usage ratio.
# TYPE sglang_token_usage gauge
sglang_token_usage{dp_rank="0"} 0.4
sglang_token_usage{dp_rank="1"} 0.4
# HELP sglang_num_waiting_uncached_tokens Number of uncached input tokens waiting for prefill compute.
# TYPE sglang_num_waiting_uncached_tokens gauge
sglang_num_waiting_uncached_tokens{dp_rank="0"} 900.0
sglang_num_waiting_uncached_tokens{dp_rank="1"} 900.0
# HELP sglang_num_used_tokens Number of tokens in use.
# TYPE sglang_num_used_tokens gauge
sglang_num_used_tokens{dp_rank="0"} 40000.0
sglang_num_used_tokens{dp_rank="1"} 40000.0
# HELP sglang_num_total_tokens Used tokens plus pending prefill tokens.
# TYPE sglang_num_total_tokens gauge
sglang_num_total_tokens{dp_rank="0"} 41000.0
sglang_num_total_tokens{dp_rank="1"} 41000.0
# HELP sglang_max_total_num_tokens Maximum token capacity.
# TYPE sglang_max_total_num_tokens gauge
sglang_max_total_num_tokens{dp_rank="0"} 100000.0
sglang_max_total_num_tokens{dp_rank="1"} 100000.0
# HELP sglang_max_running_requests Maximum running requests capacity.
# TYPE sglang_max_running_requests gauge
sglang_max_running_requests{dp_rank="0"} 64.0
sglang_max_running_requests{dp_rank="1"} 64.0
# HELP sglang_gen_throughput Generation throughput tokens/sec.
# TYPE sglang_gen_throughput gauge
sglang_gen_throughput{dp_rank="0"} 1520.5
sglang_gen_throughput{dp_rank="1"} 1520.5
# HELP sglang_cache_hit_rate Prefix cache hit rate.
# TYPE sglang_cache_hit_rate gauge
sglang_cache_hit_rate{dp_rank="0"} 0.25
sglang_cache_hit_rate{dp_rank="1"} 0.25
# HELP sglang_utilization Overall utilization ratio.
# TYPE sglang_utilization gauge
sglang_utilization{dp_rank="0"} 0.75
sglang_utilization{dp_rank="1"} 0.75
"""

GOLDEN_SGLANG_FRESHNESS = """\
# HELP sglang_snapshot_age_seconds Seconds since the rank's latest snapshot was published (reader's monotonic clock).
# TYPE sglang_snapshot_age_seconds gauge
sglang_snapshot_age_seconds{dp_rank="0"} 0.015
sglang_snapshot_age_seconds{dp_rank="1"} 0.5
sglang_snapshot_age_seconds{dp_rank="2"} 3.0
sglang_snapshot_age_seconds{dp_rank="3"} 10.25
# HELP sglang_last_publish_timestamp_seconds Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.
# TYPE sglang_last_publish_timestamp_seconds gauge
sglang_last_publish_timestamp_seconds{dp_rank="0"} 1.7000000002499998e+09
sglang_last_publish_timestamp_seconds{dp_rank="1"} 1.7000000002499998e+09
sglang_last_publish_timestamp_seconds{dp_rank="2"} 1.7000000002499998e+09
sglang_last_publish_timestamp_seconds{dp_rank="3"} 1.7000000002499998e+09
# HELP sglang_publishes_total Snapshots published into the rank's slot (the record sequence).
# TYPE sglang_publishes_total counter
sglang_publishes_total{dp_rank="0"} 101.0
sglang_publishes_total{dp_rank="1"} 7.0
sglang_publishes_total{dp_rank="2"} 55.0
sglang_publishes_total{dp_rank="3"} 9.0
# HELP sglang_scheduler_cycles_total Scheduler loop iterations reported by the rank.
# TYPE sglang_scheduler_cycles_total counter
sglang_scheduler_cycles_total{dp_rank="0"} 1500.0
sglang_scheduler_cycles_total{dp_rank="1"} 1500.0
sglang_scheduler_cycles_total{dp_rank="2"} 1500.0
sglang_scheduler_cycles_total{dp_rank="3"} 1500.0
# HELP sglang_accepted_dispatches_total Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).
# TYPE sglang_accepted_dispatches_total counter
sglang_accepted_dispatches_total{dp_rank="0"} 77.0
sglang_accepted_dispatches_total{dp_rank="1"} 77.0
sglang_accepted_dispatches_total{dp_rank="2"} 77.0
sglang_accepted_dispatches_total{dp_rank="3"} 77.0
# HELP sglang_writer_epoch Times a writer has attached to the rank's slot; a change means a restart.
# TYPE sglang_writer_epoch gauge
sglang_writer_epoch{dp_rank="0"} 1.0
sglang_writer_epoch{dp_rank="1"} 3.0
sglang_writer_epoch{dp_rank="2"} 2.0
sglang_writer_epoch{dp_rank="3"} 1.0
# HELP sglang_rank_status 1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).
# TYPE sglang_rank_status gauge
sglang_rank_status{dp_rank="0",status="fresh"} 1.0
sglang_rank_status{dp_rank="0",status="stale"} 0.0
sglang_rank_status{dp_rank="0",status="dead"} 0.0
sglang_rank_status{dp_rank="0",status="never_published"} 0.0
sglang_rank_status{dp_rank="0",status="torn"} 0.0
sglang_rank_status{dp_rank="0",status="invalid"} 0.0
sglang_rank_status{dp_rank="1",status="fresh"} 1.0
sglang_rank_status{dp_rank="1",status="stale"} 0.0
sglang_rank_status{dp_rank="1",status="dead"} 0.0
sglang_rank_status{dp_rank="1",status="never_published"} 0.0
sglang_rank_status{dp_rank="1",status="torn"} 0.0
sglang_rank_status{dp_rank="1",status="invalid"} 0.0
sglang_rank_status{dp_rank="2",status="fresh"} 0.0
sglang_rank_status{dp_rank="2",status="stale"} 1.0
sglang_rank_status{dp_rank="2",status="dead"} 0.0
sglang_rank_status{dp_rank="2",status="never_published"} 0.0
sglang_rank_status{dp_rank="2",status="torn"} 0.0
sglang_rank_status{dp_rank="2",status="invalid"} 0.0
sglang_rank_status{dp_rank="3",status="fresh"} 0.0
sglang_rank_status{dp_rank="3",status="stale"} 0.0
sglang_rank_status{dp_rank="3",status="dead"} 1.0
sglang_rank_status{dp_rank="3",status="never_published"} 0.0
sglang_rank_status{dp_rank="3",status="torn"} 0.0
sglang_rank_status{dp_rank="3",status="invalid"} 0.0
sglang_rank_status{dp_rank="4",status="fresh"} 0.0
sglang_rank_status{dp_rank="4",status="stale"} 0.0
sglang_rank_status{dp_rank="4",status="dead"} 0.0
sglang_rank_status{dp_rank="4",status="never_published"} 1.0
sglang_rank_status{dp_rank="4",status="torn"} 0.0
sglang_rank_status{dp_rank="4",status="invalid"} 0.0
"""
GOLDEN_SGLANG_SECTIONS = """\
# HELP sglang_memory_weight_gb Model weight memory in GB.
# TYPE sglang_memory_weight_gb gauge
sglang_memory_weight_gb{dp_rank="0"} 16.0
sglang_memory_weight_gb{dp_rank="1"} 15.5
# HELP sglang_memory_kv_cache_gb KV cache memory in GB.
# TYPE sglang_memory_kv_cache_gb gauge
sglang_memory_kv_cache_gb{dp_rank="0"} 40.0
sglang_memory_kv_cache_gb{dp_rank="1"} 39.25
# HELP sglang_memory_graph_gb CUDA graph memory in GB.
# TYPE sglang_memory_graph_gb gauge
sglang_memory_graph_gb{dp_rank="0"} 0.0
sglang_memory_graph_gb{dp_rank="1"} 0.75
# HELP sglang_memory_token_capacity Max tokens in KV cache.
# TYPE sglang_memory_token_capacity gauge
sglang_memory_token_capacity{dp_rank="0"} 100000.0
sglang_memory_token_capacity{dp_rank="1"} 9.0
# HELP sglang_spec_accept_length Avg accepted tokens per step.
# TYPE sglang_spec_accept_length gauge
sglang_spec_accept_length{dp_rank="0"} 2.5
# HELP sglang_spec_accept_rate Speculative acceptance rate.
# TYPE sglang_spec_accept_rate gauge
sglang_spec_accept_rate{dp_rank="0"} 0.625
# HELP sglang_lora_slots_used LoRA adapter slots in use.
# TYPE sglang_lora_slots_used gauge
sglang_lora_slots_used{dp_rank="0"} 2.0
sglang_lora_slots_used{dp_rank="1"} 3.0
# HELP sglang_lora_slots_total Total LoRA adapter slots.
# TYPE sglang_lora_slots_total gauge
sglang_lora_slots_total{dp_rank="0"} 8.0
sglang_lora_slots_total{dp_rank="1"} 4.0
# HELP sglang_lora_utilization LoRA pool utilization ratio.
# TYPE sglang_lora_utilization gauge
sglang_lora_utilization{dp_rank="0"} 0.25
sglang_lora_utilization{dp_rank="1"} 0.75
# HELP sglang_disagg_prefill_prealloc_queue_reqs Prefill prealloc queue requests.
# TYPE sglang_disagg_prefill_prealloc_queue_reqs gauge
sglang_disagg_prefill_prealloc_queue_reqs{dp_rank="0"} 2.0
sglang_disagg_prefill_prealloc_queue_reqs{dp_rank="1"} 0.0
# HELP sglang_disagg_prefill_inflight_queue_reqs Prefill inflight queue requests.
# TYPE sglang_disagg_prefill_inflight_queue_reqs gauge
sglang_disagg_prefill_inflight_queue_reqs{dp_rank="0"} 1.0
sglang_disagg_prefill_inflight_queue_reqs{dp_rank="1"} 0.0
# HELP sglang_disagg_decode_prealloc_queue_reqs Decode prealloc queue requests.
# TYPE sglang_disagg_decode_prealloc_queue_reqs gauge
sglang_disagg_decode_prealloc_queue_reqs{dp_rank="0"} 0.0
sglang_disagg_decode_prealloc_queue_reqs{dp_rank="1"} 4.0
# HELP sglang_disagg_decode_transfer_queue_reqs Decode transfer queue requests.
# TYPE sglang_disagg_decode_transfer_queue_reqs gauge
sglang_disagg_decode_transfer_queue_reqs{dp_rank="0"} 0.0
sglang_disagg_decode_transfer_queue_reqs{dp_rank="1"} 5.0
# HELP sglang_disagg_decode_retracted_queue_reqs Decode retracted queue requests.
# TYPE sglang_disagg_decode_retracted_queue_reqs gauge
sglang_disagg_decode_retracted_queue_reqs{dp_rank="0"} 0.0
sglang_disagg_decode_retracted_queue_reqs{dp_rank="1"} 6.0
# HELP sglang_disagg_kv_transfer_speed_gb_s KV transfer speed in GB/s.
# TYPE sglang_disagg_kv_transfer_speed_gb_s gauge
sglang_disagg_kv_transfer_speed_gb_s{dp_rank="0"} 0.0
sglang_disagg_kv_transfer_speed_gb_s{dp_rank="1"} 12.5
# HELP sglang_disagg_kv_transfer_latency_ms KV transfer latency in ms.
# TYPE sglang_disagg_kv_transfer_latency_ms gauge
sglang_disagg_kv_transfer_latency_ms{dp_rank="0"} 0.0
sglang_disagg_kv_transfer_latency_ms{dp_rank="1"} 3.25
# HELP sglang_disagg_mode 1 for the rank's disaggregation mode.
# TYPE sglang_disagg_mode gauge
sglang_disagg_mode{dp_rank="0",mode="prefill"} 1.0
sglang_disagg_mode{dp_rank="1",mode="decode"} 1.0
# HELP sglang_queues_waiting Main waiting queue size.
# TYPE sglang_queues_waiting gauge
sglang_queues_waiting{dp_rank="0"} 3.0
# HELP sglang_queues_grammar Grammar compilation queue size.
# TYPE sglang_queues_grammar gauge
sglang_queues_grammar{dp_rank="0"} 1.0
# HELP sglang_queues_paused Requests paused by weight sync.
# TYPE sglang_queues_paused gauge
sglang_queues_paused{dp_rank="0"} 2.0
# HELP sglang_queues_retracted Retracted requests count.
# TYPE sglang_queues_retracted gauge
sglang_queues_retracted{dp_rank="0"} 3.0
"""


def test_golden_prometheus_sglang_names_for_every_section() -> None:
    text = render_prometheus(golden_reads(), prefix="sglang_", include="all")
    assert text.startswith(GOLDEN_SGLANG_PROMETHEUS)
    assert text == GOLDEN_SGLANG_PROMETHEUS + GOLDEN_SGLANG_FRESHNESS + GOLDEN_SGLANG_SECTIONS
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) >= SGLANG_PROMETHEUS_NAMES
    # Load figures only for the routable ranks; the others keep their freshness figures.
    assert {s.labels["dp_rank"] for s in families["sglang_num_running_reqs"].samples} == {"0", "1"}
    ages = families["sglang_snapshot_age_seconds"].samples
    assert {s.labels["dp_rank"] for s in ages} == {"0", "1", "2", "3"}


def test_document_and_prometheus_agree_on_every_figure() -> None:
    doc = render_json(golden_reads(), "all", FIXED_NOW)
    text = render_prometheus(golden_reads(), prefix="sglang_", include="all")
    values = {
        (family.name, sample.labels["dp_rank"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "status" not in sample.labels and "mode" not in sample.labels
    }
    stems = {"memory": "memory", "speculative": "spec", "lora": "lora"}
    stems |= {"disaggregation": "disagg", "queues": "queues"}
    checked = 0
    for load in doc["loads"]:
        rank = str(load["dp_rank"])
        for key in SGLANG_CORE_KEYS[1:-1]:
            assert values[(f"sglang_{key}", rank)] == load[key]
            checked += 1
        for section, stem in stems.items():
            for field, value in load.get(section, {}).items():
                if field != "mode":
                    assert values[(f"sglang_{stem}_{field}", rank)] == value, (section, field)
                    checked += 1
    assert checked == 2 * 11 + 20 + 14


def test_only_fresh_ranks_are_routable_and_the_rest_listed_apart() -> None:
    assert frozenset({SlotStatus.FRESH}) == ROUTABLE_STATUSES
    doc = build_document(golden_reads(), "core", FIXED_NOW)
    assert [load.dp_rank for load in doc.loads] == [0, 1]
    assert [(u.dp_rank, u.status) for u in doc.unavailable] == [
        (2, "stale"),
        (3, "dead"),
        (4, "never_published"),
    ]
    assert doc.dp_rank_count == 2
    # Every rank appears exactly once, in one list or the other.
    ranks = [load.dp_rank for load in doc.loads] + [u.dp_rank for u in doc.unavailable]
    assert sorted(ranks) == list(range(5))


def test_include_queues_alone_keeps_core_and_a_true_aggregate() -> None:
    # The bug: include=queues dropped the core keys, and the aggregate summed nothing.
    doc = render_json(golden_reads(), "queues", FIXED_NOW)
    assert doc["aggregate"]["total_running_reqs"] == 25
    assert doc["aggregate"]["total_reqs"] == 31
    first = doc["loads"][0]
    assert first["num_running_reqs"] == 12 and "queues" in first and "memory" not in first


def test_counts_are_clamped_to_32_bits() -> None:
    huge = LoadSnapshot(
        dp_rank=0,
        num_used_tokens=2**40,
        num_running_reqs=2**33,
        memory=MemorySection(kv_token_capacity=2**35),
    )
    read = SlotRead(0, SlotStatus.FRESH, huge, 0.1, 1, 1, 1)
    doc = build_document([read], "all")
    load = doc.loads[0]
    assert load.num_used_tokens == load.num_running_reqs == I32_MAX
    assert load.num_total_reqs == I32_MAX
    assert isinstance(load.memory, MemoryMetrics) and load.memory.token_capacity == I32_MAX
    assert doc.aggregate.total_running_reqs == I32_MAX
    # The clamp is in the schema too: a document never carries a value routers cannot parse.
    msgspec.json.decode(msgspec.json.encode(doc), type=LoadsDocument)


def test_legacy_get_load_is_sglang_routers_shape() -> None:
    doc = build_document(golden_reads(), "core", FIXED_NOW)
    assert msgspec.to_builtins(legacy_loads(doc)) == [
        {"dp_rank": 0, "num_reqs": 15, "num_waiting_reqs": 3, "num_tokens": 41000},
        {"dp_rank": 1, "num_reqs": 16, "num_waiting_reqs": 3, "num_tokens": 41000},
    ]


def test_status_and_reason_literals_cover_every_status_and_segment_state() -> None:
    labels = {status.label for status in SlotStatus}
    assert set(StatusLabel.__args__) == labels  # type: ignore[attr-defined]
    states = {state.value for state in SegmentState if state is not SegmentState.OK}
    expected = states | {"dead", "no_data"} | labels
    assert set(UnavailableReason.__args__) == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize("include", ["core", "memory", "spec,lora", "disagg", "queues", "all"])
def test_document_decodes_against_its_own_schema(include: str) -> None:
    doc = build_document(golden_reads(), include, FIXED_NOW)
    again = msgspec.json.decode(msgspec.json.encode(doc), type=LoadsDocument)
    assert again == doc
