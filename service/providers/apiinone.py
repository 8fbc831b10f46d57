"""API in One (``POST /api/v1/images/generations``, ``GET /api/v1/tasks/{task_id}``).

The submit reply is ``{"code": 200, "message": "success", "data": {"task_id", "status"}}``;
errors are ``{"error": {"code", "message", "type"}}``. The status answer's body is not
documented, so it is read like the submit reply (envelope or bare object), the status word in
any case, and the images from whichever of :data:`IMAGE_FIELDS` is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import base
from service.providers.base import GenerationRequest, ProviderAdapter, SubmitResult, UpdateSink

SIZES = ("1:1", "2:3", "3:2")
QUALITIES = ("medium", "high")
OK_CODES = (0, 200)
# The documented words (IN_PROGRESS, completed, failed), then the nearest spellings of the two
# final ones: missing a final word would leave a finished task waiting for its deadline.
STATUSES = {
    "in_progress": TaskStatus.running,
    "completed": TaskStatus.succeeded,
    "failed": TaskStatus.failed,
    "success": TaskStatus.succeeded,
    "succeeded": TaskStatus.succeeded,
    "failure": TaskStatus.failed,
    "error": TaskStatus.failed,
}
# Undocumented: where the image URLs may be, each a list of URL strings or {"url"} objects
# (or an object holding one of these fields).
IMAGE_FIELDS = ("results", "result_urls", "images", "output", "urls", "response", "result")
REASON_FIELDS = ("error_message", "error", "failure_reason", "fail_reason")
DEFAULT_FAILURE = "API in One reported the task as failed without giving a reason."


class APIInOneAdapter(ProviderAdapter):
    name: ClassVar[str] = "apiinone"

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt)
        base.check_choice(self.name, "size", request.size, SIZES)
        base.check_choice(self.name, "quality", request.quality, QUALITIES)
        base.check_count(self.name, request.n, 1, 1)

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.settings.model,
            "prompt": request.prompt,
        }
        if request.quality is not None:
            body["quality"] = request.quality
        if request.size is not None:
            body["aspect_ratio"] = request.size
        if request.image_urls:
            body["input_urls"] = list(request.image_urls)
        if callback_url is not None:
            body["callback_url"] = callback_url
        return body

    def parse_submit_reply(self, status_code: int, body: Any) -> SubmitResult:
        if not 200 <= status_code < 300:
            raise base.reply_error(self.name, status_code, body)
        return SubmitResult(update=base.guard_reply(self.name, lambda: self._accepted(body)))

    def parse_status(self, status_code: int, body: Any) -> TaskUpdate:
        if not 200 <= status_code < 300:
            raise base.reply_error(self.name, status_code, body)
        return base.guard_reply(
            self.name, lambda: self._task(self._object(body, "the status reply"))
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> TaskUpdate:
        """The task object, bare or in ``{"code": 200, "message", "data": {...}}``."""
        payload = base.parse_json_body(body)
        return base.guard_callback(
            self.name, lambda: self._task(base.status_object(payload, "the callback body"))
        )

    async def submit(
        self,
        request: GenerationRequest,
        *,
        callback_url: str | None,
        on_update: UpdateSink,
    ) -> SubmitResult:
        body = await base.send_json(
            self,
            "POST",
            self.url("/api/v1/images/generations"),
            json_body=self.build_submit(request, callback_url),
        )
        result = self.parse_submit_reply(200, body)
        return SubmitResult(update=result.update, expects_callback=callback_url is not None)

    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        path = "/api/v1/tasks/" + quote(provider_task_id, safe="")
        body = await base.send_json(self, "GET", self.url(path))
        return self.parse_status(200, body)

    def _object(self, body: Any, what: str) -> Mapping[str, Any]:
        reply = base.require_object(body, what)
        base.check_body_code(self.name, reply, OK_CODES)
        base.check_error_body(self.name, reply)
        return base.status_object(reply, what)

    def _accepted(self, body: Any) -> TaskUpdate:
        task = self._object(body, "the submit reply")
        task_id = _task_id(task)
        if task_id is None:
            raise base.BodyShapeError("expected the task id in `data.task_id`")
        if not isinstance(task.get("status"), str):
            return TaskUpdate(status=TaskStatus.queued, provider_task_id=task_id)
        return self._task(task)

    def _task(self, task: Mapping[str, Any]) -> TaskUpdate:
        raw = task.get("status")
        if not isinstance(raw, str) or not raw.strip():
            raise base.BodyShapeError(
                "expected a `status` string (IN_PROGRESS, completed, failed) in the object or "
                f"in its `data` object, got {base.json_type(raw)}"
            )
        status = base.status_from_word(raw, STATUSES)
        error = None
        if status is TaskStatus.failed:
            reason = next((task[key] for key in REASON_FIELDS if base.text_of(task.get(key))), None)
            error = base.failure_error(reason, DEFAULT_FAILURE)
        return TaskUpdate(
            status=status,
            progress=base.progress_of(task.get("progress")),
            images=tuple(_images(task)),
            error=error,
            provider_task_id=_task_id(task),
            raw_status=raw,
        )


def _task_id(task: Mapping[str, Any]) -> str | None:
    return base.id_of(task.get("task_id")) or base.id_of(task.get("id"))


def _images(task: Mapping[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """The first of :data:`IMAGE_FIELDS` that holds images, looking one object level down."""
    for key in IMAGE_FIELDS:
        value = task.get(key)
        images = base.image_list(value)
        if not images and isinstance(value, Mapping) and depth == 0:
            images = _images(value, depth + 1)
        if images:
            return images
    return []
