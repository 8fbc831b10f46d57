"""The provider adapter interface.

An adapter knows one provider's wire format and nothing else: it turns a normalised request into
that provider's HTTP request (with TaskRelay's callback URL in the provider's own field), and the
provider's replies, status answers and callback bodies into a normalised :class:`TaskUpdate`.

The parsing methods (``parse_submit_reply``, ``parse_status``, ``parse_callback``) are pure:
bytes or JSON in, ``TaskUpdate`` or a typed error out, so unit tests feed them recorded sample
bodies with no network. The I/O methods use the shared ``httpx.AsyncClient`` handed in by the
app's lifespan, and translate httpx errors into :mod:`service.errors` provider errors.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import httpx

from service.errors import (
    CallbackParseError,
    ContentPolicyViolation,
    ProviderError,
    UpstreamBadRequest,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    ValidationFailed,
)
from service.lifecycle import TaskUpdate
from service.models import TaskStatus
from service.settings import ProviderSettings

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


def parse_json_body(body: bytes) -> Any:
    """Callback bodies: JSON, UTF-8 (a BOM tolerated). Anything else is a CallbackParseError."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CallbackParseError("The callback body is not UTF-8 text.") from exc
    if not text.strip():
        raise CallbackParseError("The callback body is empty; expected a JSON object.")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CallbackParseError(f"The callback body is not valid JSON: {exc}.") from exc


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        from datetime import UTC, datetime

        return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_for_status(
    provider: str, response: httpx.Response, message: str | None = None
) -> ProviderError:
    """Map an upstream HTTP error status to the most specific normalised error."""
    status = response.status_code
    text = message or f"{provider} answered HTTP {status}"
    kwargs: dict[str, Any] = {"provider": provider, "upstream_status": status}
    lowered = text.lower()
    if "content policy" in lowered or "content_policy" in lowered or "safety" in lowered:
        return ContentPolicyViolation(text, **kwargs)
    if status == 401 or status == 403:
        return UpstreamUnauthorized(text, **kwargs)
    if status == 404:
        return UpstreamNotFound(text, **kwargs)
    if status == 429:
        return UpstreamRateLimited(text, retry_after=retry_after_seconds(response), **kwargs)
    if status >= 500:
        return UpstreamUnavailable(text, retry_after=retry_after_seconds(response), **kwargs)
    if 400 <= status < 500:
        return UpstreamBadRequest(text, **kwargs)
    return UpstreamProtocolError(text, **kwargs)


def transport_error(provider: str, exc: httpx.HTTPError) -> ProviderError:
    """Timeouts and connection failures: the provider is unavailable, worth retrying."""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "could not be reached"
    return UpstreamUnavailable(f"{provider} {kind}: {type(exc).__name__}", provider=provider)


class ProviderAdapter(abc.ABC):
    """One provider's wire format. Subclasses live in ``service/providers/<name>.py``."""

    name: ClassVar[str]
    # False for providers without a status endpoint (OpenAI is synchronous).
    can_query_status: ClassVar[bool] = True

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
    async def submit(
        self,
        request: GenerationRequest,
        *,
        callback_url: str | None,
        on_update: UpdateSink,
    ) -> SubmitResult:
        """Send the task to the provider. Streaming providers report progress via on_update."""

    @abc.abstractmethod
    async def query_status(self, provider_task_id: str) -> TaskUpdate:
        """Ask the provider for a task's current state (the authoritative answer)."""


# --- Helpers shared by the adapters ------------------------------------------------------------
# Added with the five adapters. Everything here is pure except :func:`send_json`.

# Words that make a failure a content-policy refusal. GrsAI answers in Chinese, hence the last two.
CONTENT_POLICY_MARKERS = (
    "content policy",
    "content_policy",
    "content-policy",
    "safety",
    "moderation",
    "违规",
    "内容政策",
)


class BodyShapeError(ValueError):
    """A body is not the shape its provider documents.

    Parsers raise this; :func:`guard_reply` turns it into an :class:`UpstreamProtocolError` (a
    reply to our request) and :func:`guard_callback` into a :class:`CallbackParseError`.
    """


def mentions_content_policy(*texts: object) -> bool:
    lowered = " ".join(text for text in texts if isinstance(text, str)).lower()
    return any(marker in lowered for marker in CONTENT_POLICY_MARKERS)


def text_of(value: Any) -> str | None:
    """A provider's reason as text: a non-empty string, or an object's ``message``-like field."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, Mapping):
        for key in ("message", "msg", "detail", "error_message", "reason"):
            found = value.get(key)
            if isinstance(found, str) and found.strip():
                return found.strip()
    return None


def error_message(body: Any) -> str | None:
    """The message of an error body: ``{"error": {"message"}}``, ``{"error": "..."}``,
    ``{"message"}``, ``{"msg"}`` and the like; ``None`` when there is none."""
    if not isinstance(body, Mapping):
        return None
    for key in ("error", "message", "msg", "detail", "error_message", "failure_reason"):
        text = text_of(body.get(key))
        if text:
            return text
    return None


def error_hints(body: Any) -> tuple[str, ...]:
    """Machine words in an error body (``error.code``, ``error.type``) that may name the cause."""
    if not isinstance(body, Mapping):
        return ()
    hints: list[str] = []
    for holder in (body, body.get("error")):
        if isinstance(holder, Mapping):
            hints.extend(
                value for key in ("code", "type") if isinstance(value := holder.get(key), str)
            )
    return tuple(hints)


def int_of(value: Any) -> int | None:
    """An integer from a JSON number or a numeric string; ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) < 1e15:
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except (ValueError, OverflowError):
            return None
    return None


def progress_of(value: Any) -> int | None:
    number = int_of(value)
    return None if number is None else max(0, min(100, number))


def seconds_of(value: Any) -> float | None:
    """A non-negative, finite number of seconds; ``None`` for anything else (NaN included)."""
    if isinstance(value, float):
        return value if 0 <= value < 1e15 else None
    number = int_of(value)
    return float(number) if number is not None and number >= 0 else None


def image_list(value: Any) -> list[dict[str, Any]]:
    """Images from a list of URL strings and/or ``{"url", "width"?, "height"?}`` objects.

    A single string or object counts as a list of one; entries without a URL are skipped.
    """
    items = value if isinstance(value, list) else [value]
    images: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items:
        url = item.get("url") if isinstance(item, Mapping) else item
        if not isinstance(url, str) or not url.strip() or url.strip() in seen:
            continue
        image: dict[str, Any] = {"url": url.strip()}
        seen.add(image["url"])
        if isinstance(item, Mapping):
            for key in ("width", "height"):
                size = item.get(key)
                if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                    image[key] = size
        images.append(image)
    return images


def status_from_word(word: str, known: Mapping[str, TaskStatus]) -> TaskStatus:
    """A provider's status word (any case) -> TaskStatus.

    ``known`` maps lower-case words. An unknown word never raises: ``cancel*`` is ``canceled``,
    anything else ``running`` (the lifecycle never lets that regress a task).
    """
    key = word.strip().lower()
    if key in known:
        return known[key]
    if key.startswith("cancel"):
        return TaskStatus.canceled
    return TaskStatus.running


def failure_error(reason: Any, default: str) -> dict[str, Any]:
    """The normalised ``error`` of a failed task from the provider's reason (text or object)."""
    message = text_of(reason) or default
    code_hint = reason.get("code") if isinstance(reason, Mapping) else None
    policy = mentions_content_policy(message, code_hint)
    return {"code": "content_policy_violation" if policy else "provider_failed", "message": message}


def json_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def require_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BodyShapeError(f"expected {what} to be a JSON object, got {json_type(value)}")
    return value


def is_envelope(body: Mapping[str, Any]) -> bool:
    """``{code, data}``: a ``data`` key and no ``status`` of its own."""
    return "data" in body and "status" not in body


def status_object(body: Any, what: str = "the body") -> Mapping[str, Any]:
    """The task object of a body: the bare object, or the ``data`` of a ``{code, data}``."""
    envelope = require_object(body, what)
    if not is_envelope(envelope):
        return envelope
    data = envelope.get("data")
    if not isinstance(data, Mapping):
        code, message = envelope.get("code"), error_message(envelope)
        said = (
            ""
            if code is None
            else f" (code {code!r}" + (f", message {message!r})" if message else ")")
        )
        raise BodyShapeError(
            f"expected `data` to be an object carrying the task, got {json_type(data)}{said}"
        )
    return data


def upstream_error(
    provider: str,
    status: int,
    reason: str | None,
    *,
    headers: Mapping[str, str] | None = None,
    hints: tuple[str, ...] = (),
    source: str = "HTTP",
) -> ProviderError:
    """:func:`error_for_status` for a status from HTTP or from a body's ``code`` field.

    Adds content-policy detection on the error's machine words (``moderation_blocked``), and maps
    a body code that is no HTTP status (GrsAI's non-zero codes) to UpstreamBadRequest. A body
    code is kept in ``details["provider_code"]``; ``upstream_status`` is set only when the code
    reads as an HTTP status.
    """
    message = f"{provider} answered {source} {status}" + (f": {reason}" if reason else "")
    http_like = 400 <= status <= 599
    error: ProviderError
    if mentions_content_policy(reason, *hints):
        error = ContentPolicyViolation(
            message, provider=provider, upstream_status=status if http_like else None
        )
    elif not http_like and source != "HTTP":
        error = UpstreamBadRequest(message, provider=provider)
    else:
        error = error_for_status(provider, httpx.Response(status, headers=headers), message)
    if source != "HTTP":
        error.details = {"provider_code": status}
    return error


def reply_error(
    provider: str, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """The error for a non-2xx reply, with the provider's message taken from its error body."""
    return upstream_error(
        provider, status, error_message(body), headers=headers, hints=error_hints(body)
    )


def check_body_code(provider: str, body: Mapping[str, Any], ok: tuple[int, ...]) -> None:
    """Raise for a ``{code, message}`` envelope whose code is not a success code."""
    if "code" not in body:
        return
    code = int_of(body.get("code"))
    if code is None or code in ok:
        return
    raise upstream_error(
        provider, code, error_message(body), hints=error_hints(body), source="code"
    )


def check_error_body(provider: str, body: Mapping[str, Any]) -> None:
    """Raise for a 2xx reply that is an error body (``{"error": ...}``, no task in it)."""
    error = body.get("error")
    if error in (None, "", {}) or "status" in body or isinstance(body.get("data"), Mapping):
        return
    code = int_of(error.get("code")) if isinstance(error, Mapping) else None
    raise upstream_error(
        provider, code or 400, error_message(body), hints=error_hints(body), source="code"
    )


def guard_reply(provider: str, parse: Callable[[], TaskUpdate]) -> TaskUpdate:
    """Run a reply parser; shape errors and odd JSON become UpstreamProtocolError."""
    try:
        return parse()
    except BodyShapeError as exc:
        raise UpstreamProtocolError(f"{provider} answered: {exc}.", provider=provider) from exc
    except (RecursionError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise UpstreamProtocolError(
            f"{provider} answered a body TaskRelay cannot read ({type(exc).__name__}).",
            provider=provider,
        ) from exc


def guard_callback(provider: str, parse: Callable[[], TaskUpdate]) -> TaskUpdate:
    """Run a callback parser; shape errors and odd JSON become CallbackParseError (never a 500)."""
    try:
        return parse()
    except BodyShapeError as exc:
        raise CallbackParseError(f"Unreadable {provider} callback: {exc}.") from exc
    except (RecursionError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CallbackParseError(
            f"Unreadable {provider} callback: the JSON has an unexpected shape "
            f"({type(exc).__name__})."
        ) from exc


def decode_json(provider: str, response: httpx.Response) -> Any:
    """A 2xx reply's JSON; UpstreamProtocolError when it is not JSON."""
    try:
        return json.loads(response.content.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UpstreamProtocolError(
            f"{provider} answered HTTP {response.status_code} with a body that is not JSON.",
            provider=provider,
            upstream_status=response.status_code,
        ) from exc


def error_body(response: httpx.Response) -> Any:
    """An error reply's JSON if it has any (for its message), else ``None``."""
    try:
        return json.loads(response.content.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


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
    try:
        response = await adapter.http.request(
            method,
            url,
            json=json_body,
            params=params,
            headers=adapter.headers(),
            timeout=request_timeout if request_timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
    except httpx.HTTPError as exc:
        raise transport_error(adapter.name, exc) from exc
    if not response.is_success:
        raise reply_error(
            adapter.name, response.status_code, error_body(response), response.headers
        )
    return decode_json(adapter.name, response)


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


def id_of(value: Any) -> str | None:
    """A provider task id from a JSON string or integer; ``None`` for anything else."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
