"""The ``torch`` executor: real forward passes over a tensor KV pool (skipped without torch)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="torch not installed: pip install loadsnap[torch]")

from scheduler.engine import BatchEngine, EngineConfig, StepKind
from scheduler.executor_registry import make_executor
from scheduler.executors import Executor, TorchConfig
from scheduler.messages import Finished, Request

CONFIG = TorchConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, device="cpu", seed=1)
CAPACITY = 512


def executor() -> Executor:
    return make_executor("torch", kv_capacity=CAPACITY, torch_config=CONFIG)


def request(seq: int, prompt: list[int], max_new: int = 3) -> Request:
    return Request(
        rid=seq, dispatch_seq=seq, prompt=prompt, max_new_tokens=max_new, dispatched_mono_ns=0
    )


def first_token(engine: BatchEngine, ex: Executor, msg: Request) -> tuple[int, list[Finished]]:
    """Run ``msg`` to completion; return the token its last prefill step produced."""
    engine.add_request(msg, 0)
    token = -1
    finished: list[Finished] = []
    for t in range(100):
        plan = engine.schedule(t, with_slots=True)
        if plan is None:
            return token, finished
        result = ex.execute(plan)
        assert result.next_tokens is not None and len(result.next_tokens) == len(plan.items)
        if plan.kind is StepKind.PREFILL:
            token = result.next_tokens[-1]
        finished += engine.complete(plan, result, t + 1)
    raise AssertionError("did not finish")


PROMPT = [(7 * i + 3) % 256 for i in range(64)]


def test_memory_section_comes_from_real_tensor_sizes() -> None:
    memory = executor().memory_section()
    assert memory is not None
    assert memory.kv_cache_bytes == CONFIG.n_layers * 2 * CAPACITY * CONFIG.d_model * 4
    assert memory.kv_token_capacity == CAPACITY
    d = CONFIG.d_model
    per_layer = d * 3 * d + d * d + d * 4 * d + 4 * d * d
    assert memory.weight_bytes == 4 * (CONFIG.vocab_size * d + CONFIG.n_layers * per_layer)
    assert memory.device_total_bytes == 0  # CPU: no device figures


def test_prefix_cache_hit_reuses_the_cached_kv() -> None:
    ex = executor()
    engine = BatchEngine(EngineConfig(max_total_num_tokens=CAPACITY, prefix_block_size=16))
    cold, (done_cold,) = first_token(engine, ex, request(1, PROMPT))
    warm, (done_warm,) = first_token(engine, ex, request(2, PROMPT))
    assert (done_cold.cached_tokens, done_warm.cached_tokens) == (0, 48)
    assert warm == cold  # the same logits from cached KV as from a full prefill
    assert engine.snapshot(1000).num_used_tokens == 0


def test_chunked_prefill_matches_a_single_prefill() -> None:
    whole = BatchEngine(EngineConfig(max_total_num_tokens=CAPACITY, chunked_prefill_size=512))
    chunked = BatchEngine(EngineConfig(max_total_num_tokens=CAPACITY, chunked_prefill_size=20))
    token_whole, _ = first_token(whole, executor(), request(1, PROMPT))
    token_chunked, _ = first_token(chunked, executor(), request(1, PROMPT))
    assert token_whole == token_chunked


def test_batched_requests_run_to_completion() -> None:
    ex = executor()
    engine = BatchEngine(EngineConfig(max_total_num_tokens=CAPACITY, chunked_prefill_size=64))
    for seq in range(1, 5):
        engine.add_request(request(seq, [(seq * 13 + i) % 256 for i in range(40)], 4), 0)
    finished: list[Finished] = []
    for t in range(200):
        plan = engine.schedule(t, with_slots=True)
        if plan is None:
            break
        finished += engine.complete(plan, ex.execute(plan), t + 1)
    assert sorted(f.rid for f in finished) == [1, 2, 3, 4]
    assert all(f.output_len == 4 for f in finished)
    snap = engine.snapshot(10_000, ex.memory_section())
    assert snap.num_used_tokens == 0 and snap.memory is not None
    assert snap.memory.activation_bytes > 0
