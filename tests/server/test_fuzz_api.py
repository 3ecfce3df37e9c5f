"""Property-based fuzzing of the whole OpenAPI surface (schemathesis + Hypothesis).

Every operation in the app's OpenAPI schema gets generated requests, both schema-conforming
("positive") and deliberately invalid ("negative"), sent to the ASGI app with an owner's API
key, on SQLite and PostgreSQL (PostgreSQL rejects NUL bytes and out-of-range integers that
SQLite stores happily, so it finds more). Properties:

- no response is a 5xx;
- every 4xx is `application/problem+json` with `status` equal to the HTTP status, and every
  422 names the offending fields (`errors[].path`);
- a 2xx body conforms to the documented response schema.

Bounded for CI: up to `EXAMPLES` requests per operation while the `BUDGET_S` of wall time per
database lasts (`BULKHEAD_FUZZ_BUDGET_S` overrides it, for a longer run), then 2 per remaining
operation, so every operation is always exercised. No Hypothesis example database: the search
is random each run, so over many CI runs it covers more ground; a failure message names the
operation and the error, and the request is easy to replay by hand.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bulkhead.server import auth
from bulkhead.server.app import create_app
from bulkhead.server.auth import permissions_for
from bulkhead.server.db import Database
from bulkhead.server.models.users import ApiKey, User
from bulkhead.server.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

EXAMPLES = 10  # per operation and database, while the budget lasts
BUDGET_S = float(os.environ.get("BULKHEAD_FUZZ_BUDGET_S", "20"))  # per database
PROBLEM = "application/problem+json"
# the fuzzing credential lives far from the ids the fuzzer guesses, so that it does not
# revoke its own key or disable its own user by chance
FUZZ_USER_ID = 7_340_033
FUZZ_KEY_ID = 7_340_037


@pytest.fixture
def fuzz_app(db: Database, settings: Settings,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str]]:
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024,
                                                        parallelism=1))
    token = auth.new_token("api_key")
    with db.transaction() as s:
        s.add(User(id=FUZZ_USER_ID, name="fuzzer", role="owner",
                   password_hash=auth.hash_password("fuzzing password"), disabled=False,
                   failed_logins=0))
        s.flush()
        s.add(ApiKey(id=FUZZ_KEY_ID, user_id=FUZZ_USER_ID, name="fuzz",
                     digest=auth.token_digest(token), hint=token[:8], role="owner"))
    if db.engine.dialect.name == "postgresql":  # keep sequences clear of the fixed ids
        with db.engine.begin() as conn:
            conn.exec_driver_sql("SELECT setval('users_id_seq', 1, false)")
            conn.exec_driver_sql("SELECT setval('api_keys_id_seq', 1, false)")
    app = create_app(settings, db=db)
    with TestClient(app) as client:  # one client (and app lifespan) for the whole run
        yield client, token


def _problem_errors(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return ["body is not a JSON object"]
    out = []
    for key in ("type", "title", "status", "detail"):
        if key not in body:
            out.append(f"problem lacks {key!r}")
    if body.get("status") == 422:
        errs = body.get("errors")
        if not errs or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                               for e in errs):
            out.append("422 without errors[].path")
    return out


def _check(case: Any, response: Any) -> list[str]:
    status = response.status_code
    where = f"{case.method} {case.formatted_path}"
    if status >= 500:
        return [f"{where}: {status} {response.content[:300]!r}"]
    ctype = response.headers.get("content-type", "")
    if 400 <= status < 500:
        if not ctype.startswith(PROBLEM):
            return [f"{where}: {status} with content-type {ctype!r}"]
        try:
            body = json.loads(response.content)
        except ValueError:
            return [f"{where}: {status} problem body is not JSON"]
        problems = _problem_errors(body)
        if body.get("status") != status:
            problems.append(f"problem status {body.get('status')} != {status}")
        return [f"{where}: {p}" for p in problems]
    if 200 <= status < 300:
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except BaseExceptionGroup as group:  # schemathesis's check failures
            return [f"{where}: {status} does not match the documented schema: "
                    f"{' / '.join(str(e).splitlines()[0] for e in group.exceptions)[:300]}"]
    return []


def send(client: TestClient, case: Any, headers: dict[str, str]) -> Any:
    """Send a generated case through our own client (schemathesis serialises it)."""
    kw = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    return client.request(kw["method"], kw["url"], params=kw.get("params"),
                          headers=kw.get("headers"), cookies=kw.get("cookies") or None,
                          json=kw.get("json"), content=kw.get("data"))


_SCHEMAS: dict[str, Any] = {}  # OpenAPI document -> loaded schema, shared by both databases


def operations_of(app: FastAPI) -> list[tuple[str, Any, Any]]:
    """(label, operation, strategy) per operation; strategies are built once per process."""
    doc = json.dumps(app.openapi(), sort_keys=True)
    if doc not in _SCHEMAS:
        schema = schemathesis.openapi.from_dict(json.loads(doc))
        ops = []
        for result in schema.get_all_operations():
            op = result.ok()
            ops.append((f"{op.method.upper()} {op.path}", op,
                        st.one_of(op.as_strategy(GenerationMode.POSITIVE),
                                  op.as_strategy(GenerationMode.NEGATIVE))))
        _SCHEMAS[doc] = ops
    ops_: list[tuple[str, Any, Any]] = _SCHEMAS[doc]
    return ops_


def fuzz_one(client: TestClient, headers: dict[str, str], op: Any, strategy: Any,
             examples: int, failures: list[str]) -> int:
    sent = 0

    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        try:
            response = send(client, case, headers)
        except Exception as exc:  # the test client re-raises what would have been a 500
            found = [f"{case.method} {op.path}: server error {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:200]}"]
        else:
            found = _check(case, response)
        failures.extend(f for f in found if f not in failures)

    run()
    return sent


def test_fuzz_openapi(fuzz_app: tuple[TestClient, str]) -> None:
    client, token = fuzz_app
    app: FastAPI = client.app  # type: ignore[assignment]
    operations = operations_of(app)
    assert len(operations) > 10
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    sent: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET_S
    for label, op, strategy in operations:
        # past the budget, every remaining operation still gets a couple of requests
        examples = EXAMPLES if time.monotonic() < deadline else 2
        sent[label] = fuzz_one(client, headers, op, strategy, examples, failures)
    me = client.get("/api/v1/auth/me", headers=headers)
    assert me.status_code == 200, "the fuzzing credential did not survive the run"
    starved = [k for k, n in sent.items() if n == 0]
    assert not starved, f"operations never exercised: {starved}"
    assert not failures, (f"{len(failures)} failure(s) in {sum(sent.values())} requests to "
                          f"{len(sent)} operations:\n" + "\n".join(failures[:40]))


def test_fuzz_credential_is_an_owner_key(fuzz_app: tuple[TestClient, str]) -> None:
    """The fuzzer really acts as an owner (else most operations would only see 403)."""
    client, token = fuzz_app
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert set(me.json()["permissions"]) == set(permissions_for("owner"))
