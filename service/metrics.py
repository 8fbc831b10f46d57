"""Metrics: in-process counters, gauges and histograms, cheap enough for hot paths (a dict
update under a lock), and their rendering in the Prometheus text format (version 0.0.4).

The scheduler, submitter, dispatcher and callback endpoint record here; ``GET /metrics``
(:func:`metrics_endpoint`) adds the gauges read from the database at scrape time
(:func:`queue_depths`) and renders everything with :func:`render`. Every family is declared in
:data:`FAMILIES` with its help text, so each one is listed (``# HELP``/``# TYPE``) even before
anything was recorded in it. Names are recorded without the ``taskrelay_`` prefix.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlmodel import col
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from service.errors import StoreUnavailable, Unauthorized
from service.models import Delivery, DeliveryStatus, Subscription, Task, TaskStatus
from service.runtime import runtime_of

if TYPE_CHECKING:
    from service.runtime import Runtime
    from service.store import Store

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Kind = Literal["counter", "gauge", "histogram"]

PREFIX = "taskrelay_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_SECONDS = 5.0

# Callback handling is milliseconds when healthy and seconds under overload; provider status
# queries and webhook attempts run up to their 30 s timeouts.
CALLBACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Family:
    name: str  # without PREFIX; counters end in _total
    kind: Kind
    help: str
    buckets: tuple[float, ...] = ()


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "callbacks_total",
            "counter",
            "Provider callbacks received, by provider and outcome (applied, unchanged, terminal, "
            "rejected, invalid_token, expired_token, wrong_provider, not_found, too_large, "
            "client_gone, overloaded, unavailable, error).",
        ),
        Family(
            "callback_duration_seconds",
            "histogram",
            "Time to handle a provider callback, from routing to the answer (after the commit).",
            CALLBACK_BUCKETS,
        ),
        Family(
            "status_queries_total",
            "counter",
            "Status queries sent to providers, by provider and outcome (ok, or the error code).",
        ),
        Family(
            "status_query_duration_seconds",
            "histogram",
            "Time a provider took to answer a status query, by provider.",
            UPSTREAM_BUCKETS,
        ),
        Family(
            "submissions_total",
            "counter",
            "Submission attempts to providers, by provider and outcome (accepted, retrying, "
            "failed, unconfirmed: no usable answer, the provider's callback is awaited).",
        ),
        Family(
            "tasks_expired_total",
            "counter",
            "Tasks expired at their deadline without a final answer, by provider.",
        ),
        Family(
            "tasks_pruned_total",
            "counter",
            "Final tasks deleted past TASKRELAY_RETENTION, with their history and deliveries.",
        ),
        Family(
            "deliveries_pruned_pending_total",
            "counter",
            "Webhook deliveries still pending when retention deleted their task: events "
            "their subscribers will never get.",
        ),
        Family(
            "deliveries_total",
            "counter",
            "Webhook delivery attempts, by outcome (succeeded: a 2xx; failed: another status; "
            "unreachable: no answer, a timeout or a connection error).",
        ),
        Family(
            "deliveries_dead_lettered_total",
            "counter",
            "Webhook deliveries given up after their last attempt (or a 410 Gone).",
        ),
        Family(
            "delivery_attempt_duration_seconds",
            "histogram",
            "Time one webhook delivery attempt took, whatever its outcome.",
            DELIVERY_BUCKETS,
        ),
        Family(
            "tasks_in_flight",
            "gauge",
            "Unfinished tasks, by status (from the database, at scrape time).",
        ),
        Family(
            "tasks_due_for_poll",
            "gauge",
            "Tasks whose next status query is due now, including any being queried, by provider "
            "(from the database, at scrape time). Also counts, until the scheduler's next pass "
            "moves them, tasks whose look a progress callback planned later (no query is sent).",
        ),
        Family(
            "deliveries_pending",
            "gauge",
            "Webhook deliveries waiting to be sent; paused=true for disabled subscriptions "
            "(from the database, at scrape time).",
        ),
        Family(
            "oldest_pending_delivery_age_seconds",
            "gauge",
            "Age of the oldest delivery still waiting to be sent to an enabled subscription "
            "(0 when none is waiting).",
        ),
        Family(
            "group_commit_queue_depth",
            "gauge",
            "Updates (callbacks) waiting in this process's group-commit queue.",
        ),
        Family(
            "group_commit_batches_total",
            "counter",
            "Transactions the group-commit writer has committed (of serve --workers N: all "
            "of theirs).",
        ),
        Family(
            "group_commit_updates_total",
            "counter",
            "Updates the group-commit writer has committed, over all its batches (of serve "
            "--workers N: all of theirs).",
        ),
        Family(
            "callback_receipts_dropped_total",
            "counter",
            "Callbacks whose receipt was not kept: their task keeps the most receipts a task "
            "keeps (1,000) already. Those answered and applied, and those refused (a body "
            "that cannot be read) alike.",
        ),
        Family(
            "put_aside_missed_total",
            "counter",
            "Deliveries due but unable to go that only this process's periodic sweep of the "
            "due queue found: every windowed pass missed them (committed more than 5 s after "
            "their due time, replicas' clocks apart, a row locked at the time). They cost "
            "claim time until found; a steady rise points at clock skew or very late commits.",
        ),
        Family(
            "clock_offset_seconds",
            "gauge",
            "This process's clock minus the PostgreSQL server's, read at scrape time (not on "
            "SQLite). Replicas compare times each of them wrote (leases, planned retries, the "
            "put-aside's window): keep every replica within a second or two of the others.",
        ),
        Family(
            "database_up",
            "gauge",
            "1 when the database answered this scrape's queries, 0 when it did not (the "
            "database gauges are then left out).",
        ),
    )
}


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int]  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0
    count: int = 0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], _Histogram] = {}

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> tuple[str, Labels]:
        return name, tuple(sorted(labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add one observation (seconds, say) to a histogram declared in :data:`FAMILIES`."""
        key = self._key(name, labels)
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None:
                bounds = FAMILIES[name].buckets
                histogram = _Histogram(bounds, [0] * (len(bounds) + 1))
                self._histograms[key] = histogram
            histogram.counts[bisect.bisect_left(histogram.bounds, value)] += 1
            histogram.total += value
            histogram.count += 1

    def set_total(self, name: str, value: float, **labels: str) -> None:
        """A counter kept elsewhere (the group-commit writer's), copied in as it is now."""
        with self._lock:
            self._counters[self._key(name, labels)] = value

    def totals(self) -> dict[str, Any]:
        """The counters and histograms as JSON values (:class:`WorkerMetrics`)."""
        with self._lock:
            return {
                "counters": [
                    [name, [list(pair) for pair in labels], value]
                    for (name, labels), value in self._counters.items()
                ],
                "histograms": [
                    [
                        name,
                        [list(pair) for pair in labels],
                        list(h.bounds),
                        list(h.counts),
                        h.total,
                        h.count,
                    ]
                    for (name, labels), h in self._histograms.items()
                ],
            }

    def add_totals(self, totals: dict[str, Any]) -> None:
        """Add another process's :meth:`totals` to these."""
        with self._lock:
            for name, labels, value in totals["counters"]:
                key = (name, tuple((str(k), str(v)) for k, v in labels))
                self._counters[key] = self._counters.get(key, 0.0) + float(value)
            for name, labels, bounds, counts, total, count in totals["histograms"]:
                key = (name, tuple((str(k), str(v)) for k, v in labels))
                histogram = self._histograms.get(key)
                if histogram is None:
                    histogram = _Histogram(tuple(bounds), [0] * len(counts))
                    self._histograms[key] = histogram
                if list(histogram.bounds) != list(bounds) or len(counts) != len(histogram.counts):
                    continue  # not the same histogram: cannot be added
                histogram.counts = [
                    mine + theirs for mine, theirs in zip(histogram.counts, counts, strict=True)
                ]
                histogram.total += float(total)
                histogram.count += int(count)

    def counter(self, name: str, **labels: str) -> float:
        """One counter's value; with fewer labels, the sum over the rest."""
        wanted = set(labels.items())
        with self._lock:
            return sum(
                value
                for (metric, key), value in self._counters.items()
                if metric == name and wanted <= set(key)
            )

    def gauge(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._gauges.get(self._key(name, labels))

    def histogram_count(self, name: str, **labels: str) -> int:
        """Observations in one histogram; with fewer labels, the sum over the rest."""
        wanted = set(labels.items())
        with self._lock:
            return sum(
                histogram.count
                for (metric, key), histogram in self._histograms.items()
                if metric == name and wanted <= set(key)
            )

    def samples(self) -> Iterator[tuple[str, str, Labels, float]]:
        """(kind, name, labels, value) for every counter and gauge series, counters first."""
        with self._lock:
            counters = sorted(self._counters.items())
            gauges = sorted(self._gauges.items())
        for (name, labels), value in counters:
            yield "counter", name, labels, value
        for (name, labels), value in gauges:
            yield "gauge", name, labels, value

    def _snapshot(self) -> dict[str, list[tuple[str, Labels, float]]]:
        """Every sample by family name, histograms expanded into their series."""
        by_family: dict[str, list[tuple[str, Labels, float]]] = {}
        with self._lock:
            plain = [*self._counters.items(), *self._gauges.items()]
            histograms = [
                (key, histogram.bounds, list(histogram.counts), histogram.total, histogram.count)
                for key, histogram in self._histograms.items()
            ]
        for (name, labels), value in plain:
            by_family.setdefault(name, []).append((name, labels, value))
        for (name, labels), bounds, counts, total, count in histograms:
            series = by_family.setdefault(name, [])
            cumulative = 0
            for bound, bucket in zip((*bounds, math.inf), counts, strict=True):
                cumulative += bucket
                le = (("le", format_value(bound)),)
                series.append((name + "_bucket", labels + le, float(cumulative)))
            series.append((name + "_sum", labels, total))
            series.append((name + "_count", labels, float(count)))
        return by_family


Sample = tuple[str, Labels, float]  # (name without PREFIX, labels, value)


# `serve --workers N`: the folder (made by serve for the run, removed at its end) where each
# worker keeps its counters and histograms, so that a scrape, answered by whichever worker
# takes the connection, reports them all added up.
WORKERS_DIR_ENV = "TASKRELAY_WORKER_METRICS_DIR"
PUBLISH_SECONDS = 1.0  # how often each worker writes its own
# The counts of workers gone, added up in one file (WorkerMetrics.combined), and the lock a
# scrape holds while it reads the folder and folds a dead worker's file into it.
RETIRED_FILE = "retired.json"
FOLD_LOCK_FILE = "fold.lock"


def _worker_alive(path: Path) -> bool:
    """Whether the worker whose file this is (named ``<pid>-<random>.json``) may still be
    running: its pid names a process. A pid used again by another process keeps the file
    as it is (added up, not folded): nothing is lost."""
    pid_text = path.stem.split("-", 1)[0]
    if not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


class WorkerMetrics:
    """One worker's share of the counters and histograms of ``serve --workers N``.

    Each worker's are in-process, and the workers share one port: a scrape reached one of
    them, so each counter jumped between the workers' values, which Prometheus reads as
    resets (``rate()`` and ``increase()`` wrong). Each worker writes its own to a file of its
    own in the run's folder (its pid and a random part: a pid used again by a restarted
    worker must not replace a dead one's file) every :data:`PUBLISH_SECONDS`, when it stops,
    and when it answers a scrape, which then adds up every file. Writes are one at a time
    (the ticker's and a scrape's) and each is renamed into place whole, so a file only ever
    grows; a worker that stopped or died keeps its file: the sums never go back between
    scrapes (the other workers' as of at most a second before). Gauges stay the answering
    worker's own.

    A worker restarted (uvicorn replaces one that died) leaves its file behind: a crash loop
    would leave one per restart, each read at every scrape. A scrape folds the files of
    workers no longer running into one (:data:`RETIRED_FILE`), under a lock that the other
    scrapes wait for, so none reads the folder halfway through: the retired file names the
    files it holds, written before they are removed, so a fold cut off between the two
    counts nothing twice."""

    def __init__(
        self,
        directory: Path,
        metrics: Metrics,
        *,
        collect: Callable[[], None] = lambda: None,
        name: str | None = None,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.collect = collect  # copies in the counters kept elsewhere (Metrics.set_total)
        self.path = directory / f"{name or f'{os.getpid()}-{secrets.token_hex(4)}'}.json"
        self._writing = threading.Lock()
        self._failed = False

    def publish(self) -> None:
        """Write this worker's counters and histograms as they are now (on a worker thread:
        it writes a file)."""
        with self._writing:
            self.collect()
            totals = json.dumps(self.metrics.totals())
            try:
                _write_whole(self.path, totals)
            except OSError as exc:
                if not self._failed:
                    log.warning("could not write this worker's metrics to %s: %s", self.path, exc)
                self._failed = True
                return
            self._failed = False

    async def publish_step(self) -> int:
        """:meth:`publish`, as a ticker's step (service/loops.py), off the event loop."""
        await asyncio.to_thread(self.publish)
        return 0

    def combined(self) -> Metrics:
        """Every worker's counters and histograms added up, with this worker's gauges."""
        self.publish()
        total = Metrics()
        try:
            lock = open(self.directory / FOLD_LOCK_FILE, "a")  # noqa: SIM115  (closed below)
        except OSError:
            lock = None  # the folder gone (the run ending): read what is there
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system that takes no locks: read, fold nothing
                lock.close()
                lock = None
        try:
            retired, folded = self._retired()
            if lock is not None:
                retired, folded = self._fold(retired, folded)
            total.add_totals(retired.totals())
            for path in sorted(self.directory.glob("*.json")):
                if path.name == RETIRED_FILE or path.name in folded:
                    continue
                try:
                    total.add_totals(json.loads(path.read_text()))
                except (OSError, ValueError, TypeError, KeyError):
                    continue  # a file gone (the run ending) or not one of these
        finally:
            if lock is not None:
                lock.close()  # releases the lock
        with self.metrics._lock:
            total._gauges = dict(self.metrics._gauges)
        return total

    def _retired(self) -> tuple[Metrics, set[str]]:
        """The retired workers' counts, and the names of the files they came from."""
        retired = Metrics()
        try:
            saved = json.loads((self.directory / RETIRED_FILE).read_text())
            retired.add_totals(saved["totals"])
            return retired, set(saved["folded"])
        except FileNotFoundError:
            return retired, set()
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("could not read the retired workers' metrics: %s", exc)
            return Metrics(), set()

    def _fold(self, retired: Metrics, folded: set[str]) -> tuple[Metrics, set[str]]:
        """Fold the files of workers no longer running into the retired file (the lock held):
        their counts added and their names recorded in it, written whole, then the files
        removed. A file it names already (a fold cut off before the removal) is removed
        without being added again. The names recorded are only those of files still there,
        so the retired file does not grow with every restart."""
        new = [
            path
            for path in sorted(self.directory.glob("*.json"))
            if path.name not in folded
            and path.name != RETIRED_FILE
            and path != self.path
            and not _worker_alive(path)
        ]
        leftovers = [self.directory / name for name in folded]
        leftovers = [path for path in leftovers if path.exists()]
        if not new and not leftovers:
            return retired, folded
        names = {path.name for path in (*leftovers, *new)}
        try:
            if new:
                for path in new:
                    retired.add_totals(json.loads(path.read_text()))
                _write_whole(
                    self.directory / RETIRED_FILE,
                    json.dumps({"totals": retired.totals(), "folded": sorted(names)}),
                )
            for path in (*leftovers, *new):
                path.unlink(missing_ok=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("could not fold a stopped worker's metrics: %s", exc)
            return self._retired()
        return retired, names


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file of its own, renamed into place: a reader sees
    the old file or the new one, whole."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def render(metrics: Metrics, scraped: Iterable[Sample] = ()) -> str:
    """Everything in ``metrics``, plus ``scraped`` (gauges computed for this scrape), in the
    Prometheus text exposition format 0.0.4: declared families first, in declaration order."""
    by_family = metrics._snapshot()
    for name, labels, value in scraped:
        by_family.setdefault(name, []).append((name, labels, value))
    lines: list[str] = []
    names = [*FAMILIES, *sorted(set(by_family) - set(FAMILIES))]
    for name in names:
        family = FAMILIES.get(name)
        samples = by_family.get(name, [])
        if family is None:
            kind: Kind = "counter" if name.endswith("_total") else "gauge"
            family = Family(name, kind, f"{name} (undocumented).")
        lines.append(f"# HELP {PREFIX}{name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {PREFIX}{name} {family.kind}")
        # Series of one histogram stay together, buckets in order (they were added that way).
        for sample_name, labels, value in sorted(samples, key=_series_order):
            lines.append(f"{PREFIX}{sample_name}{_labels(labels)} {format_value(value)}")
    return "\n".join(lines) + "\n"


def _series_order(sample: Sample) -> tuple[Labels, int]:
    name, labels, _ = sample
    plain = tuple(pair for pair in labels if pair[0] != "le")
    return plain, (0 if name.endswith("_bucket") else 1 if name.endswith("_sum") else 2)


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{escape_label_value(value)}"' for key, value in labels)
    return "{" + inner + "}"


# --- gauges read from the database at scrape time ---------------------------------------------

_IN_FLIGHT = (TaskStatus.queued.value, TaskStatus.running.value)


def depth_queries(
    providers: Sequence[str], now: datetime
) -> tuple[sa.Select[str, int], sa.Select[str, int], sa.Select[bool, int, datetime]]:
    """The scrape-time queries, each driven by an index, never a scan of the history:

    - unfinished tasks by status: ``ix_task_status_next_check_at`` (status first);
    - tasks due for a status query, per provider: ``ix_task_provider_next_check_at``;
    - pending deliveries (and the oldest one): the pending range of
      ``ix_delivery_status_next_attempt``, each joined to its subscription by primary key to
      tell paused ones apart. This one grows with the backlog waiting to be sent, never with
      delivered history.
    """
    in_flight = (
        sa.select(col(Task.status), sa.func.count())
        .where(col(Task.status).in_(_IN_FLIGHT))
        .group_by(col(Task.status))
    )
    due = (
        sa.select(col(Task.provider), sa.func.count())
        .where(col(Task.provider).in_(list(providers)), col(Task.next_check_at) <= now)
        .group_by(col(Task.provider))
    )
    pending = (
        sa.select(col(Subscription.enabled), sa.func.count(), sa.func.min(col(Delivery.created_at)))
        .select_from(Delivery)
        .join(Subscription, col(Subscription.pk) == col(Delivery.subscription_pk))
        .where(col(Delivery.status) == DeliveryStatus.pending.value)
        .group_by(col(Subscription.enabled))
    )
    return in_flight, due, pending


def queue_depths(store: Store, providers: Sequence[str]) -> list[Sample]:
    """Queue depths and the oldest pending delivery's age, read now (:func:`depth_queries`).
    Raises :class:`~service.errors.StoreUnavailable` when the database does not answer."""
    now = store.clock()
    in_flight, due_query, pending_query = depth_queries(providers, now)
    offset: float | None = None
    with store.transaction(write=False) as session:
        by_status = {status: count for status, count in session.execute(in_flight)}
        due = {provider: count for provider, count in session.execute(due_query)}
        pending = session.execute(pending_query).all()
        if store.engine.dialect.name == "postgresql":
            before = store.clock()
            server = session.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
            after = store.clock()
            # The server read its clock somewhere in the round trip: its middle, +- half.
            offset = (before + (after - before) / 2 - server).total_seconds()
    samples: list[Sample] = [
        ("tasks_in_flight", (("status", status),), float(by_status.get(status, 0)))
        for status in _IN_FLIGHT
    ]
    samples += [
        ("tasks_due_for_poll", (("provider", provider),), float(due.get(provider, 0)))
        for provider in providers
    ]
    counts = {True: 0, False: 0}
    oldest: datetime | None = None
    for enabled, count, first in pending:
        counts[bool(enabled)] += count
        if enabled and first is not None:
            oldest = first
    samples += [
        ("deliveries_pending", (("paused", "false"),), float(counts[True])),
        ("deliveries_pending", (("paused", "true"),), float(counts[False])),
    ]
    age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    samples.append(("oldest_pending_delivery_age_seconds", (), age))
    if offset is not None:
        samples.append(("clock_offset_seconds", (), offset))
    return samples


# --- GET /metrics ----------------------------------------------------------------------------


def _check_metrics_token(request: Request, expected: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = hashlib.sha256(token.strip().encode("utf-8")).digest()
    wanted = hashlib.sha256(expected.encode("utf-8")).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, wanted):
        raise Unauthorized(
            "GET /metrics needs 'Authorization: Bearer <TASKRELAY_METRICS_TOKEN>'.",
            # As the management API says it (service/auth.py).
            code="invalid_token" if header.strip() else "missing_token",
        )


def collect_totals(runtime: Runtime) -> None:
    """Copy the counters kept outside :class:`Metrics` into the runtime's (the group-commit
    writer's and the outbox's own counts)."""
    committer, metrics = runtime.committer, runtime.metrics
    metrics.set_total("group_commit_batches_total", float(committer.batches))
    metrics.set_total("group_commit_updates_total", float(committer.updates))
    metrics.set_total("callback_receipts_dropped_total", float(runtime.store.receipts_dropped))
    metrics.set_total("put_aside_missed_total", float(runtime.outbox.missed_by_window))


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format: this process's counters and histograms (of ``serve --workers
    N``: every worker's, added up), plus queue depths read
    from the database now. Behind ``TASKRELAY_METRICS_TOKEN`` when it is set."""
    runtime = runtime_of(request)
    if runtime.settings.metrics_token is not None:
        _check_metrics_token(request, runtime.settings.metrics_token.reveal())
    scraped: list[Sample] = []
    try:
        scraped += await asyncio.wait_for(
            run_in_threadpool(queue_depths, runtime.store, list(runtime.settings.providers)),
            timeout=SCRAPE_TIMEOUT_SECONDS,
        )
        scraped.append(("database_up", (), 1.0))
    except (StoreUnavailable, TimeoutError):
        scraped.append(("database_up", (), 0.0))
    scraped.append(("group_commit_queue_depth", (), float(runtime.committer.waiting)))
    if runtime.worker_metrics is not None:
        metrics = await run_in_threadpool(runtime.worker_metrics.combined)
    else:
        collect_totals(runtime)
        metrics = runtime.metrics
    return Response(
        render(metrics, scraped),
        media_type=CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )
