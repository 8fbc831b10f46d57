"""gptimage15.ai (``POST /api/generate``, ``GET /api/status?task_id=``).

Replies and errors follow seed 001: ``{"code": 200, "data": {...}}`` and
``{"code": <HTTP status>, "message": "...", "data": null}``. Task ids look like the seed's
(``n36`` + 12 characters + ``gptimg``). A status answer always carries ``task_id``, ``status``,
``response`` (URLs on success, else null), ``error_message`` (null unless failed),
``consumed_credits`` (10, or 0 once failed), ``created_at`` and the submitted ``request``.
The callback body is that same envelope.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
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

    def endpoints(self) -> list[BaseRoute]:
        return [
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/status", self.status, methods=["GET"]),
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
        prefix = _PREFIXES.get(status, "Error")
        body = {"code": status, "message": f"{prefix}: {message}", "data": None}
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))

    async def generate(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = await self.read_object(request)
            prompt = require_prompt(body, max_chars=2000)
            size = choice(body, "size", SIZES, "1024*1024")
            quality = choice(body, "quality", QUALITIES, "medium")
            url_list(body, "images", low=1, high=16)
            choice(body, "input_fidelity", FIDELITIES, "high")
            hook = callback_url(body, "callback_url")
            behaviour = self.behaviour_for(prompt)
        except Invalid as exc:
            return self.invalid(exc)
        failure = await self.submit_failure(behaviour)
        if failure is not None:
            return failure

        task = self.new_task(
            request,
            f"n36{random_token(12)}gptimg",
            behaviour,
            body,
            aspect=ASPECTS[size],
            quality=quality,
            mode="callback" if hook else "poll",
            callback_url=hook,
        )
        return JSONResponse({"code": 200, "data": {"task_id": task.id, "status": "IN_PROGRESS"}})

    async def status(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        task_id = request.query_params.get("task_id")
        if not task_id:
            return self.error(400, "'task_id' is required.")
        task = self.task(task_id)
        if task is None:
            return self.error(404, "task not found.")
        failure = await self.status_failure(task)
        if failure is not None:
            return failure
        return JSONResponse(self.envelope(task, self.view(task)))

    def envelope(self, task: SandboxTask, view: View) -> dict[str, Any]:
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

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return self.envelope(task, view)
