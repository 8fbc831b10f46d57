"""Operations: ``GET /metrics`` (Prometheus text format 0.0.4, read back by a strict parser
below), request ids, and the context every JSON log line carries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import metrics as metrics_module
from service.errors import SettingsError, StoreUnavailable
from service.lifecycle import TaskUpdate
from service.logs import configure_logging, json_handler
from service.metrics import FAMILIES, Metrics, depth_queries, render
from service.models import Task, TaskStatus, UpdateSource
from service.observe import MAX_REQUEST_ID, ObservedStarlette, accepted_request_id
from service.runtime import Runtime
from service.settings import PROVIDERS
from tests.conftest import altered, auth, make_settings, serving
from tests.test_callbacks import DONE, evolink_body
from tests.test_scheduler import FakeClock

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_TOKEN = "metrics-token-0123456789"
HOOK = "http://127.0.0.1:9/hooks/{name}"

# --- a strict reader of the text exposition format (0.0.4) --------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_SAMPLE_RE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_PAIR_RE = re.compile(rf'({_LABEL})="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


@dataclass
class MetricFamily:
    name: str
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, **labels: str) -> float:
        """The one sample (not a histogram's) with exactly these labels."""
        found = [v for n, lb, v in self.samples if n == self.name and lb == labels]
        assert len(found) == 1, (self.name, labels, self.samples)
        return found[0]

    def total(self, suffix: str = "", **labels: str) -> float:
        """Sum over the samples named ``name + suffix`` whose labels include ``labels``."""
        return sum(
            v
            for n, lb, v in self.samples
            if n == self.name + suffix and labels.items() <= lb.items()
        )


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _PAIR_RE.match(text, position)
        assert match, f"bad label set {text!r} at {position}"
        assert match.group(1) not in labels, f"label {match.group(1)} twice"
        labels[match.group(1)] = _unescape(match.group(2))
        position = match.end()
        if position < len(text):
            assert text[position] == ",", text
            position += 1
    return labels


def _parse_value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"-?\d+(\.\d+)?([eE][+-]?\d+)?", text), text
    return float(text)


def parse_exposition(text: str) -> dict[str, MetricFamily]:
    """Every family, with HELP and TYPE before its samples, its samples together, histograms
    complete and cumulative; anything else fails an assertion."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, MetricFamily] = {}
    current: MetricFamily | None = None
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and name not in families, line
            assert help_text, line
            current = families[name] = MetricFamily(name, help=help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current.name == name and not current.type, line
            assert kind in _SUFFIXES, line
            assert not current.samples, "TYPE comes before the samples"
            current.type = kind
        else:
            assert not line.startswith("#") and line, f"unexpected line {line!r}"
            match = _SAMPLE_RE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels_text, value_text = match.groups()
            assert current is not None and current.type, line
            assert name in {current.name + s for s in _SUFFIXES[current.type]}, (
                f"{name} outside its family {current.name}"
            )
            labels = _parse_labels(labels_text or "")
            series = (name, tuple(sorted(labels.items())))
            assert series not in seen_series, f"duplicate series {line!r}"
            seen_series.add(series)
            current.samples.append((name, labels, _parse_value(value_text)))
    for family in families.values():
        assert family.type, family.name
        if family.type == "counter":
            assert family.name.endswith("_total"), family.name
            assert all(v >= 0 for _, _, v in family.samples), family.name
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: MetricFamily) -> None:
    groups: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        group = groups.setdefault(key, {"buckets": []})
        suffix = name[len(family.name) :]
        if suffix == "_bucket":
            group["buckets"].append((_parse_value(labels["le"]), value))
        else:
            group[suffix] = value
    for key, group in groups.items():
        bounds = [bound for bound, _ in group["buckets"]]
        counts = [count for _, count in group["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (family.name, key)
        assert counts == sorted(counts), f"{family.name}{key}: buckets not cumulative"
        assert counts[-1] == group["_count"], f"{family.name}{key}: +Inf bucket != _count"
        assert "_sum" in group, (family.name, key)


REQUIRED = {
    "taskrelay_callbacks_total": "counter",
    "taskrelay_callback_duration_seconds": "histogram",
    "taskrelay_status_queries_total": "counter",
    "taskrelay_status_query_duration_seconds": "histogram",
    "taskrelay_submissions_total": "counter",
    "taskrelay_deliveries_total": "counter",
    "taskrelay_deliveries_dead_lettered_total": "counter",
    "taskrelay_delivery_attempt_duration_seconds": "histogram",
    "taskrelay_tasks_expired_total": "counter",
    "taskrelay_tasks_in_flight": "gauge",
    "taskrelay_tasks_due_for_poll": "gauge",
    "taskrelay_deliveries_pending": "gauge",
    "taskrelay_oldest_pending_delivery_age_seconds": "gauge",
    "taskrelay_group_commit_queue_depth": "gauge",
    "taskrelay_group_commit_batches_total": "counter",
    "taskrelay_group_commit_updates_total": "counter",
    "taskrelay_database_up": "gauge",
}


# --- the harness: a fake clock, the sandbox, no background loops (tests drive them) -------------


class Subscriber:
    """Webhook endpoints at /hooks/{name}, answering ``status[name]`` (200 by default)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.received: list[str] = []

        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            self.received.append(name)
            return Response(status_code=self.status.get(name, 200))

        self.app = Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])


@dataclass
class Harness:
    app: Starlette
    client: httpx.AsyncClient
    clock: FakeClock
    subscriber: Subscriber

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert isinstance(runtime, Runtime)
        return runtime

    async def scrape(self, **headers: str) -> dict[str, MetricFamily]:
        response = await self.client.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == CONTENT_TYPE
        return parse_exposition(response.text)

    async def track(self, provider: str = "evolink") -> tuple[str, str]:
        response = await self.client.post(
            "/v1/tasks/track", json={"provider": provider}, headers=auth()
        )
        assert response.status_code == 201, response.text
        task = response.json()
        return task["id"], httpx.URL(task["callback_url"]).path

    def update(self, task_id: str, status: TaskStatus, progress: int | None = None) -> None:
        self.runtime.store.apply_update(
            task_id, TaskUpdate(status=status, progress=progress), UpdateSource.poll
        )


async def start(settings: Any, clock: FakeClock) -> AsyncIterator[Harness]:
    subscriber = Subscriber()
    async with serving(
        settings,
        webhook_app=subscriber.app,
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    ) as (app, client):
        yield Harness(app, client, clock, subscriber)


def harness_settings(database_url: str, tmp_path: Path, **overrides: str) -> Any:
    return make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_DISPATCHER="false",
        TASKRELAY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        TASKRELAY_SUBMIT_ATTEMPTS="2",
        TASKRELAY_SUBMIT_BACKOFF="1ms",
        **overrides,
    )


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async for value in start(harness_settings(database_url, tmp_path), FakeClock()):
        yield value


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line, formatted as in production (JSON, with the log context), at the levels
    ``configure_logging`` sets (httpx's request lines, with their URLs, off)."""
    stream = io.StringIO()
    handler = json_handler(stream)
    root, client = logging.getLogger(), logging.getLogger("httpx")
    levels = root.level, client.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    client.setLevel(logging.WARNING)
    yield stream
    root.removeHandler(handler)
    root.setLevel(levels[0])
    client.setLevel(levels[1])


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- the exposition ------------------------------------------------------------------------------


async def test_every_family_is_listed_with_help_and_type(harness: Harness) -> None:
    response = await harness.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    families = parse_exposition(response.text)
    for name, kind in REQUIRED.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].help, name
    assert set(REQUIRED) <= {f"taskrelay_{name}" for name in FAMILIES}
    assert families["taskrelay_database_up"].value() == 1


def test_render_escapes_label_values_and_undeclared_names() -> None:
    metrics = Metrics()
    metrics.inc("callbacks_total", provider='ev"il\\\nname', outcome="applied")
    metrics.set("something_new", 2.5)
    families = parse_exposition(render(metrics))
    (sample,) = families["taskrelay_callbacks_total"].samples
    assert sample[1] == {"outcome": "applied", "provider": 'ev"il\\\nname'}
    assert families["taskrelay_something_new"].type == "gauge"
    assert families["taskrelay_something_new"].value() == 2.5


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    metrics = Metrics()
    for value in (0.001, 0.003, 0.003, 0.2, 100.0):
        metrics.observe("callback_duration_seconds", value, provider="evolink")
    family = parse_exposition(render(metrics))["taskrelay_callback_duration_seconds"]
    buckets = {
        labels["le"]: value for name, labels, value in family.samples if name.endswith("_bucket")
    }
    assert buckets["0.001"] == 1  # an observation on a bound counts in that bucket
    assert buckets["0.0025"] == 1
    assert buckets["0.005"] == 3
    assert buckets["0.25"] == 4
    assert buckets["10"] == 4
    assert buckets["+Inf"] == 5
    assert family.total("_count") == 5
    assert family.total("_sum") == pytest.approx(100.207)
    assert metrics.histogram_count("callback_duration_seconds") == 5


# --- callbacks -----------------------------------------------------------------------------------


async def test_callback_counters_move_by_provider_and_outcome(harness: Harness) -> None:
    task_id, path = await harness.track()
    running = evolink_body("processing", 40)
    assert (await harness.client.post(path, json=running)).status_code == 200  # applied
    assert (await harness.client.post(path, json=running)).status_code == 200  # unchanged
    assert (await harness.client.post(path, json=DONE)).status_code == 200  # applied
    assert (await harness.client.post(path, json=DONE)).status_code == 200  # terminal
    bad = await harness.client.post(path, content=b"not json", headers={"content-type": "x/y"})
    assert bad.status_code == 400  # rejected
    forged = altered(path, -4)
    assert (await harness.client.post(forged, json=DONE)).status_code == 401
    wrong = path.replace("/evolink/", "/grsai/")
    assert (await harness.client.post(wrong, json=DONE)).status_code == 403
    stranger = "/callbacks/" + "x" * 40 + "/token"
    assert (await harness.client.post(stranger, json=DONE)).status_code == 404
    big = b"{" + b" " * harness.runtime.settings.max_body_bytes + b"}"
    assert (await harness.client.post(path, content=big)).status_code == 413

    families = await harness.scrape()
    callbacks = families["taskrelay_callbacks_total"]
    assert callbacks.value(provider="evolink", outcome="applied") == 2
    assert callbacks.value(provider="evolink", outcome="unchanged") == 1
    assert callbacks.value(provider="evolink", outcome="terminal") == 1
    assert callbacks.value(provider="evolink", outcome="rejected") == 1
    assert callbacks.value(provider="evolink", outcome="invalid_token") == 1
    assert callbacks.value(provider="evolink", outcome="too_large") == 1
    assert callbacks.value(provider="grsai", outcome="wrong_provider") == 1
    # The path is the sender's to choose: an unknown provider is one label, not a new series.
    assert callbacks.value(provider="unknown", outcome="not_found") == 1
    assert "x" * 40 not in json.dumps(callbacks.samples)
    durations = families["taskrelay_callback_duration_seconds"]
    assert durations.total("_count", provider="evolink") == 7
    assert durations.total("_count") == callbacks.total()
    assert harness.runtime.metrics.counter("callbacks_total", outcome="applied") == 2
    committer = harness.runtime.committer
    assert families["taskrelay_group_commit_updates_total"].value() == committer.updates >= 4
    assert families["taskrelay_group_commit_batches_total"].value() == committer.batches
    assert families["taskrelay_group_commit_queue_depth"].value() == committer.waiting == 0
    assert task_id


# --- background work: submissions, status queries, deliveries ----------------------------------


async def test_submissions_and_their_log_lines(harness: Harness, logs: io.StringIO) -> None:
    response = await harness.client.post(
        "/v1/tasks",
        json={"provider": "evolink", "prompt": "a cat sandbox:submit_error=500"},
        headers={**auth(), "X-Request-ID": "submit-1"},
    )
    assert response.status_code == 202
    task_id = response.json()["id"]
    await harness.runtime.submitter.idle()
    ok = await harness.client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "a dog"}, headers=auth()
    )
    await harness.runtime.submitter.idle()

    submissions = (await harness.scrape())["taskrelay_submissions_total"]
    assert submissions.value(provider="evolink", outcome="retrying") == 1
    assert submissions.value(provider="evolink", outcome="failed") == 1
    assert submissions.value(provider="evolink", outcome="accepted") == 1
    # The background submission's lines name its task, and the request that started it.
    background = [line for line in lines(logs) if "submission of" in line["message"]]
    assert len(background) == 2
    for line in background:
        assert line["task_id"] == task_id
        assert line["provider"] == "evolink"
        assert line["request_id"] == "submit-1"
        assert line["pid"] == os.getpid()  # which worker process wrote it
    assert ok.status_code == 202


async def test_status_queries_are_counted_and_timed_per_provider(
    harness: Harness, logs: io.StringIO
) -> None:
    sandbox = harness.app.state.sandbox
    sandbox.set_behaviour("*", {"callback": "drop"})
    response = await harness.client.post(
        "/v1/tasks",
        json={
            "provider": "evolink",
            "prompt": "q sandbox:duration=5 sandbox:status_errors=1 sandbox:status_error=503",
        },
        headers=auth(),
    )
    task_id = response.json()["id"]
    await harness.runtime.submitter.idle()
    scheduler = harness.runtime.scheduler
    for _ in range(100):
        await scheduler.run_until_idle()
        if harness.runtime.store.get_task("alice", task_id)["status"] == "succeeded":
            break
        harness.clock.advance(5)
    else:
        raise AssertionError("the task did not finish")

    families = await harness.scrape()
    queries = families["taskrelay_status_queries_total"]
    assert queries.value(provider="evolink", outcome="upstream_unavailable") == 1
    assert queries.value(provider="evolink", outcome="ok") >= 1
    timed = families["taskrelay_status_query_duration_seconds"]
    assert timed.total("_count", provider="evolink") == queries.total(provider="evolink")
    # Background lines carry the task, and no request id: no request was being handled.
    (failed,) = [line for line in lines(logs) if "status query for" in line["message"]]
    assert failed["task_id"] == task_id and failed["provider"] == "evolink"
    assert "request_id" not in failed


async def test_deliveries_are_counted_by_outcome_and_timed(harness: Harness) -> None:
    for name in ("ok", "broken"):
        response = await harness.client.post(
            "/v1/subscriptions", json={"url": HOOK.format(name=name)}, headers=auth()
        )
        assert response.status_code == 201, response.text
    harness.subscriber.status["broken"] = 500
    task_id, _ = await harness.track()
    harness.update(task_id, TaskStatus.succeeded)
    await harness.runtime.dispatcher.run_until_idle()
    families = await harness.scrape()
    deliveries = families["taskrelay_deliveries_total"]
    sent = len(harness.subscriber.received)
    assert sent >= 2
    assert deliveries.total() == sent
    assert deliveries.value(outcome="succeeded") == harness.subscriber.received.count("ok")
    assert deliveries.value(outcome="failed") == harness.subscriber.received.count("broken")
    timed = families["taskrelay_delivery_attempt_duration_seconds"]
    assert timed.total("_count") == sent
    # The broken subscriber's deliveries wait for their retry.
    assert families["taskrelay_deliveries_pending"].value(paused="false") >= 1


# --- queue depths from the database --------------------------------------------------------------


def database_counts(harness: Harness) -> tuple[Counter[str], Counter[str]]:
    """Tasks by status, and due tasks by provider, counted row by row in Python."""
    now = harness.clock.now()
    with harness.runtime.store.transaction(write=False) as session:
        tasks = list(session.exec(select(Task)))
    statuses = Counter(task.status for task in tasks)
    due = Counter(
        task.provider
        for task in tasks
        if task.next_check_at is not None and task.next_check_at <= now
    )
    return statuses, due


async def test_queue_depth_gauges_match_the_database(harness: Harness) -> None:
    ids = [(await harness.track(provider))[0] for provider in ("evolink", "evolink", "grsai")]
    harness.update(ids[0], TaskStatus.running, progress=30)
    finished, _ = await harness.track("apiinone")
    harness.update(finished, TaskStatus.succeeded)

    for advance in (0.0, 90.0, 4000.0):  # nothing due yet; some; all (past the deadline)
        harness.clock.advance(advance)
        families = await harness.scrape()
        statuses, due = database_counts(harness)
        in_flight = families["taskrelay_tasks_in_flight"]
        assert in_flight.value(status="queued") == statuses.get("queued", 0) == 2
        assert in_flight.value(status="running") == statuses.get("running", 0) == 1
        polls = families["taskrelay_tasks_due_for_poll"]
        for provider in PROVIDERS:
            assert polls.value(provider=provider) == due.get(provider, 0), (advance, provider)
    assert families["taskrelay_tasks_due_for_poll"].total() == 3


async def test_oldest_pending_delivery_age_on_a_fake_clock(harness: Harness) -> None:
    families = await harness.scrape()
    assert families["taskrelay_oldest_pending_delivery_age_seconds"].value() == 0
    assert families["taskrelay_deliveries_pending"].total() == 0

    active = await harness.client.post(
        "/v1/subscriptions", json={"url": HOOK.format(name="a")}, headers=auth()
    )
    paused = await harness.client.post(
        "/v1/subscriptions", json={"url": HOOK.format(name="p")}, headers=auth()
    )
    first, _ = await harness.track()  # task.submitted: one delivery to each subscription
    harness.clock.advance(30)
    await harness.track()
    harness.clock.advance(60)
    response = await harness.client.patch(
        f"/v1/subscriptions/{paused.json()['id']}", json={"enabled": False}, headers=auth()
    )
    assert response.status_code == 200
    harness.clock.advance(30)  # a paused subscription's older backlog does not count

    families = await harness.scrape()
    pending = families["taskrelay_deliveries_pending"]
    assert pending.value(paused="false") == 2
    assert pending.value(paused="true") == 2
    assert families["taskrelay_oldest_pending_delivery_age_seconds"].value() == 120
    # Delivered: the next oldest is the second task's (90 s).
    with harness.runtime.store.transaction(write=True) as session:
        session.execute(
            sa.text(
                "UPDATE delivery SET status = 'succeeded' WHERE pk = (SELECT min(pk) FROM "
                "delivery WHERE subscription_pk = (SELECT pk FROM subscription WHERE id = :id))"
            ),
            {"id": active.json()["id"]},
        )
    families = await harness.scrape()
    assert families["taskrelay_oldest_pending_delivery_age_seconds"].value() == 90
    assert first


async def test_scrape_queries_are_index_driven(harness: Harness) -> None:
    engine = harness.runtime.engine
    queries = depth_queries(list(PROVIDERS), harness.clock.now())
    with engine.connect() as connection:
        for query in queries:
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            if engine.dialect.name == "sqlite":
                plan = " | ".join(
                    row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
                )
                assert "SCAN" not in plan, plan
                assert "INDEX" in plan, plan
            else:
                # Tiny test tables make a sequential scan cheapest; forbid it to see the index
                # the planner would use on a real table.
                connection.exec_driver_sql("SET enable_seqscan = off")
                plan = " | ".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + sql))
                assert "Seq Scan on task" not in plan, plan
                assert "Seq Scan on delivery" not in plan, plan


async def test_a_database_outage_still_serves_the_process_metrics(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*args: Any) -> Any:
        raise StoreUnavailable("down")

    harness.runtime.metrics.inc("callbacks_total", provider="evolink", outcome="applied")
    monkeypatch.setattr(metrics_module, "queue_depths", unavailable)
    families = await harness.scrape()
    assert families["taskrelay_database_up"].value() == 0
    assert families["taskrelay_tasks_in_flight"].samples == []
    assert families["taskrelay_callbacks_total"].total() == 1


async def test_the_clock_offset_from_postgresql_is_a_gauge(
    database_url: str, tmp_path: Path
) -> None:
    """Replicas compare times each of them wrote, so each one's clock against the database
    server's is scraped: here a process clock 30 s ahead. SQLite has one process and no
    server clock: no sample."""
    settings = harness_settings(database_url, tmp_path)
    ahead = lambda: datetime.now(UTC) + timedelta(seconds=30)  # noqa: E731
    async with serving(settings, webhook_app=Starlette(), clock=ahead) as (app, client):
        response = await client.get("/metrics")
        family = parse_exposition(response.text)["taskrelay_clock_offset_seconds"]
        assert family.type == "gauge"
        if app.state.runtime.engine.dialect.name == "sqlite":
            assert family.samples == []
        else:
            assert 29 < family.value() < 31, family.samples


# --- metrics auth --------------------------------------------------------------------------------


async def test_metrics_token_when_set(database_url: str, tmp_path: Path) -> None:
    settings = harness_settings(database_url, tmp_path, TASKRELAY_METRICS_TOKEN=METRICS_TOKEN)
    async for harness in start(settings, FakeClock()):
        missing = await harness.client.get("/metrics")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"]["code"] == "missing_token"  # as the README's table says
        wrong = await harness.client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_token"
        api_token = await harness.client.get("/metrics", headers=auth())
        assert api_token.status_code == 401
        await harness.scrape(Authorization=f"Bearer {METRICS_TOKEN}")


def test_metrics_token_setting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert make_settings(url, tmp_path).metrics_token is None
    settings = make_settings(url, tmp_path, TASKRELAY_METRICS_TOKEN=METRICS_TOKEN)
    assert settings.metrics_token is not None
    assert settings.metrics_token.reveal() == METRICS_TOKEN
    assert METRICS_TOKEN not in repr(settings)
    with pytest.raises(SettingsError, match="TASKRELAY_METRICS_TOKEN"):
        make_settings(url, tmp_path, TASKRELAY_METRICS_TOKEN="short")


# --- request ids and log lines -------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return Response("ok")


async def raw_request(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """One GET /healthz straight through ASGI (httpx would refuse some of these headers)."""
    app = ObservedStarlette(routes=[Route("/healthz", healthz)])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 4000),
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    (start_message,) = [m for m in messages if m["type"] == "http.response.start"]
    assert start_message["status"] == 200
    names = [name for name, _ in start_message["headers"]]
    assert names.count(b"x-request-id") == 1
    return dict(start_message["headers"])


async def test_request_id_is_echoed_or_generated(harness: Harness) -> None:
    given = await harness.client.get("/healthz", headers={"X-Request-ID": "abc-123:x/y=="})
    assert given.headers["x-request-id"] == "abc-123:x/y=="
    made = await harness.client.get("/healthz")
    other = await harness.client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert made.headers["x-request-id"] != other.headers["x-request-id"]
    longest = "r" * MAX_REQUEST_ID
    response = await harness.client.get("/healthz", headers={"X-Request-ID": longest})
    assert response.headers["x-request-id"] == longest


@pytest.mark.parametrize(
    "hostile",
    [
        b"r" * (MAX_REQUEST_ID + 1),
        b"abc\ndef",
        b"abc\n",
        b"abc\r\nSet-Cookie: x=1",
        "caf\u00e9".encode(),
        b"\xff\xfe",
        b"a b",
        b'a"b',
        b"",
    ],
)
async def test_a_hostile_request_id_is_replaced_not_echoed(hostile: bytes) -> None:
    assert accepted_request_id(hostile) is None
    headers = await raw_request([(b"host", b"testserver"), (b"x-request-id", hostile)])
    assert re.fullmatch(rb"[0-9a-f]{32}", headers[b"x-request-id"])


async def test_log_lines_during_a_request_carry_its_id_and_task(
    harness: Harness, logs: io.StringIO
) -> None:
    task_id, path = await harness.track()
    response = await harness.client.post(
        path, content=b"{not json", headers={"X-Request-ID": "cb-req-1"}
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "cb-req-1"
    (rejected,) = [line for line in lines(logs) if "rejected" in line["message"]]
    assert rejected["request_id"] == "cb-req-1"
    assert rejected["task_id"] == task_id
    assert rejected["provider"] == "evolink"
    token = path.rsplit("/", 1)[1]
    assert token not in logs.getvalue()  # never a token, nor a callback URL


async def test_an_unhandled_error_has_a_request_id_in_its_response_and_log_line(
    harness: Harness, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.runtime.store, "get_task", broken)
    response = await harness.client.get(
        "/v1/tasks/tsk_x", headers={**auth(), "X-Request-ID": "r500"}
    )
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "r500"
    (line,) = [line for line in lines(logs) if line["message"].startswith("unhandled error")]
    assert line["request_id"] == "r500"
    assert line["task_id"] == "tsk_x"
    assert line["level"] == "error" and "boom" in line["exception"]


async def test_the_log_context_ends_with_the_request(harness: Harness, logs: io.StringIO) -> None:
    await harness.client.get("/v1/tasks/tsk_nope", headers={**auth(), "X-Request-ID": "gone"})
    logging.getLogger("service.test").info("after the request")
    (line,) = [line for line in lines(logs) if line["message"] == "after the request"]
    assert "request_id" not in line and "task_id" not in line


def test_explicit_extras_win_over_the_log_context(logs: io.StringIO) -> None:
    from service import observe

    token = observe.log_context.set(observe.LogContext("req", "tsk_a", "evolink"))
    try:
        logging.getLogger("service.test").info("x", extra={"provider": "grsai"})
    finally:
        observe.log_context.reset(token)
    (line,) = lines(logs)
    assert (line["request_id"], line["task_id"], line["provider"]) == ("req", "tsk_a", "grsai")


def test_psycopg_pipeline_exit_warning_is_dropped_and_its_other_warnings_kept() -> None:
    """Leaving pipeline mode on a lost connection, psycopg warns of a second error while the
    first is on its way out (and reported by TaskRelay): that warning is dropped, once
    ``configure_logging`` has run (twice here: the filter is added once); psycopg's other
    warnings go through."""
    root, psycopg_logger = logging.getLogger(), logging.getLogger("psycopg")
    saved = root.handlers[:], root.level, psycopg_logger.filters[:]
    quietened = {name: logging.getLogger(name).level for name in ("httpx", "uvicorn.access")}
    stream = io.StringIO()
    try:
        configure_logging("INFO")
        configure_logging("INFO")
        root.handlers[:] = [json_handler(stream)]
        assert len(psycopg_logger.filters) == len(saved[2]) + 1
        psycopg_logger.warning(
            "error ignored terminating %r: %s", "<psycopg.Pipeline [BAD]>", "the connection is lost"
        )
        psycopg_logger.warning("couldn't connect to %s", "127.0.0.1")
    finally:
        root.handlers[:], psycopg_logger.filters[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        for name, level in quietened.items():
            logging.getLogger(name).setLevel(level)
    assert [line["message"] for line in lines(stream)] == ["couldn't connect to 127.0.0.1"]


# --- serve --workers N: one sum over the workers -------------------------------------------------


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_worker_metrics_add_up_and_never_go_back(tmp_path: Path) -> None:
    """Each worker of `serve --workers N` counts on its own and a scrape reaches one of them:
    the counters jumped between the workers' values, which Prometheus reads as resets. Each
    now answers the sum of all, its own as it is and the others' as they last wrote it; a
    worker gone keeps its counts in the sum."""
    first, second = Metrics(), Metrics()
    one = metrics_module.WorkerMetrics(tmp_path, first, name="1")
    two = metrics_module.WorkerMetrics(tmp_path, second, name="2")
    first.inc("callbacks_total", 3, provider="evolink", outcome="applied")
    first.observe("callback_duration_seconds", 0.002, provider="evolink")
    second.inc("callbacks_total", 4, provider="evolink", outcome="applied")
    second.observe("callback_duration_seconds", 0.2, provider="evolink")
    two.publish()
    total = one.combined()
    assert total.counter("callbacks_total", outcome="applied") == 7
    assert total.histogram_count("callback_duration_seconds", provider="evolink") == 2
    text = render(total)
    assert (
        _value(text, 'taskrelay_callback_duration_seconds_bucket{provider="evolink",le="0.005"}')
        == 1
    )
    assert (
        _value(text, 'taskrelay_callback_duration_seconds_bucket{provider="evolink",le="+Inf"}')
        == 2
    )
    # Scrapes alternate between the workers while both count: never lower than the last.
    seen = []
    for round_ in range(6):
        (first if round_ % 2 else second).inc(
            "callbacks_total", provider="evolink", outcome="applied"
        )
        answering = one if round_ % 2 else two
        seen.append(answering.combined().counter("callbacks_total"))
    assert seen == sorted(seen) and seen[-1] == 13
    # Worker 2 is gone (its file stays): its counts stay in worker 1's sums.
    first.inc("callbacks_total", provider="evolink", outcome="applied")
    assert one.combined().counter("callbacks_total") == 14


def test_worker_metrics_scraped_at_once_while_counting_never_go_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker writes its file from its ticker and from every scrape, on several threads:
    two writes at once shared one temporary file, so one could rename the other's half
    written file into place, and a sum skipped that worker (found in review)."""
    metrics = Metrics()
    mine = metrics_module.WorkerMetrics(tmp_path, metrics, name="1")
    other = Metrics()
    other.inc("callbacks_total", 5, provider="evolink", outcome="applied")
    metrics_module.WorkerMetrics(tmp_path, other, name="2").publish()
    counting = threading.Event()
    seen: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def count() -> None:
        for _ in range(20_000):
            metrics.inc("callbacks_total", provider="evolink", outcome="applied")
            metrics.observe("callback_duration_seconds", 0.01, provider="evolink")
        counting.set()

    def scrape(index: int) -> None:
        while not counting.is_set() or len(seen[index]) < 50:
            seen[index].append(mine.combined().counter("callbacks_total"))

    def publish() -> None:
        while not counting.is_set():
            mine.publish()

    threads = [threading.Thread(target=count), threading.Thread(target=publish)]
    threads += [threading.Thread(target=scrape, args=(index,)) for index in (0, 1, 2)]
    with caplog.at_level(logging.WARNING):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for values in seen.values():
        assert values == sorted(values) and values[0] >= 5
    assert mine.combined().counter("callbacks_total") == 20_005
    assert [r.getMessage() for r in caplog.records] == []


def dead_pid() -> int:
    """The pid of a process that has exited (not used again this soon)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def worker_file(directory: Path, applied: int, pid: int) -> str:
    """A worker's file as a worker with this pid that counted ``applied`` callbacks left it."""
    metrics = Metrics()
    metrics.inc("callbacks_total", applied, provider="evolink", outcome="applied")
    metrics.observe("callback_duration_seconds", 0.01, provider="evolink")
    worker = metrics_module.WorkerMetrics(directory, metrics, name=f"{pid}-{applied:08x}")
    worker.publish()
    return worker.path.name


def test_the_files_of_workers_gone_are_folded_into_one_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """uvicorn replaces a worker that died; each left its file, read at every scrape, so a
    crash loop made scrapes ever slower. A scrape folds them into one file; the sums stay."""
    mine = Metrics()
    mine.inc("callbacks_total", 1, provider="evolink", outcome="applied")
    me = metrics_module.WorkerMetrics(tmp_path, mine)
    alive = worker_file(tmp_path, 10, os.getppid())  # a running process: kept as it is
    first = worker_file(tmp_path, 100, dead_pid())
    second = worker_file(tmp_path, 1000, dead_pid())
    total = me.combined()
    assert total.counter("callbacks_total") == 1111
    assert total.histogram_count("callback_duration_seconds", provider="evolink") == 3
    names = {path.name for path in tmp_path.glob("*.json")}
    assert names == {me.path.name, alive, "retired.json"}
    retired = json.loads((tmp_path / "retired.json").read_text())
    assert sorted(retired["folded"]) == sorted([first, second])
    assert me.combined().counter("callbacks_total") == 1111  # again: nothing added twice
    # The next worker gone: folded too, and the names of files already removed are dropped.
    third = worker_file(tmp_path, 10_000, dead_pid())
    assert me.combined().counter("callbacks_total") == 11_111
    assert json.loads((tmp_path / "retired.json").read_text())["folded"] == [third]
    assert not (tmp_path / third).exists()
    assert render(me.combined()).count("taskrelay_callbacks_total{") == 1


def test_a_fold_cut_off_before_removing_the_files_counts_nothing_twice(tmp_path: Path) -> None:
    me = metrics_module.WorkerMetrics(tmp_path, Metrics())
    gone = worker_file(tmp_path, 7, dead_pid())
    me.combined()
    # As if the fold had stopped after writing the retired file, before removing the file:
    # the file is back.
    worker_file(tmp_path, 7, int(gone.split("-")[0]))
    retired = json.loads((tmp_path / "retired.json").read_text())
    (tmp_path / "retired.json").write_text(json.dumps({**retired, "folded": [gone]}))
    assert me.combined().counter("callbacks_total") == 7
    assert not (tmp_path / gone).exists()
    assert me.combined().counter("callbacks_total") == 7


def test_a_file_system_without_locks_sums_and_folds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock refused (ENOLCK: some network file systems) failed every scrape (review)."""

    def no_locks(*args: Any) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(metrics_module.fcntl, "flock", no_locks)
    me = metrics_module.WorkerMetrics(tmp_path, Metrics())
    gone = worker_file(tmp_path, 5, dead_pid())
    assert me.combined().counter("callbacks_total") == 5
    assert (tmp_path / gone).exists()  # not folded without the lock


def test_scrapes_folding_at_once_never_go_back_nor_count_twice(tmp_path: Path) -> None:
    """Two workers' scrapes fold the same dead workers' files at once, while more die: each
    scrape waits for the fold in progress, so none reads the folder halfway through."""
    scrapers = [
        metrics_module.WorkerMetrics(tmp_path, Metrics(), name=f"{os.getpid()}-{i}")
        for i in range(2)
    ]
    seen: dict[int, list[float]] = {0: [], 1: []}
    dying = threading.Event()

    def scrape(index: int) -> None:
        while not dying.is_set() or len(seen[index]) < 20:
            seen[index].append(scrapers[index].combined().counter("callbacks_total"))

    threads = [threading.Thread(target=scrape, args=(index,)) for index in seen]
    for thread in threads:
        thread.start()
    for _ in range(30):
        worker_file(tmp_path, 1, dead_pid())
    dying.set()
    for thread in threads:
        thread.join()
    for values in seen.values():
        assert values == sorted(values), values
    assert scrapers[0].combined().counter("callbacks_total") == 30
    assert scrapers[1].combined().counter("callbacks_total") == 30
    assert len(list(tmp_path.glob("*.json"))) == 3  # the two scrapers' and the retired file


def test_a_multi_worker_service_answers_the_same_counts_whichever_worker_is_scraped(
    tmp_path: Path,
) -> None:
    """Two workers on PostgreSQL; callbacks spread over both; every scrape, whichever worker
    answers it, has them all (found by exploratory testing: 22 and 15 in turn)."""
    from tests.conftest import migrated_postgres
    from tests.servers import ServiceProcess, wait_until

    with migrated_postgres("taskrelay_metrics") as database:
        service = ServiceProcess(
            {
                "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
                "TASKRELAY_DATABASE_URL": database.url,
                "TASKRELAY_API_TOKENS": "ops:metrics-workers-token-0123",
                "TASKRELAY_SECRET_KEY": "metrics-workers-secret-0123456789",
                "TASKRELAY_EVOLINK_API_KEY": "evolink-key",
            },
            "--workers",
            "2",
            log_path=tmp_path / "serve.log",
        )
        try:
            service.wait_ready()
            series = 'taskrelay_callbacks_total{outcome="invalid_token",provider="evolink"}'
            for _ in range(37):  # new connections: the kernel spreads them over the workers
                assert (
                    httpx.post(f"{service.url}/callbacks/evolink/bad", content=b"x").status_code
                    == 401
                )

            def scraped() -> float:
                return _value(httpx.get(f"{service.url}/metrics").text, series)

            deadline = time.monotonic() + 30
            while scraped() != 37 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [scraped() for _ in range(12)] == [37.0] * 12, service.logs()
            # A worker killed: uvicorn starts another; the dead one's counts stay in the
            # sums, and a scrape folds its file into the retired workers' one.
            (folder,) = (tmp_path / "data").glob(".metrics-*")
            files = {int(path.name.split("-")[0]): path for path in folder.glob("*-*.json")}
            assert len(files) == 2, files
            killed = min(files)
            os.kill(killed, signal.SIGKILL)

            def folded() -> bool:
                scraped_now = scraped()
                assert scraped_now == 37, service.logs()
                return not files[killed].exists() and (folder / "retired.json").exists()

            wait_until(folded, "the killed worker's metrics folded")
            alive = {int(path.name.split("-")[0]) for path in folder.glob("*-*.json")}
            assert killed not in alive
            assert [scraped() for _ in range(12)] == [37.0] * 12, service.logs()
        finally:
            service.stop()


@pytest.mark.parametrize("message", ["Task cancelled, timeout graceful shutdown exceeded", None])
async def test_a_request_cancelled_at_the_drains_end_is_answered_others_are_not(
    message: str | None,
) -> None:
    """uvicorn's cancellation at the end of its drain is answered 503 here and ends there;
    any other (a request run in its caller's task, cancelled with it) reaches the caller:
    swallowed, it made a cut-off submission to the mounted sandbox look like a 503."""
    from service.observe import RequestIds

    entered = asyncio.Event()

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await asyncio.sleep(3600)

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    request = asyncio.ensure_future(RequestIds(stuck)(scope, receive, send))
    await entered.wait()
    request.cancel(message)
    if message is None:
        with pytest.raises(asyncio.CancelledError):
            await request
        assert sent == []
        return
    await request
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and b"x-request-id" in headers
    assert json.loads(sent[1]["body"])["error"]["code"] == "cut_off_by_shutdown"
