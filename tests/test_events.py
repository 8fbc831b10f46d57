"""Event forwarding through the real app and database: subscriptions, Standard Webhooks
signatures (checked with the stock `standardwebhooks` verifier), order per task, retries on a
fake clock, dead letters, manual retry, replay, notify_url, secret rotation, the SSE stream.

Subscribers here are an in-process recording app behind the dispatcher's transport seam; the
end-to-end file runs real subscriber servers over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import ingest, outbox
from service.db import make_engine
from service.lifecycle import TaskUpdate
from service.models import TaskOrigin, TaskStatus, UpdateSource, UTCDateTime, utcnow
from service.netguard import AddressPolicy
from service.outbox import (
    _DELIVERY_ROW_KEYS,
    DISABLED_PUT_OFF,
    MOVE_ASIDE_FULL_EVERY,
    MOVE_ASIDE_OVERLAP,
    AttemptResult,
    Outbox,
    _add_client_secrets,
    _client_secret_rows,
    delivery_row,
    plan_deliveries,
)
from service.runtime import Runtime
from service.schemas import isoformat
from service.signing import new_webhook_secret
from service.store import Store
from tests.conftest import (
    ALICE,
    BOB,
    auth,
    error_code,
    make_settings,
    query_plan,
    serving,
    until,
)
from tests.test_callbacks import DONE
from tests.test_scheduler import FakeClock

HOOK = "http://127.0.0.1:9/hooks/{name}"


class Receiver:
    """Subscriber endpoints at /hooks/{name}: records every request, answers ``status`` with
    ``body``."""

    def __init__(self) -> None:
        self.received: dict[str, list[tuple[dict[str, str], bytes]]] = defaultdict(list)
        self.answered: dict[str, list[int]] = defaultdict(list)
        self.status: dict[str, int] = defaultdict(lambda: 200)
        self.body: dict[str, bytes] = defaultdict(bytes)
        self.hold: dict[str, asyncio.Event] = {}

        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            body = await request.body()
            self.received[name].append((dict(request.headers), body))
            status = self.status[name]
            self.answered[name].append(status)
            if name in self.hold:
                await self.hold[name].wait()
            return Response(self.body[name], status_code=status)

        self.app = Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received[name]]


class Harness:
    def __init__(
        self, app: Starlette, client: httpx.AsyncClient, clock: FakeClock, receiver: Receiver
    ) -> None:
        self.app = app
        self.client = client
        self.clock = clock
        self.receiver = receiver
        self.runtime: Runtime = app.state.runtime

    async def subscribe(self, name: str, token: str = ALICE, **body: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/subscriptions", json={"url": HOOK.format(name=name), **body}, headers=auth(token)
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def track(self, token: str = ALICE, **body: Any) -> str:
        response = await self.client.post(
            "/v1/tasks/track", json={"provider": "evolink", **body}, headers=auth(token)
        )
        assert response.status_code == 201, response.text
        task_id: str = response.json()["id"]
        return task_id

    def update(self, task_id: str, status: TaskStatus, progress: int | None = None) -> None:
        images = ({"url": "https://cdn.example/1.png"},) if status is TaskStatus.succeeded else ()
        self.runtime.store.apply_update(
            task_id, TaskUpdate(status=status, progress=progress, images=images), UpdateSource.poll
        )

    async def deliver(self) -> int:
        return await self.runtime.dispatcher.run_until_idle()


@contextlib.asynccontextmanager
async def harnessed(database_url: str, tmp_path: Path, **settings: str) -> AsyncIterator[Harness]:
    """The app on a fake clock with a receiver for its webhooks, its background loops idle
    (the tests drive them); ``settings``: more TASKRELAY_* variables."""
    clock = FakeClock()
    receiver = Receiver()
    environ = {
        "TASKRELAY_SCHEDULER": "false",
        "TASKRELAY_DISPATCHER": "false",
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        **settings,
    }
    async with serving(
        make_settings(database_url, tmp_path, **environ),
        webhook_app=receiver.app,
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    ) as (app, client):
        yield Harness(app, client, clock, receiver)


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(database_url, tmp_path) as value:
        yield value


def verify(secret: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = Webhook(secret).verify(body, headers)
    return result


# --- signatures and envelope ------------------------------------------------------------------


async def test_deliveries_pass_a_stock_standard_webhooks_verifier(harness: Harness) -> None:
    subscription = await harness.subscribe("a")
    assert subscription["secret"].startswith("whsec_")
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    assert await harness.deliver() == 2
    events = (await harness.client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()[
        "data"
    ]
    received = harness.receiver.received["a"]
    assert len(received) == 2
    for (headers, body), expected in zip(received, events, strict=True):
        payload = verify(subscription["secret"], headers, body)
        assert headers["webhook-id"] == expected["id"]
        assert payload == {
            "id": expected["id"],
            "type": expected["type"],
            "timestamp": expected["timestamp"],
            "data": expected["data"],
        }
    assert [json.loads(body)["type"] for _, body in received] == [
        "task.submitted",
        "task.succeeded",
    ]
    # The event data is the same task JSON as GET /v1/tasks/{id}.
    current = (await harness.client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert json.loads(received[-1][1])["data"] == current
    # A tampered body or another secret fails verification.
    headers, body = received[0]
    with pytest.raises(WebhookVerificationError):
        verify(subscription["secret"], headers, body.replace(b"evolink", b"grsai"))
    other = await harness.subscribe("b")
    with pytest.raises(WebhookVerificationError):
        verify(other["secret"], headers, body)


async def test_filters_and_client_isolation(harness: Harness) -> None:
    await harness.subscribe("finals", event_types=["task.succeeded", "task.failed"])
    await harness.subscribe("grsai-only", providers=["grsai"])
    await harness.subscribe("bobs", token=BOB)
    alice_task = await harness.track()
    harness.update(alice_task, TaskStatus.failed)
    bob_task = await harness.track(BOB)
    harness.update(bob_task, TaskStatus.succeeded)
    await harness.deliver()
    assert [e["type"] for e in harness.receiver.events("finals")] == ["task.failed"]
    assert harness.receiver.events("grsai-only") == []
    assert {e["data"]["id"] for e in harness.receiver.events("bobs")} == {bob_task}
    listed = (await harness.client.get("/v1/subscriptions", headers=auth(BOB))).json()["data"]
    assert [s["url"] for s in listed] == [HOOK.format(name="bobs")]
    assert "secret" not in listed[0]
    finals_id = (await harness.client.get("/v1/subscriptions", headers=auth())).json()["data"][0][
        "id"
    ]
    assert (
        await harness.client.get(f"/v1/subscriptions/{finals_id}", headers=auth(BOB))
    ).status_code == 404
    assert (
        await harness.client.delete(f"/v1/subscriptions/{finals_id}", headers=auth(BOB))
    ).status_code == 404


# --- order, coalescing ------------------------------------------------------------------------


async def test_order_per_task_under_concurrency(harness: Harness) -> None:
    await harness.subscribe("ordered")
    task_ids = [await harness.track() for _ in range(8)]

    def drive(task_id: str) -> None:
        for progress in (10, 30, 50, 70, 90):
            harness.update(task_id, TaskStatus.running, progress)
            harness.clock.advance(2)  # past the progress coalescing delay
        harness.update(task_id, TaskStatus.succeeded)

    threads = [threading.Thread(target=drive, args=(task_id,)) for task_id in task_ids]
    for thread in threads:
        thread.start()
    deliveries = asyncio.create_task(_deliver_while(harness, threads))
    for thread in threads:
        await asyncio.to_thread(thread.join)
    await deliveries
    harness.clock.advance(5)
    await harness.deliver()
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in harness.receiver.events("ordered"):
        by_task[event["data"]["id"]].append(event)
    assert set(by_task) == set(task_ids)
    for events in by_task.values():
        types = [e["type"] for e in events]
        assert types[0] == "task.submitted" and types[-1] == "task.succeeded"
        progress = [e["data"]["progress"] for e in events]
        assert progress == sorted(progress)  # never a later event before an earlier one
        assert len({e["id"] for e in events}) == len(events)


async def _deliver_while(harness: Harness, threads: list[threading.Thread]) -> None:
    while any(thread.is_alive() for thread in threads):
        await harness.runtime.dispatcher.run_once()
        await asyncio.sleep(0.001)


async def test_progress_events_are_coalesced(harness: Harness) -> None:
    await harness.subscribe("calm")
    task_id = await harness.track()
    await harness.deliver()  # task.submitted
    for progress in range(1, 100):
        harness.update(task_id, TaskStatus.running, progress)
    harness.clock.advance(2)
    await harness.deliver()
    types = [e["type"] for e in harness.receiver.events("calm")]
    assert types == ["task.submitted", "task.progress"]
    assert harness.receiver.events("calm")[-1]["data"]["progress"] == 99
    harness.update(task_id, TaskStatus.running, 100 - 1 + 0)  # unchanged: no event
    harness.update(task_id, TaskStatus.succeeded)
    await harness.deliver()
    assert [e["type"] for e in harness.receiver.events("calm")][-1] == "task.succeeded"
    # A coalesced delivery is not sent again by hand: its event would follow the newer ones.
    listed = await harness.client.get(
        f"/v1/tasks/{task_id}/deliveries?status=coalesced", headers=auth()
    )
    superseded = listed.json()["data"][0]["id"]
    retried = await harness.client.post(f"/v1/deliveries/{superseded}/retry", headers=auth())
    assert retried.status_code == 409 and "was coalesced" in retried.json()["error"]["message"]
    await harness.deliver()
    assert [e["type"] for e in harness.receiver.events("calm")][-1] == "task.succeeded"


def test_the_first_attempt_waits_the_schedules_first_entry() -> None:
    """TASKRELAY_DELIVERY_SCHEDULE lists the waits before attempt 1, 2, 3...: a delivery is
    first due its first entry from now. A progress delivery waits the longer of that and the
    moment newer progress may replace it in (PROGRESS_DELAY), and one replacing others keeps
    the earliest slot of theirs."""
    from service.outbox import PROGRESS_DELAY, NewEvent, plan_deliveries

    now = utcnow()

    def due(
        first_wait: float, *types: str, superseded: tuple[tuple[int, int, Any], ...] = ()
    ) -> list[float]:
        events = [
            (NewEvent(seq, 7, "task_1", "alice", "evolink", kind), 3)
            for seq, kind in enumerate(types, start=1)
        ]
        rows = plan_deliveries(events, superseded, now, first_wait=timedelta(seconds=first_wait))
        return [(row["next_attempt_at"] - now).total_seconds() for row in rows]

    progress = PROGRESS_DELAY.total_seconds()
    assert due(0, "task.submitted", "task.progress") == [0, progress]
    assert due(600, "task.submitted", "task.progress") == [600, 600]
    assert due(progress / 2, "task.progress") == [progress]
    waiting = ((3, 7, now + timedelta(seconds=30)),)
    assert due(600, "task.progress", superseded=waiting) == [30]


async def test_a_replay_waits_the_schedules_first_entry_and_a_manual_retry_does_not(
    database_url: str, tmp_path: Path
) -> None:
    async with harnessed(database_url, tmp_path, TASKRELAY_DELIVERY_SCHEDULE="10m,5s") as harness:
        since = harness.clock.now() - timedelta(minutes=1)
        task_id = await harness.track()
        subscription = await harness.subscribe("late")
        replayed = await harness.client.post(
            f"/v1/subscriptions/{subscription['id']}/replay",
            json={"since": since.isoformat()},
            headers=auth(),
        )
        assert replayed.json() == {"replayed": 1}
        assert _pending(harness) == [("task.submitted", 600.0)]
        assert await harness.deliver() == 0
        (owed,) = (
            await harness.client.get(
                f"/v1/subscriptions/{subscription['id']}/deliveries", headers=auth()
            )
        ).json()["data"]
        retried = await harness.client.post(f"/v1/deliveries/{owed['id']}/retry", headers=auth())
        assert retried.status_code == 202  # "send it again now"
        assert await harness.deliver() == 1
        assert [e["data"]["id"] for e in harness.receiver.events("late")] == [task_id]


# --- retries, dead letters, manual retry, replay ----------------------------------------------


async def test_retry_schedule_then_dead_letter_then_manual_retry(harness: Harness) -> None:
    subscription = await harness.subscribe("flaky", event_types=["task.submitted"])
    harness.receiver.status["flaky"] = 500
    task_id = await harness.track()
    schedule = harness.runtime.outbox.schedule
    assert schedule == (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    start = harness.clock.now()
    for wait in schedule[1:]:
        await harness.deliver()
        harness.clock.advance(wait - 0.001)
        assert await harness.deliver() == 0  # not a moment early
        harness.clock.advance(0.001)
    await harness.deliver()
    assert len(harness.receiver.received["flaky"]) == len(schedule)
    dead = (
        await harness.client.get(
            f"/v1/subscriptions/{subscription['id']}/deliveries?status=dead", headers=auth()
        )
    ).json()["data"]
    assert len(dead) == 1 and dead[0]["attempts"] == 8 and dead[0]["last_status_code"] == 500
    detail = (await harness.client.get(f"/v1/deliveries/{dead[0]['id']}", headers=auth())).json()
    times = [a["attempted_at"] for a in detail["attempt_log"]]
    offsets = [
        (harness.clock.epoch.fromisoformat(t.replace("Z", "+00:00")) - start).total_seconds()
        for t in times
    ]
    expected = [sum(schedule[: i + 1]) for i in range(len(schedule))]
    assert offsets == pytest.approx(expected, abs=0.01)
    assert all(a["status_code"] == 500 for a in detail["attempt_log"])
    # The subscriber is fixed: a manual retry delivers it, with the same webhook-id.
    harness.receiver.status["flaky"] = 200
    retried = await harness.client.post(f"/v1/deliveries/{dead[0]['id']}/retry", headers=auth())
    assert retried.status_code == 202
    # Each view of the delivery names the subscription it goes to.
    assert (retried.json()["subscription_id"], retried.json()["target"]) == (
        subscription["id"],
        "endpoint",
    )
    assert (dead[0]["subscription_id"], detail["subscription_id"]) == (subscription["id"],) * 2
    await harness.deliver()
    ids = [headers["webhook-id"] for headers, _ in harness.receiver.received["flaky"]]
    assert len(set(ids)) == 1
    done = (await harness.client.get(f"/v1/deliveries/{dead[0]['id']}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert task_id


async def test_subscriber_down_then_up_gets_every_event_once(harness: Harness) -> None:
    subscription = await harness.subscribe("outage")
    harness.receiver.status["outage"] = 503
    tasks = [await harness.track() for _ in range(5)]
    for task_id in tasks:
        harness.update(task_id, TaskStatus.running, 50)
        harness.clock.advance(2)
        harness.update(task_id, TaskStatus.succeeded)
    for wait in (0, 5, 300, 1800):  # down through four attempts
        harness.clock.advance(wait)
        await harness.deliver()
    assert 200 not in harness.receiver.answered["outage"]
    harness.receiver.status["outage"] = 200
    harness.clock.advance(7200)
    await harness.deliver()
    ok = Counter(
        headers["webhook-id"]
        for (headers, _), code in zip(
            harness.receiver.received["outage"], harness.receiver.answered["outage"], strict=True
        )
        if code == 200
    )
    owed: set[str] = set()
    superseded: set[str] = set()
    for task_id in tasks:
        response = await harness.client.get(f"/v1/tasks/{task_id}/events", headers=auth())
        for event in response.json()["data"]:
            (superseded if event["type"] == "task.progress" else owed).add(event["id"])
    # Every event arrived exactly once, except the progress events that each task's final
    # event superseded while the subscriber was down (coalesced by design, and listed so).
    assert set(ok) == owed
    assert set(ok.values()) == {1}
    coalesced = await harness.client.get(
        f"/v1/subscriptions/{subscription['id']}/deliveries?status=coalesced", headers=auth()
    )
    assert {d["event_id"] for d in coalesced.json()["data"]} == superseded


async def test_410_gone_disables_the_subscription(harness: Harness) -> None:
    subscription = await harness.subscribe("gone")
    harness.receiver.status["gone"] = 410
    await harness.track()
    await harness.deliver()
    after = (
        await harness.client.get(f"/v1/subscriptions/{subscription['id']}", headers=auth())
    ).json()
    assert after["enabled"] is False
    assert "410" in after["disabled_reason"]
    await harness.track()
    harness.clock.advance(3600)
    await harness.deliver()
    assert len(harness.receiver.received["gone"]) == 1


async def test_replay_seeds_a_new_subscriber_with_the_same_event_ids(harness: Harness) -> None:
    first = await harness.track()
    harness.update(first, TaskStatus.succeeded)
    since = harness.clock.now() - timedelta(minutes=1)
    subscription = await harness.subscribe("late")
    assert await harness.deliver() == 0  # it did not exist when those events happened
    replayed = await harness.client.post(
        f"/v1/subscriptions/{subscription['id']}/replay",
        json={"since": since.isoformat()},
        headers=auth(),
    )
    assert replayed.status_code == 202 and replayed.json() == {"replayed": 2}
    await harness.deliver()
    events = (await harness.client.get(f"/v1/tasks/{first}/events", headers=auth())).json()["data"]
    assert [h["webhook-id"] for h, _ in harness.receiver.received["late"]] == [
        e["id"] for e in events
    ]


@pytest.mark.parametrize(
    ("path", "body", "field", "fragment"),
    [
        (
            "replay",
            {"since": "2026-11-22T00:30:00Z", "until": "2026-11-22T00:10:00Z"},
            "until",
            "must be later than since",
        ),
        ("replay", {"since": "2026-11-22T00:30:00Z", "until": "2026-11-22T00:30:00Z"}, "until", ""),
        # One with a zone, one without (read as UTC): compared, not a 500.
        ("replay", {"since": "2026-11-22T00:30:00", "until": "2026-11-22T00:10:00Z"}, "until", ""),
        ("replay", {"since": "2026-11-22T01:30+01:00", "until": "2026-11-22T00:10"}, "until", ""),
        ("", {"enabled": "yes"}, "enabled", "valid boolean"),
        ("", {"enabled": 1}, "enabled", "valid boolean"),
        ("rotate-secret", {"overlap_seconds": "60"}, "overlap_seconds", "a JSON number"),
        # Unix times, which lax validation takes; the task list's parameters never did.
        ("replay", {"since": 0}, "since", "ISO 8601 timestamp string"),
        ("replay", {"since": "1700000000"}, "since", "not an ISO 8601 timestamp"),
        ("replay", {"since": "2026-11-22T00:00:00Z", "until": 1.5e9}, "until", "ISO 8601"),
    ],
)
async def test_subscription_bodies_lax_validation_would_misread_are_400(
    harness: Harness, path: str, body: dict[str, Any], field: str, fragment: str
) -> None:
    """An empty replay range is a mistake to name, not a 202 replaying nothing; booleans and
    integers are JSON's, not strings or numbers standing for them."""
    subscription = await harness.subscribe("strict")
    url = f"/v1/subscriptions/{subscription['id']}" + (f"/{path}" if path else "")
    method = "PATCH" if not path else "POST"
    response = await harness.client.request(method, url, json=body, headers=auth())
    assert response.status_code == 400, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == field and fragment in detail["message"]


async def test_a_replay_does_not_owe_again_an_event_still_pending(harness: Harness) -> None:
    """An event the subscription is still owed is left to its own schedule: a second delivery
    of it would be claimed and sent beside the first, at once."""
    subscription = await harness.subscribe("replayed")
    since = harness.clock.now() - timedelta(minutes=1)
    await harness.track()
    await harness.deliver()  # sent
    harness.receiver.status["replayed"] = 503
    await harness.track()
    await harness.deliver()  # fails: retry in 5 s
    harness.receiver.status["replayed"] = 200
    replayed = await harness.client.post(
        f"/v1/subscriptions/{subscription['id']}/replay",
        json={"since": since.isoformat()},
        headers=auth(),
    )
    assert replayed.status_code == 202 and replayed.json() == {"replayed": 1}
    assert _pending(harness) == [("task.submitted", 0.0), ("task.submitted", 5.0)]
    harness.clock.advance(5)
    assert await harness.deliver() == 2
    ids = Counter(h["webhook-id"] for h, _ in harness.receiver.received["replayed"])
    assert sorted(ids.values()) == [2, 2]  # each sent twice: once first, once again
    assert _pending(harness) == []


async def test_a_crashed_dispatchers_delivery_is_sent_again_with_the_same_id(
    harness: Harness,
) -> None:
    await harness.subscribe("resumed")
    await harness.track()
    claimed = harness.runtime.outbox.claim("crashed-dispatcher", limit=10, lease_seconds=60)
    assert len(claimed) == 1  # the crashed process took it and never sent it
    assert await harness.deliver() == 0
    harness.clock.advance(61)
    assert await harness.deliver() == 1
    ((headers, _),) = harness.receiver.received["resumed"]
    assert headers["webhook-id"] == claimed[0].event_id


async def test_a_slow_subscriber_does_not_hold_up_others(harness: Harness) -> None:
    await harness.subscribe("slow")
    await harness.subscribe("fast")
    harness.receiver.hold["slow"] = asyncio.Event()
    for _ in range(6):
        await harness.track()
    dispatcher = harness.runtime.dispatcher
    dispatcher.per_subscription = 4  # below the 6 it owes, so the cap shows
    for _ in range(500):  # passes until the fast subscriber has everything (bounded)
        await dispatcher.run_once(wait=False)
        await asyncio.sleep(0.01)
        if len(harness.receiver.received["fast"]) == 6:
            break
    assert len(harness.receiver.received["fast"]) == 6  # while the slow one still hangs
    assert len(harness.receiver.received["slow"]) == 4  # its per-subscriber cap
    harness.receiver.hold["slow"].set()
    await harness.deliver()
    assert len(harness.receiver.received["slow"]) == 6


async def test_an_attempt_is_logged_at_the_time_it_began(harness: Harness) -> None:
    """A subscriber that takes its time: the attempt log says when the request was sent,
    not when its answer was recorded (7 s later here, on the fake clock)."""
    subscription = await harness.subscribe("slow", event_types=["task.submitted"])
    harness.receiver.hold["slow"] = asyncio.Event()
    await harness.track()
    began = harness.clock.now()
    delivering = asyncio.ensure_future(harness.deliver())
    for _ in range(500):  # until the request is in (bounded)
        if harness.receiver.received["slow"]:
            break
        await asyncio.sleep(0.01)
    assert len(harness.receiver.received["slow"]) == 1
    harness.clock.advance(7)
    harness.receiver.hold["slow"].set()
    assert await delivering == 1
    (delivery,) = (
        await harness.client.get(
            f"/v1/subscriptions/{subscription['id']}/deliveries", headers=auth()
        )
    ).json()["data"]
    assert delivery["delivered_at"] == isoformat(began + timedelta(seconds=7))  # recorded then
    detail = (await harness.client.get(f"/v1/deliveries/{delivery['id']}", headers=auth())).json()
    (attempt,) = detail["attempt_log"]
    assert attempt["attempted_at"] == isoformat(began)  # sent then
    assert attempt["status_code"] == 200


# --- notify_url and secrets ---------------------------------------------------------------------


async def test_notify_url_gets_that_tasks_events_signed_with_the_client_secret(
    harness: Harness,
) -> None:
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    other = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    harness.update(other, TaskStatus.succeeded)
    await harness.deliver()
    secret = (await harness.client.get("/v1/notify-secret", headers=auth())).json()["secret"]
    received = harness.receiver.received["notify"]
    assert [json.loads(b)["type"] for _, b in received] == ["task.submitted", "task.succeeded"]
    for headers, body in received:
        assert verify(secret, headers, body)["data"]["id"] == task_id
    bob_secret = (await harness.client.get("/v1/notify-secret", headers=auth(BOB))).json()["secret"]
    assert bob_secret != secret


def test_a_client_secret_another_process_made_meanwhile_is_kept(store: Store) -> None:
    """The claim makes a client's notify_url secret on first use; if another process inserts
    one between this claim's read and its insert, that one stands (no error, no overwrite).
    A transaction that made one must be synced (a claim commits without fsync); one that only
    read them need not."""
    now = utcnow()
    with store.core_transaction() as (connection, written):
        made = _client_secret_rows(connection, {"alice"}, now, written)
        assert written.must_sync
    with store.core_transaction() as (connection, written):
        late = [{"owner": "alice", "secret": "made-elsewhere", "created_at": now}]
        connection.execute(_add_client_secrets(connection), late)  # the race, made to happen
        again = _client_secret_rows(connection, {"alice", "bob"}, now, written)
        assert written.must_sync  # bob's
    with store.core_transaction() as (connection, written):
        assert _client_secret_rows(connection, {"alice", "bob"}, now, written).keys() == {
            "alice",
            "bob",
        }
        assert not written.must_sync
    assert again["alice"].secret == made["alice"].secret
    assert set(again) == {"alice", "bob"}
    assert again["bob"].secret not in (made["alice"].secret, "made-elsewhere")


def test_a_claim_that_makes_a_client_secret_syncs_it_before_signing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notify_url delivery is signed with its client's secret; the claim that makes that
    secret commits without fsync, so it syncs SQLite's log before handing the job out. A claim
    that finds the secret already made does not."""
    synced: list[str] = []
    fsync = os.fsync

    def spy(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    def track(notify_url: str) -> None:
        _tracked(store, notify_url=notify_url)

    track("https://hooks.example/one")
    monkeypatch.setattr(os, "fsync", spy)
    outbox = Outbox(store)
    (job,) = outbox.claim("worker-1", limit=5, lease_seconds=60)
    expected = [] if store.engine.dialect.name != "sqlite" else [f"{database_file(store)}-wal"]
    assert synced == expected
    assert job.signing_secrets == (outbox.client_secret("alice").secret,)
    track("https://hooks.example/two")
    assert len(outbox.claim("worker-1", limit=5, lease_seconds=60)) == 1
    assert synced == expected  # the secret was there: no sync


def _tracked(store: Store, **extra: Any) -> str:
    """An EvoLink task of alice's, tracked straight in the store: its id."""
    created = store.create_task(
        owner="alice",
        provider="evolink",
        origin=TaskOrigin.tracked,
        request={},
        metadata={},
        **extra,
    )
    task_id: str = created.task["id"]
    return task_id


def database_file(store: Store) -> Path:
    database = store.engine.url.database
    assert database is not None
    return Path(database).resolve()


def test_the_delivery_insert_takes_every_column_a_delivery_row_has() -> None:
    """fan_out_many's INSERT binds the columns it was built with: a key delivery_row() gained
    without it would be dropped silently."""
    row = delivery_row(1, 2, 3, "task.succeeded", utcnow(), utcnow())
    assert tuple(row) == _DELIVERY_ROW_KEYS


def test_the_dispatchers_transactions_skip_the_fsync_on_sqlite(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims and records commit with synchronous=NORMAL on SQLite (what they write may be
    lost to a power cut: the delivery is then sent again); the connection syncs again after.
    PostgreSQL commits stay synchronous."""
    sqlite_store = store.engine.dialect.name == "sqlite"
    setting = "PRAGMA synchronous" if sqlite_store else "SHOW synchronous_commit"
    seen: list[Any] = []

    def spy(connection: Any, now: Any, since: Any = None, span: Any = None) -> int:
        seen.append(connection.exec_driver_sql(setting).scalar_one())
        return 0

    monkeypatch.setattr(Outbox, "_move_aside", staticmethod(spy))  # the first claim's sweep
    outbox = Outbox(store)
    assert outbox.claim("worker-1", limit=5, lease_seconds=60) == []
    assert len(seen) == 1
    with store.core_transaction() as (connection, _):
        after = connection.exec_driver_sql(setting).scalar_one()
    if sqlite_store:
        assert (seen[0], after) == (1, 2)  # NORMAL in the claim, FULL again after
    else:
        assert (seen[0], after) == ("on", "on")


async def test_a_notify_url_that_answers_410_is_owed_nothing_more(harness: Harness) -> None:
    """A task's notify_url cannot be enabled again, so what it was still owed is
    dead-lettered, not kept pending for ever."""
    task_id = await harness.track(notify_url=HOOK.format(name="gone-notify"))
    harness.update(task_id, TaskStatus.succeeded)  # owed too, behind task.submitted
    harness.receiver.status["gone-notify"] = 410
    await harness.deliver()
    assert len(harness.receiver.received["gone-notify"]) == 1
    assert _pending(harness) == []
    harness.clock.advance(7200)
    assert await harness.deliver() == 0


async def test_what_a_notify_url_is_owed_when_it_answers_410_counts_as_dead_lettered(
    harness: Harness,
) -> None:
    task_id = await harness.track(notify_url=HOOK.format(name="gone-counted"))
    harness.update(task_id, TaskStatus.succeeded)
    harness.receiver.status["gone-counted"] = 410
    await harness.deliver()
    # The delivery answered 410, and task.succeeded, dead-lettered with it unsent.
    assert harness.runtime.dispatcher.metrics.counter("deliveries_dead_lettered_total") == 2


async def test_secret_rotation_signs_with_both_during_the_overlap(harness: Harness) -> None:
    subscription = await harness.subscribe("rotating")
    old = subscription["secret"]
    rotated = (
        await harness.client.post(
            f"/v1/subscriptions/{subscription['id']}/rotate-secret",
            json={"overlap_seconds": 3600},
            headers=auth(),
        )
    ).json()
    new = rotated["secret"]
    assert new != old and rotated["previous_secret_expires_at"]
    await harness.track()
    await harness.deliver()
    headers, body = harness.receiver.received["rotating"][-1]
    assert verify(old, headers, body) and verify(new, headers, body)
    harness.clock.advance(3601)
    await harness.track()
    await harness.deliver()
    headers, body = harness.receiver.received["rotating"][-1]
    assert verify(new, headers, body)
    with pytest.raises(WebhookVerificationError):
        verify(old, headers, body)


async def test_a_rotation_without_overlap_keeps_no_previous_secret(harness: Harness) -> None:
    """overlap_seconds 0: the old secret stops signing at once, and is not kept (nor shown
    with an expiry of now)."""
    subscription = await harness.subscribe("cut-over")
    old = subscription["secret"]
    rotated = await harness.client.post(
        f"/v1/subscriptions/{subscription['id']}/rotate-secret",
        json={"overlap_seconds": 0},
        headers=auth(),
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["previous_secret_expires_at"] is None
    notify = await harness.client.post(
        "/v1/notify-secret/rotate", json={"overlap_seconds": 0}, headers=auth()
    )
    assert notify.status_code == 200 and notify.json()["previous_secret_expires_at"] is None
    with harness.runtime.store.engine.connect() as connection:
        kept = connection.execute(
            sa.text("SELECT previous_secret FROM subscription WHERE id = :id"),
            {"id": subscription["id"]},
        ).scalar_one()
    assert kept is None
    await harness.track()
    await harness.deliver()
    headers, body = harness.receiver.received["cut-over"][-1]
    assert verify(rotated.json()["secret"], headers, body)
    with pytest.raises(WebhookVerificationError):
        verify(old, headers, body)


async def test_a_subscriptions_filters_name_each_value_once(harness: Harness) -> None:
    created = await harness.subscribe(
        "twice",
        event_types=["task.failed", "task.failed", "task.succeeded"],
        providers=["evolink", "evolink"],
    )
    assert created["event_types"] == ["task.failed", "task.succeeded"]
    assert created["providers"] == ["evolink"]
    patched = await harness.client.patch(
        f"/v1/subscriptions/{created['id']}",
        json={"event_types": ["task.progress", "task.progress"]},
        headers=auth(),
    )
    assert patched.status_code == 200 and patched.json()["event_types"] == ["task.progress"]


async def test_replays_cap_counts_only_the_events_the_subscription_matches(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_REPLAY events per replay, counted among those the subscription's filters
    match: a subscription to a rare event type replays a busy period in one call."""
    monkeypatch.setattr(outbox, "MAX_REPLAY", 3)
    since = harness.clock.now() - timedelta(minutes=1)
    busy = [await harness.track() for _ in range(4)]  # four task.submitted events
    harness.update(busy[0], TaskStatus.failed)
    failures = await harness.subscribe("failures", event_types=["task.failed"])
    others = await harness.subscribe("gptimage", providers=["gptimage15"])
    every = await harness.subscribe("every")

    async def replay(subscription: dict[str, Any]) -> httpx.Response:
        return await harness.client.post(
            f"/v1/subscriptions/{subscription['id']}/replay",
            json={"since": since.isoformat()},
            headers=auth(),
        )

    assert (await replay(failures)).json() == {"replayed": 1}
    assert (await replay(others)).json() == {"replayed": 0}
    refused = await replay(every)  # five events match
    assert refused.status_code == 400
    assert "More than 3 events match" in refused.json()["error"]["message"]


def while_held(
    run_meanwhile: Callable[[], Any], patience: float = 0.3
) -> tuple[Callable[[], None], Callable[[], bool]]:
    """A hook for the middle of a transaction: ``start()`` runs ``run_meanwhile`` on a thread
    of its own (another request, on another connection) and gives it ``patience`` seconds;
    ``finish()`` waits for it and says whether it had to wait for the transaction (it was still
    running when the ``patience`` was up). An error on the thread fails ``finish()``.

    A test that expects no wait gives a generous ``patience`` (a slow machine's stall must not
    read as a wait) and keeps the transaction open throughout: a real wait lasts until the
    commit, so it still shows."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run_meanwhile()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)

    def start() -> None:
        thread.start()
        thread.join(patience)
        outcome["waited"] = thread.is_alive()

    def finish() -> bool:
        thread.join(10)
        assert not thread.is_alive(), "the concurrent request never finished"
        if "error" in outcome:
            raise outcome["error"]
        return bool(outcome["waited"])

    return start, finish


@pytest.mark.parametrize("update", ["callback", "new_task"])
async def test_a_subscription_deleted_during_a_fan_out_waits_for_the_event(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, update: str
) -> None:
    """A subscription deleted between the fan-out's read of the subscriptions and its insert of
    the deliveries waits for the event's commit, then takes the new delivery with it. The
    update is recorded either way: before, on PostgreSQL, the delete committed in between, the
    insert broke the delivery's foreign key, and the whole update failed (a callback with an
    unrelated 409 "provider_task_id_taken", a new task with a 409)."""
    subscription = await harness.subscribe("gone")
    callback_path = None
    if update == "callback":
        tracked = await harness.client.post(
            "/v1/tasks/track", json={"provider": "evolink"}, headers=auth()
        )
        callback_path = httpx.URL(tracked.json()["callback_url"]).path
    await harness.deliver()
    engine = make_engine(harness.runtime.settings.database_url)

    def delete() -> None:
        with engine.begin() as connection:
            connection.execute(
                sa.text("DELETE FROM subscription WHERE id = :id"), {"id": subscription["id"]}
            )

    start, finish = while_held(delete)
    planned = []

    def plan(*args: Any, **kwargs: Any) -> Any:
        if not planned:
            start()
        planned.append(1)
        return plan_deliveries(*args, **kwargs)

    # Both fan-outs: the callback batch's (PostgreSQL's pipeline) and the others'.
    monkeypatch.setattr(ingest, "plan_deliveries", plan)
    monkeypatch.setattr(outbox, "plan_deliveries", plan)
    if callback_path is None:
        answer = await harness.client.post(
            "/v1/tasks/track", json={"provider": "evolink"}, headers=auth()
        )
        assert answer.status_code == 201, answer.text
        expected = "queued"
    else:
        answer = await harness.client.post(callback_path, json=DONE)
        assert answer.status_code == 200, answer.text
        expected = "succeeded"
    task_id = answer.json()["id" if callback_path is None else "task_id"]
    assert planned, "no fan-out ran"
    assert finish(), "the delete did not wait for the event's commit"
    engine.dispose()
    task = (await harness.client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == expected
    with harness.runtime.store.engine.connect() as connection:
        left = connection.execute(sa.text("SELECT count(*) FROM delivery")).scalar_one()
    assert left == 0  # the delivery went with its subscription
    assert await harness.deliver() == 0


def test_a_subscription_being_deleted_does_not_hold_up_an_events_fan_out(
    postgres_url: str,
) -> None:
    """PostgreSQL: a DELETE of a subscription under way (its cascade through every delivery it
    had may take seconds) is skipped by an event's fan-out rather than waited for: the update
    commits at once, and owes the going subscription nothing."""
    store = Store(make_engine(postgres_url))
    box = Outbox(store)

    def subscribe(url: str) -> Any:
        return box.create_subscription(
            "alice", url=url, event_types=None, providers=None, description=None
        )

    going, kept = subscribe("https://hooks.example/g"), subscribe("https://hooks.example/k")
    deleting = store.engine.connect()
    deleting.execute(sa.text("DELETE FROM subscription WHERE id = :id"), {"id": going.id})
    start, finish = while_held(lambda: _tracked(store), patience=10)
    start()  # returns once the event is recorded, the delete still uncommitted
    try:
        assert not finish(), "the new task's event waited for the delete"
    finally:
        deleting.commit()
        deleting.close()
    with store.engine.connect() as connection:
        owed = connection.execute(sa.text("SELECT subscription_pk FROM delivery")).scalars().all()
    assert owed == [kept.pk]
    store.engine.dispose()


def test_a_410_recorded_while_retention_deletes_the_task_take_turns(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a 410 for a task's notify_url locks the subscription, then its deliveries;
    retention deleting that task locks them in the same order (the cascade deletes the
    subscription too). Before, retention locked the deliveries first and one of the two was
    ended by a deadlock."""
    store = Store(make_engine(postgres_url))
    box = Outbox(store)
    task_id = _tracked(store, notify_url="https://hooks.example/n")
    store.expire_task(task_id, "gave up")  # final: retention may take it
    (job,) = box.claim("w1", limit=5, lease_seconds=60)
    sweep = while_held(lambda: store.prune_tasks(utcnow() + timedelta(days=1)))
    started = []

    def pause(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The record holds its subscription: now the sweep starts, and gets 0.3 s.
        locking = (
            statement.startswith("SELECT subscription.pk") and "FOR NO KEY UPDATE" in statement
        )
        if locking and threading.current_thread().name == "record" and not started:
            started.append(1)
            sweep[0]()

    sa.event.listen(store.engine, "after_cursor_execute", pause)
    recorded: list[Any] = []
    record = threading.Thread(
        target=lambda: recorded.extend(box.record_attempts([(job, AttemptResult(410, 1.0))], "w1")),
        name="record",
    )
    record.start()
    record.join(20)
    sa.event.remove(store.engine, "after_cursor_execute", pause)
    assert started and recorded and recorded[0].status == "dead"
    assert sweep[1]()  # the sweep waited for the record, then deleted the task
    assert store.find_task(task_id) is None
    store.engine.dispose()


@pytest.mark.parametrize("secret", ["subscription", "client"])
def test_concurrent_rotations_keep_every_secret_they_answered(
    store: Store, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    """Two rotations of one secret at once take turns: the second keeps the first's new secret
    as its previous one. Before, on PostgreSQL, both read the same row and the last commit won,
    so one caller was answered a secret nothing ever signed with."""
    box = Outbox(store)
    subscription = box.create_subscription(
        "alice", url="https://example.com/h", event_types=None, providers=None, description=None
    )

    def rotate() -> tuple[str, str | None]:
        if secret == "subscription":
            row: Any = box.rotate_subscription_secret("alice", subscription.id, timedelta(hours=1))
        else:
            row = box.rotate_client_secret("alice", timedelta(hours=1))
        return row.secret, row.previous_secret

    start, finish = while_held(rotate)
    made = []

    def new_secret() -> str:
        value = new_webhook_secret()
        made.append(value)
        if len(made) == 1:
            start()  # the second rotation, while the first holds its transaction open
        return value

    box.client_secret("alice")  # made before, as a client's first delivery makes it
    monkeypatch.setattr(outbox, "new_webhook_secret", new_secret)
    first, _ = rotate()
    assert finish(), "the second rotation did not wait for the first"
    assert made[0] == first
    if secret == "subscription":
        row: Any = box.get_subscription("alice", subscription.id)
    else:
        row = box.client_secret("alice")
    assert (row.secret, row.previous_secret) == (made[1], first)


# --- SSRF at registration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://192.168.1.5/hook",
        "http://127.0.0.1/hook",
        "http://localhost:8000/hook",  # a name that resolves to loopback
        "http://2130706433/hook",  # 127.0.0.1 written as one number
        "ftp://example.com/hook",
        "http://user:pass@example.com/hook",
    ],
)
async def test_internal_or_odd_subscriber_urls_are_refused(
    harness: Harness, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in production: no private network allowed (the harness allows 127.0.0.0/8).
    monkeypatch.setattr(harness.runtime, "address_policy", AddressPolicy())
    response = await harness.client.post("/v1/subscriptions", json={"url": url}, headers=auth())
    assert response.status_code == 400, url
    assert response.json()["error"]["details"][0]["field"] == "url"
    notify = await harness.client.post(
        "/v1/tasks/track", json={"provider": "evolink", "notify_url": url}, headers=auth()
    )
    assert notify.status_code == 400
    assert error_code(notify) in {"destination_not_allowed", "validation_failed"}


@pytest.mark.parametrize(
    "url", ["https://xn--ls8h.la/hook", "https://xn--a.example.com/hook", "https://xn--/hook"]
)
async def test_a_host_that_is_not_valid_punycode_is_a_validation_error_naming_the_field(
    harness: Harness, url: str
) -> None:
    subscription = await harness.subscribe("valid")
    for method, path, body, field in (
        ("POST", "/v1/subscriptions", {"url": url}, "url"),
        ("PATCH", f"/v1/subscriptions/{subscription['id']}", {"url": url}, "url"),
        ("POST", "/v1/tasks/track", {"provider": "evolink", "notify_url": url}, "notify_url"),
    ):
        response = await harness.client.request(method, path, json=body, headers=auth())
        assert response.status_code == 400, (method, path, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation_failed"
        assert error["details"][0]["field"] == field
        assert "is not a valid internationalised domain name" in error["message"]


# --- the live stream ------------------------------------------------------------------------------


async def test_stream_starts_with_the_current_state_and_ends_after_the_final_event(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.running, 20)
    store = harness.runtime.store
    read = store.task_with_events
    snapshots = []

    def snapshot(owner: str, task_id: str) -> Any:
        result = read(owner, task_id)
        snapshots.append(task_id)
        return result

    # The stream's first frame comes from this read: the updates follow it, however long the
    # stream takes to open.
    monkeypatch.setattr(store, "task_with_events", snapshot)

    async def finish_later() -> None:
        await until(lambda: snapshots, step=0.005)
        await asyncio.to_thread(harness.update, task_id, TaskStatus.running, 60)
        await asyncio.to_thread(harness.update, task_id, TaskStatus.succeeded)

    finisher = asyncio.create_task(finish_later())
    frames = []
    async with harness.client.stream(
        "GET", f"/v1/tasks/{task_id}/stream", headers=auth()
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        block: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(("event:", "data:", "id:")):
                key, _, value = line.partition(":")
                block[key] = value.strip()
            elif not line and block:
                frames.append(block)
                block = {}
    await finisher
    types = [frame["event"] for frame in frames]
    assert types == ["task.state", "task.progress", "task.succeeded"]
    assert json.loads(frames[0]["data"])["data"]["progress"] == 20
    assert json.loads(frames[-1]["data"])["data"]["status"] == "succeeded"
    other = await harness.client.get(f"/v1/tasks/{task_id}/stream", headers=auth(BOB))
    assert other.status_code == 404


async def test_shutdown_releases_in_flight_deliveries_for_another_process(
    harness: Harness,
) -> None:
    from service.dispatcher import Dispatcher
    from service.metrics import Metrics

    await harness.subscribe("stuck")
    await harness.track()
    harness.receiver.hold["stuck"] = asyncio.Event()
    leaving = harness.runtime.dispatcher
    await leaving.run_once(wait=False)
    await until(lambda: harness.receiver.received["stuck"], step=0.005)
    assert len(harness.receiver.received["stuck"]) == 1  # in flight, held by the subscriber
    await leaving.stop(grace=0.1)  # it cannot finish in time: released, not kept leased
    harness.receiver.hold.pop("stuck").set()
    successor = Dispatcher(
        harness.runtime.outbox,
        leaving.http,
        metrics=Metrics(),
        monotonic=harness.clock.monotonic,
    )
    assert await successor.run_until_idle() == 1  # at once: no lease to wait out
    ids = {headers["webhook-id"] for headers, _ in harness.receiver.received["stuck"]}
    assert len(ids) == 1 and len(harness.receiver.received["stuck"]) == 2


async def test_a_saturated_subscriber_does_not_take_the_claims_from_others(
    harness: Harness,
) -> None:
    """A hanging subscriber with a long backlog due first must not starve another client's
    subscriber: the dispatcher stops claiming for a subscriber at its in-flight cap."""
    from service.dispatcher import Dispatcher
    from service.metrics import Metrics

    await harness.subscribe("hanging")
    harness.receiver.hold["hanging"] = asyncio.Event()
    for _ in range(10):
        await harness.track()
    harness.clock.advance(1)
    await harness.subscribe("other", token=BOB)
    await harness.track(BOB)
    dispatcher = Dispatcher(
        harness.runtime.outbox,
        harness.runtime.dispatcher.http,
        metrics=Metrics(),
        concurrency=4,
        per_subscription=2,
        monotonic=harness.clock.monotonic,
    )
    for _ in range(500):  # passes until the other subscriber got its event (bounded)
        await dispatcher.run_once(wait=False)
        await asyncio.sleep(0.005)
        if harness.receiver.received["other"]:
            break
    assert len(harness.receiver.received["other"]) == 1
    assert len(harness.receiver.received["hanging"]) == 2  # its cap
    harness.receiver.hold["hanging"].set()
    await dispatcher.stop(grace=5)


async def test_a_claimed_progress_delivery_is_not_coalesced_from_under_its_sender(
    harness: Harness,
) -> None:
    await harness.subscribe("racing")
    task_id = await harness.track()
    await harness.deliver()  # task.submitted
    harness.update(task_id, TaskStatus.running, 10)
    harness.clock.advance(2)
    outbox = harness.runtime.outbox
    (in_flight,) = outbox.claim("other-process", limit=10, lease_seconds=60)
    harness.update(task_id, TaskStatus.succeeded)  # would supersede a *waiting* progress event
    assert outbox.claim("third-process", limit=10, lease_seconds=60) == []  # order kept
    from service.outbox import AttemptResult

    outbox.record_attempt(in_flight, "other-process", AttemptResult(200, 1.0))
    (final,) = outbox.claim("third-process", limit=10, lease_seconds=60)
    assert json.loads(final.body)["type"] == "task.succeeded"
    assert json.loads(in_flight.body)["type"] == "task.progress"


async def test_rotation_bodies_are_capped_too(harness: Harness) -> None:
    subscription = await harness.subscribe("capped")
    huge = b'{"overlap_seconds": 60, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    for path in (
        f"/v1/subscriptions/{subscription['id']}/rotate-secret",
        "/v1/notify-secret/rotate",
    ):
        response = await harness.client.post(
            path, content=huge, headers={**auth(), "Content-Type": "application/json"}
        )
        assert response.status_code == 413, path
    replay = await harness.client.post(
        f"/v1/subscriptions/{subscription['id']}/replay",
        json={"since": "9999-12-31T23:00:00-05:00"},
        headers=auth(),
    )
    assert replay.status_code == 400


async def test_rotation_bodies_are_json_objects_like_every_other_body(harness: Harness) -> None:
    """The body is optional (the defaults), but one that is sent is JSON, as anywhere else:
    415 for another content type, 400 invalid_json for a JSON that is no object."""
    subscription = await harness.subscribe("typed")
    for path in (
        f"/v1/subscriptions/{subscription['id']}/rotate-secret",
        "/v1/notify-secret/rotate",
    ):
        plain = await harness.client.post(
            path,
            content=b'{"overlap_seconds": 1}',
            headers={**auth(), "Content-Type": "text/plain"},
        )
        assert plain.status_code == 415, (path, plain.text)
        listed = await harness.client.post(path, json=[1], headers=auth())
        assert listed.status_code == 400 and error_code(listed) == "invalid_json", path
        empty = await harness.client.post(path, headers=auth())
        assert empty.status_code == 200, (path, empty.text)


async def test_a_claim_leases_only_what_each_subscriber_has_room_for(harness: Harness) -> None:
    """A busy subscriber's backlog is not leased beyond its room (it would only sit leased),
    and the claim fills its other slots with the other subscribers' deliveries."""
    first = await harness.subscribe("first")
    await harness.subscribe("second", token=BOB)
    for _ in range(6):
        await harness.track()
        await harness.track(BOB)
    outbox = harness.runtime.outbox
    with outbox.store.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT id, pk FROM subscription").all()
    pk = {row[0]: row[1] for row in rows}
    jobs = outbox.claim(
        "worker", limit=8, lease_seconds=60, per_subscription=4, busy={pk[first["id"]]: 3}
    )
    taken = [job.subscription_pk for job in jobs]
    assert taken.count(pk[first["id"]]) == 1  # 4 allowed, 3 already in flight
    assert len(taken) == 5  # and the second subscriber's 4
    # Nothing else was leased: another process can claim the rest of the first's backlog.
    others = outbox.claim("other", limit=20, lease_seconds=60)
    assert len(others) == 12 - 5


async def test_attempts_finished_together_are_recorded_in_one_go(harness: Harness) -> None:
    from service.outbox import AttemptResult

    subscription = await harness.subscribe("batch")
    for _ in range(3):
        await harness.track()
    outbox = harness.runtime.outbox
    jobs = outbox.claim("worker", limit=10, lease_seconds=60)
    assert len(jobs) == 3
    outbox.delete_subscription("alice", subscription["id"])  # gone while two were being sent
    results = outbox.record_attempts([(job, AttemptResult(200, 1.0)) for job in jobs], "worker")
    assert all(type(result).__name__ == "NotFound" for result in results)
    await harness.subscribe("again")
    for _ in range(2):
        await harness.track()
    jobs = outbox.claim("worker", limit=10, lease_seconds=60)
    ok, failed = outbox.record_attempts(
        [(jobs[0], AttemptResult(200, 1.0)), (jobs[1], AttemptResult(500, 2.0, error="HTTP 500"))],
        "worker",
    )
    assert not isinstance(ok, Exception) and ok.status == "succeeded" and ok.lease_owner is None
    assert not isinstance(failed, Exception) and failed.status == "pending"
    assert failed.attempts == 1 and failed.last_status_code == 500


# --- recording attempts with the next claim ---------------------------------------------------


def _deliveries(harness: Harness) -> list[tuple[str, str, int, str | None]]:
    """Every delivery's event type, status, attempts and lease owner, in event order."""
    import sqlalchemy as sa

    from service.models import Delivery

    table = Delivery.__table__  # type: ignore[attr-defined]
    with harness.runtime.store.engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                table.c.event_type, table.c.status, table.c.attempts, table.c.lease_owner
            ).order_by(table.c.event_seq, table.c.pk)
        ).all()
    return [(kind, status, attempts, owner) for kind, status, attempts, owner in rows]


def _dispatcher(harness: Harness, **options: Any) -> Any:
    """A dispatcher of its own on the harness's outbox and webhook client."""
    from service.dispatcher import Dispatcher
    from service.metrics import Metrics

    return Dispatcher(
        harness.runtime.outbox,
        harness.runtime.dispatcher.http,
        metrics=Metrics(),
        monotonic=harness.clock.monotonic,
        **options,
    )


async def test_records_go_first_in_the_claims_transaction(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write transaction records a delivery and claims its task's next event (held behind
    it until then); without room it records and claims nothing; a failed claim takes the
    records made with it back (the delivery stays leased, as after a failed record)."""
    from service.errors import StoreUnavailable
    from service.outbox import AttemptResult

    await harness.subscribe("line")
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    outbox = harness.runtime.outbox
    (first,) = outbox.claim("worker", limit=10, lease_seconds=60)
    store = outbox.store
    opened: list[object] = []
    transaction = store.core_transaction

    @contextlib.contextmanager
    def counted(**options: Any) -> Iterator[Any]:
        opened.append(options)
        with transaction(**options) as inside:
            yield inside

    monkeypatch.setattr(store, "core_transaction", counted)
    recorded, (second,) = outbox.record_and_claim(
        [(first, AttemptResult(200, 1.0))], "worker", limit=10, lease_seconds=60
    )
    assert len(opened) == 1
    assert [type(state).__name__ for state in recorded] == ["Recorded"]
    assert json.loads(second.body)["type"] == "task.succeeded"
    await harness.track()  # due, but no room for it
    recorded, jobs = outbox.record_and_claim(
        [(second, AttemptResult(500, 1.0, error="HTTP 500"))],
        "worker",
        limit=0,
        lease_seconds=60,
    )
    assert len(opened) == 2 and jobs == []
    assert _deliveries(harness) == [
        ("task.submitted", "succeeded", 1, None),
        ("task.succeeded", "pending", 1, None),
        ("task.submitted", "pending", 0, None),
    ]

    def broken(*args: Any) -> Any:
        raise StoreUnavailable("the claim failed")

    (third,) = outbox.claim("worker", limit=10, lease_seconds=60)
    await harness.track()
    monkeypatch.setattr(outbox, "_jobs", broken)
    with pytest.raises(StoreUnavailable):
        outbox.record_and_claim(
            [(third, AttemptResult(200, 1.0))], "worker", limit=10, lease_seconds=60
        )
    assert _deliveries(harness)[-2:] == [
        ("task.submitted", "pending", 0, "worker"),
        ("task.submitted", "pending", 0, None),
    ]


async def test_a_running_dispatcher_records_each_attempt_with_its_next_claim(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the loop runs, no attempt gets a write transaction of its own: the pass woken by
    the answer records it, and claims the task's next event in the same transaction."""
    await harness.subscribe("merged")
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    outbox = harness.runtime.outbox
    calls: list[tuple[list[str], list[str]]] = []
    record_and_claim = outbox.record_and_claim

    def spy(attempts: Any, worker: str, **claim: Any) -> Any:
        recorded, jobs = record_and_claim(attempts, worker, **claim)
        calls.append(([job.event_id for job, _ in attempts], [job.event_id for job in jobs]))
        return recorded, jobs

    def own_transaction(*args: Any) -> Any:
        raise AssertionError("an attempt was recorded in a transaction of its own")

    monkeypatch.setattr(outbox, "record_and_claim", spy)
    monkeypatch.setattr(outbox, "record_attempts", own_transaction)
    # Passes come from wakes alone, and its one slot is the delivery being recorded.
    dispatcher = _dispatcher(harness, concurrency=1, tick_seconds=3600)
    await dispatcher.start()
    try:
        await until(lambda: sum(len(recorded) for recorded, _ in calls) == 2)
    finally:
        await dispatcher.stop(grace=5)
    submitted, succeeded = (event["id"] for event in harness.receiver.events("merged"))
    assert ([submitted], [succeeded]) in calls
    assert [status for _, status, _, _ in _deliveries(harness)] == ["succeeded", "succeeded"]


async def test_an_attempt_answered_during_a_pass_is_recorded_by_the_next(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that took the waiting attempts before this one was answered: the wake the
    answer gave brings another pass right after it (no tick: they are an hour apart)."""
    await harness.subscribe("during")
    await harness.track()
    hold = harness.receiver.hold["during"] = asyncio.Event()
    outbox = harness.runtime.outbox
    record_and_claim = outbox.record_and_claim
    gate, blocked = threading.Event(), threading.Event()

    def slow(attempts: Any, worker: str, **claim: Any) -> Any:
        if not gate.is_set():
            blocked.set()
            gate.wait(10)
        return record_and_claim(attempts, worker, **claim)

    gate.set()
    dispatcher = _dispatcher(harness, tick_seconds=3600)
    await dispatcher.start()
    try:
        await until(lambda: harness.receiver.received["during"])
        monkeypatch.setattr(outbox, "record_and_claim", slow)
        gate.clear()
        dispatcher.notify()
        await until(blocked.is_set)  # a pass is in its transaction, with nothing to record
        hold.set()
        await until(lambda: dispatcher._to_record)  # answered meanwhile
        gate.set()
        await until(lambda: not dispatcher._in_flight)
        assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)]
    finally:
        gate.set()
        await dispatcher.stop(grace=5)


async def test_stopping_records_the_attempts_no_pass_will_take(harness: Harness) -> None:
    """An attempt waiting for the next pass when stop() begins, and one answered while it
    waits for the deliveries in flight, are recorded at once: the loop's passes are over,
    and stop() neither waits out its grace nor releases them to be sent again."""
    await harness.subscribe("early")
    await harness.subscribe("late")
    await harness.track()  # one delivery to each
    early = harness.receiver.hold["early"] = asyncio.Event()
    late = harness.receiver.hold["late"] = asyncio.Event()
    dispatcher = _dispatcher(harness, tick_seconds=3600)
    await dispatcher.start()
    await until(lambda: harness.receiver.received["early"] and harness.receiver.received["late"])
    await asyncio.sleep(0.05)  # the loop's passes are over: it waits for a wake
    early.set()
    await until(lambda: dispatcher._to_record)  # answered, waiting for the next pass
    began = asyncio.get_running_loop().time()
    stopping = asyncio.create_task(dispatcher.stop(grace=30))
    await until(lambda: len(dispatcher._in_flight) == 1)  # the early one, recorded
    assert not stopping.done()  # the late one is still in flight
    late.set()
    await asyncio.wait_for(stopping, timeout=10)
    assert asyncio.get_running_loop().time() - began < 10
    assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)] * 2


async def test_a_failed_claim_records_the_attempts_it_carried_on_their_own(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim of the pass that carries an attempt's record fails (its transaction, records
    included, is rolled back): the attempt is recorded in a transaction of its own, so the
    delivery the subscriber answered is not sent again."""
    from service.errors import StoreUnavailable

    await harness.subscribe("answered")
    await harness.track()
    outbox = harness.runtime.outbox
    failed: list[int] = []
    jobs = outbox._jobs

    def failing_claim(*args: Any) -> Any:  # inside the transaction, after the records
        if not failed:
            failed.append(1)
            raise StoreUnavailable("the claim failed")
        return jobs(*args)

    hold = harness.receiver.hold["answered"] = asyncio.Event()
    dispatcher = _dispatcher(harness, concurrency=1)  # the second waits for the first's slot
    await dispatcher.start()
    try:
        await until(lambda: harness.receiver.received["answered"])
        await harness.track()  # due: the pass recording the first claims it, and fails
        monkeypatch.setattr(outbox, "_jobs", failing_claim)
        hold.set()
        await until(lambda: len(harness.receiver.received["answered"]) == 2)
        await until(lambda: not dispatcher._in_flight and not dispatcher._to_record)
    finally:
        await dispatcher.stop(grace=5)
    assert failed
    assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)] * 2
    received = harness.receiver.received["answered"]
    assert len({headers["webhook-id"] for headers, _ in received}) == 2  # nothing sent twice


async def test_a_failed_pass_fails_the_records_it_carried_when_they_fail_alone_too(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database failing the pass that records an attempt, and the record on its own: its
    sender logs it, and the delivery, still leased, goes out again once released."""
    from service.errors import StoreUnavailable

    await harness.subscribe("retried")
    await harness.track()
    outbox = harness.runtime.outbox
    failed: list[int] = []
    record_and_claim, record_attempts = outbox.record_and_claim, outbox.record_attempts

    def failing(attempts: Any, worker: str, **claim: Any) -> Any:
        if attempts and not failed:
            failed.append(len(attempts))
            raise StoreUnavailable("the database is locked")
        return record_and_claim(attempts, worker, **claim)

    def failing_alone(attempts: Any, worker: str) -> Any:
        if len(failed) == 1:
            failed.append(len(attempts))
            raise StoreUnavailable("the database is locked")
        return record_attempts(attempts, worker)

    monkeypatch.setattr(outbox, "record_and_claim", failing)
    monkeypatch.setattr(outbox, "record_attempts", failing_alone)
    dispatcher = _dispatcher(harness)
    await dispatcher.start()
    try:
        await until(lambda: len(failed) == 2 and not dispatcher._in_flight)
        assert "not recorded: the database is unavailable" in caplog.text
        assert _deliveries(harness) == [("task.submitted", "pending", 0, dispatcher.worker_id)]
    finally:
        await dispatcher.stop(grace=5)  # releases the lease
    assert failed == [1, 1]
    assert await harness.deliver() == 1
    received = harness.receiver.received["retried"]
    assert len(received) == 2 and len({headers["webhook-id"] for headers, _ in received}) == 1


async def test_run_until_idle_waits_for_the_deliveries_already_in_flight(
    harness: Harness,
) -> None:
    """Without the loop running, attempts are recorded all the same, and run_until_idle ends
    once nothing is due and nothing is in flight, a pass without a free slot included."""
    await harness.subscribe("one")
    for _ in range(3):
        await harness.track()
    dispatcher = _dispatcher(harness, concurrency=1)
    assert await dispatcher.run_once(wait=False) == 1  # the only slot is taken
    assert await asyncio.wait_for(dispatcher.run_until_idle(), timeout=10) == 2
    assert not dispatcher._in_flight and not dispatcher._to_record
    assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)] * 3


def _pending(harness: Harness) -> list[tuple[str, float]]:
    """Every pending delivery's event type and seconds until it is due, in event order."""
    import sqlalchemy as sa

    from service.models import Delivery

    table = Delivery.__table__  # type: ignore[attr-defined]
    now = harness.clock.now()
    with harness.runtime.store.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.event_type, table.c.next_attempt_at)
            .where(table.c.status == "pending")
            .order_by(table.c.event_seq)
        ).all()
    return [(kind, round((due - now).total_seconds(), 1)) for kind, due in rows]


async def test_events_held_behind_a_retry_are_put_aside_until_it_then_follow_in_order(
    harness: Harness,
) -> None:
    """A claim must not read, again and again, deliveries that cannot go: a task's events
    held behind an earlier one waiting for its retry are put off until that retry."""
    await harness.subscribe("flaky")
    harness.receiver.status["flaky"] = 500
    task_id = await harness.track()
    await harness.deliver()  # task.submitted fails: retry in 5 s
    harness.update(task_id, TaskStatus.succeeded)
    assert _pending(harness) == [("task.submitted", 5.0), ("task.succeeded", 0.0)]
    harness.clock.advance(1.5)  # a claim later, the held event waits for the retry too
    assert await harness.deliver() == 0
    assert _pending(harness) == [("task.submitted", 3.5), ("task.succeeded", 3.5)]
    harness.receiver.status["flaky"] = 200
    harness.clock.advance(3.5)
    assert await harness.deliver() == 2  # the retry, then at once the event behind it
    assert [e["type"] for e in harness.receiver.events("flaky")] == [
        "task.submitted",
        "task.submitted",
        "task.succeeded",
    ]
    assert _pending(harness) == []


async def test_a_manual_retry_brings_the_events_held_behind_it_along(harness: Harness) -> None:
    subscription = await harness.subscribe("dead")
    harness.receiver.status["dead"] = 500
    outbox = harness.runtime.outbox
    outbox.schedule = (0.0, 3600.0)  # one retry, an hour later, then dead
    task_id = await harness.track()
    await harness.deliver()
    harness.update(task_id, TaskStatus.succeeded)
    harness.clock.advance(1.5)
    await harness.deliver()
    assert _pending(harness) == [("task.submitted", 3598.5), ("task.succeeded", 3598.5)]
    listed = await harness.client.get(
        f"/v1/subscriptions/{subscription['id']}/deliveries?status=pending", headers=auth()
    )
    head = next(d for d in listed.json()["data"] if d["event_type"] == "task.submitted")
    harness.receiver.status["dead"] = 200
    retried = await harness.client.post(f"/v1/deliveries/{head['id']}/retry", headers=auth())
    assert retried.status_code == 202
    assert await harness.deliver() == 2  # not an hour later
    assert [e["type"] for e in harness.receiver.events("dead")][-2:] == [
        "task.submitted",
        "task.succeeded",
    ]


async def test_a_manual_retry_leaves_a_later_events_own_retry_where_it_is(
    harness: Harness,
) -> None:
    """Only the events held behind the retried delivery (never attempted) come along: one
    that was attempted and waits for its own retry keeps its backoff."""
    subscription = await harness.subscribe("backoff")
    harness.receiver.status["backoff"] = 500
    harness.runtime.outbox.schedule = (0.0, 3600.0)  # one retry, an hour later, then dead
    task_id = await harness.track()
    await harness.deliver()  # task.submitted fails: retry in an hour
    harness.update(task_id, TaskStatus.succeeded)
    harness.clock.advance(3600)
    await harness.deliver()  # task.submitted dead; task.succeeded fails: retry in an hour
    assert _pending(harness) == [("task.succeeded", 3600.0)]
    dead = await harness.client.get(
        f"/v1/subscriptions/{subscription['id']}/deliveries?status=dead", headers=auth()
    )
    (head,) = dead.json()["data"]
    harness.receiver.status["backoff"] = 200
    retried = await harness.client.post(f"/v1/deliveries/{head['id']}/retry", headers=auth())
    assert retried.status_code == 202
    assert _pending(harness) == [("task.submitted", 0.0), ("task.succeeded", 3600.0)]
    assert await harness.deliver() == 1
    assert [e["type"] for e in harness.receiver.events("backoff")][-1] == "task.submitted"
    assert _pending(harness) == [("task.succeeded", 3600.0)]


def _put_aside_uncommitted(harness: Harness) -> Callable[[], None]:
    """Another replica's claim puts aside what cannot go, in a transaction left open; the
    returned call commits it."""
    connection = harness.runtime.store.engine.connect()
    transaction = connection.begin()
    now = harness.clock.now()
    assert Outbox._move_aside(connection, now, since=now - timedelta(seconds=10)) == 1

    def commit() -> None:
        transaction.commit()
        connection.close()

    return commit


def _owner_of(harness: Harness, subscription_id: str) -> str:
    from service.models import Subscription

    table = Subscription.__table__  # type: ignore[attr-defined]
    with harness.runtime.store.engine.connect() as connection:
        owner: str = connection.execute(
            sa.select(table.c.owner).where(table.c.id == subscription_id)
        ).scalar_one()
    return owner


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # row locks
async def test_a_manual_retry_racing_a_put_aside_still_brings_the_held_event_along(
    harness: Harness,
) -> None:
    """The retry waits for another replica's put-aside of the event held behind it, then
    makes it due with the retried delivery instead of leaving it put off an hour."""
    subscription = await harness.subscribe("racing")
    harness.receiver.status["racing"] = 500
    harness.runtime.outbox.schedule = (0.0, 3600.0)
    task_id = await harness.track()
    await harness.deliver()  # task.submitted fails: retry in an hour
    harness.update(task_id, TaskStatus.succeeded)  # due, held behind it
    listed = await harness.client.get(
        f"/v1/subscriptions/{subscription['id']}/deliveries?status=pending", headers=auth()
    )
    head = next(d for d in listed.json()["data"] if d["event_type"] == "task.submitted")
    owner = _owner_of(harness, subscription["id"])
    commit = _put_aside_uncommitted(harness)
    start, finish = while_held(lambda: harness.runtime.outbox.retry_delivery(owner, head["id"]))
    start()
    commit()
    waited = finish()
    assert _pending(harness) == [("task.submitted", 0.0), ("task.succeeded", 0.0)]
    assert waited  # for the put-aside
    harness.receiver.status["racing"] = 200
    assert await harness.deliver() == 2


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # row locks
async def test_enabling_a_subscription_racing_a_put_aside_makes_its_deliveries_due(
    harness: Harness,
) -> None:
    """Another replica's claim reads the subscription disabled and puts its due delivery off
    an hour, not yet committed, while the client enables it: the enable waits for it, then
    makes the delivery due."""
    subscription = await harness.subscribe("reenabled")
    path = f"/v1/subscriptions/{subscription['id']}"
    await harness.track()
    await harness.client.patch(path, json={"enabled": False}, headers=auth())
    harness.clock.advance(3600)  # the put-off ran out while it was still disabled
    assert _pending(harness) == [("task.submitted", 0.0)]
    owner = _owner_of(harness, subscription["id"])
    commit = _put_aside_uncommitted(harness)
    start, finish = while_held(
        lambda: harness.runtime.outbox.update_subscription(
            owner, subscription["id"], {"enabled": True}
        )
    )
    start()
    commit()
    waited = finish()
    assert _pending(harness) == [("task.submitted", 0.0)]
    assert waited  # for the put-aside
    assert await harness.deliver() == 1


async def test_a_disabled_subscriptions_deliveries_are_put_off_then_due_when_enabled(
    harness: Harness,
) -> None:
    subscription = await harness.subscribe("paused")
    path = f"/v1/subscriptions/{subscription['id']}"
    for _ in range(3):
        await harness.track()
    await harness.client.patch(path, json={"enabled": False}, headers=auth())  # owed, paused
    assert _pending(harness) == [("task.submitted", 3600.0)] * 3  # by the PATCH, not a claim
    assert await harness.deliver() == 0
    assert _pending(harness) == [("task.submitted", 3600.0)] * 3
    enabled = await harness.client.patch(path, json={"enabled": True}, headers=auth())
    assert enabled.status_code == 200
    assert _pending(harness) == [("task.submitted", 0.0)] * 3
    assert await harness.deliver() == 3
    assert len(harness.receiver.received["paused"]) == 3


async def test_enabling_an_enabled_subscription_leaves_its_retries_where_they_are(
    harness: Harness,
) -> None:
    """Only a disabled subscription enabled makes its put-off deliveries due: "enabled": true
    sent along with another change made every retry due at once, the backoff skipped (a few
    PATCHes dead-lettered a delivery in seconds)."""
    subscription = await harness.subscribe("flaky")
    harness.receiver.status["flaky"] = 500
    await harness.track()
    assert await harness.deliver() == 1
    assert _pending(harness) == [("task.submitted", 5.0)]
    for version in range(3):
        response = await harness.client.patch(
            f"/v1/subscriptions/{subscription['id']}",
            json={"enabled": True, "description": f"v{version}"},
            headers=auth(),
        )
        assert response.status_code == 200 and response.json()["description"] == f"v{version}"
        assert await harness.deliver() == 0
    assert _pending(harness) == [("task.submitted", 5.0)]
    assert len(harness.receiver.received["flaky"]) == 1


async def test_disabling_a_disabled_subscription_keeps_the_reason_it_was_disabled(
    harness: Harness,
) -> None:
    subscription = await harness.subscribe("gone")
    harness.receiver.status["gone"] = 410
    await harness.track()
    await harness.deliver()
    response = await harness.client.patch(
        f"/v1/subscriptions/{subscription['id']}", json={"enabled": False}, headers=auth()
    )
    assert response.status_code == 200 and response.json()["enabled"] is False
    assert response.json()["disabled_reason"] == "the subscriber answered 410 Gone"


async def test_a_manual_retry_waits_only_for_a_lease_that_still_runs(harness: Harness) -> None:
    """A process that claimed the delivery and died left its name on it: once its lease has
    run out, nobody is attempting it, and a retry must not say so."""
    await harness.subscribe("orphaned")
    await harness.track()
    (job,) = harness.runtime.outbox.claim("crashed", limit=10, lease_seconds=60)
    path = f"/v1/deliveries/{job.delivery_id}/retry"
    busy = await harness.client.post(path, headers=auth())
    assert busy.status_code == 409
    assert "being attempted right now" in busy.json()["error"]["message"]
    harness.clock.advance(61)
    retried = await harness.client.post(path, headers=auth())
    assert retried.status_code == 202, retried.text
    assert _deliveries(harness) == [("task.submitted", "pending", 0, None)]
    assert await harness.deliver() == 1


async def test_a_manual_retry_on_a_disabled_subscription_is_a_conflict_as_a_replay_is(
    harness: Harness,
) -> None:
    subscription = await harness.subscribe("paused", event_types=["task.submitted"])
    path = f"/v1/subscriptions/{subscription['id']}"
    harness.receiver.status["paused"] = 500
    harness.runtime.outbox.schedule = (0.0,)  # one attempt, then dead
    since = harness.clock.now() - timedelta(minutes=1)
    await harness.track()
    await harness.deliver()
    (dead,) = (await harness.client.get(f"{path}/deliveries?status=dead", headers=auth())).json()[
        "data"
    ]
    await harness.client.patch(path, json={"enabled": False}, headers=auth())
    retried = await harness.client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth())
    replayed = await harness.client.post(
        f"{path}/replay", json={"since": since.isoformat()}, headers=auth()
    )
    assert (retried.status_code, replayed.status_code) == (409, 409)
    assert "enable it (PATCH enabled=true) before retrying" in retried.json()["error"]["message"]
    assert _deliveries(harness) == [("task.submitted", "dead", 1, None)]
    harness.receiver.status["paused"] = 200
    await harness.client.patch(path, json={"enabled": True}, headers=auth())
    retried = await harness.client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth())
    assert retried.status_code == 202
    assert await harness.deliver() == 1
    assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)]


async def test_a_manual_retry_to_a_notify_url_gone_for_good_is_a_conflict(
    harness: Harness,
) -> None:
    import sqlalchemy as sa

    from service.models import Delivery

    harness.receiver.status["gone"] = 410
    await harness.track(notify_url=HOOK.format(name="gone"))
    await harness.deliver()
    table = Delivery.__table__  # type: ignore[attr-defined]
    with harness.runtime.store.engine.connect() as connection:
        (delivery_id,) = connection.execute(sa.select(table.c.id)).scalars()
    retried = await harness.client.post(f"/v1/deliveries/{delivery_id}/retry", headers=auth())
    assert retried.status_code == 409
    assert "notify_url answered 410 Gone" in retried.json()["error"]["message"]
    assert _deliveries(harness) == [("task.submitted", "dead", 1, None)]


async def test_a_retry_or_a_410_puts_off_what_cannot_go_without_a_put_aside_pass(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording a failed attempt puts off the events held behind it until its retry, and a
    410 Gone the subscription's other pending deliveries, in the record's own transaction:
    the claims' put-aside pass (switched off here) need not look for them."""
    passes: list[Any] = []

    def no_pass(connection: Any, now: Any, since: Any = None, span: Any = None) -> int:
        passes.append(since)
        return 0

    monkeypatch.setattr(Outbox, "_move_aside", staticmethod(no_pass))
    await harness.subscribe("flaky")
    harness.receiver.status["flaky"] = 500
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    assert _pending(harness) == [("task.submitted", 0.0), ("task.succeeded", 0.0)]
    assert await harness.deliver() == 1  # task.submitted fails: retry in 5 s
    assert _pending(harness) == [("task.submitted", 5.0), ("task.succeeded", 5.0)]
    harness.receiver.status["flaky"] = 410
    harness.clock.advance(5)
    assert await harness.deliver() == 1  # the retry is answered 410 Gone
    assert _pending(harness) == [("task.succeeded", 3600.0)]
    assert passes  # the claims did ask for their pass


def _set_due(harness: Harness, task_id: str, event_type: str, seconds: float) -> None:
    """Make a task's pending delivery due ``seconds`` from now (a row committed late)."""
    import sqlalchemy as sa

    with harness.runtime.store.engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE delivery SET next_attempt_at = :due WHERE event_type = :type "
                "AND task_pk = (SELECT pk FROM task WHERE id = :id)"
            ).bindparams(sa.bindparam("due", type_=UTCDateTime())),
            {
                "due": harness.clock.now() + timedelta(seconds=seconds),
                "type": event_type,
                "id": task_id,
            },
        )


async def _retries_an_hour_away(harness: Harness, count: int) -> list[str]:
    """``count`` tracked tasks whose task.submitted delivery to a failing subscriber was
    tried once (by the process's first claim, which sweeps) and waits an hour for its retry:
    the task's later events are held behind it."""
    await harness.subscribe("slow")
    harness.receiver.status["slow"] = 500
    harness.runtime.outbox.schedule = (0.0, 3600.0)
    tasks = [await harness.track() for _ in range(count)]
    assert await harness.deliver() == count
    return tasks


async def test_the_put_aside_reads_what_became_due_since_the_last_and_all_now_and_then(
    harness: Harness,
) -> None:
    """Each second's put-aside reads only the deliveries that became due since the one before
    (less MOVE_ASIDE_OVERLAP): so it costs the same however long the due queue. A sweep of
    the due queue every MOVE_ASIDE_FULL_EVERY finds what was committed too late for the
    window."""
    tasks = await _retries_an_hour_away(harness, 3)
    for task_id in tasks:  # held behind their retries, due now: in the next pass's window
        harness.update(task_id, TaskStatus.succeeded)
    overlap = MOVE_ASIDE_OVERLAP.total_seconds()
    _set_due(harness, tasks[1], "task.succeeded", -overlap + 1)  # in the overlap
    _set_due(harness, tasks[2], "task.succeeded", -overlap - 1)  # before it: committed late
    harness.clock.advance(1.5)
    assert await harness.deliver() == 0
    assert _pending(harness) == [("task.submitted", 3598.5)] * 3 + [
        ("task.succeeded", 3598.5),
        ("task.succeeded", 3598.5),
        ("task.succeeded", -overlap - 2.5),  # left for the sweep
    ]
    assert harness.runtime.outbox.missed_by_window == 0
    harness.clock.advance(MOVE_ASIDE_FULL_EVERY.total_seconds())
    assert await harness.deliver() == 0
    later = 3598.5 - MOVE_ASIDE_FULL_EVERY.total_seconds()
    assert _pending(harness) == [("task.submitted", later)] * 3 + [("task.succeeded", later)] * 3
    # The one row the windows missed is counted (the process's first sweep counts none).
    assert harness.runtime.outbox.missed_by_window == 1
    metrics = await harness.client.get("/metrics")
    assert "\ntaskrelay_put_aside_missed_total 1\n" in metrics.text, metrics.text


async def test_a_sweep_reads_a_page_of_due_deliveries_per_claim_until_it_is_through(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every MOVE_ASIDE_FULL_EVERY the claims sweep through every due delivery for what cannot
    go, MOVE_ASIDE_PAGE of them per claim (2 here) in due order, so no claim reads the whole
    due queue however long it is. Its finds, every windowed pass missed (the metric). A
    delivery due after the sweep started is the windows' (not the sweep's), and the next
    sweep starts MOVE_ASIDE_FULL_EVERY after this one did."""
    from service import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "MOVE_ASIDE_PAGE", 2)
    outbox = harness.runtime.outbox
    tasks = await _retries_an_hour_away(harness, 6)
    overlap = MOVE_ASIDE_OVERLAP.total_seconds()
    for n, task_id in enumerate(tasks[:5]):
        harness.update(task_id, TaskStatus.succeeded)  # held behind its task's retry
        _set_due(harness, task_id, "task.succeeded", -overlap - 1 - n)  # before any window
    harness.clock.advance(MOVE_ASIDE_FULL_EVERY.total_seconds())

    def held_due() -> int:
        return sum(1 for kind, due in _pending(harness) if kind == "task.succeeded" and due <= 0)

    left = []
    for claim in range(5):
        if claim == 1:  # due once the sweep has started: a window's, the next second
            harness.clock.advance(0.5)
            harness.update(tasks[5], TaskStatus.succeeded)
        assert outbox.claim("sweeper", limit=8, lease_seconds=30.0) == []
        left.append(held_due())
    assert left == [3, 2, 1, 1, 1]  # pages of 2, 2 and 1 put aside; the last left alone
    assert outbox.missed_by_window == 5
    harness.clock.advance(1)
    assert outbox.claim("sweeper", limit=8, lease_seconds=30.0) == []
    assert held_due() == 0  # the window's, not counted as missed
    assert outbox.missed_by_window == 5
    for n, task_id in enumerate(tasks):  # held again, before any window
        _set_due(harness, task_id, "task.succeeded", -overlap - 1 - n)
    harness.clock.advance(MOVE_ASIDE_FULL_EVERY.total_seconds() - 2)
    assert outbox.claim("sweeper", limit=8, lease_seconds=30.0) == []
    assert held_due() == 6  # no sweep yet
    harness.clock.advance(1)
    for _ in range(4):
        assert outbox.claim("sweeper", limit=8, lease_seconds=30.0) == []
    assert held_due() == 0 and outbox.missed_by_window == 11


async def test_a_sweep_goes_through_deliveries_due_at_the_same_instant_page_by_page(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 2 through five held deliveries and one that can go, all due at the same
    instant (as a subscription enabled again makes its backlog): each page starts after the
    last one's (due time, pk), so none is skipped, none read twice, and the sweep ends."""
    from service import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "MOVE_ASIDE_PAGE", 2)
    outbox = harness.runtime.outbox
    tasks = await _retries_an_hour_away(harness, 5)
    for task_id in tasks[:3]:
        harness.update(task_id, TaskStatus.succeeded)  # held behind its task's retry
    free = await harness.track()  # its task.submitted can go: amid the tie, by pk
    for task_id in tasks[3:]:
        harness.update(task_id, TaskStatus.succeeded)
    instant = -MOVE_ASIDE_OVERLAP.total_seconds() - 1  # before any window
    for task_id in tasks:
        _set_due(harness, task_id, "task.succeeded", instant)
    _set_due(harness, free, "task.submitted", instant)
    harness.clock.advance(MOVE_ASIDE_FULL_EVERY.total_seconds())
    instant -= MOVE_ASIDE_FULL_EVERY.total_seconds()

    def held() -> int:
        return sum(
            1 for kind, due in _pending(harness) if (kind, due) == ("task.succeeded", instant)
        )

    left, claimed = [], 0
    while True:
        claimed += len(outbox.claim("sweeper", limit=8, lease_seconds=30.0))
        left.append(held())
        if outbox._sweep is None:
            break
        assert len(left) < 10, left  # the sweep ends
    assert left == [3, 2, 0, 0], left  # pages: 2 held; 1 held and the free one; 2 held; none
    assert claimed == 1 and outbox.missed_by_window == 5


async def test_a_new_process_and_a_rolled_back_put_aside_look_at_everything_due(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process's first claim puts aside every due delivery that cannot go, however long
    ago it became due, in one pass (not a page: pages of one delivery here); a put-aside
    whose transaction failed is done again by the next claim."""
    from service import outbox as outbox_module
    from service.errors import StoreUnavailable

    monkeypatch.setattr(outbox_module, "MOVE_ASIDE_PAGE", 1)
    (task_id,) = await _retries_an_hour_away(harness, 1)
    harness.update(task_id, TaskStatus.succeeded)
    _set_due(harness, task_id, "task.succeeded", -86400)  # held since yesterday
    outbox = Outbox(harness.runtime.store)  # a process started now
    jobs = outbox._jobs

    def broken(*args: Any) -> Any:
        raise StoreUnavailable("the claim failed")

    monkeypatch.setattr(outbox, "_jobs", broken)
    await harness.track()  # something to claim, so the claim gets as far as _jobs
    with pytest.raises(StoreUnavailable):
        outbox.claim("worker", limit=5, lease_seconds=60)
    assert ("task.succeeded", -86400.0) in _pending(harness)  # rolled back with the claim
    monkeypatch.setattr(outbox, "_jobs", jobs)
    assert len(outbox.claim("worker", limit=5, lease_seconds=60)) == 1  # the new task's
    assert ("task.succeeded", 3600.0) in _pending(harness)


def _race(
    store: Store,
    first: Callable[[], object],
    second: Callable[[], object],
    pause_at: Callable[[str], bool],
) -> list[BaseException]:
    """Run ``first`` in a thread until it sends the statement ``pause_at`` picks, start
    ``second`` in another, let ``first`` go on a second later, and return what either raised
    (on PostgreSQL, a deadlock between them is an error)."""
    import sqlalchemy as sa

    paused, go = threading.Event(), threading.Event()

    def pause(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if threading.current_thread().name == "first" and not paused.is_set() and pause_at(sql):
            paused.set()
            go.wait(5)  # the second starts meanwhile

    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # returned
            errors.append(exc)

    threads = [
        threading.Thread(target=run, name="first", args=(first,)),
        threading.Thread(target=run, name="second", args=(second,)),
    ]
    sa.event.listen(store.engine, "after_cursor_execute", pause)
    try:
        threads[0].start()
        assert paused.wait(5)
        threads[1].start()
        threading.Timer(1.0, go.set).start()
        for thread in threads:
            thread.join(10)
    finally:
        go.set()
        sa.event.remove(store.engine, "after_cursor_execute", pause)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_put_offs_in_concurrent_records_never_wait_for_each_other(store: Store) -> None:
    """Two dispatchers record at once for one subscription: one a 410 (it disables the
    subscription, then puts off its pending deliveries), the other a 500 (its task's held event
    is put off) and a 410. The put-offs skip rows another transaction holds, so neither
    waits for the other while holding what the other needs (on PostgreSQL, a deadlock)."""
    import sqlalchemy as sa

    from service.lifecycle import TaskUpdate
    from service.models import Delivery
    from service.outbox import AttemptResult

    outbox = Outbox(store)
    outbox.create_subscription(
        "alice", url="https://hooks.example/s", event_types=None, providers=None, description=None
    )
    task_ids = [_tracked(store, provider_task_id=f"p{i}") for i in range(3)]
    one, two, three = sorted(
        outbox.claim("w1", limit=3, lease_seconds=60), key=lambda job: job.delivery_pk
    )
    for task_id in task_ids:  # each head gets an event held behind it
        store.apply_update(task_id, TaskUpdate(status=TaskStatus.running), UpdateSource.poll)
    gone, failed = AttemptResult(410, 1.0), AttemptResult(500, 1.0, error="HTTP 500")
    errors = _race(
        store,
        lambda: outbox.record_attempts([(one, gone)], "w1"),
        # Waits for the subscription row once it has put off its held event.
        lambda: outbox.record_attempts([(two, failed), (three, gone)], "w1"),
        lambda sql: sql.startswith("UPDATE subscription"),  # the first holds it
    )
    assert errors == []
    (subscription,) = outbox.list_subscriptions("alice")
    assert not subscription.enabled
    table = Delivery.__table__  # type: ignore[attr-defined]
    with store.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.status, table.c.attempts, table.c.next_attempt_at).order_by(
                table.c.pk
            )
        ).all()
    assert [(status, attempts) for status, attempts, _ in rows] == [
        ("dead", 1),
        ("pending", 1),  # the 500: waits for its retry, put off with the rest
        ("dead", 1),
        *[("pending", 0)] * 3,  # the held events
    ]
    later = utcnow() + DISABLED_PUT_OFF - timedelta(minutes=1)
    assert all(due > later for status, _, due in rows if status == "pending")


def test_a_410_recorded_while_the_subscription_is_deleted(store: Store) -> None:
    """A 410 Gone is recorded while the client deletes the subscription (its deliveries go
    with it): the record takes the subscription's row before its delivery's, the order the
    delete takes them in, so one waits for the other instead of a deadlock (PostgreSQL)."""
    from service.outbox import AttemptResult

    outbox = Outbox(store)
    subscription = outbox.create_subscription(
        "alice", url="https://hooks.example/s", event_types=None, providers=None, description=None
    )
    _tracked(store)
    (job,) = outbox.claim("w1", limit=1, lease_seconds=60)
    errors = _race(
        store,
        lambda: outbox.record_attempts([(job, AttemptResult(410, 1.0))], "w1"),
        lambda: outbox.delete_subscription("alice", subscription.id),
        # The record's read of the delivery, which locks it on PostgreSQL.
        lambda sql: sql.startswith("SELECT") and "FROM delivery" in sql,
    )
    assert errors == []
    assert outbox.list_subscriptions("alice") == []


def test_a_subscription_enabled_while_a_410_is_recorded_for_it(store: Store) -> None:
    """The client enables a subscription again while a dispatcher records a 410 from it, for
    a delivery claimed before it was disabled. The enable writes the subscription's row, then
    makes its put-off deliveries due with a blocking UPDATE; the record locks the subscription's
    row first too, then its own delivery, then puts off the rest skipping locked rows. The same
    order: the record waits for the enable to commit (no deadlock on PostgreSQL), and the 410,
    recorded last, disables the subscription again and puts its deliveries off."""
    from service.lifecycle import TaskUpdate
    from service.outbox import AttemptResult

    outbox = Outbox(store)
    subscription = outbox.create_subscription(
        "alice", url="https://hooks.example/s", event_types=None, providers=None, description=None
    )
    task_ids = [_tracked(store, provider_task_id=f"p{i}") for i in range(2)]
    in_flight, _ = outbox.claim("w1", limit=2, lease_seconds=60)
    for task_id in task_ids:  # events held behind the heads in flight
        store.apply_update(task_id, TaskUpdate(status=TaskStatus.running), UpdateSource.poll)
    outbox.update_subscription("alice", subscription.id, {"enabled": False})
    errors = _race(
        store,
        lambda: outbox.update_subscription("alice", subscription.id, {"enabled": True}),
        lambda: outbox.record_attempts([(in_flight, AttemptResult(410, 1.0))], "w1"),
        # The enable has locked the put-off deliveries and not yet the subscription.
        lambda sql: sql.startswith("UPDATE delivery"),
    )
    assert errors == []
    (after,) = outbox.list_subscriptions("alice")
    assert not after.enabled
    assert after.disabled_reason and "410" in after.disabled_reason
    rows = _delivery_states(store)
    assert [status for status, _ in rows] == ["dead", "pending", "pending", "pending"]
    later = utcnow() + DISABLED_PUT_OFF - timedelta(minutes=1)
    # The held events are put off again by the 410 (the other head is still in flight: its
    # own answer decides what becomes of it).
    assert all(due > later for _, due in rows[2:]), (rows, later)


def _delivery_states(store: Store) -> list[tuple[str, Any]]:
    """Every delivery's status and when it is next due, in creation order."""
    import sqlalchemy as sa

    from service.models import Delivery

    table = Delivery.__table__  # type: ignore[attr-defined]
    with store.engine.connect() as connection:
        statement = sa.select(table.c.status, table.c.next_attempt_at).order_by(table.c.pk)
        return [(row.status, row.next_attempt_at) for row in connection.execute(statement)]


def _plan_of(store: Store, run: Callable[[Any], object], select: str) -> str:
    """The plan of the one query on ``delivery`` whose SQL starts with ``select`` that
    ``run(connection)`` sends, with the parameters it sent."""
    import sqlalchemy as sa

    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, sql: str, parameters: Any, *args: Any) -> None:
        if sql.lstrip().startswith(select) and "FROM delivery" in sql:
            seen.append((sql, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        with store.core_transaction() as (connection, _):
            run(connection)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    ((sql, parameters),) = seen
    return query_plan(store.engine, sql, parameters)


def test_the_put_aside_reads_a_range_of_the_due_index(store: Store) -> None:
    """The plan of a windowed put-aside: both ends of its window bound the index range."""
    now = utcnow()

    def window(connection: Any) -> None:
        assert Outbox._move_aside(connection, now, now - timedelta(seconds=6)) == 0

    plan = _plan_of(store, window, "SELECT")
    if store.engine.dialect.name == "sqlite":
        assert (
            "SEARCH delivery USING INDEX ix_delivery_status_next_attempt "
            "(status=? AND next_attempt_at>? AND next_attempt_at<?)"
        ) in plan, plan
    else:
        assert "Index Scan using ix_delivery_status_next_attempt on delivery" in plan, plan
        condition = plan.split("Index Cond: ", 1)[1].split(" | ")[0]
        assert "next_attempt_at > " in condition and "next_attempt_at <= " in condition, plan


def test_a_sweep_page_reads_a_range_of_the_due_index_in_its_order(store: Store) -> None:
    """The plans of a sweep's page: a range of the due index from where the last page ended,
    read in the index's order (no sort of every due delivery); then the put-aside of that
    page, the same range bounded at both ends (the page's first and last delivery). So a page
    costs the same however long the due queue. (The put-aside first looked its page up by
    primary key, which SQLite planned as a walk of every due delivery: 486x the work at a
    million tasks in bench/store_scale.py.)"""
    from service.outbox import _Sweep

    now = utcnow()
    after = (now - timedelta(minutes=5), 42)
    sweep = _Sweep(now, after, periodic=True)

    def page(connection: Any) -> None:
        assert Outbox._sweep_page(connection, now, sweep) == (0, None)

    def put_aside(connection: Any) -> None:
        span = (after, (now - timedelta(minutes=1), 7))
        assert Outbox._move_aside(connection, now, span=span) == 0

    reading = _plan_of(store, page, "SELECT delivery.next_attempt_at, delivery.pk")
    moving = _plan_of(store, put_aside, "SELECT")
    for plan, upper in ((reading, "next_attempt_at <= "), (moving, "ROW(next_attempt_at, pk) <= ")):
        if store.engine.dialect.name == "sqlite":
            assert (
                "INDEX ix_delivery_status_next_attempt "
                "(status=? AND next_attempt_at>? AND next_attempt_at<?)"
            ) in plan, plan
            assert "TEMP B-TREE" not in plan, plan
        else:
            # Both columns of the key bound the range: a page that starts among many
            # deliveries due at the same instant does not read them from the first.
            assert "Scan using ix_delivery_status_next_attempt on delivery" in plan, plan
            condition = plan.split("Index Cond: ", 1)[1].split(" | ")[0]
            assert "ROW(next_attempt_at, pk) > " in condition and upper in condition, plan
    assert reading.startswith("Limit") or store.engine.dialect.name == "sqlite", reading
    assert "Sort" not in reading, reading


async def test_each_delivery_runs_in_its_tasks_log_context(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import observe

    await harness.subscribe("context")
    tasks = {await harness.track(), await harness.track()}
    dispatcher = harness.runtime.dispatcher
    seen: list[observe.LogContext] = []
    send = dispatcher.send

    async def spy(job: Any) -> Any:
        seen.append(observe.current())
        return await send(job)

    monkeypatch.setattr(dispatcher, "send", spy)
    assert await harness.deliver() == 2
    assert {context.task_id for context in seen} == tasks
    assert {context.provider for context in seen} == {"evolink"}
