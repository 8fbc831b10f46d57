"""GrsAI (``POST /v1/draw/completions``), the one provider with three reply modes.

``settings.mode`` picks the mode by what goes in ``webHook``:

- ``callback``: TaskRelay's callback URL. The reply is not documented; it is read like the
  ``"-1"`` reply, ``{"code": 0, "data": {"id": ...}}``, and the result arrives by POST.
- ``poll``: ``"-1"``. The reply is ``{"code": 0, "data": {"id": ...}}``; TaskRelay polls
  ``POST /v1/draw/result``.
- ``stream``: no ``webHook``. The reply is a stream of ``data: {json}`` lines with ``progress``;
  the line that ends it (``progress`` 100 with ``status`` succeeded/failed) is the result. That
  line has room for one image (a single ``url``, seed 000), so this mode takes ``n`` = 1 only.

A non-zero ``code`` in any JSON answer is an error. In the callback and poll modes GrsAI is a
task endpoint like the others (:class:`~service.providers.base.TaskEndpointAdapter`); the stream
mode and its id-only submit reply are its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import httpx

from service.errors import ProviderError, UpstreamProtocolError
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import base, parsing
from service.providers.base import (
    GenerationRequest,
    StatusQuery,
    SubmitResult,
    TaskEndpointAdapter,
    UpdateSink,
)

log = logging.getLogger(__name__)

SIZES = ("auto", "1:1", "3:2", "2:3")
MAX_VARIANTS = 2
# The stream's final line carries one `url` (seed 000): a second variant would be paid for and lost.
MAX_STREAM_VARIANTS = 1
OK_CODES = (0,)
# The "-1" webHook asks for the task id at once, for polling.
POLL_WEBHOOK = "-1"
STATUSES = {
    "running": TaskStatus.running,
    "succeeded": TaskStatus.succeeded,
    "failed": TaskStatus.failed,
}
DEFAULT_FAILURE = "GrsAI reported the task as failed without giving a reason."
# A stream stays open for the whole generation; the read timeout is the longest silence
# between two progress lines, longer than the shared client's 30 s.
STREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0)
# Lines that are not progress lines are kept (this much) to explain a stream that ends early.
_LEFTOVER_CHARS = 4096


class GrsAIAdapter(TaskEndpointAdapter):
    name: ClassVar[str] = "grsai"
    submit_path: ClassVar[str] = "/v1/draw/completions"
    ok_codes: ClassVar[tuple[int, ...]] = OK_CODES
    # GrsAI's errors are body codes; it documents no `{"error": ...}` bodies.
    error_bodies: ClassVar[bool] = False
    statuses: ClassVar[Mapping[str, TaskStatus]] = STATUSES
    documented_statuses: ClassVar[str] = "running, succeeded, failed"
    task_id_field: ClassVar[str] = "id"
    default_failure: ClassVar[str] = DEFAULT_FAILURE
    images_where: ClassVar[str] = "`results` (or `url`, on a stream line)"

    def delivers_callbacks(self) -> bool:
        """Only in callback mode; a stream or a polled task reports nothing by itself."""
        return self.settings.mode == "callback"

    def submission_timeout(self) -> httpx.Timeout:
        return STREAM_TIMEOUT if self.settings.mode == "stream" else super().submission_timeout()

    def validate(self, request: GenerationRequest) -> None:
        base.check_prompt(self.name, request.prompt)
        base.check_choice(self.name, "size", request.size, SIZES)
        if request.quality is not None:
            raise base.rejected(
                self.name,
                "quality",
                "GrsAI takes no quality setting; leave quality out",
                accepted=[],
            )
        if self.settings.mode == "stream" and request.n > MAX_STREAM_VARIANTS:
            raise base.rejected(
                self.name,
                "n",
                f"{request.n} images cannot be made in stream mode, whose reply carries one "
                "image; send n=1, or have TaskRelay run GrsAI in callback or poll mode "
                f"(TASKRELAY_GRSAI_MODE), which returns up to {MAX_VARIANTS}",
                accepted=list(range(1, MAX_STREAM_VARIANTS + 1)),
            )
        base.check_count(self.name, request.n, 1, MAX_VARIANTS)

    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        return base.request_body(
            model=request.model or self.settings.model,
            prompt=request.prompt,
            variants=request.n,
            size=request.size,
            urls=list(request.image_urls),
            webHook=self._webhook(callback_url),
        )

    def parse_submit_reply(self, status_code: int, body: Any) -> SubmitResult:
        """The JSON reply of the callback and poll modes, or a stream mode reply as text."""
        if isinstance(body, str) and 200 <= status_code < 300:
            return SubmitResult(update=self.parse_stream(body), expects_callback=False)
        update = parsing.parse_reply(self.name, status_code, body, self._submit_reply)
        return SubmitResult(update=update, expects_callback=self.delivers_callbacks())

    def status_query(self, provider_task_id: str) -> StatusQuery:
        return StatusQuery("POST", "/v1/draw/result", json_body={"id": provider_task_id})

    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        results = task.get("results")
        items = list(results) if isinstance(results, list) else [results]
        # Stream lines carry the image at the top level.
        items.append({key: task.get(key) for key in ("url", "width", "height")})
        return parsing.image_list(items)

    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        """GrsAI's ``failure_reason`` may be a bare category (``input_moderation``,
        ``output_moderation``, ``error``) with the detail in ``error``: both are kept."""
        reason = parsing.plain_text_of(task.get("failure_reason"))
        detail = parsing.plain_text_of(task.get("error"))  # cut once joined (failure_error)
        if reason and detail and detail != reason:
            return f"{reason}: {detail}"
        return reason or detail

    def parse_stream_line(self, line: str) -> TaskUpdate | None:
        """One line of a stream reply: an update (running, or final), or ``None`` for a line
        that carries none (blank, SSE comment or field, ``[DONE]``, broken JSON)."""
        text = line.strip()
        if text.startswith("data:"):
            text = text[len("data:") :].strip()
        elif not text.startswith("{"):
            return None
        if not text or text == "[DONE]":
            return None
        try:
            payload = parsing.loads_provider_json(text)
        except (ValueError, RecursionError):
            log.warning("grsai stream: skipped a line that is not JSON: %.200s", text)
            return None
        if not isinstance(payload, Mapping):
            return None
        parsing.check_body_code(self.name, payload, OK_CODES)
        return parsing.guard_reply(self.name, lambda: self._stream_update(payload))

    def parse_stream(self, text: str) -> TaskUpdate:
        """A whole stream reply -> its final update (pure; for tests and recorded streams)."""
        leftovers: list[str] = []
        for line in text.splitlines():
            update = self.parse_stream_line(line)
            if update is None:
                _keep(leftovers, line)
            elif update.status is not None and update.status.terminal:
                return update
        raise self._unfinished(leftovers)

    async def submit(
        self, request: GenerationRequest, *, callback_url: str | None, on_update: UpdateSink
    ) -> SubmitResult:
        if self.settings.mode == "stream":
            return await self._submit_stream(request, on_update)
        return await super().submit(request, callback_url=callback_url, on_update=on_update)

    def _webhook(self, callback_url: str | None) -> str | None:
        """The mode's ``webHook``: none asks for a stream."""
        if self.settings.mode == "callback":
            # Without a callback URL, ask for the id and poll rather than hold a stream open.
            return callback_url or POLL_WEBHOOK
        return POLL_WEBHOOK if self.settings.mode == "poll" else None

    async def _submit_stream(
        self, request: GenerationRequest, on_update: UpdateSink
    ) -> SubmitResult:
        headers = {**self.headers(), "Accept": "text/event-stream, application/json"}
        try:
            async with self.http.stream(
                "POST",
                self.url(self.submit_path),
                json=self.build_submit(request, None),
                headers=headers,
                timeout=self.submission_timeout(),
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise parsing.reply_error(
                        self.name,
                        response.status_code,
                        base.error_body(response),
                        response.headers,
                    )
                return await self._read_stream(response, on_update)
        except httpx.HTTPError as exc:
            raise base.transport_error(self.name, exc) from exc

    async def _read_stream(self, response: httpx.Response, on_update: UpdateSink) -> SubmitResult:
        """A 2xx stream to its final line. GrsAI has taken the task by now: whatever goes
        wrong from here on says so (``upstream_status``), so that it is not sent again."""
        leftovers: list[str] = []
        try:
            async for line in response.aiter_lines():
                update = self.parse_stream_line(line)
                if update is None:
                    _keep(leftovers, line)
                elif update.status is not None and update.status.terminal:
                    return SubmitResult(update=update, expects_callback=False)
                else:
                    await on_update(update)
        except httpx.HTTPError as exc:
            raise base.transport_error(self.name, exc, answered=response.status_code) from exc
        except ProviderError as exc:
            base.after_answer(exc, response.status_code)
            raise
        raise base.after_answer(self._unfinished(leftovers), response.status_code)

    def _unfinished(self, leftovers: Iterable[str]) -> ProviderError:
        """A stream with no final line; a plain JSON error body in its place is that error."""
        text = "\n".join(leftovers).strip()
        try:
            payload = parsing.loads_provider_json(text) if text else None
        except (ValueError, RecursionError):
            payload = None
        if isinstance(payload, Mapping):
            try:
                parsing.check_body_code(self.name, payload, OK_CODES)
                parsing.check_error_body(self.name, payload)
            except ProviderError as exc:
                return exc
        return UpstreamProtocolError(
            "grsai's stream ended without a final line (progress 100 with status succeeded or "
            "failed).",
            provider=self.name,
        )

    def _submit_reply(self, body: Any) -> TaskUpdate:
        reply = parsing.require_object(body, "the submit reply")
        parsing.check_body_code(self.name, reply, OK_CODES)
        data = reply.get("data")
        task_id = parsing.id_of(data.get("id")) if isinstance(data, Mapping) else None
        task_id = task_id or parsing.id_of(reply.get("id"))
        if isinstance(data, Mapping) and isinstance(data.get("status"), str):
            return self.submitted_update(data, task_id)
        if task_id is None and self.settings.mode == "poll":
            raise parsing.BodyShapeError(
                'expected the task id to poll with in `data.id` ({"code": 0, "data": {"id": ...}})'
            )
        return TaskUpdate(status=TaskStatus.queued, provider_task_id=task_id)

    def _stream_update(self, line: Mapping[str, Any]) -> TaskUpdate:
        task = parsing.status_object(line, "the stream line") if parsing.is_envelope(line) else line
        raw = task.get("status")
        if isinstance(raw, str) and raw.strip():
            return self.task_update(task)
        # No status word: a progress line, or (leniently) a final line that only shows its result.
        update = self.update_for(task, TaskStatus.running, None)
        if update.progress is not None and update.progress >= 100:
            if update.images:
                return self.update_for(task, TaskStatus.succeeded, None)
            if self.failure_reason(task):
                return self.update_for(task, TaskStatus.failed, None)
        return update


def _keep(leftovers: list[str], line: str) -> None:
    if line.strip() and sum(map(len, leftovers)) < _LEFTOVER_CHARS:
        leftovers.append(line)
