"""gptimage15.ai (``POST /api/generate``, ``GET /api/status?task_id=``).

Replies and errors follow seed 001: ``{"code": 200, "data": {...}}`` and
``{"code": <HTTP status>, "message": "...", "data": null}``. Task ids look like the seed's
(``n36`` + 12 characters + ``gptimg``). A status answer always carries ``task_id``, ``status``,
``response`` (URLs on success, else null), ``error_message`` (null unless failed),
``consumed_credits`` (10, or 0 once failed), ``created_at`` and the submitted ``request``.
The callback body is that same envelope.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    Submission,
    callback_url,
    choice,
    require_prompt,
    url_list,
)
from service.sandbox.tasks import SandboxTask, View, random_token

SIZES = ("1024*1024", "1024*1536", "1536*1024")
ASPECTS = {"1024*1024": "1:1", "1024*1536": "2:3", "1536*1024": "3:2"}
QUALITIES = ("low", "medium", "high")
FIDELITIES = ("low", "high")
STATUSES = {
    "queued": "PENDING",
    "running": "IN_PROGRESS",
    "succeeded": "SUCCESS",
    "failed": "FAILED",
}
CREDITS_PER_TASK = 10

_PREFIXES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class GptImage15Emulator(ProviderEmulator):
    name = "gptimage15"
    submit_path = "/api/generate"
    status_route = ("GET", "/api/status")
    task_not_found = "task not found."

    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        prefix = _PREFIXES.get(status, "Error")
        return {"code": status, "message": f"{prefix}: {message}", "data": None}

    def parse_submit(self, body: dict[str, Any]) -> Submission:
        prompt = require_prompt(body, max_chars=2000)
        size = choice(body, "size", SIZES, "1024*1024")
        quality = choice(body, "quality", QUALITIES, "medium")
        url_list(body, "images", low=1, high=16)
        choice(body, "input_fidelity", FIDELITIES, "high")
        hook = callback_url(body, "callback_url")
        return Submission(prompt, aspect=ASPECTS[size], quality=quality, callback_url=hook)

    def new_task_id(self, created_unix: int) -> str:
        return f"n36{random_token(12)}gptimg"

    async def submit_reply(self, task: SandboxTask) -> Response:
        return JSONResponse({"code": 200, "data": {"task_id": task.id, "status": "IN_PROGRESS"}})

    async def status_task_id(self, request: Request) -> str:
        task_id = request.query_params.get("task_id")
        if not task_id:
            raise Invalid("task_id", "'task_id' is required.")
        return task_id

    def status_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        created = datetime.fromtimestamp(task.created_unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "code": 200,
            "message": "success",
            "data": {
                "task_id": task.id,
                "status": STATUSES[view.phase],
                "response": task.image_urls() if view.phase == "succeeded" else None,
                "error_message": task.failure_reason if view.phase == "failed" else None,
                "consumed_credits": 0 if view.phase == "failed" else CREDITS_PER_TASK,
                "created_at": created,
                "request": task.request,
            },
        }
