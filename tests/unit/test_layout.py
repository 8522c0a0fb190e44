"""The box diagram in ``loadsnap.layout``'s docstring agrees with the offsets and structs."""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path

import msgspec
import pytest

from loadsnap import layout
from loadsnap.errors import UsageError
from loadsnap.layout import SegmentGeometry
from loadsnap.schema import LoadSnapshot
from tests.helpers import ROOT

_SIZES = {"u16": 2, "u32": 4, "u64": 8}
_CODES = {"H": "u16", "I": "u32", "Q": "u64"}
_ROW_RE = re.compile(r"^\s*(\d+) \+[-+]+\+\s*$")
_CELL_RE = re.compile(r'^(\w+)\s+(?:"[^"]*"\s+)?(u16|u32|u64)\b')

# Diagram field name -> the layout constant holding its offset.
_HEADER_OFFSETS = {
    "magic": layout.MAGIC_OFFSET,
    "layout_major": layout.LAYOUT_MAJOR_OFFSET,
    "layout_minor": layout.LAYOUT_MINOR_OFFSET,
    "header_size": layout.HEADER_SIZE_OFFSET,
    "dp_size": layout.DP_SIZE_OFFSET,
    "slot_size": layout.SLOT_SIZE_OFFSET,
    "payload_capacity": layout.PAYLOAD_CAPACITY_OFFSET,
    "creator_pid": layout.CREATOR_PID_OFFSET,
    "creator_uid": layout.CREATOR_UID_OFFSET,
    "reserved": layout.HEADER_RESERVED_OFFSET,
    "created_wall_ns": layout.CREATED_WALL_NS_OFFSET,
    "segment_id": layout.SEGMENT_ID_OFFSET,
    "ready": layout.READY_OFFSET,
}
_CTRL_OFFSETS = {
    "seq": layout.CTRL_SEQ_OFFSET,
    "writer_pid": layout.CTRL_WRITER_PID_OFFSET,
    "writer_pidns": layout.CTRL_WRITER_PIDNS_OFFSET,
    "epoch": layout.CTRL_EPOCH_OFFSET,
    "refused": layout.CTRL_REFUSED_OFFSET,
}


def _block(title: str) -> list[str]:
    """The lines of the diagram that follows the docstring paragraph starting with ``title``."""
    doc = layout.__doc__
    assert doc is not None
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    block: list[str] = []
    for line in lines[start + 2 :]:  # skip the title line and the blank line after it
        if line and not line.startswith(" "):
            break
        block.append(line)
    while block and not block[-1].strip():
        block.pop()
    assert block, f"no diagram after {title!r}"
    return block


def _boxed_fields(title: str) -> tuple[list[tuple[str, str, int]], list[int]]:
    """Parse a box diagram into (name, type, offset) per typed cell, and the row offsets.

    The first text line after a row marker names the row's cells; later lines continue them.
    """
    fields: list[tuple[str, str, int]] = []
    rows: list[int] = []
    cursor = -1
    first_line = False
    for line in _block(title):
        match = _ROW_RE.match(line)
        if match:
            row = int(match.group(1))
            if cursor >= 0:
                assert cursor == row, f"{title}: cells end at {cursor}, next row says {row}"
            rows.append(row)
            cursor, first_line = row, True
            continue
        if "|" not in line or not first_line:
            continue
        first_line = False
        for cell in line.split("|")[1:-1]:
            cell_match = _CELL_RE.match(cell.strip())
            if cell_match is None:
                cursor = -1  # untyped filler ("reserved to 128", "hot record"): runs to the row
                continue
            name, kind = cell_match.groups()
            fields.append((name, kind, cursor))
            cursor += _SIZES[kind]
    return fields, rows


def test_header_diagram_matches_offset_constants() -> None:
    fields, rows = _boxed_fields("SegmentHeader")
    assert [name for name, _, _ in fields] == list(_HEADER_OFFSETS)
    for name, _, offset in fields:
        assert offset == _HEADER_OFFSETS[name], name
    assert rows[-1] == layout.HEADER_SIZE
    assert rows[rows.index(layout.HEADER_FIELDS_END)] == layout.HEADER_FIELDS_END


def test_header_diagram_types_match_header_struct() -> None:
    fields, _ = _boxed_fields("SegmentHeader")
    fmt = layout.HEADER_STRUCT.format
    assert fmt.startswith("<")
    assert [_CODES[code] for code in fmt[1:]] == [kind for _, kind, _ in fields]
    # Cumulative struct sizes land on every diagram offset.
    offsets = [struct.calcsize("<" + fmt[1 : i + 1]) for i in range(len(fmt) - 1)]
    assert offsets == [offset for _, _, offset in fields]
    assert layout.HEADER_STRUCT.size == layout.HEADER_FIELDS_END


def test_header_offsets_derive_from_each_other() -> None:
    fields, _ = _boxed_fields("SegmentHeader")
    previous_offset, previous_size = 0, 0
    for name, kind, _ in fields:
        assert _HEADER_OFFSETS[name] == previous_offset + previous_size, name
        previous_offset, previous_size = _HEADER_OFFSETS[name], _SIZES[kind]
    assert previous_offset + previous_size == layout.HEADER_FIELDS_END
    assert layout.HEADER_FIELDS_END <= layout.HEADER_SIZE
    assert layout.READY_OFFSET % 8 == 0  # the ready word is one aligned 8-byte store


def test_segment_diagram_matches_geometry() -> None:
    block = "\n".join(_block("Segment::"))
    assert f"SegmentHeader ({layout.HEADER_SIZE} B)" in block
    assert f"SlotControl ({layout.SLOT_CONTROL_SIZE} B) per rank" in block
    assert "records_offset = HEADER_SIZE + dp_size * SLOT_CONTROL_SIZE" in block
    assert "records_offset + 2 * copy_size" in block
    assert "HEADER_SIZE + dp_size * slot_size" in block
    geometry = SegmentGeometry(3, 256)
    assert geometry.control_offset(0) == layout.HEADER_SIZE
    assert geometry.control_offset(1) == layout.HEADER_SIZE + layout.SLOT_CONTROL_SIZE
    assert geometry.records_offset == layout.HEADER_SIZE + 3 * layout.SLOT_CONTROL_SIZE
    assert geometry.copy_offset(0, 0) == geometry.records_offset
    assert geometry.copy_offset(1, 0) == geometry.records_offset + 2 * geometry.copy_size
    assert geometry.slot_size == layout.SLOT_CONTROL_SIZE + 2 * geometry.copy_size
    assert geometry.total_size == layout.HEADER_SIZE + 3 * geometry.slot_size
    assert geometry.total_size == geometry.copy_offset(2, 1) + geometry.copy_size


def test_slot_control_diagram_matches_offsets() -> None:
    entries: list[tuple[int, str, str]] = []
    for line in _block("SlotControl (one per rank"):
        match = re.match(r"^\s*(\d+) (\w+) (u64|to \d+)", line)
        if match:
            entries.append((int(match.group(1)), match.group(2), match.group(3)))
    assert entries[-1] == (layout.CTRL_FIELDS_END, "reserved", f"to {layout.SLOT_CONTROL_SIZE}")
    typed = entries[:-1]
    assert [name for _, name, _ in typed] == list(_CTRL_OFFSETS)
    previous_end = 0
    for offset, name, kind in typed:
        assert offset == _CTRL_OFFSETS[name] == previous_end, name
        previous_end = offset + _SIZES[kind]
    assert previous_end == layout.CTRL_FIELDS_END <= layout.SLOT_CONTROL_SIZE
    assert layout.CTRL_SEQ_OFFSET == 0  # the sequence word leads the 64-byte aligned entry
    assert layout.CONTROL_DTYPE.itemsize == layout.SLOT_CONTROL_SIZE
    assert layout.CONTROL_DTYPE.fields is not None
    for name, offset in _CTRL_OFFSETS.items():
        assert layout.CONTROL_DTYPE.fields[name][1] == offset, name


def test_record_copy_diagram_matches_offsets() -> None:
    fields, rows = _boxed_fields("Record copy")
    assert fields == [
        ("reserved", "u32", layout.COPY_RESERVED_OFFSET),
        ("payload_len", "u32", layout.COPY_PAYLOAD_LEN_OFFSET),
    ]
    assert rows == [0, layout.COPY_HOT_OFFSET, layout.COPY_PAYLOAD_OFFSET]
    assert layout.COPY_PAYLOAD_LEN_OFFSET == layout.COPY_RESERVED_OFFSET + 4
    assert layout.COPY_HOT_OFFSET == layout.COPY_PAYLOAD_LEN_OFFSET + 4
    assert layout.COPY_PAYLOAD_OFFSET == layout.COPY_HOT_OFFSET + layout.HOT_RECORD_SIZE
    assert layout.RECORD_HEADER_SIZE == layout.COPY_PAYLOAD_OFFSET
    text = "\n".join(_block("Record copy"))
    assert f"the {layout.HOT_FIELD_COUNT} dispatch-critical fields" in text
    assert f"{layout.HOT_RECORD_SIZE} B" in text
    assert f"{layout.COPY_PAYLOAD_OFFSET} +---" in text
    assert f"record_crc u32, at {layout.COPY_PAYLOAD_OFFSET} + payload_len" in text
    assert layout.CRC_STRUCT.size == layout.RECORD_CRC_SIZE == _SIZES["u32"]


def test_hot_record_fields_are_snapshot_fields_of_their_type() -> None:
    by_name = {field.name: field for field in msgspec.structs.fields(LoadSnapshot)}
    assert len({name for name, _ in layout.HOT_FIELDS}) == layout.HOT_FIELD_COUNT
    assert layout.HOT_RECORD_SIZE == 8 * layout.HOT_FIELD_COUNT == layout.HOT_DTYPE.itemsize
    assert layout.HOT_STRUCT.size == layout.HOT_RECORD_SIZE
    for index, (name, code) in enumerate(layout.HOT_FIELDS):
        assert layout.HOT_DTYPE.fields is not None
        dtype, offset = layout.HOT_DTYPE.fields[name][:2]
        assert offset == 8 * index
        assert dtype == ("<f8" if code == "d" else "<u8")
        default = by_name[name].default
        assert isinstance(default, float) == (code == "d"), name
    assert layout.HOT_FIELDS[layout.HOT_SEQ_INDEX][0] == "seq"
    assert layout.HEAD_STRUCT.size == layout.RECORD_HEADER_SIZE
    assert layout.HEAD_STRUCT.format[1:] == "II" + layout.HOT_STRUCT.format[1:]


def test_hot_values_follow_hot_fields() -> None:
    snapshot = LoadSnapshot(dp_rank=1, num_running_reqs=3, gen_throughput=2.5, seq=9, epoch=4)
    names = [name for name, _ in layout.HOT_FIELDS]
    values = dict(zip(names, layout.hot_values(snapshot), strict=True))
    assert values["seq"] == 9 and values["epoch"] == 4
    assert values["num_running_reqs"] == 3 and values["gen_throughput"] == 2.5
    assert len(values) == layout.HOT_FIELD_COUNT


@pytest.mark.parametrize(
    ("dp_size", "capacity"), [(1, 64), (2, 100), (3, 2048), (7, 4000), (64, 65), (5, 1 << 20)]
)
def test_slots_and_copies_are_64_byte_aligned(dp_size: int, capacity: int) -> None:
    geometry = SegmentGeometry(dp_size, capacity)
    assert layout.HEADER_SIZE % layout.SLOT_ALIGN == 0
    assert layout.SLOT_CONTROL_SIZE % layout.SLOT_ALIGN == 0
    assert geometry.slot_size % layout.SLOT_ALIGN == 0
    assert geometry.copy_size % layout.SLOT_ALIGN == 0
    assert geometry.records_offset % layout.SLOT_ALIGN == 0
    overhead = layout.RECORD_HEADER_SIZE + layout.RECORD_CRC_SIZE
    assert geometry.copy_size >= overhead + capacity
    assert geometry.copy_size - (overhead + capacity) < layout.SLOT_ALIGN
    for rank in range(dp_size):
        assert geometry.control_offset(rank) % layout.SLOT_ALIGN == 0
        assert geometry.copy_offset(rank, 0) % layout.SLOT_ALIGN == 0
        assert geometry.copy_offset(rank, 1) % layout.SLOT_ALIGN == 0
        assert geometry.seq_word_index(rank) * 8 == geometry.control_offset(rank)
        assert geometry.control_offset(rank) + layout.SLOT_CONTROL_SIZE <= geometry.records_offset
    assert geometry.total_size == geometry.copy_offset(dp_size - 1, 1) + geometry.copy_size


@pytest.mark.parametrize(
    ("dp_size", "capacity"), [(0, 64), (layout.MAX_DP_SIZE + 1, 64), (1, 63), (1, (1 << 20) + 1)]
)
def test_geometry_refuses_out_of_range(dp_size: int, capacity: int) -> None:
    with pytest.raises(UsageError, match="out of range"):
        SegmentGeometry(dp_size, capacity)


def test_magic_and_ready_words_spell_their_names() -> None:
    assert layout.MAGIC.to_bytes(8, "little") == b"LOADSNAP"
    assert layout.READY_VALUE.to_bytes(8, "little") == b"READY!!!"


def _hot_pack_arguments(path: Path) -> list[list[str]]:
    """For each call of the hot-record pack in ``path``: its arguments after the two header
    words, as the attribute names they read (``snapshot.x`` -> ``x``) or the local names."""
    tree = ast.parse(path.read_text(), str(path))
    calls = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("_HEAD_PACK", "pack_head")
        ):
            names = [
                arg.attr if isinstance(arg, ast.Attribute) else ast.unparse(arg)
                for arg in node.args[4:]
            ]
            calls.append(names)
    return calls


@pytest.mark.parametrize(
    "module", ["loadsnap/shm_writer.py", "benchmarks/bench_publish.py"], ids=lambda m: m
)
def test_every_inlined_hot_pack_follows_hot_fields(module: str) -> None:
    # The writer packs the hot record from attributes in one call (a generic getter costs
    # ~170 ns more per publish), so each place that spells the order out is checked here.
    calls = _hot_pack_arguments(ROOT / module)
    assert calls, f"no hot-record pack found in {module}"
    expected = [name for name, _ in layout.HOT_FIELDS]
    for names in calls:
        stamped = len(expected) - len(names[3:])
        assert names[3:] == expected[stamped:], names
        assert [n.split(".")[-1] for n in names[:3]] in (
            ["seq", "epoch", "mono_ns"],
            ["seq", "epoch", "publish_mono_ns"],
        ), names[:3]


def test_hot_table_columns_follow_hot_fields() -> None:
    from loadsnap.reading import HotTable

    columns = [name for name in HotTable.__struct_fields__ if name != "taken_mono_ns"]
    assert columns[: layout.HOT_FIELD_COUNT] == [name for name, _ in layout.HOT_FIELDS]
