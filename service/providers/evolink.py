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

from service.models import TaskStatus
from service.providers import base, parsing
from service.providers.base import GenerationRequest, StatusQuery, TaskEndpointAdapter

SIZES = ("1:1", "2:3", "3:2")
QUALITIES = ("low", "medium", "high")
MAX_IMAGES = 10
MAX_REFERENCE_IMAGES = 16
MAX_PROMPT_TOKENS = 2000
OK_CODES = (0, 200)
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


class EvoLinkAdapter(TaskEndpointAdapter):
    name: ClassVar[str] = "evolink"
    submit_path: ClassVar[str] = "/v1/images/generations"
    ok_codes: ClassVar[tuple[int, ...]] = OK_CODES
    statuses: ClassVar[Mapping[str, TaskStatus]] = STATUSES
    documented_statuses: ClassVar[str] = "pending, processing, completed, failed"
    task_id_field: ClassVar[str] = "id"
    task_id_where: ClassVar[str] = "`id`"
    default_failure: ClassVar[str] = DEFAULT_FAILURE

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
        return base.request_body(
            model=request.model or self.settings.model,
            prompt=request.prompt,
            size=request.size,
            quality=request.quality,
            n=request.n,
            image_urls=list(request.image_urls),
            callback_url=callback_url,
        )

    def status_query(self, provider_task_id: str) -> StatusQuery:
        return StatusQuery("GET", "/v1/tasks/" + quote(provider_task_id, safe=""))

    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        return parsing.image_list(task.get("results"))

    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        return task.get("error") or task.get("error_message")

    def estimated_seconds(self, task: Mapping[str, Any]) -> float | None:
        """``task_info.estimated_time``."""
        info = task.get("task_info")
        return parsing.seconds_of(info.get("estimated_time")) if isinstance(info, Mapping) else None
