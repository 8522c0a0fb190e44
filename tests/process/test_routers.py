"""The real routers against the fake sglang worker on 127.0.0.1: SMG 1.13.0 (PyPI ``smg``) over
HTTP and over gRPC (its poll and its pushed-load stream), and the legacy sglang-router 0.3.2.

* SMG's own view (``/get_loads`` and its ``smg_engine_*`` gauges) equals what ``/v1/loads``
  serves, sections included, on all three paths.
* A SIGKILLed (dead) or SIGSTOPped (stale) scheduler of the demo's reference fleet disappears
  from SMG's view once the staleness budget passed, while the other rank stays.
* ``loadsnap demo --grpc-port`` is registered by SMG over both transports.
* sglang-router reads ``/get_load``: its load is the ranks' tokens, not -1.

Routers run as ``python -m smg|sglang_router launch`` (dp_controller.harness.routers) and are
killed after each test; the tests skip, naming the reason, only if a router cannot run here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dp_controller.harness.engine import add_engine_servicers, engine_app
from dp_controller.harness.fleet import SchedulerFleet
from dp_controller.harness.routers import (
    RouterProcess,
    router_unavailable,
    start_sglang_router,
    start_smg,
    wait_for,
)
from loadsnap import (
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    ShmReader,
    ShmWriter,
    SpeculativeSection,
)
from loadsnap.grpc_loads import LoadServicer
from loadsnap.grpc_server import GrpcServerThread
from loadsnap.server import ServerThread
from tests.helpers import report

DP = 2
POLL_S = 1  # SMG's shortest load-monitor interval
SETTLE_S = 20.0  # bound on every wait for the router to reflect something
STALE_AFTER_S = 1.0
# SMG's per-rank keys that carry the document's figure under the document's name.
CORE = (
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_total_reqs",
    "num_used_tokens",
    "max_total_num_tokens",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
    "max_running_requests",
)
GAUGES = {  # smg_engine_<name> -> document key
    "running_requests": "num_running_reqs",
    "waiting_requests": "num_waiting_reqs",
    "token_usage": "token_usage",
    "gen_throughput": "gen_throughput",
    "cache_hit_rate": "cache_hit_rate",
}


def _require(package: str) -> None:
    reason = router_unavailable(package)
    if reason is not None:
        pytest.skip(reason)


def _snapshot(rank: int) -> LoadSnapshot:
    """Distinct figures in every field and section, so a mapping slip cannot hide."""
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=5 + rank,
        num_waiting_reqs=2 + rank,
        num_waiting_uncached_tokens=300 + rank,
        num_used_tokens=1000 * (rank + 1),
        num_total_tokens=1500 * (rank + 1),
        max_total_num_tokens=100_000,
        max_running_requests=64 + rank,
        token_usage=0.01 * (rank + 1),
        gen_throughput=123.5 + rank,
        cache_hit_rate=0.25 + 0.1 * rank,
        utilization=0.5 + 0.1 * rank,
        memory=MemorySection(
            weight_bytes=(3 + rank) * 2**30,
            kv_cache_bytes=(5 + rank) * 2**29,
            graph_gb=0.25,
            kv_token_capacity=100_000 + rank,
        ),
        speculative=SpeculativeSection(accept_length=2.5, accept_rate=0.7),
        lora=LoraSection(max_loaded_adapters=4, loaded_adapters=["a"]),
        disaggregation=DisaggregationSection(
            mode="decode",
            num_bootstrap_queue_reqs=1 + rank,
            num_inflight_queue_reqs=2,
            num_prealloc_queue_reqs=3,
            num_transfer_queue_reqs=4,
            decode_retracted_queue_reqs=5,
            kv_transfer_speed_gb_s=6.5,
            kv_transfer_latency_ms=7.5,
        ),
        queues=QueueSection(num_grammar_queue_reqs=1, num_paused_reqs=2, num_retracted_reqs=3),
    )


class Worker:
    """The fake engine over ``instance``: HTTP on one port, gRPC on another."""

    def __init__(self, instance: str, stale_after_s: float) -> None:
        self.reader = ShmReader(instance, stale_after_s=stale_after_s)
        self.http = ServerThread(engine_app(DP, instance, stale_after_s=stale_after_s))
        self.servicers: list[LoadServicer] = []

        def setup(server: Any) -> None:
            self.servicers.append(add_engine_servicers(server, self.reader, DP))

        self.grpc = GrpcServerThread(setup)

    def __enter__(self) -> Worker:
        self.http.start()
        try:
            self.grpc.start()
        except BaseException:
            self.http.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.grpc.stop()
        self.http.stop()
        self.reader.close()

    def url(self, transport: str) -> str:
        return self.http.url if transport == "http" else f"grpc://{self.grpc.target}"

    def v1_loads(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(self.http.url + "/v1/loads", timeout=5.0).json()
        return doc


@pytest.fixture
def static_worker(instance: str) -> Iterator[Worker]:
    """Two ranks holding distinct, constant loads (republished by nobody: a long budget)."""
    writers = [ShmWriter(instance, DP, rank) for rank in range(DP)]
    try:
        for rank, writer in enumerate(writers):
            writer.publish(_snapshot(rank))
        with Worker(instance, stale_after_s=3600.0) as worker:
            yield worker
    finally:
        for writer in writers:
            writer.close()


def _by_rank(loads: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(load["dp_rank"]): load for load in loads}


def _gauges(router: RouterProcess) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for family in text_string_to_metric_families(router.metrics_text()):
        for sample in family.samples:
            if sample.name.startswith("smg_engine_") and "dp_rank" in sample.labels:
                out[(sample.name.removeprefix("smg_engine_"), int(sample.labels["dp_rank"]))] = (
                    sample.value
                )
    return out


def _smg_view(router: RouterProcess, ranks: set[int]) -> dict[int, dict[str, Any]] | None:
    loads = router.get_loads().get("loads", [])
    view = _by_rank(loads)
    return view if set(view) == ranks else None


@pytest.mark.parametrize("path", ["http", "grpc-poll", "grpc-push"])
def test_smg_sees_what_v1_loads_serves_sections_included(
    static_worker: Worker, tmp_path: Path, path: str
) -> None:
    _require("smg")
    transport = "http" if path == "http" else "grpc"
    policy = "cache_aware" if path == "grpc-push" else "round_robin"
    served = _by_rank(static_worker.v1_loads()["loads"])
    with start_smg(static_worker.url(transport), str(tmp_path / "smg.log"), policy=policy) as smg:
        view = wait_for("SMG's view of both ranks", lambda: _smg_view(smg, {0, 1}), SETTLE_S)
        if path == "grpc-push":
            # SMG polls once before the stream's first records land; wait for pushed records
            # (EngineLoad has no utilization: SMG shows the pushed token_usage there).
            def pushed() -> dict[int, dict[str, Any]] | None:
                v = _smg_view(smg, {0, 1})
                ok = v and all(v[r]["utilization"] == served[r]["token_usage"] for r in v)
                return v if ok else None

            view = wait_for("pushed records in SMG's view", pushed, SETTLE_S)
        # Gauges are exported with the loads; wait until they are there too.
        gauges = wait_for(
            "smg_engine_* gauges",
            lambda: g if len(g := _gauges(smg)) >= DP * len(GAUGES) else None,
            SETTLE_S,
        )
        for rank, doc in served.items():
            mine = view[rank]
            for key in CORE:
                if path == "grpc-push" and key == "utilization":
                    continue  # checked above: the pushed token_usage
                assert mine[key] == doc[key], (path, rank, key)
            assert mine["memory"] == doc["memory"], (path, rank)
            assert mine["queues"] == doc["queues"], (path, rank)
            for gauge, key in GAUGES.items():
                assert gauges[(gauge, rank)] == doc[key], (path, rank, gauge)
            if transport == "grpc":  # SMG reads the disaggregation section over gRPC only
                disagg = doc["disaggregation"]
                assert mine["disagg_mode"] == disagg["mode"]
                assert mine["kv_transfer_speed_gb_s"] == disagg["kv_transfer_speed_gb_s"]
                assert mine["kv_transfer_latency_ms"] == disagg["kv_transfer_latency_ms"]
                prefill = (
                    disagg["prefill_prealloc_queue_reqs"] + disagg["prefill_inflight_queue_reqs"]
                )
                decode = (
                    disagg["decode_prealloc_queue_reqs"]
                    + disagg["decode_transfer_queue_reqs"]
                    + disagg["decode_retracted_queue_reqs"]
                )
                assert (mine["prefill_queue_reqs"], mine["decode_queue_reqs"]) == (prefill, decode)
                assert gauges[("pd_prefill_queue_reqs", rank)] == prefill
                assert gauges[("pd_decode_queue_reqs", rank)] == decode
        if path == "grpc-push":
            # The load came from our stream: SMG skips its GetLoads poll while records flow.
            wait_for("a poll skipped", lambda: _polls(smg).get("skipped_fresh_push"), SETTLE_S)
            assert static_worker.servicers[0].stats.records_sent >= DP
        else:
            polls = _polls(smg)
            assert polls.get("poll", 0) > 0 and "skipped_fresh_push" not in polls, polls


def _polls(router: RouterProcess) -> dict[str, float]:
    return {
        s.labels["mode"]: s.value
        for f in text_string_to_metric_families(router.metrics_text())
        if f.name == "smg_engine_load_polls"
        for s in f.samples
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "fault"),
    [("http", "sigkill"), ("http", "sigstop"), ("grpc-poll", "sigkill"), ("grpc-push", "sigkill")],
)
def test_smg_stops_presenting_a_dead_or_stale_rank(
    instance: str, tmp_path: Path, path: str, fault: str
) -> None:
    _require("smg")
    transport = "http" if path == "http" else "grpc"
    policy = "cache_aware" if path == "grpc-push" else "round_robin"
    with (
        SchedulerFleet(instance, DP, log_dir=str(tmp_path)) as fleet,
        Worker(instance, stale_after_s=STALE_AFTER_S) as worker,
    ):
        fleet.wait_ready()
        smg = start_smg(worker.url(transport), str(tmp_path / "smg.log"), policy=policy)
        with smg:
            wait_for("both ranks in SMG's view", lambda: _smg_view(smg, {0, 1}), SETTLE_S)
            faulted_at = time.monotonic()
            signum = signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP
            os.kill(fleet.procs[1].pid, signum)
            try:
                wait_for("rank 1 gone from SMG's view", lambda: _smg_view(smg, {0}), SETTLE_S)
                gone_after = time.monotonic() - faulted_at
                status = wait_for(
                    "rank 1 listed apart",
                    lambda: (
                        {u["dp_rank"]: u["status"] for u in worker.v1_loads()["unavailable"]}
                        or None
                    ),
                    SETTLE_S,
                )
                assert status == {1: "dead" if fault == "sigkill" else "stale"}
                # It stays gone (no stale push record comes back), and rank 0 stays.
                for _ in range(3 * POLL_S * 4):
                    assert _smg_view(smg, {0}) is not None
                    time.sleep(0.25)
            finally:
                if fault == "sigstop":
                    fleet.resume_process(1)
        # Bound: the budget (dead ranks: ~0.25 s) plus one SMG interval, plus start-up slack.
        report(
            f"smg_drops_{path}_{fault}".replace("-", "_"),
            {"gone_after_s": round(gone_after, 3), "stale_after_s": STALE_AFTER_S},
        )
        assert gone_after < STALE_AFTER_S + 3 * POLL_S + 2.0


@pytest.mark.slow
def test_smg_registers_the_demo_over_http_and_grpc(instance: str, tmp_path: Path) -> None:
    _require("smg")
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadsnap",
            "demo",
            "--instance",
            instance,
            "--dp-size",
            str(DP),
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--duration-s",
            "60",
            "--no-table",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        urls: dict[str, str] = {}
        deadline = time.monotonic() + SETTLE_S
        while len(urls) < 2 and time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "the demo stopped before printing its URLs"
            if m := re.search(r"(http://127\.0\.0\.1:\d+)/v1/loads$", line.strip()):
                urls["http"] = m.group(1)
            if m := re.search(r"(grpc://127\.0\.0\.1:\d+) \(fake engine\)", line):
                urls["grpc"] = m.group(1)
        assert set(urls) == {"http", "grpc"}, urls
        capacity = {
            load["dp_rank"]: load["max_total_num_tokens"]
            for load in httpx.get(urls["http"] + "/v1/loads", timeout=5.0).json()["loads"]
        }
        for transport, url in urls.items():
            with start_smg(url, str(tmp_path / f"smg-{transport}.log")) as smg:
                view = wait_for("the demo's ranks", lambda: _smg_view(smg, {0, 1}), SETTLE_S)
                seen = {rank: load["max_total_num_tokens"] for rank, load in view.items()}
                assert seen == capacity, transport
                workers = smg.get("/workers").json()["workers"]
                assert [w["status"] for w in workers] == ["ready"], workers
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.communicate(timeout=30)
    assert demo.returncode == 0


def test_sglang_router_reads_get_load(static_worker: Worker, tmp_path: Path) -> None:
    _require("sglang-router")
    expected = sum(load["num_total_tokens"] for load in static_worker.v1_loads()["loads"])
    with start_sglang_router(static_worker.url("http"), str(tmp_path / "router.log")) as router:
        doc = wait_for(
            "sglang-router's load",
            lambda: d if (d := router.get_loads())["workers"] else None,
            SETTLE_S,
        )
        assert doc["workers"] == [{"worker": static_worker.http.url, "load": expected}]
        assert expected == 1500 + 3000  # not -1: it parsed the array


# --- controls: the SMG behaviours the dead-rank rule is built around --------------------------


def _overloaded(router: RouterProcess) -> float | None:
    for family in text_string_to_metric_families(router.metrics_text()):
        if family.name == "smg_workers_overloaded":
            return sum(sample.value for sample in family.samples)
    return None


@pytest.mark.slow
def test_control_one_rank_presented_saturated_flags_the_whole_worker(
    instance: str, tmp_path: Path
) -> None:
    # Why a dead rank is omitted, never shown as saturated: SMG judges overload per worker.
    _require("smg")
    writers = [ShmWriter(instance, DP, rank) for rank in range(DP)]
    try:
        writers[0].publish(_snapshot(0))
        saturated = _snapshot(1)
        saturated.num_waiting_reqs = 20
        writers[1].publish(saturated)
        with (
            Worker(instance, stale_after_s=3600.0) as worker,
            start_smg(worker.url("http"), str(tmp_path / "smg.log")) as smg,
        ):
            wait_for("both ranks", lambda: _smg_view(smg, {0, 1}), SETTLE_S)
            flagged = wait_for("the worker flagged", lambda: _overloaded(smg) or None, SETTLE_S)
            assert flagged == 1.0  # one worker, rank 0 included
    finally:
        for writer in writers:
            writer.close()


@pytest.mark.slow
def test_control_smg_keeps_a_rank_whose_pushes_stop_while_others_flow(
    static_worker: Worker, tmp_path: Path
) -> None:
    # Why the stream goes quiet instead of just leaving a rank out: SMG 1.13 keeps showing the
    # last record pushed for a rank while the stream carries the others, even though its
    # GetLoads fallback no longer lists the rank.
    _require("smg")
    import asyncio

    import grpc
    from smg_grpc_proto.generated import common_pb2

    from loadsnap.exposition import build_document
    from loadsnap.grpc_loads import SERVICE, engine_load
    from loadsnap.http import LockedSource
    from loadsnap.testing import FakeSource

    fresh = build_document(static_worker.reader.read_all(), "all").loads
    only_rank_0 = FakeSource(DP, stale_after_s=3600.0)
    only_rank_0.publish(0, num_running_reqs=5)
    switch_after_s = 2.0

    async def stubborn(request: Any, context: Any) -> Any:
        start, sample = time.monotonic(), 0
        while True:
            ranks = (0, 1) if time.monotonic() - start < switch_after_s else (0,)
            for load in fresh:
                if load.dp_rank in ranks:
                    sample += 1
                    record = engine_load(load, age_ms=0, sample=sample)
                    yield common_pb2.KvEventBatch(dp_rank=load.dp_rank, load=record)
            await asyncio.sleep(0.1)

    def setup(server: Any) -> None:
        add_engine_servicers(server, LockedSource(only_rank_0), DP)  # GetLoads: rank 0 only
        handler = grpc.unary_stream_rpc_method_handler(
            stubborn,
            request_deserializer=common_pb2.SubscribeKvEventsRequest.FromString,
            response_serializer=common_pb2.KvEventBatch.SerializeToString,
        )
        server.add_registered_method_handlers(SERVICE, {"SubscribeKvEvents": handler})

    with (
        GrpcServerThread(setup) as control,
        start_smg(
            f"grpc://{control.target}", str(tmp_path / "smg.log"), policy="cache_aware"
        ) as smg,
    ):
        wait_for("rank 1 pushed", lambda: _smg_view(smg, {0, 1}), SETTLE_S)
        time.sleep(switch_after_s + 4 * POLL_S)  # rank 1's pushes stopped 4 intervals ago
        assert _smg_view(smg, {0, 1}) is not None, "SMG dropped the rank: the quiet rule is moot"
