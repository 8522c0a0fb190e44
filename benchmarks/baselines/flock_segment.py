"""The reference design's shared-memory scheme, re-implemented as the benchmarks' baseline.

One mmap file in /dev/shm holding a header (``magic, version, dp_size, slot_size``) and one
slot per rank (``u32 length + msgpack LoadSnapshot``). Every write takes a whole-file
``fcntl.flock(LOCK_EX)``; every read of all ranks takes ``flock(LOCK_SH)`` and decodes every
slot under the lock. Nothing validates the bytes and the file is never reclaimed by others:
this class unlinks it in :meth:`FlockSegment.close` only so that benchmarks clean up.

Layout::

     0 +--------+--------+--------+--------+
       | magic u32       | version u32     |
     8 +-----------------+-----------------+
       | dp_size u32     | slot_size u32   |
    16 +-----------------+-----------------+
       | slot 0: length u32 | msgpack ...  |
       +-----------------------------------+  16 + slot_size
       | slot 1 ...                        |
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from typing import Final

import msgspec

from loadsnap import LoadSnapshot

__all__ = ["FLOCK_MAGIC", "FlockSegment"]

FLOCK_MAGIC: Final[int] = 0x4C534E50
FLOCK_VERSION: Final[int] = 1
_HEADER: Final = struct.Struct("<IIII")
_LEN: Final = struct.Struct("<I")
DEFAULT_SLOT_SIZE: Final[int] = 4096


class FlockSegment:
    """The reference's flock-guarded segment. Safe from any process; every call may block.

    Parameters
    ----------
    path:
        File path (e.g. ``/dev/shm/ref-bench``).
    dp_size, slot_size:
        Geometry; required with ``create=True``, read from the header otherwise.
    create:
        Create (truncate) and initialise the file; otherwise attach to an existing one.

    Raises
    ------
    ValueError
        Attaching to a file whose magic or version is wrong.
    """

    def __init__(
        self,
        path: str,
        dp_size: int = 0,
        slot_size: int = DEFAULT_SLOT_SIZE,
        *,
        create: bool = False,
    ) -> None:
        self.path = path
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, _HEADER.size + dp_size * slot_size)
        else:
            fd = os.open(path, os.O_RDWR)
        self._fd = fd
        self._mm = mmap.mmap(fd, 0)
        if create:
            _HEADER.pack_into(self._mm, 0, FLOCK_MAGIC, FLOCK_VERSION, dp_size, slot_size)
        magic, version, dp_size, slot_size = _HEADER.unpack_from(self._mm, 0)
        self.dp_size: int = dp_size
        self.slot_size: int = slot_size
        if magic != FLOCK_MAGIC or version != FLOCK_VERSION:
            self.close(unlink=False)
            raise ValueError(f"not a flock segment: magic={magic:#x} version={version} ({path})")
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(LoadSnapshot)

    def _slot(self, rank: int) -> int:
        return _HEADER.size + rank * self.slot_size

    def write(self, snapshot: LoadSnapshot) -> None:
        """Encode ``snapshot`` and store it in its rank's slot under an exclusive file lock."""
        payload = self._encoder.encode(snapshot)
        if len(payload) + _LEN.size > self.slot_size:
            raise ValueError(f"payload too large: size={len(payload)} slot={self.slot_size}")
        offset = self._slot(snapshot.dp_rank)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _LEN.pack_into(self._mm, offset, len(payload))
            self._mm[offset + _LEN.size : offset + _LEN.size + len(payload)] = payload
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read_all(self) -> list[LoadSnapshot | None]:
        """Take a shared lock and decode every slot (None where nothing was written)."""
        out: list[LoadSnapshot | None] = []
        mm, decode = self._mm, self._decoder.decode
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            for rank in range(self.dp_size):
                offset = self._slot(rank)
                (length,) = _LEN.unpack_from(mm, offset)
                if length == 0:
                    out.append(None)
                    continue
                out.append(decode(mm[offset + _LEN.size : offset + _LEN.size + length]))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return out

    def close(self, *, unlink: bool = False) -> None:
        """Unmap and close; remove the file too when ``unlink``. Idempotent."""
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> FlockSegment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
