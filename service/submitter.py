"""Sends submitted tasks to their provider, in the background, after the task row is committed.

The order matters: the task exists (and its callback token is valid) before the request
leaves, and each attempt is counted before it is sent. So a submission whose reply is lost to a
timeout or a crash is not lost: the provider's callback still finds the task. Provider-side
failures are retried with backoff a bounded number of times; the caller's faults are final and
end the task ``failed`` with the provider's error. A planned retry is written into the task row
before the backoff starts, so a process stopped or killed during the backoff does not lose it:
the next sweep of any process sends it once it is overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from starlette.concurrency import run_in_threadpool

from service import observe
from service.errors import Conflict, ProviderError, StoreUnavailable, TaskRelayError
from service.files import ImageFiles
from service.lifecycle import TaskUpdate
from service.loops import Ticker
from service.metrics import Metrics
from service.models import TERMINAL_STATUSES, TaskStatus, UpdateSource
from service.providers.base import (
    GenerationRequest,
    ProviderAdapter,
    SubmitResult,
    answered_2xx,
)
from service.retry import Backoff, submit_backoff
from service.signing import CallbackSigner
from service.store import Store, unsent_past_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")

# Unsent submissions and overdue retries: how often every process looks for them, and how old
# (or how overdue) they must be: younger ones are most likely being sent right now by the
# replica that accepted them or planned the retry.
SWEEP_SECONDS = 30.0
SWEEP_GRACE = timedelta(seconds=10)
# While a stream is read, its answer's due time is pushed back at most this often (seconds).
ALIVE_EVERY = 60.0
# Waits between tries to record an accepted submission while the database is unavailable.
RECORD_RETRY_WAITS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 60.0, 60.0)


async def _to_the_end(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` on a worker thread, waited for to the end even if this job is cancelled
    meanwhile (:meth:`Submitter.stop` at a shutdown): the thread runs on regardless, and what
    it writes must be known, and done before the shutdown closes the database. The
    cancellation is raised again once it is."""
    return await _finish(asyncio.ensure_future(run_in_threadpool(call, *args)))


async def _finish(job: asyncio.Future[T]) -> T:
    """:func:`_to_the_end` of a call already started as ``job``, whose outcome its caller
    can still read after a cancellation: waited for to the end however many times this job
    is cancelled meanwhile (two stop() calls, the second while the first's cut-off waits)."""
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([job])
        raise


def _came_true(job: asyncio.Future[bool]) -> bool:
    """Whether ``job`` finished and returned True."""
    return job.done() and not job.cancelled() and job.exception() is None and job.result()


class _Job(NamedTuple):
    task_id: str
    attempts_made: int


class Submitter:
    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, ProviderAdapter],
        signer: CallbackSigner,
        files: ImageFiles,
        *,
        public_url: str,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        sweep_seconds: float = SWEEP_SECONDS,
        send_slots: Mapping[str, int] | None = None,
    ) -> None:
        """``send_slots``: per provider, how many requests may be out at once (each holds a
        connection of that provider's pool until it is answered: OpenAI's for the whole
        generation); the others wait their turn here, before an attempt is counted, rather
        than for a connection, where the wait is short and fails the attempt. None: no cap."""
        self.metrics = metrics or Metrics()
        self.store = store
        self.adapters = adapters
        self.signer = signer
        self.files = files
        self.public_url = public_url
        self.backoff = backoff or submit_backoff(1.0, 4)
        self.sleep = sleep
        self._running: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()  # task ids this process is sending
        # Jobs waiting out a backoff whose retry is written in the task row: when (loop time)
        # it ends, and whether the shutdown may still send it (a provider that calls back).
        # Nothing is lost when stop() cuts one off (any replica's sweep, or the next
        # start-up, sends it).
        self._backing_off: dict[asyncio.Task[None], tuple[float, bool]] = {}
        self._stop_by: float | None = None  # loop time: stop() cuts off what is left then
        self._rng = random.Random()
        self.sweep_seconds = sweep_seconds
        self._sweeper: Ticker | None = None
        self._slots = {name: asyncio.Semaphore(count) for name, count in (send_slots or {}).items()}

    def submit(self, task_id: str, *, attempts_made: int = 0) -> None:
        """Start sending ``task_id`` to its provider (attempt ``attempts_made + 1``: a retry
        when some were made); returns at once."""
        job = asyncio.create_task(self._submit(task_id, attempts_made), name=f"submit:{task_id}")
        self._running.add(job)
        self._active.add(task_id)
        job.add_done_callback(self._running.discard)
        job.add_done_callback(lambda _job: self._active.discard(task_id))

    async def resume(self, *, created_before: datetime | None = None) -> int:
        """Send the tasks whose request never left, and the retries that are due: at start-up
        (a crash or restart between the commit and the send, or during a retry's backoff),
        and then every ``SWEEP_SECONDS`` for tasks at least ``SWEEP_GRACE`` old, or retries
        that much overdue (another replica accepted them, or planned the retry, and died).
        Sending is a compare-and-set on the attempt count, so however many replicas find a
        task, one sends it."""
        found = await run_in_threadpool(
            self.store.unsent_submissions, created_before=created_before
        )
        due = await run_in_threadpool(
            self.store.due_submit_retries, created_before or self.store.clock()
        )
        jobs = [_Job(task_id, 0) for task_id in found]
        jobs += [_Job(task_id, made) for task_id, made in due]
        jobs = [job for job in jobs if job.task_id not in self._active]
        for job in jobs:
            self.submit(job.task_id, attempts_made=job.attempts_made)
        unsent = sum(1 for job in jobs if not job.attempts_made)
        if unsent:
            log.info("resuming %d unsent submissions", unsent)
        if len(jobs) > unsent:
            log.info("sending %d overdue submission retries", len(jobs) - unsent)
        return len(jobs)

    def start(self) -> None:
        """Look for orphaned unsent submissions every ``SWEEP_SECONDS``."""
        self._sweeper = Ticker("submission sweep", self._sweep, self.sweep_seconds)
        self._sweeper.start()

    async def _sweep(self) -> int:
        await self.resume(created_before=self.store.clock() - SWEEP_GRACE)
        return 0  # what it found is being sent; the next look is a tick away

    async def idle(self) -> None:
        """Wait until every submission in flight has finished (tests, shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def begin_stop(self, *, grace: float) -> None:
        """The shutdown has begun, with ``grace`` seconds left for what is in flight (the app
        calls this when the signal comes, while uvicorn drains its requests; a later call
        can only bring the end closer). From now on the sweep is off and no new attempt to a
        provider that does not call back (OpenAI, GrsAI polled or streamed) starts: cut off
        before its answer, it would fail the task, perhaps made and billed at the provider
        (:meth:`_cut_off`). A retry written in the task row whose backoff ends after the
        grace, or to such a provider, is cut off at once instead of holding the shutdown (and
        one planned from now on like that returns instead of waiting): the sweep or the next
        start-up sends it. What is in flight goes on; :meth:`stop` waits for it."""
        stop_by = asyncio.get_running_loop().time() + grace
        self._stop_by = stop_by if self._stop_by is None else min(self._stop_by, stop_by)
        left = [
            job
            for job, (ends, sendable) in self._backing_off.items()
            if ends > self._stop_by or not sendable
        ]
        if left:
            log.info(
                "stopping: %d submission retries are left to the next process (planned in the "
                "database)",
                len(left),
            )
            for job in left:
                del self._backing_off[job]  # told once, if this is called again meanwhile
                job.cancel()
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            await sweeper.stop()

    async def stop(self, *, grace: float) -> None:
        """:meth:`begin_stop`, then let the submissions in flight finish (up to ``grace``
        seconds: the app passes what is left of the shutdown budget), then cut off what is
        left."""
        await self.begin_stop(grace=grace)
        if not self._running:
            return
        _done, pending = await asyncio.wait(list(self._running), timeout=grace)
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _submit(self, task_id: str, attempts_made: int) -> None:
        observe.bind(task_id=task_id)  # this submission's own context (a task of its own)
        try:
            await self._attempts(task_id, attempts_made)
        except StoreUnavailable:
            # A warning: the sweep (or the next start) sends it once the database answers,
            # and an outage logs no error line (README, "When the database fails").
            log.warning(
                "submission of %s stopped: the database is unavailable (the submission sweep "
                "and the scheduler take it up once it answers)",
                task_id,
            )
        except Exception:
            log.exception("submission of %s failed unexpectedly", task_id)

    async def _attempts(self, task_id: str, attempts_made: int) -> None:
        task = await run_in_threadpool(self.store.find_task, task_id)
        if task is None or task["status"] != TaskStatus.queued.value:
            return
        provider = task["provider"]
        observe.bind(provider=provider)
        adapter = self.adapters[provider]
        request = GenerationRequest.from_json(task["request"])
        callback_url = self.signer.callback_url(self.public_url, task_id, provider)

        streamed: list[TaskUpdate] = []  # the progress a stream reported (GrsAI)
        loop = asyncio.get_running_loop()
        alive_noted = loop.time()  # when the answer's due time was last set or pushed back

        async def on_update(update: TaskUpdate) -> None:
            nonlocal alive_noted
            streamed.append(update)
            try:
                await run_in_threadpool(
                    self.store.apply_update, task_id, update, UpdateSource.stream
                )
            except TaskRelayError as exc:
                # Progress is news, not the result: the stream is read on, and its final
                # line is recorded like any reply (with retries).
                log.warning(
                    "could not record a progress update of %s (%s); reading on", task_id, exc.code
                )
            if loop.time() - alive_noted >= ALIVE_EVERY:
                # Still reading it, whatever became of the line: its answer is not lost. The
                # due time is pushed ALIVE_EVERY further, as the next push may be that late.
                alive_noted = loop.time()
                try:
                    await run_in_threadpool(
                        self.store.extend_answer_due, task_id, attempt, ALIVE_EVERY
                    )
                except TaskRelayError as exc:
                    log.warning("could not note that %s's stream is alive (%s)", task_id, exc.code)

        if attempts_made >= self.backoff.max_attempts:
            # A retry planned by a process allowed more attempts (TASKRELAY_SUBMIT_ATTEMPTS
            # was lowered since): this one's limit applies.
            await self._give_up(task_id, provider, attempts_made)
            return
        attempt = attempts_made
        in_database = True  # the task's next attempt is in its row (unsent, or retry planned)
        ambiguous = 0  # attempts with no answer after the request may have arrived
        while True:
            if self._past_deadline(task, 0.0):
                # Found after its deadline (a start-up or sweep after an outage longer than
                # the deadline, or a backoff that outlasted it): sent now, the provider would
                # make and bill an image the scheduler expires at once, and in a polled mode
                # never fetches.
                await self._fail_unsent(task_id, provider, attempt)
                return
            attempt += 1
            async with self._slots.get(provider) or contextlib.nullcontext():
                if self._past_deadline(task, 0.0):  # it may have passed while a slot was awaited
                    await self._fail_unsent(task_id, provider, attempt - 1)
                    return
                if self._stop_by is not None and in_database and not adapter.delivers_callbacks():
                    # Shutting down: an attempt started now may be cut off before its answer,
                    # and with no callback to come, fail the task though the provider made it
                    # (_cut_off). The task is unsent, or its retry planned, in the database:
                    # the next process (or another replica's sweep) sends it.
                    log.info("not sending %s now: shutting down; left to the next process", task_id)
                    return
                alive_noted = loop.time()
                marking = asyncio.ensure_future(
                    run_in_threadpool(self.store.mark_submit_attempt, task_id, attempt)
                )
                try:
                    marked = await _finish(marking)
                except asyncio.CancelledError:
                    # Cut off by a shutdown while the attempt was being counted: nothing was
                    # sent. Counted, it would keep the task from every sweep; take it back.
                    # Only if this job counted it: a count refused is another sender's
                    # attempt (an Idempotency-Key replay, another replica's sweep), perhaps
                    # out already, and taken back it would be sent again by the next process.
                    if _came_true(marking):
                        await _to_the_end(self.store.unmark_submit_attempt, task_id, attempt)
                    raise
                if not marked:
                    # Another process is sending it, or a callback or poll settled it meanwhile.
                    return
                if self._stop_by is not None and in_database and not adapter.delivers_callbacks():
                    # The shutdown began while the attempt was being counted: as above.
                    await _to_the_end(self.store.unmark_submit_attempt, task_id, attempt)
                    return
                try:
                    result = await adapter.submit(
                        request, callback_url=callback_url, on_update=on_update
                    )
                except ProviderError as caught:
                    failure: ProviderError | None = caught
                except asyncio.CancelledError:
                    await self._cut_off(task_id, adapter, attempt, streamed)
                    raise
                else:
                    failure = None
            if failure is None:
                break
            exc = failure  # its slot given back: a backoff below holds none
            ambiguous += exc.ambiguous
            if exc.ambiguous and adapter.delivers_callbacks():
                # The provider may have accepted it: sending it again could start a second,
                # paid task. Its callback carries this task's token and will still land.
                self._count(provider, "unconfirmed")
                log.warning(
                    "submission of %s to %s got no usable answer (%s); not resending, "
                    "waiting for the provider's callback",
                    task_id,
                    provider,
                    exc.code,
                )
                return
            if answered_2xx(exc) or streamed:
                # The provider took the task (it answered 2xx, or streamed its progress):
                # sending it again could make, and bill, it twice.
                named = next(
                    (u.provider_task_id for u in reversed(streamed) if u.provider_task_id),
                    None,
                )
                await self._end_taken(task_id, adapter, exc, named)
                return
            delay = (
                self.backoff.delay(attempt, retry_after=exc.retry_after, rng=self._rng)
                if exc.retryable
                else None
            )
            if delay is not None and self._past_deadline(task, delay):
                # The retry would come after the task's deadline and find it expired (with a
                # message blaming the provider's silence). Say why now.
                wait = (
                    f"{provider} asked to wait {delay:.0f} s"
                    if exc.retry_after is not None
                    else f"The next attempt would be in {delay:.0f} s"
                )
                exc.message = (
                    f"{exc.message.rstrip('.')}. {wait}, past the task's deadline "
                    f"(TASKRELAY_{provider.upper()}_DEADLINE), so it is not sent again; "
                    "submit a new task later."
                )
                delay = None
            if delay is None:
                # Guarded as any give-up: a task that expired (or settled) meanwhile keeps
                # its state; only the provider's own final word moves an expired task.
                message = exc.message
                if ambiguous:
                    made_here = attempt - attempts_made
                    message = (
                        f"{message.rstrip('.')}. {ambiguous} of the {made_here} attempts this "
                        f"process made got no answer after the request may have reached "
                        f"{provider} (a timeout, a dropped connection, or a gateway that gave "
                        f"up waiting), so {provider} may have made (and billed) that many "
                        "images; they could not be recovered, since only the answer carries "
                        "them."
                    )
                error = {"code": exc.code, "message": message}
                if await run_in_threadpool(self.store.give_up_submission, task_id, attempt, error):
                    self._count(provider, "failed")
                    log.warning(
                        "submission of %s to %s failed for good after %d attempt(s): %s",
                        task_id,
                        provider,
                        attempt,
                        exc.code,
                    )
                else:
                    log.info(
                        "submission of %s to %s failed for good (%s), but the task had moved "
                        "on meanwhile (settled, expired or sent again): left as it is",
                        task_id,
                        provider,
                        exc.code,
                    )
                return
            self._count(provider, "retrying")
            log.info(
                "submission of %s to %s failed (%s); retrying in %.1fs",
                task_id,
                provider,
                exc.code,
                delay,
            )
            planned = await self._plan_retry(task_id, attempt, delay)
            if planned is None:
                return
            in_database = planned
            if not planned:
                await self.sleep(delay)
            elif not await self._back_off(delay, adapter.delivers_callbacks()):
                return  # planned in the database, due after this process has stopped
        # Taken and answered: from here on, nothing sends it again.
        try:
            update = await self._keep_images(task_id, provider, result)
        except TaskRelayError as exc:  # image data it cannot use, or cannot store
            await self._end_taken(task_id, adapter, exc, None)
            return
        self._count(provider, "accepted")
        await self._record_reply(task_id, update)

    async def _back_off(self, delay: float, sendable: bool) -> bool:
        """Wait out the backoff of a retry written in the task row (stop() may cut it off);
        False, without waiting, when a shutdown under way would not send it (``sendable``:
        to a provider that calls back, and ending within the grace): the next process does."""
        ends = asyncio.get_running_loop().time() + delay
        if self._stop_by is not None and (ends > self._stop_by or not sendable):
            return False
        job = asyncio.current_task()
        assert job is not None
        self._backing_off[job] = (ends, sendable)
        try:
            await self.sleep(delay)
        finally:
            self._backing_off.pop(job, None)  # begin_stop() may have taken it off
        return True

    def _past_deadline(self, task: dict[str, Any], delay: float) -> bool:
        """Whether a retry ``delay`` seconds from now comes at or after the task's deadline
        (its row's, which the scheduler expires it by, whatever the deadline setting is now)."""
        deadline: datetime = task["deadline_at"]
        return self.store.clock() + timedelta(seconds=delay) >= deadline

    async def _plan_retry(self, task_id: str, attempt: int, delay: float) -> bool | None:
        """Write the retry into the task row before waiting for it, so that it outlives this
        process: True. None: the task was settled meanwhile (a callback), nothing to retry.
        False: the database is unavailable; the retry still happens here, only without that
        insurance (and stop() gives it the grace of a submission in flight)."""
        due = self.store.clock() + timedelta(seconds=delay)
        try:
            # Waited for even when a shutdown cuts this job off: the write hands the retry to
            # the next process, and the database must not be closed under it.
            planned = await _to_the_end(self.store.plan_submit_retry, task_id, attempt, due)
        except StoreUnavailable:
            log.warning(
                "could not record the planned retry of %s (database unavailable); "
                "retrying from this process only",
                task_id,
            )
            return False
        return True if planned else None

    async def _give_up(self, task_id: str, provider: str, attempts_made: int) -> None:
        limit = self.backoff.max_attempts
        exhausted = {
            "code": "submit_attempts_exhausted",
            "message": f"The submission failed {attempts_made} times with errors worth "
            f"retrying; TASKRELAY_SUBMIT_ATTEMPTS is {limit}, so it is not sent again.",
        }
        if await run_in_threadpool(
            self.store.give_up_submission, task_id, attempts_made, exhausted
        ):
            self._count(provider, "failed")
            log.warning(
                "submission of %s to %s failed for good: %d attempts were made before, and "
                "TASKRELAY_SUBMIT_ATTEMPTS is %d",
                task_id,
                provider,
                attempts_made,
                limit,
            )

    async def _fail_unsent(self, task_id: str, provider: str, attempts_made: int) -> None:
        """Fail a task whose deadline passed before its next attempt could be sent, without
        sending it (unless it moved on meanwhile: the same guard as any attempt)."""
        sent = "sent again" if attempts_made else "sent"
        late = unsent_past_deadline(provider, again=bool(attempts_made))
        if await run_in_threadpool(self.store.give_up_submission, task_id, attempts_made, late):
            self._count(provider, "failed")
            log.warning(
                "submission of %s to %s failed without being %s: its deadline passed first "
                "(%d attempts were made before)",
                task_id,
                provider,
                sent,
                attempts_made,
            )

    async def _cut_off(
        self, task_id: str, adapter: ProviderAdapter, attempt: int, streamed: list[TaskUpdate]
    ) -> None:
        """This process is stopping, and :meth:`stop` cut off attempt ``attempt`` while it
        waited for the provider's answer: the provider may have the task (and bill it), so it
        is not sent again. Say so, and leave the task in a state that still leads somewhere: a
        provider that calls back will; one named in a stream can be asked; any other (OpenAI,
        GrsAI polled or streamed) can never tell TaskRelay about it, so the task fails now
        instead of waiting for its deadline. One try to record it: the shutdown is under way."""
        provider = adapter.name
        named = next((u.provider_task_id for u in reversed(streamed) if u.provider_task_id), None)
        if adapter.delivers_callbacks() or (named is not None and adapter.can_query_status):
            self._count(provider, "unconfirmed")
            log.warning(
                "submission of %s to %s cut off by the shutdown while it waited for the "
                "answer; not resending (the provider may have it): %s",
                task_id,
                provider,
                "its callback is awaited"
                if adapter.delivers_callbacks()
                else f"its status is asked for under the provider's task id {named}",
            )
            if not adapter.delivers_callbacks():
                update = TaskUpdate(provider_task_id=named)
                await self._record_once(
                    task_id, self.store.apply_update, update, UpdateSource.submit
                )
            return
        error = {
            "code": "submission_interrupted",
            "message": f"TaskRelay was shutting down and stopped waiting for {provider}'s "
            "answer to the submission: the answer is lost, and it cannot be asked for again. "
            f"{provider} may have made (and billed) the image; the task is not sent again. "
            "Submit a new task.",
        }
        # Guarded as any give-up: a task that expired (or settled) meanwhile keeps its state.
        if await self._record_once(task_id, self.store.give_up_submission, attempt, error):
            self._count(provider, "failed")
            log.warning(
                "submission of %s to %s cut off by the shutdown while it waited for the "
                "answer; failed the task (%s sends no callback, and its answer is lost)",
                task_id,
                provider,
                provider,
            )

    async def _record_once(self, task_id: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(task_id, *args)`` once, to the end, for a shutdown's record; None if the
        database refused it (logged)."""
        try:
            return await _to_the_end(call, task_id, *args)
        except TaskRelayError as exc:
            log.error("could not record the cut-off submission of %s: %s", task_id, exc.code)
            return None

    def _count(self, provider: str, outcome: str) -> None:
        self.metrics.inc("submissions_total", provider=provider, outcome=outcome)

    async def _record_reply(self, task_id: str, update: TaskUpdate) -> None:
        """The provider accepted the task: its answer (task id, OpenAI's images) must not be
        lost to a brief database outage, so keep trying for a few minutes."""
        waits = iter((*RECORD_RETRY_WAITS, None))
        while True:
            try:
                await run_in_threadpool(
                    self.store.apply_update, task_id, update, UpdateSource.submit
                )
                return
            except StoreUnavailable:
                wait = next(waits)
                if wait is None:
                    raise
                log.warning("could not record the submit reply of %s yet; retrying", task_id)
                await self.sleep(wait)
            except Conflict as exc:
                named = update.provider_task_id
                if exc.code != "provider_task_id_taken" or named is None:
                    raise
                # Another task of the client holds the id (tracked before the provider gave
                # it out): the provider's callbacks and status answers reach that task.
                if update.status in TERMINAL_STATUSES:
                    # The answer is the result itself (a stream's last line): kept, without
                    # the id.
                    log.warning(
                        "submission of %s: the provider answered with task id %s, which "
                        "another task of the same client already holds; keeping the result "
                        "without the id",
                        task_id,
                        named,
                    )
                    update = replace(update, provider_task_id=None)
                    continue
                # Nothing could ever finish this one: failed now, rather than at its deadline.
                log.warning(
                    "submission of %s: the provider answered with task id %s, which another "
                    "task of the same client already holds; failing the task",
                    task_id,
                    named,
                )
                error = {
                    "code": "provider_task_id_taken",
                    "message": f"The provider answered the submission with task id {named!r}, "
                    "which another of this client's tasks already holds, so this task cannot "
                    "take it (the provider's updates reach that task). The provider may have "
                    "made, and billed, the image; the task is not sent again.",
                }
                update = TaskUpdate(status=TaskStatus.failed, error=error)

    async def _end_taken(
        self,
        task_id: str,
        adapter: ProviderAdapter,
        exc: TaskRelayError,
        provider_task_id: str | None,
    ) -> None:
        """The provider took the task (it answered 2xx, or streamed its progress), and what
        came back cannot be used: ``exc`` says why. It is not sent again. A task the provider
        named (a stream line's id) is left to the status queries, which can still finish it;
        any other ends ``failed`` now, rather than wait for its deadline with nothing left
        that could settle it."""
        provider = adapter.name
        if provider_task_id is not None and adapter.can_query_status:
            log.warning(
                "submission of %s to %s: its answer broke off (%s); not resending, its status "
                "is asked for under the provider's task id %s",
                task_id,
                provider,
                exc.code,
                provider_task_id,
            )
            await self._record_reply(task_id, TaskUpdate(provider_task_id=provider_task_id))
            return
        self._count(provider, "failed")
        message = exc.message
        if isinstance(exc, ProviderError):
            if exc.ambiguous:
                said = f"HTTP {exc.upstream_status}" if exc.upstream_status else "with success"
                message = message if message.endswith(".") else f"{message}."
                message += (
                    f" {provider} had answered {said}, so it may have made (and billed) the "
                    "image: the task is not sent again, which could make and bill it twice. "
                    "Submit a new task to try again."
                )
            log.warning(
                "submission of %s to %s: the provider took the task but its answer cannot be "
                "used (%s: %s); failing the task without resending it",
                task_id,
                provider,
                exc.code,
                exc.message,
            )
        else:
            log.error(
                "submission of %s to %s: the provider's answer could not be kept (%s: %s); "
                "failing the task without resending it",
                task_id,
                provider,
                exc.code,
                exc.__cause__ or exc.message,
            )
        error = {"code": exc.code, "message": message}
        failed = TaskUpdate(status=TaskStatus.failed, error=error)
        await self._record_reply(task_id, failed)

    async def _keep_images(self, task_id: str, provider: str, result: SubmitResult) -> TaskUpdate:
        """Replace inline base64 images with files TaskRelay serves itself; raises
        TaskRelayError for image data that is not base64 or cannot be written."""
        update = result.update
        if not any("b64_json" in image for image in update.images):
            return update
        images = []
        try:
            for index, image in enumerate(update.images):
                if "b64_json" in image:
                    url = await run_in_threadpool(
                        self.files.save_b64, task_id, index, image["b64_json"], provider=provider
                    )
                    kept = {key: value for key, value in image.items() if key != "b64_json"}
                    images.append({**kept, "url": url})
                else:
                    images.append(dict(image))
        except TaskRelayError:
            # The task fails: the images saved before this one go too, or they would be
            # served for a task that says it has none.
            await run_in_threadpool(self.files.remove, [task_id])
            raise
        return replace(update, images=tuple(images))
