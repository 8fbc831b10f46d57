"""The ``taskrelay`` command: help, migrate, and ``serve`` as a real uvicorn process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from service.cli import _cannot_listen, build_parser, duration_text
from service.db import current_revision, head_revision, make_engine, migrate
from service.settings import load_settings
from tests.conftest import PostgresDatabase, _pg_url
from tests.servers import SandboxProcess, ServiceProcess, closed_port, free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "sandbox", "new-token"):
        assert command in result.stdout
    serve = run_cli("serve", "--help")
    assert "--host" in serve.stdout and "--port" in serve.stdout


def test_migrate_creates_the_sqlite_store(tmp_path: Path) -> None:
    # As a deploy job runs it from the Docker image: on 0.0.0.0, with no public URL (serve
    # needs one for callback URLs; migrate hands none out).
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        "TASKRELAY_HOST": "0.0.0.0",
    }
    result = run_cli("migrate", env=env)
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'taskrelay.db'}")
    assert {"task", "task_event", "callback_receipt"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
    # It signs nothing: no signing key was made (nor read), and no warning about one.
    assert not (tmp_path / "data" / "secret_key").exists()
    assert "signing key" not in result.stderr


def test_migrate_on_postgresql_needs_no_writable_data_folder(tmp_path: Path) -> None:
    """It made a signing key in the data folder, and failed where that folder was read-only
    (an init container; config hunt)."""
    with fresh_postgres(tmp_path, TASKRELAY_DATA_DIR="/proc/taskrelay-nowhere") as (_, env):
        result = run_cli("migrate", env=env)
        assert result.returncode == 0, result.stderr
        assert "database upgraded from nothing" in result.stdout


def test_bad_configuration_stops_start_up_with_the_variable_named(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path), "TASKRELAY_PORT": "x"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "TASKRELAY_PORT is not valid: expected a TCP port number (not a whole number)" in (
        result.stderr
    )
    assert "int()" not in result.stderr  # Python's wording is not the user's business
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path)}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "TASKRELAY_API_TOKENS" in result.stderr


def test_serve_refuses_the_built_in_sandbox_with_several_workers(tmp_path: Path) -> None:
    """Its tasks live in the process that made them: another worker's status query would
    find none. Refused before anything else is done (the database is not even reached)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path),
        "TASKRELAY_API_TOKENS": "me:token-12345678",
        "TASKRELAY_DATABASE_URL": "postgresql://relay@db.invalid/relay",
        "TASKRELAY_SANDBOX": "true",
    }
    result = run_cli("serve", "--workers", "2", env=env)
    assert result.returncode == 2
    assert "the built-in sandbox keeps its tasks in the process that made them" in result.stderr
    assert "`taskrelay sandbox` on its own" in result.stderr


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_a_worker_count_below_one_names_the_flag(workers: str) -> None:
    result = run_cli("serve", "--workers", workers)
    assert result.returncode == 2
    assert "argument --workers: a number of worker processes, 1 or more" in result.stderr


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "0", "soon"])
def test_a_doctor_timeout_that_is_no_wait_names_the_flag(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It crashed (nan, inf) or failed every network check as "no answer in time" (-1)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["doctor", "--timeout", timeout])
    assert exited.value.code == 2
    assert "argument --timeout:" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0.0000001", "0", "3601", "nan"])
def test_a_graceful_timeout_out_of_range_names_the_flag(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """0.0000001 passed the flag's check, then failed the setting it is passed on as, naming
    TASKRELAY_SHUTDOWN_TIMEOUT, which the user never set (config hunt)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--graceful-timeout", timeout])
    assert exited.value.code == 2
    assert "argument --graceful-timeout:" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", [0.001, 0.0015, 2.5, 30.0, 3600.0])
def test_a_graceful_timeout_reaches_the_setting_as_given(tmp_path: Path, seconds: float) -> None:
    environ = {
        "TASKRELAY_DATA_DIR": str(tmp_path),
        "TASKRELAY_SHUTDOWN_TIMEOUT": duration_text(
            build_parser()
            .parse_args(["serve", "--graceful-timeout", str(seconds)])
            .graceful_timeout
        ),
    }
    assert load_settings(environ, env_file=None).shutdown_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("command", ["serve", "sandbox"])
def test_a_port_flag_out_of_range_names_the_flag(command: str) -> None:
    result = run_cli(command, "--port", "99999")
    assert result.returncode == 2
    assert "argument --port: not a TCP port number (must be between 1 and 65535)" in (result.stderr)


def test_serve_says_the_port_is_in_use_before_it_starts(tmp_path: Path) -> None:
    """Found before start-up, in one line: uvicorn would log "TaskRelay ready", then fail."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path),
        "TASKRELAY_API_TOKENS": "me:token-12345678",
    }
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env=env)
    assert result.returncode == 2
    assert f"taskrelay: cannot listen on 127.0.0.1 port {port}: Address already in use; " in (
        result.stderr
    )
    assert "stop what holds the port, or choose another (--port, TASKRELAY_PORT)" in result.stderr
    assert "TaskRelay ready" not in result.stderr
    # Found before the embedded store was migrated: a second serve on the data folder of one
    # that holds the port leaves its schema alone.
    assert "database schema is up to date" not in result.stderr
    assert not (tmp_path / "taskrelay.db").exists()


def test_the_listen_check_binds_as_uvicorn_will() -> None:
    """One process binds IPv6 for IPv6 only (asyncio), so "::" is free while 0.0.0.0 is held
    on the same port; several workers bind one dual-stack socket, which is then in use. An
    address of another machine is named as such."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert _cannot_listen("::", port, workers=1) is None
        assert "Address already in use" in str(_cannot_listen("::", port, workers=2))
        assert "Address already in use" in str(_cannot_listen("127.0.0.1", port, workers=1))
    elsewhere = _cannot_listen("192.0.2.1", 8000, workers=1)  # TEST-NET-1: never this machine
    assert elsewhere is not None and "not an address of this machine" in elsewhere


@contextlib.contextmanager
def fresh_postgres(tmp_path: Path, **environ: str) -> Iterator[tuple[str, dict[str, str]]]:
    """An empty PostgreSQL database of the test's own (dropped afterwards), and the
    environment of a ``taskrelay`` command on it."""
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip("needs TASKRELAY_TEST_DATABASE_URL")
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_cli")
    try:
        yield (
            database.url,
            {
                "PATH": "/usr/bin:/bin",
                "TASKRELAY_DATA_DIR": str(tmp_path),
                "TASKRELAY_API_TOKENS": "me:token-12345678",
                "TASKRELAY_DATABASE_URL": database.url,
                **environ,
            },
        )
    finally:
        database.drop()


@pytest.mark.parametrize(
    ("command", "sig", "status"),
    [
        (("migrate",), signal.SIGINT, 130),
        (("migrate",), signal.SIGTERM, 143),
        (("serve", "--migrate"), signal.SIGINT, 130),
        (("serve", "--migrate"), signal.SIGTERM, 0),  # told to stop while starting: stopped
    ],
    ids=["migrate-sigint", "migrate-sigterm", "serve-sigint", "serve-sigterm"],
)
def test_a_signal_while_a_command_starts_is_one_line_and_an_exit_status(
    tmp_path: Path, command: tuple[str, ...], sig: signal.Signals, status: int
) -> None:
    """Waiting for the migration lock another run holds: SIGINT was a KeyboardInterrupt
    traceback, SIGTERM killed the process midway (config hunt)."""
    with fresh_postgres(tmp_path) as (url, env):
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as holder:
                holder.exec_driver_sql("SELECT pg_advisory_lock(hashtext('taskrelay migrate'))")
                holder.commit()
                process = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", *command, "--port", str(free_port())]
                    if command[0] == "serve"
                    else [sys.executable, "-m", "service.cli", *command],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                assert process.stderr is not None
                for line in process.stderr:  # the run says it waits for the lock
                    if "another migration of this database is running" in line:
                        break
                process.send_signal(sig)
                _, stderr = process.communicate(timeout=30)
            assert process.returncode == status, stderr
            assert f"taskrelay: stopped by {sig.name} before it finished" in stderr
            assert "Traceback" not in stderr
            assert current_revision(engine) is None  # nothing done
        finally:
            engine.dispose()


def test_sigterm_while_a_migration_waits_on_a_table_lock_ends_its_statement_too(
    tmp_path: Path,
) -> None:
    """SIGTERM stopped the process but not its statement on the server: the step waiting for
    the table's lock stayed queued there (every later user of the table behind it), holding
    the migration lock (review). Ended like Ctrl-C now: psycopg cancels it."""
    with fresh_postgres(tmp_path) as (url, env):
        migrate(url, "0009")
        engine = make_engine(url, pool_size=2)
        try:
            with engine.connect() as holder:
                holder.exec_driver_sql("LOCK TABLE task IN ACCESS SHARE MODE")
                process = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "migrate"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                waiting = sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE task%'"
                )

                def waits() -> bool:
                    with engine.connect() as watcher:
                        return bool(watcher.execute(waiting).scalar_one())

                deadline = time.monotonic() + 30
                while not waits() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert waits(), "the migration never waited for the table lock"
                process.send_signal(signal.SIGTERM)
                _, stderr = process.communicate(timeout=30)
                assert process.returncode == 143, stderr
                assert "taskrelay: stopped by SIGTERM before it finished" in stderr
                deadline = time.monotonic() + 10
                while waits() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not waits(), "the migration's statement still waits on the server"
                holder.rollback()
            with engine.connect() as connection:
                held = connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                ).scalar_one()
            assert held == 0
            assert current_revision(engine) == "0009"
        finally:
            engine.dispose()


def test_serve_refuses_an_unmigrated_postgresql(tmp_path: Path) -> None:
    with fresh_postgres(tmp_path) as (_, env):
        result = run_cli("serve", env=env)
        assert result.returncode == 2
        assert "taskrelay migrate" in result.stderr
        assert run_cli("migrate", env=env).returncode == 0


def test_a_second_serve_on_one_sqlite_file_is_refused_until_the_first_stops(
    tmp_path: Path,
) -> None:
    """Another port, the same data folder: it started, and ran a second scheduler and writer
    against the one file. Refused now, and served once the first one is gone."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        "TASKRELAY_API_TOKENS": "me:token-12345678",
    }
    first = ServiceProcess(env, log_path=tmp_path / "first.log")
    try:
        first.wait_ready()
        second = run_cli("serve", "--port", str(free_port()), env=env)
        assert second.returncode == 2, second.stderr
        assert "another `taskrelay serve` is using the SQLite file" in second.stderr
        assert str((tmp_path / "data" / "taskrelay.db").resolve()) in second.stderr
        # Through a symbolic link to the file, or to its folder: the same file (it went
        # around the lock, named after the path as written; config hunt).
        (tmp_path / "alias.db").symlink_to(tmp_path / "data" / "taskrelay.db")
        (tmp_path / "folder").symlink_to(tmp_path / "data")
        for alias in (tmp_path / "alias.db", tmp_path / "folder" / "taskrelay.db"):
            aliased = {**env, "TASKRELAY_DATABASE_URL": f"sqlite:///{alias}"}
            third = run_cli("serve", "--port", str(free_port()), env=aliased)
            assert third.returncode == 2, third.stderr
            assert "another `taskrelay serve` is using the SQLite file" in third.stderr
    finally:
        first.stop()
    after = ServiceProcess(env, log_path=tmp_path / "after.log")
    try:
        after.wait_ready()  # the lock went with the first process
    finally:
        after.stop()


def test_serve_migrates_the_embedded_store_and_answers(tmp_path: Path) -> None:
    service = ServiceProcess(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_API_TOKENS": "me:token-12345678",
            # Set by some platforms; uvicorn reads it unless told the worker count. SQLite
            # takes one process, and serve runs one unless --workers says otherwise.
            "WEB_CONCURRENCY": "2",
        },
        log_path=tmp_path / "serve.log",
    )
    try:
        service.wait_ready()
        assert (tmp_path / "data" / "taskrelay.db").is_file()
        assert (tmp_path / "data" / "secret_key").is_file()
        assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
        listed = httpx.get(
            f"{service.url}/v1/tasks", headers={"Authorization": "Bearer token-12345678"}
        )
        assert listed.status_code == 200 and listed.json()["data"] == []
    finally:
        code = service.stop()
    # uvicorn re-raises SIGTERM after a graceful shutdown, so the exit is "terminated by SIGTERM".
    assert code in (0, -signal.SIGTERM)
    logs = service.logs()
    assert "Application shutdown complete" in logs
    assert "token-12345678" not in logs
    assert logs.count('"message": "TaskRelay ready"') == 1  # one process, not a supervisor's two
    assert "Started parent process" not in logs


def test_the_supervisor_says_when_a_worker_failed_to_start() -> None:
    """uvicorn's supervisor returns as after a clean stop when a worker's start-up failed;
    serve then exits with uvicorn's start-up failure status instead of 0."""
    from types import SimpleNamespace

    from service.supervisor import Supervisor

    supervisor = Supervisor.__new__(Supervisor)  # no signal handlers in the test process
    supervisor.processes = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=None)]
    assert not supervisor.failed_to_start
    supervisor.processes.append(SimpleNamespace(exitcode=3))
    assert supervisor.failed_to_start


def schema_of(path: Path) -> str:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            return str(
                connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            )
    finally:
        engine.dispose()


def set_schema(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{revision}'")
    engine.dispose()


def one_line_refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed on stderr (log lines, JSON, aside)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_migrate_to_an_older_revision_downgrades(tmp_path: Path) -> None:
    """The advice doctor and serve give (`taskrelay migrate --revision X`) does what it says."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path),
        "TASKRELAY_LOG_LEVEL": "ERROR",
    }
    path = tmp_path / "taskrelay.db"
    head = head_revision(f"sqlite:///{path}")
    assert head == "0010"  # the revisions named below exist in this release
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert f"upgraded from nothing (an empty database) to {head}" in done.stdout
    down = run_cli("migrate", "--revision", "0008", env=env)
    assert down.returncode == 0, down.stderr
    assert f"database downgraded from {head} to 0008 (sqlite file {path})" in down.stdout
    assert schema_of(path) == "0008"
    back = run_cli("migrate", "--revision", "-1", env=env)
    assert "downgraded from 0008 to 0007" in back.stdout and schema_of(path) == "0007"
    up = run_cli("migrate", env=env)
    assert f"upgraded from 0007 to {head}" in up.stdout and schema_of(path) == head
    again = run_cli("migrate", env=env)
    assert f"already at {head}: no change" in again.stdout
    unknown = one_line_refusal(run_cli("migrate", "--revision", "0042", env=env))
    assert unknown == (
        f"taskrelay: there is no schema revision '0042' in this TaskRelay (its newest is {head})."
    )
    assert schema_of(path) == head


def test_a_downgrade_that_would_delete_data_needs_discard_data(tmp_path: Path) -> None:
    """Subscriptions are stored: going below 0003 is refused in one line naming them, and
    changes nothing; with --discard-data it goes ahead."""
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path)}
    path = tmp_path / "taskrelay.db"
    assert run_cli("migrate", env=env).returncode == 0
    head = schema_of(path)
    with sqlite3.connect(path) as raw:
        raw.execute(
            "INSERT INTO subscription (id, owner, kind, url, enabled, created_at, updated_at) "
            "VALUES ('sub_1', 'alice', 'endpoint', 'https://hooks.example/h', 1, "
            "'2026-11-22 00:00:00', '2026-11-22 00:00:00')"
        )
    refused = run_cli("migrate", "--revision", "0002", env=env)
    assert refused.returncode == 2
    assert one_line_refusal(refused) == (
        f"taskrelay: downgrading the schema from {head} to 0002 would delete subscriptions "
        "(endpoints, and tasks' notify_url): 1 "
        "(revision 0003). Back the database up first; to go ahead and delete it, run the same "
        "command with --discard-data."
    )
    assert schema_of(path) == head
    done = run_cli("migrate", "--revision", "0002", "--discard-data", env=env)
    assert done.returncode == 0, done.stderr
    assert f"database downgraded from {head} to 0002" in done.stdout
    assert schema_of(path) == "0002"


def test_a_schema_newer_than_this_release_is_named_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path),
        "TASKRELAY_API_TOKENS": "me:token-12345678",
    }
    url = f"sqlite:///{tmp_path / 'taskrelay.db'}"
    migrate(url)
    set_schema(url, "0011")
    expected = (
        "taskrelay: the database schema is at 0011, a revision this TaskRelay does not know: a "
        "newer version migrated it (this one needs 0010). Fix: run the newer TaskRelay, or "
        "downgrade the schema with it (`taskrelay migrate --revision 0010`, run by the newer "
        "version)."
    )
    assert one_line_refusal(run_cli("migrate", env=env)) == expected
    assert one_line_refusal(run_cli("migrate", "--revision", "0008", env=env)) == expected
    assert one_line_refusal(run_cli("serve", env=env)) == expected  # SQLite: serve migrates
    assert schema_of(tmp_path / "taskrelay.db") == "0011"


def test_postgresql_migrate_down_and_a_newer_schema(tmp_path: Path) -> None:
    with fresh_postgres(tmp_path, TASKRELAY_LOG_LEVEL="ERROR") as (url, env):
        assert run_cli("migrate", env=env).returncode == 0
        down = run_cli("migrate", "--revision", "0008", env=env)
        assert down.returncode == 0 and "downgraded from 0010 to 0008 (postgresql)" in down.stdout
        engine = make_engine(url)
        assert current_revision(engine) == "0008"
        engine.dispose()
        assert "schema is at 0008, this version needs 0010" in one_line_refusal(
            run_cli("serve", env=env)
        )
        assert run_cli("migrate", env=env).returncode == 0
        set_schema(url, "0011")
        for args in (["serve"], ["serve", "--migrate"], ["migrate"]):
            line = one_line_refusal(run_cli(*args, env=env))
            assert "at 0011, a revision this TaskRelay does not know" in line, args
            assert "`taskrelay migrate --revision 0010`, run by the newer version" in line


def test_an_unreachable_postgresql_is_one_line_without_the_password(tmp_path: Path) -> None:
    with closed_port() as port:
        refused = f"postgresql://relay:hunter2-secret@127.0.0.1:{port}/relay"
        env = {
            "PATH": "/usr/bin:/bin",
            "TASKRELAY_DATA_DIR": str(tmp_path),
            "TASKRELAY_API_TOKENS": "me:token-12345678",
            "TASKRELAY_SECRET_KEY": "k" * 32,
            "TASKRELAY_DATABASE_URL": refused,
        }
        expected = (
            f"taskrelay: PostgreSQL database relay on 127.0.0.1:{port} as user relay: nothing "
            "accepts connections there (connection refused). Fix: start "
            "PostgreSQL, or correct the host and port in TASKRELAY_DATABASE_URL."
        )
        for args in (["migrate"], ["serve", "--migrate"], ["serve"]):
            result = run_cli(*args, env=env)
            assert one_line_refusal(result) == expected, args
            assert "hunter2-secret" not in result.stdout + result.stderr
    admin_url = _pg_url()
    if admin_url is None:
        return
    nobody = sa.engine.make_url(admin_url).set(username="taskrelay_cli_nobody")
    env["TASKRELAY_DATABASE_URL"] = nobody.render_as_string(hide_password=False)
    line = one_line_refusal(run_cli("migrate", env=env))
    assert "as user taskrelay_cli_nobody: the server has no such user. Fix: create the user" in line


def test_demo_defaults_give_way_to_the_environment_and_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` (serve --demo): the sandbox and the demo token only where nothing else sets
    them. Exported by make, they had hidden the .env file's own values."""
    from service import cli

    env_file = tmp_path / "prod.env"
    env_file.write_text("TASKRELAY_SANDBOX=false\n")
    monkeypatch.setenv("TASKRELAY_ENV_FILE", str(env_file))
    monkeypatch.delenv("TASKRELAY_SANDBOX", raising=False)
    monkeypatch.setenv("TASKRELAY_API_TOKENS", "ops:0123456789abcdef")
    cli._demo_defaults()
    assert "TASKRELAY_SANDBOX" not in os.environ  # the file's false stands
    assert os.environ["TASKRELAY_API_TOKENS"] == "ops:0123456789abcdef"
    env_file.write_text("# nothing set here\n")
    monkeypatch.setenv("TASKRELAY_API_TOKENS", " ")  # empty: not set
    cli._demo_defaults()
    assert os.environ["TASKRELAY_SANDBOX"] == "true"
    assert os.environ["TASKRELAY_API_TOKENS"] == "demo:demo-token"


def test_the_sandbox_exits_0_on_sigterm_after_a_clean_stop(tmp_path: Path) -> None:
    """As serve does: an orchestrator saw "killed by SIGTERM" (143) after a clean stop."""
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    try:
        sandbox.process.send_signal(signal.SIGTERM)
        assert sandbox.process.wait(timeout=15) == 0
    finally:
        sandbox.stop()
