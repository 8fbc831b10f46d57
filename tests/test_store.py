"""The store on a real database: transactions, races, history."""

from __future__ import annotations

import base64
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlmodel import Session, select

from service import ingest, outbox
from service.db import ManyRows, make_engine, without_fsync
from service.errors import Conflict, Unprocessable, ValidationFailed
from service.lifecycle import TaskUpdate
from service.models import (
    ReceiptOutcome,
    Task,
    TaskOrigin,
    TaskStatus,
    UpdateSource,
    UTCDateTime,
    json_type,
)
from service.polling import PollPolicy
from service.store import MAX_ROW_ID, ReceiptDraft, Store, decode_cursor, encode_cursor
from tests.conftest import query_plan, statements_with

IMAGE = ({"url": "https://cdn.example/1.png"},)


def new_task(store: Store, owner: str = "alice") -> str:
    result = store.create_task(
        owner=owner, provider="evolink", origin=TaskOrigin.tracked, request={}, metadata={}
    )
    return str(result.task["id"])


def event_types(store: Store, task_id: str) -> list[str]:
    return [event.type for event in store.list_events("alice", task_id)]


def test_racing_poll_and_callbacks_make_one_transition(store: Store) -> None:
    task_id = new_task(store)
    barrier = threading.Barrier(8)

    def deliver(index: int) -> ReceiptOutcome:
        barrier.wait()
        source = UpdateSource.poll if index % 2 else UpdateSource.callback
        receipt = ReceiptDraft("evolink", b"{}", "application/json") if index % 2 == 0 else None
        return store.apply_update(
            task_id, TaskUpdate(status=TaskStatus.succeeded, images=IMAGE), source, receipt=receipt
        ).outcome

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(deliver, range(8)))
    assert outcomes.count(ReceiptOutcome.applied) == 1
    assert outcomes.count(ReceiptOutcome.terminal) == 7
    assert event_types(store, task_id) == ["task.submitted", "task.succeeded"]
    assert len(store.list_receipts("alice", task_id)[0]) == 4


def test_racing_progress_updates_never_lower_progress(store: Store) -> None:
    task_id = new_task(store)
    barrier = threading.Barrier(10)

    def deliver(progress: int) -> None:
        barrier.wait()
        store.apply_update(
            task_id, TaskUpdate(status=TaskStatus.running, progress=progress), UpdateSource.callback
        )

    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(deliver, range(10, 101, 10)))
    task = store.get_task("alice", task_id)
    assert task["progress"] == 100
    progresses = [event.progress for event in store.list_events("alice", task_id)]
    assert progresses == sorted(progresses)
    assert len(progresses) == len(set(progresses))


def test_event_snapshot_is_the_task_json_after_the_change(store: Store) -> None:
    task_id = new_task(store)
    store.apply_update(
        task_id, TaskUpdate(status=TaskStatus.succeeded, images=IMAGE), UpdateSource.poll
    )
    last = store.list_events("alice", task_id)[-1]
    assert last.data == store.get_task("alice", task_id)
    assert last.source == "poll"
    assert last.id.startswith("evt_")


def test_a_failed_transaction_leaves_no_event(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash once the event is written (SQLite: inserted; PostgreSQL: queued in the batch's
    pipeline, which the crash leaves unsynced) commits nothing."""
    task_id = new_task(store)
    original = outbox.match_subscriptions

    def broken(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise RuntimeError("crash after writing the event, before commit")

    monkeypatch.setattr(outbox, "match_subscriptions", broken)  # SQLite's path, in fan_out_many
    monkeypatch.setattr(ingest, "match_subscriptions", broken)  # PostgreSQL's pipeline
    with pytest.raises(RuntimeError):
        store.apply_update(task_id, TaskUpdate(status=TaskStatus.running), UpdateSource.poll)
    monkeypatch.undo()
    assert store.get_task("alice", task_id)["status"] == "queued"
    assert event_types(store, task_id) == ["task.submitted"]
    store.apply_update(task_id, TaskUpdate(status=TaskStatus.running), UpdateSource.poll)
    assert event_types(store, task_id) == ["task.submitted", "task.progress"]


def test_a_task_and_its_events_are_read_as_of_one_moment(store: Store) -> None:
    """A stream starts from the task and its events (``task_with_events``). The task finishing
    between the two reads showed, on PostgreSQL under READ COMMITTED, a succeeded task whose
    events ended before ``task.succeeded``: the stream sent that state, and ended without
    the final event. Now both are of one moment, on both databases."""
    task_id = new_task(store)
    store.apply_update(
        task_id, TaskUpdate(status=TaskStatus.running, progress=40), UpdateSource.poll
    )
    me = threading.get_ident()
    finished: list[bool] = []

    def finish() -> None:
        store.apply_update(
            task_id, TaskUpdate(status=TaskStatus.succeeded, images=IMAGE), UpdateSource.callback
        )

    def between(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if threading.get_ident() == me and "FROM task_event" in sql and not finished:
            finisher = threading.Thread(target=finish)
            finisher.start()
            finisher.join()
            finished.append(True)

    sa.event.listen(store.engine, "after_cursor_execute", between)
    try:
        task, events = store.task_with_events("alice", task_id)
    finally:
        sa.event.remove(store.engine, "after_cursor_execute", between)
    assert finished == [True]
    assert [event.type for event in events][-1] == "task.progress"
    assert task["status"] == "running" and events[-1].data["status"] == "running"
    task, events = store.task_with_events("alice", task_id)
    assert task["status"] == "succeeded" and events[-1].type == "task.succeeded"


def test_unsent_submissions_are_found_for_resumption(store: Store) -> None:
    sent = store.create_task(
        owner="a",
        provider="evolink",
        origin=TaskOrigin.submitted,
        request={"prompt": "x"},
        metadata={},
    ).task["id"]
    unsent = store.create_task(
        owner="a",
        provider="evolink",
        origin=TaskOrigin.submitted,
        request={"prompt": "y"},
        metadata={},
    ).task["id"]
    new_task(store)  # tracked tasks are never sent by TaskRelay
    assert store.mark_submit_attempt(sent, 1)
    assert store.unsent_submissions() == [unsent]


def submitted(store: Store, owner: str = "a") -> str:
    return str(
        store.create_task(
            owner=owner,
            provider="evolink",
            origin=TaskOrigin.submitted,
            request={"prompt": "x"},
            metadata={},
        ).task["id"]
    )


def test_a_planned_submit_retry_is_found_once_due_and_taken_by_one_attempt(store: Store) -> None:
    now = datetime.now(UTC)
    first, second, settled = submitted(store), submitted(store), submitted(store)
    for task_id in (first, second, settled):
        assert store.mark_submit_attempt(task_id, 1)
    assert store.plan_submit_retry(first, 1, now - timedelta(seconds=5))
    assert store.plan_submit_retry(second, 1, now + timedelta(seconds=60))
    assert store.plan_submit_retry(settled, 1, now - timedelta(seconds=9))
    # Only for the attempt just made, and only while the task is queued.
    assert not store.plan_submit_retry(first, 2, now)
    store.apply_update(settled, TaskUpdate(status=TaskStatus.failed), UpdateSource.callback)
    assert not store.plan_submit_retry(settled, 1, now)

    assert store.due_submit_retries(now) == [(first, 1)]
    later = now + timedelta(seconds=61)
    assert store.due_submit_retries(later) == [(first, 1), (second, 1)]  # most overdue first
    assert store.unsent_submissions() == []  # attempts were made: not "unsent"

    # The next attempt takes the plan off, whoever makes it; a second taker loses the race.
    assert store.mark_submit_attempt(first, 2)
    assert not store.mark_submit_attempt(first, 2)
    assert store.due_submit_retries(later) == [(second, 1)]


class StepClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


ANSWER_WITHIN = 640.0  # seconds; OpenAI's timeouts add up to 340, the margin is 300


def test_a_submission_whose_answer_is_lost_expires_when_due_and_no_other_task_does(
    database_url: str,
) -> None:
    """Sent to a provider that cannot call back (answer_within set), with no answer recorded
    ``answer_within`` after it was sent: the next look is planned for then, and then the task
    expires (``submission_unanswered``). An answer recorded, a retry planned, an attempt taken
    back, or a provider that calls back: nothing is due, nothing expires."""
    engine = make_engine(database_url)
    clock = StepClock()
    policies = {
        "openai": PollPolicy(60, 3600, queryable=False, answer_within=ANSWER_WITHIN),
        "evolink": PollPolicy(60, 3600),
    }
    store = Store(engine, clock=clock, policies=policies)

    def create(provider: str) -> str:
        created = store.create_task(
            owner="a",
            provider=provider,
            origin=TaskOrigin.submitted,
            request={"prompt": "x"},
            metadata={},
        )
        return str(created.task["id"])

    def plan_of(task_id: str) -> tuple[datetime | None, datetime | None]:
        with Session(engine) as session:
            row = session.exec(select(Task).where(Task.id == task_id)).one()
            return row.submit_answer_due_at, row.next_check_at

    try:
        lost, answered, refused, unmarked, called_back, old_release = (
            create("openai"),
            create("openai"),
            create("openai"),
            create("openai"),
            create("evolink"),
            create("openai"),
        )
        sent_at = clock.now
        for task_id in (lost, answered, refused, unmarked, called_back, old_release):
            assert store.mark_submit_attempt(task_id, 1)
        due = sent_at + timedelta(seconds=ANSWER_WITHIN)
        assert plan_of(lost) == (due, due)
        assert plan_of(called_back) == (None, sent_at + timedelta(hours=1))  # the deadline
        store.apply_update(answered, TaskUpdate(provider_task_id="p-1"), UpdateSource.submit)
        assert store.plan_submit_retry(refused, 1, due + timedelta(seconds=30))
        assert store.unmark_submit_attempt(unmarked, 1)
        assert plan_of(refused)[0] is None and plan_of(unmarked)[0] is None
        # Refused, then sent again by a replica of a release before 0010 (its bare compare-
        # and-set): no due time of that attempt's, and the first one's went with its refusal.
        assert store.plan_submit_retry(old_release, 1, sent_at)
        with engine.begin() as connection:
            connection.execute(
                sa.update(Task)
                .where(Task.id == old_release)  # type: ignore[arg-type]
                .values(submit_attempts=2, submit_retry_at=None)
            )

        clock.now = due - timedelta(seconds=1)
        assert store.expire_unanswered(lost, "lost") is None  # not yet
        clock.now = due
        for task_id in (answered, refused, unmarked, called_back, old_release):
            assert store.expire_unanswered(task_id, "lost") is None, task_id
            assert store.find_task(task_id)["status"] == "queued"  # type: ignore[index]
        result = store.expire_unanswered(lost, "the answer was lost")
        assert result is not None and result.event is not None
        assert result.event["type"] == "task.expired"
        task = result.task
        assert task["status"] == "expired"
        assert task["error"] == {"code": "submission_unanswered", "message": "the answer was lost"}
        assert plan_of(lost)[1] is None  # final: no look left
        assert store.expire_unanswered(lost, "again") is None  # once

        # The answer still comes (a process that outlived every timeout): it is taken.
        images = ({"url": "https://files.example/1.png"},)
        late = TaskUpdate(status=TaskStatus.succeeded, images=images)
        store.apply_update(lost, late, UpdateSource.submit)
        assert store.find_task(lost)["status"] == "succeeded"  # type: ignore[index]
    finally:
        engine.dispose()


def test_giving_up_a_submission_fails_it_only_if_it_has_not_moved_on(store: Store) -> None:
    """The same guard as the next attempt's (:meth:`Store.mark_submit_attempt`), checked in
    the failure's own transaction: a task settled meanwhile, or sent again by another
    process, is left as it is."""
    now = datetime.now(UTC)
    planned, resent, settled = submitted(store), submitted(store), submitted(store)
    for task_id in (planned, resent, settled):
        assert store.mark_submit_attempt(task_id, 1)
        assert store.plan_submit_retry(task_id, 1, now)
    assert store.mark_submit_attempt(resent, 2)
    store.apply_update(settled, TaskUpdate(status=TaskStatus.running), UpdateSource.callback)
    error = {"code": "submit_attempts_exhausted", "message": "no more"}

    assert not store.give_up_submission(resent, 1, error)
    assert not store.give_up_submission(settled, 1, error)
    assert not store.give_up_submission(planned, 2, error)
    assert store.give_up_submission(planned, 1, error)
    assert not store.give_up_submission(planned, 1, error)  # once

    task = store.get_task("a", planned)
    assert task["status"] == "failed" and task["error"] == error
    assert task["submit_attempts"] == 1  # no attempt was made
    with store.engine.connect() as connection:  # the plan is off (and out of its index)
        retry_at = connection.execute(
            sa.select(Task.submit_retry_at).where(Task.id == planned)  # type: ignore[call-overload]
        ).scalar_one()
    assert retry_at is None
    assert [event.type for event in store.list_events("a", planned)] == [
        "task.submitted",
        "task.failed",
    ]
    assert store.get_task("a", resent)["status"] == "queued"
    assert store.get_task("a", settled)["status"] == "running"


def test_unsent_submissions_come_oldest_first_from_their_own_index(store: Store) -> None:
    """The submission sweep's query reads ix_task_unsent_created_at, which holds only the
    submitted tasks never sent, not every queued task: oldest first, before a cut-off."""
    now = datetime.now(UTC)
    ages = {submitted(store): age for age in (30, 90, 60)}  # seconds old
    sent = submitted(store)
    assert store.mark_submit_attempt(sent, 1)
    new_task(store)  # tracked: queued, never sent by TaskRelay
    with store.engine.begin() as connection:
        for task_id, age in [*ages.items(), (sent, 120)]:
            connection.execute(
                sa.update(Task)
                .where(Task.id == task_id)  # type: ignore[arg-type]
                .values(created_at=now - timedelta(seconds=age))
            )
    oldest_first = sorted(ages, key=ages.__getitem__, reverse=True)
    assert store.unsent_submissions() == oldest_first
    assert store.unsent_submissions(limit=2) == oldest_first[:2]
    with statements_with(store.engine, "submit_attempts = 0") as seen:
        cut_off = now - timedelta(seconds=45)
        assert store.unsent_submissions(created_before=cut_off) == oldest_first[:2]
    ((sql, parameters),) = seen
    plan = query_plan(store.engine, sql, parameters)
    if store.engine.dialect.name == "sqlite":
        expected = "SEARCH task USING INDEX ix_task_unsent_created_at (created_at<?)"
    else:
        expected = "Index Scan using ix_task_unsent_created_at on task"
    assert expected in plan, plan
    assert "SORT" not in plan.upper(), plan  # the index's order, not a sort of what it read


def test_the_sweep_for_due_retries_reads_only_the_planned_rows(store: Store) -> None:
    now = datetime.now(UTC)
    for _ in range(3):
        task_id = submitted(store)
        assert store.mark_submit_attempt(task_id, 1)
        assert store.plan_submit_retry(task_id, 1, now)
    with statements_with(store.engine, "submit_retry_at <") as seen:
        assert len(store.due_submit_retries(now + timedelta(seconds=1))) == 3
    ((sql, parameters),) = seen
    plan = query_plan(store.engine, sql, parameters)
    if store.engine.dialect.name == "sqlite":
        expected = "SEARCH task USING INDEX ix_task_status_submit_retry_at "
        expected += "(status=? AND submit_retry_at<?)"
    else:
        expected = "Index Scan using ix_task_status_submit_retry_at on task"
    assert expected in plan, plan


def test_timestamps_are_utc_and_ordered(store: Store) -> None:
    task_id = new_task(store)
    store.apply_update(task_id, TaskUpdate(status=TaskStatus.failed), UpdateSource.callback)
    task = store.get_task("alice", task_id)
    assert task["created_at"].endswith("Z")
    assert task["created_at"] <= task["updated_at"] == task["completed_at"]
    with store.engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM task_event")).scalar_one()
    assert count == 2


def test_only_one_process_may_make_each_submit_attempt(store: Store) -> None:
    """Every replica resumes unsent tasks at start-up; the attempt counter is a
    compare-and-set, so exactly one of them sends each task."""
    task_id = store.create_task(
        owner="a",
        provider="evolink",
        origin=TaskOrigin.submitted,
        request={"prompt": "x"},
        metadata={},
    ).task["id"]
    barrier = threading.Barrier(6)

    def try_first_attempt(_: int) -> bool:
        barrier.wait()
        return store.mark_submit_attempt(task_id, 1)

    with ThreadPoolExecutor(max_workers=6) as pool:
        winners = list(pool.map(try_first_attempt, range(6)))
    assert winners.count(True) == 1
    assert store.mark_submit_attempt(task_id, 2)  # the winner's retry
    assert not store.mark_submit_attempt(task_id, 2)
    store.apply_update(task_id, TaskUpdate(status=TaskStatus.failed), UpdateSource.submit)
    assert not store.mark_submit_attempt(task_id, 3)  # settled: nothing left to send


def test_a_create_beaten_to_its_idempotency_key_replays_the_winner(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two identical requests with one key: the second's key lookup can read a snapshot from
    before the first committed, and its provider task id check (READ COMMITTED: a snapshot of
    its own) one from after. It must replay the first's task, not call it a conflict."""
    request: dict[str, Any] = dict(
        owner="alice",
        provider="evolink",
        origin=TaskOrigin.tracked,
        request={},
        metadata={},
        provider_task_id="up-1",
        request_fingerprint="f1",
    )
    winner = store.create_task(**request, idempotency_key="k1")
    lookup = Store._by_idempotency_key
    stale: list[None] = []  # lookups to answer as the snapshot before the winner committed

    def lookup_from_before_the_commit(session: Session, owner: str, key: str) -> Task | None:
        return stale.pop() if stale else lookup(session, owner, key)

    monkeypatch.setattr(Store, "_by_idempotency_key", staticmethod(lookup_from_before_the_commit))
    stale.append(None)
    replay = store.create_task(**request, idempotency_key="k1")
    assert replay.created is False
    assert replay.task["id"] == winner.task["id"]

    stale.append(None)
    with pytest.raises(Unprocessable):  # the same key with another body
        store.create_task(**{**request, "request_fingerprint": "f2"}, idempotency_key="k1")
    for key in (None, "k2"):  # the provider task id is another request's
        with pytest.raises(Conflict) as conflict:
            store.create_task(**request, idempotency_key=key)
        assert conflict.value.code == "already_tracked"


def test_a_cursor_decodes_only_as_a_page_issued_it() -> None:
    def cursor_of(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    assert decode_cursor(encode_cursor(MAX_ROW_ID)) == MAX_ROW_ID
    assert decode_cursor(encode_cursor(1)) == 1
    for text in [
        '{"before": true}',
        '{"before": false}',
        '{"before": 5.0}',
        '{"before": "5"}',
        '{"before": 0}',
        f'{{"before": {MAX_ROW_ID + 1}}}',
        "[5]",
        "[" * 5000,
        "[" * 30,
    ]:
        with pytest.raises(ValidationFailed) as refused:
            decode_cursor(cursor_of(text))
        assert refused.value.details == [
            {"field": "cursor", "message": "not a cursor issued by this API"}
        ]


# --- datetimes on SQLite ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 21, 6, 5, 51, 123456, tzinfo=UTC),
        datetime(2026, 11, 21, 6, 5, 51, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 11, 21, 8, 5, 51, 7, tzinfo=timezone(timedelta(hours=2))),
        datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),
    ],
)
def test_sqlite_datetimes_are_stored_as_sqlalchemy_stores_them(
    tmp_path: Path, moment: datetime
) -> None:
    """UTCDateTime's one-step SQLite processors write exactly the text SQLAlchemy's own DATETIME
    writes (so stored files, and text comparisons in queries, are unchanged) and read back the
    same instant, aware and in UTC."""
    dialect = sqlite.dialect()
    column_type = UTCDateTime()
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    expected_text = sqlite.DATETIME().bind_processor(dialect)(naive_utc)
    assert column_type.bind_processor(dialect)(moment) == expected_text

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'times.db'}")
    table = sa.Table(
        "times", sa.MetaData(), sa.Column("at", column_type), sa.Column("n", sa.Integer)
    )
    table.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), [{"at": moment, "n": 1}, {"at": None, "n": 2}])
        stored = connection.exec_driver_sql("SELECT at FROM times ORDER BY n").scalars().all()
        loaded = connection.execute(sa.select(table.c.at).order_by(table.c.n)).scalars().all()
    engine.dispose()
    assert stored == [expected_text, None]
    assert loaded == [moment, None]
    assert loaded[0] is not None and loaded[0].tzinfo is UTC


def test_sqlite_datetimes_refuse_naive_values() -> None:
    bind = UTCDateTime().bind_processor(sqlite.dialect())
    with pytest.raises(ValueError, match="naive datetime"):
        bind(datetime(2026, 11, 21, 6, 5, 51))


def _synchronous(connection: sa.Connection) -> int:
    return int(connection.exec_driver_sql("PRAGMA synchronous").scalar_one())


def test_a_commit_without_fsync_is_committed_and_leaves_the_connection_syncing(
    store: Store,
) -> None:
    """``fsync=False`` (the dispatcher's bookkeeping) commits with synchronous=NORMAL on SQLite,
    and the connection goes back to the pool syncing every commit again, so the next callback
    batch on it is durable. On PostgreSQL it changes nothing."""
    task_id = new_task(store)
    sqlite_store = store.engine.dialect.name == "sqlite"
    with store.core_transaction(fsync=False) as (connection, _):
        if sqlite_store:
            assert _synchronous(connection) == 1  # NORMAL: no fsync at this commit
        driver = connection.connection.driver_connection
        connection.execute(
            sa.update(ingest.TASK).where(ingest.TASK.c.id == task_id).values(progress=42)
        )
    if sqlite_store:
        assert driver.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL again
        with store.core_transaction() as (connection, _):
            assert _synchronous(connection) == 2
    assert store.get_task("alice", task_id)["progress"] == 42


def test_skipping_the_fsync_must_start_before_the_transaction(tmp_path: Path) -> None:
    """SQLite refuses to change synchronous inside a transaction; without_fsync says so at
    once rather than failing at the driver."""
    engine = make_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")  # autobegins
            with (
                pytest.raises(RuntimeError, match="before the transaction"),
                without_fsync(connection),
            ):
                pass
    finally:
        engine.dispose()


def test_a_commit_without_fsync_that_must_last_syncs_the_log(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction without fsync that wrote something it must not lose (``must_sync``)
    fsyncs SQLite's write-ahead log once committed; the others do not."""
    synced: list[str] = []
    fsync = os.fsync

    def spy(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    task_id = new_task(store)
    for must_sync in (False, True, False):
        with store.core_transaction(fsync=False) as (connection, written):
            connection.execute(
                sa.update(ingest.TASK).where(ingest.TASK.c.id == task_id).values(progress=7)
            )
            written.must_sync = must_sync
    if store.engine.dialect.name == "sqlite":
        database = store.engine.url.database
        assert database is not None
        assert synced == [f"{Path(database).resolve()}-wal"]
    else:
        assert synced == []


def test_many_rows_writes_exactly_what_core_writes(database_url: str) -> None:
    """ManyRows (the hot path's INSERTs and UPDATEs on the driver's SQL) stores every type the
    way a Core ``execute`` does: aware datetimes as UTC, JSON (None as JSON null), bytes,
    booleans and NULLs."""
    engine = make_engine(database_url)
    table = sa.Table(
        "many_rows_check",
        sa.MetaData(),
        sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", UTCDateTime()),
        sa.Column("data", json_type()),
        sa.Column("body", sa.LargeBinary),
        sa.Column("flag", sa.Boolean),
        sa.Column("label", sa.String(16)),
    )
    moment = datetime(2026, 11, 21, 8, 5, 51, 7, tzinfo=timezone(timedelta(hours=2)))
    rows = [
        {"at": moment, "data": {"a": [1, "é"]}, "body": b"\x00\xff", "flag": True, "label": "x"},
        {"at": None, "data": None, "body": b"", "flag": False, "label": None},
    ]
    names = ["n", "at", "data", "body", "flag", "label"]
    insert = sa.insert(table).values({name: sa.bindparam(name) for name in names}).inline()
    update = (
        sa.update(table)
        .where(table.c.n == sa.bindparam("key"))
        .values(label=sa.bindparam("new_label"), at=sa.bindparam("new_at"))
    )
    table.metadata.create_all(engine)
    try:
        with engine.begin() as connection:
            connection.execute(insert, [{"n": i, **row} for i, row in enumerate(rows)])
            ManyRows(insert).execute(
                connection, [{"n": 10 + i, **row} for i, row in enumerate(rows)]
            )
            changes = [{"new_label": "y", "new_at": moment}, {"new_label": None, "new_at": None}]
            connection.execute(update, [{"key": i, **change} for i, change in enumerate(changes)])
            ManyRows(update).execute(
                connection, [{"key": 10 + i, **change} for i, change in enumerate(changes)]
            )
            # As the driver reads them back: SQLite's text, PostgreSQL's own types.
            stored = connection.exec_driver_sql(
                "SELECT at, data, body, flag, label, n FROM many_rows_check ORDER BY n"
            ).all()
        assert [row[:-1] for row in stored[:2]] == [row[:-1] for row in stored[2:]]
        assert [row[-1] for row in stored] == [0, 1, 10, 11]
        assert stored[2][0] is not None and stored[3][0] is None  # the update's NULL
    finally:
        table.metadata.drop_all(engine)
        engine.dispose()


def test_a_receipt_row_has_exactly_the_columns_its_insert_binds(store: Store) -> None:
    """The batch's receipt INSERT (ManyRows) binds every column but the key: a key
    receipt_row() lacked would fail the batch, one it gained would be dropped silently."""
    draft = ReceiptDraft("evolink", b"{}", "application/json")
    row = store.receipt_row(1, draft, ReceiptOutcome.applied, None)
    assert set(row) == {column.name for column in ingest.RECEIPT.c if column.name != "pk"}
