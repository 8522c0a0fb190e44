"""``scheduler.lifeline``: a child that asked for it dies with its parent, and one whose parent
is already gone refuses to start. Real processes; the test process itself never arms it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.lifeline import PARENT_PID_ENV, child_env, die_with_parent
from tests.helpers import ROOT, pid_alive, scheduler_command, wait_until

WAIT_S = 15.0

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only"
)

# A parent that spawns one armed child, prints the child's pid, then waits to be killed.
PARENT = """
import subprocess, sys, time
from scheduler.lifeline import child_env
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], sys.argv[2]],
    env=child_env(),
    stdout=subprocess.PIPE,
    text=True,
)
assert child.stdout.readline() == "armed\\n"
print(child.pid, flush=True)
time.sleep(600)
"""
CHILD = """
import signal, sys, time
from scheduler.lifeline import die_with_parent


def on_term(*_):
    with open(sys.argv[1], "w") as f:  # proof that the signal was SIGTERM (a clean stop)
        f.write("SIGTERM")
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
die_with_parent()
print("armed", flush=True)
time.sleep(600)
"""


def _scheduler(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    instance = f"lifeline-{os.getpid()}"
    cmd = scheduler_command(instance, 1, 0, f"ipc://{tmp_path}/req", f"ipc://{tmp_path}/res")
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)


@linux_only
def test_child_gets_sigterm_when_its_parent_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "signal"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(marker)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()
        parent.wait(WAIT_S)
        assert wait_until(lambda: not pid_alive(child), WAIT_S)
        assert marker.read_text() == "SIGTERM"
    finally:
        parent.kill()
        parent.wait(WAIT_S)
        if parent.stdout is not None:
            parent.stdout.close()
        if child and pid_alive(child):  # the mechanism failed: do not leave the orphan behind
            os.kill(child, signal.SIGKILL)


@linux_only
def test_scheduler_whose_parent_is_gone_refuses_to_start(tmp_path: Path) -> None:
    # The test process is its parent, not pid 1: exactly what a child sees when the parent
    # that spawned it died before it could arm the signal (it was handed to init).
    result = _scheduler(child_env(parent_pid=1), tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"scheduler: parent pid=1 exited before this process started ({PARENT_PID_ENV}); "
        "not starting"
    ]


def test_malformed_parent_pid_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, PARENT_PID_ENV: "abc"}
    result = _scheduler(env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"scheduler: {PARENT_PID_ENV} must be a positive pid: got='abc'"
    ]


def test_unset_variable_arms_nothing() -> None:
    assert die_with_parent({}) is None
    assert die_with_parent({PARENT_PID_ENV: ""}) is None


def test_child_env_names_this_process_by_default() -> None:
    assert child_env(base={})[PARENT_PID_ENV] == str(os.getpid())
    assert child_env(7, base={"A": "1"}) == {"A": "1", PARENT_PID_ENV: "7"}
