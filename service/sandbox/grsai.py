"""GrsAI (``/v1/draw/completions``, ``/v1/draw/result``): stream, poll or webHook callback.

- ``webHook`` absent, null or "": the reply is a ``text/event-stream`` of ``data: {json}\\n\\n``
  lines, about ten spread over the duration; the last has progress 100 and the final status.
- ``webHook: "-1"``: ``{"code": 0, "msg": "success", "data": {"id"}}`` at once, for polling.
- ``webHook: <http(s) URL>``: the same reply, and the status envelope is POSTed there when done.

Every error, HTTP status included, is ``{"code": -1, "msg": "...", "data": null}``. A status
query for an unknown id answers HTTP 404 with that body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    callback_url,
    choice,
    integer,
    require_prompt,
    string,
    url_list,
)
from service.sandbox.png import NOMINAL_SIZES
from service.sandbox.tasks import SandboxTask, View

SIZES = ("auto", "1:1", "3:2", "2:3")
POLL = "-1"
# Progress lines in a streamed reply (the final line comes on top).
STREAM_LINES = 10
STATUSES = {"queued": "running", "running": "running", "succeeded": "succeeded", "failed": "failed"}


class GrsAIEmulator(ProviderEmulator):
    name = "grsai"

    def endpoints(self) -> list[BaseRoute]:
        return [
            Route("/v1/draw/completions", self.draw, methods=["POST"]),
            Route("/v1/draw/result", self.result, methods=["POST"]),
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
        body = {"code": -1, "msg": message, "data": None}
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))

    async def draw(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = await self.read_object(request)
            prompt = require_prompt(body)
            model = string(body, "model", None)
            size = choice(body, "size", SIZES, "auto")
            variants = integer(body, "variants", 1, 2, 1)
            url_list(body, "urls")
            web_hook = body.get("webHook")
            if web_hook is None or web_hook == "":
                mode, hook = "stream", None
            elif web_hook == POLL:
                mode, hook = "poll", None
            else:
                mode, hook = "callback", callback_url(body, "webHook")
            behaviour = self.behaviour_for(prompt)
        except Invalid as exc:
            return self.invalid(exc)
        failure = await self.submit_failure(behaviour)
        if failure is not None:
            return failure

        task = self.new_task(
            request,
            uuid.uuid4().hex,
            behaviour,
            body,
            model=model,
            n=variants,
            aspect="1:1" if size == "auto" else size,
            mode=mode,
            callback_url=hook,
        )
        if mode == "stream":
            return StreamingResponse(self.stream(task), media_type="text/event-stream")
        return JSONResponse({"code": 0, "msg": "success", "data": {"id": task.id}})

    async def stream(self, task: SandboxTask) -> AsyncIterator[str]:
        previous: View | None = None
        for line in range(STREAM_LINES):
            at = task.created_at + task.behaviour.duration * line / STREAM_LINES
            await self.sandbox.sleep_until(at)
            view = self.view(task)
            if view.final:
                break
            # A reader that fell behind gets no repeated lines, only news.
            if view != previous:
                yield _sse(self.stream_line(task, view))
            previous = view
        await self.sandbox.sleep_until(task.finish_at)
        yield _sse(self.stream_line(task, task.view(task.finish_at)))

    async def result(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = await self.read_object(request)
        except Invalid as exc:
            return self.invalid(exc)
        task_id = body.get("id")
        if not isinstance(task_id, str) or not task_id:
            return self.error(400, "'id' is required.")
        task = self.task(task_id)
        if task is None:
            return self.error(404, f"task not found: {task_id}")
        failure = await self.status_failure(task)
        if failure is not None:
            return failure
        return JSONResponse(self.envelope(task, self.view(task)))

    def data(self, task: SandboxTask, view: View) -> dict[str, Any]:
        width, height = NOMINAL_SIZES[task.aspect]
        results = (
            [{"url": url, "width": width, "height": height} for url in task.image_urls()]
            if view.phase == "succeeded"
            else []
        )
        return {
            "id": task.id,
            "status": STATUSES[view.phase],
            "progress": view.progress,
            "results": results,
            "failure_reason": task.failure_reason if view.phase == "failed" else "",
        }

    def stream_line(self, task: SandboxTask, view: View) -> dict[str, Any]:
        data = self.data(task, view)
        first = data["results"][0] if data["results"] else {"url": "", "width": 0, "height": 0}
        return {**data, "url": first["url"], "width": first["width"], "height": first["height"]}

    def envelope(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return {"code": 0, "msg": "success", "data": self.data(task, view)}

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return self.envelope(task, view)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
