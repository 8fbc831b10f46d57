"""Benchmark: the group-commit writer alone, PostgreSQL's pipeline against its statements.

What ``Store.apply_updates`` costs per batch of callbacks, without HTTP or an event loop: on a
fresh PostgreSQL database (``--database-url`` or ``TASKRELAY_TEST_DATABASE_URL``; created,
migrated and dropped afterwards), the same kind of batches go through ``service/ingest.py``'s
two paths in turn: the statements one by one (``pipelined=False``, what SQLite runs) and
PostgreSQL's pipeline (the default there). Rounds alternate between the two, so a noisy
neighbour slows both alike; the table gives the median over rounds of each path's wall time
and writer-thread CPU time per batch, and the ratio pipeline / statements.

Each batch: ``--batch`` callbacks for random tasks among 2,000 tracked ones of one client
(random progress, so some are stale no-ops, as in real traffic), each with its receipt. Two
clients: one without subscriptions (as in ``bench/ingest.py``: the pipeline's two round trips),
one with an endpoint subscription, so that events owe deliveries (three round trips).

A second table (``--part in-place``): progress callbacks of tasks slower than their typical
duration, each pushing the next look later, as migration 0007 and ``Store.plan`` store them
(the later look in ``planned_check_at``, every indexed column unchanged, pages with room: a
HOT update) against the store before them (the indexed ``next_check_at`` moved by every
callback, full pages), each on a fresh database, in alternating rounds: wall and writer CPU
per batch, PostgreSQL's CPU per batch (its processes on this machine, from ``/proc``), and
the share of the task table's updates that PostgreSQL made in place.

Run from the repository root: ``.venv/bin/python bench/writer.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.ingest import fresh_postgres, psycopg_url
from service import ingest
from service.db import make_engine
from service.ingest import UpdateRequest
from service.lifecycle import TaskUpdate
from service.models import TaskOrigin, TaskStatus, UpdateSource
from service.outbox import Outbox
from service.store import ApplyResult, ReceiptDraft, Store

PG_ENV = "TASKRELAY_TEST_DATABASE_URL"
PREFIX = "taskrelay_bench_writer_"
BODY = b'{"id":"task-unified-1","status":"processing","progress":40}'


def measure(run: Callable[[], object], batches: int) -> tuple[float, float]:
    """(wall ms, CPU ms of this thread) per batch, over ``batches`` runs of ``run``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(batches):
        run()
    return (
        (time.perf_counter() - wall) * 1000 / batches,
        (time.thread_time() - cpu) * 1000 / batches,
    )


def tracked_tasks(store: Store, owner: str, count: int = 2000) -> list[str]:
    """``count`` new EvoLink tasks of ``owner``, tracked (with provider task ids): their ids."""
    return [
        str(
            store.create_task(
                owner=owner,
                provider="evolink",
                origin=TaskOrigin.tracked,
                request={},
                metadata={},
                provider_task_id=f"p{i}",
            ).task["id"]
        )
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database-url", default=os.environ.get(PG_ENV))
    parser.add_argument("--part", choices=["all", "pipeline", "in-place"], default="all")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=6, help="alternations per batch size")
    parser.add_argument("--batches", type=int, default=100, help="batches per path per round")
    args = parser.parse_args()
    if not args.database_url:
        parser.error(f"needs a PostgreSQL server: --database-url or {PG_ENV}")
    admin_url = psycopg_url(args.database_url)
    if args.part in ("all", "pipeline"):
        with fresh_postgres(admin_url, PREFIX) as url:
            pipeline_table(url, args)
    if args.part in ("all", "in-place"):
        print()
        in_place_table(admin_url, args)


def pipeline_table(url: str, args: argparse.Namespace) -> None:
    """The statements one by one against the pipeline, on one database."""
    store = Store(make_engine(url))
    Outbox(store).create_subscription(
        "subscribed",
        url="https://hooks.example/a",
        event_types=None,
        providers=None,
        description=None,
    )
    ids = {owner: tracked_tasks(store, owner) for owner in ("plain", "subscribed")}
    rng = random.Random(6)
    receipt = ReceiptDraft("evolink", BODY, "application/json")

    def batch(owner: str, size: int) -> list[UpdateRequest]:
        return [
            UpdateRequest(
                rng.choice(ids[owner]),
                TaskUpdate(status=TaskStatus.running, progress=rng.randint(1, 99)),
                UpdateSource.callback,
                receipt,
            )
            for _ in range(size)
        ]

    def runner(owner: str, size: int, pipelined: bool) -> Callable[[], object]:
        def run() -> object:
            with store.core_transaction() as (connection, written):
                requests = batch(owner, size)
                return ingest.apply_updates(
                    store, connection, written, requests, pipelined=pipelined
                )

        return run

    print(
        f"Group-commit writer alone on PostgreSQL, {args.rounds} alternating rounds of "
        f"{args.batches} batches per path; medians over rounds, per batch.\n"
    )
    print(
        "| client | batch | statements: wall / CPU | pipeline: wall / CPU | pipeline / statements |"
    )
    print("|---|---:|---:|---:|---:|")
    for owner, size in itertools.product(("plain", "subscribed"), args.batch):
        for pipelined in (False, True):  # warm both (prepared statements, caches)
            measure(runner(owner, size, pipelined), 20)
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for pipelined in (False, True):
                results[pipelined].append(measure(runner(owner, size, pipelined), args.batches))
        (sw, sc), (pw, pc) = (
            (
                statistics.median(w for w, _ in results[p]),
                statistics.median(c for _, c in results[p]),
            )
            for p in (False, True)
        )
        label = "no subscription" if owner == "plain" else "one subscription"
        print(
            f"| {label} | {size} | {sw:.2f} / {sc:.2f} ms | {pw:.2f} / {pc:.2f} ms "
            f"| {pw / sw:.2f} / {pc / sc:.2f} |"
        )
    store.engine.dispose()


class MovedEveryTime(Store):
    """The store before migration 0007: every callback writes the next look itself."""

    def plan(self, task: Any, now: datetime) -> None:
        super().plan(task, now)
        if task.planned_check_at is not None:
            task.next_check_at, task.planned_check_at = task.planned_check_at, None


def postgres_cpu() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (live ones)."""
    ticks = 0
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/comm") as comm:
                if comm.read().strip() != "postgres":
                    continue
            with open(f"{proc}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class SlowTasks:
    """2,000 tracked tasks of a fresh database that take 150 s against a typical 60 s, and
    their progress callbacks in batches of 8, on a simulated clock that stays within the
    first 60 s (each task's first look, at 61 s, still ahead)."""

    def __init__(self, url: str, store_class: type[Store]) -> None:
        self.start = datetime(2026, 11, 21, tzinfo=UTC)
        self.now = self.start
        self.store = store_class(make_engine(url), clock=lambda: self.now)
        if store_class is MovedEveryTime:
            with self.store.engine.begin() as connection:
                connection.exec_driver_sql("ALTER TABLE task RESET (fillfactor)")
        self.ids = tracked_tasks(self.store, "plain")
        self.progress = dict.fromkeys(self.ids, 0)
        self.rng = random.Random(7)
        self.receipt = ReceiptDraft("evolink", BODY, "application/json")

    def start_all(self) -> None:
        """Every task running at 4 s, 1 %: the status, indexed, changes once here."""
        self.now = self.start + timedelta(seconds=4)
        update = TaskUpdate(status=TaskStatus.running, progress=1)
        for index in range(0, len(self.ids), 8):
            requests = [
                UpdateRequest(task_id, update, UpdateSource.callback, self.receipt)
                for task_id in self.ids[index : index + 8]
            ]
            self.send(requests)
        self.progress = dict.fromkeys(self.ids, 1)

    def batch(self, at: float) -> None:
        """One batch of 8 callbacks, ``at`` seconds after the tasks started."""
        self.now = self.start + timedelta(seconds=at)
        requests = []
        for task_id in self.rng.sample(self.ids, 8):
            value = self.progress[task_id] = min(99, max(self.progress[task_id] + 1, int(at / 1.5)))
            update = TaskUpdate(status=TaskStatus.running, progress=value)
            requests.append(UpdateRequest(task_id, update, UpdateSource.callback, self.receipt))
        self.send(requests)

    def send(self, requests: list[UpdateRequest]) -> None:
        """One batch through the group-commit writer's path (PostgreSQL: the pipeline)."""
        for result in self.store.apply_updates(requests):
            if not isinstance(result, ApplyResult):
                raise result

    def counters(self) -> tuple[int, int]:
        with self.store.engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            row = connection.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'task'"
            ).one()
        return int(row[0]), int(row[1])


def in_place_table(admin_url: str, args: argparse.Namespace) -> None:
    """Progress callbacks on the store as it is against the store before migration 0007."""
    rounds, batches = args.rounds, args.batches
    # The simulated clock spans 5-55 s over every batch of every round of a variant.
    step = 50 / (rounds * batches + 1)
    with (
        fresh_postgres(admin_url, PREFIX) as now_url,
        fresh_postgres(admin_url, PREFIX) as before_url,
    ):
        variants = {
            "in place": SlowTasks(now_url, Store),
            "moved": SlowTasks(before_url, MovedEveryTime),
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        done = 0
        for tasks in variants.values():
            tasks.start_all()
            tasks.store.engine.dispose()  # its backends exit, and flush the server's counters
        time.sleep(1.5)
        before = {name: tasks.counters() for name, tasks in variants.items()}
        for _ in range(rounds):
            for name, tasks in variants.items():
                wall, cpu, server = time.perf_counter(), time.thread_time(), postgres_cpu()
                for index in range(batches):
                    tasks.batch(5 + step * (done + index + 1))
                results[name].append(
                    (
                        (time.perf_counter() - wall) * 1000 / batches,
                        (time.thread_time() - cpu) * 1000 / batches,
                        (postgres_cpu() - server) * 1000 / batches,
                    )
                )
            done += batches
        for tasks in variants.values():
            tasks.store.engine.dispose()
        time.sleep(1.5)
        print(
            f"Progress callbacks pushing the next look later, batches of 8, {rounds} "
            f"alternating rounds of {batches} batches; medians over rounds, per batch.\n"
        )
        print("| store | wall | writer CPU | PostgreSQL CPU | updates in place (HOT) |")
        print("|---|---:|---:|---:|---:|")
        medians = {}
        for name, tasks in variants.items():
            updates, hot = (a - b for a, b in zip(tasks.counters(), before[name], strict=True))
            medians[name] = [statistics.median(r[i] for r in results[name]) for i in range(3)]
            wall_ms, cpu_ms, server_ms = medians[name]
            label = "as it is (0007)" if name == "in place" else "before 0007"
            print(
                f"| {label} | {wall_ms:.2f} ms | {cpu_ms:.2f} ms | {server_ms:.2f} ms "
                f"| {hot / max(1, updates):.0%} of {updates:,} |"
            )
            tasks.store.engine.dispose()
        ratios = [a / b for a, b in zip(medians["in place"], medians["moved"], strict=True)]
        print(f"| ratio | {ratios[0]:.2f} | {ratios[1]:.2f} | {ratios[2]:.2f} | |")


if __name__ == "__main__":
    main()
