"""``LoadPublisher``: the component an engine's scheduler loop embeds to publish its load.

Cadence (the reference's, made explicit and testable with a fake clock):

* :meth:`LoadPublisher.on_cycle` after every busy cycle publishes every ``every_n_cycles``-th
  call; the calls in between cost one counter increment and one comparison;
* :meth:`LoadPublisher.on_prefill` publishes at once (a prefill changes the load a lot);
* :meth:`LoadPublisher.on_idle` from an idle loop publishes a change at most once per
  ``idle_interval_s``, and an unchanged state once per ``heartbeat_interval_s`` so that readers
  keep seeing a fresh rank;
* :meth:`LoadPublisher.publish_now` (e.g. the final publish at shutdown) always publishes.

Failure isolation: the provider and the writer run inside ``try``; an exception (a slow or
broken provider, a full transport, an oversized payload) is counted, logged at most once per
``log_interval_s`` with the number of consecutive failures, and the next due publish tries
again. Nothing but ``BaseException``\\s that are not ``Exception`` (KeyboardInterrupt,
SystemExit) ever reaches the scheduler loop.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import msgspec

from loadsnap.errors import UsageError
from loadsnap.schema import LoadSnapshot
from loadsnap.transport import SnapshotWriter

__all__ = [
    "DEFAULT_EVERY_N_CYCLES",
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_IDLE_INTERVAL_S",
    "LoadPublisher",
    "PublishReason",
    "PublisherStats",
]

DEFAULT_EVERY_N_CYCLES = 15
DEFAULT_IDLE_INTERVAL_S = 0.05
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_LOG_INTERVAL_S = 10.0
# A publish (provider plus writer) slower than this is counted as slow.
SLOW_PUBLISH_S = 0.005

_log = logging.getLogger(__name__)


class PublishReason(enum.Enum):
    """Why a snapshot was published."""

    CADENCE = "cadence"
    PREFILL = "prefill"
    IDLE = "idle"
    HEARTBEAT = "heartbeat"
    FORCED = "forced"


class PublisherStats(msgspec.Struct, kw_only=True):
    """Counters of one publisher (read them from the scheduler's thread)."""

    cycles: int = 0
    published: int = 0
    by_reason: dict[str, int] = {}
    failures: int = 0
    consecutive_failures: int = 0
    slow_publishes: int = 0
    publish_seconds_total: float = 0.0
    last_error: str = ""


class LoadPublisher:
    """Publishes an engine's load through any :class:`~loadsnap.transport.SnapshotWriter`.

    Single-threaded: call it from the scheduler loop only. Never raises an ``Exception`` from
    its ``on_*`` methods.

    Parameters
    ----------
    writer:
        The transport (shared memory, ZMQ...).
    provider:
        Builds the current snapshot; called once per publish.
    every_n_cycles:
        Busy-cycle cadence.
    idle_interval_s:
        Minimum time between idle publishes of a changed state.
    heartbeat_interval_s:
        Publish an unchanged idle state this often (keep it under the readers' staleness
        budget).
    log_interval_s:
        At most one failure log line per this interval.
    clock:
        Monotonic seconds (a fake clock in tests).
    logger:
        Where failures go.

    Raises
    ------
    UsageError
        Non-positive cadence or intervals.
    """

    def __init__(
        self,
        writer: SnapshotWriter,
        provider: Callable[[], LoadSnapshot],
        *,
        every_n_cycles: int = DEFAULT_EVERY_N_CYCLES,
        idle_interval_s: float = DEFAULT_IDLE_INTERVAL_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = _log,
    ) -> None:
        if every_n_cycles < 1:
            raise UsageError(f"every_n_cycles must be >= 1: every_n_cycles={every_n_cycles}")
        if idle_interval_s < 0 or heartbeat_interval_s <= 0 or log_interval_s < 0:
            raise UsageError(
                f"intervals must be positive: idle_interval_s={idle_interval_s} "
                f"heartbeat_interval_s={heartbeat_interval_s} log_interval_s={log_interval_s}"
            )
        self.writer = writer
        self.provider = provider
        self.every_n_cycles = every_n_cycles
        self.idle_interval_s = idle_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.log_interval_s = log_interval_s
        self.stats = PublisherStats()
        self._clock = clock
        self._logger = logger
        self._since_publish = 0  # busy cycles since the last publish
        self._last_publish_s = -float("inf")
        self._last_log_s = -float("inf")
        self._unlogged_failures = 0

    # The per-cycle hot path: one increment and one comparison unless a publish is due.
    def on_cycle(self) -> bool:
        """Call after every busy cycle; returns whether it published."""
        self._since_publish += 1
        if self._since_publish < self.every_n_cycles:
            return False
        return self._publish(PublishReason.CADENCE)

    def on_prefill(self) -> bool:
        """Call after a cycle that ran a prefill; always publishes."""
        return self._publish(PublishReason.PREFILL)

    def on_idle(self, changed: bool = True) -> bool:
        """Call from an idle loop; ``changed`` says whether the load moved since the last
        publish. Publishes a change at most every ``idle_interval_s`` and an unchanged state
        every ``heartbeat_interval_s``."""
        elapsed = self._clock() - self._last_publish_s
        if changed and elapsed >= self.idle_interval_s:
            return self._publish(PublishReason.IDLE)
        if elapsed >= self.heartbeat_interval_s:
            return self._publish(PublishReason.HEARTBEAT)
        return False

    def publish_now(self, reason: PublishReason = PublishReason.FORCED) -> bool:
        """Publish regardless of cadence (e.g. the final publish before shutdown)."""
        return self._publish(reason)

    @property
    def cycles(self) -> int:
        """Busy cycles seen (counted lazily: exact after each publish and on read)."""
        return self.stats.cycles + self._since_publish

    def _publish(self, reason: PublishReason) -> bool:
        stats = self.stats
        stats.cycles += self._since_publish
        self._since_publish = 0
        start = self._clock()
        self._last_publish_s = start
        try:
            self.writer.publish(self.provider())
        except Exception as exc:
            self._on_failure(exc, start)
            return False
        elapsed = self._clock() - start
        stats.publish_seconds_total += elapsed
        if elapsed > SLOW_PUBLISH_S:
            stats.slow_publishes += 1
        stats.published += 1
        stats.by_reason[reason.value] = stats.by_reason.get(reason.value, 0) + 1
        if stats.consecutive_failures:
            self._maybe_log(
                start,
                logging.INFO,
                f"load publish recovered after {stats.consecutive_failures} consecutive failures",
            )
            stats.consecutive_failures = 0
        return True

    def _on_failure(self, exc: Exception, now: float) -> None:
        stats = self.stats
        stats.failures += 1
        stats.consecutive_failures += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        self._unlogged_failures += 1
        self._maybe_log(
            now,
            logging.WARNING,
            f"load publish failed: {stats.consecutive_failures} consecutive failures "
            f"({stats.failures} total, {self._unlogged_failures} since last log): "
            f"{stats.last_error}",
        )

    def _maybe_log(self, now: float, level: int, message: str) -> None:
        if now - self._last_log_s < self.log_interval_s:
            return
        self._last_log_s = now
        self._unlogged_failures = 0
        self._logger.log(level, message)
