"""The dispatcher's queue index ends with the primary key: the put-aside's sweep reads due
deliveries in pages, in (due time, pk) order, and on PostgreSQL only an index in that order
reads a page without sorting every due delivery first. (A SQLite index ends with the rowid,
the primary key, already; the column is named there too, so both have the same index.)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NAME = "ix_delivery_status_next_attempt"
BUILDING = f"{NAME}_build"
# The valid index's columns in order, None if there is none (or only an invalid one).
_COLUMNS = sa.text(
    "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i "
    "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "WHERE i.indexrelid = to_regclass(:name) AND i.indisvalid"
)
_LOCK = "hashtext('taskrelay migration 0006')"


def upgrade() -> None:
    _replace(["status", "next_attempt_at", "pk"])


def downgrade() -> None:
    _replace(["status", "next_attempt_at"])


def _replace(columns: list[str]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(NAME, table_name="delivery")
        op.create_index(NAME, "delivery", columns)
        return
    # Built without blocking the delivery table's writes (CONCURRENTLY, outside a
    # transaction): the release before keeps serving while this runs. So that a run stopped
    # midway can run again, and two runs at once (replicas started with --migrate) cannot
    # undo each other: one at a time (an advisory lock), each step skipped once done, an
    # invalid index a failed build left dropped first.
    #
    # Offline (`alembic upgrade --sql`), nothing can be read: the script does every step,
    # as a run on a database at the revision before needs.
    with op.get_context().autocommit_block():
        if op.get_context().as_sql:
            _build(columns)
            _swap()
            return
        bind = op.get_bind()
        bind.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK})")
        try:

            def columns_of(name: str) -> list[str] | None:
                return bind.execute(_COLUMNS, {"name": name}).scalar()  # type: ignore[no-any-return]

            if columns_of(NAME) == columns:
                return
            if columns_of(BUILDING) != columns:
                _build(columns)
            _swap()
        finally:
            bind.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK})")


def _build(columns: list[str]) -> None:
    op.drop_index(BUILDING, postgresql_concurrently=True, if_exists=True)
    op.create_index(BUILDING, "delivery", columns, postgresql_concurrently=True)


def _swap() -> None:
    op.drop_index(NAME, postgresql_concurrently=True, if_exists=True)
    op.execute(f"ALTER INDEX {BUILDING} RENAME TO {NAME}")
