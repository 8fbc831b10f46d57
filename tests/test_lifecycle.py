"""The task state machine, as pure functions (no database)."""

from __future__ import annotations

import itertools

import pytest

from service.lifecycle import (
    DEFAULT_FAILURE,
    ProviderTaskIdMismatch,
    TaskState,
    TaskUpdate,
    behind,
    decide,
    expire,
)
from service.models import TERMINAL_STATUSES, EventType, TaskStatus

Q, R, S, F, C, X = (
    TaskStatus.queued,
    TaskStatus.running,
    TaskStatus.succeeded,
    TaskStatus.failed,
    TaskStatus.canceled,
    TaskStatus.expired,
)
IMAGE = ({"url": "https://cdn.example/1.png"},)


def state(status: TaskStatus = Q, progress: int = 0, **kwargs: object) -> TaskState:
    return TaskState(status=status, progress=progress, **kwargs)  # type: ignore[arg-type]


def test_queued_to_running_is_a_progress_event() -> None:
    change = decide(state(), TaskUpdate(status=R, progress=10, raw_status="processing"))
    assert change is not None
    assert change.state.status is R
    assert change.state.progress == 10
    assert change.state.raw_status == "processing"
    assert change.event_type is EventType.progress
    assert not change.became_terminal


def test_success_sets_images_and_full_progress() -> None:
    change = decide(state(R, 40), TaskUpdate(status=S, images=IMAGE))
    assert change is not None
    assert change.state.status is S
    assert change.state.progress == 100
    assert change.state.images == IMAGE
    assert change.state.error is None
    assert change.event_type is EventType.succeeded
    assert change.became_terminal


def test_failure_keeps_the_providers_reason() -> None:
    reason = {"code": "content_policy_violation", "message": "Content policy violation detected"}
    change = decide(state(R, 40), TaskUpdate(status=F, error=reason))
    assert change is not None
    assert change.state.error == reason
    assert change.state.progress == 40
    assert change.event_type is EventType.failed


@pytest.mark.parametrize("final", [F, C])
@pytest.mark.parametrize("said", [None, 0, 100])
def test_an_unfinished_end_keeps_the_progress_reached(final: TaskStatus, said: int | None) -> None:
    """Providers end a failure at 100 (GrsAI's stream), 0 or nothing: a failed or canceled task
    keeps the progress it had reached, whichever provider ran it."""
    change = decide(state(R, 40), TaskUpdate(status=final, progress=said))
    assert change is not None
    assert change.state.progress == 40
    expired = decide(state(X, 30), TaskUpdate(status=F, progress=said))
    assert expired is not None and expired.state.progress == 30


def test_failure_without_reason_gets_a_default_error() -> None:
    change = decide(state(R), TaskUpdate(status=F))
    assert change is not None
    assert change.state.error == DEFAULT_FAILURE


def test_cancel_has_its_own_error_code() -> None:
    change = decide(state(R), TaskUpdate(status=C))
    assert change is not None
    assert change.event_type is EventType.canceled
    assert change.state.error is not None and change.state.error["code"] == "canceled"


def test_identical_update_records_nothing() -> None:
    current = state(R, 30, raw_status="processing")
    assert decide(current, TaskUpdate(status=R, progress=30, raw_status="processing")) is None


def test_progress_never_decreases() -> None:
    current = state(R, 60)
    assert decide(current, TaskUpdate(status=R, progress=20)) is None
    change = decide(current, TaskUpdate(status=R, progress=75))
    assert change is not None and change.state.progress == 75


def test_progress_is_clamped() -> None:
    change = decide(state(R, 10), TaskUpdate(status=R, progress=250))
    assert change is not None and change.state.progress == 100
    assert decide(state(R, 10), TaskUpdate(status=R, progress=-5)) is None


def test_running_never_goes_back_to_queued() -> None:
    current = state(R, 50)
    assert decide(current, TaskUpdate(status=Q)) is None
    # ...but a higher progress in a stale "queued" update still counts.
    change = decide(current, TaskUpdate(status=Q, progress=55))
    assert change is not None
    assert change.state.status is R and change.state.progress == 55


def test_a_late_updates_status_word_does_not_move_back_either() -> None:
    """A stale "pending" after "processing" leaves the provider's status word as it was (it
    is out of date, like the status it names): nothing changes, no write, no event."""
    current = state(R, 40, raw_status="processing")
    assert decide(current, TaskUpdate(status=Q, progress=0, raw_status="pending")) is None
    change = decide(current, TaskUpdate(status=Q, progress=45, raw_status="pending"))
    assert change is not None and change.state.raw_status == "processing"
    assert change.state.progress == 45
    change = decide(current, TaskUpdate(status=R, progress=40, raw_status="rendering"))
    assert change is not None and change.state.raw_status == "rendering"  # not behind
    assert behind(X, TaskUpdate(status=S)) is False
    assert behind(X, TaskUpdate(status=R)) is True
    assert behind(S, TaskUpdate(status=S)) is True
    assert behind(R, TaskUpdate(raw_status="weird")) is False


@pytest.mark.parametrize("final", [S, F, C])
@pytest.mark.parametrize("late", [Q, R, S, F, C, X])
def test_terminal_states_are_final(final: TaskStatus, late: TaskStatus) -> None:
    current = state(final, 100 if final is S else 40, images=IMAGE if final is S else ())
    update = TaskUpdate(status=late, progress=100, images=({"url": "https://other/2.png"},))
    assert decide(current, update) is None


@pytest.mark.parametrize("provider_word", [S, F])
def test_expired_task_still_takes_the_providers_final_answer(provider_word: TaskStatus) -> None:
    current = state(X, 30, error={"code": "deadline_exceeded", "message": "gave up"})
    change = decide(current, TaskUpdate(status=provider_word, images=IMAGE))
    assert change is not None
    assert change.state.status is provider_word
    assert change.event_type is EventType(f"task.{provider_word.value}")
    if provider_word is S:
        assert change.state.error is None
        assert change.state.images == IMAGE


@pytest.mark.parametrize("late", [Q, R, C])
def test_expired_task_ignores_anything_else(late: TaskStatus) -> None:
    current = state(X, 30)
    assert decide(current, TaskUpdate(status=late, progress=90)) is None


def test_unknown_status_keeps_state_but_records_raw_value() -> None:
    current = state(R, 30, raw_status="processing")
    change = decide(current, TaskUpdate(status=None, raw_status="weird-new-state"))
    assert change is not None
    assert change.state.status is R
    assert change.state.raw_status == "weird-new-state"
    assert change.event_type is None  # no status or progress change: no event


def test_provider_task_id_is_learned_once() -> None:
    change = decide(state(), TaskUpdate(provider_task_id="up-1"))
    assert change is not None and change.state.provider_task_id == "up-1"
    assert decide(state(provider_task_id="up-1"), TaskUpdate(provider_task_id="up-1")) is None
    with pytest.raises(ProviderTaskIdMismatch):
        decide(state(provider_task_id="up-1"), TaskUpdate(status=S, provider_task_id="up-2"))


def test_terminal_task_can_still_learn_its_provider_task_id() -> None:
    change = decide(state(S, 100), TaskUpdate(status=S, provider_task_id="up-9"))
    assert change is not None
    assert change.state.provider_task_id == "up-9"
    assert change.state.status is S
    assert change.event_type is None


def test_expire_only_moves_unfinished_tasks() -> None:
    change = expire(state(R, 20), "no answer within 1h")
    assert change is not None
    assert change.state.status is X
    assert change.event_type is EventType.expired
    assert change.state.error == {"code": "deadline_exceeded", "message": "no answer within 1h"}
    for final in TERMINAL_STATUSES:
        assert expire(state(final), "late") is None


def test_any_order_of_updates_ends_in_the_same_final_state() -> None:
    """Out-of-order delivery: whatever order the same updates arrive in, the end is the same
    and each transition happened at most once."""
    updates = [
        TaskUpdate(status=R, progress=10),
        TaskUpdate(status=R, progress=60),
        TaskUpdate(status=S, images=IMAGE),
        TaskUpdate(status=S, images=IMAGE),  # duplicate callback
    ]
    for order in itertools.permutations(updates):
        current = state()
        terminal_events = 0
        for update in order:
            change = decide(current, update)
            if change is not None:
                current = change.state
                terminal_events += change.became_terminal
        assert current.status is S
        assert current.progress == 100
        assert current.images == IMAGE
        assert terminal_events == 1
