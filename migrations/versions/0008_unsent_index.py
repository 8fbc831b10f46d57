"""A partial index of the submitted tasks whose request has not left yet: the submission sweep
(every 30 s, on every replica) finds them without reading every queued task.

A task enters the index when it is created and leaves it at its first attempt, so the index
holds only what the sweep is looking for, oldest first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NAME = "ix_task_unsent_created_at"
# As service.models.UNSENT had it at this revision (literal values: see there).
UNSENT = "origin = 'submitted' AND status = 'queued' AND submit_attempts = 0"
# True for a valid index, False for one a failed CONCURRENTLY build left, None for none.
_VALID = sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")
_LOCK = "hashtext('taskrelay migration 0008')"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(NAME, "task", ["created_at"], sqlite_where=sa.text(UNSENT))
        return
    # Built without blocking the task table's writes (CONCURRENTLY, outside a transaction):
    # the release before keeps serving while this runs. A run stopped midway can run again:
    # an index a failed build left invalid is dropped and built again. Runs started together
    # take turns (the lock in migrations/env.py); this migration's own lock predates it.
    # Offline (`alembic upgrade --sql`), nothing can be read: the script builds the index, as
    # a run on a database at the revision before needs.
    with op.get_context().autocommit_block():
        if op.get_context().as_sql:
            # Dropped first, as the online run drops an invalid one: a script stopped after
            # the build (or during it) can be run again.
            op.drop_index(NAME, table_name="task", postgresql_concurrently=True, if_exists=True)
            _create()
            return
        bind = op.get_bind()
        bind.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK})")
        try:
            valid = bind.execute(_VALID, {"name": NAME}).scalar()
            if valid:
                return
            if valid is not None:
                op.drop_index(NAME, table_name="task", postgresql_concurrently=True)
            _create()
        finally:
            bind.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK})")


def _create() -> None:
    op.create_index(
        NAME,
        "task",
        ["created_at"],
        postgresql_where=sa.text(UNSENT),
        postgresql_concurrently=True,
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(NAME, table_name="task")
        return
    with op.get_context().autocommit_block():
        op.drop_index(NAME, table_name="task", postgresql_concurrently=True, if_exists=True)
