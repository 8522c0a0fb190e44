"""LoadPublisher cadence and failure isolation, with a fake clock and a fake writer."""

from __future__ import annotations

import logging

import pytest

from loadsnap import LoadSnapshot, ShmReader, ShmWriter, UsageError
from loadsnap.publisher import LoadPublisher, PublishReason
from loadsnap.transport import SnapshotWriter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeWriter:
    def __init__(self) -> None:
        self.published: list[LoadSnapshot] = []
        self.fail = False
        self.closed = False

    def publish(self, snapshot: LoadSnapshot) -> int:
        if self.fail:
            raise OSError("transport down")
        self.published.append(snapshot)
        return len(self.published)

    def close(self) -> None:
        self.closed = True


def make(
    every: int = 15,
    *,
    idle_interval_s: float = 0.05,
    heartbeat_interval_s: float = 1.0,
    log_interval_s: float = 10.0,
) -> tuple[LoadPublisher, FakeWriter, FakeClock, list[int]]:
    writer, clock, built = FakeWriter(), FakeClock(), []

    def provider() -> LoadSnapshot:
        built.append(1)
        return LoadSnapshot(dp_rank=0, cycle=len(built))

    publisher = LoadPublisher(
        writer,
        provider,
        every_n_cycles=every,
        idle_interval_s=idle_interval_s,
        heartbeat_interval_s=heartbeat_interval_s,
        log_interval_s=log_interval_s,
        clock=clock,
    )
    return publisher, writer, clock, built


def test_fake_writer_satisfies_protocol() -> None:
    assert isinstance(FakeWriter(), SnapshotWriter)


def test_publishes_every_n_cycles() -> None:
    publisher, writer, _, built = make(every=4)
    results = [publisher.on_cycle() for _ in range(12)]
    assert results == [False, False, False, True] * 3
    assert len(writer.published) == 3 and len(built) == 3  # provider runs once per publish
    assert publisher.cycles == 12
    assert publisher.stats.by_reason == {"cadence": 3}


def test_prefill_publishes_and_restarts_the_count() -> None:
    publisher, writer, _, _ = make(every=3)
    publisher.on_cycle()
    publisher.on_cycle()
    assert publisher.on_prefill()
    assert [publisher.on_cycle() for _ in range(3)] == [False, False, True]
    assert publisher.stats.by_reason == {"prefill": 1, "cadence": 1}
    assert len(writer.published) == 2


def test_idle_publishes_are_rate_limited() -> None:
    publisher, writer, clock, _ = make(idle_interval_s=0.05, heartbeat_interval_s=1.0)
    assert publisher.on_idle()
    clock.now += 0.01
    assert not publisher.on_idle()  # changed, but too soon
    clock.now += 0.04
    assert publisher.on_idle()
    spins = 0
    for _ in range(1000):  # a busy idle loop over 0.5 s of fake time
        clock.now += 0.0005
        spins += publisher.on_idle()
    assert spins == 10
    assert len(writer.published) == 12


def test_heartbeat_when_nothing_changes() -> None:
    publisher, _, clock, _ = make(idle_interval_s=0.05, heartbeat_interval_s=1.0)
    publisher.on_idle(changed=True)
    published = []
    for _ in range(300):  # 3 s of an unchanged idle state, polled every 10 ms
        clock.now += 0.01
        published.append(publisher.on_idle(changed=False))
    assert sum(published) == 3
    assert publisher.stats.by_reason == {"idle": 1, "heartbeat": 3}


def test_failures_are_isolated_counted_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher, writer, clock, _ = make(every=1, log_interval_s=10.0)
    writer.fail = True
    with caplog.at_level(logging.INFO, logger="loadsnap.publisher"):
        for _ in range(1000):  # 1000 failing publishes over 15.6 s (steps exact in binary)
            clock.now += 1 / 64
            assert publisher.on_cycle() is False
        assert publisher.stats.failures == 1000
        assert publisher.stats.consecutive_failures == 1000
        assert "OSError: transport down" in publisher.stats.last_error
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2  # one per 10 s
        assert "1 consecutive failures" in warnings[0].getMessage()
        assert "641 consecutive failures" in warnings[1].getMessage()
        writer.fail = False
        clock.now += 10.0
        assert publisher.on_cycle()
    assert publisher.stats.consecutive_failures == 0
    assert "recovered after 1000 consecutive failures" in caplog.records[-1].getMessage()


def test_failing_provider_never_raises() -> None:
    writer, clock = FakeWriter(), FakeClock()

    def provider() -> LoadSnapshot:
        raise RuntimeError("provider broke")

    publisher = LoadPublisher(writer, provider, every_n_cycles=1, clock=clock)
    assert not publisher.on_cycle()
    assert not publisher.on_prefill()
    assert not publisher.publish_now()
    assert publisher.stats.failures == 3 and not writer.published


def test_slow_publish_is_counted() -> None:
    writer, clock = FakeWriter(), FakeClock()

    def provider() -> LoadSnapshot:
        clock.now += 0.02  # a 20 ms provider
        return LoadSnapshot(dp_rank=0)

    publisher = LoadPublisher(writer, provider, every_n_cycles=1, clock=clock)
    publisher.publish_now(PublishReason.FORCED)
    assert publisher.stats.slow_publishes == 1
    assert publisher.stats.publish_seconds_total == pytest.approx(0.02)


def test_keyboard_interrupt_is_not_swallowed() -> None:
    def provider() -> LoadSnapshot:
        raise KeyboardInterrupt

    publisher = LoadPublisher(FakeWriter(), provider, clock=FakeClock())
    with pytest.raises(KeyboardInterrupt):
        publisher.publish_now()


@pytest.mark.parametrize(
    "kwargs",
    [{"every_n_cycles": 0}, {"heartbeat_interval_s": 0.0}, {"idle_interval_s": -1.0}],
)
def test_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        LoadPublisher(FakeWriter(), lambda: LoadSnapshot(dp_rank=0), **kwargs)  # type: ignore[arg-type]


def test_publishes_through_shared_memory(instance: str) -> None:
    writer = ShmWriter(instance, 2, 1)
    try:
        publisher = LoadPublisher(
            writer, lambda: LoadSnapshot(dp_rank=1, num_running_reqs=3), every_n_cycles=2
        )
        publisher.on_cycle()
        publisher.on_cycle()
        with ShmReader(instance) as reader:
            read = reader.read(1)
            assert read.snapshot is not None and read.snapshot.num_running_reqs == 3
            assert read.seq == 1
    finally:
        writer.close()
