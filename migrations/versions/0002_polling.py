"""Polling: expected finish, deadline, next check, progress time, poll counters, leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TIMES = ("expected_at", "deadline_at", "next_check_at", "progress_at", "lease_expires_at")


def upgrade() -> None:
    with op.batch_alter_table("task") as batch:
        for name in _TIMES:
            batch.add_column(sa.Column(name, sa.DateTime(), nullable=True))
        batch.add_column(
            sa.Column("poll_count", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("poll_errors", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        batch.create_index("ix_task_provider_next_check_at", ["provider", "next_check_at"])
    # Tasks already in flight are picked up by the scheduler's start-up reconciliation, which
    # gives every unfinished task without a next check one, and a deadline.


def downgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.drop_index("ix_task_provider_next_check_at")
        for name in ("lease_owner", "poll_errors", "poll_count", *reversed(_TIMES)):
            batch.drop_column(name)
