"""Event forwarding end to end: real ``taskrelay serve`` processes (sandbox mounted), a real
subscriber (Starlette on uvicorn, in a process of its own, see ``SubscriberProcess``), real HTTP
both ways, and signatures checked with the stock ``standardwebhooks`` verifier.

Covered: fan-out to a subscription (order per task, exactly once, webhook-id == event id), a
task's own notify_url, a subscriber that is down for the whole load (dead letters, manual retry,
replay), TaskRelay killed in the middle of a delivery and restarted on the same database, the
SSRF guard at registration with the default (empty) allowed networks, and the SSE stream.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.servers import ServiceProcess, SubscriberProcess, wait_until

TOKENS = {
    name: f"{name}-token-0123456789"
    for name in ("fanout", "notify", "outage", "restart", "slow", "ssrf", "stream")
}
# Six attempts, 1.6 s from the first to the last: a dead subscriber is dead-lettered quickly.
SCHEDULE = "0s,100ms,200ms,300ms,500ms,500ms"
SCHEDULE_WAITS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.5]
FAST = "x sandbox:duration=0.3"
FINAL = {"succeeded", "failed", "canceled", "expired"}
LEASE = 3.0  # TASKRELAY_POLL_LEASE (delivery leases too) of the processes that get killed


# --- helpers --------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def relay_environment(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TASKRELAY_DATA_DIR": str(data_dir),
        "TASKRELAY_API_TOKENS": ",".join(f"{name}:{tok}" for name, tok in TOKENS.items()),
        "TASKRELAY_SANDBOX": "true",
        "TASKRELAY_SUBMIT_BACKOFF": "50ms",
        "TASKRELAY_DELIVERY_SCHEDULE": SCHEDULE,
        "TASKRELAY_SCHEDULER_TICK": "100ms",
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        **extra,
    }


def start_relay(directory: Path, name: str, environ: dict[str, str]) -> ServiceProcess:
    directory.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(environ, log_path=directory / f"{name}.log")
    try:
        service.wait_ready()
    except BaseException:
        service.stop(signal.SIGKILL)
        raise
    return service


class Api:
    """One API client of a TaskRelay process, over real HTTP."""

    def __init__(
        self, relay: ServiceProcess, client: str, cleanup: contextlib.ExitStack | None = None
    ) -> None:
        self.http = httpx.Client(
            base_url=relay.url, headers={"Authorization": f"Bearer {TOKENS[client]}"}, timeout=10
        )
        if cleanup is not None:
            cleanup.callback(self.close)

    def close(self) -> None:
        self.http.close()

    def subscribe(self, url: str, **body: Any) -> dict[str, Any]:
        response = self.http.post("/v1/subscriptions", json={"url": url, **body})
        assert response.status_code == 201, response.text
        subscription: dict[str, Any] = response.json()
        assert subscription["secret"].startswith("whsec_")
        return subscription

    def submit(self, provider: str, prompt: str = FAST, **body: Any) -> str:
        response = self.http.post(
            "/v1/tasks", json={"provider": provider, "prompt": prompt, **body}
        )
        assert response.status_code == 202, response.text
        task_id: str = response.json()["id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def events(self, task_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/tasks/{task_id}/events")
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["data"]
        return events

    def deliveries(self, subscription_id: str, status: str | None = None) -> list[dict[str, Any]]:
        """Every delivery of the subscription (all pages), newest first."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 200}
        if status:
            params["status"] = status
        while True:
            response = self.http.get(
                f"/v1/subscriptions/{subscription_id}/deliveries", params=params
            )
            assert response.status_code == 200, response.text
            page = response.json()
            rows.extend(page["data"])
            if not page["next_cursor"]:
                return rows
            params["cursor"] = page["next_cursor"]

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/deliveries/{delivery_id}")
        assert response.status_code == 200, response.text
        delivery: dict[str, Any] = response.json()
        return delivery

    def wait_final(self, task_ids: list[str]) -> list[dict[str, Any]]:
        def final() -> list[dict[str, Any]] | None:
            tasks = [self.task(task_id) for task_id in task_ids]
            return tasks if all(task["status"] in FINAL for task in tasks) else None

        tasks = wait_until(final, f"tasks {task_ids} to be final")
        assert [task["status"] for task in tasks] == ["succeeded"] * len(task_ids), tasks
        return tasks

    def wait_settled(self, subscription_id: str) -> list[dict[str, Any]]:
        """Every delivery of the subscription, once none is pending any more."""

        def settled() -> list[dict[str, Any]] | None:
            rows = self.deliveries(subscription_id)
            return rows if rows and all(row["status"] != "pending" for row in rows) else None

        return wait_until(settled, f"the deliveries of {subscription_id} to settle")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("relay")
    service = start_relay(directory, "relay", relay_environment(directory / "data"))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def subscriber(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubscriberProcess]:
    process = SubscriberProcess(tmp_path_factory.mktemp("subscriber"))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Whatever a test registers here is closed or stopped after it, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


def webhook_id(record: dict[str, Any]) -> str:
    value: str = record["headers"]["webhook-id"]
    return value


def ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests answered 2xx to a client that was still there to read the answer."""
    return [r for r in records if r["answered"] and 200 <= r["status"] < 300]


def verify_all(secret: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check each request with the stock Standard Webhooks verifier; return the payloads."""
    payloads = []
    for record in records:
        payload: dict[str, Any] = Webhook(secret).verify(record["body"], record["headers"])
        assert payload["id"] == webhook_id(record)
        assert record["headers"]["content-type"] == "application/json"
        payloads.append(payload)
    return payloads


def envelope(event: dict[str, Any]) -> dict[str, Any]:
    """What a subscriber receives for an event listed by GET /v1/tasks/{id}/events."""
    return {k: event[k] for k in ("id", "type", "timestamp", "data")}


def per_task(payloads: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Event ids in arrival order, per task."""
    grouped: dict[str, list[str]] = {}
    for payload in payloads:
        grouped.setdefault(payload["data"]["id"], []).append(payload["id"])
    return grouped


# --- 1. fan-out to a subscription -----------------------------------------------------------------


def test_subscriber_gets_every_event_signed_in_order_exactly_once(
    relay: ServiceProcess, subscriber: SubscriberProcess, cleanup: contextlib.ExitStack
) -> None:
    api = Api(relay, "fanout", cleanup)
    path = "/hooks/fanout"
    subscription = api.subscribe(subscriber.hook_url(path))
    task_ids = [api.submit("gptimage15"), api.submit("evolink")]
    api.wait_final(task_ids)
    deliveries = api.wait_settled(subscription["id"])

    coalesced = {d["event_id"] for d in deliveries if d["status"] == "coalesced"}
    events = {task_id: api.events(task_id) for task_id in task_ids}
    by_id = {e["id"]: e for task_events in events.values() for e in task_events}
    owed = {
        task_id: [e["id"] for e in evs if e["id"] not in coalesced]
        for task_id, evs in events.items()
    }
    # Only progress events are ever superseded; every other delivery succeeded at once.
    assert all(by_id[event_id]["type"] == "task.progress" for event_id in coalesced)
    assert {d["status"] for d in deliveries} <= {"succeeded", "coalesced"}
    assert all(
        d["attempts"] == 1 and d["last_status_code"] == 200
        for d in deliveries
        if d["status"] == "succeeded"
    )
    assert sorted(d["event_id"] for d in deliveries) == sorted(by_id)

    records = subscriber.requests(path)
    payloads = verify_all(subscription["secret"], records)
    # Every request was a success: nothing was sent twice, nothing owed is missing.
    assert len(ok(records)) == len(records) == sum(len(ids) for ids in owed.values())
    assert Counter(webhook_id(r) for r in records) == Counter(
        {i: 1 for ids in owed.values() for i in ids}
    )
    # Per task, in the order of its history: task.submitted first, task.succeeded last.
    assert per_task(payloads) == owed
    for task_id in task_ids:
        types = [by_id[event_id]["type"] for event_id in owed[task_id]]
        assert types[0] == "task.submitted" and types[-1] == "task.succeeded", types
    # The body is exactly the event as the API lists it (and the task as it was then).
    for payload in payloads:
        assert payload == envelope(by_id[payload["id"]])
    final = {
        payload["data"]["id"]: payload
        for payload in payloads
        if payload["type"] == "task.succeeded"
    }
    for task_id in task_ids:
        assert final[task_id]["data"] == api.task(task_id)
    # Another secret does not verify.
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(records[0]["body"], records[0]["headers"])


# --- 2. a task's own notify_url -------------------------------------------------------------------


def test_notify_url_gets_only_its_tasks_events(
    relay: ServiceProcess, subscriber: SubscriberProcess, cleanup: contextlib.ExitStack
) -> None:
    api = Api(relay, "notify", cleanup)
    paths = {"a": "/notify/task-a", "c": "/notify/task-c"}
    tasks = {
        "a": api.submit("apiinone", notify_url=subscriber.hook_url(paths["a"])),
        "b": api.submit("openai"),  # no notify_url: its events go nowhere
        "c": api.submit("grsai", notify_url=subscriber.hook_url(paths["c"])),
    }
    api.wait_final(list(tasks.values()))
    secret = api.http.get("/v1/notify-secret").json()["secret"]
    assert secret.startswith("whsec_")

    def final_event_arrived(path: str) -> Callable[[], bool]:
        def arrived() -> bool:
            records = ok(subscriber.requests(path))
            return any(json.loads(r["body"])["type"] == "task.succeeded" for r in records)

        return arrived

    for name in ("a", "c"):
        task_id = tasks[name]
        # Delivered in order, so the final event arriving means everything before it settled.
        wait_until(final_event_arrived(paths[name]), f"task {name}'s final event at its notify_url")
        records = subscriber.requests(paths[name])
        payloads = verify_all(secret, records)
        assert {p["data"]["id"] for p in payloads} == {task_id}
        events = api.events(task_id)
        received = [p["id"] for p in payloads]
        assert len(ok(records)) == len(records) == len(set(received))
        # Every event of the task, in order; only a progress event may have been coalesced.
        assert received == [e["id"] for e in events if e["id"] in set(received)]
        skipped = [e["type"] for e in events if e["id"] not in set(received)]
        assert set(skipped) <= {"task.progress"}, skipped
        assert payloads[0]["type"] == "task.submitted" and payloads[-1]["type"] == "task.succeeded"
        assert payloads == [envelope(e) for e in events if e["id"] in set(received)]
    all_notified = {
        json.loads(r["body"])["data"]["id"]
        for r in subscriber.requests()
        if r["path"].startswith("/notify/")
    }
    assert tasks["b"] not in all_notified


# --- 3. the subscriber is down for the whole load -------------------------------------------------


def test_subscriber_down_dead_letters_then_retry_and_replay_deliver(
    relay: ServiceProcess, tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    api = Api(relay, "outage", cleanup)
    receiver = SubscriberProcess(tmp_path / "outage")
    cleanup.callback(receiver.stop)
    subscription = api.subscribe(receiver.hook_url("/hooks/outage"))
    receiver.stop()  # down: every connection is refused
    task_ids = [api.submit("apiinone"), api.submit("evolink")]
    api.wait_final(task_ids)

    # The schedule runs out: every owed delivery is dead-lettered, visibly.
    deliveries = api.wait_settled(subscription["id"])
    events = {task_id: api.events(task_id) for task_id in task_ids}
    by_id = {e["id"]: e for evs in events.values() for e in evs}
    coalesced = {d["event_id"] for d in api.deliveries(subscription["id"], "coalesced")}
    assert all(by_id[event_id]["type"] == "task.progress" for event_id in coalesced)
    owed = {t: [e["id"] for e in evs if e["id"] not in coalesced] for t, evs in events.items()}
    owed_ids = {i for ids in owed.values() for i in ids}
    dead = api.deliveries(subscription["id"], "dead")
    assert {d["event_id"] for d in dead} == owed_ids
    assert len(dead) == len(owed_ids)
    assert len(deliveries) == len(dead) + len(coalesced)
    for row in dead:
        assert row["attempts"] == len(SCHEDULE_WAITS)
        assert row["last_status_code"] is None
        assert "ConnectError" in row["last_error"], row
        assert row["next_attempt_at"] is None and row["delivered_at"] is None
    # The attempts followed the schedule (never early).
    log = api.delivery(dead[0]["id"])["attempt_log"]
    assert len(log) == len(SCHEDULE_WAITS)
    assert all(a["status_code"] is None and a["error"] for a in log)
    times = [parse_time(a["attempted_at"]) for a in log]
    for wait, earlier, later in zip(SCHEDULE_WAITS[1:], times, times[1:], strict=False):
        assert (later - earlier).total_seconds() >= wait - 0.005
    assert receiver.requests() == []

    # Up again. A manual retry sends each dead delivery again: exactly once each. Retried
    # oldest first: a retried delivery waits only for earlier *pending* ones of its task, so
    # retrying a task's later event before its earlier one would deliver them out of order.
    receiver.start()
    for row in reversed(dead):  # the listing is newest first
        retried = api.http.post(f"/v1/deliveries/{row['id']}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["status"] == "pending" and retried.json()["attempts"] == 0
        assert retried.json()["event_id"] == row["event_id"]
    api.wait_settled(subscription["id"])
    assert api.deliveries(subscription["id"], "dead") == []
    records = receiver.requests()
    payloads = verify_all(subscription["secret"], records)
    assert len(ok(records)) == len(records)
    assert Counter(webhook_id(r) for r in records) == Counter(dict.fromkeys(owed_ids, 1))
    assert per_task(payloads) == owed
    for row in dead:
        detail = api.delivery(row["id"])
        assert detail["status"] == "succeeded" and detail["attempts"] == 1
        codes = [a["status_code"] for a in detail["attempt_log"]]
        assert codes == [None] * len(SCHEDULE_WAITS) + [200]  # the old attempts stay logged

    # Replay owes the subscription every event since it was created once more (coalesced
    # progress events included), with the same event ids, in order per task.
    replayed = api.http.post(
        f"/v1/subscriptions/{subscription['id']}/replay",
        json={"since": subscription["created_at"]},
    )
    assert replayed.status_code == 202, replayed.text
    assert replayed.json() == {"replayed": len(by_id)}
    api.wait_settled(subscription["id"])
    records = receiver.requests()
    payloads = verify_all(subscription["secret"], records)
    assert len(ok(records)) == len(records) == len(owed_ids) + len(by_id)
    counts = Counter(webhook_id(r) for r in records)
    assert counts == Counter({i: (2 if i in owed_ids else 1) for i in by_id})
    replay_payloads = payloads[len(owed_ids) :]
    assert per_task(replay_payloads) == {t: [e["id"] for e in evs] for t, evs in events.items()}
    for payload in replay_payloads:
        assert payload == envelope(by_id[payload["id"]])
    rows = api.deliveries(subscription["id"])
    assert Counter(d["status"] for d in rows) == Counter(
        {"succeeded": len(owed_ids) + len(by_id), "coalesced": len(coalesced)}
    )


# --- 4. TaskRelay killed in the middle of a delivery ----------------------------------------------


def test_restart_mid_delivery_redelivers_with_the_same_webhook_id(
    tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    receiver = SubscriberProcess(tmp_path / "subscriber", hold=20.0)  # answers only when told
    cleanup.callback(receiver.stop)
    environ = relay_environment(
        tmp_path / "data",
        TASKRELAY_SECRET_KEY="events-e2e-secret-key-0123456789",
        TASKRELAY_POLL_LEASE=f"{LEASE}s",
    )
    path = "/hooks/restart"
    first = start_relay(tmp_path, "first", environ)
    cleanup.callback(first.stop, signal.SIGKILL)
    api = Api(first, "restart", cleanup)
    subscription = api.subscribe(receiver.hook_url(path))
    task_ids = [api.submit("gptimage15"), api.submit("openai")]
    api.wait_final(task_ids)  # every event is stored; the first of each task is in flight

    def both_arrived() -> list[dict[str, Any]] | None:
        found = receiver.requests(path)
        return found if len(found) >= 2 else None

    held = wait_until(both_arrived, "both tasks' first deliveries to reach the subscriber")
    # Order per task: nothing else goes out while each task's first event is unanswered.
    assert len(held) == 2
    assert {json.loads(r["body"])["type"] for r in held} == {"task.submitted"}
    in_flight = {webhook_id(r) for r in held}
    pending = api.deliveries(subscription["id"], "pending")
    assert {d["event_id"] for d in pending} >= in_flight
    first.stop(signal.SIGKILL)
    killed_at = time.time()
    # Killed within the lease, so the first process never sent anything twice itself (see
    # the lease test below for what happens when an attempt outlasts the lease).
    assert len(receiver.requests(path)) == 2, "the kill came after the lease ran out"
    receiver.configure(hold=0.0)  # the subscriber now answers at once

    second = start_relay(tmp_path, "second", environ)  # same database, same secret key
    cleanup.callback(second.stop)
    api = Api(second, "restart", cleanup)
    deliveries = api.wait_settled(subscription["id"])
    events = {task_id: api.events(task_id) for task_id in task_ids}
    by_id = {e["id"]: e for evs in events.values() for e in evs}
    coalesced = {d["event_id"] for d in deliveries if d["status"] == "coalesced"}
    assert all(by_id[i]["type"] == "task.progress" for i in coalesced)
    owed = {t: [e["id"] for e in evs if e["id"] not in coalesced] for t, evs in events.items()}
    assert {d["status"] for d in deliveries} <= {"succeeded", "coalesced"}

    records = receiver.requests(path)
    verify_all(subscription["secret"], records)  # the same subscription secret, after restart
    # The two held requests were never answered to TaskRelay; each was sent again, with the
    # same webhook-id, once the crashed process's lease ran out.
    assert [r["answered"] for r in records[:2]] == [False, False]
    counts = Counter(webhook_id(r) for r in ok(records))
    assert counts == Counter({i: 1 for ids in owed.values() for i in ids})  # nothing lost
    assert len(records) == len(counts) + 2
    for event_id in in_flight:
        sent = [r for r in records if webhook_id(r) == event_id]
        assert len(sent) == 2 and not sent[0]["answered"] and sent[1]["answered"]
        assert sent[1]["at"] >= killed_at
        assert sent[1]["at"] - sent[0]["at"] >= LEASE - 0.5  # not before the lease ran out
        (row,) = [d for d in deliveries if d["event_id"] == event_id]
        detail = api.delivery(row["id"])
        # The killed attempt was never recorded: one attempt, the successful one.
        assert detail["status"] == "succeeded"
        assert [a["status_code"] for a in detail["attempt_log"]] == [200]
    assert per_task(verify_all(subscription["secret"], ok(records))) == owed


def test_an_attempt_slower_than_the_lease_is_not_sent_again_meanwhile(
    tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    receiver = SubscriberProcess(tmp_path / "subscriber", hold=1.5)  # a slow subscriber
    cleanup.callback(receiver.stop)
    environ = relay_environment(tmp_path / "data", TASKRELAY_POLL_LEASE="500ms")
    service = start_relay(tmp_path, "slow", environ)
    cleanup.callback(service.stop, signal.SIGKILL)  # no need to wait for attempts in flight
    api = Api(service, "slow", cleanup)
    subscription = api.subscribe(receiver.hook_url("/hooks/slow"))
    task_id = api.submit("openai")
    first_event = api.events(task_id)[0]["id"]

    def first_settled() -> list[dict[str, Any]]:
        rows = api.deliveries(subscription["id"])
        return [d for d in rows if d["event_id"] == first_event and d["status"] != "pending"]

    (row,) = wait_until(first_settled, "the first delivery to be answered")
    sent = [r for r in receiver.requests() if webhook_id(r) == first_event]
    attempts = api.delivery(row["id"])["attempt_log"]
    # One attempt at a time: the slow answer arrives, and only then is anything recorded.
    assert (len(sent), len(attempts)) == (1, 1), [(r["n"], r["at"]) for r in sent]


# --- 5. SSRF: internal destinations are refused by default ----------------------------------------


def test_internal_destinations_are_refused_without_allowed_networks(
    tmp_path: Path, subscriber: SubscriberProcess, cleanup: contextlib.ExitStack
) -> None:
    environ = relay_environment(tmp_path / "data")
    del environ["TASKRELAY_WEBHOOK_ALLOWED_NETWORKS"]  # the default: public addresses only
    service = start_relay(tmp_path, "ssrf", environ)
    cleanup.callback(service.stop)
    api = Api(service, "ssrf", cleanup)
    received_before = len(subscriber.requests())
    port = subscriber.port  # a live server: a refusal here is the guard, not a dead port
    urls = [
        f"http://127.0.0.1:{port}/x",
        "http://10.0.0.1/x",
        "http://169.254.169.254/x",
        f"http://[::1]:{port}/x",
        f"http://localhost:{port}/x",  # a name that resolves to loopback
    ]
    for url in urls:
        response = api.http.post("/v1/subscriptions", json={"url": url})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == "destination_not_allowed", (url, error)
        assert error["details"][0]["field"] == "url"
        notify = api.http.post(
            "/v1/tasks", json={"provider": "evolink", "prompt": FAST, "notify_url": url}
        )
        assert notify.status_code == 400, (url, notify.text)
        assert notify.json()["error"]["code"] == "destination_not_allowed"
        assert notify.json()["error"]["details"][0]["field"] == "notify_url"
    assert api.http.get("/v1/subscriptions").json()["data"] == []
    assert api.http.get("/v1/tasks").json()["data"] == []  # no task was created either
    # A task of this client runs to the end; nothing ever reaches the subscriber.
    api.wait_final([api.submit("evolink")])
    assert len(subscriber.requests()) == received_before
    assert [r for r in subscriber.requests() if r["path"] == "/x"] == []


# --- 6. the live stream over real HTTP ------------------------------------------------------------


def read_stream(api: Api, task_id: str, **headers: str) -> list[dict[str, str]]:
    """The frames of GET /v1/tasks/{id}/stream, until the server ends the stream."""
    frames: list[dict[str, str]] = []
    block: dict[str, str] = {}
    with api.http.stream(
        "GET", f"/v1/tasks/{task_id}/stream", headers=headers, timeout=httpx.Timeout(15.0)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if block:
                    frames.append(block)
                    block = {}
            elif not line.startswith(":"):  # comments are keep-alives
                key, _, value = line.partition(":")
                block[key] = value.removeprefix(" ")
    if block:
        frames.append(block)
    return frames


def test_stream_starts_with_the_state_and_ends_after_the_final_event(
    relay: ServiceProcess, cleanup: contextlib.ExitStack
) -> None:
    api = Api(relay, "stream", cleanup)
    task_id = api.submit("evolink", "x sandbox:duration=5")
    started = time.monotonic()
    frames = read_stream(api, task_id)
    assert time.monotonic() - started < 15.0
    assert frames[0] == {"retry": "2000"}
    state, *live = frames[1:]
    assert state["event"] == "task.state"
    current = json.loads(state["data"])
    assert current["type"] == "task.state" and current["data"]["id"] == task_id
    assert current["data"]["status"] in {"queued", "running"}  # it completed while we watched
    events = api.events(task_id)
    ids = [e["id"] for e in events]
    after = ids.index(state["id"]) + 1 if "id" in state else 0
    # Then each later event, as webhooks carry it, and nothing after the final one.
    assert [frame["id"] for frame in live] == ids[after:]
    assert [frame["event"] for frame in live] == [e["type"] for e in events[after:]]
    assert [json.loads(frame["data"]) for frame in live] == [envelope(e) for e in events[after:]]
    assert live and live[-1]["event"] == "task.succeeded"
    assert api.task(task_id)["status"] == "succeeded"

    # Reconnecting with Last-Event-ID resumes after that event and ends at the final one.
    resumed = read_stream(api, task_id, **{"Last-Event-ID": ids[0]})
    assert [frame.get("id") for frame in resumed[1:]] == ids[1:]
    # A stream opened on a finished task is just its state.
    done = read_stream(api, task_id)
    assert [frame.get("event") for frame in done[1:]] == ["task.state"]
    assert json.loads(done[1]["data"])["data"]["status"] == "succeeded"
