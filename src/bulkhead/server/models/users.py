"""Users, their login sessions and their API keys.

Secrets are never stored: passwords as Argon2id hashes, session tokens and API keys as SHA-256
digests of high-entropy random tokens (`bulkhead.server.auth`). Rows are never deleted by the
API: users are disabled, API keys revoked, sessions expire (expired ones are pruned at login).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from bulkhead.server.db import Base, utcnow


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32), index=True)
    # policy editors only: rulesets they edit must be scoped inside these labels
    scope: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # consecutive failed logins, and until when logins are refused after too many
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(default=None)


class UserSession(Base):
    """A login: `bhs_` bearer token, valid until `expires_at` or logout."""

    __tablename__ = "user_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ApiKey(Base):
    """A `bhk_` bearer token of a user, with that user's role or a lower one."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    # the first characters of the token, to recognise it in a list (never enough to use it)
    hint: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(32))
    scope: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
