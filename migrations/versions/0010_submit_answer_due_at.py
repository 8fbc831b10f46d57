"""When the answer to a task's submission is lost if it has not been recorded by then (a
provider that cannot call back), so that an answer lost with its process is noticed early
instead of at the task's deadline.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: tasks sent before this revision keep waiting for their deadline,
    # as they would have.
    op.add_column("task", sa.Column("submit_answer_due_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.drop_column("submit_answer_due_at")
