"""The live event stream (``GET /v1/tasks/{id}/stream``) at scale: per-task wake-ups, the one
process-wide watcher for other processes' events (including commits out of seq order on
PostgreSQL), the stream caps, keep-alives and ``Last-Event-ID`` resume.

Streams are held open by calling the app as an ASGI server would (:class:`OpenStream`):
httpx's ASGITransport only returns once a body is complete. "Another process" is a second
engine and Store on the same database, with no listener wired to this app."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from service import stream
from service.app import create_app
from service.db import make_engine
from service.errors import SettingsError, StoreUnavailable, StreamCapacityReached, TooManyStreams
from service.lifecycle import TaskUpdate
from service.models import TaskEvent, TaskStatus, UpdateSource, utcnow
from service.openapi import build_openapi
from service.runtime import Runtime
from service.settings import load_settings
from service.store import Store
from service.stream import EventSignal, EventWatcher, Gap, SeqHorizon
from tests.conftest import ALICE, BOB, auth, make_settings

WAIT = 10.0  # the most any test waits for a frame it expects


# --- harness -------------------------------------------------------------------------------------


class OpenStream:
    """One ``GET /v1/tasks/{id}/stream`` in progress; ``close()`` is the client going away."""

    def __init__(self, app: Starlette, task_id: str, token: str = ALICE, **headers: str) -> None:
        self.items: asyncio.Queue[dict[str, str] | None] = asyncio.Queue()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.started = asyncio.Event()
        self._buffer = b""
        self._asked = False
        self._gone = asyncio.Event()
        raw = [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())]
        raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        path = f"/v1/tasks/{task_id}/stream"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw,
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 4321),
        }
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
            self.started.set()
            return
        self._buffer += message.get("body", b"")
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            item: dict[str, str] = {}
            for line in block.decode().split("\n"):
                key, _, value = line.partition(":")
                item[key or "comment"] = value.strip()
            self.items.put_nowait(item)
        if not message.get("more_body", False):
            self.items.put_nowait(None)  # the server ended the stream

    async def next(self, within: float = WAIT) -> dict[str, str] | None:
        """The next frame or comment (None: the stream ended)."""
        return await asyncio.wait_for(self.items.get(), timeout=within)

    async def next_event(self, within: float = WAIT) -> dict[str, str]:
        """The next frame with an ``event:`` (skipping ``retry:`` and comments)."""
        while True:
            item = await self.next(within)
            assert item is not None, "the stream ended"
            if "event" in item:
                return item

    async def opened(self) -> OpenStream:
        """Wait for the task.state frame (the stream is registered by then)."""
        frame = await self.next_event()
        assert frame["event"] == "task.state", frame
        return self

    async def close(self) -> None:
        self._gone.set()
        await asyncio.wait_for(self.task, timeout=WAIT)

    def quiet(self) -> bool:
        return self.items.empty()


class Relay:
    def __init__(self, app: Starlette, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.runtime: Runtime = app.state.runtime
        self.signal: EventSignal = self.runtime.event_signal
        assert self.signal.watcher is not None
        self.watcher: EventWatcher = self.signal.watcher
        self.reads: Counter[str] = Counter()  # store.events_after calls, per task id
        store = self.runtime.store
        original = store.events_after

        def counting(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
            self.reads[task_id] += 1
            return original(owner, task_id, after_seq)

        store.events_after = counting  # type: ignore[method-assign]

    async def track(self, token: str = ALICE) -> str:
        response = await self.client.post(
            "/v1/tasks/track", json={"provider": "evolink"}, headers=auth(token)
        )
        assert response.status_code == 201, response.text
        task_id: str = response.json()["id"]
        return task_id

    def stream(self, task_id: str, token: str = ALICE, **headers: str) -> OpenStream:
        return OpenStream(self.app, task_id, token, **headers)

    async def update(
        self,
        task_id: str,
        status: TaskStatus,
        progress: int | None = None,
        store: Store | None = None,
    ) -> None:
        """A task change committed from a worker thread, as the service's own writes are."""
        images = ({"url": "https://cdn.example/1.png"},) if status is TaskStatus.succeeded else ()
        update = TaskUpdate(status=status, progress=progress, images=images)
        target = store or self.runtime.store
        await asyncio.to_thread(target.apply_update, task_id, update, UpdateSource.poll)


@asynccontextmanager
async def running(database_url: str, tmp_path: Path, **overrides: str) -> AsyncIterator[Relay]:
    settings = make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_DISPATCHER="false",
        **overrides,
    )
    upstream = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
    app = create_app(settings, http_transport=upstream)
    upstream.app = app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Relay(app, client)


@pytest.fixture
async def relay(database_url: str, tmp_path: Path) -> AsyncIterator[Relay]:
    async with running(database_url, tmp_path) as value:
        yield value


@pytest.fixture
def other_store(database_url: str) -> Any:
    """Another process's store: same database, its own engine, no listener of this app."""
    engine = make_engine(database_url)
    yield Store(engine)
    engine.dispose()


async def eventually(predicate: Callable[[], bool], within: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- which seqs the watcher has seen (pure) ----------------------------------------------------


def test_a_seq_committed_after_a_larger_one_is_still_reported() -> None:
    horizon = SeqHorizon(high=40)
    assert horizon.observe([42], now=0.0) == {42}  # 41 is still in flight somewhere
    assert horizon.high == 42
    assert horizon.ranges() == [(41, 41)]
    assert horizon.observe([41, 43], now=0.5) == {41, 43}  # 41 committed late
    assert horizon.ranges() == []
    assert horizon.observe([], now=1.0) == set()


def test_holes_split_as_they_fill_and_rollbacks_are_given_up() -> None:
    horizon = SeqHorizon(high=10)
    assert horizon.observe([11, 15, 20], now=0.0) == {11, 15, 20}
    assert horizon.ranges() == [(12, 14), (16, 19)]
    assert horizon.observe([13, 17, 21], now=1.0) == {13, 17, 21}
    assert horizon.ranges() == [(12, 12), (14, 14), (16, 16), (18, 19)]
    assert horizon.observe([15, 11], now=1.5) == set()  # already seen: nothing new
    assert horizon.expire(before=0.5) == 5  # noticed at 0.0: taken as rolled back
    assert horizon.ranges() == []
    horizon.observe([30], now=2.0)
    assert horizon.expire(before=0.0, max_gaps=0) == 8  # over the cap: dropped too


def test_priming_finds_the_holes_among_the_newest_events() -> None:
    assert SeqHorizon.from_newest([], 0.0, complete=True).high == 0
    few = SeqHorizon.from_newest([5, 3, 2], 0.0, complete=True)
    assert (few.high, few.ranges()) == (5, [(1, 1), (4, 4)])
    window = SeqHorizon.from_newest([105, 101, 100], 0.0, complete=False)
    assert (window.high, window.ranges()) == (105, [(102, 104)])
    assert window.gaps == [Gap(102, 104, 0.0)]


# --- the signal (no database) ---------------------------------------------------------------------


async def test_a_commit_wakes_only_its_tasks_streams_with_one_loop_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signal = EventSignal()
    loop = asyncio.get_running_loop()
    signal.bind(loop)
    calls: list[Any] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    listeners = {name: [signal.open("alice", name) for _ in range(3)] for name in "abc"}
    worker = threading.Thread(target=signal.notify, args=(frozenset({"a", "b"}),))
    worker.start()
    worker.join()
    assert await listeners["a"][0].wait(WAIT)
    assert all([await listener.wait(WAIT) for listener in listeners["a"][1:] + listeners["b"]])
    assert not any([await listener.wait(0.05) for listener in listeners["c"]])
    assert calls == [signal.wake]  # one hand-over for the commit, not one per stream
    signal.notify(frozenset())  # a commit without events for streams: nothing to do
    assert calls == [signal.wake]


def test_caps_count_per_client_and_per_process() -> None:
    signal = EventSignal(max_streams=3, max_streams_per_client=2)
    first = signal.open("alice", "t1")
    signal.open("alice", "t2")
    with pytest.raises(TooManyStreams) as per_client:
        signal.open("alice", "t3")
    assert per_client.value.status == 429 and per_client.value.retry_after > 0
    signal.open("bob", "t1")
    with pytest.raises(StreamCapacityReached) as per_process:
        signal.open("carol", "t1")
    assert per_process.value.status == 503
    signal.close(first)
    signal.close(first)  # twice: still one slot given back
    assert signal.open_for("alice") == 1 and signal.open_count == 2
    signal.open("carol", "t1")


# --- settings and the OpenAPI document ---------------------------------------------------------


def test_the_per_client_cap_is_a_validated_setting(tmp_path: Path) -> None:
    environ = {"TASKRELAY_DATA_DIR": str(tmp_path / "data")}
    settings = load_settings(environ, env_file=tmp_path / ".env")
    assert (settings.max_streams_per_client, settings.max_streams) == (100, 1000)
    for variable in ("TASKRELAY_MAX_STREAMS_PER_CLIENT", "TASKRELAY_MAX_STREAMS"):
        with pytest.raises(SettingsError) as error:
            load_settings({**environ, variable: "0"}, env_file=tmp_path / ".env")
        assert variable in error.value.message


def test_the_stream_route_documents_its_caps() -> None:
    responses = build_openapi()["paths"]["/v1/tasks/{task_id}/stream"]["get"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]


# --- wake-ups through the app (both databases) --------------------------------------------------


async def test_only_the_stream_of_the_changed_task_reads(relay: Relay) -> None:
    relay.watcher.interval = 3600.0  # this process's commits alone; no watcher pass
    tasks = [await relay.track() for _ in range(3)]
    changed, *others = tasks
    streams = {task_id: await relay.stream(task_id).opened() for task_id in tasks}
    extra = await relay.stream(changed).opened()  # two streams on the changed task

    await relay.update(changed, TaskStatus.running, 40)
    for watching in (streams[changed], extra):
        frame = await watching.next_event()
        assert frame["event"] == "task.progress"
        assert json.loads(frame["data"])["data"]["progress"] == 40
    assert relay.reads[changed] == 2  # one read per stream of that task
    assert all(relay.reads[task_id] == 0 for task_id in others)
    assert all(streams[task_id].quiet() for task_id in others)

    await relay.update(changed, TaskStatus.succeeded)
    assert (await streams[changed].next_event())["event"] == "task.succeeded"
    assert await streams[changed].next() is None  # ends after the final event
    assert (await extra.next_event())["event"] == "task.succeeded"
    assert relay.reads[changed] == 4
    assert all(relay.reads[task_id] == 0 for task_id in others)
    for watching in streams.values():
        await watching.close()
    await extra.close()
    assert relay.signal.open_count == 0


async def test_idle_streams_cost_no_query_but_the_watchers(relay: Relay) -> None:
    relay.watcher.interval = 0.05
    tasks = [await relay.track() for _ in range(5)]
    streams = [await relay.stream(task_id).opened() for task_id in tasks]
    passes = relay.watcher.passes
    await asyncio.sleep(0.6)
    assert sum(relay.reads.values()) == 0  # no stream polls
    assert 1 <= relay.watcher.passes - passes <= 15  # one query per interval, for all five
    for watching in streams:
        await watching.close()
    # Without open streams the watcher stops; the next stream starts it again.
    await eventually(lambda: not relay.watcher.running)
    stopped_at = relay.watcher.passes
    await asyncio.sleep(0.2)
    assert relay.watcher.passes == stopped_at
    again = await relay.stream(tasks[0]).opened()
    assert relay.watcher.running
    await again.close()


async def test_an_event_committed_by_another_process_wakes_the_stream(
    relay: Relay, other_store: Store
) -> None:
    relay.watcher.interval = 0.1
    relay.watcher.sweep_interval = 3600.0  # found by the pass itself
    task_id, quiet_id = await relay.track(), await relay.track()
    watching = await relay.stream(task_id).opened()
    quiet = await relay.stream(quiet_id).opened()
    started = asyncio.get_running_loop().time()
    await relay.update(task_id, TaskStatus.running, 70, store=other_store)
    # Woken by the watcher's pass (every 0.1 s), not by the sweep (hourly here): only a hang
    # takes WAIT.
    frame = await watching.next_event(within=WAIT)
    assert asyncio.get_running_loop().time() - started < WAIT
    assert frame["event"] == "task.progress"
    assert json.loads(frame["data"])["data"]["progress"] == 70
    assert relay.reads[task_id] == 1 and relay.reads[quiet_id] == 0
    await relay.update(task_id, TaskStatus.succeeded, store=other_store)
    assert (await watching.next_event(within=WAIT))["event"] == "task.succeeded"
    assert await watching.next() is None
    assert quiet.quiet()
    await watching.close()
    await quiet.close()


# --- commits out of seq order (PostgreSQL) -------------------------------------------------------


def _insert_event_uncommitted(
    connection: sa.Connection, task_id: str, progress: int
) -> tuple[str, int]:
    """An event appended in a transaction that stays open: its seq is taken, not yet visible."""
    event = TaskEvent.__table__  # type: ignore[attr-defined]
    pk = connection.execute(sa.text("SELECT pk FROM task WHERE id = :id"), {"id": task_id})
    event_id = f"evt_late{progress}"
    row = connection.execute(
        sa.insert(event)
        .values(
            id=event_id,
            task_pk=pk.scalar_one(),
            type="task.progress",
            status="running",
            progress=progress,
            source="poll",
            created_at=utcnow(),
            data={"id": task_id, "status": "running", "progress": progress},
        )
        .returning(event.c.seq)
    )
    return event_id, int(row.scalar_one())


# PostgreSQL only: SQLite has one writer at a time, so its seq order is its commit order.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("found_by", ["pass", "sweep"])
async def test_an_event_committed_after_a_larger_seq_still_reaches_its_stream(
    relay: Relay, other_store: Store, found_by: str
) -> None:
    """PostgreSQL hands out seqs at insert time, not commit time: a transaction holding seq N
    can commit after seq N+1 is visible. The watcher keeps asking for N (a hole) and finds it
    on its next pass; a hole given up (here at once) is still found by the sweep."""
    relay.watcher.interval = 0.1
    if found_by == "pass":
        relay.watcher.sweep_interval = 3600.0
    else:
        relay.watcher.gap_seconds = 0.0
        relay.watcher.sweep_interval = 0.5
    late_id, early_id = await relay.track(), await relay.track()
    late = await relay.stream(late_id).opened()
    early = await relay.stream(early_id).opened()

    connection = other_store.engine.connect()
    transaction = connection.begin()
    event_id, seq = await asyncio.to_thread(_insert_event_uncommitted, connection, late_id, 33)
    await relay.update(early_id, TaskStatus.running, 10, store=other_store)  # seq + 1, committed
    assert (await early.next_event())["event"] == "task.progress"
    horizon = relay.watcher.horizon
    assert horizon is not None and horizon.high > seq

    def in_hole() -> bool:
        return any(low <= seq <= high for low, high in horizon.ranges())

    if found_by == "pass":
        assert in_hole()  # asked for again on every pass
    else:
        await eventually(lambda: not in_hole())  # given up: only the sweep can find it now
    assert late.quiet()

    await asyncio.to_thread(transaction.commit)
    connection.close()
    frame = await late.next_event(within=5.0)
    assert frame["id"] == event_id
    assert json.loads(frame["data"])["data"]["progress"] == 33
    assert (relay.watcher.sweeps > 0) == (found_by == "sweep")
    await late.close()
    await early.close()


# --- caps -----------------------------------------------------------------------------------------


async def test_the_stream_caps_answer_429_and_503_and_slots_come_back(
    database_url: str, tmp_path: Path
) -> None:
    async with running(
        database_url,
        tmp_path,
        TASKRELAY_MAX_STREAMS_PER_CLIENT="2",
        TASKRELAY_MAX_STREAMS="3",
    ) as relay:
        tasks = [await relay.track() for _ in range(3)]
        first = await relay.stream(tasks[0]).opened()
        second = await relay.stream(tasks[1]).opened()

        refused = await relay.client.get(f"/v1/tasks/{tasks[2]}/stream", headers=auth())
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "too_many_streams"
        assert error["details"]["limit"] == 2
        assert "TASKRELAY_MAX_STREAMS_PER_CLIENT" in error["message"]

        bobs_task = await relay.track(BOB)
        bobs = await relay.stream(bobs_task, BOB).opened()  # another client: its own count
        full = await relay.client.get(f"/v1/tasks/{bobs_task}/stream", headers=auth(BOB))
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "stream_capacity_reached"
        assert "retry-after" in full.headers

        # The client goes away: its slot is free at once.
        await first.close()
        assert relay.signal.open_for("alice") == 1
        replacement = await relay.stream(tasks[2]).opened()

        # A stream that ends by itself (the final event) gives its slot back too.
        await relay.update(tasks[1], TaskStatus.succeeded)
        assert (await second.next_event())["event"] == "task.succeeded"
        assert await second.next() is None
        await second.task
        assert relay.signal.open_for("alice") == 1

        # Refused or failed openings hold nothing.
        missing = await relay.client.get("/v1/tasks/tsk_nope/stream", headers=auth())
        assert missing.status_code == 404
        assert relay.signal.open_count == 2
        for watching in (replacement, bobs):
            await watching.close()
        assert relay.signal.open_count == 0


async def test_a_head_request_holds_no_stream_slot(database_url: str, tmp_path: Path) -> None:
    """Starlette answers HEAD on every GET route. A HEAD's client is done at the headers, so
    it gets a GET's headers at once and no stream behind them: before, a stream ran on until
    the task ended, holding a slot (and the connection) nobody would ever read."""
    async with running(database_url, tmp_path, TASKRELAY_MAX_STREAMS_PER_CLIENT="1") as relay:
        task_id = await relay.track()
        for _ in range(3):
            head = await asyncio.wait_for(
                relay.client.head(f"/v1/tasks/{task_id}/stream", headers=auth()), 10
            )
            assert head.status_code == 200, head
            assert head.headers["content-type"].startswith("text/event-stream")
            assert head.headers["cache-control"] == "no-cache"
            assert "content-length" not in head.headers  # as for the GET's stream
            assert head.content == b""
        assert relay.signal.open_count == 0
        opened = await relay.stream(task_id).opened()  # the client's one slot is free
        # And what a GET would get: a 429 while the client's one slot is held...
        full = await relay.client.head(f"/v1/tasks/{task_id}/stream", headers=auth())
        assert full.status_code == 429, full
        await opened.close()
        # ... and a 204 to resume after the final event.
        await relay.update(task_id, TaskStatus.succeeded)
        events = (await relay.client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()
        last = events["data"][-1]["id"]
        resumed = await relay.client.head(
            f"/v1/tasks/{task_id}/stream", headers={**auth(), "Last-Event-ID": last}
        )
        assert resumed.status_code == 204, resumed
        own = f"/v1/tasks/{task_id}/stream"
        for path, token in (("/v1/tasks/tsk_nope/stream", ALICE), (own, BOB)):
            missing = await relay.client.head(path, headers=auth(token))
            assert missing.status_code == 404, (path, missing)
        assert (await relay.client.head(own)).status_code == 401


async def test_a_database_outage_mid_stream_is_retried_and_other_errors_free_the_slot(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "STORE_RETRY_SECONDS", 0.05)
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()
    store = relay.runtime.store
    working = store.events_after
    failures: list[Exception] = [StoreUnavailable("down"), StoreUnavailable("still down")]

    def flaky(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        if failures:
            raise failures.pop(0)
        return working(owner, task_id, after_seq)

    monkeypatch.setattr(store, "events_after", flaky)
    await relay.update(task_id, TaskStatus.running, 30)
    assert (await watching.next_event())["event"] == "task.progress"  # read again, not ended
    assert not failures

    def broken(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        raise ValueError("a bug")

    monkeypatch.setattr(store, "events_after", broken)
    relay.signal.wake([task_id])
    with pytest.raises((ValueError, RuntimeError)):
        await asyncio.wait_for(watching.task, timeout=WAIT)
    assert relay.signal.open_count == 0


async def test_keep_alives_go_on_through_a_database_outage(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads retried every STORE_RETRY_SECONDS must not take the place of keep-alives: a proxy
    drops a stream that stays silent through an outage, which keeping it open was for."""
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    monkeypatch.setattr(stream, "STORE_RETRY_SECONDS", 0.02)  # retried far more often
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()
    store = relay.runtime.store
    working = store.events_after
    failed = Counter[str]()

    def down(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        failed[task_id] += 1
        raise StoreUnavailable("down")

    monkeypatch.setattr(store, "events_after", down)
    relay.signal.wake([task_id])
    # Read again all along (about five reads to a keep-alive), not only at each keep-alive: a
    # stream that read only then would send a keep-alive for every read after the first.
    await eventually(lambda: failed[task_id] > 2 * 5)
    keep_alives = 0
    while not watching.quiet():  # those sent meanwhile
        assert await watching.next() == {"comment": "keep-alive"}
        keep_alives += 1
    for _ in range(5):  # and on they go, the outage still on
        assert await watching.next(within=1.0) == {"comment": "keep-alive"}
    keep_alives += 5
    assert failed[task_id] > keep_alives + 2, (failed, keep_alives)

    monkeypatch.setattr(store, "events_after", working)
    await relay.update(task_id, TaskStatus.running, 20)
    frame = await watching.next_event()  # the outage over, events go on
    assert frame["event"] == "task.progress"
    assert json.loads(frame["data"])["data"]["progress"] == 20
    await watching.close()


async def test_a_read_the_database_does_not_answer_still_gets_keep_alives(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that does not answer holds a read for its connect or pool timeout, longer
    than KEEPALIVE_SECONDS: the keep-alives go on meanwhile."""
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()
    store = relay.runtime.store
    working = store.events_after
    asked, answer = threading.Event(), threading.Event()

    def slow(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        asked.set()
        answer.wait(WAIT)
        return working(owner, task_id, after_seq)

    monkeypatch.setattr(store, "events_after", slow)
    try:
        await relay.update(task_id, TaskStatus.running, 20)
        await eventually(asked.is_set)
        while not watching.quiet():
            await watching.next()  # sent before the read began
        for _ in range(3):
            assert await watching.next(within=1.0) == {"comment": "keep-alive"}
    finally:
        answer.set()
    assert (await watching.next_event())["event"] == "task.progress"
    await watching.close()


async def test_draining_ends_a_stream_in_the_middle_of_a_read_the_database_does_not_answer(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown comes while a stream waits for a read (a database that does not answer,
    up to the pool's timeout): the stream ends at once, as every other one does, instead of
    after the read, which would hold the drain and then be cut off without its last comment
    (found by exploratory testing)."""
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()
    store = relay.runtime.store
    asked, answer, answered = threading.Event(), threading.Event(), threading.Event()

    def hung(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        asked.set()
        answer.wait(WAIT)
        answered.set()
        return []

    monkeypatch.setattr(store, "events_after", hung)
    try:
        relay.signal.wake([task_id])
        await eventually(asked.is_set)
        assert relay.signal.drain() == 1
        while (frame := await watching.next(within=5.0)) == {"comment": "keep-alive"}:
            pass  # sent before the drain
        assert frame == SHUTDOWN
        assert not answered.is_set()  # while the read still hangs
        assert await watching.next() is None
    finally:
        answer.set()
    await asyncio.wait_for(watching.task, timeout=WAIT)
    assert relay.signal.open_count == 0


async def test_an_outage_is_logged_once_for_all_streams_and_once_when_it_ends(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every open stream retries its read several times a second during an outage: one line
    when reads start failing, one when they work again, not one per stream per retry."""
    monkeypatch.setattr(stream, "STORE_RETRY_SECONDS", 0.02)
    tasks = [await relay.track() for _ in range(3)]
    streams = [await relay.stream(task_id).opened() for task_id in tasks]
    store = relay.runtime.store
    working = store.events_after
    lock, back = threading.Lock(), threading.Event()
    outage = {"down": True, "failed": 0}
    held: set[str] = set()  # streams whose read waits for the database to be back

    def flaky(owner: str, task_id: str, after_seq: int) -> list[TaskEvent]:
        with lock:
            if outage["down"]:
                outage["failed"] += 1
                raise StoreUnavailable("down", details={"reason": "OperationalError"})
            held.add(task_id)
        back.wait(WAIT)
        return working(owner, task_id, after_seq)

    monkeypatch.setattr(store, "events_after", flaky)
    with caplog.at_level(logging.WARNING):
        relay.signal.wake(tasks)
        await eventually(lambda: outage["failed"] >= 30)  # about ten retries per stream
        with lock:
            outage["down"] = False
            failed = outage["failed"]
        # A stream reads again only after handling its failed read: once every stream waits
        # in a read, every failure has been handled, and no success comes before one (no race).
        await eventually(lambda: held == set(tasks))
        back.set()
        for task_id in tasks:
            await relay.update(task_id, TaskStatus.running, 60)
        for watching in streams:
            assert (await watching.next_event())["event"] == "task.progress"
    logged = [r.getMessage() for r in caplog.records if "event stream read" in r.getMessage()]
    assert logged == [
        "event stream read skipped: the database is unavailable (OperationalError); "
        "retried until it answers",
        f"event stream read works again, after {failed} skipped",
    ]
    for watching in streams:
        await watching.close()


# --- keep-alives and resume -----------------------------------------------------------------------


async def test_keep_alives_flow_while_the_task_is_quiet(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()
    assert watching.headers["content-type"].startswith("text/event-stream")
    comments = 0
    while comments < 3:
        item = await watching.next(within=2.0)
        assert item is not None and item.get("comment") == "keep-alive", item
        comments += 1
    assert relay.reads[task_id] == 0  # keep-alives cost no query
    await relay.update(task_id, TaskStatus.running, 5)
    assert (await watching.next_event())["event"] == "task.progress"
    await watching.close()


async def test_last_event_id_resumes_after_that_event(relay: Relay) -> None:
    task_id = await relay.track()
    await relay.update(task_id, TaskStatus.running, 10)
    await relay.update(task_id, TaskStatus.running, 50)
    history = await relay.client.get(f"/v1/tasks/{task_id}/events", headers=auth())
    ids = [event["id"] for event in history.json()["data"]]
    assert len(ids) == 3  # submitted, progress 10, progress 50

    resumed = relay.stream(task_id, **{"Last-Event-ID": ids[0]})
    backlog = [await resumed.next_event(), await resumed.next_event()]
    assert [frame["id"] for frame in backlog] == ids[1:]  # no task.state when resuming
    assert [json.loads(f["data"])["data"]["progress"] for f in backlog] == [10, 50]
    await relay.update(task_id, TaskStatus.succeeded)
    final = await resumed.next_event()
    assert final["event"] == "task.succeeded"
    assert await resumed.next() is None
    await resumed.close()

    # Resuming after the final event: nothing will ever come. 204, which tells an EventSource
    # to stop reconnecting (a stream that just ended would have it back every 2 s).
    done = await relay.client.get(
        f"/v1/tasks/{task_id}/stream", headers={**auth(), "Last-Event-ID": final["id"]}
    )
    assert done.status_code == 204 and done.content == b""
    assert relay.signal.open_count == 0


async def test_a_late_result_after_task_expired_is_streamed_to_a_resume(relay: Relay) -> None:
    """task.expired ends a stream as a final event does, but the provider's late result can
    still land on the task: a resume after task.expired is a 204 until it has come, and
    streams it (then ends) once it has."""
    task_id = await relay.track()
    watching = await relay.stream(task_id).opened()  # past its task.state
    await asyncio.to_thread(relay.runtime.store.expire_task, task_id, "gave up")
    expired = await watching.next_event()
    assert expired["event"] == "task.expired"
    assert await watching.next() is None  # the stream ends there
    await watching.close()

    resume = {**auth(), "Last-Event-ID": expired["id"]}
    early = await relay.client.get(f"/v1/tasks/{task_id}/stream", headers=resume)
    assert early.status_code == 204  # nothing yet, and nothing may ever come

    await relay.update(task_id, TaskStatus.succeeded)  # the provider's late word
    late = relay.stream(task_id, **{"Last-Event-ID": expired["id"]})
    result = await late.next_event()
    assert result["event"] == "task.succeeded"
    assert json.loads(result["data"])["data"]["status"] == "succeeded"
    assert await late.next() is None
    await late.close()
    assert relay.signal.open_count == 0


# --- shutdown -------------------------------------------------------------------------------------

SHUTDOWN = {"comment": "shutdown: reconnect with Last-Event-ID"}


async def test_draining_ends_open_streams_cleanly_and_the_client_resumes_elsewhere(
    database_url: str, tmp_path: Path
) -> None:
    """When shutdown begins, every open stream ends at once with a last comment (left open, it
    would hold the process until the graceful timeout and then be cut off); what it sent
    carries ids, so the client resumes on another process with Last-Event-ID."""
    async with running(database_url, tmp_path / "first") as first:
        task_id, quiet_id = await first.track(), await first.track()
        watching = first.stream(task_id)
        state = await watching.next_event()
        assert state["event"] == "task.state" and state["id"]
        await first.update(task_id, TaskStatus.running, 40)
        progress = await watching.next_event()
        assert progress["event"] == "task.progress" and progress["id"]
        quiet = await first.stream(quiet_id).opened()
        reads = sum(first.reads.values())

        assert first.signal.drain() == 2
        for ending in (watching, quiet):
            assert await ending.next() == SHUTDOWN
            assert await ending.next() is None  # the response ended: not cut off, no error
            await asyncio.wait_for(ending.task, timeout=WAIT)
        assert first.signal.open_count == 0
        assert sum(first.reads.values()) == reads  # woken to end, not to read

        # A stream opened while draining sends the task's state, then ends the same way.
        late = first.stream(task_id)
        assert (await late.next_event())["event"] == "task.state"
        assert await late.next() == SHUTDOWN
        assert await late.next() is None
        await asyncio.wait_for(late.task, timeout=WAIT)
        assert first.signal.open_count == 0

    # Another process: the client resumes after the last event it got, and misses nothing.
    async with running(database_url, tmp_path / "second") as second:
        await second.update(task_id, TaskStatus.running, 80)  # while it was reconnecting
        resumed = second.stream(task_id, **{"Last-Event-ID": progress["id"]})
        missed = await resumed.next_event()
        assert missed["event"] == "task.progress"
        assert json.loads(missed["data"])["data"]["progress"] == 80
        await second.update(task_id, TaskStatus.succeeded)
        assert (await resumed.next_event())["event"] == "task.succeeded"
        assert await resumed.next() is None
        await resumed.close()
