"""Migrations: an empty database upgraded to head has exactly the tables the models declare,
on SQLite and PostgreSQL, and a server starts on a fresh data directory through them."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect

import bulkhead.server.models  # noqa: F401
from bulkhead.server.app import create_app
from bulkhead.server.db import Base, Database
from bulkhead.server.settings import Settings
from bulkhead.testing.postgres import TempPostgres


def _check_head_matches_models(db: Database) -> None:
    db.migrate()
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff
    db.migrate()  # idempotent at head


def test_sqlite_upgrade_from_empty(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        _check_head_matches_models(db)
    finally:
        db.dispose()


def test_postgresql_upgrade_from_empty(postgres: TempPostgres | None) -> None:
    import pytest

    if postgres is None:
        pytest.skip("PostgreSQL not installed")
    db = Database(postgres.create_database("migrations"))
    try:
        _check_head_matches_models(db)
    finally:
        db.dispose()


def test_server_starts_on_fresh_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/api/v1/workloads").status_code == 401
    assert (tmp_path / "data" / "bulkhead.db").exists()
