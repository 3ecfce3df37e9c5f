"""A real Bulkhead server for browser tests and the console benchmark: uvicorn in a thread on
a free loopback port, over a temporary SQLite database and DuckDB flow store.

`serve(data_dir)` yields a `Live` (base URL, owner credentials, the app). Seeding goes through
the public API (policy import, provision) except recorded flows, which are appended to the
server's own flow store the way the agent channel stores them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import uvicorn

from bulkhead.domain.model import Policy
from bulkhead.flows.csvflows import read_flows_file
from bulkhead.flows.schema import TS_TYPE
from bulkhead.policy.batch import BatchEvaluator
from bulkhead.server.app import create_app
from bulkhead.server.auth import Principal, permissions_for
from bulkhead.server.db import Database
from bulkhead.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SHOP_POLICY = ROOT / "examples" / "policies" / "shop.yaml"
SHOP_FLOWS = ROOT / "examples" / "flows" / "shop.csv"
OWNER, PASSWORD = "owner", "console-test-password-1"


@dataclass
class Live:
    url: str
    app: Any
    user: str = OWNER
    password: str = PASSWORD

    @contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """An API client logged in as the owner."""
        with httpx.Client(base_url=self.url + "/api/v1", timeout=120) as c:
            r = c.post("/auth/login", json={"name": self.user, "password": self.password})
            r.raise_for_status()
            c.headers["Authorization"] = f"Bearer {r.json()['token']}"
            yield c


def _owner(db: Database) -> None:
    from bulkhead.server.services import users

    cli = Principal("cli", 0, "setup", "owner", None, permissions_for("owner"))
    with db.transaction() as session:
        users.create_user(session, actor=cli, name=OWNER, password=PASSWORD, role="owner")


@contextmanager
def serve(data_dir: Path) -> Iterator[Live]:
    settings = Settings(data_dir=data_dir, flows_path=data_dir / "flows.duckdb")
    db = Database(settings.db_url)
    db.migrate()
    _owner(db)
    app = create_app(settings, db=db)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        db.dispose()


def flow_table(policy: Policy, src: Sequence[str], dst: Sequence[str], proto: np.ndarray,
               port: np.ndarray, *, process: Sequence[str | None] | None = None,
               ts: np.ndarray | None = None, count: np.ndarray | None = None) -> pa.Table:
    """Flow summaries as an agent would report them: workloads resolved from the policy's
    addresses, `decision`/`rule` as that policy decides them."""
    n = len(src)
    owner = {ip: w.name for w in policy.workloads for ip in w.ips}
    res = BatchEvaluator(policy).evaluate(list(src), list(dst), proto.astype(np.int16),
                                          port.astype(np.int32), process=process)
    if ts is None:
        ts = np.full(n, datetime(2026, 11, 1, 10, tzinfo=UTC).timestamp())
    us = (np.asarray(ts, dtype=np.float64) * 1e6).astype(np.int64)
    conns = np.ones(n, np.int64) if count is None else np.asarray(count, np.int64)
    return pa.table({
        "ts": pa.array(us, pa.int64()).cast(TS_TYPE),
        "src_ip": list(src), "dst_ip": list(dst),
        "proto": pa.array(proto, pa.int16()), "dst_port": pa.array(port, pa.int32()),
        "process": list(process) if process is not None else pa.nulls(n, pa.string()),
        "direction": ["in"] * n,
        "reporter": [owner.get(d) or owner.get(s) or "unknown" for s, d in zip(src, dst,
                                                                                 strict=True)],
        "src_workload": [owner.get(s) for s in src],
        "dst_workload": [owner.get(d) for d in dst],
        "connections": pa.array(conns, pa.int64()),
        "bytes": pa.array(conns * 1500, pa.int64()),
        "decision": res.decisions(),
        "rule": [";".join(res.rules(i)) or None for i in range(n)],
    })


def seed_shop(live: Live) -> None:
    """examples/policies/shop.yaml imported and provisioned (version 1), and
    examples/flows/shop.csv stored as recorded flows."""
    from bulkhead.policy.fileformat import load_policy

    with live.client() as c:
        r = c.post("/policy/import", content=SHOP_POLICY.read_bytes(),
                   headers={"Content-Type": "application/yaml"})
        r.raise_for_status()
        r = c.post("/policy/provision", json={"note": "shop example"})
        r.raise_for_status()
    policy = load_policy(str(SHOP_POLICY))
    f = read_flows_file(str(SHOP_FLOWS))
    table = flow_table(policy, f.src_ip, f.dst_ip, f.proto, f.dst_port, process=f.process,
                       ts=f.ts, count=f.count)
    live.app.state.flows.append(table, batch_id="shop-example")
