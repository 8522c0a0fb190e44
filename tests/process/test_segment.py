"""Segment lifecycle: every refused file, reclaim of dead segments, unlink, reattach."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadsnap import (
    LayoutError,
    LoadSnapshot,
    SegmentError,
    SegmentState,
    SegmentUnavailableError,
    ShmReader,
    ShmWriter,
    SlotStatus,
    segment_path,
    unlink_segment,
)
from loadsnap import shm_reader as shm_reader_module
from loadsnap.layout import (
    DP_SIZE_OFFSET,
    LAYOUT_MAJOR,
    LAYOUT_MAJOR_OFFSET,
    MAGIC_OFFSET,
    READY_OFFSET,
    SegmentGeometry,
)

_CHILD_TIMEOUT_S = 20.0

# A writer in another process: publishes once, says "ready", then holds the rank until stdin
# closes ("hold") or dies without closing ("die").
_HOLDER = textwrap.dedent(
    """
    import os, sys
    from loadsnap import LoadSnapshot, ShmWriter
    instance, dp_size, rank, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    writer = ShmWriter(instance, dp_size, rank)
    writer.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=7))
    print("ready", writer.epoch, flush=True)
    if mode == "die":
        os._exit(0)
    sys.stdin.read()
    writer.close()
    """
)


@contextlib.contextmanager
def _holder(instance: str, dp_size: int, rank: int) -> Iterator[subprocess.Popen[str]]:
    """A live writer process for ``rank``; closed cleanly on exit."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, instance, str(dp_size), str(rank), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("ready")
            yield proc
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(_CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


def _dead_writer(instance: str, dp_size: int, rank: int) -> None:
    """A writer that publishes and exits without closing (its segment is left behind)."""
    out = subprocess.run(
        [sys.executable, "-c", _HOLDER, instance, str(dp_size), str(rank), "die"],
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
        check=True,
    )
    assert out.stdout.startswith("ready")


def _leave_segment(instance: str, dp_size: int = 2) -> str:
    """A valid, ready segment with no live writer; returns its path."""
    writer = ShmWriter(instance, dp_size, 0)
    writer.publish(LoadSnapshot(dp_rank=0))
    writer.close(unlink_if_last=False)
    path = segment_path(instance)
    assert os.path.exists(path)
    return path


def _patch(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _reader_state(instance: str) -> tuple[SegmentState, str]:
    with ShmReader(instance) as reader:
        return reader.segment_state()


def _assert_refused(instance: str, message: str, error: type[Exception] = SegmentError) -> None:
    """Writers and readers both refuse the file, naming the segment and the mismatch."""
    path = segment_path(instance)
    with pytest.raises(error, match=message) as info:
        ShmWriter(instance, 2, 1)
    assert path in str(info.value)
    state, reason = _reader_state(instance)
    assert state is SegmentState.INCOMPATIBLE
    assert message in reason or message.replace("\\", "") in reason
    with ShmReader(instance) as reader, pytest.raises(SegmentUnavailableError, match=message):
        reader.read_all()
    assert os.path.exists(path) or os.path.islink(path)  # refused, not removed


# --- refused files ------------------------------------------------------------------------


def test_symlink_at_segment_path_refused(instance: str, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 4096)
    path = segment_path(instance)
    os.symlink(target, path)
    try:
        with pytest.raises(SegmentError) as info:
            ShmWriter(instance, 2, 0)
        assert path in str(info.value)
        state, _ = _reader_state(instance)
        assert state is SegmentState.INCOMPATIBLE
        assert os.path.islink(path)
        assert target.read_bytes() == b"\0" * 4096  # never written through the link
    finally:
        os.unlink(path)


def test_symlinked_lock_file_refused(instance: str, tmp_path: Path) -> None:
    lock = Path(segment_path(instance) + ".lock")
    os.symlink(tmp_path / "lock-target", lock)
    try:
        with pytest.raises(SegmentError, match="instance lock: it is a symlink"):
            ShmWriter(instance, 2, 0)
        assert not (tmp_path / "lock-target").exists()
    finally:
        lock.unlink()


def test_foreign_owner_refused(instance: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown to another uid")
    path = _leave_segment(instance)
    os.chown(path, 65534, -1)
    _assert_refused(instance, "owner mismatch: expected uid=0 found uid=65534")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_other_permission_bits_refused(instance: str, mode: int) -> None:
    path = _leave_segment(instance)
    os.chmod(path, mode)
    _assert_refused(instance, f"group/other permission bits set: mode={oct(mode)}")


def test_hard_link_refused(instance: str) -> None:
    path = _leave_segment(instance)
    link = path + ".hardlink"
    os.link(path, link)
    try:
        _assert_refused(instance, "unexpected hard links: nlink=2")
    finally:
        os.unlink(link)


def test_wrong_magic_refused(instance: str) -> None:
    path = _leave_segment(instance)
    _patch(path, MAGIC_OFFSET, b"NOTASNAP")
    _assert_refused(instance, "bad magic", LayoutError)


def test_other_major_layout_version_refused(instance: str) -> None:
    path = _leave_segment(instance)
    _patch(path, LAYOUT_MAJOR_OFFSET, struct.pack("<H", LAYOUT_MAJOR + 1))
    _assert_refused(
        instance, f"layout_major: expected={LAYOUT_MAJOR} found={LAYOUT_MAJOR + 1}", LayoutError
    )


def test_short_file_refused(instance: str) -> None:
    path = _leave_segment(instance)
    os.truncate(path, 200)  # a ready header, but the slots are gone
    _assert_refused(instance, "short file: size=200", LayoutError)


@pytest.mark.parametrize("size", [0, 64])
def test_file_shorter_than_a_header_is_not_ready_then_reclaimed(instance: str, size: int) -> None:
    # What a creator killed before its header was written leaves behind.
    path = _leave_segment(instance)
    os.truncate(path, size)
    assert _reader_state(instance)[0] is SegmentState.NOT_READY
    with ShmWriter(instance, 2, 1) as writer:  # under the instance lock: its creator is dead
        assert writer.created
        writer.publish(LoadSnapshot(dp_rank=1, num_running_reqs=2))
        with ShmReader(instance) as reader:
            assert reader.read(1).status is SlotStatus.FRESH


def test_header_shrunk_below_file_refused(instance: str) -> None:
    # A rewritten dp_size would otherwise hide the ranks past it.
    path = _leave_segment(instance, dp_size=4)
    _patch(path, DP_SIZE_OFFSET, struct.pack("<I", 1))
    _assert_refused(instance, "file larger than its header says", LayoutError)


def test_other_dp_size_with_live_writer_refused(instance: str) -> None:
    with _holder(instance, 2, 0):
        path = segment_path(instance)
        before = os.stat(path)
        for dp_size, capacity in ((3, 2048), (2, 1024)):
            with pytest.raises(SegmentError, match="live segment does not match") as info:
                ShmWriter(instance, dp_size, 1, payload_capacity=capacity)
            assert f"expected dp_size={dp_size}" in str(info.value)
            assert "found dp_size=2" in str(info.value) and path in str(info.value)
        after = os.stat(path)
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)  # not clobbered
        with ShmReader(instance) as reader:
            read = reader.read(0)
            assert read.status is SlotStatus.FRESH
            assert read.snapshot is not None and read.snapshot.num_running_reqs == 7


def test_second_live_writer_for_same_rank_refused(instance: str) -> None:
    with _holder(instance, 2, 0) as proc:
        with pytest.raises(
            SegmentError, match=rf"dp_rank=0 already has a live writer \(pid {proc.pid} "
        ):
            ShmWriter(instance, 2, 0)
        with ShmWriter(instance, 2, 1) as other:  # the other rank attaches fine
            assert not other.created
            other.publish(LoadSnapshot(dp_rank=1))
            with ShmReader(instance) as reader:
                read = reader.read(0)
                assert read.writer_pid == proc.pid and read.status is SlotStatus.FRESH


# --- reclaim and lifecycle ----------------------------------------------------------------


def test_not_ready_header_is_reclaimed(instance: str) -> None:
    path = _leave_segment(instance)
    _patch(path, READY_OFFSET, b"\0" * 8)  # its creator "died" before writing the ready word
    assert _reader_state(instance)[0] is SegmentState.NOT_READY
    with ShmReader(instance) as reader:
        with pytest.raises(SegmentUnavailableError) as info:
            reader.read_all()
        assert info.value.state is SegmentState.NOT_READY
    with ShmWriter(instance, 3, 0) as writer:  # a different dp_size: it is a fresh segment
        assert writer.created and writer.epoch == 1
        assert _reader_state(instance)[0] is SegmentState.OK


def test_stale_segment_with_all_writers_dead_is_reclaimed(instance: str) -> None:
    _dead_writer(instance, 2, 0)
    path = segment_path(instance)
    old_inode = os.stat(path).st_ino
    with ShmReader(instance) as reader:
        # Liveness is probed once a record is older than DEAD_PROBE_AFTER_S: wait for it.
        deadline = time.monotonic() + _CHILD_TIMEOUT_S
        while reader.read(0).status is not SlotStatus.DEAD:
            assert reader.read(0).status is SlotStatus.FRESH
            assert time.monotonic() < deadline
            time.sleep(0.01)
        old_id = reader.segment.header.segment_id
    with ShmWriter(instance, 4, 1) as writer:  # another shape is fine: nobody uses the old one
        assert writer.created
        with ShmReader(instance) as reader:
            assert reader.dp_size == 4
            assert reader.segment.header.segment_id != old_id
        assert os.stat(path).st_ino != old_inode


def test_dead_rank_reattaches_with_next_epoch(instance: str) -> None:
    with _holder(instance, 2, 1):  # keeps the segment live, so rank 0's slot is reused
        _dead_writer(instance, 2, 0)
        with ShmWriter(instance, 2, 0) as writer:
            assert not writer.created
            assert writer.epoch == 2
            writer.publish(LoadSnapshot(dp_rank=0, num_waiting_reqs=3))
            with ShmReader(instance) as reader:
                read = reader.read(0)
                assert read.epoch == 2 and read.seq == 2
                assert read.snapshot is not None and read.snapshot.num_waiting_reqs == 3


def test_last_writer_close_unlinks(instance: str) -> None:
    first = ShmWriter(instance, 2, 0)
    second = ShmWriter(instance, 2, 1)
    path = first.segment_name
    first.close()
    assert os.path.exists(path)
    with ShmReader(instance) as reader:
        assert reader.read(0).status is SlotStatus.NEVER_PUBLISHED
    second.publish(LoadSnapshot(dp_rank=1))
    second.close()
    assert not os.path.exists(path)
    assert not os.path.exists(path + ".lock")
    second.close()  # idempotent
    assert _reader_state(instance)[0] is SegmentState.MISSING


def test_close_without_unlink_keeps_segment(instance: str) -> None:
    writer = ShmWriter(instance, 1, 0)
    writer.close(unlink_if_last=False)
    assert os.path.exists(writer.segment_name)
    with ShmReader(instance) as reader:
        read = reader.read(0)
        assert read.status is SlotStatus.NEVER_PUBLISHED and read.writer_pid == 0


def test_reader_reattaches_after_recreate(instance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm_reader_module, "REATTACH_CHECK_INTERVAL_S", 0.0)
    with ShmReader(instance) as reader:
        with pytest.raises(SegmentUnavailableError) as info:
            reader.read_all()
        assert info.value.state is SegmentState.MISSING
        with ShmWriter(instance, 2, 0) as writer:
            writer.publish(LoadSnapshot(dp_rank=0, num_running_reqs=1))
            assert reader.read(0).snapshot is not None
        with pytest.raises(SegmentUnavailableError):  # the last writer unlinked it
            reader.read_all()
        with ShmWriter(instance, 3, 2) as writer:
            writer.publish(LoadSnapshot(dp_rank=2, num_running_reqs=9))
            reads = reader.read_all()
            assert len(reads) == 3
            assert reads[2].snapshot is not None and reads[2].snapshot.num_running_reqs == 9
            assert reads[0].status is SlotStatus.NEVER_PUBLISHED
        assert reader.stats.reattaches >= 1


def test_missing_segment_is_reported_not_raised_by_segment_state(instance: str) -> None:
    state, reason = _reader_state(instance)
    assert state is SegmentState.MISSING and "no writer has started" in reason
    assert not unlink_segment(instance)


# --- a full filesystem --------------------------------------------------------------------

_FULL_FS = textwrap.dedent(
    """
    import sys
    from loadsnap import LoadSnapshot, SegmentError, ShmWriter
    try:
        writer = ShmWriter("full", int(sys.argv[2]), 0, shm_dir=sys.argv[1])
    except SegmentError as exc:
        print("SegmentError", exc, flush=True)
    else:
        writer.publish(LoadSnapshot(dp_rank=0))
        print("created", flush=True)
        writer.close()
    """
)


@pytest.fixture
def small_tmpfs(tmpfs: Callable[[str, str], Path]) -> Path:
    """A 64 KiB tmpfs mounted in a private directory (skips where mounting is not allowed)."""
    return tmpfs("small-shm", "size=64k,mode=0700")


def test_full_filesystem_fails_at_creation_without_sigbus(small_tmpfs: Path) -> None:
    geometry = SegmentGeometry(64)
    assert geometry.total_size > 64 * 1024
    done = subprocess.run(
        [sys.executable, "-c", _FULL_FS, str(small_tmpfs), "64"],
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
    )
    assert done.returncode != -signal.SIGBUS
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SegmentError cannot reserve")
    assert str(small_tmpfs / "loadsnap-full") in done.stdout
    assert "docker --shm-size" in done.stdout
    assert not (small_tmpfs / "loadsnap-full").exists()  # nothing half-made is left behind
    # A segment that fits still works on the same filesystem.
    done = subprocess.run(
        [sys.executable, "-c", _FULL_FS, str(small_tmpfs), "1"],
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "created"), done.stderr
