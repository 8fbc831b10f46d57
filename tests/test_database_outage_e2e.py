"""The database briefly unavailable, end to end (issue 7): PostgreSQL is stopped and started
again, twice, while a real ``taskrelay serve`` process takes a steady load of provider
callbacks.

Real processes and real HTTP throughout: a PostgreSQL server of the test's own
(:class:`tests.servers.PrivatePostgres`: the shared server other tests use must never be
stopped), the provider sandbox, a webhook subscriber, and TaskRelay on that PostgreSQL. The test
plays EvoLink for tracked tasks, as ``tests/test_scaleout_e2e.py`` does: one thread registers
tasks (``POST /v1/tasks/track``, with an Idempotency-Key) and keeps a few ready; several senders
each take one and send its three callbacks in order (progress 30, progress 70, then completed or
failed), then take the next. Like a provider (and a client), a sender sends a request again when
it got no 2xx (a 5xx, or no answer at all), honouring ``Retry-After`` when there is one. Every
attempt's body carries a nonce of its own, so the stored receipts show exactly which attempts
were recorded. Meanwhile a prober asks ``/readyz`` and ``/healthz`` ten times a second.
Mid-load, PostgreSQL is stopped: first with ``pg_ctl stop -m fast`` (sessions ended, open
transactions rolled back), and after the service has recovered, with ``-m immediate`` (a crash:
the server recovers from its WAL at the next start). It stays down a few seconds each time, then
starts again.

What must hold:

* while the database is down (a request sent after the stop returned and answered before the
  start began), every callback and API call answers 503 ``store_unavailable`` with a JSON error
  and a ``Retry-After`` of a whole number of seconds, never a 2xx and never a 500;
  ``/readyz`` answers 503 and ``/healthz`` 200 (the process is alive: restarting it would not
  help). At no time does anything answer other than 2xx or 503;
* after the start, ``/readyz`` turns 200 and stays so, and from then on callbacks are
  acknowledged again: the connection pool recovers by itself;
* every acknowledged (2xx) callback attempt is stored, with the outcome its answer announced;
  the only attempts stored without a 2xx are ones whose answer was a 503 or never came (the
  commit went through, the answer did not); each callback changed its task exactly once;
* senders retrying, every task ends in the provider's final state with exactly its four events;
  tasks submitted to the sandbox with their callbacks dropped (some due for a status query
  during the first outage) are finished by polling (the scheduler and submitter survived);
* every event is delivered to the subscriber, signed (the dispatcher survived), and none is
  dead-lettered;
* the process never exits, its log is JSON lines only (no bare tracebacks), says in words that
  the database is unavailable, and carries no stack trace.

The private server needs the PostgreSQL server binaries (``initdb``, ``pg_ctl``) and, when the
tests run as root, a ``postgres`` OS user to run them as; without those the test is skipped. It
does not need ``TASKRELAY_TEST_DATABASE_URL``: it never touches the shared server, so it runs in
SQLite-only runs too, wherever the binaries are installed (``initdb`` costs about a second).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from service.db import migrate
from tests.servers import (
    PrivatePostgres,
    SandboxProcess,
    ServiceProcess,
    SubscriberProcess,
    wait_until,
)
from tests.test_scaleout_e2e import evolink_callback

TOKEN = "outage-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SECRET_KEY = "outage-e2e-secret-key-0123456789"
SENDERS = 6  # tracked tasks in flight at once
CALLBACK_GAP = 0.03  # seconds between one task's callbacks
RETRY_PAUSE = 0.2  # a sender's wait before sending again, when the answer names none
DOWN_FOR = 3.0  # seconds PostgreSQL stays down, at least
ACKED_BETWEEN = 90  # callbacks acknowledged before the first outage and after each recovery
OUTAGES = ("fast", "immediate")  # pg_ctl stop modes, one outage each
FAIL_EVERY = 7  # every seventh tracked task fails at the provider
POLLED_BEFORE = 3  # sandbox tasks (callbacks dropped) submitted just before the first outage
POLLED_AFTER = 2  # and after the last recovery
PATH = "/hooks/outage"
FINAL = ("succeeded", "failed", "canceled", "expired")
WAIT = 60.0  # the most any single condition may take, even on a loaded 2-core machine
ANSWER_WITHIN = 15.0  # generous: a request must never hang while the database is down
# The log tells of an outage in words (warnings), never in stack traces or errors. (A readiness
# probe whose ping passed just before the stop and whose schema query failed right after used to
# log a traceback: found by this test.)
TRACEBACKS_MAX = 0
ERROR_LINES_MAX = 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    reason = PrivatePostgres.unavailable()
    if reason is not None:
        pytest.skip(f"no private PostgreSQL server for the outage test: {reason}")
    server = PrivatePostgres()
    try:
        migrate(server.url)
        yield server
    finally:
        server.destroy()


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Whatever a test registers here is stopped after it, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


# --- what the test's own clients saw --------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One request, as its sender saw it (times from ``time.monotonic``)."""

    kind: str  # "callback", "track", "api", "readyz", "healthz"
    sent_at: float
    answered_at: float
    status: int | None  # None: no answer (a transport error)
    body: Any = None  # the JSON answer, when there was one
    retry_after: str | None = None
    task: int | None = None  # tracked task number
    step: int | None = None  # callback step
    nonce: str | None = None  # the callback attempt's own marker, in its body


@dataclass
class Journal:
    """Every request the test made, for checking afterwards (shared by threads)."""

    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def of(self, *kinds: str) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.kind in kinds]


def call(
    http: httpx.Client,
    journal: Journal,
    kind: str,
    method: str,
    path: str,
    **options: Any,
) -> Attempt:
    """One request, journalled; never raises for an HTTP or transport failure."""
    marks = {k: options.pop(k) for k in ("task", "step", "nonce") if k in options}
    sent_at = time.monotonic()
    try:
        response = http.request(method, path, timeout=ANSWER_WITHIN, **options)
    except httpx.TransportError:
        attempt = Attempt(kind, sent_at, time.monotonic(), None, **marks)
    else:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        attempt = Attempt(
            kind,
            sent_at,
            time.monotonic(),
            response.status_code,
            body,
            response.headers.get("Retry-After"),
            **marks,
        )
    journal.add(attempt)
    return attempt


def pause_after(attempt: Attempt) -> float:
    if attempt.retry_after is not None:
        with contextlib.suppress(ValueError):
            return max(float(attempt.retry_after), RETRY_PAUSE)
    return RETRY_PAUSE


def until_acknowledged(
    http: httpx.Client,
    journal: Journal,
    give_up: threading.Event,
    kind: str,
    method: str,
    path: str,
    **options: Any,
) -> Attempt:
    """Send until a 2xx, as a provider or a client does after a 5xx or no answer (the checks
    afterwards report any answer but a 2xx or a 503); a 4xx is final. A callback gets a fresh
    nonce each time, so each attempt can be told apart in what is stored. Stops (raises) when
    ``give_up`` is set: the test has failed."""
    deadline = time.monotonic() + WAIT
    while not give_up.is_set():
        if kind == "callback":
            nonce = uuid.uuid4().hex
            options["nonce"] = nonce
            options["json"] = {**options["json"], "attempt": nonce}
        attempt = call(http, journal, kind, method, path, **dict(options))
        if attempt.status is not None and attempt.status < 500:
            return attempt
        if time.monotonic() > deadline:
            raise AssertionError(f"{kind} {path} not acknowledged within {WAIT} s: {attempt}")
        give_up.wait(pause_after(attempt))
    raise AssertionError("given up: the test failed")


@dataclass(frozen=True)
class Outage:
    mode: str
    stopping_at: float  # pg_ctl stop about to run: the server may go down from here on
    down_from: float  # pg_ctl stop had returned: the server is down
    down_until: float  # pg_ctl start not yet begun: the server is still down
    green_at: float  # the first 200 from /readyz after the start


def inside(attempt: Attempt, outage: Outage) -> bool:
    """Sent after the server was down and answered before it started again."""
    return attempt.sent_at >= outage.down_from and attempt.answered_at <= outage.down_until


def overlaps(attempt: Attempt, outage: Outage) -> bool:
    return attempt.answered_at >= outage.stopping_at and attempt.sent_at <= outage.green_at


def is_unavailable(attempt: Attempt) -> bool:
    """A 503 with TaskRelay's JSON error saying the database is unavailable."""
    if attempt.status != 503 or not isinstance(attempt.body, dict):
        return False
    error = attempt.body.get("error")
    return (
        isinstance(error, dict)
        and error.get("code") == "store_unavailable"
        and bool(error.get("message"))
        and attempt.retry_after is not None
        and attempt.retry_after.isdigit()
        and int(attempt.retry_after) >= 1
    )


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tracked:
    number: int
    task_id: str
    provider_task_id: str
    fail: bool


def relay_environment(
    postgres: PrivatePostgres, directory: Path, sandbox: SandboxProcess
) -> dict[str, str]:
    return {
        "TASKRELAY_DATABASE_URL": postgres.url,
        "TASKRELAY_DATA_DIR": str(directory / "data"),
        "TASKRELAY_SECRET_KEY": SECRET_KEY,
        "TASKRELAY_API_TOKENS": f"outage:{TOKEN}",
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "TASKRELAY_SCHEDULER_TICK": "200ms",
        "TASKRELAY_POLL_GRACE": "200ms",
        # Leases held when the database went away run out soon after it is back.
        "TASKRELAY_POLL_LEASE": "3s",
        "TASKRELAY_DELIVERY_SCHEDULE": "0s,500ms,1s,2s,5s,10s",
        "TASKRELAY_GPTIMAGE15_TYPICAL_DURATION": "1s",
        # Tracked EvoLink tasks are the test's own: the sandbox never issued their ids, so
        # they must not be asked about during the test.
        "TASKRELAY_EVOLINK_TYPICAL_DURATION": "10m",
        "TASKRELAY_SUBMIT_BACKOFF": "100ms",
        # The test polls far faster than a client should; not what it is about.
        "TASKRELAY_RATE_LIMIT": "0",
        **sandbox.provider_environment(),
    }


def rows(engine: sa.Engine, query: str) -> list[sa.Row[Any]]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text(query)).all())


def test_callbacks_during_a_database_outage_answer_503_and_nothing_acknowledged_is_lost(
    tmp_path: Path,
    postgres: PrivatePostgres,
    cleanup: contextlib.ExitStack,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    cleanup.callback(sandbox.stop)
    subscriber = SubscriberProcess(tmp_path / "subscriber")
    cleanup.callback(subscriber.stop)
    relay = ServiceProcess(
        relay_environment(postgres, tmp_path, sandbox), log_path=tmp_path / "relay.log"
    )
    cleanup.callback(relay.stop, signal.SIGKILL)  # a no-op once it has exited
    relay.wait_ready(timeout=WAIT)
    engine = sa.create_engine(postgres.url.replace("postgresql://", "postgresql+psycopg://"))
    cleanup.callback(engine.dispose)
    journal = Journal()
    api = httpx.Client(base_url=relay.url, headers=HEADERS)
    cleanup.callback(api.close)

    created = api.post("/v1/subscriptions", json={"url": subscriber.hook_url(PATH)})
    assert created.status_code == 201, created.text
    subscription = created.json()

    # --- the prober: /readyz and /healthz, ten times a second, all along ----------------------
    probing = threading.Event()
    probing.set()

    def probe() -> None:
        with httpx.Client(base_url=relay.url) as http:
            while probing.is_set():
                call(http, journal, "readyz", "GET", "/readyz")
                call(http, journal, "healthz", "GET", "/healthz")
                time.sleep(0.1)

    prober = threading.Thread(target=probe, name="prober")
    prober.start()
    cleanup.callback(prober.join, WAIT)
    cleanup.callback(probing.clear)

    # --- the test as EvoLink: a registrar, and senders of callbacks ------------------------------
    # The registrar keeps a few registered tasks ready; each sender takes one, sends its three
    # callbacks in order, then takes the next. So callbacks keep coming while registrations are
    # refused, and a task waiting for its callbacks never holds up the others for long.
    waiting: queue.Queue[tuple[Tracked, str]] = queue.Queue(maxsize=2 * SENDERS)
    registering = threading.Event()  # cleared: the registrar stops, senders drain the queue
    registering.set()
    tracked: list[Tracked] = []

    def register() -> None:
        with httpx.Client(base_url=relay.url, headers=HEADERS) as http:
            for number in itertools.count():
                if not registering.is_set():
                    return
                provider_task_id = f"task-unified-{run}-{number:05d}"
                registered = until_acknowledged(
                    http,
                    journal,
                    give_up,
                    "track",
                    "POST",
                    "/v1/tasks/track",
                    json={"provider": "evolink", "provider_task_id": provider_task_id},
                    headers={"Idempotency-Key": f"track-{run}-{number}"},
                    task=number,
                )
                assert registered.status == 201, registered
                task = Tracked(
                    number,
                    registered.body["id"],
                    provider_task_id,
                    fail=number % FAIL_EVERY == FAIL_EVERY - 1,
                )
                tracked.append(task)
                path = httpx.URL(registered.body["callback_url"]).raw_path.decode()
                while not give_up.is_set():
                    with contextlib.suppress(queue.Full):
                        waiting.put((task, path), timeout=0.1)
                        break

    def send_callbacks(registrar: Future[None]) -> None:
        with httpx.Client(base_url=relay.url, headers=HEADERS) as http:
            while not give_up.is_set():
                try:
                    task, path = waiting.get(timeout=0.1)
                except queue.Empty:
                    if registrar.done():
                        return  # nothing more will come
                    continue
                for step in range(3):
                    time.sleep(CALLBACK_GAP)
                    answer = until_acknowledged(
                        http,
                        journal,
                        give_up,
                        "callback",
                        "POST",
                        path,
                        json=evolink_callback(task.provider_task_id, step, task.fail),
                        task=task.number,
                        step=step,
                    )
                    assert answer.status == 200, answer

    give_up = threading.Event()  # set: the test failed, every thread stops at once
    workers = ThreadPoolExecutor(SENDERS + 1, thread_name_prefix="evolink")
    cleanup.callback(workers.shutdown, wait=True)
    cleanup.callback(give_up.set)
    registrar = workers.submit(register)
    sending = [registrar, *(workers.submit(send_callbacks, registrar) for _ in range(SENDERS))]

    def acknowledged_callbacks() -> int:
        return sum(1 for a in journal.of("callback") if a.status == 200)

    def more_acknowledged(than: int) -> bool:
        for future in sending:
            if future.done():
                future.result()  # a sender that died: its error, now
                raise AssertionError("a sender or the registrar stopped early")
        return acknowledged_callbacks() >= than + ACKED_BETWEEN

    # --- tasks only polling can finish (their callbacks are dropped) -----------------------------
    def submit_polled(count: int, label: str) -> list[str]:
        ids = []
        for n in range(count):
            answer = until_acknowledged(
                api,
                journal,
                give_up,
                "api",
                "POST",
                "/v1/tasks",
                json={
                    "provider": "gptimage15",
                    "prompt": f"{label}{n} sandbox:duration=1 sandbox:callback=drop",
                },
                headers={"Idempotency-Key": f"{run}-{label}-{n}"},
            )
            assert answer.status == 202, answer
            ids.append(answer.body["id"])

        def sent() -> bool:
            return all(
                api.get(f"/v1/tasks/{task_id}").json()["provider_task_id"] for task_id in ids
            )

        wait_until(sent, f"the {label} submissions to be sent to the sandbox")
        return ids

    # --- the outages ------------------------------------------------------------------------------
    wait_until(lambda: more_acknowledged(0), "callbacks to be acknowledged before the outage")
    polled = submit_polled(POLLED_BEFORE, "before")  # due for a status query while it is down
    outages: list[Outage] = []
    api_while_down: list[Attempt] = []
    for mode in OUTAGES:
        stopping_at = time.monotonic()
        postgres.stop(mode)
        down_from = time.monotonic()
        api_while_down.append(call(api, journal, "api", "GET", "/v1/tasks"))
        api_while_down.append(
            call(api, journal, "api", "GET", f"/v1/tasks/{tracked[0].task_id}/events")
        )

        def felt(since: float = down_from) -> bool:
            """Down long enough and seen to be down; fails at once on a wrong answer."""
            sent = [a for a in journal.of("callback", "track") if a.sent_at >= since]
            wrong = [a for a in sent if not is_unavailable(a)]
            assert not wrong, f"{len(wrong)} wrong answers with PostgreSQL down: {wrong[:3]}"
            probes = [a for a in journal.of("readyz") if a.sent_at >= since]
            assert all(a.status == 503 for a in probes), f"/readyz not red: {probes[:3]}"
            refused = [a for a in sent if a.kind == "callback"]
            down_long_enough = time.monotonic() - since >= DOWN_FOR
            return down_long_enough and len(refused) >= SENDERS and bool(probes)

        wait_until(felt, f"callbacks and /readyz to answer 503 with PostgreSQL down ({mode})")
        assert relay.process.poll() is None, f"taskrelay exited during the outage:\n{relay.logs()}"
        down_until = time.monotonic()
        postgres.start()

        def green(since: float = down_until) -> float | None:
            probes = journal.of("readyz")
            return next(
                (a.answered_at for a in probes if a.sent_at >= since and a.status == 200), None
            )

        green_at = wait_until(green, f"/readyz to answer 200 once PostgreSQL is back ({mode})")
        outages.append(Outage(mode, stopping_at, down_from, down_until, green_at))
        wait_until(
            functools.partial(more_acknowledged, acknowledged_callbacks()),
            f"callbacks to be acknowledged again ({mode})",
        )

    polled += submit_polled(POLLED_AFTER, "after")
    registering.clear()
    for future in sending:
        future.result(timeout=WAIT)
    probing.clear()
    prober.join(WAIT)
    assert relay.process.poll() is None, f"taskrelay exited:\n{relay.logs()}"

    # --- settled: every task final, every delivery done -------------------------------------------
    task_ids = [task.task_id for task in tracked] + polled

    def all_final() -> bool:
        statuses = rows(engine, "SELECT status FROM task")
        return len(statuses) == len(task_ids) and all(row.status in FINAL for row in statuses)

    wait_until(all_final, "every task to be final")

    def deliveries_settled() -> list[sa.Row[Any]] | None:
        found = rows(
            engine,
            "SELECT d.status, e.id AS event_id FROM delivery d "
            "JOIN task_event e ON e.seq = d.event_seq",
        )
        return found if found and all(row.status != "pending" for row in found) else None

    deliveries = wait_until(deliveries_settled, "every delivery to settle")
    finished_after = time.monotonic() - started

    # --- what was answered, and when --------------------------------------------------------------
    callbacks = journal.of("callback")
    requests = journal.of("callback", "track", "api")
    probes = {kind: journal.of(kind) for kind in ("readyz", "healthz")}
    # Nothing but a 2xx or TaskRelay's JSON 503, ever; every request answered (within
    # ANSWER_WITHIN: the client's timeout), and liveness never wavered.
    bad = [a for a in [*requests, *probes["readyz"]] if a.status not in {200, 201, 202, 503}]
    bad += [a for a in requests if a.status == 503 and not is_unavailable(a)]
    bad += [a for a in probes["readyz"] if a.status == 503 and a.body["status"] != "unavailable"]
    bad += [a for a in probes["healthz"] if a.status != 200]
    assert not bad, f"{len(bad)} unexpected answers: {bad[:5]}"
    for outage in outages:
        during = [a for a in requests if inside(a, outage)]
        assert during, outage
        acknowledged = [a for a in during if a.status is not None and a.status < 300]
        assert not acknowledged, f"acknowledged with the database down: {acknowledged[:5]}"
        assert all(is_unavailable(a) for a in during), [a for a in during if a.status != 503][:5]
        ready = [a for a in probes["readyz"] if inside(a, outage)]
        assert ready and all(a.status == 503 for a in ready), (outage, ready[:5])
        assert all(a.body.get("status") == "unavailable" for a in ready), ready[:3]
    for attempt in api_while_down:
        assert is_unavailable(attempt), attempt
    # Green stays green: from the first 200 after a start until the next stop, /readyz says 200
    # and callbacks are acknowledged (the pool let go of its dead connections by itself).
    for index, outage in enumerate(outages):
        next_stop = outages[index + 1].stopping_at if index + 1 < len(outages) else math.inf
        after = [
            a
            for a in [*probes["readyz"], *callbacks]
            if a.sent_at >= outage.green_at and a.answered_at < next_stop
        ]
        assert after and all(a.status == 200 for a in after), [a for a in after if a.status != 200][
            :5
        ]
    # Before the first stop, nothing was refused either.
    before = [a for a in [*requests, *probes["readyz"]] if a.answered_at < outages[0].stopping_at]
    assert all(a.status is not None and a.status < 300 for a in before), before[:5]

    # --- every acknowledged callback is stored, as announced; each applied once ---------------
    receipts = rows(
        engine,
        "SELECT t.id AS task_id, r.outcome, r.body FROM callback_receipt r "
        "JOIN task t ON t.pk = r.task_pk",
    )
    stored = {json.loads(bytes(r.body))["attempt"]: (r.task_id, r.outcome) for r in receipts}
    assert len(stored) == len(receipts)  # no attempt stored twice
    sent = {a.nonce: a for a in callbacks}
    assert set(stored) <= set(sent)
    by_number = {task.number: task for task in tracked}
    lost = []
    for attempt in callbacks:
        if attempt.status == 200:
            assert attempt.nonce is not None and attempt.task is not None
            expected = (by_number[attempt.task].task_id, attempt.body["outcome"])
            if stored.get(attempt.nonce) != expected:
                lost.append((attempt, stored.get(attempt.nonce)))
    assert not lost, f"{len(lost)} acknowledged callbacks not stored as announced: {lost[:5]}"
    unanswered_but_stored = [sent[nonce] for nonce in stored if sent[nonce].status != 200]
    assert all(a.status in {None, 503} for a in unanswered_but_stored), unanswered_but_stored
    applied = Counter(
        (sent[nonce].task, sent[nonce].step)
        for nonce, (_, outcome) in stored.items()
        if outcome == "applied"
    )
    assert set(applied.values()) == {1}, {k: n for k, n in applied.items() if n != 1}
    assert set(applied) == {(task.number, step) for task in tracked for step in range(3)}
    assert {outcome for _, outcome in stored.values()} <= {"applied", "unchanged", "terminal"}

    # --- every task final with the provider's outcome, with exactly its events ----------------
    states = {
        row.id: row for row in rows(engine, "SELECT id, status, last_update_source FROM task")
    }
    events: dict[str, list[tuple[str, str]]] = {}
    for row in rows(
        engine,
        "SELECT t.id AS task_id, e.id, e.type FROM task_event e "
        "JOIN task t ON t.pk = e.task_pk ORDER BY e.seq",
    ):
        events.setdefault(row.task_id, []).append((row.id, row.type))
    for task in tracked:
        outcome = "failed" if task.fail else "succeeded"
        assert states[task.task_id].status == outcome, (task, states[task.task_id])
        types = [kind for _, kind in events[task.task_id]]
        assert types == ["task.submitted", "task.progress", "task.progress", f"task.{outcome}"]
    for task_id in polled:
        assert states[task_id].status == "succeeded", states[task_id]
        assert states[task_id].last_update_source == "poll", states[task_id]
    assert set(states) == set(task_ids)

    # --- every event delivered to the subscriber, signed; none dead-lettered ----------------------
    every_event = {event_id: kind for evs in events.values() for event_id, kind in evs}
    assert sorted(row.event_id for row in deliveries) == sorted(every_event)  # one each
    assert {row.status for row in deliveries} <= {"succeeded", "coalesced"}, Counter(
        row.status for row in deliveries
    )
    coalesced = {row.event_id for row in deliveries if row.status == "coalesced"}
    assert all(every_event[event_id] == "task.progress" for event_id in coalesced)
    owed = set(every_event) - coalesced
    records = subscriber.requests(PATH)
    payloads = [Webhook(subscription["secret"]).verify(r["body"], r["headers"]) for r in records]
    received = Counter(payload["id"] for payload in payloads)
    delivered = {
        payload["id"]
        for payload, record in zip(payloads, records, strict=True)
        if record["answered"] and record["status"] == 200
    }
    # Nothing unknown was sent. (A progress event may arrive and still be listed "coalesced":
    # its attempt went out as the database went away, so it was never recorded, and a later
    # event of its task superseded it before its lease ran out.)
    assert set(received) <= set(every_event), set(received) - set(every_event)
    missing = owed - delivered
    assert not missing, f"{len(missing)} events never delivered: {sorted(missing)[:5]}"

    # --- the process and its log -----------------------------------------------------------------
    assert relay.process.poll() is None, "taskrelay exited"
    log_text = relay.logs()
    lines = [line for line in log_text.splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(
                f"a log line that is not JSON (a bare traceback?): {line!r}"
            ) from None
    said_unavailable = [e for e in entries if "database is unavailable" in e["message"].lower()]
    assert said_unavailable, "no log line says the database is unavailable"
    with_traceback = [e for e in entries if "exception" in e]
    shown = [(e["message"], e["exception"][-400:]) for e in with_traceback[:5]]
    assert len(with_traceback) <= TRACEBACKS_MAX, shown
    errors = [e for e in entries if e["level"] in {"error", "critical"}]
    assert len(errors) <= ERROR_LINES_MAX, [e["message"] for e in errors[:10]]

    # --- the numbers ------------------------------------------------------------------------------
    summary = {
        "outages": [
            {
                "mode": outage.mode,
                "down s": round(outage.down_until - outage.down_from, 1),
                "green after start s": round(outage.green_at - outage.down_until, 2),
                "callbacks 503": sum(
                    1 for a in callbacks if a.status == 503 and overlaps(a, outage)
                ),
            }
            for outage in outages
        ],
        "tracked tasks": len(tracked),
        "polled tasks": len(polled),
        "callbacks": {
            "sent": len(callbacks),
            "acknowledged (2xx)": sum(1 for a in callbacks if a.status == 200),
            "503": sum(1 for a in callbacks if a.status == 503),
            "no answer": sum(1 for a in callbacks if a.status is None),
            "stored": len(stored),
            "stored without a 2xx": len(unanswered_but_stored),
            "stored by outcome": dict(Counter(outcome for _, outcome in stored.values())),
        },
        "track calls": dict(Counter(str(a.status) for a in journal.of("track"))),
        "readyz": dict(Counter(str(a.status) for a in probes["readyz"])),
        "events": len(every_event),
        "deliveries": dict(Counter(row.status for row in deliveries)),
        "delivered (distinct events)": len(delivered),
        "subscriber requests": sum(received.values()),
        "received though coalesced": len(set(received) & coalesced),
        "log": {
            "lines": len(entries),
            "warnings": sum(1 for e in entries if e["level"] == "warning"),
            "errors": len(errors),
            "tracebacks": [e["message"] for e in with_traceback],
            "say database unavailable": len(said_unavailable),
        },
        "seconds": round(finished_after, 1),
    }
    with capsys.disabled():
        print("\ndatabase outage:", json.dumps(summary))
