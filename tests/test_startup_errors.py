"""Start-up refuses a bad setting with one line naming the variable and how to fix it, never a
traceback: values the settings check used to accept and that then crashed start-up (or were
served silently, handing providers callback URLs they cannot use); a schema newer than this
release everywhere it is looked at; and the log, JSON lines from its first line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from service.db import head_revision
from service.settings import MAX_WRITE_QUEUE
from tests.conftest import make_settings, serving
from tests.servers import free_port

KEY = "startup-signing-key-0123456789"


def serve(tmp_path: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    """``taskrelay serve`` on a free port; one that started anyway is stopped by the timeout."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        "TASKRELAY_API_TOKENS": "me:token-12345678",
        "TASKRELAY_SECRET_KEY": KEY,
        "TASKRELAY_PORT": str(free_port()),
        **environ,
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        capture_output=True,
        text=True,
        env={name: value for name, value in env.items() if value is not None},
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("environ", "variable", "says", "secret"),
    [
        # The Dockerfile listens on 0.0.0.0: callback URLs must not point there.
        ({"TASKRELAY_HOST": "0.0.0.0"}, "TASKRELAY_PUBLIC_URL", "points at 0.0.0.0", None),
        (
            {"TASKRELAY_PUBLIC_URL": "https://relay:S3cretPass@relay.example.com"},
            "TASKRELAY_PUBLIC_URL",
            "carries a user name or password",
            "S3cretPass",
        ),
        ({"TASKRELAY_WRITE_BATCH": "20000"}, "TASKRELAY_WRITE_BATCH", "at most 10000", None),
        (
            {"TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "10.1.2.3/8"},
            "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS",
            "10.1.2.3/8 has host bits set; write the network itself (10.0.0.0/8)",
            None,
        ),
        (
            {"TASKRELAY_DATABASE_URL": "sqlite:///:memory:"},
            "TASKRELAY_DATABASE_URL",
            "in-memory SQLite database loses every task",
            None,
        ),
        (
            {"TASKRELAY_EVOLINK_DEADLINE": "99999999999d"},
            "TASKRELAY_EVOLINK_DEADLINE",
            "at most 3650d, ten years",
            None,
        ),
        (
            {"TASKRELAY_SECRET_KEY_FALLBACKS": "old-short"},
            "TASKRELAY_SECRET_KEY_FALLBACKS",
            "shorter than 16 characters",
            "old-short",
        ),
        (
            {"TASKRELAY_ENV_FILE": "/nonexistent/prod.env"},
            "TASKRELAY_ENV_FILE",
            "names /nonexistent/prod.env, which does not exist",
            None,
        ),
        (
            {"TASKRELAY_DATABASE_URL": "postgresql://relay:S3cretPass@db:abc/taskrelay"},
            "TASKRELAY_DATABASE_URL",
            "not a URL SQLAlchemy can read",
            "S3cretPass",
        ),
        (
            {"TASKRELAY_DATABASE_URL": "postgresql://relay@[::1/taskrelay"},
            "TASKRELAY_DATABASE_URL",
            "not a URL SQLAlchemy can read",
            None,
        ),
        # OpenAI's images are kept there (the sandbox stands in for OpenAI).
        (
            {"TASKRELAY_SANDBOX": "true", "TASKRELAY_FILES_DIR": "/dev/null/files"},
            "TASKRELAY_FILES_DIR",
            "cannot write to /dev/null/files (Not a directory)",
            None,
        ),
    ],
)
def test_a_bad_value_stops_serve_with_one_line(
    tmp_path: Path, environ: dict[str, str], variable: str, says: str, secret: str | None
) -> None:
    result = serve(tmp_path, **environ)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith("taskrelay: configuration error: ")
    assert variable in problems[0] and says in problems[0], problems[0]
    if secret is not None:
        assert secret not in result.stdout + result.stderr


def test_an_env_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    env_file = tmp_path / "latin1.env"
    env_file.write_bytes("TASKRELAY_LOG_LEVEL=INFO # caf\xe9\n".encode("latin-1"))
    result = serve(tmp_path, TASKRELAY_ENV_FILE=str(env_file))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"taskrelay: configuration error: {env_file} is not UTF-8 text (byte 30 cannot be "
        "read): save it as UTF-8."
    ]


def test_a_data_folder_that_cannot_hold_the_generated_key(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    data_dir = tmp_path / "a-file" / "data"
    result = serve(tmp_path, TASKRELAY_DATA_DIR=str(data_dir), TASKRELAY_SECRET_KEY="")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"taskrelay: configuration error: TASKRELAY_SECRET_KEY is not set, and the signing key "
        f"file {data_dir / 'secret_key'} cannot be read or created (Not a directory): make "
        "TASKRELAY_DATA_DIR a folder TaskRelay can write, or set TASKRELAY_SECRET_KEY (e.g. to "
        "the output of `taskrelay new-token`)."
    ]


def test_the_generated_key_warning_is_a_json_log_line(tmp_path: Path) -> None:
    """serve makes the key (migrate, which signs nothing, no longer does); here it then stops
    at the missing public URL, before it would listen."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_API_TOKENS": "ops:token-0123456789",
            "TASKRELAY_HOST": "0.0.0.0",
        },
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    warning, *rest = result.stderr.splitlines()
    line = json.loads(warning)  # a JSON log line
    assert line["level"] == "warning"
    assert line["message"].startswith("TASKRELAY_SECRET_KEY is not set: generated a signing")
    assert rest[-1].startswith("taskrelay: configuration error: TASKRELAY_PUBLIC_URL is not set")
    assert (tmp_path / "data" / "secret_key").is_file()


async def test_readiness_names_a_schema_newer_than_this_release(
    sqlite_url: str, tmp_path: Path
) -> None:
    url = sqlite_url
    async with serving(make_settings(url, tmp_path), webhook_app=Starlette()) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        engine = sa.create_engine(url)
        with engine.begin() as connection:  # a newer release migrated it meanwhile
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0999'")
        engine.dispose()
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    reason = ready.json()["reason"]
    assert "at 0999, a revision this TaskRelay does not know" in reason
    head = head_revision(url)
    assert f"downgrade the schema with it (`taskrelay migrate --revision {head}`" in reason
    assert "run `taskrelay migrate`" not in reason


async def test_the_largest_write_batch_starts(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, TASKRELAY_WRITE_BATCH=f"{MAX_WRITE_QUEUE}")
    async with serving(settings, webhook_app=Starlette()) as (app, client):
        assert app.state.runtime.committer.max_batch == MAX_WRITE_QUEUE
        assert (await client.get("/readyz")).status_code == 200


def test_each_worker_process_logs_json_lines_at_the_configured_level(tmp_path: Path) -> None:
    """``serve --workers N`` starts each worker as a fresh process that builds the app through
    the factory: it sets up the JSON log itself (its info lines were lost, its warnings plain
    text)."""
    script = (
        "import logging; from service.app import create_app_from_env; create_app_from_env(); "
        "logging.getLogger('taskrelay.worker').info('worker ready')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_API_TOKENS": "me:token-12345678",
            "TASKRELAY_SECRET_KEY": KEY,
            "TASKRELAY_LOG_LEVEL": "INFO",
        },
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert [line["message"] for line in lines if line["level"] == "info"] == ["worker ready"]


def test_a_fatal_signal_leaves_the_stacks_on_stderr() -> None:
    """SIGBUS (a memory-mapped SQLite -shm file made immutable under the process) ends a
    process at once; tuned as every serving process is, it says where each thread was."""
    code = (
        "import os, signal; from service.app import tune_process; tune_process(); "
        "os.kill(os.getpid(), signal.SIGBUS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == -7  # killed by SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr
    assert "Current thread" in result.stderr and '"<string>", line 1' in result.stderr


def test_a_data_folder_that_is_a_file_says_so_not_read_only(tmp_path: Path) -> None:
    """With the key set, the database's folder is the first thing that needs the data folder:
    a file in its place was reported as a read-only folder."""
    (tmp_path / "a-file").write_text("not a folder")
    result = serve(tmp_path, TASKRELAY_DATA_DIR=str(tmp_path / "a-file"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert f"{tmp_path / 'a-file'} is a file, where a folder must be" in line, line
    assert "read-only" not in line
