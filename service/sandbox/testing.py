"""Helpers for tests that drive the sandbox: a manual clock, a callback recorder, client calls.

``ManualClock`` is passed as both ``clock`` and ``sleep`` so a test moves time itself and a
sleeper advances it at once (no real waiting). ``CallbackRecorder`` is a tiny Starlette app that
records what it receives; give the :class:`~service.sandbox.Sandbox` an ``httpx.AsyncClient``
whose transport is ``httpx.ASGITransport(app=recorder.app)`` (:func:`asgi_client`) and callbacks
travel as real HTTP requests without sockets. ``ASYNC_APIS`` says, from the client's side, how to
submit to each asynchronous provider and ask a task's status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class ManualClock:
    """A clock that moves only when told to, or when something sleeps on it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


@dataclass
class ReceivedCallback:
    at: float  # time.monotonic() at arrival
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    def json(self) -> Any:
        return json.loads(self.body)


class CallbackRecorder:
    """Receives callbacks on any path; answers the queued statuses in turn, then 200."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.received: list[ReceivedCallback] = []
        self._statuses = list(statuses)
        self._arrived = asyncio.Condition()
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    def answer(self, *statuses: int) -> None:
        """The statuses the next callbacks get, in order (200 after they run out)."""
        self._statuses = list(statuses)

    async def _receive(self, request: Request) -> Response:
        answered = self._statuses.pop(0) if self._statuses else 200
        self.received.append(
            ReceivedCallback(
                at=time.monotonic(),
                path=request.url.path,
                headers=dict(request.headers),
                body=await request.body(),
                answered=answered,
            )
        )
        async with self._arrived:
            self._arrived.notify_all()
        return JSONResponse({"ok": answered < 400}, status_code=answered)

    async def wait_for(self, count: int, within: float = 5.0) -> list[ReceivedCallback]:
        """Wait until at least ``count`` callbacks arrived; raises TimeoutError otherwise."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)
        return self.received

    def client(self) -> httpx.AsyncClient:
        """An httpx client that delivers every request to this recorder."""
        return asgi_client(self.app)


def asgi_client(
    app: Starlette, *, base_url: str = "", headers: Mapping[str, str] | None = None
) -> httpx.AsyncClient:
    """An httpx client that hands every request to ``app`` in-process, without sockets."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url, headers=headers
    )


@dataclass(frozen=True)
class ProviderAPI:
    """How a client calls one asynchronous provider of the sandbox (paths from the sandbox root)."""

    name: str
    submit_path: str
    # The submit body field that takes a callback URL.
    callback_field: str
    # The task id in a submit reply.
    task_id: Callable[[Any], str]
    # The request that asks a task's status.
    status: Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


ASYNC_APIS: dict[str, ProviderAPI] = {
    api.name: api
    for api in (
        ProviderAPI(
            "grsai",
            "/grsai/v1/draw/completions",
            "webHook",
            lambda reply: str(reply["data"]["id"]),
            lambda http, task_id: http.post("/grsai/v1/draw/result", json={"id": task_id}),
        ),
        ProviderAPI(
            "gptimage15",
            "/gptimage15/api/generate",
            "callback_url",
            lambda reply: str(reply["data"]["task_id"]),
            lambda http, task_id: http.get("/gptimage15/api/status", params={"task_id": task_id}),
        ),
        ProviderAPI(
            "evolink",
            "/evolink/v1/images/generations",
            "callback_url",
            lambda reply: str(reply["id"]),
            lambda http, task_id: http.get(f"/evolink/v1/tasks/{task_id}"),
        ),
        ProviderAPI(
            "apiinone",
            "/apiinone/api/v1/images/generations",
            "callback_url",
            lambda reply: str(reply["data"]["task_id"]),
            lambda http, task_id: http.get(f"/apiinone/api/v1/tasks/{task_id}"),
        ),
    )
}
