"""OpenAI's Images API (``POST /v1/images/generations``): synchronous, base64 PNGs.

The request waits the task's ``duration``, then answers the images, or the failure as an OpenAI
error (``content_policy_violation`` with HTTP 400 when the failure reason mentions a policy,
else ``server_error`` with HTTP 500). There is no task id, status endpoint or callback; the
sandbox still records each call as a task (id ``openai-<hex>``) for the control API.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    choice,
    integer,
    require_prompt,
    string,
)
from service.sandbox.png import placeholder_png
from service.sandbox.tasks import SandboxTask

SIZES = ("1024x1024", "1024x1536", "1536x1024", "auto")
QUALITIES = ("low", "medium", "high", "auto")
ASPECTS = {"1024x1024": "1:1", "1024x1536": "2:3", "1536x1024": "3:2", "auto": "1:1"}
# Image output tokens per image (square, non-square), as OpenAI bills them.
OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}

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

    def endpoints(self) -> list[BaseRoute]:
        return [Route("/v1/images/generations", self.generate, methods=["POST"])]

    def error(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        if code is None and status == 400:
            code = "invalid_value"
        body = {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "server_error"),
                "param": param,
                "code": code,
            }
        }
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))

    async def generate(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.error(401, "Incorrect API key provided. (sandbox)", code="invalid_api_key")
        try:
            body = await self.read_object(request)
            prompt = require_prompt(body, max_chars=32000)
            model = string(body, "model", "gpt-image-1")
            size = choice(body, "size", SIZES, "auto")
            quality = choice(body, "quality", QUALITIES, "auto")
            n = integer(body, "n", 1, 10, 1)
            behaviour = self.behaviour_for(prompt)
        except Invalid as exc:
            code = "missing_required_parameter" if "required" in exc.message else None
            return self.error(400, exc.message, param=exc.param, code=code)
        failure = await self.submit_failure(behaviour)
        if failure is not None:
            return failure

        task = self.new_task(
            request,
            f"openai-{uuid.uuid4().hex}",
            behaviour,
            body,
            model=model,
            n=n,
            aspect=ASPECTS[size],
            quality=quality,
            mode="sync",
        )
        await self.sandbox.sleep_until(task.finish_at)
        if task.outcome == "failed":
            reason = behaviour.failure_reason
            if "policy" in reason.lower():
                return self.error(400, reason, code="content_policy_violation")
            return self.error(500, reason, code="generation_failed")
        return JSONResponse(self.result(task, prompt, size, quality))

    def result(self, task: SandboxTask, prompt: str, size: str, quality: str) -> dict[str, Any]:
        resolved_quality = "medium" if quality == "auto" else quality
        square, other = OUTPUT_TOKENS[resolved_quality]
        output_tokens = (square if task.aspect == "1:1" else other) * task.n
        input_tokens = len(prompt.split())
        return {
            "created": task.created_unix,
            "data": [
                {"b64_json": base64.b64encode(placeholder_png(task.id, i, task.aspect)).decode()}
                for i in range(task.n)
            ],
            "background": "opaque",
            "output_format": "png",
            "quality": resolved_quality,
            "size": "1024x1024" if size == "auto" else size,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
