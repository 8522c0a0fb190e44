"""The segment file: naming, race-free creation, safe attach, validation, reclaim, unlink.

Transport layer: owns file descriptors and mappings; knows nothing of snapshots. Creation and
slot claiming happen under a per-instance file lock (filelock), so when several schedulers
start at once the first creates and initialises and the rest attach. Publishing never takes
that lock.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import filelock

from loadsnap._liveness import process_alive
from loadsnap.errors import LayoutError, SegmentError, UsageError
from loadsnap.layout import (
    CTRL_WRITER_PID_OFFSET,
    CTRL_WRITER_START_OFFSET,
    HEADER_SIZE,
    HEADER_STRUCT,
    LAYOUT_MAJOR,
    LAYOUT_MINOR,
    MAGIC,
    READY_OFFSET,
    READY_VALUE,
    SegmentGeometry,
    round_up,
)

__all__ = [
    "LOCK_TIMEOUT_S",
    "MappedSegment",
    "SegmentHeader",
    "create_or_attach",
    "instance_lock",
    "open_readonly",
    "read_header",
    "segment_path",
    "unlink_segment",
    "validate_instance",
]

LOCK_TIMEOUT_S: Final[float] = 10.0
_INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX: Final[str] = "loadsnap-"
_MACOS_NAME_MAX: Final[int] = 30
_DEFAULT_SHM_DIR: Final[str] = "/dev/shm"


def validate_instance(instance: str) -> str:
    """Return ``instance`` if it is a valid instance name, else raise UsageError."""
    if not _INSTANCE_RE.match(instance):
        raise UsageError(
            f"invalid instance name: instance={instance!r}; use 1-64 characters of "
            "A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    if sys.platform == "darwin" and len(_PREFIX) + 1 + len(instance) > _MACOS_NAME_MAX:
        raise UsageError(f"instance name too long for macOS shm: instance={instance!r}")
    return instance


def _shm_dir(shm_dir: str | None) -> str | None:
    """The directory holding segments, or None to go through posix_ipc (shm_open)."""
    if shm_dir is not None:
        return shm_dir
    return os.environ.get("LOADSNAP_SHM_DIR") or None


def segment_path(instance: str, shm_dir: str | None = None) -> str:
    """Where the segment of ``instance`` lives (for diagnostics and cleanup)."""
    directory = _shm_dir(shm_dir) or _DEFAULT_SHM_DIR
    return str(Path(directory) / f"{_PREFIX}{validate_instance(instance)}")


def _lock_path(instance: str, shm_dir: str | None) -> str:
    directory = _shm_dir(shm_dir)
    if directory is None:
        directory = _DEFAULT_SHM_DIR if os.path.isdir(_DEFAULT_SHM_DIR) else "/tmp"
    return str(Path(directory) / f"{_PREFIX}{validate_instance(instance)}.lock")


def instance_lock(instance: str, shm_dir: str | None = None) -> filelock.FileLock:
    """The per-instance creation lock. Refuses a symlink planted at its path."""
    path = _lock_path(instance, shm_dir)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise SegmentError(f"refusing symlinked lock file (lock={path})")
    return filelock.FileLock(path, timeout=LOCK_TIMEOUT_S, mode=0o600)


@dataclass(frozen=True)
class SegmentHeader:
    """The decoded segment header."""

    magic: int
    layout_major: int
    layout_minor: int
    header_size: int
    dp_size: int
    slot_size: int
    payload_capacity: int
    creator_pid: int
    creator_uid: int
    created_wall_ns: int
    segment_id: int
    ready: int


def read_header(buf: memoryview | bytes) -> SegmentHeader:
    """Decode the header fields (no validation)."""
    values = HEADER_STRUCT.unpack_from(buf, 0)
    (
        magic,
        major,
        minor,
        header_size,
        dp_size,
        slot_size,
        capacity,
        pid,
        uid,
        _r,
        wall,
        sid,
        ready,
    ) = values
    return SegmentHeader(
        magic, major, minor, header_size, dp_size, slot_size, capacity, pid, uid, wall, sid, ready
    )


class MappedSegment:
    """An open, validated mapping of a segment. Not thread-safe to close while in use."""

    __slots__ = ("buf", "header", "identity", "mm", "name", "writable")

    def __init__(self, name: str, mm: mmap.mmap, writable: bool, identity: tuple[int, int]) -> None:
        self.name = name
        self.mm = mm
        self.buf = memoryview(mm)
        self.writable = writable
        self.identity = identity  # (st_dev, st_ino): tells a recreated segment from this one
        self.header = read_header(self.buf)

    def close(self) -> None:
        """Release the mapping; views derived from ``buf`` must be released first."""
        self.buf.release()
        with contextlib.suppress(BufferError):
            self.mm.close()


def _open_fd(instance: str, shm_dir: str | None, create: bool, writable: bool) -> int:
    """Open the segment file. Raises FileNotFoundError/FileExistsError as os.open does."""
    directory = _shm_dir(shm_dir)
    if directory is None and _has_posix_ipc():
        import posix_ipc

        flags = posix_ipc.O_CREX if create else 0
        try:
            # size=0: posix_ipc truncates to `size` even when attaching.
            memory = posix_ipc.SharedMemory(
                f"/{_PREFIX}{instance}", flags=flags, mode=0o600, size=0, read_only=not writable
            )
        except posix_ipc.ExistentialError as exc:
            raise (FileExistsError if create else FileNotFoundError)(str(exc)) from None
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(str(exc)) from None
        return int(memory.fd)  # the SharedMemory object only wraps this descriptor
    path = segment_path(instance, shm_dir)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    return os.open(path, flags, 0o600)


def _has_posix_ipc() -> bool:
    try:
        import posix_ipc  # noqa: F401
    except ImportError:
        return False
    return True


def _check_file(fd: int, name: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"not a regular file (segment={name})")
    if st.st_uid != os.geteuid():
        raise SegmentError(
            f"owner mismatch: expected uid={os.geteuid()} found uid={st.st_uid} (segment={name})"
        )
    if st.st_mode & 0o077:
        raise SegmentError(
            f"group/other permission bits set: mode={oct(st.st_mode & 0o777)} (segment={name})"
        )
    if st.st_nlink != 1:
        raise SegmentError(f"unexpected hard links: nlink={st.st_nlink} (segment={name})")
    return st


def _validate_header(header: SegmentHeader, size: int, name: str) -> None:
    if size < HEADER_SIZE:
        raise LayoutError(f"short file: size={size} expected>={HEADER_SIZE} (segment={name})")
    if header.magic == 0 and header.ready == 0:
        return  # created but the header not yet written: not ready, callers decide
    if header.magic != MAGIC:
        raise LayoutError(
            f"bad magic: expected={MAGIC:#x} found={header.magic:#x} (segment={name})"
        )
    if header.layout_major != LAYOUT_MAJOR:
        raise LayoutError(
            f"layout_major: expected={LAYOUT_MAJOR} found={header.layout_major} (segment={name})"
        )
    if header.ready != READY_VALUE:
        return  # not initialised yet; callers decide what that means
    try:
        geometry = SegmentGeometry(header.dp_size, header.payload_capacity)
    except UsageError as exc:
        raise LayoutError(f"bad geometry in header: {exc} (segment={name})") from None
    if header.header_size != HEADER_SIZE or header.slot_size != geometry.slot_size:
        raise LayoutError(
            f"slot geometry: expected slot_size={geometry.slot_size} header_size={HEADER_SIZE} "
            f"found slot_size={header.slot_size} header_size={header.header_size} (segment={name})"
        )
    if size < geometry.total_size:
        raise LayoutError(
            f"short file: size={size} expected>={geometry.total_size} (segment={name})"
        )
    # Larger than the header's geometry (beyond page rounding): the header was rewritten, and
    # trusting it would silently hide the ranks past its dp_size.
    if size > round_up(geometry.total_size, mmap.PAGESIZE):
        raise LayoutError(
            f"file larger than its header says: size={size} expected={geometry.total_size} "
            f"dp_size={header.dp_size} (segment={name})"
        )


def open_readonly(instance: str, shm_dir: str | None = None) -> MappedSegment:
    """Attach read-only; never creates, truncates or resizes.

    Raises
    ------
    FileNotFoundError
        No segment yet.
    SegmentError, LayoutError
        A file that is not ours or not a valid segment.
    """
    name = segment_path(instance, shm_dir)
    try:
        fd = _open_fd(validate_instance(instance), shm_dir, create=False, writable=False)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink (ELOOP), no permission...: not a segment we may read
        raise SegmentError(f"cannot open: {exc} (segment={name})") from exc
    try:
        st = _check_file(fd, name)
        if st.st_size < HEADER_SIZE:
            raise LayoutError(
                f"short file: size={st.st_size} expected>={HEADER_SIZE} (segment={name})"
            )
        mm = (
            mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
            if hasattr(mmap, "PROT_READ")
            else mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        )
    finally:
        os.close(fd)
    segment = MappedSegment(name, mm, writable=False, identity=(st.st_dev, st.st_ino))
    try:
        _validate_header(segment.header, st.st_size, name)
    except Exception:
        segment.close()
        raise
    return segment


def _map_writable(instance: str, shm_dir: str | None, fd: int, size: int) -> MappedSegment:
    st = os.fstat(fd)
    mm = mmap.mmap(fd, size)
    return MappedSegment(
        segment_path(instance, shm_dir), mm, writable=True, identity=(st.st_dev, st.st_ino)
    )


def _create(instance: str, geometry: SegmentGeometry, shm_dir: str | None) -> MappedSegment:
    name = segment_path(instance, shm_dir)
    fd = _open_fd(instance, shm_dir, create=True, writable=True)
    try:
        try:
            # Reserve every page now: a full tmpfs fails here, never as SIGBUS on a later store.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, geometry.total_size)
            else:  # macOS
                os.ftruncate(fd, geometry.total_size)
        except OSError as exc:
            raise SegmentError(
                f"cannot reserve {geometry.total_size} bytes: {exc.strerror} (segment={name}); "
                "is /dev/shm full or too small (docker --shm-size)?"
            ) from exc
        segment = _map_writable(instance, shm_dir, fd, geometry.total_size)
    except BaseException:
        os.close(fd)
        _unlink_quietly(instance, shm_dir)
        raise
    os.close(fd)
    HEADER_STRUCT.pack_into(
        segment.buf,
        0,
        MAGIC,
        LAYOUT_MAJOR,
        LAYOUT_MINOR,
        HEADER_SIZE,
        geometry.dp_size,
        geometry.slot_size,
        geometry.payload_capacity,
        os.getpid(),
        os.geteuid(),
        0,
        time.time_ns(),
        secrets.randbits(63) | 1,
        0,  # ready stays 0 until everything above is in place
    )
    with segment.buf.cast("Q") as words:
        words[READY_OFFSET // 8] = READY_VALUE  # one 8-byte store, written last
    segment.header = read_header(segment.buf)
    return segment


def _live_writers(buf: memoryview, header: SegmentHeader) -> list[tuple[int, int]]:
    """(rank, pid) of every slot whose writer process is still alive."""
    words = buf.cast("Q")
    live = []
    for rank in range(header.dp_size):
        base = (HEADER_SIZE + rank * header.slot_size) // 8
        pid = int(words[base + CTRL_WRITER_PID_OFFSET // 8])
        start = int(words[base + CTRL_WRITER_START_OFFSET // 8])
        if pid and process_alive(pid, start):
            live.append((rank, pid))
    words.release()
    return live


def live_writers(segment: MappedSegment) -> list[tuple[int, int]]:
    """(rank, pid) of every slot of ``segment`` whose writer is alive."""
    return _live_writers(segment.buf, segment.header)


def create_or_attach(
    instance: str, geometry: SegmentGeometry, shm_dir: str | None = None
) -> tuple[MappedSegment, bool]:
    """Create the segment or attach to a live, matching one. Call with the instance lock held.

    A ready segment with no live writer is stale (its deployment died) and is reclaimed: reused
    in place when its geometry matches (slots keep their epochs, so restarted ranks bump
    theirs), else unlinked and created anew. A segment with a live writer is never touched if
    it does not match. Returns ``(segment, created)``.
    """
    name = segment_path(instance, shm_dir)
    for _ in range(3):
        try:
            return _create(instance, geometry, shm_dir), True
        except FileExistsError:
            pass
        try:
            fd = _open_fd(instance, shm_dir, create=False, writable=True)
        except FileNotFoundError:
            continue  # unlinked between our two opens: try creating again
        except OSError as exc:
            raise SegmentError(f"cannot open: {exc} (segment={name})") from exc
        try:
            st = _check_file(fd, name)
            if st.st_size < HEADER_SIZE:
                raise LayoutError(
                    f"short file: size={st.st_size} expected>={HEADER_SIZE} (segment={name})"
                )
            header = read_header(os.pread(fd, HEADER_SIZE, 0))
            _validate_header(header, st.st_size, name)
            if header.ready != READY_VALUE:
                # We hold the lock, so nobody is initialising it: its creator died mid-way.
                _unlink_quietly(instance, shm_dir)
                continue
            segment = _map_writable(instance, shm_dir, fd, st.st_size)
        finally:
            os.close(fd)
        live = _live_writers(segment.buf, segment.header)
        matches = (header.dp_size, header.payload_capacity) == (
            geometry.dp_size,
            geometry.payload_capacity,
        )
        if matches:
            # Live, or stale with the same geometry: reuse it in place, so a restarted rank
            # keeps its slot and bumps its epoch, and attached readers need not re-attach.
            return segment, False
        segment.close()
        if live:
            raise SegmentError(
                f"live segment does not match: expected dp_size={geometry.dp_size} "
                f"payload_capacity={geometry.payload_capacity} found dp_size={header.dp_size} "
                f"payload_capacity={header.payload_capacity} live writers={live} (segment={name})"
            )
        _unlink_quietly(instance, shm_dir)  # stale and of another geometry: every writer is gone
    raise SegmentError(f"could not create or attach after 3 attempts (segment={name})")


def _unlink_quietly(instance: str, shm_dir: str | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        if _shm_dir(shm_dir) or not _has_posix_ipc():
            os.unlink(segment_path(instance, shm_dir))
        else:
            _unlink_posix(instance)


def _unlink_posix(instance: str) -> None:
    import posix_ipc

    try:
        posix_ipc.unlink_shared_memory(f"/{_PREFIX}{instance}")
    except posix_ipc.ExistentialError:
        raise FileNotFoundError(instance) from None


def unlink_segment(instance: str, shm_dir: str | None = None, *, remove_lock: bool = True) -> bool:
    """Remove the segment (and its lock file) of ``instance``. Returns whether a segment existed.

    For cleanup of tests and dead deployments; live readers keep their mapping until they
    notice the segment is gone.
    """
    existed = (
        os.path.exists(segment_path(instance, shm_dir))
        if sys.platform.startswith("linux")
        else True
    )
    _unlink_quietly(validate_instance(instance), shm_dir)
    if remove_lock:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_lock_path(instance, shm_dir))
    return existed
