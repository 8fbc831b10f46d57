"""GrsAI (``/v1/draw/completions``, ``/v1/draw/result``): stream, poll or webHook callback.

- ``webHook`` absent, null or "": the reply is a ``text/event-stream`` of ``data: {json}\\n\\n``
  lines, about ten spread over the duration: ``{"progress"}`` only, then a last line with
  progress 100, the final ``status`` and ``url``, ``width``, ``height``, ``failure_reason``
  (the first image only: the seed shows one). No line carries the task id.
- ``webHook: "-1"``: ``{"code": 0, "msg": "success", "data": {"id"}}`` at once, for polling.
- ``webHook: <http(s) URL>``: the same reply, and the status envelope is POSTed there when done.

Every error, HTTP status included, is ``{"code": -1, "msg": "...", "data": null}``. A status
query for an unknown id answers HTTP 404 with that body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from service.sandbox.common import (
    Invalid,
    ProviderEmulator,
    Submission,
    callback_url,
    choice,
    integer,
    json_object,
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
    submit_path = "/v1/draw/completions"
    status_route = ("POST", "/v1/draw/result")
    task_not_found = "task not found: {task_id}"

    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        return {"code": -1, "msg": message, "data": None}

    def parse_submit(self, body: dict[str, Any]) -> Submission:
        prompt = require_prompt(body)
        model = string(body, "model", None)
        size = choice(body, "size", SIZES, "auto")
        variants = integer(body, "variants", 1, 2, 1)
        url_list(body, "urls")
        web_hook = body.get("webHook")
        stream = web_hook is None or web_hook == ""
        return Submission(
            prompt,
            model=model,
            n=variants,
            aspect="1:1" if size == "auto" else size,
            mode="stream" if stream else None,
            callback_url=None if stream or web_hook == POLL else callback_url(body, "webHook"),
        )

    def new_task_id(self, created_unix: int) -> str:
        return uuid.uuid4().hex

    async def submit_reply(self, task: SandboxTask) -> Response:
        if task.mode == "stream":
            return StreamingResponse(self.stream(task), media_type="text/event-stream")
        return JSONResponse({"code": 0, "msg": "success", "data": {"id": task.id}})

    async def stream(self, task: SandboxTask) -> AsyncIterator[str]:
        previous: View | None = None
        for line in range(STREAM_LINES):
            at = task.created_at + task.behaviour.duration * line / STREAM_LINES
            await self.sandbox.hold_until(at)
            view = self.view(task)
            if view.final:
                break
            # A reader that fell behind gets no repeated lines, only news.
            if view != previous:
                yield _sse(self.stream_line(task, view))
            previous = view
        await self.sandbox.hold_until(task.finish_at)
        yield _sse(self.stream_line(task, task.view(task.finish_at)))

    async def status_task_id(self, request: Request) -> str:
        task_id = json_object(await request.body()).get("id")
        if not isinstance(task_id, str) or not task_id:
            raise Invalid("id", "'id' is required.")
        return task_id

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
        """A line as seed 000 shows them: only ``progress`` until the last, which adds the
        ``status`` and the image (``url``, ``width``, ``height``) or the ``failure_reason``.
        No line names the task (no ``id``), nor lists ``results``."""
        if not view.final:
            return {"progress": view.progress}
        data = self.data(task, view)
        first = data["results"][0] if data["results"] else {"url": "", "width": 0, "height": 0}
        return {
            "progress": view.progress,
            "status": data["status"],
            "url": first["url"],
            "width": first["width"],
            "height": first["height"],
            "failure_reason": data["failure_reason"],
        }

    def status_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        return {"code": 0, "msg": "success", "data": self.data(task, view)}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
