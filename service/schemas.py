"""The JSON shapes of the HTTP API: request bodies (validated with pydantic) and task JSON.

Request models forbid unknown fields, so a typo is a 400 that names it instead of a silently
ignored option. The same models produce the JSON Schemas in the OpenAPI document.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from service.errors import ValidationFailed
from service.models import DOT_SEGMENTS, Task, TaskEvent, TaskRow
from service.settings import PROVIDERS

ProviderName = Literal["openai", "grsai", "gptimage15", "evolink", "apiinone"]
Size = Literal["1:1", "2:3", "3:2", "auto"]
Quality = Literal["low", "medium", "high", "auto"]
StatusName = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]

MAX_PROMPT_CHARS = 32_000
MAX_IMAGE_URLS = 16
MAX_URL_CHARS = 2048

ModelT = TypeVar("ModelT", bound=BaseModel)
ValueT = TypeVar("ValueT")

assert set(ProviderName.__args__) == set(PROVIDERS)  # type: ignore[attr-defined]


def _check_http_url(value: str) -> str:
    """A reference image's URL, as the provider will fetch it: absolute http(s) with a host,
    nothing a request line cannot carry (whitespace, control characters)."""
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"URL longer than {MAX_URL_CHARS} characters")
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ValueError("must not contain spaces or control characters (percent-encode them)")
    try:
        host = urlsplit(value).hostname
    except ValueError as exc:  # e.g. "http://[oops": a broken IPv6 host, or a bad port
        raise ValueError(f"is not a valid URL ({exc})") from None
    if not host:
        raise ValueError("must name a host, e.g. https://example.com/reference.png")
    return value


def _provider_task_id(value: str) -> str:
    """A provider task id goes into a status query's path: "." and ".." would make it
    another path of the provider's API (asked with TaskRelay's key); no provider issues them."""
    if value in DOT_SEGMENTS:
        raise ValueError(f"{value!r} cannot be a provider task id")
    return value


ProviderTaskId = Annotated[
    str, Field(min_length=1, max_length=255), AfterValidator(_provider_task_id)
]


def _json_number(value: Any) -> Any:
    """A JSON number, not what lax validation would take for one: true as 1, "2" as 2. A
    whole float (2.0) is an integer in JSON Schema, and stays accepted."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


# Integers sent as JSON numbers, with their bounds. The bounds come before the validator:
# after it (in an Annotated nested around one that carries it), the schema showed them as
# "ge"/"le", which JSON Schema does not know, so OpenAPI clients and validators ignored them.
ImageCount = Annotated[int, Field(ge=1, le=10), BeforeValidator(_json_number)]
OverlapSeconds = Annotated[int, Field(ge=0, le=7 * 86400), BeforeValidator(_json_number)]


def _iso_timestamp(value: Any) -> datetime:
    """An ISO 8601 timestamp, as text, as the query parameters take them (lax validation
    would also read a number, 0 or "1700000000", as Unix seconds), parsed once here."""
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 timestamp string, e.g. 2026-11-20T10:00:00Z")
    try:
        return datetime.fromisoformat(utc_suffix(value.strip()))
    except ValueError:
        raise ValueError("not an ISO 8601 timestamp; use e.g. 2026-11-20T10:00:00Z") from None


def utc_suffix(text: str) -> str:
    """An RFC 3339 time's ``Z`` (or ``z``, which RFC 3339 allows too) as ``+00:00``, which
    ``datetime.fromisoformat`` reads."""
    return text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text


ISOTimestamp = Annotated[datetime, BeforeValidator(_iso_timestamp)]


def _once_each(values: list[ValueT]) -> list[ValueT]:
    """A list of names with each named once, in the order first given."""
    return list(dict.fromkeys(values))


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TaskCreate(_Body):
    """POST /v1/tasks: generate images with a provider; TaskRelay submits and tracks it."""

    provider: ProviderName
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    size: Size | None = Field(
        default=None, description="Aspect ratio; omitted means the provider's default (1:1)."
    )
    quality: Quality | None = Field(
        default=None, description="Omitted means the provider's default."
    )
    n: ImageCount = 1
    image_urls: Annotated[list[str], Field(max_length=MAX_IMAGE_URLS)] = Field(
        default_factory=list, description="Reference images (edit mode)."
    )
    model: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="Overrides the provider's configured model name."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    notify_url: Annotated[str, Field(max_length=MAX_URL_CHARS)] | None = Field(
        default=None,
        description="Receives this task's events, signed with the client's notify secret.",
    )

    @field_validator("image_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [_check_http_url(item) for item in value]


class TaskTrack(_Body):
    """POST /v1/tasks/track: register a task the caller submits to the provider itself."""

    provider: ProviderName
    provider_task_id: ProviderTaskId | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    notify_url: Annotated[str, Field(max_length=MAX_URL_CHARS)] | None = Field(
        default=None,
        description="Receives this task's events, signed with the client's notify secret.",
    )


class TaskPatch(_Body):
    """PATCH /v1/tasks/{id}: learn the provider task id later, or replace the metadata."""

    provider_task_id: ProviderTaskId | None = None
    metadata: dict[str, Any] | None = None


EventTypeName = Literal[
    "task.submitted",
    "task.progress",
    "task.succeeded",
    "task.failed",
    "task.canceled",
    "task.expired",
]
# A subscription's filters: at least one name, each kept once.
EventTypes = Annotated[list[EventTypeName], Field(min_length=1), AfterValidator(_once_each)]
Providers = Annotated[list[ProviderName], Field(min_length=1), AfterValidator(_once_each)]


class SubscriptionCreate(_Body):
    """POST /v1/subscriptions: an endpoint that receives the client's task events."""

    url: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]
    event_types: EventTypes | None = Field(default=None, description="Omitted: every event type.")
    providers: Providers | None = Field(
        default=None, description="Omitted: tasks of every provider."
    )
    description: Annotated[str, Field(max_length=500)] | None = None


def _unset() -> None:
    """A field left out of a PATCH body."""
    return None


class SubscriptionUpdate(_Body):
    # url and enabled may be left out, not set to null (the subscription needs both): the
    # document says so, or a client generated from it sent null for each unset field and
    # had every PATCH refused.
    url: Annotated[
        Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)] | None,
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_URL_CHARS}),
    ] = Field(default_factory=_unset)  # a factory: a `"default": null` would contradict it
    event_types: EventTypes | None = None
    providers: Providers | None = None
    description: Annotated[str, Field(max_length=500)] | None = None
    enabled: Annotated[
        Annotated[bool, Field(strict=True)] | None,  # true or false, not "yes"
        WithJsonSchema({"type": "boolean"}),
    ] = Field(default_factory=_unset)


class SecretRotation(_Body):
    overlap_seconds: OverlapSeconds = Field(
        default=86400, description="How long the previous secret keeps signing too."
    )


class Replay(_Body):
    since: ISOTimestamp
    until: ISOTimestamp | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ImageOut(BaseModel):
    url: str
    width: int | None = None
    height: int | None = None


class TaskErrorOut(BaseModel):
    code: str
    message: str


class TaskOut(BaseModel):
    """The task JSON of GET /v1/tasks/{id}, list pages and event payloads."""

    id: str
    provider: ProviderName
    provider_task_id: str | None
    origin: Literal["submitted", "tracked"]
    status: StatusName
    progress: Annotated[int, Field(ge=0, le=100)]
    images: list[ImageOut]
    error: TaskErrorOut | None
    metadata: dict[str, Any]
    request: dict[str, Any]
    provider_status: str | None = Field(description="The provider's own last status word.")
    last_update_source: Literal["submit", "callback", "poll", "stream", "timeout", "api"]
    submit_attempts: int = Field(description="How many times TaskRelay sent it to the provider.")
    created_at: str
    updated_at: str
    completed_at: str | None


class TrackedTaskOut(TaskOut):
    callback_url: str = Field(description="Give this URL to the provider as its callback.")


class TaskPage(BaseModel):
    data: list[TaskOut]
    next_cursor: str | None


class EventOut(BaseModel):
    id: str
    type: str
    timestamp: str
    sequence: int
    source: str
    data: TaskOut


class EventPage(BaseModel):
    data: list[EventOut]


class CallbackReceiptOut(BaseModel):
    received_at: str
    outcome: Literal["applied", "unchanged", "terminal", "rejected"]
    error: str | None
    content_type: str | None
    body: str = Field(description="The raw body as received (up to TASKRELAY_CALLBACK_AUDIT_BYTES)")
    body_encoding: Literal["utf-8", "base64"]
    body_size: int
    body_truncated: bool


class CallbackPage(BaseModel):
    data: list[CallbackReceiptOut]
    next_cursor: str | None


EVENT_SCHEMA_VERSION = 1


class WebhookEvent(BaseModel):
    """What subscribers receive (event schema version 1): one task change."""

    id: str = Field(description="The event id; also the webhook-id header, stable across retries.")
    type: EventTypeName
    timestamp: str = Field(description="When the change happened (ISO 8601, UTC).")
    data: TaskOut = Field(description="The task right after the change, as GET /v1/tasks/{id}.")


class SubscriptionOut(BaseModel):
    id: str
    url: str
    event_types: list[EventTypeName] | None
    providers: list[ProviderName] | None
    description: str | None
    enabled: bool
    disabled_reason: str | None
    previous_secret_expires_at: str | None
    created_at: str
    updated_at: str
    secret: str | None = Field(
        default=None, description="Only in the answers that create or rotate it."
    )


class SubscriptionList(BaseModel):
    data: list[SubscriptionOut]


class NotifySecretOut(BaseModel):
    secret: str = Field(description="whsec_..., the secret signing your notify_url deliveries.")
    previous_secret_expires_at: str | None = Field(
        description="Until when the previous secret signs too (a rotation's overlap)."
    )


class ReplayResult(BaseModel):
    replayed: int = Field(description="How many events are sent again.")


class DeliveryOut(BaseModel):
    id: str
    event_id: str
    # The endpoint subscription it went to; null for a task's notify_url.
    subscription_id: str | None
    target: Literal["endpoint", "notify_url"]
    event_type: EventTypeName
    status: Literal["pending", "succeeded", "dead", "coalesced"]
    attempts: int
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: str
    delivered_at: str | None


class DeliveryAttemptOut(BaseModel):
    attempted_at: str
    status_code: int | None
    duration_ms: float
    response_body: str | None
    error: str | None


class DeliveryDetail(DeliveryOut):
    attempt_log: list[DeliveryAttemptOut]


class CallbackAck(BaseModel):
    received: bool
    task_id: str
    status: StatusName
    outcome: Literal["applied", "unchanged", "terminal"]


def isoformat(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_timestamp(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(utc_suffix(text.replace(" ", "+")))
    except ValueError as exc:
        raise ValidationFailed(
            f"Query parameter {name!r} is not an ISO 8601 timestamp.",
            details=[{"field": name, "message": "use e.g. 2026-11-20T10:00:00Z"}],
        ) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return in_utc(name, value)


def in_utc(name: str, value: datetime) -> datetime:
    """``value`` in UTC; a 400 (not a crash) for times that do not exist there (year 0/10000)."""
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError as exc:
        raise ValidationFailed(
            f"{name} is out of range.",
            details=[{"field": name, "message": "a time between the years 1 and 9999 in UTC"}],
        ) from exc


def task_json(task: Task | TaskRow) -> dict[str, Any]:
    return {
        "id": task.id,
        "provider": task.provider,
        "provider_task_id": task.provider_task_id,
        "origin": task.origin,
        "status": task.status,
        "progress": task.progress,
        "images": list(task.images),
        "error": task.error,
        "metadata": task.meta,
        "request": task.request,
        "provider_status": task.raw_status,
        "last_update_source": task.last_update_source,
        "submit_attempts": task.submit_attempts,
        "created_at": isoformat(task.created_at),
        "updated_at": isoformat(task.updated_at),
        "completed_at": isoformat(task.completed_at),
    }


def event_json(event: TaskEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "timestamp": isoformat(event.created_at),
        "sequence": event.seq,
        "source": event.source,
        "data": event.data,
    }


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "(body)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field; remove it (see the API reference for accepted fields)"
        elif error["type"] == "literal_error":
            message = message.replace("Input should be", "must be one of")
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        details.append({"field": location, "message": message})
    return details


def parse_body(model: type[ModelT], data: Any) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc)
        fields = ", ".join(sorted({item["field"] for item in details}))
        raise ValidationFailed(
            f"The request body has invalid fields: {fields}.", details=details
        ) from exc
