"""Shared fixtures.

Every test that uses ``database_url`` (directly or through ``app``/``client``/``store``) runs
twice: on a real SQLite file, and on a real PostgreSQL when TASKRELAY_TEST_DATABASE_URL points
at one (``.ci/run`` sets it). Each PostgreSQL run gets a database of its own, created for the
session and dropped at the end; tables are emptied between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from service.app import create_app
from service.db import make_engine, migrate
from service.runtime import Runtime
from service.settings import Settings, load_settings
from service.store import Store

PG_ENV = "TASKRELAY_TEST_DATABASE_URL"
TABLES = (
    "delivery_attempt",
    "delivery",
    "subscription",
    "client_secret",
    "callback_receipt",
    "task_event",
    "task",
)

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"
SECRET = "test-secret-key-0123456789abcdef"


def _pg_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        return None
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@dataclass
class PostgresDatabase:
    admin_url: str
    url: str
    name: str

    @classmethod
    def create(cls, admin_url: str, prefix: str = "taskrelay_test") -> PostgresDatabase:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        return cls(admin_url, url, name)

    def drop(self) -> None:
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def migrated_postgres(prefix: str, why: str = "") -> Iterator[PostgresDatabase]:
    """A fresh PostgreSQL database at the schema's head, dropped afterwards; the test is
    skipped without TASKRELAY_TEST_DATABASE_URL (``why`` says what needs it)."""
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip(f"needs {PG_ENV}" + (f" ({why})" if why else ""))
    database = PostgresDatabase.create(admin_url, prefix=prefix)
    try:
        migrate(database.url)
        yield database
    finally:
        database.drop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test gets a copy (much faster than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[PostgresDatabase]:
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip(f"{PG_ENV} is not set")
    database = PostgresDatabase.create(admin_url)
    migrate(database.url)
    yield database
    database.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and _pg_url() is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV}")
    return str(request.param)


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite file of the test's own (a copy of the template)."""
    path = tmp_path / "taskrelay.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if backend == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database of its own, dropped afterwards: for a test of
    migrations, or of the server's counters for one database."""
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip("needs TASKRELAY_TEST_DATABASE_URL")
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_fresh")
    yield database.url
    database.drop()


@pytest.fixture
def postgres_url(postgres_database: PostgresDatabase) -> str:
    """The session's PostgreSQL database, emptied: for a test of PostgreSQL's own code path."""
    engine = sa.create_engine(postgres_database.url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    engine.dispose()
    return postgres_database.url


def make_settings(database_url: str, tmp_path: Path, **overrides: str) -> Settings:
    environ = {
        "TASKRELAY_DATABASE_URL": database_url,
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        # Loopback: the sandbox serves this machine only (settings.check_public_url).
        "TASKRELAY_PUBLIC_URL": "http://127.0.0.1:8000",
        "TASKRELAY_SECRET_KEY": SECRET,
        "TASKRELAY_API_TOKENS": f"alice:{ALICE},bob:{BOB}",
        "TASKRELAY_SANDBOX": "true",
        **overrides,
    }
    return load_settings(environ, env_file=tmp_path / "no.env")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    engine = make_engine(database_url)
    yield Store(engine)
    engine.dispose()


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, webhook_app: Any, **create: Any
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The app with its lifespan running, in process: its outbound provider calls (and the
    mounted sandbox's callbacks) go back into the app, its webhooks to ``webhook_app``, and
    the client talks to it like a real server (an unhandled error is a 500, not a raise).
    ``create`` passes more keywords to ``create_app`` (a fake clock, say)."""
    transport = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
    application = create_app(
        settings,
        http_transport=transport,
        webhook_transport=httpx.ASGITransport(app=webhook_app),
        **create,
    )
    transport.app = application
    async with application.router.lifespan_context(application):
        client_transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=client_transport, base_url="http://testserver"
        ) as client:
            yield application, client


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """The service with its lifespan running. Outbound HTTP (to the mounted sandbox, and the
    sandbox's callbacks back to TaskRelay) goes through the same app in-process."""
    transport = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
    application = create_app(settings, http_transport=transport)
    transport.app = application
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def runtime(app: Starlette) -> Runtime:
    value = app.state.runtime
    assert isinstance(value, Runtime)
    return value


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    # Like a real server: an unhandled error is a 500 response (and a log line), not a raise.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@contextlib.contextmanager
def statements_with(engine: sa.Engine, fragment: str) -> Iterator[list[tuple[str, Any]]]:
    """The statements ``engine`` runs meanwhile whose SQL contains ``fragment``, each with its
    parameters (for :func:`query_plan`)."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, sql: str, parameters: Any, *args: Any) -> None:
        if fragment in sql:
            seen.append((sql, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)


def query_plan(engine: sa.Engine, sql: str, parameters: Any = ()) -> str:
    """The plan the database would run ``sql`` with, its lines joined by " | ": SQLite's
    EXPLAIN QUERY PLAN, or PostgreSQL's EXPLAIN with sequential scans off (tiny test tables
    make one cheapest; this shows the index the planner would use on a real table)."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters)
            return " | ".join(row[-1] for row in rows)
        connection.exec_driver_sql("SET enable_seqscan = off")
        rows = connection.exec_driver_sql("EXPLAIN " + sql, parameters)
        return " | ".join(row[0] for row in rows)


def auth(token: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: httpx.Response) -> Any:
    return response.json()["error"]["code"]


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway key and self-signed certificate for hooks.test, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=hooks.test",
            "-addext",
            "subjectAltName=DNS:hooks.test",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


async def until(condition: Callable[[], object], seconds: float = 10.0, step: float = 0.0) -> None:
    """Yield to the event loop (``step`` seconds at a time) until ``condition`` holds; fail
    after ``seconds``: a generous bound that only a hang reaches, never a timing check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {seconds} s waiting for {condition}")


def altered(text: str, at: int) -> str:
    """``text`` with the character at ``at`` replaced by a different one: a tampered token
    that cannot come out equal to the original by chance (appending fixed characters can)."""
    index = at % len(text)
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1 :]
