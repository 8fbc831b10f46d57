"""Delivers events to subscribers: signed (Standard Webhooks), retried, in order per task.

Each pass records the attempts that finished since the last one and claims due deliveries, in
one transaction (leases in the database, so several processes never send the same delivery at
once, and a crashed process's claims are retried by the others with the same ``webhook-id``),
then sends them concurrently with a cap per subscriber.
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
from datetime import datetime

from starlette.concurrency import run_in_threadpool

from service import observe
from service.errors import NotFound, StoreUnavailable
from service.loops import Ticker
from service.metrics import Metrics
from service.models import utcnow
from service.outbox import AttemptResult, DeliveryJob, Outbox, Recorded
from service.signing import webhook_headers
from service.webclient import DeliveryFailed, WebhookClient

log = logging.getLogger(__name__)

# The whole attempt, however the subscriber trickles its answer (the client's own timeouts,
# service.webclient.DELIVERY_TIMEOUTS, bound each step: connect 5 s, each read or write 10 s).
ATTEMPT_DEADLINE_SECONDS = 30.0
USER_AGENT = "TaskRelay-Webhooks/1"

# An attempt waiting to be recorded, and its sender's future for the delivery's status.
_ToRecord = tuple[DeliveryJob, AttemptResult, asyncio.Future[Recorded]]


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        http: WebhookClient,
        *,
        metrics: Metrics,
        concurrency: int = 64,
        per_subscription: int = 16,
        lease_seconds: float = 60.0,
        tick_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        worker_id: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.outbox = outbox
        # When an attempt starts (its log's attempted_at): the outbox's clock, whose times
        # the records compare with.
        self.clock = clock if clock is not None else getattr(outbox, "clock", utcnow)
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
        # Attempts waiting to be recorded, and the task recording them when no pass will
        # (see _record); _ticking: the loop runs, so a pass follows every wake.
        self._to_record: list[_ToRecord] = []
        self._recorder: asyncio.Task[None] | None = None
        self._ticking = False
        self._renewer: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._ticking = True
        self._ticker.start()
        self._renewer = asyncio.create_task(self._renew_leases(), name="dispatcher-leases")

    async def stop(self, *, grace: float) -> None:
        """Stop claiming; let in-flight deliveries finish (up to ``grace``), then release
        every lease still held so another process sends them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # No pass may follow now: attempts are recorded on their own, those waiting too.
        self._ticking = False
        self._start_recorder()
        # The loop's last pass may still be claiming: it and the deliveries share the grace.
        ticker = asyncio.create_task(self._ticker.stop())
        await asyncio.wait({ticker}, timeout=grace)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=max(0.0, deadline - loop.time()))
        # Past the grace: cut off what is still sending (the last pass, if it was claiming,
        # may start a last delivery, cut off in turn).
        while self._in_flight or not ticker.done():
            for job in list(self._in_flight):
                job.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            await asyncio.wait({ticker}, timeout=0.05)
        await ticker
        if self._renewer is not None:  # nothing is being sent any more
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._recorder is not None:  # attempts already made are recorded, not re-sent
            await asyncio.gather(self._recorder, return_exceptions=True)
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
        """Record the attempts waiting, claim what free slots allow and start sending; with
        ``wait``, wait for them. Records even without a free slot: the deliveries in flight
        may be waiting for theirs."""
        batch, self._to_record = self._to_record, []
        # The batch's deliveries have been answered: they leave _in_flight once recorded.
        # (Still in _sending, so not claimed again here.)
        free = self.concurrency - len(self._in_flight) + len(batch)
        if not batch and free <= 0:
            return 0  # a delivery answering wakes the loop
        try:
            outcomes, jobs = await run_in_threadpool(
                self.outbox.record_and_claim,
                [(job, result) for job, result, _ in batch],
                self.worker_id,
                limit=free,
                lease_seconds=self.lease_seconds,
                exclude=frozenset(self._sending),
                per_subscription=self.per_subscription,
                busy=dict(self._busy),
            )
        except Exception:
            # The records shared the failed claim's transaction: try them on their own, so
            # that attempts the subscribers answered are not sent again. If that fails too,
            # those deliveries stay leased and go again once their lease expires.
            if batch:
                await self._record_alone(batch)
            raise
        self._tell_senders(batch, outcomes)
        started: list[asyncio.Task[None]] = []
        for job in jobs:
            self._busy[job.subscription_pk] = self._busy.get(job.subscription_pk, 0) + 1
            task = asyncio.create_task(self._deliver(job), name=f"deliver:{job.delivery_id}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            started.append(task)
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
        # This delivery's own log context (it runs as an asyncio task of its own).
        observe.bind(task_id=job.task_id, provider=job.provider)
        holding = True
        try:
            result = await self.send(job)
            # The subscriber's slot is free once it has answered: its next delivery may go
            # while this attempt is being recorded. (Until then this one stays pending and
            # leased, and in _sending, so neither it nor its task's next event is claimed.)
            self._free_slot(job)
            holding = False
            if result.sent:
                self._count(result)
            else:  # put back by the record, without an attempt counted against the subscriber
                log.warning("delivery %s put back, not sent: %s", job.delivery_id, result.error)
            # NotFound: the subscription was deleted while we were sending.
            with contextlib.suppress(NotFound):
                recorded = await self._record(job, result)
                dead_lettered = recorded.dead_lettered + recorded.others_dead_lettered
                if dead_lettered:
                    self.metrics.inc("deliveries_dead_lettered_total", dead_lettered)
        except StoreUnavailable:
            log.warning("delivery %s not recorded: the database is unavailable", job.delivery_id)
        except Exception:
            log.exception("delivery %s failed unexpectedly", job.delivery_id)
        finally:
            # No wake once recorded: the pass that recorded it claimed what that made due.
            self._sending.discard(job.delivery_pk)
            if holding:
                self._free_slot(job)

    def _free_slot(self, job: DeliveryJob) -> None:
        """The subscriber answered (or the delivery ended): its next delivery may go, and the
        pass this wakes records the attempt (see _record)."""
        self._busy[job.subscription_pk] -= 1
        if not self._busy[job.subscription_pk]:
            del self._busy[job.subscription_pk]
        self.notify()

    async def _record(self, job: DeliveryJob, result: AttemptResult) -> Recorded:
        """Record an attempt together with the others that finished meanwhile: one
        transaction per batch (a write per delivery would queue for the database behind
        callback ingestion). While the loop runs, that is the next pass's claim, which
        _free_slot has just woken (woken during a pass, the loop runs one more right after);
        otherwise (stopping, or tests driving passes) a recorder task's own transaction.
        Returns the delivery's state afterwards."""
        recorded: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._to_record.append((job, result, recorded))
        if not self._ticking:
            self._start_recorder()
        return await recorded

    def _start_recorder(self) -> None:
        if self._to_record and (self._recorder is None or self._recorder.done()):
            self._recorder = asyncio.create_task(self._record_batches())

    async def _record_batches(self) -> None:
        while self._to_record:
            batch, self._to_record = self._to_record, []
            await self._record_alone(batch)

    async def _record_alone(self, batch: list[_ToRecord]) -> None:
        """Record ``batch`` in a transaction of its own and tell its senders the outcome. If
        the database refuses it, each attempt is recorded in a transaction of its own: an
        attempt it cannot take fails alone, not every other one of the batch with it (sent
        again each time its lease expires). An unavailable database fails them all at once."""
        outcomes = await self._record_together(batch)
        if not isinstance(outcomes, Exception) or len(batch) == 1:
            self._tell_senders(batch, outcomes)
            return
        for index, item in enumerate(batch):
            if isinstance(outcomes, StoreUnavailable):  # each would wait for it in turn
                self._tell_senders(batch[index:], outcomes)
                return
            outcomes = await self._record_together([item])
            self._tell_senders([item], outcomes)  # its sender logs a failure

    async def _record_together(
        self, batch: list[_ToRecord]
    ) -> list[Recorded | NotFound] | Exception:
        """``batch``'s records in one transaction: each delivery's outcome, or the error that
        failed them all."""
        try:
            return await run_in_threadpool(
                self.outbox.record_attempts,
                [(job, result) for job, result, _ in batch],
                self.worker_id,
            )
        except Exception as exc:
            return exc

    @staticmethod
    def _tell_senders(
        batch: list[_ToRecord], outcomes: list[Recorded | NotFound] | Exception
    ) -> None:
        """Tell each sender of ``batch`` its delivery's status, NotFound, or the error that
        failed the whole transaction (the database is unavailable: each sender logs it)."""
        for index, (_, _, recorded) in enumerate(batch):
            outcome = outcomes if isinstance(outcomes, Exception) else outcomes[index]
            if recorded.done():  # its sender was cancelled
                continue
            if isinstance(outcome, Exception):
                recorded.set_exception(outcome)
            else:
                recorded.set_result(outcome)

    def _count(self, result: AttemptResult) -> None:
        if result.succeeded:
            outcome = "succeeded"
        else:
            outcome = "unreachable" if result.status_code is None else "failed"
        self.metrics.inc("deliveries_total", outcome=outcome)
        self.metrics.observe("delivery_attempt_duration_seconds", result.duration_ms / 1000)

    async def _renew_leases(self) -> None:
        """Every third of a lease, renew the leases of every delivery still being sent, in one
        statement, so no other process (and no later pass of this one) sends the same delivery
        while a subscriber takes its time."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self._sending:
                continue
            try:
                await run_in_threadpool(
                    self.outbox.extend_leases,
                    sorted(self._sending),
                    self.worker_id,
                    self.lease_seconds,
                )
            except StoreUnavailable:
                log.warning("could not renew delivery leases: the database is unavailable")
            except Exception:
                log.exception("renewing delivery leases failed unexpectedly")

    async def send(self, job: DeliveryJob) -> AttemptResult:
        """One POST of the signed event; never raises for the subscriber's failures."""
        timestamp = int(time.time())
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", USER_AGENT),
            *webhook_headers(job.signing_secrets, job.event_id, timestamp, job.body).items(),
        ]
        started_at = self.clock()
        started = self.monotonic()
        try:
            async with asyncio.timeout(ATTEMPT_DEADLINE_SECONDS):
                reply = await self.http.post(job.url, job.body, headers)
        except TimeoutError:
            elapsed = (self.monotonic() - started) * 1000
            late = f"ReadTimeout: no complete answer within {ATTEMPT_DEADLINE_SECONDS:g} s"
            return AttemptResult(None, elapsed, error=late, started_at=started_at)
        except DeliveryFailed as exc:
            return AttemptResult(
                None,
                (self.monotonic() - started) * 1000,
                error=str(exc)[:500],
                sent=not exc.unsent,
                started_at=started_at,
            )
        elapsed = (self.monotonic() - started) * 1000
        error = None if reply.is_success else f"HTTP {reply.status_code}"
        body = reply.body.decode("utf-8", errors="replace")
        return AttemptResult(
            reply.status_code, elapsed, response_body=body, error=error, started_at=started_at
        )
