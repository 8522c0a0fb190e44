"""Writer liveness from kernel locks: visible across pid namespaces, released on any death.

Transport layer. Every attached writer holds two open-file-description (OFD) byte-range locks
on the segment file for as long as it is attached (offsets in ``loadsnap.layout``):

- an exclusive lock on its slot's lock byte: a second writer for the rank cannot take it, and
  a reader asks the kernel (``F_OFD_GETLK``) whether anyone holds it;
- a shared lock on the header's writers byte: "is any writer attached?" is one probe, so
  attaching and the last writer's unlink cost O(1) whatever ``dp_size`` is.

The kernel drops both when the writer's last descriptor of the file closes, which includes
every kind of death (SIGKILL, OOM), and they name no pid, so a reader in another pid namespace
(a container without a shared pid namespace) judges them correctly and pid reuse cannot fool
it. OFD locks belong to the open file description: two writers in one process conflict as two
processes do, and a child forked by a writer shares its locks until it closes the descriptor
(``ShmWriter`` does that in the child at fork).

Where ``F_OFD_*`` is missing (macOS), liveness falls back to probing the writer's pid with
signal 0, which is right only within one pid namespace.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

__all__ = [
    "OFD_LOCKS",
    "lock_exclusive",
    "lock_shared",
    "locked",
    "pid_alive",
    "unlock",
]

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# with 64-bit off_t: 32 bytes with padding on every 64-bit Linux.
_FLOCK: Final = struct.Struct("hh4xqqi4x")
OFD_LOCKS: Final[bool] = hasattr(fcntl, "F_OFD_SETLK")
_SETLK: Final[int] = getattr(fcntl, "F_OFD_SETLK", 0)
_GETLK: Final[int] = getattr(fcntl, "F_OFD_GETLK", 0)
_CONTENDED: Final[frozenset[int]] = frozenset({errno.EAGAIN, errno.EACCES})
# pid_t is a signed 32-bit int: a larger value (from a corrupt slot) names no process.
_PID_MAX: Final[int] = 2**31 - 1


def _set(fd: int, kind: int, offset: int) -> bool:
    try:
        fcntl.fcntl(fd, _SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in _CONTENDED:
            return False
        raise
    return True


def lock_exclusive(fd: int, offset: int) -> bool:
    """Take an exclusive lock on byte ``offset``; False when someone else holds a lock there.

    ``fd`` must be open for writing. Never blocks.
    """
    return _set(fd, fcntl.F_WRLCK, offset)


def lock_shared(fd: int, offset: int) -> bool:
    """Take a shared lock on byte ``offset``; False when someone holds it exclusively."""
    return _set(fd, fcntl.F_RDLCK, offset)


def unlock(fd: int, offset: int) -> None:
    """Release this description's lock on byte ``offset`` (a no-op if it holds none)."""
    _set(fd, fcntl.F_UNLCK, offset)


def locked(fd: int, offset: int) -> bool:
    """Whether another open file description holds any lock on byte ``offset``.

    One ``fcntl`` call (about 1 µs); ``fd`` may be read-only. Locks held through ``fd``'s own
    description do not count.
    """
    result = fcntl.fcntl(fd, _GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a process in this pid namespace (the fallback without OFD locks)."""
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True
