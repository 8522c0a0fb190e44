"""Shared fixtures: every test gets its own instance name and leaves no segment behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadsnap import (
    SegmentError,
    SegmentInUseError,
    ShmWriter,
    segment_path,
    unlink_segment,
)
from loadsnap.collector import collector_lock_path
from tests.helpers import promtool_path, unique_instance

MOUNT_TIMEOUT_S = 20.0


@pytest.fixture
def instance() -> Iterator[str]:
    """A unique instance name; its segment and lock file are removed after the test.

    A writer the test left attached fails the test (``SegmentInUseError``); a hostile file a
    test planted at the segment's path (a FIFO, another owner's file) is removed by hand.
    """
    name = unique_instance("t", 10)
    yield name
    try:
        unlink_segment(name)
    except SegmentInUseError:
        raise
    except SegmentError:
        path = segment_path(name)
        for leftover in (path, path + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    os.rmdir(leftover)
                else:
                    os.unlink(leftover)


@pytest.fixture
def writers(instance: str, dp_size: int) -> Iterator[list[ShmWriter]]:
    """A writer for every rank of a ``dp_size``-rank instance, closed after the test.

    ``dp_size`` is a fixture of the test module that uses ``writers``.
    """
    opened = [ShmWriter(instance, dp_size, rank) for rank in range(dp_size)]
    try:
        yield opened
    finally:
        for writer in opened:
            writer.close()


@pytest.fixture
def collector_lock_cleanup(instance: str) -> Iterator[None]:
    """Remove the collector lock file the test's collectors leave next to the segment."""
    yield
    path = collector_lock_path(instance)
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def promtool() -> str:
    """promtool's path; skips (before the test starts anything) where it is not installed."""
    return promtool_path()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, options)`` mounts a tmpfs at ``tmp_path / name`` and returns the path.

    It skips the test where mounting is refused; every mount is undone after the test.
    """
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                capture_output=True,
                text=True,
                timeout=MOUNT_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount tmpfs: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", str(point)], check=False, timeout=MOUNT_TIMEOUT_S)
