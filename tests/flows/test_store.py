"""The flow schema check and the DuckDB flow store: idempotent, atomic appends (also across
restarts and threads), filters and keyset pages against a Python reference, aggregation,
edges and retention."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from bulkhead.flows import store as store_mod
from bulkhead.flows.schema import FLOW_SCHEMA, FlowBatchError, validate_batch
from bulkhead.flows.store import DuckDBFlowStore, FlowFilter, FlowStore
from tests.flows import T0, label_rows, make_batch

Row = dict[str, Any]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBFlowStore]:
    s = DuckDBFlowStore(tmp_path / "flows.duckdb")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBFlowStore,
                                                                       list[Row]]]:
    """A store with 6,000 flows in 3 batches and the workload labels, plus the rows."""
    s = DuckDBFlowStore(tmp_path_factory.mktemp("loaded") / "flows.duckdb")
    tables = [make_batch(2000, seed=i, start=T0 + timedelta(hours=6 * i)) for i in range(3)]
    for i, t in enumerate(tables):
        assert s.append(t, batch_id=f"b{i}") == 2000
    s.set_workloads(label_rows())
    rows = [r for t in tables for r in validate_batch(t).to_pylist()]
    try:
        yield s, rows
    finally:
        s.close()


def test_the_duckdb_store_implements_the_interface(store: DuckDBFlowStore) -> None:
    assert isinstance(store, FlowStore)


# -- the schema check ---------------------------------------------------------------------

def test_a_batch_is_normalised_to_exactly_the_flow_schema() -> None:
    t = make_batch(10).drop_columns(["first_seen", "last_seen", "src_port", "unit", "rule"])
    t = t.set_column(t.schema.get_field_index("proto"), "proto",
                     pa.array(t.column("proto").to_numpy().astype(np.int64)))
    out = validate_batch(t)
    assert out.schema.equals(FLOW_SCHEMA)
    assert out.column("first_seen").equals(out.column("ts"))
    assert out.column("src_port").null_count == 10
    assert validate_batch(out) is out  # a checked batch passes at once


def _with(t: pa.Table, name: str, values: Any) -> pa.Table:
    arr = values if isinstance(values, pa.Array) else pa.array(values)
    i = t.schema.get_field_index(name)
    return t.set_column(i, name, arr) if i >= 0 else t.append_column(name, arr)


def _put(t: pa.Table, name: str, row: int, value: Any) -> pa.Table:
    values = t.column(name).to_pylist()
    values[row] = value
    return _with(t, name, pa.array(values, t.schema.field(name).type))


BAD_CELLS = [
    ("dst_port", 3, 70000, "out of range"),
    ("proto", 5, 300, "out of range"),
    ("src_port", 2, -1, "out of range"),
    ("connections", 7, -5, "out of range"),
    ("src_ip", 4, "10.0.0.256", "not an IP address"),
    ("dst_ip", 6, "2001:DB8::11", "not canonical"),
    ("src_ip", 1, None, "null"),
    ("decision", 8, "dropped", "not one of"),
    ("direction", 9, "sideways", "not one of"),
    ("reporter", 2, None, "null"),
    ("reporter", 3, "", "empty"),
]


@pytest.mark.parametrize(("column", "row", "value", "message"), BAD_CELLS)
def test_a_bad_cell_is_named_by_column_and_row(column: str, row: int, value: Any,
                                               message: str) -> None:
    t = make_batch(12, seed=1)
    if column in ("proto",):
        t = _with(t, column, pa.array(t.column(column).to_numpy().astype(np.int64)))
    t = _put(t, column, row, value)
    with pytest.raises(FlowBatchError) as info:
        validate_batch(t)
    issue = info.value.issues[0]
    assert (issue.column, issue.row) == (column, row)
    assert message in issue.message
    assert f"row {row}, column '{column}'" in str(info.value)


def test_last_seen_before_first_seen_is_named() -> None:
    t = make_batch(5)
    ls = t.column("last_seen").to_pylist()
    ls[3] = t.column("first_seen")[3].as_py() - timedelta(seconds=1)
    with pytest.raises(FlowBatchError) as info:
        validate_batch(_with(t, "last_seen", pa.array(ls, FLOW_SCHEMA.field("ts").type)))
    assert (info.value.issues[0].column, info.value.issues[0].row) == ("last_seen", 3)


@pytest.mark.parametrize(("change", "column", "message"), [
    (lambda t: t.drop_columns(["decision"]), "decision", "missing"),
    (lambda t: t.append_column("colour", pa.array(["red"] * t.num_rows)), "colour", "unknown"),
    (lambda t: _with(t, "ts", t.column("ts").cast(pa.timestamp("us"))), "ts", "time zone"),
    (lambda t: _with(t, "dst_port", pa.array(["80"] * t.num_rows)), "dst_port", "integer"),
    (lambda t: _with(t, "process", pa.array([1] * t.num_rows)), "process", "string"),
])
def test_a_bad_column_is_named(change: Callable[[pa.Table], pa.Table], column: str,
                               message: str) -> None:
    with pytest.raises(FlowBatchError) as info:
        validate_batch(change(make_batch(4)))
    assert info.value.issues[0].column == column
    assert info.value.issues[0].row is None
    assert message in info.value.issues[0].message


def test_every_problem_is_reported_at_once() -> None:
    t = _put(_put(make_batch(6), "dst_port", 2, 99999), "decision", 4, "nope")
    with pytest.raises(FlowBatchError) as info:
        validate_batch(t)
    assert {(i.column, i.row) for i in info.value.issues} == {("dst_port", 2), ("decision", 4)}


# -- appending ----------------------------------------------------------------------------

def test_the_same_batch_id_is_stored_once(store: DuckDBFlowStore) -> None:
    t = make_batch(300)
    assert store.append(t, batch_id="a") == 300
    assert store.append(t, batch_id="a") == 0
    assert store.append(make_batch(50, seed=9), batch_id="a") == 0  # the id decides
    with pytest.raises(FlowBatchError):  # a bad batch is refused, whatever its id
        store.append(_put(make_batch(5), "proto", 1, None), batch_id="a")
    assert store.count() == 300
    assert store.append(t, batch_id="b") == 300
    assert store.count() == 600


def test_an_empty_batch_still_claims_its_id(store: DuckDBFlowStore) -> None:
    assert store.append(make_batch(0), batch_id="empty") == 0
    assert store.stored_batch("empty") is not None
    assert store.append(make_batch(5), batch_id="empty") == 0


def test_a_stored_batch_id_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "f.duckdb"
    with DuckDBFlowStore(path) as s:
        assert s.append(make_batch(100), batch_id="x") == 100
        mark = s.high_water()
    with DuckDBFlowStore(path) as s:
        assert s.append(make_batch(100), batch_id="x") == 0
        assert s.count() == 100
        assert s.append(make_batch(10, seed=3), batch_id="y") == 10
        ids = s.query(FlowFilter(), limit=1000)[0].column("id").to_pylist()
    assert len(set(ids)) == 110 and min(ids) == 1 and max(ids) == mark + 10


def test_an_invalid_batch_stores_nothing_and_keeps_its_id_free(store: DuckDBFlowStore) -> None:
    bad = _put(make_batch(20), "dst_port", 7, 123456)
    with pytest.raises(FlowBatchError):
        store.append(bad, batch_id="r")
    assert store.count() == 0 and store.stored_batch("r") is None
    assert store.append(make_batch(20), batch_id="r") == 20


@pytest.mark.parametrize("path", ["log", "load"])
def test_rows_and_batch_id_commit_together(store: DuckDBFlowStore,
                                           monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """A failed log write (fsync) fails the append and leaves its id free; a failed load
    rolls back ids and rows together and keeps the batch logged (and readable later)."""
    if path == "log":
        real_fsync = store_mod.os.fsync
        failures = [OSError("fsync failed")]

        def boom(fd: int) -> None:  # fails once (the write), then works (the cut)
            if failures:
                raise failures.pop()
            real_fsync(fd)
        monkeypatch.setattr(store_mod.os, "fsync", boom)
        with pytest.raises(OSError, match="fsync"):
            store.append(make_batch(30), batch_id="t")
        monkeypatch.undo()
        assert sum(p.stat().st_size for p in _segments(store)) == 0  # the frame was cut
        assert store.stored_batch("t") is None and store.count() == 0
    else:
        assert store.append(make_batch(30), batch_id="t") == 30  # durable in the log
        monkeypatch.setattr(store_mod, "_INSERT", "INSERT INTO flows SELECT * FROM no_table")
        with pytest.raises(Exception, match="no_table"):
            store.count()
        monkeypatch.undo()
        assert store.count() == 30
    assert store.append(make_batch(30), batch_id="t") == (30 if path == "log" else 0)
    assert store.count() == 30 and store.stored_batch("t") is not None


def _segments(s: DuckDBFlowStore) -> list[Path]:
    return sorted(Path(s.path + ".log").glob("*.seg"))


def test_logged_batches_are_loaded_in_order(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOAD_ROWS", 1000)
    monkeypatch.setattr(store_mod, "LOAD_S", 60.0)
    with DuckDBFlowStore(tmp_path / "s.duckdb") as s:
        s.append(make_batch(300), batch_id="s0")
        assert s._pending_rows == 300  # acknowledged (in the log), not yet in DuckDB
        for i in range(1, 6):
            s.append(make_batch(300, seed=i), batch_id=f"s{i}")
        deadline = time.monotonic() + 10
        while s._pending_rows >= 1000 and time.monotonic() < deadline:
            time.sleep(0.01)  # the loader was woken at 1,000 pending rows
        assert s._pending_rows < 1000
        s.append(make_batch(300, seed=9), batch_id="s9")
        page, _ = s.query(FlowFilter(), limit=10_000)  # a read loads the rest first
        assert s._pending_rows == 0
        assert sorted(page.column("id").to_pylist()) == list(range(1, 2101))
    assert _segments(s) == []  # closed with everything loaded: the log is empty


def test_the_loader_loads_whole_groups_not_each_trickle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its first group the background loader loads only full ones: draining to empty
    under steady ingest made many small DuckDB commits."""
    monkeypatch.setattr(store_mod, "LOAD_ROWS", 1000)
    with DuckDBFlowStore(tmp_path / "s.duckdb") as s:
        s._stopping = True  # no background loader: this test drives the loads
        s._wake.set()
        s._loader.join()
        for i in range(7):
            s.append(make_batch(300, seed=i), batch_id=f"s{i}")
        s._load(full_only=True)  # 900 rows, then 900 (a full group), not the last 300
        assert s._pending_rows == 300
        s._load(full_only=True)  # the first group is always loaded
        assert s._pending_rows == 0
        assert s.count() == 2100


def test_a_duplicate_id_while_pending_stores_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOAD_S", 60.0)
    with DuckDBFlowStore(tmp_path / "d.duckdb") as s:
        assert s.append(make_batch(100), batch_id="p") == 100
        assert "p" in s._logged and s._pending_rows == 100  # not loaded yet
        assert s.append(make_batch(100, seed=4), batch_id="p") == 0
        assert s._pending_rows == 100
        assert s.count() == 100


def _crash(s: DuckDBFlowStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Close without loading, as if the process died after acknowledging."""
    monkeypatch.setattr(s, "_load_locked", lambda upto=None: None)
    s.close()


def test_acknowledged_batches_survive_a_crash_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOAD_S", 60.0)
    path = tmp_path / "s.duckdb"
    s = DuckDBFlowStore(path)
    assert s.append(make_batch(400), batch_id="a") == 400
    assert s.append(make_batch(100, seed=1), batch_id="b") == 100
    assert s.append(make_batch(0), batch_id="e") == 0
    _crash(s, monkeypatch)
    assert _segments(s)
    with open(_segments(s)[-1], "ab") as f:  # a torn, unacknowledged write at the end
        f.write(store_mod._MAGIC + b"\x07" * 20)
    with DuckDBFlowStore(path) as s2:
        assert s2._pending_rows == 500  # replayed, not loaded yet
        assert s2.count() == 500
        assert s2.stored_batch("e") is not None
        for bid in ("a", "b", "e"):
            assert s2.append(make_batch(10, seed=7), batch_id=bid) == 0
        assert s2.append(make_batch(5, seed=2), batch_id="c") == 5
        ids = s2.query(FlowFilter(), limit=1000)[0].column("id").to_pylist()
        assert len(set(ids)) == 505 and max(ids) <= 505
    with DuckDBFlowStore(path) as s3:
        assert s3._pending_rows == 0 and s3.count() == 505


def test_a_crash_after_loading_before_deleting_the_log_duplicates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOAD_S", 60.0)
    path = tmp_path / "s.duckdb"
    with DuckDBFlowStore(path) as s:
        s.append(make_batch(300), batch_id="a")
        s.append(make_batch(200, seed=1), batch_id="b")
        saved = {p: p.read_bytes() for p in _segments(s)}
        assert s.count() == 500  # loaded into DuckDB
    assert _segments(s) == []
    for p, data in saved.items():  # the segments come back, as if never deleted
        p.write_bytes(data)
    with DuckDBFlowStore(path) as s2:
        assert s2._pending_rows == 0  # every id is in DuckDB already: skipped
        assert s2.count() == 500
        assert s2.append(make_batch(1, seed=5), batch_id="c") == 1
        assert s2.high_water() == 501
    assert _segments(s2) == []


def test_concurrent_appenders_share_the_log_and_survive_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOAD_S", 60.0)
    path = tmp_path / "c.duckdb"
    s = DuckDBFlowStore(path)
    fsyncs: list[int] = []
    real_fsync = store_mod.os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)
    monkeypatch.setattr(store_mod.os, "fsync", counting)
    stored: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(15):
            n = s.append(make_batch(50, seed=k * 100 + i), batch_id=f"w{k}-{i}")
            n += s.append(make_batch(50, seed=k * 100 + i), batch_id=f"w{k}-{i}")  # a retry
            with lock:
                stored.append(n)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert stored == [50] * 120
    assert len(fsyncs) <= 120  # at most one per batch (concurrent ones are grouped)
    high = s.high_water()
    _crash(s, monkeypatch)
    monkeypatch.undo()
    with DuckDBFlowStore(path) as s2:
        assert s2.count() == 6000 and s2.high_water() == high
        page, _ = s2.query(FlowFilter(), limit=10_000)
        assert len(set(page.column("id").to_pylist())) == 6000


def test_a_file_with_staged_rows_is_migrated(tmp_path: Path) -> None:
    """Files of the staging version keep unmoved batches in a `staged` table."""
    import duckdb
    path = tmp_path / "m.duckdb"
    DuckDBFlowStore(path).close()
    part = store_mod._prepare(make_batch(50))
    part = part.add_column(0, "id", pa.array(np.arange(1, 51, dtype=np.int64)))
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE staged (first_id BIGINT NOT NULL, rows BIGINT NOT NULL, "
                "data BLOB NOT NULL)")
    con.execute("INSERT INTO staged VALUES (1, 50, ?)", [store_mod._ipc(part)])
    con.execute("INSERT INTO batches VALUES ('old', now(), 50, 1)")
    con.close()
    with DuckDBFlowStore(path) as s:
        assert s.count() == 50
        assert s.append(make_batch(50), batch_id="old") == 0
        assert s.append(make_batch(5, seed=3), batch_id="new") == 5
        assert s.high_water() == 55
    con = duckdb.connect(str(path))
    assert not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'staged'"
                           ).fetchall()
    con.close()


def test_concurrent_appends_store_each_batch_once(store: DuckDBFlowStore) -> None:
    batches = {f"c{i}": make_batch(200, seed=i) for i in range(24)}
    stored: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(k: int) -> None:
        barrier.wait()
        # every batch id is sent by two threads, in different orders
        names = sorted(batches)[k % 3::3]
        for name in (names if k < 3 else reversed(names)):
            n = store.append(batches[name], batch_id=name)
            with lock:
                stored.append(n)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(stored) == [0] * 24 + [200] * 24
    assert store.count() == 24 * 200
    ids = store.aggregate(FlowFilter(), [], order_by=None)
    assert ids.column("flows")[0].as_py() == 4800
    page, _ = store.query(FlowFilter(), limit=10_000)
    assert len(set(page.column("id").to_pylist())) == 4800


def test_reads_run_in_other_threads_while_appending(store: DuckDBFlowStore) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                n = store.count()
                assert n % 100 == 0
                store.query(FlowFilter(ports=((443, 443),)), limit=50)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for th in readers:
        th.start()
    for i in range(15):
        store.append(make_batch(100, seed=i), batch_id=f"r{i}")
    done.set()
    for th in readers:
        th.join()
    assert not errors
    assert store.count() == 1500


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    s = DuckDBFlowStore(tmp_path / "c.duckdb")
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.count()


# -- filters and pages --------------------------------------------------------------------

def _in_cidr(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


LABELS = dict(label_rows())
FILTERS: list[tuple[FlowFilter, Callable[[Row], bool]]] = [
    (FlowFilter(start=T0 + timedelta(hours=3), end=T0 + timedelta(hours=9)),
     lambda r: T0 + timedelta(hours=3) <= r["ts"] < T0 + timedelta(hours=9)),
    (FlowFilter(src_workloads=("web-1", "web-2")), lambda r: r["src_workload"] in ("web-1",
                                                                                    "web-2")),
    (FlowFilter(workloads=("db-1",)), lambda r: "db-1" in (r["src_workload"],
                                                            r["dst_workload"])),
    (FlowFilter(src_labels=(("app", ("shop",)), ("role", ("web", "api"))),
                dst_labels=(("env", ("dev",)),)),
     lambda r: LABELS.get(r["src_workload"], {}).get("app") == "shop"
     and LABELS.get(r["src_workload"], {}).get("role") in ("web", "api")
     and LABELS.get(r["dst_workload"], {}).get("env") == "dev"),
    (FlowFilter(src_ips=("10.0.0.0/16",)), lambda r: _in_cidr(r["src_ip"], "10.0.0.0/16")),
    (FlowFilter(dst_ips=("2001:db8::/32",)), lambda r: _in_cidr(r["dst_ip"], "2001:db8::/32")),
    (FlowFilter(ips=("203.0.113.7", "10.0.3.0-10.0.3.255")),
     lambda r: "203.0.113.7" in (r["src_ip"], r["dst_ip"])
     or any(_in_cidr(ip, "10.0.3.0/24") for ip in (r["src_ip"], r["dst_ip"]))),
    (FlowFilter(protos=(17,), ports=((0, 100), (3306, 3306))),
     lambda r: r["proto"] == 17 and (r["dst_port"] <= 100 or r["dst_port"] == 3306)),
    (FlowFilter(decisions=("blocked_by_deny", "allowed"), processes=("nginx",)),
     lambda r: r["decision"] in ("blocked_by_deny", "allowed") and r["process"] == "nginx"),
    (FlowFilter(users=("alice",), directions=("in",), reporters=("db-1", "web-1")),
     lambda r: r["user"] == "alice" and r["direction"] == "in"
     and r["reporter"] in ("db-1", "web-1")),
]


@pytest.mark.parametrize(("flt", "ref"), FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_match_a_python_reference(loaded: tuple[DuckDBFlowStore, list[Row]],
                                          flt: FlowFilter, ref: Callable[[Row], bool]) -> None:
    s, rows = loaded
    want = sorted((r["ts"], r["src_ip"], r["dst_ip"], r["dst_port"], r["bytes"])
                  for r in rows if ref(r))
    page, cursor = s.query(flt, limit=10_000)
    got = sorted((r["ts"], r["src_ip"], r["dst_ip"], r["dst_port"], r["bytes"])
                 for r in page.to_pylist())
    assert cursor is None
    assert got == want and want
    assert s.count(flt) == len(want)


@pytest.mark.parametrize("newest_first", [False, True])
def test_keyset_pages_cover_every_flow_once_in_order(
        loaded: tuple[DuckDBFlowStore, list[Row]], newest_first: bool) -> None:
    s, _ = loaded
    flt = FlowFilter(protos=(6,))
    seen: list[tuple[datetime, int]] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = s.query(flt, limit=333, cursor=cursor, newest_first=newest_first)
        seen += zip(page.column("ts").to_pylist(), page.column("id").to_pylist(), strict=True)
        pages += 1
        if cursor is None:
            break
    assert pages > 3
    assert len(seen) == len({i for _, i in seen}) == s.count(flt)
    assert seen == sorted(seen, reverse=newest_first)


def test_pages_keep_their_snapshot_while_flows_arrive(store: DuckDBFlowStore) -> None:
    store.append(make_batch(500), batch_id="one")
    page, cursor = store.query(FlowFilter(), limit=200)
    store.append(make_batch(500, seed=5, start=T0 - timedelta(days=1)), batch_id="two")
    total = page.num_rows
    while cursor:
        page, cursor = store.query(FlowFilter(), limit=200, cursor=cursor)
        total += page.num_rows
    assert total == 500
    assert store.query(FlowFilter(), limit=2000)[0].num_rows == 1000


def test_a_cursor_only_continues_its_own_query(store: DuckDBFlowStore) -> None:
    store.append(make_batch(50), batch_id="a")
    _, cursor = store.query(FlowFilter(protos=(6,)), limit=5)
    assert cursor
    with pytest.raises(ValueError, match="other filters"):
        store.query(FlowFilter(protos=(17,)), limit=5, cursor=cursor)
    with pytest.raises(ValueError, match="cursor"):
        store.query(FlowFilter(), limit=5, cursor="garbage")


def test_invalid_filters_are_refused() -> None:
    with pytest.raises(ValueError, match="src_ips"):
        FlowFilter(src_ips=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="decisions"):
        FlowFilter(decisions=("dropped",))
    with pytest.raises(ValueError, match="start"):
        FlowFilter(start=datetime(2025, 1, 1))  # naive on purpose


# -- aggregation, edges, retention --------------------------------------------------------

def _reference(rows: list[Row], key: Callable[[Row], tuple[Any, ...]]) -> dict[Any, Row]:
    acc: dict[Any, Row] = {}
    sources: dict[Any, set[str]] = defaultdict(set)
    for r in rows:
        k = key(r)
        a = acc.setdefault(k, {"flows": 0, "connections": 0, "bytes": 0,
                               "first_seen": r["first_seen"], "last_seen": r["last_seen"]})
        a["flows"] += 1
        a["connections"] += r["connections"]
        a["bytes"] += r["bytes"]
        a["first_seen"] = min(a["first_seen"], r["first_seen"])
        a["last_seen"] = max(a["last_seen"], r["last_seen"])
        sources[k].add(r["src_ip"])
    for k, a in acc.items():
        a["sources"] = len(sources[k])
    return acc


def _label(r: Row, side: str, key: str) -> str | None:
    return LABELS.get(r[f"{side}_workload"], {}).get(key)


@pytest.mark.parametrize(("group_by", "key"), [
    (["src.app", "dst.app", "decision"],
     lambda r: (_label(r, "src", "app"), _label(r, "dst", "app"), r["decision"])),
    (["port"], lambda r: (r["proto"], r["dst_port"])),
    (["workload", "dst.role"], lambda r: (r["src_workload"], r["dst_workload"],
                                          _label(r, "dst", "role"))),
    ([], lambda r: ()),
])
def test_aggregation_matches_a_python_reference(loaded: tuple[DuckDBFlowStore, list[Row]],
                                                group_by: list[str],
                                                key: Callable[[Row], tuple[Any, ...]]) -> None:
    s, rows = loaded
    want = _reference(rows, key)
    table = s.aggregate(FlowFilter(), group_by)
    names = [n for n in table.column_names if n not in store_mod.METRICS]
    got = {tuple(r[n] for n in names): {m: r[m] for m in store_mod.METRICS}
           for r in table.to_pylist()}
    assert got == want
    conns = table.column("connections").to_pylist()
    assert conns == sorted(conns, reverse=True)


def test_aggregate_pages_partition_the_groups(loaded: tuple[DuckDBFlowStore, list[Row]]
                                              ) -> None:
    s, _ = loaded
    full = s.aggregate(FlowFilter(), ["src_ip", "dst_port"], order_by="flows").to_pylist()
    pages = [s.aggregate(FlowFilter(), ["src_ip", "dst_port"], order_by="flows", limit=37,
                         offset=o).to_pylist() for o in range(0, len(full) + 37, 37)]
    assert [r for p in pages for r in p] == full


def test_unknown_group_terms_are_refused(loaded: tuple[DuckDBFlowStore, list[Row]]) -> None:
    s, _ = loaded
    with pytest.raises(ValueError, match="colour"):
        s.aggregate(FlowFilter(), ["colour"])
    with pytest.raises(ValueError, match="order_by"):
        s.aggregate(FlowFilter(), ["decision"], order_by="src_ip")


@pytest.mark.parametrize("level", ["workload", "app", "app,env", "ip"])
def test_edges_account_for_all_traffic(loaded: tuple[DuckDBFlowStore, list[Row]],
                                       level: str) -> None:
    s, rows = loaded
    table = s.edges(FlowFilter(), level)
    assert sum(table.column("connections").to_pylist()) == sum(r["connections"] for r in rows)
    got = {(e["src"], e["dst"]): e["connections"] for e in table.to_pylist()}
    if level == "workload":
        want: dict[tuple[str, str], int] = defaultdict(int)
        for r in rows:
            want[(r["src_workload"] or "(external)", r["dst_workload"] or "(external)")] += \
                r["connections"]
        assert got == want
    if level == "app,env":
        assert ("app=shop,env=prod", "app=blog,env=dev") in got
    blocked = sum(r["connections"] for r in rows if r["decision"].startswith("blocked"))
    assert sum(table.column("blocked").to_pylist()) == blocked


def test_labels_are_replaced_only_when_they_change(store: DuckDBFlowStore) -> None:
    assert store.set_workloads(label_rows()) is True
    assert store.set_workloads(label_rows()) is False
    assert store.set_workloads(label_rows()[:2]) is True


def test_retention_drops_old_flows(store: DuckDBFlowStore) -> None:
    for i in range(4):
        store.append(make_batch(250, seed=i, start=T0 + timedelta(days=i),
                                span=timedelta(hours=1)), batch_id=f"d{i}")
    cutoff = T0 + timedelta(days=2)
    assert store.delete_before(cutoff) == 500
    assert store.count() == 500
    page, _ = store.query(FlowFilter(), limit=1)
    assert page.column("ts")[0].as_py() >= cutoff
    assert store.append(make_batch(250, seed=0, start=T0), batch_id="d0") == 0  # id kept
    # batch ids first stored before the cutoff go too
    assert store.delete_before(datetime.now(UTC) + timedelta(seconds=1)) == 500
    assert store.append(make_batch(10), batch_id="d0") == 10


def test_approximate_distinct_counts_are_close(loaded: tuple[DuckDBFlowStore, list[Row]]
                                               ) -> None:
    s, _ = loaded
    exact = s.aggregate(FlowFilter(), ["decision"], order_by="decision")
    approx = s.aggregate(FlowFilter(), ["decision"], order_by="decision", approx=True)
    assert approx.column("flows").equals(exact.column("flows"))
    for a, e in zip(approx.column("sources").to_pylist(), exact.column("sources").to_pylist(),
                    strict=True):
        assert abs(a - e) <= max(1, 0.05 * e)
    assert s.edges(FlowFilter(), "app", approx=True).num_rows == s.edges(FlowFilter(),
                                                                          "app").num_rows


def test_the_checkpoint_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint_wal"):
        DuckDBFlowStore(tmp_path / "x.duckdb", checkpoint_wal="1GB'; DROP TABLE flows; --")


def test_ids_forgotten_in_memory_are_still_refused_by_the_id_filter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the in-memory window (and after a reopen) a retry is caught by the id filter and
    confirmed in DuckDB; a fresh id never queries DuckDB; retention frees ids again."""
    monkeypatch.setattr(store_mod, "RECENT_IDS", 2)
    path = tmp_path / "f.duckdb"
    with DuckDBFlowStore(path) as s:
        for i in range(5):
            assert s.append(make_batch(10, seed=i), batch_id=f"b{i}") == 10
        s.count()  # loaded: only b3, b4 are remembered in memory
        assert "b0" not in s._recent and "b0" in s._ids and "zz" not in s._ids
        assert s.append(make_batch(10, seed=9), batch_id="b0") == 0
    with DuckDBFlowStore(path) as s2:
        assert all(f"b{i}" in s2._ids for i in range(5))
        assert s2.append(make_batch(10, seed=9), batch_id="b1") == 0
        assert s2.append(make_batch(10, seed=9), batch_id="new") == 10
        s2.delete_before(T0 + timedelta(days=3650))  # every flow and batch id expires
        assert s2.append(make_batch(10, seed=9), batch_id="b2") == 10  # stored again
        assert s2.count() == 10


def test_the_id_filter_answers_exactly_for_ids_it_holds() -> None:
    held = [f"agent-{i % 7}:{i}" for i in range(3000)]
    f = store_mod._IdFilter(held[:1000])
    f.MERGE = 100  # merge into the sorted base often
    for bid in held[1000:]:
        f.add(bid)
    assert all(bid in f for bid in held)
    assert sum(f"other-{i}" in f for i in range(3000)) == 0


def test_name_workloads_fills_only_the_unnamed_ends() -> None:
    from bulkhead.flows.schema import name_workloads

    t = validate_batch(make_batch(50, seed=3))
    rows = t.to_pylist()
    owners = {next(r["src_ip"] for r in rows if r["src_workload"] is None): "a",
              next(r["dst_ip"] for r in rows if r["dst_workload"] is None): "b"}
    out = name_workloads(t, owners)
    assert out.column("src_workload").null_count < t.column("src_workload").null_count
    assert out.column("dst_workload").null_count < t.column("dst_workload").null_count
    for i, row in enumerate(out.to_pylist()):
        before = t.slice(i, 1).to_pylist()[0]
        for side in ("src", "dst"):
            expect = before[f"{side}_workload"] or owners.get(row[f"{side}_ip"])
            assert row[f"{side}_workload"] == expect
    assert name_workloads(t, {}) is t
    # an unchecked table (no address dictionary at hand) is named the same
    plain = pa.table({c: t.column(c) for c in t.column_names}, schema=t.schema)
    assert name_workloads(plain, owners).equals(out)
    # naming keeps a checked batch checked: the store does not check it again
    from bulkhead.flows import schema as schema_mod

    assert id(out) in schema_mod._CHECKED
    assert schema_mod.check_batch(out).table is out


def test_log_then_wait_is_append_in_two_steps(tmp_path: Path) -> None:
    with DuckDBFlowStore(tmp_path / "f.duckdb") as s:
        logged = s.log(make_batch(20, seed=4), batch_id="two-step")
        assert s.count() == 0  # written, not yet durable: not acknowledged, not visible
        assert logged.wait() == 20
        assert logged.wait() == 0  # once
        assert s.log(make_batch(20, seed=4), batch_id="two-step").wait() == 0  # a retry
        assert s.count() == 20
