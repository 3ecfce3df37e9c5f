"""Flow summaries as an Arrow IPC stream, written without pyarrow.

The agent uploads its windows in the format the control plane decodes without a Python object
per flow (`application/vnd.apache.arrow.stream`); pyarrow itself would add ~30 MB to the
agent's memory, so this module writes the stream directly: one schema message and one record
batch message (flatbuffers metadata, written here, then the column buffers, each padded to
8 bytes), then the end-of-stream marker. Only the types a flow summary needs are written: 64-bit
timestamps (µs, UTC), 16/32/64-bit signed integers and UTF-8 strings, with validity bitmaps
for the nullable columns. See the Arrow columnar format, "IPC streaming format".
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MEDIA_TYPE = "application/vnd.apache.arrow.stream"

# flatbuffers enum values from Arrow's Schema.fbs / Message.fbs
_V5 = 4
_HEADER_SCHEMA, _HEADER_RECORD_BATCH = 1, 3
_TYPE_INT, _TYPE_UTF8, _TYPE_TIMESTAMP = 2, 5, 10
_MICROSECOND = 2
_CONTINUATION = 0xFFFFFFFF


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "timestamp" | "int16" | "int32" | "int64" | "utf8"
    nullable: bool


# The columns the agent sends (bulkhead.flows.schema.FLOW_SCHEMA's names and types; the server
# sets reporter and the workload columns itself).
FLOW_COLUMNS: tuple[Column, ...] = (
    Column("ts", "timestamp", False),
    Column("first_seen", "timestamp", False),
    Column("last_seen", "timestamp", False),
    Column("src_ip", "utf8", False),
    Column("dst_ip", "utf8", False),
    Column("proto", "int16", False),
    Column("dst_port", "int32", False),
    Column("process", "utf8", True),
    Column("unit", "utf8", True),
    Column("user", "utf8", True),
    Column("direction", "utf8", False),
    Column("connections", "int64", False),
    Column("bytes", "int64", False),
    Column("decision", "utf8", False),
    Column("rule", "utf8", True),
)
# a row may leave these out (as the JSON upload may): first_seen/last_seen default to ts
DEFAULTS: dict[str, object] = {"dst_port": -1, "connections": 1, "bytes": 0,
                               "decision": "unknown"}
_CODES = {"int16": "h", "int32": "i", "int64": "q", "timestamp": "q"}
_BITS = {"int16": 16, "int32": 32, "int64": 64}


class EncodeError(ValueError):
    """A row that cannot be written: names its index and column."""


def encode_flows(rows: Sequence[Mapping[str, object]],
                 columns: Sequence[Column] = FLOW_COLUMNS) -> bytes:
    """The rows as one Arrow IPC stream (schema, one record batch, end of stream)."""
    n = len(rows)
    nodes: list[tuple[int, int]] = []
    buffers: list[bytes] = []
    for col in columns:
        values = [_value(row, col.name) for row in rows]
        nulls = values.count(None)
        if nulls and not col.nullable:
            raise EncodeError(f"row {values.index(None)}: column {col.name!r} is required")
        nodes.append((n, nulls))
        buffers.append(_validity(values) if nulls else b"")
        try:
            if col.kind == "utf8":
                buffers.extend(_strings(values))
            else:
                buffers.append(_numbers(values, col.kind))
        except (TypeError, ValueError, OverflowError) as exc:
            row = _first_bad(values, col.kind)
            raise EncodeError(f"row {row}: column {col.name!r}: {exc}") from None
    body, spans = _body(buffers)
    return (_schema(columns) + _record_batch(n, nodes, spans, len(body)) + body
            + struct.pack("<Ii", _CONTINUATION, 0))


# -- values -----------------------------------------------------------------------------------
def _value(row: Mapping[str, object], name: str) -> object:
    v = row.get(name)
    if v is None:
        if name in ("first_seen", "last_seen"):
            return row.get("ts")
        return DEFAULTS.get(name)
    return v


def _validity(values: list[object]) -> bytes:
    bits = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v is not None:
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def _numbers(values: list[object], kind: str) -> bytes:
    if kind == "timestamp":
        ints = [0 if v is None else math.floor(_real(v) * 1e6) for v in values]
    else:
        ints = [0 if v is None else _integer(v) for v in values]
    arr = array(_CODES[kind], ints)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def _real(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"expected epoch seconds, got {v!r}")
    return float(v)


def _integer(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _strings(values: list[object]) -> list[bytes]:
    offsets = array("i", [0])
    data = bytearray()
    for v in values:
        if v is not None:
            if not isinstance(v, str):
                raise TypeError(f"expected a string, got {v!r}")
            data += v.encode()
        if len(data) > 0x7FFF_FFFF:
            raise OverflowError("more than 2 GiB of text in one column")
        offsets.append(len(data))
    if sys.byteorder == "big":
        offsets.byteswap()
    return [offsets.tobytes(), bytes(data)]


def _first_bad(values: list[object], kind: str) -> int:
    for i, v in enumerate(values):
        try:
            if v is None:
                continue
            if kind == "utf8":
                _strings([v])
            else:
                _numbers([v], kind)
        except (TypeError, ValueError, OverflowError):
            return i
    return 0


def _body(buffers: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """The buffers back to back, each starting on an 8-byte boundary: (body, (offset, length)
    of each)."""
    out = bytearray()
    spans = []
    for b in buffers:
        spans.append((len(out), len(b)))
        out += b
        out += b"\0" * (-len(out) % 8)
    return bytes(out), spans


# -- flatbuffers metadata -----------------------------------------------------------------------
# A small forward writer for the few flatbuffers shapes Arrow's messages need (the flatbuffers
# package would import numpy: +12 MB in the agent). A table is written as its vtable, then the
# table (soffset to the vtable, then its fields, each aligned to its size), then its children,
# whose uoffsets (always forward) are patched in. Readers verify alignment, so every scalar sits
# on a multiple of its size from the buffer's start.

@dataclass(frozen=True)
class _Table:
    fields: dict[int, tuple[str, object]]  # slot -> (kind, value); kind: u8 bool i16 i32 i64 off


@dataclass(frozen=True)
class _Structs:
    items: list[tuple[int, int]]  # a vector of structs of two int64 (FieldNode, Buffer)


_Child = _Table | str | list[_Table] | _Structs
_SIZES = {"u8": 1, "bool": 1, "i16": 2, "i32": 4, "i64": 8, "off": 4}
_PACK = {"u8": "<B", "bool": "<?", "i16": "<h", "i32": "<i", "i64": "<q"}


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray(4)  # the root uoffset, patched by `finish`

    def _pad(self, align: int, extra: int = 0) -> None:
        self.buf += b"\0" * (-(len(self.buf) + extra) % align)

    def _patch(self, at: int, target: int) -> None:
        struct.pack_into("<I", self.buf, at, target - at)

    def finish(self, root: _Table) -> bytes:
        self._patch(0, self.write(root))
        self._pad(8)
        return bytes(self.buf)

    def write(self, child: _Child) -> int:
        """Write `child` at the end of the buffer; its position."""
        if isinstance(child, str):
            data = child.encode()
            self._pad(4)
            at = len(self.buf)
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
            return at
        if isinstance(child, _Structs):
            self._pad(8, 4)  # the elements (after the u32 length) 8-aligned
            at = len(self.buf)
            self.buf += struct.pack("<I", len(child.items))
            for a, b in child.items:
                self.buf += struct.pack("<qq", a, b)
            return at
        if isinstance(child, list):
            self._pad(4)
            at = len(self.buf)
            self.buf += struct.pack("<I", len(child)) + bytes(4 * len(child))
            for i, item in enumerate(child):
                self._patch(at + 4 + 4 * i, self.write(item))
            return at
        return self._table(child)

    def _table(self, table: _Table) -> int:
        slots = max(table.fields, default=-1) + 1
        layout: dict[int, int] = {}  # slot -> offset in the table
        size = 4  # the soffset to the vtable
        for slot, (kind, _) in sorted(table.fields.items(), key=lambda f: -_SIZES[f[1][0]]):
            width = _SIZES[kind]
            size += -size % width
            layout[slot] = size
            size += width
        vtable = struct.pack(f"<HH{slots}H", 4 + 2 * slots, size,
                             *(layout.get(i, 0) for i in range(slots)))
        self._pad(8, len(vtable))  # the table 8-aligned, right after its vtable
        self.buf += vtable
        at = len(self.buf)
        self.buf += struct.pack("<i", len(vtable)) + bytes(size - 4)
        children = []
        for slot, (kind, value) in table.fields.items():
            if kind == "off":
                children.append((at + layout[slot], value))
            else:
                struct.pack_into(_PACK[kind], self.buf, at + layout[slot], value)
        for field_at, child in children:
            assert isinstance(child, _Table | str | list | _Structs)
            self._patch(field_at, self.write(child))
        return at


def _message(header_type: int, header: _Table, body_length: int) -> bytes:
    """An encapsulated message: continuation marker, metadata length, the flatbuffer (padded
    so that what follows, the record batch's body, starts 8-aligned)."""
    meta = _Writer().finish(_Table({0: ("i16", _V5), 1: ("u8", header_type),
                                    2: ("off", header), 3: ("i64", body_length)}))
    return struct.pack("<Ii", _CONTINUATION, len(meta)) + meta


def _field(col: Column) -> _Table:
    type_: _Table
    if col.kind == "utf8":
        type_type, type_ = _TYPE_UTF8, _Table({})
    elif col.kind == "timestamp":
        type_type, type_ = _TYPE_TIMESTAMP, _Table({0: ("i16", _MICROSECOND), 1: ("off", "UTC")})
    else:
        type_type, type_ = _TYPE_INT, _Table({0: ("i32", _BITS[col.kind]), 1: ("bool", True)})
    empty: list[_Table] = []
    return _Table({0: ("off", col.name), 1: ("bool", col.nullable), 2: ("u8", type_type),
                   3: ("off", type_), 5: ("off", empty)})


def _schema(columns: Sequence[Column]) -> bytes:
    fields: list[_Table] = [_field(c) for c in columns]
    return _message(_HEADER_SCHEMA, _Table({0: ("i16", 0), 1: ("off", fields)}), 0)


def _record_batch(length: int, nodes: list[tuple[int, int]],
                  spans: list[tuple[int, int]], body_length: int) -> bytes:
    return _message(_HEADER_RECORD_BATCH, _Table({
        0: ("i64", length), 1: ("off", _Structs(nodes)), 2: ("off", _Structs(spans))}),
        body_length)
