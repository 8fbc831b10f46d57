"""EvoLink (``POST /v1/images/generations``, ``GET /v1/tasks/{id}``).

Answers are bare task objects (``{"id", "status", "progress", "results", "task_info", ...}``),
no envelope; one wrapped in ``{code, data}`` is read too. ``task_info.estimated_time`` is the
provider's hint, in seconds, of when to look.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import base
from service.providers.base import GenerationRequest, ProviderAdapter, SubmitResult, UpdateSink

SIZES = ("1:1", "2:3", "3:2")
QUALITIES = ("low", "medium", "high")
MAX_IMAGES = 10
MAX_REFERENCE_IMAGES = 16
MAX_PROMPT_TOKENS = 2000
STATUSES = {
    "pending": TaskStatus.queued,
    "processing": TaskStatus.running,
    "completed": TaskStatus.succeeded,
    "failed": TaskStatus.failed,
}
DEFAULT_FAILURE = "EvoLink reported the task as failed without giving a reason."


def estimated_tokens(prompt: str) -> int:
    """A rough count of the prompt's tokens, to refuse prompts clearly over EvoLink's limit.

    Four ASCII characters per token (the usual English average) and two per other character
    (CJK text runs nearer one token per character). So a prompt over 8000 ASCII characters, or
    4000 CJK characters, is refused here; a prompt near the limit may still be refused upstream.
    """
    ascii_chars = sum(1 for char in prompt if char.isascii())
    return math.ceil(ascii_chars / 4 + (len(prompt) - ascii_chars) / 2)


class EvoLinkAdapter(ProviderAdapter):
    name: ClassVar[str] = "evolink"

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt)
        tokens = estimated_tokens(request.prompt)
        if tokens > MAX_PROMPT_TOKENS:
            raise base.rejected(
                self.name,
                "prompt",
                f"about {tokens} tokens is over the limit of {MAX_PROMPT_TOKENS} tokens "
                "(estimated as 4 ASCII or 2 other characters per token)",
                accepted={"max_tokens": MAX_PROMPT_TOKENS},
            )
        base.check_choice(self.name, "size", request.size, SIZES)
        base.check_choice(self.name, "quality", request.quality, QUALITIES)
        base.check_count(self.name, request.n, 1, MAX_IMAGES)
        if len(request.image_urls) > MAX_REFERENCE_IMAGES:
            raise base.rejected(
                self.name,
                "image_urls",
                f"{len(request.image_urls)} reference images is over the limit of "
                f"{MAX_REFERENCE_IMAGES}",
                accepted={"min_items": 1, "max_items": MAX_REFERENCE_IMAGES},
            )

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.settings.model,
            "prompt": request.prompt,
        }
        if request.size is not None:
            body["size"] = request.size
        if request.quality is not None:
            body["quality"] = request.quality
        body["n"] = request.n
        if request.image_urls:
            body["image_urls"] = list(request.image_urls)
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
        """The task object (as the status query answers it), bare or in ``{code, data}``."""
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
            self.url("/v1/images/generations"),
            json_body=self.build_submit(request, callback_url),
        )
        result = self.parse_submit_reply(200, body)
        return SubmitResult(update=result.update, expects_callback=callback_url is not None)

    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        path = "/v1/tasks/" + quote(provider_task_id, safe="")
        body = await base.send_json(self, "GET", self.url(path))
        return self.parse_status(200, body)

    def _object(self, body: Any, what: str) -> Mapping[str, Any]:
        reply = base.require_object(body, what)
        base.check_body_code(self.name, reply, (0, 200))
        base.check_error_body(self.name, reply)
        return base.status_object(reply, what)

    def _accepted(self, body: Any) -> TaskUpdate:
        task = self._object(body, "the submit reply")
        if base.id_of(task.get("id")) is None:
            raise base.BodyShapeError("expected the task id in `id`")
        if not isinstance(task.get("status"), str):
            return TaskUpdate(
                status=TaskStatus.queued,
                provider_task_id=base.id_of(task.get("id")),
                estimated_seconds=_estimate(task),
            )
        return self._task(task)

    def _task(self, task: Mapping[str, Any]) -> TaskUpdate:
        raw = task.get("status")
        if not isinstance(raw, str) or not raw.strip():
            raise base.BodyShapeError(
                "expected a `status` string (pending, processing, completed, failed) in the "
                f"object or in its `data` object, got {base.json_type(raw)}"
            )
        status = base.status_from_word(raw, STATUSES)
        error = None
        if status is TaskStatus.failed:
            error = base.failure_error(
                task.get("error") or task.get("error_message"), DEFAULT_FAILURE
            )
        return TaskUpdate(
            status=status,
            progress=base.progress_of(task.get("progress")),
            images=tuple(base.image_list(task.get("results"))),
            error=error,
            provider_task_id=base.id_of(task.get("id")),
            raw_status=raw,
            estimated_seconds=_estimate(task),
        )


def _estimate(task: Mapping[str, Any]) -> float | None:
    info = task.get("task_info")
    return base.seconds_of(info.get("estimated_time")) if isinstance(info, Mapping) else None
