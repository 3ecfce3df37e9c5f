"""Audit log and events. The audit log is append-only: no API edits or deletes it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from bulkhead.server.db import Base, utcnow


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # e.g. "user:alice", "agent:web-1"
    action: Mapped[str] = mapped_column(String(100), index=True)  # e.g. "workload.update"
    target: Mapped[str] = mapped_column(String(300), default="")  # e.g. "workload:web-1"
    before: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    note: Mapped[str | None] = mapped_column(Text, default=None)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_kind_at", "kind", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(60))  # provisioned, agent_offline, tamper, ...
    severity: Mapped[str] = mapped_column(String(10), default="info")  # info|warning|error
    subject: Mapped[str] = mapped_column(String(300), default="")  # e.g. "agent:12"
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
