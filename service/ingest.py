"""Applying provider updates in bulk: the hot path of callback ingestion, in Core SQL.

:func:`apply_updates` applies a batch of updates (callbacks, answers to status queries, submit
replies) in one transaction, with a handful of statements whatever the batch's size:

1. lock the batch's tasks in id order (two replicas locking overlapping batches cannot deadlock);
2. run each update through the state machine in arrival order, in memory, so two updates of one
   task in one batch see each other exactly as if they had come one after the other;
3. write each changed task once, append the events, keep the receipts, and owe subscribers
   their deliveries (:func:`service.outbox.fan_out_many`), all before the one commit.

A failure the state machine finds (an unknown task, an update that contradicts the task) fails
only its own item; the rest of the batch commits. A database error fails the whole batch: the
caller (:class:`service.groupcommit.GroupCommitter`) then applies the items one at a time, so
only the offending item fails. The ORM is left out on purpose: building, tracking and flushing
ORM objects cost about 1.5 ms of CPU per update, most of a callback's cost.

On PostgreSQL the same statements go out in psycopg's pipeline mode (:func:`_apply_pipelined`):
two round trips per batch instead of one per statement.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa

from service.db import Driven, DriverSQL, ManyRows, driver_errors, listed, one_of, prebuilt
from service.errors import BadRequest, Conflict, NotFound, TaskRelayError
from service.lifecycle import TaskUpdate, decide
from service.models import (
    CallbackReceipt,
    ReceiptOutcome,
    Task,
    TaskEvent,
    TaskRow,
    UpdateSource,
)
from service.outbox import (
    INSERT_DELIVERY,
    SUBSCRIPTIONS_OF_TASKS,
    SUPERSEDE,
    NewEvent,
    fan_out_many,
    match_subscriptions,
    plan_deliveries,
    superseded_pairs,
)
from service.schemas import task_json
from service.store import (
    CLAIM_LOCKS,
    PG_HOLDERS,
    PROVIDER_TASK_ID_CHARS,
    ApplyResult,
    ReceiptDraft,
    Store,
    Written,
    claim_keys,
    event_row,
    holders_of,
    provider_task_holders,
    task_state,
    transition,
)

TASK = Task.__table__  # type: ignore[attr-defined]
EVENT = TaskEvent.__table__  # type: ignore[attr-defined]
RECEIPT = CallbackReceipt.__table__  # type: ignore[attr-defined]


_ATTRIBUTES = [f.name for f in fields(TaskRow)]
_COLUMNS = [TASK.c["metadata" if name == "meta" else name] for name in _ATTRIBUTES]
# What an update can change; one UPDATE statement (executemany) writes them for every task.
_WRITTEN = (
    "status",
    "progress",
    "images",
    "error",
    "provider_task_id",
    "raw_status",
    "updated_at",
    "last_update_source",
    "progress_at",
    "completed_at",
    "expected_at",
    "deadline_at",
    "next_check_at",
    "planned_check_at",
    "lease_owner",
    "lease_expires_at",
)
_WRITTEN_KEYS = ("_pk", *(f"_{name}" for name in _WRITTEN))
_written_values = operator.attrgetter("pk", *_WRITTEN)
_UPDATE_TASK = ManyRows(
    sa.update(TASK)
    .where(TASK.c.pk == sa.bindparam("_pk"))
    .values({name: sa.bindparam(f"_{name}") for name in _WRITTEN})
)
_INSERT_EVENT = sa.insert(EVENT).returning(EVENT.c.seq, sort_by_parameter_order=True)
# Every column but the key (Store.receipt_row's).
_INSERT_RECEIPT = ManyRows(
    sa.insert(RECEIPT)
    .values({column.name: sa.bindparam(column.name) for column in RECEIPT.c if column.name != "pk"})
    .inline()
)


def _locked_tasks(dialect: str) -> sa.Select[Any]:
    """The batch's tasks, locked in id order (``ids``: :func:`service.db.listed`)."""
    return (
        sa.select(*_COLUMNS)
        .where(one_of(dialect, TASK.c.id, "ids"))
        .order_by(TASK.c.id)
        .with_for_update()
    )


_lock_tasks = prebuilt(_locked_tasks)


def _receipt_counts(dialect: str) -> sa.Select[Any]:
    """How many callback receipts each of the batch's tasks keeps (``ids``: their ids; a
    task with none is not listed), for :meth:`Store.within_receipt_cap`."""
    return (
        sa.select(RECEIPT.c.task_pk, sa.func.count())
        .select_from(RECEIPT.join(TASK, TASK.c.pk == RECEIPT.c.task_pk))
        .where(one_of(dialect, TASK.c.id, "ids"))
        .group_by(RECEIPT.c.task_pk)
    )


_count_receipts = prebuilt(_receipt_counts)
_PG_RECEIPT_COUNTS = DriverSQL(_receipt_counts("postgresql"))
_PG_CLAIM_LOCKS = DriverSQL(CLAIM_LOCKS)
_PG_HOLDERS = DriverSQL(PG_HOLDERS)
# Where a provider task id comes from a client, not from the provider's answer to TaskRelay:
# a callback (anyone with the task's callback URL, its client first) or the API.
_CLAIMED_BY_A_CLIENT = (UpdateSource.callback, UpdateSource.api)
# PostgreSQL's pipeline (_apply_pipelined): the same statements on the driver's connection.
_PG_LOCK = DriverSQL(_locked_tasks("postgresql"))
_PG_SUBSCRIPTIONS = DriverSQL(SUBSCRIPTIONS_OF_TASKS)
_PG_INSERT_EVENT = DriverSQL(
    sa.insert(EVENT)
    .values({column.name: sa.bindparam(column.name) for column in EVENT.c if column.name != "seq"})
    .returning(EVENT.c.seq)
)
_PG_SUPERSEDE = DriverSQL(SUPERSEDE)


@dataclass(frozen=True)
class UpdateRequest:
    """One update to apply: what was observed, where from, and the callback body if any."""

    task_id: str
    update: TaskUpdate
    source: UpdateSource
    receipt: ReceiptDraft | None = None


@dataclass
class _Decided:
    """What a batch's updates do, worked out in memory from the locked tasks: one result or
    error per request, and the rows to write."""

    results: list[ApplyResult | TaskRelayError]
    touched: dict[str, TaskRow]  # changed tasks by id, each written once
    events: list[dict[str, Any]]  # task_event rows (``event_row``), seq not yet known
    new_events: list[NewEvent]  # the same events for fan-out, seq 0 until inserted
    receipts: list[dict[str, Any]]

    def task_values(self) -> list[dict[str, Any]]:
        """:data:`_UPDATE_TASK`'s parameters for every changed task."""
        return [
            dict(zip(_WRITTEN_KEYS, _written_values(task), strict=True))
            for task in self.touched.values()
        ]

    def numbered(self, seqs: Sequence[int]) -> list[NewEvent]:
        """The events with the seqs their inserts returned, in order."""
        return [event._replace(seq=seq) for event, seq in zip(self.new_events, seqs, strict=True)]

    def renumbered(
        self, matches: Sequence[tuple[NewEvent, int]], seqs: Sequence[int]
    ) -> list[tuple[NewEvent, int]]:
        """``matches`` of :attr:`new_events` (match_subscriptions), each event with the seq
        its insert returned: the same pairs in the same order, without matching again."""
        numbered = dict(zip(map(id, self.new_events), self.numbered(seqs), strict=True))
        return [(numbered[id(event)], pk) for event, pk in matches]


def apply_updates(
    store: Store,
    connection: sa.Connection,
    written: Written,
    requests: Sequence[UpdateRequest],
    *,
    pipelined: bool | None = None,
) -> list[ApplyResult | TaskRelayError]:
    """Apply ``requests`` inside ``connection``'s write transaction (the caller commits, and
    tells the listeners what ``written`` notes). Returns one result per request, in order: its
    :class:`ApplyResult`, or the error for that item. On PostgreSQL this commits itself, in
    pipeline mode (:func:`_apply_pipelined`); ``pipelined=False`` runs the statements one by
    one there too (the tests and ``bench/writer.py`` compare the two)."""
    if pipelined is None:
        # Pipeline mode needs libpq 14 or later (psycopg[binary] brings its own).
        pipelined = connection.dialect.name == "postgresql" and psycopg.Pipeline.is_supported()
    if pipelined:
        return _apply_pipelined(store, connection, written, requests)
    ids = {"ids": listed(connection.dialect.name, sorted({r.task_id for r in requests}))}
    rows = connection.execute(_lock_tasks(connection), ids)
    now = store.clock()

    tasks = {row[1]: TaskRow(*row) for row in rows}
    holders = provider_task_holders(connection, _claims(requests, tasks))
    decided = _decide(store, requests, tasks, now, holders)
    if decided.touched:
        _UPDATE_TASK.execute(connection, decided.task_values())
    if decided.events:
        seqs = connection.execute(_INSERT_EVENT, decided.events).scalars().all()
        first_wait = store.delivery_first_wait
        if fan_out_many(connection, decided.numbered(seqs), now, first_wait=first_wait):
            written.deliveries = True
        written.events.update(event.task_id for event in decided.new_events)
    if decided.receipts:
        known, unknown = _receipt_counts_known(store, requests, tasks)
        if unknown:
            wanted = {"ids": listed(connection.dialect.name, unknown)}
            counted = connection.execute(_count_receipts(connection), wanted)
            known.update((int(task_pk), int(count)) for task_pk, count in counted)
        kept = store.within_receipt_cap(decided.receipts, known, _ids_by_pk(tasks))
        _INSERT_RECEIPT.execute(connection, kept)
    return decided.results


def _ids_by_pk(tasks: Mapping[str, TaskRow]) -> dict[int, str]:
    return {task.pk: task.id for task in tasks.values() if task.pk is not None}


def _receipt_counts_known(
    store: Store, requests: Sequence[UpdateRequest], tasks: Mapping[str, TaskRow] | None = None
) -> tuple[dict[int, int], list[str]]:
    """The receipt counts this process knows of the tasks the batch keeps receipts for, by
    task pk (with ``tasks``, the batch's locked tasks), and the ids of those to count."""
    ids = sorted({request.task_id for request in requests if request.receipt is not None})
    known = store.receipt_counts_known(ids)
    unknown = [task_id for task_id in ids if task_id not in known]
    by_pk = {}
    if tasks is not None:
        by_pk = {
            pk: known[task_id]
            for task_id, task in tasks.items()
            if task_id in known and (pk := task.pk) is not None
        }
    return by_pk, unknown


def _apply_pipelined(
    store: Store, connection: sa.Connection, written: Written, requests: Sequence[UpdateRequest]
) -> list[ApplyResult | TaskRelayError]:
    """PostgreSQL: :func:`apply_updates` in psycopg's pipeline mode, where the client sends
    statements without waiting for each one's answer. Through SQLAlchemy, each statement is a
    round trip of its own (BEGIN and COMMIT too), with SQLAlchemy's execution layers around it.
    Here a batch is two round trips after the pool's ping, three when subscriptions are owed
    deliveries; ``bench/writer.py`` compares the two paths (the pipeline takes 0.7-0.9 of the
    time where deliveries are owed, and saves little without, on a loopback connection):

    1. the lock on the tasks, and the subscriptions that may match their events (and, when
       callbacks name their tasks' provider ids for the first time, a round trip more: the
       claims' locks and their holders, :func:`_pg_holders`);
    2. (after the state machine has run in memory) the tasks' writes, the events (their seqs
       returned), the receipts, and the COMMIT; when deliveries are owed, the coalescing
       UPDATEs instead of the COMMIT;
    3. the deliveries, and the COMMIT.

    The statements and values are the other path's, compiled once (:class:`DriverSQL`);
    errors are SQLAlchemy's, as for any statement (:func:`service.db.driver_errors`), and the
    caller's commit finds nothing left to do."""
    dialect = connection.dialect
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    ids = {"ids": sorted({request.task_id for request in requests})}
    lock, subscriptions_of = _PG_LOCK.on(dialect), _PG_SUBSCRIPTIONS.on(dialect)
    with driver_errors(connection, "a callback batch (pipeline)"), _pipeline(driver):
        tasks_cursor, subscriptions_cursor = driver.cursor(), driver.cursor()
        tasks_cursor.execute(lock.sql, lock.params(ids))
        subscriptions_cursor.execute(subscriptions_of.sql, subscriptions_of.params(ids))
        counts_cursor = None
        _, unknown = _receipt_counts_known(store, requests)
        if unknown:
            counts = _PG_RECEIPT_COUNTS.on(dialect)
            counts_cursor = driver.cursor()
            counts_cursor.execute(counts.sql, counts.params({"ids": unknown}))
        rows = tasks_cursor.fetchall()  # round trip 1
        subscriptions = [subscriptions_of.row(row) for row in subscriptions_cursor.fetchall()]
        counted = {} if counts_cursor is None else dict(counts_cursor.fetchall())
        now = store.clock()
        tasks = {row[1]: TaskRow(*lock.row(row)) for row in rows}
        holders = _pg_holders(driver, dialect, requests, tasks)  # a round trip, if any
        decided = _decide(store, requests, tasks, now, holders)
        _executemany(driver, _UPDATE_TASK.driven.on(dialect), decided.task_values())
        events_cursor = _executemany(driver, _PG_INSERT_EVENT.on(dialect), decided.events)
        matches = match_subscriptions(decided.new_events, subscriptions)
        supersede = _PG_SUPERSEDE.on(dialect)
        superseding = []
        for subscription_pk, task_pk in superseded_pairs(matches):
            cursor = driver.cursor()
            values = {"s_pk": subscription_pk, "t_pk": task_pk, "superseded_at": now}
            cursor.execute(supersede.sql, supersede.params(values))
            superseding.append(cursor)
        held, _ = _receipt_counts_known(store, requests, tasks)
        kept = store.within_receipt_cap(decided.receipts, held | counted, _ids_by_pk(tasks))
        _executemany(driver, _INSERT_RECEIPT.driven.on(dialect), kept)
        if matches:
            assert events_cursor is not None
            seqs = _returned(events_cursor)  # round trip 2
            superseded = [supersede.row(row) for cursor in superseding for row in cursor]
            deliveries = plan_deliveries(
                decided.renumbered(matches, seqs),
                superseded,
                now,
                first_wait=store.delivery_first_wait,
            )
            _executemany(driver, INSERT_DELIVERY.driven.on(dialect), deliveries)
            written.deliveries = True
        driver.commit()  # round trip 2, or 3
    written.events.update(event.task_id for event in decided.new_events)
    return decided.results


@contextmanager
def _pipeline(driver: psycopg.Connection[Any]) -> Iterator[None]:
    """psycopg's pipeline mode on ``driver``; a connection an error leaves stuck in it is
    closed. When the server goes away mid-batch, leaving pipeline mode can fail with results
    still owed: libpq then stays in pipeline mode and refuses every later query, the
    rollback and the pool's reset included, though the connection is not yet seen as broken
    (found by ``test_batches_survive_connections_killed_at_random``). Closed, it is a lost
    connection, which SQLAlchemy invalidates (:func:`service.db.driver_errors`)."""
    try:
        with driver.pipeline():
            yield
    except psycopg.Error:
        if driver.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
            driver.close()
        raise


def _pg_holders(
    driver: psycopg.Connection[Any],
    dialect: sa.Dialect,
    requests: Sequence[UpdateRequest],
    tasks: Mapping[str, TaskRow],
) -> dict[tuple[str, str], set[str]]:
    """:func:`service.store.provider_task_holders` in the pipeline: rare (callbacks naming
    their task's provider id for the first time), a round trip of its own for the batch."""
    keys = _claims(requests, tasks)
    if not keys:
        return {}
    locks, read = _PG_CLAIM_LOCKS.on(dialect), _PG_HOLDERS.on(dialect)
    driver.cursor().execute(locks.sql, locks.params({"keys": claim_keys(keys)}))
    cursor = driver.cursor()
    values = {
        "providers": list({provider for provider, _ in keys}),
        "provider_task_ids": list({task_id for _, task_id in keys}),
    }
    cursor.execute(read.sql, read.params(values))
    return holders_of((read.row(row) for row in cursor.fetchall()), keys)


def _executemany(
    driver: psycopg.Connection[Any], statement: Driven, rows: Sequence[Mapping[str, Any]]
) -> psycopg.Cursor[Any] | None:
    """Queue ``statement`` once per row (pipeline mode: nothing waits); the cursor holds what
    each returns, one result set per row."""
    if not rows:
        return None
    cursor = driver.cursor()
    cursor.executemany(
        statement.sql, [statement.params(row) for row in rows], returning=statement.returns
    )
    return cursor


def _another_clients(provider: str, provider_task_id: str) -> Conflict:
    """A client-supplied provider task id that another API client's task holds: TaskRelay
    asks providers with its own keys, whoever asks, so taking it would hand that client's
    results to this one (as tracking it or setting it by PATCH would)."""
    return Conflict(
        f"Provider task {provider_task_id!r} at {provider} belongs to another API client of "
        "this TaskRelay: a task may follow only a provider task of its own client. Nothing "
        "was changed.",
        code="tracked_by_another_client",
    )


def _returned(cursor: psycopg.Cursor[Any]) -> list[Any]:
    """The one value each statement of an ``executemany(..., returning=True)`` returned."""
    values = []
    while True:
        row = cursor.fetchone()
        assert row is not None
        values.append(row[0])
        if not cursor.nextset():
            return values


def _claim(request: UpdateRequest, task: TaskRow) -> tuple[str, str] | None:
    """The provider task ``request`` would give ``task`` from a client-supplied source (a
    callback, the API), checked against the other clients' tasks first: (provider, its task
    id), or None. A task holds one provider task for good; one the task holds already, or an
    id too long to store (refused for that), is none."""
    new_id = request.update.provider_task_id
    if (
        new_id
        and task.provider_task_id is None
        and request.source in _CLAIMED_BY_A_CLIENT
        and len(new_id) <= PROVIDER_TASK_ID_CHARS
    ):
        return (task.provider, new_id)
    return None


def _claims(
    requests: Sequence[UpdateRequest], tasks: Mapping[str, TaskRow]
) -> set[tuple[str, str]]:
    """Every provider task the batch's requests may give to a task (:func:`_claim`), as the
    batch begins: its tasks' holders are read, and their claims locked, before it runs."""
    keys = set()
    for request in requests:
        task = tasks.get(request.task_id)
        key = _claim(request, task) if task is not None else None
        if key is not None:
            keys.add(key)
    return keys


def _decide(
    store: Store,
    requests: Sequence[UpdateRequest],
    tasks: Mapping[str, TaskRow],
    now: datetime,
    holders: Mapping[tuple[str, str], set[str]],
) -> _Decided:
    """Run each request through the state machine, in arrival order, on ``tasks`` (the
    batch's locked tasks by id, changed in place). ``holders``: the API clients whose tasks
    hold each provider task the batch's requests would give to a task (:func:`_claims`)."""
    decided = _Decided([], {}, [], [], [])
    results, receipts = decided.results, decided.receipts
    claimed: dict[tuple[str, str], str] = {}  # provider tasks given to a task in this batch
    for request in requests:
        task = tasks.get(request.task_id)
        if task is None:
            results.append(NotFound(f"No task {request.task_id!r} exists."))
            continue
        assert task.pk is not None
        update, receipt = request.update, request.receipt
        if update.provider_task_id and len(update.provider_task_id) > PROVIDER_TASK_ID_CHARS:
            too_long = BadRequest(
                f"The provider task id is longer than {PROVIDER_TASK_ID_CHARS} characters.",
                code="provider_task_id_too_long",
            )
            if receipt is not None:  # kept for audit, as every refused callback body is
                rejected = ReceiptOutcome.rejected
                receipts.append(store.receipt_row(task.pk, receipt, rejected, too_long.message))
            results.append(too_long)
            continue
        try:
            key = _claim(request, task)
            if key is not None:
                # holders[key]: read for every claim the batch may make (_claims), or this
                # fails the batch rather than give an id nobody checked.
                if claimed.get(key, task.owner) != task.owner or holders[key] - {task.owner}:
                    raise _another_clients(*key)
                claimed[key] = task.owner
            change = decide(task_state(task), update)
        except Conflict as exc:
            if receipt is not None:
                rejected = ReceiptOutcome.rejected
                receipts.append(store.receipt_row(task.pk, receipt, rejected, exc.message))
            results.append(exc)
            continue
        outcome, changed = transition(task, change, request.source, update, now)
        if changed:
            store.plan(task, now)
            decided.touched[task.id] = task
        event = None
        if change is not None and change.event_type is not None:
            row = event_row(task, change.event_type, request.source.value)
            decided.events.append(row)
            snapshot = row["data"]
            event = {"id": row["id"], "type": row["type"]}
            decided.new_events.append(
                NewEvent(0, task.pk, task.id, task.owner, task.provider, event["type"])
            )
        else:
            snapshot = task_json(task)
        if receipt is not None:
            receipts.append(store.receipt_row(task.pk, receipt, outcome, receipt.error))
        results.append(ApplyResult(snapshot, outcome, event))
    return decided
