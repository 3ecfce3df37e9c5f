"""The flow-summary record: its Arrow schema and the check every batch passes before storage.

Theory of operation
-------------------
An agent summarises the connections it saw per window and ships the summaries in batches.
One row = one (window, 5-tuple-ish, process/user) summary:

- `ts` is the window the summary belongs to; `first_seen`/`last_seen` bound what was seen in
  it (all `timestamp[us, tz=UTC]`);
- `src_ip`/`dst_ip` are canonical address strings (`str(ipaddress.ip_address(x))`), so that
  string equality is address equality everywhere downstream;
- `proto` is the IP protocol number, `dst_port` the destination port (the ICMP type for
  ICMP) or -1 for none, `src_port` optional;
- `process`/`unit` serve the flow on the destination, `user` is behind the source;
- `direction` (`in`/`out`) is how the `reporter` (agent / workload name) saw it;
- `src_workload`/`dst_workload` are the resolved workload names (null: external/unknown);
- `connections`/`bytes` are counters over the window;
- `decision` (the policy vocabulary) and `rule` are what the reporting side decided.

`validate_batch(table)` returns a table of exactly `FLOW_SCHEMA` (columns in schema order,
compatible types cast, absent optional columns filled with nulls, absent `first_seen` /
`last_seen` taken from `ts`) or raises `FlowBatchError` listing every problem found, each
naming its column and the first offending row. Checks are vectorised (Arrow compute); address
strings are checked once per distinct value, with a bounded cache shared across batches
(`address_numbers` turns them into the 128-bit numbers the store indexes on).
"""

from __future__ import annotations

import ipaddress
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from bulkhead.policy.evaluate import DECISIONS

TS_TYPE = pa.timestamp("us", tz="UTC")
FLOW_SCHEMA = pa.schema([
    pa.field("ts", TS_TYPE, nullable=False),
    pa.field("first_seen", TS_TYPE, nullable=False),
    pa.field("last_seen", TS_TYPE, nullable=False),
    pa.field("src_ip", pa.string(), nullable=False),
    pa.field("dst_ip", pa.string(), nullable=False),
    pa.field("src_port", pa.int32()),
    pa.field("proto", pa.int16(), nullable=False),
    pa.field("dst_port", pa.int32(), nullable=False),
    pa.field("process", pa.string()),
    pa.field("unit", pa.string()),
    pa.field("user", pa.string()),
    pa.field("direction", pa.string(), nullable=False),
    pa.field("reporter", pa.string(), nullable=False),
    pa.field("src_workload", pa.string()),
    pa.field("dst_workload", pa.string()),
    pa.field("connections", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),
    pa.field("rule", pa.string()),
])
COLUMNS: tuple[str, ...] = tuple(FLOW_SCHEMA.names)
# columns a batch may leave out: nulls (or `ts` for first_seen/last_seen) are filled in
OPTIONAL: frozenset[str] = frozenset({"first_seen", "last_seen", "src_port", "process", "unit",
                                      "user", "src_workload", "dst_workload", "rule"})
DIRECTIONS: tuple[str, ...] = ("in", "out")
# inclusive value ranges of the integer columns
RANGES: dict[str, tuple[int, int]] = {
    "src_port": (0, 65535), "proto": (0, 255), "dst_port": (-1, 65535),
    "connections": (0, 2**63 - 1), "bytes": (0, 2**63 - 1),
}
V4_MAPPED = 0xFFFF << 32  # IPv4 a.b.c.d is stored as ::ffff:a.b.c.d (one 128-bit axis)
# (name, kind, type, nullable) per column, once: DataType and Field objects are built afresh
# on every attribute access, which cost a check as much as some of its compute calls
_PLAN: tuple[tuple[str, str, pa.DataType, bool], ...] = tuple(
    (f.name, "timestamp" if pa.types.is_timestamp(f.type)
     else "integer" if pa.types.is_integer(f.type) else "string", f.type, f.nullable)
    for f in FLOW_SCHEMA)
MAX_ISSUES = 20

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Issue:
    column: str
    row: int | None  # first offending row (0-based), None when the whole column is wrong
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}, " if self.row is not None else ""
        return f"{where}column {self.column!r}: {self.message}"


class FlowBatchError(ValueError):
    """A batch that cannot be stored; `issues` names each bad column and its first bad row."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        more = f" (+{len(self.issues) - 3} more)" if len(self.issues) > 3 else ""
        super().__init__("; ".join(str(i) for i in self.issues[:3]) + more)


# -- addresses --------------------------------------------------------------------------------

class _AddressCache:
    """Canonical address string -> slot in two registries holding the (hi, lo) 64-bit halves
    of its 128-bit number. Bounded: cleared when full. One lock around each lookup."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.slot: dict[str | None, int] = {}
        self.hi: U64 = np.zeros(4096, np.uint64)
        self.lo: U64 = np.zeros(4096, np.uint64)

    def lookup(self, values: list[str | None]) -> tuple[U64, U64, int | None, str]:
        """Numbers per value; on the first bad value: (…, its index, the reason)."""
        with self.lock:
            if len(self.slot) + len(values) > self.limit:
                self._reset()
            slot = self.slot
            idx = np.fromiter(map(slot.get, values, repeat(-1)), np.int64, count=len(values))
            missing = np.flatnonzero(idx < 0).tolist()
            if not missing:
                return self.hi[idx], self.lo[idx], None, ""
            new: list[int] = []
            for j in missing:
                v = values[j]
                n = _v4_number(v) if v is not None else None
                if n is None:
                    if v is None:
                        return self.hi[:0], self.lo[:0], j, "null address"
                    try:
                        a = ipaddress.ip_address(v)
                    except ValueError:
                        return self.hi[:0], self.lo[:0], j, f"{v!r} is not an IP address"
                    if str(a) != v:
                        return (self.hi[:0], self.lo[:0], j,
                                f"{v!r} is not canonical (expected {str(a)!r})")
                    n = int(a) | V4_MAPPED if a.version == 4 else int(a)
                idx[j] = len(slot)
                slot[v] = len(slot)
                new.append(n)
            k = len(slot) - len(new)
            while len(slot) > self.hi.shape[0]:
                self.hi = np.concatenate([self.hi, np.zeros_like(self.hi)])
                self.lo = np.concatenate([self.lo, np.zeros_like(self.lo)])
            self.hi[k:len(slot)] = np.array([n >> 64 for n in new], np.uint64)
            self.lo[k:len(slot)] = np.array([n & 0xFFFF_FFFF_FFFF_FFFF for n in new], np.uint64)
            return self.hi[idx], self.lo[idx], None, ""


def _v4_number(text: str) -> int | None:
    """The mapped number of a canonical dotted quad (no leading zeros), else None."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    n = 0
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 3 or (len(p) > 1 and p[0] == "0"):
            return None
        octet = int(p)
        if octet > 255:
            return None
        n = n << 8 | octet
    return n | V4_MAPPED


_ADDRESSES = _AddressCache()


def _dictionary(col: pa.ChunkedArray) -> tuple[npt.NDArray[np.int32], list[str | None]]:
    """(per-row index, distinct values) of a string column."""
    enc = pc.dictionary_encode(col).combine_chunks()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    if enc.indices.null_count:
        # nulls get their own slot at the end of the dictionary
        idx = np.where(np.asarray(enc.indices.is_null()), len(enc.dictionary), idx)
        return idx.astype(np.int32), [*enc.dictionary.to_pylist(), None]
    return idx.astype(np.int32), enc.dictionary.to_pylist()


def address_numbers(*cols: pa.ChunkedArray | pa.Array,
                    names: Sequence[str] = ()) -> list[tuple[U64, U64]]:
    """The (hi, lo) halves of each address's 128-bit number (IPv4 mapped into ::ffff:0:0/96),
    per column. The columns share one dictionary (sources and destinations overlap).

    Raises `FlowBatchError` naming the column and first row that is null, not an address, or
    not in canonical form."""
    return _addresses(cols, names).numbers


@dataclass(frozen=True)
class _Addresses:
    numbers: list[tuple[U64, U64]]  # (hi, lo) per column
    index: npt.NDArray[np.int32]  # every column's rows, one after another -> `values`
    values: list[str | None]  # the distinct addresses


def _addresses(cols: Sequence[pa.ChunkedArray | pa.Array], names: Sequence[str]) -> _Addresses:
    chunks: list[pa.Array] = []
    sizes: list[int] = []
    for col in cols:
        parts = [col] if isinstance(col, pa.Array) else list(col.chunks)
        chunks.extend(p.cast(pa.string()) if p.type != pa.string() else p for p in parts)
        sizes.append(len(col))
    idx, values = _dictionary(pa.chunked_array(chunks, pa.string()))
    hi, lo, bad, reason = _ADDRESSES.lookup(values)
    if bad is not None:
        issues = []
        start = 0
        for k, size in enumerate(sizes):
            rows = np.flatnonzero(idx[start:start + size] == bad)
            if rows.size:
                name = names[k] if k < len(names) else "address"
                issues.append(Issue(name, int(rows[0]), reason))
            start += size
        raise FlowBatchError(issues)
    out: list[tuple[U64, U64]] = []
    start = 0
    for size in sizes:
        part = idx[start:start + size]
        out.append((hi[part], lo[part]))
        start += size
    return _Addresses(out, idx, values)


def address_number(text: str) -> int:
    """The 128-bit number of one address (IPv4 mapped), as stored by `address_numbers`."""
    a = ipaddress.ip_address(text.strip())
    return int(a) | V4_MAPPED if a.version == 4 else int(a)


# -- validation -------------------------------------------------------------------------------

def _first(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false)."""
    arr = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
    hits = np.flatnonzero(arr.fill_null(False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if hits.size else None


def _string(col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_string_view(t)):
            return None
        col = pc.cast(col, t)
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return pc.cast(col, pa.string())
    return None


def _integer(name: str, col: pa.ChunkedArray, target: pa.DataType,
             issues: list[Issue]) -> pa.ChunkedArray | None:
    if pa.types.is_null(col.type):
        return pc.cast(col, target)
    if not pa.types.is_integer(col.type):
        issues.append(Issue(name, None, f"expected an integer column, got {col.type}"))
        return None
    lo, hi = RANGES[name]
    mm = pc.min_max(col)
    mn, mx = mm["min"].as_py(), mm["max"].as_py()
    if mn is not None and (mn < lo or mx > hi):
        row = _first(pc.or_(pc.less(col, lo), pc.greater(col, hi)))
        value = col[row].as_py() if row is not None else None
        issues.append(Issue(name, row, f"{value} is out of range {lo}..{hi}"))
        return None
    return col if col.type == target else pc.cast(col, target)


def _timestamp(name: str, col: pa.ChunkedArray, issues: list[Issue]) -> pa.ChunkedArray | None:
    t = col.type
    if not pa.types.is_timestamp(t):
        issues.append(Issue(name, None, f"expected timestamp[us, tz=UTC], got {t}"))
        return None
    if t.tz is None:
        issues.append(Issue(name, None, "timestamp without a time zone (send UTC: "
                                        "timestamp[us, tz=UTC])"))
        return None
    if t == TS_TYPE:
        return col
    opts = pc.CastOptions(TS_TYPE, allow_time_truncate=True)
    return pc.cast(col, options=opts)


def _in_set(name: str, col: pa.ChunkedArray, allowed: Sequence[str],
            issues: list[Issue]) -> None:
    if set(pc.unique(col).to_pylist()) <= set(allowed):  # (a required column: no nulls)
        return
    ok = pc.is_in(col, value_set=pa.array(list(allowed), pa.string()))
    row = _first(pc.invert(ok))
    value = col[row].as_py() if row is not None else None
    issues.append(Issue(name, row, f"{value!r} is not one of {', '.join(allowed)}"))


@dataclass(frozen=True)
class ValidBatch:
    """A checked batch (`FLOW_SCHEMA`) with the 128-bit numbers of its addresses."""

    table: pa.Table
    addresses: _Addresses  # the src+dst address dictionary and numbers

    @property
    def src_hi(self) -> U64:
        return self.addresses.numbers[0][0]

    @property
    def src_lo(self) -> U64:
        return self.addresses.numbers[0][1]

    @property
    def dst_hi(self) -> U64:
        return self.addresses.numbers[1][0]

    @property
    def dst_lo(self) -> U64:
        return self.addresses.numbers[1][1]


# id(table) -> the addresses found checking a table this module produced (dropped with the
# table), so a batch checked by the caller (e.g. the agent channel) is not checked again
_CHECKED: dict[int, _Addresses] = {}


def validate_batch(table: pa.Table) -> pa.Table:
    """`table` as exactly `FLOW_SCHEMA`, or `FlowBatchError` naming every bad column/row."""
    return check_batch(table).table


def check_batch(table: pa.Table) -> ValidBatch:
    """`validate_batch`, keeping the address numbers it computed on the way. A table that
    this function returned earlier (the same object, not an equal one) passes at once."""
    known = _CHECKED.get(id(table))
    if known is not None:
        return ValidBatch(table, known)
    checked = _check(table)
    _remember(checked.table, checked.addresses)
    return checked


def _remember(table: pa.Table, addresses: _Addresses) -> None:
    key = id(table)
    _CHECKED[key] = addresses  # (not the table: the entry must not keep it alive)
    weakref.finalize(table, _CHECKED.pop, key, None)


def _check(table: pa.Table) -> ValidBatch:
    if not isinstance(table, pa.Table):
        raise FlowBatchError([Issue("", None, f"expected a pyarrow.Table, got "
                                              f"{type(table).__name__}")])
    issues: list[Issue] = []
    names = table.column_names
    seen: set[str] = set()
    for name in names:
        if name not in FLOW_SCHEMA.names:
            issues.append(Issue(name, None, "unknown column"))
        elif name in seen:
            issues.append(Issue(name, None, "duplicate column"))
        seen.add(name)
    for name in COLUMNS:
        if name not in seen and name not in OPTIONAL:
            issues.append(Issue(name, None, "missing required column"))
    if issues:
        raise FlowBatchError(issues)

    n = table.num_rows
    out: dict[str, pa.ChunkedArray] = {}
    for name, kind, target, nullable in _PLAN:
        if name not in seen:
            continue
        col = table.column(name)
        conv: pa.ChunkedArray | None
        if kind == "timestamp":
            conv = _timestamp(name, col, issues)
        elif kind == "integer":
            conv = _integer(name, col, target, issues)
        else:
            conv = _string(col)
            if conv is None:
                issues.append(Issue(name, None, f"expected a string column, got {col.type}"))
        if conv is None:
            continue
        if not nullable and conv.null_count:
            issues.append(Issue(name, _first(conv.is_null()), "null in a required column"))
            continue
        out[name] = conv
    for name in ("first_seen", "last_seen"):
        if name not in seen and "ts" in out:
            out[name] = out["ts"]
    if "direction" in out and n:
        _in_set("direction", out["direction"], DIRECTIONS, issues)
    if "decision" in out and n:
        _in_set("decision", out["decision"], DECISIONS, issues)
    if "reporter" in out and n and "" in pc.unique(out["reporter"]).to_pylist():
        issues.append(Issue("reporter", _first(pc.equal(out["reporter"], "")),
                            "empty reporter"))
    if "first_seen" in out and "last_seen" in out and n:
        bad = pc.greater(out["first_seen"], out["last_seen"])
        if pc.any(bad).as_py():
            issues.append(Issue("last_seen", _first(bad), "last_seen is before first_seen"))
    addresses: _Addresses | None = None
    if "src_ip" in out and "dst_ip" in out:
        try:
            addresses = _addresses((out["src_ip"], out["dst_ip"]), ("src_ip", "dst_ip"))
        except FlowBatchError as exc:
            issues.extend(exc.issues)
    if issues or addresses is None:
        raise FlowBatchError(issues[:MAX_ISSUES])
    arrays = [out[name] if name in out else pa.chunked_array([pa.nulls(n, target)])
              for name, _, target, _ in _PLAN]
    return ValidBatch(pa.Table.from_arrays(arrays, schema=FLOW_SCHEMA), addresses)


def empty_batch() -> pa.Table:
    return FLOW_SCHEMA.empty_table()


def name_workloads(table: pa.Table, owners: dict[str, str]) -> pa.Table:
    """`table` (of `FLOW_SCHEMA`) with null `src_workload`/`dst_workload` filled from
    `owners` (canonical address -> workload name): an agent knows only its own side, the
    control plane knows whose the far end is. Names already there are kept. A checked batch
    stays checked (only workload names change), so the store does not check it again."""
    n = table.num_rows
    if not owners or n == 0:
        return table
    addresses = _CHECKED.get(id(table))
    if addresses is None:  # not checked here: one dictionary over both sides
        idx, values = _dictionary(pa.chunked_array(
            [*table.column("src_ip").chunks, *table.column("dst_ip").chunks], pa.string()))
    else:
        idx, values = addresses.index, addresses.values
    found = pa.array([owners.get(ip) if ip is not None else None for ip in values],
                     pa.string())
    if found.null_count == len(found):
        return table
    for k, side in enumerate(("src", "dst")):
        name = f"{side}_workload"
        col = table.column(name)
        if col.null_count == 0:
            continue
        names = found.take(pa.array(idx[k * n:(k + 1) * n]))
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pc.coalesce(col, names))
    if addresses is not None and id(table) not in _CHECKED:
        _remember(table, addresses)
    return table
