"""Flow store benchmark: append rates, then query / aggregate / what-if latency at scale.

    python bench/bench_flowstore.py [--rows 10000000] [--path DIR] [--workloads 2000]

1. Appends of 1,000-5,000-row batches into a fresh file, one writer thread and several
   (group commit), each batch durable (committed) before `append` returns; a retry of every
   batch id (all duplicates).
2. A bulk load to `--rows` flows (250k-row appends) over two days, from `bench/synth.py`'s
   estate (apps x envs x roles, external peers), so labels and decisions are realistic.
3. Latency of the explorer's queries over the whole store (first and deep keyset pages,
   filters, grouping by labels / ports / addresses, the map), a what-if summary over one hour
   of traffic against the synthetic policy, the CSV export rate and retention.

Prints one line per figure; `docs/benchmarks.md` records them with the machine and date.
The figures depend on the disk's fsync latency and on other load: the load average is printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulkhead.domain.model import Policy
from bulkhead.flows.schema import TS_TYPE
from bulkhead.flows.store import DuckDBFlowStore, FlowFilter
from bulkhead.policy.evaluate import DECISIONS
from bulkhead.server.services import traffic
from synth import make_flows, make_policy

T0 = datetime(2025, 3, 1, tzinfo=UTC)
SPAN_US = 2 * 86400 * 1_000_000  # two days of flows


class Estate:
    """The synthetic policy and the lookup tables that turn synth flows into flow records."""

    def __init__(self, n_workloads: int) -> None:
        self.policy: Policy = make_policy(n_workloads, max(20, n_workloads // 5))
        self.owner: dict[int, str] = {}
        for w in self.policy.workloads:
            for ip in w.ips:
                a = ipaddress.ip_address(ip)
                if a.version == 4:
                    self.owner[int(a)] = w.name
        self.names = sorted({w.name for w in self.policy.workloads})

    def batch(self, n: int, seed: int, t_lo: int = 0, t_hi: int = SPAN_US) -> pa.Table:
        rng = np.random.default_rng(seed)
        f = make_flows(self.policy, n, seed=seed)
        src_s, src_w = self._addresses(f.src)
        dst_s, dst_w = self._addresses(f.dst)
        ts = (int(T0.timestamp() * 1e6) + np.sort(rng.integers(t_lo, t_hi, n))).astype(np.int64)
        t = pa.array(ts).cast(TS_TYPE)
        dec = rng.choice(len(DECISIONS), n, p=[0.55, 0.05, 0.02, 0.05, 0.08, 0.02, 0.05, 0.13,
                                                0.05]).astype(np.int32)
        inbound = rng.random(n) < 0.5
        reporter = pc_choose(inbound, dst_w, src_w)
        return pa.table({
            "ts": t, "first_seen": t,
            "last_seen": pa.array(ts + rng.integers(0, 600_000_000, n)).cast(TS_TYPE),
            "src_ip": src_s, "dst_ip": dst_s,
            "src_port": pa.array(rng.integers(1024, 65536, n).astype(np.int32)),
            "proto": pa.array(f.proto.astype(np.int16)),
            "dst_port": pa.array(f.port),
            "process": dictionary(rng.integers(0, 5, n),
                                  [None, "nginx", "java", "mysqld", "postgres"]),
            "unit": pa.nulls(n, pa.string()),
            "user": pa.nulls(n, pa.string()),
            "direction": dictionary(inbound.astype(np.int32), ["out", "in"]),
            "reporter": pa.array(reporter).fill_null("external-sensor"),
            "src_workload": src_w, "dst_workload": dst_w,
            "connections": pa.array(rng.integers(1, 100, n).astype(np.int64)),
            "bytes": pa.array(rng.integers(0, 10_000_000, n).astype(np.int64)),
            "decision": dictionary(dec, list(DECISIONS)),
            "rule": pa.nulls(n, pa.string()),
        })

    def _addresses(self, ips: np.ndarray) -> tuple[pa.Array, pa.Array]:
        uniq, inv = np.unique(ips, return_inverse=True)
        text = [str(ipaddress.IPv4Address(int(a))) for a in uniq]
        owner = [self.owner.get(int(a)) for a in uniq]
        idx = pa.array(inv.astype(np.int32))
        return (pa.DictionaryArray.from_arrays(idx, pa.array(text, pa.string())),
                pa.DictionaryArray.from_arrays(idx, pa.array(owner, pa.string())))


def dictionary(codes: np.ndarray, values: list[str | None]) -> pa.Array:
    arr = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)),
                                         pa.array(values, pa.string()))
    return arr.cast(pa.string())


def pc_choose(mask: np.ndarray, a: pa.Array, b: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.if_else(pa.array(mask), a.cast(pa.string()), b.cast(pa.string()))


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def line(label: str, value: str) -> None:
    print(f"  {label:<58} {value}", flush=True)


# -- 1. appends -----------------------------------------------------------------------------

def bench_appends(est: Estate, root: Path) -> None:
    print("appends (each batch committed durably before append returns)")
    for size in (1000, 2000, 5000):
        batches = [est.batch(size, seed=i) for i in range(60)]
        path = root / f"append-{size}.duckdb"
        with DuckDBFlowStore(path) as s:
            for i, b in enumerate(batches[:5]):  # warm up: address cache, file growth
                s.append(b, batch_id=f"w{i}")
            s.count()
            lat = []
            t = time.perf_counter()
            for i, b in enumerate(batches[5:]):
                a = time.perf_counter()
                s.append(b, batch_id=f"b{i}")
                lat.append(time.perf_counter() - a)
            dt = time.perf_counter() - t
            s.count()  # waits until every staged row is in `flows`
            dt_all = time.perf_counter() - t
            line(f"1 writer, {size}-row batches",
                 f"{len(lat) * size / dt:>10,.0f} rows/s  p50 {statistics.median(lat) * 1e3:.1f}"
                 f" ms  p95 {sorted(lat)[int(len(lat) * 0.95)] * 1e3:.1f} ms; "
                 f"{len(lat) * size / dt_all:,.0f} rows/s until queryable")
            t = time.perf_counter()
            for i, b in enumerate(batches[5:]):
                assert s.append(b, batch_id=f"b{i}") == 0
            dt = time.perf_counter() - t
            line(f"  retry of every batch id ({size} rows, all duplicates)",
                 f"{len(lat) * size / dt:>10,.0f} rows/s")
        path.unlink()
    size = 5000
    batches = [est.batch(size, seed=100 + i) for i in range(201)]  # 1M rows per run
    for threads in (2, 4, 8):
        path = root / f"append-t{threads}.duckdb"
        with DuckDBFlowStore(path) as s:
            s.append(batches[0], batch_id="warm")
            todo = list(enumerate(batches[1:]))
            lock = threading.Lock()

            def worker(s: DuckDBFlowStore = s, todo: list[Any] = todo,
                       lock: threading.Lock = lock) -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        i, b = todo.pop()
                    s.append(b, batch_id=f"b{i}")

            ths = [threading.Thread(target=worker) for _ in range(threads)]
            t = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            dt = time.perf_counter() - t
            assert s.count() == size * len(batches)
            dt_all = time.perf_counter() - t
            line(f"{threads} writer threads, {size}-row batches (group commit)",
                 f"{(len(batches) - 1) * size / dt:>10,.0f} rows/s; "
                 f"{(len(batches) - 1) * size / dt_all:,.0f} rows/s until queryable")
        path.unlink()


# -- 2. bulk load ---------------------------------------------------------------------------

def bulk_load(est: Estate, s: DuckDBFlowStore, rows: int) -> None:
    chunk = 1_000_000
    gen = prep = 0.0
    done = 0
    k = 0
    while done < rows:
        n = min(chunk, rows - done)
        a = time.perf_counter()
        lo = int(SPAN_US * done / rows)
        hi = int(SPAN_US * (done + n) / rows)
        table = est.batch(n, seed=10_000 + k, t_lo=lo, t_hi=max(hi, lo + 1))
        gen += time.perf_counter() - a
        a = time.perf_counter()
        for off in range(0, n, 250_000):
            s.append(table.slice(off, 250_000), batch_id=f"bulk-{k}-{off}")
        prep += time.perf_counter() - a
        done += n
        k += 1
    line(f"bulk load of {rows:,} flows (250k-row appends)",
         f"{rows / prep:>10,.0f} rows/s  ({prep:.1f} s; generating {gen:.1f} s)")


# -- 3. queries -----------------------------------------------------------------------------

def bench_queries(est: Estate, s: DuckDBFlowStore, rows: int, path: Path) -> None:
    size = path.stat().st_size + (path.with_suffix(".duckdb.wal").stat().st_size
                                  if path.with_suffix(".duckdb.wal").exists() else 0)
    line("database file", f"{size / 1e9:.2f} GB ({size / rows:.0f} B/flow)")
    s.set_workloads(est.policy.workloads)
    hour = FlowFilter(start=T0 + timedelta(hours=30), end=T0 + timedelta(hours=31))
    app = est.policy.workloads[0].label("app") or ""
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("count(*)", lambda: s.count()),
        ("first page, 100 flows, one hour", lambda: s.query(hour, limit=100)),
        ("first page, 100 flows, everything, newest first",
         lambda: s.query(FlowFilter(), limit=100, newest_first=True)),
        ("page 1,000 of an app's flows (cursor from page 999)",
         lambda: deep_page(s, FlowFilter(src_labels=(("app", (app,)),)))),
        ("one hour, dst port 3306, decision blocked_*",
         lambda: s.query(replace_filter(hour, ports=((3306, 3306),),
                                        decisions=tuple(d for d in DECISIONS
                                                        if d.startswith("blocked"))),
                         limit=1000)),
        ("CIDR filter 10.0.0.0/16 on either end, count",
         lambda: s.count(FlowFilter(ips=("10.0.0.0/16",)))),
        ("group by src.app, dst.app (all flows)",
         lambda: s.aggregate(FlowFilter(), ["src.app", "dst.app"])),
        ("group by src.app, src.env, dst.app, dst.env, decision",
         lambda: s.aggregate(FlowFilter(), ["src.app", "src.env", "dst.app", "dst.env",
                                            "decision"], limit=100)),
        ("group by port (proto, dst_port)", lambda: s.aggregate(FlowFilter(), ["port"])),
        ("group by src_ip, dst_ip, first 100 by connections",
         lambda: s.aggregate(FlowFilter(), ["src_ip", "dst_ip"], limit=100)),
        ("map edges at workload level", lambda: s.edges(FlowFilter(), "workload")),
        ("map edges at app,env level", lambda: s.edges(FlowFilter(), "app,env")),
    ]
    for label, fn in cases:
        dt, out = timed(fn, repeat=2)
        n = out[0].num_rows if isinstance(out, tuple) else (
            out.num_rows if isinstance(out, pa.Table) else out)
        line(label, f"{dt * 1e3:>8.0f} ms  ({n:,} rows)")
    ev_build, ev = timed(lambda: traffic.EVALUATORS.get(est.policy), repeat=1)
    line("what-if: BatchEvaluator for the synthetic policy", f"{ev_build * 1e3:>8.0f} ms")
    t = time.perf_counter()
    groups = s.aggregate(hour, [*traffic.DECIDING, "decision"], order_by=None)
    agg = time.perf_counter() - t
    summary = traffic.what_if_summary(ev, groups)
    total = time.perf_counter() - t
    line(f"what-if summary over one hour ({summary['flows']:,} flows, "
         f"{groups.num_rows:,} distinct)",
         f"{total * 1e3:>8.0f} ms  (grouping {agg * 1e3:.0f} ms)")
    t = time.perf_counter()
    n_out = 0
    for chunk in traffic.export_csv(store=s, filters=FlowFilter(
            start=T0, end=T0 + timedelta(hours=12))):
        n_out += chunk.count(b"\n")
    dt = time.perf_counter() - t
    line(f"CSV export of 12 hours ({n_out - 1:,} flows)", f"{(n_out - 1) / dt:>10,.0f} rows/s")
    dt, deleted = timed(lambda: s.delete_before(T0 + timedelta(hours=4.8)), repeat=1)
    line(f"retention: delete the oldest {deleted:,} flows", f"{dt * 1e3:>8.0f} ms")


def replace_filter(f: FlowFilter, **kw: Any) -> FlowFilter:
    from dataclasses import replace

    return replace(f, **kw)


def deep_page(s: DuckDBFlowStore, f: FlowFilter) -> tuple[pa.Table, str | None]:
    """Walk to page 999 once (cached), then time fetching page 1,000."""
    key = ("deep", f)
    cursor = _CURSORS.get(key)
    if cursor is None:
        _, cursor = s.query(f, limit=100)
        for _ in range(998):
            _, cursor = s.query(f, limit=100, cursor=cursor)
        _CURSORS[key] = cursor
    return s.query(f, limit=100, cursor=cursor)


_CURSORS: dict[Any, str | None] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workloads", type=int, default=2000)
    ap.add_argument("--path", type=Path, default=None, help="directory for the files")
    ap.add_argument("--skip-appends", action="store_true")
    ap.add_argument("--appends-only", action="store_true")
    args = ap.parse_args()
    root = args.path or Path(tempfile.mkdtemp(prefix="bench-flowstore-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"flow store benchmark: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, files in {root}")
    est = Estate(args.workloads)
    try:
        if not args.skip_appends:
            bench_appends(est, root)
        if args.appends_only:
            return
        path = root / "big.duckdb"
        with DuckDBFlowStore(path) as s:
            print(f"{args.rows:,} flows")
            bulk_load(est, s, args.rows)
            bench_queries(est, s, args.rows, path)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if args.path is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
