"""API in One (``POST /api/v1/images/generations``, ``GET /api/v1/tasks/{id}``).

Replies follow seeds 003/004: ``{"code": 200, "message": "success", "data": {...}}``; task ids
look like the seed's (``n42`` + 12 characters + ``_gptimg``). A status answer (and the callback
body, the same envelope) carries ``task_id``, ``status`` (``IN_PROGRESS`` while queued or
running, then ``completed`` or ``failed``), ``progress``, ``results`` (URLs; empty until
completed) and ``error_message`` (null unless failed).

Errors are ``{"error": {"code": <HTTP status>, "message", "type"}}``; a validation error keeps the
seed's message "Invalid parameters" and adds ``param`` and ``detail`` naming the field.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    Submission,
    callback_url,
    choice,
    require_prompt,
    string,
    url_list,
)
from service.sandbox.tasks import SandboxTask, View, random_token

ASPECT_RATIOS = ("1:1", "2:3", "3:2")
QUALITIES = ("medium", "high")
STATUSES = {
    "queued": "IN_PROGRESS",
    "running": "IN_PROGRESS",
    "succeeded": "completed",
    "failed": "failed",
}

_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    404: "not_found",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
    504: "timeout",
}


class ApiInOneEmulator(ProviderEmulator):
    name = "apiinone"
    submit_path = "/api/v1/images/generations"
    status_route = ("GET", "/api/v1/tasks/{task_id}")
    task_not_found = "Task not found"

    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        error = {"code": status, "message": message, "type": _TYPES.get(status, "server_error")}
        return {"error": error}

    def invalid(self, exc: Invalid) -> Response:
        # The seeds' fixed message; the field and the reason come on top.
        body = self.error_body(400, "Invalid parameters", param=None, code=None)
        body["error"] |= {"param": exc.param, "detail": exc.message}
        return JSONResponse(body, status_code=400)

    def parse_submit(self, body: dict[str, Any]) -> Submission:
        model = string(body, "model", None)
        if model is None:
            raise Invalid("model", "'model' is required.")
        prompt = require_prompt(body)
        aspect = choice(body, "aspect_ratio", ASPECT_RATIOS, "1:1")
        quality = choice(body, "quality", QUALITIES, "medium")
        url_list(body, "input_urls", low=1, high=16)
        hook = callback_url(body, "callback_url")
        return Submission(prompt, model=model, aspect=aspect, quality=quality, callback_url=hook)

    def new_task_id(self, created_unix: int) -> str:
        return f"n42{random_token(12)}_gptimg"

    async def submit_reply(self, task: SandboxTask) -> Response:
        data = {"task_id": task.id, "status": "IN_PROGRESS"}
        return JSONResponse({"code": 200, "message": "success", "data": data})

    def status_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return {
            "code": 200,
            "message": "success",
            "data": {
                "task_id": task.id,
                "status": STATUSES[view.phase],
                "progress": view.progress,
                "results": task.image_urls() if view.phase == "succeeded" else [],
                "error_message": task.failure_reason if view.phase == "failed" else None,
            },
        }
