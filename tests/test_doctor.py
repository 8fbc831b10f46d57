"""``taskrelay doctor``: each check's failure modes, in plain words, against real things (a
SQLite file, PostgreSQL databases with and without migrations, the sandbox process, closed and
silent ports, a name that does not resolve); the command end to end with its exit codes; and no
secret in its output, ever. Nothing it looks at is changed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service import doctor
from service.db import head_revision, migrate
from service.doctor import FAIL, OK, WARN, CheckResult, DatabaseProbe, ProviderProbe
from service.errors import SettingsError
from service.settings import PROVIDERS, Settings, check_local_only, load_settings
from tests.conftest import PostgresDatabase, _pg_url
from tests.servers import SandboxProcess, closed_port

TASKRELAY_BIN = str(Path(sys.executable).parent / "taskrelay")
SECRET_KEY = "doctor-secret-key-5b1f0e9c2d"
FALLBACK_KEY = "doctor-fallback-key-77aa0c3e1b"
API_TOKEN = "doctor-api-token-4c8e21d0f9"
WRONG_PROVIDER_KEY = "sk-doctor-wrong-key-0e9d8c7b6a"
DB_PASSWORD = "doctor-db-password-31f5c2"


def environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return {
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        "TASKRELAY_API_TOKENS": f"shop:{API_TOKEN}",
        "TASKRELAY_SECRET_KEY": SECRET_KEY,
        "TASKRELAY_PUBLIC_URL": "https://relay.example.com",
        **overrides,
    }


def configuration(
    tmp_path: Path, workers: int = 1, **overrides: str
) -> tuple[list[CheckResult], Settings | None]:
    return doctor.load_configuration(
        environment(tmp_path, **overrides), tmp_path / "no.env", workers=workers
    )


def test_a_misspelt_setting_is_a_warning_naming_the_one_meant(tmp_path: Path) -> None:
    results, settings = configuration(tmp_path, TASKRELAY_RETENTON="30d")
    assert settings is not None and settings.retention is None  # the default: off
    (unknown,) = [r for r in results if r.check == "configuration" and r.status == WARN]
    assert unknown.message.startswith(
        "TASKRELAY_RETENTON (did you mean TASKRELAY_RETENTION?): no setting of that name"
    )
    assert "30d" not in unknown.message
    results, _ = configuration(tmp_path)
    assert [r.status for r in results if r.check == "configuration"] == [OK]


def settings_for(tmp_path: Path, **overrides: str) -> Settings:
    results, settings = configuration(tmp_path, **overrides)
    assert settings is not None, results
    return settings


def by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.check: result for result in results}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    process = SandboxProcess(tmp_path_factory.mktemp("sandbox") / "sandbox.log")
    yield process
    process.stop()


def provider_environment(sandbox: SandboxProcess, **keys: str) -> dict[str, str]:
    """Every provider at the sandbox process; ``keys`` overrides a provider's API key."""
    environ = sandbox.provider_environment()
    for provider, key in keys.items():
        environ[f"TASKRELAY_{provider.upper()}_API_KEY"] = key
    return environ


# --- configuration -------------------------------------------------------------------------


def test_a_bad_value_is_named_without_repeating_it(tmp_path: Path) -> None:
    results, settings = configuration(tmp_path, TASKRELAY_PORT="eighty")
    assert settings is None
    assert [(r.check, r.status) for r in results] == [("configuration", FAIL)]
    assert "TASKRELAY_PORT" in results[0].message and "eighty" not in results[0].message

    results, _ = configuration(tmp_path, TASKRELAY_SECRET_KEY="tiny-secret")
    assert "TASKRELAY_SECRET_KEY is too short" in results[0].message
    assert "tiny-secret" not in results[0].message + str(results[0].fix)

    results, _ = configuration(tmp_path, TASKRELAY_OPENAI_BASE_URL="ftp://x?key=sk-leak-123")
    assert "TASKRELAY_OPENAI_BASE_URL" in results[0].message
    assert "sk-leak-123" not in results[0].message

    # A key pasted into the wrong variable: int() quotes it in its error; doctor does not.
    results, _ = configuration(tmp_path, TASKRELAY_DB_POOL_SIZE="sk-pasted-here-0123")
    assert "TASKRELAY_DB_POOL_SIZE" in results[0].message
    assert "sk-pasted-here-0123" not in results[0].message

    env_file = tmp_path / "bad.env"
    env_file.write_text("TASKRELAY_PORT=8000\nsk-bare-secret-line-0123\n")
    results, _ = doctor.load_configuration({"TASKRELAY_ENV_FILE": str(env_file)})
    assert results[0].status == FAIL and f"{env_file}:2" in results[0].message
    assert "sk-bare-secret-line-0123" not in results[0].message

    # A named .env file that is not there fails, as serve does: its values would be missing.
    missing = tmp_path / "prod.env"
    results, settings = doctor.load_configuration({"TASKRELAY_ENV_FILE": str(missing)})
    assert settings is None and [(r.check, r.status) for r in results] == [("configuration", FAIL)]
    assert f"TASKRELAY_ENV_FILE names {missing}, which does not exist" in results[0].message


def test_an_unset_signing_key_is_reported_and_nothing_is_written(tmp_path: Path) -> None:
    environ = environment(tmp_path)
    del environ["TASKRELAY_SECRET_KEY"]
    results, settings = doctor.load_configuration(environ, tmp_path / "no.env")
    assert settings is not None
    key = by_check(results)["secret key"]
    assert key.status == WARN
    assert "TASKRELAY_SECRET_KEY is not set" in key.message and "will generate" in key.message
    assert not (tmp_path / "data").exists()  # serve would have written data/secret_key


def test_a_key_file_is_fine_for_one_process_but_not_for_replicas(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "secret_key").write_text("k" * 40 + "\n")
    environ = environment(tmp_path)
    del environ["TASKRELAY_SECRET_KEY"]
    results, _ = doctor.load_configuration(environ, tmp_path / "no.env")
    assert by_check(results)["secret key"].status == OK
    environ["TASKRELAY_DATABASE_URL"] = "postgresql://taskrelay@db.internal/taskrelay"
    results, _ = doctor.load_configuration(environ, tmp_path / "no.env")
    key = by_check(results)["secret key"]
    assert key.status == WARN and "every replica needs the same key" in key.message


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"TASKRELAY_API_TOKENS": "ops:demo-token"}, "well-known demo token"),
        ({"TASKRELAY_SANDBOX": "true"}, "TASKRELAY_SANDBOX=true is for this machine only"),
    ],
)
def test_what_serve_refuses_is_a_failure_not_no_problems(
    tmp_path: Path, overrides: dict[str, str], said: str
) -> None:
    """The sandbox or a demo token on a service reached from elsewhere: serve refuses to
    start, so the deploy gate must not say "No problems"."""
    results, settings = configuration(
        tmp_path, TASKRELAY_PUBLIC_URL="https://relay.example.com", **overrides
    )
    assert settings is not None
    refused = by_check(results)["serve"]
    assert refused.status == FAIL and said in refused.message, refused
    with pytest.raises(SettingsError) as serve:
        check_local_only(settings)
    assert serve.value.message in refused.message


def test_risky_but_valid_settings_are_warnings(tmp_path: Path) -> None:
    results, _ = configuration(
        tmp_path,
        TASKRELAY_API_TOKENS="demo:demo-token,ops:short-tok",
        TASKRELAY_SANDBOX="true",
        TASKRELAY_PUBLIC_URL="http://127.0.0.1:8000",
    )
    checks = by_check(results)
    assert checks["api tokens"].status == WARN
    assert "demo" in checks["api tokens"].message
    assert "demo-token" not in checks["api tokens"].message
    assert checks["sandbox"].status == WARN and "TASKRELAY_SANDBOX=false" in str(
        checks["sandbox"].fix
    )
    results, _ = configuration(tmp_path, TASKRELAY_API_TOKENS="ops:short-tok")
    tokens = by_check(results)["api tokens"]
    assert tokens.status == WARN and "shorter than 16" in tokens.message
    # A short fallback key is refused like a short key: serve would not start.
    results, settings = configuration(tmp_path, TASKRELAY_SECRET_KEY_FALLBACKS="old-short")
    assert settings is None and [(r.check, r.status) for r in results] == [("configuration", FAIL)]
    assert "TASKRELAY_SECRET_KEY_FALLBACKS holds 1 key(s) shorter" in results[0].message
    assert "old-short" not in results[0].message + str(results[0].fix)


def test_a_lease_no_longer_than_a_query_may_run_is_a_warning_as_in_serves_log(
    tmp_path: Path,
) -> None:
    # The timeout is 30 s; a query must end 5 s (at most a fifth of the lease) before it.
    results, _ = configuration(tmp_path, TASKRELAY_POLL_LEASE="34s")
    lease = by_check(results)["poll lease"]
    assert lease.status == WARN
    assert (
        "TASKRELAY_PROVIDER_TIMEOUT (30 s) is longer than a status query may run within "
        "TASKRELAY_POLL_LEASE (34 s, less 5 s kept to record the answer)"
    ) in lease.message
    results, _ = configuration(tmp_path, TASKRELAY_POLL_LEASE="35s")
    assert "poll lease" not in by_check(results)
    results, _ = configuration(tmp_path, TASKRELAY_POLL_LEASE="10s")
    assert "less 2 s kept" in by_check(results)["poll lease"].message
    results, _ = configuration(tmp_path, TASKRELAY_POLL_LEASE="10s", TASKRELAY_SCHEDULER="false")
    assert "poll lease" not in by_check(results)  # no queries in this process
    results, _ = configuration(tmp_path)
    assert "poll lease" not in by_check(results)


def test_missing_tokens_and_sqlite_with_workers_fail(tmp_path: Path) -> None:
    results, _ = configuration(tmp_path, TASKRELAY_API_TOKENS="")
    assert by_check(results)["api tokens"].status == FAIL
    results, _ = configuration(tmp_path, workers=4)
    workers = by_check(results)["workers"]
    assert workers.status == FAIL and "PostgreSQL" in str(workers.fix)
    results, _ = configuration(
        tmp_path, workers=4, TASKRELAY_DATABASE_URL="postgresql://u@db.internal/taskrelay"
    )
    assert "workers" not in by_check(results)
    results, _ = configuration(
        tmp_path,
        workers=2,
        TASKRELAY_DATABASE_URL="postgresql://u@db.internal/taskrelay",
        TASKRELAY_SANDBOX="true",
        TASKRELAY_PUBLIC_URL="http://127.0.0.1:8000",
    )
    sandbox = by_check(results)["sandbox workers"]
    assert sandbox.status == FAIL and "taskrelay sandbox" in str(sandbox.fix)


def test_no_configured_provider_is_a_warning(tmp_path: Path) -> None:
    results, _ = configuration(tmp_path)
    assert by_check(results)["providers"].status == WARN
    results, _ = configuration(tmp_path, TASKRELAY_GRSAI_API_KEY="sk-grsai-123456")
    providers = by_check(results)["providers"]
    assert providers.status == OK and "configured: grsai" in providers.message
    assert "sk-grsai-123456" not in providers.message


# --- the public URL ------------------------------------------------------------------------


def test_a_local_public_url_with_openai_alone_warns_of_its_image_urls(tmp_path: Path) -> None:
    """OpenAI neither calls back nor is polled: the warning was about callbacks."""
    settings = settings_for(
        tmp_path,
        TASKRELAY_OPENAI_API_KEY="sk-openai-0123456789",
        TASKRELAY_PUBLIC_URL="http://127.0.0.1:8000",
    )
    check = doctor.public_url_check(settings)
    assert check.status == WARN and "image URLs of OpenAI's results" in check.message
    assert "callbacks" not in check.message
    # GrsAI streamed or polled does not call back either; in its callback mode it does.
    for mode, calls_back in (("stream", False), ("poll", False), ("callback", True)):
        check = doctor.public_url_check(
            replace(
                settings_for(
                    tmp_path,
                    TASKRELAY_OPENAI_API_KEY="sk-openai-0123456789",
                    TASKRELAY_GRSAI_API_KEY="sk-grsai-0123456789",
                    TASKRELAY_GRSAI_MODE=mode,
                ),
                public_url="http://127.0.0.1:8000",
            )
        )
        assert ("callbacks will not arrive" in check.message) is calls_back, (mode, check)


def test_the_public_url(tmp_path: Path) -> None:
    evolink = {"TASKRELAY_EVOLINK_API_KEY": "sk-evolink-0123456789"}
    check = doctor.public_url_check(settings_for(tmp_path, **evolink))
    assert check.status == OK and "https://relay.example.com/callbacks/" in check.message

    check = doctor.public_url_check(
        settings_for(tmp_path, TASKRELAY_PUBLIC_URL="http://relay.example.com", **evolink)
    )
    assert check.status == WARN and "EvoLink accepts only HTTPS" in check.message

    # What serve refuses, doctor fails as serve would (serve's own check), and still runs
    # every other check: the configuration loads.
    results, settings = configuration(tmp_path, TASKRELAY_HOST="0.0.0.0", TASKRELAY_PUBLIC_URL="")
    assert settings is not None and results[0].status != FAIL
    check = doctor.public_url_check(settings)
    assert check.status == FAIL and "points at 0.0.0.0" in check.message
    assert "TASKRELAY_PUBLIC_URL" in str(check.fix)
    results, settings = configuration(
        tmp_path, TASKRELAY_PUBLIC_URL="https://ops:hunter2-pw@relay.example.com"
    )
    assert settings is not None
    check = doctor.public_url_check(settings)
    assert check.status == FAIL and "carries a user name or password" in check.message
    assert "hunter2-pw" not in check.message + str(check.fix)
    # Failed once, by this check: not again as the configuration's.
    assert "serve" not in by_check(results)
    # A Settings made some other way is judged by the same check.
    for public in ("http://0.0.0.0:8000", "https://ops:hunter2-pw@relay.example.com"):
        check = doctor.public_url_check(replace(settings_for(tmp_path), public_url=public))
        assert check.status == FAIL and "TASKRELAY_PUBLIC_URL" in str(check.fix)
        assert "hunter2-pw" not in check.message + str(check.fix)

    grsai = {"TASKRELAY_GRSAI_API_KEY": "sk-grsai-0123456789"}
    check = doctor.public_url_check(
        settings_for(tmp_path, TASKRELAY_PUBLIC_URL="http://10.1.2.3:8000", **grsai)
    )
    assert check.status == WARN and "cannot reach" in check.message

    # The sandbox mounted in TaskRelay calls back to itself: a local URL is right there.
    check = doctor.public_url_check(
        settings_for(tmp_path, TASKRELAY_PUBLIC_URL="http://127.0.0.1:8000", TASKRELAY_SANDBOX="1")
    )
    assert check.status == OK

    check = doctor.public_url_check(
        settings_for(
            tmp_path, TASKRELAY_PUBLIC_URL="https://r.example.com/" + "p" * 2000, **evolink
        )
    )
    assert check.status == FAIL and "2048" in check.message


# --- the database --------------------------------------------------------------------------


def database_checks(url: str) -> tuple[CheckResult, CheckResult]:
    head, known = doctor.schema_revisions(url)
    probe = doctor.probe_database(url, timeout=3, head=head)
    return doctor.database_check(probe), doctor.migrations_check(probe, head, known)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_current_sqlite_file_is_fine_and_left_as_it_was(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'taskrelay.db'}"
    migrate(url)
    before = snapshot(tmp_path / "db")
    database, migrations = database_checks(url)
    assert (database.status, migrations.status) == (OK, OK), (database, migrations)
    assert head_revision(url) in migrations.message
    assert snapshot(tmp_path / "db") == before  # no -wal, no -shm, nothing touched


def test_a_data_folder_that_is_a_file_fails_as_serve_would(tmp_path: Path) -> None:
    """serve cannot create the database's folder where a file is: doctor said only that the
    database did not exist yet."""
    (tmp_path / "notadir").write_text("")
    url = f"sqlite:///{tmp_path / 'notadir' / 'taskrelay.db'}"
    database, _ = database_checks(url)
    assert database.status == FAIL, database
    assert f"{tmp_path / 'notadir'} is a file" in database.message
    assert "TASKRELAY_DATA_DIR" in str(database.fix)


def test_another_applications_tables_fail_as_migrating_would(tmp_path: Path) -> None:
    """No alembic_version but a table named as one of ours: doctor said "an empty database,
    nothing to do", while serve failed with "table task already exists". A SQLite file is
    one program's: any table of another's is in the way (serve added its tables to another
    program's file, config hunt), and the file is left as it was."""
    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE task (x)")
        connection.execute("CREATE TABLE invoices (x)")
    connection.close()
    _, migrations = database_checks(f"sqlite:///{path}")
    assert migrations.status == FAIL, migrations
    assert "another program's tables (invoices, task)" in migrations.message
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE task")
    connection.close()
    before = snapshot(tmp_path)
    _, migrations = database_checks(f"sqlite:///{path}")
    assert migrations.status == FAIL, migrations
    assert "holds another program's tables (invoices) and no TaskRelay schema" in migrations.message
    assert "point it at a new file" in str(migrations.fix)
    assert snapshot(tmp_path) == before


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'taskrelay.db'}"
    database, migrations = database_checks(url)
    assert database.status == WARN and "does not exist yet" in database.message
    assert migrations.status == OK
    assert not (tmp_path / "nowhere").exists()


def test_a_file_that_is_not_a_database_fails(tmp_path: Path) -> None:
    path = tmp_path / "taskrelay.db"
    path.write_text("these are my notes, not a database " * 50)
    database, migrations = database_checks(f"sqlite:///{path}")
    assert database.status == FAIL
    assert "is not a TaskRelay database" in database.message
    assert migrations.status == WARN and "cannot be read" in migrations.message


def test_an_old_or_unknown_sqlite_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    migrate(url, "0002")
    _, migrations = database_checks(url)
    assert migrations.status == WARN  # serve migrates a SQLite file itself
    assert "0002" in migrations.message and "migrates" in migrations.message
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    engine.dispose()
    _, migrations = database_checks(url)
    assert migrations.status == FAIL and "newer version" in migrations.message
    head = head_revision(url)
    assert f"`taskrelay migrate --revision {head}`, run by the newer version" in str(migrations.fix)


def leave_a_build_index_in_place_of(url: str) -> None:
    """What a migration 0006 killed midway and then run the other way can leave: the
    delivery queue's index gone, its half-finished replacement under the build name."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_delivery_status_next_attempt")
        connection.exec_driver_sql(
            "CREATE INDEX ix_delivery_status_next_attempt_build ON delivery "
            "(status, next_attempt_at)"
        )
    engine.dispose()


def test_a_schema_at_head_that_differs_from_the_models_is_named(
    tmp_path: Path, admin_url: str
) -> None:
    """At the right revision, but an index missing and another in its place: doctor names
    both (it used to say "current"), and how to rebuild them."""
    sqlite_url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_doctor")
    try:
        for url in (sqlite_url, database.url):
            migrate(url)
            leave_a_build_index_in_place_of(url)
            _, migrations = database_checks(url)
            assert migrations.status == WARN, (url, migrations)
            assert f"the schema is at {head_revision(url)}, but differs" in migrations.message
            assert "missing index ix_delivery_status_next_attempt" in migrations.message
            assert "unexpected index ix_delivery_status_next_attempt_build" in migrations.message
            assert "taskrelay migrate --revision <earlier>" in str(migrations.fix)
        # On PostgreSQL, where only a run stopped midway leaves this, the fix it names works
        # (on SQLite a run is one transaction: a change by hand is the only way there).
        migrate(database.url, "0005")
        migrate(database.url)
        _, migrations = database_checks(database.url)
        assert migrations.status == OK, migrations
    finally:
        database.drop()


@pytest.fixture
def admin_url() -> str:
    url = _pg_url()
    if url is None:
        pytest.skip("needs TASKRELAY_TEST_DATABASE_URL")
    return url


def test_postgresql_with_and_without_migrations(admin_url: str) -> None:
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_doctor")
    try:
        check, migrations = database_checks(database.url)
        assert check.status == OK and database.name in check.message
        assert migrations.status == FAIL
        assert "nothing (an empty database)" in migrations.message
        assert "taskrelay migrate" in str(migrations.fix)
        engine = sa.create_engine(database.url)
        assert sa.inspect(engine).get_table_names() == []  # still empty: doctor migrates nothing
        engine.dispose()
        migrate(database.url)
        check, migrations = database_checks(database.url)
        assert (check.status, migrations.status) == (OK, OK)
    finally:
        database.drop()


def test_postgresql_connection_failures_in_plain_words(admin_url: str, no_such_host: None) -> None:
    base = sa.engine.make_url(admin_url)
    absent = base.set(database="taskrelay_doctor_absent").render_as_string(hide_password=False)
    check, _ = database_checks(absent)
    assert check.status == FAIL
    assert "no database of that name" in check.message
    assert "`createdb taskrelay_doctor_absent`" in str(check.fix)

    nobody = base.set(username="taskrelay_doctor_nobody").render_as_string(hide_password=False)
    check, _ = database_checks(nobody)
    assert check.status == FAIL and "no such user" in check.message

    with closed_port() as port:
        closed = base.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
        check, migrations = database_checks(closed)
    assert check.status == FAIL and "connection refused" in check.message
    assert "start PostgreSQL" in str(check.fix)
    assert migrations.status == WARN and "not checked" in migrations.message

    unknown = base.set(host="no-such-host.invalid").render_as_string(hide_password=False)
    check, _ = database_checks(unknown)
    assert check.status == FAIL and "does not resolve" in check.message


def test_a_refused_password_in_plain_words() -> None:
    # The test server trusts local connections, so this driver message is fed in directly.
    message, fix = doctor.explain_database_error(
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  '
        'password authentication failed for user "taskrelay"',
        "PostgreSQL database taskrelay on 10.0.0.5:5432 as user taskrelay",
    )
    assert "refused the user name or password" in message
    assert "TASKRELAY_DATABASE_URL" in fix
    check = doctor.database_check(
        DatabaseProbe("PostgreSQL database x on h:5432", sqlite=False, error="timeout expired")
    )
    assert check.status == FAIL and "no answer in time" in check.message


@pytest.fixture
def no_such_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under ``no-such-host.invalid`` fail to resolve at once, as a resolver answers for
    a name that does not exist, whatever this machine's nameserver does (a slow one would make
    the lookup a timeout; some answer for any name). Every other name resolves as usual."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: str | bytes | None, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host or ""
        if name.rstrip(".").lower().endswith("no-such-host.invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# --- the providers -------------------------------------------------------------------------


def provider_results(
    tmp_path: Path, probe_seconds: float = 3.0, **environ: str
) -> dict[str, CheckResult]:
    settings = settings_for(tmp_path, **environ)
    results = asyncio.run(doctor.check_providers(settings, probe_seconds=probe_seconds))
    return {result.check.removeprefix("provider "): result for result in results}


def test_providers_that_answer_and_accept_the_key(tmp_path: Path, sandbox: SandboxProcess) -> None:
    before = len(sandbox.tasks())
    results = provider_results(tmp_path, **provider_environment(sandbox))
    assert set(results) == set(PROVIDERS)
    for provider in PROVIDERS:
        assert results[provider].status == OK, results[provider]
    for provider in ("grsai", "gptimage15", "evolink", "apiinone"):
        assert "did not reject the API key" in results[provider].message
    assert len(sandbox.tasks()) == before  # the probes created no task


def test_a_rejected_key_names_the_provider_not_the_key(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    environ = provider_environment(sandbox, evolink=WRONG_PROVIDER_KEY)
    results = provider_results(tmp_path, **environ)
    evolink = results["evolink"]
    assert evolink.status == FAIL
    assert "rejected the API key (HTTP 401)" in evolink.message
    assert "TASKRELAY_EVOLINK_API_KEY" in str(evolink.fix)
    assert WRONG_PROVIDER_KEY not in evolink.message + str(evolink.fix)
    assert results["grsai"].status == OK


def test_unreachable_providers_in_plain_words(
    tmp_path: Path, sandbox: SandboxProcess, no_such_host: None
) -> None:
    with closed_port() as closed, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections (the kernel does), never answers
        silent_port = silent.getsockname()[1]
        results = provider_results(
            tmp_path,
            probe_seconds=1.0,
            TASKRELAY_GRSAI_API_KEY="sk-grsai-0123456789",
            TASKRELAY_GRSAI_BASE_URL=f"http://127.0.0.1:{closed}",
            TASKRELAY_EVOLINK_API_KEY="sk-evolink-0123456789",
            TASKRELAY_EVOLINK_BASE_URL="https://api.no-such-host.invalid",
            TASKRELAY_APIINONE_API_KEY="sk-apiinone-0123456789",
            # An https:// URL at a server that speaks plain HTTP: the TLS handshake fails.
            TASKRELAY_APIINONE_BASE_URL=f"https://127.0.0.1:{sandbox.port}/apiinone",
            TASKRELAY_GPTIMAGE15_API_KEY="sk-gptimage15-0123456789",
            TASKRELAY_GPTIMAGE15_BASE_URL=f"http://127.0.0.1:{silent_port}",
        )
    assert set(results) == {"grsai", "evolink", "apiinone", "gptimage15"}  # configured only
    assert all(result.status == FAIL for result in results.values()), results
    assert "connection refused" in results["grsai"].message
    assert f"127.0.0.1:{closed}" in results["grsai"].message
    assert "does not resolve (DNS)" in results["evolink"].message
    assert "TASKRELAY_EVOLINK_BASE_URL" in str(results["evolink"].fix)
    assert "TLS (HTTPS) handshake" in results["apiinone"].message
    assert "did not answer within 1 s" in results["gptimage15"].message


def test_answers_that_are_not_what_a_provider_gives() -> None:
    probe = ProviderProbe(
        "http://api.example.com/v1/tasks/x", status_code=301, location="https://x"
    )
    check = doctor.provider_check("evolink", probe)
    assert check.status == FAIL and "does not follow redirects" in check.message
    for status, expected in ((429, WARN), (503, WARN), (403, FAIL), (404, OK), (400, OK)):
        probe = ProviderProbe("http://api.example.com/x", status_code=status, json_body=True)
        assert doctor.provider_check("grsai", probe).status == expected, status
    probe = ProviderProbe("http://api.example.com/x", status_code=404, json_body=False)
    assert doctor.provider_check("grsai", probe).status == WARN


def test_redact_scrubs_every_secret() -> None:
    results = [CheckResult("x", FAIL, "the key abc-secret-123 was refused", fix="abc-secret-123")]
    (scrubbed,) = doctor.redact(results, ["abc-secret-123"])
    assert scrubbed.message == "the key *** was refused" and scrubbed.fix == "***"


def test_redact_leaves_words_a_short_secret_is_part_of() -> None:
    """A secret that is also part of an ordinary word (a fallback key "short") is blanked out
    where it stands alone, but "shorter" stays a word, and the message stays readable."""
    results = [CheckResult("x", FAIL, "1 key shorter than 16: short; (short)", fix="-short-")]
    (scrubbed,) = doctor.redact(results, ["short", "-x-"])
    assert scrubbed.message == "1 key shorter than 16: ***; (***)"
    assert scrubbed.fix == "-***-"
    (scrubbed,) = doctor.redact([CheckResult("x", FAIL, "a-x-b -x- x")], ["-x-"])
    assert scrubbed.message == "a***b *** x"  # a value that starts and ends with a separator


def test_a_short_secret_setting_is_named_in_a_readable_message(tmp_path: Path) -> None:
    for variable, value in [
        ("TASKRELAY_METRICS_TOKEN", "short"),
        ("TASKRELAY_SECRET_KEY_FALLBACKS", "short"),
    ]:
        with pytest.raises(SettingsError) as caught:
            load_settings(
                {"TASKRELAY_DATA_DIR": str(tmp_path), variable: value},
                env_file=tmp_path / "no.env",
            )
        message = caught.value.message
        assert variable in message and "..." not in message
        assert not re.search(r"\bshort\b", message), message  # nor the value itself


def test_the_files_folder_is_checked_without_creating_it(tmp_path: Path) -> None:
    def check(files_dir: Path, **environ: str) -> CheckResult | None:
        settings = load_settings(
            {
                "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
                "TASKRELAY_FILES_DIR": str(files_dir),
                **environ,
            },
            env_file=tmp_path / "no.env",
        )
        return doctor.files_dir_check(settings)

    key = {"TASKRELAY_OPENAI_API_KEY": "sk-doctor-files-0123456789"}
    assert check(tmp_path / "nowhere") is None  # OpenAI not configured: no images are kept
    result = check(tmp_path / "new" / "files", **key)
    assert result is not None and result.status == OK and "serve creates it" in result.message
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("not a folder")
    result = check(tmp_path / "a-file" / "files", **key)
    assert result is not None and result.status == FAIL
    assert f"{tmp_path / 'a-file'} is not a folder" in result.message
    assert "TASKRELAY_FILES_DIR" in result.message and result.fix


# --- the command ---------------------------------------------------------------------------


def run_doctor(environ: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
    env.update(environ)
    return subprocess.run(
        [TASKRELAY_BIN, "doctor", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_no_secrets(output: str, *extra: str) -> None:
    for secret in (SECRET_KEY, FALLBACK_KEY, API_TOKEN, WRONG_PROVIDER_KEY, DB_PASSWORD, *extra):
        assert secret not in output, secret


def test_the_command_passes_a_healthy_deployment(tmp_path: Path, sandbox: SandboxProcess) -> None:
    url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    migrate(url)
    environ = environment(
        tmp_path,
        TASKRELAY_DATABASE_URL=url,
        TASKRELAY_SECRET_KEY_FALLBACKS=FALLBACK_KEY,
        **provider_environment(sandbox),
    )
    del environ["TASKRELAY_OPENAI_API_KEY"]  # the sandbox has no model list to check it with
    result = run_doctor(environ, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    checks = lines[: lines.index("")]  # one line per check, then the summary
    assert len(checks) >= 8 and all(line.startswith(("ok ", "warn ")) for line in checks), lines
    assert "All checks passed." in result.stdout or "No problems" in result.stdout
    assert_no_secrets(result.stdout + result.stderr, "sandbox-key")

    as_json = run_doctor(environ, "--json", cwd=tmp_path)
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["ok"] is True
    statuses = {check["check"]: check["status"] for check in document["checks"]}
    assert statuses["database"] == OK and statuses["provider evolink"] == OK
    assert_no_secrets(as_json.stdout, "sandbox-key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taskrelay.db"]  # nothing written


def test_the_command_fails_a_broken_deployment_and_keeps_secrets(
    tmp_path: Path, sandbox: SandboxProcess, admin_url: str
) -> None:
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_doctor")  # not migrated
    try:
        # The test server trusts local connections, so any password gets in: one is set here
        # only to check that it is never printed.
        with_password = (
            sa.engine.make_url(database.url)
            .set(password=DB_PASSWORD)
            .render_as_string(hide_password=False)
        )
        environ = environment(
            tmp_path,
            TASKRELAY_DATABASE_URL=with_password,
            TASKRELAY_SECRET_KEY_FALLBACKS=FALLBACK_KEY,
            TASKRELAY_PUBLIC_URL="http://relay.example.com",
            **provider_environment(sandbox, evolink=WRONG_PROVIDER_KEY),
        )
        result = run_doctor(environ, cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip()}
        assert lines["migrations"].startswith("FAIL") and "taskrelay migrate" in result.stdout
        evolink = next(line for line in result.stdout.splitlines() if "provider evolink" in line)
        assert evolink.startswith("FAIL") and "rejected the API key" in evolink
        # Its key is wrong, and its callbacks could not arrive anyway: both are said.
        assert "EvoLink accepts only HTTPS" in lines["public"]
        assert "problem(s) to fix" in result.stdout
        assert_no_secrets(result.stdout + result.stderr)

        as_json = run_doctor(environ, "--json", cwd=tmp_path)
        assert as_json.returncode == 1
        assert json.loads(as_json.stdout)["ok"] is False
        assert_no_secrets(as_json.stdout + as_json.stderr)
    finally:
        database.drop()


def test_the_command_checks_the_make_run_setup_with_demo(tmp_path: Path) -> None:
    """`make run` serves with `serve --demo`, whose defaults doctor did not know: run where it
    runs, doctor said the working setup could not start (no API tokens). `doctor --demo`
    applies the same defaults, and like serve's, only where nothing else sets them."""
    environ = {"TASKRELAY_DATA_DIR": str(tmp_path / "data")}
    plain = run_doctor(environ, cwd=tmp_path)
    assert plain.returncode == 1 and "FAIL  api tokens" in plain.stdout, plain.stdout
    demo = run_doctor(environ, "--demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "well-known demo token" in demo.stdout and "TASKRELAY_SANDBOX is on" in demo.stdout
    own = run_doctor(
        {**environ, "TASKRELAY_API_TOKENS": f"ops:{API_TOKEN}"}, "--demo", cwd=tmp_path
    )
    assert own.returncode == 0 and "demo token" not in own.stdout, own.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_command_reports_a_configuration_error(tmp_path: Path) -> None:
    result = run_doctor(
        {"TASKRELAY_DATA_DIR": str(tmp_path), "TASKRELAY_SECRET_KEY": "short-secret"}, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL") and "TASKRELAY_SECRET_KEY is too short" in result.stdout
    assert "short-secret" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_clock_check_against_the_database_server() -> None:
    """PostgreSQL replicas compare times each of them wrote: a host whose clock is off from
    the database server's is a warning past 2 s, and a failure at a quarter of the poll lease
    (two replicas that far off the other way round are half a lease apart: one takes the
    other's work over while it still does it), however short the lease. SQLite: no check."""

    def check(offset: float | None, poll_lease: float = 60.0) -> CheckResult | None:
        probe = DatabaseProbe("PostgreSQL database x", sqlite=False, clock_offset=offset)
        return doctor.clock_check(probe, poll_lease=poll_lease)

    assert check(None) is None
    close = check(-0.4)
    assert close is not None and close.status == OK and "within 0.40 s" in close.message
    behind = check(-3.5)
    assert behind is not None and behind.status == WARN
    assert "3.5 s behind the database server's" in behind.message and "NTP" in str(behind.fix)
    ahead = check(15.0)
    assert ahead is not None and ahead.status == FAIL
    assert "15.0 s ahead of" in ahead.message and "TASKRELAY_POLL_LEASE (60 s)" in ahead.message
    assert check(14.9) is not None and check(14.9).status == WARN  # type: ignore[union-attr]
    short_lease = check(1.8, poll_lease=4.0)  # under the 2 s warning, past a quarter lease
    assert short_lease is not None and short_lease.status == FAIL


def test_the_clock_of_this_host_against_postgresql(
    admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = doctor.probe_database(admin_url, timeout=3)
    assert probe.clock_offset is not None  # one machine, one clock: as close as a round trip
    assert abs(probe.clock_offset) <= max(0.5, probe.clock_round_trip), probe
    check = doctor.clock_check(probe, poll_lease=60.0)
    assert check is not None and check.status == OK
    real = time.time
    monkeypatch.setattr(doctor.time, "time", lambda: real() + 30)  # this host 30 s ahead
    ahead = doctor.probe_database(admin_url, timeout=3)
    assert ahead.clock_offset is not None and 29 < ahead.clock_offset < 31
    check = doctor.clock_check(ahead, poll_lease=60.0)
    assert check is not None and check.status == FAIL and "30.0 s ahead of" in check.message
