"""The polling policy, as pure functions."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from service.models import TaskStatus
from service.polling import (
    PollPolicy,
    TaskTiming,
    expected_finish,
    next_check,
    next_check_after_error,
    predicted_finish,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = PollPolicy(typical_duration=60, deadline=3600, grace=1, jitter=0)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def timing(**overrides: object) -> TaskTiming:
    base = TaskTiming(
        status=TaskStatus.running,
        started_at=T0,
        expected_at=None,
        deadline_at=T0 + s(3600),
        progress=0,
        progress_at=None,
        poll_count=0,
        poll_errors=0,
        has_provider_task_id=True,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_first_look_waits_for_the_typical_duration_plus_grace() -> None:
    assert next_check(timing(), T0, POLICY) == T0 + s(61)


def test_an_overdue_first_look_happens_now() -> None:
    now = T0 + s(500)
    assert next_check(timing(), now, POLICY) == now


def test_first_look_uses_the_providers_estimate() -> None:
    assert next_check(timing(expected_at=T0 + s(100)), T0, POLICY) == T0 + s(101)


def test_progress_that_predicts_a_later_finish_pushes_the_first_look_back() -> None:
    # 20 % after 30 s: the task will take 150 s, longer than the 60 s typical duration.
    slow = timing(progress=20, progress_at=T0 + s(30))
    assert predicted_finish(slow) == T0 + s(150)
    assert expected_finish(slow, POLICY) == T0 + s(150)
    assert next_check(slow, T0 + s(30), POLICY) == T0 + s(151)


def test_final_tasks_are_never_looked_at() -> None:
    for status in (
        TaskStatus.succeeded,
        TaskStatus.failed,
        TaskStatus.canceled,
        TaskStatus.expired,
    ):
        assert next_check(timing(status=status), T0, POLICY) is None


def test_without_a_provider_task_id_or_status_endpoint_wait_for_the_deadline() -> None:
    assert next_check(timing(has_provider_task_id=False), T0, POLICY) == T0 + s(3600)
    unqueryable = replace(POLICY, queryable=False)
    assert next_check(timing(), T0, unqueryable) == T0 + s(3600)


def test_a_lost_submission_answer_is_looked_at_when_it_is_due_never_past_the_deadline() -> None:
    """A submission sent with no answer recorded, to a provider that cannot call back: the
    look comes when the answer is lost (Store._answer_due), or at the deadline if sooner."""
    lost = timing(has_provider_task_id=False, status=TaskStatus.queued, answer_due_at=T0 + s(400))
    assert next_check(lost, T0, POLICY) == T0 + s(400)
    assert next_check(replace(lost, answer_due_at=T0 + s(4000)), T0, POLICY) == T0 + s(3600)
    # Overdue: now-ish is the scheduler's to decide; the plan keeps the due time.
    assert next_check(lost, T0 + s(500), POLICY) == T0 + s(400)


def test_backoff_after_the_expected_finish_doubles_up_to_the_cap() -> None:
    policy = replace(POLICY, first_step=5, max_interval=40)
    now = T0 + s(61)
    steps = [
        (next_check(timing(poll_count=count), now, policy) - now).total_seconds()  # type: ignore[operator]
        for count in range(1, 7)
    ]
    assert steps == [5, 10, 20, 40, 40, 40]


def test_later_looks_aim_at_the_finish_progress_predicts() -> None:
    # 50 % at 60 s -> done at 120 s: look right after that, whatever the backoff is at.
    halfway = timing(progress=50, progress_at=T0 + s(60), poll_count=6)
    now = T0 + s(61)
    jittery = replace(POLICY, jitter=0.5)
    for count in (1, 3, 6):
        looked = replace(halfway, poll_count=count)
        for seed in range(5):
            assert next_check(looked, now, jittery, random.Random(seed)) == T0 + s(121)
    # ...never further off than the longest interval.
    far = timing(progress=1, progress_at=T0 + s(60), poll_count=2)
    assert next_check(far, now, replace(POLICY, max_interval=100)) == now + s(100)


def test_a_stalled_prediction_falls_back_to_backoff_not_to_hot_polling() -> None:
    # Progress said 50 % at 60 s, so done at 120 s; it is 200 s now and nothing moved.
    stalled = timing(progress=50, progress_at=T0 + s(60))
    now = T0 + s(200)
    steps = [
        (next_check(replace(stalled, poll_count=count), now, POLICY) - now).total_seconds()  # type: ignore[operator]
        for count in (1, 2, 3, 4)
    ]
    assert steps == [5, 10, 20, 40]
    # ...but never sooner than the minimum interval.
    almost = timing(progress=99, progress_at=T0 + s(60), poll_count=1)
    assert next_check(almost, T0 + s(61), POLICY) == T0 + s(62)


def test_nothing_is_planned_past_the_deadline() -> None:
    late = timing(poll_count=9, deadline_at=T0 + s(100))
    assert next_check(late, T0 + s(90), replace(POLICY, max_interval=300)) == T0 + s(100)
    assert next_check_after_error(
        timing(poll_errors=8, deadline_at=T0 + s(100)), T0 + s(90), POLICY
    ) == T0 + s(100)


def test_errors_back_off_exponentially_and_honour_retry_after() -> None:
    policy = replace(POLICY, error_backoff=5, max_interval=60)
    now = T0 + s(70)
    waits = [
        (next_check_after_error(timing(poll_errors=n), now, policy) - now).total_seconds()
        for n in range(1, 6)
    ]
    assert waits == [5, 10, 20, 40, 60]
    with_hint = next_check_after_error(timing(poll_errors=1), now, policy, retry_after=30)
    assert with_hint == now + s(30)
    # A hint shorter than our own backoff does not make us hotter.
    assert next_check_after_error(timing(poll_errors=3), now, policy, retry_after=1) == now + s(20)
    # A hint longer than our cap wins over it (asked sooner, the provider would refuse again),
    # but not over the deadline.
    assert next_check_after_error(timing(poll_errors=1), now, policy, retry_after=600) == now + s(
        600
    )
    near = timing(poll_errors=1, deadline_at=now + s(100))
    assert next_check_after_error(near, now, policy, retry_after=600) == now + s(100)


@pytest.mark.parametrize("seed", range(20))
def test_jitter_stays_within_its_band(seed: int) -> None:
    policy = replace(POLICY, jitter=0.1, first_step=10)
    now = T0 + s(61)
    step = (
        next_check(timing(poll_count=1), now, policy, random.Random(seed)) - now
    ).total_seconds()  # type: ignore[operator]
    assert 9.0 <= step <= 11.0


def test_backoff_survives_any_number_of_looks() -> None:
    now = T0 + s(61)
    assert next_check(timing(poll_count=5000), now, POLICY) == now + s(300)
    assert next_check_after_error(
        timing(poll_errors=5000), now, replace(POLICY, max_interval=60)
    ) == now + s(60)
