"""Hypothesis over ZMQ frames: the frame decoder and the collector reject bad frames, count them.

Frames (:mod:`loadsnap.frame` envelopes) are random bytes; envelopes whose keys and values are
hostile (the instance missing, another one, not a string; the snapshot not a map); envelopes
for the collector's instance around msgpack maps with snapshot field names and hostile values;
valid frames for this instance or another; bare snapshots without an envelope; and valid frames
cut short or with bytes flipped. :func:`~loadsnap.frame.decode_frame` may only return or raise
:class:`~loadsnap.WireError`; the collector's per-frame handler (what its receive loop calls for
each frame) never raises, and each frame adds exactly one to ``relayed`` or to one drop reason.
Then the same frames go through a real PUSH socket, and the collector still relays a good peer's
snapshot afterwards. (``tests/fuzz/test_atheris_fuzz.py`` fuzzes the same handler coverage-guided
where atheris installs.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadsnap import LoadSnapshot, MemorySection, WireError, unlink_segment
from loadsnap.collector import DROP_REASONS, Collector, collector_lock_path
from loadsnap.frame import decode_frame, encode_frame
from loadsnap.wire import encode_snapshot
from tests.helpers import report, unique_instance, wait_until

DP_SIZE = 2
CAPACITY = 512
INSTANCE = unique_instance("t") + "-frames"
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
_snapshot_maps = st.dictionaries(
    st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), _hostile, max_size=6
)
_maps = _snapshot_maps.map(lambda m: msgspec.msgpack.encode({"instance": INSTANCE, "snapshot": m}))
_envelopes = st.dictionaries(
    st.one_of(st.sampled_from(("instance", "snapshot")), st.text(max_size=6)),
    st.one_of(_hostile, st.just(INSTANCE), _snapshot_maps),
    max_size=3,
).map(msgspec.msgpack.encode)
_snapshots = st.builds(
    LoadSnapshot,
    dp_rank=st.integers(0, 3),
    num_running_reqs=st.integers(0, 100),
    seq=st.integers(0, 2**40),
    epoch=st.integers(0, 2**40),
    memory=st.none() | st.builds(MemorySection, weight_bytes=st.integers(0, 2**40)),
)
_valid = _snapshots.map(lambda snapshot: encode_frame(INSTANCE, snapshot))
_foreign = st.one_of(
    st.tuples(st.text(min_size=1, max_size=8), _snapshots).map(lambda a: encode_frame(*a)),
    _snapshots.map(encode_snapshot),  # a bare snapshot: no envelope, no instance
)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(_valid))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(frame) - 1))
        frame[i] = draw(st.integers(0, 255))
    return bytes(frame[: draw(st.integers(0, len(frame)))])


frames = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=CAPACITY + 100, max_size=CAPACITY + 164),
    _envelopes,
    _maps,
    _valid,
    _foreign,
    _damaged(),
)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    coll = Collector(INSTANCE, DP_SIZE, "tcp://127.0.0.1:*", payload_capacity=CAPACITY)
    try:
        yield coll
    finally:
        coll.close()
        unlink_segment(INSTANCE)
        lock = collector_lock_path(INSTANCE)
        if os.path.exists(lock):
            os.unlink(lock)


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(frame=frames)
def test_decoder_returns_snapshot_or_wire_error(frame: bytes) -> None:
    try:
        instance, snapshot = decode_frame(frame)
    except WireError:
        return
    assert isinstance(snapshot, LoadSnapshot)
    assert instance is None or isinstance(instance, str)


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
        sock.send(encode_frame(INSTANCE, good))

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
