"""Hypothesis over ZMQ frames: the wire decoder and the collector reject bad frames, count them.

Frames are random bytes, msgpack maps with snapshot field names and hostile values, and valid
snapshots cut short or with bytes flipped. :func:`~loadsnap.wire.decode_snapshot` may only
return a snapshot or raise :class:`~loadsnap.WireError`; the collector's per-frame handler (what
its receive loop calls for each frame) never raises, and each frame adds exactly one to
``relayed`` or to one drop reason. Then the same frames go through a real PUSH socket, and the
collector still relays a good peer's snapshot afterwards. (``tests/test_atheris_fuzz.py`` fuzzes
the same handler coverage-guided where atheris installs.)
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadsnap import LoadSnapshot, MemorySection, WireError, unlink_segment
from loadsnap.collector import DROP_REASONS, Collector, collector_lock_path
from loadsnap.wire import decode_snapshot, encode_snapshot
from tests.test_chaos import report, wait_until

DP_SIZE = 2
CAPACITY = 512
MAX_EXAMPLES = int(os.environ.get("LOADSNAP_FUZZ_EXAMPLES", "300"))
COUNTED = ("relayed", *DROP_REASONS)

_outcomes: dict[str, int] = {}
_frames: list[bytes] = []

_FIELDS = (
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "token_usage",
    "seq",
    "epoch",
    "memory",
    "lora",
)
_hostile = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack can carry
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-(2**63), 2**63), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63), max_size=2),
)
_maps = st.dictionaries(
    st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), _hostile, max_size=6
).map(msgspec.msgpack.encode)
_valid = st.builds(
    LoadSnapshot,
    dp_rank=st.integers(0, 3),
    num_running_reqs=st.integers(0, 100),
    seq=st.integers(0, 2**40),
    epoch=st.integers(0, 2**40),
    memory=st.none() | st.builds(MemorySection, weight_bytes=st.integers(0, 2**40)),
).map(encode_snapshot)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(_valid))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(frame) - 1))
        frame[i] = draw(st.integers(0, 255))
    return bytes(frame[: draw(st.integers(0, len(frame)))])


frames = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=CAPACITY + 1, max_size=CAPACITY + 64),
    _maps,
    _valid,
    _damaged(),
)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    instance = f"t-{os.getpid()}-{uuid.uuid4().hex[:8]}-frames"
    coll = Collector(instance, DP_SIZE, "tcp://127.0.0.1:*", payload_capacity=CAPACITY)
    try:
        yield coll
    finally:
        coll.close()
        unlink_segment(instance)
        lock = collector_lock_path(instance)
        if os.path.exists(lock):
            os.unlink(lock)


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(frame=frames)
def test_decoder_returns_snapshot_or_wire_error(frame: bytes) -> None:
    try:
        snapshot = decode_snapshot(frame)
    except WireError:
        return
    assert isinstance(snapshot, LoadSnapshot)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frame=frames)
def test_each_frame_relayed_or_counted_once(collector: Collector, frame: bytes) -> None:
    stats = collector.stats
    before = [getattr(stats, name) for name in COUNTED]
    collector._handle(frame, time.monotonic_ns())  # the receive loop's step for one frame
    moved = [(name, getattr(stats, name) - old) for name, old in zip(COUNTED, before, strict=True)]
    moved = [(name, delta) for name, delta in moved if delta]
    assert len(moved) == 1 and moved[0][1] == 1, moved
    _outcomes[moved[0][0]] = _outcomes.get(moved[0][0], 0) + 1
    if len(_frames) < 200:
        _frames.append(frame)


def test_collector_keeps_relaying_after_the_fuzzed_frames(collector: Collector) -> None:
    # Runs after the fuzz tests (file order): the same frames over a real socket, then a good one.
    assert collector.running
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    try:
        sock.connect(collector.endpoint)
        received = collector.stats.received
        for frame in _frames:
            sock.send(frame)
        good = LoadSnapshot(dp_rank=1, num_running_reqs=42, seq=2**50, epoch=2**50)
        sock.send(encode_snapshot(good))

        def relayed() -> bool:
            latest: dict[int, Any] = collector.latest()
            return 1 in latest and latest[1].num_running_reqs == 42

        assert wait_until(relayed, 10.0), collector.stats_dict()
        assert collector.stats.received == received + len(_frames) + 1
        assert collector.running
    finally:
        sock.close(linger=0)
        context.term()
    report(
        "zmq_frame_fuzz",
        {"frames_tried": sum(_outcomes.values()), "over_socket": len(_frames) + 1, **_outcomes},
    )
