"""Group commit: many updates in one transaction (service/ingest.py, service/groupcommit.py).

The batch path must be indistinguishable from applying the same updates one at a time: same
task states, same history, same receipts, same deliveries owed. Per-item failures stay per item.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from service import ingest, outbox
from service import store as store_module
from service.db import DriverSQL, listed, make_engine, migrate
from service.errors import (
    Conflict,
    NotFound,
    StoreUnavailable,
    TaskRelayError,
    UpstreamUnavailable,
)
from service.groupcommit import GroupCommitter, Overloaded
from service.ingest import UpdateRequest
from service.lifecycle import TaskUpdate
from service.models import (
    CallbackReceipt,
    Delivery,
    DeliveryStatus,
    ReceiptOutcome,
    Task,
    TaskOrigin,
    TaskRow,
    TaskStatus,
    UpdateSource,
)
from service.outbox import PROGRESS_DELAY, Outbox
from service.store import ApplyResult, ReceiptDraft, Store
from tests.conftest import query_plan

IMAGE = ({"url": "https://cdn.example/1.png"},)
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def make_store(database_url: str, clock: Clock | None = None, seed: int = 7) -> Store:
    return Store(make_engine(database_url), clock=clock or Clock(), rng=random.Random(seed))


def new_task(store: Store, owner: str = "alice", provider_task_id: str | None = None) -> str:
    result = store.create_task(
        owner=owner,
        provider="evolink",
        origin=TaskOrigin.tracked,
        request={},
        metadata={},
        provider_task_id=provider_task_id,
    )
    return str(result.task["id"])


def receipt(body: bytes = b"{}") -> ReceiptDraft:
    return ReceiptDraft("evolink", body, "application/json")


def progress(value: int) -> TaskUpdate:
    return TaskUpdate(status=TaskStatus.running, progress=value)


DONE = TaskUpdate(status=TaskStatus.succeeded, images=IMAGE)


def snapshot(store: Store, owner: str, task_ids: list[str]) -> list[Any]:
    """Everything an update can touch, without the ids that differ from task to task (twins
    track provider tasks of their own: one client may not track another's)."""
    out = []
    for task_id in task_ids:
        task, events = store.task_with_events(owner, task_id)
        tracked = task["provider_task_id"]
        task = {k: v for k, v in task.items() if k not in {"id", "provider_task_id"}}
        history = [(e.type, e.status, e.progress, e.source) for e in events]
        receipts = [
            (r.outcome, r.error and r.error.replace(repr(tracked), "<tracked>"), r.body)
            for r in store.list_receipts(owner, task_id)[0]
        ]
        out.append((task, history, receipts))
    return out


def random_updates(rng: random.Random, task_ids: list[str], count: int) -> list[UpdateRequest]:
    choices = [
        progress(10),
        progress(30),
        progress(30),
        progress(60),
        progress(20),
        DONE,
        TaskUpdate(status=TaskStatus.failed, error={"code": "x", "message": "boom"}),
        TaskUpdate(status=TaskStatus.running, estimated_seconds=40.0),
        TaskUpdate(provider_task_id="other-id"),  # contradicts the tracked id: rejected
    ]
    return [
        UpdateRequest(
            rng.choice(task_ids),
            rng.choice(choices),
            UpdateSource.callback,
            receipt(f'{{"n":{n}}}'.encode()),
        )
        for n in range(count)
    ]


def twin_updates(
    rng: random.Random, store: Store, count: int
) -> tuple[tuple[list[str], list[UpdateRequest]], tuple[list[str], list[UpdateRequest]]]:
    """Four twin tasks for alice and bob, and ``count`` random updates for alice's tasks with
    the same for bob's twins: (alice's task ids, her updates), (bob's, his)."""
    ids_a = [new_task(store, "alice", provider_task_id=f"p{i}") for i in range(4)]
    ids_b = [new_task(store, "bob", provider_task_id=f"q{i}") for i in range(4)]
    updates_a = random_updates(rng, ids_a, count)
    mapping = dict(zip(ids_a, ids_b, strict=True))
    updates_b = [
        UpdateRequest(mapping[u.task_id], u.update, u.source, u.receipt) for u in updates_a
    ]
    return (ids_a, updates_a), (ids_b, updates_b)


def outcomes(results: list[ApplyResult | Exception]) -> list[Any]:
    return [
        (r.outcome, r.task["status"], r.task["progress"], r.event and r.event["type"])
        if isinstance(r, ApplyResult)
        else type(r).__name__
        for r in results
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_is_the_same_as_one_update_at_a_time(database_url: str, seed: int) -> None:
    """The same random updates for two clients' twin tasks, applied one by one to alice's and
    in random batches to bob's: identical states, histories, receipts and outcomes."""
    rng = random.Random(seed)
    store = make_store(database_url)
    (ids_a, updates_a), (ids_b, updates_b) = twin_updates(rng, store, 60)

    single = [store.apply_updates([u])[0] for u in updates_a]
    batched: list[ApplyResult | Exception] = []
    position = 0
    while position < len(updates_b):
        size = rng.randint(1, 25)
        batched += store.apply_updates(updates_b[position : position + size])
        position += size

    assert outcomes(single) == outcomes(batched)  # type: ignore[arg-type]
    assert snapshot(store, "alice", ids_a) == snapshot(store, "bob", ids_b)
    store.engine.dispose()


def test_one_bad_item_fails_alone(store: Store) -> None:
    first, second = new_task(store), new_task(store, provider_task_id="tracked")
    results = store.apply_updates(
        [
            UpdateRequest(first, progress(10), UpdateSource.callback, receipt()),
            UpdateRequest("tsk_missing", progress(10), UpdateSource.callback, receipt()),
            UpdateRequest(
                second, TaskUpdate(provider_task_id="not-it"), UpdateSource.callback, receipt()
            ),
            UpdateRequest(second, DONE, UpdateSource.callback, receipt()),
        ]
    )
    assert isinstance(results[0], ApplyResult) and results[0].outcome is ReceiptOutcome.applied
    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], Conflict)
    assert isinstance(results[3], ApplyResult) and results[3].task["status"] == "succeeded"
    assert store.get_task("alice", first)["progress"] == 10
    # The contradicting callback is kept for audit, as rejected.
    assert [r.outcome for r in store.list_receipts("alice", second)[0]] == ["rejected", "applied"]


def test_a_value_the_database_refuses_fails_only_its_own_update(store: Store) -> None:
    """Two tasks may not share a provider task id: the batch's transaction fails as a whole,
    then each update is applied alone, and only the offending one is refused."""
    holder, taker, bystander = (
        new_task(store, provider_task_id="p-1"),
        new_task(store),
        new_task(store),
    )
    results = store.apply_updates(
        [
            UpdateRequest(bystander, progress(40), UpdateSource.callback, receipt()),
            UpdateRequest(
                taker,
                TaskUpdate(status=TaskStatus.running, provider_task_id="p-1"),
                UpdateSource.callback,
                receipt(),
            ),
            UpdateRequest(holder, DONE, UpdateSource.callback, receipt()),
        ]
    )
    assert isinstance(results[0], ApplyResult)
    assert isinstance(results[1], Conflict) and results[1].code == "provider_task_id_taken"
    assert isinstance(results[2], ApplyResult)
    assert store.get_task("alice", bystander)["progress"] == 40
    assert store.get_task("alice", taker)["provider_task_id"] is None
    assert store.get_task("alice", holder)["status"] == "succeeded"
    # Its receipt, rolled back with its update, is kept again as a refused callback's.
    (kept,) = store.list_receipts("alice", taker)[0]
    assert kept.outcome == "rejected" and "already belongs" in str(kept.error)


def test_a_late_updates_duration_hint_is_not_taken(store: Store) -> None:
    """A stale update (a "pending" with its old estimate after the task runs) changes neither
    the expected finish nor anything else: the receipt says unchanged."""
    task_id = new_task(store)
    running = TaskUpdate(status=TaskStatus.running, progress=40, estimated_seconds=90.0)
    stale = TaskUpdate(status=TaskStatus.queued, progress=0, estimated_seconds=30.0)
    for update in (running, stale):
        (result,) = store.apply_updates(
            [UpdateRequest(task_id, update, UpdateSource.callback, receipt())]
        )
        assert isinstance(result, ApplyResult)
    assert result.outcome is ReceiptOutcome.unchanged
    with store.engine.connect() as connection:
        row = connection.execute(
            sa.select(Task.created_at, Task.expected_at).where(Task.id == task_id)  # type: ignore[call-overload]
        ).one()
    assert row.expected_at - row.created_at == timedelta(seconds=90)


def test_another_constraint_refusing_an_update_is_not_called_a_taken_provider_task_id(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the provider task id's own unique constraint makes a 409 "provider_task_id_taken";
    any other constraint the database enforces (here a receipt naming no task: its foreign
    key) is an unexpected failure of that update alone, with nothing of it stored, not a
    conflict blamed on the client."""
    good, bad = new_task(store), new_task(store)
    with store.engine.connect() as connection:
        found = connection.execute(sa.text("SELECT pk FROM task WHERE id = :id"), {"id": bad})
        bad_pk = found.scalar_one()
    made = Store.receipt_row

    def receipt_row(self: Store, task_pk: int, *args: Any) -> dict[str, Any]:
        row = made(self, task_pk, *args)
        if task_pk == bad_pk:
            row["task_pk"] = 10**12  # no such task
        return row

    monkeypatch.setattr(Store, "receipt_row", receipt_row)
    results = store.apply_updates(
        [
            UpdateRequest(good, progress(10), UpdateSource.callback, receipt()),
            UpdateRequest(bad, progress(20), UpdateSource.callback, receipt()),
        ]
    )
    assert isinstance(results[0], ApplyResult)
    assert isinstance(results[1], TaskRelayError) and not isinstance(results[1], Conflict)
    assert results[1].status == 500 and "nothing was recorded" in results[1].message
    assert store.get_task("alice", bad)["progress"] == 0
    with pytest.raises(sa.exc.IntegrityError):  # alone, the fault is raised (the committer logs it)
        store.apply_updates([UpdateRequest(bad, progress(30), UpdateSource.callback, receipt())])


def test_an_update_that_fails_unexpectedly_fails_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault nothing foresaw (a bug, a value nothing checked) in one update of a batch: the
    others are applied one by one and commit; only the faulty one fails, with nothing of it
    stored."""
    good, bad, other = new_task(store), new_task(store), new_task(store)
    planned = Store.plan

    def plan(self: Store, task: Any, now: datetime) -> None:
        if task.id == bad:
            raise RuntimeError("a bug")
        planned(self, task, now)

    monkeypatch.setattr(Store, "plan", plan)
    results = store.apply_updates(
        [
            UpdateRequest(good, progress(10), UpdateSource.callback, receipt()),
            UpdateRequest(bad, progress(20), UpdateSource.callback, receipt()),
            UpdateRequest(other, DONE, UpdateSource.callback, receipt()),
        ]
    )
    assert isinstance(results[0], ApplyResult) and results[0].task["progress"] == 10
    assert isinstance(results[1], TaskRelayError) and results[1].status == 500
    assert "nothing was recorded" in results[1].message
    assert isinstance(results[2], ApplyResult) and results[2].task["status"] == "succeeded"
    assert store.get_task("alice", good)["progress"] == 10
    assert store.get_task("alice", bad)["progress"] == 0
    assert store.list_receipts("alice", bad)[0] == []
    assert store.get_task("alice", other)["status"] == "succeeded"
    with pytest.raises(RuntimeError):  # alone, the fault is raised (the committer logs it)
        store.apply_updates([UpdateRequest(bad, progress(30), UpdateSource.callback, receipt())])


def test_the_batch_is_one_transaction(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of a batch (here: planning the deliveries owed, after the tasks,
    events and receipts were written, and on PostgreSQL after the server has run those
    statements in the batch's pipeline) leaves no trace of any of its updates."""
    store = make_store(database_url)
    Outbox(store).create_subscription(
        "alice", url="https://hooks.example/a", event_types=None, providers=None, description=None
    )
    ids = [new_task(store) for _ in range(3)]
    planned: list[int] = []

    def broken(matches: Any, superseded: Any, now: datetime, **_: Any) -> list[dict[str, Any]]:
        planned.append(len(matches))
        raise RuntimeError("crash before commit")

    monkeypatch.setattr(outbox, "plan_deliveries", broken)  # SQLite's path, in fan_out_many
    monkeypatch.setattr(ingest, "plan_deliveries", broken)  # PostgreSQL's pipeline
    results = store.apply_updates(
        [UpdateRequest(i, DONE, UpdateSource.callback, receipt()) for i in ids]
    )
    monkeypatch.undo()
    assert planned == [3, 1, 1, 1]  # the batch, then each update alone, failing alike
    assert all(isinstance(r, TaskRelayError) and r.status == 500 for r in results)
    for task_id in ids:
        assert store.get_task("alice", task_id)["status"] == "queued"
        assert [e.type for e in store.list_events("alice", task_id)] == ["task.submitted"]
        assert store.list_receipts("alice", task_id)[0] == []
    assert [(kind, status) for kind, status, _ in deliveries(store)] == [
        ("task.submitted", DeliveryStatus.pending.value)
    ] * 3
    # The connection the crash left is fine for the next batch.
    results = store.apply_updates([UpdateRequest(i, DONE, UpdateSource.callback) for i in ids])
    assert all(isinstance(result, ApplyResult) for result in results)
    assert len(deliveries(store)) == 6
    store.engine.dispose()


def test_listeners_hear_each_commit_once_with_the_tasks_that_changed(store: Store) -> None:
    heard: list[frozenset[str]] = []
    store.listeners.append(heard.append)
    ids = [new_task(store) for _ in range(3)]
    heard.clear()
    store.apply_updates(
        [
            UpdateRequest(ids[0], progress(10), UpdateSource.callback),
            UpdateRequest(ids[1], progress(10), UpdateSource.callback),
            UpdateRequest(ids[1], progress(10), UpdateSource.callback),  # no change, no event
        ]
    )
    assert heard == [frozenset(ids[:2])]


def test_a_listener_that_fails_after_the_commit_fails_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch has committed: the updates are answered as applied, not applied again one
    by one (which would record each twice), and the other listeners still hear of it."""
    heard: list[frozenset[str]] = []

    def broken(task_ids: frozenset[str]) -> None:
        raise RuntimeError("a listener's bug")

    store.listeners.extend([broken, heard.append])
    ids = [new_task(store) for _ in range(2)]
    heard.clear()
    with caplog.at_level(logging.ERROR, logger="service.store"):
        results = store.apply_updates(
            [
                UpdateRequest(task_id, progress(10), UpdateSource.callback, receipt())
                for task_id in ids
            ]
        )
    assert [r.outcome for r in results if isinstance(r, ApplyResult)] == [
        ReceiptOutcome.applied
    ] * 2
    assert heard == [frozenset(ids)]
    assert [len(store.list_receipts("alice", task_id)[0]) for task_id in ids] == [1, 1]
    assert "a listener failed after a commit" in caplog.text


# --- deliveries owed by a batch ------------------------------------------------------------------


def deliveries(store: Store) -> list[tuple[str, str, datetime]]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            sa.select(Delivery.event_type, Delivery.status, Delivery.next_attempt_at).order_by(
                Delivery.pk  # type: ignore[arg-type]
            )
        )
        return [(t, s, due.replace(tzinfo=UTC)) for t, s, due in rows]


def test_fan_out_in_a_batch_coalesces_like_one_at_a_time(database_url: str) -> None:
    clock = Clock()
    store = make_store(database_url, clock)
    outbox = Outbox(store)
    outbox.create_subscription(
        "alice", url="https://hooks.example/a", event_types=None, providers=None, description=None
    )
    outbox.create_subscription(
        "bob", url="https://hooks.example/b", event_types=None, providers=None, description=None
    )
    task_id = new_task(store)  # task.submitted: one delivery, due now
    clock.now += timedelta(seconds=5)
    # An earlier progress delivery still waiting ...
    store.apply_update(task_id, progress(10), UpdateSource.callback)
    waiting_due = clock.now + PROGRESS_DELAY
    clock.now += timedelta(milliseconds=300)
    # ... then a batch: two more progress events and the result.
    store.apply_updates(
        [
            UpdateRequest(task_id, progress(20), UpdateSource.callback),
            UpdateRequest(task_id, progress(30), UpdateSource.callback),
        ]
    )
    assert deliveries(store) == [
        ("task.submitted", DeliveryStatus.pending.value, T0),
        ("task.progress", DeliveryStatus.coalesced.value, waiting_due),
        # Each newer progress event takes the slot of the one it replaces.
        ("task.progress", DeliveryStatus.coalesced.value, waiting_due),
        ("task.progress", DeliveryStatus.pending.value, waiting_due),
    ]
    store.apply_updates(
        [
            UpdateRequest(task_id, progress(50), UpdateSource.callback),
            UpdateRequest(task_id, DONE, UpdateSource.callback),
        ]
    )
    tail = deliveries(store)[-3:]
    assert tail == [
        ("task.progress", DeliveryStatus.coalesced.value, waiting_due),
        ("task.progress", DeliveryStatus.coalesced.value, waiting_due),
        ("task.succeeded", DeliveryStatus.pending.value, clock.now),
    ]
    store.engine.dispose()


def test_fan_out_follows_each_subscription_s_filters(database_url: str) -> None:
    store = make_store(database_url)
    outbox = Outbox(store)
    outbox.create_subscription(
        "alice",
        url="https://hooks.example/done",
        event_types=["task.succeeded"],
        providers=None,
        description=None,
    )
    outbox.create_subscription(
        "alice",
        url="https://hooks.example/other",
        event_types=None,
        providers=["openai"],
        description=None,
    )
    mine, bobs = new_task(store), new_task(store, owner="bob")
    before = len(deliveries(store))
    store.apply_updates(
        [
            UpdateRequest(mine, progress(10), UpdateSource.callback),
            UpdateRequest(mine, DONE, UpdateSource.callback),
            UpdateRequest(bobs, DONE, UpdateSource.callback),
        ]
    )
    assert [(t, s) for t, s, _ in deliveries(store)[before:]] == [("task.succeeded", "pending")]
    store.engine.dispose()


# --- the committer -------------------------------------------------------------------------------


async def test_concurrent_callbacks_share_commits(store: Store) -> None:
    ids = [new_task(store) for _ in range(40)]
    committer = GroupCommitter(store, max_batch=16)
    committer.start()
    try:
        results = await asyncio.gather(
            *(
                committer.apply(UpdateRequest(task_id, DONE, UpdateSource.callback, receipt()))
                for task_id in ids
            ),
            committer.apply(UpdateRequest("tsk_missing", DONE, UpdateSource.callback)),
            return_exceptions=True,
        )
    finally:
        await committer.stop()
    assert [r.task["status"] for r in results[:-1]] == ["succeeded"] * 40  # type: ignore[union-attr]
    assert isinstance(results[-1], NotFound)
    assert committer.updates == 40  # the unknown task's was refused, not written
    assert 3 <= committer.batches < 41  # 16 at most per batch, and batched under load
    with store.engine.connect() as connection:
        count = connection.execute(sa.select(sa.func.count()).select_from(CallbackReceipt))
        assert count.scalar() == 40


def test_a_task_keeps_so_many_callback_receipts_and_no_more(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Callbacks are not rate limited, so whoever holds a task's callback URL could add
    receipts of 64 KiB without end (a security hunt grew one failed task to 439 MB). A task
    keeps max_receipts; later callbacks are answered and applied as ever, their receipts
    counted, not kept: in batches (the pipeline, on PostgreSQL), alone, and refused ones."""
    store.max_receipts = 5
    task_id, other = new_task(store), new_task(store)
    batch = [UpdateRequest(task_id, progress(10), UpdateSource.callback, receipt())] * 3
    batch.append(UpdateRequest(other, progress(10), UpdateSource.callback, receipt()))
    with caplog.at_level(logging.WARNING, logger="service.store"):
        store.apply_updates(batch)  # 3 receipts
        results = store.apply_updates(
            [
                UpdateRequest(task_id, progress(n), UpdateSource.callback, receipt())
                for n in (20, 30, 40)
            ]
        )  # 2 more kept: the cap; the third dropped
        late = store.apply_update(task_id, DONE, UpdateSource.callback, receipt=receipt())
        store.record_rejected_callback(task_id, ReceiptDraft("evolink", b"nope", None, error="x"))
    assert [result.task["progress"] for result in results] == [20, 30, 40]  # type: ignore[union-attr]
    assert late.task["status"] == "succeeded"  # applied, its receipt not kept
    outcomes = [r.outcome for r in store.list_receipts("alice", task_id)[0]]
    assert outcomes == ["applied", "unchanged", "unchanged", "applied", "applied"]
    assert len(store.list_receipts("alice", other)[0]) == 1
    assert store.receipts_dropped == 3
    filled = [r.getMessage() for r in caplog.records if "receipts" in r.getMessage()]
    assert len(filled) == 1 and task_id in filled[0]
    # Another process (or this one after a restart) knows no counts: it counts them.
    other_process = Store(store.engine, max_receipts=5)
    other_process.apply_updates(
        [
            UpdateRequest(task_id, progress(50), UpdateSource.callback, receipt()),
            UpdateRequest(other, progress(50), UpdateSource.callback, receipt()),
        ]
    )
    assert len(store.list_receipts("alice", task_id)[0]) == 5
    assert len(store.list_receipts("alice", other)[0]) == 2
    assert other_process.receipts_dropped == 1


def test_a_page_of_callback_receipts_is_bounded_by_its_bodies_bytes(store: Store) -> None:
    """Anyone holding the callback URL can leave receipts of 64 KiB: a page of 200 written
    as JSON was about 80 MB (found by a security hunt). A page stops once its bodies pass
    1 MiB, and the cursor goes on from there; every receipt is still listed, once."""
    task_id = new_task(store)
    body = b"\x01" * store.audit_bytes
    for _ in range(40):
        store.record_rejected_callback(task_id, ReceiptDraft("evolink", body, None, error="x"))
    pages, cursor = [], None
    while True:
        page, cursor = store.list_receipts("alice", task_id, cursor=cursor, limit=200)
        pages.append(len(page))
        assert sum(len(r.body) for r in page) <= store_module.MAX_RECEIPTS_PAGE_BYTES
        if cursor is None:
            break
    assert pages == [16, 16, 8]


async def test_stop_writes_what_was_queued_then_refuses(store: Store) -> None:
    ids = [new_task(store) for _ in range(10)]
    committer = GroupCommitter(store)
    committer.start()
    pending = [
        asyncio.ensure_future(committer.apply(UpdateRequest(task_id, DONE, UpdateSource.callback)))
        for task_id in ids
    ]
    await asyncio.sleep(0)  # every apply() has queued its update
    await committer.stop()
    assert all(p.result().task["status"] == "succeeded" for p in pending)
    with pytest.raises(StoreUnavailable):
        await committer.apply(UpdateRequest(ids[0], DONE, UpdateSource.callback))


async def test_a_full_queue_refuses_with_503_and_nothing_is_written(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = new_task(store)
    committer = GroupCommitter(store, max_batch=1, max_queue=1)
    committer.start()
    try:
        # The writer is busy: hold the queue full without letting the thread take from it.
        with committer._ready:
            first = asyncio.ensure_future(
                committer.apply(UpdateRequest(task_id, progress(10), UpdateSource.callback))
            )
            await asyncio.sleep(0)
            assert len(committer._queue) == 1
            with pytest.raises(Overloaded) as refused:
                await committer.apply(UpdateRequest(task_id, DONE, UpdateSource.callback))
        assert refused.value.status == 503 and refused.value.retry_after == 1.0
        assert (await first).task["progress"] == 10
    finally:
        await committer.stop()
    assert store.get_task("alice", task_id)["status"] == "running"


async def test_the_writers_counts_are_of_what_it_committed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """taskrelay_group_commit_batches_total / _updates_total: a batch the database refused
    (an outage) counted as committed, so the counters showed writes going on during it."""
    task_id = new_task(store)
    committer = GroupCommitter(store)
    committer.start()
    try:
        await committer.apply(UpdateRequest(task_id, progress(10), UpdateSource.callback))
        assert (committer.batches, committer.updates) == (1, 1)

        # An unknown task is refused alone, in a batch that committed (its receipt, say).
        with pytest.raises(NotFound):
            await committer.apply(UpdateRequest("tsk_unknown", progress(20), UpdateSource.callback))
        assert (committer.batches, committer.updates) == (2, 1)
        working = store.apply_updates

        def down(requests: list[UpdateRequest]) -> list[Exception]:
            return [StoreUnavailable("The database is unavailable.") for _ in requests]

        monkeypatch.setattr(store, "apply_updates", down)
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await committer.apply(UpdateRequest(task_id, progress(20), UpdateSource.callback))
        assert (committer.batches, committer.updates) == (2, 1)
        monkeypatch.setattr(store, "apply_updates", working)
        await committer.apply(UpdateRequest(task_id, progress(30), UpdateSource.callback))
        assert (committer.batches, committer.updates) == (3, 2)
    finally:
        await committer.stop()


async def test_a_client_that_goes_away_does_not_cancel_the_write(store: Store) -> None:
    task_id = new_task(store)
    committer = GroupCommitter(store)
    committer.start()
    try:
        with committer._ready:  # hold the writer so the request is still queued when cancelled
            waiting = asyncio.ensure_future(
                committer.apply(UpdateRequest(task_id, DONE, UpdateSource.callback))
            )
            await asyncio.sleep(0)
            waiting.cancel()
    finally:
        await committer.stop()
    assert waiting.cancelled()
    assert store.get_task("alice", task_id)["status"] == "succeeded"


# --- PostgreSQL's pipeline (ingest._apply_pipelined) ---------------------------------------------


def test_driver_sql_reads_values_exactly_as_core_does(database_url: str) -> None:
    """The lock statement's rows through the driver itself (PostgreSQL's pipeline) come back
    exactly as a Core execute gives them: aware datetimes, decoded JSON, None for NULL."""
    store = make_store(database_url)
    task_id = new_task(store, provider_task_id="p-1")
    store.apply_updates(
        [UpdateRequest(task_id, progress(40), UpdateSource.callback, receipt(b'{"a": 1}'))]
    )
    with store.engine.connect() as connection:
        dialect = connection.dialect
        values = {"ids": listed(dialect.name, [task_id])}
        core = tuple(connection.execute(ingest._locked_tasks(dialect.name), values).one())
        driven = DriverSQL(ingest._locked_tasks(dialect.name)).on(dialect)
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(driven.sql, driven.params(values))
        raw = cursor.fetchone()
    assert driven.row(raw) == core
    task = TaskRow(*core)
    assert task.updated_at.tzinfo is UTC and task.progress == 40 and task.meta == {}
    assert (task.provider_task_id, task.completed_at) == ("p-1", None)
    store.engine.dispose()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_pipeline_writes_what_the_statements_write(postgres_url: str, seed: int) -> None:
    """The same random updates for two clients' twin tasks, each client with a subscription:
    alice's applied statement by statement (the path SQLite takes), bob's in PostgreSQL's
    pipeline, both in the same random batches. Identical outcomes, states, histories,
    receipts, and deliveries owed (coalescing included)."""
    rng = random.Random(seed)
    store = make_store(postgres_url)
    outbox_ = Outbox(store)
    for owner in ("alice", "bob"):
        outbox_.create_subscription(
            owner,
            url=f"https://hooks.example/{owner}",
            event_types=None,
            providers=None,
            description=None,
        )
    (ids_a, updates_a), (ids_b, updates_b) = twin_updates(rng, store, 80)

    def apply(requests: list[UpdateRequest], pipelined: bool) -> list[Any]:
        with store.core_transaction() as (connection, written):
            return ingest.apply_updates(store, connection, written, requests, pipelined=pipelined)

    by_statements: list[Any] = []
    pipelined: list[Any] = []
    position = 0
    while position < len(updates_a):
        size = rng.randint(1, 25)
        by_statements += apply(updates_a[position : position + size], False)
        pipelined += apply(updates_b[position : position + size], True)
        position += size

    assert outcomes(by_statements) == outcomes(pipelined)
    assert snapshot(store, "alice", ids_a) == snapshot(store, "bob", ids_b)
    owed = owed_deliveries(store, ids_a)
    assert len(owed) > len(ids_a) and {"coalesced", "pending"} <= {d[2] for d in owed}
    assert owed == owed_deliveries(store, ids_b)
    store.engine.dispose()


def owed_deliveries(store: Store, task_ids: list[str]) -> list[tuple[int, str, str, datetime]]:
    """The deliveries owed for these tasks, in the order they were created: (the task's place
    in ``task_ids``, event type, status, due time)."""
    with store.engine.connect() as connection:
        pks = dict(
            connection.execute(
                sa.select(Task.pk, Task.id).where(Task.id.in_(task_ids))  # type: ignore[attr-defined]
            ).all()
        )
        rows = connection.execute(
            sa.select(
                Delivery.task_pk, Delivery.event_type, Delivery.status, Delivery.next_attempt_at
            )
            .where(Delivery.task_pk.in_(pks))  # type: ignore[attr-defined]
            .order_by(Delivery.pk)  # type: ignore[arg-type]
        ).all()
    return [(task_ids.index(pks[pk]), kind, status, due) for pk, kind, status, due in rows]


def test_a_connection_lost_mid_pipeline_fails_the_batch_and_the_next_one_works(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes away between the batch's round trips (the tasks locked, the writes not
    yet sent): every update of the batch is refused as unavailable, nothing is written, the
    lost connection is thrown away, and the next batch works."""
    store = make_store(postgres_url)
    ids = [new_task(store) for _ in range(3)]
    decide_batch = ingest._decide

    def server_gone(*args: Any) -> Any:
        # The store's one connection is the batch's (the test makes no other).
        libpq_url = sa.make_url(postgres_url).set(drivername="postgresql")
        with psycopg.connect(libpq_url.render_as_string(hide_password=False)) as other:
            killed = other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed == [(True,)]
        return decide_batch(*args)

    monkeypatch.setattr(ingest, "_decide", server_gone)
    results = store.apply_updates([UpdateRequest(i, DONE, UpdateSource.callback) for i in ids])
    monkeypatch.undo()
    assert all(isinstance(result, StoreUnavailable) for result in results)
    cause = results[0].__cause__
    assert isinstance(cause, sa.exc.OperationalError) and cause.connection_invalidated
    for task_id in ids:
        assert store.get_task("alice", task_id)["status"] == "queued"
    results = store.apply_updates([UpdateRequest(i, DONE, UpdateSource.callback) for i in ids])
    assert [r.outcome for r in results if isinstance(r, ApplyResult)] == ["applied"] * 3
    store.engine.dispose()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipeline", "statements"])
def test_batches_survive_connections_killed_at_random(
    postgres_url: str,
    pipelined: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batches (owed deliveries: three round trips in the pipeline) while the server kills the
    store's connections at random moments for two seconds, letting a batch through after about
    every other kill. Each batch is wholly acknowledged or wholly refused as unavailable, and
    all or none of a refused batch is stored (its commit may have landed before its answer was
    lost); every acknowledged update is stored; nothing is logged as an error; and the pool
    hands out working connections afterwards. (Found in the pipeline: a kill while leaving
    pipeline mode left libpq stuck in it, the connection not invalidated, and the pool's reset
    failing with a logged traceback.)"""
    if not pipelined:
        monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    store = make_store(postgres_url)
    Outbox(store).create_subscription(
        "alice", url="https://hooks.example/a", event_types=None, providers=None, description=None
    )
    ids = [new_task(store) for _ in range(40)]
    rng = random.Random(5)
    stop, acked = threading.Event(), threading.Event()
    kills = 0

    def kill_at_random() -> None:
        nonlocal kills
        libpq_url = sa.make_url(postgres_url).set(drivername="postgresql")
        with psycopg.connect(libpq_url.render_as_string(hide_password=False)) as other:
            other.autocommit = True
            while not stop.wait(random.uniform(0.0, 0.02)):
                kills += other.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0]  # type: ignore[index]
                if random.random() < 0.5:
                    # Let a batch through before the next kill: on a loaded machine a batch
                    # (and the new connection it needs) can take longer than the gaps between
                    # kills, and none would be acknowledged (seen in CI: 0 of 136).
                    acked.clear()
                    while not (acked.wait(0.05) or stop.is_set()):
                        pass

    caplog.set_level(logging.WARNING)
    killer = threading.Thread(target=kill_at_random)
    killer.start()
    acknowledged: set[int] = set()
    refused: list[set[int]] = []
    number = 0
    try:
        start = time.monotonic()
        # Two seconds, and on until both outcomes were seen (at most 30 s).
        while (elapsed := time.monotonic() - start) < 2.0 or (
            not (acknowledged and refused) and elapsed < 30.0
        ):
            batch = []
            for _ in range(8):
                number += 1
                update = progress(rng.randint(1, 99))
                body = json.dumps({"n": number}).encode()
                batch.append(
                    UpdateRequest(rng.choice(ids), update, UpdateSource.callback, receipt(body))
                )
            results = store.apply_updates(batch)
            numbers = {json.loads(request.receipt.body)["n"] for request in batch}  # type: ignore[union-attr]
            if all(isinstance(result, ApplyResult) for result in results):
                acknowledged |= numbers
                acked.set()
                continue
            assert all(isinstance(result, StoreUnavailable) for result in results), results
            assert all(isinstance(r.__cause__, sa.exc.OperationalError) for r in results), results
            refused.append(numbers)
    finally:
        stop.set()
        killer.join()

    assert kills and acknowledged and refused, (kills, len(acknowledged), len(refused))
    with store.engine.connect() as connection:
        bodies = connection.execute(sa.select(CallbackReceipt.body)).scalars().all()  # type: ignore[call-overload]
    stored = {json.loads(bytes(body))["n"] for body in bodies}
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    for numbers in refused:
        assert numbers <= stored or not numbers & stored, sorted(numbers & stored)
    assert stored <= acknowledged.union(*refused)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [(r.name, r.getMessage()) for r in errors[:3]]
    # Every connection the pool holds works (none left stuck in pipeline mode).
    for _ in range(store.engine.pool.size() + 1):
        assert all(isinstance(r, ApplyResult) for r in store.apply_updates(batch))
    store.engine.dispose()


@pytest.mark.parametrize("path", ["track", "patch", "callback (pipeline)", "callback (statements)"])
def test_two_clients_claiming_one_provider_task_on_two_replicas_take_turns(
    postgres_url: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's transaction (another replica's) gives his task provider task ``p-race`` and has
    not committed yet. Alice's claim of the same id, by tracking it, by PATCH, or by a
    callback naming it (the writer's two paths), waits for his transaction instead of reading
    around it, and is then refused: without the claim's lock both read "nobody holds it", and
    both tasks got it, Alice's then polling Bob's results."""
    if path == "callback (statements)":
        monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    store, replica = make_store(postgres_url), make_store(postgres_url)
    bobs = new_task(store, "bob")
    alices = new_task(store, "alice")

    def alice_claims() -> Any:
        try:
            if path == "track":
                return new_task(store, "alice", provider_task_id="p-race")
            if path == "patch":
                return store.patch_task("alice", alices, provider_task_id="p-race", metadata=None)
            update = TaskUpdate(provider_task_id="p-race", status=TaskStatus.running)
            request = UpdateRequest(alices, update, UpdateSource.callback, receipt())
            return store.apply_updates([request])[0]
        except Conflict as exc:
            return exc

    with replica.engine.connect() as bob:
        bob.begin()
        assert not store_module.held_elsewhere(bob, "evolink", "p-race", "bob")
        bob.execute(
            sa.update(Task).where(Task.id == bobs).values(provider_task_id="p-race")  # type: ignore[arg-type]
        )
        with ThreadPoolExecutor(1) as pool:
            claim = pool.submit(alice_claims)
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            with store.engine.connect() as watcher:
                deadline = time.monotonic() + 10.0
                while not watcher.execute(sa.text(waiting)).scalar_one():
                    assert time.monotonic() < deadline, "Alice's claim did not wait for Bob's"
                    assert not claim.done(), claim.result()
                    time.sleep(0.01)
            bob.commit()
            result = claim.result(timeout=10)
    assert isinstance(result, Conflict), result
    assert result.code == "tracked_by_another_client"
    assert store.get_task("bob", bobs)["provider_task_id"] == "p-race"
    assert store.get_task("alice", alices)["provider_task_id"] is None
    with store.engine.connect() as connection:
        holders = connection.execute(
            sa.select(Task.id).where(Task.provider_task_id == "p-race")  # type: ignore[call-overload]
        ).scalars()
        assert list(holders) == [bobs]  # and no task of Alice's was created with it
    store.engine.dispose()
    replica.engine.dispose()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipeline", "statements"])
def test_two_batches_claiming_the_same_ids_in_opposite_orders_do_not_deadlock(
    postgres_url: str, pipelined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas' writers at once: Alice's batch names provider tasks A then B for two of
    her tasks, Bob's names B then A for two of his. The claims' locks are taken in one order
    whatever the batch's, so neither batch fails as a deadlock: each id goes to one client,
    the other's callbacks are refused (409), and nothing is refused as unavailable."""
    if not pipelined:
        monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    stores = [make_store(postgres_url), make_store(postgres_url)]
    try:
        for round_ in range(15):
            a, b = f"a-{round_}", f"b-{round_}"
            alices = [new_task(stores[0], "alice") for _ in range(2)]
            bobs = [new_task(stores[0], "bob") for _ in range(2)]
            batches = [
                [(alices[0], a), (alices[1], b)],
                [(bobs[0], b), (bobs[1], a)],
            ]
            barrier = threading.Barrier(2)

            def send(store: Store, batch: list[tuple[str, str]], barrier: threading.Barrier) -> Any:
                requests = [
                    UpdateRequest(
                        task_id,
                        TaskUpdate(provider_task_id=named, status=TaskStatus.running),
                        UpdateSource.callback,
                        receipt(),
                    )
                    for task_id, named in batch
                ]
                barrier.wait()
                return store.apply_updates(requests)

            with ThreadPoolExecutor(2) as pool:
                sent = [pool.submit(send, stores[i], batches[i], barrier) for i in range(2)]
                results = [r for future in sent for r in future.result()]
            assert all(isinstance(r, ApplyResult | Conflict) for r in results), results
            owners: dict[str, str] = {}  # provider task id: the client whose task holds it
            for owner, task_ids in (("alice", alices), ("bob", bobs)):
                for task_id in task_ids:
                    held = stores[0].get_task(owner, task_id)["provider_task_id"]
                    if held is not None:
                        assert held not in owners, (held, owners)
                        owners[held] = owner
            assert set(owners) == {a, b}, owners
    finally:
        for store in stores:
            store.engine.dispose()


@pytest.mark.parametrize("stuck", ["mid-command", "in pipeline mode"])
def test_a_connection_an_error_leaves_mid_command_is_dropped_not_reset(
    postgres_url: str, stuck: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server going away mid-command can leave psycopg raising while libpq still waits for
    that command's results, or is still in the pipeline mode of psycopg's ``executemany``
    (seen in the outage test: an outbox record's executemany). The connection is dropped as a
    lost one: the statement's own error is raised, not the pool's failed ROLLBACK ("another
    command is already in progress"), nothing is logged as an error, and the pool hands out
    working connections. Here the states are made on purpose, with libpq's own calls."""
    engine = make_engine(postgres_url)
    caplog.set_level(logging.WARNING)
    try:
        with pytest.raises(sa.exc.OperationalError) as raised, engine.connect() as connection:
            pgconn = connection.connection.driver_connection.pgconn  # type: ignore[union-attr]
            if stuck == "in pipeline mode":
                pgconn.enter_pipeline_mode()
                pgconn.send_query_params(b"SELECT pg_sleep(0.05)", None)
            else:
                pgconn.send_query(b"SELECT pg_sleep(0.05)")
            connection.execute(sa.text("SELECT 1"))
        assert "[SQL: SELECT 1]" in str(raised.value)  # the statement's error, not ROLLBACK's
        assert raised.value.connection_invalidated
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not errors, [(r.name, r.getMessage()) for r in errors[:3]]
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 2")).scalar_one() == 2
    finally:
        engine.dispose()


def test_the_pipeline_finds_subscriptions_through_indexes(postgres_url: str) -> None:
    """The subscriptions query sent with the lock on the tasks reads the clients' endpoint
    subscriptions and these tasks' notify_url ones each through its index, never every
    subscription (a client with a notify_url on every task would have millions)."""
    engine = make_engine(postgres_url)
    driven = DriverSQL(outbox.SUBSCRIPTIONS_OF_TASKS).on(engine.dialect)
    plan = query_plan(engine, driven.sql, driven.params({"ids": ["tsk_a", "tsk_b"]}))
    assert "ix_subscription_owner_kind_pk" in plan and "ix_subscription_task_pk" in plan, plan
    assert "Seq Scan" not in plan, plan
    engine.dispose()


def plan_of(store: Store, task_id: str) -> tuple[Any, ...]:
    """A task's (next check, later plan, lease owner), times as seconds after T0."""
    with store.engine.connect() as connection:
        row = connection.execute(
            sa.select(Task.next_check_at, Task.planned_check_at, Task.lease_owner).where(  # type: ignore[call-overload]
                Task.id == task_id
            )
        ).one()

    def since(moment: datetime | None) -> float | None:
        return None if moment is None else (moment - T0).total_seconds()

    return since(row[0]), since(row[1]), row[2]


def apply_callback(store: Store, task_id: str, update: TaskUpdate, *, batched: bool) -> None:
    """A callback's update, through the group-commit writer's batch path or alone."""
    if batched:
        (result,) = store.apply_updates(
            [UpdateRequest(task_id, update, UpdateSource.callback, receipt())]
        )
        assert isinstance(result, ApplyResult), result
    else:
        store.apply_update(task_id, update, UpdateSource.callback)


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one"])
def test_a_later_plan_leaves_the_next_check_and_the_scheduler_moves_it(
    database_url: str, batched: bool
) -> None:
    """A callback that plans the next look later than one still ahead leaves ``next_check_at``
    (indexed) as it was and keeps the plan in ``planned_check_at``; the scheduler, claiming
    the task at the earlier look, moves it to the plan without leasing it (no status query)
    and claims the next due task in its place. An earlier plan, a poll's answer, and a final
    state write the next check itself. (Default policy: 60 s typical duration, 1 s grace.)"""
    clock = Clock()
    store = make_store(database_url, clock)

    callback = partial(apply_callback, store, batched=batched)

    slow = new_task(store, provider_task_id="p-slow")
    clock.now = T0 + timedelta(seconds=1)
    other = new_task(store, provider_task_id="p-other")
    assert plan_of(store, slow) == (61.0, None, None)  # typical duration + grace
    clock.now = T0 + timedelta(seconds=20)
    callback(slow, progress(10))  # 10 % in 20 s: done at 200 s
    assert plan_of(store, slow) == (61.0, 201.0, None)
    clock.now = T0 + timedelta(seconds=30)
    callback(slow, progress(12))  # done at 250 s
    assert plan_of(store, slow) == (61.0, 251.0, None)

    clock.now = T0 + timedelta(seconds=62)  # both due; the slow one first
    claims = store.claim_due("evolink", "worker-1", limit=1, lease_seconds=30)
    assert [claim.task_id for claim in claims] == [other]
    assert plan_of(store, slow) == (251.0, None, None)  # moved, not leased
    assert plan_of(store, other) == (62.0, None, "worker-1")
    store.record_poll(other, "worker-1", update=progress(50))  # at 62 s: done at 123 s
    assert plan_of(store, other) == (124.0, None, None)  # a poll plans the next look itself
    assert store.claim_due("evolink", "worker-1", limit=5, lease_seconds=30) == []

    clock.now = T0 + timedelta(seconds=100)
    callback(slow, progress(80))  # done at 125 s: earlier than the look at 251 s
    assert plan_of(store, slow) == (126.0, None, None)
    clock.now = T0 + timedelta(seconds=114)
    callback(slow, progress(95))  # done at 120 s
    assert plan_of(store, slow) == (121.0, None, None)
    callback(slow, DONE)
    assert plan_of(store, slow) == (None, None, None)
    store.engine.dispose()


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one"])
def test_a_callback_does_not_bring_a_failed_querys_wait_forward(
    database_url: str, batched: bool
) -> None:
    """After a failed status query the next look is its backoff, or the wait the provider
    asked for (Retry-After). A progress callback meanwhile, whose own plan is earlier, leaves
    it there: the provider is not asked again before it said; a final state still ends it."""
    clock = Clock()
    store = make_store(database_url, clock)

    callback = partial(apply_callback, store, batched=batched)

    task_id = new_task(store, provider_task_id="p-busy")
    clock.now = T0 + timedelta(seconds=62)
    (claim,) = store.claim_due("evolink", "worker-1", limit=1, lease_seconds=30)
    assert claim.task_id == task_id
    busy = UpstreamUnavailable("busy", provider="evolink", retry_after=600)
    store.record_poll(task_id, "worker-1", error=busy)
    assert plan_of(store, task_id) == (662.0, None, None)  # as the provider asked
    clock.now = T0 + timedelta(seconds=100)
    callback(task_id, progress(90))  # done at about 111 s: its own plan is far earlier
    assert plan_of(store, task_id) == (662.0, None, None)
    clock.now = T0 + timedelta(seconds=700)  # the wait is over: plans as usual again
    callback(task_id, progress(95))
    assert plan_of(store, task_id)[0] != 662.0
    callback(task_id, DONE)
    assert plan_of(store, task_id) == (None, None, None)
    store.engine.dispose()


def poll_errors_of(store: Store, task_id: str) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(Task.poll_errors).where(Task.id == task_id)  # type: ignore[call-overload]
            ).scalar_one()
        )


def test_a_refused_refresh_leaves_the_schedule_and_its_backoff_as_they_were(
    database_url: str,
) -> None:
    """A refresh (``manual``) the provider refuses: neither the look ahead nor the plan kept
    for later (``planned_check_at``) comes forward, and it counts as no failure; unless the
    provider asks for a wait beyond them, which then stands as a failed query's would."""
    clock = Clock()
    store = make_store(database_url, clock)
    task_id = new_task(store, provider_task_id="p-refreshed")
    clock.now = T0 + timedelta(seconds=20)
    store.apply_update(task_id, progress(10), UpdateSource.callback)  # done at 200 s
    assert plan_of(store, task_id) == (61.0, 201.0, None)

    clock.now = T0 + timedelta(seconds=58)
    refused = UpstreamUnavailable("busy", provider="evolink")  # its backoff: about 5 s
    result = store.record_poll(task_id, None, error=refused, manual=True)
    assert result.task["status"] == "running"
    assert plan_of(store, task_id) == (61.0, 201.0, None)  # was (63.x, None): 138 s early
    assert poll_errors_of(store, task_id) == 0
    clock.now = T0 + timedelta(seconds=100)
    store.apply_update(task_id, progress(80), UpdateSource.callback)  # done at 125 s
    assert plan_of(store, task_id) == (126.0, None, None)  # news from a callback, as ever

    clock.now = T0 + timedelta(seconds=110)
    wait = UpstreamUnavailable("busy", provider="evolink", retry_after=600)
    store.record_poll(task_id, None, error=wait, manual=True)
    assert plan_of(store, task_id) == (710.0, None, None)  # later: the provider asked
    assert poll_errors_of(store, task_id) == 1
    store.engine.dispose()


def stalled_plans(store: Store) -> dict[str, list[str]]:
    """Tasks as a stalled scheduler finds them at T0 + 100 s: eleven due (at 10-20 s) whose
    look was planned later since (at 1,000-1,010 s), and, around them, one whose later plan
    is itself past (due at 5 s, planned at 50 s), four really due (30-33 s) and one not due
    yet (200 s). Returned by kind, each earliest first."""
    kinds = {"moved": 11, "plan_past": 1, "due": 4, "not_due": 1}
    tasks = {kind: [new_task(store) for _ in range(count)] for kind, count in kinds.items()}
    plans = [(tasks["plan_past"][0], 5, 50), (tasks["not_due"][0], 200, None)]
    plans += [(task_id, 30 + i, None) for i, task_id in enumerate(tasks["due"])]
    plans += [(task_id, 10 + i, 1000 + i) for i, task_id in enumerate(tasks["moved"])]
    with store.engine.begin() as connection:
        for task_id, at, later in plans:
            connection.execute(
                sa.update(Task)
                .where(Task.id == task_id)  # type: ignore[arg-type]
                .values(
                    next_check_at=T0 + timedelta(seconds=at),
                    planned_check_at=None if later is None else T0 + timedelta(seconds=later),
                )
            )
    return tasks


def moves_per_transaction(store: Store) -> list[int]:
    """Rows moved to their later plan by each committed transaction from now on."""
    counts = [0]

    @sa.event.listens_for(store.engine, "after_cursor_execute")
    def counted(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "SET next_check_at=task.planned_check_at" in statement:
            counts[-1] += cursor.rowcount

    @sa.event.listens_for(store.engine, "commit")
    def committed(connection: Any) -> None:
        counts.append(0)

    return counts


def test_a_backlog_of_later_plans_is_moved_in_short_transactions(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stall, the due tasks whose look was planned later since can be tens of
    thousands, ahead of the tasks really due. One claim moves them all and still claims the
    tasks due behind them, earliest first; but in transactions of at most
    MOVES_PER_TRANSACTION moves each (set-based statements), so no transaction holds the
    write turn or the rows' locks for long. (Before: every move in the claim's one
    transaction, through the ORM: 50,000 moves held SQLite's write turn for 2.7 s and
    PostgreSQL's row locks for 18 s.)"""
    # 8: the second transaction's last page, grown after a page of moves alone, holds more
    # tasks really due than are still wanted.
    monkeypatch.setattr(store_module, "MOVES_PER_TRANSACTION", 8)
    clock = Clock()
    store = make_store(database_url, clock)
    tasks = stalled_plans(store)
    counts = moves_per_transaction(store)
    clock.now = T0 + timedelta(seconds=100)

    claims = store.claim_due("evolink", "worker-1", limit=3, lease_seconds=30)

    assert [claim.task_id for claim in claims] == tasks["plan_past"] + tasks["due"][:2]
    assert plan_of(store, tasks["plan_past"][0]) == (5.0, None, "worker-1")
    assert [plan_of(store, task_id) for task_id in tasks["due"]] == [
        (30.0, None, "worker-1"),
        (31.0, None, "worker-1"),
        (32.0, None, None),  # beyond the limit: left due
        (33.0, None, None),
    ]
    assert [plan_of(store, task_id) for task_id in tasks["moved"]] == [
        (1000.0 + i, None, None) for i in range(11)
    ]
    assert plan_of(store, tasks["not_due"][0]) == (200.0, None, None)
    assert sum(counts) == 11 and max(counts) == 8, counts  # 8, then 3 with the claims
    claims = store.claim_due("evolink", "worker-2", limit=3, lease_seconds=30)
    assert [claim.task_id for claim in claims] == tasks["due"][2:]
    assert store.claim_due("evolink", "worker-3", limit=3, lease_seconds=30) == []
    store.engine.dispose()


def test_a_claim_cut_short_by_the_database_keeps_what_it_committed(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the database fails after the claim's first transaction, the tasks leased in it
    are returned to be polled (their leases are committed: dropping them would leave the
    tasks untouched until the leases ran out); the rest stays due for the next pass."""
    monkeypatch.setattr(store_module, "MOVES_PER_TRANSACTION", 4)
    clock = Clock()
    store = make_store(database_url, clock)
    tasks = stalled_plans(store)
    clock.now = T0 + timedelta(seconds=100)
    transactions = 0
    real_claim_some = store._claim_some

    def failing_after_one(*args: Any) -> Any:
        nonlocal transactions
        transactions += 1
        if transactions > 1:
            raise StoreUnavailable("the database is unavailable")
        return real_claim_some(*args)

    monkeypatch.setattr(store, "_claim_some", failing_after_one)
    claims = store.claim_due("evolink", "worker-1", limit=3, lease_seconds=30)
    # The first transaction leased the task due at 5 s and moved the first four of the others.
    assert [claim.task_id for claim in claims] == tasks["plan_past"]
    assert plan_of(store, tasks["plan_past"][0]) == (5.0, None, "worker-1")
    assert [plan_of(store, task_id)[:2] for task_id in tasks["moved"][3:5]] == [
        (1003.0, None),
        (14.0, 1004.0),
    ]
    assert transactions == 2

    # The database is back: the next pass goes on from there.
    monkeypatch.setattr(store, "_claim_some", real_claim_some)
    claims = store.claim_due("evolink", "worker-2", limit=3, lease_seconds=30)
    assert [claim.task_id for claim in claims] == tasks["due"][:3]
    assert all(plan_of(store, task_id)[1] is None for task_id in tasks["moved"])

    def never_reached(*args: Any) -> Any:
        raise StoreUnavailable("the database is unavailable")

    monkeypatch.setattr(store, "_claim_some", never_reached)
    with pytest.raises(StoreUnavailable):  # nothing claimed yet: the pass learns of it
        store.claim_due("evolink", "worker-3", limit=3, lease_seconds=30)
    store.engine.dispose()


def test_progress_callbacks_update_the_task_row_in_place_on_postgresql(empty_postgres: str) -> None:
    """A progress callback that only pushes the next look later changes no indexed column of
    the task, and the table's pages keep room (fill factor, migration 0007): PostgreSQL
    updates the row in place (a HOT update) instead of adding an entry to each of the task's
    indexes. Read from the server's counters for a database of the test's own, on both of
    the writer's paths. (Before: no HOT update at all, the next check moved every time.)

    A page makes room by pruning the row versions no transaction can see any more, and any
    transaction open on the server meanwhile, in any database (another test's), can hold
    that back: then nearly every update misses its page. So the round is made again, on new
    tasks, after a pause, up to three times; one round must be in place. A column the
    callbacks changed in an index would make every round miss."""
    migrate(empty_postgres)
    clock = Clock()
    tasks = 40
    wanted = 0.9 * 5 * tasks  # every update after each task's first, but for one without room

    def round_of_callbacks(number: int) -> None:
        clock.now = T0
        store = make_store(empty_postgres, clock)
        ids = [new_task(store, provider_task_id=f"p{number}-{i}") for i in range(tasks)]

        def send(value: int, at: float, *, pipelined: bool) -> None:
            """Each task's callback in a batch of its own: a batch of every task would need
            room for a new version of every row of a page at once."""
            clock.now = T0 + timedelta(seconds=at)
            for task_id in ids:
                request = UpdateRequest(task_id, progress(value), UpdateSource.callback, receipt())
                with store.core_transaction() as (connection, written):
                    (result,) = ingest.apply_updates(
                        store, connection, written, [request], pipelined=pipelined
                    )
                assert isinstance(result, ApplyResult), result

        send(1, 5, pipelined=True)  # queued -> running: the status (indexed) changes
        # Done at 667, 750, 800, 833 and 786 s: each plan later than the look at 61 s, ahead.
        for step, (value, at) in enumerate([(3, 20), (4, 30), (5, 40), (6, 50), (7, 55)]):
            send(value, at, pipelined=step % 2 == 0)
        later = [plan_of(store, task_id) for task_id in ids]
        assert all(p[0] == 61.0 and p[1] is not None and p[1] > 61.0 for p in later), later[:3]
        store.engine.dispose()  # the server's backends flush their counters as they exit

    engine = sa.create_engine(sa.make_url(empty_postgres), poolclass=sa.pool.NullPool)

    def counters(at_least: int) -> tuple[int, int]:
        """The task table's (updates, of them in place), once ``at_least`` updates show."""
        found = (0, 0)
        for _ in range(100):
            with engine.connect() as connection:
                found = connection.exec_driver_sql(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'task'"
                ).one()
            if found[0] >= at_least:
                break
            time.sleep(0.1)
        return int(found[0]), int(found[1])

    rounds: list[tuple[int, int]] = []
    before = (0, 0)
    try:
        for number in range(3):
            round_of_callbacks(number)
            after = counters(before[0] + 6 * tasks)
            rounds.append((after[0] - before[0], after[1] - before[1]))
            assert rounds[-1][0] == 6 * tasks, rounds
            if rounds[-1][1] >= wanted:
                break
            before = after
            time.sleep(2.0 * (number + 1))  # for the transaction in the way to end
    finally:
        engine.dispose()
    assert rounds[-1][1] >= wanted, rounds
