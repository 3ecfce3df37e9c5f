"""Pairing keys, agents and their latest inventory.

Tamper reports and policy-apply failures are not tables of their own: they are `events`
(`tamper_detected`, `policy_apply_failed`, `agent_offline`, `agent_online`, see
`bulkhead.server.models.audit.Event`), subject `agent:<id>`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from bulkhead.server.db import Base, utcnow


class PairingKey(Base):
    """A secret that lets a new agent pair, shown once and stored as a SHA-256 digest."""

    __tablename__ = "pairing_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(12))  # "bhp_" + 6 chars, for recognition
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    max_uses: Mapped[int | None] = mapped_column(default=None)  # None: unlimited
    uses: Mapped[int] = mapped_column(default=0)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # default labels of workloads
    enforcement: Mapped[str] = mapped_column(String(20), default="visibility")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        # at most one paired agent per workload (an unpaired one may linger beside it)
        Index("uq_agents_paired_workload", "workload_name", unique=True,
              sqlite_where=text("state = 'paired'"),
              postgresql_where=text("state = 'paired'")),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253))
    workload_name: Mapped[str] = mapped_column(String(128), index=True)
    credential_digest: Mapped[str | None] = mapped_column(String(64), unique=True,
                                                          default=None)
    state: Mapped[str] = mapped_column(String(12), default="paired")  # paired | unpaired
    online: Mapped[bool] = mapped_column(default=True)  # False after missed heartbeats
    status: Mapped[str] = mapped_column(String(20), default="new")  # as the agent reports it
    os: Mapped[str] = mapped_column(String(20), default="linux")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    ips: Mapped[list[Any]] = mapped_column(default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # from the pairing key
    enforcement: Mapped[str] = mapped_column(String(20), default="visibility")  # initial
    applied_version: Mapped[str | None] = mapped_column(String(40), default=None)
    applied_enforcement: Mapped[str | None] = mapped_column(String(20), default=None)
    errors: Mapped[list[Any]] = mapped_column(default=list)  # from the last heartbeat
    pairing_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("pairing_keys.id", ondelete="SET NULL"), default=None)
    paired_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    unpaired_at: Mapped[datetime | None] = mapped_column(default=None)
    unpair_final_state: Mapped[str | None] = mapped_column(String(10), default=None)


class AgentInventory(Base):
    """The latest inventory an agent reported (interfaces, listening sockets), as JSON."""

    __tablename__ = "agent_inventory"
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"),
                                          primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
