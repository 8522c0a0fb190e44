"""``loadsnap._lockfile``: exclusive, removable by its holder, clear about unusable paths."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from loadsnap import LockHeldError, SegmentError
from loadsnap._lockfile import LockFile

_TIMEOUT_S = 20.0


def test_second_holder_is_refused_until_release(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    first = LockFile(path, "test lock")
    first.acquire(0)
    with pytest.raises(LockHeldError, match=r"test lock is held by another process \(lock="):
        LockFile(path, "test lock").acquire(0)
    with pytest.raises(LockHeldError, match=r"waited 0\.05 s"):
        LockFile(path, "test lock").acquire(0.05)
    first.release()
    second = LockFile(path, "test lock")
    second.acquire(0)
    assert second.held
    second.release(remove=True)
    assert not os.path.exists(path)


def test_holder_removing_the_file_never_gives_two_holders(tmp_path: Path) -> None:
    # A waiter that opened the old inode must not count a lock on it once the holder removed
    # the name while a newcomer locks a fresh file: the inode check makes it start over.
    path = str(tmp_path / "race.lock")
    holders = 0
    most = 0
    guard = threading.Lock()
    errors: list[BaseException] = []

    def contend() -> None:
        nonlocal holders, most
        try:
            for _ in range(200):
                lock = LockFile(path)
                lock.acquire(_TIMEOUT_S)
                with guard:
                    holders += 1
                    most = max(most, holders)
                with guard:
                    holders -= 1
                lock.release(remove=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_TIMEOUT_S * 4)
    assert not errors
    assert most == 1
    assert not os.path.exists(path)


def test_lock_dies_with_its_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.lock")
    holder = textwrap.dedent(
        f"""
        import os, sys
        from loadsnap._lockfile import LockFile
        LockFile({path!r}).acquire(0)
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(LockHeldError):
            LockFile(path).acquire(0)
        proc.kill()
        proc.wait(_TIMEOUT_S)
    lock = LockFile(path)
    lock.acquire(0)  # the kernel released it with the process
    lock.release(remove=True)


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        ("fifo", "is not a regular file"),
        ("dir", "it is a directory"),
        ("symlink", "it is a symlink"),
    ],
)
def test_hostile_paths_are_refused_without_blocking(
    tmp_path: Path, plant: str, message: str
) -> None:
    path = tmp_path / "hostile.lock"
    if plant == "fifo":
        os.mkfifo(path)
    elif plant == "dir":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "target")
    with pytest.raises(SegmentError, match=message) as info:
        LockFile(str(path), "instance lock").acquire(0)
    assert str(path) in str(info.value)
    assert not (tmp_path / "target").exists()


def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown to another uid")
    path = tmp_path / "squatted.lock"
    path.write_bytes(b"")
    os.chown(path, 65534, -1)
    with pytest.raises(SegmentError, match=r"belongs to uid=65534, not uid=0"):
        LockFile(str(path)).acquire(0)


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("/nonexistent-loadsnap-dir", "directory /nonexistent-loadsnap-dir does not exist"),
        ("/proc", "cannot create files in /proc"),
    ],
)
def test_unusable_directories_explained(directory: str, message: str) -> None:
    with pytest.raises(SegmentError, match=message):
        LockFile(f"{directory}/x.lock").acquire(0)
