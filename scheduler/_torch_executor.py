"""The ``torch`` executor: a small randomly initialised transformer that really runs each step.

Imported only through :func:`scheduler.executor_registry.make_executor` (torch is an optional
extra).
The KV pool is one tensor ``[n_layers, 2, max_total_num_tokens, d_model]``; each step writes the
new tokens' keys and values at the slots the engine allocated and attends over the slots the
request owns or shares through the prefix cache, so a prefix-cache hit really reuses cached KV.
Requests run one after another inside a step (no padding): the model is a load generator, not
a fast one. The memory section comes from the real tensor sizes and, on CUDA, the device.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from loadsnap.schema import MemorySection
from scheduler.engine import StepItem, StepPlan, StepResult
from scheduler.executors import TorchConfig

__all__ = ["TorchExecutor"]


class TorchExecutor:
    """Runs steps on a tiny transformer with a tensor KV pool. Single-threaded.

    Parameters
    ----------
    config:
        Model shape, device (``auto`` picks CUDA when present) and seed.
    kv_capacity:
        KV pool size in tokens (``max_total_num_tokens``).
    """

    needs_slots = True

    def __init__(self, config: TorchConfig, *, kv_capacity: int) -> None:
        use_cuda = config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available()
        )
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = torch.float16 if use_cuda else torch.float32
        self.config = config
        d, layers = config.d_model, config.n_layers
        gen = torch.Generator().manual_seed(config.seed)

        def param(*shape: int, fan_in: int) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen) / math.sqrt(fan_in)
            return t.to(self.device, self.dtype)

        self.embed = param(config.vocab_size, d, fan_in=1)
        self.layers: list[dict[str, torch.Tensor]] = [
            {
                "wqkv": param(d, 3 * d, fan_in=d),
                "wo": param(d, d, fan_in=d),
                "w1": param(d, 4 * d, fan_in=d),
                "w2": param(4 * d, d, fan_in=4 * d),
            }
            for _ in range(layers)
        ]
        self.kv = torch.zeros(layers, 2, kv_capacity, d, device=self.device, dtype=self.dtype)
        self._weight_bytes = sum(
            t.numel() * t.element_size()
            for t in [self.embed, *(w for layer in self.layers for w in layer.values())]
        )
        self._activation_bytes = 0
        self.steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        """Run every item of ``plan`` through the model; return wall time and next tokens."""
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = [self._run_item(item) for item in plan.items]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.steps += 1
        return StepResult(time.perf_counter() - start, tokens)

    def _run_item(self, item: StepItem) -> int:
        cfg = self.config
        n, ctx = len(item.input_ids), len(item.kv_slots)
        heads, head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        dev = self.device
        ids = torch.tensor(item.input_ids, device=dev) % cfg.vocab_size
        new = torch.tensor(item.new_slots, device=dev)
        slots = torch.tensor(item.kv_slots, device=dev)
        # Query i sits at position ctx - n + i and sees every position up to its own.
        query_pos = torch.arange(ctx - n, ctx, device=dev)[:, None]
        mask = torch.arange(ctx, device=dev)[None, :] <= query_pos
        x = self.embed[ids]
        for index, layer in enumerate(self.layers):
            q, k, v = torch.split(_rms(x) @ layer["wqkv"], cfg.d_model, dim=-1)
            self.kv[index, 0, new] = k
            self.kv[index, 1, new] = v
            keys = self.kv[index, 0, slots].view(ctx, heads, head_dim).transpose(0, 1)
            values = self.kv[index, 1, slots].view(ctx, heads, head_dim).transpose(0, 1)
            queries = q.view(n, heads, head_dim).transpose(0, 1)
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
            x = x + attended.transpose(0, 1).reshape(n, cfg.d_model) @ layer["wo"]
            x = x + F.gelu(_rms(x) @ layer["w1"]) @ layer["w2"]
        logits = _rms(x[-1]) @ self.embed.T
        self._activation_bytes = max(
            self._activation_bytes, (heads * n * ctx + 4 * n * cfg.d_model) * x.element_size()
        )
        return int(torch.argmax(logits).item())

    def memory_section(self) -> MemorySection | None:
        """Real tensor sizes; on CUDA also the device's total and used memory and the peak
        activation memory (allocator peak minus weights and KV)."""
        kv_bytes = self.kv.numel() * self.kv.element_size()
        figures: dict[str, Any] = {
            "weight_bytes": self._weight_bytes,
            "kv_cache_bytes": kv_bytes,
            "activation_bytes": self._activation_bytes,
            "kv_token_capacity": self.kv.shape[2],
        }
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            figures["device_total_bytes"] = int(total)
            figures["device_used_bytes"] = int(total - free)
            figures["activation_bytes"] = max(0, int(peak) - self._weight_bytes - kv_bytes)
        return MemorySection(**figures)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
