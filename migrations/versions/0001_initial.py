"""Tasks, their event history and callback receipts.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _big_pk() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# What the downgrade deletes (refused while any is stored, unless the run may discard it:
# service.db.migrate, and guard_downgrade in migrations/env.py): what, and the SQL counting it.
DOWNGRADE_DISCARDS = {
    "tasks, with their events and callback receipts": "SELECT count(*) FROM task",
}


def upgrade() -> None:
    op.create_table(
        "task",
        sa.Column("pk", _big_pk(), primary_key=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("provider_task_id", sa.String(255), nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("request", _json(), nullable=False),
        sa.Column("images", _json(), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.Column("metadata", _json(), nullable=False),
        sa.Column("raw_status", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_fingerprint", sa.String(64), nullable=True),
        sa.Column("last_update_source", sa.String(16), nullable=False),
        sa.Column("submit_attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("id", name="uq_task_id"),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_task_owner_idempotency_key"),
        sa.UniqueConstraint(
            "owner", "provider", "provider_task_id", name="uq_task_owner_provider_task"
        ),
    )
    op.create_index("ix_task_owner_pk", "task", ["owner", "pk"])
    op.create_index("ix_task_owner_provider_pk", "task", ["owner", "provider", "pk"])
    op.create_index("ix_task_owner_status_pk", "task", ["owner", "status", "pk"])
    op.create_index("ix_task_provider_task", "task", ["provider", "provider_task_id"])

    op.create_table(
        "task_event",
        sa.Column("seq", _big_pk(), primary_key=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column(
            "task_pk",
            sa.BigInteger(),
            sa.ForeignKey("task.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("data", _json(), nullable=False),
        sa.UniqueConstraint("id", name="uq_task_event_id"),
    )
    op.create_index("ix_task_event_task_seq", "task_event", ["task_pk", "seq"])

    op.create_table(
        "callback_receipt",
        sa.Column("pk", _big_pk(), primary_key=True),
        sa.Column(
            "task_pk",
            sa.BigInteger(),
            sa.ForeignKey("task.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("body_size", sa.Integer(), nullable=False),
        sa.Column("body_truncated", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_callback_receipt_task_pk", "callback_receipt", ["task_pk", "pk"])


def downgrade() -> None:
    guard = context.config.attributes["guard_downgrade"]  # migrations/env.py
    guard(revision, down_revision, DOWNGRADE_DISCARDS, ("task", "task_event", "callback_receipt"))
    op.drop_index("ix_callback_receipt_task_pk", table_name="callback_receipt")
    op.drop_table("callback_receipt")
    op.drop_index("ix_task_event_task_seq", table_name="task_event")
    op.drop_table("task_event")
    for name in (
        "ix_task_provider_task",
        "ix_task_owner_status_pk",
        "ix_task_owner_provider_pk",
        "ix_task_owner_pk",
    ):
        op.drop_index(name, table_name="task")
    op.drop_table("task")
