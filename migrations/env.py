"""Alembic environment. The URL comes from the caller (``taskrelay migrate`` sets it) or, for a
plain ``alembic upgrade head``, from TaskRelay's own settings (TASKRELAY_DATABASE_URL)."""

from __future__ import annotations

import logging
import logging.config
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

import service.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from service.db import make_engine

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


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.settings import load_settings

    return load_settings().database_url


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, sa.Connection):
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with _one_run_at_a_time(connection), context.begin_transaction():
        context.run_migrations()


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
    waited_since = None
    while not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK})").scalar():
        connection.commit()
        if waited_since is None:
            waited_since = time.monotonic()
            log.info("another migration of this database is running; waiting for it to finish")
        time.sleep(LOCK_POLL_SECONDS)
    connection.commit()
    if waited_since is not None:
        log.info("the other migration finished after %.1f s", time.monotonic() - waited_since)
    try:
        yield
    finally:
        # A failed migration leaves its transaction aborted; the unlock needs a clean one.
        if connection.in_transaction():
            connection.rollback()
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
