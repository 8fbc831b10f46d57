"""A PostgreSQL statement that waits too long, end to end: a row lock held by a session outside
TaskRelay (an operator's transaction left open, a stuck client) must not stall the service.

A real ``taskrelay serve`` on a database of the test's own, with
``TASKRELAY_DB_STATEMENT_TIMEOUT`` short. Another session locks one task's row and keeps its
transaction open: a callback for that task answers 503 ``store_unavailable`` (nothing
recorded) once the statement timeout cancels the wait, instead of waiting for as long as the
lock is held; callbacks for other tasks are acknowledged meanwhile (the group-commit writer is
not stuck behind it); once the lock is released, the provider's retry is acknowledged and
applied once; and a SIGTERM while a callback waits on the lock ends the process within its
shutdown budget.

The lock's transaction holds an xid, which keeps every database of the server from pruning
old row versions while it is open (tests/test_ingest.py's HOT update test, running beside it,
tries again for that): the timeout is the least allowed, so it is open about a second.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.db import PG_KEEPALIVES, make_engine
from tests.conftest import migrated_postgres
from tests.servers import ServiceProcess, wait_until
from tests.test_scaleout_e2e import evolink_callback

TOKEN = "locks-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
STATEMENT_TIMEOUT = 1.0  # seconds: the least allowed (the lock test holds an xid meanwhile)
# A callback blocked on the lock for good would time out here; one the statement timeout
# ends answers well before.
CLIENT_TIMEOUT = 20.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with migrated_postgres("taskrelay_locks", "a row lock held on PostgreSQL") as created:
        yield created.url


@pytest.fixture
def relay(tmp_path: Path, database_url: str) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_DATABASE_URL": database_url,
            "TASKRELAY_API_TOKENS": f"ops:{TOKEN}",
            "TASKRELAY_SECRET_KEY": "locks-e2e-secret-0123456789",
            "TASKRELAY_DB_STATEMENT_TIMEOUT": f"{STATEMENT_TIMEOUT:g}s",
            "TASKRELAY_SCHEDULER": "false",
        },
        "--graceful-timeout",
        "10",
        log_path=tmp_path / "relay.log",
    )
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop(signal.SIGKILL)


def track(http: httpx.Client, provider_task_id: str) -> dict[str, Any]:
    response = http.post(
        "/v1/tasks/track", json={"provider": "evolink", "provider_task_id": provider_task_id}
    )
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


@contextlib.contextmanager
def row_locked(database_url: str, task_id: str) -> Iterator[None]:
    """The task's row locked (FOR UPDATE) by a session outside TaskRelay, in a transaction
    left open until the block ends."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            locked = connection.execute(
                sa.text("SELECT id FROM task WHERE id = :id FOR UPDATE"), {"id": task_id}
            ).scalar_one()
            assert locked == task_id
            yield
            connection.rollback()
    finally:
        engine.dispose()


def test_a_callback_waiting_on_a_row_lock_held_elsewhere_is_refused_and_others_go_on(
    relay: ServiceProcess, database_url: str
) -> None:
    with httpx.Client(base_url=relay.url, headers=HEADERS, timeout=CLIENT_TIMEOUT) as http:
        locked, free = track(http, "task-locked"), track(http, "task-free")
        with row_locked(database_url, locked["id"]):
            refused = httpx.post(
                locked["callback_url"],
                json=evolink_callback("task-locked", 2, fail=False),
                timeout=CLIENT_TIMEOUT,
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.headers["Retry-After"] == "2"
            assert refused.json()["error"]["details"] == {"reason": "QueryCanceled"}
            # The writer is not stuck behind the lock: another task's callback goes through.
            taken = httpx.post(
                free["callback_url"],
                json=evolink_callback("task-free", 2, fail=False),
                timeout=CLIENT_TIMEOUT,
            )
            assert taken.status_code == 200, taken.text
            # Nothing of the refused callback was recorded.
            assert http.get(f"/v1/tasks/{locked['id']}").json()["status"] == "queued"
        retried = httpx.post(
            locked["callback_url"],
            json=evolink_callback("task-locked", 2, fail=False),
            timeout=CLIENT_TIMEOUT,
        )
        assert retried.status_code == 200, retried.text
        task = http.get(f"/v1/tasks/{locked['id']}").json()
        assert task["status"] == "succeeded"
        events = http.get(f"/v1/tasks/{locked['id']}/events").json()["data"]
        assert [event["type"] for event in events].count("task.succeeded") == 1
        assert http.get(f"/v1/tasks/{free['id']}").json()["status"] == "succeeded"
    assert "503 store_unavailable: The database did not finish in time" in relay.logs()


def test_sigterm_while_a_callback_waits_on_a_row_lock_ends_within_the_budget(
    relay: ServiceProcess, database_url: str
) -> None:
    with httpx.Client(base_url=relay.url, headers=HEADERS, timeout=CLIENT_TIMEOUT) as http:
        locked = track(http, "task-held")
    waiting = threading.Event()
    with row_locked(database_url, locked["id"]), ThreadPoolExecutor(1) as pool:

        def send() -> httpx.Response:
            waiting.set()
            return httpx.post(
                locked["callback_url"],
                json=evolink_callback("task-held", 1, fail=False),
                timeout=CLIENT_TIMEOUT,
            )

        answer = pool.submit(send)
        waiting.wait()
        wait_until(lambda: lock_waiters(database_url) or None, "the callback waiting on the lock")
        relay.process.send_signal(signal.SIGTERM)
        try:
            code = relay.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within 15 s of SIGTERM:\n{relay.logs()}") from None
        assert code == 0, relay.logs()
        assert answer.result().status_code == 503


def lock_waiters(database_url: str) -> int:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def session_settings(url: str, **options: Any) -> tuple[str, dict[str, str]]:
    """A connection's statement_timeout, and the libpq parameters it was opened with."""
    engine = make_engine(url, pool_size=1, **options)
    try:
        with engine.connect() as connection:
            timeout = connection.exec_driver_sql("SHOW statement_timeout").scalar_one()
            driver = connection.connection.driver_connection
            assert driver is not None
            return str(timeout), dict(driver.info.get_parameters())
    finally:
        engine.dispose()


def test_the_serving_engine_sets_its_statement_timeout_and_tcp_keepalives(
    database_url: str,
) -> None:
    timeout, parameters = session_settings(database_url, statement_timeout=2.5)
    assert timeout == "2500ms"
    assert {name: parameters.get(name) for name in PG_KEEPALIVES} == {
        name: str(value) for name, value in PG_KEEPALIVES.items()
    }
    # Migrations and the CLI's checks: no statement timeout (an index build may take long).
    assert session_settings(database_url)[0] == "0"
    # The URL's own options are kept, and its own values win.
    url = sa.engine.make_url(database_url).update_query_dict(
        {"options": "-c lock_timeout=7s", "keepalives_idle": "42"}
    )
    with_options = url.render_as_string(hide_password=False)
    _, parameters = session_settings(with_options, statement_timeout=2.5)
    assert parameters["keepalives_idle"] == "42"
    engine = make_engine(with_options, pool_size=1, statement_timeout=2.5)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar_one() == "7s"
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar_one() == "2500ms"
    finally:
        engine.dispose()
    own = url.update_query_dict({"options": "-c statement_timeout=9s"})
    assert (
        session_settings(own.render_as_string(hide_password=False), statement_timeout=2.5)[0]
        == "9s"
    )
