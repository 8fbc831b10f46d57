"""Benchmark: the scale of the store (issue 6, benchmark 3), against small stores in the same run.

What it shows, on SQLite (a file in a temporary folder) and on PostgreSQL (a fresh database on
the server ``--database-url`` or ``$TASKRELAY_TEST_DATABASE_URL`` names, migrated with
``service.db.migrate`` and dropped afterwards; the URL's user needs ``CREATEDB``):

1. **Lookups over real HTTP.** A real ``taskrelay serve`` process (scheduler, dispatcher and
   submitter idle: nothing leaves the machine) on a store of ``--tasks`` tasks (default
   1,000,000; ``--in-flight`` of them, default 100,000, queued or running with a next check) and,
   as the baseline, another on a store of ``--baseline-tasks`` (1,000) built the same way. wrk
   (one thread, ``--connections`` connections, closed loop) sends ``GET /v1/tasks/{id}`` (random
   ids from across the whole store), ``GET /v1/tasks/{id}/events``, and the list endpoint's first
   page with and without ``status`` / ``provider`` filters: after a warm-up, ``--rounds`` rounds
   of ``--duration`` seconds in which the small and the large store take turns; the median
   round's percentiles are reported, with the server process's CPU time per request (which,
   unlike latency, hardly moves when other work competes for the cores; on SQLite it includes
   the database's work). The issue's targets: a task by id at p99 <= 5 ms, a first page at
   p99 <= 20 ms; each is also reported as a ratio to the small store.
2. **The background passes over due work.** In this process, directly on the database:
   ``Store.claim_due`` for every provider with the scheduler's limit (one scheduler pass) and
   ``Outbox.claim`` with the dispatcher's limit, each followed by handing the leases back (not
   timed), ``--iterations`` times, with ``--in-flight`` tasks in flight and again after all but
   ``--small-in-flight`` (1,000) of them were finished. The same share of the tasks in flight is
   due in both (``--due-share``), so both claim full batches, and the ratio of the two is the
   claim's growth with the work in flight. The delivery claim is timed with the retry backlog a
   flaky subscriber leaves (``--retry-share`` of the tasks in flight have a delivery waiting for
   its next attempt, with the task's newer event held behind it, plus the deliveries stranded
   on a disabled subscription) and without it. With the backlog, the first claim of each
   second also puts aside what cannot go (``Outbox._move_aside``), reading only what became
   due since the last; and a sweep through every due delivery, a process's first and one every
   10 minutes, reads a page of them (``MOVE_ASIDE_PAGE``) per claim until it is through (a
   process's first sweep is one pass, in its first claim). The store's clock stands
   still here, so a new ``Outbox`` sweeps in its first claim, one set as at the periodic
   sweep's start (``sweep_due``) reads a page per claim, and one set to a second after its
   last put-aside (``between_passes``) makes the windowed pass. Reported apart: the first
   claim on the backlog as loaded (it moves the backlog; put back before each call), a claim
   with a page of the periodic sweep, a page alone of as many due deliveries on both stores,
   the whole periodic sweep, the first claim once the backlog was moved, a windowed pass, and
   the other claims.
3. **The query plans** of every hot query: the SQL is captured (a ``before_cursor_execute``
   listener) while the real ``Store``/``Outbox`` methods run, then explained with the same
   parameters: ``EXPLAIN QUERY PLAN`` on SQLite (which, like the service, never runs ``ANALYZE``
   there), ``EXPLAIN (ANALYZE, BUFFERS)`` on PostgreSQL (inside a transaction that is rolled
   back; the database is ``VACUUM ANALYZE``d after loading, as autovacuum would). Each statement
   is also run once more on the large and on the small store, counting its work (SQLite virtual
   machine steps, PostgreSQL shared buffers). Flagged: full table scans (``SCAN task`` without an
   index; ``Seq Scan`` on a table of more than 10,000 rows), sorts of every matching row, many
   rows read only to be thrown away, and work that grows with the store (10x the small store's
   or more: an index lookup grows with the index's depth, a few times at most).

The store is built in SQL (``INSERT ... SELECT`` over ``generate_series`` or a recursive CTE;
no rows travel through Python): tasks spread over four clients (alice 70 %, bob 20 %, carol
7 %, dave 3 %) and the five providers, the newest of them in flight (60 % running), the rest
final (85 % succeeded, 10 % failed, 3 % expired, 2 % canceled); 1 to 3 history events per task
(about 2.4 on average) with the task snapshot each carries; a callback receipt with a raw
EvoLink-shaped body for about half of the tasks; endpoint subscriptions (alice's on final
events, over all time; alice's EvoLink tasks, bob's and dave's disabled one over the last hour)
and a ``notify_url`` subscription on 3 % of the tasks, with their deliveries (succeeded, except
for the tasks in flight: see above). Loading 1M tasks takes a few minutes per database.

Run from the repository root: ``.venv/bin/python bench/store_scale.py`` (``--help`` for the
options; ``--tasks 100000 --in-flight 10000`` for a quick run, ``--json`` for JSON,
``--no-sqlite`` / ``--no-postgres`` to run one database, ``--no-http`` / ``--no-plans`` /
``--no-claims`` to skip a part). It needs ``wrk`` for the HTTP part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.ingest import ServerProcess, free_port, fresh_postgres, service_revision
from service.db import make_engine, migrate
from service.lifecycle import TaskUpdate
from service.models import ClientSecret, Subscription, TaskOrigin, TaskStatus, UpdateSource
from service.outbox import (
    MOVE_ASIDE_EVERY,
    MOVE_ASIDE_FULL_EVERY,
    MOVE_ASIDE_OVERLAP,
    MOVE_ASIDE_PAGE,
    AttemptResult,
    DeliveryJob,
    Outbox,
    _Sweep,
)
from service.settings import PROVIDERS
from service.store import Store, TaskFilter

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_ENV = "TASKRELAY_TEST_DATABASE_URL"
DB_PREFIX = "taskrelay_bench_scale_"
SECRET_KEY = "bench-scale-secret-key-0123456789"
# Clients and their share of the tasks (percent).
OWNERS = (("alice", 70), ("bob", 20), ("carol", 7), ("dave", 3))
TOKENS = {owner: f"{owner}-token-0123456789" for owner, _ in OWNERS}
# Providers and their share of the tasks (percent).
PROVIDER_SHARES = (
    ("evolink", 40),
    ("grsai", 20),
    ("apiinone", 15),
    ("gptimage15", 15),
    ("openai", 10),
)
# The tasks in flight are created over the last this many seconds; the others over 30 days.
IN_FLIGHT_SPAN_SECONDS = 3000
HISTORY_SPAN_SECONDS = 30 * 86400
# What the background loops ask for with default settings (service/settings.py): the
# scheduler claims max(poll_concurrency, poll_rate x PASS_SECONDS) per provider, the dispatcher
# as many deliveries as it has free slots.
SCHEDULER_CLAIM_LIMIT = 10
DISPATCHER_CLAIM_LIMIT = 32
LEASE_SECONDS = 60.0
OTHER_WORKER = "bench-other-process"
# The targets.
TARGET_GET_P99_MS = 5.0
TARGET_LIST_P99_MS = 20.0
# A claim whose cost at the large in-flight count is within this factor counts as flat.
FLAT_RATIO = 1.5
# Plans: a table with more rows than this is large; a sort or filter over more rows is flagged.
LARGE_TABLE_ROWS = 10_000
FLAG_ROWS = 1_000
# A statement doing this many times the work it does on the small store (1,000 times smaller)
# grows with the store; an index lookup grows with its depth, a few times at most. Below the
# floors (SQLite VM steps, PostgreSQL buffers) the work is too small to matter.
GROWTH_FLAG = 10.0
GROWTH_FLOOR_STEPS = 20_000
GROWTH_FLOOR_BUFFERS = 200
SQLITE_STEPS_PER_CALL = 100
TABLES = (
    "task",
    "task_event",
    "callback_receipt",
    "subscription",
    "client_secret",
    "delivery",
    "delivery_attempt",
)
READY_TIMEOUT_SECONDS = 120.0
WARMUP_SECONDS = 2
ID_SAMPLE = 5000
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
        "TASKRELAY_SCHEDULER",
        "TASKRELAY_DISPATCHER",
        "TASKRELAY_SANDBOX",
        "TASKRELAY_RATE_LIMIT",
        "TASKRELAY_RATE_LIMIT_BURST",
        PG_ENV,
    }
)


# --- the store's contents -------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    tasks: int
    in_flight: int
    due_share: float  # of the tasks in flight: next check (and newest delivery) already due
    retry_share: float  # of the tasks in flight: a delivery waiting to be retried

    @property
    def window(self) -> int:
        """The newest ``window`` tasks hold every task in flight: four in five of them."""
        return 5 * (self.in_flight // 4) + self.in_flight % 4


def _hash(column: str, salt: int) -> str:
    """A pseudo-random percentile (0-99) of an integer column, independent for each salt."""
    return f"((({column}) * {salt}) % 1000003) % 100"


# Salts for _hash: one per independent attribute of a task.
H_OWNER, H_PROVIDER, H_ORIGIN, H_STATUS, H_DUE, H_SPREAD, H_MISC = (
    7919,
    104729,
    15485863,
    32452843,
    49979687,
    67867967,
    86028121,
)


class Dialect:
    """The few expressions the loader writes differently for SQLite and PostgreSQL."""

    def __init__(self, name: str, now: datetime) -> None:
        self.name = name
        self.sqlite = name == "sqlite"
        self.base = now.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S")

    def series(self, count: int) -> str:
        """A CTE ``g(i)``: 1..count."""
        if self.sqlite:
            return f"g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {count})"
        return f"g(i) AS (SELECT generate_series(1::bigint, {count}::bigint))"

    def obj(self, *pairs: str) -> str:
        return f"{'json_object' if self.sqlite else 'jsonb_build_object'}({', '.join(pairs)})"

    def arr(self, *items: str) -> str:
        return f"{'json_array' if self.sqlite else 'jsonb_build_array'}({', '.join(items)})"

    def nested(self, column: str) -> str:
        """A JSON column's value inside a JSON object (SQLite keeps JSON as text)."""
        return f"json({column})" if self.sqlite else column

    def at(self, seconds: str) -> str:
        """The benchmark's "now" plus ``seconds`` (an SQL integer expression), as stored."""
        if self.sqlite:
            return (
                f"(strftime('%Y-%m-%d %H:%M:%S', '{self.base}', ({seconds}) || ' seconds') "
                "|| '.000000')"
            )
        return f"(TIMESTAMP '{self.base}' + ({seconds}) * INTERVAL '1 second')"

    def shift(self, column: str, seconds: int) -> str:
        if self.sqlite:
            return f"(strftime('%Y-%m-%d %H:%M:%S', {column}, '{seconds:+d} seconds') || '.000000')"
        return f"({column} + INTERVAL '{seconds} seconds')"

    def iso(self, column: str) -> str:
        if self.sqlite:
            return f"(replace({column}, ' ', 'T') || 'Z')"
        return f"""to_char({column}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

    def token(self, prefix: str) -> str:
        """A random id shaped like ``new_id`` (prefix and 22 characters)."""
        if self.sqlite:
            return f"('{prefix}_' || lower(hex(randomblob(11))))"
        return f"('{prefix}_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 22))"

    def blob(self, text: str) -> str:
        return f"CAST({text} AS BLOB)" if self.sqlite else f"convert_to({text}, 'UTF8')"

    def text(self, expr: str) -> str:
        return f"CAST({expr} AS TEXT)"

    @property
    def false(self) -> str:
        return "0" if self.sqlite else "false"

    @property
    def true(self) -> str:
        return "1" if self.sqlite else "true"


def _case(column: str, shares: Sequence[tuple[str, int]]) -> str:
    """CASE over a percentile: the first ``shares`` value whose cumulative share covers it."""
    parts, total = [], 0
    for value, share in shares[:-1]:
        total += share
        parts.append(f"WHEN {column} < {total} THEN '{value}'")
    return f"(CASE {' '.join(parts)} ELSE '{shares[-1][0]}' END)"


def task_insert(sql: Dialect, population: Population) -> str:
    n, window = population.tasks, population.window
    due = round(population.due_share * 100)
    live = f"(r < {window} AND r % 5 <> 4)"
    age = (
        f"(CASE WHEN r < {window} THEN (r * {IN_FLIGHT_SPAN_SECONDS}) / {window} "
        f"ELSE {IN_FLIGHT_SPAN_SECONDS} + ((r - {window}) * {HISTORY_SPAN_SECONDS}) / "
        f"{n - window + 1} END)"
    )
    status = (
        "(CASE WHEN live = 1 THEN (CASE WHEN h_status < 60 THEN 'running' ELSE 'queued' END) "
        "WHEN h_status < 85 THEN 'succeeded' WHEN h_status < 95 THEN 'failed' "
        "WHEN h_status < 98 THEN 'expired' ELSE 'canceled' END)"
    )
    request = sql.obj(
        "'prompt'",
        "'A watercolour lighthouse at dusk, soft light, order ' || " + sql.text("i"),
        "'size'",
        "'3:2'",
        "'quality'",
        "NULL",
        "'n'",
        "1",
        "'image_urls'",
        sql.arr(),
        "'model'",
        "NULL",
    )
    images = (
        "(CASE WHEN status = 'succeeded' THEN "
        + sql.arr(
            sql.obj(
                "'url'",
                "'https://files.example.com/' || provider || '/' || "
                + sql.text("i")
                + " || '.png'",
            )
        )
        + f" ELSE {sql.arr()} END)"
    )
    error = (
        "(CASE WHEN status = 'failed' THEN "
        + sql.obj(
            "'code'",
            "'content_policy_violation'",
            "'message'",
            "'Content policy violation detected'",
        )
        + " WHEN status = 'expired' THEN "
        + sql.obj(
            "'code'",
            "'deadline_exceeded'",
            "'message'",
            "'No final answer from the provider before the task''s deadline.'",
        )
        + " END)"
    )
    metadata = sql.obj(
        "'order'", "i", "'customer'", "'c-' || " + sql.text("i % 5000"), "'batch'", "'nightly'"
    )
    return f"""
WITH RECURSIVE {sql.series(n)},
a AS (
  SELECT i, {n} - i AS r,
    {_hash("i", H_OWNER)} AS h_owner, {_hash("i", H_PROVIDER)} AS h_provider,
    {_hash("i", H_ORIGIN)} AS h_origin, {_hash("i", H_STATUS)} AS h_status,
    {_hash("i", H_DUE)} AS h_due, {_hash("i", H_SPREAD)} AS h_spread,
    {_hash("i", H_MISC)} AS h_misc
  FROM g
),
b AS (
  SELECT a.*, CASE WHEN {live} THEN 1 ELSE 0 END AS live, {age} AS age,
    {_case("h_owner", OWNERS)} AS owner, {_case("h_provider", PROVIDER_SHARES)} AS provider,
    CASE WHEN h_origin < 70 THEN 'submitted' ELSE 'tracked' END AS origin
  FROM a
),
c AS (SELECT b.*, {status} AS status FROM b)
INSERT INTO task (
  pk, id, owner, provider, provider_task_id, origin, status, progress, request, images, error,
  metadata, raw_status, idempotency_key, request_fingerprint, last_update_source,
  submit_attempts, created_at, updated_at, completed_at, expected_at, deadline_at,
  next_check_at, progress_at, poll_count, poll_errors, lease_owner, lease_expires_at
)
SELECT
  i, {sql.token("tsk")}, owner, provider,
  CASE WHEN provider = 'openai' OR (status = 'queued' AND origin = 'submitted') THEN NULL
       ELSE 'ptk-' || provider || '-' || {sql.text("i")} END,
  origin, status,
  CASE status WHEN 'succeeded' THEN 100 WHEN 'running' THEN 10 + h_spread * 80 / 100
       WHEN 'queued' THEN 0 ELSE 40 END,
  {request}, {images}, {error}, {metadata},
  CASE status WHEN 'running' THEN 'processing' WHEN 'succeeded' THEN 'completed'
       WHEN 'failed' THEN 'failed' WHEN 'canceled' THEN 'cancelled' END,
  CASE WHEN h_misc >= 80 THEN 'idem-' || {sql.text("i")} END,
  CASE WHEN h_misc >= 80 THEN 'fp-' || {sql.text("i")} END,
  CASE WHEN status = 'queued' THEN (CASE WHEN origin = 'submitted' THEN 'submit' ELSE 'api' END)
       WHEN status = 'expired' THEN 'timeout' ELSE 'callback' END,
  CASE WHEN origin = 'submitted' THEN 1 ELSE 0 END,
  {sql.at("-age")},
  {sql.at("-age + CASE WHEN status = 'queued' THEN 0 WHEN age > 30 THEN 30 ELSE age END")},
  CASE WHEN live = 0 THEN {sql.at("-age + CASE WHEN age > 30 THEN 30 ELSE age END")} END,
  {sql.at("-age + 60")},
  {sql.at("-age + 3600")},
  CASE WHEN live = 0 THEN NULL
       WHEN h_due < {due} THEN {sql.at("-(1 + h_spread * 3 / 5)")}
       ELSE {sql.at("60 + h_spread * 6")} END,
  CASE WHEN status = 'running' THEN {sql.at("-age + CASE WHEN age > 20 THEN 20 ELSE age END")}
       END,
  0, 0,
  CASE WHEN live = 1 AND h_due < {due} AND h_misc < 10 THEN '{OTHER_WORKER}' END,
  CASE WHEN live = 1 AND h_due < {due} AND h_misc < 10 THEN {sql.at("30")} END
FROM c
"""


def event_insert(sql: Dialect) -> str:
    """1 to 3 events per task: submitted; progress (running tasks, half the final ones); the
    final one. Each carries the task snapshot, as ``_append_event`` writes it."""
    final = "t.status NOT IN ('queued', 'running')"
    status = "(CASE k.n WHEN 1 THEN 'queued' WHEN 2 THEN 'running' ELSE t.status END)"
    progress = "(CASE k.n WHEN 1 THEN 0 WHEN 2 THEN 40 ELSE t.progress END)"
    created = (
        f"(CASE k.n WHEN 1 THEN t.created_at WHEN 2 THEN {sql.shift('t.created_at', 20)} "
        "ELSE t.updated_at END)"
    )
    data = sql.obj(
        "'id'",
        "t.id",
        "'provider'",
        "t.provider",
        "'provider_task_id'",
        "t.provider_task_id",
        "'origin'",
        "t.origin",
        "'status'",
        status,
        "'progress'",
        progress,
        "'images'",
        f"(CASE WHEN k.n = 3 THEN {sql.nested('t.images')} ELSE {sql.arr()} END)",
        "'error'",
        f"(CASE WHEN k.n = 3 THEN {sql.nested('t.error')} END)",
        "'metadata'",
        sql.nested("t.metadata"),
        "'request'",
        sql.nested("t.request"),
        "'provider_status'",
        "(CASE WHEN k.n = 3 THEN t.raw_status END)",
        "'last_update_source'",
        "t.last_update_source",
        "'submit_attempts'",
        "t.submit_attempts",
        "'created_at'",
        sql.iso("t.created_at"),
        "'updated_at'",
        sql.iso(created),
        "'completed_at'",
        f"(CASE WHEN k.n = 3 THEN {sql.iso('t.completed_at')} END)",
    )
    return f"""
WITH k(n) AS (VALUES (1), (2), (3))
INSERT INTO task_event (id, task_pk, type, status, progress, source, created_at, data)
SELECT
  {sql.token("evt")}, t.pk,
  CASE k.n WHEN 1 THEN 'task.submitted' WHEN 2 THEN 'task.progress'
       ELSE 'task.' || t.status END,
  {status}, {progress},
  CASE WHEN k.n = 1 THEN (CASE WHEN t.origin = 'submitted' THEN 'submit' ELSE 'api' END)
       ELSE t.last_update_source END,
  {created}, {data}
FROM task t JOIN k ON (
  k.n = 1
  OR (k.n = 2 AND (t.status = 'running' OR ({final} AND t.pk % 2 = 0)))
  OR (k.n = 3 AND {final})
)
ORDER BY t.pk, k.n
"""


def receipt_insert(sql: Dialect) -> str:
    body = (
        '\'{"id":"\' || t.provider_task_id || \'","object":"image.generation.task",'
        '"model":"gpt-image-1.5","type":"image","status":"\' || '
        "coalesce(t.raw_status, 'pending') || '\",\"progress\":' || "
        + sql.text("t.progress")
        + ' || \',"created":1757156493,"results":["https://files.evolink.example/\' || '
        "t.provider_task_id || '.png\"]}'"
    )
    return f"""
INSERT INTO callback_receipt (
  task_pk, provider, received_at, outcome, error, content_type, body, body_size, body_truncated
)
SELECT pk, provider, received_at, 'applied', NULL, 'application/json', body, length(body),
  {sql.false}
FROM (
  SELECT t.pk, t.provider, t.updated_at AS received_at, {sql.blob(body)} AS body
  FROM task t
  WHERE t.provider <> 'openai' AND t.status <> 'queued' AND t.pk % 10 < 6
) AS r
ORDER BY pk
"""


def subscription_insert(sql: Dialect) -> str:
    """A ``notify_url`` subscription on 3 % of the tasks (kind "task")."""
    return f"""
INSERT INTO subscription (
  id, owner, kind, task_pk, url, event_types, providers, description, secret, previous_secret,
  previous_secret_expires_at, enabled, disabled_reason, created_at, updated_at
)
SELECT {sql.token("sub")}, t.owner, 'task', t.pk,
  'https://hooks.example.com/notify/' || {sql.text("t.pk")}, NULL, NULL, NULL, NULL, NULL, NULL,
  {sql.true}, NULL, t.created_at, t.created_at
FROM task t WHERE {_hash("t.pk", H_MISC)} BETWEEN 40 AND 42
ORDER BY t.pk
"""


def delivery_insert(
    sql: Dialect, population: Population, subscription: str, source: str, *, stranded: bool
) -> str:
    """Deliveries of the events ``source`` selects (``e`` events, ``t`` tasks, ``s``
    subscriptions) to ``subscription``: succeeded, except for the tasks in flight, where the
    newest delivery is due for ``due_share`` of them, ``retry_share`` have a delivery waiting
    for its next attempt (and the newer event of a running task held behind it, due), and a
    disabled subscription (``stranded``) has every delivery of theirs still pending."""
    due = round(population.due_share * 100)
    retry_end = due + round(population.retry_share * 100)
    h_due = _hash("t.pk", H_DUE)
    h_spread = _hash("t.pk", H_SPREAD)
    newest = (
        "((t.status = 'queued' AND e.type = 'task.submitted') "
        "OR (t.status = 'running' AND e.type = 'task.progress'))"
    )
    if stranded:
        kind = "CASE WHEN t.status IN ('queued', 'running') THEN 'stranded' ELSE 'done' END"
    else:
        kind = f"""CASE
      WHEN t.status NOT IN ('queued', 'running') THEN 'done'
      WHEN {h_due} >= {due} AND {h_due} < {retry_end}
        THEN (CASE WHEN e.type = 'task.submitted' THEN 'retrying' ELSE 'held' END)
      WHEN {h_due} < {due} AND {newest} THEN 'due'
      ELSE 'done' END"""
    return f"""
WITH d AS (
  SELECT e.seq, e.task_pk, e.type, e.created_at, {subscription} AS subscription_pk,
    {h_spread} AS spread, {kind} AS kind
  {source}
)
INSERT INTO delivery (
  id, subscription_pk, event_seq, task_pk, event_type, status, attempts, next_attempt_at,
  lease_owner, lease_expires_at, last_status_code, last_error, created_at, updated_at,
  delivered_at
)
SELECT {sql.token("dlv")}, subscription_pk, seq, task_pk, type,
  CASE kind WHEN 'done' THEN 'succeeded' ELSE 'pending' END,
  CASE kind WHEN 'done' THEN 1 WHEN 'retrying' THEN 2 ELSE 0 END,
  CASE kind WHEN 'due' THEN {sql.at("-(1 + spread * 3 / 5)")}
       WHEN 'retrying' THEN {sql.at("120 + spread * 10")} ELSE created_at END,
  NULL, NULL,
  CASE kind WHEN 'done' THEN 200 WHEN 'retrying' THEN 503 END,
  CASE kind WHEN 'retrying' THEN 'HTTP 503' END,
  created_at, created_at,
  CASE kind WHEN 'done' THEN created_at END
FROM d
ORDER BY seq, subscription_pk
"""


@dataclass
class LoadReport:
    seconds: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    due_tasks: int = 0
    due_deliveries: int = 0
    backlog_deliveries: int = 0
    size_mb: float = 0.0
    put_aside: int = 0


def endpoint_subscriptions(now: datetime) -> list[Subscription]:
    hour_ago = now - timedelta(hours=1)
    month_ago = now - timedelta(days=31)

    def subscription(owner: str, url: str, created: datetime, **kwargs: Any) -> Subscription:
        return Subscription(
            id=f"sub_bench_{owner}_{uuid.uuid4().hex[:8]}",
            owner=owner,
            kind="endpoint",
            url=url,
            secret="whsec_" + "A" * 43,
            created_at=created,
            updated_at=created,
            **kwargs,
        )

    return [
        subscription(
            "alice",
            "https://hooks.example.com/alice/final",
            month_ago,
            event_types=["task.succeeded", "task.failed"],
            enabled=True,
        ),
        subscription(
            "alice",
            "https://hooks.example.com/alice/evolink",
            hour_ago,
            providers=["evolink"],
            enabled=True,
        ),
        subscription("bob", "https://hooks.example.com/bob", hour_ago, enabled=True),
        subscription(
            "dave",
            "https://hooks.example.com/dave",
            hour_ago,
            enabled=False,
            disabled_reason="the subscriber answered 410 Gone",
        ),
    ]


def load_store(
    url: str, population: Population, now: datetime, log: Callable[[str], None]
) -> LoadReport:
    """Fill a freshly migrated database with ``population`` (in SQL, one statement a table)."""
    report = LoadReport()
    engine = _loader_engine(url)
    sql = Dialect(engine.dialect.name, now)
    window = population.window
    try:

        def run(name: str, statement: str) -> None:
            started = time.perf_counter()
            if not sql.sqlite:  # psycopg reads "%" as a placeholder even without parameters
                statement = statement.replace("%", "%%")
            with engine.begin() as connection:
                connection.exec_driver_sql(statement)
            report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - started

        log(f"loading {population.tasks:,} tasks ({population.in_flight:,} in flight)")
        run("task", task_insert(sql, population))
        run("task_event", event_insert(sql))
        run("callback_receipt", receipt_insert(sql))
        run("subscription", subscription_insert(sql))
        started = time.perf_counter()
        with sa.orm.Session(engine) as session:
            subs = endpoint_subscriptions(now)
            session.add_all(subs)
            session.add_all(
                ClientSecret(owner=owner, secret="whsec_" + "B" * 43, created_at=now)
                for owner, _ in OWNERS
            )
            session.commit()
            final_all, alice_evolink, bob, dave = (int(s.pk or 0) for s in subs)
        report.seconds["subscription"] += time.perf_counter() - started
        recent = f"t.pk > {population.tasks - window}"
        events = "FROM task_event e JOIN task t ON t.pk = e.task_pk"
        run(
            "delivery",
            delivery_insert(
                sql,
                population,
                str(final_all),
                f"{events} WHERE t.owner = 'alice' AND e.type IN ('task.succeeded', 'task.failed')",
                stranded=False,
            ),
        )
        for subscription_pk, where, stranded in (
            (alice_evolink, "t.owner = 'alice' AND t.provider = 'evolink'", False),
            (bob, "t.owner = 'bob'", False),
            (dave, "t.owner = 'dave'", True),
        ):
            run(
                "delivery",
                delivery_insert(
                    sql,
                    population,
                    str(subscription_pk),
                    f"{events} WHERE {recent} AND {where}",
                    stranded=stranded,
                ),
            )
        run(
            "delivery",
            delivery_insert(
                sql,
                population,
                "s.pk",
                "FROM subscription s JOIN task t ON t.pk = s.task_pk "
                "JOIN task_event e ON e.task_pk = t.pk WHERE s.kind = 'task'",
                stranded=False,
            ),
        )
        started = time.perf_counter()
        # (SQLite goes back to WAL when the service's engine connects.)
        if not sql.sqlite:
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "SELECT setval(pg_get_serial_sequence('task', 'pk'), "
                    "(SELECT max(pk) FROM task))"
                )
            vacuum_analyze(engine)
        report.seconds["vacuum/analyze"] = time.perf_counter() - started
        with engine.connect() as connection:
            for table in TABLES:
                report.rows[table] = int(
                    connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
                )
        report.size_mb = database_size_mb(engine, url)
    finally:
        engine.dispose()
    census(url, report, now)
    log(
        f"loaded in {sum(report.seconds.values()):.0f} s: "
        + ", ".join(f"{t} {n:,}" for t, n in report.rows.items() if n)
    )
    return report


def _loader_engine(url: str) -> Engine:
    """Bulk loading: SQLite without a journal or fsync (a throwaway file), no foreign keys."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=OFF")
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA cache_size=-262144")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def vacuum_analyze(engine: Engine, tables: Sequence[str] = ()) -> None:
    """What autovacuum would have done by now (PostgreSQL): dead rows gone, statistics fresh."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(tables)}")


def database_size_mb(engine: Engine, url: str) -> float:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            size = connection.exec_driver_sql(
                "SELECT pg_database_size(current_database())"
            ).scalar_one()
        return float(size) / 1e6
    path = Path(sa.engine.make_url(url).database or "")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def census(url: str, report: LoadReport, now: datetime) -> None:
    """What the background loops see: tasks in flight, due work, the delivery backlog."""
    engine = make_engine(url)
    stamp = sa.bindparam("now", now, type_=_utc())
    try:
        with engine.connect() as connection:
            report.in_flight = int(
                connection.execute(
                    sa.text("SELECT count(*) FROM task WHERE status IN ('queued', 'running')")
                ).scalar_one()
            )
            report.due_tasks = int(
                connection.execute(
                    sa.text("SELECT count(*) FROM task WHERE next_check_at <= :now").bindparams(
                        stamp
                    )
                ).scalar_one()
            )
            report.due_deliveries = int(
                connection.execute(
                    sa.text(
                        "SELECT count(*) FROM delivery WHERE status = 'pending' "
                        "AND next_attempt_at <= :now"
                    ).bindparams(stamp)
                ).scalar_one()
            )
            report.backlog_deliveries = int(
                connection.execute(backlog_filter(sa.select(sa.func.count()), now)).scalar_one()
            )
    finally:
        engine.dispose()


def _utc() -> sa.types.TypeEngine[datetime]:
    from service.models import UTCDateTime

    return UTCDateTime()


def backlog_filter(statement: Any, now: datetime) -> Any:
    """The pending deliveries a flaky or disabled subscriber leaves: waiting for a retry, held
    behind one (due since their event, over a minute ago, or put off by the dispatcher until
    the retry: never tried, due over a minute from now), or on a disabled subscription."""
    delivery = sa.table(
        "delivery",
        sa.column("status"),
        sa.column("attempts"),
        sa.column("next_attempt_at", _utc()),
        sa.column("subscription_pk"),
    )
    disabled: Any = (
        sa.select(sa.literal_column("pk"))
        .select_from(sa.table("subscription"))
        .where(sa.literal_column("enabled") == sa.false())
    )
    return statement.select_from(delivery).where(
        delivery.c.status == "pending",
        sa.or_(
            delivery.c.attempts > 0,
            delivery.c.next_attempt_at < now - timedelta(minutes=1),
            delivery.c.next_attempt_at > now + timedelta(minutes=1),
            delivery.c.subscription_pk.in_(disabled.scalar_subquery()),
        ),
    )


def put_back_backlog(url: str, now: datetime) -> int:
    """Undo the dispatcher's put-aside (``Outbox._move_aside``): the deliveries it put off
    (never tried, due over a minute from now: held behind a retry, or on a disabled
    subscription) are due since their event again, as loaded. Returns how many."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            moved = connection.execute(
                sa.text(
                    "UPDATE delivery SET next_attempt_at = created_at WHERE status = 'pending' "
                    "AND attempts = 0 AND next_attempt_at > :later"
                ).bindparams(sa.bindparam("later", now + timedelta(minutes=1), type_=_utc()))
            ).rowcount
        vacuum_analyze(engine, ["delivery"])
    finally:
        engine.dispose()
    return int(moved)


def put_aside_count(url: str, now: datetime) -> int:
    """The deliveries the dispatcher has put off (see ``put_back_backlog``)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    sa.text(
                        "SELECT count(*) FROM delivery WHERE status = 'pending' "
                        "AND attempts = 0 AND next_attempt_at > :later"
                    ).bindparams(sa.bindparam("later", now + timedelta(minutes=1), type_=_utc()))
                ).scalar_one()
            )
    finally:
        engine.dispose()


def set_backlog(url: str, now: datetime, *, parked: bool) -> None:
    """Hide the delivery backlog from the claim (status "parked", which nothing claims) or
    bring it back, so one store measures the claim with and without it."""
    engine = make_engine(url)
    delivery = sa.table(
        "delivery",
        sa.column("pk"),
        sa.column("status"),
    )
    try:
        with engine.begin() as connection:
            if parked:
                pks = backlog_filter(sa.select(sa.literal_column("pk")), now).scalar_subquery()
                connection.execute(
                    sa.update(delivery).where(delivery.c.pk.in_(pks)).values(status="parked")
                )
            else:
                connection.execute(
                    sa.update(delivery)
                    .where(delivery.c.status == "parked")
                    .values(status="pending")
                )
        vacuum_analyze(engine, ["delivery"])
    finally:
        engine.dispose()


def finish_in_flight(url: str, keep: int, now: datetime) -> None:
    """All but a random ``keep`` of the tasks in flight become final (succeeded, their pending
    deliveries delivered), the way a store with ``keep`` in flight would look."""
    engine = make_engine(url)
    sql = Dialect(engine.dialect.name, now)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TEMPORARY TABLE bench_finish (pk BIGINT PRIMARY KEY)"
            )
            connection.exec_driver_sql(
                "INSERT INTO bench_finish (pk) SELECT pk FROM task "
                "WHERE status IN ('queued', 'running') AND pk NOT IN ("
                "SELECT pk FROM task WHERE status IN ('queued', 'running') "
                f"ORDER BY random() LIMIT {keep})"
            )
            connection.exec_driver_sql(
                f"UPDATE task SET status = 'succeeded', progress = 100, "
                f"raw_status = 'completed', last_update_source = 'callback', "
                f"next_check_at = NULL, lease_owner = NULL, lease_expires_at = NULL, "
                f"completed_at = {sql.at('0')}, updated_at = {sql.at('0')} "
                "WHERE pk IN (SELECT pk FROM bench_finish)"
            )
            connection.exec_driver_sql(
                "UPDATE delivery SET status = 'succeeded', attempts = attempts + 1, "
                f"delivered_at = {sql.at('0')} "
                "WHERE status = 'pending' AND task_pk IN (SELECT pk FROM bench_finish)"
            )
            connection.exec_driver_sql("DROP TABLE bench_finish")
        vacuum_analyze(engine, ["task", "delivery"])
    finally:
        engine.dispose()


# --- databases ------------------------------------------------------------------------------------


def psycopg_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextlib.contextmanager
def fresh_database(kind: str, folder: Path, admin_url: str | None, label: str) -> Iterator[str]:
    """A new, migrated database: a SQLite file in ``folder``, or a PostgreSQL database on the
    server ``admin_url`` names (dropped afterwards)."""
    if kind == "sqlite":
        url = f"sqlite:///{folder / label / 'taskrelay.db'}"
        migrate(url)
        yield url
        return
    assert admin_url is not None
    with fresh_postgres(admin_url, prefix=f"{DB_PREFIX}{label}_") as url:
        yield url


# --- HTTP: a real taskrelay serve, driven by wrk ------------------------------------------------


def start_service(name: str, database_url: str, folder: Path) -> ServerProcess:
    """``taskrelay serve`` on a free port of 127.0.0.1, with its background work idle."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    env.update(
        {
            "TASKRELAY_DATABASE_URL": database_url,
            "TASKRELAY_DATA_DIR": str(folder / "data"),
            "TASKRELAY_PUBLIC_URL": url,
            "TASKRELAY_SECRET_KEY": SECRET_KEY,
            "TASKRELAY_API_TOKENS": ",".join(f"{o}:{t}" for o, t in TOKENS.items()),
            # Nothing is measured but lookups: no status queries, no deliveries, and no
            # provider reachable should anything try.
            "TASKRELAY_SCHEDULER": "false",
            "TASKRELAY_DISPATCHER": "false",
            # wrk is one client asking as fast as it can: no per-client rate limit.
            "TASKRELAY_RATE_LIMIT": "0",
            **{
                f"TASKRELAY_{provider.upper()}_BASE_URL": "http://127.0.0.1:9"
                for provider in PROVIDERS
            },
        }
    )
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    server = ServerProcess(name, argv, env, port, folder)
    try:
        # A large store takes a while to open (migrations check it first).
        server.wait_ready(
            lambda client: client.get("/readyz").status_code == 200, READY_TIMEOUT_SECONDS
        )
    except RuntimeError:
        server.stop()
        raise
    return server


WRK_SCRIPT = r"""
-- GETs a random path of the file args[1] per request, as the client whose token is args[2].
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  paths = {}
  for line in io.lines(args[1]) do
    paths[#paths + 1] = line
  end
  headers = {["Authorization"] = "Bearer " .. args[2]}
  math.randomseed(tonumber(args[3]))
  codes = {}
end

function request()
  return wrk.format("GET", paths[math.random(#paths)], headers)
end

function response(status, headers, body)
  if status ~= 200 then
    local key = tostring(status)
    codes[key] = (codes[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local codes = threads[1]:get("codes")
  local parts = {}
  for code, count in pairs(codes) do
    parts[#parts + 1] = string.format('"%s":%d', code, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"codes":{%s},"errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ","),
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Lookup:
    name: str
    kind: str  # "get" or "list": which target applies
    paths: Callable[[list[str]], list[str]]  # from a sample of task ids


LIST = "/v1/tasks"
LOOKUPS = (
    Lookup("GET /v1/tasks/{id}", "get", lambda ids: [f"/v1/tasks/{i}" for i in ids]),
    Lookup("GET /v1/tasks/{id}/events", "get", lambda ids: [f"/v1/tasks/{i}/events" for i in ids]),
    Lookup("GET /v1/tasks", "list", lambda ids: [LIST]),
    Lookup("GET /v1/tasks?status=running", "list", lambda ids: [f"{LIST}?status=running"]),
    Lookup(
        "GET /v1/tasks?status=queued,running",
        "list",
        lambda ids: [f"{LIST}?status=queued,running"],
    ),
    Lookup("GET /v1/tasks?status=failed", "list", lambda ids: [f"{LIST}?status=failed"]),
    Lookup(
        "GET /v1/tasks?status=failed,expired",
        "list",
        lambda ids: [f"{LIST}?status=failed,expired"],
    ),
    Lookup("GET /v1/tasks?provider=openai", "list", lambda ids: [f"{LIST}?provider=openai"]),
    Lookup(
        "GET /v1/tasks?status=canceled&provider=openai",
        "list",
        lambda ids: [f"{LIST}?status=canceled&provider=openai"],
    ),
)


@dataclass
class Latency:
    requests: int
    rate: float
    non_200: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    # The server process's CPU time per request: unlike latency, it hardly changes when other
    # work on the machine competes for the cores (on SQLite it includes the database's work).
    server_cpu_ms: float
    answer_kb: float  # bytes per answer, headers included (a short page costs less to send)
    codes: dict[str, int] = field(default_factory=dict)  # answers other than 200, by status
    rounds_p99_ms: list[float] = field(default_factory=list)


def run_wrk(
    server: ServerProcess,
    paths: Sequence[str],
    token: str,
    seconds: int,
    connections: int,
    folder: Path,
    seed: int,
) -> Latency:
    paths_file = folder / "wrk-paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    script = folder / "lookups.lua"
    script.write_text(WRK_SCRIPT)
    argv = [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        "10s",
        "--script",
        str(script),
        server.url,
        "--",
        str(paths_file),
        token,
        str(seed),
    ]
    cpu = server.cpu_seconds()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu = server.cpu_seconds() - cpu
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    return Latency(
        server_cpu_ms=cpu * 1000 / max(1, int(data["requests"])),
        answer_kb=data["bytes"] / 1000 / max(1, int(data["requests"])),
        requests=int(data["requests"]),
        rate=data["requests"] / (data["duration_us"] / 1e6),
        non_200=sum(int(n) for n in data["codes"].values()),
        codes={str(k): int(n) for k, n in data["codes"].items()},
        errors=int(data["errors"]),
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


def combine(rounds: Sequence[Latency]) -> Latency:
    """Several rounds of one lookup: counts added up, each percentile the rounds' median (one
    round disturbed by other work on the machine does not decide the result)."""
    return Latency(
        requests=sum(r.requests for r in rounds),
        rate=statistics.median(r.rate for r in rounds),
        non_200=sum(r.non_200 for r in rounds),
        errors=sum(r.errors for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p90_ms=statistics.median(r.p90_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds),
        max_ms=max(r.max_ms for r in rounds),
        server_cpu_ms=statistics.median(r.server_cpu_ms for r in rounds),
        answer_kb=statistics.median(r.answer_kb for r in rounds),
        codes={
            code: sum(r.codes.get(code, 0) for r in rounds)
            for code in sorted({code for r in rounds for code in r.codes})
        },
        rounds_p99_ms=[r.p99_ms for r in rounds],
    )


@dataclass
class LookupResult:
    name: str
    kind: str
    small: Latency
    large: Latency

    @property
    def target_ms(self) -> float:
        return TARGET_GET_P99_MS if self.kind == "get" else TARGET_LIST_P99_MS

    @property
    def p99_ratio(self) -> float:
        return self.large.p99_ms / self.small.p99_ms if self.small.p99_ms else math.nan

    @property
    def p50_ratio(self) -> float:
        return self.large.p50_ms / self.small.p50_ms if self.small.p50_ms else math.nan

    @property
    def met(self) -> bool:
        clean = not (self.large.non_200 or self.large.errors)
        return clean and self.large.p99_ms <= self.target_ms


def sample_ids(url: str, owner: str, count: int) -> list[str]:
    """``count`` of ``owner``'s task ids, evenly spread over the whole store."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            total = int(
                connection.execute(
                    sa.text("SELECT count(*) FROM task WHERE owner = :owner"), {"owner": owner}
                ).scalar_one()
            )
            step = max(1, total // count)
            rows = connection.execute(
                sa.text(
                    "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY pk) AS n "
                    "FROM task WHERE owner = :owner) AS o WHERE n % :step = 0"
                ),
                {"owner": owner, "step": step},
            )
            return [str(row[0]) for row in rows][:count]
    finally:
        engine.dispose()


def measure_lookups(
    small_url: str,
    large_url: str,
    folder: Path,
    seconds: int,
    rounds: int,
    connections: int,
    log: Callable[[str], None],
) -> list[LookupResult]:
    small_ids = sample_ids(small_url, "alice", ID_SAMPLE)
    large_ids = sample_ids(large_url, "alice", ID_SAMPLE)
    small = start_service("taskrelay-small", small_url, folder / "small")
    try:
        large = start_service("taskrelay-large", large_url, folder / "large")
    except BaseException:
        small.stop()
        raise
    results = []
    try:
        for number, lookup in enumerate(LOOKUPS):
            targets = ((small, lookup.paths(small_ids)), (large, lookup.paths(large_ids)))
            token = TOKENS["alice"]
            for server, paths in targets:
                run_wrk(server, paths, token, WARMUP_SECONDS, connections, folder, number)
            # Small and large take turns, so a burst of load from elsewhere on the machine
            # falls on both rather than on one.
            rounds_measured: list[list[Latency]] = [[], []]
            for round_number in range(rounds):
                for side, (server, paths) in enumerate(targets):
                    rounds_measured[side].append(
                        run_wrk(
                            server,
                            paths,
                            token,
                            seconds,
                            connections,
                            folder,
                            number * 100 + round_number,
                        )
                    )
            result = LookupResult(
                lookup.name,
                lookup.kind,
                combine(rounds_measured[0]),
                combine(rounds_measured[1]),
            )
            log(
                f"{lookup.name}: p99 {result.small.p99_ms:.2f} ms (small) / "
                f"{result.large.p99_ms:.2f} ms (large)"
            )
            results.append(result)
    finally:
        small.stop()
        large.stop()
    return results


# --- the SQL the service sends, and its plans -----------------------------------------------------


@dataclass
class Statement:
    sql: str
    parameters: Any


@contextlib.contextmanager
def captured(engine: Engine) -> Iterator[list[Statement]]:
    """Every statement the engine sends to the database while the block runs."""
    statements: list[Statement] = []

    def before(
        conn: sa.Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        statements.append(Statement(statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before)


_NOISE = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA|SELECT 1\b)", re.I)


def explainable(statement: Statement) -> bool:
    return not _NOISE.match(statement.sql) and not statement.sql.lstrip().upper().startswith(
        "INSERT"
    )


@dataclass
class Plan:
    query: str  # which hot query (the method called)
    sql: str
    lines: list[str]
    flags: list[str]
    execution_ms: float | None = None
    # The work one execution does: SQLite virtual machine steps, PostgreSQL shared buffers
    # touched; and the same on the small store, to see whether it grows with the store.
    work: int | None = None
    baseline_ms: float | None = None
    baseline_work: int | None = None

    @property
    def summary(self) -> str:
        return summarise_plan(self.lines)

    @property
    def key(self) -> tuple[str, str]:
        return self.query, " ".join(self.sql.split())[:80]

    @property
    def growth(self) -> float | None:
        if self.work is None or not self.baseline_work:
            return None
        return self.work / self.baseline_work


def explain(engine: Engine, statement: Statement) -> tuple[list[str], float | None, int | None]:
    """The statement's plan, how long it took and the work it did (run with the parameters
    it was sent with, in a transaction that is rolled back)."""
    parameters = statement.parameters
    if isinstance(parameters, list):  # executemany: the first row is as good as any
        parameters = parameters[0]
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            if engine.dialect.name == "sqlite":
                rows = connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement.sql, parameters
                ).all()
                raw = connection.connection.driver_connection
                assert isinstance(raw, sqlite3.Connection)
                steps = 0

                def count() -> int:
                    nonlocal steps
                    steps += 1
                    return 0

                raw.set_progress_handler(count, SQLITE_STEPS_PER_CALL)
                try:
                    started = time.perf_counter()
                    result = connection.exec_driver_sql(statement.sql, parameters)
                    if result.returns_rows:
                        result.all()
                    elapsed = (time.perf_counter() - started) * 1000
                finally:
                    raw.set_progress_handler(None, 0)
                return sqlite_plan_lines(rows), elapsed, steps * SQLITE_STEPS_PER_CALL
            rows = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement.sql, parameters
            ).all()
            lines = [str(row[0]) for row in rows]
            execution = next(
                (
                    float(m.group(1))
                    for line in lines
                    if (m := re.search(r"Execution Time: ([\d.]+)", line))
                ),
                None,
            )
            return lines, execution, pg_buffers(lines)
        finally:
            transaction.rollback()


def pg_buffers(lines: Sequence[str]) -> int | None:
    """Shared buffers the whole statement touched (the top node's count includes its
    children's), planning aside."""
    for line in lines:
        text = line.strip()
        if text.startswith("Planning"):
            return None
        if text.startswith("Buffers: shared"):
            return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", text))
    return None


def sqlite_plan_lines(rows: Sequence[Any]) -> list[str]:
    """EXPLAIN QUERY PLAN rows (id, parent, notused, detail) as an indented tree."""
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _unused, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + str(detail))
    return lines


def sqlite_flags(lines: Sequence[str]) -> list[str]:
    flags = []
    for raw in lines:
        line = raw.strip()
        full = re.fullmatch(r"SCAN (\w+)(?: AS \w+)?", line)
        if full and full.group(1) in TABLES:
            flags.append(f"full table scan of {full.group(1)}")
        elif m := re.fullmatch(r"SCAN (\w+)(?: AS \w+)? USING (?:COVERING )?INDEX (\w+)", line):
            if m.group(1) in TABLES:
                flags.append(
                    f"walks index {m.group(2)} of {m.group(1)} from one end (stops at LIMIT)"
                )
        elif line.startswith("USE TEMP B-TREE FOR ORDER BY"):
            flags.append("sorts every matching row")
    return flags


def pg_flags(lines: Sequence[str], rows: dict[str, int]) -> list[str]:
    flags = []
    for raw in lines:
        line = raw.strip().removeprefix("->").strip()
        if m := re.match(r"Seq Scan on (\w+)", line):
            table = m.group(1)
            if rows.get(table, 0) > LARGE_TABLE_ROWS:
                flags.append(f"Seq Scan on {table} ({rows[table]:,} rows)")
        elif line.startswith("Sort ") or line.startswith("Sort  "):
            if (m2 := re.search(r"actual time=[\d.]+\.\.[\d.]+ rows=(\d+)", line)) and int(
                m2.group(1)
            ) > FLAG_ROWS:
                flags.append(f"sorts {int(m2.group(1)):,} rows")
        elif (m3 := re.match(r"Rows Removed by (?:Filter|Join Filter): (\d+)", line)) and int(
            m3.group(1)
        ) > FLAG_ROWS:
            flags.append(f"reads {int(m3.group(1)):,} rows it throws away")
    return flags


def summarise_plan(lines: Sequence[str]) -> str:
    """The plan's access paths, one line (node names without costs)."""
    nodes = []
    for raw in lines:
        line = raw.strip().removeprefix("->").strip()
        if not line or line.startswith(("Planning", "Execution", "Buffers", "Output")):
            continue
        if re.match(
            r"^(Index Cond|Filter|Recheck Cond|Rows Removed|Sort Key|Sort Method|"
            r"Heap Fetches|Join Filter|Hash Cond|Merge Cond|Heap Blocks|One-Time|"
            r"Worker|Cache|Order By|Presorted|Full-sort|Group Key|Batches|Memory|"
            r"Storage|Disk|Index Searches|Hits:)",
            line,
        ):
            continue
        nodes.append(re.sub(r"\s+\(cost=.*$", "", line))
    return " > ".join(nodes)


@dataclass
class Probe:
    """One hot query: the method that sends it, and which of its statements to explain."""

    name: str
    call: Callable[[], object]
    # Keep only statements containing this (the query the probe is about); None: all.
    contains: str | None = None


@dataclass
class ProbeContext:
    store: Store
    outbox: Outbox
    task_id: str  # one of alice's final tasks, from the middle of the store
    live_task_id: str  # one of alice's running EvoLink tasks with a notify_url subscription
    now: datetime
    held_head: DeliveryJob | None  # a delivery waiting for its retry, a later event behind it


def probes(ctx: ProbeContext) -> list[Probe]:
    store, outbox = ctx.store, ctx.outbox

    def claim_due() -> None:
        claims = store.claim_due(
            "evolink", "bench-probe", limit=SCHEDULER_CLAIM_LIMIT, lease_seconds=LEASE_SECONDS
        )
        release_tasks(store.engine, [c.task_id for c in claims])

    def claim_deliveries() -> None:
        jobs = outbox.claim(
            "bench-probe", limit=DISPATCHER_CLAIM_LIMIT, lease_seconds=LEASE_SECONDS
        )
        release_deliveries(store.engine, [j.delivery_pk for j in jobs])

    def windowed_put_aside() -> None:
        jobs = between_passes(store, ctx.now).claim(
            "bench-probe", limit=DISPATCHER_CLAIM_LIMIT, lease_seconds=LEASE_SECONDS
        )
        release_deliveries(store.engine, [j.delivery_pk for j in jobs])

    def failed_attempt() -> None:
        if ctx.held_head is not None:  # the small store may have none
            failed = AttemptResult(500, 1.0, error="bench")
            outbox.record_attempts([(ctx.held_head, failed)], "bench-probe")

    def callback() -> None:
        store.apply_update(
            ctx.live_task_id,
            # Above any stored progress, so it is a real change: an event and its fan-out.
            TaskUpdate(status=TaskStatus.running, progress=99, raw_status="processing"),
            UpdateSource.callback,
        )

    def submit() -> None:
        store.create_task(
            owner="alice",
            provider="evolink",
            origin=TaskOrigin.submitted,
            request={"prompt": "bench"},
            metadata={},
            idempotency_key=f"bench-{uuid.uuid4().hex}",
            request_fingerprint="fp",
        )

    return [
        Probe("task by id (get_task)", lambda: store.get_task("alice", ctx.task_id)),
        Probe("list, first page", lambda: store.list_tasks("alice", TaskFilter())),
        Probe(
            "list, status=running",
            lambda: store.list_tasks("alice", TaskFilter(status=("running",))),
        ),
        Probe(
            "list, status=queued,running",
            lambda: store.list_tasks("alice", TaskFilter(status=("queued", "running"))),
        ),
        Probe(
            "list, status=failed,expired",
            lambda: store.list_tasks("alice", TaskFilter(status=("failed", "expired"))),
        ),
        Probe(
            "list, provider=openai",
            lambda: store.list_tasks("alice", TaskFilter(provider="openai")),
        ),
        Probe(
            "list, status=canceled&provider=openai",
            lambda: store.list_tasks("alice", TaskFilter(status=("canceled",), provider="openai")),
        ),
        Probe("events of a task (list_events)", lambda: store.list_events("alice", ctx.task_id)),
        Probe(
            "callbacks of a task (list_receipts)",
            lambda: store.list_receipts("alice", ctx.task_id),
            contains="callback_receipt",
        ),
        Probe("claim_due (scheduler)", claim_due, contains="next_check_at"),
        Probe("delivery claim (Outbox.claim)", claim_deliveries, contains="FROM delivery"),
        Probe(
            "put-aside a second after the last (windowed, in Outbox.claim)",
            windowed_put_aside,
            contains="AS head_due",
        ),
        Probe(
            "a failed attempt recorded: its held events put off",
            failed_attempt,
            contains="UPDATE delivery SET next_attempt_at",
        ),
        Probe("a callback (apply_update: lock, update, event, fan-out)", callback),
        Probe("create with Idempotency-Key", submit, contains="idempotency_key"),
        Probe("unsent_submissions (start-up)", store.unsent_submissions),
        Probe("reconcile (start-up)", store.reconcile),
    ]


def release_tasks(engine: Engine, task_ids: Sequence[str]) -> None:
    if not task_ids:
        return
    task = sa.table(
        "task", sa.column("id"), sa.column("lease_owner"), sa.column("lease_expires_at")
    )
    with engine.begin() as connection:
        connection.execute(
            sa.update(task)
            .where(task.c.id.in_(list(task_ids)))
            .values(lease_owner=None, lease_expires_at=None)
        )


def release_deliveries(engine: Engine, delivery_pks: Sequence[int]) -> None:
    if not delivery_pks:
        return
    delivery = sa.table(
        "delivery", sa.column("pk"), sa.column("lease_owner"), sa.column("lease_expires_at")
    )
    with engine.begin() as connection:
        connection.execute(
            sa.update(delivery)
            .where(delivery.c.pk.in_(list(delivery_pks)))
            .values(lease_owner=None, lease_expires_at=None)
        )


def between_passes(store: Store, now: datetime) -> Outbox:
    """An ``Outbox`` as a running dispatcher's is a second after its last put-aside, its sweep
    through and the next not yet due: its next claim makes the windowed put-aside (what became
    due since the last one). The store's clock stands still here, so its memory of the passes
    is set."""
    outbox = Outbox(store)
    outbox._moved_aside_at = now - MOVE_ASIDE_EVERY
    outbox._swept_at = now
    return outbox


def sweep_due(store: Store, now: datetime) -> Outbox:
    """An ``Outbox`` as a running dispatcher's is when its periodic sweep is due (its last
    began ``MOVE_ASIDE_FULL_EVERY`` ago) and its windowed pass is not (its last was now): its
    claims read the sweep's pages, one each, until it is through."""
    outbox = Outbox(store)
    outbox._moved_aside_at = now
    outbox._swept_at = now - MOVE_ASIDE_FULL_EVERY
    return outbox


def held_head(engine: Engine) -> DeliveryJob | None:
    """A delivery waiting for its retry with a later event of its task held behind it: what a
    failed attempt's record puts off its followers for (only its key is needed to record)."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT d.pk, d.id, d.subscription_pk FROM delivery d WHERE d.status = 'pending' "
                "AND d.attempts > 0 AND EXISTS (SELECT 1 FROM delivery f "
                "WHERE f.subscription_pk = d.subscription_pk AND f.task_pk = d.task_pk "
                "AND f.event_seq > d.event_seq AND f.status = 'pending') ORDER BY d.pk LIMIT 1"
            )
        ).first()
    if row is None:
        return None
    return DeliveryJob(
        delivery_pk=row.pk,
        delivery_id=row.id,
        subscription_pk=row.subscription_pk,
        url="",
        signing_secrets=(),
        event_id="",
        body=b"",
    )


def probe_context(url: str, engine: Engine, now: datetime) -> ProbeContext:
    store = Store(engine, clock=lambda: now)
    with engine.connect() as connection:
        total = connection.exec_driver_sql("SELECT max(pk) FROM task").scalar_one()
        task_id = connection.execute(
            sa.text(
                "SELECT id FROM task WHERE owner = 'alice' AND status = 'succeeded' "
                "AND pk > :middle ORDER BY pk LIMIT 1"
            ),
            {"middle": int(total) // 2},
        ).scalar_one()
        live = connection.execute(
            sa.text(
                "SELECT t.id FROM task t JOIN subscription s ON s.task_pk = t.pk "
                "WHERE t.owner = 'alice' AND t.provider = 'evolink' AND t.status = 'running' "
                "ORDER BY t.pk DESC LIMIT 1"
            )
        ).scalar_one_or_none()
        if live is None:
            live = connection.execute(
                sa.text("SELECT id FROM task WHERE status = 'running' ORDER BY pk DESC LIMIT 1")
            ).scalar_one()
    return ProbeContext(store, Outbox(store), str(task_id), str(live), now, held_head(engine))


def probe_plans(url: str, rows: dict[str, int], now: datetime) -> list[Plan]:
    engine = make_engine(url)
    plans: list[Plan] = []
    try:
        ctx = probe_context(url, engine, now)
        for probe in probes(ctx):
            with captured(engine) as statements:
                probe.call()
            seen: set[str] = set()
            for statement in statements:
                if not explainable(statement) or statement.sql in seen:
                    continue
                if probe.contains and probe.contains not in statement.sql:
                    continue
                seen.add(statement.sql)
                lines, execution, work = explain(engine, statement)
                flags = (
                    sqlite_flags(lines)
                    if engine.dialect.name == "sqlite"
                    else pg_flags(lines, rows)
                )
                plans.append(Plan(probe.name, statement.sql, lines, flags, execution, work))
    finally:
        engine.dispose()
    return plans


def query_plans(
    url: str, baseline_url: str, rows: dict[str, int], baseline_rows: dict[str, int], now: datetime
) -> list[Plan]:
    """The hot queries' plans on the large store, with the work each does there and on the
    small store: work that grows with the store is flagged."""
    baseline = {plan.key: plan for plan in probe_plans(baseline_url, baseline_rows, now)}
    plans = probe_plans(url, rows, now)
    sqlite = url.startswith("sqlite")
    for plan in plans:
        small = baseline.get(plan.key)
        if small is None:
            continue
        plan.baseline_ms, plan.baseline_work = small.execution_ms, small.work
        growth = plan.growth
        floor = GROWTH_FLOOR_STEPS if sqlite else GROWTH_FLOOR_BUFFERS
        if growth is not None and growth > GROWTH_FLAG and (plan.work or 0) > floor:
            plan.flags.append(f"{growth:,.0f}x the work on the small store")
    return plans


# --- the background passes --------------------------------------------------------------------


@dataclass
class PassTiming:
    median_ms: float
    p90_ms: float
    claimed: float  # mean rows claimed per call


# The windowed put-aside's window in a running dispatcher: since its last pass (a second ago)
# less the overlap; and a window of as many due deliveries on both stores.
WINDOW_SECONDS = (MOVE_ASIDE_EVERY + MOVE_ASIDE_OVERLAP).total_seconds()
MATCHED_WINDOW_ROWS = 50

# Claim timings, in the order they are reported: (key, what was timed).
CLAIM_TIMINGS = (
    (
        "scheduler_pass",
        f"scheduler pass: `Store.claim_due` x {len(PROVIDERS)} providers, limit "
        f"{SCHEDULER_CLAIM_LIMIT}",
    ),
    ("scheduler_query", "the same, its claim SELECTs only"),
    (
        "delivery_claim_first",
        f"`Outbox.claim`, limit {DISPATCHER_CLAIM_LIMIT}, with the retry backlog: a process's "
        "first claim, whose sweep reads every due delivery and puts the backlog aside",
    ),
    (
        "delivery_claim_second",
        "the same once the backlog was moved (nothing new to put aside)",
    ),
    (
        "sweep_page_claim",
        f"the same, a claim with a page of the periodic sweep ({MOVE_ASIDE_PAGE} due "
        "deliveries; every 10 minutes), the backlog as loaded",
    ),
    (
        "sweep_whole",
        "the periodic sweep, whole: claims until it is through, the backlog as loaded (rows: "
        "claims)",
    ),
    (
        "sweep_page_matched",
        f"a sweep's page alone (`_sweep_page`), {MATCHED_WINDOW_ROWS} due deliveries on both "
        "stores, the backlog as loaded",
    ),
    (
        "delivery_claim_window",
        "the same, first claim of each later second: the put-aside reads only what became due "
        "since the last",
    ),
    (
        "put_aside_window",
        f"that put-aside alone (`_move_aside`), its window as in a running dispatcher "
        f"({WINDOW_SECONDS:g} s: the last second and the overlap)",
    ),
    (
        "put_aside_matched",
        f"the same, its window the newest {MATCHED_WINDOW_ROWS} due deliveries on both stores",
    ),
    ("delivery_claim", "the same, the other claims"),
    ("delivery_query", "the same, its claim SELECT only"),
    ("delivery_claim_healthy", "`Outbox.claim`, backlog parked"),
    ("delivery_query_healthy", "the same, its claim SELECT only"),
)


@dataclass
class ClaimTimings:
    in_flight: int
    due_tasks: int
    due_deliveries: int
    backlog_deliveries: int
    timings: dict[str, PassTiming]
    put_aside: int = 0  # deliveries a whole sweep put off
    window_rows: int = 0  # pending deliveries that became due in the windowed put-aside's window


# Calls timed (after one more, untimed) for the claims that put the backlog aside: costly.
PUT_ASIDE_ROUNDS = 3


def _due_pending(statement: Any, now: datetime) -> Any:
    delivery = sa.table("delivery", sa.column("status"), sa.column("next_attempt_at", _utc()))
    return statement.select_from(delivery).where(
        delivery.c.status == "pending", delivery.c.next_attempt_at <= now
    )


def window_start(engine: Engine, now: datetime, newest: int) -> datetime:
    """Where a put-aside window holding the ``newest`` pending deliveries due by ``now``
    starts (at the oldest such delivery if there are not as many)."""
    due = sa.literal_column("next_attempt_at", _utc())
    with engine.connect() as connection:
        newest_first = _due_pending(sa.select(due), now).order_by(due.desc())
        times: list[datetime] = list(
            connection.execute(newest_first.limit(newest + 1)).scalars().all()
        )
    if len(times) <= newest:
        return datetime.min.replace(tzinfo=UTC)
    return times[-1]


def rows_due_since(engine: Engine, now: datetime, since: datetime) -> int:
    due = sa.literal_column("next_attempt_at", _utc())
    with engine.connect() as connection:
        statement = _due_pending(sa.select(sa.func.count()), now).where(due > since)
        return int(connection.execute(statement).scalar_one())


def sweep_page_alone(engine: Engine, now: datetime, size: int) -> tuple[int, float]:
    """A sweep's first page of ``size`` on its own, in a transaction rolled back: rows put
    off, seconds."""
    with engine.connect() as connection:
        transaction = connection.begin()
        started = time.perf_counter()
        moved, _ = Outbox._sweep_page(connection, now, _Sweep(now, None, periodic=True), size)
        elapsed = time.perf_counter() - started
        transaction.rollback()
    return moved, elapsed


def put_aside_alone(engine: Engine, now: datetime, since: datetime) -> tuple[int, float]:
    """One windowed put-aside on its own, in a transaction rolled back: rows put off, seconds."""
    with engine.connect() as connection:
        transaction = connection.begin()
        started = time.perf_counter()
        moved = Outbox._move_aside(connection, now, since)
        elapsed = time.perf_counter() - started
        transaction.rollback()
    return moved, elapsed


def measure(
    call: Callable[[], tuple[int, float]], iterations: int, warmup: int | None = None
) -> PassTiming:
    """``call`` returns (rows claimed, seconds the claim itself took)."""
    for _ in range(max(3, iterations // 10) if warmup is None else warmup):
        call()
    results = [call() for _ in range(iterations)]
    durations = sorted(seconds * 1000 for _, seconds in results)
    return PassTiming(
        median_ms=statistics.median(durations),
        p90_ms=durations[min(len(durations) - 1, int(len(durations) * 0.9))],
        claimed=statistics.fmean(claimed for claimed, _ in results),
    )


def claim_statements(engine: Engine, call: Callable[[], object], marker: str) -> list[Statement]:
    """The SELECTs (containing ``marker``) that ``call`` sends."""
    with captured(engine) as statements:
        call()
    return [
        s for s in statements if s.sql.lstrip().upper().startswith("SELECT") and marker in s.sql
    ]


def run_selects(engine: Engine, statements: Sequence[Statement]) -> tuple[int, float]:
    """The statements in one transaction, rolled back (row locks taken on PostgreSQL are
    released): rows returned, seconds."""
    with engine.connect() as connection:
        started = time.perf_counter()
        transaction = connection.begin()
        rows = 0
        for statement in statements:
            rows += len(connection.exec_driver_sql(statement.sql, statement.parameters).all())
        elapsed = time.perf_counter() - started
        transaction.rollback()
    return rows, elapsed


def time_claims(url: str, now: datetime, iterations: int) -> ClaimTimings:
    """The scheduler's claim for every provider (one pass) and the dispatcher's claim, each
    followed (untimed) by handing the leases back, so every call finds the same due work; and
    the claim queries alone, as the methods send them. A new ``Outbox``'s first claim sweeps
    every due delivery and puts the backlog aside: timed on the backlog as loaded (put back
    before each call, untimed); then a claim with a page of the periodic sweep, a page alone
    of as many deliveries on both stores, the whole periodic sweep, a new ``Outbox``'s first
    claim once the backlog was moved; then the windowed pass and the other claims of one
    ``Outbox``."""
    # The plans' probes (or an earlier run on this store) may have put the backlog aside.
    put_back_backlog(url, now)
    report = LoadReport()
    census(url, report, now)
    engine = make_engine(url)
    store = Store(engine, clock=lambda: now)
    outbox = Outbox(store)

    def scheduler_pass() -> tuple[int, float]:
        started = time.perf_counter()
        claims = []
        for provider in PROVIDERS:
            claims += store.claim_due(
                provider,
                "bench-scheduler",
                limit=SCHEDULER_CLAIM_LIMIT,
                lease_seconds=LEASE_SECONDS,
            )
        elapsed = time.perf_counter() - started
        release_tasks(engine, [claim.task_id for claim in claims])
        return len(claims), elapsed

    def claim_by(box: Outbox) -> tuple[int, float]:
        """One claim by ``box``, timed; its leases handed back (untimed)."""
        started = time.perf_counter()
        jobs = box.claim(
            "bench-dispatcher", limit=DISPATCHER_CLAIM_LIMIT, lease_seconds=LEASE_SECONDS
        )
        elapsed = time.perf_counter() - started
        release_deliveries(engine, [job.delivery_pk for job in jobs])
        return len(jobs), elapsed

    def delivery_claim(fresh: bool = False, window: bool = False) -> tuple[int, float]:
        """A claim by ``outbox``; by a new ``Outbox``, which puts the backlog aside first; or
        by one a second after its last put-aside, which reads what became due since."""
        return claim_by(
            between_passes(store, now) if window else Outbox(store) if fresh else outbox
        )

    def first_claim() -> tuple[int, float]:
        put_back_backlog(url, now)
        return delivery_claim(fresh=True)

    def page_claim() -> tuple[int, float]:
        put_back_backlog(url, now)
        return claim_by(sweep_due(store, now))

    def whole_sweep() -> tuple[int, float]:
        """A periodic sweep, claiming until it is through: (claims, seconds)."""
        put_back_backlog(url, now)
        box, claims, elapsed = sweep_due(store, now), 0, 0.0
        while claims == 0 or box._sweep is not None:
            claims += 1
            elapsed += claim_by(box)[1]
        return claims, elapsed

    def matched_page() -> tuple[int, float]:
        put_back_backlog(url, now)
        return sweep_page_alone(engine, now, MATCHED_WINDOW_ROWS)

    timings: dict[str, PassTiming] = {}
    window_rows = 0
    try:
        scheduler_sql = claim_statements(engine, scheduler_pass, "next_check_at")
        timings["scheduler_pass"] = measure(scheduler_pass, iterations)
        timings["scheduler_query"] = measure(lambda: run_selects(engine, scheduler_sql), iterations)
        timings["delivery_claim_first"] = measure(first_claim, PUT_ASIDE_ROUNDS, warmup=1)
        timings["sweep_page_claim"] = measure(page_claim, PUT_ASIDE_ROUNDS, warmup=1)
        timings["sweep_page_matched"] = measure(matched_page, PUT_ASIDE_ROUNDS, warmup=1)
        timings["sweep_whole"] = measure(whole_sweep, PUT_ASIDE_ROUNDS, warmup=1)
        report.put_aside = put_aside_count(url, now)  # the whole sweep's: the backlog moved
        timings["delivery_claim_second"] = measure(
            lambda: delivery_claim(fresh=True), PUT_ASIDE_ROUNDS, warmup=1
        )
        timings["delivery_claim_window"] = measure(lambda: delivery_claim(window=True), iterations)
        since = now - timedelta(seconds=WINDOW_SECONDS)
        window_rows = rows_due_since(engine, now, since)
        timings["put_aside_window"] = measure(
            lambda: put_aside_alone(engine, now, since), iterations
        )
        matched = window_start(engine, now, MATCHED_WINDOW_ROWS)
        timings["put_aside_matched"] = measure(
            lambda: put_aside_alone(engine, now, matched), iterations
        )
        # The claim's own SELECT (not the put-aside's, nor a sweep page's, nor the one loading
        # the jobs); this first claim of ``outbox`` sweeps (nothing new), the others do not.
        delivery_sql = claim_statements(
            engine, delivery_claim, "SELECT delivery.pk, delivery.subscription_pk"
        )
        timings["delivery_claim"] = measure(delivery_claim, iterations)
        timings["delivery_query"] = measure(lambda: run_selects(engine, delivery_sql), iterations)
        set_backlog(url, now, parked=True)
        try:
            timings["delivery_claim_healthy"] = measure(delivery_claim, iterations)
            timings["delivery_query_healthy"] = measure(
                lambda: run_selects(engine, delivery_sql), iterations
            )
        finally:
            set_backlog(url, now, parked=False)
    finally:
        engine.dispose()
    return ClaimTimings(
        in_flight=report.in_flight,
        due_tasks=report.due_tasks,
        due_deliveries=report.due_deliveries,
        backlog_deliveries=report.backlog_deliveries,
        timings=timings,
        put_aside=report.put_aside,
        window_rows=window_rows,
    )


# --- one database ---------------------------------------------------------------------------------


@dataclass
class DatabaseResult:
    database: str
    population: Population
    baseline: Population
    load: LoadReport
    baseline_load: LoadReport
    lookups: list[LookupResult] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    claims_large: ClaimTimings | None = None
    claims_small: ClaimTimings | None = None


@dataclass(frozen=True)
class Options:
    population: Population
    baseline: Population
    small_in_flight: int
    duration: int
    rounds: int
    connections: int
    iterations: int
    http: bool
    plans: bool
    claims: bool


def measure_database(
    kind: str, options: Options, admin_url: str | None, folder: Path, log: Callable[[str], None]
) -> DatabaseResult:
    now = datetime.now(UTC).replace(microsecond=0)
    with (
        fresh_database(kind, folder, admin_url, "small") as small_url,
        fresh_database(kind, folder, admin_url, "large") as large_url,
    ):
        baseline_load = load_store(small_url, options.baseline, now, log)
        load = load_store(large_url, options.population, now, log)
        result = DatabaseResult(kind, options.population, options.baseline, load, baseline_load)
        if options.http:
            result.lookups = measure_lookups(
                small_url,
                large_url,
                folder / kind,
                options.duration,
                options.rounds,
                options.connections,
                log,
            )
        if options.plans:
            log("explaining the hot queries")
            result.plans = query_plans(large_url, small_url, load.rows, baseline_load.rows, now)
        if options.claims:
            log(f"timing the background claims, {load.in_flight:,} in flight")
            result.claims_large = time_claims(large_url, now, options.iterations)
            finish_in_flight(large_url, options.small_in_flight, now)
            log(f"timing the background claims, {options.small_in_flight:,} in flight")
            result.claims_small = time_claims(large_url, now, options.iterations)
    return result


# --- reporting ------------------------------------------------------------------------------------

DATABASE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def lookups_markdown(result: DatabaseResult) -> list[str]:
    if not result.lookups:
        return []
    small, large = result.baseline_load.rows["task"], result.load.rows["task"]
    lines = [
        "",
        f"Lookups over HTTP as alice, store of {small:,} tasks (baseline) and of {large:,}:",
        "",
        "| request | baseline p50 / p99 | large store p50 / p99 | p99 ratio | "
        "server CPU per request, baseline / large | KB per answer, baseline / large | "
        "req/s large | target p99 | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.lookups:
        codes = {
            code: r.small.codes.get(code, 0) + r.large.codes.get(code, 0)
            for code in {*r.small.codes, *r.large.codes}
        }
        unanswered = r.small.errors + r.large.errors
        problems = [f"{n} x {code}" for code, n in sorted(codes.items())]
        problems += [f"{unanswered} unanswered"] if unanswered else []
        note = f" ({', '.join(problems)})" if problems else ""
        lines.append(
            f"| `{r.name}` | {r.small.p50_ms:.2f} / {r.small.p99_ms:.2f} ms | "
            f"{r.large.p50_ms:.2f} / {r.large.p99_ms:.2f} ms | {r.p99_ratio:.2f}x | "
            f"{r.small.server_cpu_ms:.2f} / {r.large.server_cpu_ms:.2f} ms | "
            f"{r.small.answer_kb:.1f} / {r.large.answer_kb:.1f} | "
            f"{r.large.rate:,.0f} | <= {r.target_ms:g} ms | {'yes' if r.met else '**no**'}{note} |"
        )
    return lines


def claims_markdown(result: DatabaseResult) -> list[str]:
    large, small = result.claims_large, result.claims_small
    if large is None or small is None:
        return []

    def row(name: str, a: PassTiming, b: PassTiming) -> str:
        ratio = a.median_ms / b.median_ms if b.median_ms else math.nan
        flat = "yes" if ratio <= FLAT_RATIO else "**no**"
        return (
            f"| {name} | {a.median_ms:.2f} ({a.p90_ms:.2f}) ms, {a.claimed:.0f} rows | "
            f"{b.median_ms:.2f} ({b.p90_ms:.2f}) ms, {b.claimed:.0f} rows | {ratio:.2f}x | {flat} |"
        )

    return [
        "",
        "Background claims in-process on the same store (median (p90) per call, rows claimed; "
        f"the due work is the same share of the tasks in flight; flat: within {FLAT_RATIO:g}x):",
        "",
        f"| claim | {large.in_flight:,} in flight | {small.in_flight:,} in flight | ratio | flat |",
        "|---|---:|---:|---:|---|",
        *(
            row(name, large.timings[key], small.timings[key])
            for key, name in CLAIM_TIMINGS
            if key in large.timings and key in small.timings
        ),
        "",
        f"Due: {large.due_tasks:,} / {small.due_tasks:,} tasks, {large.due_deliveries:,} / "
        f"{small.due_deliveries:,} pending deliveries of which {large.backlog_deliveries:,} / "
        f"{small.backlog_deliveries:,} are backlog (waiting for a retry, held behind one, or on "
        f"a disabled subscription); a whole sweep put {large.put_aside:,} / "
        f"{small.put_aside:,} of them aside. The windowed put-aside's {WINDOW_SECONDS:g} s held "
        f"{large.window_rows:,} / {small.window_rows:,} pending deliveries: the due work is the "
        "same share of the tasks in flight, so it becomes due faster on the large store. (For "
        "the put-aside alone, rolled back each time, rows are the deliveries it put off.)",
    ]


def plans_markdown(result: DatabaseResult, full: bool) -> list[str]:
    if not result.plans:
        return []
    sqlite = result.database == "sqlite"
    explain = "EXPLAIN QUERY PLAN" if sqlite else "EXPLAIN (ANALYZE, BUFFERS)"
    unit = "VM steps" if sqlite else "buffers"
    small = result.baseline_load.rows["task"]
    lines = [
        "",
        f"Query plans ({explain}) on the large store; each statement as the method sent it, "
        f"run once more on each store (time, {unit}; small: the {small:,}-task store):",
        "",
        f"| query | statement | plan | large: ms, {unit} | small: ms, {unit} | flags |",
        "|---|---|---|---:|---:|---|",
    ]
    for plan in result.plans:
        statement = " ".join(plan.sql.split())
        short = statement if len(statement) <= 60 else statement[:57] + "..."
        flags = "; ".join(f"**{f}**" for f in plan.flags) or "-"
        lines.append(
            f"| {plan.query} | `{short}` | {_cell(plan.summary)} | "
            f"{_work(plan.execution_ms, plan.work)} | "
            f"{_work(plan.baseline_ms, plan.baseline_work)} | {flags} |"
        )
    if full:
        for plan in result.plans:
            lines += ["", f"{plan.query}:", "", "```sql", plan.sql.strip(), "```", "```"]
            lines += plan.lines
            lines.append("```")
    return lines


def _work(ms: float | None, work: int | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.2f}, {work:,}" if work is not None else f"{ms:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(results: list[DatabaseResult], run: dict[str, Any], full_plans: bool) -> str:
    lines = [
        f"{run['cores']} cores shared by the server, the database and wrk (1 thread, "
        f"{run['connections']} connection(s), {run['rounds']} rounds of {run['duration']} s "
        f"per request type and store after {WARMUP_SECONDS} s of warm-up, percentiles of the "
        "median round); 1-minute load average before the run: "
        f"{run['load_average_before']:g}. TaskRelay at {run['revision']}.",
    ]
    for result in results:
        load = result.load
        rows = ", ".join(f"{table} {count:,}" for table, count in load.rows.items() if count)
        lines += [
            "",
            f"#### {DATABASE_NAMES[result.database]}",
            "",
            f"Large store: {rows}; {load.in_flight:,} tasks in flight; {load.size_mb:,.0f} MB; "
            f"loaded in {sum(load.seconds.values()):.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in load.seconds.items())}).",
        ]
        lines += lookups_markdown(result)
        lines += claims_markdown(result)
        lines += plans_markdown(result, full_plans)
    return "\n".join(lines)


def as_json(results: list[DatabaseResult], run: dict[str, Any]) -> dict[str, Any]:
    out = []
    for r in results:
        item = asdict(r)
        item["lookups"] = [
            {**asdict(lookup), "p99_ratio": lookup.p99_ratio, "met": lookup.met}
            for lookup in r.lookups
        ]
        item["plans"] = [{**asdict(plan), "summary": plan.summary} for plan in r.plans]
        out.append(item)
    return {"run": run, "databases": out}


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Scale of the store: lookups over HTTP, the background claims and the "
        "query plans with a million tasks, against small stores in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks in the large store")
    parser.add_argument("--in-flight", type=int, default=100_000, help="of them queued or running")
    parser.add_argument(
        "--baseline-tasks", type=int, default=1_000, help="tasks in the HTTP baseline store"
    )
    parser.add_argument(
        "--small-in-flight",
        type=int,
        default=1_000,
        help="tasks in flight for the claims' baseline (the others are finished)",
    )
    parser.add_argument(
        "--due-share", type=float, default=0.20, help="share of the tasks in flight that is due"
    )
    parser.add_argument(
        "--retry-share",
        type=float,
        default=0.05,
        help="share of the tasks in flight with a delivery waiting to be retried",
    )
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per HTTP request type and round"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per HTTP request type (small and large store take turns; the median "
        "round's percentiles are reported)",
    )
    parser.add_argument("--connections", type=int, default=1, help="wrk connections")
    parser.add_argument("--iterations", type=int, default=200, help="timed claims per kind")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(PG_ENV),
        help=f"the PostgreSQL server to run on (default: ${PG_ENV}); databases named "
        f"{DB_PREFIX}* are created on it and dropped afterwards",
    )
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="skip the lookups over HTTP")
    parser.add_argument("--no-plans", action="store_true", help="skip the query plans")
    parser.add_argument("--no-claims", action="store_true", help="skip the claim timings")
    parser.add_argument(
        "--full-plans", action="store_true", help="print every plan in full, not only a summary"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    args = parser.parse_args(argv)
    if not 0 < args.in_flight <= args.tasks * 3 // 4:
        parser.error("--in-flight must be positive and at most 3/4 of --tasks")
    if not 0 < args.small_in_flight <= args.in_flight:
        parser.error("--small-in-flight must be positive and at most --in-flight")
    if min(args.duration, args.rounds, args.iterations, args.connections) < 1:
        parser.error("--duration, --rounds, --iterations and --connections must be positive")
    if args.baseline_tasks < 40:
        parser.error("--baseline-tasks must be at least 40")
    if args.due_share <= 0 or args.retry_share < 0 or args.due_share + args.retry_share >= 1:
        parser.error("--due-share and --retry-share are shares of the tasks in flight")
    http = not args.no_http
    if http and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk); or pass --no-http")
    kinds = [] if args.no_sqlite else ["sqlite"]
    admin_url = psycopg_url(args.database_url) if args.database_url else None
    if not args.no_postgres and admin_url:
        kinds.append("postgresql")
    if not kinds:
        parser.error("nothing to run: no SQLite, and no PostgreSQL URL (--database-url)")

    def population(tasks: int, in_flight: int) -> Population:
        return Population(tasks, in_flight, args.due_share, args.retry_share)

    options = Options(
        population=population(args.tasks, args.in_flight),
        baseline=population(args.baseline_tasks, max(1, args.baseline_tasks // 10)),
        small_in_flight=args.small_in_flight,
        duration=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        iterations=args.iterations,
        http=http,
        plans=not args.no_plans,
        claims=not args.no_claims,
    )

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    revision = service_revision()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="taskrelay-store-scale-") as folder:
        for kind in kinds:
            log(f"--- {DATABASE_NAMES[kind]}")
            results.append(measure_database(kind, options, admin_url, Path(folder), log))
    wall = time.perf_counter() - started
    run = {
        "tasks": args.tasks,
        "in_flight": args.in_flight,
        "baseline_tasks": args.baseline_tasks,
        "small_in_flight": args.small_in_flight,
        "due_share": args.due_share,
        "retry_share": args.retry_share,
        "duration": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "iterations": args.iterations,
        "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "revision": revision,
        "wall_seconds": round(wall, 1),
    }
    if args.json:
        print(json.dumps(as_json(results, run), indent=2, default=str))
    else:
        print(markdown(results, run, args.full_plans))
        print(f"\n(wall time {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
