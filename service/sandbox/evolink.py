"""EvoLink (``POST /v1/images/generations``, ``GET /v1/tasks/{id}``): the task object.

The submit reply is the task object exactly as seed 002 shows it. A status answer and a callback
body are the same object (bare, no envelope) with ``status`` pending / processing / completed /
failed, ``progress`` 0-100, ``results`` (URL strings) once completed and ``error``
(``{"code", "message"}``) once failed. ``task_info.can_cancel`` turns false once final.

Errors (not shown by the seeds) use an OpenAI-like shape:
``{"error": {"code": "<string>", "message", "type", "param"}}``.

The prompt limit (2000 tokens, seed 002) is counted with TaskRelay's own estimate
(:func:`service.providers.evolink.estimated_tokens`), so that the adapter never sends a prompt
the sandbox refuses, nor refuses one the sandbox would take.

Real EvoLink accepts only HTTPS callback URLs on public addresses; the sandbox also takes http
and local addresses because everything it talks to is local. A failed callback delivery
(non-2xx or no answer) is retried 3 times, ``callback_retry_backoff * k`` seconds apart.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from service.providers.evolink import MAX_PROMPT_TOKENS, estimated_tokens
from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    Submission,
    callback_url,
    choice,
    failure_code,
    integer,
    require_prompt,
    string,
    url_list,
)
from service.sandbox.tasks import SandboxTask, View, random_token

SIZES = ("1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024")
ASPECTS = {"1024x1024": "1:1", "1024x1536": "2:3", "1536x1024": "3:2"}
QUALITIES = ("low", "medium", "high")
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
    submit_path = "/v1/images/generations"
    status_route = ("GET", "/v1/tasks/{task_id}")
    callback_retries = 3

    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        kind, default_code = _ERRORS.get(status, ("api_error", "error"))
        error = {"code": code or default_code, "message": message, "type": kind}
        if param is not None:
            error["param"] = param
        return {"error": error}

    def parse_submit(self, body: dict[str, Any]) -> Submission:
        model = string(body, "model", "gpt-image-1.5")
        prompt = require_prompt(body)
        # TaskRelay's own estimate: its EvoLink adapter never sends a prompt refused here.
        if estimated_tokens(prompt) > MAX_PROMPT_TOKENS:
            raise Invalid("prompt", f"'prompt' must be at most {MAX_PROMPT_TOKENS} tokens.")
        size = choice(body, "size", SIZES, "1:1")
        quality = choice(body, "quality", QUALITIES, "high")
        url_list(body, "image_urls", low=1, high=16)
        n = integer(body, "n", 1, 10, 1)
        hook = callback_url(body, "callback_url", max_length=2048)
        return Submission(
            prompt,
            model=model,
            n=n,
            aspect=ASPECTS.get(size, size),
            quality=quality,
            callback_url=hook,
        )

    def new_task_id(self, created_unix: int) -> str:
        return f"task-unified-{created_unix}-{random_token(8)}"

    async def submit_reply(self, task: SandboxTask) -> Response:
        # The submit reply is always the fresh task, as the seed shows it.
        return JSONResponse(self.status_body(task, View("queued", 0)))

    def status_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
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
            body["error"] = {"code": failure_code(reason), "message": reason}
        return body
