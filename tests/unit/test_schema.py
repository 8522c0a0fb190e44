"""``LoadSnapshot``: round trips, ``to_dict`` selectors, and value validation on every path."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from loadsnap import (
    SECTIONS,
    DisaggregationSection,
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    SpeculativeSection,
    UsageError,
    WireDecodeError,
    WireError,
    WireValidationError,
    decode_snapshot,
    encode_snapshot,
    parse_include,
    validate_snapshot,
)
from loadsnap.schema import CORE_FIELDS, SECTION_FIELDS

_SECTION_TYPES: dict[str, type[msgspec.Struct]] = {
    "memory": MemorySection,
    "speculative": SpeculativeSection,
    "lora": LoraSection,
    "disaggregation": DisaggregationSection,
    "queues": QueueSection,
}


def _distinct_value(annotation: Any, index: int) -> Any:
    """A non-default value for a field of ``annotation`` (distinct per field ``index``)."""
    text = str(annotation)
    if "float" in text:
        return (index % 9 + 1) / 10  # valid as ratio and as rate
    if "list" in text:
        return [f"adapter-{index}", "é-ü"]
    if "str" in text:
        return f"mode-{index}"
    return 1000 + index


def _full_section(section_type: type[msgspec.Struct]) -> msgspec.Struct:
    values = {
        field.name: _distinct_value(field.type, i)
        for i, field in enumerate(msgspec.structs.fields(section_type))
    }
    return section_type(**values)


def _full_snapshot() -> LoadSnapshot:
    """Every field and every section set to a non-default value."""
    values: dict[str, Any] = {}
    for i, field in enumerate(msgspec.structs.fields(LoadSnapshot)):
        if field.name in _SECTION_TYPES:
            values[field.name] = _full_section(_SECTION_TYPES[field.name])
        else:
            values[field.name] = _distinct_value(field.type, i)
    values["dp_rank"] = 3
    return LoadSnapshot(**values)


def test_full_snapshot_sets_every_field_to_a_non_default() -> None:
    snapshot = _full_snapshot()
    for field in msgspec.structs.fields(LoadSnapshot):
        assert getattr(snapshot, field.name) != field.default, field.name
    for name, section_type in _SECTION_TYPES.items():
        section = getattr(snapshot, name)
        for field in msgspec.structs.fields(section_type):
            assert getattr(section, field.name) != field.default, (name, field.name)


def test_round_trip_every_field_and_section() -> None:
    snapshot = _full_snapshot()
    decoded = decode_snapshot(encode_snapshot(snapshot))
    assert decoded == snapshot
    for field in msgspec.structs.fields(LoadSnapshot):
        assert getattr(decoded, field.name) == getattr(snapshot, field.name), field.name


@pytest.mark.parametrize("section", list(_SECTION_TYPES))
def test_round_trip_each_section_alone(section: str) -> None:
    snapshot = msgspec.structs.replace(
        LoadSnapshot(dp_rank=0), **{section: _full_section(_SECTION_TYPES[section])}
    )
    decoded = decode_snapshot(encode_snapshot(snapshot))
    assert decoded == snapshot
    others = set(_SECTION_TYPES) - {section}
    assert all(getattr(decoded, other) is None for other in others)


def test_round_trip_defaults_and_extremes() -> None:
    snapshot = LoadSnapshot(
        dp_rank=0,
        num_running_reqs=2**63 - 1,
        token_usage=1.0,
        utilization=0.0,
        gen_throughput=1e15,
        memory=MemorySection(),
    )
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot
    assert decode_snapshot(encode_snapshot(LoadSnapshot(dp_rank=0))) == LoadSnapshot(dp_rank=0)


def test_encoded_as_map_so_fields_can_be_appended() -> None:
    snapshot = LoadSnapshot(dp_rank=1, num_running_reqs=4)
    as_map = msgspec.msgpack.decode(encode_snapshot(snapshot))
    assert isinstance(as_map, dict) and as_map["num_running_reqs"] == 4
    # A newer writer's unknown field is ignored; an older writer's missing field gets its default.
    newer = msgspec.msgpack.encode({**as_map, "field_from_the_future": [1, 2]})
    assert decode_snapshot(newer) == snapshot
    older = msgspec.msgpack.encode({"dp_rank": 1, "num_running_reqs": 4})
    assert decode_snapshot(older) == snapshot


# --- to_dict ------------------------------------------------------------------------------


def test_to_dict_core_is_the_flat_fields() -> None:
    snapshot = _full_snapshot()
    out = snapshot.to_dict()
    assert list(out) == list(CORE_FIELDS)
    assert all(out[name] == getattr(snapshot, name) for name in CORE_FIELDS)
    msgspec.json.encode(out)  # JSON-ready


@pytest.mark.parametrize(("selector", "attribute"), list(SECTION_FIELDS.items()))
def test_to_dict_each_section_selector(selector: str, attribute: str) -> None:
    snapshot = _full_snapshot()
    out = snapshot.to_dict(selector)
    assert set(out) == {"dp_rank", attribute}
    assert out[attribute] == msgspec.to_builtins(getattr(snapshot, attribute))
    assert msgspec.convert(out[attribute], _SECTION_TYPES[attribute]) == getattr(
        snapshot, attribute
    )
    with_core = snapshot.to_dict(["core", selector])
    assert set(with_core) == {*CORE_FIELDS, attribute}


def test_to_dict_all_and_unfilled_sections() -> None:
    snapshot = _full_snapshot()
    out = snapshot.to_dict("all")
    assert set(out) == {*CORE_FIELDS, *SECTION_FIELDS.values()}
    assert msgspec.convert(out, LoadSnapshot) == snapshot
    bare = LoadSnapshot(dp_rank=0).to_dict("all")
    assert all(bare[attribute] is None for attribute in SECTION_FIELDS.values())
    msgspec.json.encode(out)


def test_to_dict_selector_forms() -> None:
    snapshot = _full_snapshot()
    assert snapshot.to_dict(" Memory , LORA,") == snapshot.to_dict(["memory", "lora"])
    assert snapshot.to_dict(("core",)) == snapshot.to_dict()
    assert parse_include("all") == frozenset(SECTIONS) - {"all"}
    assert parse_include("spec,spec") == frozenset({"spec"})


@pytest.mark.parametrize("include", ["bogus", "core,bogus", ["memory", "speculative"], "", " , "])
def test_to_dict_unknown_selector_lists_valid_ones(include: str | list[str]) -> None:
    with pytest.raises(UsageError) as info:
        LoadSnapshot(dp_rank=0).to_dict(include)
    message = str(info.value)
    assert "valid: " + ", ".join(SECTIONS) in message
    for name in SECTIONS:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_unknown_selector_message_names_the_offender() -> None:
    with pytest.raises(UsageError, match="unknown section bogus"):
        parse_include("core,bogus")


# --- validation on decode -----------------------------------------------------------------


def _raw(**fields: Any) -> bytes:
    return msgspec.msgpack.encode({"dp_rank": 0, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"num_running_reqs": -1},
        {"num_used_tokens": -(2**40)},
        {"dp_rank": -1},
        {"last_accepted_dispatch_seq": -5},
        {"token_usage": 1.0001},
        {"cache_hit_rate": 2.0},
        {"utilization": -0.1},
        {"token_usage": math.nan},
        {"gen_throughput": math.nan},
        {"gen_throughput": math.inf},
        {"gen_throughput": -1.0},
        {"memory": {"kv_cache_bytes": -1}},
        {"speculative": {"accept_rate": 1.5}},
        {"speculative": {"accept_length": math.nan}},
        {"queues": {"num_paused_reqs": -3}},
        {"disaggregation": {"num_transfer_queue_reqs": -1}},
        {"lora": {"loaded_adapters": ["x" * 129]}},
        {"num_running_reqs": "many"},
        {"memory": [1, 2]},
    ],
    ids=repr,
)
def test_decode_rejects_invalid_values(fields: dict[str, Any]) -> None:
    with pytest.raises(WireValidationError, match="invalid snapshot"):
        decode_snapshot(_raw(**fields))


def _msgpack_str(raw: bytes) -> bytes:
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"], ids=repr)
def test_decode_rejects_invalid_utf8_as_wire_error(bad: bytes) -> None:
    # {"dp_rank": 0, "disaggregation": {"mode": <bad>}} with a hand-built invalid str.
    payload = (
        b"\x82"
        + _msgpack_str(b"dp_rank")
        + b"\x00"
        + _msgpack_str(b"disaggregation")
        + b"\x81"
        + _msgpack_str(b"mode")
        + _msgpack_str(bad)
    )
    with pytest.raises(WireDecodeError) as info:
        decode_snapshot(payload)
    assert isinstance(info.value.__cause__, (msgspec.DecodeError, UnicodeDecodeError))


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x82\xa1", b"\x93\x01\x02\x03", b"\x80"], ids=repr
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_snapshot(data)


# --- validate_snapshot --------------------------------------------------------------------


def test_validate_snapshot_accepts_a_full_snapshot() -> None:
    validate_snapshot(_full_snapshot())
    validate_snapshot(_full_snapshot(), dp_size=4)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_waiting_reqs": -1}, r"\$\.num_waiting_reqs"),
        ({"token_usage": 1.5}, r"\$\.token_usage"),
        ({"utilization": math.nan}, r"\$\.utilization"),
        ({"gen_throughput": math.inf}, r"\$\.gen_throughput"),
        ({"speculative": SpeculativeSection(accept_rate=3.0)}, r"\$\.speculative\.accept_rate"),
        ({"memory": MemorySection(weight_bytes=-2)}, r"\$\.memory\.weight_bytes"),
    ],
)
def test_validate_snapshot_rejects(changes: dict[str, Any], match: str) -> None:
    snapshot = msgspec.structs.replace(_full_snapshot(), **changes)
    with pytest.raises(UsageError, match=match):
        validate_snapshot(snapshot)


def test_validate_snapshot_checks_rank_against_dp_size() -> None:
    with pytest.raises(UsageError, match="dp_rank=3 dp_size=3"):
        validate_snapshot(_full_snapshot(), dp_size=3)
