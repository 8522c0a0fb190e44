"""Soak: a demo-like deployment under sustained workload plus a storm of HTTP scrapers.

Three real scheduler processes (``SchedulerProcess``, the code ``python -m scheduler`` runs,
with a shim timing every ``writer.publish``), a controller thread dispatching a steady request
stream, the sidecar app on a real port, then ``CLIENTS`` threads hammering ``/v1/loads`` (JSON
and Prometheus) and ``/metrics``. Phase A runs the workload alone, phase B adds the scrapers.

Asserted (gross failures only): no HTTP error, every request finished (none lost), no growth of
RSS, open fds or this instance's /dev/shm entries beyond a small bound after warm-up, and
nothing left behind. Reported, never asserted: publish latency under scrape load over the idle
phase (median and p99 ratios), measured side by side in one run (NOTES: 2 shared cores).

Default ~10 s (``LOADSNAP_SOAK_S`` raises it); CI runs the default size.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.controller import Controller
from dp_controller.harness.loss import RequestAccount
from loadsnap import ShmReader, SlotStatus, segment_path
from loadsnap.server import ServerThread, create_app
from tests.helpers import report, wait_until

pytestmark = pytest.mark.stress

SOAK_S = float(os.environ.get("LOADSNAP_SOAK_S", "10"))
CLIENTS = int(os.environ.get("LOADSNAP_SOAK_CLIENTS", "8"))
DP_SIZE = 3
RATE_RPS = 150.0
WARMUP_S = 1.0
RSS_GROWTH_MAX_KIB = 32 * 1024
FD_GROWTH_MAX = 8

PROBE_SCRIPT = r"""
import json, sys, time
from loadsnap.transport import make_writer
from scheduler.process import SchedulerOptions, SchedulerProcess

instance, dp_size, rank, req, res, out = sys.argv[1:7]
dp_size, rank = int(dp_size), int(rank)

class TimedWriter:
    def __init__(self, inner):
        self.inner, self.samples = inner, []
    def publish(self, snapshot):
        t0 = time.perf_counter_ns()
        seq = self.inner.publish(snapshot)
        self.samples.append((time.monotonic_ns(), time.perf_counter_ns() - t0))
        return seq
    def close(self):
        self.inner.close()
    def __getattr__(self, name):
        return getattr(self.inner, name)

opts = SchedulerOptions(instance=instance, dp_size=dp_size, dp_rank=rank, request_addr=req,
                        result_addr=res, heartbeat_interval_s=0.1)
writer = TimedWriter(make_writer(instance, dp_size, rank, transport="shm"))
proc = SchedulerProcess(opts, writer=writer)
proc.install_signal_handlers()
rc = proc.run()
with open(out, "w") as f:
    json.dump({"samples": writer.samples, "failures": proc.publisher.stats.failures,
               "bad_frames": proc.bad_frames, "dropped_results": proc.dropped_results}, f)
sys.exit(rc)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_entries(instance: str) -> int:
    path = Path(segment_path(instance))
    return sum(1 for p in path.parent.iterdir() if p.name.startswith(path.name))


class Resources:
    """RSS, open fds (per process) and this instance's /dev/shm entries at one moment."""

    def __init__(self, pids: list[int], instance: str) -> None:
        self.rss_kib = [rss_kib(p) for p in pids]
        self.fds = [fd_count(p) for p in pids]
        self.shm = shm_entries(instance)

    def __repr__(self) -> str:
        return f"Resources(rss_kib={self.rss_kib}, fds={self.fds}, shm={self.shm})"


class Workload:
    """Dispatches ``RATE_RPS`` requests/s from its own thread (sole user of the controller)."""

    def __init__(self, controller: Controller, account: RequestAccount) -> None:
        self.controller = controller
        self.account = account
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.statuses: Counter[str] = Counter()
        self.thread = threading.Thread(target=self._run, name="soak-workload", daemon=True)

    def _pump(self, timeout_s: float) -> None:
        for message in self.controller.poll(timeout_s):
            self.account.finished(message)
            self.statuses[message.status] += 1

    def _run(self) -> None:
        try:
            period = 1.0 / RATE_RPS
            next_at = time.monotonic()
            i = 0
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_at:
                    prompt = [i % 97] * 48 + [7] * (16 + i % 32)
                    rid, decision = self.controller.submit(prompt, 16 + i % 16)
                    self.account.submitted(rid, decision.rank)
                    i += 1
                    next_at += period
                self._pump(max(0.0, min(0.01, next_at - time.monotonic())))
            deadline = time.monotonic() + 15.0
            while self.account.pending() and time.monotonic() < deadline:
                self._pump(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Scraper:
    """One HTTP client looping over the three endpoints until stopped."""

    PATHS = ("/v1/loads", "/v1/loads?format=prometheus&include=all", "/metrics")

    def __init__(self, base_url: str, stop: threading.Event) -> None:
        self.base_url = base_url
        self.stop = stop
        self.codes: Counter[int] = Counter()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="soak-scraper", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    self.codes[client.get(self.PATHS[i % 3]).status_code] += 1
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                i += 1


def window(samples: list[list[int]], start_ns: int, end_ns: int) -> list[int]:
    return [dur for t, dur in samples if start_ns <= t < end_ns]


def quantile(xs: list[int], q: float) -> float:
    ordered = sorted(xs)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def test_soak_scrape_storm_no_errors_no_leaks(instance: str, tmp_path: Path) -> None:
    base = tmp_path
    req_addrs = [f"ipc://{base}/req-{r}" for r in range(DP_SIZE)]
    result_addr = f"ipc://{base}/results"
    outs = [base / f"probe-{r}.json" for r in range(DP_SIZE)]
    procs: list[subprocess.Popen[bytes]] = []
    controller: Controller | None = None
    server: ServerThread | None = None
    workload: Workload | None = None
    stop_scrapers = threading.Event()
    scrapers: list[Scraper] = []
    reader = None
    try:
        for r in range(DP_SIZE):
            args = [instance, str(DP_SIZE), str(r), req_addrs[r], result_addr, str(outs[r])]
            procs.append(subprocess.Popen([sys.executable, "-c", PROBE_SCRIPT, *args]))
        reader = ShmReader(instance)

        def ready() -> bool:
            assert all(p.poll() is None for p in procs)
            try:
                return all(r.status is SlotStatus.FRESH for r in reader.read_all())
            except Exception:
                return False

        assert wait_until(ready, 20.0)
        budget = DPBudget(reader, BudgetConfig(policy=Policy.WORK_OVER_THROUGHPUT))
        controller = Controller(budget, req_addrs, result_addr)
        account = RequestAccount(DP_SIZE)
        workload = Workload(controller, account)
        server = ServerThread(create_app(instance)).start()
        workload.thread.start()
        pids = [os.getpid(), *(p.pid for p in procs)]
        phase_s = SOAK_S / 2
        # Phase A: workload only.
        t_a0 = time.monotonic_ns()
        time.sleep(phase_s)
        t_a1 = time.monotonic_ns()
        # Phase B: workload plus the scrape storm; resources measured after a warm-up.
        scrapers = [Scraper(server.url, stop_scrapers) for _ in range(CLIENTS)]
        for s in scrapers:
            s.thread.start()
        time.sleep(WARMUP_S)
        t_b0 = time.monotonic_ns()
        before = Resources(pids, instance)
        time.sleep(max(0.5, phase_s - WARMUP_S))
        after = Resources(pids, instance)
        t_b1 = time.monotonic_ns()
        stop_scrapers.set()
        for s in scrapers:
            s.thread.join(15.0)
        workload.stop.set()
        workload.thread.join(20.0)
        assert workload.error is None, workload.error
        codes: Counter[int] = Counter()
        errors = [e for s in scrapers for e in s.errors]
        for s in scrapers:
            codes.update(s.codes)
        assert not errors, errors[:5]
        assert set(codes) == {200}, codes
        summary = account.summary()
        assert summary.lost == 0 and summary.pending == 0 and summary.failed == 0, summary
        assert set(workload.statuses) == {"ok"}, workload.statuses
        rss_growth = [a - b for a, b in zip(after.rss_kib, before.rss_kib, strict=True)]
        fd_growth = [a - b for a, b in zip(after.fds, before.fds, strict=True)]
        assert max(rss_growth) <= RSS_GROWTH_MAX_KIB, (before, after)
        assert max(fd_growth) <= FD_GROWTH_MAX, (before, after)
        assert after.shm == before.shm, (before, after)
        # Stop the schedulers cleanly: each writes its publish timings.
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(10.0) == 0
        idle: list[int] = []
        loaded: list[int] = []
        failures = bad_frames = 0
        for out in outs:
            doc = json.loads(out.read_text())
            idle += window(doc["samples"], t_a0, t_a1)
            loaded += window(doc["samples"], t_b0, t_b1)
            failures += doc["failures"]
            bad_frames += doc["bad_frames"]
        assert idle and loaded
        assert failures == 0 and bad_frames == 0
        med_idle, med_loaded = statistics.median(idle), statistics.median(loaded)
        p99_idle, p99_loaded = quantile(idle, 0.99), quantile(loaded, 0.99)
        report(
            "soak",
            {
                "duration_s": SOAK_S,
                "scrape_clients": CLIENTS,
                "http_requests": sum(codes.values()),
                "http_errors": len(errors) + sum(n for c, n in codes.items() if c != 200),
                "requests_submitted": summary.submitted,
                "requests_finished": summary.finished,
                "requests_lost": summary.lost,
                "publishes_idle": len(idle),
                "publishes_loaded": len(loaded),
                "publish_median_us_idle": round(med_idle / 1e3, 2),
                "publish_median_us_loaded": round(med_loaded / 1e3, 2),
                "publish_p99_us_idle": round(p99_idle / 1e3, 2),
                "publish_p99_us_loaded": round(p99_loaded / 1e3, 2),
                "median_ratio_loaded_over_idle": round(med_loaded / med_idle, 2),
                "p99_ratio_loaded_over_idle": round(p99_loaded / p99_idle, 2),
                "rss_growth_kib": rss_growth,
                "fd_growth": fd_growth,
                "shm_entries": after.shm,
            },
        )
    finally:
        stop_scrapers.set()
        if workload is not None:
            workload.stop.set()
            workload.thread.join(20.0)
        if controller is not None:
            controller.close()
        if server is not None:
            server.stop()
        if reader is not None:
            reader.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5.0)
    assert shm_entries(instance) == 0  # the last writer unlinked the segment
