"""The recorded demo's console: a local control plane holding the story's result - the
workloads and labels, the generated policy provisioned in full enforcement, and the recorded
flows - so the map, traffic explorer and policy pages show what the demo did."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from bulkhead.domain.model import Policy


def _free_port(preferred: int = 8443) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def flow_table(before: Policy, flows: list[dict[str, Any]]) -> pa.Table:
    """Recorded flows as the flow store keeps them, reported by the serving side (or the
    client, for an external server) with the decision the pre-demo policy gave them."""
    from bulkhead.domain.ports import PROTO_NUMBERS
    from bulkhead.flows.schema import TS_TYPE
    from bulkhead.policy.batch import BatchEvaluator

    owner = {ip: w.name for w in before.workloads for ip in w.ips}
    src = [f["src_ip"] for f in flows]
    dst = [f["dst_ip"] for f in flows]
    proto = np.array([PROTO_NUMBERS[f["proto"]] for f in flows], np.int16)
    port = np.array([int(f["dst_port"]) for f in flows], np.int32)
    res = BatchEvaluator(before).evaluate(src, dst, proto, port)
    decisions = [res.row(i).decision for i in range(len(flows))]
    count = np.array([int(f["count"]) for f in flows], np.int64)
    inbound = [owner.get(d) is not None for d in dst]
    return pa.table({
        "ts": pa.array([int(f["ts"] * 1e6) for f in flows], pa.int64()).cast(TS_TYPE),
        "src_ip": src, "dst_ip": dst, "proto": pa.array(proto), "dst_port": pa.array(port),
        "process": [f.get("process") for f in flows],
        "direction": ["in" if i else "out" for i in inbound],
        "reporter": [owner[d] if i else owner.get(s, "unknown")
                     for s, d, i in zip(src, dst, inbound, strict=True)],
        "src_workload": [owner.get(s) for s in src], "dst_workload": [owner.get(d) for d in dst],
        "connections": pa.array(count), "bytes": pa.array(count * 2048),
        "decision": decisions,
    })


def serve_recorded(directory: Path, before: Policy, enforced: Policy,
                   flows: list[dict[str, Any]], note: str,
                   announce: Callable[[str], None]) -> None:
    """Seed a control plane in `directory` and serve it on 127.0.0.1 until interrupted."""
    import uvicorn

    from bulkhead.cli.server import operator
    from bulkhead.flows.store import DuckDBFlowStore
    from bulkhead.policy.fileformat import dump_policy
    from bulkhead.server.app import create_app
    from bulkhead.server.db import Database
    from bulkhead.server.services.users import create_user
    from bulkhead.server.services.versions import import_policy, provision
    from bulkhead.server.settings import Settings

    directory.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(data_dir=directory)
    db = Database(settings.db_url)
    db.migrate()
    password = secrets.token_urlsafe(12)
    actor = operator()
    full = replace(enforced, workloads=tuple(replace(w, managed=True, enforcement="full")
                                             for w in enforced.workloads))
    with db.transaction() as s:
        create_user(s, actor=actor, name="admin", password=password, role="owner")
        import_policy(s, actor=actor, text=dump_policy(full))
        provision(s, actor=actor, note=note)
    store = DuckDBFlowStore(settings.flows_file)
    store.append(flow_table(before, flows), batch_id=f"recorded-{datetime.now(UTC):%s}")
    port = _free_port()
    announce(f"http://127.0.0.1:{port}/console/ (user admin, password {password})")
    app = create_app(settings, db=db, flows=store)
    # served from a thread, so that Ctrl-C (and SIGTERM, which the demo command turns into
    # KeyboardInterrupt) reaches this one and the caller cleans up
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, name="demo-console", daemon=True)
    thread.start()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()
        db.dispose()
