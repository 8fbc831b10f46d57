"""Alembic environment. The URL comes from the caller (``taskrelay migrate`` sets it) or, for a
plain ``alembic upgrade head``, from TaskRelay's own settings (TASKRELAY_DATABASE_URL)."""

from __future__ import annotations

import logging
import logging.config
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context
from alembic.util import CommandError
from sqlmodel import SQLModel

import service.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from service.db import SchemaError, count_discards, make_engine, would_lose

config = context.config
if config.config_file_name is not None and config.attributes.get(
    "taskrelay_configure_logging", True
):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata
log = logging.getLogger("taskrelay.migrate")

# One migration run at a time on a PostgreSQL database (a session-level advisory lock), so that
# runs started together (an init container in every replica's pod, `serve --migrate` on
# several hosts) take turns: the first migrates, the others then find the schema at head and
# do nothing. Without it they raced to create the same tables and all but one failed.
MIGRATION_LOCK = "hashtext('taskrelay migrate')"
LOCK_POLL_SECONDS = 0.2
STILL_WAITING_LOG_SECONDS = 30.0
# The session holding the lock, for the log line of a run waiting for it.
# S608: the one value interpolated is the lock's expression, a constant of this module.
_HOLDER = (
    "SELECT a.pid, a.client_addr, a.state, a.query_start FROM pg_locks l "  # noqa: S608
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE "
    f"datname = current_database()) AND ((l.classid::bigint << 32) | l.objid::bigint) = "
    f"{MIGRATION_LOCK}::bigint"
)
# A run whose client dies (a pod killed mid-migration) must not keep the lock until the
# server's TCP keepalive gives up on it (two hours by default): the migrating session asks
# its server to probe after 30 s of silence, every 10 s, 3 times (over TCP; a socket ignores it).
_KEEPALIVES = (
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 3",
)


def guard_downgrade(
    revision: str, down_revision: str | None, discards: Mapping[str, str], tables: Sequence[str]
) -> None:
    """Called by the downgrade of a migration that deletes stored data, before it does:
    ``discards`` (its ``DOWNGRADE_DISCARDS``) counted again, and a refusal if any is stored,
    unless the run may discard data (``taskrelay migrate --discard-data``; a plain alembic
    run: ``-x discard_data=true``). service.db.migrate counted before the run; this count
    is for what was written since (another replica still serving) and for a plain alembic
    run. On PostgreSQL ``tables`` are locked first, in the mode the step's own DROP takes
    anyway (ACCESS EXCLUSIVE: a weaker lock, held while the DROP waits for a stronger one,
    deadlocked a replica updating a row it had locked), so nothing written after the count
    is deleted unseen."""
    extra = context.get_x_argument(as_dictionary=True)
    if config.attributes.get("discard_data") or extra.get("discard_data", "").lower() == "true":
        return
    if context.is_offline_mode():
        _guard_in_script(revision, down_revision, discards, tables)
        return
    connection = context.get_bind()
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        for table in tables:  # the migration's own table names, constants
            connection.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    lost = count_discards(connection, discards, revision)
    if lost:
        # Per step on PostgreSQL, the steps before this one are done; on SQLite the run is
        # one transaction, rolled back.
        taskrelay = "discard_data" in config.attributes  # service.db.migrate, not plain alembic
        raise would_lose(
            revision,
            down_revision,
            lost,
            left_at=revision if postgresql else None,
            go_ahead="--discard-data" if taskrelay else "alembic -x discard_data=true",
        )


config.attributes["guard_downgrade"] = guard_downgrade


def _guard_in_script(
    revision: str, down_revision: str | None, discards: Mapping[str, str], tables: Sequence[str]
) -> None:
    """guard_downgrade in an offline script (``alembic downgrade --sql``), which cannot count
    now: the script counts when it is run, and stops there (an exception, which rolls the
    step's transaction back) if anything would be deleted. PostgreSQL only (see
    run_migrations_offline)."""
    for table in tables:
        context.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    for what, count_sql in discards.items():
        before, after = (
            f"downgrading the schema from {revision} to {down_revision or 'base'} would delete "
            f"{what}: ".replace("'", "''"),
            f" (revision {revision}). Back the database up first; to go ahead and delete it, "
            "write the script again with alembic -x discard_data=true.".replace("'", "''"),
        )
        context.execute(
            f"DO $guard$ DECLARE n bigint := ({count_sql}); BEGIN IF n > 0 THEN "
            f"RAISE EXCEPTION USING MESSAGE = '{before}' || n || '{after}'; END IF; END $guard$"
        )


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.settings import load_settings

    return load_settings().database_url


def run_migrations_offline() -> None:
    url = _url()
    if not url.startswith("postgresql"):
        # Alembic's batch mode (SQLite's way to alter a table) reads the table it copies,
        # which a script cannot.
        raise CommandError(
            "an offline SQL script (--sql) can be written for PostgreSQL only; a SQLite "
            "database is migrated in place: taskrelay migrate"
        )
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        # A transaction per step, as online (_run says why): a script stopped by a step's
        # refusal or failure leaves the schema at the revision of the last step done.
        transaction_per_migration=True,
    )
    # The migration lock, as online (one run at a time), but asked once: a session waiting
    # in a statement would hold a snapshot that the other run's CREATE INDEX CONCURRENTLY
    # waits for, and neither would finish. The session's end (the script's, or psql's on an
    # error) releases it too.
    context.execute(
        f"DO $lock$ BEGIN IF NOT pg_try_advisory_lock({MIGRATION_LOCK}) THEN RAISE EXCEPTION "
        "'another migration of this database is running (taskrelay migrate, or a script "
        "like this one): run this script again once it is done'; END IF; END $lock$"
    )
    with context.begin_transaction():
        context.run_migrations()
    context.execute(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        if not isinstance(connection, sa.Connection):
            raise TypeError(f"config.attributes['connection'] must be a Connection: {connection!r}")
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:  # also when the run was refused (service.db.migrate: a schema newer than known)
        engine.dispose()


def _run(connection: sa.Connection) -> None:
    postgresql = connection.dialect.name == "postgresql"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # SQLite's DDL is transactional (Alembic assumes not): the whole run is one
        # transaction, so a run that fails, or is killed, leaves the schema as it was.
        transactional_ddl=True,
        # PostgreSQL: a transaction per step. Steps that build or drop an index
        # CONCURRENTLY commit what came before them; in one transaction for the run, a
        # later step's failure then rolled back the revision of a step whose indexes stayed,
        # and the next run did that step again, or skipped its undoing. Per step, a failed
        # run leaves the schema at the revision of the last step done, as that step left it.
        transaction_per_migration=postgresql,
    )
    with (
        _one_run_at_a_time(connection),
        _foreign_keys_off(connection),
        context.begin_transaction(),
    ):
        context.run_migrations()
        _check_foreign_keys(connection)


@contextmanager
def _foreign_keys_off(connection: sa.Connection) -> Iterator[None]:
    """SQLite: foreign keys off while the migrations run (PostgreSQL: nothing to do).

    Alembic changes a SQLite table by copying it and dropping the old one, and with foreign
    keys on, SQLite's DROP TABLE first deletes every row that refers to the table through
    ON DELETE CASCADE: a step that changed ``task`` emptied the events, receipts,
    subscriptions and deliveries, and said it had succeeded. SQLite ignores the setting inside
    a transaction, so it is made on the driver's connection before the migrations' begins,
    and :func:`_check_foreign_keys` checks the references before their commit instead (the
    procedure SQLite documents for changing a table)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    if connection.in_transaction():
        connection.commit()  # a read the caller made (nothing written): the pragma needs none
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        driver.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: sa.Connection) -> None:
    """SQLite: refuse (roll back) a migration that left a reference to a row that is gone."""
    if connection.dialect.name != "sqlite":
        return
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise SchemaError(
            f"the database has {len(broken)} rows referring to rows that do not exist "
            f"(table, rowid, referred table: {[tuple(row[:3]) for row in broken[:5]]}), "
            "left by a migration or written with foreign keys off: nothing was changed. Fix "
            "those rows (sqlite3: PRAGMA foreign_key_check), then migrate again."
        )


@contextmanager
def _one_run_at_a_time(connection: sa.Connection) -> Iterator[None]:
    """Hold :data:`MIGRATION_LOCK` on PostgreSQL while the migrations run (SQLite: one process
    per file, nothing to do). The lock is asked for with ``pg_try_advisory_lock`` and a pause
    between tries, each in a transaction of its own, never by a statement that waits: a session
    waiting in ``pg_advisory_lock`` holds a snapshot, which the other run's ``CREATE INDEX
    CONCURRENTLY`` (0006, 0008, 0009) waits for, while it waits for that run's lock: a
    deadlock, which PostgreSQL breaks by failing one of them."""
    if connection.dialect.name != "postgresql":
        yield
        return
    for statement in _KEEPALIVES:
        connection.exec_driver_sql(statement)
    connection.commit()
    waited_since = logged_at = None
    while not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK})").scalar():
        now = time.monotonic()
        if waited_since is None:
            waited_since = now
        if logged_at is None or now - logged_at >= STILL_WAITING_LOG_SECONDS:
            logged_at = now
            holder = connection.exec_driver_sql(_HOLDER).first()
            if holder is None:
                who = "it has just ended"
            else:
                pid, address, state, since = holder
                who = f"server process {pid} from {address or 'a local socket'}, {state} since {since}"
            log.info(
                "another migration of this database is running (%s); waiting for it to finish", who
            )
        connection.commit()
        time.sleep(LOCK_POLL_SECONDS)
    connection.commit()
    if waited_since is not None:
        log.info("the other migration finished after %.1f s", time.monotonic() - waited_since)
    try:
        yield
    finally:
        _unlock(connection)


def _unlock(connection: sa.Connection) -> None:
    """Release :data:`MIGRATION_LOCK`. A failed migration leaves its transaction aborted (the
    unlock needs a clean one); a connection that is gone has released it already, and its
    error must not hide the migration's own."""
    try:
        if connection.in_transaction():
            connection.rollback()
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        connection.commit()
    # SQLAlchemyError, not only DBAPIError: a connection lost mid-migration (its backend
    # terminated) is refused a rollback as a PendingRollbackError, which is not one.
    except sa.exc.SQLAlchemyError as exc:
        log.warning(
            "could not release the migration lock (the server ends it with the session): %s",
            getattr(exc, "orig", None) or exc,
        )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
