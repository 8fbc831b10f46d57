"""The sandbox's five provider APIs: formats, progression, failures, validation, auth, errors.

Most tests run on a ManualClock, so "time passes" is a line of code and nothing waits.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.errors import ValidationFailed
from service.providers.base import GenerationRequest
from service.providers.evolink import EvoLinkAdapter
from service.sandbox import Sandbox, SandboxBehaviour
from service.sandbox.testing import (
    ASYNC_APIS,
    CallbackRecorder,
    ManualClock,
    ProviderAPI,
    asgi_client,
)
from service.settings import ProviderSettings

KEY = "sandbox-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def sandbox(clock: ManualClock) -> AsyncIterator[Sandbox]:
    recorder = CallbackRecorder()
    async with recorder.client() as http:
        box = Sandbox(
            http,
            behaviour={"*": SandboxBehaviour(duration=10.0)},
            clock=clock,
            sleep=clock.sleep,
        )
        yield box
        await box.aclose()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(sandbox.app, base_url="http://sandbox.test", headers=AUTH) as http:
        yield http


# --- one table describing the four asynchronous providers -----------------------------------------


@dataclass(frozen=True)
class Case:
    api: ProviderAPI
    body: dict[str, Any]
    # (raw status, progress or None, image URLs, failure message or None) of a status body
    normalise: Callable[[Any], tuple[str, int | None, list[str], str | None]]
    # The raw status while queued, running, succeeded, failed
    statuses: tuple[str, str, str, str]

    @property
    def provider(self) -> str:
        return self.api.name

    def status(self, http: httpx.AsyncClient, task_id: str) -> Awaitable[httpx.Response]:
        return self.api.status(http, task_id)


def _grsai(body: Any) -> tuple[str, int | None, list[str], str | None]:
    data = body["data"]
    urls = [item["url"] for item in data["results"]]
    return data["status"], data["progress"], urls, data["failure_reason"] or None


def _gptimage15(body: Any) -> tuple[str, int | None, list[str], str | None]:
    data = body["data"]
    return data["status"], None, data["response"] or [], data["error_message"]


def _evolink(body: Any) -> tuple[str, int | None, list[str], str | None]:
    error = body.get("error")
    return body["status"], body["progress"], body.get("results", []), error and error["message"]


def _apiinone(body: Any) -> tuple[str, int | None, list[str], str | None]:
    data = body["data"]
    return data["status"], data["progress"], data["results"], data["error_message"]


CASES = [
    Case(
        ASYNC_APIS["grsai"],
        {"model": "gpt-image-1.5", "webHook": "-1"},
        _grsai,
        ("running", "running", "succeeded", "failed"),
    ),
    Case(
        ASYNC_APIS["gptimage15"],
        {"size": "1024*1024", "quality": "medium"},
        _gptimage15,
        ("PENDING", "IN_PROGRESS", "SUCCESS", "FAILED"),
    ),
    Case(
        ASYNC_APIS["evolink"],
        {"model": "gpt-image-1.5", "size": "1:1", "quality": "low"},
        _evolink,
        ("pending", "processing", "completed", "failed"),
    ),
    Case(
        ASYNC_APIS["apiinone"],
        {"model": "gpt-image-1-5", "aspect_ratio": "1:1", "quality": "medium"},
        _apiinone,
        ("IN_PROGRESS", "IN_PROGRESS", "completed", "failed"),
    ),
]
ASYNC_CASES = pytest.mark.parametrize("case", CASES, ids=[case.provider for case in CASES])


async def submit(http: httpx.AsyncClient, case: Case, prompt: str = "a cat") -> str:
    response = await http.post(case.api.submit_path, json={**case.body, "prompt": prompt})
    assert response.status_code == 200, response.text
    return case.api.task_id(response.json())


def assert_error_format(provider: str, response: httpx.Response, status: int) -> None:
    """The body of an error answer has the provider's documented error shape."""
    assert response.status_code == status
    body = response.json()
    if provider in ("openai", "evolink"):
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        if provider == "openai":
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] is None or isinstance(error["code"], str)
        else:
            assert isinstance(error["code"], str)
    elif provider == "grsai":
        assert body["code"] == -1 and isinstance(body["msg"], str) and body["msg"]
    elif provider == "gptimage15":
        assert body["code"] == status and body["data"] is None
        assert isinstance(body["message"], str) and body["message"]
    elif provider == "apiinone":
        error = body["error"]
        assert error["code"] == status and isinstance(error["type"], str) and error["message"]
    else:  # pragma: no cover
        raise AssertionError(provider)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- submit replies exactly as the seeds show them ------------------------------------------------


async def test_evolink_submit_reply_is_the_seed_task_object(client: httpx.AsyncClient) -> None:
    before = int(time.time())
    response = await client.post(
        "/evolink/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "sunset", "size": "1:1", "quality": "high"},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "created", "id", "model", "object", "progress", "status", "task_info", "type", "usage"
    }  # fmt: skip
    assert before <= body["created"] <= int(time.time())
    prefix, created, suffix = body["id"].rsplit("-", 2)
    assert prefix == "task-unified" and created == str(body["created"])
    assert len(suffix) == 8 and suffix.isalnum()
    assert body["model"] == "gpt-image-1.5"
    assert body["object"] == "image.generation.task"
    assert (body["progress"], body["status"], body["type"]) == (0, "pending", "image")
    # estimated_time defaults to the duration (10 s here) rounded up.
    assert body["task_info"] == {"can_cancel": True, "estimated_time": 10}
    assert body["usage"] == {
        "billing_rule": "per_call", "credits_reserved": 1.836, "user_group": "default"
    }  # fmt: skip


async def test_gptimage15_and_apiinone_submit_replies(client: httpx.AsyncClient) -> None:
    reply = (await client.post("/gptimage15/api/generate", json={"prompt": "x"})).json()
    assert reply == {
        "code": 200,
        "data": {"task_id": reply["data"]["task_id"], "status": "IN_PROGRESS"},
    }
    assert reply["data"]["task_id"].startswith("n36") and reply["data"]["task_id"].endswith(
        "gptimg"
    )

    reply = (
        await client.post(
            "/apiinone/api/v1/images/generations", json={"model": "gpt-image-1-5", "prompt": "x"}
        )
    ).json()
    task_id = reply["data"]["task_id"]
    assert reply == {
        "code": 200,
        "message": "success",
        "data": {"task_id": task_id, "status": "IN_PROGRESS"},
    }
    assert task_id.startswith("n42") and task_id.endswith("_gptimg")


async def test_grsai_poll_mode_answers_an_id_at_once(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/grsai/v1/draw/completions", json={"model": "m", "prompt": "x", "webHook": "-1"}
    )
    body = reply.json()
    assert reply.status_code == 200 and body["code"] == 0
    assert isinstance(body["data"]["id"], str) and body["data"]["id"]


# --- status progression ---------------------------------------------------------------------------


@ASYNC_CASES
async def test_status_progresses_from_queued_to_success(
    case: Case, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    task_id = await submit(client, case)
    queued, running, succeeded, _ = case.statuses

    clock.advance(1.0)  # 10 % of 10 s: still queued (queued_fraction 0.2)
    status, progress, urls, error = case.normalise((await case.status(client, task_id)).json())
    assert (status, urls, error) == (queued, [], None)
    assert progress in (0, None)

    clock.advance(4.0)  # 50 %
    status, progress, urls, error = case.normalise((await case.status(client, task_id)).json())
    assert (status, urls, error) == (running, [], None)
    assert progress in (50, None)

    clock.advance(5.0)  # done
    status, progress, urls, error = case.normalise((await case.status(client, task_id)).json())
    assert status == succeeded and error is None
    assert progress in (100, None)
    assert urls == [f"http://sandbox.test/{case.provider}/files/{task_id}/0.png"]
    image = await client.get(urls[0], headers={"Authorization": ""})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert png_size(image.content) == (64, 64)


@ASYNC_CASES
async def test_failed_task_reports_the_failure_reason(
    case: Case, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    task_id = await submit(client, case, "a cat sandbox:fail=1")
    clock.advance(5.0)
    assert case.normalise((await case.status(client, task_id)).json())[0] == case.statuses[1]
    clock.advance(5.0)
    status, _, urls, error = case.normalise((await case.status(client, task_id)).json())
    assert (status, urls, error) == (case.statuses[3], [], "Content policy violation detected")
    # No image exists for a failed task.
    missing = await client.get(f"/{case.provider}/files/{task_id}/0.png")
    assert missing.status_code == 404


async def test_provider_specific_failure_fields(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    prompt = "x sandbox:fail=1 sandbox:failure_reason=GPU%20on%20fire"
    gpt = (await client.post("/gptimage15/api/generate", json={"prompt": prompt})).json()
    evo = (await client.post("/evolink/v1/images/generations", json={"prompt": prompt})).json()
    clock.advance(10.0)

    data = (
        await client.get("/gptimage15/api/status", params={"task_id": gpt["data"]["task_id"]})
    ).json()["data"]
    assert (data["status"], data["consumed_credits"], data["response"]) == ("FAILED", 0, None)
    assert data["error_message"] == "GPU on fire"
    assert data["created_at"].endswith("Z") and data["request"]["prompt"] == prompt

    task = (await client.get(f"/evolink/v1/tasks/{evo['id']}")).json()
    assert task["error"] == {"code": "generation_failed", "message": "GPU on fire"}
    assert task["task_info"]["can_cancel"] is False and "results" not in task


async def test_success_fields_per_provider(client: httpx.AsyncClient, clock: ManualClock) -> None:
    grs = (
        await client.post(
            "/grsai/v1/draw/completions",
            json={"prompt": "x", "size": "3:2", "variants": 2, "webHook": "-1"},
        )
    ).json()["data"]["id"]
    gpt = (await client.post("/gptimage15/api/generate", json={"prompt": "x"})).json()
    evo = (
        await client.post(
            "/evolink/v1/images/generations", json={"prompt": "x", "n": 3, "size": "1024x1536"}
        )
    ).json()
    clock.advance(10.0)

    data = (await client.post("/grsai/v1/draw/result", json={"id": grs})).json()["data"]
    assert [(r["width"], r["height"]) for r in data["results"]] == [(1536, 1024)] * 2
    assert data["failure_reason"] == ""
    image = await client.get(data["results"][1]["url"])
    assert png_size(image.content) == (96, 64)  # the placeholder keeps the 3:2 shape

    data = (
        await client.get("/gptimage15/api/status", params={"task_id": gpt["data"]["task_id"]})
    ).json()["data"]
    assert data["consumed_credits"] == 10 and data["error_message"] is None

    task = (await client.get(f"/evolink/v1/tasks/{evo['id']}")).json()
    assert len(task["results"]) == 3 and "error" not in task
    assert task["usage"]["credits_reserved"] == round(1.836 * 3, 3)
    assert png_size((await client.get(task["results"][2])).content) == (64, 96)


@ASYNC_CASES
async def test_unknown_task_ids(case: Case, client: httpx.AsyncClient) -> None:
    assert_error_format(case.provider, await case.status(client, "nope"), 404)


async def test_a_task_of_one_provider_is_unknown_to_another(client: httpx.AsyncClient) -> None:
    task_id = await submit(client, CASES[2])
    assert (await client.get(f"/apiinone/api/v1/tasks/{task_id}")).status_code == 404


# --- OpenAI (synchronous) -------------------------------------------------------------------------


async def test_openai_waits_the_duration_then_answers_base64_pngs(
    client: httpx.AsyncClient, clock: ManualClock, sandbox: Sandbox
) -> None:
    start = clock.now
    response = await client.post(
        "/openai/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "a cat", "n": 2, "size": "1536x1024"},
    )
    assert response.status_code == 200
    assert clock.now - start == pytest.approx(10.0)
    body = response.json()
    assert isinstance(body["created"], int) and body["usage"]["total_tokens"] > 0
    images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    assert [png_size(image) for image in images] == [(96, 64), (96, 64)]
    assert images[0] != images[1]
    (task,) = sandbox.tasks.values()
    assert (task.provider, task.mode, task.outcome, task.n) == ("openai", "sync", "succeeded", 2)


async def test_openai_failure_is_a_content_policy_error(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/openai/v1/images/generations", json={"prompt": "a cat sandbox:fail=1"}
    )
    assert_error_format("openai", response, 400)
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation"
    assert error["message"] == "Content policy violation detected"

    other = await client.post(
        "/openai/v1/images/generations",
        json={"prompt": "x sandbox:fail=1 sandbox:failure_reason=overloaded"},
    )
    assert_error_format("openai", other, 500)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "512x512"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"n": "2"}, "n"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
    ],
)
async def test_openai_validation(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await client.post("/openai/v1/images/generations", json={"prompt": "x", **body})
    assert_error_format("openai", response, 400)
    assert response.json()["error"]["param"] == param


async def test_openai_missing_prompt_code(client: httpx.AsyncClient) -> None:
    response = await client.post("/openai/v1/images/generations", json={"model": "gpt-image-1.5"})
    assert response.json()["error"]["code"] == "missing_required_parameter"


# --- GrsAI stream ---------------------------------------------------------------------------------


def stream_events(text: str) -> list[dict[str, Any]]:
    chunks = [chunk for chunk in text.split("\n\n") if chunk]
    assert all(chunk.startswith("data: ") for chunk in chunks), text
    return [json.loads(chunk[len("data: ") :]) for chunk in chunks]


async def test_grsai_stream_reports_progress_then_the_result(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/grsai/v1/draw/completions", json={"model": "m", "prompt": "x", "size": "2:3"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = stream_events(response.text)
    progress = [event["progress"] for event in events]
    assert progress[0] == 0 and progress[-1] == 100 and progress == sorted(progress)
    assert len(events) == 10  # 0 %, 10 % (still queued, skipped as no news), 20 %..90 %, final
    # As seed 000 shows them: progress only, and no task id on any line.
    assert all(set(event) == {"progress"} for event in events[:-1])
    final = events[-1]
    assert set(final) == {"progress", "status", "url", "width", "height", "failure_reason"}
    assert (final["status"], final["width"], final["height"]) == ("succeeded", 1024, 1536)
    assert final["failure_reason"] == ""
    (task,) = (await client.get("/_sandbox/tasks")).json()
    assert final["url"] == f"http://sandbox.test/grsai/files/{task['id']}/0.png"
    assert png_size((await client.get(final["url"])).content) == (64, 96)


async def test_grsai_stream_failure(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/grsai/v1/draw/completions", json={"prompt": "x sandbox:fail=1 sandbox:duration=0"}
    )
    (final,) = stream_events(response.text)
    assert (final["progress"], final["status"]) == (100, "failed")
    assert final["failure_reason"] == "Content policy violation detected" and final["url"] == ""
    assert "id" not in final and "results" not in final


# --- validation, per provider ---------------------------------------------------------------------


SUBMIT_PATHS = {
    "openai": "/openai/v1/images/generations",
    **{name: api.submit_path for name, api in ASYNC_APIS.items()},
}
ALL_PROVIDERS = pytest.mark.parametrize("provider", list(SUBMIT_PATHS))
LONG_URL = "http://a/" + "b" * 2048
VALIDATION = [
    ("grsai", {"prompt": "x", "variants": 3}),
    ("grsai", {"prompt": "x", "size": "16:9"}),
    ("grsai", {"prompt": "x", "webHook": "not a url"}),
    ("grsai", {"prompt": "x", "urls": "http://a/b.png"}),
    ("grsai", {"size": "1:1"}),
    ("gptimage15", {"size": "1024x1024", "prompt": "x"}),
    ("gptimage15", {"quality": "auto", "prompt": "x"}),
    ("gptimage15", {"prompt": "x" * 2001}),
    ("gptimage15", {"prompt": "x", "input_fidelity": "mid"}),
    ("gptimage15", {"prompt": "x", "images": []}),
    ("evolink", {"prompt": "x", "size": "auto"}),
    ("evolink", {"prompt": "x", "quality": "auto"}),
    ("evolink", {"prompt": "x", "n": 11}),
    ("evolink", {"prompt": "x", "image_urls": []}),
    ("evolink", {"prompt": "x", "image_urls": ["http://a/i"] * 17}),
    ("evolink", {"prompt": "x", "callback_url": "ftp://a/b"}),
    ("evolink", {"prompt": "x", "callback_url": LONG_URL}),
    ("evolink", {"prompt": "word " * 2001}),
    ("evolink", {"prompt": "猫" * 2001}),  # a CJK character is a token
    ("apiinone", {"model": "m", "prompt": "x", "quality": "low"}),
    ("apiinone", {"model": "m", "prompt": "x", "aspect_ratio": "16:9"}),
    ("apiinone", {"prompt": "x"}),
    ("apiinone", {"model": "m"}),
]


@pytest.mark.parametrize(("provider", "body"), VALIDATION)
async def test_validation_errors(
    client: httpx.AsyncClient, sandbox: Sandbox, provider: str, body: dict[str, Any]
) -> None:
    response = await client.post(SUBMIT_PATHS[provider], json=body)
    assert_error_format(provider, response, 400)
    assert sandbox.tasks == {}


async def test_validation_messages_follow_the_seeds(client: httpx.AsyncClient) -> None:
    gpt = await client.post("/gptimage15/api/generate", json={"size": "1024*1024"})
    assert gpt.json() == {
        "code": 400,
        "message": "Bad Request: 'prompt' is required.",
        "data": None,
    }
    aio = await client.post(
        "/apiinone/api/v1/images/generations", json={"model": "m", "prompt": "x", "quality": "low"}
    )
    error = aio.json()["error"]
    assert (error["code"], error["message"], error["type"]) == (
        400,
        "Invalid parameters",
        "invalid_request",
    )
    assert error["param"] == "quality"


@ALL_PROVIDERS
async def test_a_body_that_is_not_a_json_object_is_a_400(
    client: httpx.AsyncClient, provider: str
) -> None:
    path = SUBMIT_PATHS[provider]
    assert_error_format(provider, await client.post(path, content=b"{not json"), 400)
    assert_error_format(provider, await client.post(path, json=["a list"]), 400)


@pytest.mark.parametrize(
    ("provider", "content"),
    [
        ("evolink", b'{"prompt": "x", "n": Infinity}'),
        ("openai", b'{"prompt": "x", "n": NaN}'),
        ("grsai", b'{"prompt": "x", "variants": 1e999}'),
        ("evolink", b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}"),
        ("evolink", b'{"prompt": "x", "image_urls": ["http://[::1/a.png"]}'),
        ("gptimage15", b'{"prompt": "x", "callback_url": "http://[oops/hook"}'),
    ],
)
async def test_values_python_chokes_on_are_a_400_not_a_crash(
    client: httpx.AsyncClient, sandbox: Sandbox, provider: str, content: bytes
) -> None:
    """Infinity, NaN, numbers past int()'s digit limit and broken IPv6 URLs once raised."""
    response = await client.post(SUBMIT_PATHS[provider], content=content)
    assert_error_format(provider, response, 400)
    assert sandbox.tasks == {}


async def test_accepted_variants(client: httpx.AsyncClient) -> None:
    """Values PROVIDERS.md lists are accepted; JSON null counts as absent."""
    image = ["https://a/b.png"]
    ok: list[tuple[str, dict[str, Any]]] = [
        ("grsai", {"size": "auto", "variants": 2, "webHook": "-1", "urls": image}),
        ("gptimage15", {"size": "1536*1024", "quality": "low", "images": image}),
        ("gptimage15", {"images": image, "input_fidelity": "low"}),
        ("evolink", {"size": "3:2", "n": 10, "image_urls": image * 16, "callback_url": None}),
        ("evolink", {"size": "1024x1024", "quality": "medium", "callback_url": "https://a/b"}),
        ("apiinone", {"model": "gpt-image-1.5-official", "aspect_ratio": "2:3", "quality": "high"}),
        ("apiinone", {"model": "gpt-image-1-5", "input_urls": image}),
        ("openai", {"size": "auto", "quality": "auto", "n": 10}),
        ("openai", {"size": "1024x1536", "quality": "low", "model": "gpt-image-1.5"}),
    ]
    for provider, body in ok:
        prompt = "x sandbox:duration=0"
        response = await client.post(SUBMIT_PATHS[provider], json={**body, "prompt": prompt})
        assert response.status_code == 200, (provider, response.text)


EVOLINK_PROMPTS = [
    ("a" * 8000, True),
    ("a" * 8001, False),
    ("a " * 2000, True),
    ("a " * 2001, False),
    ("猫" * 2000, True),
    ("猫" * 2001, False),
    ("猫a" * 1000, True),
    ("猫a" * 1001, False),
    ("一只可爱的猫咪 " * 275, True),  # 1925 + ceil(275 / 4)
    ("一只可爱的猫咪 " * 276, False),  # 1932 + 69
]


async def test_evolink_prompt_limit_agrees_with_the_adapter(client: httpx.AsyncClient) -> None:
    """One token estimate for both: the adapter never sends a prompt the sandbox refuses, and
    never refuses one the sandbox takes."""
    settings = ProviderSettings(
        name="evolink", api_key=None, base_url="http://sandbox.test/evolink", model="gpt-image-1.5"
    )
    adapter = EvoLinkAdapter(settings, client)
    for prompt, fits in EVOLINK_PROMPTS:
        try:
            adapter.validate(GenerationRequest(prompt=prompt))
        except ValidationFailed:
            taken_by_adapter = False
        else:
            taken_by_adapter = True
        response = await client.post(SUBMIT_PATHS["evolink"], json={"prompt": prompt})
        assert response.status_code in (200, 400), response.text
        taken_by_sandbox = response.status_code == 200
        assert (taken_by_adapter, taken_by_sandbox) == (fits, fits), prompt[:20]


# --- auth -----------------------------------------------------------------------------------------


ENDPOINTS = [
    ("openai", "POST", "/openai/v1/images/generations"),
    ("grsai", "POST", "/grsai/v1/draw/completions"),
    ("grsai", "POST", "/grsai/v1/draw/result"),
    ("gptimage15", "POST", "/gptimage15/api/generate"),
    ("gptimage15", "GET", "/gptimage15/api/status?task_id=x"),
    ("evolink", "POST", "/evolink/v1/images/generations"),
    ("evolink", "GET", "/evolink/v1/tasks/x"),
    ("apiinone", "POST", "/apiinone/api/v1/images/generations"),
    ("apiinone", "GET", "/apiinone/api/v1/tasks/x"),
]


@pytest.mark.parametrize(("provider", "method", "path"), ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "sandbox-key", "Basic c2I="])
async def test_a_wrong_or_missing_key_is_a_401(
    client: httpx.AsyncClient,
    sandbox: Sandbox,
    provider: str,
    method: str,
    path: str,
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization or ""}
    response = await client.request(method, path, json={"prompt": "x", "id": "x"}, headers=headers)
    assert_error_format(provider, response, 401)
    assert sandbox.tasks == {}


# --- injected errors ------------------------------------------------------------------------------


@ASYNC_CASES
@pytest.mark.parametrize("status", [429, 500, 503])
async def test_the_first_status_queries_answer_errors(
    case: Case, client: httpx.AsyncClient, sandbox: Sandbox, status: int
) -> None:
    task_id = await submit(client, case, f"x sandbox:status_errors=2 sandbox:status_error={status}")
    for _ in range(2):
        response = await case.status(client, task_id)
        assert_error_format(case.provider, response, status)
        assert response.headers.get("retry-after") == ("1" if status == 429 else None)
    assert (await case.status(client, task_id)).status_code == 200
    queries = sandbox.tasks[task_id].status_queries
    assert [query.answer for query in queries] == [status, status, 200]


@ASYNC_CASES
async def test_a_timeout_status_error_hangs_then_answers_504(
    case: Case, client: httpx.AsyncClient, clock: ManualClock, sandbox: Sandbox
) -> None:
    task_id = await submit(
        client,
        case,
        "x sandbox:status_errors=1 sandbox:status_error=timeout sandbox:timeout_seconds=7",
    )
    start = clock.now
    response = await case.status(client, task_id)
    assert clock.now - start == pytest.approx(7.0) and clock.sleeps[-1] == 7.0
    assert_error_format(case.provider, response, 504)
    assert sandbox.tasks[task_id].status_queries[0].answer == "timeout"


@ASYNC_CASES
async def test_status_latency_slows_every_answer(
    case: Case, client: httpx.AsyncClient, clock: ManualClock, sandbox: Sandbox
) -> None:
    task_id = await submit(client, case, "x sandbox:status_latency=250ms")
    start = clock.now
    response = await case.status(client, task_id)
    assert response.status_code == 200
    assert clock.now - start == pytest.approx(0.25)
    assert sandbox.tasks[task_id].status_queries[0].at == pytest.approx(start)


async def test_status_error_rate_is_repeatable_per_task(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    from service.sandbox.behaviour import rolls

    case = CASES[2]
    task_ids = [await submit(client, case, "x sandbox:status_error_rate=0.5") for _ in range(4)]
    for task_id in task_ids:
        answers = [(await case.status(client, task_id)).status_code for _ in range(8)]
        expected = [500 if rolls(0.5, task_id, "status", i) else 200 for i in range(8)]
        assert answers == expected
    always = await submit(client, case, "x sandbox:status_error_rate=1")
    assert {(await case.status(client, always)).status_code for _ in range(3)} == {500}


@ALL_PROVIDERS
@pytest.mark.parametrize("error", [400, 401, 429, 500])
async def test_submit_error_fails_the_submit(
    client: httpx.AsyncClient, sandbox: Sandbox, provider: str, error: int
) -> None:
    case = next((c for c in CASES if c.provider == provider), None)
    body = {**(case.body if case else {}), "prompt": f"x sandbox:submit_error={error}"}
    response = await client.post(SUBMIT_PATHS[provider], json=body)
    assert_error_format(provider, response, error)
    assert response.headers.get("retry-after") == ("1" if error == 429 else None)
    assert sandbox.tasks == {}


async def test_submit_timeout(client: httpx.AsyncClient, clock: ManualClock) -> None:
    start = clock.now
    response = await client.post(
        "/evolink/v1/images/generations", json={"prompt": "x sandbox:submit_error=timeout"}
    )
    assert_error_format("evolink", response, 504)
    assert clock.now - start == pytest.approx(30.0)  # the default timeout_seconds


async def test_a_gateway_timeout_makes_the_task_and_answers_504(
    client: httpx.AsyncClient, sandbox: Sandbox, clock: ManualClock
) -> None:
    """As a gateway in front of a slow provider: the task is made (and will call back), the
    submission is answered 504 after timeout_seconds."""
    start = clock.now
    response = await client.post(
        "/evolink/v1/images/generations",
        json={
            "prompt": "x sandbox:submit_error=gateway_timeout sandbox:timeout_seconds=5",
            "callback_url": "http://127.0.0.1:9/cb",
        },
    )
    assert_error_format("evolink", response, 504)
    assert clock.now - start >= 5.0  # (the task's own run moves this clock too)
    (task,) = sandbox.tasks.values()
    assert task.callback_url == "http://127.0.0.1:9/cb"


async def test_a_bad_directive_is_a_400_naming_the_knob(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    response = await client.post(
        "/evolink/v1/images/generations", json={"prompt": "x sandbox:fial=1"}
    )
    assert_error_format("evolink", response, 400)
    assert "'fial'" in response.json()["error"]["message"]
    response = await client.post("/gptimage15/api/generate", json={"prompt": "x sandbox:fail=2"})
    assert_error_format("gptimage15", response, 400)
    assert "fail" in response.json()["message"]
    assert sandbox.tasks == {}
