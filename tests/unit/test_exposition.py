# ruff: noqa: E501
"""Golden tests for the pure renderers: the full Prometheus text byte for byte, time fixed."""

from __future__ import annotations

import json
from typing import Any, Final

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
from tests.helpers import FIXED_NOW, busy_snapshot, check_promtool


def fixed_reads() -> list[SlotRead]:
    """Four ranks: fresh with sections, stale, dead (writer detached), never published."""
    s0 = busy_snapshot(
        0,
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
loadsnap_num_requests_running{dp_rank="0",instance="demo",model="llama-8b"} 12.0
# HELP loadsnap_num_requests_waiting Requests queued on the rank, not running.
# TYPE loadsnap_num_requests_waiting gauge
loadsnap_num_requests_waiting{dp_rank="0",instance="demo",model="llama-8b"} 3.0
# HELP loadsnap_kv_cache_usage_perc KV-cache (token pool) utilization as a ratio from 0 to 1.
# TYPE loadsnap_kv_cache_usage_perc gauge
loadsnap_kv_cache_usage_perc{dp_rank="0",instance="demo",model="llama-8b"} 0.4
# HELP loadsnap_num_waiting_uncached_tokens Number of uncached input tokens waiting for prefill compute.
# TYPE loadsnap_num_waiting_uncached_tokens gauge
loadsnap_num_waiting_uncached_tokens{dp_rank="0",instance="demo",model="llama-8b"} 900.0
# HELP loadsnap_num_used_tokens Number of tokens in use.
# TYPE loadsnap_num_used_tokens gauge
loadsnap_num_used_tokens{dp_rank="0",instance="demo",model="llama-8b"} 40000.0
# HELP loadsnap_num_total_tokens Used tokens plus pending prefill tokens.
# TYPE loadsnap_num_total_tokens gauge
loadsnap_num_total_tokens{dp_rank="0",instance="demo",model="llama-8b"} 41000.0
# HELP loadsnap_max_total_num_tokens Maximum token capacity.
# TYPE loadsnap_max_total_num_tokens gauge
loadsnap_max_total_num_tokens{dp_rank="0",instance="demo",model="llama-8b"} 100000.0
# HELP loadsnap_max_running_requests Maximum running requests capacity.
# TYPE loadsnap_max_running_requests gauge
loadsnap_max_running_requests{dp_rank="0",instance="demo",model="llama-8b"} 64.0
# HELP loadsnap_gen_throughput_tokens_per_second Recent generation throughput in tokens per second.
# TYPE loadsnap_gen_throughput_tokens_per_second gauge
loadsnap_gen_throughput_tokens_per_second{dp_rank="0",instance="demo",model="llama-8b"} 1520.5
# HELP loadsnap_cache_hit_ratio Prefix-cache hit ratio from 0 to 1.
# TYPE loadsnap_cache_hit_ratio gauge
loadsnap_cache_hit_ratio{dp_rank="0",instance="demo",model="llama-8b"} 0.25
# HELP loadsnap_utilization_ratio Rank utilization as a ratio from 0 to 1.
# TYPE loadsnap_utilization_ratio gauge
loadsnap_utilization_ratio{dp_rank="0",instance="demo",model="llama-8b"} 0.75
# HELP loadsnap_snapshot_age_seconds Seconds since the rank's latest snapshot was published (reader's monotonic clock).
# TYPE loadsnap_snapshot_age_seconds gauge
loadsnap_snapshot_age_seconds{dp_rank="0",instance="demo",model="llama-8b"} 0.015
loadsnap_snapshot_age_seconds{dp_rank="1",instance="demo",model="llama-8b"} 3.0
loadsnap_snapshot_age_seconds{dp_rank="2",instance="demo",model="llama-8b"} 10.25
# HELP loadsnap_last_publish_timestamp_seconds Wall-clock time of the rank's latest publish, in seconds since the Unix epoch.
# TYPE loadsnap_last_publish_timestamp_seconds gauge
loadsnap_last_publish_timestamp_seconds{dp_rank="0",instance="demo",model="llama-8b"} 1.7000000002499998e+09
loadsnap_last_publish_timestamp_seconds{dp_rank="1",instance="demo",model="llama-8b"} 1.699999997e+09
loadsnap_last_publish_timestamp_seconds{dp_rank="2",instance="demo",model="llama-8b"} 1.69999999e+09
# HELP loadsnap_publishes_total Snapshots published into the rank's slot (the record sequence).
# TYPE loadsnap_publishes_total counter
loadsnap_publishes_total{dp_rank="0",instance="demo",model="llama-8b"} 101.0
loadsnap_publishes_total{dp_rank="1",instance="demo",model="llama-8b"} 55.0
loadsnap_publishes_total{dp_rank="2",instance="demo",model="llama-8b"} 9.0
# HELP loadsnap_scheduler_cycles_total Scheduler loop iterations reported by the rank.
# TYPE loadsnap_scheduler_cycles_total counter
loadsnap_scheduler_cycles_total{dp_rank="0",instance="demo",model="llama-8b"} 1500.0
loadsnap_scheduler_cycles_total{dp_rank="1",instance="demo",model="llama-8b"} 800.0
loadsnap_scheduler_cycles_total{dp_rank="2",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_accepted_dispatches_total Highest dispatch sequence the rank has absorbed contiguously (per writer epoch).
# TYPE loadsnap_accepted_dispatches_total counter
loadsnap_accepted_dispatches_total{dp_rank="0",instance="demo",model="llama-8b"} 77.0
loadsnap_accepted_dispatches_total{dp_rank="1",instance="demo",model="llama-8b"} 40.0
loadsnap_accepted_dispatches_total{dp_rank="2",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_writer_epoch Times a writer has attached to the rank's slot; a change means a restart.
# TYPE loadsnap_writer_epoch gauge
loadsnap_writer_epoch{dp_rank="0",instance="demo",model="llama-8b"} 1.0
loadsnap_writer_epoch{dp_rank="1",instance="demo",model="llama-8b"} 2.0
loadsnap_writer_epoch{dp_rank="2",instance="demo",model="llama-8b"} 1.0
# HELP loadsnap_rank_status 1 for the rank's current status (fresh, stale, dead, never_published, torn, invalid).
# TYPE loadsnap_rank_status gauge
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="fresh"} 1.0
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="stale"} 0.0
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="dead"} 0.0
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="never_published"} 0.0
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="torn"} 0.0
loadsnap_rank_status{dp_rank="0",instance="demo",model="llama-8b",status="invalid"} 0.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="fresh"} 0.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="stale"} 1.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="dead"} 0.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="never_published"} 0.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="torn"} 0.0
loadsnap_rank_status{dp_rank="1",instance="demo",model="llama-8b",status="invalid"} 0.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="fresh"} 0.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="stale"} 0.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="dead"} 1.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="never_published"} 0.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="torn"} 0.0
loadsnap_rank_status{dp_rank="2",instance="demo",model="llama-8b",status="invalid"} 0.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="fresh"} 0.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="stale"} 0.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="dead"} 0.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="never_published"} 1.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="torn"} 0.0
loadsnap_rank_status{dp_rank="3",instance="demo",model="llama-8b",status="invalid"} 0.0
# HELP loadsnap_memory_weight_bytes Model weight memory.
# TYPE loadsnap_memory_weight_bytes gauge
loadsnap_memory_weight_bytes{dp_rank="0",instance="demo",model="llama-8b"} 1.6e+10
# HELP loadsnap_memory_kv_cache_bytes KV cache memory.
# TYPE loadsnap_memory_kv_cache_bytes gauge
loadsnap_memory_kv_cache_bytes{dp_rank="0",instance="demo",model="llama-8b"} 4e+10
# HELP loadsnap_memory_graph_bytes CUDA graph memory.
# TYPE loadsnap_memory_graph_bytes gauge
loadsnap_memory_graph_bytes{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_memory_token_capacity Max tokens in KV cache.
# TYPE loadsnap_memory_token_capacity gauge
loadsnap_memory_token_capacity{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_prefill_prealloc_queue_reqs Prefill prealloc queue requests.
# TYPE loadsnap_disagg_prefill_prealloc_queue_reqs gauge
loadsnap_disagg_prefill_prealloc_queue_reqs{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_prefill_inflight_queue_reqs Prefill inflight queue requests.
# TYPE loadsnap_disagg_prefill_inflight_queue_reqs gauge
loadsnap_disagg_prefill_inflight_queue_reqs{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_decode_prealloc_queue_reqs Decode prealloc queue requests.
# TYPE loadsnap_disagg_decode_prealloc_queue_reqs gauge
loadsnap_disagg_decode_prealloc_queue_reqs{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_decode_transfer_queue_reqs Decode transfer queue requests.
# TYPE loadsnap_disagg_decode_transfer_queue_reqs gauge
loadsnap_disagg_decode_transfer_queue_reqs{dp_rank="0",instance="demo",model="llama-8b"} 2.0
# HELP loadsnap_disagg_decode_retracted_queue_reqs Decode retracted queue requests.
# TYPE loadsnap_disagg_decode_retracted_queue_reqs gauge
loadsnap_disagg_decode_retracted_queue_reqs{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_kv_transfer_bytes_per_second KV transfer speed in bytes per second.
# TYPE loadsnap_disagg_kv_transfer_bytes_per_second gauge
loadsnap_disagg_kv_transfer_bytes_per_second{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_kv_transfer_latency_seconds KV transfer latency.
# TYPE loadsnap_disagg_kv_transfer_latency_seconds gauge
loadsnap_disagg_kv_transfer_latency_seconds{dp_rank="0",instance="demo",model="llama-8b"} 0.0
# HELP loadsnap_disagg_mode 1 for the rank's disaggregation mode.
# TYPE loadsnap_disagg_mode gauge
loadsnap_disagg_mode{dp_rank="0",instance="demo",mode="decode",model="llama-8b"} 1.0
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


def test_prometheus_sglang_prefix_reproduces_reference_names() -> None:
    text = render_prometheus(fixed_reads(), prefix="sglang_")
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
    assert usage == {"0": 0.4}  # the stale and dead ranks' last loads are not exported


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


# sglang's own names carry its units (`_gb`, `_gb_s`, `_ms`); promtool's linter flags exactly
# these, and the native scheme renames them to base units.
SGLANG_ABBREVIATED_UNITS: Final[tuple[str, ...]] = (
    "sglang_memory_weight_gb",
    "sglang_memory_kv_cache_gb",
    "sglang_memory_graph_gb",
    "sglang_disagg_kv_transfer_speed_gb_s",
    "sglang_disagg_kv_transfer_latency_ms",
)


def test_promtool_accepts_both_prefixes(promtool: str) -> None:
    check_promtool(promtool, GOLDEN_NATIVE)
    check_promtool(promtool, render_prometheus(fixed_reads(), include="all"))
    check_promtool(
        promtool,
        render_prometheus(fixed_reads(), prefix="sglang_", include="all"),
        abbreviated_units=SGLANG_ABBREVIATED_UNITS,
    )


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
    assert render_prometheus([]) == ""
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
    # Only the fresh rank is routable; the stale, dead and never-published ones are listed
    # apart, with their status, reason and age.
    assert [load["dp_rank"] for load in doc["loads"]] == [0]
    assert doc["dp_rank_count"] == 1
    first = doc["loads"][0]
    expected = fixed_reads()[1].snapshot
    assert expected is not None
    for key in (
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
        "cycle",
        "epoch",
        "last_accepted_dispatch_seq",
        "publish_wall_ns",
    ):
        assert first[key] == getattr(expected, key), key
    assert first["seq"] == 101
    assert first["num_total_reqs"] == 15
    assert first["age_seconds"] == 0.015
    assert first["status"] == "fresh"
    assert doc["unavailable"] == [
        {"dp_rank": 1, "status": "stale", "reason": "age 3.000s > budget 2.0s", "age_seconds": 3.0},
        {"dp_rank": 2, "status": "dead", "reason": "writer detached", "age_seconds": 10.25},
        {"dp_rank": 3, "status": "never_published", "reason": "no record yet", "age_seconds": None},
    ]
    # Aggregate over the routable ranks only, with sglang's keys and rounding.
    assert doc["aggregate"] == {
        "total_running_reqs": 12,
        "total_waiting_reqs": 3,
        "total_reqs": 15,
        "avg_token_usage": 0.4,
        "avg_throughput": 1520.5,
        "avg_utilization": 0.75,
    }
    json.dumps(doc)  # JSON-ready


def test_json_include_selects_sections_and_core_is_always_there() -> None:
    doc = render_json(fixed_reads(), "memory", FIXED_NOW)
    first = doc["loads"][0]
    assert first["num_running_reqs"] == 12  # core keys are always present, as in sglang
    assert first["memory"] == {
        "weight_gb": 16_000_000_000 / 2**30,
        "kv_cache_gb": 40_000_000_000 / 2**30,
        "graph_gb": 0.0,
        "token_capacity": 0,
    }
    assert "disaggregation" not in first  # not selected
    full = render_json(fixed_reads(), "all", FIXED_NOW)["loads"][0]
    # Sections the writer did not fill are absent, as in sglang.
    assert {"memory", "disaggregation"} <= set(full)
    assert not {"speculative", "lora", "queues"} & set(full)


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
