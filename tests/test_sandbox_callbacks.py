"""Callbacks: delivered as real HTTP (through ASGITransport) to a recording receiver app.

These run on the real clock with durations of a few hundredths of a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.sandbox import Sandbox, SandboxBehaviour, SandboxTask
from service.sandbox.testing import ASYNC_APIS, CallbackRecorder, asgi_client

AUTH = {"Authorization": "Bearer sandbox-key"}
DURATION = 0.05
HOOK = "http://receiver.test/hooks/task-1"


class ReceiverTransport(httpx.AsyncBaseTransport):
    """Delivers to the recorder, except that host ``down.test`` refuses connections."""

    def __init__(self, recorder: CallbackRecorder) -> None:
        self.inner = httpx.ASGITransport(app=recorder.app)
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            self.refused += 1
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def recorder() -> CallbackRecorder:
    return CallbackRecorder()


@pytest.fixture
async def transport(recorder: CallbackRecorder) -> ReceiverTransport:
    return ReceiverTransport(recorder)


@pytest.fixture
async def sandbox(transport: ReceiverTransport) -> AsyncIterator[Sandbox]:
    async with httpx.AsyncClient(transport=transport) as http:
        box = Sandbox(
            http,
            behaviour={"*": SandboxBehaviour(duration=DURATION, callback_retry_backoff=0.01)},
        )
        yield box
        await box.aclose()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(sandbox.app, base_url="http://sandbox.test", headers=AUTH) as http:
        yield http


# The submit body of each provider, besides the prompt and the callback URL.
SUBMITS: dict[str, dict[str, Any]] = {
    "grsai": {"model": "m"},
    "gptimage15": {},
    "evolink": {"model": "gpt-image-1.5"},
    "apiinone": {"model": "gpt-image-1-5"},
}
PROVIDERS = pytest.mark.parametrize("provider", list(SUBMITS))


async def status_body(http: httpx.AsyncClient, provider: str, task_id: str) -> Any:
    response = await ASYNC_APIS[provider].status(http, task_id)
    assert response.status_code == 200
    return response.json()


def final_status(provider: str, body: Any) -> str:
    data = body if provider == "evolink" else body["data"]
    return str(data["status"])


async def submit(
    http: httpx.AsyncClient, provider: str, prompt: str = "a cat", hook: str = HOOK
) -> str:
    api = ASYNC_APIS[provider]
    body = {**SUBMITS[provider], "prompt": prompt, api.callback_field: hook}
    response = await http.post(api.submit_path, json=body)
    assert response.status_code == 200, response.text
    return api.task_id(response.json())


async def settle(sandbox: Sandbox) -> None:
    """Wait until no callback sender is left running."""
    for _ in range(500):
        if all(task.callback_state not in ("pending",) for task in sandbox.tasks.values()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("callbacks still pending")


@PROVIDERS
async def test_the_final_callback_is_the_status_body(
    provider: str, client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    start = time.monotonic()
    task_id = await submit(client, provider)
    (received,) = await recorder.wait_for(1)
    assert received.at - start >= DURATION
    assert received.path == "/hooks/task-1"
    assert received.headers["content-type"] == "application/json"
    body = received.json()
    assert body == await status_body(client, provider, task_id)
    assert final_status(provider, body) in ("succeeded", "SUCCESS", "completed")
    await settle(sandbox)
    task = sandbox.tasks[task_id]
    assert task.callback_state == "sent"
    (attempt,) = task.callbacks
    assert (attempt.url, attempt.kind, attempt.status_code, attempt.body) == (
        HOOK,
        "final",
        200,
        body,
    )


@PROVIDERS
async def test_a_failed_task_calls_back_too(
    provider: str, client: httpx.AsyncClient, recorder: CallbackRecorder
) -> None:
    task_id = await submit(client, provider, "x sandbox:fail=1")
    (received,) = await recorder.wait_for(1)
    body = received.json()
    assert final_status(provider, body) in ("failed", "FAILED")
    assert body == await status_body(client, provider, task_id)


async def test_callback_bodies_have_each_providers_shape(
    client: httpx.AsyncClient, recorder: CallbackRecorder
) -> None:
    ids = {
        provider: await submit(client, provider, hook=f"http://r.test/{provider}")
        for provider in SUBMITS
    }
    await recorder.wait_for(4)
    bodies = {r.path.strip("/"): r.json() for r in recorder.received}

    grsai = bodies["grsai"]
    assert grsai["code"] == 0 and grsai["data"]["id"] == ids["grsai"]
    assert grsai["data"]["results"][0]["url"].endswith(f"/grsai/files/{ids['grsai']}/0.png")
    gpt = bodies["gptimage15"]
    assert gpt["code"] == 200 and gpt["data"]["status"] == "SUCCESS"
    assert gpt["data"]["response"] == [
        f"http://sandbox.test/gptimage15/files/{ids['gptimage15']}/0.png"
    ]
    evo = bodies["evolink"]  # the bare task object
    assert evo["object"] == "image.generation.task" and evo["id"] == ids["evolink"]
    assert (evo["status"], evo["progress"]) == ("completed", 100)
    aio = bodies["apiinone"]
    assert aio["code"] == 200 and aio["message"] == "success"
    assert aio["data"]["task_id"] == ids["apiinone"] and aio["data"]["status"] == "completed"


@PROVIDERS
async def test_drop_sends_nothing(
    provider: str, client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    task_id = await submit(client, provider, "x sandbox:callback=drop")
    await asyncio.sleep(DURATION * 3)
    assert recorder.received == []
    assert sandbox.tasks[task_id].callback_state == "dropped"
    assert sandbox.tasks[task_id].callbacks == []


async def test_drop_rate_one_drops_and_zero_delivers(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    dropped = await submit(client, "evolink", "x sandbox:callback_drop_rate=1")
    kept = await submit(client, "evolink", "x sandbox:callback_drop_rate=0")
    await recorder.wait_for(1)
    await settle(sandbox)
    assert sandbox.tasks[dropped].callback_state == "dropped"
    assert sandbox.tasks[kept].callback_state == "sent"
    assert len(recorder.received) == 1


@PROVIDERS
async def test_duplicate_sends_the_final_callback_twice(
    provider: str, client: httpx.AsyncClient, recorder: CallbackRecorder
) -> None:
    await submit(client, provider, "x sandbox:callback=duplicate")
    first, second = await recorder.wait_for(2)
    assert first.body == second.body


@PROVIDERS
async def test_out_of_order_sends_final_then_a_stale_running_one(
    provider: str, client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    task_id = await submit(client, provider, "x sandbox:callback=out_of_order")
    final, stale = await recorder.wait_for(2)
    assert final_status(provider, final.json()) in ("succeeded", "SUCCESS", "completed")
    assert final_status(provider, stale.json()) in ("running", "IN_PROGRESS", "processing")
    await settle(sandbox)
    assert [a.kind for a in sandbox.tasks[task_id].callbacks] == ["final", "stale"]
    if provider != "gptimage15":
        data = stale.json() if provider == "evolink" else stale.json()["data"]
        assert data["progress"] == 50


async def test_callback_delay(client: httpx.AsyncClient, recorder: CallbackRecorder) -> None:
    start = time.monotonic()
    await submit(client, "apiinone", "x sandbox:callback_delay=0.15")
    (received,) = await recorder.wait_for(1)
    assert received.at - start >= DURATION + 0.15


async def test_evolink_retries_a_failing_receiver(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    recorder.answer(500, 503)
    task_id = await submit(client, "evolink")
    await recorder.wait_for(3)
    await settle(sandbox)
    attempts = sandbox.tasks[task_id].callbacks
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    # Backoff callback_retry_backoff * k between attempts: 0.01 s, then 0.02 s.
    assert attempts[1].at - attempts[0].at >= 0.01 and attempts[2].at - attempts[1].at >= 0.02


async def test_evolink_gives_up_after_three_retries(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    recorder.answer(500, 500, 500, 500, 500, 500)
    task_id = await submit(client, "evolink")
    await recorder.wait_for(4)
    await settle(sandbox)
    await asyncio.sleep(0.1)
    assert len(recorder.received) == 4
    assert [a.status_code for a in sandbox.tasks[task_id].callbacks] == [500] * 4


async def test_evolink_retries_on_connection_errors(
    client: httpx.AsyncClient, transport: ReceiverTransport, sandbox: Sandbox
) -> None:
    task_id = await submit(client, "evolink", hook="http://down.test/hook")
    await asyncio.sleep(DURATION)
    await settle(sandbox)
    attempts = sandbox.tasks[task_id].callbacks
    assert transport.refused == 4 and len(attempts) == 4
    assert all(a.status_code is None and "ConnectError" in (a.error or "") for a in attempts)


async def test_other_providers_do_not_retry_unless_told(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    recorder.answer(500, 500, 500)
    once = await submit(client, "grsai")
    await recorder.wait_for(1)
    await settle(sandbox)
    assert len(sandbox.tasks[once].callbacks) == 1

    recorder.answer(500)
    twice = await submit(client, "apiinone", "x sandbox:callback_retries=1")
    await recorder.wait_for(3)
    await settle(sandbox)
    assert [a.status_code for a in sandbox.tasks[twice].callbacks] == [500, 200]


async def test_aclose_cancels_pending_callbacks(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    task_id = await submit(client, "evolink", "x sandbox:duration=5")
    assert sandbox.tasks[task_id].callback_state == "pending"
    await sandbox.aclose()
    assert sandbox.tasks[task_id].callback_state == "canceled"
    assert recorder.received == []


async def test_polling_without_a_callback_url_sends_nothing(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    reply = await client.post("/grsai/v1/draw/completions", json={"prompt": "x", "webHook": "-1"})
    task_id = reply.json()["data"]["id"]
    await asyncio.sleep(DURATION * 3)
    assert recorder.received == [] and sandbox.tasks[task_id].callback_state == "none"
    assert sandbox.tasks[task_id].mode == "poll"


# --- no sender outlives aclose() ------------------------------------------------------------------


def hooked_task(task_id: str) -> SandboxTask:
    """A task with a callback URL due in 5 s, made without a request."""
    return SandboxTask(
        id=task_id,
        provider="evolink",
        created_at=time.monotonic(),
        created_unix=int(time.time()),
        behaviour=SandboxBehaviour(duration=5.0),
        outcome="succeeded",
        base_url="http://sandbox.test/evolink",
        request={},
        callback_url=HOOK,
    )


async def test_no_callback_starts_after_aclose(
    client: httpx.AsyncClient, recorder: CallbackRecorder, sandbox: Sandbox
) -> None:
    await sandbox.aclose()
    task_id = await submit(client, "evolink")  # still answered, as during a server's shutdown
    await asyncio.sleep(DURATION * 3)
    assert recorder.received == []
    assert sandbox.tasks[task_id].callback_state == "canceled"


async def test_reset_cancels_a_callback_scheduled_while_it_waits(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await submit(client, "evolink", "x sandbox:duration=5")
    resetting = asyncio.create_task(sandbox.reset())
    await asyncio.sleep(0)  # reset() has canceled that sender and waits for it to end
    late = sandbox.add_task(hooked_task("late"))
    assert late.callback_state == "pending"
    await resetting
    assert late.callback_state == "canceled"
    await sandbox.aclose()
    assert late.callback_state == "canceled"


async def test_canceling_aclose_cancels_its_caller(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    task_id = await submit(client, "evolink", "x sandbox:duration=5")
    closing = asyncio.create_task(sandbox.aclose())
    await asyncio.sleep(0)  # aclose() has canceled the sender and waits for it to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert sandbox.tasks[task_id].callback_state == "canceled"
