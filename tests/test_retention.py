"""Retention (TASKRELAY_RETENTION): final tasks past it are deleted with everything kept for
them, and nothing else is; on both databases, through the running app and at the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel
from starlette.applications import Starlette

from service.db import make_engine
from service.errors import NotFound, StoreUnavailable
from service.files import ImageFiles, Removed
from service.lifecycle import TaskUpdate
from service.loops import Ticker
from service.metrics import PREFIX, Metrics, render
from service.models import Task, TaskOrigin, TaskStatus, UpdateSource
from service.polling import PollPolicy
from service.retention import RETRY_SECONDS, Pruner
from service.settings import SettingsError
from service.store import Store, new_id
from tests.conftest import ALICE, auth, make_settings, query_plan, serving, statements_with
from tests.test_callbacks import evolink_body
from tests.test_events import HOOK, Harness, harnessed

DAY = 86400.0
# Rows kept for a task, by table: how to count them for a set of task pks.
_ROWS_OF_TASKS = {
    "task": "SELECT count(*) FROM task WHERE pk IN ({pks})",
    "task_event": "SELECT count(*) FROM task_event WHERE task_pk IN ({pks})",
    "callback_receipt": "SELECT count(*) FROM callback_receipt WHERE task_pk IN ({pks})",
    "subscription": "SELECT count(*) FROM subscription WHERE task_pk IN ({pks})",
    "delivery": "SELECT count(*) FROM delivery WHERE task_pk IN ({pks})",
    "delivery_attempt": (
        "SELECT count(*) FROM delivery_attempt a JOIN delivery d ON d.pk = a.delivery_pk "
        "WHERE d.task_pk IN ({pks})"
    ),
}


def rows_of(engine: sa.Engine, task_ids: list[str]) -> dict[str, int]:
    """How many rows each table keeps for these tasks."""
    with engine.connect() as connection:
        quoted = ", ".join(f"'{task_id}'" for task_id in task_ids)
        pks = [
            pk
            for (pk,) in connection.exec_driver_sql(f"SELECT pk FROM task WHERE id IN ({quoted})")
        ]
        listed = ", ".join(str(pk) for pk in pks) or "NULL"
        return {
            table: int(connection.exec_driver_sql(sql.format(pks=listed)).scalar_one())
            for table, sql in _ROWS_OF_TASKS.items()
        }


def pending_deliveries(engine: sa.Engine, task_ids: list[str]) -> int:
    quoted = ", ".join(f"'{task_id}'" for task_id in task_ids)
    with engine.connect() as connection:
        return int(
            connection.exec_driver_sql(
                "SELECT count(*) FROM delivery d JOIN task t ON t.pk = d.task_pk "
                f"WHERE t.id IN ({quoted}) AND d.status = 'pending'"
            ).scalar_one()
        )


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(database_url, tmp_path, TASKRELAY_RETENTION="30d") as value:
        yield value


@pytest.fixture
async def pg_harness(postgres_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(postgres_url, tmp_path, TASKRELAY_RETENTION="30d") as value:
        yield value


async def tracked(client: httpx.AsyncClient, **body: Any) -> tuple[str, str]:
    """A tracked task's id and its callback path."""
    response = await client.post(
        "/v1/tasks/track", json={"provider": "evolink", **body}, headers=auth()
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], httpx.URL(response.json()["callback_url"]).path


async def test_a_task_past_retention_is_deleted_with_everything_kept_for_it(
    harness: Harness,
) -> None:
    pruner = harness.runtime.pruner
    assert isinstance(pruner, Pruner)
    harness.receiver.status["a"] = 500  # a failed attempt first: attempts and a retry
    subscription = await harness.subscribe("a")
    paused = await harness.subscribe("paused")  # disabled once it is owed deliveries

    async def finished_task() -> tuple[str, str]:
        task_id, path = await tracked(harness.client, notify_url=HOOK.format(name="own"))
        provider_id = {"id": f"task-unified-{task_id}"}  # one per task
        done = evolink_body(
            "completed", 100, results=["https://files.evolink.example/a.png"], **provider_id
        )
        for body in (evolink_body("processing", 40, **provider_id), done):
            response = await harness.client.post(path, json=body)
            assert response.status_code == 200, response.text
        return task_id, path

    old, old_callback = await finished_task()
    failed_old = await harness.track()
    harness.update(failed_old, TaskStatus.failed)
    unfinished = await harness.track()  # tracked as long ago, never finished
    response = await harness.client.patch(
        f"/v1/subscriptions/{paused['id']}", json={"enabled": False}, headers=auth()
    )
    assert response.status_code == 200, response.text
    await harness.deliver()
    harness.receiver.status["a"] = 200
    harness.clock.advance(3600)
    await harness.deliver()  # the retries succeed
    harness.clock.advance(2 * DAY)
    recent, _ = await finished_task()  # finished 2 days after the old ones
    await harness.deliver()
    images = harness.runtime.files.root / old
    images.mkdir(parents=True)
    (images / "0.png").write_bytes(b"\x89PNG")  # as if TaskRelay had stored the image
    assert (await harness.client.get(f"/files/{old}/0.png")).status_code == 200

    engine = harness.runtime.engine
    kept_before = rows_of(engine, [old, failed_old])
    assert all(kept_before.values()), kept_before  # every kind of row exists to delete
    owed = pending_deliveries(engine, [old, failed_old])
    assert owed > 0  # the paused subscription's
    others = [recent, unfinished]
    others_before = rows_of(engine, others)
    unfinished_before = rows_of(engine, [unfinished])

    harness.clock.advance(29 * DAY)  # the old ones 31 days ago, the recent one 29
    assert await pruner.prune_once() == 0  # a batch not full: nothing more to do now
    assert rows_of(engine, [old, failed_old]) == dict.fromkeys(_ROWS_OF_TASKS, 0)
    assert rows_of(engine, others) == others_before
    for task_id in (old, failed_old):
        response = await harness.client.get(f"/v1/tasks/{task_id}", headers=auth())
        assert response.status_code == 404
    for task_id in others:
        response = await harness.client.get(f"/v1/tasks/{task_id}", headers=auth())
        assert response.status_code == 200
    assert not images.exists()
    assert (await harness.client.get(f"/files/{old}/0.png")).status_code == 404
    late = evolink_body("completed", 100, id=f"task-unified-{old}")
    response = await harness.client.post(old_callback, json=late)  # a provider's late retry
    assert response.status_code == 404, response.text
    # The endpoint subscription stays; the pruned tasks' notify_url ones went with them.
    listed = (await harness.client.get("/v1/subscriptions", headers=auth(ALICE))).json()["data"]
    assert sorted(item["id"] for item in listed) == sorted([subscription["id"], paused["id"]])
    assert harness.runtime.metrics.counter("tasks_pruned_total") == 2
    # The webhooks that went with them are counted: events a subscriber will never get.
    assert harness.runtime.metrics.counter("deliveries_pruned_pending_total") == owed

    harness.clock.advance(2 * DAY)
    assert await pruner.prune_once() == 0
    assert rows_of(engine, [recent])["task"] == 0
    assert rows_of(engine, [unfinished]) == unfinished_before  # never final: kept
    assert (await harness.client.get(f"/v1/tasks/{unfinished}", headers=auth())).status_code == 200


def finished(store: Store, count: int, at: datetime) -> list[str]:
    """``count`` tracked tasks that finished at ``at``, ``at`` + 1 s, ..."""
    task_ids = []
    for index in range(count):
        task_id = store.create_task(
            owner="alice", provider="evolink", origin=TaskOrigin.tracked, request={}, metadata={}
        ).task["id"]
        store.apply_update(task_id, TaskUpdate(status=TaskStatus.failed), UpdateSource.poll)
        with store.engine.begin() as connection:
            connection.execute(
                sa.update(Task)
                .where(Task.id == task_id)  # type: ignore[arg-type]
                .values(completed_at=at + timedelta(seconds=index))
            )
        task_ids.append(task_id)
    return task_ids


def test_pruning_takes_the_longest_finished_first_in_batches(store: Store) -> None:
    now = datetime.now(UTC)
    older = finished(store, 3, now - timedelta(days=40))
    old = finished(store, 2, now - timedelta(days=35))
    cut_off = now - timedelta(days=30)
    kept = finished(store, 1, cut_off) + finished(store, 2, now - timedelta(days=20))
    assert store.prune_tasks(cut_off, limit=2) == older[:2]
    assert store.prune_tasks(cut_off, limit=2) == [older[2], old[0]]
    assert store.prune_tasks(cut_off, limit=2) == [old[1]]
    assert store.prune_tasks(cut_off, limit=2) == []
    # Finished exactly at the cut-off, or after it: kept.
    assert [store.get_task("alice", task_id)["id"] for task_id in kept] == kept


def test_a_task_followed_after_its_expiry_is_kept_until_its_deadline(database_url: str) -> None:
    """A GrsAI task expired because its submission's answer seemed lost, and then the answer
    came with GrsAI's task id: it is final (expired) but followed until its deadline, here
    longer than the retention. Retention keeps it until that deadline is past the cut-off, so
    GrsAI's final word still finds it; a task finished at the same moment and not followed
    is deleted."""
    now = datetime(2026, 11, 1, tzinfo=UTC)
    policies = {"grsai": PollPolicy(60, 3 * DAY, answer_within=640.0)}
    store = Store(make_engine(database_url), clock=lambda: now, policies=policies)
    try:
        followed = store.create_task(
            owner="alice", provider="grsai", origin=TaskOrigin.submitted, request={}, metadata={}
        ).task["id"]
        assert store.mark_submit_attempt(followed, 1)
        plain = finished(store, 1, now + timedelta(seconds=640))[0]
        now += timedelta(seconds=640)
        assert store.expire_unanswered(followed, "lost") is not None
        store.apply_update(followed, TaskUpdate(provider_task_id="g-1"), UpdateSource.submit)
        task = store.get_task("alice", followed)
        assert task["status"] == "expired" and task["provider_task_id"] == "g-1"
        with store.engine.connect() as connection:
            next_check_at = connection.execute(
                sa.select(Task.next_check_at).where(Task.id == followed)  # type: ignore[call-overload]
            ).scalar_one()
        assert next_check_at is not None  # followed: GrsAI is asked again

        deadline = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=3)
        assert store.prune_tasks(now + timedelta(days=1)) == [plain]
        assert store.prune_tasks(deadline) == []  # not before its deadline has passed
        assert store.get_task("alice", followed)["status"] == "expired"
        # Past it, the task is deleted, even with the look its deadline ends still planned.
        assert store.prune_tasks(deadline + timedelta(seconds=1)) == [followed]
    finally:
        store.engine.dispose()


async def test_a_sweep_goes_on_while_its_batches_come_back_full(
    store: Store, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    finished(store, 5, now - timedelta(days=40))
    metrics = Metrics()
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    pruner = Pruner(
        store,
        ImageFiles(tmp_path / "files", "http://testserver"),
        30 * DAY,
        metrics=metrics,
        clock=lambda: now,
        batch=2,
        pause=pause,
    )
    # The counter is scraped at 0 before the first sweep (which runs at start-up), so that
    # the first deletions show in increase() too.
    scraped = render(metrics).splitlines()
    assert f"{PREFIX}tasks_pruned_total 0" in scraped
    assert f"{PREFIX}deliveries_pruned_pending_total 0" in scraped
    # Full batches ask the ticker to go again, after a pause as long as the batch took; the
    # last, short one does not.
    assert [await pruner.prune_once() for _ in range(4)] == [2, 2, 0, 0]
    assert metrics.counter("tasks_pruned_total") == 5
    assert len(pauses) == 2 and all(0 < seconds < 10 for seconds in pauses), pauses


def test_replicas_pruning_at_once_delete_each_task_once(database_url: str) -> None:
    stores = [Store(make_engine(database_url)) for _ in range(3)]
    now = datetime.now(UTC)
    task_ids = finished(stores[0], 30, now - timedelta(days=40))
    barrier = threading.Barrier(len(stores))
    pruned: list[list[str]] = [[] for _ in stores]

    def sweep(index: int) -> None:
        barrier.wait()
        while batch := stores[index].prune_tasks(now - timedelta(days=30), limit=4):
            pruned[index].extend(batch)

    threads = [threading.Thread(target=sweep, args=(index,)) for index in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [task_id for batch in pruned for task_id in batch]
    assert sorted(every) == sorted(task_ids)  # each once, none left out
    for store in stores:
        store.engine.dispose()


def test_the_sweep_and_the_cascade_use_their_indexes(store: Store) -> None:
    """The sweep reads ix_task_completed_at; deleting an event looks its deliveries up in
    ix_delivery_event_seq (the foreign key's lookup, which would read the whole delivery
    table once per event without it)."""
    finished(store, 1, datetime.now(UTC) - timedelta(days=40))
    with statements_with(store.engine, "completed_at <") as seen:
        assert len(store.prune_tasks(datetime.now(UTC) - timedelta(days=30))) == 1
    ((sql, parameters),) = seen
    if store.engine.dialect.name == "postgresql":
        # On a table this small, a bitmap scan and a sort look cheapest; with thousands of
        # tasks past their retention, the index's order is what reads a batch alone.
        with store.engine.connect() as connection:
            connection.exec_driver_sql("SET enable_seqscan = off")
            connection.exec_driver_sql("SET enable_bitmapscan = off")
            rows = connection.exec_driver_sql("EXPLAIN " + sql, parameters)
            sweep = " | ".join(row[0] for row in rows)
    else:
        sweep = query_plan(store.engine, sql, parameters)
    cascade = query_plan(store.engine, "SELECT pk FROM delivery WHERE event_seq = 1")
    if store.engine.dialect.name == "sqlite":
        # (SQLite reads "IS NOT NULL" as "> NULL": a range with two ends.)
        assert "SEARCH task USING INDEX ix_task_completed_at (" in sweep, sweep
        assert "completed_at<?)" in sweep, sweep
        assert "ix_delivery_event_seq (event_seq=?)" in cascade, cascade
    else:
        assert "Index Scan using ix_task_completed_at on task" in sweep, sweep
        assert "ix_delivery_event_seq" in cascade, cascade
    assert "SORT" not in sweep.upper(), sweep


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TASKRELAY_RETENTION": "12h"}, "shorter than 1 day"),
        (
            {"TASKRELAY_RETENTION": "2d", "TASKRELAY_DELIVERY_SCHEDULE": "0s,1d,2d"},
            "not longer than the delivery schedule (3.00 d in all",
        ),
        (
            {"TASKRELAY_RETENTION": "3d", "TASKRELAY_DELIVERY_SCHEDULE": "0s,1d,2d"},
            "not longer than the delivery schedule (3.00 d in all",
        ),
        ({"TASKRELAY_RETENTION": "thirty days"}, "expected a duration such as 30d, or off"),
    ],
)
def test_a_retention_that_would_lose_work_is_refused(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        make_settings("sqlite:///unused.db", tmp_path, **environ)
    assert message in str(raised.value)
    assert raised.value.details["variable"] == "TASKRELAY_RETENTION"


def test_retention_is_off_unless_set(tmp_path: Path) -> None:
    assert make_settings("sqlite:///unused.db", tmp_path).retention is None
    assert make_settings("sqlite:///x.db", tmp_path, TASKRELAY_RETENTION="off").retention is None
    assert make_settings("sqlite:///x.db", tmp_path, TASKRELAY_RETENTION="30d").retention == (
        30 * DAY
    )
    # Just longer than a shorter schedule (and at least a day) is enough.
    shorter = make_settings(
        "sqlite:///x.db",
        tmp_path,
        TASKRELAY_RETENTION="3.01d",
        TASKRELAY_DELIVERY_SCHEDULE="0s,1d,2d",
    )
    assert shorter.retention == pytest.approx(3.01 * DAY)


async def test_a_running_service_sweeps_at_start(database_url: str, tmp_path: Path) -> None:
    """With TASKRELAY_RETENTION set, the service deletes what is past it on its own: its
    first sweep runs as it starts."""
    store = Store(make_engine(database_url))
    now = datetime.now(UTC)
    old = finished(store, 3, now - timedelta(days=40))
    kept = finished(store, 1, now - timedelta(days=10))
    store.engine.dispose()
    settings = make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_DISPATCHER="false",
        TASKRELAY_RETENTION="30d",
    )
    async with serving(settings, webhook_app=Starlette()) as (app, client):
        for _ in range(200):
            if rows_of(app.state.runtime.engine, old)["task"] == 0:
                break
            await asyncio.sleep(0.02)
        assert rows_of(app.state.runtime.engine, old)["task"] == 0
        for task_id in kept:
            assert (await client.get(f"/v1/tasks/{task_id}", headers=auth())).status_code == 200


def test_a_task_another_transaction_holds_is_skipped_not_waited_for(postgres_url: str) -> None:
    """PostgreSQL: a task locked elsewhere (a callback for it being written, another replica
    deleting it) is left for the next sweep; the sweep deletes the others at once."""
    store = Store(make_engine(postgres_url))
    now = datetime.now(UTC)
    held, *others = finished(store, 3, now - timedelta(days=40))
    cut_off = now - timedelta(days=30)
    pruned: list[list[str]] = []
    try:
        with store.engine.connect() as other:
            other.exec_driver_sql(f"SELECT pk FROM task WHERE id = '{held}' FOR UPDATE")
            sweep = threading.Thread(target=lambda: pruned.append(store.prune_tasks(cut_off)))
            sweep.start()
            sweep.join(timeout=5)
            done_while_held = not sweep.is_alive()
            other.rollback()
            sweep.join()
        assert done_while_held  # it did not wait for the held row
        assert pruned == [others]
        assert store.prune_tasks(cut_off) == [held]  # the next sweep's
    finally:
        store.engine.dispose()


def test_image_folders_are_removed_only_for_task_ids(tmp_path: Path) -> None:
    files = ImageFiles(tmp_path / "files", "http://testserver")
    (tmp_path / "files" / "tsk_a").mkdir(parents=True)
    (tmp_path / "files" / "tsk_a" / "0.png").write_bytes(b"png")
    (tmp_path / "outside").mkdir()
    assert files.remove(["tsk_a", "tsk_missing", "../outside", ".."]) == Removed(1, 0)
    assert not (tmp_path / "files" / "tsk_a").exists()
    assert (tmp_path / "outside").is_dir() and (tmp_path / "files").is_dir()


def pruner_of(store: Store, files: ImageFiles, now: datetime, batch: int = 100) -> Pruner:
    async def no_pause(seconds: float) -> None:
        pass

    return Pruner(
        store, files, 30 * DAY, metrics=Metrics(), clock=lambda: now, batch=batch, pause=no_pause
    )


def stored_images(files: ImageFiles, *task_ids: str, written: datetime) -> None:
    """Image folders for these tasks, as if written at ``written``."""
    for task_id in task_ids:
        (files.root / task_id).mkdir(parents=True)
        (files.root / task_id / "0.png").write_bytes(b"png")
        os.utime(files.root / task_id, (written.timestamp(), written.timestamp()))


async def test_image_folders_a_crash_left_behind_are_deleted_by_the_next_start(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between a batch's commit and its folders' removal leaves folders whose task
    is gone: the first sweep after the next start deletes them, and only them."""
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=41)
    files = ImageFiles(tmp_path / "files", "http://testserver")
    gone = finished(store, 3, long_ago)
    kept = finished(store, 2, now - timedelta(days=40)) + finished(store, 1, now)
    stored_images(files, *gone, *kept, written=long_ago)
    # Not TaskRelay's: other names, and a folder named like a task id but changed since the
    # cut-off (a task retention keeps, whatever this store says).
    for name in ("css", "backups", "tsk_short", f"{new_id('job')}"):
        (files.root / name).mkdir()
        os.utime(files.root / name, (long_ago.timestamp(), long_ago.timestamp()))
    (files.root / new_id("tsk")).write_bytes(b"")
    recent = new_id("tsk")
    stored_images(files, recent, written=now - timedelta(days=29))
    others = sorted(path.name for path in files.root.iterdir() if path.name not in gone + kept)
    assert sorted(store.prune_tasks(now - timedelta(days=30), limit=3)) == sorted(gone)
    # The process died here, before removing the folders. After the restart:
    restarted = pruner_of(store, files, now, batch=2)
    with caplog.at_level(logging.INFO, logger="service.retention"):
        assert await restarted.prune_once() == 2  # the orphans first, then a full batch
    assert sorted(files.task_folders(now.timestamp())) == sorted([*kept[2:], recent])
    assert sorted(path.name for path in files.root.iterdir() if path.name not in kept) == others
    lines = [record.getMessage() for record in caplog.records]
    assert "deleted the image folders of 3 tasks no longer stored (TASKRELAY_RETENTION)" in lines
    # Once per start: later sweeps do not list the folder again.
    unknown = new_id("tsk")
    stored_images(files, unknown, written=long_ago)
    assert [await restarted.prune_once() for _ in range(2)] == [0, 0]
    assert unknown in files.task_folders(now.timestamp())
    assert restarted.remove_orphans(now - timedelta(days=30)) == Removed(1, 0)
    assert unknown not in files.task_folders(now.timestamp())


async def test_a_folder_that_could_not_be_deleted_is_tried_again_next_sweep(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried again at the start of the next sweep, not before every batch of this one."""
    now = datetime.now(UTC)
    files = ImageFiles(tmp_path / "files", "http://testserver")
    first, *others = finished(store, 3, now - timedelta(days=40))
    stored_images(files, first, *others, written=now - timedelta(days=40))
    pruner = pruner_of(store, files, now, batch=1)
    real_rmtree = shutil.rmtree
    listings = 0
    real_folders = files.task_folders

    def counted(modified_before: float) -> list[str]:
        nonlocal listings
        listings += 1
        return real_folders(modified_before)

    def refused(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "task_folders", counted)
    monkeypatch.setattr(shutil, "rmtree", refused)
    assert [await pruner.prune_once() for _ in range(4)] == [1, 1, 1, 0]  # one sweep
    assert listings == 1
    assert store.existing_task_ids([first, *others]) == set()  # the tasks are gone, not so
    assert sorted(real_folders(now.timestamp())) == sorted([first, *others])  # their folders
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert await pruner.prune_once() == 0  # the next sweep
    assert listings == 2 and real_folders(now.timestamp()) == []


async def test_a_folder_whose_removal_failed_part_way_is_tried_again_next_sweep(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that fails after deleting some images changes the folder just now: it is
    still tried again by the next sweep, not only once it is a retention period old (its
    remaining images were served for a deleted task all that while)."""
    now = datetime.now(UTC)
    files = ImageFiles(tmp_path / "files", "http://testserver")
    (task_id,) = finished(store, 1, now - timedelta(days=40))
    stored_images(files, task_id, written=now - timedelta(days=40))
    (files.root / task_id / "1.png").write_bytes(b"png")
    os.utime(files.root / task_id, ((now - timedelta(days=40)).timestamp(),) * 2)
    pruner = pruner_of(store, files, now)
    real_rmtree = shutil.rmtree

    def part_way(path: Any, *args: Any, **kwargs: Any) -> None:
        (Path(path) / "0.png").unlink()  # one image goes, then the folder refuses
        raise OSError(16, "Device or resource busy", str(Path(path) / "1.png"))

    monkeypatch.setattr(shutil, "rmtree", part_way)
    assert await pruner.prune_once() == 0
    assert store.existing_task_ids([task_id]) == set()
    assert sorted(p.name for p in (files.root / task_id).iterdir()) == ["1.png"]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert await pruner.prune_once() == 0  # the next sweep
    assert not (files.root / task_id).exists()


async def test_a_files_folder_that_cannot_be_listed_does_not_stop_retention(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    (tmp_path / "files").write_bytes(b"")  # a file where the folder should be
    pruner = pruner_of(store, ImageFiles(tmp_path / "files", "http://testserver"), now)
    gone = finished(store, 2, now - timedelta(days=40))
    with caplog.at_level(logging.WARNING, logger="service.retention"):
        assert await pruner.prune_once() == 0
    assert store.existing_task_ids(gone) == set()
    assert any("could not look for image folders" in r.getMessage() for r in caplog.records)


async def test_no_files_folder_yet_is_nothing_to_clean(store: Store, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pruner = pruner_of(store, ImageFiles(tmp_path / "files", "http://testserver"), now)
    finished(store, 1, now - timedelta(days=40))
    assert await pruner.prune_once() == 0
    assert pruner._orphans_checked


async def test_a_sweep_the_database_failed_is_tried_again_soon(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not after the whole interval (retention's is 10 minutes): after ``retry_seconds``,
    with the reason in the log line (a deadlock, an outage)."""
    calls = 0
    again = asyncio.Event()

    async def step() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("gone", details={"reason": "DeadlockDetected"})
        again.set()
        return 0

    ticker = Ticker("retention", step, 600.0, retry_seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="service.loops"):
        ticker.start()
        try:
            await asyncio.wait_for(again.wait(), timeout=30)
        finally:
            await ticker.stop()
    assert calls == 2
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "retention pass skipped: the database is unavailable (DeadlockDetected); "
        "retried until it answers",
        "retention pass works again, after 1 skipped",
    ]
    pruner = pruner_of(store, ImageFiles(tmp_path / "files", "http://x"), datetime.now(UTC))
    assert pruner._ticker.retry_seconds == RETRY_SECONDS < pruner._ticker.tick_seconds


async def test_an_outage_is_logged_when_it_starts_and_ends_not_at_every_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passes retried several times a second must not log a line each while the database is
    down; a bug is logged with its traceback every time."""
    outcomes: list[Exception | None] = [
        *[StoreUnavailable("gone", details={"reason": "OperationalError"})] * 5,
        None,
        RuntimeError("a bug"),
        RuntimeError("a bug"),
        StoreUnavailable("gone again"),
        None,
    ]
    done = asyncio.Event()

    async def step() -> int:
        outcome = outcomes.pop(0)
        if not outcomes:
            done.set()
        if outcome is not None:
            raise outcome
        return 0 if done.is_set() else 1  # 1: found work, so the next pass comes at once

    ticker = Ticker("dispatcher", step, 600.0, retry_seconds=0.001)
    with caplog.at_level(logging.WARNING, logger="service.loops"):
        ticker.start()
        try:
            await asyncio.wait_for(done.wait(), timeout=30)
        finally:
            await ticker.stop()
    lines = [(record.getMessage(), record.exc_info is not None) for record in caplog.records]
    assert lines == [
        (
            "dispatcher pass skipped: the database is unavailable (OperationalError); "
            "retried until it answers",
            False,
        ),
        ("dispatcher pass works again, after 5 skipped", False),
        ("dispatcher pass failed", True),
        ("dispatcher pass failed", True),
        ("dispatcher pass skipped: the database is unavailable; retried until it answers", False),
        ("dispatcher pass works again, after 1 skipped", False),
    ]


def test_existing_task_ids_are_those_stored(store: Store) -> None:
    stored = finished(store, 2, datetime.now(UTC))
    assert store.existing_task_ids([*stored, "tsk_none", "x'; DROP TABLE task; --"]) == set(stored)
    assert store.existing_task_ids([]) == set()


def test_every_cascading_foreign_key_leads_an_index() -> None:
    """Deleting a row looks its children up through each foreign key: without an index
    led by the referencing column, SQLite and PostgreSQL read the whole child table for
    each row deleted (retention deletes tasks by the hundred)."""
    missing = []
    for table in SQLModel.metadata.tables.values():
        leading = {index.columns[0].name for index in table.indexes}
        leading |= {
            constraint.columns[0].name
            for constraint in table.constraints
            if isinstance(constraint, sa.UniqueConstraint | sa.PrimaryKeyConstraint)
            and constraint.columns
        }
        for key in table.foreign_keys:
            if key.ondelete == "CASCADE" and key.parent.name not in leading:
                missing.append(f"{table.name}.{key.parent.name}")
    assert missing == []


@contextlib.contextmanager
def sweep_racing(harness: Harness, statement: str) -> Iterator[list[bool]]:
    """A retention sweep started by another thread just before this thread next runs a
    statement starting with ``statement``, given a second to finish: yields [whether it
    finished in that second], and waits for it at the end."""
    engine = harness.runtime.engine
    me = threading.get_ident()
    cut_off = harness.clock.now() - timedelta(days=30)
    sweep = threading.Thread(target=harness.runtime.store.prune_tasks, args=(cut_off,))
    finished_first: list[bool] = []

    def before(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if threading.get_ident() == me and sql.startswith(statement) and not finished_first:
            sweep.start()
            sweep.join(timeout=1)
            finished_first.append(not sweep.is_alive())

    sa.event.listen(engine, "before_cursor_execute", before)
    try:
        yield finished_first
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
        if finished_first:
            sweep.join()


async def old_delivery(harness: Harness, subscription_id: str = "") -> tuple[str, str, str]:
    """A subscription (a new one unless given), a task that finished 31 days ago and the id
    of a delivery of it."""
    if not subscription_id:
        subscription_id = (await harness.subscribe("a"))["id"]
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    assert await harness.deliver() == 2
    harness.clock.advance(31 * DAY)
    with harness.runtime.engine.connect() as connection:
        delivery_id = connection.execute(
            sa.text(
                "SELECT min(d.id) FROM delivery d JOIN task t ON t.pk = d.task_pk WHERE t.id = :id"
            ),
            {"id": task_id},
        ).scalar_one()
    return subscription_id, task_id, str(delivery_id)


async def test_a_retry_racing_the_sweep_is_made_then_deleted(pg_harness: Harness) -> None:
    """PostgreSQL: a manual retry holds its delivery's row until it commits, so a sweep
    deleting the task meanwhile waits for it, then deletes it; the retry is not an update of
    a row gone meanwhile (a 500)."""
    _, task_id, delivery_id = await old_delivery(pg_harness)
    with sweep_racing(pg_harness, "UPDATE delivery") as finished_first:
        retried = pg_harness.runtime.outbox.retry_delivery("alice", delivery_id)
    assert finished_first == [False]  # the sweep waited for the retry's commit
    assert retried.delivery.status == "pending"
    assert rows_of(pg_harness.runtime.engine, [task_id]) == dict.fromkeys(_ROWS_OF_TASKS, 0)


async def test_a_replay_racing_the_sweep_is_made_then_deleted(pg_harness: Harness) -> None:
    """PostgreSQL: a replay holds the events it read until it commits, so the new
    deliveries' foreign keys find them (no 500) and the sweep deletes them afterwards."""
    subscription_id, task_id, _ = await old_delivery(pg_harness)
    since = pg_harness.clock.now() - timedelta(days=40)
    with sweep_racing(pg_harness, "INSERT INTO delivery") as finished_first:
        replayed = pg_harness.runtime.outbox.replay(
            "alice", subscription_id, since=since, until=None
        )
    assert finished_first == [False]
    assert replayed == 2
    assert rows_of(pg_harness.runtime.engine, [task_id]) == dict.fromkeys(_ROWS_OF_TASKS, 0)


async def test_a_retry_or_a_replay_after_the_sweep_deleted_its_rows_is_a_404_or_nothing(
    pg_harness: Harness,
) -> None:
    """PostgreSQL: the sweep commits between a request's first read and its locks. A retry
    of the delivery is a 404 (not an update of a row gone), a replay owes nothing (not a
    delivery whose event is gone). A look at the delivery, which reads it with its event in
    one statement, is a 404 when the sweep came first."""
    subscription_id, task_id, delivery_id = await old_delivery(pg_harness)
    outbox = pg_harness.runtime.outbox
    racing = sweep_racing(pg_harness, "SELECT delivery.pk")
    with racing as finished_first, pytest.raises(NotFound):
        outbox.get_delivery("alice", delivery_id)
    assert finished_first == [True]
    assert rows_of(pg_harness.runtime.engine, [task_id])["task"] == 0

    _, task_id, delivery_id = await old_delivery(pg_harness, subscription_id)
    # Between the read of the delivery and that of its attempts: the look is of one moment,
    # before the sweep (under READ COMMITTED, the delivery with an empty attempt log).
    with sweep_racing(pg_harness, "SELECT delivery_attempt") as finished_first:
        view, attempts = outbox.get_delivery("alice", delivery_id)
    assert finished_first == [True]
    assert rows_of(pg_harness.runtime.engine, [task_id])["task"] == 0
    assert view.delivery.attempts == len(attempts) == 1

    _, task_id, delivery_id = await old_delivery(pg_harness, subscription_id)
    # The lock on the delivery and its line, after the read that found it.
    locks = "SELECT delivery.pk \nFROM delivery"
    with sweep_racing(pg_harness, locks) as finished_first, pytest.raises(NotFound):
        outbox.retry_delivery("alice", delivery_id)
    assert finished_first == [True]

    _, task_id, _ = await old_delivery(pg_harness, subscription_id)
    since = pg_harness.clock.now() - timedelta(days=40)
    with sweep_racing(pg_harness, "SELECT task_event.seq") as finished_first:
        assert outbox.replay("alice", subscription_id, since=since, until=None) == 0
    assert finished_first == [True]
    assert rows_of(pg_harness.runtime.engine, [task_id]) == dict.fromkeys(_ROWS_OF_TASKS, 0)


async def test_the_pruner_stops_with_the_service(database_url: str, tmp_path: Path) -> None:
    async with harnessed(database_url, tmp_path, TASKRELAY_RETENTION="30d") as harness:
        pruner = harness.runtime.pruner
        assert pruner is not None
        ticker = pruner._ticker._task
        assert ticker is not None and not ticker.done()
    assert ticker.done()


async def test_a_sweep_logs_one_line_when_it_ends(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Even when its last batch comes back empty (a multiple of the batch deleted)."""
    now = datetime.now(UTC)
    finished(store, 4, now - timedelta(days=40))
    pruner = pruner_of(store, ImageFiles(tmp_path / "files", "http://testserver"), now, batch=2)
    with caplog.at_level(logging.INFO, logger="service.retention"):
        assert [await pruner.prune_once() for _ in range(4)] == [2, 2, 0, 0]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("deleted 4 tasks finished before"), lines


async def test_the_sweep_takes_deliveries_in_key_order(pg_harness: Harness) -> None:
    """PostgreSQL: the cascade reaches a task's deliveries in the order of its events; the
    dispatcher and a subscription's delete lock deliveries in key order. Replays of two time
    windows, the later one first, make keys out of event order: a sweep that let the cascade
    take them would deadlock with a transaction taking the same rows in key order. The sweep
    takes them in key order itself first, so it waits for that transaction instead."""
    harness = pg_harness
    subscription = await harness.subscribe("a")
    start = harness.clock.now()
    task_id = await harness.track()  # event 1 at 0 s
    harness.clock.advance(10)
    harness.update(task_id, TaskStatus.succeeded)  # event 2 at 10 s
    assert await harness.deliver() == 2  # delivered: a replay owes them again
    replay = partial(harness.runtime.outbox.replay, "alice", subscription["id"])
    # The later window first (event 2), then the earlier one (event 1).
    assert replay(since=start + timedelta(seconds=5), until=None) == 1
    assert replay(since=start, until=start + timedelta(seconds=5)) == 1
    engine = harness.runtime.engine
    with engine.connect() as connection:
        (_, first_event), (_, second_event) = connection.execute(
            sa.text(
                "SELECT event_seq, array_agg(pk ORDER BY pk) FROM delivery "
                "GROUP BY event_seq ORDER BY event_seq"
            )
        ).all()
    # The cascade would take event 1's deliveries (one with a high key) before event 2's.
    held_here, taken_by_cascade = second_event[0], first_event[-1]
    assert held_here < taken_by_cascade
    harness.clock.advance(31 * DAY)
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            harness.runtime.store.prune_tasks(harness.clock.now() - timedelta(days=30))
        except BaseException as exc:
            errors.append(exc)

    with engine.connect() as other:
        other.exec_driver_sql("SET lock_timeout = '10s'")
        lock = "SELECT pk FROM delivery WHERE pk = {} FOR UPDATE"
        other.exec_driver_sql(lock.format(held_here))
        sweeping = threading.Thread(target=sweep)
        sweeping.start()
        sweeping.join(timeout=0.5)
        assert sweeping.is_alive()  # waiting for the row held here
        other.exec_driver_sql(lock.format(taken_by_cascade))  # key order: no deadlock
        other.commit()
    sweeping.join()
    assert errors == []
    assert rows_of(engine, [task_id]) == dict.fromkeys(_ROWS_OF_TASKS, 0)
