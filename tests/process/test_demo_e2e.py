"""End to end: ``loadsnap demo`` as a subprocess, queried over real HTTP in both formats."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadsnap import segment_path, unlink_segment
from loadsnap.cli import build_parser
from tests.helpers import Demo, check_promtool, unique_instance, wait_until

DP = 4


def _demo_is_real() -> bool:
    try:  # the placeholder demo had neither flag
        build_parser().parse_args(["demo", "--duration-s", "1", "--port", "0"])
    except SystemExit:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _demo_is_real(), reason="loadsnap demo is still the placeholder"
)


@contextlib.contextmanager
def _running(*args: str) -> Iterator[Demo]:
    """A demo for 60 s with ``args``; stopped (Ctrl-C) and its segment removed on exit."""
    demo = Demo.start(unique_instance("e2e", 6), "--duration-s", "60", *args)
    try:
        yield demo
    finally:
        demo.stop(20.0)
        unlink_segment(demo.instance)


@pytest.fixture
def demo() -> Iterator[Demo]:
    with _running("--dp-size", str(DP)) as started:
        yield started


@pytest.fixture
def zmq_demo() -> Iterator[Demo]:
    with _running("--dp-size", "2", "--transport", "zmq", "--workload", "tiny") as started:
        yield started


def _processes_mentioning(instance: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if instance.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_demo_end_to_end(demo: Demo) -> None:
    base = demo.wait_for_url()
    # A context manager, so that no failure or skip leaks the client's socket (a leaked socket's
    # ResourceWarning fails whichever later test the garbage collector runs in).
    with httpx.Client(base_url=base, timeout=10.0) as client:
        # Every rank present and fresh, with plausible non-zero load while the workload runs.
        busy: set[int] = set()
        deadline = time.monotonic() + 20.0
        doc: dict[str, object] = {}
        while time.monotonic() < deadline and busy != set(range(DP)):
            response = client.get("/v1/loads")
            if response.status_code == 200:
                doc = response.json()
                loads = doc["loads"]
                assert isinstance(loads, list)
                assert [load["dp_rank"] for load in loads] == list(range(DP))
                for load in loads:
                    assert load["status"] == "fresh", load
                    assert 0.0 <= load["age_seconds"] < 2.0
                    assert load["max_total_num_tokens"] > 0
                    assert 0.0 <= load["token_usage"] <= 1.0
                    if load["num_running_reqs"] + load["num_waiting_reqs"] > 0:
                        busy.add(load["dp_rank"])
            time.sleep(0.1)
        assert busy == set(range(DP)), f"ranks never seen busy: {set(range(DP)) - busy}"
        assert doc["dp_rank_count"] == DP

        # Prometheus text: parses, unique series.
        response = client.get("/v1/loads", params={"format": "prometheus"})
        assert response.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        series = [
            (s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples
        ]
        assert len(series) == len(set(series))
        ranks = {s.labels["dp_rank"] for s in families["loadsnap_num_requests_running"].samples}
        assert ranks == {str(r) for r in range(DP)}
        publishes = [s.value for s in families["loadsnap_publishes"].samples]
        assert len(publishes) == DP and all(v > 1 for v in publishes)

        # /metrics carries the controller's counters through the provider hook.
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        health = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        dispatched = {
            s.labels["dp_rank"]: s.value for s in health["loadsnap_controller_dispatches"].samples
        }
        assert set(dispatched) == {str(r) for r in range(DP)}
        assert sum(dispatched.values()) > 0

    # Ctrl-C: a clean stop leaving no segment and no process behind.
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(30) == 0
    assert not os.path.exists(segment_path(demo.instance))
    wait_until(lambda: not _processes_mentioning(demo.instance), 10.0, 0.1)
    assert _processes_mentioning(demo.instance) == []


def test_demo_prometheus_text_passes_promtool(promtool: str, demo: Demo) -> None:
    # ``promtool`` comes first, so that a machine without it skips before any demo starts.
    base = demo.wait_for_url()
    with httpx.Client(base_url=base, timeout=10.0) as client:
        # The demo prints its URL once every rank has published.
        for path, params in (("/v1/loads", {"format": "prometheus"}), ("/metrics", {})):
            response = client.get(path, params=params)
            assert response.status_code == 200
            check_promtool(promtool, response.text)


COLLECTOR_RE = re.compile(r"collector on (tcp://127\.0\.0\.1:\d+)")


def _metric(text: str, name: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {",".join(s.labels.values()): s.value for s in family.samples}
    return {}


def test_zmq_demo_metrics_show_collector_drops(zmq_demo: Demo) -> None:
    import msgspec
    import zmq

    from loadsnap import LoadSnapshot
    from loadsnap.frame import encode_frame

    base = zmq_demo.wait_for_url()
    endpoints = [m.group(1) for line in zmq_demo.output if (m := COLLECTOR_RE.search(line))]
    assert endpoints, zmq_demo.output
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = httpx.Client(base_url=base, timeout=10.0)
    try:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        push.connect(endpoints[0])
        push.send(encode_frame("someone-else", LoadSnapshot(dp_rank=0, seq=1, epoch=1)))
        push.send(msgspec.msgpack.encode(LoadSnapshot(dp_rank=1)))  # no envelope

        def shown() -> bool:
            text = client.get("/metrics").text
            dropped = _metric(text, "loadsnap_collector_frames_dropped")
            relayed = _metric(text, "loadsnap_collector_frames_relayed").get("", 0.0)
            return dropped.get("wrong_instance", 0.0) >= 2 and relayed > 0

        wait_until(shown, 20.0, 0.1)
        text = client.get("/metrics").text
        assert shown(), text
        push.close(linger=0)  # only now: LINGER 0 discards what is not sent yet
        assert "# HELP loadsnap_collector_disconnects_total" in text
        if (promtool := shutil.which("promtool")) is not None:
            check_promtool(promtool, text)
    finally:
        context.term()
        client.close()
    zmq_demo.proc.send_signal(signal.SIGINT)
    assert zmq_demo.proc.wait(30) == 0
    assert not os.path.exists(segment_path(zmq_demo.instance))
