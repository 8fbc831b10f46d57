"""Benchmark: memory (issue 6, benchmark 4): one TaskRelay process's resident memory under a steady
load, against a bare Starlette endpoint under the same load in the same run.

The service measured is a real ``taskrelay serve`` (default settings: scheduler and dispatcher
on) on a SQLite file in a temporary folder, with one subscription to a local subscriber
(``bench/subscriber_app.py``, in a process of its own), so the dispatcher's path runs the whole
time. For ``--minutes`` (10 by default), tasks are created and completed continuously: EvoLink
tasks are registered through ``POST /v1/tasks/track`` as they are needed, and each gets
``--steps`` callbacks at its signed URL (rising progress, then ``completed``) from
``bench/ingest.py``'s ``CallbackFeed``: a window of ``--window`` tasks in flight, each callback a
real state change, at ``--rate`` callbacks per second (open loop). Every event (submitted,
progress, succeeded) owes the subscriber a delivery; progress deliveries are coalesced by design.

The baseline is ``bench/bare_app.py``, which reads the body and answers 200, sent exactly the same
callbacks (paths and bodies) at the same moments, in the same run (the two load streams run side
by side, so both see the same machine).

Every ``--interval`` seconds the resident set size (``VmRSS`` in ``/proc/<pid>/status``; also
``RssAnon``, the heap's share) of both processes is sampled. The report compares RSS after the
warm-up (``--warmup-minutes``, 1 by default) with RSS at the end, gives the growth and the
maximum, a least-squares slope over the steady part, the issue's target (TaskRelay within 10 %),
and a series (``--series`` as text, ``--csv PATH`` as CSV).

``--trace DIR`` is the debug mode for finding where growth comes from. TaskRelay runs inside a
small wrapper that writes to DIR, every 10 s, its RSS, what glibc malloc holds in use and free in
its arenas (``mallinfo2``), what SQLite's allocator holds (``sqlite3_memory_used``), its threads
and gc-tracked objects; the report compares the end of the warm-up with the end. Unless
``--trace-frames 0`` (counters only, RSS stays comparable), it also starts ``tracemalloc`` at the
end of the warm-up (which slows the service and adds the tracer's own memory), dumps a snapshot
every ``--trace-every`` seconds, and lists the allocation sites that grew from the first snapshot
to the last.

Run from the repository root: ``.venv/bin/python bench/memory.py`` (``--help`` for options; the
run takes ``--minutes`` plus about half a minute). ``TASKRELAY_*`` settings in the environment
are passed on to the service, as ``bench/ingest.py`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.e2e import (
    TrackedTask,
    api_client,
    code_fingerprint,
    read_deliveries,
    run_async,
    start_service,
    start_subscriber,
    subscribe,
    subscriber_stats,
    track,
)
from bench.ingest import (
    DEFAULT_STEPS,
    JSON_HEADERS,
    CallbackFeed,
    ServerProcess,
    _connections,
    passed_settings,
    percentile,
    read_back,
    service_revision,
    start_bare,
    uvicorn_implementation,
)

# The issue's target: RSS after the warm-up and at the end within this share of each other.
TARGET_GROWTH = 0.10
# Callbacks kept ready beyond the next one, in seconds of sending: tracking runs ahead of it.
FEED_AHEAD_SECONDS = 5.0
TRACK_CONCURRENCY = 8
# A target with this many callbacks waiting for an answer gets no more until it catches up
# (they are counted as dropped): an overloaded server is reported, not buried under a backlog.
MAX_WAITING = 1000
# How often the generator trims the callbacks already sent from the feed.
TRIM_EVERY = 10_000
SERIES_WIDTH = 50

# Runs `taskrelay serve` inside a process that also watches itself (--trace): every PROBE
# seconds a JSON line with RSS, what Python's allocator holds (tracemalloc, when on: from the end
# of the warm-up, which the benchmark signals with a file "warm"), what SQLite's allocator holds
# (sqlite3_memory_used, through ctypes: the same libsqlite3 the sqlite3 module uses), glibc
# malloc's arenas (mallinfo2: in use vs free), threads and gc-tracked objects; a tracemalloc
# snapshot every --trace-every seconds.
TRACED_SERVE = """
import ctypes, gc, json, sys, threading, time, tracemalloc
from pathlib import Path
out, every = Path(sys.argv[1]), float(sys.argv[2])
frames, probe = int(sys.argv[3]), float(sys.argv[4])
sqlite = ctypes.CDLL("libsqlite3.so.0")
sqlite.sqlite3_memory_used.restype = ctypes.c_int64
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def status():
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            values[name] = int(rest.split()[0]) * 1024
    return values
def watch():
    started = time.monotonic()
    warm = False
    next_snapshot = 0.0
    number = 0
    while True:
        time.sleep(probe)
        elapsed = time.monotonic() - started
        if not warm and (out / "warm").exists():
            warm = True
            if frames:
                # What is still held at the end and was allocated after this is the growth
                # (tracing start-up too would only slow it down).
                tracemalloc.start(frames)
                next_snapshot = elapsed
        info = libc.mallinfo2()
        row = {
            "seconds": round(elapsed, 1), "warm": warm, **status(),
            "python_traced": (
                tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
            ),
            "sqlite": sqlite.sqlite3_memory_used(),
            "malloc_in_use": info.uordblks + info.hblkhd,
            "malloc_free": info.fordblks,
            "malloc_arena": info.arena,
            "threads": threading.active_count(),
            "gc_objects": len(gc.get_objects()),
        }
        with open(out / "probe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\\n")
        if tracemalloc.is_tracing() and elapsed >= next_snapshot:
            number += 1
            next_snapshot += every
            tracemalloc.take_snapshot().dump(str(out / f"snapshot-{number:04d}.tracemalloc"))
threading.Thread(target=watch, name="memory-watch", daemon=True).start()
from service.cli import main
sys.exit(main(sys.argv[5:]))
"""
TRACE_FRAMES = 25
PROBE_SECONDS = 10.0


# --- resident memory ------------------------------------------------------------------------------


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a live process, in bytes (Linux /proc)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            values[name] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the load started
    service_rss: int
    service_anon: int
    bare_rss: int
    bare_anon: int
    subscriber_rss: int
    callbacks_sent: int  # to TaskRelay, so far
    tasks: int  # tracked so far
    database_bytes: int  # SQLite file plus its WAL


# --- the load -------------------------------------------------------------------------------------


@dataclass
class Stream:
    """What one target was sent and answered."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # not sent: too many waiting for an answer
    latencies: list[float] = field(default_factory=list)  # due -> answer, seconds
    waiting: int = 0

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)


@dataclass
class Load:
    service: Stream = field(default_factory=Stream)
    bare: Stream = field(default_factory=Stream)
    tracked: int = 0
    track_errors: Counter[str] = field(default_factory=Counter)
    starved: int = 0  # due, but no tracked task was ready to send a callback for
    lags: list[float] = field(default_factory=list)
    cpu: float = 0.0
    elapsed: float = 0.0
    samples: list[Sample] = field(default_factory=list)


def database_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def drive(
    service: ServerProcess,
    bare: ServerProcess,
    subscriber: ServerProcess,
    database: Path,
    *,
    seconds: float,
    rate: float,
    steps: int,
    window: int,
    connections: int,
    interval: float,
    warmup: float,
    on_warm: Callable[[], None] | None = None,
) -> Load:
    load = Load()
    feed = CallbackFeed(steps, window)
    stop = asyncio.Event()

    async def track_batch(client: httpx.AsyncClient, count: int) -> None:
        numbers = iter(range(load.tracked, load.tracked + count))
        load.tracked += count
        tracked: list[TrackedTask] = []

        async def register() -> None:
            for number in numbers:
                try:
                    tracked.append(await track(client, f"task-unified-memory-{number:08d}"))
                except httpx.HTTPError as exc:
                    load.track_errors[type(exc).__name__] += 1

        await asyncio.gather(*(register() for _ in range(TRACK_CONCURRENCY)))
        feed.add_tasks([(t.path, t.provider_task_id) for t in tracked])

    async def keep_fed(client: httpx.AsyncClient) -> None:
        ahead = rate * FEED_AHEAD_SECONDS
        while not stop.is_set():
            if feed.remaining < ahead:
                await track_batch(client, min(window, feed.tasks_needed(ahead - feed.remaining)))
            else:
                await asyncio.sleep(0.05)

    def sample(started: float) -> None:
        service_rss, service_anon = memory_of(service.pid)
        bare_rss, bare_anon = memory_of(bare.pid)
        load.samples.append(
            Sample(
                seconds=round(time.monotonic() - started, 2),
                service_rss=service_rss,
                service_anon=service_anon,
                bare_rss=bare_rss,
                bare_anon=bare_anon,
                subscriber_rss=memory_of(subscriber.pid)[0],
                callbacks_sent=load.service.sent,
                tasks=load.tracked,
                database_bytes=database_bytes(database),
            )
        )

    async def sampler(started: float) -> None:
        number = 0
        warm = on_warm is None
        while not stop.is_set():
            sample(started)
            if not warm and time.monotonic() - started >= warmup:
                warm = True
                assert on_warm is not None
                on_warm()
            number += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), started + number * interval - time.monotonic())

    async with (
        api_client(service) as tracker,
        _connections(service.url, connections) as service_clients,
        _connections(bare.url, connections) as bare_clients,
    ):
        await track_batch(tracker, feed.tasks_needed(rate * FEED_AHEAD_SECONDS))
        pools: dict[str, asyncio.Queue[httpx.AsyncClient]] = {}
        for name, clients in (("service", service_clients), ("bare", bare_clients)):
            pools[name] = asyncio.Queue()
            for client in clients:
                pools[name].put_nowait(client)

        async def post(name: str, stream: Stream, path: str, body: bytes, due: float) -> None:
            stream.waiting += 1
            client = await pools[name].get()
            try:
                response = await client.post(path, content=body, headers=JSON_HEADERS)
            except httpx.HTTPError as exc:
                stream.errors[type(exc).__name__] += 1
                return
            finally:
                pools[name].put_nowait(client)
                stream.waiting -= 1
            stream.statuses[response.status_code] += 1
            stream.latencies.append(time.monotonic() - due)

        in_flight: set[asyncio.Task[None]] = set()
        cpu = time.process_time()
        started = time.monotonic()
        background = [
            asyncio.create_task(keep_fed(tracker)),
            asyncio.create_task(sampler(started)),
        ]
        index = 0
        while True:
            due = started + index / rate
            if due - started >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            load.lags.append(max(0.0, time.monotonic() - due))
            index += 1
            if feed.remaining == 0:
                load.starved += 1
                continue
            item = feed.items[feed.position]
            feed.advance(1)
            if feed.position >= TRIM_EVERY:
                del feed.items[: feed.position]
                feed.position = 0
            for name, stream in (("service", load.service), ("bare", load.bare)):
                if stream.waiting >= MAX_WAITING:
                    stream.dropped += 1
                    continue
                stream.sent += 1
                task = asyncio.create_task(post(name, stream, item.path, item.body, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        load.elapsed = time.monotonic() - started
        if in_flight:
            await asyncio.wait(in_flight)
        sample(started)
        stop.set()
        await asyncio.gather(*background)
        load.cpu = time.process_time() - cpu
    return load


# --- tracemalloc (--trace) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    size_diff: int
    count_diff: int
    frames: list[str]  # innermost first


def traced_growth(folder: Path, top: int) -> dict[str, Any]:
    """The allocation sites that grew most between the first snapshot (taken when tracing
    started, at the end of the warm-up) and the last one."""
    snapshots = sorted(folder.glob("snapshot-*.tracemalloc"))
    if len(snapshots) < 2:
        return {"snapshots": f"fewer than two tracemalloc snapshots in {folder}"}
    first_index = 0
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    ]
    old = tracemalloc.Snapshot.load(str(snapshots[first_index])).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(snapshots[-1])).filter_traces(ignore)
    by_line = new.compare_to(old, "lineno")
    by_trace = new.compare_to(old, "traceback")
    return {
        "from": snapshots[first_index].name,
        "to": snapshots[-1].name,
        "traced_before": sum(s.size for s in old.statistics("filename")),
        "traced_after": sum(s.size for s in new.statistics("filename")),
        "by_line": [
            asdict(Growth(s.size_diff, s.count_diff, [str(f) for f in s.traceback]))
            for s in by_line[:top]
        ],
        "by_traceback": [
            asdict(Growth(s.size_diff, s.count_diff, [str(f) for f in reversed(s.traceback)][:12]))
            for s in by_trace[:top]
        ],
    }


# --- reporting ------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


@dataclass(frozen=True)
class Summary:
    process: str
    warm_seconds: float
    warm: int
    end: int
    growth: float
    peak: int
    slope_per_minute: float  # bytes, least squares over the samples after the warm-up
    anon_warm: int
    anon_end: int


def summarise(samples: list[Sample], warmup: float, rss: str, anon: str) -> Summary:
    steady = [s for s in samples if s.seconds >= warmup] or samples[-1:]
    first, last = steady[0], steady[-1]
    xs = [s.seconds / 60 for s in steady]
    ys = [float(getattr(s, rss)) for s in steady]
    slope = 0.0
    if len(steady) > 1:
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        if spread:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    warm, end = getattr(first, rss), getattr(last, rss)
    return Summary(
        process=rss.removesuffix("_rss"),
        warm_seconds=first.seconds,
        warm=warm,
        end=end,
        growth=(end - warm) / warm if warm else math.nan,
        peak=max(getattr(s, rss) for s in samples),
        slope_per_minute=slope,
        anon_warm=getattr(first, anon),
        anon_end=getattr(last, anon),
    )


def series_text(samples: list[Sample], every: float) -> Iterator[str]:
    """One line per ``every`` seconds: both processes' RSS, with a bar for TaskRelay's."""
    top = max(s.service_rss for s in samples)
    low = min(s.service_rss for s in samples)
    span = max(1, top - low)
    yield "```"
    yield f"{'min':>6} {'TaskRelay':>11} {'bare':>9}  TaskRelay RSS ({_mb(low)} .. {_mb(top)})"
    next_at = 0.0
    for s in samples:
        if s.seconds + 1e-6 < next_at and s is not samples[-1]:
            continue
        next_at = s.seconds + every
        bar = "#" * (1 + round((s.service_rss - low) / span * (SERIES_WIDTH - 1)))
        yield (f"{s.seconds / 60:6.2f} {_mb(s.service_rss):>11} {_mb(s.bare_rss):>9}  {bar}")
    yield "```"


def markdown(
    load: Load,
    service: Summary,
    bare: Summary,
    run: dict[str, Any],
    series: bool,
) -> str:
    rate_ok = load.service.ok / load.elapsed if load.elapsed else math.nan
    lines = [
        f"{run['minutes']:g} min at {run['rate']:g} callbacks/s (open loop; EvoLink tasks "
        f"tracked as needed, {run['steps']} callbacks each: progress then `completed`, "
        f"{run['window']} tasks in flight), every event delivered to a local subscriber; "
        f"the bare endpoint got the same callbacks at the same moments. RSS sampled every "
        f"{run['interval']:g} s; warm-up {run['warmup_minutes']:g} min. SQLite, uvicorn "
        f"{run['uvicorn']}. {run['cores']} cores shared by TaskRelay, the bare endpoint, the "
        f"subscriber and the generator (and anything else running); 1-minute load average "
        f"before / after: {run['load_average_before']:g} / {run['load_average_after']:g}. "
        f"TaskRelay at {run['revision']}.",
    ]
    if run["settings_passed"]:
        lines.append(
            f"Settings passed to TaskRelay from the environment: {run['settings_passed']}."
        )
    if run.get("traced"):
        lines.append(
            "**Traced run (--trace)**: TaskRelay runs with a memory probe"
            + (
                f" and tracemalloc ({run['trace_frames']} frames), so its RSS includes the "
                "tracer's own bookkeeping and is not comparable with an untraced run."
                if run["trace_frames"]
                else " (no tracemalloc)."
            )
        )
    lines += [
        "",
        "| process | RSS after warm-up | RSS at end | growth | max | slope after warm-up "
        "| heap (RssAnon) warm-up -> end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in (("TaskRelay", service), ("bare Starlette", bare)):
        lines.append(
            f"| {label} | {_mb(s.warm)} (at {s.warm_seconds / 60:.1f} min) | {_mb(s.end)} | "
            f"{s.growth:+.1%} | {_mb(s.peak)} | {s.slope_per_minute / 1e6:+.2f} MB/min | "
            f"{_mb(s.anon_warm)} -> {_mb(s.anon_end)} |"
        )
    met = service.growth <= TARGET_GROWTH
    first_db = next(
        (s.database_bytes for s in load.samples if s.seconds >= service.warm_seconds), 0
    )
    lines += [
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| TaskRelay RSS growth after warm-up <= {TARGET_GROWTH:.0%} | {service.growth:+.1%} "
        f"| {'yes' if met else '**no**'} |",
        "",
        "| load | TaskRelay | bare |",
        "|---|---:|---:|",
        f"| callbacks sent / answered 2xx | {load.service.sent:,} / {load.service.ok:,} | "
        f"{load.bare.sent:,} / {load.bare.ok:,} |",
        f"| 2xx per second | {rate_ok:,.1f} | {load.bare.ok / load.elapsed:,.1f} |",
        f"| answer latency p50 / p99 (from due) | "
        f"{percentile(load.service.latencies, 0.5) * 1000:,.1f} / "
        f"{percentile(load.service.latencies, 0.99) * 1000:,.1f} ms | "
        f"{percentile(load.bare.latencies, 0.5) * 1000:,.1f} / "
        f"{percentile(load.bare.latencies, 0.99) * 1000:,.1f} ms |",
        f"| non-2xx / no answer / dropped (backlog) | "
        f"{sum(n for c, n in load.service.statuses.items() if not 200 <= c < 300)} / "
        f"{sum(load.service.errors.values())} / {load.service.dropped} | "
        f"{sum(n for c, n in load.bare.statuses.items() if not 200 <= c < 300)} / "
        f"{sum(load.bare.errors.values())} / {load.bare.dropped} |",
        "",
        f"Tasks tracked: {load.tracked:,} (errors {dict(load.track_errors) or 0}); callbacks due "
        f"with no task ready: {load.starved}; generator CPU {load.cpu / load.elapsed:.0%} of a "
        f"core, its own lag p99 {percentile(load.lags, 0.99) * 1000:.1f} ms. SQLite file + WAL: "
        f"{_mb(first_db)} after warm-up, {_mb(load.samples[-1].database_bytes)} at the end. "
        f"Subscriber: {run['subscriber']['webhooks']:,} webhooks received "
        f"({run['subscriber']['distinct_webhook_ids']:,} distinct), by type "
        f"{run['subscriber']['types']}.",
        f"Read back from TaskRelay's database: tasks {run['readback']['tasks']}; events "
        f"{run['readback']['events']}; deliveries {run['readback']['deliveries']} "
        f"({run['readback']['attempts']:,} attempts, {run['readback']['failed_attempts']} "
        f"failed); receipts {run['readback']['receipts']}; {run['readback']['status_queries']} "
        "status queries.",
    ]
    if series:
        lines += ["", *series_text(load.samples, run["series_every"])]
    trace = run.get("trace")
    if trace:
        lines += trace_markdown(trace)
    return "\n".join(lines)


def probes(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


# What the probe's columns mean, for the report.
PROBE_COLUMNS = (
    ("VmRSS", "RSS"),
    ("RssAnon", "RSS, anonymous (heap)"),
    ("malloc_in_use", "glibc malloc: in use (incl. mmapped blocks)"),
    ("malloc_free", "glibc malloc: free inside its arenas (fragmentation)"),
    ("python_traced", "Python objects (tracemalloc)"),
    ("sqlite", "SQLite's own allocations (page caches, statements)"),
)


def probe_markdown(rows: list[dict[str, Any]]) -> list[str]:
    steady = [r for r in rows if r["warm"]] or rows
    first, last = steady[0], steady[-1]
    lines = [
        "",
        f"Inside TaskRelay (probe every {PROBE_SECONDS:g} s), at the end of the warm-up and at "
        f"the end ({(last['seconds'] - first['seconds']) / 60:.1f} min apart):",
        "",
        "| | after warm-up | end | change |",
        "|---|---:|---:|---:|",
    ]
    for key, label in PROBE_COLUMNS:
        if first.get(key) is None or last.get(key) is None:
            continue
        lines.append(
            f"| {label} | {_mb(first[key])} | {_mb(last[key])} | "
            f"{(last[key] - first[key]) / 1e6:+,.1f} MB |"
        )
    lines += [
        f"| threads | {first['threads']} | {last['threads']} | "
        f"{last['threads'] - first['threads']:+} |",
        f"| gc-tracked objects | {first['gc_objects']:,} | {last['gc_objects']:,} | "
        f"{last['gc_objects'] - first['gc_objects']:+,} |",
    ]
    return lines


def trace_markdown(trace: dict[str, Any]) -> list[str]:
    lines = probe_markdown(trace["probes"]) if trace.get("probes") else []
    if "snapshots" in trace:
        return [*lines, "", f"tracemalloc: {trace['snapshots']}"]
    lines += [
        "",
        f"tracemalloc, {trace['from']} -> {trace['to']}: traced memory "
        f"{_mb(trace['traced_before'])} -> {_mb(trace['traced_after'])}.",
        "",
        "| growth | blocks | allocated at |",
        "|---:|---:|---|",
    ]
    for row in trace["by_line"]:
        lines.append(f"| {_mb(row['size_diff'])} | {row['count_diff']:+,} | `{row['frames'][0]}` |")
    lines += ["", "Largest growth by call stack (innermost frame first):"]
    for row in trace["by_traceback"][:5]:
        lines.append(f"- {_mb(row['size_diff'])}, {row['count_diff']:+,} blocks:")
        lines += [f"  - `{frame}`" for frame in row["frames"]]
    return lines


def write_csv(path: Path, samples: list[Sample]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        for s in samples:
            writer.writerow(asdict(s))


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Memory: TaskRelay's RSS under a steady callback load (tasks created and "
        "completed, events delivered to a local subscriber), against a bare Starlette endpoint "
        "under the same load in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--rate", type=float, default=200.0, help="callbacks per second")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="callbacks per task (progress, completed)"
    )
    parser.add_argument("--window", type=int, default=64, help="tasks in flight at once")
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections per target"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument(
        "--warmup-minutes", type=float, default=1.0, help="the RSS compared with the end's"
    )
    parser.add_argument(
        "--series", action="store_true", help="print the RSS series as text (one line a minute)"
    )
    parser.add_argument(
        "--series-every", type=float, default=60.0, help="seconds between lines of --series"
    )
    parser.add_argument("--csv", type=Path, metavar="PATH", help="write every sample as CSV")
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="debug: run TaskRelay under tracemalloc, snapshots in DIR, report what grew",
    )
    parser.add_argument(
        "--trace-every", type=float, default=60.0, help="seconds between tracemalloc snapshots"
    )
    parser.add_argument(
        "--trace-frames",
        type=int,
        default=TRACE_FRAMES,
        help="tracemalloc's frames per allocation (--trace); 0: no tracemalloc, only the cheap "
        "counters (RSS stays comparable)",
    )
    parser.add_argument("--top", type=int, default=15, help="allocation sites listed (--trace)")
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.interval <= 0 or args.connections < 1:
        parser.error("--minutes, --rate, --interval and --connections must be positive")
    if not 2 <= args.steps <= 100 or args.window < 1:
        parser.error("--steps must be between 2 and 100; --window positive")
    if args.warmup_minutes >= args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")

    load_before = os.getloadavg()[0]
    revision = f"{service_revision()}; {code_fingerprint()}"
    trace: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="taskrelay-memory-") as name:
        folder = Path(name)
        database = folder / "taskrelay.db"
        database_url = f"sqlite:///{database}"
        traced_argv = None
        if args.trace is not None:
            args.trace.mkdir(parents=True, exist_ok=True)
            for old in [
                *args.trace.glob("snapshot-*.tracemalloc"),
                args.trace / "probe.jsonl",
                args.trace / "warm",
            ]:
                old.unlink(missing_ok=True)
            traced_argv = [
                sys.executable,
                "-c",
                TRACED_SERVE,
                str(args.trace.resolve()),
                str(args.trace_every),
                str(args.trace_frames),
                str(PROBE_SECONDS),
            ]
        subscriber = start_subscriber(folder)
        service: ServerProcess | None = None
        bare: ServerProcess | None = None
        try:
            service = start_service(database_url, folder, argv=traced_argv)
            bare = start_bare(folder)
            subscribe(service, subscriber)
            load = run_async(
                drive(
                    service,
                    bare,
                    subscriber,
                    database,
                    seconds=args.minutes * 60,
                    rate=args.rate,
                    steps=args.steps,
                    window=args.window,
                    connections=args.connections,
                    interval=args.interval,
                    warmup=args.warmup_minutes * 60,
                    on_warm=(args.trace / "warm").touch if args.trace else None,
                )
            )
            received = subscriber_stats(subscriber)
        finally:
            for process in (service, bare, subscriber):
                if process is not None:
                    process.stop()
        readback = read_back(database_url)
        deliveries = read_deliveries(database_url)
        if args.trace is not None:
            trace = traced_growth(args.trace, args.top)
            trace["probes"] = probes(args.trace / "probe.jsonl")
    warmup = args.warmup_minutes * 60
    service_summary = summarise(load.samples, warmup, "service_rss", "service_anon")
    bare_summary = summarise(load.samples, warmup, "bare_rss", "bare_anon")
    run = {
        "minutes": args.minutes,
        "rate": args.rate,
        "steps": args.steps,
        "window": args.window,
        "interval": args.interval,
        "warmup_minutes": args.warmup_minutes,
        "series_every": args.series_every,
        "uvicorn": uvicorn_implementation(),
        "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "revision": revision,
        "settings_passed": passed_settings(),
        "traced": args.trace is not None,
        "trace_frames": args.trace_frames,
        "trace": trace,
        "subscriber": {
            "webhooks": received["webhooks"],
            "distinct_webhook_ids": received["distinct_webhook_ids"],
            "types": received["types"],
        },
        "readback": {
            "tasks": readback.tasks,
            "events": readback.events,
            "receipts": readback.receipts,
            "status_queries": readback.status_queries,
            **deliveries,
        },
    }
    if args.csv is not None:
        write_csv(args.csv, load.samples)
    if args.json:
        report = {
            "run": run,
            "taskrelay": asdict(service_summary),
            "bare": asdict(bare_summary),
            "samples": [asdict(s) for s in load.samples],
        }
        print(json.dumps(report, indent=2))
    else:
        print(markdown(load, service_summary, bare_summary, run, args.series))
    return 0


if __name__ == "__main__":
    sys.exit(main())
