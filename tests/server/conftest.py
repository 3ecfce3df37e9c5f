"""Server test fixtures. `db` runs each test on SQLite AND on a real PostgreSQL cluster that
the suite starts itself (skipped with the reason only when PostgreSQL is not installed; with
BULKHEAD_REQUIRE_POSTGRES=1, as CI sets, that fails instead)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bulkhead.server.app import create_app
from bulkhead.server.db import Base, Database
from bulkhead.server.settings import Settings
from bulkhead.testing.postgres import TempPostgres, unavailable

_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres | None]:
    reason = unavailable()
    if reason:
        if os.environ.get("BULKHEAD_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"BULKHEAD_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
        yield None
        return
    pg = TempPostgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path,
       postgres: TempPostgres | None) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'bulkhead.db'}")
    else:
        if postgres is None:
            pytest.skip(f"PostgreSQL: {unavailable()}")
        database = Database(postgres.create_database(f"t{os.getpid()}_{next(_counter)}"))
    database.create_all()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, flows_path=tmp_path / "flows.duckdb")


@pytest.fixture
def app_client(db: Database, settings: Settings) -> Iterator[TestClient]:
    """A TestClient on a fresh app (database per test); no user exists yet."""
    app = create_app(settings, db=db)
    with TestClient(app) as client:
        yield client


__all__ = ["Base"]


@pytest.fixture
def client_as(app_client: TestClient) -> Iterator[object]:
    """`client_as("viewer")` → the same TestClient acting as a principal of that role, with
    authentication bypassed through a dependency override (tests of one area's behaviour;
    real authentication is tested in test_users.py and the authorisation matrix)."""
    from bulkhead.server.auth import Principal, permissions_for
    from bulkhead.server.deps import get_principal

    def use(role: str, name: str = "tester",
            scope: dict[str, list[str]] | None = None) -> TestClient:
        principal = Principal("user", 1, name, role, scope, permissions_for(role))
        app_client.app.dependency_overrides[get_principal] = lambda: principal  # type: ignore[attr-defined]
        return app_client

    yield use
    app_client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
