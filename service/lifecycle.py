"""The task state machine, as pure functions.

queued -> running -> succeeded | failed | canceled | expired.

- Terminal states are final: a late, duplicate or out-of-order update never moves a task back
  or out of one, and progress never decreases.
- The one exception: ``expired`` means TaskRelay gave up waiting, not that the provider failed,
  so a provider's late ``succeeded`` or ``failed`` still lands on an expired task.
- Every update, whatever its source (submit reply, callback, poll, stream, timeout), goes through
  :func:`decide`. It returns the new state, or ``None`` when nothing would change, so a repeated
  identical update records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from service.errors import Conflict
from service.models import TERMINAL_STATUSES, EventType, TaskStatus

RAW_STATUS_CHARS = 64  # task.raw_status; a provider's status word is kept, cut to fit
_RANK = {TaskStatus.queued: 0, TaskStatus.running: 1}
_TERMINAL_RANK = 2

DEFAULT_FAILURE = {
    "code": "provider_failed",
    "message": "The provider reported the task as failed without giving a reason.",
}


@dataclass(frozen=True)
class TaskUpdate:
    """One normalised observation of a task at its provider, from any source.

    Provider adapters turn callback bodies, submit replies and status answers into this.
    ``None`` means "this observation says nothing about that field".
    """

    status: TaskStatus | None = None
    progress: int | None = None
    images: tuple[dict[str, Any], ...] = ()
    error: dict[str, Any] | None = None
    provider_task_id: str | None = None
    raw_status: str | None = None
    # The provider's hint of how long the task will take, in seconds (EvoLink estimated_time).
    estimated_seconds: float | None = None


@dataclass(frozen=True)
class TaskState:
    status: TaskStatus
    progress: int
    images: tuple[dict[str, Any], ...] = ()
    error: dict[str, Any] | None = None
    provider_task_id: str | None = None
    raw_status: str | None = None


@dataclass(frozen=True)
class Change:
    """The state after an update, and the history event it causes (if any)."""

    state: TaskState
    event_type: EventType | None
    became_terminal: bool = False
    changed_fields: frozenset[str] = field(default_factory=frozenset)


class ProviderTaskIdMismatch(Conflict):
    code = "provider_task_id_mismatch"


def _rank(status: TaskStatus) -> int:
    return _TERMINAL_RANK if status in TERMINAL_STATUSES else _RANK[status]


def behind(current: TaskStatus, update: TaskUpdate) -> bool:
    """Whether ``update`` reports a state the task has moved past already (a late or
    out-of-order update, or any but the provider's final word on a final task): then its
    status word and duration hint are out of date too, and are not taken."""
    if update.status is None:
        return False
    if current is TaskStatus.expired:
        return update.status not in (TaskStatus.succeeded, TaskStatus.failed)
    if current in TERMINAL_STATUSES:
        return True
    return _rank(update.status) < _rank(current)


def _clamp_progress(value: int) -> int:
    return max(0, min(100, int(value)))


def decide(current: TaskState, update: TaskUpdate) -> Change | None:
    """Apply ``update`` to ``current``; ``None`` if nothing changes.

    Raises :class:`ProviderTaskIdMismatch` when the update names a different provider task
    than the one already recorded (a misrouted or forged callback must not change the task).
    """
    provider_task_id = current.provider_task_id
    if update.provider_task_id:
        if current.provider_task_id and current.provider_task_id != update.provider_task_id:
            raise ProviderTaskIdMismatch(
                f"The update names provider task {update.provider_task_id!r}, but this task is "
                f"{current.provider_task_id!r} at the provider.",
                details={
                    "expected": current.provider_task_id,
                    "received": update.provider_task_id,
                },
            )
        provider_task_id = update.provider_task_id

    status = current.status
    if current.status is TaskStatus.expired:
        # Only the provider's own final word moves an expired task: the user paid for it.
        if update.status in (TaskStatus.succeeded, TaskStatus.failed):
            status = update.status
    elif (
        current.status not in TERMINAL_STATUSES
        and update.status is not None
        and _rank(update.status) >= _rank(current.status)
    ):
        status = update.status

    terminal_now = status in TERMINAL_STATUSES
    became_terminal = status != current.status and terminal_now
    if current.status in TERMINAL_STATUSES and not became_terminal:
        # Already final: only the provider task id may still be learned, nothing else moves.
        if provider_task_id != current.provider_task_id:
            new_state = replace(current, provider_task_id=provider_task_id)
            return Change(new_state, None, changed_fields=frozenset({"provider_task_id"}))
        return None

    progress = current.progress
    # A failure's own progress is not taken: providers differ (GrsAI's stream ends a failure
    # at 100, others at 0 or nothing), and a failed, canceled or expired task keeps the
    # progress it had reached, the same whichever provider ran it.
    ended_unfinished = became_terminal and status is not TaskStatus.succeeded
    if update.progress is not None and not ended_unfinished:
        progress = max(progress, _clamp_progress(update.progress))
    images = current.images
    error = current.error
    if became_terminal:
        if status is TaskStatus.succeeded:
            progress = 100
            images = tuple(update.images) or current.images
            error = None
        else:
            error = update.error or (current.error if current.error else DEFAULT_FAILURE)
            if status is TaskStatus.canceled and not update.error:
                error = {"code": "canceled", "message": "The provider canceled the task."}
    # Cut as stored: compared uncut, a long status word would differ from its stored self.
    # A late update's word ("pending" after "processing") would move it back.
    raw_status = current.raw_status
    if update.raw_status is not None and not behind(current.status, update):
        raw_status = update.raw_status[:RAW_STATUS_CHARS]

    new_state = TaskState(
        status=status,
        progress=progress,
        images=images,
        error=error,
        provider_task_id=provider_task_id,
        raw_status=raw_status,
    )
    if new_state == current:
        return None

    changed = frozenset(
        name
        for name in ("status", "progress", "images", "error", "provider_task_id", "raw_status")
        if getattr(new_state, name) != getattr(current, name)
    )
    event_type: EventType | None = None
    if became_terminal:
        event_type = EventType(f"task.{status.value}")
    elif "status" in changed or "progress" in changed:
        event_type = EventType.progress
    return Change(new_state, event_type, became_terminal=became_terminal, changed_fields=changed)


def expire(current: TaskState, reason: str, code: str = "deadline_exceeded") -> Change | None:
    """TaskRelay gives up waiting on a task that has no final state yet."""
    if current.status in TERMINAL_STATUSES:
        return None
    new_state = replace(
        current,
        status=TaskStatus.expired,
        error={"code": code, "message": reason},
    )
    return Change(
        new_state,
        EventType.expired,
        became_terminal=True,
        changed_fields=frozenset({"status", "error"}),
    )
