"""Delivers events to subscribers: signed (Standard Webhooks), retried, in order per task.

Each pass claims due deliveries (leases in the database, so several processes never send the
same delivery at once, and a crashed process's claims are retried by the others with the same
``webhook-id``), sends them concurrently with a cap per subscriber, and records every attempt.
A slow or dead subscriber only ever holds its own few slots: callback ingestion and other
subscribers' deliveries go on. The loop wakes on new events (:meth:`Dispatcher.notify`), on an
interval, or stops; :meth:`Dispatcher.run_until_idle` drives it in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import httpx
from starlette.concurrency import run_in_threadpool

from service.errors import NotFound, StoreUnavailable
from service.loops import Ticker
from service.metrics import Metrics
from service.outbox import AttemptResult, DeliveryJob, Outbox

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# The whole attempt, however the subscriber trickles its answer.
ATTEMPT_DEADLINE_SECONDS = 30.0
RESPONSE_READ_CAP = 4096
USER_AGENT = "TaskRelay-Webhooks/1"


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        http: httpx.AsyncClient,
        *,
        metrics: Metrics,
        concurrency: int = 32,
        per_subscription: int = 4,
        lease_seconds: float = 60.0,
        tick_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        worker_id: str | None = None,
    ) -> None:
        self.outbox = outbox
        self.http = http
        self.metrics = metrics
        self.concurrency = concurrency
        self.per_subscription = per_subscription
        self.lease_seconds = lease_seconds
        self.tick_seconds = tick_seconds
        self.monotonic = monotonic
        self.worker_id = worker_id or f"dispatch-{uuid.uuid4().hex[:12]}"
        self._ticker = Ticker("dispatcher", self._pass, tick_seconds)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._busy: dict[int, int] = {}
        self._sending: set[int] = set()  # delivery pks this process is sending right now

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._ticker.start()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let in-flight deliveries finish (up to ``grace``), then release
        every lease still held so another process sends them."""
        await self._ticker.stop()
        if self._in_flight:
            _done, pending = await asyncio.wait(list(self._in_flight), timeout=grace)
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await run_in_threadpool(self.outbox.release, self.worker_id)
        except StoreUnavailable:
            log.warning("could not release delivery leases; they expire on their own")

    def notify(self) -> None:
        """New events were committed (may be called from any thread)."""
        self._ticker.wake()

    async def _pass(self) -> int:
        return await self.run_once(wait=False)

    # --- passes -----------------------------------------------------------------------------

    async def run_once(self, *, wait: bool = True) -> int:
        """Claim what free slots allow and start sending; with ``wait``, wait for them."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            if self._in_flight:
                await asyncio.wait(list(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            return 0
        saturated = frozenset(
            pk for pk, busy in self._busy.items() if busy >= self.per_subscription
        )
        jobs = await run_in_threadpool(
            self.outbox.claim,
            self.worker_id,
            limit=free,
            lease_seconds=self.lease_seconds,
            exclude=frozenset(self._sending),
            exclude_subscriptions=saturated,
        )
        started: list[asyncio.Task[None]] = []
        waiting: list[int] = []
        for job in jobs:
            if self._busy.get(job.subscription_pk, 0) >= self.per_subscription:
                waiting.append(job.delivery_pk)  # that subscriber has enough in flight
                continue
            self._busy[job.subscription_pk] = self._busy.get(job.subscription_pk, 0) + 1
            task = asyncio.create_task(self._deliver(job), name=f"deliver:{job.delivery_id}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            started.append(task)
        if waiting:
            await run_in_threadpool(self.outbox.unclaim, waiting, self.worker_id)
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)
        return len(started)

    async def run_until_idle(self, max_passes: int = 1000) -> int:
        """Passes until nothing is due (tests); returns how many deliveries were attempted."""
        total = 0
        for _ in range(max_passes):
            # Deliveries finishing while a pass runs can make more claimable (their
            # subscriber is no longer at its cap): idle means a pass that started with
            # nothing in flight found nothing.
            busy_before = bool(self._in_flight)
            found = await self.run_once(wait=True)
            if found:
                total += found
            elif self._in_flight:  # started by earlier passes: idle only once they are done
                await asyncio.gather(*list(self._in_flight), return_exceptions=True)
            elif not busy_before:
                return total
        raise RuntimeError("the dispatcher did not become idle")

    async def _deliver(self, job: DeliveryJob) -> None:
        self._sending.add(job.delivery_pk)
        try:
            result = await self._send_holding_lease(job)
            outcome = "succeeded" if result.succeeded else "failed"
            self.metrics.inc("deliveries_total", outcome=outcome)
            # NotFound: the subscription was deleted while we were sending.
            with contextlib.suppress(NotFound):
                await run_in_threadpool(self.outbox.record_attempt, job, self.worker_id, result)
        except StoreUnavailable:
            log.warning("delivery %s not recorded: the database is unavailable", job.delivery_id)
        except Exception:
            log.exception("delivery %s failed unexpectedly", job.delivery_id)
        finally:
            self._sending.discard(job.delivery_pk)
            self._busy[job.subscription_pk] -= 1
            if not self._busy[job.subscription_pk]:
                del self._busy[job.subscription_pk]
            self.notify()  # a slot is free: that subscriber's next delivery may go now

    async def _send_holding_lease(self, job: DeliveryJob) -> AttemptResult:
        """Send, renewing the lease while the subscriber takes its time, so no other process
        (and no later pass of this one) sends the same delivery meanwhile."""
        sending = asyncio.create_task(self.send(job))
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=self.lease_seconds / 3)
                if done:
                    return sending.result()
                await run_in_threadpool(
                    self.outbox.extend_lease, job.delivery_pk, self.worker_id, self.lease_seconds
                )
        finally:
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending

    async def send(self, job: DeliveryJob) -> AttemptResult:
        """One POST of the signed event; never raises for the subscriber's failures."""
        from service.signing import webhook_headers

        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **webhook_headers(job.signing_secrets, job.event_id, timestamp, job.body),
        }
        started = self.monotonic()
        try:
            async with asyncio.timeout(ATTEMPT_DEADLINE_SECONDS):
                async with self.http.stream(
                    "POST", job.url, content=job.body, headers=headers, timeout=DELIVERY_TIMEOUT
                ) as response:
                    body = await _read_capped(response)
        except TimeoutError:
            elapsed = (self.monotonic() - started) * 1000
            late = f"no complete answer within {ATTEMPT_DEADLINE_SECONDS:.0f} s"
            return AttemptResult(None, elapsed, error=late)
        except httpx.HTTPError as exc:
            elapsed = (self.monotonic() - started) * 1000
            return AttemptResult(None, elapsed, error=f"{type(exc).__name__}: {exc}"[:500])
        elapsed = (self.monotonic() - started) * 1000
        error = None if response.is_success else f"HTTP {response.status_code}"
        return AttemptResult(response.status_code, elapsed, response_body=body, error=error)


async def _read_capped(response: httpx.Response) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= RESPONSE_READ_CAP:
            break
    return b"".join(chunks)[:RESPONSE_READ_CAP].decode("utf-8", errors="replace")
