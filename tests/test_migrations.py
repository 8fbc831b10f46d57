"""Migrations produce exactly the models' schema, and round-trip (upgrade, downgrade, upgrade)."""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import service.models  # noqa: F401
from service.db import (
    DataWouldBeLost,
    Migrated,
    SchemaError,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrate,
    sqlite_path,
)


@pytest.fixture
def empty_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh' / 'taskrelay.db'}"
    return str(request.getfixturevalue("empty_postgres"))


def schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def partial_indexes(url: str) -> dict[tuple[str, str], str]:
    """Each partial index's predicate as the database has it, normalised: (table, index) ->
    text. Alembic's comparison ignores predicates, so the migrations could drift from the
    models there unseen."""
    engine = make_engine(url)
    key = f"{engine.dialect.name}_where"
    found = {}
    try:
        inspector = sa.inspect(engine)
        for table in inspector.get_table_names():
            for index in inspector.get_indexes(table):
                where = index.get("dialect_options", {}).get(key)
                if where is not None:
                    found[(table, str(index["name"]))] = _predicate(str(where))
    finally:
        engine.dispose()
    return found


def _predicate(text: str) -> str:
    """``text`` without what PostgreSQL adds when it stores a predicate: parentheses around
    each term and casts (``((origin)::text = 'submitted'::text)``)."""
    text = re.sub(r"::[a-z ]+", "", text.lower())
    return " ".join(text.replace("(", " ").replace(")", " ").split())


def models_partial_indexes(dialect: str) -> dict[tuple[str, str], str]:
    """:func:`partial_indexes` as the models define them for ``dialect``."""
    return {
        (table.name, str(index.name)): _predicate(str(index.dialect_options[dialect]["where"]))
        for table in SQLModel.metadata.tables.values()
        for index in table.indexes
        if index.dialect_options[dialect]["where"] is not None
    }


def test_partial_indexes_have_the_models_predicates(empty_database: str) -> None:
    migrate(empty_database)
    expected = models_partial_indexes(sa.engine.make_url(empty_database).get_backend_name())
    assert expected  # the models have some
    assert partial_indexes(empty_database) == expected


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    url = empty_database
    migrate(url)
    assert schema_diff(url) == []
    assert table_names(url) == set(SQLModel.metadata.tables)
    engine = make_engine(url)
    assert current_revision(engine) == head_revision(url)
    engine.dispose()

    downgrade(url, "base")
    assert table_names(url) == set()

    migrate(url)
    assert schema_diff(url) == []
    assert table_names(url) == set(SQLModel.metadata.tables)


REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]
AT = datetime(2026, 1, 1, tzinfo=UTC)


def row_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in table_names(url)
            }
    finally:
        engine.dispose()


def insert(database: str, table: str, **values: object) -> None:
    engine = make_engine(database)
    columns = ", ".join(values)
    marks = ", ".join(f":{name}" for name in values)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({marks})"), values)
    finally:
        engine.dispose()


def insert_task(database: str, *, pk: int = 1, **values: object) -> None:
    """A task row with the columns of revision 0001 (the later ones have defaults), tracked
    at EvoLink for alice unless ``values`` say otherwise."""
    row: dict[str, object] = {
        "pk": pk,
        "id": f"tsk_{pk}",
        "owner": "alice",
        "provider": "evolink",
        "origin": "tracked",
        "status": "queued",
        "progress": 0,
        "request": "{}",
        "images": "[]",
        "metadata": "{}",
        "last_update_source": "callback",
        "submit_attempts": 0,
        "created_at": AT,
        "updated_at": AT,
    }
    insert(database, "task", **{**row, **values})


def test_every_migration_keeps_the_rows_up_and_down(empty_database: str) -> None:
    """Each step up from the first revision and back down keeps every row of every table it
    does not drop (a row in each, from the revision that adds the table). On SQLite, Alembic
    changes a table by copying and dropping it, and with foreign keys on, dropping ``task``
    first deleted every event, receipt, subscription and delivery that referred to it (ON
    DELETE CASCADE), while the migration said it succeeded."""
    url = empty_database
    migrate(url, "0001")
    insert_task(url, status="succeeded", progress=100)
    insert(
        url,
        "task_event",
        seq=1,
        id="evt_1",
        task_pk=1,
        type="task.submitted",
        status="queued",
        progress=0,
        source="api",
        created_at=AT,
        data="{}",
    )
    insert(
        url,
        "callback_receipt",
        pk=1,
        task_pk=1,
        provider="evolink",
        received_at=AT,
        outcome="applied",
        body=b"{}",
        body_size=2,
        body_truncated=False,
    )

    def step(revision: str) -> None:
        before = row_counts(url)
        migrate(url, revision, discard_data=True)
        after = row_counts(url)
        kept = {table: after[table] for table in before if table in after}
        assert kept == {table: before[table] for table in kept}, (revision, before, after)

    for revision in REVISIONS[1:3]:
        step(revision)
    insert(
        url,
        "subscription",
        pk=1,
        id="sub_1",
        owner="alice",
        kind="task",
        task_pk=1,
        url="https://hooks.example/h",
        enabled=True,
        created_at=AT,
        updated_at=AT,
    )
    insert(
        url,
        "delivery",
        pk=1,
        id="dlv_1",
        subscription_pk=1,
        event_seq=1,
        task_pk=1,
        event_type="task.submitted",
        status="pending",
        attempts=0,
        next_attempt_at=AT,
        created_at=AT,
        updated_at=AT,
    )
    insert(url, "delivery_attempt", pk=1, delivery_pk=1, attempted_at=AT, duration_ms=1.5)
    insert(url, "client_secret", owner="alice", secret="whsec_x", created_at=AT)
    for revision in REVISIONS[3:]:
        step(revision)
    inserted = (
        "task",
        "task_event",
        "callback_receipt",
        "subscription",
        "delivery",
        "delivery_attempt",
        "client_secret",
    )
    assert {table: row_counts(url)[table] for table in inserted} == dict.fromkeys(inserted, 1)
    for revision in reversed(REVISIONS[:-1]):
        step(revision)
    assert row_counts(url) == {"task": 1, "task_event": 1, "callback_receipt": 1}
    migrate(url)
    assert schema_diff(url) == []


def test_a_sqlite_migration_that_would_leave_a_broken_reference_changes_nothing(
    tmp_path: Path,
) -> None:
    """With foreign keys off while they run, the migrations check every reference before their
    commit: a row referring to nothing (written here behind SQLite's back) stops the run, and
    the schema stays where it was."""
    url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    migrate(url, "0001")
    with sqlite3.connect(tmp_path / "taskrelay.db") as raw:  # foreign keys off by default
        raw.execute(
            "INSERT INTO task_event (seq, id, task_pk, type, status, progress, source, "
            "created_at, data) VALUES (1, 'evt_1', 99, 'task.submitted', 'queued', 0, 'api', "
            "'2026-01-01 00:00:00', '{}')"
        )
    with pytest.raises(SchemaError, match="rows referring to rows that do not exist"):
        migrate(url)
    engine = make_engine(url)
    assert current_revision(engine) == "0001"
    engine.dispose()


def test_the_queue_index_rebuild_runs_again_after_stopping_midway(empty_postgres: str) -> None:
    """Migration 0006 rebuilds the dispatcher's queue index CONCURRENTLY, outside a
    transaction, so a run can stop between its steps and leave the version at 0005: after the
    old index was dropped (the new one built, not yet renamed), or with a build that failed
    (an index of another shape left under the build's name). Run again, it ends with the
    models' index and nothing left over."""
    url = empty_postgres
    engine = make_engine(url)
    name = "ix_delivery_status_next_attempt"

    def indexes() -> dict[str, list[str]]:
        return {
            index["name"]: list(index["column_names"])
            for index in sa.inspect(engine).get_indexes("delivery")
            if str(index["name"]).startswith(name)
        }

    def stopped(*statements: str) -> None:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0005'")

    try:
        migrate(url, "0006")
        assert indexes() == {name: ["status", "next_attempt_at", "pk"]}
        stopped(f"ALTER INDEX {name} RENAME TO {name}_build")  # stopped before the rename
        migrate(url, "0006")
        assert indexes() == {name: ["status", "next_attempt_at", "pk"]}
        downgrade(url, "0005")
        assert indexes() == {name: ["status", "next_attempt_at"]}
        stopped(f"CREATE INDEX {name}_build ON delivery (status)")  # a build gone wrong
        migrate(url)
        assert indexes() == {name: ["status", "next_attempt_at", "pk"]}
        assert schema_diff(url) == []
        assert current_revision(engine) == head_revision(url)
    finally:
        engine.dispose()


def test_the_unsent_index_build_runs_again_after_a_failed_build(empty_postgres: str) -> None:
    """Migration 0008 builds ix_task_unsent_created_at CONCURRENTLY: a build that fails (a
    deadlock, a cancel) leaves an invalid index under its name and the version at 0007. Run
    again, it drops that index and builds a valid one; run once more, it changes nothing."""
    url = empty_postgres
    engine = make_engine(url)
    name = "ix_task_unsent_created_at"
    valid = sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")

    def state() -> tuple[bool | None, str]:
        with engine.connect() as connection:
            return (
                connection.execute(valid, {"name": name}).scalar(),
                current_revision(engine) or "",
            )

    try:
        migrate(url, "0008")
        assert state() == (True, "0008")
        with engine.begin() as connection:  # what a failed build leaves behind
            connection.exec_driver_sql(
                f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{name}'::regclass"
            )
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0007'")
        assert state() == (False, "0007")
        migrate(url, "0008")
        assert state() == (True, "0008")
        downgrade(url, "0007")
        assert state() == (None, "0007")
        migrate(url)
        assert state() == (True, head_revision(url))
        assert schema_diff(url) == []
    finally:
        engine.dispose()


def test_the_retention_indexes_build_runs_again_after_stopping_midway(empty_postgres: str) -> None:
    """Migration 0009 builds two indexes CONCURRENTLY, one after the other, outside a
    transaction: a run can stop with the first built and the second left invalid by a failed
    build (a deadlock, a cancel), or not begun, the version still at 0008. Run again, it keeps
    what was built, drops and rebuilds the invalid one, and builds the rest."""
    url = empty_postgres
    engine = make_engine(url)
    names = ("ix_task_completed_at", "ix_delivery_event_seq")
    valid = sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")
    oid = sa.text("SELECT to_regclass(:name)::oid")

    def state() -> tuple[list[bool | None], str]:
        with engine.connect() as connection:
            flags = [connection.execute(valid, {"name": name}).scalar() for name in names]
            return flags, current_revision(engine) or ""

    def oid_of(name: str) -> int:
        with engine.connect() as connection:
            return int(connection.execute(oid, {"name": name}).scalar_one())

    def stopped(*statements: str) -> None:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0008'")

    invalid = "UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{}'::regclass"
    try:
        migrate(url, "0009")
        assert state() == ([True, True], "0009")
        kept = oid_of(names[0])
        stopped(invalid.format(names[1]))  # the second build failed
        assert state() == ([True, False], "0008")
        migrate(url, "0009")
        assert state() == ([True, True], "0009")
        assert oid_of(names[0]) == kept  # built already: left alone
        stopped(invalid.format(names[0]), f"DROP INDEX {names[1]}")  # the first build failed
        assert state() == ([False, None], "0008")
        migrate(url, "0009")
        assert state() == ([True, True], "0009")
        downgrade(url, "0008")
        assert state() == ([None, None], "0008")
        migrate(url)
        assert state() == ([True, True], head_revision(url))
        assert schema_diff(url) == []
    finally:
        engine.dispose()


def test_migration_runs_started_together_take_turns(empty_postgres: str) -> None:
    """Replicas that each run `taskrelay migrate` as they start (an init container per pod)
    start their runs together: each run holds an advisory lock while it migrates, so one
    migrates and the others then find the schema at head. Without it, all but one failed,
    creating tables another run had just created (reproduced: three of four runs failed)."""
    environ = {**os.environ, "TASKRELAY_DATABASE_URL": empty_postgres}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", "migrate"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert schema_diff(empty_postgres) == []
    engine = make_engine(empty_postgres)
    try:
        assert current_revision(engine) == head_revision(empty_postgres)
    finally:
        engine.dispose()


def test_a_migration_run_waits_for_the_one_in_progress(empty_postgres: str) -> None:
    """While another session holds the migration lock, a run changes nothing, and asks again
    rather than blocking in a statement (whose snapshot a CREATE INDEX CONCURRENTLY in the
    other run would wait for); once the lock is free, it migrates."""
    waiting = threading.Event()
    messages: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            if "waiting for it to finish" in record.getMessage():
                waiting.set()

    logger = logging.getLogger("taskrelay.migrate")
    handler, level = Seen(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    engine = make_engine(empty_postgres)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            migrate(empty_postgres)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    thread = threading.Thread(target=run)
    try:
        with engine.connect() as holder:
            holder.exec_driver_sql("SELECT pg_advisory_lock(hashtext('taskrelay migrate'))")
            pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            holder.commit()
            thread.start()
            while thread.is_alive() and not waiting.wait(timeout=0.05):
                pass
            assert waiting.is_set() and thread.is_alive()
            assert table_names(empty_postgres) == set()  # nothing done while it waits
            with engine.connect() as other:  # no session parked in a lock wait
                parked = other.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).scalar_one()
            holder.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('taskrelay migrate'))")
            holder.commit()
        thread.join(timeout=120)
        assert not thread.is_alive() and failures == []
        assert parked == 0
        # The line names the session holding the lock (pg_terminate_backend's argument).
        assert any(f"server process {pid} from " in message for message in messages)
        assert current_revision(engine) == head_revision(empty_postgres)
        assert schema_diff(empty_postgres) == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        engine.dispose()


def test_migrate_goes_down_to_an_older_revision_and_says_so(empty_database: str) -> None:
    url = empty_database
    head = head_revision(url)
    assert migrate(url) == Migrated(None, head, downgraded=False)
    assert migrate(url, "0008") == Migrated(head, "0008", downgraded=True)
    assert table_names(url) == set(SQLModel.metadata.tables)
    assert migrate(url, "0008") == Migrated("0008", "0008", downgraded=False)
    assert migrate(url) == Migrated("0008", head, downgraded=False)
    assert schema_diff(url) == []


def test_a_downgrade_that_would_delete_stored_data_is_refused_and_names_it(
    empty_database: str,
) -> None:
    """Below 0005 the planned submission retries go, below 0003 the subscriptions, the
    deliveries not yet made and the notify secrets, to base every task: refused, with what
    would go counted, unless discard_data. A downgrade that deletes nothing stored, or only
    what is not stored (no rows), goes ahead."""
    url = empty_database
    head = head_revision(url)
    migrate(url)
    for pk, status, retry_at in ((1, "queued", AT), (2, "succeeded", None)):
        insert_task(
            url,
            pk=pk,
            origin="submitted",
            status=status,
            last_update_source="api",
            submit_attempts=1,
            submit_retry_at=retry_at,
        )
    insert(
        url,
        "task_event",
        seq=1,
        id="evt_1",
        task_pk=2,
        type="task.succeeded",
        status="succeeded",
        progress=100,
        source="callback",
        created_at=AT,
        data="{}",
    )
    insert(
        url,
        "subscription",
        pk=1,
        id="sub_1",
        owner="alice",
        kind="endpoint",
        url="https://hooks.example/h",
        enabled=True,
        created_at=AT,
        updated_at=AT,
    )
    for pk, status in ((1, "pending"), (2, "succeeded"), (3, "pending")):
        insert(
            url,
            "delivery",
            pk=pk,
            id=f"dlv_{pk}",
            subscription_pk=1,
            event_seq=1,
            task_pk=2,
            event_type="task.succeeded",
            status=status,
            attempts=0,
            next_attempt_at=AT,
            created_at=AT,
            updated_at=AT,
        )
    insert(url, "client_secret", owner="alice", secret="whsec_x", created_at=AT)
    counts = row_counts(url)

    with pytest.raises(DataWouldBeLost) as refused:
        migrate(url, "0002")
    assert refused.value.message == (
        f"downgrading the schema from {head} to 0002 would delete submission retries "
        "planned (those tasks would not be sent again): 1 (revision 0005); subscriptions "
        "(endpoints, and tasks' notify_url): 1 "
        "(revision 0003); webhook deliveries not yet made (they would never be sent): 2 "
        "(revision 0003); notify secrets (their clients' webhooks could no longer be "
        "verified): 1 (revision 0003). Back the database up first; to go ahead and delete "
        "it, run the same command with --discard-data."
    )
    assert refused.value.code == "downgrade_discards_data"
    assert current_revision_of(url) == head and row_counts(url) == counts  # nothing changed

    assert migrate(url, "0005") == Migrated(head, "0005", downgraded=True)  # nothing deleted
    with pytest.raises(DataWouldBeLost, match=r"retries planned .*: 1 \(revision 0005\)"):
        migrate(url, "-1")
    assert migrate(url, "0003", discard_data=True) == Migrated("0005", "0003", downgraded=True)
    assert migrate(url, "0002", discard_data=True) == Migrated("0003", "0002", downgraded=True)
    with pytest.raises(DataWouldBeLost, match=r"with their events and callback receipts: 2 "):
        migrate(url, "base")
    assert row_counts(url)["task"] == 2


def test_a_downgrade_below_0010_keeps_no_submissions_answer_due_time_unasked(
    empty_database: str,
) -> None:
    """Below 0010 a task sent to a provider that cannot call back loses the time its answer
    is due by: a lost answer would then be noticed only at the task's deadline. Refused while
    an unsettled task has one, unless discard_data; a settled task's is nothing to lose."""
    url = empty_database
    migrate(url)
    insert_task(url, pk=1, status="succeeded", submit_answer_due_at=AT)
    assert migrate(url, "0009") == Migrated("0010", "0009", downgraded=True)
    migrate(url)
    insert_task(url, pk=2, status="queued", submit_answer_due_at=AT)
    with pytest.raises(DataWouldBeLost, match=r"awaiting their answer .*: 1 \(revision 0010\)"):
        migrate(url, "0009")
    assert current_revision_of(url) == "0010"
    assert migrate(url, "0009", discard_data=True) == Migrated("0010", "0009", downgraded=True)


def test_a_plain_alembic_downgrade_is_guarded_too(empty_database: str) -> None:
    """`alembic downgrade` (service.db.downgrade) has no count before the run: the step that
    would delete counts, and refuses."""
    url = empty_database
    migrate(url)
    insert(url, "client_secret", owner="alice", secret="whsec_x", created_at=AT)
    with pytest.raises(DataWouldBeLost, match=r"^downgrading the schema from 0003 to 0002 ") as no:
        downgrade(url, "0002")
    assert row_counts(url)["client_secret"] == 1
    assert "run the same command with alembic -x discard_data=true." in no.value.message
    # PostgreSQL: a transaction per step, the steps before it done; SQLite: one, rolled back.
    postgresql = url.startswith("postgresql")
    assert ("The schema is left at 0003." in no.value.message) == postgresql
    assert current_revision_of(url) == ("0003" if postgresql else head_revision(url))
    migrate(url)  # back up from wherever it stopped
    assert schema_diff(url) == []


def test_a_database_holding_tables_in_the_way_is_refused_and_left_as_it_was(
    empty_database: str,
) -> None:
    """No TaskRelay schema, and tables TaskRelay did not make: in a SQLite file, any (a file
    is one program's: `serve` added its tables to another program's file, config hunt); on
    PostgreSQL, which may be shared, one named like TaskRelay's (a traceback of "table task
    already exists" before). Refused, naming them, and nothing changed."""
    url = empty_database
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            connection.exec_driver_sql("INSERT INTO users VALUES (1)")
        if url.startswith("sqlite"):
            with pytest.raises(SchemaError) as refused:
                migrate(url)
            assert str(refused.value).startswith(
                f"the SQLite file {sqlite_path(url)} holds another program's tables (users) "
                "and no TaskRelay schema: TaskRelay keeps its tasks in a file of its own"
            )
            assert table_names(url) == {"users"}
            return
        # PostgreSQL: another application's tables beside TaskRelay's are its business...
        migrate(url, "base")
        migrate(url)
        assert table_names(url) >= {"users", "task"}
        migrate(url, "base", discard_data=True)
        # ... but not one TaskRelay needs the name of.
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE task (id INTEGER)")
        with pytest.raises(SchemaError) as refused:
            migrate(url)
        assert str(refused.value).startswith(
            "the database has no TaskRelay schema, but holds tables of the names it needs "
            "(task): another application's, or made by hand. Nothing was changed."
        )
        assert table_names(url) == {"users", "task"}
    finally:
        engine.dispose()


def test_no_revision_is_one_clear_refusal(empty_database: str) -> None:
    with pytest.raises(SchemaError, match=r"^no schema revision given: name one"):
        migrate(empty_database, " ")


@pytest.mark.parametrize(
    ("revision", "message"),
    [
        ("+0", r"^'\+0' moves the schema no step: give -N or \+N with N at least 1"),
        ("-0", r"^'-0' moves the schema no step"),
        ("+two", r"^there is no schema revision '\+two' in this TaskRelay: a relative one is"),
        # Digits to str.isdigit (superscript two; an Arabic-Indic one), not whole numbers here.
        ("-\u00b2", r"^there is no schema revision '-\u00b2' in this TaskRelay"),
        ("+\u0661", r"^there is no schema revision '\+\u0661' in this TaskRelay"),
        ("+2", r"^cannot move the schema \+2 steps from 0009: only 1 lead up from it \(to 0010\)"),
        ("-10", r"^cannot move the schema -10 steps from 0009: only 9 lead down from it \(to base"),
    ],
)
def test_a_relative_revision_that_cannot_be_taken_says_why(
    empty_database: str, revision: str, message: str
) -> None:
    """Not Alembic's "Relative revision +2 didn't produce 2 migrations": how many steps there
    are, and nothing changed."""
    migrate(empty_database, "0009")
    with pytest.raises(SchemaError, match=message):
        migrate(empty_database, revision)
    assert current_revision_of(empty_database) == "0009"


def test_a_part_of_a_revision_is_refused_not_taken_for_the_one_it_begins(
    empty_database: str,
) -> None:
    """Alembic takes a unique prefix: "001", a typo for 0001, is 0010. Refused, naming it."""
    migrate(empty_database, "0002")
    with pytest.raises(SchemaError, match=r"give a whole one \(did you mean 0010\?"):
        migrate(empty_database, "001")
    assert current_revision_of(empty_database) == "0002"


def test_the_guards_lock_does_not_deadlock_a_replica_updating_a_row_it_locked(
    empty_postgres: str,
) -> None:
    """A replica has locked a task row (SELECT ... FOR UPDATE, as the store does) and is
    about to update it when a downgrade below 0005 starts: the guard's lock on ``task`` waits
    for that transaction, which updates its row and commits (a weaker lock taken first, then
    the DROP's own, deadlocked it), and then the downgrade goes on."""
    url = empty_postgres
    migrate(url, "0005")  # the next step down is the guarded one
    insert_task(url, status="running")
    replica_engine = make_engine(url)
    try:
        with replica_engine.connect() as replica:
            replica.execute(sa.text("SELECT pk FROM task WHERE id = 'tsk_1' FOR UPDATE")).all()
            downgrading, outcome = migrating_in_background(url, "0004")
            assert wait_for_lock_waiter(url, "task", downgrading), outcome
            replica.execute(sa.text("UPDATE task SET progress = 50 WHERE id = 'tsk_1'"))
            replica.commit()
            downgrading.join(timeout=60)
    finally:
        replica_engine.dispose()
    assert outcome == [Migrated("0005", "0004", downgraded=True)]
    assert current_revision_of(url) == "0004"


def test_a_row_written_while_a_postgresql_downgrade_runs_is_not_deleted_unseen(
    empty_postgres: str,
) -> None:
    """The count before the run finds nothing; a subscription is being written meanwhile
    (its transaction open). The step that would drop the table locks it first, so it waits
    for that write, counts it, and refuses: the subscription is kept. The steps done before
    it stay done (one transaction per step), and the schema is at their revision, exactly:
    migrating up again leaves nothing behind (a step building an index CONCURRENTLY
    commits as it goes, so one transaction for the run rolled back the revision of a step
    whose index stayed)."""
    url = empty_postgres
    migrate(url)
    writer_engine = make_engine(url)
    try:
        with writer_engine.connect() as writer:
            writer.execute(
                sa.text(
                    "INSERT INTO subscription (id, owner, kind, url, enabled, created_at, "
                    "updated_at) VALUES ('sub_1', 'alice', 'endpoint', 'https://h.example/h', "
                    "true, :at, :at)"
                ),
                {"at": AT},
            )  # not committed yet
            downgrading, outcome = migrating_in_background(url, "0002")
            assert wait_for_lock_waiter(url, "subscription", downgrading), outcome
            writer.commit()
            downgrading.join(timeout=60)
    finally:
        writer_engine.dispose()
    (result,) = outcome
    assert isinstance(result, DataWouldBeLost), result
    assert "notify_url): 1 (revision 0003). The schema is left at 0003." in result.message
    assert current_revision_of(url) == "0003"
    assert row_counts(url)["subscription"] == 1
    migrate(url)
    assert schema_diff(url) == []
    assert partial_indexes(url) == models_partial_indexes("postgresql")


def migrating_in_background(
    url: str, revision: str
) -> tuple[threading.Thread, list[BaseException | Migrated]]:
    """``migrate(url, revision)`` started in a thread; the list gets what it returned or
    raised once it ends."""
    outcome: list[BaseException | Migrated] = []

    def run() -> None:
        try:
            outcome.append(migrate(url, revision))
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    return runner, outcome


def wait_for_lock_waiter(url: str, table: str, runner: threading.Thread) -> bool:
    """Whether a session came to wait for a lock on ``table`` (within 30 s, while ``runner``
    runs)."""
    watcher = make_engine(url)
    query = sa.text(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE NOT l.granted AND c.relname = :table"
    )
    try:
        for _ in range(600):
            with watcher.connect() as connection:
                if connection.execute(query, {"table": table}).scalar_one():
                    return True
            if not runner.is_alive():
                return False
            time.sleep(0.05)
        return False
    finally:
        watcher.dispose()


def current_revision_of(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def test_a_downgrade_that_waited_decides_on_what_the_other_run_left(empty_postgres: str) -> None:
    """`taskrelay migrate --revision X` decides up or down on the revision it finds once it
    holds the migration lock: here the run holding it took the schema below X meanwhile, so
    the waiting run goes up to X (deciding before the wait, it would have tried to go down,
    and failed)."""
    url = empty_postgres
    migrate(url)
    engine = make_engine(url)
    environ = {**os.environ, "TASKRELAY_DATABASE_URL": url, "TASKRELAY_LOG_LEVEL": "INFO"}
    try:
        with engine.connect() as holder:
            holder.exec_driver_sql("SELECT pg_advisory_lock(hashtext('taskrelay migrate'))")
            holder.commit()
            run = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "migrate", "--revision", "0008"],
                env=environ,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert run.stderr is not None
            seen = []
            for line in run.stderr:  # JSON log lines, until the run says it waits
                seen.append(line)
                if "waiting for it to finish" in line:
                    break
            assert run.poll() is None, seen
            assert current_revision(engine) == head_revision(url)  # nothing done while it waits
            config = alembic_config(url)  # the other run, on the session holding the lock
            config.attributes["connection"] = holder
            command.downgrade(config, "0007")
            holder.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('taskrelay migrate'))")
            holder.commit()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "database upgraded from 0007 to 0008 (postgresql)" in out
        assert current_revision(engine) == "0008"
    finally:
        engine.dispose()


def test_a_connection_lost_mid_migration_is_reported_as_itself_and_a_rerun_repairs(
    empty_postgres: str,
) -> None:
    """PostgreSQL: the migration's backend is terminated while it builds an index
    CONCURRENTLY. The clean-up after it was refused as a PendingRollbackError, which hid the
    database's own error (`taskrelay migrate` printed five tracebacks and exited 1 instead of
    one line and 2). The database's error comes out now, and the next run finishes the job
    (found by exploratory testing)."""
    migrate(empty_postgres, "0007")
    killer = sa.create_engine(empty_postgres)

    def terminate(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "CREATE INDEX CONCURRENTLY" in statement:
            with killer.connect() as other:
                other.exec_driver_sql(
                    f"SELECT pg_terminate_backend({cursor.connection.info.backend_pid})"
                )

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", terminate)
    try:
        with pytest.raises(sa.exc.DBAPIError, match="terminating connection"):
            migrate(empty_postgres)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", terminate)
        killer.dispose()
    engine = make_engine(empty_postgres)
    try:
        assert current_revision(engine) == "0007"
    finally:
        engine.dispose()
    done = migrate(empty_postgres)
    assert (done.before, done.after) == ("0007", head_revision(empty_postgres))
    assert schema_diff(empty_postgres) == []


def offline_script(url: str, revisions: str, *, down: bool = False, **extra: str) -> str:
    """The SQL script ``alembic upgrade --sql`` (``downgrade`` if ``down``) writes for
    ``revisions`` (``head``, ``0005:head``, ``head:0002``), with ``-x`` arguments ``extra``."""
    config = alembic_config(url)
    config.output_buffer = io.StringIO()
    config.cmd_opts = argparse.Namespace(x=[f"{k}={v}" for k, v in extra.items()])
    if down:
        command.downgrade(config, revisions, sql=True)
    else:
        command.upgrade(config, revisions, sql=True)
    return config.output_buffer.getvalue()


def run_script(url: str, script: str) -> None:
    """Run an offline script statement by statement, as psql does, on a session in autocommit
    (the script's own BEGIN and COMMIT make its transactions)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            dbapi = connection.connection.dbapi_connection
            assert dbapi is not None
            dbapi.autocommit = True
            for statement in re.split(r";\n", script):
                if statement.strip():
                    dbapi.execute(statement)
    finally:
        engine.dispose()


def test_an_offline_upgrade_script_builds_the_schema_migrate_builds(empty_postgres: str) -> None:
    """`alembic upgrade head --sql`: a DBA's script, reviewed and run by hand. The migrations
    that build an index CONCURRENTLY read the catalog online; offline they write every step."""
    url = empty_postgres
    script = offline_script(url, "head")
    assert "CREATE INDEX CONCURRENTLY ix_delivery_status_next_attempt_build" in script
    run_script(url, script)
    assert current_revision_of(url) == head_revision(url)
    assert schema_diff(url) == []
    assert partial_indexes(url) == models_partial_indexes("postgresql")
    head = head_revision(url)
    assert migrate(url) == Migrated(head, head, downgraded=False)
    # From a revision in the middle, as for a database a release behind.
    migrate(url, "0005")
    run_script(url, offline_script(url, "0005:head"))
    assert current_revision_of(url) == head
    assert schema_diff(url) == []


def test_an_offline_script_stopped_after_an_index_was_built_runs_again(
    empty_postgres: str,
) -> None:
    """A script stopped partway through 0009 (one of its indexes built, or left invalid, the
    revision still 0008) failed on "already exists" when run again (review); each index is
    dropped first now, as the online run drops an invalid one."""
    url = empty_postgres
    migrate(url, "0008")
    script = offline_script(url, "0008:head")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                "CREATE INDEX ix_task_completed_at ON task (completed_at) "
                "WHERE completed_at IS NOT NULL"
            )
            connection.commit()
    finally:
        engine.dispose()
    run_script(url, script)
    assert current_revision_of(url) == head_revision(url)
    assert schema_diff(url) == []
    assert partial_indexes(url) == models_partial_indexes("postgresql")


def test_an_offline_downgrade_script_refuses_when_run_what_it_would_delete(
    empty_postgres: str,
) -> None:
    """An offline downgrade cannot count stored data when it is written: the script counts
    when it runs, and stops at the step that would delete some, that step rolled back, as an
    online run does."""
    url = empty_postgres
    migrate(url)
    insert(url, "client_secret", owner="alice", secret="whsec_x", created_at=AT)
    script = offline_script(url, "head:0002", down=True)
    with pytest.raises(psycopg.errors.RaiseException) as refused:
        run_script(url, script)
    assert (
        "downgrading the schema from 0003 to 0002 would delete notify secrets (their clients' "
        "webhooks could no longer be verified): 1 (revision 0003). Back the database up first; "
        "to go ahead and delete it, write the script again with alembic -x discard_data=true."
    ) in str(refused.value)
    assert current_revision_of(url) == "0003"
    assert row_counts(url)["client_secret"] == 1
    migrate(url)  # back up from where it stopped
    assert schema_diff(url) == []
    # Written with the go-ahead, the script deletes.
    run_script(url, offline_script(url, "head:0002", down=True, discard_data="true"))
    assert current_revision_of(url) == "0002"
    assert "client_secret" not in table_names(url)


def test_an_offline_script_for_sqlite_is_refused_saying_why(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    ran = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "TASKRELAY_DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode != 0
    said = ran.stdout + ran.stderr
    assert (
        "an offline SQL script (--sql) can be written for PostgreSQL only; a SQLite "
        "database is migrated in place: taskrelay migrate"
    ) in said
    assert "Traceback" not in said
    assert not (tmp_path / "taskrelay.db").exists()


def test_an_offline_script_stops_while_another_migration_runs(empty_postgres: str) -> None:
    """The script takes the migration lock `taskrelay migrate` takes, or stops at once: asked
    without waiting, as a session waiting in a statement and a CREATE INDEX CONCURRENTLY in
    the other run would wait for each other."""
    url = empty_postgres
    script = offline_script(url, "head")
    engine = make_engine(url)
    try:
        with engine.connect() as holder:
            holder.exec_driver_sql("SELECT pg_advisory_lock(hashtext('taskrelay migrate'))")
            holder.commit()
            with pytest.raises(psycopg.errors.RaiseException, match="another migration of this"):
                run_script(url, script)
            assert table_names(url) == set()
            holder.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('taskrelay migrate'))")
            holder.commit()
        run_script(url, script)
        assert current_revision_of(url) == head_revision(url)
    finally:
        engine.dispose()
