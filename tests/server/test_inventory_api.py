"""Inventory API: label keys, labels, workloads (CRUD, filters, pagination), bulk import with a
per-row report, bulk enforcement, optimistic concurrency, and the compiled state following
label changes. Every test runs on SQLite and PostgreSQL (the `db` fixture)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from bulkhead.server.db import Database
from bulkhead.server.models.audit import AuditEntry
from bulkhead.server.models.policy import Label, WorkloadRow
from tests.server.helpers import API, paths, problem


def counts(db: Database) -> tuple[int, int, int]:
    with db.transaction() as s:
        return tuple(int(s.scalar(select(func.count()).select_from(t)) or 0)  # type: ignore[return-value]
                     for t in (WorkloadRow, Label, AuditEntry))


def web(name: str = "web-1", ip: str = "10.0.1.10", **extra: Any) -> dict[str, Any]:
    return {"name": name, "ips": [ip], "labels": {"role": "web", "app": "shop", "env": "prod"},
            "managed": True, "enforcement": "full", **extra}


# -- label keys and labels ------------------------------------------------------------------

def test_label_keys(client_as: Any) -> None:
    c = client_as("admin")
    assert [k["name"] for k in c.get(f"{API}/label-keys").json()] == [
        "role", "app", "env", "loc"]
    r = c.post(f"{API}/label-keys", json={"name": "team", "description": "owning team"})
    assert r.status_code == 201 and r.json()["position"] == 4
    assert paths(problem(c.post(f"{API}/label-keys", json={"name": "team"}), 409)) == ["name"]
    assert paths(problem(c.post(f"{API}/label-keys", json={"name": "Team!"}), 422)) == ["name"]
    assert paths(problem(c.post(f"{API}/label-keys", json={"name": "x", "y": 1}), 422)) == ["y"]
    r = c.patch(f"{API}/label-keys/team", json={"description": "squad"},
                headers={"if-match": '"1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    problem(c.patch(f"{API}/label-keys/team", json={"description": "x"},
                    headers={"if-match": '"1"'}), 412)
    # a key in use by a workload or by the draft cannot be deleted
    c.post(f"{API}/workloads", json={"name": "w", "labels": {"team": "blue"}})
    assert paths(problem(c.delete(f"{API}/label-keys/team"), 409)) == ["path:name"]
    c.delete(f"{API}/workloads/w")
    c.post(f"{API}/rulesets", json={"name": "r", "scopes": [{"team": "blue"}]})
    body = problem(c.delete(f"{API}/label-keys/team"), 409)
    assert paths(body) == ["draft:rulesets[0].scopes[0].team"]
    c.delete(f"{API}/rulesets/r")
    assert c.delete(f"{API}/label-keys/team").status_code == 204
    assert paths(problem(c.get(f"{API}/label-keys/team"), 404)) == ["path:name"]


def test_labels_are_created_on_first_use(client_as: Any, db: Database) -> None:
    """Decision: a workload naming an unknown value of a declared key creates the label
    (audited); an undeclared key is rejected."""
    c = client_as("admin")
    assert c.get(f"{API}/labels").json() == []
    assert c.post(f"{API}/workloads", json=web()).status_code == 201
    labels = {(x["key"], x["value"]): x["workloads"] for x in c.get(f"{API}/labels").json()}
    assert labels == {("role", "web"): 1, ("app", "shop"): 1, ("env", "prod"): 1}
    body = problem(c.post(f"{API}/workloads", json={"name": "x", "labels": {"team": "a"}}), 422)
    assert paths(body) == ["labels.team"]
    with db.transaction() as s:
        created = list(s.scalars(select(AuditEntry.target)
                                 .where(AuditEntry.action == "label.create")))
    assert sorted(created) == ["label:app=shop", "label:env=prod", "label:role=web"]
    # labels as objects: create, describe, delete when unused
    r = c.post(f"{API}/labels", json={"key": "env", "value": "dev", "description": "dev"})
    assert r.status_code == 201
    assert paths(problem(c.post(f"{API}/labels", json={"key": "env", "value": "dev"}),
                         409)) == ["value"]
    assert paths(problem(c.post(f"{API}/labels", json={"key": "nope", "value": "x"}),
                         422)) == ["key"]
    r = c.patch(f"{API}/labels/env/dev", json={"description": "development"})
    assert r.json()["description"] == "development" and r.json()["revision"] == 2
    assert c.get(f"{API}/labels?key=env").json()[0]["value"] == "dev"
    assert paths(problem(c.delete(f"{API}/labels/env/prod"), 409)) == ["path:value"]
    assert c.delete(f"{API}/labels/env/dev").status_code == 204
    assert paths(problem(c.get(f"{API}/labels/env/dev"), 404)) == ["path:value"]


# -- workloads ------------------------------------------------------------------------------------

def test_workload_crud(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    r = c.post(f"{API}/workloads", json=web(hostname="web-1.shop", description="front"))
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"1"'
    w = r.json()
    assert w["labels"] == {"app": "shop", "env": "prod", "role": "web"}
    assert w["updated_by"] == "user:tester" and w["os"] == "linux"
    assert paths(problem(c.post(f"{API}/workloads", json=web()), 409)) == ["name"]
    body = problem(c.post(f"{API}/workloads", json=web("web-2")), 409)
    assert paths(body) == ["ips[0]"] and "'web-1'" in body["errors"][0]["message"]
    body = problem(c.post(f"{API}/workloads", json={"name": "b", "ips": ["10.1.1.1", "x"]}),
                   422)
    assert paths(body) == ["ips[1]"]
    assert paths(problem(c.post(f"{API}/workloads", json={"name": "bad name!"}), 422)) == [
        "name"]
    assert paths(problem(c.post(f"{API}/workloads", json={**web("z", "10.0.0.9"), "bogus": 1}),
                         422)) == ["bogus"]
    assert paths(problem(c.post(f"{API}/workloads", json={"name": "m", "managed": "yes"}),
                         422)) == ["managed"]
    # addresses are canonicalised; GET, PUT (replace), PATCH (merge), DELETE
    r = c.post(f"{API}/workloads", json={"name": "v6", "ips": ["FD00:0:0::1"]})
    assert r.json()["ips"] == ["fd00::1"]
    assert c.get(f"{API}/workloads/web-1").json()["hostname"] == "web-1.shop"
    r = c.put(f"{API}/workloads/web-1", json={"ips": ["10.0.1.10", "10.0.1.12"],
                                              "labels": {"role": "web"}},
              headers={"if-match": '"1"'})
    assert r.status_code == 200 and r.json()["revision"] == 2
    assert r.json()["hostname"] is None and r.json()["enforcement"] == "visibility"
    r = c.patch(f"{API}/workloads/web-1", json={"labels": {"env": "dev", "role": None},
                                                "enforcement": "selective"})
    assert r.json()["labels"] == {"env": "dev"} and r.json()["enforcement"] == "selective"
    assert r.json()["ips"] == ["10.0.1.10", "10.0.1.12"]
    r2 = c.patch(f"{API}/workloads/web-1", json={"enforcement": "selective"})
    assert r2.json()["revision"] == r.json()["revision"]  # no-op: no new revision
    body = problem(c.patch(f"{API}/workloads/web-1", json={"enforcement": "full",
                                                           "revision": 1}), 412)
    assert paths(body) == ["revision"]
    assert paths(problem(c.put(f"{API}/workloads/web-1", json={"name": "other"}), 422)) == [
        "name"]
    assert paths(problem(c.get(f"{API}/workloads/nope"), 404)) == ["path:name"]
    problem(c.delete(f"{API}/workloads/web-1", headers={"if-match": '"1"'}), 412)
    assert c.delete(f"{API}/workloads/web-1").status_code == 204
    problem(c.delete(f"{API}/workloads/web-1"), 404)
    # the address is free again
    assert c.post(f"{API}/workloads", json=web("web-9")).status_code == 201
    with db.transaction() as s:
        rows = list(s.execute(select(AuditEntry.action, AuditEntry.before, AuditEntry.after)
                              .where(AuditEntry.target == "workload:web-1")
                              .order_by(AuditEntry.id)))
    assert [a for a, _, _ in rows] == ["workload.create", "workload.update",
                                      "workload.update", "workload.delete"]
    assert rows[0][1] is None and rows[0][2]["ips"] == ["10.0.1.10"]
    assert rows[-1][1]["labels"] == {"env": "dev"} and rows[-1][2] is None


def test_workload_named_by_the_policy_cannot_be_deleted(client_as: Any) -> None:
    c = client_as("admin")
    c.post(f"{API}/workloads", json=web())
    c.post(f"{API}/rulesets", json={"name": "r", "rules": [{
        "action": "allow", "consumers": [{"workload": "web-1"}],
        "providers": [{"all_workloads": True}], "services": ["any"]}]})
    body = problem(c.delete(f"{API}/workloads/web-1"), 409)
    assert paths(body) == ["draft:rulesets[0].rules[0].consumers[0]"]
    c.post(f"{API}/policy/provision", json={"note": "v1"})
    c.delete(f"{API}/rulesets/r")
    body = problem(c.delete(f"{API}/workloads/web-1"), 409)  # still named by the active one
    assert paths(body) == ["version 1:rulesets[0].rules[0].consumers[0]"]


def test_list_filters_and_pagination(client_as: Any) -> None:
    c = client_as("admin")
    for i in range(7):
        env = "prod" if i % 2 else "dev"
        c.post(f"{API}/workloads", json={
            "name": f"w{i}", "hostname": f"host-{i}.example", "ips": [f"10.0.0.{i + 1}"],
            "labels": {"app": "shop" if i < 5 else "pay", "env": env},
            "managed": i < 3, "enforcement": "full" if i == 0 else "visibility"})
    q = c.get(f"{API}/workloads", params={"label": ["app=shop", "env=prod"]}).json()
    assert [w["name"] for w in q["items"]] == ["w1", "w3"] and q["total"] == 2
    q = c.get(f"{API}/workloads", params={"label": "app:shop,pay", "managed": "false"}).json()
    assert q["total"] == 4
    assert c.get(f"{API}/workloads?enforcement=full").json()["total"] == 1
    assert c.get(f"{API}/workloads?name=HOST-6").json()["items"][0]["name"] == "w6"
    assert c.get(f"{API}/workloads?ip=10.0.0.3").json()["items"][0]["name"] == "w2"
    seen, cursor = [], None
    while True:
        page = c.get(f"{API}/workloads", params={"limit": 3, **(
            {"cursor": cursor} if cursor else {})}).json()
        assert page["total"] == 7
        seen += [w["name"] for w in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"w{i}" for i in range(7)]
    assert [w["name"] for w in c.get(f"{API}/workloads?limit=2&offset=5").json()["items"]] == [
        "w5", "w6"]
    assert paths(problem(c.get(f"{API}/workloads?label=app"), 422)) == ["query:label[0]"]
    assert paths(problem(c.get(f"{API}/workloads?limit=0"), 422)) == ["query:limit"]
    assert paths(problem(c.get(f"{API}/workloads?cursor=w1&offset=2"), 422)) == [
        "query:offset"]


# -- bulk import ------------------------------------------------------------------------------

CSV = """name,hostname,ips,role,app,env,managed,enforcement
good-1,g1.example,10.2.0.1;10.2.0.2,web,shop,prod,true,full
bad-ip,,10.2.0.300,web,shop,prod,no,
good-2,,fd00:2::1,db,shop,prod,,selective

dup-ip,,10.2.0.2,db,shop,prod,false,visibility
bad-enf,,10.2.0.9,db,"shop",prod,1,sometimes
"""


def test_import_atomic_rejects_all_and_reports_rows(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    before = counts(db)
    body = problem(c.post(f"{API}/workloads/import", content=CSV,
                          headers={"content-type": "text/csv"}), 422)
    assert "nothing was imported" in body["detail"]
    assert paths(body) == ["line 3.ips[0]", "line 6.ips[0]", "line 7.enforcement"]
    assert "line 2 (good-1)" in body["errors"][1]["message"]
    assert counts(db) == before
    # a bad header or JSON rows: the same all-or-nothing report, JSON rows named by index
    body = problem(c.post(f"{API}/workloads/import", content="name,colour\nx,red\n"), 422)
    assert paths(body) == ["line 1.colour"]
    problem(c.post(f"{API}/workloads/import", content="ips\n10.0.0.1\n"), 422)
    rows = [{"name": "j1", "ips": ["10.3.0.1"], "labels": {"role": "web"}},
            {"name": "j2", "ips": ["10.3.0.1"]},
            {"name": "j3", "labels": {"team": "x"}},
            "nonsense"]
    body = problem(c.post(f"{API}/workloads/import", json=rows), 422)
    assert paths(body) == ["[1].ips[0]", "[2].labels.team", "[3]"]
    assert counts(db) == before
    r = c.post(f"{API}/workloads/import?mode=best_effort", json={"workloads": rows})
    assert [x["status"] for x in r.json()["rows"]] == ["created", "error", "error", "error"]
    assert paths(problem(c.post(f"{API}/workloads/import", json={"rows": []}), 422)) == [
        "rows"]
    problem(c.post(f"{API}/workloads/import", content="{", headers={
        "content-type": "application/json"}), 422)


def test_csv_import_best_effort_and_dry_run(client_as: Any, app_client: Any) -> None:
    c = client_as("admin")
    r = c.post(f"{API}/workloads/import?mode=best_effort&dry_run=true", content=CSV)
    assert r.status_code == 200
    assert r.json()["summary"] == {"would_create": 2, "error": 3} and not r.json()["applied"]
    assert c.get(f"{API}/workloads").json()["total"] == 0
    r = c.post(f"{API}/workloads/import?mode=best_effort", content=CSV)
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["applied"] and rep["summary"] == {"created": 2, "error": 3}
    assert [(x["line"], x["name"], x["status"]) for x in rep["rows"]] == [
        (2, "good-1", "created"), (3, "bad-ip", "error"), (4, "good-2", "created"),
        (6, "dup-ip", "error"), (7, "bad-enf", "error")]
    g1 = c.get(f"{API}/workloads/good-1").json()
    assert g1["ips"] == ["10.2.0.1", "10.2.0.2"] and g1["managed"] and g1["hostname"]
    assert c.get(f"{API}/workloads/good-2").json()["enforcement"] == "selective"
    # importing again: unchanged rows, updated rows; columns the file lacks (hostname) are
    # kept, an empty cell clears
    again = "name,ips,role,app,env,managed,enforcement\n" \
            "good-1,10.2.0.1;10.2.0.2,web,shop,prod,yes,full\n" \
            "good-2,fd00:2::1,db,shop,dev,,selective\n"
    r = c.post(f"{API}/workloads/import", content=again)
    assert r.json()["summary"] == {"unchanged": 1, "updated": 1}
    assert c.get(f"{API}/workloads/good-2").json()["labels"]["env"] == "dev"
    assert c.get(f"{API}/workloads/good-1").json()["hostname"] == "g1.example"
    r = c.post(f"{API}/workloads/import", content="name,hostname,env\ngood-1,,\n")
    g1 = c.get(f"{API}/workloads/good-1").json()
    assert g1["hostname"] is None and g1["labels"] == {"role": "web", "app": "shop"}
    assert app_client.app.state.policy.snapshot("good-2").compiled is not None


# -- bulk enforcement -------------------------------------------------------------------------

def test_bulk_enforcement(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    for i in range(4):
        c.post(f"{API}/workloads", json={"name": f"w{i}", "ips": [f"10.4.0.{i}"],
                                         "labels": {"app": "shop" if i < 3 else "pay"}})
    r = c.post(f"{API}/workloads/enforcement", json={"enforcement": "selective",
                                                      "labels": {"app": "shop"}})
    assert r.json() == {"enforcement": "selective", "matched": 3,
                        "changed": ["w0", "w1", "w2"]}
    r = c.post(f"{API}/workloads/enforcement", json={"enforcement": "selective",
                                                      "names": ["w0", "w3"]})
    assert r.json()["changed"] == ["w3"] and r.json()["matched"] == 2
    before = counts(db)
    body = problem(c.post(f"{API}/workloads/enforcement", json={
        "enforcement": "full", "names": ["w0", "ghost"]}), 422)
    assert paths(body) == ["names[1]"]
    assert counts(db) == before
    assert paths(problem(c.post(f"{API}/workloads/enforcement", json={"enforcement": "full"}),
                         422)) == ["names"]
    assert paths(problem(c.post(f"{API}/workloads/enforcement", json={
        "enforcement": "full", "labels": {"team": "x"}}), 422)) == ["labels.team"]
    assert paths(problem(c.post(f"{API}/workloads/enforcement", json={
        "enforcement": "max", "labels": {}}), 422)) == ["enforcement"]
    r = c.post(f"{API}/workloads/enforcement", json={"enforcement": "full", "labels": {}})
    assert r.json()["matched"] == 4
    assert {w["enforcement"] for w in c.get(f"{API}/workloads").json()["items"]} == {"full"}


# -- permissions, concurrency, compiled state ------------------------------------------------

def test_permissions_and_strict_bodies(client_as: Any) -> None:
    v = client_as("viewer")
    assert v.get(f"{API}/workloads").status_code == 200
    problem(v.post(f"{API}/workloads", json=web()), 403)
    e = client_as("policy_editor")
    problem(e.post(f"{API}/workloads/import", content="name\nx\n"), 403)
    problem(e.post(f"{API}/label-keys", json={"name": "team"}), 403)
    c = client_as("admin")
    assert c.post(f"{API}/workloads", json=web()).status_code == 201
    assert paths(problem(c.patch(f"{API}/workloads/web-1", json={"labels": {"role": 5}}),
                         422)) == ["labels.role"]
    # NUL characters (PostgreSQL text cannot hold them) are a 422 wherever they come in
    body = problem(c.post(f"{API}/workloads/enforcement", json={
        "enforcement": "full", "labels": {"app": "a\x00"}}), 422)
    assert "labels.app" in body["errors"][0]["message"]
    assert paths(problem(c.get(f"{API}/workloads/a%00b"), 422)) == ["path:name"]
    assert paths(problem(c.get(f"{API}/services?x=%00"), 422)) == ["query:x"]
    problem(c.post(f"{API}/workloads/import", content="name\na\x00\n"), 422)


def test_concurrent_edits_do_not_lose_updates(client_as: Any) -> None:
    c = client_as("admin")
    c.post(f"{API}/workloads", json=web())
    etag = c.get(f"{API}/workloads/web-1").headers["etag"]  # both editors read revision 1
    a = c.patch(f"{API}/workloads/web-1", json={"labels": {"loc": "eu"}},
                headers={"if-match": etag})
    assert a.status_code == 200
    b = c.patch(f"{API}/workloads/web-1", json={"enforcement": "idle"},
                headers={"if-match": etag})
    assert problem(b, 412)["errors"][0]["path"] == "header:If-Match"
    w = c.get(f"{API}/workloads/web-1").json()
    assert w["labels"]["loc"] == "eu" and w["enforcement"] == "full"
    assert c.patch(f"{API}/workloads/web-1", json={"enforcement": "idle"},
                   headers={"if-match": f'W/"{w["revision"]}"'}).status_code == 200


def test_policy_state_follows_workload_and_label_changes(client_as: Any,
                                                         app_client: Any) -> None:
    c = client_as("admin")
    state = app_client.app.state.policy
    c.post(f"{API}/workloads", json=web())
    c.post(f"{API}/workloads", json={"name": "api-1", "ips": ["10.0.1.20"],
                                     "labels": {"role": "api", "app": "shop", "env": "prod"},
                                     "managed": True, "enforcement": "full"})
    c.post(f"{API}/rulesets", json={"name": "shop", "scopes": [{"app": "shop"}], "rules": [{
        "id": "web-api", "action": "allow", "consumers": [{"labels": {"role": "web"}}],
        "providers": [{"labels": {"role": "api"}}], "services": ["tcp/8080"]}]})
    assert c.post(f"{API}/policy/provision", json={"note": "v1"}).status_code == 201

    def peers() -> set[str]:
        snap = state.snapshot("api-1")
        return {ip for r in snap.compiled.inbound for ip in r.peers.hosts}

    assert peers() == {"10.0.1.10"}
    rev = state.snapshot("api-1").revision
    # a label change takes effect at once (no provision): web-2 joins, web-1 leaves
    c.post(f"{API}/workloads", json=web("web-2", "10.0.1.11"))
    c.patch(f"{API}/workloads/web-1", json={"labels": {"role": "db"}})
    assert peers() == {"10.0.1.11"} and state.snapshot("api-1").revision > rev
    assert state.snapshot("web-2").compiled is not None
    c.delete(f"{API}/workloads/web-2")
    assert peers() == set() and state.snapshot("web-2").compiled is None
    # a rejected change leaves the state alone
    snap = state.snapshot("api-1")
    problem(c.patch(f"{API}/workloads/web-1", json={"labels": {"team": "x"}}), 422)
    assert state.snapshot("api-1") == snap
