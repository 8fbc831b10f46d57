"""Benchmark: end-to-end latency (issue 6, benchmark 2), against a bare HTTP hop in the same run.

What is timed: a provider's callback is due at TaskRelay -> TaskRelay verifies, commits the task
change with its event and the delivery it owes, answers, and its dispatcher signs and POSTs the
event -> the event reaches a local subscriber. Latency runs from when the callback was due to be
sent (open loop: a fixed rate, so a server, or a generator, that falls behind shows in the numbers)
to when the subscriber's handler saw the event, both read from ``time.monotonic()``
(CLOCK_MONOTONIC, one clock for every process of a Linux machine).

Set-up: a real ``taskrelay serve`` (default settings, scheduler and dispatcher on) on a SQLite
file in a temporary folder, with ``TASKRELAY_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8`` so that it may
deliver to loopback; the subscriber, ``bench/subscriber_app.py``, in a process of its own (it
notes each request's arrival and answers 200 at once, verifying nothing); EvoLink tasks
registered through ``POST /v1/tasks/track``, then one subscription through
``POST /v1/subscriptions`` (after the tracking, so the ``task.submitted`` events owe nothing).

Each task gets exactly one callback, EvoLink's ``completed``, so each callback makes one
``task.succeeded`` event and one delivery. Progress events are left out on purpose: TaskRelay holds
a progress delivery back for ``PROGRESS_DELAY`` (1 s, ``service/outbox.py``) so that newer events
can supersede it (coalescing), so their latency is that delay by design, not a cost to measure.

The baseline: the same generator, at the same rate, posts the same callbacks (paths and bodies)
straight to the subscriber: one bare HTTP hop on the same machine. The ratio of the two latencies
is what TaskRelay adds on top of one hop.

After the run, the subscriber's records are checked against what was sent (every 2xx callback
that changed its task must yield exactly one event, counted by ``webhook-id``: lost and duplicated
deliveries are reported) and TaskRelay's database is read back (events, deliveries by status,
delivery attempts).

Run from the repository root: ``.venv/bin/python bench/e2e.py`` (``--help`` for options; about a
minute). ``TASKRELAY_*`` settings in the environment are passed on to the service, as
``bench/ingest.py`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.ingest import (
    API_TOKEN,
    JSON_HEADERS,
    PROFILE_FLAGS,
    PROFILE_RATE_HZ,
    PROVIDER,
    REPO_ROOT,
    REQUEST_TIMEOUT_SECONDS,
    Profile,
    ProfileMode,
    ServerProcess,
    _connections,
    evolink_body,
    free_port,
    passed_settings,
    percentile,
    profile_markdown,
    read_back,
    run_async,
    service_environment,
    service_revision,
    summarise_profile,
    uvicorn_implementation,
)

SUBSCRIBER_APP = Path(__file__).resolve().parent / "subscriber_app.py"
ALLOWED_NETWORKS = "127.0.0.0/8"
HOOK_PATH = "/hooks/taskrelay"
SETUP_CONCURRENCY = 8
TRACK_ATTEMPTS = 20
# Start-up can take a while when the machine is shared (bench/ingest.py waits 60 s at a time).
READY_SECONDS = 180.0
# The targets, at 300 callbacks/s on SQLite.
TARGET_RATE = 300.0
TARGET_P50_MS = 10.0
TARGET_P99_MS = 100.0
# The open loop stops sending (and says so) when this many callbacks wait for an answer.
MAX_IN_FLIGHT = 2000
# After the last callback: how long to wait for the last events, at most, and without any new one.
DRAIN_SECONDS = 300.0
DRAIN_QUIET_SECONDS = 20.0
DRAIN_POLL_SECONDS = 0.25
# The generator's own lag (sending later than due) above which its results are flagged.
GENERATOR_LAG_WARNING_MS = 5.0


def code_fingerprint() -> str:
    """The service code measured, when it changes faster than commits: a hash of every file
    under service/ and migrations/, and the newest one's modification time (UTC)."""
    digest = hashlib.sha256()
    newest = 0.0
    for folder in ("service", "migrations"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
            newest = max(newest, path.stat().st_mtime)
    changed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(newest))
    return f"code {digest.hexdigest()[:12]}, last changed {changed} UTC"


# --- processes ------------------------------------------------------------------------------------


def wait_ready(server: ServerProcess, probe: Callable[[httpx.Client], bool]) -> None:
    """``server.wait_ready``, given longer on a busy machine; the process is stopped if it
    never becomes ready (so nothing is left running)."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            server.wait_ready(probe)
            return
        except RuntimeError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise


def start_subscriber(folder: Path) -> ServerProcess:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
    server = ServerProcess(
        "subscriber", [sys.executable, str(SUBSCRIBER_APP), "--port", str(port)], env, port, folder
    )
    wait_ready(server, lambda client: client.get("/_health").status_code == 200)
    return server


def start_service(
    database_url: str,
    folder: Path,
    extra: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> ServerProcess:
    """``taskrelay serve`` as ``bench/ingest.py`` starts it, allowed to deliver to loopback."""
    port = free_port()
    env = service_environment(database_url, folder, port)
    env["TASKRELAY_WEBHOOK_ALLOWED_NETWORKS"] = ALLOWED_NETWORKS
    env.update(extra or {})
    server = ServerProcess(
        "taskrelay",
        [*(argv or [sys.executable, "-m", "service.cli"]), "serve", "--port", str(port)],
        env,
        port,
        folder,
    )
    wait_ready(server, lambda client: client.get("/readyz").status_code == 200)
    return server


def api_client(service: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=service.url,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )


def subscribe(service: ServerProcess, subscriber: ServerProcess) -> dict[str, Any]:
    response = httpx.post(
        f"{service.url}/v1/subscriptions",
        json={"url": subscriber.url + HOOK_PATH, "description": "benchmark subscriber"},
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    if response.status_code != 201:
        raise RuntimeError(f"subscription refused: {response.status_code} {response.text}")
    subscription: dict[str, Any] = response.json()
    return subscription


def subscriber_stats(subscriber: ServerProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{subscriber.url}/_stats", timeout=30.0).json()
    return stats


def subscriber_records(subscriber: ServerProcess, since: int) -> list[list[Any]]:
    answer = httpx.get(f"{subscriber.url}/_records", params={"since": since}, timeout=60.0)
    records: list[list[Any]] = answer.json()["records"]
    return records


# --- tasks and their callbacks --------------------------------------------------------------------


@dataclass(frozen=True)
class TrackedTask:
    task_id: str
    path: str  # /callbacks/evolink/<signed token>
    provider_task_id: str


async def track(client: httpx.AsyncClient, provider_task_id: str) -> TrackedTask:
    """Register one EvoLink task; a 429 (the management API's per-client rate limit) is waited
    out as its Retry-After says."""
    for _ in range(TRACK_ATTEMPTS):
        response = await client.post("/v1/tasks/track", json={"provider": PROVIDER})
        if response.status_code != 429:
            break
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    response.raise_for_status()
    task = response.json()
    path = httpx.URL(task["callback_url"]).raw_path.decode()
    return TrackedTask(task["id"], path, provider_task_id)


async def track_many(service: ServerProcess, count: int, prefix: str) -> list[TrackedTask]:
    numbers = iter(range(count))
    tracked: list[TrackedTask] = []
    async with api_client(service) as client:

        async def register() -> None:
            for number in numbers:
                tracked.append(await track(client, f"task-unified-{prefix}-{number:07d}"))

        await asyncio.gather(*(register() for _ in range(SETUP_CONCURRENCY)))
    return tracked


@dataclass(frozen=True)
class Send:
    path: str
    body: bytes
    key: str  # what the subscriber will report: the task id (an event), the provider's id (bare)


def completed_callback(task: TrackedTask) -> bytes:
    return evolink_body(task.provider_task_id, 0, 1)


# --- the open-loop generator ----------------------------------------------------------------------


@dataclass
class Sent:
    key: str
    due: float  # monotonic seconds
    answered: float | None = None
    status: int | None = None
    outcome: str | None = None  # TaskRelay's "outcome" (applied, unchanged, terminal, ...)
    error: str | None = None


@dataclass
class OpenLoop:
    sent: list[Sent] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # seconds late, per request
    cpu: float = 0.0
    elapsed: float = 0.0
    overloaded: bool = False


async def open_loop(url: str, sends: Sequence[Send], rate: float, connections: int) -> OpenLoop:
    """POST each of ``sends`` at its due time, ``rate`` per second, over ``connections``
    keep-alive connections (waiting for a free one counts: latency runs from the due time)."""
    result = OpenLoop()
    async with _connections(url, connections) as clients:
        idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in clients:
            idle.put_nowait(client)

        async def post(item: Send, record: Sent) -> None:
            client = await idle.get()
            try:
                response = await client.post(item.path, content=item.body, headers=JSON_HEADERS)
            except httpx.HTTPError as exc:
                record.error = type(exc).__name__
                return
            finally:
                idle.put_nowait(client)
            record.answered = time.monotonic()
            record.status = response.status_code
            if response.headers.get("content-type", "").startswith("application/json"):
                answer = response.json()
                if isinstance(answer, dict):
                    record.outcome = answer.get("outcome")

        cpu = time.process_time()
        start = time.monotonic() + 0.05
        in_flight: set[asyncio.Task[None]] = set()
        for index, item in enumerate(sends):
            due = start + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            result.lags.append(max(0.0, time.monotonic() - due))
            record = Sent(item.key, due)
            result.sent.append(record)
            task = asyncio.create_task(post(item, record))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if len(in_flight) > MAX_IN_FLIGHT:
                result.overloaded = True
                break
        if in_flight:
            await asyncio.wait(in_flight)
        result.elapsed = time.monotonic() - start
        result.cpu = time.process_time() - cpu
    return result


# --- one phase: TaskRelay or the bare hop ---------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        def ms(q: float) -> float:
            return percentile(seconds, q) * 1000

        return cls(
            len(seconds), ms(0.50), ms(0.90), ms(0.99), max(seconds, default=math.nan) * 1000
        )


@dataclass(frozen=True)
class PhaseResult:
    name: str
    rate: float  # offered, per second
    sent: int
    answered_2xx: int
    non_2xx: dict[str, int]
    no_answer: dict[str, int]
    expected: int  # events (or arrivals) owed to the subscriber
    received: int  # distinct ones that arrived
    missing: int
    duplicates: int  # arrivals beyond the first of one event (same webhook-id)
    unexpected: dict[str, int]  # arrivals of other types or tasks
    latency: Latency  # due -> subscriber, measured window only
    answer_latency: Latency | None  # due -> the callback's 2xx (TaskRelay only)
    after_answer: Latency | None  # the callback's 2xx -> subscriber (may be negative)
    server_cpu: float  # share of one core during the sending, TaskRelay or subscriber
    subscriber_cpu: float
    generator_cpu: float
    generator_lag_p99_ms: float
    overloaded: bool
    drained_seconds: float  # from the last callback's answer until the last event arrived


def wait_for_arrivals(
    subscriber: ServerProcess, kind: str, wanted: int, base: Counter[str]
) -> float:
    """Wait until the subscriber has ``wanted`` more arrivals of ``kind`` than ``base`` (bounded,
    and given up after a quiet spell); returns the seconds waited."""
    started = last_change = time.monotonic()
    seen = -1
    while True:
        count = int(subscriber_stats(subscriber)["types"].get(kind, 0)) - base.get(kind, 0)
        now = time.monotonic()
        if count >= wanted:
            return now - started
        if count != seen:
            seen, last_change = count, now
        if now - started > DRAIN_SECONDS or now - last_change > DRAIN_QUIET_SECONDS:
            return now - started
        time.sleep(DRAIN_POLL_SECONDS)


def run_phase(
    name: str,
    target: ServerProcess,
    subscriber: ServerProcess,
    sends: Sequence[Send],
    rate: float,
    connections: int,
    warmup: float,
    expected_kind: str,
) -> tuple[PhaseResult, list[list[Any]]]:
    """Send ``sends`` to ``target`` at ``rate``; match what reached the subscriber."""
    before = subscriber_stats(subscriber)
    base_types: Counter[str] = Counter(before["types"])
    since = int(before["total"])
    cpu_target, cpu_subscriber = target.cpu_seconds(), subscriber.cpu_seconds()
    load = run_async(open_loop(target.url, sends, rate, connections))
    cpu_target = target.cpu_seconds() - cpu_target
    cpu_subscriber = subscriber.cpu_seconds() - cpu_subscriber
    ok = [s for s in load.sent if s.status is not None and 200 <= s.status < 300]
    # A callback owes an event when it changed its task; the bare hop owes an arrival per 2xx.
    owed = [s for s in ok if s.outcome in (None, "applied")]
    drained = wait_for_arrivals(subscriber, expected_kind, len(owed), base_types)
    records = subscriber_records(subscriber, since)

    due_of = {s.key: s for s in owed}
    first: dict[str, float] = {}
    per_event: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for received, webhook_id, kind, key in records:
        if kind != expected_kind or key not in due_of:
            unexpected[kind or "unreadable"] += 1
            continue
        per_event[webhook_id or key] += 1
        if key in first:
            # Two events for one callback (distinct webhook-ids) also count as a duplicate.
            continue
        first[key] = received
    measured_from = min((s.due for s in load.sent), default=0.0) + warmup
    latencies = [first[s.key] - s.due for s in owed if s.key in first and s.due >= measured_from]
    answered = [s.answered - s.due for s in ok if s.answered is not None and s.due >= measured_from]
    after = [
        first[s.key] - s.answered
        for s in owed
        if s.key in first and s.answered is not None and s.due >= measured_from
    ]
    is_service = name == "taskrelay"
    last_answer = max((s.answered or 0.0) for s in ok) if ok else 0.0
    last_arrival = max(first.values(), default=last_answer)
    elapsed = load.elapsed or 1.0
    result = PhaseResult(
        name=name,
        rate=rate,
        sent=len(load.sent),
        answered_2xx=len(ok),
        non_2xx=dict(
            Counter(str(s.status) for s in load.sent if s.status and not 200 <= s.status < 300)
        ),
        no_answer=dict(Counter(s.error for s in load.sent if s.error)),
        expected=len(owed),
        received=len(first),
        missing=len(owed) - len(first),
        duplicates=sum(n - 1 for n in per_event.values()) + (len(per_event) - len(first)),
        unexpected=dict(unexpected),
        latency=Latency.of(latencies),
        answer_latency=Latency.of(answered) if is_service else None,
        after_answer=Latency.of(after) if is_service else None,
        server_cpu=cpu_target / elapsed,
        subscriber_cpu=cpu_subscriber / elapsed,
        generator_cpu=load.cpu / elapsed,
        generator_lag_p99_ms=percentile(load.lags, 0.99) * 1000,
        overloaded=load.overloaded,
        drained_seconds=max(0.0, last_arrival - last_answer) if ok else drained,
    )
    return result, records


# --- profiling ------------------------------------------------------------------------------------


class Sampler:
    """py-spy recording a process for ``seconds`` (``gil``: where Python's CPU goes; ``wall``:
    every thread, waiting ones included), summarised as bench/ingest.py does."""

    def __init__(self, pid: int, seconds: float, out: Path, mode: ProfileMode) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        out.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.seconds = seconds
        self.raw_path = out / f"e2e-{mode}.txt"
        argv = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(PROFILE_RATE_HZ),
            "--format",
            "raw",
            "--nolineno",
            *PROFILE_FLAGS[mode],
            "--output",
            str(self.raw_path),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attached before the load starts

    def summary(self, rate: float, top: int) -> Profile:
        _, errors = self.process.communicate(timeout=self.seconds + 60)
        if self.process.returncode != 0 or not self.raw_path.exists():
            raise RuntimeError(
                f"py-spy failed ({self.process.returncode}): {errors.decode()[-2000:]}"
            )
        return summarise_profile(self.mode, self.raw_path, rate, top, self.seconds)


# --- reading TaskRelay's database back -----------------------------------------------------------


def read_deliveries(database_url: str) -> dict[str, Any]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            statuses = {
                str(status): int(count)
                for status, count in connection.execute(
                    sa.text("SELECT status, COUNT(*) FROM delivery GROUP BY status")
                )
            }
            attempts = connection.execute(
                sa.text(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status_code BETWEEN 200 AND 299 "
                    "THEN 0 ELSE 1 END), 0) FROM delivery_attempt"
                )
            ).one()
            return {
                "deliveries": statuses,
                "attempts": int(attempts[0]),
                "failed_attempts": int(attempts[1]),
            }
    finally:
        engine.dispose()


# --- reporting ------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.1f} ms"


def _ratio(ours: float, bare: float) -> str:
    if math.isnan(ours) or math.isnan(bare) or bare <= 0:
        return "n/a"
    return f"{ours / bare:,.1f}x"


def problems(phase: PhaseResult) -> list[str]:
    notes = []
    if phase.non_2xx:
        notes.append(f"non-2xx answers {phase.non_2xx}")
    if phase.no_answer:
        notes.append(f"no answer {phase.no_answer}")
    if phase.missing:
        notes.append(
            f"**{phase.missing} expected events had not arrived when the wait ended** (the "
            "percentiles above cover only those that did)"
        )
    if phase.duplicates:
        notes.append(f"{phase.duplicates} duplicate arrivals")
    if phase.unexpected:
        notes.append(f"unexpected arrivals {phase.unexpected}")
    if phase.overloaded:
        notes.append(f"the generator gave up with over {MAX_IN_FLIGHT} callbacks waiting")
    if phase.generator_lag_p99_ms > GENERATOR_LAG_WARNING_MS:
        notes.append(
            f"the generator itself sent late (p99 {phase.generator_lag_p99_ms:.1f} ms), which "
            "is counted in the latency"
        )
    return notes


def markdown(service: PhaseResult, bare: PhaseResult, run: dict[str, Any]) -> str:
    s, b = service.latency, bare.latency
    lines = [
        f"{run['tasks']:,} EvoLink tasks, one `completed` callback each, open loop at "
        f"{run['rate']:g}/s ({run['duration']:g} s measured after a {run['warmup']:g} s warm-up; "
        f"latency from when each callback was due to when the subscriber saw it). SQLite, "
        f"uvicorn {run['uvicorn']}. {run['cores']} cores shared by TaskRelay, subscriber and "
        f"generator (and anything else running); 1-minute load average before / after: "
        f"{run['load_average_before']:g} / {run['load_average_after']:g}. TaskRelay at "
        f"{run['revision']}.",
    ]
    if run["settings_passed"]:
        lines.append(
            f"Settings passed to TaskRelay from the environment: {run['settings_passed']}."
        )
    lines += [
        "",
        "| | bare hop (generator -> subscriber) | TaskRelay (callback -> event at subscriber) "
        "| TaskRelay / bare |",
        "|---|---:|---:|---:|",
    ]
    for label, attr in (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("max", "max_ms")):
        ours, theirs = getattr(s, attr), getattr(b, attr)
        lines.append(f"| {label} | {_ms(theirs)} | {_ms(ours)} | {_ratio(ours, theirs)} |")
    lines += [
        f"| arrived / expected (whole run) | {bare.received:,} / {bare.expected:,} | "
        f"{service.received:,} / {service.expected:,} | |",
        f"| duplicates; unexpected arrivals | {bare.duplicates}; {sum(bare.unexpected.values())} "
        f"| {service.duplicates}; {sum(service.unexpected.values())} | |",
        f"| non-2xx / no answer | {sum(bare.non_2xx.values())} / {sum(bare.no_answer.values())} | "
        f"{sum(service.non_2xx.values())} / {sum(service.no_answer.values())} | |",
        f"| CPU, share of a core: server / subscriber / generator | "
        f"- / {bare.subscriber_cpu:.0%} / {bare.generator_cpu:.0%} | "
        f"{service.server_cpu:.0%} / {service.subscriber_cpu:.0%} / {service.generator_cpu:.0%} "
        "| |",
        f"| generator's own lag p99 | {_ms(bare.generator_lag_p99_ms)} | "
        f"{_ms(service.generator_lag_p99_ms)} | |",
    ]
    if service.answer_latency and service.after_answer:
        a, d = service.answer_latency, service.after_answer
        lines += [
            "",
            "Where TaskRelay's time goes (measured window):",
            "",
            "| | p50 | p90 | p99 | max |",
            "|---|---:|---:|---:|---:|",
            f"| callback due -> its 2xx answer | {_ms(a.p50_ms)} | {_ms(a.p90_ms)} | "
            f"{_ms(a.p99_ms)} | {_ms(a.max_ms)} |",
            f"| 2xx answer -> event at the subscriber | {_ms(d.p50_ms)} | {_ms(d.p90_ms)} | "
            f"{_ms(d.p99_ms)} | {_ms(d.max_ms)} |",
        ]
    at_target_rate = run["rate"] >= TARGET_RATE
    lines += [
        "",
        "| target (issue 6, at 300 callbacks/s on SQLite) | measured | met |",
        "|---|---:|---|",
    ]
    complete = not service.missing and not service.overloaded
    for label, value, limit in (
        (f"p50 <= {TARGET_P50_MS:g} ms", s.p50_ms, TARGET_P50_MS),
        (f"p99 <= {TARGET_P99_MS:g} ms", s.p99_ms, TARGET_P99_MS),
    ):
        met = value <= limit and complete
        verdict = ("yes" if met else "**no**") if at_target_rate else "n/a (run below 300/s)"
        lines.append(f"| {label} | {_ms(value)} at {run['rate']:g}/s | {verdict} |")
    db = run["readback"]
    lines += [
        "",
        f"Read back from TaskRelay's database: events {db['events']}; deliveries "
        f"{db['deliveries']}; {db['attempts']:,} delivery attempts ({db['failed_attempts']} "
        f"failed); callback receipts {db['receipts']}; {db['status_queries']} status queries. "
        f"Last event arrived {service.drained_seconds:.2f} s after the last callback's answer. "
        + (
            "Consistent: one `task.succeeded` event and one delivery per callback that changed "
            "its task."
            if db["events"].get("task.succeeded", 0)
            == sum(db["deliveries"].values())
            == service.expected
            else "**Inconsistent**: events, deliveries and callbacks that changed a task differ."
        ),
    ]
    for phase in (service, bare):
        notes = problems(phase)
        if notes:
            lines.append(f"- {phase.name}: {'; '.join(notes)}")
    pending = db["deliveries"].get("pending", 0)
    if service.missing:
        lines.append(
            f"- Of the events that did not arrive, {pending} deliveries were still pending in "
            "TaskRelay's database when it stopped (late: TaskRelay had not sent them yet); "
            f"{max(0, service.missing - pending)} are unaccounted for."
        )
    if not any(problems(p) for p in (service, bare)):
        lines.append("- Nothing lost, nothing duplicated, every callback answered 2xx.")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="End-to-end latency: callback received by TaskRelay -> event delivered to a "
        "local subscriber, against a bare HTTP hop to the same subscriber.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="callbacks per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds sent first and left out of the stats"
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="the generator's keep-alive connections"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record TaskRelay with py-spy during the sending (raw stacks go to DIR) and "
        "summarise where its time goes; the sampler slows it, so latencies are not comparable",
    )
    parser.add_argument(
        "--profile-mode",
        choices=tuple(PROFILE_FLAGS),
        default="gil",
        help="gil: the thread holding the GIL (CPU); wall: every thread, waiting ones included",
    )
    parser.add_argument("--top", type=int, default=15, help="hot spots listed per profile")
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("--rate, --connections must be positive; --duration >= 1; --warmup >= 0")

    load_before = os.getloadavg()[0]
    revision = f"{service_revision()}; {code_fingerprint()}"
    started = time.monotonic()
    profile: Profile | None = None
    count = math.ceil(args.rate * (args.duration + args.warmup))
    with tempfile.TemporaryDirectory(prefix="taskrelay-e2e-") as name:
        folder = Path(name)
        database_url = f"sqlite:///{folder / 'taskrelay.db'}"
        subscriber = start_subscriber(folder)
        try:
            # The set-up registers thousands of tasks as fast as it can: the management API's
            # per-client rate limit is off unless the environment sets it (callbacks, the thing
            # measured, are never rate-limited).
            limit = {"TASKRELAY_RATE_LIMIT": os.environ.get("TASKRELAY_RATE_LIMIT", "0")}
            service = start_service(database_url, folder, limit)
            try:
                tasks = run_async(track_many(service, count, "e2e"))
                subscribe(service, subscriber)
                sends = [Send(t.path, completed_callback(t), t.task_id) for t in tasks]
                sampler = None
                if args.profile is not None:
                    seconds = args.warmup + args.duration
                    sampler = Sampler(service.pid, seconds, args.profile, args.profile_mode)
                ours, _ = run_phase(
                    "taskrelay",
                    service,
                    subscriber,
                    sends,
                    args.rate,
                    args.connections,
                    args.warmup,
                    "task.succeeded",
                )
                if sampler is not None:
                    profile = sampler.summary(args.rate, args.top)
            finally:
                service.stop()
            readback = read_back(database_url)
            deliveries = read_deliveries(database_url)
            # The same callbacks, straight to the subscriber (which reads EvoLink's "id").
            direct = [Send(t.path, completed_callback(t), t.provider_task_id) for t in tasks]
            bare, _ = run_phase(
                "bare",
                subscriber,
                subscriber,
                direct,
                args.rate,
                args.connections,
                args.warmup,
                "completed",
            )
        finally:
            subscriber.stop()
    run = {
        "tasks": count,
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "connections": args.connections,
        "uvicorn": uvicorn_implementation(),
        "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "revision": revision,
        "settings_passed": passed_settings(),
        "readback": {
            "events": readback.events,
            "receipts": readback.receipts,
            "status_queries": readback.status_queries,
            **deliveries,
        },
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        report = {"run": run, "taskrelay": asdict(ours), "bare": asdict(bare)}
        if profile is not None:
            report["profile"] = asdict(profile)
        print(json.dumps(report, indent=2))
    else:
        print(markdown(ours, bare, run))
        if profile is not None:
            print("\n".join(profile_markdown(profile)))
        print(f"\n(wall time {run['wall_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
