"""Lock files that may be removed by their holder: exclusive ``flock`` with an inode check.

Transport layer. A lock file that is unlinked while others wait on it is the classic race:
a waiter that opened the old inode gets its lock after the holder removed the name, while a
newcomer creates a new file and locks that, so both believe they hold the lock. Every
acquisition here therefore checks, once it holds the ``flock``, that the path still names the
locked inode, and starts over if it does not. So the holder may remove the file while holding
it (:meth:`LockFile.release` with ``remove=True``) and nothing is left behind in ``/dev/shm``.

``flock`` locks belong to the open file description: they are visible across pid namespaces,
released by the kernel however the holder dies, and not inherited by an exec'ed child
(``O_CLOEXEC``). Opening never blocks (``O_NONBLOCK``: a FIFO planted at the path cannot hang
us) and never follows a symlink; anything but a regular file of ours is refused with a
:class:`~loadsnap.errors.SegmentError` that names the path and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from typing import Final

from loadsnap.errors import LockHeldError, SegmentError

__all__ = ["LockFile", "LockHeldError"]

_POLL_S: Final[float] = 0.01
_CONTENDED: Final[frozenset[int]] = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


class LockFile:
    """An exclusive lock on ``path``. One holder per object; not thread-safe.

    Parameters
    ----------
    path:
        The lock file; created 0600 when missing. Its directory must exist.
    what:
        What the lock protects, for error messages (e.g. ``"instance lock"``).
    """

    __slots__ = ("_fd", "path", "what")

    def __init__(self, path: str, what: str = "lock") -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def fileno(self) -> int:
        """The locked descriptor. A child that inherits it (``subprocess`` ``pass_fds``) holds
        the lock too, until both it and this object let go.

        Raises
        ------
        SegmentError
            The lock is not held by this object.
        """
        if self._fd is None:
            raise SegmentError(f"{self.what} not held by this object (lock={self.path})")
        return self._fd

    def acquire(self, timeout_s: float) -> None:
        """Take the lock, waiting at most ``timeout_s`` (0: try once). Interruptible.

        Raises
        ------
        LockHeldError
            Someone else held it for the whole wait.
        SegmentError
            The path cannot be used as a lock file (missing directory, not a regular file,
            another owner, permissions, no space or inodes); the message says which.
        """
        if self._fd is not None:
            raise SegmentError(f"{self.what} already held by this object (lock={self.path})")
        deadline = time.monotonic() + timeout_s
        while True:
            fd = self._open()
            try:
                if self._try_lock(fd) and self._still_linked(fd):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockHeldError(
                    f"{self.what} is held by another process (lock={self.path}); "
                    + ("is another copy running?" if timeout_s == 0 else f"waited {timeout_s} s")
                )
            time.sleep(_POLL_S)

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; with ``remove``, delete the file first (safe: see the module).

        Idempotent.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(fd)  # closing the last descriptor of the description drops the flock

    def __enter__(self) -> LockFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise SegmentError(_open_failure(exc, self.path, self.what)) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SegmentError(
                    f"{self.what} path is not a regular file (lock={self.path}); "
                    "remove it or use another instance name"
                )
            if st.st_uid != os.geteuid():
                raise SegmentError(
                    f"{self.what} file belongs to uid={st.st_uid}, not uid={os.geteuid()} "
                    f"(lock={self.path}); remove it or use another instance name"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _CONTENDED:
                return False
            raise SegmentError(f"cannot lock: {exc.strerror} (lock={self.path})") from exc
        return True

    def _still_linked(self, fd: int) -> bool:
        """Whether ``path`` still names the inode we locked (its holder may have removed it)."""
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        locked = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (locked.st_dev, locked.st_ino)

    def __repr__(self) -> str:
        return f"LockFile(path={self.path!r}, held={self.held})"


def _open_failure(exc: OSError, path: str, what: str) -> str:
    directory = os.path.dirname(path) or "."
    reasons = {
        errno.ENOENT: (
            f"cannot create files in {directory}"
            if os.path.isdir(directory)
            else f"directory {directory} does not exist"
        ),
        errno.ENOTDIR: f"{directory} is not a directory",
        errno.EACCES: f"no permission to create or open it in {directory}",
        errno.EPERM: f"no permission to create or open it in {directory}",
        errno.EROFS: f"{directory} is read-only",
        errno.ENOSPC: f"no space or inodes left in {directory}",
        errno.EDQUOT: f"disk quota exceeded in {directory}",
        errno.ELOOP: "it is a symlink; remove it",
        errno.EISDIR: "it is a directory; remove it or use another instance name",
        errno.ENXIO: "it is a FIFO or device; remove it or use another instance name",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot open {what}: {reason} (lock={path})"
