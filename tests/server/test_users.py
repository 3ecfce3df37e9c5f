"""Users, login, sessions, API keys, audit log, events export, metrics and the `bulkhead
server` commands, against the real app on SQLite and PostgreSQL (the `db` fixture)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from bulkhead.server import auth
from bulkhead.server.auth import Principal, permissions_for
from bulkhead.server.db import Database, utcnow
from bulkhead.server.models.audit import AuditEntry
from bulkhead.server.models.users import ApiKey, User, UserSession
from bulkhead.server.services import users as svc
from bulkhead.server.services.audit import emit
from tests.server.helpers import API, problem

PW = "correct horse battery staple"


@pytest.fixture(autouse=True)
def fast_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap Argon2id parameters in tests (the algorithm and code path are the real ones)."""
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024,
                                                        parallelism=1))


OPERATOR = Principal("cli", 0, "test", "owner", None, permissions_for("owner"))


def add_user(db: Database, name: str, role: str, password: str = PW,
             scope: dict[str, list[str]] | None = None) -> int:
    with db.transaction() as s:
        return svc.create_user(s, actor=OPERATOR, name=name, password=password, role=role,
                               scope=scope).id


def login(client: TestClient, name: str, password: str = PW) -> dict[str, str]:
    r = client.post(f"{API}/auth/login", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}




def audit_rows(db: Database) -> list[AuditEntry]:
    with db.transaction() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


@pytest.fixture
def owner(db: Database, app_client: TestClient) -> dict[str, str]:
    add_user(db, "olivia", "owner")
    return login(app_client, "olivia")


# -- login, sessions -------------------------------------------------------------------------

def test_login_me_logout(db: Database, app_client: TestClient) -> None:
    add_user(db, "ed", "policy_editor", scope={"app": ["shop", "shop"], "env": ["prod"]})
    before = utcnow()
    r = app_client.post(f"{API}/auth/login", json={"name": "ed", "password": PW})
    assert r.status_code == 200
    body = r.json()
    assert body["token"].startswith("bhs_") and body["token_type"] == "bearer"
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(hours=11.9) < expires - before < timedelta(hours=12.1)
    h = {"Authorization": f"Bearer {body['token']}"}
    me = app_client.get(f"{API}/auth/me", headers=h).json()
    assert me["name"] == "ed" and me["role"] == "policy_editor" and me["kind"] == "user"
    assert me["scope"] == {"app": ["shop"], "env": ["prod"]}
    assert "policy:write" in me["permissions"] and "users:read" not in me["permissions"]
    with db.transaction() as s:
        sess = s.scalars(select(UserSession)).one()
        assert sess.digest == auth.token_digest(body["token"])  # the token itself is not stored
        assert s.scalars(select(User)).one().last_login_at is not None
    assert app_client.post(f"{API}/auth/logout", headers=h).status_code == 204
    problem(app_client.get(f"{API}/auth/me", headers=h), 401)
    actions = [a.action for a in audit_rows(db)]
    assert actions == ["user.create", "auth.login", "auth.logout"]


def test_missing_and_garbage_credentials(app_client: TestClient) -> None:
    problem(app_client.get(f"{API}/auth/me"), 401)
    for token in ("nonsense", "bhs_" + "x" * 43, "bhk_" + "y" * 43, "bhg_zz", "Basic abc"):
        problem(app_client.get(f"{API}/auth/me", headers={"Authorization": f"Bearer {token}"}),
                401)


def test_wrong_password_is_audited_without_the_password(db: Database,
                                                        app_client: TestClient) -> None:
    add_user(db, "vic", "viewer")
    secret_guess = "hunter2-is-not-my-password"
    r = app_client.post(f"{API}/auth/login", json={"name": "vic", "password": secret_guess})
    assert problem(r, 401)["detail"] == "wrong name or password"
    typo = "vic-typed-password-into-name"
    r2 = app_client.post(f"{API}/auth/login", json={"name": typo, "password": "whatever"})
    assert problem(r2, 401)["detail"] == r.json()["detail"]  # indistinguishable
    rows = audit_rows(db)
    failed = [a for a in rows if a.action == "auth.login_failed"]
    assert [(a.actor, a.target) for a in failed] == [("anonymous", "user:vic"),
                                                     ("anonymous", "user:<unknown>")]
    assert "wrong password" in (failed[0].note or "")
    dump = json.dumps([[a.actor, a.target, a.before, a.after, a.note] for a in rows])
    assert secret_guess not in dump and typo not in dump and PW not in dump


def test_lockout_after_repeated_failures(db: Database, app_client: TestClient) -> None:
    add_user(db, "lou", "viewer")
    for _ in range(svc.LOCK_AFTER):
        problem(app_client.post(f"{API}/auth/login",
                                json={"name": "lou", "password": "wrong-wrong-wrong"}), 401)
    # locked: even the right password is refused, and looks the same as a wrong one
    r = app_client.post(f"{API}/auth/login", json={"name": "lou", "password": PW})
    assert problem(r, 401)["detail"] == "wrong name or password"
    with db.transaction() as s:
        u = s.scalars(select(User).where(User.name == "lou")).one()
        assert u.failed_logins == svc.LOCK_AFTER
        assert u.locked_until is not None
        assert timedelta(seconds=50) < u.locked_until - utcnow() <= timedelta(seconds=60)
    notes = [a.note for a in audit_rows(db) if a.action == "auth.login_failed"]
    assert "locked for 60s" in (notes[-2] or "") and (notes[-1] or "").startswith("locked")
    # the lock expires; a further failure locks for twice as long
    with db.transaction() as s:
        s.execute(update(User).where(User.name == "lou")
                  .values(locked_until=utcnow() - timedelta(seconds=1)))
    problem(app_client.post(f"{API}/auth/login",
                            json={"name": "lou", "password": "wrong-wrong-wrong"}), 401)
    with db.transaction() as s:
        u = s.scalars(select(User).where(User.name == "lou")).one()
        assert u.locked_until is not None
        assert timedelta(seconds=110) < u.locked_until - utcnow() <= timedelta(seconds=120)
        s.execute(update(User).where(User.name == "lou")
                  .values(locked_until=utcnow() - timedelta(seconds=1)))
    login(app_client, "lou")
    with db.transaction() as s:
        u = s.scalars(select(User).where(User.name == "lou")).one()
        assert u.failed_logins == 0 and u.locked_until is None


def test_session_expiry(db: Database, app_client: TestClient) -> None:
    add_user(db, "sam", "viewer")
    h = login(app_client, "sam")
    assert app_client.get(f"{API}/auth/me", headers=h).status_code == 200
    with db.transaction() as s:
        s.execute(update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    problem(app_client.get(f"{API}/auth/me", headers=h), 401)


def test_disabled_user_loses_sessions_and_keys(db: Database, app_client: TestClient,
                                               owner: dict[str, str]) -> None:
    uid = add_user(db, "dan", "admin")
    h = login(app_client, "dan")
    key = app_client.post(f"{API}/auth/api-keys", headers=h, json={"name": "ci"}).json()
    kh = {"Authorization": f"Bearer {key['token']}"}
    assert app_client.get(f"{API}/users", headers=kh).status_code == 200
    r = app_client.patch(f"{API}/users/{uid}", headers=owner, json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    problem(app_client.get(f"{API}/auth/me", headers=h), 401)
    problem(app_client.get(f"{API}/auth/me", headers=kh), 401)
    problem(app_client.post(f"{API}/auth/login", json={"name": "dan", "password": PW}), 401)
    r = app_client.patch(f"{API}/users/{uid}", headers=owner, json={"disabled": False})
    assert r.status_code == 200
    login(app_client, "dan")


def test_own_password_change(db: Database, app_client: TestClient) -> None:
    add_user(db, "pat", "viewer")
    h1, h2 = login(app_client, "pat"), login(app_client, "pat")
    new = "a much better passphrase"
    r = app_client.post(f"{API}/auth/password", headers=h1,
                        json={"current_password": "nope", "new_password": new})
    assert problem(r, 422)["errors"][0]["path"] == "current_password"
    r = app_client.post(f"{API}/auth/password", headers=h1,
                        json={"current_password": PW, "new_password": "short"})
    assert problem(r, 422)["errors"][0]["path"] == "new_password"
    r = app_client.post(f"{API}/auth/password", headers=h1,
                        json={"current_password": PW, "new_password": new})
    assert r.status_code == 204
    assert app_client.get(f"{API}/auth/me", headers=h1).status_code == 200  # kept
    problem(app_client.get(f"{API}/auth/me", headers=h2), 401)  # other sessions ended
    problem(app_client.post(f"{API}/auth/login", json={"name": "pat", "password": PW}), 401)
    login(app_client, "pat", new)
    assert all(PW not in json.dumps([a.before, a.after, a.note]) and
               new not in json.dumps([a.before, a.after, a.note]) for a in audit_rows(db))


# -- user management -------------------------------------------------------------------------

def test_create_validate_and_conflicts(app_client: TestClient, owner: dict[str, str]) -> None:
    ok = {"name": "eve", "password": PW, "role": "viewer"}
    r = app_client.post(f"{API}/users", headers=owner, json=ok)
    assert r.status_code == 201
    assert set(r.json()) == {"id", "name", "role", "scope", "disabled", "locked",
                             "created_at", "last_login_at"}
    assert problem(app_client.post(f"{API}/users", headers=owner, json=ok), 409)[
        "errors"][0]["path"] == "name"
    cases = [({**ok, "name": "x2", "password": "elevenchars"}, "password"),
             ({**ok, "name": "Bad Name"}, "name"),
             ({**ok, "name": "x3", "role": "root"}, "role"),
             ({**ok, "name": "x4", "is_admin": True}, "is_admin"),
             ({**ok, "name": "x5", "scope": {"app": ["shop"]}}, "scope"),
             ({**ok, "name": "x6", "role": "policy_editor", "scope": {"app": []}}, "scope.app"),
             ({"name": "x7", "role": "viewer"}, "password")]
    for body, path in cases:
        errs = problem(app_client.post(f"{API}/users", headers=owner, json=body), 422)["errors"]
        assert any(e["path"] == path for e in errs), (body, errs)


def test_owner_and_admin_rights(db: Database, app_client: TestClient,
                                owner: dict[str, str]) -> None:
    oid = 1
    aid = add_user(db, "ada", "admin")
    admin = login(app_client, "ada")
    # admins manage non-owners
    r = app_client.post(f"{API}/users", headers=admin,
                        json={"name": "ned", "password": PW, "role": "policy_editor",
                              "scope": {"env": ["dev"]}})
    assert r.status_code == 201
    nid = r.json()["id"]
    r = app_client.patch(f"{API}/users/{nid}", headers=admin, json={"role": "admin"})
    assert r.status_code == 200 and r.json()["scope"] is None  # scope dropped with the role
    # ... but not owners, nor make anyone an owner
    problem(app_client.post(f"{API}/users", headers=admin,
                            json={"name": "own2", "password": PW, "role": "owner"}), 403)
    problem(app_client.patch(f"{API}/users/{oid}", headers=admin, json={"disabled": True}),
            403)
    problem(app_client.patch(f"{API}/users/{nid}", headers=admin, json={"role": "owner"}), 403)
    problem(app_client.patch(f"{API}/users/{oid}", headers=admin, json={"password": PW * 2}),
            403)
    # owners create owners
    r = app_client.post(f"{API}/users", headers=owner,
                        json={"name": "own2", "password": PW, "role": "owner"})
    assert r.status_code == 201
    problem(app_client.patch(f"{API}/users/{aid}", headers=owner, json={"role": None}), 422)
    problem(app_client.patch(f"{API}/users/999999", headers=owner, json={"role": "viewer"}),
            404)


def test_last_enabled_owner_is_protected(db: Database, app_client: TestClient,
                                         owner: dict[str, str]) -> None:
    oid = 1
    for change in ({"role": "admin"}, {"disabled": True}):
        body = problem(app_client.patch(f"{API}/users/{oid}", headers=owner, json=change), 409)
        assert "last enabled owner" in body["detail"]
    o2 = add_user(db, "otto", "owner")
    with db.transaction() as s:
        svc.update_user(s, actor=OPERATOR, user_id=o2, disabled=True)
    # a disabled owner does not count
    problem(app_client.patch(f"{API}/users/{oid}", headers=owner, json={"role": "admin"}), 409)
    with db.transaction() as s:
        svc.update_user(s, actor=OPERATOR, user_id=o2, disabled=False)
    r = app_client.patch(f"{API}/users/{oid}", headers=owner, json={"role": "admin"})
    assert r.status_code == 200 and r.json()["role"] == "admin"
    # now olivia is an admin (live: same session) and may not touch the remaining owner
    problem(app_client.patch(f"{API}/users/{o2}", headers=owner, json={"disabled": True}), 403)
    with db.transaction() as s, pytest.raises(Exception, match="last enabled owner"):
        svc.update_user(s, actor=OPERATOR, user_id=o2, role="viewer")


def test_every_mutation_is_audited_with_before_and_after(db: Database, app_client: TestClient,
                                                         owner: dict[str, str]) -> None:
    r = app_client.post(f"{API}/users", headers=owner,
                        json={"name": "ivy", "password": PW, "role": "viewer"})
    uid = r.json()["id"]
    app_client.patch(f"{API}/users/{uid}", headers=owner,
                     json={"role": "policy_editor", "scope": {"app": ["crm"]},
                           "password": "another long password"})
    key = app_client.post(f"{API}/users/{uid}/api-keys", headers=owner,
                          json={"name": "ci", "role": "viewer"}).json()
    app_client.delete(f"{API}/users/{uid}/api-keys/{key['id']}", headers=owner)
    rows = [a for a in audit_rows(db) if a.actor == "user:olivia"]
    assert [a.action for a in rows] == ["auth.login", "user.create", "user.update",
                                        "api_key.create", "api_key.revoke"]
    create, upd, kc, kr = rows[1:]
    assert create.before is None and create.after == {
        "id": uid, "name": "ivy", "role": "viewer", "scope": None, "disabled": False}
    assert upd.before is not None and upd.after is not None
    assert upd.before["role"] == "viewer" and upd.after["role"] == "policy_editor"
    assert upd.after["scope"] == {"app": ["crm"]} and upd.note == "password reset"
    assert kc.after is not None and kc.after["role"] == "viewer" and kc.target == "user:ivy"
    assert kr.before is not None and kr.after is not None
    assert kr.before["revoked_at"] is None and kr.after["revoked_at"] is not None
    everything = json.dumps([[a.before, a.after, a.note] for a in audit_rows(db)])
    for secret in (PW, "another long password", key["token"], "$argon2"):
        assert secret not in everything


# -- API keys --------------------------------------------------------------------------------

def test_api_keys(db: Database, app_client: TestClient, owner: dict[str, str]) -> None:
    r = app_client.post(f"{API}/auth/api-keys", headers=owner,
                        json={"name": "prometheus", "role": "viewer"})
    assert r.status_code == 201
    key = r.json()
    assert key["token"].startswith("bhk_") and key["hint"] == key["token"][:8]
    kh = {"Authorization": f"Bearer {key['token']}"}
    me = app_client.get(f"{API}/auth/me", headers=kh).json()
    assert (me["kind"], me["name"], me["role"]) == ("api_key", "olivia", "viewer")
    problem(app_client.get(f"{API}/users", headers=kh), 403)  # a viewer key
    listed = app_client.get(f"{API}/auth/api-keys", headers=owner).json()
    assert [k["name"] for k in listed] == ["prometheus"] and "token" not in listed[0]
    with db.transaction() as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.digest == auth.token_digest(key["token"]) and row.last_used_at is not None
    # a key cannot mint a stronger key
    problem(app_client.post(f"{API}/auth/api-keys", headers=kh,
                            json={"name": "x", "role": "owner"}), 403)
    problem(app_client.post(f"{API}/auth/api-keys", headers=kh, json={"name": "x"}), 403)
    # default role: the user's
    full = app_client.post(f"{API}/auth/api-keys", headers=owner, json={"name": "full"}).json()
    assert full["role"] == "owner"
    # revoke: idempotent, and the key stops working
    r = app_client.delete(f"{API}/auth/api-keys/{key['id']}", headers=owner)
    assert r.status_code == 200 and r.json()["active"] is False
    assert app_client.delete(f"{API}/auth/api-keys/{key['id']}", headers=owner).status_code \
        == 200
    problem(app_client.get(f"{API}/auth/me", headers=kh), 401)
    assert [a.action for a in audit_rows(db)].count("api_key.revoke") == 1
    # expiry
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    exp = app_client.post(f"{API}/auth/api-keys", headers=owner,
                          json={"name": "short", "expires_at": soon}).json()
    eh = {"Authorization": f"Bearer {exp['token']}"}
    assert app_client.get(f"{API}/auth/me", headers=eh).status_code == 200
    with db.transaction() as s:
        s.execute(update(ApiKey).where(ApiKey.id == exp["id"])
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    problem(app_client.get(f"{API}/auth/me", headers=eh), 401)
    past = (utcnow() - timedelta(hours=1)).isoformat()
    problem(app_client.post(f"{API}/auth/api-keys", headers=owner,
                            json={"name": "old", "expires_at": past}), 422)
    problem(app_client.post(f"{API}/auth/api-keys", headers=owner,
                            json={"name": "naive", "expires_at": "2099-01-01T00:00:00"}), 422)
    # logout is for sessions only
    fh = {"Authorization": f"Bearer {full['token']}"}
    problem(app_client.post(f"{API}/auth/logout", headers=fh), 400)


def test_api_key_role_is_capped_by_the_user(db: Database, app_client: TestClient,
                                            owner: dict[str, str]) -> None:
    uid = add_user(db, "al", "admin")
    admin = login(app_client, "al")
    problem(app_client.post(f"{API}/auth/api-keys", headers=admin,
                            json={"name": "k", "role": "owner"}), 422)
    k = app_client.post(f"{API}/auth/api-keys", headers=admin,
                        json={"name": "k", "role": "auditor"}).json()
    kh = {"Authorization": f"Bearer {k['token']}"}
    assert app_client.get(f"{API}/auth/me", headers=kh).json()["role"] == "auditor"
    app_client.patch(f"{API}/users/{uid}", headers=owner, json={"role": "viewer"})
    me = app_client.get(f"{API}/auth/me", headers=kh).json()
    assert me["role"] == "viewer" and "audit:read" not in me["permissions"]
    # a policy editor's key carries the editor's own scope
    eid = add_user(db, "eddie", "policy_editor", scope={"app": ["shop"]})
    ek = app_client.post(f"{API}/users/{eid}/api-keys", headers=owner,
                         json={"name": "ci"}).json()
    em = app_client.get(f"{API}/auth/me",
                        headers={"Authorization": f"Bearer {ek['token']}"}).json()
    assert em["role"] == "policy_editor" and em["scope"] == {"app": ["shop"]}
    problem(app_client.post(f"{API}/users/{eid}/api-keys", headers=owner,
                            json={"name": "ci2", "scope": {"app": ["any"]}}), 422)
    # an owner's scoped editor key
    sk = app_client.post(f"{API}/auth/api-keys", headers=owner,
                         json={"name": "s", "role": "policy_editor",
                               "scope": {"env": ["dev"]}}).json()
    sh = {"Authorization": f"Bearer {sk['token']}"}
    assert app_client.get(f"{API}/auth/me", headers=sh).json()["scope"] == {"env": ["dev"]}
    problem(app_client.post(f"{API}/auth/api-keys", headers=sh,
                            json={"name": "wider", "role": "policy_editor"}), 403)
    narrower = app_client.post(f"{API}/auth/api-keys", headers=sh,
                               json={"name": "n", "role": "policy_editor",
                                     "scope": {"env": ["dev"], "app": ["a"]}})
    assert narrower.status_code == 201
    # admins manage keys of non-owners only
    problem(app_client.post(f"{API}/users/1/api-keys", headers=admin, json={"name": "x"}),
            403)


# -- audit log API ---------------------------------------------------------------------------

def test_audit_is_read_only(app_client: TestClient, owner: dict[str, str]) -> None:
    entry = app_client.get(f"{API}/audit", headers=owner).json()["items"][0]
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        for path in (f"{API}/audit", f"{API}/audit/{entry['id']}"):
            r = app_client.request(method, path, headers=owner, json={"note": "tampered"})
            problem(r, 405)
    assert app_client.get(f"{API}/audit/{entry['id']}", headers=owner).json() == entry
    problem(app_client.get(f"{API}/audit/999999", headers=owner), 404)


def test_audit_filters_and_pagination(db: Database, app_client: TestClient,
                                      owner: dict[str, str]) -> None:
    for i in range(5):
        app_client.post(f"{API}/users", headers=owner,
                        json={"name": f"u{i}", "password": PW, "role": "viewer"})
    app_client.post(f"{API}/auth/login", json={"name": "u0", "password": "not the password"})
    def get(**q: str | int) -> Any:
        return app_client.get(f"{API}/audit", headers=owner, params=q)

    assert get().json()["total"] == 8
    assert get(action="user.create").json()["total"] == 6
    assert get(action="auth.*").json()["total"] == 2
    assert get(action="auth.%").json()["total"] == 0  # LIKE wildcards are literal
    assert get(actor="anonymous").json()["items"][0]["target"] == "user:u0"
    assert get(target="user:u3").json()["total"] == 1
    page1 = get(limit=3).json()
    page2 = get(limit=3, offset=3).json()
    assert page1["total"] == 8 and len(page1["items"]) == 3 and page2["offset"] == 3
    ids = [e["id"] for e in page1["items"] + page2["items"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6
    now = utcnow()
    assert get(since=(now + timedelta(minutes=1)).isoformat()).json()["total"] == 0
    assert get(until=(now + timedelta(minutes=1)).isoformat()).json()["total"] == 8
    assert get(since=(now - timedelta(hours=1)).isoformat(),
               until=(now - timedelta(minutes=30)).isoformat()).json()["total"] == 0
    body = problem(get(since="2024-01-01T00:00:00"), 422)  # a time zone is required
    assert body["errors"][0]["path"] == "query:since"
    problem(get(limit=0), 422)
    problem(get(limit=5000), 422)
    assert get(since="0001-01-01T00:00:00+14:00").status_code == 200  # no overflow 500


# -- events ----------------------------------------------------------------------------------

SYSLOG = re.compile(r"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) bulkhead - "
                    r"(\S{1,32}) (\[bulkhead@32473 (?:[a-z]+=\"(?:[^\"\\\]]|\\[\"\\\]])*\" ?)+\]) "
                    r"(\{.*\})$")


def _events(db: Database) -> None:
    with db.transaction() as s:
        emit(s, kind="provisioned", subject="policy:3", data={"version": 3, "by": "user:x"})
        emit(s, kind="agent_offline", subject="agent:7", severity="warning",
             data={"last_heartbeat": "2024-01-01T00:00:00Z"})
        emit(s, kind="tamper_detected", subject='agent:"7"]\n', severity="critical",
             data={"detail": "table replaced\nby someone", "token": "bhg_secret-ish",
                   "db_password": "pg-secret", "nested": {"apiKey": "k-secret"}})
        emit(s, kind="policy_apply_failed", subject="agent:8", severity="error",
             data={"error": "nft: syntax error"})


def test_events_list_and_filters(db: Database, app_client: TestClient,
                                 owner: dict[str, str]) -> None:
    _events(db)
    def get(**q: str | int) -> Any:
        return app_client.get(f"{API}/events", headers=owner, params=q)

    all_ = get().json()
    assert all_["total"] == 4 and all_["items"][0]["kind"] == "policy_apply_failed"
    assert get(kind="agent_*").json()["total"] == 1
    assert get(severity="critical").json()["items"][0]["kind"] == "tamper_detected"
    assert get(subject="agent:8").json()["total"] == 1
    assert get(limit=1, offset=1).json()["items"][0]["kind"] == "tamper_detected"
    problem(get(severity="loud"), 422)
    tamper = get(severity="critical").json()["items"][0]
    assert "secret" not in json.dumps(tamper["data"])


def test_events_export_jsonl_and_syslog(db: Database, app_client: TestClient,
                                        owner: dict[str, str]) -> None:
    _events(db)
    r = app_client.get(f"{API}/events/export", headers=owner)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = r.text.splitlines()
    docs = [json.loads(x) for x in lines]
    assert [d["kind"] for d in docs] == ["provisioned", "agent_offline", "tamper_detected",
                                         "policy_apply_failed"]  # oldest first
    assert "secret" not in r.text
    assert docs[2]["data"]["token"] == "<redacted>" and docs[2]["data"]["db_password"] == \
        "<redacted>" and docs[2]["data"]["nested"]["apiKey"] == "<redacted>"
    # incremental
    r2 = app_client.get(f"{API}/events/export", headers=owner,
                        params={"after_id": docs[1]["id"]})
    assert [json.loads(x)["kind"] for x in r2.text.splitlines()] == [
        "tamper_detected", "policy_apply_failed"]
    s = app_client.get(f"{API}/events/export", headers=owner,
                       params={"format": "syslog", "facility": 10})
    assert s.status_code == 200 and s.headers["content-type"].startswith("text/plain")
    assert "secret" not in s.text
    out = s.text.split("\n")
    assert out[-1] == "" and len(out) == 5  # one line per event, even with newlines inside
    pris = []
    for line in out[:-1]:
        m = SYSLOG.match(line)
        assert m, line
        pris.append(int(m.group(1)))
        json.loads(m.group(6))
    assert pris == [10 * 8 + 6, 10 * 8 + 4, 10 * 8 + 2, 10 * 8 + 3]
    assert 'subject="agent:\\"7\\"\\] "' in out[2]
    problem(app_client.get(f"{API}/events/export", headers=owner,
                           params={"format": "xml"}), 422)


# -- metrics ---------------------------------------------------------------------------------

def test_metrics(db: Database, app_client: TestClient) -> None:
    problem(app_client.get(f"{API}/metrics"), 401)
    add_user(db, "vera", "viewer")
    h = login(app_client, "vera")
    app_client.get(f"{API}/auth/me", headers=h)
    try:
        from bulkhead.server.models.agents import Agent
    except ImportError:
        Agent = None  # type: ignore[misc,assignment]
    if Agent is not None:
        with db.transaction() as s:
            for i, (state, online) in enumerate([("paired", True), ("paired", True),
                                                 ("paired", False), ("unpaired", False)]):
                s.add(Agent(hostname=f"h{i}", workload_name=f"h{i}", state=state,
                            online=online))
    r = app_client.get(f"{API}/metrics", headers=h)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    assert "bulkhead_policy_version 0.0" in text
    assert "# TYPE bulkhead_request_seconds histogram" in text
    assert re.search(r'bulkhead_request_seconds_count\{method="GET",route="(/api/v1)?/auth/me",'
                     r'status="200"\} [1-9]', text)
    assert "bulkhead_flows_ingested_total" in text
    if Agent is not None:
        assert 'bulkhead_agents{state="online"} 2.0' in text
        assert 'bulkhead_agents{state="offline"} 1.0' in text
        assert 'bulkhead_agents{state="unpaired"} 1.0' in text


def test_metrics_root_router(db: Database, app_client: TestClient) -> None:
    """`root_router` serves the same handler at `/metrics` once mounted without a prefix."""
    from bulkhead.server.api.ops import root_router

    app = app_client.app
    if not any(getattr(r, "path", None) == "/metrics" for r in app.routes):  # type: ignore[attr-defined]
        app.include_router(root_router)  # type: ignore[attr-defined]
    problem(app_client.get("/metrics"), 401)
    add_user(db, "vera", "viewer")
    r = app_client.get("/metrics", headers=login(app_client, "vera"))
    assert r.status_code == 200 and "bulkhead_policy_version" in r.text


# -- no secret in logs -----------------------------------------------------------------------

def test_nothing_secret_is_logged(db: Database, app_client: TestClient,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    add_user(db, "lee", "owner")
    r = app_client.post(f"{API}/auth/login", json={"name": "lee", "password": PW})
    token = r.json()["token"]
    h = {"Authorization": f"Bearer {token}"}
    key = app_client.post(f"{API}/auth/api-keys", headers=h, json={"name": "k"}).json()
    app_client.post(f"{API}/auth/login", json={"name": "lee", "password": "wrong password 1"})
    app_client.post(f"{API}/users", headers=h,
                    json={"name": "new", "password": "new user's password", "role": "viewer"})
    logged = "\n".join(rec.getMessage() + repr(rec.args) for rec in caplog.records)
    for secret in (PW, token, key["token"], "wrong password 1", "new user's password"):
        assert secret not in logged


# -- the `bulkhead server` commands ----------------------------------------------------------

@pytest.fixture
def cli_env(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[
        str, str]]:
    """The CLI on the test database (schema made by the fixture, so `migrate` is a no-op)."""
    monkeypatch.setattr(Database, "migrate", lambda self: None)
    yield {"BULKHEAD_DATA_DIR": str(tmp_path / "data"), "BULKHEAD_DATABASE_URL": db.url}


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    from bulkhead.cli.main import app

    return CliRunner().invoke(app, ["server", *args], env=env, input=stdin)


def test_cli_init_and_login(db: Database, app_client: TestClient,
                            cli_env: dict[str, str]) -> None:
    r = cli(cli_env, "init", "--name", "root-owner", "--port", "9000")
    assert r.exit_code == 0, r.output
    m = re.search(r"password: (\S+)", r.output)
    assert m and len(m.group(1)) >= 12
    assert "http://127.0.0.1:9000/api/v1/auth/login" in r.output
    assert re.search(r"bulkhead server run( --data-dir \S+)? --host 127.0.0.1 --port 9000",
                     r.output)
    login(app_client, "root-owner", m.group(1))
    again = cli(cli_env, "init", "--password", "another password!")
    assert again.exit_code == 1 and "owner already exists" in again.output
    assert [a.actor for a in audit_rows(db) if a.action == "user.create"] == [
        f"cli:{svc_login()}"]


def svc_login() -> str:
    from bulkhead.cli.server import operator

    return operator().name


def test_cli_init_password_from_stdin(app_client: TestClient, cli_env: dict[str, str]) -> None:
    r = cli(cli_env, "init", "--password-stdin", stdin="a password from stdin\n")
    assert r.exit_code == 0, r.output
    assert "a password from stdin" not in r.output and "password:" not in r.output
    login(app_client, "owner", "a password from stdin")
    short = cli(cli_env, "user", "add", "x", "--role", "viewer", "--password", "short")
    assert short.exit_code == 1 and "at least 12" in short.output


def test_cli_users_and_keys(db: Database, app_client: TestClient,
                            cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "init", "--password", PW).exit_code == 0
    r = cli(cli_env, "user", "add", "eva", "--role", "policy_editor", "--scope", "app=shop,crm",
            "--password-stdin", stdin=PW + "\n")
    assert r.exit_code == 0, r.output
    out = cli(cli_env, "user", "list", "--json")
    users = {u["name"]: u for u in json.loads(out.stdout)}
    assert users["eva"]["scope"] == {"app": ["crm", "shop"]} and users["owner"]["role"] == \
        "owner"
    assert "eva" in cli(cli_env, "user", "list").output
    assert cli(cli_env, "user", "set-role", "eva", "viewer").exit_code == 0
    r = cli(cli_env, "user", "set-role", "owner", "admin")
    assert r.exit_code == 1 and "last enabled owner" in r.output
    assert cli(cli_env, "user", "set-role", "eva", "root").exit_code == 2
    k = cli(cli_env, "api-key", "create", "--user", "eva", "--name", "prom",
            "--expires-days", "30")
    assert k.exit_code == 0, k.output
    token = k.stdout.strip().splitlines()[-1]
    assert token.startswith("bhk_")
    kh = {"Authorization": f"Bearer {token}"}
    assert app_client.get(f"{API}/auth/me", headers=kh).json()["role"] == "viewer"
    key_id = app_client.get(f"{API}/auth/api-keys", headers=kh).json()[0]["id"]
    assert "prom" in cli(cli_env, "api-key", "list", "--user", "eva").output
    assert cli(cli_env, "api-key", "revoke", str(key_id)).exit_code == 0
    problem(app_client.get(f"{API}/auth/me", headers=kh), 401)
    assert cli(cli_env, "user", "disable", "eva").exit_code == 0
    problem(app_client.post(f"{API}/auth/login", json={"name": "eva", "password": PW}), 401)
    assert cli(cli_env, "user", "enable", "eva").exit_code == 0
    r = cli(cli_env, "user", "set-password", "eva")
    new = re.search(r"password: (\S+)", r.output)
    assert r.exit_code == 0 and new
    login(app_client, "eva", new.group(1))
    assert cli(cli_env, "user", "disable", "nobody").exit_code == 1
    assert cli(cli_env, "api-key", "revoke", "424242").exit_code == 1
    actions = [a.action for a in audit_rows(db)]
    assert actions.count("api_key.create") == 1 and actions.count("api_key.revoke") == 1


def test_cli_database_url_password_is_hidden() -> None:
    from bulkhead.cli.server import shown_url

    shown = shown_url("postgresql+psycopg://bulkhead:s3cret@db.example/bulkhead")
    assert "s3cret" not in shown and "bulkhead" in shown


def test_cli_init_on_a_fresh_data_dir(tmp_path: Path) -> None:
    """End to end through the real migrations. Until a migration creates the users tables,
    `init` must say so clearly (and not half-initialise)."""
    from bulkhead.server.migrations import HERE

    env = {"BULKHEAD_DATA_DIR": str(tmp_path / "fresh")}
    env.pop("BULKHEAD_DATABASE_URL", None)
    r = cli({**env, "BULKHEAD_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh' / 'b.db'}"},
            "init", "--password", PW)
    has_migrations = any((HERE / "versions").glob("*.py"))
    if has_migrations:
        assert r.exit_code == 0, r.output
        assert (tmp_path / "fresh" / "b.db").exists()
    else:
        assert r.exit_code == 1 and "no migration" in r.output

