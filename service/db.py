"""Database engines and migrations for the two supported stores.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so a committed write
survives a crash, a busy timeout, foreign keys on, and write transactions that take the write
lock up front (``BEGIN IMMEDIATE``): a read-then-write transaction can then never fail halfway
on a lock upgrade. The dispatcher's own bookkeeping may commit without the fsync
(:func:`without_fsync`). PostgreSQL uses psycopg 3 with a connection pool and pre-ping.

Storage faults are translated here, at the driver boundary, for both stores: a full disk, a
read-only database and a failing disk become :class:`~service.errors.StoreFull`,
:class:`~service.errors.StoreReadOnly` and :class:`~service.errors.StoreIOError` (each a
:class:`~service.errors.StoreUnavailable`: nothing was recorded, never a 2xx), logged once when
they begin, and remembered per engine until a write check (:func:`check_writes`, run by the
readiness probe) finds writes working again. ``migrate`` refuses a SQLite file or folder that
cannot be written before anything starts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine
from sqlalchemy.sql.compiler import SQLCompiler

from service.errors import (
    StorageFault,
    StoreFull,
    StoreIOError,
    StoreReadOnly,
    StoreUnavailable,
    TaskRelayError,
)

log = logging.getLogger(__name__)

_Statement = TypeVar("_Statement", bound=sa.Executable)

SQLITE_BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "taskrelay_write"

# SQLite's primary result codes (the low byte of an extended code such as SQLITE_IOERR_WRITE).
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_FULL = 13
# PostgreSQL's SQLSTATEs for the same faults.
PG_DISK_FULL = "53100"
PG_READ_ONLY_TRANSACTION = "25006"
PG_IO_ERROR = "58030"
# After a fault, the write check wants this much room before it calls the store writable
# again: a full disk frees a few bytes now and then, and SQLite's write-ahead log reuses its
# own space, so that one small write succeeding says little about the next batch.
MIN_FREE_BYTES = 1 << 20
MIN_FREE_PAGES = 64

FULL_MESSAGE = (
    "The database disk is full: free space on it (or raise its quota). Nothing was recorded; "
    "writes work again as soon as there is room, so retry later."
)
READ_ONLY_MESSAGE = (
    "The database is read-only: make its file, folder and file system writable again. "
    "Nothing was recorded; retry later."
)
IO_ERROR_MESSAGE = (
    "The database's disk failed (disk I/O error): check the disk and the file system holding "
    "the database. Nothing was recorded; retry later."
)
_WRITE_REFUSED = (errno.EROFS, errno.EPERM, errno.EACCES)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OPENED_READ_ONLY = "taskrelay_opened_read_only"


def sqlite_path(url: str) -> Path | None:
    parsed = sa.engine.make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


# A PostgreSQL server that stops answering without closing the connection (a network
# partition, a host gone): the client's TCP notices within about 25 s (probes after 10 s of
# silence, every 5 s, 3 lost), or 30 s after data it sent was not acknowledged, and the
# statement waiting on it fails (StoreUnavailable) instead of waiting for the kernel's
# default (two hours; 15 minutes of retransmissions). Values in the URL's query win.
PG_KEEPALIVES: Mapping[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    sqlite_synchronous: str = "FULL",
    statement_timeout: float | None = None,
) -> Engine:
    """An engine for ``url``. ``statement_timeout`` (seconds; PostgreSQL only, None: none):
    the longest one statement of the serving process may take, lock waits included
    (``TASKRELAY_DB_STATEMENT_TIMEOUT``); migrations run without one."""
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
    else:
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args=_pg_connect_args(parsed),
        )
        if statement_timeout:
            _set_statement_timeout(engine, parsed, statement_timeout)
        event.listen(engine, "handle_error", _drop_stuck_connection)
    _translate_storage_faults(engine)
    return engine


def _pg_connect_args(parsed: sa.engine.URL) -> dict[str, Any]:
    """psycopg's connection arguments: a connect timeout and :data:`PG_KEEPALIVES` (libpq's
    own, not sent to the server), each unless the URL's query sets it."""
    args: dict[str, Any] = {"connect_timeout": 5, **PG_KEEPALIVES}
    return {name: value for name, value in args.items() if name not in parsed.query}


def _set_statement_timeout(engine: Engine, parsed: sa.engine.URL, seconds: float) -> None:
    """``SET statement_timeout`` on each new connection, committed (a later rollback must not
    undo it), unless the URL's ``options`` set one. A SET rather than the ``options``
    startup parameter, which PgBouncer refuses ("unsupported startup parameter")."""
    given = parsed.query.get("options", "")
    if "statement_timeout" in (" ".join(given) if isinstance(given, tuple) else given):
        return
    set_on_connect(engine, f"SET statement_timeout = {round(seconds * 1000)}")


def set_on_connect(engine: Engine, *statements: str) -> None:
    """Run ``statements`` (session SETs) on each new PostgreSQL connection of ``engine``,
    committed: a later rollback must not undo them."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        dbapi_connection.commit()


def _drop_stuck_connection(context: sa.engine.ExceptionContext) -> None:
    """A psycopg connection an error left mid-command is dropped, as a lost one is.

    When the server goes away in the middle of a command (an outage, a restart), psycopg can
    raise with libpq still waiting for that command's results, or still in pipeline mode (the
    one psycopg's ``executemany`` runs in: its exit fails "while busy") before it has seen
    the socket close. The connection is not yet "broken", so SQLAlchemy would roll it back
    and hand it back to the pool, and that ROLLBACK fails too ("another command is already in
    progress", "PQsendQuery not allowed in pipeline mode"): an error traceback in the log, and
    the rollback's error raised in place of the first one. Marked a disconnect, it is closed
    instead (this connection only: the others are checked by the pool's ping)."""
    connection = context.connection
    if connection is None or connection.invalidated or context.is_disconnect:
        return  # a lost connection keeps SQLAlchemy's own handling
    try:
        driver = connection.connection.driver_connection
    except sa.exc.SQLAlchemyError:
        return
    pgconn = getattr(driver, "pgconn", None)
    if pgconn is None:
        return
    if (
        pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF
        or pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
    ):
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    path = sqlite_path(engine.url.render_as_string(hide_password=False))
    _SYNCHRONOUS[engine] = synchronous.upper()
    if path is not None:  # resolved now: a later change of working folder must not move it
        _WRITE_AHEAD_LOG[engine] = _sidecar(path.resolve(), "-wal")

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself (pysqlite's own is too late).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()
        if path is not None and _write_refused(path) is not None:
            # SQLite opened the file read-only (it could not open it for writing): fine for
            # reads, but it would stay read-only once the file is writable again.
            record.info[_OPENED_READ_ONLY] = True

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection: sqlite3.Connection, record: Any, proxy: Any) -> None:
        if record.info.get(_OPENED_READ_ONLY) and path is not None and not _write_refused(path):
            # The file is writable again: the pool replaces this connection with a new one.
            raise sa.exc.DisconnectionError("the SQLite file is writable again")

    @event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


# Each SQLite engine's synchronous setting (make_engine), restored after without_fsync().
_SYNCHRONOUS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_FSYNC_PER_COMMIT = frozenset({"FULL", "EXTRA", "2", "3"})
# Each SQLite file engine's write-ahead log (sync_log).
_WRITE_AHEAD_LOG: weakref.WeakKeyDictionary[Engine, Path] = weakref.WeakKeyDictionary()


@contextmanager
def without_fsync(connection: sa.Connection) -> Iterator[None]:
    """Commits on ``connection`` inside skip SQLite's fsync (``synchronous=NORMAL``; enter it
    before the transaction begins: SQLite refuses the change inside one). For writes that may be
    lost to a power cut or an OS crash, never to a process crash: the dispatcher's leases and
    records of attempts, whose loss only means a webhook goes out again, which at-least-once
    delivery allows. Such a commit becomes durable with the next fsynced one (every callback
    batch), which syncs the whole write-ahead log. A no-op on PostgreSQL, and where the engine
    does not fsync every commit anyway.

    The setting is restored before the connection goes back to the pool; if that fails, the
    connection is discarded, so a callback batch can never commit on it without its fsync. A
    transaction inside that wrote something that must not be lost after all calls
    :func:`sync_log` once it has committed."""
    level = _SYNCHRONOUS.get(connection.engine)
    if level not in _FSYNC_PER_COMMIT:
        yield
        return
    if connection.in_transaction():
        raise RuntimeError("without_fsync() must be entered before the transaction begins")
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        try:
            driver.execute(f"PRAGMA synchronous={level}")
        except sqlite3.Error:
            # During a storage fault, which has its own line, this came once per dispatcher
            # pass, every second (found by the metrics and logs hunt): quiet then.
            health = _HEALTH.get(connection.engine)
            faulted = health is not None and health.fault is not None
            log.log(
                logging.DEBUG if faulted else logging.WARNING,
                "could not restore synchronous=%s; discarding the connection",
                level,
            )
            connection.invalidate()


def sync_log(engine: Engine) -> None:
    """Make every commit so far durable now (SQLite: fsync the write-ahead log, where commits
    made :func:`without_fsync` wait for the next synced one). Nothing to do on PostgreSQL."""
    log_file = _WRITE_AHEAD_LOG.get(engine)
    if log_file is None:
        return
    try:
        descriptor = os.open(log_file, os.O_RDONLY)
    except FileNotFoundError:  # no log: every commit is in the database file already
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def one_of(dialect: str, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
    """``column IN :name`` with one bound parameter, however many values: an array on
    PostgreSQL (``= ANY(:name)``), a JSON list read by ``json_each`` on SQLite. Pass the values
    as ``{name: listed(dialect, values)}``. A plain ``IN (...)`` binds, type-processes and
    renders one parameter per value on every call, which costs more than the query on the hot
    path; and since the clause holds no values, a statement using it is built once per dialect
    (see :func:`prebuilt`) instead of on every call."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    each = sa.func.json_each(sa.bindparam(name, type_=sa.String))
    return column.in_(sa.select(each.table_valued("value").c.value))


def none_of(dialect: str, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
    """``column NOT IN :name``, as :func:`one_of` (the column must not be NULL). Not
    ``~one_of(...)``: SQLAlchemy negates ``= ANY`` into ``!= ANY``, which is not the same."""
    if dialect == "postgresql":
        return column != sa.all_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    each = sa.func.json_each(sa.bindparam(name, type_=sa.String))
    return column.not_in(sa.select(each.table_valued("value").c.value))


def listed(dialect: str, values: Iterable[Any]) -> Any:
    """The value for a :func:`one_of` parameter."""
    items = list(values)
    return items if dialect == "postgresql" else json.dumps(items)


def prebuilt(build: Callable[[str], _Statement]) -> Callable[[sa.Connection], _Statement]:
    """A statement built once per dialect and reused: building a Core statement (coercions,
    then a cache key for the compiled-SQL cache on every execution of a new object) cost more
    CPU on the hot path than running it. ``build(dialect_name)`` must bind every value as a
    parameter."""
    built: dict[str, _Statement] = {}

    def statement(connection: sa.Connection) -> _Statement:
        name = connection.dialect.name
        found = built.get(name)
        if found is None:
            found = built[name] = build(name)
        return found

    return statement


class Driven(NamedTuple):
    """A statement as :class:`DriverSQL` compiles it for one dialect."""

    sql: str
    # One row of values by name -> the driver's parameters, through the bind processors.
    params: Callable[[Mapping[str, Any]], Any]
    # One row as the driver returns it -> the values a Core execute would give.
    row: Callable[[Sequence[Any]], tuple[Any, ...]]
    returns: bool  # whether it selects or returns columns


class DriverSQL:
    """A Core statement compiled once per dialect to the driver's own SQL, with the dialect's
    type processors for its parameters (``TypeEngine.bind_processor``) and for the columns it
    selects or returns (``result_processor``): values go in and come out exactly as a Core
    ``execute`` writes and reads them. For running a statement on the driver's connection
    itself (PostgreSQL's pipeline mode, :mod:`service.ingest`, which SQLAlchemy's execute
    cannot use: it asks for a result's columns at once), or for shaping many rows in one
    step (:class:`ManyRows`). A parameter without a value (``sa.bindparam(name)``) is taken
    from each row by its name; a value the statement holds (a literal in a comparison) is
    bound as it is."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._built: dict[str, Driven] = {}

    def on(self, dialect: sa.Dialect) -> Driven:
        built = self._built.get(dialect.name)
        if built is None:
            built = self._built[dialect.name] = self._build(dialect)
        return built

    def _build(self, dialect: sa.Dialect) -> Driven:
        compiled = self.statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        positional = compiled.positiontup
        names = list(positional) if positional is not None else list(by_name)
        # Per parameter: the row's key and its processor, or (None, the value the statement holds).
        binds: list[tuple[str | None, Any, Callable[[Any], Any] | None]] = []
        for name in names:
            bind = by_name[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                binds.append((bind.key, None, process))
            else:
                value = bind.effective_value
                binds.append((None, value if process is None else process(value), None))
        columns = getattr(self.statement, "exported_columns", ())
        results = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]

        def values(row: Mapping[str, Any]) -> list[Any]:
            return [
                fixed if key is None else row[key] if process is None else process(row[key])
                for key, fixed, process in binds
            ]

        def params(row: Mapping[str, Any]) -> Any:
            if positional is not None:
                return tuple(values(row))
            return dict(zip(names, values(row), strict=True))

        def result(row: Sequence[Any]) -> tuple[Any, ...]:
            return tuple(
                value if process is None else process(value)
                for value, process in zip(row, results, strict=True)
            )

        return Driven(compiled.string, params, result, bool(results))


class ManyRows:
    """An INSERT or UPDATE run for many rows at once on the hot path, compiled once per dialect
    to the driver's own SQL (:class:`DriverSQL`) and run with ``exec_driver_sql``. For a
    statement executed with a list of rows, SQLAlchemy builds each row's whole parameter set,
    type-processes it and then shapes it for the driver, which cost more CPU than SQLite's own
    work for the row; here each row is shaped in one step, with the same type processors, so
    values are written exactly as a Core ``execute`` writes them. Storage faults are translated
    as for any statement (``exec_driver_sql`` raises SQLAlchemy's errors). ``statement`` binds
    every value by name (``sa.bindparam``), and an INSERT is ``inline()`` (no RETURNING of
    generated keys)."""

    def __init__(self, statement: sa.Insert | sa.Update) -> None:
        self.statement = statement
        self.driven = DriverSQL(statement)

    def execute(self, connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        sql, params, _, _ = self.driven.on(connection.dialect)
        connection.exec_driver_sql(sql, [params(row) for row in rows])


@contextmanager
def driver_errors(connection: sa.Connection, what: str) -> Iterator[None]:
    """Errors the driver raises inside, for statements run on ``connection``'s driver
    connection itself (:class:`DriverSQL`), handled as SQLAlchemy handles its own: wrapped in
    its exception classes (``IntegrityError``, ``OperationalError``...), passed through the
    engine's ``handle_error`` hooks (the storage faults above), and the connection invalidated
    when it was lost. ``what`` names the statements in the error."""
    dbapi_error = connection.dialect.loaded_dbapi.Error
    try:
        yield
    except dbapi_error as exc:
        # The same handling as Connection.execute's, for an error it did not see.
        connection._handle_dbapi_exception(exc, what, None, None, None)


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


class SchemaError(TaskRelayError):
    """The schema cannot be brought to the revision asked for; nothing was changed."""

    code = "schema_error"


class SchemaTooNew(SchemaError):
    """The database's schema is at a revision this release does not know: a newer release
    migrated it. Only that release has the scripts to downgrade it."""

    code = "schema_too_new"

    def __init__(self, found: str, head: str | None) -> None:
        message, fix = newer_schema(found, head)
        super().__init__(f"{message} Fix: {fix}", details={"revision": found, "head": head})


def newer_schema(found: str, head: str | None) -> tuple[str, str]:
    """What to tell an operator whose schema is at ``found``, a revision this release does not
    know, and what to do about it (``serve``, ``migrate``, ``/readyz`` and ``doctor`` alike)."""
    return (
        f"the database schema is at {found}, a revision this TaskRelay does not know: a newer "
        f"version migrated it (this one needs {head}).",
        "run the newer TaskRelay, or downgrade the schema with it (`taskrelay migrate "
        f"--revision {head}`, run by the newer version).",
    )


def schema_revisions(database_url: str) -> tuple[str | None, frozenset[str]]:
    """The newest schema revision this TaskRelay knows, and every one it knows."""
    return _revisions(ScriptDirectory.from_config(alembic_config(database_url)))


def _revisions(script: ScriptDirectory) -> tuple[str | None, frozenset[str]]:
    known = frozenset(revision.revision for revision in script.walk_revisions())
    return script.get_current_head(), known


class DataWouldBeLost(SchemaError):
    """A downgrade would delete stored data (its migrations' ``DOWNGRADE_DISCARDS``, counted):
    refused unless the caller said to discard it. Nothing was changed."""

    code = "downgrade_discards_data"


def count_discards(
    connection: sa.Connection, discards: Mapping[str, str], revision: str
) -> list[str]:
    """What the downgrade of ``revision`` would delete, counted: its migration's
    ``DOWNGRADE_DISCARDS`` (what -> the SQL counting it), the non-zero counts only."""
    lost = []
    for what, count_sql in discards.items():
        count = connection.execute(sa.text(count_sql)).scalar_one()
        if count:
            lost.append(f"{what}: {count} (revision {revision})")
    return lost


def would_lose(
    moved_from: str | None,
    moved_to: str | None,
    lost: Sequence[str],
    *,
    left_at: str | None = None,
    go_ahead: str = "--discard-data",
) -> DataWouldBeLost:
    """The refusal of a downgrade that would delete ``lost``; ``left_at``: the revision the
    steps already done left the schema at (nothing was changed without it); ``go_ahead``:
    the option that lets it delete."""
    left = f" The schema is left at {left_at}." if left_at else ""
    return DataWouldBeLost(
        f"downgrading the schema from {moved_from} to {moved_to or 'base'} would delete "
        f"{'; '.join(lost)}.{left} Back the database up first; to go ahead and delete it, "
        f"run the same command with {go_ahead}.",
        details={"discards": list(lost), "left_at": left_at},
    )


class Migrated(NamedTuple):
    """What :func:`migrate` did: the revision it found and the one it left (None: no schema)."""

    before: str | None
    after: str | None
    downgraded: bool


def migrate(database_url: str, revision: str = "head", *, discard_data: bool = False) -> Migrated:
    """Bring the schema to ``revision``: up (creating the SQLite file and folder if needed), or
    down when ``revision`` is older than the schema (``base``, an earlier revision id, or a
    relative ``-N``), as ``alembic upgrade`` and ``alembic downgrade`` would.

    The direction is decided on the revision the database holds when the run begins: inside
    the run, on PostgreSQL with the migration lock held (migrations/env.py), so a run that
    waited for another decides on what that one left. A schema at a revision this release
    does not know raises :class:`SchemaTooNew`; an unknown ``revision``, :class:`SchemaError`.
    A downgrade that would delete stored data (subscriptions, pending deliveries, tasks, ...)
    raises :class:`DataWouldBeLost`, naming it, unless ``discard_data``.

    A SQLite file or folder that cannot be written stops this first, with a
    :class:`StoreReadOnly` (or :class:`StoreFull`) naming it and the cause: a store already at
    ``revision`` needs no write to migrate, and would otherwise start and refuse every write."""
    path = sqlite_path(database_url)
    if path is not None:
        check_sqlite_writable(path)
    config = alembic_config(database_url)
    script = ScriptDirectory.from_config(config)
    head, known = _revisions(script)
    if not revision.strip():
        raise SchemaError(
            f"no schema revision given: name one (e.g. {head}), base, head, or -N (N back)."
        )
    relative = revision.startswith(("-", "+"))
    if relative and re.fullmatch(r"[0-9]+", revision[1:]) is None:
        raise SchemaError(
            f"there is no schema revision {revision!r} in this TaskRelay: a relative one is -N "
            f"or +N with N a whole number of steps (its newest is {head})."
        )
    if relative and int(revision[1:]) == 0:
        raise SchemaError(
            f"{revision!r} moves the schema no step: give -N or +N with N at least 1, a "
            f"revision, base or head (its newest is {head})."
        )
    try:  # before the run: a revision that does not exist is no reason to touch the database
        target = None if relative or revision == "base" else script.get_revision(revision)
    except CommandError as exc:
        raise SchemaError(
            f"there is no schema revision {revision!r} in this TaskRelay (its newest is {head})."
        ) from exc
    if target is not None and revision != "head" and target.revision != revision:
        # Alembic takes a unique prefix ("001" is 0010): a typo for 0001 would go the wrong way.
        raise SchemaError(
            f"there is no schema revision {revision!r} in this TaskRelay; give a whole one "
            f"(did you mean {target.revision}? its newest is {head})."
        )
    done: list[Migrated] = []

    def steps(heads: tuple[str, ...], context: Any) -> list[Any]:
        current = heads[0] if heads else None
        if current is not None and current not in known:
            raise SchemaTooNew(current, head)
        if current is None and revision != "base" and not revision.startswith("-"):
            in_the_way = tables_in_the_way(context.connection)
            if in_the_way:
                raise SchemaError(foreign_schema(context.connection, in_the_way))
        if revision == "base" or revision.startswith("-"):
            down = current is not None
        elif target is None or current is None or target.revision == current:
            down = False
        else:  # downwards when the target is one the schema's revision came from
            older = script.iterate_revisions(current, "base")
            down = target.revision in {earlier.revision for earlier in older}
        # What alembic's own upgrade and downgrade commands run (they too pass the heads).
        move = script._downgrade_revs if down else script._upgrade_revs
        try:
            found = move(revision, heads)  # type: ignore[arg-type]
        except CommandError as exc:  # a relative revision beyond either end
            found_at = current or "nothing (an empty database)"
            if not relative:
                message = f"cannot migrate to {revision!r} from {found_at}: {exc}."
                raise SchemaError(message) from exc
            up = revision.startswith("+")
            newest_first = [step.revision for step in script.iterate_revisions(head, "base")]
            if current is None:
                steps_left = len(newest_first) if up else 0
            else:
                place = newest_first.index(current)
                steps_left = place if up else len(newest_first) - place
            raise SchemaError(
                f"cannot move the schema {revision} steps from {found_at}: only {steps_left} "
                f"lead {'up' if up else 'down'} from it (to {head if up else 'base'})."
            ) from exc
        after = (found[-1].to_revisions or (None,))[0] if found else current
        if down and found and not discard_data:
            # Every step counted before the first runs, so that a refusal changes nothing;
            # the step that deletes counts again, with the tables locked (migrations/env.py,
            # guard_downgrade), for what is written meanwhile.
            lost = [
                line
                for step in found
                for line in count_discards(
                    context.connection,
                    getattr(step.revision.module, "DOWNGRADE_DISCARDS", {}),
                    step.revision.revision,
                )
            ]
            if lost:
                raise would_lose(current, after, lost)
        done.append(Migrated(current, after, down and bool(found)))
        return list(found)

    config.attributes["discard_data"] = discard_data
    try:
        with EnvironmentContext(config, script, fn=steps, destination_rev=revision):
            script.run_env()
    except sa.exc.SQLAlchemyError as exc:
        # A connection lost mid-migration (its backend terminated, the server restarted):
        # the clean-up after it (alembic's, a migration's own unlock) is refused as a
        # PendingRollbackError, which hid the database's own error behind it.
        cause = _database_error_in(exc)
        if cause is None or cause is exc:
            raise
        raise cause from exc
    return done[0]


def tables_in_the_way(connection: sa.Connection) -> list[str]:
    """The tables a database with no TaskRelay schema holds that stand in the way of making
    one: in a SQLite file, any (a file is one program's; `serve` added TaskRelay's tables to
    another program's file found at TASKRELAY_DATABASE_URL); on PostgreSQL, where a database
    may be shared, those with the names TaskRelay's tables need."""
    from sqlmodel import SQLModel

    import service.models  # noqa: F401  (registers the tables on SQLModel.metadata)

    names = set(sa.inspect(connection).get_table_names())
    if connection.dialect.name != "sqlite":
        names &= set(SQLModel.metadata.tables)
    return sorted(names - {"alembic_version"})


def foreign_schema(connection: sa.Connection, in_the_way: Sequence[str]) -> str:
    """Why a database holding ``in_the_way`` (:func:`tables_in_the_way`) is not migrated."""
    shown = ", ".join(in_the_way[:10]) + (", ..." if len(in_the_way) > 10 else "")
    if connection.dialect.name == "sqlite":
        path = sqlite_path(connection.engine.url.render_as_string(hide_password=False))
        return (
            f"the SQLite file {path} holds another program's tables ({shown}) and no TaskRelay "
            "schema: TaskRelay keeps its tasks in a file of its own and changes nothing in "
            "this one. Check TASKRELAY_DATABASE_URL (or TASKRELAY_DATA_DIR), or point it at a "
            "new file."
        )
    return (
        f"the database has no TaskRelay schema, but holds tables of the names it needs "
        f"({shown}): another application's, or made by hand. Nothing was changed. Check "
        "TASKRELAY_DATABASE_URL, or give TaskRelay a database of its own."
    )


def _database_error_in(exc: BaseException) -> sa.exc.DBAPIError | None:
    """The first database error (a DBAPIError) in ``exc``'s chain of causes and contexts."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, sa.exc.DBAPIError):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def schema_drift(engine: Engine) -> list[str]:
    """How the database's tables, columns and indexes differ from this release's models, one
    line each (empty: none). A schema at the right revision can still differ: a migration
    stopped midway that built or dropped an index CONCURRENTLY, or a change made by hand.
    (Partial indexes' predicates are not compared.)"""
    from sqlmodel import SQLModel

    import service.models  # noqa: F401  (registers the tables on SQLModel.metadata)

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        found = compare_metadata(context, SQLModel.metadata)
    lines = []
    for diff in found:
        # Column changes come as lists of tuples; the others as one tuple.
        for change in diff if isinstance(diff, list) else [diff]:
            kind = str(change[0])
            if kind in ("add_column", "remove_column"):  # (kind, schema, table, Column)
                name = f"{change[2]}.{change[3].name}"
            elif kind.startswith("modify_"):  # (kind, schema, table, column, ...)
                name = f"{change[2]}.{change[3]}"
            else:  # (kind, Table | Index | Constraint)
                name = str(getattr(change[1], "name", change[1]))
            lines.append(f"{_DRIFT_WORDS.get(kind, kind)} {name}")
    return lines


_DRIFT_WORDS = {
    "add_index": "missing index",
    "remove_index": "unexpected index",
    "add_table": "missing table",
    "remove_table": "unexpected table",
    "add_column": "missing column",
    "remove_column": "unexpected column",
    "modify_type": "a column of another type:",
    "modify_nullable": "a column nullable otherwise:",
}


def check_sqlite_writable(path: Path) -> None:
    """Refuse a SQLite database that cannot be written: its folder (SQLite creates its -wal and
    -shm files there), the file and its -wal and -shm files if they exist. The checks write for
    real (open for writing, create a file): permission bits, which root ignores, are not asked,
    while a read-only mount or an immutable file refuses root too."""
    folder = path.parent
    in_the_way = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if in_the_way is not None and not in_the_way.is_dir():
        raise StoreUnavailable(
            f"cannot create the database folder {folder}: {in_the_way} is a file, where a "
            "folder must be. Point TASKRELAY_DATA_DIR (or TASKRELAY_DATABASE_URL) at a "
            "folder, or move the file away."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _refusal(f"cannot create the database folder {folder}", exc) from exc
    for name in (path, _sidecar(path, "-wal"), _sidecar(path, "-shm")):
        refused = _not_writable(name)
        if refused is not None:
            what = "the database file" if name == path else "SQLite's file"
            raise _refusal(f"cannot write to {what} {name}", refused)
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".taskrelay-write-check-")
    except OSError as exc:
        raise _refusal(
            f"cannot write to the database folder {folder} (SQLite keeps its -wal and -shm "
            "files beside the database)",
            exc,
        ) from exc
    os.close(descriptor)
    os.unlink(probe)
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        log.warning(
            "the disk holding %s has %d bytes free: writes will be refused (507 store_full) "
            "once it is full",
            folder,
            free,
        )


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _refusal(what: str, exc: OSError) -> StorageFault:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _NO_SPACE:
        return StoreFull(f"{what}: the disk is full ({reason})")
    if exc.errno in _WRITE_REFUSED:
        return StoreReadOnly(f"{what}: read-only ({reason})")
    # Anything else (a folder that cannot exist there, a name too long, a loop of links):
    # said as it is; "read-only (No such file or directory)" misled.
    return StoreIOError(f"{what}: {reason}")


# --- storage faults -----------------------------------------------------------------------


def storage_fault(exc: BaseException, sqlite_file: Path | None = None) -> StorageFault | None:
    """The typed error for a driver error that says the storage itself refused: disk full,
    read-only, I/O error; ``None`` for anything else (a lock, a lost connection, a constraint).

    SQLite reports a write the operating system refused for want of permission (a file system
    remounted read-only, an immutable file) as a plain I/O error; with ``sqlite_file`` given,
    an I/O error is checked against the file and becomes :class:`StoreReadOnly` when opening
    it for writing is refused."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc).lower()
        details = {"reason": getattr(exc, "sqlite_errorname", None) or type(exc).__name__}
        if primary == SQLITE_FULL or "database or disk is full" in text:
            return StoreFull(FULL_MESSAGE, details=details)
        if primary == SQLITE_READONLY or "readonly database" in text:
            return StoreReadOnly(READ_ONLY_MESSAGE, details=details)
        if primary == SQLITE_IOERR or "disk i/o error" in text:
            if sqlite_file is not None and _write_refused(sqlite_file) is not None:
                return StoreReadOnly(READ_ONLY_MESSAGE, details=details)
            # Growing the -shm file on a full disk is an I/O error to SQLite
            # (SQLITE_IOERR_SHMSIZE), not SQLITE_FULL: "the disk failed" for a full one.
            if sqlite_file is not None and out_of_room(sqlite_file):
                return StoreFull(FULL_MESSAGE, details=details)
            return StoreIOError(IO_ERROR_MESSAGE, details=details)
        return None
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return None
    details = {"reason": f"SQLSTATE {sqlstate}"}
    if sqlstate == PG_DISK_FULL:
        return StoreFull(FULL_MESSAGE, details=details)
    if sqlstate == PG_READ_ONLY_TRANSACTION:
        return StoreReadOnly(READ_ONLY_MESSAGE, details=details)
    if sqlstate == PG_IO_ERROR:
        return StoreIOError(IO_ERROR_MESSAGE, details=details)
    return None


def out_of_room(path: Path) -> bool:
    """Whether the disk holding the SQLite file has less than :data:`MIN_FREE_BYTES` free."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES


def _write_refused(path: Path) -> OSError | None:
    """Why the SQLite file (or its -wal) cannot be written, if it cannot."""
    for name in (path, _sidecar(path, "-wal")):
        refused = _not_writable(name)
        if refused is not None:
            return refused
    return None


def _not_writable(name: Path) -> OSError | None:
    """Why an existing file cannot be written (None if it can, or does not exist).

    Asked with access(2), never by opening the file: closing any descriptor of a SQLite file
    releases every POSIX lock this process holds on it, SQLite's included, and another process
    could then checkpoint and delete the write-ahead log under this one's connections (found by
    tests/test_shutdown_e2e.py: a second process's commits stayed invisible until it exited).
    access(2) also refuses root on a read-only file system (EROFS) and an immutable file
    (EPERM), which is what matters here; permission bits, which root ignores, do not."""
    if os.access(name, os.W_OK):
        return None
    try:
        flags = os.statvfs(name).f_flag
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc
    if flags & os.ST_RDONLY:
        code = errno.EROFS
    else:  # root is refused an immutable file; anyone else, the permission bits too
        code = errno.EPERM if os.geteuid() == 0 else errno.EACCES
    return OSError(code, os.strerror(code), str(name))


class StorageHealth:
    """The storage fault an engine last saw, until a write check finds writes working again.
    Logs one line when a fault begins (or changes kind) and one when it ends, however many
    requests fail in between (each of those logs its own one-line answer)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._lock = threading.Lock()
        self.fault: StorageFault | None = None

    def record(self, fault: StorageFault, cause: object = None) -> None:
        with self._lock:
            previous, self.fault = self.fault, fault
        if previous is None or previous.code != fault.code:
            found = f" ({fault.reason}: {cause})" if cause is not None else ""
            log.error(
                "database storage fault on %s: %s%s; writes answer %d %s until it is fixed, "
                "reads still work",
                self.where,
                fault.message,
                found,
                fault.status,
                fault.code,
            )

    def clear(self) -> None:
        with self._lock:
            previous, self.fault = self.fault, None
        if previous is not None:
            log.warning("database writes work again on %s (%s is over)", self.where, previous.code)


_HEALTH: weakref.WeakKeyDictionary[Engine, StorageHealth] = weakref.WeakKeyDictionary()


def writes_worked(engine: Engine) -> None:
    """A write transaction on ``engine`` committed: a storage fault it recorded is over, and
    its end logged. Before, only the write check of ``/readyz`` ended one: without a probe
    the end was never logged, and the next fault of the same kind went unsaid (found by the
    metrics and logs hunt). A full SQLite disk stays a fault while it has under
    :data:`MIN_FREE_BYTES` free, as the write check says: a write squeezed into the last
    bytes is no end of it. Costs a lookup when there is no fault."""
    health = _HEALTH.get(engine)
    if health is None or health.fault is None:
        return
    if isinstance(health.fault, StoreFull):
        path = sqlite_path(engine.url.render_as_string(hide_password=False))
        if path is not None and out_of_room(path):
            return
    health.clear()


def storage_health(engine: Engine) -> StorageHealth | None:
    """The fault record of an engine made by :func:`make_engine` (None for any other)."""
    return _HEALTH.get(engine)


def _describe(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        path = sqlite_path(url.render_as_string(hide_password=False))
        return f"SQLite file {os.path.abspath(path) if path is not None else ':memory:'}"
    return f"PostgreSQL database {url.database} on {url.host or 'localhost'}:{url.port or 5432}"


def _translate_storage_faults(engine: Engine) -> None:
    health = StorageHealth(_describe(engine))
    _HEALTH[engine] = health
    path = sqlite_path(engine.url.render_as_string(hide_password=False))

    @event.listens_for(engine, "handle_error")
    def on_error(context: sa.engine.ExceptionContext) -> BaseException | None:
        original = context.original_exception
        fault = storage_fault(original, path)
        if fault is None:
            return None
        refused = _write_refused(path) if path is not None else None
        cause = f"{original}; opening it for writing: {refused.strerror}" if refused else original
        health.record(fault, cause)
        if isinstance(fault, StoreReadOnly):
            # A connection SQLite opened read-only stays so, and a PostgreSQL connection to a
            # standby stays there: let the pool open new ones, which see the storage as it is.
            context.is_disconnect = True
        return fault


def check_writes(engine: Engine) -> None:
    """While the engine's last storage fault stands, check whether writes work again: raise
    the :class:`StorageFault` if not, forget the fault if so. Costs nothing when no fault was
    seen, so a frequent readiness probe stays cheap.

    SQLite: at least ``MIN_FREE_BYTES`` free on the file's disk, room for ``MIN_FREE_PAGES``
    more pages under the connection's ``max_page_count``, and a committed write (the header's
    ``user_version``, rewritten unchanged). PostgreSQL: the server is not a standby and
    accepts read-write transactions (a full PostgreSQL disk shows in the writes' 507s)."""
    health = _HEALTH.get(engine)
    if health is None or health.fault is None:
        return
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                _check_sqlite_writes(connection, health)
            else:
                _check_postgresql_writes(connection, health)
    except sa.exc.DBAPIError as exc:  # busy, or gone: no verdict on the storage
        raise StoreUnavailable(
            "The database did not answer the write check; nothing was recorded. Retry shortly.",
            details={"reason": type(exc.orig).__name__ if exc.orig else type(exc).__name__},
        ) from exc
    health.clear()


def _check_sqlite_writes(connection: sa.Connection, health: StorageHealth) -> None:
    path = sqlite_path(connection.engine.url.render_as_string(hide_password=False))
    if path is not None:
        stats = os.statvfs(path.parent)
        free = stats.f_bavail * stats.f_frsize
        if free < MIN_FREE_BYTES:
            fault = StoreFull(FULL_MESSAGE, details={"reason": "free space"})
            health.record(fault, f"{free} bytes free, the write check wants {MIN_FREE_BYTES}")
            raise fault

    def pragma(name: str) -> int:
        return int(connection.exec_driver_sql(f"PRAGMA {name}").scalar_one())

    room = pragma("max_page_count") - pragma("page_count") + pragma("freelist_count")
    if room < MIN_FREE_PAGES:
        fault = StoreFull(FULL_MESSAGE, details={"reason": "max_page_count"})
        health.record(fault, f"room for {room} more pages, the write check wants {MIN_FREE_PAGES}")
        raise fault
    connection.rollback()  # end the read the PRAGMAs began; the write takes the lock up front
    connection.execution_options(**{WRITE_OPTION: True})
    with connection.begin():
        version = pragma("user_version")
        connection.exec_driver_sql(f"PRAGMA user_version = {version}")


def _check_postgresql_writes(connection: sa.Connection, health: StorageHealth) -> None:
    standby, read_only = connection.exec_driver_sql(
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
    ).one()
    connection.rollback()
    if standby or read_only == "on":
        fault = StoreReadOnly(READ_ONLY_MESSAGE, details={"reason": "read-only server"})
        health.record(fault, "a standby" if standby else "default_transaction_read_only is on")
        raise fault


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision (``None`` for an empty database); a plain query, so a
    frequent readiness probe stays cheap and quiet.

    On an engine whose storage refused a write, :func:`check_writes` runs first and raises the
    :class:`StorageFault` while writes still fail: /readyz, which asks for the revision, must
    not say ready while every callback would be refused."""
    check_writes(engine)
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def head_revision(database_url: str) -> str | None:
    return schema_revisions(database_url)[0]
