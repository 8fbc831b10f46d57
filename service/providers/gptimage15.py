"""gptimage15.ai (``POST /api/generate``, ``GET /api/status?task_id=``).

Every answer is an envelope ``{"code", "message"?, "data"}``; a ``code`` other than 200 is an
error even when the HTTP status is 200. There is no model field: the site runs one model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import base
from service.providers.base import GenerationRequest, ProviderAdapter, SubmitResult, UpdateSink

SIZES = {"1:1": "1024*1024", "2:3": "1024*1536", "3:2": "1536*1024"}
QUALITIES = ("low", "medium", "high")
MAX_PROMPT_CHARS = 2000
OK_CODES = (200,)
STATUSES = {
    "pending": TaskStatus.queued,
    "in_progress": TaskStatus.running,
    "success": TaskStatus.succeeded,
    "failed": TaskStatus.failed,
}
DEFAULT_FAILURE = "gptimage15 reported the task as failed without giving a reason."


class GPTImage15Adapter(ProviderAdapter):
    name: ClassVar[str] = "gptimage15"

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt, MAX_PROMPT_CHARS)
        base.check_choice(self.name, "size", request.size, tuple(SIZES))
        base.check_choice(self.name, "quality", request.quality, QUALITIES)
        base.check_count(self.name, request.n, 1, 1)
        if request.model is not None and request.model != self.settings.model:
            raise base.rejected(
                self.name,
                "model",
                f"{request.model!r} is not available: gptimage15 runs one model and takes no "
                "model field",
                accepted=[self.settings.model],
            )

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": request.prompt}
        if request.size is not None:
            body["size"] = SIZES[request.size]
        if request.quality is not None:
            body["quality"] = request.quality
        if request.image_urls:
            body["images"] = list(request.image_urls)
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
        return base.guard_reply(self.name, lambda: self._reply(body, "the status reply"))

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> TaskUpdate:
        """The status query's ``data`` object, bare or in ``{"code": 200, "data": {...}}``."""
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
            self.url("/api/generate"),
            json_body=self.build_submit(request, callback_url),
        )
        result = self.parse_submit_reply(200, body)
        return SubmitResult(update=result.update, expects_callback=callback_url is not None)

    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        body = await base.send_json(
            self, "GET", self.url("/api/status"), params={"task_id": provider_task_id}
        )
        return self.parse_status(200, body)

    def _accepted(self, body: Any) -> TaskUpdate:
        reply = base.require_object(body, "the submit reply")
        base.check_body_code(self.name, reply, OK_CODES)
        base.check_error_body(self.name, reply)
        task = base.status_object(reply, "the submit reply")
        task_id = base.id_of(task.get("task_id"))
        if task_id is None:
            raise base.BodyShapeError("expected the task id in `data.task_id`")
        if not isinstance(task.get("status"), str):
            return TaskUpdate(status=TaskStatus.queued, provider_task_id=task_id)
        return self._task(task)

    def _reply(self, body: Any, what: str) -> TaskUpdate:
        reply = base.require_object(body, what)
        base.check_body_code(self.name, reply, OK_CODES)
        base.check_error_body(self.name, reply)
        return self._task(base.status_object(reply, what))

    def _task(self, task: Mapping[str, Any]) -> TaskUpdate:
        raw = task.get("status")
        if not isinstance(raw, str) or not raw.strip():
            raise base.BodyShapeError(
                "expected a `status` string (PENDING, IN_PROGRESS, SUCCESS, FAILED) in the "
                f"object or in its `data` object, got {base.json_type(raw)}"
            )
        status = base.status_from_word(raw, STATUSES)
        error = None
        if status is TaskStatus.failed:
            error = base.failure_error(task.get("error_message"), DEFAULT_FAILURE)
        return TaskUpdate(
            status=status,
            progress=base.progress_of(task.get("progress")),
            images=tuple(base.image_list(task.get("response"))),
            error=error,
            provider_task_id=base.id_of(task.get("task_id")),
            raw_status=raw,
        )
