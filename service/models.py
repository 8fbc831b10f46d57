"""Database tables (SQLModel). Alembic migrations in ``migrations/`` create exactly this schema.

- ``task``: one row per generation task, whatever provider runs it.
- ``task_event``: the append-only history of a task's state changes, one row per real
  transition, written in the same transaction as the change. It is also the event log that
  later forwarding reads (``seq`` is a global, increasing position).
- ``callback_receipt``: every callback TaskRelay accepted a token for, with its raw body
  (size-capped) and what became of it, for audit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


class TaskStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {TaskStatus.succeeded, TaskStatus.failed, TaskStatus.canceled, TaskStatus.expired}
)


class UpdateSource(StrEnum):
    """Where a task's latest change came from."""

    submit = "submit"
    callback = "callback"
    poll = "poll"
    stream = "stream"
    timeout = "timeout"
    api = "api"


class TaskOrigin(StrEnum):
    submitted = "submitted"  # TaskRelay sent the request to the provider (POST /v1/tasks)
    tracked = "tracked"  # the caller submitted it and registered it (POST /v1/tasks/track)


class EventType(StrEnum):
    submitted = "task.submitted"
    progress = "task.progress"
    succeeded = "task.succeeded"
    failed = "task.failed"
    canceled = "task.canceled"
    expired = "task.expired"


class ReceiptOutcome(StrEnum):
    applied = "applied"  # changed the task
    unchanged = "unchanged"  # a duplicate or stale update: recorded, nothing changed
    terminal = "terminal"  # the task was already final: recorded, nothing changed
    rejected = "rejected"  # the body could not be parsed or contradicted the task


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)

    # On SQLite a datetime is text. SQLAlchemy's own processors (strftime-style formatting
    # and a regular expression) around the two methods above were about 10 % of the CPU of
    # callback ingestion; these do the same conversion in one step, in C, with the text
    # byte for byte what SQLAlchemy writes ("YYYY-MM-DD HH:MM:SS.ffffff", UTC).

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_bind

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        return _sqlite_result


def _sqlite_bind(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_result(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def json_type() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(JSONB(), "postgresql")


def big_pk_type() -> sa.types.TypeEngine[int]:
    # BIGINT on PostgreSQL; plain INTEGER on SQLite, where only that is the rowid alias.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# Submitted tasks whose request has not left yet (Store.unsent_submissions): a task is in the
# partial index ix_task_unsent_created_at from its creation to its first attempt. Literal
# values, in the index and in the query alike: SQLite uses a partial index only for a query
# whose WHERE clause repeats its terms.
# What no provider task id may be: a path's dot segments, which would make a status query
# another path of the provider's API (schemas and providers/parsing check them).
DOT_SEGMENTS = frozenset({".", ".."})
# A client's provider task ids are unique per provider (store.provider_task_id_taken).
PROVIDER_TASK_UNIQUE = "uq_task_owner_provider_task"
UNSENT_INDEX = "ix_task_unsent_created_at"
UNSENT = (
    f"origin = '{TaskOrigin.submitted.value}' AND status = '{TaskStatus.queued.value}' "
    "AND submit_attempts = 0"
)


class Task(SQLModel, table=True):
    __tablename__ = "task"
    __table_args__ = (
        sa.UniqueConstraint("id", name="uq_task_id"),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_task_owner_idempotency_key"),
        sa.UniqueConstraint("owner", "provider", "provider_task_id", name=PROVIDER_TASK_UNIQUE),
        sa.Index("ix_task_provider_task", "provider", "provider_task_id"),
        sa.Index("ix_task_owner_pk", "owner", "pk"),
        sa.Index("ix_task_owner_status_pk", "owner", "status", "pk"),
        sa.Index("ix_task_owner_provider_pk", "owner", "provider", "pk"),
        # Both filters: newest first straight from the index, whatever the store's size (SQLite,
        # without statistics, would otherwise walk one of the two above at random).
        sa.Index("ix_task_owner_status_provider_pk", "owner", "status", "provider", "pk"),
        # The scheduler's queue per provider: due tasks, earliest first, straight from the index.
        sa.Index("ix_task_provider_next_check_at", "provider", "next_check_at"),
        # Start-up work among the tasks in flight, not the whole table: unfinished tasks
        # without a plan (reconcile).
        sa.Index("ix_task_status_next_check_at", "status", "next_check_at"),
        # Submissions waiting to be sent again (Store.due_submit_retries): only the rows with
        # a retry planned are in it (the next attempt clears it; a task settled during its
        # backoff keeps an inert value, out of the sweep's range, which reads queued tasks).
        sa.Index(
            "ix_task_status_submit_retry_at",
            "status",
            "submit_retry_at",
            sqlite_where=sa.text("submit_retry_at IS NOT NULL"),
            postgresql_where=sa.text("submit_retry_at IS NOT NULL"),
        ),
        # Submissions never sent, oldest first (Store.unsent_submissions, in every sweep):
        # only those rows, not every queued task.
        sa.Index(
            UNSENT_INDEX,
            "created_at",
            sqlite_where=sa.text(UNSENT),
            postgresql_where=sa.text(UNSENT),
        ),
        # Retention (Store.prune_tasks): final tasks, the longest finished first.
        sa.Index(
            "ix_task_completed_at",
            "completed_at",
            sqlite_where=sa.text("completed_at IS NOT NULL"),
            postgresql_where=sa.text("completed_at IS NOT NULL"),
        ),
    )

    # Integer key: compact joins, and a strict newest-first order for cursor pagination.
    pk: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    id: str = Field(sa_column=sa.Column(sa.String(40), nullable=False))
    owner: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    provider: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    provider_task_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(255)))
    origin: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    progress: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    request: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(json_type(), nullable=False)
    )
    images: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=sa.Column(json_type(), nullable=False)
    )
    error: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(json_type()))
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column("metadata", json_type(), nullable=False)
    )
    raw_status: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    idempotency_key: str | None = Field(default=None, sa_column=sa.Column(sa.String(255)))
    request_fingerprint: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    last_update_source: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    submit_attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    # When a submission that failed retryably is due to be sent again (service/submitter.py);
    # None when no retry is planned. Kept in the row so that the retry survives the process
    # that planned it: any replica's sweep sends it once it is overdue.
    submit_retry_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    # For a provider that cannot call back: when the last attempt's answer is lost if it has
    # not been recorded by then (the process sending it died), set by that process when it
    # sends it (Store.mark_submit_attempt, PollPolicy.answer_within); None otherwise.
    submit_answer_due_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    completed_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    # Polling (service/polling.py, service/scheduler.py): when the task should be finished,
    # when TaskRelay gives up on it, when it is next due for a look, and who holds it.
    expected_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    deadline_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    next_check_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    # A look planned later than next_check_at while that one was still ahead (Store.plan): the
    # scheduler, woken at next_check_at, moves the look here without asking the provider.
    # Kept apart because next_check_at is indexed: a progress callback that only pushes the
    # look later then leaves every indexed column as it was, and PostgreSQL updates the row in
    # place (a HOT update) instead of adding an entry to each of the task's indexes.
    planned_check_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    progress_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    poll_count: int = Field(
        default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default=sa.text("0"))
    )
    poll_errors: int = Field(
        default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default=sa.text("0"))
    )
    lease_owner: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))


@dataclass(slots=True)
class TaskRow:
    """A task row as plain attributes, named as on :class:`Task` (``meta`` is the ``metadata``
    column), for the Core SQL hot path (``service/ingest.py``), where building ORM objects
    would cost more than the SQL. The store's planning and JSON helpers accept either."""

    pk: int | None
    id: str
    owner: str
    provider: str
    provider_task_id: str | None
    origin: str
    status: str
    progress: int
    request: dict[str, Any]
    images: list[dict[str, Any]]
    error: dict[str, Any] | None
    meta: dict[str, Any]
    raw_status: str | None
    idempotency_key: str | None
    request_fingerprint: str | None
    last_update_source: str
    submit_attempts: int
    submit_retry_at: datetime | None
    submit_answer_due_at: datetime | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    expected_at: datetime | None
    deadline_at: datetime | None
    next_check_at: datetime | None
    planned_check_at: datetime | None
    progress_at: datetime | None
    poll_count: int
    poll_errors: int
    lease_owner: str | None
    lease_expires_at: datetime | None


class TaskEvent(SQLModel, table=True):
    __tablename__ = "task_event"
    __table_args__ = (
        sa.UniqueConstraint("id", name="uq_task_event_id"),
        sa.Index("ix_task_event_task_seq", "task_pk", "seq"),
    )

    seq: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    id: str = Field(sa_column=sa.Column(sa.String(40), nullable=False))
    task_pk: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("task.pk", ondelete="CASCADE"), nullable=False
        )
    )
    type: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    progress: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    source: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    # The task exactly as GET /v1/tasks/{id} showed it right after this change.
    data: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))


class CallbackReceipt(SQLModel, table=True):
    __tablename__ = "callback_receipt"
    __table_args__ = (sa.Index("ix_callback_receipt_task_pk", "task_pk", "pk"),)

    pk: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    task_pk: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("task.pk", ondelete="CASCADE"), nullable=False
        )
    )
    provider: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    received_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    outcome: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    content_type: str | None = Field(default=None, sa_column=sa.Column(sa.String(255)))
    # The bytes exactly as received (up to the audit cap), whatever their encoding.
    body: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))
    body_size: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    body_truncated: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))


def utcnow() -> datetime:
    return datetime.now(UTC)


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting for its (next) attempt
    succeeded = "succeeded"  # a 2xx came back
    dead = "dead"  # every attempt failed (or the subscriber answered 410): dead-lettered
    coalesced = "coalesced"  # a progress event superseded by a newer event of the same task


class SubscriptionKind(StrEnum):
    endpoint = "endpoint"  # POST /v1/subscriptions
    task = "task"  # a task's notify_url: that task's events only


class Subscription(SQLModel, table=True):
    __tablename__ = "subscription"
    __table_args__ = (
        sa.UniqueConstraint("id", name="uq_subscription_id"),
        sa.Index("ix_subscription_owner_kind_pk", "owner", "kind", "pk"),
        sa.Index("ix_subscription_task_pk", "task_pk"),
    )

    pk: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    id: str = Field(sa_column=sa.Column(sa.String(40), nullable=False))
    owner: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    kind: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    task_pk: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("task.pk", ondelete="CASCADE")),
    )
    url: str = Field(sa_column=sa.Column(sa.String(2048), nullable=False))
    # None: every event type / provider.
    event_types: list[str] | None = Field(default=None, sa_column=sa.Column(json_type()))
    providers: list[str] | None = Field(default=None, sa_column=sa.Column(json_type()))
    description: str | None = Field(default=None, sa_column=sa.Column(sa.String(500)))
    # Standard Webhooks secrets ("whsec_..."); task subscriptions sign with the client's.
    secret: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    previous_secret: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    previous_secret_expires_at: datetime | None = Field(
        default=None, sa_column=sa.Column(UTCDateTime())
    )
    enabled: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))
    disabled_reason: str | None = Field(default=None, sa_column=sa.Column(sa.String(255)))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class ClientSecret(SQLModel, table=True):
    """Each API client's default signing secret, for its tasks' notify_url deliveries."""

    __tablename__ = "client_secret"

    owner: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    secret: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    previous_secret: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    previous_secret_expires_at: datetime | None = Field(
        default=None, sa_column=sa.Column(UTCDateTime())
    )
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class Delivery(SQLModel, table=True):
    """One event owed to one subscription; attempts are logged in ``delivery_attempt``."""

    __tablename__ = "delivery"
    __table_args__ = (
        sa.UniqueConstraint("id", name="uq_delivery_id"),
        # The dispatcher's queue: pending deliveries, earliest first (ties in pk order: the
        # put-aside sweeps it in pages).
        sa.Index("ix_delivery_status_next_attempt", "status", "next_attempt_at", "pk"),
        # Order per task and subscriber: is an earlier event of this task still owed?
        sa.Index("ix_delivery_subscription_task_seq", "subscription_pk", "task_pk", "event_seq"),
        sa.Index("ix_delivery_subscription_pk", "subscription_pk", "pk"),
        # Deleting an event deletes its deliveries (retention): the foreign key's lookup,
        # which would read the whole table for each event without it.
        sa.Index("ix_delivery_event_seq", "event_seq"),
    )

    pk: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    id: str = Field(sa_column=sa.Column(sa.String(40), nullable=False))
    subscription_pk: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("subscription.pk", ondelete="CASCADE"), nullable=False
        )
    )
    event_seq: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("task_event.seq", ondelete="CASCADE"), nullable=False
        )
    )
    task_pk: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    event_type: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    next_attempt_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    lease_owner: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))
    last_status_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    delivered_at: datetime | None = Field(default=None, sa_column=sa.Column(UTCDateTime()))


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "delivery_attempt"
    __table_args__ = (sa.Index("ix_delivery_attempt_delivery_pk", "delivery_pk", "pk"),)

    pk: int | None = Field(default=None, sa_column=sa.Column(big_pk_type(), primary_key=True))
    delivery_pk: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("delivery.pk", ondelete="CASCADE"), nullable=False
        )
    )
    attempted_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    status_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    duration_ms: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    response_body: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
