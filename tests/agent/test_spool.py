"""The on-disk spool: durable, bounded, ids never reused, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bulkhead.agent.core import batch_id
from bulkhead.agent.spool import Spool, SpoolError


def rows(n: int, tag: str = "x") -> list[dict[str, object]]:
    return [{"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": 6, "direction": "out",
             "process": tag, "connections": i + 1} for i in range(n)]


def test_put_rows_ack_and_restart(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    assert sp.next_seq == 0 and sp.ids() == ()
    for seq in range(3):
        sp.put(batch_id(seq), seq, rows(2, str(seq)))
    assert sp.ids() == (batch_id(0), batch_id(1), batch_id(2))
    assert sp.rows(batch_id(1)) == rows(2, "1")
    sp.ack(batch_id(0))
    again = Spool(tmp_path)  # a restart finds the same batches under the same ids
    assert again.ids() == (batch_id(1), batch_id(2))
    assert again.rows(batch_id(2)) == rows(2, "2")
    assert again.next_seq == 3


def test_an_acknowledged_id_is_never_reused_after_restart(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.put(batch_id(0), 0, rows(1))
    sp.put(batch_id(1), 1, rows(1))
    sp.ack(batch_id(0))
    sp.ack(batch_id(1))  # empty spool: the sequence must still move on
    assert Spool(tmp_path).next_seq == 2


def test_the_bound_drops_the_oldest_and_counts_what_it_dropped(tmp_path: Path) -> None:
    one = len(json.dumps({"batch_id": batch_id(0), "rows": rows(10)}, separators=(",", ":")))
    sp = Spool(tmp_path, max_bytes=int(one * 2.5))
    assert sp.put(batch_id(0), 0, rows(10)).evicted == ()
    assert sp.put(batch_id(1), 1, rows(10)).evicted == ()
    res = sp.put(batch_id(2), 2, rows(10))
    assert res.evicted == (batch_id(0),) and res.dropped_flows == 10
    assert sp.ids() == (batch_id(1), batch_id(2))
    again = Spool(tmp_path, max_bytes=int(one * 2.5))
    assert again.dropped_flows == 10 and again.state["dropped_batches"] == 1
    sp2 = Spool(tmp_path / "n", max_batches=2)
    for seq in range(4):
        sp2.put(batch_id(seq), seq, rows(1))
    assert sp2.ids() == (batch_id(2), batch_id(3)) and sp2.dropped_flows == 2


def test_files_are_private_and_interrupted_writes_are_discarded(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.put(batch_id(0), 0, rows(1))
    (path,) = tmp_path.glob("b*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    (tmp_path / f".{batch_id(1)}.n1.json.tmp").write_text("{half")
    again = Spool(tmp_path)
    assert again.ids() == (batch_id(0),) and not list(tmp_path.glob(".*.tmp"))


def test_bad_state_and_batches_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("[]")
    with pytest.raises(SpoolError, match=r"state\.json: field next_seq"):
        Spool(tmp_path)
    (tmp_path / "state.json").write_text('{"next_seq": 0}')
    sp = Spool(tmp_path)
    (tmp_path / f"{batch_id(5)}.n1.json").write_text("nope")
    sp = Spool(tmp_path)
    assert sp.next_seq == 6
    with pytest.raises(SpoolError, match=r"b000000000005\.n1\.json: unreadable batch"):
        sp.rows(batch_id(5))
    with pytest.raises(SpoolError, match="bad batch id"):
        sp.put("../x", 1, [])
