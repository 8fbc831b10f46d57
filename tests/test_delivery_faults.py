"""Deliveries when something other than the subscriber's status goes wrong: an answer the
database cannot store as it came, a record the database refuses, a late record from a worker
whose delivery was taken over, a delivery that never left because no connection came free.

On the real app and database (SQLite, and PostgreSQL when TASKRELAY_TEST_DATABASE_URL is set),
driven on a fake clock as in ``test_events.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.dispatcher import Dispatcher
from service.errors import BadRequest, StoreUnavailable
from service.metrics import Metrics
from service.models import DeliveryAttempt, TaskStatus
from service.outbox import UNSENT_PUT_BACK, AttemptResult, DeliveryJob
from service.schemas import isoformat
from service.webclient import DeliveryFailed, Headers, Reply, WebhookClient
from tests.conftest import auth
from tests.test_events import Harness, _deliveries, _dispatcher, _pending, harnessed


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(database_url, tmp_path) as value:
        yield value


async def _attempt_log(harness: Harness, subscription_id: str) -> list[dict[str, Any]]:
    """Every delivery of the subscription, oldest first, each with its attempt log."""
    listed = await harness.client.get(
        f"/v1/subscriptions/{subscription_id}/deliveries", headers=auth()
    )
    details = []
    for delivery in reversed(listed.json()["data"]):
        response = await harness.client.get(f"/v1/deliveries/{delivery['id']}", headers=auth())
        details.append(response.json())
    return details


# --- what a subscriber answers, stored -----------------------------------------------------------


async def test_a_nul_in_an_answer_is_stored_replaced_and_fails_nothing(harness: Harness) -> None:
    """PostgreSQL text cannot hold a NUL: stored as it came, one subscriber's answer failed the
    record of every attempt of its batch, and they were all sent again each lease, for good."""
    harness.receiver.body.update(nul=b"ok\x00 \xff", ok=b"fine")
    nul, ok = await harness.subscribe("nul"), await harness.subscribe("ok")
    task_id = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    assert await harness.deliver() == 4
    harness.clock.advance(61)  # past any lease: nothing is sent again
    assert await harness.deliver() == 0
    for subscription, body in ((nul, "ok\ufffd \ufffd"), (ok, "fine")):
        deliveries = await _attempt_log(harness, subscription["id"])
        assert [(d["status"], d["attempts"]) for d in deliveries] == [("succeeded", 1)] * 2
        assert {a["response_body"] for d in deliveries for a in d["attempt_log"]} == {body}


async def test_unpaired_surrogates_and_nuls_in_an_attempt_are_stored_replaced(
    harness: Harness,
) -> None:
    """No text column takes an unpaired surrogate (no UTF-8 encoder does) nor, on PostgreSQL,
    a NUL: in the body, the attempt's error and the delivery's last error alike."""
    subscription = await harness.subscribe("odd")
    await harness.track()
    outbox = harness.runtime.outbox
    (job,) = outbox.claim("worker", limit=10, lease_seconds=60)
    odd = AttemptResult(500, 1.0, response_body="a\x00b\ud800c", error="HTTP 500 \udcff\x00")
    (state,) = outbox.record_attempts([(job, odd)], "worker")
    assert not isinstance(state, Exception) and state.status == "pending"
    (delivery,) = await _attempt_log(harness, subscription["id"])
    assert delivery["last_error"] == "HTTP 500 \ufffd\ufffd"
    ((attempt),) = delivery["attempt_log"]
    assert (attempt["response_body"], attempt["error"]) == (
        "a\ufffdb\ufffdc",
        "HTTP 500 \ufffd\ufffd",
    )


# --- records the database refuses ----------------------------------------------------------------


def _batch(jobs: list[DeliveryJob]) -> list[tuple[DeliveryJob, AttemptResult, Any]]:
    loop = asyncio.get_running_loop()
    return [(job, AttemptResult(200, 1.0), loop.create_future()) for job in jobs]


async def test_an_attempt_the_database_refuses_fails_alone(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's transaction failing on one attempt's row: each is then recorded on its own,
    so only that one fails (and is sent again), not every other subscriber's with it."""
    for name in ("a", "b", "c"):
        await harness.subscribe(name)
    await harness.track()
    outbox = harness.runtime.outbox
    dispatcher = _dispatcher(harness)
    jobs = outbox.claim(dispatcher.worker_id, limit=10, lease_seconds=60)
    poisoned = jobs[1].delivery_pk
    record_attempts = outbox.record_attempts
    transactions: list[int] = []

    def refusing(attempts: Any, worker: str) -> Any:
        transactions.append(len(attempts))
        if any(job.delivery_pk == poisoned for job, _ in attempts):
            raise BadRequest("A value in this request cannot be stored.")
        return record_attempts(attempts, worker)

    monkeypatch.setattr(outbox, "record_attempts", refusing)
    batch = _batch(jobs)
    await dispatcher._record_alone(batch)
    assert transactions == [3, 1, 1, 1]
    outcomes = [future.exception() or future.result().status for _, _, future in batch]
    assert outcomes[0] == outcomes[2] == "succeeded"
    assert isinstance(outcomes[1], BadRequest)
    assert sorted(_deliveries(harness)) == [
        ("task.submitted", "pending", 0, dispatcher.worker_id),  # still leased: sent again
        ("task.submitted", "succeeded", 1, None),
        ("task.submitted", "succeeded", 1, None),
    ]


async def test_an_unavailable_database_fails_the_batch_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not one transaction per attempt when the database is down: each would wait for it."""
    for name in ("a", "b"):
        await harness.subscribe(name)
    await harness.track()
    outbox = harness.runtime.outbox
    dispatcher = _dispatcher(harness)
    transactions: list[int] = []

    def unavailable(attempts: Any, worker: str) -> Any:
        transactions.append(len(attempts))
        raise StoreUnavailable("the database is unavailable")

    monkeypatch.setattr(outbox, "record_attempts", unavailable)
    batch = _batch(outbox.claim(dispatcher.worker_id, limit=10, lease_seconds=60))
    await dispatcher._record_alone(batch)
    assert transactions == [2]
    assert all(isinstance(future.exception(), StoreUnavailable) for _, _, future in batch)


# --- late records after a takeover --------------------------------------------------------------


async def test_a_late_failure_leaves_a_delivery_another_worker_settled_as_it_is(
    harness: Harness,
) -> None:
    """Worker A's lease ran out while it sent (its renewals failed) and B took the delivery over.
    A's success is recorded first; B's failure, recorded after, joins the attempt log but must
    not make the delivery pending again (it was sent again, after the task's later events)."""
    subscription = await harness.subscribe("taken-over")
    task_id = await harness.track()
    outbox = harness.runtime.outbox
    (a,) = outbox.claim("A", limit=10, lease_seconds=60)
    harness.clock.advance(61)
    (b,) = outbox.claim("B", limit=10, lease_seconds=60)
    delivered = harness.clock.now()
    assert outbox.record_attempt(a, "A", AttemptResult(200, 5.0)).status == "succeeded"
    harness.update(task_id, TaskStatus.succeeded)
    harness.clock.advance(5)
    late = outbox.record_attempt(b, "B", AttemptResult(503, 5.0, error="HTTP 503"))
    assert (late.status, late.attempts, late.lease_owner) == ("succeeded", 2, None)
    assert await harness.deliver() == 1  # the task's next event, not the first again
    assert [e["type"] for e in harness.receiver.events("taken-over")] == ["task.succeeded"]
    first, _ = await _attempt_log(harness, subscription["id"])
    assert (first["status"], first["last_status_code"], first["last_error"]) == (
        "succeeded",
        200,
        None,
    )
    assert first["delivered_at"] == isoformat(delivered)
    assert [a["status_code"] for a in first["attempt_log"]] == [200, 503]


async def test_a_late_failure_while_another_worker_sends_uses_up_no_retry(
    harness: Harness,
) -> None:
    """A's lease ran out and B, which took the delivery over, is sending it when A's failure
    is recorded: B's record decides. A's failure joined the schedule too (a retry planned,
    an attempt counted), so B's one failure dead-lettered the delivery an attempt early."""
    subscription = await harness.subscribe("taken-over-failing")
    await harness.track()
    outbox = harness.runtime.outbox
    outbox.schedule = (0.0, 5.0)  # two attempts, then dead
    (a,) = outbox.claim("A", limit=10, lease_seconds=60)
    harness.clock.advance(61)
    (b,) = outbox.claim("B", limit=10, lease_seconds=60)
    late = outbox.record_attempt(a, "A", AttemptResult(502, 1.0, error="HTTP 502"))
    assert (late.status, late.attempts, late.lease_owner) == ("pending", 0, "B")
    own = outbox.record_attempt(b, "B", AttemptResult(500, 1.0, error="HTTP 500"))
    assert (own.status, own.attempts, own.dead_lettered) == ("pending", 1, False)
    (delivery,) = await _attempt_log(harness, subscription["id"])
    assert (delivery["status"], delivery["last_status_code"]) == ("pending", 500)
    assert [a["status_code"] for a in delivery["attempt_log"]] == [502, 500]  # both logged


async def test_a_late_record_leaves_a_dead_letter_dead(harness: Harness) -> None:
    subscription = await harness.subscribe("dead")
    await harness.track()
    outbox = harness.runtime.outbox
    outbox.schedule = (0.0,)  # one attempt, then dead
    (a,) = outbox.claim("A", limit=10, lease_seconds=60)
    harness.clock.advance(61)
    (b,) = outbox.claim("B", limit=10, lease_seconds=60)
    killed = outbox.record_attempt(b, "B", AttemptResult(500, 1.0, error="HTTP 500"))
    assert (killed.status, killed.dead_lettered) == ("dead", True)
    late = outbox.record_attempt(a, "A", AttemptResult(502, 1.0, error="HTTP 502"))
    # Dead already: not dead-lettered again (the metric counts it once).
    assert (late.status, late.last_status_code, late.dead_lettered) == ("dead", 500, False)
    assert _pending(harness) == []
    (delivery,) = await _attempt_log(harness, subscription["id"])
    assert (delivery["status"], delivery["last_error"]) == ("dead", "HTTP 500")
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 502]


async def test_a_late_success_turns_a_dead_letter_into_a_delivered_one(harness: Harness) -> None:
    """The subscriber took worker A's attempt after B, which took the delivery over, got its
    last failure: the subscriber has the event, so it is no dead letter (a retry from the
    dead-letter list would send it twice)."""
    subscription = await harness.subscribe("dead-then-delivered")
    await harness.track()
    outbox = harness.runtime.outbox
    outbox.schedule = (0.0,)
    (a,) = outbox.claim("A", limit=10, lease_seconds=60)
    harness.clock.advance(61)
    (b,) = outbox.claim("B", limit=10, lease_seconds=60)
    assert outbox.record_attempt(b, "B", AttemptResult(500, 1.0, error="HTTP 500")).status == "dead"
    late = outbox.record_attempt(a, "A", AttemptResult(200, 1.0))
    assert (late.status, late.last_status_code, late.dead_lettered) == ("succeeded", 200, False)
    (delivery,) = await _attempt_log(harness, subscription["id"])
    assert (delivery["status"], delivery["last_error"]) == ("succeeded", None)
    assert delivery["delivered_at"] == isoformat(harness.clock.now())
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 200]


# --- deliveries that never left -----------------------------------------------------------------


class PoolFull:
    """The webhook client with every connection taken for its first ``times`` requests."""

    def __init__(self, http: WebhookClient, times: int) -> None:
        self.http = http
        self.times = times

    async def post(self, url: str, body: bytes, headers: Headers) -> Reply:
        if self.times:
            self.times -= 1
            raise DeliveryFailed(
                "no connection came free within 10 s (100 open)",
                kind="PoolTimeout",
                timed_out=True,
                unsent=True,
            )
        return await self.http.post(url, body, headers)

    async def aclose(self) -> None:
        await self.http.aclose()


async def test_a_delivery_no_connection_came_free_for_is_put_back_not_counted(
    harness: Harness,
) -> None:
    """Waiting for the client's pool is not the subscriber's failure: no attempt is counted
    or logged (on a one-attempt schedule, it would have been dead-lettered unsent), and it is
    due again shortly."""
    subscription = await harness.subscribe("crowded")
    await harness.track()
    outbox = harness.runtime.outbox
    outbox.schedule = (0.0,)
    metrics = Metrics()
    dispatcher = Dispatcher(
        outbox,
        PoolFull(harness.runtime.dispatcher.http, times=1),
        metrics=metrics,
        monotonic=harness.clock.monotonic,
    )
    assert await dispatcher.run_until_idle() == 1
    assert harness.receiver.received["crowded"] == []
    assert _deliveries(harness) == [("task.submitted", "pending", 0, None)]
    assert _pending(harness) == [("task.submitted", UNSENT_PUT_BACK.total_seconds())]
    assert metrics.counter("deliveries_total") == 0
    (delivery,) = await _attempt_log(harness, subscription["id"])
    assert delivery["attempt_log"] == []
    harness.clock.advance(UNSENT_PUT_BACK.total_seconds())
    assert await dispatcher.run_until_idle() == 1
    assert _deliveries(harness) == [("task.submitted", "succeeded", 1, None)]
    assert len(harness.receiver.received["crowded"]) == 1


async def test_a_put_back_leaves_a_delivery_another_worker_took_over_alone(
    harness: Harness,
) -> None:
    await harness.subscribe("taken")
    await harness.track()
    outbox = harness.runtime.outbox
    (a,) = outbox.claim("A", limit=10, lease_seconds=60)
    harness.clock.advance(61)
    outbox.claim("B", limit=10, lease_seconds=60)
    unsent = AttemptResult(None, 10_000.0, error="PoolTimeout: no connection", sent=False)
    assert outbox.record_attempt(a, "A", unsent).lease_owner == "B"
    assert _pending(harness) == [("task.submitted", -61.0)]  # as B claimed it: B's to settle
    with harness.runtime.store.engine.connect() as connection:
        table = DeliveryAttempt.__table__  # type: ignore[attr-defined]
        assert connection.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0


# --- the schedule's first entry ----------------------------------------------------------------


async def test_the_first_attempt_waits_the_schedules_first_entry(
    database_url: str, tmp_path: Path
) -> None:
    """TASKRELAY_DELIVERY_SCHEDULE lists the waits before attempt 1, 2, 3...: the first was
    ignored (every delivery was due at once). Events from the API (track) and from updates
    (the callback path: pipelined on PostgreSQL) alike."""
    async with harnessed(database_url, tmp_path, TASKRELAY_DELIVERY_SCHEDULE="10m,5s") as harness:
        await harness.subscribe("patient")
        task_id = await harness.track()
        harness.update(task_id, TaskStatus.running, 10)
        harness.update(task_id, TaskStatus.succeeded)  # coalesces the progress event
        assert _pending(harness) == [("task.submitted", 600.0), ("task.succeeded", 600.0)]
        harness.clock.advance(599)
        assert await harness.deliver() == 0
        harness.clock.advance(1)
        assert await harness.deliver() == 2
