"""Alembic environment: uses the engine passed in `config.attributes` (see __init__.py)."""

from __future__ import annotations

from alembic import context

import bulkhead.server.models  # noqa: F401  (registers every table)
from bulkhead.server.db import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
