"""Benchmark: TaskRelay's polling fallback against the providers' fixed 5 s poll, callbacks lost.

The whole service runs in-process (API, store on a SQLite file, scheduler, mounted sandbox, rate
limiters) on one virtual clock that moves in steps of ``--step`` seconds, so an hour of provider
time takes seconds. The sandbox drops every callback: status queries are the only way to learn
that a task has finished.

Each simulated task is submitted twice at the same instant with the same sandbox directives:
once through TaskRelay's API, whose scheduler decides when to ask (its passes run as its loop
runs them in production: again at once while a pass finds due tasks, else one tick later); and
once straight to the sandbox through the provider adapter, for the strategy the providers
document: ask every 5 s after submission until the answer is final. The naive queries never touch
TaskRelay's store, so they cannot disturb the strategy being measured.

Per task: status queries (the sandbox's own record of each one) and lag, the time the strategy
first knew the final status minus the time the provider finished (the sandbox task's
``finish_at``, on the same clock). Workloads:

* API in One, 3-10 s, no estimate: TaskRelay falls back to its typical duration (10 s);
* EvoLink, 30-120 s, ``estimated_time`` = ceil(duration) (the sandbox's default: exact);
* EvoLink, 30-120 s, ``estimated_time`` = duration x U(0.7, 1.3), rounded (a noisy estimate).

Run from the repository root: ``.venv/bin/python bench/polling.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import sqlalchemy as sa

from service.app import create_app
from service.db import migrate
from service.lifecycle import TaskUpdate
from service.models import TERMINAL_STATUSES
from service.providers.base import GenerationRequest
from service.runtime import Runtime
from service.settings import load_settings

# The naive strategy: the poll interval the providers' documentation suggests.
NAIVE_INTERVAL = 5.0
# Stop with an error when tasks are still unfinished this long after the last arrival
# (EvoLink's default deadline is an hour, so every task is final or expired well before).
MAX_TAIL_SECONDS = 2 * 3600.0
# How often (virtual seconds) the loop asks the database whether TaskRelay is done.
DONE_CHECK_SECONDS = 5.0
# Float drift of a clock that adds 0.1 a few thousand times.
EPSILON = 1e-6
# Before the clock moves, the event loop must have gone round this many times with no database
# call in flight (TaskRelay's store runs in threads, in real time).
SETTLE_ROUNDS = 3

API_TOKEN = "bench-token-0123456789"
PUBLIC_URL = "http://bench"


class VirtualClock:
    """The one clock of TaskRelay, the sandbox and the rate limiters.

    Unlike the tests' FakeClock, a sleep does not jump: it moves the clock step by step, and
    at each step the world outside TaskRelay (``on_step``: arrivals, the naive poll) acts, so a
    rate limiter spacing TaskRelay's queries delays only TaskRelay. Concurrent sleeps overlap
    rather than add up; steps and ``on_step`` take turns under one lock. The clock only moves
    once TaskRelay's database calls (threads, real time) are done, so a seed repeats its run.
    """

    def __init__(self, step: float) -> None:
        self.step = step
        self.seconds = 1_000_000.0
        self.epoch = datetime(2026, 11, 20, tzinfo=UTC) - timedelta(seconds=self.seconds)
        self.on_step: Callable[[], Awaitable[None]] | None = None
        self._turn = asyncio.Lock()

    def now(self) -> datetime:
        return self.epoch + timedelta(seconds=self.seconds)

    def monotonic(self) -> float:
        return self.seconds

    def reached(self, moment: float) -> bool:
        return self.seconds >= moment - EPSILON

    def to_seconds(self, moment: datetime) -> float:
        return (moment - self.epoch).total_seconds()

    async def sleep(self, seconds: float) -> None:
        until = self.seconds + max(0.0, seconds)
        while not self.reached(until):
            async with self._turn:
                if not self.reached(until):
                    await self._move(min(until, self.seconds + self.step))
        await asyncio.sleep(0)

    async def tick(self) -> None:
        """One step of the main loop (nothing of TaskRelay's is sleeping then)."""
        async with self._turn:
            await self._move(self.seconds + self.step)

    async def _move(self, seconds: float) -> None:
        await settle()
        self.seconds = seconds
        if self.on_step is not None:
            await self.on_step()


async def settle() -> None:
    """Return once no database call has been in flight for a few rounds of the event loop."""
    threads = anyio.to_thread.current_default_thread_limiter()
    quiet = 0
    while quiet < SETTLE_ROUNDS:
        busy = threads.borrowed_tokens > 0
        await asyncio.sleep(0.0002 if busy else 0)
        quiet = 0 if busy else quiet + 1


@dataclass(frozen=True)
class Workload:
    name: str
    provider: str
    shortest: float
    longest: float
    # None: what the provider reports by default (EvoLink: ceil(duration); API in One gives no
    # estimate); else the estimate is the duration times U(1 - noise, 1 + noise), rounded.
    estimate_noise: float | None = None
    # The targets: status queries per task at most this share of the naive ones, and
    # (when set) a median lag below the naive one.
    max_query_ratio: float = 1.0
    beat_naive_median_lag: bool = False


WORKLOADS = (
    Workload("3-10 s (apiinone)", "apiinone", 3.0, 10.0),
    Workload(
        "30-120 s (evolink, exact estimate)",
        "evolink",
        30.0,
        120.0,
        max_query_ratio=0.5,
        beat_naive_median_lag=True,
    ),
    Workload(
        "30-120 s (evolink, estimate x U(0.7,1.3))",
        "evolink",
        30.0,
        120.0,
        estimate_noise=0.3,
        max_query_ratio=0.5,
        beat_naive_median_lag=True,
    ),
)


@dataclass
class Job:
    """One simulated task, submitted once for each strategy."""

    workload: Workload
    arrival: float  # virtual seconds after the start
    duration: float
    estimate: int | None
    ours_task_id: str = ""
    naive_provider_task_id: str = ""
    naive_next_query: float = math.inf
    naive_known_at: float | None = None

    @property
    def prompt(self) -> str:
        words = [f"bench sandbox:duration={self.duration:.2f}"]
        if self.estimate is not None:
            words.append(f"sandbox:estimated_time={self.estimate}")
        return " ".join(words)


@dataclass(frozen=True)
class Measure:
    """One strategy's result on one task."""

    queries: int
    lag: float


@dataclass(frozen=True)
class Summary:
    tasks: int
    queries_per_task: float
    lag_p50: float
    lag_p90: float
    lag_max: float

    @classmethod
    def of(cls, measures: list[Measure]) -> Summary:
        lags = sorted(m.lag for m in measures)
        return cls(
            tasks=len(measures),
            queries_per_task=statistics.fmean(m.queries for m in measures),
            lag_p50=statistics.median(lags),
            lag_p90=statistics.quantiles(lags, n=10, method="inclusive")[8],
            lag_max=lags[-1],
        )


@dataclass(frozen=True)
class Result:
    workload: Workload
    ours: Summary
    naive: Summary
    not_succeeded: int  # TaskRelay tasks that did not end succeeded (expired, say)

    @property
    def query_ratio(self) -> float:
        return self.ours.queries_per_task / self.naive.queries_per_task

    @property
    def lag_ratio(self) -> float:
        return self.ours.lag_p50 / self.naive.lag_p50 if self.naive.lag_p50 else math.inf

    @property
    def targets(self) -> dict[str, bool]:
        ratio = self.workload.max_query_ratio
        met = {f"queries <= {ratio:g} x naive": self.query_ratio <= ratio}
        if self.workload.beat_naive_median_lag:
            met["median lag < naive"] = self.ours.lag_p50 < self.naive.lag_p50
        return met


def make_jobs(tasks: int, window: float, rng: random.Random) -> list[Job]:
    """``tasks`` per workload, arriving as a Poisson process over ``window`` seconds (given
    their number, the arrival times are uniform), earliest first."""
    jobs = []
    for workload in WORKLOADS:
        for _ in range(tasks):
            duration = round(rng.uniform(workload.shortest, workload.longest), 2)
            estimate = None
            if workload.estimate_noise is not None:
                noise = rng.uniform(1 - workload.estimate_noise, 1 + workload.estimate_noise)
                estimate = max(1, round(duration * noise))
            jobs.append(Job(workload, rng.uniform(0.0, window), duration, estimate))
    jobs.sort(key=lambda job: job.arrival)
    return jobs


async def _no_stream(update: TaskUpdate) -> None:
    return None


class Bench:
    def __init__(
        self, runtime: Runtime, sandbox: Any, client: httpx.AsyncClient, clock: VirtualClock
    ) -> None:
        self.runtime = runtime
        self.sandbox = sandbox
        self.client = client
        self.clock = clock
        self.start = clock.seconds
        self.arrivals: list[Job] = []  # latest first: pop() takes the next
        self.waiting: list[Job] = []  # submitted, final status not yet seen by the naive poll

    async def run(self, jobs: list[Job], tick: float) -> None:
        """Step the clock until both strategies know every task's outcome."""
        self.arrivals = sorted(jobs, key=lambda job: job.arrival, reverse=True)
        self.clock.on_step = self.world_step
        next_pass = next_done_check = self.start
        taskrelay_done = False
        await self.world_step()
        while True:
            if self.clock.reached(next_pass):
                await self.runtime.scheduler.run_until_idle()
                next_pass = self.clock.seconds + tick
            if not self.arrivals and self.clock.reached(next_done_check):
                taskrelay_done = self.unfinished_in_taskrelay() == 0
                next_done_check = self.clock.seconds + DONE_CHECK_SECONDS
            if not self.arrivals and not self.waiting and taskrelay_done:
                return
            if self.clock.seconds - self.start > jobs[-1].arrival + MAX_TAIL_SECONDS:
                raise RuntimeError("the benchmark did not finish: tasks are still unfinished")
            await self.clock.tick()

    async def world_step(self) -> None:
        """What happens outside TaskRelay's scheduler at this instant: new tasks arrive, and
        the naive poll asks about the tasks it is due to ask about."""
        while self.arrivals and self.clock.reached(self.start + self.arrivals[-1].arrival):
            await self.submit(self.arrivals.pop())
        await self.runtime.submitter.idle()
        due = [job for job in self.waiting if self.clock.reached(job.naive_next_query)]
        await asyncio.gather(*(self.naive_query(job) for job in due))
        self.waiting = [job for job in self.waiting if job.naive_known_at is None]

    async def submit(self, job: Job) -> None:
        """Both copies at this instant: TaskRelay's through its API, the naive one straight to
        the sandbox (no callback URL, nothing in TaskRelay's store)."""
        provider = job.workload.provider
        response = await self.client.post(
            "/v1/tasks",
            json={"provider": provider, "prompt": job.prompt},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        response.raise_for_status()
        job.ours_task_id = response.json()["id"]
        result = await self.runtime.adapters[provider].submit(
            GenerationRequest(prompt=job.prompt), callback_url=None, on_update=_no_stream
        )
        assert result.update.provider_task_id is not None
        job.naive_provider_task_id = result.update.provider_task_id
        job.naive_next_query = self.clock.seconds + NAIVE_INTERVAL
        self.waiting.append(job)

    async def naive_query(self, job: Job) -> None:
        adapter = self.runtime.adapters[job.workload.provider]
        update = await adapter.query_status(job.naive_provider_task_id)
        if update.status in TERMINAL_STATUSES:
            job.naive_known_at = self.clock.seconds
        else:
            job.naive_next_query += NAIVE_INTERVAL

    def unfinished_in_taskrelay(self) -> int:
        statement = sa.text("SELECT COUNT(*) FROM task WHERE status IN ('queued', 'running')")
        with self.runtime.engine.connect() as connection:
            return int(connection.execute(statement).scalar_one())

    def measure(self, jobs: list[Job]) -> list[Result]:
        results = []
        queries_seen: Counter[str] = Counter()  # TaskRelay's queries, by the sandbox's record
        for workload in WORKLOADS:
            ours: list[Measure] = []
            naive: list[Measure] = []
            not_succeeded = 0
            for job in (job for job in jobs if job.workload is workload):
                task = self.runtime.store.find_task(job.ours_task_id)
                assert task is not None and task["completed_at"] is not None, task
                if task["status"] != "succeeded":
                    not_succeeded += 1
                known = datetime.fromisoformat(task["completed_at"].replace("Z", "+00:00"))
                ours_task = self.sandbox.tasks[task["provider_task_id"]]
                ours_lag = self.clock.to_seconds(known) - ours_task.finish_at
                ours.append(Measure(len(ours_task.status_queries), ours_lag))
                queries_seen[workload.provider] += len(ours_task.status_queries)
                naive_task = self.sandbox.tasks[job.naive_provider_task_id]
                assert job.naive_known_at is not None
                naive_lag = job.naive_known_at - naive_task.finish_at
                naive.append(Measure(len(naive_task.status_queries), naive_lag))
            results.append(Result(workload, Summary.of(ours), Summary.of(naive), not_succeeded))
        # The naive poll went around TaskRelay: its metrics count only TaskRelay's own queries.
        for provider, seen in queries_seen.items():
            counted = self.runtime.metrics.counter("status_queries_total", provider=provider)
            if seen != counted:
                raise RuntimeError(f"{provider}: the sandbox saw {seen} queries, metrics {counted}")
        return results


@dataclass(frozen=True)
class RunConfig:
    tasks: int = 200
    seed: int = 1
    step: float = 0.1
    window: float = 300.0
    tick: float | None = None  # None: the scheduler's own (TASKRELAY_SCHEDULER_TICK, 1 s)


async def run_benchmark(config: RunConfig) -> tuple[list[Result], float]:
    """The results, and the scheduler tick the run used."""
    jobs = make_jobs(config.tasks, config.window, random.Random(config.seed))
    clock = VirtualClock(config.step)
    with tempfile.TemporaryDirectory(prefix="taskrelay-bench-") as folder:
        database_url = f"sqlite:///{Path(folder) / 'taskrelay.db'}"
        migrate(database_url)
        # Every other setting keeps its default (the polling policy under test is the real
        # one) unless the environment sets it: e.g. TASKRELAY_APIINONE_TYPICAL_DURATION=6.5s.
        tuning = {k: v for k, v in os.environ.items() if k.startswith("TASKRELAY_")}
        settings = load_settings(
            {
                **tuning,
                "TASKRELAY_DATABASE_URL": database_url,
                "TASKRELAY_DATA_DIR": str(Path(folder) / "data"),
                "TASKRELAY_PUBLIC_URL": PUBLIC_URL,
                "TASKRELAY_SECRET_KEY": "bench-secret-key-0123456789abcdef",
                "TASKRELAY_API_TOKENS": f"bench:{API_TOKEN}",
                "TASKRELAY_SANDBOX": "true",
                "TASKRELAY_SCHEDULER": "false",  # the benchmark drives the passes itself
                "TASKRELAY_DISPATCHER": "false",  # no subscribers: no event delivery to run
            },
            env_file=Path(folder) / "no.env",
        )
        tick = settings.scheduler_tick if config.tick is None else config.tick
        transport = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
        app = create_app(
            settings,
            clock=clock.now,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            http_transport=transport,
        )
        transport.app = app
        async with app.router.lifespan_context(app):
            # One database call at a time, in the order they are made: the policy's jitter is
            # drawn in that order, so a seed repeats its run.
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1
            runtime: Runtime = app.state.runtime
            runtime.store.rng = random.Random(config.seed)  # the policy's jitter, repeatable
            sandbox = app.state.sandbox
            sandbox.set_behaviour("*", {"callback": "drop"})
            client_transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=client_transport, base_url=PUBLIC_URL) as client:
                bench = Bench(runtime, sandbox, client, clock)
                await bench.run(jobs, tick)
                return bench.measure(jobs), tick


# --- reporting ----------------------------------------------------------------------------------


def markdown(results: list[Result], config: RunConfig, tick: float) -> str:
    lines = [
        f"{config.tasks} tasks per workload arriving over {config.window:g} s, seed "
        f"{config.seed}, clock step {config.step:g} s, scheduler tick {tick:g} s, every "
        "callback lost. Lag: when the strategy first knew the final status, minus when the "
        "provider finished.",
        "",
        "| workload | strategy | queries/task | lag p50 | lag p90 | lag max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for name, summary in (("TaskRelay", result.ours), ("fixed 5 s poll", result.naive)):
            lines.append(
                f"| {result.workload.name} | {name} | {summary.queries_per_task:.2f} | "
                f"{summary.lag_p50:.1f} s | {summary.lag_p90:.1f} s | {summary.lag_max:.1f} s |"
            )
    lines += [
        "",
        "| workload | queries, TaskRelay/naive | median lag, TaskRelay/naive | target | met |",
        "|---|---:|---:|---|---|",
    ]
    for result in results:
        met = "yes" if all(result.targets.values()) else "**no**"
        lines.append(
            f"| {result.workload.name} | {result.query_ratio:.2f} | {result.lag_ratio:.2f} | "
            f"{'; '.join(result.targets)} | {met} |"
        )
    for result in results:
        if result.not_succeeded:
            lines.append(
                f"\n{result.not_succeeded} TaskRelay task(s) of {result.workload.name} did not "
                "end succeeded."
            )
    return "\n".join(lines)


def as_json(results: list[Result], run: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": run,
        "workloads": [
            {
                "name": r.workload.name,
                "provider": r.workload.provider,
                "taskrelay": dataclasses.asdict(r.ours),
                "naive": dataclasses.asdict(r.naive),
                "query_ratio": r.query_ratio,
                "median_lag_ratio": r.lag_ratio,
                "targets": r.targets,
                "not_succeeded": r.not_succeeded,
            }
            for r in results
        ],
    }


def main(argv: list[str] | None = None) -> int:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        description="TaskRelay's polling fallback against a fixed 5 s poll, callbacks lost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", type=int, default=defaults.tasks, help="tasks per workload")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument("--step", type=float, default=defaults.step, help="clock step, seconds")
    parser.add_argument(
        "--window", type=float, default=defaults.window, help="arrival window, seconds"
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds between idle scheduler passes; 0: a pass every step "
        "(default: the scheduler's own, TASKRELAY_SCHEDULER_TICK, 1 s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    tick: float | None = getattr(args, "tick", None)
    if args.tasks < 2 or args.step <= 0 or args.window < 0 or (tick or 0.0) < 0:
        parser.error("--tasks must be at least 2, --step positive, --window and --tick >= 0")
    config = RunConfig(args.tasks, args.seed, args.step, args.window, tick)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results, used_tick = asyncio.run(run_benchmark(config))
    wall = time.perf_counter() - started
    if args.json:
        run = {**dataclasses.asdict(config), "tick": used_tick, "wall_seconds": round(wall, 1)}
        print(json.dumps(as_json(results, run), indent=2))
    else:
        print(markdown(results, config, used_tick))
        print(f"\n(wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
