"""The polling fallback across real processes: a standalone sandbox that drops every
callback, TaskRelay killed mid-flight and restarted, and two TaskRelay processes sharing one
PostgreSQL database."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from service.db import make_engine, migrate
from service.models import Task
from tests.conftest import PostgresDatabase, _pg_url
from tests.servers import SandboxProcess, ServiceProcess

TOKEN = "polling-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
FINAL = {"succeeded", "failed", "canceled", "expired"}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    process = SandboxProcess(tmp_path / "sandbox.log")
    process.behave("*", callback="drop")
    yield process
    process.stop()


def relay(tmp_path: Path, name: str, sandbox: SandboxProcess, **environ: str) -> ServiceProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_API_TOKENS": f"poller:{TOKEN}",
            "TASKRELAY_SECRET_KEY": "polling-e2e-secret-0123456789",
            "TASKRELAY_SCHEDULER_TICK": "100ms",
            "TASKRELAY_APIINONE_TYPICAL_DURATION": "2s",
            "TASKRELAY_GPTIMAGE15_TYPICAL_DURATION": "2s",
            **sandbox.provider_environment(),
            **environ,
        },
        log_path=tmp_path / f"{name}.log",
    )
    service.wait_ready()
    return service


def wait_all(url: str, ids: list[str], limit: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit
    while True:
        tasks = [httpx.get(f"{url}/v1/tasks/{i}", headers=HEADERS).json() for i in ids]
        if all(task["status"] in FINAL for task in tasks) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.2)


def test_a_restart_in_the_middle_loses_nothing(tmp_path: Path, sandbox: SandboxProcess) -> None:
    first = relay(tmp_path, "first", sandbox)
    ids = []
    try:
        for index in range(6):
            provider = "evolink" if index % 2 else "apiinone"
            response = httpx.post(
                f"{first.url}/v1/tasks",
                json={"provider": provider, "prompt": f"p{index} sandbox:duration=2"},
                headers=HEADERS,
            )
            assert response.status_code == 202
            ids.append(response.json()["id"])
        # Wait until every submission has reached the provider and TaskRelay has recorded the
        # provider's task id, then crash hard. (A task killed between the provider's answer and
        # that record is, by design, never resent: at-most-once submission.)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tasks = [httpx.get(f"{first.url}/v1/tasks/{i}", headers=HEADERS).json() for i in ids]
            if all(task["provider_task_id"] for task in tasks):
                break
            time.sleep(0.05)
        assert all(task["provider_task_id"] for task in tasks), tasks
        assert len(sandbox.tasks()) == 6
    finally:
        first.stop(signal.SIGKILL)
    time.sleep(3)  # the tasks finish at the provider while TaskRelay is down
    second = relay(tmp_path, "second", sandbox)
    try:
        tasks = wait_all(second.url, ids)
    finally:
        second.stop()
    assert [task["status"] for task in tasks] == ["succeeded"] * 6, tasks
    assert all(task["last_update_source"] == "poll" for task in tasks)
    assert all(task["submit_attempts"] == 1 for task in tasks)  # nothing sent twice


def test_an_openai_submission_killed_mid_answer_expires_once_its_answer_is_lost(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    """TaskRelay is SIGKILLed while OpenAI makes the image (the answer to the request is the
    image; OpenAI never calls back). What the killed process wrote before sending: the
    attempt, when its answer is lost if not recorded by then (640 s on: OpenAI's timeouts
    and a margin), and the scheduler's next look at that time, not at the one-hour
    deadline. The test moves both times back in the SQLite file, as if those 640 s had
    passed, and starts TaskRelay again: the task expires at once, saying why, and is not
    sent again."""
    first = relay(tmp_path, "first", sandbox)
    try:
        response = httpx.post(
            f"{first.url}/v1/tasks",
            json={"provider": "openai", "prompt": "slow sandbox:duration=120"},
            headers=HEADERS,
        )
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        created = datetime.fromisoformat(response.json()["created_at"].replace("Z", "+00:00"))
        deadline = time.monotonic() + 30
        while not sandbox.tasks() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sandbox.tasks()) == 1  # OpenAI is making it: TaskRelay waits for the answer
    finally:
        first.stop(signal.SIGKILL)
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'taskrelay.db'}")
    try:
        with Session(engine) as session:
            row = session.exec(select(Task).where(Task.id == task_id)).one()
            assert row.status == "queued" and row.submit_attempts == 1
            due = row.submit_answer_due_at
            assert due is not None and row.next_check_at == due
            assert timedelta(seconds=640) <= due - created <= timedelta(seconds=660)
            assert row.deadline_at == created + timedelta(hours=1)
            row.submit_answer_due_at = row.next_check_at = due - timedelta(seconds=641)
            session.add(row)
            session.commit()
    finally:
        engine.dispose()
    second = relay(tmp_path, "second", sandbox)
    try:
        (task,) = wait_all(second.url, [task_id])
    finally:
        second.stop()
    assert task["status"] == "expired", task
    assert task["error"]["code"] == "submission_unanswered"
    assert (
        "sent the task to openai but had heard nothing more of the submission"
        in (task["error"]["message"])
    )
    assert task["submit_attempts"] == 1 and len(sandbox.tasks()) == 1  # not sent again


def test_two_processes_on_postgresql_never_query_one_task_at_once(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    admin_url = _pg_url()
    if admin_url is None:
        pytest.skip("needs TASKRELAY_TEST_DATABASE_URL")
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_polling")
    migrate(database.url)
    latency = 0.3
    sandbox.behave("gptimage15", callback="drop", status_latency=latency)
    environ = {"TASKRELAY_DATABASE_URL": database.url, "TASKRELAY_GPTIMAGE15_POLL_RATE": "50"}
    processes: list[ServiceProcess] = []
    try:
        processes.append(relay(tmp_path / "a", "a", sandbox, **environ))
        processes.append(relay(tmp_path / "b", "b", sandbox, **environ))
        ids = []
        for index in range(24):
            url = processes[index % 2].url
            response = httpx.post(
                f"{url}/v1/tasks",
                # Unfinished at the first look, so each task is queried several times.
                json={"provider": "gptimage15", "prompt": f"t{index} sandbox:duration=3"},
                headers=HEADERS,
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        tasks = wait_all(processes[0].url, ids)
        assert [task["status"] for task in tasks] == ["succeeded"] * 24
        for task in sandbox.tasks():
            times = sorted(query["at"] for query in task["status_query_log"])  # type: ignore[union-attr]
            assert times, task
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            # A query takes `latency` seconds: a gap shorter than that is an overlap.
            assert all(gap >= latency - 0.02 for gap in gaps), (task["id"], gaps)
    finally:
        for process in processes:
            process.stop()
        database.drop()
