"""Scale-out end to end: three ``taskrelay serve`` replicas on one PostgreSQL database behind a
round-robin load balancer, one of them SIGKILLed in the middle of the load.

Real processes and real HTTP throughout: a fresh PostgreSQL database; the provider sandbox on its
own; a webhook subscriber; a load balancer (``BalancerProcess``) whose address is every
replica's ``TASKRELAY_PUBLIC_URL``, so provider callbacks and API calls land on any replica. The
replicas share the database, the signing key and the files folder (as a shared volume would) and
nothing else. Leases are short (``TASKRELAY_POLL_LEASE``, which delivery leases use too), so the
dead replica's claims free up within seconds.

The load:

* tracked tasks (``POST /v1/tasks/track``): the test plays EvoLink and posts callbacks (two
  progress updates, then completed or failed) through the balancer, each task's in order,
  several tasks at once;
* tasks submitted to the sandbox's gptimage15.ai (a batch through the balancer, then one every
  ``DRIP`` seconds straight to the survivors until the kill): each is first asked about before
  it is done, every answer is slow (so poll leases are held for a while), and a third of them
  never get their callback, so only polling finishes them;
* a few OpenAI tasks (synchronous; TaskRelay stores their images in the shared files folder).

The victim dies at a moment it holds at least one poll lease and one delivery lease, with a
callback of its own half received: it is frozen (SIGSTOP) until the database shows it holding
both, then SIGKILLed. The test database knows which replica took each lease: a trigger notes
every lease owner with the ``application_name`` of the replica's connections. A request that
fails against the dead replica is retried by the balancer (connection refused: nothing was
sent) or by its sender (a 502: the replica died mid-request), as providers and clients do.

Then every task is final with the provider's outcome; every callback was applied exactly once
(a retry of one the victim had committed is recorded "unchanged", or "terminal"); every event
was delivered to the subscriber, signed, at least once; an event arrives twice only if its
delivery was leased by the victim when it died, and then not again before that lease ran out,
or if its first attempt got no answer in time or outlived its lease (a survivor stalled on a
loaded machine), and never after its success was recorded; per task, the subscriber got the
events in order.

A second test: a submission that a replica accepted (202) and died before sending is sent by a
replica still running, whether or not its client sends the request again (same
Idempotency-Key). Until a replica started, nobody sent it (found with this test, fixed by the
submitter's periodic sweep for orphaned submissions).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from tests.conftest import PostgresDatabase, migrated_postgres
from tests.servers import (
    BalancerProcess,
    SandboxProcess,
    ServiceProcess,
    SubscriberProcess,
    wait_until,
)

CLIENT = "scaleout"
TOKEN = "scaleout-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SECRET_KEY = "scaleout-e2e-secret-key-0123456789"
REPLICAS = ("relay-a", "relay-b", "relay-c")
VICTIM = "relay-b"
LEASE = 3.0  # TASKRELAY_POLL_LEASE: poll and delivery leases
TRACKED = 72  # tasks whose callbacks the test sends itself
SUBMITTED = 18  # gptimage15 tasks submitted through the balancer before the kill
DRIP = 0.15  # then one more every DRIP seconds until the kill, straight to a survivor
MAX_DRIPPED = 400  # at most 60 s of drip (WAIT): as long as setting up the kill may take
DROPPED_EVERY = 3  # every third of those never gets its callback
OPENAI = 6
SENDERS = 6  # tracked tasks in flight at once
CALLBACK_GAP = 0.03  # seconds between one task's callbacks, so the load spans the kill
STATUS_LATENCY = 0.4  # every sandbox status answer takes this long
HOLD = 0.15  # the subscriber answers each delivery after this long
PATH = "/hooks/scaleout"
FINAL = {"succeeded", "failed", "canceled", "expired"}
WAIT = 60.0  # the most any single condition may take, even on a loaded 2-core machine
RETRIES = 40  # sends of one request before the test gives up on it
SLACK = 0.5  # seconds of scheduling slack when comparing times across processes


# Which replica takes which lease: every lease owner (a scheduler's or dispatcher's worker id)
# is noted with the application_name of the connection that took it. Test instrumentation in
# the test's own database; the service knows nothing about it.
LEASE_OWNER_AUDIT = (
    "CREATE TABLE scaleout_lease_owner (owner varchar(64) PRIMARY KEY, replica text NOT NULL)",
    """
    CREATE FUNCTION scaleout_note_lease_owner() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO scaleout_lease_owner (owner, replica)
        VALUES (NEW.lease_owner, current_setting('application_name'))
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER scaleout_task_lease AFTER UPDATE OF lease_owner ON task
    FOR EACH ROW WHEN (NEW.lease_owner IS NOT NULL) EXECUTE FUNCTION scaleout_note_lease_owner()
    """,
    """
    CREATE TRIGGER scaleout_delivery_lease AFTER UPDATE OF lease_owner ON delivery
    FOR EACH ROW WHEN (NEW.lease_owner IS NOT NULL) EXECUTE FUNCTION scaleout_note_lease_owner()
    """,
    # Every claim of a delivery (a lease taken: a record always counts an attempt, a claim
    # never), and when (the server's clock, as a Unix time).
    """
    CREATE TABLE scaleout_delivery_lease_taken (
        delivery_id text NOT NULL, owner varchar(64) NOT NULL, taken_at double precision NOT NULL
    )
    """,
    """
    CREATE FUNCTION scaleout_note_delivery_lease() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO scaleout_delivery_lease_taken (delivery_id, owner, taken_at)
        VALUES (NEW.id, NEW.lease_owner, extract(epoch FROM clock_timestamp()));
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER scaleout_delivery_lease_taken AFTER UPDATE OF lease_owner ON delivery
    FOR EACH ROW WHEN (NEW.lease_owner IS NOT NULL AND NEW.attempts = OLD.attempts)
    EXECUTE FUNCTION scaleout_note_delivery_lease()
    """,
)
LAST_CLAIM = sa.text(
    "SELECT MAX(taken_at) FROM scaleout_delivery_lease_taken WHERE delivery_id = :id"
)

# Leases still running now, with the replica holding each (times are naive UTC in the schema).
LIVE_LEASES = sa.text(
    """
    SELECT 'poll' AS kind, t.id AS item, NULL AS event_id, o.replica, t.lease_expires_at
    FROM task t LEFT JOIN scaleout_lease_owner o ON o.owner = t.lease_owner
    WHERE t.lease_expires_at > (clock_timestamp() AT TIME ZONE 'UTC')
    UNION ALL
    SELECT 'delivery', d.id, e.id, o.replica, d.lease_expires_at
    FROM delivery d
    JOIN task_event e ON e.seq = d.event_seq
    LEFT JOIN scaleout_lease_owner o ON o.owner = d.lease_owner
    WHERE d.status = 'pending'
      AND d.lease_expires_at > (clock_timestamp() AT TIME ZONE 'UTC')
    """
)


# --- helpers --------------------------------------------------------------------------------------


def epoch(value: datetime) -> float:
    """A naive UTC time from the database as a Unix time."""
    return value.replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Lease:
    kind: str  # "poll" (a task) or "delivery"
    item: str  # task id or delivery id
    event_id: str | None
    replica: str | None
    expires_at: float  # Unix time


def live_leases(engine: sa.Engine) -> list[Lease]:
    with engine.connect() as connection:
        rows = connection.execute(LIVE_LEASES).all()
    return [Lease(r.kind, r.item, r.event_id, r.replica, epoch(r.lease_expires_at)) for r in rows]


@pytest.fixture
def database() -> Iterator[PostgresDatabase]:
    """A fresh, migrated PostgreSQL database that notes which replica takes each lease."""
    with migrated_postgres("taskrelay_scaleout", "several replicas need PostgreSQL") as database:
        engine = sa.create_engine(database.url)
        with engine.begin() as connection:
            for statement in LEASE_OWNER_AUDIT:
                connection.exec_driver_sql(statement)
        engine.dispose()
        yield database


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Whatever a test registers here is stopped after it, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


def replica_environment(
    database: PostgresDatabase,
    name: str,
    directory: Path,
    public_url: str | None,
    sandbox: SandboxProcess,
) -> dict[str, str]:
    """A replica's settings; ``public_url`` None means its own address."""
    environ = {
        # application_name tells the replicas' connections apart in the database.
        "TASKRELAY_DATABASE_URL": f"{database.url}?application_name={name}",
        "TASKRELAY_DATA_DIR": str(directory / name / "data"),
        "TASKRELAY_FILES_DIR": str(directory / "shared-files"),
        "TASKRELAY_SECRET_KEY": SECRET_KEY,
        "TASKRELAY_API_TOKENS": f"{CLIENT}:{TOKEN}",
        "TASKRELAY_DB_POOL_SIZE": "5",  # three replicas share a server other tests use too
        "TASKRELAY_POLL_LEASE": f"{LEASE}s",
        "TASKRELAY_SCHEDULER_TICK": "200ms",
        "TASKRELAY_POLL_GRACE": "200ms",
        "TASKRELAY_GPTIMAGE15_TYPICAL_DURATION": "1s",
        "TASKRELAY_GPTIMAGE15_POLL_RATE": "50",
        # Tracked EvoLink tasks are the test's own: the sandbox never issued their ids, so
        # they must not be asked about during the test.
        "TASKRELAY_EVOLINK_TYPICAL_DURATION": "10m",
        "TASKRELAY_SUBMIT_BACKOFF": "100ms",
        "TASKRELAY_DELIVERY_SCHEDULE": "0s,500ms,1s,2s,5s,10s",
        "TASKRELAY_DELIVERY_PER_SUBSCRIPTION": "8",
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        # The test polls the API far faster than a client should; not what it is about.
        "TASKRELAY_RATE_LIMIT": "0",
        **sandbox.provider_environment(),
    }
    if public_url is not None:
        environ["TASKRELAY_PUBLIC_URL"] = public_url
    return environ


def start_replicas(
    environments: dict[str, dict[str, str]], directory: Path, cleanup: contextlib.ExitStack
) -> dict[str, ServiceProcess]:
    """Start every replica at once (start-up is the slow part), then wait for each."""
    replicas: dict[str, ServiceProcess] = {}
    for name, environ in environments.items():
        replica = ServiceProcess(environ, log_path=directory / f"{name}.log")
        cleanup.callback(replica.stop, signal.SIGKILL)
        replicas[name] = replica
    for replica in replicas.values():
        replica.wait_ready(timeout=WAIT)
    return replicas


@dataclass
class Tally:
    """What the test's own senders saw (shared by threads)."""

    sent: Counter[str] = field(default_factory=Counter)  # requests, retries included
    answered: Counter[str] = field(default_factory=Counter)  # final 2xx answers
    broken: Counter[str] = field(default_factory=Counter)  # 502: a replica died mid-request
    unavailable: Counter[str] = field(default_factory=Counter)  # 503 or no answer at all
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, counter: Counter[str], kind: str) -> None:
        with self.lock:
            counter[kind] += 1


class Sender:
    """Talks to the balancer as a client and as a provider; like them, it sends a request again
    when a replica failed it (502: died mid-request; 503; no answer). Submissions and tracking
    carry an Idempotency-Key, callbacks are idempotent by design, so that is always safe."""

    def __init__(self, url: str, tally: Tally) -> None:
        self.http = httpx.Client(base_url=url, headers=HEADERS, timeout=30.0)
        self.tally = tally

    def close(self) -> None:
        self.http.close()

    def send(self, kind: str, method: str, path: str, **options: Any) -> httpx.Response:
        for _ in range(RETRIES):
            self.tally.add(self.tally.sent, kind)
            try:
                response = self.http.request(method, path, **options)
            except httpx.TransportError:
                self.tally.add(self.tally.unavailable, kind)
                time.sleep(0.1)
                continue
            if response.status_code == 502:
                self.tally.add(self.tally.broken, kind)
                continue
            if response.status_code == 503:
                self.tally.add(self.tally.unavailable, kind)
                time.sleep(0.1)
                continue
            if response.status_code == 429:  # a replica's per-client limit: as it says
                time.sleep(float(response.headers.get("Retry-After", "0.5")))
                continue
            assert response.is_success, (kind, path, response.status_code, response.text)
            self.tally.add(self.tally.answered, kind)
            return response
        raise AssertionError(f"{method} {path} failed {RETRIES} times")

    def get(self, path: str, **params: Any) -> Any:
        return self.send("api", "GET", path, params=params or None).json()


def evolink_callback(provider_task_id: str, step: int, fail: bool) -> dict[str, Any]:
    """EvoLink's callback ``step`` of 3: progress 30, progress 70, then completed or failed."""
    body: dict[str, Any] = {
        "created": 1757156493,
        "id": provider_task_id,
        "model": "gpt-image-1.5",
        "object": "image.generation.task",
        "type": "image",
        "progress": (30, 70, 100)[step],
        "status": "processing",
    }
    if step == 2 and fail:
        body.update(
            status="failed",
            progress=0,
            error={"code": "generation_failed", "message": "Image generation failed"},
        )
    elif step == 2:
        body.update(
            status="completed", results=[f"https://files.evolink.example/{provider_task_id}.png"]
        )
    return body


@dataclass(frozen=True)
class Tracked:
    task_id: str
    provider_task_id: str
    callback_path: str
    fail: bool


def track(sender: Sender, run: str, number: int) -> Tracked:
    provider_task_id = f"task-unified-{run}-{number:04d}"
    response = sender.send(
        "track",
        "POST",
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": provider_task_id},
        headers={"Idempotency-Key": f"track-{run}-{number}"},
    )
    task = response.json()
    return Tracked(
        task["id"],
        provider_task_id,
        httpx.URL(task["callback_url"]).raw_path.decode(),
        fail=number % 9 == 4,
    )


def send_callback(sender: Sender, task: Tracked, step: int) -> None:
    body = evolink_callback(task.provider_task_id, step, task.fail)
    sender.send("callback", "POST", task.callback_path, json=body)


def submit(sender: Sender, run: str, provider: str, prompt: str) -> str:
    response = sender.send(
        "submit",
        "POST",
        "/v1/tasks",
        json={"provider": provider, "prompt": prompt},
        headers={"Idempotency-Key": f"submit-{run}-{prompt.split()[0]}"},
    )
    task_id: str = response.json()["id"]
    return task_id


def freeze_holding_leases(
    replica: ServiceProcess, engine: sa.Engine, name: str
) -> tuple[list[Lease], float]:
    """Stop ``replica`` (SIGSTOP) at a moment it holds a poll lease and a delivery lease; its
    leases, and when it was stopped. Frozen, it can neither release nor take a lease once the
    statements it had already sent are done, so what the database then shows is what it holds
    when it is killed (a transaction it left open rolls back with the kill)."""
    busy = sa.text(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = :name AND state = 'active'"
    )
    wanted = {"poll", "delivery"}
    attempts: Counter[str] = Counter()

    def holds() -> list[Lease]:
        return [lease for lease in live_leases(engine) if lease.replica == name]

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        # Frozen only when the database shows both (a poll lease lasts one status query):
        # each freeze costs the replica time, so a loaded machine gets few of them.
        if {lease.kind for lease in holds()} != wanted:
            attempts["looked"] += 1
            time.sleep(0.05)
            continue
        replica.process.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(0.1)  # what it wrote before it froze reaches the database
        with engine.connect() as connection:
            settle = time.monotonic() + 2.0
            while connection.execute(busy, {"name": name}).scalar() and time.monotonic() < settle:
                time.sleep(0.01)
            idle = not connection.execute(busy, {"name": name}).scalar()
        held = holds()
        if idle and {lease.kind for lease in held} == wanted:
            return held, stopped_at
        attempts["frozen busy" if not idle else "frozen without both"] += 1
        replica.process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(
        f"{name} never held a poll lease and a delivery lease at once while idle: {attempts}"
    )


def half_sent_callback(replica: ServiceProcess, task: Tracked, step: int) -> socket.socket:
    """Start a callback straight to ``replica`` and send only half its body: the replica is
    then in the middle of that request (reading its body) until the socket is closed."""
    body = json.dumps(evolink_callback(task.provider_task_id, step, task.fail)).encode()
    head = (
        f"POST {task.callback_path} HTTP/1.1\r\nHost: 127.0.0.1:{replica.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", replica.port), timeout=10)
    connection.sendall(head + body[: len(body) // 2])
    return connection


def finish_dead_request(connection: socket.socket) -> bytes:
    """Send the rest of a half-sent request to a dead replica; what came back (nothing)."""
    answer = b""
    with contextlib.suppress(OSError):
        connection.sendall(b" " * 64)
        answer = connection.recv(4096)
    connection.close()
    return answer


def all_deliveries(sender: Sender, subscription_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 200}
    while True:
        page = sender.get(f"/v1/subscriptions/{subscription_id}/deliveries", **params)
        rows.extend(page["data"])
        if not page["next_cursor"]:
            return rows
        params["cursor"] = page["next_cursor"]


def counted(connection: sa.Connection, query: str) -> Counter[str]:
    """``SELECT key, COUNT(*) ... GROUP BY key`` as a Counter."""
    return Counter({str(key): int(n) for key, n in connection.execute(sa.text(query)).all()})


def unix_time(text: str) -> float:
    """An API timestamp as a Unix time."""
    return datetime.fromisoformat(text).timestamp()


def collapse_repeats(items: list[str]) -> list[str]:
    """``[a, a, b, b, b, c]`` -> ``[a, b, c]``: a redelivery right after its first try."""
    return [item for index, item in enumerate(items) if index == 0 or items[index - 1] != item]


# --- 1. three replicas, one killed mid-run ------------------------------------------------------


def test_three_replicas_one_killed_mid_run_lose_nothing(
    tmp_path: Path,
    database: PostgresDatabase,
    cleanup: contextlib.ExitStack,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = uuid.uuid4().hex[:8]
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    cleanup.callback(sandbox.stop)
    subscriber = SubscriberProcess(tmp_path / "subscriber", hold=HOLD)
    cleanup.callback(subscriber.stop)
    balancer = BalancerProcess(tmp_path / "balancer")
    cleanup.callback(balancer.stop)
    replicas = start_replicas(
        {
            name: replica_environment(database, name, tmp_path, balancer.url, sandbox)
            for name in REPLICAS
        },
        tmp_path,
        cleanup,
    )
    balancer.set_backends([replica.url for replica in replicas.values()])
    victim = replicas[VICTIM]
    engine = sa.create_engine(database.url)
    cleanup.callback(engine.dispose)
    tally = Tally()
    api = Sender(balancer.url, tally)
    cleanup.callback(api.close)

    subscription = api.send(
        "api", "POST", "/v1/subscriptions", json={"url": subscriber.hook_url(PATH)}
    ).json()
    started = time.monotonic()

    # Tracked tasks: SENDERS at a time, each task's callbacks in order. Most of them wait
    # until the kill is near, so callbacks are going out when (and after) it happens.
    armed = threading.Event()
    killed = threading.Event()
    abandoned = threading.Event()  # the test failed: the senders waiting stop at once
    tracked: list[Tracked] = []

    def run_tracked(number: int) -> None:
        if number >= TRACKED * 0.4:
            armed.wait(WAIT)
        if abandoned.is_set():
            return
        sender = Sender(balancer.url, tally)
        try:
            task = track(sender, run, number)
            tracked.append(task)
            for step in range(3):
                time.sleep(CALLBACK_GAP)
                send_callback(sender, task, step)
                if killed.is_set():
                    tally.add(tally.answered, "callback after the kill")
        finally:
            sender.close()

    senders = ThreadPoolExecutor(SENDERS)
    cleanup.callback(senders.shutdown, wait=False, cancel_futures=True)
    cleanup.callback(armed.set)
    cleanup.callback(abandoned.set)
    tracked_done = [senders.submit(run_tracked, number) for number in range(TRACKED)]

    # Submitted tasks, meanwhile: 2 to 4 s each, first asked about after 1.2 s.
    def prompt(number: int) -> str:
        return (
            f"s{number} sandbox:duration={2 + number % 3} sandbox:status_latency={STATUS_LATENCY}"
            + (" sandbox:callback=drop" if number % DROPPED_EVERY == 0 else "")
        )

    with ThreadPoolExecutor(4) as submitters:
        submitted_ids = list(
            submitters.map(lambda n: submit(api, run, "gptimage15", prompt(n)), range(SUBMITTED))
        )
        openai = list(
            submitters.map(
                lambda n: submit(api, run, "openai", f"o{n} sandbox:duration=0.3"), range(OPENAI)
            )
        )
    # Task id -> its callback is dropped.
    submitted = {task_id: n % DROPPED_EVERY == 0 for n, task_id in enumerate(submitted_ids)}

    # More of them until the kill, straight to the survivors (a replica dying between accepting
    # a task and sending it is the second test's subject), so that every replica, the victim
    # too, keeps claiming due tasks and asking about them until the end.
    dripped: list[tuple[int, str]] = []

    def drip() -> None:
        survivors = [Sender(replicas[name].url, tally) for name in REPLICAS if name != VICTIM]
        try:
            for number in range(SUBMITTED, SUBMITTED + MAX_DRIPPED):
                if killed.is_set():
                    return
                sender = survivors[number % len(survivors)]
                dripped.append((number, submit(sender, run, "gptimage15", prompt(number))))
                killed.wait(DRIP)
        finally:
            for sender in survivors:
                sender.close()

    dripper = threading.Thread(target=drip, name="drip")
    dripper.start()
    cleanup.callback(dripper.join, WAIT)
    cleanup.callback(killed.set)

    # Before the kill, every submission has been sent and its reply recorded: a replica that
    # dies between accepting a task and sending it is the second test's subject.
    def sent_and_recorded() -> bool:
        tasks = [api.get(f"/v1/tasks/{task_id}") for task_id in [*submitted, *openai]]
        return all(task["provider_task_id"] or task["status"] in FINAL for task in tasks) and all(
            task["status"] == "succeeded" for task in tasks[SUBMITTED:]
        )

    wait_until(sent_and_recorded, "every submission to be sent and its reply recorded")
    submissions_sent_after = time.monotonic() - started

    # A callback the victim is in the middle of receiving when it dies.
    slow = track(api, run, TRACKED)
    for step in range(2):
        send_callback(api, slow, step)
    half_sent = half_sent_callback(victim, slow, 2)
    cleanup.callback(half_sent.close)

    armed.set()
    orphans, killed_at = freeze_holding_leases(victim, engine, VICTIM)
    victim.stop(signal.SIGKILL)
    killed_after = time.monotonic() - started
    killed.set()
    # What the victim held when it died: nothing can release these now but their expiry.
    orphan_polls = {lease.item: lease for lease in orphans if lease.kind == "poll"}
    orphan_deliveries = {lease.event_id: lease for lease in orphans if lease.kind == "delivery"}
    assert finish_dead_request(half_sent) == b""  # no answer: the sender must retry
    tally.add(tally.broken, "callback")
    send_callback(api, slow, 2)  # through the balancer, to a live replica
    tracked.append(slow)

    for future in tracked_done:
        future.result(timeout=WAIT)
    dripper.join(WAIT)
    submitted |= {task_id: n % DROPPED_EVERY == 0 for n, task_id in dripped}
    every_task = [*(task.task_id for task in tracked), *submitted, *openai]

    def all_final() -> bool:
        unfinished = api.get("/v1/tasks", status="queued,running", limit=200)["data"]
        return not unfinished

    wait_until(all_final, "every task to be final")

    def settled() -> list[dict[str, Any]] | None:
        rows = all_deliveries(api, subscription["id"])
        return rows if rows and all(row["status"] != "pending" for row in rows) else None

    deliveries = wait_until(settled, "every delivery to settle")
    finished_after = time.monotonic() - started

    # --- every task is final with the provider's outcome ----------------------------------------
    tasks = {task_id: api.get(f"/v1/tasks/{task_id}") for task_id in every_task}
    events = {task_id: api.get(f"/v1/tasks/{task_id}/events")["data"] for task_id in every_task}
    for task in tracked:
        outcome = "failed" if task.fail else "succeeded"
        assert tasks[task.task_id]["status"] == outcome, tasks[task.task_id]
        # One event per callback: a retry of one the victim had committed changed nothing.
        types = [event["type"] for event in events[task.task_id]]
        assert types == ["task.submitted", "task.progress", "task.progress", f"task.{outcome}"]
    sandbox_tasks: dict[str, Any] = {str(t["id"]): t for t in sandbox.tasks()}
    for task_id, dropped in submitted.items():
        task = tasks[task_id]
        at_provider = sandbox_tasks[task["provider_task_id"]]
        assert task["status"] == at_provider["final_status"] == "succeeded", task
        assert task["submit_attempts"] == 1  # nothing was submitted twice
        delivered = any(attempt["delivered"] for attempt in at_provider["callbacks"])
        if dropped:
            assert at_provider["callback_state"] == "dropped" and not delivered
            assert task["last_update_source"] == "poll", task
        elif not delivered:
            # Lost to the kill (a 502): polling finished it, unless the victim had committed
            # the callback before it died.
            receipts = api.get(f"/v1/tasks/{task_id}/callbacks")["data"]
            assert task["last_update_source"] == "poll" or receipts, (task, at_provider)
        # No two replicas ever asked about one task at once (an answer takes STATUS_LATENCY).
        times = sorted(query["at"] for query in at_provider["status_query_log"])
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= STATUS_LATENCY - 0.02 for gap in gaps), (task_id, gaps)
    for task_id in openai:
        assert tasks[task_id]["status"] == "succeeded"
        # Its image is in the shared files folder: every live replica serves it.
        path = httpx.URL(tasks[task_id]["images"][0]["url"]).path
        for name, replica in replicas.items():
            if name != VICTIM:
                assert httpx.get(replica.url + path).status_code == 200, (name, path)
    for task_id in orphan_polls:
        assert tasks[task_id]["status"] in FINAL  # taken over once the lease ran out

    # --- every callback was stored, and applied exactly once ----------------------------------
    with engine.connect() as connection:
        receipts = counted(
            connection, "SELECT outcome, COUNT(*) FROM callback_receipt GROUP BY outcome"
        )
        stored_events = connection.execute(sa.text("SELECT COUNT(*) FROM task_event")).scalar()
        status_queries = connection.execute(sa.text("SELECT SUM(poll_count) FROM task")).scalar()
        tracked_receipts = counted(
            connection,
            "SELECT r.outcome, COUNT(*) FROM callback_receipt r JOIN task t ON t.pk = r.task_pk "
            "WHERE t.provider = 'evolink' GROUP BY r.outcome",
        )
    callbacks_answered = tally.answered["callback"]
    assert callbacks_answered == 3 * len(tracked)
    assert tracked_receipts["applied"] == callbacks_answered  # each one changed the task once
    # A callback the victim committed without its answer getting out was sent again: the
    # replica that took the retry recorded it as changing nothing ("terminal" when it was the
    # final one).
    retried = tally.broken["callback"] + tally.unavailable["callback"]
    assert set(tracked_receipts) <= {"applied", "unchanged", "terminal"}, tracked_receipts
    repeats = tracked_receipts["unchanged"] + tracked_receipts["terminal"]
    assert repeats <= retried, (tracked_receipts, tally)
    assert stored_events == sum(len(evs) for evs in events.values())

    # --- every event was delivered, in order per task; duplicates only from the kill ------------
    by_id = {event["id"]: event for evs in events.values() for event in evs}
    assert sorted(row["event_id"] for row in deliveries) == sorted(by_id)  # one each
    coalesced = {row["event_id"] for row in deliveries if row["status"] == "coalesced"}
    assert {row["status"] for row in deliveries} <= {"succeeded", "coalesced"}
    assert all(by_id[event_id]["type"] == "task.progress" for event_id in coalesced)
    # The attempts the victim made were never recorded. The subscriber answers everything
    # 200, so an attempt logged as failed can only be one that got no answer in time (on a
    # loaded machine), and its retry may be a duplicate the subscriber sees.
    retried_deliveries = {
        row["event_id"]: api.get(f"/v1/deliveries/{row['id']}")
        for row in deliveries
        if row["status"] == "succeeded" and row["attempts"] != 1
    }
    with engine.connect() as connection:
        for delivery in retried_deliveries.values():
            delivery_id, log = delivery["id"], delivery["attempt_log"]
            assert log[-1]["status_code"] == 200, log
            # An attempt that got no answer in time is sent again, as it should be. One that
            # was answered is sent again only by a replica that took the delivery over while
            # the first sender still held it unrecorded: a sender stalled past its lease on a
            # loaded machine (its lease renewer stalled with it). So every claim came before
            # the first success was recorded (delivered_at: a later success leaves it); a
            # claim after it is a defect.
            assert all(attempt["status_code"] in {None, 200} for attempt in log), log
            last_claim = connection.execute(LAST_CLAIM, {"id": delivery_id}).scalar_one()
            assert last_claim is not None, log
            assert last_claim <= unix_time(delivery["delivered_at"]) + SLACK, (delivery, last_claim)
    owed = {
        task_id: [event["id"] for event in evs if event["id"] not in coalesced]
        for task_id, evs in events.items()
    }
    owed_ids = {event_id for ids in owed.values() for event_id in ids}

    records = subscriber.requests(PATH)
    secret = subscription["secret"]
    payloads = [Webhook(secret).verify(r["body"], r["headers"]) for r in records]
    received = Counter(payload["id"] for payload in payloads)
    acknowledged = Counter(
        payload["id"]
        for payload, record in zip(payloads, records, strict=True)
        if record["answered"] and record["status"] == 200
    )
    assert set(received) <= owed_ids  # nothing unknown, nothing coalesced was sent
    missing = owed_ids - set(acknowledged)
    assert not missing, f"{len(missing)} events never delivered: {sorted(missing)[:5]}"
    for payload in payloads:
        assert payload["data"] == by_id[payload["id"]]["data"]

    duplicates = {event_id: n for event_id, n in received.items() if n > 1}
    # Only a delivery the victim held when it died goes out twice: once by the victim (before
    # the kill), once by a survivor after the lease ran out, and never while it ran. (Or one
    # whose first attempt is logged as unanswered or as outliving its lease, checked above.)
    unexplained = set(duplicates) - set(orphan_deliveries) - set(retried_deliveries)
    assert not unexplained, (duplicates, orphan_deliveries, retried_deliveries)
    for event_id, lease in orphan_deliveries.items():
        arrivals = [r["at"] for r, p in zip(records, payloads, strict=True) if p["id"] == event_id]
        context = (event_id, arrivals, killed_at, lease)
        assert 1 <= len(arrivals) <= 2, context
        assert arrivals[-1] >= lease.expires_at - SLACK, context  # a survivor, after the lease
        if len(arrivals) == 2:
            assert arrivals[0] <= killed_at + SLACK, context  # the victim, before it froze
    # Per task, in the order of its history: a redelivery comes right after its first try.
    arrived: dict[str, list[str]] = {}
    for payload in payloads:
        arrived.setdefault(payload["data"]["id"], []).append(payload["id"])
    assert {t: collapse_repeats(ids) for t, ids in arrived.items()} == {
        t: ids for t, ids in owed.items() if ids
    }

    # --- the numbers --------------------------------------------------------------------------
    lb = balancer.stats()
    sandbox_callbacks = Counter(
        "dropped"
        if t["callback_state"] == "dropped"
        else "delivered"
        if any(a["delivered"] for a in t["callbacks"])
        else "lost"
        for t in sandbox_tasks.values()
        if t["provider"] == "gptimage15"
    )
    summary = {
        "tasks": {
            "tracked": len(tracked),
            "submitted": f"{len(submitted)} ({SUBMITTED} through the balancer)",
            "openai": len(openai),
            "by status": dict(Counter(task["status"] for task in tasks.values())),
        },
        "callbacks (test as provider)": {
            "sent": tally.sent["callback"],
            "acknowledged": callbacks_answered,
            "502 mid-request (retried)": tally.broken["callback"],
            "no answer/503 (retried)": tally.unavailable["callback"],
            "acknowledged after the kill": tally.answered["callback after the kill"],
        },
        "callbacks (sandbox)": dict(sandbox_callbacks),
        "receipts stored": dict(receipts),
        "status queries": status_queries,
        "balancer": {name: lb.get(replica.url, {}) for name, replica in replicas.items()},
        "victim at kill": {
            "poll leases": len(orphan_polls),
            "delivery leases": len(orphan_deliveries),
        },
        "events stored": stored_events,
        "deliveries": {
            **Counter(row["status"] for row in deliveries),
            "retried after an unanswered attempt": len(retried_deliveries),
        },
        "subscriber": {
            "requests": sum(received.values()),
            "acknowledged": sum(acknowledged.values()),
            "distinct events delivered": len(acknowledged),
            "duplicates": sum(n - 1 for n in duplicates.values()),
            "acknowledged twice": sum(1 for n in acknowledged.values() if n > 1),
        },
        "seconds": {
            "submissions sent": round(submissions_sent_after, 1),
            "kill": round(killed_after, 1),
            "all settled": round(finished_after, 1),
        },
    }
    with capsys.disabled():
        print("\nscale-out:", json.dumps(summary))


# --- 2. a submission a replica accepted but never sent -------------------------------------------

# Holds the "doomed" replica's first submit attempt of a task (the compare-and-set that marks an
# attempt before the request leaves) until the replica is killed: the task is then exactly as a
# replica leaves it when it dies between answering 202 and sending the task to the provider.
HOLD_FIRST_ATTEMPT = (
    """
    CREATE FUNCTION scaleout_hold_first_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF current_setting('application_name') = 'doomed' THEN
            PERFORM pg_sleep(60);
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER scaleout_hold_first_attempt BEFORE UPDATE OF submit_attempts ON task
    FOR EACH ROW WHEN (OLD.submit_attempts = 0 AND NEW.submit_attempts = 1)
    EXECUTE FUNCTION scaleout_hold_first_attempt()
    """,
)
HELD_ATTEMPTS = sa.text(
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'doomed' AND wait_event = 'PgSleep'"
)
# How long the survivor may take to send what the dead replica left unsent: a sweep that waits
# 10 s for a submission's own replica to send it, and runs every second here.
UNSENT_WAIT = 20.0
SUBMIT_SWEEP = "1s"
DOOMED_BACKENDS = sa.text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'doomed'"
)


def strand_two_submissions(
    tmp_path: Path, database: PostgresDatabase, cleanup: contextlib.ExitStack
) -> tuple[dict[str, str], ServiceProcess, SandboxProcess]:
    """Two tasks accepted (202) by a replica that dies before sending either, a survivor
    running since before they existed; the first one's client then sends its request again
    with the same Idempotency-Key, to the survivor (its answer was lost, or it timed out).
    Returns the task ids ("retried", "not retried"), the survivor and the sandbox."""
    engine = sa.create_engine(database.url)
    cleanup.callback(engine.dispose)
    with engine.begin() as connection:
        for statement in HOLD_FIRST_ATTEMPT:
            connection.exec_driver_sql(statement)
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    cleanup.callback(sandbox.stop)
    environments = {
        name: replica_environment(database, name, tmp_path, None, sandbox)
        for name in ("doomed", "survivor")
    }
    for environ in environments.values():
        environ["TASKRELAY_SUBMIT_SWEEP"] = SUBMIT_SWEEP
    replicas = start_replicas(environments, tmp_path, cleanup)
    doomed, survivor = replicas["doomed"], replicas["survivor"]
    bodies = {
        kind: {"provider": "gptimage15", "prompt": f"{kind} sandbox:duration=0.5"}
        for kind in ("retried", "not retried")
    }
    task_ids = {}
    for kind, body in bodies.items():
        response = httpx.post(
            f"{doomed.url}/v1/tasks", json=body, headers={**HEADERS, "Idempotency-Key": kind}
        )
        assert response.status_code == 202, response.text
        task_ids[kind] = response.json()["id"]

    def both_held() -> bool:
        with engine.connect() as connection:
            return len(connection.execute(HELD_ATTEMPTS).all()) == 2

    wait_until(both_held, "both first submit attempts to be held")
    doomed.stop(signal.SIGKILL)
    with engine.connect() as connection:
        connection.execute(DOOMED_BACKENDS)  # its held transactions roll back now
    for task_id in task_ids.values():
        task = httpx.get(f"{survivor.url}/v1/tasks/{task_id}", headers=HEADERS).json()
        assert (task["status"], task["submit_attempts"]) == ("queued", 0), task
    assert sandbox.tasks() == []
    replay = httpx.post(
        f"{survivor.url}/v1/tasks",
        json=bodies["retried"],
        headers={**HEADERS, "Idempotency-Key": "retried"},
    )
    assert replay.status_code == 200, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == task_ids["retried"]
    return task_ids, survivor, sandbox


def task_status(url: str, task_id: str) -> tuple[str, int]:
    task = httpx.get(f"{url}/v1/tasks/{task_id}", headers=HEADERS).json()
    return task["status"], task["submit_attempts"]


def test_a_submission_left_unsent_by_a_dead_replica_is_sent_by_a_live_one(
    tmp_path: Path, database: PostgresDatabase, cleanup: contextlib.ExitStack
) -> None:
    task_ids, survivor, _sandbox = strand_two_submissions(tmp_path, database, cleanup)

    # Soon after the survivor's next look for orphaned submissions, both are sent and done.
    def sent() -> bool:
        return all(task_status(survivor.url, t)[0] in FINAL for t in task_ids.values())

    with contextlib.suppress(AssertionError):
        wait_until(sent, "the survivor to send the tasks", timeout=UNSENT_WAIT)
    statuses = {kind: task_status(survivor.url, task_id) for kind, task_id in task_ids.items()}
    assert statuses == {kind: ("succeeded", 1) for kind in task_ids}, (
        f"not sent while a replica was running: {statuses}"
    )
