"""Wire layer: the ZMQ frame, an envelope naming the instance around one ``LoadSnapshot``.

No I/O, no sockets. A frame is one msgpack **map**::

    {"instance": "prod", "snapshot": {<LoadSnapshot map, as loadsnap.wire encodes it>}}

``instance`` is the deployment instance the writer was configured for; a collector relays only
frames naming its own instance, so a writer pointed at another deployment's collector (or a
collector address reused across deployments) cannot land in the wrong segment.

Schema evolution is append-only, as for :class:`~loadsnap.LoadSnapshot`: a newer writer may add
keys (an older collector ignores them); no key is ever removed, renamed or given another type or
meaning. A change old collectors must not misread gets a new key, never a new meaning for an
old one. A frame without ``instance`` (e.g. a bare snapshot from a writer that predates the
envelope) is reported as a wrong instance, not as garbage.

Decoding is in two steps so the collector spends nothing on a frame it will drop anyway:
:meth:`FrameDecoder.decode_head` reads ``instance`` and keeps the snapshot's bytes raw (no
validation of them yet); :meth:`FrameDecoder.decode_snapshot` then decodes and validates the
snapshot. What a fuzzer may get out of them is documented on each method: a result or a
:class:`~loadsnap.WireError` (:class:`~loadsnap.errors.WireValidationError` when the bytes
are msgpack but break the schema), nothing else.
"""

from __future__ import annotations

from typing import Final

import msgspec

from loadsnap.errors import WireValidationError
from loadsnap.schema import LoadSnapshot
from loadsnap.wire import DECODE_ERRORS, wire_error

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FrameDecoder",
    "FrameEncoder",
    "FrameHead",
    "SnapshotFrame",
    "decode_frame",
    "encode_frame",
    "frame_overhead_bytes",
]

DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 64 * 1024
"""Default frame size limit, the same for writers (refused before sending) and collectors
(libzmq ``MAXMSGSIZE``: a larger frame disconnects its peer). Configure both to one value."""


class SnapshotFrame(msgspec.Struct, frozen=True):
    """What a writer sends: the instance it publishes for and the snapshot."""

    instance: str
    snapshot: LoadSnapshot


class FrameHead(msgspec.Struct, frozen=True):
    """A frame's envelope with the snapshot left undecoded.

    ``instance`` is None when the frame has no ``instance`` key (or a nil one); ``snapshot`` is
    empty when it has no ``snapshot`` key.
    """

    instance: str | None = None
    snapshot: msgspec.Raw = msgspec.Raw()


class FrameEncoder:
    """Encodes frames for one instance. Not thread-safe (one per writer)."""

    __slots__ = ("_encode", "instance")

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._encode = msgspec.msgpack.Encoder().encode

    def encode(self, snapshot: LoadSnapshot) -> bytes:
        """The frame carrying ``snapshot`` for this encoder's instance."""
        return self._encode(SnapshotFrame(self.instance, snapshot))


class FrameDecoder:
    """Decodes frames in two steps (envelope, then snapshot). Safe to share between threads."""

    __slots__ = ("_head", "_snapshot")

    def __init__(self) -> None:
        self._head = msgspec.msgpack.Decoder(FrameHead)
        self._snapshot = msgspec.msgpack.Decoder(LoadSnapshot)

    def decode_head(self, data: bytes) -> FrameHead:
        """The envelope of ``data``; the snapshot inside is not looked at yet.

        Raises
        ------
        WireDecodeError
            Not msgpack.
        WireValidationError
            Not a map whose ``instance`` is a string.
        """
        try:
            return self._head.decode(data)
        except DECODE_ERRORS as exc:
            raise wire_error(exc, "frame") from exc

    def decode_snapshot(self, head: FrameHead) -> LoadSnapshot:
        """Decode and validate the snapshot inside ``head``.

        Raises
        ------
        WireDecodeError
            Undecodable snapshot bytes.
        WireValidationError
            No snapshot in the frame, or a value outside the schema's constraints.
        """
        raw = head.snapshot
        if not len(raw):
            raise WireValidationError("frame without a snapshot: missing required field `snapshot`")
        try:
            # Straight from the Raw's buffer: about 180 ns less than copying it to bytes first.
            return self._snapshot.decode(raw)
        except DECODE_ERRORS as exc:
            raise wire_error(exc, "snapshot") from exc


def frame_overhead_bytes(instance: str) -> int:
    """How many bytes a frame for ``instance`` adds around the snapshot's own encoding."""
    # An empty Raw encodes as nothing: what remains is the map, both keys and the instance.
    return len(msgspec.msgpack.encode(FrameHead(instance, msgspec.Raw(b""))))


_DECODER: Final = FrameDecoder()


def encode_frame(instance: str, snapshot: LoadSnapshot) -> bytes:
    """One frame carrying ``snapshot`` for ``instance`` (see :class:`FrameEncoder`)."""
    return msgspec.msgpack.encode(SnapshotFrame(instance, snapshot))


def decode_frame(data: bytes) -> tuple[str | None, LoadSnapshot]:
    """``(instance, snapshot)`` from one frame, both steps at once.

    Raises
    ------
    WireError
        As :meth:`FrameDecoder.decode_head` and :meth:`FrameDecoder.decode_snapshot`.
    """
    head = _DECODER.decode_head(data)
    return head.instance, _DECODER.decode_snapshot(head)
