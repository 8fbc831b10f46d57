"""Group commit: one writer thread per process applies callbacks in batches.

A callback is only answered 2xx once its update is committed. Committing each one in its own
transaction makes every request pay for a transaction, a commit (an fsync on SQLite, a round
trip and a WAL flush on PostgreSQL) and, on SQLite, a turn at the single write lock, for which
worker threads queue and retry. Instead, request handlers hand their update to
:class:`GroupCommitter` and wait; its one thread takes everything queued so far (up to
``max_batch``), applies it in one transaction (``Store.apply_updates``), commits once, and then
answers every waiting request. Under load the batches grow by themselves: the more requests
arrive while one batch commits, the larger the next one, so the cost per callback falls as the
rate rises, while a lone callback is still written at once (nothing ever waits for a batch to
fill up).

Nothing is answered before its batch's commit; a request whose client has gone away is still
written (the provider will send it again, and the duplicate is a recorded no-op). The queue is
bounded: past ``max_queue`` waiting updates, new ones are refused with 503 so a slow database
shows as back-pressure rather than as growing memory and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import StoreUnavailable
from service.ingest import UpdateRequest
from service.store import ApplyResult, Store

log = logging.getLogger(__name__)


class Overloaded(StoreUnavailable):
    code = "overloaded"

    def __init__(self, waiting: int) -> None:
        super().__init__(
            f"TaskRelay has {waiting} updates waiting to be written and accepts no more for "
            "now; nothing was recorded. Retry shortly.",
        )
        self.retry_after = 1.0


@dataclass(frozen=True)
class _Pending:
    request: UpdateRequest
    future: asyncio.Future[ApplyResult]


class GroupCommitter:
    """Applies updates from the event loop in batches, on a thread of its own."""

    def __init__(self, store: Store, *, max_batch: int = 256, max_queue: int = 10_000) -> None:
        if max_batch < 1 or max_queue < max_batch:
            raise ValueError("need 1 <= max_batch <= max_queue")
        self.store = store
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Counters for tests, benchmarks and metrics: batches committed and updates in them.
        self.batches = 0
        self.updates = 0

    @property
    def waiting(self) -> int:
        """Updates queued and not yet taken by the writer (metrics)."""
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="taskrelay-group-commit")
        self._thread.daemon = True
        self._thread.start()

    async def stop(self) -> None:
        """Write everything already queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def apply(self, request: UpdateRequest) -> ApplyResult:
        """Apply ``request`` with whatever else is waiting; returns once it is committed."""
        if self._thread is None or self._loop is None:
            raise StoreUnavailable("TaskRelay is not accepting updates (starting or stopping).")
        future: asyncio.Future[ApplyResult] = self._loop.create_future()
        with self._ready:
            if self._stopping:
                raise StoreUnavailable("TaskRelay is shutting down; nothing was recorded.")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(len(self._queue))
            self._queue.append(_Pending(request, future))
            self._ready.notify()
        # If the client goes away, this await is cancelled but the write still happens: the
        # thread skips answering a future that is already done.
        return await future

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return
                count = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
            self._write(batch)

    def _write(self, batch: Sequence[_Pending]) -> None:
        results: Sequence[ApplyResult | BaseException]
        failed = False
        try:
            results = self.store.apply_updates([pending.request for pending in batch])
        except Exception as exc:  # a bug, not a database error: fail this batch, keep going
            log.exception("group commit failed")
            results = [exc] * len(batch)
            failed = True
        # A batch the database refused (an outage), or that failed on a bug, committed
        # nothing and counts for nothing; one whose items were refused one by one (an unknown
        # task, say) committed their receipts all the same.
        if not all(isinstance(result, StoreUnavailable) for result in results) and not failed:
            self.batches += 1
            self.updates += sum(not isinstance(result, BaseException) for result in results)
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(_settle, batch, results)


def _settle(batch: Sequence[_Pending], results: Sequence[ApplyResult | BaseException]) -> None:
    for pending, result in zip(batch, results, strict=True):
        if pending.future.done():
            continue
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)
