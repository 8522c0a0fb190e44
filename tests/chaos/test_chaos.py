"""Chaos on a running deployment: real scheduler processes, a real HTTP server, real signals.

* SIGKILL a scheduler mid-run: ``/v1/loads`` reports it dead within the staleness budget, the
  controller stops sending to it and itself reports every request the rank held as failed
  (``Controller.poll``), each request gets exactly one result, and a restarted scheduler
  rejoins with a new epoch and gets work again.
* SIGSTOP a reader process, then a scheduler: the others keep publishing, HTTP keeps answering.
* SIGKILL a controller process: the schedulers keep publishing; a new controller continues each
  rank's dispatch numbering after the scheduler's acknowledgement (nothing clamped) and picks up.

Every process is killed in ``finally`` (the fleet sends SIGCONT first); every wait polls a
condition with a deadline. Figures are printed as ``FIGURES {json}`` and, when
``LOADSNAP_FIGURES_DIR`` is set, written there (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.controller import Controller, FailureReason
from dp_controller.harness.fleet import SchedulerFleet
from dp_controller.harness.loss import RequestAccount, dead_ranks
from loadsnap import ShmReader, SlotStatus
from loadsnap.errors import UsageError
from loadsnap.server import ServerThread, create_app
from scheduler.messages import Finished
from tests.helpers import report, scheduler_command, wait_until

STALE_S = 0.5  # staleness budget of every reader in this file
# Heartbeats well inside the budget; slow enough steps that requests are in flight at a kill.
SCHED_ARGS = (
    "--heartbeat-interval-s=0.1",
    "--idle-publish-interval-s=0.02",
    "--decode-token-ms=0.5",
    "--prefill-token-ms=0.02",
    "--max-running-requests=16",
)
PROMPT = [3] * 64
NEW_TOKENS = 24
WAIT_S = 15.0


def scheduler_cmd(fleet: SchedulerFleet, rank: int) -> list[str]:
    return scheduler_command(
        fleet.instance,
        fleet.dp_size,
        rank,
        fleet.request_addrs[rank],
        fleet.result_addr,
        *SCHED_ARGS,
    )


def slot_seqs(reader: ShmReader) -> list[int]:
    return [read.seq for read in reader.read_all()]


def rank_status(client: httpx.Client, rank: int) -> str:
    resp = client.get("/v1/loads", params={"dp_rank": str(rank)})
    assert resp.status_code in (200, 503), resp.text
    doc = resp.json()
    if resp.status_code == 503:
        return str(doc["reason"])
    return str(doc["loads"][0]["status"])


@pytest.fixture
def fleet(instance: str) -> Iterator[SchedulerFleet]:
    with SchedulerFleet(instance, 3, SCHED_ARGS) as f:
        f.wait_ready(timeout_s=WAIT_S)
        yield f


@pytest.fixture
def http(instance: str) -> Iterator[httpx.Client]:
    server = ServerThread(create_app(instance, stale_after_s=STALE_S)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            yield client
    finally:
        server.stop()


class Results:
    """Every result ``Controller.poll`` gave, by rid; a second result for a rid is a duplicate."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.rank_of: dict[int, int] = {}  # rid -> rank it was dispatched to
        self.by_rid: dict[int, Finished] = {}
        self.duplicates = 0

    def submit(self, n: int) -> list[int]:
        ranks = []
        for _ in range(n):
            rid, decision = self.controller.submit(PROMPT, NEW_TOKENS)
            self.rank_of[rid] = decision.rank
            ranks.append(decision.rank)
        return ranks

    def pump(self, timeout_s: float = 0.0) -> int:
        """Take results; return how many submitted requests have none yet."""
        for message in self.controller.poll(timeout_s):
            if message.rid in self.by_rid:
                self.duplicates += 1
            self.by_rid[message.rid] = message
        return len(self.rank_of) - len(self.by_rid)

    def of(self, rank: int, status: str) -> list[Finished]:
        return [f for f in self.by_rid.values() if f.dp_rank == rank and f.status == status]


def test_sigkill_scheduler_dead_no_loss_and_rejoin(
    fleet: SchedulerFleet, http: httpx.Client
) -> None:
    victim = 1
    reader = ShmReader(fleet.instance, stale_after_s=STALE_S)
    config = BudgetConfig(
        policy=Policy.TOTAL_REQUESTS, refresh_interval_s=0.02, stale_after_s=STALE_S
    )
    budget = DPBudget(reader, config, dp_size=fleet.dp_size)
    controller = Controller(budget, fleet.request_addrs, fleet.result_addr)
    results = Results(controller)
    try:
        old_epoch = reader.read_all()[victim].epoch
        results.submit(30)  # every rank busy

        def victim_running() -> bool:
            results.pump(0.005)
            snap = reader.read_all()[victim].snapshot
            return snap is not None and snap.num_running_reqs > 0

        assert wait_until(victim_running, WAIT_S)
        in_flight_at_kill = controller.outstanding[victim]
        ok_before_kill = len(results.of(victim, "ok"))
        assert in_flight_at_kill > 0
        fleet.procs[victim].kill()
        t_kill = time.monotonic()
        # Keep dispatching while the budget, the controller and the HTTP endpoint notice.
        http_dead_s = budget_dead_s = reported_s = None
        sent_before_dead = sent_after_dead = 0
        while time.monotonic() - t_kill < WAIT_S and (
            http_dead_s is None or budget_dead_s is None or reported_s is None
        ):
            ranks = results.submit(2)
            if budget_dead_s is None:
                sent_before_dead += ranks.count(victim)
            else:
                sent_after_dead += ranks.count(victim)
            results.pump(0.005)
            if budget_dead_s is None and victim in dead_ranks(budget):
                budget_dead_s = time.monotonic() - t_kill
            if reported_s is None and results.of(victim, "failed"):
                reported_s = time.monotonic() - t_kill
            if http_dead_s is None and rank_status(http, victim) == "dead":
                http_dead_s = time.monotonic() - t_kill
        assert http_dead_s is not None and http_dead_s <= STALE_S, http_dead_s
        assert budget_dead_s is not None and budget_dead_s <= STALE_S, budget_dead_s
        assert reported_s is not None and reported_s <= STALE_S, reported_s
        # The controller stops sending to the dead rank.
        after = results.submit(60)
        sent_after_dead += after.count(victim)
        assert sent_after_dead == 0
        assert wait_until(lambda: results.pump(0.02) == 0, WAIT_S), controller.outstanding
        # Every request has exactly one result; the failed ones are exactly what the dead rank
        # held: in flight at the kill, plus what was sent before the death was seen, minus
        # results that were already on their way.
        failed = results.of(victim, "failed")
        ok_after_kill = len(results.of(victim, "ok")) - ok_before_kill
        assert results.duplicates == 0 and controller.outstanding[victim] == 0
        assert len(failed) == in_flight_at_kill + sent_before_dead - ok_after_kill
        assert len(failed) == controller.failed_requests >= 1
        assert {f.reason for f in failed} == {FailureReason.RANK_DEAD.value}
        assert all(f.status == "ok" for f in results.by_rid.values() if f.dp_rank != victim)
        # /healthz and the other ranks keep answering.
        assert http.get("/healthz").status_code == 200
        # Restart: the new process reclaims the dead writer's slot with a new epoch.
        fleet.procs[victim].wait(5.0)
        fleet.procs[victim] = subprocess.Popen(
            scheduler_cmd(fleet, victim), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        t_restart = time.monotonic()

        def rejoined() -> bool:
            read = reader.read_all()[victim]
            return read.status is SlotStatus.FRESH and read.epoch != old_epoch

        assert wait_until(rejoined, WAIT_S)
        rejoin_s = time.monotonic() - t_restart
        assert wait_until(lambda: (results.pump(0.01), victim not in dead_ranks(budget))[1], WAIT_S)
        assert rank_status(http, victim) == "fresh"
        assert budget.stats.epoch_resets >= 1
        back = results.submit(30)
        assert back.count(victim) >= 1, budget.budget_requests()  # it gets work again
        assert wait_until(lambda: results.pump(0.02) == 0, WAIT_S), controller.outstanding
        # The new incarnation served its requests; nothing more was reported failed.
        assert len(results.of(victim, "ok")) - ok_before_kill - ok_after_kill >= back.count(victim)
        assert controller.failed_requests == len(failed) and results.duplicates == 0
        assert sum(controller.outstanding) == 0
        report(
            "chaos_sigkill",
            {
                "http_dead_after_s": round(http_dead_s, 4),
                "budget_dead_after_s": round(budget_dead_s, 4),
                "failed_reported_after_s": round(reported_s, 4),
                "staleness_budget_s": STALE_S,
                "in_flight_on_victim_at_kill": in_flight_at_kill,
                "dispatched_to_victim_before_dead_seen": sent_before_dead,
                "dispatches_to_dead_rank": sent_after_dead,
                "rejoin_s": round(rejoin_s, 3),
                "dispatches_to_rejoined_rank": back.count(victim),
                "epoch_resets": budget.stats.epoch_resets,
                "submitted": len(results.rank_of),
                "finished": sum(1 for f in results.by_rid.values() if f.status == "ok"),
                "reported_failed": len(failed),
                "late_results_dropped": controller.late_results,
                "duplicates": results.duplicates,
                "lost": len(results.rank_of) - len(results.by_rid),
            },
        )
    finally:
        controller.close()
        reader.close()


READER_SCRIPT = r"""
import signal, sys, time
from loadsnap import ShmReader
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
reader = ShmReader(sys.argv[1], stale_after_s=float(sys.argv[2]))
n = 0
print("ready", flush=True)
deadline = time.monotonic() + 60.0
while not stopping and time.monotonic() < deadline:
    reader.read_all(); reader.hot_table(); n += 1
reader.close()
print(n, flush=True)
"""


def test_sigstop_reader_then_scheduler_nobody_else_stalls(
    fleet: SchedulerFleet, http: httpx.Client
) -> None:
    reader = ShmReader(fleet.instance, stale_after_s=STALE_S)
    spinner = subprocess.Popen(
        [sys.executable, "-c", READER_SCRIPT, fleet.instance, str(STALE_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    http_worst_s = 0.0
    try:
        assert spinner.stdout is not None and spinner.stdout.readline().strip() == "ready"

        def probe_http() -> None:
            nonlocal http_worst_s
            t0 = time.monotonic()
            resp = http.get("/v1/loads")
            http_worst_s = max(http_worst_s, time.monotonic() - t0)
            assert resp.status_code == 200, resp.text

        def all_advance(ranks: list[int], window_s: float) -> bool:
            start = slot_seqs(reader)
            deadline = time.monotonic() + window_s
            while time.monotonic() < deadline:
                probe_http()
                now = slot_seqs(reader)
                if all(now[r] > start[r] for r in ranks):
                    return True
                time.sleep(0.02)
            return False

        # Stop the reader 20 times at arbitrary points (likely mid-read: it reads in a loop).
        stops = 0
        for _ in range(20):
            spinner.send_signal(signal.SIGSTOP)
            stops += 1
            try:
                assert all_advance([0, 1, 2], 2.0), "a scheduler stalled while a reader was stopped"
                assert all(r.status is SlotStatus.FRESH for r in reader.read_all())
            finally:
                spinner.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        # Stop a scheduler: the others keep publishing, it turns stale, then recovers.
        fleet.pause_process(2)
        t_stop = time.monotonic()
        try:
            assert all_advance([0, 1], 2.0)
            assert wait_until(lambda: rank_status(http, 2) == "stale", 2 * STALE_S + 1.0)
            stale_after_s = time.monotonic() - t_stop
            assert all_advance([0, 1], 2.0)
            assert [rank_status(http, r) for r in (0, 1)] == ["fresh", "fresh"]
            # A budget treats the stopped rank as saturated: nothing is sent to it.
            budget = DPBudget(reader, BudgetConfig(stale_after_s=STALE_S), dp_size=3)
            picks = {budget.dispatch(100).rank for _ in range(30)}
            assert 2 not in picks, picks
        finally:
            fleet.resume_process(2)
        assert wait_until(lambda: rank_status(http, 2) == "fresh", WAIT_S)
        spinner.send_signal(signal.SIGTERM)
        out, _ = spinner.communicate(timeout=10.0)
        reads_done = int(out.split()[-1])
        assert spinner.returncode == 0 and reads_done > 0
        report(
            "chaos_sigstop",
            {
                "reader_sigstops": stops,
                "reader_reads_completed": reads_done,
                "scheduler_stale_after_s": round(stale_after_s, 3),
                "staleness_budget_s": STALE_S,
                "http_worst_latency_s": round(http_worst_s, 4),
            },
        )
    finally:
        if spinner.poll() is None:
            spinner.send_signal(signal.SIGCONT)
            spinner.kill()
            spinner.wait(5.0)
        if spinner.stdout is not None:
            spinner.stdout.close()
        reader.close()


CONTROLLER_SCRIPT = r"""
import sys, time
from dp_controller import DPBudget
from dp_controller.controller import Controller
from loadsnap import ShmReader
instance, dp_size, result_addr = sys.argv[1], int(sys.argv[2]), sys.argv[3]
addrs = sys.argv[4:]
reader = ShmReader(instance)
budget = DPBudget(reader, dp_size=dp_size)
controller = Controller(budget, addrs, result_addr)
for _ in range(40):
    controller.submit([5] * 64, 200)
deadline = time.monotonic() + 30.0
while budget.ledger.unacked_count.sum() > 0 and time.monotonic() < deadline:
    controller.poll(0.01)  # every request reached its scheduler
    budget.refresh(force=True)
print("submitted", flush=True)
deadline = time.monotonic() + 60.0
while time.monotonic() < deadline:
    controller.poll(0.05)
"""


def test_kill_controller_schedulers_keep_publishing_new_controller_picks_up(
    fleet: SchedulerFleet,
) -> None:
    reader = ShmReader(fleet.instance, stale_after_s=STALE_S)
    old = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONTROLLER_SCRIPT,
            fleet.instance,
            str(fleet.dp_size),
            fleet.result_addr,
            *fleet.request_addrs,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    controller: Controller | None = None
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "submitted"
        assert wait_until(
            lambda: sum(r.snapshot.num_running_reqs for r in reader.read_all() if r.snapshot) > 0,
            WAIT_S,
        )
        old.kill()
        old.wait(5.0)
        # Schedulers keep publishing with no controller.
        start = slot_seqs(reader)
        assert wait_until(
            lambda: all(a > b for a, b in zip(slot_seqs(reader), start, strict=True)), WAIT_S
        )
        assert all(r.status is SlotStatus.FRESH for r in reader.read_all())
        assert all(p.poll() is None for p in fleet.procs)
        # A new controller binds the same result address, continues each rank's numbering
        # after what its scheduler acknowledged, and gets work done.
        acks_before = [
            r.snapshot.last_accepted_dispatch_seq for r in reader.read_all() if r.snapshot
        ]
        budget = DPBudget(reader, BudgetConfig(stale_after_s=STALE_S), dp_size=fleet.dp_size)
        controller = Controller(budget, fleet.request_addrs, fleet.result_addr)
        assert controller.takeover_seqs == acks_before and sum(acks_before) == 40
        results = Results(controller)
        results.submit(30)
        assert wait_until(lambda: results.pump(0.02) == 0, WAIT_S), controller.outstanding
        finished = [f for f in results.by_rid.values() if f.status == "ok"]
        assert len(finished) == 30 and results.duplicates == 0
        # Every new dispatch was acknowledged, none clamped: the budget counts nothing twice.
        ledger = budget.ledger

        def acknowledged() -> bool:
            budget.refresh(force=True)
            return int(ledger.unacked_count.sum()) == 0

        assert wait_until(acknowledged, WAIT_S), ledger.unacked_count
        assert ledger.stats.overshoot_acks == 0
        assert [ledger.acked(r) for r in range(fleet.dp_size)] == [
            ledger.issued(r) for r in range(fleet.dp_size)
        ]
        assert sum(ledger.issued(r) - acks_before[r] for r in range(fleet.dp_size)) == 30
        report(
            "chaos_kill_controller",
            {
                "old_controller_dispatched": sum(acks_before),
                "new_controller_continued_after": acks_before,
                "new_controller_submitted": len(results.rank_of),
                "new_controller_finished": len(finished),
                "old_controller_results_received": controller.unknown_results,
                "ledger_overshoot_acks": ledger.stats.overshoot_acks,
                "lost": len(results.rank_of) - len(results.by_rid),
            },
        )
    finally:
        if controller is not None:
            controller.close()
        if old.poll() is None:
            old.kill()
            old.wait(5.0)
        if old.stdout is not None:
            old.stdout.close()
        reader.close()


def _fin(rid: int, rank: int) -> Finished:
    return Finished(
        rid=rid,
        dp_rank=rank,
        dispatch_seq=1,
        prompt_len=1,
        output_len=1,
        cached_tokens=0,
        queue_time_s=0.0,
        ttft_s=0.0,
        e2e_s=0.0,
    )


def test_request_account_reports_failed_and_late_without_double_counting() -> None:
    account = RequestAccount(2)
    for rid, rank in ((0, 0), (1, 1), (2, 1)):
        account.submitted(rid, rank)
    account.finished(_fin(0, 0))
    assert account.fail_ranks([1]) == [1, 2]
    account.finished(_fin(2, 1))  # served by a restarted rank after being reported failed
    account.finished(_fin(99, 0))  # a previous controller's request
    summary = account.summary()
    assert (summary.submitted, summary.finished, summary.failed, summary.pending) == (3, 1, 2, 0)
    assert (summary.late_finished, summary.unknown_finished, summary.lost) == (1, 1, 0)
    assert account.failed[1] == "rank dead: dp_rank=1"
    with pytest.raises(UsageError):
        account.submitted(3, 2)


def test_request_account_files_controller_failures_and_counts_duplicates() -> None:
    account = RequestAccount(2)
    for rid, rank in ((0, 0), (1, 1), (2, 1)):
        account.submitted(rid, rank)
    account.finished(_fin(0, 0))
    failed = msgspec.structs.replace(_fin(1, 1), status="failed", reason="rank_dead")
    account.finished(failed)
    account.finished(_fin(1, 1))  # a second result for a request the controller failed
    account.finished(_fin(0, 0))  # and for one that finished
    summary = account.summary()
    assert (summary.finished, summary.failed, summary.pending, summary.lost) == (1, 1, 1, 0)
    assert (summary.duplicates, summary.late_finished) == (2, 0)
    assert account.failed[1] == "rank_dead: dp_rank=1"
