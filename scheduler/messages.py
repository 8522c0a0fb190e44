"""Messages between the DP controller and the reference schedulers (msgpack over ZMQ).

Topology: each scheduler binds a PULL socket for :data:`ToScheduler` messages (the controller
connects one PUSH per rank: one ordered pipe per scheduler); the controller binds one PULL for
:data:`ToController` messages (every scheduler connects a PUSH).

Dispatch sequence rule (the ledger contract, see ``dp_controller``): the controller numbers the
requests it sends to each rank 1, 2, 3, ... without gaps (per rank). A scheduler counts a
request in its published numbers once it is queued or running; it reports in
``LoadSnapshot.last_accepted_dispatch_seq`` the highest ``dispatch_seq`` such that every
request up to it (from the first it ever received, minus one) is counted. Requests may be
counted out of order; the acknowledgement only advances contiguously. A controller that takes
over running schedulers (the previous one crashed or closed) continues each rank's numbering
after the ``last_accepted_dispatch_seq`` it reads, so the acknowledgement never has to restart.

Every :class:`Request` ends in exactly one :class:`Finished` for the controller's caller. The
controller makes one itself, with ``status="failed"`` and a ``reason``, for the requests a dead
or restarted scheduler took with it; a scheduler's own ``Finished`` for such a request, if one
still arrives, is dropped.

Compatibility: fields are only ever appended, with defaults, and unknown fields are ignored, so
an older peer decodes a newer peer's messages.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from loadsnap.wire import DECODE_ERRORS, wire_error

__all__ = [
    "Control",
    "ControlReply",
    "Finished",
    "Request",
    "ToController",
    "ToScheduler",
    "decode_to_controller",
    "decode_to_scheduler",
    "encode_message",
]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Request(msgspec.Struct, tag="req", kw_only=True):
    """A tokenized request dispatched to one rank."""

    rid: NonNegative
    dispatch_seq: Annotated[int, msgspec.Meta(ge=1)]
    prompt: list[int]  # token ids (the prefix cache hashes their leading blocks)
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)]
    dispatched_mono_ns: NonNegative  # controller's monotonic clock (same host) at dispatch
    pinned: bool = False  # the caller chose the rank


class Control(msgspec.Struct, tag="ctl", kw_only=True):
    """A command for every scheduler: ``flush_cache``, ``pause``, ``resume``, ``ping``..."""

    command_id: NonNegative
    command: str
    args: dict[str, str] = {}


class Finished(msgspec.Struct, tag="fin", kw_only=True):
    """A request that left a scheduler, with what the user felt."""

    rid: NonNegative
    dp_rank: NonNegative
    dispatch_seq: NonNegative
    prompt_len: NonNegative
    output_len: NonNegative
    cached_tokens: NonNegative
    queue_time_s: float  # dispatch -> first scheduled
    ttft_s: float  # dispatch -> first output token
    e2e_s: float  # dispatch -> finished
    status: str = "ok"  # ok | aborted | failed
    reason: str = ""  # why, when not ok: e.g. rank_dead, rank_restarted (set by the controller)


class ControlReply(msgspec.Struct, tag="ctlr", kw_only=True):
    """One scheduler's answer to a :class:`Control`."""

    command_id: NonNegative
    dp_rank: NonNegative
    ok: bool
    detail: str = ""


ToScheduler = Request | Control
ToController = Finished | ControlReply

_ENCODER: Final = msgspec.msgpack.Encoder()
_TO_SCHEDULER: Final[msgspec.msgpack.Decoder[Request | Control]] = msgspec.msgpack.Decoder(
    ToScheduler
)
_TO_CONTROLLER: Final[msgspec.msgpack.Decoder[Finished | ControlReply]] = msgspec.msgpack.Decoder(
    ToController
)


def encode_message(message: Request | Control | Finished | ControlReply) -> bytes:
    """Encode any controller/scheduler message."""
    return _ENCODER.encode(message)


def decode_to_scheduler(data: bytes) -> Request | Control:
    """Decode a controller -> scheduler message.

    Raises
    ------
    WireDecodeError, WireValidationError
        Undecodable bytes, or values that break the message schema (loadsnap's wire errors).
    """
    try:
        return _TO_SCHEDULER.decode(data)
    except DECODE_ERRORS as exc:
        raise wire_error(exc, "message") from exc


def decode_to_controller(data: bytes) -> Finished | ControlReply:
    """Decode a scheduler -> controller message (raises as :func:`decode_to_scheduler`)."""
    try:
        return _TO_CONTROLLER.decode(data)
    except DECODE_ERRORS as exc:
        raise wire_error(exc, "message") from exc
