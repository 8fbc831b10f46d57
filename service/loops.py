"""The loop every background worker runs: do a pass; go again at once if it found work,
otherwise sleep until woken or the tick interval passes; stop when asked. Each pass handles
and logs its own errors, so one bad pass never ends the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.errors import StoreUnavailable

log = logging.getLogger(__name__)


class Ticker:
    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[int]],
        tick_seconds: float,
        *,
        retry_seconds: float | None = None,
    ) -> None:
        self.name = name
        self.step = step
        self.tick_seconds = tick_seconds
        # After a failed pass: the next one comes this soon (a rare pass, such as retention's
        # every 10 minutes, should not wait its whole interval after a brief outage).
        self.retry_seconds = tick_seconds if retry_seconds is None else retry_seconds
        self.failures = Failures(f"{name} pass")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    def wake(self) -> None:
        """Run a pass now. Safe from any thread (store commits happen in worker threads)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            wait = self.tick_seconds
            try:
                found = await self.step()
            except Exception as exc:
                self.failures.failed(exc)
                found, wait = 0, min(wait, self.retry_seconds)
            else:
                self.failures.succeeded()
            if found:
                continue  # more may be due: go again at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()


class Failures:
    """The log of one kind of background pass's failures ("scheduler claim"). An unavailable
    database (retried, pass after pass, several a second) is logged once when such passes
    start failing, with the database's reason, and once when one works again; anything else
    (a bug) is logged with its traceback every time."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.skipped = 0  # passes skipped since the database became unavailable

    def failed(self, exc: BaseException) -> None:
        if not isinstance(exc, StoreUnavailable):
            log.error("%s failed", self.what, exc_info=exc)
            return
        self.skipped += 1
        if self.skipped == 1:
            reason = f" ({exc.reason})" if exc.reason else ""
            log.warning(
                "%s skipped: the database is unavailable%s; retried until it answers",
                self.what,
                reason,
            )

    def succeeded(self) -> None:
        if self.skipped:
            log.warning("%s works again, after %d skipped", self.what, self.skipped)
            self.skipped = 0
