"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 08:55:17.103797
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import bulkhead.server.db

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=60), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False),
        sa.Column("subject", sa.String(length=300), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_at"), ["at"], unique=False)
        batch_op.create_index("ix_events_kind_at", ["kind", "at"], unique=False)

    op.create_table(
        "label_keys",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_label_keys")),
    )
    op.create_table(
        "pairing_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_digest", sa.String(length=64), nullable=False),
        sa.Column("key_prefix", sa.String(length=12), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("expires_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("enforcement", sa.String(length=20), nullable=False),
        sa.Column("revoked_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairing_keys")),
        sa.UniqueConstraint("key_digest", name=op.f("uq_pairing_keys_key_digest")),
    )
    op.create_table(
        "policy_draft",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_draft")),
    )
    op.create_table(
        "policy_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_objects")),
        sa.UniqueConstraint("kind", "name", name="uq_policy_objects_kind_name"),
    )
    with op.batch_alter_table("policy_objects", schema=None) as batch_op:
        batch_op.create_index("ix_policy_objects_kind_position", ["kind", "position"], unique=False)

    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("objects", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("draft_revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "password_changed_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_users_role"), ["role"], unique=False)

    op.create_table(
        "workloads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("ips", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("managed", sa.Boolean(), nullable=False),
        sa.Column("enforcement", sa.String(length=16), nullable=False),
        sa.Column("os", sa.String(length=16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workloads")),
        sa.UniqueConstraint("name", name=op.f("uq_workloads_name")),
    )
    with op.batch_alter_table("workloads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workloads_enforcement"), ["enforcement"], unique=False)
        batch_op.create_index(batch_op.f("ix_workloads_managed"), ["managed"], unique=False)

    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("workload_name", sa.String(length=128), nullable=False),
        sa.Column("credential_digest", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("os", sa.String(length=20), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.Column("ips", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("enforcement", sa.String(length=20), nullable=False),
        sa.Column("applied_version", sa.String(length=40), nullable=True),
        sa.Column("applied_enforcement", sa.String(length=20), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("pairing_key_id", sa.Integer(), nullable=True),
        sa.Column("paired_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "last_heartbeat_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("unpaired_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("unpair_final_state", sa.String(length=10), nullable=True),
        sa.ForeignKeyConstraint(
            ["pairing_key_id"],
            ["pairing_keys.id"],
            name=op.f("fk_agents_pairing_key_id_pairing_keys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("credential_digest", name=op.f("uq_agents_credential_digest")),
    )
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_agents_last_heartbeat_at"), ["last_heartbeat_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_agents_workload_name"), ["workload_name"], unique=False
        )
        batch_op.create_index(
            "uq_agents_paired_workload",
            ["workload_name"],
            unique=True,
            sqlite_where=sa.text("state = 'paired'"),
            postgresql_where=sa.text("state = 'paired'"),
        )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("hint", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=True),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("digest", name=op.f("uq_api_keys_digest")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_user_id"), ["user_id"], unique=False)

    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=63), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key"], ["label_keys.name"], name=op.f("fk_labels_key_label_keys"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint("key", "value", name="uq_labels_key_value"),
    )
    op.create_table(
        "user_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sessions")),
        sa.UniqueConstraint("digest", name=op.f("uq_user_sessions_digest")),
    )
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_user_sessions_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_user_sessions_user_id"), ["user_id"], unique=False)

    op.create_table(
        "workload_ips",
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.id"],
            name=op.f("fk_workload_ips_workload_id_workloads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("ip", name=op.f("pk_workload_ips")),
    )
    with op.batch_alter_table("workload_ips", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_workload_ips_workload_id"), ["workload_id"], unique=False
        )

    op.create_table(
        "agent_inventory",
        sa.Column("agent_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", bulkhead.server.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_agent_inventory_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agent_inventory")),
    )
    op.create_table(
        "workload_labels",
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["label_id"],
            ["labels.id"],
            name=op.f("fk_workload_labels_label_id_labels"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.id"],
            name=op.f("fk_workload_labels_workload_id_workloads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workload_id", "label_id", name=op.f("pk_workload_labels")),
    )
    with op.batch_alter_table("workload_labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workload_labels_label_id"), ["label_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workload_labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workload_labels_label_id"))

    op.drop_table("workload_labels")
    op.drop_table("agent_inventory")
    with op.batch_alter_table("workload_ips", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workload_ips_workload_id"))

    op.drop_table("workload_ips")
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_user_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_user_sessions_expires_at"))

    op.drop_table("user_sessions")
    op.drop_table("labels")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id"))

    op.drop_table("api_keys")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_agents_paired_workload",
            sqlite_where=sa.text("state = 'paired'"),
            postgresql_where=sa.text("state = 'paired'"),
        )
        batch_op.drop_index(batch_op.f("ix_agents_workload_name"))
        batch_op.drop_index(batch_op.f("ix_agents_last_heartbeat_at"))

    op.drop_table("agents")
    with op.batch_alter_table("workloads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workloads_managed"))
        batch_op.drop_index(batch_op.f("ix_workloads_enforcement"))

    op.drop_table("workloads")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_role"))

    op.drop_table("users")
    op.drop_table("policy_versions")
    with op.batch_alter_table("policy_objects", schema=None) as batch_op:
        batch_op.drop_index("ix_policy_objects_kind_position")

    op.drop_table("policy_objects")
    op.drop_table("policy_draft")
    op.drop_table("pairing_keys")
    op.drop_table("label_keys")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_kind_at")
        batch_op.drop_index(batch_op.f("ix_events_at"))

    op.drop_table("events")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))

    op.drop_table("audit_log")
