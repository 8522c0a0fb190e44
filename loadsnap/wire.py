"""Wire layer: ``LoadSnapshot`` <-> msgpack bytes. No I/O, no transports."""

from __future__ import annotations

import msgspec

from loadsnap.errors import WireError
from loadsnap.schema import LoadSnapshot

__all__ = ["SnapshotDecoder", "SnapshotEncoder", "decode_snapshot", "encode_snapshot"]


class SnapshotEncoder:
    """Reusable msgpack encoder. Not thread-safe (one per writer)."""

    __slots__ = ("_encoder",)

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, snapshot: LoadSnapshot) -> bytes:
        """Return the msgpack bytes of ``snapshot``."""
        return self._encoder.encode(snapshot)

    def encode_into(self, snapshot: LoadSnapshot, buffer: bytearray, offset: int) -> None:
        """Encode at ``buffer[offset:]``; the buffer is truncated to the end of the message."""
        self._encoder.encode_into(snapshot, buffer, offset)


class SnapshotDecoder:
    """Typed, validating decoder. Safe to share between threads."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = msgspec.msgpack.Decoder(LoadSnapshot)

    def decode(self, data: bytes) -> LoadSnapshot:
        """Decode and validate ``data``.

        Raises
        ------
        WireError
            Undecodable bytes or a value outside the schema's constraints.
        """
        try:
            return self._decoder.decode(data)
        # msgspec 0.22 raises UnicodeDecodeError (not DecodeError) for invalid UTF-8.
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise WireError(f"undecodable snapshot: {exc}") from exc


_ENCODER = SnapshotEncoder()
_DECODER = SnapshotDecoder()


def encode_snapshot(snapshot: LoadSnapshot) -> bytes:
    """Encode ``snapshot`` to msgpack bytes."""
    return _ENCODER.encode(snapshot)


def decode_snapshot(data: bytes) -> LoadSnapshot:
    """Decode and validate msgpack bytes (see :meth:`SnapshotDecoder.decode`)."""
    return _DECODER.decode(data)
