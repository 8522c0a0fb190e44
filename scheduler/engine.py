"""Continuous-batching state of the reference scheduler. No I/O, no clock: times are arguments.

Theory of operation (modelled on sglang's scheduler): a request is *counted* the moment
:meth:`BatchEngine.add_request` queues it; that is also when its ``dispatch_seq`` is absorbed
into the contiguous acknowledgement (see ``scheduler.messages``). Each loop cycle asks
:meth:`BatchEngine.schedule` for one step:

* **prefill first**: continue the chunked request, then admit waiting requests first come first
  served while ``max_running_requests`` and the KV pool allow, up to ``chunked_prefill_size``
  prompt tokens per step; a request whose prompt does not fit the rest of the budget becomes the
  (single) chunked request and continues next step. Leading prompt blocks found in the prefix
  cache are not recomputed.
* **decode** otherwise: one token for every request whose prefill is complete. When the pool
  cannot hold one more token per request, the most recently admitted requests are *retracted*
  (KV freed, back to the head of the queue, recomputed later).

The executor runs the step; :meth:`BatchEngine.complete` then advances progress, finishes
requests at ``max_new_tokens`` (their prompt blocks go to the prefix cache, the rest of their
KV back to the pool) and returns their timings. :meth:`BatchEngine.snapshot` computes every
published number from this state.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from loadsnap.errors import UsageError
from loadsnap.schema import LoadSnapshot, MemorySection, QueueSection
from scheduler.kv import KVPool, PrefixCache, block_keys
from scheduler.messages import Finished, Request

__all__ = ["BatchEngine", "EngineConfig", "StepItem", "StepKind", "StepPlan", "StepResult"]

_NS_PER_S = 1_000_000_000


class StepKind(enum.Enum):
    """What one forward step computes."""

    PREFILL = "prefill"
    DECODE = "decode"


class _Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class EngineConfig:
    """Limits and policy knobs of one scheduler (names follow sglang's server args)."""

    max_running_requests: int = 64
    max_total_num_tokens: int = 16384
    chunked_prefill_size: int = 512
    prefix_block_size: int = 16
    # Tokens kept free at admission for the running requests' future decode tokens, as a
    # fraction of their remaining max_new_tokens (sglang's new_token_ratio).
    decode_reserve_ratio: float = 0.0
    window_s: float = 5.0  # gen_throughput and utilization averaging window

    def __post_init__(self) -> None:
        for name in (
            "max_running_requests",
            "max_total_num_tokens",
            "chunked_prefill_size",
            "prefix_block_size",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1: {name}={getattr(self, name)}")
        if not 0.0 <= self.decode_reserve_ratio <= 1.0:
            raise UsageError(f"decode_reserve_ratio out of 0..1: {self.decode_reserve_ratio}")
        if not self.window_s > 0.0:
            raise UsageError(f"window_s must be > 0: window_s={self.window_s}")


@dataclass(slots=True, eq=False)
class _Req:
    msg: Request
    keys: list[int]
    arrived_ns: int
    fill: list[int]  # prompt + outputs so far (what a (re)prefill must hold in KV)
    phase: _Phase = _Phase.WAITING
    cached_keys: list[int] = field(default_factory=list)
    cached_slots: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # own KV slots, after the cached ones
    computed: int = 0  # tokens of ``fill`` whose KV exists (cached included)
    outputs: list[int] = field(default_factory=list)
    first_cached: int = -1
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    retracted: bool = False
    done: bool = False


@dataclass(slots=True)
class StepItem:
    """One request's share of a step."""

    rid: int
    input_ids: list[int]
    new_slots: list[int]  # KV slots for ``input_ids``
    kv_slots: list[int]  # every KV slot it attends to, new ones last (empty unless asked)
    context_len: int  # tokens attended to, new ones included


@dataclass(slots=True)
class StepPlan:
    """One forward step: a prefill (chunks of prompts) or a decode (one token per request)."""

    kind: StepKind
    items: list[StepItem]
    prefill_tokens: int = 0
    decode_tokens: int = 0
    context_tokens: int = 0


@dataclass(slots=True)
class StepResult:
    """What an executor reports back: how long the step took and, if it computed them, the
    next token of each item (``None`` lets the engine invent a deterministic one)."""

    duration_s: float
    next_tokens: list[int] | None = None


class BatchEngine:
    """Waiting queue, running batch, KV pool and prefix cache of one rank. Not thread-safe.

    Parameters
    ----------
    config:
        Limits and policy.
    dp_rank:
        Stamped into snapshots and finished-request records.
    start_ns:
        Monotonic time at creation; the rate windows start here.
    """

    def __init__(self, config: EngineConfig, dp_rank: int = 0, start_ns: int = 0) -> None:
        self.config = config
        self.dp_rank = dp_rank
        self.pool = KVPool(config.max_total_num_tokens)
        self.cache = PrefixCache(self.pool, config.prefix_block_size)
        self.paused = False
        self.cycle = 0
        self.version = 0  # bumped on every state change; idle publishes compare it
        self.retractions = 0
        self.rejected = 0
        self.late_seqs = 0
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._chunked: _Req | None = None
        self._planned: list[_Req] = []  # the requests of the last plan, item by item
        self._ack: int | None = None
        self._early: set[int] = set()
        self._prompt_tokens = 0
        self._hit_tokens = 0
        self._start_ns = start_ns
        self._window: deque[tuple[int, int, int]] = deque()  # (end_ns, tokens, busy_ns)
        self._window_tokens = 0
        self._window_busy_ns = 0

    # -- intake --------------------------------------------------------------------------

    @property
    def last_accepted_dispatch_seq(self) -> int:
        """Highest dispatch sequence up to which every request is counted (0: none yet)."""
        return 0 if self._ack is None else self._ack

    @property
    def has_work(self) -> bool:
        """Whether a step would do something (ignores :attr:`paused`)."""
        return bool(self._waiting or self._running)

    def _accept_seq(self, seq: int) -> None:
        if self._ack is None:
            self._ack = seq - 1
        if seq <= self._ack or seq in self._early:
            self.late_seqs += 1  # already covered (or re-sent): counted, nothing to advance
            return
        self._early.add(seq)
        while self._ack + 1 in self._early:
            self._ack += 1
            self._early.remove(self._ack)

    def add_request(self, msg: Request, now_ns: int) -> Finished | None:
        """Count and queue ``msg`` and absorb its ``dispatch_seq`` into the acknowledgement.

        Returns a ``failed`` record for a request that can never be served (empty prompt, or
        prompt plus ``max_new_tokens`` larger than the pool; it is acknowledged too), else
        ``None``. A sequence at or below the acknowledgement (a controller that re-sent, or
        one older than the first this rank saw) is queued all the same and counted in
        :attr:`late_seqs`."""
        self._accept_seq(msg.dispatch_seq)
        self.version += 1
        need = len(msg.prompt) + msg.max_new_tokens
        if not msg.prompt or need > self.config.max_total_num_tokens:
            self.rejected += 1
            req = _Req(msg, [], now_ns, [], first_cached=0)
            return self._record(req, now_ns, "failed")
        keys = block_keys(msg.prompt, self.config.prefix_block_size)
        self._waiting.append(_Req(msg, keys, now_ns, list(msg.prompt)))
        return None

    # -- scheduling ----------------------------------------------------------------------

    def _available(self) -> int:
        return self.pool.free + self.cache.evictable_tokens

    def _alloc(self, n: int) -> list[int] | None:
        short = n - self.pool.free
        if short > 0 and self.cache.evict(short) < short:
            return None
        return self.pool.alloc(n)

    def _reserve(self, extra: _Req | None) -> int:
        ratio = self.config.decode_reserve_ratio
        if ratio == 0.0:
            return 0
        remaining = sum(r.msg.max_new_tokens - len(r.outputs) for r in self._running)
        if extra is not None:
            remaining += extra.msg.max_new_tokens - len(extra.outputs)
        return int(remaining * ratio)

    def schedule(self, now_ns: int, *, with_slots: bool = False) -> StepPlan | None:
        """Plan the next step and allocate its KV; ``None`` when paused or idle.

        ``with_slots`` fills :attr:`StepItem.kv_slots` (executors that compute attention)."""
        if self.paused:
            return None
        plan = self._schedule_prefill(now_ns, with_slots)
        if plan is None:
            plan = self._schedule_decode(with_slots)
        if plan is not None:
            self.cycle += 1
            self.version += 1
        return plan

    def _prefill_item(self, req: _Req, n: int, with_slots: bool) -> StepItem | None:
        new = self._alloc(n)
        if new is None:
            return None
        self._planned.append(req)
        req.slots.extend(new)
        start = req.computed
        kv = req.cached_slots + req.slots if with_slots else []
        return StepItem(req.msg.rid, req.fill[start : start + n], new, kv, start + n)

    def _schedule_prefill(self, now_ns: int, with_slots: bool) -> StepPlan | None:
        budget = self.config.chunked_prefill_size
        items: list[StepItem] = []
        self._planned = []
        chunked = self._chunked
        if chunked is not None:
            n = min(budget, len(chunked.fill) - chunked.computed)
            item = self._prefill_item(chunked, n, with_slots)
            if item is None:
                return None
            items.append(item)
            budget -= n
            if chunked.computed + n < len(chunked.fill):
                return self._plan(StepKind.PREFILL, items)
        while budget > 0 and self._waiting:
            if len(self._running) >= self.config.max_running_requests:
                break
            req = self._waiting[0]
            limit = min(len(req.keys), (len(req.fill) - 1) // self.cache.block_size)
            hit = self.cache.match(req.keys, limit)
            cached_slots = self.cache.lock(req.keys[:hit])
            extend = len(req.fill) - len(cached_slots)
            if self._available() < extend + self._reserve(req):
                self.cache.unlock(req.keys[:hit])
                break  # first come first served: the head of the queue blocks the rest
            self._waiting.popleft()
            req.cached_keys, req.cached_slots = req.keys[:hit], cached_slots
            req.computed = len(cached_slots)
            if req.first_cached < 0:
                req.first_cached = len(cached_slots)
                req.first_scheduled_ns = now_ns
            self._prompt_tokens += len(req.fill)
            self._hit_tokens += len(cached_slots)
            req.phase = _Phase.PREFILL
            self._running.append(req)
            n = min(budget, extend)
            item = self._prefill_item(req, n, with_slots)
            if item is None:  # cannot happen: _available() covered it
                raise AssertionError("kv pool accounting out of step")
            items.append(item)
            budget -= n
            if n < extend:
                self._chunked = req
                break
        if not items:
            return None
        return self._plan(StepKind.PREFILL, items)

    def _schedule_decode(self, with_slots: bool) -> StepPlan | None:
        decoding = [r for r in self._running if r.phase is _Phase.DECODE]
        while decoding and self._available() < len(decoding):
            self._retract(decoding.pop())
        if not decoding:
            return None
        items = []
        self._planned = decoding
        for req in decoding:
            new = self._alloc(1)
            if new is None:  # cannot happen: the loop above made room
                raise AssertionError("kv pool accounting out of step")
            req.slots.extend(new)
            kv = req.cached_slots + req.slots if with_slots else []
            ctx = len(req.cached_slots) + len(req.slots)
            items.append(StepItem(req.msg.rid, [req.outputs[-1]], new, kv, ctx))
        return self._plan(StepKind.DECODE, items)

    @staticmethod
    def _plan(kind: StepKind, items: list[StepItem]) -> StepPlan:
        new_tokens = sum(len(item.input_ids) for item in items)
        plan = StepPlan(kind, items, context_tokens=sum(item.context_len for item in items))
        if kind is StepKind.PREFILL:
            plan.prefill_tokens = new_tokens
        else:
            plan.decode_tokens = new_tokens
        return plan

    def _retract(self, req: _Req) -> None:
        self.retractions += 1
        self._running.remove(req)
        self.pool.release(req.slots)
        self.cache.unlock(req.cached_keys)
        req.slots, req.cached_keys, req.cached_slots = [], [], []
        req.fill = list(req.msg.prompt) + req.outputs
        req.computed = 0
        req.phase = _Phase.WAITING
        req.retracted = True
        self._waiting.appendleft(req)

    # -- completion ----------------------------------------------------------------------

    def complete(self, plan: StepPlan, result: StepResult, now_ns: int) -> list[Finished]:
        """Apply an executed step; return the requests that finished with it."""
        if len(self._planned) != len(plan.items):
            raise UsageError("complete() takes the plan of the last schedule() call")
        finished: list[Finished] = []
        produced = 0
        for index, (item, req) in enumerate(zip(plan.items, self._planned, strict=True)):
            req.computed += len(item.input_ids)
            if req.computed < len(req.fill) and plan.kind is StepKind.PREFILL:
                continue  # a chunk that does not end the prompt produces no token
            token = result.next_tokens[index] if result.next_tokens else None
            req.outputs.append(
                token if token is not None else (req.msg.rid * 31 + len(req.outputs)) % 32000
            )
            produced += 1
            if req is self._chunked:
                self._chunked = None
            if req.first_token_ns == 0:
                req.first_token_ns = now_ns
            req.phase = _Phase.DECODE
            if len(req.outputs) >= req.msg.max_new_tokens:
                finished.append(self._finish(req, now_ns))
        if finished:
            self._running = [r for r in self._running if not r.done]
        self._planned = []
        self._note_window(now_ns, produced, int(result.duration_s * _NS_PER_S))
        self.version += 1
        return finished

    def _finish(self, req: _Req, now_ns: int) -> Finished:
        req.done = True
        size = self.cache.block_size
        fresh_keys = req.keys[len(req.cached_keys) :]
        spare = self.cache.insert(fresh_keys, req.slots[: len(fresh_keys) * size])
        self.pool.release(spare)
        self.pool.release(req.slots[len(fresh_keys) * size :])
        self.cache.unlock(req.cached_keys)
        req.slots, req.cached_slots, req.cached_keys = [], [], []
        return self._record(req, now_ns, "ok")

    def _record(self, req: _Req, now_ns: int, status: str) -> Finished:
        msg = req.msg
        start = msg.dispatched_mono_ns or req.arrived_ns

        def since(t_ns: int) -> float:
            return max(0, (t_ns or now_ns) - start) / _NS_PER_S

        return Finished(
            rid=msg.rid,
            dp_rank=self.dp_rank,
            dispatch_seq=msg.dispatch_seq,
            prompt_len=len(msg.prompt),
            output_len=len(req.outputs),
            cached_tokens=max(0, req.first_cached),
            queue_time_s=since(req.first_scheduled_ns),
            ttft_s=since(req.first_token_ns),
            e2e_s=since(now_ns),
            status=status,
        )

    def _note_window(self, now_ns: int, tokens: int, busy_ns: int) -> None:
        self._window.append((now_ns, tokens, busy_ns))
        self._window_tokens += tokens
        self._window_busy_ns += busy_ns
        self._trim_window(now_ns)

    def _trim_window(self, now_ns: int) -> None:
        horizon = now_ns - int(self.config.window_s * _NS_PER_S)
        window = self._window
        while window and window[0][0] <= horizon:
            _, tokens, busy = window.popleft()
            self._window_tokens -= tokens
            self._window_busy_ns -= busy

    # -- control -------------------------------------------------------------------------

    def flush_cache(self) -> int:
        """Drop every prefix-cache block no running request reads; return the tokens freed."""
        self.version += 1
        return self.cache.flush()

    def pause(self) -> None:
        """Stop scheduling steps (requests are still accepted and counted)."""
        self.paused, self.version = True, self.version + 1

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self.paused, self.version = False, self.version + 1

    # -- load ----------------------------------------------------------------------------

    @property
    def num_used_tokens(self) -> int:
        """KV tokens held by requests or by cached blocks that a request reads."""
        return self.pool.capacity - self.pool.free - self.cache.evictable_tokens

    def snapshot(self, now_ns: int, memory: MemorySection | None = None) -> LoadSnapshot:
        """The rank's load computed from the current state (``seq``/``epoch``/times are left
        to the writer)."""
        cfg = self.config
        used = self.num_used_tokens
        waiting_tokens = 0
        uncached = 0
        retracted = 0
        block = self.cache.block_size
        for req in self._waiting:
            waiting_tokens += len(req.fill)
            limit = min(len(req.keys), (len(req.fill) - 1) // block)
            uncached += len(req.fill) - self.cache.match(req.keys, limit) * block
            retracted += req.retracted
        self._trim_window(now_ns)
        span_ns = min(int(cfg.window_s * _NS_PER_S), now_ns - self._start_ns)
        throughput = self._window_tokens * _NS_PER_S / span_ns if span_ns > 0 else 0.0
        busy = min(1.0, self._window_busy_ns / span_ns) if span_ns > 0 else 0.0
        decoding = sum(1 for r in self._running if r.phase is _Phase.DECODE)
        running = len(self._running)
        return LoadSnapshot(
            dp_rank=self.dp_rank,
            num_running_reqs=running,
            num_waiting_reqs=len(self._waiting),
            num_waiting_uncached_tokens=uncached,
            num_used_tokens=used,
            num_total_tokens=used + waiting_tokens,
            max_total_num_tokens=cfg.max_total_num_tokens,
            max_running_requests=cfg.max_running_requests,
            token_usage=used / cfg.max_total_num_tokens,
            gen_throughput=throughput,
            cache_hit_rate=self._hit_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
            utilization=busy,
            cycle=self.cycle,
            last_accepted_dispatch_seq=self.last_accepted_dispatch_seq,
            memory=memory,
            queues=QueueSection(
                num_paused_reqs=running if self.paused else 0,
                num_retracted_reqs=retracted,
                num_chunked_prefill_reqs=int(self._chunked is not None),
                num_prefill_reqs=running - decoding,
                num_decode_reqs=decoding,
            ),
        )
