"""Storage faults (issue 7): a full disk and a read-only database give a clear error, never a
2xx for something not stored, and no corruption.

* SQLITE_FULL in process: each pooled connection's ``max_page_count`` caps the database at its
  size (SQLite's own "database or disk is full", the error a full disk gives), then is lifted.
* A database made read-only while running, in process: ``chattr +i`` on the file and its
  write-ahead log (root ignores permission bits, not the immutable attribute; SQLite then sees
  its writes refused by the operating system, as on a file system remounted read-only).
* A real full disk, with a real ``taskrelay serve``: the database on a small tmpfs, filled up
  with a ballast file, which is then deleted.
* A read-only database at start, with a real ``taskrelay serve``: on a tmpfs remounted
  read-only, and as an immutable file.

Mounting needs root (CAP_SYS_ADMIN) and ``chattr +i`` a file system that has the attribute
(ext4, xfs, btrfs; not tmpfs or overlayfs): without them those tests are skipped, saying why.
Every mount and attribute is undone by the fixtures, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from service.db import (
    FULL_MESSAGE,
    IO_ERROR_MESSAGE,
    READ_ONLY_MESSAGE,
    make_engine,
    migrate,
    storage_fault,
    storage_health,
    without_fsync,
)
from service.errors import StoreFull, StoreIOError, StoreReadOnly, StoreUnavailable
from service.settings import Settings
from tests.conftest import ALICE, SECRET, auth, error_code, make_settings, serving
from tests.servers import ServiceProcess, free_port, wait_until

UNCAPPED = 2**32 - 2  # SQLite lowers a larger max_page_count to its own maximum
BIG_PADDING = "x" * 60_000  # kept for audit with the receipt: needs pages a full store lacks


def evolink_body(status: str, progress: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": "task-unified-1757156493-storage",
        "object": "image.generation.task",
        "model": "gpt-image-1.5",
        "type": "image",
        "status": status,
        "progress": progress,
        **extra,
    }


PROGRESS = evolink_body("processing", 30)
DONE = evolink_body("completed", 100, results=["https://files.example/a.png"], pad=BIG_PADDING)


def stored(path: Path) -> set[str]:
    """The task ids in the SQLite file, after checking that the file is sound."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {row[0] for row in connection.execute("SELECT id FROM task")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures: a SQLite copy, the immutable attribute, a tmpfs --------------------------------


@pytest.fixture
def db_path(sqlite_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "db" / "taskrelay.db"
    path.parent.mkdir()
    shutil.copyfile(sqlite_template, path)
    return path


@pytest.fixture
def sqlite_settings(db_path: Path, tmp_path: Path) -> Settings:
    return make_settings(f"sqlite:///{db_path}", tmp_path)


def _chattr(flag: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True, check=False)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """``freeze(path, ...)`` sets the immutable attribute (writes refused even to root);
    everything frozen is thawed at the end, so the temporary folder can be removed."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    probe = tmp_path / "chattr-probe"
    probe.touch()
    tried = _chattr("+i", probe)
    if tried.returncode != 0:
        pytest.skip(
            f"chattr +i is not possible here (needs root and ext4/xfs/btrfs): {tried.stderr}"
        )
    _chattr("-i", probe)
    frozen: list[Path] = []

    def freeze(*paths: Path) -> None:
        for path in paths:
            frozen.append(path)
            done = _chattr("+i", path)
            assert done.returncode == 0, done.stderr

    yield freeze
    for path in frozen:
        _chattr("-i", path)


def thaw(*paths: Path) -> None:
    for path in paths:
        done = _chattr("-i", path)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def tmpfs() -> Iterator[Callable[[str], Path]]:
    """``mount(size)``: a fresh tmpfs of that size (``4m``); unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = Path(tempfile.mkdtemp(prefix="taskrelay-tmpfs-"))
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            point.rmdir()
            pytest.skip(f"cannot mount a tmpfs here (needs root, CAP_SYS_ADMIN): {done.stderr}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)
        with contextlib.suppress(OSError):
            point.rmdir()


def fill(folder: Path) -> Path:
    """Write a ballast file into ``folder`` until its file system has no byte left."""
    ballast = folder / "ballast"
    descriptor = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = 1 << 16
    try:
        while True:
            try:
                os.write(descriptor, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if chunk == 1:
                    break
                chunk = max(1, chunk // 16)
    finally:
        os.close(descriptor)
    assert os.statvfs(folder).f_bavail == 0
    return ballast


# --- translating the drivers' errors ------------------------------------------------------------


def test_driver_errors_become_typed_storage_faults(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    connection.execute("CREATE TABLE t (x BLOB)")
    connection.execute("PRAGMA max_page_count = 1")  # no more than it has
    with pytest.raises(sqlite3.OperationalError) as full:
        connection.execute("INSERT INTO t VALUES (randomblob(100000))")
    connection.execute(f"PRAGMA max_page_count = {UNCAPPED}")
    connection.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError) as read_only:
        connection.execute("INSERT INTO t VALUES (1)")
    connection.execute("PRAGMA query_only = OFF")
    connection.execute("CREATE UNIQUE INDEX u ON t (x)")
    connection.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        connection.execute("INSERT INTO t VALUES (1)")
    connection.close()

    found = storage_fault(full.value)
    assert isinstance(found, StoreFull) and isinstance(found, StoreUnavailable)
    assert (found.status, found.code, found.message) == (507, "store_full", FULL_MESSAGE)
    assert found.details == {"reason": "SQLITE_FULL"}
    found = storage_fault(read_only.value)
    assert isinstance(found, StoreReadOnly)
    assert (found.status, found.code, found.message) == (503, "store_read_only", READ_ONLY_MESSAGE)
    io_error = sqlite3.OperationalError("disk I/O error")
    found = storage_fault(io_error, tmp_path / "t.db")  # the file itself is writable
    assert isinstance(found, StoreIOError)
    assert (found.status, found.code, found.message) == (503, "store_io_error", IO_ERROR_MESSAGE)
    assert storage_fault(duplicate.value) is None
    assert storage_fault(sqlite3.OperationalError("database is locked")) is None

    class PostgresError(Exception):  # psycopg's errors carry the SQLSTATE the same way
        def __init__(self, sqlstate: str | None) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    assert isinstance(storage_fault(PostgresError("53100")), StoreFull)
    assert isinstance(storage_fault(PostgresError("25006")), StoreReadOnly)
    assert isinstance(storage_fault(PostgresError("58030")), StoreIOError)
    assert storage_fault(PostgresError("57P01")) is None  # the server shut down: an outage
    assert storage_fault(PostgresError(None)) is None


def test_an_io_error_on_a_file_that_refuses_writes_is_read_only(
    db_path: Path, immutable: Callable[..., None]
) -> None:
    immutable(db_path)
    found = storage_fault(sqlite3.OperationalError("disk I/O error"), db_path)
    assert isinstance(found, StoreReadOnly)


# --- SQLITE_FULL, in process ---------------------------------------------------------------------


class PageCap:
    """``max_page_count`` on every connection the pool hands out: ``full()`` holds the database
    at its present size (SQLite raises a lower cap to the size), ``free()`` lifts it."""

    def __init__(self, engine: sa.Engine) -> None:
        self.cap = UNCAPPED
        sa.event.listen(engine, "checkout", self._apply)

    def _apply(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {self.cap}")

    def full(self) -> None:
        self.cap = 1

    def free(self) -> None:
        self.cap = UNCAPPED


async def track(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth())


async def until_refused(client: httpx.AsyncClient, acknowledged: list[str]) -> httpx.Response:
    """Register tasks until the store refuses one (the pages there were fill up first)."""
    for _ in range(500):
        response = await track(client)
        if response.status_code != 201:
            return response
        acknowledged.append(response.json()["id"])
    raise AssertionError("the store never refused a write")


def storage_records(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str], list[str]]:
    messages = [record.getMessage() for record in caplog.records]
    faults = [m for m in messages if m.startswith("database storage fault")]
    failed = [m for m in messages if m.startswith("request failed")]
    recovered = [m for m in messages if m.startswith("database writes work again")]
    return faults, failed, recovered


async def test_a_full_database_refuses_writes_with_507_keeps_reads_and_recovers(
    sqlite_settings: Settings, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    acknowledged: list[str] = []
    async with serving(sqlite_settings, webhook_app=Starlette()) as (app, client):
        cap = PageCap(app.state.runtime.engine)
        first = await track(client)
        assert first.status_code == 201
        task_id = first.json()["id"]
        acknowledged.append(task_id)
        callback = httpx.URL(first.json()["callback_url"]).path
        assert (await client.post(callback, json=PROGRESS)).status_code == 200

        cap.full()
        refused = await until_refused(client, acknowledged)
        assert refused.status_code == 507
        assert refused.json() == {
            "error": {
                "code": "store_full",
                "message": FULL_MESSAGE,
                "details": {"reason": "SQLITE_FULL"},
            }
        }
        assert refused.headers["Retry-After"] == "30"
        # A provider's callback that cannot be stored is not acknowledged.
        answer = await client.post(callback, json=DONE)
        assert answer.status_code == 507 and error_code(answer) == "store_full"

        # Reads work, and show nothing of what was refused.
        task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
        assert (task["status"], task["progress"]) == ("running", 30)
        history = (await client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()
        assert [event["type"] for event in history["data"]] == ["task.submitted", "task.progress"]
        kept = (await client.get(f"/v1/tasks/{task_id}/callbacks", headers=auth())).json()
        assert len(kept["data"]) == 1
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "reason": FULL_MESSAGE}
        assert (await client.get("/healthz")).status_code == 200

        cap.free()
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        answer = await client.post(callback, json=DONE)
        assert answer.status_code == 200
        assert answer.json()["status"] == "succeeded" and answer.json()["outcome"] == "applied"
        again = await track(client)
        assert again.status_code == 201
        acknowledged.append(again.json()["id"])

    assert stored(db_path) == set(acknowledged)
    faults, failed, recovered = storage_records(caplog)
    assert len(faults) == 1 and str(db_path) in faults[0] and "SQLITE_FULL" in faults[0]
    assert len(failed) == 2 and all(
        "507 store_full: The database disk is full" in f for f in failed
    )
    assert len(recovered) == 1 and str(db_path) in recovered[0]
    assert all(record.exc_info is None for record in caplog.records)  # no traceback


# --- read-only while running, in process --------------------------------------------------------


async def test_a_database_turned_read_only_refuses_writes_with_503_and_recovers(
    sqlite_settings: Settings,
    db_path: Path,
    immutable: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wal = db_path.with_name(db_path.name + "-wal")
    acknowledged: list[str] = []
    async with serving(sqlite_settings, webhook_app=Starlette()) as (_app, client):
        first = await track(client)
        assert first.status_code == 201
        task_id = first.json()["id"]
        acknowledged.append(task_id)
        callback = httpx.URL(first.json()["callback_url"]).path
        assert (await client.post(callback, json=PROGRESS)).status_code == 200
        assert wal.exists()

        immutable(db_path, wal)
        refused = await track(client)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "store_read_only"
        assert refused.json()["error"]["message"] == READ_ONLY_MESSAGE
        answer = await client.post(callback, json=DONE)
        assert answer.status_code == 503 and error_code(answer) == "store_read_only"
        task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
        assert (task["status"], task["progress"]) == ("running", 30)
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "reason": READ_ONLY_MESSAGE}
        # Reads made while it is read-only open connections SQLite opened read-only.
        assert (await client.get(f"/v1/tasks/{task_id}", headers=auth())).status_code == 200

        thaw(db_path, wal)
        answer = await client.post(callback, json=DONE)  # the first write after: no leftovers
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
        again = await track(client)
        assert again.status_code == 201
        acknowledged.append(again.json()["id"])
        assert (await client.get("/readyz")).status_code == 200

    assert stored(db_path) == set(acknowledged)
    faults, failed, recovered = storage_records(caplog)
    assert len(faults) == 1 and str(db_path) in faults[0]
    assert len(failed) == 2 and all("503 store_read_only" in f for f in failed)
    assert len(recovered) == 1
    assert all(record.exc_info is None for record in caplog.records)


# --- a real full disk, a real process -----------------------------------------------------------


def service_environment(db: Path, data_dir: Path) -> dict[str, str]:
    return {
        "TASKRELAY_DATABASE_URL": f"sqlite:///{db}",
        "TASKRELAY_DATA_DIR": str(data_dir),
        "TASKRELAY_SECRET_KEY": SECRET,
        "TASKRELAY_API_TOKENS": f"alice:{ALICE}",
    }


def test_a_real_full_disk(
    tmpfs: Callable[[str], Path], sqlite_template: Path, tmp_path: Path
) -> None:
    disk = tmpfs("4m")
    db = disk / "taskrelay.db"
    shutil.copyfile(sqlite_template, db)
    service = ServiceProcess(
        service_environment(db, tmp_path / "data"), log_path=tmp_path / "service.log"
    )
    service.wait_ready()
    acknowledged: list[str] = []
    refusals = 0
    try:
        with httpx.Client(base_url=service.url, headers=auth(), timeout=30) as http:
            first = http.post("/v1/tasks/track", json={"provider": "evolink"})
            assert first.status_code == 201
            task_id = first.json()["id"]
            acknowledged.append(task_id)
            callback = httpx.URL(first.json()["callback_url"]).path
            assert http.post(callback, json=PROGRESS).status_code == 200

            ballast = fill(disk)
            refused = None
            for _ in range(2000):  # what room the write-ahead log had left goes first
                response = http.post("/v1/tasks/track", json={"provider": "evolink"})
                if response.status_code != 201:
                    refused = response
                    break
                acknowledged.append(response.json()["id"])
            assert refused is not None, "a full disk never refused a write"
            refusals += 1
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["code"] == "store_full"
            assert refused.json()["error"]["message"] == FULL_MESSAGE
            answer = http.post(callback, json=DONE)
            refusals += 1
            assert answer.status_code == 507 and error_code(answer) == "store_full"
            task = http.get(f"/v1/tasks/{task_id}").json()
            assert (task["status"], task["progress"]) == ("running", 30)
            assert all(http.get(f"/v1/tasks/{i}").status_code == 200 for i in acknowledged)
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"] == FULL_MESSAGE
            assert http.get("/healthz").status_code == 200
            assert service.process.poll() is None

            ballast.unlink()
            wait_until(lambda: http.get("/readyz").status_code == 200, "/readyz to turn 200")
            answer = http.post(callback, json=DONE)
            assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
            again = http.post("/v1/tasks/track", json={"provider": "evolink"})
            assert again.status_code == 201
            acknowledged.append(again.json()["id"])
    finally:
        code = service.stop()
    assert code == 0
    assert stored(db) == set(acknowledged)
    lines = [json.loads(line) for line in service.logs().splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    faults = [m for m in messages if m.startswith("database storage fault")]
    assert len(faults) == 1 and str(db) in faults[0] and "store_full" in faults[0]
    failed = [m for m in messages if m.startswith("request failed")]
    assert len(failed) == refusals and all("507 store_full" in m for m in failed)
    assert not any("Traceback" in json.dumps(line) for line in lines)


# --- read-only at start, a real process ---------------------------------------------------------


def serve_once(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["read-only mount", "immutable file"])
def read_only_db(
    request: pytest.FixtureRequest, sqlite_template: Path, tmp_path: Path
) -> tuple[Path, str]:
    """A migrated database that cannot be written, and the cause the service must name."""
    if request.param == "read-only mount":
        disk = request.getfixturevalue("tmpfs")("4m")
        db = disk / "taskrelay.db"
        shutil.copyfile(sqlite_template, db)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        return db, "read-only (Read-only file system)"
    freeze = request.getfixturevalue("immutable")
    db = tmp_path / "db" / "taskrelay.db"
    db.parent.mkdir()
    shutil.copyfile(sqlite_template, db)
    freeze(db)
    return db, "read-only (Operation not permitted)"


def test_a_read_only_database_stops_start_up_naming_the_file(
    read_only_db: tuple[Path, str], tmp_path: Path
) -> None:
    db, cause = read_only_db
    before = digest(db)
    finished = serve_once(service_environment(db, tmp_path / "data"))
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert f"cannot write to the database file {db}: {cause}" in output
    assert "TaskRelay ready" not in output
    assert digest(db) == before
    assert not db.with_name(db.name + "-wal").exists()


def test_a_read_only_database_at_start_is_one_plain_line(
    db_path: Path, immutable: Callable[..., None], tmp_path: Path
) -> None:
    immutable(db_path)
    finished = serve_once(service_environment(db_path, tmp_path / "data"))
    assert finished.returncode == 2
    assert "Traceback" not in finished.stdout + finished.stderr
    expected = f"taskrelay: cannot write to the database file {db_path}: read-only"
    assert expected in finished.stderr


def test_a_database_folder_that_cannot_exist_is_said_as_it_is(tmp_path: Path) -> None:
    """/proc takes no new folder (ENOENT): it was called "read-only (No such file or
    directory)" (config hunt)."""
    finished = serve_once(
        {
            "TASKRELAY_DATABASE_URL": "sqlite:////proc/taskrelay-nowhere/taskrelay.db",
            "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
            "TASKRELAY_API_TOKENS": "ops:token-0123456789",
        }
    )
    assert finished.returncode == 2
    assert finished.stderr.endswith(
        "taskrelay: cannot create the database folder /proc/taskrelay-nowhere: No such file "
        "or directory\n"
    ), finished.stderr
    assert "read-only" not in finished.stderr


def test_a_database_on_a_full_disk_at_start_is_called_full_not_failed(
    tmpfs: Callable[[str], Path], sqlite_template: Path, tmp_path: Path
) -> None:
    """SQLite cannot even open a file in WAL mode whose -shm must grow on a full disk; it says
    "disk I/O error" (SQLITE_IOERR_SHMSIZE), which serve and migrate reported as a failed
    disk, and doctor as a file that "could not be read" (config hunt)."""
    disk = tmpfs("1m")
    db = disk / "taskrelay.db"
    shutil.copyfile(sqlite_template, db)
    fill(disk)
    before = digest(db)
    finished = serve_once(service_environment(db, tmp_path / "data"))
    assert finished.returncode == 2, finished.stderr
    assert "taskrelay: The database disk is full: free space on it" in finished.stderr
    assert "disk failed" not in finished.stdout + finished.stderr
    from service import doctor

    head, _ = doctor.schema_revisions(f"sqlite:///{db}")
    check = doctor.database_check(doctor.probe_database(f"sqlite:///{db}", head=head))
    assert check.status == doctor.FAIL
    assert "the disk holding it is full" in check.message, check.message
    assert check.fix == "free space on that disk (or raise its quota)."
    assert digest(db) == before


def test_engines_from_make_engine_translate_storage_faults(db_path: Path) -> None:
    """Through SQLAlchemy, as the store sees it: a typed error, not a DBAPIError."""
    engine = make_engine(f"sqlite:///{db_path}", pool_size=1)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA query_only = ON")
            with pytest.raises(StoreReadOnly):
                connection.exec_driver_sql("DELETE FROM task")
    finally:
        engine.dispose()


def test_checking_the_file_never_releases_sqlites_locks(tmp_path: Path) -> None:
    """The storage checks run while SQLite has the file open (a new pooled connection asks
    whether the file is writable). Opening and closing a descriptor of the file would release
    every POSIX lock this process holds on it: another process would then think itself the
    last user, checkpoint the write-ahead log and delete it under this one's connections."""
    path = tmp_path / "locks.db"
    url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(url)
    try:
        holder = engine.connect()  # SQLite's shared lock on the file, held from here on
        holder.exec_driver_sql("SELECT count(*) FROM task").all()
        with engine.connect() as second, second.begin():  # a new connection: the checks run
            second.exec_driver_sql("PRAGMA user_version = 7")
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        other = (
            "import sqlite3, sys; "
            "sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM task').fetchall()"
        )
        subprocess.run([sys.executable, "-c", other, str(path)], check=True, timeout=30)
        assert wal.exists(), "another process checkpointed and deleted the log under ours"
        holder.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("faulted", [True, False])
def test_a_lost_fsync_setting_is_a_warning_unless_a_storage_fault_is_known(
    db_path: Path, faulted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """During a storage fault the dispatcher's every pass logged "could not restore
    synchronous=FULL", once a second, beside the fault's own line (found by the metrics and
    logs hunt): quiet while the fault is known, a warning otherwise."""
    engine = make_engine(f"sqlite:///{db_path}")
    try:
        if faulted:
            health = storage_health(engine)
            assert health is not None
            health.record(StoreReadOnly(READ_ONLY_MESSAGE))
        with (
            caplog.at_level(logging.DEBUG, logger="service.db"),
            engine.connect() as connection,
            without_fsync(connection),
        ):
            driver = connection.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            driver.close()  # restoring the setting fails now
        lost = [r for r in caplog.records if "could not restore synchronous" in r.getMessage()]
        assert [r.levelno for r in lost] == [logging.DEBUG if faulted else logging.WARNING]
    finally:
        engine.dispose()


@pytest.mark.parametrize("fault", [StoreReadOnly(READ_ONLY_MESSAGE), StoreFull(FULL_MESSAGE)])
def test_a_committed_write_ends_a_storage_fault_and_says_so(
    db_path: Path, fault: StoreUnavailable, caplog: pytest.LogCaptureFixture
) -> None:
    """Only /readyz's write check ended a fault: without a probe, its end was never logged
    and the next fault of that kind went unsaid (found by the metrics and logs hunt). A
    write that commits ends it (a full disk: once it has room again)."""
    from service.store import Store

    engine = make_engine(f"sqlite:///{db_path}")
    try:
        health = storage_health(engine)
        assert health is not None
        assert isinstance(fault, StoreReadOnly | StoreFull)
        health.record(fault)
        store = Store(engine)
        with caplog.at_level(logging.WARNING, logger="service.db"):
            with store.transaction(write=False):
                pass  # a read proves nothing
            assert health.fault is fault
            with store.core_transaction() as (connection, _):
                connection.exec_driver_sql("PRAGMA user_version = 0")
        assert health.fault is None
        over = [r.getMessage() for r in caplog.records if "database writes work" in r.getMessage()]
        assert len(over) == 1 and f"({fault.code} is over)" in over[0]
    finally:
        engine.dispose()
