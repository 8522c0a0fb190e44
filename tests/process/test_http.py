"""/v1/loads, /metrics and /healthz over real HTTP: uvicorn on 127.0.0.1, real segments."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from loadsnap import (
    HotTable,
    LoadSnapshot,
    MemorySection,
    ShmWriter,
    SlotRead,
    SlotStatus,
    UsageError,
    unlink_segment,
)
from loadsnap.http import LockedSource, loads_router, parse_loads_query
from loadsnap.layout import HEADER_SIZE, HEADER_STRUCT, LAYOUT_MAJOR, LAYOUT_MINOR, MAGIC
from loadsnap.metrics import LoadsnapCollector
from loadsnap.server import ServerThread, create_app
from tests.helpers import check_promtool, promtool_path

DP = 3


def _snapshot(rank: int) -> LoadSnapshot:
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=rank + 2,
        num_waiting_reqs=rank,
        token_usage=0.1 * (rank + 1),
        gen_throughput=100.0 * (rank + 1),
        max_running_requests=32,
        memory=MemorySection(weight_bytes=1000 + rank),
    )


@pytest.fixture
def dp_size() -> int:
    return DP


@pytest.fixture
def published(writers: list[ShmWriter]) -> list[ShmWriter]:
    for rank, writer in enumerate(writers):
        writer.publish(_snapshot(rank))
    return writers


@pytest.fixture
def server(instance: str) -> Iterator[ServerThread]:
    with ServerThread(create_app(instance, const_labels={"model": "m"})) as srv:
        yield srv


def _get(srv: ServerThread, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(srv.url + path, timeout=10.0, **kwargs)


def _unique_series(text: str, openmetrics: bool = False) -> list[tuple[str, Any]]:
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in parse(text) for s in f.samples]
    assert len(series) == len(set(series)), "duplicate series"
    return series


# --- happy paths ------------------------------------------------------------------------------


def test_json_every_rank_fresh(server: ServerThread, published: list[ShmWriter]) -> None:
    response = _get(server, "/v1/loads")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["dp_rank_count"] == DP
    assert [load["dp_rank"] for load in doc["loads"]] == list(range(DP))
    for rank, load in enumerate(doc["loads"]):
        assert load["status"] == "fresh"
        assert 0.0 <= load["age_seconds"] < 5.0
        assert load["num_running_reqs"] == rank + 2
        assert load["seq"] == 1
        # include defaults to sglang's "all": the sections the writer filled, in sglang's units
        assert load["memory"]["weight_gb"] == (1000 + rank) / 2**30
        assert "speculative" not in load
    assert doc["aggregate"]["total_running_reqs"] == 2 + 3 + 4


def test_json_dp_rank_and_include(server: ServerThread, published: list[ShmWriter]) -> None:
    doc = _get(server, "/v1/loads", params={"dp_rank": "1", "include": "core,memory"}).json()
    assert [load["dp_rank"] for load in doc["loads"]] == [1]
    memory = {"weight_gb": 1001 / 2**30, "kv_cache_gb": 0.0, "graph_gb": 0.0, "token_capacity": 0}
    assert doc["loads"][0]["memory"] == memory
    doc = _get(server, "/v1/loads", params={"include": "core"}).json()
    assert "memory" not in doc["loads"][0]


def test_prometheus_text(server: ServerThread, published: list[ShmWriter]) -> None:
    response = _get(server, "/v1/loads", params={"format": "prometheus", "include": "all"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    series = _unique_series(response.text)
    running = {dict(labels)["dp_rank"] for name, labels in series if name.endswith("running")}
    assert running == {"0", "1", "2"}
    assert all(dict(labels)["model"] == "m" for _, labels in series)
    check_promtool(promtool_path(), response.text)


def test_openmetrics_via_accept_header(server: ServerThread, published: list[ShmWriter]) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    for params in ({"format": "prometheus"}, {}):
        response = _get(server, "/v1/loads", params=params, headers=accept)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")
        _unique_series(response.text, openmetrics=True)


# --- bad input: 400 with what is valid --------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"dp_rank": "abc"}, "dp_rank: expected a non-negative integer, found 'abc'"),
        ({"dp_rank": "-1"}, "non-negative integer"),
        ({"dp_rank": "1.5"}, "non-negative integer"),
        ({"dp_rank": "\u0661"}, "non-negative integer"),  # a non-ASCII digit one
        ({"dp_rank": "7"}, "dp_rank out of range: dp_rank=7; valid: 0..2"),
        ({"include": "core,bogus"}, "unknown section bogus; valid: core, memory"),
        ({"include": ""}, "unknown section <empty>"),
        ({"format": "xml"}, "format: unknown value 'xml'; valid: json, prometheus, openmetrics"),
    ],
)
def test_bad_input_is_400_with_valid_values(
    server: ServerThread, published: list[ShmWriter], params: dict[str, str], needle: str
) -> None:
    response = _get(server, "/v1/loads", params=params)
    assert response.status_code == 400
    assert needle in response.json()["detail"]


# --- no data: 503 with the reason -------------------------------------------------------------


def test_503_segment_missing(server: ServerThread) -> None:
    response = _get(server, "/v1/loads")
    assert response.status_code == 503
    assert response.json()["reason"] == "missing"
    assert "no segment" in response.json()["detail"]
    assert response.headers["retry-after"] == "1"
    assert _get(server, "/healthz").status_code == 503


def test_503_nothing_published_yet(server: ServerThread, writers: list[ShmWriter]) -> None:
    response = _get(server, "/v1/loads")
    assert response.status_code == 503
    assert response.json()["reason"] == "no_data"
    assert "never_published=3" in response.json()["detail"]


def test_503_every_rank_dead(instance: str, server: ServerThread) -> None:
    writers = [ShmWriter(instance, DP, rank) for rank in range(DP)]
    for rank, writer in enumerate(writers):
        writer.publish(_snapshot(rank))
    for writer in writers:
        writer.close(unlink_if_last=False)
    response = _get(server, "/v1/loads")
    assert response.status_code == 503
    assert response.json()["reason"] == "dead"
    assert "every rank is dead" in response.json()["detail"]
    # One rank asked for: a 503 naming its status (a dead rank's load is never served).
    response = _get(server, "/v1/loads", params={"dp_rank": "0"})
    assert response.status_code == 503
    assert response.json()["reason"] == "dead"


def test_503_single_rank_never_published(server: ServerThread, writers: list[ShmWriter]) -> None:
    writers[0].publish(_snapshot(0))
    assert _get(server, "/v1/loads").status_code == 200
    response = _get(server, "/v1/loads", params={"dp_rank": "2"})
    assert response.status_code == 503
    assert response.json()["reason"] == "never_published"


def _write_header(path: Path, *, magic: int, ready: int) -> None:
    header = HEADER_STRUCT.pack(
        magic,
        LAYOUT_MAJOR,
        LAYOUT_MINOR,
        HEADER_SIZE,
        1,
        0,
        64,
        os.getpid(),
        os.getuid(),
        0,
        0,
        1,
        ready,
    )
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, header.ljust(HEADER_SIZE, b"\0"))
    finally:
        os.close(fd)


@pytest.mark.parametrize(("magic", "reason"), [(MAGIC, "not_ready"), (0xBAD, "incompatible")])
def test_503_not_ready_and_incompatible(tmp_path: Path, magic: int, reason: str) -> None:
    name = "hdr"
    _write_header(tmp_path / f"loadsnap-{name}", magic=magic, ready=0)
    with ServerThread(create_app(name, shm_dir=str(tmp_path))) as srv:
        response = _get(srv, "/v1/loads")
        assert response.status_code == 503
        assert response.json()["reason"] == reason
        health = _get(srv, "/healthz")
        assert health.status_code == 503
        assert health.json()["segment"] == reason
    unlink_segment(name, str(tmp_path))


# --- /metrics and /healthz --------------------------------------------------------------------


def test_metrics_and_healthz(server: ServerThread, published: list[ShmWriter]) -> None:
    _get(server, "/v1/loads")
    response = _get(server, "/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["loadsnap_reader_reads"].type == "counter"
    assert families["loadsnap_reader_reads"].samples[0].value >= DP
    fresh = [s for s in families["loadsnap_ranks"].samples if s.labels["status"] == "fresh"]
    assert fresh[0].value == DP
    publishes = {s.labels["dp_rank"]: s.value for s in families["loadsnap_slot_publishes"].samples}
    assert publishes == {"0": 1.0, "1": 1.0, "2": 1.0}
    refused = families["loadsnap_slot_refused_payloads"].samples
    assert [s.value for s in refused] == [0.0, 0.0, 0.0]
    _unique_series(response.text)
    check_promtool(promtool_path(), response.text)
    health = _get(server, "/healthz")
    assert health.status_code == 200
    assert health.json()["ranks"]["fresh"] == DP


def test_metrics_openmetrics(server: ServerThread, published: list[ShmWriter]) -> None:
    response = _get(server, "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    _unique_series(response.text, openmetrics=True)


def test_provider_hook_exports_and_survives_errors(
    instance: str, published: list[ShmWriter]
) -> None:
    app = create_app(instance)
    collector: LoadsnapCollector = app.state.collector
    dispatched = [5, 7, 9]
    collector.add_provider(
        "controller_dispatches_total",
        "Requests dispatched, per rank.",
        "counter",
        ("dp_rank",),
        lambda: {(str(rank),): n for rank, n in enumerate(dispatched)},
    )
    collector.add_provider(
        "ledger_depth", "Unacknowledged dispatches.", "gauge", (), lambda: {(): 3}
    )

    def broken() -> dict[tuple[str, ...], float]:
        raise RuntimeError("provider bug")

    collector.add_provider("broken", "Always raises.", "gauge", (), broken)
    with pytest.raises(UsageError, match="_total"):
        collector.add_provider("bad_counter", "x", "counter", (), lambda: {})
    with pytest.raises(UsageError, match="already registered"):
        collector.add_provider("ledger_depth", "x", "gauge", (), lambda: {})
    with ServerThread(app) as srv:
        text = _get(srv, "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {
        s.labels["dp_rank"]: s.value for s in families["loadsnap_controller_dispatches"].samples
    }
    assert values == {"0": 5.0, "1": 7.0, "2": 9.0}
    assert families["loadsnap_ledger_depth"].samples[0].value == 3.0
    errors = families["loadsnap_metric_provider_errors"].samples
    assert [(s.labels["provider"], s.value) for s in errors] == [("broken", 1.0)]


# --- the router in any app, off the event loop ------------------------------------------------


class SlowSource:
    """A test double whose reads block for a while (a stand-in for a slow reader)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.entered = threading.Event()

    @property
    def dp_size(self) -> int:
        return 1

    @property
    def stale_after_s(self) -> float:
        return 2.0

    def read_all(self) -> list[SlotRead]:
        self.entered.set()
        time.sleep(self.delay_s)
        snap = LoadSnapshot(dp_rank=0, num_running_reqs=1)
        return [SlotRead(0, SlotStatus.FRESH, snap, 0.0, 1, 1, os.getpid())]

    def hot_table(self) -> HotTable:
        raise NotImplementedError


def test_router_mounts_in_one_line_and_never_blocks_the_loop() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    source = SlowSource(delay_s=1.0)
    app.include_router(loads_router(source))
    with ServerThread(app) as srv:
        result: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: result.append(_get(srv, "/v1/loads")))
        slow.start()
        assert source.entered.wait(5.0)
        started = time.monotonic()
        assert _get(srv, "/ping").json() == {"pong": True}
        assert time.monotonic() - started < 0.5  # the loop kept serving during the slow read
        slow.join(10.0)
        assert result[0].status_code == 200


def test_locked_source_serialises_calls() -> None:
    source = SlowSource(delay_s=0.05)
    locked = LockedSource(source)
    active = 0
    peak = 0
    guard = threading.Lock()
    original = source.read_all

    def counting() -> list[SlotRead]:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        try:
            return original()
        finally:
            with guard:
                active -= 1

    source.read_all = counting  # type: ignore[method-assign]
    threads = [threading.Thread(target=locked.read_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5.0)
    assert peak == 1


@pytest.mark.parametrize(
    ("accept", "fmt", "expected"),
    [
        ("", None, "json"),
        ("*/*", None, "json"),
        ("application/openmetrics-text", None, "openmetrics"),
        ("text/plain", "prometheus", "prometheus"),
        ("application/openmetrics-text;version=1.0.0", "prometheus", "openmetrics"),
        ("application/openmetrics-text", "json", "json"),
        ("", "PROMETHEUS", "prometheus"),
    ],
)
def test_parse_query_negotiates_format(accept: str, fmt: str | None, expected: str) -> None:
    assert parse_loads_query(None, None, fmt, accept).format == expected


def test_create_app_needs_exactly_one_source(instance: str) -> None:
    with pytest.raises(UsageError):
        create_app()
    with pytest.raises(UsageError):
        create_app(instance, source=SlowSource(0.0))
