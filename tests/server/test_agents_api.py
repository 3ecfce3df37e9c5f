"""The agent channel over HTTP (SQLite and PostgreSQL): pairing keys, activation, credentials,
isolation between agents, heartbeats and their events, offline detection, inventory,
idempotent flow upload (JSON and Arrow), the policy long-poll, and unpairing."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from bulkhead.dataplane.wire import from_data
from bulkhead.server.app import create_app
from bulkhead.server.auth import Principal, permissions_for
from bulkhead.server.db import Database, utcnow
from bulkhead.server.deps import get_principal
from bulkhead.server.models.agents import Agent, PairingKey
from bulkhead.server.models.audit import Event
from bulkhead.server.policystate import PolicyState
from bulkhead.server.services import agents as svc
from bulkhead.server.services import flow_batches
from bulkhead.server.settings import Settings

API = "/api/v1"
ARROW = "application/vnd.apache.arrow.stream"
POLICY = """
version: 1
services:
  - {name: https, ports: ["tcp/443"]}
workloads:
  - {name: web-1, ips: [10.0.0.1], labels: {role: web}, managed: true, enforcement: full}
  - {name: web-2, ips: [10.0.0.2], labels: {role: web}, managed: true, enforcement: full}
  - {name: db-1, ips: [10.0.0.9], labels: {role: db}, managed: true, enforcement: full}
rulesets:
  - name: app
    rules:
      - {action: allow, consumers: [{labels: {role: web}}], providers: [{labels: {role: db}}],
         services: [https]}
"""


class Recorder:
    """The flow store (`DuckDBFlowStore` when present, else a stand-in with its contract:
    `append(table, *, batch_id)` -> rows stored, 0 for a batch id seen before), recording
    what the agent channel hands it."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.batches: dict[str, pa.Table] = {}
        self.lock = threading.Lock()

    def append(self, table: pa.Table, *, batch_id: str) -> int:
        if self.inner is not None:
            n = int(self.inner.append(table, batch_id=batch_id))
            if n:
                self.batches[batch_id] = table
            return n
        with self.lock:
            if batch_id in self.batches:
                return 0
            self.batches[batch_id] = table
            return table.num_rows

    def rows(self) -> int:
        if self.inner is not None:
            return int(self.inner.count())
        return sum(t.num_rows for t in self.batches.values())


def make_store(tmp_path: Path) -> Recorder:
    try:
        from bulkhead.flows.store import DuckDBFlowStore
    except ImportError:
        return Recorder()
    return Recorder(DuckDBFlowStore(tmp_path / "flows.duckdb"))


class Env:
    def __init__(self, client: TestClient, db: Database, store: Recorder) -> None:
        self.client = client
        self.db = db
        self.store = store
        self.state: PolicyState = client.app.state.policy  # type: ignore[attr-defined]

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        """A request as an admin user (user authentication bypassed for this call)."""
        principal = Principal("user", 1, "tester", "admin", None, permissions_for("admin"))
        overrides = self.client.app.dependency_overrides  # type: ignore[attr-defined]
        overrides[get_principal] = lambda: principal
        try:
            return self.client.request(method, API + path, **kw)
        finally:
            overrides.pop(get_principal, None)

    def agent(self, method: str, path: str, credential: str, **kw: Any) -> Any:
        headers = {**kw.pop("headers", {}), "Authorization": f"Bearer {credential}"}
        return self.client.request(method, API + path, headers=headers, **kw)

    def key(self, **body: Any) -> dict[str, Any]:
        r = self.admin("POST", "/pairing-keys", json={"name": "k", **body})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def activate(self, key: str, hostname: str = "web-1", **body: Any) -> Any:
        """Activate with an address of the host's own (10.9.x.y, from its name)."""
        n = sum(hostname.encode()) * 7 + len(hostname)
        return self.client.post(API + "/agents/activate", json={
            "pairing_key": key, "hostname": hostname, "os": "linux",
            "ips": [f"10.9.{n // 250 % 250}.{n % 250 + 1}"], "agent_version": "0.1.0", **body})

    def pair(self, hostname: str = "web-1") -> tuple[int, str]:
        r = self.activate(self.key(labels={"role": "web"})["key"], hostname)
        assert r.status_code == 201, r.text
        return r.json()["agent_id"], r.json()["credential"]

    def events(self, kind: str) -> list[Event]:
        with self.db.transaction() as s:
            return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


@pytest.fixture
def env(db: Database, tmp_path: Path) -> Iterator[Env]:
    settings = Settings(data_dir=tmp_path, flows_path=tmp_path / "flows.duckdb",
                        long_poll_max_s=5.0)
    store = make_store(tmp_path)
    app = create_app(settings, db=db, flows=store)
    with TestClient(app) as client:
        yield Env(client, db, store)
    if store.inner is not None:
        store.inner.close()


# -- pairing keys -----------------------------------------------------------------------------
def test_pairing_key_is_shown_once_and_can_be_revoked(env: Env) -> None:
    created = env.key(max_uses=3, labels={"role": "web", "env": "prod"},
                      enforcement="selective", expires_in_s=3600)
    assert created["key"].startswith("bhp_") and created["key"][:10] == created["key_prefix"]
    assert created["usable"] and created["uses"] == 0 and created["max_uses"] == 3
    listed = env.admin("GET", "/pairing-keys").json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and "key_digest" not in listed[0]
    with env.db.transaction() as s:  # only a digest is stored
        assert s.scalar(select(PairingKey.key_digest)) != created["key"]
    assert env.admin("DELETE", f"/pairing-keys/{created['id']}").status_code == 204
    assert env.admin("GET", "/pairing-keys").json() == []
    revoked = env.admin("GET", "/pairing-keys", params={"include_revoked": True}).json()
    assert revoked[0]["revoked_at"] and not revoked[0]["usable"]
    r = env.activate(created["key"])
    assert r.status_code == 403 and "revoked" in r.json()["detail"]


def test_pairing_key_use_count(env: Env) -> None:
    key = env.key(max_uses=2)
    assert env.activate(key["key"], "web-1").status_code == 201
    assert env.activate(key["key"], "web-2").status_code == 201
    r = env.activate(key["key"], "db-1")
    assert r.status_code == 403 and "used up" in r.json()["detail"]
    got = env.admin("GET", f"/pairing-keys/{key['id']}").json()
    assert got["uses"] == 2 and not got["usable"]


def test_pairing_key_expiry(env: Env) -> None:
    key = env.key(expires_in_s=60)
    with env.db.transaction() as s:
        s.execute(update(PairingKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = env.activate(key["key"])
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    assert env.admin("GET", f"/pairing-keys/{key['id']}").json()["uses"] == 0


def test_wrong_key_and_bad_requests(env: Env) -> None:
    env.key()
    r = env.activate("bhp_not-a-key")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert env.activate(env.key()["key"], "-bad host").status_code == 422
    assert env.activate(env.key()["key"], ips=["10.0.0.256"]).status_code == 422
    assert env.admin("POST", "/pairing-keys", json={"max_uses": 2**31}).status_code == 422
    r = env.admin("POST", "/pairing-keys", json={"enforcement": "strict"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "enforcement"


def test_pairing_keys_need_agents_permissions(env: Env) -> None:
    agent_id, cred = env.pair()
    # an agent credential is a principal without user permissions
    assert env.agent("GET", "/pairing-keys", cred).status_code == 403
    assert env.agent("GET", "/agents", cred).status_code == 403
    assert env.agent("POST", f"/agents/{agent_id}/unpair", cred,
                     json={"final_state": "keep"}).status_code == 403
    assert env.client.get(API + "/agents").status_code == 401


# -- activation and isolation -----------------------------------------------------------------
def test_activation_gives_a_working_credential(env: Env) -> None:
    key = env.key(labels={"role": "web"}, enforcement="full")
    r = env.activate(key["key"], "Web-1", ips=["10.0.0.1", "fd00::1"])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["credential"].startswith("bhg_") and body["workload"] == "web-1"
    assert body["heartbeat_interval_s"] > 0 and body["long_poll_max_s"] == 5.0
    with env.db.transaction() as s:
        agent = s.get(Agent, body["agent_id"])
        assert agent is not None and agent.credential_digest != body["credential"]
        assert svc.resolve_agent(s, body["credential"]) == Principal(
            "agent", agent.id, "Web-1", permissions=frozenset({"agent"}))
        assert svc.resolve_agent(s, "bhg_wrong") is None
    view = env.admin("GET", f"/agents/{body['agent_id']}").json()
    assert view["labels"] == {"role": "web"} and view["enforcement"] == "full"
    assert view["ips"] == ["10.0.0.1", "fd00::1"] and view["state"] == "paired"
    ok = env.agent("POST", f"/agents/{body['agent_id']}/heartbeat", body["credential"],
                   json={"status": "ok"})
    assert ok.status_code == 200, ok.text
    bad = env.agent("POST", f"/agents/{body['agent_id']}/heartbeat", "bhg_forged",
                    json={"status": "ok"})
    assert bad.status_code == 401
    assert env.client.post(f"{API}/agents/{body['agent_id']}/heartbeat",
                           json={"status": "ok"}).status_code == 401
    audit = env.admin("GET", "/agents").json()
    assert [a["id"] for a in audit] == [body["agent_id"]]


def test_one_paired_agent_per_workload(env: Env) -> None:
    env.pair("web-1")
    r = env.activate(env.key()["key"], "WEB-1")
    assert r.status_code == 409


def test_the_database_holds_one_paired_agent_per_workload(db: Database) -> None:
    from sqlalchemy.exc import IntegrityError

    def agent(state: str) -> Agent:
        return Agent(hostname="h", workload_name="h", state=state)

    with db.transaction() as s:  # unpaired ones may linger beside the paired one
        s.add_all([agent("unpaired"), agent("unpaired"), agent("paired")])
    with pytest.raises(IntegrityError), db.transaction() as s:
        s.add(agent("paired"))


def test_an_agent_reaches_only_its_own_data(env: Env) -> None:
    a_id, a_cred = env.pair("web-1")
    b_id, _ = env.pair("web-2")
    for method, path, kw in [
        ("POST", f"/agents/{b_id}/heartbeat", {"json": {"status": "ok"}}),
        ("PUT", f"/agents/{b_id}/inventory", {"json": {"hostname": "web-2"}}),
        ("POST", f"/agents/{b_id}/flows", {"json": {"batch_id": "b1", "flows": []}}),
        ("GET", f"/agents/{b_id}/policy", {}),
        ("GET", f"/agents/{b_id}", {}),
        ("GET", f"/agents/{b_id}/inventory", {}),
        ("POST", f"/agents/{b_id + 100}/heartbeat", {"json": {"status": "ok"}}),
    ]:
        r = env.agent(method, path, a_cred, **kw)
        assert r.status_code == 403, (method, path, r.status_code)
    assert env.agent("POST", f"/agents/{a_id}/heartbeat", a_cred,
                     json={"status": "ok"}).status_code == 200


# -- heartbeat, events, offline ---------------------------------------------------------------
def test_heartbeat_updates_state_and_emits_events(env: Env) -> None:
    env.state.load(1, _policy())
    agent_id, cred = env.pair("web-1")
    version = env.state.snapshot("web-1").label
    beat = {"status": "degraded", "applied_version": "1.0", "enforcement": "full",
            "agent_version": "0.2.0",
            "errors": [{"kind": "apply", "message": "nft: syntax error", "version": version}],
            "tamper": [{"what": "table inet bulkhead", "detail": "rule deleted",
                        "restored": True}]}
    r = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json=beat)
    assert r.status_code == 200, r.text
    assert r.json()["policy_version"] == version and r.json()["unpair"] is None
    view = env.admin("GET", f"/agents/{agent_id}").json()
    assert view["status"] == "degraded" and view["applied_version"] == "1.0"
    assert view["applied_enforcement"] == "full" and view["agent_version"] == "0.2.0"
    assert view["last_heartbeat_at"] and view["online"]
    assert view["policy_version"] == version and not view["in_sync"]
    assert view["errors"][0]["message"] == "nft: syntax error"
    failed = env.events("policy_apply_failed")
    assert len(failed) == 1 and failed[0].subject == f"agent:{agent_id}"
    assert failed[0].severity == "error" and failed[0].data["version"] == version
    tamper = env.events("tamper_detected")
    assert len(tamper) == 1 and tamper[0].data["what"] == "table inet bulkhead"
    assert tamper[0].severity == "warning"
    # the same failure again is no new event; a new tamper report is
    env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json=beat)
    assert len(env.events("policy_apply_failed")) == 1
    assert len(env.events("tamper_detected")) == 2
    ok = {"status": "ok", "applied_version": version}
    env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json=ok)
    view = env.admin("GET", f"/agents/{agent_id}").json()
    assert view["in_sync"] and view["errors"] == []
    r = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "Bad Status"})
    assert r.status_code == 422


def test_offline_detection_with_an_injected_clock(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    now = utcnow()
    with env.db.transaction() as s:
        assert svc.mark_offline(s, now + timedelta(seconds=100), after_s=900) == []
        assert svc.mark_offline(s, now + timedelta(seconds=901), after_s=900) == [agent_id]
        assert svc.mark_offline(s, now + timedelta(seconds=2000), after_s=900) == []
    events = env.events("agent_offline")
    assert len(events) == 1 and events[0].data["workload"] == "web-1"
    assert env.admin("GET", f"/agents/{agent_id}").json()["online"] is False
    assert env.admin("GET", "/agents", params={"online": False}).json()[0]["id"] == agent_id
    env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    assert env.admin("GET", f"/agents/{agent_id}").json()["online"] is True
    assert len(env.events("agent_online")) == 1


def test_the_background_sweep(env: Env) -> None:
    from bulkhead.server.api.agents import sweep_once, sweep_period

    agent_id, _ = env.pair("web-1")
    app = env.client.app
    assert sweep_once(app) == []  # type: ignore[arg-type]
    with env.db.transaction() as s:
        s.execute(update(Agent).values(paired_at=utcnow() - timedelta(hours=1)))
    assert sweep_once(app) == [agent_id]  # type: ignore[arg-type]
    assert sweep_period(Settings(agent_offline_after_s=900)) == 60
    assert sweep_period(Settings(agent_offline_after_s=8)) == 2
    assert sweep_period(Settings(agent_offline_after_s=1)) == 1


def test_the_sweeper_runs_in_the_app_lifespan(db: Database, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, agent_offline_after_s=2), db=db,
                     flows=Recorder())
    with TestClient(app) as client:
        env = Env(client, db, Recorder())
        agent_id, _ = env.pair("web-1")
        with db.transaction() as s:
            s.execute(update(Agent).values(paired_at=utcnow() - timedelta(minutes=5)))
        deadline = time.monotonic() + 5
        while not env.events("agent_offline") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.subject for e in env.events("agent_offline")] == [f"agent:{agent_id}"]


def test_listing_agents_sweeps_silent_ones(env: Env) -> None:
    agent_id, _ = env.pair("web-1")
    assert env.admin("GET", "/agents").json()[0]["online"] is True
    with env.db.transaction() as s:  # paired long ago, never heard from since
        s.execute(update(Agent).values(paired_at=utcnow() - timedelta(hours=2)))
    agents = env.admin("GET", "/agents").json()
    assert agents[0]["id"] == agent_id and agents[0]["online"] is False
    assert len(env.events("agent_offline")) == 1
    env.admin("GET", "/agents")
    assert len(env.events("agent_offline")) == 1


# -- inventory --------------------------------------------------------------------------------
def test_inventory_is_stored_and_updates_addresses(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    inv = {"hostname": "web-1", "os": "linux",
           "interfaces": [{"name": "lo", "addresses": ["127.0.0.1", "::1"]},
                          {"name": "eth0", "mac": "02:00:00:00:00:01",
                           "addresses": ["10.0.0.5", "fe80::1", "FD00:0::5"]}],
           "listening": [{"proto": "tcp", "port": 443, "addr": "0.0.0.0",
                          "process": "/usr/sbin/nginx", "cmdline": "nginx -g daemon off;",
                          "unit": "nginx.service"}]}
    r = env.agent("PUT", f"/agents/{agent_id}/inventory", cred, json=inv)
    assert r.status_code == 200, r.text
    got = env.admin("GET", f"/agents/{agent_id}/inventory").json()
    assert got["data"]["listening"][0]["unit"] == "nginx.service"
    assert got["data"]["interfaces"][1]["addresses"] == ["10.0.0.5", "fe80::1", "fd00::5"]
    assert env.admin("GET", f"/agents/{agent_id}").json()["ips"] == ["10.0.0.5", "fd00::5"]
    bad = dict(inv, listening=[{"proto": "tcp", "port": 70000}])
    assert env.agent("PUT", f"/agents/{agent_id}/inventory", cred, json=bad).status_code == 422


# -- flows ------------------------------------------------------------------------------------
def _flows(n: int, src: str = "10.0.0.1") -> list[dict[str, Any]]:
    t = time.time()
    return [{"ts": t, "src_ip": src, "dst_ip": f"10.0.1.{i % 250}", "proto": 6,
             "dst_port": 443, "direction": "out", "connections": 2, "bytes": 100 + i,
             "decision": "allowed", "process": "curl"} for i in range(n)]


def _arrow(n: int) -> bytes:
    ts = pa.array([int(time.time() * 1e6)] * n, pa.timestamp("us", tz="UTC"))
    table = pa.table({"ts": ts, "src_ip": pa.array(["10.0.0.1"] * n),
                      "dst_ip": pa.array([f"10.0.2.{i % 250}" for i in range(n)]),
                      "proto": pa.array([17] * n, pa.int16()),
                      "dst_port": pa.array([53] * n, pa.int32()),
                      "direction": pa.array(["out"] * n),
                      "reporter": pa.array(["someone-else"] * n)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def test_flow_upload_json_is_idempotent(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    batch = {"batch_id": "w1-000001", "flows": _flows(300)}
    first = env.agent("POST", f"/agents/{agent_id}/flows", cred, json=batch)
    assert first.status_code == 200, first.text
    assert first.json() == {"batch_id": "w1-000001", "stored": 300, "duplicate": False}
    again = env.agent("POST", f"/agents/{agent_id}/flows", cred, json=batch)
    assert again.json() == {"batch_id": "w1-000001", "stored": 0, "duplicate": True}
    assert env.store.rows() == 300
    table = next(iter(env.store.batches.values()))
    assert set(table.column("reporter").to_pylist()) == {"web-1"}
    assert set(table.column("src_workload").to_pylist()) == {"web-1"}
    assert set(table.column("dst_workload").to_pylist()) == {None}
    assert table.column("first_seen").equals(table.column("ts"))


def test_flows_name_the_far_end_when_it_is_one_of_our_workloads(env: Env) -> None:
    r = env.admin("POST", "/workloads", json={"name": "db-9", "ips": ["10.0.1.5"]})
    assert r.status_code == 201, r.text
    agent_id, cred = env.pair("web-1")
    r = env.agent("POST", f"/agents/{agent_id}/flows", cred,
                  json={"batch_id": "far-end", "flows": _flows(20)})
    assert r.status_code == 200, r.text
    table = next(iter(env.store.batches.values()))
    named = {(d, w) for d, w in zip(table.column("dst_ip").to_pylist(),
                                    table.column("dst_workload").to_pylist(), strict=True)}
    assert ("10.0.1.5", "db-9") in named
    assert {w for d, w in named if d != "10.0.1.5"} == {None}
    assert set(table.column("src_workload").to_pylist()) == {"web-1"}


def test_flow_upload_arrow_is_idempotent_and_per_agent(env: Env) -> None:
    a_id, a_cred = env.pair("web-1")
    b_id, b_cred = env.pair("web-2")
    headers = {"Content-Type": ARROW, "X-Batch-Id": "batch-7"}
    r = env.agent("POST", f"/agents/{a_id}/flows", a_cred, content=_arrow(500),
                  headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"batch_id": "batch-7", "stored": 500, "duplicate": False}
    r = env.agent("POST", f"/agents/{a_id}/flows", a_cred, content=_arrow(500),
                  headers=headers)
    assert r.json()["duplicate"] is True and r.json()["stored"] == 0
    # the same batch id from another agent is another batch
    r = env.agent("POST", f"/agents/{b_id}/flows", b_cred, content=_arrow(500),
                  headers=headers)
    assert r.json() == {"batch_id": "batch-7", "stored": 500, "duplicate": False}
    assert env.store.rows() == 1000
    reporters = {k: set(t.column("reporter").to_pylist()) for k, t in env.store.batches.items()}
    assert reporters == {f"agent-{a_id}:batch-7": {"web-1"},  # not the agent's "someone-else"
                         f"agent-{b_id}:batch-7": {"web-2"}}


@pytest.mark.parametrize("inline_bytes", [0, flow_batches.INLINE_BYTES],
                         ids=["on-a-worker-thread", "on-the-event-loop"])
def test_small_and_large_batches_are_staged_alike(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                 inline_bytes: int) -> None:
    """Bodies above `INLINE_BYTES` are decoded and checked on a worker thread, the others on
    the event loop: the same rows, checks and answers either way."""
    monkeypatch.setattr(flow_batches, "INLINE_BYTES", inline_bytes)
    threaded: list[str] = []
    ingest = flow_batches.ingest_flows

    def ingest_on_a_thread(*args: Any, **kwargs: Any) -> flow_batches.IngestResult:
        threaded.append(threading.current_thread().name)
        return ingest(*args, **kwargs)

    monkeypatch.setattr(flow_batches, "ingest_flows", ingest_on_a_thread)
    agent_id, cred = env.pair("web-1")
    url = f"/agents/{agent_id}/flows"
    headers = {"Content-Type": ARROW, "X-Batch-Id": "a-1"}
    for _ in range(2):
        r = env.agent("POST", url, cred, content=_arrow(400), headers=headers)
        assert r.status_code == 200, r.text
    assert r.json() == {"batch_id": "a-1", "stored": 0, "duplicate": True}
    r = env.agent("POST", url, cred, json={"batch_id": "j-1", "flows": _flows(300)})
    assert r.json() == {"batch_id": "j-1", "stored": 300, "duplicate": False}
    r = env.agent("POST", url, cred, json={"batch_id": "empty", "flows": []})
    assert r.json() == {"batch_id": "empty", "stored": 0, "duplicate": False}
    bad = _flows(3)
    bad[1]["proto"] = 300
    r = env.agent("POST", url, cred, json={"batch_id": "j-2", "flows": bad})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "flows[1].proto"
    assert env.store.rows() == 700
    assert {frozenset(t.column("reporter").to_pylist()) for t in env.store.batches.values()} \
        == {frozenset({"web-1"})}
    assert len(threaded) == (5 if inline_bytes == 0 else 0)


def test_flow_upload_rejects_bad_batches(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    url = f"/agents/{agent_id}/flows"
    flows = _flows(5)
    flows[3]["dst_ip"] = "10.0.1.999"
    r = env.agent("POST", url, cred, json={"batch_id": "b1", "flows": flows})
    assert r.status_code == 422
    assert r.json()["errors"][0]["path"] == "flows[3].dst_ip"
    flows = _flows(5)
    flows[2]["proto"] = 300
    r = env.agent("POST", url, cred, json={"batch_id": "b1", "flows": flows})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "flows[2].proto"
    flows = _flows(5)
    flows[1]["decision"] = "maybe"
    r = env.agent("POST", url, cred, json={"batch_id": "b1", "flows": flows})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "flows[1].decision"
    for field, value in (("bytes", 2**64), ("ts", 1e300), ("connections", -1)):
        flows = _flows(2)
        flows[1][field] = value
        r = env.agent("POST", url, cred, json={"batch_id": "b1", "flows": flows})
        assert r.status_code == 422 and field in r.json()["errors"][0]["path"], r.text
    r = env.agent("POST", url, cred, json={"batch_id": "../x", "flows": []})
    assert r.status_code == 422
    r = env.agent("POST", url, cred, content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = env.agent("POST", url, cred, content=_arrow(3), headers={"Content-Type": ARROW})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "header:x-batch-id"
    r = env.agent("POST", url, cred, content=b"not arrow",
                  headers={"Content-Type": ARROW, "X-Batch-Id": "b2"})
    assert r.status_code == 422
    r = env.agent("POST", url, cred, content=b"a,b", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415
    assert env.store.rows() == 0
    # the batch id of a rejected batch stays free
    r = env.agent("POST", url, cred, json={"batch_id": "b1", "flows": _flows(5)})
    assert r.json()["stored"] == 5


def test_flow_upload_without_a_store_is_503(db: Database, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), db=db, flows=None)
    app.state.flows = None
    with TestClient(app) as client:
        env = Env(client, db, Recorder())
        agent_id, cred = env.pair()
        r = env.agent("POST", f"/agents/{agent_id}/flows", cred,
                      json={"batch_id": "b", "flows": _flows(1)})
        assert r.status_code == 503


# -- policy long-poll -------------------------------------------------------------------------
def _policy() -> Any:
    from bulkhead.policy.fileformat import loads_policy

    return loads_policy(POLICY, "policy.yaml")


def _moved(env: Env) -> Any:
    """Change web-1's policy: db-1 gets a second address."""
    db1 = _policy().workload("db-1")
    assert db1 is not None
    return lambda: env.state.update_workload(replace(db1, ips=("10.0.0.9", "10.0.0.10")))


def test_policy_returns_at_once_when_the_agent_is_behind(env: Env) -> None:
    env.state.load(3, _policy())
    agent_id, cred = env.pair("web-1")
    t = time.monotonic()
    r = env.agent("GET", f"/agents/{agent_id}/policy", cred,
                  params={"known": "0.0", "wait": 30})
    assert r.status_code == 200 and time.monotonic() - t < 2
    body = r.json()
    snap = env.state.snapshot("web-1")
    assert body["version"] == snap.label and body["provisioned_version"] == 3
    assert r.headers["etag"] == f'"{snap.label}"'
    assert from_data(body["compiled"]) == snap.compiled
    plain = env.agent("GET", f"/agents/{agent_id}/policy", cred)  # no known: no wait
    assert plain.status_code == 200 and plain.json() == body


def _parked_poll(env: Env) -> tuple[int, str, str, threading.Thread, dict[str, Any]]:
    """web-1 paired and long-polling (4 s) in a thread, parked once this returns; the
    thread fills `result` with the response and how long it took."""
    env.state.load(1, _policy())
    agent_id, cred = env.pair("web-1")
    known = env.state.snapshot("web-1").label
    result: dict[str, Any] = {}

    def poll() -> None:
        t = time.monotonic()
        r = env.agent("GET", f"/agents/{agent_id}/policy", cred,
                      params={"known": known, "wait": 4})
        result.update(response=r, seconds=time.monotonic() - t)

    th = threading.Thread(target=poll)
    th.start()
    deadline = time.monotonic() + 3
    while env.state.waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.state.waiting() == 1
    return agent_id, cred, known, th, result


def test_policy_long_poll_returns_on_change_without_holding_a_session(env: Env) -> None:
    _, _, known, th, result = _parked_poll(env)
    assert env.db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    changed = _moved(env)()
    assert "web-1" in changed
    th.join(5)
    r = result["response"]
    assert r.status_code == 200 and result["seconds"] < 3
    assert r.json()["version"] != known
    hosts = from_data(r.json()["compiled"]).outbound[0].peers.hosts
    assert hosts == frozenset({"10.0.0.9", "10.0.0.10"})


def test_unpairing_answers_a_parked_long_poll_at_once(env: Env) -> None:
    agent_id, cred, _, th, result = _parked_poll(env)
    r = env.admin("POST", f"/agents/{agent_id}/unpair", json={"final_state": "keep"})
    assert r.status_code == 200, r.text
    th.join(5)
    assert result["response"].status_code == 403 and result["seconds"] < 3
    assert "unpaired" in result["response"].text
    # the credential was cached by the earlier calls: unpairing still takes effect at once
    up = env.agent("POST", f"/agents/{agent_id}/flows", cred,
                   json={"batch_id": "after-unpair", "flows": _flows(3)})
    assert up.status_code == 403
    beat = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    assert beat.json()["unpair"] == {"final_state": "keep"}
    again = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    assert again.status_code == 401  # told once, then the credential is gone


def test_policy_long_poll_times_out_with_304(env: Env) -> None:
    env.state.load(1, _policy())
    agent_id, cred = env.pair("web-1")
    known = env.state.snapshot("web-1").label
    t = time.monotonic()
    r = env.agent("GET", f"/agents/{agent_id}/policy", cred,
                  params={"known": known, "wait": 0.3})
    assert r.status_code == 304 and r.content == b""
    assert 0.25 < time.monotonic() - t < 3
    assert r.headers["etag"] == f'"{known}"'
    assert env.state.waiting() == 0
    # wait is capped at long_poll_max_s (5 s here)
    t = time.monotonic()
    threading.Timer(0.2, _moved(env)).start()
    r = env.agent("GET", f"/agents/{agent_id}/policy", cred,
                  params={"known": known, "wait": 3600})
    assert r.status_code == 200 and time.monotonic() - t < 4
    assert env.agent("GET", f"/agents/{agent_id}/policy", cred,
                     params={"wait": -1}).status_code == 422


def test_policy_without_a_provisioned_version(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    body = env.agent("GET", f"/agents/{agent_id}/policy", cred).json()
    snap = env.state.snapshot("web-1")
    assert body["version"] == snap.label and body["provisioned_version"] is None
    if snap.compiled is None:  # no inventory service: nothing compiled for the host yet
        assert body["compiled"] is None
    else:  # the paired host is a workload, compiled with no rules
        assert from_data(body["compiled"]) == snap.compiled
        assert snap.compiled.inbound == () and snap.compiled.outbound == ()
    r = env.agent("GET", f"/agents/{agent_id}/policy", cred, params={"known": snap.label})
    assert r.status_code == 304  # known and no wait: answered at once


def test_a_paired_host_becomes_a_managed_workload(env: Env) -> None:
    inventory = pytest.importorskip("bulkhead.server.services.inventory")
    key = env.key(labels={"role": "web", "env": "prod"}, enforcement="selective")["key"]
    r = env.activate(key, "Web-7", ips=["10.0.7.1"])
    assert r.status_code == 201, r.text
    agent_id, cred = r.json()["agent_id"], r.json()["credential"]
    with env.db.transaction() as s:
        row = inventory.get_workload(s, name="web-7")
        assert (row.managed, row.enforcement, row.ips) == (True, "selective", ["10.0.7.1"])
        assert row.labels == {"env": "prod", "role": "web"}
    assert env.state.snapshot("web-7").compiled is not None  # synced after commit
    inv = {"hostname": "web-7", "interfaces": [{"name": "eth0", "addresses": ["10.0.7.2"]}]}
    assert env.agent("PUT", f"/agents/{agent_id}/inventory", cred, json=inv).status_code == 200
    with env.db.transaction() as s:
        assert inventory.get_workload(s, name="web-7").ips == ["10.0.7.2"]
    assert env.state.snapshot("web-7").compiled.addresses == ("10.0.7.2",)  # type: ignore[union-attr]
    env.admin("POST", f"/agents/{agent_id}/unpair", json={"final_state": "remove"})
    with env.db.transaction() as s:
        row = inventory.get_workload(s, name="web-7")
        assert not row.managed and row.labels == {"env": "prod", "role": "web"}
    # an address another workload owns is a conflict, not a silent takeover
    r = env.activate(env.key()["key"], "web-8", ips=["10.0.7.2"])
    assert r.status_code == 409


# -- unpairing --------------------------------------------------------------------------------
def test_unpair_delivers_the_final_state_once(env: Env) -> None:
    agent_id, cred = env.pair("web-1")
    r = env.admin("POST", f"/agents/{agent_id}/unpair", json={"final_state": "keep"})
    assert r.status_code == 200 and r.json()["state"] == "unpaired"
    assert env.admin("POST", f"/agents/{agent_id}/unpair",
                     json={"final_state": "keep"}).status_code == 409
    assert env.admin("POST", f"/agents/{agent_id}/unpair",
                     json={"final_state": "wipe"}).status_code in (409, 422)
    assert env.agent("GET", f"/agents/{agent_id}/policy", cred).status_code == 403
    assert env.agent("POST", f"/agents/{agent_id}/flows", cred,
                     json={"batch_id": "b", "flows": []}).status_code == 403
    r = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    assert r.status_code == 200 and r.json()["unpair"] == {"final_state": "keep"}
    assert r.json()["state"] == "unpaired"
    r = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred, json={"status": "ok"})
    assert r.status_code == 401
    # the host may pair again, as a new agent
    new_id, _ = env.pair("web-1")
    assert new_id != agent_id
    states = {a["id"]: a["state"] for a in env.admin("GET", "/agents").json()}
    assert states == {agent_id: "unpaired", new_id: "paired"}
    assert env.admin("GET", "/agents", params={"state": "paired"}).json()[0]["id"] == new_id
    assert env.admin("POST", "/agents/999/unpair",
                     json={"final_state": "remove"}).status_code == 404
    for too_big in (2**31, 2**64):  # not a 500 from the driver
        assert env.admin("GET", f"/agents/{too_big}").status_code == 422
        assert env.admin("GET", f"/pairing-keys/{too_big}").status_code == 422
        assert env.admin("GET", "/agents", params={"offset": too_big}).status_code == 422


def test_nul_characters_are_refused_before_the_database(env: Env) -> None:
    """PostgreSQL text cannot hold NUL: every agent-channel body refuses it with a 422."""
    r = env.admin("POST", "/pairing-keys", json={"name": "k\x00"})
    assert r.status_code == 422 and "NUL" in r.text
    agent_id, cred = env.pair("web-1")
    r = env.agent("POST", f"/agents/{agent_id}/heartbeat", cred,
                  json={"status": "ok", "errors": [{"kind": "apply", "message": "x\x00y"}]})
    assert r.status_code == 422 and "errors[0].message" in r.text
