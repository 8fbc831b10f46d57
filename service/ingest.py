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
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from service.db import ManyRows, listed, one_of, prebuilt
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
from service.outbox import NewEvent, fan_out_many
from service.schemas import task_json
from service.store import (
    PROVIDER_TASK_ID_CHARS,
    ApplyResult,
    ReceiptDraft,
    Store,
    Written,
    event_row,
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


@prebuilt
def _lock_tasks(dialect: str) -> sa.Select[Any]:
    """The batch's tasks, locked in id order (``ids``: :func:`service.db.listed`)."""
    return (
        sa.select(*_COLUMNS)
        .where(one_of(dialect, TASK.c.id, "ids"))
        .order_by(TASK.c.id)
        .with_for_update()
    )


@dataclass(frozen=True)
class UpdateRequest:
    """One update to apply: what was observed, where from, and the callback body if any."""

    task_id: str
    update: TaskUpdate
    source: UpdateSource
    receipt: ReceiptDraft | None = None


def apply_updates(
    store: Store, connection: sa.Connection, written: Written, requests: Sequence[UpdateRequest]
) -> list[ApplyResult | TaskRelayError]:
    """Apply ``requests`` inside ``connection``'s write transaction (the caller commits, and
    tells the listeners what ``written`` notes). Returns one result per request, in order: its
    :class:`ApplyResult`, or the error for that item."""
    ids = sorted({request.task_id for request in requests})
    rows = connection.execute(
        _lock_tasks(connection), {"ids": listed(connection.dialect.name, ids)}
    )
    tasks = {row[1]: TaskRow(*row) for row in rows}
    now = store.clock()
    results: list[ApplyResult | TaskRelayError] = []
    touched: dict[str, TaskRow] = {}
    events: list[dict[str, Any]] = []
    new_events: list[NewEvent] = []
    receipts: list[dict[str, Any]] = []

    for request in requests:
        task = tasks.get(request.task_id)
        if task is None:
            results.append(NotFound(f"No task {request.task_id!r} exists."))
            continue
        assert task.pk is not None
        update, receipt = request.update, request.receipt
        if update.provider_task_id and len(update.provider_task_id) > PROVIDER_TASK_ID_CHARS:
            results.append(
                BadRequest(
                    f"The provider task id is longer than {PROVIDER_TASK_ID_CHARS} characters.",
                    code="provider_task_id_too_long",
                )
            )
            continue
        try:
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
            touched[task.id] = task
        event = None
        if change is not None and change.event_type is not None:
            row = event_row(task, change.event_type, request.source.value)
            events.append(row)
            snapshot = row["data"]
            event = {"id": row["id"], "type": row["type"]}
            new_events.append(
                NewEvent(0, task.pk, task.id, task.owner, task.provider, event["type"])
            )
        else:
            snapshot = task_json(task)
        if receipt is not None:
            receipts.append(store.receipt_row(task.pk, receipt, outcome, receipt.error))
        results.append(ApplyResult(snapshot, outcome, event))

    if touched:
        _UPDATE_TASK.execute(
            connection,
            [
                dict(zip(_WRITTEN_KEYS, _written_values(task), strict=True))
                for task in touched.values()
            ],
        )
    if events:
        seqs = connection.execute(_INSERT_EVENT, events).scalars().all()
        new_events = [event._replace(seq=seq) for event, seq in zip(new_events, seqs, strict=True)]
        if fan_out_many(connection, new_events, now):
            written.deliveries = True
        written.events.update(event.task_id for event in new_events)
    if receipts:
        _INSERT_RECEIPT.execute(connection, receipts)
    return results
