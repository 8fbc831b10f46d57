"""``GET /v1/tasks/{id}/stream``: a task's events as Server-Sent Events, as they happen.

It starts with the task's current state (``event: task.state``), then sends each new event
(``id:`` the event id, ``event:`` its type, ``data:`` the same envelope webhooks carry), and
ends after the terminal event. A client that reconnects with ``Last-Event-ID`` resumes after
that event. A comment line (``: keep-alive``) goes out after ``KEEPALIVE_SECONDS`` of silence.
A database outage does not end a stream: it keeps its keep-alives going and reads again every
``STORE_RETRY_SECONDS`` until the database answers; the outage is logged once when the first
read fails and once when one works again, whatever the number of open streams.

What wakes a stream
-------------------
A waiting stream costs no query: it sleeps on a :class:`Listener` registered under its task,
and only news about that task wakes it.

* Events committed in this process: after each commit that appended events, the store calls
  :meth:`EventSignal.notify` with the ids of the tasks that got them (from a worker thread);
  one ``call_soon_threadsafe`` per commit hands them to the event loop, which wakes the
  listeners of those tasks and no other.
* Events committed by other processes (replicas sharing one PostgreSQL): one
  :class:`EventWatcher` per process, running only while a stream is open, asks the database
  every ``WATCH_SECONDS`` which tasks got events it has not seen yet (one query, whatever the
  number of streams) and wakes the listeners of those tasks that are behind.

A woken stream reads its task's events after the last one it sent (``store.events_after``).
A wake is only a hint of when to read: a spurious one costs one read, a late one delays an
event, none can lose one, because per task ``task_event.seq`` order is commit order (the store
appends a task's events while holding the task's row lock, and ``task.submitted`` commits with
the task row itself), so reading ``seq > last sent`` never skips an event of that task.

Why the watcher cannot miss other processes' events
---------------------------------------------------
``seq`` is global, but on PostgreSQL it is not commit-ordered across tasks: a transaction that
took seq 41 can commit after one that took seq 42. A watcher that only remembered the largest
seq it saw would then skip 41 for good. So the watcher (:class:`SeqHorizon`) remembers the
largest seq seen *and the holes below it*; every pass asks for ``seq > largest`` or any seq in
a hole, so a late commit fills its hole on the next pass and wakes its task. A hole left by a
rolled-back transaction never fills; holes are forgotten after ``GAP_SECONDS`` (and beyond
``MAX_GAPS``). An event whose transaction held its seq longer than that would be missed by
the pass, so every ``SWEEP_SECONDS`` the watcher also compares each open stream's last seq with
its task's newest event (one query per ``SWEEP_BATCH`` open tasks) and wakes the streams that
are behind. The worst case for any event is therefore a delay of ``SWEEP_SECONDS``, never a
loss. On SQLite (one writer at a time) seq is commit-ordered and holes do not occur.

Start-up order closes the last window: a stream registers its listener, then waits for the
watcher to be primed (its horizon read from the newest ``PRIME_WINDOW`` events, holes
included), and only then reads its snapshot. Anything committed after the snapshot is then
either above the horizon, in a hole, or (a transaction older than ``PRIME_WINDOW`` events)
found by the sweep.

Shutdown
--------
An open stream never ends by itself before its task's final event, so on SIGTERM it would hold
the process for the whole graceful timeout and then be cut off. Instead, when shutdown begins
(:meth:`EventSignal.drain`, called at the signal, before the server waits for connections),
every open stream finishes what it is sending, writes a last comment (``: shutdown``) and ends
cleanly; a stream opened from then on ends after its first frame. Every event frame carries
its ``id:``, so the client (an EventSource reconnects by itself, after ``retry:``) resumes on
another replica with ``Last-Event-ID`` and misses nothing.

Caps
----
A client may hold ``TASKRELAY_MAX_STREAMS_PER_CLIENT`` open streams per process (429 with
Retry-After beyond), and a process serves ``TASKRELAY_MAX_STREAMS`` at most (503 with
Retry-After). The slot is the listener: it is released when the stream ends, when the client
goes away, and when opening the stream fails.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.errors import StoreUnavailable, StreamCapacityReached, TooManyStreams
from service.loops import Failures
from service.models import TERMINAL_STATUSES, Task, TaskEvent, TaskStatus
from service.outbox import envelope
from service.runtime import runtime_of
from service.store import Store

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # silence before a keep-alive comment (proxies drop idle streams)
WATCH_SECONDS = 1.0  # how soon another process's event reaches a stream here
SWEEP_SECONDS = 30.0  # the latest any event reaches a stream (see "cannot miss" above)
GAP_SECONDS = 30.0  # how long a hole in seq is asked for again before it is taken as a rollback
MAX_GAPS = 256  # holes remembered at once (each is one range in the watcher's query)
PRIME_WINDOW = 1000  # newest events read to find the holes when the watcher starts
WATCH_BATCH = 5000  # rows per watcher query; a larger backlog is read in several passes
SWEEP_BATCH = 500  # task ids per sweep query (bound parameters)
RETRY_AFTER_SECONDS = 5.0  # suggested wait when a stream cap is reached
STORE_RETRY_SECONDS = 2.0  # an open stream's next read after the database failed one
SHUTDOWN_FRAME = b": shutdown: reconnect with Last-Event-ID\n\n"  # the last words of a stream
FINAL_TYPES = {f"task.{status.value}" for status in TERMINAL_STATUSES}

TASK = Task.__table__  # type: ignore[attr-defined]
EVENT = TaskEvent.__table__  # type: ignore[attr-defined]


# --- which seqs the watcher has seen (pure) ------------------------------------------------------


@dataclass
class Gap:
    """Seqs ``low..high`` (inclusive) not seen yet although a larger one was, since ``noticed``
    (monotonic seconds): in flight in some transaction, or rolled back."""

    low: int
    high: int
    noticed: float


def _holes(seen: Sequence[int], low: int, high: int, now: float) -> list[Gap]:
    """The ranges in ``low..high`` missing from ``seen`` (sorted, unique)."""
    gaps = []
    expected = low
    for seq in seen:
        if seq < low:
            continue
        if seq > high:
            break
        if seq > expected:
            gaps.append(Gap(expected, seq - 1, now))
        expected = seq + 1
    if expected <= high:
        gaps.append(Gap(expected, high, now))
    return gaps


class SeqHorizon:
    """What the watcher has seen of ``task_event.seq``: every seq up to ``high`` except those
    in ``gaps``. No I/O: the watcher feeds it what each query returned."""

    def __init__(self, high: int = 0, gaps: Iterable[Gap] = ()) -> None:
        self.high = high
        self.gaps = list(gaps)

    @classmethod
    def from_newest(cls, seqs: Iterable[int], now: float, *, complete: bool) -> SeqHorizon:
        """Primed from the newest seqs in the table; ``complete`` when that was all of them
        (the holes then reach down to seq 1, else down to the oldest seq read)."""
        seen = sorted(set(seqs))
        if not seen:
            return cls()
        low = 1 if complete else seen[0]
        return cls(seen[-1], _holes(seen, low, seen[-1], now))

    def ranges(self) -> list[tuple[int, int]]:
        """The holes to ask for again, besides ``seq > high``."""
        return [(gap.low, gap.high) for gap in self.gaps]

    def observe(self, seqs: Iterable[int], now: float) -> set[int]:
        """Take the seqs one query returned; answers those not seen before."""
        seen = sorted(set(seqs))
        split = bisect.bisect_right(seen, self.high)
        inside, above = seen[:split], seen[split:]
        fresh: set[int] = set()
        if inside:
            gaps = []
            for gap in self.gaps:
                start = bisect.bisect_left(inside, gap.low)
                end = bisect.bisect_right(inside, gap.high)
                if start == end:
                    gaps.append(gap)
                    continue
                filled = inside[start:end]
                fresh.update(filled)
                gaps.extend(_holes(filled, gap.low, gap.high, gap.noticed))
            self.gaps = gaps
        if above:
            self.gaps.extend(_holes(above, self.high + 1, above[-1], now))
            fresh.update(above)
            self.high = above[-1]
        return fresh

    def expire(self, before: float, max_gaps: int = MAX_GAPS) -> int:
        """Forget holes noticed before ``before``, and the oldest beyond ``max_gaps``; answers
        how many seqs were given up (the sweep still finds their events, later)."""
        kept = [gap for gap in self.gaps if gap.noticed >= before]
        kept = kept[-max_gaps:] if max_gaps > 0 else []
        dropped = sum(gap.high - gap.low + 1 for gap in self.gaps) - sum(
            gap.high - gap.low + 1 for gap in kept
        )
        self.gaps = kept
        return dropped


# --- open streams and what wakes them ------------------------------------------------------------


class Listener:
    """One open stream's place in the signal: its client and task, the seq of the last event
    it sent, and the flag that wakes it. It is also the stream's slot under the caps."""

    def __init__(self, owner: str, task_id: str) -> None:
        self.owner = owner
        self.task_id = task_id
        self.last_seq = 0
        self.closed = False
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def wait(self, seconds: float) -> bool:
        """True when woken (there may be news about the task), False after ``seconds``."""
        if not self._woken.is_set():
            try:
                await asyncio.wait_for(self._woken.wait(), timeout=max(seconds, 0.0))
            except TimeoutError:
                return False
        self._woken.clear()
        return True


class EventSignal:
    """The process's open streams, by task and by client, and what wakes them: commits in this
    process through :meth:`notify`, commits elsewhere through the :class:`EventWatcher`."""

    def __init__(self, *, max_streams: int = 1000, max_streams_per_client: int = 100) -> None:
        self.max_streams = max_streams
        self.max_streams_per_client = max_streams_per_client
        self.watcher: EventWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_task: dict[str, set[Listener]] = {}
        self._per_client: dict[str, int] = {}
        self._open = 0
        self.draining = False
        self._drained = asyncio.Event()
        # Open streams' reads of their events: a database outage is logged once when the
        # first read fails and once when one works again, whatever the number of streams.
        self.read_failures = Failures("event stream read")

    def bind(self, loop: asyncio.AbstractEventLoop, store: Store | None = None) -> None:
        """Wake streams on ``loop``; with ``store``, also watch it for other processes' events."""
        self._loop = loop
        if store is not None:
            self.watcher = EventWatcher(store, self)

    @property
    def open_count(self) -> int:
        return self._open

    def open_for(self, owner: str) -> int:
        return self._per_client.get(owner, 0)

    # --- from any thread --------------------------------------------------------------------

    def notify(self, task_ids: frozenset[str] = frozenset()) -> None:
        """Events were committed for ``task_ids``: wake their streams (one loop call)."""
        loop = self._loop
        if not task_ids or loop is None or loop.is_closed():
            return
        # The loop may close between the check and the call (shutdown): nothing left to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.wake, task_ids)

    # --- on the event loop ------------------------------------------------------------------

    def wake(self, task_ids: Iterable[str]) -> int:
        """Wake every stream of ``task_ids``; answers how many."""
        woken = 0
        for task_id in task_ids:
            for listener in self._by_task.get(task_id, ()):
                listener.wake()
                woken += 1
        return woken

    def wake_behind(self, newest: Mapping[str, int]) -> int:
        """Wake the streams that have not sent their task's event ``newest[task_id]`` yet."""
        woken = 0
        for task_id, seq in newest.items():
            for listener in self._by_task.get(task_id, ()):
                if listener.last_seq < seq:
                    listener.wake()
                    woken += 1
        return woken

    def watched(self) -> list[str]:
        """The tasks with at least one open stream."""
        return list(self._by_task)

    def open(self, owner: str, task_id: str) -> Listener:
        """Take a stream slot for ``owner`` and listen for ``task_id``'s events; raises
        :class:`TooManyStreams` (429) or :class:`StreamCapacityReached` (503) over a cap."""
        held = self._per_client.get(owner, 0)
        if held >= self.max_streams_per_client:
            raise TooManyStreams(
                f"This client already has {held} event streams open, the most it may hold at "
                "once (TASKRELAY_MAX_STREAMS_PER_CLIENT): close one, or retry when one ends.",
                retry_after=RETRY_AFTER_SECONDS,
                details={"limit": self.max_streams_per_client, "open": held},
            )
        if self._open >= self.max_streams:
            raise StreamCapacityReached(
                "This TaskRelay process serves as many event streams as it may "
                "(TASKRELAY_MAX_STREAMS); retry shortly.",
                retry_after=RETRY_AFTER_SECONDS,
                details={"limit": self.max_streams},
            )
        listener = Listener(owner, task_id)
        self._by_task.setdefault(task_id, set()).add(listener)
        self._per_client[owner] = held + 1
        self._open += 1
        return listener

    def close(self, listener: Listener) -> None:
        """Give the slot back (idempotent: the stream and its response both call it)."""
        if listener.closed:
            return
        listener.closed = True
        listeners = self._by_task.get(listener.task_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._by_task[listener.task_id]
        held = self._per_client.get(listener.owner, 0) - 1
        if held > 0:
            self._per_client[listener.owner] = held
        else:
            self._per_client.pop(listener.owner, None)
        self._open -= 1

    def drain(self) -> int:
        """Shutdown has begun: every open stream ends after what it is sending now, with a
        last comment, so that its client reconnects (to another replica) with Last-Event-ID;
        streams opened from now on end after their first frame. Answers how many were open.
        Idempotent; on the event loop."""
        self.draining = True
        self._drained.set()
        woken = 0
        for listeners in self._by_task.values():
            for listener in listeners:
                listener.wake()
                woken += 1
        return woken

    async def drained(self) -> None:
        """Returns once :meth:`drain` has been called."""
        await self._drained.wait()

    async def ready(self) -> None:
        """Returns once the watcher (if any) is primed: events committed from now on, by any
        process, wake their streams."""
        if self.watcher is not None:
            await self.watcher.ready()

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()


# --- other processes' events ---------------------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A priming error is raised to the streams that waited for it (a read's error to its
    # stream); with none left, this keeps asyncio from logging "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class EventWatcher:
    """One per process, running while at least one stream is open: each ``interval`` one query
    finds the tasks that got events this process has not seen (whoever committed them) and
    wakes their streams; every ``sweep_interval`` a second query checks each open stream
    against its task's newest event (see the module's "cannot miss" section)."""

    def __init__(
        self,
        store: Store,
        signal: EventSignal,
        *,
        interval: float = WATCH_SECONDS,
        sweep_interval: float = SWEEP_SECONDS,
        gap_seconds: float = GAP_SECONDS,
    ) -> None:
        self.store = store
        self.signal = signal
        self.interval = interval
        self.sweep_interval = sweep_interval
        self.gap_seconds = gap_seconds
        self.passes = 0  # queries for new events, since start (tests, diagnostics)
        self.sweeps = 0
        self.horizon: SeqHorizon | None = None
        self._task: asyncio.Task[None] | None = None
        self._primed: asyncio.Future[None] | None = None
        self._stopping = asyncio.Event()
        self._failures = Failures("stream watcher pass")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def ready(self) -> None:
        """Start the watcher if it is not running, and wait until it is primed."""
        if not self.running:
            loop = asyncio.get_running_loop()
            self._primed = loop.create_future()
            self._primed.add_done_callback(_retrieve)
            self._task = loop.create_task(self._run(self._primed), name="stream-watcher")
        assert self._primed is not None
        # Shielded: a stream that goes away while waiting must not cancel the priming.
        await asyncio.shield(self._primed)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self, primed: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.horizon = await run_in_threadpool(self._prime, loop.time())
        except asyncio.CancelledError:
            primed.cancel()
            raise
        except Exception as exc:
            primed.set_exception(exc)
            return
        primed.set_result(None)
        next_sweep = loop.time() + self.sweep_interval
        more = False
        while True:
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
            # Checked with no await before returning, so a stream opening now finds the task
            # done and starts (and primes) a new one.
            if self._stopping.is_set() or not self.signal.open_count:
                return
            more = False
            try:
                more = await self._pass(self.horizon)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.sweep_interval
                    await self._sweep()
            except Exception as exc:  # an outage: logged when it starts and ends
                self._failures.failed(exc)
            else:
                self._failures.succeeded()

    def _prime(self, now: float) -> SeqHorizon:
        statement = sa.select(EVENT.c.seq).order_by(EVENT.c.seq.desc()).limit(PRIME_WINDOW)
        with self.store.transaction(write=False) as session:
            seqs = [int(seq) for seq in session.execute(statement).scalars()]
        return SeqHorizon.from_newest(seqs, now, complete=len(seqs) < PRIME_WINDOW)

    def _unseen(self, high: int, ranges: list[tuple[int, int]]) -> list[tuple[int, str]]:
        """(seq, task id) of every event above ``high`` or in one of the holes ``ranges``."""
        seq = EVENT.c.seq
        lowest = min([high + 1, *(low for low, _ in ranges)])
        # The lower bound keeps the scan to the recent end of the key, whatever plan is chosen.
        wanted = sa.and_(
            seq >= lowest, sa.or_(seq > high, *(seq.between(low, top) for low, top in ranges))
        )
        statement = (
            sa.select(seq, TASK.c.id)
            .join_from(EVENT, TASK, TASK.c.pk == EVENT.c.task_pk)
            .where(wanted)
            .order_by(seq)
            .limit(WATCH_BATCH)
        )
        with self.store.transaction(write=False) as session:
            return [(int(row[0]), str(row[1])) for row in session.execute(statement)]

    def _newest(self, task_ids: list[str]) -> dict[str, int]:
        """Each task's newest event seq."""
        statement = (
            sa.select(TASK.c.id, sa.func.max(EVENT.c.seq))
            .join_from(TASK, EVENT, EVENT.c.task_pk == TASK.c.pk)
            .where(TASK.c.id.in_(task_ids))
            .group_by(TASK.c.id)
        )
        with self.store.transaction(write=False) as session:
            return {str(row[0]): int(row[1]) for row in session.execute(statement)}

    async def _pass(self, horizon: SeqHorizon) -> bool:
        """One look for unseen events; True when the batch was full (look again at once)."""
        now = asyncio.get_running_loop().time()
        rows = await run_in_threadpool(self._unseen, horizon.high, horizon.ranges())
        self.passes += 1
        fresh = horizon.observe((seq for seq, _ in rows), now)
        newest: dict[str, int] = {}
        for seq, task_id in rows:
            if seq in fresh and seq > newest.get(task_id, 0):
                newest[task_id] = seq
        self.signal.wake_behind(newest)
        given_up = horizon.expire(now - self.gap_seconds)
        if given_up:
            log.debug(
                "stream watcher gave up %d seqs (rolled back, or left to the sweep)", given_up
            )
        return len(rows) >= WATCH_BATCH

    async def _sweep(self) -> None:
        task_ids = self.signal.watched()
        for start in range(0, len(task_ids), SWEEP_BATCH):
            newest = await run_in_threadpool(self._newest, task_ids[start : start + SWEEP_BATCH])
            self.signal.wake_behind(newest)
        self.sweeps += 1


# --- the endpoint --------------------------------------------------------------------------------


def _frame(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """A streaming response that gives its stream slot back however the response ends: the
    last event, a client gone away, an error, or a body that never started."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_STREAM_HEADERS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def stream_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    task_id = request.path_params["task_id"]
    signal = runtime.event_signal
    store = runtime.store
    listener = signal.open(owner, task_id)
    try:
        # Listening, and the watcher primed, before the snapshot: whatever commits after it
        # wakes this stream.
        await signal.ready()
        # The task and its events from one snapshot, so no event falls between them.
        task, events = await run_in_threadpool(store.task_with_events, owner, task_id)
    except BaseException:
        signal.close(listener)
        raise
    resume_from = request.headers.get("last-event-id")
    if resume_from:
        listener.last_seq = next((e.seq or 0 for e in events if e.id == resume_from), 0)
        caught_up = all((e.seq or 0) <= listener.last_seq for e in events)
        if caught_up and TaskStatus(task["status"]) in TERMINAL_STATUSES:
            # Resumed after the final event: nothing more will ever come. 204 is what tells
            # an EventSource to stop reconnecting; a stream that ends has it back in 2 s,
            # for ever.
            signal.close(listener)
            return Response(status_code=204)
    elif events:
        listener.last_seq = events[-1].seq or 0
    if request.method == "HEAD":
        # Starlette answers HEAD on every GET route. A HEAD's answer has no body, so its
        # client is done at the headers: a stream behind it would hold the slot, and the
        # connection, until the task ended. The answer a GET would get (its caps, 404 and
        # 204 included), without the stream; the slot given back at once.
        signal.close(listener)
        head = Response(media_type="text/event-stream", headers=_STREAM_HEADERS)
        del head.headers["content-length"]  # a stream's length is not known
        return head

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            if resume_from:
                backlog = [e for e in events if (e.seq or 0) > listener.last_seq]
            else:
                state = {"type": "task.state", "timestamp": task["updated_at"], "data": task}
                yield _frame("task.state", state, events[-1].id if events else None)
                if TaskStatus(task["status"]) in TERMINAL_STATUSES:
                    return
                backlog = []
            clock = asyncio.get_running_loop().time
            last_write = clock()
            retry_at: float | None = None  # while reads fail: when this stream reads again
            while True:
                for event in backlog:
                    listener.last_seq = event.seq or listener.last_seq
                    yield _frame(event.type, envelope(event), event.id)
                    last_write = clock()
                    if event.type in FINAL_TYPES:
                        return
                backlog = []
                if signal.draining:
                    # The process is stopping: end cleanly now rather than be cut off at the
                    # graceful timeout. What was sent carries its ids: the client resumes
                    # after the last one, wherever it reconnects.
                    yield SHUTDOWN_FRAME
                    return
                keepalive_at = last_write + KEEPALIVE_SECONDS
                wake_at = keepalive_at if retry_at is None else min(keepalive_at, retry_at)
                woken = await listener.wait(wake_at - clock())
                if signal.draining:
                    continue  # woken to end, not by news: no read
                if not woken and (retry_at is None or clock() < retry_at):
                    yield b": keep-alive\n\n"
                    last_write = clock()
                    continue
                # Read in a task, so that keep-alives keep their schedule however long the
                # read takes (a database that does not answer: up to the pool's timeout).
                read = asyncio.ensure_future(
                    run_in_threadpool(store.events_after, owner, task_id, listener.last_seq)
                )
                read.add_done_callback(_retrieve)
                # A shutdown ends the stream mid-read too: a read the database does not
                # answer (up to the pool's timeout) would hold the drain and be cut off.
                drained = asyncio.ensure_future(signal.drained())
                try:
                    while not read.done() and not drained.done():
                        await asyncio.wait(
                            {read, drained},
                            timeout=last_write + KEEPALIVE_SECONDS - clock(),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if not read.done() and not drained.done():
                            yield b": keep-alive\n\n"
                            last_write = clock()
                finally:
                    read.cancel()  # the client went away, or the shutdown (no-op once done)
                    drained.cancel()
                if not read.done() or read.cancelled():
                    continue  # the shutdown came first: ended above, after what was sent
                try:
                    backlog = read.result()
                except StoreUnavailable as exc:
                    # Kept open (with its keep-alives) and read again shortly: ended here, an
                    # EventSource would reconnect into a 503, and a 503 makes it give up for
                    # good. Logged once per outage for all streams, not once per read.
                    signal.read_failures.failed(exc)
                    retry_at = clock() + STORE_RETRY_SECONDS
                else:
                    signal.read_failures.succeeded()
                    retry_at = None
        finally:
            signal.close(listener)

    return EventStreamResponse(frames(), release=lambda: signal.close(listener))


routes = [Route("/v1/tasks/{task_id}/stream", stream_task, methods=["GET"])]
