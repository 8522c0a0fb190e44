"""Chaos on a running deployment: real scheduler processes, a real HTTP server, real signals.

* SIGKILL a scheduler mid-run: ``/v1/loads`` reports it dead within the staleness budget, the
  controller stops sending to it, every request ends finished or reported failed
  (:class:`~dp_controller.loss.RequestAccount`), and a restarted scheduler rejoins with a new
  epoch.
* SIGSTOP a reader process, then a scheduler: the others keep publishing, HTTP keeps answering.
* SIGKILL a controller process: the schedulers keep publishing; a new controller picks up.

Every process is killed in ``finally`` (the fleet sends SIGCONT first); every wait polls a
condition with a deadline. Figures are printed as ``FIGURES {json}`` and, when
``LOADSNAP_FIGURES_DIR`` is set, written there (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dp_controller import BudgetConfig, DPBudget, Policy
from dp_controller.controller import Controller
from dp_controller.fleet import SchedulerFleet
from dp_controller.loss import RequestAccount, dead_ranks
from loadsnap import ShmReader, SlotStatus
from loadsnap.errors import UsageError
from loadsnap.server import ServerThread, create_app
from scheduler.messages import Finished

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


def report(name: str, figures: dict[str, Any]) -> None:
    """Print figures for RELIABILITY.md (and write them under $LOADSNAP_FIGURES_DIR)."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    out_dir = os.environ.get("LOADSNAP_FIGURES_DIR")
    if out_dir:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as out:
            out.write(line + "\n")


def wait_until(cond: Callable[[], bool], timeout_s: float = WAIT_S, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def scheduler_cmd(fleet: SchedulerFleet, rank: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scheduler",
        "--instance",
        fleet.instance,
        "--dp-size",
        str(fleet.dp_size),
        "--dp-rank",
        str(rank),
        "--request-addr",
        fleet.request_addrs[rank],
        "--result-addr",
        fleet.result_addr,
        *SCHED_ARGS,
    ]


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


def test_sigkill_scheduler_dead_no_loss_and_rejoin(
    fleet: SchedulerFleet, http: httpx.Client
) -> None:
    victim = 1
    reader = ShmReader(fleet.instance, stale_after_s=STALE_S)
    config = BudgetConfig(
        policy=Policy.TOTAL_REQUESTS, refresh_interval_s=0.02, stale_after_s=STALE_S
    )
    budget = DPBudget(reader, config, dp_size=fleet.dp_size)
    account = RequestAccount(fleet.dp_size)
    controller = Controller(budget, fleet.request_addrs, fleet.result_addr)
    try:

        def submit(n: int) -> list[int]:
            ranks = []
            for _ in range(n):
                rid, decision = controller.submit(PROMPT, NEW_TOKENS)
                account.submitted(rid, decision.rank)
                ranks.append(decision.rank)
            return ranks

        def pump(timeout_s: float = 0.0) -> int:
            """Take finished requests into the account; return what is still pending."""
            for message in controller.poll(timeout_s):
                account.finished(message)
            return account.pending()

        old_epoch = reader.read_all()[victim].epoch
        submit(30)  # every rank busy
        assert wait_until(lambda: pump(0.01) >= 0 and account.pending(victim) > 0)
        in_flight_at_kill = account.pending(victim)
        fleet.procs[victim].kill()
        t_kill = time.monotonic()
        # Keep dispatching while the budget and the HTTP endpoint notice.
        http_dead_s = budget_dead_s = None
        sent_after_dead = 0
        while time.monotonic() - t_kill < WAIT_S and (http_dead_s is None or budget_dead_s is None):
            ranks = submit(2)
            if budget_dead_s is not None:
                sent_after_dead += ranks.count(victim)
            pump(0.005)
            if budget_dead_s is None and victim in dead_ranks(budget):
                budget_dead_s = time.monotonic() - t_kill
                account.fail_ranks(dead_ranks(budget))
            if http_dead_s is None and rank_status(http, victim) == "dead":
                http_dead_s = time.monotonic() - t_kill
        assert http_dead_s is not None and http_dead_s <= STALE_S, http_dead_s
        assert budget_dead_s is not None and budget_dead_s <= STALE_S, budget_dead_s
        # The controller stops sending to the dead rank.
        after = submit(60)
        sent_after_dead += after.count(victim)
        assert sent_after_dead == 0
        account.fail_ranks(dead_ranks(budget))  # anything dispatched before the refresh
        assert wait_until(lambda: pump(0.02) == 0), account.summary()
        before_restart = account.summary()
        assert before_restart.lost == 0 and before_restart.failed >= 1
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

        assert wait_until(rejoined)
        rejoin_s = time.monotonic() - t_restart
        assert wait_until(lambda: (budget.refresh(force=True), victim not in dead_ranks(budget))[1])
        assert rank_status(http, victim) == "fresh"
        assert budget.stats.epoch_resets >= 1
        back = submit(30)
        assert back.count(victim) >= 1  # it gets work again
        assert wait_until(lambda: pump(0.02) == 0), account.summary()
        final = account.summary()
        assert final.lost == 0 and final.pending == 0
        assert final.submitted == final.finished + final.failed
        report(
            "chaos_sigkill",
            {
                "http_dead_after_s": round(http_dead_s, 4),
                "budget_dead_after_s": round(budget_dead_s, 4),
                "staleness_budget_s": STALE_S,
                "in_flight_on_victim_at_kill": in_flight_at_kill,
                "dispatches_to_dead_rank": sent_after_dead,
                "rejoin_s": round(rejoin_s, 3),
                "dispatches_to_rejoined_rank": back.count(victim),
                "epoch_resets": budget.stats.epoch_resets,
                "submitted": final.submitted,
                "finished": final.finished,
                "reported_failed": final.failed,
                "late_finished": final.late_finished,
                "lost": final.lost,
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
        assert wait_until(lambda: rank_status(http, 2) == "fresh")
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
controller = Controller(DPBudget(reader, dp_size=dp_size), addrs, result_addr)
for _ in range(40):
    controller.submit([5] * 64, 200)
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
            lambda: sum(r.snapshot.num_running_reqs for r in reader.read_all() if r.snapshot) > 0
        )
        old.kill()
        old.wait(5.0)
        # Schedulers keep publishing with no controller.
        start = slot_seqs(reader)
        assert wait_until(lambda: all(a > b for a, b in zip(slot_seqs(reader), start, strict=True)))
        assert all(r.status is SlotStatus.FRESH for r in reader.read_all())
        assert all(p.poll() is None for p in fleet.procs)
        # A new controller binds the same result address and gets work done.
        budget = DPBudget(reader, BudgetConfig(stale_after_s=STALE_S), dp_size=fleet.dp_size)
        controller = Controller(budget, fleet.request_addrs, fleet.result_addr)
        account = RequestAccount(fleet.dp_size)
        for _ in range(30):
            rid, decision = controller.submit(PROMPT, NEW_TOKENS)
            account.submitted(rid, decision.rank)

        def drained() -> bool:
            assert controller is not None
            for message in controller.poll(0.02):
                account.finished(message)
            return account.pending() == 0

        assert wait_until(drained), account.summary()
        summary = account.summary()
        assert summary.lost == 0 and summary.finished == 30
        report(
            "chaos_kill_controller",
            {
                "new_controller_submitted": summary.submitted,
                "new_controller_finished": summary.finished,
                "old_controller_results_received": summary.unknown_finished,
                "ledger_overshoot_acks": budget.ledger.stats.overshoot_acks,
                "lost": summary.lost,
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
