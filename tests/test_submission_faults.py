"""Faults in the submission path after the provider has taken the task.

A real store (SQLite, and PostgreSQL when TASKRELAY_TEST_DATABASE_URL is set), real adapters,
a real files folder and the real submitter; ``httpx.MockTransport`` stands in for OpenAI and
GrsAI (the adapters' one I/O seam). The rule under test: once a provider has answered 2xx (it
made the image, and bills it), the task is never sent again; what cannot be used of its answer
ends the task at once with an error that says what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from service import files as files_module
from service.app import UPSTREAM_LIMITS, submit_slots
from service.errors import ImageStorageFailed, StoreUnavailable
from service.files import ImageFiles
from service.lifecycle import TaskUpdate
from service.models import TaskOrigin, TaskStatus, UpdateSource
from service.polling import PollPolicy
from service.providers.grsai import GrsAIAdapter
from service.providers.openai import OpenAIAdapter
from service.retry import Backoff, submit_backoff
from service.settings import DEFAULT_MODELS, ProviderSettings, Secret
from service.signing import CallbackSigner
from service.store import Store
from service.submitter import RECORD_RETRY_WAITS, Submitter
from tests.conftest import SECRET, until

PNG_B64 = "iVBORw0KGgo="  # valid base64 (the first bytes of a PNG)
Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Cut(httpx.AsyncByteStream):
    """A reply body that delivers ``chunks`` and then breaks (the connection drops)."""

    def __init__(self, *chunks: bytes, error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error or httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        raise self.error


def sse(*lines: str) -> bytes:
    return "".join(f"data: {line}\n\n" for line in lines).encode()


@dataclass
class Relay:
    """The submitter wired to a real store and files folder, providers behind a mock."""

    store: Store
    files_root: Path
    answers: list[Answer] = field(default_factory=list)
    posts: list[httpx.Request] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    grsai_mode: str = "poll"
    # The submitter's sleep (its backoff and record waits): by default, noted and skipped.
    sleep: Callable[[float], Awaitable[None]] | None = None

    def answer(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.posts.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        response = answer(request) if callable(answer) else answer
        if inspect.isawaitable(response):  # an answer that takes its time
            response = await response
        return response

    async def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def track(self, provider: str, provider_task_id: str) -> None:
        """A task of the same client tracking ``provider_task_id``."""
        self.store.create_task(
            owner="alice",
            provider=provider,
            origin=TaskOrigin.tracked,
            request={},
            metadata={},
            provider_task_id=provider_task_id,
        )

    def create(self, provider: str) -> str:
        """A submitted task, committed and not yet sent; its id."""
        created = self.store.create_task(
            owner="alice",
            provider=provider,
            origin=TaskOrigin.submitted,
            request={"prompt": "a red fox in snow"},
            metadata={},
        )
        task_id: str = created.task["id"]
        return task_id

    @contextlib.asynccontextmanager
    async def submitter(
        self, *, backoff: Backoff | None = None, send_slots: dict[str, int] | None = None
    ) -> AsyncIterator[Submitter]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(self._handle)) as http:
            yield Submitter(
                self.store,
                {
                    "openai": OpenAIAdapter(settings("openai"), http),
                    "grsai": GrsAIAdapter(settings("grsai", mode=self.grsai_mode), http),
                },
                CallbackSigner(SECRET, max_age=3600),
                ImageFiles(self.files_root, "http://relay.test"),
                public_url="http://relay.test",
                backoff=backoff or submit_backoff(0.01, 4),
                sleep=self.sleep or self._sleep,
                send_slots=send_slots,
            )

    async def run(self, provider: str, *, backoff: Backoff | None = None) -> dict[str, Any]:
        """Submit one task to ``provider`` and wait until the submitter is done with it."""
        task_id = self.create(provider)
        async with self.submitter(backoff=backoff) as submitter:
            submitter.submit(task_id)
            await submitter.idle()
        task = self.store.find_task(task_id)
        assert task is not None
        return task


def settings(provider: str, *, mode: str = "callback") -> ProviderSettings:
    return ProviderSettings(
        name=provider,
        api_key=Secret("test-key"),
        base_url=f"https://{provider}.example",
        model=DEFAULT_MODELS[provider],
        mode=mode,
    )


@pytest.fixture
def relay(store: Store, tmp_path: Path) -> Relay:
    return Relay(store, tmp_path / "files")


def event_sources(store: Store, task_id: str) -> list[tuple[str, str]]:
    return [(event.type, event.source) for event in store.list_events("alice", task_id)]


# --- 1. a 2xx answer that cannot be used is never sent again -----------------------------------


# Each reply is made afresh per run (a streamed body can be read once).
UNUSABLE_OPENAI_ANSWERS: dict[str, tuple[Callable[[], httpx.Response], str, str]] = {
    "no image in the entry": (
        lambda: httpx.Response(200, json={"created": 1, "data": [{"revised_prompt": "a fox"}]}),
        "upstream_protocol_error",
        "expected each image to carry `b64_json` or an absolute http(s) `url`",
    ),
    "an image link that is not a URL": (
        lambda: httpx.Response(
            200, json={"created": 1, "data": [{"url": "pending"}, {"url": "javascript:x()"}]}
        ),
        "upstream_protocol_error",
        "expected each image to carry `b64_json` or an absolute http(s) `url`",
    ),
    "not JSON": (
        lambda: httpx.Response(200, text="<html>ok</html>"),
        "upstream_protocol_error",
        "answered HTTP 200 with a body that is not JSON",
    ),
    "image data that is not base64": (
        lambda: httpx.Response(200, json={"created": 1, "data": [{"b64_json": "aGVsbG8=\n"}]}),
        "upstream_protocol_error",
        "returned image data that is not valid base64",
    ),
    "a body that cannot be decoded": (
        lambda: httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
        ),
        "upstream_protocol_error",
        "a body that cannot be decoded",
    ),
    "a body cut off": (
        lambda: httpx.Response(200, stream=Cut(b'{"created": 1, "data": [{"b64_')),
        "upstream_unavailable",
        "answered HTTP 200, then the connection broke",
    ),
}


@pytest.mark.parametrize("case", list(UNUSABLE_OPENAI_ANSWERS))
async def test_an_unusable_2xx_from_openai_fails_the_task_without_resending(
    relay: Relay, case: str
) -> None:
    reply, code, says = UNUSABLE_OPENAI_ANSWERS[case]
    relay.answer(reply(), *[httpx.Response(200, json={"data": [{"b64_json": PNG_B64}]})] * 3)
    task = await relay.run("openai")
    assert len(relay.posts) == 1  # a second POST would make (and bill) a second image
    assert task["status"] == "failed" and task["submit_attempts"] == 1
    assert task["error"]["code"] == code
    assert says in task["error"]["message"]
    assert "not sent again" in task["error"]["message"]
    assert relay.waits == []  # no backoff either: it failed at once
    assert relay.store.due_submit_retries(relay.store.clock() + timedelta(days=1)) == []


async def test_a_grsai_poll_reply_without_the_task_id_fails_without_resending(
    relay: Relay,
) -> None:
    relay.answer(
        *[httpx.Response(200, json={"code": 0, "msg": "success", "data": {"taskId": "abc"}})] * 4
    )
    task = await relay.run("grsai")
    assert len(relay.posts) == 1
    assert task["status"] == "failed"
    assert task["error"]["code"] == "upstream_protocol_error"
    assert "expected the task id to poll with in `data.id`" in task["error"]["message"]


async def test_failures_before_any_2xx_are_still_retried(relay: Relay) -> None:
    """The rule is about 2xx answers only: a 503, or a timeout with no answer, is sent again."""
    relay.answer(
        httpx.Response(503, json={"error": {"message": "busy"}}),
        httpx.ReadTimeout("no answer"),
        httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]}),
    )
    task = await relay.run("openai")
    assert len(relay.posts) == 3
    assert task["status"] == "succeeded" and task["submit_attempts"] == 3
    assert (relay.files_root / task["id"] / "0.png").read_bytes().startswith(b"\x89PNG")


async def test_submissions_past_the_providers_slots_wait_their_turn_without_an_attempt(
    relay: Relay,
) -> None:
    """Each request to OpenAI holds a connection for the whole generation. Past the provider's
    send slots, submissions wait before their attempt is counted, instead of for a pooled
    connection, where a short wait failed attempt after attempt ("PoolTimeout") and then the
    task."""
    release = asyncio.Event()
    in_flight = most = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]})

    relay.answer(*[slow] * 5)
    task_ids = [relay.create("openai") for _ in range(5)]
    async with relay.submitter(send_slots={"openai": 2}) as submitter:
        for task_id in task_ids:
            submitter.submit(task_id)
        await until(lambda: len(relay.posts) == 2, step=0.005)
        await asyncio.sleep(0.05)  # time for a third to go out, were it not held back
        assert len(relay.posts) == 2  # the other three wait for a slot...
        attempts = sorted(relay.store.find_task(i)["submit_attempts"] for i in task_ids)
        assert attempts == [0, 0, 0, 1, 1]  # ...with no attempt spent on the wait
        release.set()
        await submitter.idle()
    assert most == 2 and len(relay.posts) == 5
    for task_id in task_ids:
        task = relay.store.find_task(task_id)
        assert task["status"] == "succeeded" and task["submit_attempts"] == 1


def test_each_provider_has_send_slots_beside_its_status_queries() -> None:
    providers = {
        "openai": dataclasses.replace(settings("openai"), poll_concurrency=8),
        "evolink": dataclasses.replace(settings("evolink"), poll_concurrency=500),
    }
    slots = submit_slots(SimpleNamespace(providers=providers))  # type: ignore[arg-type]
    assert slots == {"openai": UPSTREAM_LIMITS.max_connections - 8, "evolink": 1}


async def test_a_submission_whose_deadline_passed_while_it_waited_for_a_slot_is_not_sent(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is checked again once a send slot is free: a task that waited for one
    past its deadline fails unsent, rather than being billed and then expired at once."""
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]})

    relay.answer(slow, httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]}))
    first, second = relay.create("openai"), relay.create("openai")
    now = relay.store.clock()
    async with relay.submitter(send_slots={"openai": 1}) as submitter:
        submitter.submit(first)
        await until(lambda: len(relay.posts) == 1, step=0.005)
        submitter.submit(second)  # waits for the one slot
        await asyncio.sleep(0.05)
        # The first generation holds the slot past the second's deadline (an hour).
        monkeypatch.setattr(relay.store, "clock", lambda: now + timedelta(hours=2))
        release.set()
        await submitter.idle()
    assert len(relay.posts) == 1
    task = relay.store.find_task(second)
    assert task is not None and task["status"] == "failed" and task["submit_attempts"] == 0
    assert task["error"]["code"] == "submit_deadline_passed"


async def test_a_task_that_expired_while_its_last_attempt_failed_stays_expired(
    relay: Relay,
) -> None:
    """The scheduler expires the task while its last attempt is out; the attempt then fails
    for good. The task stays expired, with one final event: only the provider's own final
    word moves an expired task, and a failure on TaskRelay's side of the submission is not
    one (a subscriber was told it expired, then that it failed)."""
    task_id = relay.create("openai")

    def expire_then_refuse(request: httpx.Request) -> httpx.Response:
        relay.store.expire_task(task_id, "No final answer from the provider before the deadline.")
        return httpx.Response(400, json={"error": {"message": "bad request"}})

    relay.answer(expire_then_refuse)
    async with relay.submitter() as submitter:
        submitter.submit(task_id)
        await submitter.idle()
    task = relay.store.find_task(task_id)
    assert task is not None and task["status"] == "expired"
    assert [kind for kind, _ in event_sources(relay.store, task_id)] == [
        "task.submitted",
        "task.expired",
    ]


async def test_a_retry_past_the_deadline_names_who_set_the_wait(relay: Relay) -> None:
    """A retry that would come after the deadline fails the task now; its message says the
    provider asked for the wait only when it did (Retry-After), and else that it is
    TaskRelay's own backoff."""
    relay.answer(httpx.Response(503, json={"error": {"message": "busy"}}))
    task = await relay.run("openai", backoff=Backoff(base=7200.0, cap=7200.0, max_attempts=4))
    assert task["status"] == "failed"
    message = task["error"]["message"]
    assert ". The next attempt would be in" in message and "asked to wait" not in message
    relay.answer(
        httpx.Response(429, headers={"Retry-After": "7200"}, json={"error": {"message": "slow"}})
    )
    task = await relay.run("openai")
    assert "openai asked to wait 3600 s" in task["error"]["message"]  # Retry-After, capped


# --- 3. an image that cannot be stored -----------------------------------------------------------


async def test_an_image_that_cannot_be_stored_fails_the_task_at_once_and_says_why(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.files_root.write_text("a file where the folder should be")
    relay.answer(*[httpx.Response(200, json={"data": [{"b64_json": PNG_B64}]})] * 4)
    with caplog.at_level(logging.ERROR, logger="service.submitter"):
        task = await relay.run("openai")
    assert len(relay.posts) == 1
    assert task["status"] == "failed" and task["submit_attempts"] == 1
    assert task["error"]["code"] == "image_storage_failed"
    message = task["error"]["message"]
    assert "could not be stored" in message and "Not a directory" in message
    assert "TASKRELAY_FILES_DIR" in message
    assert any(
        record.levelno == logging.ERROR and task["id"] in record.getMessage()
        for record in caplog.records
    )
    assert event_sources(relay.store, task["id"])[-1] == ("task.failed", UpdateSource.submit)


async def test_a_full_disk_while_storing_an_image_leaves_no_partial_file(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files_module.os, "fsync", disk_full)
    relay.answer(*[httpx.Response(200, json={"data": [{"b64_json": PNG_B64}]})] * 4)
    task = await relay.run("openai")
    assert len(relay.posts) == 1
    assert task["status"] == "failed"
    assert task["error"]["code"] == "image_storage_failed"
    assert "No space left on device" in task["error"]["message"]
    assert not (relay.files_root / task["id"]).exists()


async def test_images_saved_before_one_that_cannot_be_are_removed_with_the_task_failed(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second of two images fails to save: the task fails, and the first image goes too,
    or it would be served for a task that says it has no images."""
    save = ImageFiles.save_b64

    def second_fails(self: ImageFiles, task_id: str, index: int, data: str, **kw: Any) -> str:
        if index == 1:
            raise ImageStorageFailed("The image openai returned could not be stored: full.")
        return save(self, task_id, index, data, **kw)

    monkeypatch.setattr(ImageFiles, "save_b64", second_fails)
    images = [{"b64_json": PNG_B64}, {"b64_json": PNG_B64}]
    relay.answer(httpx.Response(200, json={"created": 1, "data": images}))
    task = await relay.run("openai")
    assert task["status"] == "failed" and task["images"] == []
    assert task["error"]["code"] == "image_storage_failed"
    assert not (relay.files_root / task["id"]).exists()


def test_a_saved_image_and_a_new_folder_are_synced_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file, its folder (the rename) and, for a new task folder, the files root (its
    entry) are each fsynced before the URL is handed out."""
    synced: list[tuple[str, str]] = []
    fsync = os.fsync

    def record(descriptor: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        synced.append((kind, os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    monkeypatch.setattr(files_module.os, "fsync", record)
    files = ImageFiles(tmp_path, "http://relay.test")
    task_id = "tsk_" + "a" * 22
    files.save_b64(task_id, 0, PNG_B64, provider="openai")
    folder = str(tmp_path / task_id)
    assert synced == [
        ("file", f"{folder}/.0.png.tmp"),
        ("folder", folder),
        ("folder", str(tmp_path)),
    ]
    synced.clear()
    files.save_b64(task_id, 1, PNG_B64, provider="openai")
    assert synced == [("file", f"{folder}/.1.png.tmp"), ("folder", folder)]


# --- 2. GrsAI stream: a progress line that cannot be recorded -------------------------------------


@pytest.fixture
def flaky_writes(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[UpdateSource]]:
    """The store refuses the writes whose sources are listed (each once), like a database
    blip; the rest go through to the real store."""
    refuse: list[UpdateSource] = []
    real_apply = relay.store.apply_update

    def apply_update(task_id: str, update: TaskUpdate, source: UpdateSource) -> Any:
        if source in refuse:
            refuse.remove(source)
            raise StoreUnavailable("The database did not answer (test blip).")
        return real_apply(task_id, update, source)

    monkeypatch.setattr(relay.store, "apply_update", apply_update)
    yield refuse


FINAL_LINE = (
    '{"progress": 100, "status": "succeeded", "url": "https://file.grsai.example/a.png", '
    '"width": 1024, "height": 1024}'
)


async def test_a_progress_line_the_store_refuses_does_not_abandon_the_stream(
    relay: Relay, flaky_writes: list[UpdateSource]
) -> None:
    relay.grsai_mode = "stream"
    flaky_writes.extend([UpdateSource.stream, UpdateSource.submit])
    relay.answer(
        httpx.Response(
            200,
            content=sse('{"progress": 10}', '{"progress": 60}', FINAL_LINE),
            headers={"Content-Type": "text/event-stream"},
        )
    )
    task = await relay.run("grsai")
    assert len(relay.posts) == 1
    assert task["status"] == "succeeded"
    assert task["images"] == [
        {"url": "https://file.grsai.example/a.png", "width": 1024, "height": 1024}
    ]
    # The first progress line was lost, the second recorded; the final line, refused once,
    # was recorded on the retry that follows the first of the record waits.
    assert event_sources(relay.store, task["id"]) == [
        ("task.submitted", UpdateSource.submit),
        ("task.progress", UpdateSource.stream),
        ("task.succeeded", UpdateSource.submit),
    ]
    assert relay.waits == [RECORD_RETRY_WAITS[0]]


# --- 4. GrsAI stream: broken after it started ----------------------------------------------------


BROKEN_STREAMS: dict[str, tuple[Callable[[], httpx.Response], str, str]] = {
    "ended without a final line": (
        lambda: httpx.Response(200, content=sse('{"progress": 10}')),
        "upstream_protocol_error",
        "ended without a final line",
    ),
    "cut off": (
        lambda: httpx.Response(200, stream=Cut(sse('{"progress": 10}'))),
        "upstream_unavailable",
        "answered HTTP 200, then the connection broke",
    ),
    "an unreadable line": (
        lambda: httpx.Response(200, content=sse('{"progress": 10}', '{"code": 0, "data": 7}')),
        "upstream_protocol_error",
        "expected `data` to be an object",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_STREAMS))
async def test_a_stream_broken_after_it_started_fails_the_task_now(relay: Relay, case: str) -> None:
    relay.grsai_mode = "stream"
    reply, code, says = BROKEN_STREAMS[case]
    relay.answer(reply(), *[httpx.Response(200, content=sse(FINAL_LINE))] * 3)
    task = await relay.run("grsai")
    assert len(relay.posts) == 1
    assert task["status"] == "failed"  # not left running (no id to poll with) until it expires
    assert task["error"]["code"] == code
    assert says in task["error"]["message"] and "not sent again" in task["error"]["message"]
    assert [event for event, _ in event_sources(relay.store, task["id"])] == [
        "task.submitted",
        "task.progress",
        "task.failed",
    ]


async def test_a_stream_broken_after_naming_its_task_is_left_to_the_status_queries(
    relay: Relay, flaky_writes: list[UpdateSource]
) -> None:
    """A stream line that carries the provider's task id (the seed's carry none) makes the
    task one the scheduler can ask about: it is kept, with that id, even when the store
    missed the progress line that named it."""
    relay.grsai_mode = "stream"
    flaky_writes.append(UpdateSource.stream)
    relay.answer(httpx.Response(200, stream=Cut(sse('{"id": "grs-42", "progress": 10}'))))
    task = await relay.run("grsai")
    assert len(relay.posts) == 1
    assert task["status"] in ("queued", "running") and task["error"] is None
    assert task["provider_task_id"] == "grs-42"


# --- 5. Retry-After longer than the backoff's cap ----------------------------------------------


def test_the_backoff_honours_a_retry_after_longer_than_its_cap() -> None:
    backoff = submit_backoff(1.0, 4)
    assert backoff.delay(1, retry_after=600.0) == 600.0
    assert backoff.delay(3, retry_after=3600.0) == 3600.0
    assert backoff.delay(4, retry_after=600.0) is None  # the attempts still run out
    short = backoff.delay(1, retry_after=0.1)
    assert short is not None and 0.5 <= short <= 1.0  # a shorter hint leaves the backoff


async def test_a_submission_retry_waits_as_long_as_retry_after_asks(relay: Relay) -> None:
    planned: list[list[tuple[str, int]]] = []
    now = relay.store.clock()

    async def look(seconds: float) -> None:
        relay.waits.append(seconds)
        planned.append(relay.store.due_submit_retries(now + timedelta(seconds=290)))
        planned.append(relay.store.due_submit_retries(now + timedelta(seconds=310)))

    relay.sleep = look
    relay.answer(
        httpx.Response(
            429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "300"}
        ),
        httpx.Response(200, json={"created": 1, "data": [{"b64_json": PNG_B64}]}),
    )
    task = await relay.run("openai")
    assert relay.waits == [300.0]
    assert planned[0] == [] and planned[1] == [(task["id"], 1)]  # planned 300 s on, not 60
    assert task["status"] == "succeeded" and task["submit_attempts"] == 2


async def test_a_retry_after_past_the_deadline_fails_the_submission_now(relay: Relay) -> None:
    """Waiting that long, the retry would find the task expired by the scheduler, with a
    message blaming the provider's silence: it fails now, saying why."""
    relay.answer(
        httpx.Response(
            429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "3600"}
        ),
    )
    task = await relay.run("openai")  # the store's default deadline: an hour after creation
    assert len(relay.posts) == 1 and relay.waits == []
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_rate_limited"
    message = task["error"]["message"]
    assert "asked to wait 3600 s, past the task's deadline" in message
    assert "TASKRELAY_OPENAI_DEADLINE" in message


def test_the_backoff_saturates_at_its_cap_however_many_attempts_are_allowed() -> None:
    """TASKRELAY_SUBMIT_ATTEMPTS=1000: the waits stay at the cap (4**599 would overflow)."""
    backoff = submit_backoff(1.0, 1000)
    for attempt in (10, 600, 999):
        delay = backoff.delay(attempt)
        assert delay is not None and 30.0 <= delay <= 60.0
    assert backoff.delay(1000) is None


# --- 6. a deadline that passed before the task could be sent ----------------------------------


@pytest.mark.parametrize("attempts_made", [0, 1], ids=["unsent", "retry planned"])
async def test_a_task_found_past_its_deadline_fails_without_being_sent(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, attempts_made: int
) -> None:
    """The deployment was down for two hours: the start-up finds a task never sent (or a
    retry planned before the outage) whose one-hour deadline has passed. Sent now, the
    provider would make, and bill, an image the scheduler expires at once (and in a polled
    mode never fetches): it fails unsent instead, and says why."""
    task_id = relay.create("grsai")
    now = relay.store.clock()
    if attempts_made:
        assert relay.store.mark_submit_attempt(task_id, 1)
        assert relay.store.plan_submit_retry(task_id, 1, now + timedelta(seconds=5))
    monkeypatch.setattr(relay.store, "clock", lambda: now + timedelta(hours=2))
    async with relay.submitter() as submitter:
        assert await submitter.resume() == 1
        await submitter.idle()
        failed = submitter.metrics.counter("submissions_total", provider="grsai", outcome="failed")
    assert relay.posts == []
    task = relay.store.find_task(task_id)
    assert task is not None
    assert task["status"] == "failed" and task["submit_attempts"] == attempts_made
    assert task["error"]["code"] == "submit_deadline_passed"
    assert "TASKRELAY_GRSAI_DEADLINE" in task["error"]["message"]
    assert relay.store.due_submit_retries(now + timedelta(days=1)) == []
    assert event_sources(relay.store, task_id)[-1] == ("task.failed", "submit")
    assert failed == 1


@pytest.mark.parametrize("hours", [0.5, 3], ids=["shortened", "lengthened"])
async def test_the_submitter_goes_by_the_deadline_in_the_task_row(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, hours: float
) -> None:
    """TASKRELAY_GRSAI_DEADLINE changed across a restart: the task keeps the deadline it was
    created with (its row's), which the scheduler expires it by, so the submitter goes by it
    too. A lengthened setting does not send a task already past it (the scheduler would
    expire it at once, with the image billed); a shortened one does not fail a task that
    still has time."""
    task_id = relay.create("grsai")  # a deadline of an hour, in its row
    now = relay.store.clock()
    deadline = timedelta(hours=hours).total_seconds()
    relay.store.policies["grsai"] = dataclasses.replace(
        relay.store.policy("grsai"), deadline=deadline
    )
    monkeypatch.setattr(
        relay.store, "clock", lambda: now + timedelta(minutes=45 if hours < 1 else 90)
    )
    relay.answer(httpx.Response(200, json={"code": 0, "data": {"id": "grs-1"}}))
    async with relay.submitter() as submitter:
        submitter.submit(task_id)
        await submitter.idle()
    task = relay.store.find_task(task_id)
    assert task is not None
    if hours < 1:  # 45 minutes in, with 15 left by the row
        assert len(relay.posts) == 1 and task["status"] != "failed"
    else:  # 90 minutes in: past the row's hour
        assert relay.posts == []
        assert task["status"] == "failed" and task["error"]["code"] == "submit_deadline_passed"


async def test_a_second_sender_cut_off_while_counting_leaves_the_first_senders_attempt_counted(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs send one task (an Idempotency-Key replay of its creation, another replica's
    sweep). The first one's attempt is out; the second one's count of the same attempt,
    refused, is cut off by a shutdown. Taking back "its" count took back the first one's:
    the task looked unsent, and the next process would have sent it, and had it billed,
    twice."""
    out = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        out.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    relay.answer(hang)
    relay.grsai_mode = "callback"  # the cut-off first attempt waits for its callback
    task_id = relay.create("grsai")
    mark = relay.store.mark_submit_attempt
    counts: list[int] = []
    release = threading.Event()

    def slow_mark(task_id: str, attempt: int) -> bool:
        counts.append(attempt)
        if len(counts) == 2:
            release.wait(30)  # the second sender waits for the write turn
        return mark(task_id, attempt)

    monkeypatch.setattr(relay.store, "mark_submit_attempt", slow_mark)
    async with relay.submitter() as submitter:
        submitter.submit(task_id)
        await until(out.is_set)
        submitter.submit(task_id)
        await until(lambda: len(counts) == 2)
        stopping = asyncio.ensure_future(submitter.stop(grace=0))
        await asyncio.sleep(0.05)  # the stop has cut both jobs off
        release.set()
        await stopping
    assert len(relay.posts) == 1 and counts == [1, 1]
    task = relay.store.find_task(task_id)
    assert task is not None and task["submit_attempts"] == 1
    assert task_id not in relay.store.unsent_submissions()


async def test_a_job_cut_off_twice_while_counting_its_attempt_takes_the_count_back(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two stop() calls (the mounted sandbox's early cut-off, then the lifespan's), the
    second while the first one's cut-off job still waits for its count of the attempt: the
    second cancellation escaped the wait, the count committed afterwards was never taken
    back (a task counted as sent that nothing sent, out of every sweep's reach), and the
    job died with a traceback (found in review)."""
    relay.grsai_mode = "callback"
    task_id = relay.create("grsai")
    mark = relay.store.mark_submit_attempt
    counting, release = threading.Event(), threading.Event()

    def slow_mark(task_id: str, attempt: int) -> bool:
        counting.set()
        release.wait(30)
        return mark(task_id, attempt)

    monkeypatch.setattr(relay.store, "mark_submit_attempt", slow_mark)
    with caplog.at_level(logging.INFO):
        async with relay.submitter() as submitter:
            submitter.submit(task_id)
            await until(counting.is_set)
            first = asyncio.ensure_future(submitter.stop(grace=0))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(submitter.stop(grace=0))
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(first, second)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert relay.posts == []
    task = relay.store.find_task(task_id)
    assert task is not None and task["submit_attempts"] == 0
    assert task_id in relay.store.unsent_submissions()


async def test_a_reply_naming_an_id_another_task_of_the_client_holds_fails_the_task(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """The client tracked provider id g-7 before the provider gave it out to this submission:
    the id's updates reach the tracked task, so nothing could finish this one. It used to stay
    queued until its deadline, after a traceback in the log; it fails now, saying why."""
    relay.track("grsai", "g-7")
    relay.answer(httpx.Response(200, json={"code": 0, "data": {"id": "g-7"}}))
    with caplog.at_level(logging.INFO):
        task = await relay.run("grsai")
    assert task["status"] == "failed" and task["provider_task_id"] is None
    assert task["error"]["code"] == "provider_task_id_taken"
    assert "'g-7'" in task["error"]["message"] and "billed" in task["error"]["message"]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len(relay.posts) == 1


async def test_a_redirected_submission_fails_at_once_naming_the_base_url(relay: Relay) -> None:
    """An http:// base URL that the provider redirects: nothing was made. Taken for a lost
    answer, a task at a provider that calls back waited for its deadline, an hour, with no
    error; it fails now, once, saying which setting to change."""
    relay.grsai_mode = "callback"
    relay.answer(httpx.Response(301, headers={"Location": "https://grsai.example/v1/draw"}))
    task = await relay.run("grsai")
    assert len(relay.posts) == 1
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_protocol_error"
    assert "TASKRELAY_GRSAI_BASE_URL" in task["error"]["message"]


async def test_a_final_answer_naming_an_id_another_task_holds_keeps_its_result(
    relay: Relay,
) -> None:
    """A stream's last line is the result itself: with an id another task of the client
    holds, the task still takes the image (without the id) rather than fail with a result
    in hand that was made and billed (found in review)."""
    relay.track("grsai", "g-7")
    final = json.loads(FINAL_LINE)
    final["id"] = "g-7"
    relay.grsai_mode = "stream"
    relay.answer(
        httpx.Response(
            200,
            content=sse('{"id": "g-7", "progress": 10}', json.dumps(final)),
            headers={"Content-Type": "text/event-stream"},
        )
    )
    task = await relay.run("grsai")
    assert task["status"] == "succeeded" and task["images"], task
    assert task["provider_task_id"] is None


# --- 7. what only the submission can settle ------------------------------------------------------


class Hang(httpx.AsyncByteStream):
    """A reply body that delivers ``chunks`` and then waits for good (a long generation)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        await asyncio.Event().wait()


def find(relay: Relay, task_id: str) -> dict[str, Any]:
    task = relay.store.find_task(task_id)
    assert task is not None
    return task


async def test_a_stream_cut_off_by_the_shutdown_after_its_progress_fails_the_task(
    relay: Relay,
) -> None:
    """GrsAI's lines name no task: once its stream reported progress the task is running, and
    nothing but that stream could settle it. Cut off by a shutdown, it fails at once
    (submission_interrupted), as a queued one does, instead of running until its deadline."""
    relay.grsai_mode = "stream"
    relay.answer(httpx.Response(200, stream=Hang(sse('{"progress": 30}'))))
    task_id = relay.create("grsai")
    async with relay.submitter() as submitter:
        submitter.submit(task_id)
        await until(lambda: find(relay, task_id)["status"] == "running")
        await asyncio.wait_for(submitter.stop(grace=0), timeout=30)
    task = find(relay, task_id)
    assert task["status"] == "failed" and task["error"]["code"] == "submission_interrupted"
    assert [kind for kind, _ in event_sources(relay.store, task_id)] == [
        "task.submitted",
        "task.progress",
        "task.failed",
    ]
    assert len(relay.posts) == 1


async def test_a_streams_lines_push_back_when_its_answer_is_lost(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stream's lines come, its process is alive: each pushes the answer's due time
    back (at most every ALIVE_EVERY seconds; every line here), so a long generation is not
    taken for a lost one."""
    import service.submitter

    relay.grsai_mode = "stream"
    relay.store.policies["grsai"] = PollPolicy(60, 3600, queryable=True, answer_within=460.0)
    monkeypatch.setattr(service.submitter, "ALIVE_EVERY", 0.0)
    pushed: list[tuple[str, int, float]] = []
    extend = relay.store.extend_answer_due

    def noted(task_id: str, attempt: int, slack: float = 0.0) -> bool:
        pushed.append((task_id, attempt, slack))
        assert extend(task_id, attempt, slack)
        return True

    monkeypatch.setattr(relay.store, "extend_answer_due", noted)
    relay.answer(
        httpx.Response(200, content=sse('{"progress": 10}', '{"progress": 60}', FINAL_LINE))
    )
    task = await relay.run("grsai")
    assert task["status"] == "succeeded"
    assert pushed == [(task["id"], 1, 0.0)] * 2


def test_a_running_stream_that_stopped_is_due_like_a_queued_task(store: Store) -> None:
    """A task running on its stream's progress alone (no id to poll with, no callback to
    come) whose lines stopped: its answer is lost once the due time, pushed back by its last
    line, has passed. A task running on a callback's word never is."""
    clock = [store.clock()]
    store.clock = lambda: clock[0]  # type: ignore[method-assign]
    store.policies["grsai"] = PollPolicy(60, 3600, queryable=True, answer_within=460.0)
    streamed, called_back = (
        store.create_task(
            owner="alice",
            provider="grsai",
            origin=TaskOrigin.submitted,
            request={"prompt": "x"},
            metadata={},
        ).task["id"]
        for _ in range(2)
    )
    start = clock[0]
    for task_id, source in ((streamed, UpdateSource.stream), (called_back, UpdateSource.callback)):
        assert store.mark_submit_attempt(task_id, 1)
        store.apply_update(task_id, TaskUpdate(status=TaskStatus.running, progress=30), source)
    clock[0] = start + timedelta(seconds=300)
    assert not store.extend_answer_due(streamed, 2)  # not the attempt being read
    assert store.extend_answer_due(streamed, 1)  # a line came
    clock[0] = start + timedelta(seconds=500)
    assert store.expire_unanswered(streamed, "lost") is None  # pushed back to 760 s
    clock[0] = start + timedelta(seconds=760)
    expired = store.expire_unanswered(streamed, "lost")
    assert expired is not None and expired.task["error"]["code"] == "submission_unanswered"
    clock[0] = start + timedelta(seconds=3000)
    assert store.expire_unanswered(called_back, "lost") is None
    assert find_status(store, called_back) == "running"


def find_status(store: Store, task_id: str) -> str:
    task = store.find_task(task_id)
    assert task is not None
    return str(task["status"])


async def test_attempts_that_may_have_reached_the_provider_are_counted_in_the_failure(
    relay: Relay,
) -> None:
    """OpenAI does not call back, so an attempt with no answer (a timeout) is sent again:
    only the answer carries the image. When they all end so, the failure says how many may
    have been made, and billed, at OpenAI."""
    relay.answer(*[httpx.ReadTimeout("slow")] * 4)
    task = await relay.run("openai")
    assert len(relay.posts) == 4
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_unavailable"
    message = task["error"]["message"]
    assert "4 of the 4 attempts this process made got no answer after the request" in message
    assert "may have made (and billed) that many images" in message


async def test_no_attempt_to_a_provider_that_cannot_call_back_starts_in_a_shutdown(
    relay: Relay,
) -> None:
    """Once the shutdown has begun, a submission to OpenAI is not started: cut off before
    its answer, it would fail the task though OpenAI made the image. It stays unsent for
    the next process. GrsAI with callbacks is sent: its callback settles it either way."""
    relay.grsai_mode = "callback"
    openai_task, grsai_task = relay.create("openai"), relay.create("grsai")
    relay.answer(httpx.Response(200, json={"code": 0, "data": {"id": "g-1"}}))
    async with relay.submitter() as submitter:
        await submitter.stop(grace=30)
        submitter.submit(openai_task)
        submitter.submit(grsai_task)
        await submitter.idle()
    assert [request.url.host for request in relay.posts] == ["grsai.example"]
    assert find(relay, openai_task)["submit_attempts"] == 0
    assert relay.store.unsent_submissions() == [openai_task]
    assert find(relay, grsai_task)["provider_task_id"] == "g-1"


async def test_a_retry_to_a_provider_that_cannot_call_back_is_left_to_the_next_process(
    relay: Relay,
) -> None:
    """OpenAI refused the first attempt (500); its retry, planned in the task row, waits out
    its backoff when the shutdown begins: stop() cuts it off at once, however short the
    backoff, rather than send an attempt the shutdown may cut off before its answer."""
    hold = asyncio.Event()

    async def backoff_sleep(seconds: float) -> None:
        await hold.wait()  # a backoff that would end within the grace, once woken

    relay.sleep = backoff_sleep
    relay.answer(httpx.Response(500, json={"error": {"message": "busy"}}))
    task_id = relay.create("openai")
    async with relay.submitter() as submitter:
        submitter.submit(task_id)
        await until(lambda: relay.store.due_submit_retries(far_ahead()) != [])
        await asyncio.wait_for(submitter.stop(grace=3600), timeout=10)
        assert not submitter._running
    assert len(relay.posts) == 1
    assert relay.store.due_submit_retries(far_ahead()) == [(task_id, 1)]
    assert find(relay, task_id)["status"] == "queued"


def far_ahead() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)
