"""Provider adapters, I/O layer: the requests they send and how upstream failures map.

``httpx.MockTransport`` stands in for the providers (the adapters' one I/O seam is the shared
client handed to them). Bodies are the samples in ``tests/samples/``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.errors import (
    ContentPolicyViolation,
    ProviderError,
    SettingsError,
    UpstreamBadRequest,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import ADAPTER_CLASSES, build_adapters
from service.providers.base import (
    GenerationRequest,
    ProviderAdapter,
    SubmitResult,
    answered_2xx,
)
from service.settings import DEFAULT_MODELS, PROVIDERS, ProviderSettings, Secret, load_settings

SAMPLES_DIR = Path(__file__).parent / "samples"
CALLBACK = "https://relay.example/callbacks/x/signed-token"
REQUEST = GenerationRequest(prompt="a red fox in snow", size="2:3", n=1)
Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def sample(name: str) -> Any:
    return json.loads((SAMPLES_DIR / name).read_text(encoding="utf-8"))


class Upstream:
    """A fake provider: answers requests from a queue and records them."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.answers: list[Answer] = []
        self.client = httpx.AsyncClient(
            transport=httpx.MockTransport(self._handle), timeout=httpx.Timeout(5.0)
        )

    def answer(self, *answers: Answer) -> Upstream:
        self.answers.extend(answers)
        return self

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await request.aread()
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def adapter(self, provider: str, *, mode: str = "callback") -> Any:
        settings = ProviderSettings(
            name=provider,
            api_key=Secret("test-key"),
            base_url=f"https://{provider}.example/base",
            model=DEFAULT_MODELS[provider],
            mode=mode,
        )
        return ADAPTER_CLASSES[provider](settings, self.client)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = Upstream()
    yield fake
    await fake.client.aclose()


async def no_updates(update: TaskUpdate) -> None:
    raise AssertionError(f"unexpected on_update({update})")


def assert_json_request(request: httpx.Request, method: str, url: str) -> Any:
    assert request.method == method
    assert str(request.url) == url
    assert request.headers["authorization"] == "Bearer test-key"
    if method == "POST":
        assert request.headers["content-type"] == "application/json"
        return json.loads(request.content)
    assert request.content == b""
    return None


# --- submit ------------------------------------------------------------------------------------

SUBMITS = [
    # provider, path, reply sample, status after submit, task id
    ("openai", "/v1/images/generations", "openai/submit_b64.json", TaskStatus.succeeded, None),
    (
        "grsai",
        "/v1/draw/completions",
        "grsai/seed_submit_reply_id.json",
        TaskStatus.queued,
        "f1b2c3d4-grsai-task",
    ),
    (
        "gptimage15",
        "/api/generate",
        "gptimage15/seed_submit_reply.json",
        TaskStatus.running,
        "n36abc123def456gptimg",
    ),
    (
        "evolink",
        "/v1/images/generations",
        "evolink/seed_submit_reply.json",
        TaskStatus.queued,
        "task-unified-1757156493-imcg5zqt",
    ),
    (
        "apiinone",
        "/api/v1/images/generations",
        "apiinone/seed_submit_reply.json",
        TaskStatus.running,
        "n42xxxx_gptimg",
    ),
]


@pytest.mark.parametrize(("provider", "path", "reply", "status", "task_id"), SUBMITS)
@pytest.mark.parametrize("callback_url", [CALLBACK, None])
async def test_submit_sends_the_providers_request(
    upstream: Upstream,
    provider: str,
    path: str,
    reply: str,
    status: TaskStatus,
    task_id: str | None,
    callback_url: str | None,
) -> None:
    adapter = upstream.adapter(provider)
    upstream.answer(httpx.Response(200, json=sample(reply)))
    result = await adapter.submit(REQUEST, callback_url=callback_url, on_update=no_updates)

    (request,) = upstream.requests
    body = assert_json_request(request, "POST", f"https://{provider}.example/base{path}")
    assert body == adapter.build_submit(REQUEST, callback_url)
    assert body["prompt"] == REQUEST.prompt
    assert result.update.status is status
    assert result.update.provider_task_id == task_id
    # A callback comes only where the provider has one and TaskRelay gave it a URL.
    assert result.expects_callback is (provider != "openai" and callback_url is not None)
    assert result.expects_callback is (adapter.delivers_callbacks() and callback_url is not None)


async def test_openai_submit_waits_long_for_the_synchronous_result(upstream: Upstream) -> None:
    adapter = upstream.adapter("openai")
    upstream.answer(httpx.Response(200, json=sample("openai/submit_b64_two_with_size.json")))
    request = GenerationRequest(prompt="two foxes", size="3:2", quality="high", n=2)
    result = await adapter.submit(request, callback_url=CALLBACK, on_update=no_updates)
    assert json.loads(upstream.last.content) == {
        "model": "gpt-image-1.5",
        "prompt": "two foxes",
        "n": 2,
        "size": "1536x1024",
        "quality": "high",
    }
    assert upstream.last.extensions["timeout"]["read"] == 300.0
    assert result.expects_callback is False
    images = result.update.images
    assert [sorted(image) for image in images] == [["b64_json", "height", "width"]] * 2


async def test_other_providers_use_the_clients_timeout(upstream: Upstream) -> None:
    adapter = upstream.adapter("evolink")
    upstream.answer(httpx.Response(200, json=sample("evolink/seed_submit_reply.json")))
    await adapter.submit(REQUEST, callback_url=None, on_update=no_updates)
    assert upstream.last.extensions["timeout"]["read"] == 5.0


@pytest.mark.parametrize(
    ("mode", "callback_url", "webhook", "expects_callback"),
    [
        ("callback", CALLBACK, CALLBACK, True),
        ("callback", None, "-1", False),
        ("poll", CALLBACK, "-1", False),
    ],
)
async def test_grsai_submit_modes(
    upstream: Upstream, mode: str, callback_url: str | None, webhook: str, expects_callback: bool
) -> None:
    adapter = upstream.adapter("grsai", mode=mode)
    upstream.answer(httpx.Response(200, json=sample("grsai/seed_submit_reply_id.json")))
    result = await adapter.submit(REQUEST, callback_url=callback_url, on_update=no_updates)
    assert json.loads(upstream.last.content)["webHook"] == webhook
    assert result.expects_callback is expects_callback
    assert result.expects_callback is (adapter.delivers_callbacks() and callback_url is not None)
    assert result.update == TaskUpdate(
        status=TaskStatus.queued, provider_task_id="f1b2c3d4-grsai-task"
    )


# --- status queries ------------------------------------------------------------------------------

TASK_ID = "task 1/x"
QUERIES = [
    (
        "grsai",
        "POST",
        "https://grsai.example/base/v1/draw/result",
        {"id": TASK_ID},
        "grsai/status_succeeded.json",
        TaskStatus.succeeded,
    ),
    (
        "gptimage15",
        "GET",
        "https://gptimage15.example/base/api/status?task_id=task+1%2Fx",
        None,
        "gptimage15/seed_status_success.json",
        TaskStatus.succeeded,
    ),
    (
        "evolink",
        "GET",
        "https://evolink.example/base/v1/tasks/task%201%2Fx",
        None,
        "evolink/status_processing.json",
        TaskStatus.running,
    ),
    (
        "apiinone",
        "GET",
        "https://apiinone.example/base/api/v1/tasks/task%201%2Fx",
        None,
        "apiinone/status_failed.json",
        TaskStatus.failed,
    ),
]


@pytest.mark.parametrize(("provider", "method", "url", "body", "reply", "status"), QUERIES)
async def test_query_status_asks_the_provider(
    upstream: Upstream,
    provider: str,
    method: str,
    url: str,
    body: Any,
    reply: str,
    status: TaskStatus,
) -> None:
    adapter = upstream.adapter(provider)
    upstream.answer(httpx.Response(200, json=sample(reply)))
    update = await adapter.query_status(TASK_ID)
    assert assert_json_request(upstream.last, method, url) == body
    assert update == adapter.parse_status(200, sample(reply))
    assert update.status is status


async def test_openai_has_no_status_endpoint(upstream: Upstream) -> None:
    adapter = upstream.adapter("openai")
    assert adapter.can_query_status is False
    with pytest.raises(UpstreamNotFound, match="no status endpoint") as caught:
        await adapter.query_status("anything")
    assert isinstance(caught.value, ProviderError) and not caught.value.retryable
    assert upstream.requests == []


# --- upstream failures ---------------------------------------------------------------------------


def error_body(provider: str, status: int) -> dict[str, Any]:
    if provider == "gptimage15":
        return {"code": status, "message": "boom from upstream", "data": None}
    if provider == "grsai":
        return {"code": -1, "msg": "boom from upstream", "data": None}
    return {"error": {"message": "boom from upstream", "type": "x", "code": None}}


def answered(status: int, **response: Any) -> Callable[[str], Answer]:
    """The provider answers HTTP ``status``, with an error body in its shape unless given one."""

    def answer(provider: str) -> Answer:
        has_body = {"json", "text", "stream"} & set(response)
        body = {} if has_body else {"json": error_body(provider, status)}
        return httpx.Response(status, **body, **response)

    return answer


# case, answer, error, what its message says, ambiguous: whether the provider may have acted on
# a request it gave no usable answer to (so sending it again could start a second task).
FAILURES: list[tuple[str, Callable[[str], Answer], type[ProviderError], str, bool]] = [
    ("400", answered(400), UpstreamBadRequest, "answered HTTP 400: boom from upstream", False),
    ("401", answered(401), UpstreamUnauthorized, "answered HTTP 401: boom from upstream", False),
    ("404", answered(404), UpstreamNotFound, "answered HTTP 404: boom from upstream", False),
    (
        "429",
        answered(429, headers={"Retry-After": "7"}),
        UpstreamRateLimited,
        "answered HTTP 429: boom from upstream",
        False,
    ),
    ("500", answered(500), UpstreamUnavailable, "answered HTTP 500: boom from upstream", False),
    (
        "502-html",
        answered(502, text="<html>Bad Gateway</html>"),
        UpstreamUnavailable,
        "answered HTTP 502",
        False,
    ),
    (
        "timeout",
        lambda p: httpx.ReadTimeout("read timed out"),
        UpstreamUnavailable,
        "timed out",
        True,
    ),
    (
        "connect",
        lambda p: httpx.ConnectError("connection refused"),
        UpstreamUnavailable,
        "could not be reached",
        False,
    ),
    ("not-json", answered(200, text="<html>ok</html>"), UpstreamProtocolError, "not JSON", True),
    ("wrong-shape", answered(200, json=[1, 2]), UpstreamProtocolError, "a JSON object", True),
    (
        "undecodable",
        answered(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")),
        UpstreamProtocolError,
        "cannot be decoded",
        True,
    ),
    (
        "moderation",
        answered(
            400, json={"error": {"message": "Rejected by moderation", "code": "moderation_blocked"}}
        ),
        ContentPolicyViolation,
        "Rejected by moderation",
        False,
    ),
]
RETRYABLE = {UpstreamRateLimited, UpstreamUnavailable, UpstreamProtocolError}


async def run_operation(upstream: Upstream, provider: str, operation: str) -> None:
    if operation == "submit":
        adapter = upstream.adapter(provider)
        await adapter.submit(REQUEST, callback_url=CALLBACK, on_update=no_updates)
    else:
        adapter = upstream.adapter(provider, mode="poll")
        await adapter.query_status("t-1")


OPERATIONS = [(p, "submit") for p in PROVIDERS] + [(p, "query") for p in PROVIDERS if p != "openai"]


@pytest.mark.parametrize(("provider", "operation"), OPERATIONS)
@pytest.mark.parametrize(
    ("case", "answer", "error", "says", "ambiguous"), FAILURES, ids=[case[0] for case in FAILURES]
)
async def test_upstream_failures_map_to_the_most_specific_error(
    upstream: Upstream,
    provider: str,
    operation: str,
    case: str,
    answer: Callable[[str], Answer],
    error: type[ProviderError],
    says: str,
    ambiguous: bool,
) -> None:
    upstream.answer(answer(provider))
    with pytest.raises(ProviderError) as caught:
        await run_operation(upstream, provider, operation)
    assert type(caught.value) is error
    assert caught.value.provider == provider
    assert says in caught.value.message
    assert caught.value.retryable is (error in RETRYABLE)
    assert caught.value.ambiguous is ambiguous
    assert len(upstream.requests) == 1  # one attempt: the caller owns retries
    if case == "429":
        assert caught.value.retry_after == 7.0
    if case.isdigit():
        assert caught.value.upstream_status == int(case)


@pytest.mark.parametrize(
    ("provider", "body", "error"),
    [
        ("gptimage15", {"code": 401, "message": "bad key", "data": None}, UpstreamUnauthorized),
        ("gptimage15", {"code": 500, "message": "retry", "data": None}, UpstreamUnavailable),
        ("grsai", {"code": -1, "msg": "bad key"}, UpstreamBadRequest),
        ("apiinone", {"error": {"code": 404, "message": "no task"}}, UpstreamNotFound),
    ],
)
async def test_error_codes_inside_a_200_reply(
    upstream: Upstream, provider: str, body: Any, error: type[ProviderError]
) -> None:
    upstream.answer(httpx.Response(200, json=body), httpx.Response(200, json=body))
    for operation in ("submit", "query"):
        with pytest.raises(error):
            await run_operation(upstream, provider, operation)


# --- GrsAI stream mode ---------------------------------------------------------------------------


def chunked(text: str, size: int = 7) -> AsyncIterator[bytes]:
    """The stream in small pieces that cut lines (and multi-byte characters) apart."""
    data = text.encode("utf-8")

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    return pieces()


def stream_text(name: str) -> str:
    return (SAMPLES_DIR / name).read_text(encoding="utf-8")


class Updates:
    def __init__(self) -> None:
        self.seen: list[TaskUpdate] = []

    async def __call__(self, update: TaskUpdate) -> None:
        self.seen.append(update)


async def submit_streamed(
    upstream: Upstream,
    updates: Updates,
    content: AsyncIterator[bytes],
    *,
    request: GenerationRequest = REQUEST,
    callback_url: str | None = None,
    **response: Any,
) -> SubmitResult:
    """A stream mode GrsAI submission, answered with ``content``; progress goes to ``updates``."""
    upstream.answer(httpx.Response(200, content=content, **response))
    adapter = upstream.adapter("grsai", mode="stream")
    return await adapter.submit(request, callback_url=callback_url, on_update=updates)


async def test_grsai_stream_reports_progress_and_returns_the_result(upstream: Upstream) -> None:
    updates = Updates()
    result = await submit_streamed(
        upstream,
        updates,
        chunked(stream_text("grsai/seed_stream_succeeded.txt")),
        request=GenerationRequest(
            prompt="猫", size="1:1", n=2, image_urls=("https://e.com/a.png",)
        ),
        callback_url=CALLBACK,
        headers={"Content-Type": "text/event-stream"},
    )

    body = assert_json_request(
        upstream.last, "POST", "https://grsai.example/base/v1/draw/completions"
    )
    assert body == {
        "model": "gpt-image-1.5",
        "prompt": "猫",
        "variants": 2,
        "size": "1:1",
        "urls": ["https://e.com/a.png"],
    }  # no webHook: that is what asks for a stream
    assert "text/event-stream" in upstream.last.headers["accept"]
    assert upstream.last.extensions["timeout"]["read"] == 120.0
    assert updates.seen == [TaskUpdate(status=TaskStatus.running, progress=p) for p in (0, 35, 80)]
    assert result.expects_callback is False
    assert result.update == TaskUpdate(
        status=TaskStatus.succeeded,
        progress=100,
        images=({"url": "https://file.grsai.example/stream-1.png", "width": 1024, "height": 1024},),
        raw_status="succeeded",
    )


async def test_grsai_stream_failure_is_a_failed_result(upstream: Upstream) -> None:
    updates = Updates()
    content = chunked(stream_text("grsai/seed_stream_failed.txt"), 3)
    result = await submit_streamed(upstream, updates, content)
    assert [u.progress for u in updates.seen] == [0, 40]
    assert result.update.status is TaskStatus.failed
    assert result.update.error == {
        "code": "content_policy_violation",
        "message": "output_moderation",
    }
    assert result.update.images == ()


async def test_grsai_stream_with_noise_keeps_the_task_id(upstream: Upstream) -> None:
    updates = Updates()
    content = chunked(stream_text("grsai/stream_sse_noise.txt"), 11)
    result = await submit_streamed(upstream, updates, content)
    assert [(u.progress, u.provider_task_id) for u in updates.seen] == [
        (10, "f1b2c3d4-grsai-task"),
        (60, "f1b2c3d4-grsai-task"),
    ]
    assert result.update.status is TaskStatus.succeeded
    assert result.update.provider_task_id == "f1b2c3d4-grsai-task"


async def test_grsai_stream_without_a_final_line_is_a_protocol_error(upstream: Upstream) -> None:
    updates = Updates()
    unfinished = chunked(stream_text("grsai/stream_unfinished.txt"))
    with pytest.raises(UpstreamProtocolError, match="ended without a final line") as caught:
        await submit_streamed(upstream, updates, unfinished)
    assert [u.progress for u in updates.seen] == [10, 50]
    assert caught.value.ambiguous


@pytest.mark.parametrize(
    ("answer", "error", "says"),
    [
        (
            httpx.Response(200, content=stream_text("grsai/stream_error_body.txt").encode()),
            UpstreamBadRequest,
            "insufficient credits",
        ),
        (
            httpx.Response(200, json={"code": -1, "msg": "apikey error"}),
            UpstreamBadRequest,
            "apikey error",
        ),
        (
            httpx.Response(503, json={"code": 503, "msg": "busy"}, headers={"Retry-After": "3"}),
            UpstreamUnavailable,
            "answered HTTP 503: busy",
        ),
        (httpx.Response(401, text="unauthorized"), UpstreamUnauthorized, "answered HTTP 401"),
        (httpx.ConnectError("refused"), UpstreamUnavailable, "could not be reached"),
    ],
)
async def test_grsai_stream_errors(
    upstream: Upstream, answer: Answer, error: type[ProviderError], says: str
) -> None:
    adapter = upstream.adapter("grsai", mode="stream")
    upstream.answer(answer)
    with pytest.raises(error) as caught:
        await adapter.submit(REQUEST, callback_url=None, on_update=no_updates)
    assert says in caught.value.message
    assert not caught.value.ambiguous  # each is an answer that says no, or a failure to connect


async def test_grsai_stream_cut_off_midway_is_unavailable(upstream: Upstream) -> None:
    async def cut_off() -> AsyncIterator[bytes]:
        yield b'data: {"progress": 20}\n\n'
        raise httpx.ReadTimeout("no more lines")

    updates = Updates()
    with pytest.raises(UpstreamUnavailable, match="answered HTTP 200, then timed out") as caught:
        await submit_streamed(upstream, updates, cut_off())
    assert [u.progress for u in updates.seen] == [20]
    assert caught.value.ambiguous
    assert caught.value.upstream_status == 200  # GrsAI had taken the task
    assert answered_2xx(caught.value)


async def test_grsai_stream_without_a_final_line_says_it_was_answered_2xx(
    upstream: Upstream,
) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        await submit_streamed(upstream, Updates(), chunked("data: {}\n\n"))
    assert caught.value.upstream_status == 200 and answered_2xx(caught.value)


# --- a 2xx answer TaskRelay cannot use ------------------------------------------------------------


class BrokenBody(httpx.AsyncByteStream):
    """A body that breaks off after its first bytes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"created": 1, "data": [{"b64_'
        raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize(
    ("answer", "error", "status"),
    [
        # After a 2xx: the provider has carried out the request (OpenAI made the image).
        pytest.param(
            lambda: httpx.Response(200, stream=BrokenBody()), UpstreamUnavailable, 200, id="cut"
        ),
        pytest.param(
            lambda: httpx.Response(200, json={"data": [{"revised_prompt": "x"}]}),
            None,
            200,
            id="wrong-shape",
        ),
        pytest.param(lambda: httpx.Response(200, text="<html>ok</html>"), None, 200, id="not-json"),
        # Before any answer, or an error status: nothing says the work was done.
        pytest.param(
            lambda: httpx.ReadTimeout("no answer"), UpstreamUnavailable, None, id="no-answer"
        ),
        pytest.param(
            lambda: httpx.Response(500, json={"error": {"message": "x"}}),
            UpstreamUnavailable,
            500,
            id="500",
        ),
    ],
)
async def test_errors_after_a_2xx_name_that_status(
    upstream: Upstream,
    answer: Callable[[], Answer],
    error: type[ProviderError] | None,
    status: int | None,
) -> None:
    upstream.answer(answer())
    adapter = upstream.adapter("openai")
    with pytest.raises(error or UpstreamProtocolError) as caught:
        await adapter.submit(REQUEST, callback_url=None, on_update=no_updates)
    assert caught.value.upstream_status == status
    assert answered_2xx(caught.value) is (status == 200)


async def test_a_2xx_that_refuses_in_its_body_is_no_unusable_answer(upstream: Upstream) -> None:
    """An error code in a 2xx body is the provider saying no, not an answer it acted on."""
    upstream.answer(httpx.Response(200, json={"code": -1, "msg": "apikey error"}))
    adapter = upstream.adapter("grsai", mode="poll")
    with pytest.raises(UpstreamBadRequest) as caught:
        await adapter.submit(REQUEST, callback_url=None, on_update=no_updates)
    assert not answered_2xx(caught.value)


# --- the registry --------------------------------------------------------------------------------


async def test_build_adapters_makes_one_per_provider(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path),
            "TASKRELAY_SECRET_KEY": "0123456789abcdef0123456789abcdef",
            "TASKRELAY_GRSAI_MODE": "poll",
            "TASKRELAY_EVOLINK_BASE_URL": "https://evolink.internal",
        },
        env_file=tmp_path / "missing.env",
    )
    http = httpx.AsyncClient()
    adapters = build_adapters(settings, http)
    assert list(adapters) == list(settings.providers)
    for name, adapter in adapters.items():
        assert isinstance(adapter, ProviderAdapter)
        assert type(adapter) is ADAPTER_CLASSES[name]
        assert adapter.http is http
        assert adapter.settings is settings.providers[name]
    assert adapters["grsai"].settings.mode == "poll"
    assert adapters["evolink"].url("/v1/tasks/t") == "https://evolink.internal/v1/tasks/t"

    odd = replace(
        settings,
        providers={
            **settings.providers,
            "acme": replace(settings.providers["openai"], name="acme"),
        },
    )
    with pytest.raises(SettingsError, match="acme"):
        build_adapters(odd, http)
    await http.aclose()
