"""OpenAI's own Images API (``POST /v1/images/generations``).

OpenAI is synchronous: the reply to the submit request is the result, with no task id, no
callback and no status endpoint. TaskRelay runs the call in the background and the submit reply
becomes the task's final state; GPT Image models answer with ``b64_json`` images, which the
submitter stores and serves itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from service.errors import CallbackParseError, UpstreamNotFound
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import base, parsing
from service.providers.base import GenerationRequest, ProviderAdapter, SubmitResult

SIZES = {"1:1": "1024x1024", "2:3": "1024x1536", "3:2": "1536x1024", "auto": "auto"}
QUALITIES = ("low", "medium", "high", "auto")
MAX_IMAGES = 10
# OpenAI's documented prompt limit for GPT Image models.
MAX_PROMPT_CHARS = 32_000
# The reply comes only when the images are made (tens of seconds at high quality), so the
# shared client's 30 s read timeout would cut off most calls.
GENERATION_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)

_PIXELS_RE = re.compile(r"^(\d+)x(\d+)$")


class OpenAIAdapter(ProviderAdapter):
    name: ClassVar[str] = "openai"
    can_query_status: ClassVar[bool] = False
    submit_path: ClassVar[str] = "/v1/images/generations"
    submit_timeout: ClassVar[httpx.Timeout | None] = GENERATION_TIMEOUT

    def delivers_callbacks(self) -> bool:
        """Never: the reply to the generation request is the result."""
        return False

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt, MAX_PROMPT_CHARS)
        base.check_choice(self.name, "size", request.size, tuple(SIZES))
        base.check_choice(self.name, "quality", request.quality, QUALITIES)
        base.check_count(self.name, request.n, 1, MAX_IMAGES)
        if request.image_urls:
            raise base.rejected(
                self.name,
                "image_urls",
                "reference images need OpenAI's edits endpoint, which TaskRelay does not use; "
                "send the task without image_urls or use another provider",
                accepted=[],
            )

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        # callback_url is not sent: OpenAI has no callbacks.
        model = request.model or self.settings.model
        return base.request_body(
            model=model,
            prompt=request.prompt,
            n=request.n,
            size=None if request.size is None else SIZES[request.size],
            quality=request.quality,
            # GPT Image models always answer with base64 images, and refuse the field (a 400,
            # "Unknown parameter"), whatever their name (`chatgpt-image-latest`); DALL-E
            # models, which a task may name, answer with links that expire within the hour
            # unless asked for base64, which TaskRelay stores and serves.
            response_format="b64_json" if model.startswith("dall-e") else None,
        )

    def parse_submit_reply(self, status_code: int, body: Any) -> SubmitResult:
        update = parsing.parse_reply(self.name, status_code, body, self._result)
        return SubmitResult(update=update, expects_callback=False)

    def parse_status(self, status_code: int, body: Any) -> TaskUpdate:
        """OpenAI has no status answer; the generation reply is the only state it reports."""
        return self.parse_submit_reply(status_code, body).update

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> TaskUpdate:
        raise CallbackParseError(
            "OpenAI sends no callbacks: its reply to the generation request is the result."
        )

    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        raise UpstreamNotFound(
            "OpenAI has no status endpoint: its generation call is synchronous and its reply "
            "is the result, so there is nothing to ask about afterwards.",
            provider=self.name,
            details={"provider_task_id": provider_task_id, "reason": "no_status_endpoint"},
        )

    def _result(self, body: Any) -> TaskUpdate:
        reply = parsing.require_object(body, "the generation reply")
        parsing.check_error_body(self.name, reply)
        data = reply.get("data")
        if not isinstance(data, list) or not data:
            raise parsing.BodyShapeError(
                f"expected `data` to be a non-empty array of images, got {parsing.json_type(data)}"
            )
        width_height = _pixels(reply.get("size"))
        images: list[dict[str, Any]] = []
        for item in data:
            entry = parsing.require_object(item, "each entry of `data`")
            b64 = entry.get("b64_json")
            url = parsing.image_url(entry.get("url"))
            if isinstance(b64, str) and b64:
                image: dict[str, Any] = {"b64_json": b64}
            elif url is not None:
                image = {"url": url}
            else:
                raise parsing.BodyShapeError(
                    "expected each image to carry `b64_json` or an absolute http(s) `url`"
                )
            images.append({**image, **width_height})
        return TaskUpdate(status=TaskStatus.succeeded, progress=100, images=tuple(images))


def _pixels(size: Any) -> dict[str, int]:
    """``"1024x1536"`` -> width and height (newer replies echo the size)."""
    match = _PIXELS_RE.match(size) if isinstance(size, str) else None
    if match is None:
        return {}
    return {"width": int(match.group(1)), "height": int(match.group(2))}
