"""``ShmWriter``: publish one rank's snapshots into the instance's shared-memory segment."""

from __future__ import annotations

import os
import struct
import time
import weakref
from typing import Final, NoReturn

import msgspec
from zlib_ng.zlib_ng import crc32

from loadsnap import _liveness
from loadsnap._location import SegmentLocation, instance_lock
from loadsnap._segment import any_writer_attached, create_or_attach, remove_segment_file
from loadsnap.errors import PayloadTooLargeError, SegmentError, UsageError
from loadsnap.layout import (
    CRC_SEED,
    CRC_STRUCT,
    CTRL_EPOCH_OFFSET,
    CTRL_REFUSED_OFFSET,
    CTRL_WRITER_PID_OFFSET,
    CTRL_WRITER_PIDNS_OFFSET,
    DEFAULT_PAYLOAD_CAPACITY,
    HEAD_STRUCT,
    RECORD_HEADER_SIZE,
    WRITERS_LOCK_OFFSET,
    SegmentGeometry,
)
from loadsnap.schema import LoadSnapshot, validate_snapshot
from loadsnap.wire import check_publishable

__all__ = ["ShmWriter"]

_HEAD_PACK: Final = HEAD_STRUCT.pack_into
_CHECK_PACK: Final = CRC_STRUCT.pack
_monotonic_ns: Final = time.monotonic_ns
_time_ns: Final = time.time_ns
# Attached writers of this process, disowned in a child after fork (see _disown_after_fork).
_ATTACHED: weakref.WeakSet[ShmWriter] = weakref.WeakSet()


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where unknown), for diagnostics."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class ShmWriter:
    """Publishes one DP rank's snapshots. Single writer per slot; not thread-safe.

    :meth:`publish` never blocks and takes no lock: it encodes into a reused buffer and writes
    the slot with the double-buffered seqlock (see ``loadsnap._seqlock``): one copy into the
    copy readers are not using (clearing what a longer earlier record left after it), then one
    8-byte store. Attaching (the constructor) and
    :meth:`close` take the instance's file lock briefly.

    Parameters
    ----------
    instance:
        Deployment instance name; the segment is ``/dev/shm/loadsnap-<instance>``.
    dp_size, dp_rank:
        Number of ranks and this writer's rank.
    payload_capacity:
        Bytes reserved per record copy for the msgpack payload.
    shm_dir:
        Put the segment in this directory instead of going through ``shm_open``
        (default: ``$LOADSNAP_SHM_DIR`` or ``/dev/shm``).
    validate:
        Also validate every snapshot with ``validate_snapshot`` (a few µs) before encoding.
        Without it the pre-publish check (:func:`~loadsnap.wire.check_publishable`) still
        refuses every value a reader would refuse, so a bad snapshot never replaces the slot's
        previous record.

    Raises
    ------
    UsageError
        Bad arguments.
    SegmentError, LayoutError
        The segment cannot be created, is not ours, does not match, or the rank already has a
        live writer (in any process or pid namespace); the message names the path.

    A writer holds kernel locks on its slot while attached (``loadsnap._liveness``): readers
    see its death, however it dies, without using its pid. A child forked while a writer is
    attached cannot publish through it.
    """

    def __init__(
        self,
        instance: str,
        dp_size: int,
        dp_rank: int,
        *,
        payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY,
        shm_dir: str | None = None,
        validate: bool = False,
    ) -> None:
        self._closed = True  # until attached: close() and the fork hook then do nothing
        self._location = location = SegmentLocation(instance, shm_dir)
        self.instance = location.instance
        self.geometry = geometry = SegmentGeometry(dp_size, payload_capacity)
        if not 0 <= dp_rank < dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={dp_rank} dp_size={dp_size}")
        self.dp_rank = dp_rank
        self._validate = validate
        self._pid = os.getpid()
        with instance_lock(location):
            self._segment, self.created = create_or_attach(location, geometry)
            self._buf = self._segment.buf
            self._words = self._buf.cast("Q")
            self._ctrl = geometry.control_offset(dp_rank) // 8
            try:
                self._claim_slot()
            except BaseException:
                self._release_mapping()
                raise
        self._seq_index = geometry.seq_word_index(dp_rank)
        self._copies = (geometry.copy_offset(dp_rank, 0), geometry.copy_offset(dp_rank, 1))
        # Where each copy's bytes may stop being zero. Unknown after a restart (a writer may
        # have died mid-copy): the copy's end, so the first record in each copy clears the rest.
        self._stale_ends = [offset + geometry.copy_size for offset in self._copies]
        self._zeros = memoryview(bytes(geometry.copy_size))
        # The advertised copy is complete whatever step a previous writer died at: go on from it.
        self._seq = self._attached_seq = int(self._words[self._seq_index])
        self._encode_into = msgspec.msgpack.Encoder().encode_into
        self._staging = bytearray(RECORD_HEADER_SIZE + payload_capacity)
        self.refused = int(self._words[self._ctrl + CTRL_REFUSED_OFFSET // 8])
        self._closed = False
        self._capacity = payload_capacity
        _ATTACHED.add(self)

    def _claim_slot(self) -> None:
        # The slot's lock byte is the claim: held for as long as this writer is attached, by
        # this open file description only (another writer, even in this process, conflicts).
        segment, words, ctrl = self._segment, self._words, self._ctrl
        lock_offset = self.geometry.slot_lock_offset(self.dp_rank)
        pid = int(words[ctrl + CTRL_WRITER_PID_OFFSET // 8])
        if _liveness.OFD_LOCKS:
            claimed = _liveness.lock_exclusive(segment.fd, lock_offset) and _liveness.lock_shared(
                segment.fd, WRITERS_LOCK_OFFSET
            )
        else:
            claimed = not (pid and _liveness.pid_alive(pid))
        if not claimed:
            raise SegmentError(
                f"dp_rank={self.dp_rank} already has a live writer (pid {pid} in its own pid "
                f"namespace) (segment={segment.name}); is another copy of this deployment "
                "running?"
            )
        self.epoch = int(words[ctrl + CTRL_EPOCH_OFFSET // 8]) + 1
        words[ctrl + CTRL_EPOCH_OFFSET // 8] = self.epoch
        words[ctrl + CTRL_WRITER_PIDNS_OFFSET // 8] = _pid_namespace()
        words[ctrl + CTRL_WRITER_PID_OFFSET // 8] = self._pid

    def _release_mapping(self) -> None:
        self._words.release()
        self._segment.close()  # closes the descriptor: the kernel drops our locks

    @property
    def published(self) -> int:
        """Records this writer has published."""
        return self._seq - self._attached_seq

    @property
    def segment_name(self) -> str:
        """Path of the segment file."""
        return self._segment.name

    def publish(self, snapshot: LoadSnapshot) -> int:
        """Stamp ``seq``, ``epoch`` and publish times into ``snapshot`` and publish it.

        Returns the record's sequence number.

        Raises
        ------
        PayloadTooLargeError
            The encoded snapshot does not fit the slot; the slot keeps its previous record.
        UsageError
            Wrong ``dp_rank``, a value that breaks the schema (the message names the field), or
            the writer is closed (or was inherited through ``fork``). The slot keeps its
            previous record.
        """
        snapshot.seq = seq = self._seq + 1
        snapshot.epoch = epoch = self.epoch
        snapshot.publish_mono_ns = now = _monotonic_ns()
        snapshot.publish_wall_ns = _time_ns()
        self._write(snapshot, seq, epoch, now)
        return seq

    def publish_relayed(self, snapshot: LoadSnapshot, received_mono_ns: int) -> int:
        """Publish a snapshot received from a remote writer, keeping its ``epoch``.

        ``seq`` becomes this slot's record sequence (the collector has already dropped
        out-of-order records) and ``publish_mono_ns`` this host's ``received_mono_ns``, so ages
        stay right when node clocks disagree. Returns the record sequence.
        """
        snapshot.seq = seq = self._seq + 1
        snapshot.publish_mono_ns = received_mono_ns
        self._write(snapshot, seq, snapshot.epoch, received_mono_ns)
        return seq

    def _write(self, snapshot: LoadSnapshot, seq: int, epoch: int, mono_ns: int) -> None:
        # The hot path, kept flat on purpose: it inlines _seqlock.build_record and
        # write_record (a test checks the bytes agree) and packs the hot record straight from
        # attributes, in layout.HOT_FIELDS order.
        if snapshot.dp_rank != self.dp_rank:
            raise UsageError(f"dp_rank mismatch: writer={self.dp_rank} snapshot={snapshot.dp_rank}")
        if self._validate:
            validate_snapshot(snapshot, self.geometry.dp_size)
        staging = self._staging
        self._encode_into(snapshot, staging, RECORD_HEADER_SIZE)
        payload_len = len(staging) - RECORD_HEADER_SIZE
        if payload_len > self._capacity:
            self._refuse(payload_len)
        check_publishable(snapshot, staging, RECORD_HEADER_SIZE)
        try:
            _HEAD_PACK(
                staging,
                0,
                0,
                payload_len,
                seq,
                epoch,
                mono_ns,
                snapshot.num_running_reqs,
                snapshot.num_waiting_reqs,
                snapshot.num_used_tokens,
                snapshot.num_total_tokens,
                snapshot.max_total_num_tokens,
                snapshot.last_accepted_dispatch_seq,
                snapshot.gen_throughput,
            )
        except struct.error as exc:  # a negative or oversized count
            raise UsageError(f"invalid count in snapshot: {exc}") from exc
        staging += _CHECK_PACK(crc32(staging, CRC_SEED) ^ CRC_SEED)  # the linear CRC-32
        copy = seq & 1  # the copy readers are not being sent to
        base = self._copies[copy]
        end = base + len(staging)
        self._buf[base:end] = staging
        stale_end = self._stale_ends[copy]
        if end < stale_end:  # keep the bytes after the record zero (see layout)
            self._buf[end:stale_end] = self._zeros[: stale_end - end]
        self._stale_ends[copy] = end
        self._words[self._seq_index] = seq  # one 8-byte store: complete and advertised
        self._seq = seq

    def _write_closed(self, snapshot: LoadSnapshot, seq: int, epoch: int, mono_ns: int) -> None:
        raise UsageError(f"writer is closed (segment={self._segment.name} dp_rank={self.dp_rank})")

    def _refuse(self, payload_len: int) -> NoReturn:
        self.refused += 1
        self._words[self._ctrl + CTRL_REFUSED_OFFSET // 8] = self.refused
        raise PayloadTooLargeError(
            f"payload too large: size={payload_len} capacity={self._capacity} "
            f"(segment={self._segment.name} dp_rank={self.dp_rank})"
        )

    def close(self, *, unlink_if_last: bool = True) -> None:
        """Detach: mark the slot writer-less and, if no writer remains, unlink the segment.

        Idempotent. Readers then see this rank as DEAD ("writer detached").
        """
        if self._closed:
            return
        self._closed = True
        self._write = self._write_closed  # type: ignore[method-assign]
        _ATTACHED.discard(self)
        with instance_lock(self._location):
            words, ctrl = self._words, self._ctrl
            if int(words[ctrl + CTRL_WRITER_PID_OFFSET // 8]) == self._pid:
                words[ctrl + CTRL_WRITER_PID_OFFSET // 8] = 0
            # Our own locks do not count in the probe; nobody can attach while we hold the
            # instance lock, so "last" cannot change before the unlink.
            last = unlink_if_last and not any_writer_attached(self._segment)
            self._release_mapping()
            if last:
                remove_segment_file(self._location)

    def _disown(self) -> None:
        """In a child forked while attached: let go of the parent's slot without touching it."""
        if self._closed:
            return
        self._closed = True
        self._write = self._write_inherited  # type: ignore[method-assign]
        # Closing our copy of the descriptor leaves the parent's locks in place (they belong
        # to the shared open file description, which the parent still holds open).
        self._release_mapping()

    def _write_inherited(self, snapshot: LoadSnapshot, seq: int, epoch: int, mono_ns: int) -> None:
        raise UsageError(
            f"writer inherited through fork: only the process that attached it may publish; "
            f"attach a new ShmWriter in the child (segment={self._segment.name} "
            f"dp_rank={self.dp_rank})"
        )

    def __enter__(self) -> ShmWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShmWriter(instance={self.instance!r}, dp_rank={self.dp_rank}, epoch={self.epoch})"


def _disown_after_fork() -> None:
    for writer in list(_ATTACHED):
        writer._disown()
    _ATTACHED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_after_fork)
