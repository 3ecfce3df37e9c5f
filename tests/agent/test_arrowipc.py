"""The agent's Arrow IPC writer, checked against pyarrow's reader (the server's decoder)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.agent.arrowipc import FLOW_COLUMNS, EncodeError, encode_flows
from bulkhead.flows.schema import FLOW_SCHEMA
from bulkhead.server.services.flow_batches import decode_flows, prepare_flows

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ROW = st.fixed_dictionaries(
    {"ts": st.floats(0, 4e9), "src_ip": st.sampled_from(["10.0.0.1", "2001:db8::7"]),
     "dst_ip": st.sampled_from(["10.0.0.2", "192.0.2.9"]), "proto": st.integers(0, 255),
     "direction": st.sampled_from(["in", "out"])},
    optional={"first_seen": st.floats(0, 4e9), "last_seen": st.floats(0, 4e9),
              "dst_port": st.integers(-1, 65535), "process": TEXT, "unit": TEXT, "user": TEXT,
              "connections": st.integers(0, 2**63 - 1), "bytes": st.integers(0, 2**63 - 1),
              "decision": st.sampled_from(["allowed", "blocked_by_deny"]), "rule": TEXT})


def expected(rows: list[dict[str, Any]]) -> pa.Table:
    """What the rows mean, built by pyarrow from Python values (defaults as the JSON upload)."""
    defaults = {"dst_port": -1, "connections": 1, "bytes": 0, "decision": "unknown"}
    out = {}
    for col in FLOW_COLUMNS:
        field = FLOW_SCHEMA.field(col.name)
        values = []
        for r in rows:
            v = r.get(col.name, defaults.get(col.name))
            if col.name in ("first_seen", "last_seen") and v is None:
                v = r["ts"]
            if col.kind == "timestamp":
                v = math.floor(v * 1e6)
            values.append(v)
        arr = pa.array(values, pa.int64() if col.kind == "timestamp" else field.type)
        out[col.name] = arr.cast(field.type) if col.kind == "timestamp" else arr
    return pa.table(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(ROW, max_size=40))
def test_pyarrow_reads_back_exactly_the_rows(rows: list[dict[str, Any]]) -> None:
    table = pa.ipc.open_stream(encode_flows(rows)).read_all()
    table.validate(full=True)
    assert table.schema.names == [c.name for c in FLOW_COLUMNS]
    for col in FLOW_COLUMNS:
        assert table.schema.field(col.name).nullable == col.nullable
    assert table.cast(expected(rows).schema).equals(expected(rows))


def test_the_server_takes_it_as_it_takes_json() -> None:
    rows = [{"ts": 1_700_000_000.25, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": 6,
             "direction": "out", "dst_port": 443, "connections": 3, "bytes": 999,
             "decision": "allowed", "process": "curl"},
            {"ts": 1_700_000_000.25, "src_ip": "10.0.0.9", "dst_ip": "10.0.0.1", "proto": 17,
             "direction": "in", "unit": "dns.service", "first_seen": 1_699_999_990.0}]
    import msgspec

    _, from_arrow = decode_flows(encode_flows(rows), "application/vnd.apache.arrow.stream",
                                 "b1")
    _, from_json = decode_flows(msgspec.json.encode({"batch_id": "b1", "flows": rows}),
                                "application/json")
    a = prepare_flows(from_arrow, workload="web-1")
    j = prepare_flows(from_json, workload="web-1")
    assert a.equals(j)


def test_no_rows_is_an_empty_batch_with_the_schema() -> None:
    table = pa.ipc.open_stream(encode_flows([])).read_all()
    assert table.num_rows == 0 and table.schema.names == [c.name for c in FLOW_COLUMNS]
    for name in table.schema.names:  # the store's own types: nothing to cast on arrival
        assert table.schema.field(name).type == FLOW_SCHEMA.field(name).type


@pytest.mark.parametrize(("row", "message"), [
    ({"src_ip": None}, "row 1: column 'src_ip' is required"),
    ({"proto": 70000}, "row 1: column 'proto'"),
    ({"dst_port": "443"}, "row 1: column 'dst_port': expected an integer"),
    ({"ts": float("nan")}, "row 1: column 'ts': expected epoch seconds"),
    ({"process": "\ud800"}, "row 1: column 'process'"),
    ({"connections": True}, "row 1: column 'connections': expected an integer"),
])
def test_a_row_it_cannot_write_is_named(row: dict[str, Any], message: str) -> None:
    good = {"ts": 1.0, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": 6,
            "direction": "in"}
    with pytest.raises(EncodeError, match=message.replace("(", r"\(")):
        encode_flows([good, {**good, **row}])
