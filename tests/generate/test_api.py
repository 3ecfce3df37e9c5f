"""`POST /api/v1/generate` and `/generate/apply` over a real app: candidates from the flow
store with their reports and policy-file rulesets; applying one goes through the draft
services (validated, audited, all or nothing); permissions as documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi.testclient import TestClient

from bulkhead.domain.model import Policy
from bulkhead.flows.schema import TS_TYPE
from bulkhead.flows.store import DuckDBFlowStore
from bulkhead.generate import FlowColumns
from bulkhead.policy.fileformat import dump_policy
from tests.generate.helpers import DAY, T0, estate, two_days

API = "/api/v1"


def _batch(f: FlowColumns) -> pa.Table:
    n = len(f)
    ts = (np.asarray(f.ts) * 1e6).astype(np.int64)
    tsa = pa.array(ts, pa.int64()).cast(TS_TYPE)
    return pa.table({
        "ts": tsa, "first_seen": tsa, "last_seen": tsa,
        "src_ip": list(f.src_ip), "dst_ip": list(f.dst_ip),
        "src_port": pa.array(np.full(n, 40000), pa.int32()),
        "proto": pa.array(np.asarray(f.proto), pa.int16()),
        "dst_port": pa.array(np.asarray(f.dst_port), pa.int32()),
        "process": pa.nulls(n, pa.string()), "unit": pa.nulls(n, pa.string()),
        "user": pa.nulls(n, pa.string()), "direction": ["in"] * n, "reporter": ["lab"] * n,
        "src_workload": pa.nulls(n, pa.string()), "dst_workload": pa.nulls(n, pa.string()),
        "connections": pa.array(np.asarray(f.count), pa.int64()),
        "bytes": pa.array(np.zeros(n, np.int64), pa.int64()),
        "decision": ["unknown"] * n, "rule": pa.nulls(n, pa.string())})


def _setup(client: TestClient) -> None:
    policy, intents = estate(apps=3)
    text = dump_policy(Policy(workloads=policy.workloads))
    r = client.post(f"{API}/policy/import", content=text,
                    headers={"content-type": "application/yaml"})
    assert r.status_code == 200, r.text
    store = client.app.state.flows  # type: ignore[attr-defined]
    assert isinstance(store, DuckDBFlowStore)
    store.append(_batch(two_days(policy, intents, n=3000)), batch_id="gen-1")


def test_generate_then_apply_the_recommended_candidate(
        client_as: Callable[..., TestClient]) -> None:
    client = client_as("admin")
    _setup(client)
    r = client.post(f"{API}/generate", json={"train_until": str(T0 + DAY),
                                             "crown_jewels": [{"role": "db"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    names = [c["name"] for c in body["candidates"]]
    assert body["recommended"] in names and len(names) >= 3
    best: dict[str, Any] = body["candidates"][names.index(body["recommended"])]
    rep = best["report"]
    assert rep["coverage_train"] == 1.0 and rep["coverage_test"] >= 0.99
    assert rep["over_permission"] <= 0.05 and rep["rules"] == sum(
        len(rs["rules"]) for rs in best["rulesets"])
    assert body["noise"]["dns"]["flows"] > 0 and body["flows"]["test"] > 0
    assert all(rs["name"].startswith("gen-") for rs in best["rulesets"])

    r = client.post(f"{API}/generate/apply", json={k: best[k] for k in (
        "rulesets", "ip_lists", "services", "tests")})
    assert r.status_code == 201, r.text
    out = r.json()
    assert sorted(out["created"]["rulesets"]) == sorted(rs["name"] for rs in best["rulesets"])
    assert out["tests_added"] == len(best["tests"])
    r = client.get(f"{API}/rulesets")
    assert r.status_code == 200, r.text
    assert {rs["name"] for rs in best["rulesets"]} <= {x["name"] for x in r.json()}
    audit = client.get(f"{API}/audit", params={"limit": 200}).json()["items"]
    assert any(a["action"] == "ruleset.create" for a in audit)
    # the draft now allows what was observed: generating again adds nothing new
    r = client.post(f"{API}/generate", json={"granularity": "service"})
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["flows"]["already_allowed"] > 0
    # applying twice conflicts and changes nothing
    r = client.post(f"{API}/generate/apply", json={"rulesets": best["rulesets"][:1]})
    assert r.status_code == 409


def test_permissions_and_bad_input(client_as: Callable[..., TestClient]) -> None:
    client = client_as("admin")
    _setup(client)
    viewer = client_as("viewer")
    r = viewer.post(f"{API}/generate", json={"granularity": "app", "scope": {"app": "app1"}})
    assert r.status_code == 200, r.text
    assert r.json()["candidates"][0]["granularity"] == "app"
    assert viewer.post(f"{API}/generate/apply", json={}).status_code == 403
    r = viewer.post(f"{API}/generate", json={"granularity": "rack"})
    assert r.status_code == 422
    r = viewer.post(f"{API}/generate", json={"since": "yesterday"})
    assert r.status_code == 422 and "since" in r.text
    r = viewer.post(f"{API}/generate", json={"until": "-999999d"})  # overflows: not a 500
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "until"
    r = viewer.post(f"{API}/generate", json={"noise": ["gossip"]})
    assert r.status_code == 422 and "gossip" in r.text
    r = viewer.post(f"{API}/generate", json={"scope": {"team": "x"}})
    assert r.status_code == 422
    assert r.json()["errors"][0]["path"] == "scope"
