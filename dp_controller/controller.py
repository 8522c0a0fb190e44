"""``Controller``: dispatches requests to DP schedulers over ZMQ and collects their results.

Topology (``scheduler.messages``): one PUSH per scheduler, connected to the scheduler's request
address (one ordered pipe per rank: requests and controls of a rank arrive in send order); one
PULL bound at the result address, to which every scheduler connects a PUSH.

Nothing here blocks without a bound (:mod:`dp_controller._pipes`): sends use ``NOBLOCK`` (a
full pipe queues the message in a per-rank backlog, flushed in order, so dispatch sequences
stay gap-free), every receive waits on ``poll`` with a timeout, sockets use ``linger=0``. The
control fan-out gives each rank its own deadline, keeps at most ``max_concurrency`` commands in
flight, and returns a per-rank result, so one hung scheduler costs the call at most its timeout.

Every request ends in exactly one result from :meth:`Controller.poll`. The controller keeps the
requests in flight per rank (:class:`~dp_controller.inflight.InFlight`), and talks to its
dispatcher through the :class:`~dp_controller.dispatching.Dispatcher` protocol only. Once per
dispatcher refresh (never per request) it asks which ranks were lost
(:meth:`Dispatcher.changes`): a rank seen dead (its writer is gone) or with a new epoch (a
restarted process lost what the old one held) has every request in flight on it reported as a
``Finished(status="failed", reason=...)`` (:class:`FailureReason`), on the same path as the
schedulers' results. Results already delivered are drained first, so a request finished just
before its scheduler died is reported finished; the rank's request socket is then replaced, so
what still waited in the pipe is dropped instead of being served by a restarted process. A
scheduler's result that arrives after its request was reported failed (it was in transit) is
dropped and counted in ``late_results``: no request is reported twice. A result is matched on
``(dp_rank, rid, dispatch_seq)``, so another controller's result is never taken for one of
ours (``unknown_results``). The baselines report no lost ranks (``dp_controller.baselines``).

Every request is dispatched with its ``max_new_tokens``, and every result, the scheduler's or
one the controller made for a dead or restarted rank, is reported back to the dispatcher
(:meth:`Dispatcher.complete`) the moment it is taken: the ``length_aware`` policy counts what
is outstanding per rank from these, not from snapshots.

Taking over: a new controller against running schedulers (the previous one crashed or closed)
has its dispatcher continue each rank's numbering after the scheduler's
``last_accepted_dispatch_seq`` at start (:meth:`Dispatcher.take_over`), so the schedulers'
contiguous acknowledgements cover the new requests at once instead of running ahead of a ledger
that restarted at 1.

Trace replay (a workload driven in real time) is harness code: ``dp_controller.harness.replay``.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence

import msgspec
import zmq

from dp_controller._pipes import RankPipes, ResultPipe
from dp_controller.dispatching import Clock, Dispatch, Dispatcher, RankChanges, monotonic_clock
from dp_controller.inflight import FailureReason, InFlight
from loadsnap.errors import UsageError, WireError
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
]

log = logging.getLogger("dp_controller")

_NS = 1_000_000_000
DEFAULT_SNDHWM = 10_000


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

    Attributes
    ----------
    outstanding, dispatched:
        Per rank: requests dispatched and without a result yet; requests ever dispatched.
    failed_requests, late_results, unknown_results:
        Requests this controller reported failed (dead or restarted rank); schedulers' results
        dropped because their request was already reported failed; results for no request of
        ours (e.g. a previous controller's).
    takeover_seqs:
        Per rank, the acknowledged sequence this controller's numbering continued after.
    bad_messages, stray_replies:
        Undecodable messages; control replies to no command in flight.

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
        n = dispatcher.dp_size
        if len(request_addrs) != n:
            raise UsageError(
                f"one request address per rank: addrs={len(request_addrs)} dp_size={n}"
            )
        self.dispatcher = dispatcher
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self._clock = clock
        self._results: ResultPipe | None = None
        self._pipes: RankPipes | None = None
        self._closed = False
        try:
            self._results = ResultPipe(self._ctx, result_addr)
            self._pipes = RankPipes(self._ctx, request_addrs, send_hwm)
        except BaseException:
            self.close()
            raise
        self.result_addr = result_addr
        self.request_addrs = list(request_addrs)
        self._rids = itertools.count()
        self._command_ids = itertools.count(1)
        self._finished: list[Finished] = []
        self._replies: list[ControlReply] = []
        self._inflight = InFlight(n)
        self.bad_messages = 0
        self.stray_replies = 0
        self.takeover_seqs = [0] * n
        try:
            self._take_over()
        except BaseException:
            self.close()
            raise

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket (linger 0) and the context if this controller made it."""
        self._closed = True
        if self._pipes is not None:
            self._pipes.close()
        if self._results is not None:
            self._results.close()
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
        return self._inflight.dp_size

    @property
    def outstanding(self) -> list[int]:
        """Per rank, requests dispatched and not finished (nor reported failed). Read-only."""
        return self._inflight.outstanding

    @property
    def dispatched(self) -> list[int]:
        """Per rank, requests this controller dispatched (a counter). Read-only."""
        return self._inflight.dispatched

    @property
    def failed_requests(self) -> int:
        """Requests this controller reported failed (their rank died or restarted)."""
        return self._inflight.failed_requests

    @property
    def late_results(self) -> int:
        """Schedulers' results for requests already reported failed (dropped)."""
        return self._inflight.late_results

    @property
    def unknown_results(self) -> int:
        """Results for no request of ours, e.g. a previous controller's (dropped)."""
        return self._inflight.unknown_results

    # --- rank watch -------------------------------------------------------------------------

    def _take_over(self) -> None:
        """Continue each rank's numbering after what its scheduler already acknowledged."""
        self.takeover_seqs = self.dispatcher.take_over()
        if any(self.takeover_seqs):
            log.info("continuing dispatch numbering: after=%s", self.takeover_seqs)

    def _watch(self, changes: RankChanges) -> None:
        """Fail what the ranks the dispatcher reports dead or restarted held."""
        dead = changes.dead
        holds = self._inflight.holds
        lost = dead | changes.restarted
        ranks = [r for r in sorted(lost) if 0 <= r < self.dp_size and holds(r)]
        if not ranks:
            return
        # Results already delivered count as finished: take them before declaring the rest.
        self._drain()
        for rank in ranks:
            reason = FailureReason.RANK_DEAD if rank in dead else FailureReason.RANK_RESTARTED
            self._fail_rank(rank, reason)

    def _fail_rank(self, rank: int, reason: FailureReason) -> None:
        failed = self._inflight.fail(rank, reason, self._clock())
        if not failed:
            return
        complete = self.dispatcher.complete
        for result in failed:
            complete(rank, result.dispatch_seq)
        self._finished.extend(failed)
        # What still waits in the pipe was just reported failed: a new socket drops it, so a
        # restarted process does not serve it (its result would only be dropped as late).
        self._open_pipes().reset(rank)
        log.warning(
            "reported in-flight requests failed: dp_rank=%d count=%d reason=%s",
            rank,
            len(failed),
            reason.value,
        )

    # --- sending ----------------------------------------------------------------------------

    def _open_pipes(self) -> RankPipes:
        pipes = self._pipes
        if pipes is None or self._closed:
            raise UsageError("controller is closed")
        return pipes

    def backlog_sizes(self) -> list[int]:
        """Messages per rank waiting for room in their pipe."""
        return [] if self._pipes is None else self._pipes.backlog_sizes()

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
            Pin the request to this rank (it still counts in the dispatcher's numbers).
        est_tokens:
            Load estimate; default ``len(prompt) + max_new_tokens``.

        Raises
        ------
        UsageError
            ``max_new_tokens`` < 1, ``rank`` out of range, or the controller is closed.
        """
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1: max_new_tokens={max_new_tokens}")
        if rank is not None and not 0 <= rank < self.dp_size:
            raise UsageError(f"dp_rank out of range: dp_rank={rank} dp_size={self.dp_size}")
        pipes = self._pipes
        if pipes is None or self._closed:
            raise UsageError("controller is closed")
        est = len(prompt) + max_new_tokens if est_tokens is None else est_tokens
        dispatcher = self.dispatcher
        decision = dispatcher.dispatch(est, rank, max_new_tokens=max_new_tokens)
        chosen, seq = decision
        changes = dispatcher.changes()
        if changes is not None:
            self._watch(changes)  # before this request is in flight: it went to the live process
        rid = next(self._rids)
        now = self._clock()
        request = Request(
            rid=rid,
            dispatch_seq=seq,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            dispatched_mono_ns=now,
            pinned=rank is not None,
        )
        pipes.send(chosen, encode_message(request))
        self._inflight.add(chosen, rid, seq, len(prompt), now)
        return rid, decision

    def in_flight(self, rank: int) -> list[int]:
        """The rids dispatched to ``rank`` with no result yet, oldest first."""
        return self._inflight.rids(rank)

    # --- receiving --------------------------------------------------------------------------

    def _receive(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for one message, drain what is ready, then watch the ranks
        (the dispatcher refreshes if its interval passed); True if any message came."""
        pipes = self._open_pipes()
        pipes.flush_all()
        results = self._results
        got = results is not None and results.wait(timeout_s) and self._drain()
        changes = self.dispatcher.changes(refresh=True)
        if changes is not None:
            self._watch(changes)
        return got

    def _drain(self) -> bool:
        """Take every message that is ready, without waiting; True if any."""
        results = self._results
        if results is None:
            return False
        got = False
        inflight, complete = self._inflight, self.dispatcher.complete
        while (data := results.recv_nowait()) is not None:
            got = True
            try:
                message = decode_to_controller(data)
            except WireError:
                self.bad_messages += 1
                continue
            if isinstance(message, Finished):
                if inflight.take(message):
                    complete(message.dp_rank, message.dispatch_seq)
                    self._finished.append(message)
            else:
                self._replies.append(message)
        return got

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
            ``timeout_s`` or ``max_concurrency`` not positive, or the controller is closed.
        """
        if not (timeout_s > 0 and max_concurrency >= 1):
            raise UsageError(
                f"need timeout_s > 0 and max_concurrency >= 1: timeout_s={timeout_s} "
                f"max_concurrency={max_concurrency}"
            )
        pipes = self._open_pipes()
        command_id = next(self._command_ids)
        data = encode_message(Control(command_id=command_id, command=command, args=args or {}))
        todo = deque(range(self.dp_size) if ranks is None else ranks)
        sent_at: dict[int, int] = {}
        results: dict[int, RankControlResult] = {}
        timeout_ns = int(timeout_s * _NS)
        while todo or sent_at:
            while todo and len(sent_at) < max_concurrency:
                rank = todo.popleft()
                if pipes.send(rank, data):
                    sent_at[rank] = time.monotonic_ns()
                else:
                    pipes.withdraw_last(rank)  # do not deliver a command reported not sent
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
