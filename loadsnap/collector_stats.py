"""The ZMQ collector's counters, and the small file that lets other processes read them.

The collector runs in its own process (``loadsnap collector``), ``loadsnap serve`` in another;
``/metrics`` of the latter must still show what the collector dropped. So the collector's thread
copies its counters into ``<dir>/loadsnap-<instance>.collector.stats`` (next to its lock file;
``<dir>`` is the segment's directory, ``/dev/shm`` by default) and removes the file on close;
readers open it read-only at each scrape. Counters are independent monotonic u64 words, each
stored with one aligned 8-byte store and read with one 8-byte load, so a reader never sees a
torn counter (it may see one counter from a newer copy than another; nothing relates them).

All integers are little-endian. Every ``*_OFFSET`` is derived from the previous offset plus the
previous size; ``tests/process/test_collector_stats.py`` checks this diagram against the constants::

     0 +-----------------------------------------------------------------------+
       | magic "LSCSTATS" u64 (written last: the file is ready once it is set) |
     8 +-----------------------------------+-----------------------------------+
       | layout_version u32                | counter_count u32                 |
    16 +-----------------------------------------------------------------------+
       | collector_pid u64                                                     |
    24 +-----------------------------------------------------------------------+
       | started_wall_ns u64                                                   |
    32 +-----------------------------------------------------------------------+
       | reserved to 64                                                        |
    64 +-----------------------------------------------------------------------+
       | counters: counter_count x u64, in CollectorStats field order          |
       +-----------------------------------------------------------------------+

Evolution: counters are append-only (new :class:`CollectorStats` fields go last, none is ever
removed or reordered; ``tests/process/test_collector_stats.py`` pins the order). A reader takes the
first ``min(counter_count, known)`` counters; a counter the file lacks reads as 0.
``layout_version`` changes only for an incompatible layout, which readers refuse.

A collector that was SIGKILLed leaves its file behind with frozen counters; the next collector
of the instance (which holds the instance's collector lock) replaces it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from loadsnap._location import segment_path
from loadsnap.errors import LayoutError, TransportError

__all__ = [
    "COUNTERS_OFFSET",
    "DROP_REASONS",
    "HANDSHAKE_FAILURES",
    "STATS_LAYOUT_VERSION",
    "STATS_MAGIC",
    "CollectorStats",
    "CollectorStatsFile",
    "CollectorStatsRead",
    "collector_stats_path",
    "read_collector_stats",
]


class CollectorStats(msgspec.Struct):
    """Monotonic counters of one collector. Field order is the stats file's: append only."""

    received: int = 0  # frames taken off the socket
    relayed: int = 0  # snapshots written into the segment
    oversized: int = 0  # snapshot larger than the segment's payload capacity
    undecodable: int = 0  # not msgpack at all, or a multipart message
    invalid: int = 0  # msgpack, but not a valid frame or LoadSnapshot (wrong shape, NaN, ...)
    wrong_instance: int = 0  # no instance in the frame, or another instance's
    rank_out_of_range: int = 0  # dp_rank >= dp_size
    rank_not_allowed: int = 0  # the sender's CURVE key is not bound to the frame's dp_rank
    stale_epoch: int = 0  # older epoch than the rank's live writer
    out_of_order: int = 0  # seq not newer within the current epoch
    relay_errors: int = 0  # the segment refused it (slot owned by a live local writer, ...)
    epoch_takeovers: int = 0  # a lower epoch replaced one that had gone quiet
    connections: int = 0  # TCP connections accepted
    disconnects: int = 0  # peers gone, whatever the cause (MAXMSGSIZE cut-offs included)
    handshakes: int = 0  # ZMTP handshakes completed (authenticated when CURVE is on)
    auth_rejected: int = 0  # CURVE client key not on the allow-list
    handshake_failed: int = 0  # mechanism mismatch (a peer without keys), wrong server key, ...

    @property
    def dropped(self) -> int:
        """Every frame received but not relayed."""
        return sum(getattr(self, reason) for reason in DROP_REASONS)


DROP_REASONS: Final[tuple[str, ...]] = (
    "oversized",
    "undecodable",
    "invalid",
    "wrong_instance",
    "rank_out_of_range",
    "rank_not_allowed",
    "stale_epoch",
    "out_of_order",
    "relay_errors",
)
"""Why a received frame was dropped, in the order the collector checks; each is a counter."""

HANDSHAKE_FAILURES: Final[tuple[str, ...]] = ("auth_rejected", "handshake_failed")

_FIELDS: Final[tuple[str, ...]] = CollectorStats.__struct_fields__

STATS_MAGIC: Final[int] = int.from_bytes(b"LSCSTATS", "little")
STATS_LAYOUT_VERSION: Final[int] = 1
MAGIC_OFFSET: Final[int] = 0
LAYOUT_VERSION_OFFSET: Final[int] = MAGIC_OFFSET + 8
COUNTER_COUNT_OFFSET: Final[int] = LAYOUT_VERSION_OFFSET + 4
COLLECTOR_PID_OFFSET: Final[int] = COUNTER_COUNT_OFFSET + 4
STARTED_WALL_NS_OFFSET: Final[int] = COLLECTOR_PID_OFFSET + 8
HEADER_FIELDS_END: Final[int] = STARTED_WALL_NS_OFFSET + 8
COUNTERS_OFFSET: Final[int] = 64
HEADER_STRUCT: Final = struct.Struct("<QIIQQ")
_FILE_MODE: Final[int] = 0o600


def collector_stats_path(instance: str, shm_dir: str | None = None) -> str:
    """Where the collector of ``instance`` keeps its counters (beside its lock file)."""
    path = Path(segment_path(instance, shm_dir))
    directory = path.parent if path.parent.is_dir() else Path(tempfile.gettempdir())
    return str(directory / f"{path.name}.collector.stats")


def _file_size(count: int) -> int:
    return COUNTERS_OFFSET + 8 * count


class CollectorStatsFile:
    """Writes a collector's counters to its stats file. Single writer (the collector thread).

    Creating replaces whatever is at ``path``: the caller holds the instance's collector lock,
    so anything there is a dead collector's file.

    Raises
    ------
    TransportError
        The file cannot be created (a foreign file in the way, a full or read-only directory).
    """

    def __init__(self, path: str, pid: int, started_wall_ns: int) -> None:
        self.path = path
        size = _file_size(len(_FIELDS))
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, _FILE_MODE)
        except OSError as exc:
            raise TransportError(f"cannot create collector stats: {exc} (path={path})") from exc
        try:
            os.fchmod(fd, _FILE_MODE)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # a full tmpfs fails here, not as SIGBUS later
            else:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise TransportError(f"cannot create collector stats: {exc} (path={path})") from exc
        os.close(fd)
        HEADER_STRUCT.pack_into(self._mm, 0, 0, STATS_LAYOUT_VERSION, len(_FIELDS), pid, 0)
        struct.pack_into("<Q", self._mm, STARTED_WALL_NS_OFFSET, started_wall_ns)
        self._words = memoryview(self._mm).cast("Q")
        # The ready word last: a reader that sees the magic sees a complete header.
        self._words[MAGIC_OFFSET // 8] = STATS_MAGIC
        self._closed = False

    def store(self, stats: CollectorStats) -> None:
        """Copy every counter into the file (one aligned 8-byte store each)."""
        words, base = self._words, COUNTERS_OFFSET // 8
        for index, name in enumerate(_FIELDS):
            words[base + index] = getattr(stats, name)

    def close(self) -> None:
        """Remove the file and unmap it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._words.release()
        self._mm.close()


@dataclass(frozen=True)
class CollectorStatsRead:
    """A collector's counters as read from its stats file."""

    stats: CollectorStats
    pid: int
    started_wall_ns: int


def read_collector_stats(instance: str, shm_dir: str | None = None) -> CollectorStatsRead | None:
    """The counters of the collector of ``instance``; None when it runs no collector (no file,
    or one still being created).

    Safe from any process and thread; never blocks; never creates or changes anything.

    Raises
    ------
    TransportError
        A file that is not ours (a symlink, another owner, group/other permission bits).
    LayoutError
        Not a stats file, another layout version, or too short for its counter count.
    """
    path = collector_stats_path(instance, shm_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink (ELOOP), no permission...
        raise TransportError(f"cannot open collector stats: {exc} (path={path})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise TransportError(
                f"collector stats not ours: mode={oct(st.st_mode)} uid={st.st_uid} "
                f"expected uid={os.geteuid()} mode 0600 (path={path})"
            )
        if st.st_size < COUNTERS_OFFSET:
            return None  # created, not sized yet
        if st.st_size % 8:
            raise LayoutError(
                f"stats file size not a multiple of 8: size={st.st_size} (path={path})"
            )
        mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return _decode(mm, st.st_size, path)
    finally:
        mm.close()


def _decode(mm: mmap.mmap, size: int, path: str) -> CollectorStatsRead | None:
    words = memoryview(mm).cast("Q")
    try:
        magic = words[MAGIC_OFFSET // 8]
        if magic == 0:
            return None  # not ready
        if magic != STATS_MAGIC:
            raise LayoutError(
                f"bad magic: expected={STATS_MAGIC:#x} found={magic:#x} (path={path})"
            )
        _, version, count, pid, started = HEADER_STRUCT.unpack_from(mm, 0)
        if version != STATS_LAYOUT_VERSION:
            raise LayoutError(
                f"stats layout_version: expected={STATS_LAYOUT_VERSION} found={version} "
                f"(path={path})"
            )
        if size < _file_size(count):
            raise LayoutError(
                f"short stats file: size={size} expected>={_file_size(count)} (path={path})"
            )
        base = COUNTERS_OFFSET // 8
        values = {name: words[base + i] for i, name in enumerate(_FIELDS[:count])}
    finally:
        words.release()
    return CollectorStatsRead(CollectorStats(**values), pid, started)
