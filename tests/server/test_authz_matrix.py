"""The authorisation matrix: every route of the app by every kind of caller.

Nothing here is a hand-kept list of endpoints. The routes are read from the app at test time
(so routes added later are covered), and what each needs is read from its dependency tree:
the `deps.require(<permission>)` checks it declares, and the authenticators it uses:
`deps.get_principal` (any credential), `api.auth.any_user` (any user, whatever the role) and
`api.agents.agent_caller` (an agent's own credential, i.e. the `agent` permission). A route that
takes no credential must be one of the few public ones below; a route that takes one but checks
no permission fails the test; so does one using an authenticator this file does not know.

Callers are real: one user per role, each with a password session and an API key (used on
alternate routes, so both kinds of credential meet every role's checks); anonymous; and, when
the agents module is present, two real paired agents (each trying the other's data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from bulkhead.server import auth
from bulkhead.server.api.auth import any_user
from bulkhead.server.auth import AGENT_PERMISSIONS, ROLES, Principal, permissions_for
from bulkhead.server.db import Database
from bulkhead.server.deps import get_principal
from bulkhead.server.services import users as svc

# Routes that take no credential: liveness, password login, and the agent's first contact
# (it presents a pairing key in its body, not a bearer credential).
PUBLIC = [re.compile(p) for p in (
    r"^GET /healthz$",
    r"^POST /api/v1/auth/login$",
    r"^POST /api/v1/agents?(/[a-z-]+)*/(activate|activation|pair|enrol|enroll)$",
)]
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # "{rule_id:path}" is "{rule_id}" in OpenAPI
SAFE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PW = "matrix password 123"


@dataclass(frozen=True)
class RouteNeeds:
    method: str
    path: str
    dependant: Any  # fastapi.dependencies.models.Dependant, as effective for this path
    has_body: bool
    authenticated: bool  # get_principal in the dependency tree
    user_only: bool  # api.auth.any_user in the tree
    permissions: frozenset[str]  # every deps.require(...) in the tree

    @property
    def key(self) -> str:
        return self.method + " " + _CONVERTOR.sub(r"{\1}", self.path)

    @property
    def public(self) -> bool:
        return any(p.match(self.key) for p in PUBLIC)


def _agent_authenticators() -> set[Callable[..., Any]]:
    try:
        from bulkhead.server.api.agents import agent_caller
    except ImportError:
        return set()
    return {agent_caller}


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def required_permission(call: Callable[..., Any]) -> str | None:
    """The permission a `deps.require(permission)` check closes over, else None."""
    code = getattr(call, "__code__", None)
    closure = getattr(call, "__closure__", None)
    if code is None or not closure or not call.__name__.startswith("require_"):
        return None
    cells = dict(zip(code.co_freevars, closure, strict=True))
    value = cells["permission"].cell_contents if "permission" in cells else None
    return value if isinstance(value, str) else None


def _api_routes(app: FastAPI) -> Iterator[tuple[str, set[str], Any, bool]]:
    """(path, methods, dependant, has_body) of every API route, as mounted (prefixes and
    router-level dependencies included). FastAPI >= 0.16x includes routers lazily; its
    `iter_route_contexts` is what the OpenAPI generator walks."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: included routes are flattened into app.routes
        for route in app.routes:
            if isinstance(route, APIRoute):
                yield (route.path, set(route.methods or ()), route.dependant,
                       route.body_field is not None)
        return
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            yield (str(ctx.path), set(ctx.methods or ()), ctx.dependant,
                   ctx.body_field is not None)


def route_table(app: FastAPI) -> list[RouteNeeds]:
    out = []
    agent_auth = _agent_authenticators()
    for path, methods, dependant, has_body in _api_routes(app):
        calls = list(_calls(dependant))
        perms = {p for p in map(required_permission, calls) if p}
        as_agent = any(c in agent_auth for c in calls)
        if as_agent:
            perms |= AGENT_PERMISSIONS
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            out.append(RouteNeeds(method, path, dependant, has_body,
                                  get_principal in calls or as_agent, any_user in calls,
                                  frozenset(perms)))
    return out


# -- static checks (no database) -------------------------------------------------------------

@pytest.fixture(scope="module")
def static_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    from bulkhead.server.app import create_app
    from bulkhead.server.settings import Settings

    tmp = tmp_path_factory.mktemp("static")
    db = Database(f"sqlite:///{tmp / 'b.db'}")
    db.create_all()
    return create_app(Settings(data_dir=tmp, flows_path=tmp / "flows.duckdb"), db=db)


def test_every_route_declares_who_may_call_it(static_app: FastAPI) -> None:
    table = route_table(static_app)
    assert len(table) > 10
    problems = []
    for r in table:
        if r.public:
            if r.authenticated:
                problems.append(f"{r.key}: listed as public but asks for a credential")
        elif not r.authenticated:
            problems.append(f"{r.key}: takes no credential and is not a known public route "
                            "(depend on deps.require(...), or add it to PUBLIC with a reason)")
        elif not r.permissions and not r.user_only:
            problems.append(f"{r.key}: authenticates but checks no permission "
                            "(depend on deps.require(<permission>))")
        unknown = r.permissions - _all_permissions()
        if unknown:
            problems.append(f"{r.key}: requires unknown permission(s) {sorted(unknown)}")
    assert not problems, "\n".join(problems)


def test_openapi_lists_only_examined_routes(static_app: FastAPI) -> None:
    examined = {r.key for r in route_table(static_app)}
    documented = {f"{m.upper()} {p}" for p, ops in static_app.openapi()["paths"].items()
                  for m in ops if m.upper() in SAFE_METHODS}
    assert documented <= examined


def _all_permissions() -> frozenset[str]:
    out: set[str] = set(AGENT_PERMISSIONS)
    for role in ROLES:
        out |= permissions_for(role)
    return frozenset(out)


# -- the matrix ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    label: str
    headers: dict[str, str]
    kind: str  # user | api_key | agent
    permissions: frozenset[str]
    agent_id: int | None = None
    role: str | None = None


def _users(db: Database, client: TestClient) -> list[Caller]:
    operator = Principal("cli", 0, "matrix", "owner", None, permissions_for("owner"))
    out = []
    with db.transaction() as s:
        ids = {role: svc.create_user(s, actor=operator, name=f"m-{role.replace('_', '-')}",
                                     password=PW, role=role).id for role in ROLES}
        tokens = {role: svc.create_api_key(s, actor=operator, user_id=ids[role],
                                           name="matrix")[1] for role in ROLES}
    for role in ROLES:
        r = client.post("/api/v1/auth/login",
                        json={"name": f"m-{role.replace('_', '-')}", "password": PW})
        assert r.status_code == 200, r.text
        perms = permissions_for(role)
        out.append(Caller(f"{role}/session", {"Authorization": f"Bearer {r.json()['token']}"},
                          "user", perms, role=role))
        out.append(Caller(f"{role}/api-key", {"Authorization": f"Bearer {tokens[role]}"},
                          "api_key", perms, role=role))
    return out


def _agents(db: Database) -> list[Caller]:
    """Two real paired agents, when the agents service exists."""
    try:
        from bulkhead.server.services import agents as agent_svc
    except ImportError:
        return []
    operator = Principal("cli", 0, "matrix", "owner", None, permissions_for("owner"))
    out = []
    with db.transaction() as s:
        _, pairing = agent_svc.create_pairing_key(s, actor=operator, name="matrix")
    for i, host in enumerate(("matrix-a", "matrix-b")):
        with db.transaction() as s:
            agent, credential = agent_svc.activate(s, pairing_key=pairing, hostname=host,
                                                   os="linux", ips=[f"192.0.2.{10 + i}"])
            out.append(Caller(f"agent/{host}", {"Authorization": f"Bearer {credential}"},
                              "agent", AGENT_PERMISSIONS, agent.id))
    return out


def _path_for(need: RouteNeeds, agent_id: int | None) -> str:
    path = need.path
    for param in need.dependant.path_params:
        if agent_id is not None and "agent" in param.name:
            value = str(agent_id)
        elif param.field_info.annotation in (int, "int"):
            value = "987654"
        else:
            value = "no-such-thing"
        path = path.replace("{" + param.name + "}", value).replace(
            "{" + param.name + ":path}", value)
    return path


def _call(client: TestClient, need: RouteNeeds, caller: Caller | None,
          agent_id: int | None = None) -> Any:
    headers = dict(caller.headers) if caller else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if need.has_body or need.method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = {}
    return client.request(need.method, _path_for(need, agent_id), **kwargs)


def _side_effect_last(table: list[RouteNeeds]) -> list[RouteNeeds]:
    # logging out ends the caller's session: run it after everything else
    return sorted(table, key=lambda r: "logout" in r.path)


def test_authorisation_matrix(db: Database, app_client: TestClient,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024,
                                                        parallelism=1))
    app: FastAPI = app_client.app  # type: ignore[assignment]
    table = [r for r in route_table(app) if not r.public]
    callers = _users(db, app_client) + _agents(db)
    agents = [c for c in callers if c.kind == "agent"]
    failures: list[str] = []
    checked = 0
    cross_agent = 0

    def expect(ok: bool, need: RouteNeeds, who: str, r: Any, want: str) -> None:
        nonlocal checked
        checked += 1
        if not ok:
            failures.append(f"{need.key} as {who}: {r.status_code} (want {want}) "
                            f"{r.text[:160]}")

    for i, need in enumerate(_side_effect_last(table)):
        r = _call(app_client, need, None)
        expect(r.status_code == 401, need, "anonymous", r, "401")
        kind = ("user", "api_key")[i % 2]  # sessions on even routes, API keys on odd ones
        for caller in (c for c in callers if c.kind in (kind, "agent")):
            if need.user_only and caller.kind == "agent":
                allowed = False
            else:
                allowed = need.permissions <= caller.permissions
            r = _call(app_client, need, caller, caller.agent_id)
            if not allowed:
                # 403 for a credential lacking the permission; agent-channel routes do not
                # know user credentials at all (401)
                expect(r.status_code == 403 or (r.status_code == 401 and "agent" in
                                                need.permissions), need, caller.label, r,
                       "403")
                continue
            lacks = r.status_code == 403 and "lacks permission" in r.text
            expect(r.status_code not in (401,) and not lacks and r.status_code < 500,
                   need, caller.label, r, "allowed: not 401/403-lacks/5xx")
            if caller.kind == "agent" and any("agent" in p.name
                                              for p in need.dependant.path_params):
                other = next(a for a in agents if a.agent_id != caller.agent_id)
                cross_agent += 1
                r = _call(app_client, need, caller, other.agent_id)
                expect(not 200 <= r.status_code < 300 and r.status_code < 500, need,
                       f"{caller.label} on {other.label}'s data", r, "not 2xx")
    assert not failures, f"{len(failures)} of {checked} checks failed:\n" + "\n".join(failures)
    assert checked >= len(table) * (1 + len(ROLES) + len(agents))
    if agents:
        assert cross_agent > 0, "no agent-channel route takes an agent id: nothing cross-checked"
    # nothing above leaked a credential into the audit log
    from bulkhead.server.models.audit import AuditEntry

    with db.transaction() as s:
        logged = json.dumps([[a.actor, a.target, a.before, a.after, a.note]
                             for a in s.scalars(select(AuditEntry))])
    for c in callers:
        assert c.headers["Authorization"].removeprefix("Bearer ") not in logged
    assert PW not in logged
