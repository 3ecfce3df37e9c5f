"""Concurrent writes: after-commit work never holds two connections per request, so a burst
of workload creations (e.g. agents pairing at once) neither stalls nor loses a state update."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def test_burst_of_workload_creations(client_as: Any) -> None:
    client = client_as("admin")
    assert client.post("/api/v1/policy/provision", json={"note": "v1", "force": True}
                       ).status_code in (200, 201)

    def create(i: int) -> int:
        r = client.post("/api/v1/workloads", json={
            "name": f"w{i}", "ips": [f"10.5.{i // 200}.{i % 200 + 1}"], "managed": True,
            "labels": {"app": "burst"}})
        return r.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(create, range(64)))
    took = time.perf_counter() - start
    assert all(c in (200, 201) for c in codes), codes
    assert took < 20, f"burst took {took:.1f} s"
    state = client.app.state.policy
    assert all(state.snapshot(f"w{i}").compiled is not None for i in range(64))
