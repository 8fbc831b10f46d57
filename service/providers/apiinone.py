"""API in One (``POST /api/v1/images/generations``, ``GET /api/v1/tasks/{task_id}``).

The submit reply is ``{"code": 200, "message": "success", "data": {"task_id", "status"}}``;
errors are ``{"error": {"code", "message", "type"}}``. The status answer's body is not
documented, so it is read like the submit reply (envelope or bare object), the status word in
any case, and the images from the first of :data:`IMAGE_FIELDS` that holds absolute http(s)
URLs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from service.models import TaskStatus
from service.providers import base, parsing
from service.providers.base import GenerationRequest, StatusQuery, TaskEndpointAdapter

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


class APIInOneAdapter(TaskEndpointAdapter):
    name: ClassVar[str] = "apiinone"
    submit_path: ClassVar[str] = "/api/v1/images/generations"
    ok_codes: ClassVar[tuple[int, ...]] = OK_CODES
    statuses: ClassVar[Mapping[str, TaskStatus]] = STATUSES
    documented_statuses: ClassVar[str] = "IN_PROGRESS, completed, failed"
    default_failure: ClassVar[str] = DEFAULT_FAILURE
    images_where: ClassVar[str] = "any of " + ", ".join(f"`{key}`" for key in IMAGE_FIELDS)

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt)
        base.check_choice(self.name, "size", request.size, SIZES)
        base.check_choice(self.name, "quality", request.quality, QUALITIES)
        base.check_count(self.name, request.n, 1, 1)

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        return base.request_body(
            model=request.model or self.settings.model,
            prompt=request.prompt,
            quality=request.quality,
            aspect_ratio=request.size,
            input_urls=list(request.image_urls),
            callback_url=callback_url,
        )

    def status_query(self, provider_task_id: str) -> StatusQuery:
        return StatusQuery("GET", "/api/v1/tasks/" + parsing.path_segment(provider_task_id))

    def task_id_of(self, task: Mapping[str, Any]) -> str | None:
        return parsing.id_of(task.get("task_id")) or parsing.id_of(task.get("id"))

    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        return _images(task)

    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        return next((task[key] for key in REASON_FIELDS if parsing.text_of(task.get(key))), None)


def _images(task: Mapping[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """The first of :data:`IMAGE_FIELDS` that holds images (absolute http(s) URLs), looking one
    object level down; a field holding something else (``"result": "ok"``) is passed over."""
    for key in IMAGE_FIELDS:
        value = task.get(key)
        images = parsing.image_list(value)
        if not images and isinstance(value, Mapping) and depth == 0:
            images = _images(value, depth + 1)
        if images:
            return images
    return []
