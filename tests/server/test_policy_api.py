"""Policy API: draft objects, rules, provision/versions/diff/revert, import/export round trip,
scoped editors, optimistic concurrency, compiled state. Every test runs on SQLite and
PostgreSQL (the `db` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from bulkhead.policy.fileformat import dump_policy, loads_policy
from bulkhead.server import metrics
from bulkhead.server.db import Database
from bulkhead.server.models.audit import AuditEntry, Event
from bulkhead.server.models.policy import DraftObject
from tests.server.helpers import API, paths, problem

ROOT = Path(__file__).resolve().parents[2]
SHOP = (ROOT / "examples" / "policies" / "shop.yaml").read_text()






def import_shop(c: Any) -> None:
    r = c.post(f"{API}/policy/import", content=SHOP,
               headers={"content-type": "application/yaml"})
    assert r.status_code == 200, r.text


def audit_count(db: Database) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(AuditEntry)) or 0)


def draft_state(c: Any) -> tuple[str, str]:
    r = c.get(f"{API}/policy/draft")
    return r.headers["etag"], r.text


# -- CRUD of each object kind -----------------------------------------------------------------

KINDS = {
    "label-groups": ({"name": "prod-like", "key": "env", "values": ["prod", "staging"],
                      "description": "prod and staging"},
                     {"key": "env", "values": ["prod"]},
                     ({"name": "g", "key": "colour", "values": ["x"]}, "key")),
    "ip-lists": ({"name": "corp", "cidrs": ["10.0.0.0/8"], "exclude": ["10.9.0.0/16"]},
                 {"cidrs": ["192.168.0.0/16"]},
                 ({"name": "bad", "cidrs": ["10.0.0.0/8", "10.0.0.300"]}, "cidrs[1]")),
    "services": ({"name": "https", "ports": ["tcp/443"], "process": "nginx"},
                 {"ports": ["tcp/443", "tcp/8443"]},
                 ({"name": "bad", "ports": ["tcp/99999"]}, "ports[0]")),
    "user-groups": ({"name": "admins", "members": ["alice"], "sid": "S-1-5-21-1"},
                    {"members": ["alice", "bob"]},
                    ({"name": "bad guys", "members": []}, "name")),
    "rulesets": ({"name": "shop", "scopes": [{"app": "shop"}], "description": "the shop",
                  "rules": [{"id": "r1", "action": "allow",
                             "consumers": [{"labels": {"role": "web"}}],
                             "providers": [{"labels": {"role": "api"}}],
                             "services": ["tcp/8080"]}]},
                 {"scopes": [{"app": "shop", "env": "prod"}], "rules": []},
                 ({"name": "bad", "rules": [{"action": "allow", "consumers": [{"ip_list": "x"}],
                                             "providers": [{"all_workloads": True}],
                                             "services": ["any"]}]},
                  "rules[0].consumers[0].ip_list")),
}


def test_object_crud(client_as: Any) -> None:
    c = client_as("admin")
    for path in KINDS:
        _crud(c, path)


def _crud(c: Any, path: str) -> None:
    created, update, (invalid, bad_path) = KINDS[path]
    r = c.post(f"{API}/{path}", json=created)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["revision"] == 1 and r.headers["etag"] == '"1"'
    assert {k: v for k, v in body.items() if k in created} == created
    assert c.get(f"{API}/{path}").json()[0]["name"] == created["name"]
    name = created["name"]
    # 409 on a duplicate, 422 with the field path, unknown fields rejected
    assert paths(problem(c.post(f"{API}/{path}", json=created), 409)) == ["name"]
    assert bad_path in paths(problem(c.post(f"{API}/{path}", json=invalid), 422))
    assert paths(problem(c.post(f"{API}/{path}", json={**created, "name": "z", "bogus": 1}),
                         422)) == ["bogus"]
    # replace, patch, 404
    r = c.put(f"{API}/{path}/{name}", json=update, headers={"if-match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["revision"] == 2
    for k, v in update.items():
        if v:
            assert r.json()[k] == v
    r = c.patch(f"{API}/{path}/{name}", json={"description": "changed"})
    assert r.status_code == 200 and r.json()["description"] == "changed"
    r = c.patch(f"{API}/{path}/{name}", json={"description": None})
    assert "description" not in r.json()
    nf = problem(c.get(f"{API}/{path}/nope"), 404)
    assert paths(nf) == ["path:name"]
    problem(c.put(f"{API}/{path}/nope", json=update), 404)
    # renaming through PUT is refused
    assert paths(problem(c.put(f"{API}/{path}/{name}", json={**update, "name": "other"}),
                         422)) == ["name"]
    assert c.delete(f"{API}/{path}/{name}").status_code == 204
    problem(c.delete(f"{API}/{path}/{name}"), 404)


def test_delete_in_use_is_409_and_names_the_users(client_as: Any) -> None:
    c = client_as("admin")
    import_shop(c)
    body = problem(c.delete(f"{API}/services/mysql"), 409)
    assert "rulesets[0].rules[1].services[0]" in paths(body)
    assert any("ruleset 'shop'" in e["message"] for e in body["errors"])
    body = problem(c.delete(f"{API}/ip-lists/admins"), 409)
    assert paths(body) == ["rulesets[0].rules[4].consumers[0].ip_list"]
    assert c.get(f"{API}/services/mysql").status_code == 200


def test_rules_endpoints(client_as: Any) -> None:
    c = client_as("admin")
    import_shop(c)
    # nested unknown fields and bad references are named by their path in the body
    rs = {"name": "x", "rules": [{"action": "allow", "consumers": [{"all_workloads": True}],
                                  "providers": [{"labels": {"env": {"group": "nope"}}}],
                                  "services": ["any"], "colour": "red"}]}
    body = problem(c.post(f"{API}/rulesets", json=rs), 422)
    assert set(paths(body)) == {"rules[0].colour", "rules[0].providers[0].labels.env.group"}
    rules = c.get(f"{API}/rulesets/shop/rules").json()
    assert [r["effective_id"] for r in rules][:2] == ["web-api", "api-db"]
    etag = c.get(f"{API}/rulesets/shop").headers["etag"]
    new = {"action": "deny", "consumers": [{"labels": {"role": "db"}}],
           "providers": [{"labels": {"role": "web"}}], "services": ["any"]}
    r = c.post(f"{API}/rulesets/shop/rules?position=0", json=new, headers={"if-match": etag})
    assert r.status_code == 201, r.text
    assert r.json()["effective_id"] == "shop/0" and r.json()["index"] == 0
    # an id-less rule is addressed by its effective id <ruleset>/<index>
    assert c.get(f"{API}/rulesets/shop/rules/shop/0").json()["rule"]["action"] == "deny"
    r = c.patch(f"{API}/rulesets/shop/rules/shop/0", json={"id": "db-web"})
    assert r.status_code == 200 and r.json()["effective_id"] == "db-web"
    body = problem(c.put(f"{API}/rulesets/shop/rules/db-web",
                         json={**new, "providers": [{"ip_list": "nope"}]}), 422)
    assert paths(body) == ["providers[0].ip_list"]
    body = problem(c.post(f"{API}/rulesets/shop/rules", json={**new, "id": "web-api"}), 422)
    assert paths(body) == ["id"]  # duplicate rule id
    problem(c.post(f"{API}/rulesets/shop/rules", json=new, headers={"if-match": etag}), 412)
    assert c.delete(f"{API}/rulesets/shop/rules/db-web").status_code == 204
    assert paths(problem(c.get(f"{API}/rulesets/shop/rules/db-web"), 404)) == ["path:rule_id"]
    assert paths(problem(c.get(f"{API}/rulesets/nope/rules"), 404)) == ["path:name"]


def test_settings_and_policy_tests(client_as: Any) -> None:
    c = client_as("admin")
    import_shop(c)
    assert c.get(f"{API}/settings").json() == {"outbound": "enforce", "revision": 0}
    r = c.put(f"{API}/settings", json={"outbound": "allow"})
    assert r.json() == {"outbound": "allow", "revision": 1}
    assert paths(problem(c.put(f"{API}/settings", json={"outbound": "maybe"}), 422)) == [
        "outbound"]
    tests = c.get(f"{API}/policy-tests").json()
    assert len(tests["tests"]) == 4
    body = problem(c.put(f"{API}/policy-tests", json={"tests": [
        {"from": "ghost", "to": "web-1", "port": "tcp/443", "expect": "allowed"}]}), 422)
    assert paths(body) == ["tests[0].from"]
    r = c.put(f"{API}/policy-tests", json={"tests": tests["tests"][:1],
                                           "revision": tests["revision"]})
    assert r.status_code == 200 and len(r.json()["tests"]) == 1


# -- import / export ------------------------------------------------------------------------

def test_import_export_round_trip_is_exact(client_as: Any) -> None:
    c = client_as("admin")
    import_shop(c)
    original = loads_policy(SHOP)
    r = c.get(f"{API}/policy/export?version=draft")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/yaml")
    assert r.text == dump_policy(original)  # the CLI's canonical form, byte for byte
    assert c.post(f"{API}/policy/provision", json={"note": "v1"}).status_code == 201
    for fmt in ("yaml", "json"):
        for ref in ("draft", "active", "1"):
            text = c.get(f"{API}/policy/export?version={ref}&format={fmt}").text
            assert loads_policy(text) == original, (ref, fmt)
        # re-importing the export changes nothing
        r = c.post(f"{API}/policy/import", content=text,
                   headers={"content-type": f"application/{fmt}"})
        assert r.status_code == 200
        assert r.json()["workloads"] == {"unchanged": 8}
        ch = c.get(f"{API}/policy/draft/changes").json()
        assert not (ch["added"] or ch["modified"] or ch["deleted"] or ch["reordered"])
    # the draft endpoint gives the same policy in JSON form (and YAML on request)
    assert loads_policy(c.get(f"{API}/policy/draft").text) == original
    assert loads_policy(c.get(f"{API}/policy/draft?format=yaml").text) == original


def test_export_keeps_descriptions_and_custom_label_keys(client_as: Any) -> None:
    c = client_as("admin")
    text = SHOP.replace("version: 1\n", "version: 1\nlabel_keys: [role, app, env, loc, team]\n")
    text = text.replace("{name: https, ports: [\"tcp/443\"]}",
                        "{name: https, ports: [\"tcp/443\"], description: web traffic}")
    r = c.post(f"{API}/policy/import", content=text)
    assert r.status_code == 200, r.text
    out = c.get(f"{API}/policy/export?version=draft").text
    assert loads_policy(out) == loads_policy(text)
    assert yaml.safe_load(out)["services"][0]["description"] == "web traffic"
    assert [k["name"] for k in c.get(f"{API}/label-keys").json()] == [
        "role", "app", "env", "loc", "team"]


def test_import_invalid_file_changes_nothing(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    import_shop(c)
    before, n_audit = draft_state(c), audit_count(db)
    bad = SHOP.replace("services: [api]}", "services: [apii]}").replace(
        "ips: [10.0.1.11]", "ips: [10.0.1.10]")
    body = problem(c.post(f"{API}/policy/import", content=bad), 422)
    errors = {e["path"]: e["message"] for e in body["errors"]}
    assert "rulesets[0].rules[0].services[0]" in errors
    assert "workloads[1].ips[0]" in errors
    assert "(line " in errors["rulesets[0].rules[0].services[0]"]
    assert draft_state(c) == before and audit_count(db) == n_audit
    assert problem(c.post(f"{API}/policy/import", content="a: [1"), 422)["errors"]


def test_import_workload_modes(client_as: Any) -> None:
    c = client_as("admin")
    assert c.post(f"{API}/workloads", json={"name": "extra", "ips": ["10.7.0.1"]}
                  ).status_code == 201
    import_shop(c)  # upsert keeps `extra`
    assert c.get(f"{API}/workloads/extra").status_code == 200
    r = c.post(f"{API}/policy/import?workloads=replace", content=SHOP)
    assert r.json()["workloads"] == {"deleted": 1, "unchanged": 8}
    assert c.get(f"{API}/workloads/extra").status_code == 404
    assert paths(problem(c.post(f"{API}/workloads", json={"name": "squatter",
                                                          "ips": ["10.0.1.10"]}), 409)) == [
        "ips[0]"]
    # policy editors may import policy objects only (workloads=skip)
    e = client_as("policy_editor")
    problem(e.post(f"{API}/policy/import", content=SHOP), 403)
    r = e.post(f"{API}/policy/import?workloads=skip", content=SHOP)
    assert r.status_code == 200, r.text


# -- provision, versions, diff, revert --------------------------------------------------------

def test_provision_versions_diff_revert(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    assert paths(problem(c.post(f"{API}/policy/provision", json={"note": "empty"}), 409)) == [
        "force"]
    import_shop(c)
    r = c.post(f"{API}/policy/provision", json={"note": "shop v1"})
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["id"] == 1 and v1["author"] == "user:tester" and v1["note"] == "shop v1"
    assert {"label_group", "ruleset"} <= {x["kind"] for x in v1["summary"]["changes"]["added"]}
    problem(c.post(f"{API}/policy/provision", json={"note": "again"}), 409)
    # edit the draft: the console sees what changed since the active version
    r = c.patch(f"{API}/services/https", json={"ports": ["tcp/443", "tcp/8443"]})
    assert r.status_code == 200
    assert c.post(f"{API}/services", json={"name": "dns", "ports": ["udp/53"]}
                  ).status_code == 201
    ch = c.get(f"{API}/policy/draft/changes").json()
    assert ch["base_version"] == 1
    assert [(x["kind"], x["name"]) for x in ch["modified"]] == [("service", "https")]
    assert [(x["kind"], x["name"]) for x in ch["added"]] == [("service", "dns")]
    assert ch["modified"][0]["updated_by"] == "user:tester"
    v2 = c.post(f"{API}/policy/provision", json={"note": "8443"}).json()
    assert v2["id"] == 2
    page = c.get(f"{API}/policy/versions").json()
    assert page["total"] == 2 and [v["id"] for v in page["items"]] == [2, 1]
    assert "objects" not in page["items"][0]
    detail = c.get(f"{API}/policy/versions/1").json()
    assert detail["objects"]["services"][0] == {"name": "https", "ports": ["tcp/443"]}
    assert paths(problem(c.get(f"{API}/policy/versions/9"), 404)) == ["path:version_id"]
    assert paths(problem(c.get(f"{API}/policy/versions/{2**70}"), 422)) == ["path:version_id"]
    assert paths(problem(c.get(f"{API}/policy/versions?offset={2**70}"), 422)) == [
        "query:offset"]
    problem(c.get(f"{API}/policy/diff?from={2**70}"), 404)
    # semantic diff between any two
    d = c.get(f"{API}/policy/diff?from=1&to=2").json()
    assert d["from"] == "version 1" and d["to"] == "version 2"
    assert [x["name"] for x in d["changes"]["modified"]] == ["https"]
    sem = d["semantic"]
    assert any(x["service"].startswith("tcp/8443") and x["provider"] == "web-1"
               for x in sem["newly_allowed"])
    assert c.get(f"{API}/policy/diff?from=active&to=draft").json()["changes"]["modified"] == []
    assert paths(problem(c.get(f"{API}/policy/diff?from=bogus"), 422)) == ["query:from"]
    # revert the draft to version 1 (audited, not provisioned)
    r = c.post(f"{API}/policy/revert", json={"version": 1})
    assert r.status_code == 200, r.text
    assert {x["name"] for x in r.json()["changes"]["deleted"]} == {"dns"}
    assert c.get(f"{API}/services/https").json()["ports"] == ["tcp/443"]
    assert c.get(f"{API}/policy/versions").json()["total"] == 2
    ch = c.get(f"{API}/policy/draft/changes").json()
    assert ch["base_version"] == 2 and ch["modified"] and ch["deleted"]
    assert c.post(f"{API}/policy/provision", json={"note": "back to 1"}).status_code == 201
    assert loads_policy(c.get(f"{API}/policy/export?version=3").text) == loads_policy(SHOP)
    r = c.post(f"{API}/policy/provision", json={"note": "forced", "force": True})
    assert r.status_code == 201 and r.json()["id"] == 4
    problem(c.post(f"{API}/policy/revert", json={"version": 42}), 404)
    with db.transaction() as s:
        actions = list(s.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
        events = list(s.scalars(select(Event.kind)))
    assert actions.count("policy.provision") == 4 and "policy.revert" in actions
    assert events.count("provisioned") == 4
    assert metrics.POLICY_VERSION._value.get() == 4


def test_provision_refuses_lint_and_load_errors(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    rs = {"name": "dead", "scopes": [{"app": "b"}],
          "rules": [{"id": "never", "action": "allow", "consumers": [{"all_workloads": True}],
                     "providers": [{"labels": {"app": "a"}}], "services": ["any"]}]}
    assert c.post(f"{API}/rulesets", json=rs).status_code == 201
    body = problem(c.post(f"{API}/policy/provision", json={"note": "x"}), 422)
    assert "lint error" in body["detail"]
    assert all(p.startswith("rulesets[0].rules[0]") for p in paths(body)) and paths(body)
    assert c.get(f"{API}/policy/versions").json()["total"] == 0
    # a draft that does not load (corrupted behind the API's back) is refused too
    assert c.delete(f"{API}/rulesets/dead").status_code == 204
    import_shop(c)
    with db.transaction() as s:
        row = s.scalar(select(DraftObject).where(DraftObject.name == "shop"))
        assert row is not None
        row.body = {**row.body, "rules": [{**row.body["rules"][0], "services": ["nope"]}]}
    body = problem(c.post(f"{API}/policy/provision", json={"note": "x"}), 422)
    assert paths(body) == ["rulesets[0].rules[0].services[0]"]


def test_provision_note_required_and_draft_if_match(client_as: Any) -> None:
    c = client_as("admin")
    import_shop(c)
    assert paths(problem(c.post(f"{API}/policy/provision", json={}), 422)) == ["note"]
    etag = c.get(f"{API}/policy/draft").headers["etag"]
    c.post(f"{API}/services", json={"name": "dns", "ports": ["udp/53"]})
    body = problem(c.post(f"{API}/policy/provision", json={"note": "x"},
                          headers={"if-match": etag}), 412)
    assert paths(body) == ["header:If-Match"]
    body = problem(c.post(f"{API}/policy/provision", json={
        "note": "x", "draft_revision": int(etag.strip('"'))}), 412)
    assert paths(body) == ["draft_revision"] or paths(body) == ["revision"]
    etag = c.get(f"{API}/policy/draft").headers["etag"]
    assert c.post(f"{API}/policy/provision", json={"note": "x"},
                  headers={"if-match": etag}).status_code == 201


# -- concurrency, rejection, permissions ---------------------------------------------------------

def test_optimistic_concurrency_and_audit(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    c.post(f"{API}/services", json={"name": "web", "ports": ["tcp/80"]})
    seen = c.get(f"{API}/services/web").headers["etag"]  # two editors read revision 1
    r = c.put(f"{API}/services/web", json={"ports": ["tcp/8080"]}, headers={"if-match": seen})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    body = problem(c.put(f"{API}/services/web", json={"ports": ["tcp/81"]},
                         headers={"if-match": seen}), 412)
    assert "changed since you read it" in body["detail"]
    assert paths(problem(c.patch(f"{API}/services/web", json={"ports": ["tcp/81"],
                                                              "revision": 1}), 412)) == [
        "revision"]
    problem(c.delete(f"{API}/services/web", headers={"if-match": seen}), 412)
    assert c.get(f"{API}/services/web").json()["ports"] == ["tcp/8080"]
    assert paths(problem(c.put(f"{API}/services/web", json={"ports": ["tcp/1"]},
                               headers={"if-match": "garbage"}), 422)) == ["header:If-Match"]
    r = c.put(f"{API}/services/web", json={"ports": ["tcp/8080"]}, headers={"if-match": "*"})
    assert r.status_code == 200 and r.json()["revision"] == 2  # unchanged: no new revision
    # every mutation is audited with before/after images in the policy-file form
    c.delete(f"{API}/services/web")
    with db.transaction() as s:
        rows = list(s.scalars(select(AuditEntry).where(AuditEntry.target == "service:web")
                              .order_by(AuditEntry.id)))
    assert [(a.action, a.actor) for a in rows] == [
        ("service.create", "user:tester"), ("service.update", "user:tester"),
        ("service.delete", "user:tester")]
    assert rows[1].before == {"name": "web", "ports": ["tcp/80"]}
    assert rows[1].after == {"name": "web", "ports": ["tcp/8080"]}
    assert rows[2].after is None


def test_rejected_request_changes_nothing(client_as: Any, db: Database) -> None:
    c = client_as("admin")
    import_shop(c)
    before, n_audit = draft_state(c), audit_count(db)
    bad = {"name": "new", "rules": [{"action": "allow", "consumers": [{"workload": "ghost"}],
                                     "providers": [{"all_workloads": True}],
                                     "services": ["any"]}]}
    assert paths(problem(c.post(f"{API}/rulesets", json=bad), 422)) == [
        "rules[0].consumers[0].workload"]
    problem(c.patch(f"{API}/label-groups/prod-like", json={"key": "colour"}), 422)
    problem(c.delete(f"{API}/label-groups/prod-like", headers={"if-match": '"7"'}), 412)
    problem(client_as("viewer").post(f"{API}/services", json={"name": "a",
                                                              "ports": ["any"]}), 403)
    c = client_as("admin")
    assert draft_state(c) == before and audit_count(db) == n_audit


def test_permissions_and_openapi(client_as: Any) -> None:
    v = client_as("viewer")
    assert v.get(f"{API}/rulesets").status_code == 200
    problem(v.post(f"{API}/rulesets", json={"name": "x"}), 403)
    problem(v.post(f"{API}/policy/provision", json={"note": "x"}), 403)
    a = client_as("auditor")
    problem(a.post(f"{API}/policy/revert", json={"version": 1}), 403)
    spec = a.get(f"{API}/openapi.json").json()
    for p in ("/api/v1/rulesets/{name}/rules/{rule_id}", "/api/v1/policy/provision",
              "/api/v1/workloads/import", "/api/v1/policy/diff", "/api/v1/label-groups"):
        assert p in spec["paths"], p


# -- scoped policy editors ------------------------------------------------------------------------

def _ruleset(name: str, scopes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "scopes": scopes,
            "rules": [{"action": "allow", "consumers": [{"labels": {"role": "web"}}],
                       "providers": [{"labels": {"role": "api"}}], "services": ["tcp/8080"]}]}


def test_scoped_editor(client_as: Any) -> None:
    admin = client_as("admin")
    admin.post(f"{API}/label-groups", json={"name": "shop-apps", "key": "app",
                                            "values": ["shop"]})
    admin.post(f"{API}/rulesets", json=_ruleset("global", []))
    admin.post(f"{API}/rulesets", json=_ruleset("payments", [{"app": "pay"}]))
    admin.post(f"{API}/policy/provision", json={"note": "base"})
    e = client_as("policy_editor", name="eve", scope={"app": ["shop"]})
    ok = e.post(f"{API}/rulesets", json=_ruleset("shop-prod", [{"app": "shop", "env": "prod"}]))
    assert ok.status_code == 201, ok.text
    assert e.post(f"{API}/rulesets", json=_ruleset(
        "shop-grp", [{"app": {"group": "shop-apps"}}])).status_code == 201
    assert paths(problem(e.post(f"{API}/rulesets", json=_ruleset("p", [{"app": "pay"}])),
                         403)) == ["scopes[0].app"]
    assert paths(problem(e.post(f"{API}/rulesets", json=_ruleset("g", [])), 403)) == ["scopes"]
    assert paths(problem(e.post(f"{API}/rulesets", json=_ruleset(
        "m", [{"app": "shop"}, {"env": "prod"}])), 403)) == ["scopes[1]"]
    assert paths(problem(e.post(f"{API}/rulesets", json=_ruleset(
        "l", [{"app": ["shop", "pay"]}])), 403)) == ["scopes[0].app"]
    # cannot move its ruleset out of scope, nor touch others' or shared objects
    problem(e.patch(f"{API}/rulesets/shop-prod", json={"scopes": [{"app": "pay"}]}), 403)
    problem(e.patch(f"{API}/rulesets/global", json={"description": "x"}), 403)
    problem(e.delete(f"{API}/rulesets/payments"), 403)
    problem(e.post(f"{API}/rulesets/payments/rules", json=_ruleset("x", [])["rules"][0]), 403)
    problem(e.post(f"{API}/services", json={"name": "s", "ports": ["any"]}), 403)
    problem(e.put(f"{API}/settings", json={"outbound": "allow"}), 403)
    assert e.post(f"{API}/rulesets/shop-prod/rules", json=_ruleset("x", [])["rules"][0]
                  ).status_code == 201
    # provisions only when every draft change lies inside the scope
    r = e.post(f"{API}/policy/provision", json={"note": "shop rules"})
    assert r.status_code == 201, r.text
    client_as("admin").post(f"{API}/services", json={"name": "s", "ports": ["any"]})
    e = client_as("policy_editor", name="eve", scope={"app": ["shop"]})
    body = problem(e.post(f"{API}/policy/provision", json={"note": "no"}), 403)
    assert "service 's'" in body["detail"]
    problem(e.post(f"{API}/policy/revert", json={"version": 1}), 403)


# -- compiled state ---------------------------------------------------------------------------

def test_policy_state_follows_provision(client_as: Any, app_client: Any, db: Database,
                                       settings: Any) -> None:
    from fastapi.testclient import TestClient

    from bulkhead.server.app import create_app

    c = client_as("admin")
    state = app_client.app.state.policy
    import_shop(c)
    assert state.snapshot("web-1").version is None  # nothing active yet
    c.post(f"{API}/policy/provision", json={"note": "v1"})
    snap = state.snapshot("web-1")
    assert snap.version == 1 and snap.compiled is not None
    assert "internet-web" in {r.rule_id for r in snap.compiled.inbound}
    c.delete(f"{API}/rulesets/shop/rules/internet-web")
    assert state.snapshot("web-1") == snap  # a draft edit changes nothing active
    c.post(f"{API}/policy/provision", json={"note": "v2"})
    snap2 = state.snapshot("web-1")
    assert snap2.version == 2 and snap2.revision > snap.revision
    assert "internet-web" not in {r.rule_id for r in snap2.compiled.inbound}
    assert metrics.POLICY_VERSION._value.get() == 2
    # a restarted server loads the active version at start-up (app.py -> rebuild_state)
    app = create_app(settings, db=db)
    with TestClient(app):
        snap3 = app.state.policy.snapshot("web-1")
    assert snap3.version == 2 and snap3.compiled == snap2.compiled
