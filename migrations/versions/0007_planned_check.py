"""A later look at a task kept apart from its indexed next check (``task.planned_check_at``),
and free room in the task table's pages on PostgreSQL: a progress callback that only pushes the
next look later then changes no indexed column, and PostgreSQL can update the row in place (a
HOT update, on the same page) instead of adding an entry to each of the task's indexes.

The fill factor applies to pages written from now on; a table already large gets it page by
page as rows move, or at once with ``VACUUM FULL task`` (which locks the table: a maintenance
window). Both steps are quick: a nullable column without a default is a change to the catalog.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Of each page, the share inserts fill; the rest is for rows updated in place.
FILLFACTOR = 85


def upgrade() -> None:
    op.add_column("task", sa.Column("planned_check_at", sa.DateTime(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE task SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE task RESET (fillfactor)")
    # Every look planned later is due at its next check already: the scheduler, woken then,
    # asks the provider and plans again.
    with op.batch_alter_table("task") as batch:
        batch.drop_column("planned_check_at")
