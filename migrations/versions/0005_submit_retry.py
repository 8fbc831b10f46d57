"""Planned submit retries kept in the task row, so that they survive their process.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PLANNED = "submit_retry_at IS NOT NULL"


# What the downgrade deletes (refused while any is stored, unless the run may discard it:
# service.db.migrate, and guard_downgrade in migrations/env.py): what, and the SQL counting it.
DOWNGRADE_DISCARDS = {
    "submission retries planned (those tasks would not be sent again)": (
        "SELECT count(*) FROM task WHERE submit_retry_at IS NOT NULL AND status = 'queued'"
    ),
}


def upgrade() -> None:
    op.add_column("task", sa.Column("submit_retry_at", sa.DateTime(), nullable=True))
    # Only the rows with a retry planned: the sweep's range, without touching the others.
    op.create_index(
        "ix_task_status_submit_retry_at",
        "task",
        ["status", "submit_retry_at"],
        sqlite_where=sa.text(_PLANNED),
        postgresql_where=sa.text(_PLANNED),
    )


def downgrade() -> None:
    guard = context.config.attributes["guard_downgrade"]  # migrations/env.py
    guard(revision, down_revision, DOWNGRADE_DISCARDS, ("task",))
    op.drop_index("ix_task_status_submit_retry_at", table_name="task")
    with op.batch_alter_table("task") as batch:
        batch.drop_column("submit_retry_at")
