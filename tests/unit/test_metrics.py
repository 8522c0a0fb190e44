# ruff: noqa: E501
"""``loadsnap.metrics``: the ZMQ collector's families, golden text, and a bad stats file."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from loadsnap.collector_stats import CollectorStats, CollectorStatsRead
from loadsnap.errors import LayoutError
from loadsnap.metrics import LoadsnapCollector

GOLDEN = """\
# HELP loadsnap_collector_frames_received_total Frames the ZMQ collector took in.
# TYPE loadsnap_collector_frames_received_total counter
loadsnap_collector_frames_received_total 120.0
# HELP loadsnap_collector_frames_relayed_total Snapshots the ZMQ collector wrote into the segment.
# TYPE loadsnap_collector_frames_relayed_total counter
loadsnap_collector_frames_relayed_total 100.0
# HELP loadsnap_collector_epoch_takeovers_total Ranks whose lower epoch replaced one that had gone quiet (a restart on a host whose clock is behind).
# TYPE loadsnap_collector_epoch_takeovers_total counter
loadsnap_collector_epoch_takeovers_total 1.0
# HELP loadsnap_collector_connections_total TCP connections the collector accepted.
# TYPE loadsnap_collector_connections_total counter
loadsnap_collector_connections_total 9.0
# HELP loadsnap_collector_disconnects_total Peer connections closed, whatever the cause: writers that went away, failed handshakes, and writers libzmq cut off for a frame above max_message_bytes (MAXMSGSIZE), which libzmq reports as a plain disconnect.
# TYPE loadsnap_collector_disconnects_total counter
loadsnap_collector_disconnects_total 6.0
# HELP loadsnap_collector_handshakes_total ZMTP handshakes completed (CURVE-authenticated when keys are on).
# TYPE loadsnap_collector_handshakes_total counter
loadsnap_collector_handshakes_total 3.0
# HELP loadsnap_collector_frames_dropped_total Frames the ZMQ collector received and dropped, by reason: oversized (snapshot above the slot's payload capacity), undecodable, invalid, wrong_instance (no instance, or another deployment's), rank_out_of_range, rank_not_allowed (CURVE key not bound to the rank), stale_epoch, out_of_order, relay_errors. Frames above max_message_bytes never arrive: see collector_disconnects_total.
# TYPE loadsnap_collector_frames_dropped_total counter
loadsnap_collector_frames_dropped_total{reason="oversized"} 1.0
loadsnap_collector_frames_dropped_total{reason="undecodable"} 2.0
loadsnap_collector_frames_dropped_total{reason="invalid"} 3.0
loadsnap_collector_frames_dropped_total{reason="wrong_instance"} 4.0
loadsnap_collector_frames_dropped_total{reason="rank_out_of_range"} 0.0
loadsnap_collector_frames_dropped_total{reason="rank_not_allowed"} 10.0
loadsnap_collector_frames_dropped_total{reason="stale_epoch"} 0.0
loadsnap_collector_frames_dropped_total{reason="out_of_order"} 0.0
loadsnap_collector_frames_dropped_total{reason="relay_errors"} 0.0
# HELP loadsnap_collector_handshake_failures_total Handshakes the ZMQ collector refused, by kind: auth_rejected (CURVE key not on the allow-list), protocol (mechanism mismatch such as a writer without keys, a wrong server key, another ZMTP error).
# TYPE loadsnap_collector_handshake_failures_total counter
loadsnap_collector_handshake_failures_total{kind="auth_rejected"} 2.0
loadsnap_collector_handshake_failures_total{kind="protocol"} 5.0
# HELP loadsnap_collector_start_time_seconds When the running ZMQ collector started (Unix time): its counters start from 0 then.
# TYPE loadsnap_collector_start_time_seconds gauge
loadsnap_collector_start_time_seconds 1.7e+09
# HELP loadsnap_metric_provider_errors_total Scrapes at which a metric provider raised, per provider.
# TYPE loadsnap_metric_provider_errors_total counter
"""


def _render(collector: LoadsnapCollector) -> str:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_collector_families_golden() -> None:
    stats = CollectorStats(
        received=120,
        relayed=100,
        oversized=1,
        undecodable=2,
        invalid=3,
        wrong_instance=4,
        rank_not_allowed=10,
        epoch_takeovers=1,
        connections=9,
        disconnects=6,
        handshakes=3,
        auth_rejected=2,
        handshake_failed=5,
    )
    read = CollectorStatsRead(stats, pid=7, started_wall_ns=1_700_000_000_000_000_000)
    assert _render(LoadsnapCollector(collector_stats=lambda: read)) == GOLDEN


def test_no_collector_no_families() -> None:
    text = _render(LoadsnapCollector(collector_stats=lambda: None))
    assert "loadsnap_collector_" not in text


def test_damaged_stats_file_is_counted_not_fatal() -> None:
    def damaged() -> CollectorStatsRead | None:
        raise LayoutError("bad magic: expected=0x1 found=0x2 (path=/dev/shm/x)")

    text = _render(LoadsnapCollector(collector_stats=damaged))
    assert "loadsnap_collector_frames" not in text
    assert 'loadsnap_metric_provider_errors_total{provider="collector_stats"} 1.0' in text
