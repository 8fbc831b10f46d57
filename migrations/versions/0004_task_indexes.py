"""Task indexes for a large store: both list filters at once, start-up work by status.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # GET /v1/tasks?status=...&provider=...: the first page newest first from the index.
    op.create_index(
        "ix_task_owner_status_provider_pk", "task", ["owner", "status", "provider", "pk"]
    )
    # Unfinished tasks without a plan (Store.reconcile) and queued tasks never sent
    # (Store.unsent_submissions), found among the tasks in flight instead of the whole table.
    op.create_index("ix_task_status_next_check_at", "task", ["status", "next_check_at"])


def downgrade() -> None:
    op.drop_index("ix_task_status_next_check_at", table_name="task")
    op.drop_index("ix_task_owner_status_provider_pk", table_name="task")
