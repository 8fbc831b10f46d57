"""Pure parsing shared by the adapters: provider bodies in, task updates or typed errors out.

Nothing here does I/O, so unit tests feed these functions recorded sample bodies. Parsers raise
:class:`BodyShapeError` for a body that is not the documented shape; :func:`parse_reply` and
:func:`parse_callback` turn that into the error its source calls for.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

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
)
from service.lifecycle import TaskUpdate
from service.models import DOT_SEGMENTS, TaskStatus

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
# What a parser may trip over in JSON of an unexpected shape (RecursionError: deep nesting;
# ArithmeticError: an integer too large for a float, which JSON allows).
_ODD_JSON = (
    RecursionError,
    ArithmeticError,
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
)
# The largest image side kept from a provider's width or height (GPT Image makes at most 1536).
MAX_IMAGE_SIDE = 100_000


class BodyShapeError(ValueError):
    """A body is not the shape its provider documents.

    Parsers raise this; :func:`guard_reply` turns it into an :class:`UpstreamProtocolError` (a
    reply to our request) and :func:`guard_callback` into a :class:`CallbackParseError`.
    """


class NoImageError(BodyShapeError):
    """A task object reports success but names no image URL.

    Success is final for a task, so such an answer is refused (as any odd shape is) rather
    than recorded: the task stays running, and a later poll or callback can still bring the
    images.
    """


# --- values ------------------------------------------------------------------------------------


# The most of a provider's reason TaskRelay keeps: far more than any real message, while one of
# megabytes would be copied into the task row, every event's snapshot and every webhook body.
MAX_REASON_CHARS = 2000
# A callback token (service/signing.py), where a provider quotes the callback URL it was given
# (an error about it), however the URL is written around it (JSON's "\/", percent-encoded):
# the token lets anyone post to the task, and task JSON, events and logs never carry one. Its
# payload is the base64 of ["tsk_..., so it begins "WyJ0c2tf" (or, compressed, ".eJ": zlib's
# header); then a timestamp and an HMAC-SHA256, each after a dot.
_CALLBACK_TOKEN = re.compile(
    r"(?:WyJ0c2tf[A-Za-z0-9_-]*|\.eJ[A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
)


def scrubbed(text: str) -> str:
    """A provider's text with any callback token in it left out (``…`` in its place)."""
    return _CALLBACK_TOKEN.sub("…", text)


def reason_text(text: str) -> str | None:
    """A provider's reason as TaskRelay keeps it: stripped, :func:`scrubbed`, and cut to at
    most :data:`MAX_REASON_CHARS` with the cut said (so a reason taken twice is cut once);
    None when empty."""
    text = scrubbed(text.strip())
    if len(text) > MAX_REASON_CHARS:
        said = f"… (cut: {len(text)} characters in all)"
        text = text[: MAX_REASON_CHARS - len(said)] + said
    return text or None


def plain_text_of(value: Any) -> str | None:
    """A provider's reason as it said it, stripped: a non-empty string, or an object's
    ``message``-like field (for joining with another before :func:`reason_text`)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, Mapping):
        for key in ("message", "msg", "detail", "error_message", "reason"):
            found = value.get(key)
            if isinstance(found, str) and found.strip():
                return found.strip()
    return None


def text_of(value: Any) -> str | None:
    """A provider's reason as TaskRelay keeps it (:func:`plain_text_of`, then
    :func:`reason_text`)."""
    plain = plain_text_of(value)
    return None if plain is None else reason_text(plain)


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
    # Bounded before float(): JSON integers have no size limit, floats do.
    return float(number) if number is not None and 0 <= number < 10**15 else None


def id_of(value: Any) -> str | None:
    """A provider task id from a JSON string or integer; ``None`` for anything else, and for
    "." and "..", which a status query's path cannot carry (:func:`path_segment`)."""
    if isinstance(value, str):
        text = value.strip()
        return text if text and text not in DOT_SEGMENTS else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def path_segment(provider_task_id: str) -> str:
    """A provider task id as one segment of a status query's path: percent-encoded, "/"
    included, and a dot segment encoded too, so that no id can make the query another path
    of the provider's API (asked with TaskRelay's key). Ids are checked where they come in
    (:func:`id_of`, the API's schemas); this holds for one stored before they were."""
    if provider_task_id in DOT_SEGMENTS:
        return "%2E" * len(provider_task_id)
    return quote(provider_task_id, safe="")


def image_url(value: Any) -> str | None:
    """``value`` as an image URL: an absolute http(s) URL with a host, else ``None``.

    A provider's image must be fetchable from anywhere: a word (``"pending"``), a relative path
    or another scheme is no image, however non-empty.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. "http://[oops": a broken IPv6 host
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        return None  # a control character: no URL, and unsafe in a later request line
    return text


def image_list(value: Any) -> list[dict[str, Any]]:
    """Images from a list of URL strings and/or ``{"url", "width"?, "height"?}`` objects.

    A single string or object counts as a list of one. Only absolute http(s) URLs count
    (:func:`image_url`); other entries are skipped, so a list of none yields no images.
    """
    items = value if isinstance(value, list) else [value]
    images: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items:
        url = image_url(item.get("url") if isinstance(item, Mapping) else item)
        if url is None or url in seen:
            continue
        image: dict[str, Any] = {"url": url}
        seen.add(url)
        if isinstance(item, Mapping):
            for key in ("width", "height"):
                size = item.get(key)
                if (
                    isinstance(size, int)
                    and not isinstance(size, bool)
                    and 0 < size <= MAX_IMAGE_SIDE
                ):
                    image[key] = size
        images.append(image)
    return images


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


# --- task objects ------------------------------------------------------------------------------


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


def read_status(
    task: Mapping[str, Any], known: Mapping[str, TaskStatus], documented: str
) -> tuple[TaskStatus, str]:
    """A task object's ``status`` word and what it means; ``documented`` lists the words for
    the error when there is none."""
    raw = task.get("status")
    if not isinstance(raw, str) or not raw.strip():
        raise BodyShapeError(
            f"expected a `status` string ({documented}) in the object or in its `data` object, "
            f"got {json_type(raw)}"
        )
    return status_from_word(raw, known), raw


def mentions_content_policy(*texts: object) -> bool:
    lowered = " ".join(text for text in texts if isinstance(text, str)).lower()
    return any(marker in lowered for marker in CONTENT_POLICY_MARKERS)


def failure_error(reason: Any, default: str) -> dict[str, Any]:
    """The normalised ``error`` of a failed task from the provider's reason (text or object)."""
    message = text_of(reason) or default
    code_hint = reason.get("code") if isinstance(reason, Mapping) else None
    policy = mentions_content_policy(message, code_hint)
    return {"code": "content_policy_violation" if policy else "provider_failed", "message": message}


def require_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BodyShapeError(f"expected {what} to be a JSON object, got {json_type(value)}")
    return value


def is_envelope(body: Mapping[str, Any]) -> bool:
    """``{code, data}``: a ``data`` key and no ``status`` of its own, or a ``data`` object
    with a ``status`` of its own: then the envelope's (``"status": "success"``, an extra
    field of the request's outcome) is not the task's."""
    if "data" not in body:
        return False
    if "status" not in body:
        return True
    data = body["data"]
    return isinstance(data, Mapping) and "status" in data


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
            else f" (code {scrubbed(repr(code)[:100])}"
            + (f", message {message!r})" if message else ")")
        )
        raise BodyShapeError(
            f"expected `data` to be an object carrying the task, got {json_type(data)}{said}"
        )
    return data


# --- errors ------------------------------------------------------------------------------------


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


MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now."""
    value = httpx.Headers(headers).get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None  # "inf" or "nan" is no hint at all
    # A provider's hint is honoured up to an hour: a wild value must not park work for days.
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def error_for_status(
    provider: str,
    status: int,
    reason: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    hints: tuple[str, ...] = (),
    source: Literal["HTTP", "code"] = "HTTP",
) -> ProviderError:
    """The most specific error for an HTTP error status, or for a body's ``code`` field.

    Content-policy wording in the reason or in the error's machine words (``hints``, e.g.
    ``moderation_blocked``) wins over the status. A body code that is no HTTP status (GrsAI's
    non-zero codes) is an UpstreamBadRequest and is kept in ``details["provider_code"]``;
    ``upstream_status`` is set only for a status that reads as HTTP. None of these is
    ``ambiguous``: the provider answered, and said no; only a gateway's timeout (504, 524)
    and an HTTP status outside 3xx-5xx (an UpstreamProtocolError) leave open whether it
    acted on the request. A redirect (3xx) is a base URL to set right (:func:`_redirected`).
    """
    message = f"{provider} answered {source} {status}" + (f": {reason}" if reason else "")
    from_body = source == "code"
    policy = mentions_content_policy(reason, *hints)
    http_like = 400 <= status <= 599
    upstream_status = status if http_like or not (policy or from_body) else None
    kwargs: dict[str, Any] = {
        "provider": provider,
        "upstream_status": upstream_status,
        "details": {"provider_code": status} if from_body else None,
    }
    if policy:
        return ContentPolicyViolation(message, **kwargs)
    if from_body and not http_like:
        return UpstreamBadRequest(message, **kwargs)
    if status in (401, 403):
        return UpstreamUnauthorized(message, **kwargs)
    if status == 404:
        return UpstreamNotFound(message, **kwargs)
    if status == 429:
        return UpstreamRateLimited(message, retry_after=retry_after_seconds(headers), **kwargs)
    if status >= 500:
        # A gateway's timeout: the provider behind it got the request and did not answer in
        # time, so it may have acted on it, as after a read timeout of TaskRelay's own.
        gave_up = source == "HTTP" and status in GATEWAY_TIMEOUTS
        return UpstreamUnavailable(
            message, retry_after=retry_after_seconds(headers), ambiguous=gave_up, **kwargs
        )
    if status >= 400:
        return UpstreamBadRequest(message, **kwargs)
    if source == "HTTP" and 300 <= status < 400 and status != 303:
        # (303 See Other answers a POST that was carried out: ambiguous, as below.)
        return _redirected(provider, message, headers, kwargs)
    return UpstreamProtocolError(message, **kwargs)


def _redirected(
    provider: str, message: str, headers: Mapping[str, str] | None, kwargs: dict[str, Any]
) -> ProviderError:
    """A redirect (an ``http://`` base URL sent on to ``https://``, an API that moved): the
    server answered before the request reached the API, so nothing was made, and sending it
    again meets the same answer. TaskRelay does not follow it with the provider's API key;
    the base URL is to be set right. Not ambiguous, not retried: taken for a lost answer, a
    task at a provider that calls back would wait for its deadline with no error."""
    location = httpx.Headers(headers).get("location") if headers else None
    said = f" to {scrubbed(location[:300])}" if location else ""
    error = UpstreamProtocolError(
        f"{message} (a redirect{said}). TaskRelay does not follow redirects with the "
        f"provider's API key: set TASKRELAY_{provider.upper()}_BASE_URL to the address the "
        "API answers at.",
        ambiguous=False,
        **kwargs,
    )
    error.retryable = False
    return error


# 504 Gateway Timeout; 524, Cloudflare's "A Timeout Occurred" (the origin took the
# connection and did not answer in time).
GATEWAY_TIMEOUTS = (504, 524)


def reply_error(
    provider: str, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """The error for a non-2xx reply, with the provider's message taken from its error body."""
    return error_for_status(
        provider, status, error_message(body), headers=headers, hints=error_hints(body)
    )


def check_body_code(provider: str, body: Mapping[str, Any], ok: tuple[int, ...]) -> None:
    """Raise for a ``{code, message}`` envelope whose code is not a success code."""
    if "code" not in body:
        return
    code = int_of(body.get("code"))
    if code is None or code in ok:
        return
    raise error_for_status(
        provider, code, error_message(body), hints=error_hints(body), source="code"
    )


def check_error_body(provider: str, body: Mapping[str, Any]) -> None:
    """Raise for a 2xx reply that is an error body (``{"error": ...}``, no task in it)."""
    error = body.get("error")
    if error in (None, "", {}) or "status" in body or isinstance(body.get("data"), Mapping):
        return
    code = int_of(error.get("code")) if isinstance(error, Mapping) else None
    raise error_for_status(
        provider, code or 400, error_message(body), hints=error_hints(body), source="code"
    )


# --- running a parser --------------------------------------------------------------------------


def guard_reply(provider: str, parse: Callable[[], TaskUpdate]) -> TaskUpdate:
    """Run a reply parser; shape errors and odd JSON become UpstreamProtocolError (ambiguous:
    the provider may have acted on the request it answered so)."""
    try:
        return parse()
    except BodyShapeError as exc:
        raise UpstreamProtocolError(f"{provider} answered: {exc}.", provider=provider) from exc
    except _ODD_JSON as exc:
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
    except _ODD_JSON as exc:
        raise CallbackParseError(
            f"Unreadable {provider} callback: the JSON has an unexpected shape "
            f"({type(exc).__name__})."
        ) from exc


def parse_reply(
    provider: str, status_code: int, body: Any, parse: Callable[[Any], TaskUpdate]
) -> TaskUpdate:
    """A reply to one of our requests: an error status raises its error, a 2xx is parsed."""
    if not 200 <= status_code < 300:
        raise reply_error(provider, status_code, body)
    return guard_reply(provider, lambda: parse(body))


def reject_json_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (Python accepts them by default)."""
    raise ValueError(f"{name} is not a JSON value")


class UnstorableJSON(ValueError):
    """Valid JSON holding a value nothing downstream can keep or send on."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity, which JSON cannot carry back out
        raise UnstorableJSON(f"the number {text[:40]} is out of range")
    return value


# Only these escapes can put a NUL or an unpaired surrogate into decoded text (UTF-8 decoding
# refuses encoded surrogates, and JSON refuses raw control characters), so text without one
# skips the walk.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def _string_problem(value: Any) -> str | None:
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string holds a NUL character (\\u0000), which cannot be stored"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds an unpaired UTF-16 surrogate, which is not Unicode text"
    return None


def loads_storable(text: str) -> Any:
    """JSON text to a value, refusing what JSON allows but no database column, UTF-8 encoder or
    JSON encoder downstream can take: ``NaN``/``Infinity``, numbers too large for a float
    (they parse as infinity), NUL characters (PostgreSQL text cannot hold them) and unpaired
    surrogates. Raises ValueError (:class:`UnstorableJSON` for those), or RecursionError."""
    value = json.loads(text, parse_constant=reject_json_constant, parse_float=_finite_float)
    if _SUSPECT_ESCAPE.search(text):
        problem = _string_problem(value)
        if problem is not None:
            raise UnstorableJSON(problem)
    return value


def loads_provider_json(text: str) -> Any:
    """A provider's JSON (a callback, a reply): as :func:`loads_storable`, except that a NUL or
    an unpaired surrogate in a string is replaced by U+FFFD instead of refusing the whole body.
    A provider cannot be asked to send it again, and refused, its final word would never be
    recorded; a callback's raw bytes are kept for audit as they came anyway."""
    value = json.loads(text, parse_constant=reject_json_constant, parse_float=_finite_float)
    if _SUSPECT_ESCAPE.search(text) and _string_problem(value) is not None:
        return _mended(value)
    return value


def _mended(value: Any) -> Any:
    if isinstance(value, str):
        # Lone surrogates round-trip through UTF-16 as U+FFFD; paired ones are one character.
        text = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return text.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        mended: dict[str, Any] = {}
        for key, item in value.items():  # two keys mended alike: the first one's value stays
            mended.setdefault(_mended(key), _mended(item))
        return mended
    if isinstance(value, list):
        return [_mended(item) for item in value]
    return value


# The deepest JSON TaskRelay takes (a request body, a callback): no real body comes near it.
MAX_JSON_DEPTH = 64


def depth_ok(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` levels of objects and arrays."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def parse_json_body(body: bytes) -> Any:
    """Callback bodies: JSON, UTF-8 (a BOM tolerated). Anything else is a CallbackParseError."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CallbackParseError("The callback body is not UTF-8 text.") from exc
    if not text.strip():
        raise CallbackParseError("The callback body is empty; expected a JSON object.")
    if too_many_values(text):
        raise CallbackParseError(too_many())
    try:
        value = loads_provider_json(text)
    except UnstorableJSON as exc:
        raise CallbackParseError(f"The callback body cannot be accepted: {exc}.") from exc
    except RecursionError as exc:
        raise CallbackParseError(too_deep(MAX_JSON_DEPTH)) from exc
    except ValueError as exc:
        raise CallbackParseError(f"The callback body is not valid JSON: {exc}.") from exc
    # Each level but the innermost value's opens with a bracket: a body with fewer than the
    # limit (every provider's callback) cannot nest too deep, and counting them costs a tenth
    # of walking the value.
    brackets = text.count("{") + text.count("[")
    if brackets >= MAX_JSON_DEPTH and not depth_ok(value, MAX_JSON_DEPTH):
        raise CallbackParseError(too_deep(MAX_JSON_DEPTH))
    return value


# The most values a JSON body TaskRelay parses may hold (objects, arrays and their items,
# counted from its brackets and commas, strings' own included, before parsing): no callback or
# API body comes near it, while a body of a million tiny arrays cost a second or more of the
# event loop's time to parse and check, holding up every other request.
MAX_JSON_VALUES = 20_000


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear, and fast in re


def too_many_values(text: str) -> bool:
    """Whether ``text`` holds more than :data:`MAX_JSON_VALUES` values: each object or array
    opens with a bracket, and each item after the first follows a comma, so their count is an
    upper bound; counted again without the strings' contents (a prompt's or a metadata
    text's own commas) before it refuses anything."""
    if len(text) <= MAX_JSON_VALUES:  # fewer characters than that: fewer values too
        return False
    if text.count("[") + text.count("{") + text.count(",") <= MAX_JSON_VALUES:
        return False
    bare = _JSON_STRING.sub('""', text)
    return bare.count("[") + bare.count("{") + bare.count(",") > MAX_JSON_VALUES


def too_many(what: str = "callback body") -> str:
    return (
        f"The {what} holds more than {MAX_JSON_VALUES} JSON values (objects, arrays and "
        "their items); send fewer (a long list in metadata can be one string instead)."
    )


def too_deep(limit: int, what: str = "callback body") -> str:
    return f"The {what} is nested deeper than {limit} levels of objects and arrays."


def parse_callback(
    provider: str, body: bytes, parse_task: Callable[[Mapping[str, Any]], TaskUpdate]
) -> TaskUpdate:
    """A callback body carrying a task object, bare or in a ``{code, data}`` envelope."""
    payload = parse_json_body(body)
    return guard_callback(provider, lambda: parse_task(status_object(payload, "the callback body")))
