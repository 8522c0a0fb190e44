"""The reference scheduler process: one per DP rank, ZMQ in, ZMQ out, load published each cycle.

Main loop, one cycle at a time (single thread):

1. drain the PULL socket (waiting up to ``idle_poll_s`` only when there is nothing to run):
   a :class:`~scheduler.messages.Request` is counted and queued at once (so the next snapshot
   acknowledges its ``dispatch_seq``), a :class:`~scheduler.messages.Control` is answered with a
   :class:`~scheduler.messages.ControlReply`; undecodable frames are counted and dropped;
2. plan one step, run it on the executor, apply it; finished requests go back to the controller
   as :class:`~scheduler.messages.Finished` over the PUSH socket (never blocking: a full socket
   keeps them in an outbox that is retried every cycle);
3. tell the :class:`~loadsnap.LoadPublisher` what kind of cycle it was.

SIGTERM and SIGINT set a flag; the loop ends after the current step, publishes a final
snapshot, closes the writer (the last writer of a segment unlinks it) and the sockets. A
crashed process leaves a slot whose writer is dead: the next start on that rank reclaims it
(``ShmWriter`` checks the recorded writer's liveness), and an ``ipc://`` endpoint is rebound.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

import zmq

from loadsnap.errors import WireError
from loadsnap.publisher import (
    DEFAULT_EVERY_N_CYCLES,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_IDLE_INTERVAL_S,
    LoadPublisher,
    PublishReason,
)
from loadsnap.schema import LoadSnapshot
from loadsnap.transport import SnapshotWriter, make_writer
from scheduler.engine import BatchEngine, EngineConfig, StepKind
from scheduler.executor_registry import make_executor
from scheduler.executors import CostModel, Executor, TorchConfig
from scheduler.messages import (
    Control,
    ControlReply,
    Finished,
    Request,
    decode_to_scheduler,
    encode_message,
)

__all__ = ["SchedulerOptions", "SchedulerProcess", "run_scheduler"]

_log = logging.getLogger(__name__)

MAX_DRAIN_PER_CYCLE: Final[int] = 1024
MAX_OUTBOX: Final[int] = 100_000
BAD_FRAME_LOG_INTERVAL_S: Final[float] = 10.0


@dataclass(slots=True)
class SchedulerOptions:
    """Everything one scheduler process needs (the CLI fills it)."""

    instance: str
    dp_size: int
    dp_rank: int
    request_addr: str
    result_addr: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    executor: str = "sim"
    cost: CostModel = field(default_factory=CostModel)
    torch: TorchConfig = field(default_factory=TorchConfig)
    transport: str | None = None
    shm_dir: str | None = None
    transport_options: dict[str, str] = field(default_factory=dict)
    publish_every: int = DEFAULT_EVERY_N_CYCLES
    idle_publish_interval_s: float = DEFAULT_IDLE_INTERVAL_S
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    idle_poll_s: float = 0.02  # longest wait for a message when there is nothing to run


class SchedulerProcess:
    """One DP rank's scheduler. Single-threaded; :meth:`stop` is safe from a signal handler.

    Parameters
    ----------
    options:
        Addresses, limits, executor and publishing cadence.
    writer:
        A ready writer (tests); default: ``make_writer`` with the options' transport.
    executor:
        A ready executor (tests); default: ``make_executor(options.executor)``.
    clock_ns:
        Monotonic nanoseconds.

    Raises
    ------
    UsageError, ImportError, LoadsnapError, zmq.ZMQError
        Bad options, the torch extra missing, the writer or a socket cannot be set up.
    """

    def __init__(
        self,
        options: SchedulerOptions,
        *,
        writer: SnapshotWriter | None = None,
        executor: Executor | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.options = options
        self._clock_ns = clock_ns
        self.engine = BatchEngine(options.engine, options.dp_rank, start_ns=clock_ns())
        capacity = options.engine.max_total_num_tokens
        self.executor = executor or make_executor(
            options.executor, kv_capacity=capacity, cost=options.cost, torch_config=options.torch
        )
        self._stop = False
        self.bad_frames = 0
        self._last_bad_log_s = -float("inf")
        self._outbox: deque[bytes] = deque()
        self.dropped_results = 0
        self._ctx = zmq.Context()
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            self._pull.bind(options.request_addr)
            self._push = self._ctx.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 0)
            self._push.connect(options.result_addr)
            self.writer = writer or self._make_writer()
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self.publisher = LoadPublisher(
            self.writer,
            self._snapshot,
            every_n_cycles=options.publish_every,
            idle_interval_s=options.idle_publish_interval_s,
            heartbeat_interval_s=options.heartbeat_interval_s,
        )
        self._published_version = -1
        self._ran_last_cycle = False

    def _make_writer(self) -> SnapshotWriter:
        opts = self.options
        extra: dict[str, Any] = dict(opts.transport_options)
        return make_writer(
            opts.instance,
            opts.dp_size,
            opts.dp_rank,
            transport=opts.transport,
            shm_dir=opts.shm_dir,
            **extra,
        )

    def _snapshot(self) -> LoadSnapshot:
        self._published_version = self.engine.version
        return self.engine.snapshot(self._clock_ns(), self.executor.memory_section())

    def stop(self, *_: object) -> None:
        """Ask the loop to end after the current step (signal-handler safe)."""
        self._stop = True

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to :meth:`stop` (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Serve until :meth:`stop`; always publishes a final snapshot and closes everything.

        Returns the exit status (0)."""
        try:
            while not self._stop:
                self.run_cycle()
        finally:
            self.close()
        return 0

    def run_cycle(self) -> None:
        """One loop iteration: drain, step (if any), publish."""
        engine = self.engine
        # Wait for messages only when the last cycle found nothing to run (idle, paused, or
        # nothing admissible): a busy loop never sleeps here, an idle one never spins.
        self._drain(0 if self._ran_last_cycle else self.options.idle_poll_s)
        self._flush_outbox()
        plan = engine.schedule(self._clock_ns(), with_slots=self.executor.needs_slots)
        self._ran_last_cycle = plan is not None
        if plan is None:
            self.publisher.on_idle(changed=engine.version != self._published_version)
            return
        result = self.executor.execute(plan)
        for finished in engine.complete(plan, result, self._clock_ns()):
            self._send(finished)
        if plan.kind is StepKind.PREFILL:
            self.publisher.on_prefill()
        else:
            self.publisher.on_cycle()

    def _drain(self, timeout_s: float) -> None:
        if timeout_s > 0 and not self._pull.poll(int(timeout_s * 1000)):
            return
        for _ in range(MAX_DRAIN_PER_CYCLE):
            try:
                frame = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle_frame(frame)

    def _handle_frame(self, frame: bytes) -> None:
        try:
            message = decode_to_scheduler(frame)
        except WireError as exc:
            self.bad_frames += 1
            now = time.monotonic()
            if now - self._last_bad_log_s >= BAD_FRAME_LOG_INTERVAL_S:
                self._last_bad_log_s = now
                _log.warning("dropped %d bad frame(s) so far: %s", self.bad_frames, exc)
            return
        if isinstance(message, Request):
            rejected = self.engine.add_request(message, self._clock_ns())
            if rejected is not None:
                self._send(rejected)
        else:
            self._send(self._control(message))

    def _control(self, message: Control) -> ControlReply:
        engine, rank = self.engine, self.options.dp_rank
        command = message.command
        if command == "ping":
            detail = f"pong cycle={engine.cycle} ack={engine.last_accepted_dispatch_seq}"
        elif command == "flush_cache":
            detail = f"freed_tokens={engine.flush_cache()}"
        elif command == "pause":
            engine.pause()
            detail = "paused"
        elif command == "resume":
            engine.resume()
            detail = "resumed"
        else:
            return ControlReply(
                command_id=message.command_id, dp_rank=rank, ok=False, detail=f"unknown {command=}"
            )
        return ControlReply(command_id=message.command_id, dp_rank=rank, ok=True, detail=detail)

    def _send(self, message: Finished | ControlReply) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self.dropped_results += 1
            return
        self._outbox.append(encode_message(message))
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                self._push.send(outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            outbox.popleft()

    def close(self) -> None:
        """Final publish, then release the writer and the sockets. Idempotent."""
        if self._ctx.closed:
            return
        try:
            self._flush_outbox()
            self.publisher.publish_now(PublishReason.FORCED)
        finally:
            try:
                self.writer.close()
            finally:
                self._ctx.destroy(linger=0)


def run_scheduler(options: SchedulerOptions) -> int:
    """Build a :class:`SchedulerProcess`, install the signal handlers and run it."""
    process = SchedulerProcess(options)
    process.install_signal_handlers()
    return process.run()
