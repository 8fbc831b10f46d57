"""Database engines and migrations for the two supported stores.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so a committed write
survives a crash, a busy timeout, foreign keys on, and write transactions that take the write
lock up front (``BEGIN IMMEDIATE``): a read-then-write transaction can then never fail halfway
on a lock upgrade. PostgreSQL uses psycopg 3 with a connection pool and pre-ping.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "taskrelay_write"


def sqlite_path(url: str) -> Path | None:
    parsed = sa.engine.make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


def make_engine(url: str, *, pool_size: int = 10, sqlite_synchronous: str = "FULL") -> Engine:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _configure_sqlite(engine, sqlite_synchronous)
        return engine
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself (pysqlite's own is too late).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def one_of(
    dialect: sa.Dialect, column: sa.ColumnElement[Any], name: str, values: Iterable[Any]
) -> sa.ColumnElement[bool]:
    """``column IN values`` with one bound parameter, however many values: an array on
    PostgreSQL (``= ANY(:name)``), a JSON list read by ``json_each`` on SQLite. A plain
    ``IN (...)`` binds, type-processes and renders one parameter per value on every call, which
    costs more than the query on the hot path."""
    listed = list(values)
    if dialect.name == "postgresql":
        array = sa.bindparam(name, listed, type_=postgresql.ARRAY(column.type))
        return column == sa.any_(array)
    each = sa.func.json_each(sa.bindparam(name, json.dumps(listed), type_=sa.String))
    return column.in_(sa.select(each.table_valued("value").c.value))


def _script_location() -> Path:
    """``migrations/`` beside the package in a checkout; bundled inside it in a wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "_migrations", package_dir.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("TaskRelay's migrations folder is missing from this installation")


def alembic_config(database_url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_script_location()))
    # "%" is Alembic's interpolation character; escape it so URLs with encoded characters work.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["taskrelay_configure_logging"] = False
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (creating the SQLite file and folder if needed)."""
    path = sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision (``None`` for an empty database); a plain query, so a
    frequent readiness probe stays cheap and quiet."""
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def head_revision(database_url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
