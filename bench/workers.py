"""Benchmark: callback ingestion on PostgreSQL with 1, 2 and 4 worker processes (issue 6).

What is measured: ``taskrelay serve --workers N`` (uvicorn's multi-process mode: N processes
accept on one listening socket, each a whole TaskRelay with its own connection pool, scheduler
and webhook dispatcher), on a fresh PostgreSQL database for each N, taking EvoLink-shaped
callbacks, each a real state change committed with its history event and receipt. The load is
``bench/ingest.py``'s, imported from it: tasks registered with ``POST /v1/tasks/track``, their
signed callback URLs fed to ``wrk`` by its Lua script (closed loop: ``--concurrency``
connections, each sending its next callback as soon as the last is answered), and the database
read back afterwards to check that every 2xx answer was stored.

For each N: the maximum rate (2xx answers per second), its ratio to the 1-worker rate measured
in the same run, p50/p99 latency at that rate (wrk's histogram), p50/p99 at one fixed offered
rate for every N (``bench/ingest.py``'s open loop, with wrk, ``--open-rate``, by default half
the first maximum but at most 300/s: latency at equal load, from when each request was due; the
generator's own lag is shown beside it), and
where the CPU went: TaskRelay's processes (and how it splits across the workers; the rate per
TaskRelay CPU-second says how efficiently it uses what it gets, whatever else runs), the
PostgreSQL backends serving the benchmark's database, the load generator, and the rest of the
machine (whatever else ran meanwhile: on a shared machine, a phase that had to share the cores
shows it there and in the load average). ``--rounds`` repeats the whole sequence, each round
starting with another worker count, and reports medians.

The baseline is ``bench/bare_app.py``'s endpoint (reads the body, answers 200) under uvicorn
with the same N workers and the same options as ``taskrelay serve``, given the same requests:
it shows how far the machine itself lets an endpoint scale with processes. On a 2-core machine
shared by server, PostgreSQL and wrk, expect little: the ratios say how much is left.

Connections: each TaskRelay worker opens up to 2 x ``--pool-size`` database connections
(``TASKRELAY_DB_POOL_SIZE``, plus as many overflow); the run refuses to start when the largest
worker count could exceed the server's ``max_connections`` minus those already in use.
``TASKRELAY_RATE_LIMIT`` is 0 (off) unless set: registering the tasks is set-up, faster than a
client's default API limit allows (callbacks are never limited).

Run from the repository root:
``.venv/bin/python bench/workers.py --database-url postgresql://postgres@127.0.0.1:5432/test``
(default: ``$TASKRELAY_TEST_DATABASE_URL``; the user needs CREATEDB: a database is created per
worker count and dropped afterwards). About 2-3 minutes per round; ``--rounds 3`` repeats the
whole sequence and reports medians; ``--no-bare`` skips the baseline; ``--json`` prints JSON.
``TASKRELAY_*`` settings in the environment are passed on to TaskRelay as ``bench/ingest.py``
does (except the ones it sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

# bench/ is not a package: its modules import each other from its folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (
    BARE_APP,
    DEFAULT_STEPS,
    INITIAL_CALLBACKS,
    MIN_WINDOW,
    PG_ENV,
    PROVIDER,
    WINDOW_PER_CONNECTION,
    CallbackFeed,
    LoadOptions,
    LoadSpec,
    Phase,
    Readback,
    ServerProcess,
    cpu_seconds_of,
    ensure_feed,
    free_port,
    fresh_postgres,
    passed_settings,
    psycopg_url,
    read_back,
    run_phase,
    service_environment,
    service_revision,
    uvicorn_implementation,
)

WORKER_COUNTS = (1, 2, 4)
# Callbacks queued for a closed-loop phase: the best rate seen so far (or the warm-up's) times
# its duration times this. Running out would cap the rate measured (it is then flagged).
CLOSED_FEED_MARGIN = 2.5
# The open loop's default rate is capped here: the limit of the Python (httpx) generator it used
# before bench/ingest.py's open loop moved to wrk, kept so that runs stay comparable.
MAX_AUTO_OPEN_RATE = 300.0
DEFAULT_POOL_SIZE = 5
# Connections kept free for everything else on the server (other databases, psql, tests).
CONNECTION_RESERVE = 10
# After /readyz answers, the other workers may still be starting: the warm-up covers that, and
# this wait keeps the first callbacks from queueing behind a start-up.
SETTLE_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# ``bench/bare_app.py``'s ``uvicorn.run`` options, with ``workers``: uvicorn needs an import
# string for several workers, so it is imported by name from bench/.
BARE_LAUNCHER = """
import sys
import uvicorn
from bare_app import GRACEFUL_SHUTDOWN_SECONDS
uvicorn.run(
    "bare_app:app",
    host="127.0.0.1",
    port=int(sys.argv[1]),
    workers=int(sys.argv[2]),
    log_config=None,
    access_log=False,
    proxy_headers=True,
    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    server_header=False,
)
"""


# --- CPU accounting -------------------------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every living process below ``root`` (uvicorn's workers, multiprocessing helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds_of(pid)
    except (OSError, IndexError, ValueError):  # it exited meanwhile
        return 0.0


class WorkersServer(ServerProcess):
    """A server of several processes: its CPU time is the whole tree's."""

    def cpu_by_process(self) -> dict[int, float]:
        return {pid: _cpu(pid) for pid in [self.pid, *descendants(self.pid)]}

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_process().values())


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent busy so far (all processes), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class PostgresBackends:
    """CPU time of the PostgreSQL backends connected to one database (the server runs on this
    machine; backends that come and go between two readings are counted from when first seen)."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.engine = sa.create_engine(admin_url, pool_size=1, max_overflow=0)
        self.database = database

    def cpu(self) -> dict[int, float]:
        with self.engine.connect() as connection:
            pids = connection.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                {"name": self.database},
            ).scalars()
            return {int(pid): _cpu(int(pid)) for pid in pids}

    def dispose(self) -> None:
        self.engine.dispose()


def server_connections(admin_url: str) -> tuple[int, int]:
    """(max_connections, connections in use now) of the PostgreSQL server."""
    engine = sa.create_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            limit = int(connection.execute(sa.text("SHOW max_connections")).scalar_one())
            used = int(
                connection.execute(sa.text("SELECT COUNT(*) FROM pg_stat_activity")).scalar_one()
            )
        return limit, used
    finally:
        engine.dispose()


# --- one measured phase ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    phase: Phase
    server_cores: float  # all the server's processes, in cores
    worker_shares: list[float]  # each uvicorn worker's share of the server's CPU, largest first
    postgres_cores: float | None
    machine_cores: float  # every process on the machine, in cores
    load_average: float  # 1-minute, before the phase

    @property
    def efficiency(self) -> float:
        """2xx answers per CPU-second of the server's processes."""
        return self.phase.rate / self.server_cores if self.server_cores > 0 else math.nan

    @property
    def other_cores(self) -> float:
        """CPU the rest of the machine took meanwhile (other users, other databases): what
        the measured processes could not have."""
        ours = self.server_cores + (self.postgres_cores or 0.0) + self.phase.generator_cpu
        return max(0.0, self.machine_cores - ours)


def measure(
    server: WorkersServer,
    feed: CallbackFeed,
    spec: LoadSpec,
    options: LoadOptions,
    folder: Path,
    postgres: PostgresBackends | None,
) -> Measured:
    load_average = os.getloadavg()[0]
    processes_before = server.cpu_by_process()
    postgres_before = postgres.cpu() if postgres else {}
    machine_before, started = machine_busy_seconds(), time.perf_counter()
    phase = run_phase(server, feed, spec, options, folder)
    elapsed = time.perf_counter() - started
    machine = (machine_busy_seconds() - machine_before) / elapsed
    processes_after = server.cpu_by_process()
    postgres_cores = None
    if postgres is not None:
        after = postgres.cpu()
        used = sum(cpu - postgres_before.get(pid, 0.0) for pid, cpu in after.items())
        postgres_cores = used / elapsed
    per_process = {
        pid: cpu - processes_before.get(pid, 0.0)
        for pid, cpu in processes_after.items()
        if pid != server.pid
    }
    # The workers are the busy children; uvicorn's supervisor and helpers barely run.
    total = sum(per_process.values()) or 1.0
    shares = sorted(
        (cpu / total for cpu in per_process.values() if cpu / total >= 0.02), reverse=True
    )
    return Measured(
        phase=phase,
        server_cores=phase.server_cpu,
        worker_shares=shares,
        postgres_cores=postgres_cores,
        machine_cores=machine,
        load_average=load_average,
    )


# --- servers --------------------------------------------------------------------------------------


def start_taskrelay(database_url: str, folder: Path, workers: int, pool_size: int) -> WorkersServer:
    port = free_port()
    env = service_environment(database_url, folder, port)
    env["TASKRELAY_DB_POOL_SIZE"] = str(pool_size)
    # Registering tasks (the set-up, not what is measured) goes faster than a client's
    # default API rate limit allows; callbacks are never limited.
    env.setdefault("TASKRELAY_RATE_LIMIT", "0")
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    server = WorkersServer(
        f"taskrelay-x{workers}", [*argv, "--workers", str(workers)], env, port, folder
    )
    try:
        server.wait_ready(lambda client: client.get("/readyz").status_code == 200)
    except BaseException:
        server.stop()
        raise
    time.sleep(SETTLE_SECONDS)
    return server


def start_bare(folder: Path, workers: int) -> WorkersServer:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
    env["PYTHONPATH"] = str(BARE_APP.parent)
    argv = [sys.executable, "-c", BARE_LAUNCHER, str(port), str(workers)]
    server = WorkersServer(f"bare-x{workers}", argv, env, port, folder)
    probe = f"/callbacks/{PROVIDER}/probe"
    try:
        server.wait_ready(lambda client: client.post(probe, content=b"{}").status_code == 200)
    except BaseException:
        server.stop()
        raise
    time.sleep(SETTLE_SECONDS)
    return server


# --- one worker count -----------------------------------------------------------------------------


@dataclass
class TaskRelayRun:
    workers: int
    closed: Measured
    open: Measured | None
    readback: Readback
    sent: int  # every phase, warm-up included
    answered_2xx: int

    @property
    def consistent(self) -> bool:
        """Every 2xx has its receipt, every applied change its event (bench/ingest.py's check;
        a request cut off when a phase ended may be stored without its answer arriving)."""
        receipts = sum(self.readback.receipts.values())
        applied = self.readback.receipts.get("applied", 0)
        changes = sum(n for kind, n in self.readback.events.items() if kind != "task.submitted")
        return self.answered_2xx <= receipts <= self.sent and applied == changes


@dataclass
class BareRun:
    workers: int
    closed: Measured


def measure_taskrelay(
    admin_url: str,
    workers: int,
    options: LoadOptions,
    window: int,
    steps: int,
    pool_size: int,
    open_rate: float | None,
    with_open: bool,
    best_rate: float,
) -> tuple[TaskRelayRun, CallbackFeed]:
    """Warm-up, the closed loop, then (``with_open``) the open loop at ``open_rate``, or when
    that is None at half the closed loop's rate (at most ``MAX_AUTO_OPEN_RATE``).
    ``best_rate``: the highest closed-loop rate seen so far, to queue enough callbacks."""
    with (
        fresh_postgres(admin_url) as url,
        tempfile.TemporaryDirectory(prefix=f"taskrelay-workers-{workers}-") as name,
    ):
        folder = Path(name)
        postgres = PostgresBackends(admin_url, sa.engine.make_url(url).database or "")
        feed = CallbackFeed(steps, window)
        server = start_taskrelay(url, folder, workers, pool_size)
        phases: list[Phase] = []
        try:
            ensure_feed(server, feed, INITIAL_CALLBACKS)
            warm = run_phase(
                server,
                feed,
                LoadSpec("closed", options.warmup, options.concurrency),
                options,
                folder,
            )
            phases.append(warm)
            expected = max(warm.rate, best_rate)
            ensure_feed(server, feed, expected * options.duration * CLOSED_FEED_MARGIN)
            closed_spec = LoadSpec("closed", options.duration, options.concurrency)
            closed = measure(server, feed, closed_spec, options, folder, postgres)
            phases.append(closed.phase)
            opened = None
            if with_open:
                rate = open_rate or min(MAX_AUTO_OPEN_RATE, closed.phase.rate / 2)
                ensure_feed(server, feed, rate * options.duration * 1.1)
                open_spec = LoadSpec("open", options.duration, options.concurrency, rate)
                opened = measure(server, feed, open_spec, options, folder, postgres)
                phases.append(opened.phase)
        finally:
            server.stop()
            postgres.dispose()
        readback = read_back(url)
    run = TaskRelayRun(
        workers,
        closed,
        opened,
        readback,
        sent=sum(p.sent for p in phases),
        answered_2xx=sum(p.ok for p in phases),
    )
    return run, feed


def measure_bare(
    workers: int, items: CallbackFeed, options: LoadOptions, window: int, steps: int
) -> BareRun:
    with tempfile.TemporaryDirectory(prefix=f"taskrelay-workers-bare-{workers}-") as name:
        folder = Path(name)
        server = start_bare(folder, workers)
        try:
            # The same requests TaskRelay got, gone round again as often as needed.
            feed = CallbackFeed(steps, window)
            feed.items = items.items
            warmup = LoadSpec("closed", options.warmup, options.concurrency, repeat=True)
            run_phase(server, feed, warmup, options, folder)
            feed.position = 0
            closed = LoadSpec("closed", options.duration, options.concurrency, repeat=True)
            return BareRun(workers, measure(server, feed, closed, options, folder, None))
        finally:
            server.stop()


# --- reporting ------------------------------------------------------------------------------------


@dataclass
class Results:
    taskrelay: dict[int, list[TaskRelayRun]] = field(default_factory=dict)
    bare: dict[int, list[BareRun]] = field(default_factory=dict)
    open_rate: float | None = None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _cores(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _split(shares: Sequence[float]) -> str:
    return "/".join(f"{share:.0%}" for share in shares) or "one process"


def _median_run(runs: Sequence[Any]) -> Any:
    """The run with the median closed-loop rate (its other numbers go with it)."""
    ordered = sorted(runs, key=lambda run: run.closed.phase.rate)
    return ordered[(len(ordered) - 1) // 2]


def markdown(results: Results, run: dict[str, Any]) -> str:
    rounds = run["rounds"]
    lines = [
        f"PostgreSQL, `taskrelay serve --workers N`; wrk, 1 thread, {run['concurrency']} "
        f"connections, {run['duration']:g} s per phase after a {run['warmup']:g} s warm-up; "
        f"open loop (wrk, one thread per connection) at {results.open_rate or 0:,.0f}/s for "
        "every N (latency at equal "
        f"load; the generator's own lag p99 in brackets). {run['cores']} cores shared by "
        "TaskRelay, PostgreSQL and the load generator (and whatever else ran: see the rest of "
        f"the machine); TASKRELAY_DB_POOL_SIZE={run['pool_size']}; uvicorn {run['uvicorn']}; "
        f"TaskRelay at {run['revision']}."
        + (f" Median of {rounds} rounds (the run with the median rate)." if rounds > 1 else "")
        + " A rate marked + ran out of callbacks in some round: a lower bound.",
        "",
        "| workers | TaskRelay 2xx/s | vs 1 worker | p50 / p99 at max (ms) "
        f"| p50 / p99 at {results.open_rate or 0:,.0f}/s (ms) | TaskRelay CPU (cores; split) "
        "| 2xx per TaskRelay CPU-second | PostgreSQL CPU | wrk CPU | rest of the machine "
        "| load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = _median([r.closed.phase.rate for r in results.taskrelay.get(1, [])])
    for workers, runs in sorted(results.taskrelay.items()):
        rate = _median([r.closed.phase.rate for r in runs])
        middle: TaskRelayRun = _median_run(runs)
        closed, opened = middle.closed, middle.open
        open_text = "n/a"
        if opened is not None:
            lag = opened.phase.generator_lag_p99_ms
            open_text = (
                f"{_ms(opened.phase.p50_ms)} / {_ms(opened.phase.p99_ms)} "
                f"({_ms(math.nan if lag is None else lag)})"
            )
        # A phase that ran out of callbacks measured a lower bound only.
        capped = "+" if any(r.closed.phase.exhausted for r in runs) else ""
        lines.append(
            f"| {workers} | {rate:,.0f}{capped} | {rate / base:.2f}x | "
            f"{_ms(closed.phase.p50_ms)} / {_ms(closed.phase.p99_ms)} | {open_text} | "
            f"{_cores(closed.server_cores)}; "
            f"{_split(closed.worker_shares)} | {closed.efficiency:,.0f} | "
            f"{_cores(closed.postgres_cores)} | {_cores(closed.phase.generator_cpu)} | "
            f"{_cores(closed.other_cores)} | {closed.load_average:.1f} |"
        )
    if results.bare:
        lines += [
            "",
            "| workers | bare Starlette 2xx/s | vs 1 worker | p50 / p99 at max (ms) "
            "| server CPU (cores; split) | 2xx per server CPU-second | wrk CPU "
            "| rest of the machine | load avg | TaskRelay / bare |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        bare_base = _median([r.closed.phase.rate for r in results.bare.get(1, [])])
        for workers, bare_runs in sorted(results.bare.items()):
            rate = _median([r.closed.phase.rate for r in bare_runs])
            middle_bare: BareRun = _median_run(bare_runs)
            closed = middle_bare.closed
            ours = _median([r.closed.phase.rate for r in results.taskrelay.get(workers, [])])
            lines.append(
                f"| {workers} | {rate:,.0f} | {rate / bare_base:.2f}x | "
                f"{_ms(closed.phase.p50_ms)} / {_ms(closed.phase.p99_ms)} | "
                f"{_cores(closed.server_cores)}; {_split(closed.worker_shares)} | "
                f"{closed.efficiency:,.0f} | "
                f"{_cores(closed.phase.generator_cpu)} | {_cores(closed.other_cores)} | "
                f"{closed.load_average:.1f} | {ours / rate:.1%} |"
            )
    lines.append("")
    for workers, runs in sorted(results.taskrelay.items()):
        for index, result in enumerate(runs, 1):
            rb = result.readback
            verdict = "consistent" if result.consistent else "**inconsistent**"
            label = f"{workers} worker(s)" + (f", round {index}" if rounds > 1 else "")
            rates = f"{result.closed.phase.rate:,.0f}/s"
            lines.append(
                f"- {label}: {rates}; read back: {result.sent:,} callbacks sent, "
                f"{result.answered_2xx:,} answered 2xx, receipts {rb.receipts}, "
                f"{rb.status_queries} status queries: {verdict}."
            )
            for measured in (result.closed, result.open):
                if measured is not None:
                    lines += [f"  - {note}" for note in problems(measured.phase)]
    for workers, bare_runs in sorted(results.bare.items()):
        for bare_run in bare_runs:
            lines += [f"- bare x{workers}: {note}" for note in problems(bare_run.closed.phase)]
    return "\n".join(lines)


def problems(phase: Phase) -> list[str]:
    notes = []
    if phase.generator_bound:
        notes.append(
            f"{phase.mode} loop: the load generator used {phase.generator_cpu:.0%} of a core: "
            "the rate may be its limit"
        )
    if phase.non_2xx:
        notes.append(f"{phase.mode} loop: non-2xx answers {phase.non_2xx}")
    if phase.errors:
        notes.append(f"{phase.mode} loop: no answer {phase.errors}")
    if phase.exhausted:
        notes.append(f"{phase.mode} loop: ran out of callbacks to send")
    if phase.overloaded:
        notes.append(f"{phase.mode} loop: gave up with too many requests waiting")
    return notes


def as_json(results: Results, run: dict[str, Any]) -> dict[str, Any]:
    def measured(value: Measured | None) -> dict[str, Any] | None:
        return None if value is None else dataclasses.asdict(value)

    return {
        "run": run,
        "open_rate": results.open_rate,
        "taskrelay": {
            str(workers): [
                {
                    "closed": measured(r.closed),
                    "open": measured(r.open),
                    "readback": dataclasses.asdict(r.readback),
                    "sent": r.sent,
                    "answered_2xx": r.answered_2xx,
                    "consistent": r.consistent,
                }
                for r in runs
            ]
            for workers, runs in results.taskrelay.items()
        },
        "bare": {
            str(workers): [{"closed": measured(r.closed)} for r in runs]
            for workers, runs in results.bare.items()
        },
    }


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Callback ingestion on PostgreSQL with 1, 2 and 4 uvicorn workers "
        "(taskrelay serve --workers N), and the bare endpoint with as many workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(PG_ENV),
        help=f"a PostgreSQL server (default: ${PG_ENV}); a fresh database is created on it for "
        "each worker count and dropped afterwards",
    )
    parser.add_argument(
        "--workers",
        default=",".join(str(n) for n in WORKER_COUNTS),
        help="comma-separated worker counts; the first one is the baseline of the ratios",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="wrk connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="closed-loop warm-up, seconds")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="callbacks per task")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        help="TASKRELAY_DB_POOL_SIZE of every worker",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    parser.add_argument(
        "--open-rate",
        type=float,
        default=0.0,
        help="the open loop's fixed rate (requests/s); 0: half the first phase's maximum, at "
        f"most {MAX_AUTO_OPEN_RATE:g}",
    )
    parser.add_argument("--no-open", action="store_true", help="skip the fixed-rate phases")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare baseline")
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"needs a PostgreSQL server: --database-url or ${PG_ENV}")
    if not shutil.which("wrk"):
        parser.error("needs wrk (apt-get install wrk)")
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes comma-separated whole numbers")
    if not counts or min(counts) < 1 or args.rounds < 1 or args.pool_size < 1:
        parser.error("--workers, --rounds and --pool-size must be positive")
    if args.duration < 1 or args.warmup < 1 or args.concurrency < 1:
        parser.error("--duration and --warmup must be at least 1 s; --concurrency positive")
    admin_url = psycopg_url(args.database_url)
    limit, used = server_connections(admin_url)
    wanted = max(counts) * 2 * args.pool_size + 2
    if wanted > limit - used - CONNECTION_RESERVE:
        parser.error(
            f"{max(counts)} workers may open {wanted} connections; the server allows "
            f"{limit} and {used} are in use: lower --pool-size"
        )
    window = max(MIN_WINDOW, WINDOW_PER_CONNECTION * args.concurrency)
    options = LoadOptions(args.concurrency, args.duration, args.warmup, "wrk", 1)
    results = Results()
    started = time.perf_counter()
    for round_number in range(1, args.rounds + 1):
        last_feed: CallbackFeed | None = None
        # Each round starts with another count, so a slow spell of the machine does not
        # always land on the same one; the first round starts with the baseline.
        shift = (round_number - 1) % len(counts)
        order = counts[shift:] + counts[:shift]
        for workers in order:
            print(f"round {round_number}: TaskRelay, {workers} worker(s)", file=sys.stderr)
            # The fixed rate is set by the first phase (half its maximum, at most
            # MAX_AUTO_OPEN_RATE) unless given, and kept for every later one.
            best_rate = max(
                (r.closed.phase.rate for runs in results.taskrelay.values() for r in runs),
                default=0.0,
            )
            result, last_feed = measure_taskrelay(
                admin_url,
                workers,
                options,
                window,
                args.steps,
                args.pool_size,
                results.open_rate or args.open_rate or None,
                with_open=not args.no_open,
                best_rate=best_rate,
            )
            results.taskrelay.setdefault(workers, []).append(result)
            if results.open_rate is None and result.open is not None:
                results.open_rate = result.open.phase.offered_rate
        if not args.no_bare and last_feed is not None:
            for workers in order:
                print(f"round {round_number}: bare, {workers} worker(s)", file=sys.stderr)
                bare = measure_bare(workers, last_feed, options, window, args.steps)
                results.bare.setdefault(workers, []).append(bare)
    run = {
        "concurrency": args.concurrency,
        "duration": args.duration,
        "warmup": args.warmup,
        "pool_size": args.pool_size,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "uvicorn": uvicorn_implementation(),
        "revision": service_revision(),
        "settings_passed": passed_settings(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(as_json(results, run), indent=2))
    else:
        print(markdown(results, run))
        print(f"\n(wall time {run['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
