"""The event outbox: subscriptions, and the deliveries each task event owes them.

Task events are written in the same transaction as the task change that causes them
(``store.py``, ``ingest.py``); :func:`fan_out_many` runs inside that transaction too, so a
committed change always owes its deliveries and a rolled-back one never does. The dispatcher
then claims deliveries with leases, in order per (subscription, task), and records every attempt
here.

Progress events are coalesced: a progress delivery waits a moment (``PROGRESS_DELAY``) and is
superseded by any newer event of the same task for the same subscription before it goes out.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from service.db import ManyRows, listed, none_of, one_of, prebuilt
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import (
    ClientSecret,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EventType,
    Subscription,
    SubscriptionKind,
    Task,
    TaskEvent,
)
from service.schemas import isoformat
from service.signing import new_webhook_secret
from service.store import (
    Store,
    Written,
    could_be_issued,
    decode_cursor,
    new_id,
    paged,
)

PROGRESS_DELAY = timedelta(seconds=1)
# How often a claim moves aside the deliveries that are due but cannot go (see _move_aside), and
# how long a disabled subscription's deliveries are put off each time.
MOVE_ASIDE_EVERY = timedelta(seconds=1)
DISABLED_PUT_OFF = timedelta(hours=1)
# A put-aside reads only what became due since the one before, this much earlier (for rows
# committed a little after the time they are due from); and a sweep reads all that is due this
# often, MOVE_ASIDE_PAGE deliveries per claim, so no claim's cost grows with the due queue.
MOVE_ASIDE_OVERLAP = timedelta(seconds=5)
MOVE_ASIDE_FULL_EVERY = timedelta(minutes=10)
MOVE_ASIDE_PAGE = 500
# How many rows past its limit a claim looks at, to fill its slots from subscribers with room.
CLAIM_LOOKAHEAD = 64
MAX_REPLAY = 10_000
RESPONSE_BODY_CAP = 2048
# A delivery that never left this process (no connection came free in the webhook client's
# pool) is due again this much later; it was not an attempt, so nothing else changes.
UNSENT_PUT_BACK = timedelta(seconds=1)
DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True)
class DeliveryJob:
    """A claimed delivery, with everything needed to send it."""

    delivery_pk: int
    delivery_id: str
    subscription_pk: int
    url: str
    signing_secrets: tuple[str, ...]
    event_id: str
    body: bytes
    # The task the event is about, for the log context of the attempt.
    task_id: str = ""
    provider: str = ""


@dataclass(frozen=True)
class AttemptResult:
    """What became of one send. ``sent=False``: the request never left this process (no
    connection came free), through no fault of the subscriber's: not an attempt, so none is
    counted or logged, and the delivery is put back, due again shortly."""

    status_code: int | None
    duration_ms: float
    response_body: str | None = None
    error: str | None = None
    sent: bool = True
    # When the request started, on the outbox's clock; None: when it is recorded.
    started_at: datetime | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# What no text column can hold: NUL (PostgreSQL refuses it) and unpaired surrogates (no UTF-8
# encoder takes them: both databases' drivers refuse them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str | None, limit: int | None = None) -> str | None:
    """Text from a subscriber (its answer's body, an error describing its answer) as a text
    column can hold it: each NUL and unpaired surrogate replaced with U+FFFD (as undecodable
    bytes already are), at most ``limit`` characters; None for none or empty. Refusing it, as
    callbacks are refused (``service.providers.parsing.loads_storable``), is no option here:
    the attempt happened, and must be recorded."""
    if not text:
        return None
    if limit is not None:
        text = text[:limit]
    return _UNSTORABLE.sub("\ufffd", text)


def _storable(result: AttemptResult) -> AttemptResult:
    body = storable_text(result.response_body, RESPONSE_BODY_CAP)
    return dataclasses.replace(result, response_body=body, error=storable_text(result.error))


def envelope(event: TaskEvent) -> dict[str, Any]:
    """The event as subscribers receive it (version 1 of the event schema)."""
    return {
        "id": event.id,
        "type": event.type,
        "timestamp": isoformat(event.created_at),
        "data": event.data,
    }


def envelope_bytes(event: TaskEvent) -> bytes:
    return json.dumps(envelope(event), separators=(",", ":")).encode("utf-8")


def _rotate(row: Subscription | ClientSecret, now: datetime, overlap: timedelta) -> None:
    """A new secret for ``row``; the one it replaces keeps signing for ``overlap``. With no
    overlap it is dropped at once, not kept with an expiry of now."""
    if overlap > timedelta(0):
        row.previous_secret, row.previous_secret_expires_at = row.secret, now + overlap
    else:
        row.previous_secret, row.previous_secret_expires_at = None, None
    row.secret = new_webhook_secret()


def delivery_row(
    subscription_pk: int,
    event_seq: int,
    task_pk: int,
    event_type: str,
    due: datetime,
    now: datetime,
) -> dict[str, Any]:
    """A pending delivery of an event to a subscription, first attempt at ``due``."""
    return {
        "id": new_id("dlv"),
        "subscription_pk": subscription_pk,
        "event_seq": event_seq,
        "task_pk": task_pk,
        "event_type": event_type,
        "status": DeliveryStatus.pending.value,
        "attempts": 0,
        "next_attempt_at": due,
        "created_at": now,
        "updated_at": now,
    }


def _later_in_line(delivery: Delivery) -> sa.ColumnElement[bool]:
    """The task's later events still owed to the same subscription as ``delivery``."""
    return sa.and_(
        _DELIVERY.c.subscription_pk == delivery.subscription_pk,
        _DELIVERY.c.task_pk == delivery.task_pk,
        _DELIVERY.c.event_seq > delivery.event_seq,
        _DELIVERY.c.status == DeliveryStatus.pending.value,
    )


def _followers(delivery: Delivery, now: datetime) -> sa.ColumnElement[bool]:
    """The task's later events owed to the same subscription and put off past ``now`` without
    ever being attempted: held behind ``delivery``'s retry (see ``Outbox._move_aside``). One
    attempted already waits for its own retry, which a manual retry of ``delivery`` must not
    cut short."""
    return sa.and_(
        _later_in_line(delivery),
        _DELIVERY.c.attempts == 0,
        _DELIVERY.c.next_attempt_at > now,
    )


def new_delivery(subscription_pk: int, event: TaskEvent, due: datetime, now: datetime) -> Delivery:
    """:func:`delivery_row` as an ORM object, for an event already loaded."""
    assert event.seq is not None
    return Delivery(**delivery_row(subscription_pk, event.seq, event.task_pk, event.type, due, now))


class NewEvent(NamedTuple):
    """What fan-out needs of an event just appended (``seq`` is its position)."""

    seq: int
    task_pk: int
    task_id: str
    owner: str
    provider: str
    type: str


_SUBSCRIPTION = Subscription.__table__  # type: ignore[attr-defined]
_DELIVERY = Delivery.__table__  # type: ignore[attr-defined]
_ATTEMPT = DeliveryAttempt.__table__  # type: ignore[attr-defined]
_EVENT = TaskEvent.__table__  # type: ignore[attr-defined]
_CLIENT_SECRET = ClientSecret.__table__  # type: ignore[attr-defined]


# What fan-out reads of a subscription (match_subscriptions).
_FAN_OUT_COLUMNS = (
    _SUBSCRIPTION.c.pk,
    _SUBSCRIPTION.c.owner,
    _SUBSCRIPTION.c.kind,
    _SUBSCRIPTION.c.task_pk,
    _SUBSCRIPTION.c.event_types,
    _SUBSCRIPTION.c.providers,
)


@prebuilt
def _fan_out_subscriptions(dialect: str) -> sa.Select[Any]:
    """The enabled subscriptions an event of these tasks may owe a delivery (``owners``,
    ``task_pks``: :func:`service.db.listed`).

    They stay locked FOR KEY SHARE until the event's commit (PostgreSQL; SQLite's writes take
    turns anyway): a subscription deleted meanwhile would otherwise make the deliveries' INSERT
    violate their foreign key and fail the whole update (the callback, the status answer or the
    new task) with it. A DELETE after the read waits for the commit, then removes the new
    deliveries with the subscription; one under way is skipped (SKIP LOCKED: the subscription
    is going, and the update must not wait for its cascade through every delivery it had).
    Changes to other columns (disabling it, a new secret) neither wait nor are skipped: only a
    DELETE's lock conflicts with KEY SHARE."""
    return (
        sa.select(*_FAN_OUT_COLUMNS)
        .where(
            _SUBSCRIPTION.c.enabled.is_(True),
            # Each branch on its own index: the clients' endpoints, and these tasks' notify_url
            # subscriptions (a task subscription's owner is its task's owner). Asking for every
            # subscription of the clients would read every notify_url they ever had.
            sa.or_(
                sa.and_(
                    one_of(dialect, _SUBSCRIPTION.c.owner, "owners"),
                    _SUBSCRIPTION.c.kind == SubscriptionKind.endpoint.value,
                ),
                one_of(dialect, _SUBSCRIPTION.c.task_pk, "task_pks"),
            ),
        )
        .order_by(_SUBSCRIPTION.c.pk)
        .with_for_update(read=True, key_share=True, skip_locked=True)
    )


def _subscriptions_of_tasks() -> sa.Select[Any]:
    """PostgreSQL: :func:`_fan_out_subscriptions`'s subscriptions, found from the tasks' ids
    (``ids``, an array) instead of their owners and keys, so that the query can go out in the
    same round trip as the lock on those tasks (``service/ingest.py``). Each branch joins on its
    own index, as there, and the rows are locked as there."""
    task = Task.__table__  # type: ignore[attr-defined]
    owners = (
        sa.select(task.c.owner).where(one_of("postgresql", task.c.id, "ids")).distinct().subquery()
    )
    endpoints = (
        sa.select(_SUBSCRIPTION.c.pk)
        .join_from(_SUBSCRIPTION, owners, _SUBSCRIPTION.c.owner == owners.c.owner)
        .where(
            _SUBSCRIPTION.c.enabled.is_(True),
            _SUBSCRIPTION.c.kind == SubscriptionKind.endpoint.value,
        )
    )
    of_tasks = (
        sa.select(_SUBSCRIPTION.c.pk)
        .join_from(_SUBSCRIPTION, task, _SUBSCRIPTION.c.task_pk == task.c.pk)
        # Only a task subscription has a task_pk: no test of its kind, which would let the
        # planner read every task subscription through ix_subscription_owner_kind_pk.
        .where(one_of("postgresql", task.c.id, "ids"), _SUBSCRIPTION.c.enabled.is_(True))
    )
    # The rows themselves are read (and locked) by key: PostgreSQL allows no row lock on the
    # branches of a UNION.
    return (
        sa.select(*_FAN_OUT_COLUMNS)
        .where(
            _SUBSCRIPTION.c.pk.in_(sa.union_all(endpoints, of_tasks)),
            _SUBSCRIPTION.c.enabled.is_(True),
        )
        .order_by(_SUBSCRIPTION.c.pk)
        .with_for_update(read=True, key_share=True, skip_locked=True)
    )


SUBSCRIPTIONS_OF_TASKS = _subscriptions_of_tasks()

# One UPDATE per (subscription, task), each on ix_delivery_subscription_task_seq: a row-value IN
# list over both columns is not an index lookup on SQLite (it read every pending delivery).
SUPERSEDE = (
    sa.update(_DELIVERY)
    .where(
        _DELIVERY.c.subscription_pk == sa.bindparam("s_pk"),
        _DELIVERY.c.task_pk == sa.bindparam("t_pk"),
        _DELIVERY.c.status == DeliveryStatus.pending.value,
        _DELIVERY.c.event_type == EventType.progress.value,
        _DELIVERY.c.attempts == 0,
        _DELIVERY.c.lease_owner.is_(None),
    )
    .values(status=DeliveryStatus.coalesced.value, updated_at=sa.bindparam("superseded_at"))
    .returning(_DELIVERY.c.subscription_pk, _DELIVERY.c.task_pk, _DELIVERY.c.next_attempt_at)
)
# The columns delivery_row() gives (the others start NULL).
_DELIVERY_ROW_KEYS = (
    "id",
    "subscription_pk",
    "event_seq",
    "task_pk",
    "event_type",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
)
INSERT_DELIVERY = ManyRows(
    sa.insert(_DELIVERY).values({key: sa.bindparam(key) for key in _DELIVERY_ROW_KEYS}).inline()
)


def _pending_before(line: Any, column: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """``column`` of the pending deliveries of the outer delivery's (subscription, task) line
    (``line`` is an alias of the delivery table) that come before it in event order."""
    return sa.select(column).where(
        line.c.subscription_pk == _DELIVERY.c.subscription_pk,
        line.c.task_pk == _DELIVERY.c.task_pk,
        line.c.event_seq < _DELIVERY.c.event_seq,
        line.c.status == DeliveryStatus.pending.value,
    )


@prebuilt
def _due_deliveries(dialect: str) -> sa.Select[Any]:
    """The claim's pick: due deliveries not held behind an earlier pending event of their task
    for their subscription, oldest due first, leaving out ``exclude`` (being sent here) and
    the subscriptions in ``full`` (no room here)."""
    delivery, earlier = _DELIVERY, _DELIVERY.alias("earlier")
    now = sa.bindparam("now", type_=delivery.c.next_attempt_at.type)
    blocked = _pending_before(earlier, earlier.c.pk).exists()
    return (
        sa.select(delivery.c.pk, delivery.c.subscription_pk)
        .join(_SUBSCRIPTION, _SUBSCRIPTION.c.pk == delivery.c.subscription_pk)
        .where(
            delivery.c.status == DeliveryStatus.pending.value,
            delivery.c.next_attempt_at <= now,
            sa.or_(delivery.c.lease_expires_at.is_(None), delivery.c.lease_expires_at <= now),
            _SUBSCRIPTION.c.enabled.is_(True),
            ~blocked,
            none_of(dialect, delivery.c.pk, "exclude"),
            none_of(dialect, delivery.c.subscription_pk, "full"),
        )
        .order_by(delivery.c.next_attempt_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True, of=delivery)
    )


@prebuilt
def _lease(dialect: str) -> sa.Update:
    return (
        sa.update(_DELIVERY)
        .where(one_of(dialect, _DELIVERY.c.pk, "chosen"))
        .values(lease_owner=sa.bindparam("worker"), lease_expires_at=sa.bindparam("until"))
    )


@prebuilt
def _job_rows(dialect: str) -> sa.Select[Any]:
    """What sending the deliveries ``pks`` needs: subscription, secrets, event."""
    subscription, event = _SUBSCRIPTION, _EVENT
    return (
        sa.select(
            _DELIVERY.c.pk,
            _DELIVERY.c.id,
            subscription.c.pk.label("subscription_pk"),
            subscription.c.kind,
            subscription.c.owner,
            subscription.c.url,
            subscription.c.secret,
            subscription.c.previous_secret,
            subscription.c.previous_secret_expires_at,
            event.c.id.label("event_id"),
            event.c.type,
            event.c.created_at,
            event.c.data,
        )
        .join(subscription, subscription.c.pk == _DELIVERY.c.subscription_pk)
        .join(event, event.c.seq == _DELIVERY.c.event_seq)
        .where(one_of(dialect, _DELIVERY.c.pk, "pks"))
    )


@prebuilt
def _lock_deliveries(dialect: str) -> sa.Select[Any]:
    """The deliveries ``pks`` whose attempts are being recorded, locked in pk order."""
    return (
        sa.select(
            _DELIVERY.c.pk,
            _DELIVERY.c.subscription_pk,
            _DELIVERY.c.task_pk,
            _DELIVERY.c.event_seq,
            _DELIVERY.c.attempts,
            _DELIVERY.c.lease_owner,
            _DELIVERY.c.lease_expires_at,
            _DELIVERY.c.next_attempt_at,
            _DELIVERY.c.status,
            _DELIVERY.c.last_status_code,
            _DELIVERY.c.last_error,
            _DELIVERY.c.delivered_at,
        )
        .where(one_of(dialect, _DELIVERY.c.pk, "pks"))
        .order_by(_DELIVERY.c.pk)
        .with_for_update()
    )


@prebuilt
def _client_secrets(dialect: str) -> sa.Select[Any]:
    """The signing secrets of the API clients ``owners`` (for their notify_url deliveries)."""
    return sa.select(
        _CLIENT_SECRET.c.owner,
        _CLIENT_SECRET.c.secret,
        _CLIENT_SECRET.c.previous_secret,
        _CLIENT_SECRET.c.previous_secret_expires_at,
    ).where(one_of(dialect, _CLIENT_SECRET.c.owner, "owners"))


@prebuilt
def _add_client_secrets(dialect: str) -> sa.Insert:
    """New clients' secrets; a client whose secret another process has just made keeps that
    one (both dialects' ``ON CONFLICT DO NOTHING``)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(_CLIENT_SECRET).on_conflict_do_nothing(index_elements=["owner"])


def _client_secret_rows(
    connection: sa.Connection, owners: Collection[str], now: datetime, written: Written | None
) -> dict[str, Any]:
    """Each client's secret row, made for a client that has none yet. A secret made here
    signs deliveries before the transaction's commit is synced (a claim commits without
    fsync), so ``written`` is told it must be: a secret lost to a power cut, once used and
    perhaps read by its client, would be replaced by another."""
    if not owners:
        return {}
    dialect = connection.dialect.name

    def read() -> dict[str, Any]:
        statement = _client_secrets(connection)
        return {
            row.owner: row
            for row in connection.execute(statement, {"owners": listed(dialect, owners)})
        }

    rows = read()
    missing = sorted(set(owners) - rows.keys())
    if missing:
        connection.execute(
            _add_client_secrets(connection),
            [
                {"owner": owner, "secret": new_webhook_secret(), "created_at": now}
                for owner in missing
            ],
        )
        if written is not None:
            written.must_sync = True
        rows = read()
    return rows


_INSERT_ATTEMPT = sa.insert(_ATTEMPT)
_RECORD = (
    sa.update(_DELIVERY)
    .where(_DELIVERY.c.pk == sa.bindparam("d_pk"))
    .values(
        status=sa.bindparam("b_status"),
        attempts=sa.bindparam("b_attempts"),
        last_status_code=sa.bindparam("b_last_status_code"),
        last_error=sa.bindparam("b_last_error"),
        next_attempt_at=sa.bindparam("b_next_attempt_at"),
        lease_owner=sa.bindparam("b_lease_owner"),
        lease_expires_at=sa.bindparam("b_lease_expires_at"),
        delivered_at=sa.bindparam("b_delivered_at"),
        updated_at=sa.bindparam("b_updated_at"),
    )
)


def _not_leased(table: Any, now: Any) -> sa.ColumnElement[bool]:
    """A delivery no process holds: never leased, or its lease ran out."""
    return sa.or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at <= now)


def _put_off(*conditions: Callable[[Any], sa.ColumnElement[bool]]) -> sa.Update:
    """Put off (to ``due``) the pending deliveries no process holds that match ``conditions``
    (each given the table to test), skipping rows another transaction has locked (SKIP LOCKED):
    a put-off never waits, so it adds no lock to wait for in the dispatcher's or the API's
    transaction (a row skipped only costs claim time: claims never pick what cannot go)."""
    line = _DELIVERY.alias("line")
    rows = (
        sa.select(line.c.pk)
        .where(
            line.c.status == DeliveryStatus.pending.value,
            line.c.next_attempt_at < sa.bindparam("due"),
            _not_leased(line, sa.bindparam("now")),
            *(condition(line) for condition in conditions),
        )
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(_DELIVERY)
        .where(_DELIVERY.c.pk.in_(rows))
        .values(next_attempt_at=sa.bindparam("due"))
    )


# A delivery was scheduled for a retry at ``due``: the later events of its task for its
# subscription cannot go before that, so they are put off until then at once (one walk of
# ix_delivery_subscription_task_seq per line) rather than found by each put-aside.
_PUT_OFF_FOLLOWERS = _put_off(
    lambda line: line.c.subscription_pk == sa.bindparam("s_pk"),
    lambda line: line.c.task_pk == sa.bindparam("t_pk"),
    lambda line: line.c.event_seq > sa.bindparam("seq"),
)
# Subscriptions just disabled: their pending deliveries wait ``DISABLED_PUT_OFF`` (enabling one
# makes them due at once), so the claims and the put-aside stop finding them.
_PUT_OFF_DISABLED = _put_off(
    lambda line: line.c.subscription_pk.in_(sa.bindparam("s_pks", expanding=True))
)


def _keyset(
    table: Any, after: tuple[datetime, int] | None, upto: tuple[datetime, int] | None = None
) -> list[sa.ColumnElement[bool]]:
    """The rows after ``after`` and up to ``upto`` in (next_attempt_at, pk) order (no bound
    for None), as row-value comparisons that bound a range of ix_delivery_status_next_attempt
    (status, next_attempt_at, pk) on both columns: a page starting among many deliveries due
    at the same instant (a subscription enabled again, a replay) starts where the last ended,
    not at the first of them."""
    key = sa.tuple_(table.c.next_attempt_at, table.c.pk)
    due_type = table.c.next_attempt_at.type
    bounds = []
    if after is not None:
        bounds.append(key > sa.tuple_(sa.literal(after[0], due_type), sa.literal(after[1])))
    if upto is not None:
        bounds.append(key <= sa.tuple_(sa.literal(upto[0], due_type), sa.literal(upto[1])))
    return bounds


def _put_off_disabled(connection: Any, subscription_pks: Collection[int], now: datetime) -> None:
    connection.execute(
        _PUT_OFF_DISABLED,
        {"s_pks": sorted(subscription_pks), "due": now + DISABLED_PUT_OFF, "now": now},
    )


class _Sweep(NamedTuple):
    """A put-aside over every due delivery, a page per claim (:meth:`Outbox._sweep_page`):
    the deliveries due by ``until`` (the last window's time when it started: what became due
    later is the windows'), in due order, from just after
    ``after`` (the last one it read, or None). ``periodic``: not a process's first, nor one
    after the clock went back, so what it finds every windowed pass missed."""

    until: datetime
    after: tuple[datetime, int] | None
    periodic: bool


class _PutAside(NamedTuple):
    """A claim's put-aside: the windowed pass's start (None: none this claim) and the sweep's
    page to read (None: no sweep in progress)."""

    since: datetime | None
    sweep: _Sweep | None


# What recording an attempt reads of a delivery, and writes (with its lease's expiry).
_RECORDED_COLUMNS = (
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "next_attempt_at",
    "lease_owner",
    "delivered_at",
)


class Recorded(NamedTuple):
    """A delivery's state after an attempt was recorded."""

    status: str
    attempts: int
    lease_owner: str | None
    last_status_code: int | None
    next_attempt_at: datetime
    # This record dead-lettered it (not one another worker's record made before it).
    dead_lettered: bool = False
    # The other deliveries this record dead-lettered with it: a notify_url's 410 Gone ends
    # every delivery its task was still owed there.
    others_dead_lettered: int = 0


class DeliveryView(NamedTuple):
    """A delivery as the API shows it: with its event's id and which of the client's
    subscribers it went to."""

    delivery: Delivery
    event_id: str
    # The endpoint subscription it went to; None for a task's notify_url, whose
    # subscription the API never exposes.
    subscription_id: str | None

    @property
    def target(self) -> str:
        """Which kind of subscriber it went to: ``endpoint`` or ``notify_url``."""
        return "notify_url" if self.subscription_id is None else "endpoint"

    @classmethod
    def of(cls, delivery: Delivery, event_id: Any, subscription_id: Any, kind: Any) -> DeliveryView:
        endpoint = kind == SubscriptionKind.endpoint.value
        return cls(delivery, str(event_id), str(subscription_id) if endpoint else None)


def fan_out_many(
    connection: sa.Connection,
    events: Sequence[NewEvent],
    now: datetime,
    *,
    first_wait: timedelta = timedelta(0),
) -> int:
    """Inside the events' own transaction: one pending delivery per event and matching
    subscription, with a fixed number of statements whatever the number of events (they come
    in the order they were appended), first due ``first_wait`` from now (the delivery
    schedule's first entry). Returns how many deliveries were created.

    Progress coalescing: a new event of a task supersedes the progress deliveries of that task
    still waiting for their first attempt, for the same subscription. One conditional UPDATE
    per (subscription, task) does it for the rows already stored (a delivery another process
    has just claimed, leased, or tried keeps going, so the order per task cannot be broken by a
    race); within the batch, :func:`plan_deliveries` applies the same rule in memory.
    """
    if not events:
        return 0
    dialect = connection.dialect.name
    owners = {event.owner for event in events}
    task_pks = {event.task_pk for event in events}
    subscriptions = connection.execute(
        _fan_out_subscriptions(connection),
        {"owners": listed(dialect, owners), "task_pks": listed(dialect, task_pks)},
    ).all()
    matches = match_subscriptions(events, subscriptions)
    if not matches:
        return 0
    superseded = [
        row
        for subscription_pk, task_pk in superseded_pairs(matches)
        for row in connection.execute(
            SUPERSEDE, {"s_pk": subscription_pk, "t_pk": task_pk, "superseded_at": now}
        )
    ]
    deliveries = plan_deliveries(matches, superseded, now, first_wait=first_wait)
    INSERT_DELIVERY.execute(connection, deliveries)
    return len(deliveries)


def match_subscriptions(
    events: Sequence[NewEvent], subscriptions: Sequence[Sequence[Any]]
) -> list[tuple[NewEvent, int]]:
    """The deliveries ``events`` owe, as (event, subscription pk) in event order, then
    subscription order. ``subscriptions``: rows of (pk, owner, kind, task_pk, event_types,
    providers), the enabled subscriptions that may match (:func:`_fan_out_subscriptions`)."""
    matches: list[tuple[NewEvent, int]] = []
    for event in events:
        for pk, owner, kind, task_pk, event_types, providers in subscriptions:
            if owner != event.owner:
                continue
            if kind == SubscriptionKind.task.value and task_pk != event.task_pk:
                continue
            if event_types is not None and event.type not in event_types:
                continue
            if providers is not None and event.provider not in providers:
                continue
            matches.append((event, pk))
    return matches


def superseded_pairs(matches: Sequence[tuple[NewEvent, int]]) -> list[tuple[int, int]]:
    """The (subscription pk, task pk) whose waiting progress deliveries :data:`SUPERSEDE`
    coalesces, in a fixed order (two transactions then lock their rows in the same order)."""
    return sorted({(pk, event.task_pk) for event, pk in matches})


def plan_deliveries(
    matches: Sequence[tuple[NewEvent, int]],
    superseded: Iterable[Sequence[Any]],
    now: datetime,
    *,
    first_wait: timedelta = timedelta(0),
) -> list[dict[str, Any]]:
    """The delivery rows for ``matches`` (their events' ``seq`` known), given the rows
    :data:`SUPERSEDE` returned, (subscription pk, task pk, due time) of each progress delivery
    it coalesced. A delivery is first due ``first_wait`` from now (the schedule's wait before
    attempt 1); a new progress delivery takes the earliest due time of those it replaces, else
    waits the longer of ``first_wait`` and ``PROGRESS_DELAY`` (the moment newer ones may
    replace it in: the schedule's wait gives them that time already); within the batch, a
    later event of the same task and subscription coalesces an earlier progress one."""
    first_due = now + first_wait
    progress_due = now + max(first_wait, PROGRESS_DELAY)
    # Per (subscription, task): the due times of progress deliveries still waiting, and the
    # one created in this batch that a later event of the batch would supersede.
    waiting: dict[tuple[int, int], list[datetime]] = {}
    for subscription_pk, task_pk, due in superseded:
        waiting.setdefault((subscription_pk, task_pk), []).append(due)
    latest: dict[tuple[int, int], dict[str, Any]] = {}
    deliveries: list[dict[str, Any]] = []
    for event, subscription_pk in matches:
        key = (subscription_pk, event.task_pk)
        earlier = latest.pop(key, None)
        if earlier is not None and earlier["event_type"] == EventType.progress.value:
            earlier["status"] = DeliveryStatus.coalesced.value
        due = first_due
        if event.type == EventType.progress.value:
            # A progress event takes the slot of the one it replaces, or waits a moment for
            # newer ones to replace it.
            due = min(waiting.pop(key, ()), default=progress_due)
            waiting[key] = [due]
        else:
            waiting.pop(key, None)
        delivery = delivery_row(subscription_pk, event.seq, event.task_pk, event.type, due, now)
        latest[key] = delivery
        deliveries.append(delivery)
    return deliveries


def _signing_secrets(
    secret: str | None, previous: str | None, previous_expires_at: datetime | None, now: datetime
) -> tuple[str, ...]:
    current = (secret,) if secret else ()
    if previous and previous_expires_at and previous_expires_at > now:
        return (*current, previous)
    return current


class Outbox:
    """Subscriptions and deliveries, on the store's engine and transactions."""

    def __init__(self, store: Store, *, schedule: Sequence[float] = DEFAULT_SCHEDULE) -> None:
        self.store = store
        self.schedule = tuple(schedule)
        self._moved_aside_at: datetime | None = None  # the last windowed pass (or sweep start)
        self._sweep: _Sweep | None = None  # in progress
        self._swept_at: datetime | None = None  # when the last sweep started
        # Deliveries that only a periodic sweep found (metrics): due but unable to go, and
        # missed by every windowed pass (committed more than MOVE_ASIDE_OVERLAP after their
        # due time, a clock ahead on another replica, a row locked at the time).
        self.missed_by_window = 0

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.store.clock

    @property
    def first_wait(self) -> timedelta:
        """The wait before a delivery's first attempt (the schedule's first entry): fan-out
        (``Store.delivery_first_wait``, the same) and replays make deliveries due this long
        after their event."""
        return timedelta(seconds=self.schedule[0])

    # --- subscriptions --------------------------------------------------------------------

    def create_subscription(
        self,
        owner: str,
        *,
        url: str,
        event_types: list[str] | None,
        providers: list[str] | None,
        description: str | None,
    ) -> Subscription:
        now = self.clock()
        subscription = Subscription(
            id=new_id("sub"),
            owner=owner,
            kind=SubscriptionKind.endpoint.value,
            url=url,
            event_types=event_types,
            providers=providers,
            description=description,
            secret=new_webhook_secret(),
            enabled=True,
            created_at=now,
            updated_at=now,
        )
        with self.store.transaction(write=True) as session:
            session.add(subscription)
        return subscription

    def list_subscriptions(self, owner: str) -> list[Subscription]:
        statement = (
            select(Subscription)
            .where(
                Subscription.owner == owner,
                Subscription.kind == SubscriptionKind.endpoint.value,
            )
            .order_by(col(Subscription.pk))
        )
        with self.store.transaction(write=False) as session:
            return list(session.exec(statement))

    @staticmethod
    def _owned(
        session: Session, owner: str, subscription_id: str, *, lock: bool = False
    ) -> Subscription:
        """The client's subscription; ``lock``: its row locked until the commit (PostgreSQL;
        FOR NO KEY UPDATE, as a 410's record takes it)."""
        statement = select(Subscription).where(
            Subscription.id == subscription_id,
            Subscription.owner == owner,
            Subscription.kind == SubscriptionKind.endpoint.value,
        )
        if lock:
            statement = statement.with_for_update(key_share=True)
        subscription = session.exec(statement).first() if could_be_issued(subscription_id) else None
        if subscription is None:
            raise NotFound(f"No subscription {subscription_id!r} was found for this API client.")
        return subscription

    def get_subscription(self, owner: str, subscription_id: str) -> Subscription:
        with self.store.transaction(write=False) as session:
            return self._owned(session, owner, subscription_id)

    def update_subscription(
        self, owner: str, subscription_id: str, changes: Mapping[str, Any]
    ) -> Subscription:
        with self.store.transaction(write=True) as session:
            # Locked, so that whether this enables or disables it is decided on the row as it
            # is (a 410 being recorded may be disabling it), and before its deliveries, the
            # order a record takes them in.
            subscription = self._owned(session, owner, subscription_id, lock=True)
            was_enabled = subscription.enabled
            for name, value in changes.items():
                setattr(subscription, name, value)
            now = self.clock()
            # Only a change of state moves deliveries: "enabled": true sent to an enabled
            # subscription would otherwise make every retry due at once, backoff skipped.
            if subscription.enabled and not was_enabled:
                subscription.disabled_reason = None
                # Its deliveries were put off while it was disabled (_move_aside): due now.
                # Locked first, due or not, on PostgreSQL: a claim's put-aside that read the
                # subscription disabled and has not committed yet is waited for, so that the
                # update reads what it put off instead of leaving it put off for an hour.
                if session.connection().dialect.name == "postgresql":
                    session.execute(
                        sa.select(_DELIVERY.c.pk)
                        .where(
                            _DELIVERY.c.subscription_pk == subscription.pk,
                            _DELIVERY.c.status == DeliveryStatus.pending.value,
                        )
                        .order_by(_DELIVERY.c.pk)
                        .with_for_update()
                    ).all()
                session.execute(
                    sa.update(_DELIVERY)
                    .where(
                        _DELIVERY.c.subscription_pk == subscription.pk,
                        _DELIVERY.c.status == DeliveryStatus.pending.value,
                        _DELIVERY.c.next_attempt_at > now,
                    )
                    .values(next_attempt_at=now)
                )
            elif was_enabled and not subscription.enabled:
                subscription.disabled_reason = "disabled through the API"
                assert subscription.pk is not None  # a stored row
                _put_off_disabled(session, [subscription.pk], now)
            subscription.updated_at = now
            session.add(subscription)
            return subscription

    def delete_subscription(self, owner: str, subscription_id: str) -> None:
        with self.store.transaction(write=True) as session:
            session.delete(self._owned(session, owner, subscription_id))

    def rotate_subscription_secret(
        self, owner: str, subscription_id: str, overlap: timedelta
    ) -> Subscription:
        with self.store.transaction(write=True) as session:
            # Locked: two rotations at once take turns, the second keeping the first's new
            # secret as its previous one (else one caller would get a secret never stored).
            subscription = self._owned(session, owner, subscription_id, lock=True)
            now = self.clock()
            _rotate(subscription, now, overlap)
            subscription.updated_at = now
            session.add(subscription)
            return subscription

    def add_task_subscription(self, session: Session, task: Task, url: str) -> None:
        """A task's notify_url, inside the task's creating transaction (before its first
        event is appended, so ``task.submitted`` is delivered too)."""
        assert task.pk is not None
        now = self.clock()
        session.add(
            Subscription(
                id=new_id("sub"),
                owner=task.owner,
                kind=SubscriptionKind.task.value,
                task_pk=task.pk,
                url=url,
                enabled=True,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()

    # --- the client's own secret (notify_url deliveries) ----------------------------------------

    def client_secret(self, owner: str) -> ClientSecret:
        """The client's default signing secret, created on first use."""
        with self.store.transaction(write=True) as session:
            return self._client_secret(session, owner)

    def _client_secret(self, session: Session, owner: str, *, lock: bool = False) -> ClientSecret:
        """``lock``: the row locked until the commit (PostgreSQL), as a rotation needs it."""
        # Made, if need be, as the claim makes it (another process making it at once is fine).
        _client_secret_rows(session.connection(), {owner}, self.clock(), None)
        row = session.get(
            ClientSecret, owner, with_for_update={"key_share": True} if lock else None
        )
        assert row is not None
        return row

    def rotate_client_secret(self, owner: str, overlap: timedelta) -> ClientSecret:
        with self.store.transaction(write=True) as session:
            row = self._client_secret(session, owner, lock=True)  # rotations take turns
            _rotate(row, self.clock(), overlap)
            session.add(row)
            return row

    # --- the dispatcher's queue -------------------------------------------------------------

    def claim(
        self,
        worker: str,
        *,
        limit: int,
        lease_seconds: float,
        exclude: frozenset[int] = frozenset(),
        per_subscription: int | None = None,
        busy: Mapping[int, int] | None = None,
    ) -> list[DeliveryJob]:
        """Lease up to ``limit`` due deliveries: :meth:`record_and_claim` with nothing to
        record."""
        _, jobs = self.record_and_claim(
            (),
            worker,
            limit=limit,
            lease_seconds=lease_seconds,
            exclude=exclude,
            per_subscription=per_subscription,
            busy=busy,
        )
        return jobs

    def record_and_claim(
        self,
        attempts: Sequence[tuple[DeliveryJob, AttemptResult]],
        worker: str,
        *,
        limit: int,
        lease_seconds: float,
        exclude: frozenset[int] = frozenset(),
        per_subscription: int | None = None,
        busy: Mapping[int, int] | None = None,
    ) -> tuple[list[Recorded | NotFound], list[DeliveryJob]]:
        """Record ``attempts`` as :meth:`record_attempts` does, then lease up to ``limit``
        (may be 0) due deliveries, in one transaction: the dispatcher records what finished
        since its last claim with its next one, a write transaction fewer per delivery. The
        records go first, so a delivery settled here lets its task's next event be claimed
        by the same transaction; they take the same locks in the same order as
        :meth:`record_attempts`, and the claim only locks what it can (SKIP LOCKED).

        A delivery is due only once every earlier event of its task has been settled for its
        subscription (order per task). With ``per_subscription``, a subscription takes at most
        that many less what this process is already sending to it (``busy``): a busy
        subscriber's backlog is neither leased for nothing nor in the way of the others'.

        The dispatcher's hot path, so Core SQL: one query picks, one UPDATE leases, one query
        loads what the chosen deliveries need (and one more for notify_url signing secrets)."""
        busy = busy or {}

        def room(pk: int) -> int:
            return limit if per_subscription is None else per_subscription - busy.get(pk, 0)

        full = [pk for pk in busy if room(pk) <= 0]
        # Without fsync on SQLite: a lease or a record lost to a power cut only means a
        # delivery is sent again (at-least-once); the next callback batch's commit syncs it.
        with self.store.core_transaction(fsync=False) as (connection, written):
            recorded = self._record(connection, attempts, worker) if attempts else []
            if limit <= 0:
                return recorded, []
            now = self.clock()
            since, sweep = put_aside = self._put_aside_plan(now)
            if since is not None:
                self._move_aside(connection, now, since)
            swept = self._sweep_pages(connection, now, sweep) if sweep is not None else None
            chosen: list[int] = []
            taken: dict[int, int] = {}
            dialect = connection.dialect.name
            due = connection.execute(
                _due_deliveries(connection),
                {
                    "now": now,
                    "exclude": listed(dialect, sorted(exclude)),
                    "full": listed(dialect, full),
                    # Room per subscription is applied below: look a little further than limit.
                    "limit": limit if per_subscription is None else limit + CLAIM_LOOKAHEAD,
                },
            )
            for pk, subscription_pk in due:
                if len(chosen) == limit:
                    break
                if taken.get(subscription_pk, 0) >= room(subscription_pk):
                    continue
                taken[subscription_pk] = taken.get(subscription_pk, 0) + 1
                chosen.append(pk)
            jobs: list[DeliveryJob] = []
            if chosen:
                connection.execute(
                    _lease(connection),
                    {
                        "chosen": listed(dialect, chosen),
                        "worker": worker,
                        "until": now + timedelta(seconds=lease_seconds),
                    },
                )
                jobs = self._jobs(connection, chosen, now, written)
        self._put_aside_done(now, put_aside, swept)  # committed: the next starts from here
        return recorded, jobs

    def _put_aside_plan(self, now: datetime) -> _PutAside:
        """What this claim puts aside of what cannot go. A windowed pass every
        ``MOVE_ASIDE_EVERY``, from the last one that committed less ``MOVE_ASIDE_OVERLAP``;
        and a sweep over every due delivery: whole in a process's first claim and when the
        clock went back (a window would skip), and every ``MOVE_ASIDE_FULL_EVERY``
        (``periodic``) a page per claim until it is through (:meth:`_sweep_pages`)."""
        last, sweep = self._moved_aside_at, self._sweep
        if last is None or now < last:
            return _PutAside(None, _Sweep(now, None, periodic=False))
        swept_at = self._swept_at
        if sweep is None and swept_at is not None and now - swept_at >= MOVE_ASIDE_FULL_EVERY:
            # Up to the last window's time: what became due since is the next window's, so
            # what the sweep finds every window missed (the metric).
            sweep = _Sweep(last, None, periodic=True)
        since = last - MOVE_ASIDE_OVERLAP if now - last >= MOVE_ASIDE_EVERY else None
        return _PutAside(since, sweep)

    def _put_aside_done(
        self, now: datetime, done: _PutAside, swept: tuple[int, tuple[datetime, int] | None] | None
    ) -> None:
        """Note a committed put-aside: where the next window starts, and where the sweep
        goes on (``swept``: what its page moved, and the last delivery it read, or None once
        it is through)."""
        since, sweep = done
        if since is not None or self._moved_aside_at is None or now < self._moved_aside_at:
            self._moved_aside_at = now
        if sweep is None or swept is None:
            return
        moved, last_read = swept
        if sweep.after is None:
            self._swept_at = now  # started
        if sweep.periodic:  # what it moved, every window since the last sweep missed
            self.missed_by_window += moved
        self._sweep = None if last_read is None else sweep._replace(after=last_read)

    @classmethod
    def _sweep_pages(
        cls, connection: sa.Connection, now: datetime, sweep: _Sweep
    ) -> tuple[int, tuple[datetime, int] | None]:
        """A periodic sweep's next page (:meth:`_sweep_page`); a process's first sweep (or one
        after the clock went back) whole, in one pass over the due deliveries in this claim:
        the claims after it then find the backlog a process inherits moved, instead of reading
        past what is left of it until the pages get there (at a million tasks, a first sweep
        in pages cost each of its 34 claims more than the pass costs once, and all of them
        three times as much). Returns how many were put aside, and the last delivery read
        (None: the sweep is through)."""
        if sweep.periodic:
            return cls._sweep_page(connection, now, sweep)
        return cls._move_aside(connection, now), None

    @classmethod
    def _sweep_page(
        cls, connection: sa.Connection, now: datetime, sweep: _Sweep, size: int | None = None
    ) -> tuple[int, tuple[datetime, int] | None]:
        """One page of ``sweep``: the next ``size`` (``MOVE_ASIDE_PAGE``) pending deliveries due by
        ``sweep.until``, in (due time, pk) order after ``sweep.after`` (a range of
        ix_delivery_status_next_attempt), and of them, those that cannot go put aside as
        :meth:`_move_aside` does. Returns how many were put aside, and the last delivery read
        (None: the sweep is through). A delivery put aside, sent or made due later meanwhile
        leaves the range or is read where it now stands; one made due earlier than the page
        is left to the windows and the next sweep, as a late commit is."""
        size = MOVE_ASIDE_PAGE if size is None else size
        delivery = _DELIVERY
        page = connection.execute(
            sa.select(delivery.c.next_attempt_at, delivery.c.pk)
            .where(
                delivery.c.status == DeliveryStatus.pending.value,
                delivery.c.next_attempt_at <= sweep.until,
                *_keyset(delivery, sweep.after),
            )
            .order_by(delivery.c.next_attempt_at, delivery.c.pk)
            .limit(size)
        ).all()
        if not page:
            return 0, None
        last = (page[-1][0], page[-1][1])
        moved = cls._move_aside(connection, now, span=(sweep.after, last))
        return moved, None if len(page) < size else last

    @staticmethod
    def _move_aside(
        connection: sa.Connection,
        now: datetime,
        since: datetime | None = None,
        span: tuple[tuple[datetime, int] | None, tuple[datetime, int]] | None = None,
    ) -> int:
        """Put off the deliveries that are due but cannot go, so that claims stop reading them:
        those held behind an earlier event of their task that waits for a retry (until that
        retry: they cannot go before it), and those of a disabled subscription (for
        ``DISABLED_PUT_OFF``; enabling it again makes them due at once). Without this, a flaky
        or disabled subscriber's backlog was read by every claim, which grew with it.

        With ``since``, only the deliveries that became due after it are read (a range of
        ix_delivery_status_next_attempt): what was due before was looked at by an earlier pass,
        and what becomes unable to go later is put off where that happens (a retry scheduled,
        a subscription disabled: see ``_record`` and ``update_subscription``). So a pass costs
        what became due since the last one, not the whole due queue; the claims still sweep
        through every due delivery now and then (``MOVE_ASIDE_FULL_EVERY``, the ``span`` of a
        page per claim: :meth:`_sweep_page`), for rows committed later than
        ``MOVE_ASIDE_OVERLAP`` after their due time. Missing a row costs only claim time: the
        claims never pick a delivery that cannot go.

        Rows another process holds are skipped (SKIP LOCKED); a held delivery put off until
        its head's retry while another process settled the head early is late, never out of
        order. Returns how many deliveries were put off."""
        delivery, head = _DELIVERY, _DELIVERY.alias("head")
        # The head of the delivery's (subscription, task) line: its earliest pending event.
        # ORDER BY event_seq LIMIT 1 walks ix_delivery_subscription_task_seq; min() of the due
        # times let SQLite walk the whole queue index instead (40 s a pass on a 1M store).
        head_due = (
            _pending_before(head, head.c.next_attempt_at)
            .order_by(head.c.event_seq)
            .limit(1)
            .scalar_subquery()
        )
        disabled = _SUBSCRIPTION.c.enabled.is_(False)
        due = [delivery.c.next_attempt_at <= now]
        if since is not None:
            due.append(delivery.c.next_attempt_at > since)
        if span is not None:  # a sweep's page: after where the last ended, up to its own end
            due += _keyset(delivery, *span)
        rows = connection.execute(
            sa.select(delivery.c.pk, _SUBSCRIPTION.c.enabled, head_due.label("head_due"))
            .join(_SUBSCRIPTION, _SUBSCRIPTION.c.pk == delivery.c.subscription_pk)
            .where(
                delivery.c.status == DeliveryStatus.pending.value,
                *due,
                _not_leased(delivery, now),
                sa.or_(disabled, head_due > now),
            )
            .with_for_update(skip_locked=True, of=delivery)
        ).all()
        if rows:
            connection.execute(
                sa.update(_DELIVERY)
                .where(_DELIVERY.c.pk == sa.bindparam("d_pk"))
                .values(next_attempt_at=sa.bindparam("due")),
                [
                    {"d_pk": pk, "due": due if enabled else now + DISABLED_PUT_OFF}
                    for pk, enabled, due in sorted(rows)
                ],
            )
        return len(rows)

    def _jobs(
        self, connection: sa.Connection, pks: Sequence[int], now: datetime, written: Written
    ) -> list[DeliveryJob]:
        """What the dispatcher needs to send each delivery, in the order of ``pks``."""
        rows = {
            row.pk: row
            for row in connection.execute(
                _job_rows(connection), {"pks": listed(connection.dialect.name, pks)}
            )
        }
        # notify_url deliveries are signed with their client's secret.
        owners = {row.owner for row in rows.values() if row.kind == SubscriptionKind.task.value}
        client_secrets = _client_secret_rows(connection, owners, now, written)
        jobs = []
        for pk in pks:
            row = rows[pk]
            if row.kind == SubscriptionKind.task.value:
                own = client_secrets[row.owner]
                secrets = _signing_secrets(
                    own.secret, own.previous_secret, own.previous_secret_expires_at, now
                )
            else:
                secrets = _signing_secrets(
                    row.secret, row.previous_secret, row.previous_secret_expires_at, now
                )
            body = {
                "id": row.event_id,
                "type": row.type,
                "timestamp": isoformat(row.created_at),
                "data": row.data,
            }
            jobs.append(
                DeliveryJob(
                    delivery_pk=pk,
                    delivery_id=row.id,
                    subscription_pk=row.subscription_pk,
                    url=row.url,
                    signing_secrets=secrets,
                    event_id=row.event_id,
                    body=json.dumps(body, separators=(",", ":")).encode("utf-8"),
                    task_id=str(row.data.get("id", "")),
                    provider=str(row.data.get("provider", "")),
                )
            )
        return jobs

    def record_attempt(self, job: DeliveryJob, worker: str, result: AttemptResult) -> Recorded:
        """Log one attempt; then succeeded, scheduled again, or dead-lettered. A 410 Gone
        disables the subscription."""
        (recorded,) = self.record_attempts([(job, result)], worker)
        if isinstance(recorded, NotFound):
            raise recorded
        return recorded

    def record_attempts(
        self, attempts: Sequence[tuple[DeliveryJob, AttemptResult]], worker: str
    ) -> list[Recorded | NotFound]:
        """:meth:`record_attempt` for many attempts in one transaction (the dispatcher
        records what finished meanwhile together), in Core SQL: one locking read, one INSERT of
        the attempts, one UPDATE per delivery (sent as one batch); NotFound for a delivery whose
        subscription was deleted while it was being sent."""
        with self.store.core_transaction(fsync=False) as (connection, _):  # as in a claim
            return self._record(connection, attempts, worker)

    def _record(
        self,
        connection: sa.Connection,
        attempts: Sequence[tuple[DeliveryJob, AttemptResult]],
        worker: str,
    ) -> list[Recorded | NotFound]:
        """:meth:`record_attempts` inside the caller's transaction."""
        pks = sorted({job.delivery_pk for job, _ in attempts})
        # A 410 Gone disables its subscription: its row is locked before any delivery's, the
        # order the API's updates and deletes of a subscription take (no deadlock with them).
        gone = {job.subscription_pk for job, result in attempts if result.status_code == 410}
        if gone:
            connection.execute(
                sa.select(_SUBSCRIPTION.c.pk)
                .where(_SUBSCRIPTION.c.pk.in_(sorted(gone)))
                .order_by(_SUBSCRIPTION.c.pk)
                .with_for_update(key_share=True)
            ).all()
        current = {
            row.pk: row
            for row in connection.execute(
                _lock_deliveries(connection), {"pks": listed(connection.dialect.name, pks)}
            )
        }
        now = self.clock()
        recorded: list[Recorded | NotFound] = []
        states: dict[int, dict[str, Any]] = {}  # each delivery's columns, as recorded so far
        updates: dict[int, dict[str, Any]] = {}
        logged: list[dict[str, Any]] = []
        retries: dict[int, dict[str, Any]] = {}  # pending again, due later: hold their followers
        for job, result in attempts:
            row = current.get(job.delivery_pk)
            if row is None:
                recorded.append(NotFound(f"Delivery {job.delivery_id} no longer exists."))
                continue
            result = _storable(result)
            before = states.get(row.pk) or {name: row._mapping[name] for name in _RECORDED_COLUMNS}
            taken_over = (
                before["lease_owner"] not in (None, worker)
                and row.lease_expires_at is not None
                and row.lease_expires_at > now
            )
            values = self._settle(before, worker, result, now, taken_over=taken_over)
            states[row.pk] = values
            dead = DeliveryStatus.dead.value
            state = Recorded(
                values["status"],
                values["attempts"],
                values["lease_owner"],
                values["last_status_code"],
                values["next_attempt_at"],
                dead_lettered=values["status"] == dead != before["status"],
            )
            lease = row.lease_expires_at if state.lease_owner is not None else None
            updates[row.pk] = {
                "d_pk": row.pk,
                **{f"b_{name}": value for name, value in values.items()},
                "b_lease_expires_at": lease,
                "b_updated_at": now,
            }
            # A retry scheduled holds the task's later events (unless another worker holds
            # the delivery now: its own record decides).
            held = state.lease_owner is not None and lease is not None and lease > now
            retry = state.status == DeliveryStatus.pending.value and not held
            if retry and state.next_attempt_at > now:
                retries[row.pk] = {
                    "s_pk": row.subscription_pk,
                    "t_pk": row.task_pk,
                    "seq": row.event_seq,
                    "due": state.next_attempt_at,
                    "now": now,
                }
            else:
                retries.pop(row.pk, None)
            if result.sent:
                logged.append(
                    {
                        "delivery_pk": row.pk,
                        # When it began: a batch records attempts that ended at
                        # different times, and an attempt can last up to its deadline.
                        "attempted_at": result.started_at or now,
                        "status_code": result.status_code,
                        "duration_ms": result.duration_ms,
                        "response_body": result.response_body,
                        "error": result.error,
                    }
                )
            recorded.append(state)
        if logged:
            connection.execute(_INSERT_ATTEMPT, logged)
        if updates:
            connection.execute(_RECORD, [updates[pk] for pk in sorted(updates)])
        if gone:
            connection.execute(
                sa.update(_SUBSCRIPTION)
                .where(_SUBSCRIPTION.c.pk.in_(sorted(gone)))
                .values(
                    enabled=False,
                    disabled_reason="the subscriber answered 410 Gone",
                    updated_at=now,
                )
            )
            # A task's notify_url cannot be enabled again: the rest of what it was owed
            # is dead-lettered now rather than put off for ever.
            notify_urls = sa.select(_SUBSCRIPTION.c.pk).where(
                _SUBSCRIPTION.c.pk.in_(sorted(gone)),
                _SUBSCRIPTION.c.kind == SubscriptionKind.task.value,
            )
            ended = Counter(
                connection.execute(
                    sa.update(_DELIVERY)
                    .where(
                        _DELIVERY.c.subscription_pk.in_(notify_urls.scalar_subquery()),
                        _DELIVERY.c.status == DeliveryStatus.pending.value,
                    )
                    .values(
                        status=DeliveryStatus.dead.value,
                        last_error="The notify_url answered 410 Gone: not sent.",
                        updated_at=now,
                    )
                    .returning(_DELIVERY.c.subscription_pk)
                ).scalars()
            )
            # Counted once, with the first record of each subscription's 410.
            for index, (job, _) in enumerate(attempts):
                outcome = recorded[index]
                if isinstance(outcome, Recorded) and ended[job.subscription_pk]:
                    recorded[index] = outcome._replace(
                        others_dead_lettered=ended.pop(job.subscription_pk)
                    )
            _put_off_disabled(connection, gone, now)
        if retries:  # last: the statements above may wait on locks, these never do
            lines = sorted(retries.values(), key=lambda r: (r["s_pk"], r["t_pk"], r["seq"]))
            connection.execute(_PUT_OFF_FOLLOWERS, lines)
        return recorded

    def _settle(
        self,
        before: Mapping[str, Any],
        worker: str,
        result: AttemptResult,
        now: datetime,
        *,
        taken_over: bool = False,
    ) -> dict[str, Any]:
        """A delivery's columns (``before``: :data:`_RECORDED_COLUMNS`) after one more attempt;
        this worker's lease on it, if it still has one, given back. ``taken_over``: another
        worker holds a live lease on it (it took the delivery over when this one's ran out)."""
        owner = None if before["lease_owner"] == worker else before["lease_owner"]
        if not result.sent:
            # Not an attempt: put back, due again shortly, unless it has been settled, or
            # taken over (its lease ran out: the other worker's record decides) meanwhile.
            values = {**before, "lease_owner": owner}
            if before["status"] == DeliveryStatus.pending.value and owner is None:
                values["next_attempt_at"] = now + UNSENT_PUT_BACK
            return values
        if taken_over and not result.succeeded and before["status"] == DeliveryStatus.pending.value:
            # The worker that took it over is sending it now, and its record decides: this
            # late failure joins the log, but neither schedules a retry nor uses one up (the
            # delivery would be dead-lettered an attempt early).
            return {**before, "lease_owner": before["lease_owner"]}
        attempts = before["attempts"] + 1
        status = before["status"]
        if status == DeliveryStatus.succeeded.value or (
            status == DeliveryStatus.dead.value and not result.succeeded
        ):
            # Settled by another worker's record meanwhile (it took the delivery over when this
            # worker's lease ran out): this attempt joins the log, and the outcome stands. A
            # failure turning it pending again would send it twice, and after the task's later
            # events. Only a success changes a dead letter: the subscriber has the event.
            return {**before, "attempts": attempts, "lease_owner": owner}
        status, due, error = DeliveryStatus.pending.value, before["next_attempt_at"], result.error
        delivered_at = None
        if result.succeeded:
            status, delivered_at = DeliveryStatus.succeeded.value, now
        elif result.status_code == 410:
            status = DeliveryStatus.dead.value
            error = "The subscriber answered 410 Gone: subscription disabled."
        elif attempts < len(self.schedule):
            due = now + timedelta(seconds=self.schedule[attempts])
        else:
            status = DeliveryStatus.dead.value
        return {
            "status": status,
            "attempts": attempts,
            "last_status_code": result.status_code,
            "last_error": error,
            "next_attempt_at": due,
            "lease_owner": owner,
            "delivered_at": delivered_at,
        }

    def extend_leases(self, delivery_pks: Sequence[int], worker: str, lease_seconds: float) -> None:
        """Keep holding deliveries that are still being sent (those this worker still owns)."""
        if not delivery_pks:
            return
        statement = (
            sa.update(_DELIVERY)
            .where(_DELIVERY.c.pk.in_(sorted(delivery_pks)), _DELIVERY.c.lease_owner == worker)
            .values(lease_expires_at=self.clock() + timedelta(seconds=lease_seconds))
        )
        with self.store.transaction(write=True) as session:
            session.execute(statement)

    def release(self, worker: str) -> int:
        statement = (
            sa.update(Delivery)
            .where(col(Delivery.lease_owner) == worker)
            .values(lease_owner=None, lease_expires_at=None)
        )
        with self.store.transaction(write=True) as session:
            return int(session.execute(statement).rowcount or 0)  # type: ignore[attr-defined]

    # --- inspecting and steering deliveries ---------------------------------------------------

    def list_deliveries(
        self,
        owner: str,
        subscription_id: str,
        *,
        status: str | None,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[DeliveryView], str | None]:
        with self.store.transaction(write=False) as session:
            subscription = self._owned(session, owner, subscription_id)
            statement = (
                select(Delivery, TaskEvent.id)
                .join(TaskEvent, col(TaskEvent.seq) == col(Delivery.event_seq))
                .where(Delivery.subscription_pk == subscription.pk)
            )
            if status:
                statement = statement.where(Delivery.status == status)
            if cursor:
                statement = statement.where(col(Delivery.pk) < decode_cursor(cursor))
            statement = statement.order_by(col(Delivery.pk).desc()).limit(limit + 1)
            rows = [
                DeliveryView(delivery, str(event_id), subscription.id)
                for delivery, event_id in session.exec(statement)
            ]
        return paged(rows, limit, lambda row: row.delivery.pk)

    def list_task_deliveries(
        self,
        owner: str,
        task_id: str,
        *,
        status: str | None,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[DeliveryView], str | None]:
        """Every delivery of the client's task's events, to any of its subscribers (the
        task's notify_url and the client's endpoints), newest first: the only way to find a
        notify_url's deliveries, whose subscription is not exposed.

        Read from the task's events (``ix_task_event_task_seq``) to their deliveries
        (``ix_delivery_event_seq``, the index retention's cascade uses): no index on
        ``delivery`` leads with ``task_pk``, and a task owes at most its events times its
        subscribers, so sorting them for the page costs little. The status filter is an
        expression no index can take (``status || ''``), so it filters those rows instead of
        steering the plan: given ``status = ?``, SQLite's planner (it has no statistics)
        read ``ix_delivery_status_next_attempt`` instead, every pending (or delivered)
        delivery of the store (130 ms rather than 0.2 for ``succeeded`` among 725,000
        deliveries), and PostgreSQL's did too on small tables (with statistics, it plans
        the same either way). SQLAlchemy renders no INDEXED BY for SQLite. The
        subscription's owner is checked as ``_owned_delivery`` checks it, so every delivery
        listed can be fetched and retried by its id."""
        with self.store.transaction(write=False) as session:
            task = self.store.owned(session, owner, task_id)  # 404 as GET /v1/tasks/{id}
            statement = (
                select(Delivery, TaskEvent.id, Subscription.id, Subscription.kind)
                .join(TaskEvent, col(TaskEvent.seq) == col(Delivery.event_seq))
                .join(Subscription, col(Subscription.pk) == col(Delivery.subscription_pk))
                .where(TaskEvent.task_pk == task.pk, Subscription.owner == owner)
            )
            if status:  # not an index term (above)
                statement = statement.where(col(Delivery.status).concat("") == status)
            if cursor:
                statement = statement.where(col(Delivery.pk) < decode_cursor(cursor))
            statement = statement.order_by(col(Delivery.pk).desc()).limit(limit + 1)
            rows = [DeliveryView.of(*row) for row in session.exec(statement)]
        return paged(rows, limit, lambda row: row.delivery.pk)

    def _owned_delivery(self, session: Session, owner: str, delivery_id: str) -> DeliveryView:
        """The client's delivery with its event's id and subscriber; a 404 when it is not
        the client's, or retention has deleted it (its event goes first)."""
        statement = (
            select(Delivery, TaskEvent.id, Subscription.id, Subscription.kind)
            .join(TaskEvent, col(TaskEvent.seq) == col(Delivery.event_seq))
            .join(Subscription, col(Subscription.pk) == col(Delivery.subscription_pk))
            .where(Delivery.id == delivery_id, Subscription.owner == owner)
        )
        row = session.exec(statement).first() if could_be_issued(delivery_id) else None
        if row is None:
            raise NotFound(f"No delivery {delivery_id!r} was found for this API client.")
        return DeliveryView.of(*row)

    def get_delivery(
        self, owner: str, delivery_id: str
    ) -> tuple[DeliveryView, list[DeliveryAttempt]]:
        with self.store.transaction(write=False) as session:
            view = self._owned_delivery(session, owner, delivery_id)
            attempts = list(
                session.exec(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_pk == view.delivery.pk)
                    .order_by(col(DeliveryAttempt.pk))
                )
            )
            return view, attempts

    def retry_delivery(self, owner: str, delivery_id: str) -> DeliveryView:
        """Send a delivery again now, with a fresh schedule of attempts. Conflict while it is
        being attempted (leased, the lease running), or its subscription is disabled."""
        with self.store.transaction(write=True) as session:
            view = self._owned_delivery(session, owner, delivery_id)
            delivery = view.delivery
            connection = session.connection()
            now = self.clock()
            if connection.dialect.name == "postgresql":
                # This delivery and the rest of its line, locked together in key order (the
                # order the dispatcher and a retention sweep lock them in): a sweep deleting
                # them meanwhile waits, or has already deleted this one. The whole line, due
                # or not: a claim's put-aside not yet committed (its rows look due) is waited
                # for, so the update below reads what it put off and brings it along.
                locked = connection.execute(
                    sa.select(_DELIVERY.c.pk)
                    .where(sa.or_(_DELIVERY.c.pk == delivery.pk, _later_in_line(delivery)))
                    .order_by(_DELIVERY.c.pk)
                    .with_for_update()
                ).scalars()
                if delivery.pk not in set(locked):
                    raise NotFound(f"No delivery {delivery_id!r} was found for this API client.")
                session.refresh(delivery)  # as it is now, under the lock
            subscription = session.get(Subscription, delivery.subscription_pk)
            if subscription is not None and not subscription.enabled:
                # As a replay: pending, it would only be put off until the subscription is
                # enabled, and a notify_url, disabled by a 410, never is.
                if subscription.kind == SubscriptionKind.task.value:
                    raise Conflict(
                        "The task's notify_url answered 410 Gone and is disabled for good; "
                        "nothing more is sent to it."
                    )
                raise Conflict(
                    "The subscription is disabled; enable it (PATCH enabled=true) before "
                    "retrying its deliveries."
                )
            if delivery.status == DeliveryStatus.coalesced.value:
                raise Conflict(
                    "This delivery was coalesced: a later event of the same task took its "
                    "place and carries the task as it is since. Sent again now, this older "
                    "event would follow the newer one; retry the later event's delivery "
                    "instead (GET /v1/tasks/{id}/deliveries lists a task's deliveries)."
                )
            expires = delivery.lease_expires_at
            leased = delivery.lease_owner is not None and expires is not None and expires > now
            if delivery.status == DeliveryStatus.pending.value and leased:
                raise Conflict(
                    "This delivery is being attempted right now; retry it once that attempt "
                    "is recorded (GET the delivery to see it)."
                )
            if not leased:  # a lease that ran out holds nothing: the next claim takes it
                delivery.lease_owner = delivery.lease_expires_at = None
            delivery.status = DeliveryStatus.pending.value
            delivery.attempts = 0
            delivery.next_attempt_at = now
            delivery.updated_at = now
            session.add(delivery)
            # The task's later events held behind this one were put off until its next retry
            # (_move_aside); it goes now, so they may follow it at once.
            session.execute(
                sa.update(_DELIVERY).where(_followers(delivery, now)).values(next_attempt_at=now)
            )
            return view

    def replay(
        self, owner: str, subscription_id: str, *, since: datetime, until: datetime | None
    ) -> int:
        """Owe the subscription every matching event of the client's tasks since ``since``
        again (same event ids, so receivers can deduplicate)."""
        with self.store.transaction(write=True) as session:
            # Locked (PostgreSQL), so that replays of one subscription take turns: each sees
            # what the one before it owed (below).
            subscription = self._owned(session, owner, subscription_id, lock=True)
            if not subscription.enabled:
                raise Conflict(
                    "The subscription is disabled; enable it (PATCH enabled=true) before replaying."
                )
            statement = (
                select(TaskEvent)
                .join(Task, col(Task.pk) == col(TaskEvent.task_pk))
                .where(Task.owner == owner, col(TaskEvent.created_at) >= since)
            )
            if until is not None:
                statement = statement.where(col(TaskEvent.created_at) < until)
            # The subscription's filters in the query, so that the cap counts only the
            # events it matches (a filter on a rare type replays a busy period in one call).
            if subscription.event_types is not None:
                statement = statement.where(col(TaskEvent.type).in_(subscription.event_types))
            if subscription.providers is not None:
                statement = statement.where(col(Task.provider).in_(subscription.providers))
            statement = statement.order_by(col(TaskEvent.seq)).limit(MAX_REPLAY + 1)
            owed = list(session.exec(statement))
            if len(owed) > MAX_REPLAY:
                raise ValidationFailed(
                    f"More than {MAX_REPLAY} events match; replay a shorter time range "
                    "(use until).",
                    details=[{"field": "until", "message": "time range too large"}],
                )
            now = self.clock()
            assert subscription.pk is not None
            connection = session.connection()
            dialect = connection.dialect.name
            if owed and dialect == "postgresql":
                # The events owed, held until the commit (a retention sweep deleting their
                # task waits for it), so each new delivery's foreign key finds its event; one
                # deleted since the read above is left out.
                present = set(
                    connection.execute(
                        sa.select(_EVENT.c.seq)
                        .where(one_of(dialect, _EVENT.c.seq, "seqs"))
                        .order_by(_EVENT.c.seq)
                        .with_for_update(key_share=True),
                        {"seqs": listed(dialect, [event.seq for event in owed])},
                    ).scalars()
                )
                owed = [event for event in owed if event.seq in present]
            if owed:
                # An event the subscription is still owed goes on its own schedule: a second
                # delivery of it would be sent beside the first, both at once.
                pending = set(
                    connection.execute(
                        sa.select(_DELIVERY.c.event_seq).where(
                            _DELIVERY.c.subscription_pk == subscription.pk,
                            _DELIVERY.c.status == DeliveryStatus.pending.value,
                            one_of(dialect, _DELIVERY.c.event_seq, "seqs"),
                        ),
                        {"seqs": listed(dialect, [event.seq for event in owed])},
                    ).scalars()
                )
                owed = [event for event in owed if event.seq not in pending]
            for event in owed:
                session.add(new_delivery(subscription.pk, event, now + self.first_wait, now))
            return len(owed)
