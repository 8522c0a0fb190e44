"""The ZMQ frame envelope: instance + snapshot, append-only, documented errors only."""

from __future__ import annotations

import msgspec
import pytest

from loadsnap import LoadSnapshot, WireDecodeError, WireError, WireValidationError
from loadsnap.frame import (
    FrameDecoder,
    FrameEncoder,
    FrameHead,
    decode_frame,
    encode_frame,
    frame_overhead_bytes,
)
from loadsnap.wire import encode_snapshot


def test_round_trip_keeps_instance_and_snapshot() -> None:
    snapshot = LoadSnapshot(dp_rank=3, num_running_reqs=7, seq=9, epoch=11)
    data = encode_frame("prod", snapshot)
    assert decode_frame(data) == ("prod", snapshot)
    assert FrameEncoder("prod").encode(snapshot) == data


def test_frame_is_a_map_of_instance_and_snapshot() -> None:
    snapshot = LoadSnapshot(dp_rank=1)
    as_map = msgspec.msgpack.decode(encode_frame("prod", snapshot))
    assert list(as_map) == ["instance", "snapshot"]
    assert as_map["instance"] == "prod"
    assert as_map["snapshot"] == msgspec.msgpack.decode(encode_snapshot(snapshot))


def test_newer_writer_keys_are_ignored() -> None:
    snapshot = LoadSnapshot(dp_rank=2, num_waiting_reqs=4)
    as_map = msgspec.msgpack.decode(encode_frame("prod", snapshot))
    newer = msgspec.msgpack.encode({**as_map, "sent_by": "node7", "trace": [1, 2]})
    assert decode_frame(newer) == ("prod", snapshot)


def test_bare_snapshot_has_no_instance() -> None:
    # A writer from before the envelope: decodes, and says it names no instance.
    snapshot = LoadSnapshot(dp_rank=1, num_running_reqs=5)
    head = FrameDecoder().decode_head(encode_snapshot(snapshot))
    assert head.instance is None


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xc1 not msgpack", WireDecodeError),
        (b"", WireDecodeError),
        (msgspec.msgpack.encode(7), WireValidationError),
        (msgspec.msgpack.encode({"instance": 7}), WireValidationError),
        (msgspec.msgpack.encode({"instance": "prod"}), WireValidationError),
        (msgspec.msgpack.encode({"instance": "prod", "snapshot": 3}), WireValidationError),
        (
            msgspec.msgpack.encode({"instance": "prod", "snapshot": {"dp_rank": -1}}),
            WireValidationError,
        ),
        (encode_frame("prod", LoadSnapshot(dp_rank=1))[:-3], WireDecodeError),
    ],
)
def test_bad_frames_raise_the_wire_error_of_their_kind(data: bytes, kind: type[WireError]) -> None:
    # The collector counts undecodable and invalid apart by these two classes alone.
    with pytest.raises(kind):
        decode_frame(data)


@pytest.mark.parametrize("instance", ["a", "x" * 31, "x" * 32, "demo-123", "x" * 64])
def test_overhead_is_exactly_the_envelope(instance: str) -> None:
    snapshot = LoadSnapshot(dp_rank=0, num_running_reqs=1)
    frame = encode_frame(instance, snapshot)
    assert len(frame) - len(encode_snapshot(snapshot)) == frame_overhead_bytes(instance)


def test_head_defaults_are_empty() -> None:
    head = FrameHead()
    assert head.instance is None and len(head.snapshot) == 0
