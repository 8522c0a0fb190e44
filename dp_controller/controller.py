"""``Controller``: dispatches requests to DP schedulers over ZMQ and collects their results.

Topology (``scheduler.messages``): one PUSH per scheduler, connected to the scheduler's request
address (one ordered pipe per rank: requests and controls of a rank arrive in send order); one
PULL bound at the result address, to which every scheduler connects a PUSH.

Nothing here blocks without a bound: sends use ``NOBLOCK`` (a full pipe queues the message in
a per-rank backlog, flushed in order, so dispatch sequences stay gap-free), every receive waits
on ``poll`` with a timeout, sockets use ``linger=0``. The control fan-out gives each rank its own
deadline, keeps at most ``max_concurrency`` commands in flight, and returns a per-rank result,
so one hung scheduler costs the call at most its timeout.

Every request ends in exactly one result from :meth:`Controller.poll`. The controller keeps
``rid -> (dispatch_seq, ...)`` per rank for the requests in flight, and talks to its dispatcher
through the :class:`~dp_controller.dispatching.Dispatcher` protocol only. Once per dispatcher
refresh (never per request) it asks which ranks were lost (:meth:`Dispatcher.changes`): a rank
seen dead (its writer is gone) or with a new epoch (a restarted process lost what the old one
held) has every request in flight on it reported as a ``Finished(status="failed",
reason=...)`` (:class:`FailureReason`), on the same path as the schedulers' results. Results
already delivered are drained first, so a request finished just before its scheduler died is
reported finished; the rank's request socket is then replaced, so what still waited in the pipe
is dropped instead of being served by a restarted process. A scheduler's result that arrives
after its request was reported failed (it was in transit) is dropped and counted in
``late_results``: no request is reported twice. A result is matched on ``(dp_rank, rid,
dispatch_seq)``, so another controller's result is never taken for one of ours
(``unknown_results``). The baselines report no lost ranks (``dp_controller.baselines``).

Every request is dispatched with its ``max_new_tokens``, and every result, the scheduler's or
one the controller made for a dead or restarted rank, is reported back to the dispatcher
(:meth:`Dispatcher.complete`) the moment it is taken: the ``length_aware`` policy counts what
is outstanding per rank from these, not from snapshots.

Taking over: a new controller against running schedulers (the previous one crashed or closed)
has its dispatcher continue each rank's numbering after the scheduler's
``last_accepted_dispatch_seq`` at start (:meth:`Dispatcher.take_over`), so the schedulers'
contiguous acknowledgements cover the new requests at once instead of running ahead of a ledger that
restarted at 1.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import zmq

from dp_controller.dispatching import Clock, Dispatch, Dispatcher, RankChanges, monotonic_clock
from dp_controller.workload import TraceRequest
from loadsnap.errors import TransportError, UsageError
from scheduler.messages import (
    Control,
    ControlReply,
    Finished,
    Request,
    decode_to_controller,
    encode_message,
)

__all__ = [
    "ControlOutcome",
    "ControlResult",
    "Controller",
    "FailureReason",
    "RankControlResult",
    "TraceRun",
    "imbalance",
]

log = logging.getLogger("dp_controller")

_NS = 1_000_000_000
DEFAULT_SNDHWM = 10_000
# Requests reported failed that are remembered to tell a late result from an unknown one.
MAX_REMEMBERED_FAILURES = 65_536


class FailureReason(enum.Enum):
    """Why the controller reported a request failed (``Finished.reason``)."""

    RANK_DEAD = "rank_dead"  # the scheduler process is gone (its writer is dead)
    RANK_RESTARTED = "rank_restarted"  # a new epoch: the old process's requests are gone


# A request in flight: (dispatch_seq, prompt length, dispatch time in ns).
_InFlight = tuple[int, int, int]


class ControlOutcome(enum.Enum):
    """How one rank answered a control command."""

    OK = "ok"
    FAILED = "failed"  # the scheduler answered ok=False
    TIMEOUT = "timeout"  # no answer within the per-rank timeout
    NOT_SENT = "not_sent"  # the rank's pipe is backed up; the command was not delivered


class RankControlResult(msgspec.Struct, frozen=True):
    """One rank's part of a control fan-out."""

    dp_rank: int
    outcome: ControlOutcome
    detail: str = ""
    latency_s: float | None = None


class ControlResult(msgspec.Struct, frozen=True):
    """The aggregated answer of :meth:`Controller.control`, one entry per rank in rank order."""

    command: str
    command_id: int
    ranks: list[RankControlResult]

    @property
    def ok(self) -> bool:
        """True when every rank answered ok."""
        return all(r.outcome is ControlOutcome.OK for r in self.ranks)

    def failed_ranks(self) -> list[int]:
        """Ranks that did not answer ok (failed, timed out or not sent)."""
        return [r.dp_rank for r in self.ranks if r.outcome is not ControlOutcome.OK]


@dataclass(slots=True)
class TraceRun:
    """What :meth:`Controller.run_trace` observed."""

    dispatched: int
    finished: list[Finished]  # every result, failed ones included (``status``)
    unfinished: int
    duration_s: float
    # (seconds since start, outstanding requests per rank), sampled while anything is outstanding
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    # the same, taken right after each batch of dispatches (what the policy decided)
    dispatch_samples: list[tuple[float, list[int]]] = field(default_factory=list)
    failed: int = 0  # results whose status is not ok


def imbalance(
    samples: Sequence[tuple[float, Sequence[int]]], min_mean: float = 2.0
) -> tuple[float, float]:
    """Mean and maximum over samples of ``max / mean`` outstanding per rank (1.0 = perfect).

    Only samples whose mean outstanding per rank is at least ``min_mean`` count: with fewer
    requests than ranks even a perfect spread has ``max / mean > 1``.
    """
    ratios = []
    for _, counts in samples:
        total = sum(counts)
        if total > 0 and total >= min_mean * len(counts):
            ratios.append(max(counts) * len(counts) / total)
    if not ratios:
        return 1.0, 1.0
    return sum(ratios) / len(ratios), max(ratios)


class Controller:
    """Owns the sockets to every scheduler. Single owner; not thread-safe.

    Every submitted request ends in exactly one result from :meth:`poll`: the scheduler's
    ``Finished``, or, when its rank dies or restarts first, a ``Finished`` with
    ``status="failed"`` and a :class:`FailureReason` value in ``reason`` (dead and restarted
    ranks are those the dispatcher reports; the baselines report none). A controller started
    against running schedulers continues their dispatch numbering (module docstring).

    Parameters
    ----------
    dispatcher:
        Chooses ranks (any :class:`~dp_controller.dispatching.Dispatcher`: the budget, a
        baseline, ...); best new: the controller has it take over each rank's numbering at
        start (:meth:`Dispatcher.take_over`).
    request_addrs:
        One ZMQ address per rank, where that rank's scheduler binds its request PULL.
    result_addr:
        Where this controller binds its PULL for results and control replies.
    context:
        ZMQ context to use (default: a new one, terminated by :meth:`close`).
    send_hwm:
        Per-rank send high-water mark; beyond it messages wait in an ordered backlog.
    clock:
        Monotonic nanoseconds (stamped into requests as ``dispatched_mono_ns``).

    Raises
    ------
    UsageError
        The number of request addresses differs from ``dispatcher.dp_size``.
    TransportError
        The result address cannot be bound (``addr=`` in the message).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        request_addrs: Sequence[str],
        result_addr: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        send_hwm: int = DEFAULT_SNDHWM,
        clock: Clock = monotonic_clock,
    ) -> None:
        if len(request_addrs) != dispatcher.dp_size:
            raise UsageError(
                f"one request address per rank: addrs={len(request_addrs)} "
                f"dp_size={dispatcher.dp_size}"
            )
        self.dispatcher = dispatcher
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self._clock = clock
        self._pushes: list[zmq.Socket[bytes]] = []
        self._pull: zmq.Socket[bytes] | None = None
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            try:
                self._pull.bind(result_addr)
            except zmq.ZMQError as exc:
                raise TransportError(
                    f"cannot bind result socket: {exc} (addr={result_addr})"
                ) from exc
            for addr in request_addrs:
                self._pushes.append(self._connect(addr, send_hwm))
        except BaseException:
            self.close()
            raise
        self.result_addr = result_addr
        self.request_addrs = list(request_addrs)
        self._send_hwm = send_hwm
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        n = dispatcher.dp_size
        self._backlog: list[deque[bytes]] = [deque() for _ in range(n)]
        self._rids = itertools.count()
        self._command_ids = itertools.count(1)
        self._finished: list[Finished] = []
        self._replies: list[ControlReply] = []
        self.outstanding = [0] * n  # dispatched and not finished (nor reported failed), per rank
        self.dispatched = [0] * n  # requests this controller sent, per rank (a counter)
        self._inflight: list[dict[int, _InFlight]] = [{} for _ in range(n)]
        self._failed: dict[int, tuple[int, int]] = {}  # rid -> (rank, seq), the latest failures
        self.bad_messages = 0
        self.stray_replies = 0
        self.failed_requests = 0  # reported failed by this controller (dead or restarted rank)
        self.late_results = 0  # a scheduler's result for a request already reported failed
        self.unknown_results = 0  # a result for no request of ours (e.g. a previous controller's)
        # Per rank, the acknowledged sequence this controller's numbering continued after.
        self.takeover_seqs = [0] * n
        try:
            self._take_over()
        except BaseException:
            self.close()
            raise

    def _connect(self, addr: str, send_hwm: int) -> zmq.Socket[bytes]:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, send_hwm)
        push.connect(addr)
        return push

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket (linger 0) and the context if this controller made it."""
        for sock in self._pushes:
            sock.close(linger=0)
        self._pushes = []
        if self._pull is not None:
            self._pull.close(linger=0)
            self._pull = None
        if self._own_context:
            self._ctx.term()
            self._own_context = False

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dp_size(self) -> int:
        """Number of ranks."""
        return len(self.outstanding)

    # --- rank watch -------------------------------------------------------------------------

    def _take_over(self) -> None:
        """Continue each rank's numbering after what its scheduler already acknowledged."""
        self.takeover_seqs = self.dispatcher.take_over()
        if any(self.takeover_seqs):
            log.info("continuing dispatch numbering: after=%s", self.takeover_seqs)

    def _watch(self, changes: RankChanges) -> None:
        """Fail what the ranks the dispatcher reports dead or restarted held."""
        dead = changes.dead
        lost = dead | changes.restarted
        ranks = [r for r in sorted(lost) if 0 <= r < self.dp_size and self._inflight[r]]
        if not ranks:
            return
        # Results already delivered count as finished: take them before declaring the rest.
        self._drain()
        for rank in ranks:
            reason = FailureReason.RANK_DEAD if rank in dead else FailureReason.RANK_RESTARTED
            self._fail_rank(rank, reason)

    def _fail_rank(self, rank: int, reason: FailureReason) -> None:
        pending = self._inflight[rank]
        if not pending:
            return
        now = self._clock()
        failed, out = self._failed, self._finished
        complete = self.dispatcher.complete
        for rid, (seq, prompt_len, t0) in pending.items():
            complete(rank, seq)
            out.append(
                Finished(
                    rid=rid,
                    dp_rank=rank,
                    dispatch_seq=seq,
                    prompt_len=prompt_len,
                    output_len=0,
                    cached_tokens=0,
                    queue_time_s=0.0,
                    ttft_s=0.0,
                    e2e_s=max(0, now - t0) / _NS,
                    status="failed",
                    reason=reason.value,
                )
            )
            failed[rid] = (rank, seq)
        while len(failed) > MAX_REMEMBERED_FAILURES:
            del failed[next(iter(failed))]
        count = len(pending)
        pending.clear()
        # What still waits in the pipe was just reported failed: a new socket drops it, so a
        # restarted process does not serve it (its result would only be dropped as late).
        self._backlog[rank].clear()
        self._pushes[rank].close(linger=0)
        self._pushes[rank] = self._connect(self.request_addrs[rank], self._send_hwm)
        self.outstanding[rank] -= count
        self.failed_requests += count
        log.warning(
            "reported in-flight requests failed: dp_rank=%d count=%d reason=%s",
            rank,
            count,
            reason.value,
        )

    def _take_result(self, message: Finished) -> None:
        rank, rid = message.dp_rank, message.rid
        entry = self._inflight[rank].get(rid) if rank < self.dp_size else None
        if entry is None or entry[0] != message.dispatch_seq:
            if self._failed.get(rid) == (rank, message.dispatch_seq):
                self.late_results += 1
            else:
                self.unknown_results += 1
            return
        del self._inflight[rank][rid]
        self.outstanding[rank] -= 1
        self.dispatcher.complete(rank, message.dispatch_seq)
        self._finished.append(message)

    # --- sending ----------------------------------------------------------------------------

    def _send(self, rank: int, data: bytes) -> bool:
        backlog = self._backlog[rank]
        if backlog:
            self._flush(rank)
            if backlog:
                backlog.append(data)
                return False
        try:
            self._pushes[rank].send(data, zmq.NOBLOCK)
        except zmq.Again:
            backlog.append(data)
            return False
        return True

    def _flush(self, rank: int) -> None:
        backlog, push = self._backlog[rank], self._pushes[rank]
        while backlog:
            try:
                push.send(backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            backlog.popleft()

    def backlog_sizes(self) -> list[int]:
        """Messages per rank waiting for room in their pipe."""
        return [len(b) for b in self._backlog]

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        rank: int | None = None,
        est_tokens: int | None = None,
    ) -> tuple[int, Dispatch]:
        """Dispatch one tokenized request; return its ``rid`` and the decision.

        Parameters
        ----------
        prompt:
            Token ids.
        max_new_tokens:
            Output limit (>= 1).
        rank:
            Pin the request to this rank (it still counts in the budget).
        est_tokens:
            Budget estimate; default ``len(prompt) + max_new_tokens``.

        Raises
        ------
        UsageError
            ``max_new_tokens`` < 1 or ``rank`` out of range.
        """
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1: max_new_tokens={max_new_tokens}")
        if rank is not None and not 0 <= rank < self.dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self.dp_size}")
        est = len(prompt) + max_new_tokens if est_tokens is None else est_tokens
        decision = self.dispatcher.dispatch(est, rank, max_new_tokens=max_new_tokens)
        changes = self.dispatcher.changes()
        if changes is not None:
            self._watch(changes)  # before this request is in flight: it went to the live process
        rid = next(self._rids)
        now = self._clock()
        request = Request(
            rid=rid,
            dispatch_seq=decision.seq,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            dispatched_mono_ns=now,
            pinned=rank is not None,
        )
        self._send(decision.rank, encode_message(request))
        self._inflight[decision.rank][rid] = (decision.seq, len(prompt), now)
        self.outstanding[decision.rank] += 1
        self.dispatched[decision.rank] += 1
        return rid, decision

    def in_flight(self, rank: int) -> list[int]:
        """The rids dispatched to ``rank`` with no result yet, oldest first."""
        return list(self._inflight[rank])

    # --- receiving --------------------------------------------------------------------------

    def _receive(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for one message, drain what is ready, then watch the ranks
        (the dispatcher refreshes if its interval passed); True if any message came."""
        if self._pull is None:
            raise UsageError("controller is closed")
        for rank, backlog in enumerate(self._backlog):
            if backlog:
                self._flush(rank)
        got = bool(self._poller.poll(max(0, int(timeout_s * 1000)))) and self._drain()
        changes = self.dispatcher.changes(refresh=True)
        if changes is not None:
            self._watch(changes)
        return got

    def _drain(self) -> bool:
        """Take every message that is ready, without waiting; True if any."""
        pull = self._pull
        if pull is None:
            return False
        got = False
        while True:
            try:
                data = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return got
            got = True
            try:
                message = decode_to_controller(data)
            except (msgspec.DecodeError, UnicodeDecodeError):
                self.bad_messages += 1
                continue
            if isinstance(message, Finished):
                self._take_result(message)
            else:
                self._replies.append(message)

    def poll(self, timeout_s: float = 0.0) -> list[Finished]:
        """Results so far, waiting up to ``timeout_s`` if there are none.

        Each submitted request appears exactly once: its scheduler's ``Finished``, or one made
        by the controller with ``status="failed"`` and ``reason`` set (a
        :class:`FailureReason` value) when its rank died or restarted first.

        Raises
        ------
        UsageError
            The controller is closed.
        """
        if not self._finished:
            self._receive(timeout_s)
        else:
            self._receive(0)
        out, self._finished = self._finished, []
        return out

    # --- control fan-out --------------------------------------------------------------------

    def control(
        self,
        command: str,
        args: dict[str, str] | None = None,
        *,
        timeout_s: float = 1.0,
        max_concurrency: int = 16,
        ranks: Sequence[int] | None = None,
    ) -> ControlResult:
        """Send ``command`` to every scheduler and gather one result per rank.

        At most ``max_concurrency`` ranks have the command in flight at once; each rank gets
        ``timeout_s`` from its own send. Finished requests that arrive meanwhile are kept for
        :meth:`poll`. Never raises for a rank's failure: it is in that rank's result.

        Raises
        ------
        UsageError
            ``timeout_s`` or ``max_concurrency`` not positive.
        """
        if not (timeout_s > 0 and max_concurrency >= 1):
            raise UsageError(
                f"need timeout_s > 0 and max_concurrency >= 1: timeout_s={timeout_s} "
                f"max_concurrency={max_concurrency}"
            )
        command_id = next(self._command_ids)
        data = encode_message(Control(command_id=command_id, command=command, args=args or {}))
        todo = deque(range(self.dp_size) if ranks is None else ranks)
        sent_at: dict[int, int] = {}
        results: dict[int, RankControlResult] = {}
        timeout_ns = int(timeout_s * _NS)
        while todo or sent_at:
            while todo and len(sent_at) < max_concurrency:
                rank = todo.popleft()
                if self._send(rank, data):
                    sent_at[rank] = time.monotonic_ns()
                else:
                    self._backlog[rank].pop()  # do not deliver a command we report as not sent
                    results[rank] = RankControlResult(
                        rank, ControlOutcome.NOT_SENT, "request pipe backed up"
                    )
            now = time.monotonic_ns()
            for rank, t0 in list(sent_at.items()):
                if now - t0 >= timeout_ns:
                    del sent_at[rank]
                    results[rank] = RankControlResult(
                        rank, ControlOutcome.TIMEOUT, f"no reply within timeout_s={timeout_s}"
                    )
            if not sent_at:
                continue
            wait_ns = min(t0 + timeout_ns for t0 in sent_at.values()) - now
            self._receive(wait_ns / _NS)
            replies, self._replies = self._replies, []
            now = time.monotonic_ns()
            for reply in replies:
                t0 = sent_at.pop(reply.dp_rank, -1) if reply.command_id == command_id else -1
                if t0 < 0:
                    self.stray_replies += 1  # a late answer to an earlier command
                    continue
                outcome = ControlOutcome.OK if reply.ok else ControlOutcome.FAILED
                results[reply.dp_rank] = RankControlResult(
                    reply.dp_rank, outcome, reply.detail, (now - t0) / _NS
                )
        return ControlResult(command, command_id, [results[r] for r in sorted(results)])

    # --- trace replay -----------------------------------------------------------------------

    def run_trace(
        self,
        trace: Sequence[TraceRequest],
        *,
        drain_timeout_s: float = 30.0,
        sample_interval_s: float = 0.005,
    ) -> TraceRun:
        """Replay ``trace`` in real time, then wait for its requests to finish.

        Samples outstanding requests per rank every ``sample_interval_s`` (for
        :func:`imbalance`). Stops waiting ``drain_timeout_s`` after the last arrival.
        """
        start = time.monotonic()
        finished: list[Finished] = []
        samples: list[tuple[float, list[int]]] = []
        dispatch_samples: list[tuple[float, list[int]]] = []
        base = list(self.outstanding)
        i, n = 0, len(trace)
        last_arrival = trace[-1].arrival_s if trace else 0.0
        next_sample = 0.0
        while True:
            now = time.monotonic() - start
            submitted = i
            while i < n and trace[i].arrival_s <= now:
                req = trace[i]
                self.submit(req.prompt, req.max_new_tokens)
                i += 1
            if i > submitted:
                counts = [o - b for o, b in zip(self.outstanding, base, strict=True)]
                dispatch_samples.append((now, counts))
            if now >= next_sample:
                counts = [o - b for o, b in zip(self.outstanding, base, strict=True)]
                if any(counts):
                    samples.append((now, counts))
                next_sample = now + sample_interval_s
            pending = sum(self.outstanding) - sum(base)
            if i >= n and (pending <= 0 or now > last_arrival + drain_timeout_s):
                break
            wait = sample_interval_s
            if i < n:
                wait = min(wait, max(0.0, trace[i].arrival_s - now))
            finished.extend(self.poll(wait))
        return TraceRun(
            dispatched=n,
            finished=finished,
            unfinished=sum(self.outstanding) - sum(base),
            duration_s=time.monotonic() - start,
            samples=samples,
            dispatch_samples=dispatch_samples,
            failed=sum(1 for f in finished if f.status != "ok"),
        )
