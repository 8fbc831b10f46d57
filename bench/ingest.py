"""Benchmark: callback ingestion (issue 6, benchmark 1), against a bare endpoint in the same run.

The service measured is a real ``taskrelay serve`` process (uvicorn with its default settings) on
a SQLite file in a temporary folder, and again on a fresh PostgreSQL database when
``--database-url`` or ``TASKRELAY_TEST_DATABASE_URL`` names a server (the database is created,
migrated, and dropped afterwards; the URL's user needs ``CREATEDB``). The scheduler and the
webhook dispatcher keep their defaults (on); there are no subscriptions, so every event is an
outbox row that owes no delivery.

Every measured request is a real state change: tasks are registered through
``POST /v1/tasks/track`` (EvoLink), and each one then gets EvoLink-shaped callbacks at its own
signed callback URL, ``--steps`` of them: rising progress (10, 20, ... 90 by default; 1..99 with
``--steps 100``) and then ``completed``, interleaved over a window of at least 512 tasks in
flight (a task's next callback comes after every other task of the window has had one; a task
that completes makes room for a fresh one), so each request moves one task forward, commits,
keeps a receipt and appends a history event. Only 2xx answers count; anything else is reported.
After the run the database is read back to check that the answers match the rows written (and
that the scheduler sent no status query: EvoLink tasks are first queried after their typical
duration, 100 s, so keep a database's phases shorter than that).

The baseline is ``bench/bare_app.py``: one Starlette POST endpoint that reads the body and
answers 200, in a process of its own under the same ``uvicorn.run`` options.

Load (127.0.0.1 only, bounded in time and count, and sharing the machine's cores with the server;
its CPU use is reported):

* closed loop: ``--concurrency`` connections, each sending its next request as soon as the last is
  answered, for ``--duration`` seconds after ``--warmup``: the maximum rate, p50/p99 latency. It
  uses ``wrk`` when installed (one thread, a Lua script feeding the callbacks), else async httpx
  (``--processes`` to spread it over several processes);
* open loop: a fixed rate, half of TaskRelay's closed-loop rate, for ``--duration`` seconds, on
  both servers: request i is due at t0 + i / rate, the callbacks in the closed loop's order.
  Latency is counted from when a request was due, not from when it went out, so a server (or
  generator) that falls behind shows in the numbers (no coordinated omission). With wrk, it runs
  one wrk thread per connection (``-t N -c N``; N for 100 ms of requests per connection, 4 to
  256), so each thread's Lua state owns one connection and knows the due time of its one request
  in flight: thread k sends requests k, k + N, k + 2N, ...; ``delay()`` wakes it shortly before
  the next is due and ``request()`` sleeps to the due time (``clock_nanosleep`` on
  CLOCK_MONOTONIC, through LuaJIT's FFI); ``response()`` records the answer's time minus the due
  time. A request that comes due while its connection still waits for an earlier answer goes out
  late, and its lateness counts (such requests are reported). The generator's own lateness
  (sent after the request was due, or after its connection came free when that was later: p99
  and max) and its CPU are reported; a thread whose next request would go out over 2 s late
  stops (the phase is then flagged, as are requests never answered). With ``--generator httpx``
  (or without wrk) an async httpx generator runs it instead, which falls behind itself above a
  few hundred requests per second (its lag is reported, and counted in the latency).

``--profile DIR`` adds two closed-loop phases per database under py-spy (``pip install py-spy``),
after the measured ones: ``wall`` samples every thread, waiting ones included (where a request's
time goes: locks, I/O, the pool), ``gil`` only the thread holding the GIL (where Python's CPU
goes). Raw stacks are kept in DIR (flamegraph.pl or speedscope read them) and summarised.

Run from the repository root: ``.venv/bin/python bench/ingest.py`` (``--help`` for options).
``TASKRELAY_*`` settings in the environment are passed on to the service (except the ones this
benchmark sets), e.g. ``TASKRELAY_DISPATCHER=false`` to see what the dispatcher costs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import sqlalchemy as sa

from service.db import migrate

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
BARE_APP = Path(__file__).resolve().parent / "bare_app.py"
PG_ENV = "TASKRELAY_TEST_DATABASE_URL"

API_TOKEN = "bench-token-0123456789"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
PROVIDER = "evolink"
# Callbacks per task (--steps): progress updates, then completed; each one is a state change.
DEFAULT_STEPS = 10
# Tasks in flight at once (--window; a task's callbacks are this many requests apart): at
# least this many, and this many per connection.
MIN_WINDOW = 512
WINDOW_PER_CONNECTION = 8
# Callbacks queued before the warm-up (then as many as the warm-up's rate says are needed).
INITIAL_CALLBACKS = 3000
# Tasks tracked at a time when more are needed.
MIN_TRACK_BATCH = 100
# Callbacks kept in reserve beyond what a phase is expected to use (rate x duration x this).
FEED_MARGIN = 3.0
SETUP_CONCURRENCY = 8
REQUEST_TIMEOUT_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
# The httpx open loop gives up (and says so) when this many requests are waiting for an answer.
OPEN_LOOP_MAX_IN_FLIGHT = 2000
# The wrk open loop: one wrk thread per connection, enough connections that each one's requests
# are due at least this far apart (a connection still waiting for an answer when its next request
# comes due sends it late, and that lateness counts), within these bounds.
OPEN_LOOP_SLOT_SECONDS = 0.1
OPEN_LOOP_MIN_CONNECTIONS = 4
OPEN_LOOP_MAX_CONNECTIONS = 256
# From starting wrk to the first request's due time (its threads load their feeds meanwhile).
OPEN_LOOP_START_SECONDS = 1.0
# A wrk thread whose next request is this late stops sending (the phase is then flagged).
OPEN_LOOP_GIVE_UP_SECONDS = 2.0
# A generator using this share of the CPU it can use is taken to be the bottleneck.
GENERATOR_SATURATED = 0.85
# The open loop's own lag (sending later than due) above which its results are flagged.
GENERATOR_LAG_WARNING_MS = 5.0
# The targets.
TARGET_RATIO = {"sqlite": 0.50, "postgresql": 0.35}
TARGET_P99_MS_AT_HALF_RATE = 25.0
JSON_HEADERS = {"Content-Type": "application/json"}
# Settings this benchmark sets itself: the environment's values are not passed on.
OWN_SETTINGS = frozenset(
    {
        "TASKRELAY_DATABASE_URL",
        "TASKRELAY_DATA_DIR",
        "TASKRELAY_FILES_DIR",
        "TASKRELAY_PUBLIC_URL",
        "TASKRELAY_SECRET_KEY",
        "TASKRELAY_SECRET_KEY_FALLBACKS",
        "TASKRELAY_API_TOKENS",
        "TASKRELAY_HOST",
        "TASKRELAY_PORT",
        "TASKRELAY_ENV_FILE",
        PG_ENV,
    }
)

Mode = Literal["closed", "open"]


# --- the callbacks to send ------------------------------------------------------------------------


@dataclass(frozen=True)
class Callback:
    path: str  # /callbacks/evolink/<signed token>
    body: bytes


def evolink_body(provider_task_id: str, step: int, steps: int) -> bytes:
    """EvoLink's callback ``step`` (0-based) of ``steps``: rising progress (1..99 with 100
    steps, 10..90 with 10) while processing, then the completed task with its image (the shape of
    tests/test_callbacks.py's ``evolink_body``)."""
    body: dict[str, Any] = {
        "created": 1757156493,
        "id": provider_task_id,
        "model": "gpt-image-1.5",
        "object": "image.generation.task",
        "progress": max(1, min(99, round((step + 1) * 100 / steps))),
        "status": "processing",
        "type": "image",
    }
    if step == steps - 1:
        body["progress"] = 100
        body["status"] = "completed"
        body["results"] = [f"https://files.evolink.example/{provider_task_id}.png"]
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class _Slot:
    path: str
    provider_task_id: str
    step: int  # the next callback to send


class CallbackFeed:
    """Every callback still to send, in order: a pipeline of ``window`` tasks in flight.

    The callbacks go round the window's slots one after another, each slot's task getting its
    next callback; a task that has had its ``completed`` makes room for a fresh one. So a task's
    callbacks are always ``window`` requests apart (concurrent requests never race on one task's
    row unless one waits while ``window`` later ones overtake it; it then changes nothing and is
    counted "unchanged" in the read-back), each task sees its callbacks in order, and one in
    ``steps`` requests completes a task from the start: the first tasks start at staggered steps
    (a provider may skip progress updates), later ones at the first.
    """

    def __init__(self, steps: int = DEFAULT_STEPS, window: int = MIN_WINDOW) -> None:
        self.steps = steps
        self.window = window
        self.items: list[Callback] = []
        self.position = 0
        self.tasks = 0  # tracked so far
        self._fresh: collections.deque[tuple[str, str]] = collections.deque()
        self._slots: list[_Slot] = []
        self._turn = 0

    @property
    def remaining(self) -> int:
        return len(self.items) - self.position

    def tasks_needed(self, callbacks: float) -> int:
        """Fresh tasks to track so that ``callbacks`` more can be queued."""
        empty_slots = self.window - len(self._slots)
        return max(1, empty_slots + math.ceil(callbacks / self.steps) - len(self._fresh) + 1)

    def add_tasks(self, tasks: Sequence[tuple[str, str]]) -> None:
        """``tasks``: (callback path, provider task id) of freshly tracked tasks."""
        self._fresh.extend(tasks)
        self.tasks += len(tasks)
        while len(self._slots) < self.window and self._fresh:
            path, ptid = self._fresh.popleft()
            self._slots.append(_Slot(path, ptid, len(self._slots) % self.steps))
        if len(self._slots) < self.window:
            return
        while True:
            slot = self._slots[self._turn]
            if slot.step >= self.steps:
                if not self._fresh:
                    return
                path, ptid = self._fresh.popleft()
                slot = self._slots[self._turn] = _Slot(path, ptid, 0)
            body = evolink_body(slot.provider_task_id, slot.step, self.steps)
            self.items.append(Callback(slot.path, body))
            slot.step += 1
            self._turn = (self._turn + 1) % self.window

    def upcoming(self) -> list[Callback]:
        return self.items[self.position :]

    def advance(self, count: int) -> None:
        self.position = min(len(self.items), self.position + count)


def shard(items: Sequence[Callback], index: int, count: int) -> list[Callback]:
    return list(items[index::count])


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ServerProcess:
    """An HTTP server of ours in a process of its own, on a free port of 127.0.0.1."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], port: int, folder: Path
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = folder / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            list(argv), env=env, cwd=folder, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(
        self, probe: Callable[[httpx.Client], bool], timeout: float = READY_TIMEOUT_SECONDS
    ) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.logs()}")
                with contextlib.suppress(httpx.HTTPError):
                    if probe(client):
                        return
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.logs()}")

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.pid)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def service_environment(database_url: str, folder: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    env.update(
        {
            "TASKRELAY_DATABASE_URL": database_url,
            "TASKRELAY_DATA_DIR": str(folder / "data"),
            "TASKRELAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "TASKRELAY_SECRET_KEY": SECRET_KEY,
            "TASKRELAY_API_TOKENS": f"bench:{API_TOKEN}",
        }
    )
    # Tasks are registered in bulk before the measured phases, far above the management API's
    # per-client rate limit (callbacks, which are measured, are never rate-limited).
    env.setdefault("TASKRELAY_RATE_LIMIT", "0")
    return env


def passed_settings() -> dict[str, str]:
    """TASKRELAY_* settings from the environment that the service gets as they are."""
    return {
        k: v for k, v in os.environ.items() if k.startswith("TASKRELAY_") and k not in OWN_SETTINGS
    }


def start_taskrelay(database_url: str, folder: Path) -> ServerProcess:
    port = free_port()
    server = ServerProcess(
        "taskrelay",
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        service_environment(database_url, folder, port),
        port,
        folder,
    )
    server.wait_ready(lambda client: client.get("/readyz").status_code == 200)
    return server


def start_bare(folder: Path) -> ServerProcess:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
    server = ServerProcess(
        "bare", [sys.executable, str(BARE_APP), "--port", str(port)], env, port, folder
    )
    probe_path = f"/callbacks/{PROVIDER}/probe"
    server.wait_ready(lambda client: client.post(probe_path, content=b"{}").status_code == 200)
    return server


# --- load generation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    mode: Mode
    duration: float
    concurrency: int = 64  # closed loop: connections; open loop: the connection pool's size
    rate: float = 0.0  # open loop: requests per second
    # Go round the callbacks again when they run out (the bare app only reads and drops them).
    repeat: bool = False


@dataclass
class RawLoad:
    """What one generator (process) saw."""

    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx answers only
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # no answer: timeouts, resets
    elapsed: float = 0.0
    cpu: float = 0.0
    lags: list[float] = field(default_factory=list)  # open loop: sent this late (seconds)
    exhausted: bool = False
    overloaded: bool = False
    # wrk keeps a latency histogram, not the samples: its p50 and p99 (seconds, all answers).
    histogram_percentiles: tuple[float, float] | None = None
    # How far into the feed the phase went (several processes each take every n-th callback).
    consumed: int | None = None
    # wrk open loop: its connections (one per thread), and the requests that came due while their
    # connection was still waiting for an earlier answer (sent late; the lateness is counted).
    connections: int | None = None
    late_connection_busy: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)  # wrk's, open loop
    unsent: int = 0  # wrk open loop: requests of the schedule never sent

    def merge(self, other: RawLoad) -> None:
        self.sent += other.sent
        self.latencies += other.latencies
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu += other.cpu
        self.lags += other.lags
        self.exhausted = self.exhausted or other.exhausted
        self.overloaded = self.overloaded or other.overloaded


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of unsorted ``values`` (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


@contextlib.asynccontextmanager
async def _connections(url: str, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` clients of one keep-alive connection each, like wrk's connections (one client
    with a large pool costs httpx far more CPU per request as the pool grows)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS)
            )
            for _ in range(count)
        ]


async def _closed_loop(url: str, items: list[Callback], spec: LoadSpec) -> RawLoad:
    raw = RawLoad()
    feed: Iterator[Callback] = itertools.cycle(items) if spec.repeat else iter(items)
    async with _connections(url, spec.concurrency) as clients:
        deadline = time.perf_counter() + spec.duration

        async def connection(client: httpx.AsyncClient) -> None:
            while time.perf_counter() < deadline:
                item = next(feed, None)
                if item is None:
                    raw.exhausted = True
                    return
                raw.sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post(item.path, content=item.body, headers=JSON_HEADERS)
                except httpx.HTTPError as exc:
                    raw.errors[type(exc).__name__] += 1
                    continue
                raw.statuses[response.status_code] += 1
                if response.is_success:
                    raw.latencies.append(time.perf_counter() - started)

        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(connection(client) for client in clients))
        raw.elapsed = time.perf_counter() - started
        raw.cpu = time.process_time() - cpu
    return raw


async def _open_loop(url: str, items: list[Callback], spec: LoadSpec) -> RawLoad:
    raw = RawLoad()
    wanted = math.ceil(spec.rate * spec.duration)
    count = wanted if spec.repeat else min(len(items), wanted)
    raw.exhausted = count < wanted
    async with _connections(url, spec.concurrency) as clients:
        idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in clients:
            idle.put_nowait(client)

        async def send(item: Callback, due: float) -> None:
            # Waiting for a free connection counts: latency runs from when the request was due.
            client = await idle.get()
            try:
                response = await client.post(item.path, content=item.body, headers=JSON_HEADERS)
            except httpx.HTTPError as exc:
                raw.errors[type(exc).__name__] += 1
                return
            finally:
                idle.put_nowait(client)
            raw.statuses[response.status_code] += 1
            if response.is_success:
                raw.latencies.append(time.perf_counter() - due)

        cpu = time.process_time()
        start = time.perf_counter() + 0.05
        in_flight: set[asyncio.Task[None]] = set()
        for index in range(count):
            due = start + index / spec.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            raw.lags.append(max(0.0, time.perf_counter() - due))
            task = asyncio.create_task(send(items[index % len(items)], due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            raw.sent += 1
            if len(in_flight) > OPEN_LOOP_MAX_IN_FLIGHT:
                raw.overloaded = True
                break
        if in_flight:
            await asyncio.wait(in_flight)
        raw.elapsed = time.perf_counter() - start
        raw.cpu = time.process_time() - cpu
    return raw


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine (a load generator) on uvloop when it is installed (cheaper per
    request)."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


def httpx_generator(url: str, items: list[Callback], spec: LoadSpec) -> RawLoad:
    """One generator process's share of a phase (also the entry point in worker processes)."""
    if spec.mode == "closed":
        return run_async(_closed_loop(url, items, spec))
    return run_async(_open_loop(url, items, spec))


def run_httpx(url: str, items: list[Callback], spec: LoadSpec, processes: int) -> RawLoad:
    if processes <= 1:
        return httpx_generator(url, items, spec)
    shares = [
        dataclasses.replace(
            spec,
            concurrency=max(1, spec.concurrency // processes),
            rate=spec.rate / processes,
        )
        for _ in range(processes)
    ]
    context = multiprocessing.get_context("fork")
    merged = RawLoad(consumed=0)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(httpx_generator, url, shard(items, index, processes), shares[index])
            for index in range(processes)
        ]
        for index, future in enumerate(futures):
            part = future.result()
            merged.merge(part)
            # Skip every callback any process may have sent: an unsent one is simply never sent.
            merged.consumed = max(merged.consumed or 0, index + part.sent * processes)
    return merged


WRK_SCRIPT = r"""
-- Feeds bench/ingest.py's callbacks to wrk, in order, one per request; counts answers by status.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  repeat_items = args[2] == "repeat"
  items = {}
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    local headers = {["Content-Type"] = "application/json"}
    items[#items + 1] = wrk.format("POST", line:sub(1, tab - 1), headers, line:sub(tab + 1))
  end
  sent = 0
  ok = 0
  exhausted = 0
  codes = {}
end

function request()
  sent = sent + 1
  if repeat_items then
    return items[(sent - 1) % #items + 1]
  end
  if sent > #items then
    -- Out of callbacks: stop. wrk still wants a request for each connection that asks before
    -- the stop takes effect; it gets the last one again (a recorded no-op), counted as sent.
    exhausted = 1
    wrk.thread:stop()
    return items[#items]
  end
  return items[sent]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    local key = tostring(status)
    codes[key] = (codes[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local thread = threads[1]
  local codes = thread:get("codes")
  local parts = {}
  for code, count in pairs(codes) do
    parts[#parts + 1] = string.format('"%s":%d', code, count)
  end
  io.write(string.format(
    'BENCH_JSON {"sent":%d,"ok":%d,"exhausted":%d,"requests":%d,"duration_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"codes":{%s}}\n',
    thread:get("sent"), thread:get("ok"), thread:get("exhausted"), summary.requests,
    summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, latency:percentile(50), latency:percentile(99),
    table.concat(parts, ",")))
end
"""


def wrk_argv(
    url: str,
    script: Path,
    *,
    threads: int,
    connections: int,
    seconds: int,
    script_args: Sequence[str],
) -> list[str]:
    """wrk's command line for one phase: its Lua script, and that script's own arguments."""
    return [
        "wrk",
        "--threads",
        str(threads),
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        f"{REQUEST_TIMEOUT_SECONDS:g}s",
        "--script",
        str(script),
        url,
        "--",
        *script_args,
    ]


def run_wrk(url: str, items: list[Callback], spec: LoadSpec, folder: Path) -> RawLoad:
    """A closed-loop phase with wrk (one thread; it is C and far cheaper than Python)."""
    feed_path = folder / "wrk-feed.txt"
    with open(feed_path, "w", encoding="utf-8") as feed:
        for item in items:
            feed.write(f"{item.path}\t{item.body.decode()}\n")
    script_path = folder / "feed.lua"
    script_path.write_text(WRK_SCRIPT)
    argv = wrk_argv(
        url,
        script_path,
        threads=1,
        connections=spec.concurrency,
        seconds=max(1, round(spec.duration)),
        script_args=[str(feed_path), "repeat" if spec.repeat else "once"],
    )
    cpu = children_cpu_seconds()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu = children_cpu_seconds() - cpu
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    sent = int(data["sent"])
    raw = RawLoad(sent=sent, elapsed=data["duration_us"] / 1e6, cpu=cpu)
    raw.consumed = sent if spec.repeat else min(sent, len(items))
    raw.statuses[200] = int(data["ok"])  # 2xx, all counted as one
    for code, count in data["codes"].items():
        raw.statuses[int(code)] += int(count)
    for kind in ("connect", "read", "write", "timeout"):
        if data[kind]:
            raw.errors[kind] += int(data[kind])
    raw.exhausted = bool(data["exhausted"])
    raw.histogram_percentiles = (data["p50_us"] / 1e6, data["p99_us"] / 1e6)
    return raw


WRK_OPEN_SCRIPT = r"""
-- bench/ingest.py's open loop: a fixed schedule, request i due at t0 + i / rate. wrk runs as many
-- threads as connections, so each thread's Lua state owns one connection and knows the due time
-- of its one request in flight; thread k sends requests k, k + N, k + 2N, ... (its own feed file,
-- in that order). Latency runs from when a request was due to its answer, so a request sent late
-- (the generator was slow, or its connection was still waiting for an earlier answer) counts its
-- lateness.
--
-- wrk (wrk.c) calls delay() when a connection may send (at the start, after each answer, after
-- a reconnect while a delay is on), waits that many whole milliseconds on its event loop's clock,
-- then calls request() and writes what it returns at once; response() is called for each answer.
-- Whole-millisecond timers fire up to a few ms off, so delay() asks to be woken 2 ms early and
-- request() sleeps (clock_nanosleep, absolute CLOCK_MONOTONIC time) until the request is due:
-- the thread's one connection has nothing else to do meanwhile.
local ffi = require("ffi")
ffi.cdef[[
struct bench_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clock, struct bench_timespec *now);
int clock_nanosleep(int clock, int flags, const struct bench_timespec *until, void *left);
]]
local MONOTONIC, PROCESS_CPU, ABSOLUTE, EINTR = 1, 2, 1, 4
local WAKE_EARLY_MS = 2
local NEVER_MS = 1e9  -- a timer that does not fire before wrk stops
local clock = ffi.new("struct bench_timespec")
local wake = ffi.new("struct bench_timespec")

local function micros(which)
  ffi.C.clock_gettime(which, clock)
  return tonumber(clock.tv_sec) * 1e6 + tonumber(clock.tv_nsec) / 1e3
end

local function sleep_until(due)
  local seconds = math.floor(due / 1e6)
  wake.tv_sec = seconds
  wake.tv_nsec = math.floor((due - seconds * 1e6) * 1e3)
  while micros(MONOTONIC) < due do
    local failed = ffi.C.clock_nanosleep(MONOTONIC, ABSOLUTE, wake, nil)
    if failed ~= 0 and failed ~= EINTR then break end
  end
end

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  result_path = args[2]
  t0 = tonumber(args[3])
  interval = 1e6 / tonumber(args[4])
  stride = tonumber(args[5])
  give_up = tonumber(args[6])
  items = {}
  for line in io.lines(string.format("%s/%d.txt", args[1], thread_index)) do
    local tab = line:find("\t", 1, true)
    local headers = {["Content-Type"] = "application/json"}
    items[#items + 1] = wrk.format("POST", line:sub(1, tab - 1), headers, line:sub(tab + 1))
  end
  item_count = #items
  following = 1  -- the next of this thread's items to send
  started, waiting, outstanding, finished = false, false, false, false
  current_due, free_since = 0, 0
  sent, extra, ok, lost, busy, gave_up, last_slot = 0, 0, 0, 0, 0, 0, -1
  first_send, first_cpu, last_answer, last_cpu = -1, -1, -1, -1
  codes, latencies, lags = {}, {}, {}
end

local function due_of(n)
  return t0 + (thread_index + (n - 1) * stride) * interval
end

local function finish()
  finished = true
  io.write("BENCH_THREAD_DONE\n")
  io.stdout:flush()
  wrk.thread:stop()
end

function delay()
  started = true
  if waiting or finished or following > #items then
    -- wrk reconnected during a wait (its earlier timer still fires), or nothing is left.
    return NEVER_MS
  end
  local now = micros(MONOTONIC)
  local due = due_of(following)
  if now - due > give_up then
    gave_up = 1
    finish()
    return NEVER_MS
  end
  waiting = true
  local ms = math.floor((due - now) / 1000) - WAKE_EARLY_MS
  if ms > 0 then
    return ms
  end
  return 0
end

function request()
  if not started then
    return items[1]  -- wrk checks the script's request once before the threads start: not sent
  end
  waiting = false
  local now = micros(MONOTONIC)
  if outstanding then
    -- wrk reconnected after a socket error: the request sent last got no answer.
    lost = lost + 1
    outstanding = false
    free_since = now
  end
  if following > #items then
    -- Only after the last request got no answer: wrk sends whatever this returns, so the last
    -- one again (counted as sent), and the thread stops without waiting for its answer.
    extra = extra + 1
    finish()
    return items[#items]
  end
  local n = following
  following = n + 1
  local due = due_of(n)
  if now < due then
    sleep_until(due)
    now = micros(MONOTONIC)
  end
  if free_since > due then
    busy = busy + 1
  end
  -- The generator's own lateness: from when the request was due, or its connection came free.
  lags[#lags + 1] = now - math.max(due, free_since)
  outstanding, current_due = true, due
  sent = sent + 1
  last_slot = thread_index + (n - 1) * stride
  if first_send < 0 then
    first_send, first_cpu = now, micros(PROCESS_CPU)
  end
  return items[n]
end

function response(status, headers, body)
  local now = micros(MONOTONIC)
  if not outstanding then
    return
  end
  outstanding, free_since = false, now
  if status >= 200 and status < 300 then
    ok = ok + 1
    latencies[#latencies + 1] = now - current_due
  else
    local key = tostring(status)
    codes[key] = (codes[key] or 0) + 1
  end
  last_answer, last_cpu = now, micros(PROCESS_CPU)
  if following > #items then
    finish()
  end
end

local function numbers(values)
  local parts = {}
  for i = 1, #values do
    parts[i] = string.format("%.0f", values[i])
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function done(summary, latency, requests)
  local out = assert(io.open(threads[1]:get("result_path"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"connect":%d,"read":%d,"write":%d,"timeout":%d,"threads":[',
    e.connect, e.read, e.write, e.timeout))
  for index, thread in ipairs(threads) do
    local parts = {}
    for code, count in pairs(thread:get("codes")) do
      parts[#parts + 1] = string.format('"%s":%d', code, count)
    end
    local pending = 0
    if thread:get("outstanding") then
      pending = 1
    end
    out:write(index > 1 and "," or "", string.format(
      '{"sent":%d,"unsent":%d,"extra":%d,"ok":%d,"lost":%d,"pending":%d,"busy":%d,"gave_up":%d,' ..
      '"last_slot":%d,"first_send":%.0f,"first_cpu":%.0f,"last_answer":%.0f,' ..
      '"last_cpu":%.0f,"codes":{%s},"latencies":%s,"lags":%s}',
      thread:get("sent"), thread:get("item_count") - thread:get("following") + 1,
      thread:get("extra"), thread:get("ok"), thread:get("lost"), pending,
      thread:get("busy"), thread:get("gave_up"), thread:get("last_slot"),
      thread:get("first_send"), thread:get("first_cpu"), thread:get("last_answer"),
      thread:get("last_cpu"), table.concat(parts, ","), numbers(thread:get("latencies")),
      numbers(thread:get("lags"))))
  end
  out:write("]}\n")
  out:close()
end
"""


def open_loop_connections(rate: float, count: int) -> int:
    """wrk's connections (and threads) for an open loop at ``rate``: each connection's requests
    are due ``OPEN_LOOP_SLOT_SECONDS`` apart or more, within the bounds (never more than the
    requests to send)."""
    wanted = math.ceil(rate * OPEN_LOOP_SLOT_SECONDS)
    bounded = min(OPEN_LOOP_MAX_CONNECTIONS, max(OPEN_LOOP_MIN_CONNECTIONS, wanted))
    return max(1, min(count, bounded))


def run_wrk_open(url: str, items: list[Callback], spec: LoadSpec, folder: Path) -> RawLoad:
    """An open-loop phase with wrk: request i due at t0 + i / rate (WRK_OPEN_SCRIPT), one
    connection per wrk thread; latency from each request's due time."""
    wanted = math.ceil(spec.rate * spec.duration)
    count = wanted if spec.repeat else min(len(items), wanted)
    raw = RawLoad(exhausted=count < wanted, consumed=0)
    if count == 0 or not items:
        raw.exhausted = True
        return raw
    threads = open_loop_connections(spec.rate, count)
    feeds = folder / "wrk-open-feeds"
    shutil.rmtree(feeds, ignore_errors=True)
    feeds.mkdir()
    for index in range(threads):
        with open(feeds / f"{index}.txt", "w", encoding="utf-8") as feed:
            for slot in range(index, count, threads):
                item = items[slot % len(items)]
                feed.write(f"{item.path}\t{item.body.decode()}\n")
    script_path = folder / "open.lua"
    script_path.write_text(WRK_OPEN_SCRIPT)
    result_path = folder / "wrk-open.json"
    result_path.unlink(missing_ok=True)
    # wrk stops by itself at the latest this long after starting; normally it is told to stop
    # (SIGINT) as soon as every thread has had the answer to its last request.
    run_for = math.ceil(
        OPEN_LOOP_START_SECONDS
        + spec.duration
        + OPEN_LOOP_GIVE_UP_SECONDS
        + REQUEST_TIMEOUT_SECONDS
        + 1
    )
    t0_us = time.monotonic_ns() // 1000 + round(OPEN_LOOP_START_SECONDS * 1e6)
    argv = wrk_argv(
        url,
        script_path,
        threads=threads,
        connections=threads,
        seconds=run_for,
        script_args=[
            str(feeds),
            str(result_path),
            str(t0_us),
            repr(spec.rate),
            str(threads),
            str(round(OPEN_LOOP_GIVE_UP_SECONDS * 1e6)),
        ],
    )
    cpu = children_cpu_seconds()
    stderr_path = folder / "wrk-open.stderr"
    with (
        open(stderr_path, "wb") as stderr,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True) as wrk,
    ):
        output = []
        finished = 0
        assert wrk.stdout is not None
        for line in wrk.stdout:
            if line.startswith("BENCH_THREAD_DONE"):
                finished += 1
                if finished == threads:
                    wrk.send_signal(signal.SIGINT)
            else:
                output.append(line)
        try:
            returncode = wrk.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            wrk.kill()
            returncode = wrk.wait()
    total_cpu = children_cpu_seconds() - cpu
    if returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"wrk failed ({returncode}):\n{''.join(output)}\n{stderr_path.read_text()[-4000:]}"
        )
    data = json.loads(result_path.read_text())
    parts = data["threads"]
    raw.connections = threads
    raw.sent = sum(int(p["sent"]) + int(p["extra"]) for p in parts)
    raw.consumed = max(int(p["last_slot"]) for p in parts) + 1
    raw.statuses[200] = sum(int(p["ok"]) for p in parts)  # 2xx, all counted as one
    for part in parts:
        for code, number in part["codes"].items():
            raw.statuses[int(code)] += int(number)
        raw.latencies += [value / 1e6 for value in part["latencies"]]
        raw.lags += [value / 1e6 for value in part["lags"]]
    raw.late_connection_busy = sum(int(p["busy"]) for p in parts)
    # Requests of the schedule never sent: a thread gave up (too late), or its connection was
    # still waiting for an answer when wrk stopped.
    raw.unsent = sum(int(p["unsent"]) for p in parts)
    raw.overloaded = raw.unsent > 0
    # Per request: sent and never answered because the connection failed (wrk reconnected), or
    # still unanswered when wrk stopped; "timeout": answered, but later than --timeout after being
    # sent (also counted by its status). wrk's socket errors count connection attempts too (it
    # reconnects at once, again and again while the server refuses), so they are kept apart.
    lost = sum(int(p["lost"]) for p in parts)
    if lost:
        raw.errors["connection failed before the answer"] += lost
    pending = sum(int(p["pending"]) for p in parts)
    if pending:
        raw.errors["no answer when wrk stopped"] += pending
    if data["timeout"]:
        raw.errors["timeout"] += int(data["timeout"])
    raw.socket_errors = {
        kind: int(data[kind]) for kind in ("connect", "read", "write") if data[kind]
    }
    answered = [p for p in parts if p["last_answer"] >= 0]
    sending = [p for p in parts if p["first_send"] >= 0]
    if answered:
        raw.elapsed = (max(p["last_answer"] for p in answered) - t0_us) / 1e6
    if answered and sending:
        # CPU from the first request sent to the last answer (not wrk's start-up: loading feeds).
        raw.cpu = (
            max(p["last_cpu"] for p in answered) - min(p["first_cpu"] for p in sending)
        ) / 1e6
    else:
        raw.cpu = total_cpu
    return raw


# --- phases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    server: str  # "taskrelay" or "bare"
    mode: Mode
    generator: str  # "wrk" or "httpx xN"
    duration: float
    concurrency: int
    offered_rate: float | None  # open loop only
    sent: int
    ok: int
    non_2xx: dict[str, int]
    errors: dict[str, int]
    rate: float  # 2xx answers per second
    p50_ms: float
    p99_ms: float
    generator_cpu: float  # share of one core
    server_cpu: float  # share of one core
    server_cpu_ms_per_request: float
    # Open loop: how late the generator sent requests (wrk: after they were due, or after their
    # connection came free when that was later).
    generator_lag_p99_ms: float | None
    exhausted: bool
    overloaded: bool
    # The generator used nearly all the CPU it can use (wrk's one thread, or every httpx
    # process; the open loop's wrk threads: every core): the rate measured may be the
    # generator's limit, not the server's.
    generator_bound: bool
    # Open loop: the latest request's lateness (as generator_lag_p99_ms); with wrk, also the
    # requests that came due while their connection was still waiting for an earlier answer
    # (sent late; the lateness counts in their latency, not in the generator's own lag).
    generator_lag_max_ms: float | None = None
    late_connection_busy: int = 0
    # wrk's socket errors in the open loop (connection attempts included; the requests they
    # cost are in ``errors``).
    socket_errors: dict[str, int] = field(default_factory=dict)
    unsent: int = 0  # wrk open loop: requests of the schedule never sent (``overloaded``)

    @property
    def complete(self) -> bool:
        """The phase ran as planned (did not run out of callbacks or give up)."""
        return not (self.exhausted or self.overloaded)


@dataclass(frozen=True)
class LoadOptions:
    concurrency: int
    duration: float
    warmup: float
    generator: str  # "wrk" or "httpx"
    processes: int


def run_phase(
    server: ServerProcess,
    feed: CallbackFeed,
    spec: LoadSpec,
    options: LoadOptions,
    folder: Path,
) -> Phase:
    items = feed.upcoming()
    server_cpu = server.cpu_seconds()
    if options.generator == "wrk" and spec.mode == "closed":
        raw = run_wrk(server.url, items, spec, folder)
        generator = "wrk"
        capacity = 1  # wrk's one thread
    elif options.generator == "wrk":
        raw = run_wrk_open(server.url, items, spec, folder)
        generator = f"wrk, {raw.connections} threads of 1 connection"
        capacity = min(raw.connections or 1, os.cpu_count() or 1)
    else:
        raw = run_httpx(server.url, items, spec, options.processes)
        generator = f"httpx x{options.processes}"
        capacity = options.processes
    server_cpu = server.cpu_seconds() - server_cpu
    feed.advance(raw.sent if raw.consumed is None else raw.consumed)
    ok = sum(count for code, count in raw.statuses.items() if 200 <= code < 300)
    if raw.histogram_percentiles is not None:
        p50, p99 = raw.histogram_percentiles
    else:
        p50, p99 = percentile(raw.latencies, 0.50), percentile(raw.latencies, 0.99)
    elapsed = raw.elapsed or spec.duration
    return Phase(
        server=server.name,
        mode=spec.mode,
        generator=generator,
        duration=round(elapsed, 2),
        concurrency=raw.connections or spec.concurrency,
        offered_rate=round(spec.rate, 1) if spec.mode == "open" else None,
        sent=raw.sent,
        ok=ok,
        non_2xx={str(c): n for c, n in sorted(raw.statuses.items()) if not 200 <= c < 300},
        errors=dict(raw.errors),
        rate=ok / elapsed,
        p50_ms=p50 * 1000,
        p99_ms=p99 * 1000,
        generator_cpu=raw.cpu / elapsed,
        server_cpu=server_cpu / elapsed,
        server_cpu_ms_per_request=1000 * server_cpu / ok if ok else math.nan,
        generator_lag_p99_ms=percentile(raw.lags, 0.99) * 1000 if spec.mode == "open" else None,
        exhausted=raw.exhausted,
        overloaded=raw.overloaded,
        generator_bound=raw.cpu / elapsed >= GENERATOR_SATURATED * capacity,
        generator_lag_max_ms=max(raw.lags) * 1000 if spec.mode == "open" and raw.lags else None,
        late_connection_busy=raw.late_connection_busy,
        socket_errors=dict(raw.socket_errors),
        unsent=raw.unsent,
    )


# --- TaskRelay set-up and read-back ---------------------------------------------------------------


async def _track(url: str, count: int, first_number: int) -> list[tuple[str, str]]:
    """Register ``count`` EvoLink tasks; their callback paths and provider task ids."""
    numbers = iter(range(first_number, first_number + count))
    tracked: list[tuple[str, str]] = []
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as client:

        async def register() -> None:
            for number in numbers:
                response = await client.post("/v1/tasks/track", json={"provider": PROVIDER})
                response.raise_for_status()
                path = httpx.URL(response.json()["callback_url"]).raw_path.decode()
                tracked.append((path, f"task-unified-bench-{number:07d}"))

        await asyncio.gather(*(register() for _ in range(SETUP_CONCURRENCY)))
    return tracked


def ensure_feed(server: ServerProcess, feed: CallbackFeed, needed: float) -> None:
    """Track more tasks until at least ``needed`` callbacks are waiting to be sent."""
    while feed.remaining < needed:
        count = max(MIN_TRACK_BATCH, feed.tasks_needed(needed - feed.remaining))
        feed.add_tasks(asyncio.run(_track(server.url, count, feed.tasks)))


@dataclass(frozen=True)
class Readback:
    """What the service wrote, read from its database after it stopped."""

    tasks: dict[str, int]
    receipts: dict[str, int]
    events: dict[str, int]
    deliveries: int
    status_queries: int


def read_back(database_url: str) -> Readback:
    engine = sa.create_engine(database_url)

    def grouped(connection: sa.Connection, table: str, column: str) -> dict[str, int]:
        rows = connection.execute(
            sa.text(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column} ORDER BY {column}")
        )
        return {str(value): int(count) for value, count in rows}

    try:
        with engine.connect() as connection:
            return Readback(
                tasks=grouped(connection, "task", "status"),
                receipts=grouped(connection, "callback_receipt", "outcome"),
                events=grouped(connection, "task_event", "type"),
                deliveries=int(
                    connection.execute(sa.text("SELECT COUNT(*) FROM delivery")).scalar_one()
                ),
                status_queries=int(
                    connection.execute(
                        sa.text("SELECT COALESCE(SUM(poll_count), 0) FROM task")
                    ).scalar_one()
                ),
            )
    finally:
        engine.dispose()


# --- profiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hotspot:
    frame: str
    share: float  # of all samples


ProfileMode = Literal["wall", "gil"]
# py-spy options per mode: every thread's stack, waiting ones included (where time goes), or only
# the thread holding the GIL (where Python's CPU goes; one core's worth at most).
PROFILE_FLAGS: dict[ProfileMode, list[str]] = {"wall": ["--idle"], "gil": ["--gil"]}
PROFILE_RATE_HZ = 100


@dataclass(frozen=True)
class Profile:
    mode: ProfileMode
    raw_path: str
    samples: int  # the ones counted below
    note: str  # what was left out, or how often the GIL was held
    rate_under_profiler: float
    self_time: list[Hotspot]  # the frame running when sampled
    inclusive: list[Hotspot]  # the frame anywhere on the stack
    by_package: list[Hotspot]  # self time by the running frame's top-level package


def _package(frame: str) -> str:
    """``execute (sqlalchemy/engine/base.py)`` -> ``sqlalchemy``."""
    start, end = frame.rfind("("), frame.rfind(")")
    path = frame[start + 1 : end] if 0 <= start < end else frame
    path = path.split(":")[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3" in path:
        return "stdlib"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") or path


def _idle_worker(frames: Sequence[str]) -> bool:
    """A thread-pool thread waiting for work (not serving any request)."""
    for index, frame in enumerate(frames[:-1]):
        if frame.startswith("WorkerThread.run ") and frames[index + 1].startswith("Queue.get "):
            return True
    return False


def summarise_profile(
    mode: ProfileMode, raw_path: Path, rate: float, top: int, seconds: float
) -> Profile:
    total = idle = 0
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if mode == "wall" and _idle_worker(frames):
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            anywhere[frame] += count

    def ranked(counter: Counter[str]) -> list[Hotspot]:
        return [Hotspot(frame, n / total) for frame, n in counter.most_common(top)]

    if mode == "wall":
        note = (
            f"{idle / max(1, idle + total):.0%} of samples were idle thread-pool threads "
            "waiting for work, left out"
        )
    else:
        note = f"the GIL was held in {total / (PROFILE_RATE_HZ * seconds):.0%} of sampling ticks"
    return Profile(
        mode, str(raw_path), total, note, rate, ranked(own), ranked(anywhere), ranked(packages)
    )


def profile_phase(
    server: ServerProcess,
    feed: CallbackFeed,
    options: LoadOptions,
    folder: Path,
    out: Path,
    label: str,
    mode: ProfileMode,
    top: int,
) -> tuple[Profile, Phase]:
    """A closed-loop phase with py-spy sampling the service (not one of the measured phases:
    the sampler pauses the process at every sample)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"ingest-{label}-{mode}.txt"
    argv = [
        py_spy,
        "record",
        "--pid",
        str(server.pid),
        "--duration",
        str(max(1, round(options.duration))),
        "--rate",
        str(PROFILE_RATE_HZ),
        "--format",
        "raw",
        "--nolineno",
        *PROFILE_FLAGS[mode],
        "--output",
        str(raw_path),
    ]
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # attached before the load starts
    spec = LoadSpec("closed", options.duration, options.concurrency)
    phase = run_phase(server, feed, spec, options, folder)
    _, errors = sampler.communicate(timeout=options.duration + 30)
    if sampler.returncode != 0 or not raw_path.exists():
        raise RuntimeError(f"py-spy failed ({sampler.returncode}): {errors.decode()[-2000:]}")
    return summarise_profile(mode, raw_path, phase.rate, top, phase.duration), phase


# --- one database ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseResult:
    database: str  # "sqlite" or "postgresql"
    phases: list[Phase]  # the measured ones
    readback: Readback
    tasks: int
    # Every phase against TaskRelay, warm-up and profiling included: requests sent, 2xx answers.
    sent_to_service: int
    answered_2xx: int
    profiles: list[Profile]

    def phase(self, server: str, mode: Mode) -> Phase:
        return next(p for p in self.phases if p.server == server and p.mode == mode)

    @property
    def ratio(self) -> float:
        return self.phase("taskrelay", "closed").rate / self.phase("bare", "closed").rate

    @property
    def targets(self) -> dict[str, tuple[str, bool]]:
        """Target -> (measured, met)."""
        wanted = TARGET_RATIO[self.database]
        half = self.phase("taskrelay", "open")
        unsure = any(p.generator_bound for p in self.phases if p.mode == "closed")
        # The generator's own lateness counts in the latency: it can only make p99 worse.
        lag = half.generator_lag_p99_ms
        late = lag is not None and lag > GENERATOR_LAG_WARNING_MS
        return {
            f"rate >= {wanted:.0%} of bare": (
                f"{self.ratio:.1%}" + (" (generator-bound: not measured)" if unsure else ""),
                self.ratio >= wanted and not unsure,
            ),
            f"p99 <= {TARGET_P99_MS_AT_HALF_RATE:g} ms at half rate": (
                f"{half.p99_ms:.1f} ms at {half.offered_rate or 0:,.0f}/s"
                + (f" (the generator itself was late: p99 {lag:.1f} ms, counted)" if late else "")
                + (" (half of a generator-bound rate: not measured)" if unsure else ""),
                half.p99_ms <= TARGET_P99_MS_AT_HALF_RATE and half.complete and not unsure,
            ),
        }


def measure_database(
    database: str,
    database_url: str,
    options: LoadOptions,
    window: int,
    steps: int,
    profile_dir: Path | None,
    top: int,
) -> DatabaseResult:
    with tempfile.TemporaryDirectory(prefix=f"taskrelay-ingest-{database}-") as name:
        folder = Path(name)
        feed = CallbackFeed(steps, window)
        phases: list[Phase] = []
        profiles: list[Profile] = []
        closed_spec = LoadSpec("closed", options.duration, options.concurrency)
        warmup_spec = LoadSpec("closed", options.warmup, options.concurrency)
        service = start_taskrelay(database_url, folder)
        try:
            ensure_feed(service, feed, INITIAL_CALLBACKS)
            warm = run_phase(service, feed, warmup_spec, options, folder)
            ensure_feed(service, feed, warm.rate * options.duration * FEED_MARGIN)
            closed = run_phase(service, feed, closed_spec, options, folder)
            phases.append(closed)
            half_rate = closed.rate / 2
            open_spec = LoadSpec("open", options.duration, options.concurrency, half_rate)
            ensure_feed(service, feed, half_rate * options.duration * 1.1)
            phases.append(run_phase(service, feed, open_spec, options, folder))
            extra = [warm]
            if profile_dir is not None:
                for mode in PROFILE_FLAGS:
                    ensure_feed(service, feed, closed.rate * options.duration * FEED_MARGIN)
                    profile, phase = profile_phase(
                        service, feed, options, folder, profile_dir, database, mode, top
                    )
                    profiles.append(profile)
                    extra.append(phase)
        finally:
            service.stop()
        readback = read_back(database_url)
        service_phases = [*phases, *extra]
        # The baseline gets the same requests (paths and bodies), gone round again as often as
        # needed: it only reads and drops them.
        bare = start_bare(folder)
        try:
            bare_feed = CallbackFeed(steps, window)
            bare_feed.items = feed.items
            for spec in (warmup_spec, closed_spec, open_spec):
                bare_feed.position = 0
                phase = run_phase(
                    bare, bare_feed, dataclasses.replace(spec, repeat=True), options, folder
                )
                if spec is not warmup_spec:
                    phases.append(phase)
        finally:
            bare.stop()
        return DatabaseResult(
            database,
            phases,
            readback,
            feed.tasks,
            sent_to_service=sum(p.sent for p in service_phases),
            answered_2xx=sum(p.ok for p in service_phases),
            profiles=profiles,
        )


# --- PostgreSQL -----------------------------------------------------------------------------------


def psycopg_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextlib.contextmanager
def fresh_postgres(admin_url: str, prefix: str = "taskrelay_bench_") -> Iterator[str]:
    """A new, migrated database on the server ``admin_url`` names; dropped afterwards."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        try:
            migrate(url)
            yield url
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


# --- reporting ------------------------------------------------------------------------------------

DATABASE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _ms(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f} ms"


def _lag(phase: Phase) -> str:
    return f"{_ms(phase.generator_lag_p99_ms)} / {_ms(phase.generator_lag_max_ms)}"


def _failures(result: DatabaseResult, server: str) -> str:
    phases = [p for p in result.phases if p.server == server]
    non_2xx = sum(sum(p.non_2xx.values()) for p in phases)
    unanswered = sum(sum(p.errors.values()) for p in phases)
    return f"{non_2xx} / {unanswered}"


def _problems(phase: Phase) -> list[str]:
    notes = []
    if phase.generator_bound:
        notes.append(
            f"the load generator was saturated ({phase.generator_cpu:.0%} of a core): the rate "
            "is at least partly its limit (use wrk, or more --processes)"
        )
    if phase.non_2xx:
        notes.append(f"non-2xx answers {phase.non_2xx}")
    if phase.errors:
        notes.append(f"no answer {phase.errors}")
    if phase.socket_errors:
        notes.append(f"wrk's socket errors (reconnection attempts included) {phase.socket_errors}")
    if phase.exhausted:
        notes.append("ran out of callbacks to send")
    if phase.overloaded:
        if phase.generator.startswith("wrk"):
            notes.append(
                f"{phase.unsent:,} requests of the schedule were not sent: they would have gone "
                f"out over {OPEN_LOOP_GIVE_UP_SECONDS:g} s late, or their connection was still "
                "waiting for an answer when wrk stopped"
            )
        else:
            notes.append(f"gave up with over {OPEN_LOOP_MAX_IN_FLIGHT} requests waiting")
    lag = phase.generator_lag_p99_ms
    if lag is not None and lag > GENERATOR_LAG_WARNING_MS:
        notes.append(
            f"the generator itself sent late (p99 {lag:.1f} ms, max "
            f"{_ms(phase.generator_lag_max_ms)}), which is counted in its latency"
        )
    if phase.late_connection_busy:
        notes.append(
            f"{phase.late_connection_busy:,} of {phase.sent:,} requests came due while their "
            f"connection ({phase.concurrency} in all) was still waiting for an earlier answer: "
            "sent late, the lateness counted in their latency"
        )
    return notes


def markdown(results: list[DatabaseResult], run: dict[str, Any]) -> str:
    lines = [
        f"Closed loop: {run['concurrency']} connections for {run['duration']:g} s after a "
        f"{run['warmup']:g} s warm-up ({run['closed_loop_generator']}); open loop: half of "
        f"TaskRelay's closed-loop rate for {run['duration']:g} s, request i due at "
        f"start + i / rate ({run['open_loop_generator']}; latency from when each request was "
        f"due). uvicorn loop/http: {run['uvicorn']}. {run['cores']} cores shared "
        f"by server, database and load generator; 1-minute load average before the run: "
        f"{run['load_average_before']:g}. TaskRelay at {run['revision']}.",
    ]
    if run["settings_passed"]:
        lines.append(
            f"Settings passed to TaskRelay from the environment: {run['settings_passed']}."
        )
    for result in results:
        bare_closed, ours_closed = (
            result.phase("bare", "closed"),
            result.phase("taskrelay", "closed"),
        )
        bare_open, ours_open = result.phase("bare", "open"), result.phase("taskrelay", "open")
        rate = ours_open.offered_rate
        lines += [
            "",
            f"#### {DATABASE_NAMES[result.database]}",
            "",
            "| | bare Starlette | TaskRelay | TaskRelay / bare |",
            "|---|---:|---:|---:|",
            f"| max rate, closed loop (2xx/s) | {bare_closed.rate:,.0f} | {ours_closed.rate:,.0f} "
            f"| {result.ratio:.1%} |",
            f"| p50 / p99 at max | {_ms(bare_closed.p50_ms)} / {_ms(bare_closed.p99_ms)} | "
            f"{_ms(ours_closed.p50_ms)} / {_ms(ours_closed.p99_ms)} | |",
            f"| p50 / p99 at {rate:,.0f}/s (half TaskRelay's max), open loop, "
            f"{ours_open.concurrency} connections | "
            f"{_ms(bare_open.p50_ms)} / {_ms(bare_open.p99_ms)} | "
            f"{_ms(ours_open.p50_ms)} / {_ms(ours_open.p99_ms)} | |",
            f"| server CPU at max (share of a core; ms per request) | "
            f"{bare_closed.server_cpu:.0%}; {bare_closed.server_cpu_ms_per_request:.2f} | "
            f"{ours_closed.server_cpu:.0%}; {ours_closed.server_cpu_ms_per_request:.2f} | |",
            f"| load generator CPU at max / at half rate | {bare_closed.generator_cpu:.0%} / "
            f"{bare_open.generator_cpu:.0%} | {ours_closed.generator_cpu:.0%} / "
            f"{ours_open.generator_cpu:.0%} | |",
            f"| open loop: generator sent late, p99 / max | {_lag(bare_open)} | "
            f"{_lag(ours_open)} | |",
            f"| non-2xx answers / no answer (all measured phases) | {_failures(result, 'bare')} "
            f"| {_failures(result, 'taskrelay')} | |",
        ]
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for target, (measured, met) in result.targets.items():
            lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
        lines += readback_markdown(result)
        for phase in result.phases:
            problems = _problems(phase)
            if problems:
                lines.append(f"- {phase.server}, {phase.mode} loop: {'; '.join(problems)}")
        for profile in result.profiles:
            lines += profile_markdown(profile)
    return "\n".join(lines)


def readback_markdown(result: DatabaseResult) -> list[str]:
    rb = result.readback
    receipts = sum(rb.receipts.values())
    applied = rb.receipts.get("applied", 0)
    changes = sum(n for kind, n in rb.events.items() if kind != "task.submitted")
    # Requests cut off when a phase ended may have been committed without their answer arriving.
    consistent = result.answered_2xx <= receipts <= result.sent_to_service and applied == changes
    return [
        "",
        f"Read back from the database after the run (every phase against TaskRelay, warm-up and "
        f"profiling included): {result.sent_to_service:,} callbacks sent, "
        f"{result.answered_2xx:,} answered 2xx; {receipts:,} receipts {rb.receipts}; events "
        f"{rb.events}; {result.tasks:,} tasks {rb.tasks}; {rb.deliveries} deliveries; "
        f"{rb.status_queries} status queries. "
        + (
            "Consistent: every 2xx has its receipt, every applied change its event."
            if consistent
            else "**Inconsistent**: 2xx answers, receipts and events do not match."
        ),
    ]


def _short(frame: str, width: int = 90) -> str:
    return frame if len(frame) <= width else frame[: width - 3] + "..."


def profile_markdown(profile: Profile) -> list[str]:
    what = {
        "wall": "every thread, waiting ones included: where the time goes",
        "gil": "only the thread holding the GIL: where Python's CPU goes",
    }[profile.mode]
    lines = [
        "",
        f"Profile `{profile.mode}` (py-spy, {what}; {profile.samples} samples ("
        f"{profile.note}), {profile.rate_under_profiler:,.0f} callbacks/s under the sampler; "
        f"stacks in {profile.raw_path}):",
    ]
    for title, spots in (
        ("running frame (self)", profile.self_time),
        ("on the stack (inclusive)", profile.inclusive),
        ("package of the running frame", profile.by_package),
    ):
        lines += ["", f"| {title} | share |", "|---|---:|"]
        lines += [f"| `{_short(spot.frame)}` | {spot.share:.1%} |" for spot in spots]
    return lines


def as_json(results: list[DatabaseResult], run: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": run,
        "databases": [
            {
                "database": r.database,
                "ratio": r.ratio,
                "targets": {k: {"measured": m, "met": ok} for k, (m, ok) in r.targets.items()},
                "phases": [dataclasses.asdict(p) for p in r.phases],
                "readback": dataclasses.asdict(r.readback),
                "tasks": r.tasks,
                "sent_to_service": r.sent_to_service,
                "answered_2xx": r.answered_2xx,
                "profiles": [dataclasses.asdict(profile) for profile in r.profiles],
            }
            for r in results
        ],
    }


# --- main -----------------------------------------------------------------------------------------


def service_revision() -> str:
    """The commit measured, and whether the service's code differs from it (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "migrations"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (service/ or migrations/ modified)" if changed else commit


def uvicorn_implementation() -> str:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop}/{http} (uvicorn's auto choice)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Callback ingestion: TaskRelay (taskrelay serve) against a bare Starlette "
        "endpoint on the same uvicorn settings, on SQLite and (when configured) PostgreSQL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="closed-loop connections (open loop: pool)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="closed-loop warm-up, seconds")
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help=f"tasks in flight at once: a task's callbacks are this many requests apart; "
        f"0: {WINDOW_PER_CONNECTION} per connection, at least {MIN_WINDOW}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="callbacks per task: progress updates, then completed (100: progress 1..99)",
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="load generator of both loops (auto: wrk when installed; httpx: Python, which "
        "cannot keep an open loop on time at more than a few hundred requests/s)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="httpx generator processes per phase"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(PG_ENV),
        help=f"a PostgreSQL server to run on too (default: ${PG_ENV}); a fresh database is "
        "created on it and dropped afterwards",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="add two closed-loop phases per database under py-spy (all threads, then the "
        "GIL holder) and summarise them; raw stacks go to DIR",
    )
    parser.add_argument("--top", type=int, default=15, help="hot spots listed per profile")
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration < 1 or args.warmup < 1 or args.processes < 1:
        parser.error("--concurrency and --processes must be positive; --duration, --warmup >= 1")
    if not 2 <= args.steps <= 100:
        parser.error("--steps must be between 2 and 100")
    window = args.window or max(MIN_WINDOW, WINDOW_PER_CONNECTION * args.concurrency)
    if window < args.concurrency:
        parser.error("--window must be at least --concurrency")
    if args.no_sqlite and not args.database_url:
        parser.error("--no-sqlite needs --database-url (or $TASKRELAY_TEST_DATABASE_URL)")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "httpx"
    elif generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --generator httpx")
    options = LoadOptions(args.concurrency, args.duration, args.warmup, generator, args.processes)

    load_before = os.getloadavg()[0]
    revision = service_revision()
    started = time.perf_counter()
    results = []
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="taskrelay-ingest-db-") as folder:
            url = f"sqlite:///{Path(folder) / 'taskrelay.db'}"
            results.append(
                measure_database("sqlite", url, options, window, args.steps, args.profile, args.top)
            )
    if args.database_url:
        with fresh_postgres(psycopg_url(args.database_url)) as url:
            results.append(
                measure_database(
                    "postgresql", url, options, window, args.steps, args.profile, args.top
                )
            )
    wall = time.perf_counter() - started
    run = {
        "concurrency": args.concurrency,
        "duration": args.duration,
        "warmup": args.warmup,
        "closed_loop_generator": "wrk, 1 thread"
        if generator == "wrk"
        else f"httpx, {args.processes} process(es)",
        "open_loop_generator": (
            f"wrk, one thread per connection, rate x {OPEN_LOOP_SLOT_SECONDS:g} s connections "
            f"({OPEN_LOOP_MIN_CONNECTIONS} to {OPEN_LOOP_MAX_CONNECTIONS}), so that each "
            f"connection's requests are due {OPEN_LOOP_SLOT_SECONDS * 1000:g} ms apart"
        )
        if generator == "wrk"
        else f"async httpx, {args.processes} process(es)",
        "uvicorn": uvicorn_implementation(),
        "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "revision": revision,
        "settings_passed": passed_settings(),
        "wall_seconds": round(wall, 1),
    }
    if args.json:
        print(json.dumps(as_json(results, run), indent=2))
    else:
        print(markdown(results, run))
        print(f"\n(wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
