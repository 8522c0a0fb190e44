"""The document onto SMG's protobuf messages: GetLoadsResponse and the pushed EngineLoad carry
the document's figures under the same names (pure functions, no server)."""

from __future__ import annotations

import msgspec
import pytest

from loadsnap.exposition import RankLoad, build_document

pytest.importorskip("grpc", reason="grpcio is in the grpc extra")
pytest.importorskip("smg_grpc_proto", reason="smg-grpc-proto is in the grpc extra")

from loadsnap.grpc_loads import engine_load, get_loads_response
from tests.helpers import FIXED_NOW, golden_reads

SECTIONS = ("memory", "speculative", "lora", "disaggregation", "queues")


def _section_dict(message: object) -> dict[str, object]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        message,  # type: ignore[arg-type]
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def test_get_loads_response_is_the_document_field_for_field() -> None:
    document = build_document(golden_reads(), "all", FIXED_NOW, version="9.9")
    response = get_loads_response(document)
    assert (response.timestamp, response.version) == (document.timestamp, "9.9")
    assert response.dp_rank_count == document.dp_rank_count == len(response.loads) == 2
    for proto, load in zip(response.loads, document.loads, strict=True):
        doc = msgspec.to_builtins(load)
        for field in proto.DESCRIPTOR.fields:
            name = field.name
            if name in SECTIONS:
                if name in doc:
                    assert proto.HasField(name)
                    assert _section_dict(getattr(proto, name)) == pytest.approx(doc[name]), name
                else:
                    assert not proto.HasField(name), name
            else:
                assert getattr(proto, name) == pytest.approx(doc[name]), name
    assert _section_dict(response.aggregate) == pytest.approx(
        msgspec.to_builtins(document.aggregate)
    )


def test_engine_load_carries_every_figure_it_has_a_field_for() -> None:
    document = build_document(golden_reads(), "all", FIXED_NOW)
    load: RankLoad = document.loads[0]
    record = engine_load(load, age_ms=42, sample=7)
    assert (record.age_ms, record.sample, record.load_only) == (42, 7, True)
    expected = {
        "running_requests": load.num_running_reqs,
        "waiting_requests": load.num_waiting_reqs,
        "waiting_uncached_tokens": load.num_waiting_uncached_tokens,
        "token_usage": load.token_usage,
        "gen_throughput": load.gen_throughput,
        "max_running_requests": load.max_running_requests,
        "cache_hit_rate": load.cache_hit_rate,
        "num_used_tokens": load.num_used_tokens,
        "max_total_num_tokens": load.max_total_num_tokens,
    }
    for name, value in expected.items():
        assert getattr(record, name) == pytest.approx(value), name
    doc = msgspec.to_builtins(load)
    for name in SECTIONS:
        assert record.HasField(name)
        assert _section_dict(getattr(record, name)) == pytest.approx(doc[name]), name


def test_engine_load_age_is_clamped_to_its_32_bits() -> None:
    load = build_document(golden_reads(), "core").loads[0]
    assert engine_load(load, age_ms=2**40, sample=1).age_ms == 2**32 - 1
    assert engine_load(load, age_ms=-5, sample=1).age_ms == 0
    assert not engine_load(load, age_ms=0, sample=1).HasField("memory")  # not included
