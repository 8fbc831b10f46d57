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

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from service.db import one_of
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
from service.store import Store, could_be_issued, decode_cursor, encode_cursor, new_id

PROGRESS_DELAY = timedelta(seconds=1)
# How many rows past its limit a claim looks at, to fill its slots from subscribers with room.
CLAIM_LOOKAHEAD = 64
MAX_REPLAY = 10_000
RESPONSE_BODY_CAP = 2048
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


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    duration_ms: float
    response_body: str | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


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


def _matches(subscription: Subscription, event_type: str, provider: str) -> bool:
    if subscription.event_types is not None and event_type not in subscription.event_types:
        return False
    return subscription.providers is None or provider in subscription.providers


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


def fan_out_many(connection: sa.Connection, events: Sequence[NewEvent], now: datetime) -> int:
    """Inside the events' own transaction: one pending delivery per event and matching
    subscription, with a fixed number of statements whatever the number of events (they come
    in the order they were appended). Returns how many deliveries were created.

    Progress coalescing: a new event of a task supersedes the progress deliveries of that task
    still waiting for their first attempt, for the same subscription. One conditional UPDATE
    does it for the rows already stored (a delivery another process has just claimed, leased,
    or tried keeps going, so the order per task cannot be broken by a race); within the batch,
    the same rule is applied in memory, event by event.
    """
    if not events:
        return 0
    owners = {event.owner for event in events}
    task_pks = {event.task_pk for event in events}
    rows = connection.execute(
        sa.select(
            _SUBSCRIPTION.c.pk,
            _SUBSCRIPTION.c.owner,
            _SUBSCRIPTION.c.kind,
            _SUBSCRIPTION.c.task_pk,
            _SUBSCRIPTION.c.event_types,
            _SUBSCRIPTION.c.providers,
        )
        .where(
            _SUBSCRIPTION.c.enabled.is_(True),
            # Each branch on its own index: the clients' endpoints, and these tasks' notify_url
            # subscriptions (a task subscription's owner is its task's owner). Asking for every
            # subscription of the clients would read every notify_url they ever had.
            sa.or_(
                sa.and_(
                    one_of(connection.dialect, _SUBSCRIPTION.c.owner, "owners", owners),
                    _SUBSCRIPTION.c.kind == SubscriptionKind.endpoint.value,
                ),
                one_of(connection.dialect, _SUBSCRIPTION.c.task_pk, "task_pks", task_pks),
            ),
        )
        .order_by(_SUBSCRIPTION.c.pk)
    ).all()
    if not rows:
        return 0
    matches: list[tuple[NewEvent, int]] = []
    for event in events:
        for pk, owner, kind, task_pk, event_types, providers in rows:
            if owner != event.owner:
                continue
            if kind == SubscriptionKind.task.value and task_pk != event.task_pk:
                continue
            if event_types is not None and event.type not in event_types:
                continue
            if providers is not None and event.provider not in providers:
                continue
            matches.append((event, pk))
    if not matches:
        return 0
    pairs = {(pk, event.task_pk) for event, pk in matches}
    # One UPDATE per (subscription, task), each on ix_delivery_subscription_task_seq: a row-value
    # IN list over both columns is not an index lookup on SQLite (it read every pending delivery).
    supersede = (
        sa.update(_DELIVERY)
        .where(
            _DELIVERY.c.subscription_pk == sa.bindparam("s_pk"),
            _DELIVERY.c.task_pk == sa.bindparam("t_pk"),
            _DELIVERY.c.status == DeliveryStatus.pending.value,
            _DELIVERY.c.event_type == EventType.progress.value,
            _DELIVERY.c.attempts == 0,
            _DELIVERY.c.lease_owner.is_(None),
        )
        .values(status=DeliveryStatus.coalesced.value, updated_at=now)
        .returning(_DELIVERY.c.subscription_pk, _DELIVERY.c.task_pk, _DELIVERY.c.next_attempt_at)
    )
    superseded = [
        row
        for subscription_pk, task_pk in sorted(pairs)
        for row in connection.execute(supersede, {"s_pk": subscription_pk, "t_pk": task_pk})
    ]
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
        due = now
        if event.type == EventType.progress.value:
            # A progress event takes the slot of the one it replaces, or waits a moment for
            # newer ones to replace it.
            due = min(waiting.pop(key, ()), default=now + PROGRESS_DELAY)
            waiting[key] = [due]
        else:
            waiting.pop(key, None)
        delivery = delivery_row(subscription_pk, event.seq, event.task_pk, event.type, due, now)
        latest[key] = delivery
        deliveries.append(delivery)
    connection.execute(sa.insert(_DELIVERY), deliveries)
    return len(deliveries)


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

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.store.clock

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
    def _owned(session: Session, owner: str, subscription_id: str) -> Subscription:
        statement = select(Subscription).where(
            Subscription.id == subscription_id,
            Subscription.owner == owner,
            Subscription.kind == SubscriptionKind.endpoint.value,
        )
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
            subscription = self._owned(session, owner, subscription_id)
            for name, value in changes.items():
                setattr(subscription, name, value)
            if changes.get("enabled") is True:
                subscription.disabled_reason = None
            elif changes.get("enabled") is False:
                subscription.disabled_reason = "disabled through the API"
            subscription.updated_at = self.clock()
            session.add(subscription)
            return subscription

    def delete_subscription(self, owner: str, subscription_id: str) -> None:
        with self.store.transaction(write=True) as session:
            session.delete(self._owned(session, owner, subscription_id))

    def rotate_subscription_secret(
        self, owner: str, subscription_id: str, overlap: timedelta
    ) -> Subscription:
        with self.store.transaction(write=True) as session:
            subscription = self._owned(session, owner, subscription_id)
            now = self.clock()
            subscription.previous_secret = subscription.secret
            subscription.previous_secret_expires_at = now + overlap
            subscription.secret = new_webhook_secret()
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

    def _client_secret(self, session: Session, owner: str) -> ClientSecret:
        row = session.get(ClientSecret, owner)
        if row is None:
            row = ClientSecret(owner=owner, secret=new_webhook_secret(), created_at=self.clock())
            session.add(row)
            session.flush()
        return row

    def rotate_client_secret(self, owner: str, overlap: timedelta) -> ClientSecret:
        with self.store.transaction(write=True) as session:
            row = self._client_secret(session, owner)
            now = self.clock()
            row.previous_secret = row.secret
            row.previous_secret_expires_at = now + overlap
            row.secret = new_webhook_secret()
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
        """Lease up to ``limit`` due deliveries. A delivery is due only once every earlier
        event of its task has been settled for its subscription (order per task). With
        ``per_subscription``, a subscription takes at most that many less what this process is
        already sending to it (``busy``): a busy subscriber's backlog is neither leased for
        nothing nor in the way of the others'."""
        busy = busy or {}

        def room(pk: int) -> int:
            return limit if per_subscription is None else per_subscription - busy.get(pk, 0)

        now = self.clock()
        earlier = aliased(Delivery)
        blocked = (
            select(earlier.pk)
            .where(
                earlier.subscription_pk == Delivery.subscription_pk,
                earlier.task_pk == Delivery.task_pk,
                earlier.event_seq < Delivery.event_seq,
                earlier.status == DeliveryStatus.pending.value,
            )
            .exists()
        )
        full = [pk for pk in busy if room(pk) <= 0]
        statement = (
            select(Delivery)
            .join(Subscription, col(Subscription.pk) == col(Delivery.subscription_pk))
            .where(
                Delivery.status == DeliveryStatus.pending.value,
                col(Delivery.next_attempt_at) <= now,
                sa.or_(
                    col(Delivery.lease_expires_at).is_(None),
                    col(Delivery.lease_expires_at) <= now,
                ),
                col(Subscription.enabled).is_(True),
                ~blocked,
            )
            .where(col(Delivery.pk).not_in(exclude) if exclude else sa.true())
            .where(col(Delivery.subscription_pk).not_in(full) if full else sa.true())
            .order_by(col(Delivery.next_attempt_at))
            # Room per subscription is applied below: look a little further than ``limit``.
            .limit(limit if per_subscription is None else limit + CLAIM_LOOKAHEAD)
            .with_for_update(skip_locked=True, of=Delivery)
        )
        with self.store.transaction(write=True) as session:
            chosen: list[Delivery] = []
            taken: dict[int, int] = {}
            for delivery in session.exec(statement):
                if len(chosen) == limit:
                    break
                pk = delivery.subscription_pk
                if taken.get(pk, 0) >= room(pk):
                    continue
                taken[pk] = taken.get(pk, 0) + 1
                chosen.append(delivery)
            expires = now + timedelta(seconds=lease_seconds)
            for delivery in chosen:
                delivery.lease_owner = worker
                delivery.lease_expires_at = expires
                session.add(delivery)
            return self._jobs(session, chosen, now)

    def _jobs(
        self, session: Session, deliveries: Sequence[Delivery], now: datetime
    ) -> list[DeliveryJob]:
        """What the dispatcher needs to send each delivery, with one query per table."""
        if not deliveries:
            return []
        subscription_pks = {d.subscription_pk for d in deliveries}
        subscriptions = {
            s.pk: s
            for s in session.exec(
                select(Subscription).where(col(Subscription.pk).in_(subscription_pks))
            )
        }
        seqs = {d.event_seq for d in deliveries}
        events = {
            e.seq: e for e in session.exec(select(TaskEvent).where(col(TaskEvent.seq).in_(seqs)))
        }
        jobs = []
        for delivery in deliveries:
            subscription = subscriptions[delivery.subscription_pk]
            event = events[delivery.event_seq]
            assert subscription.pk is not None and delivery.pk is not None
            if subscription.kind == SubscriptionKind.task.value:
                owner_secret = self._client_secret(session, subscription.owner)
                secrets = _signing_secrets(
                    owner_secret.secret,
                    owner_secret.previous_secret,
                    owner_secret.previous_secret_expires_at,
                    now,
                )
            else:
                secrets = _signing_secrets(
                    subscription.secret,
                    subscription.previous_secret,
                    subscription.previous_secret_expires_at,
                    now,
                )
            jobs.append(
                DeliveryJob(
                    delivery_pk=delivery.pk,
                    delivery_id=delivery.id,
                    subscription_pk=subscription.pk,
                    url=subscription.url,
                    signing_secrets=secrets,
                    event_id=event.id,
                    body=envelope_bytes(event),
                )
            )
        return jobs

    def record_attempt(self, job: DeliveryJob, worker: str, result: AttemptResult) -> Delivery:
        """Log one attempt; then succeeded, scheduled again, or dead-lettered. A 410 Gone
        disables the subscription."""
        (recorded,) = self.record_attempts([(job, result)], worker)
        if isinstance(recorded, NotFound):
            raise recorded
        return recorded

    def record_attempts(
        self, attempts: Sequence[tuple[DeliveryJob, AttemptResult]], worker: str
    ) -> list[Delivery | NotFound]:
        """:meth:`record_attempt` for many attempts in one transaction (the dispatcher
        records what finished meanwhile together); NotFound for a delivery whose subscription
        was deleted while it was being sent."""
        with self.store.transaction(write=True) as session:
            pks = sorted({job.delivery_pk for job, _ in attempts})
            rows = session.exec(
                select(Delivery)
                .where(col(Delivery.pk).in_(pks))
                .order_by(col(Delivery.pk))
                .with_for_update()
            )
            deliveries = {delivery.pk: delivery for delivery in rows}
            now = self.clock()
            recorded: list[Delivery | NotFound] = []
            for job, result in attempts:
                delivery = deliveries.get(job.delivery_pk)
                if delivery is None:
                    recorded.append(NotFound(f"Delivery {job.delivery_id} no longer exists."))
                else:
                    recorded.append(self._record(session, delivery, job, worker, result, now))
            return recorded

    def _record(
        self,
        session: Session,
        delivery: Delivery,
        job: DeliveryJob,
        worker: str,
        result: AttemptResult,
        now: datetime,
    ) -> Delivery:
        session.add(
            DeliveryAttempt(
                delivery_pk=job.delivery_pk,
                attempted_at=now,
                status_code=result.status_code,
                duration_ms=result.duration_ms,
                response_body=(result.response_body or "")[:RESPONSE_BODY_CAP] or None,
                error=result.error,
            )
        )
        delivery.attempts += 1
        delivery.last_status_code = result.status_code
        delivery.last_error = result.error
        delivery.updated_at = now
        if delivery.lease_owner == worker:
            delivery.lease_owner = None
            delivery.lease_expires_at = None
        if result.succeeded:
            delivery.status = DeliveryStatus.succeeded.value
            delivery.delivered_at = now
        elif result.status_code == 410:
            delivery.status = DeliveryStatus.dead.value
            delivery.last_error = "The subscriber answered 410 Gone: subscription disabled."
            subscription = session.get(Subscription, delivery.subscription_pk)
            if subscription is not None:
                subscription.enabled = False
                subscription.disabled_reason = "the subscriber answered 410 Gone"
                subscription.updated_at = now
                session.add(subscription)
        elif delivery.attempts < len(self.schedule):
            wait = self.schedule[delivery.attempts]
            delivery.next_attempt_at = now + timedelta(seconds=wait)
        else:
            delivery.status = DeliveryStatus.dead.value
        session.add(delivery)
        return delivery

    def extend_lease(self, delivery_pk: int, worker: str, lease_seconds: float) -> None:
        """Keep holding a delivery that is still being sent."""
        statement = (
            sa.update(Delivery)
            .where(col(Delivery.pk) == delivery_pk, col(Delivery.lease_owner) == worker)
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
    ) -> tuple[list[tuple[Delivery, str]], str | None]:
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
            rows = [(delivery, str(event_id)) for delivery, event_id in session.exec(statement)]
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1][0].pk
            assert last is not None
            next_cursor = encode_cursor(last)
        return rows, next_cursor

    def _owned_delivery(self, session: Session, owner: str, delivery_id: str) -> Delivery:
        row = (
            session.exec(
                select(Delivery)
                .join(Subscription, col(Subscription.pk) == col(Delivery.subscription_pk))
                .where(Delivery.id == delivery_id, Subscription.owner == owner)
            ).first()
            if could_be_issued(delivery_id)
            else None
        )
        if row is None:
            raise NotFound(f"No delivery {delivery_id!r} was found for this API client.")
        return row

    def get_delivery(
        self, owner: str, delivery_id: str
    ) -> tuple[Delivery, str, list[DeliveryAttempt]]:
        with self.store.transaction(write=False) as session:
            delivery = self._owned_delivery(session, owner, delivery_id)
            event = session.get(TaskEvent, delivery.event_seq)
            attempts = list(
                session.exec(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_pk == delivery.pk)
                    .order_by(col(DeliveryAttempt.pk))
                )
            )
            assert event is not None
            return delivery, event.id, attempts

    def retry_delivery(self, owner: str, delivery_id: str) -> Delivery:
        """Send a delivery again now, with a fresh schedule of attempts."""
        with self.store.transaction(write=True) as session:
            delivery = self._owned_delivery(session, owner, delivery_id)
            if delivery.status == DeliveryStatus.pending.value and delivery.lease_owner:
                raise Conflict("This delivery is being attempted right now.")
            now = self.clock()
            delivery.status = DeliveryStatus.pending.value
            delivery.attempts = 0
            delivery.next_attempt_at = now
            delivery.updated_at = now
            session.add(delivery)
            return delivery

    def replay(
        self, owner: str, subscription_id: str, *, since: datetime, until: datetime | None
    ) -> int:
        """Owe the subscription every matching event of the client's tasks since ``since``
        again (same event ids, so receivers can deduplicate)."""
        with self.store.transaction(write=True) as session:
            subscription = self._owned(session, owner, subscription_id)
            if not subscription.enabled:
                raise Conflict(
                    "The subscription is disabled; enable it (PATCH enabled=true) before replaying."
                )
            statement = (
                select(TaskEvent, Task.provider)
                .join(Task, col(Task.pk) == col(TaskEvent.task_pk))
                .where(Task.owner == owner, col(TaskEvent.created_at) >= since)
            )
            if until is not None:
                statement = statement.where(col(TaskEvent.created_at) < until)
            statement = statement.order_by(col(TaskEvent.seq)).limit(MAX_REPLAY + 1)
            rows = list(session.exec(statement))
            if len(rows) > MAX_REPLAY:
                raise ValidationFailed(
                    f"More than {MAX_REPLAY} events match; replay a shorter time range "
                    "(use until).",
                    details=[{"field": "until", "message": "time range too large"}],
                )
            now = self.clock()
            assert subscription.pk is not None
            count = 0
            for event, provider in rows:
                if not _matches(subscription, event.type, provider):
                    continue
                session.add(new_delivery(subscription.pk, event, now, now))
                count += 1
            return count
