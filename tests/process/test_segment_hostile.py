"""Hostile and broken places: planted files, bad shm directories, crashed creators, squatters.

Everything here must end in one ``loadsnap`` error that names the path, never in a hang or a
bare ``OSError``/``ValueError``; whatever can block runs in a subprocess with a timeout.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loadsnap import (
    LoadSnapshot,
    LockHeldError,
    SegmentError,
    SegmentState,
    ShmReader,
    ShmWriter,
    UsageError,
    _liveness,
    _location,
    segment_path,
)
from loadsnap._lockfile import LockFile
from loadsnap.server import ServerThread, create_app
from tests.helpers import loadsnap_command

_TIMEOUT_S = 20.0


def _run(code: str, *args: str, timeout_s: float = _TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _loadsnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        loadsnap_command(*args),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# --- something other than a segment at the segment's path -------------------------------------

_READ_STATE = """
import sys
from loadsnap import ShmReader
with ShmReader(sys.argv[1]) as reader:
    state, reason = reader.segment_state()
print(state.value, reason)
"""


def _plant(kind: str, path: str) -> None:
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    else:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_non_regular_file_at_segment_path_is_refused_without_hanging(
    instance: str, kind: str
) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    path = segment_path(instance)
    _plant(kind, path)
    article = {"fifo": "a FIFO", "directory": "a directory", "device": "a device"}[kind]
    # A reader in another process (a hang there would only cost the timeout).
    done = _run(_READ_STATE, instance)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("incompatible") and article in done.stdout
    assert path in done.stdout
    # `loadsnap inspect`: one line, non-zero exit.
    done = _loadsnap("inspect", "--instance", instance)
    assert done.returncode == 1
    assert article in _one_line(done.stderr)
    # /v1/loads answers 503 with the reason instead of blocking the event loop.
    with (
        ServerThread(create_app(instance)) as server,
        httpx.Client(base_url=server.url, timeout=5.0) as http,
    ):
        response = http.get("/v1/loads")
        assert response.status_code == 503 and response.json()["reason"] == "incompatible"
    # A writer refuses it with the documented error, not ValueError/IsADirectoryError.
    with pytest.raises(SegmentError, match=article) as info:
        ShmWriter(instance, 2, 0)
    assert path in str(info.value) and not isinstance(info.value, ValueError)
    assert os.path.lexists(path)  # refused, never removed or written through


# --- bad shm directories ------------------------------------------------------------------------

_SCHEDULER = [sys.executable, "-m", "scheduler", "--dp-size=1", "--dp-rank=0"]


def _scheduler(instance: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *_SCHEDULER,
            f"--instance={instance}",
            f"--request-addr=ipc://{tmp_path}/req",
            f"--result-addr=ipc://{tmp_path}/res",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )


def test_missing_shm_dir_is_never_created(instance: str, tmp_path: Path) -> None:
    missing = tmp_path / "dev-shmm"
    with pytest.raises(UsageError, match=f"shm directory does not exist: shm_dir={missing}"):
        ShmWriter(instance, 1, 0, shm_dir=str(missing))
    with pytest.raises(UsageError, match="does not exist"):
        ShmReader(instance, shm_dir=str(missing))
    done = _scheduler(instance, tmp_path, f"--shm-dir={missing}")
    assert done.returncode != 0
    assert "does not exist" in _one_line(done.stderr)
    done = _loadsnap("inspect", "--instance", instance, "--shm-dir", str(missing))
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not missing.exists()


def test_environment_shm_dir_is_checked_too(
    instance: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOADSNAP_SHM_DIR", str(tmp_path / "typo"))
    with pytest.raises(UsageError, match="does not exist"):
        ShmWriter(instance, 1, 0)
    assert not (tmp_path / "typo").exists()


def test_file_as_shm_dir_refused(instance: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        ShmWriter(instance, 1, 0, shm_dir=str(a_file))
    done = _scheduler(instance, tmp_path, f"--shm-dir={a_file}")
    assert done.returncode != 0 and "is not a directory" in _one_line(done.stderr)


def test_proc_as_shm_dir_fails_at_once(instance: str, tmp_path: Path) -> None:
    started = time.monotonic()
    done = _scheduler(instance, tmp_path, "--shm-dir=/proc")
    assert done.returncode != 0
    assert "cannot create files in /proc" in _one_line(done.stderr)
    assert time.monotonic() - started < _TIMEOUT_S  # (the run's timeout would have raised)


def test_read_only_shm_dir_is_one_line(
    instance: str, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    read_only = tmpfs("ro", "ro,size=1m,mode=0700")
    with pytest.raises(SegmentError, match=f"{read_only} is read-only"):
        ShmWriter(instance, 1, 0, shm_dir=str(read_only))
    done = _scheduler(instance, tmp_path, f"--shm-dir={read_only}")
    assert done.returncode != 0 and "is read-only" in _one_line(done.stderr)


def test_exhausted_inodes_are_a_segment_error_and_leave_no_lock(
    instance: str, tmpfs: Callable[[str, str], Path]
) -> None:
    # The root directory and the lock file take the only two inodes: the segment gets none.
    tiny = tmpfs("inodes", "nr_inodes=2,size=1m,mode=0700")
    with pytest.raises(SegmentError, match="no space or inodes left") as info:
        ShmWriter(instance, 1, 0, shm_dir=str(tiny))
    assert segment_path(instance, str(tiny)) in str(info.value)
    assert os.listdir(tiny) == []  # the refused creation took its lock file with it


def test_full_tmpfs_leaves_no_lock_file(instance: str, tmpfs: Callable[[str, str], Path]) -> None:
    small = tmpfs("small", "size=64k,mode=0700")
    with pytest.raises(SegmentError, match="cannot reserve"):
        ShmWriter(instance, 64, 0, shm_dir=str(small))
    assert os.listdir(small) == []


# --- creators killed mid-way ----------------------------------------------------------------------

_CREATOR = """
import sys
from loadsnap import ShmWriter
print("creating", flush=True)
ShmWriter(sys.argv[1], int(sys.argv[2]), 0)
print("created", flush=True)
sys.stdin.read()
"""


def test_creator_killed_during_creation_never_blocks_the_instance(instance: str) -> None:
    # At dp 16384 creation reserves ~72 MB: kill the creator as soon as its file appears.
    path = segment_path(instance)
    rng = random.Random(7)
    caught_unfinished = 0
    for _ in range(8):
        with subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_CREATOR), instance, "16384"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None and proc.stdout.readline() == "creating\n"
            deadline = time.monotonic() + _TIMEOUT_S
            while not os.path.exists(path) and time.monotonic() < deadline:
                pass
            time.sleep(rng.uniform(0, 0.01))
            proc.send_signal(signal.SIGKILL)
            proc.wait(_TIMEOUT_S)
            assert proc.stdin is not None
            proc.stdin.close()
        with ShmReader(instance) as reader:
            state = reader.segment_state()[0]
        caught_unfinished += state is SegmentState.NOT_READY
        assert state in (SegmentState.NOT_READY, SegmentState.OK, SegmentState.MISSING)
        # The next writer takes the instance over, whatever step the creator died at.
        with ShmWriter(instance, 16384, 1) as writer:
            writer.publish(LoadSnapshot(dp_rank=1, num_running_reqs=5))
            with ShmReader(instance) as reader:
                read = reader.read(1)
                assert read.snapshot is not None and read.snapshot.num_running_reqs == 5
        assert not os.path.exists(path) and not os.path.exists(path + ".lock")
    assert caught_unfinished >= 1  # the kill did land mid-creation
    print(f"\ncreator kills: {caught_unfinished} of 8 left an unfinished file; 8 of 8 reclaimed")


# --- squatted lock files ------------------------------------------------------------------------


def test_foreign_lock_file_names_the_path(instance: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown to another uid")
    lock = segment_path(instance) + ".lock"
    Path(lock).write_text("")
    os.chown(lock, 65534, -1)
    try:
        with pytest.raises(SegmentError, match="belongs to uid=65534") as info:
            ShmWriter(instance, 1, 0)
        assert lock in str(info.value)
    finally:
        os.unlink(lock)


def test_held_lock_times_out_with_a_loadsnap_error(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_location, "LOCK_TIMEOUT_S", 0.2)
    squatter = LockFile(segment_path(instance) + ".lock")
    squatter.acquire(0)
    try:
        with pytest.raises(LockHeldError, match="instance lock is held by another process"):
            ShmWriter(instance, 1, 0)
    finally:
        squatter.release(remove=True)


# --- attaching costs O(1) -----------------------------------------------------------------------


def test_attach_and_close_probe_a_constant_number_of_locks(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _liveness.OFD_LOCKS:
        pytest.skip("no OFD locks on this platform (pid fallback scans every slot)")
    calls = {"fcntl": 0}
    real = fcntl.fcntl

    def counting(fd: int, cmd: int, arg: bytes) -> bytes:
        calls["fcntl"] += 1
        return real(fd, cmd, arg)

    dp_size = 4096
    with ShmWriter(instance, dp_size, 0):  # creates; other ranks attach below
        monkeypatch.setattr(fcntl, "fcntl", counting)
        writers = [ShmWriter(instance, dp_size, rank) for rank in (1, 2047, 4095)]
        per_attach = calls["fcntl"] / len(writers)
        for writer in writers:
            writer.close()
        per_close = (calls["fcntl"] - per_attach * len(writers)) / len(writers)
    assert per_attach <= 3 and per_close <= 2, calls  # never one per slot
