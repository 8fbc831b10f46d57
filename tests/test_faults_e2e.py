"""Faults against real processes (issue 7): providers' status endpoints failing for a while.

A standalone sandbox drops every callback, so only status queries can finish the tasks, and
its status endpoints answer 500, 503 or 429 (with ``Retry-After: 1``) to the first queries of
each task, or leave them hanging far longer than TaskRelay waits (TASKRELAY_PROVIDER_TIMEOUT).
TaskRelay must lose no task and must back off: after a failed query, the next one waits at
least the policy's error backoff (5 s, doubling, jittered by 10 %), and never less than a
``Retry-After``.

In process: a status query that hangs (or waits for a slot behind hanging ones) never holds its
task beyond the task's poll lease.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from service.metrics import Metrics
from service.models import Task
from service.polling import PollPolicy
from service.scheduler import ProviderLimiter, Scheduler
from tests import test_scheduler
from tests.servers import SandboxProcess
from tests.test_polling_e2e import HEADERS, relay, wait_all

ERRORS = 2  # failed status queries per task before the provider answers again
# TASKRELAY_POLL_ERROR_BACKOFF of the relays here (5 s by default): waited out twice per task.
ERROR_BACKOFF = 1.0
FAILURES = [("gptimage15", "500"), ("apiinone", "429"), ("gptimage15", "503"), ("apiinone", "500")]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    process = SandboxProcess(tmp_path / "sandbox.log")
    process.behave("*", callback="drop")
    yield process
    process.stop()


def submit(url: str, tasks: list[tuple[str, str]]) -> list[str]:
    """Submit each (provider, prompt); the ids TaskRelay gave them, in order."""
    ids = []
    for provider, prompt in tasks:
        response = httpx.post(
            f"{url}/v1/tasks", json={"provider": provider, "prompt": prompt}, headers=HEADERS
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def test_status_endpoints_failing_for_a_while_lose_no_task_and_are_backed_off(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    service = relay(tmp_path, "relay", sandbox, TASKRELAY_POLL_ERROR_BACKOFF=f"{ERROR_BACKOFF}s")
    try:
        ids = submit(
            service.url,
            [
                (
                    provider,
                    f"p{index} sandbox:duration=1 sandbox:status_errors={ERRORS} "
                    f"sandbox:status_error={error}",
                )
                for index, (provider, error) in enumerate(FAILURES)
            ],
        )
        tasks = wait_all(service.url, ids, limit=90.0)
    finally:
        service.stop()

    # No task lost: each finished by the status query that came after the failures.
    assert [task["status"] for task in tasks] == ["succeeded"] * len(FAILURES), tasks
    assert all(task["last_update_source"] == "poll" for task in tasks)

    policy = PollPolicy(typical_duration=2.0, deadline=3600.0, error_backoff=ERROR_BACKOFF)
    at_provider = {task["id"]: task for task in sandbox.tasks()}
    for task, (_, error) in zip(tasks, FAILURES, strict=True):
        log = at_provider[task["provider_task_id"]]["status_query_log"]
        answers = [str(query["answer"]) for query in log]
        assert answers[:ERRORS] == [error] * ERRORS, answers
        assert len(log) == ERRORS + 1, answers  # then one good answer, and no more queries
        gaps = [later["at"] - earlier["at"] for earlier, later in itertools.pairwise(log)]
        for failures, gap in enumerate(gaps, start=1):
            backoff = policy.error_backoff * 2 ** (failures - 1) * (1 - policy.jitter)
            floor = max(backoff, 1.0 if error == "429" else 0.0)
            assert gap >= floor - 0.05, (error, gaps)  # the scheduler ticks every 100 ms


# --- status queries that hang ---------------------------------------------------------------------

PROVIDER_TIMEOUT = 1.0  # TASKRELAY_PROVIDER_TIMEOUT of the relay
HANG = 60.0  # how long the sandbox leaves a failing query hanging (then it would answer 504)
HANGING = ["gptimage15", "apiinone", "gptimage15"]


def failed_queries(url: str, outcome: str) -> float:
    """``taskrelay_status_queries_total{outcome=...}``, summed over providers."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("taskrelay_status_queries_total{") and f'outcome="{outcome}"' in line
    )


def test_status_queries_that_hang_time_out_lose_no_task_and_are_backed_off(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    service = relay(
        tmp_path,
        "relay",
        sandbox,
        TASKRELAY_PROVIDER_TIMEOUT=f"{PROVIDER_TIMEOUT}s",
        TASKRELAY_POLL_ERROR_BACKOFF=f"{ERROR_BACKOFF}s",
    )
    try:
        ids = submit(
            service.url,
            [
                (
                    provider,
                    f"h{index} sandbox:duration=1 sandbox:status_errors={ERRORS} "
                    f"sandbox:status_error=timeout sandbox:timeout_seconds={HANG}",
                )
                for index, provider in enumerate(HANGING)
            ],
        )
        tasks = wait_all(service.url, ids, limit=90.0)
        timed_out = failed_queries(service.url, "upstream_unavailable")
        answered = failed_queries(service.url, "ok")
    finally:
        service.stop()

    # No task lost: each finished by the status query that came after the hanging ones.
    assert [task["status"] for task in tasks] == ["succeeded"] * len(HANGING), tasks
    assert all(task["last_update_source"] == "poll" for task in tasks)
    # Every hanging query was given up by TaskRelay and counted as a failure.
    assert (timed_out, answered) == (ERRORS * len(HANGING), len(HANGING))

    policy = PollPolicy(typical_duration=2.0, deadline=3600.0, error_backoff=ERROR_BACKOFF)
    at_provider = {task["id"]: task for task in sandbox.tasks()}
    for task in tasks:
        log = at_provider[task["provider_task_id"]]["status_query_log"]
        answers = [str(query["answer"]) for query in log]
        assert answers[:ERRORS] == ["timeout"] * ERRORS, answers
        assert len(log) == ERRORS + 1, answers  # then one good answer, and no more queries
        gaps = [later["at"] - earlier["at"] for earlier, later in itertools.pairwise(log)]
        for failures, gap in enumerate(gaps, start=1):
            # The failure is known once TaskRelay stops waiting, and backed off from then.
            backoff = policy.error_backoff * 2 ** (failures - 1) * (1 - policy.jitter)
            # (Slack: the provider stamps `at` once its handler runs, after TaskRelay's timer
            # started; the bound only guards against a query sent again at once.)
            assert gap >= PROVIDER_TIMEOUT + backoff - 0.25, gaps
            # TaskRelay stopped waiting long before the provider would have answered.
            assert gap < HANG, gaps


# --- a hanging query and the poll lease (in process) --------------------------------------------

clock = test_scheduler.clock
harness = test_scheduler.harness  # the real app and mounted sandbox, on a fake clock
LEASE = 5.0  # seconds of real time: the query bound is the lease less a fifth


async def test_a_hanging_status_query_never_holds_its_task_beyond_the_lease(
    harness: test_scheduler.Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot, two claimed tasks, and a provider that never answers: the query in flight is
    cut off before the lease runs out (counted as failed, backed off), and the task waiting for
    the slot is handed back unasked; neither stays leased. Nothing else bounds the query: the
    upstream client's read timeout is per read, and a slot wait is no read at all."""
    ids = [await harness.submit("gptimage15", f"l{i} sandbox:duration=5") for i in range(2)]
    harness.clock.advance(60)  # both due
    adapter = harness.runtime.adapters["gptimage15"]
    real_query = adapter.query_status
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    cut_off: list[float] = []

    async def hanging(provider_task_id: str) -> Any:
        asked.append(provider_task_id)
        try:
            await asyncio.Event().wait()
        finally:
            cut_off.append(loop.time())

    monkeypatch.setattr(adapter, "query_status", hanging)
    metrics = Metrics()
    scheduler = Scheduler(
        harness.runtime.store,
        harness.runtime.adapters,
        {"gptimage15": ProviderLimiter(1, 100.0)},
        metrics=metrics,
        lease_seconds=LEASE,
        clock=harness.clock.now,
        worker_id="hanging-worker",
    )
    claimed_at = loop.time()
    assert await asyncio.wait_for(scheduler.run_once(), timeout=LEASE * 6) == 2

    assert len(asked) == 1 and len(cut_off) == 1
    assert cut_off[0] - claimed_at < LEASE  # before another process could claim the task
    assert metrics.counter("status_queries_total", outcome="upstream_unavailable") == 1
    now = harness.clock.now()
    with Session(harness.runtime.engine) as session:
        rows = {row.id: row for row in session.exec(select(Task).where(col(Task.id).in_(ids)))}
    assert all(row.lease_owner is None for row in rows.values())
    by_provider_id = {row.provider_task_id: row for row in rows.values()}
    failed = by_provider_id[asked[0]]
    (waiting,) = [row for row in rows.values() if row is not failed]
    assert failed.poll_errors == 1 and failed.next_check_at is not None
    assert failed.next_check_at.replace(tzinfo=now.tzinfo) > now  # backed off
    assert waiting.poll_errors == 0 and waiting.poll_count == 0  # never asked
    assert waiting.next_check_at is not None
    assert waiting.next_check_at.replace(tzinfo=now.tzinfo) <= now  # due again at once

    # The provider answers again: both finish.
    monkeypatch.setattr(adapter, "query_status", real_query)
    harness.clock.advance(60)
    await asyncio.wait_for(scheduler.run_until_idle(), timeout=LEASE * 6)
    assert [(await harness.task(task_id))["status"] for task_id in ids] == ["succeeded"] * 2
