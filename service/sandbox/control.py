"""The control API under ``/_sandbox/``: inspect tasks, change behaviour, reset.

- ``GET  /_sandbox/tasks``                  every task (``?provider=`` filters), oldest first
- ``GET  /_sandbox/tasks/{id}``             one task, or 404
- ``GET  /_sandbox/behaviour``              the current defaults per provider (and ``*``)
- ``PUT  /_sandbox/behaviour/{provider|*}`` a JSON object of knobs: change the defaults
- ``POST /_sandbox/reset``                  forget all tasks, cancel callbacks, restore defaults

Like the provider APIs, it answers only requests bearing ``Authorization: Bearer <api_key>``.
Errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.behaviour import BehaviourError
from service.sandbox.common import has_api_key

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def control_routes(sandbox: Sandbox) -> list[BaseRoute]:
    def authorized(request: Request) -> bool:
        return has_api_key(request, sandbox.api_key)

    def unauthorized() -> JSONResponse:
        return _error(401, "unauthorized", "Send Authorization: Bearer <the sandbox api key>.")

    async def list_tasks(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        provider = request.query_params.get("provider")
        now = sandbox.clock()
        return JSONResponse(
            [
                task.to_json(now)
                for task in list(sandbox.tasks.values())
                if provider is None or task.provider == provider
            ]
        )

    async def get_task(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        task = sandbox.tasks.get(request.path_params["task_id"])
        if task is None:
            return _error(404, "task_not_found", "No sandbox task has this id.")
        return JSONResponse(task.to_json(sandbox.clock()))

    def behaviours() -> dict[str, Any]:
        names = ["*", *sandbox.emulators]
        return {name: sandbox.behaviour_for(name).to_json() for name in names}

    async def get_behaviour(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return JSONResponse(behaviours())

    async def put_behaviour(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        provider: str = request.path_params["provider"]
        try:
            knobs = json.loads(await request.body() or b"{}")
        # ValueError also covers numbers longer than int() accepts, not only malformed JSON.
        except (ValueError, RecursionError):
            return _error(400, "invalid_json", "The body must be a JSON object of knobs.")
        if not isinstance(knobs, dict):
            return _error(400, "invalid_json", "The body must be a JSON object of knobs.")
        try:
            sandbox.set_behaviour(provider, knobs)
        except KeyError:
            return _error(404, "unknown_provider", f"No provider {provider!r} in the sandbox.")
        except BehaviourError as exc:
            return _error(400, "invalid_knob", str(exc))
        return JSONResponse(behaviours())

    async def reset(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        await sandbox.reset()
        return JSONResponse({"reset": True})

    return [
        Route("/tasks", list_tasks, methods=["GET"]),
        Route("/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/behaviour", get_behaviour, methods=["GET"]),
        Route("/behaviour/{provider}", put_behaviour, methods=["PUT"]),
        Route("/reset", reset, methods=["POST"]),
    ]
