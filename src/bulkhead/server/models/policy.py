"""Tables of the policy and the inventory (see docs/design/control-plane-policy.md).

Inventory (live, never versioned): label keys, labels, workloads with their addresses and
labels. Policy objects (label groups, IP lists, services, user groups, rulesets, settings,
policy tests) live in the draft, one row per object, its body in the policy-file form.
`provision` copies the draft's objects into an immutable `PolicyVersion`.

Every mutable row carries a `revision` that grows on each change (optimistic concurrency:
`ETag`/`If-Match`). Order matters in a policy file (`load(dump(p)) == p` compares tuples), so
label keys and draft objects keep a `position`, and workloads keep their creation order (id).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from bulkhead.server.db import Base, utcnow


class LabelKey(Base):
    __tablename__ = "label_keys"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("key", "value", name="uq_labels_key_value"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(63), ForeignKey("label_keys.name",
                                                             ondelete="RESTRICT"))
    value: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkloadRow(Base):
    __tablename__ = "workloads"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    hostname: Mapped[str | None] = mapped_column(String(255), default=None)
    ips: Mapped[list[Any]] = mapped_column(default=list)  # canonical addresses, as written
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # key -> value
    managed: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    enforcement: Mapped[str] = mapped_column(String(16), default="visibility", index=True)
    os: Mapped[str] = mapped_column(String(16), default="linux")
    description: Mapped[str | None] = mapped_column(Text, default=None)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="")


class WorkloadIP(Base):
    """One address of one workload: the unique index makes "an address belongs to at most one
    workload" a database invariant, and finds the owner of an address without a scan."""

    __tablename__ = "workload_ips"
    ip: Mapped[str] = mapped_column(String(64), primary_key=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id", ondelete="CASCADE"),
                                             index=True)


class WorkloadLabel(Base):
    """Which labels a workload carries (mirrors `WorkloadRow.labels`): label filters and
    "is this label in use" are indexed queries, and a used label cannot be deleted."""

    __tablename__ = "workload_labels"
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id", ondelete="CASCADE"),
                                             primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="RESTRICT"),
                                          primary_key=True, index=True)


class PolicyDraft(Base):
    """The one draft (id 1). Its revision grows with every draft change; every draft mutation
    and every provision first bumps it, which serialises them (row lock / SQLite writer lock)."""

    __tablename__ = "policy_draft"
    id: Mapped[int] = mapped_column(primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="")


class DraftObject(Base):
    """One policy object of the draft, its body in the policy-file form (canonical dump of the
    object, plus `description` where the file format accepts one)."""

    __tablename__ = "policy_objects"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_policy_objects_kind_name"),
                      Index("ix_policy_objects_kind_position", "kind", "position"))
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # label_groups, ip_lists, ..., settings, tests
    name: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)
    body: Mapped[Any] = mapped_column(JSON)  # a mapping; a list for `tests`
    revision: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="")


class PolicyVersion(Base):
    """An immutable provisioned version: the draft's policy objects at provision time (a
    policy-file document without `label_keys` and `workloads`, which are live inventory)."""

    __tablename__ = "policy_versions"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    author: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")
    objects: Mapped[dict[str, Any]] = mapped_column()
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    draft_revision: Mapped[int] = mapped_column(Integer, default=0)
