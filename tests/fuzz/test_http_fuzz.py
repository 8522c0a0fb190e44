"""Hostile input against the real server and the ZMQ channel.

* Hypothesis over ``/v1/loads`` query strings and ``Accept`` headers, sent over real HTTP to a
  :class:`~loadsnap.server.ServerThread` reading a live segment (and one with no segment): only
  the documented 200 / 400 / 503 answers, never a 500, and the server keeps serving.
* With CURVE keys configured, a spoofed snapshot (a plain-text peer, a peer with valid but
  unlisted keys, and raw msgpack frames on a plain socket) cannot change what a
  :class:`~dp_controller.DPBudget` reading the segment dispatches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dp_controller import BudgetConfig, DPBudget, Policy
from loadsnap import LoadSnapshot, ShmReader
from loadsnap.collector import Collector
from loadsnap.curve import curve_available, generate_keys, load_client_keys, load_server_keys
from loadsnap.frame import encode_frame
from loadsnap.server import ServerThread, create_app
from loadsnap.zmq_writer import ZmqWriter
from tests.helpers import report, serving, wait_until

DOCUMENTED = frozenset({200, 400, 503})
KEYS = ("dp_rank", "include", "format")
VALUES = (
    "0",
    "1",
    "2",
    "-1",
    " 1 ",
    "999999999",
    "1e3",
    "core",
    "all",
    "memory,spec",
    "core,,",
    "json",
    "prometheus",
    "openmetrics",
    "PROMETHEUS",
    "",
)
ACCEPTS = (
    "",
    "*/*",
    "application/json",
    "application/openmetrics-text; version=1.0.0",
    "text/plain;version=0.0.4",
)
MAX_EXAMPLES = int(os.environ.get("LOADSNAP_FUZZ_EXAMPLES", "300"))

_tried: dict[str, int] = {"queries": 0, "200": 0, "400": 0, "503": 0}

query_value = st.one_of(st.sampled_from(VALUES), st.text(max_size=40))
query_pairs = st.lists(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), query_value), max_size=5
)
raw_bytes = st.binary(max_size=60)


class Served:
    def __init__(self, client: httpx.Client, server: ServerThread) -> None:
        self.client = client
        self.server = server


@pytest.fixture(scope="module")
def live() -> Iterator[Served]:
    snapshots = [LoadSnapshot(dp_rank=rank, num_running_reqs=rank + 1) for rank in range(2)]
    with (
        serving(f"t-{os.getpid()}-fuzz", 3, snapshots) as server,  # rank 2 never publishes
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        yield Served(client, server)


def check(served: Served, resp: httpx.Response) -> None:
    _tried["queries"] += 1
    assert resp.status_code in DOCUMENTED, (resp.status_code, resp.request.url, resp.text)
    _tried[str(resp.status_code)] += 1
    if resp.status_code != 200:
        doc = resp.json()
        assert isinstance(doc["detail"], str) and doc["detail"]


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pairs=query_pairs, accept=st.sampled_from(ACCEPTS))
def test_fuzz_query_pairs_only_documented_answers(
    live: Served, pairs: list[tuple[str, str]], accept: str
) -> None:
    params: list[tuple[str, str | int | float | bool | None]] = list(pairs)
    resp = live.client.get("/v1/loads", params=params, headers={"accept": accept})
    check(live, resp)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=raw_bytes)
def test_fuzz_raw_query_bytes_only_documented_answers(live: Served, raw: bytes) -> None:
    # Arbitrary bytes, percent-encoded except the separators, so structure is fuzzed too.
    query = urllib.parse.quote_from_bytes(raw, safe="=&,;+")
    check(live, live.client.get(f"/v1/loads?{query}"))


def test_server_keeps_serving_after_fuzz(live: Served) -> None:
    # Runs after the fuzz tests (file order): the same server still answers correctly.
    resp = live.client.get("/v1/loads")
    assert resp.status_code == 200
    assert [load["num_running_reqs"] for load in resp.json()["loads"]] == [1, 2]
    assert live.client.get("/healthz").status_code == 200
    assert live.client.get("/metrics").status_code == 200
    assert live.server._thread.is_alive()
    report("http_fuzz", {"bad_or_random_queries_tried": _tried["queries"], **_tried})


def test_missing_segment_answers_503_never_500(instance: str) -> None:
    with ServerThread(create_app(instance)) as server, httpx.Client(base_url=server.url) as c:
        for query in ("", "dp_rank=0", "format=prometheus", "include=all", "dp_rank=x"):
            resp = c.get(f"/v1/loads?{query}")
            assert resp.status_code in (400, 503), (query, resp.status_code)
        assert c.get("/v1/loads").json()["reason"] == "missing"
        assert c.get("/healthz").status_code == 503


# --- spoofing the ZMQ channel --------------------------------------------------------------

needs_curve = pytest.mark.skipif(not curve_available(), reason="libzmq built without CURVE")


def pick(instance: str) -> tuple[int, list[float]]:
    """A fresh budget's first choice and the numbers it read."""
    with ShmReader(instance) as reader:
        budget = DPBudget(reader, BudgetConfig(policy=Policy.TOTAL_REQUESTS), dp_size=2)
        rank = budget.dispatch(100).rank
        return rank, budget.reported_reqs.tolist()


@needs_curve
@pytest.mark.usefixtures("collector_lock_cleanup")
def test_spoofed_snapshot_cannot_change_dispatch_with_curve(instance: str, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys", clients=1)
    stranger = generate_keys(tmp_path / "stranger", clients=1)
    collector = Collector(
        instance, 2, "tcp://127.0.0.1:*", curve=load_server_keys(tmp_path / "keys")
    )
    client_keys = load_client_keys(keys.server_public, keys.client_secrets[0])
    legit = [
        ZmqWriter(collector.endpoint, 2, rank, instance=instance, curve=client_keys)
        for rank in range(2)
    ]
    plain = ZmqWriter(collector.endpoint, 2, 1, instance=instance)
    unlisted = ZmqWriter(
        collector.endpoint,
        2,
        1,
        instance=instance,
        curve=load_client_keys(keys.server_public, stranger.client_secrets[0]),
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDTIMEO, 0)
    raw.connect(collector.endpoint)
    try:
        # Legit load: rank 0 busy, rank 1 light, so a budget picks rank 1.
        def legit_publish() -> None:
            legit[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=50))
            legit[1].publish(LoadSnapshot(dp_rank=1, num_running_reqs=1))

        def both_arrived() -> bool:
            legit_publish()
            return sorted(collector.latest()) == [0, 1]

        assert wait_until(both_arrived, 10.0), collector.stats_dict()
        before = pick(instance)
        assert before[0] == 1, before
        # The spoof: rank 1 claims to be swamped, by every path we have.
        spoofs = 0

        def spoof_rejected() -> bool:
            nonlocal spoofs
            for writer in (plain, unlisted):
                writer.publish(LoadSnapshot(dp_rank=1, num_running_reqs=10_000))
                spoofs += 1
            frame = encode_frame(
                instance, LoadSnapshot(dp_rank=1, num_running_reqs=10_000, seq=2**40, epoch=2**60)
            )
            with contextlib.suppress(zmq.Again):
                raw.send(frame, zmq.NOBLOCK)
            spoofs += 1
            stats = collector.stats
            return stats.auth_rejected >= 1 and stats.handshake_failed >= 1

        assert wait_until(spoof_rejected, 10.0), collector.stats_dict()
        deadline = time.monotonic() + 0.3  # keep spoofing a while: none of it may land
        while time.monotonic() < deadline:
            spoof_rejected()
            time.sleep(0.01)
        after = pick(instance)
        assert after == before, (before, after)
        assert plain.stats.sent == 0 and unlisted.stats.sent == 0
        assert collector.latest()[1].num_running_reqs == 1
        report(
            "curve_spoof",
            {
                "spoof_attempts": spoofs,
                "auth_rejected": collector.stats.auth_rejected,
                "handshake_failed": collector.stats.handshake_failed,
                "rank_before": before[0],
                "rank_after": after[0],
            },
        )
    finally:
        raw.close(linger=0)
        ctx.term()
        for writer in (*legit, plain, unlisted):
            writer.close()
        collector.close()


def picks(instance: str, n: int) -> list[int]:
    """The ranks a fresh budget picks for ``n`` dispatches in a row (it counts each one)."""
    with ShmReader(instance) as reader:
        budget = DPBudget(reader, BudgetConfig(policy=Policy.TOTAL_REQUESTS), dp_size=2)
        return [budget.dispatch(100).rank for _ in range(n)]


@needs_curve
@pytest.mark.parametrize("bound", [False, True], ids=["any_rank_control", "bound"])
@pytest.mark.usefixtures("collector_lock_cleanup")
def test_listed_key_cannot_publish_another_rank(
    instance: str, tmp_path: Path, bound: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # CURVE authenticates nodes: client-000 is listed, and here it claims rank 1 is swamped.
    # Bound (ranks_per_client=1: client-000 may publish rank 0 only) the claim is dropped; the
    # control run with ranks = "*" shows the same spoof steering every dispatch.
    caplog.set_level(logging.WARNING, logger="loadsnap")
    dispatches = 10
    keys = generate_keys(tmp_path / "keys", clients=2, ranks_per_client=1 if bound else None)
    collector = Collector(
        instance, 2, "tcp://127.0.0.1:*", curve=load_server_keys(tmp_path / "keys")
    )
    key_of = [load_client_keys(keys.server_public, keys.client_secrets[i]) for i in range(2)]
    legit = [
        ZmqWriter(collector.endpoint, 2, rank, instance=instance, curve=key_of[rank])
        for rank in range(2)
    ]
    spoofer = ZmqWriter(collector.endpoint, 2, 1, instance=instance, curve=key_of[0])
    # A newer writer of rank 1 as far as epochs go (two writers made in the same millisecond
    # share one): without a rank binding its frames replace the real rank 1's.
    spoofer.epoch = legit[1].epoch + 1
    try:

        def legit_publish() -> None:
            legit[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=50))
            legit[1].publish(LoadSnapshot(dp_rank=1, num_running_reqs=1))

        def both_arrived() -> bool:
            legit_publish()
            return sorted(collector.latest()) == [0, 1]

        assert wait_until(both_arrived, 10.0), collector.stats_dict()
        before = picks(instance, dispatches)
        assert before == [1] * dispatches, before
        spoofs = 0

        def spoof_settled() -> bool:
            nonlocal spoofs
            legit_publish()
            spoofer.publish(LoadSnapshot(dp_rank=1, num_running_reqs=10_000))
            spoofs += 1
            if bound:
                return collector.stats.rank_not_allowed >= 20
            return collector.latest()[1].num_running_reqs == 10_000

        assert wait_until(spoof_settled, 10.0), collector.stats_dict()
        after = picks(instance, dispatches)
        steered = sum(1 for a, b in zip(before, after, strict=True) if a != b)
        dropped = collector.stats.rank_not_allowed
    finally:
        for writer in (*legit, spoofer):
            writer.close()
        collector.close()
    spoofer_warned = [r.getMessage() for r in caplog.records if "not dp_rank=1" in r.getMessage()]
    collector_warned = [
        r.getMessage() for r in caplog.records if "not allowed for CURVE key" in r.getMessage()
    ]
    if bound:
        assert steered == 0 and dropped >= 20, (after, dropped)
        assert spoofer_warned == [
            "this CURVE key's certificate binds ranks=0, not dp_rank=1: a collector with the "
            "same key list drops every frame (rank_not_allowed)"
        ]
        assert collector_warned == [
            "dropped frames from 127.0.0.1: dp_rank=1 not allowed for CURVE key client-000 "
            "(ranks=0)"
        ]
    else:
        assert steered == dispatches and dropped == 0, after  # the control: the spoof works
        assert spoofer_warned == [] and collector_warned == []
    report(
        f"curve_rank_spoof_{'bound' if bound else 'any_rank'}",
        {
            "spoof_frames": spoofs,
            "rank_not_allowed": dropped,
            "dispatches": dispatches,
            "steered": steered,
        },
    )
