"""gptimage15.ai (``POST /api/generate``, ``GET /api/status?task_id=``).

Every answer is an envelope ``{"code", "message"?, "data"}``; a ``code`` other than 200 is an
error even when the HTTP status is 200. There is no model field: the site runs one model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from service.models import TaskStatus
from service.providers import base, parsing
from service.providers.base import GenerationRequest, StatusQuery, TaskEndpointAdapter

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


class GPTImage15Adapter(TaskEndpointAdapter):
    name: ClassVar[str] = "gptimage15"
    submit_path: ClassVar[str] = "/api/generate"
    ok_codes: ClassVar[tuple[int, ...]] = OK_CODES
    statuses: ClassVar[Mapping[str, TaskStatus]] = STATUSES
    documented_statuses: ClassVar[str] = "PENDING, IN_PROGRESS, SUCCESS, FAILED"
    default_failure: ClassVar[str] = DEFAULT_FAILURE
    images_where: ClassVar[str] = "`response`"

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
        return base.request_body(
            prompt=request.prompt,
            size=None if request.size is None else SIZES[request.size],
            quality=request.quality,
            images=list(request.image_urls),
            callback_url=callback_url,
        )

    def status_query(self, provider_task_id: str) -> StatusQuery:
        return StatusQuery("GET", "/api/status", params={"task_id": provider_task_id})

    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        return parsing.image_list(task.get("response"))

    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        return task.get("error_message")
