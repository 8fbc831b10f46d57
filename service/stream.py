"""``GET /v1/tasks/{id}/stream``: a task's events as Server-Sent Events, as they happen.

It starts with the task's current state (``event: task.state``), then sends each new event
(``id:`` the event id, ``event:`` its type, ``data:`` the same envelope webhooks carry), and
ends after the terminal event. New events wake the stream at once when they are committed in
this process, and within ``POLL_SECONDS`` when another process commits them. A client that
reconnects with ``Last-Event-ID`` resumes after that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.models import TERMINAL_STATUSES, TaskStatus
from service.outbox import envelope
from service.runtime import runtime_of

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
FINAL_TYPES = {f"task.{status.value}" for status in TERMINAL_STATUSES}


class EventSignal:
    """Wakes every waiting stream when events are committed (``notify`` from any thread)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=seconds)


def _frame(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


async def stream_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    task_id = request.path_params["task_id"]
    # The task and its events from one snapshot, so no event falls between them.
    task, events = await run_in_threadpool(runtime.store.task_with_events, owner, task_id)
    resume_from = request.headers.get("last-event-id")
    last_seq = 0
    if resume_from:
        last_seq = next((e.seq or 0 for e in events if e.id == resume_from), 0)
    elif events:
        last_seq = events[-1].seq or 0

    async def frames() -> AsyncIterator[bytes]:
        nonlocal last_seq
        yield b"retry: 2000\n\n"
        if resume_from:
            backlog = [e for e in events if (e.seq or 0) > last_seq]
        else:
            state = {"type": "task.state", "timestamp": task["updated_at"], "data": task}
            yield _frame("task.state", state, events[-1].id if events else None)
            if TaskStatus(task["status"]) in TERMINAL_STATUSES:
                return
            backlog = []
        idle = 0.0
        while True:
            for event in backlog:
                last_seq = event.seq or last_seq
                yield _frame(event.type, envelope(event), event.id)
                if event.type in FINAL_TYPES:
                    return
            if await request.is_disconnected():
                return
            await runtime.event_signal.wait(POLL_SECONDS)
            backlog = await run_in_threadpool(runtime.store.events_after, owner, task_id, last_seq)
            idle = 0.0 if backlog else idle + POLL_SECONDS
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield b": keep-alive\n\n"

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


routes = [Route("/v1/tasks/{task_id}/stream", stream_task, methods=["GET"])]
