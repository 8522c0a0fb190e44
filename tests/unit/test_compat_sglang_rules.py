"""``loadsnap.compat.sglang``: the rules sglang's module decides by (no processes, no sockets)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loadsnap.compat import sglang as compat

CALLERS = ("TokenizerManager", "MultiTokenizerRouter", "DataParallelController")


def _args(**overrides: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "enable_dp_attention": True,
        "nnodes": 2,
        "node_rank": 0,
        "dp_size": 1,
        "load_balance_method": "round_robin",
        "tokenizer_worker_num": 1,
    }
    base.update(overrides)
    return SimpleNamespace(**base)


def _owners(args: SimpleNamespace) -> set[str]:
    return {caller for caller in CALLERS if compat.zmq_reader_owner(args, caller)}


def test_zmq_only_for_multi_node_dp_attention_or_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", raising=False)
    assert compat.should_use_zmq(_args())
    assert not compat.should_use_zmq(_args(enable_dp_attention=False))
    assert not compat.should_use_zmq(_args(nnodes=1))
    monkeypatch.setenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", "1")
    assert compat.should_use_zmq(_args(enable_dp_attention=False, nnodes=1))


@pytest.mark.parametrize(
    ("overrides", "owner"),
    [
        ({"enable_dp_attention": False, "nnodes": 1}, set()),
        ({"node_rank": 1, "dp_size": 4, "tokenizer_worker_num": 8}, set()),
        ({"dp_size": 1}, {"TokenizerManager"}),
        ({"dp_size": 1, "tokenizer_worker_num": 8}, {"MultiTokenizerRouter"}),
        ({"dp_size": 4, "tokenizer_worker_num": 8}, {"MultiTokenizerRouter"}),
        ({"dp_size": 4, "load_balance_method": "total_tokens"}, {"DataParallelController"}),
        ({"dp_size": 4, "load_balance_method": "TOTAL_REQUESTS"}, {"DataParallelController"}),
        ({"dp_size": 4}, {"TokenizerManager"}),
    ],
)
def test_reader_owner(
    overrides: dict[str, object], owner: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", raising=False)
    assert _owners(_args(**overrides)) == owner


def test_at_most_one_owner_across_configurations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGLANG_LOAD_SNAPSHOT_USE_ZMQ", raising=False)
    for dp_size in (1, 4):
        for workers in (1, 8):
            for method in ("round_robin", "total_tokens", "total_requests"):
                for node_rank in (0, 1):
                    args = _args(
                        dp_size=dp_size,
                        tokenizer_worker_num=workers,
                        load_balance_method=method,
                        node_rank=node_rank,
                    )
                    assert len(_owners(args)) <= 1, args


def test_addresses() -> None:
    single = compat._zmq_addr_for(SimpleNamespace(instance_id="my/instance"))
    assert single.startswith("ipc://") and "my_instance" in single
    assert single != compat._zmq_addr_for(SimpleNamespace(instance_id="my_instance"))
    tcp = compat._zmq_addr_for(
        SimpleNamespace(instance_id="x", load_collector_ipc_name="tcp://10.0.0.1:29506")
    )
    assert tcp == "tcp://10.0.0.1:29506"
    path = compat.shm_path_for("/run/sglang/inst-1")
    assert path.startswith("/dev/shm/sglang_loads_inst-1_") and path.endswith(".shm")


@pytest.mark.parametrize(
    "path",
    ["/tmp/tmpab12_cd", "/dev/shm/sglang_loads_x_1234.shm", "/tmp/" + "n" * 200, "/tmp/.hidden"],
)
def test_every_sglang_path_maps_to_a_valid_distinct_instance(path: str) -> None:
    from loadsnap.settings import validate_instance

    directory, instance = compat.instance_for_path(path)
    assert directory == path.rsplit("/", 1)[0]
    assert validate_instance(instance) == instance
    assert compat.instance_for_path(path + "x")[1] != instance


def test_section_structs_take_sglang_signatures_and_carry_its_figures() -> None:
    from loadsnap import LoadSnapshot, decode_snapshot, encode_snapshot

    snapshot = LoadSnapshot(
        dp_rank=0,
        memory=compat.MemoryMetrics(40.5, 20.25, 1.5, 65536),  # sglang's positional order
        speculative=compat.SpeculativeMetrics(accept_length=2.5, accept_rate=0.625),
        lora=compat.LoRAMetrics(2, 8, 0.25),
        disaggregation=compat.DisaggregationMetrics("prefill", 3, 1),
        queues=compat.QueueMetrics(waiting=4, grammar=1, paused=0, retracted=2, prealloc_ready=5),
    )
    back = decode_snapshot(encode_snapshot(snapshot))
    assert back == snapshot
    out = back.to_dict(None)  # sglang's include=None: everything
    assert out["memory"] == {
        "weight_gb": 40.5,
        "kv_cache_gb": 20.25,
        "graph_gb": 1.5,
        "token_capacity": 65536,
    }
    assert out["speculative"] == {"accept_length": 2.5, "accept_rate": 0.625}
    assert out["lora"] == {"slots_used": 2, "slots_total": 8, "utilization": 0.25}
    assert out["disaggregation"]["prefill_bootstrap_queue_reqs"] == 3
    assert out["disaggregation"]["prefill_prealloc_queue_reqs"] == 3  # the older name too
    assert out["queues"] == {
        "waiting": 4,
        "grammar": 1,
        "paused": 0,
        "retracted": 2,
        "prealloc_ready": 5,
    }
    assert "core" in LoadSnapshot.VALID_SECTIONS and "disagg" in LoadSnapshot.VALID_SECTIONS
