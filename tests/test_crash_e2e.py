"""Faults against real processes on the embedded SQLite store (issue 7): TaskRelay SIGKILLed
during a callback load, and a subscriber down for a whole load.

Real processes and real HTTP throughout: ``taskrelay serve`` on a SQLite file in the test's
folder (the default embedded store), a real webhook subscriber (``SubscriberProcess``), and the
test playing EvoLink: it registers tracked tasks (``POST /v1/tasks/track``) and posts each
task's callbacks (progress 30, progress 70, then completed or failed) to the ``callback_url``
TaskRelay handed out, in order, from several threads at once. Like a provider, a sender posts a
callback again until it gets a 2xx: after no answer, a refused connection or any other status.

1. SIGKILL in the middle of the load, while callbacks are in flight (and one is half received).
   While it is down (the senders' connections refused, and retried), the SQLite file it left
   holds everything it acknowledged: the task change, its event, the receipt. Then a new
   process on the same port and the same file takes the rest of the load: every callback is
   applied exactly once (a retry of one the killed process had committed without answering is
   recorded as changing nothing), every event is delivered (signed) at least once, in order
   per task, and an event arrives twice only if the killed process held its delivery (leased,
   as the SQLite file shows after the kill): once from it, once after the lease ran out.
2. The subscriber is down (connections refused) for the whole load; deliveries keep being
   retried on a short schedule long enough that nothing is dead-lettered meanwhile; once it is
   back on the same port, every event owed arrives exactly once per ``webhook-id``, in order
   per task, and nothing else arrives.

Progress deliveries are coalesced by design (README, "Events and webhooks"): a progress event
superseded by a newer event of its task before its first attempt is never sent. "Every event
delivered" therefore means every event whose delivery was not coalesced; a coalesced one must
be a progress event.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import WAIT, ServiceProcess, SubscriberProcess, wait_until
from tests.test_events_e2e import envelope, ok, per_task, verify_all, webhook_id
from tests.test_scaleout_e2e import (
    Tracked,
    collapse_repeats,
    evolink_callback,
    finish_dead_request,
    half_sent_callback,
)

CLIENT = "crash"
TOKEN = "crash-token-0123456789"
SECRET_KEY = "crash-e2e-secret-key-0123456789"
PATH = "/hooks/crash"
FINAL = {"succeeded", "failed", "canceled", "expired"}
STEPS = 3  # callbacks per task: progress 30, progress 70, completed or failed
LEASE = 3.0  # TASKRELAY_POLL_LEASE (delivery leases too): the killed process's expire soon
RETRY_FOR = 2 * WAIT  # how long a sender keeps sending one callback (TaskRelay restarting)
RETRY_PAUSE = 0.05  # seconds between two sends of one callback
SLACK = 1.0  # seconds of scheduling slack when comparing times across processes
CLOCK_SLACK = 0.05  # the same clock, read by two processes

# 1. the crash
CRASH_TASKS = 90
CRASH_SENDERS = 6
CALLBACK_GAP = 0.005  # each sender's pause between two callbacks: a steady load, not a burst
KILL_AFTER = CRASH_TASKS * STEPS // 3  # callbacks acknowledged before the kill
CRASH_SCHEDULE = "0s,500ms,1s,2s,5s,10s,30s"
HOLD = 0.05  # the subscriber answers each delivery after this long (some are in flight)
FREEZE = 5.0  # at most this long frozen before the kill, for every sender to be waiting

# 2. the subscriber outage: retried every second for about two minutes, longer than the outage
OUTAGE_TASKS = 40
OUTAGE_SENDERS = 4
OUTAGE_SCHEDULE = ",".join(["0s", "250ms", "500ms", *["1s"] * 117])
OUTAGE_RETRIES_SEEN = 3  # attempts every head delivery has failed before the subscriber is back


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Whatever a test registers here is stopped after it, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


def relay_environment(data_dir: Path, schedule: str) -> dict[str, str]:
    """The embedded default store (``DATA_DIR/taskrelay.db``), no provider to ask: the tracked
    EvoLink tasks are the test's own, so none is due for a status query during the test."""
    return {
        "TASKRELAY_DATA_DIR": str(data_dir),
        "TASKRELAY_SECRET_KEY": SECRET_KEY,  # both processes must verify the same tokens
        "TASKRELAY_API_TOKENS": f"{CLIENT}:{TOKEN}",
        "TASKRELAY_EVOLINK_TYPICAL_DURATION": "10m",
        "TASKRELAY_POLL_LEASE": f"{LEASE}s",
        "TASKRELAY_SCHEDULER_TICK": "200ms",
        "TASKRELAY_DELIVERY_SCHEDULE": schedule,
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        # The test reads the API far faster than a client should; not what it is about.
        "TASKRELAY_RATE_LIMIT": "0",
    }


def start(service: ServiceProcess) -> ServiceProcess:
    service.wait_ready(timeout=WAIT)
    return service


def restart_service(
    previous: ServiceProcess, environ: dict[str, str], log_path: Path
) -> ServiceProcess:
    """A new ``taskrelay serve`` where ``previous`` (which must have exited) listened: the same
    port (which ``previous`` holds meanwhile, see ``held_port``) and public URL, so the callback
    URLs providers were handed reach it; with the same ``environ`` (data folder, secret key), on
    the same store."""
    assert previous.process.poll() is not None, "stop the previous process first"
    environ = {"TASKRELAY_PUBLIC_URL": previous.url, **environ}
    # ServiceProcess passes a free port of its own; a later --port wins (argparse).
    service = ServiceProcess(environ, "--port", str(previous.port), log_path=log_path)
    service.port, service.url = previous.port, previous.url
    return service


class Api:
    """The test's API client (the URL stays the same across the restart)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30.0
        )

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params or None)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def post(self, path: str, body: dict[str, Any], expected: int) -> Any:
        response = self.http.post(path, json=body)
        assert response.status_code == expected, (path, response.status_code, response.text)
        return response.json()

    def subscribe(self, url: str) -> dict[str, Any]:
        subscription: dict[str, Any] = self.post("/v1/subscriptions", {"url": url}, 201)
        return subscription

    def track(self, service: ServiceProcess, number: int) -> Tracked:
        """A tracked EvoLink task; every ninth fails at the provider."""
        provider_task_id = f"task-unified-crash-{number:04d}"
        task = self.post(
            "/v1/tasks/track", {"provider": "evolink", "provider_task_id": provider_task_id}, 201
        )
        callback_url = httpx.URL(task["callback_url"])
        assert str(callback_url).startswith(f"{service.url}/callbacks/evolink/"), callback_url
        return Tracked(
            task["id"], provider_task_id, callback_url.raw_path.decode(), number % 9 == 4
        )

    def events(self, task_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.get(f"/v1/tasks/{task_id}/events")["data"]
        return events

    def receipts(self, task_id: str) -> list[dict[str, Any]]:
        receipts: list[dict[str, Any]] = self.get(f"/v1/tasks/{task_id}/callbacks")["data"]
        return receipts

    def deliveries(self, subscription_id: str) -> list[dict[str, Any]]:
        """Every delivery of the subscription (all pages), newest first."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 200}
        while True:
            page = self.get(f"/v1/subscriptions/{subscription_id}/deliveries", **params)
            rows.extend(page["data"])
            if not page["next_cursor"]:
                return rows
            params["cursor"] = page["next_cursor"]

    def settled(self, subscription_id: str) -> list[dict[str, Any]]:
        """Every delivery of the subscription, once none is pending any more."""

        def all_settled() -> list[dict[str, Any]] | None:
            rows = self.deliveries(subscription_id)
            return rows if rows and all(row["status"] != "pending" for row in rows) else None

        return wait_until(all_settled, "every delivery to settle")

    def all_final(self, tasks: list[Tracked]) -> dict[str, dict[str, Any]]:
        def final() -> dict[str, dict[str, Any]] | None:
            found = {t.task_id: self.get(f"/v1/tasks/{t.task_id}") for t in tasks}
            return found if all(task["status"] in FINAL for task in found.values()) else None

        return wait_until(final, "every task to be final")


@dataclass(frozen=True)
class Attempt:
    """One send of one callback."""

    task_id: str
    step: int
    outcome: str  # "2xx", "refused" (nothing sent), "no answer", or "HTTP <status>"
    started: float  # time.monotonic()
    ended: float


@dataclass
class Ledger:
    """Every send of every callback, shared by the sender threads."""

    kill_after: int = 0  # acknowledged callbacks that make kill_now fire (0: never)
    attempts: list[Attempt] = field(default_factory=list)
    acknowledged: int = 0
    sending: dict[int, float] = field(default_factory=dict)  # thread -> when its send started
    kill_now: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self) -> float:
        with self.lock:
            now = self.sending[threading.get_ident()] = time.monotonic()
            return now

    def finished(self, attempt: Attempt) -> None:
        with self.lock:
            del self.sending[threading.get_ident()]
        self.add(attempt)

    def in_flight(self, started_before: float = float("inf")) -> int:
        """Sends under way that started before ``started_before``."""
        with self.lock:
            return sum(1 for started in self.sending.values() if started < started_before)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)
            self.acknowledged += attempt.outcome == "2xx"
            if self.kill_after and self.acknowledged >= self.kill_after:
                self.kill_now.set()

    def snapshot(self) -> list[Attempt]:
        with self.lock:
            return list(self.attempts)


class Provider:
    """Plays EvoLink for one sender thread: posts a callback until it gets a 2xx (after no
    answer, a refused connection or any other status it waits a moment and sends it again, for
    as long as TaskRelay may take to come back)."""

    def __init__(self, url: str, ledger: Ledger, abandoned: threading.Event) -> None:
        self.http = httpx.Client(base_url=url, timeout=30.0)
        self.ledger = ledger
        self.abandoned = abandoned  # the test is over (or failed): stop at once

    def close(self) -> None:
        self.http.close()

    def send(self, task: Tracked, step: int) -> None:
        body = evolink_callback(task.provider_task_id, step, task.fail)
        deadline = time.monotonic() + RETRY_FOR
        while not self.abandoned.is_set():
            started = self.ledger.started()
            try:
                response = self.http.post(task.callback_path, json=body)
            except httpx.ConnectError:
                outcome = "refused"
            except httpx.TransportError:
                outcome = "no answer"
            else:
                outcome = "2xx" if response.is_success else f"HTTP {response.status_code}"
            self.ledger.finished(Attempt(task.task_id, step, outcome, started, time.monotonic()))
            if outcome == "2xx":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"callback {step} of {task.task_id}: {outcome} for too long")
            self.abandoned.wait(RETRY_PAUSE)
        raise AssertionError("the test was abandoned")


def run_load(
    tasks: list[Tracked], senders: int, url: str, ledger: Ledger, abandoned: threading.Event
) -> tuple[ThreadPoolExecutor, list[Future[None]]]:
    """``senders`` threads take tasks from a queue and post each one's callbacks in order."""
    queue = deque(tasks)

    def sender() -> None:
        provider = Provider(url, ledger, abandoned)
        try:
            while True:
                try:
                    task = queue.popleft()
                except IndexError:
                    return
                for step in range(STEPS):
                    provider.send(task, step)
                    time.sleep(CALLBACK_GAP)
        finally:
            provider.close()

    pool = ThreadPoolExecutor(senders, thread_name_prefix="provider")
    return pool, [pool.submit(sender) for _ in range(senders)]


def expected_outcome(task: Tracked) -> str:
    return "failed" if task.fail else "succeeded"


def missing_effects(api: Api, task: Tracked, steps: set[int]) -> list[str]:
    """What TaskRelay does not show of the callbacks ``steps`` of ``task``: the task change,
    the event it caused, and the callback's receipt (applied, with the body sent)."""
    problems = []
    current = api.get(f"/v1/tasks/{task.task_id}")
    events = api.events(task.task_id)
    applied = [
        json.loads(receipt["body"])
        for receipt in api.receipts(task.task_id)
        if receipt["outcome"] == "applied"
    ]
    progress = [e["data"]["progress"] for e in events if e["type"] == "task.progress"]
    for step in sorted(steps):
        what = f"{task.task_id} callback {step}"
        if evolink_callback(task.provider_task_id, step, task.fail) not in applied:
            problems.append(f"{what}: no applied receipt")
        if step < 2 and (30, 70)[step] not in progress:
            problems.append(f"{what}: no progress event {(30, 70)[step]} (has {progress})")
        if step == 2:
            outcome = expected_outcome(task)
            if current["status"] != outcome:
                problems.append(f"{what}: task is {current['status']}, not {outcome}")
            if f"task.{outcome}" not in [e["type"] for e in events]:
                problems.append(f"{what}: no task.{outcome} event")
    return problems


def open_store(data_dir: Path) -> contextlib.closing[sqlite3.Connection]:
    """The SQLite file itself, read-only (the embedded default: ``DATA_DIR/taskrelay.db``)."""
    path = data_dir / "taskrelay.db"
    assert path.is_file(), f"no SQLite store at {path}"
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def stored_events(data_dir: Path) -> int:
    with open_store(data_dir) as store:
        (count,) = store.execute("SELECT COUNT(*) FROM task_event").fetchone()
    return int(count)


def leased_deliveries(data_dir: Path) -> dict[str, float]:
    """Deliveries still pending and leased in the SQLite file: event id -> when the lease runs
    out (Unix time). Read after the kill, these are the deliveries the killed process held."""
    with open_store(data_dir) as store:
        rows = store.execute(
            "SELECT e.id, d.lease_expires_at FROM delivery d "
            "JOIN task_event e ON e.seq = d.event_seq "
            "WHERE d.status = 'pending' AND d.lease_owner IS NOT NULL"
        ).fetchall()
    return {
        str(event_id): datetime.fromisoformat(expires).replace(tzinfo=UTC).timestamp()
        for event_id, expires in rows
    }


def missing_in_store(data_dir: Path, tasks: list[Tracked], steps: dict[str, set[int]]) -> list[str]:
    """What the SQLite file does not hold of the callbacks ``steps`` (task id -> steps) of
    ``tasks``: the task change, the event it caused, and the receipt (applied, the body sent)."""
    problems = []
    with open_store(data_dir) as store:
        for task in tasks:
            (pk, status) = store.execute(
                "SELECT pk, status FROM task WHERE id = ?", (task.task_id,)
            ).fetchone()
            events = store.execute(
                "SELECT type, progress FROM task_event WHERE task_pk = ? ORDER BY seq", (pk,)
            ).fetchall()
            applied = [
                json.loads(body)
                for (body,) in store.execute(
                    "SELECT body FROM callback_receipt WHERE task_pk = ? AND outcome = 'applied'",
                    (pk,),
                )
            ]
            for step in sorted(steps.get(task.task_id, ())):
                what = f"{task.task_id} callback {step}"
                if evolink_callback(task.provider_task_id, step, task.fail) not in applied:
                    problems.append(f"{what}: no applied receipt")
                if step < 2 and ("task.progress", (30, 70)[step]) not in events:
                    problems.append(f"{what}: no progress event {(30, 70)[step]} ({events})")
                outcome = expected_outcome(task)
                if step == 2 and (status != outcome or f"task.{outcome}" not in dict(events)):
                    problems.append(f"{what}: task {status}, events {events}")
    return problems


def check_task_histories(
    api: Api, tasks: list[Tracked], attempts: list[Attempt]
) -> tuple[dict[str, list[dict[str, Any]]], Counter[str]]:
    """Every task ended with the provider's outcome, with one event per callback, and every
    callback applied exactly once: a repeat ("unchanged", "terminal") only where a send of it
    got no answer (committed, but the answer was lost). Returns the events per task and the
    receipts' outcomes."""
    final = api.all_final(tasks)
    events: dict[str, list[dict[str, Any]]] = {}
    every_outcome: Counter[str] = Counter()
    for task in tasks:
        outcome = expected_outcome(task)
        current = final[task.task_id]
        assert current["status"] == outcome, current
        if outcome == "succeeded":
            url = f"https://files.evolink.example/{task.provider_task_id}.png"
            assert [image["url"] for image in current["images"]] == [url], current
        history = api.events(task.task_id)
        events[task.task_id] = history
        shape = [(e["type"], e["data"]["progress"]) for e in history[:3]]
        assert shape == [("task.submitted", 0), ("task.progress", 30), ("task.progress", 70)], (
            task.task_id,
            history,
        )
        assert [e["type"] for e in history[3:]] == [f"task.{outcome}"], (task.task_id, history)
        assert history[-1]["data"]["status"] == outcome
        receipts = api.receipts(task.task_id)
        outcomes = Counter(receipt["outcome"] for receipt in receipts)
        every_outcome.update(outcomes)
        assert outcomes["applied"] == STEPS, (task.task_id, receipts)
        assert set(outcomes) <= {"applied", "unchanged", "terminal"}, (task.task_id, receipts)
        sent = [evolink_callback(task.provider_task_id, step, task.fail) for step in range(STEPS)]
        assert all(json.loads(receipt["body"]) in sent for receipt in receipts), receipts
        unanswered = sum(
            1 for a in attempts if a.task_id == task.task_id and a.outcome == "no answer"
        )
        repeats = outcomes["unchanged"] + outcomes["terminal"]
        assert repeats <= unanswered, (task.task_id, receipts, unanswered)
    return events, every_outcome


# --- 1. SIGKILL during a callback load, restart on the same SQLite file ---------------------------


def test_sigkill_during_callback_load_loses_no_acknowledged_callback_and_no_event(
    tmp_path: Path, cleanup: contextlib.ExitStack, capsys: pytest.CaptureFixture[str]
) -> None:
    subscriber = SubscriberProcess(tmp_path / "subscriber", hold=HOLD)
    cleanup.callback(subscriber.stop)
    data_dir = tmp_path / "data"
    environ = relay_environment(data_dir, CRASH_SCHEDULE)
    first = start(ServiceProcess(environ, log_path=tmp_path / "first.log"))
    cleanup.callback(first.stop, signal.SIGKILL)
    api = Api(first.url)
    cleanup.callback(api.close)
    subscription = api.subscribe(subscriber.hook_url(PATH))
    tasks = [api.track(first, number) for number in range(CRASH_TASKS)]
    # One more, whose final callback is half received when the kill comes.
    slow = api.track(first, CRASH_TASKS)
    every_task = [*tasks, slow]

    ledger = Ledger(kill_after=KILL_AFTER)
    abandoned = threading.Event()
    cleanup.callback(abandoned.set)
    provider = Provider(first.url, ledger, abandoned)
    cleanup.callback(provider.close)
    for step in range(2):
        provider.send(slow, step)
    half_sent = half_sent_callback(first, slow, 2)
    cleanup.callback(half_sent.close)
    started = time.monotonic()
    pool, senders = run_load(tasks, CRASH_SENDERS, first.url, ledger, abandoned)
    cleanup.callback(pool.shutdown, wait=False, cancel_futures=True)

    # The kill, once a third of the callbacks are acknowledged: frozen first (SIGSTOP, in
    # whatever it was doing, a commit perhaps) until every sender has a callback in flight,
    # so the SIGKILL certainly cuts some off.
    assert ledger.kill_now.wait(WAIT), "the load never got going"
    first.process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + FREEZE
    while ledger.in_flight() < CRASH_SENDERS and time.monotonic() < deadline:
        time.sleep(0.001)
    killed, killed_at = time.monotonic(), time.time()
    first.stop(signal.SIGKILL)
    assert finish_dead_request(half_sent) == b""  # no answer: EvoLink sends it again
    ledger.add(Attempt(slow.task_id, 2, "no answer", started, killed))
    killed_after = killed - started

    # Down: the senders' connections are refused and they keep trying. Once every send that
    # started before the kill has its outcome, every 2xx so far came from the killed process
    # (the next one is not started yet): each of those callbacks is in the SQLite file it left.
    wait_until(lambda: not ledger.in_flight(started_before=killed), "the cut-off sends to end")
    by_victim: dict[str, set[int]] = {}
    for attempt in ledger.snapshot():
        if attempt.outcome == "2xx":
            by_victim.setdefault(attempt.task_id, set()).add(attempt.step)
    acknowledged_by_victim = sum(len(steps) for steps in by_victim.values())
    problems = missing_in_store(data_dir, every_task, by_victim)
    held = leased_deliveries(data_dir)
    assert not problems, (
        f"{len(problems)} effects of the {acknowledged_by_victim} callbacks the killed process "
        f"acknowledged are missing from its SQLite file: {problems[:10]}"
    )

    # The same port, the same SQLite file; the senders reach it as soon as it listens.
    second = start(restart_service(first, environ, log_path=tmp_path / "second.log"))
    cleanup.callback(second.stop, signal.SIGKILL)
    ready = time.monotonic()
    restarted_after = ready - started
    for sender in senders:
        sender.result(timeout=WAIT * 3)
    provider.send(slow, 2)

    # --- every callback applied exactly once; every task final with the provider's outcome -----
    attempts = ledger.snapshot()
    sent = len(attempts)
    acknowledged = sum(1 for a in attempts if a.outcome == "2xx")
    callbacks = STEPS * len(every_task)
    assert acknowledged == callbacks, (sent, acknowledged, callbacks)
    assert acknowledged_by_victim < callbacks  # the load went on after the restart
    other = Counter(a.outcome for a in attempts if a.outcome not in {"2xx", "no answer"})
    # Refused only while the service was down; no error status but 503 (nothing recorded,
    # retry: the README's "overloaded" or "database unavailable").
    assert set(other) <= {"refused", "HTTP 503"}, other
    refusals = [a for a in attempts if a.outcome == "refused"]
    # Sends the kill cut off (no answer): the half-sent callback, and the senders' own.
    cut_off = [a for a in attempts if a.outcome == "no answer" and a.started < killed]
    assert len(cut_off) > 1, cut_off
    assert all(killed <= a.ended and a.started <= ready for a in refusals), (killed, ready)
    events, receipts = check_task_histories(api, every_task, attempts)
    problems = [problem for task in every_task for problem in missing_effects(api, task, {0, 1, 2})]
    assert not problems, problems

    # --- every event delivered, signed, at least once, in order per task -----------------------
    deliveries = api.settled(subscription["id"])
    settled_after = time.monotonic() - started
    by_id = {event["id"]: event for history in events.values() for event in history}
    stored = stored_events(data_dir)
    assert stored == len(by_id), (stored, len(by_id))  # nothing else in the SQLite file
    assert sorted(row["event_id"] for row in deliveries) == sorted(by_id)  # one delivery each
    coalesced = {row["event_id"] for row in deliveries if row["status"] == "coalesced"}
    assert {row["status"] for row in deliveries} <= {"succeeded", "coalesced"}, Counter(
        row["status"] for row in deliveries
    )
    assert all(by_id[event_id]["type"] == "task.progress" for event_id in coalesced)
    owed = {
        task_id: [event["id"] for event in history if event["id"] not in coalesced]
        for task_id, history in events.items()
    }
    owed_ids = {event_id for ids in owed.values() for event_id in ids}
    # An attempt logged as failed can only be one that got no answer in time (the subscriber
    # answers 200): it was sent again, as it should be, and may be a duplicate.
    retried = {
        row["event_id"]: api.get(f"/v1/deliveries/{row['id']}")["attempt_log"]
        for row in deliveries
        if row["status"] == "succeeded" and row["attempts"] != 1
    }
    for log in retried.values():
        assert [a["status_code"] for a in log[:-1]] == [None] * (len(log) - 1), log
        assert log[-1]["status_code"] == 200, log

    records = subscriber.requests(PATH)
    assert len(subscriber.requests()) == len(records)  # nothing anywhere else
    payloads = verify_all(subscription["secret"], records)
    received = Counter(payload["id"] for payload in payloads)
    delivered = Counter(webhook_id(record) for record in ok(records))
    duplicates = sum(received.values()) - len(received)
    counts = (
        f"sent {callbacks} callbacks ({sent} posts, {len(refusals)} refused while down), "
        f"acknowledged {acknowledged}, stored {stored} events, "
        f"delivered {len(delivered)} distinct event ids, duplicates {duplicates}"
    )
    assert set(received) <= owed_ids, counts  # nothing unknown, nothing coalesced
    missing = owed_ids - set(delivered)
    assert not missing, f"{len(missing)} events never delivered ({counts}): {sorted(missing)[:5]}"
    for payload in payloads:
        assert payload == envelope(by_id[payload["id"]])
    # A second arrival only for a delivery the killed process held (leased) when it died: once
    # from it before the kill, once from the new process after the lease ran out. (Or for one
    # whose attempt is logged as unanswered: it was sent again, as it should be.)
    arrivals: dict[str, list[float]] = {}
    for record in records:
        arrivals.setdefault(webhook_id(record), []).append(record["at"])
    twice = {event_id: times for event_id, times in arrivals.items() if len(times) > 1}

    def redelivered_after_the_kill(event_id: str, times: list[float]) -> bool:
        return (
            event_id in held
            and len(times) == 2
            and times[0] <= killed_at + SLACK
            and times[1] >= held[event_id] - CLOCK_SLACK
        )

    unexplained = {
        event_id: times
        for event_id, times in twice.items()
        if event_id not in retried and not redelivered_after_the_kill(event_id, times)
    }
    assert not unexplained, (counts, unexplained, killed_at, held)
    # Per task, in the order of its history (a redelivery right after its first try).
    arrived = per_task(payloads)
    assert {t: collapse_repeats(ids) for t, ids in arrived.items()} == {
        t: ids for t, ids in owed.items() if ids
    }, counts

    summary = {
        "tasks": len(every_task),
        "by status": dict(Counter(expected_outcome(task) for task in every_task)),
        "callbacks": {
            "posts": sent,
            "acknowledged": acknowledged,
            "acknowledged by the killed process": acknowledged_by_victim,
            "cut off by the kill (no answer; the half-sent one too)": len(cut_off),
            "refused while down": len(refusals),
            "receipts": dict(receipts),
        },
        "events": {"stored": stored, "coalesced": len(coalesced), "owed": len(owed_ids)},
        "subscriber": {
            "requests": len(records),
            "delivered (distinct event ids)": len(delivered),
            "duplicates": duplicates,
            "retried after an unanswered attempt": len(retried),
            "deliveries the killed process held": len(held),
        },
        "seconds": {
            "kill": round(killed_after, 1),
            "ready again": round(restarted_after, 1),
            "all settled": round(settled_after, 1),
        },
    }
    with capsys.disabled():
        print(f"\ncrash (SQLite): {counts}")
        print("crash (SQLite) details:", json.dumps(summary))


# --- 2. the subscriber down for the whole load, then back ----------------------------------------


def test_subscriber_down_for_the_whole_load_gets_every_event_once_when_back(
    tmp_path: Path, cleanup: contextlib.ExitStack, capsys: pytest.CaptureFixture[str]
) -> None:
    subscriber = SubscriberProcess(tmp_path / "subscriber")
    cleanup.callback(subscriber.stop)
    data_dir = tmp_path / "data"
    environ = relay_environment(data_dir, OUTAGE_SCHEDULE)
    service = start(ServiceProcess(environ, log_path=tmp_path / "relay.log"))
    cleanup.callback(service.stop, signal.SIGKILL)
    api = Api(service.url)
    cleanup.callback(api.close)
    subscription = api.subscribe(subscriber.hook_url(PATH))
    subscriber.stop()  # down: every connection is refused
    started = time.monotonic()

    tasks = [api.track(service, number) for number in range(OUTAGE_TASKS)]
    ledger = Ledger()
    abandoned = threading.Event()
    cleanup.callback(abandoned.set)
    pool, senders = run_load(tasks, OUTAGE_SENDERS, service.url, ledger, abandoned)
    cleanup.callback(pool.shutdown, wait=False, cancel_futures=True)
    for sender in senders:
        sender.result(timeout=WAIT * 3)
    attempts = ledger.snapshot()
    outcomes = Counter(a.outcome for a in attempts)
    assert outcomes["2xx"] == STEPS * len(tasks), outcomes
    assert set(outcomes) <= {"2xx", "HTTP 503"}, outcomes  # 503: nothing recorded, retry
    events, receipts = check_task_histories(api, tasks, attempts)
    by_id = {event["id"]: event for history in events.values() for event in history}
    assert stored_events(data_dir) == len(by_id)

    # Down for a while: each task's first event (task.submitted) has failed several attempts,
    # the rest of the task's events wait behind it; nothing was dead-lettered, nothing arrived.
    first_events = {history[0]["id"] for history in events.values()}

    def retried_while_down() -> list[dict[str, Any]] | None:
        rows = api.deliveries(subscription["id"])
        heads = [row for row in rows if row["event_id"] in first_events]
        ready = len(heads) == len(tasks) and all(
            row["status"] != "pending" or row["attempts"] >= OUTAGE_RETRIES_SEEN for row in heads
        )
        return rows if ready else None

    deliveries = wait_until(retried_while_down, "every task's first delivery to fail a few times")
    statuses = Counter(row["status"] for row in deliveries)
    assert set(statuses) <= {"pending", "coalesced"}, statuses  # none dead-lettered
    for row in deliveries:
        if row["attempts"]:
            assert row["last_status_code"] is None and "ConnectError" in row["last_error"], row
    assert subscriber.requests() == []
    down_for = time.monotonic() - started

    # Back, on the same port.
    subscriber.start()
    deliveries = api.settled(subscription["id"])
    back_after = time.monotonic() - started
    statuses = Counter(row["status"] for row in deliveries)
    coalesced = {row["event_id"] for row in deliveries if row["status"] == "coalesced"}
    assert set(statuses) <= {"succeeded", "coalesced"}, statuses
    assert sorted(row["event_id"] for row in deliveries) == sorted(by_id)  # one delivery each
    assert all(by_id[event_id]["type"] == "task.progress" for event_id in coalesced)
    owed = {
        task_id: [event["id"] for event in history if event["id"] not in coalesced]
        for task_id, history in events.items()
    }
    owed_ids = {event_id for ids in owed.values() for event_id in ids}

    records = subscriber.requests()
    payloads = verify_all(subscription["secret"], records)
    received = Counter(webhook_id(record) for record in records)
    duplicates = sum(received.values()) - len(received)
    counts = (
        f"sent {STEPS * len(tasks)} callbacks ({len(attempts)} posts), "
        f"acknowledged {outcomes['2xx']}, stored {len(by_id)} events "
        f"({len(coalesced)} coalesced), delivered {len(received)} distinct event ids, "
        f"duplicates {duplicates}"
    )
    # Exactly once per event id, nothing else, every request answered 200, in order per task.
    assert {record["path"] for record in records} <= {PATH}, counts
    assert received == Counter(dict.fromkeys(owed_ids, 1)), (
        counts,
        {event_id: n for event_id, n in received.items() if n > 1},
        sorted(owed_ids - set(received))[:5],
    )
    assert len(ok(records)) == len(records), counts
    assert per_task(payloads) == {t: ids for t, ids in owed.items() if ids}, counts
    for payload in payloads:
        assert payload == envelope(by_id[payload["id"]])
    # Each delivery's log: refused connections while down, then one success.
    failed_attempts = 0
    for row in deliveries:
        if row["status"] != "succeeded":
            continue
        log = api.get(f"/v1/deliveries/{row['id']}")["attempt_log"]
        assert [a["status_code"] for a in log] == [None] * (len(log) - 1) + [200], log
        assert all("ConnectError" in a["error"] for a in log[:-1]), log
        failed_attempts += len(log) - 1

    summary = {
        "tasks": len(tasks),
        "deliveries": dict(statuses),
        "receipts": dict(receipts),
        "refused attempts while down": failed_attempts,
        "seconds": {"down": round(down_for, 1), "all delivered": round(back_after, 1)},
    }
    with capsys.disabled():
        print(f"\nsubscriber outage (SQLite): {counts}")
        print("subscriber outage (SQLite) details:", json.dumps(summary))
