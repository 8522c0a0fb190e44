"""Schedulers in their own pid namespaces (containers), readers outside: liveness still holds.

A writer's pid means nothing to a reader in another pid namespace, so liveness comes from the
kernel locks each writer holds on its slot (``loadsnap._liveness``). Here each reference
scheduler runs under ``unshare --pid --fork --mount-proc`` (pid 1 of its own namespace, as in a
container without a shared pid namespace); the reader, the HTTP server and the controller run
in the test process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.controller import Controller
from loadsnap import ShmReader, SlotStatus
from loadsnap.server import ServerThread, create_app
from scheduler.messages import Finished
from tests.helpers import scheduler_command

pytestmark = pytest.mark.slow

_DP_SIZE = 2
_STALE_AFTER_S = 2.0
_PHASE_S = 5.0  # idle, busy, idle, busy: 20 s in all
_READY_TIMEOUT_S = 30.0
_SCHEDULER_ARGS = ("--prefill-token-ms=0.05", "--decode-token-ms=0.5", "--max-running-requests=16")


def _unshare_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "pid namespaces are Linux only"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if done.returncode != 0:
        return f"cannot create a pid namespace here (needs root): {done.stderr.strip()}"
    return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class _NamespacedSchedulers:
    """One reference scheduler per rank, each pid 1 of a new pid namespace."""

    def __init__(self, instance: str, ipc_dir: Path) -> None:
        self.request_addrs = [f"ipc://{ipc_dir}/req-{rank}" for rank in range(_DP_SIZE)]
        self.result_addr = f"ipc://{ipc_dir}/results"
        self.procs = [
            subprocess.Popen(
                [
                    *("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"),
                    *scheduler_command(
                        instance,
                        _DP_SIZE,
                        rank,
                        self.request_addrs[rank],
                        self.result_addr,
                        *_SCHEDULER_ARGS,
                    ),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for rank in range(_DP_SIZE)
        ]

    def scheduler_pid(self, rank: int) -> int:
        """The host pid of ``rank``'s scheduler (the child unshare forked)."""
        children = _children(self.procs[rank].pid)
        assert len(children) == 1, children
        return children[0]

    def close(self) -> None:
        # SIGTERM each scheduler itself (a clean stop: it closes its writer); unshare exits
        # with it. --kill-child SIGKILLs a scheduler whose unshare was killed instead.
        for proc in self.procs:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def namespaced(instance: str, tmp_path: Path) -> Iterator[_NamespacedSchedulers]:
    problem = _unshare_problem()
    if problem is not None:
        pytest.skip(problem)
    fleet = _NamespacedSchedulers(instance, tmp_path)
    try:
        with ShmReader(instance) as reader:
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while True:
                for rank, proc in enumerate(fleet.procs):
                    assert proc.poll() is None, f"scheduler {rank} exited rc={proc.returncode}"
                try:
                    if (reader.hot_table().status == SlotStatus.FRESH).all():
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "schedulers did not publish"
                time.sleep(0.05)
            for rank in range(_DP_SIZE):  # really in another pid namespace
                host_pid = fleet.scheduler_pid(rank)
                assert os.readlink(f"/proc/{host_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
                assert reader.read(rank).writer_pid == 1  # its pid in its own namespace
        yield fleet
    finally:
        fleet.close()


def test_live_ranks_never_dead_then_a_kill_is_seen_within_budget(
    instance: str, namespaced: _NamespacedSchedulers
) -> None:
    config = BudgetConfig(policy=Policy.TOTAL_REQUESTS, refresh_interval_s=0.02)
    reader = ShmReader(instance, stale_after_s=_STALE_AFTER_S)
    budget = DPBudget(reader, config, dp_size=_DP_SIZE)
    app = create_app(instance, stale_after_s=_STALE_AFTER_S)
    with (
        reader,
        ServerThread(app) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5.0) as http,
        Controller(budget, namespaced.request_addrs, namespaced.result_addr) as controller,
    ):
        results: list[Finished] = []
        dead_seen: Counter[str] = Counter()
        samples = 0
        submitted = 0
        for phase, busy in enumerate((False, True, False, True)):
            end = time.monotonic() + _PHASE_S
            next_http = 0.0
            while (now := time.monotonic()) < end:
                if busy:
                    controller.submit([phase] * 64, 4)
                    submitted += 1
                table = reader.hot_table()
                samples += 1
                dead_seen["hot_table"] += int((table.status == SlotStatus.DEAD).sum())
                if now >= next_http:
                    next_http = now + 0.2
                    loads = http.get("/v1/loads").json()["loads"]
                    dead_seen["/v1/loads"] += sum(load["status"] == "dead" for load in loads)
                results.extend(controller.poll(0.02))
        for _ in range(500):  # bounded: every request of the busy phases finishes
            if len(results) >= submitted:
                break
            results.extend(controller.poll(0.02))
        assert samples > 500 and submitted > 100
        assert dead_seen == Counter(), dead_seen  # no live rank ever reported dead
        assert len(results) == submitted
        assert [r for r in results if r.status != "ok"] == []

        # A SIGKILL of rank 1's scheduler (from the host) with requests in flight.
        in_flight = {}
        for _ in range(20):
            rid, decision = controller.submit([9] * 512, 64)
            in_flight[rid] = decision.rank
        assert 1 in in_flight.values()
        killed_at = time.monotonic()
        os.kill(namespaced.scheduler_pid(1), signal.SIGKILL)
        dead_after = None
        final: list[Finished] = []
        deadline = killed_at + _STALE_AFTER_S + 10.0
        while time.monotonic() < deadline and (dead_after is None or len(final) < len(in_flight)):
            if dead_after is None and reader.read(1).status is SlotStatus.DEAD:
                dead_after = time.monotonic() - killed_at
            final.extend(controller.poll(0.02))
        assert dead_after is not None and dead_after <= _STALE_AFTER_S, dead_after
        assert reader.read(0).status is SlotStatus.FRESH
        doc = http.get("/v1/loads").json()  # a dead rank is listed apart, never in loads
        http_status = {
            rank["dp_rank"]: rank["status"] for rank in doc["loads"] + doc["unavailable"]
        }
        assert http_status == {0: "fresh", 1: "dead"}
        per_rid = Counter(result.rid for result in final)
        assert sorted(per_rid) == sorted(in_flight) and set(per_rid.values()) == {1}
        failed = {r.rid for r in final if r.status == "failed"}
        assert failed and all(in_flight[rid] == 1 for rid in failed)
        assert all(r.reason == "rank_dead" for r in final if r.status == "failed")
        print(f"\npid namespaces: {samples} samples, 0 dead; SIGKILL dead after {dead_after:.3f} s")
