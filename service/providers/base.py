"""The provider adapter interface.

An adapter knows one provider's wire format and nothing else: it turns a normalised request into
that provider's HTTP request (with TaskRelay's callback URL in the provider's own field), and the
provider's replies, status answers and callback bodies into a normalised :class:`TaskUpdate`.

The parsing methods (``parse_submit_reply``, ``parse_status``, ``parse_callback``) are pure:
bytes or JSON in, ``TaskUpdate`` or a typed error out, so unit tests feed them recorded sample
bodies with no network; the functions they share are in :mod:`.parsing`. The I/O methods use the
shared ``httpx.AsyncClient`` handed in by the app's lifespan, and translate httpx errors into
:mod:`service.errors` provider errors.

:class:`TaskEndpointAdapter` is the common shape of the asynchronous providers: a submit that
answers with a task id, then a status endpoint and callbacks that carry one task object.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import httpx

from service.errors import (
    ProviderError,
    UpstreamProtocolError,
    UpstreamUnavailable,
    ValidationFailed,
)
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.providers import parsing
from service.settings import ProviderSettings

log = logging.getLogger(__name__)

# Where a provider streams its progress (GrsAI), each running update goes here. Progress is
# news, not the result: a sink records it as best it can and does not raise.
UpdateSink = Callable[[TaskUpdate], Awaitable[None]]


@dataclass(frozen=True)
class GenerationRequest:
    """A provider-neutral image request, as stored in ``task.request``."""

    prompt: str
    size: str | None = None  # "1:1", "2:3", "3:2", "auto"; None = the provider's default
    quality: str | None = None  # "low", "medium", "high", "auto"; None = the provider's default
    n: int = 1
    image_urls: tuple[str, ...] = ()
    model: str | None = None  # None = the configured model

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_urls"] = list(self.image_urls)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerationRequest:
        return cls(
            prompt=data["prompt"],
            size=data.get("size"),
            quality=data.get("quality"),
            n=int(data.get("n", 1)),
            image_urls=tuple(data.get("image_urls") or ()),
            model=data.get("model"),
        )


@dataclass(frozen=True)
class SubmitResult:
    """What a provider said when it accepted a task.

    ``update`` carries at least the provider task id (when the provider issues one). For a
    synchronous provider (OpenAI) it is already the final result; images may then carry
    ``b64_json`` data that TaskRelay stores and replaces with its own URL.
    """

    update: TaskUpdate
    # Whether results will arrive by callback (False: TaskRelay must poll or has them already).
    expects_callback: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusQuery:
    """The request that asks a provider for one task's state, below its base URL."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json_body: Any = None


# --- validating and mapping a request ----------------------------------------------------------


def rejected(
    provider: str, field_name: str, message: str, accepted: Any = None
) -> ValidationFailed:
    """A 400 that names the provider, the field and what that provider accepts."""
    detail: dict[str, Any] = {"field": field_name, "message": message, "provider": provider}
    if accepted is not None:
        detail["accepted"] = accepted
    return ValidationFailed(
        f"Provider {provider!r} cannot take this request: {field_name}: {message}.",
        code="unsupported_by_provider",
        details=[detail],
    )


def check_choice(provider: str, field_name: str, value: Any, accepted: tuple[Any, ...]) -> None:
    if value is not None and value not in accepted:
        raise rejected(provider, field_name, f"{value!r} is not accepted", accepted=list(accepted))


def check_count(provider: str, n: int, low: int, high: int) -> None:
    if not low <= n <= high:
        only = f"only {low}" if low == high else f"{low} to {high}"
        raise rejected(
            provider,
            "n",
            f"{n} images cannot be made in one task ({only})",
            accepted=list(range(low, high + 1)),
        )


def check_prompt(provider: str, prompt: str, max_chars: int | None = None) -> None:
    if not prompt.strip():
        raise rejected(provider, "prompt", "must not be empty")
    if max_chars is not None and len(prompt) > max_chars:
        raise rejected(
            provider,
            "prompt",
            f"{len(prompt)} characters is over the limit of {max_chars}",
            accepted={"max_characters": max_chars},
        )


def request_body(**fields: Any) -> dict[str, Any]:
    """A JSON request body of the fields that have a value: ``None`` and ``[]`` are left out,
    so each provider applies its own default."""
    return {name: value for name, value in fields.items() if value is not None and value != []}


# --- one request -------------------------------------------------------------------------------


def transport_error(
    provider: str, exc: httpx.HTTPError, *, answered: int | None = None
) -> ProviderError:
    """Timeouts and connection failures: the provider is unavailable, worth retrying.

    Only a failure to connect proves the request never arrived; after that (a read timeout,
    a dropped connection) the provider may have accepted it, so the error is ``ambiguous``.
    A reply whose body cannot even be decoded is an (ambiguous) UpstreamProtocolError.
    ``answered`` is the HTTP status the provider had answered when its body failed, kept in
    ``upstream_status``: after a 2xx it has taken the request (see :func:`after_answer`).
    """
    if isinstance(exc, httpx.DecodingError):
        return UpstreamProtocolError(
            f"{provider} answered with a body that cannot be decoded: {exc}",
            provider=provider,
            upstream_status=answered,
        )
    timed_out = isinstance(exc, httpx.TimeoutException)
    if answered is not None:
        broke = "timed out" if timed_out else "the connection broke"
        return UpstreamUnavailable(
            f"{provider} answered HTTP {answered}, then {broke} before the reply was complete: "
            f"{type(exc).__name__}",
            provider=provider,
            upstream_status=answered,
            ambiguous=True,
        )
    kind = "timed out" if timed_out else "could not be reached"
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return UpstreamUnavailable(
        f"{provider} {kind}: {type(exc).__name__}", provider=provider, ambiguous=not never_sent
    )


def after_answer(exc: ProviderError, status_code: int) -> ProviderError:
    """``exc``, met in a reply the provider answered with ``status_code``: when it leaves open
    what the provider did (``ambiguous``) and names no status of its own, it now names that
    one (``upstream_status``). An ambiguous error with a 2xx status tells the submitter that
    the provider took the request, and bills it: it is never sent again."""
    if exc.ambiguous and exc.upstream_status is None:
        exc.upstream_status = status_code
    return exc


def answered_2xx(exc: ProviderError) -> bool:
    """Whether ``exc`` came after the provider answered 2xx, with an answer TaskRelay cannot
    use (an ambiguous error): the provider has carried out the request."""
    status = exc.upstream_status
    return exc.ambiguous and status is not None and 200 <= status < 300


def decode_json(provider: str, response: httpx.Response) -> Any:
    """A 2xx reply's JSON; UpstreamProtocolError (ambiguous) when it is not JSON."""
    try:
        return parsing.loads_provider_json(response.content.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:
        raise UpstreamProtocolError(
            f"{provider} answered HTTP {response.status_code} with a body that is not JSON.",
            provider=provider,
            upstream_status=response.status_code,
        ) from exc


def error_body(response: httpx.Response) -> Any:
    """An error reply's JSON if it has any (for its message), else ``None``."""
    try:
        return parsing.loads_provider_json(response.content.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None


def excerpt(body: Any, limit: int = 500) -> str:
    """The start of a parsed reply, for a log line (without callback tokens: a reply may
    quote the callback URL it was sent)."""
    try:
        return parsing.scrubbed(json.dumps(body, ensure_ascii=False)[:limit])
    except (TypeError, ValueError):
        return parsing.scrubbed(repr(body)[:limit])


async def send_json(
    adapter: ProviderAdapter,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    params: Mapping[str, str] | None = None,
    request_timeout: httpx.Timeout | None = None,
) -> Any:
    """One request with the adapter's headers: the 2xx reply's JSON, or a ProviderError.

    One attempt only; the caller decides about retries (``ProviderError.retryable``).
    """
    request = adapter.http.build_request(
        method,
        url,
        json=json_body,
        params=params,
        headers=adapter.headers(),
        timeout=request_timeout if request_timeout is not None else httpx.USE_CLIENT_DEFAULT,
    )
    try:
        response = await adapter.http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise transport_error(adapter.name, exc) from exc
    # The status first, then the body: a body that fails after a 2xx status came from a
    # provider that has carried out the request.
    try:
        await response.aread()
    except httpx.HTTPError as exc:
        raise transport_error(adapter.name, exc, answered=response.status_code) from exc
    finally:
        await response.aclose()
    if not response.is_success:
        raise parsing.reply_error(
            adapter.name, response.status_code, error_body(response), response.headers
        )
    return decode_json(adapter.name, response)


# --- the adapters ------------------------------------------------------------------------------


class ProviderAdapter(abc.ABC):
    """One provider's wire format. Subclasses live in ``service/providers/<name>.py``."""

    name: ClassVar[str]
    # False for providers without a status endpoint (OpenAI is synchronous).
    can_query_status: ClassVar[bool] = True
    # Where :meth:`submit` POSTs the body of :meth:`build_submit`, below the base URL.
    submit_path: ClassVar[str]
    # The submit request's timeout; None keeps the shared client's.
    submit_timeout: ClassVar[httpx.Timeout | None] = None

    def __init__(self, settings: ProviderSettings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key.reveal()}"
        return headers

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{path}"

    def submission_timeout(self) -> httpx.Timeout:
        """The timeouts of the submit request (a streamed one's too)."""
        return self.submit_timeout if self.submit_timeout is not None else self.http.timeout

    def longest_wait_for_answer(self) -> float | None:
        """The longest a submission can wait for the start of its answer, while the process
        sending it lives: its request's timeouts added up (a free connection, connecting,
        sending, the silence before the answer). None when one of them is unbounded."""
        timeout = self.submission_timeout()
        parts = (timeout.pool, timeout.connect, timeout.write, timeout.read)
        return None if any(part is None for part in parts) else sum(parts)  # type: ignore[arg-type]

    def delivers_callbacks(self) -> bool:
        """Whether the results of a submission made with a callback URL arrive by callback.

        If they do, a submission that got no usable answer (``ProviderError.ambiguous``) is
        not sent again: the provider may have accepted it, and its callback will still come.
        """
        return True

    @abc.abstractmethod
    def validate(self, request: GenerationRequest) -> None:
        """Raise a 400 (:func:`rejected`) for any value this provider cannot take."""

    @abc.abstractmethod
    def build_submit(self, request: GenerationRequest, callback_url: str | None) -> dict[str, Any]:
        """The JSON body of the provider's submit request (pure)."""

    @abc.abstractmethod
    def parse_submit_reply(self, status_code: int, body: Any) -> SubmitResult:
        """The provider's answer to a submit request (pure); raises ProviderError subclasses."""

    @abc.abstractmethod
    def parse_status(self, status_code: int, body: Any) -> TaskUpdate:
        """The provider's answer to a status query (pure)."""

    @abc.abstractmethod
    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> TaskUpdate:
        """A callback body (pure); raises CallbackParseError when it cannot be understood."""

    @abc.abstractmethod
    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        """Ask the provider for a task's current state (the authoritative answer)."""

    async def submit(
        self, request: GenerationRequest, *, callback_url: str | None, on_update: UpdateSink
    ) -> SubmitResult:
        """Send the task to the provider: one POST of :meth:`build_submit` to ``submit_path``.

        A provider that streams its progress overrides this and reports it via ``on_update``.
        """
        body = await send_json(
            self,
            "POST",
            self.url(self.submit_path),
            json_body=self.build_submit(request, callback_url),
            request_timeout=self.submit_timeout,
        )
        try:
            result = self.parse_submit_reply(200, body)
        except ProviderError as exc:
            if answered_2xx(after_answer(exc, 200)):
                # Nothing in the task can hold the reply; the log keeps what it began with.
                log.warning(
                    "%s answered a submission 2xx with a reply TaskRelay cannot use (%s): %s",
                    self.name,
                    exc.message,
                    excerpt(body),
                )
            raise
        expects_callback = callback_url is not None and self.delivers_callbacks()
        return replace(result, expects_callback=expects_callback)


class TaskEndpointAdapter(ProviderAdapter):
    """A provider that answers a submission with a task id, then reports on the task through a
    status endpoint and callbacks that carry one task object (bare, or as the ``data`` of a
    ``{code, data}`` envelope).

    The reply handling lives here once; a subclass says what differs: validation, request
    mapping, its status query, the success codes and status words, and the fields of its task
    object (through the hooks below).
    """

    # Body ``code`` values that mean success (a 2xx reply may carry an error code).
    ok_codes: ClassVar[tuple[int, ...]]
    # Whether a 2xx reply may be an error body (``{"error": ...}``) in place of the task.
    error_bodies: ClassVar[bool] = True
    # Lower-case status word -> TaskStatus; the documented words, to name in errors.
    statuses: ClassVar[Mapping[str, TaskStatus]]
    documented_statuses: ClassVar[str]
    # The task object's id field; where a submit reply carries it, to name in errors.
    task_id_field: ClassVar[str] = "task_id"
    task_id_where: ClassVar[str] = "`data.task_id`"
    # The error message of a failed task whose provider gives no reason.
    default_failure: ClassVar[str]
    # Where a succeeded task object carries its image URLs, to name in errors.
    images_where: ClassVar[str] = "`results`"

    @abc.abstractmethod
    def status_query(self, provider_task_id: str) -> StatusQuery:
        """The request that asks for one task's state (pure)."""

    @abc.abstractmethod
    def images(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A task object's images (none until it has succeeded)."""

    @abc.abstractmethod
    def failure_reason(self, task: Mapping[str, Any]) -> Any:
        """A failed task object's reason (text or an object), ``None`` where it gives none."""

    def task_id_of(self, task: Mapping[str, Any]) -> str | None:
        return parsing.id_of(task.get(self.task_id_field))

    def estimated_seconds(self, task: Mapping[str, Any]) -> float | None:
        """The provider's hint of how long the task will take, where it gives one."""
        return None

    def parse_submit_reply(self, status_code: int, body: Any) -> SubmitResult:
        update = parsing.parse_reply(
            self.name,
            status_code,
            body,
            lambda reply: self.accepted(self.task_object(reply, "the submit reply")),
        )
        return SubmitResult(update=update)

    def parse_status(self, status_code: int, body: Any) -> TaskUpdate:
        return parsing.parse_reply(
            self.name,
            status_code,
            body,
            lambda reply: self.task_update(self.task_object(reply, "the status reply")),
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> TaskUpdate:
        """The status query's task object, bare or in the provider's ``{code, data}``."""
        return parsing.parse_callback(self.name, body, self.task_update)

    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        query = self.status_query(provider_task_id)
        body = await send_json(
            self,
            query.method,
            self.url(query.path),
            json_body=query.json_body,
            params=query.params,
        )
        return self.parse_status(200, body)

    def task_object(self, body: Any, what: str) -> Mapping[str, Any]:
        """The task object of a 2xx reply; an error code or error body in it raises."""
        reply = parsing.require_object(body, what)
        parsing.check_body_code(self.name, reply, self.ok_codes)
        if self.error_bodies:
            parsing.check_error_body(self.name, reply)
        return parsing.status_object(reply, what)

    def accepted(self, task: Mapping[str, Any]) -> TaskUpdate:
        """A submit reply's task object: it must name the task; with no status word yet, the
        task is queued."""
        task_id = self.task_id_of(task)
        if task_id is None:
            raise parsing.BodyShapeError(f"expected the task id in {self.task_id_where}")
        if not isinstance(task.get("status"), str):
            return TaskUpdate(
                status=TaskStatus.queued,
                provider_task_id=task_id,
                estimated_seconds=self.estimated_seconds(task),
            )
        return self.submitted_update(task, task_id)

    def submitted_update(self, task: Mapping[str, Any], task_id: str | None) -> TaskUpdate:
        """A submit reply's task object that carries a status word.

        A reply that says "succeeded" without an image URL, for a task it names, leaves the
        task running under that id: a poll or callback can still bring the images, where an
        error would end a task the provider has taken (it is never sent again).
        """
        try:
            return self.task_update(task)
        except parsing.NoImageError as exc:
            if task_id is None:
                raise
            log.warning(
                "%s accepted task %s but answered: %s; waiting for its images",
                self.name,
                task_id,
                exc,
            )
            return TaskUpdate(
                status=TaskStatus.running,
                provider_task_id=task_id,
                estimated_seconds=self.estimated_seconds(task),
            )

    def task_update(self, task: Mapping[str, Any]) -> TaskUpdate:
        """A task object, which must carry a status word."""
        status, raw = parsing.read_status(task, self.statuses, self.documented_statuses)
        return self.update_for(task, status, raw)

    def update_for(
        self, task: Mapping[str, Any], status: TaskStatus, raw: str | None
    ) -> TaskUpdate:
        """A task object's update, its status already read.

        Success without an image URL raises :class:`~.parsing.NoImageError`: recorded, it
        would end the task with nothing to show, and no later answer could mend it.
        """
        images = tuple(self.images(task))
        if status is TaskStatus.succeeded and not images:
            said = f" (status {raw[:40]!r})" if raw else ""
            raise parsing.NoImageError(
                f"the provider reported success{said} but gave no image URL: expected at "
                f"least one absolute http(s) URL in {self.images_where}"
            )
        error = None
        if status is TaskStatus.failed:
            error = parsing.failure_error(self.failure_reason(task), self.default_failure)
        return TaskUpdate(
            status=status,
            progress=parsing.progress_of(task.get("progress")),
            images=images,
            error=error,
            provider_task_id=self.task_id_of(task),
            raw_status=raw,
            estimated_seconds=self.estimated_seconds(task),
        )
