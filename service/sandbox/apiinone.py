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

    def endpoints(self) -> list[BaseRoute]:
        return [
            Route("/api/v1/images/generations", self.generate, methods=["POST"]),
            Route("/api/v1/tasks/{task_id}", self.status, methods=["GET"]),
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
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "type": _TYPES.get(status, "server_error"),
        }
        return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))

    def invalid(self, exc: Invalid) -> Response:
        body = {
            "error": {
                "code": 400,
                "message": "Invalid parameters",
                "type": "invalid_request",
                "param": exc.param,
                "detail": exc.message,
            }
        }
        return JSONResponse(body, status_code=400)

    async def generate(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = await self.read_object(request)
            model = string(body, "model", None)
            if model is None:
                raise Invalid("model", "'model' is required.")
            prompt = require_prompt(body)
            aspect = choice(body, "aspect_ratio", ASPECT_RATIOS, "1:1")
            quality = choice(body, "quality", QUALITIES, "medium")
            url_list(body, "input_urls", low=1, high=16)
            hook = callback_url(body, "callback_url")
            behaviour = self.behaviour_for(prompt)
        except Invalid as exc:
            return self.invalid(exc)
        failure = await self.submit_failure(behaviour)
        if failure is not None:
            return failure

        task = self.new_task(
            request,
            f"n42{random_token(12)}_gptimg",
            behaviour,
            body,
            model=model,
            aspect=aspect,
            quality=quality,
            mode="callback" if hook else "poll",
            callback_url=hook,
        )
        return JSONResponse(
            {
                "code": 200,
                "message": "success",
                "data": {"task_id": task.id, "status": "IN_PROGRESS"},
            }
        )

    async def status(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        task = self.task(request.path_params["task_id"])
        if task is None:
            return self.error(404, "Task not found")
        failure = await self.status_failure(task)
        if failure is not None:
            return failure
        return JSONResponse(self.envelope(task, self.view(task)))

    def envelope(self, task: SandboxTask, view: View) -> dict[str, Any]:
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

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return self.envelope(task, view)
