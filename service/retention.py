"""Retention: final tasks are deleted ``TASKRELAY_RETENTION`` after they finished, with
everything kept for them (events, callback receipts, notify_url subscriptions, deliveries and
their attempts, the images TaskRelay stored), so the store stops growing with its history.

Off unless set. Every process sweeps (every ``SWEEP_SECONDS``, and once at start): each pass
deletes the tasks that finished longest ago in batches of ``PRUNE_BATCH``, one short write
transaction each, and goes on while a batch comes back full, after a pause as long as the
batch took: a large backlog (retention switched on for a store full of history) holds the
database at most half the time, and on SQLite the callbacks' writer gets its turn between
batches (the write turn is not fair: a thread taking it again at once can keep a waiting one
out for several batches). On PostgreSQL, replicas sweeping at once skip each other's rows. A
task's images are deleted after its rows are: a crash in between leaves the images behind,
never a task without its images. What is left behind so is found by the first sweep after a
start (and the first sweep after a folder could not be deleted): a task's folder whose task is
no longer in the store, and which was last changed before the retention's cut-off, is deleted
then (:meth:`Pruner.remove_orphans`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from starlette.concurrency import run_in_threadpool

from service.errors import StoreUnavailable
from service.files import ImageFiles, Removed
from service.loops import Ticker
from service.metrics import Metrics
from service.store import PRUNE_BATCH, Store

log = logging.getLogger(__name__)

SWEEP_SECONDS = 600.0
RETRY_SECONDS = 30.0  # after a sweep the database failed (an outage, a deadlock)
LOG_EVERY_SECONDS = 60.0
ORPHAN_CHECK_BATCH = 500  # task folders looked up per query


class Pruner:
    def __init__(
        self,
        store: Store,
        files: ImageFiles,
        retention_seconds: float,
        *,
        metrics: Metrics,
        clock: Callable[[], datetime],
        sweep_seconds: float = SWEEP_SECONDS,
        batch: int = PRUNE_BATCH,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.files = files
        self.retention = timedelta(seconds=retention_seconds)
        self.metrics = metrics
        # The series exists from the start, at 0: the first sweep runs at start-up, and a
        # counter that first appears with its deletions hides them from rate() and increase().
        metrics.inc("tasks_pruned_total", 0)
        metrics.inc("deliveries_pruned_pending_total", 0)
        self.clock = clock
        self.batch = batch
        self.pause = pause  # between full batches, for as long as the last one took
        self._ticker = Ticker(
            "retention",
            self.prune_once,
            sweep_seconds,
            retry_seconds=min(RETRY_SECONDS, sweep_seconds),
        )
        self._unlogged = 0  # tasks deleted since the last log line
        self._undelivered = 0  # and their deliveries that were still pending
        self._logged_at = time.monotonic()
        # Whether the image folders were checked since the start, or since a folder could not
        # be deleted; they are checked again at the start of a sweep, not before each batch.
        self._orphans_checked = False
        # Task folders whose removal failed: tried again whenever they were last changed (a
        # removal that failed part-way changed the folder just now, which the look for
        # folders left behind, by age, would pass over for a whole retention period).
        self._left: set[str] = set()
        self._sweep_starts = True  # the next call begins a sweep

    def start(self) -> None:
        self._ticker.start()

    async def stop(self) -> None:
        await self._ticker.stop()

    async def prune_once(self) -> int:
        """Delete one batch of tasks past their retention; returns how many when the batch
        was full (more may be waiting: the ticker goes again at once), 0 otherwise."""
        finished_before = self.clock() - self.retention
        if self._sweep_starts and not self._orphans_checked:
            self._orphans_checked = await run_in_threadpool(self._check_orphans, finished_before)
        started = time.perf_counter()
        pruned = await run_in_threadpool(self.store.prune, finished_before, self.batch)
        task_ids = pruned.task_ids
        took = time.perf_counter() - started
        if pruned.undelivered:
            self.metrics.inc("deliveries_pruned_pending_total", pruned.undelivered)
            self._undelivered += pruned.undelivered
        if task_ids:
            removed = await run_in_threadpool(self.files.remove, task_ids)
            if removed.failed:
                self._left.update(removed.left)
                self._orphans_checked = False  # try those folders again next sweep
            self.metrics.inc("tasks_pruned_total", len(task_ids))
            self._unlogged += len(task_ids)
        done = len(task_ids) < self.batch
        self._sweep_starts = done
        # One line per sweep that deleted anything, and one a minute while a long one goes on.
        if self._unlogged and (done or time.monotonic() - self._logged_at >= LOG_EVERY_SECONDS):
            # A warning when webhooks went with them: events their subscribers never got.
            log.log(
                logging.WARNING if self._undelivered else logging.INFO,
                "deleted %d tasks finished before %s (TASKRELAY_RETENTION)%s%s",
                self._unlogged,
                finished_before.isoformat(),
                f", with {self._undelivered} webhook deliveries still pending, never to be made"
                if self._undelivered
                else "",
                "" if done else "; more to delete",
            )
            self._unlogged, self._undelivered, self._logged_at = 0, 0, time.monotonic()
        if done:
            return 0
        await self.pause(took)
        return len(task_ids)

    def remove_orphans(self, finished_before: datetime) -> Removed:
        """Delete the image folders whose task is not in the store, left behind by a crash
        between a batch's commit and its folders' removal (or by a removal that failed).

        Only retention deletes tasks, and a task's row is written before its images, so a
        folder without its task is one retention meant to delete. Only folders named like a
        task id and last changed before ``finished_before`` (the retention's cut-off) are
        considered: OpenAI's tasks, the only ones with images here, finish as their images
        are written, so a folder changed since then belongs to a task retention keeps,
        whatever the store says. That also bounds the damage of a misconfiguration (the right
        files folder with the wrong, or a new, database) to what retention deletes anyway.
        Folders whose removal failed before are looked at again whatever their age."""
        deleted = failed = 0
        old = self.files.task_folders(finished_before.timestamp())
        folders = sorted(self._left.union(old))
        self._left.clear()
        for start in range(0, len(folders), ORPHAN_CHECK_BATCH):
            batch = folders[start : start + ORPHAN_CHECK_BATCH]
            existing = self.store.existing_task_ids(batch)
            removed = self.files.remove(task_id for task_id in batch if task_id not in existing)
            deleted, failed = deleted + removed.removed, failed + removed.failed
            self._left.update(removed.left)
        if deleted or failed:
            log.info(
                "deleted the image folders of %d tasks no longer stored (TASKRELAY_RETENTION)%s",
                deleted,
                f"; {failed} could not be deleted" if failed else "",
            )
        return Removed(deleted, failed)

    def _check_orphans(self, finished_before: datetime) -> bool:
        """:meth:`remove_orphans`, whose failure never stops the sweep: returns whether
        every folder it meant to delete is gone (else the next sweep looks again)."""
        try:
            return self.remove_orphans(finished_before).failed == 0
        except FileNotFoundError:
            return True  # no images stored yet
        except (OSError, StoreUnavailable) as exc:
            log.warning("could not look for image folders left behind: %s", exc)
            return False
