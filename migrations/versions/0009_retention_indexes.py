"""Indexes for retention (``TASKRELAY_RETENTION``), which deletes final tasks long finished:

- ``ix_task_completed_at``: final tasks by the time they finished (partial), so the sweep
  reads only what it deletes, the longest finished first.
- ``ix_delivery_event_seq``: deleting a task's events deletes their deliveries through the
  foreign key, whose lookup reads the whole delivery table for each event without it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-21
"""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


class _Index(NamedTuple):
    name: str
    table: str
    column: str
    where: str | None  # a partial index's predicate


INDEXES = (
    _Index("ix_task_completed_at", "task", "completed_at", "completed_at IS NOT NULL"),
    _Index("ix_delivery_event_seq", "delivery", "event_seq", None),
)
# True for a valid index, False for one a failed CONCURRENTLY build left, None for none.
_VALID = sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")
_LOCK = "hashtext('taskrelay migration 0009')"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for index in INDEXES:
            where = {} if index.where is None else {"sqlite_where": sa.text(index.where)}
            op.create_index(index.name, index.table, [index.column], **where)
        return
    # Built without blocking writes (CONCURRENTLY, outside a transaction): the release before
    # keeps serving while this runs. A run stopped midway can run again: each index already
    # built is kept, and one a failed build left invalid is dropped and built again. Runs
    # started together take turns (the lock in migrations/env.py); this migration's own lock
    # predates it.
    # Offline (`alembic upgrade --sql`), nothing can be read: the script builds both, as a run
    # on a database at the revision before needs.
    with op.get_context().autocommit_block():
        if op.get_context().as_sql:
            # Each dropped first, as the online run drops an invalid one: a script stopped
            # after one index was built (or during a build) can be run again.
            for index in INDEXES:
                op.drop_index(
                    index.name,
                    table_name=index.table,
                    postgresql_concurrently=True,
                    if_exists=True,
                )
                _create(index)
            return
        bind = op.get_bind()
        bind.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK})")
        try:
            for index in INDEXES:
                valid = bind.execute(_VALID, {"name": index.name}).scalar()
                if valid:
                    continue
                if valid is not None:
                    op.drop_index(index.name, table_name=index.table, postgresql_concurrently=True)
                _create(index)
        finally:
            bind.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK})")


def _create(index: _Index) -> None:
    where = {} if index.where is None else {"postgresql_where": sa.text(index.where)}
    op.create_index(index.name, index.table, [index.column], postgresql_concurrently=True, **where)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for index in INDEXES:
            op.drop_index(index.name, table_name=index.table)
        return
    with op.get_context().autocommit_block():
        for index in INDEXES:
            op.drop_index(
                index.name, table_name=index.table, postgresql_concurrently=True, if_exists=True
            )
