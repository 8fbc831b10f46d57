"""The task store: every read and write of tasks, their history and callback receipts.

Each public method is one transaction. A task change and the history event it causes are
written together, so a committed change always has its event and a rolled-back one never does.
Database errors are translated here: connection and lock failures become
:class:`StoreUnavailable` (the caller answers 503, never a 2xx for something not recorded).

Methods are synchronous; the HTTP layer runs them in worker threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import random
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from service.db import (
    WRITE_OPTION,
    listed,
    one_of,
    prebuilt,
    sync_log,
    without_fsync,
    writes_worked,
)
from service.errors import (
    BadRequest,
    Conflict,
    NotFound,
    ProviderError,
    StoreUnavailable,
    TaskRelayError,
    Unprocessable,
    UpstreamProtocolError,
    ValidationFailed,
)
from service.lifecycle import (
    RAW_STATUS_CHARS,
    Change,
    TaskState,
    TaskUpdate,
    behind,
    decide,
    expire,
)
from service.models import (
    PROVIDER_TASK_UNIQUE,
    UNSENT,
    UNSENT_INDEX,
    CallbackReceipt,
    Delivery,
    DeliveryStatus,
    EventType,
    ReceiptOutcome,
    Subscription,
    SubscriptionKind,
    Task,
    TaskEvent,
    TaskOrigin,
    TaskRow,
    TaskStatus,
    UpdateSource,
    utcnow,
)
from service.polling import PollPolicy, TaskTiming, next_check, next_check_after_error
from service.schemas import task_json

if TYPE_CHECKING:
    from service.ingest import UpdateRequest

log = logging.getLogger(__name__)
R = TypeVar("R")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# The most callback receipts one task keeps. Callbacks are not rate limited (a provider's
# retries must land), so whoever holds a task's callback URL could add receipts without end,
# up to 64 KiB each; no provider sends more than a few per task. Beyond it a callback is
# answered and applied as ever, and its receipt not kept (counted, and logged once per task).
MAX_RECEIPTS_PER_TASK = 1000
# Tasks whose receipt count this process remembers, so that a batch of callbacks need not
# count them again (a count costs a query per batch, about 5 % of a callback's CPU).
RECEIPT_COUNTS_KEPT = 16_384  # about 1.5 MB
# The most stored callback body bytes one page of GET /v1/tasks/{id}/callbacks carries.
MAX_RECEIPTS_PAGE_BYTES = 1024 * 1024
# A task's callbacks, oldest first: most tasks have a handful, a 100-step progress run 100.
DEFAULT_RECEIPTS_PAGE = 100
# An expired task's error code when its submission's answer was lost (expire_unanswered).
UNANSWERED_CODE = "submission_unanswered"
DEFAULT_POLICY = PollPolicy(typical_duration=60.0, deadline=3600.0)
UNFINISHED = (TaskStatus.queued.value, TaskStatus.running.value)
MAX_ESTIMATED_SECONDS = 365 * 86_400.0  # the longest duration hint a task's plan takes in
PROVIDER_TASK_ID_CHARS = 255
MAX_ROW_ID = 2**63 - 1  # the largest primary key either database can hold
_ISSUED_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def could_be_issued(identifier: str) -> bool:
    """Whether ``identifier`` has the shape of an id this service issues (:func:`new_id`).
    Anything else (a NUL, a quote, a megabyte) names nothing: 404 without asking the database,
    which would otherwise refuse some such values with an error of its own (PostgreSQL: NUL)."""
    return _ISSUED_ID.fullmatch(identifier) is not None


def _reason(exc: Exception) -> str:
    original = getattr(exc, "orig", None)
    return type(original).__name__ if original is not None else type(exc).__name__


def new_id(prefix: str) -> str:
    """An opaque, URL-safe, unguessable identifier such as ``tsk_3q2-9aZ...``."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def fingerprint(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encode_cursor(pk: int, direction: str = "before") -> str:
    """A page's ``next_cursor``: the rows ``before`` (newest first) or ``after`` (oldest first)
    the key ``pk``."""
    text = json.dumps({direction: pk})
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# encode_cursor of the largest key is 42 characters. A longer cursor is not one of ours, and
# is refused before decoding: deeply nested JSON would make json.loads raise RecursionError.
MAX_CURSOR_CHARS = 64


# callback_receipt.body_size is a 32-bit INTEGER column.
MAX_BODY_SIZE = 2**31 - 1


def provider_task_id_taken(exc: IntegrityError) -> bool:
    """Whether ``exc`` is another of the client's tasks holding the provider task id (its
    unique constraint), rather than some other constraint refusing the write."""
    diagnostics = getattr(exc.orig, "diag", None)
    if diagnostics is not None:  # PostgreSQL names the constraint
        return bool(diagnostics.constraint_name == PROVIDER_TASK_UNIQUE)
    return "task.provider_task_id" in str(exc.orig)  # SQLite names its columns


def paged(
    rows: list[R], limit: int, key: Callable[[R], int | None], direction: str = "before"
) -> tuple[list[R], str | None]:
    """A page of ``rows`` (read ``limit + 1`` of them) and the cursor of the next page, None
    after the last; ``key`` gives a row's primary key."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = key(rows[-1])
    assert last is not None
    return rows, encode_cursor(last, direction)


def decode_cursor(cursor: str, direction: str = "before") -> int:
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        key = value[direction]  # a cursor of a list in the other order is not one of this one's
        # type(), not isinstance(): JSON true and false are bools, and bool is an int.
        if type(key) is not int or not 1 <= key <= MAX_ROW_ID:
            raise ValueError
        return key
    except (
        ValueError,
        KeyError,
        TypeError,
        RecursionError,
        binascii.Error,
        UnicodeEncodeError,
    ) as exc:
        raise ValidationFailed(
            "The cursor is not valid: pass the next_cursor value of a previous page unchanged.",
            details=[{"field": "cursor", "message": "not a cursor issued by this API"}],
        ) from exc


@dataclass(frozen=True)
class CreateResult:
    task: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class ApplyResult:
    task: dict[str, Any]
    outcome: ReceiptOutcome
    event: dict[str, Any] | None
    # A status answer recorded as a failed query because it could not be taken (it names
    # another provider task, or cannot be stored): what the query's caller is to report.
    error: ProviderError | None = None


@dataclass(frozen=True)
class ReceiptDraft:
    """A callback body as received, before the store knows what it will do to the task."""

    provider: str
    body: bytes
    content_type: str | None
    error: str | None = None
    # The full size when ``body`` is only what was read of a larger body.
    size: int | None = None


def _only_its_submission(task: Task | TaskRow) -> bool:
    """Whether nothing but TaskRelay's own submission has moved ``task`` yet: still queued,
    or running on its stream's progress alone (GrsAI's lines name no task)."""
    if task.status == TaskStatus.queued.value:
        return True
    return (
        task.status == TaskStatus.running.value
        and task.provider_task_id is None
        and task.last_update_source == UpdateSource.stream.value
    )


def unsent_past_deadline(provider: str, *, again: bool) -> dict[str, str]:
    """The error of a task whose deadline passed before it could be sent (``again``: sent
    again, after earlier attempts): it was not, so nothing was billed."""
    sent = "sent again" if again else "sent"
    return {
        "code": "submit_deadline_passed",
        "message": f"The task's deadline (TASKRELAY_{provider.upper()}_DEADLINE after it "
        f"was created) passed before it could be {sent} to {provider}, so it was not "
        f"{sent} (and not billed for it); submit a new task.",
    }


def _never_sent(task: Task | TaskRow) -> bool:
    """Whether ``task`` is a submission no attempt of which went out (none made, or the one
    made taken back before it was sent) and nothing has moved."""
    return (
        task.origin == TaskOrigin.submitted.value
        and task.status == TaskStatus.queued.value
        and task.submit_attempts == 0
        and task.provider_task_id is None
    )


def _as_stored(session: Session, task: Task, *names: str) -> None:
    """Read the JSON attributes ``names`` of ``task`` (flushed) back as the database keeps
    them, so that the answer that wrote them shows what every later read will. On PostgreSQL
    ``jsonb`` orders an object's keys its own way and keeps a number's value, not its
    spelling; SQLite keeps the text as written."""
    if session.get_bind().dialect.name == "postgresql":
        session.refresh(task, list(names))


def _later(first: datetime | None, second: datetime | None) -> datetime | None:
    """The later of two times either of which may be missing."""
    if first is None or second is None:
        return first or second
    return max(first, second)


def _awaiting_its_answer(task: Task | TaskRow) -> bool:
    """Whether ``task`` was sent and no answer to its last attempt was recorded: nothing but
    its submission has moved it, with no provider task id (with one, the answer came and the
    task waits at its provider) and no retry planned (the last answer was a refusal)."""
    return (
        _only_its_submission(task)
        and task.submit_attempts > 0  # 0: never sent, or the attempt taken back (unmark)
        and task.provider_task_id is None
        and task.submit_retry_at is None
    )


@dataclass(frozen=True)
class Claim:
    """A task leased to one scheduler worker for one look."""

    task_id: str
    provider: str
    provider_task_id: str | None
    deadline_at: datetime


# claim_due: a look planned later is moved there in set-based statements, this many rows per
# transaction at most (SQLite: tens of microseconds each, with the write turn held).
MOVES_PER_TRANSACTION = 500
_TASK = Task.__table__  # type: ignore[attr-defined]


def _unsent_query(dialect: str) -> sa.Select[Any]:
    """Store.unsent_submissions' query. Its index holds just these rows, in this order;
    SQLite is told to read it (INDEXED BY): without statistics, its planner took the
    equality on ``status`` in ix_task_status_next_check_at instead and sorted every queued
    task."""
    source = f"task INDEXED BY {UNSENT_INDEX}" if dialect == "sqlite" else "task"
    created_at = sa.literal_column("created_at", _TASK.c.created_at.type)
    return (
        sa.select(sa.literal_column("id", sa.String()))
        .select_from(sa.text(source))
        .where(sa.text(UNSENT), created_at < sa.bindparam("before"))
        .order_by(created_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )


_unsent_tasks = prebuilt(_unsent_query)


# Who holds provider tasks (provider_task_holders): tasks of any client naming them, read
# through ix_task_provider_task. The pairs asked about are a subset of the rows' providers
# times their ids, filtered in memory.
def _holders_query(dialect: str) -> sa.Select[Any]:
    return sa.select(_TASK.c.provider, _TASK.c.provider_task_id, _TASK.c.owner).where(
        one_of(dialect, _TASK.c.provider, "providers"),
        one_of(dialect, _TASK.c.provider_task_id, "provider_task_ids"),
    )


_HOLDERS = prebuilt(_holders_query)
PG_HOLDERS = _holders_query("postgresql")
# PostgreSQL: the locks a transaction giving tasks client-supplied provider task ids holds on
# those ids until it ends, taken before the holders are read (a statement of their own, so the
# read's snapshot is taken after any wait). Two clients' transactions claiming the same id at
# once, on any replicas, take turns, and the second reads the first's task. Taken in the order
# of the locks' keys, so two batches claiming the same ids cannot deadlock. Advisory locks of
# two keys, the first CLAIM_LOCK_SPACE: a key space apart from the migration lock's one-key
# lock; two ids hashing alike only take turns.
CLAIM_LOCK_SPACE = 0x5452_4331
_CLAIMED = (
    sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String())))
    .table_valued("key")
    .render_derived()
)
_IN_LOCK_ORDER = (
    sa.select(sa.func.hashtext(_CLAIMED.c.key).label("lock"))
    .order_by(sa.func.hashtext(_CLAIMED.c.key))
    .subquery()
)
CLAIM_LOCKS = sa.select(
    sa.func.pg_advisory_xact_lock(
        sa.literal_column(str(CLAIM_LOCK_SPACE), sa.Integer()), _IN_LOCK_ORDER.c.lock
    )
)


def claim_keys(keys: Iterable[tuple[str, str]]) -> list[str]:
    """The values of :data:`CLAIM_LOCKS`'s ``keys``: one text per (provider, provider task id)."""
    return [f"{provider}:{provider_task_id}" for provider, provider_task_id in keys]


def provider_task_holders(
    connection: sa.Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], set[str]]:
    """The API clients whose tasks hold each of these (provider, provider task id) pairs, for
    a write transaction about to give them to tasks from a client-supplied source (tracking,
    PATCH, a callback naming one): TaskRelay asks providers with its own keys, whoever asks,
    so a provider task another client holds would hand that client's results to this one. On
    PostgreSQL the claims' locks (:data:`CLAIM_LOCKS`) are taken first; SQLite's write
    transactions run one at a time (``BEGIN IMMEDIATE``)."""
    if not keys:
        return {}
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(CLAIM_LOCKS, {"keys": claim_keys(keys)})
    values = {
        "providers": listed(dialect, {provider for provider, _ in keys}),
        "provider_task_ids": listed(dialect, {task_id for _, task_id in keys}),
    }
    return holders_of(connection.execute(_HOLDERS(connection), values), keys)


def holders_of(
    rows: Iterable[Sequence[Any]], keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], set[str]]:
    """The holders query's rows (provider, provider task id, owner) as the owners of each of
    ``keys`` (the query reads every pair of their providers and ids): every key, with no
    owner when no task holds it, so that a key never read is an error, not a free id."""
    holders: dict[tuple[str, str], set[str]] = {key: set() for key in keys}
    for provider, provider_task_id, owner in rows:
        if (provider, provider_task_id) in keys:
            holders[(provider, provider_task_id)].add(owner)
    return holders


def held_elsewhere(
    connection: sa.Connection, provider: str, provider_task_id: str, owner: str
) -> bool:
    """Whether another API client's task holds this provider task
    (:func:`provider_task_holders`, for one)."""
    key = (provider, provider_task_id)
    return bool(provider_task_holders(connection, {key})[key] - {owner})


_NO_CUT_OFF = datetime.max.replace(tzinfo=UTC)
_DUE_TASKS = (
    sa.select(
        _TASK.c.pk,
        _TASK.c.id,
        _TASK.c.provider_task_id,
        _TASK.c.deadline_at,
        _TASK.c.planned_check_at,
    )
    .where(
        _TASK.c.provider == sa.bindparam("provider"),
        _TASK.c.next_check_at <= sa.bindparam("now"),
        sa.or_(_TASK.c.lease_expires_at.is_(None), _TASK.c.lease_expires_at <= sa.bindparam("now")),
    )
    .order_by(_TASK.c.next_check_at)
    .limit(sa.bindparam("fetch", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)
_MOVE_TO_PLAN = prebuilt(
    lambda dialect: (
        _TASK.update()
        .where(one_of(dialect, _TASK.c.pk, "pks"))
        .values(next_check_at=_TASK.c.planned_check_at, planned_check_at=None)
    )
)
# Retention (prune_tasks): final tasks, the longest finished first; on PostgreSQL, rows
# another replica is deleting at that moment are left to it. A final task with a look still
# planned is being followed (expired as unanswered, then its provider's task id came:
# Store._followed_after_expiry) and is kept until its deadline is as old as the cut-off, so
# the provider's final word still finds it; a look left planned on a final task by any other
# path cannot keep it longer than that.
_PRUNABLE = prebuilt(
    lambda dialect: (
        sa.select(_TASK.c.pk, _TASK.c.id)
        .where(
            _TASK.c.completed_at.is_not(None),  # ix_task_completed_at's predicate
            _TASK.c.completed_at < sa.bindparam("before"),
            sa.or_(
                _TASK.c.next_check_at.is_(None),
                sa.func.coalesce(_TASK.c.deadline_at, _TASK.c.completed_at)
                < sa.bindparam("before"),
            ),
        )
        .order_by(_TASK.c.completed_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=dialect == "postgresql")
    )
)
# The foreign keys cascade: events, receipts, notify_url subscriptions, deliveries, attempts.
_PRUNE = prebuilt(lambda dialect: _TASK.delete().where(one_of(dialect, _TASK.c.pk, "pks")))
_EXISTING_IDS = prebuilt(
    lambda dialect: sa.select(_TASK.c.id).where(one_of(dialect, _TASK.c.id, "ids"))
)
_EVENT = TaskEvent.__table__  # type: ignore[attr-defined]
_DELIVERY = Delivery.__table__  # type: ignore[attr-defined]
_SUBSCRIPTION = Subscription.__table__  # type: ignore[attr-defined]
# PostgreSQL: the deliveries the cascade will delete, locked first in key order, the order
# the dispatcher and a subscription's delete lock them in (the cascade's own order is the
# events', which could deadlock with them).
# Before those, the tasks' notify_url subscriptions, which the cascade deletes too: a 410's
# record locks a subscription, then its deliveries, and so must everyone else (in the other
# order, a record and a sweep deadlocked).
_LOCK_PRUNED_SUBSCRIPTIONS = prebuilt(
    lambda dialect: (
        sa.select(_SUBSCRIPTION.c.pk)
        .where(one_of(dialect, _SUBSCRIPTION.c.task_pk, "pks"))
        .order_by(_SUBSCRIPTION.c.pk)
        .with_for_update()
    )
)
_LOCK_PRUNED_DELIVERIES = prebuilt(
    lambda dialect: (
        sa.select(_DELIVERY.c.pk)
        .where(
            _DELIVERY.c.event_seq.in_(
                sa.select(_EVENT.c.seq).where(one_of(dialect, _EVENT.c.task_pk, "pks"))
            )
        )
        .order_by(_DELIVERY.c.pk)
        .with_for_update()
    )
)
# The deliveries still pending that a prune deletes with its tasks' events: webhooks that will
# never be made (counted, so that an operator sees them go).
_PENDING_PRUNED_DELIVERIES = prebuilt(
    lambda dialect: (
        sa.select(sa.func.count())
        .select_from(_DELIVERY)
        .where(
            _DELIVERY.c.status == DeliveryStatus.pending.value,
            _DELIVERY.c.event_seq.in_(
                sa.select(_EVENT.c.seq).where(one_of(dialect, _EVENT.c.task_pk, "pks"))
            ),
        )
    )
)
PRUNE_BATCH = 100


class Pruned(NamedTuple):
    """What one :meth:`Store.prune` deleted: the tasks' ids, and how many of their webhook
    deliveries were still pending (never to be made)."""

    task_ids: list[str]
    undelivered: int


_LEASE = prebuilt(
    lambda dialect: (
        _TASK.update()
        .where(one_of(dialect, _TASK.c.pk, "pks"))
        .values(
            lease_owner=sa.bindparam("worker"),
            lease_expires_at=sa.bindparam("until"),
            planned_check_at=None,
        )
    )
)


@dataclass(frozen=True)
class TaskFilter:
    status: tuple[str, ...] = ()
    provider: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def task_state(task: Task | TaskRow) -> TaskState:
    return TaskState(
        status=TaskStatus(task.status),
        progress=task.progress,
        images=tuple(task.images),
        error=task.error,
        provider_task_id=task.provider_task_id,
        raw_status=task.raw_status,
    )


def event_row(task: Task | TaskRow, event_type: EventType, source: str) -> dict[str, Any]:
    """The history event of ``task``'s latest change: its type, and the task as it is now."""
    assert task.pk is not None
    return {
        "id": new_id("evt"),
        "task_pk": task.pk,
        "type": event_type.value,
        "status": task.status,
        "progress": task.progress,
        "source": source,
        "created_at": task.updated_at,
        "data": task_json(task),
    }


def transition(
    task: Task | TaskRow,
    change: Change | None,
    source: UpdateSource,
    update: TaskUpdate | None,
    now: datetime,
) -> tuple[ReceiptOutcome, bool]:
    """Write ``change`` (and the update's duration hint) into ``task``'s fields. Returns what
    became of the update, and whether any field changed (the task must then be replanned and
    written)."""
    touched = False
    if (
        update is not None
        and update.estimated_seconds is not None
        and not behind(TaskStatus(task.status), update)  # a late update's hint is as old
    ):
        # A hint of more than a year is no estimate (an epoch time sent as a duration, say),
        # and would overflow the date: it counts as a year, which the deadline bounds anyway.
        seconds = min(update.estimated_seconds, MAX_ESTIMATED_SECONDS)
        expected = task.created_at + timedelta(seconds=seconds)
        if expected != task.expected_at:
            task.expected_at = expected
            touched = True
    if change is None:
        terminal = TaskStatus(task.status).terminal
        return (ReceiptOutcome.terminal if terminal else ReceiptOutcome.unchanged), touched
    state = change.state
    task.status = state.status.value
    task.progress = state.progress
    task.images = list(state.images)
    task.error = state.error
    task.provider_task_id = state.provider_task_id
    task.raw_status = state.raw_status[:RAW_STATUS_CHARS] if state.raw_status else None
    task.updated_at = now
    task.last_update_source = source.value
    if "progress" in change.changed_fields:
        task.progress_at = now
    if change.became_terminal:
        task.completed_at = now
    return ReceiptOutcome.applied, True


WRITTEN = "taskrelay_written"


class Written:
    """What a write transaction did that others hear of once it commits (an ORM session keeps
    its own in ``session.info[WRITTEN]``)."""

    __slots__ = ("deliveries", "events", "must_sync")

    def __init__(self) -> None:
        self.events: set[str] = set()  # ids of the tasks that got events
        self.deliveries = False  # deliveries are owed: wake the dispatcher
        # Something a commit without fsync must not lose after all (a new signing secret).
        self.must_sync = False


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Database errors as the API reports them: a value the database cannot hold is the
    request's fault (retrying would fail the same way); anything else is "unavailable"."""
    try:
        yield
    except IntegrityError:
        raise
    except DataError as exc:
        # Lengths are checked before writing; this is the last guard.
        raise BadRequest(
            "A value in this request cannot be stored (too long or malformed).",
            code="value_not_storable",
        ) from exc
    except (DBAPIError, sa.exc.TimeoutError) as exc:
        reason = _reason(exc)
        raise StoreUnavailable(
            _CANCELLED_MESSAGE if reason == "QueryCanceled" else _UNAVAILABLE_MESSAGE,
            details={"reason": reason},
        ) from exc


_UNAVAILABLE_MESSAGE = (
    "The database is unavailable or refused the write; nothing was recorded. Retry shortly."
)
# PostgreSQL's 57014: the statement ran past TASKRELAY_DB_STATEMENT_TIMEOUT (waiting for a
# row another session keeps locked, most likely), or an operator cancelled it.
_CANCELLED_MESSAGE = (
    "The database did not finish in time (TASKRELAY_DB_STATEMENT_TIMEOUT: a row another "
    "session keeps locked, or an overloaded server) or cancelled the statement; nothing was "
    "recorded. Retry shortly."
)


# How many receipts one task keeps (record_rejected_callback).
_RECEIPTS_OF_TASK = (
    sa.select(sa.func.count())
    .select_from(CallbackReceipt)
    .where(col(CallbackReceipt.task_pk) == sa.bindparam("task_pk"))
)


class Store:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = utcnow,
        audit_bytes: int = 64 * 1024,
        policies: Mapping[str, PollPolicy] | None = None,
        rng: random.Random | None = None,
        delivery_first_wait: timedelta = timedelta(0),
        max_receipts: int = MAX_RECEIPTS_PER_TASK,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.max_receipts = max_receipts
        # Receipts not kept, their task holding max_receipts already (metrics).
        self.receipts_dropped = 0
        # What this process knows of each task's receipt count, by task id, newest last
        # (within_receipt_cap). Other processes may add receipts meanwhile, so a task may
        # keep up to max_receipts per process: still bounded.
        self._receipt_counts: OrderedDict[str, int] = OrderedDict()
        self._dropped_lock = threading.Lock()
        # TASKRELAY_DELIVERY_SCHEDULE's first entry: the deliveries an event owes are first
        # due this long after it (service.outbox.fan_out_many).
        self.delivery_first_wait = delivery_first_wait
        self.audit_bytes = audit_bytes
        self.policies = dict(policies or {})
        self.rng = rng or random.Random()
        # Called after every commit that appended task events, with the ids of the tasks that
        # got them (live streams), and after every commit that owes subscribers deliveries (the
        # dispatcher: woken only when there is something to send, since an empty pass still
        # costs a query).
        self.listeners: list[Callable[[frozenset[str]], None]] = []
        # SQLite has one writer at a time, and a connection that finds the write lock taken
        # polls for it with growing sleeps (busy_timeout): under load, threads slept for more
        # time than any transaction held the lock. Write transactions of this process (the only
        # one a SQLite file supports) take turns on this lock instead, and wake the moment it
        # is free. PostgreSQL locks rows, not the database: no turn there.
        self._write_turn = threading.RLock() if engine.dialect.name == "sqlite" else None
        self.delivery_listeners: list[Callable[[], None]] = []

    # --- polling plans ----------------------------------------------------------------------

    def policy(self, provider: str) -> PollPolicy:
        return self.policies.get(provider, DEFAULT_POLICY)

    def deadline_for(self, provider: str, created_at: datetime) -> datetime:
        """When a task of ``provider`` created at ``created_at`` expires (its row's
        ``deadline_at``, set by :meth:`plan`)."""
        return created_at + timedelta(seconds=self.policy(provider).deadline)

    def plan(self, task: Task | TaskRow, now: datetime) -> None:
        """Set when the scheduler should next look at ``task`` (None once it is final).

        A plan later than a look still ahead leaves that look where it is and is kept in
        ``planned_check_at``: the scheduler, woken at the earlier look, moves it to the plan
        without asking the provider (:meth:`claim_due`). Progress callbacks push the look
        later one after another, and this way they leave every indexed column of the row as
        it was (one early wake instead of a change to the queue's indexes per callback)."""
        policy = self.policy(task.provider)
        if task.deadline_at is None:
            task.deadline_at = self.deadline_for(task.provider, task.created_at)
        timing = self._timing(task)
        if self._followed_after_expiry(task, now):
            timing = replace(timing, status=TaskStatus.running)
        planned = next_check(timing, now, policy, self.rng)
        ahead = task.next_check_at
        if planned is not None and ahead is not None and now < ahead <= planned:
            task.planned_check_at = planned if planned > ahead else None
            return
        if planned is not None and ahead is not None and now < ahead and task.poll_errors:
            # The look ahead is a failed query's backoff, or the wait its provider asked for
            # (Retry-After): news from a callback does not make the provider ready sooner.
            task.planned_check_at = None
            return
        task.next_check_at = planned
        task.planned_check_at = None
        if planned is None:
            task.lease_owner = None
            task.lease_expires_at = None

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Session]:
        """One transaction; commits on leaving a write transaction without an error. After a
        commit that appended task events, the listeners are told (from this thread)."""
        turn = self._write_turn if write and self._write_turn is not None else nullcontext()
        with _translated_errors(), turn, Session(self.engine, expire_on_commit=False) as session:
            if write:
                session.connection(execution_options={WRITE_OPTION: True})
                session.info[WRITTEN] = Written()
            elif self.engine.dialect.name == "postgresql":
                # A read of several statements (a delivery, then its attempts) sees the store
                # at one moment, as a read transaction does on SQLite: under READ COMMITTED a
                # commit in between (a retention sweep) showed half of it. A read-only
                # transaction never fails for REPEATABLE READ.
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session
            if write:
                session.commit()
                writes_worked(self.engine)
                self._tell(session.info[WRITTEN])

    @contextmanager
    def core_transaction(self, *, fsync: bool = True) -> Iterator[tuple[sa.Connection, Written]]:
        """A write transaction in Core SQL, for the hot paths (callback batches, delivery
        claims and records): a bare connection, without the ORM session, whose bookkeeping
        cost about 90 us of CPU per transaction. Commits on leaving without an error, then
        tells the listeners what :class:`Written` says; errors are translated as in
        :meth:`transaction`. ``fsync=False``: a commit SQLite need not sync to disk
        (:func:`service.db.without_fsync`, for what at-least-once delivery can afford to lose
        to a power cut)."""
        turn = self._write_turn if self._write_turn is not None else nullcontext()
        written = Written()
        with _translated_errors(), turn, self.engine.connect() as connection:
            connection.execution_options(**{WRITE_OPTION: True})
            with nullcontext() if fsync else without_fsync(connection), connection.begin():
                yield connection, written
            writes_worked(self.engine)
            if written.must_sync and not fsync:
                sync_log(self.engine)
            self._tell(written)

    def _tell(self, written: Written) -> None:
        """After a commit: the task ids that got events to the listeners, and a wake to the
        dispatcher if deliveries are owed. A listener that fails is logged: what committed
        stays committed, and its caller is told it did (a batch retried one by one would
        record its updates twice)."""
        calls: list[Callable[[], object]] = []
        if written.events:
            task_ids = frozenset(written.events)
            calls.extend(partial(listener, task_ids) for listener in self.listeners)
        if written.deliveries:
            calls.extend(self.delivery_listeners)
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("a listener failed after a commit")

    def ping(self) -> None:
        with self.transaction(write=False) as session:
            session.execute(sa.text("SELECT 1"))

    # --- tasks ------------------------------------------------------------------------------

    def create_task(
        self,
        *,
        owner: str,
        provider: str,
        origin: TaskOrigin,
        request: dict[str, Any],
        metadata: dict[str, Any],
        provider_task_id: str | None = None,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
        notify_url: str | None = None,
    ) -> CreateResult:
        """Insert a queued task and its ``task.submitted`` event, or return the task an
        earlier request with the same idempotency key created."""
        try:
            with self.transaction(write=True) as session:
                found = self._created_before(
                    session, owner, provider, provider_task_id, idempotency_key, request_fingerprint
                )
                if found is not None:
                    return found
                now = self.clock()
                task = Task(
                    id=new_id("tsk"),
                    owner=owner,
                    provider=provider,
                    provider_task_id=provider_task_id,
                    origin=origin.value,
                    status=TaskStatus.queued.value,
                    progress=0,
                    request=request,
                    images=[],
                    error=None,
                    meta=metadata,
                    idempotency_key=idempotency_key,
                    request_fingerprint=request_fingerprint,
                    last_update_source=(
                        UpdateSource.submit if origin is TaskOrigin.submitted else UpdateSource.api
                    ).value,
                    created_at=now,
                    updated_at=now,
                )
                self.plan(task, now)
                session.add(task)
                session.flush()
                _as_stored(session, task, "meta", "request")
                if notify_url is not None:
                    # Before the first event, so task.submitted is delivered there too.
                    assert task.pk is not None
                    session.add(
                        Subscription(
                            id=new_id("sub"),
                            owner=owner,
                            kind=SubscriptionKind.task.value,
                            task_pk=task.pk,
                            url=notify_url,
                            enabled=True,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    session.flush()
                self._append_event(session, task, EventType.submitted, task.last_update_source)
                self._note_receipt_counts({task.id: 0})  # a new task: none yet
                return CreateResult(task_json(task), created=True)
        except IntegrityError:
            # Lost a race: a concurrent request with the same key or provider task id won.
            return self._after_lost_race(
                owner, provider, provider_task_id, idempotency_key, request_fingerprint
            )
        except Conflict as exc:
            if idempotency_key is None or exc.code != "already_tracked":
                raise
            # Under READ COMMITTED each statement reads a snapshot of its own: a concurrent
            # request with the same key can commit after the key lookup found nothing and
            # before the provider task id check, which then finds that request's task.
            return self._after_lost_race(
                owner, provider, provider_task_id, idempotency_key, request_fingerprint
            )

    def _after_lost_race(
        self,
        owner: str,
        provider: str,
        provider_task_id: str | None,
        idempotency_key: str | None,
        request_fingerprint: str | None,
    ) -> CreateResult:
        """The answer to a create that a concurrent one beat, read afresh: the winner's task
        replayed if it came with the same idempotency key, else the conflict that names it."""
        with self.transaction(write=False) as session:
            found = self._created_before(
                session, owner, provider, provider_task_id, idempotency_key, request_fingerprint
            )
        if found is not None:
            return found
        raise Conflict("The task conflicts with one created at the same moment.")

    def _created_before(
        self,
        session: Session,
        owner: str,
        provider: str,
        provider_task_id: str | None,
        idempotency_key: str | None,
        request_fingerprint: str | None,
    ) -> CreateResult | None:
        """The task an earlier request with this idempotency key created, replayed; a
        Conflict if another task already tracks this provider task id; else None."""
        if idempotency_key is not None:
            existing = self._by_idempotency_key(session, owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, request_fingerprint)
        if provider_task_id is not None:
            self._ensure_not_tracked(session, owner, provider, provider_task_id)
            self._refuse_another_clients(session, owner, provider, provider_task_id)
        return None

    @staticmethod
    def _by_idempotency_key(session: Session, owner: str, key: str) -> Task | None:
        statement = select(Task).where(Task.owner == owner, Task.idempotency_key == key)
        return session.exec(statement).first()

    @staticmethod
    def _replay(existing: Task, request_fingerprint: str | None) -> CreateResult:
        if existing.request_fingerprint != request_fingerprint:
            raise Unprocessable(
                "This Idempotency-Key was already used with a different request body. "
                "Use a new key for a new request.",
                code="idempotency_key_reused",
                details={"task_id": existing.id},
            )
        return CreateResult(task_json(existing), created=False)

    @staticmethod
    def _holding(provider: str, provider_task_id: str) -> Any:
        """The ids of the tasks that hold this provider task (narrow it by owner)."""
        return select(Task.id).where(
            Task.provider == provider, Task.provider_task_id == provider_task_id
        )

    @classmethod
    def _ensure_not_tracked(
        cls, session: Session, owner: str, provider: str, provider_task_id: str
    ) -> None:
        statement = cls._holding(provider, provider_task_id).where(Task.owner == owner)
        existing = session.exec(statement).first()
        if existing is not None:
            raise Conflict(
                f"Provider task {provider_task_id!r} at {provider} is already tracked as "
                f"task {existing}.",
                code="already_tracked",
                details={"task_id": existing},
            )

    @staticmethod
    def _refuse_another_clients(
        session: Session, owner: str, provider: str, provider_task_id: str
    ) -> None:
        """Conflict when another API client's task holds this provider task (tracking it, or
        setting it by PATCH; :func:`held_elsewhere`)."""
        if held_elsewhere(session.connection(), provider, provider_task_id, owner):
            raise Conflict(
                f"Provider task {provider_task_id!r} at {provider} belongs to another API "
                "client of this TaskRelay: a client may track only the provider tasks it "
                "submitted itself.",
                code="tracked_by_another_client",
            )

    def get_task(self, owner: str, task_id: str) -> dict[str, Any]:
        with self.transaction(write=False) as session:
            return task_json(self.owned(session, owner, task_id))

    def find_task(self, task_id: str) -> dict[str, Any] | None:
        """A task by id whoever owns it (internal use: callbacks, background work): its JSON,
        and its ``deadline_at`` (a datetime; the API does not show it), which a restart with
        another ``TASKRELAY_<P>_DEADLINE`` leaves as it was."""
        if not could_be_issued(task_id):
            return None
        with self.transaction(write=False) as session:
            task = session.exec(select(Task).where(Task.id == task_id)).first()
            if task is None:
                return None
            deadline = task.deadline_at or self.deadline_for(task.provider, task.created_at)
            return {**task_json(task), "deadline_at": deadline}

    @staticmethod
    def owned(session: Session, owner: str, task_id: str, *, lock: bool = False) -> Task:
        """The client's task ``task_id`` read in ``session``; NotFound otherwise (also for the
        outbox's lists of a task's deliveries)."""
        statement = select(Task).where(Task.id == task_id, Task.owner == owner)
        if lock:
            statement = statement.with_for_update()
        task = session.exec(statement).first() if could_be_issued(task_id) else None
        if task is None:
            # The same answer for "no such task" and "another client's task": ids leak nothing.
            raise NotFound(f"No task {task_id!r} was found for this API client.")
        return task

    def list_tasks(
        self,
        owner: str,
        filters: TaskFilter,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. The cursor is a position in the insertion order, so tasks created
        while a client pages never shift or repeat the pages that follow."""
        statement = select(Task).where(Task.owner == owner)
        if filters.status:
            statement = statement.where(col(Task.status).in_(filters.status))
        if filters.provider:
            statement = statement.where(Task.provider == filters.provider)
        if filters.created_after:
            statement = statement.where(Task.created_at >= filters.created_after)
        if filters.created_before:
            statement = statement.where(Task.created_at < filters.created_before)
        if cursor:
            statement = statement.where(col(Task.pk) < decode_cursor(cursor))
        statement = statement.order_by(col(Task.pk).desc()).limit(limit + 1)
        with self.transaction(write=False) as session:
            rows, next_cursor = paged(list(session.exec(statement)), limit, lambda t: t.pk)
        return [task_json(task) for task in rows], next_cursor

    def list_events(self, owner: str, task_id: str) -> list[TaskEvent]:
        with self.transaction(write=False) as session:
            task = self.owned(session, owner, task_id)
            statement = (
                select(TaskEvent).where(TaskEvent.task_pk == task.pk).order_by(col(TaskEvent.seq))
            )
            return list(session.exec(statement))

    def task_with_events(self, owner: str, task_id: str) -> tuple[dict[str, Any], list[TaskEvent]]:
        """The task and its history as of one moment (a read transaction sees one snapshot on
        both databases: :meth:`transaction`), so the task is as its last event left it: an
        update committed meanwhile is in neither, and comes as the next event."""
        with self.transaction(write=False) as session:
            task = self.owned(session, owner, task_id)
            statement = (
                select(TaskEvent).where(TaskEvent.task_pk == task.pk).order_by(col(TaskEvent.seq))
            )
            return task_json(task), list(session.exec(statement))

    def events_after(self, owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        with self.transaction(write=False) as session:
            task = self.owned(session, owner, task_id)
            statement = (
                select(TaskEvent)
                .where(TaskEvent.task_pk == task.pk, col(TaskEvent.seq) > after_seq)
                .order_by(col(TaskEvent.seq))
            )
            return list(session.exec(statement))

    def patch_task(
        self,
        owner: str,
        task_id: str,
        *,
        provider_task_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> dict[str, Any]:
        try:
            return self._patch(owner, task_id, provider_task_id, metadata)
        except IntegrityError as exc:  # another request set the same id at the same moment
            raise Conflict(
                f"Provider task id {provider_task_id!r} was just given to another task.",
                code="already_tracked",
            ) from exc

    def _patch(
        self,
        owner: str,
        task_id: str,
        provider_task_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> dict[str, Any]:
        with self.transaction(write=True) as session:
            task = self.owned(session, owner, task_id, lock=True)
            changed = False
            if (
                provider_task_id is not None
                and provider_task_id != task.provider_task_id
                and task.origin != TaskOrigin.tracked.value
            ):
                # TaskRelay learns a submitted task's id from the provider's reply: an id set
                # here first would make it refuse the real one, and the callbacks with it.
                raise Conflict(
                    f"Task {task_id} was submitted through POST /v1/tasks: TaskRelay takes its "
                    "provider task id from the provider, so it cannot be set. Only tasks "
                    "registered with POST /v1/tasks/track take a provider_task_id.",
                    code="provider_task_id_not_settable",
                    details={"origin": task.origin},
                )
            if provider_task_id is not None and provider_task_id != task.provider_task_id:
                if task.provider_task_id is not None:
                    raise Conflict(
                        f"Task {task_id} already has provider task id "
                        f"{task.provider_task_id!r}; it cannot be changed.",
                        code="provider_task_id_set",
                    )
                self._ensure_not_tracked(session, owner, task.provider, provider_task_id)
                self._refuse_another_clients(session, owner, task.provider, provider_task_id)
                task.provider_task_id = provider_task_id
                self.plan(task, self.clock())
                changed = True
            new_metadata = metadata is not None and metadata != task.meta
            if metadata is not None and new_metadata:
                task.meta = metadata
                changed = True
            if changed:
                task.updated_at = self.clock()
                session.add(task)
            if new_metadata:
                session.flush()
                _as_stored(session, task, "meta")
            return task_json(task)

    # --- updates from providers -------------------------------------------------------------

    def apply_update(
        self,
        task_id: str,
        update: TaskUpdate,
        source: UpdateSource,
        *,
        receipt: ReceiptDraft | None = None,
    ) -> ApplyResult:
        """Run ``update`` through the state machine and record it, with its receipt, in one
        transaction. Concurrent updates of one task are serialised by the row lock (PostgreSQL)
        or the write lock (SQLite), so a racing poll and callback make one transition."""
        from service.ingest import UpdateRequest

        (result,) = self.apply_updates([UpdateRequest(task_id, update, source, receipt)])
        if isinstance(result, TaskRelayError):
            raise result
        return result

    def apply_updates(
        self, requests: Sequence[UpdateRequest]
    ) -> list[ApplyResult | TaskRelayError]:
        """Apply many updates in one transaction (group commit: ``service/ingest.py``), one
        result or error per request, in order. A value the database refuses (a provider task id
        another task holds, say) fails the whole transaction; the requests are then applied one
        by one, so that only the offending one fails. A database outage fails them all alike."""
        from service.ingest import apply_updates

        try:
            with self.core_transaction() as (connection, written):
                return apply_updates(self, connection, written, requests)
        except (IntegrityError, BadRequest) as exc:
            if len(requests) > 1:
                return [self._apply_alone(request) for request in requests]
            if isinstance(exc, BadRequest):
                return [exc]
            if not provider_task_id_taken(exc):
                raise  # not the update's fault: unexpected, and answered as such
            taken = Conflict(
                "The provider task id in this update already belongs to another of the "
                "client's tasks; nothing was changed.",
                code="provider_task_id_taken",
            )
            (request,) = requests
            if request.receipt is not None:
                # Kept for audit as every refused callback is: the refusal rolled back the
                # transaction that held its receipt.
                refused = replace(request.receipt, error=taken.message)
                try:
                    self.record_rejected_callback(request.task_id, refused)
                except (StoreUnavailable, NotFound):  # the refusal stands; only its record is lost
                    log.warning("could not keep the refused callback of %s", request.task_id)
            return [taken]
        except StoreUnavailable as exc:
            return [exc] * len(requests)
        except Exception:
            if len(requests) == 1:
                raise
            # Not the database's doing (a value nothing checked, or a bug): one update's fault
            # must not fail its neighbours, so each is applied alone and only it fails.
            log.exception("a batch of %d updates failed; applying them one by one", len(requests))
            return [self._apply_alone(request) for request in requests]

    def _apply_alone(self, request: UpdateRequest) -> ApplyResult | TaskRelayError:
        try:
            (result,) = self.apply_updates([request])
        except Exception:
            log.exception("the update of task %s failed", request.task_id)
            return TaskRelayError(
                "TaskRelay hit an unexpected error recording this update; nothing was recorded. "
                "Retrying is safe: updates are idempotent."
            )
        return result

    def expire_task(self, task_id: str, reason: str, *, unsent: str | None = None) -> ApplyResult:
        """Expire the task with ``reason`` as its error message; ``unsent`` instead when it is
        still queued after an attempt to send it, with no provider task id and no retry
        planned (no answer to that attempt was recorded), if given. A submission never sent
        (its deadline passed while it waited for a submission slot, or while no process
        ran) says so, as the submitter would have said."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            if _never_sent(task):
                error = unsent_past_deadline(task.provider, again=False)
                change = expire(task_state(task), error["message"], error["code"])
            else:
                unanswered = _awaiting_its_answer(task)
                change = expire(task_state(task), unsent if unsent and unanswered else reason)
            if change is None and task.next_check_at is not None:
                self.plan(task, self.clock())  # final already: no look is left to make
                session.add(task)
            return self._commit_change(session, task, change, UpdateSource.timeout)

    def expire_unanswered(self, task_id: str, reason: str) -> ApplyResult | None:
        """Expire a task whose last submission's answer is lost (:meth:`_answer_due` has
        passed: sent to a provider that cannot call back, still queued, nothing recorded),
        with ``reason`` as its error message; None, changing nothing, for any other task."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            due = self._answer_due(task)
            if due is None or due > self.clock():
                return None
            change = expire(task_state(task), reason, code=UNANSWERED_CODE)
            return self._commit_change(session, task, change, UpdateSource.timeout)

    def record_rejected_callback(self, task_id: str, receipt: ReceiptDraft) -> None:
        """Keep the raw body of a callback that could not be parsed, for audit (while its
        task holds fewer than :attr:`max_receipts`)."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            assert task.pk is not None
            row = self.receipt_row(task.pk, receipt, ReceiptOutcome.rejected, receipt.error)
            held = session.execute(_RECEIPTS_OF_TASK, {"task_pk": task.pk}).scalar_one()
            kept = self.within_receipt_cap([row], {task.pk: held}, {task.pk: task.id})
            if kept:
                session.execute(sa.insert(CallbackReceipt), kept)

    def receipt_counts_known(self, task_ids: Iterable[str]) -> dict[str, int]:
        """The receipt counts this process knows of ``task_ids`` (those it knows)."""
        with self._dropped_lock:
            return {
                task_id: self._receipt_counts[task_id]
                for task_id in task_ids
                if task_id in self._receipt_counts
            }

    def _note_receipt_counts(self, counts: Mapping[str, int]) -> None:
        with self._dropped_lock:
            for task_id, count in counts.items():
                self._receipt_counts[task_id] = count
                self._receipt_counts.move_to_end(task_id)
            while len(self._receipt_counts) > RECEIPT_COUNTS_KEPT:
                self._receipt_counts.popitem(last=False)

    def within_receipt_cap(
        self,
        rows: Sequence[dict[str, Any]],
        held: Mapping[int, int],
        task_ids: Mapping[int, str],
    ) -> list[dict[str, Any]]:
        """Of receipt ``rows`` (in arrival order), those their tasks have room for: a task
        keeps :attr:`max_receipts` at most, ``held`` (by task pk) already. The rest are
        counted in :attr:`receipts_dropped`; a task that fills up is logged, once. The new
        counts are remembered (:meth:`receipt_counts_known`): the caller commits the rows
        (a transaction that fails leaves a count too high, never too low, so the cap holds)."""
        counts = dict(held)
        kept: list[dict[str, Any]] = []
        for row in rows:
            task_pk = row["task_pk"]
            count = counts.get(task_pk, 0)
            if count >= self.max_receipts:
                continue
            counts[task_pk] = count + 1
            kept.append(row)
            if count + 1 == self.max_receipts:
                log.warning(
                    "task %s now keeps %d callback receipts, the most a task keeps: its later "
                    "callbacks are answered and applied, and their receipts not kept",
                    task_ids.get(task_pk, task_pk),
                    self.max_receipts,
                )
        if len(kept) < len(rows):
            with self._dropped_lock:
                self.receipts_dropped += len(rows) - len(kept)
        self._note_receipt_counts(
            {task_ids[pk]: count for pk, count in counts.items() if pk in task_ids}
        )
        return kept

    def _locked(self, session: Session, task_id: str) -> Task:
        task = session.exec(select(Task).where(Task.id == task_id).with_for_update()).first()
        if task is None:
            raise NotFound(f"No task {task_id!r} exists.")
        return task

    def _commit_change(
        self,
        session: Session,
        task: Task,
        change: Change | None,
        source: UpdateSource,
        update: TaskUpdate | None = None,
        *,
        replan: bool = True,
    ) -> ApplyResult:
        event = None
        now = self.clock()
        outcome, touched = transition(task, change, source, update, now)
        if touched:
            if replan:
                self.plan(task, now)
            session.add(task)
            session.flush()
        if change is not None and change.event_type is not None:
            event = self._append_event(session, task, change.event_type, source.value)
        return ApplyResult(task_json(task), outcome, event)

    def _append_event(
        self, session: Session, task: Task, event_type: EventType, source: str
    ) -> dict[str, Any]:
        from service.outbox import NewEvent, fan_out_many  # the outbox builds on the store

        assert task.pk is not None
        event = TaskEvent(**event_row(task, event_type, source))
        session.add(event)
        session.flush()
        assert event.seq is not None
        new_event = NewEvent(event.seq, task.pk, task.id, task.owner, task.provider, event.type)
        first_wait = self.delivery_first_wait
        if fan_out_many(session.connection(), [new_event], self.clock(), first_wait=first_wait):
            session.info[WRITTEN].deliveries = True
        session.info[WRITTEN].events.add(task.id)
        return {"id": event.id, "type": event.type}

    def receipt_row(
        self, task_pk: int, receipt: ReceiptDraft, outcome: ReceiptOutcome, error: str | None
    ) -> dict[str, Any]:
        """A ``callback_receipt`` row: the body as received, cut to the audit size."""
        kept = receipt.body[: self.audit_bytes]
        # The size a too-large body declared is the sender's to choose: bounded to the column.
        size = min(max(receipt.size or 0, len(receipt.body)), MAX_BODY_SIZE)
        return {
            "task_pk": task_pk,
            "provider": receipt.provider,
            "received_at": self.clock(),
            "outcome": outcome.value,
            "error": error,
            "content_type": (receipt.content_type or "")[:255] or None,
            "body": kept,
            "body_size": size,
            "body_truncated": len(kept) < size,
        }

    # --- the scheduler's queue ---------------------------------------------------------------

    def claim_due(
        self, provider: str, worker: str, *, limit: int, lease_seconds: float
    ) -> list[Claim]:
        """Lease up to ``limit`` of ``provider``'s due tasks to ``worker``, earliest first.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: several processes claim disjoint tasks
        without waiting on each other; a crashed worker's leases simply expire. A due task
        whose look was planned later since (``planned_check_at``, :meth:`plan`) is moved to
        that time instead, not leased. After a stall there can be tens of thousands of those
        ahead of the tasks really due: they are moved with set-based statements, at most
        :data:`MOVES_PER_TRANSACTION` per transaction, so that no transaction holds the
        write turn (SQLite) or the rows' locks (PostgreSQL) for long while callbacks wait.
        """
        now = self.clock()
        expires = now + timedelta(seconds=lease_seconds)
        assert expires > now, lease_seconds  # a claimed task leaves the query's range
        claims: list[Claim] = []
        more = True
        while more:
            try:
                taken, more = self._claim_some(provider, worker, now, expires, limit - len(claims))
            except StoreUnavailable:
                if not claims:
                    raise
                # Those leased in the transactions already committed are polled now; what is
                # left is still due for the next pass.
                log.warning("claiming due %s tasks stopped: the database is unavailable", provider)
                break
            claims += taken
        return claims

    def _claim_some(
        self, provider: str, worker: str, now: datetime, expires: datetime, limit: int
    ) -> tuple[list[Claim], bool]:
        """One transaction of :meth:`claim_due`: up to ``limit`` claims, and whether it stopped
        at the cap on moves with more to do. Pages are read earliest first; a page of moves
        alone makes the next page larger (twice its moves, within the cap), so a long run of
        them takes few round trips; after a page that leased tasks, the next is the size
        still wanted, so that no row is locked (PostgreSQL) only to be left as it was."""
        claims: list[Claim] = []
        with self.transaction(write=True) as session:
            connection = session.connection()
            dialect = connection.dialect.name
            moved = 0
            fetch = min(limit, MOVES_PER_TRANSACTION)
            while True:
                rows = connection.execute(
                    _DUE_TASKS, {"provider": provider, "now": now, "fetch": fetch}
                ).all()
                moves: list[int] = []
                leases: list[int] = []
                for pk, task_id, provider_task_id, deadline_at, later in rows:
                    if later is not None and later > now:
                        moves.append(pk)
                    elif len(claims) < limit:
                        leases.append(pk)
                        assert deadline_at is not None
                        claims.append(Claim(task_id, provider, provider_task_id, deadline_at))
                if moves:
                    connection.execute(_MOVE_TO_PLAN(connection), {"pks": listed(dialect, moves)})
                if leases:
                    connection.execute(
                        _LEASE(connection),
                        {"pks": listed(dialect, leases), "worker": worker, "until": expires},
                    )
                moved += len(moves)
                wanted = limit - len(claims)
                if len(rows) < fetch or not wanted:
                    return claims, False  # nothing more is due, or enough is claimed
                if moved >= MOVES_PER_TRANSACTION:
                    return claims, True
                if leases:  # the tasks really due have begun: no more than is wanted
                    fetch = min(MOVES_PER_TRANSACTION - moved, wanted)
                else:
                    fetch = min(MOVES_PER_TRANSACTION - moved, max(wanted, 2 * len(moves)))

    def record_poll(
        self,
        task_id: str,
        worker: str | None,
        *,
        update: TaskUpdate | None = None,
        error: ProviderError | None = None,
        manual: bool = False,
    ) -> ApplyResult:
        """A status query's answer (or failure), through the same state machine as a
        callback; then the next check is planned and ``worker``'s lease released. An answer
        that cannot be stored (its provider task id belongs to another task) counts as a
        failed query, so the task backs off instead of failing the same way each pass; the
        result carries it as its ``error``.

        ``manual``: a refresh, which the schedule did not plan. It is not counted among the
        scheduled looks (whose number sets the backoff: a refresh before the expected finish
        would have started it early). Refused, it never brings the next look (or the plan
        kept for later) forward, nor counts as a failure unless it puts the look later;
        answered, it plans the next look as a callback's news would."""
        try:
            return self._record_poll(task_id, worker, update=update, error=error, manual=manual)
        except (IntegrityError, BadRequest):
            refused = UpstreamProtocolError(
                "the provider's answer could not be stored", provider="taskrelay"
            )
            result = self._record_poll(task_id, worker, update=None, error=refused, manual=manual)
            return replace(result, error=refused)

    def _record_poll(
        self,
        task_id: str,
        worker: str | None,
        *,
        update: TaskUpdate | None,
        error: ProviderError | None,
        manual: bool,
    ) -> ApplyResult:
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            now = self.clock()
            if not manual:
                task.poll_count += 1
            change = None
            refused: ProviderError | None = None
            if update is not None:
                try:
                    change = decide(task_state(task), update)
                except Conflict as exc:
                    error = refused = UpstreamProtocolError(exc.message, provider=task.provider)
            if error is not None:
                task.poll_errors += 1
                if TaskStatus(task.status).terminal and not self._followed_after_expiry(task, now):
                    # Final already (a refresh, or a callback that won the race): nothing is
                    # left to look at, so no next look, whatever the provider answered.
                    self.plan(task, now)
                else:
                    after_error = next_check_after_error(
                        self._timing(task),
                        now,
                        self.policy(task.provider),
                        retry_after=error.retry_after,
                        rng=self.rng,
                    )
                    ahead = _later(task.next_check_at, task.planned_check_at)
                    if manual and ahead is not None and after_error <= ahead:
                        # A refused refresh leaves the schedule as it was, and its backoff:
                        # the look ahead is no failed query's.
                        task.poll_errors -= 1
                    else:
                        task.planned_check_at = None
                        task.next_check_at = after_error
                result = ApplyResult(task_json(task), ReceiptOutcome.unchanged, None, refused)
            else:
                task.poll_errors = 0
                result = self._commit_change(
                    session, task, change, UpdateSource.poll, update, replan=False
                )
                self.plan(task, now)  # once: poll_count changed whether or not the task did
                result = ApplyResult(task_json(task), result.outcome, result.event)
            if worker is None or task.lease_owner == worker:
                task.lease_owner = None
                task.lease_expires_at = None
            session.add(task)
            return result

    def claim_task(self, task_id: str, worker: str, *, lease_seconds: float) -> bool:
        """Lease one task to ``worker`` unless someone else holds a live lease on it."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            now = self.clock()
            if task.lease_owner and task.lease_expires_at and task.lease_expires_at > now:
                return False
            task.lease_owner = worker
            task.lease_expires_at = now + timedelta(seconds=lease_seconds)
            session.add(task)
            return True

    def defer(
        self, task_id: str, worker: str | None, *, seconds: float, manual: bool = False
    ) -> dict[str, Any]:
        """Look at a task again in ``seconds``, without asking its provider now; releases the
        lease. The look is never put past the deadline, unless the deadline has passed: then
        the last look before expiring the task waits for the pause to end. ``manual``: a
        refresh's, which never brings the next look forward."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            now = self.clock()
            if TaskStatus(task.status).terminal and not self._followed_after_expiry(task, now):
                self.plan(task, now)  # final: no more looks
            else:
                later = now + timedelta(seconds=seconds)
                deadline = task.deadline_at
                at = later if deadline is None or deadline <= now else min(later, deadline)
                ahead = _later(task.next_check_at, task.planned_check_at)
                if not (manual and ahead is not None and at <= ahead):
                    task.next_check_at = at
                    task.planned_check_at = None
            if worker is None or task.lease_owner == worker:
                task.lease_owner = None
                task.lease_expires_at = None
            session.add(task)
            return task_json(task)

    def reschedule(self, task_id: str, worker: str | None) -> dict[str, Any]:
        """Plan the next look at a task without asking its provider, releasing the lease."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            self.plan(task, self.clock())
            if worker is None or task.lease_owner == worker:
                task.lease_owner = None
                task.lease_expires_at = None
            session.add(task)
            return task_json(task)

    def release_leases(self, worker: str) -> int:
        """Hand back every task ``worker`` still holds (graceful shutdown)."""
        statement = (
            sa.update(Task)
            .where(col(Task.lease_owner) == worker)
            .values(lease_owner=None, lease_expires_at=None)
        )
        with self.transaction(write=True) as session:
            return int(session.execute(statement).rowcount or 0)  # type: ignore[attr-defined]

    def reconcile(self, batch: int = 1000) -> int:
        """Give every unfinished task without a plan a deadline and a next check (tasks from
        before polling existed, or whose plan was lost). Returns how many were planned."""
        planned = 0
        while True:
            statement = (
                select(Task)
                .where(col(Task.status).in_(UNFINISHED), col(Task.next_check_at).is_(None))
                # The order of ix_task_status_next_check_at: without it PostgreSQL's planner
                # expects many matches and scans the whole table for the LIMIT.
                .order_by(col(Task.status), col(Task.next_check_at))
                .limit(batch)
            )
            with self.transaction(write=True) as session:
                tasks = list(session.exec(statement))
                now = self.clock()
                for task in tasks:
                    self.plan(task, now)
                    if task.next_check_at is None:  # cannot happen for an unfinished task
                        task.next_check_at = now
                    session.add(task)
            planned += len(tasks)
            if len(tasks) < batch:
                return planned

    def _timing(self, task: Task | TaskRow) -> TaskTiming:
        assert task.deadline_at is not None
        return TaskTiming(
            status=TaskStatus(task.status),
            started_at=task.created_at,
            expected_at=task.expected_at,
            deadline_at=task.deadline_at,
            progress=task.progress,
            progress_at=task.progress_at,
            poll_count=task.poll_count,
            poll_errors=task.poll_errors,
            has_provider_task_id=task.provider_task_id is not None,
            answer_due_at=self._answer_due(task),
        )

    def _answer_due(self, task: Task | TaskRow) -> datetime | None:
        """When the answer to ``task``'s last submission attempt is lost, if nothing but that
        answer could settle it: see :attr:`PollPolicy.answer_within`."""
        # None: a provider that calls back, or a task sent by a release before 0010.
        return task.submit_answer_due_at if _awaiting_its_answer(task) else None

    def _followed_after_expiry(self, task: Task | TaskRow, now: datetime) -> bool:
        """Whether ``task`` expired because its submission's answer seemed lost
        (:meth:`expire_unanswered`) and then the answer came after all, naming the provider's
        task: it is followed like any task until its deadline, so that the provider's final
        word still lands on it (an expired task takes it)."""
        return (
            task.status == TaskStatus.expired.value
            and task.provider_task_id is not None
            and task.deadline_at is not None
            and now < task.deadline_at
            and (task.error or {}).get("code") == UNANSWERED_CODE
            and self.policy(task.provider).queryable
        )

    def mark_submit_attempt(self, task_id: str, attempt: int) -> bool:
        """Record, before the request leaves, that attempt number ``attempt`` is being made.

        A compare-and-set: it succeeds only if ``attempt - 1`` attempts were recorded, so when
        several processes try to send the same task (e.g. every replica resuming unsent tasks
        at once, or the process that planned a retry and another one's sweep), exactly one
        sends it. A retry that was planned is no longer: this is it.

        For a provider that cannot call back, it also records when the answer is lost if none
        has been recorded by then (:attr:`PollPolicy.answer_within` from now: this process's
        timeouts), and plans the scheduler's next look for that time instead of the
        deadline."""
        with self.transaction(write=True) as session:
            task = session.exec(select(Task).where(Task.id == task_id).with_for_update()).first()
            if (
                task is None
                or task.status != TaskStatus.queued.value
                or task.submit_attempts != attempt - 1
            ):
                return False
            now = self.clock()
            within = self.policy(task.provider).answer_within
            task.submit_attempts = attempt
            task.submit_retry_at = None
            task.submit_answer_due_at = None if within is None else now + timedelta(seconds=within)
            if within is not None:
                self.plan(task, now)
            session.add(task)
            return True

    def extend_answer_due(self, task_id: str, attempt: int, slack: float = 0.0) -> bool:
        """A line of attempt ``attempt``'s stream came: the process reading it is alive, so
        its answer is due :attr:`PollPolicy.answer_within` (and ``slack``) from now, not from
        when it was sent. The next look stays where it is; the scheduler, finding the task
        not due yet, plans it again. False when nothing was changed (no due time, another
        attempt)."""
        with self.transaction(write=True) as session:
            task = session.exec(select(Task).where(Task.id == task_id).with_for_update()).first()
            within = None if task is None else self.policy(task.provider).answer_within
            if (
                task is None
                or within is None
                or task.submit_answer_due_at is None
                or task.submit_attempts != attempt
            ):
                return False
            task.submit_answer_due_at = self.clock() + timedelta(seconds=within + slack)
            session.add(task)
            return True

    def unmark_submit_attempt(self, task_id: str, attempt: int) -> bool:
        """Take back :meth:`mark_submit_attempt` for an attempt that was never sent (a shutdown
        cut it off right there), so that the sweep sends it: the first attempt as an unsent
        task, a later one as a retry due now. A compare-and-set, as the mark: a no-op unless
        ``attempt`` attempts are recorded and the task is still queued."""
        statement = (
            sa.update(Task)
            .where(
                col(Task.id) == task_id,
                col(Task.submit_attempts) == attempt,
                col(Task.status) == TaskStatus.queued.value,
            )
            .values(
                submit_attempts=attempt - 1,
                submit_retry_at=None if attempt == 1 else self.clock(),
                submit_answer_due_at=None,
            )
        )
        with self.transaction(write=True) as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def plan_submit_retry(self, task_id: str, attempts: int, at: datetime) -> bool:
        """Keep in the row that the submission, after ``attempts`` attempts, is to be sent
        again at ``at``: if this process is gone by then, another one's sweep sends it
        (:meth:`due_submit_retries`). False when the task moved on meanwhile (settled, or
        another attempt made), and then nothing is planned."""
        statement = (
            sa.update(Task)
            .where(
                col(Task.id) == task_id,
                col(Task.submit_attempts) == attempts,
                col(Task.status) == TaskStatus.queued.value,
            )
            # The attempt was answered (a refusal): no answer is lost. Cleared here, not by the
            # next attempt: a release before 0010 making it would leave this one's due time.
            .values(submit_retry_at=at, submit_answer_due_at=None)
        )
        with self.transaction(write=True) as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def give_up_submission(self, task_id: str, attempts: int, error: dict[str, Any]) -> bool:
        """Fail a queued task after ``attempts`` attempts without sending it again, unless it
        moved on meanwhile (settled, or another attempt made: the same guard as
        :meth:`mark_submit_attempt`, in the same transaction as the failure); whether it
        was failed here. A task running on its own stream's progress alone (no provider task
        id) counts as queued: only that stream could have moved it."""
        with self.transaction(write=True) as session:
            task = self._locked(session, task_id)
            if not _only_its_submission(task) or task.submit_attempts != attempts:
                return False
            task.submit_retry_at = None
            failed = TaskUpdate(status=TaskStatus.failed, error=error)
            self._commit_change(
                session, task, decide(task_state(task), failed), UpdateSource.submit
            )
            return True

    def prune_tasks(self, finished_before: datetime, limit: int = PRUNE_BATCH) -> list[str]:
        """:meth:`prune`, returning the deleted tasks' ids."""
        return self.prune(finished_before, limit).task_ids

    def prune(self, finished_before: datetime, limit: int = PRUNE_BATCH) -> Pruned:
        """Delete up to ``limit`` final tasks that finished before ``finished_before``, the
        longest finished first, with everything kept for them: their events, callback
        receipts, notify_url subscriptions, deliveries and delivery attempts. One short write
        transaction per call: call again while it deletes ``limit``."""
        undelivered = 0
        with self.core_transaction() as (connection, _written):
            rows = connection.execute(
                _PRUNABLE(connection), {"before": finished_before, "limit": limit}
            ).all()
            if rows:
                pks = listed(connection.dialect.name, [pk for pk, _ in rows])
                if connection.dialect.name == "postgresql":
                    connection.execute(_LOCK_PRUNED_SUBSCRIPTIONS(connection), {"pks": pks}).all()
                    connection.execute(_LOCK_PRUNED_DELIVERIES(connection), {"pks": pks}).all()
                pending = _PENDING_PRUNED_DELIVERIES(connection)
                undelivered = connection.execute(pending, {"pks": pks}).scalar_one()
                connection.execute(_PRUNE(connection), {"pks": pks})
        return Pruned([task_id for _, task_id in rows], undelivered)

    def existing_task_ids(self, task_ids: Iterable[str]) -> set[str]:
        """Which of ``task_ids`` are tasks in the store (retention's check for image folders
        left behind by a crash)."""
        with self.transaction(write=False) as session:
            connection = session.connection()
            wanted = listed(connection.dialect.name, task_ids)
            return set(connection.execute(_EXISTING_IDS(connection), {"ids": wanted}).scalars())

    def due_submit_retries(self, due_before: datetime, limit: int = 1000) -> list[tuple[str, int]]:
        """Queued submissions whose planned retry was due before ``due_before``: each task id
        with the attempts made so far, the most overdue first (``ix_task_status_submit_retry_at``,
        which holds only the rows with a retry planned)."""
        statement = (
            sa.select(Task.id, Task.submit_attempts)  # type: ignore[call-overload]
            .where(
                col(Task.status) == TaskStatus.queued.value,
                col(Task.submit_retry_at) < due_before,
            )
            .order_by(col(Task.submit_retry_at))
            .limit(limit)
        )
        with self.transaction(write=False) as session:
            return [(row.id, row.submit_attempts) for row in session.execute(statement)]

    def unsent_submissions(
        self, limit: int = 1000, *, created_before: datetime | None = None
    ) -> list[str]:
        """Submitted tasks whose request never left (a crash between commit and send), oldest
        first; with ``created_before``, only those created before it."""
        before = _NO_CUT_OFF if created_before is None else created_before
        with self.transaction(write=False) as session:
            connection = session.connection()
            rows = connection.execute(_unsent_tasks(connection), {"before": before, "limit": limit})
            return list(rows.scalars())

    def list_receipts(
        self,
        owner: str,
        task_id: str,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_RECEIPTS_PAGE,
    ) -> tuple[list[CallbackReceipt], str | None]:
        """A page of the task's callback receipts, oldest first, and the cursor of the next
        page (None after the last): anyone holding the callback URL can add receipts, so
        they are never read all at once."""
        # Bodies are kept up to 64 KiB each, and written as JSON (a control character takes
        # six): 200 of them made answers of about 80 MB each. A page stops once its bodies
        # pass MAX_RECEIPTS_PAGE_BYTES (one receipt at least), and the next goes on from there.
        # The sizes are read first, and only the page's bodies then, in the same snapshot.
        with self.transaction(write=False) as session:
            task = self.owned(session, owner, task_id)
            sizes = sa.select(
                col(CallbackReceipt.pk), sa.func.length(col(CallbackReceipt.body))
            ).where(col(CallbackReceipt.task_pk) == task.pk)
            if cursor is not None:
                after = decode_cursor(cursor, "after")
                sizes = sizes.where(col(CallbackReceipt.pk) > after)
            listed = session.execute(sizes.order_by(col(CallbackReceipt.pk)).limit(limit + 1)).all()
            kept = 0
            for index, (_pk, size) in enumerate(listed[:limit]):
                kept += int(size or 0)
                if kept > MAX_RECEIPTS_PAGE_BYTES and index > 0:
                    listed, limit = listed[: index + 1], index
                    break
            wanted = [pk for pk, _size in listed[:limit]]
            rows = list(
                session.exec(
                    select(CallbackReceipt)
                    .where(col(CallbackReceipt.pk).in_(wanted))
                    .order_by(col(CallbackReceipt.pk))
                )
            )
        return rows, (encode_cursor(wanted[-1], "after") if len(listed) > limit else None)
