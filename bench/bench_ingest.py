"""Flow ingest through the HTTP API into the flow store: flow records per second.

One uvicorn process (1 worker) on 127.0.0.1 serves the real app (SQLite + DuckDB flow store in
a temporary directory); a few concurrent clients (httpx, one paired agent each) post batches of
synthetic flow summaries, JSON (`{batch_id, flows}`) and Arrow IPC (`X-Batch-Id`), each batch
with a fresh id, for a fixed time per phase. Throughput counts only rows the server says it
stored; the store's row count is checked against it at the end. `--profile` also times the
stages in-process (decode, validate, store append) to show where the time goes.

    python bench/bench_ingest.py [--seconds 5] [--clients 4] [--sizes 1000,5000]
                                 [--formats json,arrow] [--store duckdb|null] [--profile]

Target: >= 200,000 flow records/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pyarrow as pa

ARROW = "application/vnd.apache.arrow.stream"
DECISIONS = ("allowed", "allowed", "allowed", "potentially_blocked_no_rule", "blocked_by_deny",
             "allowed_across_boundary")
PROCESSES = ("nginx", "java", "postgres", "python3", "sshd", None, None)
TARGET = 200_000


# -- synthetic flows --------------------------------------------------------------------------
def make_flows(agent: int, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` flow summaries as agent number `agent` would report them for one window."""
    rng = random.Random(seed)
    me = f"10.1.{agent // 250}.{agent % 250 + 1}"
    peers = [f"10.2.{rng.randrange(40)}.{rng.randrange(1, 255)}" for _ in range(400)]
    peers += [f"203.0.113.{i}" for i in range(1, 60)] + [f"2001:db8::{i:x}" for i in range(1, 20)]
    window = int(time.time()) // 600 * 600
    out = []
    for _ in range(n):
        peer = rng.choice(peers)
        outbound = rng.random() < 0.5
        r = rng.random()
        proto, port = (6, rng.choice((443, 80, 5432, 8080, 22, 9092))) if r < 0.8 else (
            (17, rng.choice((53, 123, 514))) if r < 0.95 else (1, 8))
        if ":" in peer:  # our host is IPv4 here: make the IPv6 flows peer-to-peer
            src = peer if not outbound else "2001:db8::ffff"
            dst = "2001:db8::ffff" if not outbound else peer
        else:
            src, dst = (me, peer) if outbound else (peer, me)
        first = window + rng.randrange(600)
        out.append({
            "ts": float(window), "first_seen": float(first),
            "last_seen": float(min(window + 599, first + rng.randrange(120))),
            "src_ip": src, "dst_ip": dst, "proto": proto, "dst_port": port,
            "direction": "out" if outbound else "in",
            "process": rng.choice(PROCESSES), "connections": rng.randrange(1, 50),
            "bytes": rng.randrange(100, 1_000_000), "decision": rng.choice(DECISIONS)})
    return out


def json_template(flows: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(prefix, suffix) around the batch id of a JSON batch body."""
    body = msgspec.json.encode({"batch_id": "@@BATCH@@", "flows": flows})
    prefix, _, suffix = body.partition(b"@@BATCH@@")
    return prefix, suffix


def arrow_body(flows: list[dict[str, Any]]) -> bytes:
    ts = pa.timestamp("us", tz="UTC")

    def times(key: str) -> pa.Array:
        return pa.array([int(f[key] * 1e6) for f in flows], pa.int64()).cast(ts)

    table = pa.table({
        "ts": times("ts"), "first_seen": times("first_seen"), "last_seen": times("last_seen"),
        "src_ip": pa.array([f["src_ip"] for f in flows]),
        "dst_ip": pa.array([f["dst_ip"] for f in flows]),
        "proto": pa.array([f["proto"] for f in flows], pa.int16()),
        "dst_port": pa.array([f["dst_port"] for f in flows], pa.int32()),
        "direction": pa.array([f["direction"] for f in flows]),
        "process": pa.array([f["process"] for f in flows], pa.string()),
        "connections": pa.array([f["connections"] for f in flows], pa.int64()),
        "bytes": pa.array([f["bytes"] for f in flows], pa.int64()),
        "decision": pa.array([f["decision"] for f in flows]),
    })
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# -- the server -------------------------------------------------------------------------------
class NullStore:
    """The store's contract without storage (batch ids remembered in memory): isolates the
    API's own cost from DuckDB's."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.rows = 0

    def append(self, table: Any, *, batch_id: str) -> int:
        if batch_id in self.seen:
            return 0
        self.seen.add(batch_id)
        self.rows += table.num_rows
        return int(table.num_rows)

    def close(self) -> None:
        pass


def serve(directory: Path, port: int, store_kind: str = "duckdb") -> None:
    import uvicorn

    from bulkhead.flows.store import DuckDBFlowStore
    from bulkhead.server.app import create_app
    from bulkhead.server.auth import Principal, permissions_for
    from bulkhead.server.db import Database
    from bulkhead.server.services.agents import create_pairing_key
    from bulkhead.server.settings import Settings

    settings = Settings(data_dir=directory, flows_path=directory / "flows.duckdb")
    db = Database(settings.db_url)
    db.create_all()
    store = DuckDBFlowStore(settings.flows_file) if store_kind == "duckdb" else NullStore()
    app = create_app(settings, db=db, flows=store)
    bench = Principal("user", 0, "bench", "owner", None, permissions_for("owner"))
    with db.transaction() as s:
        _, secret = create_pairing_key(s, actor=bench, name="bench", max_uses=1000)
    (directory / "pairing-key").write_text(secret)
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning",
                    access_log=False)
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(directory: Path, port: int, extra: tuple[str, ...] | list[str] = (),
                 script: str = __file__) -> subprocess.Popen[bytes]:
    """`script --serve DIRECTORY --port PORT [extra]` in a subprocess, once it answers."""
    proc = subprocess.Popen([sys.executable, script, "--serve", str(directory),
                             "--port", str(port), *extra])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the clients ------------------------------------------------------------------------------
class RawClient:
    """A minimal HTTP/1.1 keep-alive client: the load generator shares the machine's cores
    with the server, so it should take as little of them as it can (httpx costs about a
    millisecond of CPU per request). Speaks just enough HTTP for this server's answers."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.writelines([
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
            f"{head}\r\n".encode(), body])
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "transfer-encoding":
                raise SystemExit(f"unexpected transfer-encoding: {value.strip()}")
        if length is None:
            raise SystemExit("response without a content-length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def run_phase(base: str, agents: list[tuple[int, str]], fmt: str, size: int,
                    seconds: float, phase: int, client_kind: str = "raw",
                    ) -> tuple[int, int, float, list[float]]:
    """(rows stored, batches, elapsed s, per-request latencies) of one phase."""
    payloads = []
    for i, _ in enumerate(agents):
        flows = make_flows(i, size, seed=phase * 1000 + i)
        payloads.append(json_template(flows) if fmt == "json" else arrow_body(flows))
    stored = batches = 0
    latencies: list[float] = []
    host, port = base.removeprefix("http://").split(":")
    limits = httpx.Limits(max_connections=len(agents) + 2)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def worker(k: int) -> None:
            nonlocal stored, batches
            agent_id, cred = agents[k]
            headers = {"Authorization": f"Bearer {cred}"}
            raw = RawClient(host, int(port)) if client_kind == "raw" else None
            seq = 0
            try:
                while time.perf_counter() < end:
                    seq += 1
                    batch_id = f"p{phase}-a{agent_id}-{seq}"
                    if fmt == "json":
                        prefix, suffix = payloads[k]
                        body = prefix + batch_id.encode() + suffix
                        hdrs = {**headers, "Content-Type": "application/json"}
                    else:
                        body = payloads[k]
                        hdrs = {**headers, "Content-Type": ARROW, "X-Batch-Id": batch_id}
                    path = f"/api/v1/agents/{agent_id}/flows"
                    t = time.perf_counter()
                    if raw is not None:
                        status, text = await raw.post(path, body, hdrs)
                    else:
                        r = await client.post(path, content=body, headers=hdrs)
                        status, text = r.status_code, r.content
                    latencies.append(time.perf_counter() - t)
                    if status != 200:
                        raise SystemExit(f"upload failed: {status} {text[:300]!r}")
                    res = msgspec.json.decode(text)
                    if res["duplicate"]:
                        raise SystemExit(f"unexpected duplicate: {res}")
                    stored += res["stored"]
                    batches += 1
            finally:
                if raw is not None:
                    await raw.close()

        await asyncio.gather(*(worker(k) for k in range(len(agents))))
        elapsed = time.perf_counter() - start
    return stored, batches, elapsed, latencies


async def pair_agents(base: str, key: str, n: int) -> list[tuple[int, str]]:
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for i in range(n):
            r = await client.post("/api/v1/agents/activate", json={
                "pairing_key": key, "hostname": f"bench-{i}", "os": "linux",
                "ips": [f"10.1.{i // 250}.{i % 250 + 1}"], "agent_version": "bench"})
            if r.status_code != 201:
                raise SystemExit(f"activation failed: {r.status_code} {r.text[:300]}")
            out.append((r.json()["agent_id"], r.json()["credential"]))
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# -- in-process stage costs -------------------------------------------------------------------
def profile(size: int, directory: Path) -> None:
    from bulkhead.flows.store import DuckDBFlowStore
    from bulkhead.server.services.flow_batches import decode_flows, prepare_flows

    flows = make_flows(0, size, seed=99)
    prefix, suffix = json_template(flows)
    arrow = arrow_body(flows)
    store = DuckDBFlowStore(directory / "profile.duckdb")
    reps = max(3, 200_000 // size)
    print(f"\nstage costs in-process, {size}-flow batches, {reps} batches each "
          f"(µs per flow):")
    for fmt in ("json", "arrow"):
        t_dec = t_val = t_app = 0.0
        for k in range(reps):
            bid = f"{fmt}-{k}"
            t0 = time.perf_counter()
            if fmt == "json":
                _, table = decode_flows(prefix + bid.encode() + suffix, "application/json")
            else:
                _, table = decode_flows(arrow, ARROW, bid)
            t1 = time.perf_counter()
            checked = prepare_flows(table, workload="bench-0")
            t2 = time.perf_counter()
            store.append(checked, batch_id=bid)
            t3 = time.perf_counter()
            t_dec += t1 - t0
            t_val += t2 - t1
            t_app += t3 - t2
        n = reps * size / 1e6
        print(f"  {fmt:5}  decode {t_dec / n:5.2f}  validate+tag {t_val / n:5.2f}  "
              f"store.append {t_app / n:5.2f}  total {(t_dec + t_val + t_app) / n:5.2f}  "
              f"(= {n * 1e6 / (t_dec + t_val + t_app):,.0f} flows/s on one core)")
    store.close()


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--formats", default="json,arrow")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="load generator: a minimal keep-alive client (default) or httpx")
    ap.add_argument("--store", choices=("duckdb", "null"), default="duckdb",
                    help="null: no storage, to measure the API alone")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.store)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    import importlib.util
    fast = importlib.util.find_spec("httptools") and importlib.util.find_spec("uvloop")
    print(f"{args.clients} clients ({args.client}), one uvicorn worker "
          f"({'httptools, uvloop' if fast else 'h11, asyncio loop'}), SQLite + "
          f"{'DuckDB flow store' if args.store == 'duckdb' else 'NO flow store (null)'}, "
          f"loopback; {args.seconds:g} s per phase; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-") as tmp:
        directory = Path(tmp)
        port = free_port()
        proc = start_server(directory, port, ["--store", args.store])
        total_stored = 0
        results = []
        try:
            base = f"http://127.0.0.1:{port}"
            key = (directory / "pairing-key").read_text()
            agents = asyncio.run(pair_agents(base, key, args.clients))
            phase = 0
            for fmt in args.formats.split(","):
                for size in (int(s) for s in args.sizes.split(",")):
                    phase += 1
                    stored, batches, elapsed, lat = asyncio.run(
                        run_phase(base, agents, fmt, size, args.seconds, phase,
                                  args.client))
                    total_stored += stored
                    rate = stored / elapsed
                    results.append(rate)
                    print(f"  {fmt:5} batches of {size:5}: {rate:>10,.0f} flows/s "
                          f"({batches} batches in {elapsed:.1f} s; request p50 "
                          f"{pct(lat, 0.5) * 1e3:.0f} ms, p99 {pct(lat, 0.99) * 1e3:.0f} ms)"
                          f"   target >= {TARGET:,}")
        finally:
            stop_server(proc)
        if args.store == "duckdb":
            from bulkhead.flows.store import DuckDBFlowStore

            with DuckDBFlowStore(directory / "flows.duckdb") as store:
                in_store = store.count()
            print(f"rows in the store: {in_store:,} (acknowledged: {total_stored:,})"
                  f"{'' if in_store == total_stored else '  MISMATCH'}")
        if args.profile:
            for size in (int(s) for s in args.sizes.split(",")):
                profile(size, directory)
        worst = min(results) if results else 0.0
        print(f"slowest phase: {worst:,.0f} flows/s -> "
              f"{'meets' if worst >= TARGET else 'MISSES'} the {TARGET:,}/s target; "
              f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
