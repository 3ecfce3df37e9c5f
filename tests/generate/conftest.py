"""The server fixtures (database on SQLite and PostgreSQL, app, `client_as`) for the API tests."""

from tests.server.conftest import app_client, client_as, db, postgres, settings

__all__ = ["app_client", "client_as", "db", "postgres", "settings"]
