"""When the answer to a task's submission is lost if it has not been recorded by then (a
provider that cannot call back), so that an answer lost with its process is noticed early
instead of at the task's deadline.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# What the downgrade deletes (refused while any is stored, unless the run may discard it:
# service.db.migrate, and guard_downgrade in migrations/env.py): what, and the SQL counting it.
# Without its due time, a task whose answer was lost waits for its deadline (an hour by
# default) instead of expiring minutes after it was sent.
DOWNGRADE_DISCARDS = {
    "due times of submissions awaiting their answer (those tasks would expire only at their "
    "deadline)": (
        "SELECT count(*) FROM task WHERE submit_answer_due_at IS NOT NULL AND status IN "
        "('queued', 'running')"
    ),
}


def upgrade() -> None:
    # Nullable, no default: tasks sent before this revision keep waiting for their deadline,
    # as they would have.
    op.add_column("task", sa.Column("submit_answer_due_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    guard = context.config.attributes["guard_downgrade"]  # migrations/env.py
    guard(revision, down_revision, DOWNGRADE_DISCARDS, ("task",))
    with op.batch_alter_table("task") as batch:
        batch.drop_column("submit_answer_due_at")
