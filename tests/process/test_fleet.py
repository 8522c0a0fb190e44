"""``SchedulerFleet`` and the commands that spawn schedulers: one deployment per instance.

* A second deployment of a running instance (``loadsnap demo``, ``python -m dp_controller
  --spawn``) exits non-zero at once with one line and touches nothing of the first, which keeps
  serving fresh loads with no failed request.
* SIGKILL of the demo takes its schedulers with it; the next start of the instance reclaims
  what the dead one left and, once stopped, leaves nothing.
* A scheduler that fails to start is reported with its own last line; the fleet never removes
  a segment that another process still writes.
* The deployment lock is held by the schedulers too; the ipc directory is private.

Real processes throughout; every process and path is cleaned up in ``finally``; figures are
printed as ``FIGURES {json}`` (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dp_controller.harness.fleet import (
    InstanceRunningError,
    SchedulerFleet,
    claim_instance,
    deployment_lock_path,
    ipc_dir_path,
)
from loadsnap import ShmReader, SlotStatus, segment_path, unlink_segment
from loadsnap.errors import SegmentError, TransportError
from tests.helpers import (
    ROOT,
    Demo,
    demo_command,
    pid_alive,
    report,
    scheduler_command,
    stop_process,
    unique_instance,
    wait_until,
)

DP = 4
WAIT_S = 30.0
SECOND_START_LIMIT_S = 10.0  # "within seconds": the second deployment must give up this fast
CHILDREN_GONE_S = 2.0  # the bound for the schedulers of a killed demo

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux only"
)
STOPPED_RE = re.compile(r"stopped; (\d+) dispatched, (\d+) finished, (\d+) failed$")


@pytest.fixture
def name() -> Iterator[str]:
    """A unique instance name; whatever a failed test left under it is removed afterwards."""
    instance = unique_instance("fl")
    yield instance
    unlink_segment(instance)
    for path in _named_after(instance):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _named_after(instance: str) -> list[str]:
    """Every entry of /dev/shm and the temp dir whose name contains ``instance``."""
    dirs = {"/dev/shm", tempfile.gettempdir()}
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, f"*{instance}*")))


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _manual_scheduler(instance: str, dp_size: int, rank: int, tmp: Path) -> subprocess.Popen[bytes]:
    """A scheduler started by hand, outside any fleet (someone else's live writer)."""
    requests, results = f"ipc://{tmp}/manual-req-{rank}", f"ipc://{tmp}/manual-results"
    cmd = scheduler_command(
        instance, dp_size, rank, requests, results, "--heartbeat-interval-s=0.1"
    )
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _fresh(instance: str, rank: int) -> bool:
    with ShmReader(instance) as reader:
        try:
            return reader.read(rank).status == SlotStatus.FRESH
        except SegmentError:
            return False


# --- a second deployment of a running instance ------------------------------------------------


def test_second_deployment_fails_fast_first_keeps_serving(name: str) -> None:
    first = Demo.start(name, "--dp-size", str(DP), "--duration-s", "60")
    try:
        base = first.wait_for_url()
        segment = os.stat(segment_path(name))
        seconds: list[float] = []
        for cmd in (
            demo_command(name, "--dp-size", str(DP), "--duration-s", "5"),
            [sys.executable, "-m", "dp_controller", "--spawn", "--instance", name],
        ):
            start = time.monotonic()
            second = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=SECOND_START_LIMIT_S
            )
            seconds.append(time.monotonic() - start)
            assert second.returncode != 0
            prog = "loadsnap demo" if "demo" in cmd else "dp_controller"
            lock = deployment_lock_path(name)
            assert second.stderr.splitlines() == [
                f"{prog}: instance {name} is already running (lock={lock})"
            ]
            assert "Traceback" not in second.stdout + second.stderr
        # The first one's segment is the same file, and it keeps serving fresh loads.
        after = os.stat(segment_path(name))
        assert (after.st_dev, after.st_ino) == (segment.st_dev, segment.st_ino)
        reads = 0
        with httpx.Client(base_url=base, timeout=10.0) as client:
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                loads = client.get("/v1/loads").json()["loads"]
                assert [load["status"] for load in loads] == ["fresh"] * DP
                reads += 1
                time.sleep(0.1)
        assert first.proc.poll() is None
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(WAIT_S) == 0
    finally:
        first.stop(WAIT_S)
    match = STOPPED_RE.search(first.output[-1])
    assert match is not None, first.output
    dispatched, finished, failed = (int(g) for g in match.groups())
    assert failed == 0 and dispatched > 0
    assert _named_after(name) == []
    report(
        "second_deployment",
        {
            "second_demo_exit_s": round(seconds[0], 3),
            "second_controller_exit_s": round(seconds[1], 3),
            "first_fresh_reads_after": reads,
            "first_dispatched": dispatched,
            "first_finished": finished,
            "first_failed": failed,
        },
    )


def test_fleet_refuses_a_claimed_instance_before_spawning(instance: str) -> None:
    lock = claim_instance(instance)
    try:
        with pytest.raises(InstanceRunningError, match=f"instance {instance} is already running"):
            SchedulerFleet(instance, 2)
        assert not os.path.exists(ipc_dir_path(instance))  # nothing made, nothing spawned
    finally:
        lock.release(remove=True)


# --- SIGKILL of the demo ----------------------------------------------------------------------


@linux_only
@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_sigkill_demo_leaves_no_child_and_next_start_reclaims(name: str, transport: str) -> None:
    demo = Demo.start(
        name, "--dp-size", str(DP), "--duration-s", "30", "--transport", transport, new_session=True
    )
    children: list[int] = []
    try:
        demo.wait_for_url()  # printed once every rank has published
        children = _children(demo.proc.pid)
        assert len(children) == DP
        killed = time.monotonic()
        os.kill(demo.proc.pid, signal.SIGKILL)  # the group leader only
        demo.proc.wait(WAIT_S)
        assert wait_until(lambda: not any(map(pid_alive, children)), CHILDREN_GONE_S, 0.005)
        gone_s = time.monotonic() - killed
    finally:
        for pid in children:  # only if the test failed: never leave them behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        demo.stop(WAIT_S)
    left = [os.path.basename(p) for p in _named_after(name)]

    second = subprocess.run(
        demo_command(name, "--dp-size", str(DP), "--duration-s", "3", "--transport", transport),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S + 3,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    match = STOPPED_RE.search(second.stdout.splitlines()[-1])
    assert match is not None, second.stdout
    assert int(match.group(3)) == 0
    assert _named_after(name) == []
    report(
        f"sigkill_demo_{transport}",
        {"children": len(children), "all_gone_s": round(gone_s, 3), "left_by_dead_demo": left},
    )


@linux_only
def test_lock_held_until_the_killed_fleets_last_scheduler_exits(name: str) -> None:
    # A fleet in another process; its scheduler is stopped, then the fleet is SIGKILLed: the
    # scheduler's SIGTERM stays pending, so it lives on, and so does the deployment.
    script = (
        "import sys, time\n"
        "from dp_controller.harness.fleet import SchedulerFleet\n"
        "fleet = SchedulerFleet(sys.argv[1], 1)\n"
        "fleet.wait_ready()\n"
        "print(fleet.procs[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, name], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, signal.SIGSTOP)
        parent.kill()
        parent.wait(WAIT_S)
        with pytest.raises(InstanceRunningError):
            claim_instance(name)
        os.kill(child, signal.SIGCONT)  # the pending SIGTERM is delivered: a clean stop
        assert wait_until(lambda: not pid_alive(child), WAIT_S)
        lock = claim_instance(name)
        lock.release(remove=True)
    finally:
        if parent.stdout is not None:
            parent.stdout.close()
        parent.kill()
        parent.wait(WAIT_S)
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)


# --- startup errors and segments that are not ours ----------------------------------------------


def test_startup_error_reaches_the_user_and_foreign_segment_survives(
    name: str, tmp_path: Path
) -> None:
    manual = _manual_scheduler(name, 1, 0, tmp_path)
    try:
        assert wait_until(lambda: _fresh(name, 0), WAIT_S)
        segment = os.stat(segment_path(name))

        fleet = SchedulerFleet(name, 1)
        try:
            with pytest.raises(TransportError) as caught:
                fleet.wait_ready(timeout_s=WAIT_S)
        finally:
            fleet.close()
        message = str(caught.value)
        assert message.startswith("scheduler dp_rank=0 exited rc=2: scheduler: ")
        assert "already has a live writer" in message

        demo = subprocess.run(
            demo_command(name, "--dp-size", "1", "--duration-s", "5"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert demo.returncode == 1
        [line] = demo.stderr.splitlines()
        assert line.startswith("loadsnap demo: scheduler dp_rank=0 exited rc=2: scheduler: ")
        assert "already has a live writer" in line

        # The manual scheduler's segment was never removed, and it still publishes.
        after = os.stat(segment_path(name))
        assert (after.st_dev, after.st_ino) == (segment.st_dev, segment.st_ino)
        assert manual.poll() is None
        assert wait_until(lambda: _fresh(name, 0), WAIT_S)
    finally:
        stop_process(manual, timeout_s=WAIT_S)
    assert _named_after(name) == []


def test_startup_error_quoted_and_kept_in_log_dir(instance: str, tmp_path: Path) -> None:
    fleet = SchedulerFleet(instance, 1, ["--transport-opt", "bad"], log_dir=str(tmp_path))
    try:
        with pytest.raises(TransportError) as caught:
            fleet.wait_ready(timeout_s=WAIT_S)
    finally:
        fleet.close()
    log = tmp_path / "scheduler-0.log"
    assert str(caught.value) == (
        "scheduler dp_rank=0 exited rc=2: scheduler: --transport-opt expects KEY=VALUE: "
        f"got='bad' (log={log})"
    )
    assert log.read_text().splitlines()[-1].endswith("got='bad'")  # kept after close
    assert not os.path.exists(ipc_dir_path(instance))


def _unlink_refuses_live_writers() -> bool:
    """Whether ``unlink_segment`` refuses a segment that another process writes (the rule of
    the shared-memory core's rewrite)."""
    probe = unique_instance("probe")
    script = (
        "import sys\n"
        "from loadsnap.shm_writer import ShmWriter\n"
        "with ShmWriter(sys.argv[1], 1, 0):\n"
        "    print('attached', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, probe],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline() == "attached\n"
        unlink_segment(probe)
    except SegmentError:
        return True
    finally:
        writer.stdin.close()  # EOF: the writer closes and exits
        writer.wait(WAIT_S)
        writer.stdout.close()
        unlink_segment(probe)
    return False


def test_close_after_a_killed_rank_leaves_a_foreign_writers_segment(
    name: str, tmp_path: Path
) -> None:
    if not _unlink_refuses_live_writers():
        pytest.skip(
            "needs loadsnap._segment.unlink_segment that raises SegmentError while a live "
            "writer is attached (the shared-memory core's change, not on this branch yet)"
        )
    manual = _manual_scheduler(name, 2, 0, tmp_path)  # someone else's rank 0
    try:
        assert wait_until(lambda: _fresh(name, 0), WAIT_S)
        fleet = SchedulerFleet(name, 2)
        try:
            assert wait_until(lambda: fleet.procs[0].poll() is not None, WAIT_S)
            assert wait_until(lambda: _fresh(name, 1), WAIT_S)
            fleet.procs[1].kill()  # our rank 1 dies without closing its writer
            fleet.procs[1].wait(WAIT_S)
        finally:
            fleet.close()  # must try to remove the segment, and be refused
        assert os.path.exists(segment_path(name))
        assert wait_until(lambda: _fresh(name, 0), WAIT_S)
    finally:
        stop_process(manual, timeout_s=WAIT_S)


# --- the ipc directory --------------------------------------------------------------------------


def test_dead_deployments_ipc_directory_is_reclaimed(instance: str) -> None:
    ipc = Path(ipc_dir_path(instance))
    (ipc / "old").mkdir(parents=True, mode=0o700)
    (ipc / "req-0").write_text("a dead deployment's socket")
    try:
        with SchedulerFleet(instance, 1) as fleet:
            fleet.wait_ready(timeout_s=WAIT_S)
            assert sorted(os.listdir(ipc)) == ["req-0", "scheduler-0.log"]
            assert stat_mode(ipc) == 0o700
        assert not ipc.exists()
        assert not os.path.exists(deployment_lock_path(instance))
    finally:
        shutil.rmtree(ipc, ignore_errors=True)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_symlink_at_ipc_directory_refused(instance: str, tmp_path: Path) -> None:
    ipc = ipc_dir_path(instance)
    os.symlink(tmp_path, ipc)
    try:
        with pytest.raises(TransportError, match=r"ipc directory path is not a directory"):
            SchedulerFleet(instance, 1)
        assert os.path.islink(ipc) and os.listdir(tmp_path) == []
        assert not os.path.exists(deployment_lock_path(instance))  # released and removed
    finally:
        os.unlink(ipc)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's directory needs root")
def test_other_users_ipc_directory_refused(instance: str) -> None:
    ipc = ipc_dir_path(instance)
    os.mkdir(ipc, 0o700)
    try:
        os.chown(ipc, 65534, 65534)
        with pytest.raises(TransportError, match=r"ipc directory belongs to uid=65534"):
            SchedulerFleet(instance, 1)
        assert os.path.isdir(ipc)
    finally:
        os.rmdir(ipc)
