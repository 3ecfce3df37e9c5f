"""Database engine and transactions (SQLAlchemy 2, SQLite by default, PostgreSQL supported).

Every request runs in one transaction (`Database.transaction()`): committed when the handler
returns, rolled back on any exception, so a crash or a rejected request leaves nothing
half-written. SQLite runs in WAL mode with foreign keys on and a busy timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(),
                           list[Any]: JSON()}


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


_HOOKS = "bulkhead.after_commit"
_DEFER = "bulkhead.defer_hooks"
_COMMITTED = "bulkhead.committed_hooks"
log = logging.getLogger(__name__)


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` once the session's transaction has committed (never if it rolls back).
    Under `Database.transaction()` it runs after the session has released its connection,
    so a hook may open a session of its own without holding two connections at once."""
    session.info.setdefault(_HOOKS, []).append(fn)


def _run(hooks: list[Callable[[], None]]) -> None:
    for fn in hooks:
        try:
            fn()
        except Exception:  # the write is committed; a failed follow-up must not hide it
            log.exception("after-commit hook failed")


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    hooks = session.info.pop(_HOOKS, [])
    if session.info.get(_DEFER):
        session.info.setdefault(_COMMITTED, []).extend(hooks)
    else:
        _run(hooks)


@event.listens_for(Session, "after_rollback")
def _on_rollback(session: Session) -> None:
    session.info.pop(_HOOKS, None)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        session = self.sessions()
        session.info[_DEFER] = True
        try:
            with session.begin():
                yield session
        finally:
            session.close()
        _run(session.info.pop(_COMMITTED, []))

    def create_all(self) -> None:
        """Tables straight from the models (tests); production uses `migrate()`."""
        import bulkhead.server.models  # noqa: F401  (registers every table)

        Base.metadata.create_all(self.engine)

    def migrate(self) -> None:
        from bulkhead.server.migrations import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
