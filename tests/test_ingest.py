"""Group commit: many updates in one transaction (service/ingest.py, service/groupcommit.py).

The batch path must be indistinguishable from applying the same updates one at a time: same
task states, same history, same receipts, same deliveries owed. Per-item failures stay per item.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from service.db import make_engine
from service.errors import Conflict, NotFound, StoreUnavailable
from service.groupcommit import GroupCommitter, Overloaded
from service.ingest import UpdateRequest
from service.lifecycle import TaskUpdate
from service.models import (
    CallbackReceipt,
    Delivery,
    DeliveryStatus,
    ReceiptOutcome,
    TaskOrigin,
    TaskStatus,
    UpdateSource,
)
from service.outbox import PROGRESS_DELAY, Outbox
from service.store import ApplyResult, ReceiptDraft, Store

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
    """Everything an update can touch, without the ids that differ from task to task."""
    out = []
    for task_id in task_ids:
        task, events = store.task_with_events(owner, task_id)
        task = {k: v for k, v in task.items() if k != "id"}
        history = [(e.type, e.status, e.progress, e.source) for e in events]
        receipts = [(r.outcome, r.error, r.body) for r in store.list_receipts(owner, task_id)]
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
    ids_a = [new_task(store, "alice", provider_task_id=f"p{i}") for i in range(4)]
    ids_b = [new_task(store, "bob", provider_task_id=f"p{i}") for i in range(4)]
    updates_a = random_updates(rng, ids_a, 60)
    mapping = dict(zip(ids_a, ids_b, strict=True))
    updates_b = [
        UpdateRequest(mapping[u.task_id], u.update, u.source, u.receipt) for u in updates_a
    ]

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
    assert [r.outcome for r in store.list_receipts("alice", second)] == ["rejected", "applied"]


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
    assert store.list_receipts("alice", taker) == []  # rolled back with its update


def test_the_batch_is_one_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of a batch (here: in fan-out, after the events were written)
    leaves no trace of any of its updates."""
    from service import ingest

    ids = [new_task(store) for _ in range(3)]

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("crash before commit")

    monkeypatch.setattr(ingest, "fan_out_many", broken)
    with pytest.raises(RuntimeError):
        store.apply_updates([UpdateRequest(i, DONE, UpdateSource.callback, receipt()) for i in ids])
    monkeypatch.undo()
    for task_id in ids:
        assert store.get_task("alice", task_id)["status"] == "queued"
        assert [e.type for e in store.list_events("alice", task_id)] == ["task.submitted"]
        assert store.list_receipts("alice", task_id) == []


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
    assert committer.updates == 41
    assert 3 <= committer.batches < 41  # 16 at most per batch, and batched under load
    with store.engine.connect() as connection:
        count = connection.execute(sa.select(sa.func.count()).select_from(CallbackReceipt))
        assert count.scalar() == 40


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
