"""EvoLink (``POST /v1/images/generations``, ``GET /v1/tasks/{id}``): the task object.

The submit reply is the task object exactly as seed 002 shows it. A status answer and a callback
body are the same object (bare, no envelope) with ``status`` pending / processing / completed /
failed, ``progress`` 0-100, ``results`` (URL strings) once completed and ``error``
(``{"code", "message"}``) once failed. ``task_info.can_cancel`` turns false once final.

Errors (not shown by the seeds) use an OpenAI-like shape:
``{"error": {"code": "<string>", "message", "type", "param"}}``.

Real EvoLink accepts only HTTPS callback URLs on public addresses; the sandbox also takes http
and local addresses because everything it talks to is local. A failed callback delivery
(non-2xx or no answer) is retried 3 times, ``callback_retry_backoff * k`` seconds apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    callback_url,
    choice,
    estimate_tokens,
    integer,
    require_prompt,
    string,
    url_list,
)
from service.sandbox.tasks import SandboxTask, View, random_token

SIZES = ("1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024")
ASPECTS = {"1024x1024": "1:1", "1024x1536": "2:3", "1536x1024": "3:2"}
QUALITIES = ("low", "medium", "high")
MAX_PROMPT_TOKENS = 2000
STATUSES = {
    "queued": "pending",
    "running": "processing",
    "succeeded": "completed",
    "failed": "failed",
}
# Credits reserved per image (seed 002's example value).
CREDITS_PER_IMAGE = 1.836

_ERRORS = {
    400: ("invalid_request_error", "invalid_parameter"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "task_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("api_error", "internal_error"),
    503: ("api_error", "service_unavailable"),
    504: ("api_error", "timeout"),
}


class EvoLinkEmulator(ProviderEmulator):
    name = "evolink"
    callback_retries = 3

    def endpoints(self) -> list[BaseRoute]:
        return [
            Route("/v1/images/generations", self.generate, methods=["POST"]),
            Route("/v1/tasks/{task_id}", self.status, methods=["GET"]),
        ]

    def error(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        kind, default_code = _ERRORS.get(status, ("api_error", "error"))
        body = {"error": {"code": code or default_code, "message": message, "type": kind}}
        if param is not None:
            body["error"]["param"] = param
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))

    async def generate(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = await self.read_object(request)
            model = string(body, "model", "gpt-image-1.5")
            prompt = require_prompt(body)
            if estimate_tokens(prompt) > MAX_PROMPT_TOKENS:
                raise Invalid("prompt", f"'prompt' must be at most {MAX_PROMPT_TOKENS} tokens.")
            size = choice(body, "size", SIZES, "1:1")
            quality = choice(body, "quality", QUALITIES, "high")
            url_list(body, "image_urls", low=1, high=16)
            n = integer(body, "n", 1, 10, 1)
            hook = callback_url(body, "callback_url", max_length=2048)
            behaviour = self.behaviour_for(prompt)
        except Invalid as exc:
            return self.invalid(exc)
        failure = await self.submit_failure(behaviour)
        if failure is not None:
            return failure

        created = int(time.time())
        task = self.new_task(
            request,
            f"task-unified-{created}-{random_token(8)}",
            behaviour,
            body,
            model=model,
            n=n,
            aspect=ASPECTS.get(size, size),
            quality=quality,
            mode="callback" if hook else "poll",
            callback_url=hook,
        )
        task.created_unix = created
        # The submit reply is always the fresh task, as the seed shows it.
        return JSONResponse(self.task_object(task, View("queued", 0)))

    async def status(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        task_id = request.path_params["task_id"]
        task = self.task(task_id)
        if task is None:
            return self.error(404, f"Task not found: {task_id}")
        failure = await self.status_failure(task)
        if failure is not None:
            return failure
        return JSONResponse(self.task_object(task, self.view(task)))

    def task_object(self, task: SandboxTask, view: View) -> dict[str, Any]:
        body: dict[str, Any] = {
            "created": task.created_unix,
            "id": task.id,
            "model": task.model,
            "object": "image.generation.task",
            "progress": view.progress,
            "status": STATUSES[view.phase],
            "task_info": {
                "can_cancel": not view.final,
                "estimated_time": task.behaviour.effective_estimated_time,
            },
            "type": "image",
            "usage": {
                "billing_rule": "per_call",
                "credits_reserved": round(CREDITS_PER_IMAGE * task.n, 3),
                "user_group": "default",
            },
        }
        if view.phase == "succeeded":
            body["results"] = task.image_urls()
        elif view.phase == "failed":
            reason = task.behaviour.failure_reason
            code = "content_policy_violation" if "policy" in reason.lower() else "generation_failed"
            body["error"] = {"code": code, "message": reason}
        return body

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return self.task_object(task, view)
