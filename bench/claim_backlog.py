"""Benchmark: the scheduler's claim after a stall, and what the callbacks meanwhile wait for.

A progress callback that plans a task's next look later than the one still ahead keeps it in
``planned_check_at`` (``Store.plan``); the scheduler, finding the task due at the earlier look,
moves it to the plan without a status query (``Store.claim_due``). After a stall (the process
down, the database away) every task whose earlier look passed meanwhile is due at once, so one
claim can find tens of thousands of them ahead of the tasks really due.

For each backlog size: a fresh store (a SQLite file; with ``--database-url``, a fresh
PostgreSQL database too) holding that many such tasks, due a minute ago and planned an hour
ahead, then 20 tasks really due behind them. A thread sends progress callbacks, one after
another, for random tasks of the backlog (``Store.apply_update``: SQLite's write turn, the
task's row lock on PostgreSQL; each with its receipt, and behind the task's progress, so
that the backlog stays as it is); first alone for two seconds (the baseline), then while one
``claim_due`` with the scheduler's limit (20) runs. Reported: the claim's wall time, its
write transactions and the longest of them, and the latency of the callbacks in flight
during the claim against the baseline measured in the same run.

Run from the repository root: ``.venv/bin/python bench/claim_backlog.py`` (``--help`` for
options). To measure other code, put its checkout first: ``PYTHONPATH=/path/to/checkout``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.ingest import fresh_postgres, percentile, psycopg_url
from bench.writer import tracked_tasks
from service.db import make_engine, migrate
from service.lifecycle import TaskUpdate
from service.models import Task, TaskStatus, UpdateSource, utcnow
from service.store import ReceiptDraft, Store

PG_ENV = "TASKRELAY_TEST_DATABASE_URL"
PREFIX = "taskrelay_bench_claim_"
CLAIM_LIMIT = 20  # the scheduler's limit for one provider and pass, as in bench/store_scale.py
REALLY_DUE = 20
BASELINE_SECONDS = 2.0


def fill(store: Store, backlog: int) -> list[str]:
    """``backlog`` EvoLink tasks due a minute ago with a look planned an hour ahead, then
    ``REALLY_DUE`` due a second ago: the backlog's ids."""
    (template,) = tracked_tasks(store, "alice", 1)
    table = Task.__table__  # type: ignore[attr-defined]
    now = utcnow()
    with store.engine.begin() as connection:
        row = dict(
            connection.execute(sa.select(table).where(table.c.id == template)).mappings().one()
        )
        connection.execute(table.delete().where(table.c.id == template))
        row.pop("pk")
        rows = []
        for i in range(backlog + REALLY_DUE):
            moved = i < backlog
            rows.append(
                row
                | {
                    "id": f"tsk_bench{i:09d}",
                    "provider_task_id": f"p{i}",
                    "next_check_at": now - timedelta(seconds=60 if moved else 1, microseconds=-i),
                    "planned_check_at": now + timedelta(hours=1) if moved else None,
                    "status": TaskStatus.running.value,
                    "progress": 50,
                }
            )
        for start in range(0, len(rows), 5000):
            connection.execute(table.insert(), rows[start : start + 5000])
    return [f"tsk_bench{i:09d}" for i in range(backlog)]


# Behind the stored progress (50): the task's row is locked and the receipt written, as for
# any callback, but the task and its plan stay as they are, so the backlog stays whole.
STALE = TaskUpdate(status=TaskStatus.running, progress=10)
RECEIPT = ReceiptDraft(
    "evolink", b'{"id":"task-1","status":"processing","progress":10}', "application/json"
)


class Callbacks:
    """Stale progress callbacks one after another from a thread of their own, each timed."""

    def __init__(self, store: Store, task_ids: list[str]) -> None:
        self.store = store
        self.task_ids = task_ids
        self.rng = random.Random(3)
        self.timed: list[tuple[float, float]] = []  # (started, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="callbacks")

    def _run(self) -> None:
        while not self._stop.is_set():
            task_id = self.rng.choice(self.task_ids)
            started = time.perf_counter()
            self.store.apply_update(task_id, STALE, UpdateSource.callback, receipt=RECEIPT)
            self.timed.append((started, time.perf_counter() - started))

    def __enter__(self) -> Callbacks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def latencies(self, start: float, end: float) -> list[float]:
        """Milliseconds of the callbacks in flight at some time in [start, end)."""
        return [seconds * 1000 for at, seconds in self.timed if at < end and at + seconds > start]


@contextlib.contextmanager
def transactions_of(engine: sa.Engine, counted: Callable[[], bool]) -> Iterator[list[float]]:
    """The durations (ms) of the transactions committed or rolled back meanwhile by threads
    for which ``counted()`` is true when they begin."""
    began: dict[int, float] = {}
    durations: list[float] = []

    def begin(connection: Any) -> None:
        if counted():
            began[id(connection)] = time.perf_counter()

    def end(connection: Any) -> None:
        started = began.pop(id(connection), None)
        if started is not None:
            durations.append((time.perf_counter() - started) * 1000)

    listeners = [("begin", begin), ("commit", end), ("rollback", end)]
    for name, listener in listeners:
        sa.event.listen(engine, name, listener)
    try:
        yield durations
    finally:
        for name, listener in listeners:
            sa.event.remove(engine, name, listener)


def transactions_of_this_thread(
    engine: sa.Engine,
) -> contextlib.AbstractContextManager[list[float]]:
    """:func:`transactions_of` the calling thread."""
    me = threading.get_ident()
    return transactions_of(engine, lambda: threading.get_ident() == me)


def run_case(url: str, backlog: int) -> dict[str, Any]:
    store = Store(make_engine(url))
    try:
        task_ids = fill(store, backlog)
        with Callbacks(store, task_ids) as callbacks:
            baseline_start = time.perf_counter()
            time.sleep(BASELINE_SECONDS)
            claim_start = time.perf_counter()
            with transactions_of_this_thread(store.engine) as durations:
                claims = store.claim_due("evolink", "bench", limit=CLAIM_LIMIT, lease_seconds=60)
            claim_end = time.perf_counter()
            time.sleep(0.2)
        assert len(claims) == REALLY_DUE, len(claims)
        with store.engine.connect() as connection:
            left = connection.execute(
                sa.text(
                    "SELECT count(*) FROM task WHERE planned_check_at IS NOT NULL "
                    "AND next_check_at < :now"
                ),
                {"now": utcnow()},
            ).scalar_one()
        assert left == 0, f"{left} tasks not moved"  # every later plan was moved
        return {
            "backlog": backlog,
            "claim_ms": (claim_end - claim_start) * 1000,
            "transactions": len(durations),
            "longest_ms": max(durations),
            # The baseline ends with the last callback answered before the claim began.
            "baseline": [
                seconds * 1000
                for at, seconds in callbacks.timed
                if at >= baseline_start and at + seconds <= claim_start
            ],
            "during": callbacks.latencies(claim_start, claim_end),
        }
    finally:
        store.engine.dispose()


def spread(milliseconds: list[float], digits: int = 2) -> str:
    """``p50 / p99 / max ms`` of latencies in milliseconds."""
    return (
        f"{statistics.median(milliseconds):.{digits}f} / "
        f"{percentile(milliseconds, 0.99):.{digits}f} / {max(milliseconds):.1f} ms"
    )


def report(database: str, results: list[dict[str, Any]]) -> None:
    print(f"\n{database}: one claim_due (limit {CLAIM_LIMIT}) after a stall, callbacks meanwhile")
    print(
        "| backlog | claim | transactions | longest | callbacks during the claim: n, p50 / p99 / "
        "max | baseline p50 / p99 / max | p99 / baseline p99 |"
    )
    print("|---:|---:|---:|---:|---|---|---:|")
    for r in results:
        during, base = r["during"], r["baseline"]
        if during:
            seen = f"{len(during)}, {spread(during)}"
            ratio = f"{percentile(during, 0.99) / percentile(base, 0.99):.0f}x"
        else:
            seen, ratio = "none in flight", "n/a"
        print(
            f"| {r['backlog']:,} | {r['claim_ms']:.0f} ms | {r['transactions']} | "
            f"{r['longest_ms']:.1f} ms | {seen} | {spread(base)} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database-url", default=os.environ.get(PG_ENV))
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--backlog", type=int, nargs="+", default=[1000, 10_000, 50_000])
    args = parser.parse_args()
    import service.store

    print(f"service from {Path(service.store.__file__).parent}")
    if not args.no_sqlite:
        results = []
        for backlog in args.backlog:
            with tempfile.TemporaryDirectory() as directory:
                url = f"sqlite:///{directory}/bench.db"
                migrate(url)
                results.append(run_case(url, backlog))
        report("SQLite", results)
    if args.database_url:
        results = []
        for backlog in args.backlog:
            with fresh_postgres(psycopg_url(args.database_url), PREFIX) as url:
                results.append(run_case(url, backlog))
        report("PostgreSQL", results)


if __name__ == "__main__":
    main()
