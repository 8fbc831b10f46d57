"""The polling fallback: finds tasks whose update is overdue and asks their provider.

Each pass claims, per provider, the tasks that are due (leases in the database, so several
processes never query the same task at once), queries their status within that provider's
concurrency and rate caps, and records each answer through the same state machine as a
callback. A task past its deadline gets one last query, then becomes ``expired`` (a last
query refused with a 429 or a Retry-After is made once more, when the provider asked). The
loop wakes on an interval, on :meth:`Scheduler.wake`, or stops; each pass logs and survives
its own errors. Providers do not wait for each other: the loop claims a provider's next batch
once its previous batch is done, whatever the others' claims and batches are doing, so a
provider whose queries hang (each cut off before its poll lease runs out) or whose claim is
slow (plans moved after a stall) delays only its own tasks.
:meth:`Scheduler.run_once` and :meth:`Scheduler.run_until_idle` drive it pass by pass in
tests, each pass waiting for its queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from service import observe
from service.errors import (
    Conflict,
    ProviderError,
    StoreUnavailable,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from service.lifecycle import TaskUpdate
from service.loops import Failures, Ticker
from service.metrics import Metrics
from service.models import TERMINAL_STATUSES, Task, TaskOrigin, TaskStatus
from service.providers.base import ProviderAdapter
from service.settings import lease_margin
from service.store import Claim, Store

log = logging.getLogger(__name__)

# A pass claims about this many seconds' worth of each provider's query budget.
PASS_SECONDS = 2.0


class ProviderPaused(Exception):
    """The provider asked for a pause longer than a pass may wait."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"paused for {seconds:.1f} s")
        self.seconds = seconds


# How much of the last query's error an expired task's message quotes.
WHY_EXPIRED_CHARS = 300


def _why_expired(adapter: ProviderAdapter, claim: Claim, failure: ProviderError | None) -> str:
    """An expired task's error message: what TaskRelay last knew, not only that time ran out
    (a provider that does not know the task id, a submission that never named one)."""
    said = "No final answer from the provider before the task's deadline"
    if adapter.can_query_status and claim.provider_task_id is None:
        return (
            f"{said}: the provider's id for the task never came (not in the answer to its "
            "submission, a callback or a PATCH), so TaskRelay could not ask about it."
        )
    if failure is not None:
        quoted = f"{failure.code}: {failure.message}"[:WHY_EXPIRED_CHARS]
        return f"{said}; the last status query failed ({quoted})."
    return f"{said}."


def _why_unanswered(adapter: ProviderAdapter) -> str:
    """An expired task's error message when it is still queued after TaskRelay sent it: no
    answer to the submission was recorded (the process sending it stopped while it waited, or
    the answer was lost or unusable) and nothing came after."""
    came = "and no callback came" if adapter.delivers_callbacks() else "and it cannot be asked"
    # No advice to submit again: the submission may still be waiting for its answer (a long
    # generation against a short deadline), and a second task would be paid for twice.
    return (
        f"TaskRelay sent the task to {adapter.name} but had recorded no answer to the "
        f"submission by its deadline, {came}: the submission may still be waiting for its "
        "answer, the process sending it may have stopped (a crash, a kill, or a shutdown "
        "that cut it off), or the answer was lost or could not be used. It is not sent "
        "again, since the provider may have made (and billed) the image; an answer that "
        "still comes is recorded on this task."
    )


def _why_lost(adapter: ProviderAdapter) -> str:
    """An expired task's error message when its submission's answer was lost: nothing heard
    from it after every timeout of its request, and a margin, had run out, at a provider
    that cannot call back."""
    return (
        f"TaskRelay sent the task to {adapter.name} but had heard nothing more of the "
        "submission (no answer; from a stream, no line) when every timeout of that request, "
        "and a margin for recording the answer, had run out: the process sending it stopped "
        "(a crash or a kill), or the answer was lost. "
        f"{adapter.name} does not call back here and cannot be asked about a task without "
        "its id, so nothing else could settle this task. It is not sent again, since the "
        "provider may have made (and billed) the image; if the image, or the provider's id "
        "for the task, still comes, it is recorded on this task."
    )


class _Stopping(Exception):
    """The scheduler is stopping: a claimed task is handed back instead of being queried."""


class _LastLookRefused(Exception):
    """The last look, at or past the deadline, was refused for now (a 429, or a 5xx with
    Retry-After): it is made again after ``seconds`` instead of expiring the task."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"last look refused for {seconds:.1f} s")
        self.seconds = seconds


class _LeaseRunningOut(Exception):
    """No slot came free for the query before the task's lease ran out: not asked, handed
    back."""


class ProviderLimiter:
    """At most ``concurrency`` queries in flight and ``rate`` per second for one provider, and a
    provider-wide pause after it answers 429 (its Retry-After, when it gives one)."""

    def __init__(
        self,
        concurrency: int,
        rate: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_pause_wait: float = PASS_SECONDS,
    ) -> None:
        self.max_pause_wait = max_pause_wait
        self.concurrency = concurrency
        self.rate = rate
        self._slots = asyncio.Semaphore(concurrency)
        self._monotonic = monotonic
        self._sleep = sleep
        self._next_start = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._monotonic() + seconds)

    def paused_for(self) -> float:
        """Seconds until the provider may be asked again (0 when it may be asked now)."""
        return max(0.0, self._paused_until - self._monotonic())

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        try:
            async with self._lock:  # starts are spaced 1/rate apart, in arrival order
                while True:
                    now = self._monotonic()
                    if self._paused_until - now > self.max_pause_wait:
                        raise ProviderPaused(self._paused_until - now)
                    start = max(now, self._next_start, self._paused_until)
                    if start <= now:
                        break
                    await self._sleep(start - now)
                self._next_start = now + 1.0 / self.rate
        except BaseException:
            self._slots.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._slots.release()


@dataclass(frozen=True)
class PollOutcome:
    task: dict[str, Any] | None
    queried: bool
    expired: bool


class Scheduler:
    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, ProviderAdapter],
        limiters: Mapping[str, ProviderLimiter],
        *,
        metrics: Metrics,
        lease_seconds: float = 60.0,
        tick_seconds: float = 1.0,
        clock: Callable[[], datetime],
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.limiters = limiters
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.tick_seconds = tick_seconds
        self.clock = clock
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self._ticker = Ticker("scheduler", self._step, tick_seconds)
        self._claim_failures = Failures("scheduler claim")
        # Providers whose latest claim failed for want of the database: the outage is over
        # when none is left. A provider with nothing due claims by reading alone, which a
        # read-only store answers: its success ended the outage that the providers with due
        # tasks still met, and the two lines alternated every second (found by the metrics
        # and logs hunt).
        self._claims_failing: set[str] = set()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        # The refreshes (POST /v1/tasks/{id}/refresh) under way: lease owner -> its task.
        self._refreshing: dict[str, asyncio.Task[Any]] = {}
        # Each provider's batch still being queried, and its claim in progress: the loop
        # claims no more for that provider meanwhile.
        self._busy: dict[str, set[asyncio.Task[None]]] = {}
        self._claiming: dict[str, asyncio.Task[list[asyncio.Task[None]]]] = {}

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile (plan every unfinished task that has no plan), then run the loop."""
        try:
            planned = await run_in_threadpool(self.store.reconcile)
            if planned:
                log.info("reconciled %d unfinished tasks into the polling schedule", planned)
        except StoreUnavailable:
            log.error("start-up reconciliation skipped: the database is unavailable")
        self._ticker.start()

    async def stop(self, *, grace: float) -> None:
        """Stop claiming; let the status queries already sent finish (up to ``grace``, then
        they are cut off) and send no more; then hand back every lease still held, so the
        next process polls those tasks at once instead of after the lease expires."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # The loop's passes do not wait for their queries: it stops once a claim in progress
        # (a short transaction) is done.
        await self._ticker.stop()
        if self._claiming:  # short transactions; their batches see _stopping and hand back
            await asyncio.wait(set(self._claiming.values()))
        running = set(self._in_flight)
        if running:
            _, cut_off = await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
            if cut_off:
                log.warning(
                    "stopping: %d polls still running (or waiting for a slot) after %.1f s are "
                    "cut off; their tasks are handed back",
                    len(cut_off),
                    grace,
                )
                for job in cut_off:
                    job.cancel()
                await asyncio.wait(cut_off)
        # Refreshes are requests, which uvicorn drains meanwhile: their leases stay theirs
        # until they end (or uvicorn cuts them off at the drain's end, and each hands its own
        # back); released at once, another replica queried the task while the refresh's own
        # query ran (found by the replica hunt). Any still running at the deadline are
        # released with the scheduler's own.
        refreshing = set(self._refreshing.values())
        if refreshing:
            await asyncio.wait(refreshing, timeout=max(0.0, deadline - loop.time()))
        for worker in (self.worker_id, *sorted(self._refreshing)):
            try:
                await run_in_threadpool(self.store.release_leases, worker)
            except StoreUnavailable:
                log.warning("could not release polling leases; they expire on their own")
                break

    def wake(self) -> None:
        self._ticker.wake()

    def _lease_until(self, claimed_at: float) -> float:
        """When a query of a task claimed at ``claimed_at`` (loop time, taken before the claim)
        must have ended: its lease less the margin to record the answer."""
        margin = lease_margin(self.lease_seconds)
        return claimed_at + self.lease_seconds - margin

    # --- passes -----------------------------------------------------------------------------

    async def run_once(self) -> int:
        """One pass over every provider's due tasks, waiting for their claims and queries to
        end; returns how many were handled (tests and benchmarks drive the scheduler so). A
        claim that failed is raised once the other providers' batches are done."""
        results = await asyncio.gather(*self._start_claims(), return_exceptions=True)
        jobs = [job for result in results if isinstance(result, list) for job in result]
        if jobs:
            # A job cut off by stop() ends the pass like any other: not an error here.
            await asyncio.gather(*jobs, return_exceptions=True)
        failures = [result for result in results if isinstance(result, Exception)]
        for extra in failures[1:]:
            self._claim_failures.failed(extra)
        if failures:
            raise failures[0]
        return len(jobs)

    async def _step(self) -> int:
        """The loop's pass: start a claim for every provider whose previous batch is done
        and that is not being claimed for already, and wait for none of them. Each claim
        starts its batch's queries as it returns, and a batch ending wakes the loop for that
        provider's next claim; so a slow claim (plans moved after a stall) or a batch of
        hanging queries holds up its own provider only."""
        for claiming in self._start_claims():
            claiming.add_done_callback(partial(self._report_claim, claiming.get_name()))
        return 0

    def _start_claims(self) -> list[asyncio.Task[list[asyncio.Task[None]]]]:
        started = []
        for provider in self.limiters:
            if self._stopping:
                break
            if self._busy.get(provider) or provider in self._claiming:
                continue  # its batch is still out, or its claim: the next when that ends
            claiming = asyncio.create_task(self._claim_for(provider), name=provider)
            self._claiming[provider] = claiming
            claiming.add_done_callback(partial(self._claimed, provider))
            started.append(claiming)
        return started

    def _claimed(self, provider: str, claiming: asyncio.Task[Any]) -> None:
        self._claiming.pop(provider, None)

    def _report_claim(self, provider: str, claiming: asyncio.Task[Any]) -> None:
        """The loop's claims run on their own: their failures (and an outage's end, once
        every provider's claim works again) are logged here."""
        if claiming.cancelled():
            return
        if (exc := claiming.exception()) is not None:
            if isinstance(exc, StoreUnavailable):
                self._claims_failing.add(provider)
            self._claim_failures.failed(exc)
            return
        self._claims_failing.discard(provider)
        if not self._claims_failing:
            self._claim_failures.succeeded()

    async def _claim_for(self, provider: str) -> list[asyncio.Task[None]]:
        if self._stopping:
            return []
        limiter = self.limiters[provider]
        limit = max(limiter.concurrency, math.ceil(limiter.rate * PASS_SECONDS))
        until = self._lease_until(asyncio.get_running_loop().time())
        batch = await run_in_threadpool(
            self.store.claim_due,
            provider,
            self.worker_id,
            limit=limit,
            lease_seconds=self.lease_seconds,
        )
        busy = self._busy.setdefault(provider, set())
        jobs = []
        for claim in batch:
            # Tracked at once: these jobs run (and may end) while other providers' claims
            # still wait in their threads, and outlive a claim that fails.
            job = asyncio.create_task(self._handle(claim, until))
            self._in_flight.add(job)
            busy.add(job)
            job.add_done_callback(partial(self._ended, busy))
            jobs.append(job)
        return jobs

    def _ended(self, busy: set[asyncio.Task[None]], job: asyncio.Task[None]) -> None:
        self._in_flight.discard(job)
        busy.discard(job)
        if not busy and not self._stopping:
            self.wake()  # that provider may have more due

    async def run_until_idle(self, max_passes: int = 1000) -> int:
        """Passes until nothing is due (tests and benchmarks); returns how many were handled."""
        handled = 0
        for _ in range(max_passes):
            found = await self.run_once()
            if not found:
                return handled
            handled += found
        raise RuntimeError("the scheduler did not become idle")

    async def _handle(self, claim: Claim, until: float | None = None) -> None:
        observe.bind(task_id=claim.task_id, provider=claim.provider)  # this job's own context
        try:
            await self.poll(claim, worker=self.worker_id, until=until)
        except _Stopping:
            pass  # not asked: stop() hands the lease back
        except StoreUnavailable:
            log.warning("poll of %s not recorded: the database is unavailable", claim.task_id)
        except Exception:
            log.exception("poll of %s failed", claim.task_id)

    async def poll(
        self, claim: Claim, *, worker: str | None, until: float | None = None
    ) -> PollOutcome:
        """Ask the provider about one task and record the answer; past the deadline, expire
        the task unless that last answer was final. ``until`` (loop time) bounds the query,
        its wait for a slot included: the end of the claim's lease, less a margin."""
        final_look = self.clock() >= claim.deadline_at
        adapter = self.adapters[claim.provider]
        task = None
        queried = False
        failure: ProviderError | None = None  # this look's, if the provider refused it
        if adapter.can_query_status and claim.provider_task_id is not None:
            try:
                task, failure = await self._query(
                    adapter, claim, worker, until, final_look=final_look
                )
            except _LastLookRefused as refused:
                task = await run_in_threadpool(
                    self.store.defer, claim.task_id, worker, seconds=refused.seconds
                )
                log.info(
                    "the last look at %s before it expires was refused; asking again in %.1f s",
                    claim.task_id,
                    refused.seconds,
                )
                return PollOutcome(task, queried=True, expired=False)
            except _LeaseRunningOut:
                # Never sent: handed back, due now, for the next pass (this one or another
                # process's) to claim with a fresh lease. Not a failed query.
                task = await run_in_threadpool(self.store.defer, claim.task_id, worker, seconds=0)
                return PollOutcome(task, queried=False, expired=False)
            except ProviderPaused as paused:
                # The provider asked us to back off: hand the task back for when the pause ends
                # instead of sleeping on its lease (and holding up this pass for other
                # providers). Even at the deadline: the last look is made after the pause,
                # before the task may expire. But once only, as for a refused last look: each
                # pause's one query (another task's) renewed the pause, and the tasks past
                # their deadline behind it were put off again and again, the n-th expiring n
                # pauses late (found by the stuck-task hunt).
                if not (final_look and await run_in_threadpool(self._put_off, claim)):
                    task = await run_in_threadpool(
                        self.store.defer, claim.task_id, worker, seconds=paused.seconds
                    )
                    return PollOutcome(task, queried=False, expired=False)
                failure = UpstreamRateLimited(
                    f"{claim.provider} kept status queries paused (it answered 429) past the "
                    "task's deadline and the one wait after it",
                    provider=claim.provider,
                    retry_after=paused.seconds,
                )
            else:
                queried = True
        if final_look and (task is None or task["status"] not in _FINAL):
            result = await run_in_threadpool(
                self.store.expire_task,
                claim.task_id,
                _why_expired(adapter, claim, failure),
                unsent=_why_unanswered(adapter),
            )
            if result.event is not None:  # not one expired already, followed till now
                self.metrics.inc("tasks_expired_total", provider=claim.provider)
                log.info("task %s expired at its deadline", claim.task_id)
            return PollOutcome(result.task, queried, expired=result.event is not None)
        if not queried and claim.provider_task_id is None:
            # Maybe a submission whose answer was lost with the process sending it (its due
            # time, in the row, was set by that process).
            lost = await run_in_threadpool(
                self.store.expire_unanswered, claim.task_id, _why_lost(adapter)
            )
            if lost is not None:
                self.metrics.inc("tasks_expired_total", provider=claim.provider)
                log.warning(
                    "task %s expired: no answer to its submission was recorded in time",
                    claim.task_id,
                )
                return PollOutcome(lost.task, queried, expired=lost.event is not None)
        if not queried:
            # Nothing to ask (no provider task id yet, or no status endpoint): plan the next
            # look, which is never later than the deadline.
            task = await run_in_threadpool(self.store.reschedule, claim.task_id, worker)
        return PollOutcome(task, queried, expired=False)

    async def _ask(
        self,
        adapter: ProviderAdapter,
        claim: Claim,
        *,
        scheduled: bool = False,
        until: float | None = None,
    ) -> TaskUpdate:
        """One status query within the provider's limits. Failures are counted and raised;
        a 429 pauses the provider; a long pause raises ProviderPaused instead of waiting.

        ``until`` (loop time) is when the claim's lease runs out, less a margin: the upstream
        client's timeouts bound each read, not the whole query (a provider may trickle), and a
        query that waited for a slot behind hanging ones starts late. Past it, a query not yet
        sent raises _LeaseRunningOut; one in flight is cut off and fails like a timeout."""
        assert claim.provider_task_id is not None
        limiter = self.limiters[claim.provider]
        sent = False
        try:
            async with asyncio.timeout_at(until) as bound:
                async with limiter:
                    if scheduled and self._stopping:  # waited for a slot while stopping
                        raise _Stopping
                    sent = True
                    update = await self._send(adapter, claim, limiter)
        except TimeoutError:
            if not bound.expired():
                raise
            if not sent:
                raise _LeaseRunningOut from None
            exc = UpstreamUnavailable(
                f"{claim.provider} did not answer the status query before the task's poll "
                "lease ran out",
                provider=claim.provider,
                ambiguous=True,
            )
            self._failed(claim, exc)
            raise exc from None
        if update.provider_task_id not in (None, claim.provider_task_id):
            # An answer about another task (a provider's mix-up): a failed query, counted,
            # logged and backed off as one, never taken for this task's state.
            # The other task's id is not quoted: it may be another client's.
            mixed_up = UpstreamProtocolError(
                f"{claim.provider} answered a status query for task "
                f"{claim.provider_task_id!r} with the state of another task",
                provider=claim.provider,
            )
            self._failed(claim, mixed_up)
            raise mixed_up
        self.metrics.inc("status_queries_total", provider=claim.provider, outcome="ok")
        return update

    async def _send(
        self, adapter: ProviderAdapter, claim: Claim, limiter: ProviderLimiter
    ) -> TaskUpdate:
        assert claim.provider_task_id is not None
        started = time.perf_counter()
        try:
            return await adapter.query_status(claim.provider_task_id)
        except ProviderError as exc:
            if exc.code == "upstream_rate_limited":
                limiter.pause(exc.retry_after or 1.0)
            self._failed(claim, exc)
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe("status_query_duration_seconds", elapsed, provider=claim.provider)

    def _failed(self, claim: Claim, exc: ProviderError) -> None:
        self.metrics.inc("status_queries_total", provider=claim.provider, outcome=exc.code)
        log.info(
            "status query for %s failed: %s",
            claim.task_id,
            exc.code,
            extra={"provider": claim.provider},
        )

    async def _query(
        self,
        adapter: ProviderAdapter,
        claim: Claim,
        worker: str | None,
        until: float | None,
        *,
        final_look: bool = False,
    ) -> tuple[dict[str, Any], ProviderError | None]:
        """The task after this query is recorded, and the query's error if it failed."""
        try:
            update = await self._ask(adapter, claim, scheduled=True, until=until)
        except ProviderError as exc:  # a ProviderPaused is not one: poll() hands the task back
            if final_look:
                wait = self._refused_for(claim, exc)
                if wait is not None and not await run_in_threadpool(self._put_off, claim):
                    raise _LastLookRefused(wait) from exc
            failed = await run_in_threadpool(
                self.store.record_poll, claim.task_id, worker, error=exc
            )
            return failed.task, exc
        result = await run_in_threadpool(
            self.store.record_poll, claim.task_id, worker, update=update
        )
        return result.task, result.error

    def _refused_for(self, claim: Claim, exc: ProviderError) -> float | None:
        """How long the provider asked to be left alone when it refused a query for now (a
        429, or another error worth retrying that came with Retry-After); None otherwise."""
        if not exc.retryable:
            return None
        paused = self.limiters[claim.provider].paused_for()  # a 429's, _send paused it
        if exc.retry_after is None and exc.code != UpstreamRateLimited.code:
            return None  # no hint (a timeout, a bare 5xx): nothing says a later look is worth it
        return max(exc.retry_after or 0.0, paused)

    def _put_off(self, claim: Claim) -> bool:
        """Whether this look at a task past its deadline was planned after the deadline: a
        last look put off already (by a pause, a hand-back for want of a slot, or a refused
        last look).

        A refused last look is like a pause known beforehand (ProviderPaused): the provider
        said when to ask, so the last look moves there instead of expiring a task it may
        have finished. But only once: a pause gives the task one look after it, and so does
        a refusal. The polling policy never plans past the deadline, so a plan after it is
        what marks the look as put off already, in the row, whichever process (or start-up
        after a restart) makes the look. A provider that refuses every query cannot keep a
        task alive: its second refusal expires it."""
        with self.store.transaction(write=False) as session:
            planned = session.execute(
                sa.select(col(Task.next_check_at)).where(col(Task.id) == claim.task_id)
            ).scalar()
        return planned is not None and bool(planned > claim.deadline_at)

    async def refresh(self, task: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/refresh``: query the provider now and record the answer.

        The task is leased like a scheduled poll, so a refresh never runs at the same moment
        as another process's (or this one's) status query of the same task."""
        adapter = self.adapters[task["provider"]]
        if not adapter.can_query_status:
            raise Conflict(
                f"{task['provider']} has no status endpoint: its results arrive with the "
                "submission itself.",
                code="not_queryable",
            )
        if task["provider_task_id"] is None:
            how = (
                "set one with PATCH /v1/tasks/{id}."
                if task["origin"] == TaskOrigin.tracked.value
                else "TaskRelay takes it from the provider's answer to the submission; ask "
                "again once the task has one."
            )
            raise Conflict(
                "The task has no provider task id yet, so the provider cannot be asked about "
                f"it; {how}",
                code="not_queryable",
            )
        worker = f"refresh-{uuid.uuid4().hex[:12]}"
        until = self._lease_until(asyncio.get_running_loop().time())
        current = asyncio.current_task()
        assert current is not None
        self._refreshing[worker] = current
        claiming = asyncio.ensure_future(
            run_in_threadpool(
                self.store.claim_task, task["id"], worker, lease_seconds=self.lease_seconds
            )
        )
        try:
            if not await asyncio.shield(claiming):
                raise Conflict(
                    "The provider is being asked about this task right now; try again in a moment.",
                    code="poll_in_progress",
                )
            return await self._refresh_claimed(adapter, task, worker, until)
        except (ProviderError, Conflict):
            raise  # recorded (the lease handed back with the record), or never leased
        except BaseException:
            # Cut off (uvicorn cancels what still runs when its drain ends), even while the
            # lease was being taken, or failed before it was handed back with a record:
            # handed back here, or the restarted process (or another replica) could not poll
            # the task until the lease ran out, past its deadline. Only this refresh's lease.
            release = asyncio.ensure_future(self._hand_back(claiming, worker))
            # Unavailable: it expires on its own; cancelled again: the release goes on.
            with contextlib.suppress(StoreUnavailable, asyncio.CancelledError):
                await asyncio.shield(release)
            raise
        finally:
            self._refreshing.pop(worker, None)

    async def _hand_back(self, claiming: asyncio.Future[bool], worker: str) -> None:
        """Release ``worker``'s lease once its claim (perhaps still running) is done."""
        await asyncio.wait([claiming])
        if not claiming.cancelled() and claiming.exception() is None and claiming.result():
            await run_in_threadpool(self.store.release_leases, worker)

    async def _refresh_claimed(
        self, adapter: ProviderAdapter, task: dict[str, Any], worker: str, until: float
    ) -> dict[str, Any]:
        """:meth:`refresh` once the task is leased to ``worker``: ask, and record the answer
        (which hands the lease back)."""
        claim = Claim(task["id"], task["provider"], task["provider_task_id"], _FAR_FUTURE)
        try:
            update = await self._ask(adapter, claim, until=until)
        except _LeaseRunningOut:
            await run_in_threadpool(self.store.release_leases, worker)  # this refresh's only
            raise UpstreamUnavailable(
                f"Every status query slot for {task['provider']} stayed busy; try again shortly.",
                provider=task["provider"],
                retry_after=PASS_SECONDS,
            ) from None
        except ProviderPaused as paused:
            await run_in_threadpool(
                self.store.defer, claim.task_id, worker, seconds=paused.seconds, manual=True
            )
            raise UpstreamRateLimited(
                f"{task['provider']} asked for a pause in status queries.",
                provider=task["provider"],
                retry_after=paused.seconds,
            ) from None
        except ProviderError as exc:
            await run_in_threadpool(
                self.store.record_poll, claim.task_id, worker, error=exc, manual=True
            )
            if exc.status == 503 and exc.retry_after is None:
                # Unavailable without a word of when (a 500, a timeout): the caller is told to
                # wait what the scheduler waits after a failed query.
                exc.retry_after = self.store.policy(claim.provider).error_backoff
            raise
        result = await run_in_threadpool(
            self.store.record_poll, claim.task_id, worker, update=update, manual=True
        )
        if result.error is not None:
            raise result.error  # recorded as a failed query: the answer was not taken
        return result.task


_FINAL = {status.value for status in TERMINAL_STATUSES if status is not TaskStatus.expired}
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
