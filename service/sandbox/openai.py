"""OpenAI's Images API (``POST /v1/images/generations``): synchronous, base64 PNGs.

The request waits the task's ``duration``, then answers the images, or the failure as an OpenAI
error (``content_policy_violation`` with HTTP 400 when the failure reason mentions a policy,
else ``server_error`` with HTTP 500). There is no task id, status endpoint or callback; the
sandbox still records each call as a task (id ``openai-<hex>``) for the control API.
``GET /v1/models`` lists the image models (what ``taskrelay doctor`` asks to check a key).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    Submission,
    choice,
    failure_code,
    integer,
    require_prompt,
    string,
)
from service.sandbox.png import placeholder_png
from service.sandbox.tasks import SandboxTask

SIZES = ("1024x1024", "1024x1536", "1536x1024", "auto")
QUALITIES = ("low", "medium", "high", "auto")
ASPECTS = {"1024x1024": "1:1", "1024x1536": "2:3", "1536x1024": "3:2", "auto": "1:1"}
# The size a reply reports ("auto" comes out square).
SIZES_BY_ASPECT = {"1:1": "1024x1024", "2:3": "1024x1536", "3:2": "1536x1024"}
# Image output tokens per image (square, non-square), as OpenAI bills them.
OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}

# GET /v1/models: the image models, with a fixed creation time (Unix seconds).
MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
MODELS_CREATED = 1745000000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class OpenAIEmulator(ProviderEmulator):
    name = "openai"
    submit_path = "/v1/images/generations"

    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        if code is None and status == 400:
            code = "invalid_value"
        error_type = _ERROR_TYPES.get(status, "server_error")
        return {"error": {"message": message, "type": error_type, "param": param, "code": code}}

    def unauthorized(self) -> Response:
        return self.error(401, "Incorrect API key provided. (sandbox)", code="invalid_api_key")

    def invalid(self, exc: Invalid) -> Response:
        code = "missing_required_parameter" if "required" in exc.message else None
        return self.error(400, exc.message, param=exc.param, code=code)

    def routes(self) -> list[BaseRoute]:
        return [*super().routes(), Route("/v1/models", self.models, methods=["GET"])]

    async def models(self, request: Request) -> Response:
        """The model list, as OpenAI's (only its image models here)."""
        if not self.authorized(request):
            return self.unauthorized()
        listed = [
            {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "system"}
            for model in MODELS
        ]
        return JSONResponse({"object": "list", "data": listed})

    def parse_submit(self, body: dict[str, Any]) -> Submission:
        prompt = require_prompt(body, max_chars=32000)
        model = string(body, "model", "gpt-image-1")
        size = choice(body, "size", SIZES, "auto")
        quality = choice(body, "quality", QUALITIES, "auto")
        n = integer(body, "n", 1, 10, 1)
        aspect = ASPECTS[size]
        return Submission(prompt, model=model, n=n, aspect=aspect, quality=quality, mode="sync")

    def new_task_id(self, created_unix: int) -> str:
        return f"openai-{uuid.uuid4().hex}"

    async def submit_reply(self, task: SandboxTask) -> Response:
        """Wait the task's duration, then answer its images or its failure."""
        await self.sandbox.hold_until(task.finish_at)
        if task.outcome == "failed":
            reason = task.behaviour.failure_reason
            code = failure_code(reason)
            return self.error(400 if code == "content_policy_violation" else 500, reason, code=code)
        return JSONResponse(self.result(task))

    def result(self, task: SandboxTask) -> dict[str, Any]:
        # "auto" is billed, and reported, as medium.
        quality = "medium" if task.quality == "auto" else str(task.quality)
        square, other = OUTPUT_TOKENS[quality]
        output_tokens = (square if task.aspect == "1:1" else other) * task.n
        input_tokens = len(str(task.request["prompt"]).split())
        return {
            "created": task.created_unix,
            "data": [
                {"b64_json": base64.b64encode(placeholder_png(task.id, i, task.aspect)).decode()}
                for i in range(task.n)
            ],
            "background": "opaque",
            "output_format": "png",
            "quality": quality,
            "size": SIZES_BY_ASPECT[task.aspect],
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
