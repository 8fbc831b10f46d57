"""The ``taskrelay`` command: help, migrate, and ``serve`` as a real uvicorn process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import PostgresDatabase, _pg_url
from tests.servers import ServiceProcess


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
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path / "data")}
    result = run_cli("migrate", env=env)
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'taskrelay.db'}")
    assert {"task", "task_event", "callback_receipt"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_bad_configuration_stops_start_up_with_the_variable_named(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path), "TASKRELAY_PORT": "x"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "TASKRELAY_PORT" in result.stderr
    env = {"PATH": "/usr/bin:/bin", "TASKRELAY_DATA_DIR": str(tmp_path)}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "TASKRELAY_API_TOKENS" in result.stderr


def test_serve_refuses_an_unmigrated_postgresql(tmp_path: Path) -> None:
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip("needs TASKRELAY_TEST_DATABASE_URL")
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_cli")
    try:
        env = {
            "PATH": "/usr/bin:/bin",
            "TASKRELAY_DATA_DIR": str(tmp_path),
            "TASKRELAY_API_TOKENS": "me:token-12345678",
            "TASKRELAY_DATABASE_URL": database.url,
        }
        result = run_cli("serve", env=env)
        assert result.returncode == 2
        assert "taskrelay migrate" in result.stderr
        assert run_cli("migrate", env=env).returncode == 0
    finally:
        database.drop()


def test_serve_migrates_the_embedded_store_and_answers(tmp_path: Path) -> None:
    service = ServiceProcess(
        {"TASKRELAY_DATA_DIR": str(tmp_path / "data"), "TASKRELAY_API_TOKENS": "me:token-12345678"},
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
