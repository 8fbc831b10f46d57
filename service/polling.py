"""When to ask a provider about a task: the polling policy, as pure functions.

Callbacks are the normal path; a status query is the fallback for a callback that is late or
lost. So the first query waits until the task should be finished (the provider's estimate, or
what progress so far predicts, or the provider's typical duration) plus a short grace for the
callback to arrive: when callbacks come on time, no query is ever sent. After that, a query
aims at the finish that reported progress predicts; without a prediction (or once it has
passed, progress having stalled) queries follow a jittered, capped exponential backoff.
Failed queries back off on their own schedule and honour Retry-After.
Nothing is ever scheduled past the task's deadline, where one last query decides between the
provider's answer and ``expired``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.models import TERMINAL_STATUSES, TaskStatus

# Past this many doublings every interval is at its cap anyway (and 2**n stays a small float).
MAX_DOUBLINGS = 30


@dataclass(frozen=True)
class PollPolicy:
    """One provider's polling settings, in seconds."""

    typical_duration: float  # how long a task usually takes when the provider gives no estimate
    deadline: float  # after creation, give up waiting (expire after one last query)
    grace: float = 1.0  # after the expected finish, time for the callback to arrive
    first_step: float = 5.0  # the first interval of the backoff after the expected finish
    min_interval: float = 1.0
    max_interval: float = 300.0
    error_backoff: float = 5.0  # the first wait after a failed status query
    jitter: float = 0.1  # +/- this fraction of every interval
    queryable: bool = True  # False for providers without a status endpoint (OpenAI)
    # For a provider that cannot call back (OpenAI; GrsAI polled or streamed): how long after
    # a submission is sent its answer must have been recorded, if the process sending it is
    # still alive (the request's timeouts, and a margin to record the answer). A task still
    # queued with no answer after that lost it with its process (a crash, a kill): nothing
    # will ever settle it, so it expires then instead of at its deadline. None: no such
    # bound (a provider that calls back, whose callback may still come).
    answer_within: float | None = None


@dataclass(frozen=True)
class TaskTiming:
    """What the policy needs to know about one task."""

    status: TaskStatus
    started_at: datetime
    expected_at: datetime | None
    deadline_at: datetime
    progress: int
    progress_at: datetime | None
    poll_count: int  # status queries made so far (answered or not)
    poll_errors: int  # consecutive failed status queries
    has_provider_task_id: bool
    # When a submission sent without a recorded answer is lost (PollPolicy.answer_within
    # after it was sent), for a task still queued with no provider task id and no retry
    # planned; None otherwise.
    answer_due_at: datetime | None = None


def _jittered(seconds: float, policy: PollPolicy, rng: random.Random) -> float:
    spread = seconds * policy.jitter
    return seconds - spread + 2 * spread * rng.random()


def predicted_finish(timing: TaskTiming) -> datetime | None:
    """Extrapolate the finish from progress over time (linear since the start)."""
    if timing.progress_at is None or not 0 < timing.progress < 100:
        return None
    elapsed = (timing.progress_at - timing.started_at).total_seconds()
    if elapsed <= 0:
        return None
    total = elapsed * 100 / timing.progress
    return timing.started_at + timedelta(seconds=total)


def expected_finish(timing: TaskTiming, policy: PollPolicy) -> datetime:
    """The later of the provider's estimate (or typical duration) and what progress predicts."""
    expected = timing.expected_at or timing.started_at + timedelta(seconds=policy.typical_duration)
    predicted = predicted_finish(timing)
    return max(expected, predicted) if predicted else expected


def next_check(
    timing: TaskTiming, now: datetime, policy: PollPolicy, rng: random.Random | None = None
) -> datetime | None:
    """When to look at the task next, after a change or an answered query; None when never."""
    if timing.status in TERMINAL_STATUSES:
        return None
    if not policy.queryable or not timing.has_provider_task_id:
        # Nothing to ask the provider: wait for the callback, and expire at the deadline (or
        # when a submission's answer is lost, if that comes first).
        if timing.answer_due_at is not None:
            return min(timing.answer_due_at, timing.deadline_at)
        return timing.deadline_at
    rng = rng or random.Random()
    grace = timedelta(seconds=policy.grace)
    first = expected_finish(timing, policy) + grace
    if timing.poll_count == 0:
        # The first look: at the expected finish plus grace, or now if that has passed
        # (a restart after an outage finds such tasks overdue).
        when = max(first, now)
    else:
        predicted = predicted_finish(timing)
        target = predicted + grace if predicted is not None else None
        if target is not None and target > now:
            # Progress says when it will be done: look right then (no jitter: never early).
            until = (target - now).total_seconds()
            wait = min(policy.max_interval, max(policy.min_interval, until))
        else:
            # No prediction, or it has passed (progress stalled): capped, jittered backoff.
            step = policy.first_step * 2 ** min(MAX_DOUBLINGS, max(0, timing.poll_count - 1))
            wait = _jittered(max(policy.min_interval, min(policy.max_interval, step)), policy, rng)
        when = now + timedelta(seconds=wait)
    return min(when, timing.deadline_at)


def next_check_after_error(
    timing: TaskTiming,
    now: datetime,
    policy: PollPolicy,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> datetime:
    """After a failed status query: back off (``poll_errors`` counts this failure too)."""
    rng = rng or random.Random()
    doublings = min(MAX_DOUBLINGS, max(0, timing.poll_errors - 1))
    wait = min(policy.max_interval, policy.error_backoff * 2**doublings)
    wait = _jittered(wait, policy, rng)
    if retry_after is not None:
        # The provider's own wait wins over the cap of ours (asked again sooner, it would
        # only refuse again); retry_after_seconds bounds it, and the deadline below.
        wait = max(wait, retry_after)
    return min(now + timedelta(seconds=wait), timing.deadline_at)
