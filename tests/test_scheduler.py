"""The polling fallback through the real app, sandbox and database, on a fake clock shared by
TaskRelay, the mounted sandbox and the rate limiter, so minutes of provider time take
milliseconds. The scheduler is driven pass by pass (``run_until_idle``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select
from starlette.applications import Starlette

from service.app import create_app
from service.errors import StoreUnavailable, UpstreamUnavailable
from service.lifecycle import TaskUpdate
from service.metrics import Metrics
from service.models import Task, TaskStatus
from service.runtime import Runtime
from service.scheduler import ProviderLimiter, ProviderPaused, Scheduler
from tests.conftest import BOB, auth, error_code, make_settings, until

ASYNC_PROVIDERS = ["grsai", "gptimage15", "evolink", "apiinone"]


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 1_000_000.0
        self.epoch = datetime(2026, 11, 20, tzinfo=UTC) - timedelta(seconds=self.seconds)

    def now(self) -> datetime:
        return self.epoch + timedelta(seconds=self.seconds)

    def monotonic(self) -> float:
        return self.seconds

    async def sleep(self, seconds: float) -> None:
        self.seconds += max(0.0, seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


class Harness:
    def __init__(self, app: Starlette, client: httpx.AsyncClient, clock: FakeClock) -> None:
        self.app = app
        self.client = client
        self.clock = clock
        self.runtime: Runtime = app.state.runtime
        self.scheduler: Scheduler = self.runtime.scheduler
        self.sandbox: Any = app.state.sandbox

    async def submit(self, provider: str, prompt: str, token: str | None = None) -> str:
        response = await self.client.post(
            "/v1/tasks",
            json={"provider": provider, "prompt": prompt},
            headers=auth(token) if token else auth(),
        )
        assert response.status_code == 202, response.text
        await self.runtime.submitter.idle()
        task_id: str = response.json()["id"]
        return task_id

    async def task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (
            await self.client.get(f"/v1/tasks/{task_id}", headers=auth())
        ).json()
        return result

    def queries(self, provider: str | None = None) -> int:
        return int(
            self.runtime.metrics.counter(
                "status_queries_total", **({"provider": provider} if provider else {})
            )
        )

    def sandbox_task(self, provider_task_id: str) -> Any:
        return self.sandbox.tasks[provider_task_id]

    async def run_until_final(
        self, task_ids: list[str], step: float = 1.0, limit: int = 2000
    ) -> None:
        for _ in range(limit):
            await self.scheduler.run_until_idle()
            states = [(await self.task(task_id))["status"] for task_id in task_ids]
            if all(state in {"succeeded", "failed", "expired", "canceled"} for state in states):
                return
            self.clock.advance(step)
        raise AssertionError("tasks did not finish")


async def start_harness(settings: Any, clock: FakeClock) -> AsyncIterator[Harness]:
    transport = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
    app = create_app(
        settings,
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        http_transport=transport,
    )
    transport.app = app
    async with app.router.lifespan_context(app):
        client_transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=client_transport, base_url="http://testserver"
        ) as client:
            yield Harness(app, client, clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(database_url: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Harness]:
    settings = make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_GRSAI_MODE="poll",
        TASKRELAY_EVOLINK_DEADLINE="10m",
        TASKRELAY_APIINONE_POLL_RATE="2",
    )
    async for harness in start_harness(settings, clock):
        harness.sandbox.set_behaviour("*", {"callback": "drop"})
        yield harness


# --- callbacks lost -------------------------------------------------------------------------


async def test_every_task_ends_right_when_all_callbacks_are_lost(harness: Harness) -> None:
    tasks = {}
    for provider in ASYNC_PROVIDERS:
        tasks[harness_key(provider, "ok")] = await harness.submit(
            provider, "ok sandbox:duration=20"
        )
        tasks[harness_key(provider, "bad")] = await harness.submit(
            provider, "bad sandbox:duration=20 sandbox:fail=1"
        )
    await harness.scheduler.run_until_idle()
    assert harness.queries() == 0  # nothing is due before the expected finish
    await harness.run_until_final(list(tasks.values()), step=5.0)
    for key, task_id in tasks.items():
        task = await harness.task(task_id)
        assert task["last_update_source"] == "poll", task
        if key.endswith("ok"):
            assert task["status"] == "succeeded" and task["images"], task
        else:
            assert task["status"] == "failed"
            assert task["error"]["code"] == "content_policy_violation"
    # EvoLink's estimate (20 s) is exact in the sandbox: one look per task suffices.
    evolink_ids = [tasks[harness_key("evolink", kind)] for kind in ("ok", "bad")]
    for task_id in evolink_ids:
        provider_id = (await harness.task(task_id))["provider_task_id"]
        assert len(harness.sandbox_task(provider_id).status_queries) == 1


def harness_key(provider: str, kind: str) -> str:
    return f"{provider}:{kind}"


async def test_no_status_queries_when_callbacks_arrive(harness: Harness) -> None:
    harness.sandbox.set_behaviour("*", {"callback": "normal"})
    ids = [
        await harness.submit(p, "cb sandbox:duration=5") for p in ASYNC_PROVIDERS if p != "grsai"
    ]
    # The sandbox's callbacks land (its sleeps move the fake clock; the store works in
    # threads, so give it real time, bounded).
    for _ in range(500):
        states = {(await harness.task(task_id))["status"] for task_id in ids}
        if states == {"succeeded"}:
            break
        await asyncio.sleep(0.01)
    assert states == {"succeeded"}
    harness.clock.advance(3600 * 2)
    await harness.scheduler.run_until_idle()
    assert harness.queries() == 0
    assert all(not t.status_queries for t in harness.sandbox.tasks.values())


# --- errors and limits ----------------------------------------------------------------------


@pytest.mark.parametrize("error", ["429", "500"])
async def test_status_errors_back_off_and_honour_retry_after(harness: Harness, error: str) -> None:
    task_id = await harness.submit(
        "evolink", f"storm sandbox:duration=10 sandbox:status_errors=4 sandbox:status_error={error}"
    )
    await harness.run_until_final([task_id], step=0.5)
    task = await harness.task(task_id)
    assert task["status"] == "succeeded"
    times = [q.at for q in harness.sandbox_task(task["provider_task_id"]).status_queries]
    assert len(times) == 5  # four failures, then the answer
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Error backoff 5 s, 10 s, 20 s, 40 s (+/- 10 % jitter, on 0.5 s steps): never hot.
    for gap, expected in zip(gaps, [5, 10, 20, 40], strict=True):
        assert expected * 0.9 - 0.01 <= gap <= expected * 1.1 + 0.51, gaps
    assert harness.queries("evolink") == 5


async def test_per_provider_rate_cap(harness: Harness) -> None:
    ids = [await harness.submit("apiinone", f"t{i} sandbox:duration=5") for i in range(12)]
    harness.clock.advance(60)
    await harness.scheduler.run_until_idle()
    starts = sorted(
        q.at
        for t in harness.sandbox.tasks.values()
        if t.provider == "apiinone"
        for q in t.status_queries
    )
    assert len(starts) == 12
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.5 - 1e-6  # TASKRELAY_APIINONE_POLL_RATE=2
    for task_id in ids:
        assert (await harness.task(task_id))["status"] == "succeeded"


async def test_limiter_caps_concurrency_and_pauses_after_429(clock: FakeClock) -> None:
    limiter = ProviderLimiter(3, 1000.0, monotonic=clock.monotonic, sleep=clock.sleep)
    running = 0
    peak = 0

    async def query() -> None:
        nonlocal running, peak
        async with limiter:
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1

    await asyncio.gather(*(query() for _ in range(20)))
    assert peak == 3
    limiter.pause(1.5)  # a short pause is waited out...
    before = clock.monotonic()
    async with limiter:
        assert clock.monotonic() - before >= 1.5
    limiter.pause(30)  # ...a long one is refused, so the caller hands the task back
    with pytest.raises(ProviderPaused) as paused:
        async with limiter:
            pass
    assert paused.value.seconds == pytest.approx(30)


# --- deadlines ------------------------------------------------------------------------------


async def test_deadline_expires_after_one_last_query_and_late_results_still_land(
    harness: Harness,
) -> None:
    task_id = await harness.submit("evolink", "slow sandbox:duration=3000")
    await harness.run_until_final([task_id], step=10.0)
    task = await harness.task(task_id)
    assert task["status"] == "expired"
    assert task["error"]["code"] == "deadline_exceeded"
    assert task["last_update_source"] == "timeout"
    created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
    completed = datetime.fromisoformat(task["completed_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=10) <= completed - created < timedelta(minutes=10, seconds=11)
    sandbox_task = harness.sandbox_task(task["provider_task_id"])
    last_query = sandbox_task.status_queries[-1].at
    assert last_query >= harness.clock.monotonic() - 10  # the final look happened at the deadline
    # The provider finishes later: a refresh (or its callback) still lands on the expired task.
    harness.clock.advance(3000)
    refreshed = (await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())).json()
    assert refreshed["status"] == "succeeded"
    assert refreshed["error"] is None


async def test_a_pause_at_the_deadline_puts_off_the_last_look_instead_of_expiring(
    harness: Harness,
) -> None:
    # The provider finishes 20 s after the 10-minute deadline; another task's 429 has paused
    # it for two minutes just as this one reaches its deadline.
    task_id = await harness.submit("evolink", "late sandbox:duration=620")
    harness.clock.advance(600)
    queries = harness.queries()
    harness.scheduler.limiters["evolink"].pause(120)
    await harness.scheduler.run_until_idle()
    task = await harness.task(task_id)
    assert task["status"] == "queued"  # not expired unasked (callbacks are lost here)
    assert harness.queries() == queries
    with Session(harness.runtime.engine) as session:
        row = session.exec(select(Task).where(Task.id == task_id)).one()
        assert row.lease_owner is None
        assert row.next_check_at is not None
        wait = (row.next_check_at.replace(tzinfo=UTC) - harness.clock.now()).total_seconds()
        assert 119 <= wait <= 121  # the end of the pause, though the deadline has passed
    harness.clock.advance(60)  # still paused: nothing happens, nothing spins
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["status"] == "queued"
    harness.clock.advance(61)
    await harness.scheduler.run_until_idle()  # the last look, after the pause
    task = await harness.task(task_id)
    assert task["status"] == "succeeded"
    assert task["last_update_source"] == "poll"
    assert harness.queries() == queries + 1


async def test_a_pause_renewed_at_the_end_of_the_put_off_last_look_expires_the_task(
    harness: Harness,
) -> None:
    """A provider answering 429 to every query: each pause let one query out (another
    task's), whose 429 renewed the pause, and the tasks past their deadline behind it were
    put off again and again, the n-th expiring n pauses late (found by the stuck-task hunt).
    A pause puts the last look off once, as a refusal does."""
    task_id = await harness.submit("evolink", "late sandbox:duration=900 sandbox:callback=drop")
    harness.clock.advance(600)
    queries = harness.queries()
    harness.scheduler.limiters["evolink"].pause(120)
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["status"] == "queued"  # put off once
    harness.clock.advance(121)
    harness.scheduler.limiters["evolink"].pause(120)  # another task's 429, just now
    await harness.scheduler.run_until_idle()
    task = await harness.task(task_id)
    assert task["status"] == "expired"
    assert task["error"]["code"] == "deadline_exceeded"
    assert (
        "the last status query failed (upstream_rate_limited: evolink kept status "
        in (task["error"]["message"])
    )
    assert harness.queries() == queries  # never asked: the provider said not to


async def test_a_429_on_the_last_look_puts_it_off_by_retry_after_instead_of_expiring(
    harness: Harness,
) -> None:
    # The provider finishes right at the 10-minute deadline, and answers the last look with
    # 429 Retry-After: 1, as a pause known beforehand would have made the scheduler wait.
    task_id = await harness.submit(
        "evolink", "busy sandbox:duration=600 sandbox:status_errors=1 sandbox:status_error=429"
    )
    harness.clock.advance(600)
    queries = harness.queries()
    await harness.scheduler.run_until_idle()
    task = await harness.task(task_id)
    assert task["status"] == "queued"  # not expired on a refusal that said when to ask
    assert harness.queries() == queries + 1
    with Session(harness.runtime.engine) as session:
        row = session.exec(select(Task).where(Task.id == task_id)).one()
        assert row.lease_owner is None
        assert row.next_check_at is not None
        wait = (row.next_check_at.replace(tzinfo=UTC) - harness.clock.now()).total_seconds()
        assert 0.9 <= wait <= 1.1  # Retry-After, though the deadline has passed
    harness.clock.advance(1)
    await harness.scheduler.run_until_idle()  # the last look, made again
    task = await harness.task(task_id)
    assert task["status"] == "succeeded"
    assert task["last_update_source"] == "poll"
    assert harness.queries() == queries + 2


@pytest.mark.parametrize("status_error", ["429", "500"])
async def test_a_provider_refusing_every_last_look_cannot_keep_a_task_alive(
    harness: Harness, status_error: str
) -> None:
    """A 429 puts the last look off once: refused again, the task expires. An error that
    says nothing of when to ask again (a 500 without Retry-After) expires it at once."""
    task_id = await harness.submit(
        "evolink",
        f"busy sandbox:duration=600 sandbox:status_errors=1000 sandbox:status_error={status_error}",
    )
    harness.clock.advance(600)
    queries = harness.queries()
    for _ in range(10):
        await harness.scheduler.run_until_idle()
        harness.clock.advance(1)
    task = await harness.task(task_id)
    assert task["status"] == "expired"
    assert task["error"]["code"] == "deadline_exceeded"
    assert harness.queries() == queries + (2 if status_error == "429" else 1)
    # The message says what the last look found, not only that time ran out.
    code = "upstream_rate_limited" if status_error == "429" else "upstream_unavailable"
    assert f"the last status query failed ({code}: " in task["error"]["message"]


async def past_the_deadline(harness: Harness, task_id: str) -> dict[str, Any]:
    """The task after the scheduler's passes an hour on (the default deadline) and beyond."""
    harness.clock.advance(3600)
    for _ in range(3):
        await harness.scheduler.run_until_idle()
        harness.clock.advance(1)
    return await harness.task(task_id)


async def test_a_task_whose_provider_id_never_came_says_so_when_it_expires(
    harness: Harness,
) -> None:
    """Tracked without its provider task id, and never given one: there was nothing to ask,
    and the expiry says so."""
    response = await harness.client.post(
        "/v1/tasks/track", json={"provider": "evolink"}, headers=auth()
    )
    task_id = response.json()["id"]
    task = await past_the_deadline(harness, task_id)
    assert task["status"] == "expired"
    assert "the provider's id for the task never came" in task["error"]["message"]


@pytest.mark.parametrize("provider", ["openai", "evolink"])
async def test_a_submission_never_sent_by_its_deadline_says_so_when_it_expires(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    """Still waiting for a submission slot (or for a process to run it) at its deadline: the
    scheduler's expiry says it was never sent, as the submitter would have, not that the
    provider's id never came."""
    monkeypatch.setattr(harness.runtime.submitter, "submit", lambda *args, **kwargs: None)
    task_id = await harness.submit(provider, "never sent")
    task = await past_the_deadline(harness, task_id)
    assert task["status"] == "expired"
    assert task["error"]["code"] == "submit_deadline_passed"
    assert f"passed before it could be sent to {provider}" in task["error"]["message"]
    assert "not billed" in task["error"]["message"]


@pytest.mark.parametrize("provider", ["openai", "evolink"])
async def test_a_task_sent_without_a_recorded_answer_says_so_when_it_expires(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    """The process sending it was killed while it waited for the answer: the attempt is
    counted, the answer never recorded, no retry planned. At the deadline the task expires
    saying that, not that the provider was silent."""
    monkeypatch.setattr(harness.runtime.submitter, "submit", lambda *args, **kwargs: None)
    task_id = await harness.submit(provider, "killed while it waited")
    assert harness.runtime.store.mark_submit_attempt(task_id, 1)  # the attempt, then the kill
    task = await past_the_deadline(harness, task_id)
    assert task["status"] == "expired" and task["error"]["code"] == "deadline_exceeded"
    message = task["error"]["message"]
    assert f"TaskRelay sent the task to {provider} but had recorded no answer" in message
    assert "may still be waiting for its answer" in message
    assert "submit a new task" not in message  # it may yet succeed: a second would cost twice
    came = "no callback came" if provider == "evolink" else "it cannot be asked"
    assert came in message


# PollPolicy.answer_within: the submission's timeouts added up, and the 300 s margin.
ANSWER_WITHIN = {"openai": 640.0, "grsai": 370.0}  # GrsAI polled: the shared client's timeouts


@pytest.mark.parametrize("provider", ["openai", "grsai", "evolink"])
async def test_an_answer_lost_with_its_process_expires_the_task_long_before_its_deadline(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    """Killed while it waited for the answer (OpenAI's is the image; GrsAI's, polled, the id
    to poll with): neither calls back, and neither can be asked about a task without its id.
    Once a live process would have recorded the answer (the request's timeouts and a margin
    after it was sent), nothing else can settle the task: it expires then, not an hour
    later, and says why. EvoLink calls back: its task waits for the callback until the
    deadline."""
    monkeypatch.setattr(harness.runtime.submitter, "submit", lambda *args, **kwargs: None)
    task_id = await harness.submit(provider, "killed while it waited")
    store = harness.runtime.store
    assert store.mark_submit_attempt(task_id, 1)  # the attempt, then the kill
    within = ANSWER_WITHIN.get(provider)
    assert store.policy(provider).answer_within == within

    async def after(seconds: float) -> dict[str, Any]:
        harness.clock.advance(seconds)
        await harness.scheduler.run_until_idle()
        return await harness.task(task_id)

    # (EvoLink's deadline here is 10 minutes.)
    assert (await after((within or 300) - 1))["status"] == "queued"
    task = await after(2)
    if within is None:
        assert task["status"] == "queued"  # its callback may still come
        assert (await past_the_deadline(harness, task_id))["status"] == "expired"
        return
    assert task["status"] == "expired"
    assert task["error"]["code"] == "submission_unanswered"
    message = task["error"]["message"]
    assert f"TaskRelay sent the task to {provider} but had heard nothing more of" in message
    assert "cannot be asked about a task without its id" in message
    assert "It is not sent again" in message
    assert harness.runtime.metrics.counter("tasks_expired_total", provider=provider) == 1
    events = (await harness.client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()
    assert [event["type"] for event in events["data"]][-1] == "task.expired"
    assert harness.queries() == 0  # nothing was asked: there was nothing to ask


async def expired_then_named(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, duration: float
) -> tuple[str, str]:
    """A GrsAI task (polled, ``duration`` s at GrsAI) whose submission's answer, the id to
    poll with, is recorded only after the task expired for want of it: the process alive
    after all, its record held up past the margin (a database it could not write to). Its
    id and GrsAI's."""
    submitter = harness.runtime.submitter
    release = asyncio.Event()
    record = submitter._record_reply

    async def held_up(task_id: str, update: Any) -> None:
        await release.wait()
        await record(task_id, update)

    monkeypatch.setattr(submitter, "_record_reply", held_up)
    response = await harness.client.post(
        "/v1/tasks",
        json={"provider": "grsai", "prompt": f"late sandbox:duration={duration:g}"},
        headers=auth(),
    )
    task_id = response.json()["id"]

    async def sent() -> bool:
        return len(harness.sandbox.tasks) == 1

    assert await eventually(sent)
    harness.clock.advance(ANSWER_WITHIN["grsai"] + 1)
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["error"]["code"] == "submission_unanswered"
    release.set()
    await submitter.idle()
    task = await harness.task(task_id)
    (provider_task_id,) = harness.sandbox.tasks
    assert task["status"] == "expired" and task["provider_task_id"] == provider_task_id
    return task_id, provider_task_id


async def event_types(harness: Harness, task_id: str) -> list[str]:
    response = await harness.client.get(f"/v1/tasks/{task_id}/events", headers=auth())
    return [event["type"] for event in response.json()["data"]]


async def test_an_answer_recorded_after_all_is_followed_until_the_provider_settles_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late id lands on the expired task, which is then polled like any task until its
    deadline: GrsAI's final word settles it, and after that nothing is asked."""
    task_id, _ = await expired_then_named(harness, monkeypatch, duration=900)
    harness.clock.advance(900)  # the image is done at GrsAI
    for _ in range(5):
        await harness.scheduler.run_until_idle()
        harness.clock.advance(30)
    task = await harness.task(task_id)
    assert task["status"] == "succeeded" and task["images"], task
    assert task["last_update_source"] == "poll"
    assert (await event_types(harness, task_id))[-2:] == ["task.expired", "task.succeeded"]
    harness.clock.advance(3600)
    queries = harness.queries()
    await harness.scheduler.run_until_idle()
    assert harness.queries() == queries


async def test_a_followed_task_unsettled_at_its_deadline_stays_expired_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followed, but GrsAI is still at it when the deadline comes: one last look, and the
    task stays expired, with one expiry event, counted once, and no look after that."""
    task_id, _ = await expired_then_named(harness, monkeypatch, duration=7200)
    harness.clock.advance(600)
    await harness.scheduler.run_until_idle()
    assert harness.queries("grsai") == 1  # followed: GrsAI says it is still running
    await past_the_deadline(harness, task_id)
    task = await harness.task(task_id)
    assert task["status"] == "expired" and task["error"]["code"] == "submission_unanswered"
    assert harness.queries("grsai") >= 2  # and the last look, at the deadline
    assert (await event_types(harness, task_id)).count("task.expired") == 1
    assert harness.runtime.metrics.counter("tasks_expired_total", provider="grsai") == 1
    queries = harness.queries()
    harness.clock.advance(3600)
    await harness.scheduler.run_until_idle()
    assert harness.queries() == queries


async def test_a_followed_task_keeps_its_pauses_and_error_backoff(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expired but followed, it is not "final, no more looks": a provider's pause (defer)
    and a failed query's Retry-After hold it back like any task, not an immediate look."""
    task_id, _ = await expired_then_named(harness, monkeypatch, duration=7200)
    store = harness.runtime.store

    def wait() -> float:
        with Session(harness.runtime.engine) as session:
            row = session.exec(select(Task).where(Task.id == task_id)).one()
            assert row.next_check_at is not None
            return (row.next_check_at - harness.clock.now()).total_seconds()

    store.defer(task_id, None, seconds=60)
    assert wait() == pytest.approx(60, abs=1)
    refused = UpstreamUnavailable("busy", provider="grsai", retry_after=600)
    store.record_poll(task_id, None, update=None, error=refused)
    assert wait() >= 299  # Retry-After, up to the 5-minute cap
    assert (await harness.task(task_id))["status"] == "expired"


async def test_a_task_whose_last_attempt_was_refused_does_not_say_it_got_no_answer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry planned (the last attempt was answered with a refusal) when the deadline
    comes: the expiry does not claim the answer was lost."""
    monkeypatch.setattr(harness.runtime.submitter, "submit", lambda *args, **kwargs: None)
    task_id = await harness.submit("evolink", "refused, then the deadline")
    store = harness.runtime.store
    assert store.mark_submit_attempt(task_id, 1)
    assert store.plan_submit_retry(task_id, 1, store.clock() + timedelta(hours=2))
    task = await past_the_deadline(harness, task_id)
    assert task["status"] == "expired"
    assert "had recorded no answer" not in task["error"]["message"]


async def finished_task_queries(harness: Harness, task_id: str) -> int:
    """Status queries of ``task_id`` in five passes after a refresh that failed upstream; the
    clock does not move, so a planned look cannot come due."""
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 503
    before = harness.queries()
    for _ in range(5):
        await harness.scheduler.run_once()
    with Session(harness.runtime.engine) as session:
        row = session.exec(select(Task).where(Task.id == task_id)).one()
        assert row.next_check_at is None
    return harness.queries() - before


async def test_a_finished_task_is_never_queried_again_after_a_failed_refresh(
    harness: Harness,
) -> None:
    harness.sandbox.set_behaviour("*", {"callback": "normal"})
    task_id = await harness.submit(
        "evolink", "done sandbox:duration=5 sandbox:status_errors=1000 sandbox:status_error=500"
    )
    harness.clock.advance(6)
    assert await eventually(partial(succeeded, harness, task_id))  # by its callback
    harness.clock.advance(3600)  # well past the deadline
    assert await finished_task_queries(harness, task_id) == 0
    assert (await harness.task(task_id))["status"] == "succeeded"


async def test_an_expired_task_is_never_queried_again_after_a_failed_refresh(
    harness: Harness,
) -> None:
    task_id = await harness.submit(
        "evolink",
        "slow sandbox:duration=5000 sandbox:status_errors=100000 sandbox:status_error=500",
    )
    await harness.run_until_final([task_id], step=30.0)
    assert (await harness.task(task_id))["status"] == "expired"
    assert await finished_task_queries(harness, task_id) == 0


async def test_tasks_without_a_provider_id_expire_at_their_deadline_unqueried(
    harness: Harness,
) -> None:
    tracked = (
        await harness.client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth())
    ).json()
    harness.clock.advance(599)  # the harness's EvoLink deadline is 10 minutes
    await harness.scheduler.run_until_idle()
    assert (await harness.task(tracked["id"]))["status"] == "queued"
    harness.clock.advance(2)
    await harness.scheduler.run_until_idle()
    task = await harness.task(tracked["id"])
    assert task["status"] == "expired"
    assert harness.queries() == 0


# --- refresh --------------------------------------------------------------------------------


async def test_refresh_queries_the_provider_now(harness: Harness) -> None:
    task_id = await harness.submit("gptimage15", "now sandbox:duration=5")
    harness.clock.advance(6)
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["last_update_source"] == "poll"
    assert harness.queries("gptimage15") == 1
    other = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth(BOB))
    assert other.status_code == 404


async def test_refresh_refuses_what_cannot_be_asked(harness: Harness) -> None:
    tracked = (
        await harness.client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth())
    ).json()
    response = await harness.client.post(f"/v1/tasks/{tracked['id']}/refresh", headers=auth())
    assert response.status_code == 409
    assert error_code(response) == "not_queryable"
    assert "set one with PATCH" in response.json()["error"]["message"]
    # A submitted task's id comes from the provider's answer: PATCH would refuse it, so the
    # message does not send the client there.
    submitted = await harness.submit("evolink", "retrying sandbox:submit_error=500")
    response = await harness.client.post(f"/v1/tasks/{submitted}/refresh", headers=auth())
    assert response.status_code == 409 and error_code(response) == "not_queryable"
    message = response.json()["error"]["message"]
    assert "PATCH" not in message and "from the provider's answer" in message


@pytest.mark.parametrize("status_error", ["500", "503"])
async def test_refresh_reports_provider_errors(harness: Harness, status_error: str) -> None:
    """Unavailable, with a Retry-After even when the provider gave none: the wait after a
    failed status query (TASKRELAY_POLL_ERROR_BACKOFF, 5 s by default)."""
    task_id = await harness.submit(
        "evolink",
        f"err sandbox:duration=5 sandbox:status_errors=1 sandbox:status_error={status_error}",
    )
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 503
    assert error_code(response) == "upstream_unavailable"
    assert response.headers["retry-after"] == "5"


def next_look(harness: Harness, task_id: str) -> datetime | None:
    """The task's next scheduled look (``next_check_at``), from the database."""
    with Session(harness.runtime.engine) as session:
        task = session.exec(select(Task).where(Task.id == task_id)).one()
        return task.next_check_at


# EvoLink's estimate (the sandbox's duration) sets the first look: 100 s after creation,
# plus the grace; the callback is lost, so only looks can find the result.
SLOW = "slow sandbox:duration=100 sandbox:callback=drop"


async def test_an_early_refresh_leaves_the_schedule_as_it_was(harness: Harness) -> None:
    """A refresh is not a scheduled look: made before the expected finish, it does not start
    the backoff (looks 5 s, 10 s, 20 s ... after it) while the callback may still come."""
    task_id = await harness.submit("evolink", SLOW)
    first = next_look(harness, task_id)
    assert first is not None and first > harness.clock.now() + timedelta(seconds=90)
    harness.clock.advance(1)
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 200 and response.json()["status"] in {"queued", "running"}
    assert harness.queries("evolink") == 1
    assert next_look(harness, task_id) == first
    for _ in range(60):  # a minute of scheduler passes: nobody asks
        harness.clock.advance(1)
        await harness.scheduler.run_until_idle()
    assert harness.queries("evolink") == 1


@pytest.mark.parametrize("refusal", ["status_error=500", "status_error=429"])
async def test_a_refused_refresh_does_not_bring_the_next_look_forward(
    harness: Harness, refusal: str
) -> None:
    """A failed refresh (a 500: the error backoff; a 429: the provider's pause) may put the
    next look later, never earlier than it was."""
    task_id = await harness.submit("evolink", f"{SLOW} sandbox:status_errors=1 sandbox:{refusal}")
    first = next_look(harness, task_id)
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 503, response.text
    assert next_look(harness, task_id) == first
    assert (await harness.task(task_id))["status"] in {"queued", "running"}


async def test_a_refresh_answered_about_another_task_is_a_502_and_a_failed_query(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's answer names another provider task: not taken, counted and reported as
    the protocol error it is (it was a 200 with the task unchanged, and an "ok" query)."""
    task_id = await harness.submit("evolink", SLOW)
    adapter = harness.runtime.adapters["evolink"]

    async def mixed_up(provider_task_id: str) -> TaskUpdate:
        return TaskUpdate(status=TaskStatus.succeeded, provider_task_id="someone-elses-task")

    monkeypatch.setattr(adapter, "query_status", mixed_up)
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 502, response.text
    assert error_code(response) == "upstream_protocol_error"
    message = response.json()["error"]["message"]
    assert "the state of another task" in message
    assert "someone-elses-task" not in message  # maybe another client's: not quoted
    metrics = harness.runtime.metrics
    assert metrics.counter("status_queries_total", provider="evolink", outcome="ok") == 0
    failed = metrics.counter(
        "status_queries_total", provider="evolink", outcome="upstream_protocol_error"
    )
    assert failed == 1
    assert (await harness.task(task_id))["status"] != "succeeded"


# --- several workers ------------------------------------------------------------------------


async def test_two_schedulers_never_query_one_task_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [await harness.submit("gptimage15", f"w{i} sandbox:duration=5") for i in range(16)]
    adapter = harness.runtime.adapters["gptimage15"]
    real_query = adapter.query_status
    in_flight: Counter[str] = Counter()
    overlaps: list[str] = []
    queried_by: Counter[str] = Counter()

    async def slow_query(provider_task_id: str) -> Any:
        in_flight[provider_task_id] += 1
        if in_flight[provider_task_id] > 1:
            overlaps.append(provider_task_id)
        await asyncio.sleep(0.01)  # real time: the other worker gets its chance meanwhile
        try:
            return await real_query(provider_task_id)
        finally:
            in_flight[provider_task_id] -= 1

    monkeypatch.setattr(adapter, "query_status", slow_query)
    first = harness.scheduler
    second = Scheduler(
        harness.runtime.store,
        harness.runtime.adapters,
        first.limiters,
        metrics=Metrics(),
        clock=harness.clock.now,
        worker_id="second-worker",
    )
    original_claim = harness.runtime.store.claim_due

    def counting_claim(provider: str, worker: str, **kwargs: Any) -> Any:
        claims = original_claim(provider, worker, **kwargs)
        queried_by[worker] += len(claims)
        return claims

    monkeypatch.setattr(harness.runtime.store, "claim_due", counting_claim)
    harness.clock.advance(60)
    for _ in range(10):
        await asyncio.gather(first.run_once(), second.run_once(), first.run_once())
    assert overlaps == []
    for task_id in ids:
        assert (await harness.task(task_id))["status"] == "succeeded"
    assert sum(queried_by.values()) == 16  # each task claimed exactly once


async def test_a_crashed_workers_claims_are_taken_over_after_the_lease(harness: Harness) -> None:
    task_id = await harness.submit("apiinone", "orphan sandbox:duration=5")
    harness.clock.advance(60)
    store = harness.runtime.store
    claims = store.claim_due("apiinone", "crashed-worker", limit=10, lease_seconds=60)
    assert [claim.task_id for claim in claims] == [task_id]
    await harness.scheduler.run_until_idle()  # leased to the dead worker: left alone
    assert harness.queries() == 0
    harness.clock.advance(61)
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["status"] == "succeeded"


async def test_start_up_reconciliation_plans_unplanned_tasks(harness: Harness) -> None:
    task_id = await harness.submit("evolink", "legacy sandbox:duration=5")
    import sqlalchemy as sa

    with harness.runtime.engine.begin() as connection:
        connection.execute(sa.text("UPDATE task SET next_check_at = NULL, deadline_at = NULL"))
    harness.clock.advance(30)
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["status"] == "queued"  # unplanned: never picked up
    assert harness.runtime.store.reconcile() == 1
    await harness.scheduler.run_until_idle()
    assert (await harness.task(task_id))["status"] == "succeeded"


async def test_one_providers_long_pause_does_not_stall_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.errors import UpstreamRateLimited

    paused_ids = [await harness.submit("evolink", f"p{i} sandbox:duration=5") for i in range(3)]
    other_ids = [await harness.submit("gptimage15", f"o{i} sandbox:duration=5") for i in range(3)]

    async def rate_limited(provider_task_id: str) -> Any:
        raise UpstreamRateLimited("slow down", provider="evolink", retry_after=3600)

    monkeypatch.setattr(harness.runtime.adapters["evolink"], "query_status", rate_limited)
    harness.clock.advance(60)
    before = harness.clock.monotonic()
    await harness.scheduler.run_once()
    # The pass did not sleep out the hour (the fake clock only moves when something sleeps).
    assert harness.clock.monotonic() - before < 10
    for task_id in other_ids:
        assert (await harness.task(task_id))["status"] == "succeeded"
    assert harness.queries("evolink") == 1  # one 429, then the provider is left alone
    with Session(harness.runtime.engine) as session:
        for task_id in paused_ids:
            row = session.exec(select(Task).where(Task.id == task_id)).one()
            assert row.lease_owner is None  # handed back, not held while waiting
            assert row.next_check_at is not None
            wait = (row.next_check_at - harness.clock.now()).total_seconds()
            # Not before the pause ends, nor past the poll cap (5 min) or the 10-min deadline.
            assert 290 <= wait <= 600


def looping_scheduler(harness: Harness, apiinone: ProviderLimiter | None = None) -> Scheduler:
    """A scheduler of its own for gptimage15 and apiinone, run by its loop: a tick so long
    that only a wake (a batch ending, a task due) starts a pass."""
    return Scheduler(
        harness.runtime.store,
        harness.runtime.adapters,
        {
            "gptimage15": ProviderLimiter(4, 100.0),
            "apiinone": apiinone or ProviderLimiter(4, 100.0),
        },
        metrics=Metrics(),
        lease_seconds=600,
        tick_seconds=600,
        clock=harness.clock.now,
        worker_id="loop-worker",
    )


def hang_queries(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """gptimage15's status queries never answer; returns what became of each: "asked", then
    "cut off" once cancelled."""
    seen: list[str] = []

    async def hanging(provider_task_id: str) -> Any:
        seen.append("asked")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cut off")
            raise

    monkeypatch.setattr(harness.runtime.adapters["gptimage15"], "query_status", hanging)
    return seen


async def succeeded(harness: Harness, task_id: str) -> bool:
    return bool((await harness.task(task_id))["status"] == "succeeded")


async def eventually(check: Any, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_one_providers_hanging_queries_do_not_hold_up_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running loop claims a provider's next batch once that provider's previous batch
    is done (the batch's end wakes it), whatever the others' are doing: a provider whose
    queries hang (each cut off before its lease runs out) delays its own tasks, not another
    provider's. Before, each pass waited for all its queries, so one hanging provider held
    every other's polling."""
    hung = await harness.submit("gptimage15", "h sandbox:duration=5")
    first = await harness.submit("apiinone", "a1 sandbox:duration=5")
    harness.clock.advance(60)  # both due
    hanging = hang_queries(harness, monkeypatch)
    apiinone = harness.runtime.adapters["apiinone"]
    real_query, gate, asked = apiinone.query_status, asyncio.Event(), asyncio.Event()

    async def held(provider_task_id: str) -> Any:
        asked.set()
        await gate.wait()
        return await real_query(provider_task_id)

    monkeypatch.setattr(apiinone, "query_status", held)
    scheduler = looping_scheduler(harness)
    before = await harness.task(hung)

    await scheduler.start()
    try:
        await asyncio.wait_for(asked.wait(), timeout=10)  # the first pass: both providers
        second = await harness.submit("apiinone", "a2 sandbox:duration=5")
        harness.clock.advance(60)  # due while both batches are still out
        gate.set()  # apiinone's batch ends: that wakes the loop, which claims its next one
        assert await eventually(partial(succeeded, harness, first))
        assert await eventually(partial(succeeded, harness, second))
        assert hanging == ["asked"]  # still the one query in flight, not asked again
        assert (await harness.task(hung))["status"] == before["status"] == "running"
    finally:
        await scheduler.stop(grace=0.1)
    assert hanging == ["asked", "cut off"] and scheduler._in_flight == set()
    with Session(harness.runtime.engine) as session:
        row = session.exec(select(Task).where(Task.id == hung)).one()
    assert row.lease_owner is None  # handed back


async def test_a_claim_that_fails_loses_no_query_started_before_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """gptimage15's batch is out when apiinone's claim fails (the database went away): that
    pass ends in an error, but its query stays tracked, so stopping still cuts it off before
    the leases are handed back (else another process could ask about the task meanwhile)."""
    await harness.submit("gptimage15", "h sandbox:duration=5")
    harness.clock.advance(60)
    hanging = hang_queries(harness, monkeypatch)
    store = harness.runtime.store
    real_claim = store.claim_due

    def claim(provider: str, worker: str, **kwargs: Any) -> Any:
        if provider == "apiinone":
            raise StoreUnavailable("gone", details={"reason": "OperationalError"})
        return real_claim(provider, worker, **kwargs)

    monkeypatch.setattr(store, "claim_due", claim)
    scheduler = looping_scheduler(harness)
    await scheduler.start()

    async def asked() -> bool:
        return hanging == ["asked"]

    with caplog.at_level(logging.WARNING, logger="service.scheduler"):
        try:
            assert await eventually(asked)
        finally:
            await scheduler.stop(grace=0.1)
    assert hanging == ["asked", "cut off"] and scheduler._in_flight == set()
    lines = {record.getMessage() for record in caplog.records}
    assert (
        "scheduler claim skipped: the database is unavailable (OperationalError); "
        "retried until it answers"
    ) in lines


async def test_an_outage_one_provider_still_meets_is_not_over_for_anothers_claim(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only store answers a claim with nothing due (a read) but not one that writes:
    the provider with nothing due said "works again" after every pass while the other's
    claims still failed, two lines a second (found by the metrics and logs hunt). The outage
    is over once every provider's claim works again: one line when it starts, one when it
    ends."""
    store = harness.runtime.store
    real_claim, broken = store.claim_due, [True]

    def claim(provider: str, worker: str, **kwargs: Any) -> Any:
        if provider == "apiinone" and broken[0]:
            raise StoreUnavailable("read-only", details={"reason": "SQLITE_READONLY"})
        return real_claim(provider, worker, **kwargs)

    monkeypatch.setattr(store, "claim_due", claim)
    scheduler = looping_scheduler(harness)
    calls = [0]
    original = store.claim_due

    def counting(provider: str, worker: str, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(provider, worker, **kwargs)

    monkeypatch.setattr(store, "claim_due", counting)
    with caplog.at_level(logging.WARNING, logger="service.loops"):
        for _ in range(5):  # passes: both providers claim in each
            await scheduler._step()
            assert await eventually(lambda: asyncio.sleep(0, not scheduler._claiming))
        broken[0] = False
        for _ in range(3):
            await scheduler._step()
            assert await eventually(lambda: asyncio.sleep(0, not scheduler._claiming))
    lines = [r.getMessage() for r in caplog.records if "scheduler claim" in r.getMessage()]
    assert calls[0] >= 10
    assert lines == [
        "scheduler claim skipped: the database is unavailable (SQLITE_READONLY); retried "
        "until it answers",
        "scheduler claim works again, after 5 skipped",
    ], lines


async def test_one_providers_slow_claim_does_not_hold_up_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stall, one provider's claim can take seconds (moving plans); each provider's
    claims run on their own, so another provider's due tasks are asked about meanwhile, in
    batch after batch (here one task each)."""
    other = await harness.submit("gptimage15", "g sandbox:duration=5")
    task_ids = [await harness.submit("apiinone", f"a{i} sandbox:duration=5") for i in range(2)]
    harness.clock.advance(60)
    store = harness.runtime.store
    real_claim, claiming, release = store.claim_due, threading.Event(), threading.Event()

    def slow_claim(provider: str, worker: str, **kwargs: Any) -> Any:
        if provider == "gptimage15":
            claiming.set()
            release.wait(timeout=30)
        return real_claim(provider, worker, **kwargs)

    monkeypatch.setattr(store, "claim_due", slow_claim)
    scheduler = looping_scheduler(harness, apiinone=ProviderLimiter(1, 0.5))  # batches of 1

    await scheduler.start()
    try:
        for task_id in task_ids:
            assert await eventually(partial(succeeded, harness, task_id))
        assert claiming.is_set() and (await harness.task(other))["status"] == "running"
        release.set()
        assert await eventually(partial(succeeded, harness, other))
    finally:
        release.set()
        await scheduler.stop(grace=1.0)


def lease_owner(harness: Harness, task_id: str) -> str | None:
    with Session(harness.runtime.engine) as session:
        return session.exec(select(Task).where(Task.id == task_id)).one().lease_owner


async def refreshing_forever(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, asyncio.Future[Any]]:
    """A task, and its refresh as uvicorn runs a request (a task of its own), leased, its
    status query at the provider never answered."""
    task_id = await harness.submit("evolink", "hang sandbox:duration=5 sandbox:callback=drop")
    adapter = harness.runtime.scheduler.adapters["evolink"]
    asked = asyncio.Event()

    async def never(*args: Any, **kwargs: Any) -> Any:
        asked.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(adapter, "query_status", never)
    await until(lambda: (harness.runtime.store.find_task(task_id) or {}).get("provider_task_id"))
    task = harness.runtime.store.find_task(task_id)
    refresh = asyncio.ensure_future(harness.runtime.scheduler.refresh(task))
    await asyncio.wait_for(asked.wait(), 10)
    assert (lease_owner(harness, task_id) or "").startswith("refresh-")
    return task_id, refresh


async def test_a_refresh_cut_off_hands_its_lease_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off while the provider had not answered (uvicorn cancels what still runs at the end
    of its drain), a refresh kept its lease: the restarted process could not poll the task
    until the lease ran out, 40 s past its deadline (found by the stuck-task hunt)."""
    task_id, refresh = await refreshing_forever(harness, monkeypatch)
    refresh.cancel("Task cancelled, timeout graceful shutdown exceeded")  # as uvicorn does
    with pytest.raises(asyncio.CancelledError):
        await refresh
    assert lease_owner(harness, task_id) is None
    assert not harness.runtime.scheduler._refreshing


async def test_a_refresh_cut_off_while_taking_its_lease_hands_it_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is taken on a worker thread: cut off meanwhile, the claim still lands, and
    is handed back once it has."""
    task_id = await harness.submit("evolink", "slow claim sandbox:duration=5")
    await until(lambda: (harness.runtime.store.find_task(task_id) or {}).get("provider_task_id"))
    store = harness.runtime.store
    claim, entered, go_on, landed = (
        store.claim_task,
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )

    def slow_claim(*args: Any, **kwargs: Any) -> bool:
        entered.set()
        go_on.wait(10)
        try:
            return claim(*args, **kwargs)
        finally:
            landed.set()

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    monkeypatch.setattr(store, "claim_task", slow_claim)
    monkeypatch.setattr(harness.runtime.scheduler.adapters["evolink"], "query_status", never)
    refresh = asyncio.ensure_future(harness.runtime.scheduler.refresh(store.find_task(task_id)))
    await asyncio.to_thread(entered.wait, 10)
    refresh.cancel()
    await asyncio.sleep(0)
    go_on.set()  # the claim lands after the cut-off
    with pytest.raises(asyncio.CancelledError):
        await refresh
    await asyncio.to_thread(landed.wait, 10)
    await asyncio.sleep(0.2)  # anything still to run after it has
    assert lease_owner(harness, task_id) is None


async def test_stopping_leaves_a_running_refresh_its_lease_while_it_may_finish(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's stop, at the signal, handed back the lease of a refresh uvicorn was
    still draining: another replica queried the task while the refresh's own query ran
    (found by the replica hunt). It waits for the refresh, up to its grace."""
    task_id, refresh = await refreshing_forever(harness, monkeypatch)
    stopping = asyncio.ensure_future(harness.runtime.scheduler.stop(grace=30))
    await asyncio.sleep(0.3)
    assert not stopping.done()
    assert (lease_owner(harness, task_id) or "").startswith("refresh-")  # still the refresh's
    refresh.cancel("Task cancelled, timeout graceful shutdown exceeded")  # the drain's end
    with pytest.raises(asyncio.CancelledError):
        await refresh
    await asyncio.wait_for(stopping, 10)
    assert lease_owner(harness, task_id) is None


async def test_stopping_hands_back_the_lease_of_a_refresh_still_running(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id, refresh = await refreshing_forever(harness, monkeypatch)
    await harness.runtime.scheduler.stop(grace=0)
    assert lease_owner(harness, task_id) is None
    refresh.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await refresh


async def test_refresh_waits_for_nobody_and_never_overlaps_a_poll(harness: Harness) -> None:
    task_id = await harness.submit("gptimage15", "busy sandbox:duration=5")
    harness.clock.advance(60)
    claims = harness.runtime.store.claim_due(
        "gptimage15", "scheduled-poll", limit=5, lease_seconds=60
    )
    assert [claim.task_id for claim in claims] == [task_id]
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 409
    assert error_code(response) == "poll_in_progress"
    assert harness.queries() == 0
    harness.clock.advance(61)  # the poll's lease ran out (its process died)
    response = await harness.client.post(f"/v1/tasks/{task_id}/refresh", headers=auth())
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
