"""Where an instance lives: its segment's path, its shm directory and its instance lock.

Transport layer, no mapping. :class:`SegmentLocation` is the one validated value that names
a segment (instance name plus directory); every function of ``loadsnap._segment`` takes one.
The instance lock (a lock file beside the segment) serialises creating, attaching and
unlinking; publishing and reading never take it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from loadsnap import settings
from loadsnap._lockfile import LockFile
from loadsnap.errors import UsageError
from loadsnap.settings import validate_instance

__all__ = [
    "LOCK_TIMEOUT_S",
    "SEGMENT_PREFIX",
    "SegmentLocation",
    "check_shm_dir",
    "instance_lock",
    "segment_path",
]

LOCK_TIMEOUT_S: Final[float] = 10.0
SEGMENT_PREFIX: Final[str] = "loadsnap-"
_DEFAULT_SHM_DIR: Final[str] = "/dev/shm"
# Linux's shm_open is open() under /dev/shm, which we do ourselves to add O_NONBLOCK; elsewhere
# (macOS) shm objects live outside the file system and go through posix_ipc.
SHM_IS_FILES: Final[bool] = sys.platform.startswith("linux")


@dataclass(frozen=True)
class SegmentLocation:
    """Where one instance's segment and lock file live. Immutable; validated on creation.

    ``shm_dir`` None means ``$LOADSNAP_SHM_DIR`` or, without it, ``/dev/shm`` (``shm_open``).
    A given directory must exist: it is never created, so a misspelled one fails here instead
    of splitting writers and readers between two places.
    """

    instance: str
    shm_dir: str | None = None

    def __post_init__(self) -> None:
        validate_instance(self.instance)
        directory = self.shm_dir
        if directory is None:
            directory = settings.current().shm_dir
            object.__setattr__(self, "shm_dir", directory)
        if directory is not None:
            check_shm_dir(directory)

    @property
    def directory(self) -> str:
        """The directory holding the segment file (``/dev/shm`` by default)."""
        return self.shm_dir or _DEFAULT_SHM_DIR

    @property
    def path(self) -> str:
        """The segment file's path (for diagnostics and cleanup)."""
        return str(Path(self.directory) / f"{SEGMENT_PREFIX}{self.instance}")

    @property
    def lock_path(self) -> str:
        """The instance lock file's path (beside the segment; /tmp where shm is not files)."""
        directory = self.shm_dir
        if directory is None:
            directory = _DEFAULT_SHM_DIR if os.path.isdir(_DEFAULT_SHM_DIR) else "/tmp"
        return str(Path(directory) / f"{SEGMENT_PREFIX}{self.instance}.lock")

    @property
    def via_shm_open(self) -> bool:
        """Whether the segment is a POSIX shm object outside the file system (macOS)."""
        return self.shm_dir is None and not SHM_IS_FILES


def check_shm_dir(directory: str) -> None:
    """Refuse a segment directory that does not exist or is not a directory (UsageError)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise UsageError(
            f"shm directory does not exist: shm_dir={directory}; create a memory-backed "
            "directory or fix --shm-dir / LOADSNAP_SHM_DIR"
        ) from None
    except OSError as exc:
        raise UsageError(f"shm directory unusable: {exc.strerror} (shm_dir={directory})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"shm directory is not a directory: shm_dir={directory}; fix --shm-dir / "
            "LOADSNAP_SHM_DIR"
        )


def segment_path(instance: str, shm_dir: str | None = None) -> str:
    """Where the segment of ``instance`` lives (for diagnostics and cleanup)."""
    return SegmentLocation(instance, shm_dir).path


@contextlib.contextmanager
def instance_lock(location: SegmentLocation) -> Iterator[None]:
    """Hold the instance lock; on release, remove its file when no segment remains.

    Raises
    ------
    SegmentError
        The lock file cannot be used (the message says why) or another process held the
        lock for ``LOCK_TIMEOUT_S``.
    """
    lock = LockFile(location.lock_path, "instance lock")
    lock.acquire(LOCK_TIMEOUT_S)
    try:
        yield
    finally:
        # Removing it while held is safe (LockFile re-checks the inode), so an instance that
        # ends, or whose creation was refused, leaves nothing behind.
        lock.release(remove=SHM_IS_FILES and not os.path.lexists(location.path))
