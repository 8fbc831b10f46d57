"""Faults against real processes (issue 7): providers' status endpoints failing for a while.

A standalone sandbox drops every callback, so only status queries can finish the tasks, and
its status endpoints answer 500, 503 or 429 (with ``Retry-After: 1``) to the first queries of
each task. TaskRelay must lose no task and must back off: after a failed query, the next one
waits at least the policy's error backoff (5 s, doubling, jittered by 10 %), and never less than
a ``Retry-After``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.polling import PollPolicy
from tests.servers import SandboxProcess
from tests.test_polling_e2e import HEADERS, relay, wait_all

ERRORS = 2  # failed status queries per task before the provider answers again
FAILURES = [("gptimage15", "500"), ("apiinone", "429"), ("gptimage15", "503"), ("apiinone", "500")]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    process = SandboxProcess(tmp_path / "sandbox.log")
    process.behave("*", callback="drop")
    yield process
    process.stop()


def test_status_endpoints_failing_for_a_while_lose_no_task_and_are_backed_off(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    service = relay(tmp_path, "relay", sandbox)
    ids: list[str] = []
    try:
        for index, (provider, error) in enumerate(FAILURES):
            prompt = (
                f"p{index} sandbox:duration=1 sandbox:status_errors={ERRORS} "
                f"sandbox:status_error={error}"
            )
            response = httpx.post(
                f"{service.url}/v1/tasks",
                json={"provider": provider, "prompt": prompt},
                headers=HEADERS,
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        tasks = wait_all(service.url, ids, limit=90.0)
    finally:
        service.stop()

    # No task lost: each finished by the status query that came after the failures.
    assert [task["status"] for task in tasks] == ["succeeded"] * len(FAILURES), tasks
    assert all(task["last_update_source"] == "poll" for task in tasks)

    policy = PollPolicy(typical_duration=2.0, deadline=3600.0)
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
