"""Event forwarding: subscriptions, client secrets, deliveries and their attempts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _big_pk() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# What the downgrade deletes (refused while any is stored, unless the run may discard it:
# service.db.migrate, and guard_downgrade in migrations/env.py): what, and the SQL counting it.
DOWNGRADE_DISCARDS = {
    "subscriptions (endpoints, and tasks' notify_url)": "SELECT count(*) FROM subscription",
    "webhook deliveries not yet made (they would never be sent)": (
        "SELECT count(*) FROM delivery WHERE status = 'pending'"
    ),
    "notify secrets (their clients' webhooks could no longer be verified)": (
        "SELECT count(*) FROM client_secret"
    ),
}


def upgrade() -> None:
    op.create_table(
        "subscription",
        sa.Column("pk", _big_pk(), primary_key=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("task_pk", sa.BigInteger(), sa.ForeignKey("task.pk", ondelete="CASCADE")),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("event_types", _json(), nullable=True),
        sa.Column("providers", _json(), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("secret", sa.String(128), nullable=True),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("id", name="uq_subscription_id"),
    )
    op.create_index("ix_subscription_owner_kind_pk", "subscription", ["owner", "kind", "pk"])
    op.create_index("ix_subscription_task_pk", "subscription", ["task_pk"])

    op.create_table(
        "client_secret",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )

    op.create_table(
        "delivery",
        sa.Column("pk", _big_pk(), primary_key=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column(
            "subscription_pk",
            sa.BigInteger(),
            sa.ForeignKey("subscription.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "event_seq",
            sa.BigInteger(),
            sa.ForeignKey("task_event.seq", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("task_pk", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("id", name="uq_delivery_id"),
    )
    op.create_index("ix_delivery_status_next_attempt", "delivery", ["status", "next_attempt_at"])
    op.create_index(
        "ix_delivery_subscription_task_seq",
        "delivery",
        ["subscription_pk", "task_pk", "event_seq"],
    )
    op.create_index("ix_delivery_subscription_pk", "delivery", ["subscription_pk", "pk"])

    op.create_table(
        "delivery_attempt",
        sa.Column("pk", _big_pk(), primary_key=True),
        sa.Column(
            "delivery_pk",
            sa.BigInteger(),
            sa.ForeignKey("delivery.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempted_at", sa.DateTime(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_delivery_attempt_delivery_pk", "delivery_attempt", ["delivery_pk", "pk"])


def downgrade() -> None:
    guard = context.config.attributes["guard_downgrade"]  # migrations/env.py
    guard(
        revision, down_revision, DOWNGRADE_DISCARDS, ("subscription", "delivery", "client_secret")
    )
    op.drop_index("ix_delivery_attempt_delivery_pk", table_name="delivery_attempt")
    op.drop_table("delivery_attempt")
    for name in (
        "ix_delivery_subscription_pk",
        "ix_delivery_subscription_task_seq",
        "ix_delivery_status_next_attempt",
    ):
        op.drop_index(name, table_name="delivery")
    op.drop_table("delivery")
    op.drop_table("client_secret")
    op.drop_index("ix_subscription_task_pk", table_name="subscription")
    op.drop_index("ix_subscription_owner_kind_pk", table_name="subscription")
    op.drop_table("subscription")
