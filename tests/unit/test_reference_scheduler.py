"""The reference scheduler's state machine: published numbers match the arithmetic of a script.

Everything here runs the engine directly with explicit times (no sockets, no sleeps).
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadsnap import LoadSnapshot, UsageError
from scheduler.engine import BatchEngine, EngineConfig, StepKind, StepResult
from scheduler.executor_registry import make_executor
from scheduler.executors import CostModel, SimExecutor
from scheduler.kv import KVPool, PrefixCache, block_keys
from scheduler.messages import Finished, Request

MS = 1_000_000


def request(seq: int, prompt: list[int], max_new: int, rid: int | None = None) -> Request:
    return Request(
        rid=seq if rid is None else rid,
        dispatch_seq=seq,
        prompt=prompt,
        max_new_tokens=max_new,
        dispatched_mono_ns=0,
    )


def distinct_prompt(seed: int, length: int) -> list[int]:
    return [seed * 100_000 + i for i in range(length)]


def step(engine: BatchEngine, now_ns: int) -> tuple[StepKind | None, list[Finished]]:
    plan = engine.schedule(now_ns)
    if plan is None:
        return None, []
    return plan.kind, engine.complete(plan, StepResult(0.001), now_ns + MS)


def run_to_completion(engine: BatchEngine, limit: int = 10_000) -> list[Finished]:
    done: list[Finished] = []
    for i in range(limit):
        kind, finished = step(engine, i * 2 * MS)
        done += finished
        if kind is None:
            return done
    raise AssertionError("engine did not drain")


def test_admission_prefill_decode_and_finish_arithmetic() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=1000, chunked_prefill_size=512))
    lengths = [10, 20, 30]
    for seq, length in enumerate(lengths, start=1):
        assert engine.add_request(request(seq, distinct_prompt(seq, length), 5), 0) is None
    snap = engine.snapshot(0)
    assert (snap.num_waiting_reqs, snap.num_running_reqs) == (3, 0)
    assert snap.num_used_tokens == 0
    assert snap.num_total_tokens == snap.num_waiting_uncached_tokens == 60
    assert snap.last_accepted_dispatch_seq == 3

    assert step(engine, 0) == (StepKind.PREFILL, [])
    snap = engine.snapshot(MS)
    assert (snap.num_waiting_reqs, snap.num_running_reqs) == (0, 3)
    assert snap.num_used_tokens == snap.num_total_tokens == 60
    assert snap.token_usage == pytest.approx(0.06)
    assert snap.queues is not None and snap.queues.num_decode_reqs == 3

    for k in range(1, 4):  # each decode step adds one KV token per request
        assert step(engine, k * MS) == (StepKind.DECODE, [])
        assert engine.snapshot(k * MS).num_used_tokens == 60 + 3 * k
    kind, finished = step(engine, 10 * MS)  # the 5th output token
    assert kind is StepKind.DECODE
    assert sorted(f.rid for f in finished) == [1, 2, 3]
    assert all(f.output_len == 5 and f.status == "ok" for f in finished)
    snap = engine.snapshot(20 * MS)
    assert (snap.num_running_reqs, snap.num_waiting_reqs, snap.num_used_tokens) == (0, 0, 0)
    assert snap.num_total_tokens == 0
    assert engine.cycle == 5
    assert step(engine, 30 * MS) == (None, [])


def test_running_batch_is_bounded_by_max_running_requests() -> None:
    engine = BatchEngine(EngineConfig(max_running_requests=2, max_total_num_tokens=1000))
    for seq in (1, 2, 3):
        engine.add_request(request(seq, distinct_prompt(seq, 8), 3), 0)
    step(engine, 0)
    snap = engine.snapshot(MS)
    assert (snap.num_running_reqs, snap.num_waiting_reqs) == (2, 1)
    assert snap.num_used_tokens == 16 and snap.num_total_tokens == 24
    assert len(run_to_completion(engine)) == 3
    assert engine.pool.free == 1000


def test_chunked_prefill_advances_one_chunk_per_step() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=1000, chunked_prefill_size=32))
    engine.add_request(request(1, distinct_prompt(1, 100), 2), 0)
    used = []
    for k in range(4):
        kind, _ = step(engine, k * MS)
        assert kind is StepKind.PREFILL
        snap = engine.snapshot(k * MS)
        assert snap.queues is not None
        used.append((snap.num_used_tokens, snap.queues.num_chunked_prefill_reqs))
    assert used == [(32, 1), (64, 1), (96, 1), (100, 0)]
    kind, finished = step(engine, 10 * MS)
    assert kind is StepKind.DECODE and [f.output_len for f in finished] == [2]


def test_prefix_cache_hits_show_in_cache_hit_rate_and_uncached_tokens() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=1000, prefix_block_size=16))
    prompt = distinct_prompt(7, 64)
    engine.add_request(request(1, prompt, 2), 0)
    run_to_completion(engine)
    assert engine.snapshot(MS).cache_hit_rate == 0.0
    engine.add_request(request(2, prompt, 2), 100 * MS)
    # Three of the four blocks are reusable: the last prompt token is always computed.
    snap = engine.snapshot(100 * MS)
    assert snap.num_waiting_uncached_tokens == 16 and snap.num_total_tokens == 64
    (finished,) = run_to_completion(engine)
    assert finished.cached_tokens == 48
    snap = engine.snapshot(200 * MS)
    assert snap.cache_hit_rate == pytest.approx(48 / 128)
    assert snap.num_used_tokens == 0  # cached blocks are evictable, not used
    assert engine.pool.free == 1000 - 64
    assert engine.flush_cache() == 64
    assert engine.pool.free == 1000


def test_cached_blocks_are_evicted_when_the_pool_needs_room() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=64, prefix_block_size=16))
    engine.add_request(request(1, distinct_prompt(1, 48), 1), 0)
    run_to_completion(engine)
    assert engine.cache.cached_tokens == 48
    engine.add_request(request(2, distinct_prompt(2, 60), 2), 0)
    assert [f.status for f in run_to_completion(engine)] == ["ok"]
    assert engine.snapshot(MS).num_used_tokens == 0


def test_full_pool_retracts_and_everything_still_finishes() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=40, chunked_prefill_size=64))
    engine.add_request(request(1, distinct_prompt(1, 16), 20), 0)
    engine.add_request(request(2, distinct_prompt(2, 16), 20), 0)
    step(engine, 0)
    retracted_seen = False
    finished: list[Finished] = []
    for k in range(1, 200):
        _, done = step(engine, k * MS)
        finished += done
        snap = engine.snapshot(k * MS)
        assert snap.num_used_tokens <= 40
        assert snap.queues is not None
        retracted_seen |= snap.queues.num_retracted_reqs == 1
        if len(finished) == 2:
            break
    assert retracted_seen and engine.retractions >= 1
    assert sorted(f.output_len for f in finished) == [20, 20]
    assert engine.snapshot(MS * 300).num_used_tokens == 0


def test_unservable_request_fails_and_is_acknowledged() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=32), dp_rank=3)
    failed = engine.add_request(request(1, distinct_prompt(1, 30), 10), 0)
    assert failed is not None and failed.status == "failed" and failed.dp_rank == 3
    assert engine.last_accepted_dispatch_seq == 1
    assert engine.snapshot(0).num_waiting_reqs == 0


def test_acknowledgement_is_contiguous() -> None:
    engine = BatchEngine(EngineConfig())
    assert engine.last_accepted_dispatch_seq == 0
    engine.add_request(request(5, [1, 2], 1), 0)  # a restarted rank: the first seen is 5
    assert engine.last_accepted_dispatch_seq == 5
    engine.add_request(request(7, [1, 2], 1), 0)
    assert engine.last_accepted_dispatch_seq == 5
    engine.add_request(request(6, [1, 2], 1), 0)
    assert engine.last_accepted_dispatch_seq == 7
    assert engine.add_request(request(6, [1, 2], 1, rid=60), 0) is None  # re-sent: still queued
    assert engine.late_seqs == 1 and engine.snapshot(0).num_waiting_reqs == 4
    assert engine.last_accepted_dispatch_seq == 7


@given(st.permutations(list(range(1, 13))))
def test_ack_never_covers_an_uncounted_request(order: list[int]) -> None:
    engine = BatchEngine(EngineConfig())
    counted: set[int] = set()
    first = order[0]
    for seq in order:
        engine.add_request(request(seq, [seq, 1], 1), 0)
        counted.add(seq)
        ack = engine.last_accepted_dispatch_seq
        assert set(range(min(first, ack + 1), ack + 1)) <= counted
        assert ack + 1 not in counted or ack + 1 < first
        assert engine.snapshot(0).num_waiting_reqs == len(counted)


def test_timings_of_finished_requests() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=100))
    msg = Request(rid=9, dispatch_seq=1, prompt=[1, 2, 3], max_new_tokens=2, dispatched_mono_ns=MS)
    engine.add_request(msg, 2 * MS)
    plan = engine.schedule(5 * MS)
    assert plan is not None and engine.complete(plan, StepResult(0.01), 15 * MS) == []
    plan = engine.schedule(15 * MS)
    assert plan is not None
    (done,) = engine.complete(plan, StepResult(0.01), 25 * MS)
    assert done.queue_time_s == pytest.approx(0.004)
    assert done.ttft_s == pytest.approx(0.014)
    assert done.e2e_s == pytest.approx(0.024)
    assert (done.prompt_len, done.output_len, done.cached_tokens) == (3, 2, 0)


def test_throughput_and_utilization_are_windowed() -> None:
    engine = BatchEngine(EngineConfig(window_s=1.0, max_total_num_tokens=10_000))
    for seq in range(1, 5):
        engine.add_request(request(seq, distinct_prompt(seq, 4), 1000), 0)
    t = 0
    for _ in range(100):  # 100 steps of 5 ms busy every 10 ms
        plan = engine.schedule(t)
        assert plan is not None
        engine.complete(plan, StepResult(0.005), t + 5 * MS)
        t += 10 * MS
    snap = engine.snapshot(t)
    assert snap.gen_throughput == pytest.approx(400.0)  # 4 tokens per 10 ms
    assert snap.utilization == pytest.approx(0.5)
    assert engine.snapshot(t + 3000 * MS).gen_throughput == 0.0


def test_pause_stops_steps_but_keeps_counting() -> None:
    engine = BatchEngine(EngineConfig())
    engine.pause()
    engine.add_request(request(1, [1, 2, 3], 1), 0)
    assert engine.schedule(0) is None
    snap = engine.snapshot(0)
    assert snap.num_waiting_reqs == 1 and snap.last_accepted_dispatch_seq == 1
    engine.resume()
    assert len(run_to_completion(engine)) == 1


def test_snapshot_validates_and_fits_the_schema() -> None:
    engine = BatchEngine(EngineConfig(max_total_num_tokens=200), dp_rank=1)
    for seq in range(1, 30):
        engine.add_request(request(seq, distinct_prompt(seq, 12), 4), 0)
    step(engine, 0)
    snap = engine.snapshot(MS, SimExecutor(kv_capacity=200).memory_section())
    from loadsnap import validate_snapshot

    validate_snapshot(snap, dp_size=2)
    assert isinstance(snap, LoadSnapshot) and snap.memory is not None
    assert snap.memory.kv_token_capacity == 200


def test_kv_pool_and_cache_primitives() -> None:
    pool = KVPool(8)
    assert pool.alloc(3) == [0, 1, 2] and pool.free == 5
    with pytest.raises(UsageError):
        pool.alloc(6)
    cache = PrefixCache(pool, 2)
    keys = block_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and keys != block_keys([9, 2, 3, 4], 2)
    assert block_keys([1, 2, 3, 4], 2) == keys
    assert cache.insert(keys[:1], [0, 1]) == []
    assert cache.match(keys, 2) == 1 and cache.evictable_tokens == 2
    assert cache.lock(keys[:1]) == [0, 1] and cache.evictable_tokens == 0
    assert cache.evict(2) == 0
    cache.unlock(keys[:1])
    assert cache.flush() == 2 and pool.free == 7


def test_sim_cost_model_blocks_for_a_long_prefill() -> None:
    slept: list[float] = []
    cost = CostModel(overhead_s=0.001, prefill_token_s=0.001, decode_token_s=0.0001)
    executor = SimExecutor(cost, sleep=slept.append)
    engine = BatchEngine(EngineConfig(chunked_prefill_size=512, max_total_num_tokens=4096))
    engine.add_request(request(1, distinct_prompt(1, 1000), 2), 0)
    plan = engine.schedule(0)
    assert plan is not None and plan.prefill_tokens == 512
    result = executor.execute(plan)
    assert result.duration_s == pytest.approx(0.513) and slept == [pytest.approx(0.513)]


def test_make_executor_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="unknown executor"):
        make_executor("nope", kv_capacity=10)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install loadsnap\[torch\]"):
        make_executor("torch", kv_capacity=10)


def test_engine_config_rejects_bad_limits() -> None:
    with pytest.raises(UsageError, match="max_running_requests"):
        EngineConfig(max_running_requests=0)
    with pytest.raises(UsageError, match="decode_reserve_ratio"):
        EngineConfig(decode_reserve_ratio=2.0)
