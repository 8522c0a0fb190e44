"""Handshake failures: what libzmq reports (real sockets), how they are named, logged, limited."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from loadsnap._handshake import HandshakeWatch, WarnLimiter, describe_failure
from loadsnap.curve import curve_available
from tests.helpers import report

Context = zmq.Context[zmq.Socket[bytes]]
WAIT_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_warn_limiter_one_per_key_per_interval_and_counts_held_back() -> None:
    clock = FakeClock()
    limiter = WarnLimiter(10.0, clock)
    assert limiter.allow(("auth", "10.0.0.1")) == 0
    assert limiter.allow(("auth", "10.0.0.1")) is None
    assert limiter.allow(("auth", "10.0.0.1")) is None
    assert limiter.allow(("auth", "10.0.0.2")) == 0  # another peer has its own budget
    clock.now += 9.999
    assert limiter.allow(("auth", "10.0.0.1")) is None
    clock.now += 0.001
    assert limiter.allow(("auth", "10.0.0.1")) == 3  # the three held back since the last
    assert limiter.allow(("auth", "10.0.0.1")) is None


def test_describe_failure_names_each_case() -> None:
    auth = describe_failure(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, server=False, curve=True)
    assert auth.kind == "auth_rejected" and "allow-list" in auth.detail and "400" in auth.detail
    mismatch = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    plain_peer = describe_failure(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, mismatch, server=True, curve=True
    )
    assert plain_peer.kind == "handshake_failed" and "no CURVE keys" in plain_peer.detail
    crypto = describe_failure(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC,
        server=True,
        curve=True,
    )
    assert "another server public key" in crypto.detail
    epipe = describe_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, server=False, curve=True)
    assert "EPIPE" in epipe.detail and "LOADSNAP_CURVE_SERVER_KEY" in epipe.detail
    other = describe_failure(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0x1234, server=True, curve=True)
    assert other.kind == "handshake_failed" and "0x1234" in other.detail


def test_watch_logs_once_per_burst(context: Context, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    failures: list[int] = []
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    logger = logging.getLogger("loadsnap.test_watch")
    watch = HandshakeWatch(
        sock, logger, curve=True, on_failure=lambda: failures.append(1), clock=clock
    )
    try:
        caplog.set_level(logging.INFO, logger="loadsnap.test_watch")
        endpoint = "tcp://127.0.0.1:9"
        for _ in range(5):
            watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, endpoint)
        clock.now += 60.0
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, endpoint)
        watch.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0, endpoint)
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, endpoint)
    finally:
        watch.stop()
        sock.close(linger=0)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            "WARNING",
            "CURVE handshake with tcp://127.0.0.1:9 failed: the collector rejected this writer's "
            "key (ZAP status 400): the key is not on its allow-list (clients/*.key)",
        ),
        (
            "WARNING",
            "CURVE handshake with tcp://127.0.0.1:9 still failing (6 attempts): the collector "
            "rejected this writer's key (ZAP status 400): the key is not on its allow-list "
            "(clients/*.key)",
        ),
        ("INFO", "CURVE handshake with tcp://127.0.0.1:9 succeeded after 6 failed"),
        (
            "WARNING",
            "CURVE handshake with tcp://127.0.0.1:9 failed: the collector closed the connection "
            "during the CURVE handshake (errno=EPIPE); usually a wrong server public key "
            "(LOADSNAP_CURVE_SERVER_KEY)",
        ),
    ]
    assert len(failures) == 7


def test_watch_thread_stops_with_its_socket(context: Context) -> None:
    before = {t.ident for t in threading.enumerate()}
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    watch = HandshakeWatch(sock, logging.getLogger("x"), curve=False, on_failure=lambda: None)
    started = [t for t in threading.enumerate() if t.ident not in before]
    assert [t.name for t in started] == ["loadsnap-zmq-watch"]
    watch.stop()
    sock.close(linger=0)
    assert not started[0].is_alive()


# --- what libzmq reports, measured -------------------------------------------------------------


def _events(
    monitor: zmq.Socket[bytes], until: int, timeout_s: float = WAIT_S
) -> list[tuple[int, int]]:
    """``(event, value)`` from the monitor until an event of kind ``until`` arrived (bounded)."""
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (not seen or seen[-1][0] != until):
        if monitor.poll(50):
            event = recv_monitor_message(monitor)
            seen.append((event["event"], event["value"]))
    return seen


def _pull(context: Context, max_bytes: int, keys: tuple[bytes, bytes] | None) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys[1])
    sock.bind("tcp://127.0.0.1:*")
    return sock


def _push(context: Context, endpoint: str, server_key: bytes | None) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    if server_key is not None:
        public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.connect(endpoint)
    return sock


def test_oversized_frame_is_a_plain_disconnect(context: Context) -> None:
    # libzmq cuts a peer off for a frame above MAXMSGSIZE and reports only DISCONNECTED, as
    # for a peer that went away: nothing tells the two apart, hence the writer-side refusal.
    pull = _pull(context, 1000, None)
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = pull.get_monitor_socket()
    push = _push(context, endpoint, None)
    try:
        handshake = _events(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        assert handshake[-1][0] == zmq.EVENT_HANDSHAKE_SUCCEEDED, handshake
        push.send(b"x" * 999)
        assert pull.poll(2000) and len(pull.recv()) == 999
        push.send(b"x" * 1001)
        seen = _events(monitor, zmq.EVENT_DISCONNECTED)
        assert [event for event, _ in seen] == [zmq.EVENT_DISCONNECTED], seen
        assert not pull.poll(100)  # the frame never arrives
    finally:
        pull.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        pull.close(linger=0)
    report("libzmq_oversized", {"events_after_oversized_frame": ["DISCONNECTED"]})


@pytest.mark.skipif(not curve_available(), reason="libzmq built without CURVE")
def test_wrong_server_key_is_a_cryptographic_error_on_the_server(context: Context) -> None:
    server = zmq.curve_keypair()
    pull = _pull(context, 1000, server)
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = pull.get_monitor_socket()
    wrong_server_public, _ = zmq.curve_keypair()
    push = _push(context, endpoint, wrong_server_public)
    try:
        seen = _events(monitor, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        failed = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
        assert seen[-1] == failed, seen
    finally:
        pull.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        pull.close(linger=0)
