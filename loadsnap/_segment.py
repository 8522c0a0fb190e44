"""The segment file: race-free creation, safe attach, validation, reclaim, unlink.

Transport layer: owns file descriptors and mappings; knows nothing of snapshots.

Creation, attaching and unlinking happen under the instance lock (``loadsnap._lockfile``, a
lock file beside the segment), so when several schedulers start at once the first creates and
initialises and the rest attach, and a file found unfinished under the lock is known to be the
leftover of a creator that died. Publishing and reading never take that lock.

Every open is non-blocking and refuses symlinks, so a FIFO, device or directory planted at the
segment's path (``/dev/shm`` is world-writable) is refused with a :class:`SegmentError`
instead of hanging a reader. A ``MappedSegment`` keeps its descriptor: writers hold their
liveness locks through it and readers probe them through it (``loadsnap._liveness``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Final

from loadsnap import _liveness
from loadsnap._location import SEGMENT_PREFIX, SegmentLocation, instance_lock
from loadsnap.errors import (
    LayoutError,
    SegmentError,
    SegmentInUseError,
    SegmentNotReadyError,
    UsageError,
)
from loadsnap.layout import (
    CTRL_WRITER_PID_OFFSET,
    HEADER_SIZE,
    HEADER_STRUCT,
    LAYOUT_MAJOR,
    LAYOUT_MINOR,
    MAGIC,
    READY_OFFSET,
    READY_VALUE,
    SLOT_CONTROL_SIZE,
    WRITERS_LOCK_OFFSET,
    SegmentGeometry,
    round_up,
)

__all__ = [
    "MappedSegment",
    "SegmentHeader",
    "any_writer_attached",
    "create_or_attach",
    "open_readonly",
    "read_header",
    "remove_segment_file",
    "unlink_segment",
]

_OPEN_FLAGS: Final[int] = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


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
    """An open, validated mapping of a segment with its descriptor. Not thread-safe to close."""

    __slots__ = ("buf", "fd", "header", "identity", "mm", "name", "writable")

    def __init__(self, name: str, fd: int, mm: mmap.mmap, writable: bool) -> None:
        st = os.fstat(fd)
        self.name = name
        self.fd = fd  # kept open: liveness locks are held and probed through it
        self.mm = mm
        self.buf = memoryview(mm)
        self.writable = writable
        self.identity = (st.st_dev, st.st_ino)  # tells a recreated segment from this one
        self.header = read_header(self.buf)

    def writer_alive(self, lock_offset: int, pid: int) -> bool:
        """Whether the writer that holds (or held) the lock byte at ``lock_offset`` lives."""
        if _liveness.OFD_LOCKS:
            return _liveness.locked(self.fd, lock_offset)
        return _liveness.pid_alive(pid)

    def close(self) -> None:
        """Release the mapping and the descriptor (and with it every lock held through it).

        Views derived from ``buf`` must be released first. Idempotent.
        """
        self.buf.release()
        with contextlib.suppress(BufferError):
            self.mm.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _open_failure(exc: OSError, location: SegmentLocation) -> SegmentError:
    name = location.path
    reasons = {
        errno.ELOOP: "a symlink is at the segment path; remove it",
        errno.EISDIR: "a directory is at the segment path; remove it or use another instance",
        errno.ENXIO: "a FIFO or device is at the segment path; remove it",
        errno.EACCES: "permission denied; segments belong to the uid of their writers",
        errno.EPERM: "permission denied; segments belong to the uid of their writers",
        errno.EROFS: f"{location.directory} is read-only",
        errno.ENOSPC: f"no space or inodes left in {location.directory}",
        errno.EDQUOT: f"disk quota exceeded in {location.directory}",
        errno.ENOTDIR: f"{location.directory} is not a directory",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return SegmentError(f"cannot open: {reason} (segment={name})")


def _open_fd(location: SegmentLocation, *, create: bool, writable: bool) -> int:
    """Open the segment file without blocking or following links.

    Raises FileNotFoundError (missing), FileExistsError (``create`` and it exists) or
    SegmentError (anything else, explained).
    """
    if location.via_shm_open:
        return _open_posix_ipc(location, create=create, writable=writable)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        return os.open(location.path, flags, 0o600)
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as exc:
        raise _open_failure(exc, location) from exc


def _open_posix_ipc(location: SegmentLocation, *, create: bool, writable: bool) -> int:
    import posix_ipc

    flags = posix_ipc.O_CREX if create else 0
    try:
        # size=0: posix_ipc truncates to `size` even when attaching.
        memory = posix_ipc.SharedMemory(
            f"/{SEGMENT_PREFIX}{location.instance}",
            flags=flags,
            mode=0o600,
            size=0,
            read_only=not writable,
        )
    except posix_ipc.ExistentialError as exc:
        raise (FileExistsError if create else FileNotFoundError)(str(exc)) from None
    except (posix_ipc.PermissionsError, OSError) as exc:
        raise SegmentError(f"cannot open: {exc} (segment={location.path})") from None
    return int(memory.fd)  # the SharedMemory object only wraps this descriptor


def _check_file(fd: int, name: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(
            f"not a segment: {_kind(st.st_mode)} is at the segment path; remove it or use "
            f"another instance name (segment={name})"
        )
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


def _header_ready(header: SegmentHeader, size: int, name: str) -> bool:
    """Whether the creator finished: the header's ready word is stored last.

    A creator writes our magic (or nothing yet) before the ready word, so an unfinished file
    with other bytes there is not one of ours: LayoutError.
    """
    if size >= HEADER_SIZE and header.ready == READY_VALUE:
        return True
    if header.magic not in (0, MAGIC):
        raise LayoutError(
            f"bad magic: expected={MAGIC:#x} found={header.magic:#x} (segment={name})"
        )
    return False


def _validate_header(header: SegmentHeader, size: int, name: str) -> None:
    """Check a ready header against the file. Raises LayoutError."""
    if header.magic != MAGIC:
        raise LayoutError(
            f"bad magic: expected={MAGIC:#x} found={header.magic:#x} (segment={name})"
        )
    if header.layout_major != LAYOUT_MAJOR:
        raise LayoutError(
            f"layout_major: expected={LAYOUT_MAJOR} found={header.layout_major} (segment={name})"
        )
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


def _read_header_fd(fd: int, size: int) -> SegmentHeader:
    raw = os.pread(fd, HEADER_SIZE, 0) if size >= HEADER_SIZE else b""
    return read_header(raw.ljust(HEADER_SIZE, b"\0"))


def open_readonly(location: SegmentLocation) -> MappedSegment:
    """Attach read-only; never creates, truncates, resizes or blocks.

    Raises
    ------
    FileNotFoundError
        No segment yet.
    SegmentNotReadyError
        Its creator has not finished (or died before finishing; the next writer reclaims it).
    SegmentError, LayoutError
        A file that is not ours or not a valid segment.
    """
    name = location.path
    fd = _open_fd(location, create=False, writable=False)
    try:
        st = _check_file(fd, name)
        header = _read_header_fd(fd, st.st_size)
        if not _header_ready(header, st.st_size, name):
            raise SegmentNotReadyError(f"segment not initialised yet (segment={name})")
        _validate_header(header, st.st_size, name)
        mm = (
            mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
            if hasattr(mmap, "PROT_READ")
            else mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        )
        return MappedSegment(name, fd, mm, writable=False)
    except BaseException:
        os.close(fd)
        raise


def _create(location: SegmentLocation, geometry: SegmentGeometry) -> MappedSegment:
    name = location.path
    fd = _open_fd(location, create=True, writable=True)
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
        segment = MappedSegment(name, fd, mmap.mmap(fd, geometry.total_size), writable=True)
    except BaseException:
        os.close(fd)
        remove_segment_file(location)
        raise
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


def any_writer_attached(segment: MappedSegment) -> bool:
    """Whether a writer other than ``segment``'s own description is attached (one probe)."""
    if _liveness.OFD_LOCKS:
        return _liveness.locked(segment.fd, WRITERS_LOCK_OFFSET)
    return _any_pid_alive(segment)


def _any_pid_alive(segment: MappedSegment) -> bool:
    # Fallback without OFD locks: scan every slot's pid (same pid namespace only).
    header = segment.header
    with segment.buf.cast("Q") as words:
        for rank in range(header.dp_size):
            pid = int(words[(HEADER_SIZE + rank * SLOT_CONTROL_SIZE + CTRL_WRITER_PID_OFFSET) // 8])
            if pid and pid != os.getpid() and _liveness.pid_alive(pid):
                return True
    return False


def create_or_attach(
    location: SegmentLocation, geometry: SegmentGeometry
) -> tuple[MappedSegment, bool]:
    """Create the segment or attach to a matching one. Call with the instance lock held.

    A file whose creator never finished initialising it (we hold the lock, so that creator is
    dead) is reclaimed. A ready segment with no attached writer is stale (its deployment
    died): reused in place when its geometry matches (slots keep their epochs, so restarted
    ranks bump theirs), else unlinked and created anew. A segment with an attached writer is
    never touched if it does not match. Returns ``(segment, created)``.

    Raises
    ------
    SegmentError, LayoutError
        Not ours, not a segment, or another geometry with live writers; the message says
        which and what to do.
    """
    name = location.path
    for _ in range(3):
        try:
            return _create(location, geometry), True
        except FileExistsError:
            pass
        try:
            fd = _open_fd(location, create=False, writable=True)
        except FileNotFoundError:
            continue  # unlinked between our two opens: try creating again
        try:
            st = _check_file(fd, name)
            header = _read_header_fd(fd, st.st_size)
            if not _header_ready(header, st.st_size, name):
                # Creators hold the instance lock, as we do now: this one died mid-way.
                os.close(fd)
                remove_segment_file(location)
                continue
            _validate_header(header, st.st_size, name)
            segment = MappedSegment(name, fd, mmap.mmap(fd, st.st_size), writable=True)
        except BaseException:
            os.close(fd)
            raise
        matches = (header.dp_size, header.payload_capacity) == (
            geometry.dp_size,
            geometry.payload_capacity,
        )
        if matches:
            # Live, or stale with the same geometry: reuse it in place, so a restarted rank
            # keeps its slot and bumps its epoch, and attached readers need not re-attach.
            return segment, False
        live = any_writer_attached(segment)
        segment.close()
        if live:
            raise SegmentInUseError(
                f"live segment does not match: expected dp_size={geometry.dp_size} "
                f"payload_capacity={geometry.payload_capacity} found dp_size={header.dp_size} "
                f"payload_capacity={header.payload_capacity}, with writers attached "
                f"(segment={name}); use another instance name or stop that deployment"
            )
        remove_segment_file(location)  # stale and of another geometry: every writer is gone
    raise SegmentError(f"could not create or attach after 3 attempts (segment={name})")


def remove_segment_file(location: SegmentLocation) -> None:
    """Unlink the segment file (callers hold the instance lock and know it is dead or ours)."""
    with contextlib.suppress(FileNotFoundError):
        if location.via_shm_open:
            import posix_ipc

            try:
                posix_ipc.unlink_shared_memory(f"/{SEGMENT_PREFIX}{location.instance}")
            except posix_ipc.ExistentialError:
                raise FileNotFoundError(location.path) from None
        else:
            os.unlink(location.path)


def unlink_segment(instance: str, shm_dir: str | None = None) -> bool:
    """Remove a dead instance's segment and lock file. Returns whether a segment existed.

    For cleanup of tests and of dead deployments: never removes a segment that a writer is
    still attached to (in any process, any pid namespace).

    Raises
    ------
    SegmentInUseError
        A writer is attached (stop it first: its last writer unlinks the segment on close).
    SegmentError
        The path holds something that is not one of our segments (the message says what).
    """
    location = SegmentLocation(instance, shm_dir)
    with instance_lock(location):
        try:
            fd = _open_fd(location, create=False, writable=False)
        except FileNotFoundError:
            return False
        try:
            _check_file(fd, location.path)
            if _liveness.OFD_LOCKS and _liveness.locked(fd, WRITERS_LOCK_OFFSET):
                raise SegmentInUseError(
                    f"segment has live writers; stop them first (segment={location.path})"
                )
        finally:
            os.close(fd)
        remove_segment_file(location)
        return True
