"""Wire layer: ``LoadSnapshot`` <-> msgpack bytes. No I/O, no transports."""

from __future__ import annotations

import operator
import struct
from typing import Final

import msgspec

from loadsnap.errors import UsageError, WireDecodeError, WireError, WireValidationError
from loadsnap.schema import LoadSnapshot

__all__ = [
    "SnapshotDecoder",
    "check_publishable",
    "decode_snapshot",
    "encode_snapshot",
    "wire_error",
]


# msgspec 0.22 raises UnicodeDecodeError (not DecodeError) for invalid UTF-8.
DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError)


def wire_error(exc: Exception, what: str) -> WireError:
    """The loadsnap error for msgspec's ``exc`` while decoding ``what``.

    :class:`~loadsnap.errors.WireValidationError` for a value that breaks the schema
    (msgspec's ``ValidationError``), :class:`~loadsnap.errors.WireDecodeError` for the rest.
    """
    if isinstance(exc, msgspec.ValidationError):
        return WireValidationError(f"invalid {what}: {exc}")
    return WireDecodeError(f"undecodable {what}: {exc}")


class SnapshotDecoder:
    """Typed, validating decoder. Safe to share between threads."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = msgspec.msgpack.Decoder(LoadSnapshot)

    def decode(self, data: bytes) -> LoadSnapshot:
        """Decode and validate ``data``.

        Raises
        ------
        WireDecodeError
            Undecodable bytes.
        WireValidationError
            A value outside the schema's constraints.
        """
        try:
            return self._decoder.decode(data)
        except DECODE_ERRORS as exc:
            raise wire_error(exc, "snapshot") from exc


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER = SnapshotDecoder()


def encode_snapshot(snapshot: LoadSnapshot) -> bytes:
    """Encode ``snapshot`` to msgpack bytes."""
    return _ENCODER.encode(snapshot)


def decode_snapshot(data: bytes) -> LoadSnapshot:
    """Decode and validate msgpack bytes (see :meth:`SnapshotDecoder.decode`)."""
    return _DECODER.decode(data)


_MAX_RATE: Final[float] = 1e15
_INF: Final[float] = float("inf")
# Every top-level integer a scheduler sets (the writer stamps seq, epoch and the times).
_SCHEDULER_INTS: Final = operator.attrgetter(
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "max_running_requests",
    "cycle",
    "last_accepted_dispatch_seq",
    "num_active_tokens",
    "total_prefill_uncached_tokens",
    "total_prefill_busy_us",
)
# Every top-level float a scheduler sets. A bool passes for a number in the comparisons and
# the packing but not in the readers' decoder, so the types of all these are looked at.
_SCHEDULER_FLOATS: Final = operator.attrgetter(
    "token_usage", "gen_throughput", "cache_hit_rate", "utilization", "timestamp"
)
# As signed 64-bit: refuses a non-integer and anything above the schema's 2**63 - 1.
_PACK_INTS: Final = struct.Struct("<13q").pack
_VALIDATING_DECODER: Final = msgspec.msgpack.Decoder(LoadSnapshot)


def check_publishable(
    snapshot: LoadSnapshot, payload: bytes | bytearray | None = None, offset: int = 0
) -> None:
    """Refuse, before it is published, a snapshot that readers would refuse to decode.

    The writers' pre-publish check, shared by :class:`~loadsnap.ShmWriter` and
    :class:`~loadsnap.zmq_writer.ZmqWriter`. ``payload[offset:]``, when given, is the
    snapshot's msgpack encoding (else it is encoded here when needed). Without sections the
    top-level numbers' types and values are checked directly (about 0.7 µs, a bool refused
    as the decoder refuses it); when a section is present, or a
    number looks wrong, the payload is decoded with the readers' own validating decoder
    (1-2 µs), so the writer refuses exactly what readers would.

    Raises
    ------
    UsageError
        The first violated constraint, naming its field (e.g. ``$.cache_hit_rate``).
    """
    if (
        snapshot.decode_moments is None
        and snapshot.memory is None
        and snapshot.speculative is None
        and snapshot.lora is None
        and snapshot.disaggregation is None
        and snapshot.queues is None
    ):
        try:
            counts = _SCHEDULER_INTS(snapshot)
            floats = _SCHEDULER_FLOATS(snapshot)
            usage, throughput, hit_rate, utilization, timestamp = floats
            _PACK_INTS(*counts)
            if (
                bool not in set(map(type, counts + floats))
                and min(counts) >= 0
                and 0.0 <= usage <= 1.0
                and 0.0 <= hit_rate <= 1.0
                and 0.0 <= utilization <= 1.0
                and 0.0 <= throughput <= _MAX_RATE
                and timestamp >= -_INF  # any float; a str raises TypeError
            ):
                return
        except (struct.error, TypeError):  # a non-integer count, a value that does not compare
            pass
    # A section is present (its checks are the decoder's alone), or a number looks wrong: the
    # readers' own decoder decides, and names the field.
    if payload is None:
        payload = _ENCODER.encode(snapshot)
    try:
        _VALIDATING_DECODER.decode(payload[offset:] if offset else payload)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid snapshot: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"snapshot does not encode to a valid payload: {exc}") from exc
