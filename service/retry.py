"""Retry and backoff as pure objects: given what happened, they return a decision (wait this
long, or give up). No sleeping and no clock inside, so tests check schedules exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Past this many growths every delay is at its cap anyway (a factor of 1.1 already multiplies
# the base by over 400), and factor**n stays a finite float: TASKRELAY_SUBMIT_ATTEMPTS may be
# large, and 4.0**600 overflows.
MAX_GROWTHS = 64


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    Attempt 1 is the first try. ``delay(attempt)`` is the wait after attempt ``attempt``
    failed, or ``None`` once ``max_attempts`` tries have been made. A provider's
    Retry-After hint is honoured when it asks for longer, ``cap`` included.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    max_attempts: int = 4
    jitter: float = 0.5  # fraction of the delay that is randomised (0 = none, 1 = full jitter)

    def delay(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        if attempt >= self.max_attempts:
            return None
        growths = min(MAX_GROWTHS, attempt - 1)
        raw = min(self.cap, self.base * self.factor**growths)
        spread = raw * self.jitter
        chosen = raw - spread + (rng or random).random() * spread
        if retry_after is not None:
            # The provider's own word, even past the cap: sooner would only be refused again
            # (parsing.retry_after_seconds bounds a hint to an hour).
            chosen = max(chosen, retry_after)
        return chosen


def submit_backoff(base: float, attempts: int) -> Backoff:
    """Submissions: waits of about base, 4x base, 16x base... (capped at a minute, unless the
    provider's Retry-After asks for longer)."""
    return Backoff(base=base, factor=4.0, cap=60.0, max_attempts=attempts)
