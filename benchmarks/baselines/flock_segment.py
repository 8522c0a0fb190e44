"""The reference design's shared-memory scheme, re-implemented as the benchmarks' baseline.

Written from the facts of sglang's ``load_snapshot.py`` (PR #26348 and later), not copied:

- one mmap file holding a 12-byte header (``magic 4s, version u16, dp_size u16, slot_size
  u32``) and one 16 KiB slot per rank (``u32 length + msgpack snapshot``);
- a write takes a whole-file ``fcntl.flock(LOCK_EX)`` through a context-manager wrapper, then,
  under the lock: stores length 0, copies the payload, zero-fills the rest of the slot (a fresh
  ``b"\\0" * n`` each time) and stores the length;
- ``read_all`` takes ``flock(LOCK_SH)`` through the same wrapper and decodes every slot under
  it, leaving out ranks whose length is 0 (or out of range) or whose bytes do not decode;
- the kernel drops a flock when its holder dies, so a writer killed after "store length 0" and
  before "store length" leaves its rank missing from every later ``read_all`` until it writes
  again (:meth:`FlockSegment.write_steps` lets the benchmarks kill a writer at each step);
- the payload is the reference's own snapshot shape (:class:`ReferenceSnapshot`): a msgpack
  map with ``omit_defaults`` whose sections are arrays; :func:`reference_snapshot` fills one
  with the same facts as one of ours.

Nothing validates the bytes and the file is never reclaimed by others: this class unlinks it
in :meth:`FlockSegment.close` only so that benchmarks clean up.

Layout::

     0 +--------+--------+--------+--------+
       | magic 4s        | version u16 | dp_size u16 |
     8 +-----------------+-------------+-------------+
       | slot_size u32   | slot 0: length u32 | msgpack ... zero-filled to 16 KiB
    12 + rank * slot_size
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Generator, Iterator
from typing import Final

import msgspec

from loadsnap import LoadSnapshot

__all__ = [
    "FLOCK_MAGIC",
    "FlockSegment",
    "FlockStep",
    "ReferenceSnapshot",
    "reference_snapshot",
]

FLOCK_MAGIC: Final[bytes] = b"SLNS"
FLOCK_VERSION: Final[int] = 2
_HEADER: Final = struct.Struct("<4sHHI")
_LEN: Final = struct.Struct("<I")
DEFAULT_SLOT_SIZE: Final[int] = 16 * 1024
_GIB: Final[float] = float(2**30)


# --- the reference's snapshot shape -----------------------------------------------------------


class ReferenceMemory(msgspec.Struct, array_like=True):
    """Memory section: sizes in GB, as the reference reports them."""

    weight_gb: float
    kv_cache_gb: float
    graph_gb: float
    token_capacity: int


class ReferenceSpeculative(msgspec.Struct, array_like=True):
    """Speculative decoding section."""

    accept_length: float
    accept_rate: float


class ReferenceLora(msgspec.Struct, array_like=True):
    """LoRA pool section (slot counts, no adapter names)."""

    slots_used: int
    slots_total: int
    utilization: float


class ReferenceDisaggregation(msgspec.Struct, array_like=True):
    """Prefill/decode disaggregation section."""

    mode: str
    prefill_bootstrap_queue_reqs: int = 0
    prefill_inflight_queue_reqs: int = 0
    decode_prealloc_queue_reqs: int = 0
    decode_transfer_queue_reqs: int = 0
    decode_retracted_queue_reqs: int = 0
    kv_transfer_speed_gb_s: float = 0.0
    kv_transfer_latency_ms: float = 0.0


class ReferenceQueues(msgspec.Struct, array_like=True):
    """Queue breakdown section."""

    waiting: int
    grammar: int
    paused: int
    retracted: int


class ReferenceSnapshot(msgspec.Struct, omit_defaults=True):
    """The reference's per-rank snapshot: a map without defaults, sections as arrays, no
    value constraints (its decoder checks types only)."""

    timestamp: float = 0.0
    dp_rank: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_waiting_uncached_tokens: int = 0
    num_used_tokens: int = 0
    num_total_tokens: int = 0
    num_active_tokens: int = 0
    max_total_num_tokens: int = 0
    max_running_requests: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0
    utilization: float = 0.0
    total_prefill_uncached_tokens: int = 0
    total_prefill_busy_us: int = 0
    decode_moments: list[float] | None = None
    memory: ReferenceMemory | None = None
    speculative: ReferenceSpeculative | None = None
    lora: ReferenceLora | None = None
    disaggregation: ReferenceDisaggregation | None = None
    queues: ReferenceQueues | None = None


def reference_snapshot(snapshot: LoadSnapshot, timestamp: float | None = None) -> ReferenceSnapshot:
    """The reference's snapshot carrying the same facts as ``snapshot`` (where it has a field
    for them): what its scheduler would publish in the same state, stamped ``timestamp``
    (default: now, wall clock)."""
    memory = speculative = lora = disaggregation = queues = None
    if (m := snapshot.memory) is not None:
        memory = ReferenceMemory(
            m.weight_bytes / _GIB,
            m.kv_cache_bytes / _GIB,
            m.activation_bytes / _GIB,
            m.kv_token_capacity,
        )
    if (s := snapshot.speculative) is not None:
        speculative = ReferenceSpeculative(s.accept_length, s.accept_rate)
    if (lo := snapshot.lora) is not None:
        used = len(lo.loaded_adapters)
        total = lo.max_loaded_adapters
        lora = ReferenceLora(used, total, used / total if total else 0.0)
    if (d := snapshot.disaggregation) is not None:
        disaggregation = ReferenceDisaggregation(
            d.mode,
            d.num_bootstrap_queue_reqs,
            d.num_inflight_queue_reqs,
            d.num_prealloc_queue_reqs,
            d.num_transfer_queue_reqs,
        )
    if (q := snapshot.queues) is not None:
        queues = ReferenceQueues(
            snapshot.num_waiting_reqs,
            q.num_grammar_queue_reqs,
            q.num_paused_reqs,
            q.num_retracted_reqs,
        )
    return ReferenceSnapshot(
        timestamp=time.time() if timestamp is None else timestamp,
        dp_rank=snapshot.dp_rank,
        num_running_reqs=snapshot.num_running_reqs,
        num_waiting_reqs=snapshot.num_waiting_reqs,
        num_waiting_uncached_tokens=snapshot.num_waiting_uncached_tokens,
        num_used_tokens=snapshot.num_used_tokens,
        num_total_tokens=snapshot.num_total_tokens,
        num_active_tokens=snapshot.num_total_tokens,
        max_total_num_tokens=snapshot.max_total_num_tokens,
        max_running_requests=snapshot.max_running_requests,
        token_usage=snapshot.token_usage,
        gen_throughput=snapshot.gen_throughput,
        cache_hit_rate=snapshot.cache_hit_rate,
        utilization=snapshot.utilization,
        memory=memory,
        speculative=speculative,
        lora=lora,
        disaggregation=disaggregation,
        queues=queues,
    )


# --- the segment --------------------------------------------------------------------------------


class FlockStep(enum.Enum):
    """The steps of one reference write, in order (all under the exclusive lock)."""

    LOCKED = "locked"
    LENGTH_ZEROED = "length_zeroed"
    COPIED = "copied"
    ZERO_FILLED = "zero_filled"
    LENGTH_STORED = "length_stored"


@contextlib.contextmanager
def _file_lock(fd: int, operation: int) -> Iterator[None]:
    """The reference's lock wrapper: flock, yield, unlock."""
    fcntl.flock(fd, operation)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


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
    snapshot_type:
        What :meth:`read_all` decodes slots into (default: the reference's own shape).

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
        snapshot_type: type[msgspec.Struct] = ReferenceSnapshot,
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
            raise ValueError(f"not a flock segment: magic={magic!r} version={version} ({path})")
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[msgspec.Struct] = msgspec.msgpack.Decoder(
            snapshot_type
        )

    def _slot(self, rank: int) -> int:
        return _HEADER.size + rank * self.slot_size

    def write(self, snapshot: ReferenceSnapshot | LoadSnapshot) -> None:
        """Encode ``snapshot`` and store it in its rank's slot under the exclusive file lock."""
        with _file_lock(self._fd, fcntl.LOCK_EX):
            self._write_payload(snapshot)

    def _write_payload(self, snapshot: ReferenceSnapshot | LoadSnapshot) -> None:
        payload = self._encoder.encode(snapshot)
        if len(payload) > self.slot_size - _LEN.size:
            raise ValueError(f"payload too large: size={len(payload)} slot={self.slot_size}")
        offset = self._slot(snapshot.dp_rank)
        start = offset + _LEN.size
        end = start + len(payload)
        slot_end = offset + self.slot_size
        mm = self._mm
        _LEN.pack_into(mm, offset, 0)
        mm[start:end] = payload
        mm[end:slot_end] = b"\0" * (slot_end - end)
        _LEN.pack_into(mm, offset, len(payload))

    def write_steps(self, snapshot: ReferenceSnapshot | LoadSnapshot) -> Generator[FlockStep]:
        """Step-by-step mirror of :meth:`write`, yielding after each step while the lock is
        held (for crash injection: a process that dies between steps loses its lock, as the
        reference's writer does)."""
        payload = self._encoder.encode(snapshot)
        offset = self._slot(snapshot.dp_rank)
        start = offset + _LEN.size
        end = start + len(payload)
        slot_end = offset + self.slot_size
        mm = self._mm
        with _file_lock(self._fd, fcntl.LOCK_EX):
            yield FlockStep.LOCKED
            _LEN.pack_into(mm, offset, 0)
            yield FlockStep.LENGTH_ZEROED
            mm[start:end] = payload
            yield FlockStep.COPIED
            mm[end:slot_end] = b"\0" * (slot_end - end)
            yield FlockStep.ZERO_FILLED
            _LEN.pack_into(mm, offset, len(payload))
            yield FlockStep.LENGTH_STORED

    def _read_slot(self, rank: int) -> msgspec.Struct | None:
        offset = self._slot(rank)
        (length,) = _LEN.unpack_from(self._mm, offset)
        if length == 0 or length > self.slot_size - _LEN.size:
            return None
        start = offset + _LEN.size
        try:
            return self._decoder.decode(self._mm[start : start + length])
        except Exception:  # the reference logs and skips an undecodable slot
            return None

    def read(self, rank: int) -> msgspec.Struct | None:
        """One rank's snapshot under the shared lock (None when missing or undecodable)."""
        if not 0 <= rank < self.dp_size:
            return None
        with _file_lock(self._fd, fcntl.LOCK_SH):
            return self._read_slot(rank)

    def read_all(self) -> list[msgspec.Struct]:
        """Take the shared lock and decode every slot; missing or undecodable ranks are left
        out (the list does not say which)."""
        with _file_lock(self._fd, fcntl.LOCK_SH):
            loads = []
            for rank in range(self.dp_size):
                load = self._read_slot(rank)
                if load is not None:
                    loads.append(load)
            return loads

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
