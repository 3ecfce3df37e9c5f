"""The flows CSV of `bulkhead policy evaluate|generate` (docs/policy-semantics.md §5).

A header with at least `src_ip,dst_ip,proto,dst_port`; optional `process`, `unit`, `user`,
`ts` (epoch seconds or ISO 8601) and `count`. Parsing is all-or-nothing: every bad cell is
reported with its line and column, and nothing is returned.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from bulkhead.domain.addresses import canonical_ip
from bulkhead.domain.errors import Issue, PolicyError
from bulkhead.domain.ports import PortSpecError, parse_proto

REQUIRED = ("src_ip", "dst_ip", "proto", "dst_port")
MAX_ISSUES = 50


@dataclass
class FlowTable:
    header: list[str]
    rows: list[list[str]]
    src_ip: list[str]
    dst_ip: list[str]
    proto: np.ndarray  # int16
    dst_port: np.ndarray  # int32, -1 when empty
    process: list[str | None] | None = None
    unit: list[str | None] | None = None
    user: list[str | None] | None = None
    ts: np.ndarray | None = None  # float64 epoch seconds
    count: np.ndarray | None = None  # int64

    def __len__(self) -> int:
        return len(self.rows)


def parse_ts(text: str) -> float:
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not epoch seconds or ISO 8601: {text!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"ISO 8601 time needs a zone (e.g. Z or +00:00): {text!r}")
    return dt.timestamp()


def read_flows(text: str, source: str = "<flows>") -> FlowTable:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise PolicyError([Issue("", "empty file: expected a header line", 1, source)]) from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise PolicyError([Issue("", f"header lacks column(s): {', '.join(missing)}", 1,
                                 source)])
    col = {name: i for i, name in enumerate(header)}
    issues: list[Issue] = []
    rows: list[list[str]] = []
    src: list[str] = []
    dst: list[str] = []
    protos: list[int] = []
    ports: list[int] = []
    opt: dict[str, list[str | None] | None] = {
        k: ([] if k in col else None) for k in ("process", "unit", "user")}
    ts: list[float] | None = [] if "ts" in col else None
    counts: list[int] | None = [] if "count" in col else None
    ip_cache: dict[str, str] = {}

    def bad(line: int, column: str, message: str) -> None:
        if len(issues) < MAX_ISSUES:
            issues.append(Issue(column, message, line, source))

    for line, row in enumerate(reader, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            bad(line, "", f"expected {len(header)} fields, got {len(row)}")
            continue
        rows.append(row)
        for name, out in (("src_ip", src), ("dst_ip", dst)):
            cell = row[col[name]]
            ip = ip_cache.get(cell)
            if ip is None:
                try:
                    ip = canonical_ip(cell)
                except ValueError as exc:
                    bad(line, name, str(exc))
                    ip = "0.0.0.0"
                else:
                    ip_cache[cell] = ip
            out.append(ip)
        try:
            protos.append(parse_proto(row[col["proto"]]))
        except PortSpecError as exc:
            bad(line, "proto", str(exc))
            protos.append(0)
        cell = row[col["dst_port"]].strip()
        if cell in ("", "-"):
            ports.append(-1)
        elif (cell.isascii() and cell.isdigit()) and int(cell) <= 65535:
            ports.append(int(cell))
        else:
            bad(line, "dst_port", f"not a port number: {cell!r}")
            ports.append(-1)
        for k, lst in opt.items():
            if lst is not None:
                v = row[col[k]].strip()
                lst.append(v or None)
        if ts is not None:
            try:
                ts.append(parse_ts(row[col["ts"]]))
            except ValueError as exc:
                bad(line, "ts", str(exc))
                ts.append(0.0)
        if counts is not None:
            v = row[col["count"]].strip()
            if v == "":
                counts.append(1)
            elif (v.isascii() and v.isdigit()):
                counts.append(int(v))
            else:
                bad(line, "count", f"not a non-negative integer: {v!r}")
                counts.append(0)
    if issues:
        raise PolicyError(issues)
    return FlowTable(header, rows, src, dst, np.asarray(protos, dtype=np.int16),
                     np.asarray(ports, dtype=np.int32), opt["process"], opt["unit"],
                     opt["user"], None if ts is None else np.asarray(ts, dtype=np.float64),
                     None if counts is None else np.asarray(counts, dtype=np.int64))


def read_flows_file(path: str) -> FlowTable:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise PolicyError([Issue("", f"cannot read: {exc.strerror}", None, path)]) from None
    return read_flows(text, path)
