"""Benchmark: retention switched on for a store full of history, and what callbacks meanwhile
wait for.

A store is built as ``bench/store_scale.py`` builds it (``--tasks``, default 200,000, a tenth
in flight; final tasks finished over the last 30 days, each with its events, callback receipts
and deliveries; a ``notify_url`` subscription on 3 % of the tasks), then ``--retention`` (15
days by default: about half the final tasks are past it) is applied by the service's own sweep
(``service.retention.Pruner``: batches of ``PRUNE_BATCH``, each followed by a pause as long as
it took, until a batch comes back short). A thread sends progress callbacks, one after
another, for random running tasks (``Store.apply_update``, each with its receipt): first
alone (the baseline), then while the sweep runs. Reported: the tasks and rows deleted per
second, the sweep's transactions (p50, p99, longest), and the callbacks' latency during the
sweep against the baseline measured in the same run. Checked afterwards: no task past the
retention is left, every other task and row is still there.

Run from the repository root: ``.venv/bin/python bench/retention.py`` (SQLite; with
``--database-url`` or ``$TASKRELAY_TEST_DATABASE_URL``, PostgreSQL too). About 2 minutes at
the default size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.claim_backlog import Callbacks, spread, transactions_of
from bench.ingest import percentile
from bench.store_scale import TABLES, Population, fresh_database, load_store, psycopg_url
from service.db import make_engine
from service.files import ImageFiles
from service.metrics import Metrics
from service.models import UTCDateTime, utcnow
from service.retention import Pruner
from service.store import Store

PG_ENV = "TASKRELAY_TEST_DATABASE_URL"
BASELINE_SECONDS = 3.0
DAY = 86400.0


def counts(engine: sa.Engine, before: Any) -> dict[str, tuple[int, int]]:
    """Per table: rows of tasks that finished before ``before``, and all the others."""
    old = "(SELECT pk FROM task WHERE completed_at < :before)"
    by_task = {
        "task": f"SELECT count(*) FROM task WHERE pk IN {old}",
        "task_event": f"SELECT count(*) FROM task_event WHERE task_pk IN {old}",
        "callback_receipt": f"SELECT count(*) FROM callback_receipt WHERE task_pk IN {old}",
        "subscription": f"SELECT count(*) FROM subscription WHERE task_pk IN {old}",
        "delivery": f"SELECT count(*) FROM delivery WHERE task_pk IN {old}",
        "delivery_attempt": (
            "SELECT count(*) FROM delivery_attempt a JOIN delivery d ON d.pk = a.delivery_pk "
            f"WHERE d.task_pk IN {old}"
        ),
    }
    result = {}
    with engine.connect() as connection:
        for table in TABLES:
            total = int(connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
            if table in by_task:
                query = sa.text(by_task[table]).bindparams(
                    sa.bindparam("before", type_=UTCDateTime())
                )
                past = int(connection.execute(query, {"before": before}).scalar_one())
            else:
                past = 0
            result[table] = (past, total - past)
    return result


def running_tasks(engine: sa.Engine, limit: int = 5000) -> list[str]:
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            f"SELECT id FROM task WHERE status = 'running' ORDER BY pk DESC LIMIT {limit}"
        )
        return [task_id for (task_id,) in rows]


async def sweep(store: Store, cut_off: datetime, folder: Path) -> int:
    """One sweep of the service's pruner, to the end of the backlog: tasks deleted."""
    metrics = Metrics()
    retention = (utcnow() - cut_off).total_seconds()
    pruner = Pruner(
        store,
        ImageFiles(folder / "files", "http://bench"),
        retention,
        metrics=metrics,
        clock=lambda: cut_off + timedelta(seconds=retention),  # the cut-off stays put
    )
    while await pruner.prune_once():
        pass
    return int(metrics.counter("tasks_pruned_total"))


def run_case(url: str, tasks: int, retention_days: float, folder: str) -> dict[str, Any]:
    now = utcnow()
    load_store(url, Population(tasks, tasks // 10, 0.20, 0.05), now, lambda line: print(line))
    store = Store(make_engine(url))
    try:
        cut_off = utcnow() - timedelta(days=retention_days)
        before = counts(store.engine, cut_off)
        with Callbacks(store, running_tasks(store.engine)) as callbacks:
            baseline_start = time.perf_counter()
            time.sleep(BASELINE_SECONDS)
            sweep_start = time.perf_counter()
            # The pruner's worker threads: every thread but the callbacks'.
            pruner_threads = lambda: threading.current_thread().name != "callbacks"  # noqa: E731
            with transactions_of(store.engine, pruner_threads) as durations:
                pruned = asyncio.run(sweep(store, cut_off, Path(folder)))
            sweep_end = time.perf_counter()
            time.sleep(0.2)
        after = counts(store.engine, cut_off)
        assert all(past == 0 for past, _ in after.values()), after  # nothing past it is left
        kept = {table: rest for table, (_, rest) in before.items()}
        # Every other row is still there; the callbacks added receipts meanwhile.
        for table, (_, rest) in after.items():
            grown = table == "callback_receipt"
            assert rest >= kept[table] if grown else rest == kept[table], (table, rest)
        assert pruned == before["task"][0], (pruned, before["task"])
        return {
            "tasks": tasks,
            "pruned": pruned,
            "rows": sum(past for past, _ in before.values()),
            "seconds": sweep_end - sweep_start,
            "transactions": durations,
            "baseline": [
                seconds * 1000
                for at, seconds in callbacks.timed
                if at >= baseline_start and at + seconds <= sweep_start
            ],
            "during": callbacks.latencies(sweep_start, sweep_end),
        }
    finally:
        store.engine.dispose()


def report(database: str, result: dict[str, Any], retention_days: float) -> None:
    seconds, durations = result["seconds"], result["transactions"]
    during, base = result["during"], result["baseline"]
    print(
        f"\n{database}: {result['tasks']:,} tasks, retention {retention_days:g} days: "
        f"{result['pruned']:,} tasks and {result['rows']:,} rows in all deleted"
    )
    print(
        "| sweep | tasks/s | rows/s | transactions: n, p50 / p99 / longest | callbacks during "
        "the sweep: n, p50 / p99 / max | baseline: n, p50 / p99 / max | p99 / baseline p99 |"
    )
    print("|---:|---:|---:|---|---|---|---:|")
    print(
        f"| {seconds:.1f} s | {result['pruned'] / seconds:,.0f} | {result['rows'] / seconds:,.0f} "
        f"| {len(durations)}, {spread(durations, 1)} | {len(during)}, {spread(during)} "
        f"| {len(base)}, {spread(base)} "
        f"| {percentile(during, 0.99) / percentile(base, 0.99):.1f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database-url", default=os.environ.get(PG_ENV))
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--retention", type=float, default=15.0, help="days")
    args = parser.parse_args()
    if args.tasks < 1000 or not 0 < args.retention < 30:
        parser.error("--tasks at least 1000; --retention between 0 and 30 days (the history)")
    import service.store

    print(f"service from {Path(service.store.__file__).parent}")
    kinds = [] if args.no_sqlite else ["sqlite"]
    if args.database_url:
        kinds.append("postgresql")
    with tempfile.TemporaryDirectory() as directory:
        for kind in kinds:
            admin = psycopg_url(args.database_url) if kind == "postgresql" else None
            with fresh_database(kind, Path(directory), admin, "retention") as url:
                result = run_case(url, args.tasks, args.retention, directory)
            report("SQLite" if kind == "sqlite" else "PostgreSQL", result, args.retention)


if __name__ == "__main__":
    main()
