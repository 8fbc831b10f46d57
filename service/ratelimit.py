"""Per-client rate limiting of the management API: one token bucket per API client.

A client may make ``TASKRELAY_RATE_LIMIT`` requests per second on average, and up to
``TASKRELAY_RATE_LIMIT_BURST`` at once after a quiet spell; beyond that it gets a 429 with
Retry-After (:class:`RateLimited`) and the request does nothing. A refused request takes no
token, so a client that keeps retrying gets in as soon as its bucket refills.

What is limited, and what is not
--------------------------------
Only requests that authenticated as a client (``/v1/...``) take from that client's bucket,
after the token was checked: a request with a missing or wrong token can never spend another
client's budget, and buckets exist for the configured clients only (TASKRELAY_API_TOKENS), so
memory is bounded whatever a caller sends. Provider callbacks (the providers' retries must
land), ``/healthz``, ``/readyz`` and the metrics are not limited; a flood of unauthenticated
requests is for the load balancer in front to cap per address.

Per process, on purpose
-----------------------
Buckets live in each process's memory, so with N replicas behind a load balancer a client
may get up to N times the limit (set the limit to the total divided by N). That is the right
trade here: the limit protects each process's capacity (its CPU, its database connections)
from one runaway client, which is per-process by nature, not a billing quota that must be
exact. Keeping it on the database would add a write to a hot per-client row on every read
request, on the very resource the limit protects. The bucket costs a few arithmetic
operations on the event loop (no lock: it is only ever used there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from service.errors import RateLimited


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token and return 0.0, or return the seconds until one is available
        (nothing taken)."""
        # A clock that went backwards (it should not, monotonic) refills nothing.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class ClientRateLimiter:
    """One :class:`TokenBucket` per known client; ``rate`` 0 turns limiting off."""

    def __init__(
        self,
        clients: Iterable[str],
        *,
        rate: float,
        burst: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._monotonic = monotonic
        now = monotonic()
        self._buckets = (
            {name: TokenBucket(rate, float(burst), float(burst), now) for name in clients}
            if rate > 0
            else {}
        )

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, client: str) -> None:
        """Count one request of ``client`` (already authenticated), or raise
        :class:`RateLimited` with the seconds to wait."""
        bucket = self._buckets.get(client)
        if bucket is None:  # limiting is off (no buckets), or a name nobody configured
            return
        wait = bucket.take(self._monotonic())
        if wait > 0:
            seconds = math.ceil(wait)
            raise RateLimited(
                f"Too many requests from this API client: the limit is {self.rate:g} per second "
                f"with bursts of {self.burst} (TASKRELAY_RATE_LIMIT, TASKRELAY_RATE_LIMIT_BURST). "
                f"Retry in {seconds} s.",
                retry_after=wait,
                details={"limit_per_second": self.rate, "burst": self.burst},
            )
