"""EvoLink (``POST /v1/images/generations``, ``GET /v1/tasks/{id}``).

Answers are bare task objects (``{"id", "status", "progress", "results", "task_info", ...}``),
no envelope; one wrapped in ``{code, data}`` is read too. ``task_info.estimated_time`` is the
provider's hint, in seconds, of when to look.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

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


# Scripts whose characters are a token each: CJK ideographs (and their extensions and
# compatibility forms), kana, Hangul, and CJK punctuation and full-width forms.
_WIDE_SCRIPTS = re.compile(
    "[\u2e80-\u2fdf\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
    "\U00020000-\U0003134f]"
)


def estimated_tokens(prompt: str) -> int:
    """A rough count of the prompt's tokens, to refuse prompts over EvoLink's 2000-token limit
    (seed 002) before they are sent.

    A CJK, kana or Hangul character is a token (such text runs at about one token per
    character); any other non-ASCII character (Cyrillic, Greek, accented Latin) half a token,
    since tokenizers take such words in pieces of two or more characters. ASCII text is a
    token per four characters (the usual English average), but never fewer than its words,
    so short words each count as one. So 8000 ASCII characters of ordinary text, or 2000 CJK
    characters, are the most a prompt can hold. The sandbox's EvoLink validates with this
    same function, so the two always agree; the real EvoLink counts with its own tokenizer,
    and may still refuse a prompt near the limit.
    """
    wide = other = 0
    for char in prompt:
        if not char.isascii():
            if _WIDE_SCRIPTS.match(char):
                wide += 1
            else:
                other += 1
    # Non-ASCII characters are counted on their own: as spaces they keep ASCII words apart.
    ascii_text = "".join(char if char.isascii() else " " for char in prompt)
    ascii_chars = len(prompt) - wide - other
    ascii_tokens = max(len(ascii_text.split()), math.ceil(ascii_chars / 4))
    return wide + math.ceil(other / 2) + ascii_tokens


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
                "(estimated as one token per CJK character, one per two other non-ASCII "
                "characters, and one per 4 ASCII characters or per word, whichever is more)",
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
        return StatusQuery("GET", "/v1/tasks/" + parsing.path_segment(provider_task_id))

    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        return parsing.image_list(task.get("results"))

    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        return task.get("error") or task.get("error_message")

    def estimated_seconds(self, task: Mapping[str, Any]) -> float | None:
        """``task_info.estimated_time``."""
        info = task.get("task_info")
        return parsing.seconds_of(info.get("estimated_time")) if isinstance(info, Mapping) else None
