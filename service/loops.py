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
                report_failure(f"{self.name} pass", exc)
                found, wait = 0, min(wait, self.retry_seconds)
            if found:
                continue  # more may be due: go again at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()


def report_failure(what: str, exc: BaseException) -> None:
    """Log a background pass's failure: one line, with the database's reason, for an
    unavailable database (it is retried); the traceback for anything else (a bug)."""
    if isinstance(exc, StoreUnavailable):
        reason = f" ({exc.reason})" if exc.reason else ""
        log.warning("%s skipped: the database is unavailable%s", what, reason)
    else:
        log.error("%s failed", what, exc_info=exc)
