"""Provider adapters, pure layer: validation, request mapping, reply/status/callback parsing.

No network here (the I/O methods are in ``test_providers_io.py``). Bodies come from
``tests/samples/<provider>/``:

- ``seed_*``: the example bodies of the source documents in ``/work/shared/seeds``, verbatim.
  Two exceptions, where the document shows no literal body: gptimage15's failed status elides
  its echoed request as ``{ ... }`` (stored as ``{}``), and GrsAI's seed shows only code that
  reads its replies, so ``grsai/seed_*`` carry exactly the fields that code reads, with made-up
  ids and URLs.
- everything else: constructed from the shapes in PROVIDERS.md (not recorded live traffic).

Every sample file has exactly one expectation in :data:`SAMPLES` or :data:`REQUEST_SAMPLES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest

from service.errors import (
    CallbackParseError,
    ContentPolicyViolation,
    ProviderError,
    UpstreamBadRequest,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    ValidationFailed,
)
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import ADAPTER_CLASSES, base, evolink, parsing
from service.providers.base import GenerationRequest, ProviderAdapter
from service.settings import DEFAULT_MODELS, PROVIDERS, ProviderSettings, Secret
from service.signing import CallbackSigner

SAMPLES_DIR = Path(__file__).parent / "samples"
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)
ASYNC_PROVIDERS = ("grsai", "gptimage15", "evolink", "apiinone")


def _no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the pure layer sent a request: {request.method} {request.url}")


# One client for every adapter here; any request through it fails the test.
NO_NETWORK = httpx.AsyncClient(transport=httpx.MockTransport(_no_network))


def make_adapter(provider: str, *, mode: str = "callback", model: str | None = None) -> Any:
    settings = ProviderSettings(
        name=provider,
        api_key=Secret("test-key"),
        base_url=f"https://{provider}.example",
        model=model or DEFAULT_MODELS[provider],
        mode=mode,
    )
    return ADAPTER_CLASSES[provider](settings, NO_NETWORK)


def load(name: str) -> Any:
    path = SAMPLES_DIR / name
    text = path.read_text(encoding="utf-8")
    return text if path.suffix == ".txt" else json.loads(text)


def raw(name: str) -> bytes:
    return (SAMPLES_DIR / name).read_bytes()


# --- every sample file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What one sample must parse to (or raise).

    kind: ``submit`` (a submit reply), ``status`` (a status answer; also fed to parse_callback,
    wrapped and bare), ``callback``, ``stream`` (GrsAI stream text), ``error`` (an error body,
    fed with HTTP ``http`` to parse_submit_reply and parse_status; with ``body_code`` also
    with HTTP 200, since these providers put the code in the body).
    """

    kind: str
    status: TaskStatus | None = None
    raw: str | None = None
    task_id: str | None = None
    images: tuple[dict[str, Any], ...] = ()
    error_code: str | None = None
    message: str | None = None
    progress: int | None = None
    estimated: float | None = None
    http: int = 200
    raises: type[ProviderError] | None = None
    body_code: bool = False


def url(*urls: str) -> tuple[dict[str, Any], ...]:
    return tuple({"url": item} for item in urls)


def sized(image_url: str, width: int, height: int) -> dict[str, Any]:
    return {"url": image_url, "width": width, "height": height}


OAI_URL = "https://oaidalleapiprodscus.blob.core.windows.net/private/img-1.png"
GRSAI_ID = "f1b2c3d4-grsai-task"
GRSAI_IMG = sized("https://file.grsai.example/result-1.png", 1024, 1536)
GRSAI_IMG2 = sized("https://file.grsai.example/result-2.png", 1024, 1536)
GRSAI_STREAM_IMG = sized("https://file.grsai.example/stream-1.png", 1024, 1024)
GPT_ID = "n36abc123def456gptimg"
GPT_IMG = url("https://cdn.example.com/image.png")
GPT_POLICY = "Content policy violation detected"
EVO_ID = "task-unified-1757156493-imcg5zqt"
EVO_A = "https://files.evolink.example/images/a.png"
EVO_B = "https://files.evolink.example/images/b.png"
AIO_ID = "n42xxxx_gptimg"
AIO_IMG = url("https://cdn.apiin.one/outputs/n42xxxx_gptimg/0.png")
S = TaskStatus
POLICY = "content_policy_violation"
FAILED = "provider_failed"
NO_REASON = "without giving a reason"


def task_of(task_id: str | None, **shared: Any) -> Callable[..., Expect]:
    """Expectations for one provider's task samples, which share their task id (and more)."""

    def expect(kind: str, status: TaskStatus, raw: str | None = None, **fields: Any) -> Expect:
        return Expect(kind, status, raw, task_id, **shared, **fields)

    return expect


def bare_and_wrapped(name: str, expect: Expect) -> dict[str, Expect]:
    """One callback sample bare and one in its provider's envelope: the same expectation."""
    return {name.format(shape): expect for shape in ("bare", "wrapped")}


def refused(
    http: int, raises: type[ProviderError], message: str, *, body_code: bool = False
) -> Expect:
    return Expect("error", http=http, raises=raises, message=message, body_code=body_code)


# One builder per provider: OpenAI's results are complete, GrsAI's seeds carry no task id,
# EvoLink's objects all carry the seed's id and estimated_time.
oai = task_of(None, progress=100)
grs_seed = task_of(None)
grs = task_of(GRSAI_ID)
gpt = task_of(GPT_ID)
evo = task_of(EVO_ID, estimated=100.0)
aio = task_of(AIO_ID)

SAMPLES: dict[str, Expect] = {
    "openai/submit_b64.json": oai("submit", S.succeeded, images=({"b64_json": PNG},)),
    "openai/submit_b64_two_with_size.json": oai(
        "submit", S.succeeded, images=({"b64_json": PNG, "width": 1536, "height": 1024},) * 2
    ),
    "openai/submit_url.json": oai("submit", S.succeeded, images=url(OAI_URL)),
    "openai/error_400_invalid_size.json": refused(
        400, UpstreamBadRequest, "Invalid value: '1024x1792'"
    ),
    "openai/error_400_moderation.json": refused(
        400, ContentPolicyViolation, "rejected by the safety system"
    ),
    "openai/error_401.json": refused(401, UpstreamUnauthorized, "Incorrect API key"),
    "openai/error_429.json": refused(429, UpstreamRateLimited, "Rate limit reached"),
    "openai/error_500.json": refused(500, UpstreamUnavailable, "The server had an error"),
    "grsai/seed_submit_reply_id.json": Expect("submit", S.queued, task_id=GRSAI_ID),
    "grsai/seed_result_running.json": grs_seed("status", S.running, "running"),
    "grsai/seed_result_succeeded.json": grs_seed(
        "status", S.succeeded, "succeeded", images=url(GRSAI_IMG["url"])
    ),
    "grsai/seed_stream_succeeded.txt": grs_seed(
        "stream", S.succeeded, "succeeded", progress=100, images=(GRSAI_STREAM_IMG,)
    ),
    "grsai/seed_stream_failed.txt": grs_seed(
        "stream", S.failed, "failed", progress=100, error_code=POLICY, message="output_moderation"
    ),
    "grsai/status_running.json": grs("status", S.running, "running", progress=45),
    "grsai/status_succeeded.json": grs(
        "status", S.succeeded, "succeeded", progress=100, images=(GRSAI_IMG, GRSAI_IMG2)
    ),
    "grsai/status_failed_moderation.json": grs(
        "status", S.failed, "failed", progress=100, error_code=POLICY, message="input_moderation"
    ),
    "grsai/status_failed_no_reason.json": grs(
        "status", S.failed, "failed", progress=100, error_code=FAILED, message=NO_REASON
    ),
    "grsai/status_cancelled.json": grs("status", S.canceled, "cancelled", progress=10),
    "grsai/status_unknown_word.json": grs("status", S.running, "queuing", progress=0),
    "grsai/error_code_nonzero.json": refused(
        400, UpstreamBadRequest, "apikey error", body_code=True
    ),
    **bare_and_wrapped(
        "grsai/callback_{}_succeeded.json",
        grs("callback", S.succeeded, "succeeded", progress=100, images=(GRSAI_IMG,)),
    ),
    "grsai/callback_bare_failed.json": grs(
        "callback", S.failed, "failed", progress=100, error_code=POLICY, message="output_moderation"
    ),
    "grsai/callback_stream_shape.json": grs(
        "callback", S.succeeded, "succeeded", progress=100, images=(GRSAI_STREAM_IMG,)
    ),
    "grsai/stream_sse_noise.txt": grs(
        "stream",
        S.succeeded,
        "succeeded",
        progress=100,
        images=(sized("https://file.grsai.example/stream-2.png", 1536, 1024),),
    ),
    "grsai/stream_unfinished.txt": Expect(
        "stream", raises=UpstreamProtocolError, message="ended without a final line"
    ),
    "grsai/stream_error_body.txt": Expect(
        "stream", raises=UpstreamBadRequest, message="insufficient credits"
    ),
    "gptimage15/seed_submit_reply.json": gpt("submit", S.running, "IN_PROGRESS"),
    "gptimage15/seed_error_400.json": refused(
        400, UpstreamBadRequest, "Bad Request: 'prompt' is required.", body_code=True
    ),
    "gptimage15/seed_status_in_progress.json": gpt("status", S.running, "IN_PROGRESS"),
    "gptimage15/seed_status_success.json": gpt("status", S.succeeded, "SUCCESS", images=GPT_IMG),
    "gptimage15/seed_status_failed.json": gpt(
        "status", S.failed, "FAILED", error_code=POLICY, message=GPT_POLICY
    ),
    "gptimage15/status_pending.json": gpt("status", S.queued, "PENDING"),
    "gptimage15/status_cancelled.json": gpt("status", S.canceled, "CANCELLED"),
    "gptimage15/status_failed_no_reason.json": gpt(
        "status", S.failed, "FAILED", error_code=FAILED, message=NO_REASON
    ),
    **bare_and_wrapped(
        "gptimage15/callback_{}_success.json",
        gpt("callback", S.succeeded, "SUCCESS", images=GPT_IMG),
    ),
    "gptimage15/callback_bare_failed.json": gpt(
        "callback", S.failed, "FAILED", error_code=POLICY, message=GPT_POLICY
    ),
    "gptimage15/error_401.json": refused(
        401, UpstreamUnauthorized, "invalid or missing API key", body_code=True
    ),
    "gptimage15/error_404.json": refused(404, UpstreamNotFound, "Task not found", body_code=True),
    "gptimage15/error_500.json": refused(
        500, UpstreamUnavailable, "Internal server error", body_code=True
    ),
    "evolink/seed_submit_reply.json": evo("submit", S.queued, "pending", progress=0),
    "evolink/status_pending.json": evo("status", S.queued, "pending", progress=0),
    "evolink/status_processing.json": evo("status", S.running, "processing", progress=40),
    "evolink/status_completed.json": evo(
        "status", S.succeeded, "completed", progress=100, images=url(EVO_A, EVO_B)
    ),
    "evolink/status_completed_objects.json": evo(
        "status", S.succeeded, "completed", progress=100, images=(sized(EVO_A, 1024, 1024),)
    ),
    "evolink/status_failed_policy.json": evo(
        "status",
        S.failed,
        "failed",
        progress=0,
        error_code=POLICY,
        message="The prompt was rejected by the moderation system.",
    ),
    "evolink/status_failed_string.json": evo(
        "status",
        S.failed,
        "failed",
        progress=30,
        error_code=FAILED,
        message="Generation timed out upstream",
    ),
    "evolink/status_cancelled.json": evo("status", S.canceled, "cancelled", progress=10),
    "evolink/status_unknown_word.json": evo("status", S.running, "warming_up", progress=5),
    "evolink/callback_completed.json": evo(
        "callback", S.succeeded, "completed", progress=100, images=url(EVO_A)
    ),
    "evolink/callback_wrapped_completed.json": evo(
        "callback", S.succeeded, "completed", progress=100, images=url(EVO_A)
    ),
    "evolink/callback_failed.json": evo(
        "callback",
        S.failed,
        "failed",
        progress=0,
        error_code=FAILED,
        message="Image generation failed",
    ),
    "evolink/error_400.json": refused(400, UpstreamBadRequest, "Invalid size"),
    "evolink/error_401.json": refused(401, UpstreamUnauthorized, "Invalid API key"),
    "evolink/error_404.json": refused(404, UpstreamNotFound, "Task not found"),
    "evolink/error_429.json": refused(429, UpstreamRateLimited, "Too many requests"),
    "apiinone/seed_submit_reply.json": aio("submit", S.running, "IN_PROGRESS"),
    "apiinone/seed_error.json": refused(
        400, UpstreamBadRequest, "Invalid parameters", body_code=True
    ),
    "apiinone/status_in_progress.json": aio("status", S.running, "IN_PROGRESS"),
    # The same image wherever an (undocumented) status body may keep it, the word in any case.
    **{
        f"apiinone/status_completed_{where}.json": aio("status", S.succeeded, raw, images=AIO_IMG)
        for where, raw in [
            ("results", "completed"),
            ("result_urls", "COMPLETED"),
            ("output_nested", "completed"),
            ("urls", "Completed"),
            ("response", "completed"),
        ]
    },
    "apiinone/status_completed_images_objects.json": aio(
        "status", S.succeeded, "completed", images=(sized(AIO_IMG[0]["url"], 1024, 1024),)
    ),
    "apiinone/status_failed.json": aio(
        "status",
        S.failed,
        "failed",
        error_code=POLICY,
        message="Content policy violation: the prompt was flagged",
    ),
    "apiinone/status_failed_error_object.json": aio(
        "status", S.failed, "FAILED", error_code=FAILED, message="Upstream generation error"
    ),
    "apiinone/status_cancelled.json": aio("status", S.canceled, "canceled"),
    **bare_and_wrapped(
        "apiinone/callback_{}_completed.json",
        aio("callback", S.succeeded, "completed", images=AIO_IMG),
    ),
    "apiinone/error_401.json": refused(
        401, UpstreamUnauthorized, "Invalid API key", body_code=True
    ),
    "apiinone/error_402.json": refused(
        402, UpstreamBadRequest, "Insufficient credits", body_code=True
    ),
    "apiinone/error_404.json": refused(404, UpstreamNotFound, "Task not found", body_code=True),
}

# Request bodies from the seeds, checked against build_submit in the seed tests below.
REQUEST_SAMPLES = {
    "gptimage15/seed_submit_request_text.json",
    "gptimage15/seed_submit_request_edit.json",
    "evolink/seed_request.json",
    "apiinone/seed_request.json",
    "grsai/seed_submit_request_stream.json",
    "grsai/seed_submit_request_webhook.json",
}


def test_every_sample_file_has_one_expectation() -> None:
    on_disk = {
        path.relative_to(SAMPLES_DIR).as_posix()
        for path in SAMPLES_DIR.rglob("*")
        if path.is_file()
    }
    assert on_disk == set(SAMPLES) | REQUEST_SAMPLES
    assert not set(SAMPLES) & REQUEST_SAMPLES
    assert {name.split("/")[0] for name in on_disk} == set(PROVIDERS)


def check(update: TaskUpdate, expect: Expect) -> None:
    assert update.status is expect.status
    assert update.raw_status == expect.raw
    assert update.provider_task_id == expect.task_id
    assert update.images == expect.images
    assert update.progress == expect.progress
    assert update.estimated_seconds == expect.estimated
    if expect.error_code is None:
        assert update.error is None
    else:
        assert update.error is not None
        assert update.error["code"] == expect.error_code
        assert expect.message is not None and expect.message in update.error["message"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample(name: str) -> None:
    provider = name.split("/")[0]
    expect = SAMPLES[name]
    body = load(name)
    if expect.kind == "stream":
        adapter = make_adapter(provider, mode="stream")
        if expect.raises is not None:
            with pytest.raises(expect.raises) as caught:
                adapter.parse_submit_reply(200, body)
            assert expect.message is not None and expect.message in caught.value.message
            assert caught.value.provider == provider
            return
        result = adapter.parse_submit_reply(200, body)
        assert result.expects_callback is False
        check(result.update, expect)
        return
    adapter = make_adapter(provider)
    if expect.kind == "submit":
        check(adapter.parse_submit_reply(200, body).update, expect)
    elif expect.kind == "status":
        check(adapter.parse_status(200, body), expect)
        # A callback carries the status query's object, wrapped or bare (PROVIDERS.md).
        check(adapter.parse_callback(raw(name), {}), expect)
        if parsing.is_envelope(body):
            bare = json.dumps(body["data"]).encode()
            check(adapter.parse_callback(bare, {}), expect)
            # An envelope with a status of its own (the request's, not the task's): an
            # extra field, never an error (PROVIDERS.md).
            if isinstance(body["data"], dict) and "status" in body["data"]:
                extra = {**body, "status": "success"}
                check(adapter.parse_status(200, extra), expect)
                check(adapter.parse_callback(json.dumps(extra).encode(), {}), expect)
    elif expect.kind == "callback":
        check(adapter.parse_callback(raw(name), {}), expect)
    elif expect.kind == "error":
        assert expect.raises is not None and expect.message is not None
        statuses = [expect.http, 200] if expect.body_code else [expect.http]
        for http in statuses:
            for parse in (adapter.parse_submit_reply, adapter.parse_status):
                with pytest.raises(expect.raises) as caught:
                    parse(http, body)
                assert expect.message in caught.value.message
                assert caught.value.provider == provider
                if http == 200:  # the code came in the body
                    code = parsing.int_of(body.get("code", body.get("error", {}).get("code")))
                    assert code is not None
                    assert caught.value.details == {"provider_code": code}
                    assert caught.value.upstream_status == (code if code >= 400 else None)
                else:
                    assert caught.value.upstream_status == expect.http
    else:  # pragma: no cover - a typo in SAMPLES
        raise AssertionError(expect.kind)


# --- normalising a request (PROVIDERS.md table 1) ----------------------------------------------

RATIOS = ["1:1", "2:3", "3:2"]
# Per provider: the field that takes the size, then its values for each of RATIOS.
SIZE_ROWS = {
    "openai": ("size", "1024x1024", "1024x1536", "1536x1024"),
    "grsai": ("size", "1:1", "2:3", "3:2"),
    "gptimage15": ("size", "1024*1024", "1024*1536", "1536*1024"),
    "evolink": ("size", "1:1", "2:3", "3:2"),
    "apiinone": ("aspect_ratio", "1:1", "2:3", "3:2"),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", RATIOS)
def test_size_row(provider: str, size: str) -> None:
    adapter = make_adapter(provider)
    request = GenerationRequest(prompt="a cat", size=size)
    adapter.validate(request)
    field, *values = SIZE_ROWS[provider]
    body = adapter.build_submit(request, None)
    assert body[field] == values[RATIOS.index(size)]
    assert ("size" in body) is (field == "size")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_size_means_the_providers_default(provider: str) -> None:
    body = make_adapter(provider).build_submit(GenerationRequest(prompt="a cat"), None)
    assert "size" not in body and "aspect_ratio" not in body


@pytest.mark.parametrize("provider", ["openai", "grsai"])
def test_size_auto_where_accepted(provider: str) -> None:
    adapter = make_adapter(provider)
    request = GenerationRequest(prompt="a cat", size="auto")
    adapter.validate(request)
    assert adapter.build_submit(request, None)["size"] == "auto"


QUALITY_ROWS = {
    "openai": ("low", "medium", "high", "auto"),
    "grsai": (),
    "gptimage15": ("low", "medium", "high"),
    "evolink": ("low", "medium", "high"),
    "apiinone": ("medium", "high"),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("quality", ["low", "medium", "high", "auto"])
def test_quality_row(provider: str, quality: str) -> None:
    adapter = make_adapter(provider)
    request = GenerationRequest(prompt="a cat", quality=quality)
    if quality in QUALITY_ROWS[provider]:
        adapter.validate(request)
        assert adapter.build_submit(request, None)["quality"] == quality
    else:
        with pytest.raises(ValidationFailed) as caught:
            adapter.validate(request)
        assert_rejection(caught.value, provider, "quality", list(QUALITY_ROWS[provider]))


N_ROWS = {"openai": 10, "grsai": 2, "gptimage15": 1, "evolink": 10, "apiinone": 1}
N_FIELD = {"openai": "n", "grsai": "variants", "evolink": "n"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_n_row(provider: str) -> None:
    adapter = make_adapter(provider)
    top = N_ROWS[provider]
    for n in (1, top):
        request = GenerationRequest(prompt="a cat", n=n)
        adapter.validate(request)
        body = adapter.build_submit(request, None)
        if provider in N_FIELD:
            assert body[N_FIELD[provider]] == n
        else:  # gptimage15 and apiinone make one image and have no count field
            assert "n" not in body and "variants" not in body
    for n in (0, top + 1):
        with pytest.raises(ValidationFailed) as caught:
            adapter.validate(GenerationRequest(prompt="a cat", n=n))
        assert_rejection(caught.value, provider, "n", list(range(1, top + 1)))


@pytest.mark.parametrize("mode", ["callback", "poll", "stream"])
def test_grsai_stream_mode_takes_one_image(mode: str) -> None:
    """The stream's final line carries one `url` (seed 000): a second variant would be lost."""
    adapter = make_adapter("grsai", mode=mode)
    adapter.validate(GenerationRequest(prompt="a cat", n=1))
    two = GenerationRequest(prompt="a cat", n=2)
    if mode != "stream":
        adapter.validate(two)
        assert adapter.build_submit(two, None)["variants"] == 2
        return
    with pytest.raises(ValidationFailed) as caught:
        adapter.validate(two)
    assert_rejection(caught.value, "grsai", "n", [1])
    message = caught.value.details[0]["message"]
    assert "stream mode" in message and "one image" in message
    assert "callback or poll mode" in message and "TASKRELAY_GRSAI_MODE" in message
    with pytest.raises(ValidationFailed) as caught:  # out of range in any mode
        adapter.validate(GenerationRequest(prompt="a cat", n=0))
    assert_rejection(caught.value, "grsai", "n", [1, 2])


IMAGE_FIELD = {
    "grsai": "urls",
    "gptimage15": "images",
    "evolink": "image_urls",
    "apiinone": "input_urls",
}


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
def test_reference_images_row(provider: str) -> None:
    adapter = make_adapter(provider)
    urls = ("https://example.com/a.png", "https://example.com/b.png")
    request = GenerationRequest(prompt="edit this", image_urls=urls)
    adapter.validate(request)
    body = adapter.build_submit(request, None)
    assert body[IMAGE_FIELD[provider]] == list(urls)
    others = set(IMAGE_FIELD.values()) - {IMAGE_FIELD[provider]}
    assert not others & set(body)
    assert IMAGE_FIELD[provider] not in adapter.build_submit(
        GenerationRequest(prompt="no images"), None
    )


def test_openai_rejects_reference_images() -> None:
    adapter = make_adapter("openai")
    with pytest.raises(ValidationFailed) as caught:
        adapter.validate(GenerationRequest(prompt="edit", image_urls=("https://e.com/a.png",)))
    assert_rejection(caught.value, "openai", "image_urls", [])
    assert "edits endpoint" in caught.value.details[0]["message"]


@pytest.mark.parametrize("provider", ["openai", "grsai", "evolink", "apiinone"])
def test_model_from_request_or_settings(provider: str) -> None:
    adapter = make_adapter(provider, model="configured-model")
    assert adapter.build_submit(GenerationRequest(prompt="p"), None)["model"] == (
        "configured-model"
    )
    chosen = GenerationRequest(prompt="p", model="chosen-model")
    assert adapter.build_submit(chosen, None)["model"] == "chosen-model"


def test_gptimage15_sends_no_model_and_refuses_another() -> None:
    adapter = make_adapter("gptimage15")
    assert "model" not in adapter.build_submit(GenerationRequest(prompt="p"), None)
    adapter.validate(GenerationRequest(prompt="p", model=DEFAULT_MODELS["gptimage15"]))
    with pytest.raises(ValidationFailed) as caught:
        adapter.validate(GenerationRequest(prompt="p", model="dall-e-3"))
    assert_rejection(caught.value, "gptimage15", "model", [DEFAULT_MODELS["gptimage15"]])


CALLBACK = "https://relay.example/callbacks/x/tok"


@pytest.mark.parametrize("provider", ["gptimage15", "evolink", "apiinone"])
def test_callback_url_field(provider: str) -> None:
    adapter = make_adapter(provider)
    request = GenerationRequest(prompt="p")
    assert adapter.build_submit(request, CALLBACK)["callback_url"] == CALLBACK
    assert "callback_url" not in adapter.build_submit(request, None)


def test_openai_sends_no_callback_url() -> None:
    body = make_adapter("openai").build_submit(GenerationRequest(prompt="p"), CALLBACK)
    assert body == {"model": "gpt-image-1.5", "prompt": "p", "n": 1}


@pytest.mark.parametrize(
    ("model", "response_format"),
    [
        ("gpt-image-1", None),
        ("gpt-image-1.5", None),
        ("chatgpt-image-latest", None),
        ("dall-e-2", "b64_json"),
        ("dall-e-3", "b64_json"),
    ],
)
def test_openai_asks_dall_e_models_for_base64_images(
    model: str, response_format: str | None
) -> None:
    """A task naming a DALL-E model (`dall-e-3`) got links back, which expire within the hour,
    where TaskRelay stores base64 images and serves them (found by the provider hunt). GPT
    Image models answer in base64 only and refuse the field, whatever their name (review)."""
    request = GenerationRequest(prompt="p", model=model)
    body = make_adapter("openai").build_submit(request, None)
    assert body.get("response_format") == response_format


@pytest.mark.parametrize(
    ("mode", "callback_url", "webhook"),
    [
        ("callback", CALLBACK, CALLBACK),
        ("callback", None, "-1"),
        ("poll", CALLBACK, "-1"),
        ("poll", None, "-1"),
        ("stream", CALLBACK, None),
        ("stream", None, None),
    ],
)
def test_grsai_webhook_by_mode(mode: str, callback_url: str | None, webhook: str | None) -> None:
    adapter = make_adapter("grsai", mode=mode)
    body = adapter.build_submit(GenerationRequest(prompt="p"), callback_url)
    assert body.get("webHook") == webhook
    assert ("webHook" in body) is (webhook is not None)
    assert "callback_url" not in body


@pytest.mark.parametrize(
    ("mode", "expects_callback"), [("callback", True), ("poll", False), ("stream", False)]
)
def test_grsai_expects_callback_by_mode(mode: str, expects_callback: bool) -> None:
    result = make_adapter("grsai", mode=mode).parse_submit_reply(
        200, load("grsai/seed_submit_reply_id.json")
    )
    assert result.expects_callback is expects_callback
    assert result.update == TaskUpdate(status=TaskStatus.queued, provider_task_id=GRSAI_ID)


@pytest.mark.parametrize(
    ("provider", "mode", "delivers"),
    [
        ("openai", "callback", False),
        ("grsai", "callback", True),
        ("grsai", "poll", False),
        ("grsai", "stream", False),
        ("gptimage15", "callback", True),
        ("evolink", "callback", True),
        ("apiinone", "callback", True),
    ],
)
def test_delivers_callbacks(provider: str, mode: str, delivers: bool) -> None:
    assert make_adapter(provider, mode=mode).delivers_callbacks() is delivers


# --- rejections ------------------------------------------------------------------------------


def assert_rejection(exc: ValidationFailed, provider: str, field: str, accepted: Any) -> None:
    assert exc.status == 400
    assert exc.code == "unsupported_by_provider"
    assert provider in exc.message and field in exc.message
    (detail,) = exc.details
    assert detail["provider"] == provider
    assert detail["field"] == field
    assert detail["accepted"] == accepted


REJECTIONS: list[tuple[str, dict[str, Any], str, Any]] = [
    ("apiinone", {"quality": "low"}, "quality", ["medium", "high"]),
    ("apiinone", {"quality": "auto"}, "quality", ["medium", "high"]),
    ("apiinone", {"n": 2}, "n", [1]),
    ("apiinone", {"size": "auto"}, "size", RATIOS),
    ("gptimage15", {"n": 2}, "n", [1]),
    ("gptimage15", {"quality": "auto"}, "quality", ["low", "medium", "high"]),
    ("gptimage15", {"size": "auto"}, "size", RATIOS),
    ("gptimage15", {"prompt": "x" * 2001}, "prompt", {"max_characters": 2000}),
    ("grsai", {"n": 3}, "n", [1, 2]),
    ("grsai", {"quality": "high"}, "quality", []),
    ("grsai", {"quality": "auto"}, "quality", []),
    ("grsai", {"size": "16:9"}, "size", ["auto", "1:1", "3:2", "2:3"]),
    ("openai", {"n": 11}, "n", list(range(1, 11))),
    ("openai", {"size": "1024x1792"}, "size", ["1:1", "2:3", "3:2", "auto"]),
    ("openai", {"quality": "standard"}, "quality", ["low", "medium", "high", "auto"]),
    ("openai", {"image_urls": ("https://e.com/a.png",)}, "image_urls", []),
    ("evolink", {"n": 11}, "n", list(range(1, 11))),
    ("evolink", {"size": "auto"}, "size", RATIOS),
    ("evolink", {"quality": "auto"}, "quality", ["low", "medium", "high"]),
    (
        "evolink",
        {"image_urls": tuple(f"https://e.com/{i}.png" for i in range(17))},
        "image_urls",
        {"min_items": 1, "max_items": 16},
    ),
    ("evolink", {"prompt": "word " * 1601}, "prompt", {"max_tokens": 2000}),
    ("evolink", {"prompt": "a" * 8001}, "prompt", {"max_tokens": 2000}),
    ("evolink", {"prompt": "猫" * 2001}, "prompt", {"max_tokens": 2000}),
    ("evolink", {"prompt": "a " * 2001}, "prompt", {"max_tokens": 2000}),
]


@pytest.mark.parametrize(
    ("provider", "changes", "field", "accepted"),
    REJECTIONS,
    ids=[f"{p}-{f}-{i}" for i, (p, _, f, _) in enumerate(REJECTIONS)],
)
def test_rejected_values_name_provider_and_accepted(
    provider: str, changes: dict[str, Any], field: str, accepted: Any
) -> None:
    request = replace(GenerationRequest(prompt="a cat"), **changes)
    with pytest.raises(ValidationFailed) as caught:
        make_adapter(provider).validate(request)
    assert_rejection(caught.value, provider, field, accepted)


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("a" * 8, 2),
        ("a b c", 3),  # a word is at least a token
        ("猫" * 10, 10),  # a non-ASCII character is a token
        ("猫a猫b", 4),  # 2 CJK + 2 ASCII words
        ("一只可爱的猫咪 in the grass", 7 + 4),  # 13 ASCII characters: 4 tokens
        ("é" * 5, 3),  # other non-ASCII characters: two to a token
        ("кот " * 600, 900 + 150),  # Cyrillic: half a token a letter; 600 ASCII spaces: 150
        ("ねこ네코", 4),  # kana and Hangul: a token each
    ],
)
def test_evolink_token_estimate(prompt: str, tokens: int) -> None:
    assert evolink.estimated_tokens(prompt) == tokens


def test_evolink_rejection_says_how_tokens_are_counted() -> None:
    with pytest.raises(ValidationFailed) as caught:
        make_adapter("evolink").validate(GenerationRequest(prompt="猫" * 2001))
    message = caught.value.details[0]["message"]
    assert "about 2001 tokens" in message and "one token per CJK character" in message


@pytest.mark.parametrize(
    ("provider", "changes"),
    [
        ("gptimage15", {"prompt": "x" * 2000}),
        ("evolink", {"prompt": "a" * 8000}),
        ("evolink", {"prompt": "猫" * 2000}),
        ("evolink", {"image_urls": tuple(f"https://e.com/{i}.png" for i in range(16))}),
        ("openai", {"n": 10, "size": "auto", "quality": "auto"}),
        ("grsai", {"n": 2, "size": "auto"}),
        ("apiinone", {"quality": "high", "size": "2:3"}),
    ],
)
def test_values_at_the_limits_are_accepted(provider: str, changes: dict[str, Any]) -> None:
    make_adapter(provider).validate(replace(GenerationRequest(prompt="a cat"), **changes))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_empty_prompt_is_rejected(provider: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        make_adapter(provider).validate(GenerationRequest(prompt="   "))
    (detail,) = caught.value.details
    assert detail["provider"] == provider and detail["field"] == "prompt"


# --- normalising a status (PROVIDERS.md table 2) --------------------------------------------


# Where each provider's task object keeps its image URLs.
IMAGES_FIELD = {
    "grsai": "results",
    "gptimage15": "response",
    "evolink": "results",
    "apiinone": "results",
}


def status_body(provider: str, word: str, images: Any = None) -> dict[str, Any]:
    """A status answer with ``word``; ``images`` (when not None) in the provider's field."""
    task: dict[str, Any]
    if provider in ("grsai", "evolink"):
        task = {"id": "g-1", "status": word, "progress": 50}
    else:
        task = {"task_id": "g-1", "status": word}
    if images is not None:
        task[IMAGES_FIELD[provider]] = images
    if provider == "grsai":
        return {"code": 0, "msg": "success", "data": task}
    if provider == "evolink":
        return task
    if provider == "gptimage15":
        return {"code": 200, "data": task}
    return {"code": 200, "message": "success", "data": task}


STATUS_ROWS: list[tuple[str, str, TaskStatus | None]] = [
    ("grsai", "running", S.running),
    ("grsai", "succeeded", S.succeeded),
    ("grsai", "failed", S.failed),
    ("gptimage15", "PENDING", S.queued),
    ("gptimage15", "IN_PROGRESS", S.running),
    ("gptimage15", "SUCCESS", S.succeeded),
    ("gptimage15", "FAILED", S.failed),
    ("evolink", "pending", S.queued),
    ("evolink", "processing", S.running),
    ("evolink", "completed", S.succeeded),
    ("evolink", "failed", S.failed),
    ("apiinone", "IN_PROGRESS", S.running),
    ("apiinone", "completed", S.succeeded),
    ("apiinone", "failed", S.failed),
    # apiinone's status body is undocumented: any case
    ("apiinone", "in_progress", S.running),
    ("apiinone", "COMPLETED", S.succeeded),
    ("apiinone", "Failed", S.failed),
]
UNKNOWN_ROWS = [
    (provider, word, expected)
    for provider in ASYNC_PROVIDERS
    for word, expected in [
        ("cancelled", S.canceled),
        ("canceled", S.canceled),
        ("CANCELLED", S.canceled),
        ("cancel_requested", S.canceled),
        ("warming_up", S.running),
        ("queued_at_partner", S.running),
        ("", None),  # an empty status word is no status at all: a shape error
    ]
]


@pytest.mark.parametrize(("provider", "word", "expected"), STATUS_ROWS + UNKNOWN_ROWS)
def test_status_row(provider: str, word: str, expected: TaskStatus | None) -> None:
    adapter = make_adapter(provider)
    # A success names its image: without one it is refused (test_success_without_an_image_url).
    body = status_body(provider, word, ["https://g/a.png"] if expected is S.succeeded else None)
    if expected is None:
        with pytest.raises(UpstreamProtocolError):
            adapter.parse_status(200, body)
        with pytest.raises(CallbackParseError):
            adapter.parse_callback(json.dumps(body).encode(), {})
        return
    for update in (
        adapter.parse_status(200, body),
        adapter.parse_callback(json.dumps(body).encode(), {}),
    ):
        assert update.status is expected
        assert update.raw_status == word
        assert update.provider_task_id == "g-1"
        if expected is S.failed:
            assert update.error is not None and update.error["code"] == "provider_failed"
        else:
            assert update.error is None


def test_grsai_submitted_task_is_queued_until_it_runs() -> None:
    adapter = make_adapter("grsai", mode="poll")
    update = adapter.parse_submit_reply(200, {"code": 0, "data": {"id": "g-1"}}).update
    assert update.status is S.queued and update.progress is None
    running = adapter.parse_status(200, status_body("grsai", "running"))
    assert running.status is S.running and running.progress == 50


def test_grsai_running_at_progress_100_is_still_running() -> None:
    body = {"code": 0, "data": {"status": "running", "progress": 100}}
    assert make_adapter("grsai").parse_status(200, body).status is S.running


# --- failures and content policy ------------------------------------------------------------

FAILED_BODIES: dict[str, Callable[[str], dict[str, Any]]] = {
    "grsai": lambda reason: {"code": 0, "data": {"status": "failed", "failure_reason": reason}},
    "gptimage15": lambda reason: {
        "code": 200,
        "data": {"task_id": "t", "status": "FAILED", "error_message": reason},
    },
    "evolink": lambda reason: {"id": "t", "status": "failed", "error": {"message": reason}},
    "apiinone": lambda reason: {
        "code": 200,
        "data": {"task_id": "t", "status": "failed", "error_message": reason},
    },
}


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("Content policy violation detected", "content_policy_violation"),
        ("Blocked by our safety system", "content_policy_violation"),
        ("input_moderation", "content_policy_violation"),
        ("提示词违规", "content_policy_violation"),
        ("Upstream timeout", "provider_failed"),
    ],
)
def test_failure_reason_and_content_policy(provider: str, reason: str, code: str) -> None:
    update = make_adapter(provider).parse_status(200, FAILED_BODIES[provider](reason))
    assert update.status is S.failed
    assert update.error == {"code": code, "message": reason}


TOKEN = CallbackSigner("provider-unit-secret-0123456789", max_age=3600).token(
    "tsk_Z2lG-oXEpjwWBHC63peaXw", "evolink"
)
TOKEN_URL = f"https://relay.example/callbacks/evolink/{TOKEN}"


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
def test_a_failure_reason_keeps_no_callback_token_and_no_megabytes(provider: str) -> None:
    """What a provider says is copied into the task, its events and every webhook body: a
    callback URL quoted in it loses its token (which lets anyone post to the task), and a
    reason of megabytes is cut."""
    adapter = make_adapter(provider)
    quoted = adapter.parse_status(200, FAILED_BODIES[provider](f"could not reach {TOKEN_URL}"))
    assert quoted.error is not None
    assert quoted.error["message"] == "could not reach https://relay.example/callbacks/evolink/…"
    huge = adapter.parse_status(200, FAILED_BODIES[provider]("x" * 3_000_000))
    assert huge.error is not None
    message = huge.error["message"]
    assert message.startswith("x" * (parsing.MAX_REASON_CHARS - 50))
    assert message.endswith("x… (cut: 3000000 characters in all)")
    assert len(message) == parsing.MAX_REASON_CHARS


def test_a_grsai_category_and_detail_are_cut_once_joined() -> None:
    body = {
        "code": 0,
        "data": {"status": "failed", "failure_reason": "a" * 3000, "error": "b" * 3000},
    }
    update = make_adapter("grsai").parse_status(200, body)
    assert update.error is not None
    message = update.error["message"]
    assert len(message) == parsing.MAX_REASON_CHARS
    assert message.endswith("… (cut: 6002 characters in all)") and message.count("(cut") == 1


def test_an_error_reply_keeps_no_callback_token_and_no_megabytes() -> None:
    body = {"error": {"message": f"callback_url must be https: {TOKEN_URL}?x=1"}}
    error = parsing.reply_error("evolink", 400, body)
    assert TOKEN not in error.message
    assert error.message.endswith("must be https: https://relay.example/callbacks/evolink/…?x=1")
    # However the URL is written around it (found in review and by the security hunt).
    for written in (json.dumps(TOKEN_URL)[1:-1].replace("/", "\\/"), quote(TOKEN_URL, safe="")):
        said = parsing.reply_error("evolink", 400, {"error": {"message": f"bad {written}"}})
        assert TOKEN not in said.message and "…" in said.message, said.message
    assert parsing.scrubbed(f"token={TOKEN}") == "token=…"
    unrelated = "see https://docs.provider.com/callbacks/setup/retries (v1.2.3)"
    assert parsing.scrubbed(unrelated) == unrelated
    error = parsing.reply_error("openai", 400, {"error": {"message": "y" * 3_000_000}})
    assert len(error.message) < parsing.MAX_REASON_CHARS + 100
    envelope = {"code": TOKEN_URL, "data": None}
    with pytest.raises(parsing.BodyShapeError) as caught:
        parsing.status_object(envelope)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (  # the category and its detail: both kept
            {"failure_reason": "error", "error": "upstream timeout"},
            {"code": "provider_failed", "message": "error: upstream timeout"},
        ),
        (
            {"failure_reason": "output_moderation", "error": "The image was flagged"},
            {
                "code": "content_policy_violation",
                "message": "output_moderation: The image was flagged",
            },
        ),
        ({"failure_reason": "", "error": "upstream timeout"}, None),  # the detail alone
        ({"failure_reason": "error", "error": "error"}, None),  # not said twice
    ],
)
def test_grsai_failure_keeps_its_category_and_detail(
    fields: dict[str, str], error: dict[str, str] | None
) -> None:
    body = {"code": 0, "data": {"status": "failed", **fields}}
    update = make_adapter("grsai").parse_status(200, body)
    assert update.status is S.failed
    alone = fields["failure_reason"] or fields["error"]
    assert update.error == (error or {"code": "provider_failed", "message": alone})


def test_evolink_error_code_alone_can_name_content_policy() -> None:
    body = {"id": "t", "status": "failed", "error": {"code": "content_policy", "message": "No."}}
    update = make_adapter("evolink").parse_status(200, body)
    assert update.error == {"code": "content_policy_violation", "message": "No."}


# --- success needs an image ---------------------------------------------------------------------

# What a success may carry in the provider's image field that is no image URL.
NOT_IMAGES: list[Any] = [
    [],
    ["pending"],
    [""],
    ["/files/a.png"],
    ["ftp://g/a.png"],
    ["https://"],
    ["http://[oops/a.png"],
    ["https://g/a\n.png"],
    [{"url": "pending"}, {"width": 1024}],
    "done",
    {},
    None,  # no field at all
]


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
@pytest.mark.parametrize("images", NOT_IMAGES, ids=[repr(v)[:24] for v in NOT_IMAGES])
def test_success_without_an_image_url_is_refused(provider: str, images: Any) -> None:
    """Success is final: recorded without an image, the task could never get its result. The
    answer is refused instead, and the task stays running for a later poll or callback."""
    adapter = make_adapter(provider)
    word = {"grsai": "succeeded", "gptimage15": "SUCCESS"}.get(provider, "completed")
    body = status_body(provider, word, images)
    with pytest.raises(UpstreamProtocolError) as polled:
        adapter.parse_status(200, body)
    with pytest.raises(CallbackParseError) as called:
        adapter.parse_callback(json.dumps(body).encode(), {})
    for error in (polled.value, called.value):
        assert f"reported success (status {word!r}) but gave no image URL" in error.message
        assert "absolute http(s) URL" in error.message
    assert polled.value.provider == provider and polled.value.retryable
    assert called.value.status == 400


def test_success_without_an_image_url_names_where_it_was_expected() -> None:
    evo = {"id": "t", "status": "completed", "results": []}
    with pytest.raises(UpstreamProtocolError) as caught:
        make_adapter("evolink").parse_status(200, evo)
    assert caught.value.message == (
        "evolink answered: the provider reported success (status 'completed') but gave no "
        "image URL: expected at least one absolute http(s) URL in `results`."
    )
    with pytest.raises(CallbackParseError) as callback:
        make_adapter("evolink").parse_callback(json.dumps(evo).encode(), {})
    assert callback.value.message.startswith("Unreadable evolink callback: the provider reported")


@pytest.mark.parametrize(
    ("provider", "mode", "body"),
    [
        ("evolink", "callback", {"id": "t", "status": "completed", "results": ["pending"]}),
        ("gptimage15", "callback", {"code": 200, "data": {"task_id": "t", "status": "SUCCESS"}}),
        ("apiinone", "callback", {"code": 200, "data": {"task_id": "t", "status": "completed"}}),
        ("grsai", "poll", {"code": 0, "data": {"id": "t", "status": "succeeded"}}),
    ],
)
def test_submit_reply_success_without_an_image_keeps_the_task_running(
    provider: str, mode: str, body: Any
) -> None:
    """The reply names the task: it is left to polls and callbacks, not failed or resent."""
    update = make_adapter(provider, mode=mode).parse_submit_reply(200, body).update
    assert update.status is S.running and update.provider_task_id == "t"
    assert update.images == ()


def test_grsai_submit_reply_success_without_image_or_id_is_a_protocol_error() -> None:
    body = {"code": 0, "data": {"status": "succeeded", "results": []}}
    with pytest.raises(UpstreamProtocolError, match="gave no image URL"):
        make_adapter("grsai").parse_submit_reply(200, body)


def test_grsai_stream_success_without_an_image_url_is_a_protocol_error() -> None:
    stream = 'data: {"progress": 50}\n\ndata: {"progress": 100, "status": "succeeded"}\n'
    with pytest.raises(UpstreamProtocolError, match="gave no image URL") as caught:
        make_adapter("grsai", mode="stream").parse_submit_reply(200, stream)
    assert "`url`" in caught.value.message


def test_image_list_keeps_only_absolute_http_urls() -> None:
    value = [
        "pending",
        "",
        "   ",
        "/relative/a.png",
        "files/a.png",
        "//cdn.example/a.png",
        "ftp://cdn.example/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "https://",
        "http://[oops/a.png",
        "https://cdn.example/a\r\n.png",
        {"url": "pending", "width": 10},
        {"url": " https://cdn.example/a.png ", "width": 1024, "height": 1536},
        "https://cdn.example/a.png",  # the same URL again
        "HTTP://CDN.example/b.png",
        {"url": "http://10.0.0.1:8080/c.png?sig=x", "width": True},
        7,
        None,
    ]
    assert parsing.image_list(value) == [
        {"url": "https://cdn.example/a.png", "width": 1024, "height": 1536},
        {"url": "HTTP://CDN.example/b.png"},
        {"url": "http://10.0.0.1:8080/c.png?sig=x"},
    ]
    assert parsing.image_list("pending") == []
    assert parsing.image_list({"url": "https://g/a.png"}) == [{"url": "https://g/a.png"}]


def test_apiinone_passes_over_a_field_without_urls() -> None:
    task = {"task_id": "t", "status": "completed", "results": ["pending"], "result": "ok"}
    body = {"code": 200, "data": {**task, "output": ["https://g/a.png"]}}
    update = make_adapter("apiinone").parse_status(200, body)
    assert update.images == ({"url": "https://g/a.png"},)


# --- callback shapes ---------------------------------------------------------------------------

BAD_CALLBACKS = [
    (b"[1, 2, 3]", "JSON object"),
    (b'"completed"', "JSON object"),
    (b"null", "JSON object"),
    (b'{"no_status_anywhere": true}', "status"),
    (b'{"code": 200, "data": null}', "`data`"),
    (b'{"code": 0, "data": [1, 2]}', "`data`"),
    (b'{"code": 0, "data": "done"}', "`data`"),
    (b'{"status": 7}', "status"),
    (b'{"status": ["completed"]}', "status"),
    (b'{"data": {"status": {"deep": true}}}', "status"),
    (b"[" * 5000 + b"]" * 5000, ""),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, ""),
    (b"not json", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("body", "says"), BAD_CALLBACKS)
def test_wrong_callback_shapes_are_callback_parse_errors(
    provider: str, body: bytes, says: str
) -> None:
    with pytest.raises(CallbackParseError) as caught:
        make_adapter(provider).parse_callback(body, {})
    assert caught.value.status == 400
    if provider != "openai":
        assert says in caught.value.message


ODD_BUT_READABLE: dict[str, bytes] = {
    "grsai": (
        b'{"code": 0, "data": {"id": 12345, "status": "succeeded", "progress": "100",'
        b' "results": [null, 7, {"url": ""}, {"url": "https://g/a.png", "width": true},'
        b' "https://g/b.png"], "extra": {"nested": [[[[{}]]]]}}}'
    ),
    "gptimage15": (
        b'{"code": "200", "data": {"task_id": 12345, "status": "SUCCESS", "progress": 1e300,'
        b' "response": "https://g/a.png", "unknown": [1, {"x": null}]}}'
    ),
    "evolink": (
        b'{"id": 12345, "status": "completed", "progress": "abc", "results": {"url":'
        b' "https://g/a.png", "width": 1024}, "task_info": "soon", "usage": [1, 2]}'
    ),
    "apiinone": (
        b'{"code": 200, "data": {"task_id": 12345, "status": "completed", "results": [],'
        b' "output": {"urls": ["https://g/a.png", {"url": "https://g/b.png"}]}}}'
    ),
}


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
def test_odd_values_and_unknown_fields_are_tolerated(provider: str) -> None:
    update = make_adapter(provider).parse_callback(ODD_BUT_READABLE[provider], {})
    assert update.status is S.succeeded
    assert update.provider_task_id == "12345"
    assert update.images and all(image["url"].startswith("https://g/") for image in update.images)
    assert all(isinstance(image.get("width", 0), int) for image in update.images)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (100, 100.0),
        ("30", 30.0),
        (2.5, 2.5),
        (-1, None),
        (float("inf"), None),
        (float("nan"), None),
        ("soon", None),
        (True, None),
        (None, None),
    ],
)
def test_evolink_estimated_time(value: Any, seconds: float | None) -> None:
    body = {"id": "t", "status": "pending", "task_info": {"estimated_time": value}}
    assert make_adapter("evolink").parse_status(200, body).estimated_seconds == seconds


def test_odd_value_details() -> None:
    grsai = make_adapter("grsai").parse_callback(ODD_BUT_READABLE["grsai"], {})
    assert grsai.images == ({"url": "https://g/a.png"}, {"url": "https://g/b.png"})
    assert grsai.progress == 100
    gpt = make_adapter("gptimage15").parse_callback(ODD_BUT_READABLE["gptimage15"], {})
    assert gpt.images == ({"url": "https://g/a.png"},)
    assert gpt.progress is None  # 1e300 is no percentage
    evo = make_adapter("evolink").parse_callback(ODD_BUT_READABLE["evolink"], {})
    assert evo.images == ({"url": "https://g/a.png", "width": 1024},)
    assert evo.progress is None and evo.estimated_seconds is None


@pytest.mark.parametrize(
    "field", ["results", "result_urls", "images", "output", "urls", "response", "result"]
)
@pytest.mark.parametrize(
    "value",
    [
        ["https://g/a.png", "https://g/b.png"],
        [{"url": "https://g/a.png"}, {"url": "https://g/b.png", "width": 9}],
        {"images": ["https://g/a.png", "https://g/b.png"]},
    ],
    ids=["strings", "objects", "nested"],
)
def test_apiinone_images_from_any_documented_guess(field: str, value: Any) -> None:
    body = {"code": 200, "data": {"task_id": "t", "status": "completed", field: value}}
    update = make_adapter("apiinone").parse_status(200, body)
    assert [image["url"] for image in update.images] == ["https://g/a.png", "https://g/b.png"]


def test_openai_refuses_every_callback() -> None:
    with pytest.raises(CallbackParseError, match="no callbacks"):
        make_adapter("openai").parse_callback(raw("openai/submit_b64.json"), {})


def test_a_bom_is_tolerated() -> None:
    body = b"\xef\xbb\xbf" + raw("evolink/callback_completed.json")
    assert make_adapter("evolink").parse_callback(body, {}).status is S.succeeded


# --- submit replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("gptimage15", {"code": 200, "data": {"status": "IN_PROGRESS"}}),
        ("evolink", {"status": "pending"}),
        ("apiinone", {"code": 200, "message": "success", "data": {"status": "IN_PROGRESS"}}),
        ("openai", {"created": 1, "data": []}),
        ("openai", {"created": 1, "data": [{"revised_prompt": "x"}]}),
        ("openai", ["not", "an", "object"]),
        ("gptimage15", "just text"),
        ("apiinone", {"code": 200, "data": None}),
    ],
)
def test_submit_reply_without_a_task_is_a_protocol_error(provider: str, body: Any) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        make_adapter(provider).parse_submit_reply(200, body)
    assert caught.value.provider == provider
    assert caught.value.retryable


def test_grsai_poll_mode_needs_the_task_id_but_callback_mode_does_not() -> None:
    with pytest.raises(UpstreamProtocolError, match=r"data\.id"):
        make_adapter("grsai", mode="poll").parse_submit_reply(200, {"code": 0, "data": {}})
    update = make_adapter("grsai").parse_submit_reply(200, {"code": 0, "data": {}}).update
    assert update == TaskUpdate(status=S.queued)


@pytest.mark.parametrize(
    ("provider", "body", "expected"),
    [
        ("gptimage15", {"code": 200, "data": {"task_id": "t"}}, S.queued),
        ("evolink", {"id": "t"}, S.queued),
        ("apiinone", {"code": 200, "data": {"task_id": "t"}}, S.queued),
        ("grsai", {"code": 0, "data": {"id": "t"}}, S.queued),
    ],
)
def test_submit_reply_without_status_is_queued(
    provider: str, body: Any, expected: TaskStatus
) -> None:
    update = make_adapter(provider).parse_submit_reply(200, body).update
    assert update.status is expected and update.provider_task_id == "t"


def test_openai_reply_is_the_final_result() -> None:
    result = make_adapter("openai").parse_submit_reply(200, load("openai/submit_b64.json"))
    assert result.expects_callback is False
    assert result.update == TaskUpdate(
        status=S.succeeded, progress=100, images=({"b64_json": PNG},)
    )


def test_openai_2xx_error_body_is_an_error() -> None:
    with pytest.raises(ContentPolicyViolation):
        make_adapter("openai").parse_submit_reply(200, load("openai/error_400_moderation.json"))


@pytest.mark.parametrize("provider", ASYNC_PROVIDERS)
def test_status_reply_that_is_not_an_object_is_a_protocol_error(provider: str) -> None:
    adapter = make_adapter(provider)
    for body in ([1], "x", None, {"data": "x"}, {"nothing": "here"}):
        with pytest.raises(UpstreamProtocolError):
            adapter.parse_status(200, body)


def test_status_error_codes_in_the_body() -> None:
    with pytest.raises(UpstreamNotFound, match="Task not found"):
        make_adapter("gptimage15").parse_status(200, load("gptimage15/error_404.json"))
    with pytest.raises(UpstreamBadRequest, match="apikey error") as caught:
        make_adapter("grsai").parse_status(200, load("grsai/error_code_nonzero.json"))
    assert caught.value.upstream_status is None
    assert caught.value.details == {"provider_code": -1}
    with pytest.raises(UpstreamRateLimited):
        make_adapter("grsai").parse_status(200, {"code": 429, "msg": "slow down"})


def test_non_json_error_reply_still_maps_by_status() -> None:
    with pytest.raises(UpstreamUnavailable, match="answered HTTP 502"):
        make_adapter("evolink").parse_status(502, None)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 504, 524])
@pytest.mark.parametrize("source", ["HTTP", "code"])
def test_an_error_status_is_ambiguous_only_for_a_gateways_timeout(
    status: int, source: Literal["HTTP", "code"]
) -> None:
    """The provider answered and refused: sending the request again cannot start a second
    task. Except an HTTP 504 or 524: a gateway gave up waiting for the provider behind it,
    which has the request and may act on it (as after a read timeout of TaskRelay's own). A
    body code of 504 (GrsAI's codes) is the provider's own answer."""
    error = parsing.error_for_status("evolink", status, "no", source=source)
    assert type(error) is not UpstreamProtocolError
    assert error.upstream_status == status
    assert error.ambiguous == (source == "HTTP" and status in (504, 524))


@pytest.mark.parametrize("status", [299, 303])
def test_a_status_outside_3xx_5xx_or_a_see_other_is_an_ambiguous_protocol_error(
    status: int,
) -> None:
    """303 See Other answers a POST that was carried out: it may have made the task."""
    error = parsing.error_for_status("evolink", status)
    assert type(error) is UpstreamProtocolError and error.ambiguous


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_base_url_to_set_right_not_a_lost_answer(status: int) -> None:
    """An http:// base URL the provider sends on to https://: nothing was made, and sending it
    again meets the same redirect. Taken for a lost answer (ambiguous), a task at a provider
    that calls back waited for its deadline, with no error (found by exploratory testing)."""
    headers = {"Location": "https://api.evolink.ai/v1/images/generations"}
    error = parsing.error_for_status("evolink", status, headers=headers)
    assert type(error) is UpstreamProtocolError
    assert not error.ambiguous and not error.retryable
    assert f"evolink answered HTTP {status} (a redirect to https://api.evolink.ai/" in error.message
    assert "TASKRELAY_EVOLINK_BASE_URL" in error.message


REQUEST_ERRORS: list[tuple[httpx.HTTPError, type[ProviderError], bool]] = [
    (httpx.ConnectError("refused"), UpstreamUnavailable, False),
    (httpx.ConnectTimeout("slow"), UpstreamUnavailable, False),
    (httpx.PoolTimeout("busy"), UpstreamUnavailable, False),
    (httpx.WriteTimeout("slow"), UpstreamUnavailable, True),
    (httpx.WriteError("reset"), UpstreamUnavailable, True),
    (httpx.ReadTimeout("slow"), UpstreamUnavailable, True),
    (httpx.ReadError("reset"), UpstreamUnavailable, True),
    (httpx.RemoteProtocolError("dropped"), UpstreamUnavailable, True),
    (httpx.DecodingError("bad gzip"), UpstreamProtocolError, True),
]


@pytest.mark.parametrize(
    ("exc", "error", "ambiguous"),
    REQUEST_ERRORS,
    ids=[type(e).__name__ for e, *_ in REQUEST_ERRORS],
)
def test_request_errors_are_ambiguous_once_the_request_may_have_arrived(
    exc: httpx.HTTPError, error: type[ProviderError], ambiguous: bool
) -> None:
    mapped = base.transport_error("gptimage15", exc)
    assert type(mapped) is error
    assert mapped.ambiguous is ambiguous
    assert mapped.retryable and mapped.provider == "gptimage15"


# --- the seed documents' exact bodies ----------------------------------------------------------


def test_seed_001_gptimage15() -> None:
    adapter = make_adapter("gptimage15")
    text = GenerationRequest(prompt="A serene mountain landscape...", size="3:2", quality="high")
    adapter.validate(text)
    assert adapter.build_submit(text, None) == load("gptimage15/seed_submit_request_text.json")
    edit = GenerationRequest(
        prompt="Add a rainbow in the sky",
        quality="medium",
        image_urls=("https://example.com/landscape.jpg",),
    )
    adapter.validate(edit)
    seed_edit = load("gptimage15/seed_submit_request_edit.json")
    # input_fidelity is left to the provider's default (high, as in the seed).
    assert seed_edit.pop("input_fidelity") == "high"
    assert adapter.build_submit(edit, None) == seed_edit

    accepted = adapter.parse_submit_reply(200, load("gptimage15/seed_submit_reply.json"))
    assert accepted.update == TaskUpdate(
        status=S.running, provider_task_id=GPT_ID, raw_status="IN_PROGRESS"
    )
    running = adapter.parse_status(200, load("gptimage15/seed_status_in_progress.json"))
    assert running == TaskUpdate(
        status=S.running, provider_task_id=GPT_ID, raw_status="IN_PROGRESS"
    )
    done = adapter.parse_status(200, load("gptimage15/seed_status_success.json"))
    assert done == TaskUpdate(
        status=S.succeeded, images=GPT_IMG, provider_task_id=GPT_ID, raw_status="SUCCESS"
    )
    failed = adapter.parse_status(200, load("gptimage15/seed_status_failed.json"))
    assert failed == TaskUpdate(
        status=S.failed,
        error={"code": "content_policy_violation", "message": "Content policy violation detected"},
        provider_task_id=GPT_ID,
        raw_status="FAILED",
    )
    for http in (200, 400):
        with pytest.raises(UpstreamBadRequest) as caught:
            adapter.parse_submit_reply(http, load("gptimage15/seed_error_400.json"))
        assert caught.value.message == (
            "gptimage15 answered "
            + ("code" if http == 200 else "HTTP")
            + " 400: Bad Request: 'prompt' is required."
        )


def test_seed_002_evolink() -> None:
    adapter = make_adapter("evolink")
    request = GenerationRequest(
        prompt="A beautiful colorful sunset over the ocean", size="1:1", quality="high", n=1
    )
    adapter.validate(request)
    callback = "https://your-domain.com/webhooks/callback"
    assert adapter.build_submit(request, callback) == load("evolink/seed_request.json")
    result = adapter.parse_submit_reply(200, load("evolink/seed_submit_reply.json"))
    assert result.update == TaskUpdate(
        status=S.queued,
        progress=0,
        provider_task_id="task-unified-1757156493-imcg5zqt",
        raw_status="pending",
        estimated_seconds=100.0,
    )


def test_seed_000_grsai() -> None:
    stream = make_adapter("grsai", mode="stream", model="sora-image")
    request = GenerationRequest(prompt="一只可爱的猫咪在草地上玩耍", size="1:1", n=1)
    stream.validate(request)
    assert stream.build_submit(request, None) == load("grsai/seed_submit_request_stream.json")

    webhook = "http://你的服务器地址/callback"
    callback = make_adapter("grsai", mode="callback", model="sora-image")
    plain = GenerationRequest(prompt="一只可爱的猫咪在草地上玩耍")
    # TaskRelay always sends variants (the seed's stream example does; its default is 1).
    assert callback.build_submit(plain, webhook) == {
        **load("grsai/seed_submit_request_webhook.json"),
        "variants": 1,
    }
    poll = make_adapter("grsai", mode="poll", model="sora-image")
    assert poll.build_submit(plain, webhook)["webHook"] == "-1"

    accepted = poll.parse_submit_reply(200, load("grsai/seed_submit_reply_id.json"))
    assert accepted.update == TaskUpdate(status=S.queued, provider_task_id=GRSAI_ID)
    assert accepted.expects_callback is False
    assert poll.parse_status(200, load("grsai/seed_result_running.json")) == TaskUpdate(
        status=S.running, raw_status="running"
    )
    assert poll.parse_status(200, load("grsai/seed_result_succeeded.json")) == TaskUpdate(
        status=S.succeeded, images=url(GRSAI_IMG["url"]), raw_status="succeeded"
    )

    lines = load("grsai/seed_stream_succeeded.txt").splitlines()
    updates = [update for line in lines if (update := stream.parse_stream_line(line))]
    assert [u.progress for u in updates] == [0, 35, 80, 100]
    assert [u.status for u in updates] == [S.running] * 3 + [S.succeeded]
    assert updates[-1].images == (
        {"url": "https://file.grsai.example/stream-1.png", "width": 1024, "height": 1024},
    )


@pytest.mark.parametrize(
    ("line", "status", "error"),
    [
        ('data: {"progress": 100, "url": "https://g/x.png"}', S.succeeded, None),
        ('data: {"progress": 100, "failure_reason": "boom"}', S.failed, "boom"),
        ('data: {"progress": 100}', S.running, None),
        ('data: {"progress": 100, "url": "pending"}', S.running, None),
        ('data: {"progress": 60, "status": "failed", "error": "quota"}', S.failed, "quota"),
        ('data: {"code": 0, "data": {"progress": 30, "status": "running"}}', S.running, None),
    ],
)
def test_grsai_stream_line_without_or_with_an_early_status(
    line: str, status: TaskStatus, error: str | None
) -> None:
    update = make_adapter("grsai", mode="stream").parse_stream_line(line)
    assert update is not None and update.status is status
    assert (update.error or {}).get("message") == error


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        ": ping",
        "event: progress",
        "id: 4",
        "data:",
        "data: [DONE]",
        "data: {broken",
        "data: [1, 2]",
        "data: 42",
    ],
)
def test_grsai_stream_lines_without_an_update(line: str) -> None:
    assert make_adapter("grsai", mode="stream").parse_stream_line(line) is None


def test_grsai_stream_error_line_raises() -> None:
    with pytest.raises(UpstreamBadRequest, match="no credits"):
        make_adapter("grsai", mode="stream").parse_stream_line(
            'data: {"code": -2, "msg": "no credits"}'
        )


def test_seed_003_004_apiinone() -> None:
    adapter = make_adapter("apiinone")
    request = GenerationRequest(
        prompt='A modern logo design for a coffee shop called "Bean & Brew" with clean typography',
        quality="medium",
        size="1:1",
    )
    adapter.validate(request)
    assert adapter.build_submit(request, None) == load("apiinone/seed_request.json")
    official = make_adapter("apiinone", model="gpt-image-1.5-official")
    assert official.build_submit(request, None)["model"] == "gpt-image-1.5-official"
    result = adapter.parse_submit_reply(200, load("apiinone/seed_submit_reply.json"))
    assert result.update == TaskUpdate(
        status=S.running, provider_task_id="n42xxxx_gptimg", raw_status="IN_PROGRESS"
    )
    with pytest.raises(UpstreamBadRequest) as caught:
        adapter.parse_submit_reply(400, load("apiinone/seed_error.json"))
    assert caught.value.message == "apiinone answered HTTP 400: Invalid parameters"


# --- the registry ------------------------------------------------------------------------------


def test_registry_names_every_provider_once() -> None:
    assert set(ADAPTER_CLASSES) == set(PROVIDERS)
    for name, cls in ADAPTER_CLASSES.items():
        assert cls.name == name
        assert issubclass(cls, ProviderAdapter)
    assert [name for name, cls in ADAPTER_CLASSES.items() if not cls.can_query_status] == ["openai"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 30.0), ("inf", None), ("nan", None), ("-5", 0.0), ("99999999", 3600.0), ("soon", None)],
)
def test_retry_after_is_finite_and_bounded(value: str, seconds: float | None) -> None:
    from service.providers.parsing import retry_after_seconds

    assert retry_after_seconds({"Retry-After": value}) == seconds


def test_a_providers_json_is_mended_where_the_api_would_refuse_it() -> None:
    """Provider JSON (callbacks, replies): NULs and unpaired surrogates become U+FFFD, in keys
    and values, at any depth; a paired surrogate escape is one character and stays. The
    management API still refuses such input (its client can send it again)."""
    text = '{"a\\u0000": ["x\\ud800y", {"b": "\\udc00"}], "ok": "\\ud83d\\ude00", "n": 1}'
    assert parsing.loads_provider_json(text) == {
        "a\ufffd": ["x\ufffdy", {"b": "\ufffd"}],
        "ok": "\U0001f600",
        "n": 1,
    }
    collide = '{"k\\u0000": "first", "k\\ud800": "second"}'
    assert parsing.loads_provider_json(collide) == {"k\ufffd": "first"}
    clean = '{"a": "\\u00e9", "b": [1, 2.5, null]}'
    assert parsing.loads_provider_json(clean) == json.loads(clean)
    with pytest.raises(parsing.UnstorableJSON):
        parsing.loads_storable(text)
    with pytest.raises(ValueError, match="NaN is not a JSON value"):
        parsing.loads_provider_json('{"a": NaN}')


# --- provider task ids in a status query's path ---------------------------------------------


@pytest.mark.parametrize(
    ("provider", "prefix"), [("evolink", "/v1/tasks/"), ("apiinone", "/api/v1/tasks/")]
)
@pytest.mark.parametrize(
    ("task_id", "segment"),
    [("abc", "abc"), ("a/b?c#d", "a%2Fb%3Fc%23d"), (".", "%2E"), ("..", "%2E%2E"), ("...", "...")],
)
def test_a_provider_task_id_is_one_path_segment_of_the_status_query(
    provider: str, prefix: str, task_id: str, segment: str
) -> None:
    """Whatever the id (one stored before ids were checked included), the query asks for that
    task: a dot segment would have made it another path of the provider's API."""
    adapter = make_adapter(provider)
    query = adapter.status_query(task_id)
    assert query.path == prefix + segment
    url = httpx.URL(adapter.url(query.path))
    assert url.raw_path.decode().endswith(prefix + segment)


@pytest.mark.parametrize("value", [".", "..", " .. ", ""])
def test_a_dot_segment_or_nothing_is_no_provider_task_id(value: str) -> None:
    assert parsing.id_of(value) is None
    body = {"id": value, "status": "processing", "progress": 10}
    update = make_adapter("evolink").parse_callback(json.dumps(body).encode(), {})
    assert update.provider_task_id is None  # the rest of the callback still counts
    assert update.status is TaskStatus.running
